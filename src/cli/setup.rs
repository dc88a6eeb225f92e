//! `fjord setup` and `fjord token`: an Ed25519 key pair and a manifest skeleton for a new
//! deployment, and tokens minted with that key for testing (and for backends to copy).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey, KeypairBytes};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;

/// The private key's file name.
pub const PRIVATE_KEY_FILE: &str = "fjord-private.pem";
/// The public key's file name.
pub const PUBLIC_KEY_FILE: &str = "fjord-public.pem";
/// The issuer `fjord setup` writes and `fjord token` signs as.
pub const DEFAULT_ISSUER: &str = "fjord-setup";
/// The audience `fjord setup` writes and `fjord token` signs for.
pub const DEFAULT_AUDIENCE: &str = "fjord";

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A key file is there already.
    #[error("{} exists; fjord setup never overwrites keys (move it away to make new ones)", .0.display())]
    Exists(PathBuf),
    /// A file could not be read or written.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A key could not be encoded or decoded.
    #[error("key {}: {message}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A filter to pin does not compile.
    #[error("--filter {endpoint}=…: {source}")]
    Filter {
        /// The endpoint it was for.
        endpoint: String,
        /// Where and why.
        source: fjord_config::FilterError,
    },
    /// The token's lifetime is longer than [`MAX_TOKEN_TTL`].
    #[error(
        "a token lifetime of {0} s is longer than the {max} s (ten years) a test token may live",
        max = MAX_TOKEN_TTL.as_secs()
    )]
    Lifetime(u64),
}

/// The longest a minted token may live: ten years. Far beyond any test's need, and far from
/// where `iat + ttl` would overflow and wrap to a token that has already expired.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What `fjord setup` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupOutcome {
    /// The files written, in order.
    pub written: Vec<PathBuf>,
    /// Files left alone because they existed.
    pub kept: Vec<PathBuf>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SetupError + '_ {
    move |source| SetupError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), SetupError> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(|error| match error.kind() {
        std::io::ErrorKind::AlreadyExists => SetupError::Exists(path.to_owned()),
        _ => SetupError::Io {
            path: path.to_owned(),
            source: error,
        },
    })?;
    file.write_all(contents.as_bytes()).map_err(io(path))
}

/// Writes a new key pair, and a manifest and its schema unless they exist, into `dir`.
pub fn setup(dir: &Path) -> Result<SetupOutcome, SetupError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let private_path = dir.join(PRIVATE_KEY_FILE);
    let public_path = dir.join(PUBLIC_KEY_FILE);
    for path in [&private_path, &public_path] {
        if path.exists() {
            return Err(SetupError::Exists(path.clone()));
        }
    }
    let mut secret = [0_u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let signing = SigningKey::from_bytes(&secret);
    let key_error = |message: String| SetupError::Key {
        path: private_path.clone(),
        message,
    };
    // PKCS#8 v1 (RFC 5208), without the public key: the v2 form that `SigningKey` writes
    // is refused by OpenSSL 3.0, Node 20 and Python's cryptography.
    let private_pem = KeypairBytes {
        secret_key: signing.to_bytes(),
        public_key: None,
    }
    .to_pkcs8_pem(LineEnding::LF)
    .map_err(|e| key_error(e.to_string()))?;
    let public_pem = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| key_error(e.to_string()))?;
    write_new(&private_path, &private_pem, true)?;
    write_new(&public_path, &public_pem, false)?;
    let mut outcome = SetupOutcome {
        written: vec![private_path, public_path],
        kept: Vec::new(),
    };
    for (name, contents) in [
        ("manifest.json", manifest_skeleton(&public_pem)),
        ("manifest.schema.json", fjord_config::SCHEMA.to_owned()),
    ] {
        let path = dir.join(name);
        match write_new(&path, &contents, false) {
            Ok(()) => outcome.written.push(path),
            Err(SetupError::Exists(path)) => outcome.kept.push(path),
            Err(error) => return Err(error),
        }
    }
    Ok(outcome)
}

/// A manifest for a local Kafka and Redis, with JWT auth on the key `fjord setup` writes.
/// The public key goes in inline: the same manifest then works in an ECS task, which has
/// no files beside it (`fjord-deploy` refuses `pem_file`).
///
/// The group starts at `earliest`: a new group has no committed offsets, and with `latest`
/// the records produced while it joins (a few seconds, after the server is already ready)
/// would never be read. Once it has committed, it goes on from there either way.
fn manifest_skeleton(public_pem: &str) -> String {
    let manifest = serde_json::json!({
        "$schema": "./manifest.schema.json",
        "kafka": {"brokers": ["localhost:9092"]},
        "redis": {"url": "redis://localhost:6379"},
        "endpoints": {
            "orders": {"topics": ["orders"], "retention": {"max_records": 100_000, "max_age_secs": 86_400}}
        },
        "consumer_groups": [{"id": "fjord", "topics": ["orders"], "members": 1, "offset_reset": "earliest"}],
        "server": {"port": 8080, "cors_origins": ["http://localhost:3000"]},
        "auth": {
            "mode": "jwt",
            "algorithms": ["EdDSA"],
            "keys": [{"kid": "fjord-setup", "pem": public_pem}],
            "issuer": DEFAULT_ISSUER,
            "audience": DEFAULT_AUDIENCE,
            "token_cookie": "fjord_token"
        }
    });
    let mut text = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    text.push('\n');
    text
}

