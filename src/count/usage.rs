//! Provider-reported token usage from JSON responses and SSE streams (OpenAI chat/completions/
//! embeddings/responses, Azure OpenAI, Anthropic messages, OpenAI-compatible servers).
//!
//! Bodies and events are read by serde into typed structs that keep only what matters: counts, and
//! streamed text measured as it is read (chars and a token estimate), never kept. No tree of an event
//! is built: members not named are skipped (serde's `IgnoredAny`), and text is measured by visitors
//! that borrow it from the event or serde_json's scratch buffer. Hand-written code is left to the
//! substring pre-checks that spare a parse (`"usage"`, a trailing `"usage":null`, an empty
//! `choices`).
//!
//! Semantics a provider's quirks call for: counts are lenient (non-integers, negatives and strings
//! count as absent, integral floats are read, huge ones saturate), while a member of the wrong shape
//! fails the whole event, as it fails serde. A key repeated in an event fails it too (serde's derive
//! refuses duplicate fields); no provider sends one.

use std::fmt;
use std::marker::PhantomData;
use std::sync::LazyLock;

use memchr::memmem;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize as Derive;
use serde_json::value::RawValue;

use crate::api::splice;
use crate::count::estimate;
use crate::count::sse::{RawEvent, SseEvent};

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
        let path = crate::api::path_only(path).trim_end_matches('/');
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
    /// Only `usage` is read, in the same pass that checks the completion around it as JSON (its
    /// strings skipped, not copied nor checked for UTF-8).
    #[derive(Derive)]
    struct Answer {
        usage: Option<UsageObject>,
    }
    // An answer is an object; serde would also take a struct written as an array.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    answer.usage?.counts().usage()
}

/// Accumulates usage and streamed text from SSE events of any of the supported APIs.
#[derive(Debug, Default, Clone)]
pub struct StreamUsage {
    counts: Counts,
    text: Text,
    /// Chunks of a forced-usage stream passed without parsing (see `on_event_for_client`): about
    /// one generated token each, for the estimate if the stream never reports usage.
    unparsed_chunks: u64,
}

impl StreamUsage {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn on_event(&mut self, ev: &SseEvent<'_>) {
        self.take(ev);
    }

    /// [`Self::on_event`], returning what [`Self::is_usage_only_chunk`] would for the event, from
    /// the same parse.
    pub fn on_event_is_usage_only(&mut self, ev: &SseEvent<'_>) -> bool {
        self.take(ev).is_some_and(|chunk| chunk.usage_only(ev.data))
    }

    /// For a stream whose usage tollgate asked for and the client did not: [`Self::on_event`], and
    /// what the client gets of the event, from one parse: nothing for the usage-only chunk, the
    /// event as is otherwise. Its `"usage":null` stays: OpenAI itself sends one in every chunk when
    /// usage is asked for, and the SDKs read it as no usage; cutting it cost a write of every chunk.
    ///
    /// Most chunks of such a stream are not parsed at all: one that does not name `usage`, or
    /// whose only usage is a `"usage":null` as the object's last member (OpenAI's layout), cannot
    /// carry usage, and is passed as is. Their text is then not counted:
    /// should the stream end without usage (cut short), each counts as one token, as OpenAI streams
    /// about one token a chunk.
    pub fn on_event_for_client(&mut self, ev: &SseEvent<'_>) -> ClientEvent {
        self.on_raw_event_for_client(&RawEvent {
            event: ev.event.as_bytes(),
            data: ev.data.as_bytes(),
            raw: ev.raw,
        })
    }

    /// [`Self::on_event_for_client`] from the parser's bytes: the events passed without parsing are
    /// not validated as UTF-8 either.
    pub fn on_raw_event_for_client(&mut self, ev: &RawEvent<'_>) -> ClientEvent {
        self.on_scanned_event_for_client(ev, Keys::of(ev.data))
    }

    /// [`Self::on_raw_event_for_client`], with what [`Keys::of`] finds in the event's data found
    /// beforehand (by a [`ChunkKeys`] of the chunk that holds it).
    pub fn on_scanned_event_for_client(&mut self, ev: &RawEvent<'_>, keys: Keys) -> ClientEvent {
        let data = ev.data;
        // A key can only be spelt otherwise with a `\u` escape: with none, the literal count of
        // `"usage"` is the count of usage keys.
        if !data.is_empty() && data != b"[DONE]" && !keys.escaped {
            match keys.usage {
                0 => {
                    self.unparsed_chunks += 1;
                    return ClientEvent::AsIs;
                }
                1 if trailing_null_usage(ev.data) => {
                    self.unparsed_chunks += 1;
                    return ClientEvent::AsIs;
                }
                _ => {}
            }
        }
        ev.with_text(|ev| self.parse_for_client(ev))
    }

