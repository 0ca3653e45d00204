// The test unikernel's machine code for aarch64: an arm64 Linux "Image" that QEMU (-M virt)
// and other arm64 boot loaders start at EL1 with the MMU off.
//
// Position independent (every address of its own is PC-relative), so it runs wherever the
// loader puts it. fwtool appends the two messages after the code and fills in `table`
// (their offsets from _start, and the mode) and the header's image size.
//
// Behaviour, as the x86 image (kernel.S):
//   mode 0: print the first message (READY <app> <version>) on the PL011 UART at
//           0x09000000, then sleep in WFI; the UART's receive interrupt (GICv2 SPI 1,
//           INTID 33) wakes it, and every line received (ended by CR, LF or CRLF) is
//           answered with the answer message. Interrupts stay masked: WFI wakes on a
//           pending interrupt all the same, so no vector table is needed, and an idle
//           instance costs ~0 CPU.
//   mode 1: print the first message (a boot line without READY) and sleep forever.
//
// Rebuild (the test `aarch64_blob_matches_source` checks the checked-in bytes):
//   aarch64-linux-gnu-as -o k.o kernel-aarch64.S && aarch64-linux-gnu-ld -Ttext=0 -o k.elf k.o
//   aarch64-linux-gnu-objcopy -O binary -j .text k.elf k.bin   (linked: `adr` is resolved)

    .text
    .globl _start
_start:
    b       start                   // code0
    .long   0                       // code1
    .quad   0x80000                 // text_offset
    .quad   0                       // image_size: filled in by fwtool
    .quad   0xa                     // flags: little-endian, 4K pages, anywhere in RAM
    .quad   0, 0, 0                 // res2-4
    .ascii  "ARM\x64"               // magic
    .long   0                       // res5 (PE header offset: none)

start:
    adr     x20, _start
    adr     x21, table
    mov     x19, #0x09000000        // PL011
    str     wzr, [x19, #0x30]       // CR: off while configuring
    mov     w0, #0x70
    str     w0, [x19, #0x2c]        // LCR_H: 8N1, FIFOs on
    mov     w0, #0x50
    str     w0, [x19, #0x38]        // IMSC: receive and receive-timeout interrupts
    mov     w0, #0x301
    str     w0, [x19, #0x30]        // CR: UART, transmit and receive enabled
    ldr     w0, [x21]
    add     x1, x20, x0
    bl      print
    ldr     w0, [x21, #8]
    cbnz    w0, halt

    mov     x22, #0x08000000        // GICv2 distributor
    mov     x23, #0x08010000        // GICv2 CPU interface
    mov     w0, #1
    str     w0, [x22]               // GICD_CTLR: forward interrupts
    mov     w0, #2
    str     w0, [x22, #0x104]       // GICD_ISENABLER1: INTID 33
    mov     w0, #0xa0
    strb    w0, [x22, #0x421]       // GICD_IPRIORITYR for INTID 33
    mov     w0, #1
    strb    w0, [x22, #0x821]       // GICD_ITARGETSR for INTID 33: CPU 0
    mov     w0, #0xff
    str     w0, [x23, #4]           // GICC_PMR: every priority
    mov     w0, #1
    str     w0, [x23]               // GICC_CTLR: signal interrupts to the CPU

idle:
    wfi
    ldr     w24, [x23, #0x0c]       // GICC_IAR: acknowledge
    mov     w0, #0x7ff
    str     w0, [x19, #0x44]        // UART ICR: clear (before draining: a byte that
                                    // arrives meanwhile raises it again)
drain:
    ldr     w0, [x19, #0x18]        // FR
    tbnz    w0, #4, drained         // receive FIFO empty
    ldr     w0, [x19]               // DR
    and     w0, w0, #0xff
    ldrb    w2, [x21, #12]          // the previous byte
    strb    w0, [x21, #12]
    cmp     w0, #13
    b.eq    answer
    cmp     w0, #10
    b.ne    drain
    cmp     w2, #13                 // LF right after CR: answered already
    b.eq    drain
answer:
    ldr     w0, [x21, #4]
    add     x1, x20, x0
    bl      print
    b       drain
drained:
    str     w24, [x23, #0x10]       // GICC_EOIR
    b       idle

halt:
    wfi
    b       halt

// Prints the NUL-terminated string at x1 (clobbers w0, w3).
print:
    ldrb    w0, [x1], #1
    cbz     w0, 2f
1:  ldr     w3, [x19, #0x18]
    tbnz    w3, #5, 1b              // transmit FIFO full
    str     w0, [x19]
    b       print
2:  ret

    .balign 8
table:
    .long   0                       // first message, offset from _start
    .long   0                       // answer message, offset from _start
    .long   0                       // mode
    .long   0                       // the previous byte received
