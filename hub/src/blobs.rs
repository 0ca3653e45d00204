//! The hub's side of `/unifleet/blob/1`: answers each request — send the blob, name
//! holders ([`crate::tracker`]), park the asker until a holder is free, or "busy" when the
//! hub's capped upload is saturated — and notes devices' reports of chunks stored (alone,
//! or riding on their next ask).

use crate::metrics::Metrics;
use crate::place::{Place, Places};
use crate::store_owner::{Record, StoreReader};
use crate::tracker::{Answer, Decision, Tracker};
use net::ratelimit::RateLimiter;
use net::{Multiaddr, NetClient, PeerId, ReplyId, Seen, Want};
use proto::blob::BlobResponse;
use proto::targeted::Targeted;
use proto::Digest;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Chunks the tracker remembers: ~320 MiB of images at FastCDC's average chunk (the
/// releases being rolled out); at most 256 holders of ~100 bytes each, ~100 MB at worst.
const TRACKER_BLOBS: usize = 4_096;

/// Whom the hub trades blobs with (decided by `serve`'s trust: revoked, enrolled), and
/// which chunks only the devices a release targets may fetch.
#[derive(Debug, Default)]
pub struct Trade {
    /// Revoked devices: refused everything.
    pub refused: HashSet<PeerId>,
    /// `Some`: only these (enrolled) devices are served; `None`: anyone not refused.
    pub only: Option<HashSet<PeerId>>,
    /// The chunks only a release's targeted devices may fetch; `None` until the releases
    /// were first read (chunks are answered busy until then, never served unchecked).
    pub targeted: Option<Arc<Targeted>>,
    /// Enrolled devices' names and keys, by peer id.
    pub names: HashMap<PeerId, (String, proto::PublicKey)>,
    /// The tags the operator assigned, by peer id.
    pub tags: HashMap<PeerId, Vec<String>>,
}

impl Trade {
    fn allows(&self, peer: &PeerId) -> bool {
        !self.refused.contains(peer) && self.only.as_ref().is_none_or(|o| o.contains(peer))
    }

    /// Whether `peer` may fetch `digest` (`None`: not known yet). A device not enrolled
    /// (at a hub that serves such devices) has no name and no tags.
    fn allows_blob(&self, peer: &PeerId, digest: &Digest) -> Option<bool> {
        let targeted = self.targeted.as_ref()?;
        let name = self.names.get(peer).map_or("", |(n, _)| n.as_str());
        let tags = self.tags.get(peer).map_or(&[][..], Vec::as_slice);
        Some(targeted.allows(digest, Some(name), tags))
    }
}

pub struct Blobs {
    net: NetClient,
    trade: Trade,
    /// Blobs and records are read through the store's reader, never behind a commit or gc.
    store: StoreReader,
    metrics: Arc<Metrics>,
    /// Parked askers' tickets: who (to route the holders named for it) and the request.
    tracker: Tracker<PeerId, (PeerId, ReplyId), Places>,
    upload: Arc<RateLimiter>,
    /// Peer exchange on: name holders instead of sending every copy.
    peer_exchange: bool,
    /// Where the blob-sending tasks are spawned (cancelled at shutdown).
    tasks: net::tasks::Tasks,
    /// Issues enrolled devices their MQTT client certificates ([`Want::BrokerCert`]).
    broker_ca: Option<Arc<crate::broker::pki::BrokerCa>>,
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobs")
            .field("tracked", &self.tracker.len())
            .field("peer_exchange", &self.peer_exchange)
            .finish_non_exhaustive()
    }
}

impl Blobs {
    pub fn new(
        net: NetClient,
        store: StoreReader,
        metrics: Arc<Metrics>,
        upload_rate: u64,
        peer_exchange: bool,
        tasks: net::tasks::Tasks,
    ) -> Blobs {
        Blobs {
            net,
            trade: Trade::default(),
            store,
            metrics,
            tracker: Tracker::new(TRACKER_BLOBS),
            upload: Arc::new(RateLimiter::new(upload_rate)),
            peer_exchange,
            tasks,
            broker_ca: None,
        }
    }

