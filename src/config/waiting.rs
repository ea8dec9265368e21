//! Waiting for capacity instead of a 429, off unless configured:
//!
//! ```json
//! "waiting": {"max_held": 1000, "default": {"max_wait": "30s", "priority": 0, "max_held": 100}},
//! "consumers": {"list": [{"name": "batch", "key_env": "K",
//!                         "waiting": {"max_wait": "2m", "priority": 0, "max_held": 50}}]}
//! ```
//!
//! A consumer waits by its own `waiting`, else by `waiting.default`; `max_wait: "0s"` makes one
//! consumer fail fast where a default would hold it. `waiting.max_held` is the cap on held requests
//! across the Envoy's workers, whoever they are; a consumer's `max_held` counts one worker's.

use super::{at, err, parse_window, Consumers, Object, Res};
use crate::maps::HashMap;
use serde::Deserialize;

/// The longest `max_wait` taken: past an hour a client has long given up (the OpenAI SDK's
/// default timeout is 10 minutes).
pub const MAX_WAIT_MS: u64 = 3_600_000;
/// The default cap on held requests.
pub const DEFAULT_MAX_HELD: u32 = 1_000;
/// The largest cap taken: a held request keeps its body in Envoy's memory.
const MAX_HELD: u32 = 100_000;
/// Priority lanes: 0 (the default) to this, higher released first.
pub const MAX_PRIORITY: u8 = 9;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWaiting {
    max_held: Option<u32>,
    default: Option<Object<RawWait>>,
    path_prefixes: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWait {
    max_wait: Option<String>,
    priority: Option<u8>,
    max_held: Option<u32>,
}

/// How one consumer waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// The longest a request is held; a client may ask for less (`x-tollgate-max-wait`).
    pub max_wait_ms: u64,
    /// Higher lanes are released first.
    pub priority: u8,
    /// The most of this consumer's requests held at once on one worker.
    pub max_held: u32,
}

#[derive(Debug, Clone, Default)]
pub struct Waiting {
    /// The most requests held at once across the workers.
    pub max_held: u32,
    default: Option<Wait>,
    by_consumer: HashMap<String, Option<Wait>>,
    /// Only requests whose path starts with one of these wait (how a route is named); empty: all.
    path_prefixes: Vec<String>,
}

impl Waiting {
    /// How `consumer` waits on `path`; None: it does not (a 429 at once).
    pub fn for_request(&self, consumer: &str, path: &str) -> Option<&Wait> {
        if !self.path_prefixes.is_empty()
            && !self
                .path_prefixes
                .iter()
                .any(|p| path.starts_with(p.as_str()))
        {
            return None;
        }
        self.for_consumer(consumer)
    }

    /// How `consumer` waits; None: it does not (a 429 at once).
    pub fn for_consumer(&self, consumer: &str) -> Option<&Wait> {
        if self.by_consumer.is_empty() {
            return self.default.as_ref();
        }
        match self.by_consumer.get(consumer) {
            Some(own) => own.as_ref(),
            None => self.default.as_ref(),
        }
    }
}

/// "250ms", or a window's form ("30s", "2m"); "0s" is allowed (no waiting).
fn duration_ms(path: &str, s: &str) -> Res<u64> {
    let s = s.trim();
    let ms = if let Some(n) = s.strip_suffix("ms") {
        n.parse::<u64>().ok()
    } else if s.trim_start_matches('0') == "s" {
        Some(0)
    } else {
        parse_window(s)
    };
    match ms {
        Some(ms) if ms <= MAX_WAIT_MS => Ok(ms),
        Some(_) => Err(err(path, "must be at most 1h")),
        None => Err(err(
            path,
            "expected a duration such as \"500ms\", \"30s\" or \"2m\"",
        )),
    }
}

/// One `waiting` object (a consumer's, or the default) at `path`. None: it waits for nothing.
pub(super) fn wait(path: &str, raw: RawWait, global_cap: u32) -> Res<Option<Wait>> {
    let max_wait_ms = match raw.max_wait {
        Some(s) => duration_ms(&at(path, "max_wait"), &s)?,
        None => return Err(err(at(path, "max_wait"), "missing")),
    };
    let priority = raw.priority.unwrap_or(0);
    if priority > MAX_PRIORITY {
        return Err(err(
            at(path, "priority"),
            format!("must be at most {MAX_PRIORITY}"),
        ));
    }
    let max_held = match raw.max_held {
        None => global_cap,
        Some(0) => {
            return Err(err(
                at(path, "max_held"),
                "must be at least 1 (set max_wait to \"0s\" for no waiting)",
            ))
        }
        Some(n) if n > global_cap => {
            return Err(err(
                at(path, "max_held"),
                format!("must be at most waiting.max_held ({global_cap})"),
            ))
        }
        Some(n) => n,
    };
    Ok((max_wait_ms > 0).then_some(Wait {
        max_wait_ms,
        priority,
        max_held,
    }))
}

/// The global cap, checked before any consumer's cap is compared with it.
pub(super) fn max_held(raw: Option<&RawWaiting>) -> Res<u32> {
    match raw.and_then(|w| w.max_held) {
        None => Ok(DEFAULT_MAX_HELD),
        Some(0) => Err(err(
            "waiting.max_held",
            "must be at least 1 (leave `waiting` out for no waiting)",
        )),
        Some(n) if n > MAX_HELD => Err(err(
            "waiting.max_held",
            format!("must be at most {MAX_HELD}"),
        )),
        Some(n) => Ok(n),
    }
}

