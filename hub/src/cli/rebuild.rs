//! `hub rebuild`: checks a release built from a push rebuilds to the same bytes.

use anyhow::Result;
use hub::home::Home;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {
    app: String,
    /// The version to rebuild (`hub releases APP` lists them).
    version: String,
    /// The channel, when the version is on several.
    #[arg(long)]
    channel: Option<String>,
}

pub fn run(dir: &Path, args: Args) -> Result<()> {
    let Args {
        app,
        version,
        channel,
    } = args;
    let home = Home::open(dir)?;
    let which = (app.as_str(), version.as_str(), channel.as_deref());
    let rebuilt = hub::rebuild::rebuild(&home, which, &mut |l| eprintln!("{l}"))?;
    let rows: Vec<Vec<String>> = rebuilt
        .compared
        .iter()
        .map(|c| {
            vec![
                c.platform.to_string(),
                c.released.to_hex(),
                c.rebuilt.map_or("(no image)".into(), |d| d.to_hex()),
                if c.same() { "same" } else { "DIFFERS" }.into(),
            ]
        })
        .collect();
    print!(
        "{}",
        super::table(&["PLATFORM", "RELEASED", "REBUILT", ""], &rows)
    );
    let took = hub::build::source::seconds(rebuilt.took);
    if !rebuilt.sbom_same {
        eprintln!("warning: the rebuild's SBOM differs from the one the release names");
    }
    if rebuilt.same() {
        println!(
            "{app} {version} rebuilds bit for bit from commit {} ({took})",
            rebuilt.commit
        );
        return Ok(());
    }
    let (then, now) = &rebuilt.toolchain;
    if then != now {
        anyhow::bail!(
            "{app} {version} does not rebuild to what was released, and the toolchain \
             changed since ({then} then, {now} now): a new compiler makes other bytes; \
             rebuild with the release's toolchain to tell"
        );
    }
    let cache = hub::build::source::app_dir(&home, &app).join("cache");
    anyhow::bail!(
        "{app} {version} does not rebuild to what was released from commit {}: either its \
         build is not reproducible (time stamps, absolute paths or randomness in the \
         output), or the build cache it was made with ({}) was tampered with. Remove that \
         cache and push a new version to release a clean build",
        rebuilt.commit,
        cache.display()
    )
}
