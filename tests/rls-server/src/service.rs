//! `ShouldRateLimit` on Limitador's engine: each descriptor is matched against the limits as
//! `descriptors[0]` (Limitador server's CEL convention), with its own hits.
//!
//! Hits, per descriptor: the descriptor's `hits_addend` when Envoy sent one, else the request's,
//! else 1. An explicit 0 is a *check*: over limit when not even one more unit fits, nothing
//! counted. A positive amount is *always* added, then judged (over when the counter now exceeds the
//! limit), as envoyproxy/ratelimit does: a charge sent after the response (`apply_on_stream_done`)
//! reports spending that already happened, so it must not be refused.

use crate::proto::{self, DescriptorStatus, RateLimitRequest, RateLimitResponse};
use limitador::counter::Counter;
use limitador::limit::{Context, Namespace};
use limitador::AsyncRateLimiter;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hits {
    Check,
    Add(u64),
}

pub fn hits(request_addend: u32, descriptor_addend: Option<u64>) -> Hits {
    match descriptor_addend {
        Some(0) => Hits::Check,
        Some(n) => Hits::Add(n),
        None if request_addend > 0 => Hits::Add(u64::from(request_addend)),
        None => Hits::Add(1),
    }
}

pub struct Rls {
    limiter: AsyncRateLimiter,
    verbose: bool,
}

impl Rls {
    pub fn new(limiter: AsyncRateLimiter, verbose: bool) -> Self {
        Rls { limiter, verbose }
    }

