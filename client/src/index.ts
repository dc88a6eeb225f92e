// @fjord/client: Kafka records from a Fjord server, streamed over Server-Sent Events, resumed
// by id after any drop and delivered once. `connect` streams records, `table` keeps the rows
// of a table endpoint; the rest are their types.

export { connect } from "./client.js";
export { rowKey, table } from "./table.js";
export {
  FjordError,
  type Base64,
  type ConnectOptions,
  type EndpointTypes,
  type EventSourceConstructor,
  type FjordRecord,
  type GapInfo,
  type HeaderValue,
  type JsonValue,
  type Notice,
  type RecordOf,
  type SchemaRef,
  type SnapshotOf,
  type Status,
  type StatusInfo,
  type StatusReason,
  type Subscription,
  type Table,
  type TableChange,
  type TableOptions,
  type TokenRequest,
  type TokenResult,
} from "./types.js";
