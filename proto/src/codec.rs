//! The one wire codec. Nothing else in unifleet names the serialization library.
//!
//! Every encoded message is `MAGIC (4) | FORMAT_VERSION (1) | kind (1) | body`, where the
//! body is bincode 2 (standard configuration: little-endian, variable-length integers).
//! Decoding checks the frame and a per-kind byte limit *before* the body is looked at,
//! and the body decoder itself runs with an allocation limit, so a hostile length prefix
//! cannot make a decoder allocate more than the message could hold.
//!
//! bincode is pinned at `=2.0.1`: upstream 3.x is a deliberate compile error and 2.0.1 is
//! unmaintained. Keeping it behind [`encode`] and [`decode`] keeps it swappable; the golden
//! vectors in `proto/tests/golden/` pin the bytes so a swap cannot silently change them.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// First four bytes of every unifleet message.
pub const MAGIC: [u8; 4] = *b"UFLT";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u8 = 1;
/// Magic, version and kind.
pub const HEADER_LEN: usize = 6;

/// Upper bound for the bincode decoder's allocations, whatever the message kind.
const DECODER_ALLOCATION_LIMIT: usize = 8 * 1024 * 1024;

/// What a message is. The byte value is part of the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A signed envelope around one of the other kinds.
    Envelope = 1,
    Root = 2,
    Manifest = 3,
    Announcement = 4,
    StatusReport = 5,
    // 6 is reserved for staging reports.
    BlobRequest = 7,
    BlobResponse = 8,
    Revocations = 9,
    /// The releases held (paused or halted), signed by the rollout role.
    Holds = 10,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Envelope,
        Kind::Root,
        Kind::Manifest,
        Kind::Announcement,
        Kind::StatusReport,
        Kind::BlobRequest,
        Kind::BlobResponse,
        Kind::Revocations,
        Kind::Holds,
    ];

    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Envelope,
            2 => Kind::Root,
            3 => Kind::Manifest,
            4 => Kind::Announcement,
            5 => Kind::StatusReport,
            7 => Kind::BlobRequest,
            8 => Kind::BlobResponse,
            9 => Kind::Revocations,
            10 => Kind::Holds,
            _ => return None,
        })
    }

    /// The largest encoded message of this kind any decoder accepts, header included.
    ///
    /// Manifests carry one entry (~40 bytes) per chunk; 4 MiB holds ~100k chunks, a
    /// multi-GiB image at the 64 KiB average chunk size. An envelope is its payload plus
    /// at most [`crate::envelope::MAX_SIGNATURES`] signatures.
    pub const fn max_len(self) -> usize {
        match self {
            Kind::Envelope => 4 * 1024 * 1024 + 16 * 1024,
            Kind::Root => 64 * 1024,
            Kind::Manifest => 4 * 1024 * 1024,
            Kind::Announcement => 1024,
            Kind::StatusReport => 8 * 1024,
            Kind::BlobRequest => 128,
            // The largest blob is a signed manifest envelope.
            Kind::BlobResponse => 4 * 1024 * 1024 + 32 * 1024,
            // About a thousand revoked devices.
            Kind::Revocations => 96 * 1024,
            // MAX_HOLDS holds with their reasons.
            Kind::Holds => 96 * 1024,
        }
    }

    /// How many `Option`s this kind's struct ends with that were appended after messages
    /// of it were in the field: the manifest's `provenance`; the report's `guest`, then
    /// `hosted`; the revocation list's `members`. A body short of the last `k` of them —
    /// from an older build — reads as those fields `None` ([`decode`]), and the trailing
    /// ones that are `None` are written without their byte ([`encode_appended`]), so
    /// older builds still read the message. Only a value *with* a newer field is new to
    /// them.
    pub const fn appended_options(self) -> usize {
        match self {
            Kind::Manifest | Kind::Revocations => 1,
            Kind::StatusReport => 2,
            _ => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Envelope => "signed envelope",
            Kind::Root => "trust root",
            Kind::Manifest => "release manifest",
            Kind::Announcement => "announcement",
            Kind::StatusReport => "status report",
            Kind::BlobRequest => "blob request",
            Kind::BlobResponse => "blob response",
            Kind::Revocations => "revocation list",
            Kind::Holds => "rollout hold list",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why bytes could not be read as the expected message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("not a unifleet message (bad magic)")]
    BadMagic,
    #[error("message too short for a header ({len} bytes)")]
    Truncated { len: usize },
    #[error("unsupported format version {found} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("unknown message kind {found}")]
    UnknownKind { found: u8 },
    #[error("expected a {expected}, found a {found}")]
    WrongKind { expected: Kind, found: Kind },
    #[error("{kind} of {len} bytes exceeds the {limit}-byte limit")]
    Oversized {
        kind: Kind,
        len: usize,
        limit: usize,
    },
    #[error("malformed {kind}: {body}")]
    Malformed { kind: Kind, body: BodyError },
    #[error("{kind} has {extra} trailing bytes")]
    TrailingBytes { kind: Kind, extra: usize },
    #[error("cannot encode {kind}: {body}")]
    Encode { kind: Kind, body: BodyError },
    #[error("an envelope cannot wrap another envelope")]
    NestedEnvelope,
    #[error("an envelope holds at most {max} signatures")]
    TooManySignatures { max: usize },
    #[error("a redirect to {peers} peers (at most {max})")]
    TooManyPeers { peers: usize, max: usize },
    #[error("a redirect with a {len}-byte address (at most {max})")]
    AddressTooLong { len: usize, max: usize },
}

/// Why a message's body did not decode or encode: the codec's own error, kept opaque so
/// that the codec stays swappable (its type appears nowhere outside this module).
#[derive(Debug, Clone)]
pub struct BodyError(std::sync::Arc<dyn std::error::Error + Send + Sync>);

