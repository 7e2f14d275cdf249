//! The one reader of server-sent events (and of any line-delimited answer): bytes in, lines
//! out, with a cap on a line's length so that no server, however broken or hostile, can make
//! llmctl hold an endless line. `generate` reads tokens with it; `forward` reads the counts
//! out of an answer it passes on unchanged.
//!
//! A line that lies whole in the bytes just read is handed out as a slice of them, without a
//! copy; only a line split across reads is gathered.

use std::ops::ControlFlow;

/// Lines of at most this many bytes are read; a longer one is [`Line::TooLong`]. Far above
/// any SSE event llama-server writes (a chunk with logprobs is a few KiB; a whole
/// non-streamed answer of 32k tokens with logprobs stays under a few MiB).
pub(crate) const MAX_LINE: usize = 8 << 20;

/// One line, without its `\n` (and `\r`).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line<'a> {
    Complete(&'a [u8]),
    /// A line over the cap, reported once; its bytes were dropped as they came.
    TooLong,
}

/// Splits bytes into lines as they arrive.
#[derive(Debug)]
pub(crate) struct Lines {
    /// The start of a line split across reads.
    partial: Vec<u8>,
    max: usize,
    /// The current line passed the cap: its bytes are dropped up to its end.
    overflowed: bool,
    /// `partial` was handed out by [`Lines::finish`]: it is cleared on the next call.
    handed_out: bool,
}

impl Default for Lines {
    fn default() -> Lines {
        Lines::with_max(MAX_LINE)
    }
}

impl Lines {
    pub(crate) fn with_max(max: usize) -> Lines {
        Lines { partial: Vec::new(), max, overflowed: false, handed_out: false }
    }

    /// Hands each complete line in `chunk` to `on_line`, with the bytes that follow it in
    /// `chunk`; the start of a line that continues in the next read is kept. Stops early
    /// when `on_line` breaks.
    pub(crate) fn feed<B>(
        &mut self,
        mut chunk: &[u8],
        mut on_line: impl FnMut(Line<'_>, &[u8]) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        if std::mem::take(&mut self.handed_out) {
            self.partial.clear();
        }
        while let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            let (head, rest) = (&chunk[..end], &chunk[end + 1..]);
            chunk = rest;
            let flow = if self.overflowed {
                self.overflowed = false;
                self.partial.clear();
                on_line(Line::TooLong, rest)
            } else if self.partial.is_empty() {
                if head.len() > self.max {
                    on_line(Line::TooLong, rest)
                } else {
                    on_line(Line::Complete(trim_cr(head)), rest)
                }
            } else if self.partial.len() + head.len() > self.max {
                self.partial.clear();
                on_line(Line::TooLong, rest)
            } else {
                self.partial.extend_from_slice(head);
                let flow = on_line(Line::Complete(trim_cr(&self.partial)), rest);
                self.partial.clear();
                flow
            };
            if let ControlFlow::Break(value) = flow {
                // What follows is not read: the caller stops here.
                return ControlFlow::Break(value);
            }
        }
        self.keep(chunk);
        ControlFlow::Continue(())
    }

    /// Keeps the start of a line that continues in the next read, up to the cap.
    fn keep(&mut self, bytes: &[u8]) {
        if self.overflowed {
            return;
        }
        if self.partial.len() + bytes.len() > self.max {
            self.partial.clear();
            self.overflowed = true;
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    /// What is left at the end of the stream: a last line without a line end.
    pub(crate) fn finish(&mut self) -> Option<Line<'_>> {
        if std::mem::take(&mut self.handed_out) {
            self.partial.clear();
        }
        if self.overflowed {
            self.overflowed = false;
            return Some(Line::TooLong);
        }
        if self.partial.is_empty() {
            return None;
        }
        self.handed_out = true;
        Some(Line::Complete(trim_cr(&self.partial)))
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The kind of field an SSE line carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Data,
    /// llama-server's `error:` lines in a stream that failed.
    Error,
}

/// The field and payload of an SSE line (`data: {...}`), none for comments, event names
/// and blank lines.
pub(crate) fn field(line: &[u8]) -> Option<(Field, &[u8])> {
    let (field, rest) = if let Some(rest) = line.strip_prefix(b"data:") {
        (Field::Data, rest)
    } else {
        (Field::Error, line.strip_prefix(b"error:")?)
    };
    Some((field, rest.strip_prefix(b" ").unwrap_or(rest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line of `parts`, fed one part after another.
    fn lines_of(parts: &[&[u8]], max: usize) -> Vec<Result<String, ()>> {
        let mut lines = Lines::with_max(max);
        let mut out = Vec::new();
        for part in parts {
            let _: ControlFlow<()> = lines.feed(part, |line, _| {
                out.push(match line {
                    Line::Complete(line) => Ok(String::from_utf8_lossy(line).into_owned()),
                    Line::TooLong => Err(()),
                });
                ControlFlow::Continue(())
            });
        }
        if let Some(line) = lines.finish() {
            out.push(match line {
                Line::Complete(line) => Ok(String::from_utf8_lossy(line).into_owned()),
                Line::TooLong => Err(()),
            });
        }
        out
    }

    #[test]
    fn lines_split_anywhere_come_out_whole() {
        let stream = b"data: {\"a\":1}\r\n\r\ndata: [DONE]\n\nlast";
        let expected: Vec<Result<String, ()>> =
            ["data: {\"a\":1}", "", "data: [DONE]", "", "last"].iter().map(|s| Ok(s.to_string())).collect();
        for split in 0..stream.len() {
            assert_eq!(lines_of(&[&stream[..split], &stream[split..]], 1024), expected, "split at {split}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(lines_of(&bytes, 1024), expected, "a byte at a time");
    }

    #[test]
    fn an_endless_line_is_cut_and_never_held() {
        let mut lines = Lines::with_max(16);
        let mut seen = Vec::new();
        for _ in 0..1000 {
            let _: ControlFlow<()> = lines.feed(&[b'x'; 10], |_, _| panic!("no line ends here"));
            assert!(lines.partial.capacity() <= 64, "the line is not kept");
        }
        let _: ControlFlow<()> = lines.feed(b"xx\nok\n", |line, _| {
            seen.push(match line {
                Line::Complete(line) => Some(line.to_vec()),
                Line::TooLong => None,
            });
            ControlFlow::Continue(())
        });
        assert_eq!(seen, vec![None, Some(b"ok".to_vec())]);
        assert_eq!(lines_of(&[&[b'y'; 40], b"\nz\n"], 16), vec![Err(()), Ok("z".to_string())]);
        assert_eq!(lines_of(&[&[b'y'; 40]], 16), vec![Err(())], "cut at the end of the stream too");
    }

    #[test]
    fn sse_fields() {
        assert_eq!(field(b"data: {}"), Some((Field::Data, &b"{}"[..])));
        assert_eq!(field(b"data:[DONE]"), Some((Field::Data, &b"[DONE]"[..])));
        assert_eq!(field(b"error: {\"message\":\"x\"}"), Some((Field::Error, &b"{\"message\":\"x\"}"[..])));
        assert_eq!(field(b""), None);
        assert_eq!(field(b": keep-alive"), None);
        assert_eq!(field(b"event: message_start"), None);
    }
}
