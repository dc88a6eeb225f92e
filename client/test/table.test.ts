// `table` and `connect`'s `onSnapshot` against a fake Fjord on node:http that speaks the
// wire format of table endpoints (test/fake-fjord.ts), with Node's fetch and real timers: the
// snapshot then live records, tombstones, a drop in the middle of a snapshot, a resume the
// server cannot serve (a new snapshot replaces the rows) and one it can (the rows stay),
// rows without ids past the dedupe, a connection of a stream and a table endpoint, keys
// that are not text, records without a key, and `ready` when the table stops first. Then
// the EventSource transport, whose rows repeat the last id.

import { setTimeout as sleep } from "node:timers/promises";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import {
  connect,
  rowKey,
  table,
  type FjordError,
  type FjordRecord,
  type JsonValue,
  type SnapshotOf,
  type Table,
  type TableChange,
} from "../src/index.js";
import { FakeEventSource, settle } from "./scripted.js";
import { FakeFjord } from "./fake-fjord.js";

let server: FakeFjord;
let aborts: AbortController[] = [];

beforeEach(async () => {
  server = await new FakeFjord(["drivers"]).start();
  aborts = [];
});

afterEach(async () => {
  for (const abort of aborts) abort.abort();
  await server.stop();
});

function signal(): AbortSignal {
  const abort = new AbortController();
  aborts.push(abort);
  return abort.signal;
}

