//! Re-signing an image already stored as a new release: promote (to another channel)
//! and rollback (an earlier image, a higher number).

use super::*;

/// Why `hub promote` or `hub rollback` stored no release.
#[derive(Debug, thiserror::Error)]
pub enum ResignError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("{app} has no release on {channel}")]
    NoRelease { app: String, channel: String },
    #[error("release {release} of {app} on {channel} never passed staging on {platform}")]
    NeverStaged {
        release: u64,
        app: String,
        channel: String,
        platform: Platform,
    },
    #[error("{app} {version} was never released on {channel}")]
    NeverReleased {
        app: String,
        version: semver::Version,
        channel: String,
    },
    #[error("{app} has no earlier image on {channel} to roll back to")]
    NoEarlier { app: String, channel: String },
}

type Result<T, E = ResignError> = std::result::Result<T, E>;

fn no_release(app: &str, channel: &str) -> ResignError {
    ResignError::NoRelease {
        app: app.into(),
        channel: channel.into(),
    }
}

/// The stored parts of release `release` of (app, channel), ready to sign again elsewhere
/// (promote) or as a newer release (rollback); `passed_only` refuses a platform without
/// staging evidence.
pub(super) fn stored_parts(
    home: &Home,
    store: &Store,
    app: &str,
    channel: &str,
    release: u64,
    passed_only: bool,
) -> Result<Vec<Part>> {
    let mut parts = vec![];
    for info in store.release(app, channel, release)? {
        let m = stored_manifest(home, store, &info.track, release)?;
        let evidence = store.read(&release_path(&info.track, release, "staging"))?;
        let staging = match (&evidence, passed_only) {
            (Some(report), _) => Staging::Passed {
                report: Digest::of(report),
            },
            (None, true) => {
                return Err(ResignError::NeverStaged {
                    release,
                    app: app.into(),
                    channel: channel.into(),
                    platform: info.track.platform,
                })
            }
            (None, false) => m.staging.clone(),
        };
        parts.push(Part {
            template: m,
            staging,
            evidence,
        });
    }
    Ok(parts)
}

/// `hub promote`: the newest release on `from` (every platform of it) becomes the next
/// release on `to`. From the staging channel, only a release that passed staging may be
/// promoted.
pub fn promote(home: &Home, app: &str, from: &str, to: &str) -> Result<Vec<ReleaseInfo>> {
    let store = home.store()?;
    let src = store
        .newest_number(app, from)?
        .ok_or_else(|| no_release(app, from))?;
    let parts = stored_parts(home, &store, app, from, src, from == STAGING_CHANNEL)?;
    let Some(first) = parts.first() else {
        return Err(no_release(app, from));
    };
    let version = first.template.version.clone();
    let infos = sign_and_store(
        home,
        &store,
        &parts,
        NewRelease {
            channel: to,
            change: Change::default(),
            require_newer: true,
            event: "promote",
            detail: format!("{app} {version} from {from} release {src}"),
        },
    )?;
    Ok(infos)
}

/// `hub rollback`: re-signs an earlier release of `channel` (every platform of it) as a
/// new, higher release: the one of version `to`, else the newest whose images differ
/// from the current ones.
pub fn rollback(
    home: &Home,
    app: &str,
    channel: &str,
    to: Option<&semver::Version>,
) -> Result<Vec<ReleaseInfo>> {
    let store = home.store()?;
    let numbers = store.release_numbers(app, channel)?;
    let current = *numbers.last().ok_or_else(|| no_release(app, channel))?;
    let images = |parts: &[Part]| -> Vec<(Platform, Digest)> {
        parts
            .iter()
            .map(|p| (p.template.platform, p.template.image_digest))
            .collect()
    };
    let cur = stored_parts(home, &store, app, channel, current, false)?;
    let mut target = None;
    for &n in numbers.iter().rev().skip(1) {
        let parts = stored_parts(home, &store, app, channel, n, false)?;
        let wanted = match to {
            Some(v) => parts[0].template.version == *v,
            None => images(&parts) != images(&cur),
        };
        if wanted {
            target = Some((n, parts));
            break;
        }
    }
    let (old_release, mut parts) = target.ok_or_else(|| match to {
        Some(v) => ResignError::NeverReleased {
            app: app.into(),
            version: v.clone(),
            channel: channel.into(),
        },
        None => ResignError::NoEarlier {
            app: app.into(),
            channel: channel.into(),
        },
    })?;
    // A rollback goes to every device at once: it is the way out of a bad release.
    for p in &mut parts {
        p.template.rollout = proto::rollout::Rollout::default();
    }
    let infos = sign_and_store(
        home,
        &store,
        &parts,
        NewRelease {
            channel,
            change: Change::default(),
            require_newer: false,
            event: "rollback",
            detail: format!(
                "{app} back to {} (images of release {old_release}) from {}",
                parts[0].template.version, cur[0].template.version
            ),
        },
    )?;
    Ok(infos)
}
