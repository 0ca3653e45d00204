//! Just enough HTTP/1.x: a request parser over one connection's buffer and a response writer.
//!
//! The parser never waits for bytes that cannot help: a request line that is already wrong
//! is refused at once (400), a request that cannot fit the buffer is refused (431/413)
//! rather than left hanging, and anything it cannot frame (chunked bodies) closes the
//! connection after the error, since the next request's start is unknown.

use alloc::vec::Vec;
use core::fmt::{self, Write};

/// The most a request (head and body) may take in a connection's buffer.
pub const MAX_REQUEST: usize = 4096;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    /// Any other well-formed method: answered 405.
    Other,
}

/// A complete, well-formed request at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: Method,
    /// The path without its query string.
    pub path: &'a str,
    /// Whether the client wants the connection kept open after the response.
    pub keep_alive: bool,
    /// Bytes of the buffer this request took (head and body).
    pub len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse<'a> {
    /// More bytes are needed (and could still fit).
    Incomplete,
    Complete(Request<'a>),
    /// Answer with this status and close the connection.
    Error(Status),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok = 200,
    BadRequest = 400,
    NotFound = 404,
    MethodNotAllowed = 405,
    PayloadTooLarge = 413,
    HeadersTooLarge = 431,
    InternalError = 500,
    NotImplemented = 501,
    VersionNotSupported = 505,
}

impl Status {
    pub fn code(self) -> u16 {
        self as u16
    }

    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::PayloadTooLarge => "Content Too Large",
            Status::HeadersTooLarge => "Request Header Fields Too Large",
            Status::InternalError => "Internal Server Error",
            Status::NotImplemented => "Not Implemented",
            Status::VersionNotSupported => "HTTP Version Not Supported",
        }
    }
}

/// Parses the request at the front of `buf`.
pub fn parse(buf: &[u8]) -> Parse<'_> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return match find(buf, b"\r\n") {
            Some(line_end) => match request_line(&buf[..line_end]) {
                Err(status) => Parse::Error(status),
                Ok(_) if buf.len() >= MAX_REQUEST => Parse::Error(Status::HeadersTooLarge),
                Ok(_) => Parse::Incomplete,
            },
            None if buf.len() >= MAX_REQUEST => Parse::Error(Status::HeadersTooLarge),
            None if !plausible_start(buf) => Parse::Error(Status::BadRequest),
            None => Parse::Incomplete,
        };
    };
    // Up to the first CR of the blank line: every line then ends in CR once split at LF.
    match parse_head(&buf[..head_end + 1]) {
        Err(status) => Parse::Error(status),
        Ok((mut request, body)) => {
            request.len = head_end + 4 + body;
            if request.len > MAX_REQUEST {
                Parse::Error(Status::PayloadTooLarge)
            } else if request.len > buf.len() {
                Parse::Incomplete
            } else {
                Parse::Complete(request)
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether a partial first line could still become a request line: a method token, then a
/// target of visible characters. Lets garbage be refused before its end arrives.
fn plausible_start(buf: &[u8]) -> bool {
    let method_len = buf.iter().take_while(|b| is_token(**b)).count();
    let rest = &buf[method_len..];
    if rest.is_empty() {
        return method_len <= 16;
    }
    method_len > 0
        && rest[0] == b' '
        && rest[1..]
            .iter()
            .all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\r')
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `METHOD SP target SP HTTP/1.x`: the method, the path, and whether it is HTTP/1.1.
fn request_line(line: &[u8]) -> Result<(Method, &str, bool), Status> {
    let line = core::str::from_utf8(line).map_err(|_| Status::BadRequest)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Status::BadRequest);
    };
    if method.is_empty() || !method.bytes().all(is_token) {
        return Err(Status::BadRequest);
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Status::BadRequest);
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        v if v.starts_with("HTTP/") => return Err(Status::VersionNotSupported),
        _ => return Err(Status::BadRequest),
    };
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    let path = target.split('?').next().unwrap_or(target);
    Ok((method, path, http11))
}

/// The request line and headers, each line ending in CR (LFs between): the request (its `len` still
/// to be set) and the body's length.
fn parse_head(head: &[u8]) -> Result<(Request<'_>, usize), Status> {
    let mut lines = head.split(|b| *b == b'\n');
    let first = lines.next().unwrap_or_default();
    let first = first.strip_suffix(b"\r").ok_or(Status::BadRequest)?;
    let (method, path, http11) = request_line(first)?;
    let mut keep_alive = http11;
    let mut body: Option<usize> = None;
    for (count, line) in lines.enumerate() {
        if count >= MAX_HEADERS {
            return Err(Status::HeadersTooLarge);
        }
        let (name, value) = header(line)?;
        if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") && !http11 {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let len = content_length(value)?;
            if body.is_some_and(|b| b != len) {
                return Err(Status::BadRequest);
            }
            body = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Status::NotImplemented);
        }
    }
    let request = Request {
        method,
        path,
        keep_alive,
        len: 0,
    };
    Ok((request, body.unwrap_or(0)))
}

