//! Signed envelopes: a framed payload plus signatures over `context || payload`.
//!
//! The payload is kept as the exact bytes that were signed. Verification runs on those raw
//! bytes before the payload is decoded, and nothing is ever re-encoded to verify. Each
//! payload kind has its own context string, so a signature made for one message type can
//! never be replayed as another.

use crate::codec::{self, CodecError, Kind};
use crate::error::VerifyError;
use crate::keys::{KeyId, PublicKey, SecretKey};
use crate::role::Role;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Most signatures one envelope may carry (a k-of-n root with n ≤ 16, twice during rotation).
pub const MAX_SIGNATURES: usize = 32;
/// Encoded size of one signature entry: key id, signature, and slack for framing.
const SIGNATURE_ENTRY_MAX: usize = 32 + 64 + 4;

/// The domain-separation prefix signed before a payload of `kind`.
pub fn context(kind: Kind) -> &'static [u8] {
    match kind {
        Kind::Root => b"unifleet/root/v1\0",
        Kind::Manifest => b"unifleet/manifest/v1\0",
        Kind::Announcement => b"unifleet/announcement/v1\0",
        Kind::StatusReport => b"unifleet/status/v1\0",
        Kind::Revocations => b"unifleet/revocations/v1\0",
        Kind::Holds => b"unifleet/holds/v1\0",
        // Blob messages are never signed: blobs are verified by digest.
        Kind::BlobRequest => b"unifleet/blob-request/never-signed\0",
        Kind::BlobResponse => b"unifleet/blob-response/never-signed\0",
        // Envelopes are never signed themselves; a distinct context keeps that harmless.
        Kind::Envelope => b"unifleet/envelope/never-signed\0",
    }
}

/// One signature and the id of the key that made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySignature {
    pub key_id: KeyId,
    #[serde(with = "crate::fixed_bytes")]
    pub signature: [u8; 64],
}

/// A framed payload and the signatures over it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// A complete framed message (magic, version, kind, body): exactly the signed bytes.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub signatures: Vec<KeySignature>,
}

impl Envelope {
    /// An unsigned envelope around an already framed payload.
    pub fn new(payload: Vec<u8>) -> Result<Envelope, CodecError> {
        let kind = codec::peek_kind(&payload)?;
        if kind == Kind::Envelope {
            return Err(CodecError::NestedEnvelope);
        }
        Ok(Envelope {
            payload,
            signatures: Vec::new(),
        })
    }

    /// Encodes `value` as a message of `kind` and wraps it, unsigned.
    pub fn seal<T: Serialize>(kind: Kind, value: &T) -> Result<Envelope, CodecError> {
        Envelope::new(codec::encode(kind, value)?)
    }

    /// The kind of the wrapped payload.
    pub fn payload_kind(&self) -> Result<Kind, CodecError> {
        codec::peek_kind(&self.payload)
    }

