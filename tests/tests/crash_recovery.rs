//! kill -9 of the agent during download and during install
//! (several points) → after a restart the device converges, without refetching verified
//! chunks and never running a partial image.

use anyhow::Result;
use std::time::Duration;
use unifleet_tests::fleet::{toml_value::V, wait_for, Fleet};

const CONVERGE: Duration = Duration::from_secs(60);

#[test]
fn kill_at_each_install_step_then_restart_converges_without_refetching() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let points = ["download:3", "assembled", "installed"];
    let devs: Vec<usize> = points
        .iter()
        .enumerate()
        .map(|(k, _)| fleet.add_device(&format!("k{k}"), "hello", &[]))
        .collect::<Result<_>>()?;
    for (&i, point) in devs.iter().zip(points) {
        fleet.devices[i].set_config("crash_at", V::Str(point.into()))?;
        // One chunk at a time, so "after 3 chunks" means exactly that.
        fleet.devices[i].set_config("parallel_fetches", V::Int(1))?;
        fleet.start_device(i)?;
    }
    let image = fleet.testimage("hello", "1.0.0", &["--pad-mib", "8"])?;
    fleet.publish(&image, "hello", "1.0.0", &["--no-staging"])?;
    let size = std::fs::metadata(&image)?.len();

    for (&i, point) in devs.iter().zip(points) {
        wait_for(
            &format!("{} to die at {point}", fleet.devices[i].name),
            CONVERGE,
            || (!fleet.devices[i].proc.as_mut()?.is_running()).then_some(()),
        )?;
        let kept = fleet.devices[i].chunk_bytes();
        let st = fleet.devices[i].state_json();
        match point {
            "download:3" => assert!(kept > 0 && kept < size, "{kept} of {size} bytes kept"),
            "assembled" => assert!(
                st["apps"]["hello"]["pending"].is_null(),
                "nothing installed yet: {st}"
            ),
            "installed" => assert_eq!(st["apps"]["hello"]["pending"]["release"], 1, "{st}"),
            _ => unreachable!(),
        }
        // Nothing is running from a partial image: no current release yet.
        assert!(st["apps"]["hello"]["current"].is_null(), "{st}");
        fleet.devices[i].set_config("crash_at", V::Remove)?;
        fleet.start_device(i)?;
        fleet.wait_all(&[i], "hello", 1, "Active", CONVERGE)?;
        fleet.assert_runs_image(i, &image);
        // After the restart only what was missing was fetched (plus nothing else: the
        // manifest was stored before the first chunk).
        let (peers, hub) = fleet.devices[i].fetched("hello");
        let refetched = peers + hub;
        assert!(
            refetched <= size - kept,
            "{point}: fetched {refetched} bytes after restart with {kept} of {size} already verified"
        );
    }
    Ok(())
}

#[test]
fn random_kill9_during_download_never_refetches_or_runs_a_partial_image() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    let metrics = format!("127.0.0.1:{}", unifleet_tests::free_port()?);
    fleet.start_hub(&["--metrics", &metrics])?;
    let d = fleet.add_device("rk", "hello", &[])?;
    // ~16 MiB at 8 MB/s: about two seconds of download to interrupt.
    fleet.devices[d].set_config("download_rate", V::Int(8_000_000))?;
    let image = fleet.testimage("hello", "1.0.0", &["--pad-mib", "16"])?;
    fleet.publish(&image, "hello", "1.0.0", &["--no-staging"])?;
    let size = std::fs::metadata(&image)?.len();
    let kills = 5u64;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D ^ u64::from(std::process::id());
    for _ in 0..kills {
        fleet.start_device(d)?;
        // A pseudo-random moment, 50–650 ms in: this is where the kill lands, not a wait
        // for anything to happen.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(50 + x % 600));
        fleet.devices[d].proc.as_mut().unwrap().kill9();
        let st = fleet.devices[d].state_json();
        if !st["apps"]["hello"]["current"].is_null() {
            fleet.assert_runs_image(d, &image);
        }
    }
    fleet.start_device(d)?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;
    fleet.assert_runs_image(d, &image);
    // Every byte the hub served, over all runs: the image once, plus at most the chunks
    // that were in flight at each kill (4 parallel fetches of at most 256 KiB) and the
    // manifest each time.
    let served = unifleet_tests::metric(&metrics, "unifleet_hub_blob_bytes_served_total")?;
    let slack = (kills + 1) * (4 * 256 * 1024 + 64 * 1024);
    assert!(
        served <= size + slack,
        "hub served {served} bytes for a {size}-byte image over {kills} kills"
    );
    Ok(())
}

