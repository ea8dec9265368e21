//! The provider's credential on an attempt, and keys taken out of anything a provider echoes.
//!
//! An `env` or `inline` key is written here; an `sds` key is named in the internal header
//! [`headers::HDR_CREDENTIAL`], and Envoy writes the secret it keeps (see the README, "Rotating keys
//! without a restart"). The VM never holds an `sds` secret, so an error body that quotes one can
//! only be recognised by its shape: [`redact_key_shaped`].
//!
//! That recogniser is hand-written, a single pass over the bytes: the rule is two small cases
//! (a known prefix, or a long token right after a word such as "key" or "Bearer"), and the regex
//! crate would add its engine to the module for them. It runs on provider error bodies only.

use crate::api::headers;
use crate::config::{Key, KeySecret, Provider, ProviderType};

/// The credential headers for an attempt with `key`: (name, value) to set, after removing the
/// client's and any earlier attempt's.
pub fn auth_headers(provider: &Provider, key: &Key) -> Vec<(&'static str, String)> {
    let mut out = match (&key.source, provider.kind) {
        (KeySecret::Sds(name), _) => vec![(headers::HDR_CREDENTIAL, name.clone())],
        (_, ProviderType::Openai | ProviderType::OpenaiCompatible) => {
            vec![("authorization", format!("Bearer {}", key.secret))]
        }
        (_, ProviderType::AzureOpenai) => vec![("api-key", key.secret.clone())],
        (_, ProviderType::Anthropic) => vec![("x-api-key", key.secret.clone())],
    };
    if provider.kind == ProviderType::Anthropic {
        out.push(("anthropic-version", provider.anthropic_version.clone()));
    }
    out
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

/// What a key-shaped token becomes.
pub const REDACTED: &str = "[redacted]";

/// Words after which the next few tokens may be a credential (compared whole, ignoring case).
const KEY_WORDS: &[&str] = &[
    "key",
    "apikey",
    "api-key",
    "api_key",
    "x-api-key",
    "bearer",
    "token",
    "secret",
    "authorization",
    "credential",
    "credentials",
    "password",
];

/// How many tokens after a key word are looked at ("Incorrect API key provided: sk-...").
const KEY_WORD_REACH: u8 = 3;

fn token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'*')
}

/// Whether `token` (a run of letters, digits, `-`, `_`, `.`, `*`) looks like a credential:
/// - anywhere: it starts with `sk-` (OpenAI's `sk-`, `sk-proj-`, Anthropic's `sk-ant-`) and has at
///   least 5 more characters (a masked `sk-...abcd` too);
/// - within 3 tokens after a key word: it is at least 12 long with a digit, or at least 24 long, or
///   at least 6 long with a `*` (a masked key).
///
/// Model names, request ids and URLs pass: they neither start with `sk-` nor follow a key word.
fn key_shaped(token: &[u8], after_key_word: bool) -> bool {
    if token.len() >= 8 && token.starts_with(b"sk-") {
        return true;
    }
    if !after_key_word {
        return false;
    }
    let digit = token.iter().any(u8::is_ascii_digit);
    let masked = token.contains(&b'*');
    (token.len() >= 12 && digit) || token.len() >= 24 || (token.len() >= 6 && masked)
}

