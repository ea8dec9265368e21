//! A host that behaves like Envoy where the roles can tell: request headers refuse writes once the
//! request went on, a stream answers locally once, shared data follows Envoy's CAS rules
//! ([`FakeStore`]), and a cluster-level stream reads the filter state its listener-level stream wrote.
//! A test can make it refuse any write ([`FakeHost::refuse`]), as Envoy refuses one whose map or
//! buffer is gone.

use super::{Body, Headers, Host, Map};
use crate::maps::HashMap;
use crate::store::{FakeStore, SharedStore};
use std::rc::Rc;

#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A write a test can make the fake refuse.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Write {
    /// Any write to a header map: a value replaced or removed, or the whole map.
    Map(Map),
    Body(Body),
    /// A filter-state value, by name.
    FilterState(String),
    Respond,
}

pub struct FakeHost {
    pub now: u64,
    pub maps: HashMap<Map, Vec<(String, Vec<u8>)>>,
    /// Set once the request's headers went on towards the upstream: Envoy then refuses writes.
    pub request_headers_sent: bool,
    pub bodies: HashMap<Body, Vec<u8>>,
    /// Attributes (`["upstream", "request_attempt_count"]`, endpoint metadata, ...).
    pub attributes: HashMap<Vec<String>, Vec<u8>>,
    pub filter_state: HashMap<String, Vec<u8>>,
    /// The listener-level stream's filter state, readable (not writable) from a cluster-level one.
    pub parent_filter_state: HashMap<String, Vec<u8>>,
    pub reply: Option<Reply>,
    pub route_cache_cleared: u32,
    /// Whole-map header writes ([`Host::set_headers`]).
    pub header_writes: u32,
    pub counters: HashMap<String, u64>,
    pub gauges: HashMap<String, u64>,
    pub store: Rc<FakeStore>,
    /// Host calls made through this host, shared data excluded (see `FakeStore::calls`); metrics
    /// and usage rows are not counted: the adapter defers them to the tick.
    pub calls: core::cell::Cell<u32>,
    /// Usage rows waiting for the tick.
    pub rows: crate::host::tally::Tally,
    /// The worker's round-robin ticket blocks (shared by the streams of one worker).
    pub tickets: Rc<core::cell::RefCell<crate::pool::keypool::Tickets>>,
    /// Writes to refuse: the target and which call to it (counted from the host's start), 0 for
    /// every call.
    refusals: Vec<(Write, u32)>,
    writes: HashMap<Write, u32>,
    /// The worker VM's leases on requests in flight (shared by the streams of one worker; another
    /// worker is a host with leases of another VM id: [`FakeHost::on_worker`]).
    pub leases: Rc<core::cell::RefCell<crate::limit::in_flight::Leases>>,
    /// The worker's held requests (shared by the streams of one worker).
    pub waiting: Rc<core::cell::RefCell<crate::limit::waiting::WaitList>>,
    /// Gauges moved by [`Host::gauge_add`], and histograms' values.
    pub gauge_sums: HashMap<String, i64>,
    pub histograms: HashMap<String, Vec<u64>>,
}

impl FakeHost {
    pub fn new(store: Rc<FakeStore>) -> Self {
        FakeHost {
            now: 1_700_000_000_000,
            maps: HashMap::default(),
            request_headers_sent: false,
            bodies: HashMap::default(),
            attributes: HashMap::default(),
            filter_state: HashMap::default(),
            parent_filter_state: HashMap::default(),
            reply: None,
            route_cache_cleared: 0,
            header_writes: 0,
            counters: HashMap::default(),
            gauges: HashMap::default(),
            store,
            calls: core::cell::Cell::new(0),
            rows: crate::host::tally::Tally::default(),
            tickets: Rc::default(),
            refusals: Vec::new(),
            writes: HashMap::default(),
            leases: Rc::new(core::cell::RefCell::new(
                crate::limit::in_flight::Leases::new(1),
            )),
            waiting: Rc::default(),
            gauge_sums: HashMap::default(),
            histograms: HashMap::default(),
        }
    }

