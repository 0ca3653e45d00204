//! Releases held for co-signing: `hub publish --hold` leaves the numbered manifest in
//! `HUB/held/APP-CHANNEL-N/` for `fwtool sign`; `hub release approve` stores it once a
//! threshold signed.

use super::*;
use sign::seal;
use std::path::PathBuf;

/// Why `hub release approve` stored no release.
#[derive(Debug, thiserror::Error)]
pub enum ApproveError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a signed manifest", path.display())]
    NotSigned {
        path: PathBuf,
        #[source]
        source: Box<proto::VerifyError>,
    },
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{} has {have} of the {need} release signatures it needs: have more key holders run \
         `fwtool sign {} --key KEY`",
        path.display(),
        dir.display()
    )]
    Short {
        path: PathBuf,
        dir: PathBuf,
        have: usize,
        need: usize,
    },
    #[error(transparent)]
    Add(#[from] AddError),
    #[error("approve stored no manifest")]
    Nothing,
}

/// Where a held release waits for co-signatures: a release directory `fwtool sign`
/// takes (`DIR/manifest`).
pub fn held_dir(home: &Home, app: &str, channel: &str, release: u64) -> std::path::PathBuf {
    home.dir
        .join("held")
        .join(format!("{app}-{channel}-{release}"))
}

/// `hub publish --hold`: numbers the release and stores its chunks, but signs it only
/// with the hub's release key (if it has one of the role's) and leaves it in
/// [`held_dir`] for the other key holders. Nothing is announced. One platform: a held
/// directory holds one manifest.
pub fn hold(
    home: &Home,
    store: &Store,
    part: &Part,
    new: NewRelease<'_>,
) -> Result<(ReleaseInfo, std::path::PathBuf), SignError> {
    let root = home.trusted_root()?;
    let key = release_key(home, &root)?;
    let (info, bytes) = store.transaction(|store| -> Result<_, SignError> {
        let newest = number(home, store, &part.template, &new)?;
        let manifest = numbered(store, part, newest, &new)?;
        let bytes = seal(&manifest, key.as_ref())?;
        let (app, channel, release) = (&manifest.app, new.channel, manifest.release);
        let mut change = new.change.clone();
        change.put(
            format!("held/{app}/{channel}/{release}.manifest"),
            bytes.clone(),
        );
        change.event(Event {
            at: now(),
            kind: "hold".into(),
            app: Some(app.clone()),
            channel: Some(channel.into()),
            release: Some(release),
            device: None,
            detail: format!(
                "{} held for {} release signature(s)",
                new.detail,
                root.root().release.threshold
            ),
        });
        let info = ReleaseInfo {
            track: Track::new(app, channel, manifest.platform),
            release,
            manifest: Digest::of(&bytes),
        };
        let commit = Commit {
            message: format!(
                "hold {app} {} as release {release} on {channel}",
                manifest.version
            ),
            change,
            tag: None,
        };
        Ok((commit, (info.clone(), bytes)))
    })?;
    let dir = held_dir(home, &info.track.app, &info.track.channel, info.release);
    crate::home::write_atomic(&dir.join("manifest"), &bytes)?;
    Ok((info, dir))
}

/// `hub release approve DIR`: stores a held release once a threshold of release keys
/// has signed `DIR/manifest`, and announces it.
pub fn approve(home: &Home, dir: &Path) -> Result<ReleaseInfo, ApproveError> {
    let path = dir.join("manifest");
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(source) => return Err(ApproveError::Read { path, source }),
    };
    let decoded =
        proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Manifest).and_then(|env| {
            let m: Manifest = proto::codec::decode(proto::codec::Kind::Manifest, &env.payload)?;
            Ok((env, m))
        });
    let (env, m) = match decoded {
        Ok(d) => d,
        Err(e) => {
            let source = Box::new(e);
            return Err(ApproveError::NotSigned { path, source });
        }
    };
    let root = home.trusted_root()?;
    let timestamp = home.timestamp_key()?;
    let store = home.store()?;
    let new = NewRelease {
        channel: &m.channel,
        change: Change::default(),
        require_newer: false,
        event: "approve",
        detail: format!(
            "{} {} ({}, {} bytes), {} release signature(s)",
            m.app,
            m.version,
            m.platform,
            m.image_size,
            env.signatures.len()
        ),
    };
    let mut infos = store.transaction(|store| -> Result<_, ApproveError> {
        let newest = store.newest_number(&m.app, &m.channel)?;
        let mut stored = Stored::new(&new);
        stored
            .add(home, &root, &timestamp, bytes.clone(), newest, None)
            .map_err(|e| match &e {
                AddError::Unverified { source, .. } => match **source {
                    proto::VerifyError::BelowThreshold { have, need, .. } => ApproveError::Short {
                        path: path.clone(),
                        dir: dir.into(),
                        have,
                        need,
                    },
                    _ => e.into(),
                },
                _ => e.into(),
            })?;
        Ok(stored.commit(&m.app, &m.version))
    })?;
    let _ = std::fs::remove_dir_all(dir);
    infos.pop().ok_or(ApproveError::Nothing)
}
