//! On-demand instances: a front proxy on the app's public address, and a pool that boots
//! instances of the installed release when connections arrive (scale from zero), grows to
//! the configured maxima (local, then the hosted URI) and shrinks back, as decided by
//! [`crate::autoscale`].
//!
//! One task (the pool) owns the autoscaler and the instance table; proxy connections ask
//! it for an instance over a bounded channel and are held — not refused — until one is
//! healthy. A release with a network interface is reached on the guest's own address
//! (`guest_port`, 32 connections per instance by default); one without is reached on its
//! console's loopback TCP port (QEMU), where the test image answers one connection at a
//! time (target 1).

use crate::autoscale::{Action, Autoscaler, Event, InstanceId, Location, ScaleConfig};
use crate::hypervisor::{ActivateError, Booted, Hypervisor, Launch};
use proto::manifest::HealthProbe;
use proto::manifest::Manifest;
use proto::status::OnDemandCounts;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// `[[ondemand]]` in device.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OnDemandConfig {
    pub app: String,
    /// Public address the proxy listens on, e.g. `127.0.0.1:8080`.
    pub listen: String,
    #[serde(default)]
    pub min: u32,
    #[serde(default = "two")]
    pub max_local: u32,
    #[serde(default)]
    pub max_remote: u32,
    /// Concurrent connections per instance (default: 32 for a release with a network
    /// interface, 1 for one served on its console).
    #[serde(default)]
    pub target: Option<f64>,
    /// The port the unikernel serves on (default: the health probe's port, else 80).
    #[serde(default)]
    pub guest_port: Option<u16>,
    #[serde(default = "thirty")]
    pub stable_window_secs: u64,
    #[serde(default = "three")]
    pub panic_window_secs: u64,
    #[serde(default = "thirty")]
    pub idle_secs: u64,
    /// The hosted Xen (or any libvirt) URI for overflow, e.g. `xen+ssh://host/system`.
    #[serde(default)]
    pub remote_uri: Option<String>,
    /// How long a connection is held waiting for an instance before it is closed.
    #[serde(default = "thirty")]
    pub hold_secs: u64,
    /// Most connections held at once; more are closed at once.
    #[serde(default = "max_held")]
    pub max_held: usize,
}

fn max_held() -> usize {
    256
}

fn two() -> u32 {
    2
}
fn three() -> u64 {
    3
}
fn thirty() -> u64 {
    30
}

impl OnDemandConfig {
    /// The autoscaler's settings for instances of `m`.
    pub fn scale(&self, m: &Manifest) -> ScaleConfig {
        let target = self
            .target
            .unwrap_or(if m.boot.network { 32.0 } else { 1.0 });
        ScaleConfig {
            min: self.min,
            max_local: self.max_local,
            max_remote: if self.remote_uri.is_some() {
                self.max_remote
            } else {
                0
            },
            target,
            stable_window: Duration::from_secs(self.stable_window_secs),
            panic_window: Duration::from_secs(self.panic_window_secs),
            idle: Duration::from_secs(self.idle_secs),
            ..ScaleConfig::default()
        }
    }

    /// The port a release's unikernel serves on, on its guest address.
    pub fn guest_port(&self, m: &Manifest) -> u16 {
        self.guest_port.unwrap_or(match m.boot.probe {
            HealthProbe::TcpConnect { port } | HealthProbe::Http { port, .. } if port != 0 => port,
            _ => 80,
        })
    }
}

/// What the pool serves instances of.
#[derive(Debug, Clone)]
pub struct Image {
    pub manifest: Manifest,
    pub slot: PathBuf,
}

/// Why a held connection was closed without an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Refused {
    #[error("{0} connections are already held waiting for an instance (max_held)")]
    Full(usize),
    #[error("no instance became ready within {0} s (hold_secs)")]
    Timeout(u64),
}

type Reply = oneshot::Sender<Result<(InstanceId, SocketAddr), Refused>>;

/// A connection held until an instance has room, and until when.
struct Held {
    reply: Reply,
    until: Instant,
}

enum Msg {
    Acquire(Reply),
    Release(InstanceId),
    /// The boot finished: how to reach the instance, or why not; and how long it took.
    Started(InstanceId, Result<Booted, ActivateError>, Duration),
    RollOver(Box<Image>),
}

/// What the pool needs to reach and stop an instance; its connections and whether it
/// drains are the autoscaler's to know.
struct Inst {
    at: Location,
    name: String,
    /// Where its service answers, once it is healthy.
    endpoint: Option<SocketAddr>,
}

/// A running proxy and pool.
#[derive(Debug, Clone)]
pub struct PoolHandle {
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Acquire(_) => "Acquire",
            Msg::Release(_) => "Release",
            Msg::Started(..) => "Started",
            Msg::RollOver(_) => "RollOver",
        })
    }
}

impl PoolHandle {
    /// A new release was activated: new connections go to instances of it; instances of
    /// the old one drain and stop.
    pub async fn roll_over(&self, image: Image) {
        let _ = self.tx.send(Msg::RollOver(Box::new(image))).await;
    }
}