    fn parse_for_client(&mut self, ev: &SseEvent<'_>) -> ClientEvent {
        let Some(chunk) = self.take(ev) else {
            return ClientEvent::AsIs;
        };
        if chunk.usage_only(ev.data) {
            ClientEvent::Drop
        } else {
            ClientEvent::AsIs
        }
    }

    fn take<'a>(&mut self, ev: &SseEvent<'a>) -> Option<Chunk<'a>> {
        if ev.data.is_empty() || ev.data == "[DONE]" {
            return None;
        }
        let chunk = match serde_json::from_str::<Chunk>(ev.data) {
            Ok(chunk) => chunk,
            Err(e) => {
                log::debug!("usage: skipping an SSE event that is not a usage or text event ({e})");
                return None;
            }
        };
        // Reported usage is cumulative everywhere (OpenAI final chunk, Anthropic message_delta,
        // Responses `response.completed`): the latest value wins. Anthropic's message_start
        // carries a placeholder output count: output comes later.
        let start = chunk.message_usage().map(|c| Counts { output: None, ..c });
        for counts in [start, chunk.usage_counts(), chunk.response_usage()]
            .into_iter()
            .flatten()
        {
            self.counts.merge(&counts);
        }
        self.text = self.text.plus(chunk.text());
        Some(chunk)
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
        self.text.tokens.saturating_add(self.unparsed_chunks)
    }

    /// True when this event is an OpenAI chat chunk that carries usage and no choices (`"choices":[]`)
    /// — the extra chunk that `stream_options.include_usage` adds. Cheap check usable per event.
    pub fn is_usage_only_chunk(ev: &SseEvent<'_>) -> bool {
        may_be_usage_only(ev.data)
            && serde_json::from_str::<Chunk>(ev.data).is_ok_and(|c| c.usage_only(ev.data))
    }
}

/// Whether the event's `"usage":null` is the last member of the event's JSON object (or the last
/// but OpenAI's `"obfuscation"` string of letters and digits): then it is certainly a member of the
/// outermost object, which the final `}` closes, and the event carries no usage. False for any
/// other layout (the caller parses the event).
fn trailing_null_usage(data: &[u8]) -> bool {
    const MEMBER: &[u8] = b",\"usage\":null";
    const OBFUSCATION: &[u8] = b",\"obfuscation\":\"";
    let Some(body) = data.trim_ascii_end().strip_suffix(b"}") else {
        return false;
    };
    if body.ends_with(MEMBER) {
        return true;
    }
    let Some(from) = memchr::memmem::rfind(body, OBFUSCATION) else {
        return false;
    };
    let value = body
        .get(from + OBFUSCATION.len()..)
        .and_then(|v| v.strip_suffix(b"\""));
    value.is_some_and(|v| {
        v.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }) && body.get(..from).is_some_and(|b| b.ends_with(MEMBER))
}

/// What the client view of a forced-usage stream looks for in an event's data before parsing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys {
    /// A `\u` escape, which could spell a key otherwise.
    pub escaped: bool,
    /// `"usage"` found: 0, 1, or 2 for more.
    pub usage: u8,
}

impl Keys {
    pub fn of(data: &[u8]) -> Self {
        let mut usage = USAGE_KEY.find_iter(data);
        Keys {
            escaped: has_unicode_escape(data),
            usage: match (usage.next(), usage.next()) {
                (None, _) => 0,
                (Some(_), None) => 1,
                _ => 2,
            },
        }
    }
}

/// [`Keys`] for every event of a chunk from two searches of the whole chunk, instead of two per
/// event (a stream of 200 events in one chunk spent half its time in them).
#[derive(Debug)]
pub struct ChunkKeys<'a> {
    chunk: &'a [u8],
    /// Where `"usage"` and `\u` start in the chunk, in order.
    usage: Vec<usize>,
    escapes: Vec<usize>,
}

