"""ASGI entry point: `daphne gateway_project.asgi:application`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

import django
from django.conf import settings
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.http import JsonResponse
from django.urls import Resolver404, ResolverMatch, get_resolver, set_script_prefix

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")
django.setup(set_prefix=False)

from events.delivery import daphne, endpoint  # noqa: E402 - needs Django set up first
from events.ops import metrics  # noqa: E402
from gateway_project import ops  # noqa: E402

logger = logging.getLogger("django.request")
Send = Callable[[Mapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]


class GatewayASGIHandler(ASGIHandler):
    """Django's ASGI handler, except for views marked `endpoint.threadless` (the event stream).

    Django runs each request in a thread-sensitive context, and its first sync call (request_started's
    receivers, any middleware) gives that context a thread for the request's whole life: one idle thread
    per open stream (see events/delivery/endpoint.py). A threadless view is resolved through the URLconf
    like any other and then served in the event loop alone: no thread-sensitive context, no middleware,
    no request_started/request_finished signals. The request's scope carries the server adapter's socket
    probe (`endpoint.PROBE_SCOPE_KEY`), which the stream needs for backpressure; a client that disconnects
    cancels the view and its response, as Django does.
    """

    def __init__(self, *, probe_for: endpoint.ProbeFor | None = None) -> None:
        super().__init__()
        self.probe_for = probe_for

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            match = _threadless_match(get_script_prefix(scope), scope["path"])
            if match is not None:
                await self._serve_threadless(match, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _serve_threadless(
        self, match: ResolverMatch, scope: dict[str, Any], receive: Receive, send: Send
    ) -> None:
        try:
            body_file = await self._read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        probe = self.probe_for(send) if self.probe_for is not None else None
        request, error_response = self.create_request({**scope, endpoint.PROBE_SCOPE_KEY: probe}, body_file)
        body_file.close()  # a stream request has no body worth keeping for the stream's life
        del body_file
        if request is None:
            assert error_response is not None
            await self.send_response(error_response, send)
            return
        request.resolver_match = match
        this = asyncio.current_task()
        assert this is not None
        gone: list[bool] = []  # set by the watcher before it cancels this task
        watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, this, gone))
        body: AsyncGenerator[bytes, None] | None = None
        try:
            try:
                response = await match.func(request, *match.args, **match.kwargs)
            except Exception:
                logger.exception("the threadless view %s failed", match.view_name)
                response = JsonResponse({"error": "internal error"}, status=500)
            del request  # what the stream needs it has taken; the request is not kept for the stream's life
            if isinstance(response, endpoint.StreamResponse):
                # Sent here, so that the response object itself (its headers, cookies, the generators
                # wrapping its content) is let go once the head is out: only the stream's body stays.
                body, first = response.body, response.first
                start = {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.items()],
                }
                del response
                await send(start)
                await send({"type": "http.response.body", "body": first, "more_body": True})
                del start, first
                send_now = probe.send_now if probe is not None else None
                async for chunk in body:
                    if send_now is None or not send_now(chunk):
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await self.send_response(response, send)
        except asyncio.CancelledError:
            if not gone:
                raise
            this.uncancel()  # the client left: the view and its response were cancelled for that alone
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if body is not None:
                await body.aclose()

    async def _read_body(self, receive: Receive) -> Any:
        """The request's body as Django's handler reads it; a request without one (a stream's GET: one
        message, empty) without the spooled temporary file Django makes for it."""
        first = await receive()
        if first["type"] == "http.request" and not first.get("body") and not first.get("more_body"):
            return io.BytesIO()
        replay = [first]

        async def again() -> Mapping[str, Any]:
            return replay.pop() if replay else await receive()

        return await self.read_body(again)


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any], gone: list[bool]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.append(True)
            task.cancel()
            return


@functools.lru_cache(maxsize=256)
def _threadless_match(script_prefix: str, path: str) -> ResolverMatch | None:
    """The URLconf's match for `path` if its view is marked threadless (cached: streams share one path)."""
    path_info = path.removeprefix(script_prefix) if script_prefix else path
    try:
        match = get_resolver().resolve(path_info)
    except Resolver404:
        return None
    return match if getattr(match.func, "threadless", False) else None


metrics.count_database_queries()
# The server is daphne: its specifics (slow-client probe, graceful shutdown, access log) in one adapter.
daphne.install(json_access_log=settings.LOG_FORMAT == "json")
django_application = GatewayASGIHandler(probe_for=daphne.probe_for)

# The admin's static files are served by the app itself so one image needs nothing else;
# a proxy in front may serve /static/ instead.
_django = ASGIStaticFilesHandler(django_application)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Health and metrics go to their own endpoint (any Host); everything else to Django, whose URLconf
    routes the event stream to its threadless view."""
    if scope["type"] == "http" and scope["path"] in ops.PATHS:
        await ops.ops_endpoint(scope, receive, send)
    else:
        await _django(scope, receive, send)
