//! Vectors for a list of texts from a model's embeddings instance, and the whole answer of
//! a request that is not streamed: for `serve`'s Ollama routes (`/api/embed`,
//! `/api/embeddings`) and for `llmctl embed` on the Unix socket, which share this path.
//!
//! The texts go to llama-server's `/v1/embeddings` through admission like every request, on
//! the instance started with `--embeddings` (an instance of its own, so a chat instance of
//! the same file is never disturbed). Nothing here decides which model; callers do.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::backend::forward::{Outgoing, Part};
use crate::backend::unix::Cancel;
use crate::daemon::admission::Waiter;
use crate::daemon::shared::Shared;
use crate::daemon::work::{self, Attempt};
use crate::error::{Error, Result};
use crate::instance::Lease;
use crate::model::ModelSpec;
use crate::protocol::Done;

/// The largest answer read whole: a batch of embeddings is large, but not unbounded.
const MAX_ANSWER: usize = 256 << 20;

/// The vectors of some texts, in their order.
pub(crate) struct Embedded {
    pub(crate) vectors: Vec<Vec<f64>>,
    pub(crate) done: Done,
    /// How long the request waited for its slot (a load included).
    pub(crate) waited: Duration,
}

/// The embeddings of `inputs` on `spec`'s embeddings instance. `normalized` asks for unit
/// vectors (llama-server's default, and Ollama's `/api/embed`); otherwise they come as the
/// model pools them (Ollama's older `/api/embeddings`).
pub(crate) fn embed(
    shared: &Shared,
    spec: &ModelSpec,
    inputs: &[String],
    normalized: bool,
    waiter: &mut dyn Waiter,
    cancel: Option<Cancel>,
) -> Result<Embedded> {
    let mut spec = spec.clone();
    spec.load.embeddings = true;
    let mut body = json!({"input": inputs, "model": spec.name, "encoding_format": "float"});
    if !normalized {
        // llama-server's `embd_normalize`: -1 leaves the pooled vector as it is.
        body["embd_normalize"] = json!(-1);
    }
    let body = body.to_string();
    let started = Instant::now();
    let mut waited = None;
    let mut answer = WholeAnswer::default();
    let done = work::on_lease(shared, &spec, waiter, |lease, _| {
        waited.get_or_insert_with(|| started.elapsed());
        answer.fetch(lease, "/v1/embeddings", body.as_bytes(), cancel.clone())
    })?;
    let value = answer.into_json(&spec.name)?;
    let mut items: Vec<(u64, Vec<f64>)> = Vec::new();
    for item in value.get("data").and_then(Value::as_array).into_iter().flatten() {
        let index = item.get("index").and_then(Value::as_u64).unwrap_or(items.len() as u64);
        let vector = item
            .get("embedding")
            .and_then(Value::as_array)
            .map(|numbers| numbers.iter().filter_map(Value::as_f64).collect())
            .ok_or_else(|| Error::Backend {
                model: spec.name.clone(),
                message: "an embedding without numbers".into(),
            })?;
        items.push((index, vector));
    }
    if items.len() != inputs.len() {
        return Err(Error::Backend {
            model: spec.name.clone(),
            message: format!("{} embeddings for {} inputs", items.len(), inputs.len()),
        });
    }
    items.sort_by_key(|(index, _)| *index);
    Ok(Embedded {
        vectors: items.into_iter().map(|(_, vector)| vector).collect(),
        done,
        waited: waited.unwrap_or_default(),
    })
}

/// The status and body of one answer read whole, for a request whose caller answers once.
#[derive(Default)]
pub(crate) struct WholeAnswer {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
    too_large: bool,
}

impl WholeAnswer {
    /// POSTs `body` to `target` on the lease's server and keeps the answer (a try before
    /// it, on another replica, is forgotten).
    pub(crate) fn fetch(&mut self, lease: &Lease, target: &str, body: &[u8], cancel: Option<Cancel>) -> Attempt {
        *self = WholeAnswer::default();
        let outgoing = Outgoing { method: "POST", target, content_type: Some("application/json"), body };
        let result = lease.client.forward(outgoing, cancel, |part| match part {
            Part::Head { status, .. } => {
                self.status = status;
                Ok(())
            }
            Part::Bytes(bytes) => {
                if self.body.len() + bytes.len() > MAX_ANSWER {
                    self.too_large = true;
                    return Err(std::io::Error::other("the answer is too large"));
                }
                self.body.extend_from_slice(bytes);
                Ok(())
            }
        });
        Attempt { result, answered: self.status != 0, ok: Attempt::ok_for_status(self.status), first_token: None }
    }

    /// The answer as JSON, or the error it carries: a 4xx is a parameter the server
    /// refused (65, HTTP 400), anything else the backend's failure.
    pub(crate) fn into_json(self, model: &str) -> Result<Value> {
        if self.too_large {
            return Err(Error::Backend {
                model: model.to_string(),
                message: format!("an answer over {MAX_ANSWER} bytes"),
            });
        }
        if self.status >= 400 {
            return Err(upstream_error(model, self.status, &self.body));
        }
        serde_json::from_slice(&self.body).map_err(|error| Error::Backend {
            model: model.to_string(),
            message: format!("an answer not JSON: {error}"),
        })
    }
}

/// The error an answer with HTTP `status` carries: llama-server's message
/// (`{"error":{"message":...}}`, or a string), as a refused parameter for a 4xx.
pub(crate) fn upstream_error(model: &str, status: u16, body: &[u8]) -> Error {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let message = value
        .pointer("/error/message")
        .or_else(|| value.get("error"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(500)]).trim().to_string());
    let message = if message.is_empty() { format!("HTTP {status}") } else { message };
    if (400..500).contains(&status) {
        Error::InvalidParameter { message: format!("{model}: {message}") }
    } else {
        Error::Backend { model: model.to_string(), message: format!("HTTP {status}: {message}") }
    }
}
