//! Choosing a provider key for one upstream attempt: round robin, weighted, sticky or prompt
//! affinity, global across Envoy workers (the rotation counter lives in shared data), skipping keys
//! that are cooling down or disabled, and keys at their limit of requests in flight.
//!
//! A key on probation (`failover::health`) weighs `share_percent` % of a full key in every rotation:
//! - round robin and weighted: while a key is on probation, each ticket is placed by its golden-ratio
//!   multiple among the keys' weights (a Weyl sequence: consecutive tickets land far apart, so the
//!   shares hold within a few picks); otherwise the exact rotation as before;
//! - sticky: a consumer whose key is on probation keeps it with probability `share_percent` (a
//!   stable hash of consumer and key), else takes the next key in order;
//! - prompt affinity: the key's weight in the rendezvous hashing.
//!
//! Prompt affinity is weighted rendezvous hashing (highest random weight): each healthy key scores
//! `weight / -ln(u)`, `u` a stable hash of the request's leading prompt and the key id, and the
//! request goes to the highest score, so a key that comes or goes moves only the prefixes that now
//! score highest on it. A bounded load keeps each key's share in check when a few prefixes carry
//! most of the traffic: a worker moves a prefix to the next key in its order when the first has taken
//! more than [`LOAD_FACTOR`] × its fair share of that worker's recent picks, the last
//! [`LOAD_WINDOW_PER_KEY`] × (healthy keys) of them, at most [`LOAD_WINDOW_MAX`] (consistent hashing
//! with bounded loads, Mirrokni, Thorup and Zadimoghaddam, 2018). So in any window of that many
//! consecutive picks of one worker, a key takes at most `ceil(LOAD_FACTOR × its share × window)`.
//! The window grows with the keys so that traffic spread evenly over many prefixes, whose counts
//! wander around the fair share, stays far from the bound (7 standard deviations with 3 keys):
//! only prefixes that really carry more than their share move.
//!
//! The Weyl placement and the rendezvous score are a few lines of arithmetic over library hashes
//! (XXH3); no crate offers either for a caller's own weights and keys.

use crate::config::{Provider, Rotation};
use crate::failover::health::{fnv1a, ProviderHealth};
use crate::store::{add_u64s, SharedStore, StoreError};
use std::collections::VecDeque;
use xxhash_rust::xxh3::xxh3_64_with_seed;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Key(usize),
    /// Every key is cooling down: the first is back at `retry_at_ms`.
    Exhausted {
        retry_at_ms: u64,
    },
    /// Every key not cooling down is at its limit of requests in flight: one is free as soon as
    /// one of its requests ends.
    AtLimit,
}

pub fn counter_key(provider: &str) -> String {
    format!("tollgate:rr:{provider}")
}

/// Round-robin tickets taken from the shared counter in blocks of this many: one CAS per block
/// instead of per attempt. Rotation is then global across workers within a few attempts.
pub const TICKET_BLOCK: u64 = 4;

/// Bounded load of prompt affinity: a key may take up to this many times its fair share of a
/// worker's recent picks (as numerator, denominator: 1.5). Looser than the 1.25 usual for caches
/// of many small items: a gateway may see only a few dozen prefixes, which rendezvous hashing
/// splits unevenly by chance (14, 9 and 7 of 30 in the end-to-end test), and a tighter bound would
/// keep moving such a key's prefixes back and forth.
pub const LOAD_FACTOR: (u64, u64) = (3, 2);
/// The recent picks are the worker's last this many per healthy key of the provider ...
pub const LOAD_WINDOW_PER_KEY: usize = 128;
/// ... and at most this many.
pub const LOAD_WINDOW_MAX: usize = 2048;

/// The bounded-load window for a pool of `healthy` keys.
pub fn load_window(healthy: usize) -> usize {
    (LOAD_WINDOW_PER_KEY * healthy.max(1)).min(LOAD_WINDOW_MAX)
}

/// A worker's recent prompt-affinity picks for one provider: the keys' id hashes (so a
/// configuration change keeps them apart), oldest first, and how many each has.
#[derive(Debug, Default)]
struct Recent {
    picks: VecDeque<u64>,
    counts: Vec<(u64, u32)>,
    /// The healthy keys the picks were made among (a sum of their id hashes).
    among: u64,
}

