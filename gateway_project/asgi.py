"""ASGI entry point: `daphne gateway_project.asgi:application`."""

from __future__ import annotations

import os
from typing import Any

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")
django_application = get_asgi_application()

from django.conf import settings  # noqa: E402

from events.delivery import daphne, endpoint  # noqa: E402 - needs Django set up first
from gateway_project import ops  # noqa: E402

# The server is daphne: its specifics (slow-client probe, graceful shutdown, access log) in one adapter.
daphne.install(json_access_log=settings.LOG_FORMAT == "json")
stream_endpoint = endpoint.StreamEndpoint(probe_for=daphne.probe_for)

# The admin's static files are served by the app itself so one image needs nothing else;
# a proxy in front may serve /static/ instead.
_django = ASGIStaticFilesHandler(django_application)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """SSE streams go to their own endpoint (see events/delivery/endpoint.py for why), health and metrics to
    theirs (any Host); everything else to Django."""
    if scope["type"] == "http" and scope["path"] == endpoint.PATH:
        await stream_endpoint(scope, receive, send)
    elif scope["type"] == "http" and scope["path"] in ops.PATHS:
        await ops.ops_endpoint(scope, receive, send)
    else:
        await _django(scope, receive, send)
