//! Both roles driven through whole requests on the fake host: the listener decides, an attempt
//! carries the plan to the provider, the answer comes back and is charged once.

use super::listener::{Listener, CLIENT_GONE};
use super::plan::{self, Plan};
use super::upstream::Upstream;
use super::Flow;
use crate::config::{parse, Config};
use crate::host::fake::FakeHost;
use crate::host::{Body, Map};
use crate::store::FakeStore;
use serde_json::Value;
use std::rc::Rc;

pub(super) const TEAM_A_KEY: &str = "tg-team-a";

pub(super) fn config(extra: &str) -> Rc<Config> {
    let json = format!(
        r#"{{"consumers":{{"list":[
              {{"name":"team-a","key_env":"TEAM_A","limits":[{{"metric":"total_tokens","amount":100000,"window":"1m"}},
                                                        {{"metric":"requests","amount":100,"window":"1m"}}]}},
              {{"name":"team-b","key_env":"TEAM_B","limits":[{{"metric":"total_tokens","amount":50,"window":"1m"}}]}}]}},
            "providers":[
              {{"name":"openai","type":"openai","keys":[{{"id":"oa-1","env":"OA1"}},{{"id":"oa-2","env":"OA2"}}],
                "models":{{"gpt-4o-mini":"gpt-4o-mini","gpt-4o":"gpt-4o"}}}},
              {{"name":"anthropic","type":"anthropic","keys":[{{"id":"an-1","env":"AN1"}}],
                "models":{{"gpt-4o-mini":"claude-haiku-4-5","claude-only":"claude-haiku-4-5"}}}}],
            "default_max_tokens":100 {extra}}}"#
    );
    let env = |name: &str| -> Option<String> {
        Some(
            match name {
                "TEAM_A" => TEAM_A_KEY,
                "TEAM_B" => "tg-team-b",
                "OA1" => "sk-openai-one",
                "OA2" => "sk-openai-two",
                "AN1" => "sk-ant-one",
                _ => return None,
            }
            .to_string(),
        )
    };
    Rc::new(parse(json.as_bytes(), &env).unwrap())
}

const CHAT: &[u8] = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"seed":12345678901234567890123}"#;
const CHAT_STREAM: &[u8] =
    br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#;

pub(super) fn client(
    store: &Rc<FakeStore>,
    path: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> FakeHost {
    let mut h = FakeHost::new(store.clone()).with_request("POST", path, headers);
    h.bodies.insert(Body::Request, body.to_vec());
    h
}

pub(super) fn bearer(key: &str) -> Vec<u8> {
    format!("Bearer {key}").into_bytes()
}

/// The request path of the listener role as Envoy drives it: headers (held), then the body.
pub(super) fn send(l: &mut Listener, h: &mut FakeHost) -> Flow {
    let body_len = h.bodies.get(&Body::Request).map_or(0, Vec::len);
    let mut flow = l.on_request_headers(h, body_len == 0);
    if flow == Flow::Pause {
        flow = l.on_request_body(h, body_len, true);
    }
    if flow == Flow::Continue {
        h.request_headers_sent = true;
    }
    flow
}

pub(super) fn on_endpoint(h: &mut FakeHost, provider: &str) {
    h.attributes.insert(
        [
            "xds",
            "upstream_host_metadata",
            "filter_metadata",
            "tollgate",
            "provider",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        provider.as_bytes().to_vec(),
    );
}

/// One upstream attempt on `provider`, answered with `status`, `headers` and `body`; returns the
/// attempt's host (what the provider saw) after the answer went through the role.
pub(super) fn attempt(
    lh: &FakeHost,
    provider: &str,
    attempt_no: u64,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    cfg: &Rc<Config>,
) -> (Upstream, FakeHost) {
    let mut u = Upstream::new(cfg.clone());
    let mut h = FakeHost::attempt_of(lh);
    on_endpoint(&mut h, provider);
    h.attributes.insert(
        vec!["upstream".into(), "request_attempt_count".into()],
        attempt_no.to_le_bytes().to_vec(),
    );
    assert_eq!(u.on_request_headers(&mut h), Flow::Continue);
    let len = h.bodies.get(&Body::Request).map_or(0, Vec::len);
    assert_eq!(u.on_request_body(&mut h, len, true), Flow::Continue);
    h.set_response(status, headers, body);
    u.on_response_headers(&mut h);
    let len = body.len();
    u.on_response_body(&mut h, len, true);
    (u, h)
}

/// The answer as the listener role passes it to the client, fed in `chunks`; returns the bytes the
/// client gets.
pub(super) fn answer(
    l: &mut Listener,
    lh: &mut FakeHost,
    upstream: &FakeHost,
    chunks: &[&[u8]],
) -> Vec<u8> {
    lh.maps.insert(
        Map::ResponseHeaders,
        upstream
            .maps
            .get(&Map::ResponseHeaders)
            .cloned()
            .unwrap_or_default(),
    );
    assert_eq!(l.on_response_headers(lh, false), Flow::Continue);
    let mut out = Vec::new();
    let mut held = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let end = i + 1 == chunks.len();
        held.extend_from_slice(c);
        lh.bodies.insert(Body::Response, held.clone());
        let flow = l.on_response_body(lh, held.len(), end);
        if flow == Flow::Continue {
            out.extend_from_slice(
                lh.bodies
                    .get(&Body::Response)
                    .map_or(&[][..], Vec::as_slice),
            );
            held.clear();
        }
    }
    l.on_log(lh);
    out
}

/// A field of the access-log record (`wasm.tollgate`, logfmt).
pub(super) fn logged(h: &FakeHost, field: &str) -> Option<String> {
    let record = h.state(super::listener::RECORD)?;
    record
        .split(' ')
        .find_map(|kv| kv.strip_prefix(&format!("{field}=")))
        .map(str::to_string)
}

pub(super) fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

pub(super) fn json(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap()
}

#[test]
fn a_request_through_admission_attempt_answer_and_charge() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[
            ("authorization", &bearer(TEAM_A_KEY)),
            ("content-type", b"application/json"),
        ],
        CHAT,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(
        l.on_request_headers(&mut lh, false),
        Flow::Pause,
        "headers held for the body"
    );
    assert_eq!(l.on_request_body(&mut lh, CHAT.len(), true), Flow::Continue);
    assert_eq!(
        lh.get(Map::RequestHeaders, "authorization"),
        None,
        "client key removed"
    );
    lh.request_headers_sent = true;
    let plan = Plan::decode(lh.filter_state.get(plan::FILTER_STATE).unwrap()).unwrap();
    assert_eq!((plan.model, plan.consumer), ("gpt-4o-mini", "team-a"));
    assert!(!plan.rewritten);
    assert_eq!(
        lh.bodies[&Body::Request],
        CHAT,
        "the body goes as the client sent it"
    );

    let completion = fixture("openai_chat.json");
    let (_, uh) = attempt(
        &lh,
        "openai",
        1,
        200,
        &[("content-type", "application/json")],
        &completion,
        &cfg,
    );
    assert_eq!(
        uh.get(Map::RequestHeaders, "authorization").as_deref(),
        Some("Bearer sk-openai-one")
    );
    assert_eq!(
        uh.get(Map::ResponseHeaders, "x-tollgate-key-id").as_deref(),
        Some("oa-1")
    );
    assert_eq!(uh.counter("tollgate.provider.openai.attempts"), 1);

    let out = answer(
        &mut l,
        &mut lh,
        &uh,
        &[&completion[..40], &completion[40..]],
    );
    assert_eq!(out, completion, "an untranslated answer passes unchanged");
    assert_eq!(logged(&lh, "in").as_deref(), Some("24"));
    assert_eq!(logged(&lh, "out").as_deref(), Some("8"));
    assert_eq!(logged(&lh, "usage").as_deref(), Some("exact"));
    assert_eq!(logged(&lh, "key").as_deref(), Some("oa-1"));
    assert_eq!(lh.counter("tollgate.outcome.ok.requests"), 1);
    assert_eq!(
        lh.get(Map::ResponseHeaders, "x-ratelimit-limit-requests")
            .as_deref(),
        Some("100")
    );
    // Charged exactly once, whatever comes after.
    l.on_log(&mut lh);
    assert_eq!(
        lh.counter("tollgate.consumer.team-a.model.gpt-4o-mini.requests"),
        1
    );
}

#[test]
fn a_stream_without_asked_usage_has_it_asked_for_then_withheld_and_stripped() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("x-api-key", TEAM_A_KEY.as_bytes())],
        CHAT_STREAM,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    let sent = json(&lh.bodies[&Body::Request]);
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert!(
        Plan::decode(&lh.filter_state[plan::FILTER_STATE])
            .unwrap()
            .rewritten
    );

    let stream = fixture("openai_stream.sse");
    let (_, uh) = attempt(
        &lh,
        "openai",
        1,
        200,
        &[("content-type", "text/event-stream")],
        b"",
        &cfg,
    );
    // Split at awkward places: inside an event, inside the usage chunk.
    let cuts = [7, 300, stream.len() - 150, stream.len() - 20];
    let mut chunks: Vec<&[u8]> = Vec::new();
    let mut from = 0;
    for c in cuts {
        chunks.push(&stream[from..c]);
        from = c;
    }
    chunks.push(&stream[from..]);
    let out = answer(&mut l, &mut lh, &uh, &chunks);
    let text = String::from_utf8(out).unwrap();
    // The client gets the provider's stream without its usage-only chunk, every other byte as it
    // came: the chunks keep their `"usage":null`, as OpenAI sends them when usage is asked for.
    let stream_text = String::from_utf8(stream.clone()).unwrap();
    let usage_chunk: Vec<&str> = stream_text
        .split_inclusive("\n\n")
        .filter(|ev| ev.contains("\"choices\":[]"))
        .collect();
    assert_eq!(usage_chunk.len(), 1, "{stream_text}");
    assert_eq!(text, stream_text.replace(usage_chunk[0], ""));
    assert!(!text.contains("\"usage\":{"), "{text}");
    assert_eq!(text.matches("\"usage\":null").count(), 11, "{text}");
    assert_eq!(logged(&lh, "usage").as_deref(), Some("exact"));
    assert_eq!(logged(&lh, "in").as_deref(), Some("19"));
    assert_eq!(logged(&lh, "out").as_deref(), Some("9"));
}

