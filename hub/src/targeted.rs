//! Which blobs the hub serves only to the devices a release targets: the manifest and
//! chunks of each newest release that targets tags or devices, less those an untargeted
//! newest release also has (anyone may fetch those). A device's tags are the ones the
//! operator assigned (the revocation list's members), so one that declares a tag it was
//! not given fetches nothing of a release meant for that tag.

use crate::rollout::{stored_manifest, RolloutError};
use crate::store::{Newest, Store};
use proto::revocation::Revocations;
use proto::rollout::{Me, Rollout};
use proto::root::TrustedRoot;
use proto::Digest;
use std::collections::{HashMap, HashSet};

/// The targeted releases' rollouts and, for each of their blobs, which rollouts have it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Targeted {
    rollouts: Vec<Rollout>,
    blobs: HashMap<Digest, Vec<usize>>,
}

impl Targeted {
    /// From the newest release of every track.
    pub fn read(
        store: &Store,
        root: &TrustedRoot,
        newest: &[Newest],
    ) -> Result<Targeted, RolloutError> {
        let mut open = HashSet::new();
        let mut targeted = Targeted::default();
        for (track, release) in newest {
            let infos = store.release(&track.app, &track.channel, *release)?;
            for info in infos.iter().filter(|i| i.track == *track) {
                let m = stored_manifest(store, root, info)?;
                let digests = m.chunks.iter().map(|c| c.digest).chain([info.manifest]);
                if m.rollout.tags.is_empty() && m.rollout.devices.is_empty() {
                    open.extend(digests);
                    continue;
                }
                let at = targeted.rollouts.len();
                targeted.rollouts.push(m.rollout);
                for d in digests {
                    targeted.blobs.entry(d).or_default().push(at);
                }
            }
        }
        targeted.blobs.retain(|d, _| !open.contains(d));
        Ok(targeted)
    }

    /// Whether the device `who` (enrolled name and key; `None`: not enrolled) may fetch
    /// `digest`: anyone may unless it is only a targeted release's, then only a device
    /// that release targets by name or by an assigned tag.
    pub fn allows(
        &self,
        digest: &Digest,
        who: Option<(&str, &proto::PublicKey)>,
        members: &Revocations,
    ) -> bool {
        let Some(at) = self.blobs.get(digest) else {
            return true;
        };
        let Some((name, key)) = who else {
            return false;
        };
        let me = Me {
            name,
            tags: members.tags_of(key),
            seed: 0,
        };
        at.iter().any(|&i| self.rollouts[i].targets(&me))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::revocation::Member;

    fn targeted(rollout: Rollout, blobs: &[u8]) -> Targeted {
        Targeted {
            rollouts: vec![rollout],
            blobs: blobs.iter().map(|b| (Digest([*b; 32]), vec![0])).collect(),
        }
    }

    #[test]
    fn a_targeted_blob_goes_only_to_a_device_targeted_by_name_or_assigned_tag() {
        let key = |s: u8| proto::SecretKey::from_seed([s; 32]).public();
        let members = Revocations {
            members: Some(vec![Member {
                name: "beta-1".into(),
                key: key(1),
                tags: vec!["beta".into()],
            }]),
            ..Default::default()
        };
        let t = targeted(
            Rollout {
                tags: vec!["beta".into()],
                devices: vec!["named".into()],
                ..Default::default()
            },
            &[7],
        );
        let blob = Digest([7; 32]);
        assert!(t.allows(&blob, Some(("beta-1", &key(1))), &members));
        assert!(t.allows(&blob, Some(("named", &key(2))), &members));
        // Declaring `beta` is not being assigned it.
        assert!(!t.allows(&blob, Some(("liar", &key(3))), &members));
        assert!(!t.allows(&blob, None, &members));
        assert!(t.allows(&Digest([8; 32]), None, &members), "not targeted");
    }
}
