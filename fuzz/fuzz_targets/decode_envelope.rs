//! Decoding arbitrary bytes as a envelope must return a value or an error, never panic or
//! allocate past the limit.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::codec::decode::<proto::envelope::Envelope>(proto::codec::Kind::Envelope, data);
});
