//! Bursting to a hosted host (issue 30, "Burst to a real hosted host"): what a connection
//! that lands on the hosted host waits for its first byte, with and without the image
//! upload, and the proxy's throughput to a hosted instance against a direct connection to
//! it. Under `qemu:///system` (libvirtd: `scripts/setup.sh`), release build first:
//!
//!     cargo build --release --workspace --bins
//!     scripts/build-unikernel.sh          # if target/unikernels/ lacks the x86_64 image
//!     ./target/release/bench_hosted [--rounds 3] [--requests 2000] [--hosted-domain-type kvm|qemu]
//!
//! The fleet of `tests/tests/hosted.rs` (`unifleet_tests::hosted::burst_fleet`): one hub,
//! a hosted host (`scripts/hosted-libvirt.sh`: its own libvirtd in a network namespace at
//! 203.0.113.194, reached over libvirt's TLS transport, guests on its routed network from
//! 203.0.113.226), and one device serving the template on demand with `max_local = 1`,
//! `max_remote = 1`, `target = 1` (one connection per instance), `idle_secs = 1`; local
//! guests on guest network slot 2 under `domain_type = "qemu"` (TCG: the test fleet's
//! setting, `Fleet::add_device`), hosted ones under the `[hosted]` table's `domain_type`
//! (`kvm` unless `--hosted-domain-type`). The domain types are read back from the domains'
//! XML and printed.
//! Each round publishes a new release (`1.0.R`, `--network --probe http:/health
//! --memory-mib 16 --no-staging`; round 0 uses the first one), so its image is a new volume
//! on the hosted host, and measures, every instance booted cold (no domain of the device
//! on either host and its agent done stopping the last ones, waited for, in between):
//!
//! 1. **burst with upload**: a first client through the device's proxy, answered by a
//!    local cold start (the baseline: connect → first byte of `GET /`), holds its
//!    connection; a second one bursts: connect → first byte, its image not yet in the
//!    hosted host's pool (uploaded through libvirt, read back, its digest checked, then
//!    booted). From the agent's log (its timestamps, the same clock): connect → the start
//!    decided, → image uploaded and checked, → instance ready (healthy), → first byte.
//! 2. **burst without upload**: both connections closed, both instances gone, the same
//!    again: the volume is reused.
//! 3. **throughput**: with that burst's two connections held, `--requests` keep-alive
//!    `GET /` on the hosted connection through the proxy (every answer must name the hosted
//!    guest's MAC) and as many on one connection straight to the guest's routed address
//!    (203.0.113.226:80) from this (the root) namespace; the order alternates per round.
//!
//! Figures are medians of the rounds; each round is printed to stderr as it ends, the
//! table goes to stdout.
#![allow(clippy::print_stdout)]

use anyhow::{bail, Context, Result};
use std::io::BufReader;
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use unifleet_tests::bench::percentile;
use unifleet_tests::fleet::{running_domains, wait_for};
use unifleet_tests::hosted::{
    burst_fleet, lines, timed_client, Burst, HOSTED_GUEST, HOSTED_MAC, URI,
};
use unifleet_tests::http::answer_of;

const UPLOADED: &str = "image uploaded to the hosted host and checked";

struct Args {
    rounds: usize,
    requests: usize,
    hosted_domain_type: Option<String>,
}

const USAGE: &str = "usage: bench_hosted [--rounds N (3)] [--requests N (2000)] \
                     [--hosted-domain-type kvm|qemu (the [hosted] table's: kvm)]\n\
                     (see the doc comment of tests/src/bin/bench_hosted.rs)";

fn args() -> Result<Args> {
    let mut a = Args {
        rounds: 3,
        requests: 2000,
        hosted_domain_type: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--rounds" => a.rounds = value()?.parse().context("--rounds")?,
            "--requests" => a.requests = value()?.parse().context("--requests")?,
            "--hosted-domain-type" => a.hosted_domain_type = Some(value()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unknown argument {flag}\n{USAGE}"),
        }
    }
    anyhow::ensure!(a.rounds > 0 && a.requests > 0, "{USAGE}");
    Ok(a)
}

/// One burst: the local baseline and the hosted connection, ms.
#[derive(Debug, Default, Clone)]
struct Burst1 {
    /// The first client's connect → first byte (a local cold start).
    local: f64,
    /// The agent's boot-to-healthy of that local instance.
    local_boot: f64,
    /// The second client's connect → first byte (landed on the hosted host).
    hosted: f64,
    /// The agent's boot-to-healthy of the hosted instance (staging included).
    hosted_boot: f64,
    /// From the second client's connect to the agent's "starting" line.
    decided: f64,
    /// "starting" → "image uploaded … and checked" (NaN without upload).
    staged: f64,
    /// "image uploaded" (or "starting", without upload) → "ready".
    booted: f64,
    /// "ready" → the client's first byte.
    after_ready: f64,
}

