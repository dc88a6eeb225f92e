// Public types: the record envelope as the server sends it, record value types per endpoint,
// the options of `connect` and `table`, a table's snapshot and changes, the connection
// statuses and the notices (gap, dropped id, status reasons) the client reports.

/** Any JSON value. */
export type JsonValue =
  | null
  | boolean
  | number
  | string
  | JsonValue[]
  | { [key: string]: JsonValue };

/** Bytes that are not UTF-8, as the server encodes them. */
export interface Base64 {
  base64: string;
}

/** A header value: a string when it is UTF-8, else base64. */
export type HeaderValue = string | Base64;

/** The Schema Registry schema a key or value was decoded with. */
export interface SchemaRef {
  id: number;
  /** The subject and version, when the registry names exactly one for the id. */
  subject?: string;
  version?: number;
}

/**
 * One Kafka record, as delivered by an endpoint.
 *
 * `value` is the record's JSON when it parses as JSON, a string when it is other UTF-8, a
 * `{ base64 }` object otherwise, and `null` for a tombstone. With the `fields` option, only
 * the parts named there. `V` lets an application name the shape it expects (it is not
 * checked, and does not follow `fields`); `E`, the endpoint's name.
 */
export interface FjordRecord<V = JsonValue, E extends string = string> {
  /** The endpoint (SSE event name) that delivered the record. */
  endpoint: E;
  /** The SSE id: an opaque position to resume after this record. */
  id: string;
  topic: string;
  partition: number;
  offset: number;
  /**
   * Text or base64 (`string | Base64 | null`); a topic whose manifest `key_format` decodes
   * keys (`avro`, `protobuf`, …) sends the decoded JSON instead.
   */
  key: JsonValue;
  /** The schema the key was decoded with, when a Schema Registry's was used. */
  key_schema?: SchemaRef;
  /** Kafka timestamp in milliseconds since the epoch, when the record has one. */
  timestamp: number | null;
  /** Headers; a name that occurs more than once maps to an array of its values. */
  headers: Record<string, HeaderValue | HeaderValue[]>;
  value: V;
  /** The schema the value was decoded with, when a Schema Registry's was used. */
  value_schema?: SchemaRef;
}

/**
 * Record value types by endpoint name, for `connect<Endpoints>`: `{ orders: Order; drivers:
 * Driver }`. The default allows any endpoint name with any JSON value.
 */
export type EndpointTypes = Record<string, unknown>;

/** A record of one of the endpoints of `T`: checking `endpoint` narrows `value`. */
export type RecordOf<T extends EndpointTypes> = {
  [E in keyof T & string]: FjordRecord<T[E], E>;
}[keyof T & string];

/**
 * The snapshot of a table endpoint (a `"mode": "table"` endpoint, which keeps the latest
 * record per key), once it has arrived whole: for `onSnapshot` of `connect`.
 */
export type SnapshotOf<T extends EndpointTypes> = {
  [E in keyof T & string]: {
    endpoint: E;
    /**
     * The current rows, one record per key, in key order, after the connection's `keys`,
     * `filter` and `fields`. Each has as `id` the snapshot's `id`: the rows came without one.
     */
    rows: FjordRecord<T[E], E>[];
    /** The id to resume after the snapshot (its `fjord.snapshot_end` event's). */
    id: string;
  };
}[keyof T & string];

/** Data of a `fjord.gap` event: records between `last_event_id` and `oldest_id` were missed. */
export interface GapInfo {
  endpoint: string;
  last_event_id: string;
  oldest_id: string;
  message: string;
}

/** `connecting` before the first open, `reconnecting` between a drop and the next open. */
export type Status = "connecting" | "open" | "reconnecting" | "closed";

/** Why the status changed. */
export type StatusReason =
  /** `connect()` was called. */
  | "start"
  /** The server accepted the stream. */
  | "opened"
  /** The connection failed or dropped; `error` says how. */
  | "error"
  /** The server is draining (`fjord.shutdown`): reconnecting at once. */
  | "shutdown"
  /** The token expired (`fjord.expired`): reconnecting with a fresh token at once. */
  | "expired"
  /** The server refused the resume id: dropped (see `onNotice`), reconnecting at once. */
  | "stale_id"
  /** The browser came back online: the pending reconnect runs at once. */
  | "online"
  /** A hidden page became visible: the pending reconnect runs at once. */
  | "visible"
  /** `close()` was called or the `signal` aborted. */
  | "closed"
  /** A fatal error stopped the client; it was passed to `onError`. */
  | "fatal";

