//! The device agent end to end. One hub and several devices as real processes on
//! loopback, with the hub's embedded broker, libp2p, and libvirt's test driver.

use anyhow::Result;
use std::time::Duration;
use unifleet_tests::fleet::{running_fleet, Fleet};

const CONVERGE: Duration = Duration::from_secs(60);

#[test]
fn five_devices_converge_on_v1_then_v2_and_v2_costs_only_the_delta() -> Result<()> {
    let metrics = format!("127.0.0.1:{}", unifleet_tests::free_port()?);
    let (fleet, all) = running_fleet("test:///default", &["--metrics", &metrics], "d", 5, &[])?;
    let v1 = fleet.testimage("hello", "1.0.0", &["--pad-mib", "16"])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&all, "hello", 1, "Active", CONVERGE)?;
    // Peer exchange: the hub sent about one copy of the image (hub-only: five); the rest
    // came from peers. Under 2 copies: the tracker sends a chunk again when nobody reported
    // it stored within 10 s, which a loaded CI machine reaches (1.43 copies seen once while
    // other tests published 256 MiB beside this one); the copies at scale are counted in
    // BENCHMARKS.md's fleet benchmark.
    let size = std::fs::metadata(&v1)?.len();
    let from_hub: u64 = all.iter().map(|&i| hub_bytes(&fleet, i)).sum();
    assert!(
        from_hub < 2 * size,
        "the hub sent {from_hub} bytes of a {size}-byte image to 5 devices"
    );
    // Each chunk's "stored" report rides on the device's next ask: about one request a
    // chunk reaches the hub, not an ask and a report (at least 2 requests a report).
    let page = unifleet_tests::metrics_page(&metrics)?;
    let requests = unifleet_tests::metric_in(&page, "unifleet_hub_blob_requests_received_total")?;
    let reports = unifleet_tests::metric_in(&page, "unifleet_hub_stored_reports_total")?;
    eprintln!("the hub received {requests} requests for {reports} stored reports");
    assert!(
        reports >= 2 * (size >> 16) && requests * 2 < reports * 3,
        "the hub received {requests} requests for {reports} stored reports"
    );
    let before: Vec<u64> = all.iter().map(|&i| total_bytes(&fleet, i)).collect();

    let v2 = fleet.testimage("hello", "1.0.1", &["--pad-mib", "16"])?;
    fleet.publish(&v2, "hello", "1.0.1", &["--no-staging"])?;
    fleet.wait_all(&all, "hello", 2, "Active", CONVERGE)?;

    // (i) v2 shares all but ~1 chunk with v1: each device fetched at most 3% of it.
    let image = std::fs::metadata(&v2)?.len();
    for (k, &i) in all.iter().enumerate() {
        let fetched = total_bytes(&fleet, i) - before[k];
        assert!(
            fetched * 100 <= image * 3,
            "{} fetched {fetched} bytes for a {image}-byte image",
            fleet.devices[i].name
        );
    }
    // The hub's inventory agrees, from the devices' signed reports (which reach it a
    // moment after the devices wrote them locally).
    unifleet_tests::fleet::wait_for(
        "the hub's inventory to show release 2 everywhere",
        CONVERGE,
        || {
            let inv = fleet.inventory().ok()?;
            all.iter()
                .all(|&i| {
                    let e = &inv[format!("{}/hello", fleet.devices[i].name)];
                    e["release"] == 2 && e["state"] == "active"
                })
                .then_some(())
        },
    )?;
    Ok(())
}

fn hub_bytes(fleet: &Fleet, i: usize) -> u64 {
    fleet.devices[i].fetched("hello").1
}

#[test]
fn with_peer_exchange_off_every_device_downloads_from_the_hub() -> Result<()> {
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let all: Vec<usize> = (0..3)
        .map(|i| fleet.add_device(&format!("h{i}"), "hello", &[]))
        .collect::<Result<_>>()?;
    for &i in &all {
        fleet.devices[i].set_config(
            "peer_exchange",
            unifleet_tests::fleet::toml_value::V::Bool(false),
        )?;
        fleet.start_device(i)?;
    }
    let v1 = fleet.testimage("hello", "1.0.0", &["--pad-mib", "4"])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&all, "hello", 1, "Active", CONVERGE)?;
    let size = std::fs::metadata(&v1)?.len();
    for &i in &all {
        let r = fleet.devices[i].report("hello").unwrap_or_default();
        assert_eq!(r["bytes_from_peers"], 0, "{r}");
        assert!(hub_bytes(&fleet, i) >= size, "{r}");
    }
    Ok(())
}

fn total_bytes(fleet: &Fleet, i: usize) -> u64 {
    let (peers, hub) = fleet.devices[i].fetched("hello");
    peers + hub
}

/// Issue 32: a device's `download_rate` holds end to end — over the whole download, the
/// bytes stored never run ahead of the cap by more than 10% plus the limiter's burst (a
/// tenth of a second, at least one largest chunk). Only the upper bound is asserted: a
/// slow machine makes the download slower, never faster.
#[test]
fn a_download_cap_holds_within_ten_percent() -> Result<()> {
    use unifleet_tests::fleet::toml_value::V;
    const RATE: u64 = 1 << 20;
    const BURST: u64 = 256 * 1024;
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&[])?;
    let d = fleet.add_device("cap0", "hello", &[])?;
    fleet.devices[d].set_config("download_rate", V::Int(RATE))?;
    fleet.start_device(d)?;
    let image = fleet.testimage("hello", "1.0.0", &["--pad-mib", "4"])?;
    fleet.publish(&image, "hello", "1.0.0", &["--no-staging"])?;
    // Sampled every 20 ms: the first bytes seen, then each later sample against the cap.
    let dev = &fleet.devices[d];
    let deadline = std::time::Instant::now() + CONVERGE;
    let first = loop {
        let b = dev.chunk_bytes();
        if b > 0 {
            break (std::time::Instant::now(), b);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no download began");
        std::thread::sleep(Duration::from_millis(20));
    };
    let size = std::fs::metadata(&image)?.len();
    let mut worst = 0.0f64;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let (now, b) = (std::time::Instant::now(), dev.chunk_bytes());
        let secs = (now - first.0).as_secs_f64();
        let allowed = 1.10 * RATE as f64 * secs + BURST as f64;
        let ran = b.saturating_sub(first.1) as f64;
        worst = worst.max(ran / allowed);
        assert!(
            ran <= allowed,
            "{ran} bytes in {secs:.2} s at a cap of {RATE} B/s (+10%, +{BURST} B burst)"
        );
        // Done when the device stored it all (its chunks are distinct: padding differs).
        if b >= size {
            eprintln!(
                "{ran} bytes in {secs:.2} s: {:.0}% of the cap",
                ran / secs / RATE as f64 * 100.0
            );
            break;
        }
        anyhow::ensure!(
            now < deadline,
            "the download did not end: {b} of {size} bytes"
        );
    }
    fleet.wait_all(&[d], "hello", 1, "Active", CONVERGE)?;
    assert!(worst > 0.0);
    Ok(())
}
