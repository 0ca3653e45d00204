//! unifleet's libp2p node, shared by the hub and the device agent (both are "a peer";
//! the hub is the peer that has everything). Lives beside `proto` rather than in either
//! binary crate so that `hub` and `device` never depend on each other.
//!
//! One task owns the [`Swarm`] ([`spawn`]); callers hold a cloneable [`NetClient`] that
//! sends commands over a bounded channel (with a oneshot reply where there is an answer),
//! and receive [`NetEvent`]s on a bounded channel. Transport: TCP + noise + yamux.
//! Behaviours: identify, Kademlia (peer discovery), optional mDNS, gossipsub with
//! application-level validation (a message is forwarded only after the application
//! accepted it), and the `/unifleet/blob/1` request-response protocol with a response size
//! cap, a request timeout and a bound on concurrent inbound requests per peer.

mod codec;
pub mod direct;
pub mod keep;
pub mod metrics;
pub mod mqtt_topics;
pub mod ratelimit;
pub mod tasks;

pub use codec::PROTOCOL as BLOB_PROTOCOL;
pub use libp2p::gossipsub::{MessageAcceptance, MessageId};
pub use libp2p::multiaddr::Protocol;
pub use libp2p::{identity::Keypair, Multiaddr, PeerId};

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::core::ConnectedPoint;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{behaviour::toggle::Toggle, ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    dcutr, gossipsub, identify, kad, mdns, noise, ping, relay, request_response, tcp, yamux, Swarm,
};
pub use proto::blob::Want;
use proto::blob::{BlobRequest, BlobResponse};
use proto::Digest;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Capacity of the command and event channels.
const CHANNEL_CAPACITY: usize = 256;
/// Largest gossipsub message: announcements are < 1 KiB, status reports < 8 KiB.
const MAX_GOSSIP_BYTES: usize = 16 * 1024;
/// Peers a node dials on its own (from the DHT) before it stops looking for more. Enough
/// for gossip (mesh degree 6) and alternatives; more connections cost every node of a
/// large fleet memory and heartbeat work for nothing. Redirected fetches dial beyond it,
/// and idle connections close after [`IDLE_TIMEOUT`].
const TARGET_PEERS: usize = 8;
/// How long a connection nothing uses stays open by default (see [`keep`] for those
/// kept open regardless).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Every connection is pinged this often: a NAT forgets an idle TCP mapping after as
/// little as a few minutes on some home routers (RFC 5382 asks for two hours; not all
/// comply), and a dead connection (a peer gone without a word) is noticed and closed.
const PING_EVERY: Duration = Duration::from_secs(15);
/// A gossip message seen this recently is a duplicate: well beyond the time a message
/// takes to cross a busy fleet and gossipsub's 5-heartbeat message cache (forgotten
/// sooner, a message came back through IHAVE/IWANT and flooded again). Re-publishing the
/// same bytes within it does nothing: the hub's 5 s re-announcement reaches gossip every
/// 15 s, and a device's re-gossip goes out at its first Trickle interval past it.
const GOSSIP_DEDUP: Duration = Duration::from_secs(15);
const GOSSIP_QUEUE: usize = 128;
/// A node walks the DHT only with fewer connections than this (the hub alone, say);
/// a walk dials every peer it asks, and those connections stay up while gossip uses them.
const WALK_BELOW: usize = 3;
/// Peers remembered to seed the DHT with when the hub is lost (see `Node::met`).
const MET_KEPT: usize = 32;
/// Least time between two DHT walks of one node (see `rediscover`).
const WALK_INTERVAL: Duration = Duration::from_secs(30);

