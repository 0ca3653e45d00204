//! The template app as a new user gets it (`hub new web`), with an x86 staging device and a
//! device serving it on demand over an isolated guest network: where the push test and
//! `bench_push` start.

use crate::fleet::{run, toml_value::V, Fleet};
use crate::guestnet::GuestNet;
use anyhow::Result;
use std::path::PathBuf;

/// The started devices' serving one and its proxy port, and the app's repository.
#[derive(Debug)]
pub struct TemplateFleet {
    pub device: usize,
    pub port: u16,
    pub repo: PathBuf,
}

/// Adds and starts `PREFIX-stage-PID` (channel staging) and `PREFIX-PID` (on demand,
/// `max_local = 1`) with static addresses on `net`, TCG if `tcg`; writes the template to
/// `DIR/web`, released unstaged for aarch64 (no staging device of it here) with
/// `staging_timeout_secs`. The change to `unifleet.toml` is left uncommitted.
pub fn template_fleet(
    fleet: &mut Fleet,
    net: &GuestNet,
    prefix: &str,
    tcg: bool,
    staging_timeout_secs: u64,
) -> Result<TemplateFleet> {
    let (pid, uri) = (std::process::id(), fleet.libvirt.clone());
    let stage = fleet.add_device_on(
        &format!("{prefix}-stage-{pid}"),
        "web",
        "staging",
        &uri,
        &[],
    )?;
    let device = fleet.add_device(&format!("{prefix}-{pid}"), "web", &[])?;
    let mut port = 0;
    for (i, first) in [(stage, 2), (device, 6)] {
        let dev = &fleet.devices[i];
        dev.set_config("nic", V::Str(net.nic()))?;
        if tcg {
            dev.set_config("domain_type", V::Str("qemu".into()))?;
        }
        dev.set_config("guest_addresses", V::Str(net.addresses(first, first + 3)))?;
        if i == device {
            port = dev.serve_on_demand("web", "min = 0\nmax_local = 1\nidle_secs = 2")?;
        }
        fleet.start_device(i)?;
    }
    let repo = fleet.path("web");
    run(fleet.hub_cmd()?.args(["new", "web", "--into"]).arg(&repo))?;
    let toml = repo.join("unifleet.toml");
    let text = std::fs::read_to_string(&toml)?.replace(
        "\n[build]",
        &format!(
            "no_staging_for = [\"qemu-aarch64\"]\nstaging_timeout_secs = {staging_timeout_secs}\n\n[build]"
        ),
    );
    std::fs::write(&toml, text)?;
    Ok(TemplateFleet { device, port, repo })
}
