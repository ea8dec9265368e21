//! What the gateway needs from a client request body, and the few rewrites it makes to it.

use std::fmt;

use crate::json::{Map, Value};

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
}

#[derive(Debug, Clone, PartialEq)]
pub enum RequestError {
    InvalidUtf8,
    /// The parser's message, e.g. "EOF while parsing an object at line 1 column 10".
    InvalidJson(String),
    NotAnObject,
    /// (field path, expected), e.g. ("messages", "an array").
    WrongType(&'static str, &'static str),
    /// `messages` present but [] (chat completions and Anthropic messages).
    EmptyMessages,
    /// e.g. "messages" for ChatCompletions/Messages, "input" for embeddings.
    MissingField(&'static str),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::InvalidUtf8 => f.write_str("request body is not valid UTF-8"),
            RequestError::InvalidJson(e) => write!(f, "request body is not valid JSON: {e}"),
            RequestError::NotAnObject => f.write_str("request body must be a JSON object"),
            RequestError::WrongType(field, expected) => write!(f, "'{field}' must be {expected}"),
            RequestError::EmptyMessages => f.write_str("'messages' must be a non-empty array"),
            RequestError::MissingField(field) => write!(f, "missing required field '{field}'"),
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

#[derive(Clone, Copy)]
enum Expect {
    Str,
    Bool,
    Obj,
    Arr,
    StrOrArr,
    Count,
}

impl Expect {
    fn accepts(self, v: &Value) -> bool {
        match self {
            Expect::Str => v.is_string(),
            Expect::Bool => v.is_boolean(),
            Expect::Obj => v.is_object(),
            Expect::Arr => v.is_array(),
            Expect::StrOrArr => v.is_string() || v.is_array(),
            Expect::Count => v.is_u64(),
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
    use Expect::*;
    let text = std::str::from_utf8(body).map_err(|_| RequestError::InvalidUtf8)?;
    let value =
        crate::json::from_str(text).map_err(|e| RequestError::InvalidJson(e.to_string()))?;
    let Value::Object(body) = &value else {
        return Err(RequestError::NotAnObject);
    };
    let strict = api != ApiKind::Other;
    let field = |name: &'static str, expect| check(body.get(name), name, expect, strict);
    let model = field("model", Str)?
        .and_then(Value::as_str)
        .map(str::to_owned);
    let stream = field("stream", Bool)?.and_then(Value::as_bool);
    let include_usage = field("stream_options", Obj)?.and_then(|o| o.get("include_usage"));
    let include_usage = check(include_usage, "stream_options.include_usage", Bool, strict)?
        .and_then(Value::as_bool);
    let max_completion = field("max_completion_tokens", Count)?;
    let max = field("max_tokens", Count)?;
    let max_output = field("max_output_tokens", Count)?;
    let max_tokens = max_completion
        .or(max)
        .or(max_output)
        .and_then(Value::as_u64);

    let messages = field("messages", Arr)?;
    let system = field("system", StrOrArr)?;
    let instructions = field("instructions", Str)?;
    let prompt = field("prompt", StrOrArr)?;
    let input = field("input", StrOrArr)?;
    let tools = field("tools", Arr)?;
    let functions = field("functions", Arr)?;

    let required = match api {
        ApiKind::ChatCompletions | ApiKind::Messages => Some(("messages", messages)),
        ApiKind::Completions => Some(("prompt", prompt)),
        ApiKind::Embeddings => Some(("input", input)),
        ApiKind::Responses | ApiKind::Other => None,
    };
    if let Some((field, None)) = required {
        return Err(RequestError::MissingField(field));
    }
    if strict
        && messages
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
    {
        return Err(RequestError::EmptyMessages);
    }

    let mut estimate = 0u64;
    if let Some(Value::Array(msgs)) = messages {
        for m in msgs {
            estimate = estimate
                .saturating_add(MESSAGE_OVERHEAD)
                .saturating_add(content_tokens(m));
        }
    }
    // Responses API input items are messages too; a plain string input is one user message.
    if let Some(Value::Array(items)) = input {
        if api == ApiKind::Responses {
            estimate = estimate.saturating_add(MESSAGE_OVERHEAD.saturating_mul(items.len() as u64));
        }
    }
    for v in [system, instructions, prompt, input].into_iter().flatten() {
        estimate = estimate.saturating_add(content_tokens(v));
    }
    for v in [tools, functions].into_iter().flatten() {
        estimate = estimate.saturating_add(text_tokens(&v.to_string()));
    }

    Ok(RequestInfo {
        model,
        stream: stream.unwrap_or(false),
        include_usage: include_usage.unwrap_or(false),
        max_tokens,
        prompt_tokens_estimate: estimate,
    })
}

/// A field of the body, `None` when absent or `null`; of the wrong type, an error when `strict`
/// and absent otherwise.
fn check<'v>(
    v: Option<&'v Value>,
    field: &'static str,
    expect: Expect,
    strict: bool,
) -> Result<Option<&'v Value>, RequestError> {
    match v.filter(|v| !v.is_null()) {
        Some(v) if !expect.accepts(v) => match strict {
            true => Err(RequestError::WrongType(field, expect.describe())),
            false => Ok(None),
        },
        v => Ok(v),
    }
}

/// Tokens of the text a model reads in a message, content part or input item. Only keys that
/// carry text are followed, so ids, URLs and base64 payloads are never counted as text.
fn content_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => text_tokens(s),
        // Token-id prompts (`[1, 2, 3]`): one token per id.
        Value::Number(_) => 1,
        Value::Array(items) => items
            .iter()
            .fold(0u64, |n, item| n.saturating_add(content_tokens(item))),
        Value::Object(part) => object_tokens(part),
        Value::Bool(_) | Value::Null => 0,
    }
}

