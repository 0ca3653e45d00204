//! Issue: device agent with real images under `qemu:///system` (libvirtd, set up by
//! scripts/setup.sh): READY banners on the consoles, and test g — a failing image is
//! rolled back, reported with its console tail, and never retried.

use anyhow::{Context, Result};
use std::time::Duration;
use unifleet_tests::fleet::{domain_running, running_fleet, wait_for, Fleet};

const URI: &str = "qemu:///system";
const CONVERGE: Duration = Duration::from_secs(90);

fn console(fleet: &Fleet, i: usize, release: u64) -> String {
    let d = &fleet.devices[i];
    std::fs::read_to_string(
        d.dir
            .join(format!("state/uf-{}-hello-r{release}.console.log", d.name)),
    )
    .unwrap_or_default()
}

/// A hub and one device (named `TAG-<pid>`) running release 1 of `hello` under QEMU.
fn one_device_on_release_1(tag: &str) -> Result<(Fleet, usize, String)> {
    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    let name = format!("{tag}-{}", std::process::id());
    let d = fleet.add_device(&name, "hello", &[])?;
    fleet.start_device(d)?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;
    Ok((fleet, d, name))
}

#[test]
fn real_images_boot_under_qemu_and_print_ready() -> Result<()> {
    let prefix = format!("qb{}-", std::process::id());
    let (fleet, all) = running_fleet(URI, &[], &prefix, 2, &[])?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&all, "hello", 1, "Active", CONVERGE)?;
    for &i in &all {
        assert!(
            console(&fleet, i, 1).contains("READY hello 1.0.0"),
            "{}",
            console(&fleet, i, 1)
        );
    }
    let v2 = fleet.testimage("hello", "1.0.1", &[])?;
    fleet.publish(&v2, "hello", "1.0.1", &["--no-staging"])?;
    fleet.wait_all(&all, "hello", 2, "Active", CONVERGE)?;
    for &i in &all {
        let name = &fleet.devices[i].name;
        assert!(
            console(&fleet, i, 2).contains("READY hello 1.0.1"),
            "{}",
            console(&fleet, i, 2)
        );
        assert!(domain_running(URI, &format!("uf-{name}-hello-r2")));
        assert!(
            !domain_running(URI, &format!("uf-{name}-hello-r1")),
            "old domain retired"
        );
    }
    Ok(())
}

#[test]
fn failing_image_is_rolled_back_reported_and_never_retried() -> Result<()> {
    let (mut fleet, d, name) = one_device_on_release_1("qg")?;

    let bad = fleet.testimage("hello", "2.0.0", &["--fail"])?;
    fleet.publish(
        &bad,
        "hello",
        "2.0.0",
        &["--no-staging", "--probe-timeout-secs", "3"],
    )?;
    // The report names the release that is back in service (1) and the one that failed.
    fleet.wait_all(&[d], "hello", 1, "RolledBack", CONVERGE)?;
    let report = fleet.devices[d].report("hello").unwrap();
    assert_eq!(
        report["state"]["RolledBack"]["failed_release"], 2,
        "{report}"
    );
    assert!(
        report["console_tail"]
            .as_str()
            .unwrap()
            .contains("never becomes ready"),
        "{report}"
    );
    assert!(
        domain_running(URI, &format!("uf-{name}-hello-r1")),
        "previous release back in service"
    );
    assert!(
        !domain_running(URI, &format!("uf-{name}-hello-r2")),
        "failed domain destroyed"
    );
    // The hub's inventory shows the failure with the console tail.
    let inv = wait_for(
        "inventory shows the rollback",
        Duration::from_secs(10),
        || {
            let inv = fleet.inventory().ok()?;
            (inv[format!("{name}/hello")]["state"] == "rolled-back").then_some(inv)
        },
    )?;
    assert!(
        inv[format!("{name}/hello")]["detail"]
            .as_str()
            .unwrap()
            .contains("never becomes ready"),
        "{inv}"
    );
    // The hub keeps announcing release 2; even after a restart (the failure is persisted)
    // the device never tries it again.
    if let Some(mut p) = fleet.devices[d].proc.take() {
        p.kill9();
    }
    fleet.start_device(d)?;
    wait_for(
        "the device to decline release 2 again",
        Duration::from_secs(20),
        || {
            fleet.devices[d]
                .log_text()
                .contains("failed here before; not retrying")
                .then_some(())
        },
    )?;
    assert_eq!(
        fleet.devices[d]
            .log_text()
            .matches("activation failed")
            .count(),
        1
    );
    Ok(())
}

