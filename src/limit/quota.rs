//! Per-consumer quotas: requests, tokens and cost over windows from seconds to days, enforced with
//! GCRA over Envoy shared data.
//!
//! Each limit is a "theoretical arrival time" (TAT, µs). A limit of `amount` per `window` is a
//! bucket that holds at most `amount` units and refills continuously at amount/window; n units
//! cost n*window/amount of time. The bucket's backlog is `max(tat, now) - now`; a demand is
//! admitted if backlog + min(cost, window) <= window, which moves the TAT by the full cost.
//!
//! All the limits of one consumer live in ONE shared-data entry (`tollgate:q:<consumer>`), because
//! every host call costs 1-2 µs: admitting a request against all its limits is one read and one
//! CAS write, settling it one read and one write, standings one read, however many limits apply.
//! The entry is a magic u64 then (slot, TAT) u64 pairs, little-endian. A slot identifies a limit
//! by (model scope, metric, window, amount), so a config change of one limit starts that limit
//! afresh while the others keep their state, and limits scoped to other models ride along
//! untouched. Anything else found under the key (foreign, older format, garbled) reads as empty,
//! i.e. all buckets full. Every write drops the records that have been full for an hour (a full
//! bucket and no record are the same state) and, beyond `MAX_RECORDS`, the fullest records of
//! limits the write does not use, so the entry holds the limits of the config (and of configs
//! changed within the hour) and nothing grows with time or traffic.
//! Slots are 64-bit FNV-1a digests, written here because every worker and every build must agree
//! on them (std's hashers promise no stability) and a cryptographic digest would cost more per
//! limit and request than the host call saved; among the few dozen slots of one consumer the odds
//! of a collision are about n^2 / 2^65.
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
//! - Concurrency: check-and-reserve is one CAS on the consumer's entry, across all its limits at
//!   once, so concurrent workers can never admit more estimated demand than any budget, and a
//!   refused request reserves nothing, not even for a moment (no request is refused by another's
//!   short-lived partial reservation). What can overshoot is only the settle step: admitted
//!   requests whose actual use exceeds their reservation (typically output tokens estimated low)
//!   are charged the excess afterwards. The overshoot is bounded by the sum of (actual - reserved)
//!   over the requests in flight at once, plus one over-budget request per full bucket (above);
//!   it is repaid as debt, never forgiven.
//! - Settling is accounted as of the admission: a charge or refund moves the TAT as if the actual
//!   cost had been reserved, so refill during a long stream counts, and a refund can never raise
//!   the bucket above full (a TAT in the past is just a full bucket). A record missing when a
//!   charge settles (its admission wrote nothing because it cost nothing in every limit, or the
//!   bucket was then full for an hour and dropped) is charged as of the settlement instead: the
//!   refill during that request is not credited, never more.
//!
//! Rounding: costs are floored to whole µs but at least 1 µs for a non-zero demand (so a huge
//! amount over a short window can never make demands free); `remaining` is a safe lower bound:
//! any demand up to it is admitted.

use crate::store::{encode_u64s, update, update_if, SharedStore, StoreError};
use serde::{Deserialize, Serialize};

/// First word of every entry this module writes.
const MAGIC: u64 = u64::from_le_bytes(*b"tgquota1");
/// A record whose bucket has been full this long is dropped on the next write: long enough for
/// any request admitted before to settle as of its admission.
const IDLE_US: u64 = 3_600 * 1_000_000;
/// Records kept beyond the limits a write uses (4 KiB): far more than a sane config has per
/// consumer, so only the leftovers of many config changes within the hour are ever dropped.
const MAX_RECORDS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub metric: Metric,
    pub amount: u64,
    pub window_ms: u64,
}

/// A limit and its record's id in the consumer's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    id: u64,
    limit: Limit,
}

/// The limits that apply to one request, all in the consumer's one entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    key: String,
    slots: Vec<Slot>,
}

