//! What the gateway needs from a client request body, and the few rewrites it makes to it.
//!
//! Reading: serde_json finds the top-level members the gateway reads, each borrowed as a
//! [`RawValue`]; each is then checked for its type and read (the model, the flags and limits) or
//! measured for the prompt estimate ([`Content`], a visitor that counts text as it goes, so no tree
//! of the body is built). `messages`, most of a chat body, is measured in that same pass
//! ([`read_members`]) rather than skipped and read again: 18% of the listener's body callback on a
//! 16 KiB conversation (`make instructions`). Repeated keys: the last one counts, as in serde_json's
//! `Value` (within a message's content parts, every occurrence is counted: an estimate).
//!
//! Rewrites change one member and keep every other byte of the body ([`splice`], which also says
//! why a splice rather than serde_json's `preserve_order`, with measurements).

use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::error::Category;
use serde_json::value::RawValue;

use crate::api::splice::{self, members, Splice};
use crate::count::estimate::text_tokens;
use crate::count::usage::ApiKind;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage == true`.
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`, else `max_output_tokens`.
    pub max_tokens: Option<u64>,
    /// [`text_tokens`] over all message/system/prompt/input text (strings and text parts, tool
    /// definitions' JSON too), + ~4 per message.
    pub prompt_tokens_estimate: u64,
    /// The hash of the leading prompt ([`inspect_with`] with `prefix`): requests that share it
    /// start alike, and a provider's prompt cache serves them best from one key.
    pub prefix: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RequestError {
    /// Nothing but whitespace.
    EmptyBody,
    InvalidUtf8,
    /// The parser's message, e.g. "EOF while parsing an object at line 1 column 10".
    InvalidJson(String),
    NotAnObject,
    /// (field path, expected), e.g. ("messages", "an array").
    WrongType(&'static str, &'static str),
    /// `messages` present but [] (chat completions and Anthropic messages).
    EmptyMessages,
    /// A field the API requires, absent or null: "messages" for chat completions and Anthropic
    /// messages, "prompt" for legacy completions, "input" for embeddings.
    MissingField(&'static str),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::EmptyBody => {
                f.write_str("The request body is empty; expected a JSON object.")
            }
            RequestError::InvalidUtf8 => f.write_str("request body is not valid UTF-8"),
            RequestError::InvalidJson(e) => write!(f, "request body is not valid JSON: {e}"),
            RequestError::NotAnObject => f.write_str("request body must be a JSON object"),
            RequestError::WrongType(field, expected) => write!(f, "'{field}' must be {expected}"),
            RequestError::EmptyMessages => f.write_str("'messages' must be a non-empty array"),
            RequestError::MissingField(field) => write!(f, "'{field}' is required"),
        }
    }
}

impl std::error::Error for RequestError {}

/// Per-message framing tokens (role and separators) in chat formats.
const MESSAGE_OVERHEAD: u64 = 4;
/// Images, audio and files are not decoded: each counts as an OpenAI high-detail 1024×1024 image.
const MEDIA_PART_TOKENS: u64 = 765;
const MEDIA_TYPES: &[&str] = &[
    "image_url",
    "image",
    "input_image",
    "image_file",
    "input_audio",
    "audio",
    "document",
    "file",
    "input_file",
];

/// The top-level members [`inspect`] reads.
const FIELDS: [&str; 13] = [
    "model",
    "stream",
    "stream_options",
    "max_completion_tokens",
    "max_tokens",
    "max_output_tokens",
    "messages",
    "system",
    "instructions",
    "prompt",
    "input",
    "tools",
    "functions",
];

#[derive(Clone, Copy, PartialEq)]
enum Expect {
    Str,
    Bool,
    Obj,
    Arr,
    StrOrArr,
    Count,
}

impl Expect {
    fn accepts(self, v: &RawValue) -> bool {
        // A RawValue is valid JSON with no leading whitespace: its first byte tells its type.
        let first = v.get().as_bytes().first().copied().unwrap_or_default();
        match self {
            Expect::Str => first == b'"',
            Expect::Bool => first == b't' || first == b'f',
            Expect::Obj => first == b'{',
            Expect::Arr => first == b'[',
            Expect::StrOrArr => first == b'"' || first == b'[',
            Expect::Count => serde_json::from_str::<u64>(v.get()).is_ok(),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Expect::Str => "a string",
            Expect::Bool => "a boolean",
            Expect::Obj => "an object",
            Expect::Arr => "an array",
            Expect::StrOrArr => "a string or an array",
            Expect::Count => "a non-negative integer",
        }
    }
}

/// Checks and reads a request body for `api`. For `ApiKind::Other` only the JSON object is
/// required and fields of unexpected types are ignored.
pub fn inspect(api: ApiKind, body: &[u8]) -> Result<RequestInfo, RequestError> {
    inspect_with(api, body, false)
}

