//! The `cache` section: a response cache, off unless configured.
//!
//! ```json
//! "cache": {"ttl": "10m", "capacity": 1024, "max_entry_bytes": 32768,
//!           "stale_window": "1h", "shared_scope": false, "store_length_truncated": false,
//!           "consumers": ["team-a"], "models": ["gpt-4o-mini"], "path_prefixes": ["/v1/"]}
//! ```
//!
//! Where it applies: every consumer, model and path unless `consumers`, `models` or
//! `path_prefixes` narrow it (a route is named by its path prefix, the part of a request an Envoy
//! route matches that the listener role sees before any route is taken). Worst-case memory is
//! `capacity` x `max_entry_bytes` (plus ~100 bytes a slot), refused above [`MAX_TOTAL_BYTES`].

use super::{at, err, parse_window, Consumers, Res};
use hashbrown::HashSet;
use serde::Deserialize;

/// The largest `capacity` x `max_entry_bytes` accepted: Envoy's shared data lives in its memory.
pub const MAX_TOTAL_BYTES: u64 = 1 << 30;
/// The answer side keeps a JSON answer up to 8 MiB; nothing larger could be stored.
const MAX_ENTRY_BYTES: u64 = 8 << 20;
const MAX_CAPACITY: u64 = 1_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    ttl: Option<String>,
    capacity: Option<u64>,
    max_entry_bytes: Option<u64>,
    stale_window: Option<String>,
    shared_scope: Option<bool>,
    store_length_truncated: Option<bool>,
    consumers: Option<Vec<String>>,
    models: Option<Vec<String>>,
    path_prefixes: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub ttl_ms: u64,
    /// Slots in all (entries kept at most).
    pub capacity: u64,
    /// The largest entry stored, its header included.
    pub max_entry_bytes: u64,
    /// How long past its time-to-live an entry may still be served when no provider can answer;
    /// 0: never.
    pub stale_ms: u64,
    /// One scope for every consumer: a consumer may be served an answer another consumer's request
    /// paid for.
    pub shared_scope: bool,
    /// Store answers cut by their token limit (`finish_reason: length`).
    pub store_length_truncated: bool,
    /// None: every consumer.
    pub consumers: Option<HashSet<String>>,
    /// None: every model.
    pub models: Option<HashSet<String>>,
    /// Empty: every path.
    pub path_prefixes: Vec<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl_ms: 300_000,
            capacity: 1024,
            max_entry_bytes: 32 << 10,
            stale_ms: 0,
            shared_scope: false,
            store_length_truncated: false,
            consumers: None,
            models: None,
            path_prefixes: Vec::new(),
        }
    }
}

impl CacheConfig {
    /// Whether the cache applies to this consumer, model and path.
    pub fn applies(&self, consumer: &str, model: &str, path: &str) -> bool {
        self.consumers.as_ref().is_none_or(|c| c.contains(consumer))
            && self.models.as_ref().is_none_or(|m| m.contains(model))
            && (self.path_prefixes.is_empty()
                || self
                    .path_prefixes
                    .iter()
                    .any(|p| path.starts_with(p.as_str())))
    }
}

/// A section's `path_prefixes` (at `field`): each starts with `/`; empty: every path.
pub(super) fn path_prefixes(field: &str, raw: Option<Vec<String>>) -> Res<Vec<String>> {
    let prefixes = raw.unwrap_or_default();
    match prefixes.iter().position(|p| !p.starts_with('/')) {
        Some(i) => Err(err(format!("{field}[{i}]"), "must start with '/'")),
        None => Ok(prefixes),
    }
}

fn window(field: &str, value: Option<String>) -> Res<Option<u64>> {
    value
        .map(|v| {
            parse_window(&v).ok_or_else(|| {
                err(
                    at("cache", field),
                    "expected a duration such as \"30s\", \"10m\", \"1h\" or \"1d\"",
                )
            })
        })
        .transpose()
}

