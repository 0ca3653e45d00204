//! Static guest addresses from a pool the device owns (`guest_addresses` in device.toml):
//! a guest with a network interface gets `ip=ADDR/PREFIX gw=GATEWAY` on its command line
//! instead of asking DHCP. Measured here: the template answered 0.6 s after `virsh create`
//! with a static address, 3.8 s with DHCP (dnsmasq pings an address for ~3 s before it
//! offers it). Pure: the libvirt backend takes and gives back addresses as it starts and
//! stops domains, and marks those of domains already running when it first connects.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// `FIRST-LAST/PREFIX via GATEWAY`, e.g. `198.51.100.2-198.51.100.9/24 via 198.51.100.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestAddresses {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

/// The most addresses a pool may hold (a board runs a handful of guests).
pub const MAX_POOL: u32 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "guest_addresses = {0:?}: use FIRST-LAST/PREFIX via GATEWAY, e.g. \
     \"198.51.100.2-198.51.100.9/24 via 198.51.100.1\" (at most {MAX_POOL} addresses, all \
     in the gateway's subnet, the gateway not among them)"
)]
pub struct BadGuestAddresses(pub String);

impl std::str::FromStr for GuestAddresses {
    type Err = BadGuestAddresses;
    fn from_str(s: &str) -> Result<GuestAddresses, BadGuestAddresses> {
        let bad = || BadGuestAddresses(s.into());
        let (range, gateway) = s.split_once(" via ").ok_or_else(bad)?;
        let (range, prefix) = range.trim().split_once('/').ok_or_else(bad)?;
        let (first, last) = range.split_once('-').ok_or_else(bad)?;
        let parsed = GuestAddresses {
            first: first.trim().parse().map_err(|_| bad())?,
            last: last.trim().parse().map_err(|_| bad())?,
            prefix: prefix.trim().parse().map_err(|_| bad())?,
            gateway: gateway.trim().parse().map_err(|_| bad())?,
        };
        parsed.is_sound().then_some(parsed).ok_or_else(bad)
    }
}

impl std::fmt::Display for GuestAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let GuestAddresses {
            first,
            last,
            prefix,
            gateway,
        } = self;
        write!(f, "{first}-{last}/{prefix} via {gateway}")
    }
}

impl GuestAddresses {
    fn subnet(&self, ip: Ipv4Addr) -> u32 {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        u32::from(ip) & mask
    }

    fn is_sound(&self) -> bool {
        let (first, last) = (u32::from(self.first), u32::from(self.last));
        let subnet = self.subnet(self.gateway);
        let broadcast = subnet
            | !u32::MAX
                .checked_shl(32 - u32::from(self.prefix))
                .unwrap_or(0);
        (1..=30).contains(&self.prefix)
            && first <= last
            && first > subnet
            && last < broadcast
            && last - first < MAX_POOL
            && self.subnet(self.first) == self.subnet(self.gateway)
            && self.subnet(self.last) == self.subnet(self.gateway)
            && !(first..=last).contains(&u32::from(self.gateway))
    }

    /// The command-line words that give a guest `ip`.
    pub fn cmdline(&self, ip: Ipv4Addr) -> String {
        format!("ip={ip}/{} gw={}", self.prefix, self.gateway)
    }
}

/// Which addresses of a [`GuestAddresses`] are taken, by domain name.
#[derive(Debug)]
pub struct Pool {
    pub range: GuestAddresses,
    used: BTreeMap<Ipv4Addr, String>,
}

impl Pool {
    pub fn new(range: GuestAddresses) -> Pool {
        Pool {
            range,
            used: BTreeMap::new(),
        }
    }

    /// An address for domain `name`: the one it holds already, else the lowest free one.
    pub fn take(&mut self, name: &str) -> Option<Ipv4Addr> {
        if let Some((ip, _)) = self.used.iter().find(|(_, n)| *n == name) {
            return Some(*ip);
        }
        let (first, last) = (u32::from(self.range.first), u32::from(self.range.last));
        let ip = (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| !self.used.contains_key(ip))?;
        self.used.insert(ip, name.into());
        Some(ip)
    }

