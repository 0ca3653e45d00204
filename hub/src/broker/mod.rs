//! The embedded MQTT broker (MQTT 3.1.1, what the fleet uses of it): TLS with client
//! certificates whenever it listens beyond loopback, the fleet's access rules, sessions
//! keyed by who a client proved to be, and bounded memory (retained bytes, each client's
//! outbox, each client's message rate).
//!
//! One router task owns the routing state ([`router::Router`]); each connection is a
//! task of its own ([`session`]) that talks to it over a typed channel.

pub mod pki;
mod router;
mod session;

pub use router::{Acl, Identity};

use router::{ConnId, Message, Refusal, Router, RouterLimits};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// The user name the hub's own client gives on the loopback listener, with the secret
/// [`Broker::hub_secret`] as its password.
pub const HUB_USER: &str = "unifleet-hub";

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded MQTT broker cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "mqtt_listen = {0:?} is beyond loopback, where the broker takes only TLS: set \
         mqtt_tls = true in hub.toml (devices then need the fleet's broker-ca.pem: \
         `device enroll --broker-ca`), or listen on 127.0.0.1"
    )]
    PlaintextBeyondLoopback(String),
}

/// Enrolled devices: name → key (what a device's certificate must carry).
pub type Enrolled = Arc<HashMap<String, [u8; 32]>>;

/// Bounds on the broker, for a small hub.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connect_timeout: Duration,
    pub max_packet: usize,
    /// Messages queued for one client before it is dropped as too slow.
    pub outbox: usize,
    pub hub_outbox: usize,
    /// Messages (publishes and subscribes) a client other than the hub may send: a
    /// sustained rate and a burst. Past it the client is cut off.
    pub rate_per_sec: f64,
    pub burst: f64,
    pub retained_bytes: usize,
    pub max_connections: usize,
    /// How long a client cut off for flooding is refused before it may connect again.
    pub cooldown: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connect_timeout: Duration::from_secs(10),
            max_packet: net::broker_tls::MAX_PACKET,
            outbox: 64,
            hub_outbox: 4096,
            // A device reports every few seconds at most and subscribes a handful of times.
            rate_per_sec: 10.0,
            burst: 100.0,
            retained_bytes: 16 << 20,
            max_connections: 20_000,
            cooldown: Duration::from_secs(60),
        }
    }
}

/// What the broker counts (on the hub's metrics page).
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    /// Connections refused at CONNECT or the TLS handshake.
    pub refused: AtomicU64,
    /// Clients cut off for flooding or publishing where they may not.
    pub cut_off: AtomicU64,
    /// Clients dropped because their outbox was full.
    pub slow: AtomicU64,
    /// Retained messages not kept (the retained store full).
    pub retained_full: AtomicU64,
    /// Connected sessions and retained bytes (gauges).
    pub sessions: AtomicU64,
    pub retained_bytes: AtomicU64,
}

/// What the transport established about a client before its CONNECT.
#[derive(Debug)]
pub enum Proven {
    /// The loopback listener: nothing (the CONNECT's login and client id say who).
    Loopback,
    /// A client certificate of the fleet's CA naming this identity, for this key.
    Tls(Identity, [u8; 32]),
    /// A client certificate of the fleet's CA that names no enrolled device (or carries
    /// another key): refused at CONNECT, so the client learns why.
    Refused(pki::AcceptError),
}

/// A session's way in: its queue of messages and the token that closes it.
#[derive(Clone, Debug)]
struct Outbox {
    tx: mpsc::Sender<Message>,
    close: CancellationToken,
}

/// A subscription granted, with the retained messages to send at once, or refused.
type Granted = Result<Vec<Message>, Refusal>;

/// What sessions ask the router task. Each names its connection: what a replaced
/// connection still sends is dropped, never taken as its successor's.
enum Command {
    Connect(
        Identity,
        Option<[u8; 32]>,
        ConnId,
        Outbox,
        oneshot::Sender<bool>,
    ),
    Disconnect(Identity, ConnId),
    Subscribe(Identity, ConnId, Vec<String>, oneshot::Sender<Vec<Granted>>),
    Unsubscribe(Identity, ConnId, Vec<String>),
    Publish(
        Identity,
        ConnId,
        Message,
        oneshot::Sender<Result<(), Refusal>>,
    ),
}

