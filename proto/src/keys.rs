//! ed25519 keys, key ids and their text form.
//!
//! A key id is the BLAKE3 digest of the 32 public key bytes. Keys are stored as one line
//! of text (`unifleet-ed25519-public <hex>` / `unifleet-ed25519-secret <hex>`) so an
//! operator can tell the files apart at a glance; parsing either never echoes a secret.

use crate::digest::Digest;
use ed25519_dalek::Signer;
use serde::{Deserialize, Serialize};
use std::fmt;

const PUBLIC_PREFIX: &str = "unifleet-ed25519-public";
const SECRET_PREFIX: &str = "unifleet-ed25519-secret";

/// Digest of a public key; how signatures name their signer.
pub type KeyId = Digest;

/// An ed25519 public key, as its 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        crate::fixed_bytes::serialize_hex_or_bytes(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
        crate::fixed_bytes::deserialize_hex_or_bytes(d).map(PublicKey)
    }
}

impl PublicKey {
    pub fn id(&self) -> KeyId {
        Digest::of(&self.0)
    }

    /// Checks `signature` over `context || message`. False for a malformed key or a
    /// signature that does not verify (strict verification: no malleable signatures).
    pub fn verify(&self, context: &[u8], message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        let mut signed = Vec::with_capacity(context.len() + message.len());
        signed.extend_from_slice(context);
        signed.extend_from_slice(message);
        key.verify_strict(&signed, &sig).is_ok()
    }

    pub fn to_text(&self) -> String {
        format!("{PUBLIC_PREFIX} {}\n", hex::encode(self.0))
    }

    pub fn from_text(text: &str) -> Result<PublicKey, KeyTextError> {
        let bytes = parse_line(text, PUBLIC_PREFIX, SECRET_PREFIX)?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| KeyTextError::NotOnCurve)?;
        Ok(PublicKey(bytes))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(id {})", self.id().short())
    }
}

/// An ed25519 signing key. Never printed: `Debug` shows only the public key id.
#[derive(Clone)]
pub struct SecretKey(ed25519_dalek::SigningKey);

impl SecretKey {
    /// A key from 32 bytes of secret entropy (the caller owns the randomness source).
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    pub fn id(&self) -> KeyId {
        self.public().id()
    }

    /// Signs `context || message`.
    pub fn sign(&self, context: &[u8], message: &[u8]) -> [u8; 64] {
        let mut signed = Vec::with_capacity(context.len() + message.len());
        signed.extend_from_slice(context);
        signed.extend_from_slice(message);
        self.0.sign(&signed).to_bytes()
    }

    /// The 32-byte seed, for deriving another identity from the same secret (the libp2p
    /// key of a device or hub). Never log or send it.
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The secret key file's text. Only for writing the key file.
    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX} {}\n", hex::encode(self.0.to_bytes()))
    }

    pub fn from_text(text: &str) -> Result<SecretKey, KeyTextError> {
        Ok(SecretKey::from_seed(parse_line(
            text,
            SECRET_PREFIX,
            PUBLIC_PREFIX,
        )?))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public id {})", self.id().short())
    }
}

/// Why a key file's text could not be read. Never contains the text itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyTextError {
    #[error("this is a public key file; a secret key file is needed here")]
    PublicWhereSecretExpected,
    #[error("this is a secret key file; give the public key (.pub) here")]
    SecretWherePublicExpected,
    #[error("not a unifleet key file (expected a line starting with `{expected}`)")]
    NotAKeyFile { expected: &'static str },
    #[error("key file holds malformed hex (expected 64 hex characters)")]
    BadHex,
    #[error("public key is not a valid ed25519 point")]
    NotOnCurve,
}

fn parse_line(
    text: &str,
    want: &'static str,
    other: &'static str,
) -> Result<[u8; 32], KeyTextError> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'));
    let line = line.unwrap_or("");
    let (prefix, rest) = line.split_once(' ').unwrap_or((line, ""));
    if prefix == other {
        return Err(if want == SECRET_PREFIX {
            KeyTextError::PublicWhereSecretExpected
        } else {
            KeyTextError::SecretWherePublicExpected
        });
    }
    if prefix != want {
        return Err(KeyTextError::NotAKeyFile { expected: want });
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(rest.trim(), &mut out).map_err(|_| KeyTextError::BadHex)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_confusion() {
        let sk = SecretKey::from_seed([7; 32]);
        let pk = sk.public();
        assert_eq!(PublicKey::from_text(&pk.to_text()).unwrap(), pk);
        assert_eq!(SecretKey::from_text(&sk.to_text()).unwrap().public(), pk);
        assert_eq!(
            PublicKey::from_text(&sk.to_text()),
            Err(KeyTextError::SecretWherePublicExpected)
        );
        assert!(matches!(
            SecretKey::from_text(&pk.to_text()),
            Err(KeyTextError::PublicWhereSecretExpected)
        ));
        assert!(!format!("{sk:?}").contains(&hex::encode([7u8; 32])));
    }

    #[test]
    fn signature_binds_context() {
        let sk = SecretKey::from_seed([1; 32]);
        let sig = sk.sign(b"ctx-a\0", b"hello");
        assert!(sk.public().verify(b"ctx-a\0", b"hello", &sig));
        assert!(!sk.public().verify(b"ctx-b\0", b"hello", &sig));
        assert!(!sk.public().verify(b"ctx-a\0", b"hellp", &sig));
    }
}
