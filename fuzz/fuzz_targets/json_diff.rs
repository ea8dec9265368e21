//! tollgate's JSON parser (src/json.rs) against serde_json on the same bytes: the same verdict, the
//! same error message and position, and the same value once ours is written out (compact and
//! pretty) and read back by serde_json; `member` agrees with the full parse. Numbers serde_json refuses as out of range (`1e400`) are
//! the one accepted difference in verdict: JSON's grammar allows them and tollgate keeps their text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::json;

fuzz_target!(|data: &[u8]| {
    let ours = json::from_slice(data);
    // `member` checks what it skips exactly as the full parse does.
    let whole = ours.clone().map(|v| v.get("usage").cloned());
    assert_eq!(json::member(data, "usage"), whole);
    let theirs = serde_json::from_slice::<serde_json::Value>(data);
    match (ours, theirs) {
        // serde_json stops at a number beyond f64; we keep its text and go on.
        (_, Err(t)) if t.to_string().starts_with("number out of range") => {}
        (Ok(v), Ok(t)) => {
            for written in [json::to_vec(&v), json::to_vec_pretty(&v)] {
                let written = written.unwrap_or_default();
                let back: serde_json::Value = serde_json::from_slice(&written)
                    .unwrap_or_else(|e| panic!("we wrote {:?}: {e}", String::from_utf8_lossy(&written)));
                assert_eq!(back, t);
            }
        }
        // Invalid UTF-8 in a string: both refuse, but serde_json checks the bytes in batches, so
        // which error it meets first, and where, follows its buffering.
        (Err(o), Err(t)) if [&o.to_string(), &t.to_string()].iter().any(|m| m.starts_with("invalid unicode")) => {}
        (Err(o), Err(t)) => assert_eq!(o.to_string(), t.to_string()),
        (o, t) => panic!("ours {o:?}, serde_json {t:?}"),
    }
});
