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
//! - `replay`: tollgate's host calls of one non-streamed request, in both filters, in the order and
//!   with about the sizes tollgate makes them (`make profile`'s 19.5, less the quarter calls), the
//!   request held as tollgate's listener holds it, and none of its logic: what
//!   tollgate's calls cost Envoy together, against tollgate itself in the same rounds. Its count
//!   is 1. `replay-without-<part>` leaves one part out (see [`Part`]): the replay less it is what
//!   that part costs.
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
    Replay,
}

#[derive(Default)]
pub struct Root {
    probe: Probe,
    count: usize,
    upstream: bool,
    without: Option<Part>,
    answer_by_header: bool,
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
            _ if name.starts_with("replay") => Probe::Replay,
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
        self.upstream = upstream;
        self.without = name.strip_prefix("replay-without-").and_then(Part::named);
        self.answer_by_header = name == "replay-answer-by-header";
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        if self.probe == Probe::Replay {
            return Some(Box::new(Replay {
                upstream: self.upstream,
                without: self.without,
                answer_by_header: self.answer_by_header,
            }));
        }
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

/// The parts of tollgate's calls a replay can leave out.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    /// The hand-off and the records in filter state: 4 `proxy_set_property`, 1 `proxy_get_property`.
    State,
    /// The attempt's whole filter: its 5 calls (map read and 2 writes on the request, map read
    /// and whole-map write on the answer).
    Attempt,
    /// The headers the attempt adds to the answer, in one whole-map write (1 call).
    AnswerWrite,
    /// The admission's shared data: health read, quota read and CAS write (3 calls).
    Shared,
    /// Holding the request until its body is in (no call).
    Hold,
}

impl Part {
    fn named(name: &str) -> Option<Part> {
        Some(match name {
            "state" => Part::State,
            "attempt" => Part::Attempt,
            "answer-write" => Part::AnswerWrite,
            "shared" => Part::Shared,
            "hold" => Part::Hold,
            _ => return None,
        })
    }
}

/// The `replay` probe: one filter's share of tollgate's calls (see the module's doc).
struct Replay {
    upstream: bool,
    without: Option<Part>,
    /// The answer's headers written one call each instead of in one whole-map write.
    answer_by_header: bool,
}

impl Replay {
    fn with(&self, part: Part) -> bool {
        self.without != Some(part)
    }

    /// Before the end of the stream: held, as tollgate's listener holds the request and buffers
    /// the answer; without [`Part::Hold`], passed on (the calls are still made once, at the end).
    fn until_the_end(&self) -> Action {
        if self.with(Part::Hold) {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}

impl Context for Replay {}

/// Payloads of tollgate's sizes for the benchmark's request: its plan, access-log record and the
/// headers the attempt adds to the answer.
const PLAN: [u8; 200] = [b'p'; 200];
const RECORD: &[u8] = b"consumer=bench model=gpt-4o-mini served=gpt-4o-mini provider=openai key=oa-1 in=25 out=12 usage=exact";
const ANSWER_HEADERS: [(&str, &str); 8] = [
    ("x-tollgate-provider", "openai"),
    ("x-tollgate-key-id", "oa-1"),
    ("x-ratelimit-limit-requests", "1000000000"),
    ("x-ratelimit-remaining-requests", "999999999"),
    ("x-ratelimit-reset-requests", "60ms"),
    ("x-ratelimit-limit-tokens", "1000000000000"),
    ("x-ratelimit-remaining-tokens", "999999999960"),
    ("x-ratelimit-reset-tokens", "1ms"),
];

impl HttpContext for Replay {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if self.upstream {
            if self.with(Part::Attempt) {
                std::hint::black_box(self.get_http_request_headers_bytes());
                if self.with(Part::State) {
                    std::hint::black_box(self.get_property(vec!["tollgate_plan"]));
                }
                self.set_http_request_header("authorization", Some("Bearer sk-bench-1"));
                self.set_http_request_header("x-probe", Some("attempt"));
            }
            return Action::Continue;
        }
        std::hint::black_box(self.get_http_request_headers_bytes());
        self.set_http_request_header("authorization", None);
        if end_of_stream {
            return Action::Continue;
        }
        self.until_the_end()
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.upstream {
            return Action::Continue;
        }
        if !end_of_stream {
            return self.until_the_end();
        }
        std::hint::black_box(self.get_http_request_body(0, size));
        std::hint::black_box(self.get_current_time());
        if self.with(Part::Shared) {
            if self.get_shared_data("replay:health").0.is_none() {
                // Something to read: written once, outside the calls replayed.
                let _ = self.set_shared_data("replay:health", Some(&[7u8; 64]), None);
            }
            let (_, cas) = self.get_shared_data("replay:quota");
            let _ = self.set_shared_data("replay:quota", Some(&[1u8; 64]), cas);
        }
        if self.with(Part::State) {
            self.set_property(vec!["tollgate_plan"], Some(PLAN.as_slice()));
            self.set_property(vec!["tollgate_consumer"], Some(b"bench".as_slice()));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if self.upstream && !self.with(Part::Attempt) {
            return Action::Continue;
        }
        let map = self.get_http_response_headers_bytes();
        if self.upstream && self.with(Part::AnswerWrite) && self.answer_by_header {
            for (k, v) in ANSWER_HEADERS {
                self.set_http_response_header(k, Some(v));
            }
        } else if self.upstream && self.with(Part::AnswerWrite) {
            let mut pairs: Vec<(&str, &[u8])> = map
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            pairs.extend(ANSWER_HEADERS.iter().map(|(k, v)| (*k, v.as_bytes())));
            self.set_http_response_headers_bytes(pairs);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.upstream {
            return Action::Continue;
        }
        // As tollgate's listener reads a JSON answer: each chunk as it passes, not held.
        if size > 0 {
            std::hint::black_box(self.get_http_response_body(0, size));
        }
        if end_of_stream && self.with(Part::State) {
            self.set_property(vec!["tollgate_total_tokens"], Some(b"37".as_slice()));
            self.set_property(vec!["tollgate"], Some(RECORD));
        }
        Action::Continue
    }
}