/// A failed update (here: the chunk store unwritable, as with a full or broken disk) is
/// reported, and tried again until it succeeds once the trouble is gone.
#[test]
fn a_failed_update_is_tried_again_until_it_succeeds() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device("retry", "hello", &[])?;
    fleet.start_device(d)?;
    let chunks = fleet.devices[d].dir.join("state/chunks");
    wait_for("the agent's store", CONVERGE, || {
        chunks.is_dir().then_some(())
    })?;
    std::fs::remove_dir_all(&chunks)?;
    std::fs::write(&chunks, b"not a directory")?;
    let image = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&image, "hello", "1.0.0", &["--no-staging"])?;
    wait_for("the failure to be reported", CONVERGE, || {
        // Nothing runs yet: the report says so (no release), with the reason.
        let (running, reason) = fleet.devices[d].failure("hello")?;
        (reason.contains("update to release 1") && running.is_none()).then_some(())
    })?;
    std::fs::remove_file(&chunks)?;
    std::fs::create_dir(&chunks)?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;
    assert!(fleet.devices[d]
        .log_text()
        .contains("trying the update again"));
    fleet.assert_runs_image(d, &image);
    Ok(())
}

/// Unmounts (lazily: the agent may still hold files) when dropped, even if the test fails.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(at)?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "mounting a {size} tmpfs at {} (this test needs root, as CI has): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A release larger than the disk is refused as "No space left" before its chunks are
/// fetched (or, where the free space misjudged it, fails with ENOSPC); what it left (its
/// manifest, the chunk being written, the chunks that fitted) is removed, the device
/// reports the release it still runs, and a later, smaller release installs. (It kept everything, so every later
/// update failed with the disk full until a restart, and `device status` said
/// "Installing" because not even `status.json` could be written.)
#[test]
fn a_full_disk_recovers_by_itself_and_reports_the_release_it_runs() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device("full", "hello", &[])?;
    let _disk = Tmpfs::mount(&fleet.devices[d].dir.join("state"), "1m")?;
    fleet.start_device(d)?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;

    let big = fleet.testimage("hello", "1.0.1", &["--pad-mib", "2"])?;
    fleet.publish(&big, "hello", "1.0.1", &["--no-staging"])?;
    wait_for("the full disk to be reported", CONVERGE, || {
        let (running, reason) = fleet.devices[d].failure("hello")?;
        (running == Some(1)).then_some(reason)
    })
    .map(|reason| {
        assert!(
            reason.contains("update to release 2") && reason.contains("No space left"),
            "{reason}"
        )
    })?;
    let log = fleet.devices[d].log_text();
    assert!(
        log.contains("removed chunks and manifests no kept release needs"),
        "{log}"
    );

    let v3 = fleet.testimage("hello", "1.0.2", &[])?;
    fleet.publish(&v3, "hello", "1.0.2", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 3, "Active", CONVERGE)?;
    fleet.assert_runs_image(d, &v3);
    let st = fleet.devices[d].state_json();
    assert_eq!(st["apps"]["hello"]["previous"]["release"], 1, "{st}");
    Ok(())
}

/// A stored chunk whose bytes went bad is not trusted: assembly finds it, removes it, and
/// the next attempt fetches it again. (`has_chunk` trusted any file by its name, so the
/// damaged chunk failed assembly on every retry.)
#[test]
fn a_damaged_stored_chunk_is_fetched_again() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device("damaged", "hello", &[])?;
    fleet.start_device(d)?;
    // Both versions carry the same 2 MiB payload: release 2 reuses release 1's chunks.
    let v1 = fleet.testimage("hello", "1.0.0", &["--pad-mib", "2"])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;
    let chunks = fleet.devices[d].dir.join("state/chunks");
    let mut damaged = 0;
    for e in std::fs::read_dir(&chunks)?.flatten() {
        let mut bytes = std::fs::read(e.path())?;
        if bytes.len() > 1000 {
            bytes[500] ^= 0xFF;
            std::fs::write(e.path(), bytes)?;
            damaged += 1;
        }
    }
    assert!(damaged > 0);
    let v2 = fleet.testimage("hello", "1.0.1", &["--pad-mib", "2"])?;
    fleet.publish(&v2, "hello", "1.0.1", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 2, "Active", CONVERGE)?;
    fleet.assert_runs_image(d, &v2);
    let log = fleet.devices[d].log_text();
    assert!(
        log.contains("stored chunk is damaged; removing it"),
        "{log}"
    );
    Ok(())
}

