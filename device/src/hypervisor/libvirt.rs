//! The libvirt backend: one connection (opened on first use, reopened after an error),
//! domain XML per platform. Domains are transient (`create_domain_xml`), named
//! `uf-<device>-<app>-r<release>`, so a restarted agent can find and replace them.

use super::addresses::{ip_in_cmdline, GuestAddresses, Pool};
use super::hosted::Hosted;
use super::{ActivateError, Backend, Driver, HostFault, Launch, Nic, Started};
use proto::manifest::Platform;
use std::cell::RefCell;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

impl Nic {
    /// The `<interface>` element: virtio on QEMU, the PV netfront on Xen; with a static
    /// address, a MAC made from it.
    fn xml(&self, driver: Driver, ip: Option<Ipv4Addr>) -> String {
        let source = match self {
            Nic::Network(n) => format!("<interface type='network'><source network='{n}'/>"),
            Nic::Bridge(b) => format!("<interface type='bridge'><source bridge='{b}'/>"),
        };
        let mac = ip
            .map(|ip| format!("<mac address='{}'/>", mac_for(ip)))
            .unwrap_or_default();
        let source = format!("{source}{mac}");
        let model = match driver {
            Driver::Qemu => "<model type='virtio'/>",
            Driver::Xen | Driver::Test => "",
        };
        format!("{source}{model}</interface>")
    }
}

/// Owns one libvirt connection (opened on first use, reopened after an error). Transient
/// domains live as long as the daemon — or, with the test driver, the connection — does.
/// Lives on the hypervisor's owner thread ([`super::Hypervisor`]).
#[derive(Debug)]
pub struct Libvirt {
    uri: String,
    domain_type: String,
    conn: Option<virt::connect::Connect>,
    /// Guest addresses found, by domain name: a lease does not change while the domain
    /// runs, and each lookup costs a round trip to libvirtd.
    addresses: std::collections::HashMap<String, IpAddr>,
    /// Static guest addresses the device owns (`guest_addresses`), if configured.
    pool: Option<Pool>,
    /// Whether the addresses of domains already running were marked taken.
    adopted: bool,
    /// Set when this is a hosted host ([`super::hosted`]): images are uploaded there.
    hosted: Option<Hosted>,
    /// Image volumes on the hosted host checked intact since the connection opened
    /// (written from inside `with_conn`'s closure, which sees `&self`).
    verified: RefCell<HashSet<String>>,
}

pub(super) fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The domain XML for `l` on `driver`. `console` is the loopback TCP port of the console
/// for QEMU (where the proxy and probes can reach it), copied to `l.console_log`; `None`
/// on a hosted host, where neither the device's loopback nor its paths mean anything: the
/// console is a pty there, not kept.
pub fn render_xml(l: &Launch, driver: Driver, domain_type: &str, console: Option<u16>) -> String {
    let name = xml_escape(&l.name);
    let kernel = xml_escape(&l.image.display().to_string());
    let cmdline = xml_escape(&l.boot.cmdline);
    let log = xml_escape(&l.console_log.display().to_string());
    let serial = match console {
        Some(port) => format!(
            "<serial type='tcp'><source mode='bind' host='127.0.0.1' service='{port}' tls='no'/>\
             <protocol type='raw'/><log file='{log}' append='on'/><target port='0'/></serial>"
        ),
        None => "<serial type='pty'><target port='0'/></serial>".into(),
    };
    let xen_console = match console {
        Some(_) => format!("<console type='pty'><log file='{log}' append='on'/><target type='xen' port='0'/></console>"),
        None => "<console type='pty'><target type='xen' port='0'/></console>".into(),
    };
    let mem = l.boot.memory_mib;
    let vcpus = l.boot.vcpus;
    let lifecycle = "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>";
    let ip = ip_in_cmdline(&l.boot.cmdline);
    let nic = l
        .nic
        .as_ref()
        .map(|n| n.xml(driver, ip))
        .unwrap_or_default();
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
                 {lifecycle}<devices>{serial}{nic}<memballoon model='none'/></devices></domain>"
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
                 <devices>{xen_console}{nic}</devices></domain>"
            )
        }
    }
}

