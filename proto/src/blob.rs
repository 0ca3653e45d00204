//! The `/unifleet/blob/1` request-response messages: fetch a manifest or a chunk by digest.
//!
//! A device that can fetch from peers says so (`redirect_ok`); the hub may then answer
//! [`BlobResponse::Elsewhere`] with peers that already have (or are fetching) the blob,
//! so it sends each chunk of a release about once however large the fleet.
//!
//! Blobs carry no signature of their own: the requester knows the digest it asked for and
//! checks the bytes against it (and, for chunks, against the manifest's declared size)
//! before using them.

use crate::codec::{self, CodecError, Kind};
use crate::digest::Digest;
use serde::{Deserialize, Serialize};

/// "Send me the blob with this digest."
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRequest {
    pub digest: Digest,
    /// The asker can fetch from peers: an answer of [`BlobResponse::Elsewhere`] is fine.
    pub redirect_ok: bool,
}

/// Most peers in one [`BlobResponse::Elsewhere`].
pub const MAX_ELSEWHERE: usize = 8;
/// Longest address text in a [`PeerRef`].
pub const MAX_ADDR_LEN: usize = 256;

/// A peer to ask instead: its libp2p peer id (multihash bytes) and one listen address
/// (multiaddr text). Neither is trusted: whatever the peer sends is checked by digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRef {
    #[serde(with = "serde_bytes")]
    pub peer: Vec<u8>,
    pub addr: String,
}

/// The answer to a [`BlobRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobResponse {
    /// Encoded as bytes (not a sequence of u8s): the same wire bytes, decoded in one copy.
    Found(#[serde(with = "serde_bytes")] Vec<u8>),
    NotFound,
    /// Too many requests in flight from this peer; try another peer or later.
    Busy,
    /// Ask these peers instead (only to a request with `redirect_ok`).
    Elsewhere(Vec<PeerRef>),
}

impl BlobRequest {
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(Kind::BlobRequest, self)
    }
    pub fn decode(bytes: &[u8]) -> Result<BlobRequest, CodecError> {
        codec::decode(Kind::BlobRequest, bytes)
    }
}

impl BlobResponse {
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(Kind::BlobResponse, self)
    }
    /// Decodes a response, refusing a redirect list longer than [`MAX_ELSEWHERE`] or with
    /// an address longer than [`MAX_ADDR_LEN`].
    pub fn decode(bytes: &[u8]) -> Result<BlobResponse, CodecError> {
        let r: BlobResponse = codec::decode(Kind::BlobResponse, bytes)?;
        if let BlobResponse::Elsewhere(peers) = &r {
            if peers.len() > MAX_ELSEWHERE || peers.iter().any(|p| p.addr.len() > MAX_ADDR_LEN) {
                return Err(CodecError::Malformed {
                    kind: Kind::BlobResponse,
                    reason: format!(
                        "redirect to {} peers (at most {MAX_ELSEWHERE}, addresses of at most {MAX_ADDR_LEN} bytes)",
                        peers.len()
                    ),
                });
            }
        }
        Ok(r)
    }
}

/// Checks a blob against the digest it was requested by.
pub fn check(expected: &Digest, bytes: &[u8]) -> Result<(), crate::VerifyError> {
    let actual = Digest::of(bytes);
    if actual != *expected {
        return Err(crate::VerifyError::ChunkDigestMismatch {
            index: 0,
            expected: *expected,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_small_and_digests_are_raw_bytes() {
        let bytes = BlobRequest {
            digest: Digest([7; 32]),
            redirect_ok: true,
        }
        .encode()
        .unwrap();
        // Header (6) + 32 raw digest bytes + the flag: digests are not hex on the wire.
        assert_eq!(bytes.len(), 6 + 32 + 1, "{bytes:?}");
        assert_eq!(BlobRequest::decode(&bytes).unwrap().digest, Digest([7; 32]));
        let resp = BlobResponse::Found(vec![1, 2, 3]);
        assert_eq!(BlobResponse::decode(&resp.encode().unwrap()).unwrap(), resp);
    }
}

#[cfg(test)]
mod redirect_tests {
    use super::*;

    fn refs(n: usize, addr_len: usize) -> BlobResponse {
        BlobResponse::Elsewhere(
            (0..n)
                .map(|i| PeerRef {
                    peer: vec![i as u8; 38],
                    addr: "a".repeat(addr_len),
                })
                .collect(),
        )
    }

    #[test]
    fn a_redirect_round_trips() {
        let r = refs(MAX_ELSEWHERE, 40);
        assert_eq!(BlobResponse::decode(&r.encode().unwrap()).unwrap(), r);
    }

    #[test]
    fn too_many_peers_or_too_long_an_address_is_refused() {
        for bad in [refs(MAX_ELSEWHERE + 1, 10), refs(1, MAX_ADDR_LEN + 1)] {
            let err = BlobResponse::decode(&bad.encode().unwrap()).unwrap_err();
            assert!(err.to_string().contains("redirect"), "{err}");
        }
    }
}