/// What every session shares.
struct Ctx {
    router: mpsc::Sender<Command>,
    limits: Limits,
    hub_secret: String,
    metrics: Arc<BrokerMetrics>,
    /// Clients cut off for flooding, and until when they are refused.
    cooling: std::sync::Mutex<HashMap<Identity, tokio::time::Instant>>,
    stop: CancellationToken,
    /// With TLS: the acceptor and the enrolled devices certificates are checked against.
    tls: Option<(tokio_rustls::TlsAcceptor, watch::Receiver<Enrolled>)>,
}

/// A running embedded broker.
pub struct Broker {
    /// The password of [`HUB_USER`] on the loopback listener (random, in-process only).
    pub hub_secret: String,
    pub metrics: Arc<BrokerMetrics>,
    pub addr: SocketAddr,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// How the broker listens.
#[derive(Debug)]
pub struct Listen {
    pub addr: String,
    /// The server's TLS configuration (client certificates required); `None`: plaintext,
    /// loopback only.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Binds and starts the broker under `tasks`. Plaintext is refused beyond loopback.
pub fn start(
    listen: Listen,
    fleet: &str,
    enrolled: watch::Receiver<Enrolled>,
    limits: Limits,
    tasks: &net::tasks::Tasks,
) -> Result<Broker, BrokerError> {
    let std_listener =
        std::net::TcpListener::bind(&listen.addr).map_err(|source| BrokerError::Listen {
            addr: listen.addr.clone(),
            source,
        })?;
    let addr = std_listener
        .local_addr()
        .and_then(|a| std_listener.set_nonblocking(true).map(|()| a))
        .map_err(|source| BrokerError::Listen {
            addr: listen.addr.clone(),
            source,
        })?;
    if listen.tls.is_none() && !addr.ip().is_loopback() {
        return Err(BrokerError::PlaintextBeyondLoopback(listen.addr));
    }
    let listener =
        tokio::net::TcpListener::from_std(std_listener).map_err(|source| BrokerError::Listen {
            addr: listen.addr.clone(),
            source,
        })?;
    let (router_tx, router_rx) = mpsc::channel(1024);
    let metrics = Arc::new(BrokerMetrics::default());
    let ctx = Arc::new(Ctx {
        router: router_tx,
        limits,
        hub_secret: pki::random_secret(),
        metrics: metrics.clone(),
        cooling: Default::default(),
        stop: tasks.token().clone(),
        tls: listen
            .tls
            .map(|c| (tokio_rustls::TlsAcceptor::from(c), enrolled.clone())),
    });
    let router = Router::new(
        Acl::new(fleet),
        RouterLimits {
            retained_bytes: limits.retained_bytes,
        },
    );
    tasks.spawn(route(router, router_rx, enrolled, metrics.clone()));
    tasks.spawn(accept(listener, ctx.clone(), tasks.clone()));
    tracing::info!(%addr, tls = ctx.tls.is_some(), "embedded MQTT broker listening");
    Ok(Broker {
        hub_secret: ctx.hub_secret.clone(),
        metrics,
        addr,
    })
}

impl Ctx {
    /// `who` flooded: refused until the cooldown passes.
    fn cool(&self, who: &Identity) {
        let now = tokio::time::Instant::now();
        let mut cooling = self.cooling.lock().unwrap_or_else(|p| p.into_inner());
        cooling.retain(|_, until| *until > now);
        cooling.insert(who.clone(), now + self.limits.cooldown);
    }

    /// Whether `who` is still refused for flooding.
    fn cooling(&self, who: &Identity) -> bool {
        let cooling = self.cooling.lock().unwrap_or_else(|p| p.into_inner());
        cooling
            .get(who)
            .is_some_and(|until| *until > tokio::time::Instant::now())
    }
}

/// The router task: the one owner of the routing state.
async fn route(
    mut router: Router<Outbox>,
    mut commands: mpsc::Receiver<Command>,
    mut enrolled: watch::Receiver<Enrolled>,
    metrics: Arc<BrokerMetrics>,
) {
    let mut watching = true;
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { return };
                obey(&mut router, command, &enrolled.borrow(), &metrics);
            }
            changed = enrolled.changed(), if watching => {
                // Err: the hub dropped its sender; the set no longer changes.
                watching = changed.is_ok();
                let now = enrolled.borrow_and_update().clone();
                for (who, outbox) in router.not_enrolled(&|n, k| now.get(n) == Some(k)) {
                    tracing::info!("closing the MQTT session of {who}: no longer enrolled with its key");
                    outbox.close.cancel();
                }
                router.drop_statuses(&|n| now.contains_key(n));
            }
        }
        let (sessions, retained) = router.counts();
        metrics.sessions.store(sessions as u64, Ordering::Relaxed);
        metrics
            .retained_bytes
            .store(retained as u64, Ordering::Relaxed);
    }
}

