//! The announcer: the newest announcement of every track on MQTT (retained) and gossip,
//! signed afresh at half its freshness; the root, revocation and hold lists beside them.

use super::trust::Trust;
use crate::home::now;
use crate::metrics::Metrics;
use crate::store_owner::{Announced, Releases};
use net::{NetClient, Topic};
use proto::announcement::Track;
use rumqttc::{AsyncClient, QoS};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the root and revocation list are spread again when unchanged.
const RECORDS_AGAIN: Duration = Duration::from_secs(300);

pub(super) struct Announcer {
    net: NetClient,
    mqtt: AsyncClient,
    fleet: String,
    metrics: Arc<Metrics>,
    /// Newest release announced so far, per track.
    announced: BTreeMap<Track, u64>,
    /// The git id of the store's `apps` tree [`Announcer::latest`] was read at: re-read
    /// only when that changes (a publish, a promote), not every re-announcement.
    seen: Option<git2::Oid>,
    /// The newest announcement of every track.
    latest: Vec<Announced>,
    /// When the root, revocation list and hold list were last spread, and their
    /// versions then.
    records_sent: Option<(Instant, (u64, u64, u64))>,
    /// The root's expiry has been logged (once, not every 5 s).
    expiry_said: bool,
}

/// Why nothing was announced: the root has expired (its warning, with the next step).
#[derive(Debug, thiserror::Error)]
#[error("not announcing: {0}")]
pub(super) struct RootExpired(crate::home::RootExpiry);

impl Announcer {
    pub fn new(net: NetClient, mqtt: AsyncClient, fleet: &str, metrics: Arc<Metrics>) -> Self {
        Announcer {
            net,
            mqtt,
            fleet: fleet.to_string(),
            metrics,
            announced: BTreeMap::new(),
            seen: None,
            latest: vec![],
            records_sent: None,
            expiry_said: false,
        }
    }

    /// The `apps` tree the announcements were read at.
    pub fn seen(&self) -> Option<git2::Oid> {
        self.seen
    }

    /// A new look at the store's releases.
    pub fn update(&mut self, releases: &Releases) {
        self.metrics
            .releases
            .store(releases.count, Ordering::Relaxed);
        self.seen = releases.apps;
        self.latest = releases.announcements.clone();
    }

    /// Announces the newest release of every track on MQTT (retained) and gossip, with
    /// the trust records when due; returns how many releases. Under an expired root only
    /// the records are spread (a device may hold the next root and relay it).
    pub async fn announce(&mut self, trust: &Trust) -> Result<usize, RootExpired> {
        let now = now();
        let root = trust.root.root();
        let m = &self.metrics;
        m.root_expires_at.store(root.expires_at, Ordering::Relaxed);
        m.root_expired
            .store(u64::from(trust.expired(now)), Ordering::Relaxed);
        self.spread_records(trust).await;
        let expired = crate::home::RootExpiry::of(root, now).filter(|_| trust.expired(now));
        if let Some(expired) = expired {
            if !std::mem::replace(&mut self.expiry_said, true) {
                tracing::error!("not announcing: {expired}");
            }
            return Err(RootExpired(expired));
        }
        self.expiry_said = false;
        self.refresh(trust, now);
        for (track, release, bytes) in &self.latest {
            let topic = net::mqtt_topics::release(&self.fleet, track);
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
        Ok(self.latest.len())
    }

    /// The root and the revocation and hold lists, on MQTT (retained) and gossip: when
    /// they change and every [`RECORDS_AGAIN`] (a broker that lost its retained messages
    /// learns them again). Not every 5 s like announcements: a k-of-n root is up to
    /// 64 KiB, and the broker forwards each publish to every device.
    pub async fn spread_records(&mut self, trust: &Trust) {
        let versions = trust.versions();
        let due = self
            .records_sent
            .is_none_or(|(at, sent)| sent != versions || at.elapsed() >= RECORDS_AGAIN);
        if !due {
            return;
        }
        for (topic, bytes) in trust.records(&self.fleet) {
            let _ = self
                .mqtt
                .try_publish(topic, QoS::AtLeastOnce, true, bytes.clone());
            let _ = self.net.publish(Topic::Announce, bytes).await;
        }
        self.records_sent = Some((Instant::now(), versions));
    }

    /// Signs again, with the timestamp key, each announcement past half its freshness
    /// (kept in memory: a restarted hub signs the stored ones afresh at once).
    fn refresh(&mut self, trust: &Trust, now: u64) {
        for (track, release, bytes) in &mut self.latest {
            match trust.freshness.refresh(bytes, &trust.timestamp, now) {
                Ok(Some(fresh)) => {
                    tracing::debug!(%track, release, "announcement signed afresh");
                    *bytes = fresh;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(%track, release, "signing the announcement afresh: {}", proto::Chain(&e))
                }
            }
        }
    }
}
