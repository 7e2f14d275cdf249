//! SHA-256, to check a downloaded model against the digest the Hugging Face Hub lists for
//! it: a thin wrapper over `ring`'s digest (the implementation rustls already compiles into
//! llmctl), so the download code reads `update` and `hex` and the standard's test vectors
//! check the wrapper.

/// A running SHA-256: feed it with [`Sha256::update`], read the digest with
/// [`Sha256::hex`].
#[derive(Clone)]
pub struct Sha256 {
    context: ring::digest::Context,
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256 { context: ring::digest::Context::new(&ring::digest::SHA256) }
    }
}

impl Sha256 {
    pub fn new() -> Sha256 {
        Sha256::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.context.update(data);
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> [u8; 32] {
        let digest = self.context.finish();
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        bytes
    }

    /// The digest as 64 lowercase hex digits, as the Hub writes it.
    pub fn hex(self) -> String {
        self.finish().iter().map(|byte| format!("{byte:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_of(data: &[u8]) -> String {
        let mut hasher = Sha256::new();
        hasher.update(data);
        hasher.hex()
    }

    #[test]
    fn standard_vectors() {
        let table: [(&[u8], &str); 4] = [
            (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            (
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
            ),
            (
                b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
                "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1",
            ),
        ];
        for (input, expected) in table {
            assert_eq!(hex_of(input), expected, "{:?}", String::from_utf8_lossy(input));
        }
        let million_a = vec![b'a'; 1_000_000];
        assert_eq!(hex_of(&million_a), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    }

    #[test]
    fn pieces_hash_like_the_whole() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = hex_of(&data);
        for split in [0, 1, 55, 56, 63, 64, 65, 127, 999] {
            let mut hasher = Sha256::new();
            for piece in data[..split].chunks(13).chain(std::iter::once(&data[split..])) {
                hasher.update(piece);
            }
            assert_eq!(hasher.hex(), whole, "split at {split}");
        }
        // Lengths around the padding boundary.
        for len in 54..=66 {
            let bytes = vec![0x61u8; len];
            let mut one = Sha256::new();
            one.update(&bytes);
            let mut two = Sha256::new();
            two.update(&bytes[..len / 2]);
            two.update(&bytes[len / 2..]);
            assert_eq!(one.hex(), two.hex(), "len {len}");
        }
    }
}
