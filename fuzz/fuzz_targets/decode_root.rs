//! Decoding arbitrary bytes as a root must return a value or an error, never panic or
//! allocate past the limit.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::codec::decode::<proto::root::Root>(proto::codec::Kind::Root, data);
});
