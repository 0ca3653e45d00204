//! The `/unifleet/blob/1` messages from arbitrary bytes (what any peer may send): a value
//! or an error, never a panic; what decodes survives an encode/decode round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::blob::{BlobRequest, BlobResponse};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = BlobRequest::decode(data) {
        assert_eq!(BlobRequest::decode(&req.encode().unwrap()).unwrap(), req);
    }
    if let Ok(resp) = BlobResponse::decode(data) {
        assert_eq!(BlobResponse::decode(&resp.encode().unwrap()).unwrap(), resp);
    }
});