/// How to run a node.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub keypair: Keypair,
    pub fleet: String,
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (and to fall back on): `/ip4/…/tcp/…/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    /// Concurrent inbound blob requests served per peer; more get `Busy`.
    pub max_inbound_per_peer: usize,
    pub request_timeout: Duration,
    /// How long an unused connection stays open (direct connections to other networks
    /// are kept open regardless, see [`keep`]).
    pub idle_timeout: Duration,
    /// Serve as a circuit relay (v2) for nodes behind NAT: the hub does. Circuits are
    /// sized for DCUtR's signalling, not for chunks (see [`direct`]).
    pub relay_server: bool,
    /// Where the node keeps its reachability and hole-punch counts (shared with the
    /// caller's metrics).
    pub state: Arc<NetState>,
}

impl NetConfig {
    pub fn new(keypair: Keypair, fleet: &str) -> NetConfig {
        NetConfig {
            keypair,
            fleet: fleet.into(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")],
            bootstrap: vec![],
            mdns: false,
            max_inbound_per_peer: 8,
            request_timeout: Duration::from_secs(20),
            idle_timeout: IDLE_TIMEOUT,
            relay_server: false,
            state: Arc::new(NetState::default()),
        }
    }
}

/// A libp2p key from a 32-byte ed25519 seed (the same seed format as `proto::SecretKey`).
pub fn keypair_from_seed(seed: [u8; 32]) -> Keypair {
    let mut seed = seed;
    Keypair::ed25519_from_bytes(&mut seed).expect("32 bytes is a valid ed25519 seed")
}

/// The libp2p peer id of the node whose identity is `key` (devices derive theirs from
/// their device key, [`keypair_from_seed`]); `None` for bytes that are not a valid key.
pub fn peer_id_of(key: &proto::PublicKey) -> Option<PeerId> {
    let public = libp2p::identity::ed25519::PublicKey::try_from_bytes(&key.0).ok()?;
    Some(PeerId::from_public_key(&libp2p::identity::PublicKey::from(
        public,
    )))
}

/// What the announce topic (and the broker's retained release and trust topics) carry:
/// releases' freshness, roots, revocation lists, hold lists; each verified through its
/// own entry point by whoever receives it.
pub const ANNOUNCE_TOPIC_KINDS: [proto::codec::Kind; 4] = [
    proto::codec::Kind::Announcement,
    proto::codec::Kind::Root,
    proto::codec::Kind::Revocations,
    proto::codec::Kind::Holds,
];

/// The gossipsub topics a fleet uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// `unifleet/<fleet>/announce`: signed release announcements.
    Announce,
    /// `unifleet/<fleet>/status`: signed device status reports.
    Status,
}

impl Topic {
    fn name(self, fleet: &str) -> String {
        match self {
            Topic::Announce => format!("unifleet/{fleet}/announce"),
            Topic::Status => format!("unifleet/{fleet}/status"),
        }
    }
}

/// What the node tells the application.
#[derive(Debug)]
pub enum NetEvent {
    Listening(Multiaddr),
    /// A gossip message awaiting validation: answer with [`NetClient::validate`].
    Gossip {
        topic: Topic,
        data: Vec<u8>,
        /// The peer that forwarded it (who to credit or blame for relaying).
        source: PeerId,
        id: MessageId,
    },
    /// A peer asks for a blob: answer with [`NetClient::respond`].
    BlobWanted {
        peer: PeerId,
        digest: Digest,
        /// What is asked: the blob; the blob or peers to ask ([`BlobResponse::Elsewhere`]);
        /// or nothing, the asker having stored the blob ([`BlobResponse::Noted`]).
        want: Want,
        /// Where the asker was seen and listens, so others can be sent to it.
        seen: Seen,
        reply: ReplyId,
    },
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
}

/// What this node knows of where a peer is: enough for the hub to tell others how to
/// reach it (see the hub's `place`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// The far end of its direct connection to this node: its public address, for a
    /// peer behind NAT.
    pub remote: Option<Multiaddr>,
    /// Where it says it listens (identify): its LAN addresses, behind NAT.
    pub listen: Vec<Multiaddr>,
    /// It holds a relay reservation on this node (reachable through it).
    pub relayed: bool,
}

/// How a connection reaches a peer, for counting bytes by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// A private, link-local or loopback address: the same LAN (or host).
    Lan,
    /// A public address of a peer in another network: a public peer or a hole punch.
    Direct,
    /// Through a relay (the hub's circuit relay).
    Relayed,
    /// The hub itself (named by the caller: the node cannot tell the hub from a peer).
    Hub,
}

impl Path {
    pub const ALL: [Path; 4] = [Path::Lan, Path::Direct, Path::Relayed, Path::Hub];

    /// The path of a connection to a peer. Never [`Path::Hub`]: which peer is the hub is
    /// the caller's knowledge (a device's configured `peers` are bootstrap peers too).
    fn of(endpoint: &ConnectedPoint) -> Path {
        if endpoint.is_relayed() {
            Path::Relayed
        } else if is_private(endpoint.get_remote_address()) {
            Path::Lan
        } else {
            Path::Direct
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Path::Lan => "lan",
            Path::Direct => "direct",
            Path::Relayed => "relayed",
            Path::Hub => "hub",
        }
    }
}

pub use proto::status::Reachability;

fn reachability_from_u8(n: u8) -> Reachability {
    match n {
        1 => Reachability::Public,
        2 => Reachability::Relayed,
        3 => Reachability::Unreachable,
        _ => Reachability::Unknown,
    }
}

/// What the node counts about its connections (read with [`NetClient::state`]).
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
}

impl NetState {
    pub fn reachability(&self) -> Reachability {
        reachability_from_u8(self.reachability.load(Ordering::Relaxed))
    }

    fn set_reachability(&self, r: Reachability) {
        self.reachability.store(r as u8, Ordering::Relaxed);
    }
}

/// A private (RFC 1918, CGNAT, unique-local), link-local or loopback address: one that
/// means something only inside its own network, never to be handed across networks.
pub fn is_private(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => {
            let [a, b, ..] = ip.octets();
            ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || (a == 100 && (64..128).contains(&b))
        }
        Protocol::Ip6(ip) => {
            ip.is_loopback()
                || (ip.segments()[0] & 0xfe00) == 0xfc00
                || (ip.segments()[0] & 0xffc0) == 0xfe80
        }
        _ => false,
    })
}

/// A relay circuit address (`…/p2p-circuit/…`).
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// The IP of an address, if it has one.
pub fn ip_of(addr: &Multiaddr) -> Option<std::net::IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    })
}

/// Identifies a pending inbound blob request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyId(request_response::InboundRequestId);

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("peer {0} does not have the blob")]
    NotFound(PeerId),
    #[error("peer {0} is busy")]
    Busy(PeerId),
    #[error("peer {0} refuses to trade with this device (its key is revoked, or not enrolled at a hub serving enrolled devices only)")]
    Refused(PeerId),
    #[error("peer {0} says to ask {n} other peers", n = .1.len())]
    Elsewhere(PeerId, Vec<(PeerId, Multiaddr)>),
    #[error(
        "no direct path to peer {0}: it is behind NAT and hole punching through the relay failed"
    )]
    NoDirectPath(PeerId),
    #[error("request to {peer} failed: {source}")]
    Failed {
        peer: PeerId,
        source: request_response::OutboundFailure,
    },
    #[error("the network task has stopped")]
    Stopped,
}

/// Why a gossip message was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publishing on gossip: {0}")]
    Gossip(#[from] gossipsub::PublishError),
    #[error("the network task has stopped")]
    Stopped,
}

/// A broker URL that is not `mqtt://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerUrlError {
    #[error("broker URL {0:?} must start with mqtt://")]
    Scheme(String),
    #[error("bad port in broker URL {0:?}")]
    Port(String),
}

