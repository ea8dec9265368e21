//! The conversation rules the real APIs enforce, so that a gateway that rewrites a conversation
//! (drops old turns, translates it) is caught when it sends one a provider would refuse. The
//! messages are the providers' own (as their APIs answer them).
//!
//! - OpenAI chat: every `tool` message answers a call of the assistant message it follows, and an
//!   assistant message with `tool_calls` is followed by the answers to all of them; a legacy
//!   `function` message follows an assistant `function_call`.
//! - Anthropic: the first message is a user turn (Bedrock and Vertex still enforce it; the
//!   first-party API has since accepted an assistant first), roles are `user` or `assistant`, each
//!   `tool_result` answers a `tool_use` of the message before it, and each `tool_use` is answered in
//!   the message after it.
//!
//! Alternation is not checked: the APIs merge consecutive turns of one role today.

use crate::api::Endpoint;
use serde_json::{Map, Value};

/// The API's 400 message for a conversation it refuses; None when it is accepted.
pub fn conversation(endpoint: Endpoint, body: &Map<String, Value>) -> Option<String> {
    let messages = body.get("messages")?.as_array()?;
    match endpoint {
        Endpoint::Chat => chat(messages),
        Endpoint::Messages | Endpoint::CountTokens => anthropic(messages),
        Endpoint::Embeddings => None,
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn chat(messages: &[Value]) -> Option<String> {
    let mut pending: Vec<&str> = Vec::new();
    let mut pending_at = 0;
    let mut function_call = false;
    for (i, m) in messages.iter().enumerate() {
        let role = str_of(m, "role");
        if role == "tool" {
            let id = str_of(m, "tool_call_id");
            let Some(at) = pending.iter().position(|p| *p == id) else {
                return Some(format!("Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'. (messages.[{i}].role)"));
            };
            pending.remove(at);
            continue;
        }
        if !pending.is_empty() {
            return Some(unanswered(pending_at, &pending));
        }
        if role == "function" {
            if !function_call {
                return Some(format!("Invalid parameter: messages with role 'function' must be a response to a preceding message with 'function_call'. (messages.[{i}].role)"));
            }
            function_call = false;
            continue;
        }
        function_call = role == "assistant" && m.get("function_call").is_some_and(|f| !f.is_null());
        if role == "assistant" {
            if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
                pending = calls.iter().map(|c| str_of(c, "id")).collect();
                pending_at = i;
            }
        }
    }
    (!pending.is_empty()).then(|| unanswered(pending_at, &pending))
}

fn unanswered(at: usize, ids: &[&str]) -> String {
    format!("An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: {} (messages.[{at}].role)", ids.join(", "))
}

/// The ids in a message's content blocks under `key` (`id` of tool uses, `tool_use_id` of results).
fn block_ids<'a>(m: &'a Value, key: &str) -> Vec<&'a str> {
    let Some(blocks) = m.get("content").and_then(Value::as_array) else {
        return Vec::new();
    };
    blocks
        .iter()
        .filter(|b| key != "id" || str_of(b, "type") == "tool_use")
        .filter_map(|b| b.get(key).and_then(Value::as_str))
        .collect()
}

fn anthropic(messages: &[Value]) -> Option<String> {
    if messages
        .first()
        .is_some_and(|m| str_of(m, "role") != "user")
    {
        return Some("messages: first message must use the \"user\" role".into());
    }
    for (i, m) in messages.iter().enumerate() {
        let role = str_of(m, "role");
        if role != "user" && role != "assistant" {
            return Some(format!(
                "messages.{i}.role: Input should be 'user' or 'assistant'"
            ));
        }
        let uses_before = match i {
            0 => Vec::new(),
            _ => messages
                .get(i - 1)
                .map(|p| block_ids(p, "id"))
                .unwrap_or_default(),
        };
        let results = block_ids(m, "tool_use_id");
        if let Some(orphan) = results.iter().find(|r| !uses_before.contains(r)) {
            return Some(format!("messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: {orphan}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message."));
        }
        if let Some(next) = messages.get(i + 1) {
            let answered = block_ids(next, "tool_use_id");
            let missing: Vec<&str> = block_ids(m, "id")
                .into_iter()
                .filter(|u| !answered.contains(u))
                .collect();
            if !missing.is_empty() {
                return Some(format!("messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: {}. Each `tool_use` block must have a corresponding `tool_result` block in the next message.", missing.join(", ")));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(endpoint: Endpoint, messages: Value) -> Option<String> {
        let body = json!({ "messages": messages });
        conversation(endpoint, body.as_object().unwrap())
    }

    fn call(id: &str) -> Value {
        json!({"id": id, "type": "function", "function": {"name": "f", "arguments": "{}"}})
    }

    #[test]
    fn openai_tool_messages_answer_the_calls_before_them() {
        let ok = json!([
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": null, "tool_calls": [call("a"), call("b")]},
            {"role": "tool", "tool_call_id": "b", "content": "1"},
            {"role": "tool", "tool_call_id": "a", "content": "2"},
            {"role": "assistant", "content": null, "function_call": {"name": "f", "arguments": "{}"}},
            {"role": "function", "name": "f", "content": "3"},
            {"role": "user", "content": "v"}
        ]);
        assert_eq!(check(Endpoint::Chat, ok), None);
        let orphan = json!([{"role": "user", "content": "u"}, {"role": "tool", "tool_call_id": "a", "content": "2"}]);
        assert!(check(Endpoint::Chat, orphan)
            .unwrap()
            .starts_with("Invalid parameter: messages with role 'tool'"));
        let unanswered = json!([
            {"role": "user", "content": "u"},
            {"role": "assistant", "tool_calls": [call("a"), call("b")]},
            {"role": "tool", "tool_call_id": "a", "content": "2"},
            {"role": "user", "content": "v"}
        ]);
        assert!(check(Endpoint::Chat, unanswered)
            .unwrap()
            .contains("did not have response messages: b (messages.[1].role)"));
        let function = json!([{"role": "user", "content": "u"}, {"role": "function", "name": "f", "content": "3"}]);
        assert!(check(Endpoint::Chat, function).is_some());
        // Not a conversation at all: left to the other checks.
        assert_eq!(
            conversation(
                Endpoint::Chat,
                json!({"messages": "x"}).as_object().unwrap()
            ),
            None
        );
    }

    #[test]
    fn anthropic_starts_with_a_user_and_pairs_tool_use_with_the_next_message() {
        let ok = json!([
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": [{"type": "text", "text": "t"}, {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}, {"type": "text", "text": "more"}]},
            {"role": "assistant", "content": "done"}
        ]);
        assert_eq!(check(Endpoint::Messages, ok), None);
        let first =
            json!([{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]);
        assert_eq!(
            check(Endpoint::Messages, first).as_deref(),
            Some("messages: first message must use the \"user\" role")
        );
        let orphan =
            json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]}]);
        assert!(check(Endpoint::Messages, orphan)
            .unwrap()
            .starts_with("messages.0.content: unexpected `tool_use_id`"));
        let unanswered = json!([
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": "no result"}
        ]);
        assert!(check(Endpoint::Messages, unanswered)
            .unwrap()
            .starts_with("messages.1: `tool_use` ids were found without `tool_result` blocks"));
        let system = json!([{"role": "user", "content": "u"}, {"role": "system", "content": "s"}]);
        assert!(check(Endpoint::Messages, system).is_some());
    }
}
