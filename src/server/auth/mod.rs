//! Access control: who may stream what. A request's token is found where the manifest
//! allows (`Authorization: Bearer`, a cookie, or `?access_token=` when enabled), verified
//! against the manifest's pinned algorithms and keys (PEM keys, an HS256 secret, or a JWKS
//! URL), and its `fjord` claim becomes a [`Grant`]: the endpoints it opens and the record
//! keys it pins. Tokens are never logged.
//!
//! The claim: `"fjord": {"endpoints": ["orders"], "keys": ["driver-42"], "filters":
//! {"orders": "value.restaurant_id == \"r-7\""}}`; `"*"` opens every endpoint; without
//! `keys` the token sees every record of its endpoints. A key is text, or `{"base64": "..."}`
//! for a key that is not UTF-8. A filter pins what the token sees of one endpoint (`"*"`: of
//! every one); a request's own filter is ANDed with it, so it can only narrow it.

mod jwks;
mod token;

use std::collections::BTreeMap;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

pub use crate::keys::KeySet;
use fjord_config::{AuthConfig, Filter, JwtAlgorithm, JwtConfig, Limits, ManifestError};
pub(crate) use token::{TokenSources, find_token};

/// Why a request's token was refused (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token where the manifest allows one.
    #[error("no token: send Authorization: Bearer <token>{0}")]
    Missing(&'static str),
    /// Not a JWT: not three segments, or one is not base64url or not JSON.
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(&'static str),
    /// A JWT whose header is JSON but not a valid JOSE header (no `alg`, a field of the
    /// wrong type).
    #[error("the token's header is invalid: {0}")]
    Header(String),
    /// Signed with an algorithm the manifest does not accept (`none` included).
    #[error("the token's algorithm {0} is not accepted")]
    Algorithm(String),
    /// The signature does not verify with any of the keys.
    #[error("the token's signature does not verify")]
    Signature,
    /// `exp` is past.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `aud` does not name this server.
    #[error("the token is for another audience")]
    Audience,
    /// `iss` is not the configured issuer.
    #[error("the token is from another issuer")]
    Issuer,
    /// A claim is missing or of the wrong type.
    #[error("the token's claims are invalid: {0}")]
    Claims(String),
    /// The token names a key id that is not known, even after refreshing the JWKS.
    #[error("the token's key id is unknown")]
    UnknownKey,
}

impl AuthError {
    /// The stable code clients see.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Self::Missing(_) => "token_missing",
            Self::Malformed(_) => "token_malformed",
            Self::Header(_) => "token_header",
            Self::Algorithm(_) => "token_algorithm",
            Self::Signature => "token_signature",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::Audience => "token_audience",
            Self::Issuer => "token_issuer",
            Self::Claims(_) => "token_claims",
            Self::UnknownKey => "token_unknown_key",
        }
    }
}

/// A request beyond what its token allows (403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Forbidden {
    /// The endpoint is not in the token's claim.
    #[error("the token does not open endpoint {0:?}")]
    Endpoint(String),
    /// A key filter beyond the keys the token pins.
    #[error("the token does not open key {0:?}")]
    Key(String),
}

/// What a verified token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The endpoints it opens; `None` for all.
    pub endpoints: Option<Vec<String>>,
    /// The only record keys it may see; `None` for all.
    pub keys: Option<KeySet>,
    /// The filters it pins, by endpoint name (`"*"` for every endpoint).
    pub filters: BTreeMap<String, Filter>,
    /// When the stream must end, in seconds since the epoch: the token's `exp` plus the
    /// leeway that admitted it; `None` when auth is disabled.
    pub expires_at: Option<u64>,
    /// The token's `sub`, whose streams `server.max_connections_per_subject` counts.
    pub subject: Option<String>,
}

impl Grant {
    /// Everything, for ever: auth disabled.
    pub(crate) fn everything() -> Self {
        Self {
            endpoints: None,
            keys: None,
            filters: BTreeMap::new(),
            expires_at: None,
            subject: None,
        }
    }

    /// Checks that the token opens the endpoint named `endpoint`, whether or not such an
    /// endpoint exists: asked before the name is looked up, so that the answer does not
    /// tell a narrow token which endpoints exist.
    pub(crate) fn open(&self, endpoint: &str) -> Result<(), Forbidden> {
        match &self.endpoints {
            Some(allowed) if !allowed.iter().any(|a| a == endpoint || a == "*") => {
                Err(Forbidden::Endpoint(endpoint.to_owned()))
            }
            _ => Ok(()),
        }
    }

    /// The filter the token pins on `endpoint`: its own and the one for every endpoint,
    /// ANDed; `None` when it pins none.
    pub(crate) fn filter_of(&self, endpoint: &str) -> Option<Filter> {
        Filter::all(
            ["*", endpoint]
                .into_iter()
                .filter_map(|name| self.filters.get(name).cloned()),
        )
    }

