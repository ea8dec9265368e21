//! Counting tokens: usage read from JSON and SSE answers, and estimates when a provider gives none.
pub mod estimate;
pub mod sse;
pub mod usage;

/// A metric-name segment: Envoy splits stat names on '.', and tag regexes match on them, so a model
/// called "gpt-4.1" is exported as "gpt-4_1".
pub fn metric_segment(s: &str) -> String {
    let kept = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    // Most names need no change: one copy, where the walk below pushes a char at a time.
    if s.bytes().all(kept) {
        return s.to_string();
    }
    s.chars()
        .map(|c| match u8::try_from(c) {
            Ok(b) if kept(b) => c,
            _ => '_',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn metric_segments_keep_stat_names_splittable() {
        assert_eq!(super::metric_segment("gpt-4.1/mini"), "gpt-4_1_mini");
        assert_eq!(super::metric_segment("gpt-4o-mini_2"), "gpt-4o-mini_2");
        // A character of several bytes is one `_`, as any other character kept out.
        assert_eq!(super::metric_segment("modèle"), "mod_le");
        assert_eq!(super::metric_segment(""), "");
    }
}
