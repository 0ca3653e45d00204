//! Activation through libvirt: one backend, many hypervisors, chosen by URI.
//!
//! libvirt is a synchronous C library: every method here blocks and is called from
//! `spawn_blocking`. Domains are transient (`create_domain_xml`), named
//! `uf-<device>-<app>-r<release>`, so a restarted agent can find and replace them.

use proto::manifest::{BootSpec, HealthProbe, Platform};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Everything needed to boot one instance.
#[derive(Debug, Clone)]
pub struct Launch {
    pub name: String,
    pub platform: Platform,
    pub image: PathBuf,
    pub boot: BootSpec,
    /// QEMU and Xen copy the first serial console here.
    pub console_log: PathBuf,
    /// The network interface, if the release asks for one (`BootSpec::network`).
    pub nic: Option<Nic>,
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

impl Nic {
    /// The `<interface>` element: virtio on QEMU, the PV netfront on Xen.
    fn xml(&self, driver: Driver) -> String {
        let source = match self {
            Nic::Network(n) => format!("<interface type='network'><source network='{n}'/>"),
            Nic::Bridge(b) => format!("<interface type='bridge'><source bridge='{b}'/>"),
        };
        let model = match driver {
            Driver::Qemu => "<model type='virtio'/>",
            Driver::Xen | Driver::Test => "",
        };
        format!("{source}{model}</interface>")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("connecting to libvirt at {uri}: {source}")]
    Connect {
        uri: String,
        source: virt::error::Error,
    },
    /// The last of the attempts' errors (each with a new console port).
    #[error("starting domain {name}: {source}")]
    Start {
        name: String,
        source: virt::error::Error,
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
    #[error("booting {name}: the boot thread panicked")]
    BootPanicked { name: String },
}

/// Why an instance was not found healthy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailure {
    #[error("domain is not running")]
    NotRunning,
    #[error("domain stopped before becoming healthy")]
    Stopped,
    #[error("not healthy within {0:?}")]
    Timeout(Duration),
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

/// Owns one libvirt connection (opened on first use, reopened after an error). Transient
/// domains live as long as the daemon — or, with the test driver, the connection — does.
#[derive(Debug)]
pub struct Activator {
    uri: String,
    domain_type: String,
    conn: std::sync::Mutex<Option<virt::connect::Connect>>,
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The domain XML for `l` on `driver`. `serial_port` is the loopback TCP port of the
/// console for QEMU (where the proxy and probes can reach it).
pub fn render_xml(l: &Launch, driver: Driver, domain_type: &str, serial_port: u16) -> String {
    let name = xml_escape(&l.name);
    let kernel = xml_escape(&l.image.display().to_string());
    let cmdline = xml_escape(&l.boot.cmdline);
    let log = xml_escape(&l.console_log.display().to_string());
    let mem = l.boot.memory_mib;
    let vcpus = l.boot.vcpus;
    let lifecycle = "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>";
    let nic = l.nic.as_ref().map(|n| n.xml(driver)).unwrap_or_default();
    match driver {
        Driver::Test => format!(
            "<domain type='test'><name>{name}</name><memory unit='MiB'>{mem}</memory><vcpu>{vcpus}</vcpu>\
             <os><type>hvm</type><kernel>{kernel}</kernel></os>{lifecycle}<devices>{nic}</devices></domain>"
        ),
        Driver::Qemu => {
            let os_type = match l.platform {
                Platform::QemuAarch64 => "<type arch='aarch64' machine='virt'>hvm</type>",
                _ => "<type arch='x86_64' machine='pc'>hvm</type>",
            };
            // `-M virt` under TCG: a Cortex-A53 and the GICv2 the test image drives; under
            // KVM on an arm64 host, the host's own CPU.
            let machine = match (l.platform, domain_type) {
                (Platform::QemuAarch64, "kvm") => {
                    "<features><gic version='2'/></features><cpu mode='host-passthrough'/>"
                }
                (Platform::QemuAarch64, _) => {
                    "<features><gic version='2'/></features>\
                     <cpu mode='custom' match='exact'><model fallback='forbid'>cortex-a53</model></cpu>"
                }
                _ => "",
            };
            format!(
                "<domain type='{domain_type}'><name>{name}</name><memory unit='MiB'>{mem}</memory><vcpu>{vcpus}</vcpu>\
                 <os>{os_type}<kernel>{kernel}</kernel><cmdline>{cmdline}</cmdline></os>{machine}\
                 {lifecycle}<devices>\
                 <serial type='tcp'><source mode='bind' host='127.0.0.1' service='{serial_port}' tls='no'/>\
                 <protocol type='raw'/><log file='{log}' append='off'/><target port='0'/></serial>\
                 {nic}<memballoon model='none'/></devices></domain>"
            )
        }
        Driver::Xen => {
            let os_type = match l.platform {
                // No `arch` for ARM guests: libvirt's schema allows it on Xen PV types only
                // for x86 and ia64, and on an ARM Xen host the default is the host's own
                // (libxl reports `xen-3.0-armv7l` / `xen-3.0-aarch64` guests).
                Platform::XenArm32 => "<type machine='xenpv'>linux</type>",
                Platform::XenX86_64Pvh => "<type arch='x86_64' machine='xenpvh'>xenpvh</type>",
                Platform::QemuX86_64 => "<type arch='x86_64' machine='xenfv'>hvm</type>",
                Platform::QemuAarch64 => "<type machine='xenpv'>linux</type>",
            };
            format!(
                "<domain type='xen'><name>{name}</name><memory unit='MiB'>{mem}</memory><vcpu>{vcpus}</vcpu>\
                 <os>{os_type}<kernel>{kernel}</kernel><cmdline>{cmdline}</cmdline></os>{lifecycle}\
                 <devices><console type='pty'><log file='{log}' append='off'/><target type='xen' port='0'/></console>{nic}</devices></domain>"
            )
        }
    }
}

/// Last `max` bytes of the console log, for reports.
pub fn console_tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

impl Activator {
    pub fn new(uri: &str, domain_type: &str) -> Activator {
        // Every libvirt error comes back as a Result and is reported with its context;
        // libvirt's default handler would also print it (a domain not found is normal).
        virt::error::clear_error_callback();
        Activator {
            uri: uri.into(),
            domain_type: domain_type.into(),
            conn: std::sync::Mutex::new(None),
        }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn driver(&self) -> Driver {
        Driver::of(&self.uri)
    }

    /// Runs `f` with the connection, opening it if needed; a failed call drops the
    /// connection so the next one reconnects (libvirtd may have restarted).
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&virt::connect::Connect) -> Result<T, ActivateError>,
    ) -> Result<T, ActivateError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(virt::connect::Connect::open(Some(&self.uri)).map_err(|e| {
                ActivateError::Connect {
                    uri: self.uri.clone(),
                    source: e,
                }
            })?);
        }
        let conn = guard.as_ref().expect("just opened");
        let res = f(conn);
        if res.is_err() && !conn.is_alive().unwrap_or(false) {
            *guard = None;
        }
        res
    }

