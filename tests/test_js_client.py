"""The gateway's JavaScript client (events/static/events-gateway/client.js) in Chromium, on real processes.

- Three tabs of one origin share one stream: the server sees one connection, every tab gets every event
  once, and closing the leader's tab hands over to another tab, which resumes from the last id it saw.
- Through deploy/nginx.conf over HTTP/1.1, with two web processes: a native EventSource opened through the
  ticket flow receives token-expiring, renews, and keeps receiving past its first token's exp.
- A page on another origin imports the client (CORS), resumes after a reload from sessionStorage, and is
  called back on stream-reset, unsubscribed and auth-expired (then reopens with a fresh token).
The pages are tests/browser/tab.html, served by Playwright as if from the gateway's origin, and
cross-origin.html, served from another origin; everything else they load or call is the real gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.test import Client
from playwright.async_api import Browser, BrowserContext, Page, Request, Route, async_playwright, expect

from scripts.embedded import free_port
from subscriptions import services
from subscriptions.models import Subscription
from tests.certificates import self_signed
from tests.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.harness import ROOT, Gateway, Layout, Proc, token, wait_until
from tests.test_browser import PageServer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.incidental_db]

BROWSER_DIR = Path(__file__).parent / "browser"
CLIENT_DIR = ROOT / "events" / "static" / "events-gateway"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
RETRY_MS = 250
RENEW_SECONDS = 4
WAIT_MS = 30_000

expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def app() -> Iterator[PageServer]:
    """A front end on another origin: tests/browser/ over HTTP. (A loopback server of its own: Chromium
    lets only pages from a loopback address reach the loopback gateway.)"""
    server = PageServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shared_layout(app: PageServer) -> Layout:
    """Two web processes (nginx balances them), short renewals, the app's origin allowed."""
    env = {
        "CORS_ALLOWED_ORIGINS": app.origin,
        "EVENTS_RETRY_MS": str(RETRY_MS),
        "EVENTS_TOKEN_RENEW_SECONDS": str(RENEW_SECONDS),
    }
    return Layout(webs=2, env=env)


@pytest.fixture
def gateway(shared_gateway: Gateway) -> Gateway:
    return shared_gateway


# --- pages ------------------------------------------------------------------------------------------------
async def serve_pages(context: BrowserContext, origin: str, prefix: str = "/app/") -> None:
    """Answer `origin + prefix + <file>` with tests/browser/<file>: the test's pages live at that origin."""

    async def fulfill(route: Route) -> None:
        name = urlsplit(route.request.url).path.removeprefix(prefix)
        path = BROWSER_DIR / name
        if "/" in name or not path.is_file():
            await route.fulfill(status=404, body="not found")
            return
        content_type = "text/html" if name.endswith(".html") else "text/javascript"
        await route.fulfill(body=path.read_bytes(), content_type=f"{content_type}; charset=utf-8")

    await context.route(re.compile("^" + re.escape(origin + prefix) + r"[^?]*(\?.*)?$"), fulfill)


async def open_tab(context: BrowserContext, url: str, config: dict[str, Any]) -> Page:
    page = await context.new_page()
    await page.goto(url)
    await page.wait_for_function("typeof window.start === 'function'")
    await page.evaluate("config => start(config)", config)
    return page


def stream_requests(context: BrowserContext) -> list[Request]:
    """Every GET of the stream endpoint from any tab of the context from now on."""
    seen: list[Request] = []
    context.on("request", lambda r: seen.append(r) if "/api/events/stream" in r.url and r.method == "GET" else None)
    return seen


async def shown(page: Page) -> list[tuple[str, int]]:
    """(id, n) of every event the page shows, in the order it got them."""
    items = await page.locator("#events li").evaluate_all(
        "items => items.map(li => [li.dataset.id, JSON.parse(li.textContent).n])"
    )
    return [(str(i), int(n)) for i, n in items]


async def leader(page: Page) -> bool:
    return bool(await page.evaluate("window.client.leader"))


