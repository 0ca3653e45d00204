//! Chunks move only over direct connections. A device behind NAT in another home is
//! reached through the hub's relay, which is sized for signalling, not bulk: a request for
//! such a peer is held while DCUtR tries to punch a direct connection, sent the moment one
//! is up (and the relayed one gone: request-response spreads requests over every
//! connection to a peer), and refused with "no direct path" if punching fails or takes
//! longer than [`PUNCH_WAIT`] — the asker then gets the chunk from the hub. A peer that
//! could not be punched to is not tried through the relay again for [`FAILED_FOR`].
//!
//! No I/O and no clock of its own (callers pass `now`), like the hub's tracker.

use libp2p::PeerId;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a request waits for a hole punch (DCUtR makes up to 3 attempts, each a
/// round trip through the relay and a simultaneous open).
pub const PUNCH_WAIT: Duration = Duration::from_secs(10);
/// A peer that could not be punched to is reached through the hub this long.
pub const FAILED_FOR: Duration = Duration::from_secs(10 * 60);

/// The kind of address a request came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A direct address (a LAN neighbour, a public peer).
    Direct,
    /// A relay circuit: dialled to start a hole punch.
    Relay,
}

/// What to do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<T> {
    /// Send it now (over a direct connection, or dial the peer directly).
    Send(T),
    /// Kept until a direct connection is up or punching fails; `dial`: the caller dials
    /// the address it was given (no connection, or only a relayed one, is up for it).
    Held { dial: bool },
    /// No direct path to this peer: answer the asker so.
    NoDirectPath(T),
}

#[derive(Debug)]
struct Peer<T> {
    direct: u32,
    relayed: u32,
    held: Vec<(T, Instant)>,
    failed_at: Option<Instant>,
}

impl<T> Default for Peer<T> {
    fn default() -> Self {
        Peer {
            direct: 0,
            relayed: 0,
            held: Vec::new(),
            failed_at: None,
        }
    }
}

impl<T> Peer<T> {
    /// A direct connection and no relayed one left to share requests with.
    fn clear(&self) -> bool {
        self.direct > 0 && self.relayed == 0
    }

    fn take_held(&mut self) -> Vec<T> {
        std::mem::take(&mut self.held)
            .into_iter()
            .map(|(t, _)| t)
            .collect()
    }
}

/// Per peer: its direct and relayed connections, the requests waiting for a direct one,
/// and whether punching to it failed lately.
#[derive(Debug)]
pub struct Upgrades<T> {
    peers: HashMap<PeerId, Peer<T>>,
}

impl<T> Default for Upgrades<T> {
    fn default() -> Self {
        Upgrades {
            peers: HashMap::new(),
        }
    }
}

impl<T> Upgrades<T> {
    /// A request for `peer`, with the address the caller was given for it, if any.
    pub fn request(&mut self, peer: PeerId, item: T, via: Option<Via>, now: Instant) -> Verdict<T> {
        let p = self.peers.entry(peer).or_default();
        if p.clear() {
            return Verdict::Send(item);
        }
        let failed = p
            .failed_at
            .is_some_and(|t| now.duration_since(t) < FAILED_FOR);
        let only_relay = via != Some(Via::Direct) && p.direct == 0;
        if only_relay && failed && (p.relayed > 0 || via == Some(Via::Relay)) {
            return Verdict::NoDirectPath(item);
        }
        if p.direct > 0 || p.relayed > 0 || via.is_some() {
            // Direct but a relayed one still closing, only relayed, or about to be
            // dialled at the address given (a request would take a relayed connection).
            // A second circuit would only start another punch beside the first.
            let dial =
                p.direct == 0 && (via == Some(Via::Direct) || p.relayed == 0 && via.is_some());
            p.held.push((item, now));
            return Verdict::Held { dial };
        }
        // Not connected, and no address given: the request dials what is known.
        self.forget_if_idle(peer);
        Verdict::Send(item)
    }

    /// A connection to `peer` is up. Returns held requests that can go now.
    pub fn connected(&mut self, peer: PeerId, relayed: bool) -> Vec<T> {
        let p = self.peers.entry(peer).or_default();
        if relayed {
            p.relayed += 1;
        } else {
            p.direct += 1;
            p.failed_at = None;
        }
        self.release(peer)
    }

