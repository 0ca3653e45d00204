//! The fleet simulator: the hub's tracker (`hub::tracker`) and every device's fetch
//! schedule (`device::schedule`) — the code the hub and the agents run — driven by
//! simulated time over modelled links. Single-threaded and deterministic: the same
//! [`Scenario`] gives the same [`Outcome`], whatever the machine is doing, so a change to
//! the protocol is measured by counting, not by timing a noisy fleet of processes.
//!
//! Modelled: each device's and the hub's upload and download as token buckets
//! (`net::ratelimit::Bucket`, the agents' own), a one-way latency per message, the
//! device's limits on concurrent uploads and its "busy" rule, the hub's 250 ms tick for
//! parked askers, connections opened between devices and closed after the idle timeout,
//! slow devices (a tenth of the rates), devices leaving and joining mid-release, devices
//! that freeze (connections open, nothing answered: the hub is not told) and devices
//! whose upload crawls at 1 KiB/s, with each device's deadline on the peers it asks. Not
//! modelled: CPU (the real bench's limit on two cores), TCP slow start, NAT (everyone
//! reaches everyone), losses other than a departed peer.

use device::fetch::SplitMix64;
use device::schedule::{BlobFetch, HubAnswer, Miss, Reports, Sources, Step, Took};
use hub::tracker::{self, Decision, Tracker};
use net::ratelimit::{Bucket, BUSY_BACKLOG};
use net::Want;
use proto::Digest;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The agent's limit on uploads at once (`device::agent`).
const MAX_SEEDING: usize = 16;
/// How often the hub answers parked askers (`hub::serve`).
const HUB_TICK: Duration = Duration::from_millis(250);
/// How long asking a departed peer takes to fail.
const DIAL_FAIL: Duration = Duration::from_secs(1);
/// Size of the signed manifest, fetched before the chunks.
const MANIFEST: u64 = 1_200;
/// Upload of a crawling device ([`Scenario::crawling`]).
const CRAWL: u64 = 1024;

/// A fleet, its links and its release.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub devices: usize,
    /// Image bytes (chunked with the real FastCDC parameters).
    pub image: u64,
    /// Bytes per second.
    pub device_up: u64,
    pub device_down: u64,
    pub hub_up: u64,
    /// Chunks a device fetches at once.
    pub parallel: usize,
    /// One way, every message.
    pub latency: Duration,
    /// Fraction of devices at a tenth of the device rates.
    pub slow: f64,
    /// Fraction of devices that leave during the release, and as many that join.
    pub churn: f64,
    /// Fraction of devices that freeze for good at a random time within the bound: their
    /// connections stay open, they answer nothing, and the hub is not told.
    pub frozen: f64,
    /// Fraction of devices whose upload crawls at 1 KiB/s (download as the others).
    pub crawling: f64,
    /// Peer exchange; off: every device from the hub.
    pub mesh: bool,
    pub idle_timeout: Duration,
    pub seed: u64,
}

impl Scenario {
    /// The real bench's defaults (`bench_fleet`): devices share 48 MiB/s of upload,
    /// download 4 × upload, hub 16 MiB/s, 8 chunks in flight.
    pub fn new(devices: usize, image: u64) -> Scenario {
        let up = 48 * (1 << 20) / devices as u64;
        Scenario {
            devices,
            image,
            device_up: up,
            device_down: 4 * up,
            hub_up: 16 << 20,
            parallel: 8,
            latency: Duration::from_millis(10),
            slow: 0.0,
            churn: 0.0,
            frozen: 0.0,
            crawling: 0.0,
            mesh: true,
            idle_timeout: net::IDLE_TIMEOUT,
            seed: 1,
        }
    }

