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
use unifleet_tests::bench::{cpu_seconds, percentile, proc_number, rate, status_kib, MIB};
use unifleet_tests::fleet::run;
use unifleet_tests::{bin, free_port, metric, metric_in, metrics_page};

#[derive(Debug, Clone)]
struct Params {
    devices: usize,
    sizes_mib: Vec<u64>,
    /// Bytes per second.
    device_up: u64,
    device_down: u64,
    hub_up: u64,
    parallel: usize,
    /// Seconds the fleet runs idle after every device reached the hub, before the first
    /// release (1,000 devices starting at once is a storm of its own, not a release).
    settle: u64,
    /// Niceness of the worker processes (the hub runs at 0).
    worker_nice: u32,
    modes: Vec<Mode>,
    /// Fleets per (size, mode); the report gives medians.
    runs: usize,
    out: PathBuf,
    /// Where fleets' directories are made (`--dir`; see [`fleet_parent`]).
    dir: Option<PathBuf>,
    /// Internal: run one (size, mode) fleet and print its outcome as JSON.
    one: Option<(u64, Mode)>,
    /// Internal: run some of the devices (`DIR:INDEX:COUNT`).
    worker: Option<(PathBuf, usize, usize)>,
}

impl Params {
    /// What a worker needs to know: the caps and the mode.
    fn forward_args(&self) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--devices".into(),
            self.devices.to_string(),
            "--device-up".into(),
            self.device_up.to_string(),
            "--device-down".into(),
            self.device_down.to_string(),
            "--hub-up".into(),
            self.hub_up.to_string(),
            "--parallel".into(),
            self.parallel.to_string(),
        ];
        if let Some((_, mode)) = self.one {
            v.extend(["--modes".into(), mode.name().into()]);
        }
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
enum Mode {
    Mesh,
    HubOnly,
    /// A libtorrent swarm with the hub's image and caps (`scripts/bench_bittorrent.py`).
    BitTorrent,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Mesh => "mesh",
            Mode::HubOnly => "hub-only",
            Mode::BitTorrent => "bittorrent",
        }
    }

    fn parse(s: &str) -> Result<Mode> {
        match s {
            "mesh" => Ok(Mode::Mesh),
            "hub-only" => Ok(Mode::HubOnly),
            "bittorrent" => Ok(Mode::BitTorrent),
            other => bail!("unknown mode {other}: mesh, hub-only or bittorrent"),
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
  --settle S         seconds the started fleet idles before the first release (default
                     N / 50, at least 5 and at most 20)
  --worker-nice K    niceness of the device worker processes; the hub runs at 0 (default 10)
  --modes M          mesh,hub-only,bittorrent (default mesh,hub-only); bittorrent is a
                     libtorrent swarm with the same image and caps, one session per
                     device in one process (python3-libtorrent, opentracker: N up to a
                     few hundred)
  --runs K           fleets per size and mode, each fresh; the table gives medians and
                     every run's last device (default 1; quote K >= 3)
  --out DIR          results directory (default bench-results)
  --dir DIR          where each fleet's hub and device stores are made (default /dev/shm
                     when the fleet fits in half the available memory, else the temp dir:
                     N simulated devices share one disk, a real fleet has N)
";

fn params() -> Result<Params> {
    let mut args = std::env::args().skip(1);
    let mut settle = None;
    let mut p = Params {
        devices: 100,
        sizes_mib: vec![16],
        device_up: 0,
        device_down: 0,
        hub_up: 16 * MIB,
        parallel: 8,
        settle: 0,
        worker_nice: 10,
        modes: vec![Mode::Mesh, Mode::HubOnly],
        runs: 1,
        out: PathBuf::from("bench-results"),
        dir: None,
        one: None,
        worker: None,
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
            "--settle" => settle = Some(v.parse()?),
            "--worker-nice" => p.worker_nice = v.parse()?,
            "--modes" => p.modes = v.split(',').map(Mode::parse).collect::<Result<_>>()?,
            "--runs" => p.runs = v.parse().context("--runs")?,
            "--out" => p.out = PathBuf::from(v),
            "--dir" => p.dir = Some(PathBuf::from(v)),
            "--worker" => {
                let mut parts = v.rsplitn(3, ':');
                let count = parts.next().context("--worker DIR:INDEX:COUNT")?.parse()?;
                let index = parts.next().context("--worker DIR:INDEX:COUNT")?.parse()?;
                let dir = PathBuf::from(parts.next().context("--worker DIR:INDEX:COUNT")?);
                p.worker = Some((dir, index, count));
            }
            "--one" => {
                let (size, mode) = v.split_once(':').context("--one SIZE:MODE")?;
                p.one = Some((size.parse()?, Mode::parse(mode)?));
            }
            other => bail!("unknown option {other}\n\n{HELP}"),
        }
    }
    p.settle = settle.unwrap_or((p.devices as u64 / 50).clamp(5, 20));
    anyhow::ensure!(
        p.devices > 0 && p.hub_up > 0 && p.runs > 0,
        "--devices, --hub-up and --runs must be positive"
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

/// The bound when the hub sends one copy and the devices the rest:
/// max(F/u_s, F/d_min, (N−1)·F/Σu_i) — what keeping hub egress at one copy costs.
fn t_one_copy(p: &Params, f: u64) -> f64 {
    let f = f as f64;
    let n = p.devices as f64;
    (f / p.hub_up as f64)
        .max(f / p.device_down as f64)
        .max((n - 1.0) * f / (n * p.device_up as f64))
}

/// The same bound when only the hub uploads.
fn t_hub_only(p: &Params, f: u64) -> f64 {
    let f = f as f64;
    (p.devices as f64 * f / p.hub_up as f64).max(f / p.device_down as f64)
}

/// The bound a mode is compared with: T_min for a swarm, N·F/u_s for the hub alone.
fn bound(p: &Params, mode: Mode, f: u64) -> f64 {
    match mode {
        Mode::HubOnly => t_hub_only(p, f),
        Mode::Mesh | Mode::BitTorrent => t_min(p, f),
    }
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
    /// Counted over the round: blob requests the devices sent (one yamux stream each),
    /// those the hub received, connections the devices opened, and CPU seconds of the
    /// hub and the worker processes together.
    device_requests: u64,
    hub_requests: u64,
    connections: u64,
    cpu_s: f64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Outcome {
    mode: Mode,
    size: u64,
    full: Round,
    delta: Round,
    hub_rss_kib: u64,
    device_rss_kib: f64,
    /// Where the hub's and the devices' stores were (see [`fleet_parent`]).
    stores: String,
    /// Which of `--runs` this was (set by the parent).
    #[serde(default)]
    run: usize,
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

/// Devices per worker process: each in-process device-to-device connection costs two
/// file descriptors, and the descriptor limit is per process (20,000 here: 250 devices
/// per process ran out of descriptors in one N = 1,000 run).
const DEVICES_PER_WORKER: usize = 125;

/// One device's counters as a worker reports them (absolute values).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
struct DeviceSample {
    announced_ms: u64,
    fetched_ms: u64,
    active_ms: u64,
    accepted: u64,
    received: u64,
    requests: u64,
    connections: u64,
}

fn sample(m: &DeviceMetrics) -> DeviceSample {
    DeviceSample {
        announced_ms: m.last_announcement_ms.load(Relaxed),
        fetched_ms: m.last_fetched_ms.load(Relaxed),
        active_ms: m.last_active_ms.load(Relaxed),
        accepted: m.bytes_from_peers.load(Relaxed) + m.bytes_from_hub.load(Relaxed),
        received: m.blob_bytes_received.load(Relaxed),
        requests: m.net.requests_sent.load(Relaxed),
        connections: m.net.connections_opened.load(Relaxed),
    }
}

/// Enrolls every device (the real `device enroll`, then one batch at the hub).
fn enroll_devices(dir: &Path, hub: &Hub, p: &Params) -> Result<()> {
    let addr = std::fs::read_to_string(hub.dir.join("hub.addr"))?;
    let home = hub::home::Home::open(&hub.dir)?;
    let mqtt = format!("mqtt://{}", home.config.mqtt_listen);
    let mut keys = vec![];
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
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-mdns",
            ])
            .args(["--broker", &mqtt])
            .arg("--dir")
            .arg(&ddir)
            .arg("--root")
            .arg(hub.dir.join("root.bin")))?;
        let text = std::fs::read_to_string(ddir.join("device.pub"))?;
        keys.push((name, proto::PublicKey::from_text(&text)?));
    }
    hub::enroll::enroll(&home, &keys, None, false)?;
    Ok(())
}

