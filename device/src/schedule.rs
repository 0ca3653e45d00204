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
//! A blob is given up ([`Step::Stalled`]) only after [`STALL_LIMIT`] in which no source
//! delivered it and the hub did not answer for it: in a large fleet, waiting for a free
//! holder can take longer than that, and a hub that says "wait" is tracking the blob.
//!
//! A chunk stored is reported to the hub on the device's next ask for peers
//! ([`Reports`]): one request a chunk to the hub instead of two.

use net::Want;
use proto::Digest;
use std::time::{Duration, Instant};

/// Give up on a blob after this long without any source delivering it or the hub
/// answering for it.
pub const STALL_LIMIT: Duration = Duration::from_secs(120);
/// Redirect rounds in a row in which no named peer could be reached before the hub is
/// asked directly.
pub const FAILED_ROUNDS: usize = 16;
/// First pause before asking again; it doubles up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(100);
const MAX_WAIT: Duration = Duration::from_secs(2);
/// After a hub's answer, ask it again within this.
const AFTER_ANSWER: Duration = Duration::from_secs(1);

/// Why a peer asked for a blob did not deliver it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// Could not be dialled or did not answer in time.
    Unreachable,
    /// Behind NAT elsewhere, and no hole could be punched to it.
    NoDirectPath,
    /// Answered: busy, not found, bad bytes.
    Refused,
}

/// What a device has learned about reaching the peers the hub names, across its blobs:
/// rounds in a row in which none could be reached. Past [`FAILED_ROUNDS`], blobs come
/// straight from the hub until a peer delivers again (peers the hub can reach but this
/// device cannot, behind NAT for instance).
#[derive(Debug, Default)]
pub struct Sources {
    failed_rounds: usize,
}

impl Sources {
    /// What to ask the hub for now.
    pub fn want(&self) -> Want {
        if self.failed_rounds < FAILED_ROUNDS {
            Want::BlobOrPeers
        } else {
            // Peers keep failing us: the hub itself, please.
            Want::Blob
        }
    }

    /// Given up on peers, the hub sent a blob: try peers again for the next one, and come
    /// back here if they fail again (a device that could not reach peers for a while, on
    /// a busy network, is not behind NAT for ever).
    fn hub_delivered(&mut self) {
        self.failed_rounds = self.failed_rounds.saturating_sub(1);
    }

    fn peer_delivered(&mut self) {
        self.failed_rounds = 0;
    }

    /// A round of named peers all missed: counts it if none could be reached at all.
    /// True if it counted (the device's "peer misses").
    fn missed(&mut self, misses: &[Miss]) -> bool {
        let unreachable = misses.iter().all(|m| *m != Miss::Refused);
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
}

/// What to do next for a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<P> {
    /// Ask the hub: for the blob, or ([`Want::BlobOrPeers`]) for peers that have it.
    AskHub(Want),
    /// Ask these peers, one after the other, until one delivers.
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
    /// No source delivered and the hub did not answer for [`STALL_LIMIT`].
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
    /// Since when no source delivered and the hub did not answer.
    since: Instant,
    wait: Duration,
    /// What the hub was last asked for.
    asked: Want,
}

impl BlobFetch {
    /// `swarm`: peer exchange is on (the hub may answer with peers).
    pub fn new(swarm: bool, now: Instant) -> BlobFetch {
        BlobFetch {
            swarm,
            since: now,
            wait: FIRST_WAIT,
            asked: Want::Blob,
        }
    }

    /// The first step, and the one after each [`Step::Sleep`].
    pub fn ask<P>(&mut self, sources: &Sources) -> Step<P> {
        if self.swarm {
            self.asked = sources.want();
            Step::AskHub(self.asked)
        } else {
            Step::AskConnected { with_hub: true }
        }
    }

    /// The hub answered [`Step::AskHub`].
    pub fn hub_answered<P>(
        &mut self,
        sources: &mut Sources,
        answer: HubAnswer<P>,
        now: Instant,
    ) -> Step<P> {
        match answer {
            HubAnswer::Blob => {
                if self.asked == Want::Blob {
                    sources.hub_delivered();
                }
                Step::Done
            }
            HubAnswer::Peers(peers) => {
                self.since = now;
                self.wait = self.wait.min(AFTER_ANSWER);
                if peers.is_empty() {
                    self.pause(now)
                } else {
                    Step::AskNamed(peers)
                }
            }
            HubAnswer::Silent => Step::AskConnected {
                with_hub: !self.swarm,
            },
        }
    }

