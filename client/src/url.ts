// The stream URL: `/v1/streams/{endpoint}` for one endpoint, `/v1/streams?endpoint=..` for
// several, `key=` filters, `filter=` and `fields=` (each for every endpoint or per endpoint),
// and the query parameters the EventSource transport needs.

/** One text for every endpoint (`name=`), or one per endpoint (`name.<endpoint>=`); `""` sends none. */
export type PerEndpoint = string | Readonly<Record<string, string>>;

export interface StreamQuery {
  endpoints: readonly string[];
  keys: readonly string[];
  /** The filter's source text. */
  filter?: PerEndpoint | undefined;
  /** The projection's paths, already joined with `,`. */
  fields?: PerEndpoint | undefined;
  /** Only for transports that cannot set headers. */
  lastEventId?: string | undefined;
  accessToken?: string | undefined;
}

export function streamUrl(base: string, query: StreamQuery): string {
  const root = `${base.replace(/\/+$/, "")}/v1/streams`;
  const params = new URLSearchParams();
  let path = root;
  const [only] = query.endpoints;
  if (query.endpoints.length === 1 && only !== undefined) {
    path = `${root}/${encodeURIComponent(only)}`;
  } else {
    for (const endpoint of query.endpoints) params.append("endpoint", endpoint);
  }
  for (const key of query.keys) params.append("key", key);
  appendPerEndpoint(params, "filter", query.filter);
  appendPerEndpoint(params, "fields", query.fields);
  if (query.lastEventId !== undefined) params.append("last_event_id", query.lastEventId);
  if (query.accessToken !== undefined) params.append("access_token", query.accessToken);
  const search = params.toString();
  return search === "" ? path : `${path}?${search}`;
}

function appendPerEndpoint(params: URLSearchParams, name: string, value: PerEndpoint | undefined): void {
  if (typeof value === "string") {
    if (value !== "") params.append(name, value);
    return;
  }
  for (const [endpoint, text] of Object.entries(value ?? {})) {
    if (text !== "") params.append(`${name}.${endpoint}`, text);
  }
}
