//! The hub's Prometheus metrics (served by `net::metrics`).

use net::metrics::push;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What `hub serve` counts, shared with the blob service and read by the metrics page.
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
    /// Blob requests refused: a release's blob asked for by a device it does not target.
    pub untargeted_refused: AtomicU64,
    /// Devices' reports of a chunk stored.
    pub stored_reports: AtomicU64,
    /// When a release newer than any announced before was first announced (Unix ms).
    pub last_new_announcement_ms: AtomicU64,
    /// Releases in the store (gauge, as of the last look at the store's `apps` tree).
    pub releases: AtomicU64,
    /// Devices in the inventory by state (as of the last batch written).
    pub devices_by_state: std::sync::Mutex<BTreeMap<String, u64>>,
    /// When the hub's trust root expires (Unix s), and whether it has (gauges).
    pub root_expires_at: AtomicU64,
    pub root_expired: AtomicU64,
    /// How long the mirror furthest behind has had something unpushed, s (gauge), and
    /// failed pushes.
    pub mirror_lag_secs: AtomicU64,
    pub mirror_failures: AtomicU64,
    /// The embedded broker's counters (`None`: an external broker).
    pub broker: Option<Arc<crate::broker::BrokerMetrics>>,
}

/// Why the metrics page could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics cannot listen on {addr}")]
pub struct MetricsError {
    addr: String,
    #[source]
    source: std::io::Error,
}

/// Serves the metrics page on `addr` on the hub's cancellation tree.
pub async fn start(
    addr: &str,
    metrics: Arc<Metrics>,
    net: Arc<net::NetState>,
    tasks: &net::tasks::Tasks,
) -> Result<(), MetricsError> {
    net::metrics::serve(addr, Arc::new(move || render(&metrics, &net)), tasks)
        .await
        .map_err(|source| MetricsError {
            addr: addr.into(),
            source,
        })
}

/// The counters and gauges of [`Metrics`] as scraped: (name, type, help, value), in the
/// order scrapes have always listed them.
type Row = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Metrics) -> &AtomicU64,
);
const COUNTERS: [Row; 21] = [
    (
        "unifleet_hub_announcements_total",
        "counter",
        "Announcements sent (MQTT and gossip)",
        |m| &m.announcements,
    ),
    (
        "unifleet_hub_blob_bytes_served_total",
        "counter",
        "Blob bytes served to peers",
        |m| &m.blob_bytes_served,
    ),
    (
        "unifleet_hub_redirects_total",
        "counter",
        "Blob requests answered with peers that have the blob",
        |m| &m.redirects,
    ),
    (
        "unifleet_hub_waits_total",
        "counter",
        "Blob requests answered: no device with the blob is free yet, ask again",
        |m| &m.waits,
    ),
    (
        "unifleet_hub_tracker_slots_taken",
        "gauge",
        "Devices' upload slots the tracker has handed out and not had back",
        |m| &m.slots_taken,
    ),
    (
        "unifleet_hub_tracker_parked",
        "gauge",
        "Blob requests parked until a device with the blob is free",
        |m| &m.parked,
    ),
    (
        "unifleet_hub_tracker_suspects",
        "gauge",
        "Devices reported silent by an asker, named to nobody for a while",
        |m| &m.suspects,
    ),
    (
        "unifleet_hub_missed_reports_total",
        "counter",
        "Asks saying the device named for a blob did not deliver in time",
        |m| &m.missed_reports,
    ),
    (
        "unifleet_hub_holders_suspected_total",
        "counter",
        "Holders made suspect by those reports (too soon, beyond an asker's share, or suspect already: none)",
        |m| &m.holders_suspected,
    ),
    (
        "unifleet_hub_untargeted_refused_total",
        "counter",
        "Blob requests refused because the release does not target the asking device (by name or assigned tag)",
        |m| &m.untargeted_refused,
    ),
    (
        "unifleet_hub_busy_total",
        "counter",
        "Blob requests answered busy (upload saturated)",
        |m| &m.busy,
    ),
    (
        "unifleet_hub_stored_reports_total",
        "counter",
        "Devices' reports of a chunk stored (the tracker's holders)",
        |m| &m.stored_reports,
    ),
    (
        "unifleet_hub_last_new_announcement_timestamp_ms",
        "gauge",
        "When the newest release was first announced (Unix ms)",
        |m| &m.last_new_announcement_ms,
    ),
    (
        "unifleet_hub_blobs_served_total",
        "counter",
        "Blobs served to peers",
        |m| &m.blobs_served,
    ),
    (
        "unifleet_hub_status_accepted_total",
        "counter",
        "Status reports accepted",
        |m| &m.status_accepted,
    ),
    (
        "unifleet_hub_status_dropped_total",
        "counter",
        "Status reports dropped (bad signature, unknown key, garbage)",
        |m| &m.status_dropped,
    ),
    (
        "unifleet_hub_gossip_rejected_total",
        "counter",
        "Gossip messages rejected",
        |m| &m.gossip_rejected,
    ),
    (
        "unifleet_hub_root_expires_at_seconds",
        "gauge",
        "When the hub's trust root expires (Unix s); devices refuse every update after it",
        |m| &m.root_expires_at,
    ),
    (
        "unifleet_hub_root_expired",
        "gauge",
        "1 when the trust root has expired: nothing is announced until `hub root publish`",
        |m| &m.root_expired,
    ),
    (
        "unifleet_hub_mirror_lag_seconds",
        "gauge",
        "How long the mirror furthest behind has had a change not pushed (0: all up to date)",
        |m| &m.mirror_lag_secs,
    ),
    (
        "unifleet_hub_mirror_push_failures_total",
        "counter",
        "Failed pushes to mirrors (retried with backoff)",
        |m| &m.mirror_failures,
    ),
];

