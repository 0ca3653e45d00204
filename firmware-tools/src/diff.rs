//! `fwtool diff OLD NEW`: what a device holding OLD must fetch to get NEW.

use crate::release;
use anyhow::{Context, Result};
use proto::manifest::ChunkRef;
use serde::Serialize;
use std::collections::HashSet;
use std::io::BufReader;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct Diff {
    pub new_size: u64,
    pub new_chunks: usize,
    pub shared_chunks: usize,
    pub changed_chunks: usize,
    /// Bytes of NEW's distinct chunks that OLD does not have.
    pub fetch_bytes: u64,
    pub fetch_percent: f64,
}

/// The chunk list of an image file or a release directory.
fn chunk_list(path: &Path) -> Result<Vec<ChunkRef>> {
    if path.is_dir() {
        let (_, env) = release::read_manifest_envelope(path)?;
        return Ok(release::unverified_manifest(&env)?.chunks);
    }
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    proto::chunking::chunks(BufReader::with_capacity(1 << 20, file))
        .map(|c| {
            let c = c.with_context(|| format!("reading {}", path.display()))?;
            Ok(ChunkRef {
                digest: c.digest,
                size: c.data.len() as u64,
            })
        })
        .collect()
}

pub fn diff(old: &Path, new: &Path) -> Result<Diff> {
    let old: HashSet<_> = chunk_list(old)?.into_iter().map(|c| c.digest).collect();
    let new = chunk_list(new)?;
    let new_size: u64 = new.iter().map(|c| c.size).sum();
    let mut seen = HashSet::new();
    let (mut shared, mut changed, mut fetch) = (0, 0, 0u64);
    for c in &new {
        if old.contains(&c.digest) {
            shared += 1;
        } else {
            changed += 1;
            if seen.insert(c.digest) {
                fetch += c.size;
            }
        }
    }
    Ok(Diff {
        new_size,
        new_chunks: new.len(),
        shared_chunks: shared,
        changed_chunks: changed,
        fetch_bytes: fetch,
        fetch_percent: if new_size == 0 {
            0.0
        } else {
            fetch as f64 * 100.0 / new_size as f64
        },
    })
}
