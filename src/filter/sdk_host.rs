//! [`Host`] over the proxy-wasm SDK: reads through its `_bytes` getters, the writes Envoy can refuse
//! through [`super::hostcalls`]. Every call is wrapped in a `prof::span` (counted and timed in
//! profiling builds, nothing otherwise).

use super::hostcalls;
use super::prof::span;
use crate::host::{Body, Host, Map};
use crate::store::{SharedStore, StoreError};
use core::cell::RefCell;
use hashbrown::HashMap;
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

/// The current stream's host: stateless, the SDK's calls act on the context Envoy is running.
pub struct SdkHost;

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
    static METRICS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
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
        now_ms()
    }

    fn header(&self, map: Map, name: &str) -> Option<Vec<u8>> {
        let _p = span("host proxy_get_header_map_value");
        sdk::get_map_value_bytes(map_type(map), name).ok().flatten()
    }

    fn headers(&self, map: Map) -> Vec<(String, Vec<u8>)> {
        let _p = span("host proxy_get_header_map_pairs");
        sdk::get_map_bytes(map_type(map)).unwrap_or_default()
    }

    fn set_header(&mut self, map: Map, name: &str, value: &str) -> bool {
        hostcalls::replace_header(map_type(map), name, value)
    }

    fn remove_header(&mut self, map: Map, name: &str) -> bool {
        hostcalls::remove_header(map_type(map), name)
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
        if by == 0 {
            return;
        }
        if let Some(id) = metric_id(MetricType::Counter, name) {
            let _p = span("host proxy_increment_metric");
            let _ = sdk::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }

    fn gauge(&mut self, name: &str, value: u64) {
        if let Some(id) = metric_id(MetricType::Gauge, name) {
            let _p = span("host proxy_record_metric");
            let _ = sdk::record_metric(id, value);
        }
    }

    fn store(&self) -> &dyn SharedStore {
        &HostStore
    }
}
