//! Passive health of keys and providers, shared by every worker through one shared-data entry per
//! provider: the provider's circuit breaker plus a cooldown per key.
//!
//! One entry per provider (not per key) so that choosing a key costs one shared-data read. Keys are
//! matched by a hash of their id, so reordering keys in the config keeps their cooldowns, and a
//! removed key's slot is dropped on the next write.

use crate::config::{Health, Provider};
use crate::store::{decode_u64s, encode_u64s, update, SharedStore, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum CooldownReason {
    None = 0,
    /// 429: back when the provider said so.
    RateLimited = 1,
    /// 401/402/403: the key is dead or unpaid.
    Disabled = 2,
}

impl CooldownReason {
    fn from_u64(v: u64) -> Self {
        match v {
            1 => CooldownReason::RateLimited,
            2 => CooldownReason::Disabled,
            _ => CooldownReason::None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            CooldownReason::None => "healthy",
            CooldownReason::RateLimited => "rate_limited",
            CooldownReason::Disabled => "disabled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    Open {
        until_ms: u64,
    },
    /// Open time is over: a few real requests may test the provider.
    HalfOpen,
}

const HEADER_FIELDS: usize = 4; // failures, open_until_ms, probes_used, probes_since_ms
const KEY_FIELDS: usize = 3; // id hash, until_ms, reason

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderHealth {
    pub failures: u64,
    pub open_until_ms: u64,
    pub probes_used: u64,
    pub probes_since_ms: u64,
    /// Per key of the provider, in config order: (cooldown until, reason).
    pub keys: Vec<(u64, CooldownReason)>,
    /// Per key, in config order: disabled in the configuration (not stored: the config says it).
    pub disabled: Vec<bool>,
}

/// When every key of a provider is disabled in the configuration there is no moment it is back:
/// clients are told to retry after this long, when a configuration change may have enabled one.
const ALL_DISABLED_RETRY_MS: u64 = 60_000;

pub fn entry_key(provider: &str) -> String {
    format!("tollgate:h:{provider}")
}

/// FNV-1a: stable across builds and workers, which `std`'s hasher is not promised to be.
pub fn fnv1a(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl ProviderHealth {
    pub fn decode(bytes: Option<&[u8]>, provider: &Provider) -> Self {
        let b = bytes.unwrap_or(&[]);
        let [failures, open_until_ms, probes_used, probes_since_ms] =
            decode_u64s::<HEADER_FIELDS>(Some(b));
        let slots: Vec<[u64; KEY_FIELDS]> = b
            .get(HEADER_FIELDS * 8..)
            .unwrap_or(&[])
            .chunks_exact(KEY_FIELDS * 8)
            .map(|c| decode_u64s::<KEY_FIELDS>(Some(c)))
            .collect();
        let keys = provider
            .keys
            .iter()
            .map(|k| {
                let h = fnv1a(k.id.as_bytes());
                slots
                    .iter()
                    .find(|s| s[0] == h)
                    .map(|s| (s[1], CooldownReason::from_u64(s[2])))
                    .unwrap_or((0, CooldownReason::None))
            })
            .collect();
        ProviderHealth {
            disabled: provider.keys.iter().map(|k| k.disabled).collect(),
            failures,
            open_until_ms,
            probes_used,
            probes_since_ms,
            keys,
        }
    }

    pub fn encode(&self, provider: &Provider) -> Vec<u8> {
        let mut v = encode_u64s(&[
            self.failures,
            self.open_until_ms,
            self.probes_used,
            self.probes_since_ms,
        ]);
        for (k, (until, reason)) in provider.keys.iter().zip(&self.keys) {
            v.extend(encode_u64s(&[
                fnv1a(k.id.as_bytes()),
                *until,
                *reason as u64,
            ]));
        }
        v
    }

    pub fn key_available(&self, idx: usize, now_ms: u64) -> bool {
        !self.key_disabled(idx)
            && self
                .keys
                .get(idx)
                .map(|(until, _)| *until <= now_ms)
                .unwrap_or(false)
    }

    pub fn key_disabled(&self, idx: usize) -> bool {
        self.disabled.get(idx).copied().unwrap_or(false)
    }

    /// The state of the key at `idx` now: healthy, or cooling until when and why.
    pub fn key_state(&self, idx: usize, now_ms: u64) -> (CooldownReason, u64) {
        match self.keys.get(idx) {
            Some((until, reason)) if *until > now_ms => (*reason, *until),
            _ => (CooldownReason::None, 0),
        }
    }

    /// When the first key of the provider is usable again (now if one is usable now).
    pub fn earliest_key_ms(&self, now_ms: u64) -> u64 {
        if self.keys.is_empty() {
            return now_ms;
        }
        self.keys
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.key_disabled(*i))
            .map(|(_, (u, _))| (*u).max(now_ms))
            .min()
            .unwrap_or(now_ms.saturating_add(ALL_DISABLED_RETRY_MS))
    }

    pub fn circuit(&self, cfg: &Health, now_ms: u64) -> Circuit {
        if u64::from(cfg.circuit_failures) > self.failures {
            Circuit::Closed
        } else if now_ms < self.open_until_ms {
            Circuit::Open {
                until_ms: self.open_until_ms,
            }
        } else {
            Circuit::HalfOpen
        }
    }

    /// When the provider can take traffic again: now, or the end of its open circuit or of its
    /// keys' cooldowns, whichever is later.
    pub fn available_at(&self, cfg: &Health, now_ms: u64) -> u64 {
        let keys = self.earliest_key_ms(now_ms);
        match self.circuit(cfg, now_ms) {
            Circuit::Open { until_ms } => keys.max(until_ms),
            _ => keys,
        }
    }
}

pub fn read<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
) -> Result<ProviderHealth, StoreError> {
    let (bytes, _) = store.get(&entry_key(&provider.name))?;
    Ok(ProviderHealth::decode(bytes.as_deref(), provider))
}

fn modify<S: SharedStore + ?Sized, T>(
    store: &S,
    provider: &Provider,
    mut f: impl FnMut(&mut ProviderHealth) -> T,
) -> Result<T, StoreError> {
    update(store, &entry_key(&provider.name), |cur| {
        let mut h = ProviderHealth::decode(cur, provider);
        let out = f(&mut h);
        (h.encode(provider), out)
    })
    .map(|(out, _)| out)
}

/// Puts a key on cooldown until `until_ms`. A cooldown is only ever extended here, never
/// shortened, so two workers reporting different 429s keep the longer wait.
pub fn cool_key<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
    idx: usize,
    until_ms: u64,
    reason: CooldownReason,
) -> Result<(), StoreError> {
    modify(store, provider, |h| {
        if let Some(slot) = h.keys.get_mut(idx) {
            if until_ms > slot.0 {
                *slot = (until_ms, reason);
            }
        }
    })
}

