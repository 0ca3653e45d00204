//! The device's TOML configuration (written by `device enroll`, read by `device run`).

use crate::autoscale::ScaleConfig;
use proto::manifest::{HealthProbe, Manifest, Platform};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a device.toml was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("resolving {}", path.display())]
    Resolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file's text, named ([`Config::parse`] does not know the file).
    #[error("config {}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("parsing")]
    Parse(#[source] Box<toml::de::Error>),
    #[error(transparent)]
    Name(#[from] proto::names::BadName),
    #[error(transparent)]
    Platform(#[from] proto::manifest::UnknownPlatform),
    #[error(transparent)]
    Nic(#[from] crate::hypervisor::BadNic),
    #[error(transparent)]
    GuestAddresses(#[from] crate::hypervisor::addresses::BadGuestAddresses),
    #[error("domain_type = {0:?}: use auto, kvm or qemu (TCG)")]
    DomainType(String),
    #[error(
        "broker = \"mqtts://…\" needs broker_ca: the hub's broker-ca.pem, pinned at enrollment \
         (`device enroll --broker-ca HUB_DIR/broker-ca.pem`)"
    )]
    NoBrokerCa,
    #[error(transparent)]
    Hosted(#[from] crate::hosted::HostedConfigError),
    #[error(
        "[[ondemand]] {app}: remote_uri is replaced by the device's [hosted] table (uri, pki, \
         pool, nic, guest_addresses): the image is uploaded there and traffic routed to its \
         guests (README, \"Bursting to a hosted host\")"
    )]
    RemoteUriMoved { app: String },
    #[error("parallel_fetches must be at least 1")]
    ParallelFetches,
    #[error(
        "crash_at is a test hook this build leaves out (the `test-hooks` feature); remove it \
         from the config"
    )]
    TestHook,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This device's name: unique in the fleet; used in MQTT topics and domain names.
    pub name: String,
    pub fleet: String,
    /// The release channel this device follows (`stable`, `staging`, …).
    pub channel: String,
    /// Apps this device runs. Announcements for other apps are still verified and
    /// relayed to peers, but not installed.
    pub apps: Vec<String>,
    /// Groups this device belongs to (`kitchen`, `beta`): a release may target tags
    /// (`hub publish --target-tag`); they are in every signed report.
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default = "default_platform")]
    pub platform: String,
    /// Trust root file (relative paths are relative to the config file).
    pub root: PathBuf,
    /// The device's secret key (mode 0600).
    pub key: PathBuf,
    pub state_dir: PathBuf,
    /// MQTT broker, `mqtt://host:port` (plaintext, a broker on loopback) or
    /// `mqtts://host:port` (TLS: needs `broker_ca`); absent: peers only.
    #[serde(default)]
    pub broker: Option<String>,
    /// The fleet's broker CA certificate (`broker-ca.pem` from the hub's directory,
    /// copied by `device enroll --broker-ca`): the only CA an `mqtts://` broker is
    /// checked against. The device's client certificate is asked of the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_ca: Option<PathBuf>,
    /// The hub's libp2p address, `/ip4/…/tcp/…/p2p/<peer id>`: the fallback source of
    /// every blob.
    #[serde(default)]
    pub hub: Option<String>,
    /// Other known peers (more are found through the hub's DHT and mDNS).
    #[serde(default)]
    pub peers: Vec<String>,
    /// Where to listen for peers. Every interface by default: LAN neighbours dial the
    /// LAN address, and dials go out from this port (so a NAT that keeps ports maps it
    /// to the same public port, which hole punching aims at).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Find LAN neighbours by mDNS (on by default: a home's bandwidth is on its LAN).
    #[serde(default = "default_true")]
    pub mdns: bool,
    /// libvirt URI: `xen:///system`, `qemu:///system`, `test:///default`, …
    #[serde(default = "default_libvirt")]
    pub libvirt_uri: String,
    /// Domain type for QEMU URIs: `kvm`, `qemu` (TCG), or `auto`: each new release is
    /// booted once under each and runs under the faster (KVM can be the slower under
    /// nested virtualisation); `device status` says which and why.
    #[serde(default = "default_domain_type")]
    pub domain_type: String,
    /// Where a release that asks for a network interface (`hub publish --network`) gets
    /// it: `network=NAME` (a libvirt network) or `bridge=NAME` (a host bridge, as Xen
    /// boards use: `bridge=xenbr0`).
    #[serde(default = "default_nic")]
    pub nic: String,
    /// How often a running release whose probe speaks to the guest over its network
    /// interface (`http:`, `tcp:`) is probed again; three unanswered in a row count as a
    /// death (restart, then roll back).
    #[serde(default = "default_probe_every_secs")]
    pub probe_every_secs: u64,
    /// Static addresses for guests with a network interface, `FIRST-LAST/PREFIX via
    /// GATEWAY` (e.g. `"192.168.122.2-192.168.122.99/24 via 192.168.122.1"`, outside the
    /// network's DHCP range): each guest gets `ip=ADDR/PREFIX gw=GATEWAY` on its command
    /// line and answers in well under a second; without it guests ask DHCP (seconds: the
    /// server checks an address is free before offering it) and the device reads the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_addresses: Option<String>,
    /// Download and upload limits in bytes per second (0 = unlimited).
    #[serde(default)]
    pub download_rate: u64,
    #[serde(default)]
    pub upload_rate: u64,
    /// Chunks fetched in parallel.
    #[serde(default = "default_parallel")]
    pub parallel_fetches: usize,
    /// Fetch chunks from peers (the hub sends each chunk to about one device and points
    /// the others at it). Off: everything comes from the hub, as in hub-and-spoke systems.
    #[serde(default = "default_true")]
    pub peer_exchange: bool,
    /// Seconds an unused peer connection stays open. Direct connections to devices in
    /// other homes are kept open regardless (up to 8): with the hub down they cannot be
    /// made again.
    #[serde(default = "default_idle_secs")]
    pub idle_timeout_secs: u64,
    /// Prometheus metrics on this loopback address (`127.0.0.1:9101`); absent: off.
    #[serde(default)]
    pub metrics: Option<String>,
    /// The most the state directory's chunks, manifests and image slots may take, MiB;
    /// a release that would take it past this is refused, after what no kept release
    /// needs was removed. 0: no cap (what no kept release needs is removed all the same).
    #[serde(default)]
    pub store_budget_mib: u64,
    /// Testing aid: stop the process (as if killed) at a named point of the install. Only
    /// in builds with the `test-hooks` feature (the tests'); a product build refuses it.
    #[serde(default)]
    pub crash_at: Option<String>,
    /// Apps served on demand through a front proxy (scale from zero, autoscale, burst).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ondemand: Vec<OnDemandConfig>,
    /// The hosted host on-demand instances burst to beyond `max_local` (up to each app's
    /// `max_remote`); absent: no bursting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosted: Option<crate::hosted::HostedConfig>,
}