def _session_cookie(username: str) -> str:
    user, _ = get_user_model().objects.get_or_create(username=username)
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def _streams_of(user: str) -> list[tuple[str, str]]:
    return [(str(s.id), s.close_reason) for s in Subscription.objects.filter(user=user).order_by("opened_at")]


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the edge's self-signed certificate
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


async def open_streams(web_url: str) -> float:
    """The web process's gateway_open_streams gauge."""
    _, _, body = await asyncio.to_thread(_get, web_url + "/metrics")
    match = re.search(rb"^gateway_open_streams (\S+)$", body, re.MULTILINE)
    assert match is not None
    return float(match[1])


# --- one connection for three tabs ------------------------------------------------------------------------
async def test_three_tabs_share_one_stream_and_the_leaders_tab_closing_hands_over_without_loss(
    browser: Browser, gateway: Gateway
) -> None:
    user = "three-tabs"
    web = gateway.webs[0].url
    context = await browser.new_context()
    try:
        session = await sync_to_async(_session_cookie)(user)
        await context.add_cookies([{"name": "sessionid", "value": session, "url": web}])
        await serve_pages(context, web)
        requests = stream_requests(context)
        config = {"mode": "session", "events": ["Data"], "retryMs": RETRY_MS}
        tabs = [await open_tab(context, web + "/app/tab.html", config) for _ in range(3)]
        for tab in tabs:
            await expect(tab.locator("#state")).to_have_text("open")
        assert [await leader(tab) for tab in tabs].count(True) == 1

        # One stream on the server: one request from the browser, one open stream, one audited stream.
        assert len(requests) == 1

        async def one_open() -> bool:
            return await open_streams(web) == 1

        await wait_until(one_open, what="one stream open on the server")
        await wait_until(lambda: sync_to_async(_streams_of)(user), what="the stream's audit row")

        def data(n: int) -> dict[str, Any]:
            return {"user": user, "event": "Data", "data": {"n": n}}

        for n in range(1, 6):
            await gateway.produce(data(n))
        for tab in tabs:
            await expect(tab.locator("#events li")).to_have_count(5)
        first = await shown(tabs[0])
        assert [n for _, n in first] == [1, 2, 3, 4, 5]
        assert len({i for i, _ in first}) == 5
        for tab in tabs[1:]:
            assert await shown(tab) == first
        assert len(requests) == 1
        assert await open_streams(web) == 1
        assert len(await sync_to_async(_streams_of)(user)) == 1

        # The leader's tab closes; events go on being produced while another tab takes over.
        [old] = [tab for tab in tabs if await leader(tab)]
        await old.close()
        rest = [tab for tab in tabs if tab is not old]
        for n in range(6, 9):
            await gateway.produce(data(n))
        await wait_until(lambda: _one_leader(rest), what="another tab to take the lock")
        for n in range(9, 11):
            await gateway.produce(data(n))
        for tab in rest:
            await expect(tab.locator("#events li")).to_have_count(10)
            got = await shown(tab)
            assert [n for _, n in got] == list(range(1, 11)), "an event was lost, repeated or reordered"
            assert len({i for i, _ in got}) == 10
        assert await shown(rest[0]) == await shown(rest[1])

        # The new leader resumed from the last id it had seen, on a second stream; the first is closed.
        assert len(requests) == 2
        resumed = parse_qs(urlsplit(requests[1].url).query)
        assert resumed["lastEventId"] == [first[-1][0]]
        await wait_until(one_open, what="one stream open on the server, the new leader's")

        async def audited() -> list[tuple[str, str]] | None:
            rows = await sync_to_async(_streams_of)(user)
            return rows if len(rows) == 2 and rows[0][1] == "client_gone" and rows[1][1] == "" else None

        await wait_until(audited, what="two audited streams, the first closed")
    finally:
        await context.close()


async def _one_leader(tabs: list[Page]) -> bool:
    return [await leader(tab) for tab in tabs].count(True) == 1


# --- renewal through nginx, HTTP/1.1 ---------------------------------------------------------------------
@dataclass
class Edge:
    url: str
    proc: Proc


def _nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None or not Path("/etc/nginx/mime.types").exists():
        pytest.fail("nginx is not installed: scripts/system-packages installs it (apt-get install nginx-light)")
    return found


