//! The agent's Prometheus metrics (served by `net::metrics` on the configured address).

use net::metrics::push;
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
}

impl DeviceMetrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        push(
            &mut out,
            "unifleet_device_bytes_from_peers_total",
            "counter",
            "Blob bytes fetched from peers",
            c(&self.bytes_from_peers),
        );
        push(
            &mut out,
            "unifleet_device_bytes_from_hub_total",
            "counter",
            "Blob bytes fetched from the hub",
            c(&self.bytes_from_hub),
        );
        push(
            &mut out,
            "unifleet_device_blob_bytes_served_total",
            "counter",
            "Blob bytes served to peers",
            c(&self.blob_bytes_served),
        );
        push(
            &mut out,
            "unifleet_device_blobs_served_total",
            "counter",
            "Blobs served to peers",
            c(&self.blobs_served),
        );
        push(
            &mut out,
            "unifleet_device_announcements_refused_total",
            "counter",
            "Announcements refused by verification",
            c(&self.announcements_refused),
        );
        push(
            &mut out,
            "unifleet_device_activations_total",
            "counter",
            "Releases activated and healthy",
            c(&self.activations),
        );
        push(
            &mut out,
            "unifleet_device_rollbacks_total",
            "counter",
            "Releases that failed their probe and were rolled back",
            c(&self.rollbacks),
        );
        out
    }
}
