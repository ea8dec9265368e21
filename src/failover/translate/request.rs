//! Request bodies: OpenAI chat completions <-> Anthropic messages.

use std::borrow::Cow;

use serde_json::value::RawValue;
use serde_json::Number;

use super::shapes::{
    BlockIn, BlockOut, ChatFunctionCallOut, ChatFunctionDefOut, ChatMessageIn, ChatMessageOut,
    ChatPartIn, ChatPartOut, ChatRequestIn, ChatRequestOut, ChatToolCallOut, ChatToolChoiceIn,
    ChatToolChoiceOut, ChatToolIn, ChatToolOut, ImageSourceOut, ImageUrlIn, ImageUrlOut, MessageIn,
    MessageOut, MessagesRequestIn, MessagesRequestOut, MetadataOut, NameOut, SchemaOut, StrOr,
    StrOrParts, StreamOptionsOut, ToolChoiceOut, ToolIn, ToolOut, ToolResultOut,
};
use super::{err, parse_body, to_body, tool_call_input, TranslateError};

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
/// Anthropic's 0..=1 (written `1` or `0` when clamped, as the client wrote it otherwise).
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
    let req: ChatRequestIn = parse_body(body, "this field has no Anthropic equivalent")?;
    refuse_chat_only(&req)?;

    let stop_sequences = match req.stop {
        None => None,
        Some(raw) => match serde_json::from_str::<StrOr<Vec<Cow<str>>>>(raw.get()) {
            Ok(StrOr::Str(s)) => Some(vec![s]),
            Ok(StrOr::Other(list)) => Some(list).filter(|l| !l.is_empty()),
            Err(_) => return Err(err("stop", "must be a string or an array of strings")),
        },
    };
    // Anthropic's range is 0..1 (OpenAI's 0..2): clamped, else kept as written.
    let temperature = req.temperature.map(|t| match t.as_f64() {
        Some(f) if f > 1.0 => Number::from(1),
        Some(f) if f < 0.0 => Number::from(0),
        _ => t,
    });
    let (system, messages) = chat_messages(req.messages)?;

    let tools = req
        .tools
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(k, t)| chat_tool(t, k))
        .collect::<Result<Vec<_>, _>>()?;
    let tool_choice = if tools.is_empty() {
        None
    } else {
        let mut choice = match req.tool_choice {
            Some(c) => chat_tool_choice(c)?,
            None => ToolChoiceOut {
                kind: "auto",
                name: None,
                disable_parallel_tool_use: false,
            },
        };
        choice.disable_parallel_tool_use =
            req.parallel_tool_calls == Some(false) && choice.kind != "none";
        Some(choice)
    };

    let out = MessagesRequestOut {
        model,
        max_tokens: req
            .max_completion_tokens
            .or(req.max_tokens)
            .unwrap_or(default_max_tokens),
        system: Some(system.join("\n\n")).filter(|s| !s.is_empty()),
        messages,
        tools: Some(tools).filter(|t| !t.is_empty()),
        tool_choice,
        temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        stream: req.stream,
        stop_sequences,
        metadata: req
            .user
            .or(req.safety_identifier)
            .map(|user_id| MetadataOut { user_id }),
    };
    to_body(&out)
}

/// The request members that ask for what an Anthropic provider cannot give.
fn refuse_chat_only(req: &ChatRequestIn) -> Result<(), TranslateError> {
    const NO_LOGPROBS: &str = "log probabilities are not available from an Anthropic provider";
    if req.n.is_some_and(|n| n != 1) {
        return Err(err(
            "n",
            "an Anthropic provider returns a single choice; n must be 1",
        ));
    }
    if req.logprobs == Some(true) {
        return Err(err("logprobs", NO_LOGPROBS));
    }
    if req.top_logprobs.is_some_and(|n| n != 0) {
        return Err(err("top_logprobs", NO_LOGPROBS));
    }
    if let Some(f) = &req.response_format {
        match f.kind.as_deref() {
            Some("text") => {}
            Some(t @ ("json_object" | "json_schema")) => {
                return Err(err(
                    "response_format.type",
                    format!("{t} output cannot be enforced by an Anthropic provider"),
                ))
            }
            _ => return Err(err("response_format.type", "unsupported response format")),
        }
    }
    if req
        .modalities
        .as_ref()
        .is_some_and(|m| m.iter().any(|m| m != "text"))
    {
        return Err(err(
            "modalities",
            "an Anthropic provider only produces text",
        ));
    }
    if req.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(err(
            "logit_bias",
            "logit bias is not available from an Anthropic provider",
        ));
    }
    if req.audio.is_some() {
        return Err(err(
            "audio",
            "audio output is not available from an Anthropic provider",
        ));
    }
    for (name, v) in [
        ("functions", &req.functions),
        ("function_call", &req.function_call),
    ] {
        if v.is_some() {
            return Err(err(
                name,
                "the deprecated functions API is not supported; use tools and tool_choice",
            ));
        }
    }
    Ok(())
}

