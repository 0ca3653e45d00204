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
    /// `banner`, `banner:TEXT` or `tcp:PORT`.
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

/// The signed manifest of a stored release, verified against the hub's own root.
pub fn stored_manifest(
    home: &Home,
    store: &Store,
    track: &Track,
    release: u64,
) -> Result<Manifest> {
    let bytes = store
        .read(&release_path(track, release, "manifest"))?
        .with_context(|| format!("no release {release} of {track}"))?;
    let env = proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Manifest)?;
    // Signed under the root of its day: a release-key rotation must not orphan the history.
    let links = |v| crate::trust::root_link(store, v).ok().flatten();
    Ok(home.anchor_root()?.open_stored(&env, links)?)
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
    let first = &parts
        .first()
        .context("a release needs at least one image")?
        .template;
    store.transaction(|store| -> Result<_> {
        let newest = number(home, store, first, &new)?;
        let mut stored = Stored::new(&new);
        for part in parts {
            let manifest = numbered(store, part, newest, &new)?;
            let mut env = manifest.seal()?;
            env.sign(&key)?;
            stored.add(
                home,
                &root,
                &timestamp,
                env.encode()?,
                newest,
                part.evidence.clone(),
            )?;
        }
        Ok(stored.commit(&first.app, &first.version))
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

/// The newest release number of `template`'s app on `new.channel` (inside a transaction),
/// after checking the version is above it when `new` requires that.
fn number(
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
fn numbered(
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
struct Stored<'n, 'a> {
    new: &'n NewRelease<'a>,
    change: Change,
    infos: Vec<ReleaseInfo>,
}

impl<'n, 'a> Stored<'n, 'a> {
    fn new(new: &'n NewRelease<'a>) -> Self {
        Stored {
            new,
            change: new.change.clone(),
            infos: vec![],
        }
    }

    /// Adds signed manifest `bytes`, which must be the release after `newest`.
    fn add(
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
    fn commit(mut self, app: &str, version: &semver::Version) -> (Commit, Vec<ReleaseInfo>) {
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
) -> Result<(ReleaseInfo, std::path::PathBuf)> {
    let root = home.trusted_root()?;
    let key = release_key(home, &root)?;
    let (info, bytes) = store.transaction(|store| -> Result<_> {
        let newest = number(home, store, &part.template, &new)?;
        let manifest = numbered(store, part, newest, &new)?;
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
    let mut infos = store.transaction(|store| -> Result<_> {
        let newest = store.newest_number(&m.app, &m.channel)?;
        let mut stored = Stored::new(&new);
        stored
            .add(home, &root, &timestamp, bytes.clone(), newest, None)
            .map_err(|e| match &e {
                AddError::Unverified { source, .. } => match **source {
                    proto::VerifyError::BelowThreshold { have, need, .. } => anyhow::anyhow!(
                        "{} has {have} of the {need} release signatures it needs: have more \
                         key holders run `fwtool sign {} --key KEY`",
                        path.display(),
                        dir.display()
                    ),
                    _ => e.into(),
                },
                _ => e.into(),
            })?;
        Ok(stored.commit(&m.app, &m.version))
    })?;
    let _ = std::fs::remove_dir_all(dir);
    infos.pop().context("approve stored no manifest")
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
    let first = parts
        .first()
        .with_context(|| format!("no release {release} of {app} on {channel}"))?;
    Ok(stored_manifest(home, store, &first.track, release)?.version)
}

/// Refuses `version` unless it is above that of release `newest` of (app, channel).
fn check_newer(
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
        bail!(
            "version {version} is not above {prev} (release {n}) on {app}/{channel}; publish \
             a higher version (or `hub rollback` to go back)"
        );
    }
    Ok(())
}

/// Inspects and chunks each image, streaming: each new chunk goes to the git object
/// database as it is read, so memory stays constant whatever an image's size, and a chunk
/// the images share is stored once. Returns one unsigned manifest template per image and
/// the change naming their chunks.
fn prepare(
    home: &Home,
    store: &Store,
    images: &[Image],
    args: &PublishArgs,
    progress: Progress<'_>,
) -> Result<(Vec<Manifest>, Change)> {
    let mut chunked = Chunked::default();
    let mut templates: Vec<Manifest> = vec![];
    for image in images {
        let template = prepare_one(home, store, image, args, &mut chunked, progress)?;
        if let Some(twin) = templates.iter().find(|t| t.platform == template.platform) {
            bail!(
                "two images for {}: {} and another given before it (image digest {}); give one \
                 image per platform",
                template.platform,
                image.path.display(),
                twin.image_digest
            );
        }
        templates.push(template);
    }
    anyhow::ensure!(!templates.is_empty(), "give an image to publish");
    Ok((templates, chunked.change))
}

/// The chunks new to the store, across the images of one publish.
#[derive(Default)]
struct Chunked {
    change: Change,
    seen: HashSet<Digest>,
}

fn prepare_one(
    home: &Home,
    store: &Store,
    image: &Image,
    args: &PublishArgs,
    chunked: &mut Chunked,
    progress: Progress<'_>,
) -> Result<Manifest> {
    let path = &image.path;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening image {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading the size of image {}", path.display()))?;
    if meta.is_dir() {
        bail!(
            "{} is a directory; give the path of the image file",
            path.display()
        );
    }
    let limit = home.config.max_image_mib.saturating_mul(MIB);
    let too_big = |size: u64| {
        anyhow::anyhow!(
            "image {} is {size} bytes, above this hub's limit of {} MiB; raise \
             `max_image_mib` in {} if it is meant to be this large",
            path.display(),
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
        .with_context(|| format!("reading image {}", path.display()))?;
    let header = proto::image::inspect(&prefix, meta.len())
        .with_context(|| format!("inspecting {}", path.display()))?;
    let platform = match image.platform {
        None => header.platforms[0],
        Some(p) if header.platforms.contains(&p) => p,
        Some(p) => {
            let can: Vec<&str> = header.platforms.iter().map(|p| p.name()).collect();
            bail!(
                "{}: its header ({}) boots on {}, not on {p}; give it as {}={}",
                path.display(),
                header.format,
                can.join(" or "),
                can[0],
                path.display()
            )
        }
    };
    progress(&format!(
        "inspected {}: {} for {platform}",
        path.display(),
        header.format
    ));
    file.seek(SeekFrom::Start(0))
        .with_context(|| format!("reading image {}", path.display()))?;
    let mut chunks = vec![];
    let mut distinct = HashSet::new();
    let mut hasher = proto::digest::Hasher::new();
    let (mut size, mut new_bytes, mut reported) = (0u64, 0u64, 0u64);
    for c in proto::chunking::chunks(BufReader::with_capacity(1 << 20, file)) {
        let c = c.with_context(|| format!("reading image {}", path.display()))?;
        hasher.update(&c.data);
        size += c.data.len() as u64;
        if size > limit {
            return Err(too_big(size));
        }
        chunks.push(ChunkRef {
            digest: c.digest,
            size: c.data.len() as u64,
        });
        distinct.insert(c.digest);
        // A chunk repeated inside the image, or shared with another image of this
        // release, is stored and counted once.
        if chunked.seen.insert(c.digest) && !store.has_blob(&c.digest)? {
            new_bytes += c.data.len() as u64;
            let blob = store.write_blob(&c.data)?;
            chunked
                .change
                .put_written(format!("blobs/{}", c.digest.to_hex()), blob);
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
        distinct.len()
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
            probe: HealthProbe::parse(&args.probe, &args.app, &args.version).context("--probe")?,
            probe_timeout_ms: args.probe_timeout_secs * 1000,
            network: args.network,
        },
        staging: Staging::Skipped,
        created_at: 0,
        previous: None,
        rollout: args.rollout.clone(),
    };
    // What a device would refuse, refused here, before anything is signed or staged.
    Manifest {
        release: 1,
        channel: args.channel.clone(),
        ..template.clone()
    }
    .validate()
    .with_context(|| format!("the release of {} is not valid", path.display()))?;
    Ok(template)
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

/// Runs the pipeline for one release of one or more platforms' images. Nothing is signed
/// for the target channel unless staging passed on a staging device of each platform
/// (or was skipped for it); each commit is atomic.
pub fn publish(
    home: &Home,
    images: &[Image],
    args: &PublishArgs,
    progress: Progress<'_>,
) -> Result<Vec<ReleaseInfo>> {
    proto::names::check("app", &args.app)?;
    proto::names::check("channel", &args.channel)?;
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
    if args.hold && images.len() > 1 {
        bail!("--hold takes one image: a held release directory holds one platform's manifest");
    }
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
    let (templates, change) = prepare(home, &store, images, args, progress)?;
    if args.hold {
        let (info, dir) = hold(
            home,
            &store,
            &Part::unstaged(&templates[0]),
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
        return Ok(vec![info]);
    }
    let (to_stage, skipped): (Vec<&Manifest>, Vec<&Manifest>) = templates
        .iter()
        .partition(|t| !args.skips_staging(t.platform));
    for t in &skipped {
        progress(&format!(
            "staging skipped for {} (--no-staging); recorded in the release and the event log",
            t.platform
        ));
    }
    let mut parts: Vec<Part> = skipped.into_iter().map(Part::unstaged).collect();
    let change = if to_stage.is_empty() {
        change
    } else {
        let (staged, evidence) = stage(home, &store, &to_stage, args, change, progress)?;
        parts.extend(staged);
        evidence
    };
    let detail = format!(
        "{} {} ({})",
        args.app,
        args.version,
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
    );
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
) -> Result<(Vec<Part>, Change)> {
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

/// The stored parts of release `release` of (app, channel), ready to sign again elsewhere
/// (promote) or as a newer release (rollback); `passed_only` refuses a platform without
/// staging evidence.
fn stored_parts(
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
