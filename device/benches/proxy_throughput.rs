//! Throughput of the on-demand front proxy's data path (`ondemand::forward`) against a
//! direct connection to the same endpoint, in the same run.
//!
//!     cargo bench -p device --bench proxy_throughput
//!
//! The endpoint is a loopback sink that reads until end of stream and answers with the
//! byte count (so the half-close passes through the proxy too). The test unikernel's own
//! endpoint, its serial console, is far slower than either path and would hide the proxy.
#![allow(clippy::disallowed_methods)] // a benchmark program, not the product
#![allow(clippy::print_stdout)]

use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BYTES: u64 = 512 << 20;
const RUNS: usize = 9;

async fn sink() -> std::io::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 << 10];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_all(&n.to_le_bytes()).await;
            });
        }
    });
    Ok(port)
}

async fn proxy(upstream: u16) -> std::io::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            tokio::spawn(async move {
                let up = TcpStream::connect(("127.0.0.1", upstream)).await?;
                device::ondemand::forward(&c, &up).await
            });
        }
    });
    Ok(port)
}

/// Sends `BYTES` to `port`, half-closes, waits for the count; MB/s.
async fn send(port: u16) -> std::io::Result<f64> {
    let chunk = vec![7u8; 256 << 10];
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut sent = 0u64;
    while sent < BYTES {
        s.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await?;
    assert_eq!(u64::from_le_bytes(count), BYTES, "every byte arrived");
    Ok(BYTES as f64 / t.elapsed().as_secs_f64() / 1e6)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let target = sink().await?;
    let via = proxy(target).await?;
    let (mut direct, mut proxied) = (vec![], vec![]);
    for _ in 0..RUNS {
        direct.push(send(target).await?);
        proxied.push(send(via).await?);
    }
    let (d, p) = (median(direct), median(proxied));
    println!(
        "| on-demand proxy throughput, {} MiB one way, median of {RUNS} | {p:.0} MB/s | direct connection: {d:.0} MB/s | {:.0}% | ≥ 90% |",
        BYTES >> 20,
        100.0 * p / d
    );
    Ok(())
}
