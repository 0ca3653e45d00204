//! The device's `state.json` loader on arbitrary bytes (a damaged disk): a state or an
//! error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = device::store::State::parse(data) {
        // What loads saves and loads back the same.
        let again = serde_json::to_vec(&state).unwrap();
        assert_eq!(device::store::State::parse(&again).unwrap(), state);
    }
});