    pub fn set_broker_ca(&mut self, ca: Arc<crate::broker::pki::BrokerCa>) {
        self.broker_ca = Some(ca);
    }

    /// An enrolled device's MQTT client certificate, for its own key and name; refused
    /// to anyone else.
    fn broker_cert(&self, peer: &PeerId) -> BlobResponse {
        let (Some(ca), Some((name, key))) = (&self.broker_ca, self.trade.names.get(peer)) else {
            return BlobResponse::Refused;
        };
        match ca.issue_client(name, &key.0, crate::home::now()) {
            Ok(pem) => BlobResponse::Found(pem.into_bytes()),
            Err(e) => {
                tracing::error!(device = %name, "issuing an MQTT client certificate: {}", proto::Chain(&e));
                BlobResponse::NotFound
            }
        }
    }

    pub fn set_trade(&mut self, trade: Trade) {
        for p in &trade.refused {
            self.tracker.forget(|holder| holder == p);
        }
        self.trade = trade;
    }

    /// This hub's own address, `…/p2p/<hub>`, when it is a relay: devices in other homes
    /// are named through it.
    pub fn set_relay(&mut self, relay: Option<Multiaddr>) {
        self.tracker.topology_mut().set_relay(relay);
    }

    /// The answer to a request the hub does not serve, if this is one: from a revoked
    /// (or, serving enrolled devices only, unknown) device, for a chunk of a release that
    /// does not target the asker, or (busy) for a chunk before the releases were read.
    fn gate(&self, peer: &PeerId, digest: &Digest, want: Want) -> Option<BlobResponse> {
        if !self.trade.allows(peer) {
            tracing::info!(%peer, "refusing a blob request: revoked or not enrolled");
            return Some(BlobResponse::Refused);
        }
        // Records (root, lists, announcements) and reports are no release's chunks.
        let chunk = matches!(
            want,
            Want::Blob
                | Want::BlobOrPeers
                | Want::BlobOrPeersAndStored(_)
                | Want::BlobOrPeersMissed
        );
        match self.trade.allows_blob(peer, digest) {
            _ if !chunk => None,
            Some(true) => None,
            Some(false) => {
                tracing::info!(%peer, %digest, "refusing a chunk of a release that does not target the asker");
                self.metrics
                    .untargeted_refused
                    .fetch_add(1, Ordering::Relaxed);
                Some(BlobResponse::Refused)
            }
            None => Some(BlobResponse::Busy),
        }
    }

