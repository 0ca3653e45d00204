//! Staged rollouts (issue 18): waves decided by each device from the signed manifest and
//! its seed, so they advance with the hub dead; a release whose first devices fail is
//! halted by the hub (a signed hold list) and the rest never install it; releases that
//! target tags or named devices reach only those.

use anyhow::{Context, Result};
use serde_json::Value;
use std::time::Duration;
use unifleet_tests::fleet::{run, running_fleet, wait_for, Fleet};

const CONVERGE: Duration = Duration::from_secs(90);

/// Each device's rollout seed, from its key, as the device computes it.
fn seed(fleet: &Fleet, i: usize) -> Result<u16> {
    let path = fleet.devices[i].dir.join("device.pub");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(proto::rollout::seed(&proto::PublicKey::from_text(&text)?))
}

/// Devices sorted by seed, and a first-wave share (`12.34%`) that admits exactly the
/// first `k` of them.
fn first_wave(fleet: &Fleet, ids: &[usize], k: usize) -> Result<(Vec<usize>, String)> {
    let mut by_seed: Vec<(u16, usize)> = ids
        .iter()
        .map(|&i| Ok((seed(fleet, i)?, i)))
        .collect::<Result<_>>()?;
    by_seed.sort();
    let bp = by_seed[k - 1].0 + 1;
    assert!(by_seed[k].0 >= bp, "two devices share a seed: {by_seed:?}");
    Ok((
        by_seed.into_iter().map(|(_, i)| i).collect(),
        format!("{}.{:02}%", bp / 100, bp % 100),
    ))
}

/// `hub rollout status APP --json`.
fn rollout_status(fleet: &Fleet) -> Result<Value> {
    let out = run(fleet
        .hub_cmd()?
        .args(["rollout", "status", "hello", "--json"]))?;
    Ok(serde_json::from_str(&out)?)
}

/// The state object a device last reported for `hello` (`{"Waiting": {…}}`, `"Active"`).
fn state(fleet: &Fleet, i: usize) -> Value {
    fleet.devices[i]
        .report("hello")
        .map_or(Value::Null, |r| r["state"].clone())
}

#[test]
fn a_canary_wave_reaches_only_its_seeds_and_the_next_opens_on_time_with_the_hub_dead() -> Result<()>
{
    const LATER: u64 = 20;
    let (mut fleet, all) = running_fleet("test:///default", &[], "w", 5, &[])?;
    let (by_seed, share) = first_wave(&fleet, &all, 2)?;
    let (canaries, rest) = by_seed.split_at(2);
    let waves = format!("{share}@0,100%@{LATER}s");
    let v1 = fleet.testimage("hello", "1.0.0", &["--pad-mib", "2"])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging", "--waves", &waves])?;

    fleet.wait_all(canaries, "hello", 1, "Active", CONVERGE)?;
    // The hub's view, from the devices' signed reports: the canaries active, the rest
    // waiting for the second wave.
    let status = wait_for(
        "the rollout status to count the waves",
        Duration::from_secs(15),
        || {
            let s = rollout_status(&fleet).ok()?;
            let w = &s["waves_detail"];
            (w[0]["active"] == 2 && w[1]["pending"] == 3).then_some(s)
        },
    )?;
    let signed_at = status["created_at"].as_u64().context("created_at")?;
    for &i in rest {
        let until = wait_for(
            &format!("{} to report it waits for its wave", fleet.devices[i].name),
            Duration::from_secs(15),
            || state(&fleet, i)["Waiting"]["until"].as_u64(),
        )?;
        assert_eq!(until, signed_at + LATER);
        assert!(fleet.devices[i].state_json()["apps"]["hello"]["current"].is_null());
    }

    // The hub and its broker die; the second wave still opens, and its devices fetch
    // from the canaries.
    fleet.kill_hub();
    fleet.wait_all(rest, "hello", 1, "Active", CONVERGE)?;
    for &i in rest {
        let r = fleet.devices[i].report("hello").context("report")?;
        assert!(
            r["at"].as_u64() >= Some(signed_at + LATER),
            "{} installed before its wave: {r}",
            fleet.devices[i].name
        );
        assert!(fleet.devices[i].fetched("hello").0 > 0, "{r}");
        fleet.assert_runs_image(i, &v1);
    }
    Ok(())
}

