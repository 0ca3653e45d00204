//! Which devices have which chunk, as far as the hub knows: the hub sends each chunk of a
//! release to about one device and points everyone else at devices that have it — a
//! BitTorrent tracker and super-seeder in one, with no I/O and no clock of its own
//! (callers pass `now`).
//!
//! - A device asking for a blob and able to fetch from peers ([`Tracker::decide`]) is
//!   served if no device has the blob and the hub has not just sent it to one; otherwise
//!   it is named up to [`NAMED`] **holders** — devices that told the hub they stored it
//!   ([`Tracker::stored`]) — with a free upload slot, the least loaded first; with none
//!   free, it is told to ask again shortly (an empty list).
//! - Naming a holder reserves one of its [`SLOTS`] (counted across all blobs) until the
//!   asker reports the blob stored, asks for it again (the holders named failed it), goes
//!   away, is reported silent itself, or [`RESERVATION`] passes: uploads spread over the
//!   fleet and no holder is sent
//!   more askers than it can serve at once.
//! - An asker told to wait can be **parked** ([`Tracker::park`]): as soon as a holder of
//!   its blob is free — a new holder reports, or an asker reports and gives its slots back
//!   — it is answered with the holders then free, so no upload slot sits idle until an
//!   asker happens to ask again; one parked [`PARK_FOR`] is let go to ask again. Parked
//!   askers go before new asks for the same blob, and among them the one with the
//!   **fewest downloads under way** first (holders named to it, not yet reported back):
//!   a device first in many queues would otherwise get all its blobs at once, split its
//!   download link among them and keep every holder serving it busy for longer.
//! - **First copies go to different devices** (BitTorrent's super-seeding): a device
//!   already receiving a first copy from the hub that asks for another blob nobody holds
//!   is parked, and at the hub's next tick ([`Tracker::lapsed`]) the blob goes to the
//!   parked asker with the fewest first copies under way. At the start of a release every
//!   device asks at once, and the first to ask got the first copy of every chunk it
//!   asked for: its one upload link then carried all of them (the fleet simulator, at
//!   1,000 devices: one device held 8 of 13 first copies).
//! - If no holder has reported a blob [`STALE`] after the hub sent it (the device it went
//!   to died or is stuck), the next asker is served.
//! - **A holder that stops answering is routed around.** An asker whose named holder did
//!   not deliver before the asker's deadline says so with its next ask
//!   ([`Tracker::missed`]); the holder is then **suspect**: named to nobody for
//!   [`SUSPECT_FOR`], doubling each time it fails again after that (a frozen board, a
//!   process stopped by its OS, a NAT path gone silent, a link at 1 KiB/s). A blob whose
//!   holders are all suspect is treated as held by nobody: the hub sends one more copy,
//!   to one asker, and the others wait for it — hub egress grows only by what the
//!   silent holders withheld. A suspect's own downloads give their holders' slots back
//!   at once (a frozen device holding them would idle the fleet's uploads until
//!   [`RESERVATION`]) and its parked asks are answered "ask again". A report is believed
//!   only about the holders named to that asker for that blob, at least [`REPORT_AFTER`]
//!   after the naming, and at most [`REPORTS_PER_ASKER`] times per [`SUSPECT_FOR`]: one
//!   device, broken or malicious, can keep a few holders out of the rotation for a
//!   while, not send the fleet to the hub.
//! - Holders are named only if the asker can reach them ([`Topology`]: behind NAT, a
//!   device in another home may not be), those on its own LAN first; an asker no
//!   holder is reachable for is served by the hub.

use crate::suspects::Suspects;
pub use crate::suspects::{REPORTS_PER_ASKER, REPORT_AFTER, SUSPECT_FOR, SUSPECT_MAX};
use proto::Digest;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

mod parts;

use parts::{affinity, least_busy, unhold, Blob, Holder, Parked, Reservation};
pub use parts::{Answer, Decision, Everywhere, Missed, Reach, Topology};

/// Holders named in one answer (an asker whose holder fails it asks again).
pub const NAMED: usize = 1;
/// Askers a holder is named to at once, across blobs: one upload at its full rate and
/// one waiting behind it (so the link does not idle while the first asker reports back),
/// and a chunk spreads as a tree that doubles about every transfer time. One slot would
/// double it faster when messages are quick, and loses once a report takes a few
/// hundred milliseconds, as on a loaded hub (BENCHMARKS.md, "Fleet at 1,000 devices").
pub const SLOTS: u32 = 2;
/// A naming holds a slot at most this long (a report lost, an asker stuck).
pub const RESERVATION: Duration = Duration::from_secs(20);
/// Serve a blob again if nobody reported it stored this long after the hub last sent it
/// (a device that goes away frees its first copies at once, see [`Tracker::forget`]).
/// Long enough for a first copy to pass a slow device's download link behind the other
/// chunks it is fetching: at 10,000 devices on 20 KiB/s links, 10 s made the hub send
/// the image 1.6 times (the fleet simulator).
pub const STALE: Duration = Duration::from_secs(30);
/// An asker waits parked at most this long. It is answered the moment a holder is free;
/// the limit only lets it ask afresh now and then, each time a request to the hub (at
/// 1,000 devices, 5 s made it 2.2 asks a chunk, 15 s 1.2). Within its 20 s request
/// timeout with 5 s to spare for a loaded hub's answer: a request that times out sends
/// the asker to the peers it is connected to.
pub const PARK_FOR: Duration = Duration::from_secs(15);
/// Parked askers of a blob looked at for the one with the fewest downloads under way
/// (see `least_busy`); the look stops at the first with none.
pub const LOOK_AHEAD: usize = 1024;
/// Holders remembered per blob (the least handed out are kept).
const MAX_HOLDERS: usize = 256;
/// Peers remembered per device as recently paired with it (see `Tracker::met`).
const MET: usize = 16;

