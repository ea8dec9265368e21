//! A streamed answer assembled, event by event, into the equivalent non-streamed JSON of the same
//! API: OpenAI `chat.completion.chunk`s into a `chat.completion`, Anthropic events into a
//! `message`. Only a stream that reached its terminal event (`[DONE]`, `message_stop`) without an
//! error gives one: a cut stream is never stored.
//!
//! What accumulates is bounded: once what it keeps (the text, and the events that are not one
//! token's delta) passes `max_bytes`, the assembly gives up (the answer would be too large to
//! store anyway). A stream's events weigh many times the JSON they assemble to (a chunk of some
//! 200 bytes per token), so it is what is kept that is measured, not what passes.

use crate::count::sse::SseEvent;
use serde_json::{json, Map, Value};

#[derive(Debug)]
pub struct Assembler {
    dialect: Dialect,
    max_bytes: usize,
    kept: usize,
    done: bool,
    failed: bool,
}

#[derive(Debug)]
enum Dialect {
    Chat(Chat),
    Messages(Messages),
}

impl Assembler {
    /// For a stream in Anthropic's dialect when `anthropic`, else in OpenAI's chat completions.
    pub fn new(anthropic: bool, max_bytes: usize) -> Self {
        Assembler {
            dialect: if anthropic {
                Dialect::Messages(Messages::default())
            } else {
                Dialect::Chat(Chat::default())
            },
            max_bytes,
            kept: 0,
            done: false,
            failed: false,
        }
    }

    pub fn on_event(&mut self, ev: &SseEvent<'_>) {
        if self.done || self.failed || ev.data.is_empty() {
            return;
        }
        let kept = &mut self.kept;
        let ended = match &mut self.dialect {
            Dialect::Chat(c) => c.on_event(ev, kept),
            Dialect::Messages(m) => m.on_event(ev, kept),
        };
        if self.kept > self.max_bytes {
            self.failed = true;
            return;
        }
        match ended {
            Ok(true) => self.done = true,
            Ok(false) => {}
            Err(()) => self.failed = true,
        }
    }

    /// The assembled JSON, when the stream completed without an error.
    pub fn finish(self) -> Option<Vec<u8>> {
        if !self.done || self.failed {
            return None;
        }
        let v = match self.dialect {
            Dialect::Chat(c) => c.finish(),
            Dialect::Messages(m) => m.finish()?,
        };
        serde_json::to_vec(&v).ok()
    }
}

/// The item of `list` with this index (choices and tool calls come by index, in any order), added
/// when it is not there yet.
fn by_index<T>(
    list: &mut Vec<T>,
    index: u64,
    of: impl Fn(&T) -> u64,
    new: impl FnOnce() -> T,
) -> Option<&mut T> {
    let pos = match list.iter().position(|x| of(x) == index) {
        Some(p) => p,
        None => {
            list.push(new());
            list.len() - 1
        }
    };
    list.get_mut(pos)
}

fn append(slot: &mut Option<String>, more: &str) {
    slot.get_or_insert_with(String::new).push_str(more);
}

#[derive(Debug, Default)]
struct Chat {
    /// Members of the chunks that a completion also carries: id, created, model, ...
    head: Map<String, Value>,
    choices: Vec<Choice>,
    usage: Option<Value>,
}

#[derive(Debug, Default)]
struct Choice {
    index: u64,
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Vec<ToolCall>,
    function_call: Option<(Option<String>, String)>,
    logprobs: Option<Vec<Value>>,
    finish_reason: Option<Value>,
}

#[derive(Debug, Default)]
struct ToolCall {
    index: u64,
    id: Option<Value>,
    kind: Option<Value>,
    name: String,
    arguments: String,
}

