//! Waiting for capacity instead of a 429 (`waiting`, [`crate::config::waiting`]): not a step of
//! the walk but what follows a refusal. A refusal that says when the same request could be admitted
//! ([`Refusal::retry_in_ms`]: a budget refills, a place in flight frees, a cooling key is back)
//! holds the request when that is within its longest wait, counted from its arrival. The worker's
//! tick then walks admission again for it, in the order of [`crate::limit::waiting`], until it is
//! admitted or its wait is over (then the walk's own refusal answers it, `Retry-After` and all).
//!
//! A new request of a consumer that has requests held queues behind them without a walk: capacity
//! that appears belongs to the oldest. Past the consumer's or the worker's cap on held requests, a
//! request is refused at once.
//!
//! Not configured for the consumer: [`policy`] is one branch on an empty option, no host call.

use super::{Admission, Refusal};
use crate::api::errors::ErrorKind;
use crate::config::waiting::Wait;
use crate::config::Config;
use crate::host::Host;
use crate::limit::in_flight::{Subject, Take, CONSUMER_LANE};
use crate::limit::waiting::{Full, Held};

/// How this request may wait: its consumer's `waiting` where its path waits, shortened by what the
/// client asked (`x-tollgate-max-wait`, in ms). None: it does not wait.
pub fn policy(cfg: &Config, consumer: &str, path: &str, asked_ms: Option<u64>) -> Option<Wait> {
    let w = *cfg.waiting.as_ref()?.for_request(consumer, path)?;
    let max_wait_ms = asked_ms.map_or(w.max_wait_ms, |a| a.min(w.max_wait_ms));
    (max_wait_ms > 0).then_some(Wait { max_wait_ms, ..w })
}

