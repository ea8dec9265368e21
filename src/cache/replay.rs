//! A stored answer (one complete JSON in the client's dialect) written as the well-formed stream
//! the provider would have sent: the reverse of [`super::assemble`], so a streaming request can be
//! answered from an entry stored from a JSON answer, and from one stored from a stream.
//!
//! The whole stream is written at once: the content comes in one delta per choice or block, which
//! the SDKs' stream readers accumulate like any other.

use serde_json::{json, Map, Value};

fn data(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(b"data: ");
    // Writing a Value to a Vec does not fail.
    let _ = serde_json::to_writer(&mut *out, v);
    out.extend_from_slice(b"\n\n");
}

fn event(out: &mut Vec<u8>, name: &str, v: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
    data(out, v);
}

/// A `chat.completion` as `chat.completion.chunk` events, then `[DONE]`; with `include_usage` the
/// usage chunk the client asked for (when the answer has usage), and `"usage": null` on the others.
pub fn chat_stream(json: &[u8], include_usage: bool) -> Option<Vec<u8>> {
    let Value::Object(mut c) = serde_json::from_slice::<Value>(json).ok()? else {
        return None;
    };
    let Some(Value::Array(choices)) = c.remove("choices") else {
        return None;
    };
    let usage = c.remove("usage").filter(|u| !u.is_null());
    let mut head = Map::new();
    for k in [
        "id",
        "created",
        "model",
        "service_tier",
        "system_fingerprint",
    ] {
        if let Some(v) = c.remove(k) {
            head.insert(k.into(), v);
        }
    }
    head.insert("object".into(), json!("chat.completion.chunk"));
    let chunk = |choices: Value, usage: Option<&Value>| {
        let mut ch = head.clone();
        ch.insert("choices".into(), choices);
        if include_usage {
            ch.insert("usage".into(), usage.cloned().unwrap_or(Value::Null));
        }
        Value::Object(ch)
    };
    let mut out = Vec::with_capacity(json.len() * 2);
    for choice in choices {
        let index = choice.get("index").cloned().unwrap_or(json!(0));
        let msg = choice.get("message").cloned().unwrap_or(json!({}));
        let mut delta = Map::new();
        delta.insert(
            "role".into(),
            msg.get("role").cloned().unwrap_or(json!("assistant")),
        );
        delta.insert(
            "content".into(),
            msg.get("content").cloned().unwrap_or(Value::Null),
        );
        if let Some(r) = msg.get("refusal") {
            delta.insert("refusal".into(), r.clone());
        }
        if let Some(Value::Array(calls)) = msg.get("tool_calls") {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    json!({"index": i, "id": t.get("id"), "type": t.get("type"),
                           "function": t.get("function")})
                })
                .collect();
            delta.insert("tool_calls".into(), Value::Array(calls));
        }
        if let Some(f) = msg.get("function_call") {
            delta.insert("function_call".into(), f.clone());
        }
        let logprobs = choice.get("logprobs").cloned().unwrap_or(Value::Null);
        let body =
            json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": null}]);
        data(&mut out, &chunk(body, None));
        let finish = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
        let end = json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": finish}]);
        data(&mut out, &chunk(end, None));
    }
    if let (true, Some(u)) = (include_usage, usage.as_ref()) {
        data(&mut out, &chunk(json!([]), Some(u)));
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    Some(out)
}