/// One `name: value` line (with its CR still on): no folding, no space before the colon.
fn header(line: &[u8]) -> Result<(&str, &str), Status> {
    let line = line.strip_suffix(b"\r").ok_or(Status::BadRequest)?;
    let line = core::str::from_utf8(line).map_err(|_| Status::BadRequest)?;
    let (name, value) = line.split_once(':').ok_or(Status::BadRequest)?;
    if name.is_empty() || !name.bytes().all(is_token) {
        return Err(Status::BadRequest);
    }
    Ok((name, value.trim_matches([' ', '\t'])))
}

fn content_length(value: &str) -> Result<usize, Status> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Status::BadRequest);
    }
    // Anything longer than the buffer is refused later as too large; saturate, not overflow.
    Ok(value.parse().unwrap_or(usize::MAX / 2))
}

/// Appends a whole response to `out`. `head_only` (a HEAD request) keeps the headers,
/// Content-Length included, and drops the body.
pub fn write_response(
    out: &mut Vec<u8>,
    status: Status,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    head_only: bool,
) {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let _ = write!(
        VecWriter(out),
        "HTTP/1.1 {} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        status.code(),
        status.reason(),
        body.len(),
    );
    if status == Status::MethodNotAllowed {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    let _ = write!(VecWriter(out), "Connection: {connection}\r\n\r\n");
    if !head_only {
        out.extend_from_slice(body);
    }
}

/// `fmt::Write` into a byte vector (no_std has no `io::Write`).
#[derive(Debug)]
pub struct VecWriter<'a>(pub &'a mut Vec<u8>);

impl Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> Request<'_> {
        match parse(buf) {
            Parse::Complete(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn simple_get_keeps_alive() {
        let r = complete(b"GET /health?x=1 HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n");
        assert_eq!(
            (r.method, r.path, r.keep_alive),
            (Method::Get, "/health", true)
        );
        assert_eq!(r.len, 37);
    }

    #[test]
    fn connection_header() {
        let r = complete(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n");
        assert!(!r.keep_alive);
        let r = complete(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!r.keep_alive);
        let r = complete(b"HEAD / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n");
        assert!(r.keep_alive);
        assert_eq!(r.method, Method::Head);
    }

    #[test]
    fn partial_requests_wait() {
        assert_eq!(parse(b""), Parse::Incomplete);
        assert_eq!(parse(b"GE"), Parse::Incomplete);
        assert_eq!(parse(b"GET /he"), Parse::Incomplete);
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a"), Parse::Incomplete);
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            Parse::Incomplete
        );
    }

    #[test]
    fn bodies_are_skipped() {
        let r = complete(b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\nabGET");
        assert_eq!((r.method, r.len), (Method::Other, 41));
    }

    #[test]
    fn garbage_is_refused_early() {
        let bad = |b: &[u8]| assert_eq!(parse(b), Parse::Error(Status::BadRequest), "{b:?}");
        bad(b"\x16\x03\x01\x02\x00");
        bad(b"hello there\r\n\r\n");
        bad(b"GET\tx");
        bad(b"GET / HTTP/1.1 extra\r\n");
        bad(b"GET nopath HTTP/1.1\r\n\r\n");
        bad(b"GET / HTTP/1.1\r\nno colon\r\n\r\n");
        bad(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n");
        bad(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n");
        bad(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(
            parse(b"GET / HTTP/2.0\r\n\r\n"),
            Parse::Error(Status::VersionNotSupported)
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Parse::Error(Status::NotImplemented)
        );
    }

    #[test]
    fn oversized_requests_are_refused() {
        let mut big = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(MAX_REQUEST, b'a');
        assert_eq!(parse(&big), Parse::Error(Status::HeadersTooLarge));
        let mut line = b"GET /".to_vec();
        line.resize(MAX_REQUEST, b'a');
        assert_eq!(parse(&line), Parse::Error(Status::HeadersTooLarge));
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            Parse::Error(Status::PayloadTooLarge)
        );
    }

    #[test]
    fn responses_carry_length_and_connection() {
        let mut out = Vec::new();
        write_response(&mut out, Status::Ok, "text/plain", b"ok\n", true, false);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
        );
        out.clear();
        write_response(
            &mut out,
            Status::MethodNotAllowed,
            "text/plain",
            b"x",
            false,
            true,
        );
        let text = core::str::from_utf8(&out).unwrap();
        assert!(text.contains("Content-Length: 1\r\nAllow: GET, HEAD\r\nConnection: close\r\n\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }
}
