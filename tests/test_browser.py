"""Real browsers on the gateway: Debian's headless Chromium driven by Playwright, with the clients renderers use.

(a) the native EventSource on a session cookie, resuming with the Last-Event-ID the browser itself sends;
(b) the npm event-source-polyfill 1.0.31 with an `Authorization: Bearer` header;
(c) a page on another origin fetching a ticket with a bearer header, and one on an unlisted origin refused;
and the demo page at /demo/. Assertions are on what the pages show.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from playwright.async_api import Browser, Page, Request, expect

from scripts.embedded import free_port
from subscriptions import services
from tests.harness import Gateway, Layout, token

# The database is used here as the other end-to-end tests use it: the PostgreSQL pass leaves these out.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.incidental_db]

BROWSER_DIR = Path(__file__).parent / "browser"
PASSWORD = "browser-test-password"
# The `retry:` the gateway tells browsers: short, so reconnects happen within the test's patience.
RETRY_MS = 250
WAIT_MS = 20_000

expect.set_options(timeout=WAIT_MS)


# --- fixtures -----------------------------------------------------------------------------------------
class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class PageServer:
    """tests/browser/ over HTTP on a port of its own: a front end on another origin than the gateway."""

    def __init__(self) -> None:
        handler = functools.partial(_QuietHandler, directory=str(BROWSER_DIR))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> PageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


@pytest.fixture(scope="module")
def page_servers() -> Iterator[tuple[PageServer, PageServer]]:
    """Two front-end origins: the first is in CORS_ALLOWED_ORIGINS, the second is not."""
    allowed, unlisted = PageServer().start(), PageServer().start()
    try:
        yield allowed, unlisted
    finally:
        allowed.stop()
        unlisted.stop()


@pytest.fixture(scope="module")
def shared_layout(page_servers: tuple[PageServer, PageServer]) -> Layout:
    """One gateway for this module (the tests keep apart by their users), allowing the first page origin."""
    return Layout(env={"CORS_ALLOWED_ORIGINS": page_servers[0].origin, "EVENTS_RETRY_MS": str(RETRY_MS)})


@pytest.fixture
def gateway(shared_gateway: Gateway) -> Gateway:
    """This module's tests share one deployment (shared_layout above)."""
    return shared_gateway


# --- helpers ------------------------------------------------------------------------------------------
def _create_user(username: str) -> None:
    # The gateway's processes run the production hashers (the test settings keep only MD5), so store a
    # hash they accept; few iterations keep it quick.
    hashed = PBKDF2PasswordHasher().encode(PASSWORD, "browsertestsalt", iterations=1000)
    get_user_model().objects.create(username=username, password=hashed, is_staff=True)


async def create_user(username: str) -> None:
    await sync_to_async(_create_user)(username)


async def grant(user: str, process_instance: str) -> None:
    await sync_to_async(services.grant_apply)(
        user=user, process_instance=process_instance, granted_by="test", source="admin", at=datetime.now(UTC)
    )


async def log_in_to_demo(page: Page, base: str, username: str) -> None:
    """Open /demo/, get sent to the admin login, log in, land back on /demo/."""
    await page.goto(base + "/demo/")
    assert page.url == base + "/admin/login/?next=/demo/"
    await page.fill("#id_username", username)
    await page.fill("#id_password", PASSWORD)
    await page.click('input[type="submit"]')
    await page.wait_for_url(base + "/demo/")


def stream_requests(page: Page) -> list[Request]:
    """Every GET of the stream endpoint the page makes from now on, the browser's own reconnects included."""
    seen: list[Request] = []
    page.on("request", lambda r: seen.append(r) if "/api/events/stream" in r.url and r.method == "GET" else None)
    return seen


async def drop_connections(gw: Gateway, produce_meanwhile: list[dict[str, Any]]) -> None:
    """Stop the web process (open streams drop), produce while it is down, bring it back on the same port."""
    port = await gw.stop_web(gw.url)
    for envelope in produce_meanwhile:
        await gw.produce(envelope)
    await gw.start_web(port=port)


