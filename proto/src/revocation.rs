//! The revocation list: device keys the fleet no longer trades with — and, since tags
//! are the operator's to give, the **members** the operator assigned tags to, with their
//! tags (`hub enroll --tag`). A device targets releases by the tags this list gives its
//! key, never by the ones it declares itself, and the hub and peers serve a targeted
//! release's chunks only to the devices it targets (`crate::targeted`). Only devices with
//! tags are listed, by key alone, so the list stays small enough for the broker
//! ([`MAX_SPREAD_BYTES`]: a few hundred tagged devices; `hub enroll` refuses a tag past
//! that).
//!
//! Signed by the hub's timestamp key and spread like announcements (MQTT retained,
//! gossip, asked of each peer), so it holds with the hub down: a device refuses to serve
//! or fetch from a revoked peer, and the hub refuses its reports. It never expires (a
//! revocation must outlive a hub outage); a list replaces another only with a higher
//! version, so an old list cannot be replayed to un-revoke a device.

use crate::codec::{CodecError, Kind};
use crate::envelope::Envelope;
use crate::error::{Invalid, VerifyError};
use crate::keys::PublicKey;
use crate::names;
use crate::root::TrustedRoot;
use serde::{Deserialize, Serialize};

/// Most devices one list may name (it must fit [`Kind::Revocations`]'s size limit).
pub const MAX_REVOKED: usize = 1000;
/// Most members one list may name.
pub const MAX_MEMBERS: usize = 1000;
/// The largest signed list `hub enroll` writes when it assigns a tag: the broker and
/// gossip carry 16 KiB packets, less the topic, headers and framing around the list.
pub const MAX_SPREAD_BYTES: usize = 15 * 1024;

/// An enrolled device the operator assigned tags to, and its tags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub key: PublicKey,
    pub tags: Vec<String>,
}

/// One revoked device: its enrolled name (for people) and key (what is checked).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub name: String,
    pub key: PublicKey,
    /// When it was revoked (Unix s).
    pub at: u64,
}

/// The payload of a [`Kind::Revocations`] message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    pub fleet: String,
    /// Grows by one per change; devices keep the highest they verified.
    pub version: u64,
    pub issued_at: u64,
    pub devices: Vec<Revoked>,
    /// The enrolled devices with tags, and their tags; `None` until the operator first
    /// assigns one, and from hubs before tags were (appended: such a list is written, and
    /// read, as those hubs wrote it).
    pub members: Option<Vec<Member>>,
}

impl Revocations {
    pub fn seal(&self) -> Result<Envelope, CodecError> {
        let absent = usize::from(self.members.is_none());
        Envelope::new(crate::codec::encode_appended(
            Kind::Revocations,
            self,
            absent,
        )?)
    }

    pub fn is_revoked(&self, key: &PublicKey) -> bool {
        self.devices.iter().any(|d| d.key == *key)
    }

    /// The tags the operator assigned `key` (none: not a member, or no members listed).
    pub fn tags_of(&self, key: &PublicKey) -> &[String] {
        self.members
            .iter()
            .flatten()
            .find(|m| m.key == *key)
            .map_or(&[], |m| &m.tags)
    }

    fn validate(&self) -> Result<(), VerifyError> {
        let invalid = |reason: Invalid| VerifyError::Invalid {
            kind: Kind::Revocations,
            reason,
        };
        names::check("fleet", &self.fleet).map_err(|e| invalid(e.into()))?;
        if self.version == 0 {
            return Err(invalid(Invalid::VersionZero));
        }
        if self.devices.len() > MAX_REVOKED {
            return Err(invalid(Invalid::TooManyRevoked {
                count: self.devices.len(),
                max: MAX_REVOKED,
            }));
        }
        for d in &self.devices {
            names::check("device", &d.name).map_err(|e| invalid(e.into()))?;
        }
        let members = self.members.as_deref().unwrap_or_default();
        if members.len() > MAX_MEMBERS {
            return Err(invalid(Invalid::TooManyMembers {
                count: members.len(),
                max: MAX_MEMBERS,
            }));
        }
        let mut keys = std::collections::HashSet::new();
        for m in members {
            if !keys.insert(m.key) {
                return Err(invalid(Invalid::DuplicateMember));
            }
            crate::status::check_tags(&m.tags).map_err(invalid)?;
        }
        Ok(())
    }
}

/// The one entry point for revocation lists: authentic (timestamp role, fleet) and newer
/// than `known` (the version the caller holds), else refused.
pub fn verify_revocations(
    bytes: &[u8],
    root: &TrustedRoot,
    known: u64,
) -> Result<Revocations, VerifyError> {
    let env = Envelope::decode(bytes, Kind::Revocations)?;
    let list: Revocations = env.open("timestamp", &root.root().timestamp)?;
    list.validate()?;
    root.check_fleet(Kind::Revocations, &list.fleet)?;
    if list.version <= known {
        return Err(VerifyError::Stale {
            kind: Kind::Revocations,
            offered: list.version,
            known,
        });
    }
    Ok(list)
}
