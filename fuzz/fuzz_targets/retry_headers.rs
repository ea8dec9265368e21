//! retry_signal::cooldown_ms over response headers read from the input ("name: value" lines; a
//! line that does not start with "name:" is the value of a rate-limit header chosen from the input), the three
//! parsers on every value, and the formatters round-tripped through the parsers.
#![no_main]

mod common;

use common::Params;
use libfuzzer_sys::fuzz_target;
use tollgate::failover::retry_signal::{
    cooldown_ms, format_go_duration, format_rfc3339, parse_go_duration_ms, parse_http_date_ms,
    parse_rfc3339_ms, MAX_COOLDOWN_MS,
};

const NAMES: [&str; 14] = [
    "retry-after-ms",
    "retry-after",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
];
/// 9999-12-31T23:59:59.999Z, where format_rfc3339 clamps.
const MAX_FORMAT_MS: u64 = 253_402_300_799_999;

/// Letters and '-': so that bare dates and durations ("12:00:30", "2024-08-01T12:00:30Z") are values.
fn is_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-')
}

fn round_trip(ms: u64) {
    let go = ms % (MAX_COOLDOWN_MS + 1);
    let s = format_go_duration(go);
    assert_eq!(parse_go_duration_ms(&s), Some(go), "format_go_duration({go}) = {s:?}");
    let s = format_rfc3339(ms);
    let want = ms.min(MAX_FORMAT_MS) / 1000 * 1000;
    assert_eq!(parse_rfc3339_ms(&s), Some(want), "format_rfc3339({ms}) = {s:?}");
}

fuzz_target!(|data: &[u8]| {
    let mut p = Params::new(data);
    let text = String::from_utf8_lossy(data);
    let offset = p.below(NAMES.len() as u64) as usize;
    let headers: Vec<(&str, &str)> = text
        .split('\n')
        .enumerate()
        .map(|(i, line)| match line.split_once(':') {
            Some((name, value)) if is_name(name.trim()) => (name, value),
            _ => (NAMES[(i + offset) % NAMES.len()], line),
        })
        .collect();

    for now in [0, 1_722_513_600_000, p.number()] {
        if let Some(ms) = cooldown_ms(headers.iter().copied(), now) {
            assert!(ms <= MAX_COOLDOWN_MS, "cooldown {ms} ms over the cap");
        }
    }
    for value in headers.iter().map(|(_, v)| *v).chain([&*text]) {
        if let Some(ms) = parse_go_duration_ms(value) {
            assert!(ms <= MAX_COOLDOWN_MS, "{value:?} gave {ms} ms over the cap");
            round_trip(ms);
        }
        if let Some(ms) = parse_http_date_ms(value) {
            round_trip(ms);
        }
        if let Some(ms) = parse_rfc3339_ms(value) {
            round_trip(ms);
        }
    }
    round_trip(p.number());
});
