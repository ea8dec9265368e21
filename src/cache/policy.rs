//! What may be reused: which requests are looked up and stored, and which answers are kept.
//!
//! - A request is cacheable when it is deterministic by its own parameters (`temperature` 0, or a
//!   `seed`), or when the client asks with `x-tollgate-cache: on`.
//! - `Cache-Control: no-cache` skips the lookup (the answer is fetched afresh, and stored);
//!   `no-store` skips the store.
//! - Only a complete answer that ended for a normal reason is stored: never an error, a refusal, a
//!   content-filtered answer, and an answer cut by its length limit only when configured.

use crate::api::errors::ClientApi;
use crate::api::splice;
use serde::Deserialize;
use serde_json::value::RawValue;

/// What the client asked of the cache in its request headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Asked {
    /// `x-tollgate-cache: on`: cache this request whatever its parameters.
    pub opt_in: bool,
    /// `Cache-Control: no-cache`: do not answer from the cache.
    pub no_cache: bool,
    /// `Cache-Control: no-store`: do not store the answer.
    pub no_store: bool,
}

impl Asked {
    /// Reads the `x-tollgate-cache` value and every `cache-control` value.
    pub fn read<'a>(opt_in: Option<&[u8]>, cache_control: impl Iterator<Item = &'a [u8]>) -> Self {
        let mut asked = Asked {
            opt_in: opt_in.is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"on")),
            ..Asked::default()
        };
        for value in cache_control {
            for directive in value.split(|&b| b == b',') {
                // `no-cache="field"` names response fields; on a request any form means no-cache.
                let name = directive.split(|&b| b == b'=').next().unwrap_or_default();
                let name = name.trim_ascii();
                asked.no_cache |= name.eq_ignore_ascii_case(b"no-cache");
                asked.no_store |= name.eq_ignore_ascii_case(b"no-store");
            }
        }
        asked
    }
}

/// `temperature` 0, or a `seed` given: the parameters ask for the same answer every time. A body
/// that cannot be read is not.
pub fn deterministic(body: &[u8]) -> bool {
    let Ok([temperature, seed]) = splice::member_values(body, ["temperature", "seed"]) else {
        return false;
    };
    let zero = temperature
        .and_then(|t| serde_json::from_str::<f64>(t.get()).ok())
        .is_some_and(|t| t == 0.0);
    zero || seed.is_some_and(|s| s.get() != "null")
}

/// Why an answer is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    /// Not an answer of the API's shape (an error body, garbage).
    NotAnAnswer,
    Refusal,
    ContentFilter,
    /// Cut by its token limit (`finish_reason: length`, `stop_reason: max_tokens`).
    Length,
    /// Any other ending (`pause_turn`, a reason added later): not known to be complete.
    Unfinished,
}

impl NotStored {
    pub fn as_str(self) -> &'static str {
        match self {
            NotStored::NotAnAnswer => "not_an_answer",
            NotStored::Refusal => "refusal",
            NotStored::ContentFilter => "content_filter",
            NotStored::Length => "length",
            NotStored::Unfinished => "unfinished",
        }
    }
}

#[derive(Deserialize)]
struct ChatAnswer<'a> {
    #[serde(borrow)]
    object: Option<&'a str>,
    choices: Option<Vec<ChatChoice<'a>>>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChatChoice<'a> {
    #[serde(borrow)]
    finish_reason: Option<&'a str>,
    message: Option<ChatMessage>,
}

#[derive(Deserialize)]
struct ChatMessage {
    refusal: Option<String>,
}

#[derive(Deserialize)]
struct MessagesAnswer<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<&'a str>,
    #[serde(borrow)]
    stop_reason: Option<&'a str>,
}

