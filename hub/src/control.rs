//! The local control socket (`HUB/hub.sock`): how `hub publish`, `hub enroll` and the
//! deploy hook tell a running `hub serve` to announce or to reload enrolled devices.

use crate::home::Home;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Commands understood by `hub serve`.
pub const ANNOUNCE: &str = "announce";
pub const RELOAD_DEVICES: &str = "reload-devices";
pub const RELOAD_TRUST: &str = "reload-trust";

fn send(home: &Home, command: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(home.socket())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Asks a running `hub serve` to announce now; says so if none is running.
pub fn notify(home: &Home, progress: &mut dyn FnMut(&str)) {
    match send(home, ANNOUNCE) {
        Ok(reply) => progress(&format!("hub serve: {reply}")),
        Err(_) => progress("hub serve is not running: the release is stored and signed, and will be announced when it starts"),
    }
}

/// Asks a running `hub serve` to re-read enrolled device keys (best effort).
pub fn reload_devices(home: &Home) {
    let _ = send(home, RELOAD_DEVICES);
}

/// Asks a running `hub serve` to re-read its root, keys and revocation list and announce
/// them; says whether one did.
pub fn reload_trust(home: &Home, progress: &mut dyn FnMut(&str)) {
    match send(home, RELOAD_TRUST) {
        Ok(reply) => progress(&format!("hub serve: {reply}")),
        Err(_) => progress("hub serve is not running: devices hear of it when it starts"),
    }
}
