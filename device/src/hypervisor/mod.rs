//! The one owner of the hypervisor: a [`Backend`] (libvirt, or a fake in unit tests) lives
//! on a thread of its own and takes typed commands from cloneable [`Hypervisor`] handles,
//! each with a oneshot reply. Nothing else touches `virt::Connect`.
//!
//! libvirt is a synchronous C library, and one connection serialises its calls anyway;
//! one thread per connection makes that explicit, keeps blocking calls off the async
//! runtime, and lets a test swap the whole hypervisor for `fake::Fake`. Health probes do
//! not run on the owner: they speak to the guest from the caller's task
//! (`crate::probe`, which also holds the one boot path: start, then probe) and only ask
//! the owner whether the domain still runs and which address it has, so one slow boot
//! does not hold up the others' probes.
//!
//! Modules: [`libvirt`] (the backend over `virt`, domain XML per platform), `fake` (a
//! scripted backend for unit tests).

pub mod addresses;
#[cfg(test)]
pub mod fake;
pub mod hosted;
pub mod libvirt;

pub use libvirt::{render_xml, Libvirt};

use proto::manifest::{BootSpec, Platform};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Everything needed to boot one instance.
#[derive(Debug, Clone)]
pub struct Launch {
    pub name: String,
    /// Which release it is an instance of.
    pub of: ReleaseOf,
    pub platform: Platform,
    pub image: PathBuf,
    pub boot: BootSpec,
    /// QEMU and Xen copy the first serial console here.
    pub console_log: PathBuf,
    /// The network interface, if the release asks for one (`BootSpec::network`).
    pub nic: Option<Nic>,
    /// Overrides the hypervisor's domain type (`kvm`, `qemu`): the accelerator measured
    /// for this release ([`crate::accel`]).
    pub domain_type: Option<String>,
}

/// The release an instance is of: a hosted host names the image's volume and the domain's
/// metadata after it, and checks the uploaded image against its signed digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseOf {
    pub app: String,
    pub release: u64,
    /// The image's BLAKE3 digest, from the signed manifest.
    pub image: proto::Digest,
}

impl ReleaseOf {
    pub fn of(m: &proto::manifest::Manifest) -> ReleaseOf {
        ReleaseOf {
            app: m.app.clone(),
            release: m.release,
            image: m.image_digest,
        }
    }
}

/// Where a domain's network interface is attached (device.toml `nic`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nic {
    /// A libvirt network (`network=default`).
    Network(String),
    /// A host bridge (`bridge=xenbr0`).
    Bridge(String),
}

/// A `nic` setting that is neither `network=NAME` nor `bridge=NAME`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("nic = {0:?}: use network=NAME (a libvirt network) or bridge=NAME (a host bridge)")]
pub struct BadNic(pub String);

impl std::str::FromStr for Nic {
    type Err = BadNic;
    fn from_str(s: &str) -> Result<Nic, BadNic> {
        let ok = |n: &str| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        match s.split_once('=') {
            Some(("network", n)) if ok(n) => Ok(Nic::Network(n.into())),
            Some(("bridge", n)) if ok(n) => Ok(Nic::Bridge(n.into())),
            _ => Err(BadNic(s.into())),
        }
    }
}

impl std::fmt::Display for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Nic::Network(n) => write!(f, "network={n}"),
            Nic::Bridge(b) => write!(f, "bridge={b}"),
        }
    }
}

/// Which family of libvirt driver a URI selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Test,
    Qemu,
    Xen,
}

impl Driver {
    pub fn of(uri: &str) -> Driver {
        if uri.starts_with("test:") {
            Driver::Test
        } else if uri.starts_with("xen") {
            Driver::Xen
        } else {
            Driver::Qemu
        }
    }
}

