//! `hub serve`: the long-running hub.
//!
//! One owner per resource: the libp2p node (in `net`), the MQTT event loop (`mqtt`), the
//! git store (a writer and a reader thread, [`crate::store_owner`]), and the hub's loop
//! (`hub`), which owns the inventory, the trust, the blob service and the announcer
//! (`announce`) and routes events between them. Announcing runs on start, on request
//! from the control socket (`commands`), and every few seconds so a broker that was down
//! learns the releases when it returns. Whether a device's report is taken is decided by
//! `accept`, pure.

mod accept;
mod announce;
mod batch;
mod commands;
mod hub;
mod mqtt;
mod trust;

pub use crate::inventory::{load_devices, load_inventory, DeviceEntry, Inventory};
pub use mqtt::MqttError;
pub use trust::TrustError;

use crate::home::Home;
use crate::metrics::Metrics;
use crate::store_owner::OwnerError;
use announce::Announcer;
use hub::{Hub, Inputs, Parts};
use net::NetEvent;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long shutdown waits for the hub's tasks to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why `hub serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] crate::store_owner::StartError),
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("reading enrolled devices")]
    Devices(#[from] OwnerError),
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error("parsing p2p_listen")]
    P2pListen(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The hub's libp2p key.
    #[error(transparent)]
    P2pKey(#[from] crate::home::KeyError),
    #[error(transparent)]
    Net(#[from] net::StartError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Dashboard(#[from] crate::dashboard::DashboardError),
    #[error("binding {}", path.display())]
    Control {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The libp2p node, on a task tree of its own (stopped last: the hub's tasks answer peers
/// until they are done).
struct Node {
    net: net::NetClient,
    events: mpsc::Receiver<NetEvent>,
    tasks: net::tasks::Tasks,
    state: Arc<net::NetState>,
}

/// The sockets `hub serve` answers on that it binds itself (libp2p, the broker and the
/// metrics page bind by address): bound before anything starts, so a taken address stops
/// the hub at once, and a caller may bind them (port 0) and hand them to [`run`].
#[derive(Debug)]
pub struct Listeners {
    /// `HUB/hub.sock`, the control socket.
    pub control: tokio::net::UnixListener,
    /// The dashboard (`--http`), if asked for.
    pub http: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Binds what `home` asks for (a stale control socket is replaced).
    pub async fn bind(home: &Home) -> Result<Listeners, ServeError> {
        let control = commands::bind(home).map_err(|source| ServeError::Control {
            path: home.socket(),
            source,
        })?;
        let http = match &home.config.http {
            Some(addr) => Some(crate::dashboard::bind(addr).await?),
            None => None,
        };
        Ok(Listeners { control, http })
    }
}

/// Runs the hub until `shutdown` resolves, on the listeners `home` asks for. Prints its
/// libp2p address on stdout.
pub async fn serve(
    home: Home,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listeners = Listeners::bind(&home).await?;
    let socket = home.socket();
    let ran = run(home, listeners, shutdown).await;
    if ran.is_err() {
        // Nobody will answer on it.
        let _ = std::fs::remove_file(socket);
    }
    ran
}

/// Runs the hub on `listeners` until `shutdown` resolves.
pub async fn run(
    home: Home,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let store = crate::store_owner::start(&home)?;
    let trust = trust::Trust::load(&home, &store.reader).await?;
    // Every task below is spawned through this tree; shutdown cancels and waits for it.
    let tasks = net::tasks::Tasks::new();
    let devices = store.reader.devices().await?;
    let ca = Arc::new(crate::broker::pki::BrokerCa::open(&home).map_err(mqtt::MqttError::Pki)?);
    let (enrolled, enrolled_rx) = tokio::sync::watch::channel(trust.enrolled(&devices));
    let mqtt = mqtt::start(&home, &ca, enrolled_rx, &tasks)?;
    let node = start_net(&home)?;
    let metrics = Arc::new(Metrics {
        broker: mqtt.broker,
        ..Metrics::default()
    });
    let inventory = load_inventory(&home);
    let (published, live) = tokio::sync::watch::channel(Arc::new(inventory.clone()));
    start_pages(&home, &metrics, &node, (listeners.http, live), &tasks).await?;
    let mut blobs = crate::blobs::Blobs::new(
        node.net.clone(),
        store.reader.clone(),
        metrics.clone(),
        home.config.upload_rate,
        home.config.redirect,
        tasks.clone(),
    );
    blobs.set_broker_ca(ca);
    tasks.spawn(crate::mirror::run(
        home.clone(),
        metrics.clone(),
        tasks.clone(),
    ));
    let announcer = Announcer::new(
        node.net.clone(),
        mqtt.client,
        &home.config.fleet,
        metrics.clone(),
    );
    let mut hub = Hub::new(Parts {
        home: home.clone(),
        net: node.net.clone(),
        store,
        devices,
        inventory,
        published,
        trust,
        metrics,
        blobs,
        announcer,
        enrolled,
    });
    let control = commands::listen(listeners.control, &tasks);
    let inputs = Inputs {
        mqtt: mqtt.received,
        events: node.events,
        control,
    };
    hub.run(shutdown, inputs).await;
    // In order: the tasks that use the network and the store stop, what was accepted is
    // written, then the network goes.
    tracing::info!("shutting down");
    let left = tasks.shutdown(SHUTDOWN_GRACE).await;
    if left > 0 {
        tracing::warn!("{left} task(s) still running after {SHUTDOWN_GRACE:?}; leaving them");
    }
    hub.flush_all().await;
    node.tasks.shutdown(SHUTDOWN_GRACE).await;
    let _ = std::fs::remove_file(home.socket());
    tracing::info!("stopped");
    Ok(())
}

/// The libp2p node: listening where `hub.toml` says, a relay if asked.
fn start_net(home: &Home) -> Result<Node, ServeError> {
    let seed = home.p2p_seed()?;
    let mut cfg = net::NetConfig::new(net::keypair_from_seed(seed), &home.config.fleet);
    cfg.listen = vec![home
        .config
        .p2p_listen
        .parse()
        .map_err(|e| ServeError::P2pListen(Box::new(e)))?];
    cfg.max_inbound_per_peer = 16;
    cfg.relay_server = home.config.relay;
    let state = cfg.state.clone();
    let tasks = net::tasks::Tasks::new();
    let (net, events) = net::start(cfg, &tasks)?;
    Ok(Node {
        net,
        events,
        tasks,
        state,
    })
}

/// The metrics page and the dashboard, where `hub.toml` asks for them.
async fn start_pages(
    home: &Home,
    metrics: &Arc<Metrics>,
    node: &Node,
    (http, inventory): (
        Option<tokio::net::TcpListener>,
        crate::dashboard::LiveInventory,
    ),
    tasks: &net::tasks::Tasks,
) -> Result<(), ServeError> {
    if let Some(addr) = &home.config.metrics {
        crate::metrics::start(addr, metrics.clone(), node.state.clone(), tasks).await?;
    }
    if let Some(listener) = http {
        crate::dashboard::start(listener, home.clone(), inventory, tasks)?;
    }
    Ok(())
}
