// Types of events-gateway's browser client (client.js beside this file; served at /api/events/client.js
// and /api/events/client.d.ts). The stream's wire format: docs/asyncapi.yaml.

/** A producer's event as the stream delivers it. */
export interface GatewayEvent<T = unknown> {
  /** Opaque id; the client resumes from the last one it saw. */
  id: string;
  /** The SSE event name (the envelope's `event`, default `message`). */
  event: string;
  /** What the producer sent. */
  data: T;
  processInstanceUuid: string | null;
  user: string | null;
  broadcast: boolean;
  /** ISO 8601, when the gateway accepted the event. */
  publishedAt: string;
}

/** `stream-reset`: the id to resume from was unknown or too old; refetch your state. */
export interface StreamReset {
  reason: string;
  [key: string]: unknown;
}

/** `unsubscribed`: the user's grant for this process instance ended. */
export interface Unsubscribed {
  processInstanceUuid: string;
}

/** `token-expiring`: the client POSTs a fresh token (options.token) to keep the stream open. */
export interface TokenExpiring {
  stream: string;
  expiresAt: string;
}

/** `auth-expired`: the token ran out unrenewed; the client reopens with a fresh ticket. */
export interface AuthExpired {
  reason: string;
}

/** A gateway event, as `on("stream-reset" | "unsubscribed" | "auth-expired" | "token-expiring", ...)` gets it. */
export interface ControlEvent<T = unknown> {
  /** `stream-reset` and `unsubscribed` carry an id; the others "". */
  id: string;
  event: "stream-reset" | "unsubscribed" | "auth-expired" | "token-expiring";
  data: T;
}

/**
 * `connecting`: opening; `open`: receiving; `reconnecting`: the connection dropped or was refused and is
 * being reopened; `closed`: close() was called. A tab that is not the leader shows the leader's state.
 */
export type EventsState = "connecting" | "open" | "reconnecting" | "closed";

export interface EventsError {
  /** `ticket`: POST /api/events/tickets failed; `stream`: the stream ended or was refused; `renewal`:
   * a token renewal was refused or failed; `lock`: the Web Lock could not be requested. */
  reason: "ticket" | "stream" | "renewal" | "lock";
  /** The HTTP status, where there was one. */
  status?: number;
  message: string;
}

export interface EventsOptions {
  /** The gateway's origin. Default: the origin this module was loaded from. */
  gateway?: string | URL;
  /**
   * Bearer mode: a fresh access token for the stream's user. The client buys a ticket with it
   * (POST /api/events/tickets) for each connection, and renews the stream with it on `token-expiring`.
   */
  token?: () => string | Promise<string>;
  /**
   * Ticket mode (when there is no `token`): a new single-use ticket for each connection. With neither
   * `token` nor `ticket`, session mode: the Django session cookie.
   */
  ticket?: () => string | Promise<string>;
  /** Follow these process instances (`processInstanceUuid`, up to 20). */
  processInstances?: string[];
  /** Event names to receive besides `message`; on(name) adds more. The gateway's own events are always received. */
  events?: string[];
  /** Share one connection among the origin's tabs asking for the same stream (default true; needs Web
   * Locks and BroadcastChannel, else each tab connects by itself). */
  share?: boolean;
  /** What tabs share, and the sessionStorage key of the last id. Default: derived from the stream's URL. */
  name?: string;
  /** Resume from this id instead of the one kept in sessionStorage. */
  lastEventId?: string;
  /** EventSource's withCredentials. Default: true in session mode when the gateway is on another origin. */
  withCredentials?: boolean;
  /** Wait before reopening after a failure, doubled per failure in a row up to 60 s (default 3000). */
  retryMs?: number;
  /** Every producer event, whatever its name. */
  onEvent?: (event: GatewayEvent) => void;
  onStreamReset?: (data: StreamReset) => void;
  onUnsubscribed?: (data: Unsubscribed) => void;
  onAuthExpired?: (data: AuthExpired) => void;
  onTokenExpiring?: (data: TokenExpiring) => void;
  onStateChange?: (state: EventsState) => void;
  onError?: (error: EventsError) => void;
}

export declare class EventsClient {
  constructor(options?: EventsOptions);
  /** See EventsState. */
  readonly state: EventsState;
  /** Whether this tab holds the connection. */
  readonly leader: boolean;
  /** The id of the last event this tab received ("" before the first). */
  readonly lastEventId: string;
  /** Call `listener` with every event named `name`; returns a function that stops it. */
  on(name: "stream-reset", listener: (event: ControlEvent<StreamReset>) => void): () => void;
  on(name: "unsubscribed", listener: (event: ControlEvent<Unsubscribed>) => void): () => void;
  on(name: "auth-expired", listener: (event: ControlEvent<AuthExpired>) => void): () => void;
  on(name: "token-expiring", listener: (event: ControlEvent<TokenExpiring>) => void): () => void;
  on<T = unknown>(name: string, listener: (event: GatewayEvent<T>) => void): () => void;
  /** Stop this tab's part: its connection if it leads (another tab takes over), timers, sharing. */
  close(): void;
}

/** Open the gateway's event stream for this page, sharing one connection with the origin's other tabs. */
export declare function openEvents(options?: EventsOptions): EventsClient;
