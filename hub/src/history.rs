//! The release history as people read it: `hub releases` (a table per release),
//! `hub release show` (one release's provenance) and `hub rebuild` (which release to
//! rebuild), from the store's signed manifests.

use crate::home::{Home, HomeError};
use crate::publish::provenance_path;
use crate::rollout::{stored_manifest, RolloutError};
use crate::store::{ReleaseInfo, Store, StoreError};
use proto::manifest::{Manifest, Platform, Provenance, Staging};
use proto::Digest;
use serde::Serialize;

/// Why the history could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] RolloutError),
    #[error("no release of {app} has version {version} (list them: hub releases {app})")]
    NoVersion { app: String, version: String },
    #[error(
        "{app} {version} is on several channels ({}): say which with --channel",
        channels.join(", ")
    )]
    SeveralChannels {
        app: String,
        version: String,
        channels: Vec<String>,
    },
    #[error(
        "the store has no {what} {digest} that release {release} of {app} names (the store \
         was rewritten, or the file was removed by hand)"
    )]
    MissingFile {
        what: &'static str,
        digest: Digest,
        app: String,
        release: u64,
    },
}

type Result<T, E = HistoryError> = std::result::Result<T, E>;

/// One platform's manifest of a release (`hub releases --json` lists these).
#[derive(Debug, Clone, Serialize)]
pub struct PlatformRelease {
    #[serde(flatten)]
    pub info: ReleaseInfo,
    pub version: String,
    pub created_at: u64,
    pub image_digest: Digest,
    pub image_size: u64,
    /// `passed` or `skipped`; `candidate` on the staging channel.
    pub staging: &'static str,
    /// The pushed commit it was built from, if the hub built it.
    pub commit: Option<String>,
    #[serde(skip)]
    pub provenance: Option<Provenance>,
}

impl PlatformRelease {
    fn new(info: ReleaseInfo, m: &Manifest) -> PlatformRelease {
        PlatformRelease {
            info,
            version: m.version.to_string(),
            created_at: m.created_at,
            image_digest: m.image_digest,
            image_size: m.image_size,
            staging: match m.staging {
                _ if m.channel == crate::publish::STAGING_CHANNEL => "candidate",
                Staging::Passed { .. } => "passed",
                Staging::Skipped => "skipped",
            },
            commit: m.provenance.as_ref().map(|p| p.commit.clone()),
            provenance: m.provenance.clone(),
        }
    }

    pub fn platform(&self) -> Platform {
        self.info.track.platform
    }
}

/// Every platform's manifest of every release (of `app` only, if given), ordered by app,
/// channel, release and platform; each manifest verified against the hub's trust.
pub fn releases(home: &Home, store: &Store, app: Option<&str>) -> Result<Vec<PlatformRelease>> {
    // The root read once, not once per manifest.
    let root = home.anchor_root()?;
    let mut out = vec![];
    for info in store.releases()? {
        if app.is_some_and(|a| a != info.track.app) {
            continue;
        }
        let m = stored_manifest(store, &root, &info)?;
        out.push(PlatformRelease::new(info, &m));
    }
    Ok(out)
}

/// The manifests of one release number, in platform order: consecutive entries of
/// [`releases`] that share app, channel and release.
pub fn grouped(all: &[PlatformRelease]) -> Vec<&[PlatformRelease]> {
    fn key(r: &PlatformRelease) -> (&str, &str, u64) {
        (&r.info.track.app, &r.info.track.channel, r.info.release)
    }
    all.chunk_by(|a, b| key(a) == key(b)).collect()
}

/// The release of `app` at `version` on `channel`; without a channel, the one outside
/// the staging channel (a version on several channels must be told which).
pub fn find(
    home: &Home,
    store: &Store,
    app: &str,
    version: &str,
    channel: Option<&str>,
) -> Result<Vec<PlatformRelease>> {
    let all = releases(home, store, Some(app))?;
    let on = |c: &str| match channel {
        Some(wanted) => c == wanted,
        None => c != crate::publish::STAGING_CHANNEL,
    };
    let mut found: Vec<&[PlatformRelease]> = grouped(&all)
        .into_iter()
        .filter(|r| r[0].version == version && on(&r[0].info.track.channel))
        .collect();
    let channels = |found: &[&[PlatformRelease]]| {
        found
            .iter()
            .map(|r| r[0].info.track.channel.clone())
            .collect::<Vec<_>>()
    };
    match found.len() {
        0 => Err(HistoryError::NoVersion {
            app: app.into(),
            version: version.into(),
        }),
        1 => Ok(found.remove(0).to_vec()),
        _ => Err(HistoryError::SeveralChannels {
            app: app.into(),
            version: version.into(),
            channels: channels(&found),
        }),
    }
}

/// The build log or SBOM `digest` names, as the store keeps it for `release`.
pub fn provenance_file(
    store: &Store,
    release: &PlatformRelease,
    what: &'static str,
    digest: Digest,
) -> Result<Vec<u8>> {
    let bytes = store.read(&provenance_path(&digest))?;
    bytes
        .filter(|b| Digest::of(b) == digest)
        .ok_or_else(|| HistoryError::MissingFile {
            what,
            digest,
            app: release.info.track.app.clone(),
            release: release.info.release,
        })
}
