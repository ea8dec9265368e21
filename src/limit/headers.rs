//! The rate-limit headers SDKs read, in the client API's dialect, and `Retry-After`.

use crate::api::errors::ClientApi;
use crate::failover::retry_signal::{format_go_duration, format_rfc3339};
use crate::limit::quota::{Metric, Standing};

/// Rate-limit headers in the client API's dialect. OpenAI's are `x-ratelimit-{limit,remaining,reset}-
/// {requests,tokens}` (reset as a duration like "6m0s"); Anthropic's `anthropic-ratelimit-{requests,
/// tokens,input-tokens,output-tokens}-{limit,remaining,reset}` (reset as an RFC 3339 time). Of several
/// limits on one metric, the one with the least remaining is reported.
pub fn rate_limit_headers(
    api: ClientApi,
    standings: &[Standing],
    now_ms: u64,
) -> Vec<(&'static str, String)> {
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
    // The names of each family's limit, remaining and reset headers.
    let mut push = |names: [&'static str; 3], s: &Standing| {
        let [limit, remaining, reset] = names;
        out.push((limit, itoa::Buffer::new().format(s.limit.amount).to_owned()));
        out.push((
            remaining,
            itoa::Buffer::new().format(s.remaining).to_owned(),
        ));
        out.push((
            reset,
            match api {
                ClientApi::OpenAi => format_go_duration(s.reset_ms),
                ClientApi::Anthropic => format_rfc3339(now_ms.saturating_add(s.reset_ms)),
            },
        ));
    };
    let (requests, tokens) = match api {
        ClientApi::OpenAi => (
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
        ),
        ClientApi::Anthropic => (
            [
                "anthropic-ratelimit-requests-limit",
                "anthropic-ratelimit-requests-remaining",
                "anthropic-ratelimit-requests-reset",
            ],
            [
                "anthropic-ratelimit-tokens-limit",
                "anthropic-ratelimit-tokens-remaining",
                "anthropic-ratelimit-tokens-reset",
            ],
        ),
    };
    if let Some(s) = pick(&[Metric::Requests]) {
        push(requests, s);
    }
    if let Some(s) = pick(&[
        Metric::TotalTokens,
        Metric::InputTokens,
        Metric::OutputTokens,
    ]) {
        push(tokens, s);
    }
    if api == ClientApi::Anthropic {
        if let Some(s) = pick(&[Metric::InputTokens]) {
            push(
                [
                    "anthropic-ratelimit-input-tokens-limit",
                    "anthropic-ratelimit-input-tokens-remaining",
                    "anthropic-ratelimit-input-tokens-reset",
                ],
                s,
            );
        }
        if let Some(s) = pick(&[Metric::OutputTokens]) {
            push(
                [
                    "anthropic-ratelimit-output-tokens-limit",
                    "anthropic-ratelimit-output-tokens-remaining",
                    "anthropic-ratelimit-output-tokens-reset",
                ],
                s,
            );
        }
    }
    out
}

/// Seconds for `Retry-After`: whole, rounded up, at least 1.
pub fn retry_after_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::quota::Limit;

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
        assert_eq!(h[0], ("x-ratelimit-limit-requests", "10".into()));
        assert_eq!(h[2], ("x-ratelimit-reset-requests", "6s".into()));
        assert_eq!(h[4], ("x-ratelimit-remaining-tokens", "100".into()));
        let a = rate_limit_headers(ClientApi::Anthropic, &s, 0);
        assert!(a.contains(&("anthropic-ratelimit-input-tokens-remaining", "100".into())));
        assert!(a.contains(&(
            "anthropic-ratelimit-requests-reset",
            "1970-01-01T00:00:06Z".into()
        )));
        assert!(!a.iter().any(|(k, _)| k.contains("output-tokens")));
        assert_eq!(a.len(), 9, "requests, tokens, input tokens");
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1001), 2);
    }
}
