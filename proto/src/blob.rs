//! The `/unifleet/blob/1` request-response messages: fetch a manifest or a chunk by digest.
//!
//! A device that can fetch from peers says so ([`Want::BlobOrPeers`]); the hub may then
//! answer [`BlobResponse::Elsewhere`] with peers that have the blob, so it sends each chunk
//! of a release about once however large the fleet. Having stored such a chunk, the device
//! tells the hub ([`Want::Stored`], answered [`BlobResponse::Noted`], or riding on its
//! next ask, [`Want::BlobOrPeersAndStored`]): from then on it is a source the hub can name.
//!
//! A device also asks each peer it connects to for its newest announcement of an app the
//! broker cannot tell it about, the broker being down or the release unknown yet
//! ([`Want::Announcement`]).
//!
//! Blobs carry no signature of their own: the requester knows the digest it asked for and
//! checks the bytes against it (and, for chunks, against the manifest's declared size)
//! before using them.

use crate::codec::{self, CodecError, Kind};
use crate::digest::Digest;
use serde::{Deserialize, Serialize};

/// "Send me the blob with this digest" (or, to the hub, "I have stored it").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRequest {
    pub digest: Digest,
    pub want: Want,
}

/// What a [`BlobRequest`] asks for. On the wire `Blob` and `BlobOrPeers` are the bytes 0
/// and 1, as the boolean `redirect_ok` they replace was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Want {
    /// The blob itself.
    Blob,
    /// The blob, or peers to ask for it: the asker can fetch from peers, so an answer of
    /// [`BlobResponse::Elsewhere`] is fine.
    BlobOrPeers,
    /// Nothing: the asker has stored this blob (fetched after a [`Want::BlobOrPeers`]) and
    /// can serve it. Answered [`BlobResponse::Noted`].
    Stored,
    /// The newest signed announcement the peer holds for the app and channel whose
    /// [`announcement_key`] is the digest, answered [`BlobResponse::Found`] with its bytes
    /// or [`BlobResponse::NotFound`]. How a device that cannot learn of releases from the
    /// broker learns of them from each peer it connects to, instead of waiting for a re-gossip; the
    /// bytes are checked like any announcement (root, signature, expiry, replay).
    Announcement,
    /// The trust root of the version whose [`root_key`] is the digest: how a device that
    /// heard of a newer root fetches the links it lacks from the hub or any peer (each link
    /// is verified against the one before it, so who serves it does not matter).
    Root,
    /// The newest signed revocation list (the digest is ignored), answered like
    /// [`Want::Announcement`].
    Revocations,
    /// The newest signed list of held releases (the digest is ignored), answered like
    /// [`Want::Revocations`].
    Holds,
    /// A [`Want::Stored`] report of the digest carried here and a [`Want::BlobOrPeers`]
    /// ask for the request's digest, in one message: a device that has stored a chunk
    /// asks for its next one at once, and the report rides on that ask (one request a
    /// chunk to the hub instead of two). The hub notes the report first, so the asker is
    /// a holder before it is answered. Only a hub understands it: a device asked this way
    /// treats it as [`Want::Blob`]. An older hub cannot decode it: the ask fails, the
    /// device asks again without it and the report is lost (upgrade the hub first).
    BlobOrPeersAndStored(Digest),
    /// A [`Want::BlobOrPeers`] ask again, saying the holders the hub named for this blob
    /// last time did not deliver it before the asker's deadline (a peer frozen, its path
    /// gone silent, or too slow): the hub names them to nobody for a while. The hub takes
    /// it only from an asker it named holders to for this blob, some seconds before, and
    /// only a few times a minute from one asker (`hub::tracker`). An older hub cannot
    /// decode it: the ask fails, the device asks again and the report is lost.
    BlobOrPeersMissed,
    /// The asker's MQTT client certificate (PEM; the digest is ignored): the hub's broker
    /// CA certifies an enrolled device's own key under its enrolled name, answered
    /// [`BlobResponse::Found`], or [`BlobResponse::Refused`] to anyone not enrolled.
    /// Devices answer [`BlobResponse::NotFound`]. An older hub cannot decode it.
    BrokerCert,
}

impl Want {
    /// The report a request carries: the digest stored, if any.
    pub fn stored(&self, digest: Digest) -> Option<Digest> {
        match self {
            Want::Stored => Some(digest),
            Want::BlobOrPeersAndStored(stored) => Some(*stored),
            _ => None,
        }
    }

