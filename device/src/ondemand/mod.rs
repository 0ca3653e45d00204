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

mod hosted;
mod proxy;

pub use proxy::forward;

use crate::autoscale::{Action, Autoscaler, Event, InstanceId, Location};
pub use crate::config::OnDemandConfig;
use crate::hypervisor::{ActivateError, Booted, Hypervisor, Launch};
use proto::manifest::Manifest;
use proto::status::{HostedUse, OnDemandCounts};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// What the pool serves instances of.
#[derive(Debug, Clone)]
pub struct Image {
    pub manifest: Manifest,
    pub slot: PathBuf,
    /// The accelerator measured for the release, if any ([`crate::accel`]).
    pub domain_type: Option<String>,
}

/// Why a held connection was closed without an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Refused {
    #[error("{0} connections are already held waiting for an instance (max_held)")]
    Full(usize),
    #[error("no instance became ready within {0} s (hold_secs)")]
    Timeout(u64),
}

/// A connection handed to an instance: where to splice it, and the instance's signal to
/// close it (drained past the deadline).
struct Assigned {
    id: InstanceId,
    endpoint: SocketAddr,
    cut: CancellationToken,
}

type Reply = oneshot::Sender<Result<Assigned, Refused>>;

/// A connection held until an instance has room, and until when.
struct Held {
    reply: Reply,
    until: Instant,
}

enum Msg {
    Acquire(Reply),
    Release(InstanceId),
    /// A connection handed to this instance could not reach it.
    Unreachable(InstanceId, std::io::Error),
    /// The domains of this pool the hosted host runs, or why it could not say.
    Swept(Result<Vec<String>, ActivateError>),
    /// The boot finished: how to reach the instance, or why not; and how long it took.
    Started(Box<Boot>),
    RollOver(Box<Image>),
    /// A warm instance of `release` booted and paused, or why not.
    Warmed {
        name: String,
        release: u64,
        res: Result<Booted, ActivateError>,
    },
}

/// What the pool needs to reach and stop an instance; its connections and whether it
/// drains are the autoscaler's to know.
struct Inst {
    at: Location,
    name: String,
    /// Where its service answers, once it is healthy.
    endpoint: Option<SocketAddr>,
    /// Closes the connections spliced to it.
    cut: CancellationToken,
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
            Msg::Unreachable(..) => "Unreachable",
            Msg::Swept(_) => "Swept",
            Msg::Started(..) => "Started",
            Msg::RollOver(_) => "RollOver",
            Msg::Warmed { .. } => "Warmed",
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
    /// The device's name (instance domains are named after it), and its fleet's.
    pub device: String,
    pub fleet: String,
    /// Where instance console logs go.
    pub state_dir: PathBuf,
    /// Where an instance's network interface goes, for releases that ask for one.
    pub nic: Option<crate::hypervisor::Nic>,
    pub local: Hypervisor,
    /// The hosted overflow host, if configured (`[hosted]`).
    pub remote: Option<Hypervisor>,
    /// Where instances' network interfaces go on the hosted host.
    pub remote_nic: Option<crate::hypervisor::Nic>,
    pub metrics: Arc<crate::metrics::DeviceMetrics>,
    /// Counts go into the app's status reports.
    pub reporter: Arc<crate::report::Reporter>,
    /// The agent's cancellation tree: the proxy, the pool and every connection in it.
    pub tasks: net::tasks::Tasks,
}

/// Why an app's on-demand proxy did not start.
#[derive(Debug, thiserror::Error)]
#[error("on-demand proxy for {app} cannot listen on {listen}")]
pub struct ListenError {
    app: String,
    listen: String,
    #[source]
    source: std::io::Error,
}

/// Starts the proxy and the pool (they run until the agent's tasks are cancelled).
pub async fn start(
    ctx: PoolContext,
    cfg: OnDemandConfig,
    image: Image,
) -> Result<PoolHandle, ListenError> {
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|source| ListenError {
            app: cfg.app.clone(),
            listen: cfg.listen.clone(),
            source,
        })?;
    tracing::info!(app = %cfg.app, listen = %cfg.listen, "on-demand proxy listening");
    let (tx, rx) = mpsc::channel::<Msg>(256);
    let pool_tx = tx.clone();
    let (tasks, metrics) = (ctx.tasks.clone(), ctx.metrics.clone());
    tasks.spawn(Pool::new(ctx, cfg.clone(), image, pool_tx).run(rx));
    tasks.spawn(proxy::accept(listener, tx.clone(), metrics, tasks.clone()));
    Ok(PoolHandle { tx })
}

