//! The hub's Prometheus metrics (served by `net::metrics`).

use anyhow::{Context, Result};
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
    /// Devices' reports of a chunk stored.
    pub stored_reports: AtomicU64,
    /// When a release newer than any announced before was first announced (Unix ms).
    pub last_new_announcement_ms: AtomicU64,
    /// Releases in the store (gauge, as of the last look at the store's `apps` tree).
    pub releases: AtomicU64,
    /// Devices in the inventory by state (as of the last batch written).
    pub devices_by_state: std::sync::Mutex<BTreeMap<String, u64>>,
}

pub async fn start(
    addr: &str,
    metrics: Arc<Metrics>,
    net: Arc<net::NetState>,
    tasks: &net::tasks::Tasks,
) -> Result<()> {
    net::metrics::serve(addr, Arc::new(move || render(&metrics, &net)), tasks)
        .await
        .with_context(|| format!("metrics cannot listen on {addr}"))
}

fn render(m: &Metrics, net: &net::NetState) -> String {
    let mut out = String::new();
    net::metrics::push_net(&mut out, "unifleet_hub", net);
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    push(
        &mut out,
        "unifleet_hub_announcements_total",
        "counter",
        "Announcements sent (MQTT and gossip)",
        c(&m.announcements),
    );
    push(
        &mut out,
        "unifleet_hub_blob_bytes_served_total",
        "counter",
        "Blob bytes served to peers",
        c(&m.blob_bytes_served),
    );
    push(
        &mut out,
        "unifleet_hub_redirects_total",
        "counter",
        "Blob requests answered with peers that have the blob",
        c(&m.redirects),
    );
    push(
        &mut out,
        "unifleet_hub_waits_total",
        "counter",
        "Blob requests answered: no device with the blob is free yet, ask again",
        c(&m.waits),
    );
    push(
        &mut out,
        "unifleet_hub_tracker_slots_taken",
        "gauge",
        "Devices' upload slots the tracker has handed out and not had back",
        c(&m.slots_taken),
    );
    push(
        &mut out,
        "unifleet_hub_tracker_parked",
        "gauge",
        "Blob requests parked until a device with the blob is free",
        c(&m.parked),
    );
    push(
        &mut out,
        "unifleet_hub_tracker_suspects",
        "gauge",
        "Devices reported silent by an asker, named to nobody for a while",
        c(&m.suspects),
    );
    push(
        &mut out,
        "unifleet_hub_missed_reports_total",
        "counter",
        "Asks saying the device named for a blob did not deliver in time",
        c(&m.missed_reports),
    );
    push(
        &mut out,
        "unifleet_hub_holders_suspected_total",
        "counter",
        "Holders made suspect by those reports (too soon, beyond an asker's share, or suspect already: none)",
        c(&m.holders_suspected),
    );
    push(
        &mut out,
        "unifleet_hub_busy_total",
        "counter",
        "Blob requests answered busy (upload saturated)",
        c(&m.busy),
    );
    push(
        &mut out,
        "unifleet_hub_stored_reports_total",
        "counter",
        "Devices' reports of a chunk stored (the tracker's holders)",
        c(&m.stored_reports),
    );
    push(
        &mut out,
        "unifleet_hub_last_new_announcement_timestamp_ms",
        "gauge",
        "When the newest release was first announced (Unix ms)",
        c(&m.last_new_announcement_ms),
    );
    push(
        &mut out,
        "unifleet_hub_blobs_served_total",
        "counter",
        "Blobs served to peers",
        c(&m.blobs_served),
    );
    push(
        &mut out,
        "unifleet_hub_status_accepted_total",
        "counter",
        "Status reports accepted",
        c(&m.status_accepted),
    );
    push(
        &mut out,
        "unifleet_hub_status_dropped_total",
        "counter",
        "Status reports dropped (bad signature, unknown key, garbage)",
        c(&m.status_dropped),
    );
    push(
        &mut out,
        "unifleet_hub_gossip_rejected_total",
        "counter",
        "Gossip messages rejected",
        c(&m.gossip_rejected),
    );
    // From memory: a scrape never opens the store or reads the inventory from disk.
    push(
        &mut out,
        "unifleet_hub_releases",
        "gauge",
        "Releases in the store",
        c(&m.releases),
    );
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
