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
        let mut response = self
            .retrying(|agent| {
                let mut request = agent.get(format!("{}/slots", self.base));
                if let Some(value) = &self.authorization {
                    request = request.header("Authorization", value);
                }
                request.config().timeout_global(Some(timeout)).build().call()
            })
            .map_err(|error| described(error, timeout))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(SLOTS_ANSWER_LIMIT)
            .read_to_string()
            .map_err(|error| described(error, timeout))?;
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
        // Saving or restoring the same file again is harmless, so this may be retried too.
        let mut response = self
            .retrying(|agent| {
                let mut request = agent
                    .post(format!("{}/slots/{slot}?action={action}", self.base))
                    .header("Content-Type", "application/json");
                // A child on loopback TCP wants its key on every call.
                if let Some(value) = &self.authorization {
                    request = request.header("Authorization", value);
                }
                request.config().timeout_global(Some(timeout)).build().send(&body)
            })
            .map_err(|error| described(error, timeout))?;
        let status = response.status().as_u16();
        let text =
            response.body_mut().with_config().limit(1 << 20).read_to_string().map_err(|e| described(e, timeout))?;
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

/// A failed call in words: ureq says only "timeout: global" of the deadline it was given.
fn described(error: ureq::Error, timeout: Duration) -> String {
    match error {
        ureq::Error::Timeout(_) => format!("llama-server did not answer within {} ms", timeout.as_millis()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::backend::client::Timeouts;

    /// Reads one request's head and body (by its Content-Length) from `reader`; returns
    /// its request line.
    fn read_request(reader: &mut BufReader<TcpStream>) -> String {
        let mut head = String::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                return head;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap();
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        std::io::Read::read_exact(reader, &mut body).unwrap();
        head.lines().next().unwrap_or_default().to_string()
    }

    fn answer(stream: &mut TcpStream, body: &str) {
        let head =
            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
    }

    /// A server that answers one request on its first connection, keeps it open, then
    /// closes it when the next request comes (as a server whose idle timeout fires just as
    /// the connection is taken from the pool), and answers the retry on a second one.
    /// Returns the port and the request lines each connection saw.
    fn closing_on_reuse(body: &'static str) -> (u16, std::thread::JoinHandle<Vec<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut seen = vec![Vec::new(), Vec::new()];
            let (first, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(first.try_clone().unwrap());
            let mut writer = first;
            seen[0].push(read_request(&mut reader));
            answer(&mut writer, body);
            seen[0].push(read_request(&mut reader));
            drop((reader, writer));
            let (second, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(second.try_clone().unwrap());
            let mut writer = second;
            seen[1].push(read_request(&mut reader));
            answer(&mut writer, body);
            seen
        });
        (port, server)
    }

    #[test]
    fn listing_and_saving_slots_survive_a_pooled_connection_the_child_closed() {
        let timeout = Duration::from_secs(5);
        let (port, server) = closing_on_reuse(r#"[{"id":0,"n_ctx":512,"is_processing":false}]"#);
        let client = Client::new(port, "key", Timeouts::default());
        assert!(client.slots(timeout).unwrap().contains("n_ctx"));
        assert!(client.slots(timeout).unwrap().contains("n_ctx"), "the retry on a fresh connection answers");
        let seen = server.join().unwrap();
        assert_eq!(seen, vec![vec!["GET /slots HTTP/1.1"; 2], vec!["GET /slots HTTP/1.1"]]);

        let (port, server) = closing_on_reuse(r#"{"n_saved":300,"n_written":4096,"timings":{"save_ms":2.5}}"#);
        let client = Client::new(port, "key", Timeouts::default());
        let saved = client.save_slot(0, "a.bin", timeout).unwrap();
        assert_eq!((saved.tokens, saved.bytes), (300, 4096));
        assert_eq!(client.save_slot(0, "a.bin", timeout).unwrap(), saved);
        let save = "POST /slots/0?action=save HTTP/1.1";
        assert_eq!(server.join().unwrap(), vec![vec![save; 2], vec![save]]);
    }

    #[test]
    fn a_child_that_does_not_answer_in_time_is_said_to_in_words() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = Client::new(port, "key", Timeouts::default());
        let error = client.save_slot(0, "a.bin", Duration::from_millis(200)).unwrap_err();
        assert_eq!(error, "llama-server did not answer within 200 ms");
        drop(listener);
    }
}
