//! Access control: who may stream what. A request's token is found where the manifest
//! allows (`Authorization: Bearer`, a cookie, or `?access_token=` when enabled), verified
//! against the manifest's pinned algorithms and keys (PEM keys, an HS256 secret, or a JWKS
//! URL), and its `fjord` claim becomes a [`Grant`]: the endpoints it opens and the record
//! keys it pins. Tokens are never logged.
//!
//! The claim: `"fjord": {"endpoints": ["orders"], "keys": ["driver-42"]}`; `"*"` opens every
//! endpoint; without `keys` the token sees every record of its endpoints. A key is text, or
//! `{"base64": "..."}` for a key that is not UTF-8.

mod jwks;
mod token;

use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

use crate::config::{AuthConfig, JwtAlgorithm, JwtConfig, ManifestError};
use crate::keys::KeySet;
pub use token::{TokenSources, find_token};

/// Why a request's token was refused (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token where the manifest allows one.
    #[error("no token: send Authorization: Bearer <token>{0}")]
    Missing(&'static str),
    /// Not a JWT.
    #[error("the token is not a well-formed JWT")]
    Malformed,
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
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing(_) => "token_missing",
            Self::Malformed => "token_malformed",
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
pub enum Forbidden {
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
    /// When it expires, in seconds since the epoch; `None` when auth is disabled.
    pub expires_at: Option<u64>,
    /// The token's `sub`, whose streams `server.max_connections_per_subject` counts.
    pub subject: Option<String>,
}

impl Grant {
    /// Everything, for ever: auth disabled.
    pub fn everything() -> Self {
        Self {
            endpoints: None,
            keys: None,
            expires_at: None,
            subject: None,
        }
    }

    /// Checks `endpoints`, and narrows `keys` (the request's filter) to the pinned keys:
    /// a request may narrow what the token allows, never widen it.
    pub fn authorize(
        &self,
        endpoints: &[&str],
        keys: Option<KeySet>,
    ) -> Result<Option<KeySet>, Forbidden> {
        if let Some(allowed) = &self.endpoints
            && let Some(refused) = endpoints
                .iter()
                .find(|e| !allowed.iter().any(|a| a == *e || a == "*"))
        {
            return Err(Forbidden::Endpoint((*refused).to_owned()));
        }
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
}

impl Authenticator {
    /// Loads keys and secrets named by the manifest; fails on a key that does not parse.
    pub async fn new(config: &AuthConfig) -> Result<Self, ManifestError> {
        let AuthConfig::Jwt(jwt) = config else {
            tracing::warn!("auth is disabled by the manifest: every endpoint is open to anyone");
            return Ok(Self {
                jwt: None,
                sources: TokenSources::default(),
            });
        };
        let keys = load_keys(jwt)?;
        let jwks = match &jwt.jwks_url {
            Some(url) => Some(jwks::JwksCache::start(url.clone()).await),
            None => None,
        };
        let verifier = JwtVerifier {
            algorithms: jwt.algorithms.iter().copied().map(algorithm).collect(),
            keys,
            jwks,
            issuer: jwt.issuer.clone(),
            audience: jwt.audience.clone(),
            leeway_secs: jwt.leeway_secs,
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
    pub fn sources(&self) -> &TokenSources {
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
        keys.push(Key {
            kid: None,
            key: DecodingKey::from_secret(secret.read()?.as_bytes()),
        });
    }
    Ok(keys)
}

impl JwtVerifier {
    async fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| match unsupported_algorithm(token) {
                Some(alg) => AuthError::Algorithm(alg),
                None => AuthError::Malformed,
            })?;
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
                Ok(data) => return Ok(grant_of(data.claims)),
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
                        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                            return Err(AuthError::Malformed);
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
            let from_jwks: HashMap<String, DecodingKey> = jwks.keys_for(kid).await;
            keys.extend(from_jwks.into_values().filter(|key| key.family() == family));
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

/// The `alg` of a header that jsonwebtoken refuses to parse, such as `none`.
fn unsupported_algorithm(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()?;
    let header: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(header.get("alg")?.as_str()?.chars().take(20).collect())
}

fn grant_of(claims: Claims) -> Grant {
    let (endpoints, keys) = match claims.fjord {
        Some(claim) => (
            Some(claim.endpoints),
            claim
                .keys
                .map(|keys| KeySet::new(keys.iter().map(|key| &key.0))),
        ),
        // A valid token without the claim opens nothing.
        None => (Some(Vec::new()), None),
    };
    Grant {
        endpoints,
        keys,
        expires_at: Some(claims.exp),
        subject: claims.sub,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ed25519_dalek::SigningKey;
    use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
    use jsonwebtoken::{EncodingKey, Header};
    use proptest::prelude::*;

    use super::*;
    use crate::config::PublicKeyConfig;

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
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    fn config(public_pem: &str, algorithms: Vec<JwtAlgorithm>) -> AuthConfig {
        AuthConfig::Jwt(JwtConfig {
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
        })
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
        let key = EncodingKey::from_ed_pem(keys.private_pem.as_bytes()).expect("key");
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &key).expect("sign")
    }

    async fn verdict(token: &str) -> Result<Grant, AuthError> {
        let auth = Authenticator::new(&config(&keys(1).public_pem, vec![JwtAlgorithm::EdDsa]))
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
            only_text.authorize(&["orders"], Some(KeySet::new([binary]))),
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
                        key: DecodingKey::from_secret(b"the real shared secret"),
                    },
                ],
                jwks: None,
                issuer: Some("issuer".into()),
                audience: Some("fjord".into()),
                leeway_secs: 0,
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
            &EncodingKey::from_secret(b"the real shared secret"),
        )
        .expect("sign");
        assert!(auth.grant(Some(&shared)).await.is_ok());
    }

    #[tokio::test]
    async fn a_token_without_the_claim_opens_nothing() {
        let token = sign_ed(
            &keys(1),
            &claims(|c| drop(c.as_object_mut().map(|o| o.remove("fjord")))),
        );
        let grant = verdict(&token).await.expect("valid");
        assert!(grant.authorize(&["orders"], None).is_err());
    }

    #[test]
    fn requests_may_narrow_never_widen() {
        let grant = Grant {
            endpoints: Some(vec!["orders".into()]),
            keys: Some(KeySet::new(["a", "b"])),
            expires_at: None,
            subject: None,
        };
        assert_eq!(
            grant.authorize(&["orders"], None),
            Ok(Some(KeySet::new(["a", "b"])))
        );
        assert_eq!(
            grant.authorize(&["orders"], Some(KeySet::new(["b"]))),
            Ok(Some(KeySet::new(["b"])))
        );
        assert_eq!(
            grant.authorize(&["orders"], Some(KeySet::new(["c"]))),
            Err(Forbidden::Key("c".into()))
        );
        assert_eq!(
            grant.authorize(&["orders", "drivers"], None),
            Err(Forbidden::Endpoint("drivers".into()))
        );
        let all = Grant {
            endpoints: Some(vec!["*".into()]),
            keys: None,
            expires_at: None,
            subject: None,
        };
        assert_eq!(
            all.authorize(&["orders", "drivers"], Some(KeySet::new(["z"]))),
            Ok(Some(KeySet::new(["z"])))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn arbitrary_tokens_are_refused_without_panicking(token in "\\PC{0,300}") {
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let result = runtime.block_on(verdict(&token));
            prop_assert!(result.is_err());
        }

        #[test]
        fn tampered_tokens_are_refused(position in 0_usize..200, byte in any::<u8>()) {
            let mut token = sign_ed(&keys(1), &claims(|_| {})).into_bytes();
            let index = position % token.len();
            prop_assume!(token[index] != byte && byte.is_ascii_graphic());
            token[index] = byte;
            let token = String::from_utf8_lossy(&token).into_owned();
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            prop_assert!(runtime.block_on(verdict(&token)).is_err());
        }
    }
}
