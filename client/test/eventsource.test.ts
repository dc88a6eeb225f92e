// `connect` with `transport: 'eventsource'` against a fake EventSource: the URL carries the
// resume id and (when asked) the token; EventSource's own retries are cut short; a refused
// stream is probed with fetch to learn its status; `filter` and `fields` go on every URL.

import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { connect, type ConnectOptions, type EventSourceConstructor, type FjordError, type FjordRecord, type Notice, type Subscription } from "../src/index.js";
import { FakeEventSource, ScriptedFetch, settle } from "./scripted.js";

function start(options: Partial<ConnectOptions> = {}) {
  const server = new ScriptedFetch();
  const records: FjordRecord[] = [];
  const errors: FjordError[] = [];
  let tokens = 0;
  const sub: Subscription = connect({
    url: "https://fjord.test",
    endpoints: ["orders", "drivers"],
    transport: "eventsource",
    EventSource: FakeEventSource as unknown as EventSourceConstructor,
    fetch: server.fetch,
    getToken: () => `t${++tokens}`,
    onRecord: (record) => records.push(record),
    onError: (error) => errors.push(error),
    ...options,
  });
  return { server, records, errors, sub };
}

async function source(index: number): Promise<FakeEventSource> {
  await settle();
  const found = FakeEventSource.instances[index];
  if (found === undefined) throw new Error(`no EventSource #${index}`);
  return found;
}

const envelope = JSON.stringify({ topic: "t", partition: 0, offset: 1, key: "k", timestamp: null, headers: {}, value: 1 });

beforeEach(() => {
  FakeEventSource.instances = [];
  vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "Date"] });
  vi.spyOn(Math, "random").mockReturnValue(1);
});

afterEach(() => {
  vi.useRealTimers();
  vi.restoreAllMocks();
});

describe("connect (eventsource transport)", () => {
  it("keeps the token out of the URL unless asked, and resumes with last_event_id", async () => {
    const h = start({ lastEventId: "1-0_1-0", withCredentials: true });
    const first = await source(0);
    expect(first.url).toBe("https://fjord.test/v1/streams?endpoint=orders&endpoint=drivers&last_event_id=1-0_1-0");
    expect(first.init).toEqual({ withCredentials: true });
    first.open();
    first.emit("orders", envelope, "2-0_1-0");
    first.emit("drivers", envelope, "2-0_3-0");
    first.emit("drivers", envelope, "2-0_3-0");
    expect(h.records.map((r) => [r.endpoint, r.id])).toEqual([
      ["orders", "2-0_1-0"],
      ["drivers", "2-0_3-0"],
    ]);
    first.fail();
    expect(first.closed).toBe(true);
    expect(h.errors.map((e) => [e.code, e.fatal])).toEqual([["network", false]]);
    await vi.advanceTimersByTimeAsync(2000);
    const second = await source(1);
    expect(second.url).toContain("last_event_id=2-0_3-0");
    h.sub.close();
    expect(second.closed).toBe(true);
  });

  it("sends the token as access_token with tokenInQuery", async () => {
    const h = start({ tokenInQuery: true, endpoints: "orders" });
    expect((await source(0)).url).toBe("https://fjord.test/v1/streams/orders?access_token=t1");
    h.sub.close();
  });

  it("handles the reserved events", async () => {
    const gaps: unknown[] = [];
    const h = start({ onGap: (gap) => gaps.push(gap) });
    const first = await source(0);
    first.open();
    first.emit("fjord.gap", '{"endpoint":"orders","last_event_id":"1","oldest_id":"2","message":"m"}', "0-0_0-0");
    expect(gaps).toEqual([{ endpoint: "orders", last_event_id: "1", oldest_id: "2", message: "m" }]);
    first.emit("fjord.expired", "{}");
    expect(first.closed).toBe(true);
    expect((await source(1)).url).not.toContain("access_token");
    h.sub.close();
  });

  it("learns why a stream was refused by probing it with fetch", async () => {
    const h = start();
    (await source(0)).fail();
    const probe = await h.server.next();
    expect(probe.url).toBe("https://fjord.test/v1/streams?endpoint=orders&endpoint=drivers");
    probe.error(401, "token_missing", "no token in the request");
    await settle();
    (await source(1)).fail();
    (await h.server.next()).error(401, "token_missing", "no token in the request");
    await settle();
    expect(h.errors.map((e) => [e.status, e.code, e.fatal])).toEqual([
      [401, "token_missing", false],
      [401, "token_missing", true],
    ]);
    expect(h.sub.status).toBe("closed");
  });

  it("drops a resume id that the probe learns was refused, and goes on live", async () => {
    const notices: Notice[] = [];
    const h = start({ lastEventId: "1-0", onNotice: (notice) => notices.push(notice) });
    (await source(0)).fail();
    (await h.server.next()).error(400, "bad_last_event_id", "last event id has 1 positions, but this stream has 2 endpoints");
    await settle();
    expect(notices.map((n) => [n.code, n.lastEventId])).toEqual([["stale_id", "1-0"]]);
    expect((await source(1)).url).toBe("https://fjord.test/v1/streams?endpoint=orders&endpoint=drivers");
    expect(h.errors).toEqual([]);
    h.sub.close();
  });

  it("keeps filter and fields on every URL, the probe's too, and stops on bad_filter", async () => {
    const h = start({ filter: { drivers: "value.lat > 47" }, fields: ["id"] });
    const first = await source(0);
    const shape = "filter.drivers=value.lat+%3E+47&fields=id";
    expect(first.url).toBe(`https://fjord.test/v1/streams?endpoint=orders&endpoint=drivers&${shape}`);
    first.open();
    first.emit("orders", envelope, "2-0_1-0");
    first.fail();
    await vi.advanceTimersByTimeAsync(2000);
    const second = await source(1);
    expect(second.url).toBe(`https://fjord.test/v1/streams?endpoint=orders&endpoint=drivers&${shape}&last_event_id=2-0_1-0`);
    second.fail();
    const probe = await h.server.next();
    expect(probe.url).toBe(second.url);
    probe.error(400, "bad_filter", "filter.drivers at column 11: expected a value, found '>'");
    await settle();
    expect(h.errors.map((e) => [e.status, e.code, e.message, e.fatal])).toEqual([
      [undefined, "network", "the stream was interrupted", false],
      [400, "bad_filter", "filter.drivers at column 11: expected a value, found '>'", true],
    ]);
    expect(h.sub.status).toBe("closed");
  });
});