impl Recent {
    /// Picks made among other healthy keys say nothing of the shares now (a key back from a
    /// cooldown would find the others over their bounds, and their prefixes would move): the
    /// window starts again when the healthy keys change.
    fn among(&mut self, order: &[Ranked]) {
        let among = order
            .iter()
            .fold(0u64, |acc, r| acc.wrapping_add(r.id_hash));
        if among != self.among {
            self.picks.clear();
            self.counts.clear();
            self.among = among;
        }
    }

    fn count(&self, id_hash: u64) -> u32 {
        self.counts
            .iter()
            .find(|(h, _)| *h == id_hash)
            .map_or(0, |(_, n)| *n)
    }

    /// Adds a pick, keeping the last `keep`.
    fn push(&mut self, id_hash: u64, keep: usize) {
        while self.picks.len() >= keep.max(1) {
            let Some(old) = self.picks.pop_front() else {
                break;
            };
            if let Some(i) = self.counts.iter().position(|(h, _)| *h == old) {
                if let Some((_, n)) = self.counts.get_mut(i) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.counts.swap_remove(i);
                    }
                }
            }
        }
        self.picks.push_back(id_hash);
        match self.counts.iter_mut().find(|(h, _)| *h == id_hash) {
            Some((_, n)) => *n += 1,
            None => self.counts.push((id_hash, 1)),
        }
    }
}

/// A worker's rotation state, by provider: blocks of round-robin tickets, and its recent
/// prompt-affinity picks.
#[derive(Debug, Default)]
pub struct Tickets {
    blocks: crate::maps::HashMap<String, (u64, u64)>,
    recent: crate::maps::HashMap<String, Recent>,
}

impl Tickets {
    /// The next ticket for `provider`: from this worker's block, or a new block from the counter.
    pub fn take<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        provider: &str,
    ) -> Result<u64, StoreError> {
        if let Some((next, end)) = self.blocks.get_mut(provider) {
            if *next < *end {
                *next += 1;
                return Ok(*next - 1);
            }
        }
        let ([end], _) = add_u64s(store, &counter_key(provider), [TICKET_BLOCK])?;
        let first = end.wrapping_sub(TICKET_BLOCK);
        self.blocks
            .insert(provider.to_string(), (first.wrapping_add(1), end));
        Ok(first)
    }

    fn recent(&mut self, provider: &str) -> &mut Recent {
        self.recent.entry_ref(provider).or_default()
    }
}

/// What the request brings to the choice.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ask<'a> {
    /// The consumer's name or session id (`sticky` rotation).
    pub sticky: Option<&'a str>,
    /// The hash of the request's leading prompt (`prompt_affinity`; None: round robin).
    pub prefix: Option<u64>,
    /// Keys at their limit of requests in flight, by index (empty: none): skipped as a cooling
    /// key is.
    pub full: &'a [bool],
}

/// A key's weight in the choice: 100 per unit of its configured weight (which only `weighted` and
/// `prompt_affinity` read), `share_percent` per unit while it is on probation.
fn weight(provider: &Provider, health: &ProviderHealth, i: usize) -> u64 {
    let unit = match provider.rotation {
        Rotation::Weighted | Rotation::PromptAffinity => {
            provider.keys.get(i).map_or(1, |k| u64::from(k.weight))
        }
        Rotation::RoundRobin | Rotation::Sticky => 1,
    };
    let per_unit = if health.probation_left(i) > 0 {
        u64::from(provider.probation.share_percent)
    } else {
        100
    };
    unit * per_unit
}

