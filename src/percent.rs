//! URL percent-encoding, one codec for all of llmctl, over the `percent-encoding` crate:
//! [`encode_path`] for a file path put into a URL, [`decode_query`] for a value read from a
//! query string. It only converts strings; building and parsing URLs is its callers' job.

use std::borrow::Cow;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// What stays as it is in a path: RFC 3986's unreserved characters (`-._~`, letters,
/// digits) and the `/` between segments. Everything else is encoded, so a Hub file name
/// with spaces, `#`, `?` or `%` reaches the server as the same name.
const PATH: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');

/// Percent-encodes `path` for a URL, keeping its slashes.
pub(crate) fn encode_path(path: &str) -> String {
    utf8_percent_encode(path, PATH).to_string()
}

/// Decodes one value of a query string (`application/x-www-form-urlencoded`, as HTML forms
/// and most clients send it): `+` is a space and `%XX` a byte. Bytes that are not UTF-8
/// become U+FFFD; a `%` without two hex digits stays as it is.
pub(crate) fn decode_query(value: &str) -> Cow<'_, str> {
    if !value.contains(['+', '%']) {
        return Cow::Borrowed(value);
    }
    let spaced = value.replace('+', " ");
    Cow::Owned(percent_decode_str(&spaced).decode_utf8_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_keep_slashes_and_unreserved_characters() {
        let table = [
            ("Q4_K_M/m-00001-of-00002.gguf", "Q4_K_M/m-00001-of-00002.gguf"),
            ("my model #1?.gguf", "my%20model%20%231%3F.gguf"),
            ("ü.gguf", "%C3%BC.gguf"),
            ("100%~+&=.gguf", "100%25~%2B%26%3D.gguf"),
            ("", ""),
        ];
        for (path, expected) in table {
            assert_eq!(encode_path(path), expected, "{path}");
        }
    }

    #[test]
    fn query_values_decode_plus_as_space() {
        let table = [
            ("plain", "plain"),
            ("two+words", "two words"),
            ("a%20b%2Bc", "a b+c"),
            ("%C3%BC", "ü"),
            ("100%", "100%"),
            ("%zz%4", "%zz%4"),
            ("%FF", "\u{fffd}"),
            ("", ""),
        ];
        for (value, expected) in table {
            assert_eq!(decode_query(value), expected, "{value}");
        }
    }
}