    /// Narrows `keys` (the request's filter) to the pinned keys: a request may narrow what
    /// the token allows, never widen it.
    pub(crate) fn narrow_keys(&self, keys: Option<KeySet>) -> Result<Option<KeySet>, Forbidden> {
        match (&self.keys, keys) {
            (None, keys) => Ok(keys),
            (Some(pinned), None) => Ok(Some(pinned.clone())),
            (Some(pinned), Some(asked)) => {
                let refused = asked
                    .iter()
                    .find(|key| !pinned.contains(key))
                    .map(|key| String::from_utf8_lossy(key).into_owned());
                match refused {
                    Some(refused) => Err(Forbidden::Key(refused)),
                    None => Ok(Some(asked)),
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    exp: u64,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    fjord: Option<FjordClaim>,
}

#[derive(Debug, Deserialize)]
struct FjordClaim {
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    keys: Option<Vec<PinnedKey>>,
    /// Filter source by endpoint name.
    #[serde(default)]
    filters: BTreeMap<String, String>,
}

/// A record key a token pins, as the envelope shows keys: text for the key of those UTF-8
/// bytes, `{"base64": "..."}` for any bytes.
#[derive(Debug)]
struct PinnedKey(Vec<u8>);

impl<'de> Deserialize<'de> for PinnedKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            Text(String),
            Bytes { base64: String },
        }
        match Shape::deserialize(deserializer)? {
            Shape::Text(text) => Ok(Self(text.into_bytes())),
            Shape::Bytes { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64)
                .map(Self)
                .map_err(serde::de::Error::custom),
        }
    }
}

fn algorithm(alg: JwtAlgorithm) -> Algorithm {
    match alg {
        JwtAlgorithm::EdDsa => Algorithm::EdDSA,
        JwtAlgorithm::Es256 => Algorithm::ES256,
        JwtAlgorithm::Rs256 => Algorithm::RS256,
        JwtAlgorithm::Hs256 => Algorithm::HS256,
    }
}

/// A verification key with the id it is known by.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    key: DecodingKey,
}

/// Verifies tokens. Built once at start, from the manifest; cheap to share.
#[derive(Clone)]
pub struct Authenticator {
    jwt: Option<Arc<JwtVerifier>>,
    sources: TokenSources,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.jwt.is_some())
            .field("sources", &self.sources)
            .finish()
    }
}

struct JwtVerifier {
    algorithms: Vec<Algorithm>,
    keys: Vec<Key>,
    jwks: Option<jwks::JwksCache>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
    /// How large the filters a token pins may be.
    filter_limits: Limits,
}

impl Authenticator {
    /// Loads keys and secrets named by the manifest; fails on a key that does not parse.
    /// The filters tokens pin may be as large as `filter_limits` allows.
    pub async fn new(config: &AuthConfig, filter_limits: &Limits) -> Result<Self, ManifestError> {
        let AuthConfig::Jwt(jwt) = config else {
            tracing::warn!("auth is disabled by the manifest: every endpoint is open to anyone");
            return Ok(Self {
                jwt: None,
                sources: TokenSources::default(),
            });
        };
        let keys = load_keys(jwt)?;
        let jwks = match &jwt.jwks_url {
            Some(url) => Some(jwks::JwksCache::start(url.clone(), jwks::MIN_REFRESH).await),
            None => None,
        };
        let verifier = JwtVerifier {
            algorithms: jwt.algorithms.iter().copied().map(algorithm).collect(),
            keys,
            jwks,
            issuer: jwt.issuer.clone(),
            audience: jwt.audience.clone(),
            leeway_secs: jwt.leeway_secs,
            filter_limits: *filter_limits,
        };
        Ok(Self {
            jwt: Some(Arc::new(verifier)),
            sources: TokenSources {
                cookie: jwt.token_cookie.clone(),
                query: jwt.allow_query_token,
            },
        })
    }

    /// Where tokens may come from.
    pub(crate) fn sources(&self) -> &TokenSources {
        &self.sources
    }

    /// Verifies the request's token, if auth is on, and returns what it allows.
    pub async fn grant(&self, token: Option<&str>) -> Result<Grant, AuthError> {
        let Some(verifier) = &self.jwt else {
            return Ok(Grant::everything());
        };
        let token = token.ok_or(AuthError::Missing(self.sources.hint()))?;
        verifier.verify(token).await
    }
}

fn load_keys(jwt: &JwtConfig) -> Result<Vec<Key>, ManifestError> {
    let mut keys = Vec::new();
    for (i, key) in jwt.keys.iter().enumerate() {
        let path = format!("$.auth.keys[{i}]");
        let pem = match (&key.pem, &key.pem_file) {
            (Some(pem), _) => pem.clone(),
            (None, Some(file)) => {
                std::fs::read_to_string(file).map_err(|error| ManifestError::Invalid {
                    file: None,
                    path: format!("{path}.pem_file"),
                    message: format!("cannot read {}: {error}", file.display()),
                })?
            }
            (None, None) => String::new(),
        };
        let decoded = [
            DecodingKey::from_ed_pem,
            DecodingKey::from_ec_pem,
            DecodingKey::from_rsa_pem,
        ]
        .iter()
        .find_map(|parse| parse(pem.as_bytes()).ok())
        .ok_or_else(|| ManifestError::Invalid {
            file: None,
            path,
            message: "not a PEM public key (Ed25519, P-256 or RSA)".into(),
        })?;
        keys.push(Key {
            kid: key.kid.clone(),
            key: decoded,
        });
    }
    if let Some(secret) = &jwt.hs256_secret_env {
        let value = secret.read()?;
        check_hs256_secret(secret.env_name(), &value)?;
        keys.push(Key {
            kid: None,
            key: DecodingKey::from_secret(value.as_bytes()),
        });
    }
    Ok(keys)
}

/// Shortest HS256 secret accepted: as long as the hash (RFC 7518 §3.2). Anyone who can
/// guess a shorter or empty one can sign tokens that open every endpoint.
const MIN_HS256_SECRET_BYTES: usize = 32;