/// [`inspect`], and with `prefix` the hash of the leading prompt too ([`RequestInfo::prefix`]).
pub fn inspect_with(api: ApiKind, body: &[u8], prefix: bool) -> Result<RequestInfo, RequestError> {
    use Expect::*;
    let text = std::str::from_utf8(body).map_err(|_| RequestError::InvalidUtf8)?;
    if text.trim_matches(JSON_WS).is_empty() {
        return Err(RequestError::EmptyBody);
    }
    // `messages`, usually most of the body, is measured as the one pass over the body reads it;
    // kept as it was written only for the hash of the leading prompt.
    let object = read_members(text, !prefix).map_err(|e| match e.classify() {
        Category::Data => RequestError::NotAnObject,
        _ => RequestError::InvalidJson(e.to_string()),
    })?;
    let [model, stream, stream_options, max_completion, max, max_output, _, system, instructions, prompt, input, tools, functions] =
        object.values;
    let strict = api != ApiKind::Other;
    let field = |v, name: &'static str, expect| check(v, name, expect, strict);
    let model = field(model, "model", Str)?
        .map(parse::<String>)
        .transpose()?;
    let stream = field(stream, "stream", Bool)?.is_some_and(|s| s.get() == "true");
    let include_usage = match field(stream_options, "stream_options", Obj)? {
        Some(options) => {
            let [include] = members(options.get(), ["include_usage"])
                .map_err(|e| RequestError::InvalidJson(e.to_string()))?
                .values;
            check(include, "stream_options.include_usage", Bool, strict)?
                .is_some_and(|v| v.get() == "true")
        }
        None => false,
    };
    let max_completion = field(max_completion, "max_completion_tokens", Count)?;
    let max = field(max, "max_tokens", Count)?;
    let max_output = field(max_output, "max_output_tokens", Count)?;
    let max_tokens = max_completion
        .or(max)
        .or(max_output)
        .map(parse::<u64>)
        .transpose()?;

    let (messages, measured) = match object.messages {
        Messages::Absent => (None, None),
        Messages::Kept(v) => match field(Some(v), "messages", Arr)? {
            Some(v) => (Some(v), Some(parse::<Content>(v)?)),
            None => (None, None),
        },
        Messages::Measured(c) => (None, Some(c)),
        Messages::NotAnArray if strict => {
            return Err(RequestError::WrongType("messages", Arr.describe()))
        }
        Messages::NotAnArray => (None, None),
    };
    let system = field(system, "system", StrOrArr)?;
    let instructions = field(instructions, "instructions", Str)?;
    let prompt = field(prompt, "prompt", StrOrArr)?;
    let input = field(input, "input", StrOrArr)?;
    let tools = field(tools, "tools", Arr)?;
    let functions = field(functions, "functions", Arr)?;

    // What the providers' references mark required (the Responses API's `input` is optional:
    // a follow-up may give only `previous_response_id`). `model` is not checked: the gateway's
    // model map may route a request without one.
    let required = match api {
        ApiKind::ChatCompletions | ApiKind::Messages => Some(("messages", measured.is_some())),
        ApiKind::Completions => Some(("prompt", prompt.is_some())),
        ApiKind::Embeddings => Some(("input", input.is_some())),
        ApiKind::Responses | ApiKind::Other => None,
    };
    if let Some((field, false)) = required {
        return Err(RequestError::MissingField(field));
    }

    let mut estimate = 0u64;
    if let Some(messages) = measured {
        if strict && messages.items == 0 {
            return Err(RequestError::EmptyMessages);
        }
        estimate = messages.with_overhead();
    }
    for v in [system, instructions, prompt].into_iter().flatten() {
        estimate = estimate.saturating_add(parse::<Content>(v)?.tokens);
    }
    if let Some(input) = input {
        let input = parse::<Content>(input)?;
        // Responses API input items are messages too (a plain string input, one user message,
        // has no items).
        estimate = match api {
            ApiKind::Responses => estimate.saturating_add(input.with_overhead()),
            _ => estimate.saturating_add(input.tokens),
        };
    }
    for v in [tools, functions].into_iter().flatten() {
        estimate = estimate.saturating_add(json_tokens(v));
    }

    let prefix = match api {
        _ if !prefix => None,
        ApiKind::ChatCompletions => leading_prompt(&[], messages),
        ApiKind::Messages => leading_prompt(&[("system", system)], messages),
        ApiKind::Responses => leading_prompt(&[("instructions", instructions)], input),
        _ => None,
    };

    Ok(RequestInfo {
        model,
        stream,
        include_usage,
        max_tokens,
        prompt_tokens_estimate: estimate,
        prefix,
    })
}

/// One message's share of [`RequestInfo::prompt_tokens_estimate`], as [`inspect`] counts it: its
/// text and its framing. Dropping the message takes exactly this off the estimate.
pub fn message_tokens(message: &RawValue) -> u64 {
    parse::<Content>(message)
        .map_or(0, |c| c.tokens)
        .saturating_add(MESSAGE_OVERHEAD)
}

/// The hash (XXH3) of what a conversation starts with: the `fixed` members (a system prompt,
/// instructions) and the `turns` up to and including the first user turn (so the system and
/// developer messages and the first user message; a string is one user turn). Each part is hashed
/// as the client wrote it, so one application's requests hash alike. None when there is nothing.
fn leading_prompt(fixed: &[(&str, Option<&RawValue>)], turns: Option<&RawValue>) -> Option<u64> {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    let mut any = false;
    let mut part = |name: &str, v: &RawValue| {
        h.update(name.as_bytes());
        h.update(&[0]);
        h.update(v.get().as_bytes());
        h.update(&[0]);
        any = true;
    };
    for (name, v) in fixed {
        if let Some(v) = v {
            part(name, v);
        }
    }
    if let Some(turns) = turns {
        match serde_json::from_str::<Vec<&RawValue>>(turns.get()) {
            Ok(items) => {
                for item in items {
                    part("turn", item);
                    let role = members(item.get(), ["role"]).ok().and_then(|m| {
                        let [role] = m.values;
                        role
                    });
                    if role.is_some_and(|r| r.get() == r#""user""#) {
                        break;
                    }
                }
            }
            // A string prompt.
            Err(_) => part("turn", turns),
        }
    }
    any.then(|| h.digest())
}

