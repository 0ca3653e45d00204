//! Where each device is, as the hub sees it, and the address another device should use
//! to reach it — so the tracker names only holders the asker can reach, its LAN
//! neighbours first, and no private address is ever handed across networks.
//!
//! The hub sees a device's connection come from an address (`remote`: the public
//! address of its home router, behind NAT) and hears from identify where it listens
//! (`listen`: its LAN addresses). From the two:
//! - the remote IP is one it listens on: **public**, dialled at that address;
//! - the remote port is its listen port: a NAT that keeps ports (a cone NAT, like
//!   Linux's plain masquerade): hole punching works between two such homes;
//! - another port: a NAT that picks a port per connection (symmetric): nobody outside
//!   can predict where to punch, so only its LAN neighbours (and the hub) serve it.
//!
//! Two devices behind the same public address share a LAN (or a host): they get each
//! other's private address. Across homes, a public holder is given by its address and a
//! punchable one by a circuit through the hub's relay, which DCUtR upgrades to a direct
//! connection before any chunk moves (`net::direct`). No I/O: the hub's `Blobs` feeds it.

use crate::tracker::{Reach, Topology};
use net::{ip_of, is_private, is_relayed, Multiaddr, PeerId, Seen};
use std::collections::HashMap;

/// What kind of address translation stands between a device and the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// No translation: the hub sees it at an address it listens on.
    Public,
    /// Translated, the port kept: punchable.
    PortKeeping,
    /// Translated to another port: not punchable.
    PortChanging,
    /// Not seen yet.
    Unknown,
}

/// One device's place in the network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Place {
    seen: Seen,
}

impl Place {
    pub fn new(seen: Seen) -> Place {
        Place { seen }
    }

    fn remote_ip(&self) -> Option<std::net::IpAddr> {
        self.seen.remote.as_ref().and_then(ip_of)
    }

    fn direct_listen(&self) -> impl Iterator<Item = &Multiaddr> {
        self.seen.listen.iter().filter(|a| !is_relayed(a))
    }

    pub fn nat(&self) -> Nat {
        let Some(remote) = &self.seen.remote else {
            return Nat::Unknown;
        };
        let ip = ip_of(remote);
        if self.direct_listen().any(|a| ip_of(a) == ip) {
            Nat::Public
        } else if self
            .direct_listen()
            .any(|a| tcp_port(a) == tcp_port(remote))
        {
            Nat::PortKeeping
        } else {
            Nat::PortChanging
        }
    }

    /// Where a device on the same LAN (or host) dials it: a private listen address,
    /// loopback only if the hub saw it on loopback (everything on one machine).
    fn lan_addr(&self) -> Option<&Multiaddr> {
        let on_loopback = self.remote_ip().is_some_and(|ip| ip.is_loopback());
        self.direct_listen()
            .filter(|a| is_private(a))
            .find(|a| on_loopback == ip_of(a).is_some_and(|ip| ip.is_loopback()))
            .or_else(|| self.direct_listen().next())
    }

    /// Where anyone dials a public device.
    fn public_addr(&self) -> Option<&Multiaddr> {
        let ip = self.remote_ip()?;
        self.direct_listen().find(|a| ip_of(a) == Some(ip))
    }
}

fn tcp_port(a: &Multiaddr) -> Option<u16> {
    a.iter().find_map(|p| match p {
        net::Protocol::Tcp(port) => Some(port),
        _ => None,
    })
}

/// Every connected device's place, and the hub's own relay address.
#[derive(Debug, Default)]
pub struct Places {
    places: HashMap<PeerId, Place>,
    /// `…/p2p/<hub>` when the hub is a relay: circuits are dialled through it.
    relay: Option<Multiaddr>,
}

impl Places {
    pub fn set_relay(&mut self, relay: Option<Multiaddr>) {
        self.relay = relay;
    }

    /// What the hub has just seen of `peer` (with each of its requests).
    pub fn update(&mut self, peer: PeerId, place: Place) {
        self.places.insert(peer, place);
    }

    pub fn remove(&mut self, peer: &PeerId) {
        self.places.remove(peer);
    }

    /// Whether a place is known well enough to hand others an address for it.
    pub fn knows(&self, peer: &PeerId) -> bool {
        self.places
            .get(peer)
            .is_some_and(|p| p.direct_listen().next().is_some())
    }

    /// How `asker` reaches `holder`, and at which address.
    pub fn route(&self, asker: &PeerId, holder: &PeerId) -> Option<(Reach, Multiaddr)> {
        let (a, h) = (self.places.get(asker)?, self.places.get(holder)?);
        if a.remote_ip().is_some() && a.remote_ip() == h.remote_ip() {
            // Behind the same public address: the same home (or the same host).
            return h.lan_addr().map(|addr| (Reach::Near, addr.clone()));
        }
        match h.nat() {
            Nat::Public => {
                let reach = if h.seen.remote.as_ref().is_some_and(is_private) {
                    // The hub sees it at a private address: the hub's own LAN.
                    Reach::Near
                } else {
                    Reach::Far
                };
                h.public_addr().map(|addr| (reach, addr.clone()))
            }
            Nat::PortKeeping
                if h.seen.relayed && matches!(a.nat(), Nat::Public | Nat::PortKeeping) =>
            {
                let circuit = self
                    .relay
                    .clone()?
                    .with(net::Protocol::P2pCircuit)
                    .with(net::Protocol::P2p(*holder));
                Some((Reach::Far, circuit))
            }
            _ => None,
        }
    }
}

