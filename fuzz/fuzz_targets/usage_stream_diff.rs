//! StreamUsage over a response stream fed in pieces at data-driven split points (up to eight)
//! against the stream fed whole, and against the same stream with each event's top-level
//! `"usage":null` removed by `without_null_usage`: the totals and the usage-only answers must agree,
//! a stripped event must stay one event, and stripping it again must find nothing.
#![no_main]

mod common;

use common::{parse_sse, Event, Params};
use libfuzzer_sys::fuzz_target;
use tollgate::count::usage::{without_null_usage, ClientEvent, StreamUsage};

fn totals(events: &[Event]) -> impl PartialEq + std::fmt::Debug {
    let mut s = StreamUsage::new();
    let mut usage_only = Vec::new();
    for ev in events {
        let ev = ev.as_sse();
        let answer = s.on_event_is_usage_only(&ev);
        assert_eq!(answer, StreamUsage::is_usage_only_chunk(&ev), "usage-only answers differ: {:?}", ev.data);
        usage_only.push(answer);
    }
    (s.usage(), s.output_reported(), s.text_chars(), s.estimated_output_tokens(), usage_only)
}

fuzz_target!(|data: &[u8]| {
    let mut p = Params::new(data);
    let mut cuts: Vec<usize> = (0..p.below(9)).map(|_| p.below(data.len() as u64 + 1) as usize).collect();
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut at = 0;
    for cut in cuts {
        pieces.push(&data[at..cut]);
        at = cut;
    }
    pieces.push(&data[at..]);

    let (whole, _) = parse_sse(1 << 20, [data]);
    let (split, _) = parse_sse(1 << 20, pieces.iter().copied());
    let t = totals(&whole);
    assert_eq!(t, totals(&split), "usage differs, split in {} pieces", pieces.len());

    let mut stripped = Vec::new();
    for ev in &whole {
        // A member repeated in one object (`"usage"` twice) is garbage no provider sends: serde
        // refuses such an event, and once the last `"usage":null` is cut it may read it. Only
        // "no panic" is checked there.
        let repeated = ev.data.matches("\"usage\"").count() > 1;
        match without_null_usage(&ev.raw) {
            Some(_) if repeated => stripped.push(ev.clone()),
            Some(raw) => {
                assert!(raw.len() < ev.raw.len());
                assert_eq!(without_null_usage(&raw), None, "stripped twice: {ev:?}");
                let (again, _) = parse_sse(1 << 20, [&raw[..]]);
                assert_eq!(again.len(), 1, "a stripped event is not one event: {ev:?}");
                // Compared where serde_json reads the event into a Value (skipped members may hold
                // a lone surrogate or a number beyond f64).
                if let Ok(serde_json::Value::Object(mut a)) = serde_json::from_str(&ev.data) {
                    assert_eq!(a.remove("usage"), Some(serde_json::Value::Null));
                    let b: serde_json::Value = serde_json::from_str(&again[0].data).expect("stripped to non-JSON");
                    assert_eq!(Some(&a), b.as_object(), "more than the member changed: {ev:?}");
                }
                stripped.extend(again);
            }
            None => stripped.push(ev.clone()),
        }
    }
    // Every usage-only answer stays, and so do the totals.
    assert_eq!(t, totals(&stripped), "usage differs once null usage is stripped");

    // What a client of a forced-usage stream gets, from one call per event (most events not
    // parsed): the same usage as the parse of every event, and the same bytes as dropping the
    // usage-only chunk and cutting the null usage, wherever the cut is certain.
    let mut one = StreamUsage::new();
    let mut reference = StreamUsage::new();
    for ev in &whole {
        let ev = ev.as_sse();
        let only = reference.on_event_is_usage_only(&ev);
        match one.on_event_for_client(&ev) {
            ClientEvent::Drop => assert!(only, "dropped an event that is not the usage chunk: {:?}", ev.data),
            ClientEvent::AsIs => assert!(!only, "kept the usage chunk: {:?}", ev.data),
            cut @ ClientEvent::Cut(_) => {
                assert!(!only);
                if ev.data.matches("\"usage\"").count() == 1 {
                    let mut raw = Vec::new();
                    cut.write(ev.raw, &mut raw);
                    assert_eq!(Some(raw), without_null_usage(ev.raw), "cut differs: {:?}", ev.data);
                }
            }
        }
    }
    assert_eq!(one.usage(), reference.usage(), "usage differs when most events are not parsed");
});
