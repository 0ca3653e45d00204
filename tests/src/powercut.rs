//! Power cuts during `hub publish` (issue 32): the hub's home on a [`crate::lazyfs`] mount,
//! a publish killed with -9 at a random point, then everything not synced dropped, the
//! file system mounted again, and the store checked: `git fsck` clean, every release a
//! publish acknowledged (exit 0, its manifest digest printed) still there with that
//! manifest, every release complete (its chunks and announcement in the tree), numbers
//! dense (none reused, none skipped). The test runs a short campaign, `bench_powercut`
//! a long one.

use crate::bin;
use crate::fleet::run;
use crate::lazyfs::{mount, Cut, Mounted};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a campaign saw.
#[derive(Debug, Default)]
pub struct Campaign {
    pub cuts: u32,
    /// Publishes that exited 0 before their cut (acknowledged releases).
    pub acknowledged: u32,
    /// Publishes killed before they finished.
    pub interrupted: u32,
    /// Cuts that dropped unsynced data of at least one file.
    pub cuts_losing_data: u32,
    /// How long the first, uncut publish took (kill points fall within 1.2 × this).
    pub publish_ms: u64,
    /// What the checks found wrong after each cut (empty: nothing lost).
    pub losses: Vec<String>,
}

/// The hub home on a lazy file system over `dir/base`, mounted at `dir/mnt`.
struct Rig {
    base: PathBuf,
    mnt: PathBuf,
    cut: Cut,
    mounted: Option<Mounted>,
}

impl Rig {
    fn new(dir: &Path) -> Result<Rig> {
        let (base, mnt) = (dir.join("base"), dir.join("mnt"));
        std::fs::create_dir_all(&base)?;
        std::fs::create_dir_all(&mnt)?;
        let cut = Cut::default();
        let mounted = Some(mount(&base, &mnt, &cut).context("mounting the lazy file system")?);
        Ok(Rig {
            base,
            mnt,
            cut,
            mounted,
        })
    }

    /// Drops what was not synced and mounts again; whether anything was dropped.
    fn power_cut(&mut self) -> Result<bool> {
        let lost = self.cut.cut() > 0;
        self.mounted = None;
        self.mounted = Some(mount(&self.base, &self.mnt, &self.cut)?);
        Ok(lost)
    }
}

/// How a campaign runs.
#[derive(Debug)]
pub struct Options<'a> {
    /// The `hub` program under test.
    pub hub: &'a Path,
    /// Power cuts (the first right after `hub init`).
    pub cuts: u32,
    /// Where the kill points come from.
    pub seed: u64,
    /// Sync the new home before the first cut (for a build whose `hub init` does not,
    /// to see what its publishes lose).
    pub sync_init: bool,
}

