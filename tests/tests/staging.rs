//! Issue: hub, the staging gate. A staging device (the real device agent on the staging
//! channel, booting through `qemu:///system`) must report the image healthy before the
//! hub signs it for the target channel.

use anyhow::Result;
use std::time::Duration;
use unifleet_tests::fleet::{run, Fleet};

#[test]
fn staging_pass_signs_for_stable_and_staging_fail_signs_nothing() -> Result<()> {
    let mut fleet = Fleet::new("qemu:///system")?;
    fleet.start_hub(&[])?;
    let pid = std::process::id();
    let stage = fleet.add_device_on(
        &format!("stage-{pid}"),
        "hello",
        "staging",
        "qemu:///system",
        &[],
    )?;
    let field = fleet.add_device_on(
        &format!("field-{pid}"),
        "hello",
        "stable",
        "test:///default",
        &[],
    )?;
    fleet.start_device(stage)?;
    fleet.start_device(field)?;

    // Pass: the staging device boots it, reports READY, and only then stable gets it.
    let good = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&good, "hello", "1.0.0", &["--staging-timeout-secs", "60"])?;
    fleet.wait_all(&[field], "hello", 1, "Active", Duration::from_secs(30))?;
    let stable = fleet.releases(Some("stable"))?;
    assert_eq!(stable.len(), 1, "{stable:?}");
    let manifest = fleet.dir.path().join("stable.manifest");
    let bytes = fleet.store_file("apps/hello/stable/qemu-x86_64/0000000001.manifest")?;
    std::fs::write(&manifest, &bytes)?;
    let inspected = run(std::process::Command::new(unifleet_tests::bin("fwtool")?)
        .arg("inspect")
        .arg(&manifest)
        .arg("--json"))?;
    assert!(
        inspected.contains("\"Passed\""),
        "stable release records its staging report: {inspected}"
    );

    // Fail: the staging device's probe fails; nothing is signed for stable.
    let bad = fleet.testimage("hello", "2.0.0", &["--fail"])?;
    let out = fleet
        .hub_cmd()?
        .arg("publish")
        .arg(&bad)
        .args([
            "--app",
            "hello",
            "--version",
            "2.0.0",
            "--probe-timeout-secs",
            "3",
            "--staging-timeout-secs",
            "60",
        ])
        .output()?;
    assert!(!out.status.success(), "a failing image must not publish");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("staging failed on stage-"), "{err}");
    assert!(
        err.contains("never becomes ready"),
        "console tail in the failure: {err}"
    );
    let stable = fleet.releases(Some("stable"))?;
    assert_eq!(
        stable.len(),
        1,
        "no stable release for the failed image: {stable:?}"
    );
    let log = run(fleet.hub_cmd()?.arg("log"))?;
    assert!(
        log.contains("staging-passed") && log.contains("staging-failed"),
        "{log}"
    );
    // The field device stayed on release 1.
    assert_eq!(
        fleet.devices[field].release_state("hello"),
        Some((1, "Active".into()))
    );
    Ok(())
}

#[test]
fn publish_without_a_staging_device_times_out_and_signs_nothing_for_stable() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let img = fleet.testimage("hello", "1.0.0", &[])?;
    let out = fleet
        .hub_cmd()?
        .arg("publish")
        .arg(&img)
        .args([
            "--app",
            "hello",
            "--version",
            "1.0.0",
            "--staging-timeout-secs",
            "2",
        ])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no staging device of qemu-x86_64 reported")
    );
    let releases = run(fleet.hub_cmd()?.args(["releases", "hello"]))?;
    assert!(!releases.contains("stable"), "{releases}");
    Ok(())
}
