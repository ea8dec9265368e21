//! The gateway's decisions, as pure functions the Envoy glue calls: who the consumer is, what an
//! upstream attempt must look like for the provider Envoy picked, which rate-limit headers a client
//! gets. Nothing here touches proxy-wasm.

use crate::api::errors::ClientApi;
use crate::config::{Config, Consumers, Provider, ProviderType, ANONYMOUS};
use crate::count::usage::ApiKind;
use crate::failover::retry_signal::{format_go_duration, format_rfc3339};
use crate::limit::consumer_key;
use crate::limit::quota::{Metric, Standing};

/// Request headers that carry a client's credential: removed before any attempt leaves Envoy, so a
/// client can never choose, nor learn, a pool key.
pub const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "x-api-key", "api-key"];

/// Response headers telling the client which provider and key id served it (ids, never secrets).
pub const HDR_PROVIDER: &str = "x-tollgate-provider";
pub const HDR_KEY_ID: &str = "x-tollgate-key-id";
/// Set by the listener role when a request must start on a provider other than the first: the
/// Envoy routes match on it to pick a cluster whose priorities start at that provider.
pub const HDR_ROUTE: &str = "x-tollgate-route";
/// The listener context's id, for the cluster-level role to find this request's hand-off.
/// Internal headers (`x-tollgate-*`) that a client sends are dropped by the listener role before
/// it sets its own.
pub const HDR_RID: &str = "x-tollgate-rid";
pub const INTERNAL_PREFIX: &str = "x-tollgate-";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Unknown,
    Malformed(&'static str),
}

impl AuthError {
    pub fn message(&self) -> &'static str {
        match self {
            AuthError::Missing => "Missing gateway API key. Send your tollgate consumer key as 'Authorization: Bearer <key>' (or 'x-api-key').",
            AuthError::Unknown => "Incorrect API key provided. Check the tollgate consumer key you were given.",
            AuthError::Malformed(m) => m,
        }
    }
}

/// The credential a client presented: `Authorization: Bearer`, else `x-api-key`, else `api-key`.
pub fn presented_key<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
) -> Result<Option<&'a str>, AuthError> {
    if let Some(v) = header("authorization") {
        let v = v.trim();
        let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed("The Authorization header must use the Bearer scheme: 'Authorization: Bearer <key>'."));
        }
        let token = rest.trim();
        return Ok((!token.is_empty()).then_some(token));
    }
    Ok(header("x-api-key")
        .or_else(|| header("api-key"))
        .map(str::trim)
        .filter(|s| !s.is_empty()))
}

/// Who is calling. Key comparison is against SHA-256 digests, in constant time, over every consumer
/// (no early exit), so neither the digest nor the list's order leaks through timing.
pub fn identify<'a>(
    cfg: &Config,
    header: impl Fn(&str) -> Option<&'a str>,
) -> Result<String, AuthError> {
    match &cfg.consumers {
        Consumers::Anonymous => Ok(ANONYMOUS.to_string()),
        Consumers::TrustedHeader { header: h, list } => {
            let name = header(h)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .ok_or(AuthError::Missing)?;
            if list.is_empty() || list.iter().any(|c| c.name == name) {
                if name.len() > 64
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(AuthError::Unknown);
                }
                Ok(name.to_string())
            } else {
                Err(AuthError::Unknown)
            }
        }
        Consumers::Keys(list) => {
            let key = presented_key(header)?.ok_or(AuthError::Missing)?;
            let digest = consumer_key::digest(key.as_bytes());
            let mut found: Option<&str> = None;
            for c in list {
                if let Some(d) = &c.key_digest {
                    if consumer_key::same(d, &digest) {
                        found = Some(&c.name);
                    }
                }
            }
            found.map(str::to_string).ok_or(AuthError::Unknown)
        }
    }
}

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

/// How an attempt's body must change for the provider Envoy picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    None,
    /// OpenAI chat completions client, Anthropic provider.
    ChatToMessages,
    /// Anthropic messages client, OpenAI-speaking provider.
    MessagesToChat,
}

