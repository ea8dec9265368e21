//! Everything a role asks of Envoy, behind one trait: headers, bodies, properties and filter
//! state, metrics, shared data, the clock, local replies and the route cache.
//!
//! The roles (`crate::roles`) make every decision against this trait, so their tests run on the host
//! with [`fake::FakeHost`], which behaves like Envoy where it matters (request headers are frozen once
//! the request continued, a second local reply is refused, shared data has Envoy's CAS rules).
//! `filter/` implements it over the proxy-wasm SDK; that adapter holds no decision of its own.
//!
//! Header values are bytes: a client may send any byte above 0x7f in a header, and a value that is
//! not UTF-8 must neither trap the VM nor slip past a check that only looked at valid ones.

#[cfg(any(test, all(feature = "testing", not(target_arch = "wasm32"))))]
pub mod fake;
pub mod prof;
pub mod tally;

use crate::limit::in_flight::Leases;
use crate::limit::waiting::WaitList;
use crate::pool::keypool::Tickets;
use crate::store::SharedStore;
use core::ops::Range;
use std::borrow::Cow;

/// The header maps a role reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Map {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
}

/// The bodies a role reads and replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Body {
    Request,
    Response,
}

pub trait Host {
    /// Milliseconds since the Unix epoch, from Envoy's clock.
    fn now_ms(&self) -> u64;

    /// The first value of a header, as bytes; None when absent.
    fn header(&self, map: Map, name: &str) -> Option<Vec<u8>>;
    /// Every header of a map, names lower-case as Envoy keeps them, values as bytes.
    fn headers(&self, map: Map) -> Headers;
    /// Replaces a header (all its values). False when Envoy refused (map gone or frozen).
    fn set_header(&mut self, map: Map, name: &str, value: &str) -> bool;
    /// Removes a header (all its values), whatever bytes they hold.
    fn remove_header(&mut self, map: Map, name: &str) -> bool;
    /// Replaces the whole map with `headers` in one call: several edits to a map read whole cost
    /// one host call instead of one each.
    fn set_headers(&mut self, map: Map, headers: &[(&[u8], &[u8])]) -> bool;

    /// The buffered body: `size` is what the callback reported.
    fn body(&self, which: Body, size: usize) -> Vec<u8>;
    /// Replaces the buffered body (`size` bytes of it) by `data`.
    fn set_body(&mut self, which: Body, size: usize, data: &[u8]) -> bool;

    /// An attribute or a filter-state value (`["tollgate_plan"]` reads `wasm.tollgate_plan`).
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Writes `wasm.<name>` into the stream's filter state: access logs read it as
    /// `%FILTER_STATE(wasm.<name>:PLAIN)%`, and the cluster-level role of the same request reads
    /// what the listener-level role wrote.
    fn set_filter_state(&mut self, name: &str, value: &[u8]) -> bool;
    /// Makes the router match the route again (request headers changed).
    fn clear_route_cache(&mut self);

