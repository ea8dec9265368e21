//! Per-consumer quotas: requests, tokens and cost over windows from seconds to days, enforced with
//! GCRA over Envoy shared data.
//!
//! Each (consumer x limit) is ONE shared-data entry holding a "theoretical arrival time" (TAT, µs,
//! one little-endian u64). A limit of `amount` per `window` is a bucket that holds at most `amount`
//! units and refills continuously at amount/window; n units cost n*window/amount of time. The
//! bucket's backlog is `max(tat, now) - now`; a demand is admitted if backlog + min(cost, window)
//! <= window, which moves the TAT by the full cost. Nothing grows with time or traffic.
//!
//! Worst cases, on purpose:
//! - Window edges: after a window of idleness the bucket is full, so a consumer may spend a whole
//!   `amount` at once and then keep going at the refill rate: over ANY interval of length T at most
//!   amount * (1 + T/window) is admitted, i.e. 2 x amount in one window length (a fixed-window
//!   counter allows the same 2 x amount, but only across its edge, and then resets to a full
//!   budget every window whatever came before).
//! - A demand larger than the whole budget is admitted when the bucket is full (otherwise it could
//!   never pass) and puts the bucket in debt: every later demand on that limit, even one costing
//!   nothing in its metric, waits until the debt is repaid, so the long-run rate still holds.
//! - Concurrency: check-and-reserve is one CAS per entry, so concurrent workers can never admit
//!   more estimated demand than the budget. What can overshoot is only the settle step: admitted
//!   requests whose actual use exceeds their reservation (typically output tokens estimated low)
//!   are charged the excess afterwards. The overshoot is bounded by the sum of (actual - reserved)
//!   over the requests in flight at once, plus one over-budget request per full bucket (above);
//!   it is repaid as debt, never forgiven.
//! - Settling is accounted as of the admission: a charge or refund moves the TAT as if the actual
//!   cost had been reserved, so refill during a long stream counts, and a refund can never raise
//!   the bucket above full (a TAT in the past is just a full bucket).
//! - Several limits are reserved one after another; a refusal rolls the earlier ones back. In the
//!   meantime another request may see those short-lived reservations and be refused too early
//!   (never too late).
//!
//! Rounding: costs are floored to whole µs but at least 1 µs for a non-zero demand (so a huge
//! amount over a short window can never make demands free); `remaining` is a safe lower bound:
//! any demand up to it is admitted.

use crate::store::{decode_u64s, encode_u64s, update, update_if, SharedStore, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    Requests,
    InputTokens,
    OutputTokens,
    TotalTokens,
    CostMicroUsd,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Requests => "requests",
            Metric::InputTokens => "input_tokens",
            Metric::OutputTokens => "output_tokens",
            Metric::TotalTokens => "total_tokens",
            Metric::CostMicroUsd => "cost_usd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub metric: Metric,
    pub amount: u64,
    pub window_ms: u64,
}

/// What one request costs in each metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    pub requests: u64,
    pub input: u64,
    pub output: u64,
    pub cost_micro_usd: u64,
}

impl Demand {
    pub fn of(&self, m: Metric) -> u64 {
        match m {
            Metric::Requests => self.requests,
            Metric::InputTokens => self.input,
            Metric::OutputTokens => self.output,
            Metric::TotalTokens => self.input.saturating_add(self.output),
            Metric::CostMicroUsd => self.cost_micro_usd,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    pub limit: Limit,
    /// Units that are certainly admitted right now.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset_ms: u64,
    /// 0.0 (full bucket) ..= 1.0 (spent or in debt).
    pub used_fraction: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub key: String,
    pub limit: Limit,
    pub reserved: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// `standings` are taken after reserving.
    Admitted {
        reservations: Vec<Reservation>,
        standings: Vec<Standing>,
    },
    /// `limit` is the one with the longest wait; `standings` are taken after the rollback.
    Rejected {
        retry_after_ms: u64,
        limit: Limit,
        standings: Vec<Standing>,
    },
}

/// USD per million tokens (= micro-USD per token).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub cached_input_per_mtok: f64,
}

/// One limit's arithmetic, in microseconds.
struct Bucket {
    amount: u64,
    window: u64,
}

impl Bucket {
    fn of(l: &Limit) -> Self {
        Bucket {
            amount: l.amount,
            window: l.window_ms.saturating_mul(1000),
        }
    }

    fn cost(&self, n: u64) -> u64 {
        // amount 0 (refused by config) admits nothing and so never records anything; window 0
        // means no time to spread over: unlimited.
        if n == 0 || self.amount == 0 || self.window == 0 {
            return 0;
        }
        let c = u128::from(n) * u128::from(self.window) / u128::from(self.amount);
        u64::try_from(c).unwrap_or(u64::MAX).max(1)
    }

