// The fallback transport: the platform `EventSource`, for cookie auth or a query token. It
// cannot set headers, so the resume position travels as `?last_event_id=`; its own retries
// are cut short (the client reconnects, with a fresh token); and because it hides the HTTP
// status of a refused stream, a failure before the stream opened is probed once with `fetch`
// to learn the status and the server's error code.

import { failureFromResponse, failureFromThrow, type Attempt, type Connection, type Failure, type Transport, type TransportHandlers } from "./transport.js";
import type { EventSourceConstructor } from "./types.js";
import { streamUrl } from "./url.js";

export interface EventSourceTransportOptions {
  EventSource: EventSourceConstructor;
  /** For the probe; without one a refused stream reports as a network failure. */
  fetch: typeof fetch | undefined;
  withCredentials: boolean;
  tokenInQuery: boolean;
}

/** Event names the server sends besides the endpoints' own. */
const RESERVED = ["fjord.gap", "fjord.shutdown", "fjord.expired", "fjord.snapshot_start", "fjord.snapshot_end"];

export function eventSourceTransport(options: EventSourceTransportOptions): Transport {
  return (attempt, handlers) => new EventSourceConnection(options, attempt, handlers);
}

class EventSourceConnection implements Connection {
  private readonly source: EventSource;
  private readonly probe = new AbortController();
  private ended = false;
  private opened = false;

  constructor(
    private readonly options: EventSourceTransportOptions,
    attempt: Attempt,
    private readonly handlers: TransportHandlers,
  ) {
    const url = streamUrl(attempt.baseUrl, {
      endpoints: attempt.endpoints,
      keys: attempt.keys,
      filter: attempt.filter,
      fields: attempt.fields,
      lastEventId: attempt.lastEventId,
      accessToken: options.tokenInQuery ? attempt.token : undefined,
    });
    this.source = new options.EventSource(url, { withCredentials: options.withCredentials });
    this.source.onopen = () => {
      if (this.ended) return;
      this.opened = true;
      handlers.onOpen();
    };
    this.source.onerror = () => {
      if (this.ended) return;
      // Stop EventSource's own reconnection: the client decides when and with what token.
      this.source.close();
      if (this.opened) this.end({ code: "network", message: "the stream was interrupted" });
      else void this.diagnose(url);
    };
    for (const name of [...attempt.endpoints, ...RESERVED]) {
      this.source.addEventListener(name, (event: MessageEvent<unknown>) => {
        if (this.ended || typeof event.data !== "string") return;
        // The source's last id, which an event without an `id:` line (a snapshot row) repeats:
        // the client takes each event of an open snapshot as a row, whatever its id.
        handlers.onMessage({ event: name, data: event.data, id: event.lastEventId || undefined });
      });
    }
  }

  close(): void {
    if (this.ended) return;
    this.ended = true;
    this.source.close();
    this.probe.abort();
  }

  private end(failure: Failure): void {
    if (this.ended) return;
    this.close();
    this.handlers.onEnd(failure);
  }

  /** Asks the same URL with `fetch` why the stream was refused. */
  private async diagnose(url: string): Promise<void> {
    const unknown: Failure = { code: "network", message: `cannot open the stream at ${url}` };
    const fetchFn = this.options.fetch;
    if (fetchFn === undefined) {
      this.end(unknown);
      return;
    }
    try {
      const response = await fetchFn(url, {
        headers: { Accept: "text/event-stream" },
        signal: this.probe.signal,
        credentials: this.options.withCredentials ? "include" : "same-origin",
      });
      if (response.ok) {
        void response.body?.cancel().catch(() => undefined);
        this.end(unknown);
      } else {
        this.end(await failureFromResponse(response));
      }
    } catch (cause) {
      if (!this.ended) this.end(await failureFromThrow(fetchFn, url, cause, this.probe.signal));
    }
  }
}
