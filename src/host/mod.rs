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

#[cfg(test)]
pub mod fake;
pub mod prof;
pub mod tally;

use crate::pool::keypool::Tickets;
use crate::store::SharedStore;

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
    fn headers(&self, map: Map) -> Vec<(String, Vec<u8>)>;
    /// Replaces a header (all its values). False when Envoy refused (map gone or frozen).
    fn set_header(&mut self, map: Map, name: &str, value: &str) -> bool;
    /// Removes a header (all its values), whatever bytes they hold.
    fn remove_header(&mut self, map: Map, name: &str) -> bool;
    /// Replaces the whole map with `headers` in one call: several edits to a map read whole cost
    /// one host call instead of one each.
    fn set_headers(&mut self, map: Map, headers: &[(String, Vec<u8>)]) -> bool;

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

    /// Envoy's shared data: one store per `vm_id`, across workers and both roles.
    fn store(&self) -> &dyn SharedStore;

    /// Runs `f` with this worker's key-rotation state (`pool::keypool::Tickets`: blocks of
    /// round-robin tickets, recent prompt-affinity picks) and the shared data they come from.
    fn with_rotation(&mut self, f: &mut dyn FnMut(&mut Tickets, &dyn SharedStore));
}

/// Edits to a header map read whole, applied when the callback is done: each as its own call when
/// they are few, the whole map in one [`Host::set_headers`] when they are many. (Measured on
/// Envoy 1.40's V8: a whole-map write costs ~7.7 µs, a single replace or remove ~1.2 µs.)
#[derive(Debug, Clone, Default)]
pub struct Edits {
    headers: Vec<(String, Vec<u8>)>,
    /// (name, Some(value) to set | None to remove), in order.
    ops: Vec<(String, Option<String>)>,
}

/// From this many edits on, one whole-map write is cheaper than one call each.
const WHOLE_MAP_FROM: usize = 6;

impl Edits {
    pub fn of(headers: Vec<(String, Vec<u8>)>) -> Self {
        Edits {
            headers,
            ops: Vec::new(),
        }
    }

    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        find_str(&self.headers, name)
    }

    /// Removes every value of `name`.
    pub fn remove(&mut self, name: &str) {
        let before = self.headers.len();
        self.headers.retain(|(k, _)| k != name);
        if self.headers.len() != before {
            self.ops.push((name.to_string(), None));
        }
    }

    /// Removes every header `pred` picks by name.
    pub fn remove_where(&mut self, pred: impl Fn(&str) -> bool) {
        let mut gone: Vec<String> = Vec::new();
        self.headers.retain(|(k, _)| {
            let drop = pred(k);
            if drop && !gone.contains(k) {
                gone.push(k.clone());
            }
            !drop
        });
        self.ops.extend(gone.into_iter().map(|k| (k, None)));
    }

    /// Sets `name` to `value`, replacing every value it had.
    pub fn set(&mut self, name: &str, value: &str) {
        if self.headers.iter().filter(|(k, _)| k == name).count() == 1
            && find(&self.headers, name) == Some(value.as_bytes())
        {
            return;
        }
        self.headers.retain(|(k, _)| k != name);
        self.headers
            .push((name.to_string(), value.as_bytes().to_vec()));
        self.ops.push((name.to_string(), Some(value.to_string())));
    }

    pub fn changed(&self) -> bool {
        !self.ops.is_empty()
    }

    /// Writes the edits: none, one call each, or the whole map in one call.
    pub fn apply<H: Host + ?Sized>(&mut self, host: &mut H, map: Map) -> bool {
        let ops = core::mem::take(&mut self.ops);
        if ops.len() >= WHOLE_MAP_FROM {
            return host.set_headers(map, &self.headers);
        }
        let mut ok = true;
        for (name, value) in &ops {
            ok &= match value {
                Some(v) => host.set_header(map, name, v),
                None => host.remove_header(map, name),
            };
        }
        ok
    }
}

/// The first value of `name` in a list read with [`Host::headers`].
pub fn find<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
}

/// The first value of `name` as text: None when absent or not UTF-8 (tollgate reads no header whose
/// meaning survives invalid bytes).
pub fn find_str<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
    find(headers, name).and_then(|v| core::str::from_utf8(v).ok())
}