fn obey(
    router: &mut Router<Outbox>,
    command: Command,
    enrolled: &Enrolled,
    metrics: &BrokerMetrics,
) {
    match command {
        Command::Connect(who, key, conn, outbox, reply) => {
            // Revoked between its handshake and its CONNECT: refused all the same.
            if let (Identity::Device(name), Some(key)) = (&who, &key) {
                if enrolled.get(name) != Some(key) {
                    let _ = reply.send(false);
                    return;
                }
            }
            if let Some(old) = router.connect(who, key, conn, outbox) {
                old.close.cancel();
            }
            let _ = reply.send(true);
        }
        Command::Disconnect(who, conn) => router.disconnect(&who, conn),
        Command::Subscribe(who, conn, filters, reply) => {
            let granted = if router.is_current(&who, conn) {
                filters.iter().map(|f| router.subscribe(&who, f)).collect()
            } else {
                vec![Err(Refusal::NotAllowed); filters.len()]
            };
            let _ = reply.send(granted);
        }
        Command::Unsubscribe(who, conn, filters) => {
            if router.is_current(&who, conn) {
                for f in &filters {
                    router.unsubscribe(&who, f);
                }
            }
        }
        Command::Publish(who, conn, msg, reply) => {
            if !router.is_current(&who, conn) {
                let _ = reply.send(Ok(()));
                return;
            }
            let result = router.publish(&who, &msg).map(|published| {
                if !published.kept {
                    metrics.retained_full.fetch_add(1, Ordering::Relaxed);
                }
                for o in &published.to {
                    deliver(o, msg.clone(), metrics);
                }
            });
            let _ = reply.send(result);
        }
    }
}

/// Queues a message for a session; a session whose queue is full is closed (it
/// reconnects and gets the retained messages again).
fn deliver(outbox: &Outbox, message: Message, metrics: &BrokerMetrics) {
    if outbox.tx.try_send(message).is_err() && !outbox.close.is_cancelled() {
        metrics.slow.fetch_add(1, Ordering::Relaxed);
        outbox.close.cancel();
    }
}

/// Accepts connections, each served by a task of its own.
async fn accept(listener: tokio::net::TcpListener, ctx: Arc<Ctx>, tasks: net::tasks::Tasks) {
    let mut next: ConnId = 0;
    let open = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("MQTT accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= ctx.limits.max_connections as u64 {
            ctx.metrics.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        next += 1;
        let (ctx, open, conn) = (ctx.clone(), open.clone(), next);
        open.fetch_add(1, Ordering::Relaxed);
        tasks.spawn(async move {
            let _ = stream.set_nodelay(true);
            let result = match &ctx.tls {
                None => session::serve(stream, Proven::Loopback, ctx.clone(), conn).await,
                Some((acceptor, enrolled)) => {
                    match pki::accept(acceptor, stream, enrolled, ctx.limits.connect_timeout).await
                    {
                        Ok((tls, proven)) => session::serve(tls, proven, ctx.clone(), conn).await,
                        Err(e) => {
                            ctx.metrics.refused.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(%peer, "MQTT client refused: {e}");
                            Ok(())
                        }
                    }
                }
            };
            open.fetch_sub(1, Ordering::Relaxed);
            match result {
                Err(
                    e @ (session::SessionEnd::Refused(_)
                    | session::SessionEnd::Flood(_)
                    | session::SessionEnd::NotAllowed { .. }),
                ) => {
                    tracing::warn!(%peer, "MQTT client: {e}")
                }
                Err(e) => tracing::debug!(%peer, "MQTT client gone: {e}"),
                Ok(()) => {}
            }
        });
    }
}
