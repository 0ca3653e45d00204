//! Issue: device agent, tests d–f. Announcements that must be refused arrive over the
//! real broker; the device logs why and keeps running what it has.

use anyhow::Result;
use proto::announcement::Announcement;
use proto::manifest::Platform;
use proto::SecretKey;
use std::time::Duration;
use unifleet_tests::fleet::{wait_for, Fleet};
use unifleet_tests::mqtt_publish;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(ann: &Announcement, key: &SecretKey) -> Vec<u8> {
    let mut env = ann.seal().unwrap();
    env.sign(key).unwrap();
    env.encode().unwrap()
}

#[test]
fn replayed_expired_forged_and_mismatched_announcements_are_refused() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device("refuse0", "hello", &[])?;
    fleet.start_device(d)?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 1, "Active", Duration::from_secs(30))?;
    let v2 = fleet.testimage("hello", "1.0.1", &[])?;
    fleet.publish(&v2, "hello", "1.0.1", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 2, "Active", Duration::from_secs(30))?;

    let topic = "unifleet/home/release/stable/hello/qemu-x86_64";
    // Announcements are the timestamp key's to sign (freshness); releases the release key's.
    let timestamp_key = SecretKey::from_text(&std::fs::read_to_string(
        fleet.hub_dir.join("keys/timestamp.key"),
    )?)?;
    let release_key = SecretKey::from_text(&std::fs::read_to_string(
        fleet.hub_dir.join("keys/release.key"),
    )?)?;
    let genuine_v2 = fleet.store_file("apps/hello/stable/qemu-x86_64/0000000002.announcement")?;
    let base: Announcement = {
        let env = proto::envelope::Envelope::decode(&genuine_v2, proto::codec::Kind::Announcement)?;
        proto::codec::decode(proto::codec::Kind::Announcement, &env.payload)?
    };
    // Publishes `bytes` on the app's release topic and waits for the device to log why it
    // refused them.
    let refuses = |bytes: Vec<u8>, needle: &str| -> Result<()> {
        mqtt_publish(&fleet.mqtt, topic, bytes, false)?;
        wait_for(
            &format!("device log to say {needle:?}"),
            Duration::from_secs(15),
            || fleet.devices[d].log_text().contains(needle).then_some(()),
        )
        .map_err(|e| {
            let log = fleet.devices[d].log_text();
            let lines: Vec<&str> = log.lines().collect();
            e.context(format!(
                "device log:\n{}",
                lines[lines.len().saturating_sub(30)..].join("\n")
            ))
        })
    };

    // (f) mix-and-match: the right keys, the wrong channel, then the wrong platform:
    // authentic, so relayed, but not installed.
    let mut beta = base.clone();
    beta.release = 4;
    beta.channel = "beta".into();
    refuses(
        sign(&beta, &timestamp_key),
        "this device follows \"stable\"",
    )?;
    let mut arm = base.clone();
    arm.release = 5;
    arm.platform = Platform::XenArm32;
    refuses(sign(&arm, &timestamp_key), "this device runs qemu-x86_64")?;
    // A release key signs content, not freshness: its announcement is refused.
    let mut by_release_key = base.clone();
    by_release_key.release = 7;
    refuses(sign(&by_release_key, &release_key), "signed by unknown key")?;

    // (d) the genuine, correctly signed announcement of release 1, replayed.
    let old = fleet.store_file("apps/hello/stable/qemu-x86_64/0000000001.announcement")?;
    refuses(old, "ignoring announcement of release 1")?;

    // (e) a validly signed announcement that has expired (a freeze attack).
    let mut expired = base.clone();
    expired.release = 3;
    expired.issued_at = now() - 100;
    expired.expires_at = now() - 10;
    refuses(sign(&expired, &timestamp_key), "announcement expired")?;

    // A forgery: signed by a key the root does not know.
    let mut forged = base.clone();
    forged.release = 6;
    refuses(
        sign(&forged, &SecretKey::from_seed([9; 32])),
        "signed by unknown key",
    )?;

    // Garbage on the topic.
    refuses(b"not an announcement".to_vec(), "not a unifleet message")?;

    // Through all of it the device kept release 2 running.
    assert_eq!(
        fleet.devices[d].release_state("hello"),
        Some((2, "Active".into()))
    );
    let st = fleet.devices[d].state_json();
    assert_eq!(st["apps"]["hello"]["current"]["release"], 2, "{st}");
    Ok(())
}

/// A damaged stored trust root stops the agent with an error naming the file and what to
/// do. (It said only "not a unifleet message (bad magic)".)
#[test]
fn a_bad_stored_root_is_named_with_the_way_out() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    let d = fleet.add_device("badroot", "hello", &[])?;
    let root = fleet.devices[d].dir.join("state/root.bin");
    std::fs::write(&root, b"garbage, not a root")?;
    let out = std::process::Command::new(unifleet_tests::bin("device")?)
        .arg("run")
        .arg("--config")
        .arg(fleet.devices[d].config())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&root.display().to_string()) && err.contains("is not a trust root"),
        "{err}"
    );
    Ok(())
}

/// Issue 31: a refused `device enroll` (here, a name devices may not have) left
/// `device.key`, `device.pub` and `root.bin` behind; nothing is written until every
/// setting is checked.
#[test]
fn a_refused_enrollment_leaves_nothing_behind() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let dir = fleet.path("refused-device");
    let out = std::process::Command::new(unifleet_tests::bin("device")?)
        .arg("enroll")
        .arg("--dir")
        .arg(&dir)
        .args(["--name", "Not A Name!", "--app", "hello"])
        .arg("--root")
        .arg(fleet.hub_dir.join("root.bin"))
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Not A Name!"), "{err}");
    for file in ["device.key", "device.pub", "root.bin", "device.toml"] {
        assert!(!dir.join(file).exists(), "{file} was left behind");
    }
    Ok(())
}
