//! Non-streaming response bodies.

use crate::json::{json, Value};

use super::{
    chat_id, chat_usage, err, finish_reason, message_id, messages_usage, parse_object, stop_reason,
    tool_call_input, TranslateError,
};

/// Anthropic messages response -> OpenAI chat completion, `created` = 0 (Anthropic responses carry
/// no timestamp and this module reads no clock). Prefer [`messages_response_to_chat_at`].
pub fn messages_response_to_chat(
    body: &[u8],
    client_model: &str,
) -> Result<Vec<u8>, TranslateError> {
    messages_response_to_chat_at(body, client_model, 0)
}

/// Anthropic messages response -> OpenAI chat completion created at `created_unix_s`.
/// Thinking blocks are left out: chat completions has no place for them.
pub fn messages_response_to_chat_at(
    body: &[u8],
    client_model: &str,
    created_unix_s: u64,
) -> Result<Vec<u8>, TranslateError> {
    let res = parse_object(body)?;
    let blocks = res
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| err("content", "must be an array"))?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        match b.get("type").and_then(Value::as_str).unwrap_or_default() {
            "text" => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default()),
            "tool_use" => {
                let id = b.get("id").and_then(Value::as_str).unwrap_or_default();
                let name = b.get("name").and_then(Value::as_str).unwrap_or_default();
                let args = b
                    .get("input")
                    .map_or_else(|| "{}".to_string(), Value::to_string);
                calls.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}));
            }
            "thinking" | "redacted_thinking" => {}
            other => {
                return Err(err(
                    format!("content[{i}].type"),
                    format!("unsupported content block type \"{other}\""),
                ))
            }
        }
    }
    let mut message = json!({"role": "assistant", "content": text, "refusal": null});
    if let (false, Some(m)) = (calls.is_empty(), message.as_object_mut()) {
        if text.is_empty() {
            m.insert("content".into(), Value::Null);
        }
        m.insert("tool_calls".into(), calls.into());
    }
    let finish = res
        .get("stop_reason")
        .and_then(Value::as_str)
        .map(finish_reason);
    let id = res.get("id").and_then(Value::as_str).unwrap_or_default();
    let out = json!({
        "id": chat_id(id),
        "object": "chat.completion",
        "created": created_unix_s,
        "model": client_model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": chat_usage(res.get("usage").unwrap_or(&Value::Null)),
    });
    Ok(out.to_string().into_bytes())
}

/// OpenAI chat completion -> Anthropic messages response. Only the first choice exists (requests
/// from Anthropic clients never ask for more).
pub fn chat_response_to_messages(
    body: &[u8],
    client_model: &str,
) -> Result<Vec<u8>, TranslateError> {
    let res = parse_object(body)?;
    let choice = res
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| err("choices", "must hold at least one choice"))?;
    let msg = choice
        .get("message")
        .ok_or_else(|| err("choices[0].message", "is required"))?;
    let mut content = Vec::new();
    // A refusal is the model's answer too; the client sees it as text with stop_reason "refusal".
    let refusal = msg
        .get("refusal")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty());
    for text in [msg.get("content").and_then(Value::as_str), refusal]
        .into_iter()
        .flatten()
    {
        if !text.is_empty() {
            content.push(json!({"type": "text", "text": text}));
        }
    }
    let calls = msg
        .get("tool_calls")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for (k, c) in calls.iter().enumerate() {
        let path = format!("choices[0].message.tool_calls[{k}]");
        let f = c.get("function");
        let input = tool_call_input(f, &path)?;
        content.push(json!({
            "type": "tool_use",
            "id": c.get("id").and_then(Value::as_str).unwrap_or_default(),
            "name": f.and_then(|f| f.get("name")).and_then(Value::as_str).unwrap_or_default(),
            "input": input,
        }));
    }
    let stop = match (choice.get("finish_reason").and_then(Value::as_str), refusal) {
        (_, Some(_)) => Some("refusal"),
        (f, None) => f.map(stop_reason),
    };
    let id = res.get("id").and_then(Value::as_str).unwrap_or_default();
    let out = json!({
        "id": message_id(id),
        "type": "message",
        "role": "assistant",
        "model": client_model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": messages_usage(res.get("usage").unwrap_or(&Value::Null)),
    });
    Ok(out.to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_chat(res: Value) -> Value {
        let out = messages_response_to_chat_at(res.to_string().as_bytes(), "gpt-4o", 1_700_000_000);
        crate::json::from_slice(&out.unwrap_or_default()).unwrap_or_default()
    }

    fn to_messages(res: Value) -> Value {
        let out = chat_response_to_messages(res.to_string().as_bytes(), "claude-sonnet-4-5");
        crate::json::from_slice(&out.unwrap_or_default()).unwrap_or_default()
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
        let plain: Value = crate::json::from_slice(&plain.unwrap_or_default()).unwrap_or_default();
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
        let args: Value = crate::json::from_str(
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
        let back: Value = crate::json::from_slice(
            &chat_response_to_messages(&chat, "claude-sonnet-4-5").unwrap_or_default(),
        )
        .unwrap_or_default();
        assert_eq!(back, original);
    }
}
