//! Issue 31, point 1: nobody in the broker where they don't belong. The embedded broker
//! with TLS (as it is beyond loopback) and mosquitto configured by `hub broker-config`,
//! each tried by outsiders with `mosquitto_sub`/`mosquitto_pub`: no certificate, no TLS,
//! a certificate of another CA, an expired one, a device writing another's status or
//! reading others' reports, a client taking the hub's client id. Devices converge over
//! TLS with the certificates the hub issues them; a flooding device is cut off.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use unifleet_tests::fleet::{faketime, run, wait_for, Fleet};
use unifleet_tests::{free_port, metric};

const CONVERGE: Duration = Duration::from_secs(60);

/// A hub with TLS on its embedded broker (on loopback, as it is on any other address),
/// its metrics on, and two devices `a` and `b` active on release 1.
fn tls_fleet(metrics: &str) -> Result<Fleet> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.use_tls()?;
    fleet.start_hub(&["--metrics", metrics])?;
    converge(&mut fleet)?;
    Ok(fleet)
}

/// Adds devices `a` and `b`, starts them, publishes release 1 and waits until both run
/// it and reach the hub through the broker with the certificates the hub issued them.
fn converge(fleet: &mut Fleet) -> Result<()> {
    let a = fleet.add_device("a", "hello", &[])?;
    let b = fleet.add_device("b", "hello", &[])?;
    fleet.start_device(a)?;
    fleet.start_device(b)?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[a, b], "hello", 1, "Active", CONVERGE)?;
    for i in [a, b] {
        wait_for("the device on the broker over TLS", CONVERGE, || {
            let log = fleet.devices[i].log_text();
            (log.contains("the hub issued this device its MQTT client certificate")
                && log.contains("connected to MQTT broker"))
            .then_some(())
        })?;
    }
    wait_for("both devices' reports at the hub", CONVERGE, || {
        let inv = fleet.inventory().ok()?;
        ["a", "b"]
            .iter()
            .all(|d| inv.get(format!("{d}/hello")).is_some())
            .then_some(())
    })?;
    Ok(())
}

/// Where outsiders dial, and the files they use.
struct Outsider {
    host: String,
    port: u16,
    ca: PathBuf,
    dir: PathBuf,
}

impl Outsider {
    fn of(fleet: &Fleet, ca: &Path) -> Result<Outsider> {
        let rest = fleet.mqtt.strip_prefix("mqtts://").context("a TLS fleet")?;
        let (host, port) = rest.rsplit_once(':').context("host:port")?;
        let dir = fleet.path("outsiders");
        std::fs::create_dir_all(&dir)?;
        Ok(Outsider {
            host: host.into(),
            port: port.parse()?,
            ca: ca.into(),
            dir,
        })
    }

    /// A mosquitto client run with `args` after the broker's address (at most 10 s).
    fn client(&self, tool: &str, tls: bool, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new("timeout");
        cmd.args(["10", tool, "-h", &self.host, "-p", &self.port.to_string()]);
        if tls {
            // The fleet's clients check the CA only; mosquitto's also check the name.
            cmd.arg("--cafile").arg(&self.ca).arg("--insecure");
        }
        Ok(cmd.args(args).stdin(Stdio::null()).output()?)
    }

