//! The chunks the hub serves only to the devices a release targets
//! ([`proto::targeted::Targeted`]), from every release it keeps: a targeted release's
//! chunks stay its devices' once a newer release follows it, and an untargeted release's
//! stay open.

use crate::rollout::{stored_manifest, RolloutError};
use crate::store::Store;
use proto::root::TrustedRoot;
use proto::targeted::Targeted;

/// From every stored release. A manifest that does not open (a store damaged or edited
/// by hand) is left out, and said in the log: its chunks are then restricted only if
/// another targeted release has them.
pub fn read(store: &Store, root: &TrustedRoot) -> Result<Targeted, RolloutError> {
    let mut manifests = vec![];
    for info in store.releases()? {
        match stored_manifest(store, root, &info) {
            Ok(m) => manifests.push(m),
            Err(e) => tracing::warn!(
                app = %info.track.app,
                release = info.release,
                "leaving a release out of what is targeted: {}",
                proto::Chain(&e)
            ),
        }
    }
    Ok(Targeted::of(&manifests))
}
