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
