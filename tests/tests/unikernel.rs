//! The Rust unikernel (`firmware-tools/unikernels/hello-http`) as users deploy it: booted
//! by the device through libvirt (QEMU, `qemu:///system`) with a virtio NIC on a libvirt
//! network, its address learnt from the DHCP lease, probed over HTTP on that address, and
//! served on demand through the device's proxy to the guest — never the console.

use anyhow::{bail, Context, Result};
use std::io::{BufReader, Read};
use std::net::TcpStream;
use std::time::Duration;
use unifleet_tests::fleet::{run, running_domains, toml_value::V, wait_for, Device, Fleet};
use unifleet_tests::guestnet::{hello_http_aarch64, hello_http_x86_64, GuestNet};
use unifleet_tests::http::{answer, answer_of, get, http_release};
use unifleet_tests::template::{template_fleet, TemplateFleet};

const URI: &str = "qemu:///system";

/// A guest network (`slot`), a hub, and one device `NAME-PID` with its NIC there
/// (`enroll`: more `device enroll` arguments), configured by `setup` before it starts.
fn nic_fleet(
    slot: u8,
    name: &str,
    enroll: &[&str],
    setup: impl FnOnce(&Device, &GuestNet) -> Result<()>,
) -> Result<(GuestNet, Fleet, usize, String)> {
    let net = GuestNet::create(URI, slot)?;
    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    let name = format!("{name}-{}", std::process::id());
    let d = fleet.add_device(&name, "hello", enroll)?;
    fleet.devices[d].set_config("nic", V::Str(net.nic()))?;
    setup(&fleet.devices[d], &net)?;
    fleet.start_device(d)?;
    Ok((net, fleet, d, name))
}

/// Release 1 (`1.0.0`) of the x86 template with an HTTP probe, active on device `d`.
fn release_1(fleet: &Fleet, d: usize) -> Result<()> {
    let args = http_release("app=hello version=1.0.0", &["--no-staging"]);
    fleet.publish(&hello_http_x86_64()?, "hello", "1.0.0", &args)?;
    fleet.wait_all(&[d], "hello", 1, "Active", Duration::from_secs(90))
}

#[test]
fn the_rust_unikernel_serves_http_on_demand_through_its_nic() -> Result<()> {
    let mut port = 0;
    let (_net, mut fleet, d, name) = nic_fleet(0, "uk-od", &[], |dev, net| {
        // Static addresses from the device's own pool (the other tests use DHCP leases).
        dev.set_config("guest_addresses", V::Str(net.static_addresses()))?;
        port = dev.serve_on_demand(
            "hello",
            "min = 0\nmax_local = 2\nidle_secs = 2\nstable_window_secs = 2\npanic_window_secs = 1\ndrain_secs = 2",
        )?;
        Ok(())
    })?;
    release_1(&fleet, d)?;
    let image = hello_http_x86_64()?;

    // 64 clients at once, three keep-alive requests each, through the proxy: every
    // answer is the app's. Each holds its connection until all have their first answer,
    // so at 32 connections per instance (the default with a NIC) two instances serve.
    let all_answered = std::sync::Arc::new(std::sync::Barrier::new(64));
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let all_answered = all_answered.clone();
            std::thread::spawn(move || -> Result<String> {
                let first = TcpStream::connect(("127.0.0.1", port))
                    .map_err(anyhow::Error::from)
                    .and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(60)))?;
                        let mut r = BufReader::new(s);
                        let instance = answer(&mut r)?;
                        Ok((r, instance))
                    });
                all_answered.wait();
                let (mut r, instance) = first?;
                for _ in 0..2 {
                    let again = answer(&mut r)?;
                    if again != instance {
                        bail!("one connection, two instances: {instance} then {again}");
                    }
                }
                Ok(instance)
            })
        })
        .collect();
    let mut instances = std::collections::BTreeSet::new();
    for c in clients {
        instances.insert(c.join().expect("client thread").context("a client")?);
    }
    let log = fleet.devices[d].log_text();
    // Reached on addresses from the static pool (.2-.9), not from DHCP (.10 and up).
    let endpoints: Vec<u32> = log
        .split("endpoint=198.51.100.")
        .skip(1)
        .filter_map(|rest| rest.split(':').next()?.parse().ok())
        .collect();
    assert!(
        !endpoints.is_empty() && endpoints.iter().all(|o| (2..=9).contains(o)),
        "static guest addresses: {endpoints:?}"
    );
    assert_eq!(
        instances.len(),
        2,
        "64 connections over two instances: {instances:?}\n{log}"
    );

    // A release rolled over under a long keep-alive connection: the old instance drains
    // for drain_secs, then the connection is closed; new ones get the new release.
    let mut long = BufReader::new(TcpStream::connect(("127.0.0.1", port))?);
    long.get_mut()
        .set_read_timeout(Some(Duration::from_secs(60)))?;
    answer(&mut long)?;
    let args = http_release("app=hello version=1.0.1", &["--no-staging"]);
    fleet.publish(&image, "hello", "1.0.1", &args)?;
    fleet.wait_all(&[d], "hello", 2, "Active", Duration::from_secs(90))?;
    let mut rest = Vec::new();
    let closed = long.read_to_end(&mut rest);
    assert!(
        matches!(closed, Ok(0)),
        "the drained connection is closed, not left open: {closed:?} {rest:?}"
    );
    let mut fresh = BufReader::new(TcpStream::connect(("127.0.0.1", port))?);
    fresh
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(60)))?;
    answer_of(&mut fresh, "1.0.1")?;
    drop(fresh);
    let log = fleet.devices[d].log_text();
    assert!(
        log.contains("(drain_secs): closing its connections"),
        "{log}"
    );

    // Idle: back to zero instances.
    let prefix = format!("uf-{name}-hello-od");
    wait_for("zero on-demand instances", Duration::from_secs(60), || {
        running_domains(URI, &prefix).is_empty().then_some(())
    })?;

    // The hub and its embedded broker gone: a cold start still serves.
    fleet.kill_hub();
    let mut alone = BufReader::new(TcpStream::connect(("127.0.0.1", port))?);
    alone
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(60)))?;
    answer_of(&mut alone, "1.0.1").context("served with the hub and broker down")?;
    Ok(())
}

