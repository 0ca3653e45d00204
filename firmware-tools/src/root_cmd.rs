//! `fwtool root …`: create, rotate, co-sign and check trust roots.

use crate::files::{now, read_limited, read_public_key, read_secret_key, write_atomic, DAY};
use anyhow::{bail, Context, Result};
use proto::codec::Kind;
use proto::envelope::{envelope_limit, Envelope};
use proto::root::{Role, Root, TrustedRoot};
use std::path::{Path, PathBuf};

/// Key sets and thresholds given on the command line.
#[derive(Debug, Default)]
pub struct RoleArgs {
    pub root_keys: Vec<PathBuf>,
    pub root_threshold: Option<u32>,
    pub release_keys: Vec<PathBuf>,
    pub release_threshold: Option<u32>,
    pub timestamp_keys: Vec<PathBuf>,
    pub rollout_keys: Vec<PathBuf>,
}

fn role(paths: &[PathBuf], threshold: Option<u32>) -> Result<Role> {
    let keys = paths
        .iter()
        .map(|p| read_public_key(p))
        .collect::<Result<Vec<_>>>()?;
    Ok(Role {
        threshold: threshold.unwrap_or(1),
        keys,
    })
}

pub fn read_envelope(path: &Path) -> Result<Envelope> {
    let bytes = read_limited(path, envelope_limit(Kind::Root), "root file")?;
    Envelope::decode(&bytes, Kind::Root).with_context(|| format!("reading root {}", path.display()))
}

/// Decodes the root inside an envelope without verifying it: only to show or extend it.
pub fn unverified_root(env: &Envelope) -> Result<Root> {
    Ok(proto::codec::decode(Kind::Root, &env.payload)?)
}

fn sign_all(env: &mut Envelope, keys: &[PathBuf]) -> Result<()> {
    for k in keys {
        env.sign(&read_secret_key(k)?)?;
    }
    Ok(())
}

pub fn init(
    fleet: &str,
    roles: &RoleArgs,
    expires_days: u64,
    sign_with: &[PathBuf],
    out: &Path,
) -> Result<Root> {
    if roles.root_keys.is_empty()
        || roles.release_keys.is_empty()
        || roles.timestamp_keys.is_empty()
        || roles.rollout_keys.is_empty()
    {
        bail!("a root needs at least one --root-key, one --release-key, one --timestamp-key and one --rollout-key (the last two are the hub's online keys)");
    }
    let root = Root {
        fleet: fleet.into(),
        version: 1,
        expires_at: now() + expires_days * DAY,
        root: role(&roles.root_keys, roles.root_threshold)?,
        release: role(&roles.release_keys, roles.release_threshold)?,
        timestamp: role(&roles.timestamp_keys, Some(1))?,
        rollout: role(&roles.rollout_keys, Some(1))?,
    };
    root.validate()?;
    let mut env = root.seal()?;
    sign_all(&mut env, sign_with)?;
    write_atomic(out, &env.encode()?, 0o644)?;
    Ok(root)
}

/// The next root: version + 1, with replaced key sets where given, others carried over.
pub fn rotate(
    from: &Path,
    roles: &RoleArgs,
    expires_days: u64,
    sign_with: &[PathBuf],
    out: &Path,
) -> Result<Root> {
    let old = unverified_root(&read_envelope(from)?)?;
    let mut root = old.clone();
    root.version = old.version + 1;
    root.expires_at = now() + expires_days * DAY;
    if !roles.root_keys.is_empty() {
        root.root = role(&roles.root_keys, roles.root_threshold)?;
    } else if let Some(t) = roles.root_threshold {
        root.root.threshold = t;
    }
    if !roles.release_keys.is_empty() {
        root.release = role(&roles.release_keys, roles.release_threshold)?;
    } else if let Some(t) = roles.release_threshold {
        root.release.threshold = t;
    }
    if !roles.timestamp_keys.is_empty() {
        root.timestamp = role(&roles.timestamp_keys, Some(1))?;
    }
    if !roles.rollout_keys.is_empty() {
        root.rollout = role(&roles.rollout_keys, Some(1))?;
    }
    root.validate()?;
    let mut env = root.seal()?;
    sign_all(&mut env, sign_with)?;
    write_atomic(out, &env.encode()?, 0o644)?;
    Ok(root)
}

/// Adds one signature; returns the root and the number of signatures now on it.
pub fn sign(path: &Path, key: &Path) -> Result<(Root, usize)> {
    let mut env = read_envelope(path)?;
    let root = unverified_root(&env)?;
    env.sign(&read_secret_key(key)?)?;
    write_atomic(path, &env.encode()?, 0o644)?;
    Ok((root, env.signatures.len()))
}

/// Verifies `path` as a self-signed root, or as the next link after each of `trusted`
/// (oldest first) when given.
pub fn verify(path: &Path, trusted: &[PathBuf], at: Option<u64>) -> Result<TrustedRoot> {
    let now = at.unwrap_or_else(now);
    let limit = envelope_limit(Kind::Root);
    let target = read_limited(path, limit, "root file")?;
    let Some((first, rest)) = trusted.split_first() else {
        return TrustedRoot::bootstrap(&target, now)
            .with_context(|| format!("verifying root {}", path.display()));
    };
    let anchor_path = first;
    let first = read_limited(first, limit, "root file")?;
    // The oldest trusted root is the anchor; it may have expired since, as on a device
    // that was offline, so it is anchored at its own lifetime.
    let anchor_env = Envelope::decode(&first, Kind::Root)
        .with_context(|| format!("reading root {}", anchor_path.display()))?;
    let anchor_time = unverified_root(&anchor_env)?
        .expires_at
        .saturating_sub(1)
        .min(now);
    let anchor = TrustedRoot::bootstrap(&first, anchor_time)?;
    let mut chain = Vec::new();
    for p in rest {
        chain.push(read_limited(p, limit, "root file")?);
    }
    chain.push(target);
    Ok(anchor.update_chain(chain.iter().map(Vec::as_slice), now)?)
}