/// A stripped stream's chunks that hold no usage (`"usage":null`, as OpenAI sends them, or no
/// member at all) go to the client as they came: read, not rewritten, one host call per chunk. Only
/// the chunk with the usage chunk, and one that ends inside an event, are.
#[test]
fn a_stripped_streams_chunks_without_usage_are_not_rewritten() {
    let (mut l, mut lh, uh) = stream_answered(CHAT_STREAM, "openai", 1);
    lh.maps
        .insert(Map::ResponseHeaders, uh.maps[&Map::ResponseHeaders].clone());
    assert_eq!(l.on_response_headers(&mut lh, false), Flow::Continue);
    let chunk = |text: &str| {
        format!(
            r#"data: {{"object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":"{text}"}}}}]}}"#
        ) + "\n\n"
    };
    let usage = r#"data: {"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#.to_string() + "\n\ndata: [DONE]\n\n";
    let null_usage = chunk("Hel").replace("]}\n", "],\"usage\":null}\n");
    assert!(
        null_usage.ends_with("}],\"usage\":null}\n\n"),
        "{null_usage}"
    );
    let two = null_usage + &chunk("lo");
    let split = chunk("there");
    let pieces: [(&[u8], bool); 4] = [
        (two.as_bytes(), false),
        (&split.as_bytes()[..20], true),
        (&split.as_bytes()[20..], true),
        (usage.as_bytes(), true),
    ];
    let mut client_got = Vec::new();
    for (i, (piece, rewritten)) in pieces.into_iter().enumerate() {
        lh.bodies.insert(Body::Response, piece.to_vec());
        let before = lh.calls.get();
        let end = i == 3;
        assert_eq!(
            l.on_response_body(&mut lh, piece.len(), end),
            Flow::Continue
        );
        // The body read, and a write where the client gets other bytes.
        let calls = lh.calls.get() - before - u32::from(end) * 2;
        assert_eq!(calls, 1 + u32::from(rewritten), "piece {i}");
        client_got.extend_from_slice(&lh.bodies[&Body::Response]);
    }
    assert_eq!(
        String::from_utf8(client_got).unwrap(),
        two + &split + "data: [DONE]\n\n"
    );
    assert_eq!(logged(&lh, "out").as_deref(), Some("3"));
}

/// A streamed chat request from team-a sent on, and the attempt on `provider` answered with a
/// stream's headers: the listener, its host, and the attempt's host.
fn stream_answered(body: &[u8], provider: &str, attempt_no: u64) -> (Listener, FakeHost, FakeHost) {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("x-api-key", TEAM_A_KEY.as_bytes())],
        body,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    let (_, uh) = attempt(
        &lh,
        provider,
        attempt_no,
        200,
        &[("content-type", "text/event-stream")],
        b"",
        &cfg,
    );
    (l, lh, uh)
}

#[test]
fn an_anthropic_stream_is_translated_for_an_openai_client_and_counted_natively() {
    let body = br#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello"}]}"#;
    let (mut l, mut lh, uh) = stream_answered(body, "anthropic", 2);
    assert_eq!(
        uh.get(Map::RequestHeaders, ":path").as_deref(),
        Some("/v1/messages")
    );
    assert_eq!(
        uh.get(Map::RequestHeaders, "x-api-key").as_deref(),
        Some("sk-ant-one")
    );
    assert_eq!(
        json(&uh.bodies[&Body::Request])["model"],
        "claude-haiku-4-5"
    );
    let stream = fixture("anthropic_stream.sse");
    let out = answer(&mut l, &mut lh, &uh, &[&stream[..100], &stream[100..]]);
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("chat.completion.chunk"), "{text}");
    assert!(
        text.contains("\"model\":\"gpt-4o-mini\""),
        "the client's model name: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(logged(&lh, "usage").as_deref(), Some("exact"));
    assert_eq!(logged(&lh, "in").as_deref(), Some("2069"));
}

#[test]
fn a_translated_answer_without_usage_is_estimated() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    // An Anthropic client, answered by the OpenAI-speaking provider without usage.
    let body = br#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"Say hello"}]}"#;
    let mut lh = client(
        &store,
        "/v1/messages",
        &[("x-api-key", TEAM_A_KEY.as_bytes())],
        body,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    let completion = br#"{"id":"c1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, friend."},"finish_reason":"stop"}]}"#;
    let (_, uh) = attempt(
        &lh,
        "openai",
        1,
        200,
        &[("content-type", "application/json")],
        completion,
        &cfg,
    );
    let out = answer(&mut l, &mut lh, &uh, &[completion]);
    assert_eq!(
        json(&out)["type"],
        "message",
        "translated for the Anthropic client"
    );
    assert_eq!(logged(&lh, "usage").as_deref(), Some("estimated"));
    assert_ne!(logged(&lh, "out").as_deref(), Some("0"));
}

#[test]
fn an_anthropic_stream_cut_after_message_start_is_estimated() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("x-api-key", TEAM_A_KEY.as_bytes())],
        CHAT_STREAM,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    let (_, uh) = attempt(
        &lh,
        "anthropic",
        1,
        200,
        &[("content-type", "text/event-stream")],
        b"",
        &cfg,
    );
    let stream = fixture("anthropic_stream.sse");
    let text = String::from_utf8(stream).unwrap();
    let cut = text.find("event: message_delta").unwrap();
    let out = answer(&mut l, &mut lh, &uh, &[&text.as_bytes()[..cut]]);
    assert!(!out.is_empty());
    assert_eq!(logged(&lh, "usage").as_deref(), Some("estimated"));
    // 21 input + 2048 cache reads, as message_start reported them.
    assert_eq!(
        logged(&lh, "in").as_deref(),
        Some("2069"),
        "message_start's input is exact"
    );
}

fn refused(
    extra_cfg: &str,
    path: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> (FakeHost, crate::host::fake::Reply) {
    let cfg = config(extra_cfg);
    let store = Rc::new(FakeStore::new());
    let mut lh = client(&store, path, headers, body);
    let mut l = Listener::new(cfg);
    assert_eq!(send(&mut l, &mut lh), Flow::Stop);
    let reply = lh.reply.clone().unwrap();
    (lh, reply)
}

#[test]
fn refusals_answer_in_the_client_api_shape_before_any_attempt() {
    let key: &[(&str, &[u8])] = &[("x-api-key", TEAM_A_KEY.as_bytes())];
    // No key: 401, OpenAI shape.
    let (_, r) = refused("", "/v1/chat/completions", &[], CHAT);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    // Anthropic shape on /v1/messages.
    let (_, r) = refused("", "/v1/messages", &[("x-api-key", b"wrong")], b"{}");
    assert_eq!((r.status, r.json()["type"].as_str()), (401, Some("error")));
    // Empty body and missing messages: 400.
    let (h, r) = refused("", "/v1/chat/completions", key, b"");
    assert_eq!(r.status, 400, "{:?}", r.json());
    assert!(
        h.filter_state.get(plan::FILTER_STATE).is_none(),
        "nothing planned"
    );
    let (_, r) = refused(
        "",
        "/v1/chat/completions",
        key,
        br#"{"model":"gpt-4o-mini"}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("messages"));
    let (_, r) = refused("", "/v1/messages", key, b"");
    assert_eq!(
        (r.status, r.json()["error"]["type"].as_str()),
        (400, Some("invalid_request_error"))
    );
    // A model no provider lists: 400 naming it.
    let (_, r) = refused(
        "",
        "/v1/chat/completions",
        key,
        br#"{"model":"nobody-serves-this","messages":[{"role":"user","content":"x"}]}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("nobody-serves-this"));
    // Too large.
    let (_, r) = refused(
        r#","max_request_bytes":10"#,
        "/v1/chat/completions",
        key,
        CHAT,
    );
    assert_eq!(r.status, 413);
}

/// The consumer's rate-limit headers reach the client in place of the provider's own: written by
/// the attempt with provider and key id (one write), left alone by the listener; on an answer no
/// attempt wrote (Envoy's own), by the listener.
#[test]
fn rate_limit_headers_come_with_the_attempts_write_or_the_listeners() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let key = [("x-api-key", TEAM_A_KEY.as_bytes())];
    let mut lh = client(&store, "/v1/chat/completions", &key, CHAT);
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    let completion = fixture("openai_chat.json");
    let provider_own = [
        ("content-type", "application/json"),
        ("x-ratelimit-limit-requests", "5000"),
        ("x-ratelimit-remaining-requests", "4999"),
    ];
    let (_, uh) = attempt(&lh, "openai", 1, 200, &provider_own, &completion, &cfg);
    assert_eq!(uh.header_writes, 1, "one write for all the attempt adds");
    for (name, value) in [
        ("x-ratelimit-limit-requests", "100"),
        ("x-ratelimit-remaining-requests", "99"),
        ("x-ratelimit-limit-tokens", "100000"),
        ("x-tollgate-key-id", "oa-1"),
    ] {
        assert_eq!(uh.get(Map::ResponseHeaders, name).as_deref(), Some(value));
    }
    let before = lh.calls.get();
    answer(&mut l, &mut lh, &uh, &[&completion]);
    // The answer's headers read, its body read, the record and the total tokens.
    assert_eq!(lh.calls.get() - before, 4, "the listener writes no header");
    assert_eq!(
        lh.get(Map::ResponseHeaders, "x-ratelimit-remaining-requests")
            .as_deref(),
        Some("99")
    );

    // Envoy's own answer (a timeout): no attempt wrote anything.
    let mut lh = client(&store, "/v1/chat/completions", &key, CHAT);
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    lh.set_response(
        504,
        &[("content-type", "text/plain")],
        b"upstream request timeout",
    );
    assert_eq!(l.on_response_headers(&mut lh, false), Flow::Continue);
    assert_eq!(
        lh.get(Map::ResponseHeaders, "x-ratelimit-remaining-requests")
            .as_deref(),
        Some("98")
    );
    assert_eq!(lh.header_writes, 1);
}

/// Envoy refuses a body over its buffer limit while the listener still holds it (before tollgate saw
/// it whole), with a plain-text 413 that passes through the listener's response callbacks: the client
/// gets its API's 413, and the refusal is counted once, as tollgate's own would be.
#[test]
fn envoys_413_for_a_body_over_its_buffer_limit_reaches_the_client_in_its_shape() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let key = [("x-api-key", TEAM_A_KEY.as_bytes())];
    for (path, shape) in [
        ("/v1/chat/completions", "/error/code"),
        ("/v1/messages", "/error/type"),
    ] {
        let mut lh = client(&store, path, &key, CHAT);
        let mut l = Listener::new(cfg.clone());
        assert_eq!(l.on_request_headers(&mut lh, false), Flow::Pause);
        assert_eq!(l.on_request_body(&mut lh, CHAT.len(), false), Flow::Pause);
        let mut envoy = FakeHost::new(store.clone());
        envoy.set_response(413, &[("content-type", "text/plain")], b"Payload Too Large");
        let before = lh.counter("tollgate.outcome.rejected_invalid.requests");
        let body = answer(&mut l, &mut lh, &envoy, &[b"Payload Too Large"]);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v.pointer(shape).unwrap(),
            "request_too_large",
            "{path}: {v}"
        );
        assert_eq!(
            lh.get(Map::ResponseHeaders, "content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(
            lh.counter("tollgate.outcome.rejected_invalid.requests") - before,
            1
        );
    }
}

#[test]
fn a_token_limit_refusal_says_tokens_and_a_request_limit_says_requests() {
    // team-b has 50 tokens a minute: the first request runs the bucket into debt, the next waits.
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("x-api-key", b"tg-team-b")],
        CHAT,
    );
    assert_eq!(
        send(&mut Listener::new(cfg.clone()), &mut lh),
        Flow::Continue
    );
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("x-api-key", b"tg-team-b")],
        CHAT,
    );
    assert_eq!(send(&mut Listener::new(cfg), &mut lh), Flow::Stop);
    let r = lh.reply.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "tokens");
    assert!(r.header("retry-after").is_some());
    assert!(r.header("x-ratelimit-remaining-tokens").is_some());

    let cfg = config(r#","default_limits":[{"metric":"requests","amount":1,"window":"1m"}]"#);
    let store = Rc::new(FakeStore::new());
    for expected in [Flow::Continue, Flow::Stop] {
        let mut lh = client(&store, "/v1/chat/completions", &[], CHAT);
        let mut l = Listener::new(Rc::new(
            parse(
                br#"{"providers":[{"name":"openai","type":"openai","keys":[{"id":"k","env":"K"}]}],"default_limits":[{"metric":"requests","amount":1,"window":"1m"}]}"#,
                &|_| Some("s".into()),
            )
            .unwrap(),
        ));
        assert_eq!(send(&mut l, &mut lh), expected);
        if expected == Flow::Stop {
            assert_eq!(
                lh.reply.as_ref().unwrap().json()["error"]["type"],
                "requests"
            );
        }
    }
    drop(cfg);
}

