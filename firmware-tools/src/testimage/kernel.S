# The test unikernel's machine code: a 32-bit x86 multiboot kernel.
#
# Loaded by a multiboot loader (QEMU -kernel, GRUB) at 0x100060, right after the ELF
# header, one program header and the multiboot header that fwtool writes in front of it.
# fwtool copies the assembled bytes of this file (see blob.rs) and fills in `table`.
#
# Behaviour:
#   mode 0: print the first message (READY <app> <version>) on COM1, then sleep with hlt;
#           every line received on COM1 (ended by CR, LF or CRLF) wakes an interrupt
#           handler that prints the answer message. No polling: an idle instance costs ~0 CPU.
#   mode 1: print the first message (a boot line without READY) and halt forever: the
#           "boots but never becomes healthy" image used for rollback tests.
#
# Rebuild (the test `blob_matches_source` checks the checked-in bytes against this file):
#   as --32 -o k.o kernel.S && ld -m elf_i386 -Ttext=0x100060 -o k.elf k.o
#   objcopy -O binary -j .text k.elf k.bin && nm k.elf | grep -w table

.intel_syntax noprefix
.code32
.text
.globl _start
_start:
    cli
    lgdt [gdt_desc]
    ljmp 0x08, offset reload_cs
reload_cs:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    mov ss, ax
    mov esp, 0x80000

    # COM1: 115200 8N1, FIFO on, DTR|RTS|OUT2 (OUT2 gates the IRQ line)
    mov dx, 0x3F9
    xor al, al
    out dx, al
    mov dx, 0x3FB
    mov al, 0x80
    out dx, al
    mov dx, 0x3F8
    mov al, 1
    out dx, al
    mov dx, 0x3F9
    xor al, al
    out dx, al
    mov dx, 0x3FB
    mov al, 3
    out dx, al
    mov dx, 0x3FA
    mov al, 0xC7
    out dx, al
    mov dx, 0x3FC
    mov al, 0x0B
    out dx, al

    mov esi, [msg_first]
    call print
    cmp dword ptr [mode], 0
    jne halt_forever

    # IDT at 0x10000: 48 gates to default_isr, vector 0x24 (IRQ4, COM1) to serial_isr
    mov edi, 0x10000
    mov ecx, 48
    mov eax, offset default_isr
fill_idt:
    call set_gate
    loop fill_idt
    mov edi, 0x10000 + 0x24 * 8
    mov eax, offset serial_isr
    call set_gate
    lidt [idt_desc]

    # 8259 PICs: master at 0x20, slave at 0x28; unmask IRQ4 only
    mov al, 0x11
    out 0x20, al
    out 0xA0, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x28
    out 0xA1, al
    mov al, 4
    out 0x21, al
    mov al, 2
    out 0xA1, al
    mov al, 1
    out 0x21, al
    out 0xA1, al
    mov al, 0xEF
    out 0x21, al
    mov al, 0xFF
    out 0xA1, al

    # UART: interrupt on received data
    mov dx, 0x3F9
    mov al, 1
    out dx, al
    sti
idle:
    hlt
    jmp idle

halt_forever:
    cli
    hlt
    jmp halt_forever

# eax = handler address, edi = gate address; advances edi by one gate
set_gate:
    mov word ptr [edi], ax
    mov word ptr [edi + 2], 0x08
    mov byte ptr [edi + 4], 0
    mov byte ptr [edi + 5], 0x8E
    mov ebx, eax
    shr ebx, 16
    mov word ptr [edi + 6], bx
    add edi, 8
    ret

# esi = NUL-terminated string; clobbers eax, edx, esi
print:
    lodsb
    test al, al
    jz print_done
    mov ah, al
    mov dx, 0x3FD
wait_thr:
    in al, dx
    test al, 0x20
    jz wait_thr
    mov al, ah
    mov dx, 0x3F8
    out dx, al
    jmp print
print_done:
    ret

default_isr:
    push eax
    mov al, 0x20
    out 0xA0, al
    out 0x20, al
    pop eax
    iret

serial_isr:
    pushad
next_char:
    mov dx, 0x3FD
    in al, dx
    test al, 1
    jz serial_done
    mov dx, 0x3F8
    in al, dx
    mov cl, byte ptr [prev]
    mov byte ptr [prev], al
    cmp al, 0x0D
    je answer
    cmp al, 0x0A
    jne next_char
    cmp cl, 0x0D
    je next_char
answer:
    mov esi, [msg_answer]
    call print
    jmp next_char
serial_done:
    mov al, 0x20
    out 0x20, al
    popad
    iret

.align 8
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF
    .quad 0x00CF92000000FFFF
gdt_desc:
    .word 23
    .long gdt
idt_desc:
    .word 48 * 8 - 1
    .long 0x10000

# Filled in by fwtool: addresses of the two messages, the mode, and one byte of state.
.align 4
.globl table
table:
msg_first:
    .long 0
msg_answer:
    .long 0
mode:
    .long 0
prev:
    .long 0
