//! Fuzzes the daemon's protocol decoder: arbitrary bytes from a client must produce
//! requests or errors, never a panic, a hang or unbounded memory.
//!
//! cargo +nightly fuzz run --fuzz-dir tests/fuzz protocol -- -max_total_time=60

#![no_main]

use std::io::BufReader;

use libfuzzer_sys::fuzz_target;
use llmctl::protocol::{self, Request, Response};

fuzz_target!(|data: &[u8]| {
    let mut reader = BufReader::new(data);
    let mut line = Vec::new();
    while let Ok(Some(request)) = protocol::read_message::<Request>(&mut reader, &mut line) {
        // Whatever decodes must encode again.
        let mut wire = Vec::new();
        protocol::write_message(&mut wire, &request).expect("a decoded request encodes");
    }
    let _ = protocol::decode::<Response>(data);
});