/// What a pool works with, besides its configuration and image.
#[derive(Debug)]
pub struct PoolContext {
    /// The device's name (instance domains are named after it).
    pub device: String,
    /// Where instance console logs go.
    pub state_dir: PathBuf,
    /// Where an instance's network interface goes, for releases that ask for one.
    pub nic: Option<crate::hypervisor::Nic>,
    pub local: Hypervisor,
    /// The hosted overflow host, if configured.
    pub remote: Option<Hypervisor>,
    pub metrics: Arc<crate::metrics::DeviceMetrics>,
    /// Counts go into the app's status reports.
    pub reporter: Arc<crate::report::Reporter>,
    /// The agent's cancellation tree: the proxy, the pool and every connection in it.
    pub tasks: net::tasks::Tasks,
}

/// Starts the proxy and the pool (they run until the agent's tasks are cancelled).
pub async fn start(
    ctx: PoolContext,
    cfg: OnDemandConfig,
    image: Image,
) -> anyhow::Result<PoolHandle> {
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "on-demand proxy for {} cannot listen on {}: {e}",
                cfg.app,
                cfg.listen
            )
        })?;
    tracing::info!(app = %cfg.app, listen = %cfg.listen, "on-demand proxy listening");
    let (tx, rx) = mpsc::channel::<Msg>(256);
    let pool_tx = tx.clone();
    let tasks = ctx.tasks.clone();
    tasks.spawn(pool(ctx, cfg.clone(), image, rx, pool_tx));
    tasks.spawn(accept(listener, tx.clone(), tasks.clone()));
    Ok(PoolHandle { tx })
}

/// The front proxy: each connection waits for an instance from the pool, then bytes flow
/// both ways (half-close included) until either side closes.
async fn accept(
    listener: tokio::net::TcpListener,
    tx: mpsc::Sender<Msg>,
    tasks: net::tasks::Tasks,
) {
    let conns = tasks.clone();
    net::tasks::accept_loop(
        "on-demand proxy",
        &tasks,
        || listener.accept(),
        |(client, peer)| {
            let tx = tx.clone();
            conns.spawn(async move {
                let (reply, got) = oneshot::channel();
                if tx.send(Msg::Acquire(reply)).await.is_err() {
                    return;
                }
                let (id, endpoint) = match got.await {
                    Ok(Ok(assigned)) => assigned,
                    Ok(Err(refused)) => {
                        tracing::warn!(%peer, "on-demand connection closed: {refused}");
                        return;
                    }
                    Err(_) => return,
                };
                if let Err(e) = forward(client, endpoint).await {
                    tracing::debug!(%peer, "proxied connection ended: {e}");
                }
                let _ = tx.send(Msg::Release(id)).await;
            });
        },
    )
    .await
}

/// Connects to the instance's `endpoint` and copies bytes both ways (zero-copy,
/// [`crate::splice`]) until both directions are closed; a half-close is passed on. Returns
/// the bytes copied (client to instance, instance to client).
pub async fn forward(
    client: tokio::net::TcpStream,
    endpoint: SocketAddr,
) -> std::io::Result<(u64, u64)> {
    let upstream = tokio::net::TcpStream::connect(endpoint).await?;
    // Small request/answer exchanges: no Nagle delay on either leg.
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    crate::splice::bidirectional(&client, &upstream).await
}

