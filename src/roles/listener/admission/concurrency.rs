//! The consumer's limit on requests in flight (`max_in_flight`, [`crate::limit::in_flight`]): the
//! request takes a place here and holds it until it ends, however it ends ([`give_back`], called
//! once by the listener at the end of the answer, at teardown, or by the walk when a later step
//! refuses). A request over the limit gets a 429 with `Retry-After: 1`: a place frees as soon as
//! any of the consumer's requests ends, so the same request could succeed a moment later
//! ([`Refusal::retry_in_ms`]).
//!
//! Not configured for the consumer: nothing is done, no host call.

use super::{Admission, Incoming, Refusal, Stop};
use crate::api::errors::ErrorKind;
use crate::config::FailureMode;
use crate::host::Host;
use crate::limit::in_flight::{Subject, Take, CONSUMER_LANE};
use crate::store::StoreError;

/// How soon a refused request may try again: places free as requests end, at any moment.
pub const RETRY_IN_MS: u32 = 1_000;

pub fn check<H: Host>(
    host: &mut H,
    incoming: &Incoming<'_>,
    adm: &mut Admission,
) -> Result<(), Stop> {
    let Some(limit) = incoming.cfg.in_flight.consumer(&adm.consumer) else {
        return Ok(());
    };
    let subject = Subject::Consumer(adm.consumer.clone());
    // The lease is stamped with the clock as it is: a slow upload must not make it look stale.
    let now = host.now_ms();
    let mut taken = Err(StoreError::Host);
    host.with_leases(&mut |leases, store| {
        taken = leases.take(store, &subject, CONSUMER_LANE, u64::from(limit), now, None);
    });
    match taken {
        Ok(Take::Taken) => {
            adm.in_flight = Some(subject);
            Ok(())
        }
        Ok(Take::Full { in_flight }) => {
            let msg = format!(
                "Consumer '{}' has reached its limit on requests in flight ({in_flight} of {limit}): try again when one of them has finished (in about a second).",
                adm.consumer
            );
            Err(Refusal::new(ErrorKind::RateLimit, msg)
                .code("concurrency_limit_exceeded")
                .openai_type("requests")
                .header("retry-after", (RETRY_IN_MS / 1000).to_string())
                .outcome("rejected_concurrency")
                .retry_in(RETRY_IN_MS)
                .into())
        }
        Err(e) => {
            log::warn!("requests in flight unavailable: {e:?}");
            host.count("tollgate.degraded", 1);
            match incoming.cfg.failure_mode {
                FailureMode::Open => Ok(()),
                FailureMode::Closed => Err(Refusal::new(
                    ErrorKind::Overloaded,
                    "The gateway cannot count requests in flight right now; try again shortly.",
                )
                .into()),
            }
        }
    }
}

