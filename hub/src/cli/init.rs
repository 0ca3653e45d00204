//! `hub init`.

use anyhow::Result;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, default_value = "home")]
    fleet: String,
    /// A trust root made offline with `fwtool root init` (production).
    #[arg(long, requires = "timestamp_key")]
    root: Option<PathBuf>,
    /// A release key of --root, if the hub is to sign releases itself (leave it out
    /// when releases are co-signed offline: `hub publish --hold`).
    #[arg(long, requires = "root")]
    release_key: Option<PathBuf>,
    /// The timestamp key of --root: the hub signs announcements' freshness and the
    /// revocation list with it.
    #[arg(long, requires = "root")]
    timestamp_key: Option<PathBuf>,
    /// The rollout key of --root: the hub pauses and halts releases with it (signed
    /// hold lists). Without it `hub rollout pause|halt` and automatic halts are off.
    #[arg(long, requires = "root")]
    rollout_key: Option<PathBuf>,
    /// Where the embedded MQTT broker listens. Beyond loopback (0.0.0.0:8883 for devices
    /// on other machines) it takes TLS only, with client certificates of the hub's broker
    /// CA: devices are enrolled with `--broker mqtts://HUB:8883 --broker-ca broker-ca.pem`.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt_listen: String,
    /// TLS on the embedded broker even on loopback (`mqtt_tls = true`; beyond loopback it
    /// is always on).
    #[arg(long)]
    mqtt_tls: bool,
    /// Where the hub's libp2p node (blobs, gossip, relay) listens
    /// (/ip4/0.0.0.0/tcp/4001 for devices on other machines).
    #[arg(long, default_value = "/ip4/127.0.0.1/tcp/4001")]
    p2p_listen: String,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let Args {
        fleet,
        root,
        release_key,
        timestamp_key,
        rollout_key,
        mqtt_listen,
        mqtt_tls,
        p2p_listen,
    } = args;
    let warning = hub::init::init(
        dir,
        &hub::init::InitArgs {
            fleet: &fleet,
            root: root.as_deref(),
            release_key: release_key.as_deref(),
            timestamp_key: timestamp_key.as_deref(),
            rollout_key: rollout_key.as_deref(),
            mqtt_listen: &mqtt_listen,
            mqtt_tls,
            p2p_listen: &p2p_listen,
        },
    )?;
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    println!(
        "hub home created in {}; give devices {} and (for TLS to the broker) {}",
        dir.display(),
        dir.join("root.bin").display(),
        hub::broker::pki::ca_path(dir).display()
    );
    Ok(())
}
