//! OpenAI chat completions <-> Anthropic messages translation: requests, responses, streams and
//! error bodies. Pure functions over `crate::json::Value` (this is not the hot path).
//!
//! The rule is "no silent drops": a request field that would change what the client gets back and
//! has no equivalent on the other side is a [`TranslateError`] naming the field. The fields that are
//! dropped on purpose are listed on [`chat_request_to_messages`] and [`messages_request_to_chat`].

mod error;
mod request;
mod response;
mod stream;

pub use error::{chat_error_to_messages, messages_error_to_chat};
pub use request::{chat_request_to_messages, messages_request_to_chat};
pub use response::{
    chat_response_to_messages, messages_response_to_chat, messages_response_to_chat_at,
};
pub use stream::{ChatToMessagesStream, MessagesToChatStream};

use crate::json::{Map, Value};

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

/// Parses a body that must be a JSON object.
pub(crate) fn parse_object(body: &[u8]) -> Result<Map<String, Value>, TranslateError> {
    match crate::json::from_slice(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(err("", "the body must be a JSON object")),
        Err(e) => Err(err("", e.to_string())),
    }
}

/// A field's value with JSON `null` treated as absent, as both APIs do.
pub(crate) fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

pub(crate) fn u64_at(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
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
pub(crate) fn chat_usage(u: &Value) -> Value {
    let cache_read = u64_at(u, "cache_read_input_tokens");
    let prompt = u64_at(u, "input_tokens")
        .saturating_add(u64_at(u, "cache_creation_input_tokens"))
        .saturating_add(cache_read);
    let completion = u64_at(u, "output_tokens");
    crate::json::json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
        "prompt_tokens_details": {"cached_tokens": cache_read},
    })
}

/// OpenAI usage -> Anthropic usage (cached tokens move out of `input_tokens`).
pub(crate) fn messages_usage(u: &Value) -> Value {
    let cached = u
        .get("prompt_tokens_details")
        .map_or(0, |d| u64_at(d, "cached_tokens"));
    crate::json::json!({
        "input_tokens": u64_at(u, "prompt_tokens").saturating_sub(cached),
        "output_tokens": u64_at(u, "completion_tokens"),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    })
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
/// `tool_use.input` wants; empty arguments are `{}`. `path` names the tool call in errors.
pub(crate) fn tool_call_input(
    function: Option<&crate::json::Value>,
    path: &str,
) -> Result<crate::json::Value, TranslateError> {
    let args = function
        .and_then(|f| f.get("arguments"))
        .and_then(crate::json::Value::as_str)
        .unwrap_or_default();
    if args.trim().is_empty() {
        return Ok(crate::json::json!({}));
    }
    let field = format!("{path}.function.arguments");
    match crate::json::from_str(args) {
        Ok(v @ crate::json::Value::Object(_)) => Ok(v),
        Ok(_) => Err(TranslateError {
            field,
            reason: "must encode a JSON object".into(),
        }),
        Err(e) => Err(TranslateError {
            field,
            reason: format!("invalid JSON: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::json;

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

    #[test]
    fn usage_both_ways() {
        let a = json!({"input_tokens": 10, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 300, "output_tokens": 7});
        let o = chat_usage(&a);
        assert_eq!(
            o,
            json!({"prompt_tokens": 330, "completion_tokens": 7, "total_tokens": 337, "prompt_tokens_details": {"cached_tokens": 300}})
        );
        assert_eq!(
            messages_usage(&o),
            json!({"input_tokens": 30, "output_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 300})
        );
        // Hostile numbers neither overflow nor underflow.
        let o = chat_usage(
            &json!({"input_tokens": u64::MAX, "cache_read_input_tokens": 5, "output_tokens": u64::MAX}),
        );
        assert_eq!(o["total_tokens"], u64::MAX);
        let a = messages_usage(
            &json!({"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": 9}, "completion_tokens": -3}),
        );
        assert_eq!(a["input_tokens"], 0);
        assert_eq!(a["output_tokens"], 0);
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
        let sent: crate::json::Value = crate::json::from_slice(
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
        let answer: crate::json::Value = crate::json::from_slice(
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
        let args: crate::json::Value =
            crate::json::from_str(call["function"]["arguments"].as_str().unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(args, json!({"city": "Oslo"}));

        // The client sends the result back with the assistant message exactly as it received it.
        let follow = json!({"model": "gpt-4o", "tools": tools, "messages": [
            {"role": "user", "content": "Weather in Oslo?"}, msg.clone(),
            {"role": "tool", "tool_call_id": call["id"].clone(), "content": "-3C, snow"}]});
        let sent: crate::json::Value = crate::json::from_slice(
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
