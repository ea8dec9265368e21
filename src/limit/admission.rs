//! Whether a consumer's budgets admit a request, as a pure function over the shared-data store.
//! The listener role applies the verdict; the tests here run the same code on the fake store.

use crate::config::{Config, FailureMode};
use crate::limit::headers::retry_after_secs;
use crate::limit::quota::{self, Admission, Demand, Limit, Limits, Metric, Reservation, Standing};
use crate::store::{SharedStore, StoreError};

/// What the listener knows of a request when it decides.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub consumer: &'a str,
    pub model: &'a str,
    /// The name `prices` prices it by: the model, or for an alias the model it stands for.
    pub priced_as: &'a str,
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
        /// The same, exact: when the bucket holds the request's reservation.
        retry_after_ms: u64,
        message: String,
        standings: Vec<Standing>,
        /// The limit that refused it.
        limit: Limit,
    },
    /// Shared data failed and `failure_mode` is `open`: let it through unmetered.
    AdmitUnmetered,
    /// Shared data failed and `failure_mode` is `closed`.
    Unavailable,
}

pub fn limits(cfg: &Config, consumer: &str, model: &str) -> Limits {
    Limits::new(consumer, cfg.limits_for(consumer, model))
}

pub fn demand(cfg: &Config, ask: &Ask<'_>, output: u64) -> Demand {
    let cost = cfg
        .price_for(ask.priced_as)
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
    let wanted = ask.max_tokens.unwrap_or(cfg.default_max_tokens);
    let price = cfg.price_for(ask.priced_as);
    // The lowering reads the same budgets the admission checks: one read, one write.
    let admitted = quota::admit_with(store, &limits, now, |budgets| {
        // Ask for no more output than the budget still allows, rather than be refused (or, for a
        // request larger than a full bucket, run the bucket into debt).
        let lower_to = cfg
            .lower_max_tokens
            .then(|| budgets.max_affordable_output(ask.prompt_tokens, price))
            .flatten()
            .filter(|&max| max >= 1 && max < wanted);
        (demand(cfg, ask, lower_to.unwrap_or(wanted)), lower_to)
    });
    verdict(cfg, ask, admitted)
}

/// [`admit`] for a request answered locally (from the response cache): it counts against the
/// consumer's request limits only, as one request, and spends no token or cost budget (a token
/// bucket in debt does not hold it back either).
pub fn admit_served<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &Config,
    ask: &Ask<'_>,
    now: u64,
) -> Verdict {
    let limits = Limits::new(
        ask.consumer,
        cfg.limits_for(ask.consumer, ask.model)
            .into_iter()
            .filter(|(_, l)| l.metric == Metric::Requests),
    );
    let one = Demand {
        requests: 1,
        ..Demand::default()
    };
    verdict(
        cfg,
        ask,
        quota::admit_with(store, &limits, now, |_| (one, None)),
    )
}

/// The verdict on an admission (and the `max_tokens` it lowered to).
fn verdict(
    cfg: &Config,
    ask: &Ask<'_>,
    admitted: Result<(Admission, Option<u64>), StoreError>,
) -> Verdict {
    match admitted {
        Ok((
            Admission::Admitted {
                reservations,
                standings,
            },
            lower_to,
        )) => Verdict::Admit {
            reservations,
            standings,
            lower_max_tokens_to: lower_to,
        },
        Ok((
            Admission::Rejected {
                retry_after_ms,
                limit,
                standings,
            },
            _,
        )) => refused(ask, retry_after_ms, limit, standings),
        Err(e) => degraded(cfg, e),
    }
}

/// The refusal of `ask` by `limit`, with its message and when to try again.
fn refused(ask: &Ask<'_>, retry_after_ms: u64, limit: Limit, standings: Vec<Standing>) -> Verdict {
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
        retry_after_ms,
        message,
        standings,
        limit,
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
            priced_as: "gpt-4o",
            prompt_tokens: prompt,
            max_tokens: max,
        }
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
            priced_as: "",
            prompt_tokens: 0,
            max_tokens: None,
        };
        assert!(matches!(admit(&s, &cfg(""), &a, 0), Verdict::Admit { .. }));
    }

    #[test]
    fn lowering_max_tokens_admits_in_one_read_and_one_write() {
        let s = FakeStore::new();
        let c = quota::tests::Counting::new(&s);
        let v = admit(
            &c,
            &cfg(r#","lower_max_tokens":true"#),
            &ask(100, Some(5_000)),
            0,
        );
        assert_eq!(c.take(), (1, 1));
        let Verdict::Admit {
            reservations,
            lower_max_tokens_to: Some(900),
            ..
        } = v
        else {
            panic!("{v:?}")
        };
        let used = Demand {
            requests: 1,
            input: 100,
            output: 50,
            cost_micro_usd: 0,
        };
        quota::settle(&c, &reservations, &used, 0).unwrap();
        assert_eq!(c.take(), (1, 1));
    }
}
