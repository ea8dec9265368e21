//! The response cache through whole requests: a miss goes to the provider and its answer is
//! stored; the same question again is answered by the listener role, counted as one request and
//! no tokens; an expired entry answers only when no provider can.

use super::*;

const CACHE: &str = r#","cache":{"ttl":"1m","stale_window":"1h"}"#;
const ASKED: &[u8] = br#"{"model":"gpt-4o-mini","temperature":0,"messages":[{"role":"user","content":"Say hello"}]}"#;
const ASKED_STREAM: &[u8] = br#"{"model":"gpt-4o-mini","temperature":0,"stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#;

fn team_a(store: &Rc<FakeStore>, path: &str, body: &[u8], extra: &[(&str, &[u8])]) -> FakeHost {
    let mut headers: Vec<(&str, &[u8])> = vec![("x-api-key", TEAM_A_KEY.as_bytes())];
    headers.extend_from_slice(extra);
    client(store, path, &headers, body)
}

/// A request sent on to `provider`, whose attempt was answered `status` with `body`: the listener
/// and the attempt's host.
fn attempted(
    cfg: &Rc<Config>,
    lh: &mut FakeHost,
    provider: &str,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> (Listener, FakeHost) {
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, lh), Flow::Continue, "went to the provider");
    let (_, uh) = attempt(
        lh,
        provider,
        1,
        status,
        &[("content-type", content_type)],
        body,
        cfg,
    );
    (l, uh)
}

/// A request that went to `provider` and was answered with `body`, in two chunks: what the client
/// got (and its headers, in the listener's host).
fn through(
    cfg: &Rc<Config>,
    lh: &mut FakeHost,
    provider: &str,
    content_type: &str,
    body: &[u8],
) -> Vec<u8> {
    let (mut l, uh) = attempted(cfg, lh, provider, 200, content_type, body);
    let half = body.len() / 2;
    answer(&mut l, lh, &uh, &[&body[..half], &body[half..]])
}

const SERVER_ERROR: &[u8] = br#"{"error":{"message":"boom","type":"server_error"}}"#;

/// A request answered by the listener role itself, before any attempt: its reply.
fn stopped(cfg: &Rc<Config>, lh: &mut FakeHost) -> crate::host::fake::Reply {
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, lh), Flow::Stop, "answered locally");
    assert!(
        !lh.filter_state.contains_key(plan::FILTER_STATE),
        "no attempt planned"
    );
    l.on_log(lh);
    lh.reply.clone().unwrap()
}

/// [`stopped`], with a 200.
fn served(cfg: &Rc<Config>, lh: &mut FakeHost) -> crate::host::fake::Reply {
    let r = stopped(cfg, lh);
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    r
}

