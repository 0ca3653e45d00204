//! The publish pipeline: inspect, stage, chunk, sign, commit, announce — and the two
//! operations that re-sign an existing image as a new release: promote and rollback.
//!
//! Every path ends in [`sign_and_store`]: one commit holding the signed manifest, its
//! announcement, any new chunks, the staging evidence and the event. Release numbers only
//! grow per (app, channel), so a rollback is a *new* release of an old image and devices'
//! rollback protection still holds.

use crate::home::{now, Home};
use crate::staging;
use crate::store::{release_path, Change, Commit, Event, ReleaseInfo, Store};
use anyhow::{bail, Context, Result};
use proto::announcement::Announcement;
use proto::manifest::{
    verify_manifest, BootSpec, ChunkRef, Expectations, HealthProbe, Manifest, Staging,
};
use proto::root::TrustedRoot;
use proto::{Digest, SecretKey};
use std::collections::HashSet;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

const MIB: u64 = 1024 * 1024;
/// How often `hub publish` says how far chunking is.
const PROGRESS_EVERY: u64 = 256 * MIB;

/// The channel every release passes through before its target channel.
pub const STAGING_CHANNEL: &str = "staging";

#[derive(Debug, Clone)]
pub struct PublishArgs {
    pub app: String,
    pub version: semver::Version,
    pub channel: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub cmdline: String,
    /// `banner`, `banner:TEXT` or `tcp:PORT`.
    pub probe: String,
    pub probe_timeout_secs: u64,
    /// The unikernel needs a network interface (each device attaches it where its
    /// `nic` setting says).
    pub network: bool,
    pub no_staging: bool,
    pub staging_timeout_secs: u64,
    /// Hold the release for co-signing instead of signing it (`hub release approve`).
    pub hold: bool,
}

/// Progress lines for a terminal or a git push.
pub type Progress<'a> = &'a mut dyn FnMut(&str);

/// The signed manifest of a stored release, verified against the hub's own root.
pub fn stored_manifest(
    home: &Home,
    store: &Store,
    app: &str,
    channel: &str,
    release: u64,
) -> Result<Manifest> {
    let bytes = store
        .read(&release_path(app, channel, release, "manifest"))?
        .with_context(|| format!("no release {release} of {app} on {channel}"))?;
    let env = proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Manifest)?;
    // Signed under the root of its day: a release-key rotation must not orphan the history.
    let links = |v| crate::trust::root_link(store, v).ok().flatten();
    Ok(home.anchor_root()?.open_stored(&env, links)?)
}

/// Where and why a release is being signed.
#[derive(Debug)]
pub struct NewRelease<'a> {
    pub channel: &'a str,
    pub staging: Staging,
    /// New chunks to commit with it.
    pub change: Change,
    /// A staging report to keep beside the release (`<release>.staging`).
    pub evidence: Option<Vec<u8>>,
    /// Refuse unless the version is above the channel's newest (publish, promote; not a
    /// rollback, whose point is an older image).
    pub require_newer: bool,
    /// Event kind (`publish`, `stage`, `promote`, `rollback`) and its detail line.
    pub event: &'a str,
    pub detail: String,
}

/// Signs `template` as the next release of its app on `new.channel` and stores it in one
/// commit with `new.change` (new chunks, evidence) and an event.
///
/// Reading the newest release, numbering, signing and committing are one store
/// transaction: two publishes at once (a `git push` and a CLI publish) get two release
/// numbers, or the second is refused for its version, never one number twice.
pub fn sign_and_store(
    home: &Home,
    store: &Store,
    template: &Manifest,
    new: NewRelease<'_>,
) -> Result<ReleaseInfo> {
    let root = home.trusted_root()?;
    let key = match release_key(home, &root)? {
        Some(k) if root.root().release.threshold == 1 => k,
        _ => bail!(
            "this hub cannot sign releases alone: the trust root's release role needs {} of \
             its {} keys{}. Publish with --hold, have key holders run `fwtool sign DIR --key \
             KEY`, then `hub release approve DIR`",
            root.root().release.threshold,
            root.root().release.keys.len(),
            if home.dir.join("keys/release.key").exists() {
                String::new()
            } else {
                format!(
                    " and the hub holds none of them ({} is missing)",
                    home.dir.join("keys/release.key").display()
                )
            }
        ),
    };
    let timestamp = home.timestamp_key()?;
    store.transaction(|store| {
        let (manifest, latest) = number(home, store, template, &new)?;
        let mut env = manifest.seal()?;
        env.sign(&key)?;
        release_commit(
            home,
            &root,
            &timestamp,
            env.encode()?,
            latest.as_ref(),
            &new,
        )
    })
}