impl<'a> ChunkKeys<'a> {
    pub fn of(chunk: &'a [u8]) -> Self {
        Self::reusing(chunk, KeyBuffers::default())
    }

    /// [`Self::of`] in the buffers of an earlier chunk's ([`Self::into_buffers`]): a stream whose
    /// every chunk names `usage` (`"usage":null`) allocates them once, not twice a chunk.
    pub fn reusing(chunk: &'a [u8], buffers: KeyBuffers) -> Self {
        let KeyBuffers {
            mut usage,
            mut escapes,
        } = buffers;
        usage.clear();
        usage.extend(USAGE_KEY.find_iter(chunk));
        escapes.clear();
        escapes.extend(UNICODE_ESCAPE.find_iter(chunk));
        ChunkKeys {
            chunk,
            usage,
            escapes,
        }
    }

    pub fn into_buffers(self) -> KeyBuffers {
        KeyBuffers {
            usage: self.usage,
            escapes: self.escapes,
        }
    }

    /// [`Keys::of`] `data`: looked up when it lies in the chunk, searched otherwise. Neither needle
    /// can straddle the edge of an event's data (a `:` or a space before it, a line end after),
    /// so the chunk's matches inside `data` are exactly the ones a search of `data` finds.
    pub fn of_data(&self, data: &[u8]) -> Keys {
        let Some(r) = splice::span_bytes(self.chunk, data) else {
            return Keys::of(data);
        };
        let within = |at: &[usize]| {
            at.partition_point(|&p| p < r.end) - at.partition_point(|&p| p < r.start)
        };
        Keys {
            escaped: within(&self.escapes) > 0,
            usage: within(&self.usage).min(2) as u8,
        }
    }
}

/// The buffers of a [`ChunkKeys`], kept from chunk to chunk.
#[derive(Debug, Default)]
pub struct KeyBuffers {
    usage: Vec<usize>,
    escapes: Vec<usize>,
}

/// `"usage"` as a key, and the escape that could spell it otherwise (searchers built once).
static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
static UNICODE_ESCAPE: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\\u"));

/// Whether `data` holds a `\u` escape: most events hold no backslash at all.
fn has_unicode_escape(data: &[u8]) -> bool {
    memchr::memchr(b'\\', data)
        .and_then(|at| data.get(at..))
        .is_some_and(|rest| UNICODE_ESCAPE.find(rest).is_some())
}

/// A member's value as written, `null` included (a plain `Option` would read `null` as absent).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// What a client gets of one event ([`StreamUsage::on_event_for_client`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    AsIs,
    /// The usage-only chunk the client did not ask for.
    Drop,
}

impl ClientEvent {
    /// Appends what the client gets of the event whose bytes are `raw`.
    pub fn write(&self, raw: &[u8], out: &mut Vec<u8>) {
        match self {
            ClientEvent::AsIs => out.extend_from_slice(raw),
            ClientEvent::Drop => {}
        }
    }
}

/// Rules out ordinary chunks (which carry `"usage":null` when usage was asked for) without
/// parsing: only the usage chunk has an empty `choices` array.
fn may_be_usage_only(data: &str) -> bool {
    let empty_choices = data.match_indices("\"choices\"").any(|(i, m)| {
        let mut rest = data.get(i + m.len()..).unwrap_or("").trim_start();
        rest = rest.strip_prefix(':').unwrap_or("").trim_start();
        rest.strip_prefix('[')
            .is_some_and(|r| r.trim_start().starts_with(']'))
    });
    empty_choices && data.contains("\"usage\"")
}

/// The last reported value of every usage field, kept apart because providers count differently.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
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
    fn merge(&mut self, new: &Counts) {
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

/// A token count from an untrusted provider: non-negative integers (or integral floats some
/// OpenAI-compatible servers send); anything else counts as absent instead of failing the read.
#[derive(Debug, Default, Clone, Copy)]
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CountVisitor)
    }
}

struct CountVisitor;

impl<'de> Visitor<'de> for CountVisitor {
    type Value = Count;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a token count")
    }

    fn visit_u64<E>(self, n: u64) -> Result<Count, E> {
        Ok(Count(Some(n)))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Count, E> {
        Ok(Count(u64::try_from(n).ok()))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Count, E> {
        // `as` saturates.
        Ok(Count((f >= 0.0).then_some(f as u64)))
    }

    fn visit_str<E>(self, _: &str) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_unit<E>(self) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Count(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Count(None))
    }
}

