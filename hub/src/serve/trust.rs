//! What the hub signs and checks with, reloaded when `hub root publish`, `hub revoke` or a
//! halt change it; and whom the blob service trades with, which follows from it.

use crate::home::{now, Home, HomeError};
use crate::store_owner::{Devices, OwnerError, StoreReader, TrustRecords};
use crate::trust::{expiry_warnings, Freshness};
use proto::keys::PublicKey;
use proto::revocation::Revocations;
use proto::root::TrustedRoot;
use proto::targeted::Targeted;
use proto::SecretKey;
use std::sync::Arc;

/// Why the hub's trust could not be (re)loaded.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The root or a key in the hub directory.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// The revocation or hold list in the store.
    #[error("reading the signed lists")]
    Store(#[from] OwnerError),
    #[error("reading the hub's keys")]
    Join(#[from] tokio::task::JoinError),
}

/// The root, the timestamp key and how long announcements stay fresh, the revocation
/// list, the hold list and the rollout key.
pub(super) struct Trust {
    pub root: TrustedRoot,
    pub timestamp: SecretKey,
    pub freshness: Freshness,
    pub revocations: Option<(Revocations, Vec<u8>)>,
    /// The releases held now, and the key that holds more (`None`: this hub cannot).
    pub holds: Option<(proto::rollout::Holds, Vec<u8>)>,
    pub rollout: Option<SecretKey>,
}

impl Trust {
    /// The keys from the hub directory (on a blocking thread), the lists from the store's
    /// reader; warns of a root about to expire. An expired root is loaded too: the hub
    /// serves on with it (see [`Trust::expired`]). (A read abandoned at shutdown changes
    /// nothing: untracked on purpose.)
    #[allow(clippy::disallowed_methods)]
    pub async fn load(home: &Home, reader: &StoreReader) -> Result<Trust, TrustError> {
        let h = home.clone();
        let (root, timestamp, rollout) = tokio::task::spawn_blocking(move || {
            Ok::<_, HomeError>((h.anchor_root()?, h.timestamp_key()?, h.rollout_key()?))
        })
        .await??;
        let TrustRecords { revocations, holds } = reader.trust_records(root.clone()).await?;
        let freshness = Freshness {
            lifetime: home.config.freshness_secs,
        };
        for w in expiry_warnings(root.root(), freshness, now()) {
            tracing::warn!("{w}");
        }
        Ok(Trust {
            root,
            timestamp,
            freshness,
            revocations,
            holds,
            rollout,
        })
    }

    /// Whether the root has expired by `now`. The hub then still serves blobs, takes
    /// reports, relays and shows the dashboard, but signs and announces nothing: devices
    /// would refuse it until `hub root publish` gives the hub the next root.
    pub fn expired(&self, now: u64) -> bool {
        self.root.root().expires_at <= now
    }

    pub fn is_revoked(&self, key: &PublicKey) -> bool {
        self.revocations
            .as_ref()
            .is_some_and(|(l, _)| l.is_revoked(key))
    }

    /// The signed records besides announcements that the hub spreads: the newest root,
    /// the revocation and hold lists, with their retained MQTT topic names.
    pub fn records(&self, fleet: &str) -> Vec<(String, Vec<u8>)> {
        let [root_topic, revocations_topic, holds_topic] = net::mqtt_topics::trust(fleet);
        let mut out = vec![(root_topic, self.root.bytes().to_vec())];
        if let Some((_, bytes)) = &self.revocations {
            out.push((revocations_topic, bytes.clone()));
        }
        if let Some((_, bytes)) = &self.holds {
            out.push((holds_topic, bytes.clone()));
        }
        out
    }

    /// The versions of the root, revocation list and hold list (spread again on change).
    pub fn versions(&self) -> (u64, u64, u64) {
        (
            self.root.root().version,
            self.revocations.as_ref().map_or(0, |(l, _)| l.version),
            self.holds.as_ref().map_or(0, |(l, _)| l.version),
        )
    }

    /// The enrolled devices, not revoked: the names and keys the embedded broker admits.
    pub fn enrolled(&self, devices: &Devices) -> crate::broker::Enrolled {
        Arc::new(
            devices
                .values()
                .filter(|(_, k)| !self.is_revoked(k))
                .map(|(name, k)| (name.clone(), k.0))
                .collect(),
        )
    }

    /// Whom the hub's blob service trades with: never a revoked key, and only enrolled
    /// devices unless `serve_unenrolled` (hub.toml); `targeted` chunks only to the devices
    /// their release targets.
    pub fn trade(
        &self,
        home: &Home,
        devices: &Devices,
        targeted: Option<Arc<Targeted>>,
    ) -> crate::blobs::Trade {
        let peer_of = |k: &PublicKey| net::peer_id_of(k);
        let list = self.revocations.as_ref().map(|(l, _)| l);
        crate::blobs::Trade {
            targeted,
            names: devices
                .values()
                .filter_map(|(name, k)| Some((peer_of(k)?, (name.clone(), *k))))
                .collect(),
            tags: list
                .into_iter()
                .flat_map(|l| l.members.iter().flatten())
                .filter_map(|m| Some((peer_of(&m.key)?, m.tags.clone())))
                .collect(),
            refused: list
                .into_iter()
                .flat_map(|l| l.devices.iter().filter_map(|d| peer_of(&d.key)))
                .collect(),
            only: (!home.config.serve_unenrolled).then(|| {
                devices
                    .values()
                    .filter(|(_, k)| !self.is_revoked(k))
                    .filter_map(|(_, k)| peer_of(k))
                    .collect()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply to `reload-trust` says why it failed down to the cause, never twice.
    #[test]
    fn a_trust_error_names_each_cause_once() {
        let cause = proto::VerifyError::MissingSignature {
            kind: proto::codec::Kind::Revocations,
        };
        let list = crate::store::ListError::Unverified {
            what: "revocation list",
            source: Box::new(cause),
        };
        let e = TrustError::Store(OwnerError::List(list));
        assert_eq!(
            proto::Chain(&e).to_string(),
            "reading the signed lists: the stored revocation list does not verify against \
             the hub's root: revocation list has no signatures"
        );
    }
}
