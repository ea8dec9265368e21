//! The tick's part in the limits on requests in flight ([`crate::limit::in_flight`]): the VM's
//! leases kept alive, and the counts it read shown as gauges, per consumer
//! (`tollgate.consumer.<c>.in_flight`) and per key with a limit
//! (`tollgate.provider.<p>.key.<k>.in_flight`). A VM that holds no lease does nothing at all.

use crate::config::Config;
use crate::count::metric_segment;
use crate::host::Host;
use crate::limit::in_flight::{key_lane, Subject, Totals};

pub fn consumer_gauge(consumer: &str) -> String {
    format!("tollgate.consumer.{}.in_flight", metric_segment(consumer))
}

pub fn key_gauge(provider: &str, key_id: &str) -> String {
    format!("tollgate.provider.{provider}.key.{key_id}.in_flight")
}

pub fn tick<H: Host>(host: &mut H, cfg: &Config) {
    let mut idle = true;
    host.with_leases(&mut |leases, _| idle = leases.is_idle());
    if idle {
        return;
    }
    let now = host.now_ms();
    let mut seen: Vec<(Subject, Totals)> = Vec::new();
    host.with_leases(&mut |leases, store| seen = leases.tick(store, now));
    for (subject, totals) in seen {
        match subject {
            Subject::Consumer(c) => host.gauge(&consumer_gauge(&c), totals.sum()),
            // Shown per consumer, moved as requests are held and released.
            Subject::Held => {}
            Subject::Provider(name) => {
                // A provider no longer configured: its last requests end unseen by the gauges.
                let Some((_, p)) = cfg.provider(&name) else {
                    continue;
                };
                for k in p.keys.iter().filter(|k| k.max_in_flight.is_some()) {
                    host.gauge(&key_gauge(&p.name, &k.id), totals.of(key_lane(&k.id)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Both roles through whole requests with limits on requests in flight, on two workers (two
    //! VMs' leases) sharing one store.
    use super::super::listener::Listener;
    use super::super::tests::{
        answer, attempt, bearer, client, fixture, on_endpoint, send, TEAM_A_KEY,
    };
    use super::super::upstream::Upstream;
    use super::super::Flow;
    use super::*;
    use crate::config::parse;
    use crate::host::fake::FakeHost;
    use crate::host::Map;
    use crate::limit::in_flight::{read, LEASE_MS};
    use crate::store::FakeStore;
    use serde_json::json;
    use std::rc::Rc;

    fn config(consumer: &str, keys: &str) -> Rc<Config> {
        let json = format!(
            r#"{{"consumers":{{"list":[
                  {{"name":"team-a","key_env":"TEAM_A" {consumer}}},
                  {{"name":"team-b","key_env":"TEAM_B","max_in_flight":5,
                    "limits":[{{"metric":"total_tokens","amount":10,"window":"1m"}}]}}]}},
                "providers":[{{"name":"openai","type":"openai",
                  "keys":[{{"id":"oa-1","env":"OA" {keys}}},{{"id":"oa-2","env":"OA" {keys}}}]}}],
                "status":{{"path":"/st","admin_key_env":"ADMIN"}}}}"#
        );
        let env = |name: &str| {
            Some(
                match name {
                    "TEAM_A" => TEAM_A_KEY,
                    "TEAM_B" => "tg-team-b",
                    "ADMIN" => "admin",
                    _ => "sk-openai",
                }
                .to_string(),
            )
        };
        Rc::new(parse(json.as_bytes(), &env).unwrap())
    }

    const CHAT: &[u8] = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

    /// A worker VM: what its streams share (its leases and its round-robin tickets).
    struct Worker(FakeHost);

    fn worker(vm: u64) -> Worker {
        Worker(FakeHost::new(Rc::default()).on_worker(vm))
    }

    /// A request of team-a on worker `w`, through admission: its listener and host.
    fn admitted(store: &Rc<FakeStore>, cfg: &Rc<Config>, w: &Worker) -> (Listener, FakeHost, Flow) {
        request_on(store, cfg, w, "/v1/chat/completions", TEAM_A_KEY, CHAT)
    }

    fn request_on(
        store: &Rc<FakeStore>,
        cfg: &Rc<Config>,
        w: &Worker,
        path: &str,
        key: &str,
        body: &[u8],
    ) -> (Listener, FakeHost, Flow) {
        let mut lh = client(store, path, &[("authorization", &bearer(key))], body);
        lh.leases = w.0.leases.clone();
        lh.tickets = w.0.tickets.clone();
        let mut l = Listener::new(cfg.clone());
        let flow = send(&mut l, &mut lh);
        (l, lh, flow)
    }

    fn in_flight(store: &FakeStore, subject: Subject, lane: u64) -> u64 {
        read(store, &subject, 1_700_000_000_000).unwrap().0.of(lane)
    }

    fn team_a(store: &FakeStore) -> u64 {
        in_flight(store, Subject::Consumer("team-a".into()), 0)
    }

    fn key(store: &FakeStore, id: &str) -> u64 {
        in_flight(store, Subject::Provider("openai".into()), key_lane(id))
    }

    #[test]
    fn a_consumer_over_its_limit_gets_429_in_its_api_shape_and_each_place_comes_back_once() {
        let (w1, w2) = (worker(1), worker(2));
        let cfg = config(r#","max_in_flight":2"#, "");
        let store = Rc::new(FakeStore::new());
        let (mut l1, mut h1, f1) = admitted(&store, &cfg, &w1);
        let (mut l2, mut h2, f2) = admitted(&store, &cfg, &w2);
        assert_eq!((f1, f2), (Flow::Continue, Flow::Continue));
        assert_eq!(team_a(&store), 2);

        let (_, h3, f3) = admitted(&store, &cfg, &w1);
        assert_eq!(f3, Flow::Stop);
        let reply = h3.reply.clone().unwrap();
        // A place frees within a second; the spread tells clients 1 or 2 s (limit::spread).
        assert_eq!(reply.status, 429);
        assert!(matches!(reply.header("retry-after"), Some("1" | "2")));
        let body = reply.json();
        assert_eq!(
            (&body["error"]["type"], &body["error"]["code"]),
            (&json!("requests"), &json!("concurrency_limit_exceeded"))
        );
        assert_eq!(
            h3.counter("tollgate.outcome.rejected_concurrency.requests"),
            1
        );
        let anthropic = br#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
        let (_, h4, _) = request_on(&store, &cfg, &w2, "/v1/messages", TEAM_A_KEY, anthropic);
        let body = h4.reply.clone().unwrap().json();
        assert_eq!(
            (&body["type"], &body["error"]["type"]),
            (&json!("error"), &json!("rate_limit_error"))
        );
        assert_eq!(team_a(&store), 2, "refusals hold nothing");

        // The first is answered: its place comes back at the end of the answer, once, whatever
        // callbacks follow.
        let completion = fixture("openai_chat.json");
        let (_, uh) = attempt(&h1, "openai", 1, 200, &[], &completion, &cfg);
        answer(&mut l1, &mut h1, &uh, &[&completion]);
        l1.on_done(&mut h1);
        assert_eq!(team_a(&store), 1);
        // The second's client went away before any answer: teardown leaves its place to worker
        // 2's next tick (Envoy closes the attempt's connection after the teardown callbacks).
        l2.on_done(&mut h2);
        l2.on_log(&mut h2);
        assert_eq!(team_a(&store), 1, "until the tick");
        h2.now += 200;
        tick(&mut h2, &cfg);
        assert_eq!(team_a(&store), 0);
        h2.now += 200;
        tick(&mut h2, &cfg);
        assert_eq!(team_a(&store), 0, "once");
        let (_, _, f) = admitted(&store, &cfg, &w1);
        assert_eq!(f, Flow::Continue);
    }

    #[test]
    fn a_place_taken_before_a_quota_refusal_is_given_back() {
        let cfg = config("", "");
        let store = Rc::new(FakeStore::new());
        let big = br#"{"model":"gpt-4o-mini","max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#;
        let w1 = worker(1);
        // The first runs team-b's token bucket into debt; the next is refused by the quota.
        let (_, _, f) = request_on(&store, &cfg, &w1, "/v1/chat/completions", "tg-team-b", big);
        assert_eq!(f, Flow::Continue);
        let (_, h, f) = request_on(&store, &cfg, &w1, "/v1/chat/completions", "tg-team-b", big);
        assert_eq!(f, Flow::Stop);
        assert_eq!(h.reply.as_ref().map(|r| r.status), Some(429));
        assert_eq!(
            h.reply.unwrap().json()["error"]["type"],
            json!("tokens"),
            "the quota refused it"
        );
        assert_eq!(
            in_flight(&store, Subject::Consumer("team-b".into()), 0),
            1,
            "the first's"
        );
    }

    /// An attempt of the request `lh` carried, up to its request headers.
    fn attempt_start(lh: &FakeHost, cfg: &Rc<Config>) -> (Upstream, FakeHost, Flow) {
        let mut u = Upstream::new(cfg.clone());
        let mut h = FakeHost::attempt_of(lh);
        on_endpoint(&mut h, "openai");
        let flow = u.on_request_headers(&mut h);
        (u, h, flow)
    }

    fn key_id(h: &FakeHost) -> String {
        let auth = h.get(Map::RequestHeaders, "authorization");
        assert!(auth.is_some(), "a key was set");
        h.get(Map::ResponseHeaders, "x-tollgate-key-id")
            .unwrap_or_default()
    }

    #[test]
    fn a_key_at_its_limit_is_skipped_and_a_full_pool_answers_429_until_an_attempt_ends() {
        let (w1, w2) = (worker(1), worker(2));
        let cfg = config("", r#","max_in_flight":1"#);
        let store = Rc::new(FakeStore::new());
        let (_, lh1, _) = admitted(&store, &cfg, &w1);
        let (_, lh2, _) = admitted(&store, &cfg, &w2);
        let (mut u1, mut a1, f1) = attempt_start(&lh1, &cfg);
        let (mut u2, mut a2, f2) = attempt_start(&lh2, &cfg);
        assert_eq!((f1, f2), (Flow::Continue, Flow::Continue));
        for (u, a) in [(&mut u1, &mut a1), (&mut u2, &mut a2)] {
            a.set_response(200, &[], b"{}");
            u.on_response_headers(a);
            u.on_response_body(a, 2, true);
        }
        let mut ids = [key_id(&a1), key_id(&a2)];
        ids.sort();
        assert_eq!(
            ids,
            ["oa-1", "oa-2"],
            "the second attempt skipped the full key"
        );
        assert_eq!((key(&store, "oa-1"), key(&store, "oa-2")), (1, 1));

        // The listener sees both keys full and refuses at once; an attempt that comes anyway
        // (another worker filled the keys since its admission) answers 429 itself.
        let (_, lh3, f) = admitted(&store, &cfg, &w1);
        let refused = lh3.reply.clone().unwrap();
        assert_eq!((f, refused.status), (Flow::Stop, 429));
        assert_eq!(refused.json()["error"]["code"], "provider_keys_at_limit");
        let (_, a3, f3) = attempt_start(&lh3, &cfg);
        assert_eq!(f3, Flow::Stop);
        let reply = a3.reply.clone().unwrap();
        assert_eq!(
            (
                reply.status,
                reply.header("retry-after"),
                reply.header("x-tollgate-exhausted")
            ),
            (429, Some("1"), Some("true"))
        );
        assert_eq!(a3.counter("tollgate.provider.openai.at_limit_attempts"), 1);

        // The first attempt ends (answered, reset or timed out: Envoy ends its stream alike).
        u1.on_done(&mut a1);
        u1.on_done(&mut a1);
        let freed = key_id(&a1);
        assert_eq!(key(&store, &freed), 0);
        assert_eq!(
            key(&store, if freed == "oa-1" { "oa-2" } else { "oa-1" }),
            1,
            "once"
        );
        let (mut u4, mut a4, f4) = attempt_start(&lh3, &cfg);
        assert_eq!(f4, Flow::Continue);
        a4.set_response(200, &[], b"{}");
        u4.on_response_headers(&mut a4);
        assert_eq!(key_id(&a4), freed);
        u2.on_done(&mut a2);
        // An attempt cut before its answer ended (reset, timeout, client gone): its place is held
        // until the worker's next tick, when Envoy has closed its connection to the provider.
        u4.on_done(&mut a4);
        assert_eq!(key(&store, &freed), 1);
        let mut worker1 = FakeHost::attempt_of(&lh3);
        worker1.now += 200;
        tick(&mut worker1, &cfg);
        assert_eq!((key(&store, "oa-1"), key(&store, "oa-2")), (0, 0));
    }

    #[test]
    fn a_vanished_workers_places_count_until_its_lease_ends() {
        let (w1, w2) = (worker(1), worker(2));
        let cfg = config(r#","max_in_flight":2"#, "");
        let store = Rc::new(FakeStore::new());
        // Worker 1's VM takes two places, then traps: none of its callbacks ever runs again.
        let (_, _, _) = admitted(&store, &cfg, &w1);
        let (_, _, _) = admitted(&store, &cfg, &w1);
        let (_, _, f) = admitted(&store, &cfg, &w2);
        assert_eq!(f, Flow::Stop);
        let at = |ms: u64| {
            let mut h = client(
                &store,
                "/v1/chat/completions",
                &[("authorization", &bearer(TEAM_A_KEY))],
                CHAT,
            );
            h.leases = w2.0.leases.clone();
            h.now += ms;
            send(&mut Listener::new(cfg.clone()), &mut h)
        };
        assert_eq!(at(LEASE_MS), Flow::Stop, "still within the lease");
        assert_eq!(at(LEASE_MS + 1), Flow::Continue);
    }

    #[test]
    fn the_tick_shows_gauges_and_the_status_shows_counts_and_limits() {
        let w1 = worker(1);
        let cfg = config(r#","max_in_flight":3"#, r#","max_in_flight":2"#);
        let store = Rc::new(FakeStore::new());
        let (mut l, mut lh, _) = admitted(&store, &cfg, &w1);
        let (mut u, mut uh, _) = attempt_start(&lh, &cfg);
        let mut worker = FakeHost::new(store.clone());
        worker.leases = lh.leases.clone();
        worker.now += 300;
        tick(&mut worker, &cfg);
        assert_eq!(
            worker.gauges.get("tollgate.consumer.team-a.in_flight"),
            Some(&1)
        );
        let (k, other) = match (key(&store, "oa-1"), key(&store, "oa-2")) {
            (1, 0) => ("oa-1", "oa-2"),
            _ => ("oa-2", "oa-1"),
        };
        assert_eq!(
            worker
                .gauges
                .get(&format!("tollgate.provider.openai.key.{k}.in_flight")),
            Some(&1)
        );
        assert_eq!(
            worker
                .gauges
                .get(&format!("tollgate.provider.openai.key.{other}.in_flight")),
            Some(&0)
        );
        let mut sh = client(&store, "/st", &[("authorization", b"Bearer admin")], b"");
        let mut status = Listener::new(cfg.clone());
        assert_eq!(status.on_request_headers(&mut sh, true), Flow::Stop);
        let st = sh.reply.unwrap().json();
        let team = &st["consumers"]["team-a"];
        assert_eq!(
            (&team["in_flight"], &team["max_in_flight"]),
            (&json!(1), &json!(3))
        );
        let keys = st["providers"]["openai"]["keys"]
            .as_array()
            .unwrap()
            .clone();
        let shown: Vec<(String, u64, u64)> = keys
            .iter()
            .map(|k| {
                (
                    k["id"].as_str().unwrap().to_string(),
                    k["in_flight"].as_u64().unwrap(),
                    k["max_in_flight"].as_u64().unwrap(),
                )
            })
            .collect();
        assert!(
            shown.contains(&(k.to_string(), 1, 2)) && shown.contains(&(other.to_string(), 0, 2))
        );
        assert!(st["consumers"]["team-b"].get("in_flight").is_some());

        u.on_done(&mut uh);
        l.on_done(&mut lh);
        worker.now += 300;
        tick(&mut worker, &cfg);
        assert_eq!(
            worker.gauges.get("tollgate.consumer.team-a.in_flight"),
            Some(&0)
        );
        assert_eq!(
            worker
                .gauges
                .get(&format!("tollgate.provider.openai.key.{k}.in_flight")),
            Some(&0)
        );
        // Nothing in flight and nothing left to show: the tick does nothing at all.
        let calls = (worker.calls.get(), store.calls.get());
        worker.now += 300;
        tick(&mut worker, &cfg);
        assert_eq!((worker.calls.get(), store.calls.get()), calls);
    }

    #[test]
    fn a_key_limit_the_store_cannot_count_is_no_reason_to_fail_an_attempt() {
        let w1 = worker(1);
        let cfg = config("", r#","max_in_flight":1"#);
        let store = Rc::new(FakeStore::new());
        let (_, lh, _) = admitted(&store, &cfg, &w1);
        store.broken.set(true);
        let (mut u, mut uh, flow) = attempt_start(&lh, &cfg);
        assert_eq!(flow, Flow::Continue);
        uh.set_response(200, &[], b"{}");
        u.on_response_headers(&mut uh);
        assert!(!key_id(&uh).is_empty());
        u.on_done(&mut uh);
        store.broken.set(false);
        assert_eq!((key(&store, "oa-1"), key(&store, "oa-2")), (0, 0));
    }

    #[test]
    fn an_attempt_whose_credential_write_is_refused_still_gives_its_key_place_back() {
        let w1 = worker(1);
        let cfg = config("", r#","max_in_flight":1"#);
        let store = Rc::new(FakeStore::new());
        let (_, lh, _) = admitted(&store, &cfg, &w1);
        let mut u = Upstream::new(cfg.clone());
        let mut uh = FakeHost::attempt_of(&lh);
        on_endpoint(&mut uh, "openai");
        uh.refuse(crate::host::fake::Write::Map(Map::RequestHeaders), 0);
        assert_eq!(u.on_request_headers(&mut uh), Flow::Stop);
        assert_eq!(key(&store, "oa-1") + key(&store, "oa-2"), 1);
        u.on_done(&mut uh);
        uh.now += 200;
        tick(&mut uh, &cfg);
        assert_eq!(key(&store, "oa-1") + key(&store, "oa-2"), 0);
    }

    #[test]
    fn a_request_stopped_after_admission_gives_its_place_back() {
        let cfg = config(r#","max_in_flight":1"#, "");
        let store = Rc::new(FakeStore::new());
        let mut lh = client(
            &store,
            "/v1/chat/completions",
            &[("authorization", &bearer(TEAM_A_KEY))],
            CHAT,
        );
        // Envoy refuses the plan's write: the request is answered 5xx and goes no further.
        lh.refuse(
            crate::host::fake::Write::FilterState(super::super::plan::FILTER_STATE.into()),
            0,
        );
        let mut l = Listener::new(cfg.clone());
        assert_eq!(send(&mut l, &mut lh), Flow::Stop);
        assert_eq!(team_a(&store), 1);
        l.on_log(&mut lh);
        l.on_done(&mut lh);
        lh.now += 200;
        tick(&mut lh, &cfg);
        assert_eq!(team_a(&store), 0);
    }

    /// The cost of the limits (a request without them: `a_non_streamed_request_costs_20_host_calls`):
    /// the consumer's place is a read and a write each way plus a clock read each way; the key's
    /// place the same, its first read shared with the choice of the key; and, since every key of
    /// the provider has a limit, one read at admission (whether any of them is free).
    #[test]
    fn a_request_with_both_limits_costs_9_shared_data_calls_more() {
        let completion = fixture("openai_chat.json");
        let cost = |cfg: Rc<Config>| {
            let w1 = worker(1);
            let store = Rc::new(FakeStore::new());
            let mut seen = Vec::new();
            for _ in 0..3 {
                store.calls.set(0);
                let (mut l, mut lh, _) = admitted(&store, &cfg, &w1);
                let (mut u, mut uh) = attempt(&lh, "openai", 1, 200, &[], &completion, &cfg);
                u.on_done(&mut uh);
                answer(&mut l, &mut lh, &uh, &[&completion]);
                seen.push((lh.calls.get(), uh.calls.get(), store.calls.get()));
            }
            assert_eq!(
                (team_a(&store), key(&store, "oa-1"), key(&store, "oa-2")),
                (0, 0, 0)
            );
            // The first request of a worker also takes a block of round-robin tickets.
            assert_eq!(seen[1], seen[2]);
            seen[1]
        };
        let (l0, u0, s0) = cost(config("", ""));
        let (l1, u1, s1) = cost(config(r#","max_in_flight":3"#, r#","max_in_flight":2"#));
        // Listener, upstream (host calls besides shared data), shared data.
        assert_eq!((l1 - l0, u1 - u0, s1 - s0), (2, 2, 9));
        assert_eq!(
            s0, 1,
            "without limits (and without budgets): the provider's health"
        );
    }
}
