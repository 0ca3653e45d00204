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
    /// A tag the operator assigns this device (repeat: `--tag kitchen --tag beta`);
    /// releases published with `--target-tag` reach the devices assigned it, whatever
    /// they declare themselves. Enrolling an enrolled device again with `--tag` replaces
    /// its tags; without, it keeps them.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Take away every tag assigned to NAME before.
    #[arg(long, conflicts_with = "tags")]
    no_tags: bool,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let Args {
        pubkey,
        name,
        replace,
        tags,
        no_tags,
    } = args;
    let home = Home::open(dir)?;
    let text = std::fs::read_to_string(&pubkey)
        .with_context(|| format!("reading {}", pubkey.display()))?;
    let key = proto::PublicKey::from_text(&text)
        .with_context(|| format!("reading {}", pubkey.display()))?;
    let assigned = (no_tags || !tags.is_empty()).then_some(tags.as_slice());
    let listed = hub::enroll::enroll(&home, &[(name.clone(), key)], assigned, replace)?;
    match tags.as_slice() {
        [] => println!("enrolled {name} (key {})", key.id().short()),
        t => println!(
            "enrolled {name} (key {}) with tags {}",
            key.id().short(),
            t.join(", ")
        ),
    }
    if listed {
        // Devices learn their tags from the signed list a running hub spreads.
        hub::control::reload_trust(&home, &mut |l| eprintln!("{l}"));
    }
    Ok(())
}
