// @fjord/client: Kafka records from a Fjord server, streamed over Server-Sent Events, resumed
// by id after any drop and delivered once. `connect` is the whole API; the rest are its types.

export { connect } from "./client.js";
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
  type Status,
  type StatusInfo,
  type StatusReason,
  type Subscription,
  type TokenRequest,
  type TokenResult,
} from "./types.js";
