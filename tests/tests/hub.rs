//! Issue: hub. Real processes: `hub serve` with the embedded broker or a real mosquitto,
//! a second libp2p process fetching by digest, `git push` deploys, kill -9 of `hub
//! publish`, and bad input refused with clear errors.

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;
use unifleet_tests::fleet::{run, wait_for, Fleet, Proc};
use unifleet_tests::{bin, free_port};

const CONVERGE: Duration = Duration::from_secs(60);

/// A mosquitto broker with this configuration, stopped when dropped.
fn mosquitto(conf: &std::path::Path, log: std::path::PathBuf) -> Result<Proc> {
    // Debian puts mosquitto in /usr/sbin, which is not on every PATH.
    let program = if std::path::Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    };
    let child = Command::new(program)
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto (scripts/setup.sh installs it)")?;
    Ok(Proc { child, log })
}

#[test]
fn external_mosquitto_broker_carries_retained_announcements() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    let port = free_port()?;
    let conf = fleet.path("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )?;
    let _mosquitto = mosquitto(&conf, fleet.path("mosquitto.log"))?;
    wait_for("mosquitto to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })?;
    fleet.mqtt = format!("mqtt://127.0.0.1:{port}");
    let broker = fleet.mqtt.clone();
    fleet.start_hub(&["--broker", &broker])?;
    let img = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&img, "hello", "1.0.0", &["--no-staging"])?;
    // A device that joins later still learns the release: it is retained by mosquitto.
    let d = fleet.add_device("mq0", "hello", &[])?;
    fleet.start_device(d)?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;
    // Status reports reach the hub through mosquitto.
    wait_for("the hub's inventory to show mq0 active", CONVERGE, || {
        (fleet.inventory().ok()?["mq0/hello"]["state"] == "active").then_some(())
    })?;

    // The broker dies and comes back empty (no persistence): the running hub announces
    // again and the retained announcement is there once more.
    let topic = "unifleet/home/release/stable/hello/qemu-x86_64";
    drop(_mosquitto);
    let _mosquitto = mosquitto(&conf, fleet.path("mosquitto2.log"))?;
    let retained = unifleet_tests::mqtt_first_message(&fleet.mqtt, topic, Duration::from_secs(30))?;
    let env = proto::envelope::Envelope::decode(&retained, proto::codec::Kind::Announcement)?;
    let ann: proto::announcement::Announcement =
        proto::codec::decode(proto::codec::Kind::Announcement, &env.payload)?;
    assert_eq!(ann.release, 1);
    Ok(())
}

#[test]
fn a_second_process_fetches_and_verifies_a_release_over_libp2p() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.serve_strangers()?;
    fleet.start_hub(&[])?;
    let img = fleet.testimage("hello", "1.0.0", &["--pad-mib", "2"])?;
    fleet.publish(&img, "hello", "1.0.0", &["--no-staging"])?;
    let rel = fleet.releases(None)?;
    let digest = rel[0]["manifest"].as_str().unwrap().to_string();
    let out = fleet.path("fetched.img");
    let said = fleet.fetch_release(&digest, "stable", &out)?;
    assert!(said.starts_with("verified hello 1.0.0 release 1"), "{said}");
    assert_eq!(std::fs::read(&out)?, std::fs::read(&img)?);
    Ok(())
}

