//! Writes tiny GGUF models whose greedy output is known exactly: for the test suite's
//! exact-output tests, and for `setup`'s smoke test of a llama-server it built (a build that
//! crashes on this CPU is never installed).
//!
//! The model is a llama with 2 layers and n_embd 64 whose attention and feed-forward
//! weights are zero, so the residual stream is just the current token's embedding and the
//! next token depends on the current one only. Embeddings are one-hot: every token outside
//! the fixed text maps to direction 0, the i-th word of the text to direction i+1. The
//! output row of word i points at direction i, and the end-of-sequence row at the direction
//! of the last word. Whatever the prompt, the model writes the text word by word and then
//! stops with EOS. The vocabulary is SentencePiece-style: `<unk>`, `<s>`, `</s>`, the 256
//! byte tokens, then the words.

use std::io::Write;
use std::path::Path;

const N_EMBD: usize = 64;
const N_FF: usize = 128;
const N_LAYER: usize = 2;
const N_HEAD: u32 = 4;
const ALIGNMENT: usize = 32;
/// The logit margin of the intended token (after RMS norm the hidden value is 8).
const SCALE: f32 = 4.0;

/// The words of the text, as SentencePiece pieces (`▁` is a space).
pub const WORDS: &[&str] = &["▁Pipes", "▁carry", "▁bytes", "▁between", "▁small", "▁programs", "."];

/// The text the tiny model writes, as llama-server detokenizes it.
pub fn expected_text() -> String {
    WORDS.concat().replace('▁', " ")
}

enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    F32Array(Vec<f32>),
    I32Array(Vec<i32>),
}

struct Writer {
    out: Vec<u8>,
}

impl Writer {
    fn u32(&mut self, v: u32) {
        self.out.extend(v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.out.extend(v.to_le_bytes());
    }
    fn string(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.out.extend(s.as_bytes());
    }
    fn value(&mut self, value: &Value) {
        match value {
            Value::U32(v) => {
                self.u32(4);
                self.u32(*v);
            }
            Value::F32(v) => {
                self.u32(6);
                self.out.extend(v.to_le_bytes());
            }
            Value::Bool(v) => {
                self.u32(7);
                self.out.push(u8::from(*v));
            }
            Value::Str(s) => {
                self.u32(8);
                self.string(s);
            }
            Value::StrArray(items) => {
                self.u32(9);
                self.u32(8);
                self.u64(items.len() as u64);
                for item in items {
                    self.string(item);
                }
            }
            Value::F32Array(items) => {
                self.u32(9);
                self.u32(6);
                self.u64(items.len() as u64);
                for item in items {
                    self.out.extend(item.to_le_bytes());
                }
            }
            Value::I32Array(items) => {
                self.u32(9);
                self.u32(5);
                self.u64(items.len() as u64);
                for item in items {
                    self.out.extend(item.to_le_bytes());
                }
            }
        }
    }
}

struct Tensor {
    name: String,
    dims: Vec<usize>,
    data: Vec<f32>,
    /// All zero, stored as Q4_1 (blocks of 32 values in 20 bytes: two f16 and 16 nibbles,
    /// all zero) rather than as `data`.
    zero_q4_1: bool,
}

/// GGML type ids.
const GGML_F32: u32 = 0;
const GGML_Q4_1: u32 = 3;

fn tensor(name: &str, dims: &[usize], fill: f32) -> Tensor {
    Tensor { name: name.to_string(), dims: dims.to_vec(), data: vec![fill; dims.iter().product()], zero_q4_1: false }
}

fn zero_q4_1(name: &str, dims: &[usize]) -> Tensor {
    Tensor { name: name.to_string(), dims: dims.to_vec(), data: Vec::new(), zero_q4_1: true }
}

impl Tensor {
    fn bytes(&self) -> usize {
        if self.zero_q4_1 {
            self.dims.iter().product::<usize>() / 32 * 20
        } else {
            self.data.len() * 4
        }
    }
}

/// Writes the tiny model to `path`; `architecture` other than "llama" makes a file that
/// is valid GGUF but that llama-server refuses.
pub fn write(path: &Path, architecture: &str) -> std::io::Result<()> {
    write_words(path, architecture, WORDS)
}

/// Writes a tiny model that writes `words` (SentencePiece pieces, at most 60).
pub fn write_words(path: &Path, architecture: &str, words: &[&str]) -> std::io::Result<()> {
    write_model(path, architecture, words, false)
}

/// Writes the tiny model with its attention and feed-forward matrices in Q4_1, a quantized
/// type real models use, so loading it runs the CPU's quantized kernels: `setup`'s check
/// that a build works on this machine.
pub fn write_quantized(path: &Path) -> std::io::Result<()> {
    write_model(path, "llama", WORDS, true)
}

/// The bytes of the tiny model, as [`write`] writes them: the fuzz target's seed and the
/// header the GGUF reader's mutation test starts from.
pub fn bytes() -> Vec<u8> {
    model_bytes("llama", WORDS, false)
}

/// Writes the tiny model with these string keys set (replacing its own of the same name,
/// such as `general.name`): for tests of what llmctl shows of a header.
pub fn write_with_strings(path: &Path, strings: &[(&str, &str)]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(&model_bytes_with("llama", WORDS, false, strings))
}

fn write_model(path: &Path, architecture: &str, words: &[&str], quantized: bool) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(&model_bytes(architecture, words, quantized))
}

