// What the browser tests' pages do with the gateway's client: open it as configured by the test and show
// every event (#events) and every callback (#notices). Tokens and tickets come from functions the test
// exposes (freshToken, freshTicket).
export function connect(openEvents, { mode = "session", ...options }) {
  const client = openEvents({
    ...options,
    token: mode === "bearer" ? () => window.freshToken() : undefined,
    ticket: mode === "ticket" ? () => window.freshTicket() : undefined,
    onEvent: (event) => show("events", event.event, event.id, JSON.stringify(event.data)),
    onStateChange: (state) => {
      document.getElementById("state").textContent = state;
    },
    onStreamReset: (data) => show("notices", "stream-reset", "", JSON.stringify(data)),
    onUnsubscribed: (data) => show("notices", "unsubscribed", "", JSON.stringify(data)),
    onAuthExpired: (data) => show("notices", "auth-expired", "", JSON.stringify(data)),
    onTokenExpiring: (data) => show("notices", "token-expiring", "", JSON.stringify(data)),
    onError: (error) => show("notices", "error", "", JSON.stringify(error)),
  });
  window.client = client;
  return client.state;
}

function show(list, kind, id, text) {
  const li = document.createElement("li");
  li.dataset.event = kind;
  li.dataset.id = id;
  li.textContent = text;
  document.getElementById(list).append(li);
}
