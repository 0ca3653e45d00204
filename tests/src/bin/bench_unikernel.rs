//! The Rust unikernel (`firmware-tools/unikernels/hello-http`) served by device agents,
//! against a bare libvirt create of the same domain (issue 36, "Measured"), under
//! `qemu:///system` (libvirtd must run: `scripts/setup.sh`). Build in release mode first:
//!
//!     cargo build --release --workspace --bins
//!     scripts/build-unikernel.sh          # if target/unikernels/ lacks the images
//!     ./target/release/bench_unikernel [--n 100] [--rounds 3] [--floor 5] [--secs 5] \
//!         [--configs x86-tcg,x86-kvm,arm64-tcg] [--dhcp] [--settled]
//!
//! One hub and, per configuration (x86_64 under TCG, x86_64 under KVM, aarch64 under TCG),
//! two devices serving `hello` on demand: a *cold* one (`min = 0`, `warm = 0`) and a *warm*
//! one (`warm = 1`), each with `max_local = 1` and `target = 100` (one instance takes all
//! 64 throughput clients). One release (`hub publish --image qemu-x86_64=… --image
//! qemu-aarch64=… --network --probe http:/health --memory-mib 16 --no-staging`), the
//! NICs on isolated TEST-NET libvirt networks (guest network slots 6 and 7). Guests get
//! static addresses: each device a range of its own (`guest_addresses`), the floor one
//! address per configuration, on networks with no DHCP. With `--dhcp` they ask libvirt's
//! DHCP instead (8-minute leases: every instance is a new MAC) and the floor is also timed
//! to the lease and with one known MAC. Each round visits every configuration (the order
//! rotated by one each round) and measures there, in turn:
//!
//! 1. **floor**: `--floor` bare `virDomainCreateXML` of the XML the agent renders
//!    (`device::hypervisor::render_xml`, same image, boot spec, network and address), timed
//!    to the create call's return and the first byte of `GET /` on the guest's address
//!    (with `--dhcp`, also to the lease libvirt reports, and after each the same with one
//!    fixed MAC per configuration: a lease dnsmasq already holds);
//! 2. **cold**: `--n / --rounds` connections to the cold device's proxy with no instance
//!    running (waited for: no `uf-<dev>-hello-` domain active; with `--settled`, also
//!    the agent done stopping the last one), connect → first byte of
//!    `GET /`; beside it the agent's own boot-to-healthy time (its metrics) and, from a
//!    second libvirt connection polling every 5 ms, when the domain was listed and its
//!    lease seen;
//! 3. **warm**: as many to the warm device's proxy when its only domain is a paused warm
//!    instance the agent has logged ("warm on-demand instance paused"), connect → first
//!    byte; the agent's log must say the instance was resumed. The first connection of each
//!    round resumes an instance paused since the configuration's last round: answered or
//!    not, it is counted apart, not timed;
//! 4. **throughput**: one instance running on the cold device (held by an idle keep-alive
//!    connection through the proxy), 64 keep-alive clients each looping `GET /` for
//!    `--secs` through the proxy and directly to the guest's address (order alternating
//!    per round): requests per second and their ratio.
//!
//! Single figures are medians of the rounds' medians; p50/p99 of cold and warm are over
//! all their samples (nearest rank). Every wait is on an event with a deadline. A cold or
//! warm connection that gets no answer is counted and the run goes on. Each sample is
//! printed to stderr as it is taken; the table goes to stdout.
#![allow(clippy::print_stdout)]

use anyhow::{bail, Context, Result};
use device::hypervisor::{render_xml, Driver, Launch, Nic};
use proto::manifest::{BootSpec, HealthProbe, Platform};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use unifleet_tests::bench::{cpu_seconds, percentile, status_kib};
use unifleet_tests::fleet::{destroy_domains, toml_value::V, wait_for, Fleet};
use unifleet_tests::guestnet::{hello_http_x86_64, GuestNet};
use unifleet_tests::{free_port, metric};

const URI: &str = "qemu:///system";
const CLIENTS: usize = 64;
const LEASE_MINUTES: u32 = 8;
const MEMORY_MIB: u32 = 16;
const CMDLINE: &str = "app=hello version=1.0.0";
/// The publish's probe budget: a cold start under nested KVM is seconds.
const PROBE_SECS: u64 = 60;
const ON_DEMAND: &str = "min = 0\nmax_local = 1\ntarget = 100.0\nidle_secs = 1\n\
                         stable_window_secs = 1\npanic_window_secs = 1\ndrain_secs = 1";
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: hello\r\n\r\n";

