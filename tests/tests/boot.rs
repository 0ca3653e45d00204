//! A `fwtool testimage` really boots: under QEMU directly and through libvirt's QEMU
//! driver (`qemu:///system`, which the README's set-up starts), printing its READY line
//! and answering a line on its serial port.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use unifleet_tests::{bin, free_port, read_until, wait_for_file_line};

const BOOT_DEADLINE: Duration = Duration::from_secs(10);

fn testimage(dir: &Path, app: &str, version: &str, extra: &[&str]) -> Result<std::path::PathBuf> {
    let out = dir.join(format!("{app}-{version}.elf"));
    let status = Command::new(bin("fwtool")?)
        .args(["testimage", "--app", app, "--version", version, "--out"])
        .arg(&out)
        .args(extra)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "fwtool testimage failed");
    Ok(out)
}

/// Kills the child when dropped, so a failing assertion never leaks a QEMU.
struct Reap(std::process::Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn testimage_boots_under_qemu_and_answers_on_serial() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = testimage(dir.path(), "hello", "1.2.3", &["--pad-mib", "1"])?;
    let start = Instant::now();
    let mut qemu = Reap(
        Command::new("qemu-system-x86_64")
            .args([
                "-display",
                "none",
                "-monitor",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
                "-m",
                "32",
                "-kernel",
            ])
            .arg(&image)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu-system-x86_64 (install qemu-system-x86)")?,
    );
    let mut stdout = qemu.0.stdout.take().unwrap();
    // Pipes block; read on a thread and hand lines back over a channel with a deadline.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(64);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let wait_for = |needle: &str, seen: &mut String| -> Result<()> {
        let deadline = Instant::now() + BOOT_DEADLINE;
        while !seen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = rx
                .recv_timeout(left)
                .with_context(|| format!("waiting for {needle:?}; console so far: {seen:?}"))?;
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        Ok(())
    };
    wait_for("READY hello 1.2.3\r\n", &mut seen)?;
    let ready_after = start.elapsed();
    qemu.0.stdin.as_mut().unwrap().write_all(b"ping\n")?;
    wait_for("HELLO hello 1.2.3\r\n", &mut seen)?;
    assert!(ready_after < BOOT_DEADLINE);
    eprintln!("qemu: READY after {ready_after:?}");
    Ok(())
}

#[test]
fn fail_image_never_prints_ready() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = testimage(dir.path(), "hello", "9.9.9", &["--fail"])?;
    let log = dir.path().join("console.log");
    let _qemu = Reap(
        Command::new("qemu-system-x86_64")
            .args([
                "-display",
                "none",
                "-monitor",
                "none",
                "-no-reboot",
                "-m",
                "32",
                "-serial",
            ])
            .arg(format!("file:{}", log.display()))
            .arg("-kernel")
            .arg(&image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    // It boots (its own line appears) ...
    let text = wait_for_file_line(&log, "never becomes ready", BOOT_DEADLINE)?;
    // ... and what it printed is all it will ever print: it halted with interrupts off.
    assert!(!text.contains("READY"), "{text:?}");
    Ok(())
}

/// libvirt domain XML for QEMU direct kernel boot with COM1 on a loopback TCP port and
/// a copy of the console in a log file.
fn domain_xml(name: &str, kernel: &Path, port: u16, log: &Path) -> String {
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <serial type='tcp'>
      <source mode='bind' host='127.0.0.1' service='{port}' tls='no'/>
      <protocol type='raw'/>
      <log file='{log}' append='off'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>"#,
        kernel = kernel.display(),
        log = log.display()
    )
}

/// Destroys the transient domain when dropped.
struct Domain(virt::domain::Domain);
impl Drop for Domain {
    fn drop(&mut self) {
        let _ = self.0.destroy();
    }
}

