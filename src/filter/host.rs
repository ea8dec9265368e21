//! Host services behind the pure modules' seams: shared data, clock, metrics, headers.
//! Every call goes through `hostcalls::` so a host failure is a `Result`, never a panic.

use crate::store::{SharedStore, StoreError};
use core::cell::RefCell;
use hashbrown::HashMap;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{MapType, MetricType, Status};
use std::time::UNIX_EPOCH;

pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        hostcalls::get_shared_data(key).map_err(|_| StoreError::Host)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Host),
        }
    }
}

pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Header value as text; non-UTF-8 values read as absent (the SDK's String getters would panic).
pub fn header(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(map, name)
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
}

pub fn headers(map: MapType) -> Vec<(String, String)> {
    hostcalls::get_map_bytes(map)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| String::from_utf8(v).ok().map(|v| (k, v)))
        .collect()
}

pub fn set_header(map: MapType, name: &str, value: Option<&str>) {
    let _ = hostcalls::set_map_value(map, name, value);
}

pub fn add_header(map: MapType, name: &str, value: &str) {
    let _ = hostcalls::add_map_value(map, name, value);
}

pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

pub fn set_property(name: &str, value: &str) {
    let _ = hostcalls::set_property(vec![name], Some(value.as_bytes()));
}

/// Local reply; `headers` are added to the reply. Returns false if the host refused.
pub fn respond(status: u16, headers: &[(&str, &str)], body: &[u8]) -> bool {
    hostcalls::send_http_response(u32::from(status), headers.to_vec(), Some(body)).is_ok()
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
        let id = hostcalls::define_metric(kind, name).ok()?;
        m.borrow_mut().insert(name.to_string(), id);
        Some(id)
    })
}

pub fn count(name: &str, by: u64) {
    if by == 0 {
        return;
    }
    if let Some(id) = metric_id(MetricType::Counter, name) {
        let _ = hostcalls::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
    }
}

pub fn gauge(name: &str, value: u64) {
    if let Some(id) = metric_id(MetricType::Gauge, name) {
        let _ = hostcalls::record_metric(id, value);
    }
}

/// Envoy's `clear_route_cache` foreign function: the router re-matches the route after a request
/// header changed (header mutations alone do not clear it in Envoy 1.40).
pub fn clear_route_cache() {
    let _ = hostcalls::call_foreign_function("clear_route_cache", Some(&[]));
}
