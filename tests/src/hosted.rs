//! A hosted host for bursting tests: another "machine" — a network namespace with its
//! own libvirtd and virtlogd, reached over libvirt's TLS transport across a routed link
//! (`scripts/hosted-libvirt.sh`). It takes guest network slot 7's addresses
//! (203.0.113.192/26), so it holds that slot's lock while it is up. Brought down on drop,
//! whatever the test did. Also a fleet that bursts to it ([`burst_fleet`]) and clients of
//! its device's proxy, shared by `tests/tests/hosted.rs` and `bench_hosted`.

use crate::fleet::{run, toml_value::V, wait_for, Fleet};
use crate::guestnet::{hello_http_x86_64, GuestNet};
use crate::http::{http_release, instance_of, read_answer};
use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// The libvirt URI of a bursting device's own (local) instances.
pub const URI: &str = "qemu:///system";

/// The local guest network's slot (taken before the hosted host's, 7: one order, no
/// deadlock with tests that take two slots).
pub const LOCAL_SLOT: u8 = 2;

/// The MAC's tail of a guest at the hosted network's first address, 203.0.113.226: the
/// template answers with its MAC as its instance name, made from its address.
pub const HOSTED_MAC: &str = "52:54:00:00:71:e2";

/// The hosted network's first guest address, where the device's first hosted instance
/// answers (routed from the root namespace through the hosted host).
pub const HOSTED_GUEST: &str = "203.0.113.226";

/// A hub, a hosted host, and one device bursting to it ([`burst_fleet`]).
#[derive(Debug)]
pub struct Burst {
    pub net: GuestNet,
    pub host: HostedHost,
    pub fleet: Fleet,
    pub d: usize,
    pub port: u16,
    /// Names of this device's on-demand domains start with it.
    pub prefix: String,
    /// Names of its domains and images on the hosted host start with it
    /// (`device::hypervisor::hosted::prefix`).
    pub hosted_prefix: String,
}

/// A hub, a hosted host, and one device serving the template on demand: one instance
/// locally (`max_local = 1`), one on the hosted host, `target` connections each.
/// `hosted` is the device's `[hosted]` table; `idle_secs` how long an idle instance stays.
/// Release 1 (`1.0.0`) is published and active.
pub fn burst_fleet(
    tag: &str,
    target: u32,
    idle_secs: u64,
    hosted: impl FnOnce(&HostedHost) -> String,
) -> Result<Burst> {
    let net = GuestNet::create(URI, LOCAL_SLOT)?;
    let host = HostedHost::up()?;
    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    let name = format!("{tag}-{}", std::process::id());
    let d = fleet.add_device(&name, "hello", &[])?;
    let dev = &fleet.devices[d];
    dev.set_config("nic", V::Str(net.nic()))?;
    dev.set_config("guest_addresses", V::Str(net.static_addresses()))?;
    let metrics = format!("127.0.0.1:{}", crate::free_port()?);
    dev.set_config("metrics", V::Str(metrics))?;
    let port = dev.serve_on_demand(
        "hello",
        &format!(
            "min = 0\nmax_local = 1\nmax_remote = 1\ntarget = {target}\nidle_secs = {idle_secs}\n\
             stable_window_secs = 2\npanic_window_secs = 1\ndrain_secs = 2"
        ),
    )?;
    let table = hosted(&host);
    let mut text = std::fs::read_to_string(dev.config())?;
    text.push_str(&format!("\n{table}"));
    std::fs::write(dev.config(), &text)?;
    let fleet_name = text
        .lines()
        .find_map(|l| l.strip_prefix("fleet = "))
        .context("device.toml has no fleet")?
        .trim_matches('"')
        .to_string();
    fleet.start_device(d)?;
    let mut b = Burst {
        net,
        host,
        fleet,
        d,
        port,
        prefix: format!("uf-{name}-hello-od"),
        hosted_prefix: device::hypervisor::hosted::prefix(&fleet_name, &name, "hello"),
    };
    b.publish("1.0.0", 1)?;
    Ok(b)
}

/// A keep-alive connection through the proxy on `port`, answered once (by `version`): the
/// reader and the instance that answered.
pub fn client(port: u16, version: &str) -> Result<(BufReader<TcpStream>, String)> {
    let (r, instance, _) = timed_client(port, version)?;
    Ok((r, instance))
}

/// [`client`], and the time from before its connect to the answer's first byte.
pub fn timed_client(port: u16, version: &str) -> Result<(BufReader<TcpStream>, String, Duration)> {
    let began = Instant::now();
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(90)))?;
    let mut r = BufReader::new(s);
    r.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: hello\r\n\r\n")?;
    anyhow::ensure!(
        !r.fill_buf()?.is_empty(),
        "connection closed with no answer"
    );
    let first_byte = began.elapsed();
    let (status, body) = read_answer(&mut r)?;
    let instance = instance_of(&status, &body, version)?;
    Ok((r, instance, first_byte))
}

/// Two clients at once, each holding its connection: (local's answer, hosted one's).
pub fn two_clients(port: u16) -> Result<[(BufReader<TcpStream>, String); 2]> {
    let first = client(port, "1.0.0")?;
    let second = client(port, "1.0.0")?;
    Ok([first, second])
}

/// `n` log lines containing `what`.
pub fn lines(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

impl Burst {
    pub fn log(&self) -> String {
        self.fleet.devices[self.d].log_text()
    }

    pub fn metric(&self, name: &str) -> Result<u64> {
        let addr = self.fleet.devices[self.d]
            .metrics_addr()
            .context("metrics")?;
        crate::metric(&addr, name)
    }

    /// The device's last report's hosted use.
    pub fn hosted_use(&self) -> serde_json::Value {
        let r = self.fleet.devices[self.d]
            .report("hello")
            .unwrap_or_default();
        r["hosted"].clone()
    }

    pub fn no_hosted_domains(&self, within: Duration) -> Result<()> {
        wait_for(
            "no domain of this device on the hosted host",
            within,
            || {
                self.host
                    .domains(&self.hosted_prefix)
                    .ok()?
                    .is_empty()
                    .then_some(())
            },
        )
    }

    /// Publishes the template as `version` (`cmdline` `app=hello version=VERSION`, probed,
    /// no staging) and waits until the device has it, its `release`, active.
    pub fn publish(&mut self, version: &str, release: u64) -> Result<()> {
        let cmdline = format!("app=hello version={version}");
        let args = http_release(&cmdline, &["--no-staging"]);
        self.fleet
            .publish(&hello_http_x86_64()?, "hello", version, &args)?;
        self.fleet.wait_all(
            &[self.d],
            "hello",
            release,
            "Active",
            Duration::from_secs(90),
        )
    }
}
