# x86_64 boot: a multiboot (v1) header with address fields, so QEMU's -kernel (and libvirt's
# <kernel>) loads this 64-bit ELF as a flat image at 1 MiB; a 32-bit entry that builds
# identity page tables for the low 4 GiB and switches to long mode; then Rust.
# The loader enters in 32-bit protected mode, paging off, EAX = 0x2BADB002, EBX = the
# multiboot information structure.

    .section .multiboot, "a"
    .p2align 2
multiboot_header:
    .long 0x1BADB002                    # magic
    .long 0x00010000                    # flags: bit 16, the address fields below are valid
    .long -(0x1BADB002 + 0x00010000)    # checksum
    .long multiboot_header              # header_addr
    .long __image_start                 # load_addr: the file is loaded from its first byte
    .long __load_end                    # load_end_addr
    .long __bss_end                     # bss_end_addr: the loader zeroes up to here
    .long _start32                      # entry_addr

    .section .boot32, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    mov $boot_stack_top, %esp
    # Keep EBX (multiboot info) and EAX (magic) for Rust: ESI, EDI are not touched below.
    mov %eax, %esi
    mov %ebx, %edi

    # PML4[0] -> PDPT; PDPT[0..4] -> the four page directories.
    mov $pdpt, %eax
    or $0x3, %eax                       # present, writable
    mov %eax, pml4
    mov $pd, %eax
    or $0x3, %eax
    xor %ecx, %ecx
1:  mov %eax, pdpt(,%ecx,8)
    add $0x1000, %eax
    inc %ecx
    cmp $4, %ecx
    jb 1b

    # 2048 2 MiB pages: 0..4 GiB identity. From 3 GiB up (the PCI hole: MMIO BARs, the
    # APICs) caching is off (PCD|PWT), whatever the MTRRs say.
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax                      # present, writable, 2 MiB page
    cmp $1536, %ecx
    jb 3f
    or $0x18, %eax                      # PWT|PCD
3:  mov %eax, pd(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 2b

    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                      # PAE
    mov %eax, %cr4
    mov $0xC0000080, %ecx               # EFER
    rdmsr
    or $0x100, %eax                     # LME
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax                # PG|PE
    mov %eax, %cr0
    lgdt gdt_pointer
    ljmp $0x08, $start64

    .code64
start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %ax, %ax
    mov %ax, %fs
    mov %ax, %gs
    mov $boot_stack_top, %rsp
    # x86_entry(magic: u32 in EDI, info: u32 in ESI): swap into the SysV argument order.
    xchg %esi, %edi
    call x86_entry
4:  cli
    hlt
    jmp 4b

    .section .rodata
    .p2align 3
gdt:
    .quad 0                             # null
    .quad 0x00AF9A000000FFFF            # 0x08: 64-bit code, ring 0
    .quad 0x00CF92000000FFFF            # 0x10: data
gdt_end:
gdt_pointer:
    .word gdt_end - gdt - 1
    .quad gdt

    .section .bss
    .p2align 12
pml4:
    .skip 4096
pdpt:
    .skip 4096
pd:
    .skip 4096 * 4
boot_stack:
    .skip 64 * 1024
boot_stack_top:

# Interrupt stubs: vectors 0..47 (CPU exceptions, then the two 8259 PICs remapped to
# 32..47). Each pushes a dummy error code where the CPU pushes none, then its vector, and
# joins the common path, which saves the registers the C ABI lets Rust clobber.
    .section .text
    .code64
    .altmacro
.macro isr_stub vec
isr_\vec:
    .if (\vec == 8) || ((\vec >= 10) && (\vec <= 14)) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    push $0
    .endif
    push $\vec
    jmp isr_common
.endm

.set vec, 0
.rept 48
    isr_stub %vec
    .set vec, vec + 1
.endr

isr_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    mov %rsp, %rdi                      # &Frame: the saved registers, vector, error, CPU frame
    call x86_interrupt
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp                       # vector and error code
    iretq

.macro isr_addr vec
    .quad isr_\vec
.endm
    .section .rodata
    .p2align 3
    .global isr_table
isr_table:
.set vec, 0
.rept 48
    isr_addr %vec
    .set vec, vec + 1
.endr
    .noaltmacro
