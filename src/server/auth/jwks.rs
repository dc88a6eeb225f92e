//! A JWKS endpoint's keys. Verification reads the keys held now and never waits on the
//! network, except for a token whose key id is unknown: it asks for a refresh, which runs
//! as one background fetch at most once per [`MIN_REFRESH`], and waits for that fetch
//! (bounded by [`FETCH_TIMEOUT`]), or is answered at once when a fetch ran recently. So
//! tokens with made-up key ids neither hammer the identity provider nor hold up valid ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use tokio::sync::watch;

/// Shortest time between the starts of two fetches.
pub(super) const MIN_REFRESH: Duration = Duration::from_secs(10);
/// Longest a fetch may take, body included; also bounds how long a token waits for one.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document read; real ones are a few KiB.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Keys by key id.
type Keys = HashMap<String, DecodingKey>;

/// Why a fetch kept the keys held before.
#[derive(Debug, thiserror::Error)]
pub(super) enum JwksError {
    /// The request failed, timed out or got an error status.
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    /// The body is larger than any real JWKS.
    #[error("the document is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
    /// The body is not `{"keys": [...]}`; the parser's error is part of the message, not a
    /// source, so that the log line says why and a chain says it once.
    #[error("not a JWKS document: {0}")]
    Document(serde_json::Error),
}

/// Whether a fetch runs, and when the last one started.
#[derive(Debug, Default)]
struct Refresh {
    running: bool,
    last_started: Option<Instant>,
}

struct Shared {
    url: String,
    client: reqwest::Client,
    min_refresh: Duration,
    /// Swapped whole by a fetch; readers clone the `Arc` and never hold the lock longer.
    keys: RwLock<Arc<Keys>>,
    refresh: Mutex<Refresh>,
    /// Counts the fetches that ended, for the tokens waiting on one.
    fetches_ended: watch::Sender<u64>,
}

/// The cached keys of one JWKS URL.
#[derive(Clone)]
pub(super) struct JwksCache {
    shared: Arc<Shared>,
}

/// Marks the fetch ended when dropped, so that a failed or panicking fetch never leaves
/// the cache believing one runs.
struct FetchEnds(Arc<Shared>);

impl Drop for FetchEnds {
    fn drop(&mut self) {
        self.0
            .refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .running = false;
        self.0.fetches_ended.send_modify(|ended| *ended += 1);
    }
}

impl JwksCache {
    /// Fetches the keys once, waiting for them at most [`FETCH_TIMEOUT`]; a failure is
    /// logged, and the fetch retried for the first unknown key id.
    pub(super) async fn start(url: String, min_refresh: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let cache = Self {
            shared: Arc::new(Shared {
                url,
                client,
                min_refresh,
                keys: RwLock::new(Arc::default()),
                refresh: Mutex::new(Refresh::default()),
                fetches_ended: watch::Sender::new(0),
            }),
        };
        cache.refresh_and_wait().await;
        // The fetch at start loads the keys; it is not a refresh, so the first unknown key
        // id may ask for one at once (and recover at once if the start's fetch failed).
        cache
            .shared
            .refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_started = None;
        cache
    }

    /// The keys held now.
    fn held(&self) -> Arc<Keys> {
        Arc::clone(
            &self
                .shared
                .keys
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// The keys for `kid` (all keys when the token names none). An unknown id waits for a
    /// refresh: the one running, or a new one unless the last started within `min_refresh`.
    pub(super) async fn keys_for(&self, kid: Option<&str>) -> Vec<DecodingKey> {
        let held = self.held();
        let known = kid.is_none_or(|kid| held.contains_key(kid));
        let keys = if known {
            held
        } else {
            self.refresh_and_wait().await;
            self.held()
        };
        keys.iter()
            .filter(|(id, _)| kid.is_none_or(|kid| kid == id.as_str()))
            .map(|(_, key)| key.clone())
            .collect()
    }

    /// Starts a fetch if none runs and the last is old enough, then waits for the one
    /// running, if any, at most [`FETCH_TIMEOUT`].
    async fn refresh_and_wait(&self) {
        // Subscribed before looking, so that a fetch ending in between is not missed.
        let mut ended = self.shared.fetches_ended.subscribe();
        if self.start_refresh() {
            // The fetch times out by itself; this bound holds even if it did not.
            let _ = tokio::time::timeout(FETCH_TIMEOUT, ended.changed()).await;
        }
    }

    /// Whether a fetch runs now, started here or before.
    fn start_refresh(&self) -> bool {
        let mut refresh = self
            .shared
            .refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if refresh.running {
            return true;
        }
        if refresh
            .last_started
            .is_some_and(|at| at.elapsed() < self.shared.min_refresh)
        {
            return false;
        }
        refresh.running = true;
        refresh.last_started = Some(Instant::now());
        drop(refresh);
        // A task of its own, not the request's: a client that hangs up must not cancel
        // the fetch that other tokens wait for.
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let ends = FetchEnds(shared);
            let shared = &ends.0;
            match fetch(&shared.client, &shared.url).await {
                Ok(keys) => {
                    tracing::info!(url = %shared.url, keys = keys.len(), "fetched JWKS");
                    *shared.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
                }
                Err(error) => {
                    tracing::warn!(url = %shared.url, %error, "cannot fetch JWKS; keeping the keys we had");
                }
            }
        });
        true
    }
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Keys, JwksError> {
    let mut response = client.get(url).send().await?.error_for_status()?;
    let mut document = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if document.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(JwksError::TooLarge);
        }
        document.extend_from_slice(&chunk);
    }
    parse(&document).map_err(JwksError::Document)
}