impl Libvirt {
    pub fn new(uri: &str, domain_type: &str) -> Libvirt {
        // Every libvirt error comes back as a Result and is reported with its context;
        // libvirt's default handler would also print it (a domain not found is normal).
        virt::error::clear_error_callback();
        Libvirt {
            uri: uri.into(),
            // "auto" before a release's trial (see `crate::accel`): TCG always works.
            domain_type: match domain_type {
                "auto" => super::TCG.into(),
                dt => dt.into(),
            },
            conn: None,
            addresses: Default::default(),
            pool: None,
            adopted: false,
            hosted: None,
            verified: RefCell::default(),
        }
    }

    /// A hosted host: images are uploaded into its storage pool, domains carry metadata
    /// naming this device, and their consoles are not kept. Its connection sends
    /// keepalives ([`super::hosted::start_event_loop`], called before any connection).
    pub fn hosted(mut self, hosted: Hosted) -> Libvirt {
        self.hosted = Some(hosted);
        self
    }

    /// Guests with a network interface get static addresses from `range`.
    pub fn with_addresses(mut self, range: Option<GuestAddresses>) -> Libvirt {
        self.pool = range.map(Pool::new);
        self
    }

    /// `uri` without its parameters (a TLS directory): what errors and logs name.
    fn shown(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }

    /// `l` with a static address on its command line, when the pool gives guests theirs
    /// and the release names none itself.
    fn with_static_address(&mut self, l: &Launch) -> Result<Launch, ActivateError> {
        let mut l = l.clone();
        if self.pool.is_none() || l.nic.is_none() || ip_in_cmdline(&l.boot.cmdline).is_some() {
            return Ok(l);
        }
        self.adopt_running()?;
        let pool = self.pool.as_mut().expect("checked above");
        let ip = pool
            .take(&l.name)
            .ok_or_else(|| ActivateError::NoGuestAddress {
                name: l.name.clone(),
                pool: pool.range.to_string(),
                in_use: pool.in_use(),
            })?;
        let words = pool.range.cmdline(ip);
        l.boot.cmdline = format!("{} {words}", l.boot.cmdline).trim().to_string();
        self.addresses.insert(l.name.clone(), IpAddr::V4(ip));
        Ok(l)
    }

    /// Once per connection's life: the static addresses of domains running already (from
    /// before an agent restart) are taken.
    fn adopt_running(&mut self) -> Result<(), ActivateError> {
        if self.adopted {
            return Ok(());
        }
        let uri = self.shown().to_string();
        let running = self.with_conn(|conn, _| {
            let active = virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE;
            let domains = conn
                .list_all_domains(active)
                .map_err(|e| ActivateError::List {
                    uri: uri.clone(),
                    source: e,
                })?;
            Ok(domains
                .iter()
                .filter_map(|d| Some((d.name().ok()?, d.xml_desc(0).ok()?)))
                .filter_map(|(name, xml)| Some((name, ip_in_cmdline(cmdline_of(&xml)?)?)))
                .collect::<Vec<_>>())
        })?;
        if let Some(pool) = &mut self.pool {
            for (name, ip) in running {
                pool.mark(ip, &name);
            }
        }
        self.adopted = true;
        Ok(())
    }

    /// Runs `op` on the domain `name`; `fail` names a failure.
    fn on_domain(
        &mut self,
        name: &str,
        op: impl Fn(&virt::domain::Domain) -> Result<(), virt::error::Error>,
        fail: fn(String, virt::error::Error) -> ActivateError,
    ) -> Result<(), ActivateError> {
        self.with_conn(|conn, _| {
            conn.lookup_domain_by_name(name)
                .and_then(|d| op(&d))
                .map_err(|e| fail(name.into(), e))
        })
    }

    /// The address `name` held goes back to the pool.
    fn release_address(&mut self, name: &str) {
        self.addresses.remove(name);
        if let Some(pool) = &mut self.pool {
            pool.give_back(name);
        }
    }

