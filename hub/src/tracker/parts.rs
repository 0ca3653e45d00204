//! The tracker's parts: how an asker reaches a holder, what it is told, what is kept per
//! blob, reservation and parked ask, and the orders askers and holders are taken in.

use super::{LOOK_AHEAD, STALE};
use proto::Digest;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::time::Instant;

/// How an asker can reach a holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reach {
    /// On its own LAN (or host): the fast path, named first.
    Near,
    /// Across networks: a public holder, or one a hole punch reaches.
    Far,
    /// Not at all.
    No,
}

/// Who can reach whom (the hub's `place::Places`).
pub trait Topology<P> {
    fn reach(&self, asker: &P, holder: &P) -> Reach;
}

/// Everyone reaches everyone (one network).
#[derive(Debug, Default)]
pub struct Everywhere;

impl<P> Topology<P> for Everywhere {
    fn reach(&self, _: &P, _: &P) -> Reach {
        Reach::Far
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<P> {
    /// Send the blob.
    Serve,
    /// Point the asker at these peers instead; none: ask again shortly.
    Elsewhere(Vec<P>),
}

#[derive(Debug)]
pub(super) struct Holder<P> {
    pub(super) peer: P,
    pub(super) handed_out: u32,
}

#[derive(Debug)]
pub(super) struct Blob<P> {
    pub(super) holders: Vec<Holder<P>>,
    /// When the hub last sent it to a device (asking it to hold off re-sending).
    pub(super) served_at: Option<Instant>,
    /// The device the hub sent it to while nobody held it, until a holder reports.
    pub(super) first_to: Option<P>,
}

impl<P> Blob<P> {
    /// The hub sent it lately and that copy is still on its way to a device not suspect
    /// (`live`), or nobody holds it (an untracked asker's copy): ask the others to wait
    /// for it. A copy that reached a holder since fallen silent, or that went to a device
    /// that fell silent on the way (frozen while receiving it), is no reason to wait.
    pub(super) fn sent_lately(&self, now: Instant, live: impl Fn(&P) -> bool) -> bool {
        let on_its_way = match &self.first_to {
            Some(to) => live(to),
            None => self.holders.is_empty(),
        };
        on_its_way
            && self
                .served_at
                .is_some_and(|t| now.duration_since(t) < STALE)
    }
}

impl<P> Default for Blob<P> {
    fn default() -> Self {
        Blob {
            holders: Vec::new(),
            served_at: None,
            first_to: None,
        }
    }
}

/// An answer to a parked asker: its ticket, the blob it asked for, and what to do.
pub type Answer<P, R> = (R, Digest, Decision<P>);

/// What [`super::Tracker::missed`] did: holders newly suspect, and the suspects' parked asks
/// answered "ask again".
#[derive(Debug)]
pub struct Missed<P, R> {
    pub suspected: u32,
    pub answers: Vec<Answer<P, R>>,
}

/// An asker sent to holders, not yet reported back.
#[derive(Debug)]
pub(super) struct Reservation<P> {
    pub(super) named: Vec<P>,
    pub(super) at: Instant,
}

/// An asker waiting for a holder to be free: who, its ticket (the caller's handle on
/// the pending request) and since when.
#[derive(Debug)]
pub(super) struct Parked<P, R> {
    pub(super) asker: P,
    pub(super) ticket: R,
    pub(super) since: Instant,
}

/// Which of a blob's parked askers goes next: the one with the fewest downloads under
/// way among the first [`LOOK_AHEAD`], the first to come among equals. Strictly first come,
/// one asker early in many queues got all its blobs at once and its download link, shared
/// by all of them, held every holder's slot for longer (the fleet simulator, 1,000
/// devices: 47.5 s instead of 37.8 s when parked askers never lapse).
pub(super) fn least_busy<P: Eq + Hash, R>(
    queue: &VecDeque<Parked<P, R>>,
    getting: &HashMap<P, u32>,
) -> Option<usize> {
    let mut best: Option<(u32, usize)> = None;
    for (i, p) in queue.iter().take(LOOK_AHEAD).enumerate() {
        let n = getting.get(&p.asker).copied().unwrap_or(0);
        if best.is_none_or(|(m, _)| n < m) {
            best = Some((n, i));
            if n == 0 {
                break;
            }
        }
    }
    best.map(|(_, i)| i)
}

/// `peer` no longer holds `digest`.
pub(super) fn unhold<P: Eq + Hash>(
    held: &mut HashMap<P, HashSet<Digest>>,
    peer: &P,
    digest: &Digest,
) {
    if let Some(blobs) = held.get_mut(peer) {
        blobs.remove(digest);
    }
}

/// How far `holder` is from `asker` on a ring of peers placed by hash (fixed for the
/// process): each asker is sent to the nearest free holder, so the holders one device is
/// named, chunk after chunk, are mostly the same few neighbours and it fetches over
/// connections it already has. (A random order per pair spread a device's fetches over
/// most of the fleet: at 1,000 devices, ~66 connections each and a noise handshake for
/// every one — the largest CPU cost of the fleet.)
pub(super) fn affinity<P: Hash>(asker: Option<&P>, holder: &P) -> u64 {
    let h = ring_position(holder);
    match asker {
        Some(a) => {
            let a = ring_position(a);
            a.wrapping_sub(h).min(h.wrapping_sub(a))
        }
        None => h,
    }
}

fn ring_position<P: Hash>(p: &P) -> u64 {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    p.hash(&mut h);
    h.finish()
}