/// Runs `opts.cuts` power cuts, each during (or after) one `hub publish`.
pub fn campaign(dir: &Path, opts: &Options<'_>) -> Result<Campaign> {
    let (hub_bin, cuts, seed) = (opts.hub, opts.cuts, opts.seed);
    let mut rig = Rig::new(dir)?;
    let hub_dir = rig.mnt.join("hub");
    let hub = |args: &[&str]| {
        let mut c = Command::new(hub_bin);
        c.arg("--dir").arg(&hub_dir).args(args);
        c
    };
    run(&mut hub(&[
        "init",
        "--mqtt-listen",
        "127.0.0.1:9",
        "--p2p-listen",
        "/ip4/127.0.0.1/tcp/9",
    ]))?;
    let mut out = Campaign::default();
    if opts.sync_init {
        sync_tree(&hub_dir)?;
    }
    // A cut right after `hub init`: the home must come back whole.
    out.cuts_losing_data += u32::from(rig.power_cut()?);
    out.cuts += 1;
    out.losses.extend(
        check(hub_bin, &hub_dir, &BTreeMap::new())
            .into_iter()
            .map(|l| format!("after init: {l}")),
    );
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    let image = |k: u32| -> Result<(String, PathBuf)> {
        let version = format!("1.0.{k}");
        let path = images.join(format!("hello-{version}.img"));
        run(Command::new(bin("fwtool")?)
            .args([
                "testimage",
                "--app",
                "hello",
                "--version",
                &version,
                "--out",
            ])
            .arg(&path))?;
        Ok((version, path))
    };
    let publish = |version: &str, image: &Path| {
        hub(&["publish"])
            .arg(image)
            .args(["--app", "hello", "--version", version, "--no-staging"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
    };
    // One publish uncut, to place the kill points: uniformly in 0–1.2 × its time, so
    // most land inside a publish and some after it.
    let (version, path) = image(0)?;
    let began = Instant::now();
    let first = publish(&version, &path)?.wait_with_output()?;
    out.publish_ms = began.elapsed().as_millis().max(1) as u64;
    let mut acknowledged: BTreeMap<u64, String> = BTreeMap::new();
    if let Some((release, manifest)) = acknowledged_release(&String::from_utf8_lossy(&first.stdout))
    {
        acknowledged.insert(release, manifest);
        out.acknowledged += 1;
    }
    let mut x = seed | 1;
    for k in 1..cuts {
        let (version, path) = image(k)?;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut child = publish(&version, &path)?;
        // Every third publish finishes before its cut (acknowledged releases to keep);
        // the others are killed within their first 1.2 × the uncut time.
        if k % 3 != 0 {
            let kill_at = Duration::from_millis(x % (out.publish_ms * 6 / 5 + 1));
            let began = Instant::now();
            while began.elapsed() < kill_at && child.try_wait()?.is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if child.try_wait()?.is_none() {
                out.interrupted += 1;
            }
            let _ = child.kill();
        }
        let finished = child.wait_with_output()?;
        if finished.status.success() {
            let said = String::from_utf8_lossy(&finished.stdout);
            if let Some((release, manifest)) = acknowledged_release(&said) {
                acknowledged.insert(release, manifest);
                out.acknowledged += 1;
            }
        }
        out.cuts_losing_data += u32::from(rig.power_cut()?);
        out.cuts += 1;
        out.losses.extend(
            check(hub_bin, &hub_dir, &acknowledged)
                .into_iter()
                .map(|l| format!("cut {k}: {l}")),
        );
    }
    drop(rig);
    Ok(out)
}

/// `released hello release N on stable` then `  PLATFORM: manifest HEX`.
pub fn acknowledged_release(said: &str) -> Option<(u64, String)> {
    let release = said
        .lines()
        .find_map(|l| l.strip_prefix("released hello release "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let manifest = said.lines().find_map(|l| l.split("manifest ").nth(1))?;
    Some((release, manifest.trim().to_string()))
}

/// What is wrong with the store in `hub_dir` (nothing: empty), given the releases
/// publishes acknowledged and their manifests.
pub fn check(hub_bin: &Path, hub_dir: &Path, acknowledged: &BTreeMap<u64, String>) -> Vec<String> {
    let store = hub_dir.join("store.git");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("--git-dir")
            .arg(&store)
            .args(args)
            .output()
    };
    let mut wrong = vec![];
    match git(&["fsck", "--full", "--no-dangling"]) {
        Ok(o) if o.status.success() => {}
        Ok(o) => wrong.push(format!(
            "git fsck: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => wrong.push(format!("git fsck: {e}")),
    }
    let listed = Command::new(hub_bin)
        .arg("--dir")
        .arg(hub_dir)
        .args(["releases", "--json"])
        .output();
    let releases: Vec<serde_json::Value> = match listed {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).unwrap_or_default(),
        Ok(o) => {
            wrong.push(format!(
                "hub releases: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            return wrong;
        }
        Err(e) => {
            wrong.push(format!("hub releases: {e}"));
            return wrong;
        }
    };
    let stored: BTreeMap<u64, String> = releases
        .iter()
        .filter_map(|r| Some((r["release"].as_u64()?, r["manifest"].as_str()?.to_string())))
        .collect();
    for (release, manifest) in acknowledged {
        match stored.get(release) {
            Some(m) if m == manifest => {}
            Some(m) => wrong.push(format!(
                "release {release} was {manifest}, is now {m} (number reused)"
            )),
            None => wrong.push(format!("acknowledged release {release} is gone")),
        }
    }
    let numbers: Vec<u64> = stored.keys().copied().collect();
    if numbers != (1..=numbers.len() as u64).collect::<Vec<_>>() {
        wrong.push(format!("release numbers not dense: {numbers:?}"));
    }
    for release in stored.keys() {
        let dir = "HEAD:apps/hello/stable/qemu-x86_64";
        for file in ["manifest", "announcement"] {
            let path = format!("{dir}/{release:010}.{file}");
            if !git(&["cat-file", "-e", &path]).is_ok_and(|o| o.status.success()) {
                wrong.push(format!("release {release} lacks its {file}"));
            }
        }
    }
    wrong
}

/// Every file and directory under `path` synced (through the mount).
fn sync_tree(path: &Path) -> Result<()> {
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else if entry.file_type()?.is_file() {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    Ok(())
}
