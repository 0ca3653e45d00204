//! Issue 14: trust that lasts for years, with real hubs, brokers and agents.
//! Root rotation reaches every device (one offline through two rotations catches up link by
//! link); announcements are signed afresh by a running hub and lapse when it is down; a
//! 2-of-3 release is co-signed and published; one key is one name; two agents with one
//! name say so; a revoked device gets nothing with the hub up or down.

use anyhow::Result;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use unifleet_tests::bin;
use unifleet_tests::fleet::{faketime, run, toml_value::V, wait_for, Fleet};

const CONVERGE: Duration = Duration::from_secs(60);

fn fwtool(dir: &Path, args: &[&str]) -> Result<String> {
    run(Command::new(bin("fwtool")?).current_dir(dir).args(args))
}

/// The version of the newest root a device stored, if any.
fn stored_root_version(fleet: &Fleet, i: usize) -> Option<u64> {
    let bytes = std::fs::read(fleet.devices[i].dir.join("state/root.bin")).ok()?;
    let env = proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Root).ok()?;
    let root: proto::root::Root =
        proto::codec::decode(proto::codec::Kind::Root, &env.payload).ok()?;
    Some(root.version)
}

fn hub_fails(fleet: &Fleet, args: &[&str]) -> Result<String> {
    let out = fleet.hub_cmd()?.args(args).output()?;
    anyhow::ensure!(!out.status.success(), "hub {args:?} succeeded");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A started hub and two started devices named `a` and `b`, both active on release 1.
fn two_devices_on_release_1(a: &str, b: &str) -> Result<(Fleet, usize, usize)> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let first = fleet.add_device(a, "hello", &[])?;
    let second = fleet.add_device(b, "hello", &[])?;
    fleet.start_device(first)?;
    fleet.start_device(second)?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[first, second], "hello", 1, "Active", CONVERGE)?;
    Ok((fleet, first, second))
}