#[test]
fn a_model_whose_providers_all_cool_down_gets_429_with_retry_after() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let now = FakeHost::new(store.clone()).now;
    crate::failover::health::cool_key(
        store.as_ref(),
        &cfg.providers[1],
        0,
        now + 9_000,
        crate::failover::health::CooldownReason::RateLimited,
    )
    .unwrap();
    let body = br#"{"model":"claude-only","messages":[{"role":"user","content":"x"}]}"#;
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("x-api-key", TEAM_A_KEY.as_bytes())],
        body,
    );
    let mut l = Listener::new(cfg);
    assert_eq!(send(&mut l, &mut lh), Flow::Stop);
    let r = lh.reply.unwrap();
    assert_eq!(r.status, 429);
    assert_spread(r.header("retry-after"), 9);
}

/// A `Retry-After` spread over the window after a recovery `secs` away (limit::spread): never
/// earlier, within half as long again.
pub(crate) fn assert_spread(written: Option<&str>, secs: u64) {
    let got: u64 = written.and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(
        (secs..=secs + secs.div_ceil(2) + 1).contains(&got),
        "Retry-After {got} for a recovery in {secs}s"
    );
}

#[test]
fn a_model_only_a_later_provider_lists_is_steered_there() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let body = br#"{"model":"claude-only","messages":[{"role":"user","content":"x"}]}"#;
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("x-api-key", TEAM_A_KEY.as_bytes())],
        body,
    );
    let mut l = Listener::new(cfg);
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    assert_eq!(
        lh.get(Map::RequestHeaders, "x-tollgate-route").as_deref(),
        Some("anthropic")
    );
    assert_eq!(lh.route_cache_cleared, 1);
}

#[test]
fn credentials_internal_and_trusted_headers_never_reach_the_provider_whatever_their_bytes() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let mut lh = client(
        &store,
        "/v1/messages",
        &[
            ("authorization", b"\xff\xfe not utf-8"),
            ("x-api-key", TEAM_A_KEY.as_bytes()),
            ("x-tollgate-route", b"anthropic"),
            ("x-tollgate-whatever", b"\x80"),
        ],
        br#"{"model":"claude-only","max_tokens":5,"messages":[{"role":"user","content":"x"}]}"#,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    // The client's route header went; the listener set its own.
    let names: Vec<&str> = lh.maps[&Map::RequestHeaders]
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert!(
        !names.contains(&"authorization") && !names.contains(&"x-tollgate-whatever"),
        "{names:?}"
    );
    let (_, uh) = attempt(
        &lh,
        "anthropic",
        1,
        200,
        &[("content-type", "application/json")],
        b"{}",
        &cfg,
    );
    let seen: Vec<&str> = uh.maps[&Map::RequestHeaders]
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert!(
        !seen.iter().any(|k| k.starts_with("x-tollgate-")),
        "{seen:?}"
    );
    assert!(!seen.contains(&"authorization"));
    assert_eq!(
        uh.get(Map::RequestHeaders, "x-api-key").as_deref(),
        Some("sk-ant-one")
    );

    // A trusted consumer header goes too.
    let cfg = Rc::new(
        parse(
            br#"{"consumers":{"trusted_header":"x-consumer"},"providers":[{"name":"openai","type":"openai","keys":[{"id":"k","env":"K"}]}]}"#,
            &|_| Some("s".into()),
        )
        .unwrap(),
    );
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("x-consumer", b"team-z")],
        CHAT,
    );
    let mut l = Listener::new(cfg);
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    assert_eq!(lh.get(Map::RequestHeaders, "x-consumer"), None);
    let plan = Plan::decode(&lh.filter_state[plan::FILTER_STATE]).unwrap();
    assert_eq!(plan.consumer, "team-z");
}

#[test]
fn every_attempt_starts_from_the_clients_request() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let mut lh = client(
        &store,
        "/v1/messages",
        &[("x-api-key", TEAM_A_KEY.as_bytes())],
        br#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"x"}]}"#,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    // Attempt 1 on OpenAI rewrites the shared header map's path; it is refused with 429.
    let (_, first) = attempt(&lh, "openai", 1, 429, &[("retry-after", "30")], b"{}", &cfg);
    assert_eq!(
        first.get(Map::RequestHeaders, ":path").as_deref(),
        Some("/v1/chat/completions")
    );
    let health = crate::failover::health::read(store.as_ref(), &cfg.providers[0]).unwrap();
    assert!(
        !health.key_available(0, lh.now + 29_000),
        "oa-1 cools down for 30 s"
    );
    // Attempt 2 gets that same map, and goes to Anthropic with the client's path.
    let mut second_host = FakeHost::next_attempt(&lh, &first);
    let mut u = Upstream::new(cfg.clone());
    on_endpoint(&mut second_host, "anthropic");
    assert_eq!(u.on_request_headers(&mut second_host), Flow::Continue);
    assert_eq!(
        second_host.counter("tollgate.provider.anthropic.retried_attempts"),
        1,
        "the first attempt's credential in the shared map tells a retry"
    );
    assert_eq!(
        first.counter("tollgate.provider.openai.retried_attempts"),
        0
    );
    assert_eq!(
        second_host.get(Map::RequestHeaders, ":path").as_deref(),
        Some("/v1/messages")
    );
    assert_eq!(
        second_host.get(Map::RequestHeaders, "authorization"),
        None,
        "OpenAI's credential went"
    );
}

#[test]
fn an_error_body_quoting_the_key_is_scrubbed() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("x-api-key", TEAM_A_KEY.as_bytes())],
        CHAT,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    let (_, uh) = attempt(
        &lh,
        "openai",
        1,
        401,
        &[
            ("content-type", "application/json"),
            ("content-length", "63"),
        ],
        br#"{"error":{"message":"Incorrect API key provided: sk-openai-one."}}"#,
        &cfg,
    );
    let body = String::from_utf8(uh.bodies[&Body::Response].clone()).unwrap();
    assert!(
        !body.contains("sk-openai-one") && body.contains("[key oa-1]"),
        "{body}"
    );
    assert_eq!(
        uh.get(Map::ResponseHeaders, "content-length"),
        None,
        "the scrubbed body has another length"
    );
}