/// Whether an attempt may go to this provider now. In half-open state only `half_open_probes`
/// attempts per open period are let through; a probe that never reports back frees its slot after
/// another open period, so a lost probe cannot wedge the circuit.
pub fn try_acquire<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
    cfg: &Health,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let h = read(store, provider)?;
    match h.circuit(cfg, now_ms) {
        Circuit::Closed => Ok(true),
        Circuit::Open { .. } => Ok(false),
        Circuit::HalfOpen => modify(store, provider, |h| {
            if h.circuit(cfg, now_ms) != Circuit::HalfOpen {
                return h.circuit(cfg, now_ms) == Circuit::Closed;
            }
            if now_ms.saturating_sub(h.probes_since_ms) >= cfg.circuit_open_ms {
                h.probes_used = 0;
                h.probes_since_ms = now_ms;
            }
            if h.probes_used < u64::from(cfg.half_open_probes) {
                h.probes_used += 1;
                true
            } else {
                false
            }
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// 5xx or a timeout: counts against the provider, not the key.
    ProviderFailure,
}

/// Records an attempt's outcome on the provider's circuit. Returns the circuit afterwards.
pub fn record<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
    cfg: &Health,
    outcome: Outcome,
    now_ms: u64,
) -> Result<Circuit, StoreError> {
    let cheap = read(store, provider)?;
    if outcome == Outcome::Success && cheap.failures == 0 {
        return Ok(Circuit::Closed); // the common case writes nothing
    }
    modify(store, provider, |h| {
        match outcome {
            Outcome::Success => {
                h.failures = 0;
                h.open_until_ms = 0;
                h.probes_used = 0;
            }
            Outcome::ProviderFailure => {
                let was = h.circuit(cfg, now_ms);
                h.failures = h.failures.saturating_add(1);
                let tripped = was == Circuit::HalfOpen
                    || (was == Circuit::Closed && h.failures >= u64::from(cfg.circuit_failures));
                if tripped {
                    h.failures = h.failures.max(u64::from(cfg.circuit_failures));
                    h.open_until_ms = now_ms.saturating_add(cfg.circuit_open_ms);
                    h.probes_used = 0;
                    h.probes_since_ms = 0;
                }
            }
        }
        h.circuit(cfg, now_ms)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rotation;
    use crate::store::FakeStore;

    /// Keys named by `ids` (cooldowns are matched by key id).
    fn provider(ids: &[&str]) -> Provider {
        let mut p = Provider::for_test(&vec![1; ids.len()], Rotation::RoundRobin);
        for (k, id) in p.keys.iter_mut().zip(ids) {
            k.id = (*id).to_string();
        }
        p
    }

    const CFG: Health = Health {
        default_cooldown_ms: 30_000,
        auth_failure_cooldown_ms: 3_600_000,
        circuit_failures: 3,
        circuit_open_ms: 10_000,
        half_open_probes: 1,
    };

    #[test]
    fn a_disabled_key_is_unavailable_and_keeps_its_cooldown_for_when_it_returns() {
        let s = FakeStore::new();
        let mut p = provider(&["a", "b"]);
        cool_key(&s, &p, 1, 5_000, CooldownReason::RateLimited).unwrap();
        p.keys[0].disabled = true;
        let h = read(&s, &p).unwrap();
        assert!(!h.key_available(0, 1_000), "disabled");
        assert_eq!(h.earliest_key_ms(1_000), 5_000, "only enabled keys count");
        // Writing the entry while `a` is disabled keeps its slot, and `b` keeps its cooldown.
        cool_key(&s, &p, 0, 2_000, CooldownReason::RateLimited).unwrap();
        p.keys[0].disabled = false;
        let h = read(&s, &p).unwrap();
        assert_eq!(
            h.keys,
            vec![
                (2_000, CooldownReason::RateLimited),
                (5_000, CooldownReason::RateLimited)
            ]
        );
        assert!(h.key_available(0, 2_000));
        p.keys[1].disabled = true;
        p.keys[0].disabled = true;
        let h = read(&s, &p).unwrap();
        assert_eq!(h.earliest_key_ms(1_000), 1_000 + ALL_DISABLED_RETRY_MS);
    }

    #[test]
    fn cooldowns_are_kept_by_key_id_and_only_extended() {
        let s = FakeStore::new();
        let p = provider(&["a", "b", "c"]);
        cool_key(&s, &p, 1, 5_000, CooldownReason::RateLimited).unwrap();
        cool_key(&s, &p, 1, 3_000, CooldownReason::RateLimited).unwrap();
        let h = read(&s, &p).unwrap();
        assert_eq!(h.keys[1], (5_000, CooldownReason::RateLimited));
        assert!(
            h.key_available(0, 1_000) && !h.key_available(1, 4_999) && h.key_available(1, 5_000)
        );
        // Reordered config: "b" keeps its cooldown.
        let reordered = provider(&["b", "c", "a"]);
        assert_eq!(
            read(&s, &reordered).unwrap().keys[0],
            (5_000, CooldownReason::RateLimited)
        );
        assert_eq!(h.earliest_key_ms(1_000), 1_000);
    }

    #[test]
    fn circuit_opens_after_n_failures_and_half_open_probe_closes_it() {
        let s = FakeStore::new();
        let p = provider(&["a"]);
        for i in 0..2 {
            assert_eq!(
                record(&s, &p, &CFG, Outcome::ProviderFailure, 100 + i).unwrap(),
                Circuit::Closed
            );
        }
        assert_eq!(
            record(&s, &p, &CFG, Outcome::ProviderFailure, 200).unwrap(),
            Circuit::Open { until_ms: 10_200 }
        );
        assert!(!try_acquire(&s, &p, &CFG, 10_199).unwrap());
        assert!(
            try_acquire(&s, &p, &CFG, 10_200).unwrap(),
            "one probe in half-open"
        );
        assert!(!try_acquire(&s, &p, &CFG, 10_201).unwrap(), "only one");
        assert_eq!(
            record(&s, &p, &CFG, Outcome::Success, 10_300).unwrap(),
            Circuit::Closed
        );
        assert!(try_acquire(&s, &p, &CFG, 10_301).unwrap());
    }

    #[test]
    fn failed_probe_reopens_and_lost_probe_expires() {
        let s = FakeStore::new();
        let p = provider(&["a"]);
        for t in 0..3 {
            record(&s, &p, &CFG, Outcome::ProviderFailure, t).unwrap();
        }
        assert!(try_acquire(&s, &p, &CFG, 10_002).unwrap());
        assert_eq!(
            record(&s, &p, &CFG, Outcome::ProviderFailure, 10_003).unwrap(),
            Circuit::Open { until_ms: 20_003 }
        );
        assert!(try_acquire(&s, &p, &CFG, 20_003).unwrap());
        // The probe never reports; after another open period a new probe may go.
        assert!(!try_acquire(&s, &p, &CFG, 25_000).unwrap());
        assert!(try_acquire(&s, &p, &CFG, 30_003).unwrap());
    }

    #[test]
    fn success_on_healthy_provider_writes_nothing() {
        let s = FakeStore::new();
        let p = provider(&["a"]);
        record(&s, &p, &CFG, Outcome::Success, 1).unwrap();
        assert!(s.is_empty());
    }
}
