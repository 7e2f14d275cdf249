//! The tiny deterministic model, written by the library (`llmctl::tiny_model`); these
//! wrappers fail the test when the file cannot be written.

use std::path::Path;

pub(crate) use llmctl::tiny_model::{expected_text, WORDS};

pub(crate) fn write(path: &Path, architecture: &str) {
    llmctl::tiny_model::write(path, architecture).expect("write the tiny model");
}

pub(crate) fn write_words(path: &Path, architecture: &str, words: &[&str]) {
    llmctl::tiny_model::write_words(path, architecture, words).expect("write the tiny model");
}
