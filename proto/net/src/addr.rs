//! Address helpers: what kind of address a multiaddr is (private, relayed), the IP and
//! peer id in it, the `PeerRef`s of the blob protocol's redirects, and broker URLs. Pure
//! functions, shared by the node, [`crate::keep`] and the hub's placement of peers.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use std::net::IpAddr;

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
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    })
}

/// An address on the loopback interface (127.0.0.0/8, ::1).
pub(crate) fn is_loopback(addr: &Multiaddr) -> bool {
    ip_of(addr).is_some_and(|ip| ip.is_loopback())
}

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

/// The peer id in a `/…/p2p/<id>` address (the first, for a circuit address: the relay).
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// A broker URL that is not `mqtt://host[:port]` or `mqtts://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerUrlError {
    #[error("broker URL {0:?} must start with mqtt:// (plaintext, loopback) or mqtts:// (TLS)")]
    Scheme(String),
    #[error("bad port in broker URL {0:?}")]
    Port(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    #[test]
    fn private_addresses_are_those_meaningful_only_inside_their_network() {
        for private in [
            "/ip4/10.1.2.3/tcp/1",
            "/ip4/172.16.0.1/tcp/1",
            "/ip4/192.168.1.9/tcp/1",
            "/ip4/127.0.0.1/tcp/1",
            "/ip4/169.254.3.4/tcp/1",
            "/ip4/100.64.0.1/tcp/1",
            "/ip4/100.127.255.255/tcp/1",
            "/ip6/::1/tcp/1",
            "/ip6/fd00::1/tcp/1",
            "/ip6/fe80::1/tcp/1",
        ] {
            assert!(is_private(&a(private)), "{private}");
        }
        for public in [
            "/ip4/203.0.113.10/tcp/1",
            "/ip4/100.63.255.255/tcp/1",
            "/ip4/100.128.0.1/tcp/1",
            "/ip6/2001:db8::1/tcp/1",
            "/dns4/example.com/tcp/1",
        ] {
            assert!(!is_private(&a(public)), "{public}");
        }
    }

    #[test]
    fn a_circuit_address_is_relayed_and_names_the_relay_first() {
        let (hub, me) = (peer(), peer());
        let circuit = a(&format!(
            "/ip4/203.0.113.10/tcp/4001/p2p/{hub}/p2p-circuit/p2p/{me}"
        ));
        assert!(is_relayed(&circuit));
        assert_eq!(peer_of(&circuit), Some(hub));
        let direct = a(&format!("/ip4/203.0.113.10/tcp/4001/p2p/{me}"));
        assert!(!is_relayed(&direct));
        assert_eq!(peer_of(&direct), Some(me));
        assert_eq!(peer_of(&a("/ip4/203.0.113.10/tcp/4001")), None);
    }

    #[test]
    fn ip_of_finds_v4_and_v6_and_nothing_in_a_name() {
        assert_eq!(
            ip_of(&a("/ip4/192.0.2.1/tcp/1")),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            ip_of(&a("/ip6/2001:db8::2/tcp/1")),
            Some("2001:db8::2".parse().unwrap())
        );
        assert_eq!(ip_of(&a("/dns4/example.com/tcp/1")), None);
        assert!(is_loopback(&a("/ip4/127.0.0.1/tcp/1")));
        assert!(is_loopback(&a("/ip6/::1/tcp/1")));
        assert!(!is_loopback(&a("/ip4/10.0.0.1/tcp/1")));
    }

    #[test]
    fn a_peer_ref_round_trips_and_garbage_is_none() {
        let p = peer();
        let addr = a("/ip4/198.51.100.7/tcp/4001");
        let r = peer_ref(&p, &addr);
        assert_eq!(parse_peer_ref(&r), Some((p, addr)));
        let bad_peer = proto::blob::PeerRef {
            peer: vec![1, 2, 3],
            addr: "/ip4/198.51.100.7/tcp/4001".into(),
        };
        assert_eq!(parse_peer_ref(&bad_peer), None);
        let bad_addr = proto::blob::PeerRef {
            peer: p.to_bytes(),
            addr: "not an address".into(),
        };
        assert_eq!(parse_peer_ref(&bad_addr), None);
    }
}
