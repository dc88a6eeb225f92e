// Type-checked by `npm test` (never run): TypeScript finds the declarations of
// `require("@fjord/client")` through the `require` condition of `exports`.
import fjord = require("@fjord/client");

type Endpoints = { orders: { id: string } };

export = (signal: AbortSignal) => [
  fjord.connect<Endpoints>({
    url: "",
    endpoints: "orders",
    signal,
    onRecord: (record: fjord.RecordOf<Endpoints>) => record.value.id,
    onError: (error) => error instanceof fjord.FjordError,
  }),
  fjord.table<{ id: string }>({
    url: "",
    endpoint: "drivers",
    signal,
    onChange: (change: fjord.TableChange<{ id: string }>) => change.type === "snapshot" || change.row.value.id,
  }).rows.get(fjord.rowKey("driver-1"))?.value.id,
];
