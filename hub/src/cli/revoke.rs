//! `hub revoke`.

use anyhow::Result;
use hub::home::Home;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    name: String,
    /// Why, for the event log.
    #[arg(long, default_value = "")]
    reason: String,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let Args { name, reason } = args;
    let home = Home::open(dir)?;
    let list = hub::trust::revoke(&home, &name, &reason)?;
    hub::control::reload_trust(&home, &mut |l| eprintln!("{l}"));
    println!(
        "revoked {name}; revocation list version {} names {} device(s)",
        list.version,
        list.devices.len()
    );
    Ok(())
}