/// Whether a complete 200 answer, in the client's dialect, may be stored.
pub fn storable(client: ClientApi, json: &[u8], store_length: bool) -> Result<(), NotStored> {
    match client {
        ClientApi::OpenAi => {
            let a: ChatAnswer = serde_json::from_slice(json).map_err(|_| NotStored::NotAnAnswer)?;
            if a.error.is_some() || a.object != Some("chat.completion") {
                return Err(NotStored::NotAnAnswer);
            }
            let choices = a.choices.unwrap_or_default();
            if choices.is_empty() {
                return Err(NotStored::NotAnAnswer);
            }
            for c in choices {
                if c.message
                    .and_then(|m| m.refusal)
                    .is_some_and(|r| !r.is_empty())
                {
                    return Err(NotStored::Refusal);
                }
                match c.finish_reason {
                    Some("stop" | "tool_calls" | "function_call") => {}
                    Some("length") if store_length => {}
                    Some("length") => return Err(NotStored::Length),
                    Some("content_filter") => return Err(NotStored::ContentFilter),
                    _ => return Err(NotStored::Unfinished),
                }
            }
            Ok(())
        }
        ClientApi::Anthropic => {
            let a: MessagesAnswer =
                serde_json::from_slice(json).map_err(|_| NotStored::NotAnAnswer)?;
            if a.kind != Some("message") {
                return Err(NotStored::NotAnAnswer);
            }
            match a.stop_reason {
                Some("end_turn" | "stop_sequence" | "tool_use") => Ok(()),
                Some("max_tokens") if store_length => Ok(()),
                Some("max_tokens") => Err(NotStored::Length),
                Some("refusal") => Err(NotStored::Refusal),
                _ => Err(NotStored::Unfinished),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_say_what_the_client_asks() {
        let none: [&[u8]; 0] = [];
        assert_eq!(Asked::read(None, none.into_iter()), Asked::default());
        let a = Asked::read(
            Some(b" On "),
            [&b"max-age=0, No-Cache"[..], b"no-store"].into_iter(),
        );
        assert_eq!(
            a,
            Asked {
                opt_in: true,
                no_cache: true,
                no_store: true
            }
        );
        let a = Asked::read(Some(b"off"), [&b"no-cache=\"x\""[..]].into_iter());
        assert!(!a.opt_in && a.no_cache && !a.no_store);
        let a = Asked::read(None, [&b"no-storex, private"[..]].into_iter());
        assert_eq!(a, Asked::default());
    }

    #[test]
    fn deterministic_by_temperature_zero_or_a_seed() {
        for yes in [
            r#"{"temperature":0,"messages":[]}"#,
            r#"{"temperature":0.0}"#,
            r#"{"temperature":0e0}"#,
            r#"{"seed":7,"temperature":1}"#,
            r#"{"seed":-1}"#,
        ] {
            assert!(deterministic(yes.as_bytes()), "{yes}");
        }
        for no in [
            r#"{"messages":[]}"#,
            r#"{"temperature":0.1}"#,
            r#"{"temperature":"0"}"#,
            r#"{"seed":null}"#,
            r#"{"nested":{"temperature":0}}"#,
            "not json",
            "[]",
        ] {
            assert!(!deterministic(no.as_bytes()), "{no}");
        }
    }

    fn chat(finish: &str, refusal: &str) -> String {
        format!(
            r#"{{"id":"x","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"a","refusal":{refusal}}},"finish_reason":{finish}}}]}}"#
        )
    }

    #[test]
    fn only_answers_that_ended_normally_are_stored() {
        let ok = |client, json: &str, length| storable(client, json.as_bytes(), length);
        use ClientApi::{Anthropic, OpenAi};
        assert_eq!(ok(OpenAi, &chat("\"stop\"", "null"), false), Ok(()));
        assert_eq!(ok(OpenAi, &chat("\"tool_calls\"", "null"), false), Ok(()));
        assert_eq!(
            ok(OpenAi, &chat("\"length\"", "null"), false),
            Err(NotStored::Length)
        );
        assert_eq!(ok(OpenAi, &chat("\"length\"", "null"), true), Ok(()));
        assert_eq!(
            ok(OpenAi, &chat("\"content_filter\"", "null"), true),
            Err(NotStored::ContentFilter)
        );
        assert_eq!(
            ok(OpenAi, &chat("\"stop\"", "\"I can't\""), true),
            Err(NotStored::Refusal)
        );
        assert_eq!(
            ok(OpenAi, &chat("null", "null"), true),
            Err(NotStored::Unfinished)
        );
        for bad in [
            r#"{"error":{"message":"x"}}"#,
            r#"{"object":"chat.completion","choices":[]}"#,
            r#"{"object":"list","data":[]}"#,
            "garbage",
        ] {
            assert_eq!(ok(OpenAi, bad, true), Err(NotStored::NotAnAnswer), "{bad}");
        }
        let msg = |stop: &str| format!(r#"{{"type":"message","stop_reason":{stop},"content":[]}}"#);
        assert_eq!(ok(Anthropic, &msg("\"end_turn\""), false), Ok(()));
        assert_eq!(ok(Anthropic, &msg("\"tool_use\""), false), Ok(()));
        assert_eq!(
            ok(Anthropic, &msg("\"max_tokens\""), false),
            Err(NotStored::Length)
        );
        assert_eq!(ok(Anthropic, &msg("\"max_tokens\""), true), Ok(()));
        assert_eq!(
            ok(Anthropic, &msg("\"refusal\""), true),
            Err(NotStored::Refusal)
        );
        assert_eq!(
            ok(Anthropic, &msg("\"pause_turn\""), true),
            Err(NotStored::Unfinished)
        );
        assert_eq!(
            ok(
                Anthropic,
                r#"{"type":"error","error":{"type":"api_error"}}"#,
                true
            ),
            Err(NotStored::NotAnAnswer)
        );
    }
}