    /// A connection to `peer` closed. Returns held requests that can go now, and (when
    /// its last connection closed) those that now have nowhere to go.
    pub fn disconnected(&mut self, peer: PeerId, relayed: bool) -> (Vec<T>, Vec<T>) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return (vec![], vec![]);
        };
        if relayed {
            p.relayed = p.relayed.saturating_sub(1);
        } else {
            p.direct = p.direct.saturating_sub(1);
        }
        if p.direct == 0 && p.relayed == 0 && p.failed_at.is_none() {
            // The relayed connection went without a direct one: punching did not work.
            let dropped = p.take_held();
            self.forget_if_idle(peer);
            return (vec![], dropped);
        }
        (self.release(peer), vec![])
    }

    /// DCUtR gave up on `peer`: its held requests have no direct path.
    pub fn punch_failed(&mut self, peer: PeerId, now: Instant) -> Vec<T> {
        let p = self.peers.entry(peer).or_default();
        if p.direct > 0 {
            return vec![];
        }
        p.failed_at = Some(now);
        p.take_held()
    }

    /// Requests held longer than [`PUNCH_WAIT`] (their peers count as failed).
    pub fn expired(&mut self, now: Instant) -> Vec<T> {
        let mut out = vec![];
        for p in self.peers.values_mut() {
            if p.held
                .iter()
                .any(|(_, t)| now.duration_since(*t) >= PUNCH_WAIT)
            {
                if p.direct == 0 {
                    p.failed_at = Some(now);
                }
                let (old, keep) = std::mem::take(&mut p.held)
                    .into_iter()
                    .partition(|(_, t)| now.duration_since(*t) >= PUNCH_WAIT);
                p.held = keep;
                out.extend(old.into_iter().map(|(t, _): (T, Instant)| t));
            }
        }
        self.peers.retain(|_, p| {
            p.direct > 0 || p.relayed > 0 || !p.held.is_empty() || p.failed_at.is_some()
        });
        out
    }

    /// Requests waiting now.
    pub fn held(&self) -> usize {
        self.peers.values().map(|p| p.held.len()).sum()
    }

    fn release(&mut self, peer: PeerId) -> Vec<T> {
        match self.peers.get_mut(&peer) {
            Some(p) if p.clear() => p.take_held(),
            _ => vec![],
        }
    }

    fn forget_if_idle(&mut self, peer: PeerId) {
        if self.peers.get(&peer).is_some_and(|p| {
            p.direct == 0 && p.relayed == 0 && p.held.is_empty() && p.failed_at.is_none()
        }) {
            self.peers.remove(&peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn a_request_through_the_relay_waits_for_the_punch_and_goes_once_the_relay_is_gone() {
        let mut u = Upgrades::default();
        let (p, now) = (peer(), Instant::now());
        assert_eq!(
            u.request(p, 1, Some(Via::Relay), now),
            Verdict::Held { dial: true }
        );
        assert_eq!(u.connected(p, true), Vec::<i32>::new());
        assert_eq!(u.request(p, 2, None, now), Verdict::Held { dial: false });
        // The punch worked: direct up, but the relayed connection still shares requests.
        assert_eq!(u.connected(p, false), Vec::<i32>::new());
        assert_eq!(u.request(p, 3, None, now), Verdict::Held { dial: false });
        assert_eq!(u.disconnected(p, true), (vec![1, 2, 3], vec![]));
        assert_eq!(u.request(p, 4, None, now), Verdict::Send(4));
        assert_eq!(u.held(), 0);
    }

    #[test]
    fn a_failed_punch_refuses_what_waits_and_what_comes_for_a_while_then_tries_again() {
        let mut u = Upgrades::default();
        let (p, now) = (peer(), Instant::now());
        u.request(p, 1, Some(Via::Relay), now);
        u.connected(p, true);
        assert_eq!(u.punch_failed(p, now), vec![1]);
        assert_eq!(u.request(p, 2, None, now), Verdict::NoDirectPath(2));
        u.disconnected(p, true);
        assert_eq!(
            u.request(p, 3, Some(Via::Relay), now),
            Verdict::NoDirectPath(3)
        );
        let later = now + FAILED_FOR;
        assert_eq!(
            u.request(p, 4, Some(Via::Relay), later),
            Verdict::Held { dial: true }
        );
    }

    #[test]
    fn a_punch_that_never_answers_expires_and_counts_as_failed() {
        let mut u = Upgrades::default();
        let (p, now) = (peer(), Instant::now());
        u.request(p, 1, Some(Via::Relay), now);
        u.connected(p, true);
        u.request(p, 2, None, now + Duration::from_secs(5));
        assert_eq!(u.expired(now + Duration::from_secs(9)), Vec::<i32>::new());
        assert_eq!(u.expired(now + PUNCH_WAIT), vec![1]);
        assert_eq!(u.expired(now + Duration::from_secs(15)), vec![2]);
        assert_eq!(
            u.request(p, 3, None, now + Duration::from_secs(16)),
            Verdict::NoDirectPath(3)
        );
    }

    #[test]
    fn a_relayed_connection_that_closes_without_a_direct_one_drops_what_waits() {
        let mut u = Upgrades::default();
        let (p, now) = (peer(), Instant::now());
        u.request(p, 1, Some(Via::Relay), now);
        u.connected(p, true);
        assert_eq!(u.disconnected(p, true), (vec![], vec![1]));
    }

    #[test]
    fn direct_peers_and_unconnected_direct_dials_are_never_held() {
        let mut u = Upgrades::default();
        let (p, q, now) = (peer(), peer(), Instant::now());
        assert_eq!(u.request(p, 1, None, now), Verdict::Send(1));
        u.connected(q, false);
        assert_eq!(u.request(q, 2, Some(Via::Direct), now), Verdict::Send(2));
        assert_eq!(u.held(), 0);
    }

    #[test]
    fn a_lan_address_given_for_a_peer_reached_only_through_the_relay_is_dialled_first() {
        let mut u = Upgrades::default();
        let (p, now) = (peer(), Instant::now());
        u.connected(p, true);
        // Even after a failed punch: the LAN address does not need one.
        u.punch_failed(p, now);
        assert_eq!(
            u.request(p, 1, Some(Via::Direct), now),
            Verdict::Held { dial: true }
        );
        assert_eq!(u.connected(p, false), Vec::<i32>::new());
        assert_eq!(u.disconnected(p, true), (vec![1], vec![]));
    }

    #[test]
    fn a_peer_already_reached_through_the_relay_is_not_dialled_through_it_again() {
        let mut u = Upgrades::default();
        let (p, now) = (peer(), Instant::now());
        assert_eq!(
            u.request(p, 1, Some(Via::Relay), now),
            Verdict::Held { dial: true }
        );
        u.connected(p, true);
        assert_eq!(
            u.request(p, 2, Some(Via::Relay), now),
            Verdict::Held { dial: false }
        );
    }
}
