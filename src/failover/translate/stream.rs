//! Streaming translation, one SSE event at a time. Events whose data is not JSON of the expected
//! shape are skipped (with a warning): one bad event should not end an otherwise good answer.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::shapes::{
    BlockDeltaOut, BlockOut, ChatChunkChoiceOut, ChatChunkIn, ChatChunkOut, ChatDeltaOut,
    ChatFunctionDeltaOut, ChatToolCallDeltaOut, ChatToolCallIn, ChatUsageIn, EventIn, EventOut,
    Input, MessageDeltaOut, MessagesResponseOut, StartUsageOut, UsageIn,
};
use super::{
    chat_error_to_messages, chat_id, chat_usage, finish_reason, message_id, messages_error_to_chat,
    messages_usage, stop_reason,
};
use crate::count::sse::SseEvent;

fn parse<'a, T: Deserialize<'a>>(ev: &SseEvent<'a>) -> Option<T> {
    match serde_json::from_str(ev.data) {
        Ok(v) => Some(v),
        Err(e) => {
            log::warn!("tollgate: skipping a stream event that cannot be read: {e}");
            None
        }
    }
}

fn write_data(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
}

/// `data: <json>\n\n`, serialized straight into `out`.
fn write_json<T: Serialize>(out: &mut Vec<u8>, v: &T) {
    out.extend_from_slice(b"data: ");
    // Cannot fail: these shapes have string keys only, and writing to a Vec does not fail.
    if let Err(e) = serde_json::to_writer(&mut *out, v) {
        log::warn!("tollgate: could not write a stream event: {e}");
    }
    out.extend_from_slice(b"\n\n");
}

/// Anthropic SSE events in, OpenAI `chat.completion.chunk` SSE bytes out.
#[derive(Debug)]
pub struct MessagesToChatStream {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    role_sent: bool,
    /// Anthropic block index -> the tool call's ordinal among tool calls (OpenAI's `index`).
    tools: Vec<(u64, u64)>,
    /// Usage as reported by message_start and message_delta (both may carry it); `None` when the
    /// provider reported none, and then the client gets no usage chunk.
    usage: Option<UsageIn>,
    started: bool,
    failed: bool,
    done: bool,
}

impl MessagesToChatStream {
    pub fn new(client_model: &str, include_usage: bool, created_unix_s: u64) -> Self {
        Self {
            id: chat_id(""),
            model: client_model.to_string(),
            created: created_unix_s,
            include_usage,
            role_sent: false,
            tools: Vec::new(),
            usage: None,
            started: false,
            failed: false,
            done: false,
        }
    }

    pub fn on_event(&mut self, ev: &SseEvent<'_>, out: &mut Vec<u8>) {
        if self.done || self.failed || ev.data.is_empty() {
            return;
        }
        let Some(v) = parse::<EventIn>(ev) else {
            return;
        };
        let index = v.index.unwrap_or_default();
        match v.kind.as_deref().unwrap_or(ev.event) {
            "message_start" => {
                let msg = v.message;
                self.id = chat_id(
                    msg.as_ref()
                        .and_then(|m| m.id.as_deref())
                        .unwrap_or_default(),
                );
                self.started = true;
                self.merge_usage(msg.and_then(|m| m.usage));
                self.delta(out, Some(""), None, None);
            }
            "content_block_start" => {
                let Some(block) = v.content_block else { return };
                match block.kind.as_ref() {
                    "tool_use" => {
                        let n = self.tools.len() as u64;
                        self.tools.push((index, n));
                        let call = ChatToolCallDeltaOut {
                            index: n,
                            id: Some(block.id.as_deref().unwrap_or_default()),
                            kind: Some("function"),
                            function: ChatFunctionDeltaOut {
                                name: Some(block.name.as_deref().unwrap_or_default()),
                                arguments: "",
                            },
                        };
                        self.delta(out, None, Some(call), None);
                    }
                    "text" => {
                        if let Some(text) = block.text.filter(|t| !t.is_empty()) {
                            self.delta(out, Some(&text), None, None);
                        }
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let Some(delta) = v.delta else { return };
                match delta.kind.as_deref().unwrap_or_default() {
                    "text_delta" => {
                        let text = delta.text.unwrap_or_default();
                        self.delta(out, Some(&text), None, None);
                    }
                    "input_json_delta" => {
                        let args = delta.partial_json.unwrap_or_default();
                        let Some(&(_, n)) = self.tools.iter().find(|(i, _)| *i == index) else {
                            return;
                        };
                        if args.is_empty() {
                            return;
                        }
                        let call = ChatToolCallDeltaOut {
                            index: n,
                            id: None,
                            kind: None,
                            function: ChatFunctionDeltaOut {
                                name: None,
                                arguments: &args,
                            },
                        };
                        self.delta(out, None, Some(call), None);
                    }
                    // thinking_delta, signature_delta, citations_delta: nothing to say in chat completions.
                    _ => {}
                }
            }
            "message_delta" => {
                self.merge_usage(v.usage);
                if let Some(reason) = v.delta.and_then(|d| d.stop_reason) {
                    self.delta(out, None, None, Some(finish_reason(&reason)));
                }
            }
            "message_stop" => self.end(out),
            "error" => {
                write_data(out, &messages_error_to_chat(ev.data.as_bytes(), 0));
                self.failed = true;
            }
            // ping, content_block_stop and event types added later.
            _ => {}
        }
    }

    /// Called once at end of stream; emits [DONE] if not yet emitted.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.done {
            self.end(out);
        }
    }

