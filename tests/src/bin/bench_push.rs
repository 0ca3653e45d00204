//! `git push` to a device serving it (issue 29, "Done when"): the template from `hub new`,
//! pushed to a hub whose deploy hook fetches, builds (x86_64 and aarch64) and unit-tests it
//! in the sandbox, stages the x86 image on a staging device with its HTTP probe, signs and
//! announces it; a device serving the app on demand installs it; the clock stops at the
//! first byte of the new version's `GET /` through the device's proxy. Under
//! `qemu:///system` (libvirtd: `scripts/setup.sh`), release build first:
//!
//!     cargo build --release --workspace --bins
//!     ./target/release/bench_push [--runs 3]
//!
//! Each run makes two pushes: **cold** (the app's build cache removed first: the crates
//! fetched from the registry and every dependency compiled) and **warm** (a one-line
//! change of the app's source, the cache kept). The pushes' own step times (fetch, build,
//! test, staging, the whole push) come from their `remote:` lines. The guests' NICs are on
//! an isolated TEST-NET libvirt network (guest network slot 7: not with the unikernel
//! tests or `bench_unikernel`). Medians of the runs; each run is printed as it ends.
#![allow(clippy::print_stdout)]

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use unifleet_tests::bench::percentile;
use unifleet_tests::fleet::Fleet;
use unifleet_tests::guestnet::GuestNet;
use unifleet_tests::template::{template_fleet, TemplateFleet};

const URI: &str = "qemu:///system";
/// The steps whose times the push prints (`-----> STEP passed in N s`).
const STEPS: [&str; 3] = ["fetch", "build", "test"];

/// One push's times, seconds.
#[derive(Debug, Default, Clone)]
struct Push {
    steps: [f64; 3],
    /// From the staging line to the staging verdict, as the push printed them: not timed
    /// by the hook, so taken from when the lines arrived.
    staging: f64,
    /// The whole push (git's exit), including following the first wave.
    push: f64,
    /// From the push's start to the first byte of the new version through the device.
    serving: f64,
}

fn main() -> Result<()> {
    let runs = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => 3,
        [flag, n] if flag == "--runs" => n.parse().context("--runs")?,
        _ => bail!("usage: bench_push [--runs N] (see the doc comment of bench_push.rs)"),
    };
    let net = GuestNet::create(URI, 7)?;
    let mut fleet = Fleet::new(URI)?;
    fleet.start_hub(&[])?;
    let TemplateFleet { port, repo, .. } = template_fleet(&mut fleet, &net, "bp", true, 300)?;
    let cache = fleet.hub_dir.join("builds/web/cache");
    let (mut cold, mut warm) = (vec![], vec![]);
    let mut version = 0;
    for r in 0..runs {
        for kind in ["cold", "warm"] {
            version += 1;
            if kind == "cold" {
                let _ = std::fs::remove_dir_all(&cache);
            }
            let p = push(&fleet, &repo, version, port)?;
            println!(
                "run {r} {kind}: fetch {:.1} s, build {:.1} s, test {:.1} s, staging {:.1} s, push {:.1} s, first byte of the new version {:.1} s after the push began",
                p.steps[0], p.steps[1], p.steps[2], p.staging, p.push, p.serving
            );
            match kind {
                "cold" => cold.push(p),
                _ => warm.push(p),
            }
        }
    }
    report(&cold, &warm);
    Ok(())
}

/// Commits version `0.1.<n>` (a one-line change of the app's source) and pushes it; waits
/// until the device serves it.
fn push(fleet: &Fleet, repo: &Path, n: u32, port: u16) -> Result<Push> {
    let toml = repo.join("unifleet.toml");
    let (old, new) = (format!("0.1.{}", n - 1), format!("0.1.{n}"));
    let text = std::fs::read_to_string(&toml)?
        .replace(
            &format!("version = \"{old}\""),
            &format!("version = \"{new}\""),
        )
        .replace(&format!("version={old}\""), &format!("version={new}\""));
    std::fs::write(&toml, text)?;
    let src = repo.join("hello-http/src/app.rs");
    std::fs::write(
        &src,
        std::fs::read_to_string(&src)? + &format!("// push {n}\n"),
    )?;
    let git = |args: &[&str]| {
        Command::new("git")
            .args([
                "-c",
                "user.name=bench",
                "-c",
                "user.email=bench@example.invalid",
            ])
            .args(args)
            .current_dir(repo)
            .output()
    };
    git(&["commit", "-qam", &format!("0.1.{n}")])?;
    let deploy = fleet.hub_dir.join("deploy.git");
    let began = Instant::now();
    let mut child = Command::new("git")
        .arg("push")
        .arg(&deploy)
        .arg("main")
        .current_dir(repo)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let mut p = Push::default();
    let mut staged_at = None;
    let mut said = String::new();
    let stderr = child.stderr.take().context("piped")?;
    use std::io::BufRead;
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line?;
        for (i, step) in STEPS.iter().enumerate() {
            if let Some(rest) = line.split(&format!("-----> {step} passed in ")).nth(1) {
                // git pads `remote:` lines with spaces.
                p.steps[i] = rest
                    .trim()
                    .trim_end_matches(" s")
                    .parse()
                    .unwrap_or(f64::NAN);
            }
        }
        if line.contains("waiting for a staging device") {
            staged_at = Some(began.elapsed());
        }
        if line.contains("staging passed on") {
            if let Some(at) = staged_at {
                p.staging = (began.elapsed() - at).as_secs_f64();
            }
        }
        said.push_str(&line);
        said.push('\n');
    }
    if !child.wait()?.success() {
        bail!("push of 0.1.{n} was rejected:\n{said}");
    }
    p.push = began.elapsed().as_secs_f64();
    let want = format!("version: 0.1.{n}\n");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if get(port).is_ok_and(|body| body.contains(&want)) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the device did not serve 0.1.{n} within 300 s of the push");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    p.serving = began.elapsed().as_secs_f64();
    Ok(p)
}

/// `GET /` through the device's proxy, the whole answer.
fn get(port: u16) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

fn report(cold: &[Push], warm: &[Push]) {
    let med = |v: &[Push], f: &dyn Fn(&Push) -> f64| {
        percentile(&v.iter().map(f).collect::<Vec<_>>(), 0.5)
    };
    println!("\nbench_push: {} runs, medians (s)\n", cold.len());
    println!("| push | fetch | build | test | staging | whole push | push → first byte of the new version |");
    println!("|---|---|---|---|---|---|---|");
    for (name, v) in [("cold cache", cold), ("warm cache (one-line change)", warm)] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | **{:.1}** |",
            med(v, &|p| p.steps[0]),
            med(v, &|p| p.steps[1]),
            med(v, &|p| p.steps[2]),
            med(v, &|p| p.staging),
            med(v, &|p| p.push),
            med(v, &|p| p.serving),
        );
    }
}