pub fn translation(api: ApiKind, provider: ProviderType) -> Result<Translation, String> {
    match (api, provider.speaks_anthropic()) {
        (ApiKind::ChatCompletions, true) => Ok(Translation::ChatToMessages),
        (ApiKind::Messages, false) => Ok(Translation::MessagesToChat),
        (ApiKind::Messages, true) | (_, false) => Ok(Translation::None),
        (other, true) => Err(format!(
            "{} requests cannot be served by an Anthropic provider",
            match other {
                ApiKind::Completions => "legacy completions",
                ApiKind::Embeddings => "embeddings",
                ApiKind::Responses => "Responses API",
                _ => "these",
            }
        )),
    }
}

/// The path an attempt goes to: the provider's own endpoint for what the client asked.
/// `path` is the client's path (query kept for pass-through), `model` the provider's model name.
pub fn upstream_path(provider: &Provider, api: ApiKind, path: &str, model: Option<&str>) -> String {
    let base = provider.base_path.as_str();
    let endpoint = match (provider.kind, api) {
        (ProviderType::Anthropic, ApiKind::ChatCompletions | ApiKind::Messages) => "/v1/messages",
        (ProviderType::AzureOpenai, _) => {
            let op = match api {
                ApiKind::ChatCompletions | ApiKind::Messages => "chat/completions",
                ApiKind::Completions => "completions",
                ApiKind::Embeddings => "embeddings",
                _ => "",
            };
            if let (Some(m), false) = (model, op.is_empty()) {
                let v = provider.api_version.as_deref().unwrap_or("");
                return format!("{base}/openai/deployments/{m}/{op}?api-version={v}");
            }
            return format!("{base}{path}");
        }
        (_, ApiKind::Messages) => "/v1/chat/completions",
        _ => return format!("{base}{path}"),
    };
    format!("{base}{endpoint}")
}

/// The headers of one attempt that depend on the model: the path (Azure names the deployment in
/// it), and whether the client's content-length must go because the body will be rewritten.
/// Err when the provider does not serve the model.
pub fn attempt_plan(
    provider: &Provider,
    api: ApiKind,
    path: &str,
    client_model: Option<&str>,
    body_rewritten: bool,
) -> Result<(String, bool), String> {
    let provider_model = match client_model.filter(|m| !m.is_empty()) {
        Some(m) => Some(provider.map_model(m).ok_or_else(|| {
            format!(
                "The model '{m}' is not served by provider '{}'.",
                provider.name
            )
        })?),
        None => None,
    };
    let rewrites_body = body_rewritten
        || provider_model.is_some_and(|pm| Some(pm) != client_model)
        || translation(api, provider.kind)
            .map(|t| t != Translation::None)
            .unwrap_or(false);
    Ok((
        upstream_path(provider, api, path, provider_model),
        rewrites_body,
    ))
}

