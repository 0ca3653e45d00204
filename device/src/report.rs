//! Signed status reports: to the broker (retained, so the hub sees the latest after a
//! restart) while it is reachable, otherwise to peers over gossipsub (so they reach the
//! hub through any peer), and always to `status.json` for `device status`.
//!
//! Not both: every gossiped report reaches every device of the fleet (and costs each a
//! signature check), so a fleet of N reporting over gossip does N² work; over the broker
//! it is N.

use crate::config::Config;
use crate::store::{write_atomic, Installed};
use net::{NetClient, Path, Topic};
use proto::announcement::Announcement;
use proto::status::{
    DeviceState, HostedUse, NetworkCounts, OnDemandCounts, StatusReport, MAX_CONSOLE_TAIL,
};
use proto::SecretKey;
use rumqttc::QoS;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

#[derive(Debug)]
pub struct Reporter {
    /// Where the status file's writes run (tracked: shutdown waits for them).
    tasks: net::tasks::Tasks,
    fleet: String,
    device: String,
    channel: String,
    /// `device enroll --tag`s, in every report (releases may target them).
    tags: Vec<String>,
    platform: proto::manifest::Platform,
    key: SecretKey,
    net: NetClient,
    mqtt: Option<crate::mqtt::Mqtt>,
    last_progress: Mutex<Option<Instant>>,
    pub from_peers: Arc<AtomicU64>,
    pub from_hub: Arc<AtomicU64>,
    paths: Arc<crate::metrics::PathBytes>,
    net_state: Arc<net::NetState>,
    status_file: PathBuf,
    /// Held from numbering a report to handing it to the broker or gossip, so reports go
    /// out in the order of their sequence numbers and a resend refreshes the newest state.
    ledger: Mutex<Ledger>,
    /// The generation of `status.json` last written: writes happen on blocking threads
    /// (an fsync must not hold the agent's tasks), so an older snapshot that arrives late
    /// is skipped rather than written over a newer one.
    written: Arc<std::sync::Mutex<u64>>,
    /// On-demand pools' counts and hosted use, by app; part of every report of that app.
    ondemand: std::sync::Mutex<BTreeMap<String, (OnDemandCounts, Option<HostedUse>)>>,
}

/// The newest report of each app, numbered. A resend is made from the report in here at
/// the moment it is numbered, never from a copy taken earlier: a copy taken before a newer
/// state arrived, numbered after it, would put the older state back over the newer one on
/// the hub and in `status.json`.
#[derive(Debug)]
struct Ledger {
    next_seq: u64,
    latest: BTreeMap<String, StatusReport>,
    generation: u64,
}

/// A numbered report and the `status.json` snapshot (with its generation) that holds it.
struct Numbered {
    report: StatusReport,
    generation: u64,
    snapshot: serde_json::Result<Vec<u8>>,
}

impl Ledger {
    fn new(first_seq: u64) -> Ledger {
        Ledger {
            next_seq: first_seq,
            latest: BTreeMap::new(),
            generation: 0,
        }
    }

    /// A new state of `r.app`: numbered and kept as its newest report.
    fn record(&mut self, mut r: StatusReport) -> Numbered {
        r.seq = self.take_seq();
        self.keep(r)
    }

    /// The newest report of `app` again, refreshed by `refresh` (time, counters) and
    /// numbered anew; `None` when `app` has not reported yet.
    fn again(&mut self, app: &str, refresh: impl FnOnce(&mut StatusReport)) -> Option<Numbered> {
        let mut r = self.latest.get(app)?.clone();
        refresh(&mut r);
        r.seq = self.take_seq();
        Some(self.keep(r))
    }

