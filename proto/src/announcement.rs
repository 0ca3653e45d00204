//! Announcements: small signed pointers to a release, relayed by anyone.
//!
//! An announcement is the *freshness* record of a release (TUF's timestamp role): signed
//! by the hub's online timestamp key, short-lived, and re-signed by a running hub before
//! it lapses. The manifest it points at carries the release keys' long-lived content
//! signature. A hub that is down lets announcements lapse: devices keep what they run,
//! and refuse only new stale pointers until it is back.
//!
//! Two questions, two functions: [`verify_announcement`] answers *is it authentic and
//! fresh?* (signature, threshold, fleet, expiry), which decides whether a node relays it;
//! [`Expectations::applies`] answers *is it for me?* (app, channel, platform, release
//! above installed), which decides whether it installs it.

use crate::codec::{CodecError, Kind};
use crate::digest::Digest;
use crate::envelope::Envelope;
use crate::error::{Invalid, VerifyError};
use crate::manifest::{Claims, Expectations, Platform, VerifiedManifest};
use crate::names;
use crate::root::{check_expiry, TrustedRoot};
use serde::{Deserialize, Serialize};

/// One app on one channel for one platform: what a release number is newest *of*. A
/// release may carry images for several platforms (one signed manifest each, one release
/// number); each platform's devices follow its own track, so a release for ARM alone does
/// not hide the newest x86 one from x86 devices.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Track {
    pub app: String,
    pub channel: String,
    pub platform: Platform,
}

impl Track {
    pub fn new(app: &str, channel: &str, platform: Platform) -> Track {
        Track {
            app: app.into(),
            channel: channel.into(),
            platform,
        }
    }
}

impl std::fmt::Display for Track {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({})", self.app, self.channel, self.platform)
    }
}

/// "Release N of APP on CHANNEL is the manifest with this digest, as of `issued_at`."
/// Signed by the timestamp role; whoever relays it (broker, peer, hub) adds no trust.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub fleet: String,
    pub app: String,
    pub channel: String,
    pub platform: Platform,
    pub release: u64,
    pub version: semver::Version,
    pub manifest: Digest,
    /// When the hub signed it (Unix s): a time devices have securely seen (a clock floor).
    pub issued_at: u64,
    pub expires_at: u64,
}

impl Announcement {
    /// The announcement for a verified manifest, fresh from `issued_at` for `lifetime` s.
    pub fn for_manifest(m: &VerifiedManifest, issued_at: u64, lifetime: u64) -> Announcement {
        let man = m.manifest();
        Announcement {
            fleet: man.fleet.clone(),
            app: man.app.clone(),
            channel: man.channel.clone(),
            platform: man.platform,
            release: man.release,
            version: man.version.clone(),
            manifest: m.digest(),
            issued_at,
            expires_at: issued_at.saturating_add(lifetime),
        }
    }

    /// The track this announcement is the newest release of.
    pub fn track(&self) -> Track {
        Track::new(&self.app, &self.channel, self.platform)
    }

    /// The same pointer, re-issued: what a running hub signs before the old one lapses.
    pub fn refreshed(&self, issued_at: u64, lifetime: u64) -> Announcement {
        Announcement {
            issued_at,
            expires_at: issued_at.saturating_add(lifetime),
            ..self.clone()
        }
    }

    pub fn seal(&self) -> Result<Envelope, CodecError> {
        Envelope::seal(Kind::Announcement, self)
    }

    fn validate(&self) -> Result<(), VerifyError> {
        let invalid = |reason: Invalid| VerifyError::Invalid {
            kind: Kind::Announcement,
            reason,
        };
        names::check("fleet", &self.fleet).map_err(|e| invalid(e.into()))?;
        names::check("app", &self.app).map_err(|e| invalid(e.into()))?;
        names::check("channel", &self.channel).map_err(|e| invalid(e.into()))?;
        if self.release == 0 {
            return Err(invalid(Invalid::ReleaseZero));
        }
        if self.expires_at <= self.issued_at {
            return Err(invalid(Invalid::ExpiresBeforeIssued));
        }
        Ok(())
    }
}

/// *Is it authentic and fresh?* The one entry point that decides relaying: framing and
/// size, root freshness, every signer a timestamp key and a threshold of them, only then
/// decoding, structure, fleet, expiry. Says nothing about whether it is for this device.
pub fn verify_announcement(
    bytes: &[u8],
    root: &TrustedRoot,
    now: u64,
) -> Result<Announcement, VerifyError> {
    let env = Envelope::decode(bytes, Kind::Announcement)?;
    root.check_fresh(now)?;
    let ann: Announcement = env.open("timestamp", &root.root().timestamp)?;
    ann.validate()?;
    root.check_fleet(Kind::Announcement, &ann.fleet)?;
    check_expiry(Kind::Announcement, ann.expires_at, now)?;
    Ok(ann)
}

impl Expectations<'_> {
    /// *Is it for me?* Decides installing an announcement [`verify_announcement`] passed.
    pub fn applies(&self, ann: &Announcement) -> Result<(), VerifyError> {
        self.check(Claims {
            kind: Kind::Announcement,
            app: &ann.app,
            channel: &ann.channel,
            platform: ann.platform,
            release: ann.release,
        })
    }
}
