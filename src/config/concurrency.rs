//! Limits on requests in flight: `consumers.list[].max_in_flight`, `default_max_in_flight` (for
//! consumers without one of their own, and the anonymous consumer), and
//! `providers[].keys[].max_in_flight`. Counted by [`crate::limit::in_flight`].

use super::{err, Consumer, Consumers, Provider, Res};
use crate::maps::HashMap;

/// The largest limit taken: far beyond what one gateway carries at once, and small enough that a
/// typo of a few zeros more is caught.
pub const MAX_IN_FLIGHT: u32 = 100_000;

/// A `max_in_flight` field at `path`: absent means no limit.
pub(super) fn max_in_flight(path: &str, raw: Option<u32>) -> Res<Option<u32>> {
    match raw {
        None => Ok(None),
        Some(0) => Err(err(path, "must be at least 1 (leave it out for no limit)")),
        Some(n) if n > MAX_IN_FLIGHT => Err(err(path, format!("must be at most {MAX_IN_FLIGHT}"))),
        Some(n) => Ok(Some(n)),
    }
}

/// The limits as the requests ask for them: by consumer name, and whether a provider has a key
/// with a limit (its attempts then read its count). Derived once, at parse.
#[derive(Debug, Clone, Default)]
pub struct InFlightLimits {
    default: Option<u32>,
    by_consumer: HashMap<String, u32>,
    limited_providers: Vec<bool>,
}

impl InFlightLimits {
    /// The limit on `consumer`'s requests in flight: its own, else `default_max_in_flight`.
    pub fn consumer(&self, consumer: &str) -> Option<u32> {
        if self.by_consumer.is_empty() {
            return self.default;
        }
        self.by_consumer.get(consumer).copied().or(self.default)
    }

    /// Whether a key of the provider (by config index) has a limit.
    pub fn provider(&self, provider: usize) -> bool {
        self.limited_providers
            .get(provider)
            .copied()
            .unwrap_or(false)
    }

    /// Whether any limit is configured at all.
    pub fn any(&self) -> bool {
        self.default.is_some()
            || !self.by_consumer.is_empty()
            || self.limited_providers.contains(&true)
    }
}

pub(super) fn limits(
    default: Option<u32>,
    consumers: &Consumers,
    providers: &[Provider],
) -> InFlightLimits {
    let list: &[Consumer] = match consumers {
        Consumers::Anonymous => &[],
        Consumers::Keys(l) | Consumers::TrustedHeader { list: l, .. } => l,
    };
    InFlightLimits {
        default,
        by_consumer: list
            .iter()
            .filter_map(|c| Some((c.name.clone(), c.max_in_flight?)))
            .collect(),
        limited_providers: providers
            .iter()
            .map(|p| p.keys.iter().any(|k| k.max_in_flight.is_some()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::parse;

    fn parse_str(extra: &str, consumer: &str, key: &str) -> Result<crate::config::Config, String> {
        let json = format!(
            r#"{{"consumers":{{"list":[{{"name":"a","key_env":"K"{consumer}}},{{"name":"b","key_env":"K2"}}]}},
                "providers":[{{"name":"oa","type":"openai","keys":[{{"id":"k1","env":"K"{key}}},{{"id":"k2","env":"K"}}]}},
                             {{"name":"an","type":"anthropic","keys":[{{"id":"a1","env":"K"}}]}}]{extra}}}"#
        );
        parse(json.as_bytes(), &|v| Some(format!("secret-{v}"))).map_err(|e| e.to_string())
    }

    #[test]
    fn limits_apply_by_consumer_then_default_and_by_key() {
        let c = parse_str("", "", "").unwrap();
        assert!(!c.in_flight.any(), "nothing configured");
        assert_eq!(c.in_flight.consumer("a"), None);

        let c = parse_str(r#","default_max_in_flight":4"#, r#","max_in_flight":2"#, "").unwrap();
        assert_eq!(c.in_flight.consumer("a"), Some(2));
        assert_eq!(c.in_flight.consumer("b"), Some(4), "the default");
        assert_eq!(c.in_flight.consumer("anyone"), Some(4));
        assert!(!c.in_flight.provider(0));

        let c = parse_str("", "", r#","max_in_flight":3"#).unwrap();
        assert_eq!(c.in_flight.consumer("a"), None);
        assert!(c.in_flight.any());
        assert!(c.in_flight.provider(0) && !c.in_flight.provider(1));
        assert_eq!(c.providers[0].keys[0].max_in_flight, Some(3));
        assert_eq!(c.providers[0].keys[1].max_in_flight, None);
    }

    #[test]
    fn bad_limits_are_refused_with_the_field_named() {
        for (extra, consumer, key, want) in [
            (r#","default_max_in_flight":0"#, "", "", "default_max_in_flight: must be at least 1 (leave it out for no limit)"),
            ("", r#","max_in_flight":0"#, "", "consumers.list[0].max_in_flight: must be at least 1 (leave it out for no limit)"),
            ("", "", r#","max_in_flight":0"#, "providers[0].keys[0].max_in_flight: must be at least 1 (leave it out for no limit)"),
            ("", "", r#","max_in_flight":100001"#, "providers[0].keys[0].max_in_flight: must be at most 100000"),
            ("", r#","max_in_flight":-1"#, "", "consumers.list[0].max_in_flight: expected a non-negative integer"),
            ("", r#","max_in_flight":"8""#, "", "consumers.list[0].max_in_flight: expected a non-negative integer"),
            (r#","default_max_in_flight":2.5"#, "", "", "default_max_in_flight: expected a non-negative integer"),
            ("", "", r#","max_in_flight":true"#, "providers[0].keys[0].max_in_flight: expected a non-negative integer"),
        ] {
            assert_eq!(parse_str(extra, consumer, key).err().as_deref(), Some(want), "{extra}{consumer}{key}");
        }
        assert!(parse_str(r#","default_max_in_flight":100000"#, "", "").is_ok());
    }
}
