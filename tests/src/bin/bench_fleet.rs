//! The fleet benchmark: one hub (its own process: embedded MQTT broker, libp2p, git store)
//! and N device agents (in this process, each with its own libp2p swarm, MQTT client,
//! store and libvirt test-driver connection), with token-bucket caps on every device's
//! upload and download and on the hub's upload, so loopback behaves like a WAN.
//!
//!     cargo build --release --workspace --bins
//!     scripts/bench-fleet.sh --devices 100            # or ./target/release/bench_fleet …
//!
//! For each image size: release 1 (the image) and release 2 (a small change), first with
//! peer exchange (mesh), then hub-only (every device downloads from the hub, as in
//! hub-and-spoke systems), each on a fresh hub and fleet. Measured: hub egress,
//! per-device completion (announcement to all chunks verified and stored) p50/p99/max,
//! duplicate bytes, bytes per device for the delta release, announce latency, hub and
//! per-device RSS; compared with the Kumar–Ross minimum distribution time for the caps.
//! Writes a markdown table, a CSV of completion times and (with python3-matplotlib) a
//! PNG chart of their CDFs under `bench-results/`.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use anyhow::{bail, Context, Result};
use device::metrics::DeviceMetrics;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use unifleet_tests::fleet::run;
use unifleet_tests::{bin, free_port, metric};

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
struct Params {
    devices: usize,
    sizes_mib: Vec<u64>,
    /// Bytes per second.
    device_up: u64,
    device_down: u64,
    hub_up: u64,
    parallel: usize,
    modes: Vec<Mode>,
    out: PathBuf,
    /// Internal: run one (size, mode) fleet in this process and print its outcome as JSON.
    one: Option<(u64, Mode)>,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
enum Mode {
    Mesh,
    HubOnly,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Mesh => "mesh",
            Mode::HubOnly => "hub-only",
        }
    }

    fn parse(s: &str) -> Result<Mode> {
        match s {
            "mesh" => Ok(Mode::Mesh),
            "hub-only" => Ok(Mode::HubOnly),
            other => bail!("unknown mode {other}"),
        }
    }
}

const HELP: &str =
    "bench_fleet: convergence time, hub egress, delta bytes and announce latency of a fleet

Options (rates in bytes per second; K, M suffixes are KiB, MiB):
  --devices N        devices (default 100)
  --sizes A,B        image sizes in MiB (default 16)
  --device-up R      each device's upload cap (default 48M / N)
  --device-down R    each device's download cap (default 4 x device-up)
  --hub-up R         the hub's upload cap (default 16M)
  --parallel K       chunks a device fetches at once (default 8)
  --modes M          mesh,hub-only (default both)
  --out DIR          results directory (default bench-results)
";

fn rate(s: &str) -> Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1024),
        Some('M' | 'm') => (&s[..s.len() - 1], MIB),
        _ => (s, 1),
    };
    let v: f64 = num.parse().with_context(|| format!("not a rate: {s}"))?;
    Ok((v * mult as f64) as u64)
}

fn params() -> Result<Params> {
    let mut args = std::env::args().skip(1);
    let mut p = Params {
        devices: 100,
        sizes_mib: vec![16],
        device_up: 0,
        device_down: 0,
        hub_up: 16 * MIB,
        parallel: 8,
        modes: vec![Mode::Mesh, Mode::HubOnly],
        out: PathBuf::from("bench-results"),
        one: None,
    };
    while let Some(a) = args.next() {
        if a == "--help" || a == "-h" {
            print!("{HELP}");
            std::process::exit(0);
        }
        let v = args.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--devices" => p.devices = v.parse()?,
            "--sizes" => {
                p.sizes_mib = v
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--sizes")?
            }
            "--device-up" => p.device_up = rate(&v)?,
            "--device-down" => p.device_down = rate(&v)?,
            "--hub-up" => p.hub_up = rate(&v)?,
            "--parallel" => p.parallel = v.parse()?,
            "--modes" => p.modes = v.split(',').map(Mode::parse).collect::<Result<_>>()?,
            "--out" => p.out = PathBuf::from(v),
            "--one" => {
                let (size, mode) = v.split_once(':').context("--one SIZE:MODE")?;
                p.one = Some((size.parse()?, Mode::parse(mode)?));
            }
            other => bail!("unknown option {other}\n\n{HELP}"),
        }
    }
    anyhow::ensure!(
        p.devices > 0 && p.hub_up > 0,
        "--devices and --hub-up must be positive"
    );
    if p.device_up == 0 {
        p.device_up = 48 * MIB / p.devices as u64;
    }
    if p.device_down == 0 {
        p.device_down = 4 * p.device_up;
    }
    Ok(p)
}