#[test]
fn git_push_deploys_through_the_same_pipeline() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device("gp0", "hello", &[])?;
    fleet.start_device(d)?;
    let app = fleet.path("app");
    std::fs::create_dir_all(app.join("build"))?;
    let img = fleet.testimage("hello", "1.2.0", &[])?;
    std::fs::copy(&img, app.join("build/hello.elf"))?;
    std::fs::write(
        app.join("unifleet.toml"),
        "app = \"hello\"\nversion = \"1.2.0\"\nimage = \"build/hello.elf\"\nno_staging = true\n",
    )?;
    let git = |args: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new("git")
            .args([
                "-c",
                "user.name=op",
                "-c",
                "user.email=op@example.invalid",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(&app)
            .output()?)
    };
    git(&["init", "-q"])?;
    git(&["add", "."])?;
    git(&["commit", "-qm", "hello 1.2.0"])?;
    git(&[
        "remote",
        "add",
        "unifleet",
        fleet.hub_dir.join("deploy.git").to_str().unwrap(),
    ])?;
    let push = git(&["push", "unifleet", "main"])?;
    let said = String::from_utf8_lossy(&push.stderr);
    assert!(push.status.success(), "{said}");
    assert!(
        said.contains("remote: chunked"),
        "the push shows the pipeline's progress: {said}"
    );
    assert!(
        said.contains("remote: unifleet: released hello release 1 on stable"),
        "{said}"
    );
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;

    // A push of something broken ends with the reason, and publishes nothing.
    std::fs::write(app.join("build/hello.elf"), b"not an image")?;
    std::fs::write(
        app.join("unifleet.toml"),
        "app = \"hello\"\nversion = \"1.3.0\"\nimage = \"build/hello.elf\"\nno_staging = true\n",
    )?;
    git(&["commit", "-qam", "broken"])?;
    let push = git(&["push", "unifleet", "main"])?;
    let said = String::from_utf8_lossy(&push.stderr);
    assert!(said.contains("unrecognised image"), "{said}");
    assert!(!push.status.success(), "the push is rejected: {said}");
    assert_eq!(fleet.releases(None)?.len(), 1);

    // A push may carry a staged rollout; a misspelt one is refused, naming the field.
    std::fs::copy(&img, app.join("build/hello.elf"))?;
    let deploy = |extra: &str| -> Result<String> {
        std::fs::write(
            app.join("unifleet.toml"),
            format!("app = \"hello\"\nversion = \"1.3.0\"\nimage = \"build/hello.elf\"\nno_staging = true\n{extra}"),
        )?;
        git(&["commit", "-qam", extra])?;
        let push = git(&["push", "unifleet", "main"])?;
        Ok(String::from_utf8_lossy(&push.stderr).into_owned())
    };
    let said = deploy("waves = \"10%@1h,5%@2h\"\n")?;
    assert!(said.contains("unifleet.toml: waves"), "{said}");
    assert_eq!(fleet.releases(None)?.len(), 1);
    let said = deploy("waves = \"10%@0,100%@1h\"\nhalt_after = 3\ntarget_tags = [\"beta\"]\n")?;
    assert!(said.contains("released hello release 2"), "{said}");
    assert!(
        said.contains("first wave: none of the 1 device(s) on stable is in it"),
        "a wave no device is in is said, not waited for: {said}"
    );
    let status: serde_json::Value = serde_json::from_str(&run(fleet
        .hub_cmd()?
        .args(["rollout", "status", "hello", "--json"]))?)?;
    assert_eq!(status["waves"], "10%@0s,100%@1h", "{status}");
    assert_eq!(
        status["targets"],
        serde_json::json!(["tag:beta"]),
        "{status}"
    );
    assert_eq!(status["halt_policy"]["min_attempts"], 3, "{status}");
    Ok(())
}