    /// Runs `f` with the connection, opening it if needed; a failed call drops the
    /// connection so the next one reconnects. A connection that had died since its last
    /// use (libvirtd restarted: the client only learns it on the next call) is replaced
    /// and `f` tried once more on the new one — every operation here can be repeated.
    fn with_conn<T>(
        &mut self,
        mut f: impl FnMut(&virt::connect::Connect, &Self) -> Result<T, ActivateError>,
    ) -> Result<T, ActivateError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let reused = self.conn.is_some();
            if self.conn.is_none() {
                let conn = virt::connect::Connect::open(Some(&self.uri)).map_err(|e| {
                    ActivateError::Connect {
                        uri: self.shown().into(),
                        source: e,
                    }
                })?;
                if self.hosted.is_some() {
                    super::hosted::keep_alive(&conn, self.shown());
                }
                // A new connection: the host (or its storage, or its domains) may have
                // changed meanwhile.
                self.verified.borrow_mut().clear();
                self.adopted = false;
                self.conn = Some(conn);
            }
            let conn = self.conn.as_ref().expect("just opened");
            let res = f(conn, self);
            if res.is_err() && !conn.is_alive().unwrap_or(false) {
                self.conn = None;
                if reused && tries == 1 {
                    continue;
                }
            }
            return res;
        }
    }

    /// `l`'s image, uploaded to the hosted host if it is not there intact: its path there.
    fn stage(&mut self, l: &Launch) -> Result<String, ActivateError> {
        let h = self.hosted.clone().expect("a hosted host");
        let uri = self.shown().to_string();
        self.with_conn(|conn, me| {
            h.stage(conn, &mut me.verified.borrow_mut(), l)
                .map_err(|source| ActivateError::Stage {
                    name: l.name.clone(),
                    uri: uri.clone(),
                    source: Box::new(source),
                })
        })
    }

    /// Whether the domain `d` is this agent's to manage: on a hosted host, only those
    /// whose metadata names this device (others run there too). A failure to ask is an
    /// error, not "someone else's": a sweep must not give up a live instance on a guess.
    fn ours(&self, d: &virt::domain::Domain) -> Result<bool, virt::error::Error> {
        let Some(h) = &self.hosted else {
            return Ok(true);
        };
        let element = virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32;
        match d.metadata(element, Some(super::hosted::METADATA_NS), 0) {
            Ok(m) => Ok(h.owns(&m)),
            Err(e)
                if e.code().is(virt::error::ErrorNumber::NoDomainMetadata)
                    || e.code().is(virt::error::ErrorNumber::NoDomain) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn start_on(
        &self,
        conn: &virt::connect::Connect,
        l: &Launch,
    ) -> Result<Started, ActivateError> {
        if let Ok(old) = conn.lookup_domain_by_name(&l.name) {
            let _ = old.destroy();
            let _ = old.undefine();
        }
        if self.hosted.is_none() {
            fresh_console_log(&l.console_log).map_err(|source| ActivateError::ConsoleLog {
                path: l.console_log.clone(),
                source,
            })?;
        }
        let driver = Driver::of(&self.uri);
        let mut last = None;
        for _ in 0..3 {
            let port = match (driver, &self.hosted) {
                (_, Some(_)) => None,
                (Driver::Qemu, None) => Some(free_port()),
                _ => Some(0),
            };
            let domain_type = l.domain_type.as_deref().unwrap_or(&self.domain_type);
            let mut xml = render_xml(l, driver, domain_type, port);
            if let Some(h) = &self.hosted {
                xml = xml.replacen("</name>", &format!("</name>{}", h.metadata(l)), 1);
            }
            match conn.create_domain_xml(&xml, 0) {
                Ok(_) => {
                    let console_port = port.unwrap_or(0);
                    return Ok(Started { console_port });
                }
                // A port taken between choosing and binding: choose again. Anything else
                // (an unreadable kernel, a bad XML) would only fail the same way again.
                Err(e) if port_taken(&e) => last = Some(e),
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        let source = last.expect("an attempt was made");
        Err(ActivateError::Start {
            name: l.name.clone(),
            fault: host_fault(&source, &l.image),
            source,
        })
    }
}

/// An empty console log owned by the agent, made before the domain starts: with
/// `append='on'`, virtlogd writes into this file as it is, where with `append='off'` it
/// makes a new one owned by root, mode 0600, that an agent not running as root (the
/// packaged `unifleet` user) cannot read — and the banner probe reads it. The last
/// boot's log goes first: it may be one such root-owned file.
fn fresh_console_log(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
}

/// Whether a failed start was QEMU finding its console port taken.
fn port_taken(e: &virt::error::Error) -> bool {
    e.message().contains("Address already in use")
}

/// Whether a failed start was the host's doing: QEMU (x86) could not open the kernel,
/// for want of permission. (QEMU for aarch64 says only "could not load kernel", as it does
/// for a kernel it cannot parse: that stays the release's.)
fn host_fault(e: &virt::error::Error, image: &std::path::Path) -> Option<Box<HostFault>> {
    let msg = e.message();
    if !(msg.contains("could not open kernel file") && msg.contains("Permission denied")) {
        return None;
    }
    // The image is in STATE/slots/.
    let state_dir = image
        .parent()
        .and_then(|slots| slots.parent())
        .unwrap_or(image);
    Some(Box::new(HostFault::KernelUnreadable {
        image: image.into(),
        state_dir: state_dir.into(),
    }))
}

/// The MAC of the guest at a static `ip`: the same address always comes with the same MAC,
/// so a host whose neighbour cache still maps the address (for ~30 s after a guest
/// stopped) reaches the next guest given it — with a fresh random MAC it did not, and the
/// next instance on that address stayed unreachable until the entry expired.
fn mac_for(ip: Ipv4Addr) -> String {
    let [_, b, c, d] = ip.octets();
    format!("52:54:00:{b:02x}:{c:02x}:{d:02x}")
}

/// The text of a domain XML's `<cmdline>`, unescaped enough for `ip=` (no entities).
fn cmdline_of(xml: &str) -> Option<&str> {
    let start = xml.find("<cmdline>")? + "<cmdline>".len();
    let len = xml[start..].find("</cmdline>")?;
    Some(&xml[start..start + len])
}

/// The first IPv4 address of any of the domain's interfaces.
fn first_ipv4(ifaces: &[virt::domain::Interface]) -> Option<IpAddr> {
    ifaces
        .iter()
        .flat_map(|i| &i.addrs)
        .filter_map(|a| a.addr.parse::<IpAddr>().ok())
        .find(IpAddr::is_ipv4)
}

impl Backend for Libvirt {
    fn driver(&self) -> Driver {
        Driver::of(&self.uri)
    }

    fn start(&mut self, l: &Launch) -> Result<Started, ActivateError> {
        self.addresses.remove(&l.name);
        let mut l = self.with_static_address(l)?;
        if self.hosted.is_some() {
            match self.stage(&l) {
                Ok(path) => l.image = path.into(),
                Err(e) => {
                    self.release_address(&l.name);
                    return Err(e);
                }
            }
        }
        let started = self.with_conn(|conn, me| me.start_on(conn, &l));
        if started.is_err() {
            self.release_address(&l.name);
        }
        started
    }

    fn running(&mut self, name: &str) -> Result<bool, ActivateError> {
        self.with_conn(|conn, _| match conn.lookup_domain_by_name(name) {
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

    /// The domain's static address goes back to the pool only once it is known gone: a
    /// libvirtd that cannot be asked must not let two guests share an address (and MAC).
    fn stop(&mut self, name: &str) -> Result<(), ActivateError> {
        let stopped = self.with_conn(|conn, _| {
            let fail = |e| ActivateError::Stop {
                name: name.into(),
                source: e,
            };
            match conn.lookup_domain_by_name(name) {
                Ok(d) => {
                    if d.is_active().unwrap_or(false) {
                        d.destroy().map_err(fail)?;
                    }
                    let _ = d.undefine();
                    Ok(())
                }
                Err(e) if e.code().is(virt::error::ErrorNumber::NoDomain) => Ok(()),
                Err(e) => Err(fail(e)),
            }
        });
        if stopped.is_ok() {
            self.release_address(name);
        }
        stopped
    }

    fn pause(&mut self, name: &str) -> Result<(), ActivateError> {
        self.on_domain(
            name,
            |d| d.suspend(),
            |name, source| ActivateError::Pause { name, source },
        )
    }

    fn resume(&mut self, name: &str) -> Result<(), ActivateError> {
        self.on_domain(
            name,
            |d| d.resume(),
            |name, source| ActivateError::Resume { name, source },
        )
    }

    fn offers(&mut self, domain_type: &str) -> Result<bool, ActivateError> {
        let uri = self.shown().to_string();
        self.with_conn(|conn, _| {
            let caps = conn
                .capabilities()
                .map_err(|e| ActivateError::Capabilities {
                    uri: uri.clone(),
                    source: e,
                })?;
            Ok(caps.contains(&format!("<domain type='{domain_type}'")))
        })
    }

    /// From the libvirt network's DHCP leases (a host bridge has none: there the guest
    /// needs a static address, a later step).
    /// Also gives back the addresses of domains with `prefix` that no longer run (gone
    /// without a stop that reached them: their host restarted).
    fn named(&mut self, prefix: &str) -> Result<Vec<String>, ActivateError> {
        let uri = self.shown().to_string();
        let names = self.with_conn(|conn, me| {
            let active = virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE;
            let domains = conn
                .list_all_domains(active)
                .map_err(|e| ActivateError::List {
                    uri: uri.clone(),
                    source: e,
                })?;
            let mut names = vec![];
            for d in &domains {
                // One gone since the list was made is not among them.
                let Some(name) = d.name().ok().filter(|n| n.starts_with(prefix)) else {
                    continue;
                };
                let ours = me.ours(d).map_err(|e| ActivateError::List {
                    uri: uri.clone(),
                    source: e,
                })?;
                if ours {
                    names.push(name);
                }
            }
            Ok(names)
        })?;
        if let Some(pool) = &mut self.pool {
            pool.keep_only(prefix, &names);
        }
        Ok(names)
    }

    fn retire(&mut self, app: &str, keep: Option<&Launch>) -> Result<u32, ActivateError> {
        let Some(h) = self.hosted.clone() else {
            return Ok(0);
        };
        let uri = self.shown().to_string();
        self.with_conn(|conn, _| {
            h.retire(conn, app, keep)
                .map_err(|source| ActivateError::Retire {
                    app: app.into(),
                    uri: uri.clone(),
                    source: Box::new(source),
                })
        })
    }

    /// A static address from the domain's own command line (it may have been started
    /// before this agent did), else the libvirt network's DHCP lease.
    fn address(&mut self, name: &str) -> Result<Option<IpAddr>, ActivateError> {
        if let Some(ip) = self.addresses.get(name) {
            return Ok(Some(*ip));
        }
        let found = self.with_conn(|conn, _| {
            let query = |e| ActivateError::Address {
                name: name.into(),
                source: e,
            };
            let d = conn.lookup_domain_by_name(name).map_err(query)?;
            let xml = d.xml_desc(0).map_err(query)?;
            if let Some(ip) = cmdline_of(&xml).and_then(ip_in_cmdline) {
                return Ok(Some(IpAddr::V4(ip)));
            }
            let lease = virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE;
            d.interface_addresses(lease, 0)
                .map(|ifaces| first_ipv4(&ifaces))
                .map_err(query)
        })?;
        if let Some(ip) = found {
            self.addresses.insert(name.into(), ip);
        }
        Ok(found)
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
    use proto::manifest::{BootSpec, HealthProbe};

    /// Under a stock libvirt, virtlogd made a new console log owned by root, mode 0600,
    /// at each start (`append='off'`), and the agent running as `unifleet` could not read
    /// its banner: the agent makes the log, empty and its own, and virtlogd appends to it.
    #[test]
    fn the_console_log_is_the_agents_own_and_empty_at_each_start() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.console.log");
        std::fs::write(&log, "READY hello 1.0.0 (the last boot's)\n").unwrap();
        fresh_console_log(&log).unwrap();
        let meta = std::fs::metadata(&log).unwrap();
        assert_eq!(meta.len(), 0);
        assert_eq!(meta.mode() & 0o777, 0o600);
        let xml = render_xml(
            &launch(Platform::QemuX86_64),
            Driver::Qemu,
            "qemu",
            Some(4000),
        );
        assert!(xml.contains("append='on'"), "{xml}");
        assert!(!xml.contains("append='off'"), "{xml}");
    }

    /// The watchdog restarts what is stopped; a libvirt it cannot reach must not look
    /// like a stopped domain (through a libvirtd restart every healthy release would be
    /// restarted four times and rolled back).
    #[test]
    fn an_unreachable_libvirt_is_an_error_not_a_stopped_domain() {
        let mut unreachable = Libvirt::new("test:///nonexistent/unifleet-no-such-file.xml", "qemu");
        assert!(matches!(
            unreachable.running("uf-d1-hello-r1"),
            Err(ActivateError::Connect { .. })
        ));
        let mut test = Libvirt::new("test:///default", "qemu");
        assert!(!test.running("uf-no-such-domain-anywhere").unwrap());
    }

    fn launch(platform: Platform) -> Launch {
        Launch {
            name: "uf-d1-hello-r3".into(),
            of: super::super::ReleaseOf {
                app: "hello".into(),
                release: 3,
                image: proto::Digest::of(b"image"),
            },
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
            domain_type: None,
        }
    }

    #[test]
    fn xml_per_platform() {
        let arm = render_xml(&launch(Platform::XenArm32), Driver::Xen, "qemu", Some(0));
        assert!(arm.contains("<type machine='xenpv'>linux</type>"), "{arm}");
        assert!(arm.contains("<kernel>/var/lib/unifleet/slots/hello-3.img</kernel>"));
        assert!(
            arm.contains("console=hvc0 &lt;x&gt;"),
            "cmdline escaped: {arm}"
        );
        let pvh = render_xml(
            &launch(Platform::XenX86_64Pvh),
            Driver::Xen,
            "qemu",
            Some(0),
        );
        assert!(pvh.contains("machine='xenpvh'>xenpvh</type>"), "{pvh}");
        let q = render_xml(
            &launch(Platform::QemuX86_64),
            Driver::Qemu,
            "kvm",
            Some(4555),
        );
        assert!(q.starts_with("<domain type='kvm'>"));
        assert!(q.contains("<type arch='x86_64' machine='pc'>hvm</type><kernel>"));
        assert!(
            q.contains("service='4555'") && q.contains("host='127.0.0.1'"),
            "{q}"
        );
        let t = render_xml(&launch(Platform::QemuX86_64), Driver::Test, "qemu", Some(0));
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
                    // On a bridge, a static address (and the MAC made from it).
                    let ip = matches!(nic, Some(Nic::Bridge(_))).then(|| {
                        l.boot.cmdline = "ip=198.51.100.5/24 gw=198.51.100.1".into();
                        "198.51.100.5".parse().unwrap()
                    });
                    let xml = render_xml(&l, driver, domain_type, Some(4555));
                    if let Some(n) = nic {
                        assert!(xml.contains(&n.xml(driver, ip)), "{xml}");
                    }
                    if ip.is_some() {
                        assert!(xml.contains("<mac address='52:54:00:33:64:05'/>"), "{xml}");
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

    /// The next guest given a static address was unreachable for ~30 s: the host still
    /// mapped the address to the previous guest's random MAC.
    #[test]
    fn a_static_address_reused_by_the_next_guest_keeps_its_mac() {
        let mut l = launch(Platform::QemuX86_64);
        l.nic = Some(Nic::Network("default".into()));
        l.boot.cmdline = "app=a ip=198.51.100.2/26 gw=198.51.100.1".into();
        let first = render_xml(&l, Driver::Qemu, "qemu", Some(1));
        l.name = "uf-d1-hello-od7".into();
        let next = render_xml(&l, Driver::Qemu, "qemu", Some(2));
        let mac = "<mac address='52:54:00:33:64:02'/>";
        assert!(first.contains(mac) && next.contains(mac), "{first}\n{next}");
    }

    /// Through the owner thread, as the agent uses it.
    #[tokio::test]
    async fn test_driver_lifecycle() {
        let hv = super::super::Hypervisor::libvirt("test:///default", "qemu", None);
        let mut l = launch(Platform::QemuX86_64);
        l.name = format!("uf-unit-{}", std::process::id());
        let booted = crate::probe::boot(&hv, &l).await.unwrap();
        assert_eq!(booted.address, None);
        assert!(hv.is_running(&l.name).await);
        hv.stop(&l.name).await.unwrap();
        assert!(!hv.is_running(&l.name).await && hv.is_stopped(&l.name).await);
        // With a network interface on the test driver's own network, which hands out
        // (made-up) leases.
        l.boot.network = true;
        l.nic = Some(Nic::Network("default".into()));
        l.name.push_str("-nic");
        hv.start(&l).await.unwrap();
        assert!(hv.is_running(&l.name).await);
        let address = hv.address(&l.name).await.unwrap();
        assert!(address.is_some_and(|a| a.is_ipv4()), "{address:?}");
        hv.stop(&l.name).await.unwrap();
    }
}
