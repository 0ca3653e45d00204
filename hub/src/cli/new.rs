//! `hub new`: a repository for a new app, from the hub's template.

use anyhow::Result;
use hub::home::Home;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The app's name (lower-case letters, digits, '-', '_' and '.', starting with a letter
    /// or digit).
    app: String,
    /// Where to make the repository (default: ./APP).
    #[arg(long)]
    into: Option<PathBuf>,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let into = args.into.unwrap_or_else(|| PathBuf::from(&args.app));
    // The remote is this hub's deploy repository when --dir is a hub home.
    let deploy = Home::open(dir)
        .ok()
        .and_then(|h| std::fs::canonicalize(h.dir.join("deploy.git")).ok());
    hub::template::create(&into, &args.app, deploy.as_deref())?;
    println!(
        "created {} for app {}: the Rust unikernel template, one commit on main",
        into.display(),
        args.app
    );
    match deploy {
        Some(d) => println!("deploy it: cd {} && git push unifleet main   (remote unifleet = {})", into.display(), d.display()),
        None => println!("deploy it: cd {} && git remote add unifleet HUB:DIR/deploy.git && git push unifleet main", into.display()),
    }
    Ok(())
}
