//! virtio-drivers' view of memory: memory is identity-mapped on both architectures
//! (physical address = virtual address) and DMA-coherent under QEMU/KVM, so DMA buffers come
//! from the heap and sharing a buffer is handing out its address.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, PhysAddr, PAGE_SIZE};

#[derive(Debug)]
pub struct Hal;

fn pages_layout(pages: usize) -> Layout {
    Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("DMA layout")
}

// SAFETY: `dma_alloc` returns zeroed, page-aligned heap memory that nothing else aliases
// until `dma_dealloc`; the identity mapping makes the physical addresses exact.
unsafe impl virtio_drivers::Hal for Hal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: the layout has a non-zero size (virtio asks for at least one page).
        let ptr = unsafe { alloc_zeroed(pages_layout(pages.max(1))) };
        let ptr = NonNull::new(ptr).expect("out of memory for virtio DMA");
        (ptr.as_ptr() as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: the caller passes back what `dma_alloc` returned for the same page count.
        unsafe { dealloc(vaddr.as_ptr(), pages_layout(pages.max(1))) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as usize as *mut u8).expect("BAR at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
