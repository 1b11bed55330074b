"""`manage.py demo_setup`: a demo superuser who may follow a demo process instance (development only)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from subscriptions import services


class Command(BaseCommand):
    help = "Create (or reset) a demo superuser and grant it a demo process instance. Refused unless DEBUG."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--user", default="demo")
        parser.add_argument("--password", required=True)
        parser.add_argument("--process-instance", default="demo-process-1")

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DEBUG:
            raise CommandError("demo_setup creates a known password; it only runs with DJANGO_DEBUG=true")
        user, _ = get_user_model().objects.get_or_create(username=options["user"])
        user.is_staff = user.is_superuser = True
        user.set_password(options["password"])
        user.save()
        services.grant_apply(
            user=options["user"],
            process_instance=options["process_instance"],
            granted_by="demo_setup",
            source="admin",
            at=datetime.now(UTC),
        )
        self.stdout.write(f"demo user {options['user']!r} may follow {options['process_instance']!r}")
