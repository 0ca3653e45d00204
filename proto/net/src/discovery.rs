//! Which peers a node looks for, and when: the bootstrap peers (the hub) and the
//! Kademlia DHT, mDNS neighbours, and what the hub's view of this node's address says
//! about its reachability. Sans-IO like [`crate::direct`] and [`crate::keep`]: events in,
//! [`Action`]s out, time passed in, the swarm's state read through [`Links`]; the node
//! loop (`node`) carries the actions out.
//!
//! The DHT is fed sparingly, because every entry added to a small routing table makes
//! libp2p walk the DHT (its automatic bootstrap cannot be turned off) and every walk
//! dials the peers it asks: at 1,000 devices, adding every peer a device met for a chunk
//! during a release was half of the release's connections and ~40% of its time. So:
//! - identify feeds a peer's addresses into the DHT only while this node is short of
//!   peers (fewer than [`TARGET_PEERS`] connected or being dialled) and no bootstrap peer
//!   is connected (the hub names peers itself while it is up);
//! - with the hub up, the last [`MET_KEPT`] peers identified are remembered instead, and
//!   go into the DHT when the last bootstrap peer is lost, so a device still finds peers
//!   through the DHT with the hub gone;
//! - explicit walks only below [`WALK_BELOW`] connections, at most every
//!   [`WALK_INTERVAL`].

use crate::addr::{ip_of, is_loopback, is_relayed, peer_of};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use proto::status::Reachability;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Peers a node dials on its own (from the DHT) before it stops looking for more. Enough
/// for gossip (mesh degree 6) and alternatives; more connections cost every node of a
/// large fleet memory and heartbeat work for nothing. Redirected fetches dial beyond it,
/// and idle connections close after [`crate::IDLE_TIMEOUT`].
pub const TARGET_PEERS: usize = 8;
/// A node walks the DHT only with fewer connections than this (the hub alone, say);
/// a walk dials every peer it asks, and those connections stay up while gossip uses them.
pub const WALK_BELOW: usize = 3;
/// Peers remembered to seed the DHT with when the hub is lost.
pub const MET_KEPT: usize = 32;
/// Least time between two DHT walks of one node.
pub const WALK_INTERVAL: Duration = Duration::from_secs(30);
/// How often the node calls [`Discovery::tick`] (the first call one period after start:
/// bootstrap peers are dialled as soon as a listener is up, see [`Discovery::listening`]).
pub const TICK: Duration = Duration::from_secs(5);

/// What the policy reads of the swarm when it decides.
pub trait Links {
    fn is_connected(&self, peer: &PeerId) -> bool;
    /// Peers with at least one connection.
    fn connected(&self) -> usize;
    /// Outgoing connections being set up.
    fn dialling(&self) -> usize;
    /// A listener of this node is bound to `ip`.
    fn listens_at(&self, ip: IpAddr) -> bool;
    /// This node listens through the hub's relay (a reservation asked or held).
    fn relay_listening(&self) -> bool;
    fn reachability(&self) -> Reachability;
}

/// What the node does for the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Put the address in the DHT's routing table (if it names its peer) and dial it; a
    /// failure is worth a warning (a bootstrap peer that cannot be dialled).
    DialBootstrap(Multiaddr),
    /// Dial an address; a failure is not worth a word (tried again later).
    Dial(Multiaddr),
    /// Dial a peer at the addresses the swarm knows for it.
    DialPeer(PeerId),
    /// Put an address of a peer in the DHT's routing table.
    Remember(PeerId, Multiaddr),
    /// Walk the DHT for more peers.
    Walk,
    /// Tell peers this address of ours (identify, relay reservations).
    External(Multiaddr),
    /// Listen through the hub's relay at this circuit address (reserve a slot there).
    ListenViaRelay(Multiaddr),
    SetReachability(Reachability),
}

