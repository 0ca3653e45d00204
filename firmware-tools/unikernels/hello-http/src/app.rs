//! What the server answers: `/`, `/health`, `/metrics`, and the health test hooks. No I/O:
//! the network loop hands in parsed requests and writes out the bytes produced here.

use crate::config::{Config, Health};
use crate::http::{self, Method, Parse, Status};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

const TEXT: &str = "text/plain; charset=utf-8";
const METRICS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Counters behind `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub accepted: u64,
    pub open: u64,
}

/// What the connection should do after [`App::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response was appended; keep reading requests if `keep_alive`, else close.
    Responded { keep_alive: bool },
    /// Say nothing, ever (the `health_fail_after` hang).
    Hang,
}

#[derive(Debug)]
pub struct App {
    config: Config,
    instance: String,
    pub stats: Stats,
    health_answered: u64,
    hung: bool,
}

impl App {
    /// `default_instance` stands in for a missing `instance=` (the server passes the MAC).
    pub fn new(config: Config, default_instance: String) -> App {
        let instance = config.instance.clone().unwrap_or(default_instance);
        App {
            config,
            instance,
            stats: Stats::default(),
            health_answered: 0,
            hung: false,
        }
    }

    /// Whether the `health_fail_after` budget is spent: from then on nothing is answered.
    pub fn is_hung(&self) -> bool {
        self.hung
    }

    /// Answers one parse result, appending the response to `out`.
    pub fn handle(&mut self, parsed: Parse<'_>, uptime_secs: u64, out: &mut Vec<u8>) -> Outcome {
        if self.hung {
            return Outcome::Hang;
        }
        let request = match parsed {
            Parse::Incomplete => return Outcome::Responded { keep_alive: true },
            Parse::Error(status) => {
                let body = alloc::format!("{} {}\n", status.code(), reason_word(status));
                return self.respond(out, status, body.as_bytes(), false, false);
            }
            Parse::Complete(request) => request,
        };
        let head = request.method == Method::Head;
        let keep = request.keep_alive;
        if request.method == Method::Other {
            return self.respond(out, Status::MethodNotAllowed, b"GET or HEAD\n", keep, head);
        }
        match request.path {
            "/" => {
                let body = alloc::format!(
                    "app: {}\nversion: {}\ninstance: {}\n",
                    self.config.app,
                    self.config.version,
                    self.instance
                );
                self.respond(out, Status::Ok, body.as_bytes(), keep, head)
            }
            "/health" => self.health(out, keep, head),
            "/metrics" => {
                // The exposition format's own content type, which Prometheus checks.
                let body = self.metrics(uptime_secs);
                http::write_response(out, Status::Ok, METRICS, body.as_bytes(), keep, head);
                self.stats.requests += 1;
                Outcome::Responded { keep_alive: keep }
            }
            _ => self.respond(out, Status::NotFound, b"not found\n", keep, head),
        }
    }

    fn health(&mut self, out: &mut Vec<u8>, keep: bool, head: bool) -> Outcome {
        match self.config.health {
            Health::Ok => self.respond(out, Status::Ok, b"ok\n", keep, head),
            Health::Fail => self.respond(out, Status::InternalError, b"failing\n", keep, head),
            Health::FailAfter(n) if self.health_answered < n => {
                self.health_answered += 1;
                self.respond(out, Status::Ok, b"ok\n", keep, head)
            }
            Health::FailAfter(_) => {
                self.hung = true;
                Outcome::Hang
            }
        }
    }

    fn respond(
        &mut self,
        out: &mut Vec<u8>,
        status: Status,
        body: &[u8],
        keep_alive: bool,
        head: bool,
    ) -> Outcome {
        http::write_response(out, status, TEXT, body, keep_alive, head);
        self.stats.requests += 1;
        Outcome::Responded { keep_alive }
    }