/// System texts and Anthropic messages, with consecutive same-role messages merged (Anthropic
/// requires alternation) and tool results first in their user message (Anthropic requires that too).
fn chat_messages(
    messages: Option<Vec<ChatMessageIn<'_>>>,
) -> Result<(Vec<String>, Vec<MessageOut<'_>>), TranslateError> {
    let messages = messages.ok_or_else(|| err("messages", "must be an array of messages"))?;
    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<BlockOut>)> = Vec::new();
    for (i, m) in messages.into_iter().enumerate() {
        let path = format!("messages[{i}]");
        let (role, blocks) = match m.role.as_ref() {
            "system" | "developer" => {
                let text = plain_text(m.content, &format!("{path}.content"))?;
                if !text.is_empty() {
                    system.push(text);
                }
                continue;
            }
            "user" => ("user", user_blocks(m.content, &path)?),
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
            let (mut content, rest): (Vec<_>, Vec<_>) = blocks
                .into_iter()
                .partition(|b| matches!(b, BlockOut::ToolResult { .. }));
            content.extend(rest);
            MessageOut { role, content }
        })
        .collect();
    Ok((system, messages))
}

/// Text of a system or tool message: a string or text parts.
fn plain_text(
    content: Option<StrOr<Vec<ChatPartIn>>>,
    path: &str,
) -> Result<String, TranslateError> {
    match content {
        None => Ok(String::new()),
        Some(StrOr::Str(s)) => Ok(s.into_owned()),
        Some(StrOr::Other(parts)) => Ok(text_parts(parts, path)?.join("\n")),
    }
}

fn text_parts<'a>(
    parts: Vec<ChatPartIn<'a>>,
    path: &str,
) -> Result<Vec<Cow<'a, str>>, TranslateError> {
    parts
        .into_iter()
        .enumerate()
        .map(|(j, p)| match p.kind.as_ref() {
            "text" => text_of(p.text, &format!("{path}[{j}]")),
            _ => Err(err(
                format!("{path}[{j}].type"),
                "only text parts are allowed here",
            )),
        })
        .collect()
}

fn text_of<'a>(text: Option<Cow<'a, str>>, path: &str) -> Result<Cow<'a, str>, TranslateError> {
    text.ok_or_else(|| err(format!("{path}.text"), "must be a string"))
}

fn text_block(text: Cow<'_, str>) -> Option<BlockOut<'_>> {
    // Anthropic rejects empty text blocks; an empty text carries nothing.
    (!text.is_empty()).then_some(BlockOut::Text { text })
}

fn user_blocks<'a>(
    content: Option<StrOr<'a, Vec<ChatPartIn<'a>>>>,
    path: &str,
) -> Result<Vec<BlockOut<'a>>, TranslateError> {
    let parts = match content {
        Some(StrOr::Str(s)) => return Ok(text_block(s).into_iter().collect()),
        Some(StrOr::Other(parts)) => parts,
        None => {
            return Err(err(
                format!("{path}.content"),
                "must be a string or an array of content parts",
            ))
        }
    };
    let mut blocks = Vec::new();
    for (j, p) in parts.into_iter().enumerate() {
        let path = format!("{path}.content[{j}]");
        match p.kind.as_ref() {
            "text" => blocks.extend(text_block(text_of(p.text, &path)?)),
            "image_url" => blocks.push(image_block(p.image_url, &path)?),
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

fn image_block<'a>(
    image_url: Option<StrOr<'a, ImageUrlIn<'a>>>,
    path: &str,
) -> Result<BlockOut<'a>, TranslateError> {
    let path = format!("{path}.image_url.url");
    let url = match image_url {
        Some(StrOr::Str(u)) => Some(u),
        Some(StrOr::Other(i)) => i.url,
        None => None,
    };
    let source = match url.ok_or_else(|| err(&path, "must be a string"))? {
        Cow::Borrowed(u) => image_source(u, &path)?.map(Cow::Borrowed),
        Cow::Owned(u) => image_source(&u, &path)?.map(|s| Cow::Owned(s.to_string())),
    };
    Ok(BlockOut::Image { source })
}

