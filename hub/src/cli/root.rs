//! `hub root`: publish the next trust root to the fleet.

use super::local;
use anyhow::Result;
use clap::Subcommand;
use hub::home::Home;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Make NEW_ROOT (from `fwtool root rotate`, signed by a threshold of the current and
    /// of its own root keys) the fleet's root: kept in the store's chain, announced, and
    /// served link by link to devices that missed rotations.
    Publish {
        new_root: PathBuf,
        /// The hub's new timestamp key, if the new root lists another.
        #[arg(long)]
        timestamp_key: Option<PathBuf>,
        /// The hub's new release key, if the new root lists another.
        #[arg(long)]
        release_key: Option<PathBuf>,
        /// The hub's new rollout key, if the new root lists another.
        #[arg(long)]
        rollout_key: Option<PathBuf>,
    },
}

pub fn run(dir: &Path, cmd: Command) -> Result<()> {
    let Command::Publish {
        new_root,
        timestamp_key,
        release_key,
        rollout_key,
    } = cmd;
    let home = Home::open(dir)?;
    let root = hub::trust::publish_root(
        &home,
        &new_root,
        &hub::trust::NewKeys {
            timestamp: timestamp_key.as_deref(),
            release: release_key.as_deref(),
            rollout: rollout_key.as_deref(),
        },
    )?;
    hub::control::reload_trust(&home, &mut |l| eprintln!("{l}"));
    println!(
        "trust root version {} published (expires {}); devices fetch the links they lack from the hub or their peers",
        root.root().version,
        local(root.root().expires_at)
    );
    Ok(())
}
