"""The demo page's views: a logged-in user watches their stream in the browser and publishes test events.

No build step: a template and one plain JS file.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiokafka.errors import KafkaError
from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_POST, require_safe

from events.core.envelope import EVENT_NAME, PROCESS_INSTANCE, InvalidRecord
from events.delivery.auth import VIEW_ALL
from events.delivery.endpoint import PATH as STREAM_PATH
from events.ingest.publish import envelope_build, envelope_check, event_publish
from subscriptions.models import Grant
from subscriptions.selectors import grants_missing

logger = logging.getLogger(__name__)

# Named events a native EventSource only dispatches to listeners registered for that name; the page
# starts with these (the gateway's own control events and the demo producer's) and lets the user add more.
DEFAULT_EVENT_NAMES = [
    "message",
    "stream-reset",
    "unsubscribed",
    "auth-expired",
    "Notification",
    "ProcessMetadata",
    "Announcement",
    "Data",
    "DemoEvent",
]
SHOWN_GRANTS = 50


def _granted(user: str) -> list[str]:
    """The process instances `user` holds active grants for (the first SHOWN_GRANTS, by name)."""
    return list(
        Grant.objects.filter(user=user, revoked_at__isnull=True)
        .order_by("process_instance")
        .values_list("process_instance", flat=True)[:SHOWN_GRANTS]
    )


@require_safe
@login_required
def page(request: HttpRequest) -> HttpResponse:
    username = request.user.get_username()
    config = {
        "user": username,
        "streamUrl": STREAM_PATH,
        "publishUrl": reverse("demo-publish"),
        "grantedProcessInstances": _granted(username),
        "viewAll": request.user.has_perm(VIEW_ALL),
        "eventNames": DEFAULT_EVENT_NAMES,
    }
    return render(request, "events/demo.html", {"config": config})


def _refuse(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


@require_POST
async def publish(request: HttpRequest) -> HttpResponse:
    """Publish a test event for the caller, or for a process instance they may follow. CSRF-checked
    by the middleware like any session POST. Body: {"event", "data", "processInstanceUuid"?}."""
    user = await request.auser()
    if not user.is_authenticated or not user.is_active:
        return _refuse(401, "log in first")
    try:
        body = json.loads(request.body or b"{}")
    except json.JSONDecodeError:
        return _refuse(400, "the body must be JSON")
    if not isinstance(body, dict):
        return _refuse(400, "the body must be a JSON object")
    event = body.get("event") or "DemoEvent"
    process_instance = body.get("processInstanceUuid") or None
    if not isinstance(event, str) or not EVENT_NAME.match(event):
        return _refuse(400, "event must match ^[A-Za-z0-9_.:-]{1,64}$")
    if process_instance is not None and (
        not isinstance(process_instance, str) or not PROCESS_INSTANCE.match(process_instance)
    ):
        return _refuse(400, "processInstanceUuid must match ^[A-Za-z0-9_.:-]{1,128}$")
    username = user.get_username()
    if (
        process_instance is not None
        and not await user.ahas_perm(VIEW_ALL)
        and await sync_to_async(grants_missing)(user=username, process_instances=[process_instance])
    ):
        return _refuse(403, f"not allowed to follow process instance {process_instance}")
    envelope: dict[str, Any] = envelope_build(
        # A process instance's event goes to everyone following it; otherwise to the caller alone.
        user=None if process_instance else username,
        process_instance=process_instance,
        event=event,
        data=body.get("data", {}),
    )
    try:
        envelope_check(envelope)
    except InvalidRecord as exc:
        return _refuse(400, str(exc))
    try:
        published = await event_publish(envelope=envelope)
    except KafkaError:
        logger.warning("demo publish failed: Kafka unavailable", exc_info=True)
        return _refuse(503, "Kafka is unavailable, try again")
    return JsonResponse(
        {
            "topic": published.topic,
            "partition": published.partition,
            "offset": published.offset,
            "envelope": envelope,
        },
        status=201,
    )