    /// Answers the stream locally. False when Envoy refused (already answered, stream gone).
    fn respond(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> bool;

    /// Metrics. The adapter may defer them to the next tick.
    fn count(&mut self, name: &str, by: u64);
    fn gauge(&mut self, name: &str, value: u64);
    /// Adds `row` to the shared-data row `key` (usage totals). The adapter may defer it to the next
    /// tick: totals stay exact, at most one tick late.
    fn add_to_row(&mut self, key: &str, row: [u64; tally::ROW]);

    /// Charges one request to its metrics and usage totals ([`tally::Charge::expand`] names them).
    /// The adapter keeps them by their parts and names them at the tick.
    fn charge(&mut self, c: &tally::Charge<'_>, row: [u64; tally::ROW]) {
        c.expand(row, &mut |name, add| match add {
            tally::Add::Count(by) => self.count(name, by),
            tally::Add::Row(r) => self.add_to_row(name, r),
        });
    }
    /// Gauges of a consumer's limits' use. The adapter names them at the tick.
    fn limit_use(&mut self, consumer: &str, uses: &[tally::LimitUse]) {
        for u in uses {
            self.gauge(&u.name(consumer), u.permille);
        }
    }
    /// One of an attempt's per-request counters for `provider`. The adapter names it at the tick.
    fn attempt(&mut self, provider: &str, what: tally::Attempt) {
        self.count(&what.name(provider), 1);
    }

    /// Envoy's shared data: one store per `vm_id`, across workers and both roles.
    fn store(&self) -> &dyn SharedStore;

    /// Runs `f` with this worker's key-rotation state (`pool::keypool::Tickets`: blocks of
    /// round-robin tickets, recent prompt-affinity picks) and the shared data they come from.
    fn with_rotation(&mut self, f: &mut dyn FnMut(&mut Tickets, &dyn SharedStore));

    /// Runs `f` with this VM's leases on requests in flight (`limit::in_flight::Leases`: its id
    /// and its own counts) and the shared data they are kept in.
    fn with_leases(&mut self, f: &mut dyn FnMut(&mut Leases, &dyn SharedStore));

    /// Runs `f` with this worker's requests held for capacity.
    fn with_waiting(&mut self, f: &mut dyn FnMut(&mut WaitList));
    /// Moves a gauge that every worker moves (held requests) by `delta`, at once: a value set by
    /// one worker would overwrite another's.
    fn gauge_add(&mut self, name: &str, delta: i64);
    /// Records one value in a histogram (Envoy keeps its buckets and quantiles).
    fn histogram(&mut self, name: &str, value: u64);
}

/// A header map read whole: the bytes the host wrote it in (the proxy-wasm map encoding, see
/// [`encode_pairs`]), with every name and value borrowed from them. One allocation for the host to
/// fill and one for the index, where a `Vec<(String, Vec<u8>)>` took two per header.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    buf: Vec<u8>,
    /// Name and value of each pair, as ranges of `buf`, in order.
    pairs: Vec<(Range<usize>, Range<usize>)>,
}

impl Headers {
    /// Reads the encoding; a malformed one (which Envoy does not write) reads as no headers.
    pub fn decode(buf: Vec<u8>) -> Self {
        let pairs = index_pairs(&buf).unwrap_or_default();
        Headers { buf, pairs }
    }

    pub fn of<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone) -> Self {
        Headers::decode(encode_pairs(pairs))
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Every pair, names and values as bytes, in order.
    pub fn raw(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone + '_ {
        self.pairs.iter().map(|(k, v)| {
            (
                self.buf.get(k.clone()).unwrap_or_default(),
                self.buf.get(v.clone()).unwrap_or_default(),
            )
        })
    }

    /// Every pair whose name is text (Envoy's always are), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + Clone + '_ {
        self.raw()
            .filter_map(|(k, v)| core::str::from_utf8(k).ok().map(|k| (k, v)))
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.raw()
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// The first value of `name` as text: None when absent or not UTF-8 (tollgate reads no header
    /// whose meaning survives invalid bytes).
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| core::str::from_utf8(v).ok())
    }
}

/// The proxy-wasm map encoding: u32 count, (u32 name length, u32 value length) per pair, then each
/// name and value followed by a NUL; all little-endian.
pub fn encode_pairs<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone) -> Vec<u8> {
    let (n, bytes) = pairs.clone().fold((0usize, 0usize), |(n, b), (k, v)| {
        (n + 1, b + k.len() + v.len() + 2)
    });
    let mut h = Vec::with_capacity(4 + n * 8 + bytes);
    h.extend_from_slice(&(n as u32).to_le_bytes());
    for (k, v) in pairs.clone() {
        h.extend_from_slice(&(k.len() as u32).to_le_bytes());
        h.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        h.extend_from_slice(k);
        h.push(0);
        h.extend_from_slice(v);
        h.push(0);
    }
    h
}

