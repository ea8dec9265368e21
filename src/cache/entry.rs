//! The stored form of an answer, and the index of a set of slots.
//!
//! An entry is the answer in the client's dialect as one complete JSON (a streamed answer is
//! assembled first), with its usage, so a hit can be served as JSON or replayed as a stream
//! whichever form was stored. Its header carries the full digest of the request it answers: a
//! reader checks it, so an entry written for another request (a slot reused, two writers racing)
//! is never served.
//!
//! Layout, little-endian: magic (8) | digest (32) | stored_at ms (8) | ttl ms (8) | input, output,
//! cache read, cache write tokens (4 x 8) | dialect (1) | the JSON answer.
//!
//! A set's index is one small value read before any entry: magic (8) | per way: digest (32) |
//! stored_at ms (8) | ttl ms (8). A lookup that misses reads only it.

use super::key::Digest;
use crate::api::errors::ClientApi;
use crate::count::usage::Usage;

const ENTRY_MAGIC: &[u8; 8] = b"tgcache1";
const INDEX_MAGIC: &[u8; 8] = b"tgcidx01";
const HEADER_LEN: usize = 8 + 32 + 8 + 8 + 4 * 8 + 1;

/// Slots per set: a new entry evicts the older of two, not whichever shares its one slot.
pub const WAYS: usize = 2;
const WAY_LEN: usize = 32 + 8 + 8;
const INDEX_LEN: usize = 8 + WAYS * WAY_LEN;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub digest: Digest,
    pub stored_at_ms: u64,
    pub ttl_ms: u64,
    pub usage: Usage,
    /// The dialect of `body`: the client API of the request it answers.
    pub client: ClientApi,
    pub body: Vec<u8>,
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.body.len());
        out.extend_from_slice(ENTRY_MAGIC);
        out.extend_from_slice(&self.digest);
        for n in [
            self.stored_at_ms,
            self.ttl_ms,
            self.usage.input,
            self.usage.output,
            self.usage.cache_read,
            self.usage.cache_write,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.push(match self.client {
            ClientApi::OpenAi => 0,
            ClientApi::Anthropic => 1,
        });
        out.extend_from_slice(&self.body);
        out
    }

    /// The entry stored in `bytes`; None when they are not one (foreign, older format, garbled).
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let (magic, rest) = bytes.split_first_chunk::<8>()?;
        if magic != ENTRY_MAGIC {
            return None;
        }
        let (digest, mut rest) = rest.split_first_chunk::<32>()?;
        let mut n = [0u64; 6];
        for v in &mut n {
            let (b, r) = rest.split_first_chunk::<8>()?;
            *v = u64::from_le_bytes(*b);
            rest = r;
        }
        let (&dialect, body) = rest.split_first()?;
        let client = match dialect {
            0 => ClientApi::OpenAi,
            1 => ClientApi::Anthropic,
            _ => return None,
        };
        let [stored_at_ms, ttl_ms, input, output, cache_read, cache_write] = n;
        Some(Entry {
            digest: *digest,
            stored_at_ms,
            ttl_ms,
            usage: Usage {
                input,
                output,
                cache_read,
                cache_write,
                reasoning: 0,
            },
            client,
            body: body.to_vec(),
        })
    }

    /// The encoded size of an entry holding `body_len` bytes of answer.
    pub fn encoded_len(body_len: usize) -> usize {
        HEADER_LEN + body_len
    }
}

/// How an entry stands at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Age {
    /// Within its time-to-live: served.
    Fresh,
    /// Expired, within the stale window: served only when no provider can answer.
    Stale,
    /// Past both: never served, and the first to be overwritten.
    Dead,
}

/// `ttl` is the smaller of the entry's own and the configured one, so lowering the configured
/// time-to-live takes effect at once.
pub fn age(stored_at_ms: u64, ttl_ms: u64, now: u64, cfg_ttl_ms: u64, stale_ms: u64) -> Age {
    let expires = stored_at_ms.saturating_add(ttl_ms.min(cfg_ttl_ms));
    if now < expires {
        Age::Fresh
    } else if now < expires.saturating_add(stale_ms) {
        Age::Stale
    } else {
        Age::Dead
    }
}

/// One way of a set, as its index records it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Way {
    pub digest: Digest,
    pub stored_at_ms: u64,
    pub ttl_ms: u64,
}

impl Way {
    pub fn is_empty(&self) -> bool {
        self.stored_at_ms == 0
    }
}

/// The index of one set: what each of its ways holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Index {
    pub ways: [Way; WAYS],
}

