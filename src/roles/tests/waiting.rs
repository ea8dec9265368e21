//! Waiting for capacity through whole requests on one worker: a request the budget refuses is held
//! (nothing reserved), walked again on the tick, and goes on once the budget refills; its
//! consumer's newer requests queue behind it; a client that leaves while held costs nothing.

use super::*;
use crate::config::parse;
use crate::limit::waiting::WaitList;
use core::cell::RefCell;

const W_KEY: &str = "tg-w";

fn waiting_config(waiting: &str) -> Rc<Config> {
    let json = format!(
        r#"{{"consumers":{{"list":[
              {{"name":"w","key_env":"W","limits":[{{"metric":"requests","amount":2,"window":"1s"}}],
                "waiting":{waiting}}}]}},
            "providers":[{{"name":"openai","type":"openai","keys":[{{"id":"oa-1","env":"OA1"}}]}}]}}"#
    );
    let env = |name: &str| match name {
        "W" => Some(W_KEY.to_string()),
        "OA1" => Some("sk-openai-one".to_string()),
        _ => None,
    };
    Rc::new(parse(json.as_bytes(), &env).unwrap())
}

/// One worker: its streams share the list of held requests.
struct Worker {
    store: Rc<FakeStore>,
    list: Rc<RefCell<WaitList>>,
    cfg: Rc<Config>,
    next_id: u32,
}

impl Worker {
    fn new(waiting: &str) -> Self {
        Worker {
            store: Rc::new(FakeStore::new()),
            list: Rc::default(),
            cfg: waiting_config(waiting),
            next_id: 1,
        }
    }

    /// A request of consumer w at `now`, sent: its listener, host and first flow.
    fn send(&mut self, now: u64, extra: &[(&str, &[u8])]) -> (Listener, FakeHost, Flow) {
        let key = bearer(W_KEY);
        let mut headers: Vec<(&str, &[u8])> = vec![("authorization", &key)];
        headers.extend_from_slice(extra);
        let mut h = client(&self.store, "/v1/chat/completions", &headers, CHAT);
        h.waiting = self.list.clone();
        h.now = now;
        let mut l = Listener::new(self.cfg.clone()).with_stream(self.next_id);
        self.next_id += 1;
        let flow = send(&mut l, &mut h);
        (l, h, flow)
    }

    fn held(&self) -> usize {
        self.list.borrow().len()
    }
}

const T0: u64 = 1_700_000_000_000;

