//! Provider-reported token usage from JSON responses and SSE streams (OpenAI chat/completions/
//! embeddings/responses, Azure OpenAI, Anthropic messages, OpenAI-compatible servers).
//!
//! Parsing goes through small typed structs that skip unknown fields, and streamed text is only
//! measured (chars and a token estimate), never copied.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::estimate;
use crate::sse::SseEvent;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// All prompt tokens billed: OpenAI prompt_tokens/input_tokens; Anthropic
    /// input_tokens + cache_creation_input_tokens + cache_read_input_tokens.
    pub input: u64,
    /// completion_tokens / output_tokens (reasoning included, as billed).
    pub output: u64,
    /// OpenAI prompt_tokens_details.cached_tokens / input_tokens_details.cached_tokens;
    /// Anthropic cache_read_input_tokens.
    pub cache_read: u64,
    /// Anthropic cache_creation_input_tokens.
    pub cache_write: u64,
    /// OpenAI completion_tokens_details.reasoning_tokens / output_tokens_details.reasoning_tokens.
    pub reasoning: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    /// Anthropic `/v1/messages`.
    Messages,
    Other,
}

impl ApiKind {
    /// Classifies a request path by its last segments, so any prefix works: `/v1/chat/completions`,
    /// `/chat/completions`, Azure's `/openai/deployments/{d}/chat/completions?api-version=..`.
    /// Sub-resources (`/v1/responses/{id}`, `/v1/messages/count_tokens`, Assistants'
    /// `/v1/threads/{id}/messages`) are `Other`.
    pub fn from_path(path: &str) -> ApiKind {
        let path = path
            .split(['?', '#'])
            .next()
            .unwrap_or_default()
            .trim_end_matches('/');
        let mut segments = path.rsplit('/');
        let last = segments.next().unwrap_or_default();
        let prev = segments.next().unwrap_or_default();
        match (prev, last) {
            ("chat", "completions") => ApiKind::ChatCompletions,
            (_, "completions") => ApiKind::Completions,
            (_, "embeddings") => ApiKind::Embeddings,
            (_, "responses") => ApiKind::Responses,
            (_, "messages") if segments.next() != Some("threads") => ApiKind::Messages,
            _ => ApiKind::Other,
        }
    }
}

/// Usage from a complete non-streaming JSON response body; None when absent/null/unparseable.
/// Accepts OpenAI and Anthropic field names; a usage object with neither an input nor an output
/// count is treated as absent.
pub fn usage_from_json(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Body {
        usage: Option<RawUsage>,
    }
    let usage = serde_json::from_slice::<Body>(body).ok()?.usage?;
    Counts::from(&usage).usage()
}

/// Accumulates usage and streamed text from SSE events of any of the supported APIs.
#[derive(Debug, Default, Clone)]
pub struct StreamUsage {
    counts: Counts,
    text: Text,
}

