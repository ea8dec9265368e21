//! The cache key: a SHA-256 digest of everything that determines the answer.
//!
//! - the client's API path (query included: Azure names its deployment and API version there);
//! - `anthropic-beta`, which turns features on that change the answer;
//! - the body's top-level members, sorted by name, each value as the client wrote it, without
//!   `stream` and `stream_options`: where a member sits and whether the client streams do not
//!   matter, every model, message, tool and sampling parameter does;
//! - the consumer, unless the cache's scope is shared.
//!
//! Not the provider or the key that serves the request: any of them gives the same answer.
//! Each part is framed by its length, so no two different inputs hash the same bytes. SHA-256
//! (RustCrypto's `sha2`, already the consumer keys' digest) because a shared scope lets one
//! consumer's request fill the entry another consumer reads: the digest must resist a crafted
//! collision.
//!
//! Why not a fully canonical body (parsed into serde_json's `Value`, whose objects are sorted, and
//! written back): measured natively on a 16 KiB chat body (`cost_of_a_key` below, the fastest of
//! ten batches), this key took 16 µs (7 µs its scan, 9 µs SHA-256), the `Value` written back 22 µs
//! before its own SHA-256: twice the cost, for every cacheable request. What it would add is
//! nested key order and whitespace: two clients that write the same question with other spacing
//! inside a message miss each other's entries (one client, one SDK, writes it the same way every
//! time). That costs a miss, never a wrong answer.

use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use sha2::{Digest as _, Sha256};
use std::borrow::Cow;
use std::fmt;

pub type Digest = [u8; 32];

/// The parts of a request the key is made of.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The consumer; None in a shared scope.
    pub scope: Option<&'a str>,
    /// The client's `:path`.
    pub path: &'a str,
    /// The `anthropic-beta` header, "" when absent.
    pub beta: &'a str,
    /// The request body as the client sent it.
    pub body: &'a [u8],
}

/// Members that say how the answer is delivered, not what it is.
const DELIVERY: [&str; 2] = ["stream", "stream_options"];

/// The digest of `s`; None when the body is not a JSON object.
pub fn digest(s: &Subject<'_>) -> Option<Digest> {
    let mut members = top_level(s.body)?;
    // Stable: of a repeated name the last one stays last, and is the one kept (as serde_json's
    // `Value` and the providers' parsers keep it).
    members.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    h.update(b"tollgate.cache.1");
    let scope: &[u8] = match s.scope {
        Some(c) => {
            h.update([1u8]);
            c.as_bytes()
        }
        None => {
            h.update([0u8]);
            b""
        }
    };
    let mut framed = |part: &[u8]| {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    };
    framed(scope);
    framed(s.path.as_bytes());
    framed(s.beta.as_bytes());
    for (i, (name, value)) in members.iter().enumerate() {
        let repeated = members.get(i + 1).is_some_and(|next| next.0 == *name);
        if repeated || DELIVERY.contains(&name.as_ref()) {
            continue;
        }
        framed(name.as_bytes());
        framed(value.get().as_bytes());
    }
    Some(h.finalize().into())
}

type Members<'a> = Vec<(Cow<'a, str>, &'a RawValue)>;

/// Every top-level member of a JSON object, its value borrowed as written: one scan, no tree.
fn top_level(body: &[u8]) -> Option<Members<'_>> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let members = de.deserialize_map(AllMembers).ok()?;
    de.end().ok()?;
    Some(members)
}

struct AllMembers;

impl<'de> Visitor<'de> for AllMembers {
    type Value = Members<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(name) = map.next_key_seed(Name)? {
            out.push((name, map.next_value::<&'de RawValue>()?));
        }
        Ok(out)
    }
}

/// A member's name, borrowed unless it had escapes.
struct Name;

impl<'de> DeserializeSeed<'de> for Name {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Name {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a name")
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scope: Option<&str>, path: &str, body: &str) -> Option<Digest> {
        digest(&Subject {
            scope,
            path,
            beta: "",
            body: body.as_bytes(),
        })
    }

