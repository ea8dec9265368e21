//! Envoy shared data, seen through a small trait so the logic above it runs on the host in tests.
//!
//! Envoy's semantics, which the fake reproduces on purpose: a missing key is inserted whatever CAS
//! is passed; an existing key written with a stale CAS fails with `CasMismatch`; CAS `None` (0 on
//! the wire) overwrites; there is no delete and no TTL, so callers keep the key space bounded.

use crate::maps::HashMap;
use core::cell::{Cell, RefCell};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    CasMismatch,
    /// Any other host failure (bad argument, not allowed, ...).
    Host,
    /// A CAS loop gave up after its bounded number of attempts.
    Contended,
}

pub trait SharedStore {
    /// The value (if any) and the CAS token to write it back with.
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError>;
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

/// How many times a read-modify-write is retried on CAS conflicts before giving up.
pub const CAS_ATTEMPTS: u32 = 64;

/// The CAS used to create a key; Envoy's counter would need 2^32 writes to reach it.
const CREATE_CAS: u32 = u32::MAX;

/// Read-modify-write with a bounded CAS retry loop. `f` sees the current value and returns the new
/// value plus whatever the caller wants back. Returns that result and the number of conflicts met.
pub fn update<S, T, F>(store: &S, key: &str, mut f: F) -> Result<(T, u32), StoreError>
where
    S: SharedStore + ?Sized,
    F: FnMut(Option<&[u8]>) -> (Vec<u8>, T),
{
    update_if(store, key, |cur| {
        let (next, out) = f(cur);
        (Some(next), out)
    })
}

/// [`update`] where `f` may decide not to write (`None`): then the read was the whole operation,
/// one host call instead of a read followed by a read-modify-write.
pub fn update_if<S, T, F>(store: &S, key: &str, f: F) -> Result<(T, u32), StoreError>
where
    S: SharedStore + ?Sized,
    F: FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, T),
{
    update_if_read(store, key, None, f)
}

/// A value and its CAS token, as [`SharedStore::get`] returned them.
pub type Read = (Option<Vec<u8>>, Option<u32>);