#[test]
fn kill9_of_hub_publish_never_leaves_a_broken_store() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let store = fleet.hub_dir.join("store.git");
    let root = proto::root::TrustedRoot::bootstrap(
        &std::fs::read(fleet.hub_dir.join("root.bin"))?,
        now(),
    )?;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
    let mut published = 0;
    for k in 0..20u64 {
        let img = fleet.testimage("hello", &format!("1.0.{k}"), &["--pad-mib", "2"])?;
        let mut child = fleet
            .hub_cmd()?
            .arg("publish")
            .arg(&img)
            .args([
                "--app",
                "hello",
                "--version",
                &format!("1.0.{k}"),
                "--no-staging",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // The kill lands at a pseudo-random point of the pipeline (0–120 ms in).
        std::thread::sleep(Duration::from_millis(x % 120));
        let _ = child.kill();
        let status = child.wait()?;
        if status.success() {
            published += 1;
        }
        // The store is a valid git repository ...
        let fsck = Command::new("git")
            .arg("--git-dir")
            .arg(&store)
            .args(["fsck", "--no-dangling"])
            .output()?;
        assert!(
            fsck.status.success(),
            "run {k}: {}",
            String::from_utf8_lossy(&fsck.stderr)
        );
        // ... and every release in it is complete and signed.
        for r in fleet.releases(None)? {
            let path = format!(
                "apps/hello/stable/qemu-x86_64/{:010}.manifest",
                r["release"].as_u64().unwrap()
            );
            let bytes = fleet.store_file(&path)?;
            let env = proto::envelope::Envelope::decode(&bytes, proto::codec::Kind::Manifest)?;
            let m: proto::manifest::Manifest = env.open("release", &root.root().release)?;
            for c in &m.chunks {
                let blob = format!("HEAD:blobs/{}", c.digest.to_hex());
                let st = Command::new("git")
                    .arg("--git-dir")
                    .arg(&store)
                    .args(["cat-file", "-e", &blob])
                    .status()?;
                assert!(
                    st.success(),
                    "run {k}: release {} lacks chunk {}",
                    m.release,
                    c.digest
                );
            }
            let ann = format!(
                "HEAD:apps/hello/stable/qemu-x86_64/{:010}.announcement",
                m.release
            );
            let st = Command::new("git")
                .arg("--git-dir")
                .arg(&store)
                .args(["cat-file", "-e", &ann])
                .status()?;
            assert!(
                st.success(),
                "run {k}: release {} lacks its announcement",
                m.release
            );
        }
    }
    // Some runs finished, some were cut short; either way the numbering stayed dense.
    let rel = fleet.releases(None)?;
    let numbers: Vec<u64> = rel.iter().map(|r| r["release"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>());
    assert!(
        numbers.len() >= published,
        "{numbers:?} vs {published} completed publishes"
    );
    Ok(())
}

/// Twenty publishes at once, CLI and `git push` mixed: each that succeeds has a release
/// number of its own, dense, tagged and verifiable; each refused one says why. (The newest
/// release was read outside the writer lock: 10 concurrent publishes printed "release 1"
/// five times and the store kept 2 releases.)
#[test]
fn concurrent_publishes_never_share_a_release_number() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    const N: usize = 20;
    // 13 CLI publishes and 7 pushes; the pushes carry the highest versions, so the one
    // with the highest of all always lands and pushes and CLI publishes both succeed.
    let pushed = |k: usize| k > 13;
    let deploy = fleet.hub_dir.join("deploy.git");
    let git = |dir: &std::path::Path, args: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new("git")
            .args(["-c", "user.name=op", "-c", "user.email=op@example.invalid"])
            .args(["-c", "init.defaultBranch=main"])
            .args(args)
            .current_dir(dir)
            .output()?)
    };
    let mut cmds = Vec::new();
    for k in 1..=N {
        let version = format!("1.0.{k}");
        let img = fleet.testimage("hello", &version, &[])?;
        if pushed(k) {
            let repo = fleet.path(&format!("app{k}"));
            std::fs::create_dir_all(&repo)?;
            std::fs::copy(&img, repo.join("hello.elf"))?;
            std::fs::write(
                repo.join("unifleet.toml"),
                format!("app = \"hello\"\nversion = \"{version}\"\nimage = \"hello.elf\"\nno_staging = true\n"),
            )?;
            git(&repo, &["init", "-q"])?;
            git(&repo, &["add", "."])?;
            git(&repo, &["commit", "-qm", &version])?;
            let mut c = Command::new("git");
            c.arg("push")
                .arg(&deploy)
                .arg(format!("main:refs/heads/deploy{k}"))
                .current_dir(&repo);
            cmds.push((version, c));
        } else {
            let mut c = fleet.hub_cmd()?;
            c.arg("publish").arg(&img).args([
                "--app",
                "hello",
                "--version",
                &version,
                "--no-staging",
            ]);
            cmds.push((version, c));
        }
    }
    let children: Vec<_> = cmds
        .into_iter()
        .map(|(v, mut c)| Ok((v, c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?)))
        .collect::<Result<_>>()?;
    let mut released = std::collections::BTreeMap::new();
    let mut refused = 0;
    for (version, child) in children {
        let out = child.wait_with_output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let number = said.lines().find_map(|l| {
            let rest = l
                .split_once("signed and stored release ")
                .or_else(|| l.split_once("released hello release "))?
                .1;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        });
        match number {
            Some(n) => {
                assert!(
                    released.insert(n, version.clone()).is_none(),
                    "release {n} reported twice (second: {version}): {said}"
                );
            }
            None => {
                assert!(
                    said.contains("is not above"),
                    "{version} neither released nor refused for its version: {said}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!(released.len() + refused, N);
    assert!(
        released.values().any(|v| v == &format!("1.0.{N}")),
        "the highest version (a push) lands: {released:?}"
    );
    let numbers: Vec<u64> = released.keys().copied().collect();
    assert_eq!(
        numbers,
        (1..=numbers.len() as u64).collect::<Vec<_>>(),
        "dense release numbers"
    );
    let stored = fleet.releases(Some("stable"))?;
    assert_eq!(
        stored.len(),
        released.len(),
        "every success is stored: {stored:?}"
    );
    let root = proto::root::TrustedRoot::bootstrap(
        &std::fs::read(fleet.hub_dir.join("root.bin"))?,
        now(),
    )?;
    let tags = run(Command::new("git")
        .arg("--git-dir")
        .arg(fleet.hub_dir.join("store.git"))
        .arg("tag"))?;
    let mut last = None;
    for (n, version) in &released {
        let bytes = fleet.store_file(&format!("apps/hello/stable/qemu-x86_64/{n:010}.manifest"))?;
        let verified = proto::manifest::verify_manifest(
            &bytes,
            &root,
            &proto::manifest::Expectations {
                app: Some("hello"),
                channel: "stable",
                platform: proto::manifest::Platform::QemuX86_64,
                installed_release: None,
            },
            now(),
        )?;
        let m = verified.manifest();
        assert_eq!(&m.version.to_string(), version, "release {n}");
        assert!(
            last.as_ref().is_none_or(|l| &m.version > l),
            "versions grow with releases"
        );
        last = Some(m.version.clone());
        assert!(
            tags.lines().any(|t| t == format!("hello/v{version}")),
            "tag for {version}: {tags}"
        );
    }
    Ok(())
}

/// A large image of repeated content is streamed: `hub publish` runs under a 160 MiB
/// data limit with a 256 MiB image, and counts the repeated chunk's bytes once. (It held
/// every chunk in memory — 2.1 GB of RSS for a 2 GiB image — and reported every byte new.)
#[test]
fn publish_streams_large_images_and_counts_repeated_chunks_once() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let img = fleet.testimage("hello", "1.0.0", &[])?;
    let big = fleet.path("big.elf");
    std::fs::copy(&img, &big)?;
    let f = std::fs::OpenOptions::new().append(true).open(&big)?;
    f.set_len(256 << 20)?; // zeros: one distinct 256 KiB chunk, repeated
    let out = Command::new("prlimit")
        .arg(format!("--data={}", 160u64 << 20))
        .arg("--")
        .arg(bin("hub")?)
        .arg("--dir")
        .arg(&fleet.hub_dir)
        .arg("publish")
        .arg(&big)
        .args(["--app", "hello", "--version", "1.0.0", "--no-staging"])
        .output()
        .context("running hub publish under prlimit (util-linux)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    let new_bytes: u64 = said
        .split_once("distinct, ")
        .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no count of new bytes in {said}"))?;
    assert!(new_bytes < 2 << 20, "{new_bytes} bytes new: {said}");

    // Above the hub's limit: refused, naming the setting.
    let hub_toml = fleet.hub_dir.join("hub.toml");
    let text = std::fs::read_to_string(&hub_toml)?;
    std::fs::write(
        &hub_toml,
        text.replace("max_image_mib = 1024", "max_image_mib = 100"),
    )?;
    let out = fleet
        .hub_cmd()?
        .arg("publish")
        .arg(&big)
        .args(["--app", "hello", "--version", "1.0.1", "--no-staging"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("above this hub's limit of 100 MiB") && err.contains("max_image_mib"),
        "{err}"
    );
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn bad_input_is_refused_and_nothing_is_half_written() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    let fails = |fleet: &Fleet, args: &[&str]| -> Result<String> {
        let out = fleet.hub_cmd()?.args(args).output()?;
        assert!(!out.status.success(), "hub {args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            err.lines().any(|l| l.starts_with("hub: ")),
            "one clear error line: {err}"
        );
        Ok(err)
    };
    let publish_fails = |fleet: &Fleet, image: &std::path::Path, version: &str| {
        let image = image.to_str().expect("temp paths are UTF-8");
        fails(
            fleet,
            &[
                "publish",
                image,
                "--app",
                "hello",
                "--version",
                version,
                "--no-staging",
            ],
        )
    };
    // No hub there: the error says which command makes one (it said `hub init DIR`,
    // which fails).
    let missing = fleet.path("no-hub-here");
    let out = Command::new(bin("hub")?)
        .arg("--dir")
        .arg(&missing)
        .arg("devices")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("hub --dir {} init", missing.display())),
        "{err}"
    );
    // Corrupt and unknown images.
    let junk = fleet.path("junk.img");
    std::fs::write(&junk, vec![0x42u8; 50_000])?;
    let err = publish_fails(&fleet, &junk, "1.0.0")?;
    assert!(err.contains("unrecognised image"), "{err}");
    let corrupt = fleet.path("corrupt.elf");
    std::fs::write(&corrupt, b"\x7fELF\x01\x01\x01\x00truncated")?;
    let err = publish_fails(&fleet, &corrupt, "1.0.0")?;
    assert!(err.contains("ELF"), "{err}");
    // `head -c 100` of a real image: its LOAD segment is larger than the file.
    let whole = fleet.testimage("hello", "0.9.0", &[])?;
    let cut = fleet.path("cut.elf");
    std::fs::write(&cut, &std::fs::read(&whole)?[..100])?;
    let err = publish_fails(&fleet, &cut, "1.0.0")?;
    assert!(
        err.contains("truncated") && err.contains("cut.elf"),
        "a truncated image is refused, naming the file: {err}"
    );
    // A directory, and a boot spec no device could boot, each named.
    let dir = fleet.path("");
    let err = publish_fails(&fleet, &dir, "1.0.0")?;
    assert!(err.contains("is a directory"), "{err}");
    let out = fleet
        .hub_cmd()?
        .arg("publish")
        .arg(&whole)
        .args(["--app", "hello", "--version", "1.0.0", "--no-staging"])
        .args(["--memory-mib", "0"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--memory-mib must be at least 1"), "{err}");
    assert!(
        !err.contains("staging skipped"),
        "refused before anything else: {err}"
    );

    // Broker unreachable at publish (no hub serve): stored, signed, announced later.
    let img = fleet.testimage("hello", "1.0.0", &[])?;
    let out = fleet
        .hub_cmd()?
        .arg("publish")
        .arg(&img)
        .args(["--app", "hello", "--version", "1.0.0", "--no-staging"])
        .output()?;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("will be announced when it starts"));

    // Version not above the current one.
    let err = publish_fails(&fleet, &img, "1.0.0")?;
    assert!(err.contains("is not above"), "{err}");
    // Missing release key, then a key the root does not know.
    let key = fleet.hub_dir.join("keys/release.key");
    let saved = std::fs::read(&key)?;
    std::fs::remove_file(&key)?;
    let v2 = fleet.testimage("hello", "2.0.0", &[])?;
    let err = publish_fails(&fleet, &v2, "2.0.0")?;
    assert!(err.contains("release.key"), "{err}");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key)?;
        f.write_all(proto::SecretKey::from_seed([0x55; 32]).to_text().as_bytes())?;
    }
    let err = publish_fails(&fleet, &v2, "2.0.0")?;
    assert!(
        err.contains("not one of the trust root's release keys") && err.contains("release.key"),
        "{err}"
    );
    std::fs::write(&key, saved)?;
    assert_eq!(
        fleet.releases(None)?.len(),
        1,
        "nothing half-written by the refusals"
    );

    // Now the hub starts: it announces what was stored while it was down.
    let metrics = format!("127.0.0.1:{}", free_port()?);
    fleet.start_hub(&["--metrics", &metrics])?;
    let d = fleet.add_device("bad0", "hello", &[])?;
    fleet.start_device(d)?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;

    // Garbage and forgeries on MQTT and libp2p are dropped and counted; the hub serves on.
    unifleet_tests::mqtt_publish(
        &fleet.mqtt,
        "unifleet/home/status/bad0",
        b"garbage".to_vec(),
        false,
    )?;
    let mut evil = Command::new(bin("evil_peer")?)
        .args(["home", &free_port()?.to_string(), &fleet.hub_addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(evil.stdout.take().unwrap()).read_line(&mut line)?;
    let _evil = Proc {
        child: evil,
        log: fleet.path("evil.log"),
    };
    wait_for("garbage to be counted", Duration::from_secs(20), || {
        let dropped = unifleet_tests::metric(&metrics, "unifleet_hub_status_dropped_total").ok()?;
        let rejected =
            unifleet_tests::metric(&metrics, "unifleet_hub_gossip_rejected_total").ok()?;
        (dropped >= 2 && rejected >= 2).then_some(())
    })?;
    let v2 = fleet.testimage("hello", "2.0.0", &[])?;
    fleet.publish(&v2, "hello", "2.0.0", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 2, "Active", CONVERGE)?;
    Ok(())
}

#[test]
fn rollback_resigns_the_old_image_as_a_newer_release() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device("rb0", "hello", &[])?;
    fleet.start_device(d)?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;
    let v2 = fleet.testimage("hello", "1.1.0", &[])?;
    fleet.publish(&v2, "hello", "1.1.0", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 2, "Active", CONVERGE)?;
    let said = run(fleet.hub_cmd()?.args(["rollback", "hello"]))?;
    assert!(said.contains("release 3"), "{said}");
    fleet.wait_all(&[d], "hello", 3, "Active", CONVERGE)?;
    let st = fleet.devices[d].state_json();
    let slot = st["apps"]["hello"]["current"]["slot"].as_str().unwrap();
    assert_eq!(
        std::fs::read(slot)?,
        std::fs::read(&v1)?,
        "release 3 is the 1.0.0 image"
    );
    assert_eq!(st["apps"]["hello"]["current"]["version"], "1.0.0");
    let log = run(fleet.hub_cmd()?.arg("log"))?;
    assert!(log.contains("rollback"), "{log}");
    Ok(())
}

#[test]
fn hub_log_follow_prints_new_events_as_they_are_committed() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let mut follow = fleet
        .hub_cmd()?
        .args(["log", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = follow.stdout.take().unwrap();
    let _follow = Proc {
        child: follow,
        log: fleet.path("follow.log"),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(10))?;
    assert!(first.contains(" init "), "{first}");
    let img = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&img, "hello", "1.0.0", &["--no-staging"])?;
    let next = rx.recv_timeout(Duration::from_secs(10))?;
    assert!(next.contains(" publish hello stable r1"), "{next}");
    Ok(())
}

/// The id `reference` names in the git repository `git_dir` (`None`: no such ref).
fn git_ref(git_dir: &std::path::Path, reference: &str) -> Option<String> {
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(git_dir)
        .args(["rev-parse", "--verify", "--quiet", reference])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Issue 32: a hub whose disk dies is built again on another machine from its mirror and
/// a copy of its keys, and goes on where it stopped: its history and event log are there,
/// release numbers are not reused, devices take its next release, and it keeps mirroring.
#[test]
fn a_hub_restored_from_its_mirror_goes_on_where_it_stopped() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    let mirror = fleet.path("mirror.git");
    run(Command::new("git")
        .args(["init", "--bare", "--quiet"])
        .arg(&mirror))?;
    // A mirror that cannot be pushed to is refused at once, with the next step.
    let out = fleet
        .hub_cmd()?
        .args(["mirror", "add"])
        .arg(fleet.path("nowhere.git"))
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("git init --bare"),
        "{said}"
    );
    run(fleet.hub_cmd()?.args(["mirror", "add"]).arg(&mirror))?;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    fleet.start_hub(&["--metrics", &metrics])?;
    let d = fleet.add_device("mir0", "hello", &[])?;
    fleet.start_device(d)?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;

    // The mirror follows every commit (the device's enrollment, the release, the events
    // of the hub's batches).
    let store = fleet.hub_dir.join("store.git");
    wait_for("the mirror to catch up", CONVERGE, || {
        let head = git_ref(&store, "HEAD")?;
        (git_ref(&mirror, "HEAD") == Some(head)).then_some(())
    })?;
    wait_for(
        "hub status to say the mirror is up to date",
        CONVERGE,
        || {
            let status = run(fleet.hub_cmd().ok()?.arg("status")).ok()?;
            let lag = unifleet_tests::metric(&metrics, "unifleet_hub_mirror_lag_seconds").ok()?;
            (status.contains("up to date, last pushed") && lag == 0).then_some(())
        },
    )?;

    // The disk dies; the operator kept a copy of keys/ apart.
    let keys = fleet.path("keys-copy");
    std::fs::create_dir_all(&keys)?;
    for entry in std::fs::read_dir(fleet.hub_dir.join("keys"))? {
        let entry = entry?;
        std::fs::copy(entry.path(), keys.join(entry.file_name()))?;
    }
    let config = std::fs::read_to_string(fleet.hub_dir.join("hub.toml"))?;
    let listen = |key: &str| -> Result<String> {
        let line = config
            .lines()
            .find(|l| l.starts_with(key))
            .context("listen address")?;
        Ok(line.split('"').nth(1).context("quoted")?.to_string())
    };
    let (mqtt, p2p) = (listen("mqtt_listen")?, listen("p2p_listen")?);
    fleet.kill_hub();
    std::fs::remove_dir_all(&fleet.hub_dir)?;

    let restore = || -> Result<Command> {
        let mut c = fleet.hub_cmd()?;
        c.arg("restore")
            .arg("--from")
            .arg(&mirror)
            .arg("--keys")
            .arg(&keys)
            .args([
                "--mqtt-listen",
                &mqtt,
                "--p2p-listen",
                &p2p,
                "--keep-mirroring",
            ]);
        Ok(c)
    };
    let said = run(&mut restore()?)?;
    assert!(said.contains("1 release(s)"), "{said}");
    let again = restore()?.output()?;
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && said.contains("is not empty"),
        "{said}"
    );

    fleet.start_hub(&[])?;
    let log = run(fleet.hub_cmd()?.arg("log"))?;
    assert!(
        log.contains("hub for fleet"),
        "the event log came back: {log}"
    );
    // The inventory is not mirrored: the device reports again to the new hub.
    wait_for("the device to report to the restored hub", CONVERGE, || {
        let inv = fleet.inventory().ok()?;
        inv.to_string().contains("mir0").then_some(())
    })?;
    let v2 = fleet.testimage("hello", "1.1.0", &[])?;
    let said = fleet.publish(&v2, "hello", "1.1.0", &["--no-staging"])?;
    assert!(
        said.contains("release 2"),
        "the number is not reused: {said}"
    );
    fleet.wait_all(&[d], "hello", 2, "Active", CONVERGE)?;
    let store = fleet.hub_dir.join("store.git");
    wait_for("the restored hub to mirror its release", CONVERGE, || {
        let head = git_ref(&store, "HEAD")?;
        (git_ref(&mirror, "HEAD") == Some(head)).then_some(())
    })?;
    Ok(())
}

