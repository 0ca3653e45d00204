//! On-demand benchmark: scale from zero through the front proxy, under `qemu:///system`
//! (libvirtd must run: `scripts/setup.sh`). Build in release mode first:
//!
//!     cargo build --release --workspace --bins
//!     ./target/release/bench_ondemand [COLD_STARTS]
//!
//! For each cold start (default 30): with zero instances, a client connects, sends a line
//! and waits for the instance's answer. The proxy and control overhead is that first-byte
//! latency minus the instance's own boot-to-healthy time, which the pool measures (domain
//! creation to the READY banner) and exports in the agent's metrics. Then the client
//! closes, and the time until the agent has stopped its last instance, and until libvirt
//! lists none (QEMU torn down), is measured against `idle_secs + 1 s`.
#![allow(clippy::print_stdout)]

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use unifleet_tests::bench::percentile;
use unifleet_tests::fleet::{on_demand_fleet, running_domains, wait_for};
use unifleet_tests::metric;

const URI: &str = "qemu:///system";
const IDLE_SECS: u64 = 1;

fn main() -> Result<()> {
    let cold_starts: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("COLD_STARTS must be a number")?
        .unwrap_or(30);
    let name = format!("bod-{}", std::process::id());
    let (fleet, d, port) = on_demand_fleet(
        URI,
        &name,
        &format!("min = 0\nmax_local = 1\nidle_secs = {IDLE_SECS}\nstable_window_secs = 1\npanic_window_secs = 1"),
    )?;
    let metrics = fleet.devices[d].metrics_addr().context("metrics address")?;

    let prefix = format!("uf-{name}-hello-od");
    let zero = || running_domains(URI, &prefix).is_empty().then_some(());
    let (mut overhead, mut first_byte, mut boot) = (vec![], vec![], vec![]);
    let (mut decided, mut to_zero) = (vec![], vec![]);
    for k in 0..cold_starts {
        wait_for("zero instances", Duration::from_secs(30), zero)?;
        let boot_ms = metric(&metrics, "unifleet_device_ondemand_boot_milliseconds_total")?;
        let t = Instant::now();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.write_all(b"hi\n")?;
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte)
            .with_context(|| format!("cold start {k}: no answer"))?;
        let first = t.elapsed().as_secs_f64() * 1e3;
        let booted =
            metric(&metrics, "unifleet_device_ondemand_boot_milliseconds_total")? - boot_ms;
        drop(s);
        let closed = Instant::now();
        wait_for(
            "the agent to scale to zero",
            Duration::from_secs(30),
            || {
                std::thread::sleep(Duration::from_millis(10));
                (metric(&metrics, "unifleet_device_ondemand_local_instances").ok()? == 0)
                    .then_some(())
            },
        )?;
        decided.push(closed.elapsed().as_secs_f64());
        wait_for("zero instances", Duration::from_secs(30), || {
            std::thread::sleep(Duration::from_millis(10));
            zero()
        })?;
        to_zero.push(closed.elapsed().as_secs_f64());
        first_byte.push(first);
        boot.push(booted as f64);
        overhead.push(first - booted as f64);
    }
    let n = cold_starts;
    println!(
        "| scale from zero: first byte minus boot-to-healthy, {n} cold starts | p50 {:.1} ms, p99 {:.1} ms | first byte p50 {:.0} ms; boot-to-healthy p50 {:.0} ms | — | ≤ 5 ms p50 |",
        percentile(&overhead, 0.5),
        percentile(&overhead, 0.99),
        percentile(&first_byte, 0.5),
        percentile(&boot, 0.5),
    );
    for (what, v) in [
        ("agent stops its last instance", &decided),
        ("libvirt lists no instance", &to_zero),
    ] {
        println!(
            "| load stop to zero (idle_secs = {IDLE_SECS}): {what}, {n} runs | p50 {:.2} s, max {:.2} s | idle + 1 s = {} s | {:.2}× | ≤ idle + 1 s |",
            percentile(v, 0.5),
            percentile(v, 1.0),
            IDLE_SECS + 1,
            percentile(v, 0.5) / (IDLE_SECS + 1) as f64,
        );
    }
    Ok(())
}