/// [`update_if`] whose first round starts from `read` (when the caller read the key already to
/// decide something else): one host call fewer.
pub fn update_if_read<S, T, F>(
    store: &S,
    key: &str,
    mut read: Option<Read>,
    mut f: F,
) -> Result<(T, u32), StoreError>
where
    S: SharedStore + ?Sized,
    F: FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, T),
{
    let mut conflicts = 0;
    for _ in 0..CAS_ATTEMPTS {
        let (current, cas) = match read.take() {
            Some(r) => r,
            None => store.get(key)?,
        };
        let (next, out) = f(current.as_deref());
        let Some(next) = next else {
            return Ok((out, conflicts));
        };
        // Envoy inserts a missing key whatever the CAS, but CAS 0 ("none") would also overwrite a
        // key another worker created a moment ago. A non-zero CAS that no live entry carries makes
        // the first write fail instead, so the loop re-reads the other worker's value.
        let cas = cas.or(Some(CREATE_CAS));
        match store.set(key, &next, cas) {
            Ok(()) => return Ok((out, conflicts)),
            Err(StoreError::CasMismatch) => conflicts += 1,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Contended)
}

/// Fixed-size little-endian u64 fields: the value encoding for counters and windows.
pub fn decode_u64s<const N: usize>(bytes: Option<&[u8]>) -> [u64; N] {
    let mut out = [0u64; N];
    if let Some(b) = bytes {
        for (i, slot) in out.iter_mut().enumerate() {
            if let Some(chunk) = b.get(i * 8..i * 8 + 8) {
                let mut a = [0u8; 8];
                a.copy_from_slice(chunk);
                *slot = u64::from_le_bytes(a);
            }
        }
    }
    out
}

pub fn encode_u64s(values: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(values.len() * 8);
    for x in values {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// Adds `deltas` to the u64 fields stored under `key`, atomically.
pub fn add_u64s<S: SharedStore + ?Sized, const N: usize>(
    store: &S,
    key: &str,
    deltas: [u64; N],
) -> Result<([u64; N], u32), StoreError> {
    update(store, key, |cur| {
        let mut vals = decode_u64s::<N>(cur);
        for (v, d) in vals.iter_mut().zip(deltas.iter()) {
            *v = v.wrapping_add(*d);
        }
        (encode_u64s(&vals), vals)
    })
}

/// An in-memory store with Envoy's semantics, for host tests. Cloning shares nothing; use
/// `&FakeStore` from two "workers" to share one.
#[derive(Default)]
pub struct FakeStore {
    data: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// When > 0, that many upcoming CAS writes fail with `CasMismatch` (as if another worker won).
    pub inject_conflicts: Cell<u32>,
    /// When true every call fails with `Host`.
    pub broken: Cell<bool>,
    /// Calls made (gets and sets): each is a host call in Envoy.
    pub calls: Cell<u32>,
}

impl FakeStore {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn len(&self) -> usize {
        self.data.borrow().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.data.borrow().keys().cloned().collect();
        k.sort_unstable();
        k
    }
}

impl SharedStore for FakeStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        self.calls.set(self.calls.get() + 1);
        if self.broken.get() {
            return Err(StoreError::Host);
        }
        Ok(match self.data.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        self.calls.set(self.calls.get() + 1);
        if self.broken.get() {
            return Err(StoreError::Host);
        }
        let mut data = self.data.borrow_mut();
        match data.get_mut(key) {
            None => {
                data.insert(key.to_string(), (value.to_vec(), 1));
            }
            Some((v, current)) => {
                if let Some(c) = cas {
                    if c != 0 {
                        let injected = self.inject_conflicts.get();
                        if injected > 0 {
                            self.inject_conflicts.set(injected - 1);
                            *current = current.wrapping_add(1);
                            return Err(StoreError::CasMismatch);
                        }
                        if c != *current {
                            return Err(StoreError::CasMismatch);
                        }
                    }
                }
                *v = value.to_vec();
                *current = current.wrapping_add(1);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_key_is_inserted_whatever_the_cas() {
        let s = FakeStore::new();
        s.set("k", b"a", Some(42)).unwrap();
        assert_eq!(s.get("k").unwrap().0.as_deref(), Some(&b"a"[..]));
    }

    #[test]
    fn stale_cas_is_refused_and_zero_overwrites() {
        let s = FakeStore::new();
        s.set("k", b"a", None).unwrap();
        let (_, cas) = s.get("k").unwrap();
        s.set("k", b"b", cas).unwrap();
        assert_eq!(s.set("k", b"c", cas), Err(StoreError::CasMismatch));
        s.set("k", b"d", None).unwrap();
        assert_eq!(s.get("k").unwrap().0.as_deref(), Some(&b"d"[..]));
    }

    #[test]
    fn counters_survive_injected_conflicts() {
        let s = FakeStore::new();
        for _ in 0..10 {
            s.inject_conflicts.set(3);
            add_u64s(&s, "c", [1, 2]).unwrap();
        }
        let v = decode_u64s::<2>(s.get("c").unwrap().0.as_deref());
        assert_eq!(v, [10, 20]);
    }

    #[test]
    fn endless_conflicts_give_up_instead_of_spinning() {
        let s = FakeStore::new();
        add_u64s(&s, "c", [1]).unwrap();
        s.inject_conflicts.set(u32::MAX);
        assert_eq!(
            add_u64s(&s, "c", [1]).map(|_| ()),
            Err(StoreError::Contended)
        );
    }

    #[test]
    fn broken_store_reports_host_error() {
        let s = FakeStore::new();
        s.broken.set(true);
        assert_eq!(add_u64s(&s, "c", [1]).map(|_| ()), Err(StoreError::Host));
    }
}
