//! The listener role's two decisions before a request may go upstream, as pure functions over the
//! shared-data store: where it starts (which provider can take it), and whether the consumer's
//! budgets admit it. The glue applies the result; the tests here run the same code on the fake store.

use crate::config::{Config, FailureMode};
use crate::failover::health::{self, Circuit};
use crate::gateway::retry_after_secs;
use crate::limit::quota::{self, Admission, Demand, Limit, Metric, Reservation, Standing};
use crate::store::{SharedStore, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// Start on this provider (index in config order); > 0 means steering.
    Provider(usize),
    /// No provider can take it: every key cooling down or every circuit open.
    Exhausted { retry_after_secs: u64 },
    /// Shared data unreadable: no steering, no refusal on a guess.
    Unknown,
}

/// The first provider, in failover order, that serves `model` ("" = any), whose circuit lets it
/// through (taking a half-open probe slot) and that has a key not cooling down.
pub fn start<S: SharedStore + ?Sized>(store: &S, cfg: &Config, model: &str, now: u64) -> Start {
    let mut earliest: Option<u64> = None;
    for (i, p) in cfg.providers.iter().enumerate() {
        if !model.is_empty() && p.map_model(model).is_none() {
            continue;
        }
        let Ok(h) = health::read(store, p) else {
            return Start::Unknown;
        };
        let at = h.available_at(&cfg.health, now);
        let usable = at <= now
            && match h.circuit(&cfg.health, now) {
                Circuit::Closed => true,
                Circuit::Open { .. } => false,
                Circuit::HalfOpen => {
                    health::try_acquire(store, p, &cfg.health, now).unwrap_or(true)
                }
            };
        if usable {
            return Start::Provider(i);
        }
        let at = at.max(now.saturating_add(1));
        earliest = Some(earliest.map_or(at, |e| e.min(at)));
    }
    match earliest {
        Some(at) => Start::Exhausted {
            retry_after_secs: retry_after_secs(at - now),
        },
        None => Start::Unknown,
    }
}

/// What the listener knows of a request when it decides.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub consumer: &'a str,
    pub model: &'a str,
    pub prompt_tokens: u64,
    /// The client's max_tokens (or equivalent), if it gave one.
    pub max_tokens: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Admit {
        reservations: Vec<Reservation>,
        standings: Vec<Standing>,
        /// Lower the request's max_tokens to this (with `lower_max_tokens`).
        lower_max_tokens_to: Option<u64>,
    },
    Refuse {
        retry_after_secs: u64,
        message: String,
        standings: Vec<Standing>,
    },
    /// Shared data failed and `failure_mode` is `open`: let it through unmetered.
    AdmitUnmetered,
    /// Shared data failed and `failure_mode` is `closed`.
    Unavailable,
}

pub fn limits(cfg: &Config, consumer: &str, model: &str) -> Vec<(String, Limit)> {
    cfg.limits_for(consumer, model)
        .into_iter()
        .map(|(scope, l)| (quota::key(consumer, scope, &l), l))
        .collect()
}

pub fn demand(cfg: &Config, ask: &Ask<'_>, output: u64) -> Demand {
    let cost = cfg
        .prices
        .get(ask.model)
        .map(|p| quota::cost_micro_usd(p, ask.prompt_tokens, 0, output))
        .unwrap_or(0);
    Demand {
        requests: 1,
        input: ask.prompt_tokens,
        output,
        cost_micro_usd: cost,
    }
}

/// Reserves the request's estimated cost against every limit that applies, or says why not.
pub fn admit<S: SharedStore + ?Sized>(store: &S, cfg: &Config, ask: &Ask<'_>, now: u64) -> Verdict {
    let limits = limits(cfg, ask.consumer, ask.model);
    if limits.is_empty() {
        return Verdict::Admit {
            reservations: Vec::new(),
            standings: Vec::new(),
            lower_max_tokens_to: None,
        };
    }
    let mut output = ask.max_tokens.unwrap_or(cfg.default_max_tokens);
    let mut lower_to = None;
    if cfg.lower_max_tokens {
        // Ask for no more output than the budget still allows, rather than be refused (or, for a
        // request larger than a full bucket, run the bucket into debt).
        let price = cfg.prices.get(ask.model);
        if let Ok(Some(max)) =
            quota::max_affordable_output(store, &limits, ask.prompt_tokens, price, now)
        {
            if max >= 1 && max < output {
                output = max;
                lower_to = Some(max);
            }
        }
    }
    match quota::admit(store, &limits, &demand(cfg, ask, output), now) {
        Ok(Admission::Admitted {
            reservations,
            standings,
        }) => Verdict::Admit {
            reservations,
            standings,
            lower_max_tokens_to: lower_to,
        },
        Ok(Admission::Rejected {
            retry_after_ms,
            limit,
            standings,
        }) => {
            let secs = retry_after_secs(retry_after_ms);
            let amount = match limit.metric {
                Metric::CostMicroUsd => {
                    // Cents, rounded half up, in integers: no float formatting in the module.
                    let cents = limit.amount.saturating_add(5_000) / 10_000;
                    format!("${}.{:02}", cents / 100, cents % 100)
                }
                _ => limit.amount.to_string(),
            };
            let message = format!(
                "Rate limit reached for consumer '{}' on {} ({} per {}s). Please try again in {}s.",
                ask.consumer,
                limit.metric.as_str(),
                amount,
                limit.window_ms / 1000,
                secs
            );
            Verdict::Refuse {
                retry_after_secs: secs,
                message,
                standings,
            }
        }
        Err(e) => degraded(cfg, e),
    }
}