/// Rate-limit headers in the client API's dialect. OpenAI's are `x-ratelimit-{limit,remaining,reset}-
/// {requests,tokens}` (reset as a duration like "6m0s"); Anthropic's `anthropic-ratelimit-{requests,
/// tokens,input-tokens,output-tokens}-{limit,remaining,reset}` (reset as an RFC 3339 time). Of several
/// limits on one metric, the one with the least remaining is reported.
pub fn rate_limit_headers(
    api: ClientApi,
    standings: &[Standing],
    now_ms: u64,
) -> Vec<(String, String)> {
    let pick = |metrics: &[Metric]| {
        standings
            .iter()
            .filter(|s| metrics.contains(&s.limit.metric))
            .min_by(|a, b| {
                a.remaining
                    .cmp(&b.remaining)
                    .then(b.reset_ms.cmp(&a.reset_ms))
            })
    };
    let mut out = Vec::new();
    let mut push = |family: &str, s: &Standing| match api {
        ClientApi::OpenAi => {
            out.push((
                format!("x-ratelimit-limit-{family}"),
                s.limit.amount.to_string(),
            ));
            out.push((
                format!("x-ratelimit-remaining-{family}"),
                s.remaining.to_string(),
            ));
            out.push((
                format!("x-ratelimit-reset-{family}"),
                format_go_duration(s.reset_ms),
            ));
        }
        ClientApi::Anthropic => {
            out.push((
                format!("anthropic-ratelimit-{family}-limit"),
                s.limit.amount.to_string(),
            ));
            out.push((
                format!("anthropic-ratelimit-{family}-remaining"),
                s.remaining.to_string(),
            ));
            out.push((
                format!("anthropic-ratelimit-{family}-reset"),
                format_rfc3339(now_ms.saturating_add(s.reset_ms)),
            ));
        }
    };
    if let Some(s) = pick(&[Metric::Requests]) {
        push("requests", s);
    }
    if let Some(s) = pick(&[
        Metric::TotalTokens,
        Metric::InputTokens,
        Metric::OutputTokens,
    ]) {
        push("tokens", s);
    }
    if api == ClientApi::Anthropic {
        if let Some(s) = pick(&[Metric::InputTokens]) {
            push("input-tokens", s);
        }
        if let Some(s) = pick(&[Metric::OutputTokens]) {
            push("output-tokens", s);
        }
    }
    out
}

/// `body` with every occurrence of `secret` replaced by `[key <id>]`.
pub fn scrub(body: &[u8], secret: &str, id: &str) -> Vec<u8> {
    let needle = secret.as_bytes();
    if needle.is_empty() || body.len() < needle.len() {
        return body.to_vec();
    }
    let replacement = format!("[key {id}]");
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body.get(i..i + needle.len()) == Some(needle) {
            out.extend_from_slice(replacement.as_bytes());
            i += needle.len();
        } else {
            out.extend_from_slice(body.get(i..i + 1).unwrap_or_default());
            i += 1;
        }
    }
    out
}

