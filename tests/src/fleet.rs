//! A fleet on loopback for end-to-end tests: one `hub serve` (embedded broker unless told
//! otherwise) and any number of `device run` processes, each in its own directory under
//! one temp dir, all real processes on free ports. Dropping the [`Fleet`] kills them all.

use crate::{bin, free_port};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod device;
mod domains;
pub use device::{toml_value, Device};
pub use domains::{destroy_domains, domain_running, running_domains};

/// A running child process, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// Sends SIGTERM (as systemd's stop does) and waits up to `within` for the exit;
    /// returns its status. The process is killed if it outlives the wait.
    pub fn terminate(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        run(Command::new("kill").args(["-TERM", &pid]))?;
        let status = wait_for(
            &format!("process {pid} to exit after SIGTERM"),
            within,
            || self.child.try_wait().ok().flatten(),
        );
        if status.is_err() {
            self.kill9();
        }
        status
    }
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Stop the agents first, then any domains they left on a shared libvirtd.
        for d in &mut self.devices {
            if let Some(mut p) = d.proc.take() {
                p.kill9();
            }
        }
        if !self.libvirt.starts_with("test:") {
            let names: Vec<String> = self
                .devices
                .iter()
                .map(|d| format!("uf-{}-", d.name))
                .collect();
            destroy_domains(&self.libvirt, &names);
        }
        if std::env::var_os("UNIFLEET_KEEP_TEST_DIRS").is_some() {
            let path =
                std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")).keep();
            eprintln!("kept test directory {}", path.display());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a command to completion, failing with its output if it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` until it returns `Some` or `timeout` passes. The processes under test
/// report through files (status.json, inventory.json); polling those with a deadline is
/// how a test observes another process.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Debug)]
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub hub_dir: PathBuf,
    pub hub: Option<Proc>,
    pub hub_addr: String,
    pub mqtt: String,
    pub devices: Vec<Device>,
    pub libvirt: String,
    /// The network namespace the hub runs in, if any.
    pub hub_ns: Option<String>,
    /// Environment of every `hub` command and `hub serve` (e.g. [`faketime`]'s).
    pub hub_env: Vec<(&'static str, String)>,
}

/// The environment that runs a program with its wall clock `offset` ahead (libfaketime,
/// `faketime` in `scripts/setup.sh`; e.g. `+1100d`). Monotonic time is left alone, so
/// timers and timeouts behave.
pub fn faketime(offset: &str) -> Vec<(&'static str, String)> {
    let lib = format!(
        "/usr/lib/{}-linux-gnu/faketime/libfaketime.so.1",
        std::env::consts::ARCH
    );
    assert!(
        Path::new(&lib).exists(),
        "{lib} is missing: install faketime (scripts/setup.sh)"
    );
    vec![
        ("LD_PRELOAD", lib),
        ("FAKETIME", offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
    ]
}

/// `program args…`, run inside network namespace `ns` when there is one.
pub fn in_netns(ns: Option<&str>, program: Command) -> Command {
    let Some(ns) = ns else { return program };
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(program.get_program())
        .args(program.get_args());
    if let Some(dir) = program.get_current_dir() {
        cmd.current_dir(dir);
    }
    for (k, v) in program.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    cmd
}

impl Fleet {
    /// `hub init` in a temp dir with free ports; not started yet.
    pub fn new(libvirt: &str) -> Result<Fleet> {
        Fleet::new_with(libvirt, tempfile::tempdir()?, &[])
    }

    /// [`Fleet::new`] in `dir` with more `hub init` arguments (paths relative to `dir`).
    pub fn new_with(libvirt: &str, dir: tempfile::TempDir, init: &[&str]) -> Result<Fleet> {
        Fleet::init(libvirt, dir, init, "127.0.0.1", None)
    }

    /// A hub in network namespace `ns` at `ip` (its own, in a [`crate::homes::Homes`]).
    pub fn new_in_netns(libvirt: &str, ns: &str, ip: &str) -> Result<Fleet> {
        Fleet::init(libvirt, tempfile::tempdir()?, &[], ip, Some(ns.into()))
    }

    fn init(
        libvirt: &str,
        dir: tempfile::TempDir,
        init: &[&str],
        ip: &str,
        hub_ns: Option<String>,
    ) -> Result<Fleet> {
        let hub_dir = dir.path().join("hub");
        let mqtt_port = free_port()?;
        let p2p_port = free_port()?;
        run(Command::new(bin("hub")?)
            .current_dir(dir.path())
            .args(["--dir"])
            .arg(&hub_dir)
            .args(["init", "--mqtt-listen", &format!("{ip}:{mqtt_port}")])
            .args(["--p2p-listen", &format!("/ip4/{ip}/tcp/{p2p_port}")])
            .args(init))?;
        // Beyond loopback the embedded broker takes TLS only.
        let scheme = if ip.starts_with("127.") {
            "mqtt"
        } else {
            "mqtts"
        };
        Ok(Fleet {
            dir,
            hub_dir,
            hub: None,
            hub_addr: String::new(),
            mqtt: format!("{scheme}://{ip}:{mqtt_port}"),
            devices: vec![],
            libvirt: libvirt.into(),
            hub_ns,
            hub_env: vec![],
        })
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn hub_cmd(&self) -> Result<Command> {
        let mut c = Command::new(bin("hub")?);
        c.arg("--dir").arg(&self.hub_dir);
        c.envs(self.hub_env.iter().map(|(k, v)| (k, v)));
        Ok(c)
    }

    /// Starts `hub serve` and waits until it printed its peer address.
    pub fn start_hub(&mut self, extra: &[&str]) -> Result<()> {
        let log = self.path("hub.log");
        let _ = std::fs::remove_file(self.hub_dir.join("hub.addr"));
        let mut serve = self.hub_cmd()?;
        serve.arg("serve").args(extra);
        let child = in_netns(self.hub_ns.as_deref(), serve)
            .env(
                "RUST_LOG",
                "info,libp2p=warn,libp2p_gossipsub=error,rumqttd=warn",
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut proc = Proc { child, log };
        let addr_file = self.hub_dir.join("hub.addr");
        self.hub_addr = wait_for("hub serve to listen", Duration::from_secs(20), || {
            if !proc.is_running() {
                return Some(Err(anyhow::anyhow!(
                    "hub serve exited: {}",
                    proc.log_text()
                )));
            }
            std::fs::read_to_string(&addr_file).ok().map(Ok)
        })??;
        self.hub = Some(proc);
        Ok(())
    }

    pub fn kill_hub(&mut self) {
        if let Some(mut h) = self.hub.take() {
            h.kill9();
        }
    }

    /// `device enroll` + `hub enroll` for a new device named `name`; not started yet.
    pub fn add_device(&mut self, name: &str, app: &str, extra: &[&str]) -> Result<usize> {
        let libvirt = self.libvirt.clone();
        self.add_device_on(name, app, "stable", &libvirt, extra)
    }

    /// [`Fleet::add_device`] on a given channel and libvirt URI.
    pub fn add_device_on(
        &mut self,
        name: &str,
        app: &str,
        channel: &str,
        libvirt: &str,
        extra: &[&str],
    ) -> Result<usize> {
        let i = self.set_up_device(NewDevice {
            channel,
            libvirt,
            extra,
            ..NewDevice::named(name, app)
        })?;
        // The operator assigns the tags the device declares.
        let tags: Vec<&str> = extra
            .windows(2)
            .filter(|w| w[0] == "--tag")
            .map(|w| w[1])
            .collect();
        self.enroll_at_hub_with(i, &tags)
    }

    /// A device that declares `extra`'s tags (`--tag` to `device enroll`) but is
    /// assigned only `assigned` by the hub.
    pub fn add_device_assigned(
        &mut self,
        name: &str,
        app: &str,
        extra: &[&str],
        assigned: &[&str],
    ) -> Result<usize> {
        let libvirt = self.libvirt.clone();
        let i = self.set_up_device(NewDevice {
            libvirt: &libvirt,
            extra,
            ..NewDevice::named(name, app)
        })?;
        self.enroll_at_hub_with(i, assigned)
    }

    /// [`Fleet::add_device`] in network namespace `ns` (a home's LAN): listening on every
    /// interface, finding its LAN neighbours by mDNS, as a device in a home does.
    pub fn add_device_in(&mut self, ns: &str, name: &str, app: &str) -> Result<usize> {
        let libvirt = self.libvirt.clone();
        let i = self.set_up_device(NewDevice {
            libvirt: &libvirt,
            ns: Some(ns),
            ..NewDevice::named(name, app)
        })?;
        self.enroll_at_hub(i)
    }

    fn enroll_at_hub(&mut self, i: usize) -> Result<usize> {
        self.enroll_at_hub_with(i, &[])
    }

    /// `hub enroll` of device `i`, assigning it `tags`.
    fn enroll_at_hub_with(&mut self, i: usize, tags: &[&str]) -> Result<usize> {
        let name = self.devices[i].name.clone();
        let mut cmd = self.hub_cmd()?;
        cmd.arg("enroll")
            .arg(self.devices[i].dir.join("device.pub"))
            .args(["--name", &name]);
        for t in tags {
            cmd.args(["--tag", t]);
        }
        run(&mut cmd)?;
        Ok(i)
    }

    /// `device enroll` of a board named `name` in `DIR/<dir>`, not enrolled at the hub:
    /// a stranger, or a second board given a name already taken.
    pub fn add_unenrolled_device(&mut self, dir: &str, name: &str, app: &str) -> Result<usize> {
        let libvirt = self.libvirt.clone();
        self.set_up_device(NewDevice {
            dir,
            libvirt: &libvirt,
            ..NewDevice::named(name, app)
        })
    }

    fn set_up_device(&mut self, new: NewDevice) -> Result<usize> {
        let NewDevice {
            dir,
            name,
            app,
            channel,
            libvirt,
            ns,
            extra,
        } = new;
        let dir = self.path(dir);
        let port = free_port()?;
        // On the test host: loopback, and no mDNS (every agent of every test would find
        // every other). In a home: every interface and mDNS, the defaults.
        let listen = match ns {
            Some(_) => format!("/ip4/0.0.0.0/tcp/{port}"),
            None => format!("/ip4/127.0.0.1/tcp/{port}"),
        };
        let mut cmd = Command::new(bin("device")?);
        if ns.is_none() {
            cmd.arg("enroll").arg("--no-mdns");
        } else {
            cmd.arg("enroll");
        }
        cmd.args([
            "--name",
            name,
            "--app",
            app,
            "--libvirt",
            libvirt,
            "--listen",
            &listen,
            "--channel",
            channel,
        ])
        .arg("--dir")
        .arg(&dir)
        .arg("--root")
        .arg(self.hub_dir.join("root.bin"))
        .args(["--broker", &self.mqtt]);
        if self.mqtt.starts_with("mqtts://") {
            cmd.arg("--broker-ca")
                .arg(self.hub_dir.join("broker-ca.pem"));
        }
        if !self.hub_addr.is_empty() {
            cmd.args(["--hub", &self.hub_addr]);
        } else {
            let addr = std::fs::read_to_string(self.hub_dir.join("hub.addr")).unwrap_or_default();
            if !addr.is_empty() {
                cmd.args(["--hub", &addr]);
            }
        }
        cmd.args(extra);
        run(&mut cmd)?;
        self.devices.push(Device {
            name: name.into(),
            dir,
            proc: None,
            addr: listen,
            ns: ns.map(String::from),
        });
        // TCG, not "auto": the trial boots under both accelerators would add seconds to
        // every activation (nested KVM boots the test image in ~5 s); the tests of the
        // choice set "auto" themselves.
        let i = self.devices.len() - 1;
        self.devices[i].set_config("domain_type", toml_value::V::Str("qemu".into()))?;
        Ok(i)
    }

    /// TLS on the embedded broker on loopback too (before the hub starts and devices are
    /// added): devices pin the hub's `broker-ca.pem` and ask the hub for their client
    /// certificates, as they do beyond loopback.
    pub fn use_tls(&mut self) -> Result<()> {
        let fleet_line = std::fs::read_to_string(self.hub_dir.join("hub.toml"))?
            .lines()
            .find(|l| l.starts_with("fleet = "))
            .context("hub.toml has no fleet")?
            .to_string();
        self.set_hub_setting(&fleet_line, &format!("{fleet_line}\nmqtt_tls = true"))?;
        self.mqtt = self.mqtt.replacen("mqtt://", "mqtts://", 1);
        Ok(())
    }

    /// Changes one line of the hub's `hub.toml` (before it starts), failing if absent.
    /// Lets the hub serve devices it has not enrolled (a new hub serves enrolled ones
    /// only), for clients such as `fetch_release` that have no enrolled key.
    pub fn serve_strangers(&self) -> Result<()> {
        self.set_hub_setting("serve_unenrolled = false", "serve_unenrolled = true")
    }

    pub fn set_hub_setting(&self, from: &str, to: &str) -> Result<()> {
        let cfg = self.hub_dir.join("hub.toml");
        let text = std::fs::read_to_string(&cfg)?;
        anyhow::ensure!(
            text.contains(from),
            "{} has no line {from:?}",
            cfg.display()
        );
        std::fs::write(&cfg, text.replace(from, to))?;
        Ok(())
    }

    pub fn start_device(&mut self, i: usize) -> Result<()> {
        self.start_device_with(i, Command::new(bin("device")?))
    }

    /// [`Fleet::start_device`] with another program for the agent (an arm64 build run
    /// under `qemu-aarch64-static`, say); `device run --config …` is appended.
    pub fn start_device_with(&mut self, i: usize, mut program: Command) -> Result<()> {
        let d = &mut self.devices[i];
        let log = d.dir.join("agent.log");
        program.arg("run").arg("--config").arg(d.config());
        let child = in_netns(d.ns.as_deref(), program)
            .env(
                "RUST_LOG",
                std::env::var("UNIFLEET_TEST_DEVICE_LOG")
                    .unwrap_or_else(|_| "info,libp2p=warn,libp2p_gossipsub=error".into()),
            )
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)?,
            )
            .spawn()?;
        d.proc = Some(Proc { child, log });
        Ok(())
    }

    /// The device's peer address with its peer id, once its agent logged it.
    pub fn device_peer_addr(&self, i: usize) -> Result<String> {
        let d = &self.devices[i];
        wait_for("device peer id in its log", Duration::from_secs(10), || {
            let log = d.log_text();
            let id = log
                .split("peer_id=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_string();
            Some(format!("{}/p2p/{id}", d.addr))
        })
    }

    pub fn testimage(&self, app: &str, version: &str, extra: &[&str]) -> Result<PathBuf> {
        // One file per (app, version, arch): a mixed-arch release has one of each.
        let arch = extra
            .iter()
            .position(|a| *a == "--arch")
            .and_then(|i| extra.get(i + 1))
            .map_or(String::new(), |a| format!("-{a}"));
        let out = self.path(&format!("{app}-{version}{arch}.img"));
        run(Command::new(bin("fwtool")?)
            .args(["testimage", "--app", app, "--version", version, "--out"])
            .arg(&out)
            .args(extra))?;
        Ok(out)
    }

    /// `hub publish IMAGE --app … --version … --no-staging` plus `extra`; returns stdout.
    pub fn publish(
        &self,
        image: &Path,
        app: &str,
        version: &str,
        extra: &[&str],
    ) -> Result<String> {
        run(self
            .hub_cmd()?
            .arg("publish")
            .arg(image)
            .args(["--app", app, "--version", version])
            .args(extra))
    }

    /// `hub publish --image PLATFORM=PATH …` (one release of several platforms) plus
    /// `extra`; returns stdout.
    pub fn publish_images(
        &self,
        images: &[(&str, &Path)],
        app: &str,
        version: &str,
        extra: &[&str],
    ) -> Result<String> {
        let mut cmd = self.hub_cmd()?;
        cmd.arg("publish");
        for (platform, path) in images {
            cmd.arg("--image")
                .arg(format!("{platform}={}", path.display()));
        }
        run(cmd.args(["--app", app, "--version", version]).args(extra))
    }

    /// Waits until every listed device reports `state` for `release` of `app`.
    pub fn wait_all(
        &self,
        devices: &[usize],
        app: &str,
        release: u64,
        state: &str,
        timeout: Duration,
    ) -> Result<()> {
        wait_for(
            &format!("devices {devices:?} {state} on release {release}"),
            timeout,
            || {
                devices
                    .iter()
                    .all(|&i| {
                        self.devices[i]
                            .release_state(app)
                            .is_some_and(|(r, s)| r == release && s == state)
                    })
                    .then_some(())
            },
        )
        .map_err(|e| {
            let mut report = String::new();
            for &i in devices {
                let d = &self.devices[i];
                let st = d.release_state(app);
                if st
                    .as_ref()
                    .is_some_and(|(r, s)| *r == release && s == state)
                {
                    continue;
                }
                let log = d.log_text();
                let lines: Vec<&str> = log.lines().filter(|l| !l.contains("retrying in")).collect();
                report.push_str(&format!(
                    "\n{} is at {st:?}; its log ends:\n{}",
                    d.name,
                    lines[lines.len().saturating_sub(25)..].join("\n")
                ));
            }
            e.context(report)
        })
    }

    /// A file of the hub's git store at HEAD (`git show HEAD:PATH`).
    pub fn store_file(&self, path: &str) -> Result<Vec<u8>> {
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(self.hub_dir.join("store.git"))
            .args(["show", &format!("HEAD:{path}")])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "git show HEAD:{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out.stdout)
    }

    /// Asserts that device `i` runs exactly `image`: its current slot has the same bytes.
    pub fn assert_runs_image(&self, i: usize, image: &Path) {
        let st = self.devices[i].state_json();
        let slot = st["apps"]["hello"]["current"]["slot"]
            .as_str()
            .expect("a current slot");
        assert_eq!(
            proto::Digest::of(&std::fs::read(slot).expect("slot readable")),
            proto::Digest::of(&std::fs::read(image).expect("image readable")),
            "{} runs something other than {}",
            self.devices[i].name,
            image.display()
        );
    }

    /// The hub's releases (`hub releases --json`), optionally only those on `channel`.
    pub fn releases(&self, channel: Option<&str>) -> Result<Vec<Value>> {
        let all: Value = serde_json::from_str(&run(self.hub_cmd()?.args(["releases", "--json"]))?)?;
        Ok(all
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| channel.is_none_or(|c| r["channel"] == c))
            .collect())
    }

    /// `fetch_release`: the release whose manifest is `digest` on `channel` fetched from
    /// the hub over libp2p and verified against the hub's root, written to `out`; what it
    /// printed.
    pub fn fetch_release(&self, digest: &str, channel: &str, out: &Path) -> Result<String> {
        run(Command::new(bin("fetch_release")?)
            .arg(&self.hub_addr)
            .arg(self.hub_dir.join("root.bin"))
            .args([digest, channel])
            .arg(out))
    }

    /// [`Fleet::fetch_release`] of a release on `channel` from `peer` (the hub's address,
    /// or a device's), asking as device `i` (its key).
    pub fn fetch_release_as(
        &self,
        peer: &str,
        i: usize,
        (digest, channel): (&str, &str),
        out: &Path,
    ) -> Result<String> {
        run(Command::new(bin("fetch_release")?)
            .env("UNIFLEET_FETCH_KEY", self.devices[i].dir.join("device.key"))
            .arg(peer)
            .arg(self.hub_dir.join("root.bin"))
            .args([digest, channel])
            .arg(out))
    }

    /// The hub's inventory (`hub devices --json`).
    pub fn inventory(&self) -> Result<Value> {
        Ok(serde_json::from_str(&run(self
            .hub_cmd()?
            .args(["devices", "--json"]))?)?)
    }
}

/// A running hub (`hub serve` plus `serve_args`) and `n` devices of `hello` named
/// `PREFIX0`, `PREFIX1`… (`enroll_args` to `device enroll`), all started.
pub fn running_fleet(
    uri: &str,
    serve_args: &[&str],
    prefix: &str,
    n: usize,
    enroll_args: &[&str],
) -> Result<(Fleet, Vec<usize>)> {
    let mut fleet = Fleet::new(uri)?;
    fleet.start_hub(serve_args)?;
    let all: Vec<usize> = (0..n)
        .map(|i| fleet.add_device(&format!("{prefix}{i}"), "hello", enroll_args))
        .collect::<Result<_>>()?;
    for &i in &all {
        fleet.start_device(i)?;
    }
    Ok((fleet, all))
}

/// A hub and one device `name` serving `hello` on demand under `uri` (`settings`: lines of
/// its `[[ondemand]]` table), with metrics on and release 1 of the test image active.
/// Returns (fleet, device, proxy port).
pub fn on_demand_fleet(uri: &str, name: &str, settings: &str) -> Result<(Fleet, usize, u16)> {
    let mut fleet = Fleet::new(uri)?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device(name, "hello", &[])?;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    fleet.devices[d].set_config("metrics", toml_value::V::Str(metrics))?;
    let port = fleet.devices[d].serve_on_demand("hello", settings)?;
    fleet.start_device(d)?;
    let img = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&img, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 1, "Active", Duration::from_secs(60))?;
    Ok((fleet, d, port))
}

/// What `device enroll` is given for a new test device.
struct NewDevice<'a> {
    /// Its directory under the fleet's (usually its name).
    dir: &'a str,
    name: &'a str,
    app: &'a str,
    channel: &'a str,
    libvirt: &'a str,
    /// The network namespace (a home's LAN) it runs in; `None`: the test host.
    ns: Option<&'a str>,
    extra: &'a [&'a str],
}

impl<'a> NewDevice<'a> {
    fn named(name: &'a str, app: &'a str) -> Self {
        NewDevice {
            dir: name,
            name,
            app,
            channel: "stable",
            libvirt: "test:///default",
            ns: None,
            extra: &[],
        }
    }
}