/// An image URL (data: or http(s)) as an Anthropic image source.
fn image_source<'u>(url: &'u str, path: &str) -> Result<ImageSourceOut<&'u str>, TranslateError> {
    if let Some(data) = url.strip_prefix("data:") {
        let (media_type, data) = data
            .split_once(',')
            .and_then(|(head, data)| Some((head.strip_suffix(";base64")?.split(';').next()?, data)))
            .ok_or_else(|| {
                err(
                    path,
                    "only base64 data URLs can be sent to an Anthropic provider",
                )
            })?;
        return Ok(ImageSourceOut::Base64 { media_type, data });
    }
    let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
    if matches!(scheme.as_deref(), Some("http" | "https")) {
        return Ok(ImageSourceOut::Url { url });
    }
    Err(err(path, "must be an http(s) or data: URL"))
}

fn assistant_blocks<'a>(
    m: ChatMessageIn<'a>,
    path: &str,
) -> Result<Vec<BlockOut<'a>>, TranslateError> {
    if m.audio.is_some() {
        return Err(err(
            format!("{path}.audio"),
            "assistant audio cannot be sent to an Anthropic provider",
        ));
    }
    if m.function_call.is_some() {
        return Err(err(
            format!("{path}.function_call"),
            "the deprecated functions API is not supported; use tool_calls",
        ));
    }
    let mut blocks = Vec::new();
    match m.content {
        Some(StrOr::Str(s)) => blocks.extend(text_block(s)),
        Some(StrOr::Other(parts)) => {
            for (j, p) in parts.into_iter().enumerate() {
                let path = format!("{path}.content[{j}]");
                let text = match p.kind.as_ref() {
                    "text" => text_of(p.text, &path)?,
                    "refusal" => p.refusal.unwrap_or_default(),
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
        None => blocks.extend(text_block(m.refusal.unwrap_or_default())),
    }
    for (k, c) in m.tool_calls.unwrap_or_default().into_iter().enumerate() {
        let path = format!("{path}.tool_calls[{k}]");
        if c.kind.as_ref().is_some_and(|t| t != "function") {
            return Err(err(
                format!("{path}.type"),
                "only function tool calls can be sent to an Anthropic provider",
            ));
        }
        let id =
            c.id.ok_or_else(|| err(format!("{path}.id"), "must be a string"))?;
        let (name, arguments) = c.function.map_or((None, None), |f| (f.name, f.arguments));
        let name = name.ok_or_else(|| err(format!("{path}.function.name"), "must be a string"))?;
        let input = tool_call_input(arguments.as_deref(), &path)?;
        blocks.push(BlockOut::ToolUse { id, name, input });
    }
    Ok(blocks)
}

fn tool_result<'a>(m: ChatMessageIn<'a>, path: &str) -> Result<BlockOut<'a>, TranslateError> {
    let tool_use_id = m
        .tool_call_id
        .ok_or_else(|| err(format!("{path}.tool_call_id"), "must be a string"))?;
    let content = match m.content {
        Some(StrOr::Other(parts)) => {
            let texts = text_parts(parts, &format!("{path}.content"))?;
            let blocks: Vec<_> = texts.into_iter().filter_map(text_block).collect();
            (!blocks.is_empty()).then_some(ToolResultOut::Blocks(blocks))
        }
        Some(StrOr::Str(s)) => (!s.is_empty()).then_some(ToolResultOut::Text(s)),
        None => None,
    };
    Ok(BlockOut::ToolResult {
        tool_use_id,
        content,
    })
}

