//! `Envelope::access` / `Envelope::decode` on arbitrary bytes (what a peer puts in a frame).
//!
//! Properties: no panic; `access` and `decode` agree on acceptance; an accepted envelope has
//! this build's protocol version and survives encode → decode unchanged; decoding allocates at
//! most 16× the input (+4 KiB); the same bytes one byte off the alignment they were accepted at are refused, not read.
#![no_main]

use haven_fuzz::{assert_alloc_bounded, measure};
use haven_proto::{aligned_copy, Envelope, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: haven_fuzz::seeds::write_if_asked("envelope"), |data: &[u8]| {
    let aligned = aligned_copy(data);
    let (decoded, peak) = measure(|| Envelope::decode(&aligned));
    assert_alloc_bounded("Envelope::decode", peak, data.len(), 16, 4096);
    let accessed = Envelope::access(&aligned);
    assert_eq!(
        accessed.is_ok(),
        decoded.is_ok(),
        "access {:?} but decode {:?}",
        accessed.err(),
        decoded.as_ref().err()
    );

    // The same bytes one byte off the alignment they were accepted at: refused, never read.
    if accessed.is_ok() {
        let mut shifted = aligned_copy(&[0]);
        shifted.extend_from_slice(data);
        assert!(Envelope::access(&shifted[1..]).is_err(), "an unaligned archive was accepted");
    }

    if let Ok(env) = decoded {
        assert_eq!(env.version, PROTOCOL_VERSION);
        assert_eq!(accessed.unwrap().msg_id.to_native(), env.msg_id);
        let bytes = env.encode().expect("a decoded envelope encodes");
        let again = Envelope::decode(&bytes).expect("a re-encoded envelope decodes");
        assert_eq!(again, env, "encode/decode round trip changed the envelope");
    }
});
