//! Signing and storing: a release numbered, each platform's manifest signed (by the
//! hub alone only with a release threshold of 1), checked as a device would, and committed
//! with its announcement, evidence and event in one store transaction.

use super::*;
use crate::home::{KeyError, WriteError};
use std::path::PathBuf;

/// Why a release could not be numbered, signed and stored (or held for co-signing).
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "this hub cannot sign releases alone: the trust root's release role needs {threshold} \
         of its {keys} keys{}. Publish with --hold, have key holders run `fwtool sign DIR \
         --key KEY`, then `hub release approve DIR`",
        missing.as_ref().map_or(String::new(), |p| format!(
            " and the hub holds none of them ({} is missing)",
            p.display()
        ))
    )]
    CannotSign {
        threshold: u32,
        keys: usize,
        /// The hub's release key file, when it has none.
        missing: Option<PathBuf>,
    },
    #[error(
        "{} holds key {key}, which is not one of the trust root's release keys (an unknown \
         key: devices would refuse what it signs); put back the hub's release key, or \
         `hub root publish` a root that lists this one",
        path.display()
    )]
    UnknownKey { path: PathBuf, key: String },
    #[error("a release needs at least one image")]
    NoImage,
    #[error("signing the manifest of {0}")]
    Seal(String, #[source] proto::codec::CodecError),
    #[error(transparent)]
    Add(#[from] AddError),
    #[error("no release {release} of {of}")]
    NoRelease { release: u64, of: String },
    #[error("the stored manifest of release {release} of {track}")]
    Stored {
        track: Track,
        release: u64,
        #[source]
        source: Box<proto::VerifyError>,
    },
    #[error(
        "version {version} is not above {prev} (release {release}) on {on}; publish a higher \
         version (or `hub rollback` to go back)"
    )]
    NotNewer {
        version: String,
        prev: String,
        release: u64,
        /// `app/channel`.
        on: String,
    },
    /// Leaving a held release for co-signing.
    #[error(transparent)]
    Write(#[from] WriteError),
}

type Result<T, E = SignError> = std::result::Result<T, E>;

/// The signed manifest of a stored release, verified against the hub's own root.
pub fn stored_manifest(
    home: &Home,
    store: &Store,
    track: &Track,
    release: u64,
) -> Result<Manifest> {
    let Some(bytes) = store.read(&release_path(track, release, "manifest"))? else {
        return Err(SignError::NoRelease {
            release,
            of: track.to_string(),
        });
    };
    let root = home.anchor_root()?;
    // Signed under the root of its day: a release-key rotation must not orphan the history.
    let links = |v| crate::trust::root_link(store, v).ok().flatten();
    proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Manifest)
        .and_then(|env| root.open_stored(&env, links))
        .map_err(|e| SignError::Stored {
            track: track.clone(),
            release,
            source: Box::new(e),
        })
}

/// One platform's part of a release being signed: the unsigned manifest (a template:
/// number, channel, times and the previous link are filled in when it is numbered), how it
/// was staged, and the staging report to keep beside it (`<release>.staging`).
#[derive(Debug, Clone)]
pub struct Part {
    pub template: Manifest,
    pub staging: Staging,
    pub evidence: Option<Vec<u8>>,
}

impl Part {
    /// A part that skipped staging (or has not been staged yet).
    pub fn unstaged(template: &Manifest) -> Part {
        Part {
            template: template.clone(),
            staging: Staging::Skipped,
            evidence: None,
        }
    }
}

/// Where and why a release is being signed.
#[derive(Debug)]
pub struct NewRelease<'a> {
    pub channel: &'a str,
    /// New chunks to commit with it.
    pub change: Change,
    /// Refuse unless the version is above the channel's newest (publish, promote; not a
    /// rollback, whose point is an older image).
    pub require_newer: bool,
    /// Event kind (`publish`, `stage`, `promote`, `rollback`) and its detail line.
    pub event: &'a str,
    pub detail: String,
}

