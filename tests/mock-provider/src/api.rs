//! The provider APIs: routing, key extraction, and deterministic bodies in the real wire formats.

use crate::http::Request;
use crate::state::{Rule, Usage};
use serde_json::{json, Map, Value};

/// Which API's error shape and conventions apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    OpenAi,
    Azure,
    Anthropic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Messages,
    Embeddings,
    /// Anthropic's `/v1/messages/count_tokens`: `{"input_tokens": n}`.
    CountTokens,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub flavor: Flavor,
    pub endpoint: Endpoint,
    pub deployment: Option<String>,
}

pub struct Ctx<'a> {
    pub name: &'a str,
    pub seq: u64,
    pub now_ms: u64,
}

pub enum Body {
    Full(Vec<u8>),
    /// Events already truncated to what gets sent; `cut` = close without the terminating chunk.
    Stream {
        events: Vec<String>,
        cut: bool,
        chunk_delay_ms: u64,
    },
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    /// What the client was told, for the request log.
    pub usage: Option<Usage>,
    pub delay_ms: u64,
    /// Header values go out as Latin-1 bytes (see `Rule::latin1_headers`).
    pub latin1_headers: bool,
}

/// One SSE event, with the usage it tells the client (if any).
struct Event {
    data: String,
    content: bool,
    reports: Option<Usage>,
}

/// Tokens reported for a tool call: the mock's content is fixed, so is its cost.
pub const TOOL_CALL_OUTPUT_TOKENS: u64 = 12;
const TOOL_ARGS_PIECES: [&str; 3] = ["{\"city\"", ":\"Par", "is\"}"];
const FILLER: [&str; 8] = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
];
const MAX_WORDS: usize = 100_000;
const MAX_EMBEDDING_INPUTS: usize = 256;

/// Maps the path to an API; Azure and unknown paths answer 404 like the real services.
fn route(req: &Request) -> Result<Target, (Flavor, String)> {
    let path = req.path();
    if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        let not_found = || (Flavor::Azure, "Resource not found".to_string());
        let (deployment, op) = rest.split_once('/').ok_or_else(not_found)?;
        let endpoint = match op {
            "chat/completions" => Endpoint::Chat,
            "embeddings" => Endpoint::Embeddings,
            _ => return Err(not_found()),
        };
        if deployment.is_empty() || req.query_param("api-version").is_none_or(str::is_empty) {
            return Err(not_found());
        }
        return Ok(Target {
            flavor: Flavor::Azure,
            endpoint,
            deployment: Some(deployment.into()),
        });
    }
    // Suffix matching so OpenAI-compatible providers with a base path prefix work too.
    let (flavor, endpoint) = if path.ends_with("/chat/completions") {
        (Flavor::OpenAi, Endpoint::Chat)
    } else if path.ends_with("/messages") {
        (Flavor::Anthropic, Endpoint::Messages)
    } else if path.ends_with("/messages/count_tokens") {
        (Flavor::Anthropic, Endpoint::CountTokens)
    } else if path.ends_with("/embeddings") {
        (Flavor::OpenAi, Endpoint::Embeddings)
    } else {
        return Err((
            Flavor::OpenAi,
            format!("Invalid URL ({} {})", req.method, path),
        ));
    };
    Ok(Target {
        flavor,
        endpoint,
        deployment: None,
    })
}

/// `Authorization: Bearer X`, else `api-key`, else `x-api-key`; empty values count as absent.
pub fn extract_key(req: &Request) -> Option<String> {
    ["authorization", "api-key", "x-api-key"]
        .iter()
        .find_map(|name| {
            let v = req.header(name)?.trim();
            let v = if *name == "authorization" {
                // Header values arrive trimmed, so a bare "Bearer" is an empty token.
                let rest = v.get(6..).unwrap_or("x");
                match v.get(..6) {
                    Some(p)
                        if p.eq_ignore_ascii_case("bearer")
                            && (rest.is_empty() || rest.starts_with(' ')) =>
                    {
                        rest.trim()
                    }
                    _ => v,
                }
            } else {
                v
            };
            (!v.is_empty()).then(|| v.to_string())
        })
}

/// Best effort, for the log: did the request ask for a stream?
pub fn requested_stream(req: &Request) -> bool {
    serde_json::from_slice::<Value>(&req.body)
        .ok()
        .is_some_and(|v| v.get("stream") == Some(&Value::Bool(true)))
}

/// Checks that need no rule: route, method, key. `Err` is the reply to send.
pub fn prepare(req: &Request, ctx: &Ctx) -> Result<Target, Reply> {
    let target = route(req).map_err(|(flavor, msg)| error(flavor, 404, Some(&msg), ctx))?;
    if req.method != "POST" {
        return Err(error(target.flavor, 405, None, ctx));
    }
    if extract_key(req).is_none() {
        return Err(error(target.flavor, 401, None, ctx));
    }
    Ok(target)
}

