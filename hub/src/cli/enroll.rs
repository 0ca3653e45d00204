//! `hub enroll`.

use anyhow::{Context, Result};
use hub::home::Home;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    pubkey: PathBuf,
    #[arg(long)]
    name: String,
    /// Replace the key NAME is enrolled with (a new board, a lost key): the old key's
    /// reports are refused from then on. Recorded in the event log.
    #[arg(long)]
    replace: bool,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let Args {
        pubkey,
        name,
        replace,
    } = args;
    let home = Home::open(dir)?;
    let text = std::fs::read_to_string(&pubkey)
        .with_context(|| format!("reading {}", pubkey.display()))?;
    let key = proto::PublicKey::from_text(&text)
        .with_context(|| format!("reading {}", pubkey.display()))?;
    hub::enroll::enroll(&home, &[(name.clone(), key)], replace)?;
    println!("enrolled {name} (key {})", key.id().short());
    Ok(())
}