impl Limits {
    /// `limits` with their model scope (None for consumer-wide ones), as `Config::limits_for`
    /// gives them. The consumer and model names must come from config so that the key space and
    /// the entries stay bounded.
    pub fn new<'a>(
        consumer: &str,
        limits: impl IntoIterator<Item = (Option<&'a str>, Limit)>,
    ) -> Self {
        Limits {
            key: key(consumer),
            slots: limits
                .into_iter()
                .map(|(scope, limit)| Slot {
                    id: slot_id(scope, &limit),
                    limit,
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = Limit> + '_ {
        self.slots.iter().map(|s| s.limit)
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Standing {
    pub limit: Limit,
    /// Units that are certainly admitted right now.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset_ms: u64,
    /// 0.0 (full bucket) ..= 1.0 (spent or in debt).
    pub used_fraction: f64,
}

/// What one admission reserved on one limit; `key` is the consumer's entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub key: String,
    pub limit: Limit,
    pub reserved: u64,
    slot: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// `standings` are taken after reserving.
    Admitted {
        reservations: Vec<Reservation>,
        standings: Vec<Standing>,
    },
    /// `limit` is the one with the longest wait; `standings` are those the refusal was read from
    /// (a refusal writes nothing).
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

/// A consumer's entry as read: (slot, TAT) records.
struct Entry(Vec<(u64, u64)>);

impl Entry {
    fn decode(bytes: Option<&[u8]>) -> Self {
        let b = bytes.unwrap_or_default();
        let mut words = b
            .chunks_exact(8)
            .map(|c| <[u8; 8]>::try_from(c).map_or(0, u64::from_le_bytes));
        if b.len() % 16 != 8 || words.next() != Some(MAGIC) {
            return Entry(Vec::new());
        }
        let mut records = Vec::with_capacity(b.len() / 16);
        while let (Some(id), Some(tat)) = (words.next(), words.next()) {
            records.push((id, tat));
        }
        Entry(records)
    }

    /// A slot found twice (never written so) counts its latest TAT: the safe side.
    fn get(&self, id: u64) -> Option<u64> {
        self.0.iter().filter(|r| r.0 == id).map(|r| r.1).max()
    }

    fn tat(&self, id: u64) -> u64 {
        self.get(id).unwrap_or(0)
    }

    fn set(&mut self, id: u64, tat: u64) {
        self.0.retain(|r| r.0 != id);
        self.0.push((id, tat));
    }

    /// `used`: whether this write uses a slot (those are kept whatever the size).
    fn encode(mut self, now: u64, used: impl Fn(u64) -> bool) -> Vec<u8> {
        self.0.retain(|r| r.1.saturating_add(IDLE_US) > now);
        if self.0.len() > MAX_RECORDS {
            // Unused slots first, the fullest buckets (earliest TAT) first among them.
            self.0.sort_unstable_by_key(|r| (used(r.0), r.1));
            let unused = self.0.iter().take_while(|r| !used(r.0)).count();
            self.0.drain(..(self.0.len() - MAX_RECORDS).min(unused));
        }
        let mut words = Vec::with_capacity(1 + 2 * self.0.len());
        words.push(MAGIC);
        for (id, tat) in self.0 {
            words.extend([id, tat]);
        }
        encode_u64s(&words)
    }
}

/// The budgets of one request's limits as read from the consumer's entry.
pub struct Budgets<'a> {
    slots: &'a [Slot],
    tats: Vec<u64>,
    now: u64,
}

impl<'a> Budgets<'a> {
    fn read(slots: &'a [Slot], entry: &Entry, now: u64) -> Self {
        Budgets {
            slots,
            tats: slots.iter().map(|s| entry.tat(s.id)).collect(),
            now,
        }
    }

    fn each(&self) -> impl Iterator<Item = (Limit, u64)> + '_ {
        self.slots
            .iter()
            .map(|s| s.limit)
            .zip(self.tats.iter().copied())
    }

    pub fn standings(&self) -> Vec<Standing> {
        self.each()
            .map(|(l, tat)| Bucket::of(&l).standing(l, tat, self.now))
            .collect()
    }

    /// See [`max_affordable_output`].
    pub fn max_affordable_output(&self, input: u64, price: Option<&Price>) -> Option<u64> {
        let mut best: Option<u64> = None;
        for (limit, tat) in self.each() {
            let Some(cost_price) = bounds_output(&limit, price) else {
                continue;
            };
            let rem = Bucket::of(&limit).standing(limit, tat, self.now).remaining;
            let o = match (limit.metric, cost_price) {
                (Metric::TotalTokens, _) => rem.saturating_sub(input),
                (Metric::CostMicroUsd, Some(p)) => affordable_by_cost(p, rem, input),
                _ => rem,
            };
            best = Some(best.map_or(o, |b| b.min(o)));
        }
        best
    }
}

/// Some if `limit` bounds output tokens, with the price a cost limit does it through.
fn bounds_output<'p>(limit: &Limit, price: Option<&'p Price>) -> Option<Option<&'p Price>> {
    let cost_price = price.filter(|p| rate(p.output_per_mtok) > 0.0);
    match (limit.metric, cost_price) {
        (Metric::OutputTokens | Metric::TotalTokens, _) | (Metric::CostMicroUsd, Some(_)) => {
            Some(cost_price)
        }
        _ => None,
    }
}

/// Checks and reserves `demand` against every limit at once: one read and, unless refused or free,
/// one CAS write of the consumer's entry (retried on conflicts, bounded). A refused request costs
/// nothing.
pub fn admit<S: SharedStore + ?Sized>(
    store: &S,
    limits: &Limits,
    demand: &Demand,
    now_ms: u64,
) -> Result<Admission, StoreError> {
    admit_with(store, limits, now_ms, |_| (*demand, ())).map(|(a, ())| a)
}

/// [`admit`] with a demand chosen from the budgets it is checked against (e.g. max_tokens lowered
/// to what they afford), in the same read. `demand` runs again on each CAS retry; its last
/// output is returned.
pub fn admit_with<S, T, F>(
    store: &S,
    limits: &Limits,
    now_ms: u64,
    mut demand: F,
) -> Result<(Admission, T), StoreError>
where
    S: SharedStore + ?Sized,
    F: FnMut(&Budgets<'_>) -> (Demand, T),
{
    let now = now_us(now_ms);
    if limits.is_empty() {
        let (_, out) = demand(&Budgets::read(&[], &Entry(Vec::new()), now));
        let none = Admission::Admitted {
            reservations: Vec::new(),
            standings: Vec::new(),
        };
        return Ok((none, out));
    }
    update_if(store, &limits.key, |cur| {
        let mut entry = Entry::decode(cur);
        let budgets = Budgets::read(&limits.slots, &entry, now);
        let (d, out) = demand(&budgets);
        // In order, so a limit listed twice is charged twice, as two requests would be.
        let mut after = Vec::with_capacity(limits.len());
        let mut costly = false;
        for s in &limits.slots {
            let b = Bucket::of(&s.limit);
            let n = d.of(s.limit.metric);
            match b.admit(entry.tat(s.id), now, n) {
                Ok(tat) => {
                    // Free limits are written too (at `now` if the bucket was full), so that a
                    // charge at settlement counts from this admission.
                    costly |= b.cost(n) > 0;
                    entry.set(s.id, tat);
                    after.push(tat);
                }
                Err(wait) => return (None, (rejection(&budgets, &d, (wait, s.limit)), out)),
            }
        }
        let standings = limits
            .slots
            .iter()
            .zip(&after)
            .map(|(s, &tat)| Bucket::of(&s.limit).standing(s.limit, tat, now))
            .collect();
        let reservations = limits
            .slots
            .iter()
            .map(|s| Reservation {
                key: limits.key.clone(),
                limit: s.limit,
                reserved: d.of(s.limit.metric),
                slot: s.id,
            })
            .collect();
        // Zero-cost admissions write nothing, hence meet no CAS contention.
        let write = costly.then(|| entry.encode(now, |id| limits.slots.iter().any(|s| s.id == id)));
        let admitted = Admission::Admitted {
            reservations,
            standings,
        };
        (write, (admitted, out))
    })
    .map(|(out, _)| out)
}

/// The refusal: the longest wait over all limits (so a retry is not refused by the next limit),
/// and standings, from the state read.
fn rejection(budgets: &Budgets<'_>, demand: &Demand, mut worst: (u64, Limit)) -> Admission {
    for (limit, tat) in budgets.each() {
        if let Err(w) = Bucket::of(&limit).admit(tat, budgets.now, demand.of(limit.metric)) {
            if w > worst.0 {
                worst = (w, limit);
            }
        }
    }
    Admission::Rejected {
        retry_after_ms: ms_up(worst.0).max(1),
        limit: worst.1,
        standings: budgets.standings(),
    }
}

/// Settles reservations against the actual demand (the estimate was `reserved`). Call exactly
/// once. One read and one write per consumer entry (one in practice), none if nothing changed.
/// Every entry is attempted; the first store error is returned.
pub fn settle<S: SharedStore + ?Sized>(
    store: &S,
    reservations: &[Reservation],
    actual: &Demand,
    now_ms: u64,
) -> Result<(), StoreError> {
    let now = now_us(now_ms);
    let mut result = Ok(());
    let mut done: Vec<&str> = Vec::new();
    for first in reservations {
        if done.contains(&first.key.as_str()) {
            continue;
        }
        done.push(&first.key);
        // (slot, plus, minus) µs for the entry's reservations whose cost changed.
        let moves: Vec<(u64, u64, u64)> = reservations
            .iter()
            .filter(|r| r.key == first.key)
            .filter_map(|r| {
                let b = Bucket::of(&r.limit);
                let (was, is) = (b.cost(r.reserved), b.cost(actual.of(r.limit.metric)));
                (was != is).then_some((r.slot, is.saturating_sub(was), was.saturating_sub(is)))
            })
            .collect();
        if moves.is_empty() {
            continue;
        }
        let moved = update(store, &first.key, |cur| {
            let mut entry = Entry::decode(cur);
            for &(slot, plus, minus) in &moves {
                match entry.get(slot) {
                    Some(tat) => entry.set(slot, tat.saturating_add(plus).saturating_sub(minus)),
                    // See the module doc: charged as of now. A refund on a full bucket is moot.
                    None if plus > 0 => entry.set(slot, now.saturating_add(plus)),
                    None => {}
                }
            }
            let used = |id| moves.iter().any(|m| m.0 == id);
            (entry.encode(now, used), ())
        });
        if result.is_ok() {
            result = moved.map(|_| ());
        }
    }
    result
}

/// Current standing without changing anything (for rate-limit headers and gauges): one read.
pub fn standings<S: SharedStore + ?Sized>(
    store: &S,
    limits: &Limits,
    now_ms: u64,
) -> Result<Vec<Standing>, StoreError> {
    if limits.is_empty() {
        return Ok(Vec::new());
    }
    let entry = Entry::decode(store.get(&limits.key)?.0.as_deref());
    Ok(Budgets::read(&limits.slots, &entry, now_us(now_ms)).standings())
}

/// Largest output-token count the OutputTokens/TotalTokens/Cost limits still allow right now for
/// a request with this input and price (None if no output-bounding limit applies, and then
/// nothing is read). For "lower max_tokens instead of refusing". Based on `remaining`, so the
/// answer is admitted if asked at once. Cost limits bound output only with a price whose output
/// price is positive; the input is priced as uncached (the cache is not known before the
/// response).
pub fn max_affordable_output<S: SharedStore + ?Sized>(
    store: &S,
    limits: &Limits,
    input: u64,
    price: Option<&Price>,
    now_ms: u64,
) -> Result<Option<u64>, StoreError> {
    if !limits.iter().any(|l| bounds_output(&l, price).is_some()) {
        return Ok(None);
    }
    let entry = Entry::decode(store.get(&limits.key)?.0.as_deref());
    Ok(Budgets::read(&limits.slots, &entry, now_us(now_ms)).max_affordable_output(input, price))
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

/// The shared-data key of a consumer's entry. '%', ':' and '*' are escaped as in the per-limit
/// keys of earlier versions, so this key never equals one of those (they have a ':' after the
/// consumer).
fn key(consumer: &str) -> String {
    let mut k = String::with_capacity(11 + consumer.len());
    k.push_str("tollgate:q:");
    escape_into(&mut k, consumer);
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

/// The record id of a limit: FNV-1a over an unambiguous encoding of (scope, metric, window,
/// amount). See the module doc for why by hand.
fn slot_id(scope: Option<&str>, l: &Limit) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    match scope {
        None => eat(&[0]),
        Some(m) => {
            eat(&[1]);
            eat(&(m.len() as u64).to_le_bytes());
            eat(m.as_bytes());
        }
    }
    eat(l.metric.as_str().as_bytes());
    eat(&[0]);
    eat(&l.window_ms.to_le_bytes());
    eat(&l.amount.to_le_bytes());
    h
}

#[cfg(test)]
pub(crate) mod tests {
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
    fn keyed(ls: &[Limit]) -> Limits {
        Limits::new("team-a", ls.iter().map(|l| (None, *l)))
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
    fn remaining(s: &FakeStore, ls: &Limits, now: u64) -> Vec<u64> {
        standings(s, ls, now)
            .unwrap()
            .iter()
            .map(|s| s.remaining)
            .collect()
    }

    #[test]
    fn spent_budget_is_refused_until_exactly_the_retry_after() {
        let s = FakeStore::new();
        let l = lim(Metric::InputTokens, 1000, MIN);
        let ls = keyed(&[l]);
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
                assert_eq!(*limit, l);
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
        let l = lim(Metric::OutputTokens, 1000, MIN);
        let ls = keyed(&[l]);
        let out = |n| Demand {
            output: n,
            ..Demand::default()
        };
        let r = reservations(admit(&s, &ls, &out(500), T0).unwrap());
        assert_eq!(
            r,
            vec![Reservation {
                key: "tollgate:q:team-a".into(),
                limit: l,
                reserved: 500,
                slot: slot_id(None, &l),
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
    fn refusal_by_a_later_limit_charges_nothing_and_names_the_longest_wait() {
        let s = FakeStore::new();
        let l = [
            lim(Metric::Requests, 10, MIN),
            lim(Metric::InputTokens, 100, MIN),
            lim(Metric::TotalTokens, 100, 10 * MIN),
        ];
        let ls = keyed(&l);
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
                assert_eq!(*limit, l[2]);
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
        limits: Limits,
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
        let mut raw = Vec::new();
        for m in metrics {
            for (amount, window) in [
                (u64::MAX, u64::MAX),
                (1, u64::MAX),
                (u64::MAX, 1),
                (0, 1000),
                (5, 0),
                (0, 0),
            ] {
                raw.push(lim(m, amount, window));
            }
        }
        let ls = Limits::new("k", raw.iter().map(|l| (None, *l)));
        for now in [0, 1, T0, u64::MAX / 1000, u64::MAX] {
            for d in [big, Demand::default(), input(1)] {
                if let Ok(Admission::Admitted { reservations, .. }) = admit(&s, &ls, &d, now) {
                    settle(&s, &reservations, &big, now).unwrap();
                }
                for l in &raw {
                    let one = &Limits::new("k", [(None, *l)]);
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

        // One consumer's entry fails: settlement still applies the other's and reports the failure.
        let lb = Limits::new("team-b", [(None, lim(Metric::Requests, 10, MIN))]);
        let rb = reservations(admit(&s, &lb, &input(0), T0).unwrap());
        let partial = Partial {
            inner: &s,
            bad: "team-b",
        };
        assert_eq!(admit(&partial, &lb, &input(0), T0), Err(StoreError::Host));
        assert_eq!(
            settle(&partial, &[rb.clone(), r.clone()].concat(), &input(10), T0),
            Ok(()),
            "unchanged demand writes nothing"
        );
        let zero = |rs: &[Reservation]| -> Vec<Reservation> {
            rs.iter()
                .map(|r| Reservation {
                    reserved: 0,
                    ..r.clone()
                })
                .collect()
        };
        let both = [zero(&rb), zero(&r)].concat();
        assert_eq!(
            settle(&partial, &both, &input(10), T0),
            Err(StoreError::Host)
        );
        assert_eq!(remaining(&s, &ls, T0), vec![8, 80]);
        assert_eq!(remaining(&s, &lb, T0), vec![9]);
    }

    #[test]
    fn keys_are_bounded_and_distinct_and_slots_change_with_the_limit() {
        assert_eq!(key("team-a"), "tollgate:q:team-a");
        assert_eq!(key("a:%*"), "tollgate:q:a%3A%25%2A");
        assert_ne!(key("a:b"), key("a%3Ab"));
        let l = lim(Metric::InputTokens, 1000, MIN);
        // Pinned: every worker and every build must compute the same slots.
        assert_eq!(slot_id(None, &l), PINNED_SLOT);
        let ids = [
            slot_id(None, &l),
            slot_id(Some("*"), &l),
            slot_id(Some(""), &l),
            slot_id(Some("gpt-4o"), &l),
            slot_id(None, &lim(Metric::OutputTokens, 1000, MIN)),
            slot_id(None, &lim(Metric::InputTokens, 1000, 2 * MIN)),
            slot_id(None, &lim(Metric::InputTokens, 999, MIN)),
            slot_id(Some("gpt-4o"), &lim(Metric::InputTokens, 999, MIN)),
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
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

    /// FNV-1a 64 of [0] "input_tokens" [0] 60000u64le 1000u64le, computed outside Rust.
    const PINNED_SLOT: u64 = 4_420_540_828_684_450_651;

    /// Counts the host calls that reach the store.
    pub(crate) struct Counting<'a> {
        inner: &'a FakeStore,
        gets: Cell<u32>,
        sets: Cell<u32>,
    }
    impl<'a> Counting<'a> {
        pub(crate) fn new(inner: &'a FakeStore) -> Self {
            Counting {
                inner,
                gets: Cell::new(0),
                sets: Cell::new(0),
            }
        }
        /// (gets, sets) since the last call.
        pub(crate) fn take(&self) -> (u32, u32) {
            (self.gets.replace(0), self.sets.replace(0))
        }
    }
    impl SharedStore for Counting<'_> {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            self.gets.set(self.gets.get() + 1);
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            self.sets.set(self.sets.get() + 1);
            self.inner.set(key, value, cas)
        }
    }

    fn records(s: &FakeStore, consumer: &str) -> Vec<(u64, u64)> {
        Entry::decode(s.get(&key(consumer)).unwrap().0.as_deref()).0
    }

    #[test]
    fn all_limits_are_admitted_or_refused_in_one_read_and_one_write() {
        let s = FakeStore::new();
        let c = Counting::new(&s);
        let ls = keyed(&[
            lim(Metric::Requests, 3, MIN),
            lim(Metric::InputTokens, 100, MIN),
        ]);
        let r = reservations(admit(&c, &ls, &input(40), T0).unwrap());
        assert_eq!(c.take(), (1, 1));
        assert_eq!(s.keys(), vec!["tollgate:q:team-a"]);
        assert_eq!(records(&s, "team-a").len(), 2);
        assert_eq!(remaining(&s, &ls, T0), vec![2, 60]);
        assert_eq!(c.take(), (0, 0));

        settle(&c, &r, &input(50), T0).unwrap();
        assert_eq!(c.take(), (1, 1), "settlement");
        assert_eq!(remaining(&s, &ls, T0), vec![2, 50]);
        settle(&c, &r, &input(40), T0).unwrap();
        assert_eq!(c.take(), (0, 0), "nothing to settle");

        standings(&c, &ls, T0).unwrap();
        assert_eq!(c.take(), (1, 0), "standings");

        // The requests limit would admit, the tokens one refuses: neither is charged, nothing is
        // written.
        assert!(!is_admitted(&admit(&c, &ls, &input(60), T0).unwrap()));
        assert_eq!(c.take(), (1, 0), "refusal");
        assert_eq!(remaining(&s, &ls, T0), vec![2, 50]);
        // The other way round: tokens admit, requests refuse.
        assert!(is_admitted(&admit(&c, &ls, &input(10), T0).unwrap()));
        assert!(is_admitted(&admit(&c, &ls, &input(10), T0).unwrap()));
        c.take();
        assert!(!is_admitted(&admit(&c, &ls, &input(10), T0).unwrap()));
        assert_eq!(c.take(), (1, 0));
        assert_eq!(remaining(&s, &ls, T0), vec![0, 30]);

        // Conflicts: each costs one more read and write, and nothing is counted twice.
        s.inject_conflicts.set(3);
        let r = reservations(admit(&c, &ls, &input(0), T0 + MIN).unwrap());
        assert_eq!(c.take(), (4, 4));
        s.inject_conflicts.set(2);
        settle(&c, &r, &input(5), T0 + MIN).unwrap();
        assert_eq!(c.take(), (3, 3));
        assert_eq!(remaining(&s, &ls, T0 + MIN), vec![2, 95]);
    }

    #[test]
    fn workers_racing_on_two_limits_never_overshoot_either() {
        let s = FakeStore::new();
        let ls = keyed(&[
            lim(Metric::Requests, 7, 60 * MIN),
            lim(Metric::InputTokens, 1000, 60 * MIN),
        ]);
        let racy = Racy {
            inner: &s,
            pending: Cell::new(29),
            limits: ls.clone(),
            admitted: Cell::new(0),
            refused: Cell::new(0),
        };
        racy.run();
        assert_eq!((racy.admitted.get(), racy.refused.get()), (7, 23));
        assert_eq!(remaining(&s, &ls, T0), vec![0, 993]);

        // Two workers alternating under injected conflicts, with a token limit that binds first.
        let s = FakeStore::new();
        let ls = keyed(&[
            lim(Metric::Requests, 100, 60 * MIN),
            lim(Metric::InputTokens, 500, 60 * MIN),
        ]);
        let mut admitted = 0;
        for i in 0..100 {
            s.inject_conflicts.set(u32::try_from(i % 4).unwrap());
            if is_admitted(&admit(&s, &ls, &input(10), T0 + i).unwrap()) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 50);
        // 50 requests in, 50 refused by tokens without being charged on requests.
        assert_eq!(remaining(&s, &ls, T0 + 100), vec![50, 0]);
    }

    #[test]
    fn a_changed_limit_starts_afresh_and_the_others_keep_their_state() {
        let s = FakeStore::new();
        let req = lim(Metric::Requests, 10, MIN);
        let before = keyed(&[req, lim(Metric::InputTokens, 100, MIN)]);
        admit(&s, &before, &input(80), T0).unwrap();
        assert_eq!(remaining(&s, &before, T0), vec![9, 20]);
        let after = keyed(&[req, lim(Metric::InputTokens, 200, MIN)]);
        assert_eq!(remaining(&s, &after, T0), vec![9, 200]);
        admit(&s, &after, &input(50), T0).unwrap();
        assert_eq!(remaining(&s, &after, T0), vec![8, 150]);
        // The old limit's record is still there, untouched, until it has been full for an hour.
        assert_eq!(remaining(&s, &before, T0), vec![8, 20]);
        assert_eq!(records(&s, "team-a").len(), 3);
        admit(&s, &after, &input(0), T0 + 61 * MIN).unwrap();
        assert_eq!(records(&s, "team-a").len(), 2);
    }

    #[test]
    fn limits_of_other_models_ride_along_untouched() {
        let s = FakeStore::new();
        let req = lim(Metric::Requests, 100, MIN);
        let tok = lim(Metric::InputTokens, 1000, MIN);
        let gpt = Limits::new("team-a", [(None, req), (Some("gpt-4o"), tok)]);
        let claude = Limits::new("team-a", [(None, req), (Some("claude"), tok)]);
        admit(&s, &gpt, &input(300), T0).unwrap();
        for _ in 0..3 {
            admit(&s, &claude, &input(200), T0).unwrap();
        }
        let r = reservations(admit(&s, &claude, &input(100), T0).unwrap());
        settle(&s, &r, &input(50), T0).unwrap();
        assert_eq!(remaining(&s, &gpt, T0), vec![95, 700]);
        assert_eq!(remaining(&s, &claude, T0), vec![95, 350]);
        // A consumer-wide limit and a model-scoped one with the same numbers are distinct.
        let wide = Limits::new("team-a", [(None, tok)]);
        assert_eq!(remaining(&s, &wide, T0), vec![1000]);
        assert_eq!(records(&s, "team-a").len(), 3);
    }

    #[test]
    fn anything_else_found_under_the_key_reads_as_empty() {
        let ls = keyed(&[
            lim(Metric::Requests, 10, MIN),
            lim(Metric::InputTokens, 100, MIN),
        ]);
        let magic = MAGIC.to_le_bytes();
        let slot = slot_id(None, &lim(Metric::Requests, 10, MIN)).to_le_bytes();
        let future = (T0 * 1000 + 3_600_000_000).to_le_bytes();
        let garbage: Vec<Vec<u8>> = vec![
            vec![],
            vec![0xff],
            // An earlier version's per-limit TAT, far in the future.
            future.to_vec(),
            [&future[..], &future[..], &future[..]].concat(),
            // The right magic with a torn record.
            [&magic[..], &slot[..], &future[..4]].concat(),
            [&magic[..], &slot[..]].concat(),
            // A record behind the wrong magic.
            [&future[..], &slot[..], &future[..]].concat(),
            b"{\"requests\": 3}".to_vec(),
            (0..=255).collect(),
        ];
        for g in garbage {
            let s = FakeStore::new();
            s.set(&key("team-a"), &g, None).unwrap();
            assert_eq!(remaining(&s, &ls, T0), vec![10, 100], "{g:?}");
            assert_eq!(
                max_affordable_output(&s, &keyed(&[lim(Metric::TotalTokens, 9, MIN)]), 0, None, T0),
                Ok(Some(9))
            );
            let r = reservations(admit(&s, &ls, &input(10), T0).unwrap());
            settle(&s, &r, &input(20), T0).unwrap();
            assert_eq!(remaining(&s, &ls, T0), vec![9, 80], "{g:?}");
            assert_eq!(records(&s, "team-a").len(), 2);
        }
        // The same record written twice counts its latest TAT.
        let s = FakeStore::new();
        let later = (T0 * 1000 + 30_000_000).to_le_bytes();
        let sooner = (T0 * 1000 + 6_000_000).to_le_bytes();
        let twice = [&magic[..], &slot[..], &sooner[..], &slot[..], &later[..]].concat();
        s.set(&key("team-a"), &twice, None).unwrap();
        assert_eq!(remaining(&s, &ls, T0), vec![5, 100]);
        admit(&s, &ls, &input(0), T0).unwrap();
        assert_eq!(remaining(&s, &ls, T0), vec![4, 100]);
        assert_eq!(records(&s, "team-a").len(), 2);
    }

    #[test]
    fn the_entry_stays_bounded_and_keeps_the_limits_in_use() {
        let s = FakeStore::new();
        // 400 config changes within the hour, each leaving a record in debt.
        for amount in 1..=400 {
            let ls = keyed(&[lim(Metric::InputTokens, amount, MIN)]);
            assert!(is_admitted(&admit(&s, &ls, &input(amount), T0).unwrap()));
            assert_eq!(remaining(&s, &ls, T0), vec![0]);
        }
        assert_eq!(records(&s, "team-a").len(), MAX_RECORDS);
        // A write with more limits in use than that keeps them all.
        let many: Vec<Limit> = (1..=300)
            .map(|a| lim(Metric::OutputTokens, a, MIN))
            .collect();
        let ls = keyed(&many);
        let d = Demand {
            output: 1,
            ..Demand::default()
        };
        assert!(is_admitted(&admit(&s, &ls, &d, T0).unwrap()));
        assert_eq!(records(&s, "team-a").len(), 300);
        assert_eq!(remaining(&s, &ls, T0)[299], 299);
        // An hour after every bucket is full again, one write clears them.
        let one = keyed(&[lim(Metric::Requests, 1, MIN)]);
        admit(&s, &one, &input(0), T0 + 62 * MIN).unwrap();
        assert_eq!(records(&s, "team-a").len(), 1);
        assert_eq!(s.get(&key("team-a")).unwrap().0.unwrap().len(), 24);
    }

    #[test]
    fn a_charge_on_a_missing_record_counts_from_the_settlement() {
        let s = FakeStore::new();
        let ls = keyed(&[lim(Metric::OutputTokens, 1000, MIN)]);
        // Free everywhere: nothing written.
        let r = reservations(admit(&s, &ls, &Demand::default(), T0).unwrap());
        assert!(s.is_empty());
        settle(
            &s,
            &r,
            &Demand {
                output: 500,
                ..Demand::default()
            },
            T0 + 10_000,
        )
        .unwrap();
        assert_eq!(remaining(&s, &ls, T0 + 10_000), vec![500]);
        // A refund on a full bucket leaves it full.
        let s = FakeStore::new();
        let r = reservations(
            admit(
                &s,
                &ls,
                &Demand {
                    output: 500,
                    ..Demand::default()
                },
                T0,
            )
            .unwrap(),
        );
        settle(&s, &r, &Demand::default(), T0 + 2 * 60 * MIN).unwrap();
        assert_eq!(remaining(&s, &ls, T0 + 2 * 60 * MIN), vec![1000]);
        // A limit free in this request but written with the others is charged as of the admission.
        let s = FakeStore::new();
        let both = keyed(&[
            lim(Metric::Requests, 10, MIN),
            lim(Metric::OutputTokens, 1000, MIN),
        ]);
        let r = reservations(admit(&s, &both, &input(0), T0).unwrap());
        settle(
            &s,
            &r,
            &Demand {
                requests: 1,
                output: 500,
                ..Demand::default()
            },
            T0 + 10_000,
        )
        .unwrap();
        // 10 s of refill credited: 500 tokens cost 30 s, 20 s of them left.
        assert_eq!(remaining(&s, &both, T0 + 10_000), vec![10, 666]);
    }
}
