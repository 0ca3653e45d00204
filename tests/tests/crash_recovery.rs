//! kill -9 of the agent during download and during install
//! (several points) → after a restart the device converges, without refetching verified
//! chunks and never running a partial image.

use anyhow::Result;
use std::time::Duration;
use unifleet_tests::fleet::{toml_value::V, wait_for, Fleet};

const CONVERGE: Duration = Duration::from_secs(60);

fn stored_chunk_bytes(fleet: &Fleet, i: usize) -> u64 {
    std::fs::read_dir(fleet.devices[i].dir.join("state/chunks"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

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
        let kept = stored_chunk_bytes(&fleet, i);
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
        (fleet.devices[d].release_state("hello")?.1 == "Failed").then_some(())
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
