// events-gateway's browser client: one ES module, no dependencies, no build step. Types: ./client.d.ts.
// Served by the gateway at /api/events/client.js (with the API's CORS rules) and as the static file
// events-gateway/client.js.
//
//   import { openEvents } from "https://events.example.com/api/events/client.js";
//   const events = openEvents({ token: getAccessToken, events: ["ProcessMetadata"] });
//   events.on("ProcessMetadata", (e) => render(e.data));
//
// What it does for a page:
// - opens GET /api/events/stream by session cookie, by bearer token (through a ticket: POST
//   /api/events/tickets, then a native EventSource with ?ticket=), or by tickets the page supplies;
// - remembers the last event id in sessionStorage and resumes from it (?lastEventId=) after a reload or a
//   dropped connection, so nothing is lost or repeated;
// - answers `token-expiring` by POSTing a fresh token to /api/events/streams/<id>/token;
// - shares one connection among all tabs of the origin that ask for the same stream: the tab holding a
//   Web Lock is the leader and the only one connected; it passes every event to the others over a
//   BroadcastChannel. When its tab closes, another tab takes the lock and resumes from the last id it saw.

const CONTROL_EVENTS = ["stream-reset", "unsubscribed", "auth-expired", "token-expiring"];
// Gateway events without an `id:` line: EventSource still reports the previous event's id for them.
const WITHOUT_ID = new Set(["token-expiring", "auth-expired"]);
// Ids remembered to drop an event a tab sees twice (a new leader replays what the old one was passing on).
const SEEN_IDS = 2000;
const MAX_BACKOFF_MS = 60_000;

const moduleOrigin = new URL(import.meta.url).origin;

/**
 * Open the gateway's event stream for this page (sharing one connection with the origin's other tabs).
 * @param {import("./client").EventsOptions} [options]
 * @returns {import("./client").EventsClient}
 */
export function openEvents(options = {}) {
  return new EventsClient(options);
}

export class EventsClient {
  constructor(options = {}) {
    this.options = options;
    this.gateway = new URL(options.gateway ?? moduleOrigin).origin;
    this.mode = options.token ? "bearer" : options.ticket ? "ticket" : "session";
    this.retryMs = options.retryMs ?? 3000;
    const stream = new URL("/api/events/stream", this.gateway);
    for (const id of [...(options.processInstances ?? [])].sort()) stream.searchParams.append("processInstanceUuid", id);
    this.streamUrl = stream.href;
    this.key = options.name ?? `events-gateway ${this.streamUrl}`;
    /** @type {import("./client").EventsState} */
    this.state = "connecting";
    this.leader = false;
    this.closed = false;
    this.listeners = new Map();
    this.names = new Set(["message", ...(options.events ?? [])]); // every tab's names: the leader listens to all
    this.seen = new Set();
    this.lastEventId = options.lastEventId ?? this._stored() ?? "";
    this.source = null;
    this.listening = new Set(); // names the current EventSource has listeners for
    this.generation = 0; // bumped per connection: late callbacks of an old one are ignored
    this.timer = null;
    this.failures = 0;
    this.shared = options.share !== false && typeof BroadcastChannel === "function" && !!globalThis.navigator?.locks;
    if (this.shared) {
      this.channel = new BroadcastChannel(this.key);
      this.channel.onmessage = (message) => this._fromTab(message.data);
      this.channel.postMessage({ t: "hello", names: [...this.names] });
      this.abort = new AbortController();
      navigator.locks
        .request(this.key, { signal: this.abort.signal }, () => this._lead())
        .catch((err) => {
          if (err?.name !== "AbortError") this._error({ reason: "lock", message: String(err) });
        });
    } else {
      this._lead();
    }
  }

  /** Call `listener` with every event named `name`; returns a function that stops it. */
  on(name, listener) {
    if (!this.listeners.has(name)) this.listeners.set(name, new Set());
    this.listeners.get(name).add(listener);
    if (!this.names.has(name) && !CONTROL_EVENTS.includes(name)) {
      this.names.add(name);
      this._listen(name);
      this._post({ t: "names", names: [...this.names] });
    }
    return () => this.listeners.get(name)?.delete(listener);
  }

  /** Stop: this tab's connection (another tab takes over), its timers and its part in the sharing. */
  close() {
    if (this.closed) return;
    this.closed = true;
    this._disconnect();
    this._setState("closed", false);
    this.abort?.abort();
    this.release?.();
    this.channel?.close();
  }

  // --- the leader: holds the lock (until close() or the tab goes) and the one connection ---------------
  _lead() {
    if (this.closed) return undefined;
    this.leader = true;
    this._connect();
    return new Promise((resolve) => {
      this.release = resolve;
    });
  }

  async _connect() {
    this._disconnect();
    const generation = ++this.generation;
    this._setState(this.failures ? "reconnecting" : "connecting");
    const url = new URL(this.streamUrl);
    if (this.lastEventId) url.searchParams.set("lastEventId", this.lastEventId);
    if (this.mode !== "session") {
      let ticket;
      try {
        ticket = await this._ticket();
      } catch (err) {
        if (generation !== this.generation || this.closed) return;
        this._error({ reason: "ticket", status: err.status, message: err.message });
        this._retry(generation);
        return;
      }
      if (generation !== this.generation || this.closed) return;
      url.searchParams.set("ticket", ticket);
    }
    const crossOrigin = this.gateway !== globalThis.location?.origin;
    const withCredentials = this.options.withCredentials ?? (this.mode === "session" && crossOrigin);
    const source = new EventSource(url.href, { withCredentials });
    this.source = source;
    this.listening = new Set();
    for (const name of [...this.names, ...CONTROL_EVENTS]) this._listen(name);
    source.onopen = () => {
      this.failures = 0;
      this._setState("open");
    };
    source.onerror = () => {
      if (generation !== this.generation) return;
      // A session stream the browser retries by itself (with Last-Event-ID); a ticket is spent, and a
      // refused or ended stream (CLOSED) is not retried by the browser: reopen, from the last id seen.
      if (this.mode === "session" && source.readyState === EventSource.CONNECTING) {
        this._setState("reconnecting");
        return;
      }
      this._error({ reason: "stream", message: "the stream ended or was refused" });
      this._retry(generation);
    };
  }

