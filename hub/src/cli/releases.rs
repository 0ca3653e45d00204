//! `hub releases`.

use anyhow::Result;
use hub::home::Home;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    app: Option<String>,
    #[arg(long)]
    json: bool,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let Args { app, json } = args;
    let home = Home::open(dir)?;
    let list: Vec<_> = home
        .store()?
        .releases()?
        .into_iter()
        .filter(|r| app.as_ref().is_none_or(|a| a == &r.track.app))
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        for r in list {
            println!(
                "{} {} release {} {} manifest {}",
                r.track.app, r.track.channel, r.release, r.track.platform, r.manifest
            );
        }
    }
    Ok(())
}