    /// As device `i` (its key, and its certificate from `hub broker-config`): args for
    /// [`Outsider::client`].
    fn as_device(&self, fleet: &Fleet, i: usize, env: &[(&str, String)]) -> Result<Vec<String>> {
        let name = &fleet.devices[i].name;
        let cert = self.dir.join(format!("{name}.pem"));
        let pem = run(fleet
            .hub_cmd()?
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["broker-config", "--client-cert", name]))?;
        std::fs::write(&cert, pem)?;
        let key = self.dir.join(format!("{name}.key"));
        let text = std::fs::read_to_string(fleet.devices[i].dir.join("device.key"))?;
        let seed = proto::SecretKey::from_text(text.trim())?.seed();
        let der = self.dir.join(format!("{name}.der"));
        std::fs::write(&der, net::broker_tls::ed25519_pkcs8(&seed))?;
        run(Command::new("openssl")
            .args(["pkey", "-inform", "DER", "-in"])
            .arg(&der)
            .arg("-out")
            .arg(&key))?;
        Ok(vec![
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
        ])
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Every outsider the issue names is refused; a device reads its releases. `metrics`:
/// the hub's metrics page.
fn outsiders_are_refused(fleet: &Fleet, o: &Outsider, metrics: &str, broker: Broker) -> Result<()> {
    let all = ["-t", "#", "-C", "1", "-W", "5"];
    let anonymous = o.client("mosquitto_sub", true, &all)?;
    assert!(
        !anonymous.status.success() && anonymous.stdout.is_empty(),
        "anonymous: {anonymous:?}"
    );
    let plaintext = o.client("mosquitto_sub", false, &all)?;
    assert!(
        !plaintext.status.success() && plaintext.stdout.is_empty(),
        "plaintext: {plaintext:?}"
    );

    // A certificate of another CA, named like an enrolled device.
    let (wk, wc) = (o.dir.join("wrong.key"), o.dir.join("wrong.pem"));
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "ed25519", "-nodes", "-days", "1", "-subj", "/CN=a",
            "-keyout",
        ])
        .arg(&wk)
        .arg("-out")
        .arg(&wc))?;
    let wrong = [
        "--cert",
        wc.to_str().unwrap(),
        "--key",
        wk.to_str().unwrap(),
        "-t",
        "unifleet/home/release/#",
        "-C",
        "1",
        "-W",
        "5",
    ];
    let other_ca = o.client("mosquitto_sub", true, &wrong)?;
    assert!(
        !other_ca.status.success() && other_ca.stdout.is_empty(),
        "another CA: {other_ca:?}"
    );

    // The hub's own certificate for `a`, issued as if 400 days ago: expired.
    let expired_creds = o.as_device(fleet, 0, &faketime("-400d"))?;
    let mut args = strs(&expired_creds);
    args.extend(["-t", "unifleet/home/release/#", "-C", "1", "-W", "5"]);
    let expired = o.client("mosquitto_sub", true, &args)?;
    assert!(
        !expired.status.success() && expired.stdout.is_empty(),
        "expired: {expired:?}"
    );

    // Device a with its own, valid certificate: reads its releases (so the refusals
    // above are the credentials', not the setup's)…
    let creds = o.as_device(fleet, 0, &[])?;
    let mut args = strs(&creds);
    args.extend(["-t", "unifleet/home/release/#", "-C", "1", "-W", "10"]);
    let release = o.client("mosquitto_sub", true, &args)?;
    assert!(
        release.status.success() && !release.stdout.is_empty(),
        "a's releases: {release:?}"
    );
    // …but not others' reports,
    let mut args = strs(&creds);
    args.extend(["-t", "unifleet/home/status/+", "-C", "1", "-W", "5"]);
    let reports = o.client("mosquitto_sub", true, &args)?;
    // The embedded broker refuses the subscription; mosquitto takes it and delivers
    // nothing (not even b's retained report).
    let said = String::from_utf8_lossy(&reports.stderr);
    let refused = said.contains("denied") || said.contains("Timed out");
    assert!(
        refused && reports.stdout.is_empty(),
        "others' reports: {reports:?}"
    );
    writes_only_its_own_status(o, &creds, metrics)?;
    takes_no_one_elses_session(fleet, o, &creds, broker)
}

/// Device a's garbage on b's status topic never reaches the hub; on its own topic it
/// does (and is dropped there, unsigned), so the count shows which got through.
fn writes_only_its_own_status(o: &Outsider, creds: &[String], metrics: &str) -> Result<()> {
    let dropped = || metric(metrics, "unifleet_hub_status_dropped_total");
    let before = dropped()?;
    for topic in ["unifleet/home/status/b", "unifleet/home/status/a"] {
        let mut args = strs(creds);
        args.extend(["-q", "1", "-t", topic, "-m", "not a signed report"]);
        o.client("mosquitto_pub", true, &args)?;
    }
    wait_for("a's own garbage at the hub", CONVERGE, || {
        (dropped().ok()? > before).then_some(())
    })?;
    assert_eq!(dropped()?, before + 1, "a wrote on b's status topic");
    Ok(())
}

