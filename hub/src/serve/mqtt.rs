//! The hub's MQTT client: one task owns the event loop, reconnects with backoff,
//! subscribes to every device's status topic, and hands each publish to the hub's loop.
//! Unless `hub.toml` names a broker, the embedded one is started first (TLS beyond
//! loopback).

use crate::broker::pki::BrokerCa;
use crate::broker::{self, BrokerMetrics, Enrolled, Listen};
use crate::home::Home;
use net::broker_tls::{mqtt_options, BrokerUrl};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// A publish received: (topic, payload).
pub(super) type Received = (String, Vec<u8>);

/// Why the MQTT client could not start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error(transparent)]
    Url(#[from] net::BrokerUrlError),
    #[error("mqtt_listen = {0:?} is not an address to listen on")]
    Listen(String),
    #[error("the broker CA")]
    Pki(#[from] broker::pki::PkiError),
}

/// The hub's client, what it receives, and the embedded broker's counters (if embedded).
pub(super) struct Mqtt {
    pub client: AsyncClient,
    pub received: mpsc::Receiver<Received>,
    pub broker: Option<Arc<BrokerMetrics>>,
}

/// Starts the embedded broker unless `hub.toml` names one, and the client task.
pub(super) fn start(
    home: &Home,
    ca: &BrokerCa,
    enrolled: watch::Receiver<Enrolled>,
    tasks: &net::tasks::Tasks,
) -> Result<Mqtt, MqttError> {
    let client_id = format!("unifleet-hub-{}", home.config.fleet);
    let now = crate::home::now();
    let (mut opts, metrics) = match &home.config.broker {
        Some(url) => {
            let url = BrokerUrl::parse(url)?;
            let tls = url.tls.then(|| ca.hub_client(now)).transpose()?;
            (mqtt_options(&client_id, &url, tls), None)
        }
        None => {
            let listen = &home.config.mqtt_listen;
            let at = listen
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| MqttError::Listen(listen.clone()))?;
            let tls = home.config.mqtt_tls.unwrap_or(!at.ip().is_loopback());
            if tls && home.config.mqtt_tls.is_none() {
                // A hub.toml from before TLS: its devices' plaintext mqtt:// now fails.
                tracing::warn!(
                    "the MQTT broker on {listen} takes TLS only (beyond loopback): devices \
                     need --broker mqtts://… --broker-ca {}; set mqtt_tls = true in \
                     hub.toml to say so",
                    crate::broker::pki::ca_path(&home.dir).display()
                );
            }
            let names: Vec<String> = (!at.ip().is_unspecified())
                .then(|| at.ip().to_string())
                .into_iter()
                .collect();
            let server = tls.then(|| ca.server_config(&names, now)).transpose()?;
            let listen = Listen {
                addr: listen.clone(),
                tls: server.map(Arc::new),
            };
            let b = broker::start(
                listen,
                &home.config.fleet,
                enrolled,
                Default::default(),
                tasks,
            )?;
            let url = BrokerUrl {
                host: reachable(b.addr).ip().to_string(),
                port: b.addr.port(),
                tls,
            };
            let mut opts = mqtt_options(
                &client_id,
                &url,
                tls.then(|| ca.hub_client(now)).transpose()?,
            );
            if !tls {
                opts.set_credentials(broker::HUB_USER, b.hub_secret.clone());
            }
            (opts, Some(b.metrics))
        }
    };
    opts.set_keep_alive(Duration::from_secs(10));
    let max = net::broker_tls::MAX_PACKET;
    opts.set_max_packet_size(max, max);
    let (client, eventloop) = AsyncClient::new(opts, 1024);
    let (tx, received) = mpsc::channel::<Received>(256);
    let status_filter = net::mqtt_topics::all_status(&home.config.fleet);
    tasks.spawn(run(eventloop, client.clone(), status_filter, tx));
    Ok(Mqtt {
        client,
        received,
        broker: metrics,
    })
}

/// Where the hub's own client reaches a broker listening on `addr` (on every address:
/// loopback).
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            (std::net::Ipv4Addr::LOCALHOST, a.port()).into()
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            (std::net::Ipv6Addr::LOCALHOST, a.port()).into()
        }
        a => a,
    }
}

async fn run(
    mut eventloop: rumqttc::EventLoop,
    sub: AsyncClient,
    status_filter: String,
    tx: mpsc::Sender<Received>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(200);
                tracing::info!("connected to MQTT broker");
                let _ = sub.try_subscribe(status_filter.clone(), QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = tx.try_send((p.topic.clone(), p.payload.to_vec()));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("MQTT broker unreachable ({e}); retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
