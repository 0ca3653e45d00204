//! Decoding arbitrary bytes as a hold list must return a value or an error, never panic or
//! allocate past the limit.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::codec::decode::<proto::rollout::Holds>(proto::codec::Kind::Holds, data);
});