/// Chooses the key for one attempt. `worker` is this worker's rotation state; `store` holds the
/// shared round-robin counter.
pub fn choose(
    provider: &Provider,
    health: &ProviderHealth,
    ask: Ask<'_>,
    now_ms: u64,
    worker: &mut Tickets,
    store: &dyn SharedStore,
) -> Result<Choice, StoreError> {
    let n = provider.keys.len();
    if n == 0 {
        return Ok(Choice::Exhausted {
            retry_at_ms: now_ms,
        });
    }
    let free = |i: usize| !ask.full.get(i).copied().unwrap_or(false);
    let healthy = |i: usize| health.key_available(i, now_ms) && free(i);
    if !(0..n).any(healthy) {
        if (0..n).any(|i| health.key_available(i, now_ms)) {
            return Ok(Choice::AtLimit);
        }
        return Ok(Choice::Exhausted {
            retry_at_ms: health.earliest_key_ms(now_ms),
        });
    }
    let probation = (0..n).any(|i| healthy(i) && health.probation_left(i) > 0);
    let pick = match (provider.rotation, ask.prefix) {
        (Rotation::Sticky, _) => {
            // Same consumer/session -> same key while it is healthy; if it is not, the next one in
            // order, so the fallback is sticky too. A key on probation keeps a consumer only with
            // its probation share.
            let seed = fnv1a(ask.sticky.unwrap_or("").as_bytes());
            let start = usize::try_from(seed % n as u64).unwrap_or(0);
            let order = || (0..n).map(move |o| (start + o) % n).filter(|&i| healthy(i));
            let keeps = |i: usize| {
                health.probation_left(i) == 0
                    || provider.keys.get(i).is_some_and(|k| {
                        xxh3_64_with_seed(k.id.as_bytes(), seed) % 100
                            < u64::from(provider.probation.share_percent)
                    })
            };
            order().find(|&i| keeps(i)).or_else(|| order().next())
        }
        (Rotation::PromptAffinity, Some(prefix)) => {
            let order = rendezvous(provider, health, prefix, now_ms);
            bounded(&order, worker.recent(&provider.name), &free)
        }
        (Rotation::RoundRobin | Rotation::Weighted | Rotation::PromptAffinity, _) => {
            let ticket = worker.take(store, &provider.name)?;
            if probation {
                let weights: Vec<(usize, u64)> = (0..n)
                    .filter(|&i| healthy(i))
                    .map(|i| (i, weight(provider, health, i)))
                    .collect();
                spread(ticket, &weights)
            } else {
                // Rotate over the healthy keys only, so that a cooling key's share is spread evenly
                // over the others instead of all falling on its neighbour. (Prompt affinity without
                // a prompt to hash rotates by its keys' weights too.)
                let weighted = matches!(
                    provider.rotation,
                    Rotation::Weighted | Rotation::PromptAffinity
                );
                let order: Vec<usize> = if weighted && !provider.schedule.is_empty() {
                    provider
                        .schedule
                        .iter()
                        .copied()
                        .filter(|&i| healthy(i))
                        .collect()
                } else {
                    (0..n).filter(|&i| healthy(i)).collect()
                };
                let len = order.len() as u64;
                (len > 0)
                    .then(|| usize::try_from(ticket % len).ok())
                    .flatten()
                    .and_then(|i| order.get(i).copied())
            }
        }
    };
    Ok(match pick {
        Some(i) => Choice::Key(i),
        None => Choice::Exhausted {
            retry_at_ms: health.earliest_key_ms(now_ms),
        },
    })
}

