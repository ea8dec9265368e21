//! The two APIs' JSON shapes as serde types: `*In` types are read (Deserialize, borrowing from the
//! body), `*Out` types are written (Serialize). Field names follow the official references (OpenAI
//! chat completions request/response/chunk, Anthropic Messages request/response/stream events).
//!
//! Shapes with a `type` discriminator are read as one flat struct holding every variant's fields
//! plus `kind`, not as `#[serde(tag = "type")]` enums: serde buffers a tagged enum's content before
//! choosing the variant, which loses the field path of any error inside it and cannot borrow
//! escaped strings, and an unknown `type` must be reported by name (the "no silent drops" rule).
//! Written shapes are tagged enums (serializing them buffers nothing).
//!
//! Two small hand-written `Deserialize` impls stay, for what serde offers no attribute for:
//! [`StrOr`] ("a string or an array/object", which `#[serde(untagged)]` would buffer and report
//! without a path) and [`Lenient`] (a provider's value of an unexpected type is treated as absent
//! rather than failing the whole answer).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, value::MapAccessDeserializer, value::SeqAccessDeserializer, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Number;

// ---------------------------------------------------------------------------------------------
// Helpers for shapes serde has no attribute for.

/// A JSON string, or something else read as `T` (an array or an object): OpenAI's
/// `content: "text" | [parts]`, `tool_choice: "auto" | {..}`, `image_url: "url" | {url}`.
#[derive(Debug)]
pub(crate) enum StrOr<'a, T> {
    Str(Cow<'a, str>),
    Other(T),
}

impl<'de: 'a, 'a, T: Deserialize<'de>> Deserialize<'de> for StrOr<'a, T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a, T>(PhantomData<(&'a (), T)>);
        impl<'de: 'a, 'a, T: Deserialize<'de>> de::Visitor<'de> for V<'a, T> {
            type Value = StrOr<'a, T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, an array or an object")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(StrOr::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(StrOr::Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(StrOr::Str(Cow::Owned(v)))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                T::deserialize(SeqAccessDeserializer::new(seq)).map(StrOr::Other)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(StrOr::Other)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// Any JSON value; `Some` when it reads as `T`, `None` otherwise (and when absent, with
/// `#[serde(default)]`). For what providers report (usage counts, error fields): a count of the
/// wrong type must not cost the client its answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Lenient<T>(pub Option<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Lenient(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        Ok(Lenient(serde_json::from_str(raw.get()).ok()))
    }
}

impl Lenient<u64> {
    pub(crate) fn n(self) -> u64 {
        self.0.unwrap_or(0)
    }
}

/// A tool call's input object: parsed from OpenAI's `arguments` string, or `{}`.
#[derive(Debug)]
pub(crate) enum Input {
    Owned(Box<RawValue>),
    Empty,
}

impl Serialize for Input {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Input::Owned(r) => r.serialize(s),
            Input::Empty => serde::ser::SerializeMap::end(s.serialize_map(Some(0))?),
        }
    }
}

/// Written as JSON `null`: members the shapes require that tollgate never fills.
pub(crate) type Null = Option<IgnoredNull>;

#[derive(Debug, Serialize)]
pub(crate) enum IgnoredNull {}

// ---------------------------------------------------------------------------------------------
// OpenAI chat completions: read.