fn render(m: &Metrics, net: &net::NetState) -> String {
    let mut out = String::new();
    net::metrics::push_net(&mut out, "unifleet_hub", net);
    for (name, kind, help, value) in COUNTERS {
        push(&mut out, name, kind, help, value(m).load(Ordering::Relaxed));
    }
    // From memory: a scrape never opens the store or reads the inventory from disk.
    push(
        &mut out,
        "unifleet_hub_releases",
        "gauge",
        "Releases in the store",
        m.releases.load(Ordering::Relaxed),
    );
    if let Some(b) = &m.broker {
        push_broker(&mut out, b);
    }
    let by_state = m
        .devices_by_state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    out.push_str(
        "# HELP unifleet_hub_devices Devices by state\n# TYPE unifleet_hub_devices gauge\n",
    );
    for (state, n) in by_state {
        out.push_str(&format!("unifleet_hub_devices{{state=\"{state}\"}} {n}\n"));
    }
    out
}

/// The embedded broker's counters and gauges.
fn push_broker(out: &mut String, b: &crate::broker::BrokerMetrics) {
    let rows: [(&str, &str, &str, &AtomicU64); 6] = [
        ("unifleet_hub_mqtt_refused_total", "counter", "MQTT clients refused at the TLS handshake or CONNECT (no or a wrong certificate, not enrolled, a wrong secret)", &b.refused),
        ("unifleet_hub_mqtt_cut_off_total", "counter", "MQTT clients cut off for flooding or publishing where they may not", &b.cut_off),
        ("unifleet_hub_mqtt_slow_total", "counter", "MQTT clients dropped because they read their messages too slowly", &b.slow),
        ("unifleet_hub_mqtt_retained_full_total", "counter", "Retained MQTT messages not kept: the retained store was full", &b.retained_full),
        ("unifleet_hub_mqtt_sessions", "gauge", "MQTT clients connected to the embedded broker", &b.sessions),
        ("unifleet_hub_mqtt_retained_bytes", "gauge", "Bytes of retained MQTT messages the embedded broker keeps", &b.retained_bytes),
    ];
    for (name, kind, help, value) in rows {
        push(out, name, kind, help, value.load(Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_scraped_once_with_its_value() {
        let m = Metrics::default();
        m.busy.store(7, Ordering::Relaxed);
        m.releases.store(3, Ordering::Relaxed);
        let page = render(&m, &net::NetState::default());
        for (name, kind, _, _) in COUNTERS {
            assert_eq!(page.matches(&format!("# TYPE {name} {kind}\n")).count(), 1);
        }
        assert!(page.contains("\nunifleet_hub_busy_total 7\n"));
        assert!(page.contains("\nunifleet_hub_releases 3\n"));
    }
}
