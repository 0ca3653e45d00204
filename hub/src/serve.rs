//! `hub serve`: the long-running hub.
//!
//! One task owns each resource: the libp2p node (in `net`), the MQTT event loop, the git
//! store (behind a mutex, used only on blocking threads), the inventory. The main loop
//! routes events; announcing runs on start, on request from the control socket, and
//! every few seconds so a broker that was down learns the releases when it returns.

use crate::control;
use crate::home::{now, write_atomic, Home};
use crate::inventory::save_inventory;
pub use crate::inventory::{load_devices, load_inventory, DeviceEntry, Inventory};
use crate::store::{release_path, Change, Event, Store};
use crate::trust::{expiry_warnings, Freshness};
use anyhow::{Context, Result};
use net::{MessageAcceptance, NetClient, NetEvent, Topic};
use proto::announcement::{verify_announcement, Track};
use proto::codec::Kind;
use proto::envelope::Envelope;
use proto::keys::{KeyId, PublicKey};
use proto::revocation::{verify_revocations, Revocations};
use proto::root::TrustedRoot;
use proto::status::{verify_status, StatusReport};
use proto::SecretKey;
use proto::VerifyError;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// (app, channel, release, signed announcement bytes).
type Announced = (Track, u64, Vec<u8>);
/// A look at the store's releases: the `apps` tree it saw, the newest announcements, how
/// many releases, and the halt policies of the newest releases.
type Scan = (
    Option<git2::Oid>,
    Vec<Announced>,
    u64,
    Vec<(crate::rollout::ReleaseKey, proto::rollout::HaltPolicy)>,
);

use net::ANNOUNCE_TOPIC_KINDS;

const REANNOUNCE: Duration = Duration::from_secs(5);
/// How often the root and revocation list are spread again when unchanged.
const RECORDS_AGAIN: Duration = Duration::from_secs(300);
/// How long shutdown waits for the hub's tasks to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often the store is offered to `git gc --auto` (which packs only past its threshold).
const GC_EVERY: Duration = Duration::from_secs(3600);
/// How often what the loop accepted (inventory, reports, events) is written out.
const FLUSH: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Metrics {
    pub announcements: AtomicU64,
    pub blob_bytes_served: AtomicU64,
    pub blobs_served: AtomicU64,
    pub status_accepted: AtomicU64,
    pub status_dropped: AtomicU64,
    pub gossip_rejected: AtomicU64,
    /// Blob requests answered with peers to ask instead.
    pub redirects: AtomicU64,
    /// Blob requests answered "no holder free yet, ask again".
    pub waits: AtomicU64,
    /// Upload slots of devices the tracker has handed out and not had back (gauge).
    pub slots_taken: AtomicU64,
    /// Askers parked until a holder is free (gauge).
    pub parked: AtomicU64,
    /// Devices an asker reported silent, named to nobody for a while (gauge).
    pub suspects: AtomicU64,
    /// Asks saying the device named for a blob did not deliver in time.
    pub missed_reports: AtomicU64,
    /// Holders those reports made suspect (a report too soon, beyond the asker's share
    /// or about a holder suspect already makes none).
    pub holders_suspected: AtomicU64,
    /// Blob requests answered busy (upload saturated).
    pub busy: AtomicU64,
    /// Devices' reports of a chunk stored.
    pub stored_reports: AtomicU64,
    /// When a release newer than any announced before was first announced (Unix ms).
    pub last_new_announcement_ms: AtomicU64,
    /// Releases in the store (gauge, as of the last look at the store's `apps` tree).
    pub releases: AtomicU64,
    /// Devices in the inventory by state (as of the last batch written).
    pub devices_by_state: std::sync::Mutex<BTreeMap<String, u64>>,
}

/// What the hub accepted and has not written yet.
#[derive(Debug, Default)]
struct Pending {
    inventory: bool,
    /// Latest signed report per file (an older one for the same file is superseded).
    reports: HashMap<std::path::PathBuf, Vec<u8>>,
    events: Change,
}