#[test]
fn the_same_question_is_answered_once_and_then_from_the_cache() {
    let cfg = config(CACHE);
    let store = Rc::new(FakeStore::new());
    let completion = fixture("openai_chat.json");
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
    let out = through(&cfg, &mut lh, "openai", "application/json", &completion);
    assert_eq!(out, completion);
    assert_eq!(
        lh.get(Map::ResponseHeaders, "x-tollgate-cache").as_deref(),
        Some("miss")
    );
    assert_eq!(logged(&lh, "cache").as_deref(), Some("miss"));
    assert_eq!(lh.counter("tollgate.cache.stores"), 1);

    let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
    lh.now += 5_000;
    let r = served(&cfg, &mut lh);
    assert_eq!((r.status, r.body.as_slice()), (200, completion.as_slice()));
    assert_eq!(r.header("x-tollgate-cache"), Some("hit"));
    assert_eq!(r.header("age"), Some("5"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    // The first request's is refilled in the 5 s between: 99 says this one was counted.
    assert_eq!(
        r.header("x-ratelimit-remaining-requests"),
        Some("99"),
        "a request all the same"
    );
    assert_eq!(logged(&lh, "cache").as_deref(), Some("hit"));
    assert_eq!(logged(&lh, "age").as_deref(), Some("5"));
    assert_eq!(logged(&lh, "in").as_deref(), Some("0"));
    assert_eq!(lh.counter("tollgate.outcome.cache_hit.requests"), 1);
    assert_eq!(lh.counter("tollgate.cache.saved_tokens_in"), 24);
    assert_eq!(lh.counter("tollgate.cache.saved_tokens_out"), 8);
    assert_eq!(
        lh.counter("tollgate.consumer.team-a.model.gpt-4o-mini.tokens_in"),
        0
    );
    assert_eq!(
        lh.counter("tollgate.consumer.team-a.model.gpt-4o-mini.requests"),
        1
    );
    lh.tick();
    let st = status_json_of(&store);
    let team = &st["consumers"]["team-a"];
    assert_eq!(team["cache_saved"]["answers"], 1);
    assert_eq!(team["cache_saved"]["input_tokens"], 24);
    assert_eq!(team["cache_saved"]["output_tokens"], 8);
    assert_eq!(
        team["usage"]["requests"], 1,
        "this host's tick holds the hit only"
    );
    assert_eq!(team["usage"]["input_tokens"], 0);
}

/// The status endpoint as the admin sees it, under a configuration with a cache.
fn status_json_of(store: &Rc<FakeStore>) -> Value {
    let json = r#"{"consumers":{"list":[{"name":"team-a","key_env":"TEAM_A"}]},
            "providers":[{"name":"openai","type":"openai","keys":[{"id":"oa-1","env":"OA1"}]}],
            "status":{"path":"/st","admin_key_env":"ADMIN"},"cache":{}}"#;
    let env = |name: &str| Some(if name == "ADMIN" { "admin" } else { "x" }.to_string());
    status_json(store, &Rc::new(parse(json.as_bytes(), &env).unwrap()))
}

#[test]
fn a_stream_is_stored_as_json_and_a_json_answer_replays_as_a_stream() {
    let cfg = config(CACHE);
    let store = Rc::new(FakeStore::new());
    let stream = fixture("openai_stream.sse");
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED_STREAM, &[]);
    let streamed = String::from_utf8(through(
        &cfg,
        &mut lh,
        "openai",
        "text/event-stream",
        &stream,
    ))
    .unwrap();
    assert!(
        !streamed.contains("\"usage\":{"),
        "the usage tollgate asked for is withheld"
    );
    assert_eq!(lh.counter("tollgate.cache.stores"), 1);
    let text: String = crate::count::sse::SseParser::new(1 << 20).pipe_text(&stream);

    // The JSON request gets the assembled completion.
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
    let r = served(&cfg, &mut lh);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(v["usage"]["completion_tokens"], 9);

    // The streaming request replays it, without usage as the client did not ask for it.
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED_STREAM, &[]);
    let r = served(&cfg, &mut lh);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let body = String::from_utf8(r.body).unwrap();
    assert!(
        body.ends_with("data: [DONE]\n\n") && !body.contains("usage"),
        "{body}"
    );
}

/// The text of an OpenAI stream's content deltas, joined.
trait PipeText {
    fn pipe_text(self, stream: &[u8]) -> String;
}

impl PipeText for crate::count::sse::SseParser {
    fn pipe_text(mut self, stream: &[u8]) -> String {
        let mut text = String::new();
        self.feed(stream, |ev| {
            if let Ok(v) = serde_json::from_str::<Value>(ev.data) {
                if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                    text.push_str(t);
                }
            }
        });
        text
    }
}

#[test]
fn an_answer_translated_from_another_provider_is_stored_in_the_clients_dialect() {
    let cfg = config(CACHE);
    let store = Rc::new(FakeStore::new());
    let body =
        br#"{"model":"claude-only","temperature":0,"messages":[{"role":"user","content":"x"}]}"#;
    let message = fixture("anthropic_message.json");
    let mut lh = team_a(&store, "/v1/chat/completions", body, &[]);
    let out = through(&cfg, &mut lh, "anthropic", "application/json", &message);
    assert_eq!(json(&out)["object"], "chat.completion");
    let mut lh = team_a(&store, "/v1/chat/completions", body, &[]);
    let r = served(&cfg, &mut lh);
    assert_eq!(r.body, out, "the same answer as the client got");
}