    /// Starts `launch` and probes it on a blocking thread (libvirt is synchronous); returns
    /// the console port. The one boot path of the updater and the on-demand pool.
    pub async fn boot(self: std::sync::Arc<Self>, launch: Launch) -> Result<u16, ActivateError> {
        let name = launch.name.clone();
        tokio::task::spawn_blocking(move || {
            let port = self.start(&launch)?;
            self.probe(&launch, port).map(|()| port)
        })
        .await
        .unwrap_or(Err(ActivateError::BootPanicked { name }))
    }

    /// Starts a transient domain; returns the console's TCP port (QEMU) or 0. Replaces a
    /// leftover domain of the same name (e.g. from before a crash).
    pub fn start(&self, l: &Launch) -> Result<u16, ActivateError> {
        self.with_conn(|conn| self.start_on(conn, l))
    }

    fn start_on(&self, conn: &virt::connect::Connect, l: &Launch) -> Result<u16, ActivateError> {
        if let Ok(old) = conn.lookup_domain_by_name(&l.name) {
            let _ = old.destroy();
            let _ = old.undefine();
        }
        let _ = std::fs::remove_file(&l.console_log);
        let mut last = None;
        for _ in 0..3 {
            let port = if self.driver() == Driver::Qemu {
                free_port()
            } else {
                0
            };
            let xml = render_xml(l, self.driver(), &self.domain_type, port);
            match conn.create_domain_xml(&xml, 0) {
                Ok(_) => return Ok(port),
                // A port taken between choosing and binding: choose again.
                Err(e) => last = Some(e),
            }
        }
        Err(ActivateError::Start {
            name: l.name.clone(),
            source: last.expect("three attempts made"),
        })
    }