impl StreamUsage {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn on_event(&mut self, ev: &SseEvent<'_>) {
        if ev.data.is_empty() || ev.data == "[DONE]" {
            return;
        }
        let chunk = match serde_json::from_str::<Chunk<'_>>(ev.data) {
            Ok(chunk) => chunk,
            Err(e) => {
                log::debug!("usage: skipping a non-JSON SSE event ({e})");
                return;
            }
        };
        // Anthropic message_start: its output_tokens is a placeholder, output comes later.
        if let Some(usage) = chunk.message.and_then(|m| m.usage) {
            self.counts.merge(Counts {
                output: None,
                ..Counts::from(&usage)
            });
        }
        // Reported usage is cumulative everywhere (OpenAI final chunk, Anthropic message_delta,
        // Responses `response.completed`): the latest value wins.
        for usage in [chunk.usage, chunk.response.and_then(|r| r.usage)]
            .iter()
            .flatten()
        {
            self.counts.merge(Counts::from(usage));
        }
        if let Some(choices) = chunk.choices {
            self.text = self.text.plus(choices.text);
        }
        // Top-level `delta`: Anthropic content_block_delta (object) or Responses `*.delta` (string);
        // audio deltas are base64, not text.
        if let Some(delta) = chunk.delta {
            if !chunk.kind.is_some_and(|k| k.contains("audio")) {
                self.text = self.text.plus(delta);
            }
        }
        if let Some(block) = chunk.content_block {
            self.text = self.text.plus(block);
        }
    }

    /// Provider-reported usage if the stream carried it (OpenAI final usage chunk; Anthropic
    /// message_start input + message_delta cumulative output; Responses API `response.completed`).
    pub fn usage(&self) -> Option<Usage> {
        self.counts.usage()
    }

    /// Whether the provider reported output tokens. False for a stream cut before Anthropic's
    /// message_delta: `usage()` then has the input but 0 output, and the caller should estimate.
    pub fn output_reported(&self) -> bool {
        self.counts.output.is_some()
    }

    /// Characters of generated text seen (content, refusal and reasoning deltas, tool-call names and
    /// argument deltas), for an estimate.
    pub fn text_chars(&self) -> u64 {
        self.text.chars
    }

    /// [`estimate::text_tokens`] summed over the same deltas: better than
    /// [`estimate::chars_to_tokens`] for non-English text.
    pub fn estimated_output_tokens(&self) -> u64 {
        self.text.tokens
    }

    /// True when this event is an OpenAI chat chunk that carries usage and no choices (`"choices":[]`)
    /// — the extra chunk that `stream_options.include_usage` adds. Cheap check usable per event.
    pub fn is_usage_only_chunk(ev: &SseEvent<'_>) -> bool {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Probe {
            // IgnoredAny is zero-sized: this Vec never allocates.
            choices: Option<Vec<IgnoredAny>>,
            usage: Option<IgnoredAny>,
        }
        // Ordinary chunks (which carry `"usage":null` when usage was asked for) are ruled out
        // without parsing: only the usage chunk has an empty `choices` array.
        let empty_choices = ev.data.match_indices("\"choices\"").any(|(i, m)| {
            let mut rest = ev.data.get(i + m.len()..).unwrap_or("").trim_start();
            rest = rest.strip_prefix(':').unwrap_or("").trim_start();
            rest.strip_prefix('[')
                .is_some_and(|r| r.trim_start().starts_with(']'))
        });
        if !(empty_choices && ev.data.contains("\"usage\"")) {
            return false;
        }
        matches!(
            serde_json::from_str::<Probe>(ev.data),
            Ok(Probe { choices: Some(choices), usage: Some(_) }) if choices.is_empty()
        )
    }
}

/// The last reported value of every usage field, kept apart because providers count differently.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    /// OpenAI chat/completions/embeddings: includes cached tokens.
    prompt: Option<u64>,
    /// Responses API (includes cached tokens) or Anthropic (excludes cache reads and writes).
    input: Option<u64>,
    output: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
    cached: Option<u64>,
    reasoning: Option<u64>,
}

impl Counts {
    fn merge(&mut self, new: Counts) {
        for (old, new) in [
            (&mut self.prompt, new.prompt),
            (&mut self.input, new.input),
            (&mut self.output, new.output),
            (&mut self.cache_creation, new.cache_creation),
            (&mut self.cache_read, new.cache_read),
            (&mut self.cached, new.cached),
            (&mut self.reasoning, new.reasoning),
        ] {
            if new.is_some() {
                *old = new;
            }
        }
    }

    fn usage(&self) -> Option<Usage> {
        if self.prompt.is_none() && self.input.is_none() && self.output.is_none() {
            return None;
        }
        let cache_write = self.cache_creation.unwrap_or(0);
        let input = match self.prompt {
            Some(prompt) => prompt,
            // Anthropic's cache fields are additive; OpenAI-style bodies never carry them with
            // `input_tokens`, so adding them is right for the Responses API too.
            None => self
                .input
                .unwrap_or(0)
                .saturating_add(cache_write)
                .saturating_add(self.cache_read.unwrap_or(0)),
        };
        Some(Usage {
            input,
            output: self.output.unwrap_or(0),
            cache_read: self.cache_read.or(self.cached).unwrap_or(0),
            cache_write,
            reasoning: self.reasoning.unwrap_or(0),
        })
    }
}

