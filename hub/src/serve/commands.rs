//! The control socket (`HUB/hub.sock`): one line in, one line out. Each connection reads
//! its command (5 s at most), hands it typed to the hub's loop with a oneshot for the
//! answer, and writes the answer back; a line that is no command is answered here.

use crate::control::Command;
use crate::home::Home;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// A command for the loop, and where its answer goes.
pub(super) type Asked = (Command, oneshot::Sender<String>);

/// Commands queued for the loop (`hub publish` and friends send one each).
const QUEUE: usize = 16;

/// Binds the socket (replacing a stale one).
pub(super) fn bind(home: &Home) -> std::io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(home.socket());
    tokio::net::UnixListener::bind(home.socket())
}

/// Accepts on `control` until shutdown.
pub(super) fn listen(
    control: tokio::net::UnixListener,
    tasks: &net::tasks::Tasks,
) -> mpsc::Receiver<Asked> {
    let (tx, rx) = mpsc::channel::<Asked>(QUEUE);
    let conns = tasks.clone();
    tasks.spawn(async move {
        net::tasks::accept_loop(
            "control socket",
            &conns,
            || control.accept(),
            |(stream, _)| {
                conns.spawn(answer(stream, tx.clone()));
            },
        )
        .await
    });
    rx
}

async fn answer(stream: tokio::net::UnixStream, tx: mpsc::Sender<Asked>) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(r);
    if tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .is_err()
    {
        return;
    }
    let line = line.trim();
    let reply = match Command::parse(line) {
        Some(command) => {
            let (reply_tx, reply_rx) = oneshot::channel();
            if tx.send((command, reply_tx)).await.is_err() {
                return;
            }
            match reply_rx.await {
                Ok(reply) => reply,
                Err(_) => return,
            }
        }
        None => format!("unknown command {line:?}"),
    };
    let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
}
