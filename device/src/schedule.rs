//! What a device asks whom for one blob, and when it gives up — the decisions of
//! `fetch.rs`, with no I/O and no clock of its own (callers pass `now`), so the fleet
//! simulator (`tests/src/sim.rs`) runs the very code the agent runs.
//!
//! - **peer exchange** (`swarm`): ask the hub first, saying we can use peers; the hub
//!   sends the blob, or names peers that have it (`hub/src/tracker.rs`), or says "none
//!   free yet" (no peers). Named peers are asked in turn; if none delivers, or none was
//!   named, sleep a little and ask the hub again. After [`FAILED_ROUNDS`] rounds in a row
//!   in which no named peer could be reached ([`Sources`], shared by a device's blobs),
//!   ask the hub for the blob itself, and try peers again after it delivers one.
//! - **the hub silent** (down, or too slow to answer): ask the connected peers (those
//!   known to run the release first); the hub itself for the blob only when it was not
//!   the one just asked (see [`Step::AskConnected`]).
//! - **no peer exchange**: connected peers, then the hub, as a hub-and-spoke system would.
//!
//! Every peer is given a deadline fixed when it is asked ([`Sources::deadline`]: its
//! upload backlog and the blob at the slowest useful rate, more in a slower fleet), which a peer
//! that keeps its connection open but says nothing (frozen, hung, or on a link at
//! 1 KiB/s) cannot extend. One that misses it is not asked by this device for a while,
//! and is reported to the hub with the next ask ([`Want::BlobOrPeersMissed`]), which
//! then names it to nobody for a while and names another holder, or sends the blob
//! itself when no live holder is left (`hub/src/tracker.rs`).
//!
//! A blob is given up ([`Step::Stalled`]) only after [`STALL_LIMIT`] in which the device
//! stored nothing at all and the hub named no holder for it: in a large fleet, waiting
//! for a free holder can take long; a hub saying "wait" for that long is no progress.
//!
//! A chunk stored is reported to the hub on the device's next ask for peers
//! ([`Reports`]): one request a chunk to the hub instead of two.

use net::ratelimit::BUSY_BACKLOG;
use net::Want;
use proto::Digest;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Give up on a blob after this long without the device storing anything (this blob or
/// another) and without the hub naming holders for it: the hub saying "wait" is no
/// progress (in a very large fleet a device can wait this long for its first chunk, but
/// not without being named a holder).
pub const STALL_LIMIT: Duration = Duration::from_secs(120);
/// Redirect rounds in a row in which no named peer could be reached before the hub is
/// asked directly.
pub const FAILED_ROUNDS: usize = 16;
/// First pause before asking again; it doubles up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(100);
const MAX_WAIT: Duration = Duration::from_secs(2);
/// After a hub's answer, ask it again within this.
const AFTER_ANSWER: Duration = Duration::from_secs(1);
/// A holder that accepts an ask starts sending within its upload backlog
/// ([`BUSY_BACKLOG`], past which it answers "busy") and then sends at its upload rate: a
/// peer is given that backlog and the blob's size at this rate. Slower than this, asking
/// the hub for another holder is quicker; a frozen peer is found out in about 10 s for a
/// 64 KiB chunk.
pub const SLOWEST_USEFUL: u64 = 16 * 1024;
/// Most time a peer is given: within the hub's 20 s reservation of the holder it named
/// (`hub::tracker::RESERVATION`), so the report of the miss finds it, and within the
/// network's own 20 s request timeout.
pub const DEADLINE_CEILING: Duration = Duration::from_secs(18);
/// A fleet slower than [`SLOWEST_USEFUL`] lifts the deadline: a peer is given this many
/// times the time the slow end of the last deliveries took for a blob of its size.
const DEADLINE_MARGIN: f64 = 2.0;
/// Peer deliveries whose pace (seconds a byte) the deadline learns from.
const PACES_KEPT: usize = 16;
/// The slow end of them: the fourth slowest. A fleet slower than the deadline passes
/// several; one or two peers found frozen do not lift every later deadline.
const SLOW_END: usize = 3;
/// Blobs smaller than this teach the deadline nothing: a manifest's or a small chunk's
/// time is mostly the round trip and the holder's queue, not its bytes.
const PACE_MIN_BYTES: u64 = 16 * 1024;
/// A peer that failed this device (late, or could not be reached) is not asked by it
/// again for this long: no longer than the hub names a reported holder to nobody
/// (`hub::tracker::SUSPECT_FOR`), so the device never filters out, and reports again, a
/// holder the hub has forgiven on the strength of the same miss.
pub const LOCAL_SUSPECT: Duration = Duration::from_secs(20);

/// Why a peer asked for a blob did not deliver it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// Could not be dialled, or the connection failed: gone, or out of this device's
    /// reach. Not reported: the hub sees a departed peer's connection close, and a peer
    /// this device alone cannot reach is no reason to route the fleet around it.
    Unreachable,
    /// Did not deliver before its deadline ([`Sources::deadline`]): frozen, its path
    /// gone silent, or too slow. Reported to the hub with the next ask.
    Late,
    /// Behind NAT elsewhere, and no hole could be punched to it.
    NoDirectPath,
    /// Answered busy: its upload is saturated (a slow link, or more askers than it can
    /// serve): reachable, and not reported.
    Busy,
    /// Answered: not found, bad bytes.
    Refused,
}

