//! A stream request: what it asks for (endpoints, key filters, where to resume) and whether
//! it may have it — its origin, the connection limits, its token and grant — all decided in
//! one call, [`Admission::admit`]; and the JSON error with the fitting status that refuses it,
//! rendered once ([`ApiError::response`]) for the stream path and warp's routes alike.
//! Requests are parsed and checked here; a bad one is answered with a clear error, never a
//! panic or a 500. The connection module reads the request and writes the stream.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::auth::{AuthError, Authenticator, Forbidden, Grant, find_token};
use crate::compression::Encoding;
use crate::cors::{AllowOrigin, Cors, CorsRefused};
use crate::hub::{Hub, Interest, NoRoom, Subscription, ViewSpec};
use crate::keys::KeySet;
use crate::limits::{LimitReached, Slot};
use crate::sse::ResumeId;
use fjord_filter::{Filter, FilterError, Projection};

/// Most keys one connection may filter on.
const MAX_KEYS: usize = 1000;
/// Longest key filter, in bytes of the record key.
const MAX_KEY_BYTES: usize = 1024;
/// The `Retry-After` of every 503: long enough for a load balancer to send the retry to
/// another instance, or for streams to close.
const RETRY_AFTER_SECS: u64 = 5;

/// A request refused with a status and a stable error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// More fields of the error object, for programs: where a filter went wrong.
    detail: serde_json::Map<String, serde_json::Value>,
}

impl warp::reject::Reject for ApiError {}

impl ApiError {
    /// A refusal with `status` and a stable `code`.
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            detail: serde_json::Map::new(),
        }
    }

    /// The JSON body: `{"error":{"code":..,"message":..}}`, and the detail's fields.
    pub(crate) fn body(&self) -> String {
        let mut error = self.detail.clone();
        error.insert("code".into(), self.code.into());
        error.insert("message".into(), self.message.clone().into());
        serde_json::json!({ "error": error }).to_string()
    }

    /// The one rendering of a refusal: its status, its fields (`Content-Type`, a 401's
    /// `WWW-Authenticate` challenge, a 503's `Retry-After`) and its JSON body. warp's routes
    /// send it as it is; the connection adds its own framing fields and writes it itself.
    pub(crate) fn response(&self) -> http::Response<String> {
        let mut response = http::Response::new(self.body());
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                self.code
            );
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                headers.insert(header::WWW_AUTHENTICATE, value);
            }
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }

    fn bad_query(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_query", message)
    }

    /// A filter (`code` `bad_filter`) or field list (`bad_fields`) in query parameter
    /// `parameter` that does not compile: the message says where and why, and so do the
    /// error's `parameter`, `position` (a byte offset) and `column` fields.
    fn bad_view(code: &'static str, parameter: &str, error: &FilterError) -> Self {
        let mut refusal = Self::new(
            StatusCode::BAD_REQUEST,
            code,
            format!("{parameter}= {error}"),
        );
        refusal.detail.insert("parameter".into(), parameter.into());
        refusal
            .detail
            .insert("position".into(), error.position.into());
        refusal.detail.insert("column".into(), error.column.into());
        refusal
    }

    /// A resume id that does not fit this stream: a code of its own, so that a client can
    /// drop a stale saved id and continue live.
    fn bad_last_event_id(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_last_event_id", message)
    }

    fn unknown_endpoint(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_endpoint",
            format!(
                "no endpoint is named {:?}",
                name.chars().take(100).collect::<String>()
            ),
        )
    }

    fn unauthorized(error: &AuthError) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, error.code(), error.to_string())
    }

    fn forbidden(error: &Forbidden) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", error.to_string())
    }
}

impl From<LimitReached> for ApiError {
    fn from(refusal: LimitReached) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            refusal.0,
        )
    }
}

impl From<CorsRefused> for ApiError {
    fn from(refusal: CorsRefused) -> Self {
        Self::new(StatusCode::FORBIDDEN, "cors_forbidden", refusal.0)
    }
}

/// What a stream request asks for, parsed from its path and query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StreamRequest {
    /// Which endpoints and keys.
    pub interest: Interest,
    /// Where to resume, from `Last-Event-ID` or `?last_event_id=`.
    pub resume: Option<ResumeId>,
}

