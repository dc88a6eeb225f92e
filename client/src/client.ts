// The reconnecting subscription behind `connect`: asks for a token before every attempt,
// resumes from the last id, backs off between failures, turns records into `FjordRecord`s
// delivered once, handles the reserved `fjord.*` events, and decides which errors are fatal.
// It also ends with the caller's AbortSignal, drops a resume id that the server refuses, and
// cuts a pending backoff short when the browser comes back online or a hidden page returns.
// `filter` and `fields` are checked at `connect` and sent alike on every attempt. A table
// endpoint's snapshot (`fjord.snapshot_start`, rows without ids, `fjord.snapshot_end`) is
// gathered whole and handed to `onSnapshot`; its rows bypass the dedupe by id.

import { backoffDelay } from "./backoff.js";
import { RecentIds } from "./dedupe.js";
import { eventSourceTransport } from "./eventsource-transport.js";
import { fetchTransport } from "./fetch-transport.js";
import type { SseMessage } from "./sse.js";
import type { Connection, Failure, Transport } from "./transport.js";
import type { PerEndpoint } from "./url.js";
import {
  FjordError,
  type ConnectOptions,
  type EndpointTypes,
  type GapInfo,
  type JsonValue,
  type RecordOf,
  type SnapshotOf,
  type Status,
  type StatusReason,
  type Subscription,
  type TokenRequest,
} from "./types.js";

/** The reconnect delay until the server sends `retry:`. */
const DEFAULT_RETRY_MS = 2000;
const DEFAULT_MAX_RETRY_MS = 30_000;
const DEFAULT_IDLE_TIMEOUT_MS = 45_000;
/** A connection open this long counts as healthy: the next drop starts the backoff over. */
const HEALTHY_MS = 10_000;
/** Ids remembered per endpoint to drop duplicates. */
const RECENT_IDS = 1024;

/**
 * Opens a stream of records and keeps it open until `close()` or a fatal error.
 *
 * @example
 * const sub = connect<{ orders: Order }>({ url: "https://stream.example.com", endpoints: "orders",
 *   onRecord: (r) => console.log(r.key, r.value.status) });
 */
export function connect<T extends EndpointTypes = Record<string, JsonValue>>(options: NoInfer<ConnectOptions<T>>): Subscription {
  const stream = new Stream(options);
  return {
    close: () => stream.close(),
    get lastEventId() {
      return stream.lastEventId;
    },
    get status() {
      return stream.status;
    },
  };
}

class Stream<T extends EndpointTypes> {
  status: Status = "connecting";
  lastEventId: string | undefined;
  private readonly transport: Transport;
  private readonly endpoints: readonly string[];
  private readonly filter: PerEndpoint | undefined;
  private readonly fields: PerEndpoint | undefined;
  private readonly recent = new RecentIds(RECENT_IDS);
  /**
   * The rows of the snapshots under way, by endpoint. While an endpoint's snapshot is open
   * every event of it is a row, whatever its id (EventSource repeats the last one); a new
   * connection drops what a cut one left unfinished.
   */
  private readonly snapshots = new Map<string, RecordOf<T>[]>();
  private retryMs = DEFAULT_RETRY_MS;
  /** Failed attempts since the last healthy connection. */
  private attempt = 0;
  /** The last attempt was refused (401/403) and this one carries a fresh token. */
  private refused = false;
  private openedAt: number | undefined;
  private connection: Connection | undefined;
  /** Set while waiting to reconnect. */
  private timer: ReturnType<typeof setTimeout> | undefined;

  constructor(private readonly options: ConnectOptions<T>) {
    this.endpoints = typeof options.endpoints === "string" ? [options.endpoints] : [...options.endpoints];
    if (this.endpoints.length === 0) throw new TypeError("connect: at least one endpoint is needed");
    this.filter = filterQuery(options.filter, this.endpoints);
    this.fields = fieldsQuery(options.fields, this.endpoints);
    this.lastEventId = options.lastEventId;
    this.transport = makeTransport(options);
    this.emitStatus("connecting", "start");
    if (options.signal?.aborted) {
      this.close();
      return;
    }
    options.signal?.addEventListener("abort", this.close);
    globalThis.addEventListener?.("online", this.wake);
    globalThis.document?.addEventListener("visibilitychange", this.wake);
    void this.open("connect");
  }