    /// Errors are storage failures (Redis unreachable): the caller answers gRPC UNAVAILABLE and
    /// Envoy applies its `failure_mode_deny`.
    pub async fn should_rate_limit(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, String> {
        let ns = Namespace::from(req.domain.as_str());
        let mut statuses = Vec::with_capacity(req.descriptors.len());
        for d in &req.descriptors {
            let entries: HashMap<String, String> = d.entries.iter().map(|e| (e.key.clone(), e.value.clone())).collect();
            let mut ctx = Context::default();
            ctx.list_binding("descriptors".into(), vec![entries]);
            let h = hits(req.hits_addend, d.hits_addend.as_ref().map(|v| v.value));
            // Limitador's errors are not Send: turn them into text before the next await.
            let storage = |e: limitador::errors::LimitadorError| format!("storage: {e}");
            let result = match h {
                Hits::Check => self.limiter.is_rate_limited(&ns, &ctx, 1).await.map_err(storage)?,
                Hits::Add(n) => {
                    self.limiter.update_counters(&ns, &ctx, n).await.map_err(storage)?;
                    self.limiter.is_rate_limited(&ns, &ctx, 0).await.map_err(storage)?
                }
            };
            let status = status_of(result.limited, &result.counters);
            if self.verbose {
                let desc: Vec<String> = d.entries.iter().map(|e| format!("{}={}", e.key, e.value)).collect();
                eprintln!(
                    "rls-server: domain={} descriptor=[{}] hits={} -> {} remaining={} reset={}s",
                    req.domain,
                    desc.join(","),
                    match h {
                        Hits::Check => "check".to_string(),
                        Hits::Add(n) => n.to_string(),
                    },
                    if status.code == proto::CODE_OVER_LIMIT { "OVER_LIMIT" } else { "OK" },
                    status.limit_remaining,
                    status.duration_until_reset.as_ref().map_or(0, |r| r.seconds),
                );
            }
            statuses.push(status);
        }
        let over = statuses.iter().any(|s| s.code == proto::CODE_OVER_LIMIT);
        Ok(RateLimitResponse { overall_code: if over { proto::CODE_OVER_LIMIT } else { proto::CODE_OK }, statuses })
    }
}

/// The status Envoy turns into `x-ratelimit-*` headers: the most restrictive matching counter.
/// A descriptor no limit matches is OK with no `current_limit` (Envoy then adds no headers for it).
pub fn status_of(limited: bool, counters: &[Counter]) -> DescriptorStatus {
    let code = if limited { proto::CODE_OVER_LIMIT } else { proto::CODE_OK };
    let Some(c) = counters.iter().min_by_key(|c| c.remaining().unwrap_or(c.max_value())) else {
        return DescriptorStatus { code, ..Default::default() };
    };
    let window = c.window();
    // Round the reset up: a client told "0 s" would retry into the same window.
    let reset = c.expires_in().unwrap_or(window);
    let reset_secs = reset.as_secs().saturating_add(u64::from(reset.subsec_nanos() > 0)).max(1);
    DescriptorStatus {
        code,
        current_limit: Some(proto::RateLimit {
            requests_per_unit: u32::try_from(c.max_value()).unwrap_or(u32::MAX),
            unit: unit_of(window.as_secs()),
            name: c.limit().name().unwrap_or_default().to_string(),
        }),
        limit_remaining: u32::try_from(c.remaining().unwrap_or(c.max_value())).unwrap_or(u32::MAX),
        duration_until_reset: Some(proto::Duration { seconds: i64::try_from(reset_secs).unwrap_or(i64::MAX), nanos: 0 }),
    }
}

/// `RateLimitResponse.RateLimit.Unit` for a window; UNKNOWN (0) when it is not one whole unit.
pub fn unit_of(seconds: u64) -> i32 {
    match seconds {
        1 => 1,
        60 => 2,
        3600 => 3,
        86_400 => 4,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use limitador::limit::Limit;
    use std::time::Duration;

    #[test]
    fn hits_follow_the_rls_rules() {
        assert_eq!(hits(0, None), Hits::Add(1), "unset everywhere counts one");
        assert_eq!(hits(7, None), Hits::Add(7));
        assert_eq!(hits(7, Some(0)), Hits::Check, "descriptor's explicit 0 wins over the request's");
        assert_eq!(hits(0, Some(1234)), Hits::Add(1234));
        assert_eq!(hits(3, Some(u64::MAX)), Hits::Add(u64::MAX));
    }

    fn counter(max: u64, seconds: u64, remaining: u64, expires: Duration) -> Counter {
        let limit = Limit::new("tollgate", max, seconds, [], ["descriptors[0].consumer".try_into().unwrap()]);
        let mut ctx = Context::default();
        ctx.list_binding("descriptors".into(), vec![HashMap::from([("consumer".to_string(), "team-a".to_string())])]);
        let mut c = Counter::new(limit, &ctx).unwrap().unwrap();
        c.set_remaining(remaining);
        c.set_expires_in(expires);
        c
    }

    #[test]
    fn status_reports_the_tightest_counter_rounded_up() {
        let cs = [counter(1000, 60, 400, Duration::from_millis(41_200)), counter(50, 3600, 7, Duration::from_secs(100))];
        let s = status_of(false, &cs);
        assert_eq!(s.code, proto::CODE_OK);
        assert_eq!(s.limit_remaining, 7);
        assert_eq!(s.current_limit, Some(proto::RateLimit { requests_per_unit: 50, unit: 3, name: String::new() }));
        assert_eq!(s.duration_until_reset, Some(proto::Duration { seconds: 100, nanos: 0 }));
        let s = status_of(true, &cs[..1]);
        assert_eq!(s.code, proto::CODE_OVER_LIMIT);
        assert_eq!(s.limit_remaining, 400);
        assert_eq!(s.current_limit.map(|l| (l.requests_per_unit, l.unit)), Some((1000, 2)));
        assert_eq!(s.duration_until_reset.map(|d| d.seconds), Some(42), "41.2 s left is reported as 42");
    }

    #[test]
    fn status_never_says_reset_now_and_saturates_big_limits() {
        let s = status_of(true, &[counter(10_000_000_000, 30, 9_000_000_000, Duration::from_millis(3))]);
        assert_eq!(s.duration_until_reset.map(|d| d.seconds), Some(1));
        assert_eq!(s.limit_remaining, u32::MAX);
        assert_eq!(s.current_limit.map(|l| (l.requests_per_unit, l.unit)), Some((u32::MAX, 0)));
    }

    #[test]
    fn no_matching_limit_is_ok_without_headers() {
        assert_eq!(status_of(false, &[]), DescriptorStatus { code: proto::CODE_OK, ..Default::default() });
    }

    #[test]
    fn units() {
        assert_eq!([1, 60, 3600, 86_400, 30, 0].map(unit_of), [1, 2, 3, 4, 0, 0]);
    }
}