#[test]
fn a_release_targets_only_the_tags_and_devices_it_names() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let beta = fleet.add_device("tg-beta", "hello", &["--tag", "beta", "--tag", "kitchen"])?;
    let named = fleet.add_device("tg-named", "hello", &[])?;
    let other = fleet.add_device("tg-other", "hello", &["--tag", "garage"])?;
    // Tags are the operator's: one declared in device.toml and not assigned by `hub
    // enroll --tag` admits nothing (it did: the device targeted itself).
    let liar = fleet.add_device_assigned("tg-liar", "hello", &["--tag", "beta"], &["garage"])?;
    for i in [beta, named, other, liar] {
        fleet.start_device(i)?;
    }
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(
        &v1,
        "hello",
        "1.0.0",
        &[
            "--no-staging",
            "--target-tag",
            "beta",
            "--target-device",
            "tg-named",
        ],
    )?;
    fleet.wait_all(&[beta, named], "hello", 1, "Active", CONVERGE)?;
    wait_for(
        "tg-other to say the release is not for it",
        Duration::from_secs(15),
        || {
            fleet.devices[other]
                .log_text()
                .contains("the release targets tag:beta, device:tg-named and this device is tg-other with tags [garage] assigned")
                .then_some(())
        },
    )?;
    wait_for(
        "tg-liar to say the release is not for it",
        Duration::from_secs(15),
        || {
            fleet.devices[liar]
                .log_text()
                .contains("this device is tg-liar with tags [garage] assigned")
                .then_some(())
        },
    )?;
    for i in [other, liar] {
        assert!(fleet.devices[i].state_json()["apps"]["hello"]["current"].is_null());
    }
    // The hub's inventory knows each device's declared tags from its signed reports;
    // `hub devices` shows the assigned ones and a declared one nobody assigned.
    let inv = wait_for("tags in the inventory", Duration::from_secs(15), || {
        let inv = fleet.inventory().ok()?;
        (inv["tg-liar/hello"]["tags"] == serde_json::json!(["beta"])).then_some(inv)
    })?;
    let devices = run(fleet.hub_cmd()?.arg("devices"))?;
    assert!(
        devices.contains("tg-beta [beta, kitchen] hello")
            && devices
                .contains("tg-liar [garage] (declares beta: not assigned, `hub enroll --tag`)"),
        "{devices}"
    );
    assert_eq!(rollout_status(&fleet)?["not_targeted"], 2, "{inv}");
    // Assigned the tag after the release, the device takes it without a restart.
    run(fleet
        .hub_cmd()?
        .arg("enroll")
        .arg(fleet.devices[liar].dir.join("device.pub"))
        .args(["--name", "tg-liar", "--tag", "beta"]))?;
    fleet.wait_all(&[liar], "hello", 1, "Active", CONVERGE)?;
    Ok(())
}

/// A device that asks for a targeted release's chunks anyway, not assigned its tag, is
/// refused by the hub and by a device that holds them (both served it): the newest
/// release and the one it superseded, staged (the staging candidate, signed with no
/// targets, opened every chunk).
#[test]
fn a_device_not_assigned_the_tag_is_refused_the_chunks_by_the_hub_and_by_peers() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let libvirt = fleet.libvirt.clone();
    let stage = fleet.add_device_on("tc-stage", "hello", "staging", &libvirt, &[])?;
    let beta = fleet.add_device("tc-beta", "hello", &["--tag", "beta"])?;
    let liar = fleet.add_device_assigned("tc-liar", "hello", &["--tag", "beta"], &[])?;
    for i in [stage, beta, liar] {
        fleet.start_device(i)?;
    }
    let mut manifests = vec![];
    for (n, version) in [(1, "1.0.0"), (2, "1.0.1")] {
        let image = fleet.testimage("hello", version, &[])?;
        let published = fleet.publish(&image, "hello", version, &["--target-tag", "beta"])?;
        fleet.wait_all(&[beta], "hello", n, "Active", CONVERGE)?;
        let manifest = published
            .split("manifest ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .context("publish names the manifest")?;
        manifests.push(manifest.to_string());
    }
    let out = fleet.dir.path().join("fetched.img");
    fleet.fetch_release_as(&fleet.hub_addr, beta, (&manifests[0], "stable"), &out)?;
    let (hub, beta_addr) = (fleet.hub_addr.clone(), fleet.device_peer_addr(beta)?);
    let asks = [
        (&hub, &manifests[0], "stable"),
        (&hub, &manifests[1], "stable"),
        (&beta_addr, &manifests[0], "stable"),
        (&beta_addr, &manifests[1], "stable"),
    ];
    for (from, manifest, channel) in asks {
        let refused = match fleet.fetch_release_as(from, liar, (manifest, channel), &out) {
            Ok(said) => anyhow::bail!("{from} served tc-liar {manifest}: {said}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            refused.contains("refuses to trade with this device"),
            "{from}: {refused}"
        );
    }
    assert!(fleet.devices[liar].state_json()["apps"]["hello"]["current"].is_null());
    Ok(())
}

#[test]
fn a_release_whose_first_devices_fail_is_halted_and_the_rest_never_install_it() -> Result<()> {
    const URI: &str = "qemu:///system";
    const LATER: u64 = 25;
    let prefix = format!("rh{}-", std::process::id());
    let (fleet, all) = running_fleet(URI, &[], &prefix, 4, &[])?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&all, "hello", 1, "Active", CONVERGE)?;

    // Release 2 never becomes ready. Its first wave is two devices; after two attempts
    // with half of them failed, the hub halts it.
    let (by_seed, share) = first_wave(&fleet, &all, 2)?;
    let (canaries, rest) = by_seed.split_at(2);
    let bad = fleet.testimage("hello", "2.0.0", &["--fail"])?;
    let waves = format!("{share}@0,100%@{LATER}s");
    fleet.publish(
        &bad,
        "hello",
        "2.0.0",
        &[
            "--no-staging",
            "--probe-timeout-secs",
            "3",
            "--waves",
            &waves,
            "--halt-after",
            "2",
            "--halt-failures",
            "50%",
        ],
    )?;
    fleet.wait_all(canaries, "hello", 1, "RolledBack", CONVERGE)?;
    let status = wait_for("the hub to halt release 2", Duration::from_secs(20), || {
        let s = rollout_status(&fleet).ok()?;
        (s["hold"]["kind"] == "Halted").then_some(s)
    })?;
    assert!(
        status["hold"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("2 of 2 attempts failed")),
        "{status}"
    );
    // Past their wave, the others hold back: still on release 1, release 2 never booted.
    for &i in rest {
        wait_for(
            &format!("{} to hold back release 2", fleet.devices[i].name),
            Duration::from_secs(LATER + 30),
            || (state(&fleet, i)["Held"]["release"] == 2).then_some(()),
        )?;
        let d = &fleet.devices[i];
        assert_eq!(d.release_state("hello"), Some((1, "Held".into())));
        assert_eq!(d.state_json()["apps"]["hello"]["current"]["release"], 1);
        let console = d
            .dir
            .join(format!("state/uf-{}-hello-r2.console.log", d.name));
        assert!(!console.exists(), "{} booted the halted release", d.name);
    }
    let text = run(fleet.hub_cmd()?.args(["rollout", "status", "hello"]))?;
    assert!(text.contains("HALTED"), "{text}");
    Ok(())
}

