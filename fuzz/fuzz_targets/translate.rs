//! Every translate:: function over the input as a body, and both stream translators over the SSE
//! events parsed from the input. Translated bodies must be JSON objects; translated streams must be
//! well-formed SSE whose every event carries JSON (or [DONE]) and that ends exactly once.
#![no_main]

mod common;

use common::{parse_sse, Event, Params};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate::failover::translate::{
    chat_error_to_messages, chat_request_to_messages, chat_response_to_messages,
    messages_error_to_chat, messages_request_to_chat, messages_response_to_chat,
    messages_response_to_chat_at, ChatToMessagesStream, MessagesToChatStream,
};

const MODELS: [&str; 3] = ["claude-3-5-haiku-latest", "gpt-4o-mini", "m\"o\\del\n\u{1F600}"];
const STATUSES: [u16; 12] = [0, 200, 400, 401, 402, 403, 404, 413, 429, 500, 503, 529];

fn object(body: &[u8], what: &str) -> serde_json::Map<String, Value> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => m,
        other => panic!("{what}: not a JSON object: {other:?} from {:?}", String::from_utf8_lossy(body)),
    }
}

/// The translator's output parsed back as SSE: (event name, data) per event.
fn sse_out(out: &[u8], what: &str) -> Vec<(String, String)> {
    let (events, dropped) = parse_sse(usize::MAX, [out]);
    assert_eq!(dropped, 0);
    events
        .into_iter()
        .map(|Event { event, data, raw }| {
            let raw = String::from_utf8_lossy(&raw).into_owned();
            assert!(raw.ends_with("\n\n"), "{what}: unterminated event {raw:?}");
            assert!(
                data == "[DONE]" || serde_json::from_str::<Value>(&data).is_ok(),
                "{what}: event data is not JSON: {raw:?}"
            );
            (event, data)
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut p = Params::new(data);
    let model = p.pick(&MODELS);
    let status = match p.below(4) {
        0 => p.next() as u16,
        _ => p.pick(&STATUSES),
    };
    let created = p.number();

    if let Ok(out) = chat_request_to_messages(data, model, p.number()) {
        let o = object(&out, "chat_request_to_messages");
        assert_eq!(o.get("model").and_then(Value::as_str), Some(model));
        assert!(o.get("max_tokens").is_some_and(Value::is_u64), "no max_tokens: {o:?}");
    }
    if let Ok(out) = messages_request_to_chat(data, model) {
        let o = object(&out, "messages_request_to_chat");
        assert_eq!(o.get("model").and_then(Value::as_str), Some(model));
    }
    if let Ok(out) = messages_response_to_chat(data, model) {
        object(&out, "messages_response_to_chat");
    }
    // Usage is shown only when the provider reported it (OpenAI clients), and always for
    // Anthropic clients (their shape requires it). Unknown when the body is not all valid JSON to
    // serde_json::Value: members the translator skips, such as `model`, may hold invalid UTF-8.
    let reported = serde_json::from_slice::<Value>(data)
        .ok()
        .map(|v| v.get("usage").is_some_and(|u| !u.is_null()));
    if let Ok(out) = messages_response_to_chat_at(data, model, created) {
        let o = object(&out, "messages_response_to_chat_at");
        if let Some(reported) = reported {
            assert_eq!(o.contains_key("usage"), reported, "usage shown as reported: {o:?}");
        }
    }
    if let Ok(out) = chat_response_to_messages(data, model) {
        let o = object(&out, "chat_response_to_messages");
        assert!(o.get("usage").is_some_and(Value::is_object), "no usage: {o:?}");
    }
    object(&messages_error_to_chat(data, status), "messages_error_to_chat");
    object(&chat_error_to_messages(data, status), "chat_error_to_messages");

    let (events, _) = parse_sse(1 << 20, [data]);

    let include_usage = p.below(2) == 0;
    let mut m2c = MessagesToChatStream::new(model, include_usage, created);
    let mut out = Vec::new();
    for ev in &events {
        m2c.on_event(&ev.as_sse(), &mut out);
    }
    m2c.finish(&mut out);
    m2c.finish(&mut out);
    let got = sse_out(&out, "MessagesToChatStream");
    let done = got.iter().filter(|(_, d)| d == "[DONE]").count();
    assert_eq!(done, 1, "MessagesToChatStream: {done} [DONE]");
    assert_eq!(got.last().map(|(_, d)| d.as_str()), Some("[DONE]"));
    let usage_chunks = got
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v.get("usage").is_some())
        .count();
    assert!(usage_chunks <= usize::from(include_usage), "MessagesToChatStream: {usage_chunks} usage chunks");

    let mut c2m = ChatToMessagesStream::new(model);
    let mut out = Vec::new();
    for ev in &events {
        c2m.on_event(&ev.as_sse(), &mut out);
    }
    c2m.finish(&mut out);
    c2m.finish(&mut out);
    let got = sse_out(&out, "ChatToMessagesStream");
    let ends = got.iter().filter(|(e, _)| e == "message_stop" || e == "error").count();
    assert_eq!(ends, 1, "ChatToMessagesStream: {ends} terminal events");
    assert!(got.last().is_some_and(|(e, _)| e == "message_stop" || e == "error"));
    for (event, data) in &got {
        // Anthropic events repeat their name as data.type.
        let typ = serde_json::from_str::<Value>(data).ok();
        let typ = typ.as_ref().and_then(|v| v.get("type")).and_then(Value::as_str);
        assert_eq!(typ, Some(event.as_str()), "ChatToMessagesStream: {event} carries {data}");
    }
});