    /// A blob request from `peer`, seen as `seen`.
    pub async fn wanted(
        &mut self,
        peer: PeerId,
        digest: Digest,
        want: Want,
        seen: Seen,
        reply: ReplyId,
    ) {
        let now = Instant::now();
        if let Some(answer) = self.gate(&peer, &digest, want) {
            self.net.respond(reply, answer).await;
            return;
        }
        self.tracker.topology_mut().update(peer, Place::new(seen));
        // A device that told nobody where it listens can fetch, not be named.
        let known = self.tracker.topology().knows(&peer);
        if want.missed() && known && self.peer_exchange {
            // First: a stored report below must not name the holder reported silent.
            self.metrics.missed_reports.fetch_add(1, Ordering::Relaxed);
            let missed = self.tracker.missed(digest, &peer, now);
            self.metrics
                .holders_suspected
                .fetch_add(u64::from(missed.suspected), Ordering::Relaxed);
            for answer in missed.answers {
                self.answer(answer).await;
            }
        }
        if let Some(stored) = want.stored(digest) {
            self.metrics.stored_reports.fetch_add(1, Ordering::Relaxed);
            if known {
                for answer in self.tracker.stored(stored, peer, now) {
                    self.answer(answer).await;
                }
            }
        }
        // A targeted release's chunks come from the hub itself: the holders it would name
        // may not serve the asker (a staging device holding the candidate, a device with
        // an older list of tags), and nothing would tell it they refused.
        let restricted = self
            .trade
            .targeted
            .as_ref()
            .is_some_and(|t| t.restricts(&digest));
        match want {
            Want::Stored => self.net.respond(reply, BlobResponse::Noted).await,
            want if want.peers_ok() && self.peer_exchange && !restricted => {
                let asker = known.then_some(peer);
                match self.tracker.decide(digest, asker, now) {
                    Decision::Serve => self.send(peer, digest, reply).await,
                    Decision::Elsewhere(named) => match asker {
                        Some(asker) if named.is_empty() => {
                            for answer in self.tracker.park(digest, asker, (asker, reply), now) {
                                self.answer(answer).await;
                            }
                        }
                        _ => self.redirect((peer, reply), named).await,
                    },
                }
            }
            Want::Blob
            | Want::BlobOrPeers
            | Want::BlobOrPeersAndStored(_)
            | Want::BlobOrPeersMissed => self.send(peer, digest, reply).await,
            // The hub announces through its broker and re-announces by gossip every few
            // seconds; asking it is for devices asking a peer.
            Want::Announcement => self.net.respond(reply, BlobResponse::NotFound).await,
            Want::Root | Want::Revocations | Want::Holds => self.send_record(digest, want, reply),
            Want::BrokerCert => self.net.respond(reply, self.broker_cert(&peer)).await,
        }
    }

    /// Answers parked askers: those a holder came free for, and (to ask again) those
    /// that waited long enough.
    pub async fn tick(&mut self) {
        for answer in self.tracker.lapsed(Instant::now()) {
            self.answer(answer).await;
        }
        let m = &self.metrics;
        m.slots_taken
            .store(self.tracker.slots_taken(), Ordering::Relaxed);
        m.parked.store(self.tracker.parked(), Ordering::Relaxed);
        m.suspects
            .store(self.tracker.suspects(Instant::now()), Ordering::Relaxed);
    }

    /// Answers a parked asker: the blob itself, or holders (none: ask again shortly).
    async fn answer(&self, ((asker, reply), digest, decision): Answer<PeerId, (PeerId, ReplyId)>) {
        match decision {
            Decision::Serve => self.send(asker, digest, reply).await,
            Decision::Elsewhere(named) => self.redirect((asker, reply), named).await,
        }
    }

    /// `peer` disconnected: it holds nothing and waits for nothing any more.
    pub fn peer_gone(&mut self, peer: PeerId) {
        self.tracker.forget(|p| *p == peer);
        self.tracker.topology_mut().remove(&peer);
    }

