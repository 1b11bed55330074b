from django.urls import path
from django_eventstream.views import events

urlpatterns = [path("events/", events)]