/// Nothing wrote the device's stored root before: `fwtool root rotate` never left the
/// operator's desk.
#[test]
fn root_publish_reaches_every_device_even_one_offline_through_two_rotations() -> Result<()> {
    let (mut fleet, online, offline) = two_devices_on_release_1("rot0", "rot1")?;
    if let Some(mut p) = fleet.devices[offline].proc.take() {
        p.kill9();
    }

    // Two rotations: the second retires the release key for a new one.
    let work = fleet.dir.path().to_path_buf();
    let hub = fleet.hub_dir.clone();
    let root_key = hub.join("keys/root.key");
    let root_key = root_key.to_str().unwrap();
    fwtool(
        &work,
        &[
            "root",
            "rotate",
            "--from",
            hub.join("root.bin").to_str().unwrap(),
            "--sign-with",
            root_key,
            "--out",
            "root2.bin",
        ],
    )?;
    // A root that is not the next link is refused by name.
    let err = hub_fails(
        &fleet,
        &[
            "root",
            "publish",
            work.join("root2.bin")
                .to_str()
                .unwrap()
                .replace("root2", "nope")
                .as_str(),
        ],
    )?;
    assert!(err.contains("reading new root"), "{err}");
    run(fleet
        .hub_cmd()?
        .args(["root", "publish"])
        .arg(work.join("root2.bin")))?;
    wait_for("the online device to adopt root 2", CONVERGE, || {
        (stored_root_version(&fleet, online) == Some(2)).then_some(())
    })?;
    fwtool(&work, &["keygen", "--out", "release2"])?;
    fwtool(
        &work,
        &[
            "root",
            "rotate",
            "--from",
            "root2.bin",
            "--release-key",
            "release2.pub",
            "--sign-with",
            root_key,
            "--out",
            "root3.bin",
        ],
    )?;
    let err = hub_fails(
        &fleet,
        &["root", "publish", work.join("root3.bin").to_str().unwrap()],
    )?;
    assert!(err.contains("does not list the hub's release key"), "{err}");
    run(fleet
        .hub_cmd()?
        .args(["root", "publish"])
        .arg(work.join("root3.bin"))
        .arg("--release-key")
        .arg(work.join("release2.key")))?;
    wait_for("the online device to adopt root 3", CONVERGE, || {
        (stored_root_version(&fleet, online) == Some(3)).then_some(())
    })?;
    // Publishing root 3 again is refused: it is not the next link any more.
    let err = hub_fails(
        &fleet,
        &["root", "publish", work.join("root3.bin").to_str().unwrap()],
    )?;
    assert!(
        err.contains("is not the next root after the hub's version 3"),
        "{err}"
    );

    // Restarted under root 3, the online device resumes release 1, which only the retired
    // release key signed (its stored manifest opens with the root link of its day).
    if let Some(mut p) = fleet.devices[online].proc.take() {
        p.kill9();
    }
    std::fs::remove_file(fleet.devices[online].dir.join("state/status.json"))?;
    fleet.start_device(online)?;
    fleet.wait_all(&[online], "hello", 1, "Active", CONVERGE)?;
    assert!(!fleet.devices[online]
        .log_text()
        .contains("no longer verifies"));

    // The device that slept through both comes back and catches up through both links.
    fleet.start_device(offline)?;
    wait_for("the returning device to adopt root 3", CONVERGE, || {
        (stored_root_version(&fleet, offline) == Some(3)).then_some(())
    })?;
    // By the links it fetched after hearing of root 3 on the broker, or by gossip that
    // still carried root 2 when it came back: either way, link by link.
    let log = fleet.devices[offline].log_text();
    assert!(
        log.contains("fetching versions 2..=2") || log.contains("adopted trust root version 2"),
        "{log}"
    );
    for i in [online, offline] {
        assert!(fleet.devices[i].dir.join("state/roots/2.bin").exists());
        assert_eq!(
            std::fs::read(fleet.devices[i].dir.join("state/root.bin"))?,
            std::fs::read(work.join("root3.bin"))?
        );
    }

    // A release signed with the new key installs everywhere (the old key is out of the
    // root: proto's rotation tests refuse what it signs).
    let v2 = fleet.testimage("hello", "2.0.0", &[])?;
    fleet.publish(&v2, "hello", "2.0.0", &["--no-staging"])?;
    fleet.wait_all(&[online, offline], "hello", 2, "Active", CONVERGE)?;
    let log = run(fleet.hub_cmd()?.arg("log"))?;
    assert!(log.contains("trust root version 3"), "{log}");
    Ok(())
}

/// Releases expired after 90 days and nothing re-signed them: an online fleet froze.
/// Now a hub re-signs announcements (here every few seconds); with the hub down past
/// freshness devices keep their release and refuse the stale pointer; the hub back
/// restores it without an operator.
#[test]
fn a_running_hub_keeps_announcements_fresh_and_a_dead_one_lets_them_lapse() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.set_hub_setting("freshness_secs = 604800", "freshness_secs = 6")?;
    fleet.start_hub(&[])?;
    let seed = fleet.add_device("fresh0", "hello", &[])?;
    let late = fleet.add_device("fresh1", "hello", &[])?;
    fleet.start_device(seed)?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[seed], "hello", 1, "Active", CONVERGE)?;
    let stored = fleet.store_file("apps/hello/stable/qemu-x86_64/0000000001.announcement")?;
    let ann = decode_announcement(&stored)?;
    // Past the stored announcement's life, a device that only now hears of the release
    // (the broker's retained message) installs it: the hub signed it afresh.
    wait_for("the stored announcement to lapse", CONVERGE, || {
        (proto_now() > ann.expires_at + 1).then_some(())
    })?;
    fleet.start_device(late)?;
    fleet.wait_all(&[late], "hello", 1, "Active", CONVERGE)?;

    // The hub dies; past freshness, a device that asks its peer is offered only a
    // stale pointer, and refuses it, while the seed keeps running release 1.
    if let Some(mut p) = fleet.devices[late].proc.take() {
        p.kill9();
    }
    fleet.kill_hub();
    let died = proto_now();
    wait_for("freshness to lapse with the hub down", CONVERGE, || {
        (proto_now() > died + 7).then_some(())
    })?;
    let seed_addr = fleet.device_peer_addr(seed)?;
    fleet.devices[late].set_config("peers", V::StrList(vec![seed_addr]))?;
    // Forget what it held, so only the peer's answer counts.
    std::fs::remove_file(fleet.devices[late].dir.join("state/state.json"))?;
    fleet.start_device(late)?;
    wait_for(
        "the returning device to refuse the stale pointer",
        CONVERGE,
        || {
            fleet.devices[late]
                .log_text()
                .contains("neither relaying nor installing a stale announcement")
                .then_some(())
        },
    )?;
    assert_eq!(
        fleet.devices[seed].release_state("hello"),
        Some((1, "Active".into())),
        "the seed keeps its release"
    );
    // The hub returns: fresh announcements, no operator.
    fleet.start_hub(&[])?;
    fleet.wait_all(&[seed, late], "hello", 1, "Active", CONVERGE)?;
    Ok(())
}

