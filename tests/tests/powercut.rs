//! Issue 32: power cuts, modelled by a file system that drops what was not synced.

use anyhow::Result;
use std::io::Write;
use unifleet_tests::lazyfs::{mount, Cut};

/// The model itself: data not synced is gone after a cut (a file renamed into place
/// without `fsync` comes back empty), data synced stays.
#[test]
fn the_lazy_file_system_keeps_synced_data_and_drops_the_rest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (base, mnt) = (dir.path().join("base"), dir.path().join("mnt"));
    std::fs::create_dir_all(&base)?;
    std::fs::create_dir_all(&mnt)?;
    let cut = Cut::default();
    let mounted = mount(&base, &mnt, &cut)?;
    let mut synced = std::fs::File::create(mnt.join("synced.tmp"))?;
    synced.write_all(b"kept")?;
    synced.sync_all()?;
    std::fs::rename(mnt.join("synced.tmp"), mnt.join("synced"))?;
    std::fs::write(mnt.join("lazy.tmp"), b"lost")?;
    std::fs::rename(mnt.join("lazy.tmp"), mnt.join("lazy"))?;
    assert_eq!(
        std::fs::read(mnt.join("lazy"))?,
        b"lost",
        "read back before the cut"
    );
    assert_eq!(cut.cut(), 1);
    drop(mounted);
    let _mounted = mount(&base, &mnt, &cut)?;
    assert_eq!(std::fs::read(mnt.join("synced"))?, b"kept");
    assert_eq!(
        std::fs::read(mnt.join("lazy"))?,
        b"",
        "the rename survived, the data did not"
    );
    Ok(())
}

/// A short campaign (`bench_powercut` runs the long one): `hub init` then publishes cut
/// at random points, nothing acknowledged is lost, the store is always whole.
#[test]
fn power_cuts_during_publish_lose_nothing_acknowledged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = unifleet_tests::bin("hub")?;
    let opts = unifleet_tests::powercut::Options {
        hub: &hub,
        cuts: 12,
        seed: 0x5eed_cafe,
        sync_init: false,
    };
    let c = unifleet_tests::powercut::campaign(dir.path(), &opts)?;
    assert!(c.losses.is_empty(), "{:#?}", c.losses);
    assert!(c.interrupted > 0, "some publishes were cut short: {c:?}");
    assert!(
        c.acknowledged >= 4,
        "every third finished before its cut: {c:?}"
    );
    eprintln!("{c:?}");
    Ok(())
}

/// Issue 32: power cuts while a device installs. Its state directory is on the lazy file
/// system; each release's download is under way (capped at 1 MiB/s) when the agent is
/// killed at a random point and everything unsynced is dropped. After every cut the
/// state it comes back to names the old or the new release, whole (the slot's digest is
/// one of the published images'), and once restarted it runs the newest.
#[test]
fn power_cuts_during_installs_leave_the_old_or_the_new_release() -> Result<()> {
    use std::time::Duration;
    use unifleet_tests::fleet::{toml_value::V, Fleet};
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device("cut0", "hello", &[])?;
    fleet.devices[d].set_config("download_rate", V::Int(1 << 20))?;
    let lazy = tempfile::tempdir()?;
    let base = lazy.path().join("base");
    std::fs::create_dir_all(&base)?;
    let state = fleet.devices[d].dir.join("state");
    std::fs::create_dir_all(&state)?;
    // What enrollment put there goes under the mount.
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(state.join("."))
        .arg(&base)
        .status()?;
    anyhow::ensure!(copied.success(), "copying {}", state.display());
    let cut = Cut::default();
    let mut mounted = Some(mount(&base, &state, &cut)?);
    fleet.start_device(d)?;
    let mut published = vec![];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let (mut dropped, mut cuts) = (0, 0);
    for k in 1..=4u64 {
        let image = fleet.testimage("hello", &format!("1.0.{k}"), &["--pad-mib", "1"])?;
        published.push(proto::Digest::of(&std::fs::read(&image)?));
        fleet.publish(&image, "hello", &format!("1.0.{k}"), &["--no-staging"])?;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(x % 1500));
        if let Some(mut p) = fleet.devices[d].proc.take() {
            p.kill9();
        }
        dropped += cut.cut();
        cuts += 1;
        drop(mounted.take()); // unmounted before mounting again
        mounted = Some(mount(&base, &state, &cut)?);
        let st = fleet.devices[d].state_json();
        if let Some(slot) = st["apps"]["hello"]["current"]["slot"].as_str() {
            let runs = proto::Digest::of(&std::fs::read(slot)?);
            assert!(
                published.contains(&runs),
                "cut {k}: the current slot is no published image"
            );
        } else {
            assert!(k == 1, "cut {k}: the device lost its current release: {st}");
        }
        fleet.start_device(d)?;
        fleet.wait_all(&[d], "hello", k, "Active", Duration::from_secs(60))?;
        fleet.assert_runs_image(d, &image);
    }
    eprintln!("{cuts} cuts during installs, {dropped} files lost unsynced data");
    if let Some(mut p) = fleet.devices[d].proc.take() {
        p.kill9();
    }
    drop(mounted);
    Ok(())
}