pub(super) fn validate(raw: RawCache, consumers: &Consumers) -> Res<CacheConfig> {
    let d = CacheConfig::default();
    let ttl_ms = window("ttl", raw.ttl)?.unwrap_or(d.ttl_ms);
    let stale_ms = window("stale_window", raw.stale_window)?.unwrap_or(0);
    let capacity = raw.capacity.unwrap_or(d.capacity);
    if !(2..=MAX_CAPACITY).contains(&capacity) {
        return Err(err(
            "cache.capacity",
            format!("must be between 2 and {MAX_CAPACITY}"),
        ));
    }
    let max_entry_bytes = raw.max_entry_bytes.unwrap_or(d.max_entry_bytes);
    if !(1024..=MAX_ENTRY_BYTES).contains(&max_entry_bytes) {
        return Err(err(
            "cache.max_entry_bytes",
            format!("must be between 1024 and {MAX_ENTRY_BYTES}"),
        ));
    }
    if capacity.saturating_mul(max_entry_bytes) > MAX_TOTAL_BYTES {
        return Err(err(
            "cache.capacity",
            format!(
                "capacity x max_entry_bytes is {} bytes, over the limit of {MAX_TOTAL_BYTES} (1 GiB): Envoy keeps the cache in its memory",
                capacity.saturating_mul(max_entry_bytes)
            ),
        ));
    }
    let consumers = match raw.consumers {
        None => None,
        Some(list) => {
            // Names a trusted header gives are not known in advance: any of them may be named.
            let any_name =
                matches!(consumers, Consumers::TrustedHeader { list, .. } if list.is_empty());
            let known: Option<Vec<&str>> = match consumers {
                Consumers::Anonymous => None,
                Consumers::Keys(l) | Consumers::TrustedHeader { list: l, .. } => {
                    Some(l.iter().map(|c| c.name.as_str()).collect())
                }
            };
            for (i, name) in list.iter().enumerate() {
                let ok = match &known {
                    _ if any_name => true,
                    Some(names) => names.contains(&name.as_str()),
                    None => name == super::ANONYMOUS,
                };
                if !ok {
                    return Err(err(
                        format!("cache.consumers[{i}]"),
                        format!("unknown consumer '{name}'"),
                    ));
                }
            }
            Some(list.into_iter().collect())
        }
    };
    let models = raw.models.map(|m| m.into_iter().collect());
    let path_prefixes = path_prefixes("cache.path_prefixes", raw.path_prefixes)?;
    Ok(CacheConfig {
        ttl_ms,
        capacity,
        max_entry_bytes,
        stale_ms,
        shared_scope: raw.shared_scope.unwrap_or(false),
        store_length_truncated: raw.store_length_truncated.unwrap_or(false),
        consumers,
        models,
        path_prefixes,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::parse;

    fn parse_str(s: &str) -> Result<crate::config::Config, String> {
        parse(s.as_bytes(), &|_| Some("k".to_string())).map_err(|e| e.to_string())
    }

    fn with(cache: &str) -> String {
        format!(
            r#"{{"consumers":{{"list":[{{"name":"team-a","key_env":"A"}}]}},
                "providers":[{{"name":"oa","type":"openai","keys":[{{"id":"k","env":"K"}}]}}],
                "cache":{cache}}}"#
        )
    }

    #[test]
    fn off_unless_configured_and_defaults_when_empty() {
        let c = parse_str(&with("null")).unwrap();
        assert!(c.cache.is_none());
        let c = parse_str(&with("{}")).unwrap();
        let cache = c.cache.unwrap();
        assert_eq!(
            (
                cache.ttl_ms,
                cache.capacity,
                cache.max_entry_bytes,
                cache.stale_ms
            ),
            (300_000, 1024, 32768, 0)
        );
        assert!(!cache.shared_scope && !cache.store_length_truncated);
        assert!(cache.applies("anyone", "any", "/v1/chat/completions"));
    }

    #[test]
    fn scope_by_consumer_model_and_path_prefix() {
        let c = parse_str(&with(
            r#"{"ttl":"1h","stale_window":"1d","consumers":["team-a"],"models":["m"],"path_prefixes":["/v1/chat"]}"#,
        ))
        .unwrap();
        let cache = c.cache.unwrap();
        assert_eq!((cache.ttl_ms, cache.stale_ms), (3_600_000, 86_400_000));
        assert!(cache.applies("team-a", "m", "/v1/chat/completions"));
        assert!(!cache.applies("team-b", "m", "/v1/chat/completions"));
        assert!(!cache.applies("team-a", "n", "/v1/chat/completions"));
        assert!(!cache.applies("team-a", "m", "/v1/messages"));
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        let cases: &[(&str, &str)] = &[
            (r#"{"ttl":"0s"}"#, "cache.ttl: expected a duration such as \"30s\", \"10m\", \"1h\" or \"1d\""),
            (r#"{"ttl":"10"}"#, "cache.ttl: expected a duration such as \"30s\", \"10m\", \"1h\" or \"1d\""),
            (r#"{"ttl":10}"#, "cache.ttl: expected a string"),
            (r#"{"stale_window":"soon"}"#, "cache.stale_window: expected a duration such as \"30s\", \"10m\", \"1h\" or \"1d\""),
            (r#"{"capacity":1}"#, "cache.capacity: must be between 2 and 1000000"),
            (r#"{"capacity":-1}"#, "cache.capacity: expected a non-negative integer"),
            (r#"{"max_entry_bytes":100}"#, "cache.max_entry_bytes: must be between 1024 and 8388608"),
            (
                r#"{"capacity":1000000,"max_entry_bytes":8388608}"#,
                "cache.capacity: capacity x max_entry_bytes is 8388608000000 bytes, over the limit of 1073741824 (1 GiB): Envoy keeps the cache in its memory",
            ),
            (r#"{"consumers":["team-b"]}"#, "cache.consumers[0]: unknown consumer 'team-b'"),
            (r#"{"path_prefixes":["/v1","v2"]}"#, "cache.path_prefixes[1]: must start with '/'"),
            (r#"{"shared_scope":"yes"}"#, "cache.shared_scope: expected a boolean"),
            (r#"{"tll":"1m"}"#, "cache.tll: unknown field, expected one of: ttl, capacity, max_entry_bytes, stale_window, shared_scope, store_length_truncated, consumers, models, path_prefixes"),
            (r#"[]"#, "cache: expected an object"),
        ];
        for (cache, want) in cases {
            assert_eq!(parse_str(&with(cache)).unwrap_err(), *want, "{cache}");
        }
    }

    #[test]
    fn consumers_named_by_a_header_may_be_named_before_they_are_seen() {
        let c = parse_str(
            r#"{"consumers":{"trusted_header":"x-team"},
                "providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}],
                "cache":{"consumers":["team-x"]}}"#,
        )
        .unwrap();
        assert!(c.cache.unwrap().applies("team-x", "m", "/"));
    }

    #[test]
    fn without_consumers_only_the_anonymous_one_can_be_named() {
        let cfg = |names: &str| {
            parse_str(&format!(
                r#"{{"providers":[{{"name":"oa","type":"openai","keys":[{{"id":"k","env":"K"}}]}}],
                    "cache":{{"consumers":{names}}}}}"#
            ))
        };
        assert!(cfg(r#"["anonymous"]"#).is_ok());
        assert_eq!(
            cfg(r#"["team-a"]"#).unwrap_err(),
            "cache.consumers[0]: unknown consumer 'team-a'"
        );
    }
}