/// A blob a peer delivered: its size and how long it took from the ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Took {
    pub bytes: u64,
    pub took: Duration,
}

/// What a device has learned about its sources, across its blobs: rounds in a row in
/// which none of the peers the hub named could be reached (past [`FAILED_ROUNDS`], blobs
/// come straight from the hub until a peer delivers again: peers the hub can reach but
/// this device cannot, behind NAT for instance); how fast peers deliver (a peer's
/// deadline, [`Sources::deadline`]); peers that missed one lately; when it last stored
/// anything (the stall limit).
#[derive(Debug)]
pub struct Sources<P> {
    failed_rounds: usize,
    last_progress: Option<Instant>,
    /// Seconds a byte of the last peer deliveries, newest last.
    paces: VecDeque<f64>,
    /// Peers that failed this device lately (late or unreachable), and until when they
    /// are not asked.
    suspects: HashMap<P, Instant>,
}

impl<P> Default for Sources<P> {
    fn default() -> Self {
        Sources {
            failed_rounds: 0,
            last_progress: None,
            paces: VecDeque::new(),
            suspects: HashMap::new(),
        }
    }
}

impl<P: Clone + Eq + Hash> Sources<P> {
    /// What to ask the hub for now.
    pub fn want(&self) -> Want {
        if self.failed_rounds < FAILED_ROUNDS {
            Want::BlobOrPeers
        } else {
            // Peers keep failing us: the hub itself, please.
            Want::Blob
        }
    }

    /// How long a peer is given to deliver a blob of `bytes`, fixed when the ask is sent
    /// (nothing the peer does extends it): its upload backlog and the blob at
    /// [`SLOWEST_USEFUL`], or — in a fleet whose deliveries are slower than that — twice
    /// what the slow end of the last ones (the fourth slowest of [`PACES_KEPT`]) took
    /// for this size; at most [`DEADLINE_CEILING`].
    pub fn deadline(&self, bytes: u64) -> Duration {
        let useful = BUSY_BACKLOG.as_secs_f64() + bytes as f64 / SLOWEST_USEFUL as f64;
        let mut paces: Vec<f64> = self.paces.iter().copied().collect();
        paces.sort_by(|a, b| b.total_cmp(a));
        let learned = paces
            .get(SLOW_END)
            .map_or(0.0, |slow| DEADLINE_MARGIN * slow * bytes as f64);
        let secs = useful.max(learned).min(DEADLINE_CEILING.as_secs_f64());
        Duration::from_secs_f64(secs)
    }

