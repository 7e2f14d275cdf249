//! The one integration test binary: the real `llmctl` binary in isolated environments,
//! against the fake llama-server fixture and the real llama-server.

mod admission;
mod budget;
mod caches;
mod catalog;
mod chat;
mod cli;
mod core;
mod docs;
mod hardening;
mod layers;
mod observe;
mod ollama;
mod private;
mod readme;
mod real;
mod remote;
mod scheduler;
mod serve;
mod setup;
mod supervision;
mod support;
mod test_command;
mod tiny_model;
mod trust;
mod untrusted;
mod upstream;
