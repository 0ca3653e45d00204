//! fwtool: the operator's offline tool. Keys, trust roots, test images, and signed
//! release directories. Synchronous, no network, no long-running state.
#![allow(clippy::print_stdout)]

mod diff;
mod files;
mod inspect;
mod keygen;
mod release;
mod root_cmd;
mod testimage;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use proto::manifest::{BootSpec, HealthProbe, Platform, Staging};
use proto::Digest;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "fwtool",
    version,
    about = "unifleet's offline tool: keys, trust roots, test images, signed releases",
    long_about = "unifleet's offline tool: keys, trust roots, test images, signed releases.\n\n\
        A typical first release:\n  \
        fwtool keygen --out keys/root && fwtool keygen --out keys/release\n  \
        fwtool root init --root-key keys/root.pub --release-key keys/release.pub --sign-with keys/root.key --out root.bin\n  \
        fwtool testimage --app hello --version 1.0.0 --out hello-1.0.0.elf\n  \
        fwtool pack hello-1.0.0.elf --app hello --version 1.0.0 --channel stable --release 1 --no-staging --out rel1\n  \
        fwtool sign rel1 --key keys/release.key\n  \
        fwtool verify rel1 --root root.bin"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate an ed25519 key pair: PATH.key (secret, mode 0600) and PATH.pub.
    Keygen {
        /// Path prefix for the two files.
        #[arg(long)]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Create, rotate, co-sign and check trust roots.
    #[command(subcommand)]
    Root(RootCommand),
    /// Write a bootable test unikernel (x86 multiboot or arm64 Image) that prints `READY <app> <version>`
    /// on its first serial port and answers every line it receives there.
    Testimage {
        /// The machine: x86 (a multiboot ELF, COM1) or aarch64 (an arm64 Image for
        /// `qemu-system-aarch64 -M virt`, PL011 console).
        #[arg(long, value_enum, default_value_t = testimage::Arch::X86)]
        arch: testimage::Arch,
        #[arg(long)]
        app: String,
        #[arg(long)]
        version: semver::Version,
        #[arg(long)]
        out: PathBuf,
        /// Boot, print a line, but never print READY (for rollback tests).
        #[arg(long)]
        fail: bool,
        /// Append N MiB of deterministic pseudo-random payload seeded by the app name.
        #[arg(long, default_value_t = 0)]
        pad_mib: u32,
    },
    /// Chunk an image and write DIR/manifest (unsigned) and DIR/chunks/.
    Pack(PackCmd),
    /// Add a release-key signature to DIR/manifest.
    Sign {
        dir: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Verify a release directory against a trust root: signatures, threshold, expiry,
    /// channel, platform, release number, every chunk and the whole image. Exits 0 only if
    /// every check passes; otherwise prints one line naming the failure and exits 1.
    Verify(VerifyCmd),
    /// Say what a file is (image, root, manifest, announcement, or a release directory).
    /// Nothing is verified; signatures are listed, not checked.
    Inspect {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// What a device holding OLD must fetch for NEW (images or release directories).
    Diff {
        old: PathBuf,
        new: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Each device's place in staged rollouts: the smallest wave share that reaches it
    /// (`hub publish --waves`), from its public key (device.pub). The same for every
    /// release, so the same devices go first each time.
    Seed {
        /// Device public keys (device.pub files).
        #[arg(required = true)]
        keys: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Default)]
struct RoleFlags {
    /// Public key of a root-role holder (repeat for k-of-n).
    #[arg(long = "root-key")]
    root_keys: Vec<PathBuf>,
    /// How many root keys must sign the root [default: 1].
    #[arg(long)]
    root_threshold: Option<u32>,
    /// Public key allowed to sign releases (repeat for k-of-n).
    #[arg(long = "release-key")]
    release_keys: Vec<PathBuf>,
    /// How many release keys must sign each release [default: 1].
    #[arg(long)]
    release_threshold: Option<u32>,
    /// Public key of the hub's online timestamp key: it signs announcements (freshness)
    /// and the revocation list, nothing else (repeat to allow several hubs).
    #[arg(long = "timestamp-key")]
    timestamp_keys: Vec<PathBuf>,
    /// Public key of the hub's online rollout key: it signs the list of paused and
    /// halted releases (a failing rollout stopped by the hub), nothing else.
    #[arg(long = "rollout-key")]
    rollout_keys: Vec<PathBuf>,
}

impl RoleFlags {
    fn into_args(self) -> root_cmd::RoleArgs {
        root_cmd::RoleArgs {
            root_keys: self.root_keys,
            root_threshold: self.root_threshold,
            release_keys: self.release_keys,
            release_threshold: self.release_threshold,
            timestamp_keys: self.timestamp_keys,
            rollout_keys: self.rollout_keys,
        }
    }
}

#[derive(Subcommand, Debug)]
enum RootCommand {
    /// Create root version 1.
    Init {
        #[arg(long, default_value = "home")]
        fleet: String,
        #[command(flatten)]
        roles: RoleFlags,
        /// How long the root lasts (default: 3 years, as the quick start's).
        #[arg(long, default_value_t = proto::root::DEFAULT_ROOT_DAYS)]
        expires_days: u64,
        /// Sign right away with these secret keys (repeat); others can add theirs with
        /// `fwtool root sign`.
        #[arg(long)]
        sign_with: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Create the next root version from an existing one. Key sets given here replace
    /// the old ones; the rest carry over. It needs a threshold of the OLD root keys and a
    /// threshold of the NEW root keys.
    Rotate {
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        roles: RoleFlags,
        /// How long the root lasts (default: 3 years, as the quick start's).
        #[arg(long, default_value_t = proto::root::DEFAULT_ROOT_DAYS)]
        expires_days: u64,
        #[arg(long)]
        sign_with: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Add one signature to a root file (each of the k holders runs this in turn).
    Sign {
        root: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Check a root: self-signed, or as the next link after each --trusted root.
    Verify {
        root: PathBuf,
        /// Roots already trusted, oldest first.
        #[arg(long)]
        trusted: Vec<PathBuf>,
        /// Check as of this Unix time instead of now.
        #[arg(long)]
        at: Option<u64>,
    },
}

#[derive(Args, Debug)]
struct PackCmd {
    image: PathBuf,
    #[arg(long, default_value = "home")]
    fleet: String,
    #[arg(long)]
    app: String,
    #[arg(long)]
    version: semver::Version,
    #[arg(long, default_value = "stable")]
    channel: String,
    /// Release number: must be above every earlier release of this app on this channel.
    #[arg(long)]
    release: u64,
    /// Platform to release for [default: the best match from the image header].
    #[arg(long)]
    platform: Option<Platform>,
    #[arg(long, default_value_t = 32)]
    memory_mib: u32,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Health probe: `banner` (the line `READY <app> <version>` on the console),
    /// `banner:TEXT`, `tcp:PORT`, or `http:[PORT]/PATH` (a 200 from the guest; needs
    /// --network).
    #[arg(long, default_value = "banner")]
    probe: String,
    #[arg(long, default_value_t = 10)]
    probe_timeout_secs: u64,
    /// The unikernel needs a network interface (each device attaches it where its `nic`
    /// setting says).
    #[arg(long)]
    network: bool,
    /// Digest of the previous release's signed manifest.
    #[arg(long)]
    previous: Option<Digest>,
    /// Digest of the staging report that shows this image booted healthy.
    #[arg(
        long,
        conflicts_with = "no_staging",
        required_unless_present = "no_staging"
    )]
    staging_report: Option<Digest>,
    /// Release without a staging report; recorded in the manifest.
    #[arg(long)]
    no_staging: bool,
    /// Sign right away with these release keys (repeat).
    #[arg(long)]
    sign_with: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct VerifyCmd {
    dir: PathBuf,
    /// The trust root (self-signed, as shipped to devices).
    #[arg(long)]
    root: PathBuf,
    /// Expected app [default: any].
    #[arg(long)]
    app: Option<String>,
    /// Expected channel [default: the manifest's].
    #[arg(long)]
    channel: Option<String>,
    /// Expected platform [default: the manifest's].
    #[arg(long)]
    platform: Option<Platform>,
    /// Refuse releases not above this number (what the device has installed).
    #[arg(long)]
    installed_release: Option<u64>,
    /// Check the root's expiry as of this Unix time instead of now (a manifest itself
    /// does not expire).
    #[arg(long)]
    at: Option<u64>,
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Keygen { out, force } => {
            let key = keygen::keygen(&out, force)?;
            println!(
                "wrote {} (secret, 0600) and {}\nkey id {}",
                keygen::with_suffix(&out, ".key").display(),
                keygen::with_suffix(&out, ".pub").display(),
                key.id()
            );
        }
        Command::Root(cmd) => run_root(cmd)?,
        Command::Testimage {
            arch,
            app,
            version,
            out,
            fail,
            pad_mib,
        } => {
            let spec = testimage::Spec {
                arch,
                app,
                version,
                fail,
                pad_mib,
            };
            let mut bytes = Vec::new();
            let size = testimage::write(&spec, &mut bytes)?;
            files::write_atomic(&out, &bytes, 0o644)?;
            println!(
                "wrote {} ({size} bytes): x86 multiboot, {}",
                out.display(),
                if spec.fail {
                    "never prints READY (--fail)".to_string()
                } else {
                    format!("prints {:?}", spec.ready_line())
                }
            );
        }
        Command::Pack(cmd) => {
            let probe = HealthProbe::parse(&cmd.probe, &cmd.app, &cmd.version)
                .map_err(anyhow::Error::msg)?;
            let staging = match cmd.staging_report {
                Some(report) => Staging::Passed { report },
                None => Staging::Skipped,
            };
            let args = release::PackArgs {
                fleet: cmd.fleet,
                app: cmd.app,
                version: cmd.version,
                channel: cmd.channel,
                release: cmd.release,
                platform: cmd.platform,
                boot: BootSpec {
                    memory_mib: cmd.memory_mib,
                    vcpus: cmd.vcpus,
                    cmdline: cmd.cmdline,
                    probe,
                    probe_timeout_ms: cmd.probe_timeout_secs * 1000,
                    network: cmd.network,
                },
                staging,
                previous: cmd.previous,
            };
            let m = release::pack(&cmd.image, args, &cmd.out)?;
            println!(
                "packed {} {} release {} ({}, {}): {} bytes in {} chunks -> {}",
                m.app,
                m.version,
                m.release,
                m.channel,
                m.platform,
                m.image_size,
                m.chunks.len(),
                cmd.out.display()
            );
            for key in &cmd.sign_with {
                release::sign(&cmd.out, key)?;
                println!("signed with {}", key.display());
            }
        }
        Command::Sign { dir, key } => {
            let (m, count) = release::sign(&dir, &key)?;
            println!(
                "signed {} {} release {}; {count} signature(s) now",
                m.app, m.version, m.release
            );
        }
        Command::Verify(cmd) => {
            let root = root_cmd::verify(&cmd.root, &[], cmd.at)
                .with_context(|| format!("trust root {}", cmd.root.display()));
            let root = match root {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("verify failed: {e:#}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let args = release::VerifyArgs {
                app: cmd.app,
                channel: cmd.channel,
                platform: cmd.platform,
                installed_release: cmd.installed_release,
                at: cmd.at,
            };
            match release::verify(&cmd.dir, &root, &args) {
                Ok(v) => {
                    let m = v.manifest();
                    println!(
                        "OK {} {} release {} channel {} platform {}: {} bytes, {} chunks, manifest {}",
                        m.app,
                        m.version,
                        m.release,
                        m.channel,
                        m.platform,
                        m.image_size,
                        m.chunks.len(),
                        v.digest()
                    );
                }
                Err(e) => {
                    eprintln!("verify failed: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Command::Inspect { path, json } => {
            let v = inspect::inspect(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_text(&v, 0);
            }
        }
        Command::Seed { keys, json } => {
            let mut rows = vec![];
            for path in &keys {
                let key = files::read_public_key(path)?;
                let seed = proto::rollout::seed(&key);
                rows.push((path.display().to_string(), seed));
            }
            for (path, seed) in &rows {
                let reached_from = proto::rollout::share_text(seed + 1);
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "key": path, "seed": seed, "reached_from": reached_from })
                    );
                } else {
                    println!("{path}: in every wave of {reached_from} or more");
                }
            }
        }
        Command::Diff { old, new, json } => {
            let d = diff::diff(&old, &new)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!(
                    "{} chunks in new: {} shared, {} new; a device holding old fetches {} of {} bytes ({:.2}%)",
                    d.new_chunks, d.shared_chunks, d.changed_chunks, d.fetch_bytes, d.new_size, d.fetch_percent
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_root(cmd: RootCommand) -> Result<()> {
    let describe = |r: &proto::root::Root| {
        format!(
            "root v{} of fleet {}: root {}-of-{}, release {}-of-{}, timestamp {} key(s), rollout {} key(s), expires {}",
            r.version,
            r.fleet,
            r.root.threshold,
            r.root.keys.len(),
            r.release.threshold,
            r.release.keys.len(),
            r.timestamp.keys.len(),
            r.rollout.keys.len(),
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(r.expires_at)
            )
        )
    };
    match cmd {
        RootCommand::Init {
            fleet,
            roles,
            expires_days,
            sign_with,
            out,
        } => {
            let r = root_cmd::init(&fleet, &roles.into_args(), expires_days, &sign_with, &out)?;
            println!("wrote {}: {}", out.display(), describe(&r));
        }
        RootCommand::Rotate {
            from,
            roles,
            expires_days,
            sign_with,
            out,
        } => {
            let r = root_cmd::rotate(&from, &roles.into_args(), expires_days, &sign_with, &out)?;
            println!(
                "wrote {}: {}\nit needs {} signature(s) from the old root keys and {} from the new",
                out.display(),
                describe(&r),
                root_cmd::unverified_root(&root_cmd::read_envelope(&from)?)?
                    .root
                    .threshold,
                r.root.threshold
            );
        }
        RootCommand::Sign { root, key } => {
            let (r, count) = root_cmd::sign(&root, &key)?;
            println!("{}: {count} signature(s) now", describe(&r));
        }
        RootCommand::Verify { root, trusted, at } => {
            let r = root_cmd::verify(&root, &trusted, at)?;
            println!("OK {} (digest {})", describe(r.root()), r.digest());
        }
    }
    Ok(())
}

/// Prints JSON as indented `key: value` lines.
fn print_text(v: &serde_json::Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        serde_json::Value::Object(map) => {
            for (k, val) in map {
                match val {
                    serde_json::Value::Object(_) | serde_json::Value::Array(_) => {
                        println!("{pad}{k}:");
                        print_text(val, indent + 2);
                    }
                    other => println!("{pad}{k}: {}", scalar(other)),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                match item {
                    serde_json::Value::Object(_) | serde_json::Value::Array(_) => {
                        println!("{pad}-");
                        print_text(item, indent + 2);
                    }
                    other => println!("{pad}- {}", scalar(other)),
                }
            }
        }
        other => println!("{pad}{}", scalar(other)),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fwtool: {e:#}");
            ExitCode::from(2)
        }
    }
}
