use crate::codec::{CodecError, Kind};
use crate::digest::Digest;
use crate::keys::KeyId;

/// Why a signed message, a root update, or the bytes a manifest describes were refused.
/// One variant per check, so callers (and tests) can tell every attack apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Framing, size limit or body decoding failed (includes oversized messages).
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("bad signature on {kind} from key {key_id}")]
    BadSignature { kind: Kind, key_id: KeyId },
    #[error("{kind} is signed by unknown key {key_id}")]
    UnknownKey { kind: Kind, key_id: KeyId },
    #[error("{kind} has no signatures")]
    MissingSignature { kind: Kind },
    #[error("{kind} has {have} valid {role} signature(s), threshold is {need}")]
    BelowThreshold {
        kind: Kind,
        role: &'static str,
        have: usize,
        need: usize,
    },
    #[error("{kind} has {count} signatures, more than the limit of {limit}")]
    TooManySignatures {
        kind: Kind,
        count: usize,
        limit: usize,
    },
    #[error("{kind} expired at {expires_at} (now {now}): refusing stale metadata")]
    Expired {
        kind: Kind,
        expires_at: u64,
        now: u64,
    },
    #[error("release {offered} of {app}/{channel} is not above installed release {installed} (rollback or replay)")]
    Rollback {
        app: String,
        channel: String,
        offered: u64,
        installed: u64,
    },
    #[error("{kind} is for channel {found:?}, this device follows {expected:?}")]
    WrongChannel {
        kind: Kind,
        expected: String,
        found: String,
    },
    #[error("{kind} is for platform {found}, this device runs {expected}")]
    WrongPlatform {
        kind: Kind,
        expected: String,
        found: String,
    },
    #[error("{kind} is for app {found:?}, expected {expected:?}")]
    WrongApp {
        kind: Kind,
        expected: String,
        found: String,
    },
    #[error("{kind} is for fleet {found:?}, this device belongs to {expected:?}")]
    WrongFleet {
        kind: Kind,
        expected: String,
        found: String,
    },
    #[error("chunk {index} digest mismatch: expected {expected}, got {actual}")]
    ChunkDigestMismatch {
        index: usize,
        expected: Digest,
        actual: Digest,
    },
    #[error("image digest mismatch: expected {expected}, got {actual}")]
    ImageDigestMismatch { expected: Digest, actual: Digest },
    #[error("more bytes than declared: {what} declares {declared} bytes, got at least {received}")]
    TooManyBytes {
        what: String,
        declared: u64,
        received: u64,
    },
    #[error("fewer bytes than declared: {what} declares {declared} bytes, got {received}")]
    TooFewBytes {
        what: String,
        declared: u64,
        received: u64,
    },
    #[error("root version {offered} does not follow trusted version {trusted} (gap)")]
    RootVersionGap { trusted: u64, offered: u64 },
    #[error("root version {offered} is not newer than trusted version {trusted} (downgrade)")]
    RootDowngrade { trusted: u64, offered: u64 },
    #[error("{kind} version {offered} is not above the known version {known} (replay)")]
    Stale {
        kind: Kind,
        offered: u64,
        known: u64,
    },
    #[error("invalid {kind}: {reason}")]
    Invalid { kind: Kind, reason: String },
}
