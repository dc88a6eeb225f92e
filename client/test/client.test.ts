// `connect` with the fetch transport against scripted streams: delivery, resume with
// Last-Event-ID, backoff from `retry:`, dedupe, tokens, fatal and retryable errors, reserved
// events, close, the idle watchdog, and `filter` and `fields`. Only setTimeout and Date are faked.

import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { connect, type ConnectOptions, type FjordError, type FjordRecord, type GapInfo, type Notice, type Status, type StatusInfo, type Subscription, type TokenRequest } from "../src/index.js";
import { recordEvent, ScriptedFetch, settle } from "./scripted.js";

interface Harness {
  server: ScriptedFetch;
  sub: Subscription;
  records: FjordRecord[];
  errors: FjordError[];
  statuses: [Status, StatusInfo][];
  gaps: GapInfo[];
  tokens: TokenRequest[];
}

function start(options: Partial<ConnectOptions> = {}): Harness {
  const server = new ScriptedFetch();
  const h: Omit<Harness, "sub"> = { server, records: [], errors: [], statuses: [], gaps: [], tokens: [] };
  const sub = connect({
    url: "http://fjord.test/",
    endpoints: "orders",
    fetch: server.fetch,
    getToken: (request) => {
      h.tokens.push(request);
      return `token-${h.tokens.length}`;
    },
    onRecord: (record) => h.records.push(record),
    onError: (error) => h.errors.push(error),
    onStatus: (status, info) => h.statuses.push([status, info]),
    onGap: (gap) => h.gaps.push(gap),
    ...options,
  });
  return { ...h, sub };
}

beforeEach(() => {
  vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "Date"] });
  vi.spyOn(Math, "random").mockReturnValue(1); // the full backoff delay, no jitter
});

afterEach(() => {
  vi.useRealTimers();
  vi.restoreAllMocks();
});

