//! A JWKS endpoint's keys, fetched at start and again when a token names an unknown key id
//! — at most once per [`MIN_REFRESH`], so that tokens with made-up key ids cannot make the
//! server hammer the identity provider.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::JwkSet;
use tokio::sync::Mutex;

/// Shortest time between two fetches.
const MIN_REFRESH: Duration = Duration::from_secs(10);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

struct State {
    keys: HashMap<String, DecodingKey>,
    fetched_at: Option<Instant>,
}

/// The cached keys of one JWKS URL.
#[derive(Clone)]
pub(super) struct JwksCache {
    url: String,
    client: reqwest::Client,
    state: Arc<Mutex<State>>,
}

impl JwksCache {
    /// Fetches the keys once; a failure is logged and retried on the first token.
    pub(super) async fn start(url: String) -> Self {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let cache = Self {
            url,
            client,
            state: Arc::new(Mutex::new(State {
                keys: HashMap::new(),
                fetched_at: None,
            })),
        };
        let mut state = cache.state.lock().await;
        cache.refresh(&mut state).await;
        drop(state);
        cache
    }

    async fn refresh(&self, state: &mut State) {
        state.fetched_at = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(url = %self.url, keys = keys.len(), "fetched JWKS");
                state.keys = keys;
            }
            Err(error) => {
                tracing::warn!(url = %self.url, %error, "cannot fetch JWKS; keeping the keys we had")
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, DecodingKey>, reqwest::Error> {
        let set: JwkSet = self
            .client
            .get(&self.url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                DecodingKey::from_jwk(jwk).ok().map(|key| (kid, key))
            })
            .collect())
    }

    /// The keys for `kid` (all keys when the token names none), refreshing once when the
    /// id is unknown and the last fetch is old enough.
    pub(super) async fn keys_for(&self, kid: Option<&str>) -> HashMap<String, DecodingKey> {
        let mut state = self.state.lock().await;
        let known = |state: &State| kid.is_none_or(|kid| state.keys.contains_key(kid));
        let stale = state
            .fetched_at
            .is_none_or(|at| at.elapsed() >= MIN_REFRESH);
        if !known(&state) && stale {
            self.refresh(&mut state).await;
        }
        state
            .keys
            .iter()
            .filter(|(id, _)| kid.is_none_or(|kid| kid == id.as_str()))
            .map(|(id, key)| (id.clone(), key.clone()))
            .collect()
    }
}