#[test]
fn errors_cut_streams_and_refusals_are_not_stored() {
    let cfg = config(CACHE);
    let store = Rc::new(FakeStore::new());
    // An error.
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
    let (mut l, uh) = attempted(
        &cfg,
        &mut lh,
        "openai",
        500,
        "application/json",
        SERVER_ERROR,
    );
    answer(&mut l, &mut lh, &uh, &[SERVER_ERROR]);
    // A stream cut before [DONE].
    let stream = fixture("openai_stream.sse");
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED_STREAM, &[]);
    through(
        &cfg,
        &mut lh,
        "openai",
        "text/event-stream",
        &stream[..stream.len() - 20],
    );
    assert_eq!(lh.counter("tollgate.cache.not_stored"), 1);
    // A refusal.
    let refusal = br#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":null,"refusal":"I can't help with that."},"finish_reason":"stop"}]}"#;
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
    through(&cfg, &mut lh, "openai", "application/json", refusal);
    assert_eq!(lh.counter("tollgate.cache.not_stored"), 1);
    // Still a miss.
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
}

#[test]
fn no_store_skips_the_store_and_no_cache_the_lookup() {
    let cfg = config(CACHE);
    let store = Rc::new(FakeStore::new());
    let completion = fixture("openai_chat.json");
    let mut lh = team_a(
        &store,
        "/v1/chat/completions",
        ASKED,
        &[("cache-control", b"no-store")],
    );
    through(&cfg, &mut lh, "openai", "application/json", &completion);
    assert_eq!(lh.counter("tollgate.cache.stores"), 0);
    let mut lh = team_a(
        &store,
        "/v1/chat/completions",
        ASKED,
        &[("cache-control", b"no-cache")],
    );
    through(&cfg, &mut lh, "openai", "application/json", &completion);
    assert_eq!(
        lh.get(Map::ResponseHeaders, "x-tollgate-cache").as_deref(),
        Some("bypass")
    );
    assert_eq!(
        lh.counter("tollgate.cache.stores"),
        1,
        "stored all the same"
    );
    let mut lh = team_a(
        &store,
        "/v1/chat/completions",
        ASKED,
        &[("cache-control", b"no-cache")],
    );
    through(&cfg, &mut lh, "openai", "application/json", &completion);
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
    assert_eq!(served(&cfg, &mut lh).status, 200);
}

#[test]
fn a_hit_spends_a_request_but_no_token_budget() {
    // team-b has 50 tokens a minute and no request limit: the first answer puts it in debt.
    let cfg = config(CACHE);
    let store = Rc::new(FakeStore::new());
    let completion = fixture("openai_chat.json");
    let team_b = |body| {
        client(
            &store,
            "/v1/chat/completions",
            &[("x-api-key", b"tg-team-b")],
            body,
        )
    };
    let mut lh = team_b(ASKED);
    through(&cfg, &mut lh, "openai", "application/json", &completion);
    let mut lh = team_b(ASKED);
    assert_eq!(
        served(&cfg, &mut lh).status,
        200,
        "a hit, though the token budget is spent"
    );
    // A request that is not in the cache is refused by the spent token budget.
    let other = br#"{"model":"gpt-4o-mini","temperature":0,"messages":[{"role":"user","content":"other"}]}"#;
    let mut lh = team_b(other);
    assert_eq!(stopped(&cfg, &mut lh).status, 429);
}

