//! The router: verifies every announcement before it is relayed, re-gossips the newest
//! per app, answers peers' blob requests, and hands our apps' releases to the installer.

use super::inbox::{Heard, Inbox};
use super::{sleep_until, REPORT_AGAIN};

use crate::config::Config;
use crate::metrics::DeviceMetrics;
use crate::report::Reporter;
use crate::store::Store;
use crate::trickle::Trickle;
use crate::trust::{RootNews, Trust};
use net::ratelimit::RateLimiter;
use net::{MessageAcceptance, NetClient, NetEvent, PeerId, Topic, Want};
use proto::announcement::{verify_announcement, Announcement, Track};
use proto::blob::BlobResponse;
use proto::codec::Kind;
use proto::envelope::Envelope;
use proto::manifest::{Expectations, Platform};
use proto::VerifyError;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

use net::ANNOUNCE_TOPIC_KINDS;

/// The newest verified announcement of one (app, channel).
pub(super) struct Latest {
    release: u64,
    issued_at: u64,
    expires_at: u64,
    bytes: Vec<u8>,
}

impl Latest {
    fn of(ann: &Announcement, bytes: Vec<u8>) -> Latest {
        Latest {
            release: ann.release,
            issued_at: ann.issued_at,
            expires_at: ann.expires_at,
            bytes,
        }
    }
}

/// Concurrent blob requests this device serves to all peers together.
pub(super) const MAX_SEEDING: usize = 16;
/// Re-gossip intervals (Trickle, see `trickle.rs`): the shortest is longer than the hub's
/// re-announcement period (5 s), so while the hub is up devices stay quiet.
const REGOSSIP_MIN: Duration = Duration::from_secs(6);
const REGOSSIP_MAX: Duration = Duration::from_secs(120);
pub(super) struct Router {
    pub(super) cfg: Config,
    pub(super) platform: Platform,
    /// Root, revocations, clock; the router is the one that changes them.
    pub(super) trust: Arc<Trust>,
    /// The hub's peer ids (asked for root links a broker told of).
    pub(super) hub: Vec<PeerId>,
    pub(super) store: Arc<Store>,
    pub(super) net: NetClient,
    pub(super) updates: Arc<Inbox>,
    /// Newest verified announcement per track, of every app, channel and platform heard
    /// (relayed and served to peers that ask, installed only if for this device).
    pub(super) latest: HashMap<Track, Latest>,
    /// When to re-gossip the newest announcement per track, and whether others already
    /// did in this interval.
    pub(super) trickles: HashMap<Track, Trickle>,
    /// The broker connection, if one is configured (for whether it is up).
    pub(super) broker: Option<crate::mqtt::Mqtt>,
    /// Signed records peers answered [`Want::Announcement`], [`Want::Root`] and
    /// [`Want::Revocations`] with, and who sent them.
    pub(super) asked: mpsc::Sender<(Vec<u8>, PeerId)>,
    /// Where in each re-gossip interval this device speaks (from its peer id).
    pub(super) phase: f64,
    pub(super) seeding: Arc<Semaphore>,
    pub(super) upload: Arc<RateLimiter>,
    pub(super) metrics: Arc<DeviceMetrics>,
    pub(super) reporter: Arc<Reporter>,
    pub(super) tasks: net::tasks::Tasks,
}

impl Router {
    pub(super) async fn run(
        mut self,
        mut events: mpsc::Receiver<NetEvent>,
        mut mqtt: mpsc::Receiver<(String, Vec<u8>)>,
        mut asked: mpsc::Receiver<(Vec<u8>, PeerId)>,
    ) {
        let mut report_again = tokio::time::interval(REPORT_AGAIN);
        loop {
            tokio::select! {
                _ = report_again.tick() => self.reporter.resend_latest().await,
                ev = events.recv() => match ev {
                    Some(ev) => self.net_event(ev).await,
                    None => break,
                },
                Some((topic, bytes)) = mqtt.recv() => {
                    tracing::debug!(%topic, "signed record from the broker");
                    let _ = self.signed(bytes, None).await;
                }
                Some((bytes, peer)) = asked.recv() => self.asked_announcement(bytes, peer).await,
                _ = sleep_until(self.trickles.values().map(Trickle::fire_at).min()) => {
                    self.regossip().await;
                }
            }
        }
    }

