//! A build's output as lines: read bounded (a line without an end cannot grow without
//! limit) and the tail kept for the error a failed step reports.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read};
use std::sync::mpsc::SyncSender;

/// Lines kept for [`Finished::log_tail`] and the errors' `log_tail`.
pub const TAIL_LINES: usize = 40;
/// A longer line is passed on in pieces of this many bytes (the tail stays bounded).
const MAX_LINE: u64 = 8 * 1024;
/// Reads the sandbox's output into lines (without their `\n` or `\r\n`) until its end or
/// until nobody listens.
pub fn read_lines(reader: io::PipeReader, lines: &SyncSender<String>) -> io::Result<()> {
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        if lines
            .send(String::from_utf8_lossy(&buf).into_owned())
            .is_err()
        {
            return Ok(());
        }
    }
}

/// The last lines, and the first (bubblewrap's own refusal comes first).
#[derive(Debug, Default)]
pub struct Tail {
    pub first: Option<String>,
    last: VecDeque<String>,
}

impl Tail {
    pub fn push(&mut self, text: String) {
        if self.first.is_none() {
            self.first = Some(text.clone());
        }
        if self.last.len() == TAIL_LINES {
            self.last.pop_front();
        }
        self.last.push_back(text);
    }

    pub fn text(&self) -> String {
        Vec::from(self.last.clone()).join("\n")
    }
}