    fn rates(&self, slow: bool) -> (u64, u64) {
        let k = if slow { 10 } else { 1 };
        (self.device_up / k, self.device_down / k)
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Seconds from each finishing device's start (the announcement, or its joining).
    pub completion: Vec<f64>,
    /// Kumar and Ross's bound for the devices present at the start, and the bound when
    /// the hub sends one copy.
    pub t_min: f64,
    pub t_one_copy: f64,
    pub image: u64,
    pub chunks: usize,
    pub hub_egress: u64,
    /// Requests (each a request and its answer, on a stream of its own) by kind.
    pub hub_asks: u64,
    pub peer_asks: u64,
    /// "Stored" reports sent alone; those riding on an ask to the hub are `carried`.
    pub stored_reports: u64,
    pub carried: u64,
    /// Answers naming holders, and answers saying "none free yet".
    pub redirects: u64,
    pub waits: u64,
    /// Connections opened between devices.
    pub connections: u64,
    /// Chunks (and manifests) stored by devices.
    pub delivered: u64,
    /// Devices that left before they finished, and devices that joined mid-release.
    pub left: usize,
    pub joined: usize,
    /// Devices frozen before they finished.
    pub frozen: usize,
    /// Asks to a peer that missed the asker's deadline.
    pub deadlines_missed: u64,
    /// Seconds from ask to answer of each blob a peer delivered.
    pub peer_secs: Vec<f64>,
    /// Devices still fetching when the simulation ran out of events (should be 0).
    pub unfinished: usize,
    /// Blobs given up after the schedule's stall limit (should be 0).
    pub stalled: u64,
    pub events: u64,
    /// Per simulated second: bytes the devices uploaded, as a fraction of their caps'
    /// sum, and the askers parked at the hub at its end.
    pub timeline: Vec<(f64, u64)>,
}

impl Outcome {
    pub fn last(&self) -> f64 {
        self.completion.iter().copied().fold(0.0, f64::max)
    }

    pub fn requests(&self) -> u64 {
        self.hub_asks + self.peer_asks + self.stored_reports
    }

    /// Requests per chunk stored.
    pub fn requests_per_chunk(&self) -> f64 {
        self.requests() as f64 / self.delivered.max(1) as f64
    }

    pub fn connections_per_chunk(&self) -> f64 {
        self.connections as f64 / self.delivered.max(1) as f64
    }

    pub fn egress_copies(&self) -> f64 {
        self.hub_egress as f64 / self.image as f64
    }
}

type Dev = u32;
/// 0: the manifest; 1..: the chunks.
type Blob = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Hub,
    Peer(Dev),
}

#[derive(Debug, Clone)]
enum Ev {
    /// The device learns of the release (at the start, or when it joins).
    Announce(Dev),
    /// Leaves, for good.
    Leave(Dev),
    /// Its fetch of the blob begins.
    Begin(Dev, Blob),
    /// Its fetch of the blob asks again (after a sleep).
    Ask(Dev, Blob),
    /// A request reaches the hub.
    AtHub(Dev, Blob, Want),
    /// The hub's answer reaches the device (`None`: busy or refused).
    FromHub(Dev, Blob, Option<Answer>),
    /// The device's ask number `u64` of this blob reaches a peer (or the hub asked as a
    /// connected peer).
    AtPeer(Dev, Blob, u64, Target),
    /// The peer's answer to the device's ask number `u64` of this blob reaches it.
    FromPeer(Dev, Blob, u64, Result<(), Miss>),
    /// The deadline of the device's ask number `u64` of this blob.
    Deadline(Dev, Blob, u64),
    /// Freezes, for good.
    Freeze(Dev),
    /// The bytes passed the device's download cap: stored.
    Got(Dev, Blob),
    /// The device's "stored" report, sent alone, reaches the hub.
    Report(Dev, Digest),
    /// An upload's last byte left the device.
    Sent(Dev),
    HubTick,
}

#[derive(Debug, Clone)]
enum Answer {
    Blob,
    Peers(Vec<Dev>),
}

