//! OpenAI chat completions <-> Anthropic messages translation: requests, responses, streams and
//! error bodies, through serde types of each API's shapes ([`shapes`]) that borrow from the body.
//! Not the hot path: it runs only when a request fails over to the other provider family.
//!
//! The rule is "no silent drops": a request field that would change what the client gets back and
//! has no equivalent on the other side is a [`TranslateError`] naming the field. The fields that are
//! dropped on purpose are listed on [`chat_request_to_messages`] and [`messages_request_to_chat`].
//! Usage in a translated answer is what the provider reported, nothing more (token accounting reads
//! the provider's own answer before translation).

mod error;
mod request;
mod response;
mod shapes;
mod stream;

pub use error::{chat_error_to_messages, messages_error_to_chat};
pub use request::{chat_request_to_messages, messages_request_to_chat};
pub use response::{
    chat_response_to_messages, messages_response_to_chat, messages_response_to_chat_at,
};
pub use stream::{ChatToMessagesStream, MessagesToChatStream};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use shapes::{ChatUsageIn, ChatUsageOut, Input, PromptDetailsOut, UsageIn, UsageOut};

#[derive(Debug, Clone, PartialEq)]
pub struct TranslateError {
    /// JSON path of the offending field, e.g. `messages[2].content[0]`; "" for the whole body.
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for TranslateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

impl std::error::Error for TranslateError {}

pub(crate) fn err(field: impl Into<String>, reason: impl Into<String>) -> TranslateError {
    TranslateError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Reads a body that must be a JSON object as `T`. A type error names its field path
/// (serde_path_to_error); a member the request type does not name is refused with `unknown`, the
/// reason for the caller's API ("this field has no Anthropic equivalent").
pub(crate) fn parse_body<'a, T: Deserialize<'a>>(
    body: &'a [u8],
    unknown: &str,
) -> Result<T, TranslateError> {
    // serde reads a struct from an array too; the APIs only know objects.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Err(e) => err("", e.to_string()),
                Ok(_) => err("", "the body must be a JSON object"),
            },
        );
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let path = if path == "." { String::new() } else { path };
                // deny_unknown_fields' message lists every known member: say what matters instead.
                if inner.to_string().starts_with("unknown field") {
                    err(path, unknown)
                } else {
                    err(path, inner.to_string())
                }
            }
            // Not JSON: there is no field to name.
            _ => err("", inner.to_string()),
        }
    })?;
    de.end().map_err(|e| err("", e.to_string()))?;
    Ok(v)
}

/// Serializes a translated body. Cannot fail for these shapes (all map keys are strings).
pub(crate) fn to_body<T: Serialize>(v: &T) -> Result<Vec<u8>, TranslateError> {
    serde_json::to_vec(v).map_err(|e| err("", e.to_string()))
}

/// `chatcmpl-` + Anthropic id; the reverse of [`message_id`].
pub(crate) fn chat_id(anthropic_id: &str) -> String {
    format!("chatcmpl-{anthropic_id}")
}

/// `msg_` + the OpenAI id without its `chatcmpl-` prefix; an id that went through [`chat_id`]
/// comes back unchanged.
pub(crate) fn message_id(openai_id: &str) -> String {
    let rest = openai_id.strip_prefix("chatcmpl-").unwrap_or(openai_id);
    if rest.starts_with("msg_") {
        rest.to_string()
    } else {
        format!("msg_{rest}")
    }
}

/// Anthropic usage -> OpenAI usage. Anthropic's `input_tokens` excludes cached tokens; OpenAI's
/// `prompt_tokens` includes them.
pub(crate) fn chat_usage(u: &UsageIn) -> ChatUsageOut {
    let cache_read = u.cache_read_input_tokens.n();
    let prompt = u
        .input_tokens
        .n()
        .saturating_add(u.cache_creation_input_tokens.n())
        .saturating_add(cache_read);
    let completion = u.output_tokens.n();
    ChatUsageOut {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt.saturating_add(completion),
        prompt_tokens_details: PromptDetailsOut {
            cached_tokens: cache_read,
        },
    }
}

/// OpenAI usage -> Anthropic usage (cached tokens move out of `input_tokens`). Anthropic's shapes
/// require usage: none reported is all zeros.
pub(crate) fn messages_usage(u: Option<&ChatUsageIn>) -> UsageOut {
    let u = u.copied().unwrap_or_default();
    let cached = u
        .prompt_tokens_details
        .0
        .unwrap_or_default()
        .cached_tokens
        .n();
    UsageOut {
        input_tokens: u.prompt_tokens.n().saturating_sub(cached),
        output_tokens: u.completion_tokens.n(),
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: cached,
    }
}

/// Anthropic stop_reason -> OpenAI finish_reason.
pub(crate) fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and anything new end the turn normally.
        _ => "stop",
    }
}

