//! `device`: enroll a device, run the agent, show its status.
#![allow(clippy::print_stdout)]

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use device::config::Config;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "device", version, about = "unifleet device agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create this device's key and configuration in DIR, and print the public key to
    /// register with `hub enroll`.
    Enroll(Box<EnrollArgs>),
    /// Run the agent until interrupted.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// What is installed and running, from the state directory.
    Status {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
struct EnrollArgs {
    /// Directory for device.key, device.pub, device.toml, root.bin and (unless
    /// --state-dir) state/.
    #[arg(long)]
    dir: PathBuf,
    /// Where the agent keeps chunks, images and its state: the packaged agent's is
    /// /var/lib/unifleet (default: DIR/state; a relative path is taken from DIR).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Device name, unique in the fleet.
    #[arg(long)]
    name: String,
    /// The fleet's trust root (copied into DIR).
    #[arg(long)]
    root: PathBuf,
    #[arg(long, default_value = "stable")]
    channel: String,
    /// App to run (repeat).
    #[arg(long = "app")]
    apps: Vec<String>,
    /// A group this device says it belongs to (repeat: `--tag kitchen --tag beta`), kept
    /// in device.toml as `tags` and shown to the operator in its reports. Releases target
    /// the tags the hub assigns (`hub enroll --tag`), not these.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// The hub's libp2p address, `/ip4/…/tcp/…/p2p/<peer id>` (printed by `hub serve`).
    #[arg(long)]
    hub: Option<String>,
    /// Other peers to dial at start (repeat).
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// MQTT broker: `mqtts://host:port` (TLS, the hub's broker beyond loopback; needs
    /// --broker-ca) or `mqtt://127.0.0.1:port` (plaintext, a broker on this machine).
    #[arg(long)]
    broker: Option<String>,
    /// The fleet's broker CA, `broker-ca.pem` from the hub's directory (copied into DIR):
    /// the one CA an `mqtts://` broker is checked against. The device's own client
    /// certificate is asked of the hub when it first connects.
    #[arg(long, value_name = "PEM")]
    broker_ca: Option<PathBuf>,
    #[arg(long, default_value = "test:///default")]
    libvirt: String,
    #[arg(long, default_value = "qemu-x86_64")]
    platform: String,
    /// Where to listen for peers (every interface, a port chosen at start, by default).
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
    listen: String,
    /// Do not look for LAN neighbours by mDNS (for many agents sharing one host, where
    /// every agent would find every other one, of any fleet).
    #[arg(long)]
    no_mdns: bool,
    /// Replace an existing configuration and key.
    #[arg(long)]
    force: bool,
}

/// A trust root file: its bytes and what it claims (checked to bootstrap from).
fn read_root(root: &std::path::Path) -> Result<(Vec<u8>, proto::root::Root)> {
    let root_bytes =
        std::fs::read(root).with_context(|| format!("reading trust root {}", root.display()))?;
    let env = proto::envelope::Envelope::decode(&root_bytes, proto::codec::Kind::Root)
        .with_context(|| format!("{} is not a trust root", root.display()))?;
    let claimed: proto::root::Root =
        proto::codec::decode(proto::codec::Kind::Root, &env.payload)
            .with_context(|| format!("{} is not a trust root", root.display()))?;
    proto::root::TrustedRoot::bootstrap(&root_bytes, device::agent::now())
        .with_context(|| format!("trust root {}", root.display()))?;
    Ok((root_bytes, claimed))
}

/// The fleet's broker CA certificate, checked to be one.
fn read_broker_ca(path: &std::path::Path) -> Result<Vec<u8>> {
    let pem =
        std::fs::read(path).with_context(|| format!("reading broker CA {}", path.display()))?;
    anyhow::ensure!(
        !net::broker_tls::certs(&pem).is_empty(),
        "{} holds no PEM certificate: give the hub's broker-ca.pem",
        path.display()
    );
    Ok(pem)
}

/// A new device key from the OS's randomness, written readable by its owner only.
fn write_new_key(path: &std::path::Path) -> Result<proto::SecretKey> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("reading OS randomness: {e}"))?;
    let key = proto::SecretKey::from_seed(seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(key.to_text().as_bytes())?;
    f.sync_all()?;
    Ok(key)
}

/// The tags the hub assigned this device, from the revocation list the agent keeps (it
/// verified it before keeping it).
fn assigned_tags(state_dir: &std::path::Path, key: &proto::PublicKey) -> Vec<String> {
    use proto::codec::Kind;
    std::fs::read(state_dir.join("revocations.bin"))
        .ok()
        .and_then(|bytes| proto::envelope::Envelope::decode(&bytes, Kind::Revocations).ok())
        .and_then(|env| {
            proto::codec::decode::<proto::revocation::Revocations>(Kind::Revocations, &env.payload)
                .ok()
        })
        .map(|list| list.tags_of(key).to_vec())
        .unwrap_or_default()
}

/// `--tag`s a device may carry: names, at most [`proto::status::MAX_TAGS`].
fn check_tags(tags: &[String]) -> Result<()> {
    for t in tags {
        proto::names::check("tag", t).map_err(|e| anyhow::anyhow!("--tag {t:?}: {e}"))?;
    }
    anyhow::ensure!(
        tags.len() <= proto::status::MAX_TAGS,
        "{} tags given; a device may carry at most {}",
        tags.len(),
        proto::status::MAX_TAGS
    );
    Ok(())
}