/// Signs `parts` (one per platform, one app and version) as the next release of their app
/// on `new.channel` and stores them in one commit with `new.change` (new chunks), their
/// evidence and an event; returns each platform's stored manifest.
///
/// Reading the newest release, numbering, signing and committing are one store
/// transaction: two publishes at once (a `git push` and a CLI publish) get two release
/// numbers, or the second is refused for its version, never one number twice.
pub fn sign_and_store(
    home: &Home,
    store: &Store,
    parts: &[Part],
    new: NewRelease<'_>,
) -> Result<Vec<ReleaseInfo>> {
    let root = home.trusted_root()?;
    let key = match release_key(home, &root)? {
        Some(k) if root.root().release.threshold == 1 => k,
        _ => {
            let path = home.dir.join("keys/release.key");
            return Err(SignError::CannotSign {
                threshold: root.root().release.threshold,
                keys: root.root().release.keys.len(),
                missing: (!path.exists()).then_some(path),
            });
        }
    };
    let timestamp = home.timestamp_key()?;
    let first = &parts.first().ok_or(SignError::NoImage)?.template;
    store.transaction(|store| -> Result<_> {
        let newest = number(home, store, first, &new)?;
        let mut stored = Stored::new(&new);
        for part in parts {
            let manifest = numbered(store, part, newest, &new)?;
            let bytes = seal(&manifest, Some(&key))?;
            stored.add(
                home,
                &root,
                &timestamp,
                bytes,
                newest,
                part.evidence.clone(),
            )?;
        }
        Ok(stored.commit(&first.app, &first.version))
    })
}

/// `manifest` sealed, signed with `key` if there is one, encoded.
pub(super) fn seal(manifest: &Manifest, key: Option<&SecretKey>) -> Result<Vec<u8>> {
    let signed = manifest.seal().and_then(|mut env| {
        if let Some(k) = key {
            env.sign(k)?;
        }
        env.encode()
    });
    signed.map_err(|e| {
        let track = Track::new(&manifest.app, &manifest.channel, manifest.platform);
        SignError::Seal(track.to_string(), e)
    })
}

/// The hub's release key, if it has one the root lists.
pub(super) fn release_key(home: &Home, root: &TrustedRoot) -> Result<Option<SecretKey>> {
    if !home.dir.join("keys/release.key").exists() {
        return Ok(None);
    }
    let key = home.release_key()?;
    if root.root().release.key(&key.id()).is_none() {
        return Err(SignError::UnknownKey {
            path: home.dir.join("keys/release.key"),
            key: key.id().short(),
        });
    }
    Ok(Some(key))
}

/// The newest release number of `template`'s app on `new.channel` (inside a transaction),
/// after checking the version is above it when `new` requires that.
pub(super) fn number(
    home: &Home,
    store: &Store,
    template: &Manifest,
    new: &NewRelease<'_>,
) -> Result<Option<u64>> {
    let newest = store.newest_number(&template.app, new.channel)?;
    if new.require_newer {
        check_newer(
            home,
            store,
            newest,
            &template.app,
            new.channel,
            &template.version,
        )?;
    }
    Ok(newest)
}

/// `part`'s manifest as the release after `newest`, linked to its platform's previous one.
pub(super) fn numbered(
    store: &Store,
    part: &Part,
    newest: Option<u64>,
    new: &NewRelease<'_>,
) -> Result<Manifest> {
    let t = &part.template;
    let previous = store.latest(&Track::new(&t.app, new.channel, t.platform))?;
    Ok(Manifest {
        release: newest.map_or(1, |n| n + 1),
        channel: new.channel.into(),
        staging: part.staging.clone(),
        created_at: now(),
        previous: previous.map(|l| l.manifest),
        rollout: if new.channel == STAGING_CHANNEL {
            proto::rollout::Rollout::default()
        } else {
            t.rollout.clone()
        },
        ..t.clone()
    })
}

/// The commit storing one release's signed manifests, built platform by platform: each
/// is checked with the entry point devices use (so a threshold not met is refused here)
/// and lands with its announcement (signed by the timestamp key) and evidence.
pub(super) struct Stored<'n, 'a> {
    new: &'n NewRelease<'a>,
    change: Change,
    infos: Vec<ReleaseInfo>,
}

impl<'n, 'a> Stored<'n, 'a> {
    pub(super) fn new(new: &'n NewRelease<'a>) -> Self {
        Stored {
            new,
            change: new.change.clone(),
            infos: vec![],
        }
    }