describe("connect (fetch transport)", () => {
  it("streams records as typed envelopes, with the token in Authorization", async () => {
    const h = start({ keys: ["order-17", "a b"] });
    const call = await h.server.next();
    expect(call.url).toBe("http://fjord.test/v1/streams/orders?key=order-17&key=a+b");
    expect(call.header("authorization")).toBe("Bearer token-1");
    expect(call.header("accept")).toBe("text/event-stream");
    expect(call.header("last-event-id")).toBeNull();
    const stream = call.open();
    stream.push("retry: 2000\nid: 100-0\n\n");
    stream.push(
      recordEvent("orders", "101-0", {
        partition: 3,
        offset: 1042,
        key: "order-17",
        timestamp: 1764000000000,
        headers: { source: "web", dup: ["a", "b"] },
        value: { status: "placed" },
      }),
    );
    await settle();
    expect(h.records).toEqual([
      {
        endpoint: "orders",
        id: "101-0",
        topic: "orders",
        partition: 3,
        offset: 1042,
        key: "order-17",
        timestamp: 1764000000000,
        headers: { source: "web", dup: ["a", "b"] },
        value: { status: "placed" },
      },
    ]);
    expect(h.sub.lastEventId).toBe("101-0");
    expect(h.sub.status).toBe("open");
    expect(h.statuses.map(([s, i]) => `${s}:${i.reason}`)).toEqual(["connecting:start", "open:opened"]);
    expect(h.tokens).toEqual([{ reason: "connect" }]);
    h.sub.close();
  });

  it("asks for several endpoints on one connection", async () => {
    const h = start({ endpoints: ["orders", "drivers"] });
    const call = await h.server.next();
    expect(call.url).toBe("http://fjord.test/v1/streams?endpoint=orders&endpoint=drivers");
    const stream = call.open();
    stream.push(recordEvent("drivers", "1-0_2-0") + recordEvent("orders", "3-0_2-0"));
    await settle();
    expect(h.records.map((r) => [r.endpoint, r.id])).toEqual([
      ["drivers", "1-0_2-0"],
      ["orders", "3-0_2-0"],
    ]);
    h.sub.close();
  });

  it("resumes after a drop with Last-Event-ID and a fresh token", async () => {
    const h = start();
    const first = (await h.server.next()).open();
    first.push("retry: 2000\nid: 1-0\n\n" + recordEvent("orders", "2-0"));
    await settle();
    first.end();
    await settle();
    expect(h.sub.status).toBe("reconnecting");
    expect(h.errors.map((e) => [e.code, e.fatal])).toEqual([["stream_ended", false]]);
    await vi.advanceTimersByTimeAsync(2000);
    const second = await h.server.next();
    expect(second.header("last-event-id")).toBe("2-0");
    expect(second.header("authorization")).toBe("Bearer token-2");
    expect(h.tokens.map((t) => t.reason)).toEqual(["connect", "reconnect"]);
    second.open().push(recordEvent("orders", "3-0"));
    await settle();
    expect(h.records.map((r) => r.id)).toEqual(["2-0", "3-0"]);
    expect(h.statuses.map(([s]) => s)).toEqual(["connecting", "open", "reconnecting", "open"]);
    h.sub.close();
  });

  it("resumes from the start position of an id-only block when no record came", async () => {
    const h = start();
    const first = (await h.server.next()).open();
    first.push("retry: 100\nid: 42-0\n\n");
    await settle();
    first.fail(new TypeError("socket hang up"));
    await settle();
    expect(h.errors.map((e) => e.code)).toEqual(["network"]);
    await vi.advanceTimersByTimeAsync(100);
    expect((await h.server.next()).header("last-event-id")).toBe("42-0");
    h.sub.close();
  });

  it("starts from the lastEventId option", async () => {
    const h = start({ lastEventId: "7-0" });
    expect((await h.server.next()).header("last-event-id")).toBe("7-0");
    expect(h.sub.lastEventId).toBe("7-0");
    h.sub.close();
  });

  it("backs off exponentially from the server's retry, capped, with jitter", async () => {
    const h = start({ maxRetryMs: 12_000 });
    const first = (await h.server.next()).open();
    first.push("retry: 3000\n\n");
    await settle();
    first.end();
    await settle();
    const delays = [3000, 6000, 12_000, 12_000];
    for (const delay of delays) {
      await vi.advanceTimersByTimeAsync(delay - 1);
      expect(h.server.calls.length).toBe(h.statuses.filter(([s]) => s === "reconnecting").length);
      await vi.advanceTimersByTimeAsync(1);
      (await h.server.next()).networkError();
      await settle();
    }
    expect(h.statuses.filter(([s]) => s === "reconnecting").map(([, i]) => i.delayMs)).toEqual([...delays, 12_000]);
    // Jitter: with Math.random() = 0 the delay is half of it.
    vi.mocked(Math.random).mockReturnValue(0);
    await vi.advanceTimersByTimeAsync(12_000);
    (await h.server.next()).networkError();
    await settle();
    expect(h.statuses.at(-1)?.[1].delayMs).toBe(6000);
    h.sub.close();
  });

  it("starts the backoff over after a record arrived", async () => {
    const h = start();
    (await h.server.next()).networkError();
    await settle();
    await vi.advanceTimersByTimeAsync(2000);
    (await h.server.next()).networkError();
    await settle();
    expect(h.statuses.at(-1)?.[1].delayMs).toBe(4000);
    await vi.advanceTimersByTimeAsync(4000);
    const stream = (await h.server.next()).open();
    stream.push(recordEvent("orders", "1-0"));
    await settle();
    stream.end();
    await settle();
    expect(h.statuses.at(-1)?.[1].delayMs).toBe(2000);
    h.sub.close();
  });

  it("never delivers the same id twice, within a stream or across a resume", async () => {
    const h = start();
    const first = (await h.server.next()).open();
    first.push(recordEvent("orders", "1-0") + recordEvent("orders", "2-0") + recordEvent("orders", "2-0"));
    await settle();
    first.end();
    await settle();
    await vi.advanceTimersByTimeAsync(2000);
    const second = (await h.server.next()).open();
    // A server that replays from before the resume id.
    second.push(recordEvent("orders", "1-0") + recordEvent("orders", "2-0") + recordEvent("orders", "3-0"));
    await settle();
    expect(h.records.map((r) => r.id)).toEqual(["1-0", "2-0", "3-0"]);
    expect(h.sub.lastEventId).toBe("3-0");
    h.sub.close();
  });

  it("on fjord.expired asks for a fresh token and reconnects at once", async () => {
    const h = start();
    const call = await h.server.next();
    const stream = call.open();
    stream.push(recordEvent("orders", "1-0") + "event: fjord.expired\ndata: {}\n\n" + recordEvent("orders", "9-0"));
    await settle();
    expect(call.aborted).toBe(true);
    expect(h.records.map((r) => r.id)).toEqual(["1-0"]);
    const next = await h.server.next();
    expect(h.tokens.map((t) => t.reason)).toEqual(["connect", "expired"]);
    expect(next.header("authorization")).toBe("Bearer token-2");
    expect(next.header("last-event-id")).toBe("1-0");
    expect(h.statuses.at(-1)).toEqual(["reconnecting", { reason: "expired", delayMs: 0 }]);
    expect(h.errors).toEqual([]);
    h.sub.close();
  });

  it("on fjord.shutdown reconnects at once, without backoff", async () => {
    const h = start();
    const stream = (await h.server.next()).open();
    stream.push("retry: 5000\n\n" + recordEvent("orders", "1-0") + "event: fjord.shutdown\ndata: {}\n\n");
    await settle();
    const next = await h.server.next();
    expect(next.header("last-event-id")).toBe("1-0");
    expect(h.statuses.at(-1)).toEqual(["reconnecting", { reason: "shutdown", delayMs: 0 }]);
    h.sub.close();
  });

  it("surfaces fjord.gap and goes on", async () => {
    const h = start({ lastEventId: "1-0" });
    const stream = (await h.server.next()).open();
    const gap = { endpoint: "orders", last_event_id: "1-0", oldest_id: "50-0", message: "records were trimmed" };
    stream.push(`event: fjord.gap\ndata: ${JSON.stringify(gap)}\n\n` + recordEvent("orders", "50-0"));
    await settle();
    expect(h.gaps).toEqual([gap]);
    expect(h.records.map((r) => r.id)).toEqual(["50-0"]);
    expect(h.sub.status).toBe("open");
    h.sub.close();
  });

  it("retries a 401 once with a fresh token, then stops with the server's reason", async () => {
    const h = start();
    (await h.server.next()).error(401, "token_expired", "the token expired at 12:00");
    await settle();
    const second = await h.server.next();
    expect(h.tokens.map((t) => t.reason)).toEqual(["connect", "refused"]);
    expect(second.header("authorization")).toBe("Bearer token-2");
    second.error(401, "token_invalid", "bad signature");
    await settle();
    expect(h.errors.map((e) => [e.status, e.code, e.message, e.fatal])).toEqual([
      [401, "token_expired", "the token expired at 12:00", false],
      [401, "token_invalid", "bad signature", true],
    ]);
    expect(h.errors[1]?.name).toBe("FjordError");
    expect(h.sub.status).toBe("closed");
    expect(h.statuses.at(-1)).toEqual(["closed", { reason: "fatal" }]);
    await vi.advanceTimersByTimeAsync(60_000);
    expect(h.server.calls.length).toBe(2);
  });

  it("goes on when the fresh token after a 403 is accepted", async () => {
    const h = start();
    (await h.server.next()).error(403, "forbidden");
    await settle();
    (await h.server.next()).open().push(recordEvent("orders", "1-0"));
    await settle();
    expect(h.records.length).toBe(1);
    expect(h.sub.status).toBe("open");
    h.sub.close();
  });

  it.each([
    [404, "unknown_endpoint"],
    [400, "bad_query"],
  ])("stops at once on %i", async (status, code) => {
    const h = start();
    (await h.server.next()).error(status, code);
    await settle();
    expect(h.errors.map((e) => [e.status, e.code, e.fatal])).toEqual([[status, code, true]]);
    expect(h.sub.status).toBe("closed");
    await vi.advanceTimersByTimeAsync(60_000);
    expect(h.server.calls.length).toBe(1);
  });

  it("retries 503 and responses that are not JSON", async () => {
    const h = start();
    (await h.server.next()).error(503, "not_ready");
    await settle();
    await vi.advanceTimersByTimeAsync(2000);
    const second = await h.server.next();
    expect(second).toBeDefined();
    expect(h.errors.map((e) => [e.status, e.code, e.fatal])).toEqual([[503, "not_ready", false]]);
    h.sub.close();
  });

  it("stops when the answer is not an event stream", async () => {
    const h = start();
    (await h.server.next()).open("text/html");
    await settle();
    expect(h.errors.map((e) => [e.code, e.fatal])).toEqual([["bad_content_type", true]]);
    expect(h.sub.status).toBe("closed");
  });

  it("retries when getToken fails", async () => {
    let calls = 0;
    const h = start({
      getToken: () => {
        calls++;
        if (calls === 1) return Promise.reject(new Error("auth server down"));
        return "ok";
      },
    });
    await settle();
    expect(h.errors.map((e) => e.code)).toEqual(["token_error"]);
    expect(h.server.calls.length).toBe(0);
    await vi.advanceTimersByTimeAsync(2000);
    expect((await h.server.next()).header("authorization")).toBe("Bearer ok");
    h.sub.close();
  });

  it("sends no Authorization without getToken", async () => {
    const h = start({ getToken: undefined });
    expect((await h.server.next()).header("authorization")).toBeNull();
    h.sub.close();
  });

  it("drops a silent connection after the idle timeout and resumes", async () => {
    const h = start({ idleTimeoutMs: 30_000 });
    const call = await h.server.next();
    const stream = call.open();
    stream.push("id: 5-0\n\n");
    await settle();
    await vi.advanceTimersByTimeAsync(20_000);
    stream.push(": heartbeat\n\n");
    await settle();
    await vi.advanceTimersByTimeAsync(20_000);
    expect(call.aborted).toBe(false);
    await vi.advanceTimersByTimeAsync(10_000);
    expect(call.aborted).toBe(true);
    expect(h.errors.map((e) => e.code)).toEqual(["idle_timeout"]);
    // Open for 30 s and more: healthy, so the backoff starts over at the retry.
    await vi.advanceTimersByTimeAsync(2000);
    expect((await h.server.next()).header("last-event-id")).toBe("5-0");
    h.sub.close();
  });

  it("close() aborts the stream and stops for good", async () => {
    const h = start();
    const call = await h.server.next();
    call.open().push(recordEvent("orders", "1-0"));
    await settle();
    h.sub.close();
    h.sub.close();
    await settle();
    expect(call.aborted).toBe(true);
    expect(h.statuses.at(-1)).toEqual(["closed", { reason: "closed" }]);
    expect(h.statuses.filter(([s]) => s === "closed").length).toBe(1);
    await vi.advanceTimersByTimeAsync(60_000);
    expect(h.server.calls.length).toBe(1);
    expect(h.errors).toEqual([]);
  });

  it("close() during a pending getToken opens nothing", async () => {
    let release: (token: string) => void = () => undefined;
    const h = start({ getToken: () => new Promise<string>((resolve) => (release = resolve)) });
    h.sub.close();
    release("late");
    await settle();
    expect(h.server.calls.length).toBe(0);
  });

  it("reports a record whose data is not an envelope and goes on", async () => {
    const h = start();
    const stream = (await h.server.next()).open();
    stream.push("id: 1-0\nevent: orders\ndata: not json\n\n" + recordEvent("orders", "2-0"));
    await settle();
    expect(h.errors.map((e) => [e.code, e.fatal])).toEqual([["bad_event", false]]);
    expect(h.records.map((r) => r.id)).toEqual(["2-0"]);
    h.sub.close();
  });

  it("decodes UTF-8 split between chunks", async () => {
    const h = start();
    const stream = (await h.server.next()).open();
    const bytes = new TextEncoder().encode(recordEvent("orders", "1-0", { value: "smørrebrød ☕" }));
    const cut = bytes.indexOf(0xc3) + 1; // inside the two bytes of "ø"
    stream.pushBytes(bytes.slice(0, cut));
    stream.pushBytes(bytes.slice(cut));
    await settle();
    expect(h.records[0]?.value).toBe("smørrebrød ☕");
    h.sub.close();
  });
});