#[derive(Debug)]
enum Command {
    Publish {
        topic: Topic,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), PublishError>>,
    },
    Validate {
        id: MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
    },
    Fetch {
        peer: PeerId,
        /// Where to dial the peer if not connected (learned from a redirect).
        addr: Option<Multiaddr>,
        request: BlobRequest,
        reply: FetchReply,
    },
    Respond {
        reply: ReplyId,
        response: BlobResponse,
    },
    Dial(Multiaddr),
    Peers(oneshot::Sender<Vec<PeerId>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
}

/// Cloneable handle to the node. Every method is cancel-safe: dropping the future at
/// worst leaves a command the node executes with nobody listening for its reply.
#[derive(Debug, Clone)]
pub struct NetClient {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
    state: Arc<NetState>,
}

impl NetClient {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Reachability and hole-punch counts.
    pub fn state(&self) -> &NetState {
        &self.state
    }

    pub async fn publish(&self, topic: Topic, data: Vec<u8>) -> Result<(), PublishError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Publish { topic, data, reply })
            .await
            .map_err(|_| PublishError::Stopped)?;
        rx.await.map_err(|_| PublishError::Stopped)?
    }

    /// Tells gossipsub whether to forward (Accept), drop (Ignore) or drop and penalise the
    /// sender (Reject).
    pub async fn validate(&self, id: MessageId, source: PeerId, acceptance: MessageAcceptance) {
        let _ = self
            .tx
            .send(Command::Validate {
                id,
                source,
                acceptance,
            })
            .await;
    }

    /// Asks `peer` for the blob `digest`. The bytes are NOT checked here; the caller
    /// verifies them against the digest (and the manifest) before use.
    pub async fn fetch(&self, peer: PeerId, digest: Digest) -> Result<Vec<u8>, FetchError> {
        self.fetch_with(peer, None, digest, Want::Blob).await
    }

    /// [`NetClient::fetch`], dialling `addr` if the peer is not connected; with
    /// [`Want::BlobOrPeers`] the answer may be [`FetchError::Elsewhere`].
    pub async fn fetch_with(
        &self,
        peer: PeerId,
        addr: Option<Multiaddr>,
        digest: Digest,
        want: Want,
    ) -> Result<Vec<u8>, FetchError> {
        self.fetch_via(peer, addr, digest, want)
            .await
            .map(|(bytes, _)| bytes)
    }

    /// [`NetClient::fetch_with`], saying which path the answer came by.
    pub async fn fetch_via(
        &self,
        peer: PeerId,
        addr: Option<Multiaddr>,
        digest: Digest,
        want: Want,
    ) -> Result<(Vec<u8>, Path), FetchError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Fetch {
                peer,
                addr,
                request: BlobRequest { digest, want },
                reply,
            })
            .await
            .map_err(|_| FetchError::Stopped)?;
        rx.await.map_err(|_| FetchError::Stopped)?
    }

    /// Tells `hub` that this node has stored `digest` and can serve it ([`Want::Stored`]).
    pub async fn tell_stored(&self, hub: PeerId, digest: Digest) -> Result<(), FetchError> {
        self.fetch_with(hub, None, digest, Want::Stored)
            .await
            .map(drop)
    }

    pub async fn respond(&self, reply: ReplyId, response: BlobResponse) {
        let _ = self.tx.send(Command::Respond { reply, response }).await;
    }

    pub async fn dial(&self, addr: Multiaddr) {
        let _ = self.tx.send(Command::Dial(addr)).await;
    }

    pub async fn peers(&self) -> Vec<PeerId> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Peers(tx)).await.is_err() {
            return vec![];
        }
        rx.await.unwrap_or_default()
    }

    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::ListenAddrs(tx)).await.is_err() {
            return vec![];
        }
        rx.await.unwrap_or_default()
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    gossipsub: gossipsub::Behaviour,
    blob: request_response::Behaviour<codec::BlobCodec>,
    relay: Toggle<relay::Behaviour>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    ping: ping::Behaviour,
    keep: keep::Behaviour,
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("setting up the TCP transport: {0}")]
    Transport(#[source] BoxError),
    #[error("setting up the behaviours: {0}")]
    Behaviour(#[source] BoxError),
    #[error("subscribing to gossip topic {topic}: {source}")]
    Subscribe {
        topic: String,
        source: gossipsub::SubscriptionError,
    },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: Multiaddr,
        source: libp2p::TransportError<std::io::Error>,
    },
}

