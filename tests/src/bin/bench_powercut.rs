//! Power cuts during `hub publish` (issue 32): `hub init`, then publishes killed at random
//! points (every third let finish), each followed by a cut that drops every byte not
//! synced (`tests::lazyfs`, FUSE: run as root), then the store checked (see
//! `tests::powercut`). Prints the campaign's counts and every loss found.
//!
//!     cargo build --release --workspace --bins
//!     ./target/release/bench_powercut [--cuts 200] [--seed N] [--hub PATH] [--sync-init yes]
//!
//! `--hub` runs another build's `hub` (an older one, to see what the campaign finds
//! there); `--sync-init yes` syncs the new home before the first cut (an older `hub init`
//! loses it otherwise, and then every cut reports the same loss). Exits 1 if anything was
//! lost.
#![allow(clippy::print_stdout)]

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

fn main() -> Result<()> {
    let mut cuts = 200;
    let mut seed = 0x5eed_cafe_u64;
    let mut hub = unifleet_tests::bin("hub")?;
    let mut sync_init = false;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        match pair {
            [flag, n] if flag == "--cuts" => cuts = n.parse().context("--cuts")?,
            [flag, n] if flag == "--seed" => seed = n.parse().context("--seed")?,
            [flag, p] if flag == "--hub" => hub = PathBuf::from(p),
            [flag, y] if flag == "--sync-init" => sync_init = y == "yes",
            _ => {
                bail!("usage: bench_powercut [--cuts N] [--seed N] [--hub PATH] [--sync-init yes]")
            }
        }
    }
    let dir = tempfile::tempdir()?;
    let began = std::time::Instant::now();
    let opts = unifleet_tests::powercut::Options {
        hub: &hub,
        cuts,
        seed,
        sync_init,
    };
    let c = unifleet_tests::powercut::campaign(dir.path(), &opts)?;
    println!(
        "bench_powercut: {} cuts ({} during a publish, {} after one acknowledged), {} dropped \
         unsynced data; uncut publish {} ms; {:.0} s; hub {}",
        c.cuts,
        c.interrupted,
        c.acknowledged,
        c.cuts_losing_data,
        c.publish_ms,
        began.elapsed().as_secs_f64(),
        hub.display()
    );
    println!("losses: {}", c.losses.len());
    for l in &c.losses {
        println!("  {l}");
    }
    if !c.losses.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
