//! Aliases, model allow-lists, the gateway's own model list and the paths it does not count, driven
//! through whole requests on the fake host (both roles, as in [`super::tests`]).

use super::listener::Listener;
use super::plan::{self, Plan};
use super::tests::{answer, attempt, bearer, client, fixture, json, logged, send};
use super::Flow;
use crate::config::{parse, Config};
use crate::host::fake::FakeHost;
use crate::host::{Body, Map};
use crate::store::FakeStore;
use serde_json::{json, Value};
use std::rc::Rc;

fn config() -> Rc<Config> {
    let json = r#"{"aliases":{"fast":"gpt-4o-mini","smart":{"openai":"gpt-4o","anthropic":"claude-sonnet-4-5"}},
        "passthrough_paths":["/v1/messages/count_tokens","/v1/audio/*"],
        "consumers":{"list":[
          {"name":"team-a","key_env":"TEAM_A","limits":[{"metric":"requests","amount":100,"window":"1m"},
                                                    {"metric":"total_tokens","amount":1000,"window":"1m"}]},
          {"name":"team-b","key_env":"TEAM_B","models":["fast","gpt-4o-mini"]}]},
        "providers":[
          {"name":"openai","type":"openai","keys":[{"id":"oa-1","env":"OA1"}]},
          {"name":"anthropic","type":"anthropic","keys":[{"id":"an-1","env":"AN1"}],
           "models":{"gpt-4o-mini":"claude-haiku-4-5","claude-sonnet-4-5":"claude-sonnet-4-5"}}],
        "default_max_tokens":100}"#;
    let env = |name: &str| -> Option<String> {
        Some(
            match name {
                "TEAM_A" => "tg-a",
                "TEAM_B" => "tg-b",
                "OA1" => "sk-openai-one",
                "AN1" => "sk-ant-one",
                _ => return None,
            }
            .to_string(),
        )
    };
    Rc::new(parse(json.as_bytes(), &env).unwrap())
}

fn chat(model: &str) -> Vec<u8> {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"Say hello"}}]}}"#)
        .into_bytes()
}

/// A GET without a body, answered (or not) by the listener from its headers alone.
fn get(path: &str, headers: &[(&str, &[u8])]) -> (Flow, FakeHost) {
    let store = Rc::new(FakeStore::new());
    let mut h = FakeHost::new(store).with_request("GET", path, headers);
    let mut l = Listener::new(config());
    let flow = l.on_request_headers(&mut h, true);
    (flow, h)
}

fn reply_json(h: &FakeHost) -> (u16, Value) {
    let r = h.reply.as_ref().expect("answered locally");
    (r.status, r.json())
}