/// Issue 32 (`hub promote` had no test): the newest beta release is signed again as the
/// next stable release, which stable devices take; promoting from a channel with nothing
/// on it is refused by name.
#[test]
fn hub_promote_resigns_the_beta_release_for_stable() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device("pro0", "hello", &[])?;
    fleet.start_device(d)?;
    let old = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&old, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;
    let img = fleet.testimage("hello", "2.0.0", &[])?;
    fleet.publish(
        &img,
        "hello",
        "2.0.0",
        &["--channel", "beta", "--no-staging"],
    )?;
    let said = run(fleet
        .hub_cmd()?
        .args(["promote", "hello", "--from", "beta", "--to", "stable"]))?;
    assert!(
        said.contains("promoted hello to stable release 2"),
        "{said}"
    );
    fleet.wait_all(&[d], "hello", 2, "Active", CONVERGE)?;
    fleet.assert_runs_image(d, &img);
    let out = fleet
        .hub_cmd()?
        .args(["promote", "hello", "--from", "nightly"])
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("nightly"), "{said}");
    Ok(())
}

/// Issue 31: `hub publish` of a named pipe nobody writes to waited forever (it opened
/// the file before looking at its type), and `/dev/zero` was called "empty". Both are
/// refused at once, by what they are.
#[test]
fn a_named_pipe_or_a_device_given_to_publish_is_refused_at_once() -> Result<()> {
    let fleet = Fleet::new("test:///default")?;
    let fifo = fleet.path("image.fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status()?.success());
    for (image, what) in [
        (fifo.as_path(), "is a named pipe"),
        (std::path::Path::new("/dev/zero"), "is a character device"),
    ] {
        let mut child = fleet
            .hub_cmd()?
            .args(["publish"])
            .arg(image)
            .args(["--app", "hello", "--version", "1.0.0", "--no-staging"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if std::time::Instant::now() > deadline {
                child.kill()?;
                anyhow::bail!("hub publish {} still waits after 30 s", image.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(what), "{err}");
    }
    assert!(fleet.releases(None)?.is_empty());
    Ok(())
}
