//! A hosted host for bursting tests: another "machine" — a network namespace with its
//! own libvirtd and virtlogd, reached over libvirt's TLS transport across a routed link
//! (`scripts/hosted-libvirt.sh`). It takes guest network slot 7's addresses
//! (203.0.113.192/26), so it holds that slot's lock while it is up. Brought down on drop,
//! whatever the test did.

use crate::fleet::run;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// The guest network slot whose addresses the hosted host uses.
pub const SLOT: u8 = 7;

#[derive(Debug)]
pub struct HostedHost {
    dir: tempfile::TempDir,
    /// The device.toml `[hosted]` table the script printed.
    pub table: String,
    _slot: std::fs::File,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/hosted-libvirt.sh")
}

impl HostedHost {
    pub fn up() -> Result<HostedHost> {
        let slot = crate::guestnet::reserve(SLOT)?;
        let dir = tempfile::Builder::new().prefix("uf-hosted-").tempdir()?;
        let mut host = HostedHost {
            dir,
            table: String::new(),
            _slot: slot,
        };
        host.table = run(Command::new(script()).arg("up").arg(host.dir.path()))
            .context("bringing up the hosted host (scripts/hosted-libvirt.sh)")?;
        Ok(host)
    }

    /// The `[hosted]` table with `pki` pointing at `client` (`client`, `wrong-client`).
    pub fn table_with_client(&self, client: &str) -> String {
        let good = self.dir.path().join("client");
        let other = self.dir.path().join(client);
        self.table
            .replace(&good.display().to_string(), &other.display().to_string())
    }

    /// Where the device's TLS files for it are.
    pub fn client_dir(&self) -> PathBuf {
        self.dir.path().join("client")
    }

    /// Takes the routed link down (the host unreachable) or up again.
    pub fn link(&self, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        run(Command::new(script())
            .args(["link"])
            .arg(self.dir.path())
            .arg(state))
        .map(drop)
    }

    /// Restarts its libvirtd; its domains keep running.
    pub fn restart_libvirtd(&self) -> Result<()> {
        run(Command::new(script()).arg("restart").arg(self.dir.path())).map(drop)
    }

    /// `virsh` on the hosted libvirtd through its local socket (works with the link down).
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        let uri = format!(
            "qemu+unix:///system?socket={}/run/libvirt-sock",
            self.dir.path().display()
        );
        run(Command::new("virsh").args(["-q", "-c", &uri]).args(args))
    }

    /// Running domains whose names start with `prefix`.
    pub fn domains(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .virsh(&["list", "--name"])?
            .lines()
            .map(str::trim)
            .filter(|n| n.starts_with(prefix))
            .map(String::from)
            .collect())
    }

    /// Volumes in its `unifleet` pool.
    pub fn volumes(&self) -> Result<Vec<String>> {
        let _ = self.virsh(&["pool-refresh", "unifleet"]);
        Ok(self
            .virsh(&["vol-list", "unifleet"])?
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect())
    }
}

impl Drop for HostedHost {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new(script()).arg("down").arg(self.dir.path())) {
            eprintln!("{e:#}");
        }
    }
}