/// Fewest different bytes an HS256 secret may have. Random bytes of the accepted length,
/// in any text encoding (hex, base64), have far more; a secret of one repeated character or
/// of spaces is a placeholder anyone can guess, whatever its length.
const MIN_HS256_SECRET_DISTINCT_BYTES: usize = 8;

/// Refuses an HS256 secret too short or too uniform to resist guessing. The message names
/// the variable and the manifest field, never the value or its length.
fn check_hs256_secret(env: &str, value: &str) -> Result<(), ManifestError> {
    let mut seen = [false; 256];
    for byte in value.bytes() {
        seen[usize::from(byte)] = true;
    }
    let distinct = seen.iter().filter(|&&seen| seen).count();
    let what = if value.is_empty() {
        "is empty".to_owned()
    } else if value.len() < MIN_HS256_SECRET_BYTES {
        format!("is shorter than {MIN_HS256_SECRET_BYTES} bytes")
    } else if distinct < MIN_HS256_SECRET_DISTINCT_BYTES
        || value.trim().len() < MIN_HS256_SECRET_BYTES
    {
        format!(
            "looks like a placeholder, not random bytes (fewer than {MIN_HS256_SECRET_DISTINCT_BYTES} different bytes, or mostly spaces)"
        )
    } else {
        return Ok(());
    };
    Err(ManifestError::Invalid {
        file: None,
        path: "$.auth.hs256_secret_env".into(),
        message: format!(
            "the HS256 secret in environment variable {env} {what}; it must be at least {MIN_HS256_SECRET_BYTES} random bytes (for example `openssl rand -base64 48`)"
        ),
    })
}

impl JwtVerifier {
    async fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let header = header_of(token)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm(format!("{:?}", header.alg)));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        validation.validate_aud = self.audience.is_some();
        let mut required = vec!["exp"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if let Some(audience) = &self.audience {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);

        let candidates = self.candidates(header.kid.as_deref(), header.alg).await?;
        let mut last_error = AuthError::Signature;
        for key in &candidates {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    return grant_of(data.claims, self.leeway_secs, &self.filter_limits);
                }
                Err(error) => {
                    last_error = match error.kind() {
                        ErrorKind::InvalidSignature
                        | ErrorKind::InvalidAlgorithm
                        | ErrorKind::InvalidKeyFormat => AuthError::Signature,
                        ErrorKind::ExpiredSignature => return Err(AuthError::Expired),
                        ErrorKind::ImmatureSignature => return Err(AuthError::NotYetValid),
                        ErrorKind::InvalidAudience => return Err(AuthError::Audience),
                        ErrorKind::InvalidIssuer => return Err(AuthError::Issuer),
                        ErrorKind::MissingRequiredClaim(claim) => {
                            return Err(AuthError::Claims(format!("{claim} is missing")));
                        }
                        ErrorKind::InvalidClaimFormat(claim) => {
                            return Err(AuthError::Claims(format!("{claim} has the wrong type")));
                        }
                        ErrorKind::Json(_) => {
                            return Err(AuthError::Claims("the claims are not as expected".into()));
                        }
                        ErrorKind::Base64(_) => {
                            return Err(AuthError::Malformed(
                                "the claims or the signature are not base64url",
                            ));
                        }
                        ErrorKind::Utf8(_) => {
                            return Err(AuthError::Malformed("the claims are not UTF-8"));
                        }
                        ErrorKind::InvalidToken => {
                            return Err(AuthError::Malformed(
                                "a JWT is three base64url segments separated by dots",
                            ));
                        }
                        _ => AuthError::Signature,
                    };
                }
            }
        }
        Err(last_error)
    }

    /// The keys that may have signed a token with this key id and algorithm: of the
    /// algorithm's family only, so that a public key can never serve as an HMAC secret.
    async fn candidates(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Vec<DecodingKey>, AuthError> {
        let family = alg.family();
        let fits = |key: &&Key| {
            key.key.family() == family
                && (kid.is_none() || key.kid.is_none() || key.kid.as_deref() == kid)
        };
        let mut keys: Vec<DecodingKey> = self
            .keys
            .iter()
            .filter(fits)
            .map(|k| k.key.clone())
            .collect();
        if let Some(jwks) = &self.jwks {
            let from_jwks = jwks.keys_for(kid).await;
            keys.extend(from_jwks.into_iter().filter(|key| key.family() == family));
        }
        if keys.is_empty() {
            return Err(if kid.is_some() {
                AuthError::UnknownKey
            } else {
                AuthError::Signature
            });
        }
        Ok(keys)
    }
}

