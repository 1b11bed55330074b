from django.urls import path

from events import views

urlpatterns = [
    path("tickets", views.tickets, name="events-tickets"),
]
