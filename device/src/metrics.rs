//! The agent's Prometheus metrics (served by `net::metrics` on the configured address).

use net::metrics::{push, push_labelled};
use net::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct DeviceMetrics {
    pub bytes_from_peers: Arc<AtomicU64>,
    pub bytes_from_hub: Arc<AtomicU64>,
    pub blob_bytes_served: AtomicU64,
    pub blobs_served: AtomicU64,
    pub announcements_refused: AtomicU64,
    pub activations: AtomicU64,
    pub rollbacks: AtomicU64,
    /// On-demand instances running now, by location.
    pub ondemand_local: AtomicU64,
    pub ondemand_remote: AtomicU64,
    /// On-demand boots, and the milliseconds they took in all (start to healthy).
    pub ondemand_boots: AtomicU64,
    pub ondemand_boot_ms: AtomicU64,
    /// Autoscaler decisions (starts and stops).
    pub ondemand_decisions: AtomicU64,
    /// Connections refused: too many held, or held past their deadline.
    pub ondemand_refused: AtomicU64,
    /// Connections closed because their instance drained past `drain_secs`.
    pub ondemand_cut: AtomicU64,
    /// Connections closed because their instance could not be reached (a hosted host
    /// whose link went down), after one try of another instance.
    pub ondemand_lost: AtomicU64,
    /// Every blob byte received, accepted or not (minus the accepted ones: duplicates
    /// and refused bytes).
    pub blob_bytes_received: AtomicU64,
    /// When (Unix ms) the newest release for one of our apps was first verified, when
    /// all its chunks were stored, and when it became active.
    pub last_announcement_ms: AtomicU64,
    pub last_fetched_ms: AtomicU64,
    pub last_active_ms: AtomicU64,
    /// libp2p peers connected now (the hub included).
    pub peers: AtomicU64,
    /// Blob bytes received, by the path they came by.
    pub paths: Arc<PathBytes>,
    /// Redirect rounds in which no peer named by the hub could be reached.
    pub peer_misses: AtomicU64,
    /// Reachability and hole punches, kept by the network task.
    pub net: Arc<net::NetState>,
}

/// Bytes received by path (see [`net::Path`]).
#[derive(Debug, Default)]
pub struct PathBytes([AtomicU64; 4]);

impl PathBytes {
    pub fn by(&self, path: Path) -> &AtomicU64 {
        &self.0[Path::ALL
            .iter()
            .position(|p| *p == path)
            .expect("every path is listed")]
    }
}

/// Now, in Unix milliseconds (for the timestamp gauges).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl DeviceMetrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        push(
            &mut out,
            "unifleet_device_blob_bytes_received_total",
            "counter",
            "Blob bytes received, accepted or not",
            c(&self.blob_bytes_received),
        );
        push(
            &mut out,
            "unifleet_device_peers",
            "gauge",
            "libp2p peers connected (the hub included)",
            c(&self.peers),
        );
        let by_path: Vec<(&str, u64)> = Path::ALL
            .iter()
            .map(|p| (p.label(), c(self.paths.by(*p))))
            .collect();
        push_labelled(
            &mut out,
            "unifleet_device_bytes_by_path_total",
            "counter",
            "Blob bytes received, by path: lan, direct (another network), relayed, hub",
            "path",
            &by_path,
        );
        push(
            &mut out,
            "unifleet_device_reachability",
            "gauge",
            "0 unknown, 1 public, 2 through the hub's relay, 3 unreachable from outside its network",
            self.net.reachability() as u64,
        );
        push(
            &mut out,
            "unifleet_device_hole_punches_total",
            "counter",
            "Relayed connections upgraded to direct ones (DCUtR)",
            c(&self.net.hole_punches),
        );
        push(
            &mut out,
            "unifleet_device_hole_punch_failures_total",
            "counter",
            "Hole punches that gave up",
            c(&self.net.hole_punch_failures),
        );
        net::metrics::push_net(&mut out, "unifleet_device", &self.net);
        for (name, help, v) in [
            (
                "unifleet_device_last_announcement_timestamp_ms",
                "When the newest release was first verified (Unix ms)",
                &self.last_announcement_ms,
            ),
            (
                "unifleet_device_last_fetched_timestamp_ms",
                "When the newest release's chunks were all stored (Unix ms)",
                &self.last_fetched_ms,
            ),
            (
                "unifleet_device_last_active_timestamp_ms",
                "When the newest release became active (Unix ms)",
                &self.last_active_ms,
            ),
        ] {
            push(&mut out, name, "gauge", help, c(v));
        }
        self.render_transfers(&mut out);
        self.render_ondemand(&mut out);
        out
    }

    /// Bytes fetched and served, activations and rollbacks.
    fn render_transfers(&self, out: &mut String) {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        push(
            out,
            "unifleet_device_peer_misses_total",
            "counter",
            "Redirect rounds in which no peer the hub named could be reached",
            c(&self.peer_misses),
        );
        push(
            out,
            "unifleet_device_bytes_from_peers_total",
            "counter",
            "Blob bytes fetched from peers",
            c(&self.bytes_from_peers),
        );
        push(
            out,
            "unifleet_device_bytes_from_hub_total",
            "counter",
            "Blob bytes fetched from the hub",
            c(&self.bytes_from_hub),
        );
        push(
            out,
            "unifleet_device_blob_bytes_served_total",
            "counter",
            "Blob bytes served to peers",
            c(&self.blob_bytes_served),
        );
        push(
            out,
            "unifleet_device_blobs_served_total",
            "counter",
            "Blobs served to peers",
            c(&self.blobs_served),
        );
        push(
            out,
            "unifleet_device_announcements_refused_total",
            "counter",
            "Announcements refused by verification",
            c(&self.announcements_refused),
        );
        push(
            out,
            "unifleet_device_activations_total",
            "counter",
            "Releases activated and healthy",
            c(&self.activations),
        );
        push(
            out,
            "unifleet_device_rollbacks_total",
            "counter",
            "Releases that failed their probe and were rolled back",
            c(&self.rollbacks),
        );
    }

    /// The on-demand pool's instances, boots and decisions.
    fn render_ondemand(&self, out: &mut String) {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        push(
            out,
            "unifleet_device_ondemand_local_instances",
            "gauge",
            "On-demand instances on this device",
            c(&self.ondemand_local),
        );
        push(
            out,
            "unifleet_device_ondemand_remote_instances",
            "gauge",
            "On-demand instances on the hosted host",
            c(&self.ondemand_remote),
        );
        push(
            out,
            "unifleet_device_ondemand_boots_total",
            "counter",
            "On-demand instances booted to healthy",
            c(&self.ondemand_boots),
        );
        push(
            out,
            "unifleet_device_ondemand_boot_milliseconds_total",
            "counter",
            "Time from start to healthy, summed",
            c(&self.ondemand_boot_ms),
        );
        push(
            out,
            "unifleet_device_ondemand_scale_decisions_total",
            "counter",
            "Autoscaler starts and stops",
            c(&self.ondemand_decisions),
        );
        push(
            out,
            "unifleet_device_ondemand_refused_total",
            "counter",
            "Connections closed unanswered: too many held, or no instance within hold_secs",
            c(&self.ondemand_refused),
        );
        push(
            out,
            "unifleet_device_ondemand_cut_total",
            "counter",
            "Connections closed because their instance drained past drain_secs",
            c(&self.ondemand_cut),
        );
        push(
            out,
            "unifleet_device_ondemand_lost_total",
            "counter",
            "Connections closed because their instance could not be reached",
            c(&self.ondemand_lost),
        );
    }
}