    fn merge_usage(&mut self, usage: Option<UsageIn>) {
        if let Some(u) = usage {
            self.usage.get_or_insert_with(UsageIn::default).merge(&u);
        }
    }

    fn chunk<'s>(
        &'s self,
        choices: Vec<ChatChunkChoiceOut<'s>>,
        usage: Option<&UsageIn>,
    ) -> ChatChunkOut<'s> {
        ChatChunkOut {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage: usage.map(chat_usage),
        }
    }

    fn delta(
        &mut self,
        out: &mut Vec<u8>,
        content: Option<&str>,
        call: Option<ChatToolCallDeltaOut<'_>>,
        finish: Option<&'static str>,
    ) {
        let role = (!self.role_sent).then_some("assistant");
        self.role_sent = true;
        let delta = ChatDeltaOut {
            role,
            content,
            tool_calls: call.map(|c| [c]),
        };
        let choice = ChatChunkChoiceOut {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish,
        };
        write_json(out, &self.chunk(vec![choice], None));
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        if let Some(usage) = self
            .usage
            .as_ref()
            .filter(|_| self.include_usage && self.started && !self.failed)
        {
            write_json(out, &self.chunk(Vec::new(), Some(usage)));
        }
        write_data(out, b"[DONE]");
        self.done = true;
    }
}

/// OpenAI chunks in (`data: {chunk}` ... `data: [DONE]`), Anthropic events out. OpenAI reports
/// usage and the finish reason before [DONE], so message_delta and message_stop are sent at [DONE].
#[derive(Debug)]
pub struct ChatToMessagesStream {
    model: String,
    started: bool,
    /// Anthropic index of the open content block.
    open: Option<u64>,
    next_block: u64,
    /// OpenAI tool call index -> Anthropic block index.
    tools: Vec<(u64, u64)>,
    text_block: Option<u64>,
    stop: Option<&'static str>,
    refused: bool,
    usage: Option<ChatUsageIn>,
    done: bool,
}

impl ChatToMessagesStream {
    pub fn new(client_model: &str) -> Self {
        Self {
            model: client_model.to_string(),
            started: false,
            open: None,
            next_block: 0,
            tools: Vec::new(),
            text_block: None,
            stop: None,
            refused: false,
            usage: None,
            done: false,
        }
    }