/// The discovery policy of one node.
#[derive(Debug)]
pub struct Discovery {
    bootstrap: Vec<Multiaddr>,
    /// This node is the relay (the hub): it never looks for one.
    relay_server: bool,
    /// Bootstrap peers are dialled once a listener is up: a dial made before goes out
    /// from an ephemeral port, and the address the hub then sees (and a NAT maps) is not
    /// the one this node listens on, so hole punching has nothing to aim at.
    bootstrap_dialled: bool,
    /// Peers identified while a bootstrap peer (the hub) was connected, newest last (at
    /// most [`MET_KEPT`]): not put in the DHT then, put there when the last bootstrap
    /// peer is lost.
    met: VecDeque<(PeerId, Multiaddr)>,
    /// When this node last walked the DHT for more peers.
    last_walk: Option<Instant>,
}

impl Discovery {
    pub fn new(bootstrap: Vec<Multiaddr>, relay_server: bool) -> Discovery {
        Discovery {
            bootstrap,
            relay_server,
            bootstrap_dialled: false,
            met: VecDeque::new(),
            last_walk: None,
        }
    }

    /// Commands wait for the first listener (a few ms at start): a fetch from the hub
    /// dialled before it would set the hub's view of this node's address (see
    /// `bootstrap_dialled`).
    pub fn commands_open(&self) -> bool {
        self.bootstrap.is_empty() || self.bootstrap_dialled
    }

    /// Every [`TICK`]: redial bootstrap peers we lost, and walk the DHT to find devices
    /// we have not met (so peers still find each other with the hub gone).
    pub fn tick(&mut self, now: Instant, links: &impl Links) -> Vec<Action> {
        if !self.bootstrap_dialled {
            // No listener of the right kind came up: dial from any port.
            return self.dial_bootstrap();
        }
        let mut actions: Vec<Action> = self
            .bootstrap
            .iter()
            .filter(|a| peer_of(a).is_some_and(|p| !links.is_connected(&p)))
            .map(|a| Action::Dial(a.clone()))
            .collect();
        // A DHT walk dials the peers it asks: in a large fleet, every node walking every
        // few seconds is a storm of handshakes. Walk only when short of peers, and rarely.
        let due = self
            .last_walk
            .is_none_or(|t| now.saturating_duration_since(t) >= WALK_INTERVAL);
        let connected = links.connected();
        if connected > 0 && connected < WALK_BELOW && due {
            self.last_walk = Some(now);
            actions.push(Action::Walk);
        }
        actions
    }

