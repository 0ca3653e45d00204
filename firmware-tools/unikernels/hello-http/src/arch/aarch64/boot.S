// aarch64 boot: an arm64 Linux-style Image header (what QEMU's -kernel, libvirt's <kernel>
// and U-Boot's booti understand), then the entry. The loader jumps to the first byte at EL1
// (or EL2) with the MMU off and the device tree's address in x0. The image is linked for
// RAM base + text_offset; the entry refuses to run anywhere else rather than crash later.

    .section .text.boot, "ax"
    .global _start
_start:
    b primary_entry                     // code0
    .long 0                             // code1
    .quad 0x80000                       // text_offset from a 2 MiB aligned base
    .quad __image_size                  // image_size: file and bss, what must be free
    .quad 0x2                           // flags: little-endian, 4 KiB pages
    .quad 0, 0, 0                       // res2..res4
    .ascii "ARM\x64"                    // magic
    .long 0                             // res5 (no PE header)

primary_entry:
    mov x19, x0                         // the device tree
    adr x9, _start
    ldr x10, =_start
    cmp x9, x10
    b.ne wrong_place

    mrs x9, CurrentEL
    cmp x9, #(2 << 2)
    b.ne at_el1
    // EL2 (e.g. -M virt,virtualization=on): run the kernel at EL1, timers accessible.
    mov x9, #(1 << 31)                  // HCR_EL2.RW: EL1 is AArch64
    msr hcr_el2, x9
    mov x9, #3                          // CNTHCTL_EL2: EL1 may use the physical counter/timer
    msr cnthctl_el2, x9
    msr cntvoff_el2, xzr
    mov x9, #0x3c5                      // EL1h, DAIF masked
    msr spsr_el2, x9
    adr x9, at_el1
    msr elr_el2, x9
    eret

at_el1:
    mov x9, #(3 << 20)                  // CPACR_EL1.FPEN: the compiler may use FP/SIMD registers
    msr cpacr_el1, x9
    isb
    ldr x9, =__bss_start
    ldr x10, =__bss_end
1:  cmp x9, x10
    b.hs 2f
    stp xzr, xzr, [x9], #16
    b 1b
2:  ldr x9, =boot_stack_top
    mov sp, x9
    adr x9, exception_vectors
    msr vbar_el1, x9
    isb
    mov x0, x19
    bl aarch64_entry
hang:
    wfi
    b hang

// Loaded somewhere else than linked: nothing absolute can be trusted, so no message.
wrong_place:
    wfe
    b wrong_place

    .ltorg

// Every exception is fatal here (interrupts stay masked; WFI wakes without taking them):
// report which vector, ESR, ELR and FAR, then stop.
    .section .text
    .p2align 11
exception_vectors:
    .set vector, 0
    .rept 16
    .p2align 7
    mov x0, #vector
    b exception_common
    .set vector, vector + 1
    .endr

exception_common:
    mrs x1, esr_el1
    mrs x2, elr_el1
    mrs x3, far_el1
    bl aarch64_exception
    b hang

    .section .bss
    .p2align 4
boot_stack:
    .skip 64 * 1024
boot_stack_top:
