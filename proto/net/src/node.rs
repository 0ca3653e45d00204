//! The node loop: one task owns the [`Swarm`], executes the [`NetClient`]s' commands and
//! turns swarm events into [`NetEvent`]s, each behaviour's events in a handler of its own.
//! Decisions live in the sans-IO policies it carries out: [`discovery`] (which peers to
//! look for), [`direct`] (requests wait for a direct path), [`keep`] (which connections
//! stay open); blob requests in flight are kept by [`requests`]; what the application
//! is told goes through the [`outbox`].
//!
//! [`direct`]: crate::direct
//! [`keep`]: crate::keep
//! [`requests`]: crate::requests
//! [`outbox`]: crate::outbox

use crate::addr::peer_of;
use crate::client::{Command, NetClient, COMMAND_CAPACITY};
use crate::config::NetConfig;
use crate::discovery::{self, Action, Discovery, Links};
use crate::event::{NetEvent, Path, ReplyId, Seen, Topic};
use crate::outbox::{Outbox, Shed, EVENT_CAPACITY};
use crate::requests::Requests;
use crate::state::NetState;
use crate::swarm::{build_swarm, Behaviour, BehaviourEvent, StartError};
use crate::tasks::Tasks;
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::core::ConnectedPoint;
use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{dcutr, identify, kad, mdns, ping, relay, request_response, Multiaddr, PeerId, Swarm};
use proto::blob::{BlobRequest, BlobResponse};
use proto::status::Reachability;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Starts the node as a task of `tasks`: it runs until `tasks` is cancelled (its
/// [`Tasks::shutdown`] then waits for it) or every [`NetClient`] is dropped. Events come
/// on a channel of [`EVENT_CAPACITY`], which the node never waits on (see there for what
/// happens when the application falls that far behind).
pub fn start(
    cfg: NetConfig,
    tasks: &Tasks,
) -> Result<(NetClient, mpsc::Receiver<NetEvent>), StartError> {
    let (client, events, node, commands) = prepare(cfg, EVENT_CAPACITY)?;
    let token = tasks.token().clone();
    tasks.spawn_graceful(node.run(commands, token));
    Ok((client, events))
}

type Prepared = (
    NetClient,
    mpsc::Receiver<NetEvent>,
    Node,
    mpsc::Receiver<Command>,
);

/// The swarm listening and subscribed, the node ready to run.
fn prepare(cfg: NetConfig, event_capacity: usize) -> Result<Prepared, StartError> {
    let peer_id = cfg.keypair.public().to_peer_id();
    let mut swarm = build_swarm(&cfg)?;
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|source| StartError::Listen {
                addr: addr.clone(),
                source,
            })?;
    }
    for topic in [Topic::Announce, Topic::Status] {
        let name = topic.name(&cfg.fleet);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&gossipsub::IdentTopic::new(&name))
            .map_err(|source| StartError::Subscribe {
                topic: name.clone(),
                source,
            })?;
    }
    // Bootstrap peers are dialled, and put in the DHT (whose first entry starts a walk,
    // which dials), once a listener is up (see `Discovery::listening`).
    let state = cfg.state.clone();
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CAPACITY);
    let (ev_tx, ev_rx) = mpsc::channel(event_capacity);
    let node = Node {
        swarm,
        fleet: cfg.fleet,
        outbox: Outbox::new(ev_tx, state.clone()),
        requests: Requests::new(cfg.max_inbound_per_peer, state.clone()),
        discovery: Discovery::new(cfg.bootstrap, cfg.relay_server),
        listen_of: HashMap::new(),
        conns: HashMap::new(),
        reserved_here: HashSet::new(),
        relay_listener: None,
        state: state.clone(),
    };
    Ok((NetClient::new(cmd_tx, peer_id, state), ev_rx, node, cmd_rx))
}

/// One open connection, as the node classes it.
#[derive(Debug)]
struct Conn {
    peer: PeerId,
    path: Path,
    remote: Multiaddr,
}

struct Node {
    swarm: Swarm<Behaviour>,
    fleet: String,
    outbox: Outbox,
    /// Blob requests in flight, both ways.
    requests: Requests,
    discovery: Discovery,
    /// Where each connected peer listens (identify), for redirects to it.
    listen_of: HashMap<PeerId, Vec<Multiaddr>>,
    /// Every connection's peer and path.
    conns: HashMap<ConnectionId, Conn>,
    /// Peers holding a reservation on this node's relay.
    reserved_here: HashSet<PeerId>,
    /// This node's listener on the hub's relay, once it knows it is behind NAT.
    relay_listener: Option<ListenerId>,
    state: Arc<NetState>,
}

