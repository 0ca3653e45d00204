//! Zero-copy forwarding between two TCP sockets (Linux `splice(2)` through a pipe), for
//! the on-demand front proxy. A user-space copy loop reads every byte into the process
//! and writes it out again — twice the kernel copies of a direct connection, which on a
//! small board is the proxy's whole cost; splice moves page references instead.

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::{shutdown, Shutdown};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe capacity asked for (the kernel may give less); also the most moved per call.
const PIPE: usize = 1 << 20;

/// Copies both ways until both directions have ended; an end of stream on one side is
/// passed on as a write shutdown to the other. Returns the bytes copied (a to b, b to a).
pub async fn bidirectional(a: &TcpStream, b: &TcpStream) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b), one_way(b, a))
}

async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let (pipe_r, pipe_w) = pipe()?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        let n = from
            .async_io(Interest::READABLE, || {
                splice(from.as_fd(), None, &pipe_w, None, PIPE, flags).map_err(io::Error::from)
            })
            .await?;
        if n == 0 {
            // End of stream from `from`: pass the half-close on.
            shutdown(to.as_raw_fd(), Shutdown::Write).or_else(ignore_not_connected)?;
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            left -= to
                .async_io(Interest::WRITABLE, || {
                    splice(&pipe_r, None, to.as_fd(), None, left, flags).map_err(io::Error::from)
                })
                .await?;
        }
        total += n as u64;
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A bigger pipe means fewer system calls; the default 64 KiB is fine if refused.
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE as i32));
    Ok((r, w))
}

/// The other side may already be gone; its own direction reports that.
fn ignore_not_connected(e: nix::Error) -> io::Result<()> {
    if e == nix::Error::ENOTCONN {
        Ok(())
    } else {
        Err(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A proxy on a fresh port that forwards every connection to `upstream` by splicing.
    async fn proxy_to(upstream: u16) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let u = TcpStream::connect(("127.0.0.1", upstream)).await?;
                    bidirectional(&c, &u).await
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_a_half_close_is_passed_on() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = server.local_addr().unwrap().port();
        // The server reads to end of stream (the client's half-close), then answers with
        // what it got, reversed, and closes.
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut got = vec![];
            s.read_to_end(&mut got).await.unwrap();
            got.reverse();
            s.write_all(&got).await.unwrap();
        });
        let port = proxy_to(upstream).await;
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let sent: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&sent).await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = vec![];
        c.read_to_end(&mut back).await.unwrap();
        let mut want = sent;
        want.reverse();
        assert!(
            back == want,
            "{} bytes back, {} expected",
            back.len(),
            want.len()
        );
    }

    #[tokio::test]
    async fn an_instance_that_goes_away_ends_the_client_connection() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (s, _) = server.accept().await.unwrap();
            drop(s);
        });
        let port = proxy_to(upstream).await;
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("the client is told, not left hanging");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
}