impl Chat {
    /// Ok(true) at `[DONE]`; Err for an error event or a chunk that is not one. Adds what it kept
    /// to `kept`: the text of the deltas, or the whole chunk when it carries more (usage,
    /// log probabilities).
    fn on_event(&mut self, ev: &SseEvent<'_>, kept: &mut usize) -> Result<bool, ()> {
        if ev.data.trim() == "[DONE]" {
            return Ok(true);
        }
        let Ok(Value::Object(mut chunk)) = serde_json::from_str::<Value>(ev.data) else {
            return Err(());
        };
        if chunk.contains_key("error") {
            return Err(());
        }
        for k in [
            "id",
            "created",
            "model",
            "system_fingerprint",
            "service_tier",
        ] {
            if let Some(v) = chunk.remove(k).filter(|v| !v.is_null()) {
                self.head.insert(k.to_string(), v);
            }
        }
        if let Some(u) = chunk.remove("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u);
            *kept += ev.data.len();
        }
        let Some(Value::Array(choices)) = chunk.remove("choices") else {
            return Ok(false);
        };
        for c in choices {
            *kept += self.on_choice(c, ev.data.len());
        }
        Ok(false)
    }

    /// Takes one choice's delta; returns how many bytes it kept (`chunk_len`, the whole chunk's,
    /// when it carries log probabilities).
    fn on_choice(&mut self, c: Value, chunk_len: usize) -> usize {
        let mut kept = 0;
        let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
        let new = || Choice {
            index,
            ..Choice::default()
        };
        let Some(choice) = by_index(&mut self.choices, index, |c| c.index, new) else {
            return kept;
        };
        if let Some(f) = c.get("finish_reason").filter(|f| !f.is_null()) {
            choice.finish_reason = Some(f.clone());
        }
        if let Some(content) = c
            .get("logprobs")
            .and_then(|l| l.get("content"))
            .and_then(Value::as_array)
        {
            choice
                .logprobs
                .get_or_insert_with(Vec::new)
                .extend(content.iter().cloned());
            kept += chunk_len;
        }
        let Some(delta) = c.get("delta") else {
            return kept;
        };
        if let Some(r) = delta.get("role").and_then(Value::as_str) {
            choice.role = Some(r.to_string());
        }
        if let Some(t) = delta.get("content").and_then(Value::as_str) {
            append(&mut choice.content, t);
            kept += t.len();
        }
        if let Some(t) = delta.get("refusal").and_then(Value::as_str) {
            append(&mut choice.refusal, t);
            kept += t.len();
        }
        if let Some(f) = delta.get("function_call") {
            let call = choice
                .function_call
                .get_or_insert_with(|| (None, String::new()));
            if let Some(n) = f.get("name").and_then(Value::as_str) {
                call.0 = Some(n.to_string());
            }
            if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                call.1.push_str(a);
                kept += a.len();
            }
        }
        for (k, t) in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let index = t.get("index").and_then(Value::as_u64).unwrap_or(k as u64);
            let new = || ToolCall {
                index,
                ..ToolCall::default()
            };
            let Some(call) = by_index(&mut choice.tool_calls, index, |t| t.index, new) else {
                continue;
            };
            if let Some(id) = t.get("id").filter(|v| !v.is_null()) {
                call.id = Some(id.clone());
            }
            if let Some(kind) = t.get("type").filter(|v| !v.is_null()) {
                call.kind = Some(kind.clone());
            }
            if let Some(f) = t.get("function") {
                if let Some(n) = f.get("name").and_then(Value::as_str) {
                    call.name.push_str(n);
                }
                if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                    call.arguments.push_str(a);
                    kept += a.len();
                }
            }
            // Its id and name.
            kept += 64;
        }
        kept
    }

    fn finish(mut self) -> Value {
        self.choices.sort_by_key(|c| c.index);
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|c| {
                let mut message = Map::new();
                message.insert(
                    "role".into(),
                    json!(c.role.as_deref().unwrap_or("assistant")),
                );
                message.insert("content".into(), json!(c.content));
                message.insert("refusal".into(), json!(c.refusal));
                if !c.tool_calls.is_empty() {
                    let mut calls = c.tool_calls;
                    calls.sort_by_key(|t| t.index);
                    let calls: Vec<Value> = calls
                        .into_iter()
                        .map(|t| {
                            json!({"id": t.id.unwrap_or(Value::Null),
                                   "type": t.kind.unwrap_or_else(|| json!("function")),
                                   "function": {"name": t.name, "arguments": t.arguments}})
                        })
                        .collect();
                    message.insert("tool_calls".into(), Value::Array(calls));
                }
                if let Some((name, arguments)) = c.function_call {
                    message.insert(
                        "function_call".into(),
                        json!({"name": name.unwrap_or_default(), "arguments": arguments}),
                    );
                }
                json!({"index": c.index, "message": message,
                       "logprobs": c.logprobs.map(|content| json!({"content": content})),
                       "finish_reason": c.finish_reason})
            })
            .collect();
        let mut out = self.head;
        out.insert("object".into(), json!("chat.completion"));
        out.insert("choices".into(), Value::Array(choices));
        if let Some(u) = self.usage {
            out.insert("usage".into(), u);
        }
        Value::Object(out)
    }
}

