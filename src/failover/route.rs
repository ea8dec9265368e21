//! Where a request starts: the first provider, in failover order, that serves its model and can
//! take it now. The listener role decides this from the body, before any attempt exists; Envoy's
//! retry priorities carry the later attempts down the same order.

use crate::config::{Config, Provider};
use crate::failover::health::{self, Blocked, Blocker, Circuit, ProviderHealth};
use crate::failover::pace::{self, Paced};
use crate::limit::headers::retry_after_secs;
use crate::limit::in_flight::{self, key_lane, Subject};
use crate::store::SharedStore;

#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// Start on this provider (index in config order); > 0 means steering.
    Provider(usize),
    /// Providers serve the model, but none can take it now: what blocks the one that can soonest,
    /// and when it can.
    Exhausted { retry_after_secs: u64, by: Blocker },
    /// As `Exhausted`, and a provider that could take it but for its keys' limits on requests in
    /// flight: a key frees as soon as one of its requests ends.
    AtLimit,
    /// Providers serve the model, but every key that could take it has spent what its provider
    /// announced or its configured limits allow ([`pace`]), and nothing else is back sooner: when
    /// a key can take it, and for lack of what.
    Paced(Paced),
    /// No provider lists the model.
    NotServed,
}

/// Whether `provider` serves `model` ("" = no model named: any provider). An alias is served by
/// the providers it names a model for.
fn serves(cfg: &Config, provider: usize, model: &str) -> bool {
    provider < cfg.providers.len() && (model.is_empty() || cfg.map_model(provider, model).is_some())
}

/// The first provider that serves `model`, whose circuit lets it through (taking a half-open probe
/// slot) and that has a key not cooling down and not at its limit of requests in flight. When
/// shared data cannot be read, the first provider that serves the model: no refusal on a guess.
pub fn start<S: SharedStore + ?Sized>(store: &S, cfg: &Config, model: &str, now: u64) -> Start {
    start_reading(store, cfg, model, 0, now).0
}

/// [`start`] for a request of `tokens` (its estimate, for paced keys), with the health entry of
/// the provider it starts on as read (see [`health::read_keeping_bytes`]): the attempt that
/// follows can choose its key from it instead of reading it again.
pub fn start_reading<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &Config,
    model: &str,
    tokens: u64,
    now: u64,
) -> (Start, Option<Vec<u8>>) {
    start_where(store, cfg, tokens, now, |i| serves(cfg, i, model))
}

/// [`start_reading`] for a request passed through as it is (`passthrough_paths`): no model is
/// mapped and nothing is translated, so only a provider that speaks the client's API serves it.
pub fn start_speaking<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &Config,
    anthropic: bool,
    now: u64,
) -> (Start, Option<Vec<u8>>) {
    start_where(store, cfg, 0, now, |i| {
        cfg.providers
            .get(i)
            .is_some_and(|p| p.kind.speaks_anthropic() == anthropic)
    })
}

fn start_where<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &Config,
    tokens: u64,
    now: u64,
    serves: impl Fn(usize) -> bool,
) -> (Start, Option<Vec<u8>>) {
    let mut earliest: Option<Blocked> = None;
    let mut first_serving = None;
    let mut at_limit = false;
    let mut paced: Option<Paced> = None;
    for (i, p) in cfg.providers.iter().enumerate() {
        if !serves(i) {
            continue;
        }
        first_serving.get_or_insert(i);
        let Ok((h, bytes)) = health::read_keeping_bytes(store, p) else {
            return (Start::Provider(first_serving.unwrap_or(i)), None);
        };
        let blocked = h.blocked(&cfg.health, now);
        // Before a half-open probe slot is taken: a provider whose keys are full takes none.
        if blocked.is_none() && all_keys_full(store, cfg, i, p, &h, now) {
            at_limit = true;
            continue;
        }
        if let Some(until) = blocked
            .is_none()
            .then(|| all_keys_paced(store, cfg, i, p, &h, tokens, now))
            .flatten()
        {
            if paced.is_none_or(|e| until.until_ms < e.until_ms) {
                paced = Some(until);
            }
            continue;
        }
        let blocked = blocked.or_else(|| {
            let probe_taken = h.circuit(&cfg.health, now) == Circuit::HalfOpen
                && !health::try_acquire(store, p, &cfg.health, now).unwrap_or(true);
            probe_taken.then_some(Blocked {
                until_ms: now,
                by: Blocker::CircuitOpen,
            })
        });
        let Some(mut b) = blocked else {
            return (Start::Provider(i), Some(bytes));
        };
        b.until_ms = b.until_ms.max(now.saturating_add(1));
        if earliest.is_none_or(|e| b.until_ms < e.until_ms) {
            earliest = Some(b);
        }
    }
    let start = match (earliest, first_serving, paced) {
        _ if at_limit => Start::AtLimit,
        (e, _, Some(p)) if e.is_none_or(|e| p.until_ms <= e.until_ms) => Start::Paced(p),
        (Some(b), _, _) => Start::Exhausted {
            retry_after_secs: retry_after_secs(b.until_ms - now),
            by: b.by,
        },
        (None, Some(i), _) => Start::Provider(i),
        (None, None, _) => Start::NotServed,
    };
    (start, None)
}