/// Kumar and Ross: T_min = max(F/u_s, F/d_min, N·F/(u_s + Σu_i)).
fn t_min(p: &Params, f: u64) -> f64 {
    let f = f as f64;
    let n = p.devices as f64;
    (f / p.hub_up as f64)
        .max(f / p.device_down as f64)
        .max(n * f / (p.hub_up as f64 + n * p.device_up as f64))
}

/// The same bound when only the hub uploads.
fn t_hub_only(p: &Params, f: u64) -> f64 {
    let f = f as f64;
    (p.devices as f64 * f / p.hub_up as f64).max(f / p.device_down as f64)
}

fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&format!("{field}:")))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// One release's measurements over the fleet.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Round {
    /// Seconds from the hub's announcement, per device.
    completion: Vec<f64>,
    announce: Vec<f64>,
    hub_egress: u64,
    /// Accepted blob bytes per device this round.
    bytes_per_device: Vec<u64>,
    duplicate_bytes: u64,
    /// Blob requests the hub answered with peers to ask.
    redirects: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Outcome {
    mode: Mode,
    size: u64,
    full: Round,
    delta: Round,
    hub_rss_kib: u64,
    device_rss_kib: f64,
}

struct Hub {
    dir: PathBuf,
    child: Child,
    metrics: String,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_hub(dir: &Path, p: &Params) -> Result<Hub> {
    let hub_dir = dir.join("hub");
    let (mqtt, p2p, metrics) = (free_port()?, free_port()?, free_port()?);
    run(Command::new(bin("hub")?).arg("--dir").arg(&hub_dir).args([
        "init",
        "--mqtt-listen",
        &format!("127.0.0.1:{mqtt}"),
        "--p2p-listen",
        &format!("/ip4/127.0.0.1/tcp/{p2p}"),
    ]))?;
    let metrics = format!("127.0.0.1:{metrics}");
    let log = std::fs::File::create(dir.join("hub.log"))?;
    let child = Command::new(bin("hub")?)
        .arg("--dir")
        .arg(&hub_dir)
        .args(["serve", "--metrics", &metrics, "--upload-rate"])
        .arg(p.hub_up.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting hub serve")?;
    let hub = Hub {
        dir: hub_dir,
        child,
        metrics,
    };
    wait("the hub to listen", Duration::from_secs(30), || {
        std::fs::metadata(hub.dir.join("hub.addr")).is_ok_and(|m| m.len() > 0)
            && metric(&hub.metrics, "unifleet_hub_announcements_total").is_ok()
    })?;
    Ok(hub)
}

fn wait(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

struct Agents {
    metrics: Vec<Arc<DeviceMetrics>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn start_agents(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    hub: &Hub,
    p: &Params,
    mode: Mode,
) -> Result<Agents> {
    let addr = std::fs::read_to_string(hub.dir.join("hub.addr"))?;
    let mqtt = {
        let home = hub::home::Home::open(&hub.dir)?;
        format!("mqtt://{}", home.config.mqtt_listen)
    };
    let mut keys = vec![];
    let mut configs = vec![];
    for i in 0..p.devices {
        let name = format!("bf{i}");
        let ddir = dir.join(&name);
        run(Command::new(bin("device")?)
            .args([
                "enroll",
                "--name",
                &name,
                "--app",
                "bench",
                "--hub",
                addr.trim(),
            ])
            .args(["--broker", &mqtt])
            .arg("--dir")
            .arg(&ddir)
            .arg("--root")
            .arg(hub.dir.join("root.bin")))?;
        let text = std::fs::read_to_string(ddir.join("device.pub"))?;
        keys.push((name, proto::PublicKey::from_text(&text)?));
        let mut cfg = device::config::Config::load(&ddir.join("device.toml"))?;
        cfg.upload_rate = p.device_up;
        cfg.download_rate = p.device_down;
        cfg.parallel_fetches = p.parallel;
        cfg.peer_exchange = mode == Mode::Mesh;
        configs.push(cfg);
    }
    hub::enroll::enroll(&hub::home::Home::open(&hub.dir)?, &keys)?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut agents = Agents {
        metrics: vec![],
        stop,
        tasks: vec![],
    };
    for cfg in configs {
        let m = Arc::new(DeviceMetrics::default());
        let mut rx = stop_rx.clone();
        let name = cfg.name.clone();
        let mm = m.clone();
        agents.tasks.push(rt.spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = device::agent::run_with_metrics(cfg, mm, stop).await {
                eprintln!("agent {name}: {e:#}");
            }
        }));
        agents.metrics.push(m);
    }
    let n = p.devices;
    wait(
        "every device to reach the hub",
        Duration::from_secs(60 + n as u64 / 10),
        || agents.metrics.iter().all(|m| m.peers.load(Relaxed) > 0),
    )?;
    Ok(agents)
}

fn publish(hub: &Hub, image: &Path, version: &str) -> Result<()> {
    run(Command::new(bin("hub")?)
        .arg("--dir")
        .arg(&hub.dir)
        .arg("publish")
        .arg(image)
        .args(["--app", "bench", "--version", version, "--no-staging"]))?;
    Ok(())
}

/// Publishes `image` as the next release and waits for every device to run it.
fn round(
    hub: &Hub,
    agents: &Agents,
    image: &Path,
    version: &str,
    limit: Duration,
) -> Result<Round> {
    let accepted =
        |m: &DeviceMetrics| m.bytes_from_peers.load(Relaxed) + m.bytes_from_hub.load(Relaxed);
    let before: Vec<(u64, u64)> = agents
        .metrics
        .iter()
        .map(|m| (accepted(m), m.blob_bytes_received.load(Relaxed)))
        .collect();
    let egress = metric(&hub.metrics, "unifleet_hub_blob_bytes_served_total")?;
    let redirects = metric(&hub.metrics, "unifleet_hub_redirects_total")?;
    let announced_before = metric(
        &hub.metrics,
        "unifleet_hub_last_new_announcement_timestamp_ms",
    )?;
    publish(hub, image, version)?;
    let mut t0 = 0;
    wait("the hub to announce", Duration::from_secs(30), || {
        t0 = metric(
            &hub.metrics,
            "unifleet_hub_last_new_announcement_timestamp_ms",
        )
        .unwrap_or(0);
        t0 > announced_before
    })?;
    let started = Instant::now();
    let mut last_report = Instant::now();
    wait("every device to run the release", limit, || {
        let done = agents
            .metrics
            .iter()
            .filter(|m| m.last_active_ms.load(Relaxed) >= t0)
            .count();
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            let got: u64 = agents.metrics.iter().map(|m| accepted(m)).sum();
            eprintln!(
                "  {:>5.0} s: {done} of {} devices done, {} received in all, hub sent {}",
                started.elapsed().as_secs_f64(),
                agents.metrics.len(),
                mib(got),
                mib(
                    metric(&hub.metrics, "unifleet_hub_blob_bytes_served_total").unwrap_or(0)
                        - egress
                ),
            );
        }
        done == agents.metrics.len()
    })?;
    let secs = |ms: u64| ms.saturating_sub(t0) as f64 / 1e3;
    let mut r = Round {
        hub_egress: metric(&hub.metrics, "unifleet_hub_blob_bytes_served_total")? - egress,
        redirects: metric(&hub.metrics, "unifleet_hub_redirects_total")? - redirects,
        ..Round::default()
    };
    for (m, (acc0, recv0)) in agents.metrics.iter().zip(before) {
        r.completion.push(secs(m.last_fetched_ms.load(Relaxed)));
        r.announce.push(secs(m.last_announcement_ms.load(Relaxed)));
        let acc = accepted(m) - acc0;
        r.bytes_per_device.push(acc);
        r.duplicate_bytes += (m.blob_bytes_received.load(Relaxed) - recv0).saturating_sub(acc);
    }
    Ok(r)
}

fn testimage(dir: &Path, size: u64, version: &str) -> Result<PathBuf> {
    let out = dir.join(format!("bench-{size}-{version}.elf"));
    run(Command::new(bin("fwtool")?)
        .args([
            "testimage",
            "--app",
            "bench",
            "--version",
            version,
            "--pad-mib",
        ])
        .arg(size.to_string())
        .arg("--out")
        .arg(&out))?;
    Ok(out)
}

fn run_fleet(rt: &tokio::runtime::Runtime, p: &Params, size: u64, mode: Mode) -> Result<Outcome> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let v1 = testimage(dir, size, "1.0.0")?;
    let v2 = testimage(dir, size, "1.0.1")?;
    let f = std::fs::metadata(&v1)?.len();
    let rss_before = status_kib(std::process::id(), "VmRSS");
    let hub = start_hub(dir, p)?;
    eprintln!(
        "{} devices, {size} MiB, {}: starting",
        p.devices,
        mode.name()
    );
    let agents = start_agents(rt, dir, &hub, p, mode)?;
    eprintln!(
        "  agents up: {:.1} MiB per device",
        status_kib(std::process::id(), "VmRSS").saturating_sub(rss_before) as f64
            / 1024.0
            / p.devices as f64
    );
    let bound = match mode {
        Mode::Mesh => t_min(p, f),
        Mode::HubOnly => t_hub_only(p, f),
    };
    let limit = Duration::from_secs_f64(bound * 5.0 + 120.0);
    eprintln!("  release 1 (bound {bound:.1} s)");
    let full = round(&hub, &agents, &v1, "1.0.0", limit)?;
    eprintln!("  release 2 (a small change)");
    let delta = round(&hub, &agents, &v2, "1.0.1", limit)?;
    // This process holds nothing but the agents (one fleet per process): its peak above
    // what it held before starting them, per device.
    let peak = status_kib(std::process::id(), "VmHWM");
    let outcome = Outcome {
        mode,
        size: f,
        full,
        delta,
        hub_rss_kib: status_kib(hub.child.id(), "VmHWM"),
        device_rss_kib: peak.saturating_sub(rss_before) as f64 / p.devices as f64,
    };
    let _ = agents.stop.send(true);
    rt.block_on(async {
        for t in agents.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    });
    drop(hub);
    Ok(outcome)
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / MIB as f64)
}

