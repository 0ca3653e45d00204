//! The MQTT side: one task owns the rumqttc event loop, subscribes to the channel's
//! retained announcements (again after every reconnect), forwards them, and reconnects
//! with backoff while the broker is down.

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Largest MQTT packet accepted (announcements are < 1 KiB, status reports < 8 KiB).
const MAX_PACKET: usize = 16 * 1024;

pub fn release_topic(fleet: &str, channel: &str, app: &str) -> String {
    format!("unifleet/{fleet}/release/{channel}/{app}")
}

pub fn status_topic(fleet: &str, device: &str) -> String {
    format!("unifleet/{fleet}/status/{device}")
}

/// A client for publishing, and whether the broker connection is up right now.
#[derive(Debug, Clone)]
pub struct Mqtt {
    pub client: AsyncClient,
    pub connected: Arc<AtomicBool>,
}

impl Mqtt {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// Connects (lazily; the event loop retries forever) and returns a client for publishing.
/// Every message arriving on `subscribe` goes to `out` (dropped if `out` is full).
pub fn start(
    client_id: &str,
    url: &str,
    subscribe: Vec<String>,
    out: mpsc::Sender<(String, Vec<u8>)>,
    tasks: &net::tasks::Tasks,
) -> anyhow::Result<Mqtt> {
    let (host, port) = net::parse_mqtt_url(url).map_err(anyhow::Error::msg)?;
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let sub_client = client.clone();
    let connected = Arc::new(AtomicBool::new(false));
    let up = connected.clone();
    tasks.spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(200);
                    up.store(true, Ordering::Relaxed);
                    tracing::info!("connected to MQTT broker");
                    for t in &subscribe {
                        let _ = sub_client.try_subscribe(t.clone(), QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    tracing::debug!(topic = %p.topic, len = p.payload.len(), retain = p.retain, "MQTT message");
                    if out.try_send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        tracing::warn!(topic = %p.topic, "dropping MQTT message: agent busy");
                    }
                }
                Ok(other) => tracing::trace!(?other, "MQTT event"),
                Err(e) => {
                    up.store(false, Ordering::Relaxed);
                    tracing::debug!("MQTT: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    Ok(Mqtt { client, connected })
}
