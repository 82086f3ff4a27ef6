//! Feeds arbitrary bytes to every decoder of the wire protocol, and verifies whatever decodes.
//! Run: `cd protocol && cargo +nightly fuzz run decode -- -max_total_time=300`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use metainf_protocol::{Heartbeat, JobRequest, JobResult, MethodConfig, SignedRecord, codec};

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = SignedRecord::from_wire(data) {
        // Whatever decodes must re-encode, and verification must not panic.
        let again = record.to_wire();
        let _ = record.verify();
        assert!(again.is_ok(), "a decoded record must re-encode");
    }
    let _ = codec::decode::<JobRequest>(data).map(|j| j.validate());
    let _ = codec::decode::<JobResult>(data);
    let _ = codec::decode::<Heartbeat>(data).map(|h| h.validate());
    let _ = codec::decode::<Vec<SignedRecord>>(data);
    let _ = codec::decode::<MethodConfig>(data).map(|m| m.validate());
});
