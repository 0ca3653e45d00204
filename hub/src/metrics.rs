//! Prometheus metrics over plain HTTP (`GET /metrics`, any path answers the same).

use crate::home::Home;
use crate::serve::Metrics;
use anyhow::{Context, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub async fn start(addr: &str, metrics: Arc<Metrics>, home: Home) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics cannot listen on {addr}"))?;
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let metrics = metrics.clone();
            let home = home.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), sock.read(&mut buf))
                        .await;
                let body = render(&metrics, &home);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(())
}

fn render(m: &Metrics, home: &Home) -> String {
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    };
    counter(
        "unifleet_hub_announcements_total",
        "Announcements sent (MQTT and gossip)",
        m.announcements.load(Ordering::Relaxed),
    );
    counter(
        "unifleet_hub_blob_bytes_served_total",
        "Blob bytes served to peers",
        m.blob_bytes_served.load(Ordering::Relaxed),
    );
    counter(
        "unifleet_hub_blobs_served_total",
        "Blobs served to peers",
        m.blobs_served.load(Ordering::Relaxed),
    );
    counter(
        "unifleet_hub_status_accepted_total",
        "Status reports accepted",
        m.status_accepted.load(Ordering::Relaxed),
    );
    counter(
        "unifleet_hub_status_dropped_total",
        "Status reports dropped (bad signature, unknown key, garbage)",
        m.status_dropped.load(Ordering::Relaxed),
    );
    counter(
        "unifleet_hub_gossip_rejected_total",
        "Gossip messages rejected",
        m.gossip_rejected.load(Ordering::Relaxed),
    );
    let releases = home
        .store()
        .and_then(|s| s.releases())
        .map(|r| r.len())
        .unwrap_or(0);
    out.push_str(&format!("# HELP unifleet_hub_releases Releases in the store\n# TYPE unifleet_hub_releases gauge\nunifleet_hub_releases {releases}\n"));
    let inv = crate::serve::load_inventory(home);
    let mut by_state = std::collections::BTreeMap::<String, u64>::new();
    for e in inv.values() {
        *by_state.entry(e.state.clone()).or_default() += 1;
    }
    out.push_str(
        "# HELP unifleet_hub_devices Devices by state\n# TYPE unifleet_hub_devices gauge\n",
    );
    for (state, n) in by_state {
        out.push_str(&format!("unifleet_hub_devices{{state=\"{state}\"}} {n}\n"));
    }
    out
}