    /// Re-gossips each announcement whose interval is up, unless a peer did already.
    async fn regossip(&mut self) {
        let now = std::time::Instant::now();
        for (key, trickle) in &mut self.trickles {
            if trickle.fire_at() > now {
                continue;
            }
            if !trickle.fire(now) {
                continue;
            }
            if let Some(l) = self
                .latest
                .get(key)
                .filter(|l| self.trust.clock.now() < l.expires_at)
            {
                if let Err(e) = self.net.publish(Topic::Announce, l.bytes.clone()).await {
                    tracing::debug!(release = l.release, "re-gossiping announcement: {e}");
                }
            }
        }
    }

    async fn net_event(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Gossip {
                topic: Topic::Announce,
                data,
                source,
                id,
                ..
            } => {
                tracing::debug!(peer = %source, "signed record from a peer");
                let acceptance = self.signed(data, Some(source)).await.acceptance();
                self.net.validate(id, source, acceptance).await;
            }
            NetEvent::Gossip {
                topic: Topic::Status,
                data,
                source,
                id,
            } => {
                // Other devices' reports are relayed toward the hub; only the hub holds the
                // enrolled keys to verify them. Relay what is well-formed.
                let ok = proto::envelope::Envelope::decode(&data, proto::codec::Kind::StatusReport)
                    .is_ok();
                let acceptance = if ok {
                    MessageAcceptance::Accept
                } else {
                    MessageAcceptance::Reject
                };
                self.net.validate(id, source, acceptance).await;
            }
            NetEvent::BlobWanted {
                peer,
                digest,
                want: Want::Announcement,
                reply,
                ..
            } if !self.trust.is_revoked(&peer) => self.serve_announcement(digest, reply),
            NetEvent::BlobWanted {
                peer,
                digest,
                want,
                reply,
                ..
            } => self.serve_blob(peer, digest, want, reply),
            NetEvent::Listening(addr) => tracing::info!(%addr, "listening"),
            NetEvent::PeerConnected(p) => {
                self.metrics
                    .peers
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(peer = %p, "peer connected");
                self.ask_announcements(p);
            }
            NetEvent::PeerDisconnected(p) => {
                self.metrics
                    .peers
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(peer = %p, "peer disconnected");
            }
        }
    }

    /// A signed record from the broker, gossip or a peer's answer: an announcement, a root
    /// or a revocation list, each through its own entry point.
    async fn signed(&mut self, bytes: Vec<u8>, from: Option<PeerId>) -> Verdict {
        match Envelope::signed_kind(&bytes, &ANNOUNCE_TOPIC_KINDS) {
            Ok(Kind::Root) => self.root_heard(&bytes, from),
            Ok(Kind::Revocations) => self.revocations_heard(&bytes, from),
            Ok(Kind::Holds) => self.holds_heard(&bytes, from),
            Ok(_) => self.announcement(bytes, from),
            Err(e) => self.refused(from, "signed record", &e),
        }
    }

    fn refused(&self, from: Option<PeerId>, what: &str, e: &dyn std::fmt::Display) -> Verdict {
        self.metrics
            .announcements_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(from = ?from, "refusing {what}: {e}");
        Verdict::Refused
    }

    /// *Authentic and fresh?* decides relaying; *for me?* decides installing. An
    /// announcement of the release already known, signed afresh by the hub, replaces the
    /// older bytes (those are what is re-gossiped and served to peers that ask).
    fn announcement(&mut self, bytes: Vec<u8>, from: Option<PeerId>) -> Verdict {
        let now = self.trust.clock.now();
        // The newest announcement again (re-gossip, the hub's re-announcement): these
        // very bytes were verified already; only the clock can have changed since.
        if let Some((key, expires_at)) = self
            .latest
            .iter()
            .find(|(_, l)| l.bytes == bytes)
            .map(|(k, l)| (k.clone(), l.expires_at))
        {
            if now < expires_at {
                if from.is_some() {
                    if let Some(t) = self.trickles.get_mut(&key) {
                        t.heard();
                    }
                }
                return Verdict::Known;
            }
        }
        let ann = match verify_announcement(&bytes, &self.trust.root(), now) {
            Ok(ann) => ann,
            Err(e @ VerifyError::Expired { .. }) => {
                tracing::info!(from = ?from, "neither relaying nor installing a stale announcement: {e}");
                return Verdict::Stale;
            }
            Err(e) => return self.refused(from, "announcement", &e),
        };
        self.trust.clock.saw(ann.issued_at);
        let verified_ms = crate::metrics::unix_ms();
        let key = ann.track();
        let known = self.latest.get(&key).map(|l| (l.release, l.issued_at));
        if from.is_some() && known.is_none_or(|(k, _)| ann.release >= k) {
            if let Some(t) = self.trickles.get_mut(&key) {
                t.heard();
            }
        }
        match known {
            Some((k, _)) if ann.release < k => {
                tracing::warn!(
                    app = %ann.app,
                    "ignoring announcement of release {}: release {k} is already known (replay or stale)",
                    ann.release
                );
                return Verdict::Known;
            }
            Some((k, issued)) if ann.release == k => {
                if ann.issued_at > issued {
                    self.latest.insert(key, Latest::of(&ann, bytes.clone()));
                    // An install waiting to be retried takes the fresher bytes: the older
                    // ones may lapse before it runs.
                    self.hand_over(ann, bytes, verified_ms, from);
                }
                return Verdict::Known;
            }
            _ => {}
        }
        // From the broker, it reaches peers that cannot reach the broker at the next
        // re-gossip, unless a peer gossips it first.
        let t = std::time::Instant::now();
        self.trickles
            .entry(key.clone())
            .or_insert_with(|| Trickle::new(REGOSSIP_MIN, REGOSSIP_MAX, self.phase, t))
            .reset(t);
        self.latest.insert(key, Latest::of(&ann, bytes.clone()));
        self.hand_over(ann, bytes, verified_ms, from);
        Verdict::New
    }

    /// *For me?* An authentic, fresh announcement goes to the updater if it is.
    fn hand_over(&self, ann: Announcement, bytes: Vec<u8>, verified_ms: u64, from: Option<PeerId>) {
        if !self.cfg.apps.contains(&ann.app) {
            return;
        }
        let expect = Expectations {
            app: None,
            channel: &self.cfg.channel,
            platform: self.platform,
            installed_release: None,
        };
        match expect.applies(&ann) {
            Ok(()) => self.updates.put(Heard {
                ann,
                bytes,
                verified_ms,
            }),
            Err(e) => tracing::info!(from = ?from, app = %ann.app, "relaying, not installing: {e}"),
        }
    }

    /// A root: the next one is adopted; one further ahead sends for the links between,
    /// from whoever told us (the hub if it was the broker).
    fn root_heard(&mut self, bytes: &[u8], from: Option<PeerId>) -> Verdict {
        match self.trust.offer_root(bytes) {
            Ok(RootNews::Known) => Verdict::Known,
            Ok(RootNews::Adopted(v)) => {
                tracing::info!(version = v, "adopted trust root version {v}");
                if let Some(peer) = from {
                    self.ask_root(peer);
                }
                Verdict::New
            }
            Ok(RootNews::NeedLinks { from: first, to }) => {
                let Some(peer) = from.or_else(|| self.hub.first().copied()) else {
                    return Verdict::Stale;
                };
                tracing::info!(
                    %peer,
                    "heard of a trust root {} versions ahead; fetching versions {first}..={to}",
                    to + 2 - first
                );
                self.fetch_links(peer, first, to, bytes.to_vec());
                // Not relayed until it verifies through the links.
                Verdict::Stale
            }
            // Our disk, not the sender's fault: not a refusal, and asked again later.
            Err(e @ crate::trust::TrustError::Keep { .. }) => {
                tracing::error!("{}", proto::Chain(&e));
                Verdict::Stale
            }
            Err(e) => self.refused(from, "trust root", &e),
        }
    }

    /// Fetches root links `first..=last` from `peer`, then adopts them and `newest`.
    fn fetch_links(&self, peer: PeerId, first: u64, last: u64, newest: Vec<u8>) {
        let net = self.net.clone();
        let trust = self.trust.clone();
        self.tasks.spawn(async move {
            let mut chain = vec![];
            for v in first..=last {
                match net
                    .fetch_with(peer, None, proto::blob::root_key(v), Want::Root)
                    .await
                {
                    Ok(link) => chain.push(link),
                    Err(e) => {
                        tracing::warn!(%peer, "fetching trust root version {v}: {e}");
                        return;
                    }
                }
            }
            chain.push(newest);
            match trust.adopt_chain(&chain) {
                Ok(v) => tracing::info!(
                    version = v,
                    "adopted trust root version {v} through {} link(s)",
                    chain.len()
                ),
                // Our disk, not the peer's fault.
                Err(e @ crate::trust::TrustError::Keep { .. }) => {
                    tracing::error!("{}", proto::Chain(&e))
                }
                Err(e) => tracing::warn!(%peer, "refusing trust root links: {}", proto::Chain(&e)),
            }
        });
    }

    fn revocations_heard(&mut self, bytes: &[u8], from: Option<PeerId>) -> Verdict {
        let offered = self.trust.offer_revocations(bytes);
        let verdict = self.record_verdict("revocation list", offered, from);
        if verdict == Verdict::New {
            let r = self.trust.revoked();
            let revoked: Vec<&str> = r
                .list
                .iter()
                .flat_map(|l| l.devices.iter().map(|d| d.name.as_str()))
                .collect();
            match revoked.as_slice() {
                [] => tracing::info!(version = r.version(), "revocation list: nobody revoked"),
                names => tracing::warn!(
                    version = r.version(),
                    "revocation list: not trading with {}",
                    names.join(", ")
                ),
            }
            // It also says which tags this device was assigned: a release waiting on
            // that is looked at again.
            self.updates.nudge();
        }
        verdict
    }

    /// What a signed list offered to [`Trust`] (revocations, holds) makes for relaying:
    /// taken (new), already held or older (known), not kept on disk (stale: not relayed
    /// until it is), refused.
    fn record_verdict(
        &self,
        what: &str,
        offered: Result<bool, crate::trust::TrustError>,
        from: Option<PeerId>,
    ) -> Verdict {
        match offered {
            Ok(true) => Verdict::New,
            Ok(false) => Verdict::Known,
            Err(e @ crate::trust::TrustError::Keep { .. }) => {
                tracing::error!("{}", proto::Chain(&e));
                Verdict::Stale
            }
            Err(e) => self.refused(from, what, &e),
        }
    }

    /// A list of held releases: taken if newer; the updater looks again at a release
    /// waiting on it (held, or resumed).
    fn holds_heard(&mut self, bytes: &[u8], from: Option<PeerId>) -> Verdict {
        let offered = self.trust.offer_holds(bytes);
        let verdict = self.record_verdict("hold list", offered, from);
        if verdict == Verdict::New {
            if let Some(h) = self.trust.holds() {
                let held: Vec<String> =
                    h.0.held
                        .iter()
                        .map(|h| format!("{} release {} {}", h.app, h.release, h.kind.label()))
                        .collect();
                let said = if held.is_empty() {
                    "nothing held".to_string()
                } else {
                    held.join(", ")
                };
                tracing::info!(version = h.0.version, "hold list: {said}");
            }
            self.updates.nudge();
        }
        verdict
    }

    /// Asks `peer` for the root after ours (answered, it is adopted and the next asked).
    fn ask_root(&self, peer: PeerId) {
        let next = self.trust.root().root().version + 1;
        self.ask(peer, proto::blob::root_key(next), Want::Root);
    }

    /// One question to a peer; the answer comes back through `asked`.
    fn ask(&self, peer: PeerId, key: proto::Digest, want: Want) {
        let net = self.net.clone();
        let asked = self.asked.clone();
        self.tasks.spawn(async move {
            match net.fetch_with(peer, None, key, want).await {
                Ok(bytes) => {
                    let _ = asked.send((bytes, peer)).await;
                }
                Err(e) => tracing::debug!(%peer, ?want, "asking a peer: {e}"),
            }
        });
    }

    /// A newcomer learns of releases by asking: each peer it connects to is asked for its
    /// newest announcement of each of our apps ([`Want::Announcement`]) that the broker
    /// cannot tell us — all of them while the broker is down, else those we know no
    /// release of yet. With the broker up and the release known (the case during a
    /// release, when devices connect to peer after peer) nothing is asked. (Peers did
    /// push instead, re-gossiping on new connections; throttled to once a minute, a
    /// device back while the hub was down waited up to minutes.)
    fn ask_announcements(&self, peer: PeerId) {
        let broker_up = self
            .broker
            .as_ref()
            .is_some_and(crate::mqtt::Mqtt::is_connected);
        if !broker_up {
            // The broker's retained root and revocation list are out of reach too.
            self.ask_root(peer);
            self.ask(peer, proto::Digest([0; 32]), Want::Revocations);
            self.ask(peer, proto::Digest([0; 32]), Want::Holds);
        }
        for app in &self.cfg.apps {
            let track = Track::new(app, &self.cfg.channel, self.platform);
            if broker_up && self.latest.contains_key(&track) {
                continue;
            }
            self.ask(
                peer,
                proto::blob::announcement_key(&track),
                Want::Announcement,
            );
        }
    }

    /// A peer's answer to [`Router::ask_announcements`]: checked like any announcement.
    async fn asked_announcement(&mut self, bytes: Vec<u8>, peer: PeerId) {
        let kind = Envelope::signed_kind(&bytes, &ANNOUNCE_TOPIC_KINDS).ok();
        if self.signed(bytes, Some(peer)).await == Verdict::New && kind == Some(Kind::Announcement)
        {
            tracing::info!(%peer, "learned of a release by asking a peer");
        }
    }

    /// Answers a [`Want::Announcement`]: our newest announcement of that track.
    fn serve_announcement(&self, key: proto::Digest, reply: net::ReplyId) {
        let response = self
            .latest
            .iter()
            .find(|(track, _)| proto::blob::announcement_key(track) == key)
            .map_or(BlobResponse::NotFound, |(_, l)| {
                BlobResponse::Found(l.bytes.clone())
            });
        let net = self.net.clone();
        self.tasks
            .spawn(async move { net.respond(reply, response).await });
    }

    /// What a request that asks for no stored chunk or manifest is answered (a revoked
    /// asker, a record, a report), or `None`.
    fn record_answer(
        &self,
        peer: PeerId,
        digest: proto::Digest,
        want: Want,
    ) -> Option<BlobResponse> {
        match want {
            _ if self.trust.is_revoked(&peer) => {
                tracing::info!(%peer, "refusing a revoked peer");
                Some(BlobResponse::Refused)
            }
            // A report for a hub; a device keeps no track of who holds what.
            Want::Stored => Some(BlobResponse::NotFound),
            Want::Revocations => Some(
                self.trust
                    .revoked()
                    .bytes
                    .clone()
                    .map_or(BlobResponse::NotFound, BlobResponse::Found),
            ),
            Want::Holds => Some(
                self.trust
                    .holds()
                    .map_or(BlobResponse::NotFound, |h| BlobResponse::Found(h.1.clone())),
            ),
            Want::Root => Some(
                (1..=self.trust.root().root().version)
                    .find(|v| proto::blob::root_key(*v) == digest)
                    .and_then(|v| self.trust.link(v))
                    .map_or(BlobResponse::NotFound, BlobResponse::Found),
            ),
            _ => None,
        }
    }

    fn serve_blob(&self, peer: PeerId, digest: proto::Digest, want: Want, reply: net::ReplyId) {
        let store = self.store.clone();
        let net = self.net.clone();
        let upload = self.upload.clone();
        let metrics = self.metrics.clone();
        if let Some(answer) = self.record_answer(peer, digest, want) {
            self.tasks
                .spawn(async move { net.respond(reply, answer).await });
            return;
        }
        let permit = match self.seeding.clone().try_acquire_owned() {
            Ok(permit) if !upload.saturated() => permit,
            _ => {
                self.tasks
                    .spawn(async move { net.respond(reply, BlobResponse::Busy).await });
                return;
            }
        };
        let tasks = self.tasks.clone();
        let revoked = self.trust.revoked();
        self.tasks.spawn(async move {
            let t = std::time::Instant::now();
            // A chunk only of releases that target other devices is theirs alone.
            let blob = tasks
                .spawn_blocking(move || {
                    let mine = revoked.may_fetch(&peer, &digest, &store.targeted());
                    mine.then(|| store.get_blob(&digest))
                })
                .await
                .unwrap_or(Some(None));
            let response = match blob {
                None => {
                    tracing::info!(%peer, blob = %digest.short(), "refusing a chunk of a release that does not target the asker");
                    BlobResponse::Refused
                }
                Some(None) => BlobResponse::NotFound,
                Some(Some(bytes)) => {
                    upload.acquire(bytes.len() as u64).await;
                    metrics
                        .blobs_served
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    metrics
                        .blob_bytes_served
                        .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(%peer, blob = %digest.short(), len = bytes.len(), ms = t.elapsed().as_millis() as u64, "serving blob");
                    BlobResponse::Found(bytes)
                }
            };
            net.respond(reply, response).await;
            drop(permit);
        });
    }
}

/// What [`Router::announcement`] made of an announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Verified, and newer than any known for its app and channel.
    New,
    /// Verified: the newest known again, an older one, or one not for this device.
    Known,
    /// Authentic perhaps, but not to be relayed: expired, or a root not verified yet.
    Stale,
    /// Failed verification.
    Refused,
}

impl Verdict {
    /// For gossip: relay what is authentic and fresh (whatever it is for), drop what is
    /// stale, penalise what does not verify.
    fn acceptance(self) -> MessageAcceptance {
        match self {
            Verdict::New | Verdict::Known => MessageAcceptance::Accept,
            Verdict::Stale => MessageAcceptance::Ignore,
            Verdict::Refused => MessageAcceptance::Reject,
        }
    }
}