async function until(what: string, check: () => boolean, ms = 3000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** The values of a table's rows, by key. */
function values<V>(t: Table<V>): Map<string, unknown> {
  return new Map([...t.rows].map(([key, row]) => [key, row.value]));
}

interface Watched<V> {
  t: Table<V>;
  changes: TableChange<V>[];
  errors: FjordError[];
}

function watch<V = JsonValue>(options: Partial<Parameters<typeof table<V>>[0]> = {}): Watched<V> {
  const changes: TableChange<V>[] = [];
  const errors: FjordError[] = [];
  const t = table<V>({
    url: server.base,
    endpoint: "drivers",
    signal: signal(),
    onChange: (change) => changes.push(change),
    onError: (error) => errors.push(error),
    ...options,
  });
  return { t, changes, errors };
}

describe("table", () => {
  it("opens on the snapshot, in key order, then applies live records", async () => {
    server.write("drivers", "driver-2", { lat: 2 });
    server.write("drivers", "driver-1", { lat: 1 });
    server.write("drivers", "driver-3", { lat: 3 });
    server.write("drivers", "driver-1", { lat: 1.5 });
    const { t, changes, errors } = watch<{ lat: number }>();
    expect(t.rows.size).toBe(0);
    const rows = await t.ready;
    expect(rows).toBe(t.rows);
    expect([...rows.keys()]).toEqual(["driver-1", "driver-2", "driver-3"]);
    expect(values(t)).toEqual(server.rows("drivers"));
    // A row has as id the snapshot's: resuming after it starts after the snapshot.
    const snapshotId = t.lastEventId;
    expect(snapshotId).toBe("1004-0");
    expect(rows.get("driver-1")).toMatchObject({ endpoint: "drivers", id: snapshotId, key: "driver-1", offset: 3, value: { lat: 1.5 } });
    expect(changes).toEqual([{ type: "snapshot", rows: t.rows }]);

    const id = server.write("drivers", "driver-4", { lat: 4 });
    server.write("drivers", "driver-2", { lat: 2.5 });
    await until("two live records", () => changes.length === 3);
    expect(values(t)).toEqual(server.rows("drivers"));
    expect(changes.slice(1).map((c) => c.type === "upsert" && [c.key, c.row.value])).toEqual([
      ["driver-4", { lat: 4 }],
      ["driver-2", { lat: 2.5 }],
    ]);
    expect(t.rows.get("driver-4")?.id).toBe(id);
    expect(t.lastEventId).toBe("1006-0");
    expect(errors).toEqual([]);
    expect(server.requests).toEqual([{ url: "/v1/streams/drivers", lastEventId: undefined }]);
  });

  it("deletes the row of a tombstone, and a tombstone of an unknown key changes nothing", async () => {
    server.write("drivers", "driver-1", { lat: 1 });
    server.write("drivers", "driver-2", { lat: 2 });
    const { t, changes } = watch();
    await t.ready;
    server.write("drivers", "driver-1", null);
    server.write("drivers", "driver-9", null);
    server.write("drivers", "driver-3", { lat: 3 });
    await until("the upsert after the tombstones", () => t.rows.has("driver-3"));
    expect([...t.rows.keys()]).toEqual(["driver-2", "driver-3"]);
    expect(values(t)).toEqual(server.rows("drivers"));
    expect(changes.map((c) => [c.type, c.type === "snapshot" ? c.rows.size : c.key])).toEqual([
      ["snapshot", 2],
      ["delete", "driver-1"],
      ["upsert", "driver-3"],
    ]);
    // The deleted row is the one the table held.
    expect(changes[1]).toMatchObject({ type: "delete", row: { key: "driver-1", value: { lat: 1 } } });
  });

  it("a drop in the middle of a snapshot: the partial rows are dropped, and a fresh snapshot fills the Map", async () => {
    for (const n of [1, 2, 3, 4]) server.write("drivers", `driver-${n}`, { n });
    server.cutAfterRows = 2;
    const { t, changes, errors } = watch();
    await until("the reconnect", () => server.requests.length === 2 && server.open === 1);
    // The second connection resumes from the position before the snapshot, so gets a new one.
    expect(server.requests.map((r) => r.lastEventId)).toEqual([undefined, "0-0"]);
    await t.ready;
    expect(errors.map((e) => e.code)).toEqual(["network"]);
    expect(changes.map((c) => c.type)).toEqual(["snapshot"]);
    expect(values(t)).toEqual(server.rows("drivers"));
    expect(server.snapshotsSent.map((s) => s.keys.length)).toEqual([2, 4]);

    // Cut while the server is mid-way again: rows changed meanwhile replace the old ones.
    server.cutAfterRows = 1;
    server.cut();
    server.write("drivers", "driver-2", null);
    server.write("drivers", "driver-5", { n: 5 });
    server.trim(); // the client's position is gone: the resume needs a snapshot
    await until("the second snapshot", () => changes.length === 2);
    expect(server.snapshotsSent.map((s) => s.keys.length)).toEqual([2, 4, 1, 4]);
    // The resume from the old snapshot's id got a snapshot that was cut too: then from 0-0.
    expect(server.requests.slice(2).map((r) => r.lastEventId)).toEqual(["1004-0", "0-0"]);
    expect(t.rows.get("driver-1")?.id).toBe("1006-0");
    expect([...t.rows.keys()]).toEqual(["driver-1", "driver-3", "driver-4", "driver-5"]);
    expect(values(t)).toEqual(server.rows("drivers"));
  });

  it("a resume the server cannot serve: the new snapshot replaces every row, a key left out is gone", async () => {
    for (const n of [1, 2, 3]) server.write("drivers", `driver-${n}`, { n });
    const { t, changes } = watch();
    const rows = await t.ready;
    server.write("drivers", "driver-3", { n: 33 });
    await until("the live record", () => changes.length === 2);
    const resumeFrom = t.lastEventId;
    server.cut();
    // While the client is away: driver-1 deleted, driver-4 added, and the log trimmed.
    server.write("drivers", "driver-1", null);
    server.write("drivers", "driver-4", { n: 4 });
    server.trim();
    server.write("drivers", "driver-2", { n: 22 });
    await until("the second snapshot", () => changes.length === 3);
    expect(server.requests.map((r) => r.lastEventId)).toEqual([undefined, resumeFrom]);
    expect(changes.map((c) => c.type)).toEqual(["snapshot", "upsert", "snapshot"]);
    expect(t.rows).toBe(rows); // the same Map, changed in place
    expect([...t.rows.keys()]).toEqual(["driver-2", "driver-3", "driver-4"]);
    expect(values(t)).toEqual(server.rows("drivers"));
    // Live again after it.
    server.write("drivers", "driver-4", null);
    await until("the tombstone", () => !t.rows.has("driver-4"));
    expect(values(t)).toEqual(server.rows("drivers"));
  });

  it("a resume the server can serve brings only the missed records: the Map stays", async () => {
    for (const n of [1, 2, 3]) server.write("drivers", `driver-${n}`, { n });
    const { t, changes } = watch();
    const rows = await t.ready;
    const resumeFrom = t.lastEventId;
    server.cut();
    server.write("drivers", "driver-1", null);
    server.write("drivers", "driver-2", { n: 22 });
    server.write("drivers", "driver-4", { n: 4 });
    await until("the missed records", () => changes.length === 4);
    expect(server.requests.map((r) => r.lastEventId)).toEqual([undefined, resumeFrom]);
    expect(server.snapshotsSent.length).toBe(1);
    expect(changes.map((c) => c.type)).toEqual(["snapshot", "delete", "upsert", "upsert"]);
    expect(t.rows).toBe(rows);
    expect([...t.rows.keys()]).toEqual(["driver-2", "driver-3", "driver-4"]);
    expect(values(t)).toEqual(server.rows("drivers"));
    expect(t.lastEventId).toBe("1006-0");
  });

  it("takes every row though none has an id, and still drops a live record seen twice", async () => {
    for (let n = 0; n < 50; n++) server.write("drivers", `driver-${String(n).padStart(2, "0")}`, { n });
    const { t, changes, errors } = watch();
    await t.ready;
    expect(t.rows.size).toBe(50);
    expect(errors).toEqual([]);
    const resumeFrom = t.lastEventId;
    server.write("drivers", "driver-00", { n: 100 });
    await until("the live record", () => changes.length === 2);
    // The connection drops, and the resume from the snapshot's id sends that record again.
    server.cut();
    await until("the resume", () => server.requests.length === 2 && server.open === 1);
    expect(server.requests[1]?.lastEventId).toBe("1051-0");
    expect(resumeFrom).toBe("1050-0");
    server.write("drivers", "driver-01", { n: 101 });
    await until("the next record", () => changes.length === 3);
    expect(changes.map((c) => c.type)).toEqual(["snapshot", "upsert", "upsert"]);
    expect(values(t)).toEqual(server.rows("drivers"));
  });

  it("keeps its rows with `keys`, and passes records without a key to onRecord", async () => {
    server.write("drivers", "driver-1", { n: 1 });
    server.write("drivers", "driver-2", { n: 2 });
    const keyless: FjordRecord[] = [];
    const { t } = watch({ keys: ["driver-2"], onRecord: (record) => keyless.push(record) });
    await t.ready;
    expect(server.requests[0]?.url).toBe("/v1/streams/drivers?key=driver-2");
    expect([...t.rows.keys()]).toEqual(["driver-2"]);
    const { t: all, changes } = watch({ onRecord: (record) => keyless.push(record) });
    await all.ready;
    server.write("drivers", null, { note: "no key" });
    server.write("drivers", "driver-3", { n: 3 });
    await until("driver-3", () => all.rows.has("driver-3"));
    expect(keyless.map((r) => r.value)).toEqual([{ note: "no key" }]);
    expect(changes.map((c) => c.type)).toEqual(["snapshot", "upsert"]);
    expect(all.rows.size).toBe(3);
  });

  it("keys rows that are not text by their JSON", async () => {
    server.write("drivers", { base64: "/w==" }, { bytes: true });
    server.write("drivers", { id: 7, region: "oslo" }, { avro: true });
    const { t } = watch();
    await t.ready;
    expect(rowKey({ base64: "/w==" })).toBe('{"base64":"/w=="}');
    expect(rowKey("driver-1")).toBe("driver-1");
    expect(t.rows.get(rowKey({ base64: "/w==" }))?.value).toEqual({ bytes: true });
    expect(t.rows.get(rowKey({ id: 7, region: "oslo" }))?.value).toEqual({ avro: true });
    server.write("drivers", { base64: "/w==" }, null);
    await until("the tombstone", () => t.rows.size === 1);
  });

  it("ready rejects when the table stops before its snapshot", async () => {
    const abort = new AbortController();
    abort.abort();
    const t = table({ url: server.base, endpoint: "drivers", signal: abort.signal });
    await expect(t.ready).rejects.toMatchObject({ code: "closed", fatal: true });
    expect(t.status).toBe("closed");
    expect(server.requests).toEqual([]);

    const later = table({ url: server.base, endpoint: "drivers", signal: signal() });
    later.close();
    await expect(later.ready).rejects.toMatchObject({ code: "closed" });

    const refused = table({
      url: server.base,
      endpoint: "drivers",
      signal: signal(),
      fetch: async () => new Response(JSON.stringify({ error: { code: "unknown_endpoint", message: "no such endpoint" } }), { status: 404 }),
    });
    await expect(refused.ready).rejects.toMatchObject({ code: "unknown_endpoint", status: 404, fatal: true });
    // After the snapshot, closing does not reject what already resolved.
    const { t: done } = watch();
    await done.ready;
    done.close();
    await expect(done.ready).resolves.toBe(done.rows);
  });
});

describe("connect: onSnapshot", () => {
  it("one connection of a stream endpoint and a table endpoint: composite ids, snapshot and records", async () => {
    server.write("drivers", "driver-1", { n: 1 });
    server.write("drivers", "driver-2", { n: 2 });
    server.write("orders", "order-1", { status: "placed" }); // before the connection: not sent
    const snapshots: SnapshotOf<{ orders: JsonValue; drivers: JsonValue }>[] = [];
    const records: FjordRecord[] = [];
    const sub = connect<{ orders: JsonValue; drivers: JsonValue }>({
      url: server.base,
      endpoints: ["orders", "drivers"],
      signal: signal(),
      onSnapshot: (snapshot) => snapshots.push(snapshot),
      onRecord: (record) => records.push(record),
    });
    await until("the snapshot", () => snapshots.length === 1);
    expect(server.requests[0]?.url).toBe("/v1/streams?endpoint=orders&endpoint=drivers");
    const [snapshot] = snapshots;
    expect(snapshot?.endpoint).toBe("drivers");
    expect(snapshot?.id).toBe("1003-0_1003-0");
    expect(snapshot?.rows.map((r) => [r.endpoint, r.key, r.id])).toEqual([
      ["drivers", "driver-1", "1003-0_1003-0"],
      ["drivers", "driver-2", "1003-0_1003-0"],
    ]);
    expect(sub.lastEventId).toBe("1003-0_1003-0");

    server.write("orders", "order-2", { status: "placed" });
    server.write("drivers", "driver-1", null);
    await until("two records", () => records.length === 2);
    expect(records.map((r) => [r.endpoint, r.id, r.value])).toEqual([
      ["orders", "1004-0_1003-0", { status: "placed" }],
      ["drivers", "1004-0_1005-0", null],
    ]);
    // A resume within the log: no snapshot, the missed records of both endpoints.
    server.cut();
    server.write("drivers", "driver-3", { n: 3 });
    server.write("orders", "order-3", { status: "placed" });
    await until("the missed records", () => records.length === 4);
    expect(server.requests[1]?.lastEventId).toBe("1004-0_1005-0");
    expect(snapshots.length).toBe(1);
    expect(records.slice(2).map((r) => [r.endpoint, r.id])).toEqual([
      ["drivers", "1004-0_1006-0"],
      ["orders", "1007-0_1006-0"],
    ]);
    // A resume from before the log: a new snapshot of the table; orders go on.
    server.cut();
    server.write("orders", "order-4", { status: "placed" });
    server.trim();
    await until("the second snapshot", () => snapshots.length === 2);
    expect(snapshots[1]?.rows.map((r) => r.key)).toEqual(["driver-2", "driver-3"]);
    expect(snapshots[1]?.id).toBe("1008-0_1008-0");
  });

  it("without onSnapshot the rows are dropped, and only live records reach onRecord", async () => {
    server.write("drivers", "driver-1", { n: 1 });
    const records: FjordRecord[] = [];
    const errors: FjordError[] = [];
    connect({
      url: server.base,
      endpoints: "drivers",
      signal: signal(),
      onRecord: (record) => records.push(record),
      onError: (error) => errors.push(error),
    });
    await until("the connection", () => server.open === 1);
    server.write("drivers", "driver-2", { n: 2 });
    await until("the live record", () => records.length === 1);
    expect(records[0]?.key).toBe("driver-2");
    expect(errors).toEqual([]);
  });
});

describe("table over EventSource", () => {
  it("takes every event of an open snapshot as a row, though each repeats the last id", async () => {
    FakeEventSource.instances = [];
    const stop = new AbortController();
    const changes: TableChange[] = [];
    const t = table({
      url: "https://fjord.test",
      endpoint: "drivers",
      transport: "eventsource",
      EventSource: FakeEventSource as unknown as typeof EventSource,
      signal: stop.signal,
      onChange: (change) => changes.push(change),
    });
    await settle();
    const source = FakeEventSource.instances[0];
    if (source === undefined) throw new Error("no EventSource");
    expect(source.url).toBe("https://fjord.test/v1/streams/drivers");
    source.open();
    const row = (key: string, n: number): string => JSON.stringify({ topic: "drivers", partition: 0, offset: n, key, timestamp: null, headers: {}, value: { n } });
    source.emit("fjord.snapshot_start", '{"endpoint":"drivers"}', "0-0");
    for (const n of [1, 2, 3]) source.emit("drivers", row(`driver-${n}`, n), "0-0");
    source.emit("fjord.snapshot_end", '{"endpoint":"drivers"}', "9-0");
    const rows = await t.ready;
    expect([...rows.keys()]).toEqual(["driver-1", "driver-2", "driver-3"]);
    expect(t.lastEventId).toBe("9-0");
    source.emit("drivers", row("driver-1", 10), "10-0");
    source.emit("drivers", row("driver-1", 10), "10-0"); // seen: dropped
    expect(changes.map((c) => c.type)).toEqual(["snapshot", "upsert"]);
    expect(t.rows.get("driver-1")?.value).toEqual({ n: 10 });
    stop.abort();
    expect(source.closed).toBe(true);
  });
});
