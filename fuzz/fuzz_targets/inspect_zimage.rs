//! ARM zImage inspection: arbitrary bytes with the zImage magic at 0x24. Accepted only
//! when the declared start/end lie inside the file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    if bytes.len() < 0x30 {
        bytes.resize(0x30, 0);
    }
    bytes[0x24..0x28].copy_from_slice(&0x016F_2818u32.to_le_bytes());
    // (Bytes that also start with an ELF header are inspected as the ELF they are.)
    let header = proto::image::inspect(&bytes, bytes.len() as u64);
    if header.is_ok_and(|h| h.format == "ARM zImage") {
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let (start, end) = (word(0x28), word(0x2c));
        assert!(end >= start && u64::from(end - start) <= bytes.len() as u64);
    }
});
