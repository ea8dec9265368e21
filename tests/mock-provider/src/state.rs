//! Shared state of one mock instance: scripted rules and the request log.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Token usage as the mock reports it (and logs it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

/// Per-field override of the computed usage; absent fields keep the computed value (0 for caches).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageOverride {
    pub input: Option<u64>,
    pub output: Option<u64>,
    pub cache_read: Option<u64>,
    pub cache_write: Option<u64>,
}

/// Unknown fields are rejected so a typo in a test script fails loudly instead of being ignored.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub key: Option<String>,
    pub path_contains: Option<String>,
    /// Matches requests whose body contains this text (a marker a test puts in a prompt).
    pub body_contains: Option<String>,
    pub times: Option<u64>,
    pub status: Option<u16>,
    #[serde(default)]
    pub headers: Map<String, Value>,
    pub body: Option<String>,
    #[serde(default)]
    pub delay_ms: u64,
    pub usage: Option<UsageOverride>,
    #[serde(default)]
    pub omit_usage: bool,
    pub words: Option<usize>,
    pub cut_after_chunks: Option<usize>,
    #[serde(default)]
    pub chunk_delay_ms: u64,
    /// Anthropic streams: `message_delta` carries no usage, so only `message_start`'s counts (input,
    /// a provisional output of 1) reach the client.
    #[serde(default)]
    pub omit_delta_usage: bool,
    /// The answer's text is "Echo:" and the words of the last user message, so a test can tell
    /// from an answer which request it answers.
    #[serde(default)]
    pub echo: bool,
    /// Header values are sent as Latin-1 (one byte per char up to U+00FF), so a test can make the
    /// mock send bytes that are not UTF-8 (`"\u00ff"` becomes the byte 0xFF).
    #[serde(default)]
    pub latin1_headers: bool,
    /// Close the connection without answering (after `delay_ms`): an upstream reset.
    #[serde(default)]
    pub reset: bool,
}

impl Rule {
    /// Header values may be given as JSON numbers (`"retry-after": 30`); they are sent as text.
    pub fn header_pairs(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.to_ascii_lowercase(), v)
            })
            .collect()
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(s) = self.status {
            if !(200..=599).contains(&s) {
                return Err(format!("status {s} out of range 200..=599"));
            }
        }
        for (k, v) in self.header_pairs() {
            let framing = ["content-length", "transfer-encoding", "connection"];
            if k.is_empty() || k.contains([':', '\r', '\n', ' ']) || v.contains(['\r', '\n']) {
                return Err(format!("invalid header {k:?}"));
            }
            if framing.contains(&k.as_str()) {
                return Err(format!("header {k} is managed by the mock"));
            }
            if self.latin1_headers && v.chars().any(|c| u32::from(c) > 0xFF) {
                return Err(format!(
                    "header {k}: latin1_headers allows U+0000..U+00FF only"
                ));
            }
        }
        Ok(())
    }

    fn matches(&self, key: Option<&str>, target: &str, body: &[u8]) -> bool {
        self.key.as_deref().is_none_or(|k| key == Some(k))
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| target.contains(p))
            && self
                .body_contains
                .as_deref()
                .is_none_or(|m| !m.is_empty() && body.windows(m.len()).any(|w| w == m.as_bytes()))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub seq: u64,
    pub method: String,
    pub path: String,
    pub headers: Map<String, Value>,
    pub body: String,
    pub key: Option<String>,
    pub status: u16,
    pub usage: Option<Usage>,
    pub stream: bool,
    pub chunked_request: bool,
    pub time_ms: u64,
}

/// Requests being answered right now, by key ("-" for none): counted from the moment a request is
/// read until its answer starts to go out, or its connection is gone, so that a gateway's limit on
/// requests in flight has an independent witness in the highest counts seen.
///
/// A gateway that gives up on a request (a timeout, its client gone) closes the connection, then
/// may send another request at once: before counting a request in, every other whose peer has
/// closed its connection is counted out, so that how fast the mock's threads notice never counts.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Concurrency {
    pub in_flight: BTreeMap<String, u64>,
    pub max_in_flight: BTreeMap<String, u64>,
    pub total: u64,
    pub max_total: u64,
    /// The requests counted in: id, key, and the connection each came on.
    #[serde(skip)]
    open: Vec<(u64, String, i32)>,
    #[serde(skip)]
    next_id: u64,
}

impl Concurrency {
    /// Counts a request on `key` in; `conn` is its connection, and `gone` tells whether the peer
    /// closed a connection. Returns the id to count it out with.
    pub fn enter(&mut self, key: &str, conn: i32, gone: &dyn Fn(i32) -> bool) -> u64 {
        let closed: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, _, c)| gone(*c))
            .map(|(id, _, _)| *id)
            .collect();
        for id in closed {
            self.leave(id);
        }
        self.next_id += 1;
        self.open.push((self.next_id, key.to_string(), conn));
        let n = self.in_flight.entry(key.to_string()).or_default();
        *n += 1;
        let n = *n;
        let max = self.max_in_flight.entry(key.to_string()).or_default();
        *max = (*max).max(n);
        self.total += 1;
        self.max_total = self.max_total.max(self.total);
        self.next_id
    }

    /// Counts a request out (once: an id already out is ignored).
    pub fn leave(&mut self, id: u64) {
        let Some(at) = self.open.iter().position(|(i, _, _)| *i == id) else {
            return;
        };
        let (_, key, _) = self.open.swap_remove(at);
        if let Some(n) = self.in_flight.get_mut(&key) {
            *n = n.saturating_sub(1);
        }
        self.total = self.total.saturating_sub(1);
    }

    /// The highest counts start again from the requests in flight now.
    fn restart(&mut self) {
        self.max_in_flight = self.in_flight.clone();
        self.max_total = self.total;
    }
}

