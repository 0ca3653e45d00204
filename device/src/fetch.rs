//! Fetching blobs: from peers first (several in parallel), the hub as fallback. Every
//! blob is verified on arrival; a peer that sends a bad one is dropped for the release.

use crate::config::Config;
use crate::ratelimit::RateLimiter;
use crate::report::Reporter;
use crate::store::Store;
use anyhow::{bail, Result};
use futures::StreamExt;
use net::{NetClient, PeerId};
use proto::announcement::Announcement;
use proto::manifest::{verify_chunk, Manifest};
use proto::Digest;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Peers that sent a bad blob during one release's download: not asked again for it.
pub type Banned = Mutex<HashSet<PeerId>>;

/// Which peers said (in their gossiped status reports) they run which release: fetched
/// from first. A bounded hint: at most this many releases are remembered.
#[derive(Debug, Default)]
pub struct Holders(Mutex<std::collections::HashMap<Digest, HashSet<PeerId>>>);

const MAX_HINTED_RELEASES: usize = 64;

impl Holders {
    pub fn note(&self, manifest: Digest, peer: PeerId) {
        let mut map = self.0.lock().expect("not poisoned");
        if map.len() >= MAX_HINTED_RELEASES && !map.contains_key(&manifest) {
            map.clear();
        }
        map.entry(manifest).or_default().insert(peer);
    }

    fn of(&self, manifest: &Digest) -> HashSet<PeerId> {
        self.0
            .lock()
            .expect("not poisoned")
            .get(manifest)
            .cloned()
            .unwrap_or_default()
    }
}

/// Give up on a blob after this long without any source delivering it.
const STALL_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub struct Fetcher {
    net: NetClient,
    store: Arc<Store>,
    hub: Vec<PeerId>,
    parallel: usize,
    download: Arc<RateLimiter>,
    pub from_peers: Arc<AtomicU64>,
    pub from_hub: Arc<AtomicU64>,
    crash_after_chunks: Option<usize>,
    holders: Arc<Holders>,
}

impl Fetcher {
    pub fn new(
        net: NetClient,
        store: Arc<Store>,
        hub: Vec<PeerId>,
        cfg: &Config,
        reporter: &Reporter,
        holders: Arc<Holders>,
    ) -> Fetcher {
        Fetcher {
            net,
            store,
            hub,
            parallel: cfg.parallel_fetches,
            download: Arc::new(RateLimiter::new(cfg.download_rate)),
            from_peers: reporter.from_peers.clone(),
            from_hub: reporter.from_hub.clone(),
            crash_after_chunks: cfg
                .crash_at
                .as_deref()
                .and_then(|c| c.strip_prefix("download:"))
                .and_then(|n| n.parse().ok()),
            holders,
        }
    }

    /// Connected peers to ask: those that said they run `release` first, then other
    /// devices, the hub last. `spread` rotates each group so parallel requests go to
    /// different peers.
    async fn candidates(
        &self,
        release: &Digest,
        spread: usize,
        banned: &HashSet<PeerId>,
    ) -> Vec<PeerId> {
        let holders = self.holders.of(release);
        let (mut first, mut rest): (Vec<PeerId>, Vec<PeerId>) = self
            .net
            .peers()
            .await
            .into_iter()
            .filter(|p| !self.hub.contains(p) && !banned.contains(p))
            .partition(|p| holders.contains(p));
        for group in [&mut first, &mut rest] {
            if !group.is_empty() {
                let k = spread % group.len();
                group.rotate_left(k);
            }
        }
        first.extend(rest);
        first.extend(self.hub.iter().filter(|h| !banned.contains(h)));
        first
    }