fn chat_tool(t: ChatToolIn<'_>, k: usize) -> Result<ToolOut<'_>, TranslateError> {
    let path = format!("tools[{k}]");
    if t.kind.as_deref() != Some("function") {
        return Err(err(
            format!("{path}.type"),
            "only function tools can be sent to an Anthropic provider",
        ));
    }
    let f = t
        .function
        .ok_or_else(|| err(format!("{path}.function"), "is required"))?;
    let name = f
        .name
        .ok_or_else(|| err(format!("{path}.function.name"), "must be a string"))?;
    let input_schema = match f.parameters {
        Some(p) if is_object(p) => SchemaOut::Raw(p),
        Some(_) => {
            return Err(err(
                format!("{path}.function.parameters"),
                "must be a JSON schema object",
            ))
        }
        None => SchemaOut::EmptyObject,
    };
    Ok(ToolOut {
        name,
        description: f.description,
        input_schema,
    })
}

fn is_object(v: &RawValue) -> bool {
    v.get().starts_with('{')
}

fn chat_tool_choice<'a>(
    c: StrOr<'a, ChatToolChoiceIn<'a>>,
) -> Result<ToolChoiceOut<'a>, TranslateError> {
    let (kind, name) = match c {
        StrOr::Str(s) => match s.as_ref() {
            "auto" => ("auto", None),
            "none" => ("none", None),
            "required" => ("any", None),
            _ => ("", None),
        },
        StrOr::Other(ChatToolChoiceIn {
            kind: Some(k),
            function: Some(f),
        }) if k == "function" && f.name.is_some() => ("tool", f.name),
        StrOr::Other(_) => ("", None),
    };
    if kind.is_empty() {
        return Err(err(
            "tool_choice",
            "must be \"auto\", \"none\", \"required\" or a function choice",
        ));
    }
    Ok(ToolChoiceOut {
        kind,
        name,
        disable_parallel_tool_use: false,
    })
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
    let req: MessagesRequestIn = parse_body(body, "this field has no OpenAI equivalent")?;
    for (name, v) in [
        ("mcp_servers", &req.mcp_servers),
        ("container", &req.container),
        ("context_management", &req.context_management),
    ] {
        if v.is_some() {
            return Err(err(
                name,
                "this feature is not available from an OpenAI provider",
            ));
        }
    }

    let mut messages = Vec::new();
    let system = match req.system {
        None => String::new(),
        Some(StrOr::Str(s)) => s.into_owned(),
        Some(StrOr::Other(blocks)) => blocks
            .into_iter()
            .enumerate()
            .map(|(j, b)| match b.kind.as_ref() {
                "text" => text_of(b.text, &format!("system[{j}]")),
                _ => Err(err(
                    format!("system[{j}].type"),
                    "only text blocks are allowed in system",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?
            .join("\n\n"),
    };
    if !system.is_empty() {
        messages.push(ChatMessageOut::System { content: system });
    }
    let msgs = req
        .messages
        .ok_or_else(|| err("messages", "must be an array of messages"))?;
    for (i, m) in msgs.into_iter().enumerate() {
        messages_message(m, &format!("messages[{i}]"), &mut messages)?;
    }

    let tools = req
        .tools
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(k, t)| messages_tool(t, k))
        .collect::<Result<Vec<_>, _>>()?;
    // OpenAI rejects tool_choice and parallel_tool_calls without tools; without tools there is no choice.
    let (tool_choice, parallel_tool_calls) = match req.tool_choice {
        Some(c) if !tools.is_empty() => {
            let choice = match (c.kind.as_deref(), c.name) {
                (Some("auto"), _) => ChatToolChoiceOut::Mode("auto"),
                (Some("none"), _) => ChatToolChoiceOut::Mode("none"),
                (Some("any"), _) => ChatToolChoiceOut::Mode("required"),
                (Some("tool"), Some(name)) => ChatToolChoiceOut::Function {
                    kind: "function",
                    function: NameOut { name },
                },
                _ => {
                    return Err(err(
                        "tool_choice",
                        "must be of type auto, any, none or tool (with a name)",
                    ))
                }
            };
            let serial = c.disable_parallel_tool_use == Some(true);
            (Some(choice), serial.then_some(false))
        }
        _ => (None, None),
    };
    let stream = req.stream;
    let out = ChatRequestOut {
        model,
        messages,
        tools: Some(tools).filter(|t| !t.is_empty()),
        tool_choice,
        parallel_tool_calls,
        max_completion_tokens: req.max_tokens,
        stop: req.stop_sequences.filter(|s| !s.is_empty()),
        temperature: req.temperature,
        top_p: req.top_p,
        stream,
        stream_options: (stream == Some(true)).then_some(StreamOptionsOut {
            include_usage: true,
        }),
        user: req.metadata.and_then(|m| m.user_id),
    };
    to_body(&out)
}

/// One Anthropic message -> OpenAI messages: a user message's tool results become `tool` messages
/// (placed first, right after the assistant's tool calls) followed by the rest of its content.
fn messages_message<'a>(
    m: MessageIn<'a>,
    path: &str,
    out: &mut Vec<ChatMessageOut<'a>>,
) -> Result<(), TranslateError> {
    let role = m.role.as_ref();
    if role != "user" && role != "assistant" {
        return Err(err(
            format!("{path}.role"),
            "must be \"user\" or \"assistant\"",
        ));
    }
    let blocks = match m.content {
        Some(StrOr::Str(s)) if role == "user" => {
            out.push(ChatMessageOut::User {
                content: StrOrParts::Str(s),
            });
            return Ok(());
        }
        Some(StrOr::Str(s)) => {
            out.push(ChatMessageOut::Assistant {
                content: Some(s.into_owned()),
                tool_calls: None,
            });
            return Ok(());
        }
        Some(StrOr::Other(b)) => b,
        None => {
            return Err(err(
                format!("{path}.content"),
                "must be a string or an array of content blocks",
            ))
        }
    };
    if role == "user" {
        let mut parts = Vec::new();
        for (j, b) in blocks.into_iter().enumerate() {
            let path = format!("{path}.content[{j}]");
            match b.kind.as_ref() {
                "text" => parts.push(ChatPartOut::Text {
                    text: text_of(b.text, &path)?,
                }),
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
        let content = match parts.len() {
            0 => return Ok(()),
            1 => match parts.pop() {
                Some(ChatPartOut::Text { text }) => StrOrParts::Str(text),
                p => StrOrParts::Parts(p.into_iter().collect()),
            },
            _ => StrOrParts::Parts(parts),
        };
        out.push(ChatMessageOut::User { content });
        return Ok(());
    }
    let (mut texts, mut calls) = (Vec::new(), Vec::new());
    for (j, b) in blocks.into_iter().enumerate() {
        let path = format!("{path}.content[{j}]");
        match b.kind.as_ref() {
            "text" => texts.push(text_of(b.text, &path)?),
            "tool_use" => {
                let id =
                    b.id.ok_or_else(|| err(format!("{path}.id"), "must be a string"))?;
                let name = b
                    .name
                    .ok_or_else(|| err(format!("{path}.name"), "must be a string"))?;
                calls.push(ChatToolCallOut {
                    id,
                    kind: "function",
                    function: ChatFunctionCallOut {
                        name,
                        arguments: Cow::Borrowed(b.input.map_or("{}", RawValue::get)),
                    },
                });
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
    let content = (!texts.is_empty() || calls.is_empty()).then(|| texts.join("\n"));
    out.push(ChatMessageOut::Assistant {
        content,
        tool_calls: (!calls.is_empty()).then_some(calls),
    });
    Ok(())
}

fn image_part<'a>(b: BlockIn<'a>, path: &str) -> Result<ChatPartOut<'a>, TranslateError> {
    let url = match b.source {
        Some(src) => match (src.kind.as_deref(), src.media_type, src.data, src.url) {
            (Some("base64"), Some(mt), Some(data), _) => Some(format!("data:{mt};base64,{data}")),
            (Some("url"), _, _, Some(url)) => Some(url.into_owned()),
            _ => None,
        },
        None => None,
    };
    let url = url.ok_or_else(|| {
        err(
            format!("{path}.source"),
            "only base64 and url image sources can be sent to an OpenAI provider",
        )
    })?;
    Ok(ChatPartOut::ImageUrl {
        image_url: ImageUrlOut { url },
    })
}

fn tool_message<'a>(b: BlockIn<'a>, path: &str) -> Result<ChatMessageOut<'a>, TranslateError> {
    let tool_call_id = b
        .tool_use_id
        .ok_or_else(|| err(format!("{path}.tool_use_id"), "must be a string"))?;
    let text = match b.content {
        None => String::new(),
        Some(StrOr::Str(s)) => s.into_owned(),
        Some(StrOr::Other(parts)) => parts
            .into_iter()
            .enumerate()
            .map(|(j, p)| match p.kind.as_ref() {
                "text" => text_of(p.text, &format!("{path}.content[{j}]")),
                "image" => Err(err(
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
    };
    let content = if b.is_error == Some(true) {
        format!("Error: {text}")
    } else {
        text
    };
    Ok(ChatMessageOut::Tool {
        tool_call_id,
        content,
    })
}

fn messages_tool(t: ToolIn<'_>, k: usize) -> Result<ChatToolOut<'_>, TranslateError> {
    let path = format!("tools[{k}]");
    match t.kind.as_deref() {
        None | Some("custom") => {}
        Some(other) => {
            return Err(err(
                format!("{path}.type"),
                format!("server tool \"{other}\" cannot be run by an OpenAI provider"),
            ))
        }
    }
    let name = t
        .name
        .ok_or_else(|| err(format!("{path}.name"), "must be a string"))?;
    let parameters = t.input_schema.filter(|s| is_object(s)).ok_or_else(|| {
        err(
            format!("{path}.input_schema"),
            "must be a JSON schema object",
        )
    })?;
    Ok(ChatToolOut {
        kind: "function",
        function: ChatFunctionDefOut {
            name,
            description: t.description,
            parameters,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn to_messages(req: Value) -> Value {
        let out = chat_request_to_messages(req.to_string().as_bytes(), "claude-sonnet-4-5", 4096);
        serde_json::from_slice(&out.unwrap_or_default()).unwrap_or_default()
    }

    fn to_chat(req: Value) -> Value {
        let out = messages_request_to_chat(req.to_string().as_bytes(), "gpt-4o");
        serde_json::from_slice(&out.unwrap_or_default()).unwrap_or_default()
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
                // Clamped: written as Anthropic's bound, 1 (serde_json tells 1 from 1.0).
                "temperature": 1,
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
            (json!({"temperature": -0.5}), "temperature", json!(0)),
            (json!({"temperature": 0.3}), "temperature", json!(0.3)),
            (json!({"temperature": 2}), "temperature", json!(1)),
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
        let back: Value = serde_json::from_slice(
            &messages_request_to_chat(&anthropic, "gpt-4o").unwrap_or_default(),
        )
        .unwrap_or_default();
        assert_eq!(back["messages"], chat["messages"]);
        assert_eq!(back["tools"], chat["tools"]);
        assert_eq!(back["tool_choice"], "auto");
        assert_eq!(back["max_completion_tokens"], 200);
    }

    /// Escaped strings cannot be borrowed from the body; they are read and written all the same.
    #[test]
    fn escaped_strings_and_error_reasons() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a\"b\u00e9"},
            {"type":"image_url","image_url":{"url":"data:image\/png;base64,iV\/BOR=="}}]}],"stop":"\n"}"#;
        let got: Value =
            serde_json::from_slice(&chat_request_to_messages(body, "c", 5).unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(
            got["messages"][0]["content"],
            json!([{"type": "text", "text": "a\"bé"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iV/BOR=="}}])
        );
        assert_eq!(got["stop_sequences"], json!(["\n"]));

        let e = chat_err(json!({"model": "m", "messages": [], "brand_new_knob": 1}));
        assert_eq!(
            e.to_string(),
            "brand_new_knob: this field has no Anthropic equivalent"
        );
        let e = messages_request_to_chat(br#"{"messages":[],"knob":1}"#, "g").err();
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some("knob: this field has no OpenAI equivalent")
        );
        // Type errors name the field and say what was expected.
        let e = chat_err(
            json!({"model": "m", "messages": [{"role": "user", "content": "x", "tool_call_id": 5}]}),
        );
        assert_eq!(e.field, "messages[0].tool_call_id");
        assert!(e.reason.contains("expected a string"), "{e}");
        let e = chat_request_to_messages(br#"{"messages":[]} x"#, "c", 1).err();
        assert_eq!(e.map(|e| e.field).as_deref(), Some(""));
    }
}