#[derive(Debug)]
pub struct Tracker<P, R = (), T = Everywhere> {
    blobs: HashMap<Digest, Blob<P>>,
    /// Blobs in the order first seen, to forget the oldest beyond `capacity`.
    order: VecDeque<Digest>,
    capacity: usize,
    reservations: HashMap<(Digest, P), Reservation<P>>,
    /// Slots taken per holder (reservations naming it).
    load: HashMap<P, u32>,
    parked: HashMap<Digest, VecDeque<Parked<P, R>>>,
    /// Blobs each holder holds (to find parked askers it can serve when a slot frees).
    held: HashMap<P, HashSet<Digest>>,
    /// Holders whose slots came free since parked askers were last looked at.
    freed: Vec<P>,
    /// The peers each device was last paired with, as asker or holder (newest last):
    /// those connections are likely still open, so a free holder among them is named
    /// first. Under load few holders are free and the nearest on the ring is mostly
    /// taken; without this, a device fetched each chunk from a new peer.
    met: HashMap<P, VecDeque<P>>,
    /// First copies under way to each device (blobs nobody held when the hub sent them).
    firsts: HashMap<P, u32>,
    /// Holders named to each asker and not yet reported back: its downloads under way.
    getting: HashMap<P, u32>,
    /// Holders reported silent (see [`Tracker::missed`]).
    suspects: Suspects<P>,
    last_sweep: Option<Instant>,
    topology: T,
}

impl<P: Clone + Eq + Hash, R, T: Topology<P> + Default> Tracker<P, R, T> {
    /// `capacity`: blobs remembered.
    pub fn new(capacity: usize) -> Tracker<P, R, T> {
        Tracker {
            blobs: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            reservations: HashMap::new(),
            load: HashMap::new(),
            parked: HashMap::new(),
            held: HashMap::new(),
            freed: Vec::new(),
            met: HashMap::new(),
            firsts: HashMap::new(),
            getting: HashMap::new(),
            suspects: Suspects::default(),
            last_sweep: None,
            topology: T::default(),
        }
    }

    pub fn topology(&self) -> &T {
        &self.topology
    }

    pub fn topology_mut(&mut self) -> &mut T {
        &mut self.topology
    }

    /// What to answer `asker` (who can fetch from peers) asking for `digest`. An asker
    /// with no known address (`None`) cannot be tracked: it is served if nobody holds
    /// the blob.
    pub fn decide(&mut self, digest: Digest, asker: Option<P>, now: Instant) -> Decision<P> {
        self.decide_for(digest, asker, false, now)
    }

    /// [`Tracker::decide`] for a new ask, or (`parked`) for an asker taken off the queue.
    fn decide_for(
        &mut self,
        digest: Digest,
        asker: Option<P>,
        parked: bool,
        now: Instant,
    ) -> Decision<P> {
        self.sweep(now);
        if let Some(asker) = &asker {
            // Asking again: the holders it was named failed it.
            self.release(digest, asker);
        }
        self.blob(digest);
        let load = &self.load;
        let suspects = &self.suspects;
        let live = |p: &P| suspects.is_live(p, now);
        let blob = self.blobs.get_mut(&digest).expect("just added");
        if let Some(asker) = &asker {
            if let Some(pos) = blob.holders.iter().position(|h| h.peer == *asker) {
                // It asks for what it said it held: it holds it no more.
                blob.holders.remove(pos);
                unhold(&mut self.held, asker, &digest);
            }
        }
        if !blob.holders.iter().any(|h| live(&h.peer)) {
            return self.first_copy_or_wait(digest, asker, now);
        }
        let topology = &self.topology;
        let reach = |h: &P| asker.as_ref().map_or(Reach::Far, |a| topology.reach(a, h));
        if blob
            .holders
            .iter()
            .all(|h| !live(&h.peer) || reach(&h.peer) == Reach::No)
        {
            // Held only where this asker cannot reach (other homes behind NAT).
            return Decision::Serve;
        }
        let slots = |p: &P| load.get(p).copied().unwrap_or(0);
        let mut free: Vec<usize> = (0..blob.holders.len())
            .filter(|&i| {
                let h = &blob.holders[i].peer;
                slots(h) < SLOTS && reach(h) != Reach::No && live(h)
            })
            .collect();
        // The least loaded free holder (the asker gets its whole upload); among those,
        // one the asker was paired with lately, then its nearest on the ring (see
        // `affinity`): it fetches over connections it already has instead of opening
        // one to most of the fleet (a handshake each, and every open connection costs
        // both ends timers and pings).
        let met = asker.as_ref().and_then(|a| self.met.get(a));
        free.sort_by_key(|&i| {
            let h = &blob.holders[i].peer;
            (
                // LAN first: a home's bandwidth is on its LAN, not its uplink.
                reach(h),
                slots(h),
                !met.is_some_and(|m| m.contains(h)),
                affinity(asker.as_ref(), h),
            )
        });
        let queue = self.parked.get(&digest).is_some_and(|q| !q.is_empty());
        if queue && !parked && asker.is_some() {
            // Askers are parked for this blob: they go first. A new ask taking the slot a
            // holder just freed, before the queue is looked at, would leave them waiting
            // until they lapse and ask again.
            self.freed
                .extend(free.iter().map(|&i| blob.holders[i].peer.clone()));
            return Decision::Elsewhere(vec![]);
        }
        free.truncate(NAMED);
        let named: Vec<P> = free
            .into_iter()
            .map(|i| {
                blob.holders[i].handed_out += 1;
                blob.holders[i].peer.clone()
            })
            .collect();
        self.reserve(digest, asker, named, now)
    }

    /// Nobody live holds `digest`: the hub sends it (a first copy), unless it was sent to
    /// another device lately or this asker is receiving a first copy of another blob —
    /// then the asker waits (parked, and picked for it if nobody freer asks).
    fn first_copy_or_wait(
        &mut self,
        digest: Digest,
        asker: Option<P>,
        now: Instant,
    ) -> Decision<P> {
        let suspects = &self.suspects;
        let recently_sent = self
            .blobs
            .get(&digest)
            .is_some_and(|b| b.sent_lately(now, |p: &P| suspects.is_live(p, now)));
        let busy = asker
            .as_ref()
            .is_some_and(|a| self.firsts.get(a).is_some_and(|&n| n > 0));
        if (recently_sent || busy) && asker.is_some() {
            return Decision::Elsewhere(vec![]);
        }
        self.first_copy(digest, asker, now);
        Decision::Serve
    }

    /// `named` holders are handed to `asker`: their upload slots taken and the pairing
    /// remembered until the asker reports, asks again or lapses (an untracked asker's
    /// slots are not held).
    fn reserve(
        &mut self,
        digest: Digest,
        asker: Option<P>,
        named: Vec<P>,
        now: Instant,
    ) -> Decision<P> {
        for p in &named {
            *self.load.entry(p.clone()).or_default() += 1;
        }
        if let Some(asker) = asker.filter(|_| !named.is_empty()) {
            for h in &named {
                self.meet(&asker, h);
                self.meet(h, &asker);
            }
            *self.getting.entry(asker.clone()).or_default() += 1;
            self.reservations.insert(
                (digest, asker),
                Reservation {
                    named: named.clone(),
                    at: now,
                },
            );
        } else {
            // Untracked: its slots are not held.
            self.unload(&named);
        }
        Decision::Elsewhere(named)
    }

