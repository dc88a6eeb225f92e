// A page typed by `fjord types`: tests/schema_registry.rs
// (fjord_types_output_types_what_the_client_receives) writes the types of the endpoints
// `orders` (Avro), `shipments` (Protobuf) and `events` (JSON Schema) from a real registry as
// generated.ts beside this page, with the records the client received as received.ts, and
// type-checks the three with `tsc --noEmit`; a field the schemas do not have fails it.
import { connect } from "@fjord/client";
import type { Endpoints } from "./generated.js";

export function show(log: (line: string) => void): () => void {
  const subscription = connect<Endpoints>({
    url: "/",
    endpoints: ["orders", "shipments", "events"],
    onRecord: (record) => {
      switch (record.endpoint) {
        case "orders": {
          const order = record.value;
          const skus: string[] = order.lines.map((line) => `${line.sku} × ${line.qty}`);
          log(`order ${order.id}: ${order.total} (${order.state}) ${skus.join(", ")}`);
          break;
        }
        case "shipments": {
          const value = record.value;
          if ("boxes" in value) log(`shipment of ${value.order_id}: ${value.boxes} boxes`);
          else log(`order ${value.id}: ${value.total?.units ?? "0"} ${value.total?.currency ?? ""}`);
          break;
        }
        case "events": {
          const path: number[] = record.value.path ?? [];
          log(`${record.value.kind} at ${path.join("/")}`);
          break;
        }
      }
    },
  });
  return () => subscription.close();
}