/// A finished boot (or resume) of instance `id`, named `name`, at `at`.
struct Boot {
    id: InstanceId,
    at: Location,
    name: String,
    res: Result<Booted, ActivateError>,
    took: Duration,
}

/// Resumes a warm instance; one paused for long is probed first ([`WARM_RECHECK`]).
async fn resume(hv: &Hypervisor, launch: &Launch, w: Warm) -> Result<Booted, ActivateError> {
    hv.resume(&w.name).await?;
    if w.since.elapsed() < WARM_RECHECK || !crate::probe::rechecks(launch) {
        return Ok(w.booted);
    }
    match crate::probe::alive(hv, launch).await {
        Ok(()) => Ok(w.booted),
        Err(seen) => Err(ActivateError::Probe {
            name: w.name,
            reason: crate::hypervisor::ProbeFailure::Unanswered(seen),
            console_tail: String::new(),
        }),
    }
}

/// The pool task: owns the autoscaler, the instance table and the held connections.
struct Pool {
    cfg: OnDemandConfig,
    image: Image,
    ctx: PoolContext,
    scaler: Autoscaler,
    insts: HashMap<InstanceId, Inst>,
    waiting: VecDeque<Held>,
    counts: OnDemandCounts,
    /// What the last report said: counts and hosted use.
    reported: (OnDemandCounts, Option<HostedUse>),
    /// For boot results: the pool's own inbox.
    tx: mpsc::Sender<Msg>,
    /// Booted, healthy, paused instances of the current release, oldest first.
    warm: VecDeque<Warm>,
    /// Warm boots under way.
    warming: u32,
    /// Warm instances made so far (their names' numbers).
    warmed: u64,
    /// After a warm boot failed: no new one before then.
    warm_retry_at: Option<Instant>,
    /// Use of the hosted host.
    hosted: hosted::Use,
    /// Whether instances of the current release may run on the hosted host.
    bursts: bool,
    /// This run's tag in its hosted instances' names ([`run_tag`]).
    run: String,
}

/// A paused instance waiting for a connection.
struct Warm {
    name: String,
    booted: Booted,
    /// When it was paused.
    since: Instant,
}

/// A warm instance paused longer than this is probed once after it resumes, before a
/// client is sent to it: its DHCP lease may have lapsed (then its address changed), or it
/// may have hung. One that fails is replaced by a cold boot.
const WARM_RECHECK: Duration = Duration::from_secs(60);

/// After a warm boot failed, how long before the next try.
const WARM_RETRY: Duration = Duration::from_secs(30);

/// A tag for this run's hosted instances: the low 32 bits of the clock's nanoseconds
/// (two runs a kill -9 apart differ).
fn run_tag() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u32)
}