#[test]
fn an_alias_is_sent_as_each_providers_model_across_a_failover_and_reported_both_ways() {
    let cfg = config();
    let store = Rc::new(FakeStore::new());
    let body = chat("fast");
    let mut lh = client(
        &store,
        "/v1/chat/completions",
        &[("authorization", &bearer("tg-a"))],
        &body,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    let plan = Plan::decode(&lh.filter_state[plan::FILTER_STATE]).unwrap();
    assert_eq!(plan.model, "fast");
    assert_eq!(lh.bodies[&Body::Request], body, "the client's body goes on");

    // The first provider has no `models` map, yet it is asked for the alias's model, not "fast".
    let (_, first) = attempt(
        &lh,
        "openai",
        1,
        429,
        &[("content-type", "application/json"), ("retry-after", "30")],
        br#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#,
        &cfg,
    );
    assert_eq!(json(&first.bodies[&Body::Request])["model"], "gpt-4o-mini");
    assert_eq!(first.get(Map::RequestHeaders, "content-length"), None);
    // Envoy retries on the next priority: the Anthropic provider serves the alias as its own map
    // serves gpt-4o-mini.
    let (_, second) = attempt(
        &lh,
        "anthropic",
        2,
        200,
        &[("content-type", "application/json")],
        &fixture("anthropic_message.json"),
        &cfg,
    );
    let sent = json(&second.bodies[&Body::Request]);
    assert_eq!(
        (
            sent["model"].as_str(),
            second.get(Map::RequestHeaders, ":path").as_deref()
        ),
        (Some("claude-haiku-4-5"), Some("/v1/messages"))
    );
    let out = answer(
        &mut l,
        &mut lh,
        &second,
        &[&fixture("anthropic_message.json")],
    );
    assert_eq!(json(&out)["object"], "chat.completion");
    assert_eq!(
        json(&out)["model"],
        "fast",
        "the client sees the name it asked for"
    );
    assert_eq!(logged(&lh, "model").as_deref(), Some("fast"));
    assert_eq!(logged(&lh, "served").as_deref(), Some("claude-haiku-4-5"));
    assert_eq!(logged(&lh, "provider").as_deref(), Some("anthropic"));
    assert_eq!(
        lh.counter("tollgate.consumer.team-a.model.fast.requests"),
        1
    );
    assert_eq!(
        lh.counter("tollgate.provider.anthropic.model.fast.served.claude-haiku-4-5.requests"),
        1
    );
    assert!(
        lh.counter("tollgate.provider.anthropic.model.fast.served.claude-haiku-4-5.tokens_in") > 0
    );
}

#[test]
fn an_object_alias_is_served_only_by_the_providers_it_names_with_their_model() {
    let cfg = config();
    let store = Rc::new(FakeStore::new());
    let body = br#"{"model":"smart","max_tokens":50,"messages":[{"role":"user","content":"Hi"}]}"#;
    let mut lh = client(&store, "/v1/messages", &[("x-api-key", b"tg-a")], body);
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    let (_, oa) = attempt(
        &lh,
        "openai",
        1,
        200,
        &[("content-type", "application/json")],
        &fixture("openai_chat.json"),
        &cfg,
    );
    assert_eq!(json(&oa.bodies[&Body::Request])["model"], "gpt-4o");
    let (_, an) = attempt(
        &lh,
        "anthropic",
        2,
        200,
        &[("content-type", "application/json")],
        &fixture("anthropic_message.json"),
        &cfg,
    );
    assert_eq!(
        json(&an.bodies[&Body::Request])["model"],
        "claude-sonnet-4-5",
        "an Anthropic client's body, only renamed"
    );
}

#[test]
fn a_model_off_the_consumers_list_is_refused_403_in_its_dialect_before_any_attempt() {
    let store = Rc::new(FakeStore::new());
    for (path, body, want) in [
        (
            "/v1/chat/completions",
            chat("gpt-4o"),
            json!({"error": {"message": "Consumer 'team-b' does not have access to model 'gpt-4o'. Allowed models: fast, gpt-4o-mini.",
                             "type": "invalid_request_error", "param": null, "code": "model_not_found"}}),
        ),
        (
            "/v1/messages",
            br#"{"model":"smart","max_tokens":5,"messages":[{"role":"user","content":"Hi"}]}"#
                .to_vec(),
            json!({"type": "error", "error": {"type": "permission_error",
                   "message": "Consumer 'team-b' does not have access to model 'smart'. Allowed models: fast, gpt-4o-mini."}}),
        ),
    ] {
        let mut lh = client(&store, path, &[("authorization", &bearer("tg-b"))], &body);
        let mut l = Listener::new(config());
        assert_eq!(send(&mut l, &mut lh), Flow::Stop, "{path}");
        assert_eq!(reply_json(&lh), (403, want));
        assert!(
            !lh.filter_state.contains_key(plan::FILTER_STATE),
            "no attempt"
        );
        assert_eq!(
            logged(&lh, "model").as_deref(),
            Some(if path == "/v1/messages" {
                "smart"
            } else {
                "gpt-4o"
            })
        );
    }
    assert_eq!(
        {
            let mut lh = client(
                &store,
                "/v1/chat/completions",
                &[("authorization", &bearer("tg-b"))],
                &chat("fast"),
            );
            send(&mut Listener::new(config()), &mut lh)
        },
        Flow::Continue,
        "an alias on the list"
    );
}

#[test]
fn the_model_list_is_the_consumers_own_in_the_dialect_of_the_sdk_that_asked() {
    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (flow, h) = get("/v1/models", &[("authorization", &bearer("tg-a"))]);
    assert_eq!(flow, Flow::Stop);
    let (status, v) = reply_json(&h);
    assert_eq!(status, 200);
    assert_eq!(v["object"], "list");
    assert_eq!(
        ids(&v),
        ["claude-sonnet-4-5", "gpt-4o-mini", "fast", "smart"]
    );
    assert_eq!(
        v["data"][2],
        json!({"id": "fast", "object": "model", "created": 0, "owned_by": "openai"})
    );
    assert!(
        !h.filter_state.contains_key(plan::FILTER_STATE),
        "no provider called"
    );
    assert_eq!(h.counter("tollgate.outcome.model_list.requests"), 1);

    let anthropic_sdk: [(&str, &[u8]); 2] =
        [("x-api-key", b"tg-b"), ("anthropic-version", b"2023-06-01")];
    let (_, h) = get("/v1/models?limit=1", &anthropic_sdk);
    let (status, v) = reply_json(&h);
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({"data": [{"type": "model", "id": "gpt-4o-mini", "display_name": "gpt-4o-mini", "created_at": "1970-01-01T00:00:00Z"}],
               "has_more": true, "first_id": "gpt-4o-mini", "last_id": "gpt-4o-mini"})
    );
    let (_, h) = get("/v1/models", &anthropic_sdk);
    assert_eq!(ids(&reply_json(&h).1), ["gpt-4o-mini", "fast"]);

    let (_, h) = get("/v1/models/fast", &anthropic_sdk);
    assert_eq!(reply_json(&h).1["id"], "fast");
    let (_, h) = get("/v1/models/smart", &anthropic_sdk);
    assert_eq!(
        reply_json(&h),
        (
            404,
            json!({"type": "error", "error": {"type": "not_found_error",
                   "message": "The model 'smart' does not exist or you do not have access to it."}})
        )
    );
    let (_, h) = get("/v1/models/smart", &[("authorization", &bearer("tg-a"))]);
    assert_eq!(reply_json(&h).1["owned_by"], "openai");
    let (_, h) = get("/v1/models/nope", &[("authorization", &bearer("tg-a"))]);
    assert_eq!(
        reply_json(&h),
        (
            404,
            json!({"error": {"message": "The model 'nope' does not exist or you do not have access to it.",
                             "type": "invalid_request_error", "param": "model", "code": "model_not_found"}})
        )
    );
    // Authenticated as any request, and refused in the asking SDK's shape.
    let (_, h) = get("/v1/models", &[("anthropic-version", b"2023-06-01")]);
    let (status, v) = reply_json(&h);
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (401, Some("authentication_error"))
    );
    assert_eq!(h.counter("tollgate.outcome.model_list.requests"), 0);
}

