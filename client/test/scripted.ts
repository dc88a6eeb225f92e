// Test helpers: a fake `fetch` whose every call the test answers by hand (a scripted SSE
// stream, an error response, a network failure) but for `no-cors` probes, which it answers as
// told; a fake `EventSource`, and `settle()` to let pending promises and stream reads run.

import { setImmediate as tick } from "node:timers/promises";

/** Lets promise chains and stream reads run (not faked: only setTimeout and Date are). */
export async function settle(rounds = 20): Promise<void> {
  for (let i = 0; i < rounds; i++) await tick();
}

/** The stream of one answered call; `push` sends text as one chunk. */
export class ScriptedStream {
  private controller!: ReadableStreamDefaultController<Uint8Array>;
  readonly body: ReadableStream<Uint8Array>;
  private readonly encoder = new TextEncoder();
  closed = false;

  constructor() {
    this.body = new ReadableStream<Uint8Array>({
      start: (controller) => {
        this.controller = controller;
      },
      cancel: () => {
        this.closed = true;
      },
    });
  }

  push(text: string): void {
    this.controller.enqueue(this.encoder.encode(text));
  }

  pushBytes(bytes: Uint8Array): void {
    this.controller.enqueue(bytes);
  }

  end(): void {
    this.controller.close();
  }

  fail(error: Error): void {
    this.controller.error(error);
  }
}

export class Call {
  readonly response: Promise<Response>;
  private resolve!: (response: Response) => void;
  private reject!: (error: Error) => void;
  /** Set when the client aborted the request or its stream. */
  aborted = false;
  stream: ScriptedStream | undefined;

  constructor(
    readonly url: string,
    readonly headers: Headers,
    signal: AbortSignal | undefined,
  ) {
    this.response = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    signal?.addEventListener("abort", () => {
      this.aborted = true;
      const error = new DOMException("aborted", "AbortError");
      this.reject(error);
      try {
        this.stream?.fail(error);
      } catch {
        // Already closed.
      }
    });
  }

  /** Answers 200 `text/event-stream`; returns the stream to script. */
  open(contentType = "text/event-stream"): ScriptedStream {
    const stream = new ScriptedStream();
    this.stream = stream;
    this.resolve(new Response(stream.body, { status: 200, headers: { "content-type": contentType } }));
    return stream;
  }

  /** Answers with the server's JSON error. */
  error(status: number, code: string, message = `${code} (test)`): void {
    this.resolve(
      new Response(JSON.stringify({ error: { code, message } }), {
        status,
        headers: { "content-type": "application/json" },
      }),
    );
  }

  /** Fails like fetch does when the server cannot be reached. */
  networkError(): void {
    this.reject(new TypeError("fetch failed"));
  }

  header(name: string): string | null {
    return this.headers.get(name);
  }
}

/** A fake `fetch`: each call waits for the test to answer it. */
export class ScriptedFetch {
  readonly calls: Call[] = [];
  /** URLs of the `no-cors` probes. */
  readonly probes: string[] = [];
  /** How probes are answered: `opaque` as a server that answered does, else as no server. */
  probeAnswer: "opaque" | "none" = "none";
  private taken = 0;
  private waiting: (() => void) | undefined;

  readonly fetch: typeof fetch = (input, init) => {
    const url = input instanceof Request ? input.url : String(input);
    if (init?.mode === "no-cors") {
      this.probes.push(url);
      // Only a browser makes opaque responses: the client reads no more than `type`.
      if (this.probeAnswer === "opaque") return Promise.resolve({ type: "opaque", status: 0 } as Response);
      return Promise.reject(new TypeError("Failed to fetch"));
    }
    const call = new Call(url, new Headers(init?.headers), init?.signal ?? undefined);
    this.calls.push(call);
    this.waiting?.();
    return call.response;
  };

  /** The next call not yet taken, waiting for it if needed. */
  async next(): Promise<Call> {
    for (let i = 0; i < 100; i++) {
      const call = this.calls[this.taken];
      if (call !== undefined) {
        this.taken++;
        return call;
      }
      await Promise.race([new Promise<void>((resolve) => (this.waiting = resolve)), settle(1)]);
    }
    throw new Error(`no fetch call #${this.taken + 1} came (calls so far: ${this.calls.length})`);
  }
}

/** A record event as the server writes it. */
export function recordEvent(endpoint: string, id: string, fields: Record<string, unknown> = {}): string {
  const envelope = {
    topic: endpoint,
    partition: 0,
    offset: 0,
    key: null,
    timestamp: null,
    headers: {},
    value: null,
    ...fields,
  };
  return `id: ${id}\nevent: ${endpoint}\ndata: ${JSON.stringify(envelope)}\n\n`;
}

type Listener = (event: MessageEvent<unknown>) => void;

/** A fake `EventSource` whose instances the test drives. */
export class FakeEventSource {
  static instances: FakeEventSource[] = [];
  onopen: (() => void) | null = null;
  onerror: (() => void) | null = null;
  closed = false;
  private readonly listeners = new Map<string, Listener[]>();

  constructor(
    readonly url: string,
    readonly init?: { withCredentials?: boolean },
  ) {
    FakeEventSource.instances.push(this);
  }

  addEventListener(name: string, listener: Listener): void {
    this.listeners.set(name, [...(this.listeners.get(name) ?? []), listener]);
  }

  close(): void {
    this.closed = true;
  }

  open(): void {
    this.onopen?.();
  }

  emit(name: string, data: string, lastEventId = ""): void {
    const event = new MessageEvent(name, { data, lastEventId });
    for (const listener of this.listeners.get(name) ?? []) listener(event);
  }

  fail(): void {
    this.onerror?.();
  }
}
