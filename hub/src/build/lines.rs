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

/// The most of a build's output kept whole in its log; past it, the last
/// [`TAIL_LINES`] lines are kept and the cut said.
pub const MAX_LOG_BYTES: usize = 2 * 1024 * 1024;

/// A build's log: everything, up to [`MAX_LOG_BYTES`], then its tail (a build printing
/// for hours cannot fill the hub's memory, nor the store it is kept in).
#[derive(Debug, Default)]
pub struct Log {
    head: String,
    cut: u64,
    tail: Tail,
}

impl Log {
    pub fn push(&mut self, line: &str) {
        if self.cut == 0 && self.head.len() + line.len() < MAX_LOG_BYTES {
            self.head.push_str(line);
            self.head.push('\n');
        } else {
            self.cut += 1;
            self.tail.push(line.to_string());
        }
    }

    pub fn text(&self) -> String {
        if self.cut == 0 {
            return self.head.clone();
        }
        let kept = self.tail.last.len() as u64;
        format!(
            "{}[… {} lines cut: the log keeps its first {} MiB and its last {kept} lines]\n{}\n",
            self.head,
            self.cut - kept,
            MAX_LOG_BYTES >> 20,
            self.tail.text()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding: the build log kept every line of a build that may print for hours.
    #[test]
    fn a_log_past_its_bound_keeps_its_head_and_tail_and_says_the_cut() {
        let mut log = Log::default();
        let line = "x".repeat(1023);
        for _ in 0..(MAX_LOG_BYTES / 1024 + 500) {
            log.push(&line);
        }
        log.push("the last line");
        let text = log.text();
        assert!(text.len() < MAX_LOG_BYTES + 64 * 1024, "{}", text.len());
        assert!(text.contains("lines cut: the log keeps its first 2 MiB"));
        assert!(text.trim_end().ends_with("the last line"));
        let mut short = Log::default();
        short.push("one");
        assert_eq!(short.text(), "one\n");
    }
}