    pub fn on_event(&mut self, ev: &SseEvent<'_>, out: &mut Vec<u8>) {
        if self.done || ev.data.is_empty() {
            return;
        }
        if ev.data.trim() == "[DONE]" {
            self.end(out);
            return;
        }
        let Some(v) = parse::<ChatChunkIn>(ev) else {
            return;
        };
        if v.error.is_some() {
            emit_raw(out, "error", &chat_error_to_messages(ev.data.as_bytes(), 0));
            self.done = true;
            return;
        }
        if v.usage.is_some() {
            self.usage = v.usage;
        }
        // Azure's first chunk has no choices (only prompt filter results) and no id yet.
        let Some(choice) = v.choices.and_then(|c| c.into_iter().next()) else {
            return;
        };
        self.start(v.id.as_deref().unwrap_or_default(), out);
        if let Some(delta) = choice.delta {
            let refusal = delta.refusal.filter(|r| !r.is_empty());
            self.refused |= refusal.is_some();
            for text in [delta.content, refusal].into_iter().flatten() {
                if !text.is_empty() {
                    self.text(&text, out);
                }
            }
            for (k, call) in delta.tool_calls.unwrap_or_default().into_iter().enumerate() {
                self.tool_call(call, k as u64, out);
            }
        }
        if let Some(f) = choice.finish_reason {
            self.stop = Some(if self.refused {
                "refusal"
            } else {
                stop_reason(&f)
            });
            self.close(out);
        }
    }

    /// Called once at end of stream: closes the message if [DONE] never came; a stream that ended
    /// before any choice becomes an error event rather than an empty answer.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        if self.started {
            self.end(out);
        } else {
            let e = crate::api::errors::error_body(
                crate::api::errors::ClientApi::Anthropic,
                crate::api::errors::ErrorKind::Internal,
                "The provider's stream ended without an answer.",
                None,
                None,
            );
            emit_raw(out, "error", &e);
            self.done = true;
        }
    }

    fn start(&mut self, openai_id: &str, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        // Input tokens are only known at the end; message_delta carries the real numbers.
        let message = MessagesResponseOut {
            id: message_id(openai_id),
            kind: "message",
            role: "assistant",
            model: &self.model,
            content: Vec::new(),
            stop_reason: None,
            stop_sequence: None,
            usage: StartUsageOut {
                input_tokens: 0,
                output_tokens: 0,
            },
        };
        emit(out, &EventOut::MessageStart { message });
    }

    fn open_block(&mut self, block: BlockOut<'_>, out: &mut Vec<u8>) -> u64 {
        self.close(out);
        let index = self.next_block;
        self.next_block = self.next_block.saturating_add(1);
        self.open = Some(index);
        emit(
            out,
            &EventOut::ContentBlockStart {
                index,
                content_block: block,
            },
        );
        index
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some(index) = self.open.take() {
            emit(out, &EventOut::ContentBlockStop { index });
        }
    }

    fn text(&mut self, text: &str, out: &mut Vec<u8>) {
        let index = match self.text_block.filter(|b| self.open == Some(*b)) {
            Some(b) => b,
            None => {
                let b = self.open_block(
                    BlockOut::Text {
                        text: Cow::Borrowed(""),
                    },
                    out,
                );
                self.text_block = Some(b);
                b
            }
        };
        let delta = BlockDeltaOut::TextDelta { text };
        emit(out, &EventOut::ContentBlockDelta { index, delta });
    }

    fn tool_call(&mut self, call: ChatToolCallIn<'_>, position: u64, out: &mut Vec<u8>) {
        let oi = call.index.unwrap_or(position);
        let (name, args) = call
            .function
            .map_or((None, None), |f| (f.name, f.arguments));
        // Some compatible servers repeat id and name on every chunk: the index says what is new.
        let index = match self.tools.iter().find(|(i, _)| *i == oi) {
            Some(&(_, b)) => b,
            None => {
                let id = match call.id.filter(|id| !id.is_empty()) {
                    Some(id) => id,
                    None => Cow::Owned(format!("toolu_{}", self.next_block)),
                };
                let block = BlockOut::ToolUse {
                    id,
                    name: name.unwrap_or_default(),
                    input: Input::Empty,
                };
                let b = self.open_block(block, out);
                self.tools.push((oi, b));
                b
            }
        };
        if let Some(partial_json) = args.as_deref().filter(|a| !a.is_empty()) {
            let delta = BlockDeltaOut::InputJsonDelta { partial_json };
            emit(out, &EventOut::ContentBlockDelta { index, delta });
        }
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        self.start("", out);
        self.close(out);
        let delta = MessageDeltaOut {
            stop_reason: self.stop,
            stop_sequence: None,
        };
        let usage = messages_usage(self.usage.as_ref());
        emit(out, &EventOut::MessageDelta { delta, usage });
        emit(out, &EventOut::MessageStop);
        self.done = true;
    }
}