/// OpenAI finish_reason -> Anthropic stop_reason.
pub(crate) fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// An OpenAI tool call's `function.arguments` (a JSON string) as the JSON object Anthropic's
/// `tool_use.input` wants, kept as the model wrote it; empty arguments are `{}`. `path` names the
/// tool call in errors.
pub(crate) fn tool_call_input(
    arguments: Option<&str>,
    path: &str,
) -> Result<Input, TranslateError> {
    let args = arguments.unwrap_or_default();
    if args.trim().is_empty() {
        return Ok(Input::Empty);
    }
    let field = format!("{path}.function.arguments");
    match serde_json::from_str::<Box<RawValue>>(args) {
        Ok(v) if v.get().starts_with('{') => Ok(Input::Owned(v)),
        Ok(_) => Err(err(field, "must encode a JSON object")),
        Err(e) => Err(err(field, format!("invalid JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn display() {
        let e = err(
            "messages[2].content[0]",
            "audio input cannot be sent to an Anthropic provider",
        );
        assert_eq!(
            e.to_string(),
            "messages[2].content[0]: audio input cannot be sent to an Anthropic provider"
        );
        assert_eq!(
            err("", "EOF while parsing").to_string(),
            "EOF while parsing"
        );
    }

    #[test]
    fn ids_round_trip() {
        assert_eq!(chat_id("msg_01XFD"), "chatcmpl-msg_01XFD");
        assert_eq!(message_id("chatcmpl-msg_01XFD"), "msg_01XFD");
        assert_eq!(
            message_id("chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT"),
            "msg_B9MBs8CjcvOU2jLn4n570S5qMJKcT"
        );
        assert_eq!(message_id("abc"), "msg_abc");
    }

    fn usage_in<T: serde::de::DeserializeOwned + Default>(v: Value) -> T {
        serde_json::from_str(&v.to_string()).unwrap_or_default()
    }

    #[test]
    fn usage_both_ways() {
        let a = json!({"input_tokens": 10, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 300, "output_tokens": 7});
        let o = serde_json::to_value(chat_usage(&usage_in(a))).unwrap_or_default();
        assert_eq!(
            o,
            json!({"prompt_tokens": 330, "completion_tokens": 7, "total_tokens": 337, "prompt_tokens_details": {"cached_tokens": 300}})
        );
        assert_eq!(
            serde_json::to_value(messages_usage(Some(&usage_in(o)))).unwrap_or_default(),
            json!({"input_tokens": 30, "output_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 300})
        );
        // Hostile numbers neither overflow nor underflow.
        let o = chat_usage(&usage_in(
            json!({"input_tokens": u64::MAX, "cache_read_input_tokens": 5, "output_tokens": u64::MAX}),
        ));
        assert_eq!(o.total_tokens, u64::MAX);
        let a = messages_usage(Some(&usage_in(
            json!({"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": 9}, "completion_tokens": -3}),
        )));
        assert_eq!(a.input_tokens, 0);
        assert_eq!(a.output_tokens, 0);
        assert_eq!(messages_usage(None).input_tokens, 0);
    }

    #[test]
    fn reasons_table() {
        for (a, o) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
        ] {
            assert_eq!(finish_reason(a), o, "{a}");
        }
        for (o, a) in [
            ("stop", "end_turn"),
            ("length", "max_tokens"),
            ("tool_calls", "tool_use"),
            ("function_call", "tool_use"),
            ("content_filter", "refusal"),
        ] {
            assert_eq!(stop_reason(o), a, "{o}");
        }
    }

    /// An OpenAI client with tools talks to an Anthropic provider for a whole tool-call turn.
    #[test]
    fn tool_call_round_trip() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
        let req = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": tools, "tool_choice": "auto"});
        let sent: Value = serde_json::from_slice(
            &chat_request_to_messages(req.to_string().as_bytes(), "claude-sonnet-4-5", 1024)
                .unwrap_or_default(),
        )
        .unwrap_or_default();
        assert_eq!(
            sent["tools"],
            json!([{"name": "get_weather", "description": "Weather by city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}])
        );
        assert_eq!(sent["tool_choice"], json!({"type": "auto"}));
        assert_eq!(sent["max_tokens"], 1024);

        let provider = json!({"id": "msg_01Oslo", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "Looking it up."}, {"type": "tool_use", "id": "toolu_01Oslo", "name": "get_weather", "input": {"city": "Oslo"}}],
            "stop_reason": "tool_use", "stop_sequence": null, "usage": {"input_tokens": 300, "output_tokens": 40}});
        let answer: Value = serde_json::from_slice(
            &messages_response_to_chat_at(provider.to_string().as_bytes(), "gpt-4o", 9)
                .unwrap_or_default(),
        )
        .unwrap_or_default();
        let msg = &answer["choices"][0]["message"];
        assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(msg["content"], "Looking it up.");
        let call = &msg["tool_calls"][0];
        assert_eq!(
            (&call["id"], &call["function"]["name"]),
            (&json!("toolu_01Oslo"), &json!("get_weather"))
        );
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(args, json!({"city": "Oslo"}));

        // The client sends the result back with the assistant message exactly as it received it.
        let follow = json!({"model": "gpt-4o", "tools": tools, "messages": [
            {"role": "user", "content": "Weather in Oslo?"}, msg.clone(),
            {"role": "tool", "tool_call_id": call["id"].clone(), "content": "-3C, snow"}]});
        let sent: Value = serde_json::from_slice(
            &chat_request_to_messages(follow.to_string().as_bytes(), "claude-sonnet-4-5", 1024)
                .unwrap_or_default(),
        )
        .unwrap_or_default();
        assert_eq!(
            sent["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Looking it up."}, {"type": "tool_use", "id": "toolu_01Oslo", "name": "get_weather", "input": {"city": "Oslo"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01Oslo", "content": "-3C, snow"}]}
            ])
        );
    }
}