#[test]
fn a_paused_release_waits_and_resumes_at_once() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device("rp0", "hello", &[])?;
    fleet.start_device(d)?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    // Everyone in a wave that opens in 8 s; paused before it does.
    fleet.publish(
        &v1,
        "hello",
        "1.0.0",
        &["--no-staging", "--waves", "100%@8s"],
    )?;
    run(fleet
        .hub_cmd()?
        .args(["rollout", "pause", "hello", "--reason", "looking at logs"]))?;
    wait_for("the device to hold the paused release", CONVERGE, || {
        (state(&fleet, d)["Held"]["kind"] == "Paused").then_some(())
    })?;
    // A watcher sees it held (and says so, failing).
    let held = run(fleet.hub_cmd()?.args(["rollout", "watch", "hello"])).unwrap_err();
    assert!(
        format!("{held:#}").contains("is paused: looking at logs"),
        "{held:#}"
    );
    // Resumed: installed at once, not at the next minute's look.
    run(fleet.hub_cmd()?.args(["rollout", "resume", "hello"]))?;
    wait_for(
        "the device to install the resumed release",
        Duration::from_secs(20),
        || {
            fleet.devices[d]
                .release_state("hello")
                .filter(|(r, s)| *r == 1 && s == "Active")
        },
    )?;
    // The watcher ends once every device it reaches runs it (the inventory within 1 s).
    let done = run(fleet.hub_cmd()?.args(["rollout", "watch", "hello"]))?;
    assert!(
        done.contains("runs on all 1 device(s) it reaches"),
        "{done}"
    );
    // Resuming what is not held says so.
    let err = run(fleet.hub_cmd()?.args(["rollout", "resume", "hello"])).unwrap_err();
    assert!(format!("{err:#}").contains("is not held"), "{err:#}");
    Ok(())
}

/// A root rotation that gives the hub a new rollout key left the stored hold list signed
/// by the old one: the hub could no longer read it (`hub serve` refused to start) and a
/// device that adopted the new root dropped the halt.
#[test]
fn a_rollout_key_rotation_signs_the_hold_list_again_and_the_halt_holds() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    run(fleet
        .hub_cmd()?
        .args(["rollout", "halt", "hello", "--reason", "bad build"]))?;

    let fwtool = |args: &[&str]| -> Result<String> {
        run(std::process::Command::new(unifleet_tests::bin("fwtool")?)
            .current_dir(fleet.path(""))
            .args(args))
    };
    fwtool(&["keygen", "--out", "rollout2"])?;
    let hub = fleet.hub_dir.clone();
    let root_key = hub.join("keys/root.key");
    fwtool(&[
        "root",
        "rotate",
        "--from",
        hub.join("root.bin").to_str().context("path")?,
        "--rollout-key",
        "rollout2.pub",
        "--sign-with",
        root_key.to_str().context("path")?,
        "--out",
        "root2.bin",
    ])?;
    run(fleet
        .hub_cmd()?
        .args(["root", "publish"])
        .arg(fleet.path("root2.bin"))
        .arg("--rollout-key")
        .arg(fleet.path("rollout2.key")))?;
    let status = rollout_status(&fleet)?;
    assert_eq!(status["hold"]["kind"], "Halted", "{status}");
    assert_eq!(status["hold"]["reason"], "bad build", "{status}");

    // The hub starts, and a device that trusts only the new root holds the release back.
    fleet.start_hub(&[])?;
    let d = fleet.add_device("rk0", "hello", &[])?;
    fleet.start_device(d)?;
    wait_for(
        "the new device to hold the halted release",
        CONVERGE,
        || (state(&fleet, d)["Held"]["kind"] == "Halted").then_some(()),
    )?;
    Ok(())
}