fn n(count: Option<Count>) -> Option<u64> {
    count.and_then(|c| c.0)
}

/// A usage object, by OpenAI or Anthropic names.
#[derive(Derive)]
struct UsageObject {
    prompt_tokens: Option<Count>,
    completion_tokens: Option<Count>,
    input_tokens: Option<Count>,
    output_tokens: Option<Count>,
    cache_creation_input_tokens: Option<Count>,
    cache_read_input_tokens: Option<Count>,
    // Each details object must have its shape, though only one of its counts is read.
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
}

#[derive(Derive)]
struct Details {
    cached_tokens: Option<Count>,
    reasoning_tokens: Option<Count>,
}

impl UsageObject {
    fn counts(&self) -> Counts {
        let detail =
            |d: &Option<Details>, read: fn(&Details) -> Option<Count>| n(d.as_ref().and_then(read));
        Counts {
            prompt: n(self.prompt_tokens),
            input: n(self.input_tokens),
            output: n(self.completion_tokens).or(n(self.output_tokens)),
            cache_creation: n(self.cache_creation_input_tokens),
            cache_read: n(self.cache_read_input_tokens),
            cached: detail(&self.prompt_tokens_details, |d| d.cached_tokens)
                .or(detail(&self.input_tokens_details, |d| d.cached_tokens)),
            reasoning: detail(&self.completion_tokens_details, |d| d.reasoning_tokens)
                .or(detail(&self.output_tokens_details, |d| d.reasoning_tokens)),
        }
    }
}

/// One streamed JSON event of any supported API; every member is optional. `usage` is kept as
/// written: most chunks of a forced-usage stream carry `"usage":null`, which is then cut out of
/// the event by its place in the text, from this same parse.
#[derive(Derive)]
struct Chunk<'a> {
    #[serde(rename = "type")]
    kind: Option<Kind>,
    choices: Option<Items<Choice>>,
    #[serde(borrow, default, deserialize_with = "present")]
    usage: Option<&'a RawValue>,
    /// Anthropic message_start's `message.usage`.
    message: Option<WithUsage>,
    /// Responses API lifecycle events' `response.usage`.
    response: Option<WithUsage>,
    /// Anthropic content_block_delta (an object) or Responses `*.delta` (a string).
    delta: Option<Text>,
    /// Anthropic content_block_start: a tool_use block's name is generated output too.
    content_block: Option<Text>,
}

#[derive(Derive)]
struct WithUsage {
    usage: Option<UsageObject>,
}

impl Chunk<'_> {
    /// The usage object, when there is one (not `null`).
    fn usage_object(&self) -> Option<UsageObject> {
        let raw = self.usage.filter(|u| u.get() != "null")?;
        serde_json::from_str::<UsageObject>(raw.get()).ok()
    }

    fn usage_counts(&self) -> Option<Counts> {
        self.usage_object().as_ref().map(UsageObject::counts)
    }

    fn message_usage(&self) -> Option<Counts> {
        let usage = self.message.as_ref()?.usage.as_ref()?;
        Some(usage.counts())
    }

    fn response_usage(&self) -> Option<Counts> {
        let usage = self.response.as_ref()?.usage.as_ref()?;
        Some(usage.counts())
    }

    fn text(&self) -> Text {
        // Audio deltas are base64, not text.
        let audio = self.kind.as_ref().is_some_and(|k| k.audio);
        let delta = match audio {
            true => Text::default(),
            false => self.delta.unwrap_or_default(),
        };
        let choices = self.choices.as_ref().map(|c| c.text).unwrap_or_default();
        choices
            .plus(delta)
            .plus(self.content_block.unwrap_or_default())
    }

    /// An empty `choices` array and a usage member that is not `null`.
    fn usage_only(&self, data: &str) -> bool {
        self.choices.as_ref().is_some_and(|c| c.count == 0)
            && self.usage.is_some_and(|u| u.get() != "null")
            && may_be_usage_only(data)
    }
}

/// An event's `type`, as far as it matters here.
struct Kind {
    audio: bool,
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KindVisitor;
        impl Visitor<'_> for KindVisitor {
            type Value = Kind;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an event type")
            }
            fn visit_str<E>(self, s: &str) -> Result<Kind, E> {
                Ok(Kind {
                    audio: s.contains("audio"),
                })
            }
        }
        d.deserialize_str(KindVisitor)
    }
}