/// Issue 32: power cuts while `hub serve` commits its event batches (devices reporting
/// the releases they install, a batch a second) beside publishes. The hub's home is on
/// the lazy file system; after each cut the store is whole (`git fsck`, every
/// acknowledged release there, numbers dense), and every event the hub's log showed 2 s
/// before the cut (committed, so synced by then) is still in it.
#[test]
fn power_cuts_while_the_hub_commits_event_batches_lose_no_committed_event() -> Result<()> {
    use std::collections::BTreeMap;
    use std::time::Duration;
    use unifleet_tests::fleet::{run, Fleet};
    let mut fleet = Fleet::new("test:///default")?;
    let lazy = tempfile::tempdir()?;
    let base = lazy.path().join("base");
    std::fs::create_dir_all(&base)?;
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(fleet.hub_dir.join("."))
        .arg(&base)
        .status()?;
    anyhow::ensure!(copied.success(), "copying {}", fleet.hub_dir.display());
    let cut = Cut::default();
    let mut mounted = Some(mount(&base, &fleet.hub_dir, &cut)?);
    fleet.start_hub(&[])?;
    let devices = [
        fleet.add_device("batch0", "hello", &[])?,
        fleet.add_device("batch1", "hello", &[])?,
    ];
    for &d in &devices {
        fleet.start_device(d)?;
    }
    let events = |fleet: &Fleet| -> Result<Vec<serde_json::Value>> {
        let text = run(fleet.hub_cmd()?.args(["log", "--json"]))?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    };
    let hub_bin = unifleet_tests::bin("hub")?;
    let (mut acknowledged, mut dropped) = (BTreeMap::new(), 0);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for k in 1..=4u64 {
        let image = fleet.testimage("hello", &format!("1.0.{k}"), &[])?;
        let said = fleet.publish(&image, "hello", &format!("1.0.{k}"), &["--no-staging"])?;
        let (release, manifest) = unifleet_tests::powercut::acknowledged_release(&said)
            .ok_or_else(|| anyhow::anyhow!("no release in: {said}"))?;
        acknowledged.insert(release, manifest);
        // The devices install it and report meanwhile: events in batches.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(x % 2000));
        let before = events(&fleet)?;
        std::thread::sleep(Duration::from_secs(2));
        fleet.kill_hub();
        dropped += cut.cut();
        drop(mounted.take()); // unmounted before mounting again
        mounted = Some(mount(&base, &fleet.hub_dir, &cut)?);
        let wrong = unifleet_tests::powercut::check(&hub_bin, &fleet.hub_dir, &acknowledged);
        assert!(wrong.is_empty(), "cut {k}: {wrong:#?}");
        let after = events(&fleet)?;
        let lost: Vec<_> = before.iter().filter(|e| !after.contains(e)).collect();
        assert!(lost.is_empty(), "cut {k} lost committed events: {lost:#?}");
        fleet.start_hub(&[])?;
        fleet.wait_all(&devices, "hello", k, "Active", Duration::from_secs(60))?;
    }
    let device_events = events(&fleet)?
        .iter()
        .filter(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("device-")))
        .count();
    assert!(device_events > 0, "the devices' reports were committed");
    eprintln!("4 cuts during event batches, {dropped} files lost unsynced data, {device_events} device events kept");
    fleet.kill_hub();
    drop(mounted);
    Ok(())
}
