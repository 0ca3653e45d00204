//! Which peers have (or are fetching) which blob, as far as the hub can tell: the hub
//! sends each chunk of a release to about one device and points everyone else at the
//! devices that got it — a BitTorrent tracker and super-seeder in one, with no I/O and
//! no clock of its own (callers pass `now`).
//!
//! A device asking with `redirect_ok` is either served (nobody else has or is getting
//! the blob) or told to ask up to half of [`MAX_ELSEWHERE`] peers that have had it for
//! `settle` (the time it takes to fetch it) — or, if none has yet, none: ask again
//! shortly. Either way it becomes a source of that blob for later askers. Among settled sources, those handed out least often are handed out next,
//! so uploads spread over the fleet. A device whose peers all failed asks again and is
//! told again (it moves to the back); one that gives up on peers asks without
//! `redirect_ok` and is served.

use proto::blob::MAX_ELSEWHERE;
use proto::Digest;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Sources remembered per blob (the newest are kept).
const MAX_SOURCES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<P> {
    /// Send the blob.
    Serve,
    /// Point the asker at these peers instead.
    Elsewhere(Vec<P>),
}

#[derive(Debug)]
struct Source<P> {
    peer: P,
    since: Instant,
    handed_out: u32,
}

#[derive(Debug)]
pub struct Tracker<P> {
    blobs: HashMap<Digest, Vec<Source<P>>>,
    /// Blobs in the order first seen, to forget the oldest beyond `capacity`.
    order: VecDeque<Digest>,
    capacity: usize,
    settle: Duration,
}

impl<P: Clone + Eq> Tracker<P> {
    /// `settle`: how long after being served or redirected a peer counts as having the
    /// blob; `capacity`: blobs remembered.
    pub fn new(settle: Duration, capacity: usize) -> Tracker<P> {
        Tracker {
            blobs: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            settle,
        }
    }

