//! The publish pipeline: inspect, stage, chunk, sign, commit, announce — and the two
//! operations that re-sign an existing image as a new release: promote and rollback.
//!
//! Every path ends in [`sign_and_store`]: one commit holding the signed manifest, its
//! announcement, any new chunks, the staging evidence and the event. Release numbers only
//! grow per (app, channel), so a rollback is a *new* release of an old image and devices'
//! rollback protection still holds.

mod held;
mod image;
mod resign;
mod sign;

pub use held::{approve, held_dir, hold, ApproveError};
pub use image::ImageError;
pub use resign::{promote, rollback, ResignError};
pub use sign::{platforms, sign_and_store, stored_manifest, NewRelease, Part, SignError};

use image::prepare;
use sign::{check_newer, number, numbered, release_key, Stored};

use crate::home::{now, Home, HomeError};
use crate::staging::{self, StagingError};
use crate::store::{release_path, Change, Commit, Event, ReleaseInfo, Store, StoreError};
use proto::announcement::{Announcement, Track};
use proto::manifest::{
    verify_manifest, BootSpec, ChunkRef, Expectations, HealthProbe, Manifest, Platform, Staging,
};
use proto::root::TrustedRoot;
use proto::{Digest, SecretKey};
use std::collections::HashSet;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

const MIB: u64 = 1024 * 1024;
/// How often `hub publish` says how far chunking is.
const PROGRESS_EVERY: u64 = 256 * MIB;

/// Why `hub publish` (or a `git push`) stored no release.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// An argument no release could have, named by its flag.
    #[error("{0}")]
    Arg(&'static str),
    #[error(transparent)]
    Name(#[from] proto::names::BadName),
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("functional tests failed against {platform} staged on {device}")]
    Functional {
        platform: Platform,
        device: String,
        #[source]
        source: staging::CheckError,
    },
}

/// Why a signed manifest could not join the release being stored (one commit may hold a
/// manifest per platform). `hub release approve` tells a manifest short of signatures
/// from the others.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error(transparent)]
    Envelope(proto::VerifyError),
    #[error(transparent)]
    Decode(#[from] proto::codec::CodecError),
    #[error("the signed manifest of {track} does not verify against the hub's trust root")]
    Unverified {
        track: String,
        #[source]
        source: Box<proto::VerifyError>,
    },
    #[error(
        "release {release} of {app}/{channel} was taken by another release meanwhile (the \
         next is {next}); publish it again"
    )]
    Taken {
        release: u64,
        app: String,
        channel: String,
        next: u64,
    },
    #[error("two images for {0} in one release")]
    TwoImages(Platform),
    /// Signing the release's first announcement with the timestamp key.
    #[error(transparent)]
    Announce(proto::codec::CodecError),
}

// Defined beside the staging gate, which needs them and sits below the pipeline.
pub use crate::staging::{Progress, STAGING_CHANNEL};

#[derive(Debug, Clone)]
pub struct PublishArgs {
    pub app: String,
    pub version: semver::Version,
    pub channel: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub cmdline: String,
    /// `banner`, `banner:TEXT`, `tcp:PORT` or `http:[PORT]/PATH`.
    pub probe: String,
    pub probe_timeout_secs: u64,
    /// The unikernel needs a network interface (each device attaches it where its
    /// `nic` setting says).
    pub network: bool,
    /// Skip the staging gate for every platform.
    pub no_staging: bool,
    /// Skip the staging gate for these platforms only (no staging device of theirs).
    pub no_staging_for: Vec<Platform>,
    pub staging_timeout_secs: u64,
    /// Hold the release for co-signing instead of signing it (`hub release approve`).
    pub hold: bool,
    /// Waves, targets and halt policy, signed into every manifest of the release (not
    /// the staging one: a staging device installs at once).
    pub rollout: proto::rollout::Rollout,
    /// Set when the hub built the images from a pushed commit.
    pub from_source: Option<FromSource>,
}

/// A release built from source: its provenance, signed into every manifest of it, and
/// the build log and SBOM that the provenance names by digest.
#[derive(Debug, Clone)]
pub struct FromSource {
    pub provenance: proto::manifest::Provenance,
    pub log: Vec<u8>,
    pub sbom: Option<Vec<u8>>,
}

/// Where the store keeps a build log or SBOM (by digest: a rollback's manifest names the
/// same files as the release it goes back to).
pub fn provenance_path(digest: &Digest) -> String {
    format!("provenance/{}", digest.to_hex())
}

impl FromSource {
    /// The log and SBOM, into the change that stores the release.
    fn keep(&self, change: &mut Change) {
        let files = std::iter::once(&self.log).chain(self.sbom.as_ref());
        for bytes in files {
            change.put(provenance_path(&Digest::of(bytes)), bytes.clone());
        }
    }
}