impl Pending {
    /// The batch to write, if anything is pending.
    fn take(&mut self, inventory: &Inventory) -> Option<Batch> {
        if !self.inventory && self.reports.is_empty() && self.events.is_empty() {
            return None;
        }
        let batch = Batch {
            inventory: std::mem::take(&mut self.inventory).then(|| inventory.clone()),
            reports: std::mem::take(&mut self.reports),
            events: std::mem::take(&mut self.events),
        };
        Some(batch)
    }
}

/// One batch of writes, done on a blocking thread.
struct Batch {
    inventory: Option<Inventory>,
    reports: HashMap<std::path::PathBuf, Vec<u8>>,
    events: Change,
}

impl Batch {
    fn write(self, home: &Home, store: &Mutex<Store>) {
        for (path, bytes) in &self.reports {
            if let Err(e) = write_atomic(path, bytes) {
                tracing::error!("keeping report {}: {e:#}", path.display());
            }
        }
        if let Some(inv) = &self.inventory {
            if let Err(e) = save_inventory(home, inv) {
                tracing::error!("saving inventory: {e:#}");
            }
        }
        if !self.events.is_empty() {
            let committed =
                store
                    .lock()
                    .expect("store lock")
                    .commit("device events", &self.events, None);
            if let Err(e) = committed {
                tracing::error!("committing events: {e:#}");
            }
        }
    }
}

struct Hub {
    home: Home,
    store: Arc<Mutex<Store>>,
    net: NetClient,
    mqtt: AsyncClient,
    devices: HashMap<KeyId, (String, PublicKey)>,
    inventory: Inventory,
    /// Accepted, not yet written (see [`Hub::flush`]).
    pending: Pending,
    /// The batch being written, if any: one at a time, in order.
    flushing: Option<tokio::task::JoinHandle<()>>,
    metrics: Arc<Metrics>,
    trust: Trust,
    blobs: crate::blobs::Blobs,
    /// Newest release announced so far, per (app, channel).
    announced: BTreeMap<Track, u64>,
    /// The newest announcement of every (app, channel), and the git id of the store's
    /// `apps` tree they were read at: re-read only when that changes (a publish, a
    /// promote), not every re-announcement.
    announcements: (Option<git2::Oid>, Vec<Announced>),
    /// When the root, revocation list and hold list were last spread, and their
    /// versions then.
    records_sent: Option<(std::time::Instant, (u64, u64, u64))>,
    /// Counts failures of releases with a halt policy; says when to halt one.
    monitor: crate::rollout::Monitor,
}

/// What the hub signs and checks with: its root, its timestamp key, how long announcements
/// stay fresh, the revocation list. Reloaded when `hub root publish` or `hub revoke` ask.
struct Trust {
    root: TrustedRoot,
    timestamp: SecretKey,
    freshness: Freshness,
    revocations: Option<(Revocations, Vec<u8>)>,
    /// The releases held now, and the key that holds more (`None`: this hub cannot).
    holds: Option<(proto::rollout::Holds, Vec<u8>)>,
    rollout: Option<SecretKey>,
}

impl Trust {
    fn load(home: &Home, store: &Store) -> Result<Trust> {
        let root = home.trusted_root()?;
        let revocations = crate::trust::revocations(store, &root)?;
        let holds = crate::rollout::holds(store, &root)?;
        for w in expiry_warnings(
            root.root(),
            Freshness {
                lifetime: home.config.freshness_secs,
            },
            now(),
        ) {
            tracing::warn!("{w}");
        }
        Ok(Trust {
            timestamp: home.timestamp_key()?,
            freshness: Freshness {
                lifetime: home.config.freshness_secs,
            },
            root,
            revocations,
            holds,
            rollout: home.rollout_key()?,
        })
    }

