//! The autoscaler for on-demand instances: a state machine with events in and actions out,
//! no I/O and no clock of its own (every event carries `now`), so it is tested with
//! synthetic time. The front proxy and the libvirt activator (issue 5) drive it.
//!
//! Model (after Knative's KPA): the desired instance count is the average concurrency over
//! a window divided by the target concurrency per instance. Two windows:
//! - **stable window** (default 30 s): the average that decides normal scaling, both ways;
//! - **panic window** (default 3 s): if the short average needs at least `panic_factor` ×
//!   the current capacity, the scaler panics: it scales up at once on the short average and
//!   does not scale down until a whole stable window has passed without a panic.
//!
//! - **held connections**: a connection the proxy holds because no instance has room is
//!   demand now, not a sample to average: enough instances for all held connections start
//!   at once (beyond those already booting), and that counts as a panic. (Knative's
//!   activator buffers requests the same way but still waits for the panic average.)
//!
//! Defaults against Knative's 60 s / 6 s: a unikernel here boots in ~0.1–0.3 s (a container
//! in seconds), so half the windows keep the same ratio (10:1) while following load twice
//! as fast; boards are small, so holding idle capacity for a whole minute is costlier than
//! on a cluster. Scale to zero after `idle` (default 30 s) without connections, if `min` is 0.
//!
//! Placement: local instances first, up to `max_local`; then remote (the hosted Xen URI) up
//! to `max_remote`, while the remote host is reachable. Scaling down removes remote
//! instances first, then local ones, never below `min`. Neither maximum is ever exceeded
//! (an instance draining still counts against it).
//!
//! Connections: the scaler knows each instance's open connections ([`Event::Connected`],
//! [`Event::Disconnected`]) and hands out the instance for the next one ([`Autoscaler::pick`]).
//! Scaling down never cuts a connection: it stops an idle instance if there is one, else
//! the least loaded one **drains** — it takes no new connections and is stopped when its
//! last one ends. A roll-over to a new release ([`Event::Drain`]) drains every instance.
//! Draining has a deadline (`drain`, default 30 s): then the instance's remaining
//! connections are cut and it is stopped ([`Action::Cut`]) — one long connection must not
//! keep an old instance (or release) alive for ever.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How far (in instances) below a smaller size the load must be before scaling down.
const DOWN_MARGIN: f64 = 0.5;

#[derive(Debug, Clone, PartialEq)]
pub struct ScaleConfig {
    pub min: u32,
    pub max_local: u32,
    pub max_remote: u32,
    /// Concurrent connections one instance should carry.
    pub target: f64,
    pub stable_window: Duration,
    pub panic_window: Duration,
    pub panic_factor: f64,
    pub idle: Duration,
    /// After the remote host failed, how long to wait before trying it again; doubled
    /// after each failure in a row, up to `remote_retry_max`.
    pub remote_retry: Duration,
    pub remote_retry_max: Duration,
    /// How long a draining instance keeps its connections before they are cut.
    pub drain: Duration,
}

