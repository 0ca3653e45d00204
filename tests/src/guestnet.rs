//! A guest network for tests that boot unikernels with a NIC: a transient, isolated
//! libvirt network (a host bridge with no route out, DHCP by libvirt's dnsmasq) on one
//! /26 slice of TEST-NET-2 or -3 (198.51.100.0/24, 203.0.113.0/24). libvirt refuses two
//! networks on one subnet,
//! so tests that run at the same time take different slots; a slot's leftover from a
//! killed run is destroyed first. Destroyed on drop, whatever the test did. A slot is
//! also locked (a file lock in /tmp) while it is held: two tests given the same slot take
//! turns instead of destroying each other's network.

use anyhow::{bail, Context, Result};
use std::process::Command;

/// How many tests may hold a guest network at once: slots 0-7 are taken by
/// `tests/tests/unikernel.rs`, 6 and 7 by `bench_unikernel` (which is run on its own), 7
/// by the hosted host ([`crate::hosted`]).
pub const SLOTS: u8 = 8;

/// Holds slot `slot` until the returned lock is dropped (waits while another holds it).
pub fn reserve(slot: u8) -> Result<std::fs::File> {
    assert!(slot < SLOTS, "guest network slot {slot} of {SLOTS}");
    let path = format!("/tmp/unifleet-guestnet-slot-{slot}.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {path}"))?;
    file.lock().with_context(|| format!("locking {path}"))?;
    Ok(file)
}

#[derive(Debug)]
pub struct GuestNet {
    uri: String,
    pub name: String,
    /// The host's address on it (the guests' gateway).
    pub host: String,
    /// The first three octets and the slice's first address's last octet.
    net: &'static str,
    base: u32,
    _slot: std::fs::File,
}

fn virsh(uri: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .context("running virsh (libvirt-clients)")?;
    if !out.status.success() {
        bail!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl GuestNet {
    /// Network `slot` (0..[`SLOTS`]) on `uri`: 198.51.100.(64 × slot)/26 for slots 0-3,
    /// then 203.0.113.(64 × (slot - 4))/26.
    pub fn create(uri: &str, slot: u8) -> Result<GuestNet> {
        GuestNet::make(uri, slot, Some(None))
    }

    /// [`GuestNet::create`] with DHCP leases of `lease_minutes` (dnsmasq's least is 2)
    /// instead of libvirt's default hour. Every domain libvirt creates without a MAC gets a
    /// new random one, and a destroyed guest's lease is kept until it expires: a program
    /// that boots more guests than the range holds (53) within a lease's life needs short
    /// leases, or the next guest gets no address.
    pub fn create_with_lease(uri: &str, slot: u8, lease_minutes: Option<u32>) -> Result<GuestNet> {
        GuestNet::make(uri, slot, Some(lease_minutes))
    }

    /// [`GuestNet::create`] with no DHCP at all: a guest that asks for an address never
    /// gets one (only addresses the device hands out work).
    pub fn create_without_dhcp(uri: &str, slot: u8) -> Result<GuestNet> {
        GuestNet::make(uri, slot, None)
    }

    /// `dhcp`: `None` none, `Some(None)` libvirt's default lease, `Some(Some(m))` m minutes.
    fn make(uri: &str, slot: u8, dhcp: Option<Option<u32>>) -> Result<GuestNet> {
        let held = reserve(slot)?;
        let prefix = format!("uf-test{slot}-");
        for old in virsh(uri, &["net-list", "--name"])?.lines() {
            if old.trim().starts_with(&prefix) {
                let _ = virsh(uri, &["net-destroy", old.trim()]);
            }
        }
        let net = if slot < 4 { "198.51.100" } else { "203.0.113" };
        let base = 64 * u32::from(slot % 4);
        let name = format!("{prefix}{}", std::process::id());
        let host = format!("{net}.{}", base + 1);
        let xml = format!(
            "<network><name>{name}</name><bridge name='ufbr{slot}-{pid}' stp='off' delay='0'/>\
             <ip address='{host}' netmask='255.255.255.192'>{dhcp}</ip></network>",
            pid = std::process::id() % 100_000,
            dhcp = match dhcp {
                None => String::new(),
                Some(lease) => format!(
                    "<dhcp><range start='{net}.{lo}' end='{net}.{hi}'>{}</range></dhcp>",
                    lease
                        .map(|m| format!("<lease expiry='{m}' unit='minutes'/>"))
                        .unwrap_or_default(),
                    lo = base + 10,
                    hi = base + 62,
                ),
            },
        );
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), xml)?;
        virsh(uri, &["net-create", &file.path().display().to_string()]).context(
            "creating the guest network (libvirt needs iptables and dnsmasq: scripts/setup.sh)",
        )?;
        Ok(GuestNet {
            uri: uri.into(),
            name,
            host,
            net,
            base,
            _slot: held,
        })
    }

    /// The device.toml `guest_addresses` setting: static addresses outside the DHCP range.
    pub fn static_addresses(&self) -> String {
        self.addresses(2, 9)
    }

    /// A `guest_addresses` setting of the slice's addresses `from..=to` (2..=62; those from
    /// 10 are DHCP's unless the network has none).
    pub fn addresses(&self, from: u32, to: u32) -> String {
        assert!(
            (2..=to).contains(&from) && to <= 62,
            "addresses {from}-{to} of a /26"
        );
        let (net, host) = (self.net, &self.host);
        format!(
            "{net}.{}-{net}.{}/26 via {host}",
            self.base + from,
            self.base + to
        )
    }

    /// The slice's address `n` (2..=62) and the command-line words that give it to a guest.
    pub fn address(&self, n: u32) -> (std::net::Ipv4Addr, String) {
        assert!((2..=62).contains(&n), "address {n} of a /26");
        let ip: std::net::Ipv4Addr = format!("{}.{}", self.net, self.base + n)
            .parse()
            .expect("an IPv4 address");
        (ip, format!("ip={ip}/26 gw={}", self.host))
    }

    /// The device.toml `nic` setting that attaches guests here.
    pub fn nic(&self) -> String {
        format!("network={}", self.name)
    }
}

impl Drop for GuestNet {
    fn drop(&mut self) {
        let _ = virsh(&self.uri, &["net-destroy", &self.name]);
    }
}

/// The Rust unikernel template for x86_64, built by `scripts/build-unikernel.sh` (the
/// README's test command runs it).
pub fn hello_http_x86_64() -> Result<std::path::PathBuf> {
    hello_http("hello-http-x86_64.elf")
}

/// The template for aarch64 (an arm64 `Image`).
pub fn hello_http_aarch64() -> Result<std::path::PathBuf> {
    hello_http("hello-http-aarch64.img")
}

fn hello_http(file: &str) -> Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .ancestors()
        .find(|d| d.file_name().is_some_and(|n| n == "target"))
        .context("the test binary is under target/")?;
    let image = target.join("unikernels").join(file);
    if !image.is_file() {
        bail!(
            "{} not found; build it with scripts/build-unikernel.sh",
            image.display()
        );
    }
    Ok(image)
}
