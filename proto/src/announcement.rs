//! Announcements: small signed pointers to a release, relayed by anyone.

use crate::codec::{CodecError, Kind};
use crate::digest::Digest;
use crate::envelope::Envelope;
use crate::error::VerifyError;
use crate::manifest::{Claims, Expectations, Platform, VerifiedManifest};
use crate::names;
use crate::root::TrustedRoot;
use serde::{Deserialize, Serialize};

/// "Release N of APP on CHANNEL is the manifest with this digest." Signed by release keys;
/// whoever relays it (broker, peer, hub) adds no trust.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub fleet: String,
    pub app: String,
    pub channel: String,
    pub platform: Platform,
    pub release: u64,
    pub version: semver::Version,
    pub manifest: Digest,
    pub expires_at: u64,
}

impl Announcement {
    /// The announcement for a verified manifest, expiring with it.
    pub fn for_manifest(m: &VerifiedManifest) -> Announcement {
        let man = m.manifest();
        Announcement {
            fleet: man.fleet.clone(),
            app: man.app.clone(),
            channel: man.channel.clone(),
            platform: man.platform,
            release: man.release,
            version: man.version.clone(),
            manifest: m.digest(),
            expires_at: man.expires_at,
        }
    }

    pub fn seal(&self) -> Result<Envelope, CodecError> {
        Envelope::seal(Kind::Announcement, self)
    }

    fn validate(&self) -> Result<(), VerifyError> {
        let invalid = |reason: String| VerifyError::Invalid {
            kind: Kind::Announcement,
            reason,
        };
        names::check("fleet", &self.fleet).map_err(|e| invalid(e.to_string()))?;
        names::check("app", &self.app).map_err(|e| invalid(e.to_string()))?;
        names::check("channel", &self.channel).map_err(|e| invalid(e.to_string()))?;
        Ok(())
    }
}

/// The one entry point for announcements; same checks and order as
/// [`crate::manifest::verify_manifest`].
pub fn verify_announcement(
    bytes: &[u8],
    root: &TrustedRoot,
    expect: &Expectations<'_>,
) -> Result<Announcement, VerifyError> {
    let env = Envelope::decode(bytes, Kind::Announcement)?;
    root.check_fresh(expect.now)?;
    let ann: Announcement = env.open("release", &root.root().release)?;
    ann.validate()?;
    expect.check(
        root,
        Claims {
            kind: Kind::Announcement,
            fleet: &ann.fleet,
            app: &ann.app,
            channel: &ann.channel,
            platform: ann.platform,
            release: ann.release,
            expires_at: ann.expires_at,
        },
    )?;
    Ok(ann)
}