/// One accelerator and architecture.
struct Conf {
    label: &'static str,
    platform: Platform,
    domain_type: &'static str,
    image: PathBuf,
    /// Index into the guest networks.
    net: usize,
}

/// A configuration's two devices and what was measured there.
struct Bench {
    conf: Conf,
    cold: usize,
    warm: usize,
    cold_port: u16,
    warm_port: u16,
    floor_create: Vec<Vec<f64>>,
    floor_lease: Vec<Vec<f64>>,
    floor_first: Vec<Vec<f64>>,
    /// First byte of a floor guest given the same MAC each time (a lease dnsmasq knows).
    floor_known: Vec<f64>,
    cold_ms: Vec<Vec<f64>>,
    cold_boot_ms: Vec<f64>,
    /// From the client's connect: the instance's domain listed by libvirt, its lease seen.
    cold_listed: Vec<f64>,
    cold_lease: Vec<f64>,
    warm_ms: Vec<Vec<f64>>,
    warm_not_resumed: usize,
    /// Connections that got no answer (closed or reset), cold and warm.
    cold_failed: usize,
    warm_failed: usize,
    /// When this configuration's warm phase last ended (its next warm instance has been
    /// paused since about then).
    warm_since: Instant,
    /// Connections to warm instances paused since the last round: answered, and the
    /// pause (s) of those that failed.
    stale_ok: usize,
    stale_failed: Vec<u64>,
    proxy_rps: Vec<f64>,
    direct_rps: Vec<f64>,
    /// The cold device's agent's CPU time per request it proxied, µs.
    proxy_cpu_us: Vec<f64>,
    qemu_rss_kib: Vec<u64>,
}

struct Args {
    n: usize,
    rounds: usize,
    floor: usize,
    secs: u64,
    configs: Vec<String>,
    dhcp: bool,
    /// Cold starts begin only once the agent has finished stopping the last instance.
    settled: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        n: 100,
        rounds: 3,
        floor: 5,
        secs: 5,
        configs: vec!["x86-tcg".into(), "x86-kvm".into(), "arm64-tcg".into()],
        dhcp: false,
        settled: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--n" => a.n = value()?.parse().context("--n")?,
            "--rounds" => a.rounds = value()?.parse().context("--rounds")?,
            "--floor" => a.floor = value()?.parse().context("--floor")?,
            "--secs" => a.secs = value()?.parse().context("--secs")?,
            "--configs" => a.configs = value()?.split(',').map(String::from).collect(),
            "--dhcp" => a.dhcp = true,
            "--settled" => a.settled = true,
            _ => bail!("unknown argument {flag}; see the doc comment of bench_unikernel.rs"),
        }
    }
    anyhow::ensure!(
        a.rounds > 0 && a.n >= a.rounds,
        "--n must be at least --rounds"
    );
    Ok(a)
}