#[derive(Debug, Default)]
struct Messages {
    message: Option<Map<String, Value>>,
    /// Content blocks by their index, with the partial JSON of a tool's input as it came.
    blocks: Vec<(u64, Map<String, Value>, String)>,
}

impl Messages {
    /// Ok(true) at `message_stop`; Err for an error event or an event that is not one. Adds what
    /// it kept to `kept`: a delta's text, or the whole event.
    fn on_event(&mut self, ev: &SseEvent<'_>, kept: &mut usize) -> Result<bool, ()> {
        let Ok(Value::Object(mut v)) = serde_json::from_str::<Value>(ev.data) else {
            return Err(());
        };
        let kind = match v.get("type").and_then(Value::as_str) {
            Some(k) => k.to_string(),
            None => ev.event.to_string(),
        };
        let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
        let mut weight = ev.data.len();
        match kind.as_str() {
            "message_start" => match v.remove("message") {
                Some(Value::Object(m)) => self.message = Some(m),
                _ => return Err(()),
            },
            "content_block_start" => match v.remove("content_block") {
                Some(Value::Object(b)) => self.blocks.push((index, b, String::new())),
                _ => return Err(()),
            },
            "content_block_delta" => {
                let Some((_, block, partial)) = self.blocks.iter_mut().find(|b| b.0 == index)
                else {
                    return Err(());
                };
                let delta = v.get("delta").cloned().unwrap_or(Value::Null);
                let text = |k: &str| delta.get(k).and_then(Value::as_str).unwrap_or_default();
                match delta
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                {
                    "text_delta" => {
                        weight = text("text").len();
                        push_str(block, "text", text("text"));
                    }
                    "thinking_delta" => {
                        weight = text("thinking").len();
                        push_str(block, "thinking", text("thinking"));
                    }
                    "signature_delta" => {
                        block.insert("signature".into(), json!(text("signature")));
                    }
                    "input_json_delta" => {
                        weight = text("partial_json").len();
                        partial.push_str(text("partial_json"));
                    }
                    "citations_delta" => {
                        let c = delta.get("citation").cloned().unwrap_or(Value::Null);
                        match block.get_mut("citations") {
                            Some(Value::Array(list)) => list.push(c),
                            _ => {
                                block.insert("citations".into(), json!([c]));
                            }
                        }
                    }
                    _ => {}
                }
            }
            "content_block_stop" => {
                if let Some((_, block, partial)) = self.blocks.iter_mut().find(|b| b.0 == index) {
                    if !partial.is_empty() {
                        let input = serde_json::from_str::<Value>(partial).map_err(|_| ())?;
                        block.insert("input".into(), input);
                        partial.clear();
                    }
                }
            }
            "message_delta" => {
                let Some(m) = self.message.as_mut() else {
                    return Err(());
                };
                if let Some(Value::Object(d)) = v.remove("delta") {
                    for (k, val) in d {
                        m.insert(k, val);
                    }
                }
                if let Some(Value::Object(u)) = v.remove("usage") {
                    let usage = m.entry("usage").or_insert_with(|| json!({}));
                    if let Value::Object(into) = usage {
                        for (k, val) in u.into_iter().filter(|(_, val)| !val.is_null()) {
                            into.insert(k, val);
                        }
                    }
                }
            }
            "message_stop" => return Ok(true),
            "error" => return Err(()),
            // ping, and event types added later.
            _ => {}
        }
        *kept += weight;
        Ok(false)
    }