/// A worker process running some of the devices; spoken to over its stdin and stdout.
struct Worker {
    child: Child,
    input: std::process::ChildStdin,
    output: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Worker {
    fn start(p: &Params, dir: &Path, index: usize, count: usize) -> Result<Worker> {
        // At a lower priority than the hub: in a real fleet the hub has a machine of its
        // own; here 1,000 devices on two cores would otherwise starve it (its one swarm
        // task serves every device, and answers came later than the devices' 20 s
        // request timeout).
        let mut child = Command::new("nice")
            .args(["-n", &p.worker_nice.to_string()])
            .arg(std::env::current_exe()?)
            .args(p.forward_args())
            .arg("--worker")
            .arg(format!("{}:{index}:{count}", dir.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a worker")?;
        let input = child.stdin.take().context("worker stdin")?;
        let output = std::io::BufRead::lines(std::io::BufReader::new(
            child.stdout.take().context("worker stdout")?,
        ));
        Ok(Worker {
            child,
            input,
            output,
        })
    }

    fn say(&mut self, line: &str) -> Result<()> {
        use std::io::Write;
        writeln!(self.input, "{line}").context("telling a worker")
    }

    fn hear(&mut self) -> Result<String> {
        self.output
            .next()
            .context("a worker stopped early (its error is above)")?
            .context("reading a worker")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--worker DIR:INDEX:COUNT`: runs devices INDEX, INDEX+COUNT, … in this process. Says
/// `ready` once each has reached the hub; then for every `round T0` line, waits until each
/// runs a release announced at or after T0 and answers with their samples as JSON; `stop`
/// answers with this process's peak RSS in KiB and exits.
fn worker(p: &Params, dir: &Path, index: usize, count: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut metrics = vec![];
    for i in (index..p.devices).step_by(count) {
        let mut cfg = device::config::Config::load(&dir.join(format!("bf{i}/device.toml")))?;
        cfg.upload_rate = p.device_up;
        cfg.download_rate = p.device_down;
        cfg.parallel_fetches = p.parallel;
        // A worker is started with its fleet's one mode (`forward_args`).
        cfg.peer_exchange = p.modes.first() == Some(&Mode::Mesh);
        let m = Arc::new(DeviceMetrics::default());
        let mut rx = stop_rx.clone();
        let mm = m.clone();
        rt.spawn(async move {
            let name = cfg.name.clone();
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = device::agent::run_with_metrics(cfg, mm, stop).await {
                eprintln!("agent {name}: {:#}", anyhow::Error::new(e));
            }
        });
        metrics.push(m);
    }
    wait(
        "every device to reach the hub",
        Duration::from_secs(60 + metrics.len() as u64 / 5),
        || metrics.iter().all(|m| m.peers.load(Relaxed) > 0),
    )?;
    println!("ready");
    for line in std::io::stdin().lines() {
        let line = line?;
        if let Some(t0) = line.strip_prefix("round ") {
            let t0: u64 = t0.parse()?;
            // The coordinator gives up first (it knows the bound); no limit here.
            wait(
                "every device to run the release",
                Duration::from_secs(86_400),
                || metrics.iter().all(|m| m.last_active_ms.load(Relaxed) >= t0),
            )?;
            let samples: Vec<DeviceSample> = metrics.iter().map(|m| sample(m)).collect();
            println!("{}", serde_json::to_string(&samples)?);
        } else if line == "stop" {
            println!("{}", status_kib(std::process::id(), "VmHWM"));
            break;
        }
    }
    let _ = stop.send(true);
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
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
    workers: &mut [Worker],
    before: &[DeviceSample],
    image: &Path,
    version: &str,
    limit: Duration,
) -> Result<(Round, Vec<DeviceSample>)> {
    let egress = metric(&hub.metrics, "unifleet_hub_blob_bytes_served_total")?;
    let redirects = metric(&hub.metrics, "unifleet_hub_redirects_total")?;
    let hub_requests = metric(&hub.metrics, "unifleet_hub_blob_requests_received_total")?;
    let mut pids: Vec<u32> = workers.iter().map(|w| w.child.id()).collect();
    pids.push(hub.child.id());
    let cpu = || pids.iter().map(|&pid| cpu_seconds(pid)).sum::<f64>();
    let cpu_before = cpu();
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
    eprintln!("    announced at unix {:.1} s", t0 as f64 / 1e3);
    for w in workers.iter_mut() {
        w.say(&format!("round {t0}"))?;
    }
    // Workers answer when all their devices are done; a deadline on the whole round.
    let n_workers = workers.len();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| -> Result<(Round, Vec<DeviceSample>)> {
        for (k, w) in workers.iter_mut().enumerate() {
            let tx = tx.clone();
            scope.spawn(move || {
                let _ = tx.send((k, w.hear()));
            });
        }
        drop(tx);
        let deadline = Instant::now() + limit;
        let mut answers: Vec<Option<Vec<DeviceSample>>> = vec![None; n_workers];
        let mut got = 0;
        while got < answers.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let (k, line) = rx.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!("not every device ran release {version} within {limit:?}")
            })?;
            answers[k] = Some(serde_json::from_str(&line?).context("reading a worker's samples")?);
            got += 1;
        }
        // Worker k ran devices k, k+K, …: put them back in device order.
        let k = answers.len();
        let mut samples = vec![None; before.len()];
        for (w, list) in answers.into_iter().enumerate() {
            for (j, s) in list.unwrap_or_default().into_iter().enumerate() {
                samples[w + j * k] = Some(s);
            }
        }
        let samples: Vec<DeviceSample> = samples
            .into_iter()
            .collect::<Option<_>>()
            .context("a worker reported too few devices")?;
        let secs = |ms: u64| ms.saturating_sub(t0) as f64 / 1e3;
        let mut r = Round {
            hub_egress: metric(&hub.metrics, "unifleet_hub_blob_bytes_served_total")? - egress,
            redirects: metric(&hub.metrics, "unifleet_hub_redirects_total")? - redirects,
            hub_requests: metric(&hub.metrics, "unifleet_hub_blob_requests_received_total")?
                - hub_requests,
            cpu_s: cpu() - cpu_before,
            ..Round::default()
        };
        for (s, b) in samples.iter().zip(before) {
            r.completion.push(secs(s.fetched_ms));
            r.announce.push(secs(s.announced_ms));
            let acc = s.accepted - b.accepted;
            r.bytes_per_device.push(acc);
            r.duplicate_bytes += (s.received - b.received).saturating_sub(acc);
            r.device_requests += s.requests - b.requests;
            r.connections += s.connections - b.connections;
        }
        Ok((r, samples))
    })
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

/// The same image spread by a real BitTorrent swarm: libtorrent's seeder as the hub.
fn run_bittorrent(p: &Params, size: u64) -> Result<Outcome> {
    let parent = fleet_parent(p, size);
    let tmp = tempfile::tempdir_in(&parent)
        .with_context(|| format!("creating the swarm's directory in {}", parent.display()))?;
    let image = testimage(tmp.path(), size, "1.0.0")?;
    eprintln!("{} peers, {size} MiB, bittorrent", p.devices);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_bittorrent.py");
    let limit = t_min(p, size * MIB) * 10.0 + 300.0;
    let out = Command::new(PYTHON)
        .arg(&script)
        .arg("--image")
        .arg(&image)
        .arg("--dir")
        .arg(tmp.path().join("swarm"))
        .args(["--peers", &p.devices.to_string()])
        .args(["--device-up", &p.device_up.to_string()])
        .args(["--device-down", &p.device_down.to_string()])
        .args(["--hub-up", &p.hub_up.to_string()])
        .args(["--limit", &format!("{limit:.0}")])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| {
            format!(
                "running {} (scripts/setup.sh installs python3-libtorrent and opentracker)",
                script.display()
            )
        })?;
    anyhow::ensure!(
        out.status.success(),
        "the BitTorrent swarm failed ({})",
        out.status
    );
    #[derive(serde::Deserialize)]
    struct Swarm {
        completion: Vec<f64>,
        seeder_upload: u64,
        size: u64,
        messages: u64,
        connections: u64,
        cpu_s: f64,
    }
    let s: Swarm = serde_json::from_slice(&out.stdout).context("reading the swarm's outcome")?;
    Ok(Outcome {
        mode: Mode::BitTorrent,
        size: s.size,
        full: Round {
            completion: s.completion,
            hub_egress: s.seeder_upload,
            device_requests: s.messages,
            connections: s.connections,
            cpu_s: s.cpu_s,
            ..Round::default()
        },
        delta: Round::default(),
        hub_rss_kib: 0,
        device_rss_kib: 0.0,
        stores: parent.display().to_string(),
        run: 0,
    })
}

/// The system's Python, where Debian installs python3-libtorrent and python3-matplotlib
/// (a `python3` earlier on the PATH, pyenv's for one, has neither).
const PYTHON: &str = "/usr/bin/python3";

fn run_fleet(p: &Params, size: u64, mode: Mode) -> Result<Outcome> {
    if mode == Mode::BitTorrent {
        return run_bittorrent(p, size);
    }
    let parent = fleet_parent(p, size);
    let tmp = tempfile::tempdir_in(&parent)
        .with_context(|| format!("creating the fleet's directory in {}", parent.display()))?;
    let dir = tmp.path();
    let v1 = testimage(dir, size, "1.0.0")?;
    let v2 = testimage(dir, size, "1.0.1")?;
    let f = std::fs::metadata(&v1)?.len();
    let hub = start_hub(dir, p)?;
    eprintln!(
        "{} devices, {size} MiB, {}: enrolling (stores in {})",
        p.devices,
        mode.name(),
        parent.display()
    );
    enroll_devices(dir, &hub, p)?;
    let count = p.devices.div_ceil(DEVICES_PER_WORKER);
    let mut workers = (0..count)
        .map(|k| Worker::start(p, dir, k, count))
        .collect::<Result<Vec<_>>>()?;
    for w in &mut workers {
        let said = w.hear()?;
        anyhow::ensure!(said == "ready", "a worker said {said:?}");
    }
    let timeline = Timeline::start(
        hub.metrics.clone(),
        p.out.join(format!(
            "fleet-n{}-{size}mib-{}-timeline.csv",
            p.devices,
            mode.name()
        )),
    );
    eprintln!("  every device reached the hub; settling {} s", p.settle);
    std::thread::sleep(Duration::from_secs(p.settle));
    let bound = bound(p, mode, f);
    // Long enough for a fleet on two cores (N = 1,000 has taken 200 s for a 16 s bound);
    // a limit on a hung run, not a target.
    let limit = Duration::from_secs_f64(bound * 10.0 + 300.0);
    eprintln!("  release 1 (bound {bound:.1} s)");
    let zero = DeviceSample::default();
    let (full, after) = round(
        &hub,
        &mut workers,
        &vec![zero; p.devices],
        &v1,
        "1.0.0",
        limit,
    )?;
    eprintln!("  release 2 (a small change)");
    let (delta, _) = round(&hub, &mut workers, &after, &v2, "1.0.1", limit)?;
    drop(timeline);
    let mut device_rss_kib = 0;
    for w in &mut workers {
        w.say("stop")?;
        device_rss_kib += w.hear()?.parse::<u64>().context("a worker's RSS")?;
    }
    Ok(Outcome {
        mode,
        size: f,
        full,
        delta,
        hub_rss_kib: status_kib(hub.child.id(), "VmHWM"),
        device_rss_kib: device_rss_kib as f64 / p.devices as f64,
        stores: parent.display().to_string(),
        run: 0,
    })
}

/// The hub's counters and the machine's CPU once a second, from the moment the fleet is
/// up (CSV beside the results): where a slow round spent its time.
struct Timeline {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const TIMELINE_METRICS: [&str; 9] = [
    "unifleet_hub_blob_bytes_served_total",
    "unifleet_hub_blobs_served_total",
    "unifleet_hub_stored_reports_total",
    "unifleet_hub_redirects_total",
    "unifleet_hub_waits_total",
    "unifleet_hub_tracker_slots_taken",
    "unifleet_hub_tracker_parked",
    "unifleet_hub_busy_total",
    "unifleet_hub_status_accepted_total",
];

impl Timeline {
    fn start(metrics: String, path: PathBuf) -> Timeline {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let began = Instant::now();
            let mut csv = String::from("t_s,unix_s,cpu_busy_pct,tcp_sockets,");
            csv.push_str(
                &TIMELINE_METRICS
                    .map(|m| &m["unifleet_hub_".len()..])
                    .join(","),
            );
            csv.push('\n');
            let mut cpu = cpu_times();
            while !flag.load(Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let now = cpu_times();
                let (busy, total) = (now.0 - cpu.0, (now.1 - cpu.1).max(1));
                cpu = now;
                // One request a sample: every scrape renders the hub's whole page.
                let page = metrics_page(&metrics).unwrap_or_default();
                let values: Vec<String> = TIMELINE_METRICS
                    .iter()
                    .map(|m| metric_in(&page, m).map_or(String::new(), |v| v.to_string()))
                    .collect();
                let _ = writeln!(
                    csv,
                    "{:.0},{},{:.0},{},{}",
                    began.elapsed().as_secs_f64(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    100.0 * busy as f64 / total as f64,
                    tcp_sockets(),
                    values.join(",")
                );
            }
            let _ = std::fs::write(&path, csv);
        });
        Timeline {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Timeline {
    /// Stops sampling and writes the CSV (a failed round's timeline is the useful one).
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where a fleet's directories (the hub's git store, every device's chunk store and image
/// slots) are made: `--dir` if given; else `/dev/shm` (memory) when the fleet fits in half
/// the memory available — about five images per device — else the system's temp dir.
/// N devices simulated on one machine share one disk and one filesystem journal, where a
/// real fleet has N: on this project's VM, 100 devices storing 22,000 chunk files on ext4
/// took the mesh round from ~59 s (memory) to 88–143 s, the disk's cost and not the
/// protocol's (BENCHMARKS.md, "Fleet").
fn fleet_parent(p: &Params, size_mib: u64) -> PathBuf {
    if let Some(dir) = &p.dir {
        return dir.clone();
    }
    let shm = Path::new("/dev/shm");
    let need = p.devices as u64 * size_mib * MIB * 5;
    if shm.is_dir() && need <= mem_available() / 2 {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// MemAvailable from /proc/meminfo, in bytes (0 if unknown).
fn mem_available() -> u64 {
    proc_number("/proc/meminfo", "MemAvailable:").map_or(0, |kib| kib * 1024)
}

/// TCP sockets in use on the machine (/proc/net/sockstat): each connection between two
/// local peers is two.
fn tcp_sockets() -> u64 {
    proc_number("/proc/net/sockstat", "TCP: inuse").unwrap_or(0)
}

/// (busy, total) jiffies of all CPUs, from /proc/stat.
fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
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
    let _ = writeln!(md, "| image | mode | hub egress (× image) | completion p50 / p99 / max | bound | max ÷ bound | max ÷ one-copy bound | p99 ÷ p50 | duplicate bytes | delta release per device (max, % of image) | hub egress, delta | hub redirects | announce p50 / p99 | hub RSS peak | RSS per device | stores in |");
    let _ = writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for o in outcomes {
        let c = &o.full.completion;
        let bound = bound(p, o.mode, o.size);
        if o.mode == Mode::BitTorrent {
            // No second release, announcement or RSS of its own: the swarm's row says
            // what it measured.
            let _ = writeln!(
                md,
                "| {} | bittorrent | {} ({:.2}×) | {:.1} / {:.1} / {:.1} s | T_min {bound:.1} s | {:.2} | {:.2} (of {:.1} s) | {:.2} | — | — | — | — | — | — | — | {} |",
                mib(o.size),
                mib(o.full.hub_egress),
                o.full.hub_egress as f64 / o.size as f64,
                percentile(c, 0.5),
                percentile(c, 0.99),
                percentile(c, 1.0),
                percentile(c, 1.0) / bound,
                percentile(c, 1.0) / t_one_copy(p, o.size),
                t_one_copy(p, o.size),
                percentile(c, 0.99) / percentile(c, 0.5),
                o.stores,
            );
            continue;
        }
        let delta_max = o.delta.bytes_per_device.iter().max().copied().unwrap_or(0);
        let _ = writeln!(
            md,
            "| {} | {} | {} ({:.2}×) | {:.1} / {:.1} / {:.1} s | {} {:.1} s | {:.2} | {} | {:.2} | {} | {} ({:.2}%) | {} | {} | {:.0} / {:.0} ms | {:.1} MiB | {:.2} MiB | {} |",
            mib(o.size),
            o.mode.name(),
            mib(o.full.hub_egress),
            o.full.hub_egress as f64 / o.size as f64,
            percentile(c, 0.5),
            percentile(c, 0.99),
            percentile(c, 1.0),
            if o.mode == Mode::HubOnly { "N·F/u_s" } else { "T_min" },
            bound,
            percentile(c, 1.0) / bound,
            match o.mode {
                Mode::HubOnly => "—".into(),
                _ => format!(
                    "{:.2} (of {:.1} s)",
                    percentile(c, 1.0) / t_one_copy(p, o.size),
                    t_one_copy(p, o.size)
                ),
            },
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
            o.stores,
        );
    }
    md
}

/// Medians over the runs of each (size, mode), with the costs counted per MiB delivered
/// (N × image): blob requests the devices sent (a yamux stream each; BitTorrent: the
/// messages its peers sent), requests the hub received, connections opened, and CPU
/// seconds of every process of the fleet.
fn summary(p: &Params, outcomes: &[Outcome]) -> String {
    let mut md = String::from(
        "| image | mode | runs | last device, each run | median last ÷ bound | hub egress (median) | requests per MiB (devices / hub) | connections per MiB | CPU s per MiB |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut groups: Vec<(u64, Mode, Vec<&Outcome>)> = vec![];
    for o in outcomes {
        match groups
            .iter_mut()
            .find(|(s, m, _)| *s == o.size && *m == o.mode)
        {
            Some((_, _, g)) => g.push(o),
            None => groups.push((o.size, o.mode, vec![o])),
        }
    }
    for (size, mode, runs) in groups {
        let delivered = (p.devices as u64 * size) as f64 / MIB as f64;
        let median = |f: &dyn Fn(&Outcome) -> f64| {
            percentile(&runs.iter().map(|o| f(o)).collect::<Vec<_>>(), 0.5)
        };
        let last = |o: &Outcome| percentile(&o.full.completion, 1.0);
        let each: Vec<String> = runs.iter().map(|o| format!("{:.1}", last(o))).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} s | {:.2} | {:.2}× | {:.1} / {:.1} | {:.2} | {:.3} |",
            mib(size),
            mode.name(),
            runs.len(),
            each.join(", "),
            median(&last) / bound(p, mode, size),
            median(&|o| o.full.hub_egress as f64 / size as f64),
            median(&|o| o.full.device_requests as f64) / delivered,
            median(&|o| o.full.hub_requests as f64) / delivered,
            median(&|o| o.full.connections as f64) / delivered,
            median(&|o| o.full.cpu_s) / delivered,
        );
    }
    md
}

fn main() -> Result<()> {
    let p = params()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some((dir, index, count)) = &p.worker {
        return worker(&p, dir, *index, *count);
    }
    let Some((size, mode)) = p.one else {
        return parent(&p);
    };
    let outcome = run_fleet(&p, size, mode)?;
    println!("{}", serde_json::to_string(&outcome)?);
    Ok(())
}

/// Runs one (size, mode) fleet in a process of its own and reads its outcome.
fn one_fleet(size: u64, mode: Mode) -> Result<Outcome> {
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
    serde_json::from_str(line).context("reading the outcome")
}

/// Runs each (size, mode) fleet in a process of its own (a clean slate, and an honest
/// memory peak), then writes the report, the CSV and the chart.
fn parent(p: &Params) -> Result<()> {
    std::fs::create_dir_all(&p.out)?;
    let began = Instant::now();
    let (mut outcomes, mut failed) = (vec![], vec![]);
    for &size in &p.sizes_mib {
        for (&mode, run) in p
            .modes
            .iter()
            .flat_map(|m| (0..p.runs).map(move |r| (m, r)))
        {
            eprintln!(
                "[{size} MiB, {}, run {} of {}]",
                mode.name(),
                run + 1,
                p.runs
            );
            // A fleet that fails is reported and the others go on: one bad run (a
            // swarm that cannot finish on this machine) does not lose the rest.
            match one_fleet(size, mode) {
                Ok(mut o) => {
                    o.run = run;
                    outcomes.push(o);
                }
                Err(e) => {
                    eprintln!("  failed, going on with the others: {e:#}");
                    failed.push(format!("{size} MiB {} run {}", mode.name(), run + 1));
                }
            }
        }
    }
    let p = p.clone();
    let md = format!(
        "{}\nMedians and counted costs:\n\n{}",
        report(&p, &outcomes),
        summary(&p, &outcomes)
    );
    let stem = format!("fleet-n{}", p.devices);
    let mut csv = String::from("mode,run,image_mib,t_min_s,device,completion_s\n");
    for o in &outcomes {
        for (i, c) in o.full.completion.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{},{},{},{:.3},{i},{c:.3}",
                o.mode.name(),
                o.run,
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
    if !outcomes.is_empty() {
        let plotted = Command::new(PYTHON)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/plot_fleet.py"))
            .arg(&csv_path)
            .arg(&png)
            .arg(format!("N = {}", p.devices))
            .status();
        match plotted {
            Ok(s) if s.success() => println!("chart: {}", png.display()),
            _ => eprintln!(
                "no chart: scripts/plot_fleet.py needs python3-matplotlib (scripts/setup.sh)"
            ),
        }
    }
    println!(
        "\n(all of it in {:.0} s; {} and {}.csv in {})",
        began.elapsed().as_secs_f64(),
        format_args!("{stem}.md"),
        stem,
        p.out.display()
    );
    anyhow::ensure!(
        failed.is_empty(),
        "{} of the fleets failed ({}); the report has the others",
        failed.len(),
        failed.join(", ")
    );
    Ok(())
}
