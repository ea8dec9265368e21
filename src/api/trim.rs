//! Dropping the oldest turns of a conversation that outgrows a model's context window, so that what
//! is left is still a conversation the provider accepts.
//!
//! What is kept, in both dialects:
//! - the system and developer messages (OpenAI's, wherever they stand; Anthropic's top-level `system`
//!   is not in `messages` and is never touched);
//! - everything from the point where the kept conversation starts, which is always a user's own
//!   message: so the last user turn and whatever followed it (an agent's tool calls) stay, and an
//!   Anthropic conversation still starts with a user turn (a request that fails over from an OpenAI
//!   client to Anthropic needs that too);
//! - a tool call and its results together: OpenAI's assistant `tool_calls` and the `tool` messages
//!   answering their ids (and the legacy `function_call` with the `function` message after it),
//!   Anthropic's `tool_use` blocks and the `tool_result` blocks naming them. A start that would
//!   keep a result without its call is not a start.
//!
//! A message that cannot be read (not an object, a role that is not a string) is never separated
//! from anything before it: the conversation may only start after it.
//!
//! The body is rewritten by replacing the `messages` member alone ([`splice`]): every other byte of
//! the body stays as the client sent it, and each kept message is copied as written (a
//! [`RawValue`]); only the separators between messages become compact.
//!
//! Hand-written: the providers' conversation rules are what this module knows, and no crate does.
//! serde reads each message's role and tool ids, borrowing them from the body.

use std::borrow::Cow;

use crate::maps::HashMap;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::api::splice::{self, members, Splice};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI's chat completions.
    Chat,
    /// Anthropic's messages.
    Messages,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trimmed {
    pub body: Vec<u8>,
    /// Messages dropped.
    pub messages: usize,
    /// What `cost` gave for the messages dropped.
    pub tokens: u64,
    /// Whether `enough` was met; when not, everything that may go went.
    pub enough: bool,
}

/// What trimming needs to know of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Turn {
    /// Never dropped.
    pinned: bool,
    /// The kept conversation may start here: a user's own message (not tool results).
    opens: bool,
    /// The earliest message this one must stay with (its tool call's); itself when none.
    tied_to: usize,
}

/// A message that cannot be read: nothing before it may be cut away from it.
const UNREADABLE: Turn = Turn {
    pinned: false,
    opens: false,
    tied_to: 0,
};

/// Drops the fewest oldest turns of `body`'s `messages` whose `cost` together is `enough`, or, when
/// no cut is enough, every turn that may go. None when nothing may be dropped, or the body is not a
/// JSON object with a `messages` array.
pub fn trim_oldest(
    dialect: Dialect,
    body: &[u8],
    cost: impl Fn(&RawValue) -> u64,
    enough: impl Fn(u64) -> bool,
) -> Option<Trimmed> {
    let text = std::str::from_utf8(body).ok()?;
    let object = members(text, ["messages"]).ok()?;
    let [Some(list)] = object.values else {
        return None;
    };
    let messages: Vec<&RawValue> = serde_json::from_str(list.get()).ok()?;
    let turns = match dialect {
        Dialect::Chat => chat_turns(&messages),
        Dialect::Messages => messages_turns(&messages),
    };
    let cuts = cuts(&turns);
    let last = *cuts.last()?;

    // Walk the cut points in order, adding up what each drops, until one drops enough.
    let (mut dropped, mut tokens, mut scanned) = (0usize, 0u64, 0usize);
    let mut chosen = (last, false);
    for &cut in &cuts {
        for (m, t) in messages.iter().zip(&turns).take(cut).skip(scanned) {
            if !t.pinned {
                dropped += 1;
                tokens = tokens.saturating_add(cost(m));
            }
        }
        scanned = cut;
        if enough(tokens) {
            chosen = (cut, true);
            break;
        }
    }
    let (cut, enough) = chosen;

    let pinned = messages
        .iter()
        .zip(&turns)
        .take(cut)
        .filter(|(_, t)| t.pinned)
        .map(|(m, _)| *m);
    let kept: Vec<&RawValue> = pinned.chain(messages.iter().skip(cut).copied()).collect();
    let json = serde_json::to_string(&kept).ok()?;
    let mut edit = Splice::default();
    edit.replace(splice::span(text, list.get())?, json);
    Some(Trimmed {
        body: edit.apply(text)?,
        messages: dropped,
        tokens,
        enough,
    })
}