fn main() -> Result<()> {
    let args = args()?;
    let x86 = hello_http_x86_64()?;
    let arm = x86.with_file_name("hello-http-aarch64.img");
    anyhow::ensure!(
        arm.is_file(),
        "{} not found; build it with scripts/build-unikernel.sh",
        arm.display()
    );
    let mut confs = vec![];
    for c in &args.configs {
        confs.push(match c.as_str() {
            "x86-tcg" => Conf {
                label: "x86_64, TCG",
                platform: Platform::QemuX86_64,
                domain_type: "qemu",
                image: x86.clone(),
                net: 0,
            },
            "x86-kvm" => Conf {
                label: "x86_64, KVM (nested)",
                platform: Platform::QemuX86_64,
                domain_type: "kvm",
                image: x86.clone(),
                net: 1,
            },
            "arm64-tcg" => Conf {
                label: "aarch64, TCG",
                platform: Platform::QemuAarch64,
                domain_type: "qemu",
                image: arm.clone(),
                net: 0,
            },
            other => bail!("unknown configuration {other}: x86-tcg, x86-kvm, arm64-tcg"),
        });
    }
    // Slots 6 and 7: the test suite takes 0-4. Every instance is a new MAC, so a new
    // lease: 8-minute leases keep the 53 addresses of a slot from running out, and outlive
    // a warm instance's pause between rounds (one paused past its lease resumes with an
    // address the agent no longer reaches: see BENCHMARKS.md).
    let net = |slot| match args.dhcp {
        true => GuestNet::create_with_lease(URI, slot, Some(LEASE_MINUTES)),
        false => GuestNet::create_without_dhcp(URI, slot),
    };
    let nets = [net(6)?, net(7)?];
    let floor_prefix = format!("ufb-{}-", std::process::id());
    let _floor_guard = DestroyOnDrop(floor_prefix.clone());

    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    let pid = std::process::id() % 100_000;
    let mut benches = vec![];
    for (i, conf) in confs.into_iter().enumerate() {
        let mut devs = [0, 0];
        let mut ports = [0, 0];
        for (k, kind) in ["c", "w"].iter().enumerate() {
            let name = format!("bu{i}{kind}-{pid}");
            let extra: &[&str] = match conf.platform {
                Platform::QemuAarch64 => &["--platform", "qemu-aarch64"],
                _ => &[],
            };
            let d = fleet.add_device(&name, "hello", extra)?;
            let dev = &fleet.devices[d];
            dev.set_config("nic", V::Str(nets[conf.net].nic()))?;
            if !args.dhcp {
                // Six addresses a device (an instance, a warm one, one draining), apart.
                let first = 2 + 6 * (2 * i as u32 + k as u32);
                let range = nets[conf.net].addresses(first, first + 5);
                dev.set_config("guest_addresses", V::Str(range))?;
            }
            dev.set_config("domain_type", V::Str(conf.domain_type.into()))?;
            dev.set_config("metrics", V::Str(format!("127.0.0.1:{}", free_port()?)))?;
            let settings = match *kind {
                "w" => format!("{ON_DEMAND}\nwarm = 1"),
                _ => ON_DEMAND.to_string(),
            };
            ports[k] = dev.serve_on_demand("hello", &settings)?;
            fleet.start_device(d)?;
            devs[k] = d;
        }
        benches.push(Bench {
            conf,
            cold: devs[0],
            warm: devs[1],
            cold_port: ports[0],
            warm_port: ports[1],
            floor_create: vec![],
            floor_lease: vec![],
            floor_first: vec![],
            floor_known: vec![],
            cold_ms: vec![],
            cold_boot_ms: vec![],
            cold_listed: vec![],
            cold_lease: vec![],
            warm_ms: vec![],
            warm_not_resumed: 0,
            cold_failed: 0,
            warm_failed: 0,
            warm_since: Instant::now(),
            stale_ok: 0,
            stale_failed: vec![],
            proxy_rps: vec![],
            direct_rps: vec![],
            proxy_cpu_us: vec![],
            qemu_rss_kib: vec![],
        });
    }
    let probe_secs = PROBE_SECS.to_string();
    let publish = [
        "--network",
        "--probe",
        "http:/health",
        "--probe-timeout-secs",
        &probe_secs,
        "--memory-mib",
        "16",
        "--cmdline",
        CMDLINE,
        "--no-staging",
    ];
    fleet.publish_images(
        &[("qemu-x86_64", &x86), ("qemu-aarch64", &arm)],
        "hello",
        "1.0.0",
        &publish,
    )?;
    let all: Vec<usize> = (0..fleet.devices.len()).collect();
    fleet.wait_all(&all, "hello", 1, "Active", Duration::from_secs(300))?;
    eprintln!("release 1 active on {} devices", all.len());

    // A domain gone between listing and lookup is normal here: no libvirt error printing.
    virt::error::clear_error_callback();
    let conn = virt::connect::Connect::open(Some(URI)).context("connecting to libvirt")?;
    let per_round = args.n.div_ceil(args.rounds);
    let mut floor_k = 0;
    for round in 0..args.rounds {
        let count = benches.len();
        for j in 0..count {
            let idx = (j + round) % count;
            let b = &mut benches[idx];
            let label = b.conf.label;
            eprintln!("round {round}: {label}");
            let (mut create, mut lease, mut first) = (vec![], vec![], vec![]);
            for _ in 0..args.floor {
                floor_k += 1;
                let name = format!("{floor_prefix}{floor_k}");
                // The floor's own static address, apart from the devices' ranges.
                let addr = (!args.dhcp).then(|| nets[b.conf.net].address(50 + idx as u32));
                let f = floor(&conn, &b.conf, &nets[b.conf.net], &name, None, addr.clone())
                    .with_context(|| format!("floor, {label}"))?;
                eprintln!(
                    "  floor {name}: created {:.0} ms, lease {:.0} ms, first byte {:.0} ms",
                    f.0, f.1, f.2
                );
                create.push(f.0);
                lease.push(f.1);
                first.push(f.2);
                if !args.dhcp {
                    continue;
                }
                // The same with one MAC every time: dnsmasq knows its lease.
                let mac = format!("52:54:00:be:17:{:02x}", idx);
                let known = floor(
                    &conn,
                    &b.conf,
                    &nets[b.conf.net],
                    &format!("{name}m"),
                    Some(&mac),
                    None,
                )
                .with_context(|| format!("floor with a known MAC, {label}"))?;
                eprintln!(
                    "  floor {name}m ({mac}): lease {:.0} ms, first byte {:.0} ms",
                    known.1, known.2
                );
                b.floor_known.push(known.2);
            }
            b.floor_create.push(create);
            b.floor_lease.push(lease);
            b.floor_first.push(first);

            let dev = &fleet.devices[b.cold];
            let metrics = dev.metrics_addr().context("metrics address")?;
            let mut cold = vec![];
            for _ in 0..per_round {
                no_instance(&conn, &dev.name)?;
                if args.settled {
                    settled(&dev.name, &|| dev.log_text())?;
                }
                let boot_ms = metric(&metrics, "unifleet_device_ondemand_boot_milliseconds_total")?;
                let watch = Watch::start(&dev.name);
                let took = first_byte(b.cold_port, Duration::from_secs(120));
                let (listed, leased) = watch.stop();
                let took = match took {
                    Ok(took) => took,
                    Err(e) => {
                        b.cold_failed += 1;
                        eprintln!("  cold: FAILED: {e:#} (domain listed {listed:.0} ms, lease {leased:.0} ms)");
                        continue;
                    }
                };
                let booted = metric(&metrics, "unifleet_device_ondemand_boot_milliseconds_total")?;
                eprintln!("  cold: domain listed {listed:.0} ms, lease {leased:.0} ms, first byte {took:.0} ms, agent boot-to-healthy {} ms", booted - boot_ms);
                b.cold_listed.push(listed);
                b.cold_lease.push(leased);
                cold.push(took);
                b.cold_boot_ms.push((booted - boot_ms) as f64);
            }
            b.cold_ms.push(cold);

            let dev = &fleet.devices[b.warm];
            // The instance paused since this configuration's last round: its connection
            // is counted, not timed; the timed ones resume
            // instances paused only while the one before was served and stopped.
            let stale = warm_ready(&conn, &dev.name, &|| dev.log_text())?;
            let age = b.warm_since.elapsed().as_secs();
            match first_byte(b.warm_port, Duration::from_secs(30)) {
                Ok(took) => {
                    b.stale_ok += 1;
                    eprintln!("  warm {stale}, paused ≥ {age} s: first byte {took:.1} ms");
                }
                Err(e) => {
                    b.stale_failed.push(age);
                    let console = dev.dir.join(format!("state/{stale}.console.log"));
                    let tail = std::fs::read_to_string(&console).unwrap_or_default();
                    eprintln!("  warm {stale}, paused ≥ {age} s: FAILED: {e:#}; console:\n{tail}");
                }
            }
            let mut warm = vec![];
            for _ in 0..per_round {
                let paused = warm_ready(&conn, &dev.name, &|| dev.log_text())?;
                let took = match first_byte(b.warm_port, Duration::from_secs(120)) {
                    Ok(took) => took,
                    Err(e) => {
                        b.warm_failed += 1;
                        eprintln!("  warm {paused}: FAILED: {e:#}");
                        continue;
                    }
                };
                eprintln!("  warm {paused}: first byte {took:.1} ms");
                warm.push(took);
                let resumed = dev.log_text().lines().any(|l| {
                    has_field(l, &format!("instance={paused}")) && has_field(l, "resumed=true")
                });
                if !resumed {
                    b.warm_not_resumed += 1;
                }
            }
            b.warm_ms.push(warm);
            b.warm_since = Instant::now();

            let dev = &fleet.devices[b.cold];
            let agent = dev
                .proc
                .as_ref()
                .context("the cold device runs")?
                .child
                .id();
            let t = throughput(&conn, &dev.name, agent, b.cold_port, args.secs, round)
                .with_context(|| format!("throughput, {label}"))?;
            let (proxy, direct, rss) = (t.proxy, t.direct, t.rss_kib);
            eprintln!("  throughput: proxy {proxy:.0} req/s ({:.1} µs of agent CPU each), direct {direct:.0} req/s, QEMU RSS {rss} KiB", t.agent_cpu_us);
            b.proxy_cpu_us.push(t.agent_cpu_us);
            b.proxy_rps.push(proxy);
            b.direct_rps.push(direct);
            b.qemu_rss_kib.push(rss);
        }
    }
    report(&args, &benches, &x86, &arm)
}

