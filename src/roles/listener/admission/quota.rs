//! The consumer's budgets ([`crate::limit::admission`]): the request's estimate (prompt plus
//! `max_tokens`, or the default output reservation) is reserved against every limit that applies,
//! or the request is refused with the limit named and when it has room again. With
//! `lower_max_tokens`, a request the budget could take with a smaller `max_tokens` is admitted with
//! it lowered instead.

use super::{Admission, Incoming, Refusal, Stop};
use crate::api::errors::ErrorKind;
use crate::api::request;
use crate::host::prof::span;
use crate::host::tally::LimitUse;
use crate::host::Host;
use crate::limit::admission::{self, Verdict};
use crate::limit::headers as limit_headers;
use crate::limit::quota::{Metric, Standing};

pub fn check<H: Host>(
    host: &mut H,
    incoming: &Incoming<'_>,
    adm: &mut Admission,
) -> Result<(), Stop> {
    let cfg = incoming.cfg;
    // An alias is priced as the model it stands for on the provider the request starts on.
    let priced_as = cfg.priced_as(adm.start, &adm.model);
    if !adm.model.is_empty()
        && cfg.has_cost_limit(&adm.consumer, &adm.model)
        && cfg.price_for(priced_as).is_none()
    {
        let msg = format!(
            "The model '{}' has no price configured, and consumer '{}' has a cost budget: ask the gateway's operator to add it to 'prices' (or set 'default_price').",
            adm.model, adm.consumer
        );
        return Err(Refusal::new(ErrorKind::InvalidRequest, msg)
            .code("model_not_priced")
            .into());
    }
    let _admitting = span("listener admit");
    // A request passed through is counted as one request: no tokens are reserved for it.
    let (prompt_tokens, max_tokens) = if adm.passthrough {
        (0, Some(0))
    } else {
        (adm.info.prompt_tokens_estimate, adm.info.max_tokens)
    };
    let ask = admission::Ask {
        consumer: &adm.consumer,
        model: &adm.model,
        priced_as,
        prompt_tokens,
        max_tokens,
    };
    let now = incoming.now;
    let verdict = if adm.cache.serves() {
        // Answered from the cache: one request, no token or cost budget spent.
        admission::admit_served(host.store(), cfg, &ask, now)
    } else {
        admission::admit(host.store(), cfg, &ask, now)
    };
    match verdict {
        Verdict::Admit {
            reservations,
            standings,
            lower_max_tokens_to,
        } => {
            if let (Some(max), Some(b)) = (lower_max_tokens_to, adm.body(incoming)) {
                if let Some(b) = request::with_max_tokens(b, max) {
                    adm.rewritten = Some(b);
                    host.count("tollgate.max_tokens_lowered", 1);
                }
            }
            adm.reservations = reservations;
            adm.rate_limits = limit_headers::rate_limit_headers(incoming.client, &standings, now);
            adm.standings = standings;
            adm.metered = true;
            publish_use(host, &adm.consumer, &adm.standings);
            Ok(())
        }
        Verdict::Refuse {
            retry_after_secs,
            retry_after_ms,
            message,
            standings,
            limit,
        } => {
            publish_use(host, &adm.consumer, &standings);
            adm.rate_limits = limit_headers::rate_limit_headers(incoming.client, &standings, now);
            adm.standings = standings;
            let mut refusal = Refusal::new(ErrorKind::RateLimit, message)
                .code("rate_limit_exceeded")
                // OpenAI names the exhausted limit in `error.type`.
                .openai_type(if limit.metric == Metric::Requests {
                    "requests"
                } else {
                    "tokens"
                });
            refusal.headers = adm.rate_limits.clone();
            Err(refusal
                .header("retry-after", retry_after_secs.to_string())
                // The bucket refills by itself: the same request could go then.
                .retry_in(u32::try_from(retry_after_ms.max(1)).unwrap_or(u32::MAX))
                .into())
        }
        Verdict::AdmitUnmetered => {
            host.count("tollgate.degraded", 1);
            adm.metered = true;
            Ok(())
        }
        Verdict::Unavailable => {
            host.count("tollgate.degraded", 1);
            Err(Refusal::new(
                ErrorKind::Overloaded,
                "The gateway cannot meter this request right now; try again shortly.",
            )
            .into())
        }
    }
}

