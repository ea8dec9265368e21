//! What a worker accumulates between ticks instead of calling the host on every request: counters,
//! gauges, and additions to shared-data rows (usage totals).
//!
//! Every host call costs 1-2 µs on Envoy's V8; a request used to make ~20 of them for metrics and
//! totals alone. The adapter adds here and flushes on the root context's tick: the totals stay
//! exact (each addition is flushed exactly once, with Envoy's CAS), at most one tick late; a VM that
//! crashes loses at most one tick of observability, never quota state (quotas are not deferred).

use crate::count::metric_segment;
use crate::maps::HashMap;
use crate::store::{add_u64s, SharedStore, StoreError};
use hashbrown::Equivalent;

/// The width of a usage row: requests, input, output, cache read, cache write, estimated.
pub const ROW: usize = 6;

/// What charging one request adds to the metrics and usage totals. The names it feeds (ten or so:
/// per consumer and model, per provider key, by outcome, and three usage rows) are made from these
/// parts; the adapter formats them once per tick and combination, not once per request.
#[derive(Debug, Clone, Copy, Hash)]
pub struct Charge<'a> {
    pub consumer: &'a str,
    /// Already a metric segment (`other` for a model outside the config): what the client asked
    /// for, an alias by its own name.
    pub model: &'a str,
    /// The model the provider was called with, as a metric segment; empty when no provider served
    /// the request.
    pub served: &'a str,
    /// Empty when no provider key served the request.
    pub provider: &'a str,
    pub key_id: &'a str,
    pub outcome: &'static str,
}

impl Charge<'_> {
    /// Every counter and usage row one request with usage `row` adds to, by name.
    pub fn expand(&self, row: [u64; ROW], add: &mut dyn FnMut(&str, Add)) {
        let [requests, input, output, cache_read, _, estimated] = row;
        add(&format!("tollgate:u:c:{}", self.consumer), Add::Row(row));
        add(&format!("tollgate:u:m:{}", self.model), Add::Row(row));
        let cm = format!(
            "tollgate.consumer.{}.model.{}",
            metric_segment(self.consumer),
            self.model
        );
        add(&format!("{cm}.requests"), Add::Count(requests));
        add(&format!("{cm}.tokens_in"), Add::Count(input));
        add(&format!("{cm}.tokens_out"), Add::Count(output));
        add(&format!("{cm}.tokens_cached"), Add::Count(cache_read));
        if estimated > 0 {
            add(&format!("{cm}.estimated_requests"), Add::Count(estimated));
        }
        if !self.provider.is_empty() && !self.key_id.is_empty() {
            let key = format!("tollgate:u:k:{}:{}", self.provider, self.key_id);
            add(&key, Add::Row(row));
            let pk = format!("tollgate.provider.{}.key.{}", self.provider, self.key_id);
            add(&format!("{pk}.requests"), Add::Count(requests));
            add(&format!("{pk}.tokens_in"), Add::Count(input));
            add(&format!("{pk}.tokens_out"), Add::Count(output));
        }
        if !self.provider.is_empty() && !self.served.is_empty() {
            // Which model served what was asked for (an alias, or a model a provider renames).
            let ms = format!(
                "tollgate.provider.{}.model.{}.served.{}",
                self.provider, self.model, self.served
            );
            add(&format!("{ms}.requests"), Add::Count(requests));
            add(&format!("{ms}.tokens_in"), Add::Count(input));
            add(&format!("{ms}.tokens_out"), Add::Count(output));
        }
        add(
            &format!("tollgate.outcome.{}.requests", self.outcome),
            Add::Count(requests),
        );
    }
}

/// An addition to a named counter or usage row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Add {
    Count(u64),
    Row([u64; ROW]),
}

/// [`Charge`]'s owned form, the key its totals are kept under between ticks.
#[derive(Debug, Hash, PartialEq, Eq)]
struct ChargeKey {
    consumer: String,
    model: String,
    served: String,
    provider: String,
    key_id: String,
    outcome: &'static str,
}

impl ChargeKey {
    fn of(c: &Charge<'_>) -> Self {
        ChargeKey {
            consumer: c.consumer.to_string(),
            model: c.model.to_string(),
            served: c.served.to_string(),
            provider: c.provider.to_string(),
            key_id: c.key_id.to_string(),
            outcome: c.outcome,
        }
    }

    fn borrow(&self) -> Charge<'_> {
        Charge {
            consumer: &self.consumer,
            model: &self.model,
            served: &self.served,
            provider: &self.provider,
            key_id: &self.key_id,
            outcome: self.outcome,
        }
    }
}

