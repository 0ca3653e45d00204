//! Shared utilities for unifleet's end-to-end tests: locating the real binaries, free
//! loopback ports, and waiting for a line of output with a deadline (never sleep-to-sync).

use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Path of a workspace binary (`fwtool`, `hub`, `device`) built beside the test binary.
/// The README's test command builds them first (`cargo build --workspace --bins`).
pub fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    // Test binaries live in target/<profile>/deps/, programs in target/<profile>/.
    let dirs = [exe.parent(), exe.parent().and_then(|d| d.parent())];
    for dir in dirs.into_iter().flatten() {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!(
        "{name} not found beside {}; build it first with `cargo build --workspace --bins`",
        exe.display()
    )
}

/// A workspace binary cross-built for `triple` (`scripts/cross.sh TRIPLE`), in
/// target/<triple>/<profile>/ beside this test's own profile.
pub fn cross_bin(triple: &str, name: &str) -> Result<PathBuf> {
    let native = bin(name)?;
    let profile_dir = native.parent().context("binary has a directory")?;
    let profile = profile_dir.file_name().context("profile directory")?;
    let target = profile_dir.parent().context("target directory")?;
    let path = target.join(triple).join(profile).join(name);
    if !path.is_file() {
        bail!(
            "{} not found; build it first with `scripts/cross.sh {triple}`",
            path.display()
        );
    }
    Ok(path)
}

/// A loopback TCP port that was free a moment ago. Whoever binds it next may race
/// another process; callers that hand it to a child retry on "address in use".
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Reads from `reader` until the accumulated output contains `needle` or `timeout`
/// passes. The reader must have a read timeout set (sockets) or be non-blocking-safe
/// (pipes read on a thread); returns everything read so far.
pub fn read_until(reader: &mut impl Read, needle: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        if String::from_utf8_lossy(&seen).contains(needle) {
            return Ok(String::from_utf8_lossy(&seen).into_owned());
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for {needle:?}; got {:?}",
                String::from_utf8_lossy(&seen)
            );
        }
        match reader.read(&mut buf) {
            Ok(0) => bail!(
                "stream closed while waiting for {needle:?}; got {:?}",
                String::from_utf8_lossy(&seen)
            ),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e).context("reading"),
        }
    }
}

/// Polls a file (e.g. a console log written by QEMU) until it contains `needle`.
/// Polling a file is the only way to learn that another process wrote to it; the
/// interval is short and the deadline bounds the wait.
pub fn wait_for_file_line(
    path: &std::path::Path,
    needle: &str,
    timeout: Duration,
) -> Result<String> {
    fleet::wait_for(
        &format!("{needle:?} in {}", path.display()),
        timeout,
        || {
            std::fs::read_to_string(path)
                .ok()
                .filter(|t| t.contains(needle))
        },
    )
    .map_err(|e| {
        e.context(format!(
            "{} holds {:?}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        ))
    })
}

pub mod fleet;
pub mod guestnet;
pub mod homes;
pub mod hosted;
pub mod http;
pub mod lazyfs;
pub mod powercut;
pub mod silent;
pub mod sim;
pub mod template;

/// Publishes one MQTT message and waits for the broker's acknowledgement.
pub fn mqtt_publish(url: &str, topic: &str, payload: Vec<u8>, retain: bool) -> Result<()> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let rest = url.strip_prefix("mqtt://").context("mqtt:// URL")?;
    let (host, port) = rest.rsplit_once(':').context("host:port")?;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = format!(
        "unifleet-test-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut opts = MqttOptions::new(id, host, port.parse()?);
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut conn) = Client::new(opts, 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Publish only once the broker acknowledged the connection.
    let mut published = false;
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) if !published => {
                client.publish(topic, QoS::AtLeastOnce, retain, payload.clone())?;
                published = true;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                let _ = client.disconnect();
                return Ok(());
            }
            Ok(Err(e)) => bail!("MQTT publish to {url}: {e}"),
            _ => {}
        }
    }
    bail!("no PUBACK from {url} within 10 s")
}

/// Reads one Prometheus metric from an HTTP endpoint (`addr` is `host:port`).
pub fn metric(addr: &str, name: &str) -> Result<u64> {
    metric_in(&metrics_page(addr)?, name)
}

/// The whole metrics page of an HTTP endpoint (one request for several metrics).
pub fn metrics_page(addr: &str) -> Result<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr)
        .with_context(|| format!("connecting to metrics at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// One metric's value on a page read by [`metrics_page`].
pub fn metric_in(page: &str, name: &str) -> Result<u64> {
    let line = page
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .with_context(|| format!("no {name} in {page}"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("metric value")?
        .parse()?)
}

/// Subscribes to `topic` and returns the first message (a retained one arrives at once),
/// or fails after `timeout`.
pub fn mqtt_first_message(url: &str, topic: &str, timeout: Duration) -> Result<Vec<u8>> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let parsed = net::broker_tls::BrokerUrl::parse(url).map_err(anyhow::Error::msg)?;
    let mut opts = MqttOptions::new(
        format!("unifleet-test-sub-{}", std::process::id()),
        parsed.host,
        parsed.port,
    );
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut conn) = Client::new(opts, 10);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                client.subscribe(topic, QoS::AtLeastOnce)?
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return Ok(p.payload.to_vec()),
            // Broker not there (yet): keep trying until the deadline.
            Ok(Err(_)) => std::thread::sleep(Duration::from_millis(100)),
            _ => {}
        }
    }
    bail!("no message on {topic} at {url} within {timeout:?}")
}

/// Small helpers shared by the benchmark programs.
pub mod bench {
    use anyhow::Context;

    pub const MIB: u64 = 1 << 20;

    /// A rate in bytes per second: a number with an optional K or M suffix (KiB, MiB).
    pub fn rate(s: &str) -> anyhow::Result<u64> {
        let (num, mult) = match s.chars().last() {
            Some('K' | 'k') => (&s[..s.len() - 1], 1024),
            Some('M' | 'm') => (&s[..s.len() - 1], MIB),
            _ => (s, 1),
        };
        let v: f64 = num
            .parse()
            .with_context(|| format!("not a rate: {s} (bytes per second, K or M suffix)"))?;
        Ok((v * mult as f64) as u64)
    }

    /// The `q` quantile (0..=1, nearest rank) of `v`; NaN for none.
    pub fn percentile(v: &[f64], q: f64) -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * q).round() as usize]
    }

    /// User and system CPU seconds a process has used (/proc/PID/stat; 0 if it is gone).
    pub fn cpu_seconds(pid: u32) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces), from the state (3rd) on:
        // utime and stime are the 14th and 15th, in clock ticks.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // USER_HZ: 100 on every Linux architecture.
        (ticks(11) + ticks(12)) as f64 / 100.0
    }

    /// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`, `RssAnon`, `RssFile`); 0 if
    /// unreadable.
    pub fn status_kib(pid: u32, field: &str) -> u64 {
        proc_number(&format!("/proc/{pid}/status"), &format!("{field}:")).unwrap_or(0)
    }

    /// The number after `label` on the first line of the `/proc` file `path` that starts
    /// with it ("MemAvailable:   123 kB", "TCP: inuse 42 orphan 0 …").
    pub fn proc_number(path: &str, label: &str) -> Option<u64> {
        std::fs::read_to_string(path)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(label))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}