  _listen(name) {
    if (!this.source || this.listening.has(name)) return;
    this.listening.add(name);
    const generation = this.generation;
    this.source.addEventListener(name, (e) => {
      if (generation !== this.generation) return;
      const message = { name, id: WITHOUT_ID.has(name) ? "" : e.lastEventId, data: e.data };
      this._post({ t: "event", ...message });
      this._deliver(message);
      if (name === "token-expiring") this._renew(JSON.parse(e.data), generation);
    });
  }

  async _ticket() {
    if (this.mode === "ticket") return await this.options.ticket();
    const response = await fetch(new URL("/api/events/tickets", this.gateway), {
      method: "POST",
      headers: { Authorization: `Bearer ${await this.options.token()}` },
      credentials: "omit",
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw Object.assign(new Error(body.error ?? `HTTP ${response.status}`), { status: response.status });
    return body.ticket;
  }

  // POST a fresh token for the stream until its end moves, or its old end passes (then auth-expired
  // follows and the stream is reopened with a fresh ticket).
  async _renew(notice, generation) {
    if (!this.options.token) return;
    const end = Date.parse(notice.expiresAt);
    const url = new URL(`/api/events/streams/${encodeURIComponent(notice.stream)}/token`, this.gateway);
    for (let attempt = 0; generation === this.generation && !this.closed && Date.now() < end; attempt++) {
      try {
        const response = await fetch(url, {
          method: "POST",
          headers: { Authorization: `Bearer ${await this.options.token()}` },
          credentials: "omit",
        });
        if (response.ok || response.status === 404) return; // renewed, or the stream is gone anyway
        const body = await response.json().catch(() => ({}));
        this._error({ reason: "renewal", status: response.status, message: body.error ?? "" });
      } catch (err) {
        this._error({ reason: "renewal", message: String(err) });
      }
      // 409 (the token is not newer yet), 401, 503 or no answer: ask for a token again a little later.
      const wait = Math.max(250, Math.min(this.retryMs * 2 ** attempt, (end - Date.now()) / 2));
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }

  _retry(generation) {
    this._disconnect();
    this.generation = generation + 1; // the failed connection's late callbacks are ignored
    this.failures += 1;
    this._setState("reconnecting");
    const delay = Math.min(this.retryMs * 2 ** (this.failures - 1), MAX_BACKOFF_MS);
    this.timer = setTimeout(() => this._connect(), delay);
  }

  _disconnect() {
    clearTimeout(this.timer);
    this.timer = null;
    this.source?.close();
    this.source = null;
  }

  // --- every tab ---------------------------------------------------------------------------------------
  _fromTab(message) {
    if (this.closed) return;
    if (message.t === "event") {
      this._deliver(message);
    } else if (message.t === "state" && !this.leader) {
      this._setState(message.state, false);
    } else if (message.t === "hello" || message.t === "names") {
      const before = this.names.size;
      for (const name of message.names) {
        this.names.add(name);
        this._listen(name);
      }
      // The leader answers a newcomer (and news) with every name it knows, so each tab could take over.
      if (this.leader && (message.t === "hello" || this.names.size > before)) {
        this._post({ t: "names", names: [...this.names] });
        this._post({ t: "state", state: this.state });
      }
    }
  }

  _deliver({ name, id, data }) {
    if (id) {
      if (this.seen.has(id)) return;
      this.seen.add(id);
      if (this.seen.size > SEEN_IDS) this.seen.delete(this.seen.values().next().value);
      this.lastEventId = id;
      this._store(id);
    }
    let payload;
    try {
      payload = JSON.parse(data);
    } catch {
      return;
    }
    const control = CONTROL_EVENTS.includes(name);
    const event = control ? { id, event: name, data: payload } : { id, event: name, ...payload };
    const callback = {
      "stream-reset": this.options.onStreamReset,
      unsubscribed: this.options.onUnsubscribed,
      "auth-expired": this.options.onAuthExpired,
      "token-expiring": this.options.onTokenExpiring,
    }[name];
    if (control) callback?.(payload);
    else this.options.onEvent?.(event);
    for (const listener of this.listeners.get(name) ?? []) listener(event);
  }

  _setState(state, announce = true) {
    if (state === this.state) return;
    this.state = state;
    if (announce && this.leader) this._post({ t: "state", state });
    this.options.onStateChange?.(state);
  }

  _error(error) {
    this.options.onError?.(error);
  }

  _post(message) {
    if (this.shared && !this.closed) this.channel.postMessage(message);
  }

  _stored() {
    try {
      return sessionStorage.getItem(`${this.key} lastEventId`);
    } catch {
      return null; // storage disabled: resume within this page's life only
    }
  }

  _store(id) {
    try {
      sessionStorage.setItem(`${this.key} lastEventId`, id);
    } catch {
      // storage full or disabled: the id is still kept in memory
    }
  }
}