  readonly close = (): void => {
    if (this.status === "closed") return;
    this.stop();
    this.emitStatus("closed", "closed");
  };

  private stop(): void {
    clearTimeout(this.timer);
    this.connection?.close();
    this.connection = undefined;
    this.status = "closed";
    this.options.signal?.removeEventListener("abort", this.close);
    globalThis.removeEventListener?.("online", this.wake);
    globalThis.document?.removeEventListener("visibilitychange", this.wake);
  }

  /**
   * Back online, or a hidden page shown again: a connection that died meanwhile should not
   * sit out its backoff (which grew while the network was gone; timers of hidden pages run
   * late too). An open connection is left alone: its idle watchdog judges it.
   */
  private readonly wake = (event: Event): void => {
    const online = event.type === "online";
    if (this.timer === undefined || (!online && document.visibilityState !== "visible")) return;
    this.schedule(0, online ? "online" : "visible", "reconnect");
  };

  private async open(reason: TokenRequest["reason"]): Promise<void> {
    let token: string | undefined;
    try {
      token = (await this.options.getToken?.({ reason })) ?? undefined;
    } catch (cause) {
      if (this.status !== "closed") {
        this.failed({ code: "token_error", message: `getToken failed: ${String(cause)}`, cause });
      }
      return;
    }
    if (this.status === "closed") return;
    this.openedAt = undefined;
    this.snapshots.clear();
    this.connection = this.transport(
      {
        baseUrl: this.options.url,
        endpoints: this.endpoints,
        keys: this.options.keys ?? [],
        filter: this.filter,
        fields: this.fields,
        token,
        lastEventId: this.lastEventId,
      },
      {
        onOpen: () => {
          this.openedAt = Date.now();
          this.refused = false;
          this.emitStatus("open", "opened");
        },
        onRetry: (ms) => {
          this.retryMs = ms;
        },
        onId: (id) => {
          this.lastEventId = id;
        },
        onMessage: (message) => this.message(message),
        onEnd: (failure) => {
          this.connection = undefined;
          this.failed(failure);
        },
      },
    );
  }

  private message(message: SseMessage): void {
    const { event, data, id } = message;
    switch (event) {
      case "fjord.gap":
        this.gap(data);
        return;
      case "fjord.shutdown":
        this.reconnectNow("shutdown", "reconnect");
        return;
      case "fjord.expired":
        this.reconnectNow("expired", "expired");
        return;
      case "fjord.snapshot_start":
        this.snapshots.set(this.endpointOf(data), []);
        return;
      case "fjord.snapshot_end":
        this.snapshotEnd(this.endpointOf(data), id);
        return;
      default: {
        if (event.startsWith("fjord.")) return; // a notice of a newer server
        const rows = this.snapshots.get(event);
        if (rows === undefined) this.record(message);
        else {
          const row = this.envelope(message, "");
          if (row !== undefined) rows.push(row);
        }
      }
    }
  }

  private record(message: SseMessage): void {
    const { event, id } = message;
    if (id === undefined) {
      this.report(new FjordError("bad_event", `an event of ${event} came without an id`));
      return;
    }
    if (!this.recent.add(event, id)) return;
    this.lastEventId = id;
    const record = this.envelope(message, id);
    if (record === undefined) return;
    this.attempt = 0;
    guard(() => this.options.onRecord(record));
  }

  /** The record an event carries, or nothing (reported) when its data is not a JSON envelope. */
  private envelope({ event, data }: SseMessage, id: string): RecordOf<T> | undefined {
    let envelope: unknown;
    try {
      envelope = JSON.parse(data);
    } catch {
      envelope = undefined;
    }
    if (typeof envelope !== "object" || envelope === null || Array.isArray(envelope)) {
      this.report(new FjordError("bad_event", `an event ${id} of ${event} is not a JSON envelope`));
      return undefined;
    }
    // The server builds the envelope; its shape is the contract, not checked field by field.
    return { ...envelope, endpoint: event, id } as RecordOf<T>;
  }