    /// Keeps `asker`, just told to wait for `digest`, until a holder is free for it (see
    /// [`Tracker::stored`]) or [`PARK_FOR`] passes (see [`Tracker::lapsed`]). Returns
    /// parked askers answered now: an asker told to wait behind the queue while holders
    /// were free (see [`Tracker::decide`]) leaves the freed slots to the queue.
    pub fn park(&mut self, digest: Digest, asker: P, ticket: R, now: Instant) -> Vec<Answer<P, R>> {
        self.parked.entry(digest).or_default().push_back(Parked {
            asker,
            ticket,
            since: now,
        });
        self.answer_parked(now)
    }

    /// The hub sends `digest`, which nobody holds, to `asker`: no other device is sent
    /// it for [`STALE`], and the asker is sent no other first copy meanwhile if another
    /// device asks for it.
    fn first_copy(&mut self, digest: Digest, asker: Option<P>, now: Instant) {
        let blob = self.blob(digest);
        blob.served_at = Some(now);
        let before = std::mem::replace(&mut blob.first_to, asker.clone());
        // Sent again after STALE: the device it went to before has given up on it.
        self.first_landed(before);
        if let Some(a) = asker {
            *self.firsts.entry(a).or_default() += 1;
        }
    }

    fn first_landed(&mut self, to: Option<P>) {
        if let Some(n) = to.as_ref().and_then(|p| self.firsts.get_mut(p)) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.firsts.remove(to.as_ref().expect("just found"));
            }
        }
    }

    /// Blobs nobody holds or is being sent, with askers parked: each goes to the parked
    /// asker with the fewest first copies under way (the first to come among equals).
    fn pick_first(&mut self, now: Instant) -> Vec<Answer<P, R>> {
        let mut waiting: Vec<Digest> = self
            .parked
            .keys()
            .filter(|d| {
                self.blobs.get(*d).is_none_or(|b| {
                    let live = |p: &P| self.suspects.is_live(p, now);
                    !b.holders.iter().any(|h| live(&h.peer)) && !b.sent_lately(now, live)
                })
            })
            .copied()
            .collect();
        waiting.sort_unstable_by_key(|d| d.0);
        let mut out = vec![];
        for digest in waiting {
            let Some(queue) = self.parked.get_mut(&digest) else {
                continue;
            };
            let firsts = &self.firsts;
            let Some(i) = (0..queue.len())
                .min_by_key(|&i| (firsts.get(&queue[i].asker).copied().unwrap_or(0), i))
            else {
                continue;
            };
            let p = queue.remove(i).expect("in range");
            if queue.is_empty() {
                self.parked.remove(&digest);
            }
            self.first_copy(digest, Some(p.asker), now);
            out.push((p.ticket, digest, Decision::Serve));
        }
        out
    }

    /// `asker` says the holders named to it for `digest` did not deliver before its
    /// deadline (it asks again at once, see [`Tracker::decide`]): each is suspect, named
    /// to nobody for [`SUSPECT_FOR`] — twice as long each time it is reported again after
    /// a suspicion ended, up to [`SUSPECT_MAX`] —, its own downloads give their slots
    /// back and its parked asks are answered "ask again". Believed only from an asker
    /// named holders for `digest` at least [`REPORT_AFTER`] ago, at most
    /// [`REPORTS_PER_ASKER`] times per [`SUSPECT_FOR`]; a holder already suspect (askers
    /// named it before the first report) is left as it is. Call before deciding the ask,
    /// which lets the naming go. Returns the holders newly suspect and the answers.
    pub fn missed(&mut self, digest: Digest, asker: &P, now: Instant) -> Missed<P, R> {
        let mut out = Missed {
            suspected: 0,
            answers: vec![],
        };
        let Some(r) = self.reservations.get(&(digest, asker.clone())) else {
            // Named too long ago (its reservation lapsed) or never: nothing to go on.
            return out;
        };
        if !self.suspects.believe(asker, r.at, now) {
            return out;
        }
        for holder in r.named.clone() {
            if !self.suspects.suspect(&holder, now) {
                continue;
            }
            out.suspected += 1;
            // As an asker too it is likely silent (frozen, its link dead): the slots
            // named to it go to others now, not after RESERVATION, and its parked asks
            // go (a live suspect asks again). A slow uploader's downloads go on, its
            // holders serving one more asker for a while.
            self.release_where(|(_, a), _| *a == holder);
            self.parked.retain(|d, queue| {
                let (theirs, others) = std::mem::take(queue)
                    .into_iter()
                    .partition(|p| p.asker == holder);
                *queue = others;
                let again = |p: Parked<P, R>| (p.ticket, *d, Decision::Elsewhere(vec![]));
                out.answers.extend(theirs.into_iter().map(again));
                !queue.is_empty()
            });
        }
        out
    }

    /// Holders suspect now (see [`Tracker::missed`]).
    pub fn suspects(&self, now: Instant) -> u64 {
        self.suspects.count(now)
    }

    /// `peer` has stored `digest` and can serve it. Returns parked askers answered now.
    pub fn stored(&mut self, digest: Digest, peer: P, now: Instant) -> Vec<Answer<P, R>> {
        self.sweep(now);
        self.release(digest, &peer);
        let first = self.blob(digest).first_to.take();
        self.first_landed(first);
        let blob = self.blob(digest);
        if !blob.holders.iter().any(|h| h.peer == peer) {
            if blob.holders.len() >= MAX_HOLDERS {
                // Forget the most handed out: it has served its share.
                if let Some(pos) =
                    (0..blob.holders.len()).max_by_key(|&i| blob.holders[i].handed_out)
                {
                    let old = blob.holders.remove(pos);
                    unhold(&mut self.held, &old.peer, &digest);
                }
            }
            self.blob(digest).holders.push(Holder {
                peer: peer.clone(),
                handed_out: 0,
            });
            self.held.entry(peer.clone()).or_default().insert(digest);
            self.freed.push(peer);
        }
        // First copies are picked on the tick only: the askers of the moment are
        // many at the start of a release, and the first among them to ask takes all.
        self.answer_parked(now)
    }

    /// Every parked asker to answer now: with holders free since the last look, or
    /// (an empty list) to ask again, having waited [`PARK_FOR`].
    pub fn lapsed(&mut self, now: Instant) -> Vec<Answer<P, R>> {
        self.sweep(now);
        let mut out = self.answer_parked(now);
        out.extend(self.pick_first(now));
        self.parked.retain(|digest, queue| {
            while queue
                .front()
                .is_some_and(|p| now.duration_since(p.since) >= PARK_FOR)
            {
                out.extend(
                    queue
                        .pop_front()
                        .map(|p| (p.ticket, *digest, Decision::Elsewhere(vec![]))),
                );
            }
            !queue.is_empty()
        });
        out
    }

    /// Parked askers of the blobs held by holders whose slots came free, rarest blob
    /// first, askers in the order they came, while free holders last.
    fn answer_parked(&mut self, now: Instant) -> Vec<Answer<P, R>> {
        let mut blobs: Vec<Digest> = std::mem::take(&mut self.freed)
            .iter()
            .filter_map(|p| self.held.get(p))
            .flatten()
            .filter(|d| self.parked.contains_key(*d))
            .copied()
            .collect();
        blobs.sort_unstable_by_key(|d| d.0);
        blobs.dedup();
        // Rarest first (BitTorrent's rule): a free slot goes to the blob fewest devices
        // hold, so no chunk is left behind while common ones spread further.
        blobs.sort_by_cached_key(|d| self.blobs.get(d).map_or(0, |b| b.holders.len()));
        let mut answered = vec![];
        for digest in blobs {
            loop {
                let getting = &self.getting;
                let Some(queue) = self.parked.get_mut(&digest) else {
                    break;
                };
                let Some(i) = least_busy(queue, getting) else {
                    break;
                };
                let p = queue.remove(i).expect("in range");
                match self.decide_for(digest, Some(p.asker.clone()), true, now) {
                    Decision::Elsewhere(named) if !named.is_empty() => {
                        answered.push((p.ticket, digest, Decision::Elsewhere(named)))
                    }
                    // Its blob is held, but nowhere it can reach or only by suspects.
                    Decision::Serve => answered.push((p.ticket, digest, Decision::Serve)),
                    _ => {
                        // None free now.
                        let queue = self.parked.entry(digest).or_default();
                        queue.insert(i.min(queue.len()), p);
                        break;
                    }
                }
            }
            if self.parked.get(&digest).is_some_and(VecDeque::is_empty) {
                self.parked.remove(&digest);
            }
        }
        // Slots freed while answering (an asker parked for one blob and named for
        // another) are looked at next time.
        answered
    }

    /// The peer went away (disconnected from the hub): it holds nothing and waits for
    /// nothing any more.
    pub fn forget(&mut self, peer: impl Fn(&P) -> bool) {
        for blob in self.blobs.values_mut() {
            blob.holders.retain(|h| !peer(&h.peer));
            if blob.first_to.as_ref().is_some_and(&peer) {
                // Its first copy went with it: the next asker is sent one.
                blob.first_to = None;
                blob.served_at = None;
            }
        }
        self.held.retain(|p, _| !peer(p));
        self.freed.retain(|p| !peer(p));
        self.met.retain(|p, _| !peer(p));
        self.firsts.retain(|p, _| !peer(p));
        self.suspects.forget(&peer);
        self.release_where(|(_, asker), _| peer(asker));
        self.load.retain(|p, _| !peer(p));
        for r in self.reservations.values_mut() {
            r.named.retain(|p| !peer(p));
        }
        // Its pending requests went with its connection.
        self.parked.retain(|_, queue| {
            queue.retain(|p| !peer(&p.asker));
            !queue.is_empty()
        });
    }

    /// Blobs remembered.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// `a` was paired with `b` (most recent last; at most [`MET`] remembered).
    fn meet(&mut self, a: &P, b: &P) {
        let list = self.met.entry(a.clone()).or_default();
        list.retain(|p| p != b);
        if list.len() >= MET {
            list.pop_front();
        }
        list.push_back(b.clone());
    }

    /// Upload slots handed out and not yet back, over all holders.
    pub fn slots_taken(&self) -> u64 {
        self.load.values().map(|&n| u64::from(n)).sum()
    }

    /// Askers parked now.
    pub fn parked(&self) -> u64 {
        self.parked.values().map(|q| q.len() as u64).sum()
    }

    /// Slots of `peer` taken now.
    pub fn load_of(&self, peer: &P) -> u32 {
        self.load.get(peer).copied().unwrap_or(0)
    }

    fn blob(&mut self, digest: Digest) -> &mut Blob<P> {
        if !self.blobs.contains_key(&digest) {
            if self.order.len() >= self.capacity {
                if let Some(old) = self.order.pop_front() {
                    if let Some(blob) = self.blobs.remove(&old) {
                        for h in &blob.holders {
                            unhold(&mut self.held, &h.peer, &old);
                        }
                        // Its first copy is no longer under way for anyone.
                        self.first_landed(blob.first_to);
                    }
                    self.parked.remove(&old);
                    self.release_where(|(d, _), _| *d == old);
                }
            }
            self.order.push_back(digest);
        }
        self.blobs.entry(digest).or_default()
    }

    fn release(&mut self, digest: Digest, asker: &P) {
        if let Some(r) = self.reservations.remove(&(digest, asker.clone())) {
            self.unload(&r.named);
            if let Some(n) = self.getting.get_mut(asker) {
                *n -= 1;
                if *n == 0 {
                    self.getting.remove(asker);
                }
            }
        }
    }

    /// Lets go every reservation matching `pred` (by blob and asker, or by age).
    fn release_where(&mut self, pred: impl Fn(&(Digest, P), &Reservation<P>) -> bool) {
        let gone: Vec<(Digest, P)> = self
            .reservations
            .iter()
            .filter(|(key, r)| pred(key, r))
            .map(|(key, _)| key.clone())
            .collect();
        for (digest, asker) in gone {
            self.release(digest, &asker);
        }
    }

    fn unload(&mut self, named: &[P]) {
        for p in named {
            if let Some(n) = self.load.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    self.load.remove(p);
                }
                self.freed.push(p.clone());
            }
        }
    }

    /// Lets reservations older than [`RESERVATION`] go (at most once a second).
    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last_sweep = Some(now);
        self.release_where(|_, r| now.duration_since(r.at) >= RESERVATION);
        self.suspects.sweep(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn d(n: u8) -> Digest {
        Digest([n; 32])
    }

    const WAIT: Decision<&str> = Decision::Elsewhere(vec![]);

    fn tracker() -> Tracker<&'static str, u32> {
        Tracker::new(100)
    }

    /// `holder` is sent blob `n` (nobody holds it) and reports it stored.
    fn hold(t: &mut Tracker<&'static str, u32>, n: u8, holder: &'static str, now: Instant) {
        assert_eq!(t.decide(d(n), Some(holder), now), Decision::Serve);
        t.stored(d(n), holder, now);
    }

    /// Answers as (ticket, holders named); an answer to serve the blob is a test failure.
    fn named<P: std::fmt::Debug>(answers: Vec<Answer<P, u32>>) -> Vec<(u32, Vec<P>)> {
        let mut v: Vec<(u32, Vec<P>)> = answers
            .into_iter()
            .map(|(ticket, _, d)| match d {
                Decision::Elsewhere(named) => (ticket, named),
                Decision::Serve => panic!("ticket {ticket} served"),
            })
            .collect();
        v.sort_by_key(|(ticket, _)| *ticket);
        v
    }

    #[test]
    fn a_parked_asker_is_answered_by_the_next_report_or_lets_go_after_a_while() {
        let mut t = tracker();
        let now = Instant::now();
        t.decide(d(1), Some("a"), now);
        assert_eq!(t.decide(d(1), Some("b"), now), WAIT);
        t.park(d(1), "b", 1, now);
        assert_eq!(t.decide(d(1), Some("c"), now), WAIT);
        t.park(d(1), "c", 2, now);
        // a reports: both are named a at once (a has two slots), first come first.
        assert_eq!(
            named(t.stored(d(1), "a", now)),
            vec![(1, vec!["a"]), (2, vec!["a"])]
        );
        assert_eq!(t.decide(d(1), Some("d"), now), WAIT);
        t.park(d(1), "d", 3, now);
        // b reports: its slot on a goes back, and b holds it too; d is named the less
        // loaded.
        assert_eq!(named(t.stored(d(1), "b", now)), vec![(3, vec!["b"])]);
        // Nobody reports for a while: a parked asker is let go to ask again.
        assert_eq!(t.decide(d(3), Some("y"), now), Decision::Serve);
        assert_eq!(t.decide(d(3), Some("e"), now), WAIT);
        t.park(d(3), "e", 4, now);
        t.park(d(3), "x", 5, now);
        assert!(t.lapsed(now + PARK_FOR / 2).is_empty());
        assert_eq!(
            named(t.lapsed(now + PARK_FOR)),
            vec![(4, vec![]), (5, vec![])]
        );
        // An asker that went away is not answered.
        t.park(d(1), "f", 6, now);
        t.forget(|p| *p == "f");
        assert!(t.stored(d(1), "c", now).is_empty());
    }

    #[test]
    fn parked_askers_go_before_new_asks_and_the_least_busy_first() {
        let mut t = tracker();
        let now = Instant::now();
        for (blob, holder) in [(1, "h"), (2, "g")] {
            assert_eq!(t.decide(d(blob), Some(holder), now), Decision::Serve);
            t.stored(d(blob), holder, now);
        }
        // x is fetching blob 2 from g; y and v take h's two slots for blob 1.
        assert_eq!(
            t.decide(d(2), Some("x"), now),
            Decision::Elsewhere(vec!["g"])
        );
        for asker in ["y", "v"] {
            assert_eq!(
                t.decide(d(1), Some(asker), now),
                Decision::Elsewhere(vec!["h"])
            );
        }
        // x, then z, wait for blob 1.
        for (asker, ticket) in [("x", 1), ("z", 2)] {
            assert_eq!(t.decide(d(1), Some(asker), now), WAIT);
            t.park(d(1), asker, ticket, now);
        }
        // v asks again (h failed it): its slot on h comes free, but v queues behind the
        // parked askers, and the slot goes to z, who has no download under way, before
        // x, who came first but is still fetching blob 2.
        assert_eq!(t.decide(d(1), Some("v"), now), WAIT);
        assert_eq!(named(t.park(d(1), "v", 3, now)), vec![(2, vec!["h"])]);
        // x's download ends; y reports blob 1 and holds it: among equals, first come.
        assert!(t.stored(d(2), "x", now).is_empty());
        assert_eq!(
            named(t.stored(d(1), "y", now)),
            vec![(1, vec!["y"]), (3, vec!["h"])]
        );
    }

    #[test]
    fn first_copies_go_to_different_devices_and_a_lone_device_still_gets_them_all() {
        let mut t = tracker();
        let now = Instant::now();
        // a asks for three blobs nobody holds: it gets the first, waits for the others.
        assert_eq!(t.decide(d(1), Some("a"), now), Decision::Serve);
        for (n, ticket) in [(2, 2), (3, 3)] {
            assert_eq!(t.decide(d(n), Some("a"), now), WAIT);
            t.park(d(n), "a", ticket, now);
        }
        // b, receiving nothing, is sent the first copy of blob 2 at once.
        assert_eq!(t.decide(d(2), Some("b"), now), Decision::Serve);
        // At the hub's next tick, blob 3 (still nobody's) goes to a: nobody freer asked.
        let picked = t.lapsed(now);
        assert_eq!(picked.len(), 1);
        assert!(matches!(picked[0], (3, _, Decision::Serve)));
        // a reports blob 1: its first copies under way drop; blob 2 is b's.
        t.stored(d(1), "a", now);
        assert_eq!(t.decide(d(4), Some("a"), now), WAIT);
        t.stored(d(3), "a", now);
        assert_eq!(t.decide(d(4), Some("a"), now), Decision::Serve);
        // b reports blob 2: a, parked for it, is named b.
        assert_eq!(named(t.stored(d(2), "b", now)), vec![(2, vec!["b"])]);
    }

    #[test]
    fn a_holder_reported_silent_is_named_to_nobody_and_its_blob_is_sent_once_more() {
        // Issue 27: a holder frozen mid-release was named to every asker for ever.
        let mut t = tracker();
        let now = Instant::now();
        let late = now + REPORT_AFTER;
        let soon = late + Duration::from_secs(1);
        hold(&mut t, 1, "f", now);
        hold(&mut t, 2, "f", now);
        t.stored(d(2), "g", now);
        for asker in ["b", "e"] {
            assert_eq!(
                t.decide(d(1), Some(asker), now),
                Decision::Elsewhere(vec!["f"])
            );
        }
        // A report from an asker f was not named to for that blob counts for nothing.
        assert_eq!(t.missed(d(1), &"c", late).suspected, 0);
        // b's deadline passes: it says so with its next ask. f is suspect; blob 1 has no
        // other holder, so the hub sends it to b ...
        assert_eq!(t.missed(d(1), &"b", late).suspected, 1);
        assert_eq!(t.suspects(late), 1);
        assert_eq!(t.decide(d(1), Some("b"), late), Decision::Serve);
        // ... once: e's report (f was named to it before b's) changes nothing, and e and
        // c wait for b's copy, and are named b when b reports.
        assert_eq!(t.missed(d(1), &"e", soon).suspected, 0);
        assert_eq!(t.decide(d(1), Some("e"), soon), WAIT);
        t.park(d(1), "e", 2, soon);
        assert_eq!(t.decide(d(1), Some("c"), soon), WAIT);
        t.park(d(1), "c", 1, soon);
        assert_eq!(
            named(t.stored(d(1), "b", soon)),
            vec![(1, vec!["b"]), (2, vec!["b"])]
        );
        assert_eq!(t.suspects(late + SUSPECT_FOR), 0);
        // f is named for no blob: blob 2 goes to g however loaded.
        for asker in ["x", "y"] {
            assert_eq!(
                t.decide(d(2), Some(asker), soon),
                Decision::Elsewhere(vec!["g"])
            );
        }
        assert_eq!(t.decide(d(2), Some("z"), soon), WAIT);
        // After SUSPECT_FOR it is named again; silent again, it is suspect twice as long.
        let again = late + SUSPECT_FOR;
        assert_eq!(
            t.decide(d(2), Some("z"), again),
            Decision::Elsewhere(vec!["f"])
        );
        let twice = again + REPORT_AFTER;
        assert_eq!(t.missed(d(2), &"z", twice).suspected, 1);
        assert_eq!(
            t.suspects(twice + SUSPECT_FOR * 2 - Duration::from_millis(1)),
            1
        );
        assert_eq!(t.suspects(twice + SUSPECT_FOR * 2), 0);
    }

    #[test]
    fn a_report_too_soon_after_the_naming_or_beyond_an_askers_share_is_not_believed() {
        let mut t = tracker();
        let now = Instant::now();
        for (n, holder) in (1..=6).zip(["f", "g", "h", "i", "j", "k"]) {
            hold(&mut t, n, holder, now);
            assert_eq!(
                t.decide(d(n), Some("m"), now),
                Decision::Elsewhere(vec![holder])
            );
        }
        // Named and reported at once: no honest deadline is that short.
        assert_eq!(t.missed(d(1), &"m", now).suspected, 0);
        // Then REPORTS_PER_ASKER reports are taken, and no more for a while.
        let late = now + REPORT_AFTER;
        let taken: u32 = (1..=6).map(|n| t.missed(d(n), &"m", late).suspected).sum();
        assert_eq!(taken, REPORTS_PER_ASKER);
        assert_eq!(t.suspects(late), u64::from(REPORTS_PER_ASKER));
    }

    #[test]
    fn a_first_copy_on_its_way_to_a_device_that_fell_silent_is_not_waited_for() {
        // f froze while receiving the first copy of blob 2: askers of blob 2 waited for
        // it until STALE (the eight-device test: 15 s with nothing stored anywhere).
        let mut t = tracker();
        let now = Instant::now();
        let late = now + REPORT_AFTER;
        hold(&mut t, 1, "f", now);
        assert_eq!(t.decide(d(2), Some("f"), now), Decision::Serve);
        assert_eq!(t.decide(d(2), Some("a"), now), WAIT);
        t.park(d(2), "a", 1, now);
        // b, named f for blob 1, reports it silent: blob 2's copy to f is lost too.
        assert_eq!(
            t.decide(d(1), Some("b"), now),
            Decision::Elsewhere(vec!["f"])
        );
        t.missed(d(1), &"b", late);
        let picked = t.lapsed(late);
        assert!(
            matches!(picked[..], [(1, _, Decision::Serve)]),
            "{picked:?}"
        );
        // Once: c waits for a's copy.
        assert_eq!(t.decide(d(2), Some("c"), late), WAIT);
    }

    #[test]
    fn a_holder_reported_silent_gives_back_its_slots_as_an_asker_and_its_parked_asks() {
        // The eight-device test: two frozen devices' downloads held every live holder's
        // slots until RESERVATION, and nothing moved for 12 s.
        let mut t = tracker();
        let now = Instant::now();
        let late = now + REPORT_AFTER;
        hold(&mut t, 1, "f", now);
        hold(&mut t, 2, "g", now);
        hold(&mut t, 3, "h", now);
        // f downloads blob 2 from g, x takes g's other slot; a waits for blob 2, and f,
        // having asked h for blob 3 twice over with x, waits for it too.
        for asker in ["f", "x"] {
            assert_eq!(
                t.decide(d(2), Some(asker), now),
                Decision::Elsewhere(vec!["g"])
            );
        }
        assert_eq!(t.decide(d(2), Some("a"), now), WAIT);
        t.park(d(2), "a", 1, now);
        for asker in ["x", "y"] {
            assert_eq!(
                t.decide(d(3), Some(asker), now),
                Decision::Elsewhere(vec!["h"])
            );
        }
        assert_eq!(t.decide(d(3), Some("f"), now), WAIT);
        t.park(d(3), "f", 2, now);
        // b reports f silent for blob 1: f's parked ask is answered "ask again" at once,
        // and f's slot on g goes to a at the next look.
        assert_eq!(
            t.decide(d(1), Some("b"), now),
            Decision::Elsewhere(vec!["f"])
        );
        let missed = t.missed(d(1), &"b", late);
        assert_eq!(named(missed.answers), vec![(2, vec![])]);
        assert_eq!(t.parked(), 1);
        assert_eq!(named(t.lapsed(late)), vec![(1, vec!["g"])]);
    }

    #[test]
    fn parked_askers_of_a_blob_whose_holders_fell_silent_get_one_copy_at_the_tick() {
        let mut t = tracker();
        let now = Instant::now();
        let late = now + REPORT_AFTER;
        hold(&mut t, 1, "f", now);
        // f's two slots taken, then c parked behind them.
        for asker in ["a", "b"] {
            assert_eq!(
                t.decide(d(1), Some(asker), now),
                Decision::Elsewhere(vec!["f"])
            );
        }
        assert_eq!(t.decide(d(1), Some("c"), now), WAIT);
        assert!(t.park(d(1), "c", 1, now).is_empty());
        // a reports f silent and is served the blob; at the tick, c still waits (one
        // copy under way), and is named a once a has it.
        t.missed(d(1), &"a", late);
        assert_eq!(t.decide(d(1), Some("a"), late), Decision::Serve);
        assert!(t.lapsed(late).is_empty());
        assert_eq!(named(t.stored(d(1), "a", late)), vec![(1, vec!["a"])]);
        // Had nobody been sent a copy (the asker that reported it went away), the tick
        // sends one to a parked asker.
        let mut t = tracker();
        hold(&mut t, 1, "f", now);
        assert_eq!(
            t.decide(d(1), Some("a"), now),
            Decision::Elsewhere(vec!["f"])
        );
        t.missed(d(1), &"a", late);
        t.forget(|p| *p == "a");
        assert_eq!(t.decide(d(1), Some("c"), late), Decision::Serve);
        assert_eq!(t.decide(d(1), Some("e"), late), WAIT);
        t.park(d(1), "e", 2, late);
        t.forget(|p| *p == "c");
        let picked = t.lapsed(late + Duration::from_secs(1));
        assert!(
            matches!(picked[..], [(2, _, Decision::Serve)]),
            "{picked:?}"
        );
    }

    #[test]
    fn a_forgotten_blob_frees_its_first_copy() {
        // Two blobs remembered: a's first copy of blob 1 is forgotten with the blob (a
        // never reported it), and a gets the next first copy at once.
        let mut t: Tracker<&str, u32> = Tracker::new(2);
        let now = Instant::now();
        assert_eq!(t.decide(d(1), Some("a"), now), Decision::Serve);
        t.decide(d(2), Some("b"), now);
        t.decide(d(3), Some("b"), now);
        assert_eq!(t.decide(d(4), Some("a"), now), Decision::Serve);
    }

    #[test]
    fn first_asker_is_served_the_next_wait_until_it_reports_the_blob_stored() {
        let mut t = tracker();
        let now = Instant::now();
        assert_eq!(t.decide(d(1), Some("a"), now), Decision::Serve);
        // a is still fetching it: b is to ask again shortly, not to ask a.
        assert_eq!(t.decide(d(1), Some("b"), now), WAIT);
        t.stored(d(1), "a", now);
        assert_eq!(
            t.decide(d(1), Some("c"), now),
            Decision::Elsewhere(vec!["a"])
        );
        // Another blob has its own first asker.
        assert_eq!(t.decide(d(2), Some("b"), now), Decision::Serve);
    }

    #[test]
    fn a_free_slot_goes_to_the_rarest_blob_first() {
        let mut t = tracker();
        let now = Instant::now();
        // h and g hold a common blob, h alone a rare one; both have every slot taken.
        t.decide(d(1), Some("h"), now);
        t.stored(d(1), "h", now);
        t.stored(d(1), "g", now);
        t.stored(d(2), "h", now);
        t.stored(d(3), "h", now);
        for asker in ["a1", "a2"] {
            assert_eq!(
                t.decide(d(3), Some(asker), now),
                Decision::Elsewhere(vec!["h"])
            );
        }
        for asker in ["b1", "b2"] {
            assert_eq!(
                t.decide(d(1), Some(asker), now),
                Decision::Elsewhere(vec!["g"])
            );
        }
        assert_eq!(t.decide(d(1), Some("c"), now), WAIT);
        t.park(d(1), "c", 1, now);
        assert_eq!(t.decide(d(2), Some("r"), now), WAIT);
        t.park(d(2), "r", 2, now);
        // a1 reports: one slot of h comes free, and goes to the rare blob's asker.
        assert_eq!(named(t.stored(d(3), "a1", now)), vec![(2, vec!["h"])]);
    }

    #[test]
    fn a_holder_is_named_to_at_most_its_slots_until_askers_report_back() {
        let mut t = tracker();
        let now = Instant::now();
        t.decide(d(1), Some("a"), now);
        t.stored(d(1), "a", now);
        for asker in ["b", "c"] {
            assert_eq!(
                t.decide(d(1), Some(asker), now),
                Decision::Elsewhere(vec!["a"])
            );
        }
        assert_eq!(t.load_of(&"a"), SLOTS);
        // Slots count across blobs: a, full, is not named for another blob it holds.
        t.decide(d(2), Some("a"), now);
        t.stored(d(2), "a", now);
        assert_eq!(t.decide(d(2), Some("x"), now), WAIT);
        assert_eq!(t.decide(d(1), Some("d"), now), WAIT);
        // b got it: a has a free slot again, and b is a holder too.
        t.stored(d(1), "b", now);
        assert_eq!(t.load_of(&"a"), 1);
        assert_eq!(
            t.decide(d(1), Some("d"), now),
            Decision::Elsewhere(vec!["b"])
        );
    }

    #[test]
    fn asking_again_gives_the_slots_back_and_the_asker_is_no_holder() {
        let mut t = tracker();
        let now = Instant::now();
        t.decide(d(1), Some("a"), now);
        t.stored(d(1), "a", now);
        t.decide(d(1), Some("b"), now);
        assert_eq!(t.load_of(&"a"), 1);
        // b's holder failed it: it asks again and its old slot goes back first.
        assert_eq!(
            t.decide(d(1), Some("b"), now),
            Decision::Elsewhere(vec!["a"])
        );
        assert_eq!(t.load_of(&"a"), 1);
        // a asks for the blob it said it held (lost it): it is no holder any more, and
        // the hub sent it long ago, so a is served.
        assert_eq!(t.decide(d(1), Some("a"), now + STALE), Decision::Serve);
    }

    #[test]
    fn reservations_lapse_and_a_blob_nobody_reports_is_sent_again() {
        let mut t = tracker();
        let now = Instant::now();
        t.decide(d(1), Some("a"), now);
        t.stored(d(1), "a", now);
        t.decide(d(1), Some("b"), now);
        t.decide(d(1), Some("c"), now);
        assert_eq!(t.decide(d(1), Some("d"), now), WAIT);
        // b and c never report: their slots lapse.
        let later = now + RESERVATION;
        assert_eq!(
            t.decide(d(1), Some("d"), later),
            Decision::Elsewhere(vec!["a"])
        );
        // A blob sent to a device that never reports is sent again after STALE.
        assert_eq!(t.decide(d(2), Some("x"), now), Decision::Serve);
        assert_eq!(t.decide(d(2), Some("y"), now + STALE / 2), WAIT);
        assert_eq!(t.decide(d(2), Some("y"), now + STALE), Decision::Serve);
    }

    #[test]
    fn a_fleet_gets_each_blob_from_the_hub_once_and_uploads_spread_as_a_tree() {
        // 1,000 devices want one blob; a transfer takes a second. Told to wait, a device
        // is parked; otherwise it asks again 100 ms after a parking lapses. The hub sends
        // one copy, no holder is ever named to more than SLOTS askers at once, and the
        // fleet has the blob in about log2(1000) transfer times.
        let mut t: Tracker<u32, u32> = Tracker::new(100);
        let start = Instant::now();
        let mut served = 0;
        let mut have: HashSet<u32> = HashSet::new();
        let mut arriving: Vec<(Instant, u32)> = vec![];
        let mut busy: HashSet<u32> = HashSet::new();
        let mut step = 0u64;
        while have.len() < 1000 {
            let now = start + Duration::from_millis(step * 100);
            step += 1;
            assert!(step < 400, "not done after 40 s: {} have it", have.len());
            for (who, named) in named(t.lapsed(now)) {
                if named.is_empty() {
                    busy.remove(&who);
                } else {
                    arriving.push((now + Duration::from_secs(1), who));
                }
            }
            for (at, who) in std::mem::take(&mut arriving) {
                if at > now {
                    arriving.push((at, who));
                    continue;
                }
                have.insert(who);
                for (parked, named) in named(t.stored(d(1), who, now)) {
                    assert!(!named.is_empty() && named.len() <= NAMED);
                    arriving.push((now + Duration::from_secs(1), parked));
                }
            }
            for i in 0..1000u32 {
                if have.contains(&i) || busy.contains(&i) {
                    continue;
                }
                busy.insert(i);
                match t.decide(d(1), Some(i), now) {
                    Decision::Serve => {
                        served += 1;
                        arriving.push((now + Duration::from_secs(1), i));
                    }
                    Decision::Elsewhere(peers) if peers.is_empty() => {
                        for (parked, named) in named(t.park(d(1), i, i, now)) {
                            assert!(!named.is_empty() && named.len() <= NAMED);
                            arriving.push((now + Duration::from_secs(1), parked));
                        }
                    }
                    Decision::Elsewhere(peers) => {
                        assert!(peers.len() <= NAMED);
                        assert!(!peers.contains(&i), "never sent to itself");
                        arriving.push((now + Duration::from_secs(1), i));
                    }
                }
            }
            for h in &have {
                assert!(t.load_of(h) <= SLOTS);
            }
        }
        assert_eq!(served, 1, "the hub sends the blob once");
        let took = Duration::from_millis(step * 100);
        assert!(took <= Duration::from_secs(12), "{took:?}");
    }

    #[test]
    fn a_free_holder_the_asker_was_paired_with_is_named_before_the_nearest() {
        let mut t = tracker();
        let now = Instant::now();
        // Two holders of blob 1; "x" prefers one of them by ring distance.
        t.decide(d(1), Some("h1"), now);
        t.stored(d(1), "h1", now);
        assert_eq!(
            t.decide(d(1), Some("h2"), now),
            Decision::Elsewhere(vec!["h1"])
        );
        t.stored(d(1), "h2", now);
        let (near, far) = if affinity(Some(&"x"), &"h1") < affinity(Some(&"x"), &"h2") {
            ("h1", "h2")
        } else {
            ("h2", "h1")
        };
        // x meets the far one over blob 2, which only it holds.
        t.decide(d(2), Some(far), now);
        t.stored(d(2), far, now);
        assert_eq!(
            t.decide(d(2), Some("x"), now),
            Decision::Elsewhere(vec![far])
        );
        t.stored(d(2), "x", now);
        // For blob 1, x is sent to the peer it already has a connection to.
        assert_eq!(
            t.decide(d(1), Some("x"), now),
            Decision::Elsewhere(vec![far])
        );
        // A newcomer, paired with nobody, gets the nearest.
        let newcomer = if affinity(Some(&"y"), &near) < affinity(Some(&"y"), &far) {
            ("y", near)
        } else {
            ("y", far)
        };
        assert_eq!(
            t.decide(d(1), Some(newcomer.0), now),
            Decision::Elsewhere(vec![newcomer.1])
        );
    }

    #[test]
    fn a_peer_that_went_away_holds_nothing_and_frees_its_slots() {
        let mut t = tracker();
        let now = Instant::now();
        t.decide(d(1), Some("a"), now);
        t.stored(d(1), "a", now);
        t.decide(d(1), Some("b"), now);
        t.stored(d(1), "c", now);
        t.decide(d(1), Some("e"), now);
        assert_eq!(t.load_of(&"a") + t.load_of(&"c"), 2);
        // e goes away before reporting: its slot goes back.
        t.forget(|p| *p == "e");
        assert_eq!(t.load_of(&"a") + t.load_of(&"c"), 1);
        t.forget(|p| *p == "a");
        assert_eq!(
            t.decide(d(1), Some("f"), now),
            Decision::Elsewhere(vec!["c"])
        );
        t.forget(|p| *p == "c");
        assert_eq!(t.decide(d(1), Some("g"), now + STALE), Decision::Serve);
    }

    #[test]
    fn an_asker_without_an_address_is_served_or_named_but_holds_no_slot_and_memory_is_bounded() {
        let mut t: Tracker<u32> = Tracker::new(3);
        let now = Instant::now();
        assert_eq!(t.decide(d(1), None, now), Decision::Serve);
        assert_eq!(t.decide(d(1), None, now), Decision::Serve);
        t.stored(d(1), 7, now);
        assert_eq!(t.decide(d(1), None, now), Decision::Elsewhere(vec![7]));
        assert_eq!(t.load_of(&7), 0);
        for n in 2..10 {
            t.decide(d(n), Some(1), now);
            t.stored(d(n), 2, now);
            t.decide(d(n), Some(3), now);
        }
        assert_eq!(t.len(), 3);
        // Reservations of forgotten blobs are gone with them.
        assert!(t.reservations.len() <= 3);
        assert!(t.load_of(&2) <= SLOTS);
    }
}