describe("connect: abort, stale ids, unreadable refusals, waking up", () => {
  it("an aborted signal closes the stream and stops reconnects", async () => {
    const controller = new AbortController();
    const h = start({ signal: controller.signal });
    const call = await h.server.next();
    call.open().push(recordEvent("orders", "1-0"));
    await settle();
    call.stream?.end();
    await settle();
    expect(h.sub.status).toBe("reconnecting");
    controller.abort();
    expect(h.sub.status).toBe("closed");
    expect(h.statuses.at(-1)).toEqual(["closed", { reason: "closed" }]);
    await vi.advanceTimersByTimeAsync(60_000);
    expect(h.server.calls.length).toBe(1);
    // And during a stream: the request is aborted.
    const again = new AbortController();
    const h2 = start({ signal: again.signal });
    const live = await h2.server.next();
    live.open();
    await settle();
    again.abort();
    expect(live.aborted).toBe(true);
    expect(h2.sub.status).toBe("closed");
    expect(h2.errors).toEqual([]);
  });

  it("a signal aborted before connect opens nothing", async () => {
    const h = start({ signal: AbortSignal.abort() });
    await settle();
    expect(h.server.calls.length).toBe(0);
    expect(h.statuses.map(([s, i]) => `${s}:${i.reason}`)).toEqual(["connecting:start", "closed:closed"]);
  });

  it("drops a resume id the server refuses, tells onNotice, and goes on live", async () => {
    const notices: Notice[] = [];
    const h = start({ lastEventId: "1-0_2-0", onNotice: (notice) => notices.push(notice) });
    const first = await h.server.next();
    expect(first.header("last-event-id")).toBe("1-0_2-0");
    const reason = "last event id has 2 positions, but this stream has 1 endpoints";
    first.error(400, "bad_last_event_id", reason);
    await settle();
    const second = await h.server.next();
    expect(second.header("last-event-id")).toBeNull();
    expect(notices).toEqual([{ code: "stale_id", message: reason, lastEventId: "1-0_2-0" }]);
    expect(h.errors).toEqual([]);
    expect(h.statuses.at(-1)).toEqual(["reconnecting", { reason: "stale_id", delayMs: 0 }]);
    second.open().push(recordEvent("orders", "5-0"));
    await settle();
    expect(h.records.map((r) => r.id)).toEqual(["5-0"]);
    expect(h.sub.status).toBe("open");
    h.sub.close();
  });

  it("stops on bad_last_event_id when it sent no id (a server bug, not a stale id)", async () => {
    const h = start();
    (await h.server.next()).error(400, "bad_last_event_id");
    await settle();
    expect(h.errors.map((e) => [e.code, e.fatal])).toEqual([["bad_last_event_id", true]]);
  });

  it("tells a hidden answer (CORS) from a server that cannot be reached, and retries both", async () => {
    const h = start();
    (await h.server.next()).networkError();
    await settle();
    expect(h.server.probes).toEqual(["http://fjord.test/v1/streams/orders"]);
    h.server.probeAnswer = "opaque";
    await vi.advanceTimersByTimeAsync(2000);
    (await h.server.next()).networkError();
    await settle();
    expect(h.errors.map((e) => [e.code, e.fatal])).toEqual([
      ["network", false],
      ["cors", false],
    ]);
    expect(h.errors[0]?.message).toMatch(/^cannot reach http:\/\/fjord\.test\/v1\/streams\/orders: fetch failed/);
    expect(h.errors[1]?.message).toMatch(/answered, but the browser hid the answer from this page: most likely CORS/);
    expect(h.sub.status).toBe("reconnecting");
    h.sub.close();
  });

  it("reports an opaque answer as CORS", async () => {
    const opaque = { type: "opaque", status: 0, ok: false, url: "" } as Response;
    const h = start({ fetch: () => Promise.resolve(opaque) });
    await settle();
    expect(h.errors.map((e) => [e.code, e.status, e.fatal])).toEqual([["cors", undefined, false]]);
    h.sub.close();
  });

  it("a server that answers 5xx is down, not CORS", async () => {
    const h = start();
    (await h.server.next()).error(502, "http_502");
    await settle();
    expect(h.server.probes).toEqual([]);
    expect(h.errors.map((e) => [e.code, e.status])).toEqual([["http_502", 502]]);
    h.sub.close();
  });

  describe("waking up", () => {
    let visibility: DocumentVisibilityState;
    const doc = new EventTarget();
    const win = new EventTarget();

    beforeEach(() => {
      visibility = "visible";
      Object.defineProperty(doc, "visibilityState", { get: () => visibility, configurable: true });
      vi.stubGlobal("document", doc);
      vi.stubGlobal("addEventListener", win.addEventListener.bind(win));
      vi.stubGlobal("removeEventListener", win.removeEventListener.bind(win));
    });

    afterEach(() => {
      vi.unstubAllGlobals();
    });

    async function waitingLong(): Promise<Harness> {
      const h = start({ maxRetryMs: 60_000 });
      const stream = (await h.server.next()).open();
      stream.push("retry: 20000\nid: 3-0\n\n");
      await settle();
      stream.end();
      await settle();
      expect(h.statuses.at(-1)).toEqual(["reconnecting", { reason: "error", delayMs: 20_000 }]);
      return h;
    }

    it("the online event cuts the backoff short", async () => {
      const h = await waitingLong();
      win.dispatchEvent(new Event("online"));
      const next = await h.server.next();
      expect(next.header("last-event-id")).toBe("3-0");
      expect(h.statuses.at(-1)).toEqual(["reconnecting", { reason: "online", delayMs: 0 }]);
      // Open again: online leaves a live connection alone.
      next.open();
      await settle();
      win.dispatchEvent(new Event("online"));
      await settle();
      expect(h.server.calls.length).toBe(2);
      expect(next.aborted).toBe(false);
      h.sub.close();
    });

    it("a page shown again reconnects at once; while hidden it waits", async () => {
      const h = await waitingLong();
      visibility = "hidden";
      doc.dispatchEvent(new Event("visibilitychange"));
      await settle();
      expect(h.server.calls.length).toBe(1);
      visibility = "visible";
      doc.dispatchEvent(new Event("visibilitychange"));
      expect((await h.server.next()).header("last-event-id")).toBe("3-0");
      expect(h.statuses.at(-1)).toEqual(["reconnecting", { reason: "visible", delayMs: 0 }]);
      // The backoff timer it replaced does not fire a second attempt.
      await vi.advanceTimersByTimeAsync(30_000);
      expect(h.server.calls.length).toBe(2);
      h.sub.close();
    });

    it("close() removes its listeners", async () => {
      const h = await waitingLong();
      h.sub.close();
      win.dispatchEvent(new Event("online"));
      doc.dispatchEvent(new Event("visibilitychange"));
      await settle();
      expect(h.server.calls.length).toBe(1);
    });
  });
});

