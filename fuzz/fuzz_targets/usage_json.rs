//! usage::usage_from_json over a response body; the same bytes as an SSE event's data for
//! StreamUsage (where reported usage is cumulative, so a repeated event must not change it), and
//! as a request path for ApiKind::from_path.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tollgate::count::sse::SseEvent;
use tollgate::count::usage::{usage_from_json, ApiKind, StreamUsage};

fuzz_target!(|data: &[u8]| {
    let _ = usage_from_json(data);

    let text = String::from_utf8_lossy(data);
    let ev = SseEvent { event: "", data: &text, raw: data };
    let mut s = StreamUsage::new();
    s.on_event(&ev);
    let (once, reported) = (s.usage(), s.output_reported());
    s.on_event(&ev);
    assert_eq!(s.usage(), once, "usage changed when the same event came twice");
    assert_eq!(s.output_reported(), reported);
    let _ = (s.text_chars(), s.estimated_output_tokens());
    let _ = StreamUsage::is_usage_only_chunk(&ev);

    let _ = ApiKind::from_path(&text);
});
