//! Signed status reports: to the broker (retained, so the hub sees the latest after a
//! restart) while it is reachable, otherwise to peers over gossipsub (so they reach the
//! hub through any peer), and always to `status.json` for `device status`.
//!
//! Not both: every gossiped report reaches every device of the fleet (and costs each a
//! signature check), so a fleet of N reporting over gossip does N² work; over the broker
//! it is N.

use crate::config::Config;
use crate::store::{write_atomic, Installed};
use net::{NetClient, Topic};
use proto::announcement::Announcement;
use proto::status::{DeviceState, OnDemandCounts, StatusReport, MAX_CONSOLE_TAIL};
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
    fleet: String,
    device: String,
    channel: String,
    key: SecretKey,
    net: NetClient,
    mqtt: Option<crate::mqtt::Mqtt>,
    seq: AtomicU64,
    last_progress: Mutex<Option<Instant>>,
    pub from_peers: Arc<AtomicU64>,
    pub from_hub: Arc<AtomicU64>,
    status_file: PathBuf,
    latest: Mutex<BTreeMap<String, StatusReport>>,
    /// The generation of `status.json` last written: writes happen on blocking threads
    /// (an fsync must not hold the agent's tasks), so an older snapshot that arrives late
    /// is skipped rather than written over a newer one.
    written: Arc<std::sync::Mutex<u64>>,
    generation: AtomicU64,
    /// On-demand pools' counts, by app; part of every report of that app.
    ondemand: std::sync::Mutex<BTreeMap<String, OnDemandCounts>>,
}

impl Reporter {
    /// Byte counters are shared with `metrics`.
    pub fn new(
        cfg: &Config,
        key: SecretKey,
        net: NetClient,
        mqtt: Option<crate::mqtt::Mqtt>,
        metrics: &crate::metrics::DeviceMetrics,
    ) -> Reporter {
        let start_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Reporter {
            fleet: cfg.fleet.clone(),
            device: cfg.name.clone(),
            channel: cfg.channel.clone(),
            key,
            net,
            mqtt,
            // Milliseconds at start, then +1 per report: grows across restarts too.
            seq: AtomicU64::new(start_ms),
            last_progress: Mutex::new(None),
            from_peers: metrics.bytes_from_peers.clone(),
            from_hub: metrics.bytes_from_hub.clone(),
            status_file: cfg.state_dir.join("status.json"),
            latest: Mutex::new(BTreeMap::new()),
            written: Arc::new(std::sync::Mutex::new(0)),
            generation: AtomicU64::new(0),
            ondemand: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    async fn send(&self, r: StatusReport, again: bool) {
        if again {
            tracing::debug!(app = %r.app, release = ?r.release, state = r.state.label(), "status (again)");
        } else {
            tracing::info!(app = %r.app, release = ?r.release, state = r.state.label(), "status");
        }
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
            let topic = crate::mqtt::status_topic(&self.fleet, &self.device);
            // Queue full: this report is dropped, not gossiped — the broker is up, the
            // next report (or the resend within REPORT_AGAIN) gets through, and a busy
            // fleet falling back to gossip had every device check every report.
            if let Err(e) = m.client.try_publish(topic, QoS::AtLeastOnce, true, bytes) {
                tracing::debug!("status not queued for MQTT (sent again later): {e}");
            }
        } else {
            let _ = self.net.publish(Topic::Status, bytes).await;
        }
        let (generation, json) = {
            let mut latest = self.latest.lock().await;
            latest.insert(r.app.clone(), r);
            let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
            (generation, serde_json::to_vec_pretty(&*latest))
        };
        let Ok(json) = json else { return };
        let (path, written) = (self.status_file.clone(), self.written.clone());
        let wrote = tokio::task::spawn_blocking(move || {
            let mut last = written.lock().unwrap_or_else(|p| p.into_inner());
            if *last > generation {
                return Ok(());
            }
            *last = generation;
            write_atomic(&path, &json)
        })
        .await;
        if let Ok(Err(e)) = wrote {
            tracing::warn!("writing {}: {e:#}", self.status_file.display());
        }
    }

    /// Sends the latest report of every app again (fresh sequence number and counters), so
    /// a hub that was down — with its embedded broker and its retained messages — catches
    /// up without waiting for the next state change.
    pub async fn resend_latest(&self) {
        let latest: Vec<StatusReport> = self.latest.lock().await.values().cloned().collect();
        for mut r in latest {
            self.refresh(&mut r);
            self.send(r, true).await;
        }
    }

    /// A report sent again: fresh sequence number, time and counters; same state.
    fn refresh(&self, r: &mut StatusReport) {
        r.seq = self.seq.fetch_add(1, Ordering::Relaxed);
        r.at = crate::agent::now();
        r.bytes_from_peers = self.from_peers.load(Ordering::Relaxed);
        r.bytes_from_hub = self.from_hub.load(Ordering::Relaxed);
        r.ondemand = self.ondemand_of(&r.app);
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
        StatusReport {
            fleet: self.fleet.clone(),
            device: self.device.clone(),
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            at: crate::agent::now(),
            app: app.into(),
            channel: self.channel.clone(),
            release: None,
            version: None,
            manifest: None,
            state,
            bytes_from_peers: self.from_peers.load(Ordering::Relaxed),
            bytes_from_hub: self.from_hub.load(Ordering::Relaxed),
            console_tail: tail,
            ondemand: self.ondemand_of(app),
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
        self.send(r, false).await;
    }

    pub async fn report_installed(&self, app: &str, i: &Installed, state: DeviceState) {
        self.report_installed_with_tail(app, i, state, String::new())
            .await;
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
        self.send(r, false).await;
    }

    fn ondemand_of(&self, app: &str) -> Option<OnDemandCounts> {
        let counts = self.ondemand.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(app).copied()
    }

    /// The on-demand pool of `app` scaled or booted: the latest report goes out again with
    /// the new counts (a fresh sequence number, state unchanged).
    pub async fn ondemand_changed(&self, app: &str, counts: OnDemandCounts) {
        {
            let mut all = self.ondemand.lock().unwrap_or_else(|p| p.into_inner());
            all.insert(app.to_string(), counts);
        }
        let latest = self.latest.lock().await.get(app).cloned();
        if let Some(mut r) = latest {
            self.refresh(&mut r);
            self.send(r, true).await;
        }
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
