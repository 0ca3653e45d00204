//! The `/unifleet/blob/1` request-response messages: fetch a manifest or a chunk by digest.
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
}

/// The answer to a [`BlobRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobResponse {
    /// Encoded as bytes (not a sequence of u8s): the same wire bytes, decoded in one copy.
    Found(#[serde(with = "serde_bytes")] Vec<u8>),
    NotFound,
    /// Too many requests in flight from this peer; try another peer or later.
    Busy,
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
    pub fn decode(bytes: &[u8]) -> Result<BlobResponse, CodecError> {
        codec::decode(Kind::BlobResponse, bytes)
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
        }
        .encode()
        .unwrap();
        // Header (6) + 32 raw digest bytes: digests are not hex on the wire.
        assert_eq!(bytes.len(), 6 + 32, "{bytes:?}");
        assert_eq!(BlobRequest::decode(&bytes).unwrap().digest, Digest([7; 32]));
        let resp = BlobResponse::Found(vec![1, 2, 3]);
        assert_eq!(BlobResponse::decode(&resp.encode().unwrap()).unwrap(), resp);
    }
}
