//! Fuzzes the GGUF header reader: arbitrary bytes as a model file must give a model's
//! summary or a message, never a panic, an abort (a deep recursion), a hang or unbounded
//! memory. Seeded with the tiny model's header (`gguf-seed` writes it), so mutations start
//! from a real file:
//!
//! cargo run --manifest-path tests/fuzz/Cargo.toml --bin gguf-seed -- tests/fuzz/corpus/gguf
//! cargo +nightly fuzz run --fuzz-dir tests/fuzz gguf tests/fuzz/corpus/gguf -- -max_total_time=300
//!
//! Each input is read twice: as a whole file, and followed by 1 MiB of zeros standing in for
//! tensor data, which the reader never looks at; so the fuzzer mutates headers only and
//! still reaches the checks after the tensor list.

#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use llmctl::gguf;

const TENSOR_DATA: usize = 1 << 20;

thread_local! {
    static PADDED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn check(bytes: &[u8]) {
    if let Ok(info) = gguf::inspect_bytes(bytes) {
        // What the reader accepts lies within the file and is usable by every caller.
        assert!(info.tensor_bytes <= info.file_size);
        let _ = info.quantization();
        let _ = info.kv_cache_bytes(1 << 20);
        let _ = llmctl::catalog::Summary::of(&info);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    PADDED.with(|padded| {
        let mut padded = padded.borrow_mut();
        padded.clear();
        padded.extend_from_slice(data);
        padded.resize(data.len() + TENSOR_DATA, 0);
        check(&padded);
    });
});
