//! `fwtool pack`, `fwtool sign`, `fwtool verify`: a release directory.
//!
//! Layout: `DIR/manifest` (the signed envelope; zero signatures right after `pack`) and
//! `DIR/chunks/<blake3 hex>` (one file per distinct chunk).

use crate::files::{now, read_limited, read_secret_key, write_atomic};
use anyhow::{bail, Context, Result};
use proto::codec::Kind;
use proto::envelope::{envelope_limit, Envelope};
use proto::manifest::{
    verify_manifest, BootSpec, ChunkRef, Expectations, ImageVerifier, Manifest, Platform, Staging,
    VerifiedManifest,
};
use proto::root::TrustedRoot;
use proto::{Digest, VerifyError};
use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

pub fn manifest_path(dir: &Path) -> PathBuf {
    dir.join("manifest")
}

pub fn chunk_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("chunks").join(digest.to_hex())
}

/// Everything `pack` needs besides the image.
#[derive(Debug)]
pub struct PackArgs {
    pub fleet: String,
    pub app: String,
    pub version: semver::Version,
    pub channel: String,
    pub release: u64,
    pub platform: Option<Platform>,
    pub boot: BootSpec,
    pub staging: Staging,
    pub previous: Option<Digest>,
}

/// Reads the first bytes of an image and identifies it.
pub fn inspect_image(path: &Path) -> Result<proto::image::ImageHeader> {
    let mut prefix = Vec::with_capacity(proto::image::INSPECT_PREFIX);
    let file = File::open(path).with_context(|| format!("opening image {}", path.display()))?;
    let size = file
        .metadata()
        .with_context(|| format!("reading the size of image {}", path.display()))?
        .len();
    file.take(proto::image::INSPECT_PREFIX as u64)
        .read_to_end(&mut prefix)
        .with_context(|| format!("reading image {}", path.display()))?;
    proto::image::inspect(&prefix, size).with_context(|| format!("inspecting {}", path.display()))
}

/// Chunks the image into `out/chunks/` and writes an unsigned `out/manifest`.
pub fn pack(image: &Path, args: PackArgs, out: &Path) -> Result<Manifest> {
    let header = inspect_image(image)?;
    let platform = match args.platform {
        Some(p) if !header.platforms.contains(&p) => bail!(
            "{} is a {} image for {}; it cannot boot as {p}",
            image.display(),
            header.format,
            names(&header.platforms)
        ),
        Some(p) => p,
        None => header.platforms[0],
    };
    let chunk_dir = out.join("chunks");
    fs::create_dir_all(&chunk_dir).with_context(|| format!("creating {}", chunk_dir.display()))?;
    let file = File::open(image).with_context(|| format!("opening image {}", image.display()))?;
    let mut chunks = Vec::new();
    let mut image_hasher = proto::digest::Hasher::new();
    let mut size = 0u64;
    for chunk in proto::chunking::chunks(BufReader::with_capacity(1 << 20, file)) {
        let chunk = chunk.with_context(|| format!("reading image {}", image.display()))?;
        image_hasher.update(&chunk.data);
        size += chunk.data.len() as u64;
        let path = chunk_path(out, &chunk.digest);
        if !path.exists() {
            write_atomic(&path, &chunk.data, 0o644)?;
        }
        chunks.push(ChunkRef {
            digest: chunk.digest,
            size: chunk.data.len() as u64,
        });
    }
    let created_at = now();
    let manifest = Manifest {
        fleet: args.fleet,
        app: args.app,
        version: args.version,
        release: args.release,
        channel: args.channel,
        platform,
        image_digest: image_hasher.finalize(),
        image_size: size,
        chunks,
        boot: args.boot,
        staging: args.staging,
        created_at,
        previous: args.previous,
        rollout: Default::default(),
        provenance: None,
    };
    manifest.validate()?;
    write_atomic(&manifest_path(out), &manifest.seal()?.encode()?, 0o644)?;
    Ok(manifest)
}

fn names(platforms: &[Platform]) -> String {
    platforms
        .iter()
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn read_manifest_envelope(dir: &Path) -> Result<(Vec<u8>, Envelope)> {
    let path = manifest_path(dir);
    let bytes = read_limited(&path, envelope_limit(Kind::Manifest), "manifest")?;
    let env = Envelope::decode(&bytes, Kind::Manifest)
        .with_context(|| format!("reading manifest {}", path.display()))?;
    Ok((bytes, env))
}

/// Decodes the manifest without verifying it: for display and defaults only.
pub fn unverified_manifest(env: &Envelope) -> Result<Manifest> {
    Ok(proto::codec::decode(Kind::Manifest, &env.payload)?)
}

/// Adds one release-key signature to `dir/manifest`.
pub fn sign(dir: &Path, key: &Path) -> Result<(Manifest, usize)> {
    let (_, mut env) = read_manifest_envelope(dir)?;
    let manifest = unverified_manifest(&env)?;
    env.sign(&read_secret_key(key)?)?;
    write_atomic(&manifest_path(dir), &env.encode()?, 0o644)?;
    Ok((manifest, env.signatures.len()))
}

/// What the verifying side expects; `None` fields default to the manifest's own claims.
#[derive(Debug, Default)]
pub struct VerifyArgs {
    pub app: Option<String>,
    pub channel: Option<String>,
    pub platform: Option<Platform>,
    pub installed_release: Option<u64>,
    pub at: Option<u64>,
}

/// Verifies a release directory end to end: root, manifest, every chunk, the image.
pub fn verify(
    dir: &Path,
    root: &TrustedRoot,
    args: &VerifyArgs,
) -> Result<VerifiedManifest, VerifyFailure> {
    let (bytes, env) = read_manifest_envelope(dir).map_err(VerifyFailure::Io)?;
    let claimed = unverified_manifest(&env);
    let channel = match (&args.channel, &claimed) {
        (Some(c), _) => c.clone(),
        (None, Ok(m)) => m.channel.clone(),
        (None, Err(_)) => String::new(),
    };
    let platform = args
        .platform
        .or_else(|| claimed.as_ref().ok().map(|m| m.platform))
        .unwrap_or(Platform::QemuX86_64);
    let expect = Expectations {
        app: args.app.as_deref(),
        channel: &channel,
        platform,
        installed_release: args.installed_release,
    };
    let verified = verify_manifest(&bytes, root, &expect, args.at.unwrap_or_else(now))?;
    let manifest = verified.manifest();
    let mut image = ImageVerifier::new(manifest);
    for chunk in &manifest.chunks {
        let path = chunk_path(dir, &chunk.digest);
        // Read at most one byte more than declared: enough to detect endless data.
        let mut data = Vec::with_capacity(chunk.size as usize);
        File::open(&path)
            .and_then(|f| f.take(chunk.size + 1).read_to_end(&mut data))
            .with_context(|| format!("reading chunk {}", path.display()))
            .map_err(VerifyFailure::Io)?;
        image.push(&data)?;
    }
    image.finish()?;
    Ok(verified)
}

/// Why `verify` failed: a verification error proper, or a file that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum VerifyFailure {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("{0:#}")]
    Io(anyhow::Error),
}
