//! What a model is expected to need before it runs, from its GGUF header: weights, KV cache
//! for its context, and the process itself; and how that splits between RAM and GPU memory.
//! Used by the daemon's budget and by `llmctl show`.

use crate::budget::Need;
use crate::gguf::ModelInfo;
use crate::memory;
use crate::model::ModelSpec;

/// Fixed cost of one llama-server process beyond weights and KV cache (measured: a tiny
/// model's child is about 40 MiB resident on CPU).
const PROCESS_OVERHEAD_BYTES: u64 = 48 << 20;

/// Bytes an instance is expected to use before it runs: weights, KV cache, process.
pub(crate) fn bytes(spec: &ModelSpec, info: &ModelInfo) -> u64 {
    if spec.remote.is_some() {
        return 0;
    }
    let n_ctx = spec.load.ctx_size.map(u64::from).or(info.context_length).unwrap_or(4096);
    info.tensor_bytes.saturating_add(info.kv_cache_bytes(n_ctx)).saturating_add(PROCESS_OVERHEAD_BYTES)
}

/// What an instance needs from the budget: RAM and, with GPU layers on a machine with a GPU,
/// GPU memory (the offloaded share of weights and KV cache plus a CUDA context). The CUDA
/// runtime also takes host memory of its own, counted in RAM.
pub(crate) fn need(spec: &ModelSpec, info: &ModelInfo, gpu_present: bool) -> Need {
    let total = bytes(spec, info);
    if total == 0 {
        return Need { ram: 0, vram: 0 };
    }
    let layers = info.block_count.unwrap_or(1).max(1);
    let offloaded = match (gpu_present, spec.load.gpu_layers) {
        (true, Some(n)) if n > 0 => (u64::from(n).min(layers + 1) as f64 / (layers + 1) as f64).min(1.0),
        _ => return Need { ram: total, vram: 0 },
    };
    let model_bytes = total - PROCESS_OVERHEAD_BYTES;
    let on_gpu = (model_bytes as f64 * offloaded) as u64;
    Need {
        ram: (total - on_gpu).saturating_add(memory::CUDA_HOST_BYTES),
        vram: on_gpu.saturating_add(memory::CUDA_CONTEXT_BYTES),
    }
}
