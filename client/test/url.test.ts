// `streamUrl` with `filter=` and `fields=`: for every endpoint or per endpoint, on the path of
// one endpoint or beside `endpoint=`, and encoded so that the server's form decoding reads
// back the exact text (quotes, spaces, `&`, `=`, `+`, non-ASCII).

import { describe, expect, it } from "vitest";
import { streamUrl } from "../src/url.js";

/** The query as the server reads it: form-urlencoded, `+` as space. */
function serverReads(url: string): [string, string][] {
  return [...new URL(url).searchParams];
}

describe("streamUrl: filter and fields", () => {
  it("puts them on the path of one endpoint", () => {
    const url = streamUrl("https://fjord.test/", {
      endpoints: ["orders"],
      keys: ["order-17"],
      filter: "value.total_cents >= 1000",
      fields: "id,total_cents",
    });
    expect(url).toBe("https://fjord.test/v1/streams/orders?key=order-17&filter=value.total_cents+%3E%3D+1000&fields=id%2Ctotal_cents");
  });

  it("puts them beside several endpoints, for every one", () => {
    const url = streamUrl("https://fjord.test", { endpoints: ["orders", "drivers"], keys: [], filter: "has(value.id)", fields: "id" });
    expect(serverReads(url)).toEqual([
      ["endpoint", "orders"],
      ["endpoint", "drivers"],
      ["filter", "has(value.id)"],
      ["fields", "id"],
    ]);
  });

  it("names the endpoint for per-endpoint ones, before the resume id and token", () => {
    const url = streamUrl("https://fjord.test", {
      endpoints: ["orders", "drivers"],
      keys: [],
      filter: { orders: 'value.status == "placed"', drivers: "value.lat > 47" },
      fields: { drivers: "lat,lon" },
      lastEventId: "1-0_2-0",
      accessToken: "t",
    });
    expect(url).toBe(
      "https://fjord.test/v1/streams?endpoint=orders&endpoint=drivers" +
        "&filter.orders=value.status+%3D%3D+%22placed%22&filter.drivers=value.lat+%3E+47" +
        "&fields.drivers=lat%2Clon&last_event_id=1-0_2-0&access_token=t",
    );
  });

  it("encodes so that the server reads the exact text", () => {
    const filter = `value.note == "a b&c=d+e" && value['x y'] != 'q%20' && value.city == "Zürich"`;
    const fields = `["order id"],customer.name,["a+b=c&d"]`;
    const url = streamUrl("https://fjord.test", { endpoints: ["orders"], keys: [], filter, fields });
    expect(serverReads(url)).toEqual([
      ["filter", filter],
      ["fields", fields],
    ]);
    // Space as `+`, so a `+` of the text as `%2B`; `&`, `=`, quotes and `%` escaped too.
    expect(url).toContain("value.note+%3D%3D+%22a+b%26c%3Dd%2Be%22+%26%26+value%5B%27x+y%27%5D+%21%3D+%27q%2520%27");
  });

  it("sends nothing for an empty text", () => {
    expect(streamUrl("", { endpoints: ["orders"], keys: [], filter: "", fields: "" })).toBe("/v1/streams/orders");
    expect(streamUrl("", { endpoints: ["a", "b"], keys: [], filter: { a: "" }, fields: {} })).toBe("/v1/streams?endpoint=a&endpoint=b");
  });
});