fn default_platform() -> String {
    Platform::QemuX86_64.name().into()
}
fn default_listen() -> String {
    "/ip4/0.0.0.0/tcp/0".into()
}
fn default_libvirt() -> String {
    "test:///default".into()
}
fn default_nic() -> String {
    "network=default".into()
}
fn default_probe_every_secs() -> u64 {
    crate::watchdog::PROBE_EVERY.as_secs()
}
fn default_domain_type() -> String {
    "auto".into()
}
fn default_true() -> bool {
    true
}
fn default_idle_secs() -> u64 {
    net::IDLE_TIMEOUT.as_secs()
}
fn default_parallel() -> usize {
    4
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        // Absolute paths: libvirtd (another process, another working directory) opens
        // the image and the console log by these names.
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = parent
            .canonicalize()
            .map_err(|source| ConfigError::Resolve {
                path: parent.into(),
                source,
            })?;
        Config::parse(&text, &base).map_err(|e| ConfigError::File {
            path: path.into(),
            source: Box::new(e),
        })
    }

    /// Parses and validates a config's text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(Box::new(e)))?;
        let ca = cfg.broker_ca.iter_mut();
        for p in [&mut cfg.root, &mut cfg.key, &mut cfg.state_dir]
            .into_iter()
            .chain(ca)
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(h) = &mut cfg.hosted {
            h.resolve(base);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        proto::names::check("device", &self.name)?;
        proto::names::check("fleet", &self.fleet)?;
        proto::names::check("channel", &self.channel)?;
        for app in &self.apps {
            proto::names::check("app", app)?;
        }
        self.platform()?;
        self.nic()?;
        self.guest_addresses()?;
        if !["auto", "kvm", "qemu", "xen"].contains(&self.domain_type.as_str()) {
            return Err(ConfigError::DomainType(self.domain_type.clone()));
        }
        if self
            .broker
            .as_deref()
            .is_some_and(|b| b.starts_with("mqtts://"))
            && self.broker_ca.is_none()
        {
            return Err(ConfigError::NoBrokerCa);
        }
        if self.parallel_fetches == 0 {
            return Err(ConfigError::ParallelFetches);
        }
        if let Some(od) = self.ondemand.iter().find(|o| o.remote_uri.is_some()) {
            return Err(ConfigError::RemoteUriMoved {
                app: od.app.clone(),
            });
        }
        if let Some(h) = &self.hosted {
            h.validate()?;
        }
        if self.crash_at.is_some() && !cfg!(feature = "test-hooks") {
            return Err(ConfigError::TestHook);
        }
        Ok(())
    }

    pub fn platform(&self) -> Result<Platform, proto::manifest::UnknownPlatform> {
        self.platform.parse()
    }

    pub fn guest_addresses(
        &self,
    ) -> Result<
        Option<crate::hypervisor::addresses::GuestAddresses>,
        crate::hypervisor::addresses::BadGuestAddresses,
    > {
        self.guest_addresses.as_deref().map(str::parse).transpose()
    }

    pub fn nic(&self) -> Result<crate::hypervisor::Nic, crate::hypervisor::BadNic> {
        self.nic.parse()
    }
}

