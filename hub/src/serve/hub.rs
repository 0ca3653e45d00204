//! The hub's event loop: one task routes network events, status reports, control
//! commands and timers, and never waits on the store. Whatever touches the store is a
//! command to one of its owners ([`crate::store_owner`]); the reply comes back as a
//! [`Done`] the loop selects on beside everything else, so a gc or a batch commit holds
//! up neither blob serving nor status reports nor control commands.

use super::accept::{self, Dropped, Judgement};
use super::announce::Announcer;
use super::batch::Pending;
use super::commands::Asked;
use super::mqtt::Received;
use super::trust::{Trust, TrustError};
use crate::blobs::Blobs;
use crate::control::Command;
use crate::home::{now, Home};
use crate::inventory::Inventory;
use crate::metrics::Metrics;
use crate::rollout::{Halt, HoldChange, Monitor, ReleaseKey};
use crate::store_owner::{Devices, HoldRequest, OwnerError, Owners, Releases};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use net::{MessageAcceptance, NetClient, NetEvent, Topic, ANNOUNCE_TOPIC_KINDS};
use proto::announcement::verify_announcement;
use proto::codec::Kind;
use proto::envelope::Envelope;
use proto::revocation::verify_revocations;
use proto::rollout::Holds;
use proto::VerifyError;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

const REANNOUNCE: Duration = Duration::from_secs(5);
/// How often the store is offered to `git gc --auto` (which packs only past its threshold).
const GC_EVERY: Duration = Duration::from_secs(3600);
/// How often what the loop accepted (inventory, reports, events) is written out.
const FLUSH: Duration = Duration::from_secs(1);
/// Parked blob requests are let go within this of their time (tracker::PARK_FOR).
const PARKED: Duration = Duration::from_millis(250);

/// Work done off the loop, come back.
pub(super) enum Done {
    Releases {
        read: Result<Option<Releases>, OwnerError>,
        then: Then,
    },
    Trust {
        loaded: Result<Box<(Trust, Option<Devices>)>, TrustError>,
        then: AfterTrust,
    },
    Devices {
        loaded: Result<Devices, OwnerError>,
        reply: oneshot::Sender<String>,
    },
    Halted {
        release: ReleaseKey,
        written: Result<Holds, OwnerError>,
    },
    Flushed,
    Packed(Result<bool, OwnerError>),
}

/// What follows a look at the releases: each ends in announcing them.
pub(super) enum Then {
    /// The periodic re-announcement.
    Tick,
    /// `announce` from the control socket: answer how many.
    Announce(oneshot::Sender<String>),
    /// `reload-trust` from the control socket: answer the root's version.
    TrustReloaded(oneshot::Sender<String>),
}

/// What follows reloading trust.
pub(super) enum AfterTrust {
    /// A halt changed the hold list: spread it.
    Halt,
    /// `reload-trust`: announce, then answer.
    Command(oneshot::Sender<String>),
}

/// Work under way off the loop, and which kinds run (one at a time each).
#[derive(Default)]
struct Inflight {
    work: FuturesUnordered<BoxFuture<'static, Done>>,
    /// A periodic look at the releases (a tick while one is under way is skipped).
    reading: bool,
    /// A batch being written: one at a time, in order.
    flushing: bool,
    packing: bool,
}

impl Inflight {
    fn push(&mut self, work: impl std::future::Future<Output = Done> + Send + 'static) {
        self.work.push(Box::pin(work));
    }
}

/// What the loop listens to besides its timers.
pub(super) struct Inputs {
    pub mqtt: mpsc::Receiver<Received>,
    pub events: mpsc::Receiver<NetEvent>,
    pub control: mpsc::Receiver<Asked>,
}

pub(super) struct Hub {
    home: Home,
    net: NetClient,
    store: Owners,
    devices: Devices,
    trust: Trust,
    inventory: Inventory,
    /// Accepted, not yet written (see [`Hub::flush`]).
    pending: Pending,
    metrics: Arc<Metrics>,
    blobs: Blobs,
    announcer: Announcer,
    /// Counts failures of releases with a halt policy; says when to halt one.
    monitor: Monitor,
    inflight: Inflight,
    /// The inventory as last written, for the dashboard (which then reads no file).
    published: tokio::sync::watch::Sender<Arc<Inventory>>,
    /// The chunks only the devices a release targets may fetch (`None`: the releases
    /// were not read yet).
    targeted: Option<Arc<proto::targeted::Targeted>>,
    /// The devices the embedded broker admits (enrolled, not revoked).
    enrolled: tokio::sync::watch::Sender<crate::broker::Enrolled>,
}

