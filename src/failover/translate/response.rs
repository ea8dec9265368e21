//! Non-streaming response bodies.

use std::borrow::Cow;

use super::shapes::{
    BlockOut, ChatAnswerOut, ChatChoiceOut, ChatCompletionIn, ChatCompletionOut,
    ChatFunctionCallOut, ChatToolCallOut, MessagesResponseIn, MessagesResponseOut,
};
use super::{
    chat_id, chat_usage, err, finish_reason, message_id, messages_usage, parse_body, stop_reason,
    to_body, tool_call_input, TranslateError,
};

/// Providers add members: a response's unknown ones are ignored, so this reason never shows.
const UNKNOWN: &str = "unexpected member";

/// Anthropic messages response -> OpenAI chat completion, `created` = 0 (Anthropic responses carry
/// no timestamp and this module reads no clock). Prefer [`messages_response_to_chat_at`].
pub fn messages_response_to_chat(
    body: &[u8],
    client_model: &str,
) -> Result<Vec<u8>, TranslateError> {
    messages_response_to_chat_at(body, client_model, 0)
}

/// Anthropic messages response -> OpenAI chat completion created at `created_unix_s`.
/// Thinking blocks are left out: chat completions has no place for them. `usage` is there only
/// when the provider reported it.
pub fn messages_response_to_chat_at(
    body: &[u8],
    client_model: &str,
    created_unix_s: u64,
) -> Result<Vec<u8>, TranslateError> {
    let res: MessagesResponseIn = parse_body(body, UNKNOWN)?;
    let blocks = res
        .content
        .ok_or_else(|| err("content", "must be an array"))?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for (i, b) in blocks.into_iter().enumerate() {
        match b.kind.as_ref() {
            "text" => text.push_str(b.text.as_deref().unwrap_or_default()),
            "tool_use" => calls.push(ChatToolCallOut {
                id: b.id.unwrap_or_default(),
                kind: "function",
                function: ChatFunctionCallOut {
                    name: b.name.unwrap_or_default(),
                    arguments: Cow::Borrowed(b.input.map_or("{}", |i| i.get())),
                },
            }),
            "thinking" | "redacted_thinking" => {}
            other => {
                return Err(err(
                    format!("content[{i}].type"),
                    format!("unsupported content block type \"{other}\""),
                ))
            }
        }
    }
    let content = (!text.is_empty() || calls.is_empty()).then_some(text);
    let out = ChatCompletionOut {
        id: chat_id(res.id.as_deref().unwrap_or_default()),
        object: "chat.completion",
        created: created_unix_s,
        model: client_model,
        choices: [ChatChoiceOut {
            index: 0,
            message: ChatAnswerOut {
                role: "assistant",
                content,
                refusal: None,
                tool_calls: (!calls.is_empty()).then_some(calls),
            },
            logprobs: None,
            finish_reason: res.stop_reason.as_deref().map(finish_reason),
        }],
        usage: res.usage.as_ref().map(chat_usage),
    };
    to_body(&out)
}