/// Destroys a running domain as a crash would (the guest's process gone).
fn kill_domain(name: &str) -> Result<()> {
    let out = std::process::Command::new("virsh")
        .args(["-c", URI, "destroy", name])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "virsh destroy {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A release that was healthy at activation and then dies is noticed and restarted; one
/// that keeps dying (4 times within 10 minutes) goes back to the previous release, which
/// is reported. (A domain that died after its first probe stayed dead, reported Active.)
#[test]
fn a_domain_that_dies_after_activation_is_restarted_then_rolled_back() -> Result<()> {
    let (fleet, d, name) = one_device_on_release_1("qw")?;
    let v2 = fleet.testimage("hello", "1.0.1", &[])?;
    fleet.publish(&v2, "hello", "1.0.1", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 2, "Active", CONVERGE)?;
    let r2 = format!("uf-{name}-hello-r2");
    for n in 1..=3 {
        kill_domain(&r2).with_context(|| fleet.devices[d].log_text())?;
        wait_for(&format!("restart {n} of {r2}"), CONVERGE, || {
            let log = fleet.devices[d].log_text();
            (log.matches("restarted; healthy again").count() >= n && domain_running(URI, &r2))
                .then_some(())
        })?;
    }
    kill_domain(&r2)?;
    fleet.wait_all(&[d], "hello", 1, "RolledBack", CONVERGE)?;
    let report = fleet.devices[d].report("hello").unwrap();
    assert_eq!(
        report["state"]["RolledBack"]["failed_release"], 2,
        "{report}"
    );
    assert!(
        report["state"]["RolledBack"]["reason"]
            .as_str()
            .unwrap()
            .contains("stopped 4 times"),
        "{report}"
    );
    assert!(domain_running(URI, &format!("uf-{name}-hello-r1")));
    assert!(!domain_running(URI, &r2));
    let st = fleet.devices[d].state_json();
    assert_eq!(st["apps"]["hello"]["current"]["release"], 1, "{st}");
    assert!(
        st["apps"]["hello"]["failed"]
            .as_array()
            .unwrap()
            .contains(&2.into()),
        "never installed again: {st}"
    );
    Ok(())
}

/// An arm64 board's platform (`qemu-aarch64`) end to end on this x86 machine: `hub
/// publish` recognises the arm64 Image, the agent renders the aarch64 domain XML, boots it
/// under TCG through libvirt and takes its READY banner as healthy; an x86 device beside it
/// runs another app (one app on both: the mixed-arch release of the test below).
#[test]
fn an_aarch64_release_boots_on_an_aarch64_platform_device_beside_an_x86_one() -> Result<()> {
    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    let pid = std::process::id();
    let arm = fleet.add_device(
        &format!("qa64-{pid}"),
        "hello-arm",
        &["--platform", "qemu-aarch64"],
    )?;
    let x86 = fleet.add_device(&format!("qx86-{pid}"), "hello", &[])?;
    fleet.start_device(arm)?;
    fleet.start_device(x86)?;
    let img = fleet.testimage("hello-arm", "1.0.0", &["--arch", "aarch64"])?;
    let out = fleet.publish(
        &img,
        "hello-arm",
        "1.0.0",
        &["--no-staging", "--memory-mib", "64"],
    )?;
    assert!(out.contains("released hello-arm release 1"), "{out}");
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[arm], "hello-arm", 1, "Active", CONVERGE)?;
    fleet.wait_all(&[x86], "hello", 1, "Active", CONVERGE)?;
    let d = &fleet.devices[arm];
    let console = std::fs::read_to_string(
        d.dir
            .join(format!("state/uf-{}-hello-arm-r1.console.log", d.name)),
    )
    .unwrap_or_default();
    assert!(console.contains("READY hello-arm 1.0.0"), "{console}");
    Ok(())
}

/// An ARM device for real on this x86 machine, and a mixed-arch release: the arm64 build
/// of the agent (`scripts/cross.sh aarch64-unknown-linux-gnu`) runs under
/// `qemu-aarch64-static`, talks to libvirtd and boots its platform's image of the release
/// with `qemu-system-aarch64`; an x86 device boots the x86 image of the same release with
/// `qemu-system-x86_64`; both report healthy to the hub.
#[test]
fn an_arm64_agent_under_qemu_user_boots_its_release_and_reports() -> Result<()> {
    let arm_agent = unifleet_tests::cross_bin("aarch64-unknown-linux-gnu", "device")?;
    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    let pid = std::process::id();
    let arm = fleet.add_device(
        &format!("arm64-{pid}"),
        "hello",
        &["--platform", "qemu-aarch64"],
    )?;
    let x86 = fleet.add_device(&format!("amd64-{pid}"), "hello", &[])?;
    let mut emulated = std::process::Command::new("qemu-aarch64-static");
    emulated.arg(&arm_agent);
    fleet.start_device_with(arm, emulated)?;
    fleet.start_device(x86)?;
    let arm_img = fleet.testimage("hello", "1.0.0", &["--arch", "aarch64"])?;
    let x86_img = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish_images(
        &[("qemu-x86_64", &x86_img), ("qemu-aarch64", &arm_img)],
        "hello",
        "1.0.0",
        &["--no-staging", "--memory-mib", "64"],
    )?;
    fleet.wait_all(&[arm, x86], "hello", 1, "Active", CONVERGE)?;
    for d in [arm, x86] {
        let d = &fleet.devices[d];
        let console = std::fs::read_to_string(
            d.dir
                .join(format!("state/uf-{}-hello-r1.console.log", d.name)),
        )
        .unwrap_or_default();
        assert!(
            console.contains("READY hello 1.0.0"),
            "{}: {console}",
            d.name
        );
    }
    // The hub has both healthy reports, signed by each device's key.
    wait_for("the hub's inventory", CONVERGE, || {
        let inv = fleet.inventory().ok()?;
        let ok = |d: usize, app: &str| {
            inv[format!("{}/{app}", fleet.devices[d].name)]["state"] == "active"
        };
        (ok(arm, "hello") && ok(x86, "hello")).then_some(())
    })?;
    // It really was the arm64 agent.
    let exe = std::fs::read_link(format!(
        "/proc/{}/exe",
        fleet.devices[arm]
            .proc
            .as_ref()
            .context("agent running")?
            .child
            .id()
    ))?;
    assert!(exe.ends_with("qemu-aarch64-static"), "{}", exe.display());
    Ok(())
}