    /// A host of the worker VM `vm` (its own leases on requests in flight).
    pub fn on_worker(mut self, vm: u64) -> Self {
        self.leases = Rc::new(core::cell::RefCell::new(
            crate::limit::in_flight::Leases::new(vm),
        ));
        self
    }

    /// Refuses the `nth` write to `target` from now on (1: the next one), or every one (0), as
    /// Envoy refuses a write (the write changes nothing and reports failure).
    pub fn refuse(&mut self, target: Write, nth: u32) {
        let done = self.writes.get(&target).copied().unwrap_or(0);
        let at = if nth == 0 { 0 } else { done + nth };
        self.refusals.push((target, at));
    }

    /// Counts a write to `target`; true when it is to be refused.
    fn refused(&mut self, target: Write) -> bool {
        let n = self.writes.entry(target.clone()).or_default();
        *n += 1;
        let n = *n;
        self.refusals
            .iter()
            .any(|(t, at)| *t == target && (*at == 0 || *at == n))
    }

    /// The tick: usage rows go to shared data.
    pub fn tick(&mut self) {
        struct Store<'a>(&'a FakeStore);
        impl crate::host::tally::Sink for Store<'_> {
            fn increment(&mut self, _: &str, _: u64) {}
            fn record(&mut self, _: &str, _: u64) {}
            fn store(&self) -> &dyn SharedStore {
                self.0
            }
        }
        let store = self.store.clone();
        self.rows.flush(&mut Store(&store));
    }

    fn call(&self) {
        self.calls.set(self.calls.get() + 1);
    }

    /// A request as a client sends it: method, path, and more headers.
    pub fn with_request(mut self, method: &str, path: &str, headers: &[(&str, &[u8])]) -> Self {
        let mut map = vec![
            (":method".to_string(), method.as_bytes().to_vec()),
            (":path".to_string(), path.as_bytes().to_vec()),
            (":authority".to_string(), b"gateway.local".to_vec()),
        ];
        map.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_vec())));
        self.maps.insert(Map::RequestHeaders, map);
        self
    }

    /// A cluster-level stream of the request `listener` carried: same request headers (Envoy hands
    /// every attempt the same map), the listener's filter state readable.
    pub fn attempt_of(listener: &FakeHost) -> Self {
        let mut h = FakeHost::new(listener.store.clone());
        h.now = listener.now;
        h.tickets = listener.tickets.clone();
        h.leases = listener.leases.clone();
        h.parent_filter_state = listener.filter_state.clone();
        if let Some(m) = listener.maps.get(&Map::RequestHeaders) {
            h.maps.insert(Map::RequestHeaders, m.clone());
        }
        if let Some(b) = listener.bodies.get(&Body::Request) {
            h.bodies.insert(Body::Request, b.clone());
        }
        h
    }

    /// The next attempt of the same request: Envoy hands it the header map the previous attempt
    /// rewrote, the body as the listener-level filters left it, and the request's filter state with
    /// what the previous attempt wrote into it.
    pub fn next_attempt(listener: &FakeHost, previous: &FakeHost) -> Self {
        let mut h = FakeHost::attempt_of(listener);
        if let Some(m) = previous.maps.get(&Map::RequestHeaders) {
            h.maps.insert(Map::RequestHeaders, m.clone());
        }
        h.parent_filter_state.extend(
            previous
                .parent_filter_state
                .iter()
                .chain(&previous.filter_state)
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        h
    }

    pub fn set_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let mut map = vec![(":status".to_string(), status.to_string().into_bytes())];
        map.extend(
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
        );
        self.maps.insert(Map::ResponseHeaders, map);
        self.bodies.insert(Body::Response, body.to_vec());
    }

    pub fn get(&self, map: Map, name: &str) -> Option<String> {
        self.header(map, name)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    pub fn state(&self, name: &str) -> Option<String> {
        self.filter_state
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn writable(&self, map: Map) -> bool {
        !(map == Map::RequestHeaders && self.request_headers_sent)
    }
}

impl Host for FakeHost {
    fn now_ms(&self) -> u64 {
        self.call();
        self.now
    }

    fn header(&self, map: Map, name: &str) -> Option<Vec<u8>> {
        self.call();
        self.maps
            .get(&map)?
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    fn headers(&self, map: Map) -> Headers {
        self.call();
        let pairs = self.maps.get(&map).map(Vec::as_slice).unwrap_or_default();
        Headers::of(pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())))
    }

    fn set_header(&mut self, map: Map, name: &str, value: &str) -> bool {
        self.call();
        if !self.writable(map) || self.refused(Write::Map(map)) {
            return false;
        }
        let m = self.maps.entry(map).or_default();
        m.retain(|(k, _)| k != name);
        m.push((name.to_string(), value.as_bytes().to_vec()));
        true
    }

    fn remove_header(&mut self, map: Map, name: &str) -> bool {
        self.call();
        if !self.writable(map) || self.refused(Write::Map(map)) {
            return false;
        }
        if let Some(m) = self.maps.get_mut(&map) {
            m.retain(|(k, _)| k != name);
        }
        true
    }

    fn set_headers(&mut self, map: Map, headers: &[(&[u8], &[u8])]) -> bool {
        self.call();
        if !self.writable(map) || self.refused(Write::Map(map)) {
            return false;
        }
        let pairs = headers
            .iter()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.to_vec()));
        self.maps.insert(map, pairs.collect());
        self.header_writes += 1;
        true
    }

    fn body(&self, which: Body, size: usize) -> Vec<u8> {
        self.call();
        let b = self.bodies.get(&which).map(Vec::as_slice).unwrap_or(&[]);
        b.get(..size.min(b.len())).unwrap_or(&[]).to_vec()
    }

    fn set_body(&mut self, which: Body, size: usize, data: &[u8]) -> bool {
        self.call();
        if self.refused(Write::Body(which)) {
            return false;
        }
        let b = self.bodies.entry(which).or_default();
        let keep = b.split_off(size.min(b.len()));
        *b = data.to_vec();
        b.extend_from_slice(&keep);
        true
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.call();
        if let [name] = path {
            if let Some(v) = self
                .filter_state
                .get(*name)
                .or_else(|| self.parent_filter_state.get(*name))
            {
                return Some(v.clone());
            }
        }
        let key: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        self.attributes.get(&key).cloned()
    }

    fn set_filter_state(&mut self, name: &str, value: &[u8]) -> bool {
        self.call();
        if self.refused(Write::FilterState(name.to_string())) {
            return false;
        }
        self.filter_state.insert(name.to_string(), value.to_vec());
        true
    }

    fn clear_route_cache(&mut self) {
        self.call();
        self.route_cache_cleared += 1;
    }

    fn respond(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> bool {
        self.call();
        if self.reply.is_some() || self.refused(Write::Respond) {
            return false;
        }
        self.reply = Some(Reply {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
        });
        true
    }

    fn count(&mut self, name: &str, by: u64) {
        *self.counters.entry(name.to_string()).or_default() += by;
    }

    fn gauge(&mut self, name: &str, value: u64) {
        self.gauges.insert(name.to_string(), value);
    }

    /// Deferred as the adapter defers it; [`FakeHost::tick`] writes them.
    fn add_to_row(&mut self, key: &str, row: [u64; crate::host::tally::ROW]) {
        self.rows.add_row(key, row);
    }

    fn with_rotation(
        &mut self,
        f: &mut dyn FnMut(&mut crate::pool::keypool::Tickets, &dyn SharedStore),
    ) {
        f(&mut self.tickets.borrow_mut(), self.store.as_ref());
    }

    fn store(&self) -> &dyn SharedStore {
        self.store.as_ref()
    }

    fn with_leases(
        &mut self,
        f: &mut dyn FnMut(&mut crate::limit::in_flight::Leases, &dyn SharedStore),
    ) {
        f(&mut self.leases.borrow_mut(), self.store.as_ref());
    }

    fn with_waiting(&mut self, f: &mut dyn FnMut(&mut crate::limit::waiting::WaitList)) {
        f(&mut self.waiting.borrow_mut());
    }

    fn gauge_add(&mut self, name: &str, delta: i64) {
        *self.gauge_sums.entry(name.to_string()).or_default() += delta;
    }

    fn histogram(&mut self, name: &str, value: u64) {
        self.histograms
            .entry(name.to_string())
            .or_default()
            .push(value);
    }
}