fn report(p: &Params, outcomes: &[Outcome]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "N = {} devices; caps: device up {}/s, device down {}/s, hub up {}/s; {} chunks in flight per device.\n",
        p.devices,
        mib(p.device_up),
        mib(p.device_down),
        mib(p.hub_up),
        p.parallel
    );
    let _ = writeln!(md, "| image | mode | hub egress (× image) | completion p50 / p99 / max | bound | max ÷ bound | p99 ÷ p50 | duplicate bytes | delta release per device (max, % of image) | hub egress, delta | hub redirects | announce p50 / p99 | hub RSS peak | RSS per device |");
    let _ = writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for o in outcomes {
        let c = &o.full.completion;
        let bound = match o.mode {
            Mode::Mesh => t_min(p, o.size),
            Mode::HubOnly => t_hub_only(p, o.size),
        };
        let delta_max = o.delta.bytes_per_device.iter().max().copied().unwrap_or(0);
        let _ = writeln!(
            md,
            "| {} | {} | {} ({:.2}×) | {:.1} / {:.1} / {:.1} s | {} {:.1} s | {:.2} | {:.2} | {} | {} ({:.2}%) | {} | {} | {:.0} / {:.0} ms | {:.1} MiB | {:.2} MiB |",
            mib(o.size),
            o.mode.name(),
            mib(o.full.hub_egress),
            o.full.hub_egress as f64 / o.size as f64,
            percentile(c, 0.5),
            percentile(c, 0.99),
            percentile(c, 1.0),
            if o.mode == Mode::Mesh { "T_min" } else { "N·F/u_s" },
            bound,
            percentile(c, 1.0) / bound,
            percentile(c, 0.99) / percentile(c, 0.5),
            o.full.duplicate_bytes,
            mib(delta_max),
            100.0 * delta_max as f64 / o.size as f64,
            mib(o.delta.hub_egress),
            o.full.redirects + o.delta.redirects,
            percentile(&o.full.announce, 0.5) * 1e3,
            percentile(&o.full.announce, 0.99) * 1e3,
            o.hub_rss_kib as f64 / 1024.0,
            o.device_rss_kib / 1024.0,
        );
    }
    md
}

