//! aarch64 under QEMU `-M virt`: arm64 Image entry (boot.S), PL011 console, generic-timer
//! clock, identity MMU, GIC (v2 or v3) so `wfi` wakes on the timer and the PCIe INTx
//! lines, and ECAM PCI config access found in the device tree.
//!
//! Nothing here takes an interrupt: PSTATE.I stays set and `wfi` still wakes when one is
//! pending, so there are no handlers to race with the network stack.

use core::arch::{asm, global_asm};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};

global_asm!(include_str!("boot.S"));

const UART: usize = 0x0900_0000;
const GIB: u64 = 1 << 30;
/// The virtual timer's interrupt (PPI 11).
const TIMER_INTID: usize = 27;
/// QEMU virt wires PCIe INTA..INTD to SPIs 3..6.
const PCI_INTIDS: core::ops::Range<usize> = 35..39;

static TIMER_HZ: AtomicU64 = AtomicU64::new(1);
static BOOT_COUNT: AtomicU64 = AtomicU64::new(0);
static ECAM: AtomicU64 = AtomicU64::new(0);
static PCI_MEM: AtomicU64 = AtomicU64::new(0);
static PCI_MEM_END: AtomicU64 = AtomicU64::new(0);
/// The GIC CPU interface (v2) or 0 for v3's system registers; `u64::MAX`: no GIC, no sleep.
static GICC: AtomicU64 = AtomicU64::new(u64::MAX);

macro_rules! read_sysreg {
    ($name:ident) => {{
        let value: u64;
        // SAFETY: reading a system register has no side effects on memory.
        unsafe { core::arch::asm!(concat!("mrs {}, ", stringify!($name)), out(reg) value, options(nomem, nostack)) };
        value
    }};
}

macro_rules! write_sysreg {
    ($name:ident, $value:expr) => {{
        let value: u64 = $value;
        // SAFETY: callers write only the configuration registers this module owns (timer,
        // GIC CPU interface, MMU setup), each with a value that keeps the running code valid.
        unsafe { core::arch::asm!(concat!("msr ", stringify!($name), ", {}"), in(reg) value, options(nostack)) };
    }};
}

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// Called by boot.S at EL1, MMU off, bss zeroed, with the device tree's address.
#[no_mangle]
extern "C" fn aarch64_entry(dtb: usize) -> ! {
    TIMER_HZ.store(read_sysreg!(cntfrq_el0).max(1), Ordering::Relaxed);
    BOOT_COUNT.store(read_sysreg!(cntvct_el0), Ordering::Relaxed);
    let (start, end) = (addr(&raw const __image_start), addr(&raw const __image_end));
    if (start..end).contains(&dtb) {
        crate::println!("unikernel: device tree at {dtb:#x} lies inside the image; more RAM?");
        halt();
    }
    // SAFETY: the loader passes the device tree's address in x0; it is outside the image
    // (checked above), so nothing here overwrites it.
    let Ok(fdt) = (unsafe { fdt::Fdt::from_ptr(dtb as *const u8) }) else {
        crate::println!("unikernel: no device tree at {dtb:#x}");
        halt();
    };
    let cmdline = fdt.chosen().bootargs().unwrap_or("");
    let ecam = pci_from_dt(&fdt);
    mmu_init(ecam);
    gic_init(&fdt);
    crate::kmain(cmdline)
}

fn addr(p: *const u8) -> usize {
    p as usize
}

#[no_mangle]
extern "C" fn aarch64_exception(vector: u64, esr: u64, elr: u64, far: u64) -> ! {
    crate::println!("unikernel: exception vector {vector} esr {esr:#x} elr {elr:#x} far {far:#x}");
    halt();
}

// ---- console ----------------------------------------------------------------------------

pub fn console_write(bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            uart_put(b'\r');
        }
        uart_put(b);
    }
}