export interface StatusInfo {
  reason: StatusReason;
  /** For `reconnecting`: the delay before the next attempt, in milliseconds. */
  delayMs?: number;
}

/**
 * Something the application should know that stops nothing. `stale_id`: the server refused
 * the resume id (`bad_last_event_id`: an id saved for another set of endpoints, or not an id
 * at all); the client dropped it and goes on from the endpoints' start position.
 */
export interface Notice {
  code: "stale_id";
  /** The server's reason. */
  message: string;
  /** The id that was dropped. */
  lastEventId: string;
}

/** Why `getToken` is being asked. */
export interface TokenRequest {
  /**
   * `connect` for the first connection, `reconnect` after a drop, `expired` after
   * `fjord.expired`, `refused` after a 401 or 403: return a token that is certainly fresh.
   */
  reason: "connect" | "reconnect" | "expired" | "refused";
}

/** A token, or nothing to send no `Authorization` (cookie auth). */
export type TokenResult = string | null | undefined;

/** Constructor of a WHATWG `EventSource` (the browser's, or a polyfill in Node). */
export type EventSourceConstructor = new (
  url: string,
  init?: { withCredentials?: boolean },
) => EventSource;

/** Options of `connect`; `T` maps endpoint names to their record value types. */
export interface ConnectOptions<T extends EndpointTypes = Record<string, JsonValue>> {
  /** Server base URL, e.g. `https://stream.example.com` (a path prefix is kept). `""` for same origin. */
  url: string;
  /** One or more endpoint names. */
  endpoints: (keyof T & string) | readonly (keyof T & string)[];
  /** Only records with one of these keys. */
  keys?: readonly string[] | undefined;
  /**
   * Only records that pass this filter, checked by the server (a CEL subset:
   * `value.status == "placed" && value.total_cents >= 1000`). A string applies to every
   * endpoint (`?filter=`); an object gives each endpoint named in it its own
   * (`?filter.<endpoint>=`). `""` or an endpoint left out: no filter. A token's own filter
   * still applies: the server ANDs them, so a filter can only narrow what the token allows.
   */
  filter?: string | { readonly [E in keyof T & string]?: string | undefined } | undefined;
  /**
   * Only these parts of `value` are sent: paths of names joined by `.`, `["any name"]` for a
   * name that is not an identifier (`["id", "customer.name"]`). A list applies to every
   * endpoint (`?fields=`); an object gives each endpoint named in it its own list
   * (`?fields.<endpoint>=`). An empty list or an endpoint left out: the whole value.
   * The record types do not follow: with `fields`, name the projected shape in `T`
   * (`{ orders: Pick<Order, "id" | "total_cents"> }`).
   */
  fields?: readonly string[] | { readonly [E in keyof T & string]?: readonly string[] | undefined } | undefined;
  /** Called before every connection attempt; return the bearer token (or nothing for cookie auth). */
  getToken?: ((request: TokenRequest) => TokenResult | Promise<TokenResult>) | undefined;
  /** Called once per record, in stream order, never twice for the same id. */
  onRecord: (record: RecordOf<T>) => void;
  /** Called for every error; `error.fatal` means the client has stopped. */
  onError?: ((error: FjordError) => void) | undefined;
  /** Called on every status change. */
  onStatus?: ((status: Status, info: StatusInfo) => void) | undefined;
  /** Called when the server reports that records were missed (`fjord.gap`); the stream goes on. */
  onGap?: ((gap: GapInfo) => void) | undefined;
  /** Called for what stops nothing but the application may show: a dropped resume id. */
  onNotice?: ((notice: Notice) => void) | undefined;
  /**
   * Called when a table endpoint's snapshot has come whole: at the start of a connection,
   * and again after a resume the server could not serve (then the rows replace the ones
   * before: a key left out was deleted meanwhile). Its rows never reach `onRecord`, and
   * without `onSnapshot` they are dropped. `table()` keeps the rows for you.
   */
  onSnapshot?: ((snapshot: SnapshotOf<T>) => void) | undefined;
  /** Aborting it closes the stream for good, like `close()`. */
  signal?: AbortSignal | undefined;
  /** Resume after this id (for example one saved before a page reload). */
  lastEventId?: string | undefined;
  /** `fetch` (default): token in the `Authorization` header. `eventsource`: the platform `EventSource`. */
  transport?: "fetch" | "eventsource" | undefined;
  /** With `transport: 'eventsource'`, send the token as `?access_token=` (only if the server allows it). */
  tokenInQuery?: boolean | undefined;
  /** Send cookies cross-origin (`credentials: 'include'`, `withCredentials`). */
  withCredentials?: boolean | undefined;
  /** Drop and resume when nothing, not even a heartbeat, arrives for this long; `0` never. Default 45000. */
  idleTimeoutMs?: number | undefined;
  /** Upper bound of the reconnect delay. Default 30000. */
  maxRetryMs?: number | undefined;
  /** The `fetch` to use (default: the global one). */
  fetch?: typeof fetch | undefined;
  /** The `EventSource` to use with `transport: 'eventsource'` (default: the global one). */
  EventSource?: EventSourceConstructor | undefined;
}