    /// The TAT after admitting `n` units, or the wait in µs before they would be.
    fn admit(&self, tat: u64, now: u64, n: u64) -> Result<u64, u64> {
        if self.amount == 0 && n > 0 {
            return Err(self.window.max(1));
        }
        let cost = self.cost(n);
        let need = u128::from(tat.saturating_sub(now)) + u128::from(cost.min(self.window));
        match need.checked_sub(u128::from(self.window)) {
            Some(over) if over > 0 => Err(u64::try_from(over).unwrap_or(u64::MAX)),
            _ => Ok(tat.max(now).saturating_add(cost)),
        }
    }

    fn remaining(&self, backlog: u64) -> u64 {
        let free = u128::from(self.window - backlog.min(self.window));
        match (free * u128::from(self.amount)).checked_div(u128::from(self.window)) {
            Some(r) => u64::try_from(r).unwrap_or(u64::MAX),
            None => self.amount,
        }
    }

    fn standing(&self, limit: Limit, tat: u64, now: u64) -> Standing {
        let backlog = tat.saturating_sub(now);
        let used_fraction = if self.window == 0 {
            0.0
        } else {
            backlog.min(self.window) as f64 / self.window as f64
        };
        Standing {
            limit,
            remaining: self.remaining(backlog),
            reset_ms: ms_up(backlog),
            used_fraction,
        }
    }
}

fn ms_up(us: u64) -> u64 {
    us.div_ceil(1000)
}

fn now_us(now_ms: u64) -> u64 {
    now_ms.saturating_mul(1000)
}

fn read_tat<S: SharedStore + ?Sized>(store: &S, key: &str) -> Result<u64, StoreError> {
    let [tat] = decode_u64s::<1>(store.get(key)?.0.as_deref());
    Ok(tat)
}

/// Moves a TAT by `plus - minus` µs (one of them is 0).
fn shift<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    plus: u64,
    minus: u64,
) -> Result<(), StoreError> {
    if plus == minus {
        return Ok(());
    }
    update(store, key, |cur| {
        let [tat] = decode_u64s::<1>(cur);
        (
            encode_u64s(&[tat.saturating_add(plus).saturating_sub(minus)]),
            (),
        )
    })
    .map(|_| ())
}

fn roll_back<S: SharedStore + ?Sized>(store: &S, reservations: &[Reservation]) {
    for r in reservations {
        if let Err(e) = shift(store, &r.key, 0, Bucket::of(&r.limit).cost(r.reserved)) {
            log::warn!("tollgate: quota rollback of {} failed: {:?}", r.key, e);
        }
    }
}

/// `limits`: (shared-data key, limit). Checks and reserves atomically per limit (CAS); if a later
/// limit refuses, the reservations already made are rolled back, so a rejected request costs
/// nothing. On a store error the reservations made so far are rolled back too (best effort).
pub fn admit<S: SharedStore + ?Sized>(
    store: &S,
    limits: &[(String, Limit)],
    demand: &Demand,
    now_ms: u64,
) -> Result<Admission, StoreError> {
    let now = now_us(now_ms);
    let mut reservations = Vec::with_capacity(limits.len());
    let mut standings = Vec::with_capacity(limits.len());
    for (key, limit) in limits {
        let b = Bucket::of(limit);
        let n = demand.of(limit.metric);
        let step = reserve(store, key, &b, n, now);
        match step {
            Ok(Ok(tat)) => {
                reservations.push(Reservation {
                    key: key.clone(),
                    limit: *limit,
                    reserved: n,
                });
                standings.push(b.standing(*limit, tat, now));
            }
            Ok(Err(wait)) => {
                roll_back(store, &reservations);
                return Ok(rejection(store, limits, demand, now, (wait, *limit)));
            }
            Err(e) => {
                roll_back(store, &reservations);
                return Err(e);
            }
        }
    }
    Ok(Admission::Admitted {
        reservations,
        standings,
    })
}

/// Ok(Ok(tat after)) if admitted, Ok(Err(wait µs)) if not.
fn reserve<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    b: &Bucket,
    n: u64,
    now: u64,
) -> Result<Result<u64, u64>, StoreError> {
    // Refusals (the common case for a consumer hammering past its quota) and zero-cost admissions
    // write nothing, hence meet no CAS contention.
    let free = b.cost(n) == 0;
    update_if(store, key, |cur| {
        let [tat] = decode_u64s::<1>(cur);
        match b.admit(tat, now, n) {
            Ok(_) if free => (None, Ok(tat)),
            Ok(after) => (Some(encode_u64s(&[after])), Ok(after)),
            Err(wait) => (None, Err(wait)),
        }
    })
    .map(|(out, _)| out)
}

/// Builds the refusal after rollback: the longest wait over all limits (so a retry is not refused
/// by the next limit), and standings. Reads here are best effort: a failing read drops that
/// limit's standing rather than turning a refusal into an error the caller might fail open on.
fn rejection<S: SharedStore + ?Sized>(
    store: &S,
    limits: &[(String, Limit)],
    demand: &Demand,
    now: u64,
    mut worst: (u64, Limit),
) -> Admission {
    let mut standings = Vec::with_capacity(limits.len());
    for (key, limit) in limits {
        let Ok(tat) = read_tat(store, key) else {
            continue;
        };
        let b = Bucket::of(limit);
        if let Err(w) = b.admit(tat, now, demand.of(limit.metric)) {
            if w > worst.0 {
                worst = (w, *limit);
            }
        }
        standings.push(b.standing(*limit, tat, now));
    }
    Admission::Rejected {
        retry_after_ms: ms_up(worst.0).max(1),
        limit: worst.1,
        standings,
    }
}

