//! `hub`: the unifleet hub's command line.
#![allow(clippy::print_stdout)]

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hub::home::Home;
use hub::store::Event;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "hub",
    version,
    about = "unifleet hub: publish, sign, store and announce unikernel releases"
)]
struct Cli {
    /// The hub's home directory.
    #[arg(long, global = true, default_value = ".", env = "UNIFLEET_HUB")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a hub home in --dir: hub.toml, keys, trust root, git store, deploy repository.
    Init {
        #[arg(long, default_value = "home")]
        fleet: String,
        /// A trust root made offline with `fwtool root init` (production).
        #[arg(long, requires = "timestamp_key")]
        root: Option<PathBuf>,
        /// A release key of --root, if the hub is to sign releases itself (leave it out
        /// when releases are co-signed offline: `hub publish --hold`).
        #[arg(long, requires = "root")]
        release_key: Option<PathBuf>,
        /// The timestamp key of --root: the hub signs announcements' freshness and the
        /// revocation list with it.
        #[arg(long, requires = "root")]
        timestamp_key: Option<PathBuf>,
        /// The rollout key of --root: the hub pauses and halts releases with it (signed
        /// hold lists). Without it `hub rollout pause|halt` and automatic halts are off.
        #[arg(long, requires = "root")]
        rollout_key: Option<PathBuf>,
        /// Where the embedded MQTT broker listens (0.0.0.0:1883 for devices on other
        /// machines).
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt_listen: String,
        /// Where the hub's libp2p node (blobs, gossip, relay) listens
        /// (/ip4/0.0.0.0/tcp/4001 for devices on other machines).
        #[arg(long, default_value = "/ip4/127.0.0.1/tcp/4001")]
        p2p_listen: String,
    },
    /// Run the hub: embedded MQTT broker (or --broker), libp2p, announcements, inventory.
    Serve {
        /// Use this external broker (`mqtt://host:port`) instead of the embedded one.
        #[arg(long)]
        broker: Option<String>,
        /// Serve Prometheus metrics on this address.
        #[arg(long)]
        metrics: Option<String>,
        /// Limit blob uploads to devices to this many bytes per second (default: hub.toml's
        /// `upload_rate`, 0 = unlimited).
        #[arg(long)]
        upload_rate: Option<u64>,
        /// Serve every blob request itself instead of pointing devices at peers that have
        /// the chunk (the hub-only baseline of the fleet benchmark).
        #[arg(long)]
        no_redirect: bool,
        /// Serve the fleet dashboard and its JSON API on this address (e.g.
        /// 127.0.0.1:8080; default: hub.toml's `http`, off). Reading is open to whoever
        /// reaches the address; pausing, halting and resuming need the token in
        /// keys/http.token.
        #[arg(long, value_name = "ADDR")]
        http: Option<String>,
    },
    /// Publish an image: inspect, stage, chunk, sign, store in git, announce. One release
    /// may carry an image for each of several platforms (repeat --image); each device
    /// takes its own platform's.
    Publish {
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
        /// `banner` (`READY <app> <version>` on the console), `banner:TEXT` or `tcp:PORT`.
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
    },
    /// Staged rollouts: where a release stands wave by wave; pause, resume or halt it
    /// (a signed hold list every device honours, with the hub up or down).
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Releases held for co-signing.
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// The trust root: publish the next one to the fleet.
    #[command(subcommand)]
    Root(RootCommand),
    /// Revoke a device: its reports are refused, the hub and every peer stop trading with
    /// it (a signed revocation list that spreads like releases, so it holds with the hub
    /// down).
    Revoke {
        name: String,
        /// Why, for the event log.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The hub's trust state and what needs an operator soon: root expiry, freshness,
    /// held releases, revoked devices.
    Status,
    /// Re-sign the newest release of APP on --from as the next release on --to.
    Promote {
        app: String,
        #[arg(long, default_value = "staging")]
        from: String,
        #[arg(long, default_value = "stable")]
        to: String,
    },
    /// Re-sign an earlier image as a new, higher release (default: the previous image).
    Rollback {
        app: String,
        #[arg(long, default_value = "stable")]
        channel: String,
        /// The version to go back to.
        #[arg(long)]
        to: Option<semver::Version>,
    },
    /// Register a device's public key (from `device enroll`). One key, one name.
    Enroll {
        pubkey: PathBuf,
        #[arg(long)]
        name: String,
        /// Replace the key NAME is enrolled with (a new board, a lost key): the old key's
        /// reports are refused from then on. Recorded in the event log.
        #[arg(long)]
        replace: bool,
    },
    /// List releases of an app (or all).
    Releases {
        app: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List devices as last reported.
    Devices {
        #[arg(long)]
        json: bool,
    },
    /// Show the event log.
    Log {
        #[arg(long)]
        json: bool,
        /// Keep printing new events as they are committed.
        #[arg(long)]
        follow: bool,
    },
    /// Internal: the deploy repository's post-receive hook.
    #[command(hide = true)]
    DeployHook,
}

#[derive(clap::Args, Debug)]
struct RolloutTarget {
    app: String,
    #[arg(long, default_value = "stable")]
    channel: String,
    /// The release (default: the newest on the channel).
    #[arg(long)]
    release: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum RolloutCommand {
    /// The release's waves, when each opens, and its devices per wave by state.
    Status {
        #[command(flatten)]
        target: RolloutTarget,
        #[arg(long)]
        json: bool,
    },
    /// Follow the release until every device it reaches runs it (exit 0) or it is
    /// held (exit 2): progress bars per wave on a terminal, a line per change otherwise.
    Watch {
        #[command(flatten)]
        target: RolloutTarget,
    },
    /// Stop devices that have not installed the release from starting it (devices that
    /// did keep it, and their health-based rollback); `resume` undoes it.
    Pause {
        #[command(flatten)]
        target: RolloutTarget,
        /// Why, for the event log and the devices' status.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Let a paused or halted release go on.
    Resume {
        #[command(flatten)]
        target: RolloutTarget,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Stop the release for good (as the automatic halt does); `resume` can still undo it.
    Halt {
        #[command(flatten)]
        target: RolloutTarget,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// `--waves`, parsed (one value, not a list of values to clap).
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

#[derive(Subcommand, Debug)]
enum ReleaseCommand {
    /// Store and announce a held release once a threshold of release keys signed it.
    Approve {
        /// The held release's directory (printed by `hub publish --hold`).
        held: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum RootCommand {
    /// Make NEW_ROOT (from `fwtool root rotate`, signed by a threshold of the current and
    /// of its own root keys) the fleet's root: kept in the store's chain, announced, and
    /// served link by link to devices that missed rotations.
    Publish {
        new_root: PathBuf,
        /// The hub's new timestamp key, if the new root lists another.
        #[arg(long)]
        timestamp_key: Option<PathBuf>,
        /// The hub's new release key, if the new root lists another.
        #[arg(long)]
        release_key: Option<PathBuf>,
        /// The hub's new rollout key, if the new root lists another.
        #[arg(long)]
        rollout_key: Option<PathBuf>,
    },
}

/// The local UTC offset (seconds east), read once before any thread starts (on Linux the
/// `time` crate reads it only then); UTC if it cannot be read.
static LOCAL_OFFSET: std::sync::OnceLock<i32> = std::sync::OnceLock::new();

/// `at` as local wall-clock time, for people (JSON keeps Unix seconds).
fn local(at: u64) -> String {
    proto::status::local_time(at, *LOCAL_OFFSET.get().unwrap_or(&0))
}

fn main() -> std::process::ExitCode {
    let _ =
        LOCAL_OFFSET.set(time::UtcOffset::current_local_offset().map_or(0, |o| o.whole_seconds()));
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hub: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libp2p=warn,libp2p_gossipsub=error,rumqttd=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn print_event(e: &Event, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(e)?);
    } else {
        let what: Vec<String> = [
            e.app.clone(),
            e.channel.clone(),
            e.release.map(|r| format!("r{r}")),
            e.device.clone(),
        ]
        .into_iter()
        .flatten()
        .collect();
        println!("{} {} {} {}", local(e.at), e.kind, what.join(" "), e.detail);
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let dir = cli.dir;
    match cli.command {
        Command::Init {
            fleet,
            root,
            release_key,
            timestamp_key,
            rollout_key,
            mqtt_listen,
            p2p_listen,
        } => {
            let warning = hub::init::init(
                &dir,
                &hub::init::InitArgs {
                    fleet: &fleet,
                    root: root.as_deref(),
                    release_key: release_key.as_deref(),
                    timestamp_key: timestamp_key.as_deref(),
                    rollout_key: rollout_key.as_deref(),
                    mqtt_listen: &mqtt_listen,
                    p2p_listen: &p2p_listen,
                },
            )?;
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            println!(
                "hub home created in {}; give devices {}",
                dir.display(),
                dir.join("root.bin").display()
            );
        }
        Command::Serve {
            broker,
            metrics,
            upload_rate,
            no_redirect,
            http,
        } => {
            init_tracing();
            let mut home = Home::open(&dir)?;
            if let Some(rate) = upload_rate {
                home.config.upload_rate = rate;
            }
            if no_redirect {
                home.config.redirect = false;
            }
            if broker.is_some() {
                home.config.broker = broker;
            }
            if metrics.is_some() {
                home.config.metrics = metrics;
            }
            if http.is_some() {
                home.config.http = http;
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(hub::serve::serve(home, async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("signal handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }))?;
        }
        Command::Publish {
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
        } => {
            let home = Home::open(&dir)?;
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
            };
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
            if hold {
                println!("held {} release {release} on {channel}", args.app);
                return Ok(());
            }
            hub::control::notify(&home, &mut |l| eprintln!("{l}"));
            println!("released {} release {release} on {channel}", args.app);
            for i in &infos {
                println!("  {}: manifest {}", i.track.platform, i.manifest);
            }
        }
        Command::Rollout(cmd) => rollout(&dir, cmd)?,
        Command::Promote { app, from, to } => {
            let home = Home::open(&dir)?;
            let infos = hub::publish::promote(&home, &app, &from, &to)?;
            hub::control::notify(&home, &mut |l| eprintln!("{l}"));
            println!(
                "promoted {app} to {to} release {} for {}",
                infos[0].release,
                hub::publish::platforms(&infos)
            );
        }
        Command::Rollback { app, channel, to } => {
            let home = Home::open(&dir)?;
            let infos = hub::publish::rollback(&home, &app, &channel, to.as_ref())?;
            hub::control::notify(&home, &mut |l| eprintln!("{l}"));
            println!(
                "rolled {app} back on {channel}: release {} for {}",
                infos[0].release,
                hub::publish::platforms(&infos)
            );
        }
        Command::Enroll {
            pubkey,
            name,
            replace,
        } => {
            let home = Home::open(&dir)?;
            let text = std::fs::read_to_string(&pubkey)
                .with_context(|| format!("reading {}", pubkey.display()))?;
            let key = proto::PublicKey::from_text(&text)
                .with_context(|| format!("reading {}", pubkey.display()))?;
            hub::enroll::enroll(&home, &[(name.clone(), key)], replace)?;
            println!("enrolled {name} (key {})", key.id().short());
        }
        Command::Release(ReleaseCommand::Approve { held }) => {
            let home = Home::open(&dir)?;
            let info = hub::publish::approve(&home, &held)?;
            hub::control::notify(&home, &mut |l| eprintln!("{l}"));
            println!(
                "approved {} release {} on {} for {} (manifest {})",
                info.track.app,
                info.release,
                info.track.channel,
                info.track.platform,
                info.manifest
            );
        }
        Command::Root(RootCommand::Publish {
            new_root,
            timestamp_key,
            release_key,
            rollout_key,
        }) => {
            let home = Home::open(&dir)?;
            let root = hub::trust::publish_root(
                &home,
                &new_root,
                &hub::trust::NewKeys {
                    timestamp: timestamp_key.as_deref(),
                    release: release_key.as_deref(),
                    rollout: rollout_key.as_deref(),
                },
            )?;
            hub::control::reload_trust(&home, &mut |l| eprintln!("{l}"));
            println!(
                "trust root version {} published (expires {}); devices fetch the links they lack from the hub or their peers",
                root.root().version,
                local(root.root().expires_at)
            );
        }
        Command::Revoke { name, reason } => {
            let home = Home::open(&dir)?;
            let list = hub::trust::revoke(&home, &name, &reason)?;
            hub::control::reload_trust(&home, &mut |l| eprintln!("{l}"));
            println!(
                "revoked {name}; revocation list version {} names {} device(s)",
                list.version,
                list.devices.len()
            );
        }
        Command::Status => {
            let home = Home::open(&dir)?;
            for line in hub::trust::status(&home)? {
                println!("{line}");
            }
        }
        Command::Releases { app, json } => {
            let home = Home::open(&dir)?;
            let list: Vec<_> = home
                .store()?
                .releases()?
                .into_iter()
                .filter(|r| app.as_ref().is_none_or(|a| a == &r.track.app))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for r in list {
                    println!(
                        "{} {} release {} {} manifest {}",
                        r.track.app, r.track.channel, r.release, r.track.platform, r.manifest
                    );
                }
            }
        }
        Command::Devices { json } => {
            let home = Home::open(&dir)?;
            let inv = hub::serve::load_inventory(&home);
            let revoked = hub::trust::revocations(&home.store()?, &home.anchor_root()?)?
                .map(|(l, _)| l.devices)
                .unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&inv)?);
            } else {
                let now = hub::home::now();
                for e in inv.values() {
                    let ondemand = e.ondemand.map_or(String::new(), |c| {
                        format!(
                            " on demand: {} local, {} remote, {} boots",
                            c.local, c.remote, c.boots
                        )
                    });
                    let network = e
                        .network
                        .map_or(String::new(), |n| format!(" {}", n.summary()));
                    let tags = if e.tags.is_empty() {
                        String::new()
                    } else {
                        format!(" [{}]", e.tags.join(", "))
                    };
                    println!(
                        "{}{tags} {} release {} {} {} (from peers {}, hub {}; seen {}){network}{ondemand}",
                        e.device,
                        e.app,
                        e.release.map_or("-".into(), |r| r.to_string()),
                        e.state,
                        e.detail,
                        proto::status::human_bytes(e.bytes_from_peers),
                        proto::status::human_bytes(e.bytes_from_hub),
                        proto::status::human_ago(e.last_seen, now)
                    );
                }
                for r in &revoked {
                    println!(
                        "{} REVOKED since {} (key {})",
                        r.name,
                        local(r.at),
                        r.key.id().short()
                    );
                }
            }
        }
        Command::Log { json, follow } => {
            let home = Home::open(&dir)?;
            let mut shown = 0;
            loop {
                let events = home.store()?.events()?;
                for e in events.iter().skip(shown) {
                    print_event(e, json)?;
                }
                shown = events.len();
                if !follow {
                    break;
                }
                // The log lives in git; a new commit is the only signal. Poll it.
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        Command::DeployHook => {
            let home = Home::open(&dir)?;
            let stdin = std::io::stdin();
            hub::deploy::hook(&home, stdin.lock(), &mut |line| println!("{line}"))?;
        }
    }
    Ok(())
}

fn rollout(dir: &std::path::Path, cmd: RolloutCommand) -> Result<()> {
    use hub::rollout::HoldChange;
    use proto::rollout::HoldKind;
    let home = Home::open(dir)?;
    let (target, change, reason) = match cmd {
        RolloutCommand::Status { target, json } => {
            let s = hub::rollout::status(&home, &target.app, &target.channel, target.release)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_rollout(&s);
            }
            return Ok(());
        }
        RolloutCommand::Watch { target } => return rollout_watch(&home, &target),
        RolloutCommand::Pause { target, reason } => {
            (target, HoldChange::Hold(HoldKind::Paused), reason)
        }
        RolloutCommand::Halt { target, reason } => {
            (target, HoldChange::Hold(HoldKind::Halted), reason)
        }
        RolloutCommand::Resume { target, reason } => (target, HoldChange::Resume, reason),
    };
    let (release, list) = hub::rollout::operator_change(
        &home,
        &target.app,
        &target.channel,
        target.release,
        change,
        &reason,
    )?;
    hub::control::reload_trust(&home, &mut |l| eprintln!("{l}"));
    let verb = match change {
        HoldChange::Hold(k) => k.label(),
        HoldChange::Resume => "resumed",
    };
    println!(
        "{} release {} on {} {verb} (hold list version {})",
        release.app, release.release, release.channel, list.version
    );
    Ok(())
}

fn print_rollout(s: &hub::rollout::RolloutStatus) {
    let now = hub::home::now();
    println!(
        "{} release {} on {}: waves {}, {} of seeds admitted now; signed {}",
        s.release.app,
        s.release.release,
        s.release.channel,
        s.waves,
        proto::rollout::share_text(s.admitted),
        hub::trust::human_ago(s.created_at, now)
    );
    if !s.targets.is_empty() {
        println!(
            "  targets {} ({} device(s) of the channel not targeted)",
            s.targets.join(", "),
            s.not_targeted
        );
    }
    if let Some(p) = s.halt_policy {
        println!(
            "  halts by itself at {}% failed of at least {} attempts",
            p.max_failure_percent, p.min_attempts
        );
    }
    if let Some(h) = &s.hold {
        println!(
            "  {} {}: {}",
            h.kind.label().to_uppercase(),
            hub::trust::human_ago(h.at, now),
            h.reason
        );
    }
    for w in &s.waves_detail {
        let opens = if w.opens_at <= now {
            format!("opened {}", hub::trust::human_ago(w.opens_at, now))
        } else {
            format!("opens in {}", hub::trust::human_secs(w.opens_at - now))
        };
        println!(
            "  wave to {:>7} {opens}: {} pending, {} downloading, {} active, {} failed, {} rolled back",
            proto::rollout::share_text(w.basis_points),
            w.pending,
            w.downloading,
            w.active,
            w.failed,
            w.rolled_back
        );
    }
}

/// `hub rollout watch`: polls the rollout once a second (the hub writes its inventory as
/// often).
fn rollout_watch(home: &Home, target: &RolloutTarget) -> Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let bars = indicatif::MultiProgress::new();
    let style =
        indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")
            .context("progress bar template")?
            .progress_chars("=> ");
    let mut shown: Vec<indicatif::ProgressBar> = vec![];
    let mut last = String::new();
    loop {
        let s = hub::rollout::status(home, &target.app, &target.channel, target.release)?;
        let now = hub::home::now();
        let (mut total, mut active) = (0, 0);
        let mut lines = vec![];
        for (i, w) in s.waves_detail.iter().enumerate() {
            let n = w.total();
            total += n;
            active += w.active;
            let opens = if w.opens_at <= now {
                "open".to_string()
            } else {
                format!("opens {}", proto::status::human_ago(w.opens_at, now))
            };
            let msg = format!(
                "{opens}; {} pending, {} downloading, {} failed, {} rolled back",
                w.pending, w.downloading, w.failed, w.rolled_back
            );
            if tty {
                if shown.len() <= i {
                    let bar = bars.add(indicatif::ProgressBar::new(0));
                    bar.set_style(style.clone());
                    bar.set_prefix(format!("to {}", proto::rollout::share_text(w.basis_points)));
                    shown.push(bar);
                }
                shown[i].set_length(u64::from(n));
                shown[i].set_position(u64::from(w.active));
                shown[i].set_message(msg);
            } else {
                lines.push(format!(
                    "wave to {}: {}/{n} active, {msg}",
                    proto::rollout::share_text(w.basis_points),
                    w.active
                ));
            }
        }
        let text = lines.join("; ");
        if !tty && text != last {
            println!("{} release {}: {text}", s.release.app, s.release.release);
            last = text;
        }
        if let Some(h) = &s.hold {
            bars.clear().ok();
            anyhow::bail!(
                "{} release {} is {}: {}",
                s.release.app,
                s.release.release,
                h.kind.label(),
                h.reason
            );
        }
        let all_open = s.waves_detail.iter().all(|w| w.opens_at <= now);
        if all_open && total > 0 && active == total {
            for b in &shown {
                b.finish();
            }
            println!(
                "{} release {} runs on all {total} device(s) it reaches",
                s.release.app, s.release.release
            );
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
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