const JSON_WS: [char; 4] = [' ', '\t', '\n', '\r'];

/// The index of `messages` in [`FIELDS`].
const MESSAGES: usize = 6;

/// `messages` as [`read_members`] found it.
enum Messages<'a> {
    /// Absent or `null`.
    Absent,
    /// As written (the leading prompt is hashed from it); its type not checked yet.
    Kept(&'a RawValue),
    /// An array, measured as it was read.
    Measured(Content),
    NotAnArray,
}

/// [`FIELDS`]' members of the body; `messages` measured as it is read when `measure` (one pass over
/// it instead of two: skipped as a `RawValue`, then read again to be measured), else kept as
/// written. The last of a repeated key counts, as in [`members`].
struct Read<'a> {
    values: [Option<&'a RawValue>; FIELDS.len()],
    messages: Messages<'a>,
}

fn read_members(text: &str, measure: bool) -> Result<Read<'_>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let read = de.deserialize_map(ReadVisitor { measure })?;
    de.end()?;
    Ok(read)
}

struct ReadVisitor {
    measure: bool,
}

impl<'de> Visitor<'de> for ReadVisitor {
    type Value = Read<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Read<'de>, A::Error> {
        let mut read = Read {
            values: [None; FIELDS.len()],
            messages: Messages::Absent,
        };
        while let Some(key) = map.next_key_seed(splice::KeyIndex(&FIELDS))? {
            match key {
                Some(MESSAGES) if self.measure => read.messages = map.next_value::<Measure>()?.0,
                Some(MESSAGES) => {
                    let v = map.next_value::<&'de RawValue>()?;
                    read.messages = match v.get() {
                        "null" => Messages::Absent,
                        _ => Messages::Kept(v),
                    };
                }
                Some(i) => {
                    if let Some(slot) = read.values.get_mut(i) {
                        *slot = Some(map.next_value::<&'de RawValue>()?);
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(read)
    }
}

/// `messages` measured as it is read: an array as [`Content`] measures it, anything else only
/// told apart.
struct Measure<'a>(Messages<'a>);

impl<'de> Deserialize<'de> for Measure<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MeasureVisitor)
    }
}

struct MeasureVisitor;

impl<'de> Visitor<'de> for MeasureVisitor {
    type Value = Measure<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        ContentVisitor
            .visit_seq(seq)
            .map(|c| Measure(Messages::Measured(c)))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Measure(Messages::Absent))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_map(map)?;
        Ok(Measure(Messages::NotAnArray))
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Measure(Messages::NotAnArray))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Measure(Messages::NotAnArray))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Measure(Messages::NotAnArray))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Measure(Messages::NotAnArray))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Measure(Messages::NotAnArray))
    }
}

/// A field of the body, `None` when absent or `null`; of the wrong type, an error when `strict`
/// and absent otherwise.
fn check<'v>(
    v: Option<&'v RawValue>,
    field: &'static str,
    expect: Expect,
    strict: bool,
) -> Result<Option<&'v RawValue>, RequestError> {
    match v.filter(|v| v.get() != "null") {
        Some(v) if !expect.accepts(v) => match strict {
            true => Err(RequestError::WrongType(field, expect.describe())),
            false => Ok(None),
        },
        v => Ok(v),
    }
}

/// A member already known to be valid JSON of the right type; what can still fail is the nesting
/// limit of the measuring visitors (serde_json's 128 levels).
fn parse<'a, T: Deserialize<'a>>(v: &'a RawValue) -> Result<T, RequestError> {
    serde_json::from_str(v.get()).map_err(|e| RequestError::InvalidJson(e.to_string()))
}

/// Tokens of JSON the model reads as such (tool definitions, tool-use input), measured on the text
/// as the client wrote it: SDKs send it compact.
fn json_tokens(v: &RawValue) -> u64 {
    text_tokens(v.get())
}

/// Tokens of the text a model reads in a message, content part or input item. Only keys that
/// carry text are followed, so ids, URLs and base64 payloads are never counted as text.
#[derive(Default)]
struct Content {
    tokens: u64,
    /// Items, when an array.
    items: u64,
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ContentVisitor)
    }
}

struct ContentVisitor;

impl Content {
    /// Tokens plus each item's framing, for messages.
    fn with_overhead(&self) -> u64 {
        self.tokens
            .saturating_add(MESSAGE_OVERHEAD.saturating_mul(self.items))
    }
}

impl ContentVisitor {
    fn tokens(tokens: u64) -> Content {
        Content { tokens, items: 0 }
    }
}