fn base_headers(ctx: &Ctx, content_type: &str) -> Vec<(String, String)> {
    vec![
        ("content-type".into(), content_type.into()),
        ("x-mock-name".into(), ctx.name.into()),
        ("x-mock-seq".into(), ctx.seq.to_string()),
    ]
}

fn merge(mut base: Vec<(String, String)>, extra: Vec<(String, String)>) -> Vec<(String, String)> {
    for (k, v) in extra {
        match base.iter_mut().find(|(n, _)| *n == k) {
            Some(slot) => slot.1 = v,
            None => base.push((k, v)),
        }
    }
    base
}

fn json_reply(status: u16, body: &Value, usage: Option<Usage>, ctx: &Ctx) -> Reply {
    Reply {
        status,
        headers: base_headers(ctx, "application/json"),
        body: Body::Full(body.to_string().into_bytes()),
        usage,
        delay_ms: 0,
        latin1_headers: false,
    }
}

fn default_message(flavor: Flavor, status: u16) -> &'static str {
    match (flavor, status) {
        (Flavor::Anthropic, 401) => "invalid x-api-key",
        (Flavor::Azure, 401) => {
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."
        }
        (_, 401) => "Incorrect API key provided.",
        (_, 404) => "Resource not found",
        (_, 405) => "Method not allowed",
        (_, 429) => "Rate limit reached for requests",
        (_, 529) => "Overloaded",
        (_, 500..) => "The server had an error while processing your request.",
        _ => "Invalid request",
    }
}

/// An error body in the API's own shape.
pub fn error_body(flavor: Flavor, status: u16, msg: Option<&str>) -> Value {
    let msg = msg.unwrap_or_else(|| default_message(flavor, status));
    match flavor {
        Flavor::OpenAi => {
            let (kind, code) = match status {
                401 => ("invalid_request_error", json!("invalid_api_key")),
                429 => ("requests", json!("rate_limit_exceeded")),
                500.. => ("server_error", Value::Null),
                _ => ("invalid_request_error", Value::Null),
            };
            json!({"error": {"message": msg, "type": kind, "param": null, "code": code}})
        }
        Flavor::Azure => json!({"error": {"code": status.to_string(), "message": msg}}),
        Flavor::Anthropic => {
            let kind = match status {
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                500.. => "api_error",
                _ => "invalid_request_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": msg}})
        }
    }
}

fn error(flavor: Flavor, status: u16, msg: Option<&str>, ctx: &Ctx) -> Reply {
    json_reply(status, &error_body(flavor, status, msg), None, ctx)
}

/// The reply for a request that passed `prepare`, shaped by the matching rule (if any).
pub fn answer(target: &Target, req: &Request, rule: Option<Rule>, ctx: &Ctx) -> Reply {
    let rule = rule.unwrap_or_default();
    let status = rule.status.unwrap_or(200);
    let mut reply = answer_unscripted(target, req, &rule, status, ctx);
    reply.headers = merge(reply.headers, rule.header_pairs());
    reply.delay_ms = rule.delay_ms;
    reply.latin1_headers = rule.latin1_headers;
    reply
}

fn answer_unscripted(target: &Target, req: &Request, rule: &Rule, status: u16, ctx: &Ctx) -> Reply {
    if let Some(raw) = &rule.body {
        return Reply {
            status,
            headers: base_headers(ctx, "application/json"),
            body: Body::Full(raw.clone().into_bytes()),
            usage: None,
            delay_ms: 0,
            latin1_headers: false,
        };
    }
    if status >= 400 {
        return error(target.flavor, status, None, ctx);
    }
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&req.body) else {
        return error(
            target.flavor,
            400,
            Some("We could not parse the JSON body of your request."),
            ctx,
        );
    };
    if let Some(refused) = crate::validate::conversation(target.endpoint, &body) {
        return error(target.flavor, 400, Some(&refused), ctx);
    }
    let ov = rule.usage.clone().unwrap_or_default();
    let computed_input = (req.body.len() / 10).max(1) as u64;
    let tool = wants_tool(&body);
    let words = if tool {
        Vec::new()
    } else if rule.echo {
        echo(&body)
    } else {
        words(ctx.name, rule.words)
    };
    let default_output = if tool {
        TOOL_CALL_OUTPUT_TOKENS
    } else {
        words.len() as u64
    };
    let usage = Usage {
        input: ov.input.unwrap_or(computed_input),
        output: ov.output.unwrap_or(default_output),
        cache_read: ov.cache_read.unwrap_or(0),
        cache_write: ov.cache_write.unwrap_or(0),
    };
    let a = Answer {
        seq: ctx.seq,
        created: ctx.now_ms / 1000,
        usage: (!rule.omit_usage).then_some(usage),
        words,
        tool,
        status,
    };
    let stream = body.get("stream") == Some(&Value::Bool(true));
    let model = |default: &str| match body.get("model") {
        Some(Value::String(m)) => m.clone(),
        _ => target
            .deployment
            .clone()
            .unwrap_or_else(|| default.to_string()),
    };
    let events = match (target.endpoint, stream) {
        (Endpoint::CountTokens, _) => {
            return json_reply(200, &json!({"input_tokens": computed_input}), None, ctx)
        }
        (Endpoint::Embeddings, _) => {
            return embeddings(&body, &model("text-embedding-mock"), &a, target, ctx)
        }
        (Endpoint::Chat, false) => return openai_chat(&model("gpt-mock"), &a, ctx),
        (Endpoint::Messages, false) => return anthropic_message(&model("claude-mock"), &a, ctx),
        (Endpoint::Chat, true) => {
            let include_usage = body
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .is_some_and(|v| v == &Value::Bool(true));
            openai_stream(&model("gpt-mock"), &a, include_usage)
        }
        (Endpoint::Messages, true) => {
            anthropic_stream(&model("claude-mock"), &a, rule.omit_delta_usage)
        }
    };
    stream_reply(events, rule, status, ctx)
}