    fn is_revoked(&self, key: &PublicKey) -> bool {
        self.revocations
            .as_ref()
            .is_some_and(|(l, _)| l.is_revoked(key))
    }

    /// The signed records besides announcements that the hub spreads: the newest root and
    /// the revocation list, with their retained MQTT topic names.
    fn records(&self, fleet: &str) -> Vec<(String, Vec<u8>)> {
        let [root_topic, revocations_topic, holds_topic] = net::mqtt_topics::trust(fleet);
        let mut out = vec![(root_topic, self.root.bytes().to_vec())];
        if let Some((_, bytes)) = &self.revocations {
            out.push((revocations_topic, bytes.clone()));
        }
        if let Some((_, bytes)) = &self.holds {
            out.push((holds_topic, bytes.clone()));
        }
        out
    }
}

/// Runs the hub until `shutdown` resolves. Prints its libp2p address on stdout.
pub async fn serve(
    home: Home,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let store = Arc::new(Mutex::new(home.store()?));
    let trust = Trust::load(&home, &store.lock().expect("store lock"))?;
    // Every task below is spawned through this tree; shutdown cancels and waits for it.
    let tasks = net::tasks::Tasks::new();
    let broker_url = match &home.config.broker {
        Some(url) => url.clone(),
        None => {
            crate::broker::start(&home.config.mqtt_listen)?;
            format!("mqtt://{}", home.config.mqtt_listen)
        }
    };
    let (host, port) = net::parse_mqtt_url(&broker_url).map_err(anyhow::Error::msg)?;
    let mut opts = MqttOptions::new(format!("unifleet-hub-{}", home.config.fleet), host, port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(16 * 1024, 16 * 1024);
    let (mqtt, mut eventloop) = AsyncClient::new(opts, 1024);
    let (mqtt_tx, mut mqtt_rx) = mpsc::channel::<(String, Vec<u8>)>(256);
    let status_filter = net::mqtt_topics::all_status(&home.config.fleet);
    let sub = mqtt.clone();
    tasks.spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(200);
                    tracing::info!("connected to MQTT broker");
                    let _ = sub.try_subscribe(status_filter.clone(), QoS::AtLeastOnce);
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let _ = mqtt_tx.try_send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("MQTT broker unreachable ({e}); retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });

    let mut net_cfg =
        net::NetConfig::new(net::keypair_from_seed(home.p2p_seed()?), &home.config.fleet);
    net_cfg.listen = vec![home
        .config
        .p2p_listen
        .parse()
        .context("parsing p2p_listen")?];
    net_cfg.max_inbound_per_peer = 16;
    net_cfg.relay_server = home.config.relay;
    let net_state = net_cfg.state.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut net_stop = stop_rx.clone();
    let (net, mut events, net_task) = net::spawn(net_cfg, async move {
        let _ = net_stop.wait_for(|s| *s).await;
    })?;

    let devices = {
        let s = store.lock().expect("store lock");
        load_devices(&s)?
    };
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = &home.config.metrics {
        crate::metrics::start(addr, metrics.clone(), net_state, &tasks).await?;
    }
    if let Some(addr) = &home.config.http {
        crate::dashboard::start(addr, home.clone(), &tasks).await?;
    }
    let mut blobs = crate::blobs::Blobs::new(
        net.clone(),
        store.clone(),
        metrics.clone(),
        home.config.upload_rate,
        home.config.redirect,
        tasks.clone(),
    );
    blobs.set_trade(trade_policy(&home, &devices, &trust));
    let mut hub = Hub {
        blobs,
        inventory: load_inventory(&home),
        home: home.clone(),
        store,
        net,
        mqtt,
        devices,
        pending: Pending::default(),
        flushing: None,
        metrics,
        trust,
        announced: BTreeMap::new(),
        announcements: (None, vec![]),
        records_sent: None,
        monitor: crate::rollout::Monitor::default(),
    };
    hub.count_states();

    let _ = std::fs::remove_file(home.socket());
    let control = tokio::net::UnixListener::bind(home.socket())
        .with_context(|| format!("binding {}", home.socket().display()))?;
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<(String, tokio::sync::oneshot::Sender<String>)>(16);
    let conns = tasks.clone();
    tasks.spawn(async move {
        net::tasks::accept_loop(
            "control socket",
            &conns,
            || control.accept(),
            |(stream, _)| {
                let tx = ctl_tx.clone();
                conns.spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut line = String::new();
                    let mut reader = tokio::io::BufReader::new(r);
                    if tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
                    if tx.send((line.trim().to_string(), reply_tx)).await.is_ok() {
                        if let Ok(reply) = reply_rx.await {
                            let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
                        }
                    }
                });
            },
        )
        .await
    });

    let mut gc = tokio::time::interval_at(tokio::time::Instant::now() + GC_EVERY, GC_EVERY);
    let mut reannounce = tokio::time::interval(REANNOUNCE);
    let mut flush = tokio::time::interval(FLUSH);
    // Parked blob requests are let go within this of their time (tracker::PARK_FOR).
    let mut parked = tokio::time::interval(Duration::from_millis(250));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = reannounce.tick() => { hub.announce_all().await; }
            _ = flush.tick() => hub.flush(),
            _ = gc.tick() => hub.gc(),
            _ = parked.tick() => hub.blobs.tick().await,
            Some((cmd, reply)) = ctl_rx.recv() => {
                let answer = match cmd.as_str() {
                    control::ANNOUNCE => { let n = hub.announce_all().await; format!("announced {n} release(s)") }
                    control::RELOAD_DEVICES => { hub.reload_devices().await; format!("{} device(s) enrolled", hub.devices.len()) }
                    control::RELOAD_TRUST => match hub.reload_trust().await {
                        Ok(()) => { hub.announce_all().await; format!("trust root version {}", hub.trust.root.root().version) }
                        Err(e) => format!("reloading trust: {e:#}"),
                    },
                    other => format!("unknown command {other:?}"),
                };
                let _ = reply.send(answer);
            }
            Some((topic, bytes)) = mqtt_rx.recv() => {
                tracing::debug!(%topic, "status over MQTT");
                hub.status(&bytes).await;
            }
            ev = events.recv() => match ev {
                Some(ev) => hub.net_event(ev).await,
                None => break,
            },
        }
    }
    // In order: the tasks that use the network and the store stop, what was accepted is
    // written, then the network goes.
    tracing::info!("shutting down");
    let left = tasks.shutdown(SHUTDOWN_GRACE).await;
    if left > 0 {
        tracing::warn!("{left} task(s) still running after {SHUTDOWN_GRACE:?}; leaving them");
    }
    hub.flush_all().await;
    let _ = stop_tx.send(true);
    let _ = net_task.await;
    let _ = std::fs::remove_file(home.socket());
    tracing::info!("stopped");
    Ok(())
}

