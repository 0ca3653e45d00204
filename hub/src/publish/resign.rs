//! Re-signing an image already stored as a new release: promote (to another channel)
//! and rollback (an earlier image, a higher number).

use super::*;

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
            (None, true) => bail!(
                "release {release} of {app} on {channel} never passed staging on {}",
                info.track.platform
            ),
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
        .with_context(|| format!("{app} has no release on {from}"))?;
    let parts = stored_parts(home, &store, app, from, src, from == STAGING_CHANNEL)?;
    let version = parts[0].template.version.clone();
    sign_and_store(
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
    )
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
    let current = *numbers
        .last()
        .with_context(|| format!("{app} has no release on {channel}"))?;
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
    let (old_release, mut parts) = target.with_context(|| match to {
        Some(v) => format!("{app} {v} was never released on {channel}"),
        None => format!("{app} has no earlier image on {channel} to roll back to"),
    })?;
    // A rollback goes to every device at once: it is the way out of a bad release.
    for p in &mut parts {
        p.template.rollout = proto::rollout::Rollout::default();
    }
    sign_and_store(
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
    )
}