/// One variant per operation that failed. The message includes libvirt's (callers log
/// and report it with `{}`).
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("connecting to libvirt at {uri}: {source}")]
    Connect {
        uri: String,
        source: virt::error::Error,
    },
    /// The last of the attempts' errors (each with a new console port); `fault`, where
    /// the host is known to be the cause, with the next step.
    #[error("starting domain {name}{}: {source}", fault.as_ref().map(|f| format!(" ({f})")).unwrap_or_default())]
    Start {
        name: String,
        source: virt::error::Error,
        fault: Option<Box<HostFault>>,
    },
    #[error("making the console log {path}: {source}")]
    ConsoleLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("health probe of {name} failed: {reason}")]
    Probe {
        name: String,
        reason: ProbeFailure,
        console_tail: String,
    },
    #[error("stopping domain {name}: {source}")]
    Stop {
        name: String,
        source: virt::error::Error,
    },
    #[error("asking libvirt whether {name} runs: {source}")]
    Query {
        name: String,
        source: virt::error::Error,
    },
    #[error("pausing domain {name}: {source}")]
    Pause {
        name: String,
        source: virt::error::Error,
    },
    #[error("resuming domain {name}: {source}")]
    Resume {
        name: String,
        source: virt::error::Error,
    },
    #[error(
        "no free guest address for {name}: all {in_use} of guest_addresses = \"{pool}\" are in use"
    )]
    NoGuestAddress {
        name: String,
        pool: String,
        in_use: usize,
    },
    #[error("listing the domains running on {uri}: {source}")]
    List {
        uri: String,
        source: virt::error::Error,
    },
    #[error("reading the capabilities of {uri}: {source}")]
    Capabilities {
        uri: String,
        source: virt::error::Error,
    },
    /// The image could not be made ready on the hosted host (uploaded and checked).
    #[error("staging the image of {name} on {uri}: {source}")]
    Stage {
        name: String,
        uri: String,
        source: Box<hosted::StageError>,
    },
    #[error("deleting retired images of {app} on {uri}: {source}")]
    Retire {
        app: String,
        uri: String,
        source: Box<hosted::StageError>,
    },
    #[error("asking libvirt for the address of {name}: {source}")]
    Address {
        name: String,
        source: virt::error::Error,
    },
    /// A hypervisor command panicked (it failed alone; the owner goes on).
    #[error("the hypervisor's {op} command panicked")]
    Panicked { op: &'static str },
    /// The owner thread is gone (the agent is shutting down).
    #[error("the hypervisor thread for {uri} is gone")]
    Gone { uri: String },
}

impl ActivateError {
    /// Whether the release itself failed (its domain would not start, or started and was
    /// not healthy) — never tried again — rather than the hypervisor or the address pool
    /// (tried again later).
    pub fn blames_the_release(&self) -> bool {
        match self {
            // The host's fault: every release would fail the same way.
            ActivateError::Start { fault, .. } => fault.is_none(),
            ActivateError::Probe { .. } => true,
            _ => false,
        }
    }

    /// Whether the host was not reached at all (not connected to, or the image not made
    /// ready there): nothing was created on it, and the failure is the host's whatever
    /// became of the instance asked for.
    pub fn host_unreached(&self) -> bool {
        matches!(
            self,
            ActivateError::Connect { .. } | ActivateError::Stage { .. }
        )
    }

    /// The console's last lines, when the probe failed (for the report).
    pub fn console_tail(&self) -> &str {
        match self {
            ActivateError::Probe { console_tail, .. } => console_tail,
            _ => "",
        }
    }
}

/// Why an instance was not found healthy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailure {
    #[error("domain is not running")]
    NotRunning,
    #[error("domain stopped before becoming healthy")]
    Stopped,
    /// A paused instance did not answer once resumed: what the probe saw.
    #[error("not answering after it resumed: {0}")]
    Unanswered(String),
    /// `last` says what the probe saw on its last try ("GET /health answered 500").
    #[error("not healthy within {after:?}: {last}")]
    Timeout { after: Duration, last: String },
}

/// A start that failed because of the host, not the release.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostFault {
    /// QEMU runs as its own user under this libvirt (`libvirt-qemu` on Debian) and cannot
    /// open the kernel: it must be able to traverse the agent's state directory.
    #[error(
        "QEMU runs as its own user under this libvirt and cannot read {}: let it traverse \
         the state directory, e.g. `setfacl -m u:libvirt-qemu:x {}`, as the unifleet-device \
         package does for /var/lib/unifleet",
        image.display(),
        state_dir.display()
    )]
    KernelUnreadable { image: PathBuf, state_dir: PathBuf },
}

/// A domain just created: its console's loopback port (QEMU), or 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    pub console_port: u16,
}

/// A booted, healthy instance and how to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Booted {
    pub console_port: u16,
    /// The guest's address on its network interface, if it has one.
    pub address: Option<IpAddr>,
}

impl Booted {
    /// Where the instance's service on `port` answers: the guest's own address, or (no
    /// network interface) the console on the device's loopback, where the test image
    /// answers.
    pub fn endpoint(&self, port: u16) -> SocketAddr {
        match self.address {
            Some(ip) => SocketAddr::new(ip, port),
            None => SocketAddr::from(([127, 0, 0, 1], self.console_port)),
        }
    }
}