/// The validated section; None when no consumer waits (nothing is done on the hot path).
pub(super) fn validate(
    raw: Option<RawWaiting>,
    global: u32,
    consumers: &Consumers,
) -> Res<Option<Waiting>> {
    let consumers = match consumers {
        Consumers::Anonymous => &[][..],
        Consumers::Keys(l) | Consumers::TrustedHeader { list: l, .. } => l,
    };
    let (default, path_prefixes) = match raw {
        Some(w) => (
            match w.default {
                Some(Object(d)) => wait("waiting.default", d, global)?,
                None => None,
            },
            super::cache::path_prefixes("waiting.path_prefixes", w.path_prefixes)?,
        ),
        None => (None, Vec::new()),
    };
    let by_consumer: HashMap<String, Option<Wait>> = consumers
        .iter()
        .filter_map(|c| Some((c.name.clone(), c.waiting?)))
        .collect();
    if default.is_none() && by_consumer.values().all(Option::is_none) {
        return Ok(None);
    }
    Ok(Some(Waiting {
        max_held: global,
        default,
        by_consumer,
        path_prefixes,
    }))
}

#[cfg(test)]
mod tests {
    use crate::config::parse;

    const PROVIDERS: &str =
        r#""providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}]"#;

    fn parse_str(s: &str) -> Result<crate::config::Config, String> {
        parse(s.as_bytes(), &|_| Some("sk".into())).map_err(|e| e.to_string())
    }

    #[test]
    fn off_unless_configured_and_per_consumer_over_the_default() {
        let cfg = parse_str(&format!("{{{PROVIDERS}}}")).unwrap();
        assert!(cfg.waiting.is_none());
        let cfg = parse_str(&format!(
            r#"{{"waiting":{{"max_held":50,"default":{{"max_wait":"2s"}}}},
                "consumers":{{"list":[{{"name":"a","key_env":"A","waiting":{{"max_wait":"500ms","priority":3,"max_held":5}}}},
                                     {{"name":"b","key_env":"B"}},
                                     {{"name":"c","key_env":"C","waiting":{{"max_wait":"0s"}}}}]}},{PROVIDERS}}}"#
        ))
        .unwrap();
        let w = cfg.waiting.unwrap();
        assert_eq!(w.max_held, 50);
        let a = w.for_consumer("a").unwrap();
        assert_eq!((a.max_wait_ms, a.priority, a.max_held), (500, 3, 5));
        let b = w.for_consumer("b").unwrap();
        assert_eq!((b.max_wait_ms, b.priority, b.max_held), (2_000, 0, 50));
        assert!(w.for_consumer("c").is_none(), "0s: fails fast");
        assert_eq!(
            w.for_request("a", "/v1/chat/completions"),
            Some(a),
            "no prefixes: every path"
        );
        assert_eq!(w.for_consumer("anonymous"), w.for_consumer("b"));
    }

    #[test]
    fn the_fuzz_corpus_full_config_waits() {
        let cfg = parse(
            include_bytes!("../../fuzz/corpus/config/full.json"),
            &|_| Some("k".into()),
        )
        .unwrap();
        let w = cfg.waiting.unwrap();
        assert_eq!(w.for_consumer("team-a").unwrap().max_wait_ms, 500);
        assert_eq!(w.for_consumer("someone").unwrap().max_wait_ms, 30_000);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#""waiting":{"max_held":0},"#, "waiting.max_held: must be at least 1 (leave `waiting` out for no waiting)"),
            (r#""waiting":{"default":{}},"#, "waiting.default.max_wait: missing"),
            (r#""waiting":{"default":{"max_wait":"soon"}},"#, "waiting.default.max_wait: expected a duration such as \"500ms\", \"30s\" or \"2m\""),
            (r#""waiting":{"default":{"max_wait":"2h"}},"#, "waiting.default.max_wait: must be at most 1h"),
            (r#""waiting":{"default":{"max_wait":"1s","priority":10}},"#, "waiting.default.priority: must be at most 9"),
            (r#""waiting":{"max_held":5,"default":{"max_wait":"1s","max_held":6}},"#, "waiting.default.max_held: must be at most waiting.max_held (5)"),
            (r#""waiting":{"path_prefixes":["v1/"],"default":{"max_wait":"1s"}},"#, "waiting.path_prefixes[0]: must start with '/'"),
            (r#""waiting":{"default":{"max_wait":"1s","lane":1}},"#, "waiting.default.lane: unknown field, expected one of: max_wait, priority, max_held"),
            (r#""consumers":{"list":[{"name":"a","key_env":"A","waiting":{"max_wait":"1s","max_held":0}}]},"#, "consumers.list[0].waiting.max_held: must be at least 1 (set max_wait to \"0s\" for no waiting)"),
        ];
        for (section, want) in cases {
            assert_eq!(
                parse_str(&format!("{{{section}{PROVIDERS}}}")).unwrap_err(),
                want,
                "{section}"
            );
        }
    }
}