/// The hub's release key, if it has one the root lists.
fn release_key(home: &Home, root: &TrustedRoot) -> Result<Option<SecretKey>> {
    if !home.dir.join("keys/release.key").exists() {
        return Ok(None);
    }
    let key = home.release_key()?;
    if root.root().release.key(&key.id()).is_none() {
        bail!(
            "{} holds key {}, which is not one of the trust root's release keys (an unknown \
             key: devices would refuse what it signs); put back the hub's release key, or \
             `hub root publish` a root that lists this one",
            home.dir.join("keys/release.key").display(),
            key.id().short()
        );
    }
    Ok(Some(key))
}

/// `template` numbered as the next release of `new.channel` (inside a transaction).
fn number(
    home: &Home,
    store: &Store,
    template: &Manifest,
    new: &NewRelease<'_>,
) -> Result<(Manifest, Option<ReleaseInfo>)> {
    let app = &template.app;
    let latest = store.latest(app, new.channel)?;
    if new.require_newer {
        check_newer(
            home,
            store,
            latest.as_ref(),
            app,
            new.channel,
            &template.version,
        )?;
    }
    let manifest = Manifest {
        release: latest.as_ref().map_or(1, |l| l.release + 1),
        channel: new.channel.into(),
        staging: new.staging.clone(),
        created_at: now(),
        previous: latest.as_ref().map(|l| l.manifest),
        ..template.clone()
    };
    Ok((manifest, latest))
}