/// Equal when they say the same (the codec's errors are not comparable themselves).
impl PartialEq for BodyError {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for BodyError {}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODER_ALLOCATION_LIMIT>()
}

fn malformed(kind: Kind, e: bincode::error::DecodeError) -> CodecError {
    CodecError::Malformed {
        kind,
        body: BodyError(std::sync::Arc::new(e)),
    }
}

/// Encodes `value` as a message of `kind`.
///
/// Fails only if the value's own serialization fails or the result would exceed the
/// kind's limit (so nothing is ever written that a peer would refuse to read).
pub fn encode<T: Serialize>(kind: Kind, value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(kind as u8);
    let body = bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode {
        kind,
        body: BodyError(std::sync::Arc::new(e)),
    })?;
    out.extend_from_slice(&body);
    if out.len() > kind.max_len() {
        return Err(CodecError::Oversized {
            kind,
            len: out.len(),
            limit: kind.max_len(),
        });
    }
    Ok(out)
}

/// [`encode`] of a value of a kind with appended `Option`s ([`Kind::appended_options`]):
/// the `absent` last ones (`None`, every one after them too) are left out, giving the
/// bytes builds from before those fields wrote and read.
pub fn encode_appended<T: Serialize>(
    kind: Kind,
    value: &T,
    absent: usize,
) -> Result<Vec<u8>, CodecError> {
    let mut out = encode(kind, value)?;
    for _ in 0..absent.min(kind.appended_options()) {
        // bincode writes `None` as a single 0 byte, and the fields are the struct's last.
        debug_assert_eq!(out.last(), Some(&0));
        out.pop();
    }
    Ok(out)
}

/// Reads the header of `bytes`: checks magic and version, returns the kind.
/// Looks at six bytes only, so it is safe on untrusted input of any length.
pub fn peek_kind(bytes: &[u8]) -> Result<Kind, CodecError> {
    if bytes.len() < HEADER_LEN {
        if bytes.len() >= 4 && bytes[..4] != MAGIC {
            return Err(CodecError::BadMagic);
        }
        return Err(CodecError::Truncated { len: bytes.len() });
    }
    if bytes[..4] != MAGIC {
        return Err(CodecError::BadMagic);
    }
    if bytes[4] != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion { found: bytes[4] });
    }
    Kind::from_byte(bytes[5]).ok_or(CodecError::UnknownKind { found: bytes[5] })
}

/// Decodes a message that must be of `kind`: checks the size limit first, then the
/// header, then decodes the body and refuses trailing bytes.
pub fn decode<T: DeserializeOwned>(kind: Kind, bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > kind.max_len() {
        return Err(CodecError::Oversized {
            kind,
            len: bytes.len(),
            limit: kind.max_len(),
        });
    }
    let found = peek_kind(bytes)?;
    if found != kind {
        return Err(CodecError::WrongKind {
            expected: kind,
            found,
        });
    }
    let body = &bytes[HEADER_LEN..];
    let mut decoded = bincode::serde::decode_from_slice(body, config());
    let mut pad = 0;
    // An older build's body: without the last appended fields, which read as `None`.
    while matches!(
        decoded,
        Err(bincode::error::DecodeError::UnexpectedEnd { .. })
    ) && pad < kind.appended_options()
    {
        pad += 1;
        let padded = [body, &vec![0; pad]].concat();
        decoded = bincode::serde::decode_from_slice(&padded, config());
    }
    let (value, used): (T, usize) = decoded.map_err(|e| malformed(kind, e))?;
    // The pad is not the sender's: count only what it sent.
    let used = used.saturating_sub(pad);
    if used != body.len() {
        return Err(CodecError::TrailingBytes {
            kind,
            extra: body.len() - used,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_byte() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_byte(k as u8), Some(k), "{k}");
        }
        let known = (0..=255u8)
            .filter(|b| Kind::from_byte(*b).is_some())
            .count();
        assert_eq!(known, Kind::ALL.len());
    }

    #[test]
    fn header_errors_are_typed() {
        assert_eq!(peek_kind(b"UF"), Err(CodecError::Truncated { len: 2 }));
        assert_eq!(peek_kind(b"NOPE\x01\x01"), Err(CodecError::BadMagic));
        assert_eq!(
            peek_kind(b"UFLT\x02\x01"),
            Err(CodecError::UnsupportedVersion { found: 2 })
        );
        assert_eq!(
            peek_kind(b"UFLT\x01\x63"),
            Err(CodecError::UnknownKind { found: 0x63 })
        );
    }

    #[test]
    fn decode_checks_limit_before_header() {
        let big = vec![0u8; Kind::Announcement.max_len() + 1];
        assert!(matches!(
            decode::<u8>(Kind::Announcement, &big),
            Err(CodecError::Oversized { .. })
        ));
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // A Vec<u8> claiming u64::MAX elements: the decoder must refuse, not allocate.
        let mut bytes = vec![];
        bytes.extend_from_slice(&MAGIC);
        bytes.push(FORMAT_VERSION);
        bytes.push(Kind::Root as u8);
        bytes.push(0xFF); // varint: u64 follows
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Vec<u8>>(Kind::Root, &bytes),
            Err(CodecError::Malformed { .. })
        ));
    }

    #[test]
    fn trailing_bytes_refused() {
        let mut bytes = encode(Kind::Root, &7u32).unwrap();
        bytes.push(0);
        assert_eq!(
            decode::<u32>(Kind::Root, &bytes),
            Err(CodecError::TrailingBytes {
                kind: Kind::Root,
                extra: 1
            })
        );
    }
}
