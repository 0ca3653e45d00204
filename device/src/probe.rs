//! Whether a freshly started instance is healthy: its release's health probe, tried until
//! the boot spec's timeout passes, from the caller's task (not the hypervisor's thread,
//! which it only asks whether the domain still runs and which address the guest has).
//!
//! A release with a network interface is probed on the **guest's** address: `tcp:PORT`
//! connects there and `http:PORT/PATH` wants a `200` to `GET PATH`. Without one, `tcp`
//! dials the device's loopback (the console port for port 0, where the test image
//! answers) and `banner` reads the console log.

use crate::hypervisor::{console_tail, ActivateError, Booted, Driver, Hypervisor, Launch};
use crate::hypervisor::{ProbeFailure, Started};
use proto::manifest::HealthProbe;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Between two tries, a twentieth of the time waited so far within these bounds: polling
/// adds at most ~5% to a boot however long it takes (a template guest with a static
/// address answers ~100 ms after its create under TCG, a nested-KVM one in seconds). The
/// console log is written by another process: polling it is the only way to see it.
const RETRY_LEAST: Duration = Duration::from_millis(5);
const RETRY_MOST: Duration = Duration::from_millis(50);
/// One connection attempt or HTTP exchange at most.
const ATTEMPT: Duration = Duration::from_secs(1);
/// The least budget of a try.
const LAST_TRY: Duration = Duration::from_millis(200);
/// The most of an answer read for its status line.
const HEAD: usize = 1024;

/// What a try saw, for the error when the time is up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Seen {
    #[error("no line {0:?} on the console")]
    NoBanner(String),
    #[error("the guest has no address yet (no DHCP lease on its network interface)")]
    NoAddress,
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("GET {path} on {addr}: {reason}")]
    NoAnswer {
        addr: SocketAddr,
        path: String,
        reason: String,
    },
    #[error("GET {path} on {addr} answered {status}")]
    Status {
        addr: SocketAddr,
        path: String,
        status: u16,
    },
}

/// Starts `launch` and waits until its health probe passes; the one boot path of the
/// updater, the watchdog and the on-demand pool. A domain that fails its probe is left
/// running for the caller to stop (the caller knows whether it replaces one).
pub async fn boot(hv: &Hypervisor, launch: &Launch) -> Result<Booted, ActivateError> {
    let started = hv.start(launch).await?;
    healthy(hv, launch, started).await
}

/// Waits until `l`, just started, passes its probe; returns how to reach it. Fails when
/// the domain stops first or the boot spec's timeout passes, with the console's tail.
pub async fn healthy(
    hv: &Hypervisor,
    l: &Launch,
    started: Started,
) -> Result<Booted, ActivateError> {
    let timeout = Duration::from_millis(l.boot.probe_timeout_ms);
    let began = Instant::now();
    let deadline = began + timeout;
    let fail = |reason: ProbeFailure| ActivateError::Probe {
        name: l.name.clone(),
        reason,
        console_tail: console_tail(&l.console_log, proto::status::MAX_CONSOLE_TAIL),
    };
    let mut booted = Booted {
        console_port: started.console_port,
        address: None,
    };
    if hv.driver() == Driver::Test {
        // Nothing really boots: healthy is running.
        if !hv.is_running(&l.name).await {
            return Err(fail(ProbeFailure::NotRunning));
        }
        if l.nic.is_some() {
            booted.address = hv.address(&l.name).await?;
        }
        return Ok(booted);
    }
    loop {
        if l.nic.is_some() && booted.address.is_none() {
            booted.address = hv.address(&l.name).await.unwrap_or_else(|e| {
                tracing::debug!("{e}");
                None
            });
        }
        // The last try gets a fair budget (it names what went wrong), overrunning the
        // deadline by at most that.
        let left = deadline.saturating_duration_since(Instant::now());
        let limit = left.clamp(LAST_TRY, ATTEMPT);
        let seen = match check(l, &booted, limit).await {
            // A guest with a NIC is reached on its address: healthy without one (a
            // console banner) would leave the proxy nowhere to send clients.
            Ok(()) if l.nic.is_some() && booted.address.is_none() => Seen::NoAddress,
            Ok(()) => return Ok(booted),
            Err(seen) => seen,
        };
        if !hv.is_running(&l.name).await {
            return Err(fail(ProbeFailure::Stopped));
        }
        if Instant::now() >= deadline {
            return Err(fail(ProbeFailure::Timeout {
                after: timeout,
                last: seen.to_string(),
            }));
        }
        tokio::time::sleep(retry_after(began.elapsed())).await;
    }
}

/// How long to wait before the next try, `waited` into a boot.
fn retry_after(waited: Duration) -> Duration {
    (waited / 20).clamp(RETRY_LEAST, RETRY_MOST)
}