/** What `connect` returns. */
export interface Subscription {
  /** Stops the stream for good. */
  close(): void;
  /** The id to resume after: the last record delivered, or the stream's start position. */
  readonly lastEventId: string | undefined;
  /** The current status. */
  readonly status: Status;
}

/** Options of `table`: those of `connect` but `endpoints`, `onRecord`, `onSnapshot` and `lastEventId`. */
export interface TableOptions<V = JsonValue>
  extends Omit<ConnectOptions<Record<string, V>>, "endpoints" | "onRecord" | "onSnapshot" | "lastEventId"> {
  /** The table endpoint. */
  endpoint: string;
  /** Called after each change of `rows`: a snapshot replaced them all, a key was set, a key was deleted. */
  onChange?: ((change: TableChange<V>) => void) | undefined;
  /** Records without a key, which are no rows: they are passed here and kept nowhere. */
  onRecord?: ((record: FjordRecord<V>) => void) | undefined;
}

/**
 * What changed in a table's `rows`. `snapshot`: a snapshot replaced every row (the first
 * one, or a new one after a resume the server could not serve). `upsert`: a live record set
 * the row of `key`. `delete`: a tombstone (`value: null`) deleted it; `row` is the one deleted.
 */
export type TableChange<V = JsonValue> =
  | { type: "snapshot"; rows: ReadonlyMap<string, FjordRecord<V>> }
  | { type: "upsert"; key: string; row: FjordRecord<V> }
  | { type: "delete"; key: string; row: FjordRecord<V> };

/** What `table` returns. */
export interface Table<V = JsonValue> extends Subscription {
  /**
   * The current rows by key (see `rowKey`), one record each: the same Map for the table's
   * life, changed in place. Read it; do not change it.
   */
  readonly rows: ReadonlyMap<string, FjordRecord<V>>;
  /**
   * Resolves with `rows` once the first snapshot is in; rejects with the `FjordError` that
   * stopped the table first (`code` `closed` after `close()` or an aborted `signal`).
   */
  readonly ready: Promise<ReadonlyMap<string, FjordRecord<V>>>;
}

/**
 * An error of the stream. `status` is the HTTP status when the server answered, `code` the
 * server's error code (`token_expired`, `forbidden`, `unknown_endpoint`, `bad_filter`, ...)
 * or one of the client's own: `cors` (the server answered but the browser hid the answer from this page),
 * `network` (nothing answered, or the connection was cut), `idle_timeout`, `stream_ended`,
 * `bad_content_type`, `bad_event`, `token_error`, `http_<status>`.
 */
export class FjordError extends Error {
  override readonly name = "FjordError";
  readonly status: number | undefined;
  readonly code: string;
  /** True when the client stopped because of this error. */
  readonly fatal: boolean;

  constructor(
    code: string,
    message: string,
    options: { status?: number | undefined; fatal?: boolean; cause?: unknown } = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.status = options.status;
    this.fatal = options.fatal ?? false;
  }
}
