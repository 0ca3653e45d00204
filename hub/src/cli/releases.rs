//! `hub releases`: the release history, one row per release.

use anyhow::Result;
use hub::history::{grouped, releases, PlatformRelease};
use hub::home::Home;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this app's releases.
    app: Option<String>,
    /// One JSON object per platform's manifest (with its digest), for scripts.
    #[arg(long)]
    json: bool,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let Args { app, json } = args;
    let home = Home::open(dir)?;
    let store = home.store()?;
    let list = releases(&home, &store, app.as_deref())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!(
            "no releases yet: `git push` to {}/deploy.git or `hub publish`",
            dir.display()
        );
        return Ok(());
    }
    let now = hub::home::now();
    let rows: Vec<Vec<String>> = grouped(&list)
        .into_iter()
        .rev()
        .map(|r| row(r, now))
        .collect();
    print!(
        "{}",
        super::table(
            &[
                "APP",
                "CHANNEL",
                "RELEASE",
                "VERSION",
                "COMMIT",
                "WHEN",
                "PLATFORMS (STAGING)"
            ],
            &rows
        )
    );
    Ok(())
}

/// One release: `web  stable  v3  0.1.1  3f2a9c1d0e12  2h ago  qemu-x86_64 (passed), …`.
fn row(release: &[PlatformRelease], now: u64) -> Vec<String> {
    let first = &release[0];
    let platforms: Vec<String> = release
        .iter()
        .map(|p| format!("{} ({})", p.platform(), p.staging))
        .collect();
    vec![
        first.info.track.app.clone(),
        first.info.track.channel.clone(),
        format!("v{}", first.info.release),
        first.version.clone(),
        first
            .commit
            .as_deref()
            .map_or("-".into(), |c| c[..12.min(c.len())].to_string()),
        proto::status::human_ago(first.created_at, now),
        platforms.join(", "),
    ]
}