/// Whether `l`'s probe can be tried again while it runs: it speaks to the guest over its
/// network interface (a console banner, once printed, says nothing more).
pub fn rechecks(l: &Launch) -> bool {
    l.nic.is_some()
        && matches!(
            l.boot.probe,
            HealthProbe::Http { .. } | HealthProbe::TcpConnect { .. }
        )
}

/// One try of a running instance's probe (see [`rechecks`]): `Err` says what it saw.
pub async fn alive(hv: &Hypervisor, l: &Launch) -> Result<(), String> {
    let address = hv.address(&l.name).await.map_err(|e| e.to_string())?;
    let booted = Booted {
        console_port: 0,
        address,
    };
    check(l, &booted, ATTEMPT).await.map_err(|e| e.to_string())
}

/// One try of the probe.
async fn check(l: &Launch, booted: &Booted, limit: Duration) -> Result<(), Seen> {
    let guest = |port| match (l.nic.is_some(), booted.address) {
        (true, Some(ip)) => Ok(SocketAddr::new(ip, port)),
        (true, None) => Err(Seen::NoAddress),
        (false, _) => Ok(SocketAddr::from((
            [127, 0, 0, 1],
            if port == 0 { booted.console_port } else { port },
        ))),
    };
    match &l.boot.probe {
        HealthProbe::ConsoleBanner { line } => {
            let text = tokio::fs::read_to_string(&l.console_log)
                .await
                .unwrap_or_default();
            match text.lines().any(|t| t.trim_end() == line) {
                true => Ok(()),
                false => Err(Seen::NoBanner(line.clone())),
            }
        }
        HealthProbe::TcpConnect { port } => {
            let addr = guest(*port)?;
            match tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(Seen::Connect {
                    addr,
                    reason: e.to_string(),
                }),
                Err(_) => Err(Seen::Connect {
                    addr,
                    reason: format!("no answer within {limit:?}"),
                }),
            }
        }
        HealthProbe::Http { port, path } => {
            let addr = guest(*port)?;
            match http_status(addr, path, limit).await? {
                200 => Ok(()),
                status => Err(Seen::Status {
                    addr,
                    path: path.clone(),
                    status,
                }),
            }
        }
    }
}

/// `GET path` on `addr`: the answer's status code.
async fn http_status(addr: SocketAddr, path: &str, limit: Duration) -> Result<u16, Seen> {
    let no_answer = |reason: String| Seen::NoAnswer {
        addr,
        path: path.into(),
        reason,
    };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| Seen::Connect {
                addr,
                reason: e.to_string(),
            })?;
        let host = match addr.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: unifleet-probe\r\nConnection: close\r\n\r\n"
        );
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| no_answer(e.to_string()))?;
        let mut head = Vec::with_capacity(256);
        while head.len() < HEAD && !head.windows(2).any(|w| w == b"\r\n") {
            let mut buf = [0u8; 256];
            match s.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
                Err(e) => return Err(no_answer(e.to_string())),
            }
        }
        status_of(&head).ok_or_else(|| no_answer("not an HTTP answer".into()))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| Err(no_answer(format!("no answer within {limit:?}"))))
}

/// The status code of an HTTP/1.x status line at the start of `head`.
fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split(' ');
    let version = words.next()?;
    let code = words.next()?;
    (version.starts_with("HTTP/1.") && code.len() == 3)
        .then(|| code.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_poll_at_a_twentieth_of_the_wait_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(retry_after(ms(0)), ms(5));
        assert_eq!(retry_after(ms(400)), ms(20));
        assert_eq!(retry_after(ms(60_000)), ms(50));
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            status_of(b"HTTP/1.1 200 OK\r\nContent-Length: 2"),
            Some(200)
        );
        assert_eq!(
            status_of(b"HTTP/1.0 500 Internal Server Error\r\n"),
            Some(500)
        );
        assert_eq!(status_of(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b"HTTP/1.1 2000 OK\r\n"), None);
        assert_eq!(status_of(b""), None);
    }

    /// A one-shot HTTP server on loopback answering `status` to one request.
    async fn answer_once(status: &'static str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"GET /health HTTP/1.1\r\n"));
            let body = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            s.write_all(body.as_bytes()).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn http_probe_wants_200_and_says_what_it_got() {
        let ok = answer_once("200 OK").await;
        assert_eq!(http_status(ok, "/health", ATTEMPT).await, Ok(200));
        let sick = answer_once("500 Internal Server Error").await;
        assert_eq!(http_status(sick, "/health", ATTEMPT).await, Ok(500));
        // A server that accepts and never answers (a hung unikernel): no answer in time.
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = hung.local_addr().unwrap();
        let seen = http_status(addr, "/health", Duration::from_millis(200)).await;
        assert!(
            matches!(&seen, Err(Seen::NoAnswer { reason, .. }) if reason.contains("no answer within")),
            "{seen:?}"
        );
    }
}