/// Which broker the outsiders try.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Broker {
    /// Refuses a client id that names another (the hub's, another device's).
    Embedded,
    /// Gives every client the name its certificate carries as its client id.
    Mosquitto,
}

/// A client sending the hub's client id (with device a's certificate) does not knock
/// the hub off the broker: refused (embedded), or given a session of its own (mosquitto)
/// for the 4 s it stays.
fn takes_no_one_elses_session(
    fleet: &Fleet,
    o: &Outsider,
    creds: &[String],
    broker: Broker,
) -> Result<()> {
    let hub_log = || fleet.hub.as_ref().map(|h| h.log_text()).unwrap_or_default();
    let lost = |log: &str| log.matches("MQTT broker unreachable").count();
    let before = lost(&hub_log());
    let mut args = strs(creds);
    args.extend([
        "-i",
        "unifleet-hub-home",
        "-t",
        "unifleet/home/release/#",
        "-W",
        "4",
    ]);
    let impostor = o.client("mosquitto_sub", true, &args)?;
    let refused = String::from_utf8_lossy(&impostor.stderr).contains("identifier rejected");
    match broker {
        Broker::Embedded => assert!(refused, "the impostor: {impostor:?}"),
        Broker::Mosquitto => assert!(!impostor.stdout.is_empty(), "the impostor: {impostor:?}"),
    }
    assert_eq!(
        lost(&hub_log()),
        before,
        "the hub lost its broker: {}",
        hub_log()
    );
    Ok(())
}

/// Device b revoked (`refresh` tells the broker): its own, otherwise valid certificate
/// reads nothing any more.
fn a_revoked_device_is_refused(
    fleet: &Fleet,
    o: &Outsider,
    refresh: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let creds = o.as_device(fleet, 1, &[])?;
    run(fleet.hub_cmd()?.args(["revoke", "b", "--reason", "stolen"]))?;
    refresh()?;
    let mut args = strs(&creds);
    args.extend(["-t", "unifleet/home/release/#", "-C", "1", "-W", "3"]);
    wait_for("the broker to refuse revoked b", CONVERGE, || {
        let out = o.client("mosquitto_sub", true, &args).ok()?;
        (!out.status.success() && out.stdout.is_empty()).then_some(())
    })?;
    // The broker is up, and a is still welcome.
    let a = o.as_device(fleet, 0, &[])?;
    let mut args = strs(&a);
    args.extend(["-t", "unifleet/home/release/#", "-C", "1", "-W", "10"]);
    let release = o.client("mosquitto_sub", true, &args)?;
    assert!(
        release.status.success() && !release.stdout.is_empty(),
        "a after b's revocation: {release:?}"
    );
    Ok(())
}

#[test]
fn the_embedded_broker_with_tls_refuses_outsiders_and_devices_converge_over_it() -> Result<()> {
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let fleet = tls_fleet(&metrics)?;
    let o = Outsider::of(&fleet, &fleet.hub_dir.join("broker-ca.pem"))?;
    outsiders_are_refused(&fleet, &o, &metrics, Broker::Embedded)?;
    assert!(metric(&metrics, "unifleet_hub_mqtt_refused_total")? >= 4);
    assert!(metric(&metrics, "unifleet_hub_mqtt_cut_off_total")? >= 1);
    a_revoked_device_is_refused(&fleet, &o, || Ok(()))?;
    wait_for("revoked b's session closed", CONVERGE, || {
        let log = fleet.hub.as_ref()?.log_text();
        log.contains("closing the MQTT session of device b: no longer enrolled with its key")
            .then_some(())
    })?;
    Ok(())
}

/// mosquitto, as `hub broker-config --mosquitto` writes it, stopped when dropped.
struct Mosquitto(std::process::Child);

