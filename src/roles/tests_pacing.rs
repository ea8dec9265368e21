//! Pacing keys through both roles on the fake host: an answer's announcement recorded, attempts
//! kept off a key that has spent what its provider announced, and the listener's refusal when no
//! key can take a request.

use super::listener::Listener;
use super::tests::{attempt, client, send};
use super::Flow;
use crate::config::{parse, Config};
use crate::failover::{health, pace};
use crate::store::FakeStore;
use std::rc::Rc;

const CHAT: &[u8] =
    br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#;

/// One provider of `kind` with one key (`key_extra` added to it); anonymous consumers.
fn config(kind: &str, key_extra: &str) -> Rc<Config> {
    let json = format!(
        r#"{{"providers":[{{"name":"p","type":"{kind}","keys":[{{"id":"k","env":"K"{key_extra}}}]}}]}}"#
    );
    Rc::new(parse(json.as_bytes(), &|_| Some("sk-secret".into())).unwrap())
}

#[test]
fn an_announcement_paces_the_key_and_the_listener_refuses_when_none_can_take_it() {
    let cfg = config("anthropic", "");
    let store = Rc::new(FakeStore::new());
    let anthropic = &cfg.providers[0];
    let admit = |store: &Rc<FakeStore>| {
        let mut lh = client(store, "/v1/chat/completions", &[], CHAT);
        let mut l = Listener::new(cfg.clone());
        let flow = send(&mut l, &mut lh);
        (flow, lh)
    };
    // Nothing announced yet: nothing is read for pacing, and the key takes it.
    let (flow, lh) = admit(&store);
    assert_eq!(flow, Flow::Continue);
    // The fake clock is 2023-11-14T22:13:20Z: the key has its request back 30 s later.
    let reset = "2023-11-14T22:13:50Z";
    let said = [
        ("anthropic-ratelimit-requests-remaining", "1"),
        ("anthropic-ratelimit-requests-reset", reset),
    ];
    attempt(&lh, "p", 1, 200, &said, b"{}", &cfg);
    assert!(health::read(store.as_ref(), anthropic).unwrap().announces());
    // One request left: the next is admitted, its attempt counted in flight against the key...
    let (flow, lh) = admit(&store);
    assert_eq!(flow, Flow::Continue);
    {
        let mut u = super::upstream::Upstream::new(cfg.clone());
        let mut h = crate::host::fake::FakeHost::attempt_of(&lh);
        assert_eq!(u.on_request_headers(&mut h), Flow::Continue);
        // ...so that while it is in flight, no key can take another: refused before any attempt.
        let (flow, lh2) = admit(&store);
        assert_eq!(flow, Flow::Stop);
        let r = lh2.reply.clone().unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["error"]["code"], "provider_keys_paced");
        assert_eq!(r.json()["error"]["type"], "requests");
        let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
        let until_s = 1_700_000_030 - lh2.now / 1000;
        assert!(
            secs >= until_s,
            "never before the reset: {secs} < {until_s}"
        );
        assert!(
            secs <= until_s + until_s / 2 + 1,
            "spread by half the wait at most"
        );
        assert!(r.header("retry-after-ms").is_some());
        assert_eq!(lh2.counter("tollgate.outcome.keys_paced.requests"), 1);
        // The answer says none is left; its spend is no longer in flight.
        h.set_response(
            200,
            &[
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", reset),
            ],
            b"{}",
        );
        u.on_response_headers(&mut h);
        u.on_done(&mut h);
    }
    let entry = pace::read(store.as_ref(), anthropic).unwrap();
    let key = &anthropic.keys[0];
    assert!(entry.can_take(0, key, 1, lh.now).is_err());
    assert!(
        entry.can_take(0, key, 1, 1_700_000_030_000).is_ok(),
        "back at its reset"
    );
}