/// A token's header, its structure checked step by step so that each fault gets its own
/// error: the shape of a JWT, then the header's JSON, then `alg`, then the other fields.
fn header_of(token: &str) -> Result<jsonwebtoken::Header, AuthError> {
    use base64::Engine as _;
    const SEGMENTS: &str = "a JWT is three base64url segments separated by dots";
    let mut segments = token.split('.');
    let (Some(header), Some(_claims), Some(_signature), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(AuthError::Malformed(SEGMENTS));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed("the header is not base64url"))?;
    let fields: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes)
        .map_err(|_| AuthError::Malformed("the header is not a JSON object"))?;
    let alg = match fields.get("alg") {
        None => return Err(AuthError::Header("it has no alg".into())),
        Some(serde_json::Value::String(alg)) => alg,
        Some(_) => return Err(AuthError::Header("its alg is not a string".into())),
    };
    if alg.parse::<Algorithm>().is_err() {
        return Err(AuthError::Algorithm(alg.chars().take(20).collect()));
    }
    // RFC 7515 §4.1.11: a recipient must refuse a token whose `crit` names an extension it
    // does not understand, and this one understands none.
    if fields.contains_key("crit") {
        return Err(AuthError::Header(
            "it names critical extensions (crit), which this server does not understand".into(),
        ));
    }
    jsonwebtoken::decode_header(token).map_err(|error| {
        let reason = match error.kind() {
            ErrorKind::Json(error) => error.to_string(),
            _ => error.to_string(),
        };
        AuthError::Header(reason.chars().take(120).collect())
    })
}