/// The commit storing signed manifest `bytes` as the next release after `latest`: it is
/// checked with the entry point devices use (so a threshold not met is refused here),
/// and lands with its announcement (signed by the timestamp key), chunks, evidence and
/// event.
fn release_commit(
    home: &Home,
    root: &TrustedRoot,
    timestamp: &SecretKey,
    bytes: Vec<u8>,
    latest: Option<&ReleaseInfo>,
    new: &NewRelease<'_>,
) -> Result<(Commit, ReleaseInfo)> {
    let env = proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Manifest)?;
    let claimed: Manifest = proto::codec::decode(proto::codec::Kind::Manifest, &env.payload)?;
    let (app, channel, release) = (&claimed.app, new.channel, claimed.release);
    let verified = verify_manifest(
        &bytes,
        root,
        &Expectations {
            app: Some(app),
            channel,
            platform: claimed.platform,
            installed_release: latest.map(|l| l.release),
        },
        now(),
    )
    .context("the signed manifest does not verify against the hub's trust root")?;
    let next = latest.map_or(1, |l| l.release + 1);
    if release != next {
        bail!(
            "release {release} of {app} on {channel} was taken by another release meanwhile \
             (the next is {next}); publish it again"
        );
    }
    let freshness = crate::trust::Freshness {
        lifetime: home.config.freshness_secs,
    };
    let ann = Announcement::for_manifest(&verified, now(), freshness.lifetime);
    let ann = freshness.sign(&ann, timestamp, now())?;
    let digest = Digest::of(&bytes);
    let mut change = new.change.clone();
    if let Some(report) = &new.evidence {
        change.put(
            release_path(app, channel, release, "staging"),
            report.clone(),
        );
    }
    change.put(format!("blobs/{}", digest.to_hex()), bytes.clone());
    change.put(release_path(app, channel, release, "manifest"), bytes);
    change.put(release_path(app, channel, release, "announcement"), ann);
    change.event(Event {
        at: now(),
        kind: new.event.into(),
        app: Some(app.clone()),
        channel: Some(channel.into()),
        release: Some(release),
        device: None,
        detail: new.detail.clone(),
    });
    let commit = Commit {
        message: format!(
            "{} {app} {} as release {release} on {channel}",
            new.event,
            verified.manifest().version
        ),
        change,
        tag: (channel != STAGING_CHANNEL)
            .then(|| format!("{app}/v{}", verified.manifest().version)),
    };
    let info = ReleaseInfo {
        app: app.clone(),
        channel: channel.into(),
        release,
        manifest: digest,
    };
    Ok((commit, info))
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
/// [`held_dir`] for the other key holders. Nothing is announced.
pub fn hold(
    home: &Home,
    store: &Store,
    template: &Manifest,
    new: NewRelease<'_>,
) -> Result<(ReleaseInfo, std::path::PathBuf)> {
    let root = home.trusted_root()?;
    let key = release_key(home, &root)?;
    let (info, bytes) = store.transaction(|store| {
        let (manifest, _) = number(home, store, template, &new)?;
        let mut env = manifest.seal()?;
        if let Some(k) = &key {
            env.sign(k)?;
        }
        let bytes = env.encode()?;
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
            app: app.clone(),
            channel: channel.into(),
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
    let dir = held_dir(home, &info.app, &info.channel, info.release);
    crate::home::write_atomic(&dir.join("manifest"), &bytes)?;
    Ok((info, dir))
}

/// `hub release approve DIR`: stores a held release once a threshold of release keys
/// has signed `DIR/manifest`, and announces it.
pub fn approve(home: &Home, dir: &Path) -> Result<ReleaseInfo> {
    let path = dir.join("manifest");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let env = proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Manifest)
        .with_context(|| format!("{} is not a signed manifest", path.display()))?;
    let m: Manifest = proto::codec::decode(proto::codec::Kind::Manifest, &env.payload)?;
    let root = home.trusted_root()?;
    let timestamp = home.timestamp_key()?;
    let store = home.store()?;
    let new = NewRelease {
        channel: &m.channel,
        staging: m.staging.clone(),
        change: Change::default(),
        evidence: None,
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
    let info = store.transaction(|store| {
        let latest = store.latest(&m.app, &m.channel)?;
        release_commit(
            home,
            &root,
            &timestamp,
            bytes.clone(),
            latest.as_ref(),
            &new,
        )
        .map_err(|e| match e.downcast_ref::<proto::VerifyError>() {
            Some(proto::VerifyError::BelowThreshold { have, need, .. }) => anyhow::anyhow!(
                "{} has {have} of the {need} release signatures it needs: have more key \
                     holders run `fwtool sign {} --key KEY`",
                path.display(),
                dir.display()
            ),
            _ => e,
        })
    })?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(info)
}

/// Refuses `version` unless it is above that of `latest`, the newest release of
/// (app, channel).
fn check_newer(
    home: &Home,
    store: &Store,
    latest: Option<&ReleaseInfo>,
    app: &str,
    channel: &str,
    version: &semver::Version,
) -> Result<()> {
    let Some(l) = latest else { return Ok(()) };
    let prev = stored_manifest(home, store, app, channel, l.release)?;
    if *version <= prev.version {
        bail!(
            "version {version} is not above {} (release {}) on {app}/{channel}; publish a \
             higher version (or `hub rollback` to go back)",
            prev.version,
            l.release
        );
    }
    Ok(())
}

/// Inspects and chunks the image, streaming: each new chunk goes to the git object
/// database as it is read, so memory stays constant whatever the image's size. Returns the
/// unsigned manifest template and the change naming its chunks.
fn prepare(
    home: &Home,
    store: &Store,
    image: &Path,
    args: &PublishArgs,
    progress: Progress<'_>,
) -> Result<(Manifest, Change)> {
    let mut file =
        std::fs::File::open(image).with_context(|| format!("opening image {}", image.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading the size of image {}", image.display()))?;
    if meta.is_dir() {
        bail!(
            "{} is a directory; give the path of the image file",
            image.display()
        );
    }
    let limit = home.config.max_image_mib.saturating_mul(MIB);
    let too_big = |size: u64| {
        anyhow::anyhow!(
            "image {} is {size} bytes, above this hub's limit of {} MiB; raise \
             `max_image_mib` in {} if it is meant to be this large",
            image.display(),
            home.config.max_image_mib,
            home.dir.join("hub.toml").display()
        )
    };
    if meta.len() > limit {
        return Err(too_big(meta.len()));
    }
    let mut prefix = Vec::new();
    (&mut file)
        .take(proto::image::INSPECT_PREFIX as u64)
        .read_to_end(&mut prefix)
        .with_context(|| format!("reading image {}", image.display()))?;
    let header = proto::image::inspect(&prefix, meta.len())
        .with_context(|| format!("inspecting {}", image.display()))?;
    let platform = header.platforms[0];
    progress(&format!(
        "inspected {}: {} for {platform}",
        image.display(),
        header.format
    ));
    file.seek(SeekFrom::Start(0))
        .with_context(|| format!("reading image {}", image.display()))?;
    let mut change = Change::default();
    let mut chunks = vec![];
    let mut seen = HashSet::new();
    let mut hasher = proto::digest::Hasher::new();
    let (mut size, mut new_bytes, mut reported) = (0u64, 0u64, 0u64);
    for c in proto::chunking::chunks(BufReader::with_capacity(1 << 20, file)) {
        let c = c.with_context(|| format!("reading image {}", image.display()))?;
        hasher.update(&c.data);
        size += c.data.len() as u64;
        if size > limit {
            return Err(too_big(size));
        }
        chunks.push(ChunkRef {
            digest: c.digest,
            size: c.data.len() as u64,
        });
        // A chunk repeated inside the image is stored and counted once.
        if seen.insert(c.digest) && !store.has_blob(&c.digest)? {
            new_bytes += c.data.len() as u64;
            let blob = store.write_blob(&c.data)?;
            change.put_written(format!("blobs/{}", c.digest.to_hex()), blob);
        }
        if size - reported >= PROGRESS_EVERY {
            reported = size;
            progress(&format!(
                "chunking: {} MiB of {} MiB",
                size / MIB,
                meta.len() / MIB
            ));
        }
    }
    progress(&format!(
        "chunked {size} bytes into {} chunks ({} distinct, {new_bytes} bytes new)",
        chunks.len(),
        seen.len()
    ));
    let template = Manifest {
        fleet: home.config.fleet.clone(),
        app: args.app.clone(),
        version: args.version.clone(),
        release: 0,
        channel: String::new(),
        platform,
        image_digest: hasher.finalize(),
        image_size: size,
        chunks,
        boot: BootSpec {
            memory_mib: args.memory_mib,
            vcpus: args.vcpus,
            cmdline: args.cmdline.clone(),
            probe: HealthProbe::parse(&args.probe, &args.app, &args.version)
                .map_err(anyhow::Error::msg)
                .context("--probe")?,
            probe_timeout_ms: args.probe_timeout_secs * 1000,
            network: args.network,
        },
        staging: Staging::Skipped,
        created_at: 0,
        previous: None,
    };
    // What a device would refuse, refused here, before anything is signed or staged.
    Manifest {
        release: 1,
        channel: args.channel.clone(),
        ..template.clone()
    }
    .validate()
    .with_context(|| format!("the release of {} is not valid", image.display()))?;
    Ok((template, change))
}

/// Boot spec arguments a device could never boot, named by their flags.
fn check_boot_args(args: &PublishArgs) -> Result<()> {
    anyhow::ensure!(
        args.memory_mib > 0,
        "--memory-mib must be at least 1 (the guest's memory in MiB)"
    );
    anyhow::ensure!(args.vcpus > 0, "--vcpus must be at least 1");
    anyhow::ensure!(
        args.probe_timeout_secs > 0,
        "--probe-timeout-secs must be at least 1"
    );
    Ok(())
}

/// Runs the pipeline. Nothing is signed for the target channel unless staging passed
/// (or `--no-staging` was given); each commit is atomic.
pub fn publish(
    home: &Home,
    image: &Path,
    args: &PublishArgs,
    progress: Progress<'_>,
) -> Result<ReleaseInfo> {
    proto::names::check("app", &args.app).map_err(anyhow::Error::msg)?;
    proto::names::check("channel", &args.channel).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        args.channel != STAGING_CHANNEL,
        "publish to a target channel; staging happens on the way"
    );
    check_boot_args(args)?;
    if args.hold && !args.no_staging {
        bail!(
            "--hold needs --no-staging for now: a staging device verifies its release against \
             the same root, so it would need a co-signed staging release as well"
        );
    }
    let store = home.store()?;
    // Checked again when the release is numbered (another publish may land meanwhile);
    // here it saves chunking and staging an image that would be refused.
    let latest = store.latest(&args.app, &args.channel)?;
    check_newer(
        home,
        &store,
        latest.as_ref(),
        &args.app,
        &args.channel,
        &args.version,
    )?;
    let (template, change) = prepare(home, &store, image, args, progress)?;

    if args.hold {
        let (info, dir) = hold(
            home,
            &store,
            &template,
            NewRelease {
                channel: &args.channel,
                staging: Staging::Skipped,
                change,
                evidence: None,
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
        return Ok(info);
    }
    let (staging, evidence, change) = if args.no_staging {
        progress("staging skipped (--no-staging); recorded in the release and the event log");
        (Staging::Skipped, None, change)
    } else {
        // The candidate goes to the staging channel first (with its chunks), and a
        // staging device must report it healthy before anything else is signed.
        let candidate = sign_and_store(
            home,
            &store,
            &template,
            NewRelease {
                channel: STAGING_CHANNEL,
                staging: Staging::Skipped,
                change,
                evidence: None,
                require_newer: false,
                event: "stage",
                detail: format!("{} {} sent to staging", args.app, args.version),
            },
        )?;
        progress(&format!(
            "staging: release {} on {STAGING_CHANNEL}; waiting for a staging device",
            candidate.release
        ));
        crate::control::notify(home, progress);
        let report = staging::await_verdict(
            home,
            &store,
            &candidate,
            args.staging_timeout_secs,
            progress,
        )?;
        let digest = Digest::of(&report);
        let mut evidence = Change::default();
        evidence.put(
            release_path(&args.app, STAGING_CHANNEL, candidate.release, "staging"),
            report.clone(),
        );
        (Staging::Passed { report: digest }, Some(report), evidence)
    };
    let skipped = matches!(staging, Staging::Skipped);
    let info = sign_and_store(
        home,
        &store,
        &template,
        NewRelease {
            channel: &args.channel,
            staging,
            change,
            evidence,
            require_newer: true,
            event: "publish",
            detail: format!(
                "{} {} ({}, {} bytes){}",
                args.app,
                args.version,
                template.platform,
                template.image_size,
                if skipped {
                    ", staging skipped (--no-staging)"
                } else {
                    ", passed staging"
                }
            ),
        },
    )?;
    progress(&format!(
        "signed and stored release {} of {} on {}, tagged {}/v{}",
        info.release, args.app, args.channel, args.app, args.version
    ));
    Ok(info)
}

/// `hub promote`: the newest release on `from` becomes the next release on `to`.
/// From the staging channel, only a release that passed staging may be promoted.
pub fn promote(home: &Home, app: &str, from: &str, to: &str) -> Result<ReleaseInfo> {
    let store = home.store()?;
    let src = store
        .latest(app, from)?
        .with_context(|| format!("{app} has no release on {from}"))?;
    let m = stored_manifest(home, &store, app, from, src.release)?;
    let evidence = store.read(&release_path(app, from, src.release, "staging"))?;
    let staging = match (&evidence, from == STAGING_CHANNEL) {
        (Some(report), _) => Staging::Passed {
            report: Digest::of(report),
        },
        (None, true) => bail!(
            "release {} of {app} on {from} never passed staging",
            src.release
        ),
        (None, false) => m.staging.clone(),
    };
    sign_and_store(
        home,
        &store,
        &m,
        NewRelease {
            channel: to,
            staging,
            change: Change::default(),
            evidence,
            require_newer: true,
            event: "promote",
            detail: format!("{app} {} from {from} release {}", m.version, src.release),
        },
    )
}

/// `hub rollback`: re-signs an earlier image of `channel` as a new, higher release.
pub fn rollback(
    home: &Home,
    app: &str,
    channel: &str,
    to: Option<&semver::Version>,
) -> Result<ReleaseInfo> {
    let store = home.store()?;
    let releases: Vec<_> = store
        .releases()?
        .into_iter()
        .filter(|r| r.app == app && r.channel == channel)
        .collect();
    let current = releases
        .last()
        .with_context(|| format!("{app} has no release on {channel}"))?;
    let cur = stored_manifest(home, &store, app, channel, current.release)?;
    let mut target = None;
    for r in releases.iter().rev().skip(1) {
        let m = stored_manifest(home, &store, app, channel, r.release)?;
        let wanted = match to {
            Some(v) => &m.version == v,
            None => m.image_digest != cur.image_digest,
        };
        if wanted {
            target = Some((r.release, m));
            break;
        }
    }
    let (old_release, m) = target.with_context(|| match to {
        Some(v) => format!("{app} {v} was never released on {channel}"),
        None => format!("{app} has no earlier image on {channel} to roll back to"),
    })?;
    let evidence = store.read(&release_path(app, channel, old_release, "staging"))?;
    let staging = m.staging.clone();
    sign_and_store(
        home,
        &store,
        &m,
        NewRelease {
            channel,
            staging,
            change: Change::default(),
            evidence,
            require_newer: false,
            event: "rollback",
            detail: format!(
                "{app} back to {} (image of release {old_release}) from {}",
                m.version, cur.version
            ),
        },
    )
}