impl From<&RawUsage> for Counts {
    fn from(u: &RawUsage) -> Self {
        let details = |d: &Option<Details>, f: fn(&Details) -> Option<u64>| d.as_ref().and_then(f);
        Counts {
            prompt: u.prompt_tokens,
            input: u.input_tokens,
            output: u.completion_tokens.or(u.output_tokens),
            cache_creation: u.cache_creation_input_tokens,
            cache_read: u.cache_read_input_tokens,
            cached: details(&u.prompt_tokens_details, |d| d.cached_tokens)
                .or(details(&u.input_tokens_details, |d| d.cached_tokens)),
            reasoning: details(&u.completion_tokens_details, |d| d.reasoning_tokens)
                .or(details(&u.output_tokens_details, |d| d.reasoning_tokens)),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawUsage {
    #[serde(deserialize_with = "count")]
    prompt_tokens: Option<u64>,
    #[serde(deserialize_with = "count")]
    completion_tokens: Option<u64>,
    #[serde(deserialize_with = "count")]
    input_tokens: Option<u64>,
    #[serde(deserialize_with = "count")]
    output_tokens: Option<u64>,
    #[serde(deserialize_with = "count")]
    cache_creation_input_tokens: Option<u64>,
    #[serde(deserialize_with = "count")]
    cache_read_input_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct Details {
    #[serde(deserialize_with = "count")]
    cached_tokens: Option<u64>,
    #[serde(deserialize_with = "count")]
    reasoning_tokens: Option<u64>,
}

/// A token count from an untrusted provider: non-negative integers (or integral floats some
/// OpenAI-compatible servers send); anything else counts as absent instead of failing the parse.
fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct CountVisitor;
    impl<'de> Visitor<'de> for CountVisitor {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a token count")
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(u64::try_from(v).ok())
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            // `as` saturates; NaN becomes 0.
            Ok((v >= 0.0).then_some(v as u64))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            IgnoredAny.visit_seq(seq).map(|_| None)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            IgnoredAny.visit_map(map).map(|_| None)
        }
    }
    d.deserialize_any(CountVisitor)
}

/// One streamed JSON event of any supported API; every field is optional.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Chunk<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    choices: Option<Items<Choice>>,
    usage: Option<RawUsage>,
    /// Anthropic message_start.
    message: Option<WithUsage>,
    /// Responses API lifecycle events.
    response: Option<WithUsage>,
    delta: Option<Text>,
    /// Anthropic content_block_start: a tool_use block's name is generated output too.
    content_block: Option<Text>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WithUsage {
    usage: Option<RawUsage>,
}

/// OpenAI chat chunk choice (`delta`) or legacy completions choice (`text`).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Choice {
    delta: Option<ChatDelta>,
    text: Option<Text>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChatDelta {
    content: Option<Text>,
    refusal: Option<Text>,
    /// DeepSeek, vLLM and other OpenAI-compatible servers stream reasoning here.
    reasoning_content: Option<Text>,
    reasoning: Option<Text>,
    tool_calls: Option<Items<ToolCall>>,
    function_call: Option<FunctionDelta>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ToolCall {
    function: Option<FunctionDelta>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FunctionDelta {
    name: Option<Text>,
    arguments: Option<Text>,
}

/// Anthropic content_block_start `content_block` and content_block_delta `delta` (text_delta,
/// input_json_delta, thinking_delta; signature_delta is not text).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Block {
    text: Option<Text>,
    partial_json: Option<Text>,
    thinking: Option<Text>,
    name: Option<Text>,
}

trait HasText {
    fn text(&self) -> Text;
}

fn sum(parts: &[Option<Text>]) -> Text {
    parts
        .iter()
        .flatten()
        .fold(Text::default(), |acc, t| acc.plus(*t))
}

impl HasText for Choice {
    fn text(&self) -> Text {
        let delta = self.delta.as_ref().map(|d| d.text());
        sum(&[delta, self.text])
    }
}

impl HasText for ChatDelta {
    fn text(&self) -> Text {
        let tools = self.tool_calls.as_ref().map(|t| t.text);
        let function = self.function_call.as_ref().map(|f| f.text());
        sum(&[
            self.content,
            self.refusal,
            self.reasoning_content,
            self.reasoning,
            tools,
            function,
        ])
    }
}

impl HasText for ToolCall {
    fn text(&self) -> Text {
        self.function.as_ref().map(|f| f.text()).unwrap_or_default()
    }
}

impl HasText for FunctionDelta {
    fn text(&self) -> Text {
        sum(&[self.name, self.arguments])
    }
}

/// Size of generated text, measured while deserializing so the text itself is never stored.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Text {
    chars: u64,
    tokens: u64,
}

impl Text {
    fn of(s: &str) -> Self {
        Text {
            chars: s.chars().count() as u64,
            tokens: estimate::text_tokens(s),
        }
    }

    fn plus(self, other: Text) -> Text {
        Text {
            chars: self.chars.saturating_add(other.chars),
            tokens: self.tokens.saturating_add(other.tokens),
        }
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("text or a content delta")
            }
            fn visit_str<E>(self, s: &str) -> Result<Text, E> {
                Ok(Text::of(s))
            }
            fn visit_unit<E>(self) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                let mut total = Text::default();
                while let Some(t) = seq.next_element::<Text>()? {
                    total = total.plus(t);
                }
                Ok(total)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Text, A::Error> {
                let block = Block::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(sum(&[
                    block.text,
                    block.partial_json,
                    block.thinking,
                    block.name,
                ]))
            }
        }
        d.deserialize_any(TextVisitor)
    }
}

