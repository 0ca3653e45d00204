//! The trust root: which keys may sign what, and how the root itself is rotated.
//!
//! TUF-style and kept small. A root names three roles, each with a k-of-n threshold, plus
//! a version and an expiry: `root` (offline keys that sign the root itself), `release`
//! (keys that sign manifests: content, long-lived) and `timestamp` (the running hub's
//! online key, threshold 1, that signs time-bound records: the short-lived announcements
//! that say a release is current, and the revocation list). A timestamp key can sign no
//! release and no root, and no key may sit in two roles. A device starts from one root given to
//! it out of band ([`TrustedRoot::bootstrap`]) and moves forward only one version at a
//! time ([`TrustedRoot::update`]): root N+1 must be signed by a threshold of root N's root
//! keys *and* by a threshold of its own.

use crate::codec::{CodecError, Kind};
use crate::digest::Digest;
use crate::envelope::Envelope;
pub use crate::error::RoleError;
use crate::error::{Invalid, VerifyError};
use crate::names;
pub use crate::role::{Role, MAX_ROLE_KEYS};
use serde::{Deserialize, Serialize};

/// How long a new root lasts unless told otherwise (3 years), in days: `hub init`'s
/// quick-start root and `fwtool root init`/`rotate` alike, so a rotation does not
/// quietly shorten a fleet's trust to a third.
pub const DEFAULT_ROOT_DAYS: u64 = 3 * 365;

/// Root metadata, the payload of a [`Kind::Root`] message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    /// The fleet this root governs; devices refuse roots of other fleets.
    pub fleet: String,
    /// Starts at 1 and grows by exactly one per rotation.
    pub version: u64,
    /// Seconds since the Unix epoch after which nothing verifies against this root.
    pub expires_at: u64,
    pub root: Role,
    pub release: Role,
    /// The hub's online key: announcements (freshness) and the revocation list, nothing
    /// else. Threshold 1, so a running hub re-signs them by itself.
    pub timestamp: Role,
    /// The hub's online key for rollouts: it signs the list of held (paused or halted)
    /// releases and nothing else, so a hub can stop a failing release by itself but
    /// never publish one. Threshold 1.
    pub rollout: Role,
}

impl Root {
    /// Structural checks that need no signature: names, thresholds, version.
    pub fn validate(&self) -> Result<(), VerifyError> {
        let invalid = |reason: Invalid| VerifyError::Invalid {
            kind: Kind::Root,
            reason,
        };
        names::check("fleet", &self.fleet).map_err(|e| invalid(e.into()))?;
        if self.version == 0 {
            return Err(invalid(Invalid::VersionZero));
        }
        let roles = [
            ("root", &self.root),
            ("release", &self.release),
            ("timestamp", &self.timestamp),
            ("rollout", &self.rollout),
        ];
        for (name, role) in roles {
            role.validate(name).map_err(|e| invalid(e.into()))?;
        }
        for (name, role) in [("timestamp", &self.timestamp), ("rollout", &self.rollout)] {
            if role.threshold != 1 {
                return Err(invalid(Invalid::OnlineThreshold {
                    role: name,
                    threshold: role.threshold,
                }));
            }
        }
        for (i, (a, ra)) in roles.iter().enumerate() {
            for (b, rb) in &roles[i + 1..] {
                if let Some(k) = ra.keys.iter().find(|k| rb.keys.contains(k)) {
                    return Err(invalid(Invalid::SharedKey {
                        key: k.id().short(),
                        a,
                        b,
                    }));
                }
            }
        }
        Ok(())
    }

    /// An unsigned envelope holding this root, ready for root key holders to sign.
    pub fn seal(&self) -> Result<Envelope, CodecError> {
        Envelope::seal(Kind::Root, self)
    }
}

/// A root that has been verified and may be used to verify everything else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedRoot {
    root: Root,
    /// The signed envelope bytes it was verified from, for persisting and relaying.
    bytes: Vec<u8>,
}

impl TrustedRoot {
    /// Trust-on-first-use of a root delivered out of band (shipped with the device or
    /// copied by the operator): it must be valid, unexpired and signed by a threshold of
    /// its own root keys.
    pub fn bootstrap(bytes: &[u8], now: u64) -> Result<TrustedRoot, VerifyError> {
        let env = Envelope::decode(bytes, Kind::Root)?;
        let root: Root = env.open("root", &root_role_of_unverified(&env)?)?;
        root.validate()?;
        check_expiry(Kind::Root, root.expires_at, now)?;
        Ok(TrustedRoot {
            root,
            bytes: bytes.to_vec(),
        })
    }

