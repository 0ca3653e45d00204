//! smoltcp over virtio-net: the `Device` adapter, and the interface's address (static from
//! the command line, or DHCPv4).

use crate::pci::Nic;
use core::cell::RefCell;
use core::net::Ipv4Addr;
use hello_http::config::StaticAddress;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::dhcpv4;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Cidr};
use virtio_drivers::device::net::RxBuffer;

/// The NIC as smoltcp sees it. Both tokens of a receive need the device (the receive token
/// to recycle its buffer, the transmit token to answer), hence the `RefCell`.
pub struct NetDevice {
    nic: RefCell<Nic>,
}

impl NetDevice {
    pub fn new(nic: Nic) -> NetDevice {
        NetDevice {
            nic: RefCell::new(nic),
        }
    }

    pub fn mac(&self) -> EthernetAddress {
        EthernetAddress(self.nic.borrow().mac_address())
    }

    /// Reads (and so clears) the device's interrupt status, lowering its INTx line.
    pub fn ack_interrupt(&mut self) {
        self.nic.get_mut().ack_interrupt();
    }

    /// Whether a received frame is waiting (checked before sleeping).
    pub fn has_frame(&mut self) -> bool {
        self.nic.get_mut().can_recv()
    }
}

pub struct Rx<'a> {
    nic: &'a RefCell<Nic>,
    buffer: RxBuffer,
}

pub struct Tx<'a> {
    nic: &'a RefCell<Nic>,
}

impl Device for NetDevice {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        let buffer = self.nic.get_mut().receive().ok()?;
        Some((
            Rx {
                nic: &self.nic,
                buffer,
            },
            Tx { nic: &self.nic },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Tx<'_>> {
        self.nic
            .get_mut()
            .can_send()
            .then_some(Tx { nic: &self.nic })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps.max_burst_size = Some(1);
        caps
    }
}

impl RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let result = f(self.buffer.packet());
        if self
            .nic
            .borrow_mut()
            .recycle_rx_buffer(self.buffer)
            .is_err()
        {
            crate::println!("unikernel: virtio-net: could not recycle a receive buffer");
        }
        result
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut nic = self.nic.borrow_mut();
        let mut buffer = nic.new_tx_buffer(len);
        let result = f(buffer.packet_mut());
        if nic.send(buffer).is_err() {
            crate::println!("unikernel: virtio-net: send failed");
        }
        result
    }
}

/// The interface's address: fixed, or whatever the DHCP socket last said.
pub enum Addressing {
    Static,
    Dhcp(SocketHandle),
}

/// Builds the interface; with a static address it is configured at once, otherwise a DHCP
/// socket is added to `sockets`.
pub fn interface(
    device: &mut NetDevice,
    address: Option<StaticAddress>,
    sockets: &mut SocketSet<'_>,
    now: Instant,
) -> (Interface, Addressing) {
    let mac = device.mac();
    let mut config = IfaceConfig::new(HardwareAddress::Ethernet(mac));
    // The seed picks TCP initial sequence numbers, ephemeral ports and the DHCP transaction
    // id: instances booted from one image must differ (same seed, same xid on one LAN).
    let mac_bits = mac.0.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
    config.random_seed = crate::arch::entropy() ^ mac_bits.rotate_left(29);
    let mut iface = Interface::new(config, device, now);
    let Some(address) = address else {
        let mut dhcp = dhcpv4::Socket::new();
        // smoltcp retries a DISCOVER after 10 s; dnsmasq (libvirt's DHCP server) drops the
        // first DISCOVER for an address while it pings it, so retry sooner.
        let mut retry = dhcp.get_retry_config();
        retry.discover_timeout = smoltcp::time::Duration::from_secs(1);
        retry.initial_request_timeout = smoltcp::time::Duration::from_secs(1);
        dhcp.set_retry_config(retry);
        return (iface, Addressing::Dhcp(sockets.add(dhcp)));
    };
    set_address(
        &mut iface,
        Ipv4Cidr::new(address.ip, address.prefix_len),
        address.gateway,
    );
    (iface, Addressing::Static)
}

fn set_address(iface: &mut Interface, cidr: Ipv4Cidr, gateway: Option<Ipv4Addr>) {
    iface.update_ip_addrs(|addrs| {
        addrs.clear();
        let _ = addrs.push(IpCidr::Ipv4(cidr));
    });
    iface.routes_mut().remove_default_ipv4_route();
    if let Some(gateway) = gateway {
        let _ = iface.routes_mut().add_default_ipv4_route(gateway);
    }
}

/// Applies what the DHCP socket reports: `Some(Some(ip))` when an address was configured,
/// `Some(None)` when it was taken away (also reported once at the start, before any lease).
pub fn poll_dhcp(
    iface: &mut Interface,
    sockets: &mut SocketSet<'_>,
    handle: SocketHandle,
) -> Option<Option<Ipv4Addr>> {
    match sockets.get_mut::<dhcpv4::Socket>(handle).poll()? {
        dhcpv4::Event::Configured(config) => {
            set_address(iface, config.address, config.router);
            Some(Some(config.address.address()))
        }
        dhcpv4::Event::Deconfigured => {
            iface.update_ip_addrs(|addrs| addrs.clear());
            iface.routes_mut().remove_default_ipv4_route();
            Some(None)
        }
    }
}