    /// Whether to ask `peer` now: not if it failed this device within [`LOCAL_SUSPECT`].
    pub fn usable(&self, peer: &P, now: Instant) -> bool {
        self.suspects.get(peer).is_none_or(|until| now >= *until)
    }

    /// `peer`, asked for a blob, missed it so.
    pub fn peer_missed(&mut self, peer: &P, miss: Miss, now: Instant) {
        if matches!(miss, Miss::Unreachable | Miss::Late) {
            self.suspects.retain(|_, until| now < *until);
            self.suspects.insert(peer.clone(), now + LOCAL_SUSPECT);
        }
    }

    /// A peer did not deliver `bytes` within `deadline`: it took at least that long, and
    /// the deadline learns so — a fleet slower than [`SLOWEST_USEFUL`] would otherwise
    /// learn only from the deliveries quick enough to beat its deadline, and cut every
    /// slower one short.
    pub fn deadline_passed(&mut self, bytes: u64, deadline: Duration) {
        self.record_pace(Took {
            bytes,
            took: deadline,
        });
    }

    fn record_pace(&mut self, took: Took) {
        if took.bytes < PACE_MIN_BYTES {
            return;
        }
        if self.paces.len() >= PACES_KEPT {
            self.paces.pop_front();
        }
        self.paces
            .push_back(took.took.as_secs_f64() / took.bytes as f64);
    }

    /// Given up on peers, the hub sent a blob: try peers again for the next one, and come
    /// back here if they fail again (a device that could not reach peers for a while, on
    /// a busy network, is not behind NAT for ever).
    fn hub_delivered(&mut self, now: Instant) {
        self.failed_rounds = self.failed_rounds.saturating_sub(1);
        self.last_progress = Some(now);
    }

    fn peer_delivered(&mut self, took: Took, now: Instant) {
        self.failed_rounds = 0;
        self.last_progress = Some(now);
        self.record_pace(took);
    }

    /// A round of named peers all missed: counts it if none could be reached at all.
    /// True if it counted (the device's "peer misses").
    fn missed(&mut self, misses: &[Miss]) -> bool {
        let unreachable = misses
            .iter()
            .all(|m| matches!(m, Miss::Unreachable | Miss::Late | Miss::NoDirectPath));
        if !unreachable {
            return false;
        }
        if misses.contains(&Miss::NoDirectPath) {
            // Behind NAT in another home and not punchable: the hub.
            self.failed_rounds = FAILED_ROUNDS;
        } else {
            self.failed_rounds += 1;
        }
        true
    }

    /// Whether a blob last routed at `since` (begun, or holders named for it) has seen
    /// no progress for [`STALL_LIMIT`].
    fn stalled(&self, since: Instant, now: Instant) -> bool {
        let since = self.last_progress.map_or(since, |t| t.max(since));
        now.saturating_duration_since(since) > STALL_LIMIT
    }
}

/// What to do next for a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<P> {
    /// Ask the hub: for the blob, or ([`Want::BlobOrPeers`]) for peers that have it.
    AskHub(Want),
    /// Ask these peers, one after the other, until one delivers, each within its
    /// deadline ([`Sources::deadline`]).
    AskNamed(Vec<P>),
    /// The hub did not answer: ask the connected peers, and the hub for the blob itself
    /// when `with_hub` — only when it was not the one just asked: a hub slow to answer
    /// "ask a peer" would otherwise be asked for the whole blob by every device it kept
    /// waiting (at 1,000 devices: 12 copies of the image).
    AskConnected { with_hub: bool },
    /// Nothing to ask now: [`BlobFetch::ask`] again after this long.
    Sleep(Duration),
    /// Delivered.
    Done,
    /// The device stored nothing for [`STALL_LIMIT`].
    Stalled,
}

/// What the hub answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubAnswer<P> {
    /// The blob (checked by the caller).
    Blob,
    /// Peers to ask; none: ask again shortly.
    Peers(Vec<P>),
    /// No useful answer: down, busy, refused, timed out, or bad bytes.
    Silent,
}