/// Where the kept conversation may start, in order: a message that opens a turn, with something
/// before it that may be dropped, and nothing from it on tied to a message before it.
fn cuts(turns: &[Turn]) -> Vec<usize> {
    let mut earliest_tie = vec![usize::MAX; turns.len()];
    let mut tie = usize::MAX;
    for (slot, t) in earliest_tie.iter_mut().zip(turns).rev() {
        tie = tie.min(t.tied_to);
        *slot = tie;
    }
    let mut droppable = false;
    let mut out = Vec::new();
    for (i, (t, tie)) in turns.iter().zip(earliest_tie).enumerate() {
        if t.opens && droppable && tie >= i {
            out.push(i);
        }
        droppable |= !t.pinned;
    }
    out
}

#[derive(Deserialize)]
struct ChatMessage<'a> {
    #[serde(borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ChatCall<'a>>>,
    #[serde(borrow)]
    tool_call_id: Option<Cow<'a, str>>,
    function_call: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct ChatCall<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
}

fn chat_turns<'a>(messages: &[&'a RawValue]) -> Vec<Turn> {
    let mut calls: HashMap<Cow<'a, str>, usize> = HashMap::default();
    // A result whose id names no call stays with the latest call, as a provider would pair it.
    let mut latest_calls: Option<usize> = None;
    let mut latest_function_call: Option<usize> = None;
    let mut turns = Vec::with_capacity(messages.len());
    for (i, &m) in messages.iter().enumerate() {
        let Ok(msg) = serde_json::from_str::<ChatMessage<'a>>(m.get()) else {
            turns.push(UNREADABLE);
            continue;
        };
        let role = msg.role.as_deref().unwrap_or_default();
        let mut tied_to = i;
        match role {
            "assistant" => {
                for call in msg.tool_calls.unwrap_or_default() {
                    latest_calls = Some(i);
                    if let Some(id) = call.id {
                        calls.insert(id, i);
                    }
                }
                if msg.function_call.is_some() {
                    latest_function_call = Some(i);
                }
            }
            "tool" => {
                let call = msg.tool_call_id.and_then(|id| calls.get(&id).copied());
                tied_to = call.or(latest_calls).unwrap_or(i);
            }
            "function" => tied_to = latest_function_call.unwrap_or(i),
            _ => {}
        }
        turns.push(Turn {
            pinned: role == "system" || role == "developer",
            opens: role == "user",
            tied_to,
        });
    }
    turns
}

#[derive(Deserialize)]
struct AnthropicMessage<'a> {
    #[serde(borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Block<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    tool_use_id: Option<Cow<'a, str>>,
}

