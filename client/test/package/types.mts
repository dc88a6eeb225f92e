// Type-checked by `npm test` (never run): TypeScript finds the declarations of
// `import "@fjord/client"` through the `import` condition of `exports`.
import { connect, FjordError, rowKey, table, type RecordOf, type TableChange } from "@fjord/client";

type Endpoints = { orders: { id: string } };

export const viaImport = (signal: AbortSignal) =>
  connect<Endpoints>({
    url: "",
    endpoints: "orders",
    signal,
    onRecord: (record: RecordOf<Endpoints>) => record.value.id,
    onError: (error) => error instanceof FjordError,
  });

export const tableViaImport = (signal: AbortSignal) =>
  table<{ id: string }>({
    url: "",
    endpoint: "drivers",
    signal,
    onChange: (change: TableChange<{ id: string }>) => change.type === "snapshot" || change.row.value.id,
  }).rows.get(rowKey({ base64: "AA==" }))?.value.id;
