//! `device run`: the agent.
//!
//! Tasks and what each owns:
//! - the libp2p node (in `net`) owns the Swarm;
//! - the MQTT task owns the broker connection;
//! - the **router** owns the event streams: it verifies every announcement before it is
//!   relayed (gossipsub Accept/Reject), keeps re-gossiping the newest verified one per app
//!   so peers that only see peers still learn of it, serves blobs to peers with bounded
//!   concurrency and the upload limit, and hands announcements for our apps to the updater;
//! - the **updater** owns the device state: fetch, verify, assemble, install, activate,
//!   roll back, report. One release at a time.

use crate::config::Config;
use crate::fetch::Fetcher;
use crate::hypervisor::{Driver, Hypervisor, Launch};
use crate::metrics::DeviceMetrics;
use crate::mqtt;
use crate::report::Reporter;
use crate::store::{AppState, AssembleError, Installed, Store};
use crate::trickle::Trickle;
use crate::trust::{Clock, RootNews, Trust};
use crate::updater::{Action as UpdaterAction, Event as UpdaterEvent, Outcome};
use crate::watchdog::{Verdict as Watched, Watchdog};
use anyhow::{Context, Result};
use net::ratelimit::RateLimiter;
use net::{MessageAcceptance, NetClient, NetEvent, PeerId, Topic, Want};
use proto::announcement::{verify_announcement, Announcement, Track};
use proto::blob::BlobResponse;
use proto::codec::Kind;
use proto::envelope::Envelope;
use proto::manifest::{verify_manifest, Expectations, Platform, VerifiedManifest};
use proto::root::TrustedRoot;
use proto::status::DeviceState;
use proto::{SecretKey, VerifyError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

use net::ANNOUNCE_TOPIC_KINDS;

/// The newest verified announcement of one (app, channel).
struct Latest {
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
const MAX_SEEDING: usize = 16;
/// Re-gossip intervals (Trickle, see `trickle.rs`): the shortest is longer than the hub's
/// re-announcement period (5 s), so while the hub is up devices stay quiet.
const REGOSSIP_MIN: Duration = Duration::from_secs(6);
const REGOSSIP_MAX: Duration = Duration::from_secs(120);
/// How long shutdown waits for the agent's tasks: an activation in progress finishes
/// (its probe has a timeout of its own).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How often the updater checks that each app's healthy domain still runs.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// How often the latest status reports are sent again (heartbeat, and catch-up for a hub
/// that was down).
const REPORT_AGAIN: Duration = Duration::from_secs(10);

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Loads the device key (refusing one readable by others).
pub fn load_key(path: &std::path::Path) -> Result<SecretKey> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading device key {}", path.display()))?;
    anyhow::ensure!(
        meta.permissions().mode() & 0o077 == 0,
        "device key {} is readable by others; chmod 600 it",
        path.display()
    );
    let text = std::fs::read_to_string(path)?;
    SecretKey::from_text(&text).with_context(|| format!("reading device key {}", path.display()))
}

/// The trust root: the newest one the device accepted (state dir), else the configured one.
fn load_root(cfg: &Config, store: &Store) -> Result<TrustedRoot> {
    let saved = store.dir().join("root.bin");
    let path = if saved.exists() {
        saved
    } else {
        cfg.root.clone()
    };
    let bytes =
        std::fs::read(&path).with_context(|| format!("reading trust root {}", path.display()))?;
    // A stored root may have expired while the device was off; it is still the anchor,
    // and verification against it refuses releases until a fresh root arrives.
    let not_a_root = || {
        format!(
            "{} is not a trust root (replace it with the fleet's root.bin from the hub)",
            path.display()
        )
    };
    let env = proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Root)
        .with_context(not_a_root)?;
    let claimed: proto::root::Root =
        proto::codec::decode(proto::codec::Kind::Root, &env.payload).with_context(not_a_root)?;
    let root = TrustedRoot::bootstrap(&bytes, now().min(claimed.expires_at.saturating_sub(1)))
        .with_context(|| format!("trust root {}", path.display()))?;
    anyhow::ensure!(
        root.fleet() == cfg.fleet,
        "trust root is for fleet {:?}, config says {:?}",
        root.fleet(),
        cfg.fleet
    );
    Ok(root)
}

pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    run_with_metrics(cfg, Arc::new(DeviceMetrics::default()), shutdown).await
}

