//! `make bench`'s host-call prices: the floor, plus one kind of host call made a fixed number of
//! times per request in the listener's filter (the upstream one stays empty). The plugin's
//! configuration names the probe and the count, `<probe>:<count>`; `make bench` compares each
//! against the floor in the same rounds and divides by the count: what one such call costs Envoy,
//! crossing and copying included.
//!
//! - `time`: `proxy_get_current_time_nanoseconds`, a call that returns no bytes;
//! - `header`: one request header's value (`proxy_get_header_map_value`): bytes returned, so the
//!   host also calls back into the module to allocate them;
//! - `map`: the whole request header map (`proxy_get_header_map_pairs`);
//! - `replace`: a request header written (`proxy_replace_header_map_value`);
//! - `write-map`: the request header map written whole (`proxy_set_header_map_pairs`), as read once;
//! - `shared-get` / `shared-set`: a 64-byte shared-data entry read / written
//!   (`proxy_get_shared_data` / `proxy_set_shared_data`, no CAS);
//! - `state`: a filter-state value written (`proxy_set_property`), at the end of the request body;
//! - `hold`: no call; the request headers held until the body is in and both bodies buffered
//!   whole (Pause until end of stream), as tollgate's listener does. Its count is 1.
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

#[derive(Clone, Copy, Default, PartialEq)]
enum Probe {
    #[default]
    None,
    Time,
    Header,
    Map,
    Replace,
    WriteMap,
    SharedGet,
    SharedSet,
    State,
    Hold,
}

#[derive(Default)]
pub struct Root {
    probe: Probe,
    count: usize,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let upstream = self.get_property(vec!["plugin_root_id"]).as_deref()
            == Some(b"tollgate.upstream".as_slice());
        let config = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&config);
        let (name, count) = text.trim().split_once(':').unwrap_or(("", "0"));
        self.probe = match name {
            _ if upstream => Probe::None,
            "time" => Probe::Time,
            "header" => Probe::Header,
            "map" => Probe::Map,
            "replace" => Probe::Replace,
            "write-map" => Probe::WriteMap,
            "shared-get" => Probe::SharedGet,
            "shared-set" => Probe::SharedSet,
            "state" => Probe::State,
            "hold" => Probe::Hold,
            _ => Probe::None,
        };
        self.count = count.parse().unwrap_or(0);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probed {
            probe: self.probe,
            count: self.count,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Probed {
    probe: Probe,
    count: usize,
}

impl Context for Probed {}

impl Probed {
    fn held(&self, end_of_stream: bool) -> bool {
        self.probe == Probe::Hold && !end_of_stream
    }
}

impl HttpContext for Probed {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let map = (self.probe == Probe::WriteMap).then(|| self.get_http_request_headers_bytes());
        if self.probe == Probe::SharedGet {
            // Something to read: written once per request, outside the calls counted.
            let _ = self.set_shared_data("probe", Some(&[7u8; 64]), None);
        }
        for i in 0..self.count {
            match self.probe {
                Probe::Time => {
                    std::hint::black_box(self.get_current_time());
                }
                Probe::Header => {
                    std::hint::black_box(self.get_http_request_header_bytes("content-type"));
                }
                Probe::Map => {
                    std::hint::black_box(self.get_http_request_headers_bytes());
                }
                Probe::Replace => {
                    self.set_http_request_header(
                        "x-probe",
                        Some(if i % 2 == 0 { "a" } else { "b" }),
                    );
                }
                Probe::WriteMap => {
                    if let Some(map) = &map {
                        let pairs = map
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_slice()))
                            .collect();
                        self.set_http_request_headers_bytes(pairs);
                    }
                }
                Probe::SharedGet => {
                    std::hint::black_box(self.get_shared_data("probe"));
                }
                Probe::SharedSet => {
                    let _ = self.set_shared_data("probe", Some(&[i as u8; 64]), None);
                }
                _ => {}
            }
        }
        if self.held(end_of_stream) {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, _size: usize, end_of_stream: bool) -> Action {
        if self.held(end_of_stream) {
            return Action::Pause;
        }
        if self.probe == Probe::State && end_of_stream {
            for i in 0..self.count {
                let name = format!("probe_{i}");
                self.set_property(
                    vec![&name],
                    Some(b"consumer=bench model=gpt-4o-mini".as_slice()),
                );
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, _size: usize, end_of_stream: bool) -> Action {
        if self.held(end_of_stream) {
            return Action::Pause;
        }
        Action::Continue
    }
}
