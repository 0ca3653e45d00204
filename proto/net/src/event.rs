//! What the node tells its owner ([`NetEvent`]) and the words those events use: gossip
//! [`Topic`]s, where a peer was [`Seen`], the [`Path`] a connection takes.

use crate::addr::is_private;
use libp2p::core::ConnectedPoint;
use libp2p::gossipsub::MessageId;
use libp2p::{request_response, Multiaddr, PeerId};
use proto::blob::Want;
use proto::Digest;

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
    pub(crate) fn name(self, fleet: &str) -> String {
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
    /// A gossip message awaiting validation: answer with [`crate::NetClient::validate`].
    Gossip {
        topic: Topic,
        data: Vec<u8>,
        /// The peer that forwarded it (who to credit or blame for relaying).
        source: PeerId,
        id: MessageId,
    },
    /// A peer asks for a blob: answer with [`crate::NetClient::respond`].
    BlobWanted {
        peer: PeerId,
        digest: Digest,
        /// What is asked: the blob; the blob or peers to ask
        /// ([`proto::blob::BlobResponse::Elsewhere`]); or nothing, the asker having
        /// stored the blob ([`proto::blob::BlobResponse::Noted`]).
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

/// Identifies a pending inbound blob request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyId(pub(crate) request_response::InboundRequestId);

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
    pub(crate) fn of(endpoint: &ConnectedPoint) -> Path {
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

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::transport::PortUse;
    use libp2p::core::Endpoint;

    fn dialer(addr: &str) -> ConnectedPoint {
        ConnectedPoint::Dialer {
            address: addr.parse().unwrap(),
            role_override: Endpoint::Dialer,
            port_use: PortUse::Reuse,
        }
    }

    #[test]
    fn a_connection_is_classed_by_its_remote_address() {
        assert_eq!(Path::of(&dialer("/ip4/192.168.1.2/tcp/1")), Path::Lan);
        assert_eq!(Path::of(&dialer("/ip4/203.0.113.5/tcp/1")), Path::Direct);
        let hub = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let circuit = format!("/ip4/203.0.113.10/tcp/1/p2p/{hub}/p2p-circuit");
        assert_eq!(Path::of(&dialer(&circuit)), Path::Relayed);
    }

    #[test]
    fn topics_are_named_per_fleet() {
        assert_eq!(Topic::Announce.name("home"), "unifleet/home/announce");
        assert_eq!(Topic::Status.name("home"), "unifleet/home/status");
    }
}
