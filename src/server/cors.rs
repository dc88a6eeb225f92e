//! The one CORS policy, for streams and every other route alike: which origins' pages may
//! read a response, with or without credentials ([`Cors::allow`]), the fields that say so on
//! a response ([`AllowOrigin::add_to`], the one way they reach one, whichever path wrote it),
//! and the answer to a preflight.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, header};
use warp::Reply;
use warp::reply::Response;

use crate::metrics::Metrics;
use fjord_bus::process::LogThrottle;

/// The origins whose pages may read streams. `*` lets any page read them, without
/// credentials; listed origins are echoed, and allowed credentials when the token may come
/// in a cookie (the one credential a browser adds by itself).
#[derive(Debug, Clone)]
pub(crate) struct Cors {
    any: bool,
    origins: Vec<String>,
    credentials: bool,
}

/// The CORS fields of a response to an allowed origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AllowOrigin {
    /// `*`, or the request's origin.
    origin: HeaderValue,
    credentials: bool,
}

/// A request refused by the CORS policy (a 403 `cors_forbidden` to the client): the message
/// says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct CorsRefused(pub(crate) String);

impl AllowOrigin {
    /// Adds the CORS fields to a response's.
    pub(crate) fn add_to(&self, headers: &mut HeaderMap) {
        for (name, value) in self.fields() {
            headers.append(name, value);
        }
    }

    /// The header fields, in the order they are written.
    fn fields(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        let echoed = self.origin != "*";
        [
            Some((header::ACCESS_CONTROL_ALLOW_ORIGIN, self.origin.clone())),
            // A cache must not hand one origin's answer to another.
            echoed.then(|| (header::VARY, HeaderValue::from_static("origin"))),
            (echoed && self.credentials).then(|| {
                (
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                )
            }),
        ]
        .into_iter()
        .flatten()
    }
}

static CORS_REFUSALS: LogThrottle = LogThrottle::new(Duration::from_secs(10));

impl Cors {
    /// From the manifest's `cors_origins` (`*` allows any); `credentials` when the token
    /// may come in a cookie.
    pub(crate) fn new(origins: &[String], credentials: bool) -> Self {
        Self {
            any: origins.iter().any(|origin| origin == "*"),
            origins: origins.to_vec(),
            credentials,
        }
    }

    /// The CORS fields for a request from `origin`: none without an `Origin`, a refusal
    /// (logged, at a bounded rate, with the allowed list) for an origin not allowed.
    pub(crate) fn allow(
        &self,
        origin: Option<&HeaderValue>,
        metrics: &Metrics,
    ) -> Result<Option<AllowOrigin>, CorsRefused> {
        let Some(origin) = origin else {
            return Ok(None);
        };
        if self.any {
            return Ok(Some(AllowOrigin {
                origin: HeaderValue::from_static("*"),
                credentials: false,
            }));
        }
        let listed = origin
            .to_str()
            .is_ok_and(|origin| self.origins.iter().any(|allowed| allowed == origin));
        if listed {
            return Ok(Some(AllowOrigin {
                origin: origin.clone(),
                credentials: self.credentials,
            }));
        }
        metrics.cors_refused.fetch_add(1, Relaxed);
        if let Some(held_back) = CORS_REFUSALS.admit() {
            let shown: String = String::from_utf8_lossy(origin.as_bytes())
                .chars()
                .take(200)
                .collect();
            tracing::warn!(
                origin = %shown,
                allowed = ?self.origins,
                held_back,
                "refused a request from an origin that server.cors_origins does not list; a page there cannot read streams (scheme, host and port must match exactly)"
            );
        }
        Err(CorsRefused(
            "CORS request forbidden: origin not allowed".into(),
        ))
    }
}

/// What a page may send: the methods and request headers a preflight allows, and how long
/// a browser may keep that answer.
const ALLOWED_METHODS: [&str; 2] = ["GET", "HEAD"];
const ALLOWED_HEADERS: [&str; 4] = [
    "authorization",
    "last-event-id",
    "cache-control",
    "content-type",
];
const PREFLIGHT_MAX_AGE_SECS: u32 = 600;

impl Cors {
    /// The answer to a preflight (`OPTIONS` with `Access-Control-Request-Method`): the
    /// origin's fields with the methods and headers a page may use, or a refusal.
    pub(crate) fn preflight(
        &self,
        headers: &HeaderMap,
        metrics: &Metrics,
    ) -> Result<Response, CorsRefused> {
        let allowed = self.allow(headers.get(header::ORIGIN), metrics)?;
        let method = headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|method| method.to_str().ok())
            .unwrap_or_default();
        if !ALLOWED_METHODS.contains(&method) {
            return Err(CorsRefused(
                "CORS request forbidden: only GET and HEAD are allowed".into(),
            ));
        }
        let requested = headers
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .flat_map(|value| value.to_str().unwrap_or("\u{0}").split(','))
            .map(|name| name.trim().to_ascii_lowercase())
            .filter(|name| !name.is_empty());
        for name in requested {
            if !ALLOWED_HEADERS.contains(&name.as_str()) {
                return Err(CorsRefused(format!(
                    "CORS request forbidden: header {name:?} is not allowed"
                )));
            }
        }
        let mut response = warp::reply().into_response();
        let headers = response.headers_mut();
        if let Some(allowed) = &allowed {
            allowed.add_to(headers);
        }
        for (name, list) in [
            (header::ACCESS_CONTROL_ALLOW_METHODS, &ALLOWED_METHODS[..]),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, &ALLOWED_HEADERS[..]),
        ] {
            if let Ok(value) = HeaderValue::from_str(&list.join(", ")) {
                headers.insert(name, value);
            }
        }
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(PREFLIGHT_MAX_AGE_SECS),
        );
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_allows_any_origin_without_credentials_and_a_list_echoes_with_them() {
        let metrics = Metrics::default();
        let origin = HeaderValue::from_static("https://app.example.com");
        let fields = |cors: &Cors, origin: &HeaderValue| -> Vec<(String, String)> {
            cors.allow(Some(origin), &metrics)
                .expect("allowed")
                .expect("fields")
                .fields()
                .map(|(name, value)| (name.to_string(), value.to_str().expect("ascii").to_owned()))
                .collect()
        };
        let star = Cors::new(&["*".into()], true);
        assert_eq!(
            fields(&star, &origin),
            [("access-control-allow-origin".into(), "*".into())]
        );
        let listed = Cors::new(&["https://app.example.com".into()], true);
        assert_eq!(
            fields(&listed, &origin),
            [
                (
                    "access-control-allow-origin".to_owned(),
                    "https://app.example.com".to_owned()
                ),
                ("vary".into(), "origin".into()),
                ("access-control-allow-credentials".into(), "true".into()),
            ]
        );
        let without_cookies = Cors::new(&["https://app.example.com".into()], false);
        assert_eq!(fields(&without_cookies, &origin).len(), 2);
        let refused = listed.allow(
            Some(&HeaderValue::from_static("http://127.0.0.1:5173")),
            &metrics,
        );
        assert!(refused.is_err());
        assert_eq!(metrics.cors_refused.load(Relaxed), 1);
        assert_eq!(listed.allow(None, &metrics), Ok(None));
    }
}