impl PublishArgs {
    fn skips_staging(&self, platform: Platform) -> bool {
        self.no_staging || self.no_staging_for.contains(&platform)
    }
}

/// One image of a release: its file and the platform it is for (`None`: the first the
/// image's header allows).
#[derive(Debug, Clone)]
pub struct Image {
    pub platform: Option<Platform>,
    pub path: std::path::PathBuf,
}

impl std::str::FromStr for Image {
    type Err = proto::manifest::UnknownPlatform;
    /// `PLATFORM=PATH`, or a bare `PATH`.
    fn from_str(s: &str) -> Result<Image, Self::Err> {
        match s.split_once('=') {
            Some((platform, path)) => Ok(Image {
                platform: Some(platform.parse()?),
                path: path.into(),
            }),
            None => Ok(Image {
                platform: None,
                path: s.into(),
            }),
        }
    }
}

/// Boot spec arguments a device could never boot, named by their flags.
fn check_boot_args(args: &PublishArgs) -> Result<(), PublishError> {
    let refused = if args.memory_mib == 0 {
        "--memory-mib must be at least 1 (the guest's memory in MiB)"
    } else if args.vcpus == 0 {
        "--vcpus must be at least 1"
    } else if args.probe_timeout_secs == 0 {
        "--probe-timeout-secs must be at least 1"
    } else {
        return Ok(());
    };
    Err(PublishError::Arg(refused))
}

/// Runs the pipeline for one release of one or more platforms' images. Nothing is signed
/// for the target channel unless staging passed on a staging device of each platform
/// (or was skipped for it); each commit is atomic.
pub fn publish(
    home: &Home,
    images: &[Image],
    args: &PublishArgs,
    progress: Progress<'_>,
) -> Result<Vec<ReleaseInfo>, PublishError> {
    publish_checked(home, images, args, None, progress)
}

/// [`publish`], with `check` run on every staged instance once staging passed (a
/// push's functional tests); its error refuses the release.
pub fn publish_checked(
    home: &Home,
    images: &[Image],
    args: &PublishArgs,
    check: Option<staging::Check<'_>>,
    progress: Progress<'_>,
) -> Result<Vec<ReleaseInfo>, PublishError> {
    check_args(args, images)?;
    // Before anything is chunked or staged: devices refuse what an expired root signs.
    home.trusted_root()?;
    let store = home.store()?;
    // Checked again when the release is numbered (another publish may land meanwhile);
    // here it saves chunking and staging an image that would be refused.
    let newest = store.newest_number(&args.app, &args.channel)?;
    check_newer(
        home,
        &store,
        newest,
        &args.app,
        &args.channel,
        &args.version,
    )?;
    let (templates, mut change) = prepare(home, &store, images, args, progress)?;
    // With the first commit (the staging candidate's, if any): a push that fails staging
    // or its functional tests keeps the build log its candidate names.
    if let Some(source) = &args.from_source {
        source.keep(&mut change);
    }
    if args.hold {
        return Ok(hold_for_signatures(
            home,
            &store,
            &templates[0],
            args,
            change,
            progress,
        )?);
    }
    let (parts, change) = gate(home, &store, &templates, args, change, check, progress)?;
    let detail = format!("{} {} ({})", args.app, args.version, staged_detail(&parts));
    let infos = sign_and_store(
        home,
        &store,
        &parts,
        NewRelease {
            channel: &args.channel,
            change,
            require_newer: true,
            event: "publish",
            detail,
        },
    )?;
    progress(&format!(
        "signed and stored release {} of {} on {} for {}, tagged {}/v{}",
        infos[0].release,
        args.app,
        args.channel,
        platforms(&infos),
        args.app,
        args.version
    ));
    Ok(infos)
}

/// The staging gate for the templates that stage, then `check` (the functional tests)
/// on their staged instances; skipped ones pass as they are. The parts to sign, and the
/// change holding the staging evidence.
fn gate(
    home: &Home,
    store: &Store,
    templates: &[Manifest],
    args: &PublishArgs,
    change: Change,
    check: Option<staging::Check<'_>>,
    progress: Progress<'_>,
) -> Result<(Vec<Part>, Change), PublishError> {
    let (to_stage, skipped): (Vec<&Manifest>, Vec<&Manifest>) = templates
        .iter()
        .partition(|t| !args.skips_staging(t.platform));
    for t in &skipped {
        progress(&format!(
            "staging skipped for {} (--no-staging); recorded in the release and the event log{}",
            t.platform,
            if check.is_some() {
                "; no functional tests for it"
            } else {
                ""
            }
        ));
    }
    let mut parts: Vec<Part> = skipped.into_iter().map(Part::unstaged).collect();
    if check.is_some() && to_stage.is_empty() {
        return Err(PublishError::Arg(
            "[test] functional runs against staged instances, and this release skips staging \
             on every platform: drop no_staging (or the functional tests)",
        ));
    }
    if to_stage.is_empty() {
        return Ok((parts, change));
    }
    let (staged, evidence) = stage(home, store, &to_stage, args, change, progress)?;
    if let Some(check) = check {
        check_staged(&staged, check, progress)?;
    }
    parts.extend(staged);
    Ok((parts, evidence))
}

