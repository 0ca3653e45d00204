//! `hub restore`.

use anyhow::Result;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The mirror to restore from (a URL given to `hub mirror add` on the old hub).
    #[arg(long, value_name = "URL")]
    from: String,
    /// A copy of the old hub's keys/ directory (never mirrored: keep it apart), from after
    /// its last `hub root publish`.
    #[arg(long, value_name = "DIR")]
    keys: PathBuf,
    /// A copy of the old hub's hub.toml, to keep its settings (who is served, dashboard,
    /// metrics, limits). Without it the restored hub has the defaults.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["mqtt_listen", "p2p_listen"])]
    config: Option<PathBuf>,
    /// Where the embedded MQTT broker listens, without --config (devices reconnect to the
    /// old address: give the restored hub the old one's addresses).
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt_listen: String,
    /// Where the hub's libp2p node listens, without --config.
    #[arg(long, default_value = "/ip4/127.0.0.1/tcp/4001")]
    p2p_listen: String,
    /// Push on to the mirror restored from. Off by default: while the old hub may still
    /// run, two hubs would push there (`hub mirror add URL` once it is gone for good).
    #[arg(long)]
    keep_mirroring: bool,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let home = hub::restore::restore(
        dir,
        &hub::restore::RestoreArgs {
            from: &args.from,
            keys: &args.keys,
            config: args.config.as_deref(),
            mqtt_listen: &args.mqtt_listen,
            p2p_listen: &args.p2p_listen,
            keep_mirroring: args.keep_mirroring,
        },
    )?;
    let releases = home.store()?.releases()?.len();
    let from = hub::mirror::shown(&args.from);
    println!(
        "hub home restored in {} from {from}: fleet {}, {releases} release(s)",
        dir.display(),
        home.config.fleet,
    );
    if args.config.is_none() {
        println!(
            "hub.toml: the defaults (every device served, no dashboard, no metrics); give \
             --config the old hub.toml to keep its settings"
        );
    }
    if !args.keep_mirroring {
        println!("not mirroring: `hub mirror add {from}` once the old hub is gone for good");
    }
    println!(
        "start it with `hub --dir {} serve`; devices report again once it runs (held \
         releases waiting for co-signatures are not mirrored: hold them again)",
        dir.display()
    );
    Ok(())
}
