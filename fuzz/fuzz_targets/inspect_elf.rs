//! ELF inspection (program and section headers, PVH notes, multiboot inside an ELF) on
//! arbitrary bytes after the ELF magic: a header or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bytes = b"\x7fELF".to_vec();
    bytes.extend_from_slice(data);
    if let Ok(h) = proto::image::inspect(&bytes, bytes.len() as u64) {
        assert!(!h.platforms.is_empty());
    }
});