/// Gauges of each limit's use, in per mille, for alerting at 80%.
fn publish_use<H: Host>(host: &mut H, consumer: &str, standings: &[Standing]) {
    let uses: Vec<LimitUse> = standings
        .iter()
        .map(|s| LimitUse {
            metric: s.limit.metric.as_str(),
            window_s: s.limit.window_ms / 1000,
            permille: (s.used_fraction.clamp(0.0, 10.0) * 1000.0) as u64,
        })
        .collect();
    host.limit_use(consumer, &uses);
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admission, config, incoming};
    use super::*;
    use crate::host::fake::FakeHost;
    use crate::store::FakeStore;
    use std::rc::Rc;

    const CFG: &str = r#"{"consumers":{"list":[{"name":"c","key_env":"K",
          "limits":[{"metric":"total_tokens","amount":100,"window":"1m"}]}]},
        "providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}],
        "default_max_tokens":50, "lower_max_tokens":true}"#;

    #[test]
    fn admits_then_lowers_max_tokens_then_refuses_with_the_limit_named() {
        let cfg = config(CFG);
        let mut h = FakeHost::new(Rc::new(FakeStore::new()));
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hello there"}]}"#;
        let mut adm = admission("c", body);
        adm.model = "m".into();
        assert!(check(&mut h, &incoming(&cfg, body), &mut adm).is_ok());
        assert!(adm.metered && adm.rewritten.is_none());
        assert!(adm
            .rate_limits
            .iter()
            .any(|(k, _)| *k == "x-ratelimit-remaining-tokens"));

        let mut adm = admission("c", body);
        adm.model = "m".into();
        assert!(check(&mut h, &incoming(&cfg, body), &mut adm).is_ok());
        let lowered = String::from_utf8(adm.rewritten.clone().unwrap()).unwrap();
        assert!(lowered.contains("\"max_tokens\""), "{lowered}");

        let mut adm = admission("c", body);
        adm.model = "m".into();
        let Err(Stop::Refuse(r)) = check(&mut h, &incoming(&cfg, body), &mut adm) else {
            panic!("not refused")
        };
        assert_eq!(
            (r.kind, r.openai_type),
            (ErrorKind::RateLimit, Some("tokens"))
        );
        assert!(r.headers.iter().any(|(k, _)| *k == "retry-after"));
        assert!(!adm.metered);
    }

    #[test]
    fn an_alias_is_priced_as_the_model_it_stands_for_on_the_provider_it_starts_on() {
        let cfg = config(
            r#"{"aliases":{"fast":"gpt-4o-mini","smart":{"oa":"gpt-4o","an":"claude-sonnet-4-5"}},
                "consumers":{"list":[{"name":"c","key_env":"K","limits":[{"metric":"cost_usd","amount":1,"window":"1d"}]}]},
                "prices":{"gpt-4o-mini":{"input":0.15,"output":0.6},"claude-sonnet-4-5":{"input":3,"output":15}},
                "providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]},
                             {"name":"an","type":"anthropic","keys":[{"id":"k","env":"K"}]}]}"#,
        );
        let mut h = FakeHost::new(Rc::new(FakeStore::new()));
        let ask = |h: &mut FakeHost, model: &str, start: usize| {
            let body =
                format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
            let mut adm = admission("c", body.as_bytes());
            adm.start = start;
            check(h, &incoming(&cfg, body.as_bytes()), &mut adm).map(|_| adm.reservations.len())
        };
        assert_eq!(
            ask(&mut h, "fast", 0).ok(),
            Some(1),
            "priced as gpt-4o-mini"
        );
        assert_eq!(ask(&mut h, "fast", 1).ok(), Some(1), "on either provider");
        assert_eq!(
            ask(&mut h, "smart", 1).ok(),
            Some(1),
            "as claude-sonnet-4-5 there"
        );
        let Err(Stop::Refuse(r)) = ask(&mut h, "smart", 0) else {
            panic!("gpt-4o has no price")
        };
        assert_eq!(r.code, Some("model_not_priced"));
    }
}
