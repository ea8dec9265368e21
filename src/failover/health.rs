//! Passive health of keys and providers, shared by every worker through one shared-data entry per
//! provider: the provider's circuit breaker plus a cooldown per key.
//!
//! One entry per provider (not per key) so that choosing a key costs one shared-data read. Keys are
//! matched by a hash of their id, so reordering keys in the config keeps their cooldowns.
//!
//! Probation lives here too: per key slot, the requests it has left on probation and what the last
//! configuration applied said of it (disabled, or not named at all). [`reconcile`], run whenever a
//! configuration is applied, decides from that whether a key enters the pool, the same way in every
//! worker and both roles. A writer keeps the slots its configuration does not name (another
//! configuration's during a change, or keys removed), so that a worker still on the previous
//! configuration never erases a new key's probation; `reconcile` bounds how many removed ones stay.
//!
//! The circuit counts failures in the order the attempts saw them, not the order they report: each
//! attempt keeps what it saw of the circuit when it began ([`Seen`]). A failure extends the run of
//! failures to one past what its attempt saw, so failures of attempts that ran side by side count as
//! one step, and a run of `circuit_failures` needs attempts that each began after the previous failure
//! was on record (a provider that fails whatever is sent to it). A success ends the run its attempt saw
//! (a success whose attempt saw none writes nothing: the common path), and a failure of an attempt that
//! began before that reset does not count. One key's 5xx also rests that key briefly, so its
//! neighbours take its traffic while the provider's circuit stays closed.
//!
//! The entry's layout changed with probation and again with that order: its key is
//! `tollgate:h3:<provider>`, so an entry in an older layout (`tollgate:h:`, `tollgate:h2:`) is never
//! misread.