  /** The endpoint a `fjord.snapshot_*` event names (`{"endpoint": "drivers"}`). */
  private endpointOf(data: string): string {
    try {
      return String((JSON.parse(data) as { endpoint: unknown }).endpoint);
    } catch {
      return "";
    }
  }

  /**
   * A snapshot is whole: its rows take the id it ends with (resuming after it starts after
   * the snapshot) and go to `onSnapshot` together.
   */
  private snapshotEnd(endpoint: string, id: string | undefined): void {
    const rows = this.snapshots.get(endpoint);
    this.snapshots.delete(endpoint);
    if (id !== undefined) this.lastEventId = id;
    const onSnapshot = this.options.onSnapshot;
    if (rows === undefined) return;
    const at = this.lastEventId ?? "";
    for (const row of rows) row.id = at;
    this.attempt = 0;
    if (onSnapshot !== undefined) guard(() => onSnapshot({ endpoint, rows, id: at } as SnapshotOf<T>));
  }

  private gap(data: string): void {
    let info: GapInfo;
    try {
      info = JSON.parse(data) as GapInfo;
    } catch {
      this.report(new FjordError("bad_event", "a fjord.gap event whose data is not JSON"));
      return;
    }
    const onGap = this.options.onGap;
    if (onGap !== undefined) guard(() => onGap(info));
  }

  /** Drops the connection and opens a new one without waiting. */
  private reconnectNow(reason: StatusReason, tokenReason: TokenRequest["reason"]): void {
    this.connection?.close();
    this.connection = undefined;
    this.schedule(0, reason, tokenReason);
  }

  private failed(failure: Failure): void {
    const { code, message, status } = failure;
    const dropped = this.lastEventId;
    if (code === "bad_last_event_id" && dropped !== undefined) {
      // An id saved for other endpoints, or by another deployment: going on live beats stopping.
      this.lastEventId = undefined;
      const onNotice = this.options.onNotice;
      if (onNotice !== undefined) guard(() => onNotice({ code: "stale_id", message, lastEventId: dropped }));
      this.schedule(0, "stale_id", "reconnect");
      return;
    }
    if (status === 401 || status === 403) {
      if (!this.refused) {
        this.refused = true;
        this.report(new FjordError(code, message, { status, cause: failure.cause }));
        this.schedule(0, "error", "refused");
        return;
      }
      this.fatal(new FjordError(code, message, { status, fatal: true }));
      return;
    }
    if (isFatal(failure)) {
      this.fatal(new FjordError(code, message, { status, fatal: true, cause: failure.cause }));
      return;
    }
    this.report(new FjordError(code, message, { status, cause: failure.cause }));
    if (this.openedAt !== undefined && Date.now() - this.openedAt >= HEALTHY_MS) this.attempt = 0;
    const maxMs = this.options.maxRetryMs ?? DEFAULT_MAX_RETRY_MS;
    this.schedule(backoffDelay(this.attempt++, this.retryMs, maxMs), "error", "reconnect");
  }

  private schedule(delayMs: number, reason: StatusReason, tokenReason: TokenRequest["reason"]): void {
    this.emitStatus("reconnecting", reason, delayMs);
    clearTimeout(this.timer);
    this.timer = undefined;
    // `open` awaits the token before it connects, so even "at once" leaves the current handler first.
    if (delayMs === 0) void this.open(tokenReason);
    else
      this.timer = setTimeout(() => {
        this.timer = undefined;
        void this.open(tokenReason);
      }, delayMs);
  }

  private fatal(error: FjordError): void {
    this.stop();
    this.report(error);
    this.emitStatus("closed", "fatal");
  }

  private report(error: FjordError): void {
    const onError = this.options.onError;
    if (onError !== undefined) guard(() => onError(error));
  }

  private emitStatus(status: Status, reason: StatusReason, delayMs?: number): void {
    this.status = status;
    const onStatus = this.options.onStatus;
    if (onStatus !== undefined) guard(() => onStatus(status, delayMs === undefined ? { reason } : { reason, delayMs }));
  }
}