/// A chat-completions request. Every member is named: an unknown one is refused by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChatRequestIn<'a> {
    #[serde(borrow)]
    pub messages: Option<Vec<ChatMessageIn<'a>>>,
    #[allow(dead_code)] // accepted, not used
    pub model: Option<IgnoredAny>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<Number>,
    pub top_p: Option<Number>,
    /// Not OpenAI's; OpenAI-compatible servers accept it.
    pub top_k: Option<u64>,
    pub stream: Option<bool>,
    /// A string or an array of strings; read in a second step so that an error names `stop`.
    #[serde(borrow)]
    pub stop: Option<&'a RawValue>,
    pub n: Option<u64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    #[serde(borrow)]
    pub response_format: Option<TypeOnlyIn<'a>>,
    #[serde(borrow)]
    pub modalities: Option<Vec<Cow<'a, str>>>,
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    pub audio: Option<IgnoredAny>,
    pub functions: Option<IgnoredAny>,
    pub function_call: Option<IgnoredAny>,
    #[serde(borrow)]
    pub tools: Option<Vec<ChatToolIn<'a>>>,
    #[serde(borrow)]
    pub tool_choice: Option<StrOr<'a, ChatToolChoiceIn<'a>>>,
    pub parallel_tool_calls: Option<bool>,
    #[serde(borrow)]
    pub user: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub safety_identifier: Option<Cow<'a, str>>,
    // Dropped on purpose (see chat_request_to_messages).
    #[allow(dead_code)] // accepted, not used
    pub frequency_penalty: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub presence_penalty: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub seed: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub stream_options: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub store: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub metadata: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub service_tier: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub prompt_cache_key: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub prompt_cache_retention: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub prediction: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub reasoning_effort: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub verbosity: Option<IgnoredAny>,
}

/// An object of which only `type` matters (`response_format`).
#[derive(Debug, Deserialize)]
pub(crate) struct TypeOnlyIn<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
}

/// A message of any role (system, developer, user, assistant, tool).
#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessageIn<'a> {
    #[serde(borrow, default)]
    pub role: Cow<'a, str>,
    #[serde(borrow)]
    pub content: Option<StrOr<'a, Vec<ChatPartIn<'a>>>>,
    #[serde(borrow)]
    pub refusal: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub tool_calls: Option<Vec<ChatToolCallIn<'a>>>,
    #[serde(borrow)]
    pub tool_call_id: Option<Cow<'a, str>>,
    pub audio: Option<IgnoredAny>,
    pub function_call: Option<IgnoredAny>,
}

/// A content part: text, image_url, input_audio, file (user) or refusal (assistant).
#[derive(Debug, Deserialize)]
pub(crate) struct ChatPartIn<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Cow<'a, str>,
    #[serde(borrow)]
    pub text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub refusal: Option<Cow<'a, str>>,
    /// `{"url", "detail"}`; some clients send the URL string itself.
    #[serde(borrow)]
    pub image_url: Option<StrOr<'a, ImageUrlIn<'a>>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ImageUrlIn<'a> {
    #[serde(borrow)]
    pub url: Option<Cow<'a, str>>,
}

/// A tool call, whole (assistant message, response) or a streamed piece of one (chunk delta).
#[derive(Debug, Deserialize)]
pub(crate) struct ChatToolCallIn<'a> {
    pub index: Option<u64>,
    #[serde(borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub function: Option<ChatFunctionIn<'a>>,
}

/// A tool call's function, or a tool definition's (then `parameters`/`description` are set).
#[derive(Debug, Deserialize)]
pub(crate) struct ChatFunctionIn<'a> {
    #[serde(borrow)]
    pub name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub arguments: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub description: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub parameters: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatToolIn<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub function: Option<ChatFunctionIn<'a>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatToolChoiceIn<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub function: Option<ChatFunctionIn<'a>>,
}

/// A chat completion (non-streamed answer).
#[derive(Debug, Deserialize)]
pub(crate) struct ChatCompletionIn<'a> {
    #[serde(borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub choices: Option<Vec<ChatChoiceIn<'a>>>,
    pub usage: Option<ChatUsageIn>,
}

/// A choice of a completion (`message`) or of a chunk (`delta`).
#[derive(Debug, Deserialize)]
pub(crate) struct ChatChoiceIn<'a> {
    #[serde(borrow)]
    pub message: Option<ChatAnswerIn<'a>>,
    #[serde(borrow)]
    pub delta: Option<ChatAnswerIn<'a>>,
    #[serde(borrow)]
    pub finish_reason: Option<Cow<'a, str>>,
}

/// The assistant's message in a completion, or a chunk's delta of it.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatAnswerIn<'a> {
    #[serde(borrow)]
    pub content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub refusal: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub tool_calls: Option<Vec<ChatToolCallIn<'a>>>,
}

