//! Request bodies: OpenAI chat completions <-> Anthropic messages.

use crate::json::{json, Map, Value};

use super::{err, field, parse_object, tool_call_input, TranslateError};

/// OpenAI chat-completions request -> Anthropic messages request. `model` is the provider's model
/// name; `default_max_tokens` is used when the client gave none (Anthropic requires max_tokens).
///
/// Dropped on purpose, because they tune cost, latency, sampling or OpenAI-side storage but not
/// the answer's shape: `frequency_penalty`, `presence_penalty`, `seed`, `stream_options` (Anthropic
/// streams always report usage), `store`, `metadata` (OpenAI's stored-completion tags), `service_tier`,
/// `prompt_cache_key`, `prompt_cache_retention`, `prediction`, `reasoning_effort`, `verbosity`,
/// message `name`s, image `detail` and tool `strict`. `top_k` (an OpenAI-compatible extension)
/// is passed on. `parallel_tool_calls: false` becomes
/// `tool_choice.disable_parallel_tool_use`. System and developer messages anywhere in the
/// conversation are hoisted into `system`, joined with blank lines; `temperature` is clamped to
/// Anthropic's 0..=1.
///
/// Refused (a [`TranslateError`] naming the field): `n` > 1, `logprobs`, `top_logprobs`,
/// `response_format` other than text, audio `modalities`/`audio`, non-empty `logit_bias`,
/// `web_search_options`, the deprecated `functions`/`function_call`, audio and file parts, non-function
/// tools, unknown part types and unknown top-level fields.
pub fn chat_request_to_messages(
    body: &[u8],
    model: &str,
    default_max_tokens: u64,
) -> Result<Vec<u8>, TranslateError> {
    let req = parse_object(body)?;
    let mut out = Map::new();
    out.insert("model".into(), model.into());
    for (key, v) in req.iter().filter(|(_, v)| !v.is_null()) {
        match key.as_str() {
            // Handled below.
            "model"
            | "messages"
            | "max_tokens"
            | "max_completion_tokens"
            | "tools"
            | "tool_choice"
            | "parallel_tool_calls"
            | "user"
            | "safety_identifier" => {}
            "frequency_penalty"
            | "presence_penalty"
            | "seed"
            | "stream_options"
            | "store"
            | "metadata"
            | "service_tier"
            | "prompt_cache_key"
            | "prompt_cache_retention"
            | "prediction"
            | "reasoning_effort"
            | "verbosity" => {}
            "temperature" => {
                // Anthropic's range is 0..1 (OpenAI's 0..2): clamped, else kept as written.
                let t = v.as_f64().ok_or_else(|| err(key, "must be a number"))?;
                let clamped = match t {
                    t if t > 1.0 => json!(1),
                    t if t < 0.0 => json!(0),
                    _ => v.clone(),
                };
                out.insert(key.clone(), clamped);
            }
            "top_p" => {
                v.as_f64().ok_or_else(|| err(key, "must be a number"))?;
                out.insert(key.clone(), v.clone());
            }
            // An OpenAI-compatible extension that Anthropic has too.
            "top_k" => {
                v.as_u64()
                    .ok_or_else(|| err(key, "must be a non-negative integer"))?;
                out.insert(key.clone(), v.clone());
            }
            "stream" => {
                v.as_bool().ok_or_else(|| err(key, "must be a boolean"))?;
                out.insert(key.clone(), v.clone());
            }
            "stop" => {
                let stops = match v {
                    Value::String(s) => vec![Value::String(s.clone())],
                    Value::Array(a) if a.is_empty() => continue,
                    Value::Array(a) if a.iter().all(Value::is_string) => a.clone(),
                    _ => return Err(err(key, "must be a string or an array of strings")),
                };
                out.insert("stop_sequences".into(), Value::Array(stops));
            }
            "n" if v.as_u64() != Some(1) => {
                return Err(err(
                    key,
                    "an Anthropic provider returns a single choice; n must be 1",
                ))
            }
            "logprobs" if v.as_bool() != Some(false) => {
                return Err(err(
                    key,
                    "log probabilities are not available from an Anthropic provider",
                ))
            }
            "top_logprobs" if v.as_u64() != Some(0) => {
                return Err(err(
                    key,
                    "log probabilities are not available from an Anthropic provider",
                ))
            }
            "n" | "logprobs" | "top_logprobs" => {}
            "response_format" => match v.get("type").and_then(Value::as_str) {
                Some("text") => {}
                Some(t @ ("json_object" | "json_schema")) => {
                    return Err(err(
                        format!("{key}.type"),
                        format!("{t} output cannot be enforced by an Anthropic provider"),
                    ))
                }
                _ => return Err(err(format!("{key}.type"), "unsupported response format")),
            },
            "modalities" => {
                let text_only = v
                    .as_array()
                    .is_some_and(|a| a.iter().all(|m| m.as_str() == Some("text")));
                if !text_only {
                    return Err(err(key, "an Anthropic provider only produces text"));
                }
            }
            "logit_bias" if v.as_object().is_some_and(Map::is_empty) => {}
            "logit_bias" => {
                return Err(err(
                    key,
                    "logit bias is not available from an Anthropic provider",
                ))
            }
            "audio" => {
                return Err(err(
                    key,
                    "audio output is not available from an Anthropic provider",
                ))
            }
            "functions" | "function_call" => {
                return Err(err(
                    key,
                    "the deprecated functions API is not supported; use tools and tool_choice",
                ))
            }
            _ => return Err(err(key, "this field has no Anthropic equivalent")),
        }
    }

    let max_tokens = match field(&req, "max_completion_tokens")
        .map(|v| ("max_completion_tokens", v))
        .or(field(&req, "max_tokens").map(|v| ("max_tokens", v)))
    {
        Some((name, v)) => v
            .as_u64()
            .ok_or_else(|| err(name, "must be a non-negative integer"))?,
        None => default_max_tokens,
    };
    out.insert("max_tokens".into(), max_tokens.into());

    let (system, messages) = chat_messages(field(&req, "messages"))?;
    if !system.is_empty() {
        out.insert("system".into(), system.join("\n\n").into());
    }
    out.insert("messages".into(), messages.into());

    let tools = tools(&req, chat_tool)?;
    if !tools.is_empty() {
        out.insert("tools".into(), tools.into());
        let mut choice = match field(&req, "tool_choice") {
            Some(c) => chat_tool_choice(c)?,
            None => json!({"type": "auto"}),
        };
        let serial = field(&req, "parallel_tool_calls").and_then(Value::as_bool) == Some(false);
        if let Some(c) = choice
            .as_object_mut()
            .filter(|c| serial && c.get("type") != Some(&json!("none")))
        {
            c.insert("disable_parallel_tool_use".into(), true.into());
        }
        out.insert("tool_choice".into(), choice);
    }

    let user = field(&req, "user").or(field(&req, "safety_identifier"));
    if let Some(user) = user {
        let user = user
            .as_str()
            .ok_or_else(|| err("user", "must be a string"))?;
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    Ok(Value::Object(out).to_string().into_bytes())
}

/// System texts and Anthropic messages, with consecutive same-role messages merged (Anthropic
/// requires alternation) and tool results first in their user message (Anthropic requires that too).
fn chat_messages(messages: Option<&Value>) -> Result<(Vec<String>, Vec<Value>), TranslateError> {
    let messages = messages
        .and_then(Value::as_array)
        .ok_or_else(|| err("messages", "must be an array of messages"))?;
    let mut system = Vec::new();
    let mut turns: Vec<(&str, Vec<Value>)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let path = format!("messages[{i}]");
        let m = m
            .as_object()
            .ok_or_else(|| err(&path, "must be an object"))?;
        let (role, blocks) = match m.get("role").and_then(Value::as_str).unwrap_or_default() {
            "system" | "developer" => {
                let text = plain_text(field(m, "content"), &format!("{path}.content"))?;
                if !text.is_empty() {
                    system.push(text);
                }
                continue;
            }
            "user" => ("user", user_blocks(field(m, "content"), &path)?),
            "assistant" => ("assistant", assistant_blocks(m, &path)?),
            "tool" => ("user", vec![tool_result(m, &path)?]),
            "function" => {
                return Err(err(
                    format!("{path}.role"),
                    "the deprecated function role is not supported; use tools",
                ))
            }
            other => {
                return Err(err(
                    format!("{path}.role"),
                    format!("unknown role \"{other}\""),
                ))
            }
        };
        match turns.last_mut() {
            _ if blocks.is_empty() => {}
            Some((last, prev)) if *last == role => prev.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let messages = turns
        .into_iter()
        .map(|(role, blocks)| {
            // Tool results first, each group in its order (a partition: no sort code in the module).
            let (mut content, rest): (Vec<Value>, Vec<Value>) = blocks
                .into_iter()
                .partition(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"));
            content.extend(rest);
            json!({"role": role, "content": content})
        })
        .collect();
    Ok((system, messages))
}

/// Text of a system or tool message: a string or text parts.
fn plain_text(content: Option<&Value>, path: &str) -> Result<String, TranslateError> {
    match content {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => Ok(text_parts(parts, path)?.join("\n")),
        Some(_) => Err(err(path, "must be a string or an array of text parts")),
    }
}

fn text_parts(parts: &[Value], path: &str) -> Result<Vec<String>, TranslateError> {
    parts
        .iter()
        .enumerate()
        .map(|(j, p)| match p.get("type").and_then(Value::as_str) {
            Some("text") => text_of(p, &format!("{path}[{j}]")),
            _ => Err(err(
                format!("{path}[{j}].type"),
                "only text parts are allowed here",
            )),
        })
        .collect()
}

fn text_of(part: &Value, path: &str) -> Result<String, TranslateError> {
    part.get("text")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| err(format!("{path}.text"), "must be a string"))
}

fn text_block(text: String) -> Option<Value> {
    // Anthropic rejects empty text blocks; an empty text carries nothing.
    (!text.is_empty()).then(|| json!({"type": "text", "text": text}))
}

fn user_blocks(content: Option<&Value>, path: &str) -> Result<Vec<Value>, TranslateError> {
    let parts = match content {
        Some(Value::String(s)) => return Ok(text_block(s.clone()).into_iter().collect()),
        Some(Value::Array(parts)) => parts,
        _ => {
            return Err(err(
                format!("{path}.content"),
                "must be a string or an array of content parts",
            ))
        }
    };
    let mut blocks = Vec::new();
    for (j, p) in parts.iter().enumerate() {
        let path = format!("{path}.content[{j}]");
        match p.get("type").and_then(Value::as_str).unwrap_or_default() {
            "text" => blocks.extend(text_block(text_of(p, &path)?)),
            "image_url" => blocks.push(image_block(p.get("image_url"), &path)?),
            "input_audio" => {
                return Err(err(
                    path,
                    "audio input cannot be sent to an Anthropic provider",
                ))
            }
            "file" => {
                return Err(err(
                    path,
                    "file input cannot be sent to an Anthropic provider",
                ))
            }
            other => {
                return Err(err(
                    format!("{path}.type"),
                    format!("unknown content part type \"{other}\""),
                ))
            }
        }
    }
    Ok(blocks)
}

fn image_block(image_url: Option<&Value>, path: &str) -> Result<Value, TranslateError> {
    let url = image_url
        .and_then(|i| i.get("url").or(Some(i)))
        .and_then(Value::as_str);
    let path = format!("{path}.image_url.url");
    let url = url.ok_or_else(|| err(&path, "must be a string"))?;
    if let Some(data) = url.strip_prefix("data:") {
        let (media_type, data) = data
            .split_once(',')
            .and_then(|(head, data)| Some((head.strip_suffix(";base64")?.split(';').next()?, data)))
            .ok_or_else(|| {
                err(
                    &path,
                    "only base64 data URLs can be sent to an Anthropic provider",
                )
            })?;
        return Ok(
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
        );
    }
    let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
    if matches!(scheme.as_deref(), Some("http" | "https")) {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(err(path, "must be an http(s) or data: URL"))
}

fn assistant_blocks(m: &Map<String, Value>, path: &str) -> Result<Vec<Value>, TranslateError> {
    if field(m, "audio").is_some() {
        return Err(err(
            format!("{path}.audio"),
            "assistant audio cannot be sent to an Anthropic provider",
        ));
    }
    if field(m, "function_call").is_some() {
        return Err(err(
            format!("{path}.function_call"),
            "the deprecated functions API is not supported; use tool_calls",
        ));
    }
    let mut blocks = Vec::new();
    match field(m, "content") {
        Some(Value::String(s)) => blocks.extend(text_block(s.clone())),
        Some(Value::Array(parts)) => {
            for (j, p) in parts.iter().enumerate() {
                let path = format!("{path}.content[{j}]");
                let text = match p.get("type").and_then(Value::as_str).unwrap_or_default() {
                    "text" => text_of(p, &path)?,
                    "refusal" => p
                        .get("refusal")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    other => {
                        return Err(err(
                            format!("{path}.type"),
                            format!("unsupported assistant content part type \"{other}\""),
                        ))
                    }
                };
                blocks.extend(text_block(text));
            }
        }
        Some(_) => {
            return Err(err(
                format!("{path}.content"),
                "must be a string or an array of content parts",
            ))
        }
        None => {
            let refusal = field(m, "refusal")
                .and_then(Value::as_str)
                .unwrap_or_default();
            blocks.extend(text_block(refusal.to_string()));
        }
    }
    let calls = match field(m, "tool_calls") {
        Some(Value::Array(calls)) => calls.as_slice(),
        Some(_) => return Err(err(format!("{path}.tool_calls"), "must be an array")),
        None => &[],
    };
    for (k, c) in calls.iter().enumerate() {
        let path = format!("{path}.tool_calls[{k}]");
        if c.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "function")
        {
            return Err(err(
                format!("{path}.type"),
                "only function tool calls can be sent to an Anthropic provider",
            ));
        }
        let id = c
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| err(format!("{path}.id"), "must be a string"))?;
        let f = c.get("function");
        let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
        let name = name.ok_or_else(|| err(format!("{path}.function.name"), "must be a string"))?;
        let input = tool_call_input(f, &path)?;
        blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    Ok(blocks)
}

fn tool_result(m: &Map<String, Value>, path: &str) -> Result<Value, TranslateError> {
    let id = field(m, "tool_call_id").and_then(Value::as_str);
    let id = id.ok_or_else(|| err(format!("{path}.tool_call_id"), "must be a string"))?;
    let mut block = json!({"type": "tool_result", "tool_use_id": id});
    let content = match field(m, "content") {
        Some(Value::Array(parts)) => {
            let texts = text_parts(parts, &format!("{path}.content"))?;
            texts.into_iter().filter_map(text_block).collect()
        }
        c => Value::String(plain_text(c, &format!("{path}.content"))?),
    };
    let empty = content.as_str().is_some_and(str::is_empty)
        || content.as_array().is_some_and(Vec::is_empty);
    if let (false, Some(b)) = (empty, block.as_object_mut()) {
        b.insert("content".into(), content);
    }
    Ok(block)
}

/// `tools`, each converted by `convert` (which gets the tool and its index); none when absent.
fn tools(
    req: &Map<String, Value>,
    convert: fn(&Value, usize) -> Result<Value, TranslateError>,
) -> Result<Vec<Value>, TranslateError> {
    match field(req, "tools") {
        Some(Value::Array(tools)) => tools
            .iter()
            .enumerate()
            .map(|(k, t)| convert(t, k))
            .collect(),
        Some(_) => Err(err("tools", "must be an array")),
        None => Ok(Vec::new()),
    }
}

fn chat_tool(t: &Value, k: usize) -> Result<Value, TranslateError> {
    let path = format!("tools[{k}]");
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(err(
            format!("{path}.type"),
            "only function tools can be sent to an Anthropic provider",
        ));
    }
    let f = t
        .get("function")
        .ok_or_else(|| err(format!("{path}.function"), "is required"))?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| err(format!("{path}.function.name"), "must be a string"))?;
    let schema = match f.get("parameters").filter(|p| !p.is_null()) {
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(err(
                format!("{path}.function.parameters"),
                "must be a JSON schema object",
            ))
        }
        None => json!({"type": "object", "properties": {}}),
    };
    let mut tool = json!({"name": name, "input_schema": schema});
    if let (Some(d), Some(o)) = (
        f.get("description").and_then(Value::as_str),
        tool.as_object_mut(),
    ) {
        o.insert("description".into(), d.into());
    }
    Ok(tool)
}