/// `[[ondemand]]` in device.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OnDemandConfig {
    pub app: String,
    /// Public address the proxy listens on, e.g. `127.0.0.1:8080`.
    pub listen: String,
    #[serde(default)]
    pub min: u32,
    #[serde(default = "two")]
    pub max_local: u32,
    #[serde(default)]
    pub max_remote: u32,
    /// Concurrent connections per instance (default: 32 for a release with a network
    /// interface, 1 for one served on its console).
    #[serde(default)]
    pub target: Option<f64>,
    /// The port the unikernel serves on (default: the health probe's port, else 80).
    #[serde(default)]
    pub guest_port: Option<u16>,
    #[serde(default = "thirty")]
    pub stable_window_secs: u64,
    #[serde(default = "three")]
    pub panic_window_secs: u64,
    #[serde(default = "thirty")]
    pub idle_secs: u64,
    /// Refused: the hosted host is the device's `[hosted]` table now (kept so an old
    /// config is told so, not told "unknown field").
    #[serde(default, skip_serializing)]
    pub remote_uri: Option<String>,
    /// How long a connection is held waiting for an instance before it is closed.
    #[serde(default = "thirty")]
    pub hold_secs: u64,
    /// Most connections held at once; more are closed at once.
    #[serde(default = "max_held")]
    pub max_held: usize,
    /// How long an instance being retired (scaled down, or of a release rolled over)
    /// keeps its open connections; then they are closed and counted.
    #[serde(default = "thirty")]
    pub drain_secs: u64,
    /// Instances kept booted, healthy and paused (no CPU; memory stays) beside the
    /// running ones: a connection resumes one in milliseconds instead of booting one, and
    /// another is booted in the background to take its place.
    #[serde(default)]
    pub warm: u32,
}

fn max_held() -> usize {
    256
}

fn two() -> u32 {
    2
}
fn three() -> u64 {
    3
}
fn thirty() -> u64 {
    30
}

impl OnDemandConfig {
    /// The autoscaler's settings for instances of `m`; `hosted`: whether they may burst
    /// to a hosted host ([`bursts`]).
    pub fn scale(&self, m: &Manifest, hosted: bool) -> ScaleConfig {
        let target = self
            .target
            .unwrap_or(if m.boot.network { 32.0 } else { 1.0 });
        ScaleConfig {
            min: self.min,
            max_local: self.max_local,
            max_remote: if hosted { self.max_remote } else { 0 },
            target,
            stable_window: Duration::from_secs(self.stable_window_secs),
            panic_window: Duration::from_secs(self.panic_window_secs),
            idle: Duration::from_secs(self.idle_secs),
            drain: Duration::from_secs(self.drain_secs),
            ..ScaleConfig::default()
        }
    }

    /// Why instances of `m` cannot run on a hosted host, if they cannot: they are
    /// reached on their network interface there (routed to the device), and probed on it.
    pub fn cannot_burst(m: &Manifest) -> Option<&'static str> {
        match (&m.boot.probe, m.boot.network) {
            (_, false) => Some("the release has no network interface (publish it with --network)"),
            (HealthProbe::ConsoleBanner { .. }, true) => {
                Some("its health probe reads the console, which a hosted host does not keep (use http: or tcp:)")
            }
            _ => None,
        }
    }

    /// The port a release's unikernel serves on, on its guest address.
    pub fn guest_port(&self, m: &Manifest) -> u16 {
        self.guest_port.unwrap_or(match m.boot.probe {
            HealthProbe::TcpConnect { port } | HealthProbe::Http { port, .. } if port != 0 => port,
            _ => 80,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 32: the crash hook shipped in product builds (any device.toml could make the
    /// agent abort mid-install). Without the `test-hooks` feature a config naming it is
    /// refused. Run by `scripts/test.sh` on the device package alone (in the workspace
    /// the tests package turns the feature on).
    #[test]
    fn a_product_build_refuses_the_crash_hook() {
        let text = "name = \"d\"\nfleet = \"home\"\nchannel = \"stable\"\napps = [\"hello\"]\n\
                    root = \"root.bin\"\nkey = \"device.key\"\nstate_dir = \"state\"\n\
                    crash_at = \"installed\"\n";
        let said = Config::parse(text, Path::new("/etc/unifleet"));
        if cfg!(feature = "test-hooks") {
            assert!(said.is_ok(), "{said:?}");
        } else {
            assert!(matches!(said, Err(ConfigError::TestHook)), "{said:?}");
        }
    }
}