fn uart_put(b: u8) {
    // SAFETY: the PL011 of the virt board: flag register at +0x18 (bit 5: TX FIFO full),
    // data register at +0; device memory (identity-mapped, or MMU off).
    unsafe {
        for _ in 0..100_000 {
            if read_volatile((UART + 0x18) as *const u32) & (1 << 5) == 0 {
                break;
            }
        }
        write_volatile(UART as *mut u32, u32::from(b));
    }
}

// ---- time -------------------------------------------------------------------------------

/// A value that differs between boots (the counter's low bits): seeds smoltcp, not
/// cryptography.
pub fn entropy() -> u64 {
    read_sysreg!(cntvct_el0).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Microseconds since boot.
pub fn now_micros() -> u64 {
    let ticks = read_sysreg!(cntvct_el0) - BOOT_COUNT.load(Ordering::Relaxed);
    (u128::from(ticks) * 1_000_000 / u128::from(TIMER_HZ.load(Ordering::Relaxed))) as u64
}

/// Sleeps until a PCIe interrupt (the NIC) is pending or `max_us` passed.
pub fn idle(max_us: u64) {
    if GICC.load(Ordering::Relaxed) == u64::MAX {
        return; // no GIC found: poll
    }
    let ticks = u128::from(max_us) * u128::from(TIMER_HZ.load(Ordering::Relaxed)) / 1_000_000;
    write_sysreg!(
        cntv_tval_el0,
        ticks.clamp(1, u128::from(u32::MAX >> 1)) as u64
    );
    write_sysreg!(cntv_ctl_el0, 1); // enabled, not masked: the line rises at the deadline
                                    // SAFETY: waits for an interrupt; PSTATE.I is set, so none is taken.
    unsafe { asm!("dsb sy", "wfi", options(nomem, nostack)) };
    write_sysreg!(cntv_ctl_el0, 0); // off again, so the line is low until the next idle
}

/// Stops for good (bad command line, fatal error).
pub fn halt() -> ! {
    loop {
        // SAFETY: waiting with interrupts masked and the timer off: nothing runs after this.
        unsafe { asm!("wfi", options(nomem, nostack)) };
    }
}

/// PCIe interrupts are routed at boot (all four INTx lines wake `idle`).
pub fn set_nic_irq(_line: u8) {}

// ---- MMU --------------------------------------------------------------------------------

#[repr(C, align(4096))]
struct Table([u64; 512]);

static mut LEVEL1: Table = Table([0; 512]);

/// Identity map with 1 GiB blocks: the first GiB (flash, GIC, UART, PCIe ECAM and 32-bit
/// window) as device memory, 1..4 GiB (RAM starts at 1 GiB) as normal cacheable memory, and
/// a high ECAM's GiB as device memory. Cacheable RAM matters under KVM on real boards.
fn mmu_init(ecam: u64) {
    const BLOCK: u64 = 0b01 | (1 << 10); // valid block, access flag
    const DEVICE: u64 = BLOCK | (3 << 53); // attr 0, PXN|UXN
    const NORMAL: u64 = BLOCK | (1 << 2) | (3 << 8) | (1 << 54); // attr 1, inner shareable, UXN
                                                                 // SAFETY: the only CPU, MMU off: nothing else reads the table while it is written.
    let table = unsafe { &mut *core::ptr::addr_of_mut!(LEVEL1) };
    table.0[0] = DEVICE;
    for gib in 1..4 {
        table.0[gib as usize] = (gib * GIB) | NORMAL;
    }
    if (4 * GIB..512 * GIB).contains(&ecam) {
        table.0[(ecam / GIB) as usize] = (ecam & !(GIB - 1)) | DEVICE;
    }
    write_sysreg!(mair_el1, 0xFF << 8); // attr 0: Device-nGnRnE, attr 1: normal write-back
    let tcr = 25 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (2 << 32); // 39-bit VA, 40-bit PA
    write_sysreg!(tcr_el1, tcr);
    write_sysreg!(ttbr0_el1, table as *const Table as u64);
    // SAFETY: barriers around the switch, so the walker sees the table and later code runs
    // with the new translation (identical addresses, so the next instruction is still there).
    unsafe { asm!("dsb ish", "isb", options(nostack)) };
    let sctlr = (read_sysreg!(sctlr_el1) | 1 | (1 << 2) | (1 << 12)) & !(1 << 1); // M, C, I; no A
    write_sysreg!(sctlr_el1, sctlr);
    // SAFETY: as above.
    unsafe { asm!("isb", options(nostack)) };
}

// ---- GIC --------------------------------------------------------------------------------

fn mmio_write(base: u64, offset: usize, value: u32) {
    // SAFETY: GIC registers found in the device tree, mapped as device memory by `mmu_init`.
    unsafe { write_volatile((base as usize + offset) as *mut u32, value) }
}

fn mmio_read(base: u64, offset: usize) -> u32 {
    // SAFETY: as in `mmio_write`.
    unsafe { read_volatile((base as usize + offset) as *const u32) }
}

/// Enables the virtual timer PPI and the PCIe SPIs, routed to this CPU. Without a GIC
/// `idle` does not sleep (the instance then polls, using a whole core).
fn gic_init(fdt: &fdt::Fdt) {
    let regs = |compat: &[&str]| {
        let node = fdt.find_compatible(compat)?;
        let mut reg = node.reg()?;
        Some((
            reg.next()?.starting_address as u64,
            reg.next()?.starting_address as u64,
        ))
    };
    if let Some((gicd, gicc)) = regs(&["arm,cortex-a15-gic", "arm,gic-400"]) {
        for intid in core::iter::once(TIMER_INTID).chain(PCI_INTIDS) {
            gicd_enable(gicd, intid);
            // Byte-wide target register: CPU interface 0.
            let word = mmio_read(gicd, 0x800 + intid / 4 * 4) | 1 << (8 * (intid % 4));
            mmio_write(gicd, 0x800 + intid / 4 * 4, word);
        }
        mmio_write(gicd, 0, 1); // distributor on
        mmio_write(gicc, 0x4, 0xF0); // priority mask: let ours (0xA0) through
        mmio_write(gicc, 0, 1); // CPU interface on
        GICC.store(gicc, Ordering::Relaxed);
    } else if let Some((gicd, gicr)) = regs(&["arm,gic-v3"]) {
        gic_v3_init(gicd, gicr);
        GICC.store(0, Ordering::Relaxed);
    } else {
        crate::println!("unikernel: no GIC in the device tree; polling");
    }
}

/// Priority 0xA0 and set-enable for one interrupt in a v2 distributor (or v3 for SPIs).
fn gicd_enable(gicd: u64, intid: usize) {
    let prio = mmio_read(gicd, 0x400 + intid / 4 * 4) & !(0xFF << (8 * (intid % 4)));
    mmio_write(
        gicd,
        0x400 + intid / 4 * 4,
        prio | 0xA0 << (8 * (intid % 4)),
    );
    mmio_write(gicd, 0x100 + intid / 32 * 4, 1 << (intid % 32));
}

/// GICv3: affinity routing; the timer PPI through this CPU's redistributor (the first one),
/// the SPIs through the distributor, all group 1; the CPU interface by system registers.
fn gic_v3_init(gicd: u64, gicr: u64) {
    mmio_write(gicd, 0, (1 << 4) | 0b11); // ARE, enable groups 0 and 1
    for intid in PCI_INTIDS {
        mmio_write(
            gicd,
            0x80 + intid / 32 * 4,
            mmio_read(gicd, 0x80 + intid / 32 * 4) | 1 << (intid % 32),
        );
        mmio_write(gicd, 0x6000 + intid * 8, 0); // IROUTER: affinity 0.0.0.0
        mmio_write(gicd, 0x6000 + intid * 8 + 4, 0);
        gicd_enable(gicd, intid);
    }
    let waker = mmio_read(gicr, 0x14) & !(1 << 1); // clear ProcessorSleep
    mmio_write(gicr, 0x14, waker);
    for _ in 0..1_000_000 {
        if mmio_read(gicr, 0x14) & (1 << 2) == 0 {
            break; // ChildrenAsleep cleared
        }
    }
    let sgi = gicr + 0x1_0000;
    mmio_write(sgi, 0x80, mmio_read(sgi, 0x80) | 1 << TIMER_INTID); // group 1
    gicd_enable(sgi, TIMER_INTID); // same layout for SGIs/PPIs in the SGI frame
    write_sysreg!(icc_sre_el1, read_sysreg!(icc_sre_el1) | 1);
    // SAFETY: makes the system-register interface visible before it is used.
    unsafe { asm!("isb", options(nostack)) };
    write_sysreg!(icc_pmr_el1, 0xF0);
    write_sysreg!(icc_igrpen1_el1, 1);
}

// ---- PCI --------------------------------------------------------------------------------

/// Finds the generic ECAM host bridge: its configuration space and its 32-bit memory window
/// (where `pci::assign` places BARs, since nothing ran before us to do it).
fn pci_from_dt(fdt: &fdt::Fdt) -> u64 {
    let Some(node) = fdt.find_compatible(&["pci-host-ecam-generic"]) else {
        return 0;
    };
    let Some(ecam) = node.reg().and_then(|mut r| r.next()) else {
        return 0;
    };
    // ranges: (pci.hi, pci.mid, pci.lo, cpu.hi, cpu.lo, size.hi, size.lo) big-endian cells;
    // space code 0b10 in pci.hi bits 24..25 is 32-bit memory.
    let ranges = node.property("ranges").map_or(&[][..], |p| p.value);
    for entry in ranges.chunks_exact(28) {
        let cell =
            |i: usize| u32::from_be_bytes(entry[4 * i..4 * i + 4].try_into().unwrap_or([0; 4]));
        if (cell(0) >> 24) & 3 == 0b10 {
            let cpu = u64::from(cell(3)) << 32 | u64::from(cell(4));
            let size = u64::from(cell(5)) << 32 | u64::from(cell(6));
            PCI_MEM.store(cpu, Ordering::Relaxed);
            PCI_MEM_END.store(cpu + size, Ordering::Relaxed);
        }
    }
    let base = ecam.starting_address as u64;
    ECAM.store(base, Ordering::Relaxed);
    base
}

/// ECAM configuration access (PCIe: 4 KiB per function, bus/device/function in the address).
#[derive(Debug, Clone, Copy)]
pub struct Ecam(u64);

impl Ecam {
    fn address(self, df: DeviceFunction, register: u8) -> *mut u32 {
        let offset = (u64::from(df.bus) << 20)
            | (u64::from(df.device) << 15)
            | (u64::from(df.function) << 12)
            | u64::from(register & 0xFC);
        (self.0 + offset) as usize as *mut u32
    }
}

impl ConfigurationAccess for Ecam {
    fn read_word(&self, df: DeviceFunction, register: u8) -> u32 {
        // SAFETY: the ECAM region from the device tree, mapped as device memory; reads of
        // absent functions return all ones.
        unsafe { read_volatile(self.address(df, register)) }
    }

    fn write_word(&mut self, df: DeviceFunction, register: u8, data: u32) {
        // SAFETY: as in `read_word`.
        unsafe { write_volatile(self.address(df, register), data) }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        *self
    }
}

/// PCI configuration access after numbering buses and placing BARs in the host bridge's
/// 32-bit window (no firmware did it: QEMU boots the kernel directly).
pub fn pci_init() -> Ecam {
    let mut cam = Ecam(ECAM.load(Ordering::Relaxed));
    let window = PCI_MEM.load(Ordering::Relaxed)..PCI_MEM_END.load(Ordering::Relaxed);
    if cam.0 == 0 || window.is_empty() {
        crate::println!("unikernel: no PCIe host bridge in the device tree");
        halt();
    }
    if let Err(reason) = crate::pci::assign(&mut cam, window) {
        crate::println!("unikernel: PCI setup failed: {reason}");
        halt();
    }
    cam
}