/// The arm64 build on an aarch64-platform device (`qemu-system-aarch64 -M virt` under
/// TCG here), served on demand through its NIC like the x86 one.
#[test]
fn the_aarch64_unikernel_serves_http_on_demand_through_its_nic() -> Result<()> {
    let mut port = 0;
    let arm = ["--platform", "qemu-aarch64"];
    let (_net, fleet, d, _) = nic_fleet(5, "uk-arm", &arm, |dev, net| {
        dev.set_config("guest_addresses", V::Str(net.static_addresses()))?;
        port = dev.serve_on_demand("hello", "min = 0\nidle_secs = 60")?;
        Ok(())
    })?;
    let image = hello_http_aarch64()?;
    let args = http_release("app=hello version=1.0.0", &["--no-staging"]);
    fleet.publish_images(&[("qemu-aarch64", &image)], "hello", "1.0.0", &args)?;
    fleet.wait_all(&[d], "hello", 1, "Active", Duration::from_secs(90))?;
    let mut s = BufReader::new(TcpStream::connect(("127.0.0.1", port))?);
    s.get_mut()
        .set_read_timeout(Some(Duration::from_secs(60)))?;
    answer(&mut s)?;
    let (status, metrics) = get(&mut s, "/metrics")?;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(metrics.contains("requests"), "{metrics}");
    Ok(())
}

#[test]
fn the_staging_gate_refuses_a_unikernel_whose_health_answers_500() -> Result<()> {
    let net = GuestNet::create(URI, 1)?;
    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    let stage = fleet.add_device_on(
        &format!("uk-stage-{}", std::process::id()),
        "hello",
        "staging",
        URI,
        &[],
    )?;
    fleet.devices[stage].set_config("nic", V::Str(net.nic()))?;
    fleet.start_device(stage)?;
    let image = hello_http_x86_64()?;
    let sick = http_release(
        "app=hello version=1.0.0 health=fail",
        &["--probe-timeout-secs", "10", "--staging-timeout-secs", "90"],
    );
    let err = fleet
        .publish(&image, "hello", "1.0.0", &sick)
        .expect_err("an image whose /health answers 500 must not be released");
    let err = format!("{err:#}");
    assert!(
        err.contains("staging failed on uk-stage-") && err.contains("GET /health on 198.51.100."),
        "{err}"
    );
    assert!(err.contains("answered 500"), "{err}");
    assert!(fleet.releases(Some("stable"))?.is_empty());

    let healthy = http_release("app=hello version=1.0.1", &["--staging-timeout-secs", "90"]);
    fleet.publish(&image, "hello", "1.0.1", &healthy)?;
    assert_eq!(fleet.releases(Some("stable"))?.len(), 1);
    Ok(())
}

