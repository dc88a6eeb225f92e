// Type-checked by `npm test` (never run): TypeScript finds the declarations of
// `require("@fjord/client")` through the `require` condition of `exports`.
import fjord = require("@fjord/client");

type Endpoints = { orders: { id: string } };

export = (signal: AbortSignal) =>
  fjord.connect<Endpoints>({
    url: "",
    endpoints: "orders",
    signal,
    onRecord: (record: fjord.RecordOf<Endpoints>) => record.value.id,
    onError: (error) => error instanceof fjord.FjordError,
  });
