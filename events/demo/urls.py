"""Included from gateway_project/urls.py under `demo/`."""

from django.urls import path

from events.demo import views

urlpatterns = [
    path("", views.page, name="demo"),
    path("publish", views.publish, name="demo-publish"),
]
