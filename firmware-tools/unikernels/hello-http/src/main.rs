//! hello-http: unifleet's template unikernel. Boots under QEMU/libvirt direct kernel boot
//! (x86_64 multiboot, aarch64 arm64 Image), finds a virtio-net NIC on PCI, configures IPv4
//! (command line or DHCP) and serves HTTP/1.1 on one port. See README.md.
#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod hal;
mod net;
mod pci;
mod server;

use core::fmt::{self, Write};
use core::mem::MaybeUninit;
use hello_http::config;
use linked_list_allocator::LockedHeap;

/// The heap: sockets (~6 KiB each), request buffers, virtio queues and buffers. Part of
/// bss, so the loader's memory map needs nothing else (and 16 MiB guests have room).
const HEAP_SIZE: usize = 3 << 20;

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

static mut HEAP: MaybeUninit<[u8; HEAP_SIZE]> = MaybeUninit::uninit();

/// The console: COM1 or the PL011. Unbuffered, so a halt never loses a line.
#[derive(Debug)]
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        arch::console_write(s.as_bytes());
        Ok(())
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::Console, $($arg)*);
    }};
}

/// Entered from the architecture's boot code with the kernel command line.
pub fn kmain(cmdline: &str) -> ! {
    // SAFETY: runs once, before any allocation; the heap array is used by nothing else.
    unsafe {
        let heap = &raw mut HEAP;
        ALLOCATOR.lock().init(heap.cast::<u8>(), HEAP_SIZE);
    }
    println!("hello-http {} booting", env!("CARGO_PKG_VERSION"));
    let config = match config::parse(cmdline) {
        Ok(config) => config,
        Err(bad) => {
            println!("unikernel: bad command line: {bad}");
            arch::halt();
        }
    };
    let (nic, irq_line) = match pci::virtio_net(arch::pci_init()) {
        Ok(found) => found,
        Err(reason) => {
            println!("unikernel: {reason}");
            arch::halt();
        }
    };
    arch::set_nic_irq(irq_line);
    server::run(nic, config)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("unikernel: panic: {info}");
    arch::halt()
}
