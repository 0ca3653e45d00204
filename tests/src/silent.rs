//! Holders that stop answering, on a real fleet: eight `device run` processes and a hub
//! fetch a 16 MiB release that shares nothing with the last, untouched, with the first
//! two holders frozen (SIGSTOP) mid-release, or with one device's upload at 1 KiB/s.
//! Used by the `silent_holders` test and the `bench_silent_holders` benchmark.

use crate::fleet::{run, toml_value::V, wait_for, Fleet};
use crate::metric;
use anyhow::{Context, Result};
use std::time::{Duration, Instant};

pub const DEVICES: usize = 8;
/// Caps that make the transfer, not the two cores, set the pace: the hub sends one copy in
/// 4 s, the devices' uploads carry the other seven in about 14 s.
const HUB_UP: u64 = 4 << 20;
const DEVICE_UP: u64 = 1 << 20;
const DEVICE_DOWN: u64 = 4 << 20;
const SLOW_UP: u64 = 1024;
const LONG: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trouble {
    None,
    /// The two devices with the most bytes from the hub are stopped (SIGSTOP) once the
    /// fleet is a quarter through, and continued (SIGCONT) when the others are done.
    Freeze,
    /// Device 0 uploads at 1 KiB/s from the start.
    SlowHolder,
}

/// What one fleet's release took.
#[derive(Debug)]
pub struct Run {
    /// Seconds from publish to the last untroubled device active.
    pub others: f64,
    /// The devices frozen or slow.
    pub troubled: Vec<usize>,
    /// Hub bytes served for the release, as copies of the image.
    pub hub_copies: f64,
    /// Holders the devices' "missed" reports made suspect at the hub.
    pub suspected: u64,
}

fn fleet(trouble: Trouble) -> Result<(Fleet, Vec<usize>, String)> {
    let metrics = format!("127.0.0.1:{}", crate::free_port()?);
    let mut fleet = Fleet::new("test:///default")?;
    fleet.start_hub(&["--upload-rate", &HUB_UP.to_string(), "--metrics", &metrics])?;
    let mut all = vec![];
    for n in 0..DEVICES {
        let i = fleet.add_device(&format!("s{n}"), "hello", &[])?;
        let up = match trouble {
            Trouble::SlowHolder if n == 0 => SLOW_UP,
            _ => DEVICE_UP,
        };
        let d = &fleet.devices[i];
        d.set_config("upload_rate", V::Int(up))?;
        d.set_config("download_rate", V::Int(DEVICE_DOWN))?;
        fleet.start_device(i)?;
        all.push(i);
    }
    // Release 1 is the bare kernel: release 2's 16 MiB share nothing with it.
    let v1 = fleet.testimage("hello", "1.0.0", &[])?;
    fleet.publish(&v1, "hello", "1.0.0", &["--no-staging"])?;
    fleet.wait_all(&all, "hello", 1, "Active", LONG)?;
    Ok((fleet, all, metrics))
}

fn percent(fleet: &Fleet, i: usize) -> u64 {
    let r = fleet.devices[i].report("hello").unwrap_or_default();
    match r["release"].as_u64() {
        Some(2) => r["state"]["Downloading"]["percent"].as_u64().unwrap_or(100),
        _ => 0,
    }
}

/// One fleet, one release of 16 MiB under `trouble`.
pub fn release(trouble: Trouble) -> Result<Run> {
    let (fleet, all, metrics) = fleet(trouble)?;
    let v2 = fleet.testimage("hello", "2.0.0", &["--pad-mib", "16"])?;
    let served_before = metric(&metrics, "unifleet_hub_blob_bytes_served_total")?;
    let t = Instant::now();
    fleet.publish(&v2, "hello", "2.0.0", &["--no-staging"])?;
    let mut troubled = vec![];
    if trouble == Trouble::Freeze {
        // A quarter through: the two devices that got the most from the hub hold the
        // most first copies.
        wait_for("the fleet a quarter through", LONG, || {
            let sum: u64 = all.iter().map(|&i| percent(&fleet, i)).sum();
            (sum >= 25 * DEVICES as u64).then_some(())
        })?;
        let mut by_hub: Vec<(u64, usize)> = all
            .iter()
            .map(|&i| (fleet.devices[i].fetched("hello").1, i))
            .collect();
        by_hub.sort();
        troubled = by_hub.iter().rev().take(2).map(|&(_, i)| i).collect();
        for &i in &troubled {
            signal(&fleet, i, "STOP")?;
            eprintln!(
                "froze {} at {:.1} s, {}% through",
                fleet.devices[i].name,
                t.elapsed().as_secs_f64(),
                percent(&fleet, i)
            );
        }
    } else if trouble == Trouble::SlowHolder {
        troubled = vec![all[0]];
    }
    let others: Vec<usize> = all
        .iter()
        .copied()
        .filter(|i| !troubled.contains(i))
        .collect();
    let done = fleet.wait_all(&others, "hello", 2, "Active", LONG);
    let others_s = t.elapsed().as_secs_f64();
    if trouble == Trouble::Freeze {
        for &i in &troubled {
            signal(&fleet, i, "CONT")?;
        }
    }
    done?;
    // The troubled ones finish too (the frozen once continued).
    fleet
        .wait_all(&troubled, "hello", 2, "Active", LONG)
        .context("the troubled devices after the others")?;
    let served = metric(&metrics, "unifleet_hub_blob_bytes_served_total")? - served_before;
    let image = std::fs::metadata(&v2)?.len();
    Ok(Run {
        others: others_s,
        troubled,
        hub_copies: served as f64 / image as f64,
        suspected: metric(&metrics, "unifleet_hub_holders_suspected_total")?,
    })
}

fn signal(fleet: &Fleet, i: usize, sig: &str) -> Result<()> {
    let pid = fleet.devices[i]
        .proc
        .as_ref()
        .context("device not running")?
        .child
        .id();
    run(std::process::Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]))?;
    Ok(())
}