    /// Prometheus text exposition format.
    fn metrics(&self, uptime_secs: u64) -> String {
        let s = &self.stats;
        let mut text = String::new();
        let rows: [(&str, &str, &str, u64); 6] = [
            (
                "requests_total",
                "counter",
                "HTTP responses sent.",
                s.requests,
            ),
            (
                "received_bytes_total",
                "counter",
                "TCP payload bytes received.",
                s.bytes_in,
            ),
            (
                "sent_bytes_total",
                "counter",
                "TCP payload bytes sent.",
                s.bytes_out,
            ),
            (
                "uptime_seconds",
                "gauge",
                "Seconds since boot.",
                uptime_secs,
            ),
            (
                "connections_accepted_total",
                "counter",
                "TCP connections accepted.",
                s.accepted,
            ),
            (
                "connections_open",
                "gauge",
                "TCP connections open now.",
                s.open,
            ),
        ];
        for (name, kind, help, value) in rows {
            let _ = write!(
                text,
                "# HELP hello_http_{name} {help}\n# TYPE hello_http_{name} {kind}\nhello_http_{name} {value}\n"
            );
        }
        let _ = write!(
            text,
            "# HELP hello_http_info The app this instance serves.\n# TYPE hello_http_info gauge\n\
             hello_http_info{{app=\"{}\",version=\"{}\",instance=\"{}\"}} 1\n",
            self.config.app, self.config.version, self.instance
        );
        text
    }
}

/// A one-word body for error responses.
fn reason_word(status: Status) -> &'static str {
    match status {
        Status::BadRequest => "bad request",
        Status::PayloadTooLarge => "request too large",
        Status::HeadersTooLarge => "request header too large",
        Status::NotImplemented => "not implemented",
        Status::VersionNotSupported => "version not supported",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn get(app: &mut App, raw: &[u8]) -> (Outcome, String) {
        let mut out = Vec::new();
        let outcome = app.handle(http::parse(raw), 42, &mut out);
        (outcome, String::from_utf8(out).unwrap())
    }

    fn app(cmdline: &str) -> App {
        App::new(parse(cmdline).unwrap(), "52:54:00:12:34:56".into())
    }

    #[test]
    fn root_names_app_version_instance() {
        let mut a = app("app=shop version=2.0");
        let (o, text) = get(&mut a, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(o, Outcome::Responded { keep_alive: true });
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.ends_with("app: shop\nversion: 2.0\ninstance: 52:54:00:12:34:56\n"));
    }

    #[test]
    fn health_and_not_found_and_errors() {
        let mut a = app("");
        assert!(get(&mut a, b"GET /health HTTP/1.1\r\n\r\n")
            .1
            .ends_with("\r\n\r\nok\n"));
        assert!(get(&mut a, b"GET /nope HTTP/1.1\r\n\r\n")
            .1
            .starts_with("HTTP/1.1 404"));
        let (o, text) = get(&mut a, b"BLAH\x01");
        assert_eq!(o, Outcome::Responded { keep_alive: false });
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(get(&mut a, b"DELETE / HTTP/1.1\r\n\r\n")
            .1
            .starts_with("HTTP/1.1 405"));
        let (_, text) = get(&mut a, b"HEAD /health HTTP/1.1\r\n\r\n");
        assert!(text.ends_with("Content-Length: 3\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn health_fail_and_fail_after() {
        let mut a = app("health=fail");
        assert!(get(&mut a, b"GET /health HTTP/1.1\r\n\r\n")
            .1
            .starts_with("HTTP/1.1 500"));
        let mut a = app("health_fail_after=2");
        for _ in 0..2 {
            assert!(get(&mut a, b"GET /health HTTP/1.1\r\n\r\n")
                .1
                .starts_with("HTTP/1.1 200"));
        }
        assert_eq!(
            get(&mut a, b"GET /health HTTP/1.1\r\n\r\n"),
            (Outcome::Hang, String::new())
        );
        assert_eq!(
            get(&mut a, b"GET / HTTP/1.1\r\n\r\n"),
            (Outcome::Hang, String::new())
        );
        assert!(a.is_hung());
    }

    #[test]
    fn metrics_count() {
        let mut a = app("instance=i1");
        a.stats.accepted = 3;
        get(&mut a, b"GET / HTTP/1.1\r\n\r\n");
        let (_, text) = get(&mut a, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(text.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(text.contains("\nhello_http_requests_total 1\n"));
        assert!(text.contains("\nhello_http_uptime_seconds 42\n"));
        assert!(text.contains("\nhello_http_connections_accepted_total 3\n"));
        assert!(text
            .contains("hello_http_info{app=\"hello-http\",version=\"0.1.0\",instance=\"i1\"} 1\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        assert!(text.contains(&alloc::format!("Content-Length: {}\r\n", body.len())));
    }
}
