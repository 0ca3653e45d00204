//! `hub publish`.

use anyhow::{Context, Result};
use hub::home::Home;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image (its platform read from its header); or use --image.
    #[arg(required_unless_present = "images", conflicts_with = "images")]
    image: Option<PathBuf>,
    /// PLATFORM=PATH, once per platform of a mixed-arch release (platforms:
    /// qemu-x86_64, qemu-aarch64, xen-x86_64-pvh, xen-arm32).
    #[arg(long = "image", value_name = "PLATFORM=PATH")]
    images: Vec<hub::publish::Image>,
    #[arg(long)]
    app: String,
    #[arg(long)]
    version: semver::Version,
    #[arg(long, default_value = "stable")]
    channel: String,
    #[arg(long, default_value_t = 32)]
    memory_mib: u32,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long, default_value = "")]
    cmdline: String,
    /// `banner` (`READY <app> <version>` on the console), `banner:TEXT`, `tcp:PORT`, or
    /// `http:/PATH` / `http:PORT/PATH` (`GET PATH` on the guest's address answers 200;
    /// needs --network). With --network, `tcp:` dials the guest's address too.
    #[arg(long, default_value = "banner")]
    probe: String,
    #[arg(long, default_value_t = 10)]
    probe_timeout_secs: u64,
    /// The unikernel needs a network interface: each device attaches one where its
    /// `nic` setting says (a libvirt network or a bridge).
    #[arg(long)]
    network: bool,
    /// Publish without the staging gate (recorded in the release and the event log).
    #[arg(long)]
    no_staging: bool,
    /// Skip the staging gate for this platform only (it has no staging device);
    /// repeatable. The other platforms are still staged.
    #[arg(long, value_name = "PLATFORM")]
    no_staging_for: Vec<proto::manifest::Platform>,
    /// How long to wait for the staging devices' verdicts (seconds).
    #[arg(long, default_value_t = 120)]
    staging_timeout_secs: u64,
    /// Store the release unsigned (or signed only with the hub's release key) for
    /// co-signing: each key holder runs `fwtool sign DIR --key KEY`, then `hub release
    /// approve DIR` stores and announces it. For roots whose release threshold is
    /// above 1. Needs --no-staging for now.
    #[arg(long)]
    hold: bool,
    /// Roll out in waves: SHARE%@DELAY,… (e.g. 1%@0,10%@1h,50%@4h,100%@1d). Each
    /// device has a stable seed from its key and installs once the first wave whose
    /// share covers its seed has opened, counted from the signing time. Signed into
    /// the release, so the waves advance with the hub down. Default: everyone at once.
    #[arg(long, value_parser = parse_waves)]
    waves: Option<Waves>,
    /// Halt the release by itself once at least N devices tried it and
    /// --halt-failures of them failed (rolled back after their health probe).
    #[arg(long, value_name = "N")]
    halt_after: Option<u32>,
    /// The share of failed attempts that halts the release (with --halt-after).
    #[arg(long, value_name = "PERCENT", default_value = "50%", value_parser = parse_percent, requires = "halt_after")]
    halt_failures: u8,
    /// Only devices carrying this tag (`device enroll --tag`) install the release;
    /// repeatable, with --target-device: any match is targeted.
    #[arg(long = "target-tag", value_name = "TAG")]
    target_tags: Vec<String>,
    /// Only this device (by enrolled name) installs the release; repeatable.
    #[arg(long = "target-device", value_name = "NAME")]
    target_devices: Vec<String>,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let home = Home::open(dir)?;
    let (images, args) = args.into_pipeline();
    let spinner = publish_spinner()?;
    let mut progress = |line: &str| match &spinner {
        // On a terminal: steps above a live line with the time spent (chunking
        // counts and staging waits only update it).
        Some(bar) => {
            if !line.starts_with("chunking:") {
                bar.println(line);
            }
            bar.set_message(line.to_string());
        }
        None => eprintln!("{line}"),
    };
    let infos = hub::publish::publish(&home, &images, &args, &mut progress);
    if let Some(bar) = &spinner {
        bar.finish_and_clear();
    }
    let infos = infos?;
    let (release, channel) = (infos[0].release, &args.channel);
    if args.hold {
        println!("held {} release {release} on {channel}", args.app);
        return Ok(());
    }
    hub::control::notify(&home, &mut |l| eprintln!("{l}"));
    println!("released {} release {release} on {channel}", args.app);
    for i in &infos {
        println!("  {}: manifest {}", i.track.platform, i.manifest);
    }
    warn_unassigned(&home, &args.rollout.tags);
    Ok(())
}

/// Says which of a release's target tags no device was assigned (`hub enroll --tag`):
/// devices go by assigned tags only, so those reach nobody.
fn warn_unassigned(home: &Home, tags: &[String]) {
    if tags.is_empty() {
        return;
    }
    let list = home
        .store()
        .ok()
        .zip(home.anchor_root().ok())
        .and_then(|(store, root)| hub::trust::revocations(&store, &root).ok().flatten());
    let members = list.and_then(|(l, _)| l.members).unwrap_or_default();
    for t in tags {
        if !members.iter().any(|m| m.tags.contains(t)) {
            eprintln!(
                "warning: no device is assigned tag {t:?}, so it admits none (devices go by \
                 the tags the hub assigns, not by device.toml): `hub enroll DEVICE.pub --name \
                 NAME --tag {t}`"
            );
        }
    }
}

impl Args {
    /// The images and the pipeline's arguments (the rollout signed into the release).
    fn into_pipeline(self) -> (Vec<hub::publish::Image>, hub::publish::PublishArgs) {
        let Args {
            image,
            app,
            version,
            channel,
            memory_mib,
            vcpus,
            cmdline,
            probe,
            probe_timeout_secs,
            network,
            images,
            no_staging,
            no_staging_for,
            staging_timeout_secs,
            hold,
            waves,
            halt_after,
            halt_failures,
            target_tags,
            target_devices,
        } = self;
        let images = match image {
            Some(path) => vec![hub::publish::Image {
                platform: None,
                path,
            }],
            None => images,
        };
        let args = hub::publish::PublishArgs {
            app,
            version,
            channel,
            memory_mib,
            vcpus,
            cmdline,
            probe,
            probe_timeout_secs,
            network,
            no_staging,
            no_staging_for,
            staging_timeout_secs,
            hold,
            rollout: proto::rollout::Rollout {
                waves: waves.map(|w| w.0).unwrap_or_default(),
                tags: target_tags,
                devices: target_devices,
                halt: halt_after.map(|n| proto::rollout::HaltPolicy {
                    min_attempts: n,
                    max_failure_percent: halt_failures,
                }),
            },
            from_source: None,
        };
        (images, args)
    }
}

#[derive(Clone, Debug)]
struct Waves(Vec<proto::rollout::Wave>);

fn parse_waves(s: &str) -> Result<Waves, proto::rollout::BadWaves> {
    proto::rollout::parse_waves(s).map(Waves)
}

/// A `--halt-failures` value that is not a percentage from 1% to 100%.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a percentage from 1% to 100% (write e.g. 20%)")]
struct BadPercent(String);

fn parse_percent(s: &str) -> Result<u8, BadPercent> {
    match s.trim_end_matches('%').parse::<u8>() {
        Ok(n @ 1..=100) => Ok(n),
        _ => Err(BadPercent(s.to_string())),
    }
}

/// A live line for `hub publish` when stderr is a terminal (`None`: plain lines).
fn publish_spinner() -> Result<Option<indicatif::ProgressBar>> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return Ok(None);
    }
    let bar = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
            .context("progress template")?,
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    Ok(Some(bar))
}
