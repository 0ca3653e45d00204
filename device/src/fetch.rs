//! Fetching blobs, several in parallel; every blob is verified on arrival and a peer that
//! sends a bad one is dropped for the release.
//!
//! Where chunks come from:
//! - **peer exchange** (the default): ask the hub first, saying we can use peers; the hub
//!   sends each chunk to about one device and answers everyone else with peers that have
//!   it (`hub/src/tracker.rs`). Those peers are asked in turn; if none is free yet, ask
//!   the hub again shortly. A chunk stored is reported to the hub, which may then name
//!   this device to others. After [`FAILED_ROUNDS`] rounds in a row in which no named
//!   peer could be reached, ask the hub to send the chunk regardless (and try peers
//!   again for the next one).
//! - **hub down**: connected peers (those known to run the release first), then the hub;
//! - **peer exchange off**: the hub only, as a hub-and-spoke system would.

use crate::config::Config;
use crate::metrics::DeviceMetrics;
use crate::report::Reporter;
use crate::store::Store;
use anyhow::{bail, Result};
use futures::StreamExt;
use net::ratelimit::RateLimiter;
use net::{FetchError, Multiaddr, NetClient, Path, PeerId, Want};
use proto::announcement::Announcement;
use proto::manifest::{verify_chunk, Manifest};
use proto::Digest;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Peers that sent a bad blob during one release's download: not asked again for it.
pub type Banned = Mutex<HashSet<PeerId>>;

/// Give up on a blob after this long without any source delivering it or the hub
/// answering for it (a hub that names holders or says "wait" is tracking the blob: in a
/// large fleet, waiting for a free holder can take longer than this).
const STALL_LIMIT: Duration = Duration::from_secs(120);
/// Redirect rounds in a row in which no named peer could be reached before the hub is
/// asked directly.
const FAILED_ROUNDS: usize = 16;

#[derive(Debug)]
pub struct Fetcher {
    net: NetClient,
    /// Revoked peers are never asked.
    trust: Arc<crate::trust::Trust>,
    store: Arc<Store>,
    hub: Vec<PeerId>,
    parallel: usize,
    download: Arc<RateLimiter>,
    metrics: Arc<DeviceMetrics>,
    peer_exchange: bool,
    /// Redirect rounds in a row in which no named peer could be reached: past
    /// [`FAILED_ROUNDS`], chunks come straight from the hub until a peer delivers again
    /// (peers the hub can reach but this device cannot, behind NAT for instance).
    failed_rounds: AtomicUsize,
    crash_after_chunks: Option<usize>,
    /// Where the background reports to the hub are spawned.
    tasks: net::tasks::Tasks,
}

/// Why a peer asked for a blob did not deliver it.
#[derive(PartialEq)]
enum Miss {
    /// Could not be dialled or did not answer in time.
    Unreachable,
    /// Behind NAT elsewhere, and no hole could be punched to it.
    NoDirectPath,
    /// Answered: busy, not found, bad bytes.
    Refused,
}

/// What one attempt at a blob came to.
enum Attempt {
    Got(Vec<u8>, Path),
    /// Peers to ask (from the hub), possibly none.
    Redirected(Vec<(PeerId, Multiaddr)>),
    /// The hub did not answer usefully (down, busy, refused).
    NoHub,
}

impl Fetcher {
    pub fn new(
        net: NetClient,
        store: Arc<Store>,
        hub: Vec<PeerId>,
        cfg: &Config,
        metrics: Arc<DeviceMetrics>,
        trust: Arc<crate::trust::Trust>,
        tasks: net::tasks::Tasks,
    ) -> Fetcher {
        Fetcher {
            tasks,
            net,
            trust,
            store,
            hub,
            parallel: cfg.parallel_fetches,
            download: Arc::new(RateLimiter::new(cfg.download_rate)),
            metrics,
            peer_exchange: cfg.peer_exchange,
            failed_rounds: AtomicUsize::new(0),
            crash_after_chunks: cfg
                .crash_at
                .as_deref()
                .and_then(|c| c.strip_prefix("download:"))
                .and_then(|n| n.parse().ok()),
        }
    }