/// A `chat.completion.chunk`, or an error object sent inside the stream.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatChunkIn<'a> {
    #[serde(borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub choices: Option<Vec<ChatChoiceIn<'a>>>,
    pub usage: Option<ChatUsageIn>,
    pub error: Option<IgnoredAny>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub(crate) struct ChatUsageIn {
    #[serde(default)]
    pub prompt_tokens: Lenient<u64>,
    #[serde(default)]
    pub completion_tokens: Lenient<u64>,
    #[serde(default)]
    pub prompt_tokens_details: Lenient<PromptDetailsIn>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
pub(crate) struct PromptDetailsIn {
    #[serde(default)]
    pub cached_tokens: Lenient<u64>,
}

// ---------------------------------------------------------------------------------------------
// OpenAI chat completions: written.

#[derive(Debug, Serialize)]
pub(crate) struct ChatRequestOut<'a> {
    pub model: &'a str,
    pub messages: Vec<ChatMessageOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ChatToolOut<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ChatToolChoiceOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<Cow<'a, str>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<Number>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<Number>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptionsOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<Cow<'a, str>>,
}

#[derive(Debug, Serialize)]
pub(crate) struct StreamOptionsOut {
    pub include_usage: bool,
}

#[derive(Debug, Serialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub(crate) enum ChatMessageOut<'a> {
    System {
        content: String,
    },
    User {
        content: StrOrParts<'a>,
    },
    Assistant {
        /// `null` when the turn is only tool calls.
        content: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tool_calls: Option<Vec<ChatToolCallOut<'a>>>,
    },
    Tool {
        tool_call_id: Cow<'a, str>,
        content: String,
    },
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum StrOrParts<'a> {
    Str(Cow<'a, str>),
    Parts(Vec<ChatPartOut<'a>>),
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ChatPartOut<'a> {
    Text { text: Cow<'a, str> },
    ImageUrl { image_url: ImageUrlOut },
}

#[derive(Debug, Serialize)]
pub(crate) struct ImageUrlOut {
    pub url: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatToolCallOut<'a> {
    pub id: Cow<'a, str>,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: ChatFunctionCallOut<'a>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatFunctionCallOut<'a> {
    pub name: Cow<'a, str>,
    pub arguments: Cow<'a, str>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatToolOut<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: ChatFunctionDefOut<'a>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatFunctionDefOut<'a> {
    pub name: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<Cow<'a, str>>,
    pub parameters: &'a RawValue,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum ChatToolChoiceOut<'a> {
    Mode(&'static str),
    Function {
        #[serde(rename = "type")]
        kind: &'static str,
        function: NameOut<'a>,
    },
}

#[derive(Debug, Serialize)]
pub(crate) struct NameOut<'a> {
    pub name: Cow<'a, str>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatCompletionOut<'a> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [ChatChoiceOut<'a>; 1],
    /// Only when the provider reported usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<ChatUsageOut>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatChoiceOut<'a> {
    pub index: u64,
    pub message: ChatAnswerOut<'a>,
    pub logprobs: Null,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatAnswerOut<'a> {
    pub role: &'static str,
    pub content: Option<String>,
    pub refusal: Null,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ChatToolCallOut<'a>>>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatChunkOut<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChatChunkChoiceOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<ChatUsageOut>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatChunkChoiceOut<'a> {
    pub index: u64,
    pub delta: ChatDeltaOut<'a>,
    pub logprobs: Null,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct ChatDeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<[ChatToolCallDeltaOut<'a>; 1]>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatToolCallDeltaOut<'a> {
    pub index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: ChatFunctionDeltaOut<'a>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatFunctionDeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    pub arguments: &'a str,
}

#[derive(Debug, PartialEq, Serialize)]
pub(crate) struct ChatUsageOut {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub prompt_tokens_details: PromptDetailsOut,
}

#[derive(Debug, PartialEq, Serialize)]
pub(crate) struct PromptDetailsOut {
    pub cached_tokens: u64,
}

// ---------------------------------------------------------------------------------------------
// Anthropic messages: read.

/// A Messages request. Every member is named: an unknown one is refused by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MessagesRequestIn<'a> {
    #[allow(dead_code)] // accepted, not used
    pub model: Option<IgnoredAny>,
    #[serde(borrow)]
    pub messages: Option<Vec<MessageIn<'a>>>,
    #[serde(borrow)]
    pub system: Option<StrOr<'a, Vec<BlockIn<'a>>>>,
    #[serde(borrow)]
    pub tools: Option<Vec<ToolIn<'a>>>,
    #[serde(borrow)]
    pub tool_choice: Option<ToolChoiceIn<'a>>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<Number>,
    pub top_p: Option<Number>,
    pub stream: Option<bool>,
    #[serde(borrow)]
    pub stop_sequences: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow)]
    pub metadata: Option<MetadataIn<'a>>,
    // Dropped on purpose (see messages_request_to_chat).
    #[allow(dead_code)] // accepted, not used
    pub top_k: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub thinking: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub service_tier: Option<IgnoredAny>,
    #[allow(dead_code)] // accepted, not used
    pub cache_control: Option<IgnoredAny>,
    // Refused.
    pub mcp_servers: Option<IgnoredAny>,
    pub container: Option<IgnoredAny>,
    pub context_management: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct MetadataIn<'a> {
    #[serde(borrow)]
    pub user_id: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct MessageIn<'a> {
    #[serde(borrow, default)]
    pub role: Cow<'a, str>,
    #[serde(borrow)]
    pub content: Option<StrOr<'a, Vec<BlockIn<'a>>>>,
}

/// A content block of any type (text, image, document, tool_use, tool_result, thinking, ...), in
/// a request, a response or a stream's `content_block_start`.
#[derive(Debug, Deserialize)]
pub(crate) struct BlockIn<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Cow<'a, str>,
    #[serde(borrow)]
    pub text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub source: Option<ImageSourceIn<'a>>,
    #[serde(borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub input: Option<&'a RawValue>,
    #[serde(borrow)]
    pub tool_use_id: Option<Cow<'a, str>>,
    /// A tool result's content.
    #[serde(borrow)]
    pub content: Option<StrOr<'a, Vec<BlockIn<'a>>>>,
    pub is_error: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ImageSourceIn<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub media_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub data: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub url: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ToolIn<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub description: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub input_schema: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ToolChoiceIn<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub name: Option<Cow<'a, str>>,
    pub disable_parallel_tool_use: Option<bool>,
}

/// A Messages response.
#[derive(Debug, Deserialize)]
pub(crate) struct MessagesResponseIn<'a> {
    #[serde(borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub content: Option<Vec<BlockIn<'a>>>,
    #[serde(borrow)]
    pub stop_reason: Option<Cow<'a, str>>,
    pub usage: Option<UsageIn>,
}

/// A stream event of any type (message_start, content_block_*, message_delta, ...).
#[derive(Debug, Deserialize)]
pub(crate) struct EventIn<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub message: Option<MessagesResponseIn<'a>>,
    pub index: Option<u64>,
    #[serde(borrow)]
    pub content_block: Option<BlockIn<'a>>,
    #[serde(borrow)]
    pub delta: Option<DeltaIn<'a>>,
    pub usage: Option<UsageIn>,
}

/// A content_block_delta's or message_delta's `delta`.
#[derive(Debug, Deserialize)]
pub(crate) struct DeltaIn<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub partial_json: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub stop_reason: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
pub(crate) struct UsageIn {
    #[serde(default)]
    pub input_tokens: Lenient<u64>,
    #[serde(default)]
    pub output_tokens: Lenient<u64>,
    #[serde(default)]
    pub cache_creation_input_tokens: Lenient<u64>,
    #[serde(default)]
    pub cache_read_input_tokens: Lenient<u64>,
}

impl UsageIn {
    /// message_delta's counts complete (and, where both have one, replace) message_start's.
    pub(crate) fn merge(&mut self, later: &UsageIn) {
        for (mine, theirs) in [
            (&mut self.input_tokens, later.input_tokens),
            (&mut self.output_tokens, later.output_tokens),
            (
                &mut self.cache_creation_input_tokens,
                later.cache_creation_input_tokens,
            ),
            (
                &mut self.cache_read_input_tokens,
                later.cache_read_input_tokens,
            ),
        ] {
            if theirs.0.is_some() {
                *mine = theirs;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Anthropic messages: written.

#[derive(Debug, Serialize)]
pub(crate) struct MessagesRequestOut<'a> {
    pub model: &'a str,
    pub max_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub messages: Vec<MessageOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ToolOut<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoiceOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<Number>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<Number>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_sequences: Option<Vec<Cow<'a, str>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MetadataOut<'a>>,
}

#[derive(Debug, Serialize)]
pub(crate) struct MetadataOut<'a> {
    pub user_id: Cow<'a, str>,
}

#[derive(Debug, Serialize)]
pub(crate) struct MessageOut<'a> {
    pub role: &'static str,
    pub content: Vec<BlockOut<'a>>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum BlockOut<'a> {
    Text {
        text: Cow<'a, str>,
    },
    Image {
        source: ImageSourceOut<Cow<'a, str>>,
    },
    ToolUse {
        id: Cow<'a, str>,
        name: Cow<'a, str>,
        input: Input,
    },
    ToolResult {
        tool_use_id: Cow<'a, str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        content: Option<ToolResultOut<'a>>,
    },
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ImageSourceOut<S> {
    Base64 { media_type: S, data: S },
    Url { url: S },
}

impl<S> ImageSourceOut<S> {
    pub(crate) fn map<T>(self, f: impl Fn(S) -> T) -> ImageSourceOut<T> {
        match self {
            ImageSourceOut::Base64 { media_type, data } => ImageSourceOut::Base64 {
                media_type: f(media_type),
                data: f(data),
            },
            ImageSourceOut::Url { url } => ImageSourceOut::Url { url: f(url) },
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum ToolResultOut<'a> {
    Text(Cow<'a, str>),
    Blocks(Vec<BlockOut<'a>>),
}

#[derive(Debug, Serialize)]
pub(crate) struct ToolOut<'a> {
    pub name: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<Cow<'a, str>>,
    pub input_schema: SchemaOut<'a>,
}

/// A tool's JSON schema as the client wrote it, or the empty object schema.
#[derive(Debug)]
pub(crate) enum SchemaOut<'a> {
    Raw(&'a RawValue),
    EmptyObject,
}

impl Serialize for SchemaOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Empty {
            #[serde(rename = "type")]
            kind: &'static str,
            properties: Input,
        }
        match self {
            SchemaOut::Raw(r) => r.serialize(s),
            SchemaOut::EmptyObject => Empty {
                kind: "object",
                properties: Input::Empty,
            }
            .serialize(s),
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct ToolChoiceOut<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub disable_parallel_tool_use: bool,
}

/// A Messages response, or message_start's message (then `U` is [`StartUsageOut`]).
#[derive(Debug, Serialize)]
pub(crate) struct MessagesResponseOut<'a, U> {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub role: &'static str,
    pub model: &'a str,
    pub content: Vec<BlockOut<'a>>,
    pub stop_reason: Option<&'static str>,
    pub stop_sequence: Null,
    pub usage: U,
}

#[derive(Debug, PartialEq, Serialize)]
pub(crate) struct UsageOut {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

/// message_start's usage before anything is known (the counts come with message_delta).
#[derive(Debug, Serialize)]
pub(crate) struct StartUsageOut {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum EventOut<'a> {
    MessageStart {
        message: MessagesResponseOut<'a, StartUsageOut>,
    },
    ContentBlockStart {
        index: u64,
        content_block: BlockOut<'a>,
    },
    ContentBlockDelta {
        index: u64,
        delta: BlockDeltaOut<'a>,
    },
    ContentBlockStop {
        index: u64,
    },
    MessageDelta {
        delta: MessageDeltaOut,
        usage: UsageOut,
    },
    MessageStop,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum BlockDeltaOut<'a> {
    TextDelta { text: &'a str },
    InputJsonDelta { partial_json: &'a str },
}

#[derive(Debug, Serialize)]
pub(crate) struct MessageDeltaOut {
    pub stop_reason: Option<&'static str>,
    pub stop_sequence: Null,
}