#[test]
fn an_attempt_that_never_answers_gives_its_spend_back() {
    let cfg = config("openai", r#","requests_per_minute":2"#);
    let store = Rc::new(FakeStore::new());
    let p = &cfg.providers[0];
    let mut lh = client(&store, "/v1/chat/completions", &[], CHAT);
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    let mut u = super::upstream::Upstream::new(cfg.clone());
    let mut h = crate::host::fake::FakeHost::attempt_of(&lh);
    assert_eq!(u.on_request_headers(&mut h), Flow::Continue);
    let with = |store: &FakeStore, tokens| {
        pace::read(store, p)
            .unwrap()
            .can_take(0, &p.keys[0], tokens, lh.now)
    };
    assert!(with(&store, 1).is_ok(), "one of two requests spent");
    u.on_done(&mut h);
    // The window still counts it (the provider may have), and the second fills it.
    let mut u = super::upstream::Upstream::new(cfg.clone());
    let mut h = crate::host::fake::FakeHost::attempt_of(&lh);
    assert_eq!(u.on_request_headers(&mut h), Flow::Continue);
    assert!(with(&store, 1).is_err());
}

#[test]
fn an_attempt_that_finds_every_key_spent_by_another_worker_answers_429_itself() {
    let cfg = config("openai", r#","requests_per_minute":1"#);
    let store = Rc::new(FakeStore::new());
    let p = &cfg.providers[0];
    let mut lh = client(&store, "/v1/chat/completions", &[], CHAT);
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
    // Another worker's attempt takes the key's last request between admission and this attempt.
    assert_eq!(pace::take(store.as_ref(), p, 0, 1, lh.now).unwrap(), Ok(()));
    let mut u = super::upstream::Upstream::new(cfg.clone());
    let mut h = crate::host::fake::FakeHost::attempt_of(&lh);
    assert_eq!(u.on_request_headers(&mut h), Flow::Stop);
    let r = h.reply.clone().unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "provider_keys_paced");
    assert_eq!(r.header("retry-after"), Some("60"));
    assert_eq!(h.counter("tollgate.provider.p.paced_attempts"), 1);
    assert!(!h.request_headers_sent, "the attempt never left");
}

#[test]
fn a_paced_request_costs_5_shared_data_calls_more_and_an_unpaced_one_none() {
    let calls = |key_extra: &str| {
        let cfg = config("openai", key_extra);
        let store = Rc::new(FakeStore::new());
        let mut lh = client(&store, "/v1/chat/completions", &[], CHAT);
        let mut l = Listener::new(cfg.clone());
        assert_eq!(send(&mut l, &mut lh), Flow::Continue);
        let (mut u, mut h) = attempt(&lh, "p", 1, 200, &[], b"{}", &cfg);
        u.on_done(&mut h);
        store.calls.get()
    };
    // The listener's reading of the entry; the attempt's take (a read and a write) as it leaves,
    // and its settlement (a read and a write) as its answer comes.
    assert_eq!(calls(r#","requests_per_minute":60"#) - calls(""), 5);
}

#[test]
fn counts_announced_without_their_reset_pace_nothing_and_cost_nothing() {
    // Azure and some OpenAI-compatible servers send what is left but not when it comes back.
    let cfg = config("openai", "");
    // Host calls and shared-data calls of one request whose answer carries `said`.
    let one = |store: &Rc<FakeStore>, said: &[(&str, &str)]| {
        let mut lh = client(store, "/v1/chat/completions", &[], CHAT);
        let mut l = Listener::new(cfg.clone());
        assert_eq!(send(&mut l, &mut lh), Flow::Continue);
        let before = store.calls.get();
        let (_, h) = attempt(&lh, "p", 1, 200, said, b"{}", &cfg);
        (h.calls.get(), store.calls.get() - before)
    };
    let store = Rc::new(FakeStore::new());
    let counts_only = [
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-remaining-tokens", "0"),
    ];
    let with_counts = one(&store, &counts_only);
    let without = one(&Rc::new(FakeStore::new()), &[]);
    assert_eq!(with_counts, without, "not even a clock read for pacing");
    assert!(!health::read(store.as_ref(), &cfg.providers[0])
        .unwrap()
        .announces());
    // A key said to have nothing left, without a reset, still takes the next request.
    let mut lh = client(&store, "/v1/chat/completions", &[], CHAT);
    let mut l = Listener::new(cfg.clone());
    assert_eq!(send(&mut l, &mut lh), Flow::Continue);
}
