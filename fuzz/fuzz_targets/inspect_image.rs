//! Image header inspection on arbitrary bytes: a header or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::image::inspect(data);
});
