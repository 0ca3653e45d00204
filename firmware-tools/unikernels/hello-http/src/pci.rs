//! Finding the virtio-net function, and (on boards where no firmware ran) numbering the
//! buses behind bridges and placing BARs, so that libvirt's default PCIe layout (the NIC
//! behind a pcie-root-port) works as well as QEMU's `-device virtio-net-pci` on bus 0.

use crate::hal::Hal;
use virtio_drivers::device::net::VirtIONet;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::PciTransport;

/// Descriptors per virtqueue, and the size of each receive buffer (a full Ethernet frame
/// plus the virtio header).
pub const QUEUE_SIZE: usize = 32;
pub const BUF_LEN: usize = 2048;

pub type Nic = VirtIONet<Hal, PciTransport, QUEUE_SIZE>;

const VIRTIO_VENDOR: u16 = 0x1AF4;
/// Transitional (0x1000) and modern (0x1041) virtio-net.
const VIRTIO_NET: [u16; 2] = [0x1000, 0x1041];
const COMMAND: u8 = 0x04;
const MEMORY_AND_BUS_MASTER: u32 = 0x6;

/// Finds the first virtio-net function and brings it up. Returns the device and its legacy
/// interrupt line.
pub fn virtio_net<C: ConfigurationAccess + Copy>(mut cam: C) -> Result<(Nic, u8), &'static str> {
    let df = find(&cam, 0, 0).ok_or("no virtio-net PCI device found")?;
    let command = cam.read_word(df, COMMAND) & 0xFFFF;
    cam.write_word(df, COMMAND, command | MEMORY_AND_BUS_MASTER);
    let irq_line = cam.read_word(df, 0x3C) as u8;
    let mut root = PciRoot::new(cam);
    let transport =
        PciTransport::new::<Hal, C>(&mut root, df).map_err(|_| "virtio-net: bad PCI transport")?;
    let nic = VirtIONet::new(transport, BUF_LEN).map_err(|_| "virtio-net: init failed")?;
    Ok((nic, irq_line))
}

/// Every present function on `bus`, as (function, header type).
fn functions<C: ConfigurationAccess>(
    cam: &C,
    bus: u8,
) -> impl Iterator<Item = (DeviceFunction, u8)> + '_ {
    (0..32u8).flat_map(move |device| {
        let first = DeviceFunction {
            bus,
            device,
            function: 0,
        };
        let header = (cam.read_word(first, 0x0C) >> 16) as u8;
        let count = if header & 0x80 != 0 { 8 } else { 1 };
        (0..count).filter_map(move |function| {
            let df = DeviceFunction {
                bus,
                device,
                function,
            };
            let id = cam.read_word(df, 0);
            (id & 0xFFFF != 0xFFFF).then(|| (df, (cam.read_word(df, 0x0C) >> 16) as u8 & 0x7F))
        })
    })
}

/// Depth-first search from `bus` through bridges (following their secondary bus numbers).
fn find<C: ConfigurationAccess>(cam: &C, bus: u8, depth: u8) -> Option<DeviceFunction> {
    for (df, header) in functions(cam, bus) {
        let id = cam.read_word(df, 0);
        if id as u16 == VIRTIO_VENDOR && VIRTIO_NET.contains(&((id >> 16) as u16)) {
            return Some(df);
        }
        let secondary = (cam.read_word(df, 0x18) >> 8) as u8;
        if header == 1 && secondary > bus && depth < 8 {
            if let Some(found) = find(cam, secondary, depth + 1) {
                return Some(found);
            }
        }
    }
    None
}

// Only boards without firmware (aarch64 virt) need `assign`; x86 has SeaBIOS do it.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
/// Bus numbers and memory BARs for everything below the host bridge, from the host
/// bridge's 32-bit memory window. I/O BARs are left alone (virtio's modern transport uses
/// memory BARs only).
pub fn assign<C: ConfigurationAccess>(
    cam: &mut C,
    window: core::ops::Range<u64>,
) -> Result<(), &'static str> {
    let mut state = Assign {
        next_bus: 0,
        next_mem: window.start,
        end: window.end,
    };
    state.bus(cam, 0, 0)
}

