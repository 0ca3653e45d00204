//! `hub release`: one release's provenance; releases held for co-signing.

use anyhow::Result;
use clap::Subcommand;
use hub::history::{find, provenance_file, PlatformRelease};
use hub::home::Home;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum Command {
    /// What a release is and where it came from: its platforms, staging, and for a
    /// release built from a push, the commit, builder, toolchain, build log and SBOM.
    Show {
        app: String,
        /// The version (`unifleet.toml`'s `version`), e.g. 0.1.1.
        version: String,
        /// The channel, when the version is on several (`staging` for a candidate).
        #[arg(long)]
        channel: Option<String>,
        /// Print the build log instead.
        #[arg(long, conflicts_with = "sbom")]
        log: bool,
        /// Print the SBOM (CycloneDX JSON) instead.
        #[arg(long)]
        sbom: bool,
    },
    /// Store and announce a held release once a threshold of release keys signed it.
    Approve {
        /// The held release's directory (printed by `hub publish --hold`).
        held: PathBuf,
    },
}

pub fn run(dir: &Path, cmd: Command) -> Result<()> {
    let home = Home::open(dir)?;
    match cmd {
        Command::Show {
            app,
            version,
            channel,
            log,
            sbom,
        } => show(&home, (&app, &version, channel.as_deref()), log, sbom),
        Command::Approve { held } => {
            let info = hub::publish::approve(&home, &held)?;
            hub::control::notify(&home, &mut |l| eprintln!("{l}"));
            println!(
                "approved {} release {} on {} for {} (manifest {})",
                info.track.app,
                info.release,
                info.track.channel,
                info.track.platform,
                info.manifest
            );
            Ok(())
        }
    }
}

fn show(
    home: &Home,
    (app, version, channel): (&str, &str, Option<&str>),
    log: bool,
    sbom: bool,
) -> Result<()> {
    let store = home.store()?;
    let release = find(home, &store, app, version, channel)?;
    let first = &release[0];
    let provenance = first.provenance.as_ref();
    if log || sbom {
        let (what, digest) = match (sbom, provenance) {
            (false, Some(p)) => ("build log", Some(p.log)),
            (true, Some(p)) => ("SBOM", p.sbom),
            (_, None) => ("provenance", None),
        };
        let Some(digest) = digest else {
            anyhow::bail!("{app} {version} has no {what}: {}", no_record(provenance));
        };
        std::io::stdout().write_all(&provenance_file(&store, first, what, digest)?)?;
        return Ok(());
    }
    print!("{}", describe(&store, &release)?);
    Ok(())
}

fn no_record(provenance: Option<&proto::manifest::Provenance>) -> &'static str {
    match provenance {
        None => "it was published from a prebuilt image, not built by the hub",
        Some(_) => "its build had no Cargo.lock to describe",
    }
}

/// The release's platforms and provenance, for people.
fn describe(store: &hub::store::Store, release: &[PlatformRelease]) -> Result<String> {
    let first = &release[0];
    let (app, version) = (&first.info.track.app, &first.version);
    let mut out = format!(
        "{app} {version}: release {} on {}, signed {} ({})\n",
        first.info.release,
        first.info.track.channel,
        proto::status::human_ago(first.created_at, hub::home::now()),
        super::local(first.created_at),
    );
    let rows: Vec<Vec<String>> = release
        .iter()
        .map(|p| {
            vec![
                p.platform().to_string(),
                proto::status::human_bytes(p.image_size),
                p.image_digest.to_hex(),
                p.staging.to_string(),
            ]
        })
        .collect();
    out += &super::table(&["PLATFORM", "SIZE", "IMAGE DIGEST", "STAGING"], &rows);
    let Some(p) = &first.provenance else {
        out += "provenance: none (published from a prebuilt image, not built by the hub)\n";
        return Ok(out);
    };
    let sbom = match p.sbom {
        Some(d) => {
            let bytes = provenance_file(store, first, "SBOM", d)?;
            format!(
                "{d}, CycloneDX, {} components (hub release show {app} {version} --sbom)",
                sbom_components(&bytes)
            )
        }
        None => "none (no Cargo.lock)".into(),
    };
    let fields = [
        ("commit", p.commit.clone()),
        ("builder", p.builder.clone()),
        ("toolchain", p.toolchain.clone()),
        ("command", p.command.clone()),
        (
            "build log",
            format!("{} (hub release show {app} {version} --log)", p.log),
        ),
        ("SBOM", sbom),
        (
            "rebuild",
            format!("hub rebuild {app} {version} (checks it builds to the same digest)"),
        ),
    ];
    out += "provenance:\n";
    for (name, value) in fields {
        out += &format!("  {name:<10} {value}\n");
    }
    Ok(out)
}

/// How many components an SBOM lists (0 if it is not the JSON the hub wrote).
fn sbom_components(bytes: &[u8]) -> usize {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v["components"].as_array().map(Vec::len))
        .unwrap_or(0)
}