/// The client's longest wait, `x-tollgate-max-wait`: whole or decimal seconds ("2", "0.25"), to
/// the millisecond. None: not a number of seconds.
pub fn asked_ms(value: &str) -> Option<u64> {
    let (whole, frac) = value.trim().split_once('.').unwrap_or((value.trim(), ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && frac.is_empty() || !digits(whole) || !digits(frac) {
        return None;
    }
    let secs: u64 = if whole.is_empty() {
        0
    } else {
        whole.get(..whole.len().min(7))?.parse().ok()?
    };
    let ms = frac
        .bytes()
        .chain(core::iter::repeat(b'0'))
        .take(3)
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(secs * 1000 + ms)
}

/// Whether a refused request may be held: the refusal says when it could go, and that is within
/// its longest wait from its arrival (`since`).
pub fn could_wait(r: &Refusal, wait: &Wait, since: u64, now: u64) -> bool {
    r.retry_in_ms().is_some_and(|ms| {
        now.saturating_add(u64::from(ms)) <= since.saturating_add(wait.max_wait_ms)
    })
}

/// When the request is worth walking again after `r` refused it at `now`: a request budget's
/// refusal says exactly when the bucket holds the request (a token budget's can only come sooner,
/// when a request in flight settles below its reservation: at most that much later); anything
/// else (a place in flight, a key) may free at any moment: the next tick.
pub fn next_try(r: &Refusal, now: u64) -> u64 {
    match (r.outcome, r.openai_type, r.retry_in_ms()) {
        ("rejected_quota", Some("requests"), Some(ms)) => now.saturating_add(u64::from(ms)),
        _ => 0,
    }
}

/// Whether a new request of `consumer` must queue behind its requests already held.
pub fn queued_ahead<H: Host>(host: &mut H, consumer: &str, wait: &Wait) -> bool {
    let mut ahead = false;
    host.with_waiting(&mut |w| ahead = !w.is_empty() && w.queued_ahead(consumer, wait.priority));
    ahead
}

/// Holds the request in the worker's list; past a cap, the refusal to answer at once (`base`: the
/// walk's refusal, whose headers it keeps). The consumer's cap counts this worker's list;
/// `waiting.max_held` counts every worker's, as leases in shared data like requests in flight
/// ([`crate::limit::in_flight`]: a VM that vanished stops counting within 5 s). When shared data
/// fails, the worker's own list is what the global cap is held to.
pub fn hold<H: Host>(
    host: &mut H,
    cfg: &Config,
    held: Held,
    wait: &Wait,
    base: Option<Refusal>,
) -> Result<(), Refusal> {
    let global = cfg.waiting.as_ref().map_or(0, |w| w.max_held);
    let consumer = held.consumer.clone();
    let id = held.id;
    let mut taken = Ok(());
    let mut entry = Some(held);
    host.with_waiting(&mut |w| {
        if let Some(h) = entry.take() {
            taken = w.hold(h, wait.max_held, global);
        }
    });
    if let Err(full) = taken {
        return Err(full_refusal(&consumer, full, base));
    }
    if let Err(full) = hold_globally(host, global) {
        host.with_waiting(&mut |w| {
            w.remove(id);
        });
        return Err(full_refusal(&consumer, full, base));
    }
    host.gauge_add(&gauge(&consumer), 1);
    host.count("tollgate.waiting.held", 1);
    Ok(())
}

/// A place among every worker's held requests.
fn hold_globally<H: Host>(host: &mut H, cap: u32) -> Result<(), Full> {
    let now = host.now_ms();
    let mut taken = Ok(Take::Taken);
    host.with_leases(&mut |leases, store| {
        taken = leases.take(
            store,
            &Subject::Held,
            CONSUMER_LANE,
            u64::from(cap),
            now,
            None,
        );
    });
    match taken {
        Ok(Take::Taken) => Ok(()),
        Ok(Take::Full { .. }) => Err(Full::Global { cap }),
        Err(e) => {
            log::warn!("held requests across workers unavailable: {e:?}");
            host.count("tollgate.degraded", 1);
            Ok(())
        }
    }
}

/// Takes the request out of the worker's list, counted by how it left (`released`, `expired`,
/// `gone`). How long it was held; None: it was not.
pub fn unhold<H: Host>(host: &mut H, id: u32, outcome: &str) -> Option<u64> {
    let mut taken = None;
    host.with_waiting(&mut |w| taken = w.remove(id));
    let held = taken?;
    let now = host.now_ms();
    host.with_leases(&mut |leases, store| {
        // A write the store refused is made on the tick.
        let _ = leases.give_back(store, &Subject::Held, CONSUMER_LANE, now);
    });
    host.gauge_add(&gauge(&held.consumer), -1);
    host.count(&format!("tollgate.waiting.{outcome}"), 1);
    let waited = host.now_ms().saturating_sub(held.since_ms);
    if outcome != "gone" {
        host.histogram("tollgate.waiting.wait_ms", waited);
    }
    Some(waited)
}

/// What the steps change of the request as read from its body (the context step fits its estimate
/// and `max_tokens` to a model's window): kept before the first walk, to walk again from it.
#[derive(Debug, Clone, Copy, Default)]
pub struct AsRead {
    prompt_tokens_estimate: u64,
    max_tokens: Option<u64>,
}

impl AsRead {
    pub fn of(adm: &Admission) -> Self {
        AsRead {
            prompt_tokens_estimate: adm.info.prompt_tokens_estimate,
            max_tokens: adm.info.max_tokens,
        }
    }
}

/// The admission as it was before the walk, to walk again: what the steps decide is decided anew
/// (the body as the client sent it, its estimate, the budgets now).
pub fn rewind(adm: &mut Admission, read: AsRead) {
    adm.info.prompt_tokens_estimate = read.prompt_tokens_estimate;
    adm.info.max_tokens = read.max_tokens;
    adm.rewritten = None;
    adm.trimmed_messages = 0;
    adm.metered = false;
    adm.reservations.clear();
    adm.standings.clear();
    adm.rate_limits.clear();
    adm.start_health = None;
    let c = &mut adm.cache;
    c.outcome = Default::default();
    c.digest = None;
    c.store = false;
    c.stale_way = None;
    c.served = None;
}

/// `tollgate.consumer.<c>.waiting`: held requests, across workers.
fn gauge(consumer: &str) -> String {
    format!("tollgate.consumer.{consumer}.waiting")
}

fn full_refusal(consumer: &str, full: Full, base: Option<Refusal>) -> Refusal {
    let (whose, cap) = match full {
        Full::Consumer { cap } => (format!("Consumer '{consumer}' has"), cap),
        Full::Global { cap } => ("The gateway has".to_string(), cap),
    };
    let headers = base.map(|b| b.headers).unwrap_or_default();
    let retry_after = headers
        .iter()
        .find(|(k, _)| *k == "retry-after")
        .map_or("1", |(_, v)| v.as_str())
        .to_string();
    let msg = format!(
        "{whose} {cap} requests waiting for capacity, its limit. Please try again in {retry_after}s."
    );
    let mut r = Refusal::new(ErrorKind::RateLimit, msg)
        .code("wait_queue_full")
        .openai_type("requests")
        .outcome("rejected_waiting");
    if headers.iter().any(|(k, _)| *k == "retry-after") {
        r.headers = headers;
    } else {
        r = r.header("retry-after", retry_after);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::super::testing::config;
    use super::*;
    use crate::host::fake::FakeHost;
    use crate::store::FakeStore;
    use std::rc::Rc;

    const CFG: &str = r#"{"waiting":{"max_held":3},
        "consumers":{"list":[
            {"name":"w","key_env":"K","waiting":{"max_wait":"5s","max_held":2,"priority":1}},
            {"name":"v","key_env":"K2","waiting":{"max_wait":"5s"}},
            {"name":"fast","key_env":"K3"}]},
        "providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}]}"#;

    const CHAT: &str = "/v1/chat/completions";

    fn held(id: u32, consumer: &str) -> Held {
        Held {
            id,
            consumer: consumer.into(),
            priority: 1,
            since_ms: 0,
            deadline_ms: 5_000,
            next_try_ms: 0,
        }
    }

    #[test]
    fn the_client_may_shorten_the_wait_never_lengthen_it() {
        let cfg = config(CFG);
        assert_eq!(policy(&cfg, "w", CHAT, None).unwrap().max_wait_ms, 5_000);
        assert_eq!(
            policy(&cfg, "w", CHAT, Some(1_500)).unwrap().max_wait_ms,
            1_500
        );
        assert_eq!(
            policy(&cfg, "w", CHAT, Some(60_000)).unwrap().max_wait_ms,
            5_000
        );
        assert_eq!(policy(&cfg, "w", CHAT, Some(0)), None, "0: fail fast");
        assert_eq!(policy(&cfg, "fast", CHAT, None), None);
        let routed = config(&CFG.replacen(
            r#""max_held":3"#,
            r#""max_held":3,"path_prefixes":["/batch/"]"#,
            1,
        ));
        assert_eq!(
            policy(&routed, "w", CHAT, None),
            None,
            "a path that does not wait"
        );
        assert!(policy(&routed, "w", "/batch/v1/chat/completions", None).is_some());
        for (v, want) in [
            ("2", Some(2_000)),
            ("0.25", Some(250)),
            (" 1.5 ", Some(1_500)),
            (".5", Some(500)),
            ("3.", Some(3_000)),
            ("1.23456", Some(1_234)),
            ("0", Some(0)),
            ("", None),
            (".", None),
            ("-1", None),
            ("1e3", None),
            ("1,5", None),
        ] {
            assert_eq!(asked_ms(v), want, "{v:?}");
        }
        assert!(asked_ms("99999999999999999999").is_some(), "no overflow");
    }

    #[test]
    fn held_only_when_the_refusal_says_when_and_that_is_within_the_wait() {
        let w = policy(&config(CFG), "w", CHAT, None).unwrap();
        let r = Refusal::new(ErrorKind::RateLimit, "x");
        assert!(!could_wait(&r, &w, 0, 0), "no time given: a 429");
        assert!(could_wait(&r.clone().retry_in(5_000), &w, 0, 0));
        assert!(!could_wait(&r.clone().retry_in(5_001), &w, 0, 0));
        assert!(
            !could_wait(&r.retry_in(1_000), &w, 0, 4_500),
            "counted from arrival"
        );
    }

    #[test]
    fn caps_refuse_at_once_with_the_walks_retry_after() {
        let cfg = config(CFG);
        let mut h = FakeHost::new(Rc::new(FakeStore::new()));
        let w = policy(&cfg, "w", CHAT, None).unwrap();
        let base = || {
            Some(
                Refusal::new(ErrorKind::RateLimit, "budget")
                    .header("retry-after", "3")
                    .retry_in(2_500),
            )
        };
        assert!(hold(&mut h, &cfg, held(1, "w"), &w, base()).is_ok());
        assert!(hold(&mut h, &cfg, held(2, "w"), &w, None).is_ok());
        let r = hold(&mut h, &cfg, held(3, "w"), &w, base()).unwrap_err();
        assert_eq!(
            (r.code, r.outcome, r.kind),
            (
                Some("wait_queue_full"),
                "rejected_waiting",
                ErrorKind::RateLimit
            )
        );
        assert_eq!(r.headers, vec![("retry-after", "3".to_string())]);
        assert!(
            r.message.contains("Consumer 'w' has 2 requests waiting"),
            "{}",
            r.message
        );
        let v = policy(&cfg, "v", CHAT, None).unwrap();
        assert!(hold(&mut h, &cfg, held(4, "v"), &v, None).is_ok());
        let r = hold(&mut h, &cfg, held(5, "v"), &v, None).unwrap_err();
        assert!(
            r.message.starts_with("The gateway has 3 requests"),
            "{}",
            r.message
        );
        assert_eq!(r.headers, vec![("retry-after", "1".to_string())]);
        assert_eq!(h.gauge_sums["tollgate.consumer.w.waiting"], 2);
        assert_eq!(h.counter("tollgate.waiting.held"), 3);

        assert!(queued_ahead(&mut h, "w", &w));
        h.now = 1_200;
        assert_eq!(unhold(&mut h, 1, "released"), Some(1_200));
        assert_eq!(unhold(&mut h, 1, "released"), None, "once");
        assert_eq!(unhold(&mut h, 2, "gone"), Some(1_200));
        assert!(!queued_ahead(&mut h, "w", &w));
        assert_eq!(h.gauge_sums["tollgate.consumer.w.waiting"], 0);
        assert_eq!(
            (
                h.counter("tollgate.waiting.released"),
                h.counter("tollgate.waiting.gone")
            ),
            (1, 1)
        );
        assert_eq!(
            h.histograms["tollgate.waiting.wait_ms"],
            vec![1_200],
            "a request gone is not a wait"
        );
    }

    #[test]
    fn the_global_cap_counts_every_workers_held_requests() {
        let cfg = config(CFG);
        let store = Rc::new(FakeStore::new());
        let mut w1 = FakeHost::new(store.clone()).on_worker(11);
        let mut w2 = FakeHost::new(store.clone()).on_worker(22);
        let v = policy(&cfg, "v", CHAT, None).unwrap();
        assert!(hold(&mut w1, &cfg, held(1, "v"), &v, None).is_ok());
        assert!(hold(&mut w1, &cfg, held(2, "v"), &v, None).is_ok());
        assert!(hold(&mut w2, &cfg, held(3, "v"), &v, None).is_ok());
        let r = hold(&mut w2, &cfg, held(4, "v"), &v, None).unwrap_err();
        assert!(
            r.message.starts_with("The gateway has 3 requests"),
            "{}",
            r.message
        );
        assert_eq!(
            w2.waiting.borrow().len(),
            1,
            "refused: not kept in the worker's list"
        );
        assert_eq!(w2.gauge_sums["tollgate.consumer.v.waiting"], 1);
        assert!(unhold(&mut w1, 1, "released").is_some());
        assert!(
            hold(&mut w2, &cfg, held(4, "v"), &v, None).is_ok(),
            "a place came back"
        );
    }

    #[test]
    fn a_consumer_that_does_not_wait_costs_no_host_call() {
        let cfg = config(CFG);
        let store = Rc::new(FakeStore::new());
        let h = FakeHost::new(store.clone());
        assert!(policy(&cfg, "fast", CHAT, None).is_none());
        let off = config(
            r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}]}"#,
        );
        assert!(policy(&off, "anonymous", CHAT, Some(1_000)).is_none());
        assert_eq!((h.calls.get(), store.calls.get()), (0, 0));
    }
}