    /// `name` holds `ip` already (a domain found running): never handed out again. An
    /// address outside the range is none of the pool's business.
    pub fn mark(&mut self, ip: Ipv4Addr, name: &str) {
        if (self.range.first..=self.range.last).contains(&ip) {
            self.used.insert(ip, name.into());
        }
    }

    /// `name` stopped: its address is free.
    pub fn give_back(&mut self, name: &str) {
        self.used.retain(|_, n| n != name);
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }

    /// Of the names starting with `prefix`, only those `running` keep their addresses: a
    /// domain gone without a stop that reached it (its host restarted) gives its back.
    pub fn keep_only(&mut self, prefix: &str, running: &[String]) {
        self.used
            .retain(|_, n| !n.starts_with(prefix) || running.contains(n));
    }
}

/// The address in an `ip=A.B.C.D/N` word of a command line, if any.
pub fn ip_in_cmdline(cmdline: &str) -> Option<Ipv4Addr> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ip="))
        .and_then(|v| v.split('/').next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_parses_and_unsound_ones_are_refused() {
        let r: GuestAddresses = "198.51.100.2-198.51.100.9/24 via 198.51.100.1"
            .parse()
            .unwrap();
        assert_eq!(
            r.to_string(),
            "198.51.100.2-198.51.100.9/24 via 198.51.100.1"
        );
        assert_eq!(
            r.cmdline("198.51.100.2".parse().unwrap()),
            "ip=198.51.100.2/24 gw=198.51.100.1"
        );
        for bad in [
            "198.51.100.2-198.51.100.9/24",
            "198.51.100.9-198.51.100.2/24 via 198.51.100.1",
            "198.51.100.2-198.51.100.9/24 via 203.0.113.1",
            "198.51.100.1-198.51.100.9/24 via 198.51.100.1",
            "198.51.100.2-198.51.100.9/31 via 198.51.100.1",
            "198.51.100.0-198.51.100.9/24 via 198.51.100.1",
            "198.51.100.2-198.51.100.255/24 via 198.51.100.1",
            "10.0.0.1-10.1.0.0/8 via 10.255.255.254",
            "a-b/24 via c",
        ] {
            assert!(bad.parse::<GuestAddresses>().is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_are_taken_once_given_back_and_running_ones_kept() {
        let r = "198.51.100.2-198.51.100.4/24 via 198.51.100.1"
            .parse()
            .unwrap();
        let mut p = Pool::new(r);
        p.mark("198.51.100.2".parse().unwrap(), "uf-d-a-r1");
        p.mark("203.0.113.9".parse().unwrap(), "uf-d-b-r1");
        let a = p.take("uf-d-a-od1").unwrap();
        assert_eq!(a.to_string(), "198.51.100.3");
        assert_eq!(
            p.take("uf-d-a-od1"),
            Some(a),
            "the same domain keeps its address"
        );
        assert_eq!(p.take("uf-d-a-od2").unwrap().to_string(), "198.51.100.4");
        assert_eq!(p.take("uf-d-a-od3"), None, "all three in use");
        p.give_back("uf-d-a-od1");
        assert_eq!(p.take("uf-d-a-od3"), Some(a));
        assert_eq!(p.in_use(), 3);
    }

    #[test]
    fn addresses_of_domains_gone_unstopped_are_given_back() {
        let range: GuestAddresses = "203.0.113.226-203.0.113.227/27 via 203.0.113.225"
            .parse()
            .unwrap();
        let mut pool = Pool::new(range);
        pool.take("uf-a-od1").unwrap();
        pool.take("uf-a-od2").unwrap();
        assert!(pool.take("uf-b-od1").is_none(), "full");
        pool.keep_only("uf-a-", &["uf-a-od2".into()]);
        assert_eq!(pool.in_use(), 1);
        assert!(pool.take("uf-b-od1").is_some());
    }

    #[test]
    fn the_address_on_a_command_line() {
        assert_eq!(
            ip_in_cmdline("app=x ip=203.0.113.7/24 gw=203.0.113.1"),
            Some("203.0.113.7".parse().unwrap())
        );
        assert_eq!(ip_in_cmdline("app=x"), None);
        assert_eq!(ip_in_cmdline("ip=nonsense"), None);
    }
}