impl Pool {
    fn new(ctx: PoolContext, cfg: OnDemandConfig, image: Image, tx: mpsc::Sender<Msg>) -> Pool {
        let bursts = hosted::bursts(&ctx, &cfg, &image);
        Pool {
            scaler: Autoscaler::new(cfg.scale(&image.manifest, bursts)),
            cfg,
            image,
            ctx,
            insts: HashMap::new(),
            waiting: VecDeque::new(),
            counts: OnDemandCounts::default(),
            reported: Default::default(),
            tx,
            warm: VecDeque::new(),
            warming: 0,
            warmed: 0,
            warm_retry_at: None,
            hosted: Default::default(),
            bursts,
            run: format!("{:08x}", run_tag()),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        self.reap().await;
        self.retire_remote();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut sweep = tokio::time::interval(hosted::SWEEP_EVERY);
        loop {
            let msg = tokio::select! {
                _ = tick.tick() => None,
                _ = sweep.tick() => {
                    self.sweep();
                    None
                }
                msg = rx.recv() => match msg { Some(m) => Some(m), None => break },
            };
            let now = Instant::now();
            let mut actions = match msg {
                Some(msg) => self.handle(msg, now),
                None => vec![],
            };
            actions.extend(self.assign(now));
            for action in actions {
                self.act(action);
            }
            self.refill(now);
            self.publish_counts().await;
        }
    }

    /// The start of the names of this pool's domains on this device.
    fn local_prefix(&self) -> String {
        format!("uf-{}-{}-", self.ctx.device, self.cfg.app)
    }

    /// Instances a previous run of the agent left (paused warm ones, busy ones at a
    /// kill -9): this pool knows none of them, so they go.
    async fn reap(&self) {
        let prefix = self.local_prefix();
        let left = match self.ctx.local.named(&prefix).await {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(app = %self.cfg.app, "looking for instances left by an earlier run: {e}");
                return;
            }
        };
        // Exactly `odN` or `wN`: app `web`'s prefix also starts `web-worker`'s names.
        let ours = |n: &str| {
            let rest = &n[prefix.len()..];
            let number = |r: &str| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit());
            rest.strip_prefix("od").is_some_and(number)
                || rest.strip_prefix('w').is_some_and(number)
        };
        // Awaited, before any instance of this run starts: names start again from 1.
        for name in left.into_iter().filter(|n| ours(n)) {
            tracing::info!(app = %self.cfg.app, instance = %name, "stopping an instance left by an earlier run");
            if let Err(e) = self.ctx.local.stop(&name).await {
                tracing::warn!(app = %self.cfg.app, instance = %name, "{e}");
            }
        }
    }

    fn handle(&mut self, msg: Msg, now: Instant) -> Vec<Action> {
        match msg {
            Msg::Acquire(reply) if self.waiting.len() >= self.cfg.max_held => {
                self.ctx.metrics.ondemand_refused.fetch_add(1, Relaxed);
                let _ = reply.send(Err(Refused::Full(self.waiting.len())));
                vec![]
            }
            Msg::Acquire(reply) => {
                let until = now + Duration::from_secs(self.cfg.hold_secs);
                self.waiting.push_back(Held { reply, until });
                vec![]
            }
            Msg::Release(id) => self.scaler.handle(Event::Disconnected { now, id }),
            Msg::Unreachable(id, reason) => self.unreachable(id, reason, now),
            Msg::Swept(found) => self.swept(found, now),
            Msg::RollOver(new) => {
                tracing::info!(app = %self.cfg.app, release = new.manifest.release, "on-demand pool rolls over");
                self.image = *new;
                self.bursts = hosted::bursts(&self.ctx, &self.cfg, &self.image);
                let scale = self.cfg.scale(&self.image.manifest, self.bursts);
                self.scaler.reconfigure(scale);
                self.retire_remote();
                // Warm instances of the old release go; new ones are made.
                for w in std::mem::take(&mut self.warm) {
                    self.stop_domain(Location::Local, w.name);
                }
                self.warm_retry_at = None;
                self.scaler.handle(Event::Drain { now })
            }
            Msg::Warmed { name, release, res } => {
                self.warmed_up(name, release, res, now);
                vec![]
            }
            Msg::Started(boot) => self.started(*boot, now),
        }
    }

    /// A boot finished.
    fn started(&mut self, boot: Boot, now: Instant) -> Vec<Action> {
        let Boot {
            id,
            at,
            name,
            res,
            took,
        } = boot;
        // Not known: stopped while it booted (a drain, a roll-over).
        let known = self.insts.contains_key(&id);
        let booted = match res {
            Ok(booted) if known => booted,
            Ok(_) => {
                // Whatever came up goes too.
                self.stop_domain(at, name);
                return vec![];
            }
            Err(e) => {
                self.insts.remove(&id);
                tracing::warn!(app = %self.cfg.app, ?at, "on-demand instance failed to start: {e}");
                // A domain that failed its probe still runs: not left behind. (A host
                // not reached has none.)
                if !e.host_unreached() {
                    self.stop_domain(at, name);
                }
                // The host's own failure is said and backed off from even when the
                // instance is no longer wanted; a probe that saw the pool's own stop
                // (a drain during the boot) is not the host's.
                return match at {
                    Location::Remote if known || e.host_unreached() => {
                        self.hosted.set_down(&e);
                        let reason = e.to_string();
                        self.scaler
                            .handle(Event::RemoteUnavailable { now, id, reason })
                    }
                    Location::Local if known => self.scaler.handle(Event::Failed { now, id }),
                    _ => vec![],
                };
            }
        };
        let port = self.cfg.guest_port(&self.image.manifest);
        let Some(i) = self.insts.get_mut(&id) else {
            return vec![];
        };
        i.endpoint = Some(booted.endpoint(port));
        let ms = took.as_millis() as u64;
        self.ctx.metrics.ondemand_boots.fetch_add(1, Relaxed);
        self.ctx.metrics.ondemand_boot_ms.fetch_add(ms, Relaxed);
        self.counts.boots += 1;
        self.counts.boot_ms_total += ms;
        if i.at == Location::Remote {
            self.hosted.ready(id, now);
        }
        tracing::info!(app = %self.cfg.app, instance = %i.name, at = ?i.at, endpoint = %booted.endpoint(port), boot_ms = ms, "on-demand instance ready");
        self.scaler.handle(Event::Ready { now, id })
    }

    /// Held connections past their deadline are closed; the rest go to the instances the
    /// scaler picks (ready, room, least loaded, not draining). Then the load is sampled.
    fn assign(&mut self, now: Instant) -> Vec<Action> {
        self.waiting.retain(|w| !w.reply.is_closed());
        while self.waiting.front().is_some_and(|w| w.until <= now) {
            let w = self.waiting.pop_front().expect("front exists");
            self.ctx.metrics.ondemand_refused.fetch_add(1, Relaxed);
            let _ = w.reply.send(Err(Refused::Timeout(self.cfg.hold_secs)));
        }
        while !self.waiting.is_empty() {
            let Some(id) = self.scaler.pick() else { break };
            let Some(inst) = self.insts.get(&id) else {
                break;
            };
            let Some(endpoint) = inst.endpoint else {
                break;
            };
            let (cut, at) = (inst.cut.clone(), inst.at);
            let w = self.waiting.pop_front().expect("not empty");
            if w.reply.send(Ok(Assigned { id, endpoint, cut })).is_ok() {
                self.scaler.handle(Event::Connected { id });
                if at == Location::Remote {
                    self.hosted.connections += 1;
                }
            }
        }
        let waiting = self.waiting.len() as u32;
        let mut out = self.scaler.handle(Event::Load {
            now,
            connections: self.scaler.connections() + waiting,
            waiting,
        });
        out.extend(self.scaler.handle(Event::Tick { now }));
        out
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Start { id, at } => self.start(id, at),
            Action::Stop { id } => self.stop(id),
            Action::Cut { id, connections } => {
                if let Some(i) = self.insts.get(&id) {
                    tracing::warn!(app = %self.cfg.app, instance = %i.name, connections, "drained for {} s (drain_secs): closing its connections", self.cfg.drain_secs);
                    i.cut.cancel();
                }
                self.ctx
                    .metrics
                    .ondemand_cut
                    .fetch_add(u64::from(connections), Relaxed);
                self.stop(id);
            }
            Action::Report(text) => tracing::warn!(app = %self.cfg.app, "{text}"),
        }
    }

    fn hypervisor(&self, at: Location) -> Hypervisor {
        match (at, &self.ctx.remote) {
            (Location::Remote, Some(r)) => r.clone(),
            _ => self.ctx.local.clone(),
        }
    }

    /// The launch of an instance `name` of the current release at `at` (the accelerator
    /// measured here applies here only: the hosted host keeps its own default).
    fn launch(&self, name: String, at: Location) -> Launch {
        let boot = &self.image.manifest.boot;
        Launch {
            console_log: self.ctx.state_dir.join(format!("{name}.console.log")),
            name,
            of: crate::hypervisor::ReleaseOf::of(&self.image.manifest),
            platform: self.image.manifest.platform,
            image: self.image.slot.clone(),
            boot: boot.clone(),
            nic: match at {
                Location::Local => boot.network.then(|| self.ctx.nic.clone()).flatten(),
                Location::Remote => boot.network.then(|| self.ctx.remote_nic.clone()).flatten(),
            },
            domain_type: match at {
                Location::Local => self.image.domain_type.clone(),
                Location::Remote => None,
            },
        }
    }

    /// Boots instance `id` — or, local and with a warm one paused, resumes that.
    fn start(&mut self, id: InstanceId, at: Location) {
        self.ctx.metrics.ondemand_decisions.fetch_add(1, Relaxed);
        self.counts.decisions += 1;
        let (hv, tx) = (self.hypervisor(at), self.tx.clone());
        let warm = match at {
            Location::Local => self.warm.pop_front(),
            Location::Remote => None,
        };
        let name = match &warm {
            Some(w) => w.name.clone(),
            None => match at {
                Location::Local => format!("{}od{}", self.local_prefix(), id.0),
                // With this run's tag: a sweep's list made before this run started
                // anything names only earlier runs' domains, never one of this run's.
                Location::Remote => format!("{}{}-od{}", self.hosted_prefix(), self.run, id.0),
            },
        };
        let launch = self.launch(name.clone(), at);
        let cut = CancellationToken::new();
        let endpoint = None;
        self.insts.insert(
            id,
            Inst {
                at,
                name,
                endpoint,
                cut,
            },
        );
        let resumed = warm.is_some();
        tracing::info!(app = %self.cfg.app, instance = %launch.name, ?at, resumed, "starting on-demand instance");
        self.ctx.tasks.spawn(async move {
            let began = Instant::now();
            let res = match warm {
                Some(w) => resume(&hv, &launch, w).await,
                None => crate::probe::boot(&hv, &launch).await,
            };
            let took = began.elapsed();
            let boot = Boot {
                id,
                at,
                name: launch.name,
                res,
                took,
            };
            let _ = tx.send(Msg::Started(Box::new(boot))).await;
        });
    }

    /// Boots warm instances until `warm` are paused or booting (not after a failure
    /// until [`WARM_RETRY`] has passed).
    fn refill(&mut self, now: Instant) {
        if self.warm_retry_at.is_some_and(|at| now < at) {
            return;
        }
        while self.warm.len() as u32 + self.warming < self.cfg.warm {
            self.warmed += 1;
            self.warming += 1;
            let name = format!("{}w{}", self.local_prefix(), self.warmed);
            tracing::info!(app = %self.cfg.app, instance = %name, "booting a warm on-demand instance");
            let launch = self.launch(name.clone(), Location::Local);
            let release = self.image.manifest.release;
            let (hv, tx) = (self.ctx.local.clone(), self.tx.clone());
            self.ctx.tasks.spawn(async move {
                let res = match crate::probe::boot(&hv, &launch).await {
                    Ok(booted) => hv.pause(&name).await.map(|()| booted),
                    Err(e) => Err(e),
                };
                let _ = tx.send(Msg::Warmed { name, release, res }).await;
            });
        }
    }

    /// A warm boot finished: kept paused if it is of the current release.
    fn warmed_up(
        &mut self,
        name: String,
        release: u64,
        res: Result<Booted, ActivateError>,
        now: Instant,
    ) {
        self.warming = self.warming.saturating_sub(1);
        match res {
            Ok(booted) if release == self.image.manifest.release => {
                tracing::info!(app = %self.cfg.app, instance = %name, "warm on-demand instance paused, ready to resume");
                let since = Instant::now();
                self.warm.push_back(Warm {
                    name,
                    booted,
                    since,
                });
            }
            Ok(_) => self.stop_domain(Location::Local, name),
            // Of a release since rolled over: no reason to hold back the new one's.
            Err(_) if release != self.image.manifest.release => {
                self.stop_domain(Location::Local, name)
            }
            Err(e) => {
                tracing::warn!(app = %self.cfg.app, instance = %name, "warm on-demand instance failed to start: {e}; trying again in {} s", WARM_RETRY.as_secs());
                self.warm_retry_at = Some(now + WARM_RETRY);
                self.stop_domain(Location::Local, name);
            }
        }
    }

    fn stop(&mut self, id: InstanceId) {
        self.ctx.metrics.ondemand_decisions.fetch_add(1, Relaxed);
        self.counts.decisions += 1;
        let Some(i) = self.insts.remove(&id) else {
            return;
        };
        self.hosted.ended(id, Instant::now());
        tracing::info!(app = %self.cfg.app, instance = %i.name, at = ?i.at, "stopping on-demand instance");
        self.stop_domain(i.at, i.name);
    }

    /// Destroys the domain `name` in the background.
    fn stop_domain(&self, at: Location, name: String) {
        let (hv, app) = (self.hypervisor(at), self.cfg.app.clone());
        self.ctx.tasks.spawn(async move {
            let t = Instant::now();
            match hv.stop(&name).await {
                Ok(()) => {
                    tracing::info!(%app, instance = %name, stop_ms = t.elapsed().as_millis() as u64, "on-demand instance stopped")
                }
                Err(e) => tracing::warn!(%app, instance = %name, "stopping on-demand instance: {e}"),
            }
        });
    }

    /// Instance counts into metrics, and into the app's report when they changed.
    async fn publish_counts(&mut self) {
        let (l, r) = self.scaler.counts();
        self.ctx.metrics.ondemand_local.store(u64::from(l), Relaxed);
        self.ctx
            .metrics
            .ondemand_remote
            .store(u64::from(r), Relaxed);
        (self.counts.local, self.counts.remote) = (l, r);
        let hosted = self.hosted_use();
        // Instance time grows by the tick: it does not make a report, it is kept for the
        // next one (a resend, a heartbeat, another change).
        let key = |h: &Option<HostedUse>| h.as_ref().map(|h| (h.connections, h.down.clone()));
        let reporter = &self.ctx.reporter;
        if self.counts != self.reported.0 || key(&hosted) != key(&self.reported.1) {
            reporter
                .ondemand_changed(&self.cfg.app, self.counts, hosted.clone())
                .await;
            self.reported = (self.counts, hosted);
        } else if hosted.is_some() {
            reporter.ondemand_keep(&self.cfg.app, self.counts, hosted);
        }
    }
}
