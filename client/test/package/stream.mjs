// Run by test/package.test.ts with `node`: loads the client with import by its package
// name (Node resolves a package's own name through its `exports`), streams one record from
// the URL in argv[2], ends it with an AbortSignal and prints what it saw as JSON.
import { connect, FjordError } from "@fjord/client";

const controller = new AbortController();
const seen = { format: "esm", fjordError: typeof FjordError, records: [], statuses: [] };
connect({
  url: process.argv[2],
  endpoints: "orders",
  signal: controller.signal,
  onRecord: (record) => {
    seen.records.push([record.endpoint, record.id, record.value]);
    controller.abort();
  },
  onStatus: (status, { reason }) => {
    seen.statuses.push(`${status}:${reason}`);
    if (status === "closed") console.log(JSON.stringify(seen));
  },
});
