//! Host services behind the pure modules' seams: shared data, clock, metrics, headers, bodies.
//! Every call goes through `abi`, so a host failure is an ignored or reported `Result`, never a panic.

use super::abi::{self, BufferType, MapType, MetricType};
use crate::store::{SharedStore, StoreError};
use core::cell::RefCell;
use hashbrown::HashMap;

pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        abi::shared_data(key).map_err(|_| StoreError::Host)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        abi::set_shared_data(key, value, cas).map_err(|e| match e {
            abi::SharedError::CasMismatch => StoreError::CasMismatch,
            abi::SharedError::Other => StoreError::Host,
        })
    }
}

pub fn now_ms() -> u64 {
    abi::now_nanos().map(|n| n / 1_000_000).unwrap_or(0)
}

/// One header's value as text; absent, unavailable and non-UTF-8 values all read as None.
pub fn header(map: MapType, name: &str) -> Option<String> {
    abi::header(map, name)
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
}

/// All headers with UTF-8 values (others are skipped: tollgate reads none of those).
pub fn headers(map: MapType) -> Vec<(String, String)> {
    abi::header_pairs(map)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| String::from_utf8(v).ok().map(|v| (k, v)))
        .collect()
}

/// The first value of `name` in a list read with [`headers`].
pub fn find<'a>(hdrs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    hdrs.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Sets (or removes, with None) a header; a map that is gone in this phase is not an error here.
pub fn set_header(map: MapType, name: &str, value: Option<&str>) {
    let _ = abi::set_header(map, name, value);
}

pub fn body(kind: BufferType, size: usize) -> Vec<u8> {
    abi::buffer(kind, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Replaces the whole buffered body (`size` is what the host reported for this callback).
pub fn replace_body(kind: BufferType, size: usize, data: &[u8]) -> bool {
    abi::set_buffer(kind, 0, size, data).is_ok()
}

pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    abi::property(path).ok().flatten()
}

pub fn set_property(name: &str, value: &str) {
    let _ = abi::set_property(&[name], value.as_bytes());
}

/// Local reply. Returns false if the host refused (the stream is already answered or gone).
pub fn respond(status: u16, headers: &[(&str, &str)], body: &[u8]) -> bool {
    abi::send_local_response(status, headers, body).is_ok()
}

/// Runs `f` with `context_id` as the effective context (its headers, its stream), then switches
/// back to `own`. False when the other context no longer exists.
pub fn with_context(context_id: u32, own: u32, f: impl FnOnce()) -> bool {
    if abi::set_effective_context(context_id).is_err() {
        return false;
    }
    f();
    let _ = abi::set_effective_context(own);
    true
}

pub fn resume_request() {
    let _ = abi::resume_request();
}

/// Envoy's `clear_route_cache` foreign function: the router re-matches the route after a request
/// header changed (header mutations alone do not clear it in Envoy 1.40).
pub fn clear_route_cache() {
    let _ = abi::call_foreign_function("clear_route_cache", &[]);
}

thread_local! {
    /// Metric ids by name. A VM runs on one worker thread, so this is per VM; Envoy aggregates
    /// same-named stats across workers.
    static METRICS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
}

fn metric_id(kind: MetricType, name: &str) -> Option<u32> {
    METRICS.with(|m| {
        if let Some(id) = m.borrow().get(name) {
            return Some(*id);
        }
        let id = abi::define_metric(kind, name).ok()?;
        m.borrow_mut().insert(name.to_string(), id);
        Some(id)
    })
}

pub fn count(name: &str, by: u64) {
    if by == 0 {
        return;
    }
    if let Some(id) = metric_id(MetricType::Counter, name) {
        let _ = abi::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
    }
}

pub fn gauge(name: &str, value: u64) {
    if let Some(id) = metric_id(MetricType::Gauge, name) {
        let _ = abi::record_metric(id, value);
    }
}