/// Parses a stream request: `path_endpoint` from `/v1/streams/{endpoint}` (else the query's
/// `endpoint=` values), the raw query string, and the `Last-Event-ID` header. An endpoint
/// name that `grant` does not open is refused before it is looked up, so that the refusal
/// is the same whether the endpoint exists or not.
pub(crate) fn parse_stream_request(
    hub: &Hub,
    grant: &Grant,
    path_endpoint: Option<&str>,
    query: &str,
    last_event_id: Option<&str>,
) -> Result<StreamRequest, ApiError> {
    let mut endpoints = Vec::new();
    let mut keys: Option<Vec<Vec<u8>>> = None;
    let mut query_last_event_id = None;
    let mut views = ViewParameters::default();
    let mut add_endpoint = |name: &str| -> Result<(), ApiError> {
        grant
            .open(name)
            .map_err(|error| ApiError::forbidden(&error))?;
        let index = hub
            .endpoint_index(name)
            .ok_or_else(|| ApiError::unknown_endpoint(name))?;
        endpoints.push(index);
        Ok(())
    };
    if let Some(name) = path_endpoint {
        add_endpoint(name)?;
    }
    refuse_queries_that_are_not_text(query)?;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "endpoint" if path_endpoint.is_some() => {
                return Err(ApiError::bad_query(
                    "endpoint= goes with /v1/streams, not /v1/streams/{endpoint}",
                ));
            }
            "endpoint" => add_endpoint(&value)?,
            // A key is the bytes of a record's key: `key=` the UTF-8 of its text,
            // `key_base64=` any bytes, as the envelope shows a key that is not text. The
            // two match the same record only when they are the same bytes.
            "key" | "key_base64" => {
                let key = if name == "key" {
                    value.into_owned().into_bytes()
                } else {
                    decode_key(&value)?
                };
                if key.len() > MAX_KEY_BYTES {
                    return Err(ApiError::bad_query(format!(
                        "a key is longer than {MAX_KEY_BYTES} bytes"
                    )));
                }
                let keys = keys.get_or_insert_with(Vec::new);
                if keys.len() == MAX_KEYS {
                    return Err(ApiError::bad_query(format!("at most {MAX_KEYS} keys")));
                }
                keys.push(key);
            }
            "last_event_id" => query_last_event_id = Some(value.into_owned()),
            // Taken by the auth layer, where the manifest allows it.
            "access_token" => {}
            other if views.take(other, &value, hub.filter_limits())? => {}
            other => {
                return Err(ApiError::bad_query(format!(
                    "unknown query parameter {:?}; expected endpoint, key, key_base64, filter, fields, last_event_id or access_token",
                    other.chars().take(100).collect::<String>()
                )));
            }
        }
    }
    if endpoints.is_empty() {
        return Err(ApiError::bad_query(
            "name at least one endpoint: /v1/streams/{endpoint} or ?endpoint=",
        ));
    }
    endpoints.sort_unstable();
    endpoints.dedup();
    let keys = keys.map(KeySet::new);
    let views = views.per_endpoint(hub, &endpoints, grant)?;
    // The header wins: EventSource sends it on reconnect, after a first request whose
    // query id is stale.
    let resume = last_event_id
        .or(query_last_event_id.as_deref())
        .filter(|id| !id.is_empty())
        .map(|id| ResumeId::parse(id, endpoints.len()))
        .transpose()
        .map_err(|error| ApiError::bad_last_event_id(error.to_string()))?;
    if let Some(resume) = &resume {
        refuse_ids_from_the_future(resume, fjord_bus::clock::now_ms())?;
    }
    Ok(StreamRequest {
        interest: Interest {
            endpoints,
            keys,
            views,
            encoding: None,
        },
        resume,
    })
}

/// The query's filters and field lists: `filter=` and `fields=` for every endpoint of the
/// stream, `filter.{endpoint}=` and `fields.{endpoint}=` for one, each compiled as it is read.
#[derive(Debug, Default)]
struct ViewParameters {
    filter: Option<Filter>,
    fields: Option<Projection>,
    filters: Vec<(String, Filter)>,
    field_lists: Vec<(String, Projection)>,
}

