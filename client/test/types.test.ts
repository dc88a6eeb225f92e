// Record value types per endpoint: `connect<{ orders: Order; drivers: Driver }>` checks the
// endpoint names (in `endpoints`, `filter` and `fields`) and narrows `record.value` by
// `record.endpoint`. The assertions are checked by the type check of `npm test`; at run time
// the test opens and closes streams, and sees a misnamed endpoint refused.

import { describe, expect, expectTypeOf, it } from "vitest";
import { connect, type FjordRecord, type JsonValue, type RecordOf } from "../src/index.js";
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