/// Generated text in a part of an event.
trait Generated {
    fn text(&self) -> Text;
}

/// An array's items, measured and dropped as they are read.
struct Items<T> {
    count: u64,
    text: Text,
    item: PhantomData<T>,
}

impl<'de, T: Deserialize<'de> + Generated> Deserialize<'de> for Items<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ItemsVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Generated> Visitor<'de> for ItemsVisitor<T> {
            type Value = Items<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items<T>, A::Error> {
                let (mut count, mut text) = (0u64, Text::default());
                while let Some(item) = seq.next_element::<T>()? {
                    count = count.saturating_add(1);
                    text = text.plus(item.text());
                }
                Ok(Items {
                    count,
                    text,
                    item: PhantomData,
                })
            }
        }
        d.deserialize_seq(ItemsVisitor(PhantomData))
    }
}

impl<T> Generated for Items<T> {
    fn text(&self) -> Text {
        self.text
    }
}

impl<T: Generated> Generated for Option<T> {
    fn text(&self) -> Text {
        self.as_ref().map(T::text).unwrap_or_default()
    }
}

impl Generated for Text {
    fn text(&self) -> Text {
        *self
    }
}

/// OpenAI chat chunk choice (`delta`) or legacy completions choice (`text`).
#[derive(Derive)]
struct Choice {
    delta: Option<ChatDelta>,
    text: Option<Text>,
}

impl Generated for Choice {
    fn text(&self) -> Text {
        self.delta.text().plus(self.text.text())
    }
}

/// DeepSeek, vLLM and other OpenAI-compatible servers stream reasoning in `reasoning_content`
/// or `reasoning`.
#[derive(Derive)]
struct ChatDelta {
    content: Option<Text>,
    refusal: Option<Text>,
    reasoning_content: Option<Text>,
    reasoning: Option<Text>,
    tool_calls: Option<Items<ToolCall>>,
    function_call: Option<Function>,
}

impl Generated for ChatDelta {
    fn text(&self) -> Text {
        [
            self.content,
            self.refusal,
            self.reasoning_content,
            self.reasoning,
        ]
        .text()
        .plus(self.tool_calls.text())
        .plus(self.function_call.text())
    }
}

impl<const N: usize> Generated for [Option<Text>; N] {
    fn text(&self) -> Text {
        self.iter()
            .fold(Text::default(), |t, part| t.plus(part.text()))
    }
}

#[derive(Derive)]
struct ToolCall {
    function: Option<Function>,
}

impl Generated for ToolCall {
    fn text(&self) -> Text {
        self.function.text()
    }
}

#[derive(Derive)]
struct Function {
    name: Option<Text>,
    arguments: Option<Text>,
}

impl Generated for Function {
    fn text(&self) -> Text {
        [self.name, self.arguments].text()
    }
}

