// The stream URL: `/v1/streams/{endpoint}` for one endpoint, `/v1/streams?endpoint=..` for
// several, `key=` filters, and the query parameters the EventSource transport needs.

export interface StreamQuery {
  endpoints: readonly string[];
  keys: readonly string[];
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
  if (query.lastEventId !== undefined) params.append("last_event_id", query.lastEventId);
  if (query.accessToken !== undefined) params.append("access_token", query.accessToken);
  const search = params.toString();
  return search === "" ? path : `${path}?${search}`;
}
