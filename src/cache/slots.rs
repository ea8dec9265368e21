//! The cache in Envoy's shared data, which has no delete and no time-to-live: a fixed number of
//! slots that new entries overwrite, so memory stays within `capacity` x `max_entry_bytes` however
//! long Envoy runs.
//!
//! The slots are grouped in sets of [`WAYS`]; a digest picks its set. Each set has an index (one
//! small value: what each way holds) and one value per way (the entry). A lookup reads the index,
//! and the entry only when the index says it is there: a miss costs one small read. A store
//! writes the index first (one CAS loop, choosing the way: its own, an empty one, a dead one, else
//! the older), then the entry. Two writers racing for a way can leave an index naming one request
//! and an entry holding another's; the reader checks the entry's own digest, so that is a miss,
//! never a wrong answer.

use super::entry::{age, Age, Entry, Index, Way, WAYS};
use super::key::Digest;
use crate::config::cache::CacheConfig;
use crate::store::{update, SharedStore, StoreError};

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Fresh(Entry),
    /// An expired entry within the stale window, in this way of the request's set: read only if
    /// no provider can answer ([`fetch`]).
    Stale {
        way: usize,
    },
    Miss,
}

fn set_of(cfg: &CacheConfig, digest: &Digest) -> u64 {
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(head) % sets(cfg)
}

/// Sets of [`WAYS`] slots: `capacity` rounded down to a multiple of the ways, at least one set.
pub fn sets(cfg: &CacheConfig) -> u64 {
    (cfg.capacity / WAYS as u64).max(1)
}

fn index_key(set: u64) -> String {
    format!("tollgate:cache:i:{set}")
}

fn entry_key(set: u64, way: usize) -> String {
    format!("tollgate:cache:e:{set}:{way}")
}

pub fn lookup<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &CacheConfig,
    digest: &Digest,
    now: u64,
) -> Result<Found, StoreError> {
    let (bytes, _) = store.get(&index_key(set_of(cfg, digest)))?;
    let index = Index::decode(bytes.as_deref());
    let Some(w) = index.find(digest) else {
        return Ok(Found::Miss);
    };
    let way = index.ways[w];
    Ok(
        match age(way.stored_at_ms, way.ttl_ms, now, cfg.ttl_ms, cfg.stale_ms) {
            Age::Dead => Found::Miss,
            Age::Stale => Found::Stale { way: w },
            Age::Fresh => match fetch(store, cfg, digest, w, now)? {
                Some((e, Age::Fresh)) => Found::Fresh(e),
                Some((_, _)) => Found::Stale { way: w },
                None => Found::Miss,
            },
        },
    )
}

/// The entry in `way` of the digest's set, if it is the digest's and not dead, with its age.
pub fn fetch<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &CacheConfig,
    digest: &Digest,
    way: usize,
    now: u64,
) -> Result<Option<(Entry, Age)>, StoreError> {
    let (bytes, _) = store.get(&entry_key(set_of(cfg, digest), way))?;
    let Some(e) = bytes.as_deref().and_then(Entry::decode) else {
        return Ok(None);
    };
    if e.digest != *digest {
        return Ok(None);
    }
    let a = age(e.stored_at_ms, e.ttl_ms, now, cfg.ttl_ms, cfg.stale_ms);
    Ok((a != Age::Dead).then_some((e, a)))
}

/// What storing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Another request's live entry was overwritten.
    pub evicted: bool,
}