impl ViewParameters {
    /// Takes query parameter `name` if it is a filter or field list; false if it is not.
    fn take(
        &mut self,
        name: &str,
        value: &str,
        limits: &fjord_filter::Limits,
    ) -> Result<bool, ApiError> {
        let (kind, endpoint) = match name.split_once('.') {
            Some((kind, endpoint)) => (kind, Some(endpoint)),
            None => (name, None),
        };
        match kind {
            "filter" => {
                let filter = Filter::compile(value, limits)
                    .map_err(|error| ApiError::bad_view("bad_filter", name, &error))?;
                place(&mut self.filter, &mut self.filters, endpoint, filter, name)?;
            }
            "fields" => {
                let fields = Projection::parse(value, limits)
                    .map_err(|error| ApiError::bad_view("bad_fields", name, &error))?;
                place(
                    &mut self.fields,
                    &mut self.field_lists,
                    endpoint,
                    fields,
                    name,
                )?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// What the stream sees of each of `endpoints` (sorted indexes into the hub's): the
    /// query's filters and the token's, ANDed, and the endpoint's field list, else the
    /// stream's. A parameter for an endpoint the stream does not name is refused.
    fn per_endpoint(
        self,
        hub: &Hub,
        endpoints: &[usize],
        grant: &Grant,
    ) -> Result<Vec<ViewSpec>, ApiError> {
        let names: Vec<&str> = endpoints
            .iter()
            .map(|&endpoint| hub.endpoints()[endpoint].as_str())
            .collect();
        let named = self
            .filters
            .iter()
            .map(|(endpoint, _)| ("filter", endpoint))
            .chain(
                self.field_lists
                    .iter()
                    .map(|(endpoint, _)| ("fields", endpoint)),
            );
        for (kind, endpoint) in named {
            if !names.contains(&endpoint.as_str()) {
                return Err(ApiError::bad_query(format!(
                    "{kind}.{}= names no endpoint of this stream",
                    endpoint.chars().take(100).collect::<String>()
                )));
            }
        }
        Ok(names
            .iter()
            .map(|&name| {
                let own_filter = self
                    .filters
                    .iter()
                    .find(|(endpoint, _)| endpoint == name)
                    .map(|(_, filter)| filter.clone());
                let fields = self
                    .field_lists
                    .iter()
                    .find(|(endpoint, _)| endpoint == name)
                    .map(|(_, fields)| fields.clone())
                    .or_else(|| self.fields.clone());
                ViewSpec {
                    filter: self.filter.clone(),
                    projection: fields,
                }
                .and(own_filter)
                .and(grant.filter_of(name))
            })
            .collect())
    }
}

/// Keeps `value` of parameter `name` as the stream's (`every`) or, for `Some(endpoint)`,
/// as that endpoint's (`each`); a parameter given twice is refused.
fn place<T>(
    every: &mut Option<T>,
    each: &mut Vec<(String, T)>,
    endpoint: Option<&str>,
    value: T,
    name: &str,
) -> Result<(), ApiError> {
    let taken = match endpoint {
        None => every.is_some(),
        Some(endpoint) => each.iter().any(|(e, _)| e == endpoint),
    };
    if taken {
        return Err(ApiError::bad_query(format!("{name}= is given twice")));
    }
    match endpoint {
        None => *every = Some(value),
        Some(endpoint) => each.push((endpoint.to_owned(), value)),
    }
    Ok(())
}

/// How far ahead of this server's clock a resume id may be: the bus's clock, which makes
/// the ids, may be a little ahead, and another instance may have read a little further.
const MAX_RESUME_AHEAD_MS: u64 = 60_000;

/// Refuses a resume id later than any the bus can have made yet: resuming from it would
/// silently skip every record until the bus's clock caught up.
fn refuse_ids_from_the_future(resume: &ResumeId, now_ms: u64) -> Result<(), ApiError> {
    if resume
        .0
        .iter()
        .any(|id| id.ms > now_ms.saturating_add(MAX_RESUME_AHEAD_MS))
    {
        return Err(ApiError::bad_last_event_id(
            "the resume id is from the future: no record has such an id yet; drop it and reconnect without one",
        ));
    }
    Ok(())
}

/// Refuses a query whose names or values are not UTF-8 once percent-decoded: form decoding
/// would turn them into other text (U+FFFD), and a `key=` spelled `k%65y=` would match no
/// record instead of the key meant.
fn refuse_queries_that_are_not_text(query: &str) -> Result<(), ApiError> {
    let not_text = query
        .split('&')
        .flat_map(|pair| pair.splitn(2, '='))
        .any(|part| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .is_err()
        });
    if not_text {
        return Err(ApiError::bad_query(
            "the query is not UTF-8 once percent-decoded; give a key that is not text as key_base64=",
        ));
    }
    Ok(())
}

/// The bytes of a `key_base64=` value: standard base64 with padding, as the envelope has it.
fn decode_key(value: &str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine as _;
    if value.len() > MAX_KEY_BYTES.div_ceil(3) * 4 {
        return Err(ApiError::bad_query(format!(
            "a key is longer than {MAX_KEY_BYTES} bytes"
        )));
    }
    base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|error| {
            ApiError::bad_query(format!(
                "key_base64 is not standard base64 ({error}); percent-encode + / = as %2B %2F %3D"
            ))
        })
}

/// The value of the first `name=` of a query string.
fn query_value(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// A stream request as its head asks for it.
#[derive(Debug)]
pub(crate) struct StreamHead {
    /// `Some` for `/v1/streams/{endpoint}`.
    pub path_endpoint: Option<String>,
    /// The raw query string.
    pub query: String,
    /// The request's header fields.
    pub headers: HeaderMap,
}

/// What admitting a stream request needs: the hub, the token checks, the CORS allowlist.
#[derive(Debug)]
pub(crate) struct Admission {
    /// The hub connections subscribe to.
    pub hub: Arc<Hub>,
    /// Verifies tokens.
    pub auth: Authenticator,
    /// The origins allowed to read streams.
    pub cors: Cors,
    /// Whether a client's address is `X-Forwarded-For`'s last entry.
    pub trust_forwarded_for: bool,
    /// Whether streams are compressed for clients that accept gzip or deflate.
    pub compression: bool,
}

/// A stream request let in: its subscription, and the CORS fields of its response.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub subscription: Subscription,
    pub allow_origin: Option<AllowOrigin>,
}

/// A stream request refused: why, and the CORS fields of the refusal, so that a page on an
/// allowed origin can read why.
#[derive(Debug)]
pub(crate) struct Refused {
    pub error: ApiError,
    pub allow_origin: Option<AllowOrigin>,
}

impl Admission {
    /// Every check a stream request passes, in this order: its origin; the streams a server,
    /// and one client address, may hold (`slot`, which counts it once admitted); its token,
    /// before anything it asks for is looked at, so that a caller without one learns nothing
    /// about the endpoints; the streams of one token subject; what it asks for (endpoints,
    /// keys, resume id) within what the token opens; the key index's budget. Admitted, it is
    /// subscribed.
    pub(crate) async fn admit(
        &self,
        head: &StreamHead,
        peer: IpAddr,
        slot: &mut Slot,
    ) -> Result<Admitted, Refused> {
        let origin = head.headers.get(header::ORIGIN);
        let allow_origin = self
            .cors
            .allow(origin, self.hub.metrics())
            .map_err(|refusal| Refused {
                error: refusal.into(),
                allow_origin: None,
            })?;
        match self.subscribe(head, peer, slot).await {
            Ok(subscription) => Ok(Admitted {
                subscription,
                allow_origin,
            }),
            Err(error) => Err(Refused {
                error,
                allow_origin,
            }),
        }
    }