    /// What to answer `asker` (who can fetch from peers) asking for `digest`. An asker
    /// with no known address (`None`) can be redirected but not become a source.
    pub fn decide(&mut self, digest: Digest, asker: Option<P>, now: Instant) -> Decision<P> {
        if !self.blobs.contains_key(&digest) {
            if self.order.len() >= self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.blobs.remove(&old);
                }
            }
            self.order.push_back(digest);
        }
        let settle = self.settle;
        let sources = self.blobs.entry(digest).or_default();
        let asker_is = |s: &Source<P>| asker.as_ref() == Some(&s.peer);
        // Asking again means its peers failed it: it is no source yet.
        sources.retain(|s| !asker_is(s));
        let decision = if sources.is_empty() {
            Decision::Serve
        } else {
            // Only settled sources: sending a fleet to peers still fetching the chunk is a
            // storm of dials answered "not found". None settled yet: an empty list, "ask
            // again shortly".
            let mut order: Vec<usize> = (0..sources.len())
                .filter(|&i| now.duration_since(sources[i].since) >= settle)
                .collect();
            // Least handed out first, then oldest (most likely complete).
            order.sort_by_key(|&i| (sources[i].handed_out, sources[i].since));
            order.truncate(MAX_ELSEWHERE / 2);
            Decision::Elsewhere(
                order
                    .into_iter()
                    .map(|i| {
                        sources[i].handed_out += 1;
                        sources[i].peer.clone()
                    })
                    .collect(),
            )
        };
        // Told to wait, it will not have the blob any sooner than before.
        let waiting = matches!(&decision, Decision::Elsewhere(p) if p.is_empty());
        if let Some(peer) = asker.filter(|_| !waiting) {
            if sources.len() >= MAX_SOURCES {
                // Forget the most handed-out source: it is the busiest.
                if let Some(pos) = (0..sources.len()).max_by_key(|&i| sources[i].handed_out) {
                    sources.remove(pos);
                }
            }
            sources.push(Source {
                peer,
                since: now,
                handed_out: 0,
            });
        }
        decision
    }

    /// The peer went away (disconnected from the hub): it is no source any more.
    pub fn forget(&mut self, peer: impl Fn(&P) -> bool) {
        for sources in self.blobs.values_mut() {
            sources.retain(|s| !peer(&s.peer));
        }
    }

    /// Blobs remembered.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_secs(1);

    fn d(n: u8) -> Digest {
        Digest([n; 32])
    }

    #[test]
    fn first_asker_is_served_the_next_are_sent_to_it() {
        let mut t = Tracker::new(SETTLE, 100);
        let now = Instant::now();
        assert_eq!(t.decide(d(1), Some("a"), now), Decision::Serve);
        // a is still fetching it: b is to ask again shortly, not to ask a.
        assert_eq!(t.decide(d(1), Some("b"), now), Decision::Elsewhere(vec![]));
        assert_eq!(
            t.decide(d(1), Some("c"), now + SETTLE),
            Decision::Elsewhere(vec!["a"])
        );
        // Another blob has its own first asker.
        assert_eq!(t.decide(d(2), Some("b"), now), Decision::Serve);
    }

    #[test]
    fn a_fleet_gets_each_blob_from_the_hub_once_and_load_spreads() {
        let mut t = Tracker::new(SETTLE, 100);
        let start = Instant::now();
        let mut served = 0;
        let mut handed: HashMap<u32, u32> = HashMap::new();
        for i in 0..1000u32 {
            let now = start + Duration::from_millis(u64::from(i) * 10);
            match t.decide(d(1), Some(i), now) {
                Decision::Serve => served += 1,
                Decision::Elsewhere(peers) => {
                    assert!(peers.len() <= MAX_ELSEWHERE);
                    assert!(!peers.contains(&i), "never sent to itself");
                    for p in peers {
                        *handed.entry(p).or_default() += 1;
                    }
                }
            }
        }
        assert_eq!(served, 1, "the hub sends the blob once");
        // The first (and only) holder is not handed to everyone: later askers are sent
        // to earlier askers once they have settled.
        let most = handed.values().max().copied().unwrap_or(0);
        assert!(most < 200, "one peer handed out {most} times");
    }

    #[test]
    fn asking_again_moves_the_asker_out_of_the_sources() {
        let mut t = Tracker::new(SETTLE, 100);
        let now = Instant::now();
        t.decide(d(1), Some("a"), now);
        t.decide(d(1), Some("b"), now);
        // b's peers failed it; it asks again and is not offered itself.
        let now = now + SETTLE;
        assert_eq!(
            t.decide(d(1), Some("b"), now),
            Decision::Elsewhere(vec!["a"])
        );
        // a gave up on peers and asks again: with no other source it is served.
        let later = now + SETTLE * 2;
        match t.decide(d(1), Some("a"), later) {
            Decision::Elsewhere(p) => assert_eq!(p, vec!["b"]),
            Decision::Serve => panic!("b is a source by now"),
        }
    }

    #[test]
    fn a_peer_that_went_away_is_no_source() {
        let mut t = Tracker::new(SETTLE, 100);
        let now = Instant::now();
        t.decide(d(1), Some("a"), now);
        let now = now + SETTLE;
        assert_eq!(
            t.decide(d(1), Some("b"), now),
            Decision::Elsewhere(vec!["a"])
        );
        t.forget(|p| *p == "a");
        let now = now + SETTLE;
        assert_eq!(
            t.decide(d(1), Some("c"), now),
            Decision::Elsewhere(vec!["b"])
        );
        t.forget(|p| *p == "b" || *p == "c");
        assert_eq!(t.decide(d(1), Some("d"), now), Decision::Serve);
    }

    #[test]
    fn an_asker_without_an_address_is_no_source_and_memory_is_bounded() {
        let mut t: Tracker<u32> = Tracker::new(SETTLE, 3);
        let now = Instant::now();
        assert_eq!(t.decide(d(1), None, now), Decision::Serve);
        assert_eq!(t.decide(d(1), None, now), Decision::Serve);
        for n in 2..10 {
            t.decide(d(n), Some(1), now);
        }
        assert_eq!(t.len(), 3);
    }
}