fn emit(out: &mut Vec<u8>, ev: &EventOut<'_>) {
    let name = match ev {
        EventOut::MessageStart { .. } => "message_start",
        EventOut::ContentBlockStart { .. } => "content_block_start",
        EventOut::ContentBlockDelta { .. } => "content_block_delta",
        EventOut::ContentBlockStop { .. } => "content_block_stop",
        EventOut::MessageDelta { .. } => "message_delta",
        EventOut::MessageStop => "message_stop",
    };
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\n");
    write_json(out, ev);
}

/// An event whose data is already serialized (error bodies).
fn emit_raw(out: &mut Vec<u8>, event: &str, data: &[u8]) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\n");
    write_data(out, data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn ev<'a>(event: &'a str, data: &'a str) -> SseEvent<'a> {
        SseEvent {
            event,
            data,
            raw: data.as_bytes(),
        }
    }

    /// Splits SSE output into (event name, data) and checks it is well formed: blocks end with a
    /// blank line, every data line is JSON or [DONE].
    fn events(out: &[u8]) -> Vec<(String, Value)> {
        let text = std::str::from_utf8(out).unwrap_or_default();
        assert!(
            text.is_empty() || text.ends_with("\n\n"),
            "unterminated: {text:?}"
        );
        let mut got = Vec::new();
        for block in text.split("\n\n").filter(|b| !b.is_empty()) {
            let (mut name, mut data) = (String::new(), None);
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    assert!(data.is_none(), "two data lines in {block:?}");
                    let v = if d == "[DONE]" {
                        json!("[DONE]")
                    } else {
                        serde_json::from_str::<Value>(d).unwrap_or(json!("<not json>"))
                    };
                    assert_ne!(v, json!("<not json>"), "{d}");
                    data = Some(v);
                } else {
                    assert!(line.is_empty(), "unexpected line {line:?}");
                }
            }
            got.push((name, data.unwrap_or_default()));
        }
        got
    }

    fn feed_anthropic(s: &mut MessagesToChatStream, stream: &[(&str, &str)]) -> Vec<Value> {
        let mut out = Vec::new();
        for (e, d) in stream {
            s.on_event(&ev(e, d), &mut out);
        }
        s.finish(&mut out);
        events(&out)
            .into_iter()
            .map(|(name, data)| {
                assert_eq!(name, "");
                data
            })
            .collect()
    }

    const TEXT_STREAM: &[(&str, &str)] = &[
        (
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":0,"cache_read_input_tokens":1000,"output_tokens":2}}}"#,
        ),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        ("ping", r#"{"type": "ping"}"#),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        ),
        ("", ""),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":", \"world\"\n"}}"#,
        ),
        (
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#,
        ),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ];

    #[test]
    fn anthropic_text_stream_to_chunks() {
        let chunks = feed_anthropic(
            &mut MessagesToChatStream::new("gpt-4o", true, 1_700_000_000),
            TEXT_STREAM,
        );
        let head = |c: &Value| {
            (
                c["id"].clone(),
                c["object"].clone(),
                c["created"].clone(),
                c["model"].clone(),
            )
        };
        let want_head = (
            json!("chatcmpl-msg_014p7gG3wDgGV9EUtLvnow3U"),
            json!("chat.completion.chunk"),
            json!(1_700_000_000),
            json!("gpt-4o"),
        );
        assert_eq!(chunks.len(), 6);
        for c in &chunks[..5] {
            assert_eq!(head(c), want_head);
        }
        let deltas: Vec<Value> = chunks[..4]
            .iter()
            .map(|c| c["choices"][0]["delta"].clone())
            .collect();
        assert_eq!(
            deltas,
            [
                json!({"role": "assistant", "content": ""}),
                json!({"content": "Hello"}),
                json!({"content": ", \"world\"\n"}),
                json!({})
            ]
        );
        let finish: Vec<Value> = chunks[..4]
            .iter()
            .map(|c| c["choices"][0]["finish_reason"].clone())
            .collect();
        assert_eq!(
            finish,
            [Value::Null, Value::Null, Value::Null, json!("stop")]
        );
        assert_eq!(chunks[4]["choices"], json!([]));
        assert_eq!(
            chunks[4]["usage"],
            json!({"prompt_tokens": 1472, "completion_tokens": 15, "total_tokens": 1487, "prompt_tokens_details": {"cached_tokens": 1000}})
        );
        assert_eq!(chunks[5], "[DONE]");
    }

    #[test]
    fn usage_chunk_only_when_asked_and_done_only_once() {
        let mut s = MessagesToChatStream::new("gpt-4o", false, 1);
        let chunks = feed_anthropic(&mut s, TEXT_STREAM);
        assert_eq!(chunks.len(), 5);
        assert!(chunks.iter().all(|c| c.get("usage").is_none()));
        assert_eq!(chunks[4], "[DONE]");
        let mut out = Vec::new();
        s.finish(&mut out);
        s.on_event(&ev("message_stop", r#"{"type":"message_stop"}"#), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn anthropic_tool_stream_to_chunks() {
        let input = json!({"location": "San Francisco, CA", "unit": "fahrenheit", "nested": {"list": [1, 2.5, "x\"y"]}});
        let text = input.to_string();
        let (a, b) = text.split_at(17);
        let (b, c) = b.split_at(9);
        let partials: Vec<String> = ["", a, b, c].iter().map(|p| json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": p}}).to_string()).collect();
        let mut stream: Vec<(&str, &str)> = vec![
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"msg_01","type":"message","role":"assistant","model":"claude","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":400,"output_tokens":1}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Checking."}}"#,
            ),
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":0}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}"#,
            ),
        ];
        stream.extend(partials.iter().map(|p| ("content_block_delta", p.as_str())));
        stream.extend([
            ("content_block_stop", r#"{"type":"content_block_stop","index":1}"#),
            ("content_block_start", r#"{"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_02","name":"get_time","input":{}}}"#),
            ("content_block_delta", r#"{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{}"}}"#),
            ("content_block_stop", r#"{"type":"content_block_stop","index":2}"#),
            ("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}"#),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ]);
        let chunks = feed_anthropic(&mut MessagesToChatStream::new("gpt-4o", true, 5), &stream);
        let calls: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
            .collect();
        assert_eq!(
            calls[0],
            &json!([{"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function", "function": {"name": "get_weather", "arguments": ""}}])
        );
        assert_eq!(
            calls[4],
            &json!([{"index": 1, "id": "toolu_02", "type": "function", "function": {"name": "get_time", "arguments": ""}}])
        );
        assert_eq!(calls.len(), 6, "the empty partial_json is not sent");
        let args = |n: u64| -> String {
            calls
                .iter()
                .filter(|c| c[0]["index"] == n)
                .filter_map(|c| c[0]["function"]["arguments"].as_str())
                .collect()
        };
        assert_eq!(
            serde_json::from_str::<Value>(&args(0)).unwrap_or_default(),
            input
        );
        assert_eq!(args(1), "{}");
        let finishes: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0].get("finish_reason"))
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finishes, [&json!("tool_calls")]);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[chunks.len() - 2]["usage"]["completion_tokens"], 89);
    }

    #[test]
    fn anthropic_error_event_and_truncation() {
        let mut s = MessagesToChatStream::new("gpt-4o", true, 5);
        let stream = [
            TEXT_STREAM[0],
            TEXT_STREAM[3],
            ("", "not json at all"),
            (
                "error",
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ),
            TEXT_STREAM[5],
        ];
        let chunks = feed_anthropic(&mut s, &stream);
        assert_eq!(chunks.len(), 4);
        assert_eq!(
            chunks[1]["choices"][0]["delta"],
            json!({"content": "Hello"})
        );
        assert_eq!(
            chunks[2],
            json!({"error": {"message": "Overloaded", "type": "server_error", "param": null, "code": null}})
        );
        assert_eq!(chunks[3], "[DONE]");

        // Cut off mid-answer: finish still ends the stream the way OpenAI clients expect.
        let chunks = feed_anthropic(
            &mut MessagesToChatStream::new("m", true, 5),
            &TEXT_STREAM[..4],
        );
        assert_eq!(chunks.last(), Some(&json!("[DONE]")));
        assert_eq!(chunks[chunks.len() - 2]["usage"]["prompt_tokens"], 1472);
        let chunks = feed_anthropic(&mut MessagesToChatStream::new("m", true, 5), &[]);
        assert_eq!(chunks, [json!("[DONE]")]);
    }

    fn feed_openai(s: &mut ChatToMessagesStream, stream: &[&str]) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for d in stream {
            s.on_event(&ev("", d), &mut out);
        }
        s.finish(&mut out);
        let got = events(&out);
        for (name, data) in &got {
            assert_eq!(data["type"], json!(name), "event name matches data type");
        }
        got
    }

    fn types(events: &[(String, Value)]) -> Vec<&str> {
        events.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn openai_text_stream_to_events() {
        let stream = [
            r#"{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}"#,
            r#"{"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
            r#"{"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
            r#"{"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"lo!"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
            r#"{"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
            r#"{"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":30,"completion_tokens":3,"total_tokens":33,"prompt_tokens_details":{"cached_tokens":10}}}"#,
            "[DONE]",
        ];
        let got = feed_openai(&mut ChatToMessagesStream::new("claude-sonnet-4-5"), &stream);
        assert_eq!(
            types(&got),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(
            got[0].1,
            json!({"type": "message_start", "message": {"id": "msg_abc", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 0, "output_tokens": 0}}})
        );
        assert_eq!(
            got[1].1,
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        );
        assert_eq!(
            got[3].1,
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo!"}})
        );
        assert_eq!(got[4].1, json!({"type": "content_block_stop", "index": 0}));
        assert_eq!(
            got[5].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"input_tokens": 20, "output_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 10}})
        );
    }

    #[test]
    fn openai_tool_stream_to_events() {
        let input = json!({"city": "Paris", "when": ["today", "tomorrow"]});
        let text = input.to_string();
        let (a, b) = text.split_at(11);
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).to_string()
        };
        let stream = [
            chunk(json!({"role": "assistant", "content": null}), Value::Null),
            chunk(json!({"content": "Let me look."}), Value::Null),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_A", "type": "function", "function": {"name": "weather", "arguments": ""}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}),
                Value::Null,
            ),
            // Some compatible servers repeat the id: still the same call.
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_A", "function": {"arguments": b}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 1, "id": "call_B", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]}),
                Value::Null,
            ),
            chunk(json!({}), json!("tool_calls")),
            "[DONE]".to_string(),
        ];
        let refs: Vec<&str> = stream.iter().map(String::as_str).collect();
        let got = feed_openai(&mut ChatToMessagesStream::new("claude"), &refs);
        assert_eq!(
            types(&got),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(
            got[4].1["content_block"],
            json!({"type": "tool_use", "id": "call_A", "name": "weather", "input": {}})
        );
        assert_eq!(
            got[8].1["content_block"],
            json!({"type": "tool_use", "id": "call_B", "name": "clock", "input": {}})
        );
        let args: String = got
            .iter()
            .filter(|(_, d)| d["index"] == 1 && d["delta"]["type"] == "input_json_delta")
            .filter_map(|(_, d)| d["delta"]["partial_json"].as_str())
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&args).unwrap_or_default(),
            input
        );
        assert_eq!(got[9].1["index"], 2);
        assert_eq!(got[11].1["delta"]["stop_reason"], "tool_use");
        // No usage chunk arrived: zeros rather than missing fields.
        assert_eq!(got[11].1["usage"]["output_tokens"], 0);
    }

    #[test]
    fn openai_errors_and_truncation() {
        let first = r#"{"id":"chatcmpl-e","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;
        let got = feed_openai(
            &mut ChatToMessagesStream::new("c"),
            &[
                first,
                r#"{"error":{"message":"Rate limit reached","type":"tokens","code":"rate_limit_exceeded"}}"#,
                first,
                "[DONE]",
            ],
        );
        assert_eq!(
            types(&got),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "error"
            ]
        );
        assert_eq!(
            got[3].1,
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached"}})
        );

        // No [DONE]: finish closes the block and the message.
        let got = feed_openai(&mut ChatToMessagesStream::new("c"), &[first, "{broken"]);
        assert_eq!(
            types(&got),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(got[4].1["delta"]["stop_reason"], Value::Null);

        // Nothing at all: an error, not an empty answer.
        let got = feed_openai(&mut ChatToMessagesStream::new("c"), &[]);
        assert_eq!(types(&got), ["error"]);
        assert_eq!(got[0].1["error"]["type"], "api_error");

        let mut s = ChatToMessagesStream::new("c");
        let mut out = Vec::new();
        s.on_event(&ev("", "[DONE]"), &mut out);
        s.finish(&mut out);
        assert_eq!(
            types(&events(&out)),
            ["message_start", "message_delta", "message_stop"]
        );
    }

    #[test]
    fn refusal_stream() {
        let got = feed_openai(
            &mut ChatToMessagesStream::new("c"),
            &[
                r#"{"id":"chatcmpl-r","choices":[{"index":0,"delta":{"role":"assistant","refusal":"I can't"},"finish_reason":null}]}"#,
                r#"{"id":"chatcmpl-r","choices":[{"index":0,"delta":{"refusal":" help."},"finish_reason":null}]}"#,
                r#"{"id":"chatcmpl-r","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
                "[DONE]",
            ],
        );
        let text: String = got
            .iter()
            .filter_map(|(_, d)| d["delta"]["text"].as_str())
            .collect();
        assert_eq!(text, "I can't help.");
        assert_eq!(got[got.len() - 2].1["delta"]["stop_reason"], "refusal");
    }

    /// The two translators are inverses on the content: Anthropic -> OpenAI chunks -> Anthropic.
    #[test]
    fn stream_round_trip() {
        let mut out = Vec::new();
        let mut a = MessagesToChatStream::new("gpt", true, 1);
        for (e, d) in TEXT_STREAM {
            a.on_event(&ev(e, d), &mut out);
        }
        a.finish(&mut out);
        let datas: Vec<String> = events(&out)
            .into_iter()
            .map(|(_, d)| d.as_str().map_or_else(|| d.to_string(), str::to_string))
            .collect();
        let refs: Vec<&str> = datas.iter().map(String::as_str).collect();
        let got = feed_openai(&mut ChatToMessagesStream::new("claude"), &refs);
        let text: String = got
            .iter()
            .filter_map(|(_, d)| d["delta"]["text"].as_str())
            .collect();
        assert_eq!(text, "Hello, \"world\"\n");
        assert_eq!(got[0].1["message"]["id"], "msg_014p7gG3wDgGV9EUtLvnow3U");
        assert_eq!(
            got[got.len() - 2].1["usage"],
            json!({"input_tokens": 472, "output_tokens": 15, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1000})
        );
    }

    const BARE_STREAM: &[(&str, &str)] = &[
        (
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"stop_reason":null}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
        ),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ];

    /// No usage anywhere in the source: no usage chunk even though the client asked for one.
    #[test]
    fn anthropic_stream_without_usage() {
        let chunks = feed_anthropic(&mut MessagesToChatStream::new("m", true, 1), BARE_STREAM);
        assert_eq!(chunks.len(), 4);
        assert!(chunks.iter().all(|c| c.get("usage").is_none()));
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[3], "[DONE]");

        // Only message_delta reports: the usage chunk carries what it said.
        let mut stream = BARE_STREAM.to_vec();
        stream[2].1 = r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":4}}"#;
        let chunks = feed_anthropic(&mut MessagesToChatStream::new("m", true, 1), &stream);
        assert_eq!(
            chunks[3]["usage"],
            json!({"prompt_tokens": 0, "completion_tokens": 4, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}})
        );
    }

    /// No usage chunk from OpenAI: Anthropic's message_delta still needs usage, so zeros.
    #[test]
    fn openai_stream_without_usage() {
        let got = feed_openai(
            &mut ChatToMessagesStream::new("c"),
            &[
                r#"{"id":"chatcmpl-n","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
                r#"{"id":"chatcmpl-n","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
                "[DONE]",
            ],
        );
        assert_eq!(
            got[got.len() - 2].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}})
        );
    }
}