    /// The checks after the origin's, then the subscription.
    async fn subscribe(
        &self,
        head: &StreamHead,
        peer: IpAddr,
        slot: &mut Slot,
    ) -> Result<Subscription, ApiError> {
        if self.hub.is_overloaded() {
            self.hub.metrics().refused_overload.fetch_add(1, Relaxed);
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the server is shedding load; retry later, or on another server",
            ));
        }
        let address = client_address(peer, &head.headers, self.trust_forwarded_for);
        slot.admit_stream(address)?;
        let query_token = query_value(&head.query, "access_token");
        let token = find_token(&head.headers, query_token.as_deref(), self.auth.sources());
        let grant = self
            .auth
            .grant(token)
            .await
            .map_err(|error| ApiError::unauthorized(&error))?;
        if let Some(subject) = &grant.subject {
            slot.admit_subject(subject)?;
        }
        let last_event_id = head.headers.get("last-event-id").map(|value| {
            value
                .to_str()
                .map_err(|_| ApiError::bad_last_event_id("Last-Event-ID is not ASCII"))
        });
        let last_event_id = last_event_id.transpose()?;
        let mut request = parse_stream_request(
            &self.hub,
            &grant,
            head.path_endpoint.as_deref(),
            &head.query,
            last_event_id,
        )?;
        request.interest.keys = grant
            .narrow_keys(request.interest.keys.take())
            .map_err(|error| ApiError::forbidden(&error))?;
        if self.compression {
            let accepted = head.headers.get_all(header::ACCEPT_ENCODING);
            request.interest.encoding =
                Encoding::negotiate(accepted.iter().filter_map(|value| value.to_str().ok()));
        }
        self.hub
            .try_subscribe(request.interest, request.resume.as_ref(), grant.expires_at)
            .map_err(|refusal| {
                let code = match refusal {
                    NoRoom::Keys(_) => "too_many_key_filters",
                    NoRoom::Views(_) => "too_many_filters",
                };
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, refusal.to_string())
            })
    }
}

