//! unifleet's libp2p node, shared by the hub and the device agent (both are "a peer";
//! the hub is the peer that has everything). Lives beside `proto` rather than in either
//! binary crate so that `hub` and `device` never depend on each other.
//!
//! One task owns the [`Swarm`](libp2p::Swarm) ([`start`], on the caller's task tree);
//! callers hold a cloneable [`NetClient`] that sends commands over a bounded channel (with
//! a oneshot reply where there is an answer), and receive [`NetEvent`]s on a bounded
//! channel the node never waits on (see [`EVENT_CAPACITY`]: what does not fit is
//! answered in the application's place or held, bounded). Transport: TCP + noise +
//! yamux. Behaviours: identify, Kademlia (peer discovery), optional mDNS, gossipsub with
//! application-level validation (a message is forwarded only after the application
//! accepted it), the `/unifleet/blob/1` request-response protocol with a response size
//! cap, a request timeout and a bound on concurrent inbound requests per peer, circuit
//! relay (server on the hub, client everywhere), DCUtR and ping.
//!
//! Modules, from the application down:
//! - `client`: [`NetClient`], the application's handle, and the commands it sends;
//! - `event`: [`NetEvent`] and the words it uses ([`Topic`], [`Seen`], [`Path`]);
//! - `node`: the node loop ([`start`]): commands in, swarm events dispatched to
//!   one handler per behaviour, the policies' actions carried out;
//! - `outbox`: the bounded event channel and what happens when it is full;
//! - [`discovery`]: sans-IO: when to dial the bootstrap peers, walk or feed the DHT, dial
//!   mDNS neighbours, and what the hub's view of our address says about reachability;
//! - [`direct`]: sans-IO: requests to a peer reached through the relay wait for a punch;
//! - [`keep`]: which idle connections stay open;
//! - `swarm`: the transport and the behaviours' configuration;
//! - `addr`: what kind of address a multiaddr is, peer refs, broker URLs;
//! - `config`: [`NetConfig`] and the node's identity; `state`: [`NetState`], its counters;
//! - `codec`: the blob protocol's framing;
//! - [`tasks`]: the one cancellation tree of a process; [`ratelimit`], [`metrics`],
//!   [`mqtt_topics`]: shared by hub and device, not used by the node.
// Unit tests spawn freely; the product code goes through net::tasks (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

mod addr;
pub mod broker_tls;
mod client;
mod codec;
mod config;
pub mod direct;
pub mod discovery;
mod event;
pub mod keep;
pub mod metrics;
pub mod mqtt_topics;
mod node;
mod outbox;
pub mod ratelimit;
mod requests;
mod state;
mod swarm;
pub mod tasks;

pub use addr::{ip_of, is_private, is_relayed, parse_peer_ref, peer_of, peer_ref, BrokerUrlError};
pub use client::{FetchError, NetClient, PublishError, COMMAND_CAPACITY};
pub use codec::PROTOCOL as BLOB_PROTOCOL;
pub use config::{keypair_from_seed, peer_id_of, NetConfig, IDLE_TIMEOUT};
pub use event::{NetEvent, Path, ReplyId, Seen, Topic, ANNOUNCE_TOPIC_KINDS};
pub use libp2p::gossipsub::{MessageAcceptance, MessageId};
pub use libp2p::multiaddr::Protocol;
pub use libp2p::{identity::Keypair, Multiaddr, PeerId};
pub use node::start;
pub use outbox::EVENT_CAPACITY;
pub use proto::blob::Want;
pub use proto::status::Reachability;
pub use state::NetState;
pub use swarm::{BoxError, StartError};
