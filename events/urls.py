from django.urls import path, re_path

from events import views

urlpatterns = [
    path("stream", views.stream, name="events-stream"),
    path("tickets", views.tickets, name="events-tickets"),
    # Any segment reaches the view, which answers a malformed id with a JSON 400.
    re_path(r"^streams/(?P<stream_id>[^/]*)/token\Z", views.stream_token, name="events-stream-token"),
    path("client.js", views.client_file, {"name": "client.js"}, name="events-client"),
    path("client.d.ts", views.client_file, {"name": "client.d.ts"}, name="events-client-types"),
]