fn index_pairs(buf: &[u8]) -> Option<Vec<(Range<usize>, Range<usize>)>> {
    let u32_at = |at: usize| -> Option<usize> {
        let b: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(u32::from_le_bytes(b) as usize)
    };
    if buf.is_empty() {
        return Some(Vec::new());
    }
    let n = u32_at(0)?;
    let mut at = n.checked_mul(8)?.checked_add(4)?;
    // Each pair takes at least 10 bytes: its two lengths and two NULs.
    let mut pairs = Vec::with_capacity(n.min(buf.len() / 10));
    for i in 0..n {
        let (k_len, v_len) = (u32_at(4 + i * 8)?, u32_at(8 + i * 8)?);
        let k = at..at.checked_add(k_len)?;
        let v = k.end + 1..k.end.checked_add(1 + v_len)?;
        at = v.end + 1;
        if at > buf.len() {
            return None;
        }
        pairs.push((k, v));
    }
    Some(pairs)
}

/// Edits to a header map read whole, applied when the callback is done: each as its own call when
/// they are few, the whole map in one [`Host::set_headers`] when they are many. (Measured on
/// Envoy 1.40's V8: a whole-map write costs ~7.7 µs, a single replace or remove ~1.2 µs.) Names and
/// values are borrowed where the caller has them for long enough.
#[derive(Debug, Clone, Default)]
pub struct Edits<'a> {
    base: Headers,
    /// (name, Some(value) to set | None to remove), in order: each replaces every value the name
    /// had before.
    ops: Vec<(Cow<'a, str>, Option<Cow<'a, str>>)>,
}

/// From this many edits on, one whole-map write is cheaper than one call each.
const WHOLE_MAP_FROM: usize = 6;

impl<'a> Edits<'a> {
    pub fn of(base: Headers) -> Self {
        Edits {
            base,
            ops: Vec::new(),
        }
    }

    /// The map as read, before the edits.
    pub fn base(&self) -> &Headers {
        &self.base
    }

