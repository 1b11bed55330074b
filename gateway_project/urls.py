from django.conf import settings
from django.contrib import admin
from django.urls import include, path

# /healthz, /readyz and /metrics are answered before Django (gateway_project/ops.py), on any Host.
urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/events/", include("events.urls")),
]
if settings.DEMO_ENABLED:
    urlpatterns.append(path("demo/", include("events.demo.urls")))
