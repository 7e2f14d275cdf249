//! `/api/embed` and `/api/embeddings` on an embeddings instance of the model.

use super::*;

/// `POST /api/embed` (`legacy` false) and `POST /api/embeddings` (`legacy` true: one
/// `prompt`, a vector as the model pools it, as Ollama's older route answers).
pub(super) fn embed(
    shared: &Arc<Shared>,
    config: &Config,
    request: &Request,
    exchange: &mut Exchange,
    received: Instant,
    legacy: bool,
) -> Result<()> {
    let mut fields = Fields::of_body(&request.body)?;
    let name = model_of(&mut fields)?;
    let mut spec = choose(shared, config, &name, Purpose::Embed)?;
    let keep = fields.take("keep_alive").as_ref().map(keep_alive).transpose()?;
    let inputs: Vec<String> = if legacy {
        fields.string("prompt")?.filter(|prompt| !prompt.is_empty()).into_iter().collect()
    } else {
        match fields.take("input") {
            None => Vec::new(),
            Some(Value::String(text)) if text.is_empty() => Vec::new(),
            Some(Value::String(text)) => vec![text],
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(text) => Ok(text),
                    _ => Err(bad("invalid input type: `input` is a string or a list of strings")),
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("invalid input type: `input` is a string or a list of strings")),
        }
    };
    let dimensions = if legacy {
        None
    } else {
        match fields.take("dimensions") {
            None => None,
            Some(value) => Some(value.as_u64().ok_or_else(|| bad("`dimensions` must be a positive number"))? as usize),
        }
    };
    if !legacy && fields.bool("truncate")? == Some(true) {
        return Err(bad(
            "`truncate` is not supported by llmctl's Ollama API: llama-server refuses an input longer than the \
             context instead of cutting it",
        ));
    }
    if let Some(options) = fields.take("options") {
        apply_options(options, &mut Map::new(), &mut spec, Purpose::Embed)?;
    }
    fields.finish()?;
    let name = if name.is_empty() { spec.name.clone() } else { name };
    let Ok(client_socket) = exchange.stream().try_clone() else {
        return Err(Error::internal("cannot watch the connection"));
    };
    let mut waiter = HttpWaiter(&client_socket);
    if inputs.is_empty() {
        // An empty request loads the model, as Ollama does.
        work::load(shared, &spec, &mut waiter)?;
        apply_keep_alive(shared, &spec, keep);
        let answer = if legacy { json!({"embedding": []}) } else { json!({"model": name, "embeddings": []}) };
        answer_json(exchange, false, &answer);
        return Ok(());
    }
    let watched = client_socket.try_clone().ok();
    let cancel: Cancel = Arc::new(move || watched.as_ref().is_none_or(crate::sys::peer_closed));
    let embedded = embeddings::embed(shared, &spec, &inputs, !legacy, &mut waiter, Some(cancel))?;
    let answer = if legacy {
        json!({"embedding": embedded.vectors.into_iter().next().unwrap_or_default()})
    } else {
        let vectors: Vec<Vec<f64>> = embedded
            .vectors
            .into_iter()
            .map(|vector| match dimensions {
                // Ollama cuts a vector to the dimensions asked for, and normalizes it again.
                Some(n) if n > 0 && n < vector.len() => normalize(vector[..n].to_vec()),
                _ => vector,
            })
            .collect();
        json!({"model": name, "embeddings": vectors,
            "total_duration": received.elapsed().as_nanos() as u64,
            "load_duration": embedded.waited.as_nanos() as u64,
            "prompt_eval_count": embedded.done.usage.prompt_tokens})
    };
    answer_json(exchange, false, &answer);
    apply_keep_alive(shared, &spec, keep);
    Ok(())
}

pub(super) fn normalize(mut vector: Vec<f64>) -> Vec<f64> {
    let norm = vector.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    vector.iter_mut().for_each(|x| *x /= norm);
    vector
}
