//! [`Host`] over the proxy-wasm SDK: reads through its `_bytes` getters, the writes Envoy can refuse
//! through [`super::hostcalls`]. Every call is wrapped in a `prof::span` (counted and timed in
//! profiling builds, nothing otherwise).

use super::hostcalls;
use crate::host::prof::span;
use crate::host::tally::{Attempt, Charge, LimitUse, Sink, Tally, ROW};
use crate::host::{Body, Headers, Host, Map};
use crate::limit::in_flight::Leases;
use crate::limit::waiting::WaitList;
use crate::maps::HashMap;
use crate::pool::keypool::Tickets;
use crate::store::{SharedStore, StoreError};
use core::cell::RefCell;
use proxy_wasm::hostcalls as sdk;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};

/// Envoy's shared data for this VM.
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        let _p = span("host proxy_get_shared_data");
        sdk::get_shared_data(key).map_err(|_| StoreError::Host)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let _p = span("host proxy_set_shared_data");
        sdk::set_shared_data(key, Some(value), cas).map_err(|e| match e {
            Status::CasMismatch => StoreError::CasMismatch,
            _ => StoreError::Host,
        })
    }
}

/// The current stream's host: the SDK's calls act on the context Envoy is running. Made anew for
/// each callback, so the clock is read at most once per callback.
#[derive(Default)]
pub struct SdkHost {
    now_ms: core::cell::Cell<u64>,
}

fn map_type(map: Map) -> MapType {
    match map {
        Map::RequestHeaders => MapType::HttpRequestHeaders,
        Map::RequestTrailers => MapType::HttpRequestTrailers,
        Map::ResponseHeaders => MapType::HttpResponseHeaders,
    }
}

fn buffer_type(which: Body) -> BufferType {
    match which {
        Body::Request => BufferType::HttpRequestBody,
        Body::Response => BufferType::HttpResponseBody,
    }
}

thread_local! {
    /// Metric ids by name. A VM runs on one worker thread, so this is per VM; Envoy aggregates
    /// same-named stats across workers.
    static METRICS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::default());
    /// Metrics and usage totals of this worker since the last tick.
    static TALLY: RefCell<Tally> = RefCell::new(Tally::default());
    /// This worker's key-rotation state: round-robin ticket blocks, recent affinity picks.
    static TICKETS: RefCell<Tickets> = RefCell::new(Tickets::default());
    /// This VM's leases on requests in flight, under an id made when the VM first needs it: a VM
    /// that replaces this one (a reload, a new configuration) counts under an id of its own.
    static LEASES: RefCell<Option<Leases>> = const { RefCell::new(None) };
    /// This worker's requests held for capacity.
    static WAITING: RefCell<WaitList> = RefCell::new(WaitList::default());
}

/// A VM id for the leases: random from the host, else the clock's nanoseconds.
fn vm_id() -> u64 {
    hostcalls::random_u64().unwrap_or_else(|| {
        sdk::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(1, |d| d.as_nanos() as u64)
    })
}

/// The tick: this worker's metrics and totals go to Envoy. Returns how many usage rows the store
/// refused (contention, failure): they wait for the next flush.
pub fn flush() -> u32 {
    let pending = TALLY.with(|t| core::mem::take(&mut *t.borrow_mut()));
    if pending.is_empty() {
        return 0;
    }
    let mut pending = pending;
    let (conflicts, kept) = pending.flush(&mut Flusher);
    TALLY.with(|t| {
        let mut t = t.borrow_mut();
        // Rows the store refused wait for the next tick, with whatever came meanwhile.
        let mut later = core::mem::take(&mut *t);
        later.merge(pending);
        *t = later;
        t.count("tollgate.shared_data.cas_conflicts", u64::from(conflicts));
        t.count("tollgate.shared_data.failures", u64::from(kept));
    });
    kept
}

struct Flusher;