/// When a provider that serves `model` can take it, and what blocks it until then: the earliest
/// among them; None when one can now (or shared data cannot tell). Reads every serving provider's
/// entry: for answers that are already refusals.
pub fn recovery<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &Config,
    model: &str,
    now: u64,
) -> Option<Blocked> {
    let mut earliest: Option<Blocked> = None;
    for (i, p) in cfg.providers.iter().enumerate() {
        if !serves(cfg, i, model) {
            continue;
        }
        let b = health::read(store, p).ok()?.blocked(&cfg.health, now)?;
        if earliest.is_none_or(|e| b.until_ms < e.until_ms) {
            earliest = Some(b);
        }
    }
    earliest
}

/// Whether the keys of provider `i` are paced (a key's limits configured, or the provider announced
/// what they have left) and none of those not cooling down can take `tokens` now: then when one
/// can. One shared-data read, for a paced provider only. Unreadable counts are no reason to refuse.
fn all_keys_paced<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &Config,
    i: usize,
    p: &Provider,
    h: &ProviderHealth,
    tokens: u64,
    now: u64,
) -> Option<Paced> {
    if !(cfg.pacing.configured(i) || h.announces()) {
        return None;
    }
    let entry = pace::read(store, p).ok()?;
    entry.earliest(p, |k| h.key_available(k, now), tokens, now)
}

