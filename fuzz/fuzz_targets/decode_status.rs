//! Status reports from arbitrary bytes (gossip and MQTT carry them from any device): the
//! payload decoder and the verifier against an enrolled key, never a panic; nothing
//! unsigned verifies.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::codec::{self, Kind};
use proto::status::{verify_status, StatusReport};
use proto::SecretKey;

fuzz_target!(|data: &[u8]| {
    let _ = codec::decode::<StatusReport>(Kind::StatusReport, data);
    let enrolled = SecretKey::from_seed([7; 32]).public();
    assert!(verify_status(data, |_| Some(enrolled)).is_err());
});
