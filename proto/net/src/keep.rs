//! Which connections stay open when idle: up to [`KEPT`] direct connections to devices in
//! other networks.
//!
//! Such a connection cost a relay reservation and a hole punch (or it reached a device
//! with a public address), and with the hub down it cannot be made again: DCUtR needs the
//! hub's relay, and a NAT lets in no new connection from outside. Left to the idle
//! timeout it closes a minute after its last chunk unless gossipsub happens to keep it
//! in its mesh, and a home cut off from the hub would be left with its LAN alone. LAN
//! connections (found again by mDNS), relayed ones (only a way to punch) and those to the
//! bootstrap peers (redialled by the node) close when idle as before. Pings on every
//! connection (see `PING_EVERY` in the node) keep a kept connection's NAT mappings alive.
//!
//! [`Kept`] makes the choice, with no I/O; [`Behaviour`] applies it to the swarm: the
//! handler of a kept connection asks libp2p to keep it alive.

use crate::addr::{is_private, is_relayed};
use libp2p::core::{transport::PortUse, upgrade::DeniedUpgrade, Endpoint, Multiaddr};
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::PeerId;
use std::collections::HashSet;
use std::convert::Infallible;
use std::task::{Context, Poll};

/// Direct connections kept open at most: enough for a home to keep several ways out when
/// the hub is gone, few enough that a device's connection count stays bounded.
pub const KEPT: usize = 8;

/// The connections kept open, first come first kept.
#[derive(Debug)]
pub struct Kept {
    kept: HashSet<ConnectionId>,
    /// Peers never kept: the bootstrap peers (the hub), which the node redials anyway.
    never: HashSet<PeerId>,
    max: usize,
}

impl Kept {
    pub fn new(never: impl IntoIterator<Item = PeerId>, max: usize) -> Kept {
        Kept {
            kept: HashSet::new(),
            never: never.into_iter().collect(),
            max,
        }
    }

    /// A connection came up to `peer` at `remote`: is it kept open?
    pub fn admit(&mut self, id: ConnectionId, peer: &PeerId, remote: &Multiaddr) -> bool {
        let direct_across = !is_relayed(remote) && !is_private(remote);
        if !direct_across || self.never.contains(peer) || self.kept.len() >= self.max {
            return false;
        }
        self.kept.insert(id)
    }

    /// A connection closed: its place is free for the next one.
    pub fn closed(&mut self, id: ConnectionId) {
        self.kept.remove(&id);
    }

    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

/// Keeps the connections [`Kept`] admits open; speaks no protocol of its own.
#[derive(Debug)]
pub struct Behaviour {
    pub kept: Kept,
}

impl Behaviour {
    fn handler(&mut self, id: ConnectionId, peer: PeerId, remote: &Multiaddr) -> Handler {
        let keep = self.kept.admit(id, &peer, remote);
        if keep {
            tracing::debug!(%peer, %remote, kept = self.kept.len(), "keeping a direct connection to another network open");
        }
        Handler { keep }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(id, peer, remote))
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _role: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(id, peer, addr))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(c) = event {
            self.kept.closed(c.connection_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        ev: THandlerOutEvent<Self>,
    ) {
        match ev {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// A connection's part of [`Behaviour`]: keeps it alive, or not.
#[derive(Debug)]
pub struct Handler {
    keep: bool,
}

impl libp2p::swarm::ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = DeniedUpgrade;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<DeniedUpgrade> {
        SubstreamProtocol::new(DeniedUpgrade, ())
    }

    fn connection_keep_alive(&self) -> bool {
        self.keep
    }

    fn on_behaviour_event(&mut self, ev: Infallible) {
        match ev {}
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, (), Infallible>> {
        Poll::Pending
    }

    /// Nothing to handle: this handler negotiates no streams (both upgrades are denied).
    fn on_connection_event(&mut self, _: ConnectionEvent<DeniedUpgrade, DeniedUpgrade>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().expect("valid multiaddr")
    }

    #[test]
    fn only_direct_connections_to_other_networks_are_kept_and_at_most_the_bound() {
        let hub = PeerId::random();
        let mut kept = Kept::new([hub], 2);
        let public = addr("/ip4/198.51.100.7/tcp/4001");
        let c = |n| ConnectionId::new_unchecked(n);
        assert!(!kept.admit(c(1), &PeerId::random(), &addr("/ip4/192.168.1.11/tcp/4001")));
        assert!(!kept.admit(c(2), &PeerId::random(), &addr("/ip4/127.0.0.1/tcp/4001")));
        let circuit = addr(&format!(
            "/ip4/198.51.100.1/tcp/4001/p2p/{hub}/p2p-circuit/p2p/{}",
            PeerId::random()
        ));
        assert!(!kept.admit(c(3), &PeerId::random(), &circuit));
        assert!(!kept.admit(c(4), &hub, &addr("/ip4/198.51.100.1/tcp/4001")));
        assert!(kept.admit(c(5), &PeerId::random(), &public));
        assert!(kept.admit(c(6), &PeerId::random(), &public));
        assert!(
            !kept.admit(c(7), &PeerId::random(), &public),
            "over the bound"
        );
        kept.closed(c(5));
        assert!(
            kept.admit(c(8), &PeerId::random(), &public),
            "a place freed"
        );
        assert_eq!(kept.len(), 2);
    }
}