use crate::config::{Health, Provider};
use crate::store::{decode_u64s, encode_u64s, update, update_if, SharedStore, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum CooldownReason {
    None = 0,
    /// 429: back when the provider said so.
    RateLimited = 1,
    /// 401/402/403: the key is dead or unpaid.
    Disabled = 2,
    /// 5xx or no answer: back after the provider's Retry-After, else `server_error_cooldown_s`.
    ServerError = 3,
}

impl CooldownReason {
    fn from_u64(v: u64) -> Self {
        match v {
            1 => CooldownReason::RateLimited,
            2 => CooldownReason::Disabled,
            3 => CooldownReason::ServerError,
            _ => CooldownReason::None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            CooldownReason::None => "healthy",
            CooldownReason::RateLimited => "rate_limited",
            CooldownReason::Disabled => "disabled",
            CooldownReason::ServerError => "server_error",
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

const HEADER_FIELDS: usize = 5; // failures, open_until_ms, probes_used, probes_since_ms, epoch
const KEY_FIELDS: usize = 5; // id hash, until_ms, reason, probation left, flags

type Slot = [u64; KEY_FIELDS];

/// Slot flags. The key was disabled in the configuration last applied.
const WAS_DISABLED: u64 = 1;
/// Refused with 401/402/403 while on probation: out of the rotation until it enters the pool again.
const REVOKED: u64 = 2;
/// Not named by the configuration last applied.
const REMOVED: u64 = 4;
/// The provider announced what this key has left ([`crate::failover::pace`]): the provider's
/// pacing entry is read from then on. Set once, by the first answer that announced.
const ANNOUNCES: u64 = 8;

/// Slots of removed keys kept (newest first): a removed key that comes back within this many
/// removals is recognised as returning, an older one as new; both start probation.
const MAX_REMOVED: usize = 16;

/// What an attempt saw of its provider's circuit when it began: judged against it when the attempt
/// reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    pub failures: u64,
    pub epoch: u64,
}

/// What keeps a provider from taking a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocker {
    /// Every usable key cools down after the provider's 429s.
    RateLimited,
    /// Every usable key rests after a 5xx or an attempt that got no answer.
    ServerErrors,
    /// The provider's circuit is open (or half-open with its probes taken).
    CircuitOpen,
    /// Every usable key was refused by the provider (401/402/403).
    KeysRefused,
    /// Every key is disabled in the configuration (or refused on probation).
    KeysDisabled,
}

impl Blocker {
    pub fn as_str(self) -> &'static str {
        match self {
            Blocker::RateLimited => "rate_limited",
            Blocker::ServerErrors => "server_errors",
            Blocker::CircuitOpen => "circuit_open",
            Blocker::KeysRefused => "keys_refused",
            Blocker::KeysDisabled => "keys_disabled",
        }
    }
}

/// Until when a provider cannot take a request, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    pub until_ms: u64,
    pub by: Blocker,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderHealth {
    /// The current run of failures (see the module's doc), `circuit_failures` or more while the
    /// circuit is open or half-open.
    pub failures: u64,
    /// Bumped by every success that ends a run: failures of attempts that saw an older epoch began
    /// before it and do not count.
    pub epoch: u64,
    pub open_until_ms: u64,
    pub probes_used: u64,
    pub probes_since_ms: u64,
    /// Per key of the provider, in config order: (cooldown until, reason).
    pub keys: Vec<(u64, CooldownReason)>,
    /// Per key, in config order: requests left on probation (0: a full member of the pool).
    pub probation: Vec<u64>,
    /// Per key, in config order: the slot's flags.
    flags: Vec<u64>,
    /// Per key, in config order: disabled in the configuration (not stored: the config says it).
    pub disabled: Vec<bool>,
    /// Slots of keys this configuration does not name, written back as they were.
    others: Vec<Slot>,
}

/// When every key of a provider is disabled in the configuration there is no moment it is back:
/// clients are told to retry after this long, when a configuration change may have enabled one.
const ALL_DISABLED_RETRY_MS: u64 = 60_000;

pub fn entry_key(provider: &str) -> String {
    // Concatenated: made on every admission and attempt, where format! cost ~200 instructions more.
    ["tollgate:h3:", provider].concat()
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

/// The entry's header and slots.
fn split(bytes: &[u8]) -> ([u64; HEADER_FIELDS], Vec<Slot>) {
    let header = decode_u64s::<HEADER_FIELDS>(Some(bytes));
    let slots = bytes
        .get(HEADER_FIELDS * 8..)
        .unwrap_or(&[])
        .chunks_exact(KEY_FIELDS * 8)
        .map(|c| decode_u64s::<KEY_FIELDS>(Some(c)))
        .collect();
    (header, slots)
}

fn join(header: &[u64; HEADER_FIELDS], slots: &[Slot]) -> Vec<u8> {
    let mut v = encode_u64s(header);
    for s in slots {
        v.extend(encode_u64s(s));
    }
    v
}

impl ProviderHealth {
    pub fn decode(bytes: Option<&[u8]>, provider: &Provider) -> Self {
        let (header, mut others) = split(bytes.unwrap_or(&[]));
        let [failures, open_until_ms, probes_used, probes_since_ms, epoch] = header;
        let n = provider.keys.len();
        let (mut keys, mut probation, mut flags) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for k in &provider.keys {
            let h = fnv1a(k.id.as_bytes());
            let slot = others
                .iter()
                .position(|s| s[0] == h)
                .map(|i| others.remove(i))
                .unwrap_or([h, 0, 0, 0, 0]);
            let [_, until, reason, left, f] = slot;
            keys.push((until, CooldownReason::from_u64(reason)));
            probation.push(left);
            flags.push(f);
        }
        ProviderHealth {
            disabled: provider.keys.iter().map(|k| k.disabled).collect(),
            failures,
            epoch,
            open_until_ms,
            probes_used,
            probes_since_ms,
            keys,
            probation,
            flags,
            others,
        }
    }

    pub fn encode(&self, provider: &Provider) -> Vec<u8> {
        let header = [
            self.failures,
            self.open_until_ms,
            self.probes_used,
            self.probes_since_ms,
            self.epoch,
        ];
        let mut slots: Vec<Slot> = Vec::with_capacity(provider.keys.len() + self.others.len());
        for (i, (k, (until, reason))) in provider.keys.iter().zip(&self.keys).enumerate() {
            slots.push([
                fnv1a(k.id.as_bytes()),
                *until,
                *reason as u64,
                self.probation_left(i),
                self.flags.get(i).copied().unwrap_or(0),
            ]);
        }
        slots.extend_from_slice(&self.others);
        join(&header, &slots)
    }

    pub fn key_available(&self, idx: usize, now_ms: u64) -> bool {
        !self.key_disabled(idx)
            && self
                .keys
                .get(idx)
                .map(|(until, _)| *until <= now_ms)
                .unwrap_or(false)
    }

    /// Out of the rotation whatever its cooldown: disabled in the configuration, or refused while
    /// on probation.
    pub fn key_disabled(&self, idx: usize) -> bool {
        self.disabled.get(idx).copied().unwrap_or(false) || self.key_revoked(idx)
    }

    /// Refused with 401/402/403 while on probation, and not back in the pool since.
    pub fn key_revoked(&self, idx: usize) -> bool {
        self.flags.get(idx).is_some_and(|f| f & REVOKED != 0)
    }

    /// The provider announced what one of its keys has left: its keys are paced.
    pub fn announces(&self) -> bool {
        self.flags.iter().any(|f| f & ANNOUNCES != 0)
    }

    /// Requests the key has left on probation (0: it takes its full share).
    pub fn probation_left(&self, idx: usize) -> u64 {
        self.probation.get(idx).copied().unwrap_or(0)
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
        self.earliest_key(now_ms).until_ms
    }

    /// When the first key of the provider is usable again, and what holds the keys back until then
    /// (meaningless when that is now).
    fn earliest_key(&self, now_ms: u64) -> Blocked {
        if self.keys.is_empty() {
            return Blocked {
                until_ms: now_ms,
                by: Blocker::KeysDisabled,
            };
        }
        self.keys
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.key_disabled(*i))
            .map(|(_, (until, reason))| Blocked {
                until_ms: (*until).max(now_ms),
                by: match reason {
                    CooldownReason::RateLimited | CooldownReason::None => Blocker::RateLimited,
                    CooldownReason::ServerError => Blocker::ServerErrors,
                    CooldownReason::Disabled => Blocker::KeysRefused,
                },
            })
            .min_by_key(|b| b.until_ms)
            .unwrap_or(Blocked {
                until_ms: now_ms.saturating_add(ALL_DISABLED_RETRY_MS),
                by: Blocker::KeysDisabled,
            })
    }

    /// What this attempt sees of the circuit as it begins.
    pub fn seen(&self) -> Seen {
        Seen {
            failures: self.failures,
            epoch: self.epoch,
        }
    }

    /// What keeps the provider from taking a request now, and until when: the later of its keys'
    /// earliest return and its open circuit. None when it can take one now (a half-open circuit
    /// included: whether a probe slot is left is [`try_acquire`]'s).
    pub fn blocked(&self, cfg: &Health, now_ms: u64) -> Option<Blocked> {
        let keys = self.earliest_key(now_ms);
        match self.circuit(cfg, now_ms) {
            Circuit::Open { until_ms } if until_ms >= keys.until_ms => Some(Blocked {
                until_ms,
                by: Blocker::CircuitOpen,
            }),
            _ if keys.until_ms > now_ms => Some(keys),
            _ => None,
        }
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
}

pub fn read<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
) -> Result<ProviderHealth, StoreError> {
    read_keeping_bytes(store, provider).map(|(health, _)| health)
}

/// [`read`], with the bytes it was read from (empty when the provider has no entry yet): the
/// listener hands them to the first attempt as they are, where encoding the reading again would
/// give the attempt the same health.
pub fn read_keeping_bytes<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
) -> Result<(ProviderHealth, Vec<u8>), StoreError> {
    let (bytes, _) = store.get(&entry_key(&provider.name))?;
    let health = ProviderHealth::decode(bytes.as_deref(), provider);
    Ok((health, bytes.unwrap_or_default()))
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
        // A rate-limited key on probation starts its count over.
        if let Some(left) = h.probation.get_mut(idx) {
            if *left > 0 && reason == CooldownReason::RateLimited {
                *left = u64::from(provider.probation.requests);
            }
        }
    })
}