/// An event and when it happens; events at the same time in the order they were made.
#[derive(Debug)]
struct Queued {
    at: Duration,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// What a device's fetch of one blob is waiting for.
#[derive(Debug)]
struct Fetching {
    fetch: BlobFetch,
    /// Named or connected peers still to ask, and why the asked ones missed.
    queue: VecDeque<Target>,
    misses: Vec<(Dev, Miss)>,
    /// Asks to peers so far (an answer to an earlier one comes too late), and when the
    /// last was sent.
    asks: u64,
    asked_at: Duration,
    /// Whom the last ask went to.
    target: Option<Target>,
    /// From the last ask to its answer.
    took: Duration,
    /// Asking peers the hub named (else connected peers, the hub silent).
    named: bool,
    /// Delivered by the hub as asked directly (not as a connected peer).
    from_hub: bool,
}

#[derive(Debug)]
struct Device {
    up: Bucket,
    down: Bucket,
    sources: Sources<Dev>,
    has: Vec<bool>,
    /// Chunks not yet begun, in this device's order.
    pending: VecDeque<Blob>,
    /// Its chunks' "stored" reports, waiting to ride on its next asks.
    reports: Reports,
    fetching: HashMap<Blob, Fetching>,
    seeding: usize,
    start: Option<Duration>,
    done: bool,
    gone: bool,
    frozen: bool,
}

struct Sim<'a> {
    s: &'a Scenario,
    base: Instant,
    now: Duration,
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    sizes: Vec<u64>,
    digests: Vec<Digest>,
    devices: Vec<Device>,
    tracker: Tracker<Dev, (Dev, Blob)>,
    hub_up: Bucket,
    /// Open connections between devices: when last used.
    links: HashMap<(Dev, Dev), Duration>,
    out: Outcome,
    /// Devices that will still finish (not gone, not done).
    active: usize,
    /// Bytes devices uploaded in the current simulated second.
    uploaded: u64,
    sum_up: u64,
}

/// Chunk sizes of a pseudo-random image of `bytes` under the real chunker.
fn chunk_sizes(bytes: u64, seed: u64) -> Vec<u64> {
    let mut rng = SplitMix64(seed);
    let data: Vec<u8> = (0..bytes).map(|_| rng.next_u64() as u8).collect();
    proto::chunking::boundaries(&data)
        .map(|(_, len)| len)
        .collect()
}

/// Runs the scenario to the end (every device present has the release, or has left).
pub fn run(s: &Scenario) -> Outcome {
    let mut sim = Sim::new(s);
    while let Some(Reverse(Queued { at, ev, .. })) = sim.queue.pop() {
        sim.now = at;
        sim.out.events += 1;
        sim.handle(ev);
        if sim.active == 0 {
            break;
        }
    }
    sim.out.unfinished = sim.active;
    sim.out
}