/**
 * 4xx answers other than 401/403 (handled apart), 408 and 429 will not change on retry: among
 * them `bad_filter` and `bad_fields`, as every attempt sends the same filter and fields.
 */
function isFatal({ code, status }: Failure): boolean {
  if (code === "bad_content_type") return true;
  return status !== undefined && status >= 400 && status < 500 && status !== 408 && status !== 429;
}

function makeTransport<T extends EndpointTypes>(options: ConnectOptions<T>): Transport {
  const fetchFn = options.fetch ?? (typeof fetch === "function" ? fetch.bind(globalThis) : undefined);
  const withCredentials = options.withCredentials ?? false;
  if (options.transport === "eventsource") {
    const EventSourceCtor = options.EventSource ?? (typeof EventSource === "function" ? EventSource : undefined);
    if (EventSourceCtor === undefined) throw new TypeError("connect: no EventSource in this environment; pass one");
    return eventSourceTransport({
      EventSource: EventSourceCtor,
      fetch: fetchFn,
      withCredentials,
      tokenInQuery: options.tokenInQuery ?? false,
    });
  }
  if (fetchFn === undefined) throw new TypeError("connect: no fetch in this environment; pass one");
  return fetchTransport({
    fetch: fetchFn,
    withCredentials,
    idleTimeoutMs: options.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS,
  });
}

type PerEndpointOption<V> = V | Readonly<Record<string, V | undefined>> | undefined;

/** The filter as the URL sends it. Its language is the server's to judge; the rest is checked here. */
function filterQuery(filter: PerEndpointOption<string>, endpoints: readonly string[]): PerEndpoint | undefined {
  if (filter === undefined || typeof filter === "string") return filter;
  return byEndpoint("filter", "a string", filter, endpoints, (text, endpoint) => {
    if (typeof text !== "string") throw new TypeError(`connect: filter.${endpoint} is not a string`);
    return text;
  });
}

/** The projection as the URL sends it: each list joined with `,`. */
function fieldsQuery(fields: PerEndpointOption<readonly string[]>, endpoints: readonly string[]): PerEndpoint | undefined {
  if (fields === undefined) return undefined;
  if (isList(fields)) return joinPaths(fields, "fields");
  return byEndpoint("fields", "a list of paths", fields, endpoints, (paths, endpoint) => joinPaths(paths, `fields.${endpoint}`));
}

/**
 * Copies a per-endpoint option, so that later changes to the caller's object do not change
 * what a reconnect asks for; an endpoint the stream does not have is a slip caught at once.
 */
function byEndpoint<V>(
  option: string,
  forAll: string,
  values: Readonly<Record<string, V | undefined>>,
  endpoints: readonly string[],
  text: (value: V, endpoint: string) => string,
): Record<string, string> {
  if (typeof values !== "object" || values === null || isList(values)) {
    throw new TypeError(`connect: ${option} is neither ${forAll} nor an object of endpoint names`);
  }
  const query: Record<string, string> = {};
  for (const [endpoint, value] of Object.entries(values)) {
    if (!endpoints.includes(endpoint)) {
      const known = JSON.stringify(endpoints);
      throw new TypeError(`connect: ${option} names ${JSON.stringify(endpoint)}, which is not one of the endpoints ${known}`);
    }
    if (value !== undefined) query[endpoint] = text(value, endpoint);
  }
  return query;
}

function joinPaths(paths: readonly string[], option: string): string {
  if (!isList(paths)) throw new TypeError(`connect: ${option} is not a list of paths`);
  // Joined, a blank path is a stray comma, for which the server would refuse the whole list.
  if (paths.some((path) => typeof path !== "string" || path.trim() === "")) {
    throw new TypeError(`connect: ${option} has an empty path`);
  }
  return paths.join(",");
}

function isList(value: unknown): value is readonly unknown[] {
  return Array.isArray(value);
}

/** Runs an application callback; its exception surfaces on its own without breaking the stream. */
export function guard(callback: () => void): void {
  try {
    callback();
  } catch (error) {
    setTimeout(() => {
      throw error;
    }, 0);
  }
}
