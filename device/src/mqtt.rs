//! The MQTT side: one task owns the rumqttc event loop, subscribes to the channel's
//! retained announcements (again after every reconnect), forwards them, and reconnects
//! with backoff while the broker is down.

use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

use net::broker_tls::MAX_PACKET;

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

/// What a device needs for TLS to the broker: the fleet's broker CA it pinned at
/// enrollment, its key, and where it keeps the client certificate the hub issued it
/// (asked of the hub over libp2p when missing or refused).
#[derive(Debug, Clone)]
pub struct Tls {
    pub ca_pem: Vec<u8>,
    pub seed: [u8; 32],
    pub cert_file: std::path::PathBuf,
    pub net: net::NetClient,
    pub hubs: Vec<net::PeerId>,
}

/// How often a refused device asks the hub for a new certificate, at most.
const CERT_ASK_EVERY: Duration = Duration::from_secs(60);
/// A kept certificate older than this is renewed (it is valid for a year): asked of the
/// hub at the next start or reconnection, the old one used while the hub does not answer.
const CERT_RENEW_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

impl Tls {
    /// Whether the kept certificate is due for renewal (or there is none).
    fn stale(&self) -> bool {
        std::fs::metadata(&self.cert_file)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age > CERT_RENEW_AFTER)
    }

    /// Puts TLS with our certificate on the event loop: a new one from the hub when
    /// `fresh` or the kept one is stale, else (or when the hub does not answer) the kept
    /// one. False when there is none to be had yet.
    async fn arm(&self, eventloop: &mut rumqttc::EventLoop, fresh: bool) -> bool {
        let asked = if fresh || self.stale() {
            self.ask_hub().await
        } else {
            None
        };
        let Some(pem) = asked.or_else(|| std::fs::read(&self.cert_file).ok()) else {
            return false;
        };
        match net::broker_tls::client_config(&self.ca_pem, &pem, &self.seed) {
            Ok(config) => {
                eventloop
                    .mqtt_options
                    .set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
                    ));
                true
            }
            Err(e) => {
                tracing::warn!(file = %self.cert_file.display(), "the MQTT client certificate is unusable ({e}); asking the hub for another");
                let _ = std::fs::remove_file(&self.cert_file);
                false
            }
        }
    }

    /// Arms TLS before the first connection, waiting (with backoff, one line said) until
    /// there is a certificate.
    async fn arm_at_start(&self, eventloop: &mut rumqttc::EventLoop) {
        let mut wait = Duration::from_secs(5);
        let mut said = false;
        while !self.arm(eventloop, false).await {
            if !said {
                said = true;
                if self.hubs.is_empty() {
                    tracing::warn!(
                        "the broker takes TLS, and this device has no hub to ask for its MQTT \
                         client certificate: set hub in device.toml (device enroll --hub)"
                    );
                } else {
                    tracing::warn!(
                        "no MQTT client certificate yet: the hub did not give one (down, or \
                         this device not enrolled: `hub enroll`); asking again with backoff"
                    );
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(60));
        }
    }

    /// This device's MQTT client certificate, from the first hub that gives one (kept).
    async fn ask_hub(&self) -> Option<Vec<u8>> {
        for hub in &self.hubs {
            let got = self
                .net
                .fetch_with(*hub, None, proto::Digest([0; 32]), net::Want::BrokerCert)
                .await;
            match got {
                Ok(pem) if !net::broker_tls::certs(&pem).is_empty() => {
                    if let Err(e) = crate::store::write_atomic(&self.cert_file, &pem) {
                        tracing::warn!("keeping the MQTT client certificate: {e}");
                    }
                    tracing::info!("the hub issued this device its MQTT client certificate");
                    return Some(pem);
                }
                Ok(_) => {
                    tracing::warn!(%hub, "the hub sent an MQTT client certificate that is not PEM")
                }
                Err(e) => {
                    tracing::debug!(%hub, "asking the hub for an MQTT client certificate: {e}")
                }
            }
        }
        None
    }
}

/// Whether the broker may have refused who we are: a CONNACK refusal, a TLS error, or a
/// connection cut during the handshake (TLS 1.3 reports a refused client certificate
/// after the client thinks it is done, often as a reset). A new certificate may help.
fn refused_us(e: &rumqttc::ConnectionError) -> bool {
    use rumqttc::ConnectionError as E;
    use std::io::ErrorKind as K;
    match e {
        // Cooling down after a flood: a certificate is not the matter.
        E::ConnectionRefused(rumqttc::ConnectReturnCode::ServiceUnavailable) => false,
        E::ConnectionRefused(_) | E::Tls(_) => true,
        E::Io(io) => matches!(
            io.kind(),
            K::InvalidData | K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof
        ),
        // A TLS alert read while waiting for the CONNACK comes through rumqttc's state.
        E::MqttState(_) => true,
        _ => false,
    }
}

/// Connects (lazily; the event loop retries forever) and returns a client for publishing.
/// Every message arriving on `subscribe` goes to `out` (dropped if `out` is full). The
/// client id is `unifleet-device-<name>`. `tls` is required for an `mqtts://` URL.
pub fn start(
    name: &str,
    url: &str,
    tls: Option<Tls>,
    subscribe: Vec<String>,
    out: mpsc::Sender<(String, Vec<u8>)>,
    tasks: &net::tasks::Tasks,
) -> Result<Mqtt, net::BrokerUrlError> {
    let url = net::broker_tls::BrokerUrl::parse(url)?;
    let tls = tls.filter(|_| url.tls);
    let client_id = format!("unifleet-device-{name}");
    let mut opts = net::broker_tls::mqtt_options(&client_id, &url, None);
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
        let mut asked_at: Option<std::time::Instant> = None;
        if let Some(tls) = &tls {
            tls.arm_at_start(&mut eventloop).await;
        }
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
                    if let Some(tls) = tls.as_ref().filter(|t| refused_us(&e) || t.stale()) {
                        let due = asked_at.is_none_or(|t| t.elapsed() >= CERT_ASK_EVERY);
                        if due {
                            tracing::warn!("the MQTT connection failed ({e}); asking the hub for a new client certificate, in case the broker refused this one");
                            asked_at = Some(std::time::Instant::now());
                            tls.arm(&mut eventloop, true).await;
                        }
                    }
                    if takeovers.lost(std::time::Instant::now()) {
                        tracing::error!(
                            "the MQTT broker keeps closing this device's connection right after it \
                             connects: another agent is most likely running with the same name \
                             {name:?} (client id {client_id}). Give each device its own name in \
                             device.toml; until then both miss announcements and reports"
                        );
                    }
                    // Once a streak: a broker down for an hour is one line, not thousands.
                    if backoff == Duration::from_millis(200) {
                        tracing::info!("MQTT broker unreachable ({e}); retrying with backoff");
                    } else {
                        tracing::debug!("MQTT: {e}; retrying in {backoff:?}");
                    }
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
