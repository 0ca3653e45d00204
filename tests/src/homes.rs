//! Homes behind NAT routers in network namespaces (`scripts/netns.sh`): the hub on the
//! "internet" at 198.51.100.1, homes a and c behind port-keeping (cone) NATs, home b
//! behind a port-changing (symmetric) one, every LAN 192.168.1.0/24. Removed on drop,
//! whatever the test did.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The hub's address on the test internet.
pub const HUB_IP: &str = "198.51.100.1";

#[derive(Debug)]
pub struct Homes {
    prefix: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/netns.sh")
}

impl Homes {
    /// Builds the homes with `per_home` devices each and uplinks capped at `uplink`
    /// (a `tc` rate such as `20mbit`). Fails, saying why, without CAP_NET_ADMIN.
    pub fn up(per_home: usize, uplink: &str) -> Result<Homes> {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "u{}{:02}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let homes = Homes { prefix };
        let out = Command::new(script())
            .args(["up", &homes.prefix, &per_home.to_string(), uplink])
            .output()
            .context("running scripts/netns.sh")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("Operation not permitted") || err.contains("Permission denied") {
                bail!(
                    "building the home networks needs CAP_NET_ADMIN (run the tests as root, \
                     as CI does): {err}"
                );
            }
            bail!("scripts/netns.sh up {} failed: {err}", homes.prefix);
        }
        Ok(homes)
    }

    /// Home `home`'s router refuses the hub from now on (`scripts/netns.sh cut`).
    pub fn cut_off_hub(&self, home: &str) -> Result<()> {
        let out = Command::new(script())
            .args(["cut", &self.prefix, home])
            .output()
            .context("running scripts/netns.sh cut")?;
        if !out.status.success() {
            bail!(
                "scripts/netns.sh cut {} {home} failed: {}",
                self.prefix,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Home `home`'s router forgets an idle TCP connection's NAT mapping after `secs`
    /// (Linux keeps it five days; some home routers keep it minutes).
    pub fn nat_forgets_idle_tcp_after(&self, home: &str, secs: u32) -> Result<()> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(&format!("r{home}")),
                "sysctl",
                "-qw",
            ])
            .arg(format!(
                "net.netfilter.nf_conntrack_tcp_timeout_established={secs}"
            ))
            .output()
            .context("running sysctl in a router's namespace")?;
        if !out.status.success() {
            bail!(
                "setting router {home}'s TCP mapping timeout: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The namespace of `name`: `hub`, a router `ra`…, or a device `a1`, `b2`….
    pub fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

impl Drop for Homes {
    fn drop(&mut self) {
        let _ = Command::new(script()).args(["down", &self.prefix]).status();
    }
}