/// A JSON array folded into its elements' text, without allocating a Vec.
struct Items<T> {
    text: Text,
    _item: PhantomData<T>,
}

impl<'de, T: Deserialize<'de> + HasText> Deserialize<'de> for Items<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ItemsVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + HasText> Visitor<'de> for ItemsVisitor<T> {
            type Value = Items<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items<T>, A::Error> {
                let mut text = Text::default();
                while let Some(item) = seq.next_element::<T>()? {
                    text = text.plus(item.text());
                }
                Ok(Items {
                    text,
                    _item: PhantomData,
                })
            }
        }
        d.deserialize_seq(ItemsVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::SseParser;

    fn u(input: u64, output: u64, cache_read: u64, cache_write: u64, reasoning: u64) -> Usage {
        Usage {
            input,
            output,
            cache_read,
            cache_write,
            reasoning,
        }
    }

    fn data(data: &str) -> SseEvent<'_> {
        SseEvent {
            event: "",
            data,
            raw: b"",
        }
    }

    /// Runs a recorded stream through the SSE parser; also returns how many usage-only chunks it saw.
    fn stream(input: &[u8]) -> (StreamUsage, usize) {
        let mut parser = SseParser::new(1 << 20);
        let mut usage = StreamUsage::new();
        let mut usage_only = 0;
        let mut on = |ev: SseEvent<'_>| {
            usage_only += usize::from(StreamUsage::is_usage_only_chunk(&ev));
            usage.on_event(&ev);
        };
        for chunk in input.chunks(64) {
            parser.feed(chunk, &mut on);
        }
        parser.finish(&mut on);
        (usage, usage_only)
    }

    #[test]
    fn json_fixtures() {
        let cases: [(&[u8], Usage); 8] = [
            (
                include_bytes!("../tests/fixtures/openai_chat.json"),
                u(24, 8, 0, 0, 0),
            ),
            (
                include_bytes!("../tests/fixtures/openai_chat_tools.json"),
                u(97, 56, 0, 0, 0),
            ),
            (
                include_bytes!("../tests/fixtures/openai_chat_cached.json"),
                u(2006, 300, 1920, 0, 256),
            ),
            (
                include_bytes!("../tests/fixtures/openai_embeddings.json"),
                u(13, 0, 0, 0, 0),
            ),
            (
                include_bytes!("../tests/fixtures/openai_completions.json"),
                u(5, 12, 0, 0, 0),
            ),
            (
                include_bytes!("../tests/fixtures/openai_responses.json"),
                u(1320, 412, 1152, 0, 384),
            ),
            (
                include_bytes!("../tests/fixtures/anthropic_message.json"),
                u(14, 23, 0, 0, 0),
            ),
            (
                include_bytes!("../tests/fixtures/anthropic_message_cache.json"),
                u(12 + 1854 + 3310, 205, 3310, 1854, 0),
            ),
        ];
        for (i, (body, want)) in cases.iter().enumerate() {
            assert_eq!(usage_from_json(body), Some(*want), "case {i}");
        }
    }

    #[test]
    fn stream_fixtures() {
        let cases: [(&[u8], Usage, u64, usize); 5] = [
            (
                include_bytes!("../tests/fixtures/openai_stream.sse"),
                u(19, 9, 0, 0, 0),
                32,
                1,
            ),
            // Tool name "get_weather" (11) + arguments {"location":"Paris, France","unit":"celsius"} (45).
            (
                include_bytes!("../tests/fixtures/openai_stream_tools.sse"),
                u(83, 22, 0, 0, 0),
                56,
                1,
            ),
            (
                include_bytes!("../tests/fixtures/openai_responses_stream.sse"),
                u(1342, 18, 1152, 0, 0),
                76,
                0,
            ),
            (
                include_bytes!("../tests/fixtures/anthropic_stream.sse"),
                u(21 + 2048, 41, 2048, 0, 0),
                167,
                0,
            ),
            // Thinking (110) + text (56) + tool name (11) + input JSON (53).
            (
                include_bytes!("../tests/fixtures/anthropic_stream_tools.sse"),
                u(472, 118, 0, 0, 0),
                230,
                0,
            ),
        ];
        for (i, (input, want, chars, usage_only)) in cases.iter().enumerate() {
            let (s, n) = stream(input);
            assert_eq!(s.usage(), Some(*want), "case {i}");
            assert!(s.output_reported(), "case {i}");
            assert_eq!(s.text_chars(), *chars, "case {i}");
            assert_eq!(n, *usage_only, "case {i}");
        }
        // OpenAI streams one token per delta, and the per-delta estimate sees exactly that.
        let (s, _) = stream(include_bytes!("../tests/fixtures/openai_stream.sse"));
        assert_eq!(s.estimated_output_tokens(), 9);
    }

    #[test]
    fn anthropic_stream_semantics() {
        let mut s = StreamUsage::new();
        s.on_event(&data(
            r#"{"type":"message_start","message":{"usage":{"input_tokens":30,"cache_creation_input_tokens":100,"output_tokens":1}}}"#,
        ));
        // Cut before message_delta: input known, output not reported (placeholder ignored).
        assert_eq!(s.usage(), Some(u(130, 0, 0, 100, 0)));
        assert!(!s.output_reported());
        s.on_event(&data(
            r#"{"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":10}}"#,
        ));
        s.on_event(&data(r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":25}}"#));
        assert_eq!(s.usage(), Some(u(130, 25, 0, 100, 0)));
        // A message_delta that restates input fields replaces them.
        s.on_event(&data(r#"{"type":"message_delta","usage":{"input_tokens":35,"cache_read_input_tokens":7,"output_tokens":26}}"#));
        assert_eq!(s.usage(), Some(u(142, 26, 7, 100, 0)));
        assert_eq!(s.text_chars(), 0);
    }

    #[test]
    fn stream_text_sources() {
        let mut s = StreamUsage::new();
        for ev in [
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"abc"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"de","function_call":{"name":"f","arguments":"{}"}}}]}"#,
            r#"{"choices":[{"index":0,"text":"fgh"},{"index":1,"text":"ij"}]}"#,
            r#"{"type":"response.output_text.delta","delta":"kl"}"#,
            r#"{"type":"response.audio.delta","delta":"UklGRiQAAABXQVZF"}"#,
            r#"{"type":"content_block_delta","delta":{"type":"signature_delta","signature":"EqQBCkgI"}}"#,
            r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"\u00e9\n"}}"#,
            "[DONE]",
            "not json",
            "",
        ] {
            s.on_event(&data(ev));
        }
        assert_eq!(s.text_chars(), 3 + 2 + 1 + 2 + 3 + 2 + 2 + 2);
        assert_eq!(s.usage(), None);
    }

    #[test]
    fn absent_null_or_broken_usage() {
        for body in [
            &br#"{"id":"x","choices":[]}"#[..],
            br#"{"usage":null}"#,
            br#"{"usage":{}}"#,
            br#"{"usage":{"total_tokens":12}}"#,
            br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
            br#"{"usage":{"prompt_tokens":3"#,
            b"[1,2]",
            b"",
            b"\xff\xfe",
        ] {
            assert_eq!(usage_from_json(body), None, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn lenient_and_saturating_counts() {
        let body = br#"{"usage":{"prompt_tokens":10.0,"completion_tokens":-3,"total_tokens":"x","prompt_tokens_details":null}}"#;
        assert_eq!(usage_from_json(body), Some(u(10, 0, 0, 0, 0)));
        let body = br#"{"usage":{"input_tokens":18446744073709551615,"cache_read_input_tokens":5,"output_tokens":1e30}}"#;
        assert_eq!(usage_from_json(body), Some(u(u64::MAX, u64::MAX, 5, 0, 0)));
        // OpenAI-style prompt_tokens already include cached tokens: Anthropic-style extras a
        // compatible proxy adds are not summed again.
        let body = br#"{"usage":{"prompt_tokens":100,"completion_tokens":5,"cache_read_input_tokens":80,"cache_creation_input_tokens":20}}"#;
        assert_eq!(usage_from_json(body), Some(u(100, 5, 80, 20, 0)));
    }

    #[test]
    fn usage_only_chunk_detection() {
        let yes = r#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
        assert!(StreamUsage::is_usage_only_chunk(&data(yes)));
        assert!(StreamUsage::is_usage_only_chunk(&data(
            r#"{"choices": [ ], "usage": {"prompt_tokens": 1}}"#
        )));
        for no in [
            r#"{"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}"#,
            r#"{"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":[],"usage":null}"#,
            r#"{"choices":[],"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}"#,
            r#"{"type":"message_delta","usage":{"output_tokens":3}}"#,
            r#"{"choices":[],"usage":{"#,
            "[DONE]",
        ] {
            assert!(!StreamUsage::is_usage_only_chunk(&data(no)), "{no}");
        }
    }

    #[test]
    fn api_kind_from_path() {
        use ApiKind::*;
        for (path, kind) in [
            ("/v1/chat/completions", ChatCompletions),
            ("/chat/completions", ChatCompletions),
            (
                "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                ChatCompletions,
            ),
            ("/v1/chat/completions/", ChatCompletions),
            ("/v1/completions", Completions),
            (
                "/openai/deployments/instruct/completions?api-version=2024-10-21",
                Completions,
            ),
            ("/v1/embeddings", Embeddings),
            ("/embeddings?x=1", Embeddings),
            ("/v1/responses", Responses),
            ("/openai/v1/responses?api-version=preview", Responses),
            ("/v1/messages", Messages),
            ("/messages", Messages),
            ("/v1/messages/count_tokens", Other),
            ("/v1/threads/thread_abc/messages", Other),
            ("/v1/responses/resp_123", Other),
            ("/v1/chat/completions/chatcmpl-1", Other),
            ("/v1/models", Other),
            ("", Other),
            ("/", Other),
        ] {
            assert_eq!(ApiKind::from_path(path), kind, "{path}");
        }
    }
}
