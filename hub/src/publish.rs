//! The publish pipeline: inspect, stage, chunk, sign, commit, announce.

use crate::home::{now, Home};
use crate::store::{release_path, Change, Event, ReleaseInfo};
use anyhow::{bail, Context, Result};
use proto::announcement::Announcement;
use proto::manifest::{
    verify_manifest, BootSpec, ChunkRef, Expectations, HealthProbe, Manifest, Staging,
};
use proto::Digest;
use std::io::{BufReader, Read};
use std::path::Path;

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
    pub no_staging: bool,
}

fn parse_probe(text: &str, app: &str, version: &semver::Version) -> Result<HealthProbe> {
    Ok(match text.split_once(':') {
        None if text == "banner" => HealthProbe::ConsoleBanner {
            line: Manifest::ready_banner(app, version),
        },
        Some(("banner", line)) => HealthProbe::ConsoleBanner { line: line.into() },
        Some(("tcp", port)) => HealthProbe::TcpConnect {
            port: port
                .parse()
                .with_context(|| format!("bad probe port {port:?}"))?,
        },
        _ => bail!("unknown probe {text:?}: use banner, banner:TEXT or tcp:PORT"),
    })
}

/// Progress lines for a terminal or a git push.
pub type Progress<'a> = &'a mut dyn FnMut(&str);

/// Runs the pipeline. Nothing is written to the store unless every step before the
/// commit succeeded; the commit is atomic.
pub fn publish(
    home: &Home,
    image: &Path,
    args: &PublishArgs,
    progress: Progress<'_>,
) -> Result<ReleaseInfo> {
    proto::names::check("app", &args.app).map_err(anyhow::Error::msg)?;
    proto::names::check("channel", &args.channel).map_err(anyhow::Error::msg)?;
    // 1. inspect
    let mut prefix = Vec::new();
    std::fs::File::open(image)
        .with_context(|| format!("opening image {}", image.display()))?
        .take(proto::image::INSPECT_PREFIX as u64)
        .read_to_end(&mut prefix)?;
    let header = proto::image::inspect(&prefix)
        .with_context(|| format!("inspecting {}", image.display()))?;
    let platform = header.platforms[0];
    progress(&format!(
        "inspected {}: {} for {platform}",
        image.display(),
        header.format
    ));

    let store = home.store()?;
    let root = home.trusted_root()?;
    let key = home.release_key()?;
    let latest = store.latest(&args.app, &args.channel)?;
    let release = latest.as_ref().map_or(1, |l| l.release + 1);
    if let Some(l) = &latest {
        let prev = store
            .read(&release_path(
                &args.app,
                &args.channel,
                l.release,
                "manifest",
            ))?
            .context("latest manifest")?;
        let env = proto::envelope::Envelope::decode(&prev, proto::codec::Kind::Manifest)?;
        let prev: Manifest = env.open("release", &root.root().release)?;
        if args.version <= prev.version {
            bail!(
                "version {} is not above {} (release {}) on {}/{}",
                args.version,
                prev.version,
                l.release,
                args.app,
                args.channel
            );
        }
    }

    // 2. staging gate
    let staging = if args.no_staging {
        progress("staging skipped (--no-staging); recorded in the release and the event log");
        Staging::Skipped
    } else {
        bail!("the staging gate needs a staging device, which this hub does not run yet; pass --no-staging to publish without it")
    };

    // 3. chunk and sign
    let file = std::fs::File::open(image)?;
    let mut change = Change::default();
    let mut chunks = vec![];
    let mut hasher = proto::digest::Hasher::new();
    let mut size = 0u64;
    let mut new_bytes = 0u64;
    for c in proto::chunking::chunks(BufReader::with_capacity(1 << 20, file)) {
        let c = c.with_context(|| format!("reading {}", image.display()))?;
        hasher.update(&c.data);
        size += c.data.len() as u64;
        chunks.push(ChunkRef {
            digest: c.digest,
            size: c.data.len() as u64,
        });
        if !store.has_blob(&c.digest)? {
            new_bytes += c.data.len() as u64;
            change.put(format!("blobs/{}", c.digest.to_hex()), c.data);
        }
    }
    progress(&format!(
        "chunked {size} bytes into {} chunks ({new_bytes} bytes new)",
        chunks.len()
    ));
    let created_at = now();
    let manifest = Manifest {
        fleet: home.config.fleet.clone(),
        app: args.app.clone(),
        version: args.version.clone(),
        release,
        channel: args.channel.clone(),
        platform,
        image_digest: hasher.finalize(),
        image_size: size,
        chunks,
        boot: BootSpec {
            memory_mib: args.memory_mib,
            vcpus: args.vcpus,
            cmdline: args.cmdline.clone(),
            probe: parse_probe(&args.probe, &args.app, &args.version)?,
            probe_timeout_ms: args.probe_timeout_secs * 1000,
        },
        staging: staging.clone(),
        created_at,
        expires_at: created_at + home.config.release_expiry_days * 24 * 3600,
        previous: latest.as_ref().map(|l| l.manifest),
    };
    let mut env = manifest.seal()?;
    env.sign(&key)?;
    let manifest_bytes = env.encode()?;
    // Check our own work with the same entry point devices use.
    let verified = verify_manifest(
        &manifest_bytes,
        &root,
        &Expectations {
            app: Some(&args.app),
            channel: &args.channel,
            platform,
            installed_release: latest.as_ref().map(|l| l.release),
            now: now(),
        },
    )
    .context("the signed manifest does not verify against the hub's trust root")?;
    let mut ann = Announcement::for_manifest(&verified).seal()?;
    ann.sign(&key)?;
    let digest = Digest::of(&manifest_bytes);
    progress(&format!(
        "signed release {release} (manifest {})",
        digest.short()
    ));

    // 4. commit (one commit: manifest, signatures, chunks, announcement, event)
    change.put(format!("blobs/{}", digest.to_hex()), manifest_bytes.clone());
    change.put(
        release_path(&args.app, &args.channel, release, "manifest"),
        manifest_bytes,
    );
    change.put(
        release_path(&args.app, &args.channel, release, "announcement"),
        ann.encode()?,
    );
    change.event(Event {
        at: now(),
        kind: "publish".into(),
        app: Some(args.app.clone()),
        channel: Some(args.channel.clone()),
        release: Some(release),
        device: None,
        detail: format!(
            "{} {} ({platform}, {size} bytes){}",
            args.app,
            args.version,
            if matches!(staging, Staging::Skipped) {
                ", staging skipped (--no-staging)"
            } else {
                ""
            }
        ),
    });
    store.commit(
        &format!(
            "publish {} {} as release {release} on {}",
            args.app, args.version, args.channel
        ),
        &change,
        Some(&format!("{}/v{}", args.app, args.version)),
    )?;
    progress(&format!(
        "stored release {release} in the git store, tagged {}/v{}",
        args.app, args.version
    ));
    Ok(ReleaseInfo {
        app: args.app.clone(),
        channel: args.channel.clone(),
        release,
        manifest: digest,
    })
}