/// Size of generated text, measured as it is read so that the text itself is never kept.
///
/// As a member it reads any value: strings, arrays of text, and the text members of Anthropic's
/// content_block_start `content_block` and content_block_delta `delta` (text_delta,
/// input_json_delta, thinking_delta; signature_delta is not text). Nothing else counts.
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
        d.deserialize_any(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, s: &str) -> Result<Text, E> {
        Ok(Text::of(s))
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

    fn visit_bool<E>(self, _: bool) -> Result<Text, E> {
        Ok(Text::default())
    }

    fn visit_unit<E>(self) -> Result<Text, E> {
        Ok(Text::default())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
        let mut text = Text::default();
        while let Some(item) = seq.next_element::<Text>()? {
            text = text.plus(item);
        }
        Ok(text)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
        const TEXT_KEYS: [&str; 4] = ["text", "partial_json", "thinking", "name"];
        let mut text = Text::default();
        while let Some(key) = map.next_key_seed(splice::KeyIndex(&TEXT_KEYS))? {
            match key {
                Some(_) => text = text.plus(map.next_value::<Text>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::count::sse::SseParser;

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
                include_bytes!("../../tests/fixtures/openai_chat.json"),
                u(24, 8, 0, 0, 0),
            ),
            (
                include_bytes!("../../tests/fixtures/openai_chat_tools.json"),
                u(97, 56, 0, 0, 0),
            ),
            (
                include_bytes!("../../tests/fixtures/openai_chat_cached.json"),
                u(2006, 300, 1920, 0, 256),
            ),
            (
                include_bytes!("../../tests/fixtures/openai_embeddings.json"),
                u(13, 0, 0, 0, 0),
            ),
            (
                include_bytes!("../../tests/fixtures/openai_completions.json"),
                u(5, 12, 0, 0, 0),
            ),
            (
                include_bytes!("../../tests/fixtures/openai_responses.json"),
                u(1320, 412, 1152, 0, 384),
            ),
            (
                include_bytes!("../../tests/fixtures/anthropic_message.json"),
                u(14, 23, 0, 0, 0),
            ),
            (
                include_bytes!("../../tests/fixtures/anthropic_message_cache.json"),
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
                include_bytes!("../../tests/fixtures/openai_stream.sse"),
                u(19, 9, 0, 0, 0),
                32,
                1,
            ),
            // Tool name "get_weather" (11) + arguments {"location":"Paris, France","unit":"celsius"} (45).
            (
                include_bytes!("../../tests/fixtures/openai_stream_tools.sse"),
                u(83, 22, 0, 0, 0),
                56,
                1,
            ),
            (
                include_bytes!("../../tests/fixtures/openai_responses_stream.sse"),
                u(1342, 18, 1152, 0, 0),
                76,
                0,
            ),
            (
                include_bytes!("../../tests/fixtures/anthropic_stream.sse"),
                u(21 + 2048, 41, 2048, 0, 0),
                167,
                0,
            ),
            // Thinking (110) + text (56) + tool name (11) + input JSON (53).
            (
                include_bytes!("../../tests/fixtures/anthropic_stream_tools.sse"),
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
        let (s, _) = stream(include_bytes!("../../tests/fixtures/openai_stream.sse"));
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
        // Bytes that are not UTF-8 in a member that is skipped do not hide the usage, in the
        // completion or in the usage itself (the provider counted those tokens); in a key, they do.
        let body = b"{\"choices\":[{\"text\":\"\xff\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}";
        assert_eq!(usage_from_json(body), Some(u(3, 1, 0, 0, 0)));
        let body = b"{\"usage\":{\"prompt_tokens\":3,\"x\":\"\xff\"}}";
        assert_eq!(usage_from_json(body), Some(u(3, 0, 0, 0, 0)));
        let body = b"{\"usage\":{\"prompt_tokens\":3,\"\xff\":1}}";
        assert_eq!(usage_from_json(body), None);
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

    #[test]
    fn odd_events() {
        let mut s = StreamUsage::new();
        for ev in [
            // Whitespace, escaped keys, unknown members of every type.
            " {\n\"usage\" : { \"completion_tokens\":2 ,\"prompt_tokens\" :1 } ,\t\"choices\":[ ] }\r\n",
            r#"{"x":[1,-2.5e-3,1E+2,{"a":[true,null,"s\"\\\/"]}],"choices":[{"delta":{"\u0063ontent":"ab"}}]}"#,
            // Skipped members are checked for grammar only: a number beyond f64 is no matter.
            r#"{"big":1e400,"choices":[{"text":"ok"}]}"#,
            // Wrong shapes fail the event; lone surrogates in text too.
            r#"{"choices":{"text":"no"},"usage":{"prompt_tokens":50}}"#,
            r#"{"choices":[{"delta":{"content":"\ud800"}}]}"#,
            // A repeated member fails the event.
            r#"{"choices":[{"text":"no"}],"choices":[{"text":"no"}]}"#,
            r#"{"type":5,"delta":"no"}"#,
        ] {
            s.on_event(&data(ev));
        }
        assert_eq!(s.usage(), Some(u(1, 2, 0, 0, 0)));
        assert_eq!(s.text_chars(), 4);
        let deep = format!("{{\"delta\":{}\"a\"{}}}", "[".repeat(200), "]".repeat(200));
        s.on_event(&data(&deep));
        assert_eq!(s.text_chars(), 4);
        assert!(StreamUsage::is_usage_only_chunk(&data(
            " {\n\"usage\" : { \"completion_tokens\":2 } ,\t\"choices\":[ ] }\r\n"
        )));
    }

    #[test]
    fn one_parse_gives_what_the_client_gets_as_the_two_calls_did() {
        let stream = include_bytes!("../../tests/fixtures/openai_stream.sse");
        for split in [stream.len(), 300, 64, 7, 1usize] {
            let (mut one, mut two) = (StreamUsage::new(), StreamUsage::new());
            let (mut a, mut b) = (SseParser::new(1 << 20), SseParser::new(1 << 20));
            let (mut out_one, mut out_two) = (Vec::new(), Vec::new());
            for chunk in stream.chunks(split) {
                a.feed(chunk, |ev| {
                    one.on_event_for_client(&ev).write(ev.raw, &mut out_one)
                });
                b.feed(chunk, |ev| {
                    if !two.on_event_is_usage_only(&ev) {
                        out_two.extend_from_slice(ev.raw);
                    }
                });
            }
            let at = out_one.iter().zip(&out_two).position(|(a, b)| a != b);
            assert!(
                out_one == out_two,
                "split {split}: outputs differ at {at:?}: {:?} / {:?}",
                String::from_utf8_lossy(
                    &out_one[at.unwrap_or(0).saturating_sub(40)
                        ..(at.unwrap_or(0) + 40).min(out_one.len())]
                ),
                String::from_utf8_lossy(
                    &out_two[at.unwrap_or(0).saturating_sub(40)
                        ..(at.unwrap_or(0) + 40).min(out_two.len())]
                )
            );
            // Only the usage chunk went; every other chunk kept its `"usage":null`, as OpenAI
            // sends it when usage is asked for.
            let text = String::from_utf8_lossy(&out_one);
            assert!(!text.contains("\"usage\":{"), "split {split}");
            assert_eq!(text.matches("\"usage\":null").count(), 11, "split {split}");
            assert!(!text.contains("\"choices\":[]"), "split {split}");
            assert!(text.ends_with("data: [DONE]\n\n"), "split {split}");
            assert_eq!(one.usage(), two.usage());
            // Chunks passed unparsed count one token each for an estimate: the fixture's 9
            // completion tokens came in 11 chunks (role, 9 deltas, finish).
            let estimate = one.estimated_output_tokens();
            assert!(
                (9..=13).contains(&estimate),
                "split {split}: estimate {estimate}"
            );
        }
    }

    /// A chunk searched once tells of each event's data what a search of that data tells, also for
    /// needles at the very edges of the data and events that are not in the chunk.
    #[test]
    fn chunk_keys_agree_with_each_events_own_search() {
        let mut stream = include_bytes!("../../tests/fixtures/openai_stream.sse").to_vec();
        stream.extend_from_slice(
            b"data: \"usage\"\n\ndata: {\"usage\":1,\"usage\":2}\n\ndata:\\u0075\n\n\
              data: x\\\n\ndata: \\u\"usage\"\\u\r\n\r\nevent: e\ndata: a\ndata: \"usage\"\n\n",
        );
        let keys = ChunkKeys::of(&stream);
        let mut p = SseParser::new(1 << 20);
        let mut seen = Vec::new();
        p.feed_raw(&stream, |ev| {
            seen.push((keys.of_data(ev.data), Keys::of(ev.data)))
        });
        assert!(seen.len() > 10);
        for (i, (from_chunk, own)) in seen.iter().enumerate() {
            assert_eq!(from_chunk, own, "event {i}");
        }
        let kinds: Vec<(bool, u8)> = seen.iter().map(|(k, _)| (k.escaped, k.usage)).collect();
        for k in [(false, 0), (false, 1), (false, 2), (true, 0), (true, 1)] {
            assert!(kinds.contains(&k), "{k:?} in {kinds:?}");
        }
    }

    #[test]
    fn only_a_last_top_level_null_usage_spares_the_parse() {
        let trailing = |raw: &str| trailing_null_usage(raw.as_bytes());
        assert!(trailing("{\"choices\":[],\"usage\":null}"));
        assert!(trailing(
            "{\"c\":1,\"usage\":null,\"obfuscation\":\"Zk3\"} \r"
        ));
        // Nested, or not the last member, or inside a string: left to the parse.
        assert!(!trailing("{\"a\":{\"b\":1,\"usage\":null}}"));
        assert!(!trailing("{\"usage\":null,\"c\":1}"));
        assert!(!trailing("{\"s\":\"x,\\\"usage\\\":null}\"}"));
        assert!(!trailing(
            "{\"c\":1,\"usage\":null,\"obfuscation\":\"a\\\"b\"}"
        ));
        assert!(!trailing("{\"usage\":null"));
    }
}