describe("connect: filter and fields", () => {
  /** The query of a call as the server reads it. */
  const query = (url: string) => [...new URL(url).searchParams];
  const placed = 'value.status == "placed" && value.total_cents >= 1000';

  it("sends one filter and one projection for a single endpoint", async () => {
    const h = start({ filter: placed, fields: ["id", "total_cents", "customer.name"] });
    const call = await h.server.next();
    expect(call.url).toBe(
      "http://fjord.test/v1/streams/orders?filter=value.status+%3D%3D+%22placed%22+%26%26+value.total_cents+%3E%3D+1000" +
        "&fields=id%2Ctotal_cents%2Ccustomer.name",
    );
    expect(query(call.url)).toEqual([
      ["filter", placed],
      ["fields", "id,total_cents,customer.name"],
    ]);
    h.sub.close();
  });

  it("sends them for every endpoint of several, or per endpoint", async () => {
    const all = start({ endpoints: ["orders", "drivers"], filter: "has(value.id)", fields: ["id"] });
    expect(query((await all.server.next()).url)).toEqual([
      ["endpoint", "orders"],
      ["endpoint", "drivers"],
      ["filter", "has(value.id)"],
      ["fields", "id"],
    ]);
    all.sub.close();
    const each = start({
      endpoints: ["orders", "drivers"],
      filter: { orders: placed, drivers: 'key.startsWith("eu-")' },
      fields: { orders: ["id", '["total cents"]'], drivers: [] },
      keys: ["k"],
    });
    expect(query((await each.server.next()).url)).toEqual([
      ["endpoint", "orders"],
      ["endpoint", "drivers"],
      ["key", "k"],
      ["filter.orders", placed],
      ["filter.drivers", 'key.startsWith("eu-")'],
      ["fields.orders", 'id,["total cents"]'],
    ]);
    each.sub.close();
  });

  it("sends no parameter for an empty filter or list", async () => {
    for (const options of [
      { filter: "", fields: [] },
      { filter: {}, fields: {} },
      { filter: { orders: "" }, fields: { orders: [] } },
      { filter: { orders: undefined }, fields: { orders: undefined } },
    ]) {
      const h = start(options);
      expect((await h.server.next()).url).toBe("http://fjord.test/v1/streams/orders");
      h.sub.close();
    }
  });

  it("keeps them on every reconnect, whatever the caller changes meanwhile", async () => {
    const fields = ["id", "total_cents"];
    const filter = { orders: placed };
    const h = start({ filter, fields });
    const first = await h.server.next();
    const stream = first.open();
    stream.push("retry: 2000\n\n" + recordEvent("orders", "1-0", { value: { id: "o1", total_cents: 1250 } }));
    await settle();
    fields.push("customer");
    filter.orders = "true";
    stream.end();
    await settle();
    await vi.advanceTimersByTimeAsync(2000);
    const second = await h.server.next();
    expect(second.url).toBe(first.url);
    expect(second.header("last-event-id")).toBe("1-0");
    // And after fjord.expired, which reconnects at once.
    second.open().push("event: fjord.expired\ndata: {}\n\n");
    await settle();
    const third = await h.server.next();
    expect(third.url).toBe(first.url);
    expect(h.records.map((r) => r.value)).toEqual([{ id: "o1", total_cents: 1250 }]);
    h.sub.close();
  });

  it.each([
    ["bad_filter", "filter at column 24: expected ',' or ')' after an argument, found a string"],
    ["bad_fields", "fields at column 4: expected a name after '.'"],
  ])("stops at once on a 400 %s, with the server's message", async (code, message) => {
    const h = start({ filter: "value.a.startsWith(1 'x')", fields: ["id."] });
    (await h.server.next()).error(400, code, message);
    await settle();
    expect(h.errors.map((e) => [e.status, e.code, e.message, e.fatal])).toEqual([[400, code, message, true]]);
    expect(h.errors[0]?.name).toBe("FjordError");
    expect(h.sub.status).toBe("closed");
    expect(h.statuses.at(-1)).toEqual(["closed", { reason: "fatal" }]);
    expect(h.tokens.map((t) => t.reason)).toEqual(["connect"]);
    await vi.advanceTimersByTimeAsync(60_000);
    expect(h.server.calls.length).toBe(1);
  });

  it("throws a TypeError at connect for what is wrong before any request", () => {
    for (const [options, message] of [
      [{ filter: { drivers: "true" } }, /^connect: filter names "drivers", which is not one of the endpoints \["orders"\]$/],
      [{ fields: { orders: ["id"], driver: ["lat"] } }, /^connect: fields names "driver"/],
      [{ fields: ["id", ""] }, /^connect: fields has an empty path$/],
      [{ fields: { orders: [" "] } }, /^connect: fields\.orders has an empty path$/],
      // What only JavaScript callers can pass.
      [{ filter: ["true"] }, /^connect: filter is neither a string nor an object of endpoint names$/],
      [{ filter: { orders: 1 } }, /^connect: filter\.orders is not a string$/],
      [{ fields: "id,total_cents" }, /^connect: fields is neither a list of paths nor an object of endpoint names$/],
      [{ fields: { orders: "id" } }, /^connect: fields\.orders is not a list of paths$/],
    ] as [Partial<ConnectOptions>, RegExp][]) {
      const fetchFn = vi.fn<typeof fetch>();
      expect(() => start({ ...options, fetch: fetchFn })).toThrow(TypeError);
      expect(() => start({ ...options, fetch: fetchFn })).toThrow(message);
      expect(fetchFn).not.toHaveBeenCalled();
    }
  });
});
