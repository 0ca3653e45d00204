//! A minimal Prometheus endpoint: every request on the address gets the text that
//! `render` produces at that moment. Shared by the hub and the device agent.

use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Binds `addr` and serves until `tasks` is cancelled. Each connection is answered once
/// (`Connection: close`) with a bounded wait for the request.
pub async fn serve(
    addr: &str,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    tasks: &crate::tasks::Tasks,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let conns = tasks.clone();
    tasks.spawn(async move {
        crate::tasks::accept_loop(
            "metrics",
            &conns,
            || listener.accept(),
            |(mut sock, _)| {
                let render = render.clone();
                conns.spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        sock.read(&mut buf),
                    )
                    .await;
                    let body = render();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            },
        )
        .await
    });
    Ok(())
}

/// Appends one metric in Prometheus text format.
pub fn push(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    out.push_str(&format!(
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
    ));
}

/// Appends the node's connection and request counters ([`crate::NetState`]), named
/// `<prefix>_…` (`unifleet_hub`, `unifleet_device`).
pub fn push_net(out: &mut String, prefix: &str, state: &crate::state::NetState) {
    use std::sync::atomic::Ordering::Relaxed;
    for (name, help, value) in [
        (
            "p2p_connections_opened_total",
            "libp2p connections established, inbound and outbound (a noise handshake each)",
            &state.connections_opened,
        ),
        (
            "blob_requests_sent_total",
            "Blob-protocol requests sent (one yamux stream each)",
            &state.requests_sent,
        ),
        (
            "blob_requests_received_total",
            "Blob-protocol requests received (one yamux stream each)",
            &state.requests_received,
        ),
        (
            "p2p_events_dropped_total",
            "Network events the application was too far behind to take: gossip ignored, blob requests answered Busy",
            &state.events_dropped,
        ),
    ] {
        push(
            out,
            &format!("{prefix}_{name}"),
            "counter",
            help,
            value.load(Relaxed),
        );
    }
}

/// Appends one metric with one label, a value per label value.
pub fn push_labelled(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    for (v, n) in values {
        out.push_str(&format!("{name}{{{label}=\"{v}\"}} {n}\n"));
    }
}