#[test]
fn an_attempt_cut_because_the_client_left_is_not_the_providers_failure() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("x-api-key", TEAM_A_KEY.as_bytes())],
        CHAT,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    l.on_done(&mut lh);
    assert!(lh.filter_state.contains_key(CLIENT_GONE));
    let mut uh = FakeHost::attempt_of(&lh);
    on_endpoint(&mut uh, "openai");
    let mut u = Upstream::new(cfg.clone());
    assert_eq!(u.on_request_headers(&mut uh), Flow::Continue);
    u.on_done(&mut uh);
    assert_eq!(uh.counter("tollgate.provider.openai.failures"), 0);
    // Without the client gone, a sent attempt with no answer counts once.
    let lh2 = client(&store, "/v1/chat/completions", &[], CHAT);
    let mut uh = FakeHost::attempt_of(&lh2);
    on_endpoint(&mut uh, "openai");
    let mut u = Upstream::new(cfg);
    assert_eq!(u.on_request_headers(&mut uh), Flow::Continue);
    u.on_done(&mut uh);
    u.on_done(&mut uh);
    assert_eq!(uh.counter("tollgate.provider.openai.failures"), 1);
}

#[test]
fn request_trailers_end_the_request_like_a_last_body_chunk() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("x-api-key", TEAM_A_KEY.as_bytes())],
        CHAT,
    );
    let mut l = Listener::new(cfg);
    assert_eq!(l.on_request_headers(&mut lh, false), Flow::Pause);
    assert_eq!(l.on_request_body(&mut lh, CHAT.len(), false), Flow::Pause);
    assert_eq!(l.on_request_trailers(&mut lh), Flow::Continue);
    assert!(lh.filter_state.contains_key(plan::FILTER_STATE));
}

#[test]
fn an_unpriced_model_is_never_free_on_a_cost_budget() {
    let priced = r#","prices":{"gpt-4o":{"input":1,"output":1}}"#;
    let limits = r#","default_limits":[{"metric":"cost_usd","amount":1,"window":"1h"}]"#;
    let json = |extra: &str| {
        format!(
            r#"{{"providers":[{{"name":"openai","type":"openai","keys":[{{"id":"k","env":"K"}}]}}]{priced}{limits}{extra}}}"#
        )
    };
    let store = Rc::new(FakeStore::new());
    let cfg = Rc::new(parse(json("").as_bytes(), &|_| Some("s".into())).unwrap());
    let mut lh = client(&store, "/v1/chat/completions", &[], CHAT);
    let mut l = Listener::new(cfg);
    assert_eq!(send(&mut l, &mut lh), Flow::Stop);
    let r = lh.reply.unwrap();
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no price"));

    let cfg = Rc::new(
        parse(
            json(r#","default_price":{"input":2,"output":2}"#).as_bytes(),
            &|_| Some("s".into()),
        )
        .unwrap(),
    );
    let mut lh = client(&store, "/v1/chat/completions", &[], CHAT);
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    let standing = crate::limit::quota::standings(
        store.as_ref(),
        &crate::limit::admission::limits(&cfg, "anonymous", "gpt-4o-mini"),
        lh.now,
    )
    .unwrap();
    assert!(
        standing[0].remaining < 1_000_000,
        "the reservation cost something: {standing:?}"
    );
}

/// What a non-streamed request costs in host calls, both roles and shared data included (metrics
/// and usage totals go at the tick, not per request). The cost goal (BENCHMARKS.md) is at most 20:
/// listener 10 (headers read, the client's key removed, clock, body, plan, consumer for the rate
/// limit service, answer's headers read, body, access-log record, total tokens for the rate limit
/// service: the rate-limit headers are already in the answer, written by the attempt); upstream 5
/// (plan, headers read, key set, answer's headers read, and one write for provider, key id and the
/// rate-limit headers); shared data 5 (health, quota admission and settlement: one entry for all
/// limits).
#[test]
fn a_non_streamed_request_costs_20_host_calls() {
    let cfg = Rc::new(
        parse(
            br#"{"consumers":{"list":[{"name":"team-a","key_env":"K","limits":[
                   {"metric":"total_tokens","amount":100000,"window":"1m"},{"metric":"requests","amount":1000,"window":"1m"}]}]},
                 "providers":[{"name":"openai","type":"openai","keys":[{"id":"k1","env":"S"},{"id":"k2","env":"S"}]}]}"#,
            &|name| Some(if name == "K" { TEAM_A_KEY } else { "sk" }.to_string()),
        )
        .unwrap(),
    );
    let store = Rc::new(FakeStore::new());
    // One worker: its round-robin ticket blocks are shared by its streams.
    let tickets: Rc<core::cell::RefCell<crate::pool::keypool::Tickets>> = Rc::default();
    let completion = fixture("openai_chat.json");
    let mut calls = Vec::new();
    for _ in 0..crate::pool::keypool::TICKET_BLOCK {
        store.calls.set(0);
        let mut lh = client(
            &store,
            "/v1/chat/completions",
            &[("authorization", &bearer(TEAM_A_KEY))],
            CHAT,
        );
        lh.tickets = tickets.clone();
        let mut l = Listener::new(cfg.clone());
        assert_eq!(send(&mut l, &mut lh), Flow::Continue);
        let (_, uh) = attempt(
            &lh,
            "openai",
            1,
            200,
            &[("content-type", "application/json")],
            &completion,
            &cfg,
        );
        answer(&mut l, &mut lh, &uh, &[&completion]);
        assert_eq!(logged(&lh, "usage").as_deref(), Some("exact"));
        calls.push((lh.calls.get(), uh.calls.get(), store.calls.get()));
    }
    // The first request of a worker also takes a block of round-robin tickets (one CAS).
    assert_eq!(calls[0], (10, 5, 7), "listener, upstream, shared data");
    assert!(calls[1..].iter().all(|&c| c == (10, 5, 5)), "{calls:?}");
}

fn sds_config() -> Rc<Config> {
    let json = r#"{"consumers":{"list":[{"name":"team-a","key_env":"TEAM_A"}]},
        "providers":[{"name":"openai","type":"openai","rotation":"sticky",
                      "keys":[{"id":"oa-1","sds":"openai-1"},{"id":"oa-2","sds":"openai-2"}]}]}"#;
    let env = |name: &str| (name == "TEAM_A").then(|| TEAM_A_KEY.to_string());
    Rc::new(parse(json.as_bytes(), &env).unwrap())
}

#[test]
fn an_sds_key_is_named_for_envoy_and_its_retry_is_told_by_the_attempt_count() {
    let cfg = sds_config();
    let store = Rc::new(FakeStore::new());
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("authorization", &bearer(TEAM_A_KEY))],
        CHAT,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    // Envoy has no secret for the sticky key: nothing is injected, and the provider refuses the
    // attempt, quoting nothing it was not sent.
    let (_, mut first) = attempt(
        &lh,
        "openai",
        1,
        401,
        &[("content-type", "application/json")],
        br#"{"error":{"message":"You didn't provide an API key."}}"#,
        &cfg,
    );
    let first_key = first.get(Map::RequestHeaders, "x-tollgate-credential");
    assert!(
        first_key.is_some() && first.get(Map::RequestHeaders, "authorization").is_none(),
        "the secret is named for Envoy, never written by tollgate: {:?}",
        first.maps[&Map::RequestHeaders]
    );
    // Envoy's header_mutation took the internal header out before the attempt left.
    first
        .maps
        .get_mut(&Map::RequestHeaders)
        .unwrap()
        .retain(|(k, _)| k != "x-tollgate-credential");
    // The map holds no credential, yet the second attempt is a retry: it reads the key's health
    // afresh and leaves the refused key, which stickiness alone would choose again.
    let mut second = FakeHost::next_attempt(&lh, &first);
    on_endpoint(&mut second, "openai");
    second.attributes.insert(
        vec!["upstream".into(), "request_attempt_count".into()],
        2u64.to_le_bytes().to_vec(),
    );
    let mut u = Upstream::new(cfg.clone());
    assert_eq!(u.on_request_headers(&mut second), Flow::Continue);
    assert_eq!(
        second.counter("tollgate.provider.openai.retried_attempts"),
        1
    );
    let second_key = second.get(Map::RequestHeaders, "x-tollgate-credential");
    assert!(
        second_key.is_some() && second_key != first_key,
        "{first_key:?} then {second_key:?}"
    );
}

#[test]
fn an_error_body_quoting_an_sds_key_is_redacted_by_its_shape() {
    let cfg = sds_config();
    let store = Rc::new(FakeStore::new());
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("authorization", &bearer(TEAM_A_KEY))],
        CHAT,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    let (_, uh) = attempt(
        &lh,
        "openai",
        1,
        401,
        &[("content-type", "application/json")],
        br#"{"error":{"message":"Incorrect API key provided: sk-proj-Zq81xW0b2Lm4. You can find your API key at https://platform.openai.com/account/api-keys."}}"#,
        &cfg,
    );
    let body = String::from_utf8(uh.bodies[&Body::Response].clone()).unwrap();
    assert_eq!(
        body,
        r#"{"error":{"message":"Incorrect API key provided: [redacted]. You can find your API key at https://platform.openai.com/account/api-keys."}}"#
    );
}

/// A gateway of one OpenAI provider with keys `k1..` (secrets `sk-1..`) and `extra` provider
/// fields; everyone anonymous; the status endpoint at `/st` for the key `admin`.
fn pool_config(keys: usize, extra: &str) -> Rc<Config> {
    let keys: Vec<String> = (1..=keys)
        .map(|i| format!(r#"{{"id":"k{i}","env":"S{i}"}}"#))
        .collect();
    let json = format!(
        r#"{{"providers":[{{"name":"openai","type":"openai","keys":[{}] {extra}}}],
            "status":{{"path":"/st","admin_key_env":"ADMIN"}}}}"#,
        keys.join(",")
    );
    Rc::new(
        parse(json.as_bytes(), &|name| {
            Some(match name.strip_prefix('S') {
                Some(i) => format!("sk-{i}"),
                None => name.to_lowercase(),
            })
        })
        .unwrap(),
    )
}