fn degraded(cfg: &Config, e: StoreError) -> Verdict {
    log::warn!(
        "quota admission failed ({e:?}); failure_mode={:?}",
        cfg.failure_mode
    );
    match cfg.failure_mode {
        FailureMode::Open => Verdict::AdmitUnmetered,
        FailureMode::Closed => Verdict::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::failover::health::{cool_key, record, CooldownReason, Outcome};
    use crate::store::FakeStore;

    fn cfg(extra: &str) -> Config {
        let json = format!(
            r#"{{"consumers":{{"list":[{{"name":"team-a","key_env":"K","limits":[{{"metric":"total_tokens","amount":1000,"window":"1m"}}]}}]}},
                "providers":[{{"name":"a","type":"openai","keys":[{{"id":"a1","env":"K"}},{{"id":"a2","env":"K"}}]}},
                             {{"name":"b","type":"anthropic","keys":[{{"id":"b1","env":"K"}}],"models":{{"gpt-4o":"claude"}}}}],
                "health":{{"circuit_failures":2,"circuit_open_s":10}} {extra}}}"#
        );
        parse(json.as_bytes(), &|_| Some("secret".into())).unwrap()
    }

    fn ask(prompt: u64, max: Option<u64>) -> Ask<'static> {
        Ask {
            consumer: "team-a",
            model: "gpt-4o",
            prompt_tokens: prompt,
            max_tokens: max,
        }
    }

    #[test]
    fn starts_on_the_first_provider_with_a_usable_key() {
        let s = FakeStore::new();
        let c = cfg("");
        assert_eq!(start(&s, &c, "", 0), Start::Provider(0));
        cool_key(&s, &c.providers[0], 0, 5_000, CooldownReason::RateLimited).unwrap();
        assert_eq!(
            start(&s, &c, "", 0),
            Start::Provider(0),
            "a2 is still usable"
        );
        cool_key(&s, &c.providers[0], 1, 8_000, CooldownReason::RateLimited).unwrap();
        assert_eq!(start(&s, &c, "gpt-4o", 0), Start::Provider(1));
        assert_eq!(
            start(&s, &c, "gpt-4o-mini", 0),
            Start::Exhausted {
                retry_after_secs: 5
            },
            "b does not serve it"
        );
        cool_key(&s, &c.providers[1], 0, 30_000, CooldownReason::RateLimited).unwrap();
        assert_eq!(
            start(&s, &c, "", 1_000),
            Start::Exhausted {
                retry_after_secs: 4
            }
        );
        assert_eq!(start(&s, &c, "", 5_000), Start::Provider(0));
    }

    #[test]
    fn an_open_circuit_is_skipped_and_half_open_lets_one_probe_through() {
        let s = FakeStore::new();
        let c = cfg("");
        for t in 0..2 {
            record(&s, &c.providers[0], &c.health, Outcome::ProviderFailure, t).unwrap();
        }
        assert_eq!(start(&s, &c, "", 100), Start::Provider(1));
        assert_eq!(start(&s, &c, "", 10_001), Start::Provider(0), "the probe");
        assert_eq!(
            start(&s, &c, "", 10_002),
            Start::Provider(1),
            "one probe only"
        );
    }

    #[test]
    fn an_unreadable_store_neither_steers_nor_refuses() {
        let s = FakeStore::new();
        s.broken.set(true);
        assert_eq!(start(&s, &cfg(""), "", 0), Start::Unknown);
    }

    #[test]
    fn admits_until_the_budget_is_spent_then_refuses_with_retry_after() {
        let s = FakeStore::new();
        let c = cfg("");
        let Verdict::Admit { reservations, .. } = admit(&s, &c, &ask(100, Some(400)), 0) else {
            panic!()
        };
        assert_eq!(reservations.len(), 1);
        assert!(matches!(
            admit(&s, &c, &ask(100, Some(400)), 0),
            Verdict::Admit { .. }
        ));
        let Verdict::Refuse {
            retry_after_secs,
            message,
            ..
        } = admit(&s, &c, &ask(100, Some(400)), 0)
        else {
            panic!()
        };
        assert_eq!(retry_after_secs, 30); // room for 500 tokens at 1000/min
        assert_eq!(
            message,
            "Rate limit reached for consumer 'team-a' on total_tokens (1000 per 60s). Please try again in 30s."
        );
    }

    #[test]
    fn lower_max_tokens_fits_the_request_to_the_budget() {
        let s = FakeStore::new();
        let c = cfg(r#","lower_max_tokens":true"#);
        let v = admit(&s, &c, &ask(100, Some(5_000)), 0);
        let Verdict::Admit {
            lower_max_tokens_to,
            ..
        } = v
        else {
            panic!("{v:?}")
        };
        assert_eq!(lower_max_tokens_to, Some(900));
    }

    #[test]
    fn shared_data_failure_follows_failure_mode() {
        let s = FakeStore::new();
        s.broken.set(true);
        assert_eq!(
            admit(&s, &cfg(""), &ask(1, Some(1)), 0),
            Verdict::AdmitUnmetered
        );
        assert_eq!(
            admit(&s, &cfg(r#","failure_mode":"closed""#), &ask(1, Some(1)), 0),
            Verdict::Unavailable
        );
    }

    #[test]
    fn consumers_without_limits_are_admitted_without_touching_shared_data() {
        let s = FakeStore::new();
        s.broken.set(true);
        let a = Ask {
            consumer: "anonymous",
            model: "",
            prompt_tokens: 0,
            max_tokens: None,
        };
        assert!(matches!(admit(&s, &cfg(""), &a, 0), Verdict::Admit { .. }));
    }
}
