//! Consumer and admin keys as SHA-256 digests: the config holds digests, never the keys themselves
//! (RustCrypto's `sha2`). A presented consumer key is looked up by its digest in a map (see
//! `config/lookup.rs` for why that tells a caller nothing); the admin key is compared in constant
//! time (`subtle`).
//!
//! [`PresentedKeys`] spares a worker's repeat callers the digest: the keys that matched, by their
//! bytes.

use crate::maps::HashMap;
use core::cell::RefCell;
use core::fmt;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub type KeyDigest = [u8; 32];

pub fn digest(key: &[u8]) -> KeyDigest {
    Sha256::digest(key).into()
}

/// Constant-time equality of two digests.
pub fn same(a: &KeyDigest, b: &KeyDigest) -> bool {
    a.ct_eq(b).into()
}

/// A digest written as 64 hex digits (either case), as `sha256sum` prints it.
pub fn from_hex(s: &str) -> Option<KeyDigest> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Presented consumer keys that matched a consumer, each with what it matched (the consumer's
/// index): a worker's repeat callers skip the SHA-256, which was about a third of the listener's
/// request headers callback (3,500 of its 11,000 instructions natively; Wasm has no SHA
/// instructions). Bounded: only keys that matched are kept, so a caller trying keys cannot fill
/// it, and at most [`PresentedKeys::CAPACITY`] of them, emptied when full. It belongs to one parsed
/// configuration (one worker's): a configuration read anew starts empty, so a key taken out of it
/// is never served from here. The keys were in the request's headers in the same memory; they are
/// compared in constant time once their hashes meet, and `Debug` shows how many, never one.
#[derive(Default)]
pub struct PresentedKeys(RefCell<HashMap<Presented, usize>>);

impl PresentedKeys {
    pub const CAPACITY: usize = 1024;

    /// What `key` matched: from the cache, else `find` (given its digest), kept when it matched.
    pub fn get_or_find(
        &self,
        key: &[u8],
        find: impl FnOnce(&KeyDigest) -> Option<usize>,
    ) -> Option<usize> {
        let probe = Presented(key.into());
        if let Some(&i) = self.0.borrow().get(&probe) {
            return Some(i);
        }
        let found = find(&digest(key))?;
        let mut keys = self.0.borrow_mut();
        if keys.len() >= Self::CAPACITY {
            keys.clear();
        }
        keys.insert(probe, found);
        Some(found)
    }

    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A copy of a configuration is a configuration read anew: it starts with no keys.
impl Clone for PresentedKeys {
    fn clone(&self) -> Self {
        PresentedKeys::default()
    }
}

impl fmt::Debug for PresentedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PresentedKeys({} keys)", self.len())
    }
}

/// A presented key's bytes, equal to another in constant time (the same bytes, so a hash that
/// agrees with it).
struct Presented(Box<[u8]>);

impl core::hash::Hash for Presented {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for Presented {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Presented {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_sha256sum() {
        // printf 'team-a-secret' | sha256sum
        let d = digest(b"abc");
        assert_eq!(
            Some(d),
            from_hex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(
            Some(d),
            from_hex("BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD")
        );
        assert!(same(&d, &digest(b"abc")));
        assert!(!same(&d, &digest(b"abd")));
        assert_eq!(from_hex("ba78"), None);
        assert_eq!(from_hex(&"zz".repeat(32)), None);
    }

    #[test]
    fn presented_keys_keep_only_matches_bounded_and_never_show_one() {
        let keys = PresentedKeys::default();
        let known = digest(b"sk-team-a");
        let finds = core::cell::Cell::new(0);
        let find = |d: &KeyDigest| {
            finds.set(finds.get() + 1);
            (*d == known).then_some(7)
        };
        assert_eq!(keys.get_or_find(b"sk-team-a", find), Some(7));
        assert_eq!(keys.get_or_find(b"sk-team-a", find), Some(7));
        assert_eq!(finds.get(), 1, "the second time from the cache");
        assert_eq!(keys.get_or_find(b"sk-team-b", find), None);
        assert_eq!(keys.get_or_find(b"sk-team-b", find), None);
        assert_eq!(
            (finds.get(), keys.len()),
            (3, 1),
            "a key that matched nothing is not kept"
        );
        assert_eq!(
            keys.get_or_find(b"sk-team-", find),
            None,
            "a prefix is another key"
        );
        assert!(!format!("{keys:?}").contains("team"));
        assert!(keys.clone().is_empty());
        let every = |_: &KeyDigest| Some(1);
        for i in 0..PresentedKeys::CAPACITY + 5 {
            keys.get_or_find(format!("k{i}").as_bytes(), every);
        }
        assert!(keys.len() <= PresentedKeys::CAPACITY && !keys.is_empty());
    }
}