/// Marks key `idx` as announced by its provider (see [`ProviderHealth::announces`]).
pub fn mark_announcing<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
    idx: usize,
) -> Result<(), StoreError> {
    modify(store, provider, |h| {
        if let Some(f) = h.flags.get_mut(idx) {
            *f |= ANNOUNCES;
        }
    })
}

/// What a 401/402/403 did to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// On probation: out of the rotation until it enters the pool again through a configuration
    /// change (see [`reconcile`]).
    Revoked,
    /// A full member of the pool: cooling down until the given time, as a dead or unpaid key.
    Cooling,
}

/// A key refused by the provider (401/402/403). Whether it was on probation is read from the
/// entry, not from the attempt's older snapshot.
pub fn refuse<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
    idx: usize,
    until_ms: u64,
) -> Result<Refusal, StoreError> {
    modify(store, provider, |h| {
        if h.probation_left(idx) > 0 {
            if let (Some(f), Some(left)) = (h.flags.get_mut(idx), h.probation.get_mut(idx)) {
                *f |= REVOKED;
                *left = 0;
            }
            return Refusal::Revoked;
        }
        if let Some(slot) = h.keys.get_mut(idx) {
            if until_ms > slot.0 {
                *slot = (until_ms, CooldownReason::Disabled);
            }
        }
        Refusal::Cooling
    })
}

/// A key on probation answered (2xx): one request fewer to go. Returns the requests it has left
/// (0: it takes its full share from now on), or None (and writes nothing) when it was not on
/// probation any more.
pub fn probation_answered<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
    idx: usize,
) -> Result<Option<u64>, StoreError> {
    update_if(store, &entry_key(&provider.name), |cur| {
        let mut h = ProviderHealth::decode(cur, provider);
        match h.probation.get_mut(idx) {
            Some(left) if *left > 0 => {
                *left -= 1;
                let left = *left;
                (Some(h.encode(provider)), Some(left))
            }
            _ => (None, None),
        }
    })
    .map(|(left, _)| left)
}

