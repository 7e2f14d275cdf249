//! What Ollama's clients ask about models: `/api/tags`, `/api/ps`, `/api/show`, and
//! `/api/pull` and `/api/delete` on llmctl's library.

use super::*;

/// `POST /api/pull`: `llmctl pull` of an `OWNER/REPO[:QUANT]` name, its progress as
/// Ollama's status lines (or only the last, with `"stream": false`).
pub(super) fn pull(shared: &Arc<Shared>, request: &Request, exchange: &mut Exchange) -> Result<()> {
    let mut fields = Fields::of_body(&request.body)?;
    let name = model_of(&mut fields)?;
    let stream = fields.bool("stream")?.unwrap_or(true);
    // Ollama ignores these too: a Hub download is always over https, with HF_TOKEN.
    for ignored in ["insecure", "username", "password"] {
        fields.take(ignored);
    }
    fields.finish()?;
    let wanted = crate::library::RepoName::parse(name.strip_suffix(":latest").unwrap_or(&name)).map_err(|reason| {
        bad(format!("{reason}; llmctl pulls GGUF models from the Hugging Face Hub by OWNER/REPO[:QUANT]"))
    })?;
    let hub = crate::hub::Hub::from_env();
    // The listing first: a name the Hub does not have is a 404, not a line in a stream.
    let plan = hub.plan(wanted)?;
    let mut progress = PullProgress { exchange, stream, last: None, started: false };
    progress.line(json!({"status": "pulling manifest"}))?;
    let pulled = hub.pull(&shared.paths, &plan, &mut |file, have| progress.file(file, have));
    match pulled {
        Ok(_) => {
            progress.line(json!({"status": "verifying sha256 digest"}))?;
            progress.line(json!({"status": "writing manifest"}))?;
            progress.line(json!({"status": "success"}))?;
            if progress.stream {
                progress.exchange.finish();
            } else {
                answer_json(progress.exchange, false, &json!({"status": "success"}));
            }
            Ok(())
        }
        Err(Error::Interrupted) => {
            progress.exchange.abort();
            Ok(())
        }
        Err(error) if progress.started => {
            let _ = progress.exchange.write(&error_line(&error.to_string()));
            progress.exchange.finish();
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// The progress lines of one pull, at most five a second for each file.
pub(super) struct PullProgress<'a, 'b> {
    pub(super) exchange: &'a mut Exchange<'b>,
    pub(super) stream: bool,
    /// When the last line about a file was sent, and which file.
    pub(super) last: Option<(Instant, String)>,
    pub(super) started: bool,
}

impl PullProgress<'_, '_> {
    pub(super) fn line(&mut self, value: Value) -> Result<()> {
        if !self.stream {
            // Only the end is answered; the connection is still watched.
            return if self.exchange.client_gone() { Err(Error::Interrupted) } else { Ok(()) };
        }
        if !self.started {
            let headers = [("Content-Type".to_string(), "application/x-ndjson".to_string())];
            self.exchange.start(200, &headers, None).map_err(|_| Error::Interrupted)?;
            self.started = true;
        }
        let mut line = Vec::new();
        push_line(&mut line, &value);
        self.exchange.write(&line).map_err(|_| Error::Interrupted)
    }

    pub(super) fn file(&mut self, file: &crate::hub::RemoteFile, have: u64) -> std::io::Result<()> {
        let complete = file.size == Some(have);
        let due = match &self.last {
            Some((at, name)) => name != &file.name || at.elapsed() >= Duration::from_millis(200) || complete,
            None => true,
        };
        if !due {
            return Ok(());
        }
        self.last = Some((Instant::now(), file.name.clone()));
        let mut line = json!({"status": format!("pulling {}", file.name), "completed": have});
        if let Some(total) = file.size {
            line["total"] = json!(total);
        }
        if let Some(digest) = &file.sha256 {
            line["digest"] = json!(format!("sha256:{digest}"));
        }
        self.line(line).map_err(|_| std::io::Error::other("the client of the pull went away"))
    }
}

/// `DELETE /api/delete`: removes a model `llmctl pull` downloaded, after stopping its
/// instances; anything else is refused, as `llmctl rm` refuses it.
pub(super) fn delete(shared: &Arc<Shared>, config: &Config, request: &Request, exchange: &mut Exchange) -> Result<()> {
    let mut fields = Fields::of_body(&request.body)?;
    let name = model_of(&mut fields)?;
    fields.finish()?;
    let pulled = crate::library::find(&shared.paths, &name)
        .or_else(|| name.strip_suffix(":latest").and_then(|bare| crate::library::find(&shared.paths, bare)));
    let Some(pulled) = pulled else {
        if models::knows(shared, config, &name) {
            let spec = models::choose(shared, config, Some(&name), Purpose::Generate)?;
            let path = spec.remote.is_none().then_some(spec.path);
            return Err(Error::NotPulled { name, path });
        }
        return Err(Error::UnknownModel { name });
    };
    let path = pulled.path().canonicalize().unwrap_or_else(|_| pulled.path());
    let instances: Vec<_> =
        shared.table.all().into_iter().filter(|instance| instance.with_view(|view| view.spec.path == path)).collect();
    crate::daemon::handlers::control::unload_and_wait(shared, &instances, Unload::Stop, |model| {
        format!("{model} was deleted through /api/delete")
    });
    crate::library::remove(&shared.paths, &pulled)
        .map_err(|e| Error::io(format!("cannot remove {} from {}", pulled.name(), pulled.dir.display()), e))?;
    exchange.respond(200, "application/json; charset=utf-8", b"", &[]);
    Ok(())
}

/// What `/api/tags`, `/api/ps` and `/api/show` say of a model file.
pub(super) struct Described {
    pub(super) info: Option<Arc<crate::gguf::ModelInfo>>,
    pub(super) size: u64,
    pub(super) modified: SystemTime,
    pub(super) digest: String,
}

pub(super) fn describe(shared: &Shared, spec: &ModelSpec) -> Described {
    if spec.remote.is_some() {
        return Described { info: None, size: 0, modified: UNIX_EPOCH, digest: digest_of(&spec.name) };
    }
    let metadata = std::fs::metadata(&spec.path).ok();
    let modified = metadata.as_ref().and_then(|m| m.modified().ok()).unwrap_or(UNIX_EPOCH);
    let size = metadata.as_ref().map(|m| m.len()).unwrap_or(0);
    // An identity of the file's version (path, size, time), not a hash of its bytes: a
    // digest of gigabytes for every listing would take seconds.
    let digest = digest_of(&format!("{}\0{size}\0{:?}", spec.path.display(), modified));
    Described { info: shared.model_info(&spec.path), size, modified, digest }
}

pub(super) fn digest_of(text: &str) -> String {
    let mut hasher = crate::sha256::Sha256::new();
    hasher.update(text.as_bytes());
    hasher.hex()
}

/// Ollama's `details` of a model.
pub(super) fn details(described: &Described) -> Value {
    match &described.info {
        Some(info) => json!({"parent_model": "", "format": "gguf", "family": info.architecture,
            "families": [info.architecture],
            "parameter_size": crate::catalog::human_count(info.details.parameter_count),
            "quantization_level": info.quantization()}),
        None => json!({"parent_model": "", "format": "", "family": "", "families": [], "parameter_size": "",
            "quantization_level": ""}),
    }
}

/// `GET /api/tags`: every model a client can name (not the `answers_to` patterns).
pub(super) fn tags(shared: &Shared, config: &Config) -> Value {
    let models: Vec<Value> = models::known_models(shared, config)
        .iter()
        .map(|spec| {
            let described = describe(shared, spec);
            json!({"name": spec.name, "model": spec.name, "modified_at": rfc3339(described.modified),
                "size": described.size, "digest": described.digest, "details": details(&described)})
        })
        .collect();
    json!({"models": models})
}

/// `GET /api/ps`: the instances loaded now, with their memory and when they unload.
pub(super) fn ps(shared: &Shared, config: &Config) -> Value {
    let report = crate::daemon::report::report(shared);
    let default_ttl = shared.live.read().default_ttl;
    let models: Vec<Value> = report
        .instances
        .iter()
        .filter(|instance| instance.state.is_loaded() || instance.state == crate::protocol::InstanceState::Starting)
        .map(|instance| {
            let spec = models::known_models(shared, config).into_iter().find(|spec| spec.name == instance.name);
            let described = spec.as_ref().map(|spec| describe(shared, spec));
            let context = instance
                .ctx_size
                .map(u64::from)
                .or_else(|| described.as_ref().and_then(|d| d.info.as_ref()).and_then(|info| info.context_length));
            let expires = expires_at(instance, default_ttl);
            json!({"name": instance.name, "model": instance.name,
                "size": instance.rss_bytes.unwrap_or(instance.estimate_bytes),
                "size_vram": instance.vram_bytes.unwrap_or(0),
                "digest": described.as_ref().map(|d| d.digest.clone()).unwrap_or_default(),
                "details": described.as_ref().map(details).unwrap_or_else(|| json!({})),
                "expires_at": rfc3339(expires), "context_length": context.unwrap_or(0)})
        })
        .collect();
    json!({"models": models})
}

/// When an instance unloads if nothing uses it: its pin's end, else its last use plus its
/// TTL; a model kept for good says ten years ahead.
pub(super) fn expires_at(instance: &crate::protocol::InstanceStatus, default_ttl: crate::config::Ttl) -> SystemTime {
    let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    let forever = SystemTime::now() + Duration::from_secs(crate::config::MAX_SECONDS);
    let pinned_until = instance.pinned_until_ms.map(at).filter(|until| *until > SystemTime::now());
    if instance.pinned && pinned_until.is_none() {
        return forever;
    }
    let ttl = instance.ttl_s.map(crate::config::Ttl::Seconds).unwrap_or(default_ttl);
    let by_ttl = match ttl {
        crate::config::Ttl::Seconds(seconds) => {
            instance.last_used_ms.map(at).unwrap_or_else(SystemTime::now) + Duration::from_secs(seconds)
        }
        crate::config::Ttl::Never => forever,
    };
    match pinned_until {
        Some(until) => until.max(by_ttl),
        None => by_ttl,
    }
}

/// `POST /api/show`: a model's details from its GGUF header, its chat template and what
/// it can do.
pub(super) fn show(shared: &Shared, config: &Config, request: &Request) -> Result<Value> {
    let mut fields = Fields::of_body(&request.body)?;
    let name = model_of(&mut fields)?;
    if name.is_empty() {
        return Err(bad("model is required"));
    }
    // `verbose` asks for every header key and the tensors; llmctl shows the same either way.
    fields.take("verbose");
    fields.refuse_set("system", "llmctl keeps no system message with a model")?;
    fields.refuse_set("template", "llama-server applies the model's chat template")?;
    fields.refuse_set("options", "llmctl keeps no parameters with a model")?;
    fields.finish()?;
    let spec = choose(shared, config, &name, Purpose::Generate)?;
    let described = describe(shared, &spec);
    let template = chat_template(&spec, described.info.as_deref());
    let mut model_info = Map::new();
    let mut parameters = String::new();
    let mut capabilities = Vec::new();
    if let Some(info) = &described.info {
        let arch = &info.architecture;
        let mut put = |key: String, value: Option<Value>| {
            if let Some(value) = value {
                model_info.insert(key, value);
            }
        };
        put("general.architecture".into(), Some(json!(arch)));
        put("general.name".into(), info.name.clone().map(Value::from));
        put("general.parameter_count".into(), Some(json!(info.details.parameter_count)));
        put("general.file_type".into(), info.details.file_type.map(Value::from));
        put("general.license".into(), info.details.license.clone().map(Value::from));
        put(format!("{arch}.context_length"), info.context_length.map(Value::from));
        put(format!("{arch}.embedding_length"), info.embedding_length.map(Value::from));
        put(format!("{arch}.block_count"), info.block_count.map(Value::from));
        put(format!("{arch}.attention.head_count"), info.head_count.map(Value::from));
        put(format!("{arch}.attention.head_count_kv"), info.head_count_kv.map(Value::from));
        if spec.load.embeddings || info.pooling_type.is_some() {
            capabilities.push("embedding");
        }
    }
    if !capabilities.contains(&"embedding") {
        capabilities.push("completion");
        // What the template renders is what the model can be asked for (Ollama reads its
        // capabilities from the template too).
        let template = template.as_deref().unwrap_or("");
        if template.contains("tools") {
            capabilities.push("tools");
        }
        if template.contains("<think>") || template.contains("enable_thinking") || template.contains("reasoning") {
            capabilities.push("thinking");
        }
    }
    if let Some(context) = context_with(&spec, || described.info.as_ref().and_then(|info| info.context_length)) {
        parameters = format!("{:<30} {context}", "num_ctx");
    }
    let modelfile = match &spec.remote {
        Some(remote) => format!("# {} is served by {}\n", spec.name, remote.urls.join(", ")),
        None => format!("# llmctl runs {} from its GGUF file\nFROM {}\n", spec.name, spec.path.display()),
    };
    Ok(json!({
        "license": described.info.as_ref().and_then(|info| info.details.license.clone()).unwrap_or_default(),
        "modelfile": modelfile,
        "parameters": parameters,
        "template": template.unwrap_or_default(),
        "details": details(&described),
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": rfc3339(described.modified),
    }))
}

/// The chat template llama-server uses: the file of `--chat-template-file` in the model's
/// args, else the one in the GGUF header.
pub(super) fn chat_template(spec: &ModelSpec, info: Option<&crate::gguf::ModelInfo>) -> Option<String> {
    let args = &spec.load.extra_args;
    let file = args.iter().position(|arg| arg == "--chat-template-file").and_then(|i| args.get(i + 1));
    if let Some(file) = file {
        let mut text = String::new();
        let read = std::fs::File::open(file)
            .and_then(|file| std::io::Read::read_to_string(&mut std::io::Read::take(file, 1 << 20), &mut text));
        if read.is_ok() {
            return Some(text);
        }
    }
    info.and_then(|info| info.details.chat_template.clone())
}

/// `time` as RFC 3339 in UTC with nanoseconds, as Ollama writes `created_at`.
pub(super) fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm, proleptic Gregorian calendar).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        since.subsec_nanos()
    )
}
