//! `hub restore`.

use anyhow::Result;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The mirror to restore from (a URL given to `hub mirror add` on the old hub).
    #[arg(long, value_name = "URL")]
    from: String,
    /// A copy of the old hub's keys/ directory (never mirrored: keep it apart).
    #[arg(long, value_name = "DIR")]
    keys: PathBuf,
    /// Where the embedded MQTT broker listens (devices reconnect to the old address:
    /// give the restored hub the old one's addresses).
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt_listen: String,
    /// Where the hub's libp2p node listens.
    #[arg(long, default_value = "/ip4/127.0.0.1/tcp/4001")]
    p2p_listen: String,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let home = hub::restore::restore(
        dir,
        &hub::restore::RestoreArgs {
            from: &args.from,
            keys: &args.keys,
            mqtt_listen: &args.mqtt_listen,
            p2p_listen: &args.p2p_listen,
        },
    )?;
    let store = home.store()?;
    let releases = store.releases()?.len();
    println!(
        "hub home restored in {} from {}: fleet {}, {releases} release(s); it keeps mirroring \
         there. Start it with `hub --dir {} serve`; devices report again once it runs",
        dir.display(),
        args.from,
        home.config.fleet,
        dir.display()
    );
    Ok(())
}
