//! The hub's MQTT client: one task owns the event loop, reconnects with backoff,
//! subscribes to every device's status topic, and hands each publish to the hub's loop.

use crate::home::Home;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::time::Duration;
use tokio::sync::mpsc;

/// A publish received: (topic, payload).
pub(super) type Received = (String, Vec<u8>);

/// Why the MQTT client could not start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error(transparent)]
    Url(#[from] net::BrokerUrlError),
}

/// Starts the embedded broker unless `hub.toml` names one, and the client task.
pub(super) fn start(
    home: &Home,
    tasks: &net::tasks::Tasks,
) -> Result<(AsyncClient, mpsc::Receiver<Received>), MqttError> {
    let broker_url = match &home.config.broker {
        Some(url) => url.clone(),
        None => {
            crate::broker::start(&home.config.mqtt_listen)?;
            format!("mqtt://{}", home.config.mqtt_listen)
        }
    };
    let (host, port) = net::parse_mqtt_url(&broker_url)?;
    let mut opts = MqttOptions::new(format!("unifleet-hub-{}", home.config.fleet), host, port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(16 * 1024, 16 * 1024);
    let (mqtt, mut eventloop) = AsyncClient::new(opts, 1024);
    let (tx, rx) = mpsc::channel::<Received>(256);
    let status_filter = net::mqtt_topics::all_status(&home.config.fleet);
    let sub = mqtt.clone();
    tasks.spawn(async move {
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
    });
    Ok((mqtt, rx))
}