#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
struct Assign {
    next_bus: u8,
    next_mem: u64,
    end: u64,
}

#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
const BRIDGE_WINDOW_ALIGN: u64 = 1 << 20;

#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
impl Assign {
    fn bus<C: ConfigurationAccess>(
        &mut self,
        cam: &mut C,
        bus: u8,
        depth: u8,
    ) -> Result<(), &'static str> {
        // Collected first: the bridge branch below writes through `cam`.
        let mut found = [None; 64];
        for (slot, item) in found.iter_mut().zip(functions(cam, bus)) {
            *slot = Some(item);
        }
        for (df, header) in found.into_iter().flatten() {
            match header {
                0 => self.endpoint(cam, df)?,
                1 if depth < 8 => self.bridge(cam, df, bus, depth)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn bridge<C: ConfigurationAccess>(
        &mut self,
        cam: &mut C,
        df: DeviceFunction,
        bus: u8,
        depth: u8,
    ) -> Result<(), &'static str> {
        self.next_bus = self.next_bus.checked_add(1).ok_or("out of bus numbers")?;
        let secondary = self.next_bus;
        let numbers = |sub: u8| u32::from(bus) | u32::from(secondary) << 8 | u32::from(sub) << 16;
        cam.write_word(df, 0x18, numbers(0xFF));
        self.next_mem = self.next_mem.next_multiple_of(BRIDGE_WINDOW_ALIGN);
        let base = self.next_mem;
        self.bus(cam, secondary, depth + 1)?;
        cam.write_word(df, 0x18, numbers(self.next_bus));
        self.next_mem = self.next_mem.next_multiple_of(BRIDGE_WINDOW_ALIGN);
        // Memory window [base, next_mem), in 1 MiB units; base > limit closes it.
        let window = if self.next_mem > base {
            ((self.next_mem - 1) >> 16 & 0xFFF0) << 16 | (base >> 16 & 0xFFF0)
        } else {
            0xFFF0
        };
        cam.write_word(df, 0x20, window as u32);
        cam.write_word(df, 0x24, 0xFFF0); // no prefetchable window
        cam.write_word(df, 0x1C, 0xF0); // no I/O window
        cam.write_word(df, COMMAND, MEMORY_AND_BUS_MASTER);
        Ok(())
    }

    fn endpoint<C: ConfigurationAccess>(
        &mut self,
        cam: &mut C,
        df: DeviceFunction,
    ) -> Result<(), &'static str> {
        cam.write_word(df, COMMAND, 0); // decoding off while BARs are sized
        let mut bar = 0;
        while bar < 6 {
            let register = 0x10 + 4 * bar;
            let original = cam.read_word(df, register);
            cam.write_word(df, register, u32::MAX);
            let probe = cam.read_word(df, register);
            let is_64 = original & 0b111 == 0b100;
            if original & 1 != 0 || probe == 0 {
                cam.write_word(df, register, original); // I/O or absent
                bar += 1;
                continue;
            }
            let mut mask = u64::from(probe & !0xF);
            if is_64 {
                cam.write_word(df, register + 4, u32::MAX);
                mask |= u64::from(cam.read_word(df, register + 4)) << 32;
            } else {
                mask |= 0xFFFF_FFFF_0000_0000;
            }
            let size = (!mask).wrapping_add(1);
            let address = self.next_mem.next_multiple_of(size);
            if address + size > self.end || address + size > 1 << 32 {
                return Err("PCI memory window exhausted");
            }
            self.next_mem = address + size;
            cam.write_word(df, register, address as u32);
            if is_64 {
                cam.write_word(df, register + 4, 0);
            }
            bar += if is_64 { 2 } else { 1 };
        }
        cam.write_word(df, COMMAND, MEMORY_AND_BUS_MASTER);
        Ok(())
    }
}