impl Mosquitto {
    fn start(fleet: &Fleet, conf: &Path) -> Result<Mosquitto> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(fleet.path("mosquitto.log"))?;
        Ok(Mosquitto(
            Command::new("mosquitto")
                .arg("-c")
                .arg(conf.join("mosquitto.conf"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
        ))
    }
}

impl Mosquitto {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn mosquitto_as_hub_broker_config_writes_it_refuses_outsiders_and_devices_converge_over_it(
) -> Result<()> {
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let mut fleet = Fleet::new("test:///default")?;
    let port = free_port()?;
    let conf = fleet.path("mosquitto");
    let listen = format!("127.0.0.1:{port}");
    let configure = |fleet: &Fleet| {
        let mut cmd = fleet.hub_cmd()?;
        cmd.args(["broker-config", "--listen", &listen, "--mosquitto"]);
        run(cmd.arg(&conf))
    };
    configure(&fleet)?;
    let mut broker = Mosquitto::start(&fleet, &conf)?;
    fleet.mqtt = format!("mqtts://{listen}");
    let url = fleet.mqtt.clone();
    fleet.start_hub(&["--broker", &url, "--metrics", &metrics])?;
    converge(&mut fleet)?;
    let o = Outsider::of(&fleet, &conf.join("ca.pem"))?;
    outsiders_are_refused(&fleet, &o, &metrics, Broker::Mosquitto)?;
    // mosquitto learns of revocations from the list `hub broker-config` writes.
    a_revoked_device_is_refused(&fleet, &o, || {
        let said = configure(&fleet)?;
        assert!(said.contains("1 revoked device(s)"), "{said}");
        broker.stop();
        broker = Mosquitto::start(&fleet, &conf)?;
        Ok(())
    })
}

/// The hub's resident memory, bytes.
fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// The hub's RSS grew 1.6 GB under an anonymous flood of 8 KiB messages (the embedded
/// broker kept them all). A device flooding its own topic is now cut off and counted,
/// and the hub stays within [`FLOOD_GROWTH`] of where it was.
#[test]
fn a_device_flooding_the_broker_is_cut_off_and_the_hub_stays_small() -> Result<()> {
    const FLOOD_GROWTH: u64 = 32 << 20;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let fleet = tls_fleet(&metrics)?;
    let o = Outsider::of(&fleet, &fleet.hub_dir.join("broker-ca.pem"))?;
    let creds = o.as_device(&fleet, 0, &[])?;
    let pid = fleet.hub.as_ref().context("hub")?.child.id();
    let before = rss(pid)?;
    let dropped = || metric(&metrics, "unifleet_hub_status_dropped_total");
    let dropped_before = dropped()?;
    let mut args = strs(&creds);
    args.extend(["-t", "unifleet/home/status/a", "-l"]);
    let mut flood = Command::new("mosquitto_pub")
        .args(["-h", &o.host, "-p", &o.port.to_string(), "--cafile"])
        .arg(&o.ca)
        .arg("--insecure")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let line = "x".repeat(8 * 1024) + "\n";
    let mut stdin = flood.stdin.take().context("stdin")?;
    let mut sent = 0u64;
    // 20,000 messages (160 MiB) unless the broker cuts the client off first.
    for _ in 0..20_000 {
        use std::io::Write;
        if stdin.write_all(line.as_bytes()).is_err() {
            break;
        }
        sent += 1;
    }
    drop(stdin);
    // mosquitto_pub keeps trying to deliver what it read; the cut-off is the broker's.
    let _ = flood.kill();
    let _ = flood.wait();
    wait_for("the flood cut off", CONVERGE, || {
        (metric(&metrics, "unifleet_hub_mqtt_cut_off_total").ok()? >= 1).then_some(())
    })?;
    let after = rss(pid)?;
    // What reached the hub: the burst a device may send, not the flood.
    let reached = dropped()? - dropped_before;
    assert!(
        reached <= 200,
        "{reached} of {sent} flooded messages reached the hub"
    );
    assert!(
        after < before + FLOOD_GROWTH,
        "the hub grew from {before} to {after} bytes under a flood of {sent} messages"
    );
    Ok(())
}
