//! A provider's rate limits per key (`POST /_mock/limits`): each key may make
//! `requests_per_minute` requests (and spend `tokens_per_minute` tokens, as answered) in a window of
//! one minute from its first request; past either, the answer is 429. With `announce` (the
//! default), every answer says what the key has left in the provider's own headers: OpenAI's
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (reset as a duration), Anthropic's
//! `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` (reset as an RFC 3339 time).
//! `GET /_mock/limits` says how many requests were admitted and refused.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const WINDOW_MS: u64 = 60_000;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    #[serde(default = "yes")]
    pub announce: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Window {
    start_ms: u64,
    requests: u64,
    tokens: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Limits {
    config: Option<Config>,
    windows: BTreeMap<String, Window>,
    /// Requests the limits let through, and those answered 429 for them.
    pub admitted: u64,
    pub refused: u64,
}

impl Limits {
    pub fn set(&mut self, body: &[u8]) -> Result<(), String> {
        let c: Config = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        *self = Limits {
            config: Some(c),
            ..Limits::default()
        };
        Ok(())
    }

    fn window(&mut self, key: &str, now_ms: u64) -> &mut Window {
        let w = self.windows.entry(key.to_string()).or_default();
        if w.requests == 0 || w.start_ms + WINDOW_MS <= now_ms {
            *w = Window {
                start_ms: now_ms,
                ..Window::default()
            };
        }
        w
    }

    /// Counts a request on `key` in, or says how long until it could be (ms) when it is over.
    pub fn admit(&mut self, key: &str, now_ms: u64) -> Result<(), u64> {
        let Some(c) = self.config.clone() else {
            return Ok(());
        };
        let w = self.window(key, now_ms);
        let over = c.requests_per_minute.is_some_and(|n| w.requests >= n)
            || c.tokens_per_minute.is_some_and(|n| w.tokens >= n);
        if over {
            let wait = (w.start_ms + WINDOW_MS).saturating_sub(now_ms);
            self.refused += 1;
            return Err(wait);
        }
        w.requests += 1;
        self.admitted += 1;
        Ok(())
    }

    /// The tokens an answer told of, spent from the key's window.
    pub fn charge(&mut self, key: &str, tokens: u64) {
        if let Some(w) = self.windows.get_mut(key) {
            w.tokens += tokens;
        }
    }

    /// What the key has left, in the provider's headers (none unless `announce`).
    pub fn announce(&self, key: &str, now_ms: u64, anthropic: bool) -> Vec<(String, String)> {
        let Some(c) = self.config.as_ref().filter(|c| c.announce) else {
            return Vec::new();
        };
        let w = self.windows.get(key).copied().unwrap_or(Window {
            start_ms: now_ms,
            ..Window::default()
        });
        let reset_ms = (w.start_ms + WINDOW_MS).saturating_sub(now_ms);
        let mut out = Vec::new();
        for (what, limit, used) in [
            ("requests", c.requests_per_minute, w.requests),
            ("tokens", c.tokens_per_minute, w.tokens),
        ] {
            let Some(limit) = limit else { continue };
            let left = limit.saturating_sub(used).to_string();
            if anthropic {
                let at = rfc3339(now_ms + reset_ms);
                out.push((
                    format!("anthropic-ratelimit-{what}-limit"),
                    limit.to_string(),
                ));
                out.push((format!("anthropic-ratelimit-{what}-remaining"), left));
                out.push((format!("anthropic-ratelimit-{what}-reset"), at));
            } else {
                out.push((format!("x-ratelimit-limit-{what}"), limit.to_string()));
                out.push((format!("x-ratelimit-remaining-{what}"), left));
                out.push((format!("x-ratelimit-reset-{what}"), format!("{reset_ms}ms")));
            }
        }
        out
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ`, rounded up to the second (a reset is never told early). Days to a civil
/// date as in Howard Hinnant's `civil_from_days`.
fn rfc3339(ms: u64) -> String {
    let secs = ms.div_ceil(1000);
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_refused_past_its_requests_and_announces_what_it_has_left() {
        let mut l = Limits::default();
        assert_eq!(l.admit("k", 0), Ok(()), "no limits: everything passes");
        l.set(br#"{"requests_per_minute":2}"#).unwrap();
        assert_eq!(l.admit("k", 1_000), Ok(()));
        assert!(l
            .announce("k", 1_000, false)
            .contains(&("x-ratelimit-remaining-requests".into(), "1".into())));
        assert_eq!(l.admit("k", 2_000), Ok(()));
        assert_eq!(l.admit("k", 3_000), Err(58_000));
        assert_eq!(l.admit("other", 3_000), Ok(()), "per key");
        assert_eq!(l.admit("k", 61_000), Ok(()), "a new window");
        assert_eq!((l.admitted, l.refused), (4, 1));
        let a = l.announce("k", 61_000, true);
        assert!(a.contains(&(
            "anthropic-ratelimit-requests-reset".into(),
            "1970-01-01T00:02:01Z".into()
        )));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_001), "2023-11-14T22:13:21Z");
    }
}
