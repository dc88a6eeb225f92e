//! The HTTP surface of `fjord-server`: what a stream request asks for and whether it may
//! have it, the warp routes for health, readiness, metrics and files, CORS, and errors as
//! JSON with the fitting status. Requests are parsed and checked here; a bad one is answered
//! with a clear error, never a panic or a 500. (Stream responses are written by
//! [`crate::connection`].)

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::auth::{AuthError, Authenticator, Forbidden, Grant, find_token};
use crate::config::ServerConfig;
use crate::hub::{Hub, Interest, Subscription};
use crate::sse::ResumeId;

/// Most keys one connection may filter on.
const MAX_KEYS: usize = 1000;
/// Longest key filter.
const MAX_KEY_BYTES: usize = 1024;

/// A request refused with a status and a stable error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl warp::reject::Reject for ApiError {}

impl ApiError {
    /// A refusal with `status` and a stable `code`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The JSON body: `{"error":{"code":..,"message":..}}`.
    pub fn body(&self) -> String {
        serde_json::json!({"error": {"code": self.code, "message": self.message}}).to_string()
    }

    /// The `WWW-Authenticate` challenge of a 401.
    pub fn challenge(&self) -> Option<String> {
        (self.status == StatusCode::UNAUTHORIZED).then(|| {
            format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                self.code
            )
        })
    }

    fn bad_query(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_query",
            message: message.into(),
        }
    }

    fn unknown_endpoint(name: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "unknown_endpoint",
            message: format!(
                "no endpoint is named {:?}",
                name.chars().take(100).collect::<String>()
            ),
        }
    }

    fn unauthorized(error: &AuthError) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: error.code(),
            message: error.to_string(),
        }
    }

    fn forbidden(error: &Forbidden) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: error.to_string(),
        }
    }

    fn into_response(self) -> Response {
        let mut response = warp::http::Response::new(self.body().into());
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(value) = self
            .challenge()
            .and_then(|challenge| HeaderValue::from_str(&challenge).ok())
        {
            headers.insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// The origins whose pages may read streams.
#[derive(Debug, Clone)]
pub struct Cors {
    any: bool,
    origins: Vec<String>,
}

impl Cors {
    /// From the manifest's `cors_origins`; `*` allows any.
    pub fn new(origins: &[String]) -> Self {
        Self {
            any: origins.iter().any(|origin| origin == "*"),
            origins: origins.to_vec(),
        }
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`: none without an
    /// `Origin`, a refusal for an origin not allowed.
    pub fn allow(&self, origin: Option<&HeaderValue>) -> Result<Option<HeaderValue>, ApiError> {
        let Some(origin) = origin else {
            return Ok(None);
        };
        let allowed = self.any
            || origin
                .to_str()
                .is_ok_and(|origin| self.origins.iter().any(|allowed| allowed == origin));
        if allowed {
            Ok(Some(origin.clone()))
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "cors_forbidden",
                "CORS request forbidden: origin not allowed",
            ))
        }
    }
}

/// What a stream request asks for, parsed from its path and query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRequest {
    /// Which endpoints and keys.
    pub interest: Interest,
    /// Where to resume, from `Last-Event-ID` or `?last_event_id=`.
    pub resume: Option<ResumeId>,
}

/// Parses a stream request: `path_endpoint` from `/v1/streams/{endpoint}` (else the query's
/// `endpoint=` values), the raw query string, and the `Last-Event-ID` header. An endpoint
/// name that `grant` does not open is refused before it is looked up, so that the refusal
/// is the same whether the endpoint exists or not.
pub fn parse_stream_request(
    hub: &Hub,
    grant: &Grant,
    path_endpoint: Option<&str>,
    query: &str,
    last_event_id: Option<&str>,
) -> Result<StreamRequest, ApiError> {
    let mut endpoints = Vec::new();
    let mut keys: Option<Vec<String>> = None;
    let mut query_last_event_id = None;
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
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "endpoint" if path_endpoint.is_some() => {
                return Err(ApiError::bad_query(
                    "endpoint= goes with /v1/streams, not /v1/streams/{endpoint}",
                ));
            }
            "endpoint" => add_endpoint(&value)?,
            "key" => {
                if value.len() > MAX_KEY_BYTES {
                    return Err(ApiError::bad_query(format!(
                        "a key is longer than {MAX_KEY_BYTES} bytes"
                    )));
                }
                let keys = keys.get_or_insert_with(Vec::new);
                if keys.len() == MAX_KEYS {
                    return Err(ApiError::bad_query(format!("at most {MAX_KEYS} keys")));
                }
                keys.push(value.into_owned());
            }
            "last_event_id" => query_last_event_id = Some(value.into_owned()),
            // Taken by the auth layer, where the manifest allows it.
            "access_token" => {}
            other => {
                return Err(ApiError::bad_query(format!(
                    "unknown query parameter {:?}; expected endpoint, key, last_event_id or access_token",
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
    if let Some(keys) = &mut keys {
        keys.sort_unstable();
        keys.dedup();
    }
    // The header wins: EventSource sends it on reconnect, after a first request whose
    // query id is stale.
    let resume = last_event_id
        .or(query_last_event_id.as_deref())
        .filter(|id| !id.is_empty())
        .map(|id| ResumeId::parse(id, endpoints.len()))
        .transpose()
        .map_err(|error| ApiError::bad_query(error.to_string()))?;
    Ok(StreamRequest {
        interest: Interest { endpoints, keys },
        resume,
    })
}

/// The value of the first `name=` of a query string.
fn query_value(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// Authenticates, parses, authorizes and subscribes one stream request. The token is
/// checked first, so that a caller without one learns nothing about the endpoints.
pub async fn open_stream(
    hub: &Arc<Hub>,
    auth: &Authenticator,
    path_endpoint: Option<&str>,
    query: &str,
    headers: &warp::http::HeaderMap,
) -> Result<Subscription, ApiError> {
    let query_token = query_value(query, "access_token");
    let token = find_token(headers, query_token.as_deref(), auth.sources());
    let grant = auth
        .grant(token)
        .await
        .map_err(|error| ApiError::unauthorized(&error))?;
    let last_event_id = headers.get("last-event-id").map(|value| {
        value
            .to_str()
            .map_err(|_| ApiError::bad_query("Last-Event-ID is not ASCII"))
    });
    let last_event_id = last_event_id.transpose()?;
    let mut request = parse_stream_request(hub, &grant, path_endpoint, query, last_event_id)?;
    request.interest.keys = grant
        .narrow_keys(request.interest.keys.take())
        .map_err(|error| ApiError::forbidden(&error))?;
    Ok(hub.subscribe(request.interest, request.resume.as_ref(), grant.expires_at))
}

/// A file served as is, such as `fjord dev`'s demo page.
#[derive(Debug, Clone, Copy)]
pub struct StaticFile {
    /// The URL path, `/` or `/app.js`.
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its contents.
    pub body: &'static str,
}

/// Every route of the server but the streams, and `static_files` (none in production).
pub fn routes(
    hub: &Arc<Hub>,
    config: &ServerConfig,
    static_files: &'static [StaticFile],
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    let with_hub = {
        let hub = Arc::clone(hub);
        warp::any().map(move || Arc::clone(&hub))
    };

    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&serde_json::json!({"status": "ok"})).into_response());
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_hub.clone())
        .map(|hub: Arc<Hub>| {
            if hub.is_ready() {
                warp::reply::json(&serde_json::json!({"status": "ready"})).into_response()
            } else {
                ApiError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: "not_ready",
                    message: "the bus has not answered recently, or the server is draining".into(),
                }
                .into_response()
            }
        });
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_hub)
        .map(|hub: Arc<Hub>| {
            let mut response = hub.metrics().render().into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        });
    let files = warp::path::full().and(warp::get()).and_then(
        move |path: warp::path::FullPath| async move {
            match static_files.iter().find(|file| file.path == path.as_str()) {
                Some(file) => {
                    let mut response = file.body.into_response();
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(file.content_type),
                    );
                    Ok(response)
                }
                None => Err(warp::reject::not_found()),
            }
        },
    );

    let routes = healthz
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .or(files)
        .unify();
    let recover = {
        let hub = Arc::clone(hub);
        move |rejection: Rejection| {
            let hub = Arc::clone(&hub);
            async move { Ok::<_, Infallible>(error_response(&hub, &rejection)) }
        }
    };
    // Errors become responses inside the CORS wrapper, so that a page on an allowed origin
    // can read why it was refused; the outer recover answers what CORS itself refuses.
    routes
        .recover(recover.clone())
        .unify()
        .with(cors(&config.cors_origins))
        .map(Reply::into_response)
        .recover(recover)
        .unify()
}

fn cors(origins: &[String]) -> warp::cors::Builder {
    let builder = warp::cors()
        .allow_methods(["GET"])
        .allow_headers([
            "authorization",
            "last-event-id",
            "cache-control",
            "content-type",
        ])
        .max_age(600);
    if origins.iter().any(|origin| origin == "*") {
        builder.allow_any_origin()
    } else {
        builder.allow_origins(origins.iter().map(String::as_str))
    }
}

fn error_response(hub: &Hub, rejection: &Rejection) -> Response {
    hub.metrics().requests_refused.fetch_add(1, Relaxed);
    let error = if let Some(error) = rejection.find::<ApiError>() {
        error.clone()
    } else if rejection.is_not_found() {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: "no such route; streams are at /v1/streams/{endpoint}".into(),
        }
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "method_not_allowed",
            message: "only GET is served".into(),
        }
    } else if let Some(forbidden) = rejection.find::<warp::cors::CorsForbidden>() {
        ApiError {
            status: StatusCode::FORBIDDEN,
            code: "cors_forbidden",
            message: forbidden.to_string(),
        }
    } else if let Some(header) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_header",
            message: header.to_string(),
        }
    } else {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: format!("{rejection:?}"),
        }
    };
    error.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;
    use crate::bus::{Bus, StreamId};
    use crate::config::{EndpointName, StartPosition};

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
        assert_eq!(request.interest.keys, Some(vec!["a".into(), "b".into()]));
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
            (Some("orders"), "", Some("yesterday"), "bad_query"),
            (
                None,
                "endpoint=orders&endpoint=drivers",
                Some("1-0"),
                "bad_query",
            ),
            (Some("orders"), "key=%FF%FE", Some("1-0_2-0"), "bad_query"),
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
    fn a_narrow_token_gets_the_same_refusal_for_existing_and_unknown_endpoints() {
        let narrow = Grant {
            endpoints: Some(vec!["orders".into()]),
            keys: None,
            expires_at: None,
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

    proptest::proptest! {
        #[test]
        fn any_query_and_resume_id_is_answered_without_panicking(
            query in "\\PC{0,200}",
            path in proptest::option::of("\\PC{0,20}"),
            last_event_id in proptest::option::of("[0-9_\\-a-z]{0,40}"),
        ) {
            let hub = hub();
            if let Ok(request) = parse_stream_request(&hub, &Grant::everything(), path.as_deref(), &query, last_event_id.as_deref()) {
                proptest::prop_assert!(!request.interest.endpoints.is_empty());
                proptest::prop_assert!(request.interest.endpoints.iter().all(|&i| i < hub.endpoints().len()));
            }
        }
    }
}