/// What `hub publish` refuses before reading any image.
fn check_args(args: &PublishArgs, images: &[Image]) -> Result<(), PublishError> {
    proto::names::check("app", &args.app)?;
    proto::names::check("channel", &args.channel)?;
    if args.channel == STAGING_CHANNEL {
        return Err(PublishError::Arg(
            "publish to a target channel; staging happens on the way",
        ));
    }
    check_boot_args(args)?;
    if args.hold && !args.no_staging {
        return Err(PublishError::Arg(
            "--hold needs --no-staging for now: a staging device verifies its release against \
             the same root, so it would need a co-signed staging release as well",
        ));
    }
    if args.hold && images.len() > 1 {
        return Err(PublishError::Arg(
            "--hold takes one image: a held release directory holds one platform's manifest",
        ));
    }
    Ok(())
}

/// `--hold`: the release numbered and left for co-signing (see [`hold`]).
fn hold_for_signatures(
    home: &Home,
    store: &Store,
    template: &Manifest,
    args: &PublishArgs,
    change: Change,
    progress: Progress<'_>,
) -> Result<Vec<ReleaseInfo>, SignError> {
    let (info, dir) = hold(
        home,
        store,
        &Part::unstaged(template),
        NewRelease {
            channel: &args.channel,
            change,
            require_newer: true,
            event: "hold",
            detail: format!("{} {}", args.app, args.version),
        },
    )?;
    progress(&format!(
        "held release {} of {} on {} for co-signing in {}: each key holder runs `fwtool \
         sign {} --key KEY`, then `hub release approve {}`",
        info.release,
        args.app,
        args.channel,
        dir.display(),
        dir.display(),
        dir.display()
    ));
    Ok(vec![info])
}

/// Runs `check` on each staged part's instance, in platform order.
fn check_staged(
    parts: &[Part],
    check: staging::Check<'_>,
    progress: Progress<'_>,
) -> Result<(), PublishError> {
    for part in parts {
        let report = part.evidence.as_deref().unwrap_or_default();
        let staged = staging::Staged::from_report(report, &part.template);
        check(&staged, progress).map_err(|source| PublishError::Functional {
            platform: staged.platform,
            device: staged.device.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Each platform's size and staging, for the event log.
fn staged_detail(parts: &[Part]) -> String {
    parts
        .iter()
        .map(|p| {
            let how = match p.staging {
                Staging::Skipped => "staging skipped",
                Staging::Passed { .. } => "passed staging",
            };
            format!(
                "{}: {} bytes, {how}",
                p.template.platform, p.template.image_size
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The staging gate for `templates`: one candidate release on the staging channel (with
/// the new chunks) holding each platform's manifest, and a staging device of each platform
/// must report its own healthy. Returns the parts, each with its device's signed report,
/// and the change that keeps the reports beside the candidate.
fn stage(
    home: &Home,
    store: &Store,
    templates: &[&Manifest],
    args: &PublishArgs,
    change: Change,
    progress: Progress<'_>,
) -> Result<(Vec<Part>, Change), PublishError> {
    let candidate_parts: Vec<Part> = templates.iter().map(|t| Part::unstaged(t)).collect();
    let candidates = sign_and_store(
        home,
        store,
        &candidate_parts,
        NewRelease {
            channel: STAGING_CHANNEL,
            change,
            require_newer: false,
            event: "stage",
            detail: format!("{} {} sent to staging", args.app, args.version),
        },
    )?;
    progress(&format!(
        "staging: release {} on {STAGING_CHANNEL}; waiting for a staging device of {}",
        candidates[0].release,
        platforms(&candidates)
    ));
    crate::control::notify(home, progress);
    let reports = staging::await_verdicts(
        home,
        store,
        &candidates,
        args.staging_timeout_secs,
        progress,
    )?;
    let mut evidence = Change::default();
    let mut parts = vec![];
    for ((candidate, report), template) in candidates.iter().zip(reports).zip(templates) {
        evidence.put(
            release_path(&candidate.track, candidate.release, "staging"),
            report.clone(),
        );
        parts.push(Part {
            template: (*template).clone(),
            staging: Staging::Passed {
                report: Digest::of(&report),
            },
            evidence: Some(report),
        });
    }
    Ok((parts, evidence))
}
