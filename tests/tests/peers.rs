//! Issue: device agent, tests b and c: devices spread releases among themselves when the
//! hub is gone (asking each peer they connect to for its newest announcement), and a
//! malicious peer cannot get a bad image or a forged announcement accepted.

use anyhow::Result;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use unifleet_tests::fleet::{running_fleet, toml_value::V, wait_for, Fleet, Proc};
use unifleet_tests::{bin, free_port};

const CONVERGE: Duration = Duration::from_secs(60);

#[test]
fn devices_converge_from_peers_after_the_hub_and_broker_die() -> Result<()> {
    let (mut fleet, all) = running_fleet("test:///default", &[], "p", 5, &[])?;
    let v1 = fleet.testimage("hello", "1.0.0", &["--pad-mib", "4"])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&all, "hello", 1, "Active", CONVERGE)?;

    // Four devices go offline; the first one alone sees release 2 arrive.
    let seed = all[0];
    let others = &all[1..];
    for &i in others {
        if let Some(mut p) = fleet.devices[i].proc.take() {
            p.kill9();
        }
    }
    let v2 = fleet.testimage("hello", "2.0.0", &["--pad-mib", "4"])?;
    fleet.publish(&v2, "hello", "2.0.0", &["--no-staging"])?;
    fleet.wait_all(&[seed], "hello", 2, "Active", CONVERGE)?;
    // ... and as soon as it holds it, the hub and its embedded broker die.
    fleet.kill_hub();

    // The others come back knowing only the seed device's address.
    let seed_addr = fleet.device_peer_addr(seed)?;
    for &i in others {
        fleet.devices[i].set_config("peers", V::StrList(vec![seed_addr.clone()]))?;
        fleet.start_device(i)?;
    }
    fleet.wait_all(others, "hello", 2, "Active", CONVERGE)?;
    for &i in others {
        // ... by asking the seed device when they connected, not at its next re-gossip.
        let log = fleet.devices[i].log_text();
        assert!(
            log.contains("learned of a release by asking a peer"),
            "{} did not ask its peer:\n{log}",
            fleet.devices[i].name
        );
        assert_eq!(
            fleet.devices[i].fetched("hello").1,
            0,
            "{} used the dead hub",
            fleet.devices[i].name
        );
        assert!(fleet.devices[i].fetched("hello").0 > 0);
        fleet.assert_runs_image(i, &v2);
    }
    // The seed device kept serving its instance throughout.
    assert_eq!(
        fleet.devices[seed].release_state("hello"),
        Some((2, "Active".into()))
    );

    // The hub returns: reports flow again and its inventory catches up.
    fleet.start_hub(&[])?;
    wait_for("the inventory to catch up", CONVERGE, || {
        let inv = fleet.inventory().ok()?;
        all.iter()
            .all(|&i| {
                let e = &inv[format!("{}/hello", fleet.devices[i].name)];
                e["release"] == 2 && e["state"] == "active"
            })
            .then_some(())
    })?;
    Ok(())
}

#[test]
fn malicious_peer_is_detected_dropped_and_the_right_image_installed() -> Result<()> {
    // With the hub up, devices fetch only from peers the hub names (those that reported
    // a blob stored); connected peers are asked unprompted when the hub does not answer.
    // So: an honest device gets the release, the hub dies, and a victim that knows the
    // honest device and an evil peer fetches from them.
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let honest = fleet.add_device("honest", "hello", &[])?;
    fleet.start_device(honest)?;
    let v1 = fleet.testimage("hello", "1.0.0", &["--pad-mib", "1"])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[honest], "hello", 1, "Active", CONVERGE)?;
    fleet.kill_hub();

    let port = free_port()?;
    let mut child = Command::new(bin("evil_peer")?)
        .args(["home", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line)?;
    let evil_addr = line
        .trim()
        .strip_prefix("evil peer: ")
        .expect("evil peer address")
        .to_string();
    let _evil = Proc {
        child,
        log: fleet.path("evil.log"),
    };
    let honest_addr = fleet.device_peer_addr(honest)?;
    let d = fleet.add_device("victim", "hello", &["--peer", &evil_addr])?;
    fleet.devices[d].set_config("peers", V::StrList(vec![evil_addr.clone(), honest_addr]))?;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    fleet.devices[d].set_config("metrics", V::Str(metrics.clone()))?;
    fleet.start_device(d)?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;
    // Every byte it runs is the published image: nothing from the evil peer was kept.
    fleet.assert_runs_image(d, &v1);
    let log = fleet.devices[d].log_text();
    let evil_id = evil_addr.rsplit('/').next().unwrap();
    let complaints = log
        .lines()
        .filter(|l| l.contains("peer sent a bad blob") && l.contains(evil_id))
        .count();
    assert!(complaints >= 1, "the bad blobs were noticed:\n{log}");
    // Asked for its newest announcement, it answered with a forged far newer release:
    // refused, and the victim runs release 1.
    assert!(
        log.lines()
            .any(|l| l.contains("refusing announcement") && l.contains(evil_id)),
        "the forged announcement was refused:\n{log}"
    );
    assert!(unifleet_tests::metric(&metrics, "unifleet_device_announcements_refused_total")? >= 1);
    // Dropped after its first bad blob: only requests already in flight then (at most
    // `parallel_fetches`, 4) reach it, though the image has many more chunks.
    drop(_evil);
    let served = out
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.starts_with("served"))
        .count();
    assert!(served <= 4, "the evil peer was asked {served} times");
    assert_eq!(
        fleet.devices[d].fetched("hello").1,
        0,
        "the dead hub served nothing"
    );
    // The agent's Prometheus metrics agree.
    assert_eq!(
        unifleet_tests::metric(&metrics, "unifleet_device_activations_total")?,
        1
    );
    assert_eq!(
        unifleet_tests::metric(&metrics, "unifleet_device_bytes_from_hub_total")?,
        0
    );
    Ok(())
}
