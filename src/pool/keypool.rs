//! Choosing a provider key for one upstream attempt: round robin, weighted or sticky, global across
//! Envoy workers (the rotation counter lives in shared data), skipping keys that are cooling down.

use crate::config::{Provider, Rotation};
use crate::failover::health::{fnv1a, ProviderHealth};
use crate::store::{add_u64s, SharedStore, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Key(usize),
    /// Every key is cooling down: the first is back at `retry_at_ms`.
    Exhausted {
        retry_at_ms: u64,
    },
}

pub fn counter_key(provider: &str) -> String {
    format!("tollgate:rr:{provider}")
}

/// Round-robin tickets taken from the shared counter in blocks of this many: one CAS per block
/// instead of per attempt. Rotation is then global across workers within a few attempts.
pub const TICKET_BLOCK: u64 = 4;

/// A worker's blocks of round-robin tickets, by provider.
#[derive(Debug, Default)]
pub struct Tickets {
    blocks: hashbrown::HashMap<String, (u64, u64)>,
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
}

/// One ticket straight from the shared counter (no block): exact global rotation.
pub fn ticket<S: SharedStore + ?Sized>(store: &S, provider: &str) -> Result<u64, StoreError> {
    let ([t], _) = add_u64s(store, &counter_key(provider), [1])?;
    Ok(t.wrapping_sub(1))
}

/// `sticky` is the consumer's name or session id when the provider rotates stickily; `ticket`
/// gives the next round-robin ticket when the rotation needs one.
pub fn choose(
    provider: &Provider,
    health: &ProviderHealth,
    sticky: Option<&str>,
    now_ms: u64,
    ticket: impl FnOnce() -> Result<u64, StoreError>,
) -> Result<Choice, StoreError> {
    let n = provider.keys.len();
    if n == 0 {
        return Ok(Choice::Exhausted {
            retry_at_ms: now_ms,
        });
    }
    let healthy = |i: usize| health.key_available(i, now_ms);
    if !(0..n).any(healthy) {
        return Ok(Choice::Exhausted {
            retry_at_ms: health.earliest_key_ms(now_ms),
        });
    }
    let pick = match provider.rotation {
        Rotation::Sticky => {
            // Same consumer/session -> same key while it is healthy; if it is not, the next one in
            // order, so the fallback is sticky too.
            let start =
                usize::try_from(fnv1a(sticky.unwrap_or("").as_bytes()) % n as u64).unwrap_or(0);
            (0..n).map(|o| (start + o) % n).find(|&i| healthy(i))
        }
        Rotation::RoundRobin | Rotation::Weighted => {
            let ticket = ticket()?;
            // Rotate over the healthy keys only, so that a cooling key's share is spread evenly
            // over the others instead of all falling on its neighbour.
            let order: Vec<usize> =
                if provider.rotation == Rotation::Weighted && !provider.schedule.is_empty() {
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
    };
    Ok(match pick {
        Some(i) => Choice::Key(i),
        None => Choice::Exhausted {
            retry_at_ms: health.earliest_key_ms(now_ms),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::health::{cool_key, read, CooldownReason};
    use crate::store::FakeStore;

    fn provider(weights: &[u32], rotation: Rotation) -> Provider {
        Provider::for_test(weights, rotation)
    }

    fn pick(s: &FakeStore, p: &Provider, sticky: Option<&str>, now: u64) -> Choice {
        let h = read(s, p).unwrap();
        choose(p, &h, sticky, now, || ticket(s, &p.name)).unwrap()
    }

    #[test]
    fn disabled_keys_take_no_traffic_in_any_rotation() {
        for rotation in [Rotation::RoundRobin, Rotation::Weighted, Rotation::Sticky] {
            let s = FakeStore::new();
            let mut p = provider(&[1, 3, 1], rotation);
            p.keys[1].disabled = true;
            for i in 0..20 {
                let c = pick(&s, &p, Some(&format!("user-{i}")), 0);
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
        let p = provider(&[1, 1, 1], Rotation::RoundRobin);
        let mut counts = [0; 3];
        for i in 0..300 {
            if i % 7 == 0 {
                s.inject_conflicts.set(2);
            }
            let Choice::Key(k) = pick(&s, &p, None, 0) else {
                panic!()
            };
            counts[k] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn cooling_keys_are_skipped_and_all_cooling_reports_earliest() {
        let s = FakeStore::new();
        let p = provider(&[1, 1, 1], Rotation::RoundRobin);
        cool_key(&s, &p, 0, 1_000, CooldownReason::RateLimited).unwrap();
        for _ in 0..10 {
            assert_ne!(pick(&s, &p, None, 500), Choice::Key(0));
        }
        cool_key(&s, &p, 1, 2_000, CooldownReason::RateLimited).unwrap();
        cool_key(&s, &p, 2, 3_000, CooldownReason::Disabled).unwrap();
        assert_eq!(
            pick(&s, &p, None, 500),
            Choice::Exhausted { retry_at_ms: 1_000 }
        );
        assert_eq!(pick(&s, &p, None, 1_000), Choice::Key(0));
    }

    #[test]
    fn a_cooling_keys_share_is_spread_evenly() {
        let s = FakeStore::new();
        let p = provider(&[1, 1, 1, 1], Rotation::RoundRobin);
        cool_key(&s, &p, 1, 1_000, CooldownReason::Disabled).unwrap();
        let mut counts = [0; 4];
        for _ in 0..300 {
            let Choice::Key(k) = pick(&s, &p, None, 0) else {
                panic!()
            };
            counts[k] += 1;
        }
        assert_eq!(counts, [100, 0, 100, 100]);
    }

    #[test]
    fn weighted_follows_the_schedule() {
        let s = FakeStore::new();
        let p = provider(&[2, 1], Rotation::Weighted);
        let seq: Vec<Choice> = (0..6).map(|_| pick(&s, &p, None, 0)).collect();
        let want: Vec<Choice> = [0, 1, 0, 0, 1, 0].iter().map(|&i| Choice::Key(i)).collect();
        assert_eq!(seq, want);
    }

    #[test]
    fn sticky_keeps_a_consumer_on_one_key_until_it_cools() {
        let s = FakeStore::new();
        let p = provider(&[1, 1, 1, 1], Rotation::Sticky);
        let first = pick(&s, &p, Some("team-a"), 0);
        for _ in 0..5 {
            assert_eq!(pick(&s, &p, Some("team-a"), 0), first);
        }
        let Choice::Key(k) = first else { panic!() };
        cool_key(&s, &p, k, 10, CooldownReason::RateLimited).unwrap();
        let moved = pick(&s, &p, Some("team-a"), 5);
        assert_ne!(moved, first);
        assert_eq!(
            pick(&s, &p, Some("team-a"), 5),
            moved,
            "the fallback is sticky too"
        );
        assert_eq!(pick(&s, &p, Some("team-a"), 10), first, "back once healthy");
        assert!(
            s.keys().iter().all(|k| !k.starts_with("tollgate:rr")),
            "sticky uses no counter"
        );
    }
}