    /// Adds signed manifest `bytes`, which must be the release after `newest`.
    pub(super) fn add(
        &mut self,
        home: &Home,
        root: &TrustedRoot,
        timestamp: &SecretKey,
        bytes: Vec<u8>,
        newest: Option<u64>,
        evidence: Option<Vec<u8>>,
    ) -> Result<(), AddError> {
        let env = proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Manifest)
            .map_err(AddError::Envelope)?;
        let claimed: Manifest = proto::codec::decode(proto::codec::Kind::Manifest, &env.payload)?;
        let channel = self.new.channel;
        let track = Track::new(&claimed.app, channel, claimed.platform);
        let verified = verify_manifest(
            &bytes,
            root,
            &Expectations {
                app: Some(&claimed.app),
                channel,
                platform: claimed.platform,
                installed_release: newest,
            },
            now(),
        )
        .map_err(|source| AddError::Unverified {
            track: track.to_string(),
            source: Box::new(source),
        })?;
        let next = newest.map_or(1, |n| n + 1);
        if claimed.release != next {
            return Err(AddError::Taken {
                release: claimed.release,
                app: claimed.app,
                channel: channel.to_string(),
                next,
            });
        }
        if self.infos.iter().any(|i| i.track == track) {
            return Err(AddError::TwoImages(claimed.platform));
        }
        let freshness = crate::trust::Freshness {
            lifetime: home.config.freshness_secs,
        };
        let ann = Announcement::for_manifest(&verified, now(), freshness.lifetime);
        let ann = freshness
            .sign(&ann, timestamp, now())
            .map_err(AddError::Announce)?;
        let digest = Digest::of(&bytes);
        let release = claimed.release;
        if let Some(report) = evidence {
            self.change
                .put(release_path(&track, release, "staging"), report);
        }
        self.change
            .put(format!("blobs/{}", digest.to_hex()), bytes.clone());
        self.change
            .put(release_path(&track, release, "manifest"), bytes);
        self.change
            .put(release_path(&track, release, "announcement"), ann);
        self.infos.push(ReleaseInfo {
            track,
            release,
            manifest: digest,
        });
        Ok(())
    }

    /// The commit, with its event and (off the staging channel) the version's tag.
    pub(super) fn commit(
        mut self,
        app: &str,
        version: &semver::Version,
    ) -> (Commit, Vec<ReleaseInfo>) {
        let channel = self.new.channel;
        let release = self.infos.first().map_or(0, |i| i.release);
        self.change.event(Event {
            at: now(),
            kind: self.new.event.into(),
            app: Some(app.into()),
            channel: Some(channel.into()),
            release: Some(release),
            device: None,
            detail: self.new.detail.clone(),
        });
        let commit = Commit {
            message: format!(
                "{} {app} {version} as release {release} on {channel} for {}",
                self.new.event,
                platforms(&self.infos)
            ),
            change: self.change,
            tag: (channel != STAGING_CHANNEL).then(|| format!("{app}/v{version}")),
        };
        (commit, self.infos)
    }
}

/// "qemu-x86_64, qemu-aarch64": the platforms of a release's manifests.
pub fn platforms(infos: &[ReleaseInfo]) -> String {
    let names: Vec<&str> = infos.iter().map(|i| i.track.platform.name()).collect();
    names.join(", ")
}

/// The version of release `release` of (app, channel) (every platform's manifest of a
/// release has the same one).
fn release_version(
    home: &Home,
    store: &Store,
    app: &str,
    channel: &str,
    release: u64,
) -> Result<semver::Version> {
    let parts = store.release(app, channel, release)?;
    let first = parts.first().ok_or_else(|| SignError::NoRelease {
        release,
        of: format!("{app} on {channel}"),
    })?;
    Ok(stored_manifest(home, store, &first.track, release)?.version)
}

/// Refuses `version` unless it is above that of release `newest` of (app, channel).
pub(super) fn check_newer(
    home: &Home,
    store: &Store,
    newest: Option<u64>,
    app: &str,
    channel: &str,
    version: &semver::Version,
) -> Result<()> {
    let Some(n) = newest else { return Ok(()) };
    let prev = release_version(home, store, app, channel, n)?;
    if *version <= prev {
        return Err(SignError::NotNewer {
            version: version.to_string(),
            prev: prev.to_string(),
            release: n,
            on: format!("{app}/{channel}"),
        });
    }
    Ok(())
}
