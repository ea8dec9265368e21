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
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1001), 2);
    }
}
