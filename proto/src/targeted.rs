//! Which chunks only the devices a release targets may fetch: those of releases that
//! target tags or devices, less those an untargeted release also has (anyone may fetch
//! those). Manifests stay open: a device reads a release's manifest to learn it is not
//! meant for it. The hub decides from its newest releases, a device serving its peers
//! from the releases it holds; both by the tags the operator assigned
//! ([`crate::revocation::Revocations::tags_of`]), so a device that declares a tag it was
//! not given fetches nothing of a release meant for that tag.

use crate::digest::Digest;
use crate::manifest::Manifest;
use crate::rollout::{Me, Rollout};
use std::collections::{HashMap, HashSet};

/// The targeted releases' rollouts and, for each of their chunks, which rollouts have it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Targeted {
    rollouts: Vec<Rollout>,
    blobs: HashMap<Digest, Vec<usize>>,
}

impl Targeted {
    /// From the releases' manifests (the hub's, or those a device holds). A staging
    /// candidate (signed for [`crate::manifest::STAGING_CHANNEL`] with no targets,
    /// whatever its release's) opens nothing and restricts nothing: it would open every
    /// chunk of a targeted release, and its staging device, or the devices it serves
    /// afterwards, must be able to fetch it.
    pub fn of<'a>(manifests: impl IntoIterator<Item = &'a Manifest>) -> Targeted {
        let mut open = HashSet::new();
        let mut targeted = Targeted::default();
        for m in manifests {
            if m.channel == crate::manifest::STAGING_CHANNEL {
                continue;
            }
            let digests = m.chunks.iter().map(|c| c.digest);
            if m.rollout.tags.is_empty() && m.rollout.devices.is_empty() {
                open.extend(digests);
                continue;
            }
            let at = targeted.rollouts.len();
            targeted.rollouts.push(m.rollout.clone());
            for d in digests {
                targeted.blobs.entry(d).or_default().push(at);
            }
        }
        targeted.blobs.retain(|d, _| !open.contains(d));
        targeted
    }

    /// Whether `digest` is a chunk only some devices may fetch.
    pub fn restricts(&self, digest: &Digest) -> bool {
        self.blobs.contains_key(digest)
    }

    /// Whether a device assigned `tags` may fetch `digest`: anyone may unless it is only
    /// a targeted release's, then only a device that release targets by an assigned tag
    /// or by `name` — the enrolled name, as the hub knows it. A peer cannot tell another's
    /// name (`None`): it lets a release that targets names go to any device (the hub
    /// still checks).
    pub fn allows(&self, digest: &Digest, name: Option<&str>, tags: &[String]) -> bool {
        let Some(at) = self.blobs.get(digest) else {
            return true;
        };
        let me = Me {
            name: name.unwrap_or_default(),
            tags,
            seed: 0,
        };
        at.iter().any(|&i| {
            let r = &self.rollouts[i];
            r.targets(&me) || (name.is_none() && !r.devices.is_empty())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_targeted_chunk_goes_only_to_a_device_targeted_by_name_or_assigned_tag() {
        let t = Targeted {
            rollouts: vec![Rollout {
                tags: vec!["beta".into()],
                devices: vec!["named".into()],
                ..Default::default()
            }],
            blobs: [(Digest([7; 32]), vec![0])].into(),
        };
        let chunk = Digest([7; 32]);
        let beta = ["beta".to_string()];
        assert!(t.allows(&chunk, Some("beta-1"), &beta));
        assert!(t.allows(&chunk, Some("named"), &[]));
        // Declaring `beta` is not being assigned it.
        assert!(!t.allows(&chunk, Some("liar"), &[]));
        assert!(
            t.allows(&Digest([8; 32]), Some("liar"), &[]),
            "not targeted"
        );
        // A peer cannot tell names: a release naming devices goes to any.
        assert!(t.allows(&chunk, None, &[]));
        let tags_only = Targeted {
            rollouts: vec![Rollout {
                tags: vec!["beta".into()],
                ..Default::default()
            }],
            ..t
        };
        assert!(!tags_only.allows(&chunk, None, &[]));
        assert!(tags_only.allows(&chunk, None, &beta));
    }
}