    fn finish(mut self) -> Option<Value> {
        let mut message = self.message?;
        self.blocks.sort_by_key(|b| b.0);
        let content: Vec<Value> = self
            .blocks
            .into_iter()
            .map(|(_, b, _)| Value::Object(b))
            .collect();
        message.insert("content".into(), Value::Array(content));
        Some(Value::Object(message))
    }
}

fn push_str(block: &mut Map<String, Value>, key: &str, more: &str) {
    match block.get_mut(key) {
        Some(Value::String(s)) => s.push_str(more),
        _ => {
            block.insert(key.into(), json!(more));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::count::sse::SseParser;

    pub(crate) fn assemble(anthropic: bool, stream: &[u8]) -> Option<Value> {
        let mut a = Assembler::new(anthropic, 1 << 20);
        let mut p = SseParser::new(1 << 20);
        p.feed(stream, |ev| a.on_event(&ev));
        p.finish(|ev| a.on_event(&ev));
        a.finish()
            .map(|b| serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn openai_chunks_become_a_chat_completion() {
        let v = assemble(false, &fixture("openai_stream.sse")).unwrap();
        assert_eq!(v["object"], "chat.completion");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!text.is_empty());
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(v["usage"]["prompt_tokens"].as_u64().is_some(), "{v}");
        assert!(v["id"].as_str().is_some_and(|s| s.starts_with("chatcmpl")));
    }

    #[test]
    fn openai_tool_call_pieces_are_joined() {
        let v = assemble(false, &fixture("openai_stream_tools.sse")).unwrap();
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert!(call["id"].as_str().is_some());
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(args.is_object(), "{args}");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn anthropic_events_become_a_message() {
        let v = assemble(true, &fixture("anthropic_stream.sse")).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["content"][0]["type"], "text");
        assert!(!v["content"][0]["text"].as_str().unwrap().is_empty());
        assert!(v["stop_reason"].as_str().is_some());
        assert!(v["usage"]["output_tokens"].as_u64().unwrap() > 1, "{v}");
        let v = assemble(true, &fixture("anthropic_stream_tools.sse")).unwrap();
        let tool = v["content"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["type"] == "tool_use")
            .unwrap();
        assert!(
            tool["input"].is_object() && tool["input"] != json!({}),
            "{tool}"
        );
    }

    #[test]
    fn a_cut_or_failed_stream_gives_nothing() {
        let whole = fixture("openai_stream.sse");
        let cut = &whole[..whole.len() - 20];
        assert!(assemble(false, cut).is_none());
        let mut failed = b"data: {\"error\":{\"message\":\"boom\"}}\n\n".to_vec();
        failed.extend_from_slice(&whole);
        assert!(assemble(false, &failed).is_none());
        let whole = fixture("anthropic_stream.sse");
        let stop = whole
            .windows(12)
            .position(|w| w == b"message_stop")
            .unwrap();
        assert!(assemble(true, &whole[..stop]).is_none());
        let mut errored = whole[..stop].to_vec();
        errored.extend_from_slice(
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n",
        );
        errored.extend_from_slice(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        assert!(assemble(true, &errored).is_none());
    }

    #[test]
    fn a_stream_larger_than_the_bound_is_given_up() {
        let whole = fixture("openai_stream.sse");
        let mut a = Assembler::new(false, 100);
        let mut p = SseParser::new(1 << 20);
        p.feed(&whole, |ev| a.on_event(&ev));
        assert!(a.finish().is_none());
    }
}