    /// A listener is up at `address`: dial the bootstrap peers from its port.
    pub fn listening(&mut self, address: &Multiaddr) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.relay_server && !is_relayed(address) {
            // A relay names its own addresses in every reservation it grants.
            actions.push(Action::External(address.clone()));
        }
        // Port reuse picks a listener of the same kind (loopback or not) as the address
        // dialled: wait for one (loopback comes up first when listening on every interface).
        let fits = self
            .bootstrap
            .iter()
            .any(|b| is_loopback(b) == is_loopback(address));
        if !self.bootstrap_dialled && fits {
            actions.extend(self.dial_bootstrap());
        }
        actions
    }

    fn dial_bootstrap(&mut self) -> Vec<Action> {
        self.bootstrap_dialled = true;
        self.bootstrap
            .iter()
            .map(|a| Action::DialBootstrap(a.clone()))
            .collect()
    }

    /// Identify told us where `peer` listens and where it sees us.
    pub fn identified(
        &mut self,
        peer: PeerId,
        listen: &[Multiaddr],
        observed: &Multiaddr,
        links: &impl Links,
    ) -> Vec<Action> {
        let is_bootstrap = self.is_bootstrap(&peer);
        let mut actions = Vec::new();
        if is_bootstrap {
            actions = self.observed_by_bootstrap(peer, observed, links);
        } else if !self.short_of_peers(links) {
            return actions;
        } else if self.bootstrap_connected(links) {
            if let Some(first) = listen.first() {
                self.met.retain(|(p, _)| *p != peer);
                if self.met.len() >= MET_KEPT {
                    self.met.pop_front();
                }
                self.met.push_back((peer, first.clone()));
            }
            return actions;
        }
        actions.extend(
            listen
                .iter()
                .filter(|a| !is_relayed(a))
                .map(|a| Action::Remember(peer, a.clone())),
        );
        actions
    }

    /// The hub told this node the address it sees it at. One it listens on: it is
    /// public. Another: it is behind NAT, and takes a slot on the hub's relay so that
    /// peers in other homes can reach it (and punch through).
    fn observed_by_bootstrap(
        &self,
        hub: PeerId,
        observed: &Multiaddr,
        links: &impl Links,
    ) -> Vec<Action> {
        if self.relay_server {
            return vec![];
        }
        if ip_of(observed).is_some_and(|ip| links.listens_at(ip)) {
            if links.reachability() != Reachability::Public {
                tracing::info!(%observed, "the hub sees this device at an address it listens on: reachable directly");
            }
            return vec![
                Action::External(observed.clone()),
                Action::SetReachability(Reachability::Public),
            ];
        }
        if links.relay_listening() {
            return vec![];
        }
        let Some(hub_addr) = self.bootstrap.iter().find(|a| peer_of(a) == Some(hub)) else {
            return vec![];
        };
        tracing::info!(%observed, "the hub sees this device at another address (behind NAT): reserving a slot on its relay");
        let mut actions = vec![Action::ListenViaRelay(
            hub_addr.clone().with(Protocol::P2pCircuit),
        )];
        if links.reachability() != Reachability::Relayed {
            actions.push(Action::SetReachability(Reachability::Unreachable));
        }
        actions
    }

    /// The last connection to `peer` closed: losing the last bootstrap peer puts the
    /// peers met meanwhile in the DHT.
    pub fn disconnected(&mut self, peer: &PeerId, links: &impl Links) -> Vec<Action> {
        if !self.is_bootstrap(peer) || self.bootstrap_connected(links) {
            return vec![];
        }
        std::mem::take(&mut self.met)
            .into_iter()
            .map(|(p, a)| Action::Remember(p, a))
            .collect()
    }

    /// The DHT learnt of `peer`: dial it if this node is looking for peers.
    pub fn routing_updated(&self, peer: PeerId, links: &impl Links) -> Option<Action> {
        (!links.is_connected(&peer) && self.short_of_peers(links)).then_some(Action::DialPeer(peer))
    }

    /// mDNS found neighbours: into the DHT, and dialled unless connected. A neighbour's
    /// loopback address is this node's own loopback.
    pub fn mdns_discovered(
        &self,
        found: impl IntoIterator<Item = (PeerId, Multiaddr)>,
        links: &impl Links,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        for (peer, addr) in found.into_iter().filter(|(_, a)| !is_loopback(a)) {
            actions.push(Action::Remember(peer, addr.clone()));
            if !links.is_connected(&peer) {
                actions.push(Action::Dial(addr));
            }
        }
        actions
    }

    /// Fewer than [`TARGET_PEERS`] connected or being dialled. (Counting only connected
    /// peers, a node learning of many peers at once dials them all before the first
    /// connection is up: at 1,000 devices, ~50 connections each.)
    fn short_of_peers(&self, links: &impl Links) -> bool {
        links.connected() + links.dialling() < TARGET_PEERS
    }

    /// One of the bootstrap peers (the hub).
    fn is_bootstrap(&self, peer: &PeerId) -> bool {
        self.bootstrap
            .iter()
            .any(|a| peer_of(a).as_ref() == Some(peer))
    }

    /// Connected to one of the bootstrap peers.
    fn bootstrap_connected(&self, links: &impl Links) -> bool {
        self.bootstrap
            .iter()
            .filter_map(peer_of)
            .any(|p| links.is_connected(&p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    fn a(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[derive(Default)]
    struct Fake {
        connected: HashSet<PeerId>,
        dialling: usize,
        listen_ips: Vec<IpAddr>,
        relay_listening: bool,
        reachability: Reachability,
    }

    impl Fake {
        /// `n` connected peers besides those given.
        fn with(n: usize, also: &[PeerId]) -> Fake {
            let mut connected: HashSet<PeerId> = (0..n).map(|_| peer()).collect();
            connected.extend(also);
            Fake {
                connected,
                ..Fake::default()
            }
        }
    }

    impl Links for Fake {
        fn is_connected(&self, peer: &PeerId) -> bool {
            self.connected.contains(peer)
        }
        fn connected(&self) -> usize {
            self.connected.len()
        }
        fn dialling(&self) -> usize {
            self.dialling
        }
        fn listens_at(&self, ip: IpAddr) -> bool {
            self.listen_ips.contains(&ip)
        }
        fn relay_listening(&self) -> bool {
            self.relay_listening
        }
        fn reachability(&self) -> Reachability {
            self.reachability
        }
    }

    /// A device with one hub at a public address.
    fn device() -> (Discovery, PeerId, Multiaddr) {
        let hub = peer();
        let addr = a(&format!("/ip4/203.0.113.10/tcp/4001/p2p/{hub}"));
        (Discovery::new(vec![addr.clone()], false), hub, addr)
    }

    #[test]
    fn bootstrap_peers_are_dialled_from_a_listener_of_their_kind() {
        let (mut d, _, hub_addr) = device();
        assert!(!d.commands_open(), "commands wait for the bootstrap dial");
        assert_eq!(d.listening(&a("/ip4/127.0.0.1/tcp/4002")), vec![]);
        assert!(!d.commands_open());
        assert_eq!(
            d.listening(&a("/ip4/192.168.1.5/tcp/4002")),
            vec![Action::DialBootstrap(hub_addr)]
        );
        assert!(d.commands_open());
        assert_eq!(d.listening(&a("/ip4/10.0.0.5/tcp/4002")), vec![], "once");
    }

    #[test]
    fn a_loopback_hub_is_dialled_from_the_loopback_listener() {
        let hub = peer();
        let addr = a(&format!("/ip4/127.0.0.1/tcp/4001/p2p/{hub}"));
        let mut d = Discovery::new(vec![addr.clone()], false);
        assert_eq!(
            d.listening(&a("/ip4/127.0.0.1/tcp/4002")),
            vec![Action::DialBootstrap(addr)]
        );
    }

    #[test]
    fn without_bootstrap_peers_commands_flow_at_once() {
        assert!(Discovery::new(vec![], false).commands_open());
    }

    #[test]
    fn with_no_listener_of_the_right_kind_the_first_tick_dials_anyway() {
        let (mut d, _, hub_addr) = device();
        let now = Instant::now();
        assert_eq!(
            d.tick(now, &Fake::default()),
            vec![Action::DialBootstrap(hub_addr)]
        );
        assert!(d.commands_open());
    }

    #[test]
    fn a_relay_announces_its_own_listeners_but_not_circuits() {
        let mut d = Discovery::new(vec![], true);
        let public = a("/ip4/203.0.113.10/tcp/4001");
        assert_eq!(d.listening(&public), vec![Action::External(public)]);
        let circuit = a(&format!(
            "/ip4/203.0.113.10/tcp/4001/p2p/{}/p2p-circuit",
            peer()
        ));
        assert_eq!(d.listening(&circuit), vec![]);
    }

    #[test]
    fn ticks_redial_lost_bootstrap_peers() {
        let (mut d, hub, hub_addr) = device();
        d.listening(&a("/ip4/192.168.1.5/tcp/4002"));
        let now = Instant::now();
        let many = Fake::with(5, &[]);
        assert_eq!(d.tick(now, &many), vec![Action::Dial(hub_addr)]);
        assert_eq!(d.tick(now, &Fake::with(5, &[hub])), vec![]);
    }

    #[test]
    fn the_dht_is_walked_only_when_short_and_at_most_every_30_s() {
        let (mut d, hub, _) = device();
        d.listening(&a("/ip4/192.168.1.5/tcp/4002"));
        let t0 = Instant::now();
        assert_eq!(
            d.tick(t0, &Fake::with(0, &[])).pop(),
            Some(Action::Dial(d.bootstrap[0].clone())),
            "alone: no walk (nobody to ask)"
        );
        let few = Fake::with(1, &[hub]);
        assert_eq!(d.tick(t0, &few), vec![Action::Walk]);
        assert_eq!(d.tick(t0 + TICK, &few), vec![], "walked 5 s ago");
        assert_eq!(d.tick(t0 + WALK_INTERVAL - TICK, &few), vec![]);
        assert_eq!(d.tick(t0 + WALK_INTERVAL, &few), vec![Action::Walk]);
        let enough = Fake::with(WALK_BELOW - 1, &[hub]);
        assert_eq!(d.tick(t0 + WALK_INTERVAL * 3, &enough), vec![]);
    }

    #[test]
    fn with_the_hub_up_peers_identified_are_remembered_not_put_in_the_dht() {
        let (mut d, hub, _) = device();
        let links = Fake::with(2, &[hub]);
        let p = peer();
        let listen = [a("/ip4/192.168.1.7/tcp/4001"), a("/ip4/10.0.0.7/tcp/4001")];
        let observed = a("/ip4/203.0.113.99/tcp/1");
        assert_eq!(d.identified(p, &listen, &observed, &links), vec![]);
        assert_eq!(d.met, [(p, listen[0].clone())]);
        // The hub goes: what was met seeds the DHT, once.
        let gone = Fake::with(2, &[]);
        assert_eq!(
            d.disconnected(&hub, &gone),
            vec![Action::Remember(p, listen[0].clone())]
        );
        assert_eq!(d.disconnected(&hub, &gone), vec![]);
    }

    #[test]
    fn a_peer_that_is_not_the_last_bootstrap_peer_seeds_nothing() {
        let (mut d, hub, _) = device();
        let p = peer();
        let listen = [a("/ip4/192.168.1.7/tcp/4001")];
        let observed = a("/ip4/203.0.113.99/tcp/1");
        d.identified(p, &listen, &observed, &Fake::with(2, &[hub]));
        assert_eq!(d.disconnected(&peer(), &Fake::with(2, &[])), vec![]);
        assert_eq!(d.disconnected(&hub, &Fake::with(2, &[hub])), vec![]);
        assert_eq!(d.met.len(), 1);
    }

    #[test]
    fn the_remembered_are_the_newest_32_each_once() {
        let (mut d, hub, _) = device();
        let links = Fake::with(2, &[hub]);
        let observed = a("/ip4/203.0.113.99/tcp/1");
        let peers: Vec<PeerId> = (0..MET_KEPT + 5).map(|_| peer()).collect();
        for (i, p) in peers.iter().enumerate() {
            let listen = [a(&format!("/ip4/192.168.1.{}/tcp/4001", i + 1))];
            d.identified(*p, &listen, &observed, &links);
        }
        // The first, identified again, moves to the back with its new address.
        let again = a("/ip4/10.9.9.9/tcp/4001");
        d.identified(peers[10], std::slice::from_ref(&again), &observed, &links);
        assert_eq!(d.met.len(), MET_KEPT);
        assert_eq!(d.met.back(), Some(&(peers[10], again)));
        assert_eq!(d.met.iter().filter(|(p, _)| *p == peers[10]).count(), 1);
        assert!(
            !d.met.iter().any(|(p, _)| peers[..5].contains(p)),
            "oldest dropped"
        );
    }

    #[test]
    fn with_the_hub_down_and_short_of_peers_identify_feeds_the_dht_without_circuits() {
        let (mut d, _, _) = device();
        let p = peer();
        let lan = a("/ip4/192.168.1.7/tcp/4001");
        let circuit = a(&format!(
            "/ip4/203.0.113.10/tcp/4001/p2p/{}/p2p-circuit",
            peer()
        ));
        let observed = a("/ip4/203.0.113.99/tcp/1");
        assert_eq!(
            d.identified(p, &[lan.clone(), circuit], &observed, &Fake::with(2, &[])),
            vec![Action::Remember(p, lan)]
        );
        assert!(d.met.is_empty());
    }

    #[test]
    fn with_enough_peers_identify_changes_nothing() {
        let (mut d, hub, _) = device();
        let listen = [a("/ip4/192.168.1.7/tcp/4001")];
        let observed = a("/ip4/203.0.113.99/tcp/1");
        let enough = Fake::with(TARGET_PEERS, &[]);
        assert_eq!(d.identified(peer(), &listen, &observed, &enough), vec![]);
        // Dials being set up count: a node learning of many peers at once stops short.
        let mut dialling = Fake::with(2, &[hub]);
        dialling.dialling = TARGET_PEERS - 3;
        assert_eq!(d.identified(peer(), &listen, &observed, &dialling), vec![]);
        assert!(d.met.is_empty());
    }

    #[test]
    fn the_hub_seeing_us_where_we_listen_makes_us_public() {
        let (mut d, hub, _) = device();
        let mut links = Fake::with(0, &[hub]);
        links.listen_ips = vec!["198.51.100.4".parse().unwrap()];
        let observed = a("/ip4/198.51.100.4/tcp/4002");
        let hub_listens = [a("/ip4/203.0.113.10/tcp/4001")];
        assert_eq!(
            d.identified(hub, &hub_listens, &observed, &links),
            vec![
                Action::External(observed.clone()),
                Action::SetReachability(Reachability::Public),
                Action::Remember(hub, hub_listens[0].clone()),
            ]
        );
    }

    #[test]
    fn the_hub_seeing_us_elsewhere_reserves_a_relay_slot_once() {
        let (mut d, hub, hub_addr) = device();
        let mut links = Fake::with(0, &[hub]);
        links.listen_ips = vec!["192.168.1.5".parse().unwrap()];
        let observed = a("/ip4/198.51.100.4/tcp/61000");
        let circuit = hub_addr.clone().with(Protocol::P2pCircuit);
        assert_eq!(
            d.identified(hub, &[], &observed, &links),
            vec![
                Action::ListenViaRelay(circuit.clone()),
                Action::SetReachability(Reachability::Unreachable),
            ]
        );
        // Without a relay listener the slot is asked again, but a node the relay
        // already accepted stays `Relayed` (the relay's own events move it).
        links.reachability = Reachability::Relayed;
        assert_eq!(
            d.identified(hub, &[], &observed, &links),
            vec![Action::ListenViaRelay(circuit)]
        );
        links.relay_listening = true;
        assert_eq!(d.identified(hub, &[], &observed, &links), vec![]);
    }

    #[test]
    fn the_relay_itself_ignores_what_others_see() {
        let hub = peer();
        let addr = a(&format!("/ip4/203.0.113.10/tcp/4001/p2p/{hub}"));
        let mut d = Discovery::new(vec![addr], true);
        let observed = a("/ip4/198.51.100.4/tcp/61000");
        assert_eq!(d.identified(hub, &[], &observed, &Fake::default()), vec![]);
    }

    #[test]
    fn the_dht_dials_only_while_short_of_peers() {
        let (d, _, _) = device();
        let p = peer();
        assert_eq!(
            d.routing_updated(p, &Fake::with(1, &[])),
            Some(Action::DialPeer(p))
        );
        assert_eq!(d.routing_updated(p, &Fake::with(1, &[p])), None);
        assert_eq!(d.routing_updated(p, &Fake::with(TARGET_PEERS, &[])), None);
    }

    #[test]
    fn mdns_neighbours_are_remembered_and_dialled_but_never_at_loopback() {
        let (d, _, _) = device();
        let (new, known) = (peer(), peer());
        let lan = a("/ip4/192.168.1.7/tcp/4001");
        let lan2 = a("/ip4/192.168.1.8/tcp/4001");
        let found = [
            (new, a("/ip4/127.0.0.1/tcp/4001")),
            (new, lan.clone()),
            (known, lan2.clone()),
        ];
        assert_eq!(
            d.mdns_discovered(found, &Fake::with(0, &[known])),
            vec![
                Action::Remember(new, lan.clone()),
                Action::Dial(lan),
                Action::Remember(known, lan2),
            ]
        );
    }
}
