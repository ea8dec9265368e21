//! config::parse over a plugin configuration, with an environment where most variables are set
//! (so validation gets past the key and consumer secrets); then the Config accessors, and
//! invariants that the rest of the filter relies on.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tollgate::config::{parse, parse_window, Consumers};

/// `UNSET*` and "" are unset, `EMPTY*` is blank, `BAD*` holds a control character, anything else
/// a plausible secret.
fn env(name: &str) -> Option<String> {
    if name.is_empty() || name.starts_with("UNSET") {
        None
    } else if name.starts_with("EMPTY") {
        Some("  ".into())
    } else if name.starts_with("BAD") {
        Some("sk-\u{7}x".into())
    } else {
        Some(format!("sk-{}", name.len()))
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_window(&text);

    let Ok(cfg) = parse(data, &env) else { return };
    assert!(!cfg.providers.is_empty());
    assert!(cfg.max_sse_event_bytes >= 1024 && cfg.default_max_tokens > 0 && cfg.max_request_bytes > 0);
    assert!(cfg.health.circuit_failures > 0 && cfg.health.half_open_probes > 0);
    let mut names: Vec<&str> = vec!["anonymous", "", "*", "gpt-4o-mini"];
    for p in &cfg.providers {
        assert!(!p.keys.is_empty(), "provider {} has no key", p.name);
        // Weighted rotation walks the schedule and indexes keys with it.
        let total: u64 = p.keys.iter().map(|k| u64::from(k.weight)).sum();
        assert_eq!(p.schedule.len() as u64, total, "provider {}", p.name);
        assert!(p.schedule.iter().all(|&i| i < p.keys.len()), "provider {}: schedule out of range", p.name);
        assert!(p.keys.iter().all(|k| !k.secret.is_empty() && (1..=1000).contains(&k.weight)));
        // Probation shares weigh keys by share_percent of 100 (pool/keypool.rs).
        assert!((1..=100).contains(&p.probation.share_percent) && p.probation.requests <= 1_000_000);
        assert_eq!(cfg.provider(&p.name).map(|(_, q)| q.name.as_str()), Some(p.name.as_str()));
        names.extend(p.models.keys().map(String::as_str));
    }
    if let Consumers::Keys(list) | Consumers::TrustedHeader { list, .. } = &cfg.consumers {
        names.extend(list.iter().map(|c| c.name.as_str()));
        names.extend(list.iter().flat_map(|c| c.model_limits.keys().map(String::as_str)));
    }
    names.extend(cfg.prices.keys().map(String::as_str));
    if let Some(status) = &cfg.status {
        assert!(status.path.starts_with('/'));
    }
    for &consumer in &names {
        for &model in &names {
            for (_, limit) in cfg.limits_for(consumer, model) {
                // quota.rs relies on config refusing amount 0 (such a limit admits nothing).
                assert!(limit.amount > 0 && limit.window_ms > 0, "limit for {consumer:?}/{model:?}: {limit:?}");
            }
        }
        let _ = cfg.consumer(consumer);
        // Every price admission multiplies by is finite and non-negative.
        if let Some(p) = cfg.price_for(consumer) {
            let ok = |x: f64| x.is_finite() && x >= 0.0;
            assert!(ok(p.input_per_mtok) && ok(p.output_per_mtok) && ok(p.cached_input_per_mtok), "{p:?}");
        }
        for &model in &names {
            let _ = cfg.has_cost_limit(consumer, model);
        }
        let _ = cfg.is_known_model(consumer);
        for p in &cfg.providers {
            let _ = p.map_model(consumer);
        }
    }
});
