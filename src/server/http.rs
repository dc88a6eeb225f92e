//! warp's routes of `fjord-server`, all but the streams (which the connection module
//! serves): health, readiness, metrics and static files, their CORS, and rejections turned
//! into JSON errors.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use http::{HeaderMap, HeaderValue, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::hub::Hub;
use fjord_config::ServerConfig;

use crate::cors::{AllowOrigin, Cors};
use crate::request::ApiError;

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

/// GET, and HEAD: the same response without its body (hyper leaves the body out).
fn get_or_head() -> impl Filter<Extract = (), Error = Rejection> + Copy {
    warp::get().or(warp::head()).unify()
}

/// What `/readyz` says: the hub's readiness (the bus answers, the server is not draining),
/// and, in a process that also consumes (`fjord dev`), that its consumer holds its
/// partitions and is not holding one back, so that a record produced once `/readyz` says
/// 200 is not missed.
#[derive(Debug, Clone)]
pub(crate) struct Readiness {
    pub(crate) hub: Arc<Hub>,
    /// Why the consumer is not consuming; `None` while it is.
    pub(crate) consumer: Option<tokio::sync::watch::Receiver<Option<&'static str>>>,
}

impl Readiness {
    /// `None` when ready, else why not.
    fn not_ready(&self) -> Option<&'static str> {
        if !self.hub.is_ready() {
            Some("the bus has not answered recently, or the server is draining")
        } else {
            self.consumer
                .as_ref()
                .and_then(|consumer| *consumer.borrow())
        }
    }
}

/// Every route of the server but the streams, and `static_files` (none in production).
/// `/metrics` is among them unless `server.metrics_listener` moved it.
pub(crate) fn routes(
    readiness: &Readiness,
    config: &ServerConfig,
    cors: Cors,
    static_files: &'static [StaticFile],
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    let files = warp::path::full().and(get_or_head()).and_then(
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
    let hub = &readiness.hub;
    let routes = probes(readiness, config.metrics_on_public_port())
        .or(files)
        .unify();
    let recover = recover(hub);
    let preflight = {
        let (cors, hub) = (cors.clone(), Arc::clone(hub));
        warp::options()
            .and(warp::header::headers_cloned())
            .and_then(move |headers: HeaderMap| {
                // An OPTIONS request that is no preflight goes on to the routes (405).
                let answer = if headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
                    cors.preflight(&headers, hub.metrics())
                        .map_err(|refusal| warp::reject::custom(ApiError::from(refusal)))
                } else {
                    Err(warp::reject::not_found())
                };
                std::future::ready(answer)
            })
    };
    // The origin is checked before the route runs; errors become responses with the
    // origin's fields, so that a page on an allowed origin can read why it was refused.
    let origin = {
        let hub = Arc::clone(hub);
        warp::header::optional::<HeaderValue>("origin").and_then(
            move |origin: Option<HeaderValue>| {
                let allowed = cors
                    .allow(origin.as_ref(), hub.metrics())
                    .map_err(|refusal| warp::reject::custom(ApiError::from(refusal)));
                std::future::ready(allowed)
            },
        )
    };
    let answered = origin.and(routes.recover(recover.clone()).unify()).map(
        |allowed: Option<AllowOrigin>, mut response: Response| {
            if let Some(allowed) = &allowed {
                allowed.add_to(response.headers_mut());
            }
            response
        },
    );
    preflight.or(answered).unify().recover(recover).unify()
}

/// `/healthz`, `/readyz` and `/metrics`, for `server.metrics_listener`: no CORS, no files.
pub(crate) fn probe_routes(
    readiness: &Readiness,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    probes(readiness, true)
        .recover(recover(&readiness.hub))
        .unify()
}

fn probes(
    readiness: &Readiness,
    with_metrics: bool,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {
    let with_hub = {
        let hub = Arc::clone(&readiness.hub);
        warp::any().map(move || Arc::clone(&hub))
    };
    let with_readiness = {
        let readiness = readiness.clone();
        warp::any().map(move || readiness.clone())
    };
    let healthz = warp::path!("healthz")
        .and(get_or_head())
        .map(|| warp::reply::json(&serde_json::json!({"status": "ok"})).into_response());
    let readyz = warp::path!("readyz")
        .and(get_or_head())
        .and(with_readiness)
        .map(|readiness: Readiness| match readiness.not_ready() {
            None => warp::reply::json(&serde_json::json!({"status": "ready"})).into_response(),
            Some(why) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", why)
                .response()
                .map(Into::into),
        });
    let metrics = warp::path!("metrics")
        .and(get_or_head())
        .and(with_hub)
        .and_then(move |hub: Arc<Hub>| async move {
            if !with_metrics {
                return Err(warp::reject::not_found());
            }
            let mut response = hub.metrics().render().into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(response)
        });
    healthz.or(readyz).unify().or(metrics).unify()
}

fn recover(
    hub: &Arc<Hub>,
) -> impl Fn(Rejection) -> std::future::Ready<Result<Response, Infallible>> + Clone + Send + Sync + 'static
{
    let hub = Arc::clone(hub);
    move |rejection: Rejection| std::future::ready(Ok(refusal(&hub, &rejection)))
}

/// The answer to a rejected request: the [`ApiError`] it carries, or one for warp's own
/// rejections.
fn refusal(hub: &Hub, rejection: &Rejection) -> Response {
    hub.metrics().requests_refused.fetch_add(1, Relaxed);
    let error = if let Some(error) = rejection.find::<ApiError>() {
        error.clone()
    } else if rejection.is_not_found() {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route; streams are at /v1/streams/{endpoint}",
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "only GET and HEAD are served",
        )
    } else if let Some(header) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_header", header.to_string())
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{rejection:?}"),
        )
    };
    error.response().map(Into::into)
}
