//! The kernel command line: `key=value` words separated by spaces (grammar in README.md).
//!
//! Anything not understood is an error naming the key, so a typo in a deployment halts the
//! instance with a reason on the console instead of serving with a default nobody asked for.

use alloc::string::{String, ToString};
use core::fmt;
use core::net::Ipv4Addr;

/// Longest `app=`, `version=` or `instance=` value.
pub const MAX_NAME: usize = 64;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `ip=`/`gw=`; `None` means DHCPv4.
    pub address: Option<StaticAddress>,
    pub port: u16,
    pub app: String,
    pub version: String,
    /// `None`: the server uses the MAC address.
    pub instance: Option<String>,
    pub health: Health,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            address: None,
            port: 80,
            app: "hello-http".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            instance: None,
            health: Health::Ok,
        }
    }
}

/// A static IPv4 configuration (`ip=A.B.C.D/N [gw=A.B.C.D]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticAddress {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// How `/health` behaves: the test hooks that let a host exercise its health probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// 200 `ok`, always.
    Ok,
    /// 500 from the start (`health=fail`).
    Fail,
    /// 200 for the first N health requests, then no answer to anything (`health_fail_after=N`).
    FailAfter(u64),
}

/// Why the command line was refused: printed as `unikernel: bad command line: {self}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadArg {
    pub key: String,
    pub reason: &'static str,
}

impl fmt::Display for BadArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

const KEYS: [&str; 8] = [
    "ip",
    "gw",
    "port",
    "app",
    "version",
    "instance",
    "health",
    "health_fail_after",
];

/// Parses a whole command line. Words are separated by ASCII whitespace; each is `key=value`.
pub fn parse(cmdline: &str) -> Result<Config, BadArg> {
    let mut config = Config::default();
    let mut seen = [false; KEYS.len()];
    let mut ip: Option<(Ipv4Addr, u8)> = None;
    let mut gateway = None;
    let mut fail_after = None;
    for word in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            return Err(bad(word, "expected key=value"));
        };
        let Some(index) = KEYS.iter().position(|k| *k == key) else {
            return Err(bad(key, "unknown key"));
        };
        if core::mem::replace(&mut seen[index], true) {
            return Err(bad(key, "given twice"));
        }
        if value.is_empty() {
            return Err(bad(key, "empty value"));
        }
        let reason = match key {
            "ip" => parse_cidr(value).map(|v| ip = Some(v)),
            "gw" => parse_ip(value).map(|v| gateway = Some(v)),
            "port" => parse_port(value).map(|v| config.port = v),
            "app" => parse_name(value).map(|v| config.app = v),
            "version" => parse_name(value).map(|v| config.version = v),
            "instance" => parse_name(value).map(|v| config.instance = Some(v)),
            "health" => parse_health(value).map(|v| config.health = v),
            _ => value
                .parse::<u64>()
                .map(|v| fail_after = Some(v))
                .map_err(|_| "expected a whole number"),
        };
        reason.map_err(|r| bad(key, r))?;
    }
    config.address = static_address(ip, gateway)?;
    if let Some(n) = fail_after {
        if config.health == Health::Fail {
            return Err(bad("health_fail_after", "conflicts with health=fail"));
        }
        config.health = Health::FailAfter(n);
    }
    Ok(config)
}

fn bad(key: &str, reason: &'static str) -> BadArg {
    BadArg {
        key: key.to_string(),
        reason,
    }
}

fn static_address(
    ip: Option<(Ipv4Addr, u8)>,
    gateway: Option<Ipv4Addr>,
) -> Result<Option<StaticAddress>, BadArg> {
    let Some((ip, prefix_len)) = ip else {
        return match gateway {
            Some(_) => Err(bad("gw", "needs ip= (DHCP brings its own gateway)")),
            None => Ok(None),
        };
    };
    if let Some(gw) = gateway {
        let mask = u32::MAX << (32 - u32::from(prefix_len));
        if u32::from(gw) & mask != u32::from(ip) & mask || gw == ip {
            return Err(bad("gw", "not another address in the ip= subnet"));
        }
    }
    Ok(Some(StaticAddress {
        ip,
        prefix_len,
        gateway,
    }))
}