fn messages_turns<'a>(messages: &[&'a RawValue]) -> Vec<Turn> {
    // `tool_use` (and `server_tool_use`, `mcp_tool_use`) ids, by the message that holds them.
    let mut uses: HashMap<Cow<'a, str>, usize> = HashMap::default();
    let mut turns = Vec::with_capacity(messages.len());
    for (i, &m) in messages.iter().enumerate() {
        let Ok(msg) = serde_json::from_str::<AnthropicMessage<'a>>(m.get()) else {
            turns.push(UNREADABLE);
            continue;
        };
        let blocks: Vec<Block<'a>> = match msg.content {
            Some(c) if c.get().starts_with('[') => match serde_json::from_str(c.get()) {
                Ok(blocks) => blocks,
                Err(_) => {
                    turns.push(UNREADABLE);
                    continue;
                }
            },
            _ => Vec::new(),
        };
        let (mut tied_to, mut results) = (i, false);
        for id in blocks.iter().filter_map(|b| b.tool_use_id.as_ref()) {
            results = true;
            if let Some(&at) = uses.get(id) {
                tied_to = tied_to.min(at);
            }
        }
        for b in blocks {
            if b.kind.as_deref().is_some_and(|k| k.ends_with("tool_use")) {
                if let Some(id) = b.id {
                    uses.insert(id, i);
                }
            }
        }
        turns.push(Turn {
            pinned: false,
            opens: msg.role.as_deref() == Some("user") && !results,
            tied_to,
        });
    }
    turns
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// One token per message, so that `need` counts messages.
    fn one(_: &RawValue) -> u64 {
        1
    }

    fn trim(dialect: Dialect, body: &Value, need: u64) -> Option<(Value, usize, bool)> {
        let t = trim_oldest(dialect, body.to_string().as_bytes(), one, |d| d >= need)?;
        assert_eq!(t.tokens, t.messages as u64);
        let v: Value = serde_json::from_slice(&t.body).unwrap();
        Some((v, t.messages, t.enough))
    }

    fn roles(v: &Value) -> Vec<String> {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    #[test]
    fn chat_keeps_system_and_developer_messages_and_starts_at_a_user_turn() {
        let body = json!({"model": "m", "messages": [
            {"role": "system", "content": "s"},
            {"role": "developer", "content": "d"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "system", "content": "late"},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "u3"}
        ], "temperature": 0});
        let (v, n, enough) = trim(Dialect::Chat, &body, 1).unwrap();
        assert_eq!((n, enough), (2, true), "the smallest cut that is enough");
        assert_eq!(
            roles(&v),
            ["system", "developer", "system", "user", "assistant", "user"]
        );
        assert_eq!(v["messages"][3]["content"], "u2");
        assert_eq!(v["temperature"], 0);
        let (v, n, enough) = trim(Dialect::Chat, &body, 100).unwrap();
        assert_eq!((n, enough), (4, false), "all that may go");
        assert_eq!(roles(&v), ["system", "developer", "system", "user"]);
        assert_eq!(v["messages"][3]["content"], "u3");
    }

    #[test]
    fn nothing_to_drop_is_none() {
        let body = json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]});
        assert_eq!(trim(Dialect::Chat, &body, 1), None);
        for messages in [
            json!([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]),
            json!([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]),
            json!([]),
        ] {
            let body = json!({"messages": messages});
            assert_eq!(trim(Dialect::Chat, &body, 1), None, "{body}");
            assert_eq!(trim(Dialect::Messages, &body, 1), None, "{body}");
        }
        for not_a_conversation in [
            &b"not json"[..],
            b"[]",
            b"{\"messages\":{}}",
            b"{\"messages\":\"hi\"}",
            b"{}",
            b"\xff",
        ] {
            assert_eq!(
                trim_oldest(Dialect::Chat, not_a_conversation, one, |_| true),
                None
            );
        }
    }

    #[test]
    fn chat_tool_calls_stay_with_their_results() {
        let body = json!({"messages": [
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "r1"},
            {"role": "user", "content": "interjection"},
            {"role": "tool", "tool_call_id": "c2", "content": "r2"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "u2"}
        ]});
        // The user message between the two results cannot start the conversation: c2's result
        // after it would lose its call.
        let (v, n, _) = trim(Dialect::Chat, &body, 1).unwrap();
        assert_eq!(n, 6);
        assert_eq!(roles(&v), ["user"]);
        assert_eq!(v["messages"][0]["content"], "u2");
    }

    #[test]
    fn an_agent_loop_after_the_last_user_turn_is_kept_whole() {
        let body = json!({"messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "old"},
            {"role": "assistant", "content": "old answer"},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "tool_calls": [{"id": "c2", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c2", "content": "warm"}
        ]});
        let (v, n, enough) = trim(Dialect::Chat, &body, 10).unwrap();
        assert_eq!((n, enough), (2, false));
        assert_eq!(
            roles(&v),
            ["system", "user", "assistant", "tool", "assistant", "tool"]
        );
    }

    #[test]
    fn chat_legacy_function_calls_stay_with_their_results() {
        let body = json!({"messages": [
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": null, "function_call": {"name": "f", "arguments": "{}"}},
            {"role": "user", "content": "odd, but sent"},
            {"role": "function", "name": "f", "content": "r"},
            {"role": "user", "content": "u2"}
        ]});
        let (v, n, _) = trim(Dialect::Chat, &body, 1).unwrap();
        assert_eq!((n, roles(&v)), (4, vec!["user".to_string()]));
    }

    #[test]
    fn chat_results_without_a_known_id_stay_with_the_latest_call() {
        let body = json!({"messages": [
            {"role": "user", "content": "u1"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "user", "content": "u2"},
            {"role": "tool", "content": "no id"},
            {"role": "user", "content": "u3"}
        ]});
        let (_, n, _) = trim(Dialect::Chat, &body, 1).unwrap();
        assert_eq!(n, 4);
    }

    #[test]
    fn anthropic_tool_use_stays_with_its_result_and_the_start_is_a_user_turn() {
        let body = json!({"model": "claude", "max_tokens": 10, "system": "be brief", "messages": [
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": [{"type": "text", "text": "let me see"},
                {"type": "tool_use", "id": "t1", "name": "w", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                {"type": "text", "text": "and tomorrow?"}]},
            {"role": "assistant", "content": "warm"},
            {"role": "user", "content": [{"type": "text", "text": "u3"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t2", "name": "w", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2", "content": "x"}]}
        ]});
        // The user message holding t1's result cannot start the conversation; u3 can.
        let (v, n, enough) = trim(Dialect::Messages, &body, 1).unwrap();
        assert_eq!((n, enough), (4, true));
        assert_eq!(roles(&v), ["user", "assistant", "user"]);
        assert_eq!(v["messages"][0]["content"][0]["text"], "u3");
        assert_eq!(v["system"], "be brief");
    }

    #[test]
    fn anthropic_conversation_never_starts_with_an_assistant_turn() {
        let body = json!({"messages": [
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "prefill"}
        ]});
        let (v, n, _) = trim(Dialect::Messages, &body, 1).unwrap();
        assert_eq!((n, roles(&v)), (3, vec!["user".into(), "assistant".into()]));
    }

    #[test]
    fn an_unreadable_message_is_never_cut_away_from_what_came_before() {
        for odd in [
            r#""text""#,
            r#"{"role":5}"#,
            r#"{"role":"user","role":"user"}"#,
            "null",
            r#"{"role":"assistant","tool_calls":[{"id":1}],"content":[1]}"#,
        ] {
            let body = format!(
                r#"{{"messages":[{{"role":"user","content":"u1"}},{{"role":"assistant","content":"a1"}},{{"role":"user","content":"u2"}},{odd},{{"role":"user","content":"u3"}}]}}"#
            );
            for dialect in [Dialect::Chat, Dialect::Messages] {
                let t = trim_oldest(dialect, body.as_bytes(), one, |_| true).unwrap();
                assert_eq!(t.messages, 4, "{body}");
            }
        }
    }

    #[test]
    fn every_other_byte_stays_as_sent_and_kept_messages_are_copied_as_written() {
        let body = "{ \"model\" : \"m\",\n  \"messages\": [ {\"role\":\"user\", \"content\":\"caf\\u00e9\"} ,\n {\"role\":\"assistant\",\"content\":\"a\"}, {\"role\" : \"user\",\"content\":\"\\/x\"} ],\n  \"seed\": 123456789012345678901234567890 }";
        let t = trim_oldest(Dialect::Chat, body.as_bytes(), one, |_| true).unwrap();
        assert_eq!(
            String::from_utf8(t.body).unwrap(),
            "{ \"model\" : \"m\",\n  \"messages\": [{\"role\" : \"user\",\"content\":\"\\/x\"}],\n  \"seed\": 123456789012345678901234567890 }"
        );
    }

    #[test]
    fn the_cost_of_each_dropped_message_is_added() {
        let body = json!({"messages": [
            {"role": "user", "content": "aaaa"},
            {"role": "assistant", "content": "bb"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "dddddd"},
            {"role": "user", "content": "e"}
        ]});
        let len = |m: &RawValue| m.get().len() as u64;
        let text = body.to_string();
        let lens: Vec<u64> = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.to_string().len() as u64)
            .collect();
        let t = trim_oldest(Dialect::Chat, text.as_bytes(), len, |d| {
            d > lens[0] + lens[1]
        })
        .unwrap();
        assert_eq!((t.messages, t.tokens), (4, lens[..4].iter().sum::<u64>()));
        let t = trim_oldest(Dialect::Chat, text.as_bytes(), len, |d| {
            d >= lens[0] + lens[1]
        })
        .unwrap();
        assert_eq!((t.messages, t.tokens), (2, lens[0] + lens[1]));
    }

    // ------------------------------------------------------------ properties over random conversations

    /// xorshift64*: deterministic, so a failure names the seed that reproduces it.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// A conversation the providers accept, with every pairing the rules know.
    fn chat_conversation(rng: &mut Rng) -> Vec<Value> {
        let mut out = Vec::new();
        let mut ids = 0;
        for _ in 0..rng.below(3) {
            let role = if rng.chance(50) {
                "system"
            } else {
                "developer"
            };
            out.push(json!({"role": role, "content": format!("rules {}", rng.below(99))}));
        }
        for turn in 0..1 + rng.below(8) {
            out.push(json!({"role": "user", "content": "x".repeat(1 + rng.below(9) as usize)}));
            match rng.below(6) {
                0 => {
                    let calls: Vec<Value> = (0..1 + rng.below(3))
                        .map(|_| {
                            ids += 1;
                            json!({"id": format!("call_{ids}"), "type": "function", "function": {"name": "f", "arguments": "{}"}})
                        })
                        .collect();
                    let results: Vec<Value> = calls
                        .iter()
                        .map(|c| json!({"role": "tool", "tool_call_id": c["id"], "content": "r"}))
                        .collect();
                    out.push(json!({"role": "assistant", "content": null, "tool_calls": calls}));
                    out.extend(results);
                    if rng.chance(50) {
                        out.push(json!({"role": "assistant", "content": "done"}));
                    }
                }
                1 => {
                    out.push(json!({"role": "assistant", "content": null, "function_call": {"name": "f", "arguments": "{}"}}));
                    out.push(json!({"role": "function", "name": "f", "content": "r"}));
                }
                2 => out.push(json!({"role": "system", "content": format!("note {turn}")})),
                3 => {}
                _ => out.push(
                    json!({"role": "assistant", "content": "y".repeat(1 + rng.below(9) as usize)}),
                ),
            }
        }
        out
    }

    fn anthropic_conversation(rng: &mut Rng) -> Vec<Value> {
        let mut out = Vec::new();
        let mut ids = 0;
        let mut pending: Vec<Value> = Vec::new();
        for _ in 0..1 + rng.below(8) {
            let mut content: Vec<Value> = pending
                .drain(..)
                .map(|id| json!({"type": "tool_result", "tool_use_id": id, "content": "r"}))
                .collect();
            if content.is_empty() || rng.chance(30) {
                content
                    .push(json!({"type": "text", "text": "x".repeat(1 + rng.below(9) as usize)}));
            }
            if content.len() == 1 && content[0]["type"] == "text" && rng.chance(50) {
                out.push(json!({"role": "user", "content": content[0]["text"]}));
            } else {
                out.push(json!({"role": "user", "content": content}));
            }
            let mut blocks = vec![json!({"type": "text", "text": "y"})];
            if rng.chance(40) {
                for _ in 0..1 + rng.below(2) {
                    ids += 1;
                    let id = format!("toolu_{ids}");
                    blocks.push(json!({"type": "tool_use", "id": id, "name": "w", "input": {}}));
                    pending.push(json!(id));
                }
            }
            out.push(json!({"role": "assistant", "content": blocks}));
        }
        if !pending.is_empty() || rng.chance(50) {
            let content: Vec<Value> = pending
                .drain(..)
                .map(|id| json!({"type": "tool_result", "tool_use_id": id}))
                .chain([json!({"type": "text", "text": "next"})])
                .collect();
            out.push(json!({"role": "user", "content": content}));
        }
        out
    }

    /// The checks the mock provider makes (tests/mock-provider/src/validate.rs), as the real APIs
    /// make them: None when the conversation is accepted.
    fn invalid(dialect: Dialect, messages: &[Value]) -> Option<String> {
        match dialect {
            Dialect::Chat => {
                let mut pending: Vec<&str> = Vec::new();
                let mut function_pending = false;
                for (i, m) in messages.iter().enumerate() {
                    let role = m["role"].as_str().unwrap_or("");
                    if role == "tool" {
                        let id = m["tool_call_id"].as_str().unwrap_or("");
                        let Some(at) = pending.iter().position(|p| *p == id) else {
                            return Some(format!("{i}: tool result without its call"));
                        };
                        pending.remove(at);
                        continue;
                    }
                    if !pending.is_empty() {
                        return Some(format!("{i}: calls {pending:?} unanswered"));
                    }
                    if role == "function" {
                        if !function_pending {
                            return Some(format!("{i}: function result without its call"));
                        }
                        function_pending = false;
                        continue;
                    }
                    function_pending = role == "assistant" && m.get("function_call").is_some();
                    if role == "assistant" {
                        if let Some(calls) = m["tool_calls"].as_array() {
                            pending = calls
                                .iter()
                                .map(|c| c["id"].as_str().unwrap_or(""))
                                .collect();
                        }
                    }
                }
                (!pending.is_empty()).then(|| format!("calls {pending:?} unanswered at the end"))
            }
            Dialect::Messages => {
                if messages.first().is_some_and(|m| m["role"] != "user") {
                    return Some("first message must use the user role".into());
                }
                let ids = |m: &Value, key: &str| -> Vec<String> {
                    m["content"]
                        .as_array()
                        .map(|b| {
                            b.iter()
                                .filter_map(|b| b[key].as_str())
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default()
                };
                for (i, m) in messages.iter().enumerate() {
                    let results = ids(m, "tool_use_id");
                    let previous_uses = match i {
                        0 => Vec::new(),
                        _ => ids(&messages[i - 1], "id"),
                    };
                    if results.iter().any(|r| !previous_uses.contains(r)) {
                        return Some(format!("{i}: tool_result without its tool_use"));
                    }
                    if let Some(next) = messages.get(i + 1) {
                        let answered = ids(next, "tool_use_id");
                        if ids(m, "id").iter().any(|u| !answered.contains(u)) {
                            return Some(format!("{i}: tool_use without its tool_result"));
                        }
                    }
                }
                None
            }
        }
    }

    fn opens(dialect: Dialect, m: &Value) -> bool {
        m["role"] == "user"
            && (dialect == Dialect::Chat
                || !m["content"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|b| b.get("tool_use_id").is_some())))
    }

    fn pinned(dialect: Dialect, m: &Value) -> bool {
        dialect == Dialect::Chat && (m["role"] == "system" || m["role"] == "developer")
    }

    /// What keeping everything from `cut` on (and the pinned messages before it) leaves.
    fn kept_from(dialect: Dialect, messages: &[Value], cut: usize) -> Vec<Value> {
        let before = messages[..cut].iter().filter(|m| pinned(dialect, m));
        before.chain(&messages[cut..]).cloned().collect()
    }

    #[test]
    fn random_conversations_trim_to_the_smallest_valid_cut_that_is_enough() {
        for (dialect, make) in [
            (
                Dialect::Chat,
                chat_conversation as fn(&mut Rng) -> Vec<Value>,
            ),
            (Dialect::Messages, anthropic_conversation),
        ] {
            for seed in 1..=1000u64 {
                let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let messages = make(&mut rng);
                assert_eq!(
                    invalid(dialect, &messages),
                    None,
                    "seed {seed}: {messages:?}"
                );
                let body = json!({"model": "m", "messages": messages, "max_tokens": 7});
                let text = body.to_string();
                let cost = |m: &RawValue| m.get().len() as u64;
                let total: u64 = messages.iter().map(|m| m.to_string().len() as u64).sum();
                let need = rng.below(total + 20);
                let got = trim_oldest(dialect, text.as_bytes(), cost, |d| d >= need);

                // Every cut the rules allow, found by trying each start against the validator.
                let cost_of = |cut: usize| -> u64 {
                    messages[..cut]
                        .iter()
                        .filter(|m| !pinned(dialect, m))
                        .map(|m| m.to_string().len() as u64)
                        .sum()
                };
                let valid: Vec<usize> = (1..messages.len())
                    .filter(|&c| opens(dialect, &messages[c]))
                    .filter(|&c| messages[..c].iter().any(|m| !pinned(dialect, m)))
                    .filter(|&c| invalid(dialect, &kept_from(dialect, &messages, c)).is_none())
                    .collect();
                let Some(t) = got else {
                    assert!(
                        valid.is_empty(),
                        "seed {seed}: cuts {valid:?} were possible"
                    );
                    continue;
                };
                let want = valid
                    .iter()
                    .copied()
                    .find(|&c| cost_of(c) >= need)
                    .map(|c| (c, true))
                    .unwrap_or((*valid.last().unwrap(), false));
                let out: Value = serde_json::from_slice(&t.body).unwrap();
                let kept = kept_from(dialect, &messages, want.0);
                assert_eq!(out["messages"], json!(kept), "seed {seed} need {need}");
                assert_eq!(t.enough, want.1, "seed {seed}");
                assert_eq!(t.tokens, cost_of(want.0), "seed {seed}");
                assert_eq!(t.messages, messages.len() - kept.len(), "seed {seed}");
                assert_eq!(
                    (out["model"].clone(), out["max_tokens"].clone()),
                    (json!("m"), json!(7))
                );
                // Kept messages are the client's bytes.
                let original: Vec<String> = messages.iter().map(Value::to_string).collect();
                let body_text = std::str::from_utf8(&t.body).unwrap();
                let [Some(list)] = members(body_text, ["messages"]).unwrap().values else {
                    panic!("no messages")
                };
                let raw: Vec<&RawValue> = serde_json::from_str(list.get()).unwrap();
                for m in raw {
                    assert!(original.iter().any(|o| o == m.get()), "seed {seed}");
                }
            }
        }
    }

    #[test]
    fn mangled_conversations_never_panic_and_any_result_is_json() {
        for seed in 1..=2000u64 {
            let mut rng = Rng(seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
            let dialect = if seed % 2 == 0 {
                Dialect::Chat
            } else {
                Dialect::Messages
            };
            let mut messages = if rng.chance(50) {
                chat_conversation(&mut rng)
            } else {
                anthropic_conversation(&mut rng)
            };
            for _ in 0..rng.below(4) {
                let at = rng.below(messages.len() as u64 + 1) as usize;
                let odd = match rng.below(9) {
                    0 => json!(null),
                    1 => json!(42),
                    2 => json!({"role": ["user"]}),
                    3 => json!({"role": "tool", "tool_call_id": 7}),
                    4 => {
                        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]})
                    }
                    5 => json!({"role": "assistant", "tool_calls": "x"}),
                    6 => json!({"role": "user", "content": [1, 2]}),
                    7 => json!({"role": "tool", "tool_call_id": "call_1"}),
                    _ => {
                        json!({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1"}]})
                    }
                };
                messages.insert(at.min(messages.len()), odd);
            }
            if rng.chance(30) && !messages.is_empty() {
                let i = rng.below(messages.len() as u64) as usize;
                messages.remove(i);
            }
            let text = json!({"messages": messages}).to_string();
            let cut = rng.below(text.len() as u64 + 1) as usize;
            let need = rng.below(50);
            for body in [text.as_bytes(), &text.as_bytes()[..cut]] {
                if let Some(t) = trim_oldest(dialect, body, |m| m.get().len() as u64, |d| d >= need)
                {
                    let v: Value = serde_json::from_slice(&t.body).unwrap();
                    let n = v["messages"].as_array().unwrap().len();
                    assert_eq!(n + t.messages, messages.len(), "seed {seed}");
                }
            }
        }
    }
}