struct Answer {
    seq: u64,
    created: u64,
    usage: Option<Usage>,
    words: Vec<String>,
    tool: bool,
    status: u16,
}

impl Answer {
    fn content(&self) -> String {
        self.words.join(" ")
    }

    /// Stream pieces: concatenated they give exactly `content()`.
    fn pieces(&self) -> impl Iterator<Item = String> + '_ {
        self.words
            .iter()
            .enumerate()
            .map(|(i, w)| if i == 0 { w.clone() } else { format!(" {w}") })
    }
}

fn words(name: &str, n: Option<usize>) -> Vec<String> {
    let base = format!("Hello from {name}.");
    let base = base.split_whitespace().map(String::from);
    match n {
        None => base.collect(),
        Some(n) => base
            .chain(FILLER.iter().cycle().map(|s| s.to_string()))
            .take(n.min(MAX_WORDS))
            .collect(),
    }
}

/// "Echo:" and the words of the last user message.
fn echo(body: &Map<String, Value>) -> Vec<String> {
    let last_user = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        });
    let text = text_of(last_user.and_then(|m| m.get("content")));
    std::iter::once("Echo:".to_string())
        .chain(text.split_whitespace().take(MAX_WORDS).map(String::from))
        .collect()
}

fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Tools offered and the last message is a user message about the weather.
fn wants_tool(body: &Map<String, Value>) -> bool {
    let has_tools = body
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    let last = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last());
    has_tools
        && last.is_some_and(|m| {
            m.get("role").and_then(Value::as_str) == Some("user")
                && text_of(m.get("content")).to_lowercase().contains("weather")
        })
}

fn openai_usage(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.input,
        "completion_tokens": u.output,
        "total_tokens": u.input.saturating_add(u.output),
        "prompt_tokens_details": {"cached_tokens": u.cache_read},
        "completion_tokens_details": {"reasoning_tokens": 0},
    })
}

/// OpenAI has no cache-write counter, so none is reported.
fn openai_reported(u: Option<Usage>) -> Option<Usage> {
    u.map(|u| Usage {
        cache_write: 0,
        ..u
    })
}

fn anthropic_usage(u: &Usage, output: u64) -> Value {
    json!({
        "input_tokens": u.input,
        "output_tokens": output,
        "cache_creation_input_tokens": u.cache_write,
        "cache_read_input_tokens": u.cache_read,
    })
}

fn tool_call_id(seq: u64) -> String {
    format!("call_mock_{seq}")
}

fn openai_chat(model: &str, a: &Answer, ctx: &Ctx) -> Reply {
    let (message, finish) = if a.tool {
        let call = json!({"id": tool_call_id(a.seq), "type": "function",
            "function": {"name": "get_weather", "arguments": TOOL_ARGS_PIECES.concat()}});
        (
            json!({"role": "assistant", "content": null, "tool_calls": [call], "refusal": null}),
            "tool_calls",
        )
    } else {
        (
            json!({"role": "assistant", "content": a.content(), "refusal": null}),
            "stop",
        )
    };
    let body = json!({
        "id": format!("chatcmpl-mock-{}", a.seq),
        "object": "chat.completion",
        "created": a.created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": a.usage.as_ref().map(openai_usage),
    });
    json_reply(a.status, &body, openai_reported(a.usage), ctx)
}

fn anthropic_message(model: &str, a: &Answer, ctx: &Ctx) -> Reply {
    let (content, stop) = if a.tool {
        let block = json!({"type": "tool_use", "id": format!("toolu_mock_{}", a.seq), "name": "get_weather",
            "input": {"city": "Paris"}});
        (block, "tool_use")
    } else {
        (json!({"type": "text", "text": a.content()}), "end_turn")
    };
    let body = json!({
        "id": format!("msg_mock_{}", a.seq),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [content],
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": a.usage.as_ref().map(|u| anthropic_usage(u, u.output)),
    });
    json_reply(a.status, &body, a.usage, ctx)
}

