//! The client APIs' shapes: what a request asks for, and errors in the client's own dialect.
pub mod envoy_reply;
pub mod errors;
pub mod headers;
pub mod models;
pub mod request;
pub(crate) mod splice;
pub mod trim;

/// A request path without its query or fragment. One byte search: `split(['?', '#'])` decodes
/// and compares every character, twice per request on every path.
pub fn path_only(path: &str) -> &str {
    memchr::memchr2(b'?', b'#', path.as_bytes())
        .and_then(|end| path.get(..end))
        .unwrap_or(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_path_loses_its_query_and_fragment_only() {
        for (path, want) in [
            ("/v1/chat/completions", "/v1/chat/completions"),
            (
                "/v1/chat/completions?api-version=1#x",
                "/v1/chat/completions",
            ),
            ("/v1/messages#frag?not-a-query", "/v1/messages"),
            ("/é/v1?x", "/é/v1"),
            ("?only", ""),
            ("", ""),
        ] {
            assert_eq!(super::path_only(path), want, "{path}");
        }
    }
}