/// Whom the hub's blob service trades with: never a revoked key, and only enrolled
/// devices unless `serve_unenrolled` (hub.toml).
fn trade_policy(
    home: &Home,
    devices: &HashMap<KeyId, (String, PublicKey)>,
    trust: &Trust,
) -> crate::blobs::Trade {
    let peer_of = |k: &PublicKey| net::peer_id_of(k);
    crate::blobs::Trade {
        refused: trust
            .revocations
            .iter()
            .flat_map(|(l, _)| l.devices.iter().filter_map(|d| peer_of(&d.key)))
            .collect(),
        only: (!home.config.serve_unenrolled).then(|| {
            devices
                .values()
                .filter(|(_, k)| !trust.is_revoked(k))
                .filter_map(|(_, k)| peer_of(k))
                .collect()
        }),
    }
}

impl Hub {
    /// Relaying on the announce topic: what is authentic and fresh, whatever it is for.
    /// Announcements against the root, the root itself as the hub's own or a valid next
    /// link, revocation lists signed by the timestamp role.
    fn judge_gossip(&self, data: &[u8]) -> Result<(), VerifyError> {
        let root = &self.trust.root;
        match Envelope::signed_kind(data, &ANNOUNCE_TOPIC_KINDS)? {
            Kind::Announcement => verify_announcement(data, root, now()).map(|_| ()),
            Kind::Root if data == root.bytes() => Ok(()),
            Kind::Root => root.update(data, now()).map(|_| ()),
            Kind::Holds => proto::rollout::verify_holds(data, root, 0).map(|_| ()),
            _ => verify_revocations(data, root, 0).map(|_| ()),
        }
    }