#[test]
fn a_unikernel_that_stops_answering_is_restarted_then_rolled_back() -> Result<()> {
    let (_net, fleet, d, name) = nic_fleet(2, "uk-hang", &[], |dev, net| {
        // Static addresses: each of the restarts boots in well under a second.
        dev.set_config("guest_addresses", V::Str(net.static_addresses()))?;
        dev.set_config("probe_every_secs", V::Int(1))
    })?;
    release_1(&fleet, d)?;
    let image = hello_http_x86_64()?;

    // Answers its activation probe, then hangs with its domain still running.
    let hangs = http_release(
        "app=hello version=2.0.0 health_fail_after=1",
        &["--no-staging"],
    );
    fleet.publish(&image, "hello", "2.0.0", &hangs)?;
    fleet.wait_all(&[d], "hello", 1, "RolledBack", Duration::from_secs(180))?;
    let log = fleet.devices[d].log_text();
    assert!(
        log.contains("not answering its health probe 3 times in a row")
            && log.contains("restarting it (3 of 3"),
        "{log}"
    );
    // Release 1 serves again on its guest address.
    let (_, reason) = fleet.devices[d]
        .report("hello")
        .map(|r| (r["release"].clone(), r["state"].to_string()))
        .context("a report")?;
    assert!(reason.contains("stopped 4 times"), "{reason}");
    assert!(running_domains(URI, &format!("uf-{name}-hello-r1")).len() == 1);
    assert!(running_domains(URI, &format!("uf-{name}-hello-r2")).is_empty());
    Ok(())
}

#[test]
fn a_warm_instance_is_resumed_for_the_first_connection_and_replaced() -> Result<()> {
    let mut port = 0;
    let (_net, fleet, d, name) = nic_fleet(4, "uk-warm", &[], |dev, net| {
        dev.set_config("guest_addresses", V::Str(net.static_addresses()))?;
        // The accelerator chosen by a trial boot of the release under each.
        dev.set_config("domain_type", V::Str("auto".into()))?;
        port = dev.serve_on_demand("hello", "min = 0\nwarm = 1\nidle_secs = 60")?;
        Ok(())
    })?;
    release_1(&fleet, d)?;
    let paused = |n: u32| {
        let want = format!("instance=uf-{name}-hello-w{n}");
        move |log: &str| {
            log.lines()
                .any(|l| l.contains(&want) && l.contains("warm on-demand instance paused"))
        }
    };
    wait_for("a warm instance paused", Duration::from_secs(60), || {
        paused(1)(&fleet.devices[d].log_text()).then_some(())
    })?;
    assert!(
        running_domains(URI, &format!("uf-{name}-hello-od")).is_empty(),
        "nothing runs before a connection"
    );
    let mut s = BufReader::new(TcpStream::connect(("127.0.0.1", port))?);
    s.get_mut()
        .set_read_timeout(Some(Duration::from_secs(60)))?;
    answer(&mut s)?;
    let log = fleet.devices[d].log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("instance=uf-{name}-hello-w1"))
                && l.contains("resumed=true")),
        "the first connection resumed the warm instance:\n{log}"
    );
    assert!(
        !log.contains("instance=uf-{name}-hello-od"),
        "nothing booted cold"
    );
    // Another takes its place in the background.
    wait_for(
        "a second warm instance paused",
        Duration::from_secs(60),
        || paused(2)(&fleet.devices[d].log_text()).then_some(()),
    )?;

    // Which accelerator, and why, from the trial: in the log and in `device status`.
    let status = unifleet_tests::fleet::run(
        std::process::Command::new(unifleet_tests::bin("device")?)
            .args(["status", "--config"])
            .arg(fleet.devices[d].config()),
    )?;
    let line = status
        .lines()
        .find(|l| l.contains("hello: running release 1"));
    let line = line.with_context(|| format!("no running line: {status}"))?;
    assert!(
        line.contains(" to healthy: ") && line.contains("kvm ") && line.contains("tcg "),
        "the measured choice: {line}"
    );
    assert!(fleet.devices[d].log_text().contains("accelerator "));
    Ok(())
}

/// Publishes a release that must fail on device `d` (8 s to pass its probe) and waits for
/// its rollback; release 1 (`r1`) still runs. Returns the rollback's reason.
fn publish_bad(
    fleet: &Fleet,
    d: usize,
    image: &std::path::Path,
    r1: &str,
    version: &str,
    cmdline: &str,
) -> Result<String> {
    let extra = ["--no-staging", "--probe-timeout-secs", "8"];
    fleet.publish(image, "hello", version, &http_release(cmdline, &extra))?;
    let release = fleet.releases(Some("stable"))?.len() as u64;
    wait_for(
        "the failed release rolled back",
        Duration::from_secs(90),
        || {
            let r = fleet.devices[d].report("hello")?;
            (r["state"]["RolledBack"]["failed_release"].as_u64() == Some(release)).then_some(())
        },
    )?;
    assert!(
        unifleet_tests::fleet::domain_running(URI, r1),
        "release 1 still runs"
    );
    rolled_back_to_1(fleet, d)
}

