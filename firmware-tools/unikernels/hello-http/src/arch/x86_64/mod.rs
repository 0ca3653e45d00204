//! x86_64 under QEMU `-M pc` (i440FX, SeaBIOS has set up PCI): multiboot entry (boot.S),
//! COM1 console, TSC clock, 8259 PIC + 8254 PIT for waking `hlt`, port-I/O PCI config.
//!
//! All port I/O and the interrupt plumbing live here; the rest of the kernel sees only the
//! functions re-exported by `arch`.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};

global_asm!(include_str!("boot.S"), options(att_syntax));

const MULTIBOOT_MAGIC: u32 = 0x2BAD_B002;
const COM1: u16 = 0x3F8;
const PIC1: u16 = 0x20;
const PIC2: u16 = 0xA0;
const IRQ_BASE: u8 = 32;
/// The 8254's input clock.
const PIT_HZ: u64 = 1_193_182;

/// TSC ticks per microsecond, measured against the PIT at boot.
static TSC_PER_US: AtomicU64 = AtomicU64::new(1);
static TSC_BOOT: AtomicU64 = AtomicU64::new(0);
/// The NIC's legacy IRQ line (0xFF: none); masked by its handler, unmasked by `idle`.
static NIC_IRQ: AtomicU8 = AtomicU8::new(0xFF);

/// Called by boot.S in long mode with the multiboot registers.
#[no_mangle]
extern "C" fn x86_entry(magic: u32, info: u32) -> ! {
    serial_init();
    calibrate_tsc();
    interrupts_init();
    let cmdline = if magic == MULTIBOOT_MAGIC {
        multiboot_cmdline(info)
    } else {
        ""
    };
    crate::kmain(skip_kernel_path(cmdline))
}

/// Multiboot loaders (QEMU, GRUB) put the kernel's path in front of the arguments.
fn skip_kernel_path(cmdline: &str) -> &str {
    cmdline
        .trim_start()
        .split_once(' ')
        .map_or("", |(_, rest)| rest)
}

fn multiboot_cmdline(info: u32) -> &'static str {
    // SAFETY: the loader passes the physical address of its information structure, which is
    // identity-mapped and which nothing in this kernel overwrites (it lies outside the image).
    let (flags, ptr) = unsafe {
        let info = info as usize as *const u32;
        (info.read_volatile(), info.add(4).read_volatile())
    };
    if flags & (1 << 2) == 0 || ptr == 0 {
        return "";
    }
    let start = ptr as usize as *const u8;
    let mut len = 0;
    // SAFETY: flag bit 2 says `ptr` is a NUL-terminated string in loader memory (as above);
    // the scan is bounded in case it is not.
    while len < 4096 && unsafe { start.add(len).read_volatile() } != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes at `start` were just read and stay untouched for the kernel's life.
    let bytes = unsafe { core::slice::from_raw_parts(start, len) };
    core::str::from_utf8(bytes).unwrap_or("")
}

// ---- port I/O -------------------------------------------------------------------------

fn outb(port: u16, value: u8) {
    // SAFETY: port I/O on the fixed legacy devices this module drives (COM1, PIC, PIT, PCI
    // config); it touches no memory.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) }
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) }
    value
}

fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) }
}

fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack)) }
    value
}

// ---- console ----------------------------------------------------------------------------

fn serial_init() {
    outb(COM1 + 1, 0x00); // no UART interrupts
    outb(COM1 + 3, 0x80); // DLAB on
    outb(COM1, 0x01); // divisor 1: 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1, DLAB off
    outb(COM1 + 2, 0xC7); // FIFOs on and cleared
    outb(COM1 + 4, 0x03); // DTR, RTS
}

pub fn console_write(bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            serial_put(b'\r');
        }
        serial_put(b);
    }
}

fn serial_put(b: u8) {
    // Bounded wait for the transmit holding register: a missing UART must not hang boot.
    for _ in 0..100_000 {
        if inb(COM1 + 5) & 0x20 != 0 {
            break;
        }
    }
    outb(COM1, b);
}

// ---- time -------------------------------------------------------------------------------

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the time-stamp counter; no memory, no side effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Counts TSC ticks over 10 ms of PIT channel 2 (the speaker channel, polled, no IRQ).
fn calibrate_tsc() {
    const COUNT: u64 = PIT_HZ / 100;
    outb(0x61, (inb(0x61) & !0x02) | 0x01); // gate on, speaker off
    outb(0x43, 0xB0); // channel 2, lo/hi byte, mode 0
    outb(0x42, COUNT as u8);
    outb(0x42, (COUNT >> 8) as u8);
    let start = rdtsc();
    let mut spins = 0u32;
    while inb(0x61) & 0x20 == 0 && spins < 10_000_000 {
        spins += 1;
    }
    let per_us = (rdtsc() - start) / 10_000;
    TSC_PER_US.store(per_us.max(1), Ordering::Relaxed);
    TSC_BOOT.store(rdtsc(), Ordering::Relaxed);
}

/// A value that differs between boots (the raw TSC): seeds smoltcp, not cryptography.
pub fn entropy() -> u64 {
    rdtsc()
}

/// Microseconds since boot.
pub fn now_micros() -> u64 {
    (rdtsc() - TSC_BOOT.load(Ordering::Relaxed)) / TSC_PER_US.load(Ordering::Relaxed)
}

// ---- interrupts -------------------------------------------------------------------------

#[repr(C, align(16))]
struct Idt([u64; 2 * 48]);

static mut IDT: Idt = Idt([0; 2 * 48]);