    /// Announces the newest release of every (app, channel) on MQTT (retained) and gossip.
    async fn announce_all(&mut self) -> usize {
        let store = self.store.clone();
        let seen = self.announcements.0;
        let root = self.trust.root.clone();
        let read = tokio::task::spawn_blocking(move || -> Result<Option<Scan>> {
            let s = store.lock().expect("store lock");
            let apps = s.tree_id("apps")?;
            if apps.is_some() && apps == seen {
                return Ok(None);
            }
            let (newest, count) = s.newest_releases()?;
            let mut out = vec![];
            let mut policies = vec![];
            for (track, release) in newest {
                if let Some(bytes) = s.read(&release_path(&track, release, "announcement"))? {
                    out.push((track.clone(), release, bytes));
                }
                let (app, channel) = (&track.app, &track.channel);
                if let Some((r, _)) =
                    crate::rollout::stored_rollout(&s, &root, app, channel, release)?
                {
                    if let Some(p) = r.halt {
                        policies.push((crate::rollout::ReleaseKey::of(&track, release), p));
                    }
                }
            }
            Ok(Some((apps, out, count, policies)))
        })
        .await;
        match read {
            Ok(Ok(Some((apps, latest, count, policies)))) => {
                self.watch(policies).await;
                self.metrics.releases.store(count, Ordering::Relaxed);
                self.announcements = (apps, latest);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::error!("reading releases: {e:#}"),
            Err(e) => tracing::error!("reading releases: {e}"),
        }
        self.refresh_announcements();
        self.spread_records().await;
        let latest = self.announcements.1.clone();
        for (track, release, bytes) in &latest {
            let topic = net::mqtt_topics::release(&self.home.config.fleet, track);
            if let Err(e) = self
                .mqtt
                .try_publish(topic, QoS::AtLeastOnce, true, bytes.clone())
            {
                tracing::debug!(%track, release, "MQTT announcement not queued ({e}); will retry");
            }
            let _ = self.net.publish(Topic::Announce, bytes.clone()).await;
            self.metrics.announcements.fetch_add(1, Ordering::Relaxed);
            let newest = self.announced.entry(track.clone()).or_default();
            if *release > *newest {
                *newest = *release;
                let ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                self.metrics
                    .last_new_announcement_ms
                    .store(ms, Ordering::Relaxed);
            }
        }
        latest.len()
    }

    /// Watches the newest releases' halt policies; a restarted hub counts what its
    /// inventory already says of them.
    async fn watch(
        &mut self,
        policies: Vec<(crate::rollout::ReleaseKey, proto::rollout::HaltPolicy)>,
    ) {
        let current = policies.iter().map(|(k, _)| k.clone()).collect();
        self.monitor.keep_only(&current);
        let mut new = false;
        for (key, policy) in policies {
            if !self.monitor.is_watched(&key) {
                self.monitor.watch(key, policy);
                new = true;
            }
        }
        if !new {
            return;
        }
        self.mark_held();
        for halt in self.monitor.seed(&self.inventory) {
            self.halt(halt).await;
        }
    }

    /// Releases held already (by the operator, or before a restart) get no verdict.
    fn mark_held(&mut self) {
        for h in self.trust.holds.iter().flat_map(|(l, _)| &l.held) {
            self.monitor.held(crate::rollout::ReleaseKey {
                app: h.app.clone(),
                channel: h.channel.clone(),
                release: h.release,
            });
        }
    }

    /// Holds a release whose failures crossed its halt policy: a new hold list signed
    /// with the rollout key, committed, and spread at once.
    async fn halt(&mut self, halt: crate::rollout::Halt) {
        let crate::rollout::Halt {
            release, reason, ..
        } = halt;
        let Some(key) = self.trust.rollout.clone() else {
            tracing::error!(app = %release.app, release = release.release, "release should be halted ({reason}), but this hub has no rollout key (keys/rollout.key): halt it by hand where the key is");
            return;
        };
        tracing::warn!(app = %release.app, channel = %release.channel, release = release.release, "halting the rollout: {reason}");
        let (store, root) = (self.store.clone(), self.trust.root.clone());
        let r = release.clone();
        let written = tokio::task::spawn_blocking(move || {
            crate::rollout::change_hold(
                &store.lock().expect("store lock"),
                &root,
                &key,
                &r,
                crate::rollout::HoldChange::Hold(proto::rollout::HoldKind::Halted),
                &reason,
            )
        })
        .await;
        match written {
            Ok(Ok(_)) => {
                if let Err(e) = self.reload_trust().await {
                    tracing::error!("reloading trust after a halt: {e:#}");
                }
                self.spread_records().await;
            }
            Ok(Err(e)) => {
                tracing::error!(app = %release.app, release = release.release, "halting the rollout: {e:#}")
            }
            Err(e) => tracing::error!("halting the rollout: {e}"),
        }
    }

    /// The root and the revocation list, on MQTT (retained) and gossip: when they change
    /// and every [`RECORDS_AGAIN`] (a broker that lost its retained messages learns them
    /// again). Not every 5 s like announcements: a k-of-n root is up to 64 KiB, and the
    /// broker forwards each publish to every device.
    async fn spread_records(&mut self) {
        let versions = (
            self.trust.root.root().version,
            self.trust
                .revocations
                .as_ref()
                .map_or(0, |(l, _)| l.version),
            self.trust.holds.as_ref().map_or(0, |(l, _)| l.version),
        );
        let due = self
            .records_sent
            .is_none_or(|(at, sent)| sent != versions || at.elapsed() >= RECORDS_AGAIN);
        if !due {
            return;
        }
        for (topic, bytes) in self.trust.records(&self.home.config.fleet) {
            let _ = self
                .mqtt
                .try_publish(topic, QoS::AtLeastOnce, true, bytes.clone());
            let _ = self.net.publish(Topic::Announce, bytes).await;
        }
        self.records_sent = Some((std::time::Instant::now(), versions));
    }

    /// Signs again, with the timestamp key, each announcement past half its freshness
    /// (kept in memory: a restarted hub signs the stored ones afresh at once).
    fn refresh_announcements(&mut self) {
        let now = now();
        for (track, release, bytes) in &mut self.announcements.1 {
            match self
                .trust
                .freshness
                .refresh(bytes, &self.trust.timestamp, now)
            {
                Ok(Some(fresh)) => {
                    tracing::debug!(%track, release, "announcement signed afresh");
                    *bytes = fresh;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(%track, release, "signing the announcement afresh: {e:#}")
                }
            }
        }
    }

    /// `hub root publish` or `hub revoke` changed what the hub trusts.
    async fn reload_trust(&mut self) -> Result<()> {
        let home = self.home.clone();
        let store = self.store.clone();
        let trust = tokio::task::spawn_blocking(move || {
            Trust::load(&home, &store.lock().expect("store lock"))
        })
        .await??;
        tracing::info!(
            root = trust.root.root().version,
            revoked = trust
                .revocations
                .as_ref()
                .map_or(0, |(l, _)| l.devices.len()),
            "trust reloaded"
        );
        self.trust = trust;
        self.mark_held();
        self.reload_devices().await;
        Ok(())
    }

    /// Writes what was accepted since the last batch — each device's latest report (the
    /// staging gate's evidence), the inventory, events as one git commit — on a blocking
    /// thread, unless the previous batch is still being written (then the next tick takes
    /// both). The loop never waits on the disk: at 1,000 devices, writing and syncing the
    /// inventory for every report held the loop, and with it every blob request, for
    /// seconds at a time.
    fn flush(&mut self) {
        if self.flushing.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        if let Some(batch) = self.pending.take(&self.inventory) {
            self.count_states();
            let home = self.home.clone();
            let store = self.store.clone();
            self.flushing = Some(tokio::task::spawn_blocking(move || {
                batch.write(&home, &store)
            }));
        }
    }

    /// Packs the store's loose objects if git thinks it is time, on a blocking thread.
    fn gc(&self) {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.lock().expect("store lock").gc() {
                tracing::warn!("packing the store: {e:#}");
            }
        });
    }

    /// Devices by state, for the metrics page (which never reads the inventory file).
    fn count_states(&self) {
        let mut by_state = BTreeMap::<String, u64>::new();
        for e in self.inventory.values() {
            *by_state.entry(e.state.clone()).or_default() += 1;
        }
        *self
            .metrics
            .devices_by_state
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = by_state;
    }

    /// Waits for the batch in flight, then writes the rest (at shutdown).
    async fn flush_all(&mut self) {
        if let Some(h) = self.flushing.take() {
            let _ = h.await;
        }
        self.flush();
        if let Some(h) = self.flushing.take() {
            let _ = h.await;
        }
    }

    async fn reload_devices(&mut self) {
        let store = self.store.clone();
        if let Ok(Ok(d)) =
            tokio::task::spawn_blocking(move || load_devices(&store.lock().expect("store lock")))
                .await
        {
            self.devices = d;
        }
        self.blobs
            .set_trade(trade_policy(&self.home, &self.devices, &self.trust));
    }

    /// A status report from MQTT or gossip: accepted only from an enrolled key, for the
    /// device that key is enrolled as, and newer than the last one seen.
    async fn status(&mut self, bytes: &[u8]) -> bool {
        let devices = &self.devices;
        let verified = verify_status(bytes, |id| devices.get(id).map(|(_, k)| *k));
        let (key, report) = match verified {
            Ok(v) => v,
            Err(e) => {
                self.metrics.status_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("dropping status report: {e}");
                return false;
            }
        };
        let Some((name, _)) = self.devices.get(&key.id()) else {
            return false;
        };
        if self.trust.is_revoked(&key) {
            self.metrics.status_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(device = %name, "dropping status report of a revoked device");
            return false;
        }
        if name != &report.device {
            self.metrics.status_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(enrolled = %name, claimed = %report.device, "dropping status report signed by another device's key");
            return false;
        }
        let id = format!("{}/{}", report.device, report.app);
        if self.inventory.get(&id).is_some_and(|e| e.seq >= report.seq) {
            return true; // duplicate or replay of an older report
        }
        self.metrics.status_accepted.fetch_add(1, Ordering::Relaxed);
        // The signed bytes themselves are the staging gate's evidence.
        let path = crate::staging::report_path(&self.home, &report.device, &report.app);
        self.pending.reports.insert(path, bytes.to_vec());
        let halt = self.monitor.report(
            &report.device,
            &report.app,
            &report.channel,
            &report.state,
            report.release,
        );
        self.record(id, report);
        if let Some(halt) = halt {
            self.halt(halt).await;
        }
        true
    }

    fn record(&mut self, id: String, r: StatusReport) {
        let detail = match &r.state {
            proto::status::DeviceState::Downloading { percent } => format!("{percent}%"),
            proto::status::DeviceState::RolledBack {
                failed_release,
                reason,
            } => {
                format!(
                    "release {failed_release} failed: {reason}; console: {}",
                    r.console_tail.trim()
                )
            }
            proto::status::DeviceState::Failed { reason } => reason.clone(),
            proto::status::DeviceState::Waiting { release, until } => format!(
                "release {release} at {} (its rollout wave)",
                crate::trust::human_time(*until)
            ),
            proto::status::DeviceState::Held { release, kind } => {
                format!("release {release} {}", kind.label())
            }
            _ => String::new(),
        };
        let entry = DeviceEntry {
            device: r.device.clone(),
            app: r.app.clone(),
            channel: r.channel.clone(),
            release: r.release,
            version: r.version.clone(),
            manifest: r.manifest,
            state: r.state.label().into(),
            detail: detail.clone(),
            last_seen: now(),
            seq: r.seq,
            bytes_from_peers: r.bytes_from_peers,
            bytes_from_hub: r.bytes_from_hub,
            ondemand: r.ondemand,
            network: r.network,
            tags: r.tags.clone(),
            platform: Some(r.platform),
            failed_release: match r.state {
                proto::status::DeviceState::RolledBack { failed_release, .. } => {
                    Some(failed_release)
                }
                _ => None,
            },
        };
        let changed = self
            .inventory
            .get(&id)
            .is_none_or(|old| old.state != entry.state || old.release != entry.release);
        if changed && !matches!(r.state, proto::status::DeviceState::Downloading { .. }) {
            self.pending.events.event(Event {
                at: now(),
                kind: format!("device-{}", entry.state),
                app: Some(r.app.clone()),
                channel: Some(r.channel.clone()),
                release: r.release,
                device: Some(r.device.clone()),
                detail,
            });
        }
        self.inventory.insert(id, entry);
        self.pending.inventory = true;
    }

    async fn net_event(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Listening(addr) => {
                let full = format!("{addr}/p2p/{}", self.net.peer_id());
                tracing::info!("listening on {full}");
                let _ = std::fs::write(self.home.dir.join("hub.addr"), &full);
                if self.home.config.relay {
                    self.blobs.set_relay(full.parse().ok());
                }
                #[allow(clippy::print_stdout)]
                {
                    println!("hub peer: {full}");
                }
            }
            NetEvent::Gossip {
                topic: Topic::Announce,
                data,
                source,
                id,
                ..
            } => {
                let acceptance = match self.judge_gossip(&data) {
                    Ok(()) => MessageAcceptance::Accept,
                    Err(e @ VerifyError::Expired { .. }) => {
                        tracing::debug!(peer = %source, "not relaying stale gossip: {e}");
                        MessageAcceptance::Ignore
                    }
                    Err(e) => {
                        self.metrics.gossip_rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %source, "rejecting gossip on the announce topic: {e}");
                        MessageAcceptance::Reject
                    }
                };
                self.net.validate(id, source, acceptance).await;
            }
            NetEvent::Gossip {
                topic: Topic::Status,
                data,
                source,
                id,
                ..
            } => {
                let ok = self.status(&data).await;
                let acceptance = if ok {
                    MessageAcceptance::Accept
                } else {
                    MessageAcceptance::Reject
                };
                if !ok {
                    self.metrics.gossip_rejected.fetch_add(1, Ordering::Relaxed);
                }
                self.net.validate(id, source, acceptance).await;
            }
            NetEvent::BlobWanted {
                peer,
                digest,
                want,
                seen,
                reply,
            } => self.blobs.wanted(peer, digest, want, seen, reply).await,
            NetEvent::PeerConnected(p) => tracing::debug!(peer = %p, "peer connected"),
            NetEvent::PeerDisconnected(p) => {
                tracing::debug!(peer = %p, "peer disconnected");
                self.blobs.peer_gone(p);
            }
        }
    }
}