fn decode_announcement(bytes: &[u8]) -> Result<proto::announcement::Announcement> {
    let env = proto::envelope::Envelope::decode(bytes, proto::codec::Kind::Announcement)?;
    Ok(proto::codec::decode(
        proto::codec::Kind::Announcement,
        &env.payload,
    )?)
}

fn proto_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `sign_and_store` signed with one key: a root with a release threshold of 2 could never
/// publish.
#[test]
fn a_two_of_three_release_is_held_co_signed_and_published() -> Result<()> {
    let work = tempfile::tempdir()?;
    let w = work.path();
    for k in ["root", "rel1", "rel2", "rel3", "ts", "ro"] {
        fwtool(w, &["keygen", "--out", k])?;
    }
    fwtool(
        w,
        &[
            "root",
            "init",
            "--root-key",
            "root.pub",
            "--release-key",
            "rel1.pub",
            "--release-key",
            "rel2.pub",
            "--release-key",
            "rel3.pub",
            "--release-threshold",
            "2",
            "--timestamp-key",
            "ts.pub",
            "--rollout-key",
            "ro.pub",
            "--sign-with",
            "root.key",
            "--out",
            "root.bin",
        ],
    )?;
    let mut fleet = Fleet::new_with(
        "test:///default",
        work,
        &[
            "--root",
            "root.bin",
            "--release-key",
            "rel1.key",
            "--timestamp-key",
            "ts.key",
        ],
    )?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device("cosign0", "hello", &[])?;
    fleet.start_device(d)?;
    let img = fleet.testimage("hello", "1.0.0", &[])?;

    let img_s = img.to_str().unwrap();
    let err = hub_fails(
        &fleet,
        &[
            "publish",
            img_s,
            "--app",
            "hello",
            "--version",
            "1.0.0",
            "--no-staging",
        ],
    )?;
    assert!(
        err.contains("needs 2 of its 3 keys") && err.contains("--hold"),
        "{err}"
    );
    let err = hub_fails(
        &fleet,
        &[
            "publish",
            img_s,
            "--app",
            "hello",
            "--version",
            "1.0.0",
            "--hold",
        ],
    )?;
    assert!(err.contains("--hold needs --no-staging"), "{err}");

    let out = fleet
        .hub_cmd()?
        .args([
            "publish",
            img_s,
            "--app",
            "hello",
            "--version",
            "1.0.0",
            "--no-staging",
            "--hold",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let held = fleet.hub_dir.join("held/hello-stable-1");
    assert!(held.join("manifest").exists());
    let held_s = held.to_str().unwrap();
    // The hub's own signature is one of two: not enough.
    let err = hub_fails(&fleet, &["release", "approve", held_s])?;
    assert!(err.contains("has 1 of the 2 release signatures"), "{err}");
    let status = run(fleet.hub_cmd()?.arg("status"))?;
    assert!(
        status.contains("held for co-signing: hello-stable-1"),
        "{status}"
    );
    // A second key holder signs offline; now it publishes and the device installs it.
    fwtool(fleet.dir.path(), &["sign", held_s, "--key", "rel2.key"])?;
    run(fleet.hub_cmd()?.args(["release", "approve", held_s]))?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;
    assert!(
        !held.exists(),
        "an approved release leaves the held directory"
    );
    let status = run(fleet.hub_cmd()?.arg("status"))?;
    assert!(
        status.contains("release 2-of-3") && status.contains("holds 1 of the 2"),
        "{status}"
    );
    Ok(())
}

/// `hub enroll OTHER.pub --name d1` replaced d1's key silently, and one key could be
/// enrolled under a second name.
#[test]
fn one_key_one_name_and_replacing_a_key_needs_replace() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    let d1 = fleet.add_device("d1", "hello", &[])?;
    let other = fleet.dir.path().join("other");
    run(Command::new(bin("device")?)
        .args([
            "enroll",
            "--no-mdns",
            "--name",
            "d9",
            "--app",
            "hello",
            "--dir",
        ])
        .arg(&other)
        .arg("--root")
        .arg(fleet.hub_dir.join("root.bin")))?;
    let d1_pub = fleet.devices[d1].dir.join("device.pub");
    let other_pub = other.join("device.pub");
    let err = hub_fails(
        &fleet,
        &["enroll", other_pub.to_str().unwrap(), "--name", "d1"],
    )?;
    assert!(
        err.contains("d1 is already enrolled with key") && err.contains("--replace"),
        "{err}"
    );
    let err = hub_fails(
        &fleet,
        &["enroll", d1_pub.to_str().unwrap(), "--name", "d2"],
    )?;
    assert!(err.contains("is already enrolled as \"d1\""), "{err}");
    // The same key and name again is no change.
    run(fleet
        .hub_cmd()?
        .arg("enroll")
        .arg(&d1_pub)
        .args(["--name", "d1"]))?;
    run(fleet
        .hub_cmd()?
        .arg("enroll")
        .arg(&other_pub)
        .args(["--name", "d1", "--replace"]))?;
    let log = run(fleet.hub_cmd()?.arg("log"))?;
    assert!(log.contains("replace-key"), "{log}");
    assert_eq!(log.matches("enroll").count(), 1, "{log}");
    Ok(())
}

/// Two agents with one name knocked each other off MQTT (one client id) with no word.
#[test]
fn two_agents_with_one_name_say_so_on_both() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let a = fleet.add_device("twin", "hello", &[])?;
    // A second board set up with the same name (not enrolled: the name is what clashes).
    let b = fleet.add_unenrolled_device("twin-b", "twin", "hello")?;
    fleet.start_device(a)?;
    fleet.start_device(b)?;
    let needle = "another agent is most likely running with the same name \"twin\"";
    wait_for("both twins to say so", CONVERGE, || {
        (fleet.devices[a].log_text().contains(needle)
            && fleet.devices[b].log_text().contains(needle))
        .then_some(())
    })?;
    Ok(())
}

