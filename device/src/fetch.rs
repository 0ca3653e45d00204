//! Fetching blobs, several in parallel; every blob is verified on arrival and a peer that
//! sends a bad one is dropped for the release.
//!
//! What is asked of whom for each blob (the hub, the peers it names, connected peers), and
//! when to give up, is decided in [`crate::schedule`]; this module carries it out over
//! the network, checks what arrives, stores it and reports it to the hub.

use crate::config::Config;
use crate::metrics::DeviceMetrics;
use crate::report::Reporter;
use crate::schedule::{BlobFetch, HubAnswer, Miss, Reports, Sources, Step, Took, STALL_LIMIT};
use crate::store::{Store, StoreError};
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

/// Why a blob, or a release's chunks, were not fetched and stored.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(
        "no peer or hub delivered blob {} and nothing else was stored for {}; the download \
         is tried again later",
        blob.short(),
        humantime::format_duration(*stalled)
    )]
    Stalled { blob: Digest, stalled: Duration },
    #[error("a blob was delivered but its bytes went missing")]
    Lost,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("storing chunk {}", .0.short())]
    Join(Digest, #[source] tokio::task::JoinError),
}

type Result<T, E = DownloadError> = std::result::Result<T, E>;

/// Peers that sent a bad blob during one release's download: not asked again for it.
pub type Banned = Mutex<HashSet<PeerId>>;

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
    /// What the device learned about reaching named peers, shared by its blobs.
    sources: Mutex<Sources<Source>>,
    crash_after_chunks: Option<usize>,
    /// Where the background reports to the hub are spawned.
    tasks: net::tasks::Tasks,
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
            sources: Mutex::new(Sources::default()),
            crash_after_chunks: cfg
                .crash_at
                .as_deref()
                .filter(|_| cfg!(feature = "test-hooks"))
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

    /// One blob of about `size` bytes, checked by `check`; returns its bytes and the path
    /// they came by. With peer exchange on, the hub may answer with peers to ask instead;
    /// `reports`: the release's "stored" reports, one of which may ride on this blob's
    /// first ask. What is asked of whom, each peer's deadline and when to give up are
    /// [`BlobFetch`]'s and [`Sources`]' to decide; this carries them out.
    async fn blob(
        &self,
        digest: &Digest,
        size: u64,
        spread: usize,
        banned: &Mutex<HashSet<PeerId>>,
        reports: Option<&Mutex<Reports>>,
        check: impl Fn(&[u8]) -> Result<(), proto::VerifyError>,
    ) -> Result<(Vec<u8>, Path)> {
        let mut fetch = BlobFetch::new(self.peer_exchange, Instant::now());
        let mut step = fetch.ask(&self.sources());
        if let Some(reports) = reports {
            let alone;
            (step, alone) = reports.lock().expect("not poisoned").begin(step);
            self.report_stored(alone);
        }
        let ask = Ask {
            digest,
            size,
            banned,
            check: &check,
        };
        let mut got = None;
        loop {
            step = match step {
                Step::AskHub(want) => {
                    let asked = Instant::now();
                    let (answer, bytes) = self.via_hub(&ask, want).await;
                    let hub_ms = asked.elapsed().as_millis() as u64;
                    if bytes.is_some() {
                        tracing::debug!(blob = %digest.short(), hub_ms, "fetch from the hub");
                        got = bytes;
                    }
                    fetch.hub_answered(&mut self.sources(), answer, Instant::now())
                }
                Step::AskNamed(peers) => match self.named(peers, &ask).await {
                    Ok((bytes, took)) => {
                        got = Some(bytes);
                        fetch.named_delivered(&mut self.sources(), took, Instant::now())
                    }
                    Err(misses) => {
                        let (next, counted) =
                            fetch.named_missed(&mut self.sources(), &misses, Instant::now());
                        if counted {
                            self.metrics.peer_misses.fetch_add(1, Ordering::Relaxed);
                        }
                        next
                    }
                },
                Step::AskConnected { with_hub } => {
                    let delivered = self.connected(spread, with_hub, &ask).await;
                    let took = delivered.map(|(bytes, took)| {
                        got = Some(bytes);
                        took
                    });
                    fetch.connected_answered(&mut self.sources(), took, Instant::now())
                }
                Step::Sleep(wait) => {
                    tokio::time::sleep(wait).await;
                    fetch.ask(&self.sources())
                }
                Step::Done => return got.ok_or(DownloadError::Lost),
                Step::Stalled => {
                    return Err(DownloadError::Stalled {
                        blob: *digest,
                        stalled: STALL_LIMIT,
                    })
                }
            };
        }
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, Sources<Source>> {
        self.sources.lock().expect("not poisoned")
    }

    /// Asks the connected peers this device has not found silent lately (the hub too if
    /// `with_hub`), one after the other, until one delivers: its bytes, path, and how
    /// long a device took (0 bytes counted for the hub: its pace is not a peer's).
    async fn connected(
        &self,
        spread: usize,
        with_hub: bool,
        ask: &Ask<'_, impl Fn(&[u8]) -> Result<(), proto::VerifyError>>,
    ) -> Option<((Vec<u8>, Path), Took)> {
        let snapshot = ask.banned.lock().expect("not poisoned").clone();
        for peer in self.candidates(spread, &snapshot, with_hub).await {
            let source = Source { peer, addr: None };
            if !self.sources().usable(&source, Instant::now()) {
                continue;
            }
            match self.try_peer(&source, ask).await {
                Ok((bytes, mut took)) => {
                    if self.hub.contains(&peer) {
                        took.bytes = 0;
                    }
                    return Some((bytes, took));
                }
                // The hub is not set aside: without peer exchange it is the last source.
                Err(miss) if !self.hub.contains(&peer) => {
                    self.sources().peer_missed(&source, miss, Instant::now())
                }
                Err(_) => {}
            }
        }
        None
    }

    /// Asks the peers the hub named, connected ones first (no handshake to pay), until
    /// one delivers; else why each missed.
    async fn named(
        &self,
        mut peers: Vec<Source>,
        ask: &Ask<'_, impl Fn(&[u8]) -> Result<(), proto::VerifyError>>,
    ) -> Result<((Vec<u8>, Path), Took), Vec<(Source, Miss)>> {
        let connected: HashSet<PeerId> = self.net.peers().await.into_iter().collect();
        peers.sort_by_key(|s| !connected.contains(&s.peer));
        let mut misses = vec![];
        for source in peers {
            match self.try_peer(&source, ask).await {
                Ok(got) => return Ok(got),
                Err(miss) => misses.push((source, miss)),
            }
        }
        Err(misses)
    }

    /// Asks the hub for the blob, or (`Want::BlobOrPeers`) for peers to ask; the bytes
    /// when it sent them and they passed `check`.
    async fn via_hub(
        &self,
        ask: &Ask<'_, impl Fn(&[u8]) -> Result<(), proto::VerifyError>>,
        want: Want,
    ) -> (HubAnswer<Source>, Option<(Vec<u8>, Path)>) {
        let Ask {
            digest,
            banned,
            check,
            ..
        } = *ask;
        for hub in &self.hub {
            if banned.lock().expect("not poisoned").contains(hub) {
                continue;
            }
            match self.net.fetch_with(*hub, None, *digest, want).await {
                Ok(bytes) => {
                    if let Some(bytes) = self.accept(*hub, digest, bytes, banned, check).await {
                        return (HubAnswer::Blob, Some((bytes, Path::Hub)));
                    }
                }
                Err(FetchError::Elsewhere(_, peers)) => {
                    let banned = banned.lock().expect("not poisoned");
                    let peers = peers
                        .into_iter()
                        .filter(|(p, _)| !banned.contains(p) && *p != self.net.peer_id())
                        .map(|(peer, addr)| Source {
                            peer,
                            addr: Some(addr),
                        })
                        .collect();
                    return (HubAnswer::Peers(peers), None);
                }
                Err(e @ FetchError::Refused(_)) => {
                    tracing::warn!(blob = %digest.short(), "{e}: ask the operator (`hub devices`)");
                }
                Err(e) => tracing::debug!(blob = %digest.short(), "{e}"),
            }
        }
        (HubAnswer::Silent, None)
    }

    /// Asks one peer within its deadline ([`Sources::deadline`]); the bytes if they pass
    /// `check`, the path they came by and how long they took.
    async fn try_peer(
        &self,
        source: &Source,
        ask: &Ask<'_, impl Fn(&[u8]) -> Result<(), proto::VerifyError>>,
    ) -> Result<((Vec<u8>, Path), Took), Miss> {
        let (peer, addr) = (source.peer, source.addr.clone());
        let digest = ask.digest;
        if self.trust.is_revoked(&peer) {
            return Err(Miss::Refused);
        }
        // The hub, asked as a connected peer (no peer exchange, or the hub slow to answer
        // "ask a peer"), queues whole blobs behind its upload cap: the network's own
        // request timeout is its limit, not a peer's deadline.
        let deadline = (!self.hub.contains(&peer)).then(|| self.sources().deadline(ask.size));
        let t = Instant::now();
        let request = self.net.fetch_via(peer, addr, *digest, Want::Blob);
        let fetched = match deadline {
            Some(deadline) => tokio::time::timeout(deadline, request)
                .await
                .map_err(|_| deadline),
            None => Ok(request.await),
        };
        let took = t.elapsed();
        tracing::debug!(
            blob = %digest.short(),
            %peer,
            peer_ms = took.as_millis() as u64,
            ok = matches!(fetched, Ok(Ok(_))),
            "fetch from a peer"
        );
        match fetched {
            Ok(Ok((bytes, path))) => {
                // Without peer exchange (or with the hub slow) the hub is one of the
                // candidates; the node only knows the address class.
                let path = if self.hub.contains(&peer) {
                    Path::Hub
                } else {
                    path
                };
                let n = bytes.len() as u64;
                self.accept(peer, digest, bytes, ask.banned, ask.check)
                    .await
                    .map(|b| ((b, path), Took { bytes: n, took }))
                    .ok_or(Miss::Refused)
            }
            Ok(Err(e)) => {
                tracing::debug!(blob = %digest.short(), "{e}");
                Err(match e {
                    FetchError::Failed { .. } => Miss::Unreachable,
                    FetchError::NoDirectPath(_) => Miss::NoDirectPath,
                    FetchError::Busy(_) => Miss::Busy,
                    _ => Miss::Refused,
                })
            }
            Err(deadline) => {
                self.sources().deadline_passed(ask.size, deadline);
                tracing::info!(
                    blob = %digest.short(),
                    %peer,
                    "peer did not deliver within {}: asking elsewhere, and telling the hub",
                    humantime::format_duration(round_ms(deadline))
                );
                Err(Miss::Late)
            }
        }
    }

    /// Tells the hub a blob (chunk or manifest) fetched with peer exchange is stored here
    /// (in the background: a hub that is down or slow holds nothing up).
    pub fn report_stored(&self, digest: Option<Digest>) {
        let Some(digest) = digest.filter(|_| self.peer_exchange) else {
            return;
        };
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
            .blob(digest, limit as u64, 0, banned, None, |b| {
                if b.len() > limit {
                    return Err(proto::VerifyError::TooManyBytes {
                        what: proto::Declared::Manifest,
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
        let reports = Mutex::new(Reports::new(missing.len()));
        tracing::info!(app = %m.app, release = m.release, missing = missing.len(), total, "fetching chunks");
        let mut results = futures::stream::iter(missing.into_iter().map(|(i, c)| {
            let have = &have;
            let stored_now = &stored_now;
            let reports = &reports;
            async move {
                let (bytes, path) = self
                    .blob(&c.digest, c.size, i, banned, Some(reports), |b| {
                        verify_chunk(i, &c, b)
                    })
                    .await?;
                let store = self.store.clone();
                let len = bytes.len();
                let t = Instant::now();
                self.tasks
                    .spawn_blocking(move || store.put_chunk(&c.digest, &bytes))
                    .await
                    .map_err(|e| DownloadError::Join(c.digest, e))??;
                tracing::debug!(blob = %c.digest.short(), ms = t.elapsed().as_millis() as u64, "chunk stored");
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
                // Last: the next fetch begins when this one ends, and takes the report.
                let alone = reports.lock().expect("not poisoned").stored(c.digest);
                self.report_stored(alone);
                Ok::<_, DownloadError>(())
            }
        }))
        .buffer_unordered(self.parallel);
        let mut fetched = Ok(());
        while let Some(r) = results.next().await {
            if let Err(e) = r {
                fetched = Err(e);
                break;
            }
        }
        drop(results);
        // A failed chunk ended the others: what they stored is reported all the same.
        for d in reports.into_inner().expect("not poisoned").left() {
            self.report_stored(Some(d));
        }
        fetched
    }
}

/// A peer to ask, at the address the hub named (none: connected already). One peer
/// whatever the address: what the schedule learns of it is the peer's.
#[derive(Debug, Clone)]
pub struct Source {
    pub peer: PeerId,
    pub addr: Option<Multiaddr>,
}

impl PartialEq for Source {
    fn eq(&self, other: &Self) -> bool {
        self.peer == other.peer
    }
}

impl Eq for Source {}

impl std::hash::Hash for Source {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.peer.hash(state);
    }
}

/// What one blob fetch asks every source for, and how it checks the answer.
struct Ask<'a, C> {
    digest: &'a Digest,
    /// About this many bytes (the chunk's declared size): sets a peer's deadline.
    size: u64,
    banned: &'a Mutex<HashSet<PeerId>>,
    check: &'a C,
}

/// A duration to the millisecond, for people.
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// FNV-1a: the same number for the same bytes on every device and every run (a device's
/// fetch order and re-gossip phase derive from its peer id).
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// splitmix64: a small, fixed stream of numbers from a seed (the same on every device and
/// every run; the fleet simulator draws its randomness from it too).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Fisher–Yates with a splitmix64 stream seeded from `seed`: a fixed order per device.
pub fn shuffle<T>(items: &mut [T], seed: &[u8]) {
    let mut rng = SplitMix64(stable_hash(seed));
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
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