    /// Whether the domain `name` runs: `Ok(false)` only when libvirt says there is no such
    /// domain or it is not active; an unreachable libvirtd is an error, not a dead domain
    /// (the watchdog would otherwise "restart" healthy releases through a libvirtd restart).
    pub fn running(&self, name: &str) -> Result<bool, ActivateError> {
        self.with_conn(|conn| match conn.lookup_domain_by_name(name) {
            Ok(d) => d.is_active().map_err(|e| ActivateError::Query {
                name: name.into(),
                source: e,
            }),
            Err(e) if e.code().is(virt::error::ErrorNumber::NoDomain) => Ok(false),
            Err(e) => Err(ActivateError::Query {
                name: name.into(),
                source: e,
            }),
        })
    }

    /// Whether `name` is known to run (an unreachable libvirt: no).
    pub fn is_running(&self, name: &str) -> bool {
        self.running(name).unwrap_or(false)
    }

    pub fn stop(&self, name: &str) -> Result<(), ActivateError> {
        self.with_conn(|conn| match conn.lookup_domain_by_name(name) {
            Ok(d) => {
                if d.is_active().unwrap_or(false) {
                    d.destroy().map_err(|e| ActivateError::Stop {
                        name: name.into(),
                        source: e,
                    })?;
                }
                let _ = d.undefine();
                Ok(())
            }
            Err(_) => Ok(()),
        })
    }