#[test]
fn testimage_boots_through_libvirt_qemu_system() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = testimage(dir.path(), "hello", "2.0.0", &[])?;
    let log = dir.path().join("console.log");
    let conn = virt::connect::Connect::open(Some("qemu:///system"))
        .context("connecting to qemu:///system (run scripts/setup.sh to start libvirtd)")?;
    let name = format!("uf-boot-test-{}", std::process::id());
    // The port is free when chosen; if another process takes it first, QEMU fails to
    // start and we choose again.
    let mut attempt = 0;
    let (dom, port, start) = loop {
        attempt += 1;
        let port = free_port()?;
        let start = Instant::now();
        match conn.create_domain_xml(&domain_xml(&name, &image, port, &log), 0) {
            Ok(d) => break (Domain(d), port, start),
            Err(e) if attempt < 3 => eprintln!("retrying domain start: {e}"),
            Err(e) => return Err(e).context("creating the libvirt domain"),
        }
    };
    let text = wait_for_file_line(&log, "READY hello 2.0.0", BOOT_DEADLINE)?;
    eprintln!(
        "libvirt: READY {:?} after create_domain_xml: {text:?}",
        start.elapsed()
    );
    let mut sock =
        std::net::TcpStream::connect(("127.0.0.1", port)).context("connecting to the console")?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    sock.write_all(b"are you there?\r\n")?;
    let answer = read_until(&mut sock, "HELLO hello 2.0.0\r\n", BOOT_DEADLINE)?;
    assert!(answer.contains("HELLO hello 2.0.0"), "{answer:?}");
    let (state, _) = dom.0.state()?;
    assert!(
        state.is_known_and(|s| matches!(s, virt::domain::DomainState::Running)),
        "{state:?}"
    );
    Ok(())
}

/// The aarch64 test unikernel (an arm64 Image) boots through libvirt's QEMU driver with
/// the XML the device agent renders (`-M virt`, Cortex-A53 under TCG, GICv2), prints its
/// READY line on the PL011 console, answers a line, and idles at ~0 CPU.
#[test]
fn aarch64_testimage_boots_through_libvirt_with_the_agents_xml() -> Result<()> {
    use device::hypervisor::{render_xml, Driver, Launch};
    use proto::manifest::{BootSpec, HealthProbe, Platform};
    let dir = tempfile::tempdir()?;
    let image = testimage(dir.path(), "hello", "3.0.0", &["--arch", "aarch64"])?;
    let log = dir.path().join("console.log");
    let conn = virt::connect::Connect::open(Some("qemu:///system"))
        .context("connecting to qemu:///system (run scripts/setup.sh to start libvirtd)")?;
    let launch = Launch {
        name: format!("uf-boot-a64-{}", std::process::id()),
        of: device::hypervisor::ReleaseOf {
            app: "hello".into(),
            release: 1,
            image: proto::Digest::of(b"not uploaded"),
        },
        platform: Platform::QemuAarch64,
        image,
        boot: BootSpec {
            memory_mib: 64,
            vcpus: 1,
            cmdline: String::new(),
            probe: HealthProbe::ConsoleBanner {
                line: "READY hello 3.0.0".into(),
            },
            probe_timeout_ms: 10_000,
            network: false,
        },
        console_log: log.clone(),
        nic: None,
        domain_type: None,
    };
    let mut attempt = 0;
    let (dom, port, start) = loop {
        attempt += 1;
        let port = free_port()?;
        let start = Instant::now();
        match conn.create_domain_xml(&render_xml(&launch, Driver::Qemu, "qemu", Some(port)), 0) {
            Ok(d) => break (Domain(d), port, start),
            Err(e) if attempt < 3 => eprintln!("retrying domain start: {e}"),
            Err(e) => return Err(e).context("creating the aarch64 libvirt domain"),
        }
    };
    let text = wait_for_file_line(&log, "READY hello 3.0.0", BOOT_DEADLINE)?;
    // BENCHMARKS.md "aarch64 boot": from asking libvirt to create the domain to READY.
    eprintln!(
        "aarch64: READY {:?} after create_domain_xml: {text:?}",
        start.elapsed()
    );
    let mut sock =
        std::net::TcpStream::connect(("127.0.0.1", port)).context("connecting to the console")?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    for line in ["are you there?\r\n", "and now?\n"] {
        sock.write_all(line.as_bytes())?;
        let answer = read_until(&mut sock, "HELLO hello 3.0.0\r\n", BOOT_DEADLINE)?;
        assert!(answer.contains("HELLO hello 3.0.0"), "{answer:?}");
    }
    let (state, _) = dom.0.state()?;
    assert!(
        state.is_known_and(|s| matches!(s, virt::domain::DomainState::Running)),
        "{state:?}"
    );
    // Idle in WFI: a second of wall time costs far less than a second of CPU.
    let cpu = |d: &virt::domain::Domain| d.info().map(|i| i.cpu_time).unwrap_or(0);
    let before = cpu(&dom.0);
    std::thread::sleep(Duration::from_secs(2));
    let used_ns = cpu(&dom.0) - before;
    assert!(
        used_ns < 500_000_000,
        "idle guest used {used_ns} ns of CPU in 2 s"
    );
    Ok(())
}
