//! `hub mirror`: git remotes the store and the deploy repository are pushed to.

use anyhow::{bail, Context, Result};
use hub::home::Home;
use std::path::Path;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Push the store and the deploy repository to URL (any git remote: a path, ssh://,
    /// https://; an existing bare repository) after every change. Pushed once now, so a
    /// wrong URL is said at once; a running `hub serve` picks it up within seconds.
    Add {
        /// The remote, e.g. ssh://backup.example/srv/hub-mirror.git or /mnt/usb/hub.git.
        url: String,
    },
    /// Stop pushing to URL (what it holds is left as it is).
    Remove { url: String },
    /// Each mirror: up to date, or how far behind and why.
    List,
}

pub fn run(dir: &Path, cmd: Command) -> Result<()> {
    let mut home = Home::open(dir)?;
    match cmd {
        Command::Add { url } => {
            if home.config.mirrors.contains(&url) {
                bail!("{url} is a mirror already (hub mirror list)");
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime
                .block_on(hub::mirror::push(dir, &url))
                .with_context(|| {
                    format!(
                        "not added: the first push to {url} failed (a path must be a bare \
                         repository: git init --bare PATH)"
                    )
                })?;
            home.config.mirrors.push(url.clone());
            save(&home)?;
            println!("mirror {url} added and up to date; `hub serve` pushes every change to it");
        }
        Command::Remove { url } => {
            let before = home.config.mirrors.len();
            home.config.mirrors.retain(|m| m != &url);
            if home.config.mirrors.len() == before {
                bail!("{url} is not a mirror (hub mirror list)");
            }
            save(&home)?;
            println!("mirror {url} removed; what it holds is left as it is");
        }
        Command::List => {
            let mirrors = hub::mirror::load(&home);
            if mirrors.is_empty() {
                println!("no mirrors (hub mirror add URL)");
            }
            for m in mirrors {
                println!("{}", m.describe(hub::home::now()));
            }
        }
    }
    Ok(())
}

/// Writes `hub.toml` again with the new mirror list (written whole, then renamed).
fn save(home: &Home) -> Result<()> {
    let path = home.dir.join("hub.toml");
    let tmp = home.dir.join("hub.toml.tmp");
    let text = toml::to_string_pretty(&home.config)?;
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}