#[derive(Debug, Default, Clone)]
struct Round {
    upload: Burst1,
    reuse: Burst1,
    proxy_rps: f64,
    direct_rps: f64,
    /// The domain types the instances ran under (`<domain type=…>`).
    local_type: String,
    hosted_type: String,
}

fn main() -> Result<()> {
    let args = args()?;
    let load_before = loadavg();
    let dt = args.hosted_domain_type.clone();
    let mut b = burst_fleet("bh", 1, 1, |h| match &dt {
        Some(dt) => h
            .table
            .lines()
            .filter(|l| !l.starts_with("domain_type"))
            .chain([format!("domain_type = \"{dt}\"").as_str()])
            .collect::<Vec<_>>()
            .join("\n"),
        None => h.table.clone(),
    })?;
    let res = bench(&mut b, &args);
    let rounds = match res {
        Ok(r) => r,
        Err(e) => {
            let log = b.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(e.context(format!("the device's log ends:\n{}", tail.join("\n"))));
        }
    };
    let log = b.log();
    let bytes = log
        .lines()
        .find(|l| l.contains(UPLOADED))
        .and_then(|l| field(l, "bytes"))
        .unwrap_or_default();
    report(&args, &rounds, &bytes, &load_before);
    Ok(())
}

fn bench(b: &mut Burst, args: &Args) -> Result<Vec<Round>> {
    let mut rounds = vec![];
    for r in 0..args.rounds {
        let version = format!("1.0.{r}");
        if r > 0 {
            b.publish(&version, r as u64 + 1)?;
        }
        quiet(b)?;
        let (l, h, upload) =
            burst(b, &version, true).with_context(|| format!("round {r}, upload"))?;
        drop((l, h));
        quiet(b)?;
        let (mut local, mut hosted, reuse) =
            burst(b, &version, false).with_context(|| format!("round {r}, reuse"))?;
        let (local_type, hosted_type) = domain_types(b)?;
        let (proxy_rps, direct_rps) =
            throughput(&mut hosted, &mut local, &version, args.requests, r)
                .with_context(|| format!("round {r}, throughput"))?;
        // Both instances served all along: the held connections are still theirs.
        answer_of(&mut local, &version).context("the local connection after the load")?;
        drop((local, hosted));
        let round = Round {
            upload,
            reuse,
            proxy_rps,
            direct_rps,
            local_type,
            hosted_type,
        };
        let u = &round.upload;
        let n = &round.reuse;
        eprintln!(
            "round {r} ({version}): local cold {:.0} / {:.0} ms; hosted with upload {:.0} ms \
             (decided {:.0}, staged {:.0}, booted {:.0}, then {:.0}; agent boot {:.0}), \
             without upload {:.0} ms (decided {:.0}, booted {:.0}, then {:.0}; agent boot {:.0}); \
             {} requests: proxy {:.0} req/s, direct {:.0} req/s, ratio {:.2}",
            u.local,
            n.local,
            u.hosted,
            u.decided,
            u.staged,
            u.booted,
            u.after_ready,
            u.hosted_boot,
            n.hosted,
            n.decided,
            n.booted,
            n.after_ready,
            n.hosted_boot,
            args.requests,
            proxy_rps,
            direct_rps,
            proxy_rps / direct_rps,
        );
        rounds.push(round);
    }
    quiet(b)?;
    Ok(rounds)
}

/// The domain types of the device's running instances: (local, hosted).
fn domain_types(b: &Burst) -> Result<(String, String)> {
    let local = running_domains(URI, &b.prefix);
    let [local] = local.as_slice() else {
        bail!("not one local instance: {local:?}");
    };
    let xml = unifleet_tests::fleet::run(
        std::process::Command::new("virsh").args(["-q", "-c", URI, "dumpxml", local]),
    )?;
    let hosted = b.host.domains(&b.hosted_prefix)?;
    let [hosted] = hosted.as_slice() else {
        bail!("not one hosted instance: {hosted:?}");
    };
    let hosted_xml = b.host.virsh(&["dumpxml", hosted])?;
    let of = |xml: &str| {
        field(&format!(" {}", xml.trim_start()), "<domain type")
            .map(|t| t.trim_matches(|c| c == '\'' || c == '"').to_string())
            .with_context(|| format!("no domain type in {xml:.200}"))
    };
    Ok((of(&xml)?, of(&hosted_xml)?))
}

