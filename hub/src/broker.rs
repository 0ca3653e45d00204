//! The embedded MQTT broker (rumqttd), listening on loopback unless configured otherwise.

use anyhow::{Context, Result};

/// Starts the broker on its own thread. Fails if the address cannot be bound.
pub fn start(listen: &str) -> Result<()> {
    // Bind once to report a clear error before handing the address to the broker.
    drop(
        std::net::TcpListener::bind(listen)
            .with_context(|| format!("embedded MQTT broker cannot listen on {listen}"))?,
    );
    let cfg = format!(
        r#"
id = 0
[router]
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "{listen}"
next_connection_delay_ms = 0
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 16384
max_inflight_count = 100
dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&cfg).context("embedded broker configuration")?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!("embedded MQTT broker stopped: {e}");
            }
        })?;
    Ok(())
}