/// The key whose share of the weights `ticket`'s golden-ratio multiple falls in.
fn spread(ticket: u64, weights: &[(usize, u64)]) -> Option<usize> {
    let total: u64 = weights.iter().map(|(_, w)| w).sum();
    // frac(ticket × φ) as a 64-bit fraction, scaled to [0, total).
    let x = ticket.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut r = u64::try_from((u128::from(x) * u128::from(total)) >> 64).unwrap_or(0);
    for &(i, w) in weights {
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    weights.last().map(|(i, _)| *i)
}

/// A healthy key of the rendezvous order, with its weight and the hash of its id.
#[derive(Debug, Clone, Copy)]
struct Ranked {
    idx: usize,
    weight: u64,
    id_hash: u64,
}

/// The healthy keys in `prefix`'s rendezvous order, highest score first.
fn rendezvous(
    provider: &Provider,
    health: &ProviderHealth,
    prefix: u64,
    now_ms: u64,
) -> Vec<Ranked> {
    let mut scored: Vec<(f64, Ranked)> = provider
        .keys
        .iter()
        .enumerate()
        .filter(|(i, _)| health.key_available(*i, now_ms))
        .map(|(i, k)| {
            let weight = weight(provider, health, i);
            // u in (0, 1) from the hash's top 53 bits; the score is weight / -ln(u).
            let h = xxh3_64_with_seed(k.id.as_bytes(), prefix);
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = weight as f64 / -u.ln();
            let id_hash = fnv1a(k.id.as_bytes());
            (
                score,
                Ranked {
                    idx: i,
                    weight,
                    id_hash,
                },
            )
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.idx.cmp(&b.1.idx)));
    scored.into_iter().map(|(_, r)| r).collect()
}

/// The first key of `order` still under its bound in the worker's recent picks, recorded there.
/// The window counts the pick being made: `window - 1` picks are remembered. A key at its limit of
/// requests in flight (not `free`) is passed over, without changing the shares of the others.
fn bounded(order: &[Ranked], recent: &mut Recent, free: &dyn Fn(usize) -> bool) -> Option<usize> {
    recent.among(order);
    let total: u64 = order.iter().map(|r| r.weight).sum();
    let (num, den) = LOAD_FACTOR;
    let window = load_window(order.len());
    // Some key is always under its bound: the bounds add up to at least LOAD_FACTOR × window
    // picks, more than the window - 1 remembered.
    let under = |r: &Ranked| {
        let bound = (u128::from(num) * u128::from(r.weight) * window as u128)
            .div_ceil(u128::from(den) * u128::from(total.max(1)));
        u128::from(recent.count(r.id_hash)) < bound
    };
    let mut free_keys = order.iter().filter(|r| free(r.idx));
    let pick = free_keys
        .clone()
        .find(|r| under(r))
        .or_else(|| free_keys.next())?;
    recent.push(pick.id_hash, window - 1);
    Some(pick.idx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::health::{cool_key, read, CooldownReason};
    use crate::store::FakeStore;

    fn provider(weights: &[u32], rotation: Rotation) -> Provider {
        Provider::for_test(weights, rotation)
    }

    fn pick(
        s: &FakeStore,
        w: &mut Tickets,
        p: &Provider,
        sticky: Option<&str>,
        now: u64,
    ) -> Choice {
        let h = read(s, p).unwrap();
        let ask = Ask {
            sticky,
            ..Ask::default()
        };
        choose(p, &h, ask, now, w, s).unwrap()
    }

    #[test]
    fn keys_at_their_limit_are_skipped_in_every_rotation_as_cooling_keys_are() {
        let full = [true, false, true];
        for rotation in [
            Rotation::RoundRobin,
            Rotation::Weighted,
            Rotation::Sticky,
            Rotation::PromptAffinity,
        ] {
            let s = FakeStore::new();
            let mut w = Tickets::default();
            let p = provider(&[1, 3, 1], rotation);
            let h = read(&s, &p).unwrap();
            for i in 0..20u64 {
                let who = format!("c{i}");
                let ask = Ask {
                    sticky: Some(&who),
                    prefix: (rotation == Rotation::PromptAffinity).then_some(i * 7919),
                    full: &full,
                };
                assert_eq!(
                    choose(&p, &h, ask, 0, &mut w, &s).unwrap(),
                    Choice::Key(1),
                    "{rotation:?}"
                );
            }
            // Every key at its limit: a key frees as soon as a request ends.
            let ask = Ask {
                full: &[true, true, true],
                ..Ask::default()
            };
            assert_eq!(choose(&p, &h, ask, 0, &mut w, &s).unwrap(), Choice::AtLimit);
            // The only free key cooling down: the pool is waiting for the cooldown, not a place.
            cool_key(&s, &p, 1, 5_000, CooldownReason::RateLimited).unwrap();
            let h = read(&s, &p).unwrap();
            let ask = Ask {
                full: &full,
                ..Ask::default()
            };
            assert_eq!(
                choose(&p, &h, ask, 0, &mut w, &s).unwrap(),
                Choice::AtLimit,
                "keys 0 and 2 are only full"
            );
            let ask = Ask {
                full: &[false, false, false],
                ..Ask::default()
            };
            assert_ne!(choose(&p, &h, ask, 0, &mut w, &s).unwrap(), Choice::Key(1));
        }
    }

    #[test]
    fn disabled_keys_take_no_traffic_in_any_rotation() {
        for rotation in [Rotation::RoundRobin, Rotation::Weighted, Rotation::Sticky] {
            let s = FakeStore::new();
            let mut w = Tickets::default();
            let mut p = provider(&[1, 3, 1], rotation);
            p.keys[1].disabled = true;
            for i in 0..20 {
                let c = pick(&s, &mut w, &p, Some(&format!("user-{i}")), 0);
                assert!(matches!(c, Choice::Key(0 | 2)), "{rotation:?}: {c:?}");
            }
        }
    }

    #[test]
    fn tickets_come_in_blocks_and_blocks_never_overlap() {
        let s = FakeStore::new();
        let (mut a, mut b) = (Tickets::default(), Tickets::default());
        let mut seen: Vec<u64> = Vec::new();
        for _ in 0..3 * TICKET_BLOCK {
            seen.push(a.take(&s, "p").unwrap());
            seen.push(b.take(&s, "p").unwrap());
        }
        let first_a: Vec<u64> = seen
            .iter()
            .step_by(2)
            .take(TICKET_BLOCK as usize)
            .copied()
            .collect();
        assert_eq!(
            first_a,
            (0..TICKET_BLOCK).collect::<Vec<_>>(),
            "a worker's block is consecutive"
        );
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen,
            (0..6 * TICKET_BLOCK).collect::<Vec<_>>(),
            "every ticket once"
        );
        // One counter write per block.
        assert_eq!(read_counter(&s), 6 * TICKET_BLOCK);
    }

    fn read_counter(s: &FakeStore) -> u64 {
        crate::store::decode_u64s::<1>(s.get(&counter_key("p")).unwrap().0.as_deref())[0]
    }

    #[test]
    fn round_robin_is_global_across_workers() {
        // Two "workers" share one store: the rotation interleaves across both.
        let s = FakeStore::new();
        let mut w = Tickets::default();
        let p = provider(&[1, 1, 1], Rotation::RoundRobin);
        let mut counts = [0; 3];
        for i in 0..300 {
            if i % 7 == 0 {
                s.inject_conflicts.set(2);
            }
            let Choice::Key(k) = pick(&s, &mut w, &p, None, 0) else {
                panic!()
            };
            counts[k] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn cooling_keys_are_skipped_and_all_cooling_reports_earliest() {
        let s = FakeStore::new();
        let mut w = Tickets::default();
        let p = provider(&[1, 1, 1], Rotation::RoundRobin);
        cool_key(&s, &p, 0, 1_000, CooldownReason::RateLimited).unwrap();
        for _ in 0..10 {
            assert_ne!(pick(&s, &mut w, &p, None, 500), Choice::Key(0));
        }
        cool_key(&s, &p, 1, 2_000, CooldownReason::RateLimited).unwrap();
        cool_key(&s, &p, 2, 3_000, CooldownReason::Disabled).unwrap();
        assert_eq!(
            pick(&s, &mut w, &p, None, 500),
            Choice::Exhausted { retry_at_ms: 1_000 }
        );
        assert_eq!(pick(&s, &mut w, &p, None, 1_000), Choice::Key(0));
    }

    #[test]
    fn a_cooling_keys_share_is_spread_evenly() {
        let s = FakeStore::new();
        let mut w = Tickets::default();
        let p = provider(&[1, 1, 1, 1], Rotation::RoundRobin);
        cool_key(&s, &p, 1, 1_000, CooldownReason::Disabled).unwrap();
        let mut counts = [0; 4];
        for _ in 0..300 {
            let Choice::Key(k) = pick(&s, &mut w, &p, None, 0) else {
                panic!()
            };
            counts[k] += 1;
        }
        assert_eq!(counts, [100, 0, 100, 100]);
    }

    #[test]
    fn weighted_follows_the_schedule() {
        let s = FakeStore::new();
        let mut w = Tickets::default();
        let p = provider(&[2, 1], Rotation::Weighted);
        let seq: Vec<Choice> = (0..6).map(|_| pick(&s, &mut w, &p, None, 0)).collect();
        let want: Vec<Choice> = [0, 1, 0, 0, 1, 0].iter().map(|&i| Choice::Key(i)).collect();
        assert_eq!(seq, want);
    }

    #[test]
    fn sticky_keeps_a_consumer_on_one_key_until_it_cools() {
        let s = FakeStore::new();
        let mut w = Tickets::default();
        let p = provider(&[1, 1, 1, 1], Rotation::Sticky);
        let first = pick(&s, &mut w, &p, Some("team-a"), 0);
        for _ in 0..5 {
            assert_eq!(pick(&s, &mut w, &p, Some("team-a"), 0), first);
        }
        let Choice::Key(k) = first else { panic!() };
        cool_key(&s, &p, k, 10, CooldownReason::RateLimited).unwrap();
        let moved = pick(&s, &mut w, &p, Some("team-a"), 5);
        assert_ne!(moved, first);
        assert_eq!(
            pick(&s, &mut w, &p, Some("team-a"), 5),
            moved,
            "the fallback is sticky too"
        );
        assert_eq!(
            pick(&s, &mut w, &p, Some("team-a"), 10),
            first,
            "back once healthy"
        );
        assert!(
            s.keys().iter().all(|k| !k.starts_with("tollgate:rr")),
            "sticky uses no counter"
        );
    }

    /// `p` with key `idx` put on probation (`requests` left) the way a configuration change does:
    /// the pool is born without it, then the key enters.
    fn with_probation(
        s: &FakeStore,
        p: &Provider,
        idx: usize,
        requests: u32,
        share: u32,
    ) -> Provider {
        let mut p = p.clone();
        p.probation = crate::config::Probation {
            requests,
            share_percent: share,
        };
        let mut before = p.clone();
        before.keys.remove(idx);
        crate::failover::health::reconcile(s, &before).unwrap();
        assert_eq!(
            crate::failover::health::reconcile(s, &p).unwrap(),
            vec![p.keys[idx].id.clone()]
        );
        p
    }

    fn counts(s: &FakeStore, w: &mut Tickets, p: &Provider, picks: usize) -> Vec<usize> {
        let mut c = vec![0; p.keys.len()];
        for _ in 0..picks {
            let Choice::Key(k) = pick(s, w, p, None, 0) else {
                panic!()
            };
            c[k] += 1;
        }
        c
    }

    #[test]
    fn a_key_on_probation_takes_its_share_in_round_robin_and_weighted() {
        // (weights, rotation, probation share %, expected counts per 2,100 picks)
        let cases: [(&[u32], Rotation, u32, [usize; 3]); 3] = [
            (&[1, 1, 1], Rotation::RoundRobin, 10, [1000, 1000, 100]),
            (&[1, 1, 1], Rotation::RoundRobin, 5, [1024, 1024, 51]),
            (&[4, 2, 1], Rotation::Weighted, 50, [1292, 646, 162]),
        ];
        for (weights, rotation, share, want) in cases {
            let s = FakeStore::new();
            let mut w = Tickets::default();
            let p = with_probation(&s, &provider(weights, rotation), 2, 1000, share);
            let got = counts(&s, &mut w, &p, 2100);
            for (g, e) in got.iter().zip(want) {
                assert!(
                    g.abs_diff(e) <= 3,
                    "{rotation:?} {share}%: {got:?}, want {want:?}"
                );
            }
            // Spread out, not in a run: every 300 consecutive picks hold about a seventh of it.
            if share == 10 {
                let seq: Vec<usize> = (0..2100)
                    .map(|_| match pick(&s, &mut w, &p, None, 0) {
                        Choice::Key(k) => k,
                        _ => 9,
                    })
                    .collect();
                for win in seq.windows(300) {
                    let n = win.iter().filter(|&&k| k == 2).count();
                    assert!((11..=18).contains(&n), "{n} of 300");
                }
            }
        }
    }

    #[test]
    fn probation_over_means_the_exact_rotation_again() {
        let s = FakeStore::new();
        let mut w = Tickets::default();
        let p = with_probation(&s, &provider(&[1, 1, 1], Rotation::RoundRobin), 1, 2, 10);
        for _ in 0..2 {
            crate::failover::health::probation_answered(&s, &p, 1).unwrap();
        }
        assert_eq!(counts(&s, &mut w, &p, 300), vec![100, 100, 100]);
    }

    #[test]
    fn sticky_consumers_keep_a_probation_key_with_its_share() {
        let s = FakeStore::new();
        let mut w = Tickets::default();
        let plain = provider(&[1, 1, 1], Rotation::Sticky);
        let before: Vec<Choice> = (0..9000)
            .map(|i| pick(&s, &mut w, &plain, Some(&format!("c{i}")), 0))
            .collect();
        let p = with_probation(&s, &plain, 2, 1000, 20);
        let mut on_new = 0;
        for (i, was) in before.iter().enumerate() {
            let who = format!("c{i}");
            let now = pick(&s, &mut w, &p, Some(&who), 0);
            assert_eq!(now, pick(&s, &mut w, &p, Some(&who), 0), "still sticky");
            if now == Choice::Key(2) {
                on_new += 1;
                assert_eq!(
                    *was,
                    Choice::Key(2),
                    "only the key's own consumers stay on it"
                );
            } else if *was != Choice::Key(2) {
                assert_eq!(now, *was, "the others do not move");
            }
        }
        // 20 % of its ~3,000 consumers.
        assert!((500..=700).contains(&on_new), "{on_new}");
    }

    fn ask(prefix: u64) -> Ask<'static> {
        Ask {
            prefix: Some(prefix),
            ..Ask::default()
        }
    }

    /// The key a worker with recent picks `w` chooses for `prefix`.
    fn affine(s: &FakeStore, w: &mut Tickets, p: &Provider, prefix: u64, now: u64) -> usize {
        let h = read(s, p).unwrap();
        match choose(p, &h, ask(prefix), now, w, s).unwrap() {
            Choice::Key(k) => k,
            c => panic!("{c:?}"),
        }
    }

    /// The key of `prefix` itself (a worker that has picked nothing yet: no load bound).
    fn home(s: &FakeStore, p: &Provider, prefix: u64, now: u64) -> usize {
        affine(s, &mut Tickets::default(), p, prefix, now)
    }

    fn named(ids: &[&str]) -> Provider {
        let mut p = provider(&vec![1; ids.len()], Rotation::PromptAffinity);
        for (k, id) in p.keys.iter_mut().zip(ids) {
            k.id = (*id).to_string();
        }
        p
    }

    /// Prefix hashes as the listener makes them (XXH3 of distinct prompts).
    fn prefixes(n: u64) -> Vec<u64> {
        (0..n)
            .map(|i| xxhash_rust::xxh3::xxh3_64(format!("system prompt {i}").as_bytes()))
            .collect()
    }

    #[test]
    fn affinity_is_the_same_in_every_worker_and_config_order_and_spreads_evenly() {
        let s = FakeStore::new();
        let p = named(&["a", "b", "c"]);
        let reordered = named(&["c", "a", "b"]);
        let (mut w1, mut w2) = (Tickets::default(), Tickets::default());
        let mut per_key = [0usize; 3];
        for x in prefixes(3000) {
            let k = home(&s, &p, x, 0);
            assert_eq!(
                reordered.keys[home(&s, &reordered, x, 0)].id,
                p.keys[k].id,
                "another config, same keys"
            );
            // Two workers with their own recent picks, under even traffic: the prefix's key.
            assert_eq!(affine(&s, &mut w1, &p, x, 0), k);
            assert_eq!(affine(&s, &mut w2, &p, x, 0), k);
            per_key[k] += 1;
        }
        for n in per_key {
            assert!((900..=1100).contains(&n), "{per_key:?}");
        }
        assert!(
            s.keys().iter().all(|k| !k.starts_with("tollgate:rr")),
            "no shared counter"
        );
    }

    #[test]
    fn a_key_added_moves_only_its_share_of_prefixes_and_only_to_itself() {
        let s = FakeStore::new();
        let three = named(&["a", "b", "c"]);
        let four = named(&["a", "b", "c", "d"]);
        let mut moved = 0;
        for x in prefixes(4000) {
            let before = &three.keys[home(&s, &three, x, 0)].id;
            let after = &four.keys[home(&s, &four, x, 0)].id;
            if before != after {
                assert_eq!(after, "d");
                moved += 1;
            }
        }
        // ~1/4 of the prefixes.
        assert!((900..=1100).contains(&moved), "{moved}");
    }

    #[test]
    fn a_cooling_keys_prefixes_move_to_their_next_key_and_come_back() {
        let s = FakeStore::new();
        let p = named(&["a", "b", "c", "d"]);
        let xs = prefixes(2000);
        let homes: Vec<usize> = xs.iter().map(|&x| home(&s, &p, x, 0)).collect();
        cool_key(&s, &p, 1, 1_000, CooldownReason::RateLimited).unwrap();
        let without_b = named(&["a", "c", "d"]);
        let mut w = Tickets::default();
        for (&x, &k) in xs.iter().zip(&homes) {
            let now = affine(&s, &mut w, &p, x, 500);
            if k == 1 {
                // The next in its rendezvous order: where it goes in a pool without `b`.
                let next = &without_b.keys[home(&s, &without_b, x, 0)].id;
                assert_eq!(&p.keys[now].id, next);
            } else {
                assert_eq!(now, k, "the other keys' prefixes stay");
            }
        }
        let back = xs
            .iter()
            .zip(&homes)
            .filter(|(&x, &k)| affine(&s, &mut w, &p, x, 1_000) == k)
            .count();
        assert!(back >= 1990, "back once healthy: {back} of 2000");
    }

    #[test]
    fn a_probation_key_takes_its_share_of_prefixes() {
        let s = FakeStore::new();
        let p = with_probation(&s, &named(&["a", "b", "c"]), 2, 1000, 10);
        let on_new = prefixes(6300)
            .into_iter()
            .filter(|&x| home(&s, &p, x, 0) == 2)
            .count();
        // 10 / 210 of the prefixes.
        assert!((230..=370).contains(&on_new), "{on_new}");
    }

    /// In every window of consecutive picks, a key takes at most ceil(1.5 × share × window).
    fn assert_bounded(seq: &[usize], weights: &[u64]) {
        let total: u64 = weights.iter().sum();
        let (num, den) = LOAD_FACTOR;
        let window = load_window(weights.len());
        assert!(seq.len() > 2 * window, "long enough to slide");
        for win in seq.windows(window) {
            for (k, &w) in weights.iter().enumerate() {
                let bound = (num * w * window as u64).div_ceil(den * total);
                let n = win.iter().filter(|&&x| x == k).count() as u64;
                assert!(n <= bound, "key {k}: {n} > {bound} of {window}");
            }
        }
    }

    #[test]
    fn a_hot_prefix_is_held_to_the_load_bound_and_the_others_stay_home() {
        let s = FakeStore::new();
        let p = named(&["a", "b", "c"]);
        let xs = prefixes(300);
        let hot = xs[0];
        let hot_home = home(&s, &p, hot, 0);
        // Half the traffic is one prefix, the rest spread over 299 others.
        let mut w = Tickets::default();
        let mut seq = Vec::new();
        let (mut strays, mut others) = (0, 0);
        for i in 0..6000 {
            let x = if i % 2 == 0 {
                hot
            } else {
                xs[1 + (i / 2) % 299]
            };
            let k = affine(&s, &mut w, &p, x, 0);
            let own = home(&s, &p, x, 0);
            if own != hot_home {
                others += 1;
                strays += usize::from(k != own);
            }
            seq.push(k);
        }
        assert_bounded(&seq, &[1, 1, 1]);
        let on_home = seq.iter().filter(|&&k| k == hot_home).count();
        // The hot prefix's key is full (half the traffic) and the prefixes that share it overflow
        // with it; the other keys' prefixes stay home.
        assert!((2900..=3100).contains(&on_home), "{on_home}");
        assert!(others > 1500 && strays == 0, "{strays} of {others} moved");

        // One prefix alone: its key up to the bound, then the next in its order, and so on.
        let mut w = Tickets::default();
        let seq: Vec<usize> = (0..2000)
            .map(|_| affine(&s, &mut w, &p, xs[1], 0))
            .collect();
        assert_bounded(&seq, &[1, 1, 1]);
        assert!(seq[..192].iter().all(|&k| k == seq[0]), "first its own key");
        // Weighted keys: the bounds follow the weights.
        let mut heavy = named(&["a", "b", "c"]);
        heavy.keys[0].weight = 2;
        let mut w = Tickets::default();
        let seq: Vec<usize> = (0..2000)
            .map(|_| affine(&s, &mut w, &heavy, xs[1], 0))
            .collect();
        assert_bounded(&seq, &[2, 1, 1]);
    }

    #[test]
    fn the_recent_picks_count_what_they_hold() {
        let mut r = Recent::default();
        for i in 0..10u64 {
            r.push(i % 3, 4);
        }
        // Last 4 of 0,1,2,0,1,2,0,1,2,0: 2,0,1,2 ... then 0 pushed: 0,1,2,0.
        assert_eq!((r.count(0), r.count(1), r.count(2)), (2, 1, 1));
        assert_eq!(r.picks.len(), 4);
        r.push(7, 1);
        assert_eq!((r.count(0), r.count(7), r.counts.len()), (0, 1, 1));
    }

    #[test]
    fn prompt_affinity_without_a_prompt_rotates_by_weight() {
        let s = FakeStore::new();
        let mut w = Tickets::default();
        let p = provider(&[3, 1], Rotation::PromptAffinity);
        assert_eq!(counts(&s, &mut w, &p, 400), vec![300, 100]);
    }
}
