//! Speaking to the Rust unikernel (`hello-http`) as its users do: `hub publish` arguments
//! for it, and keep-alive `GET`s that check its answer and say which instance gave it.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

/// `hub publish` arguments for the template with an HTTP probe on its NIC (30 s to pass).
pub fn http_release<'a>(cmdline: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--network", "--probe", "http:/health"];
    if !extra.contains(&"--probe-timeout-secs") {
        args.extend(["--probe-timeout-secs", "30"]);
    }
    args.extend(["--memory-mib", "16", "--cmdline", cmdline]);
    args.extend_from_slice(extra);
    args
}

/// One answer on a keep-alive connection: the status line and the body.
pub fn get(reader: &mut BufReader<TcpStream>, path: &str) -> Result<(String, String)> {
    reader
        .get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: hello\r\n\r\n").as_bytes())?;
    read_answer(reader)
}

/// The next answer on a keep-alive connection (its request already sent): the status
/// line and the body.
pub fn read_answer(reader: &mut BufReader<TcpStream>) -> Result<(String, String)> {
    let mut status = String::new();
    reader.read_line(&mut status)?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("connection closed in the headers");
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok((status.trim_end().to_string(), String::from_utf8(body)?))
}

/// `GET /` on a keep-alive connection: it must be the app's answer; returns the instance.
pub fn answer(r: &mut BufReader<TcpStream>) -> Result<String> {
    answer_of(r, "1.0.0")
}

/// [`answer`] from `version`.
pub fn answer_of(r: &mut BufReader<TcpStream>, version: &str) -> Result<String> {
    let (status, body) = get(r, "/")?;
    instance_of(&status, &body, version)
}

/// The instance named by an answer to `GET /`, which must be the app's from `version`.
pub fn instance_of(status: &str, body: &str, version: &str) -> Result<String> {
    if status != "HTTP/1.1 200 OK" || !body.contains(&format!("app: hello\nversion: {version}\n")) {
        bail!("unexpected answer {status:?}: {body:?}");
    }
    let instance = body.lines().find_map(|l| l.strip_prefix("instance: "));
    Ok(instance.context("an instance line")?.to_string())
}