/// Device `d` stopped, its `nic` setting changed, started again (its running release is
/// left as it is).
fn restart_with_nic(fleet: &mut Fleet, d: usize, nic: &str) -> Result<()> {
    if let Some(mut p) = fleet.devices[d].proc.take() {
        p.terminate(Duration::from_secs(30))?;
    }
    fleet.devices[d].set_config("nic", V::Str(nic.into()))?;
    fleet.start_device(d)
}

/// The reason of the device's last report, which must say `RolledBack` to release 1.
fn rolled_back_to_1(fleet: &Fleet, d: usize) -> Result<String> {
    let r = fleet.devices[d].report("hello").context("a report")?;
    let reason = r["state"]["RolledBack"]["reason"].as_str();
    let reason = reason.with_context(|| format!("not rolled back: {r}"))?;
    assert_eq!(r["release"].as_u64(), Some(1), "{r}");
    Ok(reason.to_string())
}

#[test]
fn bad_guest_settings_fail_with_a_clear_error_and_the_old_release_keeps_serving() -> Result<()> {
    let (_net, mut fleet, d, name) = nic_fleet(3, "uk-bad", &[], |_, _| Ok(()))?;
    let image = hello_http_x86_64()?;
    let r1 = format!("uf-{name}-hello-r1");
    release_1(&fleet, d)?;

    // A probe path that never answers.
    let reason = publish_bad(
        &fleet,
        d,
        &image,
        &r1,
        "2.0.0",
        "app=hello version=2.0.0 health_fail_after=0",
    )?;
    assert!(
        reason.contains("not healthy within 8s: GET /health on 198.51.100."),
        "{reason}"
    );
    assert!(reason.contains("no answer within"), "{reason}");
    // A guest that never gets an address: its NIC on a network without DHCP.
    let no_dhcp = GuestNet::create_without_dhcp(URI, 6)?;
    restart_with_nic(&mut fleet, d, &no_dhcp.nic())?;
    let reason = publish_bad(&fleet, d, &image, &r1, "3.0.0", "app=hello version=3.0.0")?;
    assert!(reason.contains("the guest has no address yet"), "{reason}");
    // A NIC setting naming a network that does not exist.
    restart_with_nic(&mut fleet, d, "network=uf-no-such-net")?;
    let reason = publish_bad(&fleet, d, &image, &r1, "4.0.0", "app=hello version=4.0.0")?;
    assert!(
        reason.contains("uf-no-such-net"),
        "names the network: {reason}"
    );
    Ok(())
}

/// `hub release show` of the template's first release: its commit, toolchain and SBOM;
/// `hub rebuild` makes the same images from scratch (the template builds bit for bit).
fn provenance_and_rebuild(fleet: &Fleet, head: &[u8]) -> Result<()> {
    let head = String::from_utf8_lossy(head).trim().to_string();
    let show = run(fleet.hub_cmd()?.args(["release", "show", "web", "0.1.0"]))?;
    for field in [
        format!("commit     {head}"),
        "toolchain  rustc 1.".into(),
        "command    ./build.sh".into(),
        "qemu-x86_64".into(),
        "qemu-aarch64".into(),
        "CycloneDX".into(),
    ] {
        assert!(show.contains(&field), "{field}: {show}");
    }
    let sbom: serde_json::Value = serde_json::from_str(&run(fleet
        .hub_cmd()?
        .args(["release", "show", "web", "0.1.0", "--sbom"]))?)?;
    let components = sbom["components"].as_array().cloned().unwrap_or_default();
    assert!(
        components.iter().any(|c| c["name"] == "smoltcp"
            && c["purl"]
                .as_str()
                .is_some_and(|p| p.starts_with("pkg:cargo/smoltcp@"))),
        "{sbom}"
    );
    let rebuilt = run(fleet.hub_cmd()?.args(["rebuild", "web", "0.1.0"]))?;
    assert!(rebuilt.contains("rebuilds bit for bit"), "{rebuilt}");
    assert_eq!(
        rebuilt.matches(" same").count(),
        2,
        "both platforms: {rebuilt}"
    );
    Ok(())
}

