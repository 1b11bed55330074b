// A minimal front end for the browser tests: opens a stream the way a renderer would and shows what
// arrives. The test drives it with page.evaluate("connectStream({...})") and reads #state and #events.
"use strict";

function setState(text) {
  document.getElementById("state").textContent = text;
}

function show(event) {
  const li = document.createElement("li");
  li.dataset.event = event.type;
  li.dataset.id = event.lastEventId;
  li.textContent = event.data;
  document.getElementById("events").append(li);
}

// mode: "native" (EventSource, cookies only) or "polyfill" (EventSourcePolyfill with a bearer header).
function connectStream({ mode, gateway, token, processInstances = [], names = ["message"] }) {
  const url = new URL("/api/events/stream", gateway);
  for (const id of processInstances) url.searchParams.append("processInstanceUuid", id);
  const source = mode === "polyfill"
    ? new EventSourcePolyfill(url.href, { headers: { Authorization: `Bearer ${token}` } })
    : new EventSource(url.href);
  watch(source, names);
}

// A ticket per connection, as the README shows: fetch one with the bearer header (a preflight from
// another origin), open a native EventSource with it, and on any error reopen with a fresh ticket from
// the last id seen (the browser's own retry would reuse the spent ticket and be refused).
async function connectWithTickets(config, lastEventId = "") {
  const { gateway, token, processInstances = [], names = ["message"], retryMs = 3000 } = config;
  const reopenLater = () => setTimeout(() => connectWithTickets(config, window.lastEventId || lastEventId), retryMs);
  let ticket;
  try {
    const response = await fetch(new URL("/api/events/tickets", gateway), {
      method: "POST",
      headers: { Authorization: `Bearer ${token}` },
    });
    const body = await response.json();
    if (!response.ok) {
      setState(`ticket refused: ${response.status} ${body.error}`);
      return;
    }
    ticket = body.ticket;
  } catch (err) {
    setState(`ticket refused: ${err.message}`);
    reopenLater();
    return;
  }
  const url = new URL("/api/events/stream", gateway);
  for (const id of processInstances) url.searchParams.append("processInstanceUuid", id);
  url.searchParams.set("ticket", ticket);
  if (lastEventId) url.searchParams.set("lastEventId", lastEventId);
  const source = new EventSource(url.href);
  watch(source, names);
  source.onerror = () => {
    source.close();
    setState("reconnecting");
    reopenLater();
  };
}

// Open a stream with a ticket obtained elsewhere (the test issues it), to see whether this origin may read it.
function connectWithTicket({ gateway, ticket, names = ["message"] }) {
  const url = new URL("/api/events/stream", gateway);
  url.searchParams.set("ticket", ticket);
  watch(new EventSource(url.href), names);
}

function watch(source, names) {
  window.source = source;
  setState("connecting");
  source.onopen = () => setState("open");
  source.onerror = () => setState(source.readyState === 2 ? "closed" : "reconnecting");
  for (const name of names) {
    source.addEventListener(name, (event) => {
      window.lastEventId = event.lastEventId;
      show(event);
    });
  }
}
