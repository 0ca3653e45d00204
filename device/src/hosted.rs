//! `[hosted]` in device.toml: the hosted host on-demand instances burst to once the
//! device's own are full — another machine's libvirtd reached over its network transport
//! (`qemu+tls://HOST/system`), with a storage pool the images are uploaded into and a
//! network routed to the device, where guests get addresses the device hands out. One
//! hypervisor owner per device talks to it, shared by every app's pool.

use crate::hypervisor::addresses::{BadGuestAddresses, GuestAddresses};
use crate::hypervisor::{hosted::Hosted, BadNic, Hypervisor, Nic};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostedConfig {
    /// libvirt's URI for the hosted host over its network transport, e.g.
    /// `qemu+tls://hosted.example/system` or `xen+tls://hosted.example/system`.
    pub uri: String,
    /// A directory with the TLS files libvirt's client reads: `cacert.pem` (the hosted
    /// host's CA), `clientcert.pem` and `clientkey.pem` (this device's, mode 0600).
    /// Absent: libvirt's own default places (`/etc/pki/CA`, `/etc/pki/libvirt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pki: Option<PathBuf>,
    /// The storage pool on the hosted host images are uploaded into.
    #[serde(default = "unifleet")]
    pub pool: String,
    /// Where hosted guests' network interfaces go on that host: `network=NAME` or
    /// `bridge=NAME`, routed to this device (not NAT: the device dials the guests).
    #[serde(default = "default_nic")]
    pub nic: String,
    /// Addresses this device gives its hosted guests, `FIRST-LAST/PREFIX via GATEWAY`
    /// (a range of the hosted network no other device uses).
    pub guest_addresses: String,
    /// The hosted host's domain type: `kvm`, `qemu` (TCG) or `xen`.
    #[serde(default = "kvm")]
    pub domain_type: String,
}

fn unifleet() -> String {
    "unifleet".into()
}
fn default_nic() -> String {
    "network=unifleet".into()
}
fn kvm() -> String {
    "kvm".into()
}

/// The TLS files a `pki` directory holds, as libvirt names them.
pub const PKI_FILES: [&str; 3] = ["cacert.pem", "clientcert.pem", "clientkey.pem"];

/// Why a `[hosted]` table was not taken.
#[derive(Debug, thiserror::Error)]
pub enum HostedConfigError {
    #[error(
        "[hosted] uri = {0:?}: use a libvirt URI with a host, e.g. \
         \"qemu+tls://hosted.example/system\" (put the TLS files in `pki`, not in the URI)"
    )]
    Uri(String),
    #[error(
        "[hosted] uri = {0:?}: that transport is plaintext or this machine's (tcp, unix, \
         ext); reach the hosted host over TLS, e.g. \"qemu+tls://hosted.example/system\" \
         (or +ssh)"
    )]
    Transport(String),
    #[error(
        "[hosted] pki: {}: {source} (the directory holds cacert.pem, clientcert.pem and \
         clientkey.pem: README, \"Bursting to a hosted host\")",
        path.display()
    )]
    Missing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "[hosted] pki: {} can be read by others (mode {mode:03o}): it is this device's TLS \
         key for the hosted host; `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("[hosted] {0}")]
    Nic(#[from] BadNic),
    #[error("[hosted] {0}")]
    GuestAddresses(#[from] BadGuestAddresses),
    #[error("[hosted] domain_type = {0:?}: use kvm, qemu (TCG) or xen")]
    DomainType(String),
}

impl HostedConfig {
    /// Relative paths are taken from `base` (the config file's directory).
    pub fn resolve(&mut self, base: &Path) {
        if let Some(p) = self.pki.as_mut().filter(|p| p.is_relative()) {
            *p = base.join(&*p);
        }
    }

    pub fn validate(&self) -> Result<(), HostedConfigError> {
        let host = self
            .uri
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or(""));
        if host.is_none_or(str::is_empty) || self.uri.contains('?') {
            return Err(HostedConfigError::Uri(self.uri.clone()));
        }
        let scheme = self.uri.split("://").next().unwrap_or_default();
        let transport = scheme.split_once('+').map(|(_, t)| t.to_ascii_lowercase());
        if matches!(transport.as_deref(), Some("tcp" | "unix" | "ext")) {
            return Err(HostedConfigError::Transport(self.uri.clone()));
        }
        self.nic()?;
        self.guest_addresses()?;
        if !["kvm", "qemu", "xen"].contains(&self.domain_type.as_str()) {
            return Err(HostedConfigError::DomainType(self.domain_type.clone()));
        }
        if let Some(dir) = &self.pki {
            check_pki(dir)?;
        }
        Ok(())
    }

    pub fn nic(&self) -> Result<Nic, BadNic> {
        self.nic.parse()
    }

    pub fn guest_addresses(&self) -> Result<GuestAddresses, BadGuestAddresses> {
        self.guest_addresses.parse()
    }

    /// The URI libvirt opens: `uri`, with `pkipath` when the TLS files are elsewhere than
    /// libvirt's default.
    pub fn connect_uri(&self) -> String {
        match &self.pki {
            Some(dir) => format!("{}?pkipath={}", self.uri, dir.display()),
            None => self.uri.clone(),
        }
    }

    /// The owner of the connection to the hosted host, for `device` of `fleet`.
    pub fn hypervisor(&self, fleet: &str, device: &str) -> Result<Hypervisor, HostedConfigError> {
        let hosted = Hosted {
            pool: self.pool.clone(),
            fleet: fleet.into(),
            device: device.into(),
        };
        Ok(Hypervisor::hosted(
            &self.connect_uri(),
            &self.uri,
            &self.domain_type,
            Some(self.guest_addresses()?),
            hosted,
        ))
    }
}