fn enroll(args: EnrollArgs) -> Result<()> {
    let EnrollArgs {
        dir,
        state_dir,
        name,
        root,
        channel,
        apps,
        tags,
        hub,
        peers,
        broker,
        broker_ca,
        libvirt,
        platform,
        listen,
        no_mdns,
        force,
    } = args;
    let cfg_path = dir.join("device.toml");
    anyhow::ensure!(
        force || !cfg_path.exists(),
        "{} already exists; pass --force to replace it",
        cfg_path.display()
    );
    check_tags(&tags)?;
    let (root_bytes, claimed) = read_root(&root)?;
    let ca_pem = broker_ca.as_deref().map(read_broker_ca).transpose()?;
    let cfg = Config {
        name,
        fleet: claimed.fleet,
        channel,
        apps,
        tags,
        platform,
        root: "root.bin".into(),
        key: "device.key".into(),
        state_dir: state_dir.clone().unwrap_or_else(|| "state".into()),
        broker,
        broker_ca: ca_pem.as_ref().map(|_| "broker-ca.pem".into()),
        hub,
        peers,
        listen,
        mdns: !no_mdns,
        libvirt_uri: libvirt,
        domain_type: "auto".into(),
        nic: "network=default".into(),
        probe_every_secs: device::watchdog::PROBE_EVERY.as_secs(),
        guest_addresses: None,
        download_rate: 0,
        upload_rate: 0,
        parallel_fetches: 4,
        peer_exchange: true,
        idle_timeout_secs: net::IDLE_TIMEOUT.as_secs(),
        metrics: None,
        store_budget_mib: 0,
        crash_at: None,
        ondemand: vec![],
        hosted: None,
    };
    // Everything is checked before anything is written: a refused enrollment leaves no
    // key, public key or root behind (it left all three).
    cfg.validate()?;
    let state = dir.join(&cfg.state_dir);
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let key = write_new_key(&dir.join("device.key"))?;
    std::fs::write(dir.join("device.pub"), key.public().to_text())?;
    std::fs::write(dir.join("root.bin"), &root_bytes)?;
    if let Some(pem) = &ca_pem {
        std::fs::write(dir.join("broker-ca.pem"), pem)?;
    }
    std::fs::write(&cfg_path, toml::to_string_pretty(&cfg)?)?;
    println!(
        "enrolled {} in {}\npublic key: {}register it on the hub with: hub enroll {} --name {}",
        cfg.name,
        dir.display(),
        key.public().to_text(),
        dir.join("device.pub").display(),
        cfg.name
    );
    Ok(())
}

fn status(config: PathBuf, json: bool) -> Result<()> {
    let cfg = Config::load(&config)?;
    let store = device::store::Store::open(&cfg.state_dir)?;
    let state = store.load_state()?;
    let reports: serde_json::Value = std::fs::read(cfg.state_dir.join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "device": cfg.name, "state": state, "reports": reports })
            )?
        );
        return Ok(());
    }
    let key = device::agent::load_key(&cfg.key)?;
    let seed = proto::rollout::seed(&key.public());
    let assigned = assigned_tags(&cfg.state_dir, &key.public());
    let tags = match (assigned.is_empty(), cfg.tags.is_empty()) {
        (true, true) => String::new(),
        (false, _) => format!(", tags {} (assigned)", assigned.join(", ")),
        (true, false) => format!(", no tags assigned (declares {})", cfg.tags.join(", ")),
    };
    println!(
        "device {} (fleet {}, channel {}{tags}; in rollout waves of {} or more)",
        cfg.name,
        cfg.fleet,
        cfg.channel,
        proto::rollout::share_text(seed + 1)
    );
    let now = device::agent::now();
    for app in &cfg.apps {
        let st = state.apps.get(app).cloned().unwrap_or_default();
        let cur = st.current.as_ref().map_or("nothing".to_string(), |c| {
            let accel = match &c.accel {
                Some(a) => format!(" under {} ({})", a.domain_type, a.why),
                None => String::new(),
            };
            format!("release {} ({}){accel}", c.release, c.version)
        });
        let report = reports
            .get(app)
            .map(|r| serde_json::from_value::<proto::status::StatusReport>(r.clone()));
        let last = match &report {
            None => "none yet".into(),
            Some(Ok(r)) => format!(
                "{} ({})",
                r.state.describe(now),
                proto::status::human_ago(r.at, now)
            ),
            // Written by an older agent: shown as it is.
            Some(Err(_)) => reports[app]["state"].to_string(),
        };
        let failed = if st.failed.is_empty() {
            String::new()
        } else {
            format!("; failed here before: releases {:?}", st.failed)
        };
        println!("  {app}: running {cur}; last report: {last}{failed}");
        if let Some(Ok(r)) = &report {
            if let Some(c) = r.ondemand {
                println!("    on demand: {}", c.summary());
            }
            if let Some(h) = &r.hosted {
                println!("    hosted: {}", h.summary());
            }
        }
    }
    // Every app's report carries the same network counts; the newest one's.
    let network = reports
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(|r| {
            serde_json::from_value::<proto::status::NetworkCounts>(r.get("network")?.clone()).ok()
        })
        .max_by_key(|n| n.bytes_lan + n.bytes_direct + n.bytes_relayed + n.bytes_hub);
    if let Some(n) = network {
        println!("  network: {}", n.summary());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Enroll(args) => enroll(*args),
        Command::Run { config } => run(config),
        Command::Status { config, json } => status(config, json),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("device: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(config: PathBuf) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libp2p=warn,libp2p_gossipsub=error".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cfg = Config::load(&config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    Ok(rt.block_on(device::agent::run(cfg, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }))?)
}
