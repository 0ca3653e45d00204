//! Issue 17: mixed-arch releases. One `hub publish` carries an image per platform (one
//! signed manifest each, one release number); each device takes its own platform's,
//! fetching only its chunks; each platform is staged on a staging device of its own; and
//! a release for one platform alone does not hide the newest release of another.
//!
//! Hermetic (`test:///default`): what is checked here is which manifest each device is
//! given and takes, not booting (`fleet_qemu` boots the arm64 image with a real arm64
//! agent).

use anyhow::{Context, Result};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use unifleet_tests::fleet::{run, Fleet};

const CONVERGE: Duration = Duration::from_secs(60);
const URI: &str = "test:///default";

/// The manifest digest `hub releases` lists for (channel, release, platform).
fn manifest_of(fleet: &Fleet, channel: &str, release: u64, platform: &str) -> Result<String> {
    let releases = fleet.releases(Some(channel))?;
    releases
        .iter()
        .find(|r| r["release"] == release && r["platform"] == platform)
        .and_then(|r| r["manifest"].as_str().map(str::to_string))
        .with_context(|| format!("no {platform} manifest of release {release}: {releases:?}"))
}

/// The manifest digest a device reports it runs for `app`.
fn running(fleet: &Fleet, d: usize, app: &str) -> Option<String> {
    let r = fleet.devices[d].report(app)?;
    r["manifest"].as_str().map(str::to_string)
}

/// The x86 and arm64 test images of `hello` `version`.
fn images(fleet: &Fleet, version: &str) -> Result<(PathBuf, PathBuf)> {
    Ok((
        fleet.testimage("hello", version, &[])?,
        fleet.testimage("hello", version, &["--arch", "aarch64"])?,
    ))
}

/// `hub publish` of `version` with both images (x86, arm64) and `extra`.
fn publish_both(
    fleet: &Fleet,
    both: &(PathBuf, PathBuf),
    version: &str,
    extra: &[&str],
) -> Result<String> {
    fleet.publish_images(
        &[("qemu-x86_64", &both.0), ("qemu-aarch64", &both.1)],
        "hello",
        version,
        extra,
    )
}

fn staging_of(fleet: &Fleet, channel: &str, release: u64, platform: &str) -> Result<Value> {
    let path = fleet.path(&format!("{channel}-{release}-{platform}.manifest"));
    std::fs::write(
        &path,
        fleet.store_file(&format!(
            "apps/hello/{channel}/{platform}/{release:010}.manifest"
        ))?,
    )?;
    let inspected: Value = serde_json::from_str(&run(std::process::Command::new(
        unifleet_tests::bin("fwtool")?,
    )
    .arg("inspect")
    .arg(&path)
    .arg("--json"))?)?;
    Ok(inspected["payload"]["staging"].clone())
}

#[test]
fn one_release_gives_each_platform_its_own_image_and_only_its_chunks() -> Result<()> {
    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    let pid = std::process::id();
    let x86 = fleet.add_device(&format!("mx-x86-{pid}"), "hello", &[])?;
    let arm = fleet.add_device(
        &format!("mx-arm-{pid}"),
        "hello",
        &["--platform", "qemu-aarch64"],
    )?;
    fleet.start_device(x86)?;
    fleet.start_device(arm)?;
    let (x86_img, arm_img) = images(&fleet, "1.0.0")?;
    let out = publish_both(
        &fleet,
        &(x86_img.clone(), arm_img.clone()),
        "1.0.0",
        &["--no-staging"],
    )?;
    assert!(out.contains("released hello release 1 on stable"), "{out}");
    fleet.wait_all(&[x86, arm], "hello", 1, "Active", CONVERGE)?;

    // One release number, a manifest per platform, each device on its own.
    let x86_manifest = manifest_of(&fleet, "stable", 1, "qemu-x86_64")?;
    let arm_manifest = manifest_of(&fleet, "stable", 1, "qemu-aarch64")?;
    assert_ne!(x86_manifest, arm_manifest);
    assert_eq!(running(&fleet, x86, "hello"), Some(x86_manifest));
    assert_eq!(running(&fleet, arm, "hello"), Some(arm_manifest));
    // Each fetched its own manifest and image, nothing of the other's.
    for (d, img, platform) in [
        (x86, &x86_img, "qemu-x86_64"),
        (arm, &arm_img, "qemu-aarch64"),
    ] {
        let (peers, hub) = fleet.devices[d].fetched("hello");
        let manifest =
            fleet.store_file(&format!("apps/hello/stable/{platform}/0000000001.manifest"))?;
        let size = std::fs::metadata(img)?.len() + manifest.len() as u64;
        assert_eq!(peers + hub, size, "{}", fleet.devices[d].name);
    }
    // Both images in one commit, tagged once.
    let log = run(fleet.hub_cmd()?.arg("log"))?;
    assert!(
        log.contains("qemu-x86_64") && log.contains("qemu-aarch64"),
        "{log}"
    );

    // Two images for one platform, or an image for a platform its header does not boot
    // on, are refused before anything is signed.
    for (images, says) in [
        (
            vec![("qemu-x86_64", &*x86_img), ("qemu-x86_64", &*x86_img)],
            "two images for qemu-x86_64",
        ),
        (
            vec![("qemu-x86_64", &*arm_img)],
            "not on qemu-x86_64; give it as qemu-aarch64=",
        ),
    ] {
        let err = fleet
            .publish_images(&images, "hello", "1.0.1", &["--no-staging"])
            .expect_err("refused");
        assert!(format!("{err:#}").contains(says), "{err:#}");
    }
    assert_eq!(
        fleet.releases(Some("stable"))?.len(),
        2,
        "nothing new signed"
    );
    Ok(())
}

