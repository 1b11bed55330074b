from django.contrib import admin
from django.urls import include, path

from gateway_project import ops

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/events/", include("events.urls")),
    path("demo/", include("events.demo.urls")),
    path("healthz", ops.healthz),
    path("readyz", ops.readyz),
    path("metrics", ops.metrics),
]
