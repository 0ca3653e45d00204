//! `hub promote`.

use anyhow::Result;
use hub::home::Home;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    app: String,
    #[arg(long, default_value = "staging")]
    from: String,
    #[arg(long, default_value = "stable")]
    to: String,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let Args { app, from, to } = args;
    let home = Home::open(dir)?;
    let infos = hub::publish::promote(&home, &app, &from, &to)?;
    hub::control::notify(&home, &mut |l| eprintln!("{l}"));
    println!(
        "promoted {app} to {to} release {} for {}",
        infos[0].release,
        hub::publish::platforms(&infos)
    );
    Ok(())
}