    /// Connected peers to ask (devices, then the hub if `with_hub`). `spread` rotates the
    /// devices so parallel requests go to different peers.
    async fn candidates(
        &self,
        spread: usize,
        banned: &HashSet<PeerId>,
        with_hub: bool,
    ) -> Vec<PeerId> {
        let peers = if self.peer_exchange {
            self.net.peers().await
        } else {
            vec![]
        };
        let mut devices: Vec<PeerId> = peers
            .into_iter()
            .filter(|p| !self.hub.contains(p) && !banned.contains(p))
            .collect();
        if !devices.is_empty() {
            let k = spread % devices.len();
            devices.rotate_left(k);
        }
        if with_hub {
            devices.extend(self.hub.iter().filter(|h| !banned.contains(h)));
        }
        devices
    }

    /// One blob, checked by `check`; returns its bytes and the path they came by.
    /// `swarm`: the hub may answer with peers to ask instead.
    async fn blob(
        &self,
        digest: &Digest,
        spread: usize,
        banned: &Mutex<HashSet<PeerId>>,
        swarm: bool,
        check: impl Fn(&[u8]) -> Result<(), proto::VerifyError>,
    ) -> Result<(Vec<u8>, Path)> {
        let mut start = Instant::now();
        let mut wait = Duration::from_millis(100);
        let swarm = swarm && self.peer_exchange;
        loop {
            let want = if self.failed_rounds.load(Ordering::Relaxed) < FAILED_ROUNDS {
                Want::BlobOrPeers
            } else {
                // Peers keep failing us: the hub itself, please.
                Want::Blob
            };
            let asked = Instant::now();
            let attempt = if swarm {
                self.via_hub(digest, banned, want, &check).await
            } else {
                Attempt::NoHub
            };
            let hub_ms = asked.elapsed().as_millis() as u64;
            match attempt {
                Attempt::Got(bytes, path) => {
                    tracing::debug!(blob = %digest.short(), hub_ms, "fetch from the hub");
                    if want == Want::Blob {
                        // Given up on peers: try them again for the next chunk, and come
                        // back here if they fail again (a device that could not reach
                        // peers for a while, on a busy network, is not behind NAT for
                        // ever).
                        let _ = self.failed_rounds.fetch_update(
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                            |n| Some(n.saturating_sub(1)),
                        );
                    }
                    return Ok((bytes, path));
                }
                Attempt::Redirected(mut peers) => {
                    start = Instant::now();
                    if !peers.is_empty() {
                        // Peers already connected first: no handshake to pay.
                        let connected: HashSet<PeerId> =
                            self.net.peers().await.into_iter().collect();
                        peers.sort_by_key(|(p, _)| !connected.contains(p));
                        let mut unreachable = true;
                        let mut no_path = false;
                        for (peer, addr) in peers {
                            let t = Instant::now();
                            let fetched = self
                                .try_peer(peer, Some(addr), digest, banned, &check)
                                .await;
                            tracing::debug!(
                                blob = %digest.short(),
                                hub_ms,
                                peer_ms = t.elapsed().as_millis() as u64,
                                ok = fetched.is_ok(),
                                "fetch from a named peer"
                            );
                            match fetched {
                                Ok(got) => {
                                    self.failed_rounds.store(0, Ordering::Relaxed);
                                    return Ok(got);
                                }
                                Err(Miss::NoDirectPath) => no_path = true,
                                Err(miss) => unreachable &= miss == Miss::Unreachable,
                            }
                        }
                        if no_path && unreachable {
                            // Behind NAT in another home and not punchable: the hub.
                            self.failed_rounds.store(FAILED_ROUNDS, Ordering::Relaxed);
                            self.metrics.peer_misses.fetch_add(1, Ordering::Relaxed);
                        } else if unreachable {
                            self.failed_rounds.fetch_add(1, Ordering::Relaxed);
                            self.metrics.peer_misses.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // No holder free yet, or the peers named did not deliver: ask the hub
                    // again within a second.
                    wait = wait.min(Duration::from_secs(1));
                }
                Attempt::NoHub => {
                    // The hub did not answer (down, or too busy to answer in time): peers
                    // that run the release may have the blob. The hub itself only when it
                    // was not just asked: a hub slow to answer "ask a peer" would
                    // otherwise be asked for the whole blob by every device it kept
                    // waiting (at 1,000 devices: 12 copies of the image).
                    let snapshot = banned.lock().expect("not poisoned").clone();
                    for peer in self.candidates(spread, &snapshot, !swarm).await {
                        if let Ok(got) = self.try_peer(peer, None, digest, banned, &check).await {
                            return Ok(got);
                        }
                    }
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

    /// Asks the hub for the blob, or (`Want::BlobOrPeers`) for peers to ask.
    async fn via_hub(
        &self,
        digest: &Digest,
        banned: &Mutex<HashSet<PeerId>>,
        want: Want,
        check: &impl Fn(&[u8]) -> Result<(), proto::VerifyError>,
    ) -> Attempt {
        for hub in &self.hub {
            if banned.lock().expect("not poisoned").contains(hub) {
                continue;
            }
            match self.net.fetch_with(*hub, None, *digest, want).await {
                Ok(bytes) => {
                    if let Some(bytes) = self.accept(*hub, digest, bytes, banned, check).await {
                        return Attempt::Got(bytes, Path::Hub);
                    }
                }
                Err(FetchError::Elsewhere(_, peers)) => {
                    let banned = banned.lock().expect("not poisoned");
                    return Attempt::Redirected(
                        peers
                            .into_iter()
                            .filter(|(p, _)| !banned.contains(p) && *p != self.net.peer_id())
                            .collect(),
                    );
                }
                Err(e @ FetchError::Refused(_)) => {
                    tracing::warn!(blob = %digest.short(), "{e}: ask the operator (`hub devices`)");
                }
                Err(e) => tracing::debug!(blob = %digest.short(), "{e}"),
            }
        }
        Attempt::NoHub
    }

    /// Asks one peer; the bytes if they pass `check`, and the path they came by.
    async fn try_peer(
        &self,
        peer: PeerId,
        addr: Option<Multiaddr>,
        digest: &Digest,
        banned: &Mutex<HashSet<PeerId>>,
        check: &impl Fn(&[u8]) -> Result<(), proto::VerifyError>,
    ) -> Result<(Vec<u8>, Path), Miss> {
        if self.trust.is_revoked(&peer) {
            return Err(Miss::Refused);
        }
        match self.net.fetch_via(peer, addr, *digest, Want::Blob).await {
            Ok((bytes, path)) => {
                // Without peer exchange (or with the hub slow) the hub is one of the
                // candidates; the node only knows the address class.
                let path = if self.hub.contains(&peer) {
                    Path::Hub
                } else {
                    path
                };
                self.accept(peer, digest, bytes, banned, check)
                    .await
                    .map(|b| (b, path))
                    .ok_or(Miss::Refused)
            }
            Err(e) => {
                tracing::debug!(blob = %digest.short(), "{e}");
                Err(match e {
                    FetchError::Failed { .. } => Miss::Unreachable,
                    FetchError::NoDirectPath(_) => Miss::NoDirectPath,
                    _ => Miss::Refused,
                })
            }
        }
    }

    /// Tells the hub a blob (chunk or manifest) fetched with peer exchange is stored here
    /// (in the background: a hub that is down or slow holds nothing up).
    pub fn report_stored(&self, digest: Digest) {
        if !self.peer_exchange {
            return;
        }
        for hub in self.hub.clone() {
            let net = self.net.clone();
            self.tasks.spawn(async move {
                let t = Instant::now();
                match net.tell_stored(hub, digest).await {
                    Ok(()) => tracing::debug!(
                        blob = %digest.short(),
                        ms = t.elapsed().as_millis() as u64,
                        "hub told of a stored blob"
                    ),
                    Err(e) => tracing::debug!(blob = %digest.short(), "telling the hub: {e}"),
                }
            });
        }
    }

    /// Counts what arrived, checks it, and bans a peer that sent bad bytes.
    async fn accept(
        &self,
        peer: PeerId,
        digest: &Digest,
        bytes: Vec<u8>,
        banned: &Mutex<HashSet<PeerId>>,
        check: &impl Fn(&[u8]) -> Result<(), proto::VerifyError>,
    ) -> Option<Vec<u8>> {
        self.metrics
            .blob_bytes_received
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        match check(&bytes) {
            Ok(()) => {
                self.download.acquire(bytes.len() as u64).await;
                Some(bytes)
            }
            Err(e) => {
                tracing::warn!(%peer, blob = %digest.short(), "peer sent a bad blob, dropping it for this release: {e}");
                banned.lock().expect("not poisoned").insert(peer);
                None
            }
        }
    }

    /// The signed manifest with this digest (bytes checked against the digest only; the
    /// caller verifies signatures and contents).
    pub async fn manifest(&self, digest: &Digest, banned: &Banned) -> Result<Vec<u8>> {
        if let Some(bytes) = self.store.get_blob(digest) {
            return Ok(bytes);
        }
        let limit = proto::envelope::envelope_limit(proto::codec::Kind::Manifest);
        let (bytes, path) = self
            .blob(digest, 0, banned, true, |b| {
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
        self.account(bytes.len(), path);
        Ok(bytes)
    }

    fn account(&self, n: usize, path: Path) {
        let c = if path == Path::Hub {
            &self.metrics.bytes_from_hub
        } else {
            &self.metrics.bytes_from_peers
        };
        c.fetch_add(n as u64, Ordering::Relaxed);
        self.metrics
            .paths
            .by(path)
            .fetch_add(n as u64, Ordering::Relaxed);
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
        let mut missing: Vec<(usize, proto::manifest::ChunkRef)> = m
            .chunks
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, c)| seen.insert(c.digest) && !self.store.has_chunk(&c.digest))
            .collect();
        // Each device in its own order, so the hub's first copies of the chunks go to
        // different devices and peers have something to trade from the start.
        shuffle(&mut missing, &self.net.peer_id().to_bytes());
        let total = m.chunks.len().max(1);
        let have = AtomicUsize::new(total - missing.len());
        let stored_now = AtomicUsize::new(0);
        tracing::info!(app = %m.app, release = m.release, missing = missing.len(), total, "fetching chunks");
        let mut results = futures::stream::iter(missing.into_iter().map(|(i, c)| {
            let have = &have;
            let stored_now = &stored_now;
            async move {
                let (bytes, path) = self
                    .blob(&c.digest, i, banned, true, |b| verify_chunk(i, &c, b))
                    .await?;
                let store = self.store.clone();
                let len = bytes.len();
                let t = Instant::now();
                tokio::task::spawn_blocking(move || store.put_chunk(&c.digest, &bytes)).await??;
                tracing::debug!(blob = %c.digest.short(), ms = t.elapsed().as_millis() as u64, "chunk stored");
                self.report_stored(c.digest);
                self.account(len, path);
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

/// FNV-1a: the same number for the same bytes on every device and every run (a device's
/// fetch order and re-gossip phase derive from its peer id).
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Fisher–Yates with a splitmix64 stream seeded from `seed`: a fixed order per device.
fn shuffle<T>(items: &mut [T], seed: &[u8]) {
    let mut state = stable_hash(seed);
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shuffle_is_a_permutation_fixed_per_seed_and_differs_between_seeds() {
        let base: Vec<u32> = (0..200).collect();
        let order = |seed: &[u8]| {
            let mut v = base.clone();
            super::shuffle(&mut v, seed);
            v
        };
        let a = order(b"device-a");
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, base);
        assert_eq!(a, order(b"device-a"));
        assert_ne!(a, order(b"device-b"));
        assert_ne!(a, base);
    }
}
