//! `hub release`: releases held for co-signing.

use anyhow::Result;
use clap::Subcommand;
use hub::home::Home;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Store and announce a held release once a threshold of release keys signed it.
    Approve {
        /// The held release's directory (printed by `hub publish --hold`).
        held: PathBuf,
    },
}

pub fn run(dir: &Path, cmd: Command) -> Result<()> {
    let Command::Approve { held } = cmd;
    let home = Home::open(dir)?;
    let info = hub::publish::approve(&home, &held)?;
    hub::control::notify(&home, &mut |l| eprintln!("{l}"));
    println!(
        "approved {} release {} on {} for {} (manifest {})",
        info.track.app, info.release, info.track.channel, info.track.platform, info.manifest
    );
    Ok(())
}