/// One request through the listener and its first attempt, answered with the status `answer`
/// gives for the key's secret the provider saw; returns that secret, and the listener's and the
/// attempt's hosts.
fn one_request(
    store: &Rc<FakeStore>,
    tickets: &Rc<core::cell::RefCell<crate::pool::keypool::Tickets>>,
    cfg: &Rc<Config>,
    body: &[u8],
    answer: &dyn Fn(&str) -> u16,
) -> (String, FakeHost, FakeHost) {
    let mut lh = client(store, "/v1/chat/completions", &[], body);
    lh.tickets = tickets.clone();
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    let uh = answered_attempt(&lh, None, cfg, answer);
    let key = secret_seen(&uh);
    (key, lh, uh)
}

/// An attempt of the request `lh` carried (after `previous`, for a retry), answered by `answer`.
fn answered_attempt(
    lh: &FakeHost,
    previous: Option<&FakeHost>,
    cfg: &Rc<Config>,
    answer: &dyn Fn(&str) -> u16,
) -> FakeHost {
    let mut u = Upstream::new(cfg.clone());
    let mut h = match previous {
        Some(p) => FakeHost::next_attempt(lh, p),
        None => FakeHost::attempt_of(lh),
    };
    on_endpoint(&mut h, "openai");
    assert_eq!(u.on_request_headers(&mut h), Flow::Continue);
    let len = h.bodies.get(&Body::Request).map_or(0, Vec::len);
    assert_eq!(u.on_request_body(&mut h, len, true), Flow::Continue);
    let status = answer(&secret_seen(&h));
    let body = if status == 200 {
        fixture("openai_chat.json")
    } else {
        b"{}".to_vec()
    };
    h.set_response(status, &[("content-type", "application/json")], &body);
    u.on_response_headers(&mut h);
    u.on_response_body(&mut h, body.len(), true);
    h
}

fn secret_seen(h: &FakeHost) -> String {
    h.get(Map::RequestHeaders, "authorization")
        .unwrap_or_default()
        .trim_start_matches("Bearer ")
        .to_string()
}

fn ok(_: &str) -> u16 {
    200
}

fn status_json(store: &Rc<FakeStore>, cfg: &Rc<Config>) -> Value {
    let mut h = client(store, "/st", &[("authorization", b"Bearer admin")], b"");
    let mut l = Listener::new(cfg.clone());
    assert_eq!(l.on_request_headers(&mut h, true), Flow::Stop);
    h.reply.unwrap().json()
}

/// `cfg`'s pool applied after a configuration without its last key: that key enters on probation.
fn last_key_enters(store: &FakeStore, cfg: &Config) {
    let mut before = cfg.providers[0].clone();
    before.keys.pop();
    crate::failover::health::reconcile(store, &before).unwrap();
    let entered = crate::failover::health::apply_config(store, &cfg.providers);
    assert_eq!(entered.len(), 1, "{entered:?}");
    assert!(
        entered[0].contains("k3") && !entered[0].contains("sk-3"),
        "by id: {entered:?}"
    );
}