/// `body` with every key-shaped token (see `key_shaped`) replaced by [`REDACTED`]. For an error
/// body from a provider, which may quote a key the VM does not know (an `sds` key).
pub fn redact_key_shaped(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut reach = 0u8;
    let mut rest = body;
    while !rest.is_empty() {
        let gap = rest
            .iter()
            .position(|&b| token_byte(b))
            .unwrap_or(rest.len());
        let (sep, tail) = rest.split_at(gap);
        out.extend_from_slice(sep);
        let len = tail
            .iter()
            .position(|&b| !token_byte(b))
            .unwrap_or(tail.len());
        let (word, tail) = tail.split_at(len);
        rest = tail;
        if word.is_empty() {
            continue;
        }
        // A sentence's full stop is not part of the token ("... provided: sk-abc. You can ...").
        let kept = word.len() - word.iter().rev().take_while(|&&b| b == b'.').count();
        let (token, dots) = word.split_at(kept);
        if key_shaped(token, reach > 0) {
            out.extend_from_slice(REDACTED.as_bytes());
        } else {
            out.extend_from_slice(token);
        }
        out.extend_from_slice(dots);
        reach = if KEY_WORDS
            .iter()
            .any(|w| w.as_bytes().eq_ignore_ascii_case(token))
        {
            KEY_WORD_REACH
        } else {
            reach.saturating_sub(1)
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Rotation};

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

    fn redacted(s: &str) -> String {
        String::from_utf8(redact_key_shaped(s.as_bytes())).unwrap()
    }

    #[test]
    fn key_shaped_tokens_are_redacted() {
        let cases = [
            // OpenAI quotes the key it refused, whole or masked.
            (
                r#"{"error":{"message":"Incorrect API key provided: sk-proj-AbC123xyz789. You can find your API key at https://platform.openai.com/account/api-keys.","code":"invalid_api_key"}}"#,
                r#"{"error":{"message":"Incorrect API key provided: [redacted]. You can find your API key at https://platform.openai.com/account/api-keys.","code":"invalid_api_key"}}"#,
            ),
            (
                "Incorrect API key provided: sk-abc...xyz.",
                "Incorrect API key provided: [redacted].",
            ),
            (
                "Incorrect API key provided: sk-proj-********************abcd",
                "Incorrect API key provided: [redacted]",
            ),
            ("sk-ant-api03-Zx9_qR-77kk", "[redacted]"),
            // Keys of no known prefix, named by what precedes them.
            (
                "invalid api_key=0123456789abcdef0123456789abcdef",
                "invalid api_key=[redacted]",
            ),
            (
                "Authorization: Bearer eyJhbGciOi.J9x2.ab3",
                "Authorization: Bearer [redacted]",
            ),
            (
                "x-api-key: '****cdef' is not valid",
                "x-api-key: '[redacted]' is not valid",
            ),
            (
                "Invalid key: abcdefghijklmnopqrstuvwxyzAB",
                "Invalid key: [redacted]",
            ),
            ("TOKEN 1a2b3c4d5e6f7g", "TOKEN [redacted]"),
        ];
        for (body, want) in cases {
            assert_eq!(redacted(body), want, "{body}");
        }
    }

    #[test]
    fn ordinary_error_text_is_left_alone() {
        for body in [
            r#"{"error":{"message":"The model `claude-3-5-sonnet-20241022` does not exist","type":"invalid_request_error"}}"#,
            "Rate limit reached for gpt-4o in organization org-AbCdEf123456 on tokens per min (TPM): Limit 30000. Please try again in 2.5s.",
            "request req_0123456789abcdef failed; see https://status.openai.com/incidents/01JMYB4",
            r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
            // A key word's reach is three tokens: a long id further on stays.
            "the key was not valid for this request 0123456789abcdef0123",
            "task-force sk-ab ask-1234567890",
            "",
        ] {
            assert_eq!(redacted(body), body);
        }
    }

    #[test]
    fn redaction_keeps_every_other_byte() {
        let body = "\u{e9}t\u{e9} key:\n\tsk-1234567890\u{ff}.. \"x\"";
        assert_eq!(
            redacted(body),
            "\u{e9}t\u{e9} key:\n\t[redacted]\u{ff}.. \"x\""
        );
        let raw = b"\xff\xfekey \xffsk-12345678\xff";
        assert_eq!(
            redact_key_shaped(raw),
            b"\xff\xfekey \xff[redacted]\xff".to_vec()
        );
    }

    #[test]
    fn an_sds_key_is_named_for_envoy_and_an_env_key_written() {
        let cfg = parse(
            br#"{"providers":[
                {"name":"oa","type":"openai","keys":[{"id":"k1","sds":"oa-k1"},{"id":"k2","env":"K"}]},
                {"name":"an","type":"anthropic","anthropic_version":"2024-01-01","keys":[{"id":"a1","sds":"an-a1"}]}]}"#,
            &|_| Some("sk-env".into()),
        )
        .unwrap();
        let (oa, an) = (&cfg.providers[0], &cfg.providers[1]);
        assert_eq!(oa.rotation, Rotation::RoundRobin);
        assert_eq!(
            auth_headers(oa, &oa.keys[0]),
            vec![("x-tollgate-credential", "oa-k1".to_string())]
        );
        assert_eq!(
            auth_headers(oa, &oa.keys[1]),
            vec![("authorization", "Bearer sk-env".to_string())]
        );
        assert_eq!(
            auth_headers(an, &an.keys[0]),
            vec![
                ("x-tollgate-credential", "an-a1".to_string()),
                ("anthropic-version", "2024-01-01".to_string())
            ]
        );
    }
}
