// Record value types per endpoint: `connect<{ orders: Order; drivers: Driver }>` checks the
// endpoint names (in `endpoints`, `filter` and `fields`) and narrows `record.value` by
// `record.endpoint`; `table<Driver>` types its rows, changes and `ready`, and `onSnapshot`
// narrows by endpoint too. The assertions are checked by the type check of `npm test`; at
// run time the test opens and closes streams, and sees a misnamed endpoint refused.

import { describe, expect, expectTypeOf, it } from "vitest";
import { connect, table, type FjordRecord, type JsonValue, type RecordOf, type SnapshotOf, type TableChange } from "../src/index.js";
import { ScriptedFetch } from "./scripted.js";

interface Order {
  order_id: string;
  status: "placed" | "delivered";
}
interface Driver {
  driver_id: string;
  lat: number;
  lon: number;
}
type Demo = { orders: Order; drivers: Driver };

const fetch = new ScriptedFetch().fetch;

describe("typed endpoints", () => {
  it("narrow the record by its endpoint", () => {
    connect<Demo>({
      url: "",
      fetch,
      endpoints: ["orders", "drivers"],
      onRecord: (record) => {
        expectTypeOf(record).toEqualTypeOf<FjordRecord<Order, "orders"> | FjordRecord<Driver, "drivers">>();
        if (record.endpoint === "orders") expectTypeOf(record.value).toEqualTypeOf<Order>();
        else expectTypeOf(record.value).toEqualTypeOf<Driver>();
      },
    }).close();
    connect<Demo>({
      url: "",
      fetch,
      endpoints: "drivers",
      onRecord: (record) => expectTypeOf(record).toEqualTypeOf<RecordOf<Demo>>(),
    }).close();
  });

  it("refuse an endpoint the map does not name", () => {
    connect<Demo>({
      url: "",
      fetch,
      // @ts-expect-error: not an endpoint of Demo
      endpoints: ["orders", "oders"],
      onRecord: () => undefined,
    }).close();
  });

  it("key per-endpoint filter and fields by the map's endpoint names", () => {
    connect<Demo>({
      url: "",
      fetch,
      endpoints: ["orders", "drivers"],
      filter: { orders: 'value.status == "placed"' },
      fields: { orders: ["order_id"], drivers: ["lat", "lon"] },
      onRecord: () => undefined,
    }).close();
    // At run time too: a name not among the endpoints throws at connect.
    expect(() =>
      connect<Demo>({
        url: "",
        fetch,
        endpoints: ["orders", "drivers"],
        // @ts-expect-error: not an endpoint of Demo
        filter: { oders: 'value.status == "placed"' },
        onRecord: () => undefined,
      }),
    ).toThrow(TypeError);
  });

  it("default to any endpoint and JSON values", () => {
    connect({
      url: "",
      fetch,
      endpoints: ["anything"],
      onRecord: (record) => {
        expectTypeOf(record.endpoint).toEqualTypeOf<string>();
        expectTypeOf(record.value).toEqualTypeOf<JsonValue>();
      },
    }).close();
  });
});

describe("typed tables", () => {
  it("type the rows, the changes and ready by the value type", () => {
    const t = table<Driver>({
      url: "",
      fetch,
      endpoint: "drivers",
      fields: ["lat", "lon"],
      onChange: (change) => {
        expectTypeOf(change).toEqualTypeOf<TableChange<Driver>>();
        if (change.type === "snapshot") expectTypeOf(change.rows).toEqualTypeOf<ReadonlyMap<string, FjordRecord<Driver>>>();
        else expectTypeOf(change.row.value).toEqualTypeOf<Driver>();
      },
      onRecord: (record) => expectTypeOf(record).toEqualTypeOf<FjordRecord<Driver>>(),
    });
    expectTypeOf(t.rows).toEqualTypeOf<ReadonlyMap<string, FjordRecord<Driver>>>();
    expectTypeOf(t.ready).toEqualTypeOf<Promise<ReadonlyMap<string, FjordRecord<Driver>>>>();
    expectTypeOf(table({ url: "", fetch, endpoint: "drivers" }).rows).toEqualTypeOf<ReadonlyMap<string, FjordRecord<JsonValue>>>();
    // @ts-expect-error: the rows are read-only
    t.rows.set("driver-1", t.rows.get("driver-1")!);
    // @ts-expect-error: a table has one endpoint; it starts from a snapshot, not a saved id
    expect(() => table<Driver>({ url: "", fetch, endpoints: "drivers", lastEventId: "1-0" })).toThrow(TypeError);
    t.close();
  });

  it("type connect's snapshots by endpoint", () => {
    connect<Demo>({
      url: "",
      fetch,
      endpoints: ["orders", "drivers"],
      onRecord: () => undefined,
      onSnapshot: (snapshot) => {
        expectTypeOf(snapshot).toEqualTypeOf<SnapshotOf<Demo>>();
        if (snapshot.endpoint === "drivers") expectTypeOf(snapshot.rows).toEqualTypeOf<FjordRecord<Driver, "drivers">[]>();
      },
    }).close();
  });
});
