//! The `/unifleet/blob/1` requests in flight, both ways: this node's fetches (sent, or
//! held by [`direct`] until a direct connection is up) waiting for their answer, and
//! peers' requests waiting for the application's, at most `max_inbound_per_peer` per
//! peer (more are answered `Busy` at once). The node loop owns one and hands it the
//! swarm to act on.

use crate::addr::{is_relayed, parse_peer_ref};
use crate::client::{FetchError, FetchReply};
use crate::direct;
use crate::event::{Path, ReplyId};
use crate::state::NetState;
use crate::swarm::Behaviour;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{request_response, Multiaddr, PeerId, Swarm};
use proto::blob::{BlobRequest, BlobResponse};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A fetch waiting for a direct connection to `peer`.
#[derive(Debug)]
pub(crate) struct HeldFetch {
    peer: PeerId,
    request: BlobRequest,
    reply: FetchReply,
}

impl HeldFetch {
    fn no_direct_path(self) {
        let _ = self.reply.send(Err(FetchError::NoDirectPath(self.peer)));
    }
}

pub(crate) struct Requests {
    pending_fetch: HashMap<request_response::OutboundRequestId, (PeerId, FetchReply)>,
    pending_reply: HashMap<ReplyId, (PeerId, request_response::ResponseChannel<BlobResponse>)>,
    inbound_per_peer: HashMap<PeerId, usize>,
    max_inbound_per_peer: usize,
    /// Requests waiting for a direct connection.
    upgrades: direct::Upgrades<HeldFetch>,
    state: Arc<NetState>,
}

impl Requests {
    pub(crate) fn new(max_inbound_per_peer: usize, state: Arc<NetState>) -> Requests {
        Requests {
            pending_fetch: HashMap::new(),
            pending_reply: HashMap::new(),
            inbound_per_peer: HashMap::new(),
            max_inbound_per_peer,
            upgrades: direct::Upgrades::default(),
            state,
        }
    }

    /// Asks `peer` for a blob, now or once a direct connection to it is up; `addr` is
    /// where to dial it if it is not connected (learned from a redirect).
    pub(crate) fn fetch(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        addr: Option<Multiaddr>,
        request: BlobRequest,
        reply: FetchReply,
    ) {
        let via = addr.as_ref().map(|a| {
            if is_relayed(a) {
                direct::Via::Relay
            } else {
                direct::Via::Direct
            }
        });
        let held = HeldFetch {
            peer,
            request,
            reply,
        };
        match self.upgrades.request(peer, held, via, Instant::now()) {
            direct::Verdict::Send(f) => {
                if let Some(addr) = addr {
                    swarm.add_peer_address(peer, addr);
                }
                self.send(swarm, f)
            }
            direct::Verdict::Held { dial } => {
                if let Some(addr) = addr.filter(|_| dial) {
                    // Only this address: a request's own dial would also try the peer's
                    // circuit addresses (identify), and take whichever connection came up.
                    let opts = DialOpts::peer_id(peer)
                        .addresses(vec![addr])
                        .condition(PeerCondition::Always)
                        .build();
                    let _ = swarm.dial(opts);
                }
            }
            direct::Verdict::NoDirectPath(f) => f.no_direct_path(),
        }
    }

    fn send(&mut self, swarm: &mut Swarm<Behaviour>, f: HeldFetch) {
        let id = swarm.behaviour_mut().blob.send_request(&f.peer, f.request);
        self.state.requests_sent.fetch_add(1, Ordering::Relaxed);
        self.pending_fetch.insert(id, (f.peer, f.reply));
    }

    /// Fetches waiting for their peer.
    pub(crate) fn held(&self) -> usize {
        self.upgrades.held()
    }

    /// Answers the fetches that waited too long for a punch: no direct path.
    pub(crate) fn expire(&mut self, now: Instant) {
        for held in self.upgrades.expired(now) {
            held.no_direct_path();
        }
    }

    /// A connection to `peer` is up: fetches waiting for one go out.
    pub(crate) fn connected(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, relayed: bool) {
        for f in self.upgrades.connected(peer, relayed) {
            self.send(swarm, f);
        }
    }

    /// A connection to `peer` closed: fetches waiting for the relayed one to go out, and
    /// those left with no way to the peer are answered.
    pub(crate) fn disconnected(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        relayed: bool,
    ) {
        let (ready, stranded) = self.upgrades.disconnected(peer, relayed);
        for f in ready {
            self.send(swarm, f);
        }
        for f in stranded {
            f.no_direct_path();
        }
    }

    pub(crate) fn punch_failed(&mut self, peer: PeerId, now: Instant) {
        for f in self.upgrades.punch_failed(peer, now) {
            f.no_direct_path();
        }
    }

    /// The answer to one of this node's fetches, which came by `path`.
    pub(crate) fn answered(
        &mut self,
        peer: PeerId,
        path: Path,
        request_id: request_response::OutboundRequestId,
        response: BlobResponse,
    ) {
        let Some((_, reply)) = self.pending_fetch.remove(&request_id) else {
            return;
        };
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

    pub(crate) fn outbound_failed(
        &mut self,
        peer: PeerId,
        request_id: request_response::OutboundRequestId,
        error: request_response::OutboundFailure,
    ) {
        if let Some((_, reply)) = self.pending_fetch.remove(&request_id) {
            let _ = reply.send(Err(FetchError::Failed {
                peer,
                source: error,
            }));
        }
    }

    /// A peer asks for a blob: the id to hand the application for its answer, or `None`
    /// when the peer has too many requests in flight (answered `Busy` here).
    pub(crate) fn wanted(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        request_id: request_response::InboundRequestId,
        channel: request_response::ResponseChannel<BlobResponse>,
    ) -> Option<ReplyId> {
        self.state.requests_received.fetch_add(1, Ordering::Relaxed);
        let n = self.inbound_per_peer.entry(peer).or_default();
        if *n >= self.max_inbound_per_peer {
            tracing::debug!(%peer, "too many requests in flight; answering Busy");
            let _ = swarm
                .behaviour_mut()
                .blob
                .send_response(channel, BlobResponse::Busy);
            return None;
        }
        *n += 1;
        let reply = ReplyId(request_id);
        self.pending_reply.insert(reply, (peer, channel));
        Some(reply)
    }

    /// The answer to a peer's request (from the application, or `Busy` from the node
    /// when the application was too far behind to be asked).
    pub(crate) fn respond(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        reply: ReplyId,
        response: BlobResponse,
    ) {
        if let Some((peer, channel)) = self.pending_reply.remove(&reply) {
            self.release_inbound(&peer);
            let _ = swarm.behaviour_mut().blob.send_response(channel, response);
        }
    }

    /// A peer's request failed (its stream is gone, and the response channel with it).
    pub(crate) fn inbound_failed(
        &mut self,
        peer: PeerId,
        request_id: request_response::InboundRequestId,
    ) {
        // By id: a hub holds thousands of parked requests, and scanning them on every
        // failure was its largest CPU cost at 1,000 devices.
        if self.pending_reply.remove(&ReplyId(request_id)).is_some() {
            self.release_inbound(&peer);
        }
    }

    fn release_inbound(&mut self, peer: &PeerId) {
        if let Some(n) = self.inbound_per_peer.get_mut(peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.inbound_per_peer.remove(peer);
            }
        }
    }
}