/// Nothing could revoke a device.
#[test]
fn a_revoked_device_gets_nothing_with_the_hub_up_or_down() -> Result<()> {
    let (mut fleet, good, lost) = two_devices_on_release_1("good", "lost")?;

    let out = run(fleet
        .hub_cmd()?
        .args(["revoke", "lost", "--reason", "board stolen"]))?;
    assert!(out.contains("revoked lost"), "{out}");
    wait_for(
        "the good device to hold the revocation list",
        CONVERGE,
        || {
            fleet.devices[good]
                .dir
                .join("state/revocations.bin")
                .exists()
                .then_some(())
        },
    )?;
    let v2 = fleet.testimage("hello", "2.0.0", &["--pad-mib", "1"])?;
    fleet.publish(&v2, "hello", "2.0.0", &["--no-staging"])?;
    fleet.wait_all(&[good], "hello", 2, "Active", CONVERGE)?;
    // With the hub up: it refuses the revoked device's requests and its reports.
    wait_for("the hub to refuse the revoked device", CONVERGE, || {
        (fleet.devices[lost]
            .log_text()
            .contains("refuses to trade with this device")
            && fleet
                .hub
                .as_ref()?
                .log_text()
                .contains("dropping status report of a revoked device"))
        .then_some(())
    })?;
    let devices = run(fleet.hub_cmd()?.arg("devices"))?;
    assert!(devices.contains("lost REVOKED since"), "{devices}");

    // With the hub down: its peer refuses it too.
    fleet.kill_hub();
    if let Some(mut p) = fleet.devices[lost].proc.take() {
        p.kill9();
    }
    let good_addr = fleet.device_peer_addr(good)?;
    fleet.devices[lost].set_config("peers", V::StrList(vec![good_addr]))?;
    fleet.start_device(lost)?;
    wait_for(
        "the good device to refuse the revoked one",
        CONVERGE,
        || {
            fleet.devices[good]
                .log_text()
                .contains("refusing a revoked peer")
                .then_some(())
        },
    )?;
    let st = fleet.devices[lost].state_json();
    assert_eq!(st["apps"]["hello"]["current"]["release"], 1, "{st}");
    Ok(())
}

