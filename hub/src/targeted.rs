//! The blobs the hub serves only to the devices a release targets
//! ([`proto::targeted::Targeted`]), from the newest release of every track.

use crate::rollout::{stored_manifest, RolloutError};
use crate::store::{Newest, Store};
use proto::root::TrustedRoot;
use proto::targeted::Targeted;

/// From the newest release of every track.
pub fn read(
    store: &Store,
    root: &TrustedRoot,
    newest: &[Newest],
) -> Result<Targeted, RolloutError> {
    let mut manifests = vec![];
    for (track, release) in newest {
        let infos = store.release(&track.app, &track.channel, *release)?;
        for info in infos.iter().filter(|i| i.track == *track) {
            manifests.push(stored_manifest(store, root, info)?);
        }
    }
    Ok(Targeted::of(&manifests))
}
