// The contract between the reconnecting client and a transport: a transport makes exactly
// one connection attempt, reports what arrives through `SseHandlers`, and reports once how
// the connection ended. It never retries by itself. Also here: what a failed attempt was, from
// the server's JSON error, or, when the browser hid the answer, whether anything answered.

import type { SseHandlers } from "./sse.js";
import type { PerEndpoint } from "./url.js";

/** What one connection attempt needs. */
export interface Attempt {
  baseUrl: string;
  endpoints: readonly string[];
  keys: readonly string[];
  /** Sent on every attempt: the server applies them to the replay too. */
  filter: PerEndpoint | undefined;
  fields: PerEndpoint | undefined;
  token: string | undefined;
  /** Resume after this id. */
  lastEventId: string | undefined;
}

/** How a connection ended (anything but `close()`). */
export interface Failure {
  code: string;
  message: string;
  /** The HTTP status, when the server answered with an error. */
  status?: number;
  cause?: unknown;
}

export interface TransportHandlers extends SseHandlers {
  /** The server accepted the stream. */
  onOpen(): void;
  /** The connection ended; not called after `close()`. */
  onEnd(failure: Failure): void;
}

export interface Connection {
  /** Ends the connection without calling `onEnd`. */
  close(): void;
}

export type Transport = (attempt: Attempt, handlers: TransportHandlers) => Connection;

/** The failure an error response describes: `{"error":{"code","message"}}` when the server sent it. */
export async function failureFromResponse(response: Response): Promise<Failure> {
  if (response.type.startsWith("opaque")) return hidden(response.url);
  const status = response.status;
  const fallback: Failure = {
    code: `http_${status}`,
    message: `HTTP ${status}${response.statusText === "" ? "" : ` ${response.statusText}`}`,
    status,
  };
  let text: string;
  try {
    text = await response.text();
  } catch {
    return fallback;
  }
  try {
    const body: unknown = JSON.parse(text);
    if (typeof body === "object" && body !== null && "error" in body) {
      const error: unknown = body.error;
      if (typeof error === "object" && error !== null && "code" in error && typeof error.code === "string") {
        const message = "message" in error && typeof error.message === "string" ? error.message : fallback.message;
        return { code: error.code, message, status };
      }
    }
  } catch {
    // Not JSON: a proxy's page, for example.
  }
  return fallback;
}

/**
 * Why `fetch` threw before any answer. A browser throws the same TypeError for a server it
 * cannot reach and for an answer that CORS hides from the page; the same URL asked in
 * `no-cors` mode tells them apart, as only an answer that reached the browser is `opaque`.
 */
export async function failureFromThrow(fetchFn: typeof fetch, url: string, cause: unknown, signal: AbortSignal): Promise<Failure> {
  try {
    if ((await fetchFn(url, { mode: "no-cors", signal })).type === "opaque") return { ...hidden(url), cause };
  } catch {
    // Nothing answered.
  }
  return { code: "network", message: `cannot reach ${url}: ${describe(cause)}`, cause };
}

function hidden(url: string): Failure {
  const origin = (globalThis as { location?: Location }).location?.origin;
  return {
    code: "cors",
    message: `${url} answered, but the browser hid the answer from this page: most likely CORS, the server does not allow the origin ${origin}`,
  };
}

export function describe(cause: unknown): string {
  return cause instanceof Error ? cause.message : String(cause);
}