fn parse_ip(value: &str) -> Result<Ipv4Addr, &'static str> {
    let ip: Ipv4Addr = value
        .parse()
        .map_err(|_| "expected an IPv4 address like 203.0.113.1")?;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err("not a unicast address");
    }
    Ok(ip)
}

fn parse_cidr(value: &str) -> Result<(Ipv4Addr, u8), &'static str> {
    const FORM: &str = "expected address/prefix like 203.0.113.20/24";
    let (addr, prefix) = value.split_once('/').ok_or(FORM)?;
    let prefix: u8 = prefix.parse().map_err(|_| FORM)?;
    if !(1..=32).contains(&prefix) {
        return Err("prefix length must be 1-32");
    }
    Ok((parse_ip(addr)?, prefix))
}

fn parse_port(value: &str) -> Result<u16, &'static str> {
    match value.parse::<u16>() {
        Ok(0) | Err(_) => Err("expected a port number 1-65535"),
        Ok(port) => Ok(port),
    }
}

/// Names end up in responses and metric labels: a small safe alphabet needs no escaping.
fn parse_name(value: &str) -> Result<String, &'static str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "._-+:@/~".contains(c);
    if value.len() > MAX_NAME || !value.chars().all(ok) {
        return Err("must be 1-64 characters of A-Z a-z 0-9 . _ - + : @ / ~");
    }
    Ok(value.to_string())
}

fn parse_health(value: &str) -> Result<Health, &'static str> {
    match value {
        "ok" => Ok(Health::Ok),
        "fail" => Ok(Health::Fail),
        _ => Err("expected ok or fail"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(cmdline: &str) -> String {
        parse(cmdline).unwrap_err().to_string()
    }

    #[test]
    fn empty_is_dhcp_on_port_80() {
        let c = parse("  ").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.port, 80);
        assert!(c.address.is_none());
    }

    #[test]
    fn everything() {
        let c = parse("ip=203.0.113.20/24 gw=203.0.113.1 port=8080 app=shop version=1.2.3+g1 instance=dev-7 health_fail_after=3").unwrap();
        let a = c.address.unwrap();
        assert_eq!(a.ip, Ipv4Addr::new(203, 0, 113, 20));
        assert_eq!(a.prefix_len, 24);
        assert_eq!(a.gateway, Some(Ipv4Addr::new(203, 0, 113, 1)));
        assert_eq!(
            (c.port, c.app.as_str(), c.version.as_str()),
            (8080, "shop", "1.2.3+g1")
        );
        assert_eq!(c.instance.as_deref(), Some("dev-7"));
        assert_eq!(c.health, Health::FailAfter(3));
        assert_eq!(parse("health=fail").unwrap().health, Health::Fail);
    }

    #[test]
    fn refusals_name_the_key() {
        assert_eq!(err("colour=red"), "colour: unknown key");
        assert_eq!(err("quiet"), "quiet: expected key=value");
        assert_eq!(err("port=0"), "port: expected a port number 1-65535");
        assert_eq!(err("port=65536"), "port: expected a port number 1-65535");
        assert_eq!(err("port="), "port: empty value");
        assert_eq!(err("port=1 port=2"), "port: given twice");
        assert!(err("ip=203.0.113.20").starts_with("ip: expected address/prefix"));
        assert_eq!(err("ip=203.0.113.20/33"), "ip: prefix length must be 1-32");
        assert!(err("ip=0.0.0.0/8").starts_with("ip: not a unicast"));
        assert!(err("gw=203.0.113.1").starts_with("gw: needs ip="));
        assert!(err("ip=203.0.113.20/24 gw=198.51.100.1").starts_with("gw: not another"));
        assert!(err("app=a\"b").starts_with("app: must be"));
        assert!(err(&alloc::format!("instance={}", "x".repeat(65))).starts_with("instance:"));
        assert_eq!(err("health=maybe"), "health: expected ok or fail");
        assert_eq!(
            err("health=fail health_fail_after=2"),
            "health_fail_after: conflicts with health=fail"
        );
        assert_eq!(
            err("health_fail_after=-1"),
            "health_fail_after: expected a whole number"
        );
    }
}