/// What the hub starts with (see [`Hub::new`]).
pub(super) struct Parts {
    pub home: Home,
    pub net: NetClient,
    pub store: Owners,
    pub devices: Devices,
    pub inventory: Inventory,
    pub published: tokio::sync::watch::Sender<Arc<Inventory>>,
    pub trust: Trust,
    pub metrics: Arc<Metrics>,
    pub blobs: Blobs,
    pub announcer: Announcer,
    pub enrolled: tokio::sync::watch::Sender<crate::broker::Enrolled>,
}

impl Hub {
    pub fn new(p: Parts) -> Hub {
        let mut hub = Hub {
            inventory: p.inventory,
            published: p.published,
            home: p.home,
            net: p.net,
            store: p.store,
            devices: p.devices,
            trust: p.trust,
            pending: Pending::default(),
            metrics: p.metrics,
            blobs: p.blobs,
            announcer: p.announcer,
            monitor: Monitor::default(),
            inflight: Inflight::default(),
            targeted: None,
            enrolled: p.enrolled,
        };
        hub.set_trade();
        hub.count_states();
        hub
    }

    /// Routes events until `shutdown` resolves or the network stops. Cancel-safe in each
    /// branch: every receiver is cancel-safe, and work off the loop stays in `inflight`.
    pub async fn run(&mut self, shutdown: impl std::future::Future<Output = ()>, mut i: Inputs) {
        let mut gc = tokio::time::interval_at(tokio::time::Instant::now() + GC_EVERY, GC_EVERY);
        let mut reannounce = tokio::time::interval(REANNOUNCE);
        let mut flush = tokio::time::interval(FLUSH);
        let mut parked = tokio::time::interval(PARKED);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = reannounce.tick() => self.read_releases(Then::Tick),
                _ = flush.tick() => self.flush(),
                _ = gc.tick() => self.pack(),
                _ = parked.tick() => self.blobs.tick().await,
                Some(done) = self.inflight.work.next() => self.done(done).await,
                Some((command, reply)) = i.control.recv() => self.command(command, reply),
                Some((topic, bytes)) = i.mqtt.recv() => {
                    tracing::debug!(%topic, "status over MQTT");
                    self.status(&bytes);
                }
                ev = i.events.recv() => match ev {
                    Some(ev) => self.net_event(ev).await,
                    None => break,
                },
            }
        }
    }

    fn command(&mut self, command: Command, reply: oneshot::Sender<String>) {
        match command {
            Command::Announce => self.read_releases(Then::Announce(reply)),
            Command::ReloadDevices => {
                let reader = self.store.reader.clone();
                self.inflight.push(async move {
                    let loaded = reader.devices().await;
                    Done::Devices { loaded, reply }
                });
            }
            Command::ReloadTrust => self.reload_trust(AfterTrust::Command(reply)),
        }
    }

    /// Work come back from off the loop.
    async fn done(&mut self, done: Done) {
        match done {
            Done::Releases { read, then } => self.releases_read(read, then).await,
            Done::Trust { loaded, then } => self.trust_loaded(loaded, then).await,
            Done::Devices { loaded, reply } => {
                match loaded {
                    Ok(d) => self.devices = d,
                    Err(e) => tracing::error!("reading enrolled devices: {}", proto::Chain(&e)),
                }
                self.set_trade();
                let _ = reply.send(format!("{} device(s) enrolled", self.devices.len()));
            }
            Done::Halted { release, written } => match written {
                Ok(_) => self.reload_trust(AfterTrust::Halt),
                Err(e) => {
                    tracing::error!(app = %release.app, release = release.release, "halting the rollout: {}", proto::Chain(&e))
                }
            },
            Done::Flushed => self.inflight.flushing = false,
            Done::Packed(packed) => {
                self.inflight.packing = false;
                if let Err(e) = packed {
                    tracing::warn!("packing the store: {}", proto::Chain(&e));
                }
            }
        }
    }

    /// Asks the reader for the newest releases (unless a periodic look is under way and
    /// this is one too); announcing follows in [`Hub::releases_read`].
    fn read_releases(&mut self, then: Then) {
        if matches!(then, Then::Tick) {
            if self.inflight.reading {
                return;
            }
            self.inflight.reading = true;
        }
        let reader = self.store.reader.clone();
        let (seen, root) = (self.announcer.seen(), self.trust.root.clone());
        self.inflight.push(async move {
            let read = reader.releases(seen, root).await;
            Done::Releases { read, then }
        });
    }

    /// Announces what the store holds (read afresh if it changed), then answers.
    async fn releases_read(&mut self, read: Result<Option<Releases>, OwnerError>, then: Then) {
        match read {
            Ok(Some(releases)) => {
                self.watch(releases.policies.clone());
                self.announcer.update(&releases);
                if self.targeted.as_deref() != Some(&releases.targeted) {
                    self.targeted = Some(Arc::new(releases.targeted.clone()));
                    self.set_trade();
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!("reading releases: {}", proto::Chain(&e)),
        }
        let announced = self.announcer.announce(&self.trust).await;
        match then {
            Then::Tick => self.inflight.reading = false,
            Then::Announce(reply) => {
                let _ = reply.send(match announced {
                    Ok(n) => format!("announced {n} release(s)"),
                    Err(e) => e.to_string(),
                });
            }
            Then::TrustReloaded(reply) => {
                let version = self.trust.root.root().version;
                let _ = reply.send(format!("trust root version {version}"));
            }
        }
    }

    /// Watches the newest releases' halt policies; a restarted hub counts what its
    /// inventory already says of them.
    fn watch(&mut self, policies: Vec<(ReleaseKey, proto::rollout::HaltPolicy)>) {
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
            self.halt(halt);
        }
    }

    /// Releases held already (by the operator, or before a restart) get no verdict.
    fn mark_held(&mut self) {
        for h in self.trust.holds.iter().flat_map(|(l, _)| &l.held) {
            self.monitor.held(ReleaseKey {
                app: h.app.clone(),
                channel: h.channel.clone(),
                release: h.release,
            });
        }
    }

    /// Holds a release whose failures crossed its halt policy: a new hold list signed
    /// with the rollout key, committed by the writer; trust is reloaded and the list
    /// spread once it is (see [`Hub::done`]).
    fn halt(&mut self, halt: Halt) {
        let Halt {
            release, reason, ..
        } = halt;
        let Some(key) = self.trust.rollout.clone() else {
            tracing::error!(app = %release.app, release = release.release, "release should be halted ({reason}), but this hub has no rollout key (keys/rollout.key): halt it by hand where the key is");
            return;
        };
        tracing::warn!(app = %release.app, channel = %release.channel, release = release.release, "halting the rollout: {reason}");
        let request = HoldRequest {
            root: self.trust.root.clone(),
            key,
            release: release.clone(),
            change: HoldChange::Hold(proto::rollout::HoldKind::Halted),
            reason,
        };
        let writer = self.store.writer.clone();
        self.inflight.push(async move {
            let written = writer.change_hold(request).await;
            Done::Halted { release, written }
        });
    }

    /// Re-reads what the hub trusts and the enrolled devices (`hub root publish`, `hub
    /// revoke`, a halt changed them).
    fn reload_trust(&mut self, then: AfterTrust) {
        let (home, reader) = (self.home.clone(), self.store.reader.clone());
        self.inflight.push(async move {
            let loaded = match Trust::load(&home, &reader).await {
                Ok(trust) => Ok(Box::new((trust, reader.devices().await.ok()))),
                Err(e) => Err(e),
            };
            Done::Trust { loaded, then }
        });
    }

    async fn trust_loaded(
        &mut self,
        loaded: Result<Box<(Trust, Option<Devices>)>, TrustError>,
        then: AfterTrust,
    ) {
        let (trust, devices) = match loaded {
            Ok(l) => *l,
            Err(e) => {
                // Every cause named (the reply says why).
                let e = proto::Chain(&e);
                match then {
                    AfterTrust::Halt => tracing::error!("reloading trust after a halt: {e}"),
                    AfterTrust::Command(reply) => {
                        let _ = reply.send(format!("reloading trust: {e}"));
                    }
                }
                return;
            }
        };
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
        if let Some(devices) = devices {
            self.devices = devices;
        }
        self.set_trade();
        match then {
            AfterTrust::Halt => self.announcer.spread_records(&self.trust).await,
            AfterTrust::Command(reply) => self.read_releases(Then::TrustReloaded(reply)),
        }
    }

    fn set_trade(&mut self) {
        let targeted = self.targeted.clone();
        let trade = self.trust.trade(&self.home, &self.devices, targeted);
        self.blobs.set_trade(trade);
        let enrolled = self.trust.enrolled(&self.devices);
        self.enrolled.send_if_modified(|now| {
            let changed = **now != *enrolled;
            *now = enrolled;
            changed
        });
    }

    /// Hands what was accepted since the last batch to be written (see
    /// [`super::batch`]), unless the previous batch is still being written (then the
    /// next tick takes both).
    fn flush(&mut self) {
        if self.inflight.flushing {
            return;
        }
        if let Some(batch) = self.pending.take(&self.inventory) {
            self.count_states();
            if let Some(inventory) = batch.inventory() {
                self.published.send_replace(inventory.clone());
            }
            self.inflight.flushing = true;
            let (home, writer) = (self.home.clone(), self.store.writer.clone());
            self.inflight.push(async move {
                batch.write(home, writer).await;
                Done::Flushed
            });
        }
    }

    /// Waits for the batch in flight, then writes the rest (at shutdown). Other work
    /// that comes back meanwhile is dropped: its askers are gone.
    pub async fn flush_all(&mut self) {
        self.flushed().await;
        self.flush();
        self.flushed().await;
    }

    async fn flushed(&mut self) {
        while self.inflight.flushing {
            match self.inflight.work.next().await {
                Some(Done::Flushed) | None => self.inflight.flushing = false,
                Some(_) => {}
            }
        }
    }

    /// Offers the store to `git gc --auto` through the writer.
    fn pack(&mut self) {
        if self.inflight.packing {
            return;
        }
        self.inflight.packing = true;
        let writer = self.store.writer.clone();
        self.inflight
            .push(async move { Done::Packed(writer.gc().await) });
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

    /// A status report from MQTT or gossip (see [`accept::judge`]); whether it is valid.
    fn status(&mut self, bytes: &[u8]) -> bool {
        let trust = &self.trust;
        let judged = accept::judge(
            bytes,
            &self.devices,
            |k| trust.is_revoked(k),
            &self.inventory,
        );
        let report = match judged {
            Judgement::Accept(report) => report,
            Judgement::Seen => return true,
            Judgement::Dropped(dropped) => {
                if dropped.counts() {
                    self.metrics.status_dropped.fetch_add(1, Ordering::Relaxed);
                }
                log_dropped(dropped);
                return false;
            }
        };
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
        let id = accept::entry_id(&report);
        let (entry, event) = accept::record(&report, self.inventory.get(&id), now());
        if let Some(event) = event {
            self.pending.events.event(event);
        }
        self.inventory.insert(id, entry);
        self.pending.inventory = true;
        if let Some(halt) = halt {
            self.halt(halt);
        }
        true
    }

    async fn net_event(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Listening(addr) => self.listening(addr),
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
                let acceptance = if self.status(&data) {
                    MessageAcceptance::Accept
                } else {
                    self.metrics.gossip_rejected.fetch_add(1, Ordering::Relaxed);
                    MessageAcceptance::Reject
                };
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

    /// The network listens on `addr`: written to `HUB/hub.addr` and printed.
    fn listening(&mut self, addr: net::Multiaddr) {
        let full = format!("{addr}/p2p/{}", self.net.peer_id());
        tracing::info!("listening on {full}");
        // Written aside and renamed: whoever waits for the file (scripts, the tests) reads
        // the whole address, never the empty file `fs::write` creates before writing.
        let (path, tmp) = (
            self.home.dir.join("hub.addr"),
            self.home.dir.join("hub.addr.tmp"),
        );
        if std::fs::write(&tmp, &full).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
        if self.home.config.relay {
            self.blobs.set_relay(full.parse().ok());
        }
        #[allow(clippy::print_stdout)]
        {
            println!("hub peer: {full}");
        }
    }

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
}

/// The log line of a report not taken (the trust test waits for the revoked one's).
fn log_dropped(dropped: Dropped) {
    match dropped {
        Dropped::Unverified(e) => tracing::warn!("dropping status report: {e}"),
        Dropped::NotEnrolled => {}
        Dropped::Revoked { device } => {
            tracing::warn!(device = %device, "dropping status report of a revoked device")
        }
        Dropped::AnotherDevicesKey { enrolled, claimed } => {
            tracing::warn!(%enrolled, %claimed, "dropping status report signed by another device's key")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{init, InitArgs};

    /// A hub's loop over a quick-start home, with a libp2p node and an MQTT client that
    /// never connects (nothing here needs a broker).
    async fn hub(dir: &std::path::Path) -> (Hub, mpsc::Receiver<NetEvent>) {
        let args = InitArgs {
            fleet: "home",
            root: None,
            release_key: None,
            timestamp_key: None,
            rollout_key: None,
            mqtt_listen: "127.0.0.1:1883",
            mqtt_tls: false,
            p2p_listen: "/ip4/127.0.0.1/tcp/0",
        };
        init(dir, &args).unwrap();
        let home = Home::open(dir).unwrap();
        let store = crate::store_owner::start(&home).unwrap();
        let trust = Trust::load(&home, &store.reader).await.unwrap();
        let cfg = net::NetConfig::new(net::keypair_from_seed([7; 32]), "home");
        let (net, events) = net::start(cfg, &net::tasks::Tasks::new()).unwrap();
        let opts = rumqttc::MqttOptions::new("test", "127.0.0.1", 1);
        let (mqtt, _never_polled) = rumqttc::AsyncClient::new(opts, 64);
        let metrics = Arc::new(Metrics::default());
        let tasks = net::tasks::Tasks::new();
        let blobs = Blobs::new(
            net.clone(),
            store.reader.clone(),
            metrics.clone(),
            0,
            true,
            tasks,
        );
        let (published, _) = tokio::sync::watch::channel(Arc::new(Inventory::new()));
        let parts = Parts {
            announcer: Announcer::new(net.clone(), mqtt, "home", metrics.clone()),
            home,
            net,
            store,
            devices: Devices::new(),
            inventory: Inventory::new(),
            published,
            trust,
            metrics,
            blobs,
            enrolled: tokio::sync::watch::channel(Default::default()).0,
        };
        (Hub::new(parts), events)
    }

    /// The hourly gc held the store's one mutex for its whole run, and the loop awaited it
    /// (announcing every 5 s, reloading keys), so control commands went unanswered. With
    /// the writer held as gc holds it, the loop answers them; the writer is still held
    /// when they are answered (only this test lets it go).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn control_commands_are_answered_while_the_store_writer_is_held_by_a_gc() {
        let dir = tempfile::tempdir().unwrap();
        let (mut hub, events) = hub(&dir.path().join("hub")).await;
        let held = hub.store.writer.hold().await;
        let (control, control_rx) = mpsc::channel(4);
        let (_mqtt, mqtt_rx) = mpsc::channel(4);
        let inputs = Inputs {
            mqtt: mqtt_rx,
            events,
            control: control_rx,
        };
        let ask = |command| {
            let control = control.clone();
            async move {
                let (reply, answer) = oneshot::channel();
                control.send((command, reply)).await.unwrap();
                tokio::time::timeout(Duration::from_secs(60), answer)
                    .await
                    .expect("answered while the writer was held")
                    .unwrap()
            }
        };
        let asks = async {
            assert_eq!(ask(Command::ReloadDevices).await, "0 device(s) enrolled");
            assert_eq!(ask(Command::Announce).await, "announced 0 release(s)");
            assert_eq!(ask(Command::ReloadTrust).await, "trust root version 1");
        };
        tokio::select! {
            _ = hub.run(std::future::pending(), inputs) => panic!("the loop stopped"),
            _ = asks => {}
        }
        held.send(()).unwrap();
    }
}