/// SIGTERM (systemd's stop) to `device run` in the middle of a download and to `hub serve`:
/// each stops its tasks in order and exits 0; the device keeps what it verified and goes on
/// from there at its next start. (The agent aborted its tasks wherever they were; the hub
/// aborted its broker task.)
#[test]
fn sigterm_stops_agent_and_hub_in_order_and_exits_0() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device("term", "hello", &[])?;
    fleet.devices[d].set_config("download_rate", V::Int(512 * 1024))?;
    fleet.devices[d].set_config("parallel_fetches", V::Int(1))?;
    fleet.start_device(d)?;
    let image = fleet.testimage("hello", "1.0.0", &["--pad-mib", "6"])?;
    fleet.publish(&image, "hello", "1.0.0", &["--no-staging"])?;
    let size = std::fs::metadata(&image)?.len();
    wait_for("a part of the download", CONVERGE, || {
        (fleet.devices[d].chunk_bytes() > 1 << 20).then_some(())
    })?;
    let mut agent = fleet.devices[d].proc.take().expect("running");
    let status = agent.terminate(Duration::from_secs(10))?;
    let log = agent.log_text();
    assert!(status.success(), "{status}: {log}");
    assert!(
        log.contains("shutting down: the download is left where it is") && log.contains("stopped"),
        "{log}"
    );
    let kept = fleet.devices[d].chunk_bytes();
    assert!(kept > 0 && kept < size, "{kept} of {size} bytes kept");
    drop(agent);

    fleet.devices[d].set_config("download_rate", V::Int(0))?;
    fleet.start_device(d)?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;
    fleet.assert_runs_image(d, &image);
    let (peers, hub) = fleet.devices[d].fetched("hello");
    assert!(
        peers + hub <= size - kept,
        "fetched {} after keeping {kept}",
        peers + hub
    );

    let mut hub = fleet.hub.take().expect("hub running");
    let status = hub.terminate(Duration::from_secs(20))?;
    let log = hub.log_text();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("stopped"), "{log}");
    // What the hub accepted before the signal is in git.
    let events = unifleet_tests::fleet::run(fleet.hub_cmd()?.args(["log", "--json"]))?;
    assert!(events.contains("device-active"), "{events}");
    Ok(())
}

/// A release larger than the store budget is refused before anything is fetched, with the
/// setting named; the device keeps running what it has, does not try it again, and takes
/// the next release that fits.
#[test]
fn a_release_over_the_store_budget_is_refused_and_the_next_that_fits_installs() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device("budget", "hello", &[])?;
    fleet.devices[d].set_config("store_budget_mib", V::Int(1))?;
    fleet.start_device(d)?;
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;
    let big = fleet.testimage("hello", "1.0.1", &["--pad-mib", "2"])?;
    fleet.publish(&big, "hello", "1.0.1", &["--no-staging"])?;
    let reason = wait_for("the refusal to be reported", CONVERGE, || {
        let (running, reason) = fleet.devices[d].failure("hello")?;
        (running == Some(1)).then_some(reason)
    })?;
    assert!(reason.contains("store_budget_mib = 1"), "{reason}");
    assert!(
        fleet.devices[d].chunk_bytes() < 1 << 20,
        "nothing of it was fetched"
    );
    let v3 = fleet.testimage("hello", "1.0.2", &[])?;
    fleet.publish(&v3, "hello", "1.0.2", &["--no-staging"])?;
    fleet.wait_all(&[d], "hello", 3, "Active", CONVERGE)?;
    let log = fleet.devices[d].log_text();
    assert_eq!(
        log.matches("above store_budget_mib").count(),
        1,
        "refused once: {log}"
    );
    Ok(())
}
