//! The node's events to its owner: a bounded channel the node never waits on.
//!
//! The application awaits the node (commands on a bounded channel, replies), so a node
//! awaiting a full event channel deadlocks with it: a hub answering thousands of parked
//! requests at once stopped for good that way. So the node only ever `try_send`s, and an
//! event that does not fit is, by kind:
//! - **dropped and counted** ([`crate::NetState::events_dropped`]) when someone else
//!   can act on it: a gossip message is handed back to the node, which tells gossipsub
//!   to ignore it (not forwarded; the hub re-announces and peers re-gossip), and a blob
//!   request is handed back to be answered `Busy` (the asker tries elsewhere, as with
//!   any busy peer);
//! - **held** in order when the application's view of its peers depends on it
//!   (`Listening`, `PeerConnected`, `PeerDisconnected`), and sent as room frees up. The
//!   holding is bounded by coalescing: a peer that connects and disconnects while its
//!   events are held cancels out, so at most one event per peer (and one per listener)
//!   waits.
//!
//! While anything is held, droppable events are dropped even if a slot has freed, so the
//! application never sees events out of order.

use crate::event::{NetEvent, ReplyId};
use crate::state::NetState;
use libp2p::gossipsub::MessageId;
use libp2p::PeerId;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc::{self, error::TrySendError};

/// Capacity of the node's event channel: several seconds of a busy hub's events (a
/// 1,000-device release asks the hub a few hundred times a second, and the hub parks each
/// request at once). The node never waits on it (the application awaits the node: both
/// waiting deadlocked a hub once). Full, the application is stalled, and the node sheds
/// load: a gossip message is ignored (not forwarded), a blob request answered `Busy`,
/// each counted in [`crate::NetState::events_dropped`]; `Listening`, `PeerConnected` and
/// `PeerDisconnected` are held in order until there is room (at most one per peer: a
/// connect and disconnect both held cancel out).
pub const EVENT_CAPACITY: usize = 4096;

/// An event the application was too far behind to take, for the node to answer in its
/// place.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Shed {
    /// Tell gossipsub to ignore the message.
    Gossip { id: MessageId, source: PeerId },
    /// Answer the request `Busy`.
    Blob { peer: PeerId, reply: ReplyId },
}

#[derive(Debug)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<NetEvent>,
    held: VecDeque<NetEvent>,
    state: Arc<NetState>,
}

impl Outbox {
    pub(crate) fn new(tx: mpsc::Sender<NetEvent>, state: Arc<NetState>) -> Outbox {
        Outbox {
            tx,
            held: VecDeque::new(),
            state,
        }
    }

    /// Sends `ev` now, holds it, or sheds it (counted as dropped) for the node to answer
    /// in the application's place. Never waits.
    #[must_use = "a shed event must be answered (gossip ignored, request busy)"]
    pub(crate) fn emit(&mut self, ev: NetEvent) -> Option<Shed> {
        self.try_flush();
        let ev = if self.held.is_empty() {
            match self.tx.try_send(ev) {
                Ok(()) => return None,
                // The application is gone: nobody to tell (it stops the node next).
                Err(TrySendError::Closed(_)) => return None,
                Err(TrySendError::Full(ev)) => ev,
            }
        } else {
            ev
        };
        let shed = match ev {
            NetEvent::Gossip { id, source, .. } => Shed::Gossip { id, source },
            NetEvent::BlobWanted { peer, reply, .. } => Shed::Blob { peer, reply },
            kept => {
                self.hold(kept);
                return None;
            }
        };
        self.state.events_dropped.fetch_add(1, Ordering::Relaxed);
        Some(shed)
    }

    fn hold(&mut self, ev: NetEvent) {
        let opposite = |held: &NetEvent| match (&ev, held) {
            (NetEvent::PeerConnected(p), NetEvent::PeerDisconnected(q))
            | (NetEvent::PeerDisconnected(p), NetEvent::PeerConnected(q)) => p == q,
            _ => false,
        };
        match self.held.iter().position(opposite) {
            // The application never saw the one it cancels.
            Some(i) => drop(self.held.remove(i)),
            None => self.held.push_back(ev),
        }
    }