/// Settles reservations against the actual demand (the estimate was `reserved`). Call exactly
/// once. Every reservation is attempted; the first store error is returned.
pub fn settle<S: SharedStore + ?Sized>(
    store: &S,
    reservations: &[Reservation],
    actual: &Demand,
    _now_ms: u64,
) -> Result<(), StoreError> {
    let mut result = Ok(());
    for r in reservations {
        let b = Bucket::of(&r.limit);
        let (was, is) = (b.cost(r.reserved), b.cost(actual.of(r.limit.metric)));
        let moved = shift(
            store,
            &r.key,
            is.saturating_sub(was),
            was.saturating_sub(is),
        );
        if result.is_ok() {
            result = moved;
        }
    }
    result
}

/// Current standing without changing anything (for rate-limit headers and gauges).
pub fn standings<S: SharedStore + ?Sized>(
    store: &S,
    limits: &[(String, Limit)],
    now_ms: u64,
) -> Result<Vec<Standing>, StoreError> {
    let now = now_us(now_ms);
    limits
        .iter()
        .map(|(key, limit)| Ok(Bucket::of(limit).standing(*limit, read_tat(store, key)?, now)))
        .collect()
}

/// Largest output-token count the OutputTokens/TotalTokens/Cost limits still allow right now for
/// a request with this input and price (None if no output-bounding limit applies). For "lower
/// max_tokens instead of refusing". Based on `remaining`, so the answer is admitted if asked at
/// once. Cost limits bound output only with a price whose output price is positive; the input is
/// priced as uncached (the cache is not known before the response).
pub fn max_affordable_output<S: SharedStore + ?Sized>(
    store: &S,
    limits: &[(String, Limit)],
    input: u64,
    price: Option<&Price>,
    now_ms: u64,
) -> Result<Option<u64>, StoreError> {
    let now = now_us(now_ms);
    let mut best: Option<u64> = None;
    for (key, limit) in limits {
        let cost_price = price.filter(|p| rate(p.output_per_mtok) > 0.0);
        match (limit.metric, cost_price) {
            (Metric::OutputTokens | Metric::TotalTokens, _) | (Metric::CostMicroUsd, Some(_)) => {}
            _ => continue,
        }
        let rem = Bucket::of(limit)
            .standing(*limit, read_tat(store, key)?, now)
            .remaining;
        let o = match (limit.metric, cost_price) {
            (Metric::TotalTokens, _) => rem.saturating_sub(input),
            (Metric::CostMicroUsd, Some(p)) => affordable_by_cost(p, rem, input),
            _ => rem,
        };
        best = Some(best.map_or(o, |b| b.min(o)));
    }
    Ok(best)
}

/// Output tokens that fit in `budget` micro-USD after `input` uncached input tokens (output price
/// known to be positive).
fn affordable_by_cost(p: &Price, budget: u64, input: u64) -> u64 {
    let left = budget as f64 - input as f64 * rate(p.input_per_mtok);
    if left <= 0.0 {
        return 0;
    }
    // f64 rounding may land a token high; step down until the exact cost fits (a few steps).
    let mut o = (left / rate(p.output_per_mtok)).floor() as u64;
    for _ in 0..4 {
        if o == 0 || cost_micro_usd(p, input, 0, o) <= budget {
            break;
        }
        o -= 1;
    }
    o
}

/// Negative or non-finite prices count as free rather than poisoning the sum.
fn rate(per_mtok: f64) -> f64 {
    if per_mtok.is_finite() && per_mtok > 0.0 {
        per_mtok
    } else {
        0.0
    }
}

/// Cost in micro-USD: (input - cache_read) * input price + cache_read * cached price + output *
/// output price, rounded up (so a priced request never costs nothing; at most 1 micro-USD high).
pub fn cost_micro_usd(price: &Price, input: u64, cache_read: u64, output: u64) -> u64 {
    let usd = input.saturating_sub(cache_read) as f64 * rate(price.input_per_mtok)
        + cache_read as f64 * rate(price.cached_input_per_mtok)
        + output as f64 * rate(price.output_per_mtok);
    // `as` saturates (and the sum is never NaN), so huge counts cannot wrap.
    usd.ceil() as u64
}

