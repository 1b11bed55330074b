// The events-gateway demo page: a native EventSource on the session cookie, no build step.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("demo-config").textContent);
  const csrfToken = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const MAX_ROWS = 300;
  const CONTROL_EVENTS = new Set(["stream-reset", "unsubscribed", "auth-expired"]);

  const instances = new Set(config.grantedProcessInstances); // offered as checkboxes
  const followed = new Set(config.grantedProcessInstances); // checked: sent as processInstanceUuid
  const names = new Set(config.eventNames);
  const stats = { opens: 0, reconnects: 0, received: 0 };
  let source = null;
  let lastId = "";

  // --- the stream -----------------------------------------------------------------------------------
  function streamUrl(resumeFrom) {
    const params = new URLSearchParams();
    for (const id of [...followed].sort()) params.append("processInstanceUuid", id);
    // Only the first request carries it; the browser's own reconnects send the Last-Event-ID header.
    if (resumeFrom) params.set("lastEventId", resumeFrom);
    const query = params.toString();
    return config.streamUrl + (query ? "?" + query : "");
  }

  function connect(resumeFrom) {
    close();
    const url = streamUrl(resumeFrom);
    $("stream-url").textContent = url;
    setState("connecting", "connecting…");
    const es = new EventSource(url); // same origin: the session cookie goes along
    source = es;
    let openedBefore = false;
    es.onopen = () => {
      if (es !== source) return;
      stats.opens += 1;
      if (openedBefore) {
        stats.reconnects += 1;
        logSystem(`reconnected (the browser sent Last-Event-ID ${lastId || "none"})`);
      } else {
        logSystem(resumeFrom ? `opened, resuming after ${resumeFrom}` : "opened");
      }
      openedBefore = true;
      setState("open", "open");
      showCounters();
    };
    es.onerror = () => {
      if (es !== source) return;
      if (es.readyState === EventSource.CONNECTING) {
        setState("reconnecting", "reconnecting…");
        if (openedBefore) logSystem("connection lost; the browser is reconnecting");
      } else {
        setState("closed", "closed");
        explainClosed(es, url);
      }
    };
    for (const name of names) es.addEventListener(name, onEvent);
  }

  function close() {
    if (source !== null) {
      source.close();
      source = null;
      logSystem("closed by this page");
    }
    setState("idle", "not connected");
  }

  // EventSource hides why a stream was refused; ask once with fetch to show the gateway's error.
  async function explainClosed(es, url) {
    const abort = new AbortController();
    try {
      const response = await fetch(url, { signal: abort.signal, headers: { Accept: "text/event-stream" } });
      if (response.ok) abort.abort(); // a stream after all: do not hold it open
      if (es !== source) return;
      if (response.ok) {
        setState("closed", "closed by the server");
        logSystem("the server closed the stream");
        return;
      }
      const body = await response.json().catch(() => ({}));
      setState("refused", `refused: ${response.status} ${body.error || response.statusText}`);
      logSystem(`refused with ${response.status}: ${body.error || response.statusText}`);
    } catch (err) {
      if (es === source) setState("closed", "closed: gateway unreachable");
    }
  }

  function onEvent(event) {
    stats.received += 1;
    if (event.lastEventId) lastId = event.lastEventId;
    let body = null;
    try {
      body = JSON.parse(event.data);
    } catch (err) {
      body = event.data;
    }
    const published = body && typeof body === "object" && body.publishedAt ? Date.parse(body.publishedAt) : NaN;
    const latency = Number.isNaN(published) ? null : Date.now() - published;
    const control = CONTROL_EVENTS.has(event.type);
    const envelope = !control && body && typeof body === "object" && "data" in body;
    addRow({
      kind: control ? "control" : "event",
      name: event.type,
      id: event.lastEventId,
      to: envelope ? audience(body) : "",
      latency,
      payload: envelope ? body.data : body,
    });
    showCounters();
    if (event.type === "stream-reset") {
      notice("Stream reset: the id to resume from is unknown or too old, so events may have been missed. A renderer refetches its state now.");
    } else if (event.type === "auth-expired") {
      notice("The credential expired; the stream has ended.");
    } else if (event.type === "unsubscribed" && body && body.processInstanceUuid) {
      followed.delete(body.processInstanceUuid);
      instances.delete(body.processInstanceUuid);
      renderInstances();
      notice(`No longer allowed to follow ${body.processInstanceUuid}; reopening without it.`);
      // A reconnect naming a revoked instance would be refused (403): reopen without it, from here.
      connect(lastId);
    }
  }

  // --- the page -------------------------------------------------------------------------------------
  function setState(state, text) {
    const el = $("state");
    el.dataset.state = state;
    el.textContent = text;
  }

  function showCounters() {
    $("opens").textContent = String(stats.opens);
    $("reconnects").textContent = String(stats.reconnects);
    $("received").textContent = String(stats.received);
    $("last-id").textContent = lastId || "none";
  }

  function notice(text) {
    const el = $("notice");
    el.textContent = text;
    el.hidden = false;
  }

  function timeNow() {
    const d = new Date();
    return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    return td;
  }

  function audience(body) {
    if (body.broadcast) return "everyone";
    if (body.processInstanceUuid && body.user) return `${body.processInstanceUuid} (${body.user} only)`;
    return body.processInstanceUuid || `user ${body.user}`;
  }

  function addRow({ kind, name, id, to = "", latency, payload }) {
    const tr = document.createElement("tr");
    tr.className = kind;
    tr.dataset.event = name;
    if (id) tr.dataset.id = id;
    tr.append(
      cell(timeNow(), "time"),
      cell(name, "name"),
      cell(id || "", "id"),
      cell(to, "to"),
      cell(latency === null ? "" : `${latency} ms`, "latency"),
      cell(payload === undefined || payload === null ? "" : typeof payload === "string" ? payload : JSON.stringify(payload), "payload"),
    );
    const log = $("log");
    log.prepend(tr);
    while (log.rows.length > MAX_ROWS) log.deleteRow(log.rows.length - 1);
  }

  function logSystem(text) {
    addRow({ kind: "system", name: "·", id: "", latency: null, payload: text });
  }

  function renderInstances() {
    const box = $("instances");
    box.replaceChildren();
    if (instances.size === 0) {
      box.textContent = config.viewAll ? "none yet (you may follow any instance)" : "none granted";
    }
    for (const id of [...instances].sort()) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "checkbox";
      input.value = id;
      input.checked = followed.has(id);
      input.addEventListener("change", () => {
        if (input.checked) followed.add(id);
        else followed.delete(id);
        connect(lastId);
      });
      label.append(input, " " + id);
      box.append(label);
    }
    const select = $("publish-target");
    const current = select.value;
    select.replaceChildren(new Option(`me (${config.user})`, ""));
    for (const id of [...instances].sort()) select.append(new Option(`process instance ${id}`, id));
    select.value = [...select.options].some((o) => o.value === current) ? current : "";
  }

  function renderNames() {
    const box = $("names");
    box.replaceChildren();
    for (const name of names) {
      const code = document.createElement("code");
      code.textContent = name;
      box.append(code, " ");
    }
  }

  function listen(name) {
    if (names.has(name)) return;
    names.add(name);
    if (source !== null) source.addEventListener(name, onEvent);
    renderNames();
  }

  async function publish(form) {
    const result = $("publish-result");
    let data;
    try {
      data = JSON.parse(form.elements.data.value);
    } catch (err) {
      result.textContent = `data is not JSON: ${err.message}`;
      result.className = "error";
      return;
    }
    const event = form.elements.event.value.trim() || "DemoEvent";
    listen(event); // so this page's EventSource dispatches it
    const target = form.elements.target.value || null;
    result.textContent = "publishing…";
    result.className = "";
    try {
      const response = await fetch(config.publishUrl, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken },
        body: JSON.stringify({ event, data, processInstanceUuid: target }),
      });
      const body = await response.json().catch(() => ({ error: response.statusText }));
      if (response.ok) {
        result.textContent = `published ${event} to ${body.topic} partition ${body.partition} offset ${body.offset}`;
      } else {
        result.textContent = `${response.status}: ${body.error}`;
        result.className = "error";
      }
    } catch (err) {
      result.textContent = `publish failed: ${err.message}`;
      result.className = "error";
    }
  }

  // --- wiring ---------------------------------------------------------------------------------------
  $("reconnect-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const from = $("resume-from").value.trim();
    $("resume-from").value = "";
    $("notice").hidden = true;
    connect(from || lastId);
  });
  $("disconnect").addEventListener("click", () => close());
  $("follow-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const id = $("new-instance").value.trim();
    if (!id) return;
    instances.add(id);
    followed.add(id);
    $("new-instance").value = "";
    renderInstances();
    connect(lastId);
  });
  $("listen-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = $("new-name").value.trim();
    if (name) listen(name);
    $("new-name").value = "";
  });
  $("publish-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    publish(ev.target);
  });
  $("clear").addEventListener("click", () => $("log").replaceChildren());

  renderInstances();
  renderNames();
  showCounters();
  connect("");
})();