/// One blob being fetched.
#[derive(Debug, Clone)]
pub struct BlobFetch {
    swarm: bool,
    /// Begun, or last named holders to ask by the hub.
    since: Instant,
    wait: Duration,
    /// What the hub was last asked for.
    asked: Want,
    /// The holders the hub last named missed: say so with the next ask.
    missed: bool,
}

impl BlobFetch {
    /// `swarm`: peer exchange is on (the hub may answer with peers).
    pub fn new(swarm: bool, now: Instant) -> BlobFetch {
        BlobFetch {
            swarm,
            since: now,
            wait: FIRST_WAIT,
            asked: Want::Blob,
            missed: false,
        }
    }

    /// The first step, and the one after each [`Step::Sleep`].
    pub fn ask<P: Clone + Eq + Hash>(&mut self, sources: &Sources<P>) -> Step<P> {
        if !self.swarm {
            return Step::AskConnected { with_hub: true };
        }
        self.asked = sources.want();
        if self.asked == Want::BlobOrPeers && self.missed {
            self.missed = false;
            self.asked = Want::BlobOrPeersMissed;
        }
        Step::AskHub(self.asked)
    }

    /// The hub answered [`Step::AskHub`].
    pub fn hub_answered<P: Clone + Eq + Hash>(
        &mut self,
        sources: &mut Sources<P>,
        answer: HubAnswer<P>,
        now: Instant,
    ) -> Step<P> {
        match answer {
            HubAnswer::Blob => {
                if self.asked == Want::Blob {
                    sources.hub_delivered(now);
                } else {
                    sources.last_progress = Some(now);
                }
                Step::Done
            }
            HubAnswer::Peers(peers) => {
                self.wait = self.wait.min(AFTER_ANSWER);
                // Not a peer that failed this device lately (its report, if it was
                // late, is on its way or made; the hub may not have heard of a dial
                // failure, which is this device's alone).
                let named: Vec<P> = peers
                    .into_iter()
                    .filter(|p| sources.usable(p, now))
                    .collect();
                if named.is_empty() {
                    self.pause(sources, now)
                } else {
                    self.since = now;
                    Step::AskNamed(named)
                }
            }
            HubAnswer::Silent => Step::AskConnected {
                with_hub: !self.swarm,
            },
        }
    }

    /// A peer named by the hub delivered.
    pub fn named_delivered<P: Clone + Eq + Hash>(
        &mut self,
        sources: &mut Sources<P>,
        took: Took,
        now: Instant,
    ) -> Step<P> {
        sources.peer_delivered(took, now);
        Step::Done
    }

    /// Every peer named missed, each for its reason. The second value: the round counts
    /// as a peer miss (none could be reached at all). Peers that could not be reached
    /// are reported with the next ask ([`Want::BlobOrPeersMissed`]).
    pub fn named_missed<P: Clone + Eq + Hash>(
        &mut self,
        sources: &mut Sources<P>,
        misses: &[(P, Miss)],
        now: Instant,
    ) -> (Step<P>, bool) {
        for (peer, miss) in misses {
            sources.peer_missed(peer, *miss, now);
        }
        // Busy is not reported: it is how a loaded fleet says "not now" (reported, at
        // 2,000 simulated devices the hub suspected so many holders it sent 11 copies).
        self.missed |= misses.iter().any(|(_, m)| *m == Miss::Late);
        let kinds: Vec<Miss> = misses.iter().map(|(_, m)| *m).collect();
        let counted = sources.missed(&kinds);
        (self.pause(sources, now), counted)
    }

    /// How [`Step::AskConnected`] went: delivered (by a device, with how long it took;
    /// by the hub, `bytes` 0), or not (each miss told to [`Sources::peer_missed`]).
    pub fn connected_answered<P: Clone + Eq + Hash>(
        &mut self,
        sources: &mut Sources<P>,
        delivered: Option<Took>,
        now: Instant,
    ) -> Step<P> {
        match delivered {
            Some(took) => {
                sources.last_progress = Some(now);
                if took.bytes > 0 {
                    sources.peer_delivered(took, now);
                }
                Step::Done
            }
            None => self.pause(sources, now),
        }
    }

