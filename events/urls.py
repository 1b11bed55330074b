from django.urls import path

from events import views

urlpatterns = [
    path("stream", views.stream, name="events-stream"),
    path("tickets", views.tickets, name="events-tickets"),
]
