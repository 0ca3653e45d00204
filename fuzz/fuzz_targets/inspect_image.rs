//! Image header inspection on arbitrary bytes and a claimed file size: a header or an
//! error, never a panic. The first 4 bytes say how much larger than the bytes at hand the
//! file claims to be (the prefix of a large file).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((extra, prefix)) = data.split_first_chunk::<4>() else {
        return;
    };
    let size = prefix.len() as u64 + u64::from(u32::from_le_bytes(*extra));
    let _ = proto::image::inspect(prefix, size);
});
