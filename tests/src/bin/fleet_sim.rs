//! `fleet-sim`: the deterministic fleet simulator (`unifleet_tests::sim`) from the command
//! line — the hub's tracker and the devices' fetch schedules over modelled links, at fleet
//! sizes no machine runs as processes.
//!
//!     cargo run --release -p unifleet-tests --bin fleet-sim -- --devices 10000 --image-mib 1
#![allow(clippy::print_stdout)]

use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};
use unifleet_tests::bench::{percentile, rate, MIB};
use unifleet_tests::sim::{run, Outcome, Scenario};

const HELP: &str = "fleet-sim: a release spreading through a simulated fleet (deterministic)

Options (rates in bytes per second; K, M suffixes are KiB, MiB):
  --devices N       devices at the start (default 1000)
  --image-mib F     image size in MiB, fractions allowed (default 1)
  --device-up R     each device's upload cap (default 48M / N, as bench_fleet)
  --device-down R   each device's download cap (default 4 x device-up)
  --hub-up R        the hub's upload cap (default 16M)
  --parallel K      chunks a device fetches at once (default 8)
  --latency-ms L    one-way latency of every message (default 10)
  --slow X          fraction of devices at a tenth of the device caps (default 0)
  --churn X         fraction of devices leaving mid-release, and as many joining (default 0)
  --frozen X        fraction of devices that freeze for good mid-release: connections
                    open, nothing answered, the hub not told (default 0)
  --crawling X      fraction of devices whose upload crawls at 1 KiB/s (default 0)
  --modes M         mesh,hub-only (default mesh)
  --seed S          the run's seed: chunk sizes, slow devices, churn (default 1)
  --timeline        print, per simulated second, the devices' upload in use (% of their
                    caps; counted when a transfer is admitted) and the askers parked at
                    the hub
";

fn main() -> Result<()> {
    let mut s = Scenario::new(1000, MIB);
    let (mut image_mib, mut up, mut down, mut modes) = (1.0, None, None, vec![true]);
    let mut timeline = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--help" || a == "-h" {
            print!("{HELP}");
            return Ok(());
        }
        if a == "--timeline" {
            timeline = true;
            continue;
        }
        let v = args
            .next()
            .with_context(|| format!("{a} needs a value\n\n{HELP}"))?;
        match a.as_str() {
            "--devices" => s.devices = v.parse().context("--devices")?,
            "--image-mib" => image_mib = v.parse().context("--image-mib")?,
            "--device-up" => up = Some(rate(&v)?),
            "--device-down" => down = Some(rate(&v)?),
            "--hub-up" => s.hub_up = rate(&v)?,
            "--parallel" => s.parallel = v.parse().context("--parallel")?,
            "--latency-ms" => s.latency = Duration::from_millis(v.parse().context("--latency-ms")?),
            "--slow" => s.slow = v.parse().context("--slow")?,
            "--churn" => s.churn = v.parse().context("--churn")?,
            "--frozen" => s.frozen = v.parse().context("--frozen")?,
            "--crawling" => s.crawling = v.parse().context("--crawling")?,
            "--seed" => s.seed = v.parse().context("--seed")?,
            "--modes" => {
                modes = v
                    .split(',')
                    .map(|m| match m {
                        "mesh" => Ok(true),
                        "hub-only" => Ok(false),
                        other => bail!("unknown mode {other}: mesh or hub-only"),
                    })
                    .collect::<Result<_>>()?
            }
            other => bail!("unknown option {other}\n\n{HELP}"),
        }
    }
    anyhow::ensure!(
        s.devices > 0 && image_mib > 0.0,
        "--devices and --image-mib must be positive"
    );
    s.image = (image_mib * MIB as f64) as u64;
    s.device_up = up.unwrap_or(48 * MIB / s.devices as u64);
    s.device_down = down.unwrap_or(4 * s.device_up);
    println!(
        "N = {} devices, {:.2} MiB image; caps: device up {}/s, down {}/s, hub up {}/s; {} in flight; latency {} ms; slow {:.0}%; churn {:.0}%; frozen {:.0}%; crawling {:.0}%; seed {}\n",
        s.devices,
        image_mib,
        human(s.device_up),
        human(s.device_down),
        human(s.hub_up),
        s.parallel,
        s.latency.as_millis(),
        s.slow * 100.0,
        s.churn * 100.0,
        s.frozen * 100.0,
        s.crawling * 100.0,
        s.seed
    );
    println!("| mode | last device | ÷ bound | ÷ one-copy bound | p50 / p99 | hub egress | requests per chunk (hub / peer / stored alone; stored riding on an ask to the hub) | connections per chunk | peer deadlines missed per chunk | unfinished (frozen) | simulated in |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for mesh in modes {
        s.mesh = mesh;
        let t = Instant::now();
        let o = run(&s);
        println!("{}", row(&o, mesh, t.elapsed()));
        if mesh {
            let p = |q| percentile(&o.peer_secs, q);
            eprintln!(
                "peer transfers, ask to answer: p50 {:.1} s, p90 {:.1} s, p99 {:.1} s, max {:.1} s",
                p(0.5),
                p(0.9),
                p(0.99),
                p(1.0)
            );
        }
        if timeline {
            for (t, (used, parked)) in o.timeline.iter().enumerate() {
                eprintln!("{t:>4} s  uploads {:>5.1}%  parked {parked}", used * 100.0);
            }
        }
        if o.unfinished > 0 {
            bail!(
                "{} devices did not finish: a stall in the protocol",
                o.unfinished
            );
        }
    }
    Ok(())
}

fn row(o: &Outcome, mesh: bool, took: Duration) -> String {
    let per = |n: u64| n as f64 / o.delivered.max(1) as f64;
    format!(
        "| {} | {:.1} s | {:.2} ({} {:.1} s) | {} | {:.1} / {:.1} s | {:.2}× | {:.2} ({:.2} / {:.2} / {:.2}; {:.2}) | {:.3} | {:.3} | {} ({}) | {:.1} s |",
        if mesh { "mesh" } else { "hub-only" },
        o.last(),
        o.last() / o.t_min,
        if mesh { "T_min" } else { "N·F/u_s" },
        o.t_min,
        if mesh {
            format!("{:.2}", o.last() / o.t_one_copy)
        } else {
            "—".into()
        },
        percentile(&o.completion, 0.5),
        percentile(&o.completion, 0.99),
        o.egress_copies(),
        o.requests_per_chunk(),
        per(o.hub_asks),
        per(o.peer_asks),
        per(o.stored_reports),
        per(o.carried),
        o.connections_per_chunk(),
        per(o.deadlines_missed),
        o.unfinished,
        o.frozen,
        took.as_secs_f64(),
    )
}

fn human(b: u64) -> String {
    if b >= MIB {
        format!("{:.2} MiB", b as f64 / MIB as f64)
    } else {
        format!("{:.0} KiB", b as f64 / 1024.0)
    }
}