/// An Anthropic `message` as `message_start`, one start/delta/stop per content block,
/// `message_delta` (stop reason and usage) and `message_stop`.
pub fn messages_stream(json: &[u8]) -> Option<Vec<u8>> {
    let Value::Object(mut m) = serde_json::from_slice::<Value>(json).ok()? else {
        return None;
    };
    let Some(Value::Array(content)) = m.remove("content") else {
        return None;
    };
    let usage = m.remove("usage").unwrap_or(json!({}));
    let stop_reason = m.remove("stop_reason").unwrap_or(Value::Null);
    let stop_sequence = m.remove("stop_sequence").unwrap_or(Value::Null);
    let mut start = m;
    start.insert("content".into(), json!([]));
    start.insert("stop_reason".into(), Value::Null);
    start.insert("stop_sequence".into(), Value::Null);
    // As the API does: the output so far at the start, the final count in message_delta.
    let mut provisional = usage.clone();
    if let Some(o) = provisional.get_mut("output_tokens") {
        if let Some(n) = o.as_u64() {
            *o = json!(n.min(1));
        }
    }
    start.insert("usage".into(), provisional);
    let mut out = Vec::with_capacity(json.len() * 2);
    event(
        &mut out,
        "message_start",
        &json!({"type": "message_start", "message": start}),
    );
    for (i, block) in content.into_iter().enumerate() {
        let Value::Object(mut b) = block else {
            continue;
        };
        let kind = b
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let mut deltas = Vec::new();
        match kind.as_str() {
            "text" => {
                let text = b.insert("text".into(), json!("")).unwrap_or(json!(""));
                if text.as_str().is_some_and(|t| !t.is_empty()) {
                    deltas.push(json!({"type": "text_delta", "text": text}));
                }
                if let Some(Value::Array(citations)) = b.remove("citations") {
                    deltas.extend(
                        citations
                            .into_iter()
                            .map(|c| json!({"type": "citations_delta", "citation": c})),
                    );
                }
            }
            "thinking" => {
                let thinking = b.insert("thinking".into(), json!("")).unwrap_or(json!(""));
                let signature = b.insert("signature".into(), json!("")).unwrap_or(json!(""));
                deltas.push(json!({"type": "thinking_delta", "thinking": thinking}));
                deltas.push(json!({"type": "signature_delta", "signature": signature}));
            }
            _ if b.contains_key("input") => {
                let input = b.insert("input".into(), json!({})).unwrap_or(json!({}));
                if input.as_object().is_none_or(|o| !o.is_empty()) {
                    let partial = serde_json::to_string(&input).unwrap_or_default();
                    deltas.push(json!({"type": "input_json_delta", "partial_json": partial}));
                }
            }
            // Blocks without a streamed form (redacted thinking, tool results) start whole.
            _ => {}
        }
        event(
            &mut out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": i, "content_block": b}),
        );
        for d in deltas {
            event(
                &mut out,
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": i, "delta": d}),
            );
        }
        event(
            &mut out,
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": i}),
        );
    }
    event(
        &mut out,
        "message_delta",
        &json!({"type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": usage}),
    );
    event(&mut out, "message_stop", &json!({"type": "message_stop"}));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::super::assemble::Assembler;
    use super::*;
    use crate::count::sse::SseParser;
    use crate::count::usage::{usage_from_json, StreamUsage};

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// The stream assembled again, and the usage a stream reader counts from it.
    fn reassemble(anthropic: bool, stream: &[u8]) -> (Value, Option<crate::count::usage::Usage>) {
        let mut a = Assembler::new(anthropic, 1 << 20);
        let mut su = StreamUsage::new();
        let mut p = SseParser::new(1 << 20);
        p.feed(stream, |ev| {
            a.on_event(&ev);
            su.on_event(&ev);
        });
        let json = a.finish().expect("a complete stream");
        (serde_json::from_slice(&json).unwrap(), su.usage())
    }

    fn strip_nulls(v: &mut Value) {
        if let Value::Object(m) = v {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        } else if let Value::Array(a) = v {
            a.iter_mut().for_each(strip_nulls);
        }
    }

    #[test]
    fn a_chat_completion_replays_as_chunks_that_assemble_back_to_it() {
        for name in ["openai_chat.json", "openai_chat_tools.json"] {
            let json = fixture(name);
            let stream = chat_stream(&json, true).unwrap();
            assert!(stream.ends_with(b"data: [DONE]\n\n"));
            let (mut back, usage) = reassemble(false, &stream);
            assert_eq!(usage, usage_from_json(&json), "{name}");
            let mut want: Value = serde_json::from_slice(&json).unwrap();
            // What a stream does not carry: the message's annotations.
            if let Some(m) = want["choices"][0]["message"].as_object_mut() {
                m.remove("annotations");
            }
            strip_nulls(&mut back);
            strip_nulls(&mut want);
            assert_eq!(back, want, "{name}");
        }
    }

    #[test]
    fn without_include_usage_there_is_no_usage_chunk() {
        let stream = chat_stream(&fixture("openai_chat.json"), false).unwrap();
        let text = String::from_utf8(stream).unwrap();
        assert!(!text.contains("\"usage\""), "{text}");
        assert_eq!(text.matches("data: ").count(), 3);
    }

    #[test]
    fn a_message_replays_as_events_that_assemble_back_to_it() {
        for name in ["anthropic_message.json", "anthropic_message_cache.json"] {
            let json = fixture(name);
            let stream = messages_stream(&json).unwrap();
            let (back, usage) = reassemble(true, &stream);
            assert_eq!(usage, usage_from_json(&json), "{name}");
            let want: Value = serde_json::from_slice(&json).unwrap();
            assert_eq!(back, want, "{name}");
        }
        // Thinking, text and a tool call, assembled from a provider's stream, then replayed.
        let (message, _) = reassemble(true, &fixture("anthropic_stream_tools.sse"));
        let replayed = messages_stream(&serde_json::to_vec(&message).unwrap()).unwrap();
        let (back, _) = reassemble(true, &replayed);
        assert_eq!(back, message);
    }

    #[test]
    fn what_is_not_an_answer_does_not_replay() {
        for bad in [&b"[]"[..], b"{}", b"nope", b"{\"choices\":3}"] {
            assert!(chat_stream(bad, true).is_none());
            assert!(messages_stream(bad).is_none());
        }
    }
}
