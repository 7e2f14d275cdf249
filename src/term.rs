//! Makes untrusted text safe to print on a terminal: what a GGUF header, a file name or a
//! server says can hold escape sequences that retitle the window, rewrite the screen or
//! hide text. `ls`, `show`, `ps`, `status` and error messages print such text through
//! [`escape`] or [`escape_lines`]. This module only formats; it never writes, and JSON
//! output needs none of it (JSON escapes control characters itself).

use std::borrow::Cow;
use std::fmt::Write;

/// `text` for one field of one line: control characters (ESC, BEL, CR, newlines, DEL, the
/// C1 range) and the Unicode characters that reorder or break lines (bidirectional
/// overrides and isolates, line and paragraph separators) are shown as `\x1b`-style or
/// `\u{202e}`-style escapes. Everything else, backslashes included, is shown as it is.
pub(crate) fn escape(text: &str) -> Cow<'_, str> {
    escape_with(text, false)
}

/// The same as [`escape`], but line breaks and tabs stay: for text shown as lines of its
/// own (a chat template, the last lines a crashed server wrote).
pub(crate) fn escape_lines(text: &str) -> Cow<'_, str> {
    escape_with(text, true)
}

/// "1st", "2nd", "3rd", "4th", "11th", "21st"...: a place in line.
pub(crate) fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

fn escape_with(text: &str, keep_lines: bool) -> Cow<'_, str> {
    let kept = |c: char| keep_lines && (c == '\n' || c == '\t');
    if !text.chars().any(|c| is_unsafe(c) && !kept(c)) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if !is_unsafe(c) || kept(c) {
            escaped.push(c);
        } else if (c as u32) < 0x80 {
            let _ = write!(escaped, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(escaped, "\\u{{{:x}}}", c as u32);
        }
    }
    Cow::Owned(escaped)
}

/// Characters a terminal acts on instead of showing, or that change how the rest of a
/// line reads.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c,
            // Bidirectional embeddings, overrides and isolates ("Trojan Source", CVE-2021-42574).
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
            // Line and paragraph separators.
            | '\u{2028}' | '\u{2029}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_in_line() {
        let table =
            [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (12, "12th"), (21, "21st"), (102, "102nd")];
        for (n, text) in table {
            assert_eq!(ordinal(n), text);
        }
    }

    #[test]
    fn control_characters_become_visible_escapes() {
        let table = [
            ("plain name", "plain name"),
            ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
            ("red \x1b[31mtext", "red \\x1b[31mtext"),
            ("two\nlines\r\n", "two\\x0alines\\x0d\\x0a"),
            ("tab\there", "tab\\x09here"),
            ("del\x7f c1\u{9b}", "del\\x7f c1\\u{9b}"),
            ("abc\u{202e}fed", "abc\\u{202e}fed"),
            ("sep\u{2028}", "sep\\u{2028}"),
            ("ünïcode ✓ \\x1b as typed", "ünïcode ✓ \\x1b as typed"),
            ("", ""),
        ];
        for (text, expected) in table {
            assert_eq!(escape(text), expected, "{text:?}");
        }
        assert!(matches!(escape("nothing to do"), Cow::Borrowed(_)));
    }

    #[test]
    fn lines_keep_their_breaks() {
        assert_eq!(escape_lines("{% if x %}\n\t{{ y }}\x1b[2J\r\n"), "{% if x %}\n\t{{ y }}\\x1b[2J\\x0d\n");
    }
}