fn model_bytes(architecture: &str, words: &[&str], quantized: bool) -> Vec<u8> {
    model_bytes_with(architecture, words, quantized, &[])
}

fn model_bytes_with(architecture: &str, words: &[&str], quantized: bool, strings: &[(&str, &str)]) -> Vec<u8> {
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    let mut types = vec![2, 3, 3];
    for byte in 0..=255u8 {
        tokens.push(format!("<0x{byte:02X}>"));
        types.push(6);
    }
    let first_word = tokens.len();
    for word in words {
        tokens.push(word.to_string());
        types.push(1);
    }
    let n_vocab = tokens.len();
    let scores: Vec<f32> = (0..n_vocab).map(|i| if i >= first_word { 0.0 } else { -1000.0 }).collect();

    let mut embeddings = tensor("token_embd.weight", &[N_EMBD, n_vocab], 0.0);
    let mut output = tensor("output.weight", &[N_EMBD, n_vocab], 0.0);
    for token in 0..n_vocab {
        let direction = if token >= first_word { token - first_word + 1 } else { 0 };
        embeddings.data[token * N_EMBD + direction] = 1.0;
    }
    for (i, _) in words.iter().enumerate() {
        output.data[(first_word + i) * N_EMBD + i] = SCALE;
    }
    output.data[2 * N_EMBD + words.len()] = SCALE; // </s> after the last word

    let mut tensors = vec![embeddings, tensor("output_norm.weight", &[N_EMBD], 1.0), output];
    for layer in 0..N_LAYER {
        let name = |suffix: &str| format!("blk.{layer}.{suffix}");
        tensors.push(tensor(&name("attn_norm.weight"), &[N_EMBD], 1.0));
        let zero = |tensor_name: &str, dims: &[usize]| {
            if quantized {
                zero_q4_1(&name(tensor_name), dims)
            } else {
                tensor(&name(tensor_name), dims, 0.0)
            }
        };
        for projection in ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"] {
            tensors.push(zero(projection, &[N_EMBD, N_EMBD]));
        }
        tensors.push(tensor(&name("ffn_norm.weight"), &[N_EMBD], 1.0));
        tensors.push(zero("ffn_gate.weight", &[N_EMBD, N_FF]));
        tensors.push(zero("ffn_up.weight", &[N_EMBD, N_FF]));
        tensors.push(zero("ffn_down.weight", &[N_FF, N_EMBD]));
    }

    let arch = architecture.to_string();
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch.clone())),
        ("general.name".into(), Value::Str("llmctl-tiny".into())),
        (format!("{arch}.context_length"), Value::U32(2048)),
        (format!("{arch}.embedding_length"), Value::U32(N_EMBD as u32)),
        (format!("{arch}.block_count"), Value::U32(N_LAYER as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(N_FF as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(N_HEAD)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(N_HEAD)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (format!("{arch}.rope.dimension_count"), Value::U32(N_EMBD as u32 / N_HEAD)),
        ("tokenizer.ggml.model".into(), Value::Str("llama".into())),
        ("tokenizer.ggml.tokens".into(), Value::StrArray(tokens)),
        ("tokenizer.ggml.scores".into(), Value::F32Array(scores)),
        ("tokenizer.ggml.token_type".into(), Value::I32Array(types)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
    ];
    for (key, text) in strings {
        metadata.retain(|(own, _)| own != key);
        metadata.push((key.to_string(), Value::Str(text.to_string())));
    }

    let mut w = Writer { out: Vec::new() };
    w.out.extend(b"GGUF");
    w.u32(3);
    w.u64(tensors.len() as u64);
    w.u64(metadata.len() as u64);
    for (key, value) in &metadata {
        w.string(key);
        w.value(value);
    }
    let mut offset = 0usize;
    for tensor in &tensors {
        w.string(&tensor.name);
        w.u32(tensor.dims.len() as u32);
        for dim in &tensor.dims {
            w.u64(*dim as u64);
        }
        w.u32(if tensor.zero_q4_1 { GGML_Q4_1 } else { GGML_F32 });
        w.u64(offset as u64);
        offset += tensor.bytes().div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    while !w.out.len().is_multiple_of(ALIGNMENT) {
        w.out.push(0);
    }
    for tensor in &tensors {
        if tensor.zero_q4_1 {
            w.out.extend(std::iter::repeat_n(0u8, tensor.bytes()));
        }
        for value in &tensor.data {
            w.out.extend(value.to_le_bytes());
        }
        while !w.out.len().is_multiple_of(ALIGNMENT) {
            w.out.push(0);
        }
    }
    w.out
}
