//! `hub rollback`.

use anyhow::Result;
use hub::home::Home;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    app: String,
    #[arg(long, default_value = "stable")]
    channel: String,
    /// The version to go back to.
    #[arg(long)]
    to: Option<semver::Version>,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let Args { app, channel, to } = args;
    let home = Home::open(dir)?;
    let infos = hub::publish::rollback(&home, &app, &channel, to.as_ref())?;
    hub::control::notify(&home, &mut |l| eprintln!("{l}"));
    println!(
        "rolled {app} back on {channel}: release {} for {}",
        infos[0].release,
        hub::publish::platforms(&infos)
    );
    Ok(())
}