    /// Nobody had it right now: peers may still be downloading, the hub may be
    /// restarting. Back off (bounded) and ask again, or give up when the device has
    /// stored nothing for [`STALL_LIMIT`].
    fn pause<P: Clone + Eq + Hash>(&mut self, sources: &Sources<P>, now: Instant) -> Step<P> {
        if sources.stalled(self.since, now) {
            return Step::Stalled;
        }
        let wait = self.wait;
        self.wait = (wait * 2).min(MAX_WAIT);
        Step::Sleep(wait)
    }
}

/// The "stored" reports of one release's chunks, each riding on the first ask of a
/// fetch begun after it ([`Want::BlobOrPeersAndStored`]). A device that has stored a
/// chunk begins its next one at once, and that fetch's first step is to ask the hub for
/// peers: the report costs no request of its own and reaches the hub as soon as a
/// separate one would. A report goes alone when no fetch still to begin will carry it
/// (the last chunks) or the fetch that takes it does not ask the hub for peers first.
#[derive(Debug)]
pub struct Reports {
    /// Fetches not yet begun: each takes at most one waiting report.
    unbegun: usize,
    waiting: Vec<Digest>,
}

impl Reports {
    /// For `fetches` fetches still to begin.
    pub fn new(fetches: usize) -> Reports {
        Reports {
            unbegun: fetches,
            waiting: Vec::new(),
        }
    }

    /// `digest` is stored: `None` if its report waits for a fetch to carry it, else the
    /// digest, to report alone now.
    pub fn stored(&mut self, digest: Digest) -> Option<Digest> {
        if self.waiting.len() < self.unbegun {
            self.waiting.push(digest);
            None
        } else {
            Some(digest)
        }
    }

    /// A fetch begins with `first`, its first step: that step, carrying a waiting report
    /// if it asks the hub for peers, and a report to send alone if it does not.
    pub fn begin<P>(&mut self, first: Step<P>) -> (Step<P>, Option<Digest>) {
        self.unbegun = self.unbegun.saturating_sub(1);
        match (first, self.waiting.pop()) {
            (Step::AskHub(Want::BlobOrPeers), Some(d)) => {
                (Step::AskHub(Want::BlobOrPeersAndStored(d)), None)
            }
            (step, report) => (step, report),
        }
    }

