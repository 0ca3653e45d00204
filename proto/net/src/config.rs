//! How to run a node ([`NetConfig`]) and the node's identity.

use crate::state::NetState;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use std::sync::Arc;
use std::time::Duration;

/// How long a connection nothing uses stays open by default (see [`crate::keep`] for
/// those kept open regardless).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// are kept open regardless, see [`crate::keep`]).
    pub idle_timeout: Duration,
    /// Serve as a circuit relay (v2) for nodes behind NAT: the hub does. Circuits are
    /// sized for DCUtR's signalling, not for chunks (see [`crate::direct`]).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_key_and_its_libp2p_key_name_the_same_peer() {
        let seed = [7; 32];
        let device = proto::SecretKey::from_seed(seed).public();
        let node = keypair_from_seed(seed).public().to_peer_id();
        assert_eq!(peer_id_of(&device), Some(node));
    }
}