/// What a minted token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// `sub`.
    pub subject: String,
    /// Endpoints the token opens (`*` for all).
    pub endpoints: Vec<String>,
    /// Record keys it pins; empty for all.
    pub keys: Vec<String>,
    /// Filters it pins: (endpoint or `*`, filter).
    pub filters: Vec<(String, String)>,
    /// How long it lives.
    pub ttl: Duration,
    /// `iss`.
    pub issuer: String,
    /// `aud`.
    pub audience: String,
    /// `kid` in the header.
    pub key_id: Option<String>,
}

/// Signs a token with the Ed25519 private key in `private_key` (PEM).
pub fn mint(private_key: &Path, request: &TokenRequest) -> Result<String, SetupError> {
    if request.ttl > MAX_TOKEN_TTL {
        return Err(SetupError::Lifetime(request.ttl.as_secs()));
    }
    let pem = std::fs::read(private_key).map_err(io(private_key))?;
    let key_error = |message: String| SetupError::Key {
        path: private_key.to_owned(),
        message,
    };
    let key = EncodingKey::from_ed_pem(&pem).map_err(|e| key_error(e.to_string()))?;
    let now = fjord_bus::clock::now_secs();
    let mut fjord = serde_json::json!({"endpoints": request.endpoints});
    if !request.keys.is_empty() {
        fjord["keys"] = serde_json::json!(request.keys);
    }
    if !request.filters.is_empty() {
        // Checked here with the default limits, so that a typo fails now rather than as
        // every stream's 401.
        for (endpoint, source) in &request.filters {
            fjord_config::Filter::compile(source, &fjord_config::Limits::default()).map_err(
                |source| SetupError::Filter {
                    endpoint: endpoint.clone(),
                    source,
                },
            )?;
        }
        fjord["filters"] = request
            .filters
            .iter()
            .map(|(endpoint, source)| (endpoint.clone(), serde_json::Value::from(source.as_str())))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    let claims = serde_json::json!({
        "sub": request.subject,
        "iss": request.issuer,
        "aud": request.audience,
        "iat": now,
        "nbf": now,
        "exp": now.saturating_add(request.ttl.as_secs()),
        "fjord": fjord,
    });
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid.clone_from(&request.key_id);
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| key_error(e.to_string()))
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::pkcs8::DecodePrivateKey as _;

    use super::*;
    use fjord_config::Manifest;
    use fjord_server::auth::Authenticator;

    #[tokio::test]
    async fn setup_writes_a_working_pair_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outcome = setup(dir.path()).expect("setup");
        assert_eq!(outcome.written.len(), 4);
        assert!(matches!(setup(dir.path()), Err(SetupError::Exists(_))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(PRIVATE_KEY_FILE))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let private_pem =
            std::fs::read_to_string(dir.path().join(PRIVATE_KEY_FILE)).expect("private key");
        let pair = KeypairBytes::from_pkcs8_pem(&private_pem).expect("PKCS#8");
        assert!(
            pair.public_key.is_none(),
            "PKCS#8 v1, without the public key, as OpenSSL 3.0 and Node read it"
        );

        let manifest_text =
            std::fs::read_to_string(dir.path().join("manifest.json")).expect("manifest");
        let manifest = Manifest::parse(&manifest_text).expect("the skeleton is valid");
        let auth = Authenticator::new(&manifest.auth, &manifest.server.filter_limits)
            .await
            .expect("keys load");
        let token = mint(
            &dir.path().join(PRIVATE_KEY_FILE),
            &TokenRequest {
                subject: "driver-42".into(),
                endpoints: vec!["orders".into()],
                keys: vec!["driver-42".into()],
                filters: Vec::new(),
                ttl: Duration::from_secs(60),
                issuer: DEFAULT_ISSUER.into(),
                audience: DEFAULT_AUDIENCE.into(),
                key_id: Some("fjord-setup".into()),
            },
        )
        .expect("mint");
        let grant = auth.grant(Some(&token)).await.expect("valid");
        assert_eq!(grant.endpoints, Some(vec!["orders".to_owned()]));
        assert_eq!(
            grant.keys,
            Some(fjord_server::auth::KeySet::new(["driver-42"]))
        );
    }
}