extern "C" {
    static isr_table: [u64; 48];
}

/// The stack `isr_common` hands to [`x86_interrupt`].
#[repr(C)]
struct Frame {
    saved: [u64; 9],
    vector: u64,
    error: u64,
    rip: u64,
}

fn interrupts_init() {
    // SAFETY: runs once, on the only CPU, with interrupts off: nothing else can see the IDT
    // while it is filled; `isr_table` is boot.S's read-only table of stub addresses.
    let idt = unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (i, &handler) in isr_table.iter().enumerate() {
            // Interrupt gate, present, ring 0, code selector 0x08.
            idt.0[2 * i] =
                (handler & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | ((handler >> 16) & 0xFFFF) << 48;
            idt.0[2 * i + 1] = handler >> 32;
        }
        idt
    };
    let pointer: [u16; 5] = {
        let base = idt as *const Idt as u64;
        let limit = (core::mem::size_of::<Idt>() - 1) as u16;
        [
            limit,
            base as u16,
            (base >> 16) as u16,
            (base >> 32) as u16,
            (base >> 48) as u16,
        ]
    };
    // SAFETY: the IDT is static and complete; lidt copies the 10-byte pointer.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack)) };
    pic_init();
}

/// Remaps the PICs to vectors 32..47 (away from CPU exceptions) and masks every line but
/// the timer and the cascade; `idle` unmasks the NIC.
fn pic_init() {
    outb(PIC1, 0x11);
    outb(PIC2, 0x11);
    outb(PIC1 + 1, IRQ_BASE);
    outb(PIC2 + 1, IRQ_BASE + 8);
    outb(PIC1 + 1, 4);
    outb(PIC2 + 1, 2);
    outb(PIC1 + 1, 1);
    outb(PIC2 + 1, 1);
    outb(PIC1 + 1, 0xFA); // IRQ 0 (the PIT, one-shot, armed by `idle`) and 2 (cascade)
    outb(PIC2 + 1, 0xFF);
}

fn pic_set_mask(irq: u8, masked: bool) {
    let port = if irq < 8 { PIC1 + 1 } else { PIC2 + 1 };
    let bit = 1 << (irq % 8);
    let old = inb(port);
    outb(port, if masked { old | bit } else { old & !bit });
}

fn pic_eoi(irq: u8) {
    if irq >= 8 {
        outb(PIC2, 0x20);
    }
    outb(PIC1, 0x20);
}

#[no_mangle]
extern "C" fn x86_interrupt(frame: &Frame) {
    let vector = frame.vector as u8;
    if vector < IRQ_BASE {
        let cr2: u64;
        // SAFETY: reading CR2 (the faulting address) has no side effects.
        unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
        crate::println!(
            "unikernel: CPU exception {} (error {:#x}) at rip {:#x}, cr2 {:#x}",
            vector,
            frame.error,
            frame.rip,
            cr2
        );
        halt();
    }
    let irq = vector - IRQ_BASE;
    // The NIC's line is level-triggered and stays up until the main loop reads the device's
    // ISR: mask it here so it does not fire again at once.
    if irq == NIC_IRQ.load(Ordering::Relaxed) {
        pic_set_mask(irq, true);
    }
    pic_eoi(irq);
}

/// Records the NIC's legacy interrupt line so `idle` can wake on it (PCI config 0x3C, set
/// by SeaBIOS).
pub fn set_nic_irq(line: u8) {
    if line < 16 && line != 2 {
        NIC_IRQ.store(line, Ordering::Relaxed);
    }
}

/// Sleeps until an interrupt (the NIC) or for at most `max_us` (PIT one-shot, at most
/// ~55 ms). Interrupts are only ever enabled inside this function, so handlers never run
/// in the middle of the network stack.
pub fn idle(max_us: u64) {
    let count = (max_us * PIT_HZ / 1_000_000).clamp(1, 0xFFFF);
    outb(0x43, 0x30); // channel 0, lo/hi byte, mode 0: one interrupt at terminal count
    outb(0x40, count as u8);
    outb(0x40, (count >> 8) as u8);
    let nic = NIC_IRQ.load(Ordering::Relaxed);
    if nic != 0xFF {
        pic_set_mask(nic, false);
    }
    // SAFETY: `sti; hlt` is the race-free sleep (sti takes effect after hlt starts); the
    // handlers only touch the PIC. `cli` restores the invariant that interrupts are off.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// Stops for good (bad command line, fatal error): interrupts off, `hlt` forever.
pub fn halt() -> ! {
    loop {
        // SAFETY: stopping the CPU; nothing after this runs.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

// ---- PCI --------------------------------------------------------------------------------

/// PCI configuration mechanism #1 (ports 0xCF8/0xCFC): `-M pc` has no ECAM.
#[derive(Debug, Clone, Copy)]
pub struct PortCam;

impl ConfigurationAccess for PortCam {
    fn read_word(&self, df: DeviceFunction, register: u8) -> u32 {
        outl(0xCF8, config_address(df, register));
        inl(0xCFC)
    }

    fn write_word(&mut self, df: DeviceFunction, register: u8, data: u32) {
        outl(0xCF8, config_address(df, register));
        outl(0xCFC, data);
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

fn config_address(df: DeviceFunction, register: u8) -> u32 {
    0x8000_0000
        | u32::from(df.bus) << 16
        | u32::from(df.device) << 11
        | u32::from(df.function) << 8
        | u32::from(register & 0xFC)
}

/// PCI configuration access, with bus numbers and BARs already assigned (by SeaBIOS).
pub fn pci_init() -> PortCam {
    PortCam
}