/// Destroys the floor's domains however the program ends.
struct DestroyOnDrop(String);

impl Drop for DestroyOnDrop {
    fn drop(&mut self) {
        destroy_domains(URI, std::slice::from_ref(&self.0));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Watches device `dev`'s instances from another libvirt connection while a cold start
/// runs, as the floor is watched (every 5 ms): when a domain is first listed active, and
/// when its lease is first seen, ms from the start.
struct Watch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(f64, f64)>,
}

impl Watch {
    fn start(dev: &str) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let (dev, halt) = (dev.to_string(), stop.clone());
        // Connected before the clock starts: opening a libvirt connection takes ~25 ms,
        // which an earlier version counted into "domain listed".
        let conn = virt::connect::Connect::open(Some(URI));
        let thread = std::thread::spawn(move || {
            let t = Instant::now();
            let (mut listed, mut leased) = (f64::NAN, f64::NAN);
            let Ok(conn) = conn else {
                return (listed, leased);
            };
            while !halt.load(Ordering::Relaxed) && leased.is_nan() {
                if let Some((name, _)) = instances(&conn, &dev).first() {
                    if listed.is_nan() {
                        listed = ms(t.elapsed());
                    }
                    if let Ok(d) = conn.lookup_domain_by_name(name) {
                        if lease_of(&d).is_some() {
                            leased = ms(t.elapsed());
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (listed, leased)
        });
        Watch { stop, thread }
    }

    fn stop(self) -> (f64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or((f64::NAN, f64::NAN))
    }
}

/// The guest's address from libvirt's DHCP lease, if it has one.
fn lease_of(d: &virt::domain::Domain) -> Option<IpAddr> {
    let src = virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE;
    d.interface_addresses(src, 0)
        .ok()?
        .iter()
        .flat_map(|i| &i.addrs)
        .filter_map(|a| a.addr.parse::<IpAddr>().ok())
        .find(IpAddr::is_ipv4)
}

/// The guest's address: its static one (on its command line), else its DHCP lease.
fn guest_ip(d: &virt::domain::Domain) -> Option<IpAddr> {
    let xml = d.xml_desc(0).ok()?;
    let cmdline = xml.split("<cmdline>").nth(1)?.split("</cmdline>").next()?;
    match device::hypervisor::addresses::ip_in_cmdline(cmdline) {
        Some(ip) => Some(IpAddr::V4(ip)),
        None => lease_of(d),
    }
}

/// One bare create of the agent's XML: (create returned, lease seen, first byte), ms
/// from just before the create call.
fn floor(
    conn: &virt::connect::Connect,
    conf: &Conf,
    net: &GuestNet,
    name: &str,
    mac: Option<&str>,
    addr: Option<(std::net::Ipv4Addr, String)>,
) -> Result<(f64, f64, f64)> {
    let dir = tempfile::tempdir()?;
    let launch = Launch {
        name: name.into(),
        of: device::hypervisor::ReleaseOf {
            app: "bench".into(),
            release: 1,
            image: proto::Digest::of(b"not uploaded"),
        },
        platform: conf.platform,
        image: conf.image.clone(),
        boot: BootSpec {
            memory_mib: MEMORY_MIB,
            vcpus: 1,
            cmdline: match &addr {
                Some((_, words)) => format!("{CMDLINE} {words}"),
                None => CMDLINE.into(),
            },
            probe: HealthProbe::Http {
                port: 80,
                path: "/health".into(),
            },
            probe_timeout_ms: PROBE_SECS * 1000,
            network: true,
        },
        console_log: dir.path().join("console.log"),
        nic: Some(Nic::Network(net.name.clone())),
        domain_type: None,
    };
    let mut xml = render_xml(&launch, Driver::Qemu, conf.domain_type, Some(free_port()?));
    if let Some(mac) = mac {
        let iface = "<interface type='network'>";
        anyhow::ensure!(xml.contains(iface), "no network interface in {xml}");
        xml = xml.replace(iface, &format!("{iface}<mac address='{mac}'/>"));
    }
    let t = Instant::now();
    let d = conn
        .create_domain_xml(&xml, 0)
        .context("creating the domain")?;
    let created = t.elapsed();
    let result = (|| {
        let (ip, leased) = match &addr {
            Some((ip, _)) => (IpAddr::V4(*ip), Duration::MAX),
            None => (
                poll("the floor guest's lease", || lease_of(&d))?,
                t.elapsed(),
            ),
        };
        let addr = SocketAddr::new(ip, 80);
        poll("the floor guest's first byte", || get_first_byte(addr).ok())?;
        let leased = if leased == Duration::MAX {
            f64::NAN
        } else {
            ms(leased)
        };
        Ok((ms(created), leased, ms(t.elapsed())))
    })();
    let _ = d.destroy();
    result
}

/// Polls `check` every 5 ms (the agent's probe: every 25 ms) until it returns `Some`, for
/// at most 60 s: the floor is timed as tightly as this host allows.
fn poll<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after 60 s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Connects to `addr`, sends `GET /`, reads one byte (1 s for each step).
fn get_first_byte(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(GET)?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(())
}

/// Connect → first byte of `GET /` through the proxy on `port`, ms; then the answer is
/// read whole and must be the app's.
fn first_byte(port: u16, limit: Duration) -> Result<f64> {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(limit))?;
    s.write_all(GET)?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).context("no answer")?;
    let took = ms(t.elapsed());
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let status = format!("{}{status}", b[0] as char);
    anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "answered {status:?}");
    Ok(took)
}

/// The active domains of device `dev`'s app, with whether each is paused.
fn instances(conn: &virt::connect::Connect, dev: &str) -> Vec<(String, bool)> {
    use virt::domain::DomainState;
    use virt::enumutil::Enum;
    let prefix = format!("uf-{dev}-hello-");
    let Ok(ds) = conn.list_all_domains(0) else {
        return vec![];
    };
    ds.into_iter()
        .filter_map(|d| {
            let name = d.name().ok()?;
            if !name.starts_with(&prefix) || !d.is_active().unwrap_or(false) {
                return None;
            }
            let paused = matches!(d.state().ok()?.0, Enum::Known(DomainState::Paused));
            Some((name, paused))
        })
        .collect()
}

/// Waits until device `dev` runs no instance of its app.
fn no_instance(conn: &virt::connect::Connect, dev: &str) -> Result<()> {
    wait_for(
        &format!("{dev} at zero instances"),
        Duration::from_secs(60),
        || instances(conn, dev).is_empty().then_some(()),
    )
}

/// Waits until device `dev`'s agent has finished stopping every instance it started (a
/// domain no longer listed may still be being torn down, and the agent's one libvirt
/// thread takes the next create after it).
fn settled(dev: &str, log: &dyn Fn() -> String) -> Result<()> {
    wait_for(
        &format!("{dev}'s agent to finish stopping its instances"),
        Duration::from_secs(60),
        || {
            let text = log();
            let started = text.matches("starting on-demand instance").count();
            let stopped = text.matches("on-demand instance stopped").count()
                + text.matches("stopping on-demand instance: ").count();
            (stopped >= started).then_some(())
        },
    )
}

/// Waits until device `dev`'s only instance is a warm one, paused, which its agent has
/// logged as ready to resume; returns its name.
fn warm_ready(
    conn: &virt::connect::Connect,
    dev: &str,
    log: &dyn Fn() -> String,
) -> Result<String> {
    wait_for(
        &format!("{dev}: only a paused warm instance"),
        Duration::from_secs(120),
        || {
            let all = instances(conn, dev);
            let [(name, true)] = all.as_slice() else {
                return None;
            };
            let field = format!("instance={name}");
            log()
                .lines()
                .any(|l| has_field(l, &field) && l.contains("warm on-demand instance paused"))
                .then(|| name.clone())
        },
    )
}

/// Whether log line `l` has the field `key=value` (a whole word: `-w1` is not `-w10`).
fn has_field(l: &str, field: &str) -> bool {
    l.split_whitespace().any(|w| w == field)
}

/// Requests per second of [`CLIENTS`] keep-alive clients looping `GET /` on `addr` for
/// `secs`, and the CPU seconds process `pid` used meanwhile.
fn load(addr: SocketAddr, secs: u64, pid: u32) -> Result<(f64, f64)> {
    let start = Arc::new(Barrier::new(CLIENTS + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (start, stop) = (start.clone(), stop.clone());
            std::thread::spawn(move || -> Result<u64> {
                start.wait();
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                    .with_context(|| format!("connecting to {addr}"))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut r = BufReader::new(s);
                let mut done = 0;
                while !stop.load(Ordering::Relaxed) {
                    answer(&mut r).with_context(|| format!("GET / on {addr}, after {done}"))?;
                    done += 1;
                }
                Ok(done)
            })
        })
        .collect();
    start.wait();
    let t = Instant::now();
    let cpu = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(secs)); // the measured interval itself
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        total += c.join().expect("client thread").context("a client")?;
    }
    let cpu = cpu_seconds(pid) - cpu;
    Ok((total as f64 / t.elapsed().as_secs_f64(), cpu))
}