/// Unenrolled devices could always fetch from the hub; `serve_unenrolled = false` makes
/// the hub serve enrolled devices only, and since issue 31 a new hub is set so. (Devices
/// cannot tell enrolled peers from others: they refuse only revoked ones.)
#[test]
fn a_hub_set_to_serve_enrolled_devices_only_refuses_a_stranger() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    let config = std::fs::read_to_string(fleet.hub_dir.join("hub.toml"))?;
    assert!(
        config.contains("serve_unenrolled = false"),
        "a new hub: {config}"
    );
    fleet.start_hub(&[])?;
    let member = fleet.add_device("member", "hello", &[])?;
    // A board set up against this hub but never enrolled.
    let stranger = fleet.add_unenrolled_device("stranger", "stranger", "hello")?;
    fleet.start_device(member)?;
    fleet.start_device(stranger)?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[member], "hello", 1, "Active", CONVERGE)?;
    wait_for("the stranger to be refused", CONVERGE, || {
        fleet.devices[stranger]
            .log_text()
            .contains("refuses to trade with this device")
            .then_some(())
    })?;
    let hub_log = fleet.hub.as_ref().map(|h| h.log_text()).unwrap_or_default();
    assert!(
        hub_log.contains("refusing a blob request: revoked or not enrolled"),
        "{hub_log}"
    );
    Ok(())
}

/// `path` of the HTTP server at `addr`, the whole answer.
fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut page = String::new();
    s.read_to_string(&mut page)?;
    Ok(page)
}

