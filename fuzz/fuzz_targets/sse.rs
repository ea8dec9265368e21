//! SseParser + StreamUsage: the input is a response stream. It is parsed whole, split in two at a
//! data-driven position, and in small chunks of a data-driven size; all three must give the same
//! events, the same drops and the same usage (the parser promises split independence).
#![no_main]

mod common;

use common::{parse_sse, Event, Params};
use libfuzzer_sys::fuzz_target;
use tollgate::count::usage::{StreamUsage, Usage};

#[derive(Debug, PartialEq, Eq)]
struct Totals {
    usage: Option<Usage>,
    output_reported: bool,
    text_chars: u64,
    estimated_output_tokens: u64,
    usage_only_chunks: usize,
}

fn totals(events: &[Event]) -> Totals {
    let mut u = StreamUsage::new();
    let mut usage_only_chunks = 0;
    for ev in events {
        u.on_event(&ev.as_sse());
        usage_only_chunks += usize::from(StreamUsage::is_usage_only_chunk(&ev.as_sse()));
    }
    Totals {
        usage: u.usage(),
        output_reported: u.output_reported(),
        text_chars: u.text_chars(),
        estimated_output_tokens: u.estimated_output_tokens(),
        usage_only_chunks,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut p = Params::new(data);
    // Mostly the production cap; sometimes a tiny one so that the drop path runs as well.
    let cap = match p.below(4) {
        0 => 1 + p.below(256) as usize,
        _ => 1 << 20,
    };
    let cut = p.below(data.len() as u64 + 1) as usize;
    let chunk = 1 + p.below(16) as usize;

    let (whole, whole_dropped) = parse_sse(cap, [data]);
    let (a, b) = data.split_at(cut);
    let (halves, halves_dropped) = parse_sse(cap, [a, b]);
    let (small, small_dropped) = parse_sse(cap, data.chunks(chunk));

    if whole_dropped == 0 {
        // Lossless pass-through: every byte comes back in exactly one event's raw.
        let raw: Vec<u8> = whole.iter().flat_map(|e| e.raw.iter().copied()).collect();
        assert_eq!(raw, data, "raw bytes of the events differ from the stream");
    }
    assert_eq!(whole_dropped, halves_dropped, "drops differ, split at {cut}");
    assert_eq!(whole_dropped, small_dropped, "drops differ, chunks of {chunk}");
    assert_eq!(whole, halves, "events differ, split at {cut}");
    assert_eq!(whole, small, "events differ, chunks of {chunk}");

    let t = totals(&whole);
    assert_eq!(t, totals(&halves), "usage differs, split at {cut}");
    assert_eq!(t, totals(&small), "usage differs, chunks of {chunk}");
});
