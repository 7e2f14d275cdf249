//! Backends serve generations for an instance. Today one kind: a llama-server child that
//! llmctl spawns and owns ([`llama`]).

pub mod forward;
pub mod llama;
pub mod unix;
