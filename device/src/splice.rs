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