/// Gives back the request's place, if it holds one: at most once, whoever calls first.
/// `torn_down`: the request ended before its answer did (the client went away). Envoy closes its
/// attempt's connection to the provider only after the filters' teardown callbacks, and a request
/// another worker admitted meanwhile would reach the provider while it still has this one (seen in
/// `tests/e2e/test_concurrency.py`): such a place is given back on this VM's next tick.
pub fn give_back<H: Host>(host: &mut H, adm: &mut Admission, torn_down: bool) {
    let Some(subject) = adm.in_flight.take() else {
        return;
    };
    if torn_down {
        let mut subject = Some(subject);
        host.with_leases(&mut |leases, _| {
            if let Some(s) = subject.take() {
                leases.give_back_on_tick(s, CONSUMER_LANE);
            }
        });
        return;
    }
    let now = host.now_ms();
    host.with_leases(&mut |leases, store| {
        // A write the store refused is made on the tick.
        let _ = leases.give_back(store, &subject, CONSUMER_LANE, now);
    });
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admission, config, incoming};
    use super::*;
    use crate::host::fake::FakeHost;
    use crate::limit::in_flight::read;
    use crate::store::FakeStore;
    use std::rc::Rc;

    const CFG: &str = r#"{"consumers":{"list":[
            {"name":"c","key_env":"K","max_in_flight":2},
            {"name":"free","key_env":"K2"}]},
        "providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}]}"#;
    const BODY: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

    fn in_flight(store: &FakeStore, consumer: &str) -> u64 {
        read(
            store,
            &Subject::Consumer(consumer.into()),
            1_700_000_000_000,
        )
        .unwrap()
        .0
        .sum()
    }

    #[test]
    fn two_workers_hold_a_consumer_to_its_limit_and_places_come_back_once() {
        let cfg = config(CFG);
        let store = Rc::new(FakeStore::new());
        let mut w1 = FakeHost::new(store.clone()).on_worker(11);
        let mut w2 = FakeHost::new(store.clone()).on_worker(22);
        let mut a = admission("c", BODY);
        let mut b = admission("c", BODY);
        assert!(check(&mut w1, &incoming(&cfg, BODY), &mut a).is_ok());
        assert!(check(&mut w2, &incoming(&cfg, BODY), &mut b).is_ok());
        let mut c = admission("c", BODY);
        let Err(Stop::Refuse(r)) = check(&mut w1, &incoming(&cfg, BODY), &mut c) else {
            panic!("over the limit")
        };
        assert_eq!(
            (r.kind, r.code, r.openai_type, r.outcome, r.retry_in_ms()),
            (
                ErrorKind::RateLimit,
                Some("concurrency_limit_exceeded"),
                Some("requests"),
                "rejected_concurrency",
                Some(1_000)
            )
        );
        assert_eq!(r.headers, vec![("retry-after", "1".to_string())]);
        assert!(r.message.contains("in flight (2 of 2)"), "{}", r.message);
        assert!(c.in_flight.is_none(), "a refused request holds nothing");
        assert_eq!(in_flight(&store, "c"), 2);

        give_back(&mut w2, &mut b, false);
        give_back(&mut w2, &mut b, false);
        assert_eq!(in_flight(&store, "c"), 1, "given back once");
        assert!(check(&mut w1, &incoming(&cfg, BODY), &mut c).is_ok());
        give_back(&mut w1, &mut a, false);
        give_back(&mut w1, &mut c, true);
        assert_eq!(
            in_flight(&store, "c"),
            1,
            "torn down: given back on the tick"
        );
        w1.now += 200;
        crate::roles::in_flight::tick(&mut w1, &cfg);
        assert_eq!(in_flight(&store, "c"), 0);
    }

    #[test]
    fn a_consumer_without_a_limit_costs_no_host_call() {
        let cfg = config(CFG);
        let store = Rc::new(FakeStore::new());
        let mut h = FakeHost::new(store.clone());
        let mut a = admission("free", BODY);
        assert!(check(&mut h, &incoming(&cfg, BODY), &mut a).is_ok());
        give_back(&mut h, &mut a, false);
        assert_eq!((h.calls.get(), store.calls.get()), (0, 0));
        assert!(store.is_empty());
    }

    #[test]
    fn a_store_that_fails_admits_or_refuses_by_the_failure_mode() {
        let store = Rc::new(FakeStore::new());
        store.broken.set(true);
        let mut h = FakeHost::new(store.clone());
        let cfg = config(CFG);
        let mut a = admission("c", BODY);
        assert!(check(&mut h, &incoming(&cfg, BODY), &mut a).is_ok());
        assert!(a.in_flight.is_none());
        assert_eq!(h.counter("tollgate.degraded"), 1);
        let closed = config(&CFG.replacen('{', r#"{"failure_mode":"closed","#, 1));
        let Err(Stop::Refuse(r)) = check(&mut h, &incoming(&closed, BODY), &mut a) else {
            panic!("closed")
        };
        assert_eq!(r.kind, ErrorKind::Overloaded);
    }
}
