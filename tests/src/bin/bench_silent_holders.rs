//! Silent holders benchmark (issue 27): eight real devices fetch a 16 MiB release that
//! shares nothing with the last — untouched, with the first two holders frozen (SIGSTOP)
//! mid-release, and with one holder's upload at 1 KiB/s — K times each, interleaved, so
//! every kind sees the machine's load alike (`unifleet_tests::silent`). Build first:
//!
//!     cargo build --release --workspace --bins
//!     ./target/release/bench_silent_holders [RUNS]
//!
//! Prints each run and a table of medians: the seconds until the last untroubled device
//! is active, its ratio to the untouched fleet's median, the hub's copies of the image
//! and the asks that reported a holder silent.
#![allow(clippy::print_stdout)]

use anyhow::{Context, Result};
use unifleet_tests::bench::percentile;
use unifleet_tests::silent::{release, Run, Trouble};

fn main() -> Result<()> {
    let arg = std::env::args().nth(1);
    if arg.as_deref().is_some_and(|a| a == "--help" || a == "-h") {
        println!(
            "bench_silent_holders [RUNS]: RUNS rounds of untouched, frozen and slow (default 3)"
        );
        return Ok(());
    }
    let runs: usize = arg
        .map(|a| a.parse())
        .transpose()
        .context("RUNS must be a number (see --help)")?
        .unwrap_or(3);
    let kinds = [
        ("untouched", Trouble::None),
        ("two first holders frozen", Trouble::Freeze),
        ("one holder at 1 KiB/s", Trouble::SlowHolder),
    ];
    let mut results: Vec<Vec<Run>> = kinds.iter().map(|_| vec![]).collect();
    for round in 1..=runs {
        for (k, (name, trouble)) in kinds.iter().enumerate() {
            let r = release(*trouble).with_context(|| format!("{name}, run {round}"))?;
            println!(
                "run {round}: {name}: others done in {:.1} s, hub {:.2} copies, {} holders suspected",
                r.others, r.hub_copies, r.suspected
            );
            results[k].push(r);
        }
    }
    let median =
        |rs: &[Run], f: fn(&Run) -> f64| percentile(&rs.iter().map(f).collect::<Vec<_>>(), 0.5);
    let calm = median(&results[0], |r| r.others);
    println!("\n| fleet of 8, 16 MiB | others done (runs) | median | ÷ untouched | hub copies | holders suspected |");
    println!("|---|---|---|---|---|---|");
    for ((name, _), rs) in kinds.iter().zip(&results) {
        let each: Vec<String> = rs.iter().map(|r| format!("{:.1}", r.others)).collect();
        let m = median(rs, |r| r.others);
        println!(
            "| {name} | {} s | {m:.1} s | {:.2} | {:.2} | {} |",
            each.join(", "),
            m / calm,
            median(rs, |r| r.hub_copies),
            median(rs, |r| r.suspected as f64)
        );
    }
    Ok(())
}