#[test]
fn paths_tollgate_does_not_count_are_refused_404_unless_passed_through() {
    let store = Rc::new(FakeStore::new());
    for (path, shape) in [
        ("/v1/images/generations", "openai"),
        ("/v1/files", "openai"),
        ("/v1/messages/batches", "anthropic"),
    ] {
        let mut lh = client(&store, path, &[("authorization", &bearer("tg-a"))], b"{}");
        let mut l = Listener::new(config());
        assert_eq!(send(&mut l, &mut lh), Flow::Stop);
        let (status, v) = reply_json(&lh);
        assert_eq!(status, 404, "{path}");
        let message = if shape == "openai" {
            assert_eq!(v["error"]["type"], "invalid_request_error");
            v["error"]["message"].as_str().unwrap().to_string()
        } else {
            assert_eq!(v["error"]["type"], "not_found_error");
            v["error"]["message"].as_str().unwrap().to_string()
        };
        assert!(
            message.starts_with(&format!("Invalid URL (POST {path})")),
            "{message}"
        );
        assert_eq!(lh.counter("tollgate.outcome.rejected_path.requests"), 1);
    }
}

#[test]
fn a_passed_through_path_goes_as_it_is_to_a_provider_of_its_api_counted_as_one_request() {
    let cfg = config();
    let store = Rc::new(FakeStore::new());
    let body = br#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"How many tokens is this?"}]}"#;
    let mut lh = client(
        &store,
        "/v1/messages/count_tokens",
        &[("x-api-key", b"tg-a")],
        body,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    assert_eq!(
        lh.get(Map::RequestHeaders, "x-tollgate-route").as_deref(),
        Some("anthropic"),
        "an Anthropic path starts on the Anthropic provider"
    );
    assert_eq!(
        Plan::decode(&lh.filter_state[plan::FILTER_STATE])
            .unwrap()
            .model,
        ""
    );
    let answer_body = br#"{"input_tokens":14}"#;
    let (_, an) = attempt(
        &lh,
        "anthropic",
        1,
        200,
        &[("content-type", "application/json")],
        answer_body,
        &cfg,
    );
    assert_eq!(an.bodies[&Body::Request], body, "sent as it is");
    assert_eq!(
        an.get(Map::RequestHeaders, ":path").as_deref(),
        Some("/v1/messages/count_tokens")
    );
    assert_eq!(
        an.get(Map::RequestHeaders, "x-api-key").as_deref(),
        Some("sk-ant-one")
    );
    let out = answer(&mut l, &mut lh, &an, &[answer_body]);
    assert_eq!(out, answer_body);
    assert_eq!(logged(&lh, "usage").as_deref(), Some("exact"));
    assert_eq!(
        (logged(&lh, "in").as_deref(), logged(&lh, "out").as_deref()),
        (Some("0"), Some("0"))
    );
    assert_eq!(
        lh.counter("tollgate.consumer.team-a.model.claude-sonnet-4-5.requests"),
        1
    );
    assert_eq!(
        lh.get(Map::ResponseHeaders, "anthropic-ratelimit-tokens-remaining")
            .as_deref(),
        Some("1000"),
        "no tokens reserved for it"
    );

    // A body that is not JSON (an audio upload) goes on too, to the OpenAI provider.
    let audio = b"--b\r\ncontent-disposition: form-data; name=\"file\"\r\n\r\n\xff\xfe\x00RIFF\r\n--b--\r\n";
    let mut lh = client(
        &store,
        "/v1/audio/transcriptions",
        &[("authorization", &bearer("tg-a"))],
        audio,
    );
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    assert_eq!(lh.get(Map::RequestHeaders, "x-tollgate-route"), None);
    let (_, oa) = attempt(
        &lh,
        "openai",
        1,
        200,
        &[("content-type", "text/plain")],
        b"hello",
        &cfg,
    );
    assert_eq!(oa.bodies[&Body::Request], audio);
    assert_eq!(
        oa.get(Map::RequestHeaders, "authorization").as_deref(),
        Some("Bearer sk-openai-one")
    );

    // A consumer limited to some models cannot pass a request whose model it cannot read.
    let mut lh = client(
        &store,
        "/v1/audio/transcriptions",
        &[("authorization", &bearer("tg-b"))],
        audio,
    );
    assert_eq!(send(&mut Listener::new(cfg), &mut lh), Flow::Stop);
    assert_eq!(lh.reply.as_ref().map(|r| r.status), Some(403));
}