/// Applies a configuration's key pool to the provider's entry; returns the ids of the keys that
/// entered the pool (and start probation, unless `probation.requests` is 0).
///
/// A pool without an entry is born without probation (the first start). Otherwise a key enters when
/// the entry has no slot for its id, or its slot was disabled (or not named) when a configuration
/// was last applied, and it is enabled now. Idempotent: every VM applies the same configuration,
/// and only the first write changes anything.
pub fn reconcile<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
) -> Result<Vec<String>, StoreError> {
    let requests = u64::from(provider.probation.requests);
    update_if(store, &entry_key(&provider.name), |cur| {
        let flags_of = |disabled: bool| if disabled { WAS_DISABLED } else { 0 };
        let Some(bytes) = cur else {
            let slots: Vec<Slot> = provider
                .keys
                .iter()
                .map(|k| [fnv1a(k.id.as_bytes()), 0, 0, 0, flags_of(k.disabled)])
                .collect();
            return (Some(join(&[0; HEADER_FIELDS], &slots)), Vec::new());
        };
        let (header, mut rest) = split(bytes);
        let mut entered = Vec::new();
        let mut changed = false;
        let mut slots: Vec<Slot> = Vec::with_capacity(provider.keys.len() + rest.len());
        for k in &provider.keys {
            let h = fnv1a(k.id.as_bytes());
            let found = rest.iter().position(|s| s[0] == h).map(|i| rest.remove(i));
            let next = match found {
                None if k.disabled => [h, 0, 0, 0, WAS_DISABLED],
                None => {
                    entered.push(k.id.clone());
                    [h, 0, 0, requests, 0]
                }
                Some([_, until, reason, _, flags])
                    if !k.disabled && flags & (WAS_DISABLED | REMOVED) != 0 =>
                {
                    // Back in the pool: a revocation ends here; a cooldown it kept stays.
                    entered.push(k.id.clone());
                    [h, until, reason, requests, 0]
                }
                // A shorter (or no) probation in the new configuration applies at once.
                Some([_, until, reason, left, flags]) => [
                    h,
                    until,
                    reason,
                    left.min(requests),
                    (flags & !(WAS_DISABLED | REMOVED)) | flags_of(k.disabled),
                ],
            };
            changed |= found != Some(next);
            slots.push(next);
        }
        // The rest are keys this configuration does not name: remembered as removed, the most
        // recently removed first (they follow the keys of the configuration that named them).
        for (i, mut s) in rest.into_iter().enumerate() {
            if i >= MAX_REMOVED {
                changed = true;
                continue;
            }
            changed |= s[4] & REMOVED == 0;
            s[4] |= REMOVED;
            slots.push(s);
        }
        (changed.then(|| join(&header, &slots)), entered)
    })
    .map(|(entered, _)| entered)
}

/// [`reconcile`] for every provider of a configuration (when it is applied): a log line per key that
/// entered a pool, naming it by id. Errors are logged, not fatal: the pool then works without the
/// change's probation.
pub fn apply_config<S: SharedStore + ?Sized>(store: &S, providers: &[Provider]) -> Vec<String> {
    let mut lines = Vec::new();
    for p in providers {
        match reconcile(store, p) {
            Ok(entered) => lines.extend(entered.into_iter().map(|id| {
                if p.probation.requests == 0 {
                    format!("key {}/{id} entered the pool", p.name)
                } else {
                    format!(
                        "key {}/{id} entered the pool on probation: {}% of a full share until it has answered {} requests",
                        p.name, p.probation.share_percent, p.probation.requests
                    )
                }
            })),
            Err(e) => lines.push(format!(
                "provider {}: key pool not reconciled with shared data ({e:?}): keys that entered it take their full share at once",
                p.name
            )),
        }
    }
    lines
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

/// An attempt that began having seen `seen` failed (5xx, or no answer): the run of failures grows to
/// one past what the attempt saw, unless a success ended that run since it began; `rest` puts the
/// attempt's key on a server-error cooldown (key index, until) in the same write. Returns true when
/// this failure opened the circuit (or reopened it: a failed half-open probe).
pub fn failed<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
    cfg: &Health,
    seen: Seen,
    now_ms: u64,
    rest: Option<(usize, u64)>,
) -> Result<bool, StoreError> {
    modify(store, provider, |h| {
        if let Some((idx, until_ms)) = rest {
            if let Some(slot) = h.keys.get_mut(idx) {
                if until_ms > slot.0 {
                    *slot = (until_ms, CooldownReason::ServerError);
                }
            }
        }
        if h.epoch != seen.epoch {
            return false; // began before the last reset
        }
        let threshold = u64::from(cfg.circuit_failures);
        let was = h.circuit(cfg, now_ms);
        h.failures = h.failures.max(seen.failures.saturating_add(1));
        let tripped = match was {
            Circuit::Closed => h.failures >= threshold,
            // Only an attempt that began on a tripped circuit (a probe) reopens it.
            Circuit::HalfOpen => seen.failures >= threshold,
            Circuit::Open { .. } => false,
        };
        if tripped {
            h.open_until_ms = now_ms.saturating_add(cfg.circuit_open_ms);
            h.probes_used = 0;
            h.probes_since_ms = 0;
        }
        tripped
    })
}