async fn pool(
    ctx: PoolContext,
    cfg: OnDemandConfig,
    mut image: Image,
    mut rx: mpsc::Receiver<Msg>,
    tx: mpsc::Sender<Msg>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let PoolContext {
        device,
        state_dir,
        nic,
        local,
        remote,
        metrics,
        reporter,
        tasks,
    } = ctx;
    let mut counts = OnDemandCounts::default();
    let mut reported = counts;
    let mut scaler = Autoscaler::new(cfg.scale(&image.manifest));
    let mut insts: HashMap<InstanceId, Inst> = HashMap::new();
    let mut waiting: VecDeque<Held> = VecDeque::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let hold = Duration::from_secs(cfg.hold_secs);
    loop {
        let event = tokio::select! {
            _ = tick.tick() => None,
            msg = rx.recv() => match msg { Some(m) => Some(m), None => break },
        };
        let now = Instant::now();
        let mut actions = vec![];
        match event {
            None => {}
            Some(Msg::Acquire(reply)) if waiting.len() >= cfg.max_held => {
                metrics.ondemand_refused.fetch_add(1, Relaxed);
                let _ = reply.send(Err(Refused::Full(waiting.len())));
            }
            Some(Msg::Acquire(reply)) => waiting.push_back(Held {
                reply,
                until: now + hold,
            }),
            Some(Msg::Release(id)) => {
                actions.extend(scaler.handle(Event::Disconnected { now, id }))
            }
            Some(Msg::RollOver(new)) => {
                tracing::info!(app = %cfg.app, release = new.manifest.release, "on-demand pool rolls over");
                image = *new;
                actions.extend(scaler.handle(Event::Drain { now }));
            }
            Some(Msg::Started(id, Ok(booted), took)) => {
                if let Some(i) = insts.get_mut(&id) {
                    i.endpoint = Some(booted.endpoint(cfg.guest_port(&image.manifest)));
                    let ms = took.as_millis() as u64;
                    metrics.ondemand_boots.fetch_add(1, Relaxed);
                    metrics.ondemand_boot_ms.fetch_add(ms, Relaxed);
                    counts.boots += 1;
                    counts.boot_ms_total += ms;
                    tracing::info!(app = %cfg.app, instance = %i.name, at = ?i.at, boot_ms = took.as_millis() as u64, "on-demand instance ready");
                    actions.extend(scaler.handle(Event::Ready { now, id }));
                }
            }
            Some(Msg::Started(id, Err(e), _)) => {
                let at = insts.remove(&id).map(|i| i.at);
                tracing::warn!(app = %cfg.app, ?at, "on-demand instance failed to start: {e}");
                actions.extend(scaler.handle(match at {
                    Some(Location::Remote) => Event::RemoteUnavailable {
                        now,
                        id,
                        reason: e.to_string(),
                    },
                    _ => Event::Failed { now, id },
                }));
            }
        }
        // Held connections past their deadline are closed; the rest go to the instances
        // the scaler picks (ready, room, least loaded, not draining).
        waiting.retain(|w| !w.reply.is_closed());
        while waiting.front().is_some_and(|w| w.until <= now) {
            let w = waiting.pop_front().expect("front exists");
            metrics.ondemand_refused.fetch_add(1, Relaxed);
            let _ = w.reply.send(Err(Refused::Timeout(cfg.hold_secs)));
        }
        while !waiting.is_empty() {
            let Some(id) = scaler.pick() else { break };
            let Some(endpoint) = insts.get(&id).and_then(|i| i.endpoint) else {
                break;
            };
            let w = waiting.pop_front().expect("not empty");
            if w.reply.send(Ok((id, endpoint))).is_ok() {
                scaler.handle(Event::Connected { id });
            }
        }
        let load = scaler.connections() as usize + waiting.len();
        actions.extend(scaler.handle(Event::Load {
            now,
            connections: load as u32,
            waiting: waiting.len() as u32,
        }));
        actions.extend(scaler.handle(Event::Tick { now }));
        for action in actions {
            match action {
                Action::Start { id, at } => {
                    metrics.ondemand_decisions.fetch_add(1, Relaxed);
                    counts.decisions += 1;
                    let hv = match (at, &remote) {
                        (Location::Remote, Some(r)) => r.clone(),
                        _ => local.clone(),
                    };
                    let name = format!("uf-{device}-{}-od{}", cfg.app, id.0);
                    tracing::info!(app = %cfg.app, instance = %name, ?at, "starting on-demand instance");
                    let launch = Launch {
                        console_log: state_dir.join(format!("{name}.console.log")),
                        name: name.clone(),
                        platform: image.manifest.platform,
                        image: image.slot.clone(),
                        boot: image.manifest.boot.clone(),
                        nic: image.manifest.boot.network.then(|| nic.clone()).flatten(),
                    };
                    insts.insert(
                        id,
                        Inst {
                            at,
                            name,
                            endpoint: None,
                        },
                    );
                    let tx = tx.clone();
                    tasks.spawn(async move {
                        let began = Instant::now();
                        let res = hv.boot(&launch).await;
                        let _ = tx.send(Msg::Started(id, res, began.elapsed())).await;
                    });
                }
                Action::Stop { id } => {
                    metrics.ondemand_decisions.fetch_add(1, Relaxed);
                    counts.decisions += 1;
                    if let Some(i) = insts.remove(&id) {
                        tracing::info!(app = %cfg.app, instance = %i.name, at = ?i.at, "stopping on-demand instance");
                        let hv = match (i.at, &remote) {
                            (Location::Remote, Some(r)) => r.clone(),
                            _ => local.clone(),
                        };
                        let app = cfg.app.clone();
                        tasks.spawn(async move {
                            let t = Instant::now();
                            match hv.stop(&i.name).await {
                                Ok(()) => {
                                    tracing::info!(%app, instance = %i.name, stop_ms = t.elapsed().as_millis() as u64, "on-demand instance stopped")
                                }
                                Err(e) => {
                                    tracing::warn!(%app, instance = %i.name, "stopping on-demand instance: {e}")
                                }
                            }
                        });
                    }
                }
                Action::Report(text) => tracing::warn!(app = %cfg.app, "{text}"),
            }
        }
        let (l, r) = scaler.counts();
        metrics.ondemand_local.store(u64::from(l), Relaxed);
        metrics.ondemand_remote.store(u64::from(r), Relaxed);
        (counts.local, counts.remote) = (l, r);
        if counts != reported {
            reporter.ondemand_changed(&cfg.app, counts).await;
            reported = counts;
        }
    }
}
