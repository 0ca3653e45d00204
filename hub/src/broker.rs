//! The embedded MQTT broker (rumqttd), listening on loopback unless configured otherwise.

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded MQTT broker cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded broker configuration")]
    Config(#[source] Box<toml::de::Error>),
    #[error("starting the embedded broker's thread")]
    Thread(#[source] std::io::Error),
}

/// Starts the broker on its own thread. Fails if the address cannot be bound.
pub fn start(listen: &str) -> Result<(), BrokerError> {
    // Bind once to report a clear error before handing the address to the broker.
    let listener = std::net::TcpListener::bind(listen).map_err(|source| BrokerError::Listen {
        addr: listen.into(),
        source,
    })?;
    drop(listener);
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
    let config: rumqttd::Config =
        toml::from_str(&cfg).map_err(|e| BrokerError::Config(Box::new(e)))?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!("embedded MQTT broker stopped: {e}");
            }
        })
        .map_err(BrokerError::Thread)?;
    Ok(())
}