#[test]
fn a_key_on_probation_passes_after_its_answers_with_one_write_each() {
    let cfg = pool_config(3, r#","probation":{"requests":3,"share_percent":100}"#);
    let store = Rc::new(FakeStore::new());
    let tickets = Rc::default();
    last_key_enters(&store, &cfg);
    let st = status_json(&store, &cfg);
    assert_eq!(
        st["providers"]["openai"]["keys"][2]["probation_requests_left"],
        3
    );
    assert_eq!(
        st["providers"]["openai"]["keys"][0]["probation_requests_left"],
        0
    );
    let mut calls = (Vec::new(), Vec::new());
    for _ in 0..12 {
        let before = store.calls.get();
        let (key, _, _) = one_request(&store, &tickets, &cfg, CHAT, &ok);
        // The listener's shared-data calls are the same for every request; what differs is the
        // attempt's write for a key on probation.
        let n = store.calls.get() - before;
        if key == "sk-3" {
            calls.0.push(n);
        } else {
            calls.1.push(n);
        }
    }
    let h = crate::failover::health::read(store.as_ref(), &cfg.providers[0]).unwrap();
    assert_eq!(h.probation_left(2), 0, "passed");
    assert!(calls.0.len() >= 4, "{calls:?}");
    // While on probation: two more (a read and a write of its health) than another key's, and
    // two more again when the worker takes a new block of round-robin tickets, as any may.
    let usual = *calls.1.iter().min().unwrap();
    let block = 2;
    assert!(
        calls.1.iter().all(|&n| n == usual || n == usual + block),
        "{calls:?}"
    );
    assert!(
        calls.0[..3]
            .iter()
            .all(|&n| n == usual + 2 || n == usual + 2 + block),
        "{calls:?}"
    );
    assert!(
        calls.0[3..]
            .iter()
            .all(|&n| n == usual || n == usual + block),
        "{calls:?}"
    );
    let st = status_json(&store, &cfg);
    assert_eq!(
        st["providers"]["openai"]["keys"][2]["probation_requests_left"],
        0
    );
}

#[test]
fn a_key_refused_during_probation_is_out_until_it_enters_again() {
    let cfg = pool_config(3, r#","probation":{"requests":5,"share_percent":100}"#);
    let store = Rc::new(FakeStore::new());
    let tickets = Rc::default();
    last_key_enters(&store, &cfg);
    let refuse_k3 = |key: &str| if key == "sk-3" { 401 } else { 200 };
    let mut refused = 0;
    for _ in 0..30 {
        let (key, lh, uh) = one_request(&store, &tickets, &cfg, CHAT, &refuse_k3);
        if key == "sk-3" {
            refused += 1;
            assert_eq!(uh.counter("tollgate.provider.openai.key.k3.disabled"), 1);
            // Envoy retries the 401: the next attempt takes another key.
            let retry = answered_attempt(&lh, Some(&uh), &cfg, &refuse_k3);
            assert_ne!(secret_seen(&retry), "sk-3");
        }
    }
    assert_eq!(refused, 1, "k3 is never chosen again after its 401");
    let h = crate::failover::health::read(store.as_ref(), &cfg.providers[0]).unwrap();
    assert!(h.key_revoked(2));
    let st = status_json(&store, &cfg);
    assert_eq!(
        st["providers"]["openai"]["keys"][2]["state"],
        "disabled_in_probation"
    );
    // Disabled and enabled again in the configuration: back, on probation again.
    let mut off = (*cfg).clone();
    off.providers[0].keys[2].disabled = true;
    assert!(crate::failover::health::apply_config(store.as_ref(), &off.providers).is_empty());
    assert_eq!(
        crate::failover::health::apply_config(store.as_ref(), &cfg.providers).len(),
        1
    );
    let back = (0..30)
        .filter(|_| one_request(&store, &tickets, &cfg, CHAT, &ok).0 == "sk-3")
        .count();
    assert!(back > 0);
}

#[test]
fn requests_sharing_their_leading_prompt_share_a_key() {
    let cfg = pool_config(3, r#","rotation":"prompt_affinity""#);
    let store = Rc::new(FakeStore::new());
    let tickets = Rc::default();
    let chat = |system: &str, later: &str| {
        serde_json::to_vec(&serde_json::json!({"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "Summarise the attached report."},
            {"role": "assistant", "content": "Here it is."},
            {"role": "user", "content": later}]}))
        .unwrap()
    };
    let mut keys_of_prefix = Vec::new();
    for p in 0..12 {
        let mut keys: Vec<String> = (0..4)
            .map(|turn| {
                let body = chat(
                    &format!("You are assistant {p}."),
                    &format!("follow-up {turn}"),
                );
                one_request(&store, &tickets, &cfg, &body, &ok).0
            })
            .collect();
        keys.dedup();
        assert_eq!(keys.len(), 1, "prefix {p}: {keys:?}");
        keys_of_prefix.extend(keys);
    }
    keys_of_prefix.sort();
    keys_of_prefix.dedup();
    assert!(
        keys_of_prefix.len() >= 2,
        "prefixes spread over keys: {keys_of_prefix:?}"
    );
    // The plan carries the hash; without prompt affinity anywhere, nothing is hashed.
    let (_, lh, _) = one_request(&store, &tickets, &cfg, CHAT, &ok);
    assert!(Plan::decode(&lh.filter_state[plan::FILTER_STATE])
        .unwrap()
        .prefix
        .is_some());
    let plain = pool_config(3, "");
    let (_, lh, _) = one_request(&store, &tickets, &plain, CHAT, &ok);
    assert_eq!(
        Plan::decode(&lh.filter_state[plan::FILTER_STATE])
            .unwrap()
            .prefix,
        None
    );
}

/// Writes a request must not go on without (`super::refused`), each refused in turn as Envoy
/// refuses one: the client's answer, the refusal counted, and what did not happen.
mod refused_writes {
    use super::*;
    use crate::failover::health;
    use crate::host::fake::Write;

    const MESSAGES: &[u8] =
        br#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"Say hello"}]}"#;
    const ERROR_QUOTING_KEY: &[u8] =
        br#"{"error":{"message":"Incorrect API key provided: sk-openai-one."}}"#;

    /// Both dialects: path, body, and whether the client speaks Anthropic's.
    const CLIENTS: [(&str, &[u8], bool); 2] = [
        ("/v1/chat/completions", CHAT, false),
        ("/v1/messages", MESSAGES, true),
    ];

    /// The local answer to a write refused at `place`, in the client's error shape, and the
    /// refusal counted once.
    fn stopped(h: &FakeHost, place: &str, status: u16, anthropic: bool) -> String {
        let r = h.reply.clone().expect("answered locally");
        assert_eq!(r.status, status);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v = r.json();
        if anthropic {
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["type"], "api_error", "{v}");
        } else {
            assert_eq!(v["error"]["type"], "server_error", "{v}");
        }
        assert_eq!(h.counter(&format!("tollgate.write.{place}.refused")), 1);
        String::from_utf8(r.body).unwrap()
    }

    fn admitted(store: &Rc<FakeStore>, cfg: &Rc<Config>, path: &str, body: &[u8]) -> FakeHost {
        let mut lh = client(store, path, &[("x-api-key", TEAM_A_KEY.as_bytes())], body);
        assert_eq!(
            send(&mut Listener::new(cfg.clone()), &mut lh),
            Flow::Continue
        );
        lh
    }

    fn attempt_on(lh: &FakeHost, provider: &str) -> FakeHost {
        let mut uh = FakeHost::attempt_of(lh);
        on_endpoint(&mut uh, provider);
        uh
    }

    /// The stream's local answer as the response its filters see; returns its body's length.
    fn own_reply_as_answer(h: &mut FakeHost) -> usize {
        let reply = h.reply.clone().unwrap();
        h.set_response(
            reply.status,
            &[("content-type", "application/json")],
            &reply.body,
        );
        reply.body.len()
    }

    /// No key of any provider cooling, and no failure on record.
    fn no_key_held_against(store: &FakeStore, cfg: &Config, now: u64) {
        for p in &cfg.providers {
            let h = health::read(store, p).unwrap();
            assert_eq!(h.failures, 0, "{}", p.name);
            assert!((0..p.keys.len()).all(|k| h.key_available(k, now)));
        }
    }

    #[test]
    fn a_refused_credential_stops_the_attempt_and_holds_nothing_against_the_key() {
        let cfg = config("");
        // An OpenAI client's attempt makes one header write (its key); an Anthropic client's,
        // moved to OpenAI, two (its key, then its path): the second is refused.
        for ((path, body, anthropic), nth) in CLIENTS.into_iter().zip([1, 2]) {
            let store = Rc::new(FakeStore::new());
            let lh = admitted(&store, &cfg, path, body);
            let mut uh = attempt_on(&lh, "openai");
            uh.refuse(Write::Map(Map::RequestHeaders), nth);
            let mut u = Upstream::new(cfg.clone());
            assert_eq!(u.on_request_headers(&mut uh), Flow::Stop);
            stopped(&uh, "credential", 500, anthropic);
            assert_eq!(
                uh.counter("tollgate.provider.openai.attempts"),
                0,
                "no attempt left"
            );
            // Envoy does not retry an upstream filter's own answer, nor hand it to the filter; if
            // it did, nothing of it would be held against the key or the provider.
            let len = own_reply_as_answer(&mut uh);
            u.on_response_headers(&mut uh);
            u.on_response_body(&mut uh, len, true);
            u.on_done(&mut uh);
            assert_eq!(uh.counter("tollgate.provider.openai.failures"), 0);
            no_key_held_against(&store, &cfg, uh.now);
        }
    }

    #[test]
    fn a_refused_rewrite_for_the_provider_stops_the_attempt() {
        let cfg = config("");
        let store = Rc::new(FakeStore::new());
        let lh = admitted(&store, &cfg, "/v1/chat/completions", CHAT);
        // Moved to Anthropic: the body is translated and its model mapped.
        let mut uh = attempt_on(&lh, "anthropic");
        uh.refuse(Write::Body(Body::Request), 1);
        let mut u = Upstream::new(cfg.clone());
        assert_eq!(u.on_request_headers(&mut uh), Flow::Continue);
        assert_eq!(u.on_request_body(&mut uh, CHAT.len(), true), Flow::Stop);
        stopped(&uh, "attempt_body", 500, false);
        assert_eq!(
            uh.bodies[&Body::Request],
            CHAT,
            "the client's body, not sent"
        );
    }

    #[test]
    fn an_error_quoting_the_key_whose_scrub_is_refused_never_reaches_the_client() {
        let cfg = config("");
        for (path, body, anthropic) in CLIENTS {
            let store = Rc::new(FakeStore::new());
            let lh = admitted(&store, &cfg, path, body);
            let mut uh = attempt_on(&lh, "openai");
            let mut u = Upstream::new(cfg.clone());
            assert_eq!(u.on_request_headers(&mut uh), Flow::Continue);
            let len = uh.bodies[&Body::Request].len();
            assert_eq!(u.on_request_body(&mut uh, len, true), Flow::Continue);
            uh.set_response(
                401,
                &[("content-type", "application/json")],
                ERROR_QUOTING_KEY,
            );
            assert_eq!(u.on_response_headers(&mut uh), Flow::Continue);
            uh.refuse(Write::Body(Body::Response), 1);
            assert_eq!(
                u.on_response_body(&mut uh, ERROR_QUOTING_KEY.len(), true),
                Flow::Stop,
                "the buffered body does not go on"
            );
            let answer = stopped(&uh, "scrub", 502, anthropic);
            assert!(!answer.contains("sk-openai-one"), "{answer}");
        }
    }

    #[test]
    fn a_refused_answer_header_write_stops_an_error_that_needs_scrubbing_and_only_counts_on_a_success(
    ) {
        let cfg = config("");
        let store = Rc::new(FakeStore::new());
        let lh = admitted(&store, &cfg, "/v1/chat/completions", CHAT);
        let attempt = |status: u16, body: &[u8]| {
            let mut uh = attempt_on(&lh, "openai");
            let mut u = Upstream::new(cfg.clone());
            assert_eq!(u.on_request_headers(&mut uh), Flow::Continue);
            uh.set_response(
                status,
                &[
                    ("content-type", "application/json"),
                    ("content-length", &body.len().to_string()),
                ],
                body,
            );
            uh.refuse(Write::Map(Map::ResponseHeaders), 0);
            let flow = u.on_response_headers(&mut uh);
            (flow, u.on_response_body(&mut uh, body.len(), true), uh)
        };
        // The error's content-length could not go: its scrubbed body could not be passed on.
        let (flow, _, uh) = attempt(401, ERROR_QUOTING_KEY);
        assert_eq!(flow, Flow::Stop);
        let answer = stopped(&uh, "scrub", 502, false);
        assert!(!answer.contains("sk-openai-one"), "{answer}");
        // A success goes on without tollgate's headers (the usage is still charged to the
        // consumer): counted.
        let completion = fixture("openai_chat.json");
        let (flow, body_flow, uh) = attempt(200, &completion);
        assert_eq!((flow, body_flow), (Flow::Continue, Flow::Continue));
        assert!(uh.reply.is_none());
        assert_eq!(uh.counter("tollgate.write.answer_headers.refused"), 1);
    }

    #[test]
    fn a_refused_removal_of_the_clients_credential_stops_the_request() {
        let cfg = config("");
        for (path, body, anthropic) in CLIENTS {
            let store = Rc::new(FakeStore::new());
            let mut lh = client(&store, path, &[("x-api-key", TEAM_A_KEY.as_bytes())], body);
            lh.refuse(Write::Map(Map::RequestHeaders), 0);
            let mut l = Listener::new(cfg.clone());
            assert_eq!(send(&mut l, &mut lh), Flow::Stop);
            let answer = stopped(&lh, "client_credential", 500, anthropic);
            assert!(!answer.contains(TEAM_A_KEY));
            assert!(
                !lh.filter_state.contains_key(plan::FILTER_STATE),
                "no plan: nothing for an attempt to carry"
            );
            // Envoy runs a local reply through every encoder filter, the one that sent it too:
            // charged once, as a request no provider answered.
            let len = own_reply_as_answer(&mut lh);
            assert_eq!(l.on_response_headers(&mut lh, false), Flow::Continue);
            l.on_response_body(&mut lh, len, true);
            l.on_log(&mut lh);
            lh.tick();
            let (row, _) =
                crate::store::SharedStore::get(store.as_ref(), "tollgate:u:c:team-a").unwrap();
            let usage = crate::store::decode_u64s::<{ crate::host::tally::ROW }>(row.as_deref());
            assert_eq!(usage[..3], [1, 0, 0]);
        }
    }

    #[test]
    fn a_refused_plan_or_consumer_for_the_attempts_stops_the_request() {
        let cfg = config("");
        for (state, place) in [
            (plan::FILTER_STATE, "plan"),
            (super::super::listener::CONSUMER, "consumer"),
        ] {
            for (path, body, anthropic) in CLIENTS {
                let store = Rc::new(FakeStore::new());
                let mut lh = client(&store, path, &[("x-api-key", TEAM_A_KEY.as_bytes())], body);
                lh.refuse(Write::FilterState(state.to_string()), 1);
                assert_eq!(send(&mut Listener::new(cfg.clone()), &mut lh), Flow::Stop);
                stopped(&lh, place, 500, anthropic);
            }
        }
    }

    #[test]
    fn a_refused_lowering_of_max_tokens_stops_the_request_and_a_refused_usage_request_does_not() {
        let cfg = config(r#","lower_max_tokens":true"#);
        let store = Rc::new(FakeStore::new());
        let greedy =
            br#"{"model":"gpt-4o-mini","max_tokens":10000000,"messages":[{"role":"user","content":"x"}]}"#;
        let mut lh = client(
            &store,
            "/v1/chat/completions",
            &[("x-api-key", TEAM_A_KEY.as_bytes())],
            greedy,
        );
        lh.refuse(Write::Body(Body::Request), 1);
        assert_eq!(send(&mut Listener::new(cfg.clone()), &mut lh), Flow::Stop);
        stopped(&lh, "budget", 500, false);
        // Asking a stream for its usage is no promise to anyone: refused, the usage is estimated.
        let store = Rc::new(FakeStore::new());
        let mut lh = client(
            &store,
            "/v1/chat/completions",
            &[("x-api-key", TEAM_A_KEY.as_bytes())],
            CHAT_STREAM,
        );
        lh.refuse(Write::Body(Body::Request), 1);
        assert_eq!(send(&mut Listener::new(cfg), &mut lh), Flow::Continue);
        assert_eq!(lh.counter("tollgate.write.budget.refused"), 0);
        let plan = Plan::decode(&lh.filter_state[plan::FILTER_STATE])
            .unwrap()
            .rewritten;
        assert!(!plan);
    }

    #[test]
    fn a_refused_token_total_for_envoys_rate_limit_filter_is_counted_and_the_usage_still_charged() {
        let cfg = config("");
        let store = Rc::new(FakeStore::new());
        let mut lh = client(
            &store,
            "/v1/chat/completions",
            &[("x-api-key", TEAM_A_KEY.as_bytes())],
            CHAT,
        );
        let mut l = Listener::new(cfg.clone());
        assert_eq!(send(&mut l, &mut lh), Flow::Continue);
        let completion = fixture("openai_chat.json");
        let (_, uh) = attempt(
            &lh,
            "openai",
            1,
            200,
            &[("content-type", "application/json")],
            &completion,
            &cfg,
        );
        lh.refuse(Write::FilterState("tollgate_total_tokens".into()), 1);
        answer(&mut l, &mut lh, &uh, &[&completion]);
        assert_eq!(lh.counter("tollgate.write.total_tokens.refused"), 1);
        assert!(lh.reply.is_none());
        assert!(logged(&lh, "in").is_some_and(|v| v != "-"), "charged");
    }
}

#[test]
fn a_trimmed_conversation_is_what_every_attempt_translates_and_the_answer_says_how_many_went() {
    let cfg = config(r#","models":{"gpt-4o-mini":{"context_window":600,"trim_oldest":true}}"#);
    let store = Rc::new(FakeStore::new());
    let mut messages = vec![serde_json::json!({"role": "system", "content": "Be terse."})];
    for i in 0..12 {
        messages.push(serde_json::json!({"role": "user", "content": format!("question {i} {}", "word ".repeat(30))}));
        messages.push(serde_json::json!({"role": "assistant", "content": format!("answer {i} {}", "word ".repeat(30))}));
    }
    messages.extend([
        serde_json::json!({"role": "user", "content": "weather in Paris?"}),
        serde_json::json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}),
        serde_json::json!({"role": "tool", "tool_call_id": "call_1", "content": "18C"}),
    ]);
    let body = serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 50, "messages": messages})
        .to_string();
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("authorization", &bearer(TEAM_A_KEY))],
        body.as_bytes(),
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    let sent = json(&lh.bodies[&Body::Request]);
    let kept = sent["messages"].as_array().unwrap();
    let dropped = messages.len() - kept.len();
    assert!(dropped >= 2 && dropped.is_multiple_of(2), "{dropped}");
    assert_eq!(kept[0]["content"], "Be terse.");
    assert_eq!(kept[1]["role"], "user");
    assert_eq!(kept[kept.len() - 3..], messages[messages.len() - 3..]);
    assert!(
        Plan::decode(lh.filter_state.get(plan::FILTER_STATE).unwrap())
            .unwrap()
            .rewritten
    );

    // The first attempt is refused; the second, on Anthropic, translates the trimmed body.
    let (_, first) = attempt(&lh, "openai", 1, 429, &[("retry-after", "30")], b"{}", &cfg);
    assert_eq!(
        json(&first.bodies[&Body::Request])["messages"],
        sent["messages"]
    );
    let message = fixture("anthropic_message.json");
    let (_, uh) = attempt(
        &lh,
        "anthropic",
        2,
        200,
        &[("content-type", "application/json")],
        &message,
        &cfg,
    );
    let translated = json(&uh.bodies[&Body::Request]);
    let turns = translated["messages"].as_array().unwrap();
    assert_eq!(translated["system"], "Be terse.", "{translated}");
    assert_eq!(turns.len(), kept.len() - 1);
    assert_eq!(turns[0]["role"], "user");
    assert_eq!(turns[turns.len() - 2]["content"][0]["type"], "tool_use");
    assert_eq!(
        turns[turns.len() - 1]["content"][0]["tool_use_id"],
        "call_1"
    );

    answer(&mut l, &mut lh, &uh, &[&message]);
    assert_eq!(
        lh.get(Map::ResponseHeaders, "x-tollgate-trimmed-messages"),
        Some(dropped.to_string())
    );
    assert_eq!(
        lh.counter("tollgate.context.trimmed_messages"),
        dropped as u64
    );
}

