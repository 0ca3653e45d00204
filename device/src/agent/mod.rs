//! `device run`: the agent.
//!
//! Tasks and what each owns:
//! - the libp2p node (in `net`) owns the Swarm;
//! - the MQTT task owns the broker connection;
//! - the **router** owns the event streams: it verifies every announcement before it is
//!   relayed (gossipsub Accept/Reject), keeps re-gossiping the newest verified one per app
//!   so peers that only see peers still learn of it, serves blobs to peers with bounded
//!   concurrency and the upload limit, and hands announcements for our apps to the updater;
//! - the **updater** owns the device state: fetch, verify, assemble, install, activate,
//!   roll back, report. One release at a time.
//!
//! Modules: `router` (announcements in, relaying, seeding), `inbox` (the router's hand-off
//! to the installer), `installer` (the updater's I/O shell: fetch, install, activate, roll
//! back), `supervisor` (the watchdog's I/O shell: a running release that died or stopped
//! answering).

mod activation;
mod inbox;
mod installer;
mod router;
mod supervisor;
#[cfg(test)]
mod tests;

use inbox::Inbox;
use installer::Updater;
use router::{Router, MAX_SEEDING};

use crate::config::Config;
use crate::fetch::Fetcher;
use crate::hypervisor::addresses::BadGuestAddresses;
use crate::hypervisor::Hypervisor;
use crate::metrics::DeviceMetrics;
use crate::mqtt;
use crate::report::Reporter;
use crate::store::{Store, StoreError};
use crate::trust::{Clock, Trust};
use net::ratelimit::RateLimiter;
use proto::announcement::Track;
use proto::root::TrustedRoot;
use proto::SecretKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

/// How long shutdown waits for the agent's tasks: an activation in progress finishes
/// (its probe has a timeout of its own).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How often the updater checks that each app's healthy domain still runs.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// How often the latest status reports are sent again (heartbeat, and catch-up for a hub
/// that was down).
const REPORT_AGAIN: Duration = Duration::from_secs(10);

pub use crate::time::now;

/// Why the device key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading device key {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("device key {} is readable by others; chmod 600 it", .0.display())]
    Exposed(PathBuf),
    #[error("reading device key {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: proto::keys::KeyTextError,
    },
}