/// What [`Discovery`] reads of the swarm.
struct View<'a> {
    swarm: &'a Swarm<Behaviour>,
    relay_listening: bool,
    state: &'a NetState,
}

impl Links for View<'_> {
    fn is_connected(&self, peer: &PeerId) -> bool {
        self.swarm.is_connected(peer)
    }

    fn connected(&self) -> usize {
        self.swarm.connected_peers().count()
    }

    fn dialling(&self) -> usize {
        self.swarm
            .network_info()
            .connection_counters()
            .num_pending_outgoing() as usize
    }

    fn listens_at(&self, ip: IpAddr) -> bool {
        self.swarm
            .listeners()
            .filter_map(crate::addr::ip_of)
            .any(|l| l == ip)
    }

    fn relay_listening(&self) -> bool {
        self.relay_listening
    }

    fn reachability(&self) -> Reachability {
        self.state.reachability()
    }
}

/// The view of a node's fields (a macro, not a method: the policy it is handed to is a
/// field of the node borrowed mutably at the same time).
macro_rules! view {
    ($node:expr) => {
        View {
            swarm: &$node.swarm,
            relay_listening: $node.relay_listener.is_some(),
            state: &$node.state,
        }
    };
}

impl Node {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, stop: CancellationToken) {
        let mut rediscover = tokio::time::interval_at(
            tokio::time::Instant::now() + discovery::TICK,
            discovery::TICK,
        );
        let mut punch_deadlines = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                cmd = commands.recv(), if self.discovery.commands_open() => {
                    match cmd {
                        Some(cmd) => self.command(cmd),
                        None => break,
                    }
                }
                ev = self.swarm.select_next_some() => self.swarm_event(ev),
                _ = rediscover.tick() => {
                    let actions = self.discovery.tick(Instant::now(), &view!(self));
                    self.apply(actions);
                }
                _ = punch_deadlines.tick(), if self.requests.held() > 0 => {
                    self.requests.expire(Instant::now());
                }
                _ = self.outbox.flush(), if self.outbox.held() > 0 => {}
            }
        }
        tracing::debug!("network task stopped");
    }

    /// Carries out what [`Discovery`] decided.
    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::DialBootstrap(addr) => {
                    if let Err(e) = self.remember_and_dial(&addr) {
                        tracing::warn!(%addr, "dialing bootstrap peer: {e}");
                    }
                }
                Action::Dial(addr) => {
                    let _ = self.swarm.dial(addr);
                }
                Action::DialPeer(peer) => {
                    let _ = self.swarm.dial(peer);
                }
                Action::Remember(peer, addr) => {
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                }
                Action::Walk => {
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                Action::External(addr) => self.swarm.add_external_address(addr),
                Action::ListenViaRelay(circuit) => match self.swarm.listen_on(circuit.clone()) {
                    Ok(id) => self.relay_listener = Some(id),
                    Err(e) => tracing::warn!(%circuit, "listening through the hub's relay: {e}"),
                },
                Action::SetReachability(r) => self.state.set_reachability(r),
            }
        }
    }

    /// Dials `addr`, first keeping it in the DHT's routing table if it names its peer.
    fn remember_and_dial(&mut self, addr: &Multiaddr) -> Result<(), libp2p::swarm::DialError> {
        if let Some(peer) = peer_of(addr) {
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, addr.clone());
        }
        self.swarm.dial(addr.clone())
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish { topic, data, reply } => {
                let t = gossipsub::IdentTopic::new(topic.name(&self.fleet));
                let res = match self.swarm.behaviour_mut().gossipsub.publish(t, data) {
                    Ok(_) => Ok(()),
                    // Nobody to tell yet is not an error: the next announcement round or
                    // the broker will reach them.
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => Ok(()),
                    Err(gossipsub::PublishError::Duplicate) => Ok(()),
                    Err(e) => Err(e.into()),
                };
                let _ = reply.send(res);
            }
            Command::Validate {
                id,
                source,
                acceptance,
            } => {
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id, &source, acceptance);
            }
            Command::Fetch {
                peer,
                addr,
                request,
                reply,
            } => self
                .requests
                .fetch(&mut self.swarm, peer, addr, request, reply),
            Command::Respond { reply, response } => {
                self.requests.respond(&mut self.swarm, reply, response)
            }
            Command::Dial(addr) => {
                if let Err(e) = self.remember_and_dial(&addr) {
                    tracing::debug!(%addr, "dial: {e}");
                }
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
        }
    }

    /// Tells the application, or answers in its place when it is too far behind to be
    /// told (see [`crate::outbox`]).
    fn emit(&mut self, ev: NetEvent) {
        match self.outbox.emit(ev) {
            None => {}
            Some(Shed::Gossip { id, source }) => {
                tracing::debug!(peer = %source, "the application is behind: ignoring a gossip message");
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id, &source, MessageAcceptance::Ignore);
            }
            Some(Shed::Blob { peer, reply }) => {
                tracing::debug!(%peer, "the application is behind: answering Busy");
                self.requests
                    .respond(&mut self.swarm, reply, BlobResponse::Busy);
            }
        }
    }

    fn swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                let actions = self.discovery.listening(&address);
                self.apply(actions);
                self.emit(NetEvent::Listening(address))
            }
            SwarmEvent::ListenerClosed { listener_id, .. }
                if Some(listener_id) == self.relay_listener =>
            {
                // The relay turned the reservation down or dropped it: asked again the
                // next time the hub says where it sees this node.
                tracing::info!("the reservation on the hub's relay ended");
                self.relay_listener = None;
                self.state.set_reachability(Reachability::Unreachable);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => self.connection_up(peer_id, connection_id, &endpoint, num_established),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => self.connection_down(peer_id, connection_id, num_established),
            SwarmEvent::Behaviour(ev) => self.behaviour_event(ev),
            _ => {}
        }
    }

    fn behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.identified(peer_id, info)
            }
            BehaviourEvent::RelayClient(ev) => self.relay_client_event(ev),
            BehaviourEvent::Relay(ev) => self.relay_event(ev),
            BehaviourEvent::Dcutr(ev) => self.dcutr_event(ev),
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. }) => {
                if let Some(action) = self.discovery.routing_updated(peer, &view!(self)) {
                    self.apply(vec![action]);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let actions = self.discovery.mdns_discovered(found, &view!(self));
                self.apply(actions);
            }
            BehaviourEvent::Gossipsub(ev) => self.gossip_event(ev),
            BehaviourEvent::Blob(ev) => self.blob_event(ev),
            BehaviourEvent::Ping(ev) => self.ping_event(ev),
            _ => {}
        }
    }

    fn connection_up(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        endpoint: &ConnectedPoint,
        num_established: NonZeroU32,
    ) {
        self.state
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        let path = Path::of(endpoint);
        let remote = endpoint.get_remote_address().clone();
        self.conns.insert(id, Conn { peer, path, remote });
        tracing::debug!(%peer, ?id, ?path, "connection up");
        let relayed = path == Path::Relayed;
        if relayed && self.direct_remote(&peer).is_some() {
            // A circuit the peer opened while our punch was landing: requests would be
            // spread over it too, and the relay's circuit is not for chunks.
            self.swarm.close_connection(id);
        } else if !relayed {
            // A direct connection replaces any relayed one: requests would otherwise be
            // spread over both, and the relay's circuit is not for chunks.
            let relayed_ids: Vec<ConnectionId> = self
                .conns
                .iter()
                .filter(|(_, c)| c.peer == peer && c.path == Path::Relayed)
                .map(|(id, _)| *id)
                .collect();
            for id in relayed_ids {
                self.swarm.close_connection(id);
            }
        }
        self.requests.connected(&mut self.swarm, peer, relayed);
        if num_established.get() == 1 {
            self.emit(NetEvent::PeerConnected(peer))
        }
    }

    fn connection_down(&mut self, peer: PeerId, id: ConnectionId, num_established: u32) {
        if let Some(Conn { path, .. }) = self.conns.remove(&id) {
            tracing::debug!(%peer, ?id, ?path, "connection down");
            self.requests
                .disconnected(&mut self.swarm, peer, path == Path::Relayed);
        }
        if num_established > 0 {
            return;
        }
        self.listen_of.remove(&peer);
        let actions = self.discovery.disconnected(&peer, &view!(self));
        self.apply(actions);
        self.emit(NetEvent::PeerDisconnected(peer))
    }

    /// Where a direct (not relayed) connection to `peer` comes from, if one is up.
    fn direct_remote(&self, peer: &PeerId) -> Option<Multiaddr> {
        self.conns
            .values()
            .find(|c| c.peer == *peer && c.path != Path::Relayed)
            .map(|c| c.remote.clone())
    }

    fn identified(&mut self, peer: PeerId, info: identify::Info) {
        self.listen_of.insert(peer, info.listen_addrs.clone());
        let actions =
            self.discovery
                .identified(peer, &info.listen_addrs, &info.observed_addr, &view!(self));
        self.apply(actions);
    }

    fn relay_client_event(&mut self, ev: relay::client::Event) {
        if let relay::client::Event::ReservationReqAccepted { renewal, .. } = ev {
            if !renewal {
                tracing::info!("reachable through the hub's relay (slot reserved)");
            }
            self.state.set_reachability(Reachability::Relayed);
        }
    }

    fn relay_event(&mut self, ev: relay::Event) {
        match ev {
            relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
                self.reserved_here.insert(src_peer_id);
            }
            relay::Event::ReservationClosed { src_peer_id }
            | relay::Event::ReservationTimedOut { src_peer_id } => {
                self.reserved_here.remove(&src_peer_id);
            }
            _ => {}
        }
    }

    fn dcutr_event(&mut self, ev: dcutr::Event) {
        let dcutr::Event {
            remote_peer_id,
            result,
        } = ev;
        match result {
            Ok(_) => {
                tracing::info!(peer = %remote_peer_id, "hole punched: direct connection");
                self.state.hole_punches.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::info!(peer = %remote_peer_id, "hole punching failed: {e}");
                self.state
                    .hole_punch_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.requests.punch_failed(remote_peer_id, Instant::now());
            }
        }
    }

    fn gossip_event(&mut self, ev: gossipsub::Event) {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = ev
        else {
            return;
        };
        let topic = if message.topic
            == gossipsub::IdentTopic::new(Topic::Announce.name(&self.fleet)).hash()
        {
            Topic::Announce
        } else if message.topic
            == gossipsub::IdentTopic::new(Topic::Status.name(&self.fleet)).hash()
        {
            Topic::Status
        } else {
            self.swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    MessageAcceptance::Reject,
                );
            return;
        };
        self.emit(NetEvent::Gossip {
            topic,
            data: message.data,
            source: propagation_source,
            id: message_id,
        })
    }

    fn ping_event(&mut self, ev: ping::Event) {
        let ping::Event {
            peer,
            connection,
            result: Err(failure),
        } = ev
        else {
            return;
        };
        if matches!(failure, ping::Failure::Unsupported) {
            // A peer without ping, an older agent, is no reason to close.
            return;
        }
        // Gone without a word (a NAT mapping lost, a peer's power cut), there and silent
        // (a frozen board or process: its kernel still acknowledges TCP, so the ping
        // fails as "negotiation timed out", not as a timeout), or an I/O error on the
        // ping's stream: closed either way, so requests go elsewhere and a kept
        // connection's place is free; a live peer dials again.
        tracing::debug!(%peer, ?connection, "no answer to a ping ({failure}), closing the connection");
        self.swarm.close_connection(connection);
    }

    fn blob_event(&mut self, ev: request_response::Event<BlobRequest, BlobResponse>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request_id,
                        request,
                        channel,
                    },
                ..
            } => {
                if let Some(reply) =
                    self.requests
                        .wanted(&mut self.swarm, peer, request_id, channel)
                {
                    self.blob_wanted(peer, request, reply);
                }
            }
            Event::Message {
                peer,
                connection_id,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
            } => {
                let path = self
                    .conns
                    .get(&connection_id)
                    .map_or(Path::Direct, |c| c.path);
                self.requests.answered(peer, path, request_id, response);
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => self.requests.outbound_failed(peer, request_id, error),
            Event::InboundFailure {
                peer, request_id, ..
            } => self.requests.inbound_failed(peer, request_id),
            Event::ResponseSent { .. } => {}
        }
    }

    /// Tells the application a peer asks for a blob, with where the peer was seen.
    fn blob_wanted(&mut self, peer: PeerId, request: BlobRequest, reply: ReplyId) {
        let seen = Seen {
            remote: self.direct_remote(&peer),
            listen: self.listen_of.get(&peer).cloned().unwrap_or_default(),
            relayed: self.reserved_here.contains(&peer),
        };
        self.emit(NetEvent::BlobWanted {
            peer,
            digest: request.digest,
            want: request.want,
            seen,
            reply,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::FetchError;
    use libp2p::identity::Keypair;
    use libp2p::multiaddr::Protocol;
    use proto::blob::Want;
    use proto::Digest;

    const WAIT: Duration = Duration::from_secs(20);

    async fn listening(events: &mut mpsc::Receiver<NetEvent>) -> Multiaddr {
        loop {
            match events.recv().await {
                Some(NetEvent::Listening(addr)) => return addr,
                Some(_) => {}
                None => panic!("the node stopped"),
            }
        }
    }

    /// Answers every blob request with `blob`, until the node stops.
    async fn serve(net: NetClient, mut events: mpsc::Receiver<NetEvent>, blob: Vec<u8>) {
        while let Some(ev) = events.recv().await {
            if let NetEvent::BlobWanted { reply, .. } = ev {
                net.respond(reply, BlobResponse::Found(blob.clone())).await;
            }
        }
    }

    #[tokio::test]
    async fn two_nodes_trade_a_blob_and_one_cancellation_stops_both() {
        let tasks = Tasks::new();
        let (hub, mut hub_events) =
            start(NetConfig::new(Keypair::generate_ed25519(), "t"), &tasks).unwrap();
        let hub_addr = tokio::time::timeout(WAIT, listening(&mut hub_events))
            .await
            .unwrap()
            .with(Protocol::P2p(hub.peer_id()));
        let served = tokio::spawn(serve(hub.clone(), hub_events, b"chunk".to_vec()));

        let mut cfg = NetConfig::new(Keypair::generate_ed25519(), "t");
        cfg.bootstrap = vec![hub_addr];
        let (device, mut device_events) = start(cfg, &tasks).unwrap();
        let connected = async {
            loop {
                match device_events.recv().await {
                    Some(NetEvent::PeerConnected(p)) if p == hub.peer_id() => return,
                    Some(_) => {}
                    None => panic!("the node stopped"),
                }
            }
        };
        tokio::time::timeout(WAIT, connected).await.unwrap();
        let got = tokio::time::timeout(
            WAIT,
            device.fetch_via(hub.peer_id(), None, Digest::of(b"chunk"), Want::Blob),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(got, (b"chunk".to_vec(), Path::Lan));
        assert_eq!(device.state().requests_sent.load(Ordering::Relaxed), 1);
        assert_eq!(hub.state().requests_received.load(Ordering::Relaxed), 1);

        assert_eq!(tasks.shutdown(WAIT).await, 0, "both nodes stopped");
        assert!(matches!(
            device.fetch(hub.peer_id(), Digest::of(b"x")).await,
            Err(FetchError::Stopped)
        ));
        tokio::time::timeout(WAIT, served).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_node_whose_application_stopped_reading_answers_busy_for_it() {
        let tasks = Tasks::new();
        // One slot, taken by the first `Listening`: the application reads nothing.
        let (stalled, events, node, commands) =
            prepare(NetConfig::new(Keypair::generate_ed25519(), "t"), 1).unwrap();
        tasks.spawn_graceful(node.run(commands, tasks.token().clone()));
        let addr = loop {
            if let Some(a) = stalled.listen_addrs().await.pop() {
                break a.with(Protocol::P2p(stalled.peer_id()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mut cfg = NetConfig::new(Keypair::generate_ed25519(), "t");
        cfg.bootstrap = vec![addr];
        let (asker, asker_events) = start(cfg, &tasks).unwrap();
        tokio::spawn(async move {
            let mut asker_events = asker_events;
            while asker_events.recv().await.is_some() {}
        });
        let got = tokio::time::timeout(WAIT, asker.fetch(stalled.peer_id(), Digest::of(b"x")))
            .await
            .unwrap();
        assert!(
            matches!(got, Err(FetchError::Busy(p)) if p == stalled.peer_id()),
            "{got:?}"
        );
        assert_eq!(stalled.state().events_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(
            tasks.shutdown(WAIT).await,
            0,
            "a stalled application stops nothing"
        );
        drop(events);
    }

    #[tokio::test]
    async fn a_node_stops_when_every_client_is_dropped() {
        let tasks = Tasks::new();
        let (net, mut events) =
            start(NetConfig::new(Keypair::generate_ed25519(), "t"), &tasks).unwrap();
        drop(net);
        while tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .is_some()
        {}
        assert_eq!(tasks.shutdown(WAIT).await, 0);
    }
}