#[derive(Debug, Default)]
pub struct State {
    rules: Vec<(Rule, u64)>,
    pub log: Vec<Entry>,
    seq: u64,
    pub concurrency: Concurrency,
    pub limits: crate::limits::Limits,
}

impl State {
    pub fn next_seq(&mut self) -> u64 {
        self.seq = self.seq.saturating_add(1);
        self.seq
    }

    /// Appends rules after validating all of them (all or nothing); returns the rule count.
    pub fn add_rules(&mut self, body: &[u8]) -> Result<usize, String> {
        let script: Script =
            serde_json::from_slice(body).map_err(|e| format!("bad script: {e}"))?;
        script.rules.iter().try_for_each(Rule::validate)?;
        self.rules.extend(script.rules.into_iter().map(|r| (r, 0)));
        Ok(self.rules.len())
    }

    /// First rule that matches and still has uses left; consumes one use.
    pub fn take_rule(&mut self, key: Option<&str>, target: &str, body: &[u8]) -> Option<Rule> {
        let (rule, used) = self
            .rules
            .iter_mut()
            .find(|(r, used)| r.times.is_none_or(|t| *used < t) && r.matches(key, target, body))?;
        *used = used.saturating_add(1);
        Some(rule.clone())
    }

    /// Clears the rules and the log; requests still being answered keep counting.
    pub fn reset(&mut self) {
        let mut concurrency = core::mem::take(&mut self.concurrency);
        concurrency.restart();
        *self = State {
            concurrency,
            ..State::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_apply_in_order_until_used_up() {
        let mut s = State::default();
        let n = s
            .add_rules(
                br#"{"rules":[{"key":"sk-a1","times":1,"status":429,"headers":{"retry-after":30}},
                              {"path_contains":"/v1/messages","status":529},
                              {"status":200,"words":2,"times":2}]}"#,
            )
            .unwrap();
        assert_eq!(n, 3);
        let first = s
            .take_rule(Some("sk-a1"), "/v1/chat/completions", b"")
            .unwrap();
        assert_eq!(first.status, Some(429));
        assert_eq!(
            first.header_pairs(),
            vec![("retry-after".to_string(), "30".to_string())]
        );
        // times=1 is used up: the same key falls through to the catch-all rule.
        assert_eq!(
            s.take_rule(Some("sk-a1"), "/v1/chat/completions", b"")
                .unwrap()
                .words,
            Some(2)
        );
        assert_eq!(
            s.take_rule(None, "/v1/messages", b"").unwrap().status,
            Some(529)
        );
        assert_eq!(s.take_rule(Some("sk-b"), "/x", b"").unwrap().words, Some(2));
        assert!(
            s.take_rule(Some("sk-b"), "/x", b"").is_none(),
            "catch-all had times=2"
        );
        s.reset();
        assert!(s.take_rule(Some("sk-a1"), "/v1/messages", b"").is_none());
        s.add_rules(br#"{"rules":[{"body_contains":"please-reset","reset":true}]}"#)
            .unwrap();
        assert!(s.take_rule(None, "/x", b"hi").is_none());
        assert!(
            s.take_rule(None, "/x", b"{\"c\":\"please-reset\"}")
                .unwrap()
                .reset
        );
        assert_eq!(s.next_seq(), 1);
    }

    #[test]
    fn bad_scripts_are_rejected_whole() {
        let mut s = State::default();
        assert!(s
            .add_rules(br#"{"rules":[{"stauts":429}]}"#)
            .unwrap_err()
            .contains("unknown field"));
        assert!(s
            .add_rules(br#"{"rules":[{"status":200},{"status":99}]}"#)
            .unwrap_err()
            .contains("99"));
        assert!(s
            .add_rules(br#"{"rules":[{"headers":{"content-length":"1"}}]}"#)
            .is_err());
        assert!(s
            .add_rules(br#"{"rules":[{"headers":{"x":"a\r\nb: c"}}]}"#)
            .is_err());
        assert!(s.add_rules(b"not json").is_err());
        assert!(s
            .add_rules(r#"{"rules":[{"latin1_headers":true,"headers":{"x":"\u2603"}}]}"#.as_bytes())
            .unwrap_err()
            .contains("latin1_headers"));
        assert!(s.take_rule(None, "/", b"").is_none(), "nothing was added");
    }

    #[test]
    fn concurrency_keeps_the_highest_counts_per_key_and_across_a_reset() {
        let mut s = State::default();
        let open = |_: i32| false;
        let ids: Vec<u64> = ["a", "a", "b", "a"]
            .iter()
            .map(|k| s.concurrency.enter(k, 3, &open))
            .collect();
        s.concurrency.leave(ids[0]);
        s.concurrency.leave(ids[0]);
        let b2 = s.concurrency.enter("b", 3, &open);
        let c = &s.concurrency;
        assert_eq!((c.max_in_flight["a"], c.max_in_flight["b"]), (3, 2));
        assert_eq!((c.in_flight["a"], c.total, c.max_total), (2, 4, 4));
        s.reset();
        let c = &s.concurrency;
        assert_eq!((c.max_in_flight["a"], c.total, c.max_total), (2, 4, 4));
        // Connection 7 was closed by its peer: its request is out before the next one counts.
        let on_7 = s.concurrency.enter("a", 7, &open);
        s.concurrency.enter("c", 8, &|conn| conn == 7);
        assert_eq!((s.concurrency.in_flight["a"], s.concurrency.total), (2, 5));
        s.concurrency.leave(on_7);
        for id in [ids[1], ids[2], ids[3], b2] {
            s.concurrency.leave(id);
        }
        assert_eq!(s.concurrency.total, 1, "c's");
    }
}
