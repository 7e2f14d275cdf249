//! Names close to a mistyped one, for "did you mean": edit distance with a limit that
//! grows with the name, and names that contain it.

/// The known names closest to `name`, for "did you mean": by edit distance, case aside,
/// within about a third of the name's length, or names that contain it; best first.
pub(crate) fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let wanted = name.to_lowercase();
    let limit = (wanted.chars().count() / 3).max(2);
    let mut scored: Vec<(usize, String)> = candidates
        .into_iter()
        .filter_map(|candidate| {
            let lower = candidate.to_lowercase();
            let stem = lower.strip_suffix(".gguf").unwrap_or(&lower);
            let distance = edit_distance(&wanted, &lower).min(edit_distance(&wanted, stem));
            let contains = wanted.len() >= 3 && lower.contains(&wanted);
            (distance <= limit || contains)
                .then(|| (if contains { distance.min(1) } else { distance }, candidate.to_string()))
        })
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(3).map(|(_, name)| name).collect()
}

/// Levenshtein distance over characters.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distances() {
        let table =
            [("", "", 0), ("demo", "demo", 0), ("dmeo", "demo", 2), ("demo", "demos", 1), ("kitten", "sitting", 3)];
        for (a, b, expected) in table {
            assert_eq!(edit_distance(a, b), expected, "{a} {b}");
        }
    }

    #[test]
    fn suggests_close_names_only() {
        let names = ["demo", "coder", "unsloth/gemma-3-270m-it-GGUF", "tiny.gguf"];
        assert_eq!(closest("dmeo", names), ["demo"]);
        assert_eq!(closest("codr", names), ["coder"]);
        assert_eq!(closest("tiny", names), ["tiny.gguf"]);
        assert_eq!(closest("gemma", names), ["unsloth/gemma-3-270m-it-GGUF"]);
        assert!(closest("llama-70b", names).is_empty());
    }
}
