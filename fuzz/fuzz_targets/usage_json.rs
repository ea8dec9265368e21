//! usage::usage_from_json and estimate::response_text_chars over a response body; the same bytes
//! as an SSE event's data for StreamUsage (where reported usage is cumulative, so a repeated event
//! must not change it) and as an event for without_null_usage, and as a request path for
//! ApiKind::from_path.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tollgate::count::sse::SseEvent;
use tollgate::count::estimate::response_text_chars;
use tollgate::count::usage::{usage_from_json, without_null_usage, ApiKind, StreamUsage};

fuzz_target!(|data: &[u8]| {
    let _ = usage_from_json(data);
    let _ = response_text_chars(data);
    if let Some(out) = without_null_usage(data) {
        assert!(out.len() < data.len());
    }

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
