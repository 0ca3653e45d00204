//! `fwtool keygen`: a fresh ed25519 key pair.

use crate::files::write_atomic;
use anyhow::{bail, Context, Result};
use proto::SecretKey;
use std::path::Path;

/// Writes `PATH.key` (0600) and `PATH.pub`; refuses to overwrite unless `force`.
pub fn keygen(out: &Path, force: bool) -> Result<SecretKey> {
    let key_path = with_suffix(out, ".key");
    let pub_path = with_suffix(out, ".pub");
    for p in [&key_path, &pub_path] {
        if p.exists() && !force {
            bail!("{} already exists; pass --force to replace it", p.display());
        }
    }
    if let Some(dir) = key_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("reading OS randomness: {e}"))?;
    let key = SecretKey::from_seed(seed);
    seed.fill(0);
    write_atomic(&key_path, key.to_text().as_bytes(), 0o600)?;
    write_atomic(&pub_path, key.public().to_text().as_bytes(), 0o644)?;
    Ok(key)
}

/// `PATH` + suffix, keeping any dots already in the name (`release.v2` -> `release.v2.key`).
pub fn with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}
