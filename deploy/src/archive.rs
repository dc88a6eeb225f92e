//! Image archives as Nix builds them (`dockerTools.buildLayeredImage`: a docker-archive
//! tarball, gzipped or not, with `manifest.json`, the image config and one `layer.tar` per
//! layer), turned into what a registry stores: gzip-compressed layer blobs, the config blob
//! and an OCI image manifest. Compression and the manifest are deterministic, so the same
//! archive always gives the same digests: a repeated deploy finds its blobs already pushed
//! and its task definitions unchanged.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::config::Architecture;

/// The media type of the manifests this module builds.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// An image archive that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("image archive {}: {message}", path.display())]
pub struct ArchiveError {
    /// The archive's path.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

/// Content-addressed bytes, as a registry stores them.
#[derive(Debug, Clone)]
pub struct Blob {
    /// `sha256:<hex>` of `data`.
    pub digest: String,
    /// The bytes.
    pub data: Vec<u8>,
}

impl Blob {
    fn new(data: Vec<u8>) -> Self {
        Self {
            digest: sha256(&data),
            data,
        }
    }
}

/// An image ready to push.
#[derive(Debug, Clone)]
pub struct Image {
    /// Where it was read from.
    pub source: PathBuf,
    /// The tag the archive carries (`RepoTags`), else `latest`.
    pub tag: String,
    /// The source revision the image is labelled with, if any.
    pub revision: Option<String>,
    /// The image config.
    pub config: Blob,
    /// The gzip-compressed layers, base first.
    pub layers: Vec<Blob>,
    /// The OCI image manifest; its digest is the image's digest.
    pub manifest: Blob,
}

/// `manifest.json` of a docker archive.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The parts of an image config this module checks.
#[derive(Debug, Deserialize)]
struct ImageConfig {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    config: Option<RunConfig>,
    rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
struct RunConfig {
    #[serde(rename = "Labels", default)]
    labels: Option<HashMap<String, String>>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

impl Image {
    /// Reads the archive at `path`, checks that its layers match the config and that it is
    /// built for `architecture`, and prepares its blobs.
    pub fn read(path: &Path, architecture: Architecture) -> Result<Self, ArchiveError> {
        let fail = |message: String| ArchiveError {
            path: path.to_owned(),
            message,
        };
        let files = read_files(path).map_err(|error| fail(error.to_string()))?;
        let take = |name: &str| {
            files.get(name.trim_start_matches("./")).ok_or_else(|| {
                fail(format!(
                    "has no {name}; is it a docker archive (nix build .#images)?"
                ))
            })
        };
        let entries: Vec<ArchiveEntry> = serde_json::from_slice(take("manifest.json")?)
            .map_err(|error| fail(format!("manifest.json: {error}")))?;
        let [entry] = entries.as_slice() else {
            return Err(fail(format!(
                "holds {} images; one is expected",
                entries.len()
            )));
        };
        let config_bytes = take(&entry.config)?.clone();
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .map_err(|error| fail(format!("{}: {error}", entry.config)))?;
        let wanted = match architecture {
            Architecture::X86_64 => "amd64",
            Architecture::Arm64 => "arm64",
        };
        if let Some(found) = config
            .architecture
            .as_deref()
            .filter(|found| *found != wanted)
        {
            return Err(fail(format!(
                "is built for {found}, but $.deploy.architecture asks for {wanted}"
            )));
        }
        if config.rootfs.diff_ids.len() != entry.layers.len() {
            return Err(fail(format!(
                "the config lists {} layers, the archive {}",
                config.rootfs.diff_ids.len(),
                entry.layers.len()
            )));
        }
        let mut layers = Vec::with_capacity(entry.layers.len());
        for (name, diff_id) in entry.layers.iter().zip(&config.rootfs.diff_ids) {
            let tar = take(name)?;
            if &sha256(tar) != diff_id {
                return Err(fail(format!("{name} does not match its diff_id {diff_id}")));
            }
            layers.push(Blob::new(
                gzip(tar).map_err(|error| fail(error.to_string()))?,
            ));
        }
        let config_blob = Blob::new(config_bytes);
        let manifest = Blob::new(oci_manifest(&config_blob, &layers));
        let tag = entry
            .repo_tags
            .iter()
            .flatten()
            .find_map(|tag| tag.rsplit_once(':').map(|(_, tag)| tag.to_owned()))
            .filter(|tag| is_tag(tag))
            .unwrap_or_else(|| "latest".to_owned());
        let revision = config
            .config
            .and_then(|run| run.labels)
            .and_then(|mut labels| labels.remove("org.opencontainers.image.revision"));
        Ok(Self {
            source: path.to_owned(),
            tag,
            revision,
            config: config_blob,
            layers,
            manifest,
        })
    }

    /// Every blob the registry needs before the manifest: layers, then the config.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        self.layers.iter().chain(std::iter::once(&self.config))
    }
}

/// The regular files of a tar or tar.gz archive, by path without a leading `./`.
fn read_files(path: &Path) -> std::io::Result<HashMap<String, Vec<u8>>> {
    let mut raw = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut raw)?;
    let reader: Box<dyn Read> = if raw.starts_with(&[0x1f, 0x8b]) {
        Box::new(GzDecoder::new(raw.as_slice()))
    } else {
        Box::new(raw.as_slice())
    };
    let mut archive = tar::Archive::new(reader);
    let mut files = HashMap::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        files.insert(name, data);
    }
    Ok(files)
}

fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    // GzEncoder writes mtime 0 and no file name: the output depends on the input alone.
    let mut encoder = GzEncoder::new(Vec::with_capacity(data.len() / 2), Compression::default());
    encoder.write_all(data)?;
    encoder.finish()
}

/// `sha256:<hex>`.
pub fn sha256(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in hash {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

fn oci_manifest(config: &Blob, layers: &[Blob]) -> Vec<u8> {
    let descriptor = |media_type: &str, blob: &Blob| serde_json::json!({ "mediaType": media_type, "digest": blob.digest, "size": blob.data.len() });
    // serde_json's maps are sorted: the same inputs always give the same bytes.
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, config),
        "layers": layers.iter().map(|layer| descriptor(LAYER_MEDIA_TYPE, layer)).collect::<Vec<_>>(),
    })
    .to_string()
    .into_bytes()
}

/// An OCI tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn is_tag(tag: &str) -> bool {
    tag.len() <= 128
        && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}