/// Whether every key of provider `i` not cooling down is at its limit of requests in flight. Read
/// (one shared-data read) only when each of those keys has a limit: otherwise one of them can
/// always take the request. Unreadable counts are no reason to refuse.
fn all_keys_full<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &Config,
    i: usize,
    p: &Provider,
    h: &ProviderHealth,
    now: u64,
) -> bool {
    if !cfg.in_flight.provider(i) {
        return false;
    }
    let mut available = p
        .keys
        .iter()
        .enumerate()
        .filter(|(k, _)| h.key_available(*k, now))
        .map(|(_, k)| k);
    if available.clone().any(|k| k.max_in_flight.is_none()) {
        return false;
    }
    let Ok((totals, _)) = in_flight::read(store, &Subject::Provider(p.name.clone()), now) else {
        return false;
    };
    available.all(|k| {
        k.max_in_flight
            .is_some_and(|m| totals.of(key_lane(&k.id)) >= u64::from(m))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::failover::health::{cool_key, failed, CooldownReason};
    use crate::store::FakeStore;

    fn cfg(extra: &str) -> Config {
        let json = format!(
            r#"{{"providers":[{{"name":"a","type":"openai","keys":[{{"id":"a1","env":"K"}},{{"id":"a2","env":"K"}}],"models":{{"gpt-4o":"gpt-4o","gpt-4o-mini":"gpt-4o-mini"}}}},
                             {{"name":"b","type":"anthropic","keys":[{{"id":"b1","env":"K"}}],"models":{{"gpt-4o":"claude","claude-only":"claude"}}}}],
                "health":{{"circuit_failures":2,"circuit_open_s":10}} {extra}}}"#
        );
        parse(json.as_bytes(), &|_| Some("secret".into())).unwrap()
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
                retry_after_secs: 5,
                by: Blocker::RateLimited
            },
            "b does not serve it"
        );
        cool_key(&s, &c.providers[1], 0, 30_000, CooldownReason::RateLimited).unwrap();
        assert_eq!(
            start(&s, &c, "", 1_000),
            Start::Exhausted {
                retry_after_secs: 4,
                by: Blocker::RateLimited
            }
        );
        assert_eq!(start(&s, &c, "", 5_000), Start::Provider(0));
    }

    #[test]
    fn a_provider_whose_free_keys_are_all_at_their_limit_is_passed_over() {
        let json = r#"{"providers":[
            {"name":"a","type":"openai","keys":[{"id":"a1","env":"K","max_in_flight":1},{"id":"a2","env":"K","max_in_flight":1}]},
            {"name":"b","type":"openai","keys":[{"id":"b1","env":"K","max_in_flight":1},{"id":"b2","env":"K"}]}]}"#;
        let c = parse(json.as_bytes(), &|_| Some("secret".into())).unwrap();
        let s = FakeStore::new();
        let mut leases = in_flight::Leases::new(9);
        let (a, b) = (Subject::Provider("a".into()), Subject::Provider("b".into()));
        let mut take = |subject: &Subject, id: &str, now: u64| {
            leases
                .take(&s, subject, key_lane(id), 1, now, None)
                .unwrap()
        };
        take(&a, "a1", 0);
        assert_eq!(start(&s, &c, "", 0), Start::Provider(0), "a2 is free");
        cool_key(&s, &c.providers[0], 1, 2_000, CooldownReason::RateLimited).unwrap();
        assert_eq!(
            start(&s, &c, "", 1_000),
            Start::Provider(1),
            "a1 full, a2 cooling: on to b"
        );
        assert_eq!(start(&s, &c, "", 2_000), Start::Provider(0), "a2 is back");
        take(&a, "a2", 2_000);
        assert_eq!(start(&s, &c, "", 2_000), Start::Provider(1));
        // b has a key without a limit: its counts are not read, and it takes the request.
        take(&b, "b1", 2_000);
        let calls = s.calls.get();
        assert_eq!(start(&s, &c, "", 2_000), Start::Provider(1));
        assert_eq!(s.calls.get() - calls, 3, "health a, counts a, health b");
        cool_key(&s, &c.providers[1], 1, 9_000, CooldownReason::RateLimited).unwrap();
        assert_eq!(start(&s, &c, "", 2_000), Start::AtLimit);
        leases.give_back(&s, &a, key_lane("a1"), 2_000).unwrap();
        assert_eq!(start(&s, &c, "", 2_000), Start::Provider(0));
    }

    #[test]
    fn paced_keys_are_passed_over_and_refused_when_nothing_is_back_sooner() {
        let json = r#"{"providers":[
            {"name":"a","type":"openai","keys":[{"id":"a1","env":"K","requests_per_minute":1}]},
            {"name":"b","type":"openai","keys":[{"id":"b1","env":"K"}]}]}"#;
        let c = parse(json.as_bytes(), &|_| Some("secret".into())).unwrap();
        let s = FakeStore::new();
        assert_eq!(start(&s, &c, "", 0), Start::Provider(0));
        pace::take(&s, &c.providers[0], 0, 0, 0).unwrap().unwrap();
        assert_eq!(start(&s, &c, "", 1_000), Start::Provider(1), "a spent");
        cool_key(&s, &c.providers[1], 0, 90_000, CooldownReason::RateLimited).unwrap();
        assert_eq!(
            start(&s, &c, "", 1_000),
            Start::Paced(Paced {
                until_ms: 60_000,
                by: pace::Dim::Requests
            }),
            "a's window ends before b is back"
        );
        assert_eq!(
            start(&s, &c, "", 61_000),
            Start::Provider(0),
            "a's new window"
        );
        let s = FakeStore::new();
        pace::take(&s, &c.providers[0], 0, 0, 0).unwrap().unwrap();
        cool_key(&s, &c.providers[1], 0, 30_000, CooldownReason::RateLimited).unwrap();
        assert_eq!(
            start(&s, &c, "", 1_000),
            Start::Exhausted {
                retry_after_secs: 29,
                by: Blocker::RateLimited
            },
            "b is back first"
        );
    }

    #[test]
    fn a_model_only_a_later_provider_lists_starts_there() {
        let s = FakeStore::new();
        let c = cfg("");
        assert_eq!(start(&s, &c, "claude-only", 0), Start::Provider(1));
        assert_eq!(start(&s, &c, "nobody-lists-it", 0), Start::NotServed);
        cool_key(&s, &c.providers[1], 0, 7_000, CooldownReason::RateLimited).unwrap();
        assert_eq!(
            start(&s, &c, "claude-only", 0),
            Start::Exhausted {
                retry_after_secs: 7,
                by: Blocker::RateLimited
            }
        );
    }

    #[test]
    fn an_open_circuit_is_skipped_and_half_open_lets_one_probe_through() {
        let s = FakeStore::new();
        let c = cfg("");
        fail_twice(&s, &c, 0);
        assert_eq!(start(&s, &c, "", 100), Start::Provider(1));
        assert_eq!(start(&s, &c, "", 10_001), Start::Provider(0), "the probe");
        assert_eq!(
            start(&s, &c, "", 10_002),
            Start::Provider(1),
            "one probe only"
        );
        assert_eq!(
            start(&s, &c, "gpt-4o-mini", 10_002),
            Start::Exhausted {
                retry_after_secs: 1,
                by: Blocker::CircuitOpen
            },
            "the probe is out: back in a second"
        );
    }

    /// Two failures in a row on provider `i` at 0 (each attempt began after the previous one
    /// failed): its circuit opens until 10 000.
    fn fail_twice(s: &FakeStore, c: &Config, i: usize) {
        for _ in 0..2 {
            let seen = health::read(s, &c.providers[i]).unwrap().seen();
            failed(s, &c.providers[i], &c.health, seen, 0, None).unwrap();
        }
    }

    #[test]
    fn a_refusal_names_what_blocks_the_provider_that_is_back_soonest() {
        let s = FakeStore::new();
        let c = cfg("");
        // a: an open circuit until 10 s; b: its key rests after a 5xx until 3 s.
        fail_twice(&s, &c, 0);
        let seen = health::read(&s, &c.providers[1]).unwrap().seen();
        failed(&s, &c.providers[1], &c.health, seen, 0, Some((0, 3_000))).unwrap();
        let exhausted = |secs, by| Start::Exhausted {
            retry_after_secs: secs,
            by,
        };
        assert_eq!(
            start(&s, &c, "gpt-4o", 1_000),
            exhausted(2, Blocker::ServerErrors)
        );
        assert_eq!(
            start(&s, &c, "gpt-4o-mini", 1_000),
            exhausted(9, Blocker::CircuitOpen),
            "only a serves it"
        );
        assert_eq!(
            recovery(&s, &c, "gpt-4o", 1_000),
            Some(Blocked {
                until_ms: 3_000,
                by: Blocker::ServerErrors
            })
        );
        assert_eq!(recovery(&s, &c, "gpt-4o", 3_000), None, "b is back");
        // A key cooling after a 429 blocks longer than the circuit: the keys are what to wait for.
        cool_key(&s, &c.providers[0], 0, 20_000, CooldownReason::RateLimited).unwrap();
        cool_key(&s, &c.providers[0], 1, 25_000, CooldownReason::RateLimited).unwrap();
        assert_eq!(
            start(&s, &c, "gpt-4o-mini", 1_000),
            exhausted(19, Blocker::RateLimited)
        );
    }

    #[test]
    fn an_alias_starts_on_the_first_provider_it_names_and_a_passthrough_on_the_clients_api() {
        let s = FakeStore::new();
        let c = cfg(r#","aliases":{"deep":{"b":"claude"},"fast":"gpt-4o"}"#);
        assert_eq!(start(&s, &c, "deep", 0), Start::Provider(1));
        assert_eq!(start(&s, &c, "fast", 0), Start::Provider(0));
        cool_key(&s, &c.providers[0], 0, 5_000, CooldownReason::RateLimited).unwrap();
        cool_key(&s, &c.providers[0], 1, 5_000, CooldownReason::RateLimited).unwrap();
        assert_eq!(
            start(&s, &c, "fast", 0),
            Start::Provider(1),
            "b serves it too"
        );
        assert_eq!(
            start_speaking(&s, &c, false, 0).0,
            Start::Exhausted {
                retry_after_secs: 5,
                by: Blocker::RateLimited
            },
            "an OpenAI path is never passed to the Anthropic provider"
        );
        assert_eq!(start_speaking(&s, &c, true, 0).0, Start::Provider(1));
        let only_openai = parse(
            br#"{"providers":[{"name":"a","type":"openai","keys":[{"id":"a1","env":"K"}]}]}"#,
            &|_| Some("secret".into()),
        )
        .unwrap();
        assert_eq!(
            start_speaking(&s, &only_openai, true, 0).0,
            Start::NotServed
        );
    }

    #[test]
    fn an_unreadable_store_neither_steers_nor_refuses() {
        let s = FakeStore::new();
        s.broken.set(true);
        assert_eq!(start(&s, &cfg(""), "", 0), Start::Provider(0));
        assert_eq!(start(&s, &cfg(""), "claude-only", 0), Start::Provider(1));
    }
}