/// Issue 29: the template as a new user gets it (`hub new`), pushed with `git push`: its
/// dependencies fetched, built from source for x86_64 and aarch64 and unit-tested in the
/// hub's sandbox, staged on an x86 staging device with its HTTP probe, signed, and served
/// on demand by a device; a one-line change pushed again is built from the warm cache.
#[test]
fn the_template_pushed_is_built_from_source_staged_and_served() -> Result<()> {
    let net = GuestNet::create(URI, 7)?;
    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    // No aarch64 staging device here: that platform is released unstaged.
    let TemplateFleet {
        device: d,
        port,
        repo,
    } = template_fleet(&mut fleet, &net, "uk-push", false, 120)?;
    let git = |args: &[&str]| -> Result<std::process::Output> {
        Ok(std::process::Command::new("git")
            .args(["-c", "user.name=op", "-c", "user.email=op@example.invalid"])
            .args(args)
            .current_dir(&repo)
            .output()?)
    };
    // First with functional tests that expect another version than the one staged.
    let toml = repo.join("unifleet.toml");
    let good = std::fs::read_to_string(&toml)?;
    let functional = "functional = \"python3 hello-http/test/functional.py\"";
    assert!(
        good.contains(functional),
        "the template has functional tests: {good}"
    );
    let wrong = "functional = \"UNIFLEET_VERSION=9.9.9 python3 hello-http/test/functional.py\"";
    std::fs::write(&toml, good.replace(functional, wrong))?;
    git(&["commit", "-qam", "no aarch64 staging device"])?;
    let deploy = fleet.hub_dir.join("deploy.git");
    let push = git(&["push", deploy.to_str().unwrap(), "main"])?;
    let said = String::from_utf8_lossy(&push.stderr);
    assert!(!push.status.success(), "{said}");
    for step in [
        "fetch passed in",
        "Compiling smoltcp",
        "SBOM: ",
        "staging passed on uk-push-stage-",
        "-----> functional tests against qemu-x86_64 on uk-push-stage-",
        "FAIL GET / names version 9.9.9: says '0.1.0'",
        "functional failed",
        "pre-receive hook declined",
    ] {
        assert!(said.contains(step), "{step}: {said}");
    }
    assert!(fleet.releases(Some("stable"))?.is_empty(), "nothing signed");
    let deployed = git(&["ls-remote", deploy.to_str().unwrap(), "refs/heads/main"])?;
    assert!(deployed.stdout.is_empty(), "the branch did not move");
    // The refused candidate's build log is kept (review finding: it was stored only with
    // the release for the target channel).
    let log = run(fleet.hub_cmd()?.args([
        "release",
        "show",
        "web",
        "0.1.0",
        "--channel",
        "staging",
        "--log",
    ]))?;
    assert!(log.contains("-----> build passed in"), "{log}");

    std::fs::write(&toml, &good)?;
    git(&["commit", "-qam", "functional tests of the version staged"])?;
    let push = git(&["push", deploy.to_str().unwrap(), "main"])?;
    let said = String::from_utf8_lossy(&push.stderr);
    assert!(push.status.success(), "{said}");
    for step in [
        "build passed in",
        "test result: ok",
        "test passed in",
        "staging passed on uk-push-stage-",
        "ok   GET / names version 0.1.0",
        "functional passed in",
        "released web release 1",
        "first wave: active 1/1",
    ] {
        assert!(said.contains(step), "{step}: {said}");
    }
    provenance_and_rebuild(&fleet, &git(&["rev-parse", "HEAD"])?.stdout)?;
    fleet.wait_all(&[d], "web", 1, "Active", Duration::from_secs(120))?;
    let mut r = BufReader::new(TcpStream::connect(("127.0.0.1", port))?);
    r.get_mut()
        .set_read_timeout(Some(Duration::from_secs(60)))?;
    let (status, body) = get(&mut r, "/")?;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("app: web\nversion: 0.1.0\n"), "{body}");
    drop(r);

    // A one-line change: the cache keeps the dependencies, only the app is rebuilt.
    let src = repo.join("hello-http/src/app.rs");
    std::fs::write(
        &src,
        std::fs::read_to_string(&src)? + "\n// one more line\n",
    )?;
    let text = std::fs::read_to_string(&toml)?.replace("0.1.0", "0.1.1");
    std::fs::write(&toml, text)?;
    git(&["commit", "-qam", "0.1.1"])?;
    let push = git(&["push", deploy.to_str().unwrap(), "main"])?;
    let said = String::from_utf8_lossy(&push.stderr);
    assert!(push.status.success(), "{said}");
    assert!(said.contains("released web release 2"), "{said}");
    assert!(
        !said.contains("Compiling smoltcp"),
        "the dependencies come from the cache: {said}"
    );
    fleet.wait_all(&[d], "web", 2, "Active", Duration::from_secs(120))?;
    Ok(())
}
