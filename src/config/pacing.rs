//! Pacing keys and spreading `Retry-After`: `providers[].keys[].requests_per_minute` /
//! `tokens_per_minute` (a key's published limits, counted by [`crate::failover::pace`]) and
//! `retry_after_spread` (how far past the true recovery the `Retry-After` of refused clients is
//! spread, [`crate::limit::spread`]).

use super::{err, Provider, Res};

/// The default `retry_after_spread`: refused clients come back over the half of the wait that
/// follows the true recovery.
pub const DEFAULT_SPREAD: f64 = 0.5;

/// What pacing needs to know of the configuration on every request, derived once at parse.
#[derive(Debug, Clone, Default)]
pub struct Pacing {
    /// Per provider (config order): one of its keys has configured limits, so its entry is read
    /// whatever the provider announces.
    configured: Vec<bool>,
    /// `retry_after_spread`: a fraction of the wait until recovery (0: no spread).
    pub spread: f64,
}

impl Pacing {
    pub fn configured(&self, provider: usize) -> bool {
        self.configured.get(provider).copied().unwrap_or(false)
    }
}

/// A key's `requests_per_minute` / `tokens_per_minute` at `path`: absent means none; 0 is an error.
pub(super) fn per_minute(path: &str, raw: Option<u64>) -> Res<Option<u64>> {
    match raw {
        Some(0) => Err(err(path, "must be positive (leave it out for no limit)")),
        other => Ok(other),
    }
}

pub(super) fn pacing(providers: &[Provider], spread: Option<f64>) -> Res<Pacing> {
    let spread = spread.unwrap_or(DEFAULT_SPREAD);
    if !(0.0..=1.0).contains(&spread) {
        return Err(err(
            "retry_after_spread",
            "must be between 0 and 1 (a fraction of the wait until recovery)",
        ));
    }
    Ok(Pacing {
        configured: providers
            .iter()
            .map(|p| {
                p.keys
                    .iter()
                    .any(|k| k.requests_per_minute.is_some() || k.tokens_per_minute.is_some())
            })
            .collect(),
        spread,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::parse;

    fn parse_str(top: &str, key: &str) -> Result<crate::config::Config, String> {
        let json = format!(
            r#"{{"providers":[{{"name":"oa","type":"openai","keys":[{{"id":"k1","env":"K"{key}}},{{"id":"k2","env":"K"}}]}},
                             {{"name":"an","type":"anthropic","keys":[{{"id":"a1","env":"K"}}]}}]{top}}}"#
        );
        parse(json.as_bytes(), &|v| Some(format!("secret-{v}"))).map_err(|e| e.to_string())
    }

    #[test]
    fn key_limits_mark_their_provider_and_bad_values_name_the_field() {
        let c = parse_str("", r#","requests_per_minute":60,"tokens_per_minute":90000"#).unwrap();
        assert_eq!(c.providers[0].keys[0].requests_per_minute, Some(60));
        assert_eq!(c.providers[0].keys[0].tokens_per_minute, Some(90_000));
        assert!(c.pacing.configured(0));
        assert!(!c.pacing.configured(1));
        assert_eq!(c.pacing.spread, super::DEFAULT_SPREAD);
        assert_eq!(
            parse_str("", r#","requests_per_minute":0"#).unwrap_err(),
            "providers[0].keys[0].requests_per_minute: must be positive (leave it out for no limit)"
        );
        assert_eq!(
            parse_str(r#","retry_after_spread":1.5"#, "").unwrap_err(),
            "retry_after_spread: must be between 0 and 1 (a fraction of the wait until recovery)"
        );
        assert_eq!(
            parse_str(r#","retry_after_spread":0"#, "")
                .unwrap()
                .pacing
                .spread,
            0.0
        );
    }
}