/// The bug the issue describes: only the newest release per app and channel was
/// announced, so after an ARM-only release a new x86 device heard only of that one (and
/// logged that it was for another platform every 5 s). Each platform is its own track.
#[test]
fn after_an_arm_only_release_a_new_x86_device_still_gets_the_newest_x86_one() -> Result<()> {
    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    let pid = std::process::id();
    let arm = fleet.add_device(
        &format!("ao-arm-{pid}"),
        "hello",
        &["--platform", "qemu-aarch64"],
    )?;
    fleet.start_device(arm)?;
    publish_both(
        &fleet,
        &images(&fleet, "1.0.0")?,
        "1.0.0",
        &["--no-staging"],
    )?;
    fleet.wait_all(&[arm], "hello", 1, "Active", CONVERGE)?;
    let arm2 = fleet.testimage("hello", "1.0.1", &["--arch", "aarch64"])?;
    fleet.publish_images(
        &[("qemu-aarch64", &arm2)],
        "hello",
        "1.0.1",
        &["--no-staging"],
    )?;
    fleet.wait_all(&[arm], "hello", 2, "Active", CONVERGE)?;

    // A new x86 device, after the ARM-only release 2: its newest is release 1.
    let x86 = fleet.add_device(&format!("ao-x86-{pid}"), "hello", &[])?;
    fleet.start_device(x86)?;
    fleet.wait_all(&[x86], "hello", 1, "Active", CONVERGE)?;
    assert_eq!(
        running(&fleet, x86, "hello"),
        Some(manifest_of(&fleet, "stable", 1, "qemu-x86_64")?)
    );
    let log = fleet.devices[x86].log_text();
    assert!(
        !log.contains("announcement is for platform"),
        "the x86 device is not told of ARM releases over MQTT: {log}"
    );
    Ok(())
}

/// Each platform is staged on a staging device of its own; a platform without one is
/// refused (nothing signed for stable) unless `--no-staging-for` it.
#[test]
fn each_platform_is_staged_on_its_own_staging_device() -> Result<()> {
    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    let pid = std::process::id();
    let stage_x86 = fleet.add_device_on(&format!("st-x86-{pid}"), "hello", "staging", URI, &[])?;
    let stage_arm = fleet.add_device_on(
        &format!("st-arm-{pid}"),
        "hello",
        "staging",
        URI,
        &["--platform", "qemu-aarch64"],
    )?;
    fleet.start_device(stage_x86)?;
    let v1 = images(&fleet, "1.0.0")?;

    // No aarch64 staging device: refused, naming the platform and the way out.
    let err = publish_both(&fleet, &v1, "1.0.0", &["--staging-timeout-secs", "8"])
        .expect_err("no aarch64 staging device");
    let err = format!("{err:#}");
    assert!(
        err.contains("no staging device of qemu-aarch64")
            && err.contains("--no-staging-for qemu-aarch64"),
        "{err}"
    );
    assert!(fleet.releases(Some("stable"))?.is_empty(), "nothing signed");

    // Skipped for aarch64 alone: x86 still staged.
    let skip_arm = [
        "--staging-timeout-secs",
        "60",
        "--no-staging-for",
        "qemu-aarch64",
    ];
    publish_both(&fleet, &v1, "1.0.0", &skip_arm)?;
    assert!(staging_of(&fleet, "stable", 1, "qemu-x86_64")?["Passed"].is_object());
    assert_eq!(staging_of(&fleet, "stable", 1, "qemu-aarch64")?, "Skipped");

    // With a staging device of each, both are staged, each on its own.
    fleet.start_device(stage_arm)?;
    let out = publish_both(
        &fleet,
        &images(&fleet, "1.0.1")?,
        "1.0.1",
        &["--staging-timeout-secs", "60"],
    )?;
    assert!(out.contains("released hello release 2 on stable"), "{out}");
    for platform in ["qemu-x86_64", "qemu-aarch64"] {
        assert!(
            staging_of(&fleet, "stable", 2, platform)?["Passed"].is_object(),
            "{platform}"
        );
    }
    let staged = fleet.releases(Some("staging"))?;
    let newest = staged.iter().filter_map(|r| r["release"].as_u64()).max();
    let candidate = |p| manifest_of(&fleet, "staging", newest.unwrap_or(0), p);
    assert_eq!(
        running(&fleet, stage_x86, "hello"),
        Some(candidate("qemu-x86_64")?)
    );
    assert_eq!(
        running(&fleet, stage_arm, "hello"),
        Some(candidate("qemu-aarch64")?)
    );
    Ok(())
}