/// One `GET /` on a keep-alive connection; the answer must be a 200, read whole.
fn answer(r: &mut BufReader<TcpStream>) -> Result<()> {
    r.get_mut().write_all(GET)?;
    let (status, _) = unifleet_tests::http::read_answer(r)?;
    anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "answered {status:?}");
    Ok(())
}

/// What [`throughput`] measured.
struct Throughput {
    proxy: f64,
    direct: f64,
    /// The agent's CPU time per proxied request, µs.
    agent_cpu_us: f64,
    rss_kib: u64,
}

/// With one instance running on device `dev` (held by an idle keep-alive connection
/// through the proxy of agent `agent`): requests/s through the proxy and directly, the
/// agent's CPU per proxied request and QEMU's RSS (KiB).
fn throughput(
    conn: &virt::connect::Connect,
    dev: &str,
    agent: u32,
    port: u16,
    secs: u64,
    round: usize,
) -> Result<Throughput> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut holder = BufReader::new(s);
    answer(&mut holder).context("the holding connection")?;
    let running = instances(conn, dev);
    let [(name, false)] = running.as_slice() else {
        bail!("not one running instance: {running:?}");
    };
    let d = conn.lookup_domain_by_name(name)?;
    let ip = guest_ip(&d).context("the instance's address")?;
    let direct = SocketAddr::new(ip, 80);
    let proxied = SocketAddr::from(([127, 0, 0, 1], port));
    // The guest has 72 sockets: each load starts once the last one's are closed there.
    let quiet = || {
        wait_for(
            "the guest to close the last load's connections",
            Duration::from_secs(60),
            || (guest_open(direct).ok()? <= 2).then_some(()),
        )
    };
    let ((p, cpu), (dr, _)) = if round.is_multiple_of(2) {
        quiet()?;
        let p = load(proxied, secs, agent)?;
        quiet()?;
        (p, load(direct, secs, agent)?)
    } else {
        quiet()?;
        let dr = load(direct, secs, agent)?;
        quiet()?;
        (load(proxied, secs, agent)?, dr)
    };
    let rss_kib = qemu_rss_kib(name);
    answer(&mut holder).context("the holding connection after the load")?;
    Ok(Throughput {
        proxy: p,
        direct: dr,
        agent_cpu_us: cpu * 1e6 / (p * secs as f64),
        rss_kib,
    })
}