// Both derive Hash over the same fields as `str`s, so a `Charge` finds its `ChargeKey` without
// allocating.
impl Equivalent<ChargeKey> for Charge<'_> {
    fn equivalent(&self, k: &ChargeKey) -> bool {
        self.consumer == k.consumer
            && self.model == k.model
            && self.served == k.served
            && self.provider == k.provider
            && self.key_id == k.key_id
            && self.outcome == k.outcome
    }
}

/// One limit's use, in per mille (`tollgate.consumer.<c>.limit.<metric>_<window>s.used_permille`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitUse {
    pub metric: &'static str,
    pub window_s: u64,
    pub permille: u64,
}

impl LimitUse {
    pub fn name(&self, consumer: &str) -> String {
        format!(
            "tollgate.consumer.{}.limit.{}_{}s.used_permille",
            metric_segment(consumer),
            self.metric,
            self.window_s
        )
    }
}

/// Counters an upstream attempt adds to for its provider on every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// `tollgate.provider.<p>.attempts`
    Sent,
    /// `tollgate.provider.<p>.retried_attempts`
    Retried,
    /// `tollgate.provider.<p>.responses_<n>xx`, for statuses 100-599.
    Answered(u16),
}

impl Attempt {
    const SLOTS: usize = 7;

    fn slot(self) -> Option<usize> {
        match self {
            Attempt::Sent => Some(0),
            Attempt::Retried => Some(1),
            Attempt::Answered(status) => match status / 100 {
                c @ 1..=5 => Some(1 + usize::from(c)),
                _ => None,
            },
        }
    }

    pub fn name(self, provider: &str) -> String {
        match self {
            Attempt::Sent => format!("tollgate.provider.{provider}.attempts"),
            Attempt::Retried => format!("tollgate.provider.{provider}.retried_attempts"),
            Attempt::Answered(status) => format!(
                "tollgate.provider.{}.responses_{}xx",
                metric_segment(provider),
                status / 100
            ),
        }
    }

    fn of_slot(slot: usize) -> Self {
        match slot {
            0 => Attempt::Sent,
            1 => Attempt::Retried,
            s => Attempt::Answered(((s - 1) * 100) as u16),
        }
    }
}

#[derive(Debug, Default)]
pub struct Tally {
    counters: HashMap<String, u64>,
    gauges: HashMap<String, u64>,
    rows: HashMap<String, [u64; ROW]>,
    /// Per-request additions kept by their parts; names are made when the tick flushes them.
    charges: HashMap<ChargeKey, [u64; ROW]>,
    limit_use: HashMap<String, Vec<LimitUse>>,
    attempts: HashMap<String, [u64; Attempt::SLOTS]>,
}

/// What a flush hands to the host.
pub trait Sink {
    fn increment(&mut self, counter: &str, by: u64);
    fn record(&mut self, gauge: &str, value: u64);
    fn store(&self) -> &dyn SharedStore;
}

impl Tally {
    pub fn count(&mut self, name: &str, by: u64) {
        add_count(&mut self.counters, name, by);
    }

    pub fn gauge(&mut self, name: &str, value: u64) {
        match self.gauges.get_mut(name) {
            Some(v) => *v = value,
            None => {
                self.gauges.insert(name.to_string(), value);
            }
        }
    }

    pub fn add_row(&mut self, key: &str, row: [u64; ROW]) {
        add_row(&mut self.rows, key, row);
    }

    pub fn charge(&mut self, c: &Charge<'_>, row: [u64; ROW]) {
        match self.charges.get_mut(c) {
            Some(acc) => {
                for (a, d) in acc.iter_mut().zip(row) {
                    *a = a.saturating_add(d);
                }
            }
            None => {
                self.charges.insert(ChargeKey::of(c), row);
            }
        }
    }

    /// The latest use of a consumer's limits (gauges: the last value wins).
    pub fn limit_use(&mut self, consumer: &str, uses: &[LimitUse]) {
        let held = match self.limit_use.get_mut(consumer) {
            Some(held) => held,
            None => self.limit_use.entry(consumer.to_string()).or_default(),
        };
        for u in uses {
            match held
                .iter_mut()
                .find(|h| h.metric == u.metric && h.window_s == u.window_s)
            {
                Some(h) => h.permille = u.permille,
                None => held.push(*u),
            }
        }
    }

    pub fn attempt(&mut self, provider: &str, what: Attempt) {
        let Some(slot) = what.slot() else {
            // A status outside 100-599 (or none): rare enough to be named now.
            return self.count(&what.name(provider), 1);
        };
        let counts = match self.attempts.get_mut(provider) {
            Some(c) => c,
            None => self.attempts.entry(provider.to_string()).or_default(),
        };
        if let Some(c) = counts.get_mut(slot) {
            *c = c.saturating_add(1);
        }
    }