impl Index {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(INDEX_LEN);
        out.extend_from_slice(INDEX_MAGIC);
        for w in &self.ways {
            out.extend_from_slice(&w.digest);
            out.extend_from_slice(&w.stored_at_ms.to_le_bytes());
            out.extend_from_slice(&w.ttl_ms.to_le_bytes());
        }
        out
    }

    /// The index in `bytes`; anything else (absent, foreign, garbled) reads as an empty set.
    pub fn decode(bytes: Option<&[u8]>) -> Index {
        let mut index = Index::default();
        let Some(rest) = bytes
            .filter(|b| b.len() == INDEX_LEN)
            .and_then(|b| b.strip_prefix(INDEX_MAGIC))
        else {
            return index;
        };
        for (w, chunk) in index.ways.iter_mut().zip(rest.chunks_exact(WAY_LEN)) {
            let (digest, times) = chunk.split_at(32);
            let (stored, ttl) = times.split_at(8);
            let u = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
            w.digest.copy_from_slice(digest);
            w.stored_at_ms = u(stored);
            w.ttl_ms = u(ttl);
        }
        index
    }

    /// The way that records `digest`.
    pub fn find(&self, digest: &Digest) -> Option<usize> {
        self.ways
            .iter()
            .position(|w| !w.is_empty() && w.digest == *digest)
    }

    /// Where a new entry for `digest` goes: its own way, else an empty one, else a dead one, else
    /// the one stored longest ago. True when that way holds another request's entry still live
    /// (fresh or stale): an eviction.
    pub fn place(
        &self,
        digest: &Digest,
        now: u64,
        cfg_ttl_ms: u64,
        stale_ms: u64,
    ) -> (usize, bool) {
        if let Some(w) = self.find(digest) {
            return (w, false);
        }
        if let Some(w) = self.ways.iter().position(Way::is_empty) {
            return (w, false);
        }
        let dead = |w: &Way| age(w.stored_at_ms, w.ttl_ms, now, cfg_ttl_ms, stale_ms) == Age::Dead;
        if let Some(w) = self.ways.iter().position(dead) {
            return (w, false);
        }
        let oldest = self
            .ways
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.stored_at_ms)
            .map_or(0, |(i, _)| i);
        (oldest, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            digest: [7; 32],
            stored_at_ms: 1_000,
            ttl_ms: 60_000,
            usage: Usage {
                input: 10,
                output: 20,
                cache_read: 3,
                cache_write: 4,
                reasoning: 0,
            },
            client: ClientApi::Anthropic,
            body: br#"{"type":"message"}"#.to_vec(),
        }
    }

    #[test]
    fn an_entry_reads_back_as_written_and_anything_else_reads_as_none() {
        let e = entry();
        let bytes = e.encode();
        assert_eq!(bytes.len(), Entry::encoded_len(e.body.len()));
        assert_eq!(Entry::decode(&bytes), Some(e.clone()));
        assert_eq!(Entry::decode(&bytes[..HEADER_LEN - 1]), None, "truncated");
        let mut foreign = bytes.clone();
        foreign[0] = b'x';
        assert_eq!(Entry::decode(&foreign), None);
        let mut dialect = bytes;
        dialect[HEADER_LEN - 1] = 9;
        assert_eq!(Entry::decode(&dialect), None);
        let empty = Entry {
            body: Vec::new(),
            ..e
        };
        assert_eq!(Entry::decode(&empty.encode()), Some(empty));
    }

    #[test]
    fn ages_by_the_smaller_ttl_then_the_stale_window() {
        assert_eq!(age(1_000, 10_000, 10_999, 60_000, 5_000), Age::Fresh);
        assert_eq!(age(1_000, 10_000, 11_000, 60_000, 5_000), Age::Stale);
        assert_eq!(age(1_000, 10_000, 16_000, 60_000, 5_000), Age::Dead);
        assert_eq!(
            age(1_000, 10_000, 2_000, 1_000, 0),
            Age::Dead,
            "config lowered"
        );
        assert_eq!(
            age(1_000, u64::MAX, u64::MAX - 1, u64::MAX, u64::MAX),
            Age::Fresh
        );
    }

    #[test]
    fn an_index_places_a_new_entry_in_its_own_then_an_empty_then_a_dead_then_the_oldest_way() {
        assert_eq!(Index::decode(None), Index::default());
        assert_eq!(Index::decode(Some(b"short")), Index::default());
        let mut idx = Index::default();
        let (a, b, c) = ([1; 32], [2; 32], [3; 32]);
        assert_eq!(idx.place(&a, 100, 1_000, 0), (0, false));
        idx.ways[0] = Way {
            digest: a,
            stored_at_ms: 100,
            ttl_ms: 1_000,
        };
        assert_eq!(idx.place(&a, 200, 1_000, 0), (0, false), "its own way");
        assert_eq!(idx.place(&b, 200, 1_000, 0), (1, false), "the empty way");
        idx.ways[1] = Way {
            digest: b,
            stored_at_ms: 200,
            ttl_ms: 1_000,
        };
        assert_eq!(Index::decode(Some(&idx.encode())), idx);
        assert_eq!(idx.find(&b), Some(1));
        assert_eq!(idx.find(&c), None);
        assert_eq!(idx.place(&c, 300, 1_000, 0), (0, true), "the oldest, live");
        assert_eq!(idx.place(&c, 1_150, 1_000, 0), (0, false), "a dead one");
        assert_eq!(
            idx.place(&c, 1_150, 1_000, 500),
            (0, true),
            "stale is still live"
        );
    }
}