/// The shared-data key for a consumer's limit; `model` None for consumer-wide limits. Both names
/// must come from config so the key space stays bounded. Metric, window and amount are part of the
/// key, so a config change starts afresh. '%', ':' and '*' are escaped so that distinct
/// (consumer, model) pairs never share a key.
pub fn key(consumer: &str, model: Option<&str>, limit: &Limit) -> String {
    let mut k = String::with_capacity(48 + consumer.len() + model.map_or(1, str::len));
    k.push_str("tollgate:q:");
    escape_into(&mut k, consumer);
    k.push(':');
    match model {
        Some(m) => escape_into(&mut k, m),
        None => k.push('*'),
    }
    k.push(':');
    k.push_str(limit.metric.as_str());
    k.push_str(&format!(":{}:{}", limit.window_ms, limit.amount));
    k
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            '*' => out.push_str("%2A"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FakeStore;
    use core::cell::Cell;

    const MIN: u64 = 60_000;
    const T0: u64 = 1_700_000_000_000;

    fn lim(metric: Metric, amount: u64, window_ms: u64) -> Limit {
        Limit {
            metric,
            amount,
            window_ms,
        }
    }
    fn keyed(ls: &[Limit]) -> Vec<(String, Limit)> {
        ls.iter().map(|l| (key("team-a", None, l), *l)).collect()
    }
    fn input(n: u64) -> Demand {
        Demand {
            requests: 1,
            input: n,
            ..Demand::default()
        }
    }
    fn is_admitted(a: &Admission) -> bool {
        matches!(a, Admission::Admitted { .. })
    }
    fn retry(a: &Admission) -> u64 {
        match a {
            Admission::Rejected { retry_after_ms, .. } => *retry_after_ms,
            Admission::Admitted { .. } => 0,
        }
    }
    fn reservations(a: Admission) -> Vec<Reservation> {
        match a {
            Admission::Admitted { reservations, .. } => reservations,
            Admission::Rejected { .. } => Vec::new(),
        }
    }
    fn remaining(s: &FakeStore, ls: &[(String, Limit)], now: u64) -> Vec<u64> {
        standings(s, ls, now)
            .unwrap()
            .iter()
            .map(|s| s.remaining)
            .collect()
    }

    #[test]
    fn spent_budget_is_refused_until_exactly_the_retry_after() {
        let s = FakeStore::new();
        let ls = keyed(&[lim(Metric::InputTokens, 1000, MIN)]);
        for _ in 0..10 {
            assert!(is_admitted(&admit(&s, &ls, &input(100), T0).unwrap()));
        }
        let refused = admit(&s, &ls, &input(100), T0).unwrap();
        // 100 tokens refill in 100 * 60 ms.
        assert_eq!(retry(&refused), 6000);
        match &refused {
            Admission::Rejected {
                limit, standings, ..
            } => {
                assert_eq!(*limit, ls[0].1);
                assert_eq!(standings[0].remaining, 0);
                assert_eq!(standings[0].reset_ms, MIN);
            }
            Admission::Admitted { .. } => unreachable!(),
        }
        assert_eq!(retry(&admit(&s, &ls, &input(100), T0 + 5999).unwrap()), 1);
        assert!(is_admitted(
            &admit(&s, &ls, &input(100), T0 + 6000).unwrap()
        ));
        assert_eq!(retry(&admit(&s, &ls, &input(1), T0 + 6000).unwrap()), 60);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_ms() {
        let s = FakeStore::new();
        // 3 per second: one unit costs 333_333 µs.
        let ls = keyed(&[lim(Metric::Requests, 3, 1000)]);
        for _ in 0..3 {
            assert!(is_admitted(&admit(&s, &ls, &input(0), 0).unwrap()));
        }
        // Backlog 999_999 + 333_333 - 1_000_000 = 333_332 µs -> 334 ms.
        assert_eq!(retry(&admit(&s, &ls, &input(0), 0).unwrap()), 334);
        assert_eq!(retry(&admit(&s, &ls, &input(0), 333).unwrap()), 1);
        assert!(is_admitted(&admit(&s, &ls, &input(0), 334).unwrap()));
    }

    #[test]
    fn budget_refills_continuously() {
        let s = FakeStore::new();
        let ls = keyed(&[lim(Metric::InputTokens, 1000, MIN)]);
        assert!(is_admitted(&admit(&s, &ls, &input(1000), T0).unwrap()));
        assert_eq!(remaining(&s, &ls, T0 + MIN / 4), vec![250]);
        assert_eq!(remaining(&s, &ls, T0 + MIN / 2), vec![500]);
        assert!(is_admitted(
            &admit(&s, &ls, &input(500), T0 + MIN / 2).unwrap()
        ));
        assert_eq!(retry(&admit(&s, &ls, &input(1), T0 + MIN / 2).unwrap()), 60);
        // Never more than one full budget, however long the idle time.
        assert_eq!(remaining(&s, &ls, T0 + 100 * MIN), vec![1000]);
    }

    #[test]
    fn oversized_request_passes_a_full_bucket_and_leaves_debt() {
        let s = FakeStore::new();
        let ls = keyed(&[lim(Metric::InputTokens, 1000, MIN)]);
        let a = admit(&s, &ls, &input(3000), T0).unwrap();
        match &a {
            Admission::Admitted { standings, .. } => {
                assert_eq!(standings[0].remaining, 0);
                assert_eq!(standings[0].reset_ms, 3 * MIN);
                assert_eq!(standings[0].used_fraction, 1.0);
            }
            Admission::Rejected { .. } => panic!("full bucket must admit: {a:?}"),
        }
        // A minute later the debt is still a window deep; even a zero-token demand waits.
        assert_eq!(retry(&admit(&s, &ls, &input(0), T0 + MIN).unwrap()), MIN);
        assert_eq!(
            retry(&admit(&s, &ls, &input(1), T0 + MIN).unwrap()),
            MIN + 60
        );
        assert!(is_admitted(
            &admit(&s, &ls, &input(1), T0 + 2 * MIN + 60).unwrap()
        ));

        // On a bucket that is not full, an oversized demand waits until it is.
        let s = FakeStore::new();
        assert!(is_admitted(&admit(&s, &ls, &input(1), T0).unwrap()));
        assert_eq!(retry(&admit(&s, &ls, &input(5000), T0).unwrap()), 60);
        assert!(is_admitted(&admit(&s, &ls, &input(5000), T0 + 60).unwrap()));
    }

    #[test]
    fn settle_refunds_and_charges_the_difference() {
        let s = FakeStore::new();
        let ls = keyed(&[lim(Metric::OutputTokens, 1000, MIN)]);
        let out = |n| Demand {
            output: n,
            ..Demand::default()
        };
        let r = reservations(admit(&s, &ls, &out(500), T0).unwrap());
        assert_eq!(
            r,
            vec![Reservation {
                key: ls[0].0.clone(),
                limit: ls[0].1,
                reserved: 500
            }]
        );
        assert_eq!(remaining(&s, &ls, T0), vec![500]);
        settle(&s, &r, &out(200), T0).unwrap();
        assert_eq!(remaining(&s, &ls, T0), vec![800]);

        let r = reservations(admit(&s, &ls, &out(100), T0).unwrap());
        assert_eq!(remaining(&s, &ls, T0), vec![700]);
        settle(&s, &r, &out(400), T0).unwrap();
        assert_eq!(remaining(&s, &ls, T0), vec![400]);

        // An underestimate can push into debt, repaid before anything else passes.
        let r = reservations(admit(&s, &ls, &out(0), T0).unwrap());
        settle(&s, &r, &out(1400), T0).unwrap();
        let st = standings(&s, &ls, T0).unwrap();
        assert_eq!((st[0].remaining, st[0].reset_ms), (0, 2 * MIN));
        assert_eq!(retry(&admit(&s, &ls, &out(0), T0).unwrap()), MIN);
    }

    #[test]
    fn refusal_by_a_later_limit_rolls_back_and_names_the_longest_wait() {
        let s = FakeStore::new();
        let ls = keyed(&[
            lim(Metric::Requests, 10, MIN),
            lim(Metric::InputTokens, 100, MIN),
            lim(Metric::TotalTokens, 100, 10 * MIN),
        ]);
        assert!(is_admitted(&admit(&s, &ls, &input(50), T0).unwrap()));
        let before = standings(&s, &ls, T0).unwrap();
        assert_eq!(
            before.iter().map(|s| s.remaining).collect::<Vec<_>>(),
            vec![9, 50, 50]
        );

        let a = admit(&s, &ls, &input(60), T0).unwrap();
        match &a {
            Admission::Rejected {
                retry_after_ms,
                limit,
                standings,
            } => {
                // Input refuses first (10 tokens x 600 ms) but total waits longer (10 x 6 s).
                assert_eq!(*limit, ls[2].1);
                assert_eq!(*retry_after_ms, 60_000);
                assert_eq!(standings, &before);
            }
            Admission::Admitted { .. } => panic!("must be refused: {a:?}"),
        }
        assert_eq!(standings(&s, &ls, T0).unwrap(), before);
        // The requests limit was not charged: 9 more single requests still fit.
        for _ in 0..9 {
            assert!(is_admitted(&admit(&s, &ls, &input(0), T0).unwrap()));
        }
        assert_eq!(
            admit(&s, &ls, &input(0), T0).map(|a| retry(&a)).unwrap(),
            6000
        );
    }

    #[test]
    fn two_workers_with_conflicts_lose_nothing() {
        let s = FakeStore::new();
        let ls = keyed(&[
            lim(Metric::Requests, 100, 60 * MIN),
            lim(Metric::InputTokens, 10_000, 60 * MIN),
        ]);
        let store = &s;
        let worker_a = |now: u64| {
            store.inject_conflicts.set(3);
            admit(store, &ls, &input(10), now).unwrap()
        };
        let worker_b = |now: u64| {
            store.inject_conflicts.set(1);
            admit(store, &ls, &input(10), now).unwrap()
        };
        let workers: [&dyn Fn(u64) -> Admission; 2] = [&worker_a, &worker_b];
        let mut admitted = 0;
        let mut held = Vec::new();
        for i in 0..60 {
            for w in workers {
                let r = w(T0 + i);
                if is_admitted(&r) {
                    admitted += 1;
                    held.extend(reservations(r));
                }
            }
        }
        assert_eq!(admitted, 100);
        // Settling under conflicts too: each request used 20 tokens, not 10.
        s.inject_conflicts.set(5);
        settle(&s, &held, &input(20), T0 + 60).unwrap();
        let st = standings(&s, &ls, T0 + 60).unwrap();
        // 1 request / 36 s and 1 token / 360 ms refill: 60 ms elapsed on average add nothing.
        assert_eq!((st[0].remaining, st[1].remaining), (0, 10_000 - 100 * 20));
    }

    /// A store whose writes first let another whole admission run, so every racing admission read
    /// a state that is stale by the time it writes.
    struct Racy<'a> {
        inner: &'a FakeStore,
        pending: Cell<u32>,
        limits: Vec<(String, Limit)>,
        admitted: Cell<u32>,
        refused: Cell<u32>,
    }
    impl Racy<'_> {
        fn run(&self) {
            match admit(self, &self.limits, &input(1), T0).unwrap() {
                Admission::Admitted { .. } => self.admitted.set(self.admitted.get() + 1),
                Admission::Rejected { .. } => self.refused.set(self.refused.get() + 1),
            }
        }
    }
    impl SharedStore for Racy<'_> {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            if self.pending.get() > 0 {
                self.pending.set(self.pending.get() - 1);
                self.run();
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn twenty_racing_admissions_against_a_budget_of_one_admit_exactly_one() {
        let s = FakeStore::new();
        let racy = Racy {
            inner: &s,
            pending: Cell::new(19),
            limits: keyed(&[lim(Metric::Requests, 1, MIN)]),
            admitted: Cell::new(0),
            refused: Cell::new(0),
        };
        racy.run();
        assert_eq!((racy.admitted.get(), racy.refused.get()), (1, 19));
        assert_eq!(remaining(&s, &racy.limits, T0), vec![0]);
    }

    #[test]
    fn racing_admissions_on_a_larger_budget_all_count() {
        let s = FakeStore::new();
        let racy = Racy {
            inner: &s,
            pending: Cell::new(29),
            limits: keyed(&[lim(Metric::InputTokens, 100, MIN)]),
            admitted: Cell::new(0),
            refused: Cell::new(0),
        };
        racy.run();
        assert_eq!(racy.admitted.get(), 30);
        assert_eq!(remaining(&s, &racy.limits, T0), vec![70]);
    }

    #[test]
    fn standings_report_remaining_reset_and_fraction() {
        let s = FakeStore::new();
        let ls = keyed(&[
            lim(Metric::Requests, 4, 1000),
            lim(Metric::InputTokens, 1000, MIN),
        ]);
        let st = standings(&s, &ls, T0).unwrap();
        assert_eq!(
            (st[0].remaining, st[0].reset_ms, st[0].used_fraction),
            (4, 0, 0.0)
        );
        assert!(s.is_empty(), "reading must not write");
        admit(&s, &ls, &input(250), T0).unwrap();
        let st = standings(&s, &ls, T0 + 100).unwrap();
        // 1 request (250 ms) with 100 ms refilled; 250 tokens (15 s) with 0.1 s refilled.
        assert_eq!(
            (st[0].remaining, st[0].reset_ms, st[0].used_fraction),
            (3, 150, 0.15)
        );
        assert_eq!((st[1].remaining, st[1].reset_ms), (751, 14_900));
        assert!((st[1].used_fraction - 14.9 / 60.0).abs() < 1e-12);
    }

    #[test]
    fn cost_limits_use_prices() {
        let p = Price {
            input_per_mtok: 2.5,
            output_per_mtok: 10.0,
            cached_input_per_mtok: 1.25,
        };
        assert_eq!(cost_micro_usd(&p, 1000, 0, 500), 7500);
        assert_eq!(cost_micro_usd(&p, 1000, 400, 500), 600 * 5 / 2 + 500 + 5000);
        assert_eq!(cost_micro_usd(&p, 1, 0, 0), 3, "fractions round up");
        assert_eq!(cost_micro_usd(&p, 0, 0, 0), 0);
        let bad = Price {
            input_per_mtok: -1.0,
            output_per_mtok: f64::NAN,
            cached_input_per_mtok: f64::INFINITY,
        };
        assert_eq!(cost_micro_usd(&bad, 100, 50, 100), 0);
        assert_eq!(cost_micro_usd(&p, u64::MAX, 0, u64::MAX), u64::MAX);

        let s = FakeStore::new();
        // $0.01 per day.
        let ls = keyed(&[lim(Metric::CostMicroUsd, 10_000, 24 * 60 * MIN)]);
        let d = Demand {
            requests: 1,
            input: 1000,
            output: 500,
            cost_micro_usd: cost_micro_usd(&p, 1000, 0, 500),
        };
        let r = reservations(admit(&s, &ls, &d, T0).unwrap());
        assert_eq!(r.len(), 1);
        assert_eq!(remaining(&s, &ls, T0), vec![2500]);
        assert!(!is_admitted(&admit(&s, &ls, &d, T0).unwrap()));
        let used = Demand {
            cost_micro_usd: cost_micro_usd(&p, 1000, 1000, 100),
            ..d
        };
        settle(&s, &r, &used, T0).unwrap();
        assert_eq!(remaining(&s, &ls, T0), vec![10_000 - 2250]);
        assert!(is_admitted(&admit(&s, &ls, &d, T0).unwrap()));
    }

    #[test]
    fn max_affordable_output_takes_the_tightest_bound() {
        let s = FakeStore::new();
        let p = Price {
            input_per_mtok: 2.0,
            output_per_mtok: 8.0,
            cached_input_per_mtok: 1.0,
        };
        let out = lim(Metric::OutputTokens, 1000, MIN);
        let total = lim(Metric::TotalTokens, 1500, MIN);
        let cost = lim(Metric::CostMicroUsd, 6000, MIN);
        let neutral = keyed(&[
            lim(Metric::Requests, 5, MIN),
            lim(Metric::InputTokens, 10, MIN),
        ]);
        assert_eq!(
            max_affordable_output(&s, &neutral, 800, Some(&p), T0).unwrap(),
            None
        );
        assert_eq!(
            max_affordable_output(&s, &keyed(&[out]), 800, None, T0).unwrap(),
            Some(1000)
        );
        assert_eq!(
            max_affordable_output(&s, &keyed(&[out, total]), 800, None, T0).unwrap(),
            Some(700)
        );
        // No price: a cost limit cannot bound output.
        assert_eq!(
            max_affordable_output(&s, &keyed(&[cost]), 800, None, T0).unwrap(),
            None
        );
        // 6000 - 800 * 2 = 4400 micro-USD left = 550 output tokens at 8.
        let all = keyed(&[out, total, cost]);
        assert_eq!(
            max_affordable_output(&s, &all, 800, Some(&p), T0).unwrap(),
            Some(550)
        );
        assert_eq!(
            max_affordable_output(&s, &all, 3000, Some(&p), T0).unwrap(),
            Some(0)
        );
        // Non-round price: the answer still fits exactly.
        let odd = Price {
            input_per_mtok: 0.3,
            output_per_mtok: 0.7,
            cached_input_per_mtok: 0.3,
        };
        let o = max_affordable_output(&s, &keyed(&[cost]), 777, Some(&odd), T0)
            .unwrap()
            .unwrap();
        assert!(
            cost_micro_usd(&odd, 777, 0, o) <= 6000 && cost_micro_usd(&odd, 777, 0, o + 1) > 6000,
            "{o}"
        );

        // After spending, the answer follows the remaining budget and is then admitted.
        admit(
            &s,
            &all,
            &Demand {
                output: 400,
                cost_micro_usd: 3000,
                ..Demand::default()
            },
            T0,
        )
        .unwrap();
        let o = max_affordable_output(&s, &all, 800, Some(&p), T0)
            .unwrap()
            .unwrap();
        // min(1000 - 400, 1500 - 400 - 800, (3000 - 1600) / 8)
        assert_eq!(o, 175);
        let d = Demand {
            requests: 1,
            input: 800,
            output: o,
            cost_micro_usd: cost_micro_usd(&p, 800, 0, o),
        };
        assert!(is_admitted(&admit(&s, &all, &d, T0).unwrap()));
    }

    #[test]
    fn huge_and_degenerate_numbers_never_panic() {
        let s = FakeStore::new();
        let p = Price {
            input_per_mtok: 1e300,
            output_per_mtok: 1e300,
            cached_input_per_mtok: 1e300,
        };
        let big = Demand {
            requests: u64::MAX,
            input: u64::MAX,
            output: u64::MAX,
            cost_micro_usd: u64::MAX,
        };
        let metrics = [
            Metric::Requests,
            Metric::InputTokens,
            Metric::OutputTokens,
            Metric::TotalTokens,
            Metric::CostMicroUsd,
        ];
        let mut ls = Vec::new();
        for (i, m) in metrics.into_iter().enumerate() {
            for (amount, window) in [
                (u64::MAX, u64::MAX),
                (1, u64::MAX),
                (u64::MAX, 1),
                (0, 1000),
                (5, 0),
                (0, 0),
            ] {
                ls.push((format!("k{i}:{amount}:{window}"), lim(m, amount, window)));
            }
        }
        for now in [0, 1, T0, u64::MAX / 1000, u64::MAX] {
            for d in [big, Demand::default(), input(1)] {
                if let Ok(Admission::Admitted { reservations, .. }) = admit(&s, &ls, &d, now) {
                    settle(&s, &reservations, &big, now).unwrap();
                }
                for l in &ls {
                    let one = core::slice::from_ref(l);
                    if let Admission::Admitted { reservations, .. } =
                        admit(&s, one, &d, now).unwrap()
                    {
                        settle(&s, &reservations, &Demand::default(), now).unwrap();
                        settle(&s, &reservations, &big, now).unwrap();
                    }
                }
                standings(&s, &ls, now).unwrap();
                max_affordable_output(&s, &ls, u64::MAX, Some(&p), now).unwrap();
            }
        }
        assert_eq!(
            Demand {
                input: u64::MAX,
                output: 2,
                ..Demand::default()
            }
            .of(Metric::TotalTokens),
            u64::MAX
        );

        // A zero budget refuses any non-zero demand; a zero window does not limit.
        let s = FakeStore::new();
        let zero = keyed(&[lim(Metric::InputTokens, 0, MIN)]);
        assert_eq!(retry(&admit(&s, &zero, &input(1), T0).unwrap()), MIN);
        assert!(is_admitted(&admit(&s, &zero, &input(0), T0).unwrap()));
        // A budget far finer than 1 µs per unit still charges every demand at least 1 µs.
        let fine = keyed(&[lim(Metric::CostMicroUsd, u64::MAX / 2, 1)]);
        let d = Demand {
            cost_micro_usd: 5,
            ..Demand::default()
        };
        for _ in 0..1000 {
            assert!(is_admitted(&admit(&s, &fine, &d, T0).unwrap()));
        }
        assert_eq!(retry(&admit(&s, &fine, &d, T0).unwrap()), 1);
        let instant = keyed(&[lim(Metric::InputTokens, 5, 0)]);
        for _ in 0..3 {
            assert!(is_admitted(&admit(&s, &instant, &input(100), T0).unwrap()));
        }
    }

    /// Fails every call on keys containing `bad`.
    struct Partial<'a> {
        inner: &'a FakeStore,
        bad: &'a str,
    }
    impl SharedStore for Partial<'_> {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            if key.contains(self.bad) {
                Err(StoreError::Host)
            } else {
                self.inner.get(key)
            }
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            if key.contains(self.bad) {
                Err(StoreError::Host)
            } else {
                self.inner.set(key, value, cas)
            }
        }
    }

    #[test]
    fn store_failures_are_errors_and_leave_nothing_charged() {
        let s = FakeStore::new();
        let ls = keyed(&[
            lim(Metric::Requests, 10, MIN),
            lim(Metric::InputTokens, 100, MIN),
        ]);
        let r = reservations(admit(&s, &ls, &input(10), T0).unwrap());
        s.broken.set(true);
        assert_eq!(admit(&s, &ls, &input(1), T0), Err(StoreError::Host));
        assert_eq!(settle(&s, &r, &input(20), T0), Err(StoreError::Host));
        assert_eq!(standings(&s, &ls, T0), Err(StoreError::Host));
        assert_eq!(
            max_affordable_output(
                &s,
                &keyed(&[lim(Metric::OutputTokens, 1, MIN)]),
                0,
                None,
                T0
            ),
            Err(StoreError::Host)
        );
        // Requests-only limits are not read for output bounds, so a broken store does not matter.
        assert_eq!(
            max_affordable_output(&s, &keyed(&[lim(Metric::Requests, 1, MIN)]), 0, None, T0),
            Ok(None)
        );
        s.broken.set(false);
        assert_eq!(remaining(&s, &ls, T0), vec![9, 90]);

        // The second limit's entry fails: the first one's reservation is undone.
        let partial = Partial {
            inner: &s,
            bad: "input_tokens",
        };
        assert_eq!(admit(&partial, &ls, &input(1), T0), Err(StoreError::Host));
        assert_eq!(remaining(&s, &ls, T0), vec![9, 90]);
        // Settle still applies what it can and reports the failure.
        assert_eq!(
            settle(&partial, &r, &input(10), T0),
            Ok(()),
            "unchanged demand writes nothing"
        );
        let r2 = vec![
            Reservation {
                reserved: 0,
                ..r[1].clone()
            },
            Reservation {
                reserved: 0,
                ..r[0].clone()
            },
        ];
        assert_eq!(settle(&partial, &r2, &input(10), T0), Err(StoreError::Host));
        assert_eq!(remaining(&s, &ls, T0), vec![8, 90]);
    }

    #[test]
    fn keys_are_bounded_distinct_and_change_with_the_limit() {
        let l = lim(Metric::InputTokens, 1000, MIN);
        assert_eq!(
            key("team-a", None, &l),
            "tollgate:q:team-a:*:input_tokens:60000:1000"
        );
        assert_eq!(
            key("team-a", Some("gpt-4o"), &l),
            "tollgate:q:team-a:gpt-4o:input_tokens:60000:1000"
        );
        assert_ne!(key("a", Some("*"), &l), key("a", None, &l));
        assert_ne!(key("a:b", None, &l), key("a", Some("b"), &l));
        assert_eq!(
            key("a:%*", None, &l),
            "tollgate:q:a%3A%25%2A:*:input_tokens:60000:1000"
        );
        assert_ne!(
            key("a", None, &l),
            key("a", None, &lim(Metric::OutputTokens, 1000, MIN))
        );
        assert_ne!(
            key("a", None, &l),
            key("a", None, &lim(Metric::InputTokens, 1000, 2 * MIN))
        );
        assert_ne!(
            key("a", None, &l),
            key("a", None, &lim(Metric::InputTokens, 999, MIN))
        );
        let names: Vec<_> = [
            Metric::Requests,
            Metric::InputTokens,
            Metric::OutputTokens,
            Metric::TotalTokens,
            Metric::CostMicroUsd,
        ]
        .iter()
        .map(|m| m.as_str())
        .collect();
        assert_eq!(
            names,
            [
                "requests",
                "input_tokens",
                "output_tokens",
                "total_tokens",
                "cost_usd"
            ]
        );
    }
}