    const CHAT: &str = "/v1/chat/completions";

    #[test]
    fn the_same_question_streamed_or_not_in_any_member_order_has_one_key() {
        let plain = key(
            Some("a"),
            CHAT,
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert!(plain.is_some());
        for same in [
            r#" { "messages" : [{"role":"user","content":"hi"}],
                  "model": "m", "temperature" :0 } "#,
            r#"{"stream":true,"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#,
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}],"stream":false}"#,
            r#"{"model":"x","temperature":0,"messages":[{"role":"user","content":"hi"}],"model":"m"}"#,
            r#"{"\u006dodel":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
        ] {
            assert_eq!(key(Some("a"), CHAT, same), plain, "{same}");
        }
        // Inside a member the value counts as written: another writing is another key (a miss).
        let nested = r#"{"model":"m","temperature":0,"messages":[{"content":"hi","role":"user"}]}"#;
        assert_ne!(key(Some("a"), CHAT, nested), plain);
    }

    #[test]
    fn anything_that_changes_the_answer_changes_the_key() {
        let base = r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
        let k = key(Some("a"), CHAT, base);
        for (scope, path, body) in [
            (Some("b"), CHAT, base),
            (None, CHAT, base),
            (Some("a"), "/v1/messages", base),
            (
                Some("a"),
                CHAT,
                r#"{"model":"n","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
            ),
            (
                Some("a"),
                CHAT,
                r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi!"}]}"#,
            ),
            (
                Some("a"),
                CHAT,
                r#"{"model":"m","temperature":0,"max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
            ),
            (
                Some("a"),
                CHAT,
                r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}],"tools":[]}"#,
            ),
        ] {
            assert_ne!(key(scope, path, body), k, "{scope:?} {path} {body}");
        }
        let beta = digest(&Subject {
            scope: Some("a"),
            path: CHAT,
            beta: "output-128k",
            body: base.as_bytes(),
        });
        assert_ne!(beta, k);
        // Framing: a consumer name cannot run into the path.
        assert_ne!(key(Some("a/"), "v1", base), key(Some("a"), "/v1", base));
    }

    #[test]
    fn a_body_that_is_not_an_object_has_no_key() {
        for body in ["", "[]", "{", "\"x\"", "{\"a\":1} x"] {
            assert_eq!(key(Some("a"), CHAT, body), None, "{body}");
        }
    }

    /// `cargo test --release cost_of_a_key -- --ignored --nocapture`: what a key costs natively,
    /// against a fully canonical body (a `Value` written back).
    #[test]
    #[ignore]
    fn cost_of_a_key() {
        let msg = "lorem ipsum dolor sit amet \\u00e9 ".repeat(16 * 1024 / 34);
        let body = format!(
            r#"{{"model":"gpt-4o","temperature":0,"stream":true,"messages":[{{"role":"system","content":"be brief"}},{{"role":"user","content":"{msg}"}}]}}"#
        );
        let s = Subject {
            scope: Some("team-a"),
            path: CHAT,
            beta: "",
            body: body.as_bytes(),
        };
        // The fastest of 10 batches: the machine is shared, the least disturbed batch is the cost.
        let n = 500;
        let time = |f: &dyn Fn()| {
            (0..10)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..n {
                        f();
                    }
                    t.elapsed() / n
                })
                .min()
                .unwrap_or_default()
        };
        let key = time(&|| {
            std::hint::black_box(digest(&s));
        });
        let value = time(&|| {
            let v: serde_json::Value = serde_json::from_slice(body.as_bytes()).unwrap_or_default();
            std::hint::black_box(serde_json::to_vec(&v).ok());
        });
        let sha = time(&|| {
            std::hint::black_box(Sha256::digest(body.as_bytes()));
        });
        let scan = time(&|| {
            std::hint::black_box(top_level(body.as_bytes()));
        });
        println!(
            "{} B body: key {key:?} (its scan {scan:?}); a Value written back {value:?}; sha-256 alone {sha:?}",
            body.len()
        );
    }
}