#[derive(serde::Deserialize)]
struct Document {
    keys: Vec<serde_json::Value>,
}

/// The keys of a JWKS document that have a key id and a public key Fjord can verify with.
/// A key that does not parse is skipped, not the whole set: identity providers publish
/// encryption keys and new key types beside the signing keys. A symmetric (`oct`) key is
/// skipped too: a JWKS is public, so its secret would be anyone's.
fn parse(document: &[u8]) -> Result<Keys, serde_json::Error> {
    let document: Document = serde_json::from_slice(document)?;
    Ok(document
        .keys
        .into_iter()
        .filter_map(|key| serde_json::from_value::<Jwk>(key).ok())
        .filter(|jwk| !matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)))
        .filter_map(|jwk| {
            let kid = jwk.common.key_id.clone()?;
            DecodingKey::from_jwk(&jwk).ok().map(|key| (kid, key))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use proptest::prelude::*;

    use super::*;

    fn ed25519_jwk(kid: &str, x: &[u8]) -> serde_json::Value {
        serde_json::json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": kid, "x": URL_SAFE_NO_PAD.encode(x)})
    }

    #[test]
    fn keys_without_an_id_odd_keys_and_secrets_are_skipped_not_the_set() {
        let public = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let document = serde_json::json!({"keys": [
            ed25519_jwk("signing", public.as_bytes()),
            {"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(public.as_bytes())},
            {"kty": "oct", "kid": "shared", "k": URL_SAFE_NO_PAD.encode([1; 32])},
            {"kty": "RSA", "kid": "enc", "use": "enc", "alg": "RSA-OAEP-256", "n": "AQAB", "e": "AQAB"},
            {"kty": "future", "kid": "new"},
            "not a key"
        ]});
        let keys = parse(document.to_string().as_bytes()).expect("a JWKS");
        assert!(keys.contains_key("signing"));
        assert!(
            !keys.contains_key("shared"),
            "a public symmetric key is refused"
        );
        assert!(!keys.contains_key("new"));
        for bad in [&b"[]"[..], b"{}", b"{\"keys\": 1}", b"", b"\xff"] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    /// JWK-like values: the fields real keys have, with values of any shape.
    fn jwk_shape() -> impl Strategy<Value = serde_json::Value> {
        let text = prop_oneof![
            "[A-Za-z0-9_-]{0,64}".prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
        ];
        (
            prop::sample::select(vec!["OKP", "EC", "RSA", "oct", "x", ""]),
            prop::sample::select(vec!["Ed25519", "P-256", "P-384", "X25519", ""]),
            prop::option::of(text.clone()),
            text.clone(),
            text.clone(),
            text,
        )
            .prop_map(|(kty, crv, kid, x, y, n)| {
                serde_json::json!({"kty": kty, "crv": crv, "kid": kid, "x": x, "y": y, "n": n, "e": "AQAB", "k": "c2VjcmV0"})
            })
    }

    proptest! {
        #[test]
        fn fuzz_jwks_document_bytes(document in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&document);
        }

        #[test]
        fn fuzz_jwks_document_shapes(keys in proptest::collection::vec(jwk_shape(), 0..8)) {
            let document = serde_json::json!({"keys": keys}).to_string();
            let parsed = parse(document.as_bytes()).expect("the envelope is valid");
            prop_assert!(parsed.len() <= keys.len());
        }

        #[test]
        fn fuzz_jwks_round_trip(seed in any::<[u8; 32]>(), kid in "[A-Za-z0-9_-]{1,40}") {
            let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
            let document = serde_json::json!({"keys": [ed25519_jwk(&kid, public.as_bytes())]});
            let parsed = parse(document.to_string().as_bytes()).expect("a JWKS");
            prop_assert_eq!(parsed.len(), 1);
            prop_assert!(parsed.contains_key(&kid));
        }
    }
}
