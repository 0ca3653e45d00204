//! The local control socket (`HUB/hub.sock`): how `hub publish`, `hub enroll` and the
//! deploy hook tell a running `hub serve` to announce or to reload enrolled devices.

use crate::home::Home;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Commands understood by `hub serve`, one line each on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// A release was stored: announce now.
    Announce,
    /// Device keys were enrolled: re-read them.
    ReloadDevices,
    /// The root, keys, revocation or hold list changed: re-read them and announce.
    ReloadTrust,
}

impl Command {
    const ALL: [Command; 3] = [
        Command::Announce,
        Command::ReloadDevices,
        Command::ReloadTrust,
    ];

    /// The command's line on the socket.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Announce => "announce",
            Command::ReloadDevices => "reload-devices",
            Command::ReloadTrust => "reload-trust",
        }
    }

    /// A line from the socket (`None`: not a command).
    pub fn parse(line: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.as_str() == line)
    }
}

fn send(home: &Home, command: Command) -> std::io::Result<String> {
    let mut s = UnixStream::connect(home.socket())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{}\n", command.as_str()).as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Asks a running `hub serve` to announce now; says so if none is running. Whether one
/// took it.
pub fn notify(home: &Home, progress: &mut dyn FnMut(&str)) -> bool {
    match send(home, Command::Announce) {
        Ok(reply) => {
            progress(&format!("hub serve: {reply}"));
            true
        }
        Err(_) => {
            progress("hub serve is not running: the release is stored and signed, and will be announced when it starts");
            false
        }
    }
}

/// Asks a running `hub serve` to re-read enrolled device keys (best effort).
pub fn reload_devices(home: &Home) {
    let _ = send(home, Command::ReloadDevices);
}

/// Asks a running `hub serve` to re-read its root, keys and revocation list and announce
/// them; says whether one did.
pub fn reload_trust(home: &Home, progress: &mut dyn FnMut(&str)) {
    match send(home, Command::ReloadTrust) {
        Ok(reply) => progress(&format!("hub serve: {reply}")),
        Err(_) => progress("hub serve is not running: devices hear of it when it starts"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_reads_back_from_its_line_and_nothing_else_does() {
        for c in Command::ALL {
            assert_eq!(Command::parse(c.as_str()), Some(c));
        }
        assert_eq!(Command::parse("reload"), None);
        assert_eq!(Command::parse(""), None);
    }
}