/// Where a stream comes from, for the per-address limit: the peer, or behind a trusted load
/// balancer the last entry of `X-Forwarded-For` (the one it appended; earlier ones are the
/// client's to write).
fn client_address(peer: IpAddr, headers: &HeaderMap, trust_forwarded_for: bool) -> IpAddr {
    if !trust_forwarded_for {
        return peer;
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .next_back()
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.rsplit(',').next())
        .and_then(|last| last.trim().parse().ok())
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use fjord_bus::memory::MemoryBus;
    use fjord_bus::{Bus, StreamId};
    use fjord_config::{EndpointName, ServerConfig, StartPosition};

    fn hub() -> Hub {
        let endpoints = ["drivers", "orders"]
            .map(|name| {
                (
                    EndpointName::try_from(name.to_owned()).expect("valid"),
                    StartPosition::Live,
                )
            })
            .to_vec();
        let bus = Bus::Memory(MemoryBus::new());
        Hub::new(
            endpoints,
            &[],
            &ServerConfig::default(),
            bus,
            Arc::default(),
        )
    }

    #[test]
    fn the_forwarded_address_counts_only_when_trusted() {
        let peer: IpAddr = [10, 0, 0, 9].into();
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.7"),
        );
        assert_eq!(client_address(peer, &headers, false), peer);
        assert_eq!(
            client_address(peer, &headers, true),
            IpAddr::from([203, 0, 113, 7])
        );
        headers.insert("x-forwarded-for", HeaderValue::from_static("garbage"));
        assert_eq!(client_address(peer, &headers, true), peer);
    }

    #[test]
    fn one_endpoint_with_keys() {
        let request = parse_stream_request(
            &hub(),
            &Grant::everything(),
            Some("orders"),
            "key=b&key=a&key=b",
            None,
        )
        .expect("valid");
        assert_eq!(request.interest.endpoints, vec![1]);
        assert_eq!(request.interest.keys, Some(KeySet::new(["a", "b"])));
        assert_eq!(request.resume, None);
    }

    #[test]
    fn several_endpoints_are_sorted_and_resume_with_a_position_each() {
        let request = parse_stream_request(
            &hub(),
            &Grant::everything(),
            None,
            "endpoint=orders&endpoint=drivers&last_event_id=1-0_2-0",
            None,
        )
        .expect("valid");
        assert_eq!(request.interest.endpoints, vec![0, 1]);
        assert_eq!(request.interest.keys, None);
        let expected = ResumeId(vec![StreamId { ms: 1, seq: 0 }, StreamId { ms: 2, seq: 0 }]);
        assert_eq!(request.resume, Some(expected));
    }

    #[test]
    fn the_header_wins_over_the_query() {
        let request = parse_stream_request(
            &hub(),
            &Grant::everything(),
            Some("orders"),
            "last_event_id=1-0",
            Some("9-9"),
        )
        .expect("valid");
        assert_eq!(
            request.resume,
            Some(ResumeId(vec![StreamId { ms: 9, seq: 9 }]))
        );
    }

    #[test]
    fn bad_requests_are_named() {
        let cases: &[(Option<&str>, &str, Option<&str>, &str)] = &[
            (Some("nope"), "", None, "unknown_endpoint"),
            (
                None,
                "endpoint=orders&endpoint=nope",
                None,
                "unknown_endpoint",
            ),
            (None, "", None, "bad_query"),
            (Some("orders"), "endpoint=orders", None, "bad_query"),
            (Some("orders"), "colour=red", None, "bad_query"),
            (Some("orders"), "", Some("yesterday"), "bad_last_event_id"),
            (
                None,
                "endpoint=orders&endpoint=drivers",
                Some("1-0"),
                "bad_last_event_id",
            ),
            (
                Some("orders"),
                "key=%C3%A9",
                Some("1-0_2-0"),
                "bad_last_event_id",
            ),
        ];
        for (path, query, header, code) in cases {
            let error = parse_stream_request(&hub(), &Grant::everything(), *path, query, *header)
                .expect_err("refused");
            assert_eq!(error.code, *code, "{path:?} {query} {header:?}: {error}");
        }
        let long_key = format!("key={}", "k".repeat(MAX_KEY_BYTES + 1));
        assert!(
            parse_stream_request(
                &hub(),
                &Grant::everything(),
                Some("orders"),
                &long_key,
                None
            )
            .is_err()
        );
    }

    #[test]
    fn bad_filters_and_field_lists_are_refused_with_where_and_why() {
        let refusal = |query: &str| {
            let error = parse_stream_request(
                &hub(),
                &Grant::everything(),
                None,
                &format!("endpoint=orders&endpoint=drivers&{query}"),
                None,
            )
            .expect_err("refused");
            let body: serde_json::Value = serde_json::from_str(&error.body()).expect("JSON");
            (error.status, body["error"].clone())
        };
        let (status, error) = refusal("filter=value.total+%3E%3D");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error["code"], "bad_filter");
        assert_eq!(error["parameter"], "filter");
        assert_eq!(error["position"], 14);
        assert_eq!(error["column"], 15);
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("filter= at column 15: ")),
            "{error}"
        );
        let (_, error) = refusal("fields.orders=id,,total");
        assert_eq!(error["code"], "bad_fields");
        assert_eq!(error["parameter"], "fields.orders");
        for query in [
            "filter=true&filter=false",
            "filter.orders=true&filter.orders=true",
            "filter.payments=true",
            "fields.payments=id",
        ] {
            assert_eq!(refusal(query).1["code"], "bad_query", "{query}");
        }
        let long = format!("filter={}", "1".repeat(2000));
        assert_eq!(refusal(&long).1["code"], "bad_filter");
    }

    #[test]
    fn each_endpoint_sees_the_stream_s_filter_its_own_and_the_token_s() {
        let grant = Grant {
            filters: BTreeMap::from([(
                "drivers".to_owned(),
                Filter::compile("value.active", &fjord_filter::Limits::default()).expect("filter"),
            )]),
            ..Grant::everything()
        };
        let request = parse_stream_request(
            &hub(),
            &grant,
            None,
            "endpoint=orders&endpoint=drivers&filter=offset>1&filter.orders=value.total>2&fields=id&fields.drivers=position",
            None,
        )
        .expect("valid");
        let views: Vec<(Option<String>, Option<String>)> = request
            .interest
            .views
            .iter()
            .map(|view| {
                (
                    view.filter.as_ref().map(|f| f.canonical().to_owned()),
                    view.projection.as_ref().map(|p| p.canonical().to_owned()),
                )
            })
            .collect();
        // Endpoints sorted: drivers, orders.
        assert_eq!(
            views,
            vec![
                (
                    Some("offset > 1 && value.active".to_owned()),
                    Some("position".to_owned())
                ),
                (
                    Some("offset > 1 && value.total > 2".to_owned()),
                    Some("id".to_owned())
                ),
            ]
        );
    }

    #[test]
    fn a_narrow_token_gets_the_same_refusal_for_existing_and_unknown_endpoints() {
        let narrow = Grant {
            endpoints: Some(vec!["orders".into()]),
            keys: None,
            filters: BTreeMap::new(),
            expires_at: None,
            subject: None,
        };
        let refusal = |path: Option<&str>, query: &str| {
            let error =
                parse_stream_request(&hub(), &narrow, path, query, None).expect_err("refused");
            (
                error.status,
                error
                    .body()
                    .replace("drivers", "NAME")
                    .replace("ghost", "NAME"),
            )
        };
        let existing = refusal(Some("drivers"), "");
        assert_eq!(existing.0, StatusCode::FORBIDDEN);
        assert_eq!(existing, refusal(Some("ghost"), ""));
        assert_eq!(
            refusal(None, "endpoint=orders&endpoint=drivers"),
            refusal(None, "endpoint=orders&endpoint=ghost")
        );
        // Without auth, an unknown endpoint is a plain 404.
        let open = parse_stream_request(&hub(), &Grant::everything(), Some("ghost"), "", None)
            .expect_err("unknown");
        assert_eq!(open.status, StatusCode::NOT_FOUND);
    }

    /// Query strings close to valid ones: known and unknown names, encoded and broken
    /// escapes, repeated separators.
    fn near_valid_query() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let piece = prop::sample::select(vec![
            "endpoint=orders",
            "endpoint=drivers",
            "endpoint=",
            "endpoint=nope",
            "key=a",
            "key=%FF%FE",
            "key=%",
            "key=%2",
            "key",
            "=",
            "&",
            "&&",
            "last_event_id=1-0",
            "last_event_id=1-0_2-0",
            "last_event_id=",
            "access_token=x",
            "colour=red",
            "+",
            "%26",
            "é",
            "key=a%00b",
        ]);
        prop::collection::vec(piece, 0..10).prop_map(|pieces| pieces.join("&"))
    }

    /// `Last-Event-ID` values close to valid ones.
    fn near_valid_resume_id() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let piece = prop::sample::select(vec![
            "1",
            "0",
            "-",
            "_",
            "1-0",
            "18446744073709551615",
            "18446744073709551616",
            "-1",
            "1-",
            "-0",
            " ",
            "+1",
            "1-0-0",
            "é",
        ]);
        prop::collection::vec(piece, 0..8).prop_map(|pieces| pieces.concat())
    }

    fn check_request(
        hub: &Hub,
        path: Option<&str>,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        match parse_stream_request(hub, &Grant::everything(), path, query, last_event_id) {
            Ok(request) => {
                proptest::prop_assert!(!request.interest.endpoints.is_empty());
                proptest::prop_assert!(
                    request
                        .interest
                        .endpoints
                        .iter()
                        .all(|&i| i < hub.endpoints().len())
                );
                if let Some(resume) = &request.resume {
                    proptest::prop_assert_eq!(resume.0.len(), request.interest.endpoints.len());
                }
            }
            Err(error) => {
                proptest::prop_assert!(error.status.is_client_error());
                proptest::prop_assert!(!error.message.is_empty());
            }
        }
        Ok(())
    }

    #[test]
    fn key_filters_are_bytes_bounded_in_count_and_length() {
        let parse = |query: &str| {
            parse_stream_request(&hub(), &Grant::everything(), Some("orders"), query, None)
        };
        let keys = |query: &str| parse(query).expect("valid").interest.keys;
        // The same bytes, as text and as base64, are one key.
        assert_eq!(
            keys("key=ab&key_base64=YWI%3D&key_base64=%2F%2F4Aaw%3D%3D"),
            Some(KeySet::new([&b"ab"[..], &[0xff, 0xfe, 0x00, 0x6b]]))
        );
        for bad in [
            "key=%FF%FE%00k",
            "key_base64=not+base64!",
            "key_base64=YWI",
            &format!("key_base64={}", "QUFB".repeat(MAX_KEY_BYTES / 3 + 1)),
            &vec!["key=k"; MAX_KEYS + 1].join("&"),
        ] {
            let error = parse(bad).expect_err("refused");
            assert_eq!(error.code, "bad_query", "{bad}: {error}");
        }
        let most = (0..MAX_KEYS)
            .map(|k| format!("key=k{k}"))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(keys(&most).map(|keys| keys.len()), Some(MAX_KEYS));
    }

    /// Every byte percent-encoded.
    fn percent_encoded(bytes: &[u8]) -> String {
        bytes.iter().map(|byte| format!("%{byte:02X}")).collect()
    }

    proptest::proptest! {
        #[test]
        fn fuzz_key_filters_parse_to_the_bytes_of_the_keys_asked_for(
            asked in proptest::collection::vec(
                (proptest::bool::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..12)),
                1..20,
            ),
        ) {
            use base64::Engine as _;
            let query: Vec<String> = asked
                .iter()
                .map(|(as_text, key)| match std::str::from_utf8(key) {
                    Ok(text) if *as_text => format!("key={}", percent_encoded(text.as_bytes())),
                    _ => format!(
                        "key_base64={}",
                        percent_encoded(base64::engine::general_purpose::STANDARD.encode(key).as_bytes())
                    ),
                })
                .collect();
            let request = parse_stream_request(&hub(), &Grant::everything(), Some("orders"), &query.join("&"), None)
                .map_err(|error| proptest::test_runner::TestCaseError::fail(error.to_string()))?;
            let expected = KeySet::new(asked.iter().map(|(_, key)| key));
            proptest::prop_assert_eq!(request.interest.keys, Some(expected));
        }

        #[test]
        fn fuzz_key_filter_values_get_a_filter_or_a_clear_error(
            pairs in proptest::collection::vec(
                ("key|key_base64", "\\PC{0,30}|[A-Za-z0-9+/=%]{0,30}"),
                0..12,
            ),
        ) {
            let query: Vec<String> = pairs.iter().map(|(name, value)| format!("{name}={value}")).collect();
            match parse_stream_request(&hub(), &Grant::everything(), Some("orders"), &query.join("&"), None) {
                Ok(request) => proptest::prop_assert!(request
                    .interest
                    .keys
                    .is_none_or(|keys| keys.len() <= MAX_KEYS && keys.iter().all(|key| key.len() <= MAX_KEY_BYTES))),
                Err(error) => proptest::prop_assert_eq!(error.code, "bad_query"),
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn fuzz_query_and_last_event_id_near_valid(
            query in near_valid_query(),
            path in proptest::option::of(proptest::sample::select(vec!["orders", "drivers", "nope", ""])),
            last_event_id in proptest::option::of(near_valid_resume_id()),
        ) {
            check_request(&hub(), path, &query, last_event_id.as_deref())?;
        }

        #[test]
        fn fuzz_query_from_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            // A query reaches the parser as the text of a request target.
            let query = String::from_utf8_lossy(&bytes);
            check_request(&hub(), Some("orders"), &query, None)?;
            check_request(&hub(), None, &query, Some(&query))?;
        }

        #[test]
        fn fuzz_last_event_id_round_trips(
            ids in proptest::collection::vec((proptest::num::u64::ANY, proptest::num::u64::ANY), 1..4),
            garbage in "\\PC{0,40}",
        ) {
            let text = ids.iter().map(|(ms, seq)| format!("{ms}-{seq}")).collect::<Vec<_>>().join("_");
            let parsed = ResumeId::parse(&text, ids.len()).expect("a rendered id parses");
            let expected: Vec<StreamId> = ids.iter().map(|&(ms, seq)| StreamId { ms, seq }).collect();
            proptest::prop_assert_eq!(parsed.0, expected);
            proptest::prop_assert!(ResumeId::parse(&text, ids.len() + 1).is_err());
            for endpoints in 0..4 {
                let _ = ResumeId::parse(&garbage, endpoints);
            }
        }

        #[test]
        fn fuzz_query_and_resume_id_any_text(
            query in "\\PC{0,200}",
            path in proptest::option::of("\\PC{0,20}"),
            last_event_id in proptest::option::of("[0-9_\\-a-z]{0,40}"),
        ) {
            check_request(&hub(), path.as_deref(), &query, last_event_id.as_deref())?;
        }
    }
}