    /// Answers an asker with the holders named for it (none: ask again shortly), each
    /// at the address that works from where the asker is.
    async fn redirect(&self, (asker, reply): (PeerId, ReplyId), named: Vec<PeerId>) {
        let counter = if named.is_empty() {
            &self.metrics.waits
        } else {
            &self.metrics.redirects
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let places = self.tracker.topology();
        let refs = named
            .iter()
            .filter_map(|h| {
                places
                    .route(&asker, h)
                    .map(|(_, addr)| net::peer_ref(h, &addr))
            })
            .collect();
        self.net.respond(reply, BlobResponse::Elsewhere(refs)).await;
    }

    /// A root link (by [`proto::blob::root_key`]), the revocation list or the hold list,
    /// from the store.
    fn send_record(&self, digest: Digest, want: Want, reply: ReplyId) {
        let record = match want {
            Want::Revocations => Record::Revocations,
            Want::Holds => Record::Holds,
            _ => Record::RootLink(digest),
        };
        let store = self.store.clone();
        let net = self.net.clone();
        self.tasks.spawn(async move {
            let found = store.record(record).await.unwrap_or_else(|e| {
                tracing::warn!("reading a signed record for a peer: {}", proto::Chain(&e));
                None
            });
            let response = found.map_or(BlobResponse::NotFound, BlobResponse::Found);
            net.respond(reply, response).await;
        });
    }

    /// Sends the blob under the upload cap, or "busy" if the cap is already owed more
    /// than askers would wait.
    async fn send(&self, peer: PeerId, digest: Digest, reply: ReplyId) {
        if self.upload.saturated() {
            self.metrics.busy.fetch_add(1, Ordering::Relaxed);
            self.net.respond(reply, BlobResponse::Busy).await;
            return;
        }
        let store = self.store.clone();
        let net = self.net.clone();
        let metrics = self.metrics.clone();
        let upload = self.upload.clone();
        self.tasks.spawn(async move {
            let blob = store.blob(digest).await.unwrap_or_else(|e| {
                tracing::warn!(blob = %digest.short(), "reading a blob for a peer: {}", proto::Chain(&e));
                None
            });
            let response = match blob {
                Some(b) => {
                    upload.acquire(b.len() as u64).await;
                    metrics.blobs_served.fetch_add(1, Ordering::Relaxed);
                    metrics
                        .blob_bytes_served
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                    tracing::debug!(%peer, blob = %digest.short(), "serving blob");
                    BlobResponse::Found(b)
                }
                None => BlobResponse::NotFound,
            };
            net.respond(reply, response).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Change, Store};
    use std::time::Duration;

    fn node(seed: u8) -> (NetClient, tokio::sync::mpsc::Receiver<net::NetEvent>) {
        let cfg = net::NetConfig::new(net::keypair_from_seed([seed; 32]), "home");
        net::start(cfg, &net::tasks::Tasks::new()).unwrap()
    }

    /// The hourly gc held the store for its whole run and every peer's blob request waited
    /// behind it. A peer asks the hub's blob service over libp2p while the store's writer
    /// holds the writer lock (as gc does) and gets the blob; the commit sent before it is
    /// still waiting when the blob arrives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_gets_blobs_while_the_store_writer_is_held_by_a_gc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.git");
        let store = Store::init(&path).unwrap();
        let chunk = b"a chunk of an image".to_vec();
        let digest = Digest::of(&chunk);
        let mut c = Change::default();
        c.put(format!("blobs/{}", digest.to_hex()), chunk.clone());
        store.commit("a release", &c, None).unwrap();
        let owners = crate::store_owner::spawn(store, Store::open(&path).unwrap()).unwrap();
        let held = owners.writer.hold().await;
        let writer = owners.writer.clone();
        let commit = tokio::spawn(async move {
            let mut c = Change::default();
            c.put("events/waiting", b"behind the gc".to_vec());
            writer.commit("behind the gc", c).await
        });

        let (hub, mut events) = node(1);
        let tasks = net::tasks::Tasks::new();
        let metrics = Arc::new(Metrics::default());
        let mut blobs = Blobs::new(hub.clone(), owners.reader.clone(), metrics, 0, false, tasks);
        // As once `hub serve` read its releases (none targeted).
        blobs.set_trade(Trade {
            targeted: Some(Default::default()),
            ..Trade::default()
        });
        let addr = loop {
            match events.recv().await.expect("the hub's node runs") {
                net::NetEvent::Listening(a) => break a,
                _ => continue,
            }
        };
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if let net::NetEvent::BlobWanted {
                    peer,
                    digest,
                    want,
                    seen,
                    reply,
                } = ev
                {
                    blobs.wanted(peer, digest, want, seen, reply).await;
                }
            }
        });
        let (device, _device_events) = node(2);
        let got = tokio::time::timeout(
            Duration::from_secs(60),
            device.fetch_with(hub.peer_id(), Some(addr), digest, Want::Blob),
        )
        .await
        .expect("the blob came while the writer was held")
        .unwrap();
        assert_eq!(got, chunk);
        // Only this test lets the writer go: the commit is still queued behind it.
        assert!(!commit.is_finished());
        held.send(()).unwrap();
        commit.await.unwrap().unwrap();
    }
}