/// An attempt that began having seen `seen` was answered (anything but a 5xx, 429 or 401-403): the
/// failures it saw, and those of attempts that ran beside it, are over; failures of attempts that
/// began after it stay. The circuit closes when fewer than `circuit_failures` remain. Nothing to do
/// (no host call) when the attempt saw no failure, and no write when a success ended that run
/// already. Returns whether it wrote.
pub fn answered<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
    cfg: &Health,
    seen: Seen,
) -> Result<bool, StoreError> {
    if seen.failures == 0 {
        return Ok(false); // the common case: no host call at all
    }
    update_if(store, &entry_key(&provider.name), |cur| {
        let mut h = ProviderHealth::decode(cur, provider);
        if h.epoch != seen.epoch {
            return (None, false);
        }
        h.failures = h.failures.saturating_sub(seen.failures.saturating_add(1));
        h.epoch = h.epoch.wrapping_add(1);
        if h.failures < u64::from(cfg.circuit_failures) {
            h.open_until_ms = 0;
            h.probes_used = 0;
            h.probes_since_ms = 0;
        }
        (Some(h.encode(provider)), true)
    })
    .map(|(wrote, _)| wrote)
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
        server_error_cooldown_ms: 1_000,
        circuit_failures: 3,
        circuit_open_ms: 10_000,
        half_open_probes: 1,
    };

    /// What an attempt beginning now sees.
    fn begin(s: &FakeStore, p: &Provider) -> Seen {
        read(s, p).unwrap().seen()
    }

    /// An attempt that began after every failure so far was on record failed at `t`.
    fn fail(s: &FakeStore, p: &Provider, t: u64) -> bool {
        let seen = begin(s, p);
        failed(s, p, &CFG, seen, t, None).unwrap()
    }

    fn circuit(s: &FakeStore, p: &Provider, t: u64) -> Circuit {
        read(s, p).unwrap().circuit(&CFG, t)
    }

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
            assert!(!fail(&s, &p, 100 + i));
            assert_eq!(circuit(&s, &p, 100 + i), Circuit::Closed);
        }
        assert!(fail(&s, &p, 200), "the third in a row opens it");
        assert_eq!(circuit(&s, &p, 200), Circuit::Open { until_ms: 10_200 });
        assert!(!try_acquire(&s, &p, &CFG, 10_199).unwrap());
        let probe = begin(&s, &p);
        assert!(
            try_acquire(&s, &p, &CFG, 10_200).unwrap(),
            "one probe in half-open"
        );
        assert!(!try_acquire(&s, &p, &CFG, 10_201).unwrap(), "only one");
        assert!(answered(&s, &p, &CFG, probe).unwrap());
        assert_eq!(circuit(&s, &p, 10_300), Circuit::Closed);
        assert_eq!(read(&s, &p).unwrap().failures, 0);
        assert!(try_acquire(&s, &p, &CFG, 10_301).unwrap());
    }

    #[test]
    fn failed_probe_reopens_and_lost_probe_expires() {
        let s = FakeStore::new();
        let p = provider(&["a"]);
        for t in 0..3 {
            fail(&s, &p, t);
        }
        let old = Seen {
            failures: 1,
            epoch: 0,
        };
        assert!(try_acquire(&s, &p, &CFG, 10_002).unwrap());
        assert!(
            !failed(&s, &p, &CFG, old, 10_003, None).unwrap(),
            "an attempt that began before the circuit opened is no probe"
        );
        assert_eq!(circuit(&s, &p, 10_003), Circuit::HalfOpen);
        assert!(fail(&s, &p, 10_003), "the probe failed");
        assert_eq!(circuit(&s, &p, 10_003), Circuit::Open { until_ms: 20_003 });
        assert!(try_acquire(&s, &p, &CFG, 20_003).unwrap());
        // The probe never reports; after another open period a new probe may go.
        assert!(!try_acquire(&s, &p, &CFG, 25_000).unwrap());
        assert!(try_acquire(&s, &p, &CFG, 30_003).unwrap());
    }

    /// A provider with keys `ids`, probation of `requests` at 10 %.
    fn on_probation(ids: &[&str], requests: u32) -> Provider {
        let mut p = provider(ids);
        p.probation = crate::config::Probation {
            requests,
            share_percent: 10,
        };
        p
    }

    fn left(s: &FakeStore, p: &Provider) -> Vec<u64> {
        read(s, p).unwrap().probation
    }

    #[test]
    fn a_pool_is_born_without_probation_and_a_key_added_later_starts_it() {
        let s = FakeStore::new();
        let a = on_probation(&["a", "b"], 20);
        assert_eq!(reconcile(&s, &a).unwrap(), Vec::<String>::new());
        assert_eq!(left(&s, &a), vec![0, 0], "first start: no probation");
        let b = on_probation(&["a", "b", "c"], 20);
        assert_eq!(reconcile(&s, &b).unwrap(), vec!["c".to_string()]);
        assert_eq!(left(&s, &b), vec![0, 0, 20]);
        // Every other VM applies the same configuration: nothing more is written.
        let bytes = s.get(&entry_key("p")).unwrap();
        for _ in 0..3 {
            assert!(reconcile(&s, &b).unwrap().is_empty());
        }
        assert_eq!(
            s.get(&entry_key("p")).unwrap(),
            bytes,
            "not even the CAS moved"
        );
        // Probation off: a key still enters, at its full share.
        let off = on_probation(&["a", "b", "c", "d"], 0);
        assert_eq!(reconcile(&s, &off).unwrap(), vec!["d".to_string()]);
        assert_eq!(left(&s, &off), vec![0, 0, 0, 0], "and c's probation ends");
    }

    #[test]
    fn a_key_back_from_disabled_or_removed_starts_probation_and_keeps_its_cooldown() {
        let s = FakeStore::new();
        let mut p = on_probation(&["a", "b"], 5);
        reconcile(&s, &p).unwrap();
        cool_key(&s, &p, 1, 9_000, CooldownReason::RateLimited).unwrap();
        p.keys[1].disabled = true;
        assert!(reconcile(&s, &p).unwrap().is_empty());
        assert!(reconcile(&s, &p).unwrap().is_empty());
        p.keys[1].disabled = false;
        assert_eq!(reconcile(&s, &p).unwrap(), vec!["b".to_string()]);
        let h = read(&s, &p).unwrap();
        assert_eq!(h.probation, vec![0, 5]);
        assert_eq!(h.keys[1], (9_000, CooldownReason::RateLimited));
        assert!(reconcile(&s, &p).unwrap().is_empty(), "once");

        // Removed, then named again: probation again.
        let without = on_probation(&["a"], 5);
        assert!(reconcile(&s, &without).unwrap().is_empty());
        assert_eq!(reconcile(&s, &p).unwrap(), vec!["b".to_string()]);
        // A key that is new but disabled enters when it is enabled.
        let mut q = on_probation(&["a", "b", "c"], 5);
        q.keys[2].disabled = true;
        assert!(reconcile(&s, &q).unwrap().is_empty());
        q.keys[2].disabled = false;
        assert_eq!(reconcile(&s, &q).unwrap(), vec!["c".to_string()]);
    }

    #[test]
    fn concurrent_reconciles_agree_and_only_one_announces_the_key() {
        /// A store where, just before the first write, another VM reconciles the same config.
        struct Racing<'a> {
            inner: &'a FakeStore,
            other: &'a Provider,
            raced: core::cell::Cell<bool>,
            announced: core::cell::RefCell<Vec<String>>,
        }
        impl SharedStore for Racing<'_> {
            fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
                self.inner.get(key)
            }
            fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
                if !self.raced.replace(true) {
                    let won = reconcile(self.inner, self.other).unwrap();
                    self.announced.borrow_mut().extend(won);
                }
                self.inner.set(key, value, cas)
            }
        }
        for first_start in [true, false] {
            let s = FakeStore::new();
            let a = on_probation(&["a", "b"], 20);
            if !first_start {
                reconcile(&s, &a).unwrap();
            }
            let b = on_probation(&["a", "b", "c"], 20);
            let racing = Racing {
                inner: &s,
                other: &b,
                raced: core::cell::Cell::new(false),
                announced: Default::default(),
            };
            let mine = reconcile(&racing, &b).unwrap();
            let mut all = racing.announced.take();
            all.extend(mine);
            let want: Vec<String> = if first_start {
                vec![]
            } else {
                vec!["c".into()]
            };
            assert_eq!(all, want, "first start: {first_start}");
            assert_eq!(
                left(&s, &b),
                if first_start {
                    vec![0, 0, 0]
                } else {
                    vec![0, 0, 20]
                }
            );
        }
        // And under injected CAS conflicts.
        let s = FakeStore::new();
        reconcile(&s, &on_probation(&["a"], 3)).unwrap();
        s.inject_conflicts.set(5);
        let p = on_probation(&["a", "b"], 3);
        assert_eq!(reconcile(&s, &p).unwrap(), vec!["b".to_string()]);
        assert_eq!(left(&s, &p), vec![0, 3]);
    }

    #[test]
    fn a_worker_on_the_previous_configuration_keeps_the_new_keys_probation() {
        let s = FakeStore::new();
        let old = on_probation(&["a", "b"], 4);
        reconcile(&s, &old).unwrap();
        let new = on_probation(&["c", "a", "b"], 4);
        reconcile(&s, &new).unwrap();
        // A worker still on `old` cools `b` and records a failure: c's slot survives.
        cool_key(&s, &old, 1, 7_000, CooldownReason::RateLimited).unwrap();
        fail(&s, &old, 1);
        let h = read(&s, &new).unwrap();
        assert_eq!(h.probation, vec![4, 0, 0]);
        assert_eq!(h.keys[2], (7_000, CooldownReason::RateLimited));
        assert_eq!(h.failures, 1);
    }

    #[test]
    fn removed_keys_are_remembered_up_to_a_bound() {
        let s = FakeStore::new();
        let ids: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
        for pair in ids.chunks(2) {
            let refs: Vec<&str> = pair.iter().map(String::as_str).collect();
            let p = on_probation(&refs, 3);
            reconcile(&s, &p).unwrap();
            cool_key(&s, &p, 0, 5_000, CooldownReason::RateLimited).unwrap();
        }
        let (bytes, _) = s.get(&entry_key("p")).unwrap();
        let (_, slots) = split(&bytes.unwrap());
        assert_eq!(slots.len(), 2 + MAX_REMOVED);
        // The most recently removed are the ones kept: k96 returns with its cooldown, k0 comes
        // back as new. Both start probation.
        let back = on_probation(&["k98", "k99", "k96", "k0"], 3);
        assert_eq!(
            reconcile(&s, &back).unwrap(),
            vec!["k96".to_string(), "k0".to_string()]
        );
        let h = read(&s, &back).unwrap();
        assert_eq!(h.keys[2], (5_000, CooldownReason::RateLimited));
        assert_eq!(h.keys[3], (0, CooldownReason::None));
    }

    #[test]
    fn probation_counts_down_on_answers_and_starts_over_on_429() {
        let s = FakeStore::new();
        reconcile(&s, &on_probation(&["a"], 3)).unwrap();
        let p = on_probation(&["a", "b"], 3);
        reconcile(&s, &p).unwrap();
        assert_eq!(probation_answered(&s, &p, 1).unwrap(), Some(2));
        assert_eq!(probation_answered(&s, &p, 1).unwrap(), Some(1));
        cool_key(&s, &p, 1, 100, CooldownReason::RateLimited).unwrap();
        assert_eq!(left(&s, &p), vec![0, 3], "a 429 starts the count over");
        for want in [2, 1, 0] {
            assert_eq!(probation_answered(&s, &p, 1).unwrap(), Some(want));
        }
        let calls = s.calls.get();
        assert_eq!(probation_answered(&s, &p, 1).unwrap(), None);
        assert_eq!(probation_answered(&s, &p, 0).unwrap(), None);
        assert_eq!(s.calls.get() - calls, 2, "a read each, no write");
        cool_key(&s, &p, 1, 200, CooldownReason::RateLimited).unwrap();
        assert_eq!(left(&s, &p), vec![0, 0], "a full member stays one");
    }

    #[test]
    fn a_refusal_on_probation_disables_the_key_until_it_enters_again() {
        let s = FakeStore::new();
        reconcile(&s, &on_probation(&["a"], 3)).unwrap();
        let mut p = on_probation(&["a", "b"], 3);
        reconcile(&s, &p).unwrap();
        assert_eq!(refuse(&s, &p, 1, 5_000).unwrap(), Refusal::Revoked);
        let h = read(&s, &p).unwrap();
        assert!(h.key_revoked(1) && !h.key_available(1, u64::MAX));
        assert_eq!(h.keys[1], (0, CooldownReason::None), "no cooldown: revoked");
        assert_eq!(h.earliest_key_ms(10), 10, "only `a` counts");
        assert!(
            reconcile(&s, &p).unwrap().is_empty(),
            "the same config: still out"
        );
        assert!(read(&s, &p).unwrap().key_revoked(1));
        // A full member refused cools down instead.
        assert_eq!(refuse(&s, &p, 0, 5_000).unwrap(), Refusal::Cooling);
        assert_eq!(
            read(&s, &p).unwrap().keys[0],
            (5_000, CooldownReason::Disabled)
        );
        // Disabled and enabled again: back on probation.
        p.keys[1].disabled = true;
        reconcile(&s, &p).unwrap();
        p.keys[1].disabled = false;
        assert_eq!(reconcile(&s, &p).unwrap(), vec!["b".to_string()]);
        let h = read(&s, &p).unwrap();
        assert!(!h.key_revoked(1) && h.key_available(1, 0));
        assert_eq!(h.probation, vec![0, 3]);
    }

    #[test]
    fn the_old_layouts_are_never_read() {
        let s = FakeStore::new();
        let p = provider(&["a"]);
        // Entries of the previous layouts under their names: 3 fields a key, then a 4-field header
        // without the epoch (here with an open circuit).
        let old = encode_u64s(&[0, 0, 0, 0, fnv1a(b"a"), u64::MAX, 1]);
        s.set("tollgate:h:p", &old, None).unwrap();
        let h2 = encode_u64s(&[9, u64::MAX, 0, 0, fnv1a(b"a"), u64::MAX, 1, 0, 0]);
        s.set("tollgate:h2:p", &h2, None).unwrap();
        let h = read(&s, &p).unwrap();
        assert!(h.key_available(0, 0) && h.circuit(&CFG, 0) == Circuit::Closed);
    }

    #[test]
    fn success_on_healthy_provider_writes_nothing() {
        let s = FakeStore::new();
        let p = provider(&["a"]);
        assert!(!answered(&s, &p, &CFG, Seen::default()).unwrap());
        assert_eq!(s.calls.get(), 0, "not even a read");
        assert!(s.is_empty());
        // A success whose attempt saw failures that a success ended since reads, and writes nothing.
        fail(&s, &p, 1);
        let seen = begin(&s, &p);
        assert!(answered(&s, &p, &CFG, seen).unwrap());
        let calls = s.calls.get();
        assert!(!answered(&s, &p, &CFG, seen).unwrap());
        assert_eq!(s.calls.get() - calls, 1, "one read, no write");
    }

    #[test]
    fn failures_of_attempts_side_by_side_are_one_step() {
        // One key failing while its neighbours answer: the attempts in flight together all saw a
        // clean circuit, so however many of them fail, the run is one long.
        let s = FakeStore::new();
        let p = provider(&["a", "b", "c"]);
        let burst = begin(&s, &p);
        for t in 0..10 {
            assert!(!failed(&s, &p, &CFG, burst, 100 + t, Some((2, 1_100 + t))).unwrap());
        }
        let h = read(&s, &p).unwrap();
        assert_eq!((h.failures, h.circuit(&CFG, 200)), (1, Circuit::Closed));
        assert_eq!(h.key_state(2, 200), (CooldownReason::ServerError, 1_109));
        assert!(h.key_available(0, 200) && h.blocked(&CFG, 200).is_none());
        // An attempt that began after them saw the run, and its success ends it.
        let next = begin(&s, &p);
        assert!(answered(&s, &p, &CFG, next).unwrap());
        assert_eq!(read(&s, &p).unwrap().failures, 0);
    }

    #[test]
    fn a_success_ends_the_failures_that_began_before_it_not_those_after() {
        let s = FakeStore::new();
        let p = provider(&["a", "b"]);
        fail(&s, &p, 1);
        let success = begin(&s, &p); // saw one failure
        let in_flight = begin(&s, &p);
        fail(&s, &p, 2); // began beside the success: the same step
        fail(&s, &p, 3); // began after that failure was on record: after the success began
        assert_eq!(read(&s, &p).unwrap().failures, 3);
        assert!(answered(&s, &p, &CFG, success).unwrap());
        let h = read(&s, &p).unwrap();
        assert_eq!((h.failures, h.epoch), (1, 1), "the one after it stays");
        // A failure of an attempt that began before that reset does not count.
        assert!(!failed(&s, &p, &CFG, in_flight, 4, None).unwrap());
        assert_eq!(read(&s, &p).unwrap().failures, 1);
        // Nor does a success of such an attempt end anything.
        assert!(!answered(&s, &p, &CFG, in_flight).unwrap());
        assert_eq!(read(&s, &p).unwrap().failures, 1);
    }

    #[test]
    fn a_success_from_before_the_circuit_opened_closes_it_only_when_no_failure_came_after_it() {
        let s = FakeStore::new();
        let p = provider(&["a"]);
        fail(&s, &p, 1);
        let early = begin(&s, &p); // saw 1
        fail(&s, &p, 2);
        let late = begin(&s, &p); // saw 2
        assert!(fail(&s, &p, 3));
        assert!(answered(&s, &p, &CFG, early).unwrap());
        let h = read(&s, &p).unwrap();
        assert_eq!((h.failures, h.circuit(&CFG, 4)), (1, Circuit::Closed));
        assert!(
            !answered(&s, &p, &CFG, late).unwrap(),
            "a reset came since it began"
        );
        assert_eq!(read(&s, &p).unwrap().failures, 1);
    }

    #[test]
    fn what_blocks_a_provider_and_until_when() {
        let s = FakeStore::new();
        let mut p = provider(&["a", "b"]);
        let blocked = |s: &FakeStore, p: &Provider, t| read(s, p).unwrap().blocked(&CFG, t);
        assert_eq!(blocked(&s, &p, 0), None);
        cool_key(&s, &p, 0, 5_000, CooldownReason::RateLimited).unwrap();
        assert_eq!(blocked(&s, &p, 0), None, "b is free");
        failed(&s, &p, &CFG, Seen::default(), 0, Some((1, 800))).unwrap();
        let by = |until_ms, by| Some(Blocked { until_ms, by });
        assert_eq!(blocked(&s, &p, 0), by(800, Blocker::ServerErrors));
        assert_eq!(blocked(&s, &p, 900), None, "b is back");
        refuse(&s, &p, 1, 9_000).unwrap();
        assert_eq!(blocked(&s, &p, 900), by(5_000, Blocker::RateLimited));
        assert_eq!(blocked(&s, &p, 6_000), None, "a is back");
        refuse(&s, &p, 0, 12_000).unwrap();
        assert_eq!(blocked(&s, &p, 6_000), by(9_000, Blocker::KeysRefused));
        // An open circuit blocks until it half-opens, unless the keys are back later still.
        fail(&s, &p, 10_000);
        fail(&s, &p, 10_000);
        assert_eq!(blocked(&s, &p, 10_000), by(20_000, Blocker::CircuitOpen));
        assert_eq!(blocked(&s, &p, 20_000), None, "half-open");
        cool_key(&s, &p, 0, 40_000, CooldownReason::RateLimited).unwrap();
        refuse(&s, &p, 1, 40_000).unwrap();
        assert_eq!(blocked(&s, &p, 15_000), by(40_000, Blocker::RateLimited));
        p.keys[0].disabled = true;
        p.keys[1].disabled = true;
        assert_eq!(
            blocked(&s, &p, 50_000),
            by(50_000 + ALL_DISABLED_RETRY_MS, Blocker::KeysDisabled)
        );
    }
}
