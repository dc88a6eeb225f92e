//! Pushes images to an OCI registry (ECR, or any distribution registry standing in for it)
//! with the `oci-client` crate: each blob is checked first and sent only when the registry
//! does not have it, then the manifest is put under the image's tag unless the tag already
//! names it, so an unchanged image sends nothing.
//!
//! Each blob goes up in one request (POST, then one PUT carrying the whole blob): ECR's
//! chunked upload answers 201 instead of 202 to a PATCH, refuses parts under 5 MiB except
//! the last, and has been seen to drop the body of every PATCH after the first, while a
//! whole-blob PUT is what it handles for layers of any size.

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use crate::archive::{Image, MANIFEST_MEDIA_TYPE};

/// A registry refused or failed.
#[derive(Debug, thiserror::Error)]
#[error("registry {registry}, repository {repository}: {message}")]
pub struct RegistryError {
    /// The registry's host.
    pub registry: String,
    /// The repository.
    pub repository: String,
    /// What went wrong.
    pub message: String,
}

/// Where images go: `https://` (ECR) or `http://` (a local registry in tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]`.
    pub host: String,
    /// Plain HTTP instead of HTTPS.
    pub insecure: bool,
}

impl Endpoint {
    /// Parses `https://host[:port]` or `http://host[:port]`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (insecure, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (true, rest)
        } else {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        };
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(format!(
                "{url:?} must be scheme://host[:port], without a path"
            ));
        }
        Ok(Self {
            host: host.to_owned(),
            insecure,
        })
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    /// Blobs sent.
    pub sent: usize,
    /// Bytes in the blobs sent.
    pub bytes: usize,
    /// Blobs the registry already had.
    pub present: usize,
    /// Whether the manifest was put; `false` when the tag already named it.
    pub tagged: bool,
}

/// A logged-in registry client.
pub struct Registry {
    client: Client,
    endpoint: Endpoint,
    auth: RegistryAuth,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client holds credentials: only the endpoint is shown.
        f.debug_struct("Registry")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A client for `endpoint` that authenticates with `username` and `password` (ECR's
    /// authorization token is a basic-auth pair).
    pub fn new(endpoint: Endpoint, username: String, password: String) -> Self {
        let protocol = if endpoint.insecure {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            use_monolithic_push: true,
            ..ClientConfig::default()
        });
        Self {
            client,
            endpoint,
            auth: RegistryAuth::Basic(username, password),
        }
    }

    /// The registry's host, as image references name it.
    pub fn host(&self) -> &str {
        &self.endpoint.host
    }

    /// How many of the image's blobs the registry lacks in `repository`.
    pub async fn missing_blobs(
        &self,
        repository: &str,
        image: &Image,
    ) -> Result<usize, RegistryError> {
        let reference = self.reference(repository, image);
        self.login(&reference, RegistryOperation::Pull).await?;
        let mut missing = 0;
        for blob in image.blobs() {
            if !self.has_blob(&reference, repository, &blob.digest).await? {
                missing += 1;
            }
        }
        Ok(missing)
    }

    /// Pushes the image to `repository` under its tag, sending only the blobs the registry
    /// lacks, and the manifest only when the tag does not name it yet. Returns what was sent.
    pub async fn push(&self, repository: &str, image: &Image) -> Result<Pushed, RegistryError> {
        let reference = self.reference(repository, image);
        self.login(&reference, RegistryOperation::Pull).await?;
        self.login(&reference, RegistryOperation::Push).await?;
        let mut pushed = Pushed {
            sent: 0,
            bytes: 0,
            present: 0,
            tagged: false,
        };
        for blob in image.blobs() {
            if self.has_blob(&reference, repository, &blob.digest).await? {
                pushed.present += 1;
                continue;
            }
            self.client
                .push_blob(&reference, blob.data.clone(), &blob.digest)
                .await
                .map_err(|error| {
                    self.error(repository, format!("pushing blob {}: {error}", blob.digest))
                })?;
            pushed.sent += 1;
            pushed.bytes += blob.data.len();
        }
        if pushed.sent == 0 && self.tagged(repository, image).await {
            return Ok(pushed);
        }
        let content_type = MANIFEST_MEDIA_TYPE
            .parse()
            .map_err(|_| self.error(repository, "bad manifest media type".into()))?;
        self.client
            .push_manifest_raw(&reference, image.manifest.data.clone(), content_type)
            .await
            .map_err(|error| {
                self.error(
                    repository,
                    format!("pushing manifest {}: {error}", image.manifest.digest),
                )
            })?;
        pushed.tagged = true;
        Ok(pushed)
    }

    /// Whether the image's tag in `repository` already names its manifest. Any failure to
    /// find out counts as no: the lookup only spares a request, and putting the manifest
    /// is always correct.
    pub async fn tagged(&self, repository: &str, image: &Image) -> bool {
        let digest = self
            .client
            .fetch_manifest_digest(&self.reference(repository, image), &self.auth)
            .await;
        digest.is_ok_and(|digest| digest == image.manifest.digest)
    }

    fn reference(&self, repository: &str, image: &Image) -> Reference {
        Reference::with_tag(
            self.endpoint.host.clone(),
            repository.to_owned(),
            image.tag.clone(),
        )
    }

    async fn login(
        &self,
        reference: &Reference,
        operation: RegistryOperation,
    ) -> Result<(), RegistryError> {
        self.client
            .auth(reference, &self.auth, operation)
            .await
            .map(drop)
            .map_err(|error| self.error(reference.repository(), format!("logging in: {error}")))
    }

    async fn has_blob(
        &self,
        reference: &Reference,
        repository: &str,
        digest: &str,
    ) -> Result<bool, RegistryError> {
        self.client
            .blob_exists(reference, digest)
            .await
            .map_err(|error| self.error(repository, format!("checking blob {digest}: {error}")))
    }

    fn error(&self, repository: &str, message: String) -> RegistryError {
        RegistryError {
            registry: self.endpoint.host.clone(),
            repository: repository.to_owned(),
            message,
        }
    }
}
