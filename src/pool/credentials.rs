//! The provider's credential on an attempt, and the key taken out of anything a provider echoes.

use crate::config::{Provider, ProviderType};

/// The credential headers for a provider: (name, value) to set, after removing the client's.
pub fn auth_headers(provider: &Provider, secret: &str) -> Vec<(&'static str, String)> {
    match provider.kind {
        ProviderType::Openai | ProviderType::OpenaiCompatible => {
            vec![("authorization", format!("Bearer {secret}"))]
        }
        ProviderType::AzureOpenai => vec![("api-key", secret.to_string())],
        ProviderType::Anthropic => vec![
            ("x-api-key", secret.to_string()),
            ("anthropic-version", provider.anthropic_version.clone()),
        ],
    }
}

/// `body` with every occurrence of `secret` replaced by `[key <id>]`.
pub fn scrub(body: &[u8], secret: &str, id: &str) -> Vec<u8> {
    let needle = secret.as_bytes();
    if needle.is_empty() {
        return body.to_vec();
    }
    let replacement = format!("[key {id}]");
    let mut out = Vec::with_capacity(body.len());
    let mut from = 0;
    for at in memchr::memmem::find_iter(body, needle) {
        out.extend_from_slice(body.get(from..at).unwrap_or_default());
        out.extend_from_slice(replacement.as_bytes());
        from = at + needle.len();
    }
    out.extend_from_slice(body.get(from..).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_scrubbed_from_error_bodies() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-abc. sk-abc again"}}"#;
        assert_eq!(
            scrub(body, "sk-abc", "oa-1"),
            br#"{"error":{"message":"Incorrect API key provided: [key oa-1]. [key oa-1] again"}}"#
                .to_vec()
        );
        assert_eq!(scrub(b"short", "a-long-secret", "k"), b"short".to_vec());
    }
}