@pytest.fixture(scope="module")
def edge(module_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """deploy/nginx.conf in front of the module's two web processes. The copy differs in addresses only: the
    compose network's web-1 and web-2, and ports 80 and 443, become loopback addresses."""
    nginx = _nginx()
    work = tmp_path_factory.mktemp("edge")
    shutil.copy("/etc/nginx/mime.types", work / "mime.types")
    (work / "tls").mkdir()
    self_signed(work / "tls" / "fullchain.pem", work / "tls" / "privkey.pem", common_name="localhost")
    tls_port, plain_port = free_port(), free_port()
    conf = NGINX_CONF.read_text()
    replacements = {
        "server web-1:8000": "server " + module_gateway.webs[0].url.removeprefix("http://"),
        "server web-2:8000": "server " + module_gateway.webs[1].url.removeprefix("http://"),
        "listen 80 default_server;": f"listen 127.0.0.1:{plain_port} default_server;",
        "listen 443 ssl http2 default_server;": f"listen 127.0.0.1:{tls_port} ssl http2 default_server;",
    }
    for old, new in replacements.items():
        assert conf.count(old) == 1, old
        conf = conf.replace(old, new)
    (work / "nginx.conf").write_text(conf)
    argv = [nginx, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", f"daemon off; pid {work / 'nginx.pid'};"]
    proc = Proc("nginx", argv, os.environ)
    edge = Edge(f"https://127.0.0.1:{tls_port}", proc)

    async def ready() -> bool:
        status, _, _ = await asyncio.to_thread(_get, edge.url + "/healthz")
        return status == 200

    try:
        asyncio.run(wait_until(ready, timeout=30, what="nginx", watch=[proc], ignore=(OSError,)))
        yield edge
    finally:
        asyncio.run(proc.stop())


@pytest_asyncio.fixture
async def http11_browser() -> AsyncIterator[Browser]:
    """Chromium speaking HTTP/1.1 only, to the edge that would offer HTTP/2."""
    if not await asyncio.to_thread(CHROMIUM.exists):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/system-packages as root (apt-get install chromium)")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, "--disable-http2"]
        )
        try:
            yield chromium
        finally:
            await chromium.close()


async def test_through_nginx_over_http11_a_ticket_stream_renews_its_token_and_outlives_it(
    http11_browser: Browser, gateway: Gateway, edge: Edge
) -> None:
    user = "renews-through-nginx"
    ttl = RENEW_SECONDS + 6
    issued: list[int] = []

    def fresh_token() -> str:
        bearer = token(user, ttl=ttl)
        issued.append(int(time.time()) + ttl)
        return bearer

    context = await http11_browser.new_context(ignore_https_errors=True)
    try:
        await context.expose_function("freshToken", fresh_token)
        await serve_pages(context, edge.url)
        requests = stream_requests(context)
        renewals: list[int] = []
        context.on(
            "response", lambda r: renewals.append(r.status) if re.search(r"/streams/[^/]+/token$", r.url) else None
        )
        page = await open_tab(context, edge.url + "/app/tab.html", {"mode": "bearer", "events": ["Data"]})
        await expect(page.locator("#state")).to_have_text("open")
        first_exp = issued[0]

        await gateway.produce({"user": user, "event": "Data", "data": {"n": 1}})
        await expect(page.locator("#events li")).to_have_count(1)
        notice = page.locator('#notices li[data-event="token-expiring"]')
        await expect(notice.first).to_be_attached()
        stream_id = json.loads(await notice.first.text_content() or "{}")["stream"]
        await wait_until(lambda: 200 in renewals, what="the renewal POST to be answered 200")

        # Past the first token's exp, on the same connection.
        await wait_until(lambda: time.time() > first_exp + 1.5, timeout=ttl + 10, what="the first exp to pass")
        for n in range(2, 4):
            await gateway.produce({"user": user, "event": "Data", "data": {"n": n}})
        await expect(page.locator("#events li")).to_have_count(3)
        assert [n for _, n in await shown(page)] == [1, 2, 3]
        assert await page.locator('#notices li[data-event="auth-expired"]').count() == 0
        assert len(requests) == 1, "the stream was reopened instead of renewed"
        assert "ticket" in parse_qs(urlsplit(requests[0].url).query)
        assert await page.evaluate("window.client.state") == "open"

        async def audited() -> bool:
            return [stream for stream, _ in await sync_to_async(_streams_of)(user)] == [stream_id]

        await wait_until(audited, what="one audited stream, the renewed one")

        # Native EventSource over HTTP/1.1 through the edge: nginx's access log shows each request's protocol
        # (a stream's line once it ends).
        await page.close()
        requested = r'"GET /api/events/stream\?ticket=[^ "]+ HTTP/1\.1" 200 '
        await wait_until(lambda: re.search(requested, edge.proc.log()), what="the stream in nginx's access log")
        renewed = rf'"POST /api/events/streams/{stream_id}/token HTTP/1\.1" 200 '
        assert re.search(renewed, edge.proc.log())
    finally:
        await context.close()


# --- another origin: CORS, reloads, callbacks -------------------------------------------------------------
async def test_the_client_and_its_types_are_served_with_the_apis_cors(gateway: Gateway, app: PageServer) -> None:
    for name, content_type in (("client.js", "text/javascript"), ("client.d.ts", "application/typescript")):
        url = gateway.url + "/api/events/" + name
        status, headers, body = await asyncio.to_thread(_get, url, {"Origin": app.origin})
        assert status == 200
        assert headers["content-type"].startswith(content_type)
        assert body == (CLIENT_DIR / name).read_bytes()
        assert headers["access-control-allow-origin"] == app.origin
        again, _, _ = await asyncio.to_thread(_get, url, {"If-None-Match": headers["etag"]})
        assert again == 304
        _, elsewhere, _ = await asyncio.to_thread(_get, url, {"Origin": "http://elsewhere.localhost"})
        assert "access-control-allow-origin" not in elsewhere
        # The same file is a static file too (collectstatic, a proxy serving /static/ itself).
        static, _, same = await asyncio.to_thread(_get, gateway.url + "/static/events-gateway/" + name)
        assert (static, same) == (200, body)


async def test_another_origin_imports_the_client_resumes_after_a_reload_and_hears_the_gateways_events(
    browser: Browser, gateway: Gateway, app: PageServer
) -> None:
    user = "cross-origin"
    await sync_to_async(services.grant_apply)(
        user=user, process_instance="pi-x", granted_by="test", source="admin", at=datetime.now(UTC)
    )
    context = await browser.new_context()
    try:
        await context.expose_function("freshToken", lambda: token(user, ttl=3600))
        requests = stream_requests(context)
        url = f"{app.origin}/cross-origin.html?gateway={gateway.url}"
        config = {"mode": "bearer", "events": ["Data"], "processInstances": ["pi-x"], "retryMs": RETRY_MS}
        page = await open_tab(context, url, config)
        await expect(page.locator("#state")).to_have_text("open")

        def data(n: int) -> dict[str, Any]:
            return {"user": user, "event": "Data", "data": {"n": n}}

        for n in range(1, 4):
            await gateway.produce(data(n))
        await expect(page.locator("#events li")).to_have_count(3)
        before = await shown(page)

        # A reload: what is produced meanwhile arrives after it, and nothing seen before comes again.
        await page.reload()
        for n in range(4, 6):
            await gateway.produce(data(n))
        await page.wait_for_function("typeof window.start === 'function'")
        await page.evaluate("config => start(config)", config)
        await expect(page.locator("#events li")).to_have_count(2)
        await gateway.produce(data(6))
        await expect(page.locator("#events li")).to_have_count(3)
        assert [n for _, n in await shown(page)] == [4, 5, 6]
        assert parse_qs(urlsplit(requests[-1].url).query)["lastEventId"] == [before[-1][0]]

        # A grant ends: unsubscribed.
        await gateway.produce({"type": "disconnect", "user": user, "processInstanceUuid": "pi-x"})
        unsubscribed = page.locator('#notices li[data-event="unsubscribed"]')
        await expect(unsubscribed).to_have_count(1)
        assert json.loads(await unsubscribed.text_content() or "{}") == {"processInstanceUuid": "pi-x"}

        # An id the gateway does not know: stream-reset.
        other = await open_tab(context, url, {**config, "processInstances": [], "lastEventId": "no-such-id"})
        await expect(other.locator('#notices li[data-event="stream-reset"]')).to_have_count(1)
    finally:
        await context.close()


async def test_unrenewed_tokens_end_in_auth_expired_and_the_client_reopens_with_a_fresh_one(
    browser: Browser, gateway: Gateway, app: PageServer
) -> None:
    user = "auth-expires"
    current = {"token": token(user, ttl=RENEW_SECONDS + 3)}  # the app's token: not refreshed for a while
    context = await browser.new_context()
    try:
        await context.expose_function("freshToken", lambda: current["token"])
        requests = stream_requests(context)
        url = f"{app.origin}/cross-origin.html?gateway={gateway.url}"
        page = await open_tab(context, url, {"mode": "bearer", "events": ["Data"], "retryMs": RETRY_MS})
        await expect(page.locator("#state")).to_have_text("open")
        await gateway.produce({"user": user, "event": "Data", "data": {"n": 1}})
        await expect(page.locator("#events li")).to_have_count(1)

        # The renewal POSTs the same token (409: not later), so the stream ends at its exp.
        await expect(page.locator('#notices li[data-event="auth-expired"]').first).to_be_attached()
        errors = [json.loads(e) for e in await page.locator('#notices li[data-event="error"]').all_text_contents()]
        assert {"reason": "renewal", "status": 409} in [{k: e.get(k) for k in ("reason", "status")} for e in errors]
        # The app's token refreshes; the client reopens with it, from the last id, and misses nothing.
        await gateway.produce({"user": user, "event": "Data", "data": {"n": 2}})
        current["token"] = token(user, ttl=3600)
        await gateway.produce({"user": user, "event": "Data", "data": {"n": 3}})
        await expect(page.locator("#events li")).to_have_count(3)
        await expect(page.locator("#state")).to_have_text("open")
        assert [n for _, n in await shown(page)] == [1, 2, 3]
        assert len(requests) >= 2
        assert all(parse_qs(urlsplit(r.url).query).get("lastEventId") for r in requests[1:])
    finally:
        await context.close()


def _buy_ticket(base: str, bearer: str) -> str:
    request = urllib.request.Request(
        base + "/api/events/tickets", method="POST", headers={"Authorization": f"Bearer {bearer}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return str(json.loads(response.read())["ticket"])


async def test_ticket_mode_asks_the_page_for_a_ticket_per_connection(
    browser: Browser, gateway: Gateway, app: PageServer
) -> None:
    user = "ticket-mode"
    issued: list[str] = []

    async def fresh_ticket() -> str:  # what an app's backend would do with its own credentials
        ticket = await asyncio.to_thread(_buy_ticket, gateway.url, token(user, ttl=3600))
        issued.append(ticket)
        return ticket

    context = await browser.new_context()
    try:
        await context.expose_function("freshTicket", fresh_ticket)
        requests = stream_requests(context)
        url = f"{app.origin}/cross-origin.html?gateway={gateway.url}"
        config = {"mode": "ticket", "events": ["Data"], "retryMs": RETRY_MS}
        page = await open_tab(context, url, config)
        await expect(page.locator("#state")).to_have_text("open")
        await gateway.produce({"user": user, "event": "Data", "data": {"n": 1}})
        await expect(page.locator("#events li")).to_have_count(1)
        [(first_id, _)] = await shown(page)

        await page.reload()
        await gateway.produce({"user": user, "event": "Data", "data": {"n": 2}})
        await page.wait_for_function("typeof window.start === 'function'")
        await page.evaluate("config => start(config)", config)
        await expect(page.locator("#events li")).to_have_count(1)
        assert [n for _, n in await shown(page)] == [2]
        used = [parse_qs(urlsplit(r.url).query) for r in requests]
        assert [q["ticket"][0] for q in used] == issued
        assert len(issued) == 2
        assert used[1]["lastEventId"] == [first_id]
    finally:
        await context.close()