impl Default for ScaleConfig {
    fn default() -> ScaleConfig {
        ScaleConfig {
            min: 0,
            max_local: 2,
            max_remote: 2,
            target: 1.0,
            stable_window: Duration::from_secs(30),
            panic_window: Duration::from_secs(3),
            panic_factor: 2.0,
            idle: Duration::from_secs(30),
            remote_retry: Duration::from_secs(5),
            remote_retry_max: Duration::from_secs(300),
            drain: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    Local,
    Remote,
}

/// Identifies an instance; issued by the scaler in [`Action::Start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(pub u64);

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Concurrent connections right now (the proxy samples this, e.g. every 100 ms, and on
    /// every new connection).
    Load {
        now: Instant,
        connections: u32,
        /// Of those, connections held without an instance (waiting for one to boot).
        waiting: u32,
    },
    Ready {
        now: Instant,
        id: InstanceId,
    },
    /// The instance failed its probe or died: it is gone.
    Failed {
        now: Instant,
        id: InstanceId,
    },
    /// A connection was handed to this instance (after [`Autoscaler::pick`]).
    Connected {
        id: InstanceId,
    },
    /// A connection to this instance ended.
    Disconnected {
        now: Instant,
        id: InstanceId,
    },
    /// Every instance drains (a new release: new connections go to new instances).
    Drain {
        now: Instant,
    },
    /// Starting on the remote host failed (unreachable, refused).
    RemoteUnavailable {
        now: Instant,
        id: InstanceId,
        reason: String,
    },
    Tick {
        now: Instant,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start {
        id: InstanceId,
        at: Location,
    },
    Stop {
        id: InstanceId,
    },
    /// The instance drained past the deadline: close its `connections` and stop it.
    Cut {
        id: InstanceId,
        connections: u32,
    },
    /// Something an operator should see (remote host unreachable, …).
    Report(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
}

#[derive(Debug, Clone)]
struct Instance {
    id: InstanceId,
    at: Location,
    phase: Phase,
    /// Connections open to it.
    conns: u32,
    /// Takes no new connections; stopped when `conns` reaches 0, or cut when the drain
    /// deadline passes: since when it drains.
    draining: Option<Instant>,
}

#[derive(Debug)]
pub struct Autoscaler {
    cfg: ScaleConfig,
    instances: Vec<Instance>,
    samples: VecDeque<(Instant, u32)>,
    next_id: u64,
    last_busy: Option<Instant>,
    panic_until: Option<Instant>,
    remote_down_until: Option<Instant>,
    /// Remote failures since the last remote instance became ready.
    remote_failures: u32,
    /// Held connections at the last load sample.
    waiting: u32,
}

impl Autoscaler {
    pub fn new(cfg: ScaleConfig) -> Autoscaler {
        Autoscaler {
            cfg,
            instances: vec![],
            samples: VecDeque::new(),
            next_id: 0,
            last_busy: None,
            panic_until: None,
            remote_down_until: None,
            remote_failures: 0,
            waiting: 0,
        }
    }

    /// New settings (a new release: its target, whether it may burst); instances keep
    /// running under them.
    pub fn reconfigure(&mut self, cfg: ScaleConfig) {
        self.cfg = cfg;
    }

    /// (local, remote) instances, starting, ready or draining: what runs.
    pub fn counts(&self) -> (u32, u32) {
        let n = |l| self.instances.iter().filter(|i| i.at == l).count() as u32;
        (n(Location::Local), n(Location::Remote))
    }

    /// Instances that will stay (not draining), by location.
    fn live(&self, at: Location) -> u32 {
        self.instances
            .iter()
            .filter(|i| i.at == at && i.draining.is_none())
            .count() as u32
    }

    /// Connections open to all instances.
    pub fn connections(&self) -> u32 {
        self.instances.iter().map(|i| i.conns).sum()
    }

    /// Connections open to `id`.
    pub fn connections_of(&self, id: InstanceId) -> u32 {
        self.instances
            .iter()
            .find(|i| i.id == id)
            .map_or(0, |i| i.conns)
    }

    /// The instance for the next connection: ready, not draining, below the target
    /// concurrency, least loaded, local first. `None`: hold the connection.
    pub fn pick(&self) -> Option<InstanceId> {
        let room = self.cfg.target.max(1.0).ceil() as u32;
        self.instances
            .iter()
            .filter(|i| i.phase == Phase::Ready && i.draining.is_none() && i.conns < room)
            .min_by_key(|i| (i.conns, i.at == Location::Remote, i.id))
            .map(|i| i.id)
    }

    pub fn in_panic(&self, now: Instant) -> bool {
        self.panic_until.is_some_and(|t| now < t)
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Load {
                now,
                connections,
                waiting,
            } => {
                self.samples.push_back((now, connections));
                self.waiting = waiting;
                if connections > 0 {
                    self.last_busy = Some(now);
                }
                self.trim(now);
                // A held connection must not wait for the next tick, nor for the averages.
                if waiting > 0 {
                    return self.scale(now);
                }
                vec![]
            }
            Event::Ready { id, .. } => {
                if let Some(i) = self.instances.iter_mut().find(|i| i.id == id) {
                    i.phase = Phase::Ready;
                    if i.at == Location::Remote {
                        self.remote_failures = 0;
                    }
                }
                vec![]
            }
            Event::Failed { now, id } => {
                self.instances.retain(|i| i.id != id);
                // Replace it if it is still needed.
                self.scale(now)
            }
            Event::Connected { id } => {
                if let Some(i) = self.instances.iter_mut().find(|i| i.id == id) {
                    i.conns += 1;
                }
                vec![]
            }
            Event::Disconnected { now, id } => self.disconnected(now, id),
            Event::Drain { now } => self.drain(now),
            Event::RemoteUnavailable { now, id, reason } => {
                self.instances.retain(|i| i.id != id);
                let wait = self.remote_backoff();
                self.remote_failures = self.remote_failures.saturating_add(1);
                self.remote_down_until = Some(now + wait);
                let mut out = vec![Action::Report(format!(
                    "hosted host unavailable ({reason}); serving locally only for {}",
                    proto::status::human_secs(wait.as_secs())
                ))];
                out.extend(self.scale(now));
                out
            }
            Event::Tick { now } => {
                self.trim(now);
                let mut out = self.cut_overdue(now);
                out.extend(self.scale(now));
                out
            }
        }
    }

    /// A connection to `id` ended: a draining instance with none left stops.
    fn disconnected(&mut self, now: Instant, id: InstanceId) -> Vec<Action> {
        let Some(pos) = self.instances.iter().position(|i| i.id == id) else {
            return vec![];
        };
        let i = &mut self.instances[pos];
        i.conns = i.conns.saturating_sub(1);
        if i.draining.is_some() && i.conns == 0 {
            self.instances.remove(pos);
            let mut out = vec![Action::Stop { id }];
            out.extend(self.scale(now));
            return out;
        }
        vec![]
    }

    /// Every instance drains; idle ones stop at once.
    fn drain(&mut self, now: Instant) -> Vec<Action> {
        let mut out = vec![];
        for i in &mut self.instances {
            i.draining.get_or_insert(now);
        }
        self.instances.retain(|i| {
            let idle = i.conns == 0;
            if idle {
                out.push(Action::Stop { id: i.id });
            }
            !idle
        });
        out.extend(self.scale(now));
        out
    }

    fn trim(&mut self, now: Instant) {
        let keep = self.cfg.stable_window.max(self.cfg.panic_window);
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > keep)
        {
            self.samples.pop_front();
        }
    }

    fn average(&self, now: Instant, window: Duration) -> f64 {
        let in_window: Vec<u32> = self
            .samples
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= window)
            .map(|(_, c)| *c)
            .collect();
        if in_window.is_empty() {
            return 0.0;
        }
        in_window.iter().map(|c| f64::from(*c)).sum::<f64>() / in_window.len() as f64
    }

    /// How long the remote host is left alone after this failure: doubled per failure
    /// in a row.
    fn remote_backoff(&self) -> Duration {
        let doubled = self
            .cfg
            .remote_retry
            .saturating_mul(1 << self.remote_failures.min(16));
        doubled.min(self.cfg.remote_retry_max)
    }

    fn remote_usable(&self, now: Instant) -> bool {
        self.remote_down_until.is_none_or(|t| now >= t)
    }

    /// The instance count the load asks for, before limits.
    fn desired(&mut self, now: Instant) -> u32 {
        let current = self
            .instances
            .iter()
            .filter(|i| i.draining.is_none())
            .count() as u32;
        let stable = self.average(now, self.cfg.stable_window);
        let panic = self.average(now, self.cfg.panic_window);
        let need = |avg: f64| (avg / self.cfg.target).ceil() as u32;
        let capacity = f64::from(current) * self.cfg.target;
        if panic > 0.0
            && panic >= self.cfg.panic_factor * capacity.max(self.cfg.target)
            && need(panic) > current
        {
            self.panic_until = Some(now + self.cfg.stable_window);
        }
        let mut want = need(stable);
        if want < current && stable > 0.0 {
            // Hysteresis: scaling down needs the load to sit half an instance below the
            // smaller size, so a load hovering at a boundary does not flap.
            want = need(stable + DOWN_MARGIN * self.cfg.target).min(current);
        }
        // Held connections are demand now, not an average: enough instances for them start
        // at once (beyond those already booting), and that counts as a panic, so nothing is
        // scaled down for a stable window.
        let starting = self
            .instances
            .iter()
            .filter(|i| i.phase == Phase::Starting && i.draining.is_none())
            .count() as u32;
        let for_held = need(f64::from(self.waiting));
        if for_held > starting {
            want = want.max(current - starting + for_held);
            self.panic_until = Some(now + self.cfg.stable_window);
        }
        if self.in_panic(now) {
            // Up on the short window; never down while panicking.
            want = want.max(need(panic)).max(current);
        }
        let idle = self
            .last_busy
            .is_none_or(|t| now.duration_since(t) >= self.cfg.idle);
        if want == 0 && !idle {
            // Load stopped only recently: keep one until the idle time has passed.
            want = 1;
        }
        want.max(self.cfg.min)
    }

    fn scale(&mut self, now: Instant) -> Vec<Action> {
        let want = self.desired(now);
        let remote_ok = self.remote_usable(now);
        // Draining instances still run: they count against the maxima.
        let (all_local, all_remote) = self.counts();
        let (local, remote) = (self.live(Location::Local), self.live(Location::Remote));
        let room_local = self.cfg.max_local - (all_local - local).min(self.cfg.max_local);
        let room_remote = self.cfg.max_remote - (all_remote - remote).min(self.cfg.max_remote);
        let want_local = want.min(self.cfg.max_local);
        let want_remote = if remote_ok {
            (want - want_local).min(self.cfg.max_remote)
        } else {
            0
        };
        let mut out = vec![];
        for _ in local..want_local.min(room_local) {
            out.push(self.start(Location::Local));
        }
        for _ in remote..want_remote.min(room_remote) {
            out.push(self.start(Location::Remote));
        }
        // Down: remote first, then local; an idle instance is stopped, else the least
        // loaded drains (never a live connection cut).
        for (at, have, keep) in [
            (Location::Remote, remote, want_remote),
            (Location::Local, local, want_local),
        ] {
            for _ in keep..have {
                let victim = self
                    .instances
                    .iter()
                    .enumerate()
                    .filter(|(_, i)| i.at == at && i.draining.is_none())
                    .min_by_key(|(_, i)| (i.conns, std::cmp::Reverse(i.id)))
                    .map(|(pos, _)| pos);
                let Some(pos) = victim else { break };
                if self.instances[pos].conns == 0 {
                    let gone = self.instances.remove(pos);
                    out.push(Action::Stop { id: gone.id });
                } else {
                    self.instances[pos].draining = Some(now);
                }
            }
        }
        out
    }

    /// Draining instances past the deadline: removed, to be cut and stopped.
    fn cut_overdue(&mut self, now: Instant) -> Vec<Action> {
        let drain = self.cfg.drain;
        let overdue = |i: &Instance| {
            i.draining
                .is_some_and(|t| now.saturating_duration_since(t) >= drain)
        };
        let cut = self
            .instances
            .iter()
            .filter(|i| overdue(i))
            .map(|i| Action::Cut {
                id: i.id,
                connections: i.conns,
            })
            .collect();
        self.instances.retain(|i| !overdue(i));
        cut
    }

    fn start(&mut self, at: Location) -> Action {
        self.next_id += 1;
        let id = InstanceId(self.next_id);
        self.instances.push(Instance {
            id,
            at,
            phase: Phase::Starting,
            conns: 0,
            draining: None,
        });
        Action::Start { id, at }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts(actions: &[Action], at: Location) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Start { at: l, .. } if *l == at))
            .count()
    }

    fn remote_starts(actions: &[Action]) -> Vec<InstanceId> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start {
                    id,
                    at: Location::Remote,
                } => Some(*id),
                _ => None,
            })
            .collect()
    }

    fn stops(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Stop { .. }))
            .count()
    }

    /// Feeds `connections` every 100 ms for `dur`, ticking each time; returns all actions.
    fn drive(a: &mut Autoscaler, t: &mut Instant, dur: Duration, connections: u32) -> Vec<Action> {
        let mut out = vec![];
        let end = *t + dur;
        while *t < end {
            *t += Duration::from_millis(100);
            out.extend(a.handle(Event::Load {
                now: *t,
                connections,
                waiting: 0,
            }));
            out.extend(a.handle(Event::Tick { now: *t }));
            // Everything started becomes ready at once in these tests.
            for act in out.clone() {
                if let Action::Start { id, .. } = act {
                    a.handle(Event::Ready { now: *t, id });
                }
            }
        }
        out
    }

    #[test]
    fn held_connections_start_instances_at_once_and_only_once() {
        let cfg = ScaleConfig {
            max_local: 2,
            max_remote: 2,
            ..ScaleConfig::default()
        };
        let mut a = Autoscaler::new(cfg);
        let t = Instant::now();
        let first = a.handle(Event::Load {
            now: t,
            connections: 1,
            waiting: 1,
        });
        let Some(Action::Start { id, .. }) = first.first().cloned() else {
            panic!("{first:?}")
        };
        a.handle(Event::Ready { now: t, id });
        // A burst: one busy instance, three more connections held. The averages still
        // say ~1; the held connections start three instances now, not one per window.
        let t = t + Duration::from_millis(100);
        let burst = a.handle(Event::Load {
            now: t,
            connections: 4,
            waiting: 3,
        });
        let starts = |v: &[Action]| {
            v.iter()
                .filter(|x| matches!(x, Action::Start { .. }))
                .count()
        };
        assert_eq!(starts(&burst), 3, "{burst:?}");
        assert_eq!(a.counts(), (2, 2));
        // While they boot, the same held connections start nothing more, and nothing stops.
        let t = t + Duration::from_millis(100);
        let again = a.handle(Event::Load {
            now: t,
            connections: 4,
            waiting: 3,
        });
        assert!(again.is_empty(), "{again:?}");
        assert!(a.handle(Event::Tick { now: t }).is_empty());
    }

    #[test]
    fn first_connection_starts_one_immediately() {
        let mut a = Autoscaler::new(ScaleConfig::default());
        let t = Instant::now();
        let out = a.handle(Event::Load {
            now: t,
            connections: 1,
            waiting: 1,
        });
        assert_eq!(
            out,
            vec![Action::Start {
                id: InstanceId(1),
                at: Location::Local
            }]
        );
        assert_eq!(a.counts(), (1, 0));
    }

    #[test]
    fn grows_local_then_remote_and_never_exceeds_maxima() {
        let mut a = Autoscaler::new(ScaleConfig::default());
        let mut t = Instant::now();
        let out = drive(&mut a, &mut t, Duration::from_secs(5), 10);
        assert_eq!(a.counts(), (2, 2), "capped at max_local and max_remote");
        assert_eq!(starts(&out, Location::Local), 2);
        assert_eq!(starts(&out, Location::Remote), 2);
        drive(&mut a, &mut t, Duration::from_secs(60), 50);
        assert_eq!(a.counts(), (2, 2));
    }

    #[test]
    fn panic_window_reacts_before_the_stable_window_would() {
        let mut a = Autoscaler::new(ScaleConfig {
            max_local: 8,
            ..ScaleConfig::default()
        });
        let mut t = Instant::now();
        drive(&mut a, &mut t, Duration::from_secs(30), 1);
        assert_eq!(a.counts(), (1, 0));
        let before = a.counts().0;
        // A burst: the 30 s average barely moves in 1 s, the 3 s one does.
        drive(&mut a, &mut t, Duration::from_secs(1), 12);
        assert!(a.in_panic(t));
        assert!(a.counts().0 >= 2 * before, "{before} -> {:?}", a.counts());
    }

    #[test]
    fn no_scale_down_while_panicking() {
        let mut a = Autoscaler::new(ScaleConfig {
            max_local: 8,
            ..ScaleConfig::default()
        });
        let mut t = Instant::now();
        drive(&mut a, &mut t, Duration::from_secs(2), 6);
        let peak = a.counts().0;
        let out = drive(&mut a, &mut t, Duration::from_secs(10), 1);
        assert_eq!(stops(&out), 0, "flapping down during panic");
        assert_eq!(a.counts().0, peak);
    }

    #[test]
    fn scales_down_remote_first_then_local_to_zero_after_idle() {
        let cfg = ScaleConfig::default();
        let mut a = Autoscaler::new(cfg.clone());
        let mut t = Instant::now();
        drive(&mut a, &mut t, Duration::from_secs(5), 10);
        assert_eq!(a.counts(), (2, 2));
        let at: std::collections::HashMap<InstanceId, Location> =
            a.instances.iter().map(|i| (i.id, i.at)).collect();
        let mut order = vec![];
        let mut zero_at = None;
        let start = t;
        for _ in 0..1000 {
            t += Duration::from_millis(100);
            a.handle(Event::Load {
                now: t,
                connections: 0,
                waiting: 0,
            });
            for act in a.handle(Event::Tick { now: t }) {
                if let Action::Stop { id } = act {
                    order.push(at[&id]);
                }
            }
            if a.counts() == (0, 0) {
                zero_at = Some(t);
                break;
            }
        }
        // Remote instances went first.
        assert_eq!(
            order,
            vec![
                Location::Remote,
                Location::Remote,
                Location::Local,
                Location::Local
            ]
        );
        let took = zero_at.expect("reached zero").duration_since(start);
        // Zero once the stable window has no load and the idle time passed (both 30 s).
        assert!(
            took >= cfg.idle && took <= cfg.idle + cfg.stable_window + Duration::from_secs(1),
            "{took:?}"
        );
    }

    #[test]
    fn min_instances_are_kept() {
        let mut a = Autoscaler::new(ScaleConfig {
            min: 1,
            ..ScaleConfig::default()
        });
        let mut t = Instant::now();
        drive(&mut a, &mut t, Duration::from_secs(120), 0);
        assert_eq!(a.counts(), (1, 0));
    }

    #[test]
    fn failed_instance_is_replaced() {
        let mut a = Autoscaler::new(ScaleConfig::default());
        let mut t = Instant::now();
        drive(&mut a, &mut t, Duration::from_secs(2), 1);
        let id = a.pick().expect("a ready instance");
        let out = a.handle(Event::Failed { now: t, id });
        assert_eq!(starts(&out, Location::Local), 1, "{out:?}");
        assert_eq!(a.counts(), (1, 0));
    }

    #[test]
    fn unreachable_remote_keeps_local_serving_and_is_reported() {
        let mut a = Autoscaler::new(ScaleConfig::default());
        let mut t = Instant::now();
        let out = drive(&mut a, &mut t, Duration::from_secs(3), 4);
        let remote = remote_starts(&out);
        assert_eq!(remote.len(), 2);
        let out = a.handle(Event::RemoteUnavailable {
            now: t,
            id: remote[0],
            reason: "connection refused".into(),
        });
        assert!(
            matches!(&out[0], Action::Report(r) if r.contains("connection refused")),
            "{out:?}"
        );
        // No new remote instance while the host is down; local ones keep serving.
        let out = drive(&mut a, &mut t, Duration::from_secs(4), 4);
        assert_eq!(starts(&out, Location::Remote), 0);
        assert_eq!(a.counts().0, 2);
        assert!(a.pick().is_some(), "a local instance takes connections");
    }

    /// The hosted host is tried again after 5 s, 10 s, 20 s … (failures in a row), at
    /// most every 5 minutes; a remote instance that becomes ready starts the count again.
    #[test]
    fn the_hosted_host_is_retried_with_backoff() {
        let mut a = Autoscaler::new(ScaleConfig::default());
        let waits: Vec<Duration> = (0..10)
            .map(|k| {
                let wait = a.remote_backoff();
                a.handle(Event::RemoteUnavailable {
                    now: Instant::now(),
                    id: InstanceId(k),
                    reason: "link down".into(),
                });
                wait
            })
            .collect();
        let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300, 300]);
        let mut t = Instant::now() + Duration::from_secs(301);
        let out = drive(&mut a, &mut t, Duration::from_secs(3), 4);
        let id = *remote_starts(&out)
            .first()
            .expect("the hosted host is tried again once the wait is over");
        a.handle(Event::Ready { now: t, id });
        assert_eq!(a.remote_backoff(), Duration::from_secs(5));
    }

    #[test]
    fn oscillating_load_does_not_flap() {
        let mut a = Autoscaler::new(ScaleConfig {
            max_local: 8,
            ..ScaleConfig::default()
        });
        let mut t = Instant::now();
        drive(&mut a, &mut t, Duration::from_secs(30), 2);
        let mut changes = 0;
        for k in 0..600 {
            let out = drive(
                &mut a,
                &mut t,
                Duration::from_millis(100),
                if k % 2 == 0 { 1 } else { 3 },
            );
            changes += out
                .iter()
                .filter(|a| matches!(a, Action::Start { .. } | Action::Stop { .. }))
                .count();
        }
        assert!(
            changes <= 1,
            "{changes} start/stop actions for a load that averages 2"
        );
    }

    /// Starts `conns.len()` ready local instances and leaves `conns[i]` (0 or 1)
    /// connections open on the i-th (oldest first).
    fn busy(conns: &[u32]) -> (Autoscaler, Instant, Vec<InstanceId>) {
        let n = conns.len() as u32;
        let mut a = Autoscaler::new(ScaleConfig {
            max_local: n,
            max_remote: 0,
            ..ScaleConfig::default()
        });
        let mut t = Instant::now();
        drive(&mut a, &mut t, Duration::from_secs(5), n);
        assert_eq!(a.counts(), (n, 0));
        let mut ids = vec![];
        while let Some(id) = a.pick() {
            a.handle(Event::Connected { id });
            ids.push(id);
        }
        ids.sort();
        for (id, c) in ids.iter().zip(conns) {
            if *c == 0 {
                a.handle(Event::Disconnected { now: t, id: *id });
            }
        }
        (a, t, ids)
    }

    #[test]
    fn scale_down_stops_an_idle_instance_not_the_one_with_a_connection() {
        // The newest instance holds the live connection: the old rule (newest first) cut it.
        let (mut a, mut t, ids) = busy(&[0, 0, 1]);
        // Load 1: from 3 down to 2 (hysteresis keeps 2 for now).
        let out = drive(&mut a, &mut t, Duration::from_secs(40), 1);
        let stopped: Vec<_> = out
            .iter()
            .filter(|x| matches!(x, Action::Stop { .. }))
            .collect();
        assert_eq!(stopped, [&Action::Stop { id: ids[1] }], "{out:?}");
        assert_eq!(a.connections(), 1);
    }

    #[test]
    fn a_busy_instance_drains_and_stops_when_its_last_connection_ends() {
        let (mut a, mut t, ids) = busy(&[1, 1, 1]);
        let out = drive(&mut a, &mut t, Duration::from_secs(40), 1);
        assert_eq!(stops(&out), 0, "no connection is cut: {out:?}");
        assert_eq!(a.counts(), (3, 0), "the draining one still runs");
        // The newest drains: when its connection ends it stops, and takes nothing new.
        let out = a.handle(Event::Disconnected { now: t, id: ids[2] });
        assert_eq!(out, [Action::Stop { id: ids[2] }], "stopped when idle");
        assert_eq!(a.counts(), (2, 0));
        a.handle(Event::Disconnected { now: t, id: ids[0] });
        assert_eq!(
            a.pick(),
            Some(ids[0]),
            "the ones that stay take connections"
        );
    }

    /// One long connection kept an instance of an old release running for ever.
    #[test]
    fn a_draining_instance_is_cut_at_the_drain_deadline() {
        let (mut a, t, ids) = busy(&[0, 1]);
        let busy = ids[1];
        a.handle(Event::Drain { now: t });
        let drain = ScaleConfig::default().drain;
        let before = a.handle(Event::Tick {
            now: t + drain - Duration::from_millis(1),
        });
        assert!(
            !before.iter().any(|x| matches!(x, Action::Cut { .. })),
            "{before:?}"
        );
        let out = a.handle(Event::Tick { now: t + drain });
        assert!(
            out.contains(&Action::Cut {
                id: busy,
                connections: 1
            }),
            "{out:?}"
        );
        assert!(
            !a.instances.iter().any(|i| i.id == busy),
            "gone from the table"
        );
        // Its connections' ends after the cut change nothing.
        assert_eq!(
            a.handle(Event::Disconnected {
                now: t + drain,
                id: busy
            }),
            []
        );
    }

    #[test]
    fn roll_over_drains_every_instance_and_busy_ones_stop_when_done() {
        let (mut a, t, ids) = busy(&[0, 1]);
        let (idle, busy) = (ids[0], ids[1]);
        let out = a.handle(Event::Drain { now: t });
        assert!(out.contains(&Action::Stop { id: idle }), "{out:?}");
        assert!(!out.contains(&Action::Stop { id: busy }), "{out:?}");
        // Instances of the new release start within the maxima: the busy, draining one
        // still counts, so only one starts.
        assert_eq!(starts(&out, Location::Local), 1, "{out:?}");
        assert_eq!(a.counts(), (2, 0));
        assert_ne!(a.pick(), Some(busy), "draining: no new connections");
        let out = a.handle(Event::Disconnected { now: t, id: busy });
        assert!(out.contains(&Action::Stop { id: busy }), "{out:?}");
    }

    #[test]
    fn pick_prefers_the_least_loaded_local_instance() {
        let mut a = Autoscaler::new(ScaleConfig {
            max_local: 2,
            max_remote: 1,
            target: 2.0,
            ..ScaleConfig::default()
        });
        let mut t = Instant::now();
        drive(&mut a, &mut t, Duration::from_secs(3), 6);
        let first = a.pick().unwrap();
        a.handle(Event::Connected { id: first });
        let second = a.pick().unwrap();
        assert_ne!(first, second, "least loaded first");
        a.handle(Event::Connected { id: second });
        for _ in 0..4 {
            let id = a.pick().unwrap();
            a.handle(Event::Connected { id });
        }
        assert_eq!(a.pick(), None, "every instance at its target");
        assert_eq!(a.connections(), 6);
    }
}