def issue_ticket(base: str, bearer: str) -> str:
    request = urllib.request.Request(
        base + "/api/events/tickets", method="POST", headers={"Authorization": f"Bearer {bearer}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())["ticket"]


# --- (a) native EventSource, session cookie ------------------------------------------------------------
async def test_native_eventsource_on_the_session_cookie_resumes_after_the_server_drops(
    browser: Browser, gateway: Gateway
) -> None:
    await create_user("alice")
    page = await browser.new_page()
    requests = stream_requests(page)
    await log_in_to_demo(page, gateway.url, "alice")
    state = page.locator("#state")
    rows = page.locator('#log tr[data-event="Data"]')
    await expect(state).to_have_attribute("data-state", "open")

    def data(n: int) -> dict[str, Any]:
        return {"user": "alice", "event": "Data", "data": {"n": n}}

    for n in range(1, 6):
        await gateway.produce(data(n))
    await expect(rows).to_have_count(5)
    last_seen = await rows.first.get_attribute("data-id")  # the log shows the newest first

    port = await gateway.stop_web(gateway.url)
    await expect(state).to_have_attribute("data-state", "reconnecting")
    for n in range(6, 11):  # produced while the browser cannot connect: replayed on resume
        await gateway.produce(data(n))
    await gateway.start_web(port=port)
    await expect(state).to_have_attribute("data-state", "open")
    await expect(page.locator("#reconnects")).to_have_text("1")
    for n in range(11, 17):  # live again; the last is an end marker: anything repeated would come before it
        await gateway.produce(data(n))
    await expect(rows).to_have_count(16)

    shown = await rows.evaluate_all(
        "rows => rows.reverse().map(r => [r.dataset.id, JSON.parse(r.querySelector('td.payload').textContent).n])"
    )
    assert [n for _, n in shown] == list(range(1, 17)), "an event was lost, repeated or reordered"
    assert len({event_id for event_id, _ in shown}) == 16
    # The browser's own reconnect (attempts refused while the server was down carry no headers to check).
    answered = [r for r in requests if await r.response() is not None]
    assert len(answered) == 2
    assert await answered[0].header_value("last-event-id") is None
    assert await answered[1].header_value("last-event-id") == last_seen
    assert answered[1].url == answered[0].url == gateway.url + "/api/events/stream"


# --- (b) event-source-polyfill with a bearer header ---------------------------------------------------
async def test_event_source_polyfill_with_a_bearer_header_receives_and_resumes(
    browser: Browser, gateway: Gateway, page_servers: tuple[PageServer, PageServer]
) -> None:
    await grant("bob", "pi-b")
    bearer = token("bob")
    page = await browser.new_page()
    requests = stream_requests(page)
    await page.goto(page_servers[0].origin + "/client.html")
    assert await page.evaluate("typeof EventSourcePolyfill") == "function"
    await page.evaluate(
        "cfg => connectStream(cfg)",
        {"mode": "polyfill", "gateway": gateway.url, "token": bearer, "processInstances": ["pi-b"], "names": ["Step"]},
    )
    state = page.locator("#state")
    items = page.locator('#events li[data-event="Step"]')
    await expect(state).to_have_text("open")

    def step(n: int) -> dict[str, Any]:
        return {"processInstanceUuid": "pi-b", "event": "Step", "data": {"n": n}}

    for n in range(1, 4):
        await gateway.produce(step(n))
    await expect(items).to_have_count(3)
    last_seen = await items.last.get_attribute("data-id")

    await drop_connections(gateway, [step(n) for n in range(4, 7)])
    await expect(state).to_have_text("open")
    for n in range(7, 10):
        await gateway.produce(step(n))
    await expect(items).to_have_count(9)

    shown = [json.loads(text) for text in await items.all_text_contents()]
    assert [body["data"]["n"] for body in shown] == list(range(1, 10))
    assert all(body["processInstanceUuid"] == "pi-b" for body in shown)
    for request in requests:
        assert await request.header_value("authorization") == f"Bearer {bearer}"
    # The polyfill resumes with ?lastEventId= (a header would need a preflight in older browsers).
    resumed = [r.url for r in requests[1:]]
    assert resumed
    assert all(f"lastEventId={last_seen}" in url for url in resumed)


# --- (c) ticket from another origin -------------------------------------------------------------------
async def test_tickets_from_a_listed_origin_open_native_eventsources_and_an_unlisted_origin_is_refused(
    browser: Browser, gateway: Gateway, page_servers: tuple[PageServer, PageServer]
) -> None:
    allowed, unlisted = page_servers
    bearer = token("carol")
    config = {"gateway": gateway.url, "token": bearer, "names": ["Data"], "retryMs": RETRY_MS}

    listed = await browser.new_page()
    requests = stream_requests(listed)
    await listed.goto(allowed.origin + "/client.html")
    await listed.evaluate("cfg => connectWithTickets(cfg)", config)
    state, items = listed.locator("#state"), listed.locator("#events li")
    await expect(state).to_have_text("open")

    def data(n: int) -> dict[str, Any]:
        return {"user": "carol", "event": "Data", "data": {"n": n}}

    await gateway.produce(data(1))
    await expect(items).to_have_count(1)
    last_seen = await items.last.get_attribute("data-id")
    # A dropped connection: the page reopens with a fresh ticket and resumes from the last id it saw.
    await drop_connections(gateway, [data(2), data(3)])
    await expect(state).to_have_text("open")
    await gateway.produce(data(4))
    await expect(items).to_have_count(4)
    assert [json.loads(text)["data"]["n"] for text in await items.all_text_contents()] == [1, 2, 3, 4]
    answered = [r for r in requests if await r.response() is not None]
    assert len(answered) == 2
    tickets = [parse_qs(urlsplit(r.url).query)["ticket"][0] for r in answered]
    assert tickets[0] != tickets[1]
    assert parse_qs(urlsplit(answered[1].url).query)["lastEventId"] == [last_seen]

    other = await browser.new_page()
    await other.goto(unlisted.origin + "/client.html")
    # The bearer header needs a preflight, which the gateway does not pass for this origin.
    await other.evaluate("cfg => connectWithTickets(cfg)", config)
    await expect(other.locator("#state")).to_have_text(re.compile(r"^ticket refused: .*Failed to fetch"))
    # Even with a valid ticket handed to it, the browser does not let this origin read the stream.
    handed = await browser.new_page()
    await handed.goto(unlisted.origin + "/client.html")
    ticket = await asyncio.to_thread(issue_ticket, gateway.url, bearer)
    await handed.evaluate(
        "cfg => connectWithTicket(cfg)", {"gateway": gateway.url, "ticket": ticket, "names": ["Data"]}
    )
    await expect(handed.locator("#state")).to_have_text("closed")
    await gateway.produce(data(5))
    await expect(items).to_have_count(5)  # by now the refused pages would have shown it too
    await expect(handed.locator("#events li")).to_have_count(0)
    await expect(other.locator("#events li")).to_have_count(0)


# --- the demo page ------------------------------------------------------------------------------------
async def test_demo_page_follows_instances_publishes_and_shows_stream_reset(
    browser: Browser, gateway: Gateway, tmp_path: Path
) -> None:
    await create_user("dora")
    await grant("dora", "pi-d")
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    await log_in_to_demo(page, gateway.url, "dora")
    state = page.locator("#state")
    await expect(state).to_have_attribute("data-state", "open")
    await expect(page.locator('#instances input[value="pi-d"]')).to_be_checked()
    await expect(page.locator("#stream-url")).to_have_text("/api/events/stream?processInstanceUuid=pi-d")

    # An event for the followed process instance, from Kafka.
    await gateway.produce({"processInstanceUuid": "pi-d", "event": "ProcessMetadata", "data": {"step": 1}})
    row = page.locator('#log tr[data-event="ProcessMetadata"]')
    await expect(row).to_have_count(1)
    await expect(row.locator("td.to")).to_have_text("pi-d")
    await expect(row.locator("td.latency")).to_have_text(re.compile(r"^\d+ ms$"))
    await expect(row.locator("td.payload")).to_have_text('{"step":1}')

    # The publish button: to the process instance, then a new event name to the user alone.
    await page.select_option("#publish-target", "pi-d")
    await page.click("#publish")
    await expect(page.locator("#publish-result")).to_contain_text("published DemoEvent")
    await expect(page.locator('#log tr[data-event="DemoEvent"] td.to')).to_have_text("pi-d")
    await page.fill('#publish-form input[name="event"]', "Custom.Thing")
    await page.fill('#publish-form textarea[name="data"]', '{"answer": 42}')
    await page.select_option("#publish-target", "")
    await page.click("#publish")
    custom = page.locator('#log tr[data-event="Custom.Thing"]')
    await expect(custom.locator("td.to")).to_have_text("user dora")
    await expect(custom.locator("td.payload")).to_have_text('{"answer":42}')

    # Resuming from an id the gateway does not know: stream-reset, shown as such.
    await page.fill("#resume-from", "no-such-id")
    await page.click("#reconnect")
    await expect(page.locator('#log tr[data-event="stream-reset"]')).to_have_count(1)
    await expect(page.locator("#notice")).to_contain_text("Stream reset")
    await expect(state).to_have_attribute("data-state", "open")
    await page.screenshot(path=tmp_path / "demo.png")

    # The publish endpoint is CSRF-protected and only for the user's own events or granted instances.
    csrf = await page.locator('meta[name="csrf-token"]').get_attribute("content") or ""
    url = gateway.url + "/demo/publish"
    no_csrf = await page.request.post(url, data={"event": "X", "data": {}})
    assert no_csrf.status == 403
    not_granted = await page.request.post(
        url, data={"event": "X", "data": {}, "processInstanceUuid": "pi-other"}, headers={"X-CSRFToken": csrf}
    )
    assert not_granted.status == 403
    assert await not_granted.json() == {"error": "not allowed to follow process instance pi-other"}

    # Following an instance that is not granted: the stream is refused, and the page says why.
    await page.fill("#new-instance", "pi-other")
    await page.press("#new-instance", "Enter")
    await expect(state).to_have_attribute("data-state", "refused")
    await expect(state).to_contain_text("403 not allowed to follow process instance pi-other")
