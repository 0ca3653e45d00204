//! The hub's hot paths against the size of its history: a store with `--releases`
//! releases and `--events` events (spread over a year of day files) against an empty one,
//! in the same run. Measures what `hub serve` does on its loop — the re-announcement's
//! look at the store (every 5 s), the same look after a publish, committing a batch of
//! device events (every second under load) — and what the old code did instead (every
//! manifest hashed per re-announcement and metrics scrape; one `events.log` rewritten by
//! every commit). Medians of `--runs` runs, in microseconds.
//!
//!     cargo run --release -p unifleet-tests --bin bench_hub_store -- --releases 10000 --events 1000000
#![allow(clippy::print_stdout)]

use anyhow::{Context, Result};
use hub::store::{release_path, Change, Event, Store};
use proto::announcement::Track;
use proto::manifest::Platform;
use std::time::Instant;

fn arg(name: &str, default: u64) -> Result<u64> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

fn event(at: u64, k: u64) -> Event {
    Event {
        at,
        kind: "device-active".into(),
        app: Some(format!("app{}", k % 100)),
        channel: Some("stable".into()),
        release: Some(k % 1000),
        device: Some(format!("device-{:04}", k % 1000)),
        detail: "release 7 (1.0.7) active and healthy".into(),
    }
}

/// A store with `releases` releases over 100 apps and `events` events over 365 days.
fn build(dir: &std::path::Path, releases: u64, events: u64) -> Result<Store> {
    let store = Store::init(dir)?;
    let apps = 100.min(releases.max(1));
    let mut c = Change::default();
    for r in 0..releases {
        let (app, n) = (format!("app{}", r % apps), r / apps + 1);
        // Manifests of realistic size (a 16 MiB image lists ~256 chunks of 40 bytes).
        let mut manifest = vec![0u8; 10_000];
        manifest[..8].copy_from_slice(&r.to_le_bytes());
        let track = Track::new(&app, "stable", Platform::QemuX86_64);
        c.put(release_path(&track, n, "manifest"), manifest);
        c.put(
            release_path(&track, n, "announcement"),
            r.to_le_bytes().repeat(30),
        );
    }
    store.commit("releases", &c, None)?;
    let per_day = events.div_ceil(365).max(1);
    let start = 1_764_547_200; // 2025-12-01
    let mut k = 0;
    for day in 0..365 {
        let mut c = Change::default();
        for _ in 0..per_day.min(events - k) {
            c.event(event(start + day * 86_400 + k % 86_400, k));
            k += 1;
        }
        if !c.is_empty() {
            store.commit("events", &c, None)?;
        }
    }
    Ok(store)
}

fn median(mut f: impl FnMut() -> Result<()>, runs: u64) -> Result<f64> {
    let mut t = vec![];
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e6);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

struct Row {
    look: f64,
    look_changed: f64,
    commit: f64,
    old_hash_all: f64,
    old_log_rewrite: f64,
}

fn measure(store: &Store, runs: u64) -> Result<Row> {
    let seen = store.tree_id("apps")?;
    let look = median(
        || {
            anyhow::ensure!(store.tree_id("apps")? == seen);
            Ok(())
        },
        runs,
    )?;
    let look_changed = median(
        || {
            let (newest, _) = store.newest_releases()?;
            for (track, release) in newest {
                store.read(&release_path(&track, release, "announcement"))?;
            }
            Ok(())
        },
        runs,
    )?;
    let mut k = 0;
    let commit = median(
        || {
            let mut c = Change::default();
            for _ in 0..10 {
                k += 1;
                c.event(event(1_796_083_200 + k, k));
            }
            Ok(store.commit("device events", &c, None)?)
        },
        runs,
    )?;
    let old_hash_all = median(|| Ok(store.releases().map(|_| ())?), runs)?;
    // The old layout: every commit appended to one file and wrote all of it again.
    let mut log = Vec::new();
    for e in store.events()? {
        log.extend_from_slice(serde_json::to_string(&e)?.as_bytes());
        log.push(b'\n');
    }
    let old_log_rewrite = median(
        || {
            let mut c = Change::default();
            c.put("bench/events.log", log.clone());
            Ok(store.commit("old layout", &c, None)?)
        },
        runs.min(3),
    )?;
    Ok(Row {
        look,
        look_changed,
        commit,
        old_hash_all,
        old_log_rewrite,
    })
}

fn main() -> Result<()> {
    let releases = arg("--releases", 10_000)?;
    let events = arg("--events", 1_000_000)?;
    let runs = arg("--runs", 5)?;
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let empty = build(&dir.path().join("empty.git"), 1, 1)?;
    let big = build(&dir.path().join("big.git"), releases, events)?;
    eprintln!(
        "built stores in {:.1} s ({releases} releases, {events} events)",
        t.elapsed().as_secs_f64()
    );
    let e = measure(&empty, runs)?;
    let b = measure(&big, runs)?;
    println!("| operation (median of {runs}, µs) | empty store | {releases} releases, {events} events | ratio |");
    println!("|---|---|---|---|");
    for (name, x, y) in [
        (
            "re-announcement: has `apps` changed? (every 5 s)",
            e.look,
            b.look,
        ),
        (
            "re-announcement after a publish: newest of each app",
            e.look_changed,
            b.look_changed,
        ),
        (
            "commit of 10 device events (every 1 s under load)",
            e.commit,
            b.commit,
        ),
        (
            "old: hash every manifest (each re-announcement and scrape)",
            e.old_hash_all,
            b.old_hash_all,
        ),
        (
            "old: rewrite the one events.log (each commit)",
            e.old_log_rewrite,
            b.old_log_rewrite,
        ),
    ] {
        println!("| {name} | {x:.0} | {y:.0} | {:.1}× |", y / x.max(1.0));
    }
    Ok(())
}