    /// Moves to the next root. `next` must be version + 1, signed by a threshold of this
    /// root's root keys and a threshold of its own, by no other keys, and unexpired.
    pub fn update(&self, next: &[u8], now: u64) -> Result<TrustedRoot, VerifyError> {
        let updated = self.step(next)?;
        check_expiry(Kind::Root, updated.root.expires_at, now)?;
        Ok(updated)
    }

    /// Applies a chain of roots in order. Intermediate roots may have expired while the
    /// device was offline (as in TUF); the last one must not have.
    pub fn update_chain<'a>(
        &self,
        chain: impl IntoIterator<Item = &'a [u8]>,
        now: u64,
    ) -> Result<TrustedRoot, VerifyError> {
        let mut current = self.clone();
        for next in chain {
            current = current.step(next)?;
        }
        check_expiry(Kind::Root, current.root.expires_at, now)?;
        Ok(current)
    }

    fn step(&self, next: &[u8]) -> Result<TrustedRoot, VerifyError> {
        let env = Envelope::decode(next, Kind::Root)?;
        // Authenticate with the keys we already trust before decoding anything.
        env.require_threshold("root", &self.root.root)?;
        let root: Root = crate::codec::decode(Kind::Root, &env.payload)?;
        root.validate()?;
        if root.fleet != self.root.fleet {
            return Err(VerifyError::WrongFleet {
                kind: Kind::Root,
                expected: self.root.fleet.clone(),
                found: root.fleet,
            });
        }
        if root.version <= self.root.version {
            return Err(VerifyError::RootDowngrade {
                trusted: self.root.version,
                offered: root.version,
            });
        }
        if root.version != self.root.version + 1 {
            return Err(VerifyError::RootVersionGap {
                trusted: self.root.version,
                offered: root.version,
            });
        }
        env.require_threshold("root", &root.root)?;
        env.require_known_signers(&[&self.root.root, &root.root])?;
        Ok(TrustedRoot {
            root,
            bytes: next.to_vec(),
        })
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn digest(&self) -> Digest {
        Digest::of(&self.bytes)
    }

    pub fn fleet(&self) -> &str {
        &self.root.fleet
    }

    /// Refuses a message of another fleet.
    pub fn check_fleet(&self, kind: Kind, fleet: &str) -> Result<(), VerifyError> {
        if fleet != self.root.fleet {
            return Err(VerifyError::WrongFleet {
                kind,
                expected: self.root.fleet.clone(),
                found: fleet.into(),
            });
        }
        Ok(())
    }

    /// Opens a release-signed envelope this node stored itself, verified back then under
    /// the root of its day: tried with this root's release role, then with each earlier
    /// link's (`links(version)` gives the stored link's bytes, if kept), newest first. A
    /// release-key rotation must not orphan the history. What arrives from outside is
    /// verified against this root alone.
    pub fn open_stored<T: serde::de::DeserializeOwned>(
        &self,
        env: &Envelope,
        links: impl Fn(u64) -> Option<Vec<u8>>,
    ) -> Result<T, VerifyError> {
        let mut opened = env.open("release", &self.root.release);
        for v in (1..self.root.version).rev() {
            if opened.is_ok() {
                break;
            }
            let old = links(v).and_then(|b| {
                let e = Envelope::decode(&b, Kind::Root).ok()?;
                crate::codec::decode::<Root>(Kind::Root, &e.payload).ok()
            });
            if let Some(old) = old {
                opened = opened.or_else(|_| env.open("release", &old.release));
            }
        }
        opened
    }

    /// Fails when this root itself has expired: a frozen device must not keep accepting
    /// releases signed under keys that may since have been revoked.
    pub fn check_fresh(&self, now: u64) -> Result<(), VerifyError> {
        check_expiry(Kind::Root, self.root.expires_at, now)
    }
}

/// For bootstrap only: the root role claimed by a not-yet-verified root. Used solely to
/// check that the root is self-signed; nothing else is read before that check passes.
fn root_role_of_unverified(env: &Envelope) -> Result<Role, VerifyError> {
    let root: Root = crate::codec::decode(Kind::Root, &env.payload)?;
    root.validate()?;
    Ok(root.root)
}

pub(crate) fn check_expiry(kind: Kind, expires_at: u64, now: u64) -> Result<(), VerifyError> {
    if now >= expires_at {
        return Err(VerifyError::Expired {
            kind,
            expires_at,
            now,
        });
    }
    Ok(())
}
