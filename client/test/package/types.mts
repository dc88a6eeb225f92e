// Type-checked by `npm test` (never run): TypeScript finds the declarations of
// `import "@fjord/client"` through the `import` condition of `exports`.
import { connect, FjordError, type RecordOf } from "@fjord/client";

type Endpoints = { orders: { id: string } };

export const viaImport = (signal: AbortSignal) =>
  connect<Endpoints>({
    url: "",
    endpoints: "orders",
    signal,
    onRecord: (record: RecordOf<Endpoints>) => record.value.id,
    onError: (error) => error instanceof FjordError,
  });