fn main() -> Result<()> {
    let p = params()?;
    if p.one.is_none() {
        return parent(&p);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (size, mode) = p.one.expect("checked");
    let outcome = run_fleet(&rt, &p, size, mode)?;
    println!("{}", serde_json::to_string(&outcome)?);
    // Agents that did not stop in time must not hold the process.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Runs each (size, mode) fleet in a process of its own (a clean slate, and an honest
/// memory peak), then writes the report, the CSV and the chart.
fn parent(p: &Params) -> Result<()> {
    std::fs::create_dir_all(&p.out)?;
    let began = Instant::now();
    let mut outcomes = vec![];
    for &size in &p.sizes_mib {
        for &mode in &p.modes {
            let out = Command::new(std::env::current_exe()?)
                .args(std::env::args().skip(1))
                .args(["--one", &format!("{size}:{}", mode.name())])
                .stderr(Stdio::inherit())
                .output()
                .context("running one fleet")?;
            anyhow::ensure!(
                out.status.success(),
                "the {size} MiB {} fleet failed ({})",
                mode.name(),
                out.status
            );
            let json = String::from_utf8_lossy(&out.stdout);
            let line = json.lines().last().context("no outcome printed")?;
            outcomes.push(serde_json::from_str::<Outcome>(line).context("reading the outcome")?);
        }
    }
    let p = p.clone();
    let md = report(&p, &outcomes);
    let stem = format!("fleet-n{}", p.devices);
    let mut csv = String::from("mode,image_mib,t_min_s,device,completion_s\n");
    for o in &outcomes {
        for (i, c) in o.full.completion.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{},{},{:.3},{i},{c:.3}",
                o.mode.name(),
                o.size / MIB,
                t_min(&p, o.size)
            );
        }
    }
    std::fs::write(p.out.join(format!("{stem}.md")), &md)?;
    let csv_path = p.out.join(format!("{stem}.csv"));
    std::fs::write(&csv_path, &csv)?;
    print!("{md}");
    let png = p.out.join(format!("{stem}.png"));
    let plotted = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/plot_fleet.py"))
        .arg(&csv_path)
        .arg(&png)
        .arg(format!("N = {}", p.devices))
        .status();
    match plotted {
        Ok(s) if s.success() => println!("chart: {}", png.display()),
        _ => eprintln!("no chart: scripts/plot_fleet.py needs python3-matplotlib"),
    }
    println!(
        "\n(all of it in {:.0} s; {} and {}.csv in {})",
        began.elapsed().as_secs_f64(),
        format_args!("{stem}.md"),
        stem,
        p.out.display()
    );
    Ok(())
}