impl<'de> Visitor<'de> for ContentVisitor {
    type Value = Content;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, s: &str) -> Result<Content, E> {
        Ok(Self::tokens(text_tokens(s)))
    }

    // Token-id prompts (`[1, 2, 3]`): one token per id.
    fn visit_u64<E>(self, _: u64) -> Result<Content, E> {
        Ok(Self::tokens(1))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Content, E> {
        Ok(Self::tokens(1))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Content, E> {
        Ok(Self::tokens(1))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Content, E> {
        Ok(Content::default())
    }

    fn visit_unit<E>(self) -> Result<Content, E> {
        Ok(Content::default())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
        let mut content = Content::default();
        while let Some(item) = seq.next_element::<Content>()? {
            content.tokens = content.tokens.saturating_add(item.tokens);
            content.items = content.items.saturating_add(1);
        }
        Ok(content)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Content, A::Error> {
        const TEXT_KEYS: [&str; 13] = [
            "type",
            "input",
            "content",
            "text",
            "thinking",
            "refusal",
            "name",
            "arguments",
            "output",
            "summary",
            "tool_calls",
            "function_call",
            "function",
        ];
        let (mut tokens, mut media) = (0u64, false);
        while let Some(key) = map.next_key_seed(splice::KeyIndex(&TEXT_KEYS))? {
            let add = match key {
                None => {
                    map.next_value::<IgnoredAny>()?;
                    0
                }
                Some(0) => {
                    let kind = map.next_value::<&'de RawValue>()?;
                    media |= serde_json::from_str::<&str>(kind.get())
                        .is_ok_and(|t| MEDIA_TYPES.contains(&t));
                    0
                }
                // Tool-use input objects are serialized JSON to the model.
                Some(1) => {
                    let input = map.next_value::<&'de RawValue>()?;
                    if input.get().starts_with('{') {
                        json_tokens(input)
                    } else {
                        serde_json::from_str::<Content>(input.get())
                            .map_err(serde::de::Error::custom)?
                            .tokens
                    }
                }
                Some(_) => map.next_value::<Content>()?.tokens,
            };
            tokens = tokens.saturating_add(add);
        }
        Ok(Self::tokens(if media { MEDIA_PART_TOKENS } else { tokens }))
    }
}

/// The members the rewrites set.
const REWRITTEN: [&str; 5] = [
    "model",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "stream_options",
];

/// `edit` applied to the body's members (see [`splice`]); None if the body is not a JSON object.
fn rewrite(
    body: &[u8],
    edit: impl FnOnce(&str, &splice::Object<'_, 5>, &mut Splice) -> Option<()>,
) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(body).ok()?;
    let object = members(text, REWRITTEN).ok()?;
    let mut splice = Splice::default();
    edit(text, &object, &mut splice)?;
    splice.apply(text)
}

/// Returns the body with `stream_options.include_usage` set to true, every other byte as it was,
/// or None if the body is not a JSON object.
pub fn with_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    rewrite(body, |text, object, splice| {
        let [.., options] = object.values;
        let inner = options.and_then(|o| members(o.get(), ["include_usage"]).ok());
        match (options, inner) {
            (Some(_), Some(inner)) => {
                let [include] = inner.values;
                splice.set(text, &inner, include, "include_usage", "true".into())
            }
            // null, or not an object: replaced.
            (Some(other), None) => {
                splice.replace(
                    splice::span(text, other.get())?,
                    r#"{"include_usage":true}"#.into(),
                );
                Some(())
            }
            (None, _) => splice.set(
                text,
                object,
                None,
                "stream_options",
                r#"{"include_usage":true}"#.into(),
            ),
        }
    })
}

/// Returns the body with "model" replaced (or added), every other byte as it was, or None if not
/// a JSON object.
pub fn with_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let model = serde_json::to_string(model).ok()?;
    rewrite(body, |text, object, splice| {
        let [current, ..] = object.values;
        splice.set(text, object, current, "model", model)
    })
}

/// Returns the body with max_tokens (or whichever of the three fields is present, each of them if
/// several are; max_tokens if none) set, every other byte as it was.
pub fn with_max_tokens(body: &[u8], max_tokens: u64) -> Option<Vec<u8>> {
    rewrite(body, |text, object, splice| {
        let [_, max, max_completion, max_output, _] = object.values;
        let present: Vec<&RawValue> = [max, max_completion, max_output]
            .into_iter()
            .flatten()
            .collect();
        if present.is_empty() {
            return splice.set(text, object, None, "max_tokens", max_tokens.to_string());
        }
        for v in present {
            splice.replace(splice::span(text, v.get())?, max_tokens.to_string());
        }
        Some(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use ApiKind::*;

    /// `messages` measured in the one pass over the body gives what reading it twice gave (the
    /// path kept for the leading prompt's hash): the same estimate, flags and errors.
    #[test]
    fn messages_measured_in_one_pass_read_as_in_two() {
        assert_eq!(FIELDS[MESSAGES], "messages");
        let long = "word ".repeat(3000);
        let bodies = [
            json!({"model": "gpt-4o", "messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "hé 漢字"}, {"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                {"role": "tool", "tool_call_id": "c", "content": long}],
                "tools": [{"type": "function", "function": {"name": "f"}}], "max_tokens": 9}).to_string(),
            json!({"model": "m", "messages": []}).to_string(),
            json!({"model": "m", "messages": null}).to_string(),
            json!({"model": "m", "messages": "hi"}).to_string(),
            json!({"model": "m", "messages": {"role": "user"}}).to_string(),
            json!({"model": "m", "messages": 3}).to_string(),
            json!({"model": "m", "messages": true}).to_string(),
            json!({"model": 5, "messages": [{"role": "user", "content": "x"}]}).to_string(),
            json!({"model": "m"}).to_string(),
            r#"{"messages":[{"content":"a"}],"messages":[{"content":"bb bb"},{"content":"c"}]}"#.to_string(),
            r#"{"messages":[{"content":"a"}],"messages":null}"#.to_string(),
            r#"{"system":"s","messages":[{"role":"user","content":[{"type":"text","text":"t"}]}],"max_tokens":5}"#.to_string(),
        ];
        for body in &bodies {
            for api in [ChatCompletions, Messages, Completions, Responses, Other] {
                let once = inspect_with(api, body.as_bytes(), false);
                let twice = inspect_with(api, body.as_bytes(), true)
                    .map(|i| RequestInfo { prefix: None, ..i });
                assert_eq!(once, twice, "{api:?} {body}");
            }
        }
    }

    fn info(api: ApiKind, body: Value) -> RequestInfo {
        match inspect(api, body.to_string().as_bytes()) {
            Ok(info) => info,
            Err(e) => unreachable!("{e}"),
        }
    }

    fn err(api: ApiKind, body: &str) -> RequestError {
        match inspect(api, body.as_bytes()) {
            Ok(info) => unreachable!("accepted: {info:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn chat_completions_fields_and_estimate() {
        let tools = json!([{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"location":{"type":"string"}}}}}]);
        let body = json!({
            "model": "gpt-4o-mini",
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_completion_tokens": 256,
            "temperature": 0.2,
            "messages": [
                {"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "name": "alice", "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "iVBORw0KGgo".repeat(5000))}}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18°C, cloudy"}
            ],
            "tools": tools.clone()
        });
        let want = 4 * 4
            + text_tokens("You are a terse assistant.")
            + text_tokens("alice")
            + text_tokens("What is in this picture?")
            + MEDIA_PART_TOKENS
            + text_tokens("get_weather")
            + text_tokens("{\"location\":\"Paris\"}")
            + text_tokens("18°C, cloudy")
            + text_tokens(&tools.to_string());
        assert_eq!(
            info(ChatCompletions, body),
            RequestInfo {
                model: Some("gpt-4o-mini".into()),
                stream: true,
                include_usage: true,
                max_tokens: Some(256),
                prompt_tokens_estimate: want,
                prefix: None,
            }
        );
        assert!(
            want < MEDIA_PART_TOKENS + 100,
            "base64 image data must not be counted as text: {want}"
        );
    }

    #[test]
    fn defaults_and_max_tokens_precedence() {
        let base = info(
            ChatCompletions,
            json!({"messages": [{"role": "user", "content": "Hello, world!"}]}),
        );
        assert_eq!(
            base,
            RequestInfo {
                model: None,
                stream: false,
                include_usage: false,
                max_tokens: None,
                prompt_tokens_estimate: 8,
                prefix: None,
            }
        );
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let max = |extra: Value| {
            let mut body = json!({"messages": msgs});
            if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                b.extend(e.clone());
            }
            info(ChatCompletions, body).max_tokens
        };
        assert_eq!(max(json!({"max_tokens": 10})), Some(10));
        assert_eq!(max(json!({"max_output_tokens": 30})), Some(30));
        assert_eq!(
            max(json!({"max_tokens": 10, "max_completion_tokens": 20, "max_output_tokens": 30})),
            Some(20)
        );
        assert_eq!(
            max(json!({"max_tokens": null, "stream": null, "stream_options": null})),
            None
        );
        let no_usage = info(
            ChatCompletions,
            json!({"messages": msgs, "stream": true, "stream_options": {"include_usage": false}}),
        );
        assert!(no_usage.stream && !no_usage.include_usage);
    }

    #[test]
    fn anthropic_messages() {
        let body = json!({
            "model": "claude-sonnet-4-20250514",
            "max_tokens": 1024,
            "stream": true,
            "system": [{"type": "text", "text": "You are a weather bot.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Call the tool.", "signature": "EqQBCkgIARAB"},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 degrees"}]},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo"}}
                ]}
            ]
        });
        let want = 3 * 4
            + text_tokens("You are a weather bot.")
            + text_tokens("Weather in Paris?")
            + text_tokens("Call the tool.")
            + text_tokens("get_weather")
            + text_tokens(r#"{"city":"Paris"}"#)
            + text_tokens("18 degrees")
            + MEDIA_PART_TOKENS;
        let got = info(Messages, body);
        assert_eq!(
            got,
            RequestInfo {
                model: Some("claude-sonnet-4-20250514".into()),
                stream: true,
                include_usage: false,
                max_tokens: Some(1024),
                prompt_tokens_estimate: want,
                prefix: None,
            }
        );
        assert_eq!(
            info(
                Messages,
                json!({"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}]})
            )
            .prompt_tokens_estimate,
            4 + 3 + 1
        );
    }

    #[test]
    fn responses_embeddings_completions() {
        let r = info(
            Responses,
            json!({"model": "o4-mini", "instructions": "Be brief.", "input": "Hello, world!", "max_output_tokens": 500}),
        );
        assert_eq!(
            (r.model.as_deref(), r.max_tokens, r.prompt_tokens_estimate),
            (Some("o4-mini"), Some(500), 3 + 4)
        );
        let items = json!({"input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Hello, world!"}, {"type": "input_image", "image_url": "https://example.com/a.png"}]},
            {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "done"}
        ]});
        let want = 3 * 4
            + 4
            + MEDIA_PART_TOKENS
            + text_tokens("lookup")
            + text_tokens("{}")
            + text_tokens("done");
        assert_eq!(info(Responses, items).prompt_tokens_estimate, want);
        // Stateful follow-ups may carry no input at all.
        assert_eq!(
            info(Responses, json!({"previous_response_id": "resp_1"})).prompt_tokens_estimate,
            0
        );

        assert_eq!(
            info(Embeddings, json!({"input": "Hello, world!"})).prompt_tokens_estimate,
            4
        );
        assert_eq!(
            info(
                Embeddings,
                json!({"input": ["Hello, world!", "hello world"]})
            )
            .prompt_tokens_estimate,
            6
        );
        assert_eq!(
            info(Embeddings, json!({"input": [[9906, 11, 1917, 0]]})).prompt_tokens_estimate,
            4
        );
        assert_eq!(
            info(
                Completions,
                json!({"prompt": "Say this is a test", "max_tokens": 7})
            )
            .max_tokens,
            Some(7)
        );
        assert_eq!(
            info(Completions, json!({"prompt": ["a b", "c"]})).prompt_tokens_estimate,
            3
        );
    }

    #[test]
    fn invalid_bodies() {
        assert_eq!(
            inspect(ChatCompletions, b"{\"model\":\"\xff\"}"),
            Err(RequestError::InvalidUtf8)
        );
        assert_eq!(
            err(ChatCompletions, r#"{"model":"#),
            RequestError::InvalidJson("EOF while parsing a value at line 1 column 9".into())
        );
        assert_eq!(
            err(ChatCompletions, r#"{"messages": [}"#),
            RequestError::InvalidJson("expected value at line 1 column 15".into())
        );
        for empty in ["", " ", "\r\n\t "] {
            assert_eq!(err(ChatCompletions, empty), RequestError::EmptyBody);
            assert_eq!(err(Other, empty), RequestError::EmptyBody);
        }
        assert!(matches!(
            err(ChatCompletions, "hello"),
            RequestError::InvalidJson(_)
        ));
        assert!(matches!(
            err(ChatCompletions, r#"{"a":1} x"#),
            RequestError::InvalidJson(_)
        ));
        // Nesting beyond serde_json's limit in a member that is measured: an error, not a crash.
        let deep = format!(
            r#"{{"messages":[{{"content":{}"x"{}}}]}}"#,
            "[".repeat(300),
            "]".repeat(300)
        );
        assert!(matches!(
            err(ChatCompletions, &deep),
            RequestError::InvalidJson(e) if e.contains("recursion limit")
        ));
        for body in ["[1, 2]", " \"text\"", "42", "null", "true"] {
            assert_eq!(
                err(ChatCompletions, body),
                RequestError::NotAnObject,
                "{body}"
            );
            assert_eq!(err(Other, body), RequestError::NotAnObject, "{body}");
        }
    }

    #[test]
    fn wrong_types() {
        let m = r#""messages":[{"role":"user","content":"hi"}]"#;
        for (api, body, field, expected) in [
            (
                ChatCompletions,
                format!(r#"{{"model":5,{m}}}"#),
                "model",
                "a string",
            ),
            (
                ChatCompletions,
                format!(r#"{{"stream":"yes",{m}}}"#),
                "stream",
                "a boolean",
            ),
            (
                ChatCompletions,
                format!(r#"{{"stream_options":true,{m}}}"#),
                "stream_options",
                "an object",
            ),
            (
                ChatCompletions,
                format!(r#"{{"stream_options":{{"include_usage":"true"}},{m}}}"#),
                "stream_options.include_usage",
                "a boolean",
            ),
            (
                ChatCompletions,
                format!(r#"{{"max_tokens":-1,{m}}}"#),
                "max_tokens",
                "a non-negative integer",
            ),
            (
                ChatCompletions,
                format!(r#"{{"max_completion_tokens":1.5,{m}}}"#),
                "max_completion_tokens",
                "a non-negative integer",
            ),
            (
                Responses,
                r#"{"max_output_tokens":"100"}"#.into(),
                "max_output_tokens",
                "a non-negative integer",
            ),
            (
                ChatCompletions,
                r#"{"messages":{"role":"user"}}"#.into(),
                "messages",
                "an array",
            ),
            (
                Messages,
                r#"{"messages":"hi"}"#.into(),
                "messages",
                "an array",
            ),
            (
                Messages,
                format!(r#"{{"system":{{"text":"x"}},{m}}}"#),
                "system",
                "a string or an array",
            ),
            (
                Responses,
                r#"{"instructions":["x"]}"#.into(),
                "instructions",
                "a string",
            ),
            (
                Completions,
                r#"{"prompt":7}"#.into(),
                "prompt",
                "a string or an array",
            ),
            (
                Embeddings,
                r#"{"input":{"text":"x"}}"#.into(),
                "input",
                "a string or an array",
            ),
            (
                ChatCompletions,
                format!(r#"{{"tools":{{}},{m}}}"#),
                "tools",
                "an array",
            ),
            (
                ChatCompletions,
                format!(r#"{{"functions":"f",{m}}}"#),
                "functions",
                "an array",
            ),
        ] {
            assert_eq!(
                err(api, &body),
                RequestError::WrongType(field, expected),
                "{body}"
            );
        }
    }

    #[test]
    fn missing_and_empty() {
        assert_eq!(
            err(ChatCompletions, r#"{"model":"gpt-4o"}"#),
            RequestError::MissingField("messages")
        );
        assert_eq!(
            err(ChatCompletions, r#"{"messages":null}"#),
            RequestError::MissingField("messages")
        );
        assert_eq!(
            err(Messages, r#"{"max_tokens":10}"#),
            RequestError::MissingField("messages")
        );
        assert_eq!(
            err(Embeddings, r#"{"model":"text-embedding-3-small"}"#),
            RequestError::MissingField("input")
        );
        assert_eq!(
            err(Completions, r#"{"model":"gpt-3.5-turbo-instruct"}"#),
            RequestError::MissingField("prompt")
        );
        assert_eq!(
            err(ChatCompletions, r#"{"messages":[]}"#),
            RequestError::EmptyMessages
        );
        assert_eq!(
            err(Messages, r#"{"messages":[],"max_tokens":1}"#),
            RequestError::EmptyMessages
        );
        // Unknown endpoints are only required to be JSON objects.
        let other = info(
            Other,
            json!({"model": 5, "stream": true, "messages": [], "max_tokens": "x"}),
        );
        assert_eq!(
            other,
            RequestInfo {
                model: None,
                stream: true,
                include_usage: false,
                max_tokens: None,
                prompt_tokens_estimate: 0,
                prefix: None,
            }
        );
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            RequestError::EmptyMessages.to_string(),
            "'messages' must be a non-empty array"
        );
        assert_eq!(
            RequestError::WrongType("messages", "an array").to_string(),
            "'messages' must be an array"
        );
        assert_eq!(
            RequestError::MissingField("input").to_string(),
            "'input' is required"
        );
        assert_eq!(
            RequestError::EmptyBody.to_string(),
            "The request body is empty; expected a JSON object."
        );
        assert_eq!(
            RequestError::NotAnObject.to_string(),
            "request body must be a JSON object"
        );
        assert_eq!(
            RequestError::InvalidUtf8.to_string(),
            "request body is not valid UTF-8"
        );
        assert_eq!(
            RequestError::InvalidJson("expected value at line 1 column 1".into()).to_string(),
            "request body is not valid JSON: expected value at line 1 column 1"
        );
    }

    fn parsed(out: Option<Vec<u8>>) -> Value {
        out.and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    #[test]
    fn a_rewritten_body_keeps_the_client_s_key_order_and_number_text() {
        let body = br#"{"stream":true,"model":"gpt-4o","temperature":0.70,"seed":12345678901234567890123,"messages":[]}"#;
        assert_eq!(
            String::from_utf8(with_include_usage(body).unwrap_or_default()).unwrap_or_default(),
            r#"{"stream":true,"model":"gpt-4o","temperature":0.70,"seed":12345678901234567890123,"messages":[],"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            String::from_utf8(with_max_tokens(body, 64).unwrap_or_default()).unwrap_or_default(),
            r#"{"stream":true,"model":"gpt-4o","temperature":0.70,"seed":12345678901234567890123,"messages":[],"max_tokens":64}"#
        );
    }

    fn text(out: Option<Vec<u8>>) -> String {
        String::from_utf8(out.unwrap_or_default()).unwrap_or_default()
    }

    #[test]
    fn rewrites_keep_every_other_byte() {
        let body = "{ \"seed\": 12345678901234567890123, \"temperature\": 1.0e3,\n  \"model\" : \"gpt-\\u00e9\\/4o\",\"stop\":[\"\\/\"],\n  \"messages\": [{\"role\":\"user\",\"content\":\"h\\u00e9\"}] }\n";
        let rest = |model: &str| {
            format!("{{ \"seed\": 12345678901234567890123, \"temperature\": 1.0e3,\n  \"model\" : {model},\"stop\":[\"\\/\"],\n  \"messages\": [{{\"role\":\"user\",\"content\":\"h\\u00e9\"}}] }}\n")
        };
        assert_eq!(
            text(with_model(body.as_bytes(), "m\u{e9}\"")),
            rest("\"m\u{e9}\\\"\"")
        );
        // Absent members go last, before the closing brace (trailing whitespace kept).
        let tail = "\n  \"messages\": [{\"role\":\"user\",\"content\":\"h\\u00e9\"}] ";
        let added =
            |member: &str| body.replacen(&format!("{tail}}}"), &format!("{tail},{member}}}"), 1);
        assert_eq!(
            text(with_max_tokens(body.as_bytes(), 7)),
            added("\"max_tokens\":7")
        );
        assert_eq!(
            text(with_include_usage(body.as_bytes())),
            added("\"stream_options\":{\"include_usage\":true}")
        );
        assert_eq!(text(with_model(b"{}", "m")), r#"{"model":"m"}"#);
        assert_eq!(text(with_model(b" { } ", "m")), r#" { "model":"m"} "#);
    }

    #[test]
    fn rewrites_in_place_and_inside_stream_options() {
        let body = br#"{"max_output_tokens": 9 ,"stream_options":{ "x":1 },"max_tokens":null}"#;
        assert_eq!(
            text(with_max_tokens(body, 5)),
            r#"{"max_output_tokens": 5 ,"stream_options":{ "x":1 },"max_tokens":5}"#
        );
        assert_eq!(
            text(with_include_usage(body)),
            r#"{"max_output_tokens": 9 ,"stream_options":{ "x":1 ,"include_usage":true},"max_tokens":null}"#
        );
        assert_eq!(
            text(with_include_usage(
                br#"{"stream_options":{"include_usage" : false}}"#
            )),
            r#"{"stream_options":{"include_usage" : true}}"#
        );
        assert_eq!(
            text(with_include_usage(br#"{"stream_options":{}}"#)),
            r#"{"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            text(with_include_usage(br#"{"stream_options":7}"#)),
            r#"{"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn repeated_keys_the_last_one_is_read_and_rewritten() {
        let body = br#"{"model":"a","model":"b","max_tokens":1,"max_tokens":2}"#;
        let read = inspect(Other, body).map(|i| (i.model, i.max_tokens));
        assert_eq!(read, Ok((Some("b".into()), Some(2))));
        assert_eq!(
            text(with_model(body, "c")),
            r#"{"model":"a","model":"c","max_tokens":1,"max_tokens":2}"#
        );
        assert_eq!(
            text(with_max_tokens(body, 9)),
            r#"{"model":"a","model":"b","max_tokens":1,"max_tokens":9}"#
        );
        // What serde_json's own reading takes.
        let value: Value =
            serde_json::from_slice(&with_model(body, "c").unwrap_or_default()).unwrap_or_default();
        assert_eq!(value["model"], "c");
    }

    #[test]
    fn rewrites() {
        let body = br#"{"stream":true,"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"temperature":0.7}"#;
        // Compared as values, whatever the order of the keys.
        let out = with_include_usage(body).unwrap_or_default();
        assert_eq!(
            parsed(Some(out.clone())),
            json!({"messages": [{"content": "hi", "role": "user"}], "model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}, "temperature": 0.7})
        );
        assert_eq!(
            out.len(),
            body.len() + r#","stream_options":{"include_usage":true}"#.len()
        );
        assert_eq!(
            parsed(with_include_usage(
                br#"{"stream_options":{"include_usage":false,"chunk":1}}"#
            )),
            json!({"stream_options": {"include_usage": true, "chunk": 1}})
        );
        assert_eq!(
            parsed(with_include_usage(br#"{"stream_options":null}"#)),
            json!({"stream_options": {"include_usage": true}})
        );
        assert_eq!(
            parsed(with_model(body, "gpt-4o-mini")).get("model"),
            Some(&json!("gpt-4o-mini"))
        );
        assert_eq!(
            parsed(with_model(br#"{"a":1}"#, "m")),
            json!({"a": 1, "model": "m"})
        );
        assert_eq!(
            parsed(with_max_tokens(body, 100)).get("max_tokens"),
            Some(&json!(100))
        );
        assert_eq!(
            parsed(with_max_tokens(
                br#"{"max_completion_tokens":4000,"x":[1]}"#,
                50
            )),
            json!({"max_completion_tokens": 50, "x": [1]})
        );
        assert_eq!(
            parsed(with_max_tokens(br#"{"max_output_tokens":9}"#, 5)),
            json!({"max_output_tokens": 5})
        );
        assert_eq!(
            parsed(with_max_tokens(
                br#"{"max_tokens":9,"max_completion_tokens":9}"#,
                u64::MAX
            )),
            json!({"max_tokens": u64::MAX, "max_completion_tokens": u64::MAX})
        );
        for bad in [&b"[1]"[..], b"\"s\"", b"{", b"", b"\xff"] {
            assert_eq!(with_include_usage(bad), None);
            assert_eq!(with_model(bad, "m"), None);
            assert_eq!(with_max_tokens(bad, 1), None);
        }
    }

    fn prefix(api: ApiKind, body: Value) -> Option<u64> {
        inspect_with(api, body.to_string().as_bytes(), true)
            .unwrap()
            .prefix
    }

    #[test]
    fn the_leading_prompt_is_the_system_and_first_user_turn() {
        let chat = |system: &str, first: &str, later: &str| {
            json!({"model": "m", "messages": [
                {"role": "system", "content": system},
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": first},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": later}]})
        };
        let base = prefix(ChatCompletions, chat("S", "Q", "one"));
        assert!(base.is_some());
        assert_eq!(
            base,
            prefix(ChatCompletions, chat("S", "Q", "two")),
            "later turns"
        );
        assert_ne!(
            base,
            prefix(ChatCompletions, chat("S2", "Q", "one")),
            "system"
        );
        assert_ne!(
            base,
            prefix(ChatCompletions, chat("S", "Q2", "one")),
            "first user turn"
        );
        // What is hashed: each part's name and its JSON text as the client wrote it.
        let text = r#"{"messages":[{"role":"system","content":"S"},{"role":"user","content":"Q"},{"role":"user","content":"R"}]}"#;
        let want = xxhash_rust::xxh3::xxh3_64(
            b"turn\0{\"role\":\"system\",\"content\":\"S\"}\0turn\0{\"role\":\"user\",\"content\":\"Q\"}\0",
        );
        assert_eq!(
            inspect_with(ChatCompletions, text.as_bytes(), true)
                .unwrap()
                .prefix,
            Some(want)
        );
        assert_eq!(
            inspect(ChatCompletions, text.as_bytes()).unwrap().prefix,
            None,
            "not asked"
        );

        // Anthropic: `system` and the first message.
        let messages = |system: &str, later: &str| {
            json!({"model": "m", "max_tokens": 5, "system": system, "messages": [
                {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                {"role": "user", "content": later}]})
        };
        let m = prefix(Messages, messages("S", "x"));
        assert_eq!(m, prefix(Messages, messages("S", "y")));
        assert_ne!(m, prefix(Messages, messages("T", "x")));
        // Responses: instructions and the input up to its first user item (a string is one).
        let responses = |input: Value| json!({"model": "m", "instructions": "I", "input": input});
        assert_eq!(
            prefix(
                Responses,
                responses(
                    json!([{"role": "user", "content": "Q"}, {"role": "user", "content": "x"}])
                )
            ),
            prefix(
                Responses,
                responses(
                    json!([{"role": "user", "content": "Q"}, {"role": "user", "content": "y"}])
                )
            )
        );
        assert_ne!(
            prefix(Responses, responses(json!("Q"))),
            prefix(Responses, responses(json!("R")))
        );
        assert_eq!(
            prefix(Embeddings, json!({"model": "m", "input": "x"})),
            None
        );
    }
}