fn grant_of(claims: Claims, leeway_secs: u64, filter_limits: &Limits) -> Result<Grant, AuthError> {
    let (endpoints, keys, filters) = match claims.fjord {
        Some(claim) => (
            Some(claim.endpoints),
            claim
                .keys
                .map(|keys| KeySet::new(keys.iter().map(|key| &key.0))),
            claim.filters,
        ),
        // A valid token without the claim opens nothing.
        None => (Some(Vec::new()), None, BTreeMap::new()),
    };
    // A pinned filter that does not compile is the issuer's mistake: refusing the token
    // says so, where ignoring the filter would widen what it opens.
    let filters = filters
        .into_iter()
        .map(
            |(endpoint, source)| match Filter::compile(&source, filter_limits) {
                Ok(filter) => Ok((endpoint, filter)),
                Err(error) => Err(AuthError::Claims(format!(
                    "fjord.filters[{:?}] is not a filter: {error}",
                    endpoint.chars().take(64).collect::<String>()
                ))),
            },
        )
        .collect::<Result<_, _>>()?;
    Ok(Grant {
        endpoints,
        keys,
        filters,
        subject: claims.sub,
        // Admitted until `exp` plus the leeway, so cut off then too, not earlier.
        expires_at: Some(claims.exp.saturating_add(leeway_secs)),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ed25519_dalek::SigningKey;
    use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
    use jsonwebtoken::{EncodingKey, Header};
    use proptest::prelude::*;

    use super::*;
    use fjord_config::PublicKeyConfig;

    /// An HS256 secret of the shortest accepted length.
    const SHARED_SECRET: &[u8; MIN_HS256_SECRET_BYTES] = b"the real shared secret, 32 bytes";

    struct Keys {
        private_pem: String,
        public_pem: String,
    }

    fn keys(seed: u8) -> Keys {
        let signing = SigningKey::from_bytes(&[seed; 32]);
        Keys {
            private_pem: signing
                .to_pkcs8_pem(LineEnding::LF)
                .expect("pem")
                .to_string(),
            public_pem: signing
                .verifying_key()
                .to_public_key_pem(LineEnding::LF)
                .expect("pem"),
        }
    }

    fn now() -> u64 {
        fjord_bus::clock::now_secs()
    }

    fn config(public_pem: &str, algorithms: Vec<JwtAlgorithm>) -> AuthConfig {
        AuthConfig::Jwt(jwt_config(public_pem, algorithms))
    }

    fn jwt_config(public_pem: &str, algorithms: Vec<JwtAlgorithm>) -> JwtConfig {
        JwtConfig {
            algorithms,
            keys: vec![PublicKeyConfig {
                kid: Some("k1".into()),
                pem: Some(public_pem.into()),
                pem_file: None,
            }],
            jwks_url: None,
            hs256_secret_env: None,
            issuer: Some("issuer".into()),
            audience: Some("fjord".into()),
            leeway_secs: 0,
            token_cookie: None,
            allow_query_token: false,
        }
    }

    fn claims(edit: impl FnOnce(&mut serde_json::Value)) -> serde_json::Value {
        let mut claims = serde_json::json!({
            "sub": "driver-42", "iss": "issuer", "aud": "fjord", "exp": now() + 60,
            "fjord": {"endpoints": ["orders"], "keys": ["driver-42"]}
        });
        edit(&mut claims);
        claims
    }

    fn sign_ed(keys: &Keys, claims: &serde_json::Value) -> String {
        sign_ed_as(keys, None, claims)
    }

    fn sign_ed_as(keys: &Keys, kid: Option<&str>, claims: &serde_json::Value) -> String {
        let key = EncodingKey::from_ed_pem(keys.private_pem.as_bytes()).expect("key");
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &key).expect("sign")
    }

    async fn verdict(token: &str) -> Result<Grant, AuthError> {
        let auth = Authenticator::new(
            &config(&keys(1).public_pem, vec![JwtAlgorithm::EdDsa]),
            &Limits::default(),
        )
        .await
        .expect("auth");
        auth.grant(Some(token)).await
    }

    #[tokio::test]
    async fn a_valid_token_grants_its_claim() {
        let grant = verdict(&sign_ed(&keys(1), &claims(|_| {})))
            .await
            .expect("valid");
        assert_eq!(grant.endpoints, Some(vec!["orders".to_owned()]));
        assert_eq!(grant.keys, Some(KeySet::new(["driver-42"])));
        assert!(grant.expires_at.is_some_and(|at| at > now()));
    }

    #[tokio::test]
    async fn a_token_pins_filters_per_endpoint_and_one_that_does_not_compile_is_refused() {
        let pinned = |filters: serde_json::Value| {
            sign_ed(&keys(1), &claims(|c| c["fjord"]["filters"] = filters))
        };
        let grant = verdict(&pinned(serde_json::json!({
            "orders": "value.restaurant == 'r-7'",
            "*": "value.region == 'eu'",
        })))
        .await
        .expect("valid");
        let filter_of = |endpoint| grant.filter_of(endpoint).map(|f| f.canonical().to_owned());
        assert_eq!(
            filter_of("orders").as_deref(),
            Some(r#"value.region == "eu" && value.restaurant == "r-7""#)
        );
        assert_eq!(
            filter_of("drivers").as_deref(),
            Some(r#"value.region == "eu""#)
        );

        let refused = verdict(&pinned(serde_json::json!({"orders": "value.total >"})))
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), "token_claims");
        assert!(refused.to_string().contains("column 14"), "{refused}");
    }

    #[tokio::test]
    async fn a_token_pins_text_keys_and_keys_in_base64_apart() {
        let pinned =
            |pins: serde_json::Value| sign_ed(&keys(1), &claims(|c| c["fjord"]["keys"] = pins));
        let grant = verdict(&pinned(
            serde_json::json!(["//4Aaw==", {"base64": "//4Aaw=="}]),
        ))
        .await
        .expect("valid");
        let binary: &[u8] = &[0xff, 0xfe, 0x00, 0x6b];
        assert_eq!(grant.keys, Some(KeySet::new([&b"//4Aaw=="[..], binary])));
        let only_text = verdict(&pinned(serde_json::json!(["//4Aaw=="])))
            .await
            .expect("valid");
        assert_eq!(
            only_text.narrow_keys(Some(KeySet::new([binary]))),
            Err(Forbidden::Key(String::from_utf8_lossy(binary).into_owned()))
        );
        let error = verdict(&pinned(serde_json::json!([{"base64": "not base64"}])))
            .await
            .expect_err("refused");
        assert_eq!(error.code(), "token_claims");
    }

    #[tokio::test]
    async fn every_kind_of_bad_token_is_refused_with_its_reason() {
        let good = keys(1);
        let cases: Vec<(String, &str)> = vec![
            ("not a token".into(), "token_malformed"),
            ("a.b.c".into(), "token_malformed"),
            (sign_ed(&keys(2), &claims(|_| {})), "token_signature"),
            (
                sign_ed(&good, &claims(|c| c["exp"] = (now() - 120).into())),
                "token_expired",
            ),
            (
                sign_ed(&good, &claims(|c| c["nbf"] = (now() + 120).into())),
                "token_not_yet_valid",
            ),
            (
                sign_ed(&good, &claims(|c| c["aud"] = "elsewhere".into())),
                "token_audience",
            ),
            (
                sign_ed(&good, &claims(|c| c["iss"] = "mallory".into())),
                "token_issuer",
            ),
            (
                sign_ed(
                    &good,
                    &claims(|c| drop(c.as_object_mut().map(|o| o.remove("exp")))),
                ),
                "token_claims",
            ),
            (
                sign_ed(&good, &claims(|c| c["exp"] = "tomorrow".into())),
                "token_claims",
            ),
        ];
        for (token, code) in cases {
            let error = verdict(&token).await.expect_err("refused");
            assert_eq!(error.code(), code, "{token}: {error}");
        }
    }

    #[tokio::test]
    async fn alg_none_and_algorithm_confusion_are_refused() {
        let good = keys(1);
        let payload = URL_SAFE_NO_PAD.encode(claims(|_| {}).to_string());
        let unsigned = format!(
            "{}.{payload}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#)
        );
        assert_eq!(
            verdict(&unsigned).await.expect_err("refused").code(),
            "token_algorithm"
        );
        // HS256 with the public key as the secret: the classic confusion attack.
        let confused = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(|_| {}),
            &EncodingKey::from_secret(good.public_pem.as_bytes()),
        )
        .expect("sign");
        assert_eq!(
            verdict(&confused).await.expect_err("refused").code(),
            "token_algorithm"
        );
        // Even where HS256 is accepted, a public key never serves as its secret.
        let auth = Authenticator {
            jwt: Some(Arc::new(JwtVerifier {
                algorithms: vec![Algorithm::EdDSA, Algorithm::HS256],
                keys: vec![
                    Key {
                        kid: Some("k1".into()),
                        key: DecodingKey::from_ed_pem(good.public_pem.as_bytes()).expect("key"),
                    },
                    Key {
                        kid: None,
                        key: DecodingKey::from_secret(SHARED_SECRET),
                    },
                ],
                jwks: None,
                issuer: Some("issuer".into()),
                audience: Some("fjord".into()),
                leeway_secs: 0,
                filter_limits: Limits::default(),
            })),
            sources: TokenSources::default(),
        };
        assert_eq!(
            auth.grant(Some(&confused))
                .await
                .expect_err("refused")
                .code(),
            "token_signature"
        );
        let shared = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(|_| {}),
            &EncodingKey::from_secret(SHARED_SECRET),
        )
        .expect("sign");
        assert!(auth.grant(Some(&shared)).await.is_ok());
    }

    #[test]
    fn short_hs256_secrets_are_refused_naming_the_variable_not_the_value() {
        for secret in ["", "hunter2", &"s".repeat(MIN_HS256_SECRET_BYTES - 1)] {
            let message = check_hs256_secret("FJORD_HS256", secret)
                .expect_err("too short")
                .to_string();
            assert!(
                message.contains("$.auth.hs256_secret_env") && message.contains("FJORD_HS256"),
                "{message}"
            );
            assert!(secret.is_empty() || !message.contains(secret), "{message}");
        }
        for placeholder in [
            "a".repeat(MIN_HS256_SECRET_BYTES),
            " ".repeat(MIN_HS256_SECRET_BYTES),
            "abab".repeat(20),
            format!("{}{}", " ".repeat(40), "abcdefghij"),
        ] {
            let message = check_hs256_secret("FJORD_HS256", &placeholder)
                .expect_err("a placeholder")
                .to_string();
            assert!(message.contains("placeholder") && message.contains("FJORD_HS256"));
        }
        assert!(check_hs256_secret("FJORD_HS256", "the real shared secret, 32 bytes").is_ok());
        // Bytes, not characters: 11 three-byte characters are 33 bytes.
        assert!(check_hs256_secret("FJORD_HS256", "€₤₩₿₹₽€₤₩₿₹").is_ok());
    }

    #[tokio::test]
    async fn malformed_tokens_and_headers_get_distinct_errors() {
        let payload = URL_SAFE_NO_PAD.encode(claims(|_| {}).to_string());
        let with_header =
            |header: &str| format!("{}.{payload}.c2lnbmF0dXJl", URL_SAFE_NO_PAD.encode(header));
        let cases = [
            ("two.segments".to_owned(), "token_malformed", "three"),
            (
                format!("{}.extra", with_header(r#"{"alg":"EdDSA"}"#)),
                "token_malformed",
                "three",
            ),
            (
                format!("%%.{payload}.c2ln"),
                "token_malformed",
                "header is not base64url",
            ),
            (
                with_header(r#"{"alg":"EdDSA","crit":["exp"]}"#),
                "token_header",
                "crit",
            ),
            (
                with_header("[1, 2]"),
                "token_malformed",
                "not a JSON object",
            ),
            (with_header(r#"{"typ":"JWT"}"#), "token_header", "no alg"),
            (
                with_header(r#"{"alg":5}"#),
                "token_header",
                "alg is not a string",
            ),
            // An accepted algorithm with a malformed field was reported as a refused algorithm.
            (
                with_header(r#"{"alg":"EdDSA","kid":5}"#),
                "token_header",
                "invalid type",
            ),
            (
                with_header(r#"{"alg":"EdDSA","x5c":"not a list"}"#),
                "token_header",
                "invalid type",
            ),
            (with_header(r#"{"alg":"none"}"#), "token_algorithm", "none"),
            (
                with_header(r#"{"alg":"HS999"}"#),
                "token_algorithm",
                "HS999",
            ),
            (
                with_header(r#"{"alg":"HS256"}"#),
                "token_algorithm",
                "HS256",
            ),
            (
                format!(
                    "{}.{payload}.%%",
                    URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA"}"#)
                ),
                "token_malformed",
                "signature are not base64url",
            ),
        ];
        for (token, code, says) in cases {
            let error = verdict(&token).await.expect_err("refused");
            assert_eq!(error.code(), code, "{token}: {error}");
            assert!(error.to_string().contains(says), "{token}: {error}");
        }
    }

    #[tokio::test]
    async fn a_stream_admitted_within_the_leeway_ends_at_exp_plus_leeway() {
        let mut jwt = jwt_config(&keys(1).public_pem, vec![JwtAlgorithm::EdDsa]);
        jwt.leeway_secs = 30;
        let auth = Authenticator::new(&AuthConfig::Jwt(jwt), &Limits::default())
            .await
            .expect("auth");
        let exp = now() - 10;
        let grant = auth
            .grant(Some(&sign_ed(&keys(1), &claims(|c| c["exp"] = exp.into()))))
            .await
            .expect("admitted within the leeway");
        assert_eq!(grant.expires_at, Some(exp + 30));
    }

    /// A JWKS server on a real socket that answers its first fetch at once and holds
    /// every later one until [`SlowJwks::release`], logging what happens in order.
    struct SlowJwks {
        url: String,
        fetches: Arc<std::sync::atomic::AtomicUsize>,
        events: Arc<std::sync::Mutex<Vec<String>>>,
        started: tokio::sync::mpsc::UnboundedReceiver<usize>,
        gate: tokio::sync::watch::Sender<bool>,
    }

    impl SlowJwks {
        async fn start(document: serde_json::Value) -> Self {
            use std::sync::atomic::Ordering::SeqCst;
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!(
                "http://{}/jwks.json",
                listener.local_addr().expect("address")
            );
            let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let events = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (started_tx, started) = tokio::sync::mpsc::unbounded_channel();
            let (gate, gate_rx) = tokio::sync::watch::channel(false);
            let body = document.to_string();
            let (count, log) = (Arc::clone(&fetches), Arc::clone(&events));
            tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    let (count, log, started, mut gate, body) = (
                        Arc::clone(&count),
                        Arc::clone(&log),
                        started_tx.clone(),
                        gate_rx.clone(),
                        body.clone(),
                    );
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut buffer = [0_u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match socket.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buffer[..n]),
                            }
                        }
                        let n = count.fetch_add(1, SeqCst) + 1;
                        let note = |event: String| log.lock().expect("log").push(event);
                        if n > 1 {
                            note(format!("fetch {n} started"));
                            let _ = started.send(n);
                            tokio::select! {
                                _ = gate.wait_for(|open| *open) => {}
                                _ = socket.read(&mut buffer) => {
                                    note(format!("fetch {n} abandoned"));
                                    return;
                                }
                            }
                        }
                        let response = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        if socket.write_all(response.as_bytes()).await.is_ok() && n > 1 {
                            note(format!("fetch {n} answered"));
                        }
                    });
                }
            });
            Self {
                url,
                fetches,
                events,
                started,
                gate,
            }
        }

        fn fetches(&self) -> usize {
            self.fetches.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn note(&self, event: &str) {
            self.events.lock().expect("log").push(event.to_owned());
        }

        fn events(&self) -> Vec<String> {
            self.events.lock().expect("log").clone()
        }

        fn release(&self) {
            self.gate.send_replace(true);
        }
    }

    fn ed25519_jwk(kid: &str, keys: &Keys) -> serde_json::Value {
        use ed25519_dalek::pkcs8::DecodePublicKey as _;
        let public =
            ed25519_dalek::VerifyingKey::from_public_key_pem(&keys.public_pem).expect("public key");
        serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(public.as_bytes())
        })
    }

    /// Verifies with the keys of `jwks` only, refreshed at most once an hour: longer than
    /// any test, so that the number of fetches is exact.
    async fn jwks_authenticator(jwks: &SlowJwks) -> Authenticator {
        let cache = jwks::JwksCache::start(jwks.url.clone(), Duration::from_secs(3600)).await;
        Authenticator {
            jwt: Some(Arc::new(JwtVerifier {
                algorithms: vec![Algorithm::EdDSA],
                keys: Vec::new(),
                jwks: Some(cache),
                issuer: Some("issuer".into()),
                audience: Some("fjord".into()),
                leeway_secs: 0,
                filter_limits: Limits::default(),
            })),
            sources: TokenSources::default(),
        }
    }

    #[tokio::test]
    async fn a_token_waiting_for_a_refresh_that_never_answers_gets_its_401() {
        let mut jwks =
            SlowJwks::start(serde_json::json!({"keys": [ed25519_jwk("current", &keys(1))]})).await;
        let auth = jwks_authenticator(&jwks).await;
        let unknown = sign_ed_as(&keys(2), Some("made-up"), &claims(|_| {}));
        // The JWKS server is never released: the fetch's own timeout bounds the wait.
        let verdict = tokio::spawn({
            let auth = auth.clone();
            let unknown = unknown.clone();
            async move { auth.grant(Some(&unknown)).await }
        });
        assert_eq!(jwks.started.recv().await, Some(2));
        assert_eq!(verdict.await.expect("task"), Err(AuthError::UnknownKey));
        tokio::time::timeout(Duration::from_secs(60), async {
            while !jwks.events().contains(&"fetch 2 abandoned".to_owned()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the server gave up the fetch");
        // The abandoned fetch counts as the last: no new one, and an answer at once.
        assert_eq!(auth.grant(Some(&unknown)).await, Err(AuthError::UnknownKey));
        assert_eq!(jwks.fetches(), 2);
        let valid = sign_ed_as(&keys(1), Some("current"), &claims(|_| {}));
        assert!(auth.grant(Some(&valid)).await.is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_jwks_refresh_holds_up_no_valid_token_and_runs_once_for_a_flood() {
        let mut jwks =
            SlowJwks::start(serde_json::json!({"keys": [ed25519_jwk("current", &keys(1))]})).await;
        let auth = jwks_authenticator(&jwks).await;
        assert_eq!(jwks.fetches(), 1, "fetched once at start");
        let valid = sign_ed_as(&keys(1), Some("current"), &claims(|_| {}));
        assert!(auth.grant(Some(&valid)).await.is_ok());

        let unknown = |n: usize| {
            let auth = auth.clone();
            let token = sign_ed_as(&keys(2), Some(&format!("made-up-{n}")), &claims(|_| {}));
            tokio::spawn(async move { auth.grant(Some(&token)).await })
        };
        // The first unknown key id starts a refresh, which the JWKS server holds.
        let mut waiting = vec![unknown(0)];
        assert_eq!(jwks.started.recv().await, Some(2));
        // A flood of unknown key ids joins the refresh that runs rather than starting more.
        waiting.extend((1..=200).map(unknown));
        // Valid tokens are verified with the keys held, while the fetch is still held.
        for _ in 0..50 {
            assert!(auth.grant(Some(&valid)).await.is_ok());
        }
        jwks.note("valid tokens verified");
        assert!(
            waiting.iter().all(|task| !task.is_finished()),
            "unknown key ids wait for the running refresh"
        );
        jwks.release();
        for task in waiting {
            assert_eq!(task.await.expect("task"), Err(AuthError::UnknownKey));
        }
        // Right after a fetch, unknown key ids are answered without another one.
        for n in 201..=400 {
            assert_eq!(unknown(n).await.expect("task"), Err(AuthError::UnknownKey));
        }
        assert_eq!(jwks.fetches(), 2, "one refresh for 401 unknown key ids");
        assert_eq!(
            jwks.events(),
            [
                "fetch 2 started",
                "valid tokens verified",
                "fetch 2 answered"
            ]
        );
    }

    #[tokio::test]
    async fn a_token_without_the_claim_opens_nothing() {
        let token = sign_ed(
            &keys(1),
            &claims(|c| drop(c.as_object_mut().map(|o| o.remove("fjord")))),
        );
        let grant = verdict(&token).await.expect("valid");
        assert!(grant.open("orders").is_err());
    }

    #[test]
    fn requests_may_narrow_never_widen() {
        let grant = Grant {
            endpoints: Some(vec!["orders".into()]),
            keys: Some(KeySet::new(["a", "b"])),
            filters: BTreeMap::new(),
            expires_at: None,
            subject: None,
        };
        assert_eq!(grant.open("orders"), Ok(()));
        assert_eq!(grant.narrow_keys(None), Ok(Some(KeySet::new(["a", "b"]))));
        assert_eq!(
            grant.narrow_keys(Some(KeySet::new(["b"]))),
            Ok(Some(KeySet::new(["b"])))
        );
        assert_eq!(
            grant.narrow_keys(Some(KeySet::new(["c"]))),
            Err(Forbidden::Key("c".into()))
        );
        // The same refusal whether the endpoint exists or not.
        for name in ["drivers", "no-such-endpoint"] {
            assert_eq!(grant.open(name), Err(Forbidden::Endpoint(name.into())));
        }
        let all = Grant {
            endpoints: Some(vec!["*".into()]),
            keys: None,
            filters: BTreeMap::new(),
            expires_at: None,
            subject: None,
        };
        assert_eq!(all.open("drivers"), Ok(()));
        assert_eq!(
            all.narrow_keys(Some(KeySet::new(["z"]))),
            Ok(Some(KeySet::new(["z"])))
        );
        assert_eq!(Grant::everything().open("anything"), Ok(()));
    }

    /// The codes a refusal may carry.
    const CODES: [&str; 11] = [
        "token_missing",
        "token_malformed",
        "token_header",
        "token_algorithm",
        "token_signature",
        "token_expired",
        "token_not_yet_valid",
        "token_audience",
        "token_issuer",
        "token_claims",
        "token_unknown_key",
    ];

    fn verdict_now(token: &str) -> Result<Grant, AuthError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(verdict(token))
    }

    /// JSON values of every kind, shallow.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            "\\PC{0,12}".prop_map(serde_json::Value::from),
            proptest::collection::vec("[a-z*-]{0,8}", 0..4).prop_map(serde_json::Value::from),
        ]
    }

    proptest! {
        #[test]
        fn fuzz_token_strings(token in "\\PC{0,300}") {
            let error = verdict_now(&token).expect_err("refused");
            prop_assert!(CODES.contains(&error.code()));
        }

        #[test]
        fn fuzz_token_segments(
            segments in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..5),
            encode in any::<bool>(),
        ) {
            let token = segments
                .iter()
                .map(|segment| if encode {
                    URL_SAFE_NO_PAD.encode(segment)
                } else {
                    String::from_utf8_lossy(segment).into_owned()
                })
                .collect::<Vec<_>>()
                .join(".");
            let error = verdict_now(&token).expect_err("refused");
            prop_assert!(CODES.contains(&error.code()));
        }

        #[test]
        fn fuzz_token_headers(
            alg in prop_oneof![
                prop::sample::select(vec!["EdDSA", "HS256", "RS256", "ES384", "none", "", "eddsa"]).prop_map(serde_json::Value::from),
                json_value(),
            ],
            kid in proptest::option::of(json_value()),
            typ in proptest::option::of(json_value()),
            extra in proptest::option::of(("[a-z0-9]{1,5}", json_value())),
            signature in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let mut header = serde_json::json!({"alg": alg});
            if let Some(kid) = kid { header["kid"] = kid; }
            if let Some(typ) = typ { header["typ"] = typ; }
            if let Some((name, value)) = extra { header[name] = value; }
            let token = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims(|_| {}).to_string()),
                URL_SAFE_NO_PAD.encode(signature),
            );
            let error = verdict_now(&token).expect_err("not signed with the key");
            prop_assert!(CODES.contains(&error.code()));
        }

        #[test]
        fn fuzz_token_claims(
            exp in json_value(),
            nbf in proptest::option::of(json_value()),
            endpoints in json_value(),
            keys_claim in proptest::option::of(json_value()),
            fjord in any::<bool>(),
        ) {
            let token = sign_ed(&keys(1), &claims(|c| {
                c["exp"] = exp.clone();
                if let Some(nbf) = nbf { c["nbf"] = nbf; }
                if fjord {
                    c["fjord"] = serde_json::json!({"endpoints": endpoints});
                    if let Some(keys) = keys_claim { c["fjord"]["keys"] = keys; }
                } else if let Some(claims) = c.as_object_mut() {
                    claims.remove("fjord");
                }
            }));
            match verdict_now(&token) {
                // Only an exp in the future (or within the leeway) admits.
                Ok(grant) => prop_assert!(exp.as_u64().is_some_and(|exp| Some(exp) == grant.expires_at)),
                Err(error) => prop_assert!(CODES.contains(&error.code())),
            }
        }

        #[test]
        fn fuzz_tampered_tokens(position in any::<usize>(), byte in any::<u8>()) {
            let mut token = sign_ed(&keys(1), &claims(|_| {})).into_bytes();
            let index = position % token.len();
            prop_assume!(token[index] != byte);
            token[index] = byte;
            let token = String::from_utf8_lossy(&token).into_owned();
            prop_assert!(verdict_now(&token).is_err());
        }
    }
}