pub fn put<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &CacheConfig,
    entry: &Entry,
    now: u64,
) -> Result<Stored, StoreError> {
    let set = set_of(cfg, &entry.digest);
    let way = Way {
        digest: entry.digest,
        stored_at_ms: entry.stored_at_ms.max(1),
        ttl_ms: entry.ttl_ms,
    };
    let ((w, evicted), _) = update(store, &index_key(set), |cur| {
        let mut index = Index::decode(cur);
        let (w, evicted) = index.place(&entry.digest, now, cfg.ttl_ms, cfg.stale_ms);
        if let Some(slot) = index.ways.get_mut(w) {
            *slot = way;
        }
        (index.encode(), (w, evicted))
    })?;
    store.set(&entry_key(set, w), &entry.encode(), None)?;
    Ok(Stored { evicted })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::errors::ClientApi;
    use crate::count::usage::Usage;
    use crate::store::FakeStore;

    fn cfg(capacity: u64, stale_ms: u64) -> CacheConfig {
        CacheConfig {
            capacity,
            ttl_ms: 10_000,
            stale_ms,
            ..CacheConfig::default()
        }
    }

    fn entry(d: u8, at: u64) -> Entry {
        Entry {
            digest: [d; 32],
            stored_at_ms: at,
            ttl_ms: 10_000,
            usage: Usage::default(),
            client: ClientApi::OpenAi,
            body: format!("answer {d}").into_bytes(),
        }
    }

    #[test]
    fn stored_then_fresh_then_stale_then_gone() {
        let s = FakeStore::new();
        let c = cfg(8, 5_000);
        let e = entry(1, 1_000);
        assert_eq!(lookup(&s, &c, &e.digest, 1_000), Ok(Found::Miss));
        assert_eq!(put(&s, &c, &e, 1_000), Ok(Stored { evicted: false }));
        assert_eq!(
            lookup(&s, &c, &e.digest, 2_000),
            Ok(Found::Fresh(e.clone()))
        );
        let Ok(Found::Stale { way }) = lookup(&s, &c, &e.digest, 11_000) else {
            panic!("not stale")
        };
        assert_eq!(
            fetch(&s, &c, &e.digest, way, 11_000),
            Ok(Some((e.clone(), Age::Stale)))
        );
        assert_eq!(lookup(&s, &c, &e.digest, 16_000), Ok(Found::Miss));
        assert_eq!(fetch(&s, &c, &e.digest, way, 16_000), Ok(None));
        let no_stale = cfg(8, 0);
        assert_eq!(lookup(&s, &no_stale, &e.digest, 11_000), Ok(Found::Miss));
    }

    #[test]
    fn one_set_keeps_two_entries_and_a_third_evicts_the_older() {
        let s = FakeStore::new();
        let c = cfg(2, 0);
        let (a, b, x) = (entry(1, 1_000), entry(2, 2_000), entry(3, 3_000));
        put(&s, &c, &a, 1_000).unwrap();
        put(&s, &c, &b, 2_000).unwrap();
        assert_eq!(
            lookup(&s, &c, &a.digest, 3_000),
            Ok(Found::Fresh(a.clone()))
        );
        assert_eq!(
            lookup(&s, &c, &b.digest, 3_000),
            Ok(Found::Fresh(b.clone()))
        );
        assert_eq!(put(&s, &c, &x, 3_000), Ok(Stored { evicted: true }));
        assert_eq!(lookup(&s, &c, &a.digest, 3_000), Ok(Found::Miss));
        assert_eq!(
            lookup(&s, &c, &x.digest, 3_000),
            Ok(Found::Fresh(x.clone()))
        );
        // Storing the same request again refreshes its own way: no eviction.
        let x2 = entry(3, 4_000);
        assert_eq!(put(&s, &c, &x2, 4_000), Ok(Stored { evicted: false }));
        assert_eq!(lookup(&s, &c, &b.digest, 4_000), Ok(Found::Fresh(b)));
        // The key space is the slots and the index: nothing more, whatever was stored.
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn an_entry_that_is_not_the_requests_is_never_served() {
        let s = FakeStore::new();
        let c = cfg(2, 0);
        let a = entry(1, 1_000);
        put(&s, &c, &a, 1_000).unwrap();
        // Another writer's entry landed in the way the index names for `a`.
        let other = entry(2, 1_500);
        s.set(&entry_key(0, 0), &other.encode(), None).unwrap();
        assert_eq!(lookup(&s, &c, &a.digest, 2_000), Ok(Found::Miss));
        s.set(&entry_key(0, 0), b"garbage", None).unwrap();
        assert_eq!(lookup(&s, &c, &a.digest, 2_000), Ok(Found::Miss));
    }

    #[test]
    fn a_broken_store_is_an_error_not_a_hit() {
        let s = FakeStore::new();
        let c = cfg(4, 0);
        put(&s, &c, &entry(1, 1), 1).unwrap();
        s.broken.set(true);
        assert_eq!(lookup(&s, &c, &[1; 32], 2), Err(StoreError::Host));
        assert_eq!(put(&s, &c, &entry(1, 1), 2), Err(StoreError::Host));
    }
}