    /// Adds (or replaces) the signature of `key`. Signing twice with one key is idempotent.
    pub fn sign(&mut self, key: &SecretKey) -> Result<(), CodecError> {
        let kind = self.payload_kind()?;
        let signature = key.sign(context(kind), &self.payload);
        let key_id = key.id();
        self.signatures.retain(|s| s.key_id != key_id);
        if self.signatures.len() >= MAX_SIGNATURES {
            return Err(CodecError::TooManySignatures {
                max: MAX_SIGNATURES,
            });
        }
        self.signatures.push(KeySignature { key_id, signature });
        Ok(())
    }

    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(Kind::Envelope, self)
    }

    /// Decodes an envelope that must wrap a payload of `payload_kind`, enforcing that
    /// kind's size limit (plus room for signatures) before anything is decoded.
    pub fn decode(bytes: &[u8], payload_kind: Kind) -> Result<Envelope, VerifyError> {
        let env = Envelope::decode_within(bytes, envelope_limit(payload_kind))?;
        let found = env.payload_kind()?;
        if found != payload_kind {
            return Err(CodecError::WrongKind {
                expected: payload_kind,
                found,
            }
            .into());
        }
        if env.payload.len() > payload_kind.max_len() {
            return Err(CodecError::Oversized {
                kind: payload_kind,
                len: env.payload.len(),
                limit: payload_kind.max_len(),
            }
            .into());
        }
        if env.signatures.len() > MAX_SIGNATURES {
            return Err(VerifyError::TooManySignatures {
                kind: payload_kind,
                count: env.signatures.len(),
                limit: MAX_SIGNATURES,
            });
        }
        Ok(env)
    }

    /// The payload kind of a signed message of one of `kinds`, for a channel that carries
    /// several (the announce topic carries announcements, roots and revocation lists).
    /// Reads only the frame headers; the caller then verifies it through that kind's entry
    /// point.
    pub fn signed_kind(bytes: &[u8], kinds: &[Kind]) -> Result<Kind, VerifyError> {
        let limit = kinds.iter().map(|k| envelope_limit(*k)).max().unwrap_or(0);
        let env = Envelope::decode_within(bytes, limit)?;
        let found = env.payload_kind()?;
        if !kinds.contains(&found) {
            return Err(CodecError::WrongKind {
                expected: kinds[0],
                found,
            }
            .into());
        }
        Ok(found)
    }

    /// The envelope framing of `bytes`, refused before decoding if longer than `limit`.
    fn decode_within(bytes: &[u8], limit: usize) -> Result<Envelope, VerifyError> {
        if bytes.len() > limit {
            return Err(CodecError::Oversized {
                kind: Kind::Envelope,
                len: bytes.len(),
                limit,
            }
            .into());
        }
        Ok(codec::decode(Kind::Envelope, bytes)?)
    }

    /// Checks that a threshold of `role`'s keys signed this envelope. Signatures by keys
    /// outside the role are skipped here (see [`Envelope::require_known_signers`]); a
    /// signature by a key of the role that does not verify is always an error.
    pub fn require_threshold(
        &self,
        role_name: &'static str,
        role: &Role,
    ) -> Result<(), VerifyError> {
        let kind = self.payload_kind()?;
        if self.signatures.is_empty() {
            return Err(VerifyError::MissingSignature { kind });
        }
        let mut valid = BTreeSet::new();
        for sig in &self.signatures {
            if let Some(key) = role.key(&sig.key_id) {
                if !key.verify(context(kind), &self.payload, &sig.signature) {
                    return Err(VerifyError::BadSignature {
                        kind,
                        key_id: sig.key_id,
                    });
                }
                valid.insert(sig.key_id);
            }
        }
        let need = role.threshold as usize;
        if valid.len() < need {
            if valid.is_empty() {
                return Err(VerifyError::UnknownKey {
                    kind,
                    key_id: self.signatures[0].key_id,
                });
            }
            return Err(VerifyError::BelowThreshold {
                kind,
                role: role_name,
                have: valid.len(),
                need,
            });
        }
        Ok(())
    }

    /// Refuses any signature by a key that belongs to none of `roles`, and any signature
    /// that does not verify: every byte of every signature must be accounted for.
    pub fn require_known_signers(&self, roles: &[&Role]) -> Result<(), VerifyError> {
        let kind = self.payload_kind()?;
        for sig in &self.signatures {
            let key: Option<&PublicKey> = roles.iter().find_map(|r| r.key(&sig.key_id));
            match key {
                None => {
                    return Err(VerifyError::UnknownKey {
                        kind,
                        key_id: sig.key_id,
                    })
                }
                Some(key) if !key.verify(context(kind), &self.payload, &sig.signature) => {
                    return Err(VerifyError::BadSignature {
                        kind,
                        key_id: sig.key_id,
                    })
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Verifies this envelope against exactly one role (every signer must belong to it
    /// and a threshold must have signed), then decodes the payload.
    pub fn open<T: serde::de::DeserializeOwned>(
        &self,
        role_name: &'static str,
        role: &Role,
    ) -> Result<T, VerifyError> {
        let kind = self.payload_kind()?;
        self.require_known_signers(&[role])?;
        self.require_threshold(role_name, role)?;
        Ok(codec::decode(kind, &self.payload)?)
    }
}

/// The largest envelope accepted around a payload of `kind`.
pub fn envelope_limit(kind: Kind) -> usize {
    codec::HEADER_LEN + 16 + kind.max_len() + MAX_SIGNATURES * SIGNATURE_ENTRY_MAX
}