/// Why `device run` could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading trust root {}", path.display())]
    ReadRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is not a trust root (replace it with the fleet's root.bin from the hub)",
        path.display()
    )]
    NotARoot {
        path: PathBuf,
        #[source]
        source: Box<proto::VerifyError>,
    },
    #[error("trust root {}", path.display())]
    Root {
        path: PathBuf,
        #[source]
        source: Box<proto::VerifyError>,
    },
    #[error("trust root is for fleet {root:?}, config says {config:?}")]
    WrongFleet { root: String, config: String },
    #[error(transparent)]
    Platform(#[from] proto::manifest::UnknownPlatform),
    #[error(transparent)]
    GuestAddresses(#[from] BadGuestAddresses),
    #[error(transparent)]
    Hosted(#[from] crate::hosted::HostedConfigError),
    #[error("parsing listen address")]
    Listen(#[source] <net::Multiaddr as std::str::FromStr>::Err),
    #[error("parsing peer address {addr}")]
    PeerAddress {
        addr: String,
        #[source]
        source: <net::Multiaddr as std::str::FromStr>::Err,
    },
    #[error("hub address {0} lacks /p2p/<peer id>")]
    HubPeer(String),
    #[error(transparent)]
    Net(#[from] net::StartError),
    #[error(transparent)]
    Mqtt(#[from] net::BrokerUrlError),
    #[error("reading the broker CA {} (broker_ca in device.toml)", path.display())]
    ReadBrokerCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics cannot listen on {addr}")]
    Metrics {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = StartError> = std::result::Result<T, E>;

/// Loads the device key (refusing one readable by others).
pub fn load_key(path: &Path) -> Result<SecretKey, KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let unreadable = |source| KeyError::Read {
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(KeyError::Exposed(path.into()));
    }
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    SecretKey::from_text(&text).map_err(|source| KeyError::Parse {
        path: path.into(),
        source,
    })
}

/// The trust root: the newest one the device accepted (state dir), else the configured one.
fn load_root(cfg: &Config, store: &Store) -> Result<TrustedRoot> {
    let saved = store.dir().join("root.bin");
    let path = if saved.exists() {
        saved
    } else {
        cfg.root.clone()
    };
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(source) => return Err(StartError::ReadRoot { path, source }),
    };
    // A stored root may have expired while the device was off; it is still the anchor,
    // and verification against it refuses releases until a fresh root arrives.
    let claimed =
        proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Root).and_then(|env| {
            let root: proto::root::Root =
                proto::codec::decode(proto::codec::Kind::Root, &env.payload)?;
            Ok(root)
        });
    let claimed = match claimed {
        Ok(root) => root,
        Err(e) => {
            let source = Box::new(e);
            return Err(StartError::NotARoot { path, source });
        }
    };
    let root = match TrustedRoot::bootstrap(&bytes, now().min(claimed.expires_at.saturating_sub(1)))
    {
        Ok(root) => root,
        Err(e) => {
            let source = Box::new(e);
            return Err(StartError::Root { path, source });
        }
    };
    if root.fleet() != cfg.fleet {
        return Err(StartError::WrongFleet {
            root: root.fleet().into(),
            config: cfg.fleet.clone(),
        });
    }
    Ok(root)
}

pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    run_with_metrics(cfg, Arc::new(DeviceMetrics::default()), shutdown).await
}

/// [`run`], keeping its metrics in `metrics` (the fleet benchmark runs many agents in one
/// process and reads them directly).
pub async fn run_with_metrics(
    cfg: Config,
    metrics: Arc<DeviceMetrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if cfg.hosted.is_some() {
        // Before any libvirt connection opens: the hosted host's keepalives need it.
        crate::hypervisor::hosted::start_event_loop();
    }
    let key = load_key(&cfg.key)?;
    let public = key.public();
    let seed = proto::rollout::seed(&public);
    // Every task of the agent is spawned through this tree; shutdown cancels and waits.
    let tasks = net::tasks::Tasks::new();
    let store = Arc::new(Store::open(&cfg.state_dir)?);
    let trust = Arc::new(Trust::new(
        store.dir(),
        load_root(&cfg, &store)?,
        Clock::open(store.dir(), crate::trust::system_now),
    ));
    let platform = cfg.platform()?;

    // The network on a tree of its own, stopped last: the application's tasks answer
    // peers and the hub until they are done.
    let net_tasks = net::tasks::Tasks::new();
    let (net_cfg, hub_peers) = net_config(&cfg, &key, &metrics)?;
    let (net, events) = net::start(net_cfg, &net_tasks)?;
    tracing::info!(peer_id = %net.peer_id(), device = %cfg.name, "device agent starting");

    let (mqtt_tx, mqtt_rx) = mpsc::channel(64);
    let tls = mqtt_tls(&cfg, &key, &net, &hub_peers, &store)?;
    let mqtt_client = start_mqtt(&cfg, platform, tls, mqtt_tx, &tasks)?;
    let broker = mqtt_client.clone();
    let reporter = Arc::new(Reporter::new(
        &cfg,
        key,
        net.clone(),
        mqtt_client,
        &metrics,
        tasks.clone(),
    ));
    serve_metrics(&cfg, &metrics, &tasks).await?;
    let inbox = Arc::new(Inbox::default());
    let (asked_tx, asked_rx) = mpsc::channel(16);
    let router = Router {
        asked: asked_tx,
        cfg: cfg.clone(),
        platform,
        trust: trust.clone(),
        hub: hub_peers.clone(),
        store: store.clone(),
        net: net.clone(),
        updates: inbox.clone(),
        latest: HashMap::new(),
        trickles: HashMap::new(),
        broker,
        phase: crate::fetch::stable_hash(&net.peer_id().to_bytes()) as f64 / u64::MAX as f64,
        seeding: Arc::new(Semaphore::new(MAX_SEEDING)),
        upload: Arc::new(RateLimiter::new(cfg.upload_rate)),
        metrics: metrics.clone(),
        reporter: reporter.clone(),
        tasks: tasks.clone(),
    };
    tasks.spawn(router.run(events, mqtt_rx, asked_rx));
    let updater = Updater {
        seed,
        key: public,
        fetcher: Fetcher::new(
            net.clone(),
            store.clone(),
            hub_peers,
            &cfg,
            metrics.clone(),
            trust.clone(),
            tasks.clone(),
        ),
        hypervisor: Hypervisor::libvirt(&cfg.libvirt_uri, &cfg.domain_type, cfg.guest_addresses()?),
        hosted: cfg
            .hosted
            .as_ref()
            .map(|h| h.hypervisor(&cfg.fleet, &cfg.name))
            .transpose()?,
        cfg,
        platform,
        trust,
        store,
        reporter,
        metrics,
        ondemand: Default::default(),
        free_bytes: Store::free_bytes,
        tasks: tasks.clone(),
    };
    // Graceful: it stops between steps of an install, never in the middle of one.
    tasks.spawn_graceful(updater.run(inbox));
    shutdown.await;
    stop(&tasks, &net_tasks).await;
    Ok(())
}

/// The metrics page, where device.toml asks for one.
async fn serve_metrics(
    cfg: &Config,
    metrics: &Arc<DeviceMetrics>,
    tasks: &net::tasks::Tasks,
) -> Result<()> {
    if let Some(addr) = &cfg.metrics {
        let m = metrics.clone();
        net::metrics::serve(addr, Arc::new(move || m.render()), tasks)
            .await
            .map_err(|source| StartError::Metrics {
                addr: addr.clone(),
                source,
            })?;
    }
    Ok(())
}

/// The application's tasks, then the network: they were answering peers and the hub.
async fn stop(tasks: &net::tasks::Tasks, net_tasks: &net::tasks::Tasks) {
    tracing::info!("shutting down");
    let left = tasks.shutdown(SHUTDOWN_GRACE).await;
    if left > 0 {
        tracing::warn!("{left} task(s) still running after {SHUTDOWN_GRACE:?}; leaving them");
    }
    net_tasks.shutdown(SHUTDOWN_GRACE).await;
    tracing::info!("stopped");
}

/// The libp2p node's settings (its identity derives from the device key, so a device
/// keeps its peer id), and the hub's peer ids.
fn net_config(
    cfg: &Config,
    key: &SecretKey,
    metrics: &DeviceMetrics,
) -> Result<(net::NetConfig, Vec<net::PeerId>)> {
    let mut net_cfg = net::NetConfig::new(net::keypair_from_seed(key.seed()), &cfg.fleet);
    net_cfg.listen = vec![cfg.listen.parse().map_err(StartError::Listen)?];
    net_cfg.idle_timeout = Duration::from_secs(cfg.idle_timeout_secs);
    let mut hub_peers = Vec::new();
    let hubs = cfg.hub.iter().map(|h| (h, true));
    for (p, is_hub) in hubs.chain(cfg.peers.iter().map(|p| (p, false))) {
        let addr: net::Multiaddr = p.parse().map_err(|source| StartError::PeerAddress {
            addr: p.clone(),
            source,
        })?;
        if is_hub {
            hub_peers.push(net::peer_of(&addr).ok_or_else(|| StartError::HubPeer(p.clone()))?);
        }
        net_cfg.bootstrap.push(addr);
    }
    net_cfg.mdns = cfg.mdns;
    net_cfg.state = metrics.net.clone();
    Ok((net_cfg, hub_peers))
}

/// What TLS to the broker needs, when the device has a CA to pin (`broker_ca`).
fn mqtt_tls(
    cfg: &Config,
    key: &SecretKey,
    net: &net::NetClient,
    hubs: &[net::PeerId],
    store: &Store,
) -> Result<Option<mqtt::Tls>> {
    let Some(path) = &cfg.broker_ca else {
        return Ok(None);
    };
    let ca_pem = std::fs::read(path).map_err(|source| StartError::ReadBrokerCa {
        path: path.clone(),
        source,
    })?;
    Ok(Some(mqtt::Tls {
        ca_pem,
        seed: key.seed(),
        cert_file: store.dir().join("mqtt-client.pem"),
        net: net.clone(),
        hubs: hubs.to_vec(),
    }))
}

/// The broker connection, subscribed to our apps' releases and the trust records.
fn start_mqtt(
    cfg: &Config,
    platform: proto::manifest::Platform,
    tls: Option<mqtt::Tls>,
    tx: mpsc::Sender<(String, Vec<u8>)>,
    tasks: &net::tasks::Tasks,
) -> Result<Option<mqtt::Mqtt>> {
    let Some(url) = &cfg.broker else {
        return Ok(None);
    };
    let topics = cfg
        .apps
        .iter()
        .map(|a| net::mqtt_topics::release(&cfg.fleet, &Track::new(a, &cfg.channel, platform)))
        .chain(net::mqtt_topics::trust(&cfg.fleet))
        .collect();
    Ok(Some(mqtt::start(&cfg.name, url, tls, topics, tx, tasks)?))
}

/// Testing aid (`crash_at` in the config): die abruptly, as a kill -9 would. Only with
/// the `test-hooks` feature (a product build refuses the setting).
pub fn crash_point(cfg: &Config, point: &str) {
    if cfg!(feature = "test-hooks") && cfg.crash_at.as_deref() == Some(point) {
        tracing::warn!(point, "crash_at: aborting");
        std::process::abort();
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
