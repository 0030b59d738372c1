//! Envelope parser (the body of `POST /api/v1/messages/{topic}`): arbitrary bytes give an
//! envelope or a 4xx error, never a panic or a 5xx, and an envelope survives serialization.
#![no_main]

use dispatchd::engine::Envelope;
use dispatchd::http::parse_envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    match parse_envelope(body) {
        Err(error) => assert!(error.status().is_client_error(), "{}", error.status()),
        Ok(envelope) => {
            let json = serde_json::to_vec(&envelope).expect("an envelope serializes");
            let back: Envelope = serde_json::from_slice(&json).expect("and parses back");
            assert_eq!(back, envelope);
        }
    }
});