    /// Reports no fetch will carry (the fetches ended early): to send alone.
    pub fn left(self) -> Vec<Digest> {
        self.waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type S = Step<&'static str>;

    #[test]
    fn each_report_rides_on_a_later_ask_for_peers_or_goes_alone() {
        let d = |n: u8| Digest([n; 32]);
        let ask = || S::AskHub(Want::BlobOrPeers);
        let mut r = Reports::new(2);
        // Two fetches to begin: two reports can wait, the third goes now.
        assert_eq!(r.stored(d(1)), None);
        assert_eq!(r.stored(d(2)), None);
        assert_eq!(r.stored(d(3)), Some(d(3)));
        assert_eq!(
            r.begin(ask()),
            (S::AskHub(Want::BlobOrPeersAndStored(d(2))), None)
        );
        // A fetch that does not ask the hub for peers first sends its report alone.
        assert_eq!(
            r.begin(S::AskHub(Want::Blob)),
            (S::AskHub(Want::Blob), Some(d(1)))
        );
        // Nothing left to begin: reports go alone, none is left behind.
        assert_eq!(r.stored(d(4)), Some(d(4)));
        assert_eq!(r.begin(ask()), (ask(), None));
        assert!(r.left().is_empty());
        // Fetches that end early leave their reports to be sent.
        let mut r = Reports::new(3);
        r.stored(d(5));
        assert_eq!(r.left(), vec![d(5)]);
    }

    fn took(ms: u64) -> Took {
        Took {
            bytes: 64 * 1024,
            took: Duration::from_millis(ms),
        }
    }

    #[test]
    fn a_wait_backs_off_and_an_answer_brings_the_next_ask_within_a_second() {
        let mut sources = Sources::default();
        let now = Instant::now();
        let mut f = BlobFetch::new(true, now);
        assert_eq!(f.ask(&sources), S::AskHub(Want::BlobOrPeers));
        let mut waits = vec![];
        for _ in 0..6 {
            match f.hub_answered(&mut sources, HubAnswer::Peers(vec![]), now) {
                Step::Sleep(w) => waits.push(w.as_millis()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(
            f.hub_answered(&mut sources, HubAnswer::Peers(vec!["a"]), now),
            S::AskNamed(vec!["a"])
        );
        assert_eq!(f.named_delivered(&mut sources, took(500), now), S::Done);
    }

    #[test]
    fn unreachable_named_peers_send_the_device_to_the_hub_and_a_delivery_brings_them_back() {
        let mut sources = Sources::default();
        let now = Instant::now();
        let mut f = BlobFetch::new(true, now);
        for _ in 0..FAILED_ROUNDS {
            // A dial failure is this device's own trouble: not reported to the hub.
            assert_eq!(f.ask(&sources), S::AskHub(Want::BlobOrPeers));
            let (_, counted) = f.named_missed(&mut sources, &[("a", Miss::Unreachable)], now);
            assert!(counted);
        }
        // A refusal is an answer: the peer is reachable, the round does not count.
        assert!(!sources.missed(&[Miss::Unreachable, Miss::Refused]));
        assert!(!sources.missed(&[Miss::Unreachable, Miss::Busy]));
        assert_eq!(f.ask(&sources), S::AskHub(Want::Blob));
        assert_eq!(f.hub_answered(&mut sources, HubAnswer::Blob, now), S::Done);
        // One blob from the hub: peers again for the next one.
        assert_eq!(sources.want(), Want::BlobOrPeers);
        // No direct path at all (NAT elsewhere): straight to the hub.
        sources.missed(&[Miss::NoDirectPath, Miss::Unreachable]);
        assert_eq!(sources.want(), Want::Blob);
        f.named_delivered(&mut sources, took(500), now);
        assert_eq!(sources.want(), Want::BlobOrPeers);
    }

    #[test]
    fn a_peer_that_misses_its_deadline_is_reported_with_the_next_ask_and_not_asked_again_for_a_while(
    ) {
        let mut sources = Sources::default();
        let now = Instant::now();
        let mut f = BlobFetch::new(true, now);
        assert_eq!(f.ask(&sources), S::AskHub(Want::BlobOrPeers));
        assert_eq!(
            f.hub_answered(&mut sources, HubAnswer::Peers(vec!["frozen"]), now),
            S::AskNamed(vec!["frozen"])
        );
        let (step, _) = f.named_missed(&mut sources, &[("frozen", Miss::Late)], now);
        assert!(matches!(step, Step::Sleep(_)));
        // The next ask says so, once.
        assert_eq!(f.ask(&sources), S::AskHub(Want::BlobOrPeersMissed));
        // A hub that names it again meanwhile: skipped here, not reported twice.
        assert_eq!(
            f.hub_answered(&mut sources, HubAnswer::Peers(vec!["frozen", "b"]), now),
            S::AskNamed(vec!["b"])
        );
        assert_eq!(f.ask(&sources), S::AskHub(Want::BlobOrPeers));
        assert!(!sources.usable(&"frozen", now + LOCAL_SUSPECT / 2));
        assert!(sources.usable(&"frozen", now + LOCAL_SUSPECT));
        // A peer without the blob answered: nothing to report.
        let mut f = BlobFetch::new(true, now);
        f.ask(&sources);
        f.named_missed(&mut sources, &[("lost it", Miss::Refused)], now);
        assert_eq!(f.ask(&sources), S::AskHub(Want::BlobOrPeers));
        // Nor a busy one: a loaded fleet says so all the time.
        f.named_missed(&mut sources, &[("busy", Miss::Busy)], now);
        assert_eq!(f.ask(&sources), S::AskHub(Want::BlobOrPeers));
        assert!(sources.usable(&"busy", now));
    }

    #[test]
    fn a_peer_is_given_its_backlog_and_the_blob_at_the_slowest_useful_rate_or_more_if_the_fleet_is_slower(
    ) {
        let mut sources: Sources<&str> = Sources::default();
        let now = Instant::now();
        let secs = |s: f64| Duration::from_secs_f64(s);
        // 5 s of backlog and 64 KiB at 16 KiB/s; a large chunk is capped.
        assert_eq!(sources.deadline(64 * 1024), secs(9.0));
        assert_eq!(sources.deadline(256 * 1024), DEADLINE_CEILING);
        // Quick deliveries change nothing.
        for ms in [10, 500, 2000] {
            sources.peer_delivered(took(ms), now);
        }
        assert_eq!(sources.deadline(64 * 1024), secs(9.0));
        // A fleet where 64 KiB took 6 to 8 s: twice the fourth slowest.
        for ms in [8000, 7000, 6000, 6000] {
            sources.peer_delivered(took(ms), now);
        }
        assert_eq!(sources.deadline(64 * 1024), secs(12.0));
        assert_eq!(sources.deadline(32 * 1024), secs(7.0));
        // A manifest or a small chunk teaches nothing (mostly round trip and queue).
        let mut fresh: Sources<&str> = Sources::default();
        fresh.peer_delivered(
            Took {
                bytes: 1200,
                took: Duration::from_secs(1),
            },
            now,
        );
        assert_eq!(fresh.deadline(64 * 1024), secs(9.0));
        // Only the last deliveries count: a fleet that got faster gets shorter deadlines.
        for _ in 0..PACES_KEPT {
            sources.peer_delivered(took(250), now);
        }
        assert_eq!(sources.deadline(64 * 1024), secs(9.0));
        // Deadlines that passed count as deliveries that took that long: in a fleet
        // slower than the deadline, it grows instead of cutting every ask short; two
        // peers found frozen do not lift it.
        sources.deadline_passed(64 * 1024, secs(9.0));
        sources.deadline_passed(64 * 1024, secs(9.0));
        assert_eq!(sources.deadline(64 * 1024), secs(9.0));
        sources.deadline_passed(64 * 1024, secs(9.0));
        sources.deadline_passed(64 * 1024, secs(9.0));
        assert_eq!(sources.deadline(64 * 1024), DEADLINE_CEILING);
    }

    #[test]
    fn a_silent_hub_sends_the_device_to_its_peers_and_it_stalls_only_without_progress() {
        let mut sources = Sources::default();
        let now = Instant::now();
        let mut f = BlobFetch::new(true, now);
        f.ask(&sources);
        assert_eq!(
            f.hub_answered(&mut sources, HubAnswer::Silent, now),
            S::AskConnected { with_hub: false }
        );
        // Another blob stored keeps this one alive.
        let later = now + STALL_LIMIT * 2;
        BlobFetch::new(true, later).named_delivered(&mut sources, took(500), later);
        assert!(matches!(
            f.connected_answered(&mut sources, None, later),
            Step::Sleep(_)
        ));
        // "Wait" answers are no progress (issue 27: every hub answer reset the stall
        // timer); holders named are.
        let named = later + STALL_LIMIT;
        assert_eq!(
            f.hub_answered(&mut sources, HubAnswer::Peers(vec!["a"]), named),
            S::AskNamed(vec!["a"])
        );
        let stalled = named + STALL_LIMIT + Duration::from_secs(1);
        assert_eq!(
            f.hub_answered(&mut sources, HubAnswer::Peers(vec![]), stalled),
            S::Stalled
        );
        assert_eq!(
            f.connected_answered(&mut sources, None, stalled),
            S::Stalled
        );
        // Without peer exchange: connected peers and the hub, never "peers, please".
        let mut f = BlobFetch::new(false, now);
        assert_eq!(f.ask(&sources), S::AskConnected { with_hub: true });
    }
}