/// [`run`], keeping its metrics in `metrics` (the fleet benchmark runs many agents in one
/// process and reads them directly).
pub async fn run_with_metrics(
    cfg: Config,
    metrics: Arc<DeviceMetrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let key = load_key(&cfg.key)?;
    let seed = proto::rollout::seed(&key.public());
    // Every task of the agent is spawned through this tree; shutdown cancels and waits.
    let tasks = net::tasks::Tasks::new();
    let store = Arc::new(Store::open(&cfg.state_dir)?);
    let trust = Arc::new(Trust::new(
        store.dir(),
        load_root(&cfg, &store)?,
        Clock::open(store.dir(), crate::trust::system_now),
    ));
    let platform = cfg.platform().map_err(anyhow::Error::msg)?;

    // The libp2p identity derives from the device key, so a device keeps its peer id.
    let mut net_cfg = net::NetConfig::new(net::keypair_from_seed(key.seed()), &cfg.fleet);
    net_cfg.listen = vec![cfg.listen.parse().context("parsing listen address")?];
    net_cfg.idle_timeout = Duration::from_secs(cfg.idle_timeout_secs);
    let mut hub_peers = Vec::new();
    for (p, is_hub) in cfg
        .hub
        .iter()
        .map(|h| (h, true))
        .chain(cfg.peers.iter().map(|p| (p, false)))
    {
        let addr: net::Multiaddr = p
            .parse()
            .with_context(|| format!("parsing peer address {p}"))?;
        if is_hub {
            hub_peers.push(
                net::peer_of(&addr)
                    .with_context(|| format!("hub address {p} lacks /p2p/<peer id>"))?,
            );
        }
        net_cfg.bootstrap.push(addr);
    }
    net_cfg.mdns = cfg.mdns;
    net_cfg.state = metrics.net.clone();
    // The network on a tree of its own, stopped last: the application's tasks answer
    // peers and the hub until they are done.
    let net_tasks = net::tasks::Tasks::new();
    let (net, events) = net::start(net_cfg, &net_tasks)?;
    tracing::info!(peer_id = %net.peer_id(), device = %cfg.name, "device agent starting");

    let (mqtt_tx, mqtt_rx) = mpsc::channel(64);
    let mqtt_client = match &cfg.broker {
        Some(url) => {
            let topics = cfg
                .apps
                .iter()
                .map(|a| {
                    net::mqtt_topics::release(&cfg.fleet, &Track::new(a, &cfg.channel, platform))
                })
                .chain(net::mqtt_topics::trust(&cfg.fleet))
                .collect();
            Some(mqtt::start(&cfg.name, url, topics, mqtt_tx, &tasks)?)
        }
        None => None,
    };

    let broker = mqtt_client.clone();
    let reporter = Arc::new(Reporter::new(&cfg, key, net.clone(), mqtt_client, &metrics));
    if let Some(addr) = &cfg.metrics {
        let m = metrics.clone();
        net::metrics::serve(addr, Arc::new(move || m.render()), &tasks)
            .await
            .with_context(|| format!("metrics cannot listen on {addr}"))?;
    }
    let inbox = Arc::new(Inbox::default());
    let (asked_tx, asked_rx) = mpsc::channel(16);
    let router = Router {
        asked: asked_tx,
        cfg: cfg.clone(),
        platform,
        trust: trust.clone(),
        hub: hub_peers.clone(),
        store: store.clone(),
        net: net.clone(),
        updates: inbox.clone(),
        latest: HashMap::new(),
        trickles: HashMap::new(),
        broker,
        phase: crate::fetch::stable_hash(&net.peer_id().to_bytes()) as f64 / u64::MAX as f64,
        seeding: Arc::new(Semaphore::new(MAX_SEEDING)),
        upload: Arc::new(RateLimiter::new(cfg.upload_rate)),
        metrics: metrics.clone(),
        reporter: reporter.clone(),
        tasks: tasks.clone(),
    };
    tasks.spawn(router.run(events, mqtt_rx, asked_rx));
    let updater = Updater {
        seed,
        fetcher: Fetcher::new(
            net.clone(),
            store.clone(),
            hub_peers,
            &cfg,
            metrics.clone(),
            trust.clone(),
            tasks.clone(),
        ),
        hypervisor: Hypervisor::libvirt(&cfg.libvirt_uri, &cfg.domain_type, cfg.guest_addresses()?),
        cfg,
        platform,
        trust,
        store,
        reporter,
        metrics,
        ondemand: Default::default(),
        tasks: tasks.clone(),
    };
    // Graceful: it stops between steps of an install, never in the middle of one.
    tasks.spawn_graceful(updater.run(inbox));
    shutdown.await;
    tracing::info!("shutting down");
    let left = tasks.shutdown(SHUTDOWN_GRACE).await;
    if left > 0 {
        tracing::warn!("{left} task(s) still running after {SHUTDOWN_GRACE:?}; leaving them");
    }
    // The network last: the tasks above were still answering peers and the hub.
    net_tasks.shutdown(SHUTDOWN_GRACE).await;
    tracing::info!("stopped");
    Ok(())
}

struct Router {
    cfg: Config,
    platform: Platform,
    /// Root, revocations, clock; the router is the one that changes them.
    trust: Arc<Trust>,
    /// The hub's peer ids (asked for root links a broker told of).
    hub: Vec<PeerId>,
    store: Arc<Store>,
    net: NetClient,
    updates: Arc<Inbox>,
    /// Newest verified announcement per track, of every app, channel and platform heard
    /// (relayed and served to peers that ask, installed only if for this device).
    latest: HashMap<Track, Latest>,
    /// When to re-gossip the newest announcement per track, and whether others already
    /// did in this interval.
    trickles: HashMap<Track, Trickle>,
    /// The broker connection, if one is configured (for whether it is up).
    broker: Option<crate::mqtt::Mqtt>,
    /// Signed records peers answered [`Want::Announcement`], [`Want::Root`] and
    /// [`Want::Revocations`] with, and who sent them.
    asked: mpsc::Sender<(Vec<u8>, PeerId)>,
    /// Where in each re-gossip interval this device speaks (from its peer id).
    phase: f64,
    seeding: Arc<Semaphore>,
    upload: Arc<RateLimiter>,
    metrics: Arc<DeviceMetrics>,
    reporter: Arc<Reporter>,
    tasks: net::tasks::Tasks,
}

