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

/// Connections that the broker closes soon after they were made, as it does when a
/// second client connects with the same client id (MQTT session takeover): two agents
/// with one name knock each other off, each within a second or so, over and over.
#[derive(Debug, Default)]
pub struct Takeovers {
    connected_at: Option<std::time::Instant>,
    short: std::collections::VecDeque<std::time::Instant>,
    warned_at: Option<std::time::Instant>,
}

/// A connection that ends within this was taken over, most likely.
const SHORT_LIVED: Duration = Duration::from_secs(5);
/// This many short-lived connections within [`TAKEOVER_WINDOW`] is a name clash.
const TAKEOVERS: usize = 3;
const TAKEOVER_WINDOW: Duration = Duration::from_secs(60);

impl Takeovers {
    pub fn connected(&mut self, now: std::time::Instant) {
        self.connected_at = Some(now);
    }

    /// The connection ended at `now`: true when it is time to warn (at most once a window).
    pub fn lost(&mut self, now: std::time::Instant) -> bool {
        let Some(at) = self.connected_at.take() else {
            return false;
        };
        if now.duration_since(at) < SHORT_LIVED {
            self.short.push_back(now);
        }
        while self
            .short
            .front()
            .is_some_and(|t| now.duration_since(*t) > TAKEOVER_WINDOW)
        {
            self.short.pop_front();
        }
        let due = self
            .warned_at
            .is_none_or(|w| now.duration_since(w) > TAKEOVER_WINDOW);
        if self.short.len() >= TAKEOVERS && due {
            self.warned_at = Some(now);
            return true;
        }
        false
    }
}

/// Connects (lazily; the event loop retries forever) and returns a client for publishing.
/// Every message arriving on `subscribe` goes to `out` (dropped if `out` is full). The
/// client id is `unifleet-device-<name>`.
pub fn start(
    name: &str,
    url: &str,
    subscribe: Vec<String>,
    out: mpsc::Sender<(String, Vec<u8>)>,
    tasks: &net::tasks::Tasks,
) -> Result<Mqtt, net::BrokerUrlError> {
    let (host, port) = net::parse_mqtt_url(url)?;
    let client_id = format!("unifleet-device-{name}");
    let mut opts = MqttOptions::new(&client_id, host, port);
    let name = name.to_string();
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let sub_client = client.clone();
    let connected = Arc::new(AtomicBool::new(false));
    let up = connected.clone();
    tasks.spawn(async move {
        let mut backoff = Duration::from_millis(200);
        let mut takeovers = Takeovers::default();
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(200);
                    takeovers.connected(std::time::Instant::now());
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
                    if takeovers.lost(std::time::Instant::now()) {
                        tracing::error!(
                            "the MQTT broker keeps closing this device's connection right after it \
                             connects: another agent is most likely running with the same name \
                             {name:?} (client id {client_id}). Give each device its own name in \
                             device.toml; until then both miss announcements and reports"
                        );
                    }
                    tracing::debug!("MQTT: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    Ok(Mqtt { client, connected })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn connections_taken_over_again_and_again_are_a_name_clash() {
        let mut t = Takeovers::default();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut warned = vec![];
        for i in 0..10u64 {
            t.connected(at(i * 600));
            warned.push(t.lost(at(i * 600 + 400)));
        }
        // The third short connection warns, then nothing more within the minute.
        assert_eq!(warned.iter().filter(|w| **w).count(), 1, "{warned:?}");
        assert!(warned[2]);
    }

    #[test]
    fn a_broker_restarting_now_and_then_is_not_a_name_clash() {
        let mut t = Takeovers::default();
        let start = Instant::now();
        for i in 0..10u64 {
            // Connections that lasted minutes, then dropped.
            t.connected(start + Duration::from_secs(i * 300));
            assert!(!t.lost(start + Duration::from_secs(i * 300 + 200)));
        }
        // A disconnect without a connection (broker down from the start) is not one.
        assert!(!t.lost(start));
    }
}