/// `gpt-4o` is served by openai only (see [`config`]): a retry Envoy moves to anthropic.
const GPT_4O: &[u8] = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}"#;

/// The request's second attempt, on anthropic, after `first`: its flow and host.
fn onto_anthropic(lh: &FakeHost, first: &FakeHost, cfg: &Rc<Config>) -> (Flow, FakeHost) {
    let mut h = FakeHost::next_attempt(lh, first);
    on_endpoint(&mut h, "anthropic");
    let mut u = Upstream::new(cfg.clone());
    (u.on_request_headers(&mut h), h)
}

#[test]
fn a_retry_onto_a_provider_without_the_model_is_answered_with_what_the_last_attempt_meant() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let gpt_4o = |store: &Rc<FakeStore>| {
        let mut lh = client(
            store,
            "/v1/chat/completions",
            &[("x-api-key", TEAM_A_KEY.as_bytes())],
            GPT_4O,
        );
        let mut l = Listener::new(cfg.clone());
        assert_eq!(send(&mut l, &mut lh), Flow::Continue);
        lh
    };
    let lh = gpt_4o(&store);
    let (_, first) = attempt(&lh, "openai", 1, 429, &[("retry-after", "30")], b"{}", &cfg);
    let (flow, second) = onto_anthropic(&lh, &first, &cfg);
    assert_eq!(flow, Flow::Stop, "anthropic is not called");
    let r = second.reply.clone().unwrap();
    assert_eq!(
        (r.status, r.header("retry-after")),
        (429, Some("1")),
        "oa-2 can take it now"
    );
    assert_eq!(r.header("x-tollgate-exhausted"), Some("true"));
    let e = &r.json()["error"];
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("requests"), Some("provider_keys_exhausted"))
    );
    assert!(
        e["message"].as_str().unwrap().starts_with(
            "The model 'gpt-4o' is not served by provider 'anthropic', next in the failover order, after an attempt that was rate limited (429)."
        ),
        "{e}"
    );
    assert_eq!(
        second.get(Map::RequestHeaders, "x-api-key"),
        None,
        "no anthropic key was set"
    );
    assert_eq!(second.counter("tollgate.provider.anthropic.attempts"), 0);
    assert_eq!(
        second.counter("tollgate.provider.anthropic.not_served_attempts"),
        1
    );
    // Once oa-2 is throttled too, the client is told when the first of them is back.
    let lh = gpt_4o(&store);
    let (_, first) = attempt(&lh, "openai", 1, 429, &[("retry-after", "20")], b"{}", &cfg);
    let (_, second) = onto_anthropic(&lh, &first, &cfg);
    assert_eq!(second.reply.unwrap().header("retry-after"), Some("20"));

    // After a 503 (which rests oa-1 for a second): a 503 of the same class, in the client's shape.
    let store = Rc::new(FakeStore::new());
    let lh = gpt_4o(&store);
    let (_, first) = attempt(&lh, "openai", 1, 503, &[], b"{}", &cfg);
    let h = crate::failover::health::read(store.as_ref(), &cfg.providers[0]).unwrap();
    assert_eq!(
        h.key_state(0, lh.now),
        (
            crate::failover::health::CooldownReason::ServerError,
            lh.now + 1_000
        )
    );
    let (_, second) = onto_anthropic(&lh, &first, &cfg);
    let r = second.reply.unwrap();
    assert_eq!((r.status, r.header("retry-after")), (503, Some("1")));
    assert_eq!(r.json()["error"]["code"], "provider_unavailable");
}