impl Topology<PeerId> for Places {
    fn reach(&self, asker: &PeerId, holder: &PeerId) -> Reach {
        self.route(asker, holder).map_or(Reach::No, |(r, _)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(remote: &str, listen: &[&str], relayed: bool) -> Place {
        Place::new(Seen {
            remote: Some(remote.parse().unwrap()),
            listen: listen.iter().map(|a| a.parse().unwrap()).collect(),
            relayed,
        })
    }

    fn places(list: &[(PeerId, Place)]) -> Places {
        let mut p = Places::default();
        p.set_relay(Some(
            format!("/ip4/198.51.100.1/tcp/4001/p2p/{}", PeerId::random())
                .parse()
                .unwrap(),
        ));
        for (id, place) in list {
            p.update(*id, place.clone());
        }
        p
    }

    const A_LISTEN: &[&str] = &["/ip4/127.0.0.1/tcp/5001", "/ip4/192.168.1.11/tcp/5001"];

    #[test]
    fn lan_neighbours_get_each_others_private_address_and_nobody_else_does() {
        let (a1, a2, c1) = (PeerId::random(), PeerId::random(), PeerId::random());
        let p = places(&[
            (a1, seen("/ip4/198.51.100.10/tcp/5001", A_LISTEN, true)),
            (
                a2,
                seen(
                    "/ip4/198.51.100.10/tcp/5002",
                    &["/ip4/192.168.1.12/tcp/5002"],
                    true,
                ),
            ),
            (
                c1,
                seen(
                    "/ip4/198.51.100.30/tcp/5001",
                    &["/ip4/192.168.1.11/tcp/5001"],
                    true,
                ),
            ),
        ]);
        assert_eq!(
            p.route(&a2, &a1),
            Some((Reach::Near, "/ip4/192.168.1.11/tcp/5001".parse().unwrap()))
        );
        // c1 is in another home with the same LAN range: a1 gets a relay circuit to it.
        let (reach, addr) = p.route(&a1, &c1).unwrap();
        assert_eq!(reach, Reach::Far);
        assert!(is_relayed(&addr) && !is_private(&addr), "{addr}");
        assert_eq!(p.places[&a1].nat(), Nat::PortKeeping);
    }

    #[test]
    fn a_port_changing_nat_is_reached_by_its_neighbours_only() {
        let (b1, b2, a1) = (PeerId::random(), PeerId::random(), PeerId::random());
        let p = places(&[
            (
                b1,
                seen(
                    "/ip4/198.51.100.20/tcp/40123",
                    &["/ip4/192.168.1.11/tcp/5001"],
                    true,
                ),
            ),
            (
                b2,
                seen(
                    "/ip4/198.51.100.20/tcp/51234",
                    &["/ip4/192.168.1.12/tcp/5001"],
                    true,
                ),
            ),
            (a1, seen("/ip4/198.51.100.10/tcp/5001", A_LISTEN, true)),
        ]);
        assert_eq!(p.places[&b1].nat(), Nat::PortChanging);
        assert_eq!(p.reach(&a1, &b1), Reach::No);
        assert_eq!(p.reach(&b1, &a1), Reach::No);
        assert_eq!(p.reach(&b2, &b1), Reach::Near);
    }

    #[test]
    fn a_public_device_is_dialled_at_its_address_and_the_lab_on_loopback() {
        let (s, a1, l1, l2) = (
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
        );
        let p = places(&[
            (
                s,
                seen(
                    "/ip4/198.51.100.5/tcp/6000",
                    &["/ip4/198.51.100.5/tcp/7000"],
                    false,
                ),
            ),
            (a1, seen("/ip4/198.51.100.10/tcp/5001", A_LISTEN, false)),
            (
                l1,
                seen(
                    "/ip4/127.0.0.1/tcp/6001",
                    &["/ip4/127.0.0.1/tcp/6001"],
                    false,
                ),
            ),
            (
                l2,
                seen(
                    "/ip4/127.0.0.1/tcp/6002",
                    &["/ip4/127.0.0.1/tcp/6002"],
                    false,
                ),
            ),
        ]);
        assert_eq!(
            p.route(&a1, &s),
            Some((Reach::Far, "/ip4/198.51.100.5/tcp/7000".parse().unwrap()))
        );
        // a1 holds no relay slot: it cannot be reached from outside its home.
        assert_eq!(p.reach(&s, &a1), Reach::No);
        assert_eq!(
            p.route(&l1, &l2),
            Some((Reach::Near, "/ip4/127.0.0.1/tcp/6002".parse().unwrap()))
        );
    }
}