    /// The asker can fetch from peers: the hub may answer with holders to ask.
    pub fn peers_ok(&self) -> bool {
        matches!(
            self,
            Want::BlobOrPeers | Want::BlobOrPeersAndStored(_) | Want::BlobOrPeersMissed
        )
    }

    /// The asker says the holders it was last named for this blob missed.
    pub fn missed(&self) -> bool {
        matches!(self, Want::BlobOrPeersMissed)
    }
}

/// The digest a [`Want::Root`] request names: a root version, not content.
pub fn root_key(version: u64) -> Digest {
    let mut name = b"unifleet root\0".to_vec();
    name.extend_from_slice(&version.to_le_bytes());
    Digest::of(&name)
}

/// The digest a [`Want::Announcement`] request names: a track (app, channel, platform),
/// not content.
pub fn announcement_key(track: &crate::announcement::Track) -> Digest {
    let mut name = b"unifleet announcement\0".to_vec();
    name.extend_from_slice(track.app.as_bytes());
    name.push(0);
    name.extend_from_slice(track.channel.as_bytes());
    name.push(0);
    name.extend_from_slice(track.platform.name().as_bytes());
    Digest::of(&name)
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
    /// Ask these peers instead (only to [`Want::BlobOrPeers`]); none: ask again shortly.
    Elsewhere(Vec<PeerRef>),
    /// The answer to [`Want::Stored`].
    Noted,
    /// This node does not trade with the asker: its key is revoked (or, at a hub set to
    /// serve enrolled devices only, not enrolled). Not worth asking again.
    Refused,
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
            if peers.len() > MAX_ELSEWHERE {
                return Err(CodecError::TooManyPeers {
                    peers: peers.len(),
                    max: MAX_ELSEWHERE,
                });
            }
            if let Some(p) = peers.iter().find(|p| p.addr.len() > MAX_ADDR_LEN) {
                return Err(CodecError::AddressTooLong {
                    len: p.addr.len(),
                    max: MAX_ADDR_LEN,
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
    fn announcement_keys_name_one_app_channel_and_platform() {
        use crate::announcement::Track;
        use crate::manifest::Platform::{QemuAarch64, QemuX86_64};
        let key = |app, channel, platform| announcement_key(&Track::new(app, channel, platform));
        let k = key("hello", "stable", QemuX86_64);
        assert_eq!(k, key("hello", "stable", QemuX86_64));
        assert_ne!(k, key("hello", "stable", QemuAarch64));
        assert_ne!(k, key("hello", "beta", QemuX86_64));
        assert_ne!(k, key("hellos", "table", QemuX86_64));
        assert_ne!(k, Digest::of(b"hello"));
    }

    #[test]
    fn request_is_small_and_digests_are_raw_bytes() {
        let bytes = BlobRequest {
            digest: Digest([7; 32]),
            want: Want::BlobOrPeers,
        }
        .encode()
        .unwrap();
        // Header (6) + 32 raw digest bytes + the want: digests are not hex on the wire.
        assert_eq!(bytes.len(), 6 + 32 + 1, "{bytes:?}");
        assert_eq!(BlobRequest::decode(&bytes).unwrap().digest, Digest([7; 32]));
        let carried = Want::BlobOrPeersAndStored(Digest([9; 32]));
        let missed = Want::BlobOrPeersMissed;
        for want in [Want::Blob, Want::BlobOrPeers, Want::Stored, carried, missed] {
            let req = BlobRequest {
                digest: Digest([7; 32]),
                want,
            };
            assert_eq!(BlobRequest::decode(&req.encode().unwrap()).unwrap(), req);
        }
        // The report riding on an ask is one digest more.
        let both = BlobRequest {
            digest: Digest([7; 32]),
            want: carried,
        };
        assert_eq!(both.encode().unwrap().len(), 6 + 32 + 1 + 32);
        assert_eq!(carried.stored(Digest([7; 32])), Some(Digest([9; 32])));
        assert_eq!(Want::Stored.stored(Digest([7; 32])), Some(Digest([7; 32])));
        assert_eq!(Want::BlobOrPeers.stored(Digest([7; 32])), None);
        assert_eq!(missed.stored(Digest([7; 32])), None);
        assert!(missed.missed() && missed.peers_ok() && !carried.missed());
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