    /// The last edit of `name`, if any.
    fn edit(&self, name: &str) -> Option<Option<&str>> {
        self.ops
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_deref())
    }

    /// The first value of `name` as text, edits applied.
    pub fn get(&self, name: &str) -> Option<&str> {
        match self.edit(name) {
            Some(v) => v,
            None => self.base.get_str(name),
        }
    }

    /// Whether `name` is present, edits applied.
    pub fn has(&self, name: &str) -> bool {
        match self.edit(name) {
            Some(v) => v.is_some(),
            None => self.base.get(name).is_some(),
        }
    }

    /// Removes every value of `name`.
    pub fn remove(&mut self, name: impl Into<Cow<'a, str>>) {
        let name = name.into();
        if self.has(&name) {
            self.ops.push((name, None));
        }
    }

    /// Removes every header `pred` picks by name. Names are given as bytes: only the ones picked
    /// are checked for UTF-8 (Envoy's always are), where checking every name read cost more than
    /// the rest of the walk.
    pub fn remove_where(&mut self, pred: impl Fn(&[u8]) -> bool) {
        let mut gone: Vec<String> = Vec::new();
        let edited = |k: &[u8]| self.ops.iter().any(|(n, _)| n.as_bytes() == k);
        // Names read and not edited since, then names whose last edit set them.
        let read = self
            .base
            .raw()
            .map(|(k, _)| k)
            .filter(|k| pred(k) && !edited(k))
            .filter_map(|k| core::str::from_utf8(k).ok());
        let set = self.ops.iter().enumerate().filter_map(|(i, (k, v))| {
            let last = !self.ops.iter().skip(i + 1).any(|(n, _)| n == k);
            (last && v.is_some() && pred(k.as_bytes())).then_some(k.as_ref())
        });
        for k in read.chain(set) {
            if !gone.iter().any(|g| g == k) {
                gone.push(k.to_string());
            }
        }
        self.ops
            .extend(gone.into_iter().map(|k| (Cow::Owned(k), None)));
    }

    /// Sets `name` to `value`, replacing every value it had.
    pub fn set(&mut self, name: impl Into<Cow<'a, str>>, value: impl Into<Cow<'a, str>>) {
        let (name, value) = (name.into(), value.into());
        let unchanged = match self.edit(&name) {
            Some(v) => v == Some(value.as_ref()),
            None => {
                let mut values = self.base.raw().filter(|(k, _)| *k == name.as_bytes());
                values.next().map(|(_, v)| v) == Some(value.as_bytes()) && values.next().is_none()
            }
        };
        if !unchanged {
            self.ops.push((name, Some(value)));
        }
    }

    pub fn changed(&self) -> bool {
        !self.ops.is_empty()
    }

    /// The map with the edits applied: what was read, less every name edited, then each edited
    /// name's last value.
    fn pairs(&self) -> Vec<(&[u8], &[u8])> {
        let edited = |k: &[u8]| self.ops.iter().any(|(n, _)| n.as_bytes() == k);
        let mut out: Vec<(&[u8], &[u8])> = self.base.raw().filter(|(k, _)| !edited(k)).collect();
        for (i, (name, value)) in self.ops.iter().enumerate() {
            let last = !self.ops.iter().skip(i + 1).any(|(n, _)| n == name);
            if let (true, Some(v)) = (last, value) {
                out.push((name.as_bytes(), v.as_bytes()));
            }
        }
        out
    }

    /// Writes the edits: none, one call each, or the whole map in one call.
    pub fn apply<H: Host + ?Sized>(&mut self, host: &mut H, map: Map) -> bool {
        if self.ops.len() >= WHOLE_MAP_FROM {
            let ok = host.set_headers(map, &self.pairs());
            self.ops.clear();
            return ok;
        }
        let mut ok = true;
        for (name, value) in &self.ops {
            ok &= match value {
                Some(v) => host.set_header(map, name, v),
                None => host.remove_header(map, name),
            };
        }
        self.ops.clear();
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        Headers::of(pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn a_map_reads_as_encoded_and_malformed_reads_empty() {
        let h = Headers::of(
            [
                (&b":status"[..], &b"200"[..]),
                (b"x-bin", b"\xff\x00"),
                (b"\xfe", b"v"),
            ]
            .into_iter(),
        );
        assert_eq!(h.get(":status"), Some(&b"200"[..]));
        assert_eq!(h.get("x-bin"), Some(&b"\xff\x00"[..]));
        assert_eq!(h.get_str("x-bin"), None, "not UTF-8");
        assert_eq!(h.raw().count(), 3);
        assert_eq!(h.iter().count(), 2, "a name that is not text is only kept");
        assert_eq!(
            Headers::of(h.raw()).raw().collect::<Vec<_>>(),
            h.raw().collect::<Vec<_>>()
        );
        let mut enc = encode_pairs(h.raw());
        assert!(!Headers::decode(enc.clone()).is_empty());
        enc.truncate(enc.len() - 1);
        assert!(Headers::decode(enc).is_empty(), "truncated");
        assert!(
            Headers::decode(vec![255, 255, 255, 255]).is_empty(),
            "count beyond the bytes"
        );
        assert!(Headers::decode(Vec::new()).is_empty());
    }

    #[test]
    fn edits_read_through_and_write_what_changed() {
        let mut e = Edits::of(headers(&[("a", "1"), ("b", "2"), ("b", "3"), ("c", "4")]));
        e.set("a", "1");
        assert!(!e.changed(), "setting a single value to itself is no edit");
        e.set("b", "2");
        assert!(e.changed(), "b had two values");
        assert_eq!(e.get("b"), Some("2"));
        e.remove("zz");
        e.remove("c");
        assert_eq!(e.get("c"), None);
        e.set("c", "5");
        e.set("d", "6");
        e.remove_where(|k| k == b"a" || k == b"c");
        assert_eq!((e.get("a"), e.get("c")), (None, None), "c's new value too");
        let pairs: Vec<(&[u8], &[u8])> = e.pairs();
        assert_eq!(pairs, vec![(&b"b"[..], &b"2"[..]), (b"d", b"6")]);
        let ops = e.ops.len();
        e.remove_where(|k| k == b"c");
        assert_eq!(e.ops.len(), ops, "nothing left to remove");
    }
}