/// The guest's open connections (its own `/metrics`, this request's included).
fn guest_open(addr: SocketAddr) -> Result<u64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: hello\r\nConnection: close\r\n\r\n")?;
    let mut page = String::new();
    s.read_to_string(&mut page)?;
    unifleet_tests::metric_in(&page, "hello_http_connections_open")
}

/// VmRSS of domain `name`'s QEMU process (libvirt's pid file), KiB; 0 if unknown.
fn qemu_rss_kib(name: &str) -> u64 {
    std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .map_or(0, |pid| status_kib(pid, "VmRSS"))
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

/// The median over rounds of each round's median.
fn median_of_rounds(rounds: &[Vec<f64>]) -> f64 {
    median(&rounds.iter().map(|r| median(r)).collect::<Vec<_>>())
}

fn report(args: &Args, benches: &[Bench], x86: &Path, arm: &Path) -> Result<()> {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len());
    println!(
        "\nbench_unikernel: n = {} per configuration over {} rounds, floor {} per round, throughput {} s × {CLIENTS} clients; addresses {}",
        benches.first().map_or(0, |b| b.cold_ms.iter().map(Vec::len).sum::<usize>()),
        args.rounds,
        args.floor,
        args.secs,
        if args.dhcp { "by DHCP" } else { "static" }
    );
    println!(
        "images: hello-http-x86_64.elf {} B, hello-http-aarch64.img {} B; guest memory {MEMORY_MIB} MiB\n",
        size(x86)?,
        size(arm)?
    );
    println!(
        "| measure | {} |",
        benches
            .iter()
            .map(|b| b.conf.label)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(benches.len()));
    let row = |what: &str, f: &dyn Fn(&Bench) -> String| {
        println!(
            "| {what} | {} |",
            benches.iter().map(f).collect::<Vec<_>>().join(" | ")
        );
    };
    let all = |v: &[Vec<f64>]| v.concat();
    row("floor: create returned, p50", &|b| {
        format!("{:.0} ms", median_of_rounds(&b.floor_create))
    });
    let dhcp_row = |what: &str, f: &dyn Fn(&Bench) -> String| {
        if args.dhcp {
            row(what, f)
        }
    };
    dhcp_row("floor: lease seen, p50", &|b| {
        format!("{:.0} ms", median_of_rounds(&b.floor_lease))
    });
    row("floor: first byte, p50 (max)", &|b| {
        format!(
            "**{:.0} ms** ({:.0})",
            median_of_rounds(&b.floor_first),
            percentile(&all(&b.floor_first), 1.0)
        )
    });
    dhcp_row(
        "floor with one MAC every time (known lease): first byte p50",
        &|b| format!("{:.0} ms", median(&b.floor_known)),
    );
    row("cold through the device: first byte p50 / p99", &|b| {
        let v = all(&b.cold_ms);
        format!(
            "**{:.0} ms** / {:.0} ms",
            percentile(&v, 0.5),
            percentile(&v, 0.99)
        )
    });
    row("cold: domain listed, p50", &|b| {
        format!("{:.0} ms", median(&b.cold_listed))
    });
    dhcp_row("cold: domain listed / lease seen, p50", &|b| {
        format!(
            "{:.0} ms / {:.0} ms",
            median(&b.cold_listed),
            median(&b.cold_lease)
        )
    });
    dhcp_row("lease seen → first byte, p50: floor / cold", &|b| {
        let f: Vec<f64> = b
            .floor_first
            .concat()
            .iter()
            .zip(b.floor_lease.concat())
            .map(|(x, l)| x - l)
            .collect();
        let c: Vec<f64> = b
            .cold_ms
            .concat()
            .iter()
            .zip(&b.cold_lease)
            .map(|(x, l)| x - l)
            .collect();
        format!("{:.0} ms / {:.0} ms", median(&f), median(&c))
    });
    row("cold: the agent's boot-to-healthy, p50", &|b| {
        format!("{:.0} ms", median(&b.cold_boot_ms))
    });
    row(
        "cold: first byte minus the agent's boot-to-healthy, p50",
        &|b| {
            let d: Vec<f64> = all(&b.cold_ms)
                .iter()
                .zip(&b.cold_boot_ms)
                .map(|(x, t)| x - t)
                .collect();
            format!("{:.0} ms", median(&d))
        },
    );
    row("cold p50 over floor p50 (goal ≤ 1.10)", &|b| {
        format!(
            "{:.2}×",
            percentile(&all(&b.cold_ms), 0.5) / median_of_rounds(&b.floor_first)
        )
    });
    row("cold over floor, median of rounds' ratios", &|b| {
        let r: Vec<f64> = b
            .cold_ms
            .iter()
            .zip(&b.floor_first)
            .map(|(c, f)| median(c) / median(f))
            .collect();
        format!("{:.2}×", median(&r))
    });
    row(
        "warm (paused, resumed): first byte p50 / p99 (goal p50 ≤ 10 ms)",
        &|b| {
            let v = all(&b.warm_ms);
            let not = if b.warm_not_resumed > 0 {
                format!(", {} not resumed", b.warm_not_resumed)
            } else {
                String::new()
            };
            format!(
                "**{:.1} ms** / {:.1} ms{not}",
                percentile(&v, 0.5),
                percentile(&v, 0.99)
            )
        },
    );
    row("connections with no answer: cold / warm", &|b| {
        format!("{} / {}", b.cold_failed, b.warm_failed)
    });
    row(
        "warm instance paused since the last round: answered / failed",
        &|b| {
            format!(
                "{} / {} (paused {:?} s)",
                b.stale_ok,
                b.stale_failed.len(),
                b.stale_failed
            )
        },
    );
    row(
        "throughput through the proxy (64 keep-alive clients)",
        &|b| format!("{:.0} req/s", median(&b.proxy_rps)),
    );
    row("throughput direct to the guest", &|b| {
        format!("{:.0} req/s", median(&b.direct_rps))
    });
    row("proxy / direct, median of rounds (goal ≥ 0.90)", &|b| {
        let r: Vec<f64> = b
            .proxy_rps
            .iter()
            .zip(&b.direct_rps)
            .map(|(p, d)| p / d)
            .collect();
        format!("**{:.2}**", median(&r))
    });
    row("the agent's CPU per proxied request", &|b| {
        format!("{:.1} µs", median(&b.proxy_cpu_us))
    });
    row("QEMU RSS of a serving instance", &|b| {
        let v: Vec<f64> = b.qemu_rss_kib.iter().map(|&k| k as f64 / 1024.0).collect();
        format!("{:.0} MiB", median(&v))
    });
    println!("\nper round (floor first byte p50, cold p50, warm p50 ms; proxy, direct req/s):");
    for b in benches {
        for r in 0..b.cold_ms.len() {
            println!(
                "  {} round {r}: floor {:.0}, cold {:.0}, warm {:.1}; {:.0}, {:.0}",
                b.conf.label,
                median(&b.floor_first[r]),
                median(&b.cold_ms[r]),
                median(&b.warm_ms[r]),
                b.proxy_rps[r],
                b.direct_rps[r]
            );
        }
    }
    Ok(())
}
