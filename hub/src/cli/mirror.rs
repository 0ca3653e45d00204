//! `hub mirror`: git remotes the store and the deploy repository are pushed to.

use anyhow::{bail, Context, Result};
use hub::home::Home;
use hub::mirror::{shown, Mirror};
use std::path::Path;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Push the store and the deploy repository to URL (any git remote: a path, ssh://,
    /// https://; an existing bare repository) after every change. Pushed once now, so a
    /// wrong URL is said at once; a running `hub serve` picks it up within seconds.
    Add {
        /// The remote, e.g. ssh://backup.example/srv/hub-mirror.git or /mnt/usb/hub.git
        /// (a password belongs in a git credential helper, not in the URL).
        url: String,
    },
    /// Stop pushing to URL (what it holds is left as it is).
    Remove { url: String },
    /// Each mirror: up to date, or how far behind and why.
    List,
}

pub fn run(dir: &Path, cmd: Command) -> Result<()> {
    let home = Home::open(dir)?;
    let now = hub::home::now();
    match cmd {
        Command::Add { url } => {
            let url = absolute(&url)?;
            if home.config.mirrors.contains(&url) {
                bail!("{} is a mirror already (hub mirror list)", shown(&url));
            }
            let heads = hub::mirror::heads(&home)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime
                .block_on(hub::mirror::push(dir, &url))
                .with_context(|| {
                    format!(
                        "not added: the first push to {} failed (a path must be a bare \
                         repository: git init --bare PATH)",
                        shown(&url)
                    )
                })?;
            // Read again: hub.toml may have changed during the push.
            let mut home = Home::open(dir)?;
            home.config.mirrors.push(url.clone());
            save_config(&home)?;
            let mut mirrors = hub::mirror::load(&home);
            if let Some(m) = mirrors.iter_mut().find(|m| m.url == url) {
                *m = Mirror::new(&url);
                m.pushed(&heads, now);
            }
            hub::mirror::save(&home, &mirrors);
            println!(
                "mirror {} added and up to date; `hub serve` pushes every change to it",
                shown(&url)
            );
        }
        Command::Remove { url } => {
            let mut home = home;
            let url = absolute(&url)?;
            let before = home.config.mirrors.len();
            home.config.mirrors.retain(|m| m != &url);
            if home.config.mirrors.len() == before {
                bail!("{} is not a mirror (hub mirror list)", shown(&url));
            }
            save_config(&home)?;
            println!(
                "mirror {} removed; what it holds is left as it is",
                shown(&url)
            );
        }
        Command::List => {
            let mirrors = hub::mirror::load(&home);
            if mirrors.is_empty() {
                println!("no mirrors (hub mirror add URL)");
            }
            let heads = hub::mirror::heads(&home).ok();
            for m in mirrors {
                println!("{}", m.describe(now, heads.as_deref()));
            }
        }
    }
    Ok(())
}

/// A local path made absolute (`hub serve` runs elsewhere); a URL as given. Never an
/// argument git would read as an option.
fn absolute(url: &str) -> Result<String> {
    if url.starts_with('-') {
        bail!("{url}: a mirror URL cannot start with '-'");
    }
    if url.contains("://") || (url.contains(':') && !url.starts_with('/')) {
        return Ok(url.into()); // scp-like host:path too
    }
    let path = std::path::absolute(url).with_context(|| format!("resolving {url}"))?;
    Ok(path.to_string_lossy().into_owned())
}

/// Writes `hub.toml` again with the new mirror list (written whole, synced, renamed;
/// comments in it are not kept).
fn save_config(home: &Home) -> Result<()> {
    let text = toml::to_string_pretty(&home.config)?;
    hub::home::write_atomic(&home.dir.join("hub.toml"), text.as_bytes())?;
    Ok(())
}