fn chat_tool_choice(c: &Value) -> Result<Value, TranslateError> {
    let name = c
        .get("function")
        .and_then(|f| f.get("name"))
        .and_then(Value::as_str)
        .filter(|_| c.get("type").and_then(Value::as_str) == Some("function"));
    match (c.as_str(), name) {
        (Some("auto"), _) => Ok(json!({"type": "auto"})),
        (Some("none"), _) => Ok(json!({"type": "none"})),
        (Some("required"), _) => Ok(json!({"type": "any"})),
        (_, Some(name)) => Ok(json!({"type": "tool", "name": name})),
        _ => Err(err(
            "tool_choice",
            "must be \"auto\", \"none\", \"required\" or a function choice",
        )),
    }
}

/// Anthropic messages request -> OpenAI chat-completions request (for Anthropic-API clients routed
/// to OpenAI). A streamed request gets `stream_options.include_usage` (usage is needed for accounting);
/// `max_tokens` becomes `max_completion_tokens` (OpenAI's reasoning models reject `max_tokens`).
///
/// Dropped on purpose: `top_k` (sampling only), `thinking` (the client just gets no thinking
/// blocks back), `service_tier`, `cache_control` marks (OpenAI caches prompts by itself), thinking
/// blocks and citations in the history. System blocks are joined with blank lines into one system
/// message; a tool result with `is_error` gets its text prefixed with "Error: ".
///
/// Refused: server tools (web search, code execution, ...), `mcp_servers`, `container`,
/// `context_management`, documents, images inside tool results, file image sources, unknown block
/// types and unknown top-level fields.
pub fn messages_request_to_chat(body: &[u8], model: &str) -> Result<Vec<u8>, TranslateError> {
    let req = parse_object(body)?;
    let mut out = Map::new();
    out.insert("model".into(), model.into());
    for (key, v) in req.iter().filter(|(_, v)| !v.is_null()) {
        match key.as_str() {
            "model" | "messages" | "system" | "tools" | "tool_choice" => {}
            "top_k" | "thinking" | "service_tier" | "cache_control" => {}
            "max_tokens" => {
                let n = v
                    .as_u64()
                    .ok_or_else(|| err(key, "must be a non-negative integer"))?;
                out.insert("max_completion_tokens".into(), n.into());
            }
            "temperature" | "top_p" => {
                v.as_f64().ok_or_else(|| err(key, "must be a number"))?;
                out.insert(key.clone(), v.clone());
            }
            "stream" => {
                let stream = v.as_bool().ok_or_else(|| err(key, "must be a boolean"))?;
                out.insert(key.clone(), stream.into());
                if stream {
                    out.insert("stream_options".into(), json!({"include_usage": true}));
                }
            }
            "stop_sequences" => match v {
                Value::Array(a) if a.iter().all(Value::is_string) => {
                    if !a.is_empty() {
                        out.insert("stop".into(), v.clone());
                    }
                }
                _ => return Err(err(key, "must be an array of strings")),
            },
            "metadata" => match v.get("user_id") {
                Some(Value::String(u)) => {
                    out.insert("user".into(), u.clone().into());
                }
                None | Some(Value::Null) => {}
                Some(_) => return Err(err("metadata.user_id", "must be a string")),
            },
            "mcp_servers" | "container" | "context_management" => {
                return Err(err(
                    key,
                    "this feature is not available from an OpenAI provider",
                ))
            }
            _ => return Err(err(key, "this field has no OpenAI equivalent")),
        }
    }

    let mut messages = Vec::new();
    match field(&req, "system") {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(Value::Array(blocks)) => {
            let texts = blocks
                .iter()
                .enumerate()
                .map(|(j, b)| match b.get("type").and_then(Value::as_str) {
                    Some("text") => text_of(b, &format!("system[{j}]")),
                    _ => Err(err(
                        format!("system[{j}].type"),
                        "only text blocks are allowed in system",
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let text = texts.join("\n\n");
            if !text.is_empty() {
                messages.push(json!({"role": "system", "content": text}));
            }
        }
        Some(_) => return Err(err("system", "must be a string or an array of text blocks")),
    }
    let msgs = field(&req, "messages").and_then(Value::as_array);
    for (i, m) in msgs
        .ok_or_else(|| err("messages", "must be an array of messages"))?
        .iter()
        .enumerate()
    {
        messages_message(m, &format!("messages[{i}]"), &mut messages)?;
    }
    out.insert("messages".into(), messages.into());

    let tools = tools(&req, messages_tool)?;
    // OpenAI rejects tool_choice and parallel_tool_calls without tools; without tools there is no choice.
    if !tools.is_empty() {
        out.insert("tools".into(), tools.into());
        if let Some(c) = field(&req, "tool_choice") {
            let choice = match (
                c.get("type").and_then(Value::as_str),
                c.get("name").and_then(Value::as_str),
            ) {
                (Some("auto"), _) => json!("auto"),
                (Some("none"), _) => json!("none"),
                (Some("any"), _) => json!("required"),
                (Some("tool"), Some(name)) => {
                    json!({"type": "function", "function": {"name": name}})
                }
                _ => {
                    return Err(err(
                        "tool_choice",
                        "must be of type auto, any, none or tool (with a name)",
                    ))
                }
            };
            out.insert("tool_choice".into(), choice);
            if c.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
                out.insert("parallel_tool_calls".into(), false.into());
            }
        }
    }
    Ok(Value::Object(out).to_string().into_bytes())
}

/// One Anthropic message -> OpenAI messages: a user message's tool results become `tool` messages
/// (placed first, right after the assistant's tool calls) followed by the rest of its content.
fn messages_message(m: &Value, path: &str, out: &mut Vec<Value>) -> Result<(), TranslateError> {
    let role = m.get("role").and_then(Value::as_str);
    let blocks = match m.get("content") {
        Some(Value::String(s)) => {
            return match role {
                Some(r @ ("user" | "assistant")) => {
                    out.push(json!({"role": r, "content": s}));
                    Ok(())
                }
                _ => Err(err(
                    format!("{path}.role"),
                    "must be \"user\" or \"assistant\"",
                )),
            }
        }
        Some(Value::Array(b)) => b,
        _ => {
            return Err(err(
                format!("{path}.content"),
                "must be a string or an array of content blocks",
            ))
        }
    };
    match role {
        Some("user") => {
            let mut parts = Vec::new();
            for (j, b) in blocks.iter().enumerate() {
                let path = format!("{path}.content[{j}]");
                match b.get("type").and_then(Value::as_str).unwrap_or_default() {
                    "text" => parts.push(json!({"type": "text", "text": text_of(b, &path)?})),
                    "image" => parts.push(image_part(b, &path)?),
                    "tool_result" => out.push(tool_message(b, &path)?),
                    "document" => {
                        return Err(err(path, "documents cannot be sent to an OpenAI provider"))
                    }
                    other => {
                        return Err(err(
                            format!("{path}.type"),
                            format!("unsupported content block type \"{other}\""),
                        ))
                    }
                }
            }
            let content = match parts.as_slice() {
                [] => return Ok(()),
                [p] if p.get("type").and_then(Value::as_str) == Some("text") => {
                    p.get("text").cloned().unwrap_or_default()
                }
                _ => Value::Array(parts),
            };
            out.push(json!({"role": "user", "content": content}));
        }
        Some("assistant") => {
            let (mut texts, mut calls) = (Vec::new(), Vec::new());
            for (j, b) in blocks.iter().enumerate() {
                let path = format!("{path}.content[{j}]");
                match b.get("type").and_then(Value::as_str).unwrap_or_default() {
                    "text" => texts.push(text_of(b, &path)?),
                    "tool_use" => {
                        let id = b
                            .get("id")
                            .and_then(Value::as_str)
                            .ok_or_else(|| err(format!("{path}.id"), "must be a string"))?;
                        let name = b
                            .get("name")
                            .and_then(Value::as_str)
                            .ok_or_else(|| err(format!("{path}.name"), "must be a string"))?;
                        let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                        calls.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": input.to_string()}}));
                    }
                    "thinking" | "redacted_thinking" => {}
                    other => {
                        return Err(err(
                            format!("{path}.type"),
                            format!("unsupported content block type \"{other}\""),
                        ))
                    }
                }
            }
            let mut msg = json!({"role": "assistant", "content": texts.join("\n")});
            if let (false, Some(o)) = (calls.is_empty(), msg.as_object_mut()) {
                if texts.is_empty() {
                    o.insert("content".into(), Value::Null);
                }
                o.insert("tool_calls".into(), calls.into());
            }
            out.push(msg);
        }
        _ => {
            return Err(err(
                format!("{path}.role"),
                "must be \"user\" or \"assistant\"",
            ))
        }
    }
    Ok(())
}

fn image_part(b: &Value, path: &str) -> Result<Value, TranslateError> {
    let src = b.get("source");
    let get = |k: &str| src.and_then(|s| s.get(k)).and_then(Value::as_str);
    let url = match (get("type"), get("media_type"), get("data"), get("url")) {
        (Some("base64"), Some(mt), Some(data), _) => format!("data:{mt};base64,{data}"),
        (Some("url"), _, _, Some(url)) => url.to_string(),
        _ => {
            return Err(err(
                format!("{path}.source"),
                "only base64 and url image sources can be sent to an OpenAI provider",
            ))
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn tool_message(b: &Value, path: &str) -> Result<Value, TranslateError> {
    let id = b.get("tool_use_id").and_then(Value::as_str);
    let id = id.ok_or_else(|| err(format!("{path}.tool_use_id"), "must be a string"))?;
    let text = match b.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| match p.get("type").and_then(Value::as_str) {
                Some("text") => text_of(p, &format!("{path}.content[{j}]")),
                Some("image") => Err(err(
                    format!("{path}.content[{j}]"),
                    "images in tool results cannot be sent to an OpenAI provider",
                )),
                _ => Err(err(
                    format!("{path}.content[{j}].type"),
                    "unsupported tool result block type",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?
            .join("\n"),
        Some(_) => {
            return Err(err(
                format!("{path}.content"),
                "must be a string or an array of content blocks",
            ))
        }
    };
    let text = if b.get("is_error").and_then(Value::as_bool) == Some(true) {
        format!("Error: {text}")
    } else {
        text
    };
    Ok(json!({"role": "tool", "tool_call_id": id, "content": text}))
}

fn messages_tool(t: &Value, k: usize) -> Result<Value, TranslateError> {
    let path = format!("tools[{k}]");
    match t.get("type").and_then(Value::as_str) {
        None | Some("custom") => {}
        Some(other) => {
            return Err(err(
                format!("{path}.type"),
                format!("server tool \"{other}\" cannot be run by an OpenAI provider"),
            ))
        }
    }
    let name = t
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| err(format!("{path}.name"), "must be a string"))?;
    let schema = t.get("input_schema").filter(|s| s.is_object());
    let schema = schema.ok_or_else(|| {
        err(
            format!("{path}.input_schema"),
            "must be a JSON schema object",
        )
    })?;
    let mut f = json!({"name": name, "parameters": schema});
    if let (Some(d), Some(o)) = (
        t.get("description").and_then(Value::as_str),
        f.as_object_mut(),
    ) {
        o.insert("description".into(), d.into());
    }
    Ok(json!({"type": "function", "function": f}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_messages(req: Value) -> Value {
        let out = chat_request_to_messages(req.to_string().as_bytes(), "claude-sonnet-4-5", 4096);
        crate::json::from_slice(&out.unwrap_or_default()).unwrap_or_default()
    }

    fn to_chat(req: Value) -> Value {
        let out = messages_request_to_chat(req.to_string().as_bytes(), "gpt-4o");
        crate::json::from_slice(&out.unwrap_or_default()).unwrap_or_default()
    }

    #[test]
    fn chat_to_messages_full_request() {
        let req = json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                {"role": "user", "name": "ann", "content": "Weather in Paris and Lyon?"},
                {"role": "user", "content": [
                    {"type": "text", "text": "And this picture?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    {"type": "image_url", "image_url": "data:image/webp;name=a.webp;base64,UklGRg=="}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "12C rain"}]},
                {"role": "assistant", "content": "Paris 18C, Lyon 12C."}
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "strict": true,
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
            "tool_choice": "required",
            "max_completion_tokens": 300,
            "max_tokens": 100,
            "temperature": 1.5,
            "top_p": 0.9,
            "stop": "END",
            "stream": true,
            "stream_options": {"include_usage": true},
            "user": "user-42",
            "frequency_penalty": 0.5, "presence_penalty": 0.1, "seed": 7, "store": false, "metadata": {"a": "b"},
            "n": 1, "logprobs": false, "response_format": {"type": "text"}, "parallel_tool_calls": true, "logit_bias": {}
        });
        assert_eq!(
            to_messages(req),
            json!({
                "model": "claude-sonnet-4-5",
                "system": "You are terse.\n\nAnswer in French.",
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "Weather in Paris and Lyon?"},
                        {"type": "text", "text": "And this picture?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/webp", "data": "UklGRg=="}}
                    ]},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Lyon"}}
                    ]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "18C sunny"},
                        {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "12C rain"}]}
                    ]},
                    {"role": "assistant", "content": [{"type": "text", "text": "Paris 18C, Lyon 12C."}]}
                ],
                "tools": [{"name": "get_weather", "description": "Current weather",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
                "tool_choice": {"type": "any"},
                "max_tokens": 300,
                "temperature": 1.0,
                "top_p": 0.9,
                "stop_sequences": ["END"],
                "stream": true,
                "metadata": {"user_id": "user-42"}
            })
        );
    }

    #[test]
    fn chat_to_messages_scalars() {
        let base = |extra: Value| {
            let mut req = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            if let (Some(r), Some(e)) = (req.as_object_mut(), extra.as_object()) {
                r.extend(e.clone());
            }
            to_messages(req)
        };
        let cases = [
            (json!({}), "max_tokens", json!(4096)),
            (json!({"max_tokens": 50}), "max_tokens", json!(50)),
            (
                json!({"max_tokens": null, "max_completion_tokens": 60}),
                "max_tokens",
                json!(60),
            ),
            (json!({"temperature": -0.5}), "temperature", json!(0.0)),
            (json!({"temperature": 0.3}), "temperature", json!(0.3)),
            (json!({"temperature": 2}), "temperature", json!(1.0)),
            (
                json!({"stop": ["a", "b"]}),
                "stop_sequences",
                json!(["a", "b"]),
            ),
            (json!({"stop": null}), "stop_sequences", Value::Null),
            (json!({"stream": false}), "stream", json!(false)),
            (
                json!({"safety_identifier": "s-1"}),
                "metadata",
                json!({"user_id": "s-1"}),
            ),
            (
                json!({"user": "u", "safety_identifier": "s"}),
                "metadata",
                json!({"user_id": "u"}),
            ),
            (
                json!({"seed": 1, "reasoning_effort": "low", "prompt_cache_key": "k"}),
                "seed",
                Value::Null,
            ),
            (json!({"modalities": ["text"]}), "modalities", Value::Null),
            (json!({"stop": []}), "stop_sequences", Value::Null),
            (json!({"top_k": 40}), "top_k", json!(40)),
        ];
        for (extra, key, want) in cases {
            let got = base(extra.clone());
            assert_eq!(
                got.get("messages"),
                Some(&json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])),
                "{extra}"
            );
            assert_eq!(got.get(key).cloned().unwrap_or_default(), want, "{extra}");
        }
    }

    #[test]
    fn chat_to_messages_tool_choice() {
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let cases = [
            (json!(null), json!(null), json!({"type": "auto"})),
            (json!("auto"), json!(null), json!({"type": "auto"})),
            (json!("none"), json!(false), json!({"type": "none"})),
            (json!("required"), json!(null), json!({"type": "any"})),
            (
                json!({"type": "function", "function": {"name": "f"}}),
                json!(null),
                json!({"type": "tool", "name": "f"}),
            ),
            (
                json!(null),
                json!(false),
                json!({"type": "auto", "disable_parallel_tool_use": true}),
            ),
            (
                json!("required"),
                json!(false),
                json!({"type": "any", "disable_parallel_tool_use": true}),
            ),
            (json!("auto"), json!(true), json!({"type": "auto"})),
        ];
        for (choice, parallel, want) in cases {
            let req = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools,
                "tool_choice": choice, "parallel_tool_calls": parallel});
            let got = to_messages(req);
            assert_eq!(got["tool_choice"], want, "{choice} {parallel}");
            assert_eq!(
                got["tools"],
                json!([{"name": "f", "input_schema": {"type": "object", "properties": {}}}])
            );
        }
        // Without tools there is nothing to choose from.
        let got = to_messages(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [], "tool_choice": "none"}),
        );
        assert_eq!((got.get("tools"), got.get("tool_choice")), (None, None));
    }

    #[test]
    fn chat_to_messages_merges_and_orders() {
        let req = json!({"model": "m", "messages": [
            {"role": "user", "content": "run it"},
            {"role": "assistant", "content": "Sure.", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "run", "arguments": ""}}]},
            {"role": "user", "content": "also note this"},
            {"role": "tool", "tool_call_id": "c1", "content": ""},
            {"role": "system", "content": "late system"},
            {"role": "assistant", "content": [{"type": "text", "text": "Done"}, {"type": "refusal", "refusal": "but no more"}]},
            {"role": "assistant", "content": "", "refusal": null},
            {"role": "assistant", "content": null, "refusal": "I can't."}
        ]});
        let got = to_messages(req);
        assert_eq!(got["system"], "late system");
        assert_eq!(
            got["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "run it"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Sure."}, {"type": "tool_use", "id": "c1", "name": "run", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1"}, {"type": "text", "text": "also note this"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Done"}, {"type": "text", "text": "but no more"}, {"type": "text", "text": "I can't."}]}
            ])
        );
    }

    fn chat_err(req: Value) -> TranslateError {
        chat_request_to_messages(req.to_string().as_bytes(), "c", 10)
            .err()
            .unwrap_or_else(|| err("<none>", "translated"))
    }

    #[test]
    fn chat_to_messages_refusals() {
        let user = |content: Value| json!({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "user", "content": content}]});
        let with = |k: &str, v: Value| {
            let mut r = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            if let Some(o) = r.as_object_mut() {
                o.insert(k.into(), v);
            }
            r
        };
        let cases = [
            (with("n", json!(2)), "n"),
            (with("logprobs", json!(true)), "logprobs"),
            (with("top_logprobs", json!(3)), "top_logprobs"),
            (
                with(
                    "response_format",
                    json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
                ),
                "response_format.type",
            ),
            (
                with("response_format", json!({"type": "json_object"})),
                "response_format.type",
            ),
            (with("modalities", json!(["text", "audio"])), "modalities"),
            (
                with("audio", json!({"voice": "alloy", "format": "wav"})),
                "audio",
            ),
            (with("logit_bias", json!({"50256": -100})), "logit_bias"),
            (with("functions", json!([{"name": "f"}])), "functions"),
            (with("web_search_options", json!({})), "web_search_options"),
            (with("brand_new_knob", json!(1)), "brand_new_knob"),
            (with("temperature", json!("hot")), "temperature"),
            (with("max_tokens", json!(-1)), "max_tokens"),
            (
                with("max_completion_tokens", json!(1.5)),
                "max_completion_tokens",
            ),
            (with("stop", json!([1])), "stop"),
            (
                with(
                    "tools",
                    json!([{"type": "custom", "custom": {"name": "grammar"}}]),
                ),
                "tools[0].type",
            ),
            (
                with(
                    "tools",
                    json!([{"type": "function", "function": {"name": "f"}}]),
                )
                .clone(),
                "<none>",
            ),
            (
                user(
                    json!([{"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}]),
                ),
                "messages[1].content[0]",
            ),
            (
                user(
                    json!([{"type": "text", "text": "a"}, {"type": "file", "file": {"file_id": "file-1"}}]),
                ),
                "messages[1].content[1]",
            ),
            (
                user(json!([{"type": "video", "url": "x"}])),
                "messages[1].content[0].type",
            ),
            (
                user(
                    json!([{"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}]),
                ),
                "messages[1].content[0].image_url.url",
            ),
            (
                user(json!([{"type": "image_url", "image_url": {"url": "ftp://host/a.png"}}])),
                "messages[1].content[0].image_url.url",
            ),
            (user(json!(42)), "messages[1].content"),
            (
                json!({"model": "m", "messages": [{"role": "function", "name": "f", "content": "1"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "critic", "content": "1"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://a/b.png"}}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].tool_call_id",
            ),
            (
                json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\":"}}]}]}),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                json!({"model": "m", "messages": [{"role": "assistant", "audio": {"id": "audio_1"}}]}),
                "messages[0].audio",
            ),
            (json!({"model": "m"}), "messages"),
            (json!([1, 2]), ""),
        ];
        for (req, field) in cases {
            assert_eq!(chat_err(req.clone()).field, field, "{req}");
        }
        let e = chat_err(user(
            json!([{"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}]),
        ));
        assert_eq!(
            e.to_string(),
            "messages[1].content[0]: audio input cannot be sent to an Anthropic provider"
        );
        let e = chat_request_to_messages(b"{\"model\": ", "c", 1).err();
        assert_eq!(e.as_ref().map(|e| e.field.as_str()), Some(""));
        assert!(e.is_some_and(|e| e.reason.contains("EOF while parsing")));
    }

    #[test]
    fn messages_to_chat_full_request() {
        let req = json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "system": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Cite sources.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "Weather in Paris and Lyon?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "two lookups", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Lyon"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true, "content": [{"type": "text", "text": "timeout"}]},
                    {"type": "text", "text": "And this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}
                ]},
                {"role": "assistant", "content": "Paris 18C."}
            ],
            "tools": [{"name": "get_weather", "description": "Current weather", "cache_control": {"type": "ephemeral"},
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"],
            "temperature": 0.2,
            "top_p": 0.8,
            "top_k": 40,
            "stream": true,
            "metadata": {"user_id": "user-42"},
            "thinking": {"type": "enabled", "budget_tokens": 512}
        });
        assert_eq!(
            to_chat(req),
            json!({
                "model": "gpt-4o",
                "messages": [
                    {"role": "system", "content": "You are terse.\n\nCite sources."},
                    {"role": "user", "content": "Weather in Paris and Lyon?"},
                    {"role": "assistant", "content": "Checking.", "tool_calls": [
                        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                        {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}}
                    ]},
                    {"role": "tool", "tool_call_id": "toolu_1", "content": "18C sunny"},
                    {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: timeout"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "And this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
                    ]},
                    {"role": "assistant", "content": "Paris 18C."}
                ],
                "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "parallel_tool_calls": false,
                "max_completion_tokens": 1024,
                "stop": ["END"],
                "temperature": 0.2,
                "top_p": 0.8,
                "stream": true,
                "stream_options": {"include_usage": true},
                "user": "user-42"
            })
        );
    }

    #[test]
    fn messages_to_chat_small_cases() {
        let tools = json!([{"name": "f", "input_schema": {"type": "object"}}]);
        for (choice, want) in [
            (json!({"type": "auto"}), json!("auto")),
            (json!({"type": "any"}), json!("required")),
            (json!({"type": "none"}), json!("none")),
            (
                json!({"type": "tool", "name": "f"}),
                json!({"type": "function", "function": {"name": "f"}}),
            ),
        ] {
            let got = to_chat(
                json!({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": choice}),
            );
            assert_eq!(got["tool_choice"], want, "{choice}");
            assert_eq!(got.get("parallel_tool_calls"), None);
        }
        let got = to_chat(
            json!({"model": "c", "max_tokens": 5, "system": [{"type": "text", "text": ""}], "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(got["messages"], json!([{"role": "user", "content": "hi"}]));
        let got = to_chat(
            json!({"model": "c", "max_tokens": 5, "system": "sys", "stream": false, "stop_sequences": [],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "one"}]},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]}),
        );
        assert_eq!(
            got,
            json!({"model": "gpt-4o", "max_completion_tokens": 5, "stream": false, "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "t", "content": ""}
            ]})
        );
    }

    #[test]
    fn messages_to_chat_refusals() {
        let user = |content: Value| json!({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": content}]});
        let with = |k: &str, v: Value| {
            let mut r = user(json!("hi"));
            if let Some(o) = r.as_object_mut() {
                o.insert(k.into(), v);
            }
            r
        };
        let cases = [
            (
                with(
                    "tools",
                    json!([{"type": "web_search_20250305", "name": "web_search"}]),
                ),
                "tools[0].type",
            ),
            (
                with("tools", json!([{"name": "f"}])),
                "tools[0].input_schema",
            ),
            (
                with("tools", json!([{"name": "f", "input_schema": {}}])).clone(),
                "<none>",
            ),
            (
                with("mcp_servers", json!([{"type": "url", "url": "https://m"}])),
                "mcp_servers",
            ),
            (with("container", json!("c1")), "container"),
            (with("unknown_knob", json!(true)), "unknown_knob"),
            (with("max_tokens", json!("many")), "max_tokens"),
            (with("stop_sequences", json!("END")), "stop_sequences"),
            (with("metadata", json!({"user_id": 5})), "metadata.user_id"),
            (with("system", json!([{"type": "image"}])), "system[0].type"),
            (with("tool_choice", json!({"type": "tool"})), "<none>"),
            (with("messages", json!("hi")), "messages"),
            (
                user(
                    json!([{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]),
                ),
                "messages[0].content[0]",
            ),
            (
                user(json!([{"type": "image", "source": {"type": "file", "file_id": "file_1"}}])),
                "messages[0].content[0].source",
            ),
            (
                user(
                    json!([{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}]),
                ),
                "messages[0].content[0].content[0]",
            ),
            (
                user(json!([{"type": "search_result"}])),
                "messages[0].content[0].type",
            ),
            (
                json!({"model": "c", "max_tokens": 5, "messages": [{"role": "assistant", "content": [{"type": "server_tool_use", "id": "s"}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"model": "c", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
                "messages[0].role",
            ),
            (json!("text"), ""),
        ];
        for (req, field) in cases {
            let got = messages_request_to_chat(req.to_string().as_bytes(), "g")
                .err()
                .map(|e| e.field);
            assert_eq!(got.as_deref().unwrap_or("<none>"), field, "{req}");
        }
        let bad_choice = with(
            "tools",
            json!([{"name": "f", "input_schema": {"type": "object"}}]),
        );
        let mut bad_choice = bad_choice;
        if let Some(o) = bad_choice.as_object_mut() {
            o.insert("tool_choice".into(), json!({"type": "tool"}));
        }
        let got = messages_request_to_chat(bad_choice.to_string().as_bytes(), "g")
            .err()
            .map(|e| e.field);
        assert_eq!(got.as_deref(), Some("tool_choice"));
    }

    #[test]
    fn request_round_trip_keeps_the_conversation() {
        let chat = json!({"model": "gpt-4o", "max_tokens": 200, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "add", "arguments": "{\"a\":2,\"b\":3}"}}]},
            {"role": "tool", "tool_call_id": "call_9", "content": "5"},
            {"role": "assistant", "content": "5"}
        ], "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}], "tool_choice": "auto"});
        let anthropic =
            chat_request_to_messages(chat.to_string().as_bytes(), "claude", 1).unwrap_or_default();
        let back: Value = crate::json::from_slice(
            &messages_request_to_chat(&anthropic, "gpt-4o").unwrap_or_default(),
        )
        .unwrap_or_default();
        assert_eq!(back["messages"], chat["messages"]);
        assert_eq!(back["tools"], chat["tools"]);
        assert_eq!(back["tool_choice"], "auto");
        assert_eq!(back["max_completion_tokens"], 200);
    }
}