    fn apps(&self) -> Vec<String> {
        self.latest.keys().cloned().collect()
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn keep(&mut self, r: StatusReport) -> Numbered {
        self.latest.insert(r.app.clone(), r.clone());
        self.generation += 1;
        Numbered {
            report: r,
            generation: self.generation,
            snapshot: serde_json::to_vec_pretty(&self.latest),
        }
    }
}

impl Reporter {
    /// Byte counters are shared with `metrics`.
    pub fn new(
        cfg: &Config,
        key: SecretKey,
        net: NetClient,
        mqtt: Option<crate::mqtt::Mqtt>,
        metrics: &crate::metrics::DeviceMetrics,
        tasks: net::tasks::Tasks,
    ) -> Reporter {
        let start_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Reporter {
            tasks,
            fleet: cfg.fleet.clone(),
            device: cfg.name.clone(),
            channel: cfg.channel.clone(),
            tags: cfg.tags.clone(),
            // Checked when the agent starts; a config naming no known platform never
            // gets this far.
            platform: cfg
                .platform()
                .unwrap_or(proto::manifest::Platform::QemuX86_64),
            key,
            net,
            mqtt,
            last_progress: Mutex::new(None),
            from_peers: metrics.bytes_from_peers.clone(),
            from_hub: metrics.bytes_from_hub.clone(),
            paths: metrics.paths.clone(),
            net_state: metrics.net.clone(),
            status_file: cfg.state_dir.join("status.json"),
            // Milliseconds at start, then +1 per report: grows across restarts too.
            ledger: Mutex::new(Ledger::new(start_ms)),
            written: Arc::new(std::sync::Mutex::new(0)),
            ondemand: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// A new state: numbered, sent, written.
    async fn send(&self, r: StatusReport) {
        tracing::info!(app = %r.app, release = ?r.release, state = r.state.label(), "status");
        let mut ledger = self.ledger.lock().await;
        let numbered = ledger.record(r);
        self.publish(&numbered.report).await;
        drop(ledger);
        self.write(numbered).await;
    }

    /// The newest report of `app` again with fresh time and counters; nothing if none yet.
    async fn send_again(&self, app: &str) {
        let mut ledger = self.ledger.lock().await;
        let Some(numbered) = ledger.again(app, |r| self.refresh(r)) else {
            return;
        };
        let r = &numbered.report;
        tracing::debug!(app = %r.app, release = ?r.release, state = r.state.label(), "status (again)");
        self.publish(r).await;
        drop(ledger);
        self.write(numbered).await;
    }

    async fn publish(&self, r: &StatusReport) {
        let bytes = match r
            .seal()
            .map(|mut env| env.sign(&self.key).and_then(|_| env.encode()))
        {
            Ok(Ok(b)) => b,
            Ok(Err(e)) | Err(e) => {
                tracing::error!("encoding status report: {e}");
                return;
            }
        };
        if let Some(m) = self.mqtt.as_ref().filter(|m| m.is_connected()) {
            let topic = net::mqtt_topics::status(&self.fleet, &self.device);
            // Queue full: this report is dropped, not gossiped — the broker is up, the
            // next report (or the resend within REPORT_AGAIN) gets through, and a busy
            // fleet falling back to gossip had every device check every report.
            if let Err(e) = m.client.try_publish(topic, QoS::AtLeastOnce, true, bytes) {
                tracing::debug!("status not queued for MQTT (sent again later): {e}");
            }
        } else {
            let _ = self.net.publish(Topic::Status, bytes).await;
        }
    }

    async fn write(&self, numbered: Numbered) {
        let Ok(json) = numbered.snapshot else { return };
        let (path, written) = (self.status_file.clone(), self.written.clone());
        let generation = numbered.generation;
        let wrote = self
            .tasks
            .spawn_blocking(move || {
                let mut last = written.lock().unwrap_or_else(|p| p.into_inner());
                if *last > generation {
                    return Ok(());
                }
                *last = generation;
                write_atomic(&path, &json)
            })
            .await;
        if let Ok(Err(e)) = wrote {
            tracing::warn!(
                "writing {}: {}",
                self.status_file.display(),
                proto::Chain(&e)
            );
        }
    }

    /// Sends the latest report of every app again (fresh sequence number and counters), so
    /// a hub that was down — with its embedded broker and its retained messages — catches
    /// up without waiting for the next state change.
    pub async fn resend_latest(&self) {
        let apps = self.ledger.lock().await.apps();
        for app in apps {
            self.send_again(&app).await;
        }
    }

    /// A report sent again: fresh time and counters; same state.
    fn refresh(&self, r: &mut StatusReport) {
        r.at = crate::time::now();
        r.bytes_from_peers = self.from_peers.load(Ordering::Relaxed);
        r.bytes_from_hub = self.from_hub.load(Ordering::Relaxed);
        (r.ondemand, r.hosted) = self.ondemand_of(&r.app);
        r.network = Some(self.network());
    }

    fn network(&self) -> NetworkCounts {
        let bytes = |p| self.paths.by(p).load(Ordering::Relaxed);
        NetworkCounts {
            reachability: self.net_state.reachability(),
            bytes_lan: bytes(Path::Lan),
            bytes_direct: bytes(Path::Direct),
            bytes_relayed: bytes(Path::Relayed),
            bytes_hub: bytes(Path::Hub),
            hole_punches: self.net_state.hole_punches.load(Ordering::Relaxed),
            hole_punch_failures: self.net_state.hole_punch_failures.load(Ordering::Relaxed),
        }
    }

    fn base(&self, app: &str, state: DeviceState, console_tail: String) -> StatusReport {
        let mut tail = console_tail;
        if tail.len() > MAX_CONSOLE_TAIL {
            let mut cut = tail.len() - MAX_CONSOLE_TAIL;
            while !tail.is_char_boundary(cut) {
                cut += 1;
            }
            tail = tail[cut..].to_string();
        }
        let (ondemand, hosted) = self.ondemand_of(app);
        StatusReport {
            fleet: self.fleet.clone(),
            device: self.device.clone(),
            tags: self.tags.clone(),
            platform: self.platform,
            // Numbered by the ledger when sent.
            seq: 0,
            at: crate::time::now(),
            app: app.into(),
            channel: self.channel.clone(),
            release: None,
            version: None,
            manifest: None,
            state,
            bytes_from_peers: self.from_peers.load(Ordering::Relaxed),
            bytes_from_hub: self.from_hub.load(Ordering::Relaxed),
            console_tail: tail,
            ondemand,
            network: Some(self.network()),
            guest: None,
            hosted,
        }
    }

    pub async fn report(
        &self,
        app: &str,
        ann: Option<&Announcement>,
        state: DeviceState,
        tail: String,
    ) {
        let mut r = self.base(app, state, tail);
        if let Some(a) = ann {
            r.release = Some(a.release);
            r.version = Some(a.version.to_string());
            r.manifest = Some(a.manifest);
        }
        self.send(r).await;
    }

    pub async fn report_installed(&self, app: &str, i: &Installed, state: DeviceState) {
        self.report_installed_with_tail(app, i, state, String::new())
            .await;
    }

    /// `i` is active; `guest` is its instance's address when it has a network card and
    /// is not served on demand.
    pub async fn report_active(&self, app: &str, i: &Installed, guest: Option<std::net::IpAddr>) {
        let mut r = self.base(app, DeviceState::Active, String::new());
        r.release = Some(i.release);
        r.version = Some(i.version.clone());
        r.manifest = Some(i.manifest);
        r.guest = guest;
        self.send(r).await;
    }

    pub async fn report_installed_with_tail(
        &self,
        app: &str,
        i: &Installed,
        state: DeviceState,
        tail: String,
    ) {
        let mut r = self.base(app, state, tail);
        r.release = Some(i.release);
        r.version = Some(i.version.clone());
        r.manifest = Some(i.manifest);
        self.send(r).await;
    }

    fn ondemand_of(&self, app: &str) -> (Option<OnDemandCounts>, Option<HostedUse>) {
        let counts = self.ondemand.lock().unwrap_or_else(|p| p.into_inner());
        match counts.get(app) {
            Some((c, h)) => (Some(*c), h.clone()),
            None => (None, None),
        }
    }

    /// The on-demand pool of `app`'s counts and hosted use as they are now, for the next
    /// report of it; none is sent for them.
    pub fn ondemand_keep(&self, app: &str, counts: OnDemandCounts, hosted: Option<HostedUse>) {
        let mut all = self.ondemand.lock().unwrap_or_else(|p| p.into_inner());
        all.insert(app.to_string(), (counts, hosted));
    }

    /// The on-demand pool of `app` scaled or booted: the latest report goes out again with
    /// the new counts (a fresh sequence number, state unchanged).
    pub async fn ondemand_changed(
        &self,
        app: &str,
        counts: OnDemandCounts,
        hosted: Option<HostedUse>,
    ) {
        self.ondemand_keep(app, counts, hosted);
        self.send_again(app).await;
    }

    /// Download progress, at most once a second (and always at 100%).
    pub async fn downloading(&self, app: &str, ann: &Announcement, percent: u8) {
        {
            let mut last = self.last_progress.lock().await;
            if percent < 100 && last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.report(
            app,
            Some(ann),
            DeviceState::Downloading { percent },
            String::new(),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(app: &str, release: u64, state: DeviceState) -> StatusReport {
        StatusReport {
            fleet: "f".into(),
            device: "d".into(),
            seq: 0,
            at: 0,
            app: app.into(),
            channel: "stable".into(),
            tags: vec![],
            platform: proto::manifest::Platform::QemuX86_64,
            release: Some(release),
            version: None,
            manifest: None,
            state,
            bytes_from_peers: 0,
            bytes_from_hub: 0,
            console_tail: String::new(),
            ondemand: None,
            network: None,
            guest: None,
            hosted: None,
        }
    }

    /// CI saw `status.json` (and the hub) stay at "installing" after "active": the
    /// on-demand pool's resend had copied the report before "active" was recorded and
    /// numbered it after. A resend is now made from the newest report when it is numbered.
    #[test]
    fn a_resend_never_puts_an_older_state_back_over_a_newer_one() {
        let mut ledger = Ledger::new(100);
        let installing = ledger.record(report("hello", 2, DeviceState::Installing));
        let active = ledger.record(report("hello", 2, DeviceState::Active));
        let counts = OnDemandCounts {
            local: 1,
            ..OnDemandCounts::default()
        };
        let again = ledger
            .again("hello", |r| r.ondemand = Some(counts))
            .expect("hello has reported");
        assert_eq!(again.report.state, DeviceState::Active);
        assert_eq!(again.report.ondemand, Some(counts));
        assert!(installing.report.seq < active.report.seq);
        assert!(active.report.seq < again.report.seq);
        assert!(again.generation > active.generation);
        let snapshot: serde_json::Value =
            serde_json::from_slice(&again.snapshot.expect("snapshot")).expect("json");
        assert_eq!(snapshot["hello"]["state"], "Active");
        assert_eq!(snapshot["hello"]["seq"], again.report.seq);
    }

    #[test]
    fn nothing_is_sent_again_for_an_app_that_never_reported() {
        let mut ledger = Ledger::new(1);
        ledger.record(report("hello", 1, DeviceState::Active));
        assert!(ledger.again("other", |_| {}).is_none());
        assert_eq!(ledger.apps(), vec!["hello".to_string()]);
    }
}
