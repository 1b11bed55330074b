from django.apps import AppConfig


class EventsConfig(AppConfig):
    name = "events"
    verbose_name = "Events"

    def ready(self) -> None:
        from events import checks  # noqa: F401, PLC0415 - registers the deployment checks