    /// Turns the additions kept by their parts into named counters, gauges and rows.
    fn name_all(&mut self) {
        let mut counters = core::mem::take(&mut self.counters);
        let mut rows = core::mem::take(&mut self.rows);
        for (key, row) in self.charges.drain() {
            key.borrow().expand(row, &mut |name, add| match add {
                Add::Count(by) => add_count(&mut counters, name, by),
                Add::Row(r) => add_row(&mut rows, name, r),
            });
        }
        for (consumer, uses) in self.limit_use.drain() {
            for u in uses {
                self.gauges.insert(u.name(&consumer), u.permille);
            }
        }
        for (provider, counts) in self.attempts.drain() {
            for (slot, by) in counts.into_iter().enumerate() {
                add_count(&mut counters, &Attempt::of_slot(slot).name(&provider), by);
            }
        }
        self.counters = counters;
        self.rows = rows;
    }

    /// Adds everything `other` holds (gauges: `other`'s are older, so kept only where unset).
    pub fn merge(&mut self, mut other: Tally) {
        other.name_all();
        for (k, v) in other.counters {
            self.count(&k, v);
        }
        for (k, v) in other.gauges {
            self.gauges.entry(k).or_insert(v);
        }
        for (k, row) in other.rows {
            self.add_row(&k, row);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
            && self.gauges.is_empty()
            && self.rows.is_empty()
            && self.charges.is_empty()
            && self.limit_use.is_empty()
            && self.attempts.is_empty()
    }

    /// Hands everything to `sink` and forgets it. A row the store refuses (contention, failure) is
    /// kept for the next flush, so nothing is lost or counted twice. Returns the number of CAS
    /// conflicts met and of rows kept back.
    pub fn flush(&mut self, sink: &mut dyn Sink) -> (u32, u32) {
        self.name_all();
        for (name, by) in self.counters.drain() {
            sink.increment(&name, by);
        }
        for (name, value) in self.gauges.drain() {
            sink.record(&name, value);
        }
        let mut conflicts = 0;
        let mut kept = HashMap::default();
        for (key, row) in self.rows.drain() {
            match add_u64s(sink.store(), &key, row) {
                Ok((_, c)) => conflicts += c,
                Err(StoreError::CasMismatch | StoreError::Contended | StoreError::Host) => {
                    kept.insert(key, row);
                }
            }
        }
        let kept_n = kept.len() as u32;
        self.rows = kept;
        (conflicts, kept_n)
    }
}

fn add_count(counters: &mut HashMap<String, u64>, name: &str, by: u64) {
    if by == 0 {
        return;
    }
    match counters.get_mut(name) {
        Some(v) => *v = v.saturating_add(by),
        None => {
            counters.insert(name.to_string(), by);
        }
    }
}

fn add_row(rows: &mut HashMap<String, [u64; ROW]>, key: &str, row: [u64; ROW]) {
    match rows.get_mut(key) {
        Some(acc) => {
            for (a, d) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add(d);
            }
        }
        None => {
            rows.insert(key.to_string(), row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{decode_u64s, FakeStore};

    struct Recorder<'a> {
        store: &'a FakeStore,
        incs: Vec<(String, u64)>,
        gauges: Vec<(String, u64)>,
    }

    impl Sink for Recorder<'_> {
        fn increment(&mut self, c: &str, by: u64) {
            self.incs.push((c.to_string(), by));
        }
        fn record(&mut self, g: &str, v: u64) {
            self.gauges.push((g.to_string(), v));
        }
        fn store(&self) -> &dyn SharedStore {
            self.store
        }
    }

    #[test]
    fn a_tick_flushes_sums_once() {
        let store = FakeStore::new();
        let mut t = Tally::default();
        for _ in 0..3 {
            t.count("a", 2);
            t.add_row("u:c:x", [1, 10, 5, 0, 0, 0]);
        }
        t.count("zero", 0);
        t.gauge("g", 1);
        t.gauge("g", 7);
        let mut r = Recorder {
            store: &store,
            incs: vec![],
            gauges: vec![],
        };
        t.flush(&mut r);
        assert_eq!(r.incs, vec![("a".to_string(), 6)]);
        assert_eq!(r.gauges, vec![("g".to_string(), 7)]);
        let v = store.get("u:c:x").unwrap().0;
        assert_eq!(decode_u64s::<ROW>(v.as_deref()), [3, 30, 15, 0, 0, 0]);
        assert!(t.is_empty());
        t.flush(&mut r);
        assert_eq!(r.incs.len(), 1, "nothing twice");
        assert_eq!(
            decode_u64s::<ROW>(store.get("u:c:x").unwrap().0.as_deref())[0],
            3
        );
    }

    /// Everything kept by its parts reaches the sink under the names a request would have made
    /// one by one, summed.
    #[test]
    fn charges_limit_use_and_attempts_are_named_at_the_tick() {
        let store = FakeStore::new();
        let mut t = Tally::default();
        let served = Charge {
            consumer: "team-a",
            model: "fast",
            served: "gpt-4o",
            provider: "openai",
            key_id: "oa-1",
            outcome: "ok",
        };
        t.charge(&served, [1, 10, 5, 2, 0, 0]);
        t.charge(&served, [1, 20, 7, 0, 0, 1]);
        let refused = Charge {
            provider: "",
            served: "",
            key_id: "",
            outcome: "upstream_429",
            ..served
        };
        t.charge(&refused, [1, 3, 0, 0, 0, 1]);
        let uses = |p| {
            [LimitUse {
                metric: "requests",
                window_s: 60,
                permille: p,
            }]
        };
        t.limit_use("team-a", &uses(100));
        t.limit_use("team-a", &uses(250));
        t.attempt("open.ai", Attempt::Sent);
        t.attempt("open.ai", Attempt::Answered(204));
        t.attempt("open.ai", Attempt::Answered(0));
        // What the same requests add one name at a time (the host's default methods).
        let mut expected = HashMap::<String, u64>::new();
        let mut expected_rows = HashMap::<String, [u64; ROW]>::new();
        for (c, row) in [
            (served, [1, 10, 5, 2, 0, 0]),
            (served, [1, 20, 7, 0, 0, 1]),
            (refused, [1, 3, 0, 0, 0, 1]),
        ] {
            c.expand(row, &mut |name, add| match add {
                Add::Count(by) => add_count(&mut expected, name, by),
                Add::Row(r) => add_row(&mut expected_rows, name, r),
            });
        }
        for name in [
            "tollgate.provider.open.ai.attempts",
            "tollgate.provider.open_ai.responses_2xx",
            "tollgate.provider.open_ai.responses_0xx",
        ] {
            expected.insert(name.into(), 1);
        }
        let mut r = Recorder {
            store: &store,
            incs: vec![],
            gauges: vec![],
        };
        t.flush(&mut r);
        let got: HashMap<String, u64> = r.incs.into_iter().collect();
        assert_eq!(got, expected);
        assert_eq!(
            got["tollgate.consumer.team-a.model.fast.tokens_in"], 33,
            "summed over requests"
        );
        assert_eq!(
            got["tollgate.provider.openai.model.fast.served.gpt-4o.tokens_in"], 30,
            "what the provider that served it was asked for, and what it served"
        );
        assert_eq!(
            got["tollgate.provider.openai.model.fast.served.gpt-4o.requests"],
            2
        );
        assert!(
            !got.keys()
                .any(|k| k.contains(".served.") && !k.contains("openai")),
            "a request no provider served names no served model"
        );
        assert_eq!(got["tollgate.outcome.ok.requests"], 2);
        assert_eq!(
            r.gauges,
            vec![(
                "tollgate.consumer.team-a.limit.requests_60s.used_permille".to_string(),
                250
            )]
        );
        for (key, row) in expected_rows {
            assert_eq!(
                decode_u64s::<ROW>(store.get(&key).unwrap().0.as_deref()),
                row
            );
        }
        assert_eq!(
            decode_u64s::<ROW>(store.get("tollgate:u:c:team-a").unwrap().0.as_deref()),
            [3, 33, 12, 2, 0, 2]
        );
        assert!(t.is_empty());
    }

    #[test]
    fn rows_the_store_refuses_wait_for_the_next_tick() {
        let store = FakeStore::new();
        let mut t = Tally::default();
        t.add_row("k", [1, 1, 1, 1, 1, 1]);
        store.broken.set(true);
        let mut r = Recorder {
            store: &store,
            incs: vec![],
            gauges: vec![],
        };
        assert_eq!(t.flush(&mut r).1, 1);
        store.broken.set(false);
        t.add_row("k", [1, 0, 0, 0, 0, 0]);
        t.flush(&mut r);
        assert_eq!(
            decode_u64s::<ROW>(store.get("k").unwrap().0.as_deref()),
            [2, 1, 1, 1, 1, 1]
        );
    }
}