/// Waits until the device runs no instance on either host and its agent has finished
/// stopping every one it stopped: the next start is cold.
fn quiet(b: &Burst) -> Result<()> {
    b.no_hosted_domains(Duration::from_secs(90))?;
    wait_for("no local instance", Duration::from_secs(90), || {
        running_domains(URI, &b.prefix).is_empty().then_some(())
    })?;
    wait_for(
        "the agent done stopping instances",
        Duration::from_secs(60),
        || {
            let log = b.log();
            let done = lines(&log, "on-demand instance stopped")
                + lines(&log, "stopping on-demand instance:");
            (done >= lines(&log, "stopping on-demand instance app=")).then_some(())
        },
    )
}

/// A burst of release `version`: a first client (local), a second (hosted); the image must
/// (`upload`) or must not have been uploaded for it. Both connections are returned, held.
fn burst(
    b: &Burst,
    version: &str,
    upload: bool,
) -> Result<(BufReader<TcpStream>, BufReader<TcpStream>, Burst1)> {
    let uploads = lines(&b.log(), UPLOADED);
    let (local, mine, local_ms) = timed_client(b.port, version)?;
    anyhow::ensure!(mine != HOSTED_MAC, "the first client answered by {mine}");
    let connected = unix_now();
    let (hosted, theirs, hosted_ms) = timed_client(b.port, version)?;
    anyhow::ensure!(
        theirs == HOSTED_MAC,
        "the second client answered by {theirs}, not the hosted guest"
    );
    let log = b.log();
    let uploaded = lines(&log, UPLOADED) - uploads;
    anyhow::ensure!(
        uploaded == usize::from(upload),
        "{uploaded} uploads logged for this burst, expected {}",
        usize::from(upload)
    );
    let mut m = Burst1 {
        local: ms(local_ms),
        hosted: ms(hosted_ms),
        ..Burst1::default()
    };
    let ready = |at: &str| {
        log.lines()
            .rev()
            .find(|l| l.contains("on-demand instance ready") && l.contains(&format!("at={at}")))
            .with_context(|| format!("no ready line at={at}"))
    };
    let local_ready = ready("Local")?;
    m.local_boot = num(local_ready, "boot_ms")?;
    let remote_ready = ready("Remote")?;
    m.hosted_boot = num(remote_ready, "boot_ms")?;
    // The hosted instance's own lines, by its name.
    let name = field(remote_ready, "instance").context("the instance's name")?;
    let starting = log
        .lines()
        .find(|l| {
            l.contains("starting on-demand instance")
                && field(l, "instance").as_deref() == Some(name.as_str())
        })
        .context("no starting line")?;
    let (t_start, t_ready) = (stamp(starting)?, stamp(remote_ready)?);
    m.decided = (t_start - connected) * 1e3;
    m.after_ready = (connected + m.hosted / 1e3 - t_ready) * 1e3;
    if upload {
        let at = log
            .lines()
            .rev()
            .find(|l| l.contains(UPLOADED))
            .context("upload")?;
        let t_up = stamp(at)?;
        m.staged = (t_up - t_start) * 1e3;
        m.booted = (t_ready - t_up) * 1e3;
    } else {
        m.staged = f64::NAN;
        m.booted = (t_ready - t_start) * 1e3;
    }
    Ok((local, hosted, m))
}