fn embeddings(
    body: &Map<String, Value>,
    model: &str,
    a: &Answer,
    target: &Target,
    ctx: &Ctx,
) -> Reply {
    let count = match body.get("input") {
        Some(Value::String(_)) => 1,
        // A single token array is one input; an array of strings or token arrays is several.
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => 1,
        Some(Value::Array(items)) if !items.is_empty() => items.len().min(MAX_EMBEDDING_INPUTS),
        _ => {
            return error(
                target.flavor,
                400,
                Some("'input' is a required property"),
                ctx,
            )
        }
    };
    let dims = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .unwrap_or(8)
        .clamp(1, 4096);
    let data: Vec<Value> = (0..count as u64)
        .map(|i| {
            let v: Vec<f64> = (0..dims)
                .map(|j| {
                    (a.seq
                        .wrapping_mul(31)
                        .wrapping_add(i * 7)
                        .wrapping_add(j * 13)
                        % 1000) as f64
                        / 1000.0
                        - 0.5
                })
                .collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    let usage = a.usage.map(|u| Usage {
        output: 0,
        cache_read: 0,
        cache_write: 0,
        ..u
    });
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": usage.map(|u| json!({"prompt_tokens": u.input, "total_tokens": u.input})),
    });
    json_reply(a.status, &body, usage, ctx)
}

fn data_event(v: &Value, content: bool, reports: Option<Usage>) -> Event {
    Event {
        data: format!("data: {v}\n\n"),
        content,
        reports,
    }
}

fn named_event(v: &Value, content: bool, reports: Option<Usage>) -> Event {
    let name = v.get("type").and_then(Value::as_str).unwrap_or("message");
    Event {
        data: format!("event: {name}\ndata: {v}\n\n"),
        content,
        reports,
    }
}

fn openai_stream(model: &str, a: &Answer, include_usage: bool) -> Vec<Event> {
    let chunk = |choices: Value| {
        let mut c = json!({
            "id": format!("chatcmpl-mock-{}", a.seq),
            "object": "chat.completion.chunk",
            "created": a.created,
            "model": model,
            "choices": choices,
        });
        // Like the real API: with include_usage every chunk carries "usage": null except the last.
        if include_usage {
            if let Some(o) = c.as_object_mut() {
                o.insert("usage".into(), Value::Null);
            }
        }
        c
    };
    let delta = |d: Value, finish: Value| {
        chunk(json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": finish}]))
    };
    let mut events = Vec::new();
    let finish = if a.tool {
        let first = json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": [{"index": 0,
            "id": tool_call_id(a.seq), "type": "function", "function": {"name": "get_weather", "arguments": ""}}]});
        events.push(data_event(&delta(first, Value::Null), false, None));
        for piece in TOOL_ARGS_PIECES {
            let d = json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]});
            events.push(data_event(&delta(d, Value::Null), true, None));
        }
        "tool_calls"
    } else {
        let first = json!({"role": "assistant", "content": "", "refusal": null});
        events.push(data_event(&delta(first, Value::Null), false, None));
        for piece in a.pieces() {
            events.push(data_event(
                &delta(json!({"content": piece}), Value::Null),
                true,
                None,
            ));
        }
        "stop"
    };
    events.push(data_event(&delta(json!({}), json!(finish)), false, None));
    if let (true, Some(u)) = (include_usage, a.usage) {
        let mut c = chunk(json!([]));
        if let Some(o) = c.as_object_mut() {
            o.insert("usage".into(), openai_usage(&u));
        }
        events.push(data_event(&c, false, openai_reported(Some(u))));
    }
    events.push(Event {
        data: "data: [DONE]\n\n".into(),
        content: false,
        reports: None,
    });
    events
}

fn anthropic_stream(model: &str, a: &Answer, omit_delta_usage: bool) -> Vec<Event> {
    let mut start = json!({"type": "message_start", "message": {
        "id": format!("msg_mock_{}", a.seq), "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": null, "stop_sequence": null}});
    let started = a.usage.map(|u| Usage { output: 1, ..u });
    if let (Some(u), Some(m)) = (
        started,
        start.get_mut("message").and_then(Value::as_object_mut),
    ) {
        m.insert("usage".into(), anthropic_usage(&u, 1));
    }
    let mut events = vec![named_event(&start, false, started)];
    let (block, stop) = if a.tool {
        let block = json!({"type": "tool_use", "id": format!("toolu_mock_{}", a.seq), "name": "get_weather", "input": {}});
        (block, "tool_use")
    } else {
        (json!({"type": "text", "text": ""}), "end_turn")
    };
    events.push(named_event(
        &json!({"type": "content_block_start", "index": 0, "content_block": block}),
        false,
        None,
    ));
    events.push(named_event(&json!({"type": "ping"}), false, None));
    let deltas: Vec<Value> = if a.tool {
        TOOL_ARGS_PIECES
            .iter()
            .map(|p| json!({"type": "input_json_delta", "partial_json": p}))
            .collect()
    } else {
        a.pieces()
            .map(|p| json!({"type": "text_delta", "text": p}))
            .collect()
    };
    for d in deltas {
        events.push(named_event(
            &json!({"type": "content_block_delta", "index": 0, "delta": d}),
            true,
            None,
        ));
    }
    events.push(named_event(
        &json!({"type": "content_block_stop", "index": 0}),
        false,
        None,
    ));
    let mut delta =
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}});
    let delta_usage = a.usage.filter(|_| !omit_delta_usage);
    if let (Some(u), Some(o)) = (delta_usage, delta.as_object_mut()) {
        o.insert("usage".into(), json!({"output_tokens": u.output}));
    }
    events.push(named_event(&delta, false, delta_usage));
    events.push(named_event(&json!({"type": "message_stop"}), false, None));
    events
}