#[test]
fn a_refused_request_is_held_then_released_when_the_budget_refills_in_arrival_order() {
    let mut w = Worker::new(r#"{"max_wait":"5s"}"#);
    for _ in 0..2 {
        assert_eq!(w.send(T0, &[]).2, Flow::Continue, "within the budget");
    }
    let (mut third, mut h3, f3) = w.send(T0, &[]);
    assert_eq!(f3, Flow::Hold);
    assert!(h3.reply.is_none(), "no 429");
    assert_eq!(h3.gauge_sums["tollgate.consumer.w.waiting"], 1);
    let (mut fourth, mut h4, f4) = w.send(T0 + 10, &[]);
    assert_eq!(f4, Flow::Hold, "queued behind the third");
    assert_eq!(w.held(), 2);

    // Nothing refilled yet: both stay, nothing reserved for them.
    h3.now = T0 + 100;
    assert_eq!(third.retry(&mut h3), Flow::Hold);
    assert!(h3.filter_state.get(plan::FILTER_STATE).is_none());

    // One request's worth refills every 500 ms: the third goes, the fourth still waits.
    let mut round = w.list.borrow().round();
    let first = round.next(T0 + 500).unwrap();
    assert_eq!(first.id, 3, "the oldest first");
    h3.now = T0 + 500;
    assert_eq!(third.retry(&mut h3), Flow::Continue);
    let planned = Plan::decode(&h3.filter_state[plan::FILTER_STATE]).unwrap();
    assert_eq!(
        planned.at_ms,
        Some(T0 + 500),
        "the attempt judges keys by the time of release, not of arrival"
    );
    h4.now = T0 + 500;
    assert_eq!(
        fourth.retry(&mut h4),
        Flow::Hold,
        "the refill went to the third"
    );
    h4.now = T0 + 1_000;
    assert_eq!(fourth.retry(&mut h4), Flow::Continue);
    assert_eq!(w.held(), 0);
    assert_eq!(h4.counter("tollgate.waiting.released"), 1);
    assert_eq!(h4.histograms["tollgate.waiting.wait_ms"], vec![990]);
    assert_eq!(
        h4.gauge_sums["tollgate.consumer.w.waiting"], 0,
        "up when held, down when released"
    );
}

#[test]
fn a_new_request_queues_behind_its_consumers_held_ones_instead_of_taking_the_refill() {
    let mut w = Worker::new(r#"{"max_wait":"5s"}"#);
    w.send(T0, &[]);
    w.send(T0, &[]);
    let (_held, _h, f) = w.send(T0, &[]);
    assert_eq!(f, Flow::Hold);
    // A second later the bucket holds two requests again, but the newcomer does not walk.
    let (_l, h, f) = w.send(T0 + 1_000, &[]);
    assert_eq!(f, Flow::Hold, "behind the held one");
    assert!(h.filter_state.get(plan::FILTER_STATE).is_none());
    assert_eq!(w.held(), 2);
}

#[test]
fn a_client_that_leaves_while_held_is_neither_charged_nor_sent() {
    let mut w = Worker::new(r#"{"max_wait":"5s"}"#);
    w.send(T0, &[]);
    w.send(T0, &[]);
    let (mut l, mut h, f) = w.send(T0, &[]);
    assert_eq!(f, Flow::Hold);
    h.now = T0 + 300;
    l.on_log(&mut h);
    l.on_done(&mut h);
    assert_eq!(w.held(), 0);
    assert_eq!(h.counter("tollgate.waiting.gone"), 1);
    assert!(
        h.filter_state.get(plan::FILTER_STATE).is_none(),
        "never went on"
    );
    assert!(h.reply.is_none());
    h.tick();
    // The budget saw two requests only: a fresh one a second later is admitted twice.
    assert_eq!(w.send(T0 + 1_000, &[]).2, Flow::Continue);
    assert_eq!(w.send(T0 + 1_000, &[]).2, Flow::Continue);
}

#[test]
fn past_its_longest_wait_a_held_request_gets_the_walks_429() {
    let mut w = Worker::new(r#"{"max_wait":"800ms"}"#);
    w.send(T0, &[]);
    w.send(T0, &[]);
    let (mut l, mut h, f) = w.send(T0, &[]);
    assert_eq!(f, Flow::Hold, "room in 500 ms, within 800");
    let (_l2, h2, f2) = w.send(T0, &[]);
    assert_eq!(f2, Flow::Hold, "queued");
    drop(h2);
    // Another consumer's spending is not the point here: its own refill is taken by a fresh
    // request sent past the queue (as another worker's would be).
    h.now = T0 + 400;
    assert_eq!(l.retry(&mut h), Flow::Hold);
    h.now = T0 + 801;
    // Still refused at the deadline only if the budget is spent: spend it from "another worker".
    let mut other = Worker::new(r#"{"max_wait":"5s"}"#);
    other.store = w.store.clone();
    let (_o, _oh, of) = other.send(T0 + 801, &[]);
    assert_eq!(of, Flow::Continue, "another worker's list is its own");
    assert_eq!(l.retry(&mut h), Flow::Stop);
    let reply = h.reply.clone().unwrap();
    assert_eq!(reply.status, 429);
    assert!(reply.header("retry-after").is_some());
    assert_eq!(h.counter("tollgate.waiting.expired"), 1);
    assert!(
        String::from_utf8_lossy(&h.filter_state[crate::roles::listener::RECORD])
            .contains("waited_ms=801"),
        "the access log says how long it waited"
    );
}

#[test]
fn past_the_consumers_cap_a_request_is_refused_at_once() {
    let mut w = Worker::new(r#"{"max_wait":"5s","max_held":1}"#);
    w.send(T0, &[]);
    w.send(T0, &[]);
    assert_eq!(w.send(T0, &[]).2, Flow::Hold);
    let (_l, h, f) = w.send(T0, &[]);
    assert_eq!(f, Flow::Stop);
    let reply = h.reply.unwrap();
    assert_eq!(reply.status, 429);
    assert_eq!(reply.json()["error"]["code"], "wait_queue_full");
    assert_eq!(h.counters["tollgate.outcome.rejected_waiting.requests"], 1);
}

#[test]
fn the_client_may_ask_for_a_shorter_wait_and_the_header_never_reaches_the_provider() {
    let mut w = Worker::new(r#"{"max_wait":"5s"}"#);
    let (_l, h, f) = w.send(T0, &[("x-tollgate-max-wait", b"2")]);
    assert_eq!(f, Flow::Continue);
    assert!(crate::host::Host::header(&h, Map::RequestHeaders, "x-tollgate-max-wait").is_none());
    w.send(T0, &[]);
    // A refill 500 ms away is past a 0.2 s wait: 429 at once.
    let (_l, h, f) = w.send(T0, &[("x-tollgate-max-wait", b"0.2")]);
    assert_eq!((f, h.reply.unwrap().status), (Flow::Stop, 429));
    let (_l, h, f) = w.send(T0, &[("x-tollgate-max-wait", b"soon")]);
    assert_eq!(f, Flow::Stop);
    let reply = h.reply.unwrap();
    assert_eq!(
        (reply.status, reply.json()["error"]["code"].as_str()),
        (400, Some("invalid_max_wait"))
    );
    assert_eq!(w.held(), 0);
}