impl Router {
    async fn run(
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
                tracing::error!("{e}");
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
                Err(e) => tracing::warn!(%peer, "refusing trust root links: {e}"),
            }
        });
    }

    fn revocations_heard(&mut self, bytes: &[u8], from: Option<PeerId>) -> Verdict {
        let offered = self.trust.offer_revocations(bytes);
        let verdict = self.record_verdict("revocation list", offered, from);
        if verdict == Verdict::New {
            let r = self.trust.revoked();
            tracing::warn!(
                version = r.version(),
                "revocation list: not trading with {}",
                r.list
                    .iter()
                    .flat_map(|l| l.devices.iter().map(|d| d.name.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
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
                tracing::error!("{e}");
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

    fn serve_blob(&self, peer: PeerId, digest: proto::Digest, want: Want, reply: net::ReplyId) {
        let store = self.store.clone();
        let net = self.net.clone();
        let upload = self.upload.clone();
        let metrics = self.metrics.clone();
        let answer = match want {
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
        };
        if let Some(answer) = answer {
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
        self.tasks.spawn(async move {
            let t = std::time::Instant::now();
            let blob = tokio::task::spawn_blocking(move || store.get_blob(&digest))
                .await
                .ok()
                .flatten();
            let response = match blob {
                Some(bytes) => {
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
                None => BlobResponse::NotFound,
            };
            net.respond(reply, response).await;
            drop(permit);
        });
    }
}

/// What [`Router::announcement`] made of an announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
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

/// The router's announcements for the updater: the newest per app, never dropped (a
/// bounded queue that was full lost a release the router had already recorded as known,
/// and nothing announced it again). Bounded by the number of apps.
#[derive(Default)]
struct Inbox {
    newest: std::sync::Mutex<HashMap<String, Heard>>,
    /// The hold list changed: releases waiting on it are looked at again.
    nudged: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

impl Inbox {
    fn put(&self, heard: Heard) {
        let mut newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        let app = heard.ann.app.clone();
        if newest.get(&app).is_none_or(|h| heard.supersedes(h)) {
            newest.insert(app, heard);
        }
        drop(newest);
        self.wake.notify_one();
    }

    fn nudge(&self) {
        self.nudged
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Waits until something was put or a nudge came, then takes everything (and
    /// whether it was nudged).
    async fn take(&self) -> (Vec<Heard>, bool) {
        loop {
            let taken: Vec<Heard> = {
                let mut newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
                newest.drain().map(|(_, h)| h).collect()
            };
            let nudged = self
                .nudged
                .swap(false, std::sync::atomic::Ordering::Relaxed);
            if !taken.is_empty() || nudged {
                return (taken, nudged);
            }
            self.wake.notified().await;
        }
    }
}

/// A release that does not fit the store budget (refused, not retried).
#[derive(Debug, thiserror::Error)]
#[error(
    "release {release} needs {needed_mib} MiB of store with what is kept, above \
     store_budget_mib = {budget_mib} in device.toml; raise it or free the disk"
)]
struct OverBudget {
    release: u64,
    needed_mib: u64,
    budget_mib: u64,
}

/// How often a held release is looked at again without news (a new hold list looks at
/// it at once).
const HELD_RECHECK: Duration = Duration::from_secs(60);

/// A release this device may not start yet.
#[derive(Debug, thiserror::Error)]
enum NotYet {
    #[error("its rollout wave for this device opens at {}", human_unix(*at))]
    Wave { at: u64, until: std::time::Instant },
    #[error("the release is {} ({reason})", kind.label())]
    Held {
        kind: proto::rollout::HoldKind,
        reason: String,
        until: std::time::Instant,
    },
}

impl NotYet {
    fn until(&self) -> std::time::Instant {
        match self {
            NotYet::Wave { until, .. } | NotYet::Held { until, .. } => *until,
        }
    }
}

fn human_unix(at: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(at)).to_string()
}

/// The agent is shutting down: a download step was left unfinished on purpose.
#[derive(Debug, thiserror::Error)]
#[error("shutting down")]
struct ShuttingDown;

/// A new release of one of our apps, as the router verified it.
struct Heard {
    ann: Announcement,
    bytes: Vec<u8>,
    /// When the router verified it (Unix ms): when the device learned of the release.
    verified_ms: u64,
}

impl Heard {
    /// A newer release, or the same one signed afresh (the hub re-signs announcements
    /// before they lapse).
    fn supersedes(&self, other: &Heard) -> bool {
        (self.ann.release, self.ann.issued_at) > (other.ann.release, other.ann.issued_at)
    }
}

struct Updater {
    cfg: Config,
    /// This device's place in every rollout (from its key).
    seed: u16,
    platform: Platform,
    trust: Arc<Trust>,
    store: Arc<Store>,
    fetcher: Fetcher,
    hypervisor: Hypervisor,
    reporter: Arc<Reporter>,
    metrics: Arc<DeviceMetrics>,
    /// Running on-demand pools, by app.
    ondemand: tokio::sync::Mutex<HashMap<String, crate::ondemand::PoolHandle>>,
    tasks: net::tasks::Tasks,
}

impl Updater {
    /// The I/O shell of [`crate::updater::Updater`]: announcements and outcomes in,
    /// installs out, one at a time.
    async fn run(self, inbox: Arc<Inbox>) {
        if let Err(e) = self.resume().await {
            tracing::error!("resuming after start: {e:#}");
        }
        let mut machine = crate::updater::Updater::new();
        let mut dog = Watchdog::new(Duration::from_secs(self.cfg.probe_every_secs.max(1)));
        let mut watch = tokio::time::interval(WATCH_EVERY);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The newest announcement heard per app: what an install action refers to.
        let mut heard: HashMap<String, Heard> = HashMap::new();
        let mut todo = std::collections::VecDeque::new();
        'run: loop {
            while let Some(UpdaterAction::Install { app, release }) = todo.pop_front() {
                if self.tasks.is_cancelled() {
                    break 'run;
                }
                let outcome = match heard.get(&app).filter(|h| h.ann.release == release) {
                    Some(h) => self.attempt(h).await,
                    None => Outcome::Done,
                };
                let now = std::time::Instant::now();
                dog.forget(&app);
                todo.extend(machine.handle(UpdaterEvent::Finished {
                    app: app.clone(),
                    release,
                    outcome,
                    now,
                }));
                if let Some((release, at)) = machine.retry_of(&app) {
                    tracing::info!(%app, release, "trying the update again in {}", human_duration(at - now));
                }
            }
            let wake = machine.wake_at();
            tokio::select! {
                _ = self.tasks.cancelled() => break,
                (taken, nudged) = inbox.take() => {
                    if nudged {
                        todo.extend(machine.handle(UpdaterEvent::Nudged { now: std::time::Instant::now() }));
                    }
                    for h in taken {
                        let (app, release) = (h.ann.app.clone(), h.ann.release);
                        if heard.get(&app).is_none_or(|o| h.supersedes(o)) {
                            heard.insert(app.clone(), h);
                        }
                        todo.extend(machine.handle(UpdaterEvent::Announced {
                            app,
                            release,
                            now: std::time::Instant::now(),
                        }));
                    }
                }
                _ = sleep_until(wake) => {
                    todo.extend(machine.handle(UpdaterEvent::Tick { now: std::time::Instant::now() }));
                }
                _ = watch.tick() => self.watch(&mut dog).await,
            }
        }
    }

    /// One install attempt, its failure cleaned up and reported as it is: the release the
    /// device still runs, and why the update did not happen.
    async fn attempt(&self, heard: &Heard) -> Outcome {
        let ann = &heard.ann;
        let Err(e) = self.update(heard).await else {
            return Outcome::Done;
        };
        let not_yet = e.chain().find_map(|c| c.downcast_ref::<NotYet>()).map(|n| {
            tracing::info!(app = %ann.app, release = ann.release, "not installing yet: {n}");
            let state = match n {
                NotYet::Wave { at, .. } => DeviceState::Waiting {
                    release: ann.release,
                    until: *at,
                },
                NotYet::Held { kind, .. } => DeviceState::Held {
                    release: ann.release,
                    kind: *kind,
                },
            };
            (state, n.until())
        });
        if let Some((state, until)) = not_yet {
            self.report_running(&ann.app, state).await;
            return Outcome::Deferred(until);
        }
        let over_budget = e.chain().any(|c| c.is::<OverBudget>());
        if e.chain().any(|c| c.is::<ShuttingDown>()) {
            tracing::info!(app = %ann.app, release = ann.release, "shutting down: the download is left where it is (verified chunks are kept; it goes on at the next start)");
            return Outcome::Failed;
        }
        let damaged = e
            .chain()
            .any(|c| matches!(c.downcast_ref(), Some(AssembleError::DamagedChunks { .. })));
        let disk_full = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull)
        });
        if disk_full {
            // What the failed release brought is the only space there is to free; the
            // retry fetches it again (or a smaller, newer release takes its place).
            self.collect_garbage();
        }
        tracing::error!(app = %ann.app, release = ann.release, "update failed: {e:#}");
        let state = DeviceState::Failed {
            reason: format!(
                "update to release {} ({}) failed: {e:#}",
                ann.release, ann.version
            ),
        };
        self.report_running(&ann.app, state).await;
        if damaged {
            Outcome::Repairable
        } else if over_budget {
            // It will not fit however often it is tried; a newer release is judged afresh.
            Outcome::Done
        } else {
            Outcome::Failed
        }
    }

    /// Reports `state` beside the release the device runs now (if any).
    async fn report_running(&self, app: &str, state: DeviceState) {
        let running = self
            .store
            .load_state()
            .ok()
            .and_then(|s| s.apps.get(app).and_then(|a| a.current.clone()));
        match &running {
            Some(cur) => self.reporter.report_installed(app, cur, state).await,
            None => self.reporter.report(app, None, state, String::new()).await,
        }
    }

    /// Whether this device may start release `m` now: `Ok(true)` yes, `Ok(false)` never
    /// (another group's release, or no wave reaches this device's seed), `Err(NotYet)`
    /// later (its wave, or a hold on the release). Decided from the signed manifest and
    /// hold list alone, so it holds with the hub down.
    fn admit(&self, m: &proto::manifest::Manifest) -> Result<bool, NotYet> {
        use proto::rollout::Admission;
        let now = self.trust.clock.now();
        let me = proto::rollout::Me {
            name: &self.cfg.name,
            tags: &self.cfg.tags,
            seed: self.seed,
        };
        let in_secs =
            |at: u64| std::time::Instant::now() + Duration::from_secs(at.saturating_sub(now));
        match m.rollout.admission(&me, m.created_at, now) {
            Admission::NotTargeted => {
                tracing::info!(app = %m.app, release = m.release, "not installing: the release targets {} and this device is {} with tags [{}]", m.rollout.target_names().join(", "), self.cfg.name, self.cfg.tags.join(", "));
                return Ok(false);
            }
            Admission::NoWave => {
                tracing::info!(app = %m.app, release = m.release, seed = self.seed, "not installing: no wave of {} reaches this device", m.rollout.waves_text());
                return Ok(false);
            }
            Admission::At(at) => {
                // A hold says more than a wave to come (and lifts only by a new list).
                self.check_hold(m)?;
                return Err(NotYet::Wave {
                    at,
                    until: in_secs(at),
                });
            }
            Admission::Now => {}
        }
        self.check_hold(m)?;
        Ok(true)
    }

    /// Refuses to start a held release (looked at again in a minute, or at the next
    /// hold list).
    fn check_hold(&self, m: &proto::manifest::Manifest) -> Result<(), NotYet> {
        let holds = self.trust.holds();
        match holds
            .as_ref()
            .and_then(|h| h.0.of(&m.app, &m.channel, m.release))
        {
            Some(h) => Err(NotYet::Held {
                kind: h.kind,
                reason: h.reason.clone(),
                until: std::time::Instant::now() + HELD_RECHECK,
            }),
            None => Ok(()),
        }
    }

    /// Refuses a release that would take the store past `store_budget_mib`: its missing
    /// chunks and its slot on top of what is kept, after what no kept release needs went.
    fn check_budget(&self, m: &proto::manifest::Manifest) -> Result<()> {
        const MIB: u64 = 1024 * 1024;
        let budget = self.cfg.store_budget_mib.saturating_mul(MIB);
        if budget == 0 {
            return Ok(());
        }
        let needed = |s: &Store| s.usage() + s.missing_bytes(m) + m.image_size;
        if needed(&self.store) > budget {
            self.collect_garbage();
        }
        let needed = needed(&self.store);
        if needed > budget {
            return Err(OverBudget {
                release: m.release,
                needed_mib: needed.div_ceil(MIB),
                budget_mib: self.cfg.store_budget_mib,
            }
            .into());
        }
        Ok(())
    }

    /// Removes chunks and manifests that no kept release (current, pending, previous of
    /// any app) needs. Only between installs: a download in progress is not yet kept.
    fn collect_garbage(&self) {
        let Ok(state) = self.store.load_state() else {
            return;
        };
        let mut keep = std::collections::BTreeSet::new();
        for st in state.apps.values() {
            for i in [&st.current, &st.pending, &st.previous]
                .into_iter()
                .flatten()
            {
                keep.insert(i.manifest);
                match self.stored_manifest(&i.manifest) {
                    Ok(m) => keep.extend(m.chunks.iter().map(|c| c.digest)),
                    // Without its chunk list nothing can be told unneeded.
                    Err(e) => {
                        tracing::warn!(release = i.release, "not collecting chunks: {e:#}");
                        return;
                    }
                }
            }
        }
        let (files, bytes) = self.store.remove_unneeded(&keep);
        if files > 0 {
            tracing::info!(
                files,
                bytes,
                "removed chunks and manifests no kept release needs"
            );
        }
    }

    /// Starts the on-demand proxy and pool for this release's app if it is configured, or
    /// rolls a running pool over to this release.
    async fn start_ondemand(&self, m: &proto::manifest::Manifest, inst: &Installed) {
        let Some(od) = self.cfg.ondemand.iter().find(|o| o.app == m.app).cloned() else {
            return;
        };
        let image = crate::ondemand::Image {
            manifest: m.clone(),
            slot: inst.slot.clone(),
            domain_type: inst.accel.as_ref().map(|a| a.domain_type.clone()),
        };
        let mut pools = self.ondemand.lock().await;
        if let Some(pool) = pools.get(&m.app) {
            pool.roll_over(image).await;
            return;
        }
        let remote = od
            .remote_uri
            .as_deref()
            .map(|uri| Hypervisor::libvirt(uri, &self.cfg.domain_type, None));
        let app = od.app.clone();
        let ctx = crate::ondemand::PoolContext {
            device: self.cfg.name.clone(),
            state_dir: self.cfg.state_dir.clone(),
            nic: self.cfg.nic().ok(),
            local: self.hypervisor.clone(),
            remote,
            metrics: self.metrics.clone(),
            reporter: self.reporter.clone(),
            tasks: self.tasks.clone(),
        };
        match crate::ondemand::start(ctx, od, image).await {
            Ok(handle) => {
                pools.insert(app, handle);
            }
            Err(e) => tracing::error!("on-demand: {e:#}"),
        }
    }

    /// Served on demand: the pool owns its instances; the updater only boots a new release
    /// once, to prove it healthy before the pool serves it.
    fn is_ondemand(&self, app: &str) -> bool {
        self.cfg.ondemand.iter().any(|o| o.app == app)
    }

    fn domain_name(&self, app: &str, release: u64) -> String {
        format!("uf-{}-{app}-r{release}", self.cfg.name)
    }

    /// How `inst`, a release of `m`, boots on this device.
    fn launch(&self, m: &proto::manifest::Manifest, inst: &Installed) -> Launch {
        let name = self.domain_name(&m.app, m.release);
        Launch {
            console_log: self.store.dir().join(format!("{name}.console.log")),
            name,
            platform: m.platform,
            image: inst.slot.clone(),
            boot: m.boot.clone(),
            nic: m.boot.network.then(|| self.cfg.nic().ok()).flatten(),
            domain_type: inst.accel.as_ref().map(|a| a.domain_type.clone()),
        }
    }

    /// Runs a download step unless the agent shuts down first: a download may be dropped
    /// at any await (chunks are stored whole or not at all), an activation may not, so
    /// only these steps are cut short.
    async fn abandoned_at_shutdown<T>(
        &self,
        step: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::select! {
            r = step => r,
            _ = self.tasks.cancelled() => Err(ShuttingDown.into()),
        }
    }

    /// Between installs: a domain that was healthy and is found stopped — or, probed over
    /// its network interface, stops answering — is restarted, and after
    /// [`crate::watchdog::RESTARTS`] restarts within the watchdog's window the app goes
    /// back to its previous release.
    async fn watch(&self, dog: &mut Watchdog) {
        let Ok(state) = self.store.load_state() else {
            return;
        };
        let now = std::time::Instant::now();
        for (app, st) in &state.apps {
            let Some(cur) = st.current.as_ref() else {
                continue;
            };
            // On-demand apps: the pool owns instances. A release given up on: left alone.
            if self.is_ondemand(app) || st.failed.contains(&cur.release) {
                continue;
            }
            let name = self.domain_name(app, cur.release);
            let (verdict, how) = if self.hypervisor.is_stopped(&name).await {
                (dog.died(app, cur.release, now), "found stopped".to_string())
            } else if dog.probe_due(app, cur.release, now) {
                let Some(why) = self.unanswered(cur).await else {
                    dog.answered(app, cur.release);
                    continue;
                };
                let Some(verdict) = dog.unanswered(app, cur.release, now) else {
                    tracing::warn!(%app, release = cur.release, "health probe unanswered: {why}");
                    continue;
                };
                // Running but serving nothing: stopped, so it boots afresh.
                let _ = self.hypervisor.stop(&name).await;
                let how = format!(
                    "not answering its health probe {} times in a row ({why})",
                    crate::watchdog::MISSES
                );
                (verdict, how)
            } else {
                continue;
            };
            self.revive(app, cur, verdict, &how).await;
        }
    }

    /// What a running release's probe saw when it went unanswered (see
    /// [`crate::probe::rechecks`]); `None` when it answered or cannot be rechecked.
    async fn unanswered(&self, cur: &Installed) -> Option<String> {
        let m = self.stored_manifest(&cur.manifest).ok()?;
        let launch = self.launch(&m, cur);
        if !crate::probe::rechecks(&launch) {
            return None;
        }
        crate::probe::alive(&self.hypervisor, &launch).await.err()
    }

    /// The watchdog's verdict on the current release of `app`, dead because `how`.
    async fn revive(&self, app: &str, cur: &Installed, verdict: Watched, how: &str) {
        let m = match self.stored_manifest(&cur.manifest) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(%app, release = cur.release, "domain {how}; cannot restart it: {e:#}");
                return;
            }
        };
        match verdict {
            Watched::Restart { n } => {
                tracing::warn!(%app, release = cur.release, "domain {how}; restarting it ({n} of {} within {})", crate::watchdog::RESTARTS, human_duration(crate::watchdog::WINDOW));
                let launch = self.launch(&m, cur);
                match self.hypervisor.boot(&launch).await {
                    Ok(_) => {
                        tracing::info!(%app, release = cur.release, "restarted; healthy again")
                    }
                    Err(e) => {
                        tracing::error!(%app, release = cur.release, "restarting: {e}");
                        // Stopped, so the next look counts it as dead again.
                        let _ = self.hypervisor.stop(&launch.name).await;
                    }
                }
            }
            Watched::GiveUp { deaths } => {
                let reason = format!(
                    "release {} stopped {deaths} times within {} after it was healthy (last: {how})",
                    cur.release,
                    human_duration(crate::watchdog::WINDOW)
                );
                if let Err(e) = self.give_up(app, &reason).await {
                    tracing::error!(%app, "{reason}; going back: {e:#}");
                }
            }
        }
    }

    /// The current release of `app` keeps dying: it is marked failed (never installed
    /// again) and the previous release, if there is one, is started and reported.
    async fn give_up(&self, app: &str, reason: &str) -> Result<()> {
        let mut state = self.store.load_state()?;
        let st = state.apps.entry(app.to_string()).or_default();
        let Some(failed) = st.current.clone() else {
            return Ok(());
        };
        st.failed.insert(failed.release);
        self.metrics
            .rollbacks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let reported = DeviceState::RolledBack {
            failed_release: failed.release,
            reason: reason.to_string(),
        };
        let Some(prev) = st.previous.take() else {
            self.store.save_state(&state)?;
            tracing::error!(%app, "{reason}; no earlier release to go back to, leaving it stopped");
            self.reporter
                .report_installed(
                    app,
                    &failed,
                    DeviceState::Failed {
                        reason: format!("{reason}; no earlier release to go back to"),
                    },
                )
                .await;
            return Ok(());
        };
        st.current = Some(prev.clone());
        self.store.save_state(&state)?;
        tracing::error!(%app, release = prev.release, "{reason}; going back to release {}", prev.release);
        let m = self.stored_manifest(&prev.manifest)?;
        self.hypervisor.boot(&self.launch(&m, &prev)).await?;
        self.reporter.report_installed(app, &prev, reported).await;
        Ok(())
    }

    /// After a start: bring up what the state says should run; finish an interrupted install.
    async fn resume(&self) -> Result<()> {
        let state = self.store.load_state()?;
        self.store.prune_slots(&state);
        for (app, st) in &state.apps {
            if let Some(pending) = &st.pending {
                tracing::info!(%app, release = pending.release, "resuming interrupted install");
                let m = self.stored_manifest(&pending.manifest)?;
                self.activate(&m, pending.clone()).await?;
            } else if let Some(cur) = &st.current {
                let m = self.stored_manifest(&cur.manifest)?;
                let launch = self.launch(&m, cur);
                let running = self.hypervisor.is_running(&launch.name).await;
                if self.is_ondemand(app) {
                    // The pool starts instances when connections arrive.
                    if running {
                        self.hypervisor.stop(&launch.name).await?;
                    }
                } else if !running {
                    tracing::info!(%app, release = cur.release, "starting installed release");
                    self.hypervisor.boot(&launch).await?;
                }
                // Serving (an on-demand proxy listening) before reporting Active.
                self.start_ondemand(&m, cur).await;
                self.reporter
                    .report_installed(app, cur, DeviceState::Active)
                    .await;
            }
        }
        Ok(())
    }

    fn stored_manifest(&self, digest: &proto::Digest) -> Result<proto::manifest::Manifest> {
        let bytes = self
            .store
            .get_blob(digest)
            .context("stored manifest missing")?;
        let env = proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Manifest)?;
        self.trust
            .open_stored_manifest(&env)
            .context("stored manifest no longer verifies")
    }

    async fn update(&self, heard: &Heard) -> Result<()> {
        let Heard {
            ann,
            bytes,
            verified_ms,
        } = heard;
        let state = self.store.load_state()?;
        let app_state = state.apps.get(&ann.app).cloned().unwrap_or_default();
        if app_state.failed.contains(&ann.release) {
            tracing::info!(app = %ann.app, release = ann.release, "release failed here before; not retrying");
            return Ok(());
        }
        let installed = app_state
            .highest_seen
            .max(app_state.current.as_ref().map_or(0, |c| c.release));
        let expect = Expectations {
            app: Some(&ann.app),
            channel: &self.cfg.channel,
            platform: self.platform,
            installed_release: Some(installed),
        };
        // Checked again: time has passed (a retry, a backoff) and the root may have moved.
        let (root, now) = (self.trust.root(), self.trust.clock.now());
        let checked =
            verify_announcement(bytes, &root, now).and_then(|a| expect.applies(&a).map(|()| a));
        if let Err(e) = checked {
            if let VerifyError::Expired { .. } = e {
                // Lapsed while it waited (a retry's pause, the hub down): tried again, with
                // the fresh bytes the router hands over once the hub signs them again.
                return Err(e).context(format!(
                    "the announcement of release {} lapsed before it was installed; waiting \
                     for the hub to sign it afresh",
                    ann.release
                ));
            }
            // Most often the release we already run, announced again; at worst a replay.
            if matches!(e, VerifyError::Rollback { offered, installed, .. } if offered == installed)
            {
                tracing::debug!("already installed: {e}");
            } else {
                tracing::warn!(app = %ann.app, "refusing announcement: {e}");
            }
            return Ok(());
        }
        tracing::info!(app = %ann.app, release = ann.release, version = %ann.version, "new release announced");
        self.metrics
            .last_announcement_ms
            .store(*verified_ms, std::sync::atomic::Ordering::Relaxed);
        // The manifest: fetched by digest, then verified like the announcement.
        let banned = crate::fetch::Banned::default();
        let manifest_bytes = self
            .abandoned_at_shutdown(self.fetcher.manifest(&ann.manifest, &banned))
            .await?;
        let verified: VerifiedManifest = verify_manifest(&manifest_bytes, &root, &expect, now)?;
        anyhow::ensure!(
            verified.digest() == ann.manifest && verified.manifest().release == ann.release,
            "manifest does not match its announcement"
        );
        self.check_budget(verified.manifest())?;
        self.store
            .put_manifest(&verified.digest(), &manifest_bytes)?;
        // Peers may fetch it from here now (at 1,000 devices, a manifest from the hub for
        // each was about another copy of a 1 MiB image).
        self.fetcher.report_stored(Some(verified.digest()));
        let m = verified.manifest();
        if !self.admit(m)? {
            // Said once per release, so the hub sees the device (and that it is not
            // part of this rollout) even before it ever installed anything.
            let running = self
                .store
                .load_state()?
                .apps
                .get(&m.app)
                .is_some_and(|a| a.current.is_some());
            let state = if running {
                DeviceState::Active
            } else {
                DeviceState::Idle
            };
            self.report_running(&m.app, state).await;
            return Ok(());
        }
        self.abandoned_at_shutdown(self.fetcher.chunks(m, &self.reporter, ann, &banned))
            .await
            .context("fetching chunks")?;
        self.metrics.last_fetched_ms.store(
            crate::metrics::unix_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.reporter
            .report(&ann.app, Some(ann), DeviceState::Installing, String::new())
            .await;
        let store = self.store.clone();
        let mc = m.clone();
        let slot = tokio::task::spawn_blocking(move || store.assemble(&mc)).await??;
        // Halted while it downloaded: not started (the chunks stay for a resume).
        self.check_hold(m)?;
        crash_point(&self.cfg, "assembled");
        let new = Installed {
            release: m.release,
            version: m.version.to_string(),
            manifest: verified.digest(),
            slot,
            accel: None,
        };
        let mut state = self.store.load_state()?;
        let st = state.apps.entry(m.app.clone()).or_default();
        st.pending = Some(new.clone());
        st.highest_seen = st.highest_seen.max(m.release);
        self.store.save_state(&state)?;
        crash_point(&self.cfg, "installed");
        self.activate(m, new).await
    }

    /// Boots `new`, probes it, and either retires the old release or restores it.
    async fn activate(&self, m: &proto::manifest::Manifest, mut new: Installed) -> Result<()> {
        if self.cfg.domain_type == "auto" && self.hypervisor.driver() == Driver::Qemu {
            let accel = crate::accel::measure(&self.hypervisor, &self.launch(m, &new)).await;
            tracing::info!(app = %m.app, release = m.release, "accelerator {}: {}", accel.domain_type, accel.why);
            new.accel = Some(accel);
        }
        let launch = self.launch(m, &new);
        let outcome = self.hypervisor.boot(&launch).await;
        let mut state = self.store.load_state()?;
        let st: &mut AppState = state.apps.entry(m.app.clone()).or_default();
        let old = st.current.clone();
        match outcome {
            Ok(_) => {
                if let Some(old) = old.as_ref().filter(|o| o.release != new.release) {
                    let name = self.domain_name(&m.app, old.release);
                    if let Err(e) = self.hypervisor.stop(&name).await {
                        tracing::warn!("retiring old domain: {e}");
                    }
                }
                st.previous = old.filter(|o| o.release != new.release);
                st.current = Some(new.clone());
                st.pending = None;
                self.store.save_state(&state)?;
                if self.is_ondemand(&m.app) {
                    tracing::info!(app = %m.app, release = m.release, "healthy; the on-demand pool serves it from now on");
                    if let Err(e) = self.hypervisor.stop(&launch.name).await {
                        tracing::warn!("stopping the health-check instance: {e}");
                    }
                }
                self.store.prune_slots(&state);
                self.collect_garbage();
                self.metrics
                    .activations
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.metrics.last_active_ms.store(
                    crate::metrics::unix_ms(),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tracing::info!(app = %m.app, release = m.release, version = %m.version, "active and healthy");
                self.start_ondemand(m, &new).await;
                self.reporter
                    .report_installed(&m.app, &new, DeviceState::Active)
                    .await;
                Ok(())
            }
            Err(e) => {
                let tail = e.console_tail().to_string();
                self.metrics
                    .rollbacks
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(app = %m.app, release = m.release, "activation failed, rolling back: {e}");
                let _ = self.hypervisor.stop(&launch.name).await;
                st.failed.insert(new.release);
                st.pending = None;
                self.store.save_state(&state)?;
                if let Some(old) = &old {
                    let om = self.stored_manifest(&old.manifest)?;
                    let ol = self.launch(&om, old);
                    if !self.hypervisor.is_running(&ol.name).await {
                        self.hypervisor.boot(&ol).await?;
                    }
                }
                let reported = DeviceState::RolledBack {
                    failed_release: new.release,
                    reason: e.to_string(),
                };
                match &old {
                    Some(old) => {
                        self.reporter
                            .report_installed_with_tail(&m.app, old, reported, tail)
                            .await
                    }
                    None => self.reporter.report(&m.app, None, reported, tail).await,
                }
                Ok(())
            }
        }
    }
}

/// Testing aid (`crash_at` in the config): die abruptly, as a kill -9 would.
pub fn crash_point(cfg: &Config, point: &str) {
    if cfg.crash_at.as_deref() == Some(point) {
        tracing::warn!(point, "crash_at: aborting");
        std::process::abort();
    }
}

/// A pause for people: "5 s", "2 min".
fn human_duration(d: Duration) -> String {
    match d.as_secs() {
        s if s < 120 => format!("{s} s"),
        s => format!("{} min", s / 60),
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heard(app: &str, release: u64) -> Heard {
        let ann = Announcement {
            fleet: "home".into(),
            app: app.into(),
            channel: "stable".into(),
            platform: Platform::QemuX86_64,
            release,
            version: semver::Version::new(1, 0, release),
            manifest: proto::Digest::of(&release.to_le_bytes()),
            issued_at: 0,
            expires_at: u64::MAX,
        };
        Heard {
            ann,
            bytes: vec![],
            verified_ms: 0,
        }
    }

    /// An install waiting for its retry held the announcement it was first handed; signed
    /// afresh by the hub, the same release must replace it, or it lapses unused.
    #[tokio::test]
    async fn a_fresher_announcement_of_the_same_release_replaces_the_older_one() {
        let inbox = Inbox::default();
        let mut old = heard("a", 3);
        old.ann.issued_at = 100;
        let mut fresh = heard("a", 3);
        fresh.ann.issued_at = 200;
        inbox.put(old);
        inbox.put(fresh);
        let mut stale_again = heard("a", 3);
        stale_again.ann.issued_at = 150;
        inbox.put(stale_again);
        let (taken, _) = inbox.take().await;
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].ann.issued_at, 200, "the freshest bytes win");
    }

    /// The router handed releases to the updater through a queue of 16 with `try_send`:
    /// a full queue lost a release the router had already recorded as known, and nothing
    /// announced it to the updater again. The inbox keeps the newest per app, whatever
    /// arrives while the updater is busy.
    #[tokio::test]
    async fn a_busy_updater_never_loses_a_release() {
        let inbox = Inbox::default();
        for release in 1..=100 {
            for app in ["a", "b", "c"] {
                inbox.put(heard(app, release));
            }
        }
        inbox.put(heard("a", 7)); // older than what is waiting: kept out
        let mut taken: Vec<(String, u64)> = inbox
            .take()
            .await
            .0
            .into_iter()
            .map(|h| (h.ann.app, h.ann.release))
            .collect();
        taken.sort();
        assert_eq!(
            taken,
            [("a".into(), 100), ("b".into(), 100), ("c".into(), 100)]
        );
    }
}