/// Issue 32: with the clock 1,100 days ahead the quick-start root (3 years) has expired.
/// `hub serve` used to refuse to start ("expired at 1891215182"); now it serves blobs,
/// takes reports and shows the dashboard, refuses only to publish and announce, and says
/// so with dates and the next step on the CLI, the dashboard, the metrics and the log.
/// The next root, made and published under the same clock, restores it.
#[test]
fn an_expired_root_degrades_the_hub_and_the_next_root_restores_it() -> Result<()> {
    let (mut fleet, a, _) = two_devices_on_release_1("exp0", "exp1")?;
    let digest = fleet.releases(None)?[0]["manifest"]
        .as_str()
        .unwrap()
        .to_string();
    fleet.kill_hub();
    // The client fetching below has no enrolled key.
    fleet.serve_strangers()?;
    fleet.hub_env = faketime("+1100d");
    let metrics = format!("127.0.0.1:{}", unifleet_tests::free_port()?);
    let http = format!("127.0.0.1:{}", unifleet_tests::free_port()?);
    fleet.start_hub(&["--metrics", &metrics, "--http", &http])?;
    let expired = |m: &str| unifleet_tests::metric(m, "unifleet_hub_root_expired").ok();
    wait_for("the hub to say it does not announce", CONVERGE, || {
        let log = fleet.hub.as_ref()?.log_text();
        log.contains("not announcing: the trust root").then_some(())
    })?;
    assert_eq!(expired(&metrics), Some(1));
    let expires_at = unifleet_tests::metric(&metrics, "unifleet_hub_root_expires_at_seconds")?;
    assert!(expires_at > 0, "the expiry is a gauge to alert on");

    // Said on the CLI, the dashboard and the log, with a date and the next step.
    let out = fleet.hub_cmd()?.arg("status").output()?;
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{status}");
    for said in [
        "trust root version 1, expired ",
        "(5 days ago)",
        "fwtool root rotate",
    ] {
        assert!(status.contains(said), "{said:?} in {status}");
    }
    let page = http_get(&http, "/releases")?;
    assert!(
        page.contains(r#"class="banner""#) && page.contains("expired on"),
        "{page}"
    );
    assert!(
        page.contains("hello"),
        "the dashboard still lists releases: {page}"
    );
    let log = fleet.hub.as_ref().unwrap().log_text();
    assert!(
        !log.contains(&expires_at.to_string()),
        "dates, not Unix seconds: {log}"
    );

    // Blobs are served (fetched and verified by a client on today's clock) and reports
    // are taken (a restarted agent's).
    let out = fleet.path("fetched.img");
    let said = fleet.fetch_release(&digest, "stable", &out)?;
    assert!(said.starts_with("verified hello 1.0.0 release 1"), "{said}");
    if let Some(mut p) = fleet.devices[a].proc.take() {
        p.kill9();
    }
    let restarted = proto_now();
    fleet.start_device(a)?;
    wait_for("the restarted device's report", CONVERGE, || {
        let inv = fleet.inventory().ok()?;
        let seen =
            inv.as_object()?.values().find(|e| e["device"] == "exp0")?["last_seen"].as_u64()?;
        // The hub's clock is 1,100 days ahead of the test's.
        (seen > restarted + 1_000 * 86_400).then_some(())
    })?;

    // Publishing is refused before anything is chunked, with the reason and next step.
    let v2 = fleet.testimage("hello", "1.1.0", &[])?;
    let v2s = v2.to_str().unwrap();
    let args = [
        "publish",
        v2s,
        "--app",
        "hello",
        "--version",
        "1.1.0",
        "--no-staging",
    ];
    let err = hub_fails(&fleet, &args)?;
    assert!(
        err.contains("the trust root (version 1) expired on") && err.contains("hub root publish"),
        "{err}"
    );
    assert_eq!(fleet.releases(None)?.len(), 1);

    // The next root, made from the expired one under the same clock, restores it all.
    let hub = fleet.hub_dir.clone();
    run(Command::new(bin("fwtool")?)
        .current_dir(fleet.dir.path())
        .envs(faketime("+1100d"))
        .args(["root", "rotate", "--from"])
        .arg(hub.join("root.bin"))
        .arg("--sign-with")
        .arg(hub.join("keys/root.key"))
        .args(["--out", "root2.bin"]))?;
    run(fleet
        .hub_cmd()?
        .args(["root", "publish"])
        .arg(fleet.path("root2.bin")))?;
    let published = fleet.hub_cmd()?.args(args).output()?;
    let said = String::from_utf8_lossy(&published.stderr).into_owned()
        + &String::from_utf8_lossy(&published.stdout);
    assert!(published.status.success(), "{said}");
    assert!(said.contains("announced 1 release(s)"), "{said}");
    assert_eq!(expired(&metrics), Some(0));
    Ok(())
}
