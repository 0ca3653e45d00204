//! File handling shared by every command: atomic writes, bounded reads, key files.

use anyhow::{bail, Context, Result};
use proto::{PublicKey, SecretKey};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one:
/// write a temporary file beside it, fsync, rename over, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))?;
    Ok(())
}

/// Reads a whole file that must not exceed `limit` bytes (checked before reading).
pub fn read_limited(path: &Path, limit: usize, what: &str) -> Result<Vec<u8>> {
    let f = File::open(path).with_context(|| format!("opening {what} {}", path.display()))?;
    let len = f.metadata()?.len();
    if len > limit as u64 {
        bail!(
            "{what} {} is {len} bytes, more than the {limit}-byte limit",
            path.display()
        );
    }
    let mut out = Vec::with_capacity(len as usize);
    f.take(limit as u64 + 1)
        .read_to_end(&mut out)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    if out.len() > limit {
        bail!(
            "{what} {} grew past the {limit}-byte limit while reading",
            path.display()
        );
    }
    Ok(out)
}

const KEY_FILE_LIMIT: usize = 4096;

pub fn read_public_key(path: &Path) -> Result<PublicKey> {
    let text = read_limited(path, KEY_FILE_LIMIT, "public key")?;
    PublicKey::from_text(&String::from_utf8_lossy(&text))
        .with_context(|| format!("reading public key {}", path.display()))
}

pub fn read_secret_key(path: &Path) -> Result<SecretKey> {
    let f = File::open(path).with_context(|| format!("opening secret key {}", path.display()))?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&f.metadata()?.permissions());
    if mode & 0o077 != 0 {
        bail!(
            "secret key {} is readable by others (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        );
    }
    let text = read_limited(path, KEY_FILE_LIMIT, "secret key")?;
    SecretKey::from_text(&String::from_utf8_lossy(&text))
        .with_context(|| format!("reading secret key {}", path.display()))
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub const DAY: u64 = 24 * 3600;