/// A hypervisor as its owner thread drives it: every call may block.
pub trait Backend: Send + 'static {
    /// Which driver family it speaks to (the probe is lighter on the test driver).
    fn driver(&self) -> Driver;
    /// Creates a transient domain, replacing a leftover one of the same name.
    fn start(&mut self, launch: &Launch) -> Result<Started, ActivateError>;
    /// `Ok(false)` only when the domain does not exist or is not active; an unreachable
    /// hypervisor is an error, not a dead domain.
    fn running(&mut self, name: &str) -> Result<bool, ActivateError>;
    /// Destroys the domain; one that does not exist is stopped already.
    fn stop(&mut self, name: &str) -> Result<(), ActivateError>;
    /// The guest's address on its network interface, once it has one (a DHCP lease).
    fn address(&mut self, name: &str) -> Result<Option<IpAddr>, ActivateError>;
    /// Stops the guest's CPUs; its memory, devices and address stay.
    fn pause(&mut self, name: &str) -> Result<(), ActivateError>;
    /// Runs a paused guest again.
    fn resume(&mut self, name: &str) -> Result<(), ActivateError>;
    /// Whether the host runs domains of `domain_type` (`kvm`: is there KVM?).
    fn offers(&mut self, domain_type: &str) -> Result<bool, ActivateError>;
    /// The names of running (or paused) domains that start with `prefix` (on a hosted
    /// host, only those whose metadata names this device).
    fn named(&mut self, prefix: &str) -> Result<Vec<String>, ActivateError>;
    /// On a hosted host, deletes the images of `app` uploaded there, except `keep`'s;
    /// returns how many. Elsewhere nothing is uploaded: `Ok(0)`.
    fn retire(&mut self, app: &str, keep: Option<&Launch>) -> Result<u32, ActivateError>;
}

type Reply<T> = oneshot::Sender<Result<T, ActivateError>>;

enum Command {
    Start(Box<Launch>, Reply<Started>),
    Running(String, Reply<bool>),
    Stop(String, Reply<()>),
    Address(String, Reply<Option<IpAddr>>),
    Pause(String, Reply<()>),
    Resume(String, Reply<()>),
    Offers(String, Reply<bool>),
    Named(String, Reply<Vec<String>>),
    Retire(String, Option<Box<Launch>>, Reply<u32>),
}

/// libvirt's domain types for QEMU: hardware virtualisation, and QEMU's own TCG.
pub const KVM: &str = "kvm";
pub const TCG: &str = "qemu";

/// Runs one command and sends its result; a command that panics (virt's handles can
/// panic on drop) fails alone instead of taking the owner thread, and so every later
/// command, with it.
fn reply<T>(to: Reply<T>, op: &'static str, run: impl FnOnce() -> Result<T, ActivateError>) {
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or(Err(ActivateError::Panicked { op }));
    drop(to.send(res));
}

/// Commands waiting for the owner: a boot storm of the on-demand pool at most.
const QUEUE: usize = 64;

/// A handle on the owner thread of one hypervisor connection. Cheap to clone; the thread
/// ends when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct Hypervisor {
    tx: mpsc::Sender<Command>,
    uri: Arc<str>,
    driver: Driver,
}

impl Hypervisor {
    /// libvirt at `uri`, domains of type `domain_type` (`kvm`, `qemu`, `xen`, `auto`),
    /// guests with a NIC given static addresses from `addresses` if set.
    pub fn libvirt(
        uri: &str,
        domain_type: &str,
        addresses: Option<addresses::GuestAddresses>,
    ) -> Hypervisor {
        let backend = Libvirt::new(uri, domain_type).with_addresses(addresses);
        Hypervisor::spawn(uri, backend)
    }

    /// A hosted host's libvirt at `uri` (its TLS files already in the URI's `pkipath`):
    /// images uploaded into its storage pool, guests on its network with addresses from
    /// `addresses`. Named (and logged) by `shown`, the URI without its parameters.
    pub fn hosted(
        uri: &str,
        shown: &str,
        domain_type: &str,
        addresses: Option<addresses::GuestAddresses>,
        hosted: hosted::Hosted,
    ) -> Hypervisor {
        let backend = Libvirt::new(uri, domain_type)
            .with_addresses(addresses)
            .hosted(hosted);
        Hypervisor::spawn(shown, backend)
    }

