//! Writes the seed of the `gguf` fuzz target into the corpus directory named on the command
//! line: the header of the tiny model `llmctl::tiny_model` writes (everything before its
//! tensor data), and the whole file.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::args_os().nth(1).expect("usage: gguf-seed CORPUS_DIR"));
    std::fs::create_dir_all(&dir).expect("create the corpus directory");
    let model = llmctl::tiny_model::bytes();
    let info = llmctl::gguf::inspect_bytes(&model).expect("the tiny model reads");
    let header_len = (info.file_size - info.tensor_bytes) as usize;
    std::fs::write(dir.join("tiny-header"), &model[..header_len]).expect("write the header seed");
    std::fs::write(dir.join("tiny-model"), &model).expect("write the model seed");
}