    /// Waits until the instance is healthy or the boot spec's timeout passes.
    ///
    /// With libvirt's test driver nothing really boots: the probe is that the domain is
    /// running. With QEMU and Xen it is the console banner or a TCP connect.
    pub fn probe(&self, l: &Launch, console_port: u16) -> Result<(), ActivateError> {
        let timeout = Duration::from_millis(l.boot.probe_timeout_ms);
        let deadline = Instant::now() + timeout;
        let fail = |reason: ProbeFailure| ActivateError::Probe {
            name: l.name.clone(),
            reason,
            console_tail: console_tail(&l.console_log, proto::status::MAX_CONSOLE_TAIL),
        };
        if self.driver() == Driver::Test {
            return if self.is_running(&l.name) {
                Ok(())
            } else {
                Err(fail(ProbeFailure::NotRunning))
            };
        }
        loop {
            let ok = match &l.boot.probe {
                HealthProbe::ConsoleBanner { line } => std::fs::read_to_string(&l.console_log)
                    .map(|t| t.lines().any(|l| l.trim_end() == line))
                    .unwrap_or(false),
                HealthProbe::TcpConnect { port } => {
                    let port = if *port == 0 { console_port } else { *port };
                    std::net::TcpStream::connect_timeout(
                        &([127, 0, 0, 1], port).into(),
                        Duration::from_millis(200),
                    )
                    .is_ok()
                }
            };
            if ok {
                return Ok(());
            }
            if !self.is_running(&l.name) {
                return Err(fail(ProbeFailure::Stopped));
            }
            if Instant::now() >= deadline {
                return Err(fail(ProbeFailure::Timeout(timeout)));
            }
            // The console log is written by another process: polling it is the only way
            // to see it; the interval is short and the deadline bounds the wait.
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watchdog restarts what is stopped; a libvirt it cannot reach must not look
    /// like a stopped domain (through a libvirtd restart every healthy release would be
    /// restarted four times and rolled back).
    #[test]
    fn an_unreachable_libvirt_is_an_error_not_a_stopped_domain() {
        let unreachable = Activator::new("test:///nonexistent/unifleet-no-such-file.xml", "qemu");
        assert!(matches!(
            unreachable.running("uf-d1-hello-r1"),
            Err(ActivateError::Connect { .. })
        ));
        let test = Activator::new("test:///default", "qemu");
        assert!(!test.running("uf-no-such-domain-anywhere").unwrap());
    }

    fn launch(platform: Platform) -> Launch {
        Launch {
            name: "uf-d1-hello-r3".into(),
            platform,
            image: "/var/lib/unifleet/slots/hello-3.img".into(),
            boot: BootSpec {
                memory_mib: 32,
                vcpus: 1,
                cmdline: "console=hvc0 <x>".into(),
                probe: HealthProbe::ConsoleBanner {
                    line: "READY".into(),
                },
                probe_timeout_ms: 1000,
                network: false,
            },
            console_log: "/tmp/c.log".into(),
            nic: None,
        }
    }

    #[test]
    fn xml_per_platform() {
        let arm = render_xml(&launch(Platform::XenArm32), Driver::Xen, "qemu", 0);
        assert!(arm.contains("<type machine='xenpv'>linux</type>"), "{arm}");
        assert!(arm.contains("<kernel>/var/lib/unifleet/slots/hello-3.img</kernel>"));
        assert!(
            arm.contains("console=hvc0 &lt;x&gt;"),
            "cmdline escaped: {arm}"
        );
        let pvh = render_xml(&launch(Platform::XenX86_64Pvh), Driver::Xen, "qemu", 0);
        assert!(pvh.contains("machine='xenpvh'>xenpvh</type>"), "{pvh}");
        let q = render_xml(&launch(Platform::QemuX86_64), Driver::Qemu, "kvm", 4555);
        assert!(q.starts_with("<domain type='kvm'>"));
        assert!(q.contains("<type arch='x86_64' machine='pc'>hvm</type><kernel>"));
        assert!(
            q.contains("service='4555'") && q.contains("host='127.0.0.1'"),
            "{q}"
        );
        let t = render_xml(&launch(Platform::QemuX86_64), Driver::Test, "qemu", 0);
        assert!(t.starts_with("<domain type='test'>"));
    }

    /// Every domain XML the agent can render, for every platform on every driver, passes
    /// libvirt's own schema (`virt-xml-validate`, from libvirt-clients with xmllint; both
    /// installed by scripts/setup.sh): a substring check let invalid XML through.
    #[test]
    fn every_rendered_domain_passes_libvirts_schema() {
        let dir = tempfile::tempdir().unwrap();
        let mut checked = 0;
        let nics = [
            None,
            Some(Nic::Network("default".into())),
            Some(Nic::Bridge("xenbr0".into())),
        ];
        for platform in Platform::ALL {
            for (driver, domain_type) in [
                (Driver::Test, "qemu"),
                (Driver::Qemu, "qemu"),
                (Driver::Qemu, "kvm"),
                (Driver::Xen, "xen"),
            ] {
                for nic in &nics {
                    let mut l = launch(platform);
                    l.boot.network = nic.is_some();
                    l.nic = nic.clone();
                    let xml = render_xml(&l, driver, domain_type, 4555);
                    if let Some(n) = nic {
                        assert!(xml.contains(&n.xml(driver)), "{xml}");
                    }
                    let path = dir.path().join(format!("{checked}.xml"));
                    std::fs::write(&path, &xml).unwrap();
                    let out = std::process::Command::new("virt-xml-validate")
                        .arg(&path)
                        .arg("domain")
                        .output()
                        .expect("virt-xml-validate not runnable; install libvirt-clients and libxml2-utils");
                    assert!(
                        out.status.success(),
                        "{platform} on {driver:?}/{domain_type} with {nic:?} does not validate:\n{xml}\n{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, Platform::ALL.len() * 4 * nics.len());
        assert_eq!("bridge=br0".parse(), Ok(Nic::Bridge("br0".into())));
        assert!("br0".parse::<Nic>().is_err() && "network=a'b".parse::<Nic>().is_err());
    }

    #[test]
    fn test_driver_lifecycle() {
        let a = Activator::new("test:///default", "qemu");
        let mut l = launch(Platform::QemuX86_64);
        l.name = format!("uf-unit-{}", std::process::id());
        a.start(&l).unwrap();
        assert!(a.is_running(&l.name));
        a.probe(&l, 0).unwrap();
        a.stop(&l.name).unwrap();
        assert!(!a.is_running(&l.name));
        // With a network interface on the test driver's own network.
        l.boot.network = true;
        l.nic = Some(Nic::Network("default".into()));
        l.name.push_str("-nic");
        a.start(&l).unwrap();
        assert!(a.is_running(&l.name));
        a.stop(&l.name).unwrap();
    }
}