/// `n` keep-alive `GET /` through the proxy on `hosted` (a connection to the hosted
/// instance) and as many on a new connection straight to the guest: requests/s of each.
/// `local`, the connection that holds the local instance, is asked once every 10 s
/// meanwhile: the guest closes a connection idle for 30 s.
fn throughput(
    hosted: &mut BufReader<TcpStream>,
    local: &mut BufReader<TcpStream>,
    version: &str,
    n: usize,
    round: usize,
) -> Result<(f64, f64)> {
    hosted.get_ref().set_nodelay(true)?;
    let addr: std::net::SocketAddr = format!("{HOSTED_GUEST}:80").parse()?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr} directly"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut direct = BufReader::new(s);
    let mut asked = Instant::now();
    let mut run = |r: &mut BufReader<TcpStream>, what: &str| -> Result<f64> {
        let t = Instant::now();
        for i in 0..n {
            if asked.elapsed() > Duration::from_secs(10) {
                answer_of(local, version).context("the local connection, during the load")?;
                asked = Instant::now();
            }
            let who = answer_of(r, version).with_context(|| format!("{what}, request {i}"))?;
            anyhow::ensure!(who == HOSTED_MAC, "{what}: answered by {who}");
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    };
    if round.is_multiple_of(2) {
        let p = run(hosted, "through the proxy")?;
        Ok((p, run(&mut direct, "direct")?))
    } else {
        let d = run(&mut direct, "direct")?;
        Ok((run(hosted, "through the proxy")?, d))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// A log line's `key=value` field (the value up to the next space).
fn field(line: &str, key: &str) -> Option<String> {
    let needle = format!(" {key}=");
    let rest = &line[line.find(&needle)? + needle.len()..];
    Some(rest.split_whitespace().next()?.to_string())
}

fn num(line: &str, key: &str) -> Result<f64> {
    field(line, key)
        .with_context(|| format!("no {key} in {line:?}"))?
        .parse()
        .with_context(|| format!("{key} in {line:?}"))
}

/// The time of a log line (the agent's `2026-12-07T10:11:12.123456Z` prefix), in seconds
/// since 1970.
fn stamp(line: &str) -> Result<f64> {
    let t = line.split_whitespace().next().context("an empty line")?;
    let bad = || format!("no timestamp at the start of {line:?}");
    let (date, time) = t.split_once('T').with_context(bad)?;
    let time = time.strip_suffix('Z').with_context(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(bad)?;
    let [y, m, day] = d[..] else { bail!(bad()) };
    let hms: Vec<f64> = time
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(bad)?;
    let [h, min, s] = hms[..] else { bail!(bad()) };
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

fn report(args: &Args, rounds: &[Round], bytes: &str, load_before: &str) {
    let med = |f: &dyn Fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    let each = |f: &dyn Fn(&Round) -> f64, digits: usize| {
        rounds
            .iter()
            .map(|r| format!("{:.*}", digits, f(r)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let types = |f: &dyn Fn(&Round) -> &str| {
        let mut v: Vec<&str> = rounds.iter().map(f).collect();
        v.dedup();
        v.join(", ")
    };
    println!(
        "\nbench_hosted: {} rounds, {} requests per throughput run; domain types: local {}, \
         hosted {}; image {bytes} B; load average {load_before} before, {} after",
        rounds.len(),
        args.requests,
        types(&|r| &r.local_type),
        types(&|r| &r.hosted_type),
        loadavg(),
    );
    println!("\n| measure | median | per round |");
    println!("|---|---|---|");
    let row = |name: &str, f: &dyn Fn(&Round) -> f64, unit: &str, digits: usize| {
        println!(
            "| {name} | **{:.*}{unit}** | {} |",
            digits,
            med(f),
            each(f, digits)
        );
    };
    row(
        "local cold start (first client), connect → first byte, burst with upload",
        &|r| r.upload.local,
        " ms",
        0,
    );
    row(
        "local cold start (first client), connect → first byte, burst without upload",
        &|r| r.reuse.local,
        " ms",
        0,
    );
    row(
        "local: the agent's boot-to-healthy (without-upload burst)",
        &|r| r.reuse.local_boot,
        " ms",
        0,
    );
    row(
        "**hosted, with upload**: connect → first byte",
        &|r| r.upload.hosted,
        " ms",
        0,
    );
    row(
        "  connect → the agent starts the hosted instance",
        &|r| r.upload.decided,
        " ms",
        0,
    );
    row(
        "  start → image uploaded, read back and digest checked",
        &|r| r.upload.staged,
        " ms",
        0,
    );
    row(
        "  image checked → instance healthy (define, boot, probe)",
        &|r| r.upload.booted,
        " ms",
        0,
    );
    row(
        "  healthy → first byte (proxy over the routed link)",
        &|r| r.upload.after_ready,
        " ms",
        0,
    );
    row(
        "  the agent's boot-to-healthy (staging included)",
        &|r| r.upload.hosted_boot,
        " ms",
        0,
    );
    row(
        "**hosted, without upload** (volume reused): connect → first byte",
        &|r| r.reuse.hosted,
        " ms",
        0,
    );
    row(
        "  connect → the agent starts the hosted instance",
        &|r| r.reuse.decided,
        " ms",
        0,
    );
    row("  start → instance healthy", &|r| r.reuse.booted, " ms", 0);
    row("  healthy → first byte", &|r| r.reuse.after_ready, " ms", 0);
    row(
        "hosted with upload ÷ without",
        &|r| r.upload.hosted / r.reuse.hosted,
        "×",
        2,
    );
    row(
        "hosted with upload − without",
        &|r| r.upload.hosted - r.reuse.hosted,
        " ms",
        0,
    );
    row(
        "hosted without upload ÷ local cold (same burst)",
        &|r| r.reuse.hosted / r.reuse.local,
        "×",
        2,
    );
    row(
        "throughput through the proxy to the hosted instance (1 keep-alive connection)",
        &|r| r.proxy_rps,
        " req/s",
        0,
    );
    row(
        "throughput direct to 203.0.113.226:80 (1 keep-alive connection)",
        &|r| r.direct_rps,
        " req/s",
        0,
    );
    row("proxy ÷ direct", &|r| r.proxy_rps / r.direct_rps, "", 2);
}