/// OpenAI chat completion -> Anthropic messages response. Only the first choice exists (requests
/// from Anthropic clients never ask for more). Anthropic's shape requires `usage`: zeros when the
/// provider reported none.
pub fn chat_response_to_messages(
    body: &[u8],
    client_model: &str,
) -> Result<Vec<u8>, TranslateError> {
    let res: ChatCompletionIn = parse_body(body, UNKNOWN)?;
    let choice = res
        .choices
        .and_then(|c| c.into_iter().next())
        .ok_or_else(|| err("choices", "must hold at least one choice"))?;
    let msg = choice
        .message
        .ok_or_else(|| err("choices[0].message", "is required"))?;
    let mut content = Vec::new();
    // A refusal is the model's answer too; the client sees it as text with stop_reason "refusal".
    let refusal = msg.refusal.filter(|r| !r.is_empty());
    let refused = refusal.is_some();
    for text in [msg.content, refusal].into_iter().flatten() {
        if !text.is_empty() {
            content.push(BlockOut::Text { text });
        }
    }
    for (k, c) in msg.tool_calls.unwrap_or_default().into_iter().enumerate() {
        let path = format!("choices[0].message.tool_calls[{k}]");
        let (name, arguments) = c.function.map_or((None, None), |f| (f.name, f.arguments));
        let input = tool_call_input(arguments.as_deref(), &path)?;
        content.push(BlockOut::ToolUse {
            id: c.id.unwrap_or_default(),
            name: name.unwrap_or_default(),
            input,
        });
    }
    let stop = if refused {
        Some("refusal")
    } else {
        choice.finish_reason.as_deref().map(stop_reason)
    };
    let out = MessagesResponseOut {
        id: message_id(res.id.as_deref().unwrap_or_default()),
        kind: "message",
        role: "assistant",
        model: client_model,
        content,
        stop_reason: stop,
        stop_sequence: None,
        usage: messages_usage(res.usage.as_ref()),
    };
    to_body(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn to_chat(res: Value) -> Value {
        let out = messages_response_to_chat_at(res.to_string().as_bytes(), "gpt-4o", 1_700_000_000);
        serde_json::from_slice(&out.unwrap_or_default()).unwrap_or_default()
    }

    fn to_messages(res: Value) -> Value {
        let out = chat_response_to_messages(res.to_string().as_bytes(), "claude-sonnet-4-5");
        serde_json::from_slice(&out.unwrap_or_default()).unwrap_or_default()
    }

    #[test]
    fn anthropic_text_response() {
        let res = json!({
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
            "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "Hello"}, {"type": "text", "text": " there."}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000, "output_tokens": 6, "service_tier": "standard"}
        });
        assert_eq!(
            to_chat(res),
            json!({
                "id": "chatcmpl-msg_01XFDUDYJgAACzvnptvVoYEL", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there.", "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 2112, "completion_tokens": 6, "total_tokens": 2118, "prompt_tokens_details": {"cached_tokens": 2000}}
            })
        );
        let plain = messages_response_to_chat(
            br#"{"id":"msg_1","content":[],"stop_reason":"max_tokens","usage":{}}"#,
            "m",
        );
        let plain: Value = serde_json::from_slice(&plain.unwrap_or_default()).unwrap_or_default();
        assert_eq!(
            (
                plain["created"].clone(),
                plain["choices"][0]["finish_reason"].clone()
            ),
            (json!(0), json!("length"))
        );
    }

    #[test]
    fn anthropic_stop_reasons() {
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
            ("pause_turn", "stop"),
        ] {
            let got = to_chat(
                json!({"id": "msg_1", "content": [{"type": "text", "text": "x"}], "stop_reason": stop, "usage": {"input_tokens": 1, "output_tokens": 1}}),
            );
            assert_eq!(got["choices"][0]["finish_reason"], finish, "{stop}");
        }
    }

    #[test]
    fn anthropic_tool_use_response() {
        let input = json!({"location": "San Francisco, CA", "unit": "celsius", "days": [1, 2]});
        let res = json!({
            "id": "msg_01Aq9w938a90dw8q", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": input}],
            "stop_reason": "tool_use", "stop_sequence": null, "usage": {"input_tokens": 384, "output_tokens": 58}
        });
        let got = to_chat(res);
        let msg = &got["choices"][0]["message"];
        assert_eq!(msg["content"], Value::Null);
        assert_eq!(got["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(msg["tool_calls"][0]["id"], "toolu_01A09q90qw90lq917835lq9");
        assert_eq!(msg["tool_calls"][0]["type"], "function");
        assert_eq!(msg["tool_calls"][0]["function"]["name"], "get_weather");
        let args: Value = serde_json::from_str(
            msg["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap_or_default(),
        )
        .unwrap_or_default();
        assert_eq!(args, input);
        assert_eq!(got["usage"]["total_tokens"], 442);
    }

    #[test]
    fn openai_responses() {
        let res = json!({
            "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion", "created": 1741569952, "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Let me check.", "refusal": null, "annotations": [],
                "tool_calls": [{"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                               {"id": "call_def", "type": "function", "function": {"name": "ping", "arguments": ""}}]},
                "logprobs": null, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 1500, "completion_tokens": 40, "total_tokens": 1540,
                "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
            "system_fingerprint": "fp_1"
        });
        assert_eq!(
            to_messages(res),
            json!({
                "id": "msg_B9MBs8CjcvOU2jLn4n570S5qMJKcT", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "call_abc", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_def", "name": "ping", "input": {}}
                ],
                "stop_reason": "tool_use", "stop_sequence": null,
                "usage": {"input_tokens": 476, "output_tokens": 40, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1024}
            })
        );
        let cases = [
            (
                json!({"role": "assistant", "content": "Hi"}),
                json!("stop"),
                json!("end_turn"),
                json!([{"type": "text", "text": "Hi"}]),
            ),
            (
                json!({"role": "assistant", "content": "Hi"}),
                json!("length"),
                json!("max_tokens"),
                json!([{"type": "text", "text": "Hi"}]),
            ),
            (
                json!({"role": "assistant", "content": ""}),
                json!("content_filter"),
                json!("refusal"),
                json!([]),
            ),
            (
                json!({"role": "assistant", "content": null, "refusal": "I can't help."}),
                json!("stop"),
                json!("refusal"),
                json!([{"type": "text", "text": "I can't help."}]),
            ),
            (
                json!({"role": "assistant", "content": "x"}),
                json!(null),
                json!(null),
                json!([{"type": "text", "text": "x"}]),
            ),
        ];
        for (message, finish, stop, content) in cases {
            let got = to_messages(
                json!({"id": "chatcmpl-1", "choices": [{"index": 0, "message": message, "finish_reason": finish}]}),
            );
            assert_eq!(
                (&got["stop_reason"], &got["content"]),
                (&stop, &content),
                "{message} {finish}"
            );
            assert_eq!(got["usage"]["input_tokens"], 0);
        }
    }

    #[test]
    fn response_errors() {
        let m = |b: &str| {
            messages_response_to_chat(b.as_bytes(), "m")
                .err()
                .map(|e| e.field)
        };
        let c = |b: &str| {
            chat_response_to_messages(b.as_bytes(), "m")
                .err()
                .map(|e| e.field)
        };
        assert_eq!(m("not json"), Some(String::new()));
        assert_eq!(
            m(r#"{"type":"error","error":{"type":"api_error","message":"x"}}"#).as_deref(),
            Some("content")
        );
        assert_eq!(
            m(r#"{"id":"msg_1","content":[{"type":"server_tool_use","id":"s"}]}"#).as_deref(),
            Some("content[0].type")
        );
        assert_eq!(c("[]"), Some(String::new()));
        assert_eq!(c(r#"{"id":"x","choices":[]}"#).as_deref(), Some("choices"));
        assert_eq!(
            c(r#"{"id":"x","choices":[{"index":0}]}"#).as_deref(),
            Some("choices[0].message")
        );
        let bad_args = r#"{"id":"x","choices":[{"index":0,"finish_reason":"length","message":{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{\"a\":"}}]}}]}"#;
        assert_eq!(
            c(bad_args).as_deref(),
            Some("choices[0].message.tool_calls[0].function.arguments")
        );
    }

    #[test]
    fn response_round_trip() {
        let original = json!({
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "Sure."}, {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"q": [1, {"r": null}]}}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 90}
        });
        let chat =
            messages_response_to_chat(original.to_string().as_bytes(), "gpt").unwrap_or_default();
        let back: Value = serde_json::from_slice(
            &chat_response_to_messages(&chat, "claude-sonnet-4-5").unwrap_or_default(),
        )
        .unwrap_or_default();
        assert_eq!(back, original);
    }

    /// Usage shows what the provider reported: nothing for an OpenAI client, zeros where
    /// Anthropic's shape requires the member.
    #[test]
    fn json_without_usage_each_way() {
        let got = to_chat(
            json!({"id": "msg_1", "type": "message", "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn"}),
        );
        assert_eq!(got.get("usage"), None);
        assert_eq!(got["choices"][0]["message"]["content"], "hi");
        let got = to_chat(
            json!({"id": "msg_1", "content": [{"type": "text", "text": "hi"}], "usage": null}),
        );
        assert_eq!(got.get("usage"), None);

        let got = to_messages(
            json!({"id": "chatcmpl-1", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}),
        );
        assert_eq!(
            got["usage"],
            json!({"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
        );
    }

    /// Providers add members; counts of an unexpected type count as unreported, not as errors.
    #[test]
    fn unknown_members_and_odd_counts_are_tolerated() {
        let got = to_chat(
            json!({"id": "msg_1", "content": [{"type": "text", "text": "hi", "citations": null, "brand_new": 1}],
            "stop_reason": "end_turn", "container": {"id": "c"}, "usage": {"input_tokens": "12", "output_tokens": 3, "server_tool_use": {"web_search_requests": 1}}}),
        );
        assert_eq!(got["usage"]["prompt_tokens"], 0);
        assert_eq!(got["usage"]["completion_tokens"], 3);
        let got = to_messages(
            json!({"id": "chatcmpl-1", "service_tier": "default", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "hi", "annotations": [{"type": "url_citation"}]}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": -1, "prompt_tokens_details": null}}),
        );
        assert_eq!(got["usage"]["input_tokens"], 5);
        assert_eq!(got["usage"]["output_tokens"], 0);
    }
}
