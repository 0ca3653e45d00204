//! The application's handle on the node: [`NetClient`] turns each call into a [`Command`]
//! on a bounded channel (with a oneshot reply where there is an answer), which the node
//! loop ([`crate::node`]) executes.

use crate::event::{Path, ReplyId, Topic};
use crate::state::NetState;
use libp2p::gossipsub::{self, MessageAcceptance, MessageId};
use libp2p::{request_response, Multiaddr, PeerId};
use proto::blob::{BlobRequest, BlobResponse, Want};
use proto::Digest;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Capacity of the command channel: a caller awaiting a full channel waits for the node,
/// which never waits on its callers (see [`crate::EVENT_CAPACITY`]).
pub const COMMAND_CAPACITY: usize = 256;

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("peer {0} does not have the blob")]
    NotFound(PeerId),
    #[error("peer {0} is busy")]
    Busy(PeerId),
    #[error("peer {0} refuses to trade with this device (its key is revoked, it is not enrolled at a hub serving enrolled devices only, or the release asked for does not target it)")]
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

/// Where the answer to a fetch goes: the bytes and the path they came by.
pub(crate) type FetchReply = oneshot::Sender<Result<(Vec<u8>, Path), FetchError>>;

/// What a [`NetClient`] asks of the node.
#[derive(Debug)]
pub(crate) enum Command {
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
    pub(crate) fn new(tx: mpsc::Sender<Command>, peer_id: PeerId, state: Arc<NetState>) -> Self {
        NetClient { tx, peer_id, state }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> (NetClient, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        (NetClient::new(tx, peer, Arc::default()), rx)
    }

    #[tokio::test]
    async fn a_fetch_is_one_command_answered_by_its_oneshot() {
        let (net, mut commands) = client();
        let peer = net.peer_id();
        let node = tokio::spawn(async move {
            let Some(Command::Fetch {
                peer: p,
                addr,
                request,
                reply,
            }) = commands.recv().await
            else {
                panic!("expected a fetch");
            };
            assert_eq!((p, addr), (peer, None));
            assert_eq!(request.want, Want::Blob);
            let _ = reply.send(Ok((b"chunk".to_vec(), Path::Lan)));
        });
        let got = net
            .fetch_via(peer, None, Digest::of(b"chunk"), Want::Blob)
            .await;
        assert_eq!(got.unwrap(), (b"chunk".to_vec(), Path::Lan));
        node.await.unwrap();
    }

    #[tokio::test]
    async fn a_stopped_node_is_an_error_or_nothing_never_a_hang() {
        let (net, commands) = client();
        drop(commands);
        let peer = net.peer_id();
        assert!(matches!(
            net.fetch(peer, Digest::of(b"x")).await,
            Err(FetchError::Stopped)
        ));
        assert!(matches!(
            net.publish(Topic::Announce, vec![1]).await,
            Err(PublishError::Stopped)
        ));
        assert!(net.peers().await.is_empty());
        assert!(net.listen_addrs().await.is_empty());
        net.dial("/ip4/127.0.0.1/tcp/1".parse().unwrap()).await;
    }

    #[tokio::test]
    async fn a_node_dropping_the_reply_is_stopped() {
        let (net, mut commands) = client();
        let node = tokio::spawn(async move { drop(commands.recv().await) });
        let peer = net.peer_id();
        assert!(matches!(
            net.tell_stored(peer, Digest::of(b"x")).await,
            Err(FetchError::Stopped)
        ));
        node.await.unwrap();
    }
}
