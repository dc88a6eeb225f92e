// `table`: the rows of a table endpoint, kept in a Map by key. The first snapshot fills it,
// live records set (upsert) or delete (tombstone) one key each, and a later snapshot, after a
// resume the server could not serve, replaces every row. A resume it could serve brings only
// the records missed, so the Map stays. Built on `connect`: the same options, reconnects,
// tokens and errors.

import { connect, guard } from "./client.js";
import { FjordError, type FjordRecord, type JsonValue, type Table, type TableChange, type TableOptions } from "./types.js";

/**
 * A row's key in `rows`: a text key is itself; another key (`{ base64 }` for bytes that are
 * not UTF-8, the decoded JSON of an Avro or Protobuf key) is its `JSON.stringify`.
 */
export function rowKey(key: JsonValue): string {
  return typeof key === "string" ? key : JSON.stringify(key);
}

/**
 * Keeps the current rows of a table endpoint.
 *
 * @example
 * const drivers = table<Driver>({ url: "https://stream.example.com", endpoint: "drivers",
 *   onChange: () => draw(drivers.rows) });
 * await drivers.ready; // every driver is in drivers.rows
 */
export function table<V = JsonValue>(options: TableOptions<V>): Table<V> {
  const rows = new Map<string, FjordRecord<V>>();
  let resolve: (rows: Map<string, FjordRecord<V>>) => void;
  let reject: (error: FjordError) => void;
  const ready = new Promise<Map<string, FjordRecord<V>>>((yes, no) => ((resolve = yes), (reject = no)));
  // Nobody need wait for it: a table closed before its snapshot is no unhandled rejection.
  ready.catch(() => undefined);
  const change = (what: TableChange<V>): void => {
    const onChange = options.onChange;
    if (onChange !== undefined) guard(() => onChange(what));
  };
  const sub = connect<Record<string, V>>({
    ...options,
    endpoints: options.endpoint,
    lastEventId: undefined, // the rows start from a snapshot
    onSnapshot: (snapshot) => {
      rows.clear();
      for (const row of snapshot.rows) if (row.key != null) rows.set(rowKey(row.key), row);
      resolve(rows);
      change({ type: "snapshot", rows });
    },
    onRecord: (record) => {
      const { onRecord } = options;
      if (record.key == null) {
        if (onRecord !== undefined) onRecord(record);
        return;
      }
      const key = rowKey(record.key);
      const row = rows.get(key);
      if (record.value !== null) {
        rows.set(key, record);
        change({ type: "upsert", key, row: record });
      } else if (row !== undefined) {
        rows.delete(key);
        change({ type: "delete", key, row });
      }
    },
    onError: (error) => {
      if (error.fatal) reject(error);
      options.onError?.(error);
    },
    onStatus: (status, info) => {
      if (status === "closed") reject(new FjordError("closed", "the table was closed before its first snapshot", { fatal: true }));
      options.onStatus?.(status, info);
    },
  });
  return {
    rows,
    ready,
    close: sub.close,
    get lastEventId() {
      return sub.lastEventId;
    },
    get status() {
      return sub.status;
    },
  };
}