    /// A peer named by the hub delivered.
    pub fn named_delivered<P>(&mut self, sources: &mut Sources) -> Step<P> {
        sources.peer_delivered();
        Step::Done
    }

    /// Every peer named missed, for these reasons. The second value: the round counts as
    /// a peer miss (none could be reached at all).
    pub fn named_missed<P>(
        &mut self,
        sources: &mut Sources,
        misses: &[Miss],
        now: Instant,
    ) -> (Step<P>, bool) {
        let counted = sources.missed(misses);
        (self.pause(now), counted)
    }

    /// How [`Step::AskConnected`] went.
    pub fn connected_answered<P>(&mut self, delivered: bool, now: Instant) -> Step<P> {
        if delivered {
            Step::Done
        } else {
            self.pause(now)
        }
    }

    /// Nobody had it right now: peers may still be downloading, the hub may be
    /// restarting. Back off (bounded) and ask again, or give up after [`STALL_LIMIT`].
    fn pause<P>(&mut self, now: Instant) -> Step<P> {
        if now.saturating_duration_since(self.since) > STALL_LIMIT {
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

    #[test]
    fn a_wait_backs_off_and_an_answer_brings_the_next_ask_within_a_second() {
        let mut sources = Sources::default();
        let now = Instant::now();
        let mut f = BlobFetch::new(true, now);
        assert_eq!(f.ask::<&str>(&sources), S::AskHub(Want::BlobOrPeers));
        let mut waits = vec![];
        for _ in 0..6 {
            match f.hub_answered::<&str>(&mut sources, HubAnswer::Peers(vec![]), now) {
                Step::Sleep(w) => waits.push(w.as_millis()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(
            f.hub_answered(&mut sources, HubAnswer::Peers(vec!["a"]), now),
            S::AskNamed(vec!["a"])
        );
        assert_eq!(f.named_delivered::<&str>(&mut sources), S::Done);
    }

    #[test]
    fn unreachable_named_peers_send_the_device_to_the_hub_and_a_delivery_brings_them_back() {
        let mut sources = Sources::default();
        let now = Instant::now();
        let mut f = BlobFetch::new(true, now);
        for _ in 0..FAILED_ROUNDS {
            assert_eq!(f.ask::<&str>(&sources), S::AskHub(Want::BlobOrPeers));
            let (_, counted) = f.named_missed::<&str>(&mut sources, &[Miss::Unreachable], now);
            assert!(counted);
        }
        // A refusal is an answer: the peer is reachable, the round does not count.
        assert!(!sources.missed(&[Miss::Unreachable, Miss::Refused]));
        assert_eq!(f.ask::<&str>(&sources), S::AskHub(Want::Blob));
        assert_eq!(
            f.hub_answered::<&str>(&mut sources, HubAnswer::Blob, now),
            S::Done
        );
        // One blob from the hub: peers again for the next one.
        assert_eq!(sources.want(), Want::BlobOrPeers);
        // No direct path at all (NAT elsewhere): straight to the hub.
        sources.missed(&[Miss::NoDirectPath, Miss::Unreachable]);
        assert_eq!(sources.want(), Want::Blob);
        f.named_delivered::<&str>(&mut sources);
        assert_eq!(sources.want(), Want::BlobOrPeers);
    }

    #[test]
    fn a_silent_hub_sends_the_device_to_its_peers_and_it_stalls_only_without_answers() {
        let mut sources = Sources::default();
        let now = Instant::now();
        let mut f = BlobFetch::new(true, now);
        f.ask::<&str>(&sources);
        assert_eq!(
            f.hub_answered::<&str>(&mut sources, HubAnswer::Silent, now),
            S::AskConnected { with_hub: false }
        );
        // "Wait" answers keep the blob alive however long they go on.
        let later = now + STALL_LIMIT * 2;
        assert!(matches!(
            f.hub_answered::<&str>(&mut sources, HubAnswer::Peers(vec![]), later),
            Step::Sleep(_)
        ));
        assert!(matches!(
            f.connected_answered::<&str>(false, later),
            Step::Sleep(_)
        ));
        assert_eq!(
            f.connected_answered::<&str>(false, later + STALL_LIMIT + Duration::from_secs(1)),
            S::Stalled
        );
        // Without peer exchange: connected peers and the hub, never "peers, please".
        let mut f = BlobFetch::new(false, now);
        assert_eq!(f.ask::<&str>(&sources), S::AskConnected { with_hub: true });
    }
}
