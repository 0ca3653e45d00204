//! The libp2p side of the node: the transport (TCP + noise + yamux, and the relay
//! client's), the [`Behaviour`]s it runs and how each is configured.

use crate::addr::peer_of;
use crate::codec;
use crate::config::NetConfig;
use crate::discovery::TARGET_PEERS;
use crate::keep;
use libp2p::swarm::{behaviour::toggle::Toggle, NetworkBehaviour};
use libp2p::{
    dcutr, gossipsub, identify, kad, mdns, noise, ping, relay, request_response, tcp, yamux,
    Multiaddr, PeerId, Swarm,
};
use proto::Digest;
use std::time::Duration;

/// Largest gossipsub message: announcements are < 1 KiB, status reports < 8 KiB.
const MAX_GOSSIP_BYTES: usize = 16 * 1024;
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
/// The per-connection send queue is preallocated (5,000 slots, ~1 MB, by default) for
/// every connection, blob fetches included; our gossip is a few small messages a minute.
const GOSSIP_QUEUE: usize = 128;

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) identify: identify::Behaviour,
    pub(crate) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) blob: request_response::Behaviour<codec::BlobCodec>,
    pub(crate) relay: Toggle<relay::Behaviour>,
    pub(crate) relay_client: relay::client::Behaviour,
    pub(crate) dcutr: dcutr::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) keep: keep::Behaviour,
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

pub(crate) fn build_swarm(cfg: &NetConfig) -> Result<Swarm<Behaviour>, StartError> {
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
        .with_behaviour(|key, relay_client| behaviour(cfg, key, relay_client))
        .map_err(|e| StartError::Behaviour(e.into()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
        .build();
    Ok(swarm)
}

fn behaviour(
    cfg: &NetConfig,
    key: &libp2p::identity::Keypair,
    relay_client: relay::client::Behaviour,
) -> Result<Behaviour, BoxError> {
    let peer_id = key.public().to_peer_id();
    let fleet = &cfg.fleet;
    let mdns = if cfg.mdns {
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
            .with_request_timeout(cfg.request_timeout)
            .with_max_concurrent_streams(64),
    );
    let relay = cfg
        .relay_server
        .then(|| relay::Behaviour::new(peer_id, relay_config()));
    let bootstrap_peers: Vec<PeerId> = cfg.bootstrap.iter().filter_map(peer_of).collect();
    Ok(Behaviour {
        identify: identify::Behaviour::new(identify::Config::new(
            format!("/unifleet/{fleet}/1"),
            key.public(),
        )),
        kad: kad(fleet, peer_id)?,
        mdns: mdns.into(),
        gossipsub: gossipsub()?,
        blob,
        relay: relay.into(),
        relay_client,
        dcutr: dcutr::Behaviour::new(peer_id),
        ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_EVERY)),
        keep: keep::Behaviour {
            kept: keep::Kept::new(bootstrap_peers, keep::KEPT),
        },
    })
}

fn gossipsub() -> Result<gossipsub::Behaviour, BoxError> {
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
        .connection_handler_queue_len(GOSSIP_QUEUE)
        .build()?;
    Ok(gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Anonymous,
        gossip_cfg,
    )?)
}

fn kad(fleet: &str, peer_id: PeerId) -> Result<kad::Behaviour<kad::store::MemoryStore>, BoxError> {
    let mut kad_cfg = kad::Config::new(libp2p::StreamProtocol::try_from_owned(format!(
        "/unifleet/{fleet}/kad/1"
    ))?);
    kad_cfg.set_query_timeout(Duration::from_secs(30));
    // Walks happen when `discovery` says so, only when short of peers, and ask few.
    kad_cfg.set_periodic_bootstrap_interval(None);
    // Only addresses the node adds (see `discovery`) enter the routing table, not every
    // peer that happens to connect.
    kad_cfg.set_kbucket_inserts(kad::BucketInserts::Manual);
    kad_cfg.set_replication_factor(std::num::NonZeroUsize::new(TARGET_PEERS).expect("non-zero"));
    let mut kad =
        kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_cfg);
    kad.set_mode(Some(kad::Mode::Server));
    Ok(kad)
}

/// The hub's relay: a reservation for every device behind NAT in a large fleet, and
/// circuits that carry DCUtR's handshake and a little gossip, not chunks (requests to a
/// peer reached only through the relay wait for the punch, see [`crate::direct`]). No
/// per-IP limits: every device of a home shares one public address.
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