/// Index after which a stream is cut: right after the n-th content event (n clamped to how many
/// there are); n = 0 cuts before the first content event.
fn cut_index(events: &[Event], n: usize) -> usize {
    let content: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.content)
        .map(|(i, _)| i)
        .collect();
    match n.min(content.len()).checked_sub(1) {
        Some(k) => content.get(k).map_or(events.len(), |i| i + 1),
        None => content.first().copied().unwrap_or(events.len()),
    }
}

fn stream_reply(mut events: Vec<Event>, rule: &Rule, status: u16, ctx: &Ctx) -> Reply {
    let cut = rule.cut_after_chunks.is_some();
    if let Some(n) = rule.cut_after_chunks {
        events.truncate(cut_index(&events, n));
    }
    let usage = events.iter().filter_map(|e| e.reports).next_back();
    let mut headers = base_headers(ctx, "text/event-stream; charset=utf-8");
    headers.push(("cache-control".into(), "no-cache".into()));
    Reply {
        status,
        headers,
        body: Body::Stream {
            events: events.into_iter().map(|e| e.data).collect(),
            cut,
            chunk_delay_ms: rule.chunk_delay_ms,
        },
        usage,
        delay_ms: 0,
        latin1_headers: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: Ctx = Ctx {
        name: "openai-a",
        seq: 7,
        now_ms: 1_700_000_000_123,
    };

    fn req(path: &str, headers: &[(&str, &str)], body: &str) -> Request {
        Request {
            method: "POST".into(),
            target: path.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec(),
            ..Request::default()
        }
    }

    fn run(path: &str, body: &str, rule: Option<Rule>) -> Reply {
        let r = req(path, &[("authorization", "Bearer sk-a1")], body);
        let t = prepare(&r, &CTX).map_err(|e| e.status).unwrap();
        answer(&t, &r, rule, &CTX)
    }

    fn full_json(reply: &Reply) -> Value {
        match &reply.body {
            Body::Full(b) => serde_json::from_slice(b).unwrap(),
            Body::Stream { .. } => panic!("expected a full body"),
        }
    }

    /// (event name or "", parsed data or the raw "[DONE]") per event, plus the cut flag.
    fn events(reply: &Reply) -> (Vec<(String, Value)>, bool) {
        let Body::Stream { events, cut, .. } = &reply.body else {
            panic!("expected a stream")
        };
        let parsed = events
            .iter()
            .map(|e| {
                assert!(e.ends_with("\n\n"), "{e:?}");
                let name = e
                    .strip_prefix("event: ")
                    .and_then(|r| r.split('\n').next())
                    .unwrap_or("");
                let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                (
                    name.to_string(),
                    serde_json::from_str(data).unwrap_or(json!(data)),
                )
            })
            .collect();
        (parsed, *cut)
    }

    const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

    #[test]
    fn routes_and_keys() {
        let r = |p: &str| route(&req(p, &[], "")).map_err(|e| e.0);
        assert_eq!(r("/v1/chat/completions").unwrap().flavor, Flavor::OpenAi);
        assert_eq!(r("/v1/messages").unwrap().endpoint, Endpoint::Messages);
        assert_eq!(r("/v1/embeddings").unwrap().endpoint, Endpoint::Embeddings);
        assert_eq!(
            r("/v1/messages/count_tokens").unwrap().endpoint,
            Endpoint::CountTokens
        );
        let counted = full_json(&run("/v1/messages/count_tokens", CHAT, None));
        assert_eq!(counted, json!({"input_tokens": (CHAT.len() / 10) as u64}));
        let az = r("/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21").unwrap();
        assert_eq!(
            (az.flavor, az.deployment.as_deref()),
            (Flavor::Azure, Some("gpt4o"))
        );
        assert_eq!(
            r("/openai/deployments/gpt4o/chat/completions").unwrap_err(),
            Flavor::Azure
        );
        assert_eq!(
            r("/openai/deployments/gpt4o/chat/completions?api-version=").unwrap_err(),
            Flavor::Azure
        );
        assert_eq!(r("/v1/models").unwrap_err(), Flavor::OpenAi);

        let key = |h: &[(&str, &str)]| extract_key(&req("/", h, ""));
        assert_eq!(
            key(&[("authorization", "Bearer sk-1"), ("x-api-key", "k2")]).as_deref(),
            Some("sk-1")
        );
        assert_eq!(
            key(&[("authorization", "bearer  sk-1 ")]).as_deref(),
            Some("sk-1")
        );
        assert_eq!(
            key(&[("x-api-key", "ant"), ("api-key", "az")]).as_deref(),
            Some("az")
        );
        assert_eq!(
            key(&[("authorization", "Bearer "), ("x-api-key", "ant")]).as_deref(),
            Some("ant")
        );
        assert_eq!(
            key(&[("authorization", "é")]).as_deref(),
            Some("é"),
            "short non-ASCII value must not panic"
        );
        assert_eq!(key(&[]), None);
    }

    #[test]
    fn prepare_rejects_like_the_apis() {
        let no_key = prepare(&req("/v1/messages", &[], "{}"), &CTX)
            .err()
            .unwrap();
        assert_eq!(no_key.status, 401);
        assert_eq!(full_json(&no_key)["error"]["type"], "authentication_error");
        let az = prepare(
            &req(
                "/openai/deployments/d/chat/completions",
                &[("api-key", "k")],
                "{}",
            ),
            &CTX,
        );
        let az = az.err().unwrap();
        assert_eq!(
            (az.status, full_json(&az)["error"]["code"].as_str()),
            (404, Some("404"))
        );
        let mut get = req("/v1/chat/completions", &[("api-key", "k")], "");
        get.method = "GET".into();
        assert_eq!(prepare(&get, &CTX).err().unwrap().status, 405);
    }

    #[test]
    fn openai_chat_is_deterministic() {
        let reply = run("/v1/chat/completions", CHAT, None);
        let v = full_json(&reply);
        assert_eq!(reply.status, 200);
        assert_eq!(v["id"], "chatcmpl-mock-7");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["created"], 1_700_000_000);
        assert_eq!(v["model"], "gpt-4o");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "Hello from openai-a."
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let input = (CHAT.len() / 10) as u64;
        assert_eq!(v["usage"]["prompt_tokens"], input);
        assert_eq!(v["usage"]["completion_tokens"], 3);
        assert_eq!(v["usage"]["total_tokens"], input + 3);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(
            reply.usage,
            Some(Usage {
                input,
                output: 3,
                cache_read: 0,
                cache_write: 0
            })
        );
    }

    #[test]
    fn echo_answers_with_the_last_user_message() {
        let body = r#"{"messages":[{"role":"user","content":"first"},{"role":"assistant","content":"x"},
            {"role":"user","content":[{"type":"text","text":"tell  me"},{"type":"text","text":"42"}]}]}"#;
        let rule = || {
            Some(Rule {
                echo: true,
                ..Rule::default()
            })
        };
        let v = full_json(&run("/v1/chat/completions", body, rule()));
        assert_eq!(v["choices"][0]["message"]["content"], "Echo: tell me 42");
        assert_eq!(v["usage"]["completion_tokens"], 4);
        let v = full_json(&run("/v1/messages", body, rule()));
        assert_eq!(v["content"][0]["text"], "Echo: tell me 42");
    }

    #[test]
    fn tiny_body_reports_one_input_token_and_bad_json_is_400() {
        let v = full_json(&run("/v1/chat/completions", "{}", None));
        assert_eq!(v["usage"]["prompt_tokens"], 1);
        assert_eq!(v["model"], "gpt-mock");
        let bad = run("/v1/messages", "[1,", None);
        assert_eq!(
            (bad.status, full_json(&bad)["type"].as_str()),
            (400, Some("error"))
        );
    }

    #[test]
    fn scripted_usage_words_and_omit() {
        let rule = Rule {
            words: Some(5),
            usage: Some(crate::state::UsageOverride {
                input: Some(10),
                cache_read: Some(4),
                cache_write: Some(2),
                ..Default::default()
            }),
            ..Rule::default()
        };
        let reply = run("/v1/messages", CHAT, Some(rule));
        let v = full_json(&reply);
        assert_eq!(v["content"][0]["text"], "Hello from openai-a. lorem ipsum");
        assert_eq!(
            v["usage"],
            json!({"input_tokens": 10, "output_tokens": 5,
            "cache_creation_input_tokens": 2, "cache_read_input_tokens": 4})
        );
        assert_eq!(
            reply.usage,
            Some(Usage {
                input: 10,
                output: 5,
                cache_read: 4,
                cache_write: 2
            })
        );

        let omit = run(
            "/v1/chat/completions",
            CHAT,
            Some(Rule {
                omit_usage: true,
                ..Rule::default()
            }),
        );
        assert!(full_json(&omit)["usage"].is_null());
        assert_eq!(omit.usage, None);
    }

    #[test]
    fn scripted_errors_raw_bodies_and_headers() {
        let mut headers = Map::new();
        headers.insert("retry-after".into(), json!(30));
        headers.insert("content-type".into(), json!("text/plain"));
        let rule = Rule {
            status: Some(429),
            headers,
            ..Rule::default()
        };
        let reply = run("/v1/messages", CHAT, Some(rule.clone()));
        assert_eq!(reply.status, 429);
        assert_eq!(full_json(&reply)["error"]["type"], "rate_limit_error");
        assert!(reply.headers.contains(&("retry-after".into(), "30".into())));
        assert_eq!(
            reply
                .headers
                .iter()
                .filter(|(k, _)| k == "content-type")
                .count(),
            1
        );
        assert!(reply
            .headers
            .contains(&("content-type".into(), "text/plain".into())));

        let raw = run(
            "/v1/chat/completions",
            "not json",
            Some(Rule {
                status: Some(503),
                body: Some("upstream sad".into()),
                ..Rule::default()
            }),
        );
        assert!(matches!(&raw.body, Body::Full(b) if b == b"upstream sad"));
        assert_eq!((raw.status, raw.usage), (503, None));
    }

    #[test]
    fn openai_stream_with_and_without_usage() {
        let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let (ev, cut) = events(&run("/v1/chat/completions", body, None));
        assert!(!cut);
        assert_eq!(ev.len(), 1 + 3 + 1 + 1);
        assert_eq!(ev[0].1["choices"][0]["delta"]["role"], "assistant");
        let text: String = ev[1..4]
            .iter()
            .map(|(_, v)| v["choices"][0]["delta"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(text, "Hello from openai-a.");
        assert_eq!(ev[4].1["choices"][0]["finish_reason"], "stop");
        assert_eq!(ev[5].1, json!("[DONE]"));
        assert!(
            ev.iter().all(|(_, v)| v.get("usage").is_none()),
            "no usage without include_usage"
        );

        let body =
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
        let reply = run("/v1/chat/completions", body, None);
        let (ev, _) = events(&reply);
        assert_eq!(ev.len(), 7);
        assert!(ev[..5]
            .iter()
            .all(|(_, v)| v["usage"].is_null() && v.get("usage").is_some()));
        assert_eq!(ev[5].1["choices"], json!([]));
        assert_eq!(ev[5].1["usage"]["completion_tokens"], 3);
        assert_eq!(ev[5].1["usage"]["prompt_tokens"], (body.len() / 10) as u64);
        assert_eq!(reply.usage.map(|u| u.output), Some(3));
    }

    #[test]
    fn anthropic_stream_without_delta_usage_reports_only_message_start() {
        let body = r#"{"model":"claude-x","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
        let rule = Rule {
            omit_delta_usage: true,
            ..Rule::default()
        };
        let reply = run("/v1/messages", body, Some(rule));
        let (ev, cut) = events(&reply);
        assert!(!cut);
        let delta = ev.iter().find(|(n, _)| n == "message_delta").unwrap();
        assert!(delta.1.get("usage").is_none(), "{delta:?}");
        assert_eq!(ev[0].1["message"]["usage"]["output_tokens"], 1);
        assert_eq!(reply.usage.map(|u| u.output), Some(1));
    }

    #[test]
    fn anthropic_stream_event_sequence() {
        let body = r#"{"model":"claude-x","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
        let reply = run(
            "/v1/messages",
            body,
            Some(Rule {
                words: Some(4),
                ..Rule::default()
            }),
        );
        let (ev, _) = events(&reply);
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(ev.iter().all(|(n, v)| v["type"] == n.as_str()));
        let input = (body.len() / 10) as u64;
        assert_eq!(ev[0].1["message"]["usage"]["input_tokens"], input);
        assert_eq!(ev[0].1["message"]["usage"]["output_tokens"], 1);
        assert_eq!(ev[0].1["message"]["model"], "claude-x");
        let text: String = ev[3..7]
            .iter()
            .map(|(_, v)| v["delta"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, "Hello from openai-a. lorem");
        assert_eq!(ev[8].1["delta"]["stop_reason"], "end_turn");
        assert_eq!(ev[8].1["usage"]["output_tokens"], 4);
        assert_eq!(
            reply.usage,
            Some(Usage {
                input,
                output: 4,
                cache_read: 0,
                cache_write: 0
            })
        );

        let omit = run(
            "/v1/messages",
            body,
            Some(Rule {
                omit_usage: true,
                ..Rule::default()
            }),
        );
        let (ev, _) = events(&omit);
        assert!(ev
            .iter()
            .all(|(_, v)| v.get("usage").is_none() && v["message"].get("usage").is_none()));
        assert_eq!(omit.usage, None);
    }

    #[test]
    fn tool_calls_plain_and_streamed() {
        let tools = r#""tools":[{"type":"function","function":{"name":"get_weather"}}]"#;
        let body = format!(
            r#"{{"model":"m",{tools},"messages":[{{"role":"user","content":"What's the Weather?"}}]}}"#
        );
        let v = full_json(&run("/v1/chat/completions", &body, None));
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(
            (
                call["function"]["name"].as_str(),
                call["function"]["arguments"].as_str()
            ),
            (Some("get_weather"), Some(r#"{"city":"Paris"}"#))
        );
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(v["usage"]["completion_tokens"], TOOL_CALL_OUTPUT_TOKENS);

        let streamed = body.replacen('{', r#"{"stream":true,"#, 1);
        let (ev, _) = events(&run("/v1/chat/completions", &streamed, None));
        let args: Vec<&str> = ev
            .iter()
            .filter_map(|(_, v)| {
                v["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            })
            .collect();
        assert_eq!(args.len(), 4, "empty opening piece + 3 argument pieces");
        assert_eq!(args.concat(), r#"{"city":"Paris"}"#);
        assert_eq!(
            ev[ev.len() - 2].1["choices"][0]["finish_reason"],
            "tool_calls"
        );

        let ant = r#"{"model":"c","stream":true,"tools":[{"name":"get_weather"}],"messages":[{"role":"user","content":[{"type":"text","text":"weather in Paris"}]}]}"#;
        let (ev, _) = events(&run("/v1/messages", ant, None));
        assert_eq!(ev[1].1["content_block"]["type"], "tool_use");
        let json: Vec<&str> = ev
            .iter()
            .filter_map(|(_, v)| v["delta"]["partial_json"].as_str())
            .collect();
        assert_eq!(json.len(), 3);
        assert_eq!(json.concat(), r#"{"city":"Paris"}"#);
        assert_eq!(ev[ev.len() - 2].1["delta"]["stop_reason"], "tool_use");

        // After the tool result comes back, a plain answer.
        let after = r#"{"tools":[{"name":"get_weather"}],"messages":[{"role":"user","content":"weather?"},{"role":"assistant","content":null,"tool_calls":[{"id":"x","type":"function","function":{"name":"get_weather","arguments":"{}"}}]},{"role":"tool","tool_call_id":"x","content":"sunny"}]}"#;
        assert_eq!(
            full_json(&run("/v1/chat/completions", after, None))["choices"][0]["finish_reason"],
            "stop"
        );
    }

    #[test]
    fn cut_after_chunks_truncates_and_logs_what_was_sent() {
        let body = r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
        let cut = |n| {
            run(
                "/v1/chat/completions",
                body,
                Some(Rule {
                    words: Some(6),
                    cut_after_chunks: Some(n),
                    ..Rule::default()
                }),
            )
        };
        let reply = cut(2);
        let (ev, was_cut) = events(&reply);
        assert!(was_cut);
        assert_eq!(ev.len(), 3, "role chunk + 2 content chunks");
        assert_eq!(ev[2].1["choices"][0]["delta"]["content"], " from");
        assert_eq!(reply.usage, None, "the usage chunk never went out");
        assert_eq!(events(&cut(0)).0.len(), 1);
        assert_eq!(
            events(&cut(99)).0.len(),
            7,
            "clamped: all content, no finish chunk"
        );

        let ant = r#"{"stream":true,"messages":[]}"#;
        let reply = run(
            "/v1/messages",
            ant,
            Some(Rule {
                cut_after_chunks: Some(1),
                ..Rule::default()
            }),
        );
        let (ev, _) = events(&reply);
        assert_eq!(ev.last().unwrap().0, "content_block_delta");
        assert_eq!(
            reply.usage.map(|u| u.output),
            Some(1),
            "only message_start's usage was sent"
        );
    }

    #[test]
    fn embeddings_and_azure() {
        let reply = run(
            "/v1/embeddings",
            r#"{"model":"e","input":["a","b"],"dimensions":4}"#,
            None,
        );
        let v = full_json(&reply);
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        assert_eq!(v["data"][1]["embedding"].as_array().unwrap().len(), 4);
        assert_eq!(v["usage"]["total_tokens"], 4);
        assert_eq!(
            reply.usage,
            Some(Usage {
                input: 4,
                output: 0,
                cache_read: 0,
                cache_write: 0
            })
        );
        assert_eq!(run("/v1/embeddings", r#"{"input":5}"#, None).status, 400);

        let r = req(
            "/openai/deployments/my-gpt/chat/completions?api-version=2024-10-21",
            &[("api-key", "az")],
            r#"{"messages":[]}"#,
        );
        let t = prepare(&r, &CTX).map_err(|e| e.status).unwrap();
        let reply = answer(
            &t,
            &r,
            Some(Rule {
                status: Some(429),
                ..Rule::default()
            }),
            &CTX,
        );
        assert_eq!(full_json(&reply)["error"]["code"], "429");
        assert_eq!(full_json(&answer(&t, &r, None, &CTX))["model"], "my-gpt");
    }
}