/// An error from libp2p's builder, whose types are generic.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Starts the node on the current tokio runtime. It runs until `shutdown` resolves or
/// every [`NetClient`] is dropped.
pub fn spawn(
    cfg: NetConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<
    (
        NetClient,
        mpsc::UnboundedReceiver<NetEvent>,
        tokio::task::JoinHandle<()>,
    ),
    StartError,
> {
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
    // which dials), once a listener is up (see `Node::listening`).
    let state = cfg.state.clone();
    let (cmd_tx, cmd_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let node = Node {
        swarm,
        fleet: cfg.fleet.clone(),
        events: ev_tx,
        pending_fetch: HashMap::new(),
        pending_reply: HashMap::new(),
        inbound_per_peer: HashMap::new(),
        max_inbound_per_peer: cfg.max_inbound_per_peer,
        bootstrap: cfg.bootstrap.clone(),
        listen_of: HashMap::new(),
        met: std::collections::VecDeque::new(),
        last_walk: None,
        bootstrap_dialled: false,
        conns: HashMap::new(),
        upgrades: direct::Upgrades::default(),
        reserved_here: HashSet::new(),
        relay_server: cfg.relay_server,
        relay_listener: None,
        state: state.clone(),
    };
    let handle = tokio::spawn(node.run(cmd_rx, shutdown));
    Ok((
        NetClient {
            tx: cmd_tx,
            peer_id,
            state,
        },
        ev_rx,
        handle,
    ))
}

/// Splits a broker URL `mqtt://host:port` (port defaults to 1883).
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), BrokerUrlError> {
    let rest = url
        .strip_prefix("mqtt://")
        .ok_or_else(|| BrokerUrlError::Scheme(url.into()))?;
    match rest.rsplit_once(':') {
        Some((h, p)) => Ok((
            h.to_string(),
            p.parse().map_err(|_| BrokerUrlError::Port(url.into()))?,
        )),
        None => Ok((rest.to_string(), 1883)),
    }
}

/// The peer id at the end of a `/…/p2p/<id>` address.
/// A redirect entry for `peer` listening on `addr`.
pub fn peer_ref(peer: &PeerId, addr: &Multiaddr) -> proto::blob::PeerRef {
    proto::blob::PeerRef {
        peer: peer.to_bytes(),
        addr: addr.to_string(),
    }
}

/// The peer and address of a redirect entry, if both parse.
pub fn parse_peer_ref(r: &proto::blob::PeerRef) -> Option<(PeerId, Multiaddr)> {
    Some((PeerId::from_bytes(&r.peer).ok()?, r.addr.parse().ok()?))
}

pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

fn build_swarm(cfg: &NetConfig) -> Result<Swarm<Behaviour>, StartError> {
    let fleet = cfg.fleet.clone();
    let mdns_on = cfg.mdns;
    let timeout = cfg.request_timeout;
    let relay_server = cfg.relay_server;
    let bootstrap_peers: Vec<PeerId> = cfg.bootstrap.iter().filter_map(peer_of).collect();
    let idle_timeout = cfg.idle_timeout;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| StartError::Transport(e.into()))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| StartError::Transport(e.into()))?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let gossip_cfg = gossipsub::ConfigBuilder::default()
                // Every payload is a signed envelope the application checks once (see
                // `validate`); a libp2p signature on top cost every node one ed25519
                // check per copy received — the largest CPU cost of a 1,000-node fleet.
                .validation_mode(gossipsub::ValidationMode::Anonymous)
                // A message is its bytes: the same announcement re-gossiped by the hub
                // or by peers within `duplicate_cache_time` is a duplicate everywhere
                // and goes no further. Later, it floods again for whoever joined since.
                .message_id_fn(|m: &gossipsub::Message| {
                    gossipsub::MessageId::from(Digest::of(&m.data).0.to_vec())
                })
                .duplicate_cache_time(GOSSIP_DEDUP)
                .validate_messages()
                .max_transmit_size(MAX_GOSSIP_BYTES)
                .heartbeat_interval(Duration::from_secs(1))
                // The per-connection send queue is preallocated (5,000 slots, ~1 MB, by
                // default) for every connection, blob fetches included; our gossip is a
                // few small messages a minute.
                .connection_handler_queue_len(GOSSIP_QUEUE)
                .build()?;
            let gossipsub =
                gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_cfg)?;
            let mut kad_cfg = kad::Config::new(libp2p::StreamProtocol::try_from_owned(format!(
                "/unifleet/{fleet}/kad/1"
            ))?);
            kad_cfg.set_query_timeout(Duration::from_secs(30));
            // Walks happen in `rediscover`, only when short of peers, and ask few.
            kad_cfg.set_periodic_bootstrap_interval(None);
            // Only addresses we add (above) enter the routing table, not every peer that
            // happens to connect.
            kad_cfg.set_kbucket_inserts(kad::BucketInserts::Manual);
            kad_cfg.set_replication_factor(
                std::num::NonZeroUsize::new(TARGET_PEERS).expect("non-zero"),
            );
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad_cfg,
            );
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            let blob = request_response::Behaviour::new(
                [(codec::PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(timeout)
                    .with_max_concurrent_streams(64),
            );
            let relay = relay_server.then(|| relay::Behaviour::new(peer_id, relay_config()));
            Ok(Behaviour {
                identify: identify::Behaviour::new(identify::Config::new(
                    format!("/unifleet/{fleet}/1"),
                    key.public(),
                )),
                kad,
                mdns: mdns.into(),
                gossipsub,
                blob,
                relay: relay.into(),
                relay_client,
                dcutr: dcutr::Behaviour::new(peer_id),
                ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_EVERY)),
                keep: keep::Behaviour {
                    kept: keep::Kept::new(bootstrap_peers, keep::KEPT),
                },
            })
        })
        .map_err(|e| StartError::Behaviour(e.into()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
        .build();
    Ok(swarm)
}

/// The hub's relay: a reservation for every device behind NAT in a large fleet, and
/// circuits that carry DCUtR's handshake and a little gossip, not chunks (requests to a
/// peer reached only through the relay wait for the punch, see [`direct`]). No per-IP
/// limits: every device of a home shares one public address.
fn relay_config() -> relay::Config {
    relay::Config {
        max_reservations: 8_192,
        max_reservations_per_peer: 2,
        reservation_duration: Duration::from_secs(60 * 60),
        reservation_rate_limiters: vec![],
        max_circuits: 1_024,
        max_circuits_per_peer: 16,
        max_circuit_duration: Duration::from_secs(2 * 60),
        max_circuit_bytes: 256 * 1024,
        circuit_src_rate_limiters: vec![],
    }
}

type FetchReply = oneshot::Sender<Result<(Vec<u8>, Path), FetchError>>;

struct Node {
    swarm: Swarm<Behaviour>,
    fleet: String,
    events: mpsc::UnboundedSender<NetEvent>,
    pending_fetch: HashMap<request_response::OutboundRequestId, (PeerId, FetchReply)>,
    pending_reply: HashMap<ReplyId, (PeerId, request_response::ResponseChannel<BlobResponse>)>,
    inbound_per_peer: HashMap<PeerId, usize>,
    max_inbound_per_peer: usize,
    bootstrap: Vec<Multiaddr>,
    /// Where each connected peer listens (identify), for redirects to it.
    listen_of: HashMap<PeerId, Vec<Multiaddr>>,
    /// Bootstrap peers are dialled once a listener is up: a dial made before goes out
    /// from an ephemeral port, and the address the hub then sees (and a NAT maps) is not
    /// the one this node listens on, so hole punching has nothing to aim at.
    bootstrap_dialled: bool,
    /// Every connection's peer and path.
    conns: HashMap<ConnectionId, Conn>,
    /// Requests waiting for a direct connection.
    upgrades: direct::Upgrades<HeldFetch>,
    /// Peers holding a reservation on this node's relay.
    reserved_here: HashSet<PeerId>,
    relay_server: bool,
    /// This node's listener on the hub's relay, once it knows it is behind NAT.
    relay_listener: Option<ListenerId>,
    state: Arc<NetState>,
    /// Peers identified while a bootstrap peer (the hub) was connected, newest last (at
    /// most [`MET_KEPT`]): not put in the DHT then (see the `Identify` event), put there
    /// when the last bootstrap peer is lost, so a device can still find peers through the
    /// DHT with the hub gone.
    met: std::collections::VecDeque<(PeerId, Multiaddr)>,
    /// When this node last walked the DHT for more peers.
    last_walk: Option<std::time::Instant>,
}

impl Node {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        tokio::pin!(shutdown);
        // The first round 5 s in: bootstrap peers are dialled when a listener is up.
        let mut rediscover = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(5),
            Duration::from_secs(5),
        );
        let mut punch_deadlines = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                // Commands wait for the first listener (a few ms at start): a fetch from
                // the hub dialled before it would set the hub's view of this node's
                // address (see `bootstrap_dialled`).
                cmd = commands.recv(), if self.bootstrap.is_empty() || self.bootstrap_dialled => {
                    match cmd {
                        Some(cmd) => self.command(cmd),
                        None => break,
                    }
                }
                ev = self.swarm.select_next_some() => self.swarm_event(ev).await,
                _ = rediscover.tick() => self.rediscover(),
                _ = punch_deadlines.tick(), if self.upgrades.held() > 0 => {
                    for held in self.upgrades.expired(Instant::now()) {
                        held.no_direct_path();
                    }
                }
            }
        }
        tracing::debug!("network task stopped");
    }

    /// Keeps the peer set alive: redial bootstrap peers we lost, and walk the DHT to
    /// find devices we have not met (so peers still find each other with the hub gone).
    fn rediscover(&mut self) {
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        if !self.bootstrap_dialled {
            // No listener of the right kind came up: dial from any port.
            self.dial_bootstrap();
            return;
        }
        for addr in &self.bootstrap {
            if let Some(peer) = peer_of(addr) {
                if !connected.contains(&peer) {
                    let _ = self.swarm.dial(addr.clone());
                }
            }
        }
        // A DHT walk dials the peers it asks: in a large fleet, every node walking every
        // few seconds is a storm of handshakes. Walk only when short of peers, and rarely.
        let due = self.last_walk.is_none_or(|t| t.elapsed() >= WALK_INTERVAL);
        if !connected.is_empty() && connected.len() < WALK_BELOW && due {
            self.last_walk = Some(std::time::Instant::now());
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
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
            } => {
                let via = addr.as_ref().map(|a| {
                    if is_relayed(a) {
                        direct::Via::Relay
                    } else {
                        direct::Via::Direct
                    }
                });
                let now = Instant::now();
                let held = HeldFetch {
                    peer,
                    request,
                    reply,
                };
                match self.upgrades.request(peer, held, via, now) {
                    direct::Verdict::Send(f) => {
                        if let Some(addr) = addr {
                            self.swarm.add_peer_address(peer, addr);
                        }
                        self.send_fetch(f)
                    }
                    direct::Verdict::Held { dial } => {
                        if let Some(addr) = addr.filter(|_| dial) {
                            // Only this address: a request's own dial would also try the
                            // peer's circuit addresses (identify), and take whichever
                            // connection came up.
                            let opts = DialOpts::peer_id(peer)
                                .addresses(vec![addr])
                                .condition(PeerCondition::Always)
                                .build();
                            let _ = self.swarm.dial(opts);
                        }
                    }
                    direct::Verdict::NoDirectPath(f) => f.no_direct_path(),
                }
            }
            Command::Respond { reply, response } => {
                if let Some((peer, channel)) = self.pending_reply.remove(&reply) {
                    self.release_inbound(&peer);
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .blob
                        .send_response(channel, response);
                }
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

    fn send_fetch(&mut self, f: HeldFetch) {
        let id = self
            .swarm
            .behaviour_mut()
            .blob
            .send_request(&f.peer, f.request);
        self.state.requests_sent.fetch_add(1, Ordering::Relaxed);
        self.pending_fetch.insert(id, (f.peer, f.reply));
    }

    /// A listener is up: dial the bootstrap peers from its port (see `bootstrap_dialled`).
    fn listening(&mut self, address: &Multiaddr) {
        if self.relay_server && !is_relayed(address) {
            // A relay names its own addresses in every reservation it grants.
            self.swarm.add_external_address(address.clone());
        }
        // Port reuse picks a listener of the same kind (loopback or not) as the address
        // dialled: wait for one (loopback comes up first when listening on every interface).
        let loopback = |a: &Multiaddr| ip_of(a).is_some_and(|ip| ip.is_loopback());
        let fits = self
            .bootstrap
            .iter()
            .any(|b| loopback(b) == loopback(address));
        if !self.bootstrap_dialled && fits {
            self.dial_bootstrap();
        }
    }

    fn dial_bootstrap(&mut self) {
        self.bootstrap_dialled = true;
        for addr in self.bootstrap.clone() {
            if let Err(e) = self.remember_and_dial(&addr) {
                tracing::warn!(%addr, "dialing bootstrap peer: {e}");
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

    /// The hub told this node the address it sees it at. One it listens on: it is
    /// public. Another: it is behind NAT, and takes a slot on the hub's relay so that
    /// peers in other homes can reach it (and punch through).
    fn observed_by_bootstrap(&mut self, hub: PeerId, observed: &Multiaddr) {
        if self.relay_server {
            return;
        }
        let ours = self
            .swarm
            .listeners()
            .filter_map(ip_of)
            .any(|ip| Some(ip) == ip_of(observed));
        if ours {
            if self.state.reachability() != Reachability::Public {
                tracing::info!(%observed, "the hub sees this device at an address it listens on: reachable directly");
            }
            self.swarm.add_external_address(observed.clone());
            self.state.set_reachability(Reachability::Public);
            return;
        }
        if self.relay_listener.is_some() {
            return;
        }
        let Some(hub_addr) = self.bootstrap.iter().find(|a| peer_of(a) == Some(hub)) else {
            return;
        };
        let circuit = hub_addr.clone().with(Protocol::P2pCircuit);
        tracing::info!(%observed, "the hub sees this device at another address (behind NAT): reserving a slot on its relay");
        match self.swarm.listen_on(circuit.clone()) {
            Ok(id) => self.relay_listener = Some(id),
            Err(e) => tracing::warn!(%circuit, "listening through the hub's relay: {e}"),
        }
        if self.state.reachability() != Reachability::Relayed {
            self.state.set_reachability(Reachability::Unreachable);
        }
    }

    fn connection_up(&mut self, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        let path = Path::of(endpoint);
        let remote = endpoint.get_remote_address().clone();
        self.conns.insert(id, Conn { peer, path, remote });
        tracing::debug!(%peer, ?id, ?path, "connection up");
        let relayed = path == Path::Relayed;
        if relayed && self.has_direct(&peer) {
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
        for f in self.upgrades.connected(peer, relayed) {
            self.send_fetch(f);
        }
    }

    fn has_direct(&self, peer: &PeerId) -> bool {
        self.direct_remote(peer).is_some()
    }

    /// Where a direct (not relayed) connection to `peer` comes from, if one is up.
    fn direct_remote(&self, peer: &PeerId) -> Option<Multiaddr> {
        self.conns
            .values()
            .find(|c| c.peer == *peer && c.path != Path::Relayed)
            .map(|c| c.remote.clone())
    }

    fn connection_down(&mut self, peer: PeerId, id: ConnectionId) {
        let Some(Conn { path, .. }) = self.conns.remove(&id) else {
            return;
        };
        tracing::debug!(%peer, ?id, ?path, "connection down");
        let (ready, stranded) = self.upgrades.disconnected(peer, path == Path::Relayed);
        for f in ready {
            self.send_fetch(f);
        }
        for f in stranded {
            f.no_direct_path();
        }
    }

    /// Fewer than [`TARGET_PEERS`] connected or being dialled. (Counting only connected
    /// peers, a node learning of many peers at once dials them all before the first
    /// connection is up: at 1,000 devices, ~50 connections each.)
    fn short_of_peers(&self) -> bool {
        let pending = self
            .swarm
            .network_info()
            .connection_counters()
            .num_pending_outgoing() as usize;
        self.swarm.connected_peers().count() + pending < TARGET_PEERS
    }

    /// One of the bootstrap peers (the hub).
    fn is_bootstrap(&self, peer: &PeerId) -> bool {
        self.bootstrap
            .iter()
            .any(|a| peer_of(a).as_ref() == Some(peer))
    }

    /// Connected to one of the bootstrap peers.
    fn bootstrap_connected(&self) -> bool {
        self.bootstrap
            .iter()
            .filter_map(peer_of)
            .any(|p| self.swarm.is_connected(&p))
    }

    fn release_inbound(&mut self, peer: &PeerId) {
        if let Some(n) = self.inbound_per_peer.get_mut(peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.inbound_per_peer.remove(peer);
            }
        }
    }

    async fn emit(&mut self, ev: NetEvent) {
        // Never waits: the application awaits this task (commands, replies), so a
        // network task waiting on a busy application deadlocked both (a hub answering
        // thousands of parked requests at once stopped for good). What can pile up is
        // bounded where it enters: inbound requests per peer, gossipsub's queues.
        let _ = self.events.send(ev);
    }

    async fn swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                self.listening(&address);
                self.emit(NetEvent::Listening(address)).await
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
            } => {
                self.state
                    .connections_opened
                    .fetch_add(1, Ordering::Relaxed);
                self.connection_up(peer_id, connection_id, &endpoint);
                if num_established.get() == 1 {
                    self.emit(NetEvent::PeerConnected(peer_id)).await
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } if num_established > 0 => self.connection_down(peer_id, connection_id),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => {
                self.connection_down(peer_id, connection_id);
                self.listen_of.remove(&peer_id);
                if self.is_bootstrap(&peer_id) && !self.bootstrap_connected() {
                    for (peer, addr) in std::mem::take(&mut self.met) {
                        self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                    }
                }
                self.emit(NetEvent::PeerDisconnected(peer_id)).await
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                // Learn where a peer listens so the DHT can introduce it to others — while
                // this node is looking for peers and cannot reach a bootstrap peer (the
                // hub, which names peers itself while it is up): every entry added to a
                // small routing table makes kad walk the DHT (libp2p's automatic bootstrap
                // cannot be turned off), and every walk dials the peers it asks. A device
                // idle between releases keeps few connections, so it is short of peers when
                // a release starts: adding every peer it met for a chunk made half of a
                // 1,000-device release's connections.
                self.listen_of.insert(peer_id, info.listen_addrs.clone());
                let is_bootstrap = self.is_bootstrap(&peer_id);
                if is_bootstrap {
                    self.observed_by_bootstrap(peer_id, &info.observed_addr);
                }
                if !is_bootstrap && !self.short_of_peers() {
                    return;
                }
                if !is_bootstrap && self.bootstrap_connected() {
                    if let Some(first) = info.listen_addrs.first() {
                        self.met.retain(|(p, _)| *p != peer_id);
                        if self.met.len() >= MET_KEPT {
                            self.met.pop_front();
                        }
                        self.met.push_back((peer_id, first.clone()));
                    }
                    return;
                }
                for addr in info.listen_addrs.into_iter().filter(|a| !is_relayed(a)) {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted { renewal, .. },
            )) => {
                if !renewal {
                    tracing::info!("reachable through the hub's relay (slot reserved)");
                }
                self.state.set_reachability(Reachability::Relayed);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(ev)) => match ev {
                relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
                    self.reserved_here.insert(src_peer_id);
                }
                relay::Event::ReservationClosed { src_peer_id }
                | relay::Event::ReservationTimedOut { src_peer_id } => {
                    self.reserved_here.remove(&src_peer_id);
                }
                _ => {}
            },
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => {
                    tracing::info!(peer = %remote_peer_id, "hole punched: direct connection");
                    self.state.hole_punches.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, "hole punching failed: {e}");
                    self.state
                        .hole_punch_failures
                        .fetch_add(1, Ordering::Relaxed);
                    for f in self.upgrades.punch_failed(remote_peer_id, Instant::now()) {
                        f.no_direct_path();
                    }
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, ..
            })) if !self.swarm.is_connected(&peer) && self.short_of_peers() => {
                let _ = self.swarm.dial(peer);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                // A neighbour's loopback address is this node's own loopback.
                for (peer, addr) in list
                    .into_iter()
                    .filter(|(_, a)| !ip_of(a).is_some_and(|ip| ip.is_loopback()))
                {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
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
                .await
            }
            SwarmEvent::Behaviour(BehaviourEvent::Blob(ev)) => self.blob_event(ev).await,
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(failure),
            })) if !matches!(failure, ping::Failure::Unsupported) => {
                // Gone without a word (a NAT mapping lost, a peer's power cut), there and
                // silent (a frozen board or process: its kernel still acknowledges TCP,
                // so the ping fails as "negotiation timed out", not as a timeout), or an
                // I/O error on the ping's stream: closed either way, so requests go
                // elsewhere and a kept connection's place is free; a live peer dials
                // again. (A peer without ping, an older agent, is no reason.)
                tracing::debug!(%peer, ?connection, "no answer to a ping ({failure}), closing the connection");
                self.swarm.close_connection(connection);
            }
            _ => {}
        }
    }

    async fn blob_event(&mut self, ev: request_response::Event<BlobRequest, BlobResponse>) {
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
                self.state.requests_received.fetch_add(1, Ordering::Relaxed);
                let n = self.inbound_per_peer.entry(peer).or_default();
                if *n >= self.max_inbound_per_peer {
                    tracing::debug!(%peer, "too many requests in flight; answering Busy");
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .blob
                        .send_response(channel, BlobResponse::Busy);
                    return;
                }
                *n += 1;
                let reply = ReplyId(request_id);
                self.pending_reply.insert(reply, (peer, channel));
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
                })
                .await;
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
                if let Some((_, reply)) = self.pending_fetch.remove(&request_id) {
                    let path = self
                        .conns
                        .get(&connection_id)
                        .map_or(Path::Direct, |c| c.path);
                    let res = match response {
                        BlobResponse::Found(bytes) => Ok((bytes, path)),
                        // The answer to `Want::Stored`: no bytes (see `tell_stored`).
                        BlobResponse::Noted => Ok((Vec::new(), path)),
                        BlobResponse::NotFound => Err(FetchError::NotFound(peer)),
                        BlobResponse::Busy => Err(FetchError::Busy(peer)),
                        BlobResponse::Refused => Err(FetchError::Refused(peer)),
                        BlobResponse::Elsewhere(refs) => Err(FetchError::Elsewhere(
                            peer,
                            refs.iter().filter_map(parse_peer_ref).collect(),
                        )),
                    };
                    let _ = reply.send(res);
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, reply)) = self.pending_fetch.remove(&request_id) {
                    let _ = reply.send(Err(FetchError::Failed {
                        peer,
                        source: error,
                    }));
                }
            }
            Event::InboundFailure {
                peer, request_id, ..
            } => {
                // The response channel is gone with the failed stream; drop our entry
                // (by id: a hub holds thousands of parked requests, and scanning them on
                // every failure was its largest CPU cost at 1,000 devices).
                if self.pending_reply.remove(&ReplyId(request_id)).is_some() {
                    self.release_inbound(&peer);
                }
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

/// A fetch waiting for a direct connection to `peer`.
/// One open connection, as the node classes it.
#[derive(Debug)]
struct Conn {
    peer: PeerId,
    path: Path,
    remote: Multiaddr,
}

#[derive(Debug)]
struct HeldFetch {
    peer: PeerId,
    request: BlobRequest,
    reply: FetchReply,
}

impl HeldFetch {
    fn no_direct_path(self) {
        let _ = self.reply.send(Err(FetchError::NoDirectPath(self.peer)));
    }
}
