"""ASGI entry point: `daphne gateway_project.asgi:application`."""

from __future__ import annotations

import os
from typing import Any

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")
django_application = get_asgi_application()

from django.conf import settings  # noqa: E402

from events import endpoint  # noqa: E402 - needs Django set up first
from gateway_project.logging import route_daphne_access_log  # noqa: E402

if settings.LOG_FORMAT == "json":
    route_daphne_access_log()

# The admin's static files are served by the app itself so one image needs nothing else;
# a proxy in front may serve /static/ instead.
_django = ASGIStaticFilesHandler(django_application)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """SSE streams go to their own endpoint (see events/endpoint.py for why); everything else to Django."""
    if scope["type"] == "http" and scope["path"] == endpoint.PATH:
        await endpoint.stream_endpoint(scope, receive, send)
    else:
        await _django(scope, receive, send)