impl<'a> Sim<'a> {
    fn new(s: &'a Scenario) -> Sim<'a> {
        let base = Instant::now();
        let chunk_sizes = chunk_sizes(s.image, s.seed);
        let mut sizes = vec![MANIFEST];
        sizes.extend(&chunk_sizes);
        let digests = (0..sizes.len())
            .map(|i| Digest::of(format!("sim {} blob {i}", s.seed).as_bytes()))
            .collect();
        let mut rng = SplitMix64(s.seed ^ 0x5eed);
        let churn = (s.devices as f64 * s.churn).round() as usize;
        let total = s.devices + churn;
        let mut devices = Vec::with_capacity(total);
        // Drawn apart from the rates, so adding a kind of device leaves the others' draws.
        let mut kinds = SplitMix64(s.seed ^ 0xc4a1);
        for i in 0..total {
            let (mut up, down) = s.rates(rng.unit() < s.slow);
            if kinds.unit() < s.crawling {
                up = CRAWL;
            }
            let mut order: Vec<Blob> = (1..sizes.len()).collect();
            device::fetch::shuffle(&mut order, &(i as u32).to_be_bytes());
            devices.push(Device {
                up: Bucket::new(up, base),
                down: Bucket::new(down, base),
                sources: Sources::default(),
                has: vec![false; sizes.len()],
                reports: Reports::new(order.len()),
                pending: order.into(),
                fetching: HashMap::new(),
                seeding: 0,
                start: None,
                done: false,
                gone: false,
                frozen: false,
            });
        }
        let mut sim = Sim {
            s,
            base,
            now: Duration::ZERO,
            queue: BinaryHeap::new(),
            seq: 0,
            sizes,
            digests,
            devices,
            tracker: Tracker::new(4_096),
            hub_up: Bucket::new(s.hub_up, base),
            links: HashMap::new(),
            out: Outcome {
                image: s.image,
                chunks: chunk_sizes.len(),
                joined: churn,
                ..Outcome::default()
            },
            active: total,
            uploaded: 0,
            sum_up: 0,
        };
        sim.sum_up = (0..total).map(|i| sim.rate_up(i as Dev)).sum();
        (sim.out.t_min, sim.out.t_one_copy) = sim.bounds();
        let window = sim.out.t_min.max(1.0);
        for d in 0..s.devices {
            sim.at(s.latency, Ev::Announce(d as Dev));
        }
        // Leavers among the starting devices, joiners after them, both at random times
        // within the bound.
        for k in 0..churn {
            let leaver = (rng.next_u64() % s.devices as u64) as Dev;
            sim.at(
                Duration::from_secs_f64(rng.unit() * window),
                Ev::Leave(leaver),
            );
            let joiner = (s.devices + k) as Dev;
            sim.at(
                Duration::from_secs_f64(rng.unit() * window),
                Ev::Announce(joiner),
            );
        }
        let frozen = (s.devices as f64 * s.frozen).round() as usize;
        let mut starting: Vec<Dev> = (0..s.devices as Dev).collect();
        device::fetch::shuffle(&mut starting, &(s.seed ^ 0xf0f0).to_be_bytes());
        for &d in &starting[..frozen.min(s.devices)] {
            sim.at(
                Duration::from_secs_f64(kinds.unit() * window),
                Ev::Freeze(d),
            );
        }
        sim.at(HUB_TICK, Ev::HubTick);
        sim
    }

    /// Kumar–Ross T_min and the one-copy bound for the starting devices.
    fn bounds(&self) -> (f64, f64) {
        let starting = &self.devices[..self.s.devices];
        let f = (self.s.image + MANIFEST) as f64;
        let n = starting.len() as f64;
        let sum_up: f64 = (0..starting.len())
            .map(|i| self.rate_up(i as Dev) as f64)
            .sum();
        let d_min = (0..starting.len())
            .map(|i| self.rate_down(i as Dev))
            .min()
            .unwrap_or(1) as f64;
        let u_s = self.s.hub_up as f64;
        let t_min = (f / u_s).max(f / d_min).max(n * f / (u_s + sum_up));
        let one_copy = (f / u_s).max(f / d_min).max((n - 1.0) * f / sum_up);
        if self.s.mesh {
            (t_min, one_copy)
        } else {
            let hub_only = (n * f / u_s).max(f / d_min);
            (hub_only, hub_only)
        }
    }

    fn rate_up(&self, d: Dev) -> u64 {
        self.devices[d as usize].up.rate()
    }

    fn rate_down(&self, d: Dev) -> u64 {
        self.devices[d as usize].down.rate()
    }

    fn at(&mut self, after: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at: self.now + after,
            seq: self.seq,
            ev,
        }));
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Announce(d) => self.announce(d),
            Ev::Leave(d) => self.leave(d),
            Ev::Begin(d, b) => {
                if let Some(step) = self.with_fetch(d, b, |f, sources| f.fetch.ask(sources)) {
                    // The manifest's report goes alone, as the agent's does; a chunk's
                    // first ask may carry the report of one stored before it.
                    let (step, alone) = match b {
                        0 => (step, None),
                        _ => self.devices[d as usize].reports.begin(step),
                    };
                    self.report(d, alone);
                    self.step(d, b, step)
                }
            }
            Ev::Ask(d, b) => {
                if let Some(step) = self.with_fetch(d, b, |f, sources| f.fetch.ask(sources)) {
                    self.step(d, b, step)
                }
            }
            Ev::AtHub(d, b, want) => self.at_hub(d, b, want),
            Ev::FromHub(d, b, answer) => self.hub_answered(d, b, answer),
            Ev::AtPeer(d, b, ask, target) => self.at_peer(d, b, ask, target),
            Ev::FromPeer(d, b, ask, result) => {
                if self.answered(d, b, ask) {
                    self.peer_answered(d, b, result)
                }
            }
            Ev::Deadline(d, b, ask) => {
                if self.answered(d, b, ask) {
                    self.out.deadlines_missed += 1;
                    let (size, after) = (self.sizes[b], self.now);
                    self.with_fetch(d, b, |f, sources| {
                        sources.deadline_passed(size, after.saturating_sub(f.asked_at))
                    });
                    self.peer_answered(d, b, Err(Miss::Late))
                }
            }
            Ev::Freeze(d) => self.freeze(d),
            Ev::Got(d, b) => self.got(d, b),
            Ev::Report(d, digest) => self.note_stored(d, digest),
            Ev::Sent(d) => {
                let dev = &mut self.devices[d as usize];
                dev.seeding = dev.seeding.saturating_sub(1);
            }
            Ev::HubTick => {
                let answered = self.tracker.lapsed(self.instant());
                self.answer_parked(answered);
                self.at(HUB_TICK, Ev::HubTick);
                if self.now.subsec_millis() < HUB_TICK.as_millis() as u32 {
                    let used = self.uploaded as f64 / self.sum_up.max(1) as f64;
                    self.out.timeline.push((used, self.tracker.parked()));
                    self.uploaded = 0;
                }
            }
        }
    }

    fn announce(&mut self, d: Dev) {
        let dev = &mut self.devices[d as usize];
        if dev.gone {
            return;
        }
        dev.start = Some(self.now);
        self.begin(d, 0);
    }

    fn leave(&mut self, d: Dev) {
        let dev = &mut self.devices[d as usize];
        if dev.gone {
            return;
        }
        dev.gone = true;
        dev.fetching.clear();
        // A frozen device was counted out when it froze.
        if !dev.done && !dev.frozen {
            self.active -= 1;
            self.out.left += 1;
        }
        // The hub sees its connection close.
        self.tracker.forget(|p| *p == d);
    }

    /// Whether ask number `ask` of blob `b` is the one `d` waits on: the first of its
    /// answer and its deadline ends it, the other comes too late.
    fn answered(&mut self, d: Dev, b: Blob, ask: u64) -> bool {
        self.with_fetch(d, b, |f, _| {
            let current = f.asks == ask;
            if current {
                f.asks += 1;
            }
            current
        }) == Some(true)
    }

    /// Stops answering and fetching, its connections left open: the hub hears nothing.
    fn freeze(&mut self, d: Dev) {
        let dev = &mut self.devices[d as usize];
        if dev.gone || dev.frozen {
            return;
        }
        dev.frozen = true;
        dev.fetching.clear();
        if !dev.done {
            self.active -= 1;
            self.out.frozen += 1;
        }
    }

    /// Starts fetching blob `b`.
    fn begin(&mut self, d: Dev, b: Blob) {
        let fetching = Fetching {
            fetch: BlobFetch::new(self.s.mesh, self.instant()),
            queue: VecDeque::new(),
            misses: vec![],
            asks: 0,
            asked_at: Duration::ZERO,
            target: None,
            took: Duration::ZERO,
            named: false,
            from_hub: false,
        };
        self.devices[d as usize].fetching.insert(b, fetching);
        self.at(Duration::ZERO, Ev::Begin(d, b));
    }

    /// Sends a "stored" report on its own.
    fn report(&mut self, d: Dev, digest: Option<Digest>) {
        if let Some(digest) = digest.filter(|_| self.s.mesh) {
            self.out.stored_reports += 1;
            self.at(self.s.latency, Ev::Report(d, digest));
        }
    }

    /// A "stored" report reaches the hub, alone or riding on an ask.
    fn note_stored(&mut self, d: Dev, digest: Digest) {
        if !self.devices[d as usize].gone && !self.devices[d as usize].frozen {
            let now = self.instant();
            let answered = self.tracker.stored(digest, d, now);
            self.answer_parked(answered);
        }
    }

    /// Runs `f` on the device's fetch of `b`, if it is still fetching it.
    fn with_fetch<T>(
        &mut self,
        d: Dev,
        b: Blob,
        f: impl FnOnce(&mut Fetching, &mut Sources<Dev>) -> T,
    ) -> Option<T> {
        let dev = &mut self.devices[d as usize];
        if dev.gone || dev.frozen {
            return None;
        }
        let fetching = dev.fetching.get_mut(&b)?;
        Some(f(fetching, &mut dev.sources))
    }

    /// Carries out what the device's schedule decided.
    fn step(&mut self, d: Dev, b: Blob, step: Step<Dev>) {
        let lat = self.s.latency;
        match step {
            Step::AskHub(want) => {
                self.out.hub_asks += 1;
                if want.stored(self.digests[b]).is_some() {
                    self.out.carried += 1;
                }
                self.at(lat, Ev::AtHub(d, b, want));
            }
            Step::AskNamed(peers) => {
                self.with_fetch(d, b, |f, _| {
                    f.named = true;
                    f.misses.clear();
                    f.queue = peers.into_iter().map(Target::Peer).collect();
                });
                self.next_target(d, b);
            }
            Step::AskConnected { with_hub } => {
                let now = self.instant();
                let sources = &self.devices[d as usize].sources;
                let mut targets: Vec<Target> = if self.s.mesh {
                    self.connected(d)
                        .into_iter()
                        .filter(|p| sources.usable(p, now))
                        .map(Target::Peer)
                        .collect()
                } else {
                    vec![]
                };
                if with_hub {
                    targets.push(Target::Hub);
                }
                self.with_fetch(d, b, |f, _| {
                    f.named = false;
                    f.misses.clear();
                    f.queue = targets.into();
                });
                self.next_target(d, b);
            }
            Step::Sleep(wait) => self.at(wait, Ev::Ask(d, b)),
            Step::Done => self.stored(d, b),
            Step::Stalled => {
                // The agent gives the release up and tries it again later; here, a
                // stalled blob is a failed run (the device never finishes).
                self.out.stalled += 1;
                self.devices[d as usize].fetching.remove(&b);
            }
        }
    }

    /// Asks the next named or connected peer, or tells the schedule they all missed.
    fn next_target(&mut self, d: Dev, b: Blob) {
        let now = self.instant();
        let Some(target) = self.with_fetch(d, b, |f, _| f.queue.pop_front()) else {
            return;
        };
        if let Some(target) = target {
            if let Target::Peer(p) = target {
                self.out.peer_asks += 1;
                self.use_link(d, p);
            } else {
                self.out.hub_asks += 1;
            }
            let size = self.sizes[b];
            let now_sim = self.now;
            let (ask, deadline) = self
                .with_fetch(d, b, |f, sources| {
                    f.asks += 1;
                    f.asked_at = now_sim;
                    f.target = Some(target);
                    (f.asks, sources.deadline(size))
                })
                .expect("fetching");
            self.at(self.s.latency, Ev::AtPeer(d, b, ask, target));
            if matches!(target, Target::Peer(_)) {
                self.at(deadline, Ev::Deadline(d, b, ask));
            }
            return;
        }
        let step = self.with_fetch(d, b, |f, sources| {
            if f.named {
                f.fetch.named_missed(sources, &f.misses, now).0
            } else {
                for (p, miss) in &f.misses {
                    sources.peer_missed(p, *miss, now);
                }
                f.fetch.connected_answered(sources, None, now)
            }
        });
        if let Some(step) = step {
            self.step(d, b, step);
        }
    }

    fn at_hub(&mut self, d: Dev, b: Blob, want: Want) {
        let lat = self.s.latency;
        if self.devices[d as usize].gone || self.devices[d as usize].frozen {
            return;
        }
        if want.missed() && self.s.mesh {
            // First, as the hub does: a stored report must not name the silent holder.
            let missed = self.tracker.missed(self.digests[b], &d, self.instant());
            self.answer_parked(missed.answers);
        }
        if let Some(stored) = want.stored(self.digests[b]) {
            self.note_stored(d, stored);
        }
        if want.peers_ok() && self.s.mesh {
            let now = self.instant();
            match self.tracker.decide(self.digests[b], Some(d), now) {
                Decision::Serve => {}
                Decision::Elsewhere(named) if named.is_empty() => {
                    let answered = self.tracker.park(self.digests[b], d, (d, b), now);
                    self.answer_parked(answered);
                    return;
                }
                Decision::Elsewhere(named) => {
                    self.out.redirects += 1;
                    self.at(lat, Ev::FromHub(d, b, Some(Answer::Peers(named))));
                    return;
                }
            }
        }
        self.hub_answer(d, b);
    }

    /// The hub sends the blob, or says it is busy.
    fn hub_answer(&mut self, d: Dev, b: Blob) {
        let lat = self.s.latency;
        match self.hub_send(b) {
            Some(wait) => self.at(wait + lat, Ev::FromHub(d, b, Some(Answer::Blob))),
            None => self.at(lat, Ev::FromHub(d, b, None)),
        }
    }

    /// The hub sends blob `b` under its cap: when its last byte leaves; `None`: busy.
    fn hub_send(&mut self, b: Blob) -> Option<Duration> {
        let now = self.instant();
        if self.hub_up.backlog(now) > BUSY_BACKLOG {
            return None;
        }
        self.out.hub_egress += self.sizes[b];
        Some(self.hub_up.take(self.sizes[b], now))
    }

    fn answer_parked(&mut self, mut answered: Vec<tracker::Answer<Dev, (Dev, Blob)>>) {
        // The tracker's answers come partly from hash maps: sorted, for a run that
        // repeats exactly.
        answered.sort_by_key(|(ticket, _, _)| *ticket);
        for ((d, b), _, decision) in answered {
            match decision {
                Decision::Serve => self.hub_answer(d, b),
                Decision::Elsewhere(named) => {
                    if named.is_empty() {
                        self.out.waits += 1;
                    } else {
                        self.out.redirects += 1;
                    }
                    self.at(
                        self.s.latency,
                        Ev::FromHub(d, b, Some(Answer::Peers(named))),
                    );
                }
            }
        }
    }

    fn hub_answered(&mut self, d: Dev, b: Blob, answer: Option<Answer>) {
        let now = self.instant();
        let answer = match answer {
            Some(Answer::Blob) => {
                // The bytes pass the download cap first (as `Fetcher::accept`).
                let wait = self.devices[d as usize].down.take(self.sizes[b], now);
                self.with_fetch(d, b, |f, _| f.from_hub = true);
                self.at(wait, Ev::Got(d, b));
                return;
            }
            Some(Answer::Peers(peers)) => HubAnswer::Peers(peers),
            None => HubAnswer::Silent,
        };
        if let Some(step) = self.with_fetch(d, b, |f, sources| {
            f.fetch.hub_answered(sources, answer, now)
        }) {
            self.step(d, b, step);
        }
    }

    fn at_peer(&mut self, d: Dev, b: Blob, ask: u64, target: Target) {
        let lat = self.s.latency;
        let size = self.sizes[b];
        let now = self.instant();
        let p = match target {
            Target::Hub => {
                let answer = self.hub_send(b);
                let (after, result) =
                    answer.map_or((lat, Err(Miss::Refused)), |w| (w + lat, Ok(())));
                self.at(after, Ev::FromPeer(d, b, ask, result));
                return;
            }
            Target::Peer(p) => p,
        };
        let holder = &mut self.devices[p as usize];
        let result = if holder.frozen {
            // Its kernel keeps the connection: only the asker's deadline ends the wait.
            return;
        } else if holder.gone {
            self.at(DIAL_FAIL, Ev::FromPeer(d, b, ask, Err(Miss::Unreachable)));
            return;
        } else if !holder.has[b] {
            Err(Miss::Refused)
        } else if holder.seeding >= MAX_SEEDING || holder.up.backlog(now) > BUSY_BACKLOG {
            Err(Miss::Busy)
        } else {
            holder.seeding += 1;
            let wait = holder.up.take(size, now);
            self.uploaded += size;
            self.at(wait, Ev::Sent(p));
            self.at(wait + lat, Ev::FromPeer(d, b, ask, Ok(())));
            return;
        };
        self.at(lat, Ev::FromPeer(d, b, ask, result));
    }

    fn peer_answered(&mut self, d: Dev, b: Blob, result: Result<(), Miss>) {
        match result {
            Ok(()) => {
                let now = self.instant();
                let at = self.now;
                let took = self.with_fetch(d, b, |f, _| {
                    f.took = at.saturating_sub(f.asked_at);
                    (f.target != Some(Target::Hub)).then_some(f.took)
                });
                if let Some(Some(took)) = took {
                    self.out.peer_secs.push(took.as_secs_f64());
                }
                // The bytes pass the download cap (as `Fetcher::accept`, after the
                // deadline's wait).
                let wait = self.devices[d as usize].down.take(self.sizes[b], now);
                self.at(wait, Ev::Got(d, b));
            }
            Err(miss) => {
                self.with_fetch(d, b, |f, _| {
                    if let Some(Target::Peer(p)) = f.target {
                        f.misses.push((p, miss));
                    }
                });
                self.next_target(d, b);
            }
        }
    }

    /// The blob's bytes are in: the schedule hears of it.
    fn got(&mut self, d: Dev, b: Blob) {
        let now = self.instant();
        let bytes = self.sizes[b];
        let step = self.with_fetch(d, b, |f, sources| {
            let took = Took {
                bytes: if f.target == Some(Target::Hub) {
                    0
                } else {
                    bytes
                },
                took: f.took,
            };
            if f.from_hub {
                f.fetch.hub_answered(sources, HubAnswer::Blob, now)
            } else if f.named {
                f.fetch.named_delivered(sources, took, now)
            } else {
                f.fetch.connected_answered(sources, Some(took), now)
            }
        });
        if let Some(step) = step {
            self.step(d, b, step);
        }
    }

    /// Blob `b` is stored on `d`: report it, start the next, or finish.
    fn stored(&mut self, d: Dev, b: Blob) {
        self.out.delivered += 1;
        let parallel = self.s.parallel;
        let dev = &mut self.devices[d as usize];
        dev.fetching.remove(&b);
        dev.has[b] = true;
        let alone = match b {
            0 => Some(self.digests[b]),
            _ => dev.reports.stored(self.digests[b]),
        };
        self.report(d, alone);
        let dev = &mut self.devices[d as usize];
        let next: Vec<Blob> = if b == 0 {
            (0..parallel)
                .filter_map(|_| dev.pending.pop_front())
                .collect()
        } else {
            dev.pending.pop_front().into_iter().collect()
        };
        if next.is_empty() && dev.fetching.is_empty() && !dev.done && dev.has.iter().all(|h| *h) {
            dev.done = true;
            let start = dev.start.unwrap_or_default();
            self.out.completion.push((self.now - start).as_secs_f64());
            self.active -= 1;
        }
        for n in next {
            self.begin(d, n);
        }
    }

    /// Devices `d` has an open connection to (used within the idle timeout).
    fn connected(&self, d: Dev) -> Vec<Dev> {
        let mut peers: Vec<Dev> = self
            .links
            .iter()
            .filter(|(_, last)| self.now.saturating_sub(**last) < self.s.idle_timeout)
            .filter_map(|(&(a, b), _)| match () {
                _ if a == d => Some(b),
                _ if b == d => Some(a),
                _ => None,
            })
            .collect();
        peers.sort_unstable();
        peers
    }

    /// A request between two devices: over their connection, or a new one.
    fn use_link(&mut self, a: Dev, b: Dev) {
        let key = (a.min(b), a.max(b));
        let idle = self.s.idle_timeout;
        let now = self.now;
        let last = self.links.insert(key, now);
        if last.is_none_or(|t| now.saturating_sub(t) >= idle) {
            self.out.connections += 1;
        }
    }
}