    /// Events held for want of room.
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }

    fn try_flush(&mut self) {
        while let Some(ev) = self.held.pop_front() {
            match self.tx.try_send(ev) {
                Ok(()) => {}
                Err(TrySendError::Full(ev)) => {
                    self.held.push_front(ev);
                    return;
                }
                Err(TrySendError::Closed(_)) => {
                    self.held.clear();
                    return;
                }
            }
        }
    }

    /// Waits for room and sends what is held (cancel-safe: nothing is taken out of
    /// `held` before the slot is there). Only worth awaiting while [`Outbox::held`] > 0.
    pub(crate) async fn flush(&mut self) {
        match self.tx.reserve().await {
            Ok(permit) => {
                if let Some(ev) = self.held.pop_front() {
                    permit.send(ev);
                }
            }
            Err(_) => {
                self.held.clear();
                return;
            }
        }
        self.try_flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    fn gossip() -> NetEvent {
        NetEvent::Gossip {
            topic: crate::event::Topic::Announce,
            data: vec![1],
            source: peer(),
            id: libp2p::gossipsub::MessageId::from(vec![1]),
        }
    }

    fn outbox(capacity: usize) -> (Outbox, mpsc::Receiver<NetEvent>, Arc<NetState>) {
        let (tx, rx) = mpsc::channel(capacity);
        let state = Arc::new(NetState::default());
        (Outbox::new(tx, state.clone()), rx, state)
    }

    fn dropped(state: &NetState) -> u64 {
        state.events_dropped.load(Ordering::Relaxed)
    }

    #[test]
    fn with_room_everything_goes_through_in_order() {
        let (mut out, mut rx, state) = outbox(4);
        let p = peer();
        assert!(out.emit(NetEvent::PeerConnected(p)).is_none());
        assert!(out.emit(gossip()).is_none());
        assert!(matches!(rx.try_recv(), Ok(NetEvent::PeerConnected(q)) if q == p));
        assert!(matches!(rx.try_recv(), Ok(NetEvent::Gossip { .. })));
        assert_eq!(dropped(&state), 0);
    }

    #[test]
    fn full_gossip_is_handed_back_and_counted() {
        let (mut out, _rx, state) = outbox(1);
        assert!(out.emit(gossip()).is_none());
        assert!(matches!(out.emit(gossip()), Some(Shed::Gossip { .. })));
        assert_eq!(dropped(&state), 1);
        assert_eq!(out.held(), 0);
    }

    #[tokio::test]
    async fn peer_events_are_held_until_there_is_room_and_droppables_wait_behind_none() {
        let (mut out, mut rx, state) = outbox(1);
        let (p, q) = (peer(), peer());
        assert!(out.emit(gossip()).is_none());
        assert!(out.emit(NetEvent::PeerConnected(p)).is_none());
        assert!(out.emit(NetEvent::PeerConnected(q)).is_none());
        assert_eq!(out.held(), 2);
        assert!(rx.try_recv().is_ok(), "the gossip");
        // A slot is free: the oldest held event takes it, and a gossip behind the
        // other is dropped rather than sent ahead of it.
        assert!(out.emit(gossip()).is_some());
        assert_eq!(dropped(&state), 1);
        assert!(matches!(rx.try_recv(), Ok(NetEvent::PeerConnected(x)) if x == p));
        out.flush().await;
        assert!(matches!(rx.try_recv(), Ok(NetEvent::PeerConnected(x)) if x == q));
        assert_eq!(out.held(), 0);
    }

    #[test]
    fn a_peer_gone_while_held_cancels_out() {
        let (mut out, _rx, _) = outbox(1);
        let (p, q) = (peer(), peer());
        assert!(out
            .emit(NetEvent::Listening("/ip4/127.0.0.1/tcp/1".parse().unwrap()))
            .is_none());
        for _ in 0..100 {
            assert!(out.emit(NetEvent::PeerConnected(p)).is_none());
            assert!(out.emit(NetEvent::PeerDisconnected(p)).is_none());
        }
        assert!(out.emit(NetEvent::PeerDisconnected(q)).is_none());
        assert!(out.emit(NetEvent::PeerConnected(q)).is_none());
        assert_eq!(out.held(), 0, "the Listening went out, the rest cancelled");
    }

    #[tokio::test]
    async fn a_closed_channel_drops_what_is_held() {
        let (mut out, rx, _) = outbox(1);
        assert!(out.emit(NetEvent::PeerConnected(peer())).is_none());
        assert!(out.emit(NetEvent::PeerConnected(peer())).is_none());
        assert_eq!(out.held(), 1);
        drop(rx);
        out.flush().await;
        assert_eq!(out.held(), 0);
        assert!(out.emit(gossip()).is_none(), "nobody to hand it to");
    }
}