/// Every TLS file is there, and the key is the device's alone.
fn check_pki(dir: &Path) -> Result<(), HostedConfigError> {
    use std::os::unix::fs::PermissionsExt;
    for name in PKI_FILES {
        let path = dir.join(name);
        let meta = std::fs::metadata(&path).map_err(|source| HostedConfigError::Missing {
            path: path.clone(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if name == "clientkey.pem" && mode & 0o077 != 0 {
            return Err(HostedConfigError::KeyMode { path, mode });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pki: Option<PathBuf>) -> HostedConfig {
        HostedConfig {
            uri: "qemu+tls://203.0.113.194/system".into(),
            pki,
            pool: unifleet(),
            nic: default_nic(),
            guest_addresses: "203.0.113.226-203.0.113.238/27 via 203.0.113.225".into(),
            domain_type: kvm(),
        }
    }

    /// The device's TLS key for the hosted host is refused unless it is its alone, and a
    /// missing file is named.
    #[test]
    fn a_key_others_can_read_or_a_missing_file_is_refused_by_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for f in PKI_FILES {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let key = dir.path().join("clientkey.pem");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = config(Some(dir.path().into())).validate().unwrap_err();
        assert!(
            matches!(err, HostedConfigError::KeyMode { mode: 0o640, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        config(Some(dir.path().into())).validate().unwrap();
        std::fs::remove_file(dir.path().join("cacert.pem")).unwrap();
        let err = config(Some(dir.path().into())).validate().unwrap_err();
        assert!(err.to_string().contains("cacert.pem"), "{err}");
    }

    #[test]
    fn the_uri_needs_a_host_and_gets_the_pki_path() {
        let mut c = config(None);
        c.validate().unwrap();
        assert_eq!(c.connect_uri(), "qemu+tls://203.0.113.194/system");
        c.pki = Some("/etc/unifleet/hosted".into());
        assert_eq!(
            c.connect_uri(),
            "qemu+tls://203.0.113.194/system?pkipath=/etc/unifleet/hosted"
        );
        for bad in ["qemu:///system", "hosted", "qemu+tls://h/system?pkipath=/x"] {
            c.uri = bad.into();
            c.pki = None;
            assert!(
                matches!(c.validate(), Err(HostedConfigError::Uri(_))),
                "{bad}"
            );
        }
        // Plaintext, or not another machine.
        for bad in [
            "qemu+tcp://h/system",
            "qemu+unix://h/system",
            "xen+ext://h/",
        ] {
            c.uri = bad.into();
            assert!(
                matches!(c.validate(), Err(HostedConfigError::Transport(_))),
                "{bad}"
            );
        }
        for good in [
            "qemu://h/system",
            "xen+ssh://h/system",
            "qemu+tls://h:16514/system",
        ] {
            c.uri = good.into();
            c.validate().unwrap();
        }
    }
}