    /// Moves `backend` onto a thread of its own.
    pub fn spawn(uri: &str, mut backend: impl Backend) -> Hypervisor {
        let (tx, mut rx) = mpsc::channel::<Command>(QUEUE);
        let driver = backend.driver();
        let spawned = std::thread::Builder::new()
            .name("hypervisor".into())
            .spawn(move || {
                while let Some(cmd) = rx.blocking_recv() {
                    // A reply nobody waits for any more (the caller was cancelled) is
                    // dropped: the operation itself has happened.
                    match cmd {
                        Command::Start(l, r) => reply(r, "start", || backend.start(&l)),
                        Command::Running(n, r) => reply(r, "running", || backend.running(&n)),
                        Command::Stop(n, r) => reply(r, "stop", || backend.stop(&n)),
                        Command::Address(n, r) => reply(r, "address", || backend.address(&n)),
                        Command::Pause(n, r) => reply(r, "pause", || backend.pause(&n)),
                        Command::Resume(n, r) => reply(r, "resume", || backend.resume(&n)),
                        Command::Offers(t, r) => reply(r, "offers", || backend.offers(&t)),
                        Command::Named(p, r) => reply(r, "list", || backend.named(&p)),
                        Command::Retire(a, k, r) => {
                            reply(r, "retire", || backend.retire(&a, k.as_deref()))
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the thread every call answers `Gone`, naming the URI.
            tracing::error!(uri, "cannot start the hypervisor thread: {e}");
        }
        Hypervisor {
            tx,
            uri: uri.into(),
            driver,
        }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn driver(&self) -> Driver {
        self.driver
    }

    async fn call<T>(&self, cmd: impl FnOnce(Reply<T>) -> Command) -> Result<T, ActivateError> {
        let gone = || ActivateError::Gone {
            uri: self.uri.to_string(),
        };
        let (reply, answer) = oneshot::channel();
        self.tx.send(cmd(reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    pub async fn start(&self, launch: &Launch) -> Result<Started, ActivateError> {
        self.call(|r| Command::Start(Box::new(launch.clone()), r))
            .await
    }

    /// Whether the domain `name` runs (see [`Backend::running`]).
    pub async fn running(&self, name: &str) -> Result<bool, ActivateError> {
        self.call(|r| Command::Running(name.into(), r)).await
    }

    /// Whether `name` is known to run (an unreachable hypervisor: no).
    pub async fn is_running(&self, name: &str) -> bool {
        self.running(name).await.unwrap_or(false)
    }

    /// Whether `name` is known to be stopped: a failed check (libvirtd restarting) is not
    /// a dead domain, so nothing is restarted on a guess.
    pub async fn is_stopped(&self, name: &str) -> bool {
        match self.running(name).await {
            Ok(running) => !running,
            Err(e) => {
                tracing::debug!("{e}");
                false
            }
        }
    }

    pub async fn stop(&self, name: &str) -> Result<(), ActivateError> {
        self.call(|r| Command::Stop(name.into(), r)).await
    }

    pub async fn address(&self, name: &str) -> Result<Option<IpAddr>, ActivateError> {
        self.call(|r| Command::Address(name.into(), r)).await
    }

    pub async fn pause(&self, name: &str) -> Result<(), ActivateError> {
        self.call(|r| Command::Pause(name.into(), r)).await
    }

    pub async fn resume(&self, name: &str) -> Result<(), ActivateError> {
        self.call(|r| Command::Resume(name.into(), r)).await
    }

    pub async fn offers(&self, domain_type: &str) -> Result<bool, ActivateError> {
        self.call(|r| Command::Offers(domain_type.into(), r)).await
    }

    /// Running or paused domains whose names start with `prefix`.
    pub async fn named(&self, prefix: &str) -> Result<Vec<String>, ActivateError> {
        self.call(|r| Command::Named(prefix.into(), r)).await
    }

    /// Deletes images of `app` uploaded to a hosted host, except `keep`'s (see
    /// [`Backend::retire`]).
    pub async fn retire(&self, app: &str, keep: Option<&Launch>) -> Result<u32, ActivateError> {
        let keep = keep.map(|l| Box::new(l.clone()));
        self.call(|r| Command::Retire(app.into(), keep, r)).await
    }
}

/// Last `max` bytes of the console log, for reports.
pub fn console_tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).into_owned()
}
