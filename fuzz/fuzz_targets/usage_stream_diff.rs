//! StreamUsage's fast path (its hand-written reader and the templates it learns from a stream)
//! against serde alone: the input is a response stream; every event, fed twice in a row (the second
//! time a template fits), must give the same usage-only answer and the same totals after it.
#![no_main]

mod common;

use common::parse_sse;
use libfuzzer_sys::fuzz_target;
use tollgate::count::usage::StreamUsage;

fn totals(s: &StreamUsage) -> impl PartialEq + std::fmt::Debug {
    (s.usage(), s.output_reported(), s.text_chars(), s.estimated_output_tokens())
}

fuzz_target!(|data: &[u8]| {
    let (events, _) = parse_sse(1 << 20, [data]);
    let (mut fast, mut plain, mut reference) = (StreamUsage::new(), StreamUsage::new(), StreamUsage::new());
    for ev in events.iter().flat_map(|e| [e, e]) {
        let ev = ev.as_sse();
        let usage_only = reference.on_event_reference(&ev);
        assert_eq!(fast.on_event_is_usage_only(&ev), usage_only, "usage-only answer differs: {:?}", ev.data);
        assert_eq!(StreamUsage::is_usage_only_chunk(&ev), usage_only, "is_usage_only_chunk differs: {:?}", ev.data);
        plain.on_event(&ev);
        assert_eq!(totals(&fast), totals(&reference), "totals differ after {:?}", ev.data);
        assert_eq!(totals(&plain), totals(&reference), "on_event totals differ after {:?}", ev.data);
    }
});
