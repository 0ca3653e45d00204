//! What the node counts about its connections, shared with the caller's metrics.

use proto::status::Reachability;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

fn reachability_from_u8(n: u8) -> Reachability {
    match n {
        1 => Reachability::Public,
        2 => Reachability::Relayed,
        3 => Reachability::Unreachable,
        _ => Reachability::Unknown,
    }
}

/// What the node counts about its connections (read with [`crate::NetClient::state`]).
#[derive(Debug, Default)]
pub struct NetState {
    reachability: AtomicU8,
    /// DCUtR upgrades that ended in a direct connection, and those that gave up.
    pub hole_punches: AtomicU64,
    pub hole_punch_failures: AtomicU64,
    /// Connections established (each a TCP connection with a noise handshake), inbound
    /// and outbound.
    pub connections_opened: AtomicU64,
    /// Blob-protocol requests sent and received: each is one request and its answer on a
    /// yamux stream of its own.
    pub requests_sent: AtomicU64,
    pub requests_received: AtomicU64,
    /// Events the application was too far behind to take (its event channel full, see
    /// [`crate::EVENT_CAPACITY`]): gossip left unvalidated (ignored) and blob requests
    /// answered `Busy` by the node itself.
    pub events_dropped: AtomicU64,
}

impl NetState {
    pub fn reachability(&self) -> Reachability {
        reachability_from_u8(self.reachability.load(Ordering::Relaxed))
    }

    pub(crate) fn set_reachability(&self, r: Reachability) {
        self.reachability.store(r as u8, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reachability_round_trips_through_its_byte() {
        let s = NetState::default();
        assert_eq!(s.reachability(), Reachability::Unknown);
        for r in [
            Reachability::Public,
            Reachability::Relayed,
            Reachability::Unreachable,
            Reachability::Unknown,
        ] {
            s.set_reachability(r);
            assert_eq!(s.reachability(), r);
        }
    }
}
