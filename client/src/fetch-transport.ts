// The default transport: `fetch` with the token in `Authorization` and the resume position
// in `Last-Event-ID`, the body decoded and parsed as it streams, and an idle watchdog that
// drops a connection on which nothing (not even a heartbeat) arrives.

import { SseParser } from "./sse.js";
import { describe, failureFromResponse, failureFromThrow, type Attempt, type Connection, type Failure, type Transport, type TransportHandlers } from "./transport.js";
import { streamUrl } from "./url.js";

export interface FetchTransportOptions {
  fetch: typeof fetch;
  withCredentials: boolean;
  idleTimeoutMs: number;
}

export function fetchTransport(options: FetchTransportOptions): Transport {
  return (attempt, handlers) => new FetchConnection(options, attempt, handlers);
}

class FetchConnection implements Connection {
  private readonly controller = new AbortController();
  private ended = false;
  private idleTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly options: FetchTransportOptions,
    attempt: Attempt,
    private readonly handlers: TransportHandlers,
  ) {
    void this.run(attempt);
  }

  close(): void {
    this.stop();
  }

  private stop(): boolean {
    if (this.ended) return false;
    this.ended = true;
    clearTimeout(this.idleTimer);
    this.controller.abort();
    return true;
  }

  private end(failure: Failure): void {
    if (this.stop()) this.handlers.onEnd(failure);
  }

  /** (Re)arms the idle watchdog. */
  private alive(): void {
    const ms = this.options.idleTimeoutMs;
    if (ms <= 0 || this.ended) return;
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(
      () => this.end({ code: "idle_timeout", message: `nothing received for ${ms} ms` }),
      ms,
    );
  }

  private async run(attempt: Attempt): Promise<void> {
    const headers: Record<string, string> = { Accept: "text/event-stream" };
    if (attempt.token !== undefined) headers["Authorization"] = `Bearer ${attempt.token}`;
    if (attempt.lastEventId !== undefined) headers["Last-Event-ID"] = attempt.lastEventId;
    const { endpoints, keys, filter, fields } = attempt;
    const url = streamUrl(attempt.baseUrl, { endpoints, keys, filter, fields });
    this.alive();
    let response: Response;
    try {
      response = await this.options.fetch(url, {
        headers,
        signal: this.controller.signal,
        credentials: this.options.withCredentials ? "include" : "same-origin",
      });
    } catch (cause) {
      if (!this.ended) this.end(await failureFromThrow(this.options.fetch, url, cause, this.controller.signal));
      return;
    }
    if (this.ended) {
      void response.body?.cancel().catch(() => undefined);
      return;
    }
    if (!response.ok) {
      this.end(await failureFromResponse(response));
      return;
    }
    const type = response.headers.get("content-type") ?? "";
    if (!/^text\/event-stream\b/i.test(type) || response.body === null) {
      void response.body?.cancel().catch(() => undefined);
      this.end({
        code: "bad_content_type",
        message: `expected text/event-stream, got ${type === "" ? "no content type" : type}`,
        status: response.status,
      });
      return;
    }
    this.handlers.onOpen();
    await this.read(response.body);
  }

  private async read(body: ReadableStream<Uint8Array>): Promise<void> {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    // Handlers may close the connection while a chunk is parsed: nothing after that counts.
    const parser = new SseParser({
      onMessage: (message) => {
        if (!this.ended) this.handlers.onMessage(message);
      },
      onId: (id) => {
        if (!this.ended) this.handlers.onId(id);
      },
      onRetry: (ms) => {
        if (!this.ended) this.handlers.onRetry(ms);
      },
    });
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (this.ended) return;
        if (done) {
          this.end({ code: "stream_ended", message: "the server ended the stream" });
          return;
        }
        this.alive();
        parser.feed(decoder.decode(value, { stream: true }));
      }
    } catch (cause) {
      this.end({ code: "network", message: `stream interrupted: ${describe(cause)}`, cause });
    }
  }
}