/// Seconds for `Retry-After`: whole, rounded up, at least 1.
pub fn retry_after_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// A metric-name segment: Envoy splits stat names on '.', and tag regexes match on them, so a model
/// called "gpt-4.1" is exported as "gpt-4_1".
pub fn metric_segment(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::limit::quota::Limit;

    fn cfg(json: &str) -> Config {
        parse(json.as_bytes(), &|v| {
            (v == "K").then(|| "sk-secret".to_string())
        })
        .unwrap()
    }

    const KEYS: &str = r#"{"consumers":{"list":[
        {"name":"team-a","key_sha256":"1a2f57a5d2f7e0a1ff0aa0e5c0d2ee2b2c29d3cf0d1e2c43a1e57ec3e4a0a6f1"},
        {"name":"team-b","key_env":"K"}]},
        "providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K"}]}]}"#;

    #[test]
    fn consumers_by_key_digest() {
        let c = cfg(KEYS);
        let h = |auth: Option<&'static str>| {
            move |n: &str| if n == "authorization" { auth } else { None }
        };
        assert_eq!(
            identify(&c, h(Some("Bearer sk-secret"))),
            Ok("team-b".to_string())
        );
        assert_eq!(
            identify(&c, h(Some("bearer   sk-secret "))),
            Ok("team-b".to_string())
        );
        assert_eq!(
            identify(&c, h(Some("Bearer nope"))),
            Err(AuthError::Unknown)
        );
        assert_eq!(identify(&c, h(None)), Err(AuthError::Missing));
        assert!(matches!(
            identify(&c, h(Some("Basic abc"))),
            Err(AuthError::Malformed(_))
        ));
        let x = |n: &str| {
            if n == "x-api-key" {
                Some("sk-secret")
            } else {
                None
            }
        };
        assert_eq!(identify(&c, x), Ok("team-b".to_string()));
    }

    #[test]
    fn anonymous_and_trusted_header() {
        let c =
            cfg(r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K"}]}]}"#);
        assert_eq!(identify(&c, |_| None), Ok("anonymous".to_string()));
        let c = cfg(
            r#"{"consumers":{"trusted_header":"x-consumer","list":[{"name":"team-a"}]},
            "providers":[{"name":"oa","type":"openai","keys":[{"id":"k1","env":"K"}]}]}"#,
        );
        assert_eq!(
            identify(&c, |n| (n == "x-consumer").then_some("team-a")),
            Ok("team-a".to_string())
        );
        assert_eq!(
            identify(&c, |n| (n == "x-consumer").then_some("team-z")),
            Err(AuthError::Unknown)
        );
        assert_eq!(identify(&c, |_| None), Err(AuthError::Missing));
    }

    #[test]
    fn paths_per_provider() {
        let c = cfg(r#"{"providers":[
            {"name":"oa","type":"openai","keys":[{"id":"k1","env":"K"}]},
            {"name":"az","type":"azure_openai","api_version":"2024-10-21","keys":[{"id":"k1","env":"K"}]},
            {"name":"an","type":"anthropic","keys":[{"id":"k1","env":"K"}]},
            {"name":"gq","type":"openai_compatible","base_path":"/openai","keys":[{"id":"k1","env":"K"}]}]}"#);
        let p = |i: usize| &c.providers[i];
        assert_eq!(
            upstream_path(
                p(0),
                ApiKind::ChatCompletions,
                "/v1/chat/completions",
                Some("m")
            ),
            "/v1/chat/completions"
        );
        assert_eq!(
            upstream_path(
                p(1),
                ApiKind::ChatCompletions,
                "/v1/chat/completions",
                Some("gpt-4o")
            ),
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            upstream_path(
                p(2),
                ApiKind::ChatCompletions,
                "/v1/chat/completions",
                Some("c")
            ),
            "/v1/messages"
        );
        assert_eq!(
            upstream_path(p(0), ApiKind::Messages, "/v1/messages", Some("m")),
            "/v1/chat/completions"
        );
        assert_eq!(
            upstream_path(p(3), ApiKind::ChatCompletions, "/v1/chat/completions", None),
            "/openai/v1/chat/completions"
        );
        assert_eq!(
            auth_headers(p(2), "s")[1],
            ("anthropic-version", "2023-06-01".to_string())
        );
        assert_eq!(auth_headers(p(1), "s"), vec![("api-key", "s".to_string())]);
        assert!(translation(ApiKind::Embeddings, ProviderType::Anthropic).is_err());
    }

    #[test]
    fn rate_limit_headers_report_the_tightest() {
        let st = |metric, amount, remaining, reset_ms| Standing {
            limit: Limit {
                metric,
                amount,
                window_ms: 60_000,
            },
            remaining,
            reset_ms,
            used_fraction: 0.0,
        };
        let s = [
            st(Metric::Requests, 10, 9, 6_000),
            st(Metric::TotalTokens, 1000, 400, 36_000),
            st(Metric::InputTokens, 500, 100, 48_000),
        ];
        let h = rate_limit_headers(ClientApi::OpenAi, &s, 0);
        assert_eq!(h[0], ("x-ratelimit-limit-requests".into(), "10".into()));
        assert_eq!(h[2], ("x-ratelimit-reset-requests".into(), "6s".into()));
        assert_eq!(h[4], ("x-ratelimit-remaining-tokens".into(), "100".into()));
        let a = rate_limit_headers(ClientApi::Anthropic, &s, 0);
        assert!(a.contains(&(
            "anthropic-ratelimit-input-tokens-remaining".into(),
            "100".into()
        )));
        assert!(a.contains(&(
            "anthropic-ratelimit-requests-reset".into(),
            "1970-01-01T00:00:06Z".into()
        )));
    }

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

    #[test]
    fn helpers() {
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1001), 2);
        assert_eq!(metric_segment("gpt-4.1/mini"), "gpt-4_1_mini");
    }
}