#[test]
fn a_hit_is_refused_when_the_request_limit_is_spent() {
    let cfg = config(CACHE);
    let store = Rc::new(FakeStore::new());
    let completion = fixture("openai_chat.json");
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
    through(&cfg, &mut lh, "openai", "application/json", &completion);
    for _ in 1..100 {
        let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
        assert_eq!(served(&cfg, &mut lh).status, 200);
    }
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
    let r = stopped(&cfg, &mut lh);
    assert_eq!(
        (r.status, r.json()["error"]["type"].as_str()),
        (429, Some("requests"))
    );
}

fn expire(lh: &mut FakeHost) {
    lh.now += 61_000;
}

#[test]
fn an_expired_entry_answers_only_when_no_provider_can() {
    let cfg = config(CACHE);
    let store = Rc::new(FakeStore::new());
    let completion = fixture("openai_chat.json");
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
    through(&cfg, &mut lh, "openai", "application/json", &completion);
    let later = lh.now + 61_000;

    // Expired, and the provider answers: a miss, stored afresh.
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
    expire(&mut lh);
    through(&cfg, &mut lh, "openai", "application/json", &completion);
    assert_eq!(
        lh.get(Map::ResponseHeaders, "x-tollgate-cache").as_deref(),
        Some("miss")
    );

    // Expired again, and the provider fails with a 5xx: the stale entry instead.
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
    lh.now = later + 61_000;
    let (mut l, uh) = attempted(
        &cfg,
        &mut lh,
        "openai",
        503,
        "application/json",
        SERVER_ERROR,
    );
    lh.maps
        .insert(Map::ResponseHeaders, uh.maps[&Map::ResponseHeaders].clone());
    assert_eq!(l.on_response_headers(&mut lh, false), Flow::Stop);
    l.on_log(&mut lh);
    let r = lh.reply.clone().unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, completion.as_slice()));
    assert_eq!(r.header("x-tollgate-cache"), Some("stale"));
    assert_eq!(r.header("age"), Some("61"));
    assert_eq!(logged(&lh, "cache").as_deref(), Some("stale"));
    assert_eq!(lh.counter("tollgate.outcome.cache_stale.requests"), 1);
    assert_eq!(
        lh.counter("tollgate.outcome.upstream_5xx.requests"),
        0,
        "charged once"
    );

    // Expired, and every key of every provider cooling: the stale entry, without an attempt.
    for p in &cfg.providers {
        for k in 0..p.keys.len() {
            crate::failover::health::cool_key(
                store.as_ref(),
                p,
                k,
                later + 10_000_000,
                crate::failover::health::CooldownReason::RateLimited,
            )
            .unwrap();
        }
    }
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED_STREAM, &[]);
    lh.now = later + 62_000;
    let r = served(&cfg, &mut lh);
    assert_eq!(r.header("x-tollgate-cache"), Some("stale"));
    assert!(String::from_utf8(r.body)
        .unwrap()
        .ends_with("data: [DONE]\n\n"));
    // Past the stale window: the 429 every client gets today.
    let mut lh = team_a(&store, "/v1/chat/completions", ASKED, &[]);
    lh.now = later + 61_000 + 3_600_000;
    assert_eq!(stopped(&cfg, &mut lh).status, 429);
}

#[test]
fn an_anthropic_client_gets_its_own_stream_from_a_stored_message() {
    let cfg = config(CACHE);
    let store = Rc::new(FakeStore::new());
    let body = br#"{"model":"claude-only","max_tokens":50,"temperature":0,"messages":[{"role":"user","content":"x"}]}"#;
    let message = fixture("anthropic_message.json");
    let mut lh = team_a(&store, "/v1/messages", body, &[]);
    through(&cfg, &mut lh, "anthropic", "application/json", &message);
    let streaming = br#"{"model":"claude-only","max_tokens":50,"temperature":0,"stream":true,"messages":[{"role":"user","content":"x"}]}"#;
    let mut lh = team_a(&store, "/v1/messages", streaming, &[]);
    let r = served(&cfg, &mut lh);
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.starts_with("event: message_start\n"), "{text}");
    assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
}
