//! The front proxy: each connection is held until the pool hands it an instance, then
//! spliced to it. An instance that cannot be reached (a hosted host whose link went down)
//! is reported to the pool, which stops sending connections there, and the connection
//! asks once more — a local instance, most likely — before it is closed and counted.

use super::{Assigned, Msg};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// The longest a proxied connection waits to connect to its instance.
const CONNECT: Duration = Duration::from_secs(5);

/// Instances a connection is offered before it is closed: the first, and one more.
const TRIES: usize = 2;

pub(super) async fn accept(
    listener: tokio::net::TcpListener,
    tx: mpsc::Sender<Msg>,
    metrics: Arc<crate::metrics::DeviceMetrics>,
    tasks: net::tasks::Tasks,
) {
    let conns = tasks.clone();
    net::tasks::accept_loop(
        "on-demand proxy",
        &tasks,
        || listener.accept(),
        |(client, peer)| {
            let (tx, metrics) = (tx.clone(), metrics.clone());
            conns.spawn(serve(client, peer, tx, metrics));
        },
    )
    .await
}

/// One client connection, from its first byte held to its close.
async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    tx: mpsc::Sender<Msg>,
    metrics: Arc<crate::metrics::DeviceMetrics>,
) {
    for attempt in 1..=TRIES {
        let (reply, got) = oneshot::channel();
        if tx.send(Msg::Acquire(reply)).await.is_err() {
            return;
        }
        let Assigned { id, endpoint, cut } = match got.await {
            Ok(Ok(assigned)) => assigned,
            Ok(Err(refused)) => {
                tracing::warn!(%peer, "on-demand connection closed: {refused}");
                return;
            }
            Err(_) => return,
        };
        let upstream = match connect(endpoint).await {
            Ok(upstream) => upstream,
            Err(e) => {
                tracing::warn!(%peer, %endpoint, attempt, "on-demand instance unreachable: {e}");
                let _ = tx.send(Msg::Unreachable(id, e)).await;
                if attempt == TRIES {
                    metrics.ondemand_lost.fetch_add(1, Relaxed);
                }
                continue;
            }
        };
        tokio::select! {
            r = forward(&client, &upstream) => if let Err(e) = r {
                tracing::debug!(%peer, "proxied connection ended: {e}");
            },
            // Dropping the splice closes both legs.
            _ = cut.cancelled() => tracing::debug!(%peer, "proxied connection cut: its instance drained or was lost"),
        }
        let _ = tx.send(Msg::Release(id)).await;
        return;
    }
}

/// Connects to an instance, within [`CONNECT`]: a guest that stopped answering (its
/// address gone, its host cut off) must not hold the client for ever.
async fn connect(endpoint: SocketAddr) -> std::io::Result<TcpStream> {
    tokio::time::timeout(CONNECT, TcpStream::connect(endpoint))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting to the instance")
        })?
}

/// Copies bytes both ways (zero-copy, [`crate::splice`]) until both directions are
/// closed; a half-close is passed on. Returns the bytes copied (client to instance,
/// instance to client).
pub async fn forward(client: &TcpStream, upstream: &TcpStream) -> std::io::Result<(u64, u64)> {
    // Small request/answer exchanges: no Nagle delay on either leg.
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    crate::splice::bidirectional(client, upstream).await
}
