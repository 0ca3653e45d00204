//! `hub`: the unifleet hub's command line. Each subcommand is a module of [`cli`]: its
//! arguments and what it runs; this file only parses and dispatches.
#![allow(clippy::print_stdout)]

mod cli;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "hub",
    version,
    about = "unifleet hub: publish, sign, store and announce unikernel releases"
)]
struct Cli {
    /// The hub's home directory.
    #[arg(long, global = true, default_value = ".", env = "UNIFLEET_HUB")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a hub home in --dir: hub.toml, keys, trust root, git store, deploy repository.
    Init(cli::init::Args),
    /// Run the hub: embedded MQTT broker (or --broker), libp2p, announcements, inventory.
    Serve(cli::serve::Args),
    /// Publish an image: inspect, stage, chunk, sign, store in git, announce. One release
    /// may carry an image for each of several platforms (repeat --image); each device
    /// takes its own platform's.
    Publish(cli::publish::Args),
    /// Staged rollouts: where a release stands wave by wave; pause, resume or halt it
    /// (a signed hold list every device honours, with the hub up or down).
    #[command(subcommand)]
    Rollout(cli::rollout::Command),
    /// One release's provenance (`show`); releases held for co-signing (`approve`).
    #[command(subcommand)]
    Release(cli::release::Command),
    /// Build a release's commit again from scratch and compare its images with the
    /// released ones (reproducibility; a tampered build cache shows as a difference).
    Rebuild(cli::rebuild::Args),
    /// The trust root: publish the next one to the fleet.
    #[command(subcommand)]
    Root(cli::root::Command),
    /// Revoke a device: its reports are refused, the hub and every peer stop trading with
    /// it (a signed revocation list that spreads like releases, so it holds with the hub
    /// down).
    Revoke(cli::revoke::Args),
    /// The hub's trust state and what needs an operator soon: root expiry, freshness,
    /// held releases, revoked devices.
    Status,
    /// Re-sign the newest release of APP on --from as the next release on --to.
    Promote(cli::promote::Args),
    /// Re-sign an earlier image as a new, higher release (default: the previous image).
    Rollback(cli::rollback::Args),
    /// Register a device's public key (from `device enroll`). One key, one name.
    Enroll(cli::enroll::Args),
    /// Start a new app: a git repository from the Rust unikernel template that builds,
    /// tests and releases itself when pushed (`git push unifleet main`).
    New(cli::new::Args),
    /// List releases of an app (or all).
    Releases(cli::releases::Args),
    /// List devices as last reported.
    Devices(cli::devices::Args),
    /// Show the event log.
    Log(cli::log::Args),
    /// Mirrors: git remotes the store and deploy repository are pushed to after every
    /// change (what `hub restore` rebuilds a hub from).
    #[command(subcommand)]
    Mirror(cli::mirror::Command),
    /// Build a new hub home in --dir from a mirror and a copy of the old hub's keys (the
    /// old hub's disk died or its machine is replaced).
    Restore(cli::restore::Args),
    /// The fleet's broker for mosquitto (TLS, client certificates of the hub's broker CA,
    /// the fleet's access rules), or a device's client certificate for your own client.
    BrokerConfig(cli::broker_config::Args),
    /// Internal: the deploy repository's pre-receive hook.
    #[command(hide = true)]
    DeployHook,
}

fn main() -> std::process::ExitCode {
    let _ = cli::LOCAL_OFFSET
        .set(time::UtcOffset::current_local_offset().map_or(0, |o| o.whole_seconds()));
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hub: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let dir = cli.dir.as_path();
    match cli.command {
        Command::Init(args) => cli::init::run(dir, args),
        Command::Serve(args) => cli::serve::run(dir, args),
        Command::Publish(args) => cli::publish::run(dir, args),
        Command::Rollout(cmd) => cli::rollout::run(dir, cmd),
        Command::Release(cmd) => cli::release::run(dir, cmd),
        Command::Rebuild(args) => cli::rebuild::run(dir, args),
        Command::Root(cmd) => cli::root::run(dir, cmd),
        Command::Revoke(args) => cli::revoke::run(dir, args),
        Command::Status => cli::status::run(dir),
        Command::BrokerConfig(args) => cli::broker_config::run(dir, args),
        Command::Promote(args) => cli::promote::run(dir, args),
        Command::Rollback(args) => cli::rollback::run(dir, args),
        Command::Enroll(args) => cli::enroll::run(dir, args),
        Command::New(args) => cli::new::run(dir, args),
        Command::Releases(args) => cli::releases::run(dir, args),
        Command::Devices(args) => cli::devices::run(dir, args),
        Command::Log(args) => cli::log::run(dir, args),
        Command::Mirror(cmd) => cli::mirror::run(dir, cmd),
        Command::Restore(args) => cli::restore::run(dir, args),
        Command::DeployHook => cli::deploy_hook::run(dir),
    }
}