fn object_tokens(part: &Map<String, Value>) -> u64 {
    if part
        .get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| MEDIA_TYPES.contains(&t))
    {
        return MEDIA_PART_TOKENS;
    }
    part.iter().fold(0u64, |n, (key, value)| {
        let tokens = match (key.as_str(), value) {
            // Tool-use input objects are serialized JSON to the model.
            ("input", Value::Object(_)) => text_tokens(&value.to_string()),
            (
                "content" | "text" | "thinking" | "refusal" | "name" | "arguments" | "output"
                | "input" | "summary" | "tool_calls" | "function_call" | "function",
                _,
            ) => content_tokens(value),
            _ => 0,
        };
        n.saturating_add(tokens)
    })
}

/// Parses the body as a JSON object, applies `edit` and serializes it back (compact; key order
/// as [`crate::json`] keeps it).
fn rewrite(body: &[u8], edit: impl FnOnce(&mut Map<String, Value>)) -> Option<Vec<u8>> {
    let mut value: Value = crate::json::from_slice(body).ok()?;
    edit(value.as_object_mut()?);
    crate::json::to_vec(&value).ok()
}

/// Returns the body with `stream_options.include_usage` set to true (other fields untouched, order kept
/// as far as [`crate::json`] keeps it), or None if the body is not a JSON object.
pub fn with_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    rewrite(body, |obj| match obj.get_mut("stream_options") {
        Some(Value::Object(options)) => {
            options.insert("include_usage".into(), Value::Bool(true));
        }
        _ => {
            let options = Map::from_iter([("include_usage".to_owned(), Value::Bool(true))]);
            obj.insert("stream_options".into(), Value::Object(options));
        }
    })
}

/// Returns the body with "model" replaced, or None if not a JSON object.
pub fn with_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    rewrite(body, |obj| {
        obj.insert("model".into(), Value::String(model.to_owned()));
    })
}

/// Returns the body with max_tokens (or whichever of the three fields is present, each of them if
/// several are; max_tokens if none) set.
pub fn with_max_tokens(body: &[u8], max_tokens: u64) -> Option<Vec<u8>> {
    rewrite(body, |obj| {
        let present: Vec<&str> = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .into_iter()
            .filter(|k| obj.contains_key(k))
            .collect();
        let fields = if present.is_empty() {
            &["max_tokens"][..]
        } else {
            &present[..]
        };
        for field in fields {
            obj.insert((*field).into(), Value::from(max_tokens));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::json;
    use ApiKind::*;

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
                prompt_tokens_estimate: 8
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
        assert_eq!(
            err(ChatCompletions, ""),
            RequestError::InvalidJson("EOF while parsing a value at line 1 column 0".into())
        );
        assert!(matches!(
            err(ChatCompletions, "hello"),
            RequestError::InvalidJson(_)
        ));
        assert!(matches!(
            err(ChatCompletions, r#"{"a":1} x"#),
            RequestError::InvalidJson(_)
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
                prompt_tokens_estimate: 0
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
            "missing required field 'input'"
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
        out.and_then(|b| crate::json::from_slice(&b).ok())
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
}