impl Sink for Flusher {
    fn increment(&mut self, counter: &str, by: u64) {
        if let Some(id) = metric_id(MetricType::Counter, counter) {
            let _p = span("host proxy_increment_metric");
            let _ = sdk::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }
    fn record(&mut self, gauge: &str, value: u64) {
        if let Some(id) = metric_id(MetricType::Gauge, gauge) {
            let _p = span("host proxy_record_metric");
            let _ = sdk::record_metric(id, value);
        }
    }
    fn store(&self) -> &dyn SharedStore {
        &HostStore
    }
}

/// Defines a counter now, at zero: Prometheus sees the first increase of a counter it already
/// scrapes, where the first sample of a new one would read as its start.
pub fn define_counter(name: &str) {
    let _ = metric_id(MetricType::Counter, name);
}

fn metric_id(kind: MetricType, name: &str) -> Option<u32> {
    METRICS.with(|m| {
        if let Some(id) = m.borrow().get(name) {
            return Some(*id);
        }
        let _p = span("host proxy_define_metric");
        let id = sdk::define_metric(kind, name).ok()?;
        m.borrow_mut().insert(name.to_string(), id);
        Some(id)
    })
}

pub fn now_ms() -> u64 {
    let _p = span("host proxy_get_current_time_nanoseconds");
    sdk::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Host for SdkHost {
    fn now_ms(&self) -> u64 {
        if self.now_ms.get() == 0 {
            self.now_ms.set(now_ms());
        }
        self.now_ms.get()
    }

    fn header(&self, map: Map, name: &str) -> Option<Vec<u8>> {
        let _p = span("host proxy_get_header_map_value");
        sdk::get_map_value_bytes(map_type(map), name).ok().flatten()
    }

    fn headers(&self, map: Map) -> Headers {
        hostcalls::get_header_pairs(map_type(map))
    }

    fn set_header(&mut self, map: Map, name: &str, value: &str) -> bool {
        hostcalls::replace_header(map_type(map), name, value)
    }

    fn remove_header(&mut self, map: Map, name: &str) -> bool {
        hostcalls::remove_header(map_type(map), name)
    }

    fn set_headers(&mut self, map: Map, headers: &[(&[u8], &[u8])]) -> bool {
        hostcalls::set_header_pairs(map_type(map), headers)
    }

    fn body(&self, which: Body, size: usize) -> Vec<u8> {
        let _p = span("host proxy_get_buffer_bytes");
        sdk::get_buffer(buffer_type(which), 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn set_body(&mut self, which: Body, size: usize, data: &[u8]) -> bool {
        hostcalls::set_buffer(buffer_type(which), 0, size, data)
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let _p = span("host proxy_get_property");
        sdk::get_property(path.to_vec()).ok().flatten()
    }

    fn set_filter_state(&mut self, name: &str, value: &[u8]) -> bool {
        hostcalls::set_property(name, value)
    }

    fn clear_route_cache(&mut self) {
        hostcalls::call_foreign_function("clear_route_cache");
    }

    fn respond(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> bool {
        hostcalls::send_local_response(status, headers, body)
    }

    fn count(&mut self, name: &str, by: u64) {
        TALLY.with(|t| t.borrow_mut().count(name, by));
    }

    fn gauge(&mut self, name: &str, value: u64) {
        TALLY.with(|t| t.borrow_mut().gauge(name, value));
    }

    fn add_to_row(&mut self, key: &str, row: [u64; ROW]) {
        TALLY.with(|t| t.borrow_mut().add_row(key, row));
    }

    fn charge(&mut self, c: &Charge<'_>, row: [u64; ROW]) {
        TALLY.with(|t| t.borrow_mut().charge(c, row));
    }

    fn limit_use(&mut self, consumer: &str, uses: &[LimitUse]) {
        TALLY.with(|t| t.borrow_mut().limit_use(consumer, uses));
    }

    fn attempt(&mut self, provider: &str, what: Attempt) {
        TALLY.with(|t| t.borrow_mut().attempt(provider, what));
    }

    fn store(&self) -> &dyn SharedStore {
        &HostStore
    }

    fn with_rotation(&mut self, f: &mut dyn FnMut(&mut Tickets, &dyn SharedStore)) {
        TICKETS.with(|t| f(&mut t.borrow_mut(), &HostStore));
    }

    fn with_leases(&mut self, f: &mut dyn FnMut(&mut Leases, &dyn SharedStore)) {
        LEASES.with(|l| {
            let mut l = l.borrow_mut();
            f(l.get_or_insert_with(|| Leases::new(vm_id())), &HostStore)
        });
    }

    fn with_waiting(&mut self, f: &mut dyn FnMut(&mut WaitList)) {
        WAITING.with(|w| f(&mut w.borrow_mut()));
    }

    fn gauge_add(&mut self, name: &str, delta: i64) {
        if let Some(id) = metric_id(MetricType::Gauge, name) {
            let _p = span("host proxy_increment_metric");
            let _ = sdk::increment_metric(id, delta);
        }
    }

    fn histogram(&mut self, name: &str, value: u64) {
        if let Some(id) = metric_id(MetricType::Histogram, name) {
            let _p = span("host proxy_record_metric");
            let _ = sdk::record_metric(id, value);
        }
    }
}
