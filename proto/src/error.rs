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
    #[error(
        "{kind} expired on {} UTC, {}: refusing stale metadata",
        crate::status::local_time(*expires_at, 0).trim_end_matches(" +00:00"),
        crate::status::human_ago(*expires_at, *now)
    )]
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
        what: Declared,
        declared: u64,
        received: u64,
    },
    #[error("fewer bytes than declared: {what} declares {declared} bytes, got {received}")]
    TooFewBytes {
        what: Declared,
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
    Invalid { kind: Kind, reason: Invalid },
}

/// What makes a message malformed before any context is needed: names, counts, sizes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error(transparent)]
    Name(#[from] crate::names::BadName),
    #[error("release numbers start at 1")]
    ReleaseZero,
    #[error("version must start at 1")]
    VersionZero,
    #[error("expires before it was issued")]
    ExpiresBeforeIssued,
    #[error("image size {size} is outside 1..={max}")]
    ImageSize { size: u64, max: u64 },
    #[error("{count} chunks listed (1 to {max} allowed)")]
    ChunkCount { count: usize, max: usize },
    #[error("chunk {index} has size {size}")]
    ChunkSize { index: usize, size: u64 },
    #[error("chunk sizes add up to {total}, image size is {size}")]
    ChunkTotal { total: u64, size: u64 },
    #[error("kernel command line too long")]
    CmdlineTooLong,
    #[error("console banner empty or too long")]
    BadBanner,
    #[error("HTTP probe needs a port and an absolute, printable path of at most 256 bytes")]
    BadProbePath,
    #[error("an HTTP probe needs a network interface (the boot spec's network)")]
    ProbeNeedsNetwork,
    #[error("tcp:0 probes the console's port, which a release with a network interface is not reached on: name the guest's port")]
    ConsolePortWithNetwork,
    #[error("boot spec needs memory and at least one vcpu")]
    NoMemoryOrVcpu,
    #[error(transparent)]
    Role(#[from] RoleError),
    #[error("{role} threshold is {threshold}; it must be 1 (the hub signs with it alone)")]
    OnlineThreshold { role: &'static str, threshold: u32 },
    #[error("key {key} is in both the {a} and the {b} role; each role needs keys of its own")]
    SharedKey {
        key: String,
        a: &'static str,
        b: &'static str,
    },
    #[error("{count} devices listed (at most {max})")]
    TooManyRevoked { count: usize, max: usize },
    #[error("{count} members listed (at most {max})")]
    TooManyMembers { count: usize, max: usize },
    #[error("a key listed as a member twice")]
    DuplicateMember,
    #[error("console tail too long")]
    ConsoleTailTooLong,
    #[error("the hosted host's reason is longer than {max} bytes")]
    HostedReasonTooLong { max: usize },
    #[error("rollout waves: {0}")]
    Waves(BadWaves),
    #[error("{count} tags and devices targeted (at most {max})")]
    TooManyTargets { count: usize, max: usize },
    #[error("halt policy needs at least 1 attempt and a failure share of 1 to 100%")]
    HaltPolicy,
    #[error("{count} releases held (at most {max})")]
    TooManyHolds { count: usize, max: usize },
    #[error("hold reason too long")]
    ReasonTooLong,
    #[error("{count} device tags (at most {max})")]
    TooManyTags { count: usize, max: usize },
    #[error("provenance names no git commit (40 or 64 hex digits)")]
    ProvenanceCommit,
    #[error("a provenance field is longer than {max} bytes")]
    ProvenanceTooLong { max: usize },
}

/// Why a role of a root is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("{role} role has {keys} keys (1 to {max} allowed)")]
    KeyCount {
        role: &'static str,
        keys: usize,
        max: usize,
    },
    #[error("{role} threshold {threshold} is not between 1 and its {keys} keys")]
    Threshold {
        role: &'static str,
        threshold: u32,
        keys: usize,
    },
    #[error("{role} role lists a key twice")]
    DuplicateKey { role: &'static str },
}

/// What declared a size its bytes did not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// The chunk at this index of a manifest.
    Chunk(usize),
    Image,
    Manifest,
}

impl std::fmt::Display for Declared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Declared::Chunk(index) => write!(f, "chunk {index}"),
            Declared::Image => f.write_str("image"),
            Declared::Manifest => f.write_str("manifest"),
        }
    }
}

/// Most waves in a rollout.
pub const MAX_WAVES: usize = 32;

/// Why an operator's wave list or a manifest's waves are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadWaves {
    #[error("{0} waves (at most {MAX_WAVES})")]
    TooMany(usize),
    #[error("a wave's share must be above 0% and at most 100% (got {0} basis points)")]
    Share(u16),
    #[error("waves must grow in both share and time")]
    OutOfOrder,
    #[error("{0:?} is not a wave: write SHARE%@DELAY, e.g. 10%@1h (delays: 0, 30s, 15m, 4h, 1d)")]
    Spelling(String),
}

/// An error with its causes, `outer: cause: cause`, as `anyhow` prints `{:#}`: for a
/// library that logs a typed error (its own `Display` names only the outermost step). A
/// cause whose text the message before it already ends with (an error that also prints
/// its source) is not said twice.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut said = self.0.to_string();
        f.write_str(&said)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            let text = e.to_string();
            if !said.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            said = text;
            cause = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading {0}")]
    struct Outer(&'static str, #[source] std::io::Error);

    #[test]
    fn a_chain_names_each_cause_once_outermost_first() {
        let e = Outer("root.bin", std::io::Error::other("disk on fire"));
        assert_eq!(Chain(&e).to_string(), "reading root.bin: disk on fire");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("starting domain x: {source}")]
    struct SaysItsSource {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_the_message_already_says_is_not_repeated() {
        let e = SaysItsSource {
            source: std::io::Error::other("no such network"),
        };
        assert_eq!(Chain(&e).to_string(), "starting domain x: no such network");
    }

    /// Regression (issue 32): an expired record said "expired at 1891215182 (now …)".
    #[test]
    fn an_expiry_is_said_as_a_date_and_an_age_not_unix_seconds() {
        let e = VerifyError::Expired {
            kind: crate::codec::Kind::Root,
            expires_at: 1_891_215_182,
            now: 1_891_215_182 + 3 * 86_400,
        };
        let said = e.to_string();
        assert!(said.contains("expired on 2029-12-06 "), "{said}");
        assert!(said.contains("UTC, 3 days ago"), "{said}");
        assert!(!said.contains("1891215182"), "{said}");
    }
}