#[test]
fn an_alias_is_not_served_where_its_table_names_no_model() {
    let cfg = config(r#","aliases":{"smart":{"openai":"gpt-4o"},"fast":"gpt-4o-mini"}"#);
    let store = Rc::new(FakeStore::new());
    for (alias, served) in [("smart", false), ("fast", true)] {
        let body = format!(r#"{{"model":"{alias}","messages":[{{"role":"user","content":"x"}}]}}"#);
        let mut lh = client(
            &store,
            "/v1/chat/completions",
            &[("x-api-key", TEAM_A_KEY.as_bytes())],
            body.as_bytes(),
        );
        let mut l = Listener::new(cfg.clone());
        assert_eq!(send(&mut l, &mut lh), Flow::Continue);
        let (_, first) = attempt(&lh, "openai", 1, 503, &[], b"{}", &cfg);
        let (flow, second) = onto_anthropic(&lh, &first, &cfg);
        assert_eq!(flow == Flow::Continue, served, "{alias}");
        assert_eq!(second.reply.is_none(), served, "{alias}");
    }
}

#[test]
fn a_direct_caller_without_a_listener_still_gets_400_for_a_model_the_provider_lacks() {
    let cfg = config("");
    let store = Rc::new(FakeStore::new());
    let mut h = client(&store, "/v1/chat/completions", &[], GPT_4O);
    on_endpoint(&mut h, "anthropic");
    let mut u = Upstream::new(cfg.clone());
    assert_eq!(u.on_request_headers(&mut h), Flow::Continue);
    assert_eq!(u.on_request_body(&mut h, GPT_4O.len(), true), Flow::Stop);
    let r = h.reply.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error"]["message"],
        "The model 'gpt-4o' is not served by provider 'anthropic'."
    );
}

/// An attempt begun (key chosen, health read) for the request `lh` carried, not answered yet.
fn begun(lh: &FakeHost, cfg: &Rc<Config>) -> (Upstream, FakeHost) {
    let mut u = Upstream::new(cfg.clone());
    let mut h = FakeHost::attempt_of(lh);
    on_endpoint(&mut h, "openai");
    assert_eq!(u.on_request_headers(&mut h), Flow::Continue);
    (u, h)
}

/// The begun attempt answered: 503 for `sk-3`, 429 (`retry-after-ms: 300`) for `sk-2`, 200 else.
fn finish(u: &mut Upstream, h: &mut FakeHost) -> u16 {
    let status = match secret_seen(h).as_str() {
        "sk-3" => 503,
        "sk-2" => 429,
        _ => 200,
    };
    let headers: &[(&str, &str)] = if status == 429 {
        &[("retry-after-ms", "300")]
    } else {
        &[]
    };
    h.set_response(status, headers, b"{}");
    u.on_response_headers(h);
    u.on_response_body(h, 2, true);
    status
}

#[test]
fn a_key_failing_beside_healthy_ones_rests_and_the_circuit_stays_closed() {
    // One worker, three keys: sk-1 answers, sk-2 is throttled, sk-3 fails. Requests in flight
    // together all began on a clean circuit; their answers come back failures first, as a fast
    // 503 beats a completion.
    let cfg = pool_config(3, "");
    let store = Rc::new(FakeStore::new());
    let tickets: Rc<core::cell::RefCell<crate::pool::keypool::Tickets>> = Rc::default();
    for round in 0..3 {
        let mut in_flight = Vec::new();
        for _ in 0..12 {
            let mut lh = client(&store, "/v1/chat/completions", &[], CHAT);
            lh.tickets = tickets.clone();
            lh.now += round * 2_000;
            let mut l = Listener::new(cfg.clone());
            assert_eq!(
                send(&mut l, &mut lh),
                Flow::Continue,
                "round {round}: admitted"
            );
            in_flight.push(begun(&lh, &cfg));
        }
        in_flight.sort_by_key(|(_, h)| core::cmp::Reverse(secret_seen(h)));
        let answers: Vec<u16> = in_flight.iter_mut().map(|(u, h)| finish(u, h)).collect();
        assert_eq!(
            answers.iter().filter(|&&s| s == 503).count(),
            4,
            "{answers:?}"
        );
        let h = crate::failover::health::read(store.as_ref(), &cfg.providers[0]).unwrap();
        let now = FakeHost::new(store.clone()).now + round * 2_000;
        assert_eq!(
            h.circuit(&cfg.health, now),
            crate::failover::health::Circuit::Closed
        );
        // The 503s of attempts in flight together are one step; sk-1's answers end the runs their
        // attempts saw.
        assert!(h.failures <= 1, "round {round}: {}", h.failures);
        assert!(h.key_available(0, now) && h.blocked(&cfg.health, now).is_none());
        assert_eq!(
            h.key_state(2, now).0,
            crate::failover::health::CooldownReason::ServerError
        );
        let st = status_json(&store, &cfg)["providers"]["openai"].clone();
        assert_eq!(
            (st["circuit"].as_str(), st["blocked_by"].as_str()),
            (Some("closed"), None)
        );
        assert_eq!(st["keys"][2]["state"], "server_error");
    }
}

#[test]
fn a_success_whose_attempt_saw_no_failure_touches_no_shared_data() {
    let cfg = pool_config(1, "");
    let store = Rc::new(FakeStore::new());
    let lh = client(&store, "/v1/chat/completions", &[], CHAT);
    let (mut u, mut h) = begun(&lh, &cfg);
    store.calls.set(0);
    finish(&mut u, &mut h);
    assert_eq!(store.calls.get(), 0);
}

#[test]
fn an_exhausted_request_is_told_what_blocks_it_and_until_when() {
    use crate::failover::health::{self, CooldownReason};
    let cfg = pool_config(2, "");
    let p = &cfg.providers[0];
    let refusal = |store: &Rc<FakeStore>| {
        let mut lh = client(store, "/v1/chat/completions", &[], CHAT);
        let mut l = Listener::new(cfg.clone());
        assert_eq!(send(&mut l, &mut lh), Flow::Stop);
        let r = lh.reply.unwrap();
        let e = r.json()["error"].clone();
        (
            r.status,
            // The recovery as the message says it; the header spreads it (limit::spread).
            r.header("retry-after").map(|v| {
                let secs = e["message"].as_str().and_then(|m| {
                    m.rsplit("try again in ")
                        .next()?
                        .split('s')
                        .next()?
                        .parse::<u64>()
                        .ok()
                });
                assert_spread(Some(v), secs.unwrap_or(0));
                secs.unwrap_or(0).to_string()
            }),
            e["type"].clone(),
            e["code"].clone(),
        )
    };
    let now = FakeHost::new(Rc::new(FakeStore::new())).now;
    // Both keys throttled by the provider: a 429 naming the first key back.
    let store = Rc::new(FakeStore::new());
    health::cool_key(
        store.as_ref(),
        p,
        0,
        now + 12_000,
        CooldownReason::RateLimited,
    )
    .unwrap();
    health::cool_key(
        store.as_ref(),
        p,
        1,
        now + 7_000,
        CooldownReason::RateLimited,
    )
    .unwrap();
    assert_eq!(
        refusal(&store),
        (
            429,
            Some("7".into()),
            "requests".into(),
            "provider_keys_exhausted".into()
        )
    );
    // Both keys resting after 5xx: a 503, not the client's rate limit.
    let store = Rc::new(FakeStore::new());
    for k in 0..2 {
        let seen = health::read(store.as_ref(), p).unwrap().seen();
        health::failed(
            store.as_ref(),
            p,
            &cfg.health,
            seen,
            now,
            Some((k, now + 2_000)),
        )
        .unwrap();
    }
    assert_eq!(
        refusal(&store),
        (
            503,
            Some("2".into()),
            "server_error".into(),
            "provider_unavailable".into()
        )
    );
    // An open circuit (five failures in a row): a 503 saying so, until it half-opens.
    let store = Rc::new(FakeStore::new());
    for _ in 0..5 {
        let seen = health::read(store.as_ref(), p).unwrap().seen();
        health::failed(store.as_ref(), p, &cfg.health, seen, now - 10_000, None).unwrap();
    }
    assert_eq!(
        refusal(&store),
        (
            503,
            Some("20".into()),
            "server_error".into(),
            "provider_circuit_open".into()
        )
    );
    let st = status_json(&store, &cfg)["providers"]["openai"].clone();
    assert_eq!(
        (st["circuit"].as_str(), st["blocked_by"].as_str()),
        (Some("open"), Some("circuit_open"))
    );
    assert_eq!(st["blocked_until_ms"], now + 20_000);
}

#[test]
fn consumers_named_by_a_trusted_header_are_bounded_and_shown_in_the_status_endpoint() {
    let cfg = Rc::new(
        parse(
            br#"{"consumers":{"trusted_header":"x-team","max_from_header":3},
                 "default_limits":[{"metric":"requests","amount":1000,"window":"1m"}],
                 "providers":[{"name":"openai","type":"openai","keys":[{"id":"k1","env":"S"}]}],
                 "status":{"path":"/st","admin_key_env":"ADMIN"}}"#,
            &|name| Some(if name == "ADMIN" { "admin" } else { "sk" }.to_string()),
        )
        .unwrap(),
    );
    let store = Rc::new(FakeStore::new());
    let completion = fixture("openai_chat.json");
    let mut series = std::collections::BTreeSet::new();
    let mut charged_as = Vec::new();
    // Eight names, two requests each: the first three are consumers of their own.
    for round in 0..2 {
        for i in 0..8 {
            let team = format!("team-{i}");
            let mut lh = client(
                &store,
                "/v1/chat/completions",
                &[("x-team", team.as_bytes())],
                CHAT,
            );
            let mut l = Listener::new(cfg.clone());
            assert_eq!(send(&mut l, &mut lh), Flow::Continue, "{team}");
            let (_, uh) = attempt(
                &lh,
                "openai",
                1,
                200,
                &[("content-type", "application/json")],
                &completion,
                &cfg,
            );
            assert_eq!(uh.get(Map::RequestHeaders, "x-team"), None);
            answer(&mut l, &mut lh, &uh, &[&completion]);
            series.extend(
                lh.counters
                    .keys()
                    .filter(|k| k.starts_with("tollgate.consumer."))
                    .cloned(),
            );
            if round == 0 {
                charged_as.push(logged(&lh, "consumer").unwrap_or_default());
            }
            lh.tick();
        }
    }
    assert_eq!(
        charged_as,
        [
            "team-0",
            "team-1",
            "team-2",
            "_overflow",
            "_overflow",
            "_overflow",
            "_overflow",
            "_overflow"
        ]
    );
    let consumers: std::collections::BTreeSet<&str> = series
        .iter()
        .filter_map(|s| {
            s.strip_prefix("tollgate.consumer.")?
                .split(".model.")
                .next()
        })
        .collect();
    assert_eq!(
        consumers.into_iter().collect::<Vec<_>>(),
        ["_overflow", "team-0", "team-1", "team-2"],
        "{series:?}"
    );
    // A header that says the reserved name is the overflow as well: it takes no place.
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("x-team", b"_overflow")],
        CHAT,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    assert_eq!(
        lh.state(super::listener::CONSUMER).as_deref(),
        Some("_overflow")
    );

    let st = status_json(&store, &cfg);
    let shown: Vec<(&str, u64)> = st["consumers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str(), v["usage"]["requests"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        shown,
        [
            ("_overflow", 10),
            ("team-0", 2),
            ("team-1", 2),
            ("team-2", 2)
        ]
    );
    assert_eq!(
        st["consumers"]["team-1"]["limits"][0]["remaining"], 998,
        "budgets like any other consumer's"
    );
    // A consumer past the bound sees the overflow's standing as its own.
    let mut h = client(&store, "/st", &[("x-team", b"team-7")], b"");
    let mut l = Listener::new(cfg.clone());
    assert_eq!(l.on_request_headers(&mut h, true), Flow::Stop);
    let own = h.reply.unwrap().json();
    assert_eq!(own["consumer"], "_overflow");
    assert_eq!(own["standing"]["usage"]["requests"], 10);
}

mod cache;
mod waiting;
