//! llama-server's slot API, for the prompt caches kept across unloads: `GET /slots` (what
//! each slot holds), `POST /slots/ID?action=save` and `?action=restore` with a file name in
//! the child's `--slot-save-path` directory. Every call has a deadline of its own, given
//! by the caller, so a child that does not answer never holds up a stop for longer.
//!
//! This module only talks HTTP; which slots to save and which files to trust is
//! `instance::cache`'s and `instance::cache_store`'s.

use std::time::Duration;

use serde_json::{json, Value};

use super::client::{error_message, Client};

/// The largest answer read from `GET /slots` (it quotes every slot's prompt).
const SLOTS_ANSWER_LIMIT: u64 = 64 << 20;

/// What llama-server answered to a save or a restore.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SlotFile {
    /// Tokens written or read back (`n_saved`, `n_restored`).
    pub(crate) tokens: u64,
    /// Bytes of the file (`n_written`, `n_read`).
    pub(crate) bytes: u64,
    /// How long llama-server took, by its own clock.
    pub(crate) ms: f64,
}

impl Client {
    /// The body of `GET /slots`, within `timeout`.
    pub(crate) fn slots(&self, timeout: Duration) -> Result<String, String> {
        let mut request = self.agent.get(format!("{}/slots", self.base));
        if let Some(value) = &self.authorization {
            request = request.header("Authorization", value);
        }
        let mut response =
            request.config().timeout_global(Some(timeout)).build().call().map_err(|error| error.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(SLOTS_ANSWER_LIMIT)
            .read_to_string()
            .map_err(|error| error.to_string())?;
        if status != 200 {
            return Err(error_message(&body).unwrap_or_else(|| format!("HTTP {status}")));
        }
        Ok(body)
    }

    /// Asks the child to write slot `slot`'s cache to `file_name` in its save directory.
    pub(crate) fn save_slot(&self, slot: u32, file_name: &str, timeout: Duration) -> Result<SlotFile, String> {
        self.slot_action(slot, "save", file_name, timeout, ("n_saved", "n_written", "save_ms"))
    }

    /// Asks the child to read slot `slot`'s cache back from `file_name`.
    pub(crate) fn restore_slot(&self, slot: u32, file_name: &str, timeout: Duration) -> Result<SlotFile, String> {
        self.slot_action(slot, "restore", file_name, timeout, ("n_restored", "n_read", "restore_ms"))
    }

    fn slot_action(
        &self,
        slot: u32,
        action: &str,
        file_name: &str,
        timeout: Duration,
        (tokens_field, bytes_field, ms_field): (&str, &str, &str),
    ) -> Result<SlotFile, String> {
        let body = json!({ "filename": file_name }).to_string();
        let mut request = self
            .agent
            .post(format!("{}/slots/{slot}?action={action}", self.base))
            .header("Content-Type", "application/json");
        // A child on loopback TCP wants its key on every call.
        if let Some(value) = &self.authorization {
            request = request.header("Authorization", value);
        }
        let mut response =
            request.config().timeout_global(Some(timeout)).build().send(&body).map_err(|error| error.to_string())?;
        let status = response.status().as_u16();
        let text = response.body_mut().with_config().limit(1 << 20).read_to_string().map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(error_message(&text).unwrap_or_else(|| format!("HTTP {status}")));
        }
        let value: Value = serde_json::from_str(&text).map_err(|e| format!("an answer that is not JSON: {e}"))?;
        let number = |field: &str| value.get(field).and_then(Value::as_u64);
        Ok(SlotFile {
            tokens: number(tokens_field).ok_or_else(|| format!("an answer without {tokens_field}"))?,
            bytes: number(bytes_field).unwrap_or(0),
            ms: value.pointer(&format!("/timings/{ms_field}")).and_then(Value::as_f64).unwrap_or(0.0),
        })
    }
}