    /// One blob, checked by `check`; returns its bytes and whether the hub sent it.
    async fn blob(
        &self,
        release: &Digest,
        digest: &Digest,
        spread: usize,
        banned: &Mutex<HashSet<PeerId>>,
        check: impl Fn(&[u8]) -> Result<(), proto::VerifyError>,
    ) -> Result<(Vec<u8>, bool)> {
        let start = Instant::now();
        let mut wait = Duration::from_millis(100);
        loop {
            let snapshot = banned.lock().expect("not poisoned").clone();
            for peer in self.candidates(release, spread, &snapshot).await {
                match self.net.fetch(peer, *digest).await {
                    Ok(bytes) => match check(&bytes) {
                        Ok(()) => {
                            self.download.acquire(bytes.len() as u64).await;
                            return Ok((bytes, self.hub.contains(&peer)));
                        }
                        Err(e) => {
                            tracing::warn!(%peer, blob = %digest.short(), "peer sent a bad blob, dropping it for this release: {e}");
                            banned.lock().expect("not poisoned").insert(peer);
                        }
                    },
                    Err(e) => tracing::debug!(blob = %digest.short(), "{e}"),
                }
            }
            if start.elapsed() > STALL_LIMIT {
                bail!(
                    "no peer or hub delivered blob {} within {STALL_LIMIT:?}",
                    digest.short()
                );
            }
            // Nobody had it right now: peers may still be downloading, the hub may be
            // restarting. Back off (bounded) and ask again.
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    /// The signed manifest with this digest (bytes checked against the digest only; the
    /// caller verifies signatures and contents).
    pub async fn manifest(&self, digest: &Digest, banned: &Banned) -> Result<Vec<u8>> {
        if let Some(bytes) = self.store.get_blob(digest) {
            return Ok(bytes);
        }
        let limit = proto::envelope::envelope_limit(proto::codec::Kind::Manifest);
        let (bytes, from_hub) = self
            .blob(digest, digest, 0, banned, |b| {
                if b.len() > limit {
                    return Err(proto::VerifyError::TooManyBytes {
                        what: "manifest".into(),
                        declared: limit as u64,
                        received: b.len() as u64,
                    });
                }
                proto::blob::check(digest, b)
            })
            .await?;
        self.account(bytes.len(), from_hub);
        Ok(bytes)
    }

    fn account(&self, n: usize, from_hub: bool) {
        let c = if from_hub {
            &self.from_hub
        } else {
            &self.from_peers
        };
        c.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Every chunk of `m` not already stored, `parallel` at a time. Chunks already held
    /// (from an earlier release or an interrupted download) are not fetched again.
    pub async fn chunks(
        &self,
        m: &Manifest,
        reporter: &Reporter,
        ann: &Announcement,
        banned: &Banned,
    ) -> Result<()> {
        let mut seen = HashSet::new();
        let missing: Vec<(usize, proto::manifest::ChunkRef)> = m
            .chunks
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, c)| seen.insert(c.digest) && !self.store.has_chunk(&c.digest))
            .collect();
        let total = m.chunks.len().max(1);
        let have = AtomicUsize::new(total - missing.len());
        let stored_now = AtomicUsize::new(0);
        tracing::info!(app = %m.app, release = m.release, missing = missing.len(), total, "fetching chunks");
        let mut results = futures::stream::iter(missing.into_iter().map(|(i, c)| {
            let have = &have;
            let stored_now = &stored_now;
            async move {
                let (bytes, from_hub) = self
                    .blob(&ann.manifest, &c.digest, i, banned, |b| {
                        verify_chunk(i, &c, b)
                    })
                    .await?;
                let store = self.store.clone();
                let len = bytes.len();
                tokio::task::spawn_blocking(move || store.put_chunk(&c.digest, &bytes)).await??;
                self.account(len, from_hub);
                let n = have.fetch_add(1, Ordering::Relaxed) + 1;
                reporter
                    .downloading(&m.app, ann, (n * 100 / total) as u8)
                    .await;
                let k = stored_now.fetch_add(1, Ordering::Relaxed) + 1;
                if self.crash_after_chunks == Some(k) {
                    tracing::warn!("crash_at download:{k}: aborting");
                    std::process::abort();
                }
                anyhow::Ok(())
            }
        }))
        .buffer_unordered(self.parallel);
        while let Some(r) = results.next().await {
            r?;
        }
        Ok(())
    }
}
