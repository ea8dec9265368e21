//! The response cache's lookup ([`crate::cache`]): after the model step (the key uses the model the
//! client named), before the route (a hit needs no provider).
//!
//! A fresh entry makes the request a hit: the route step is skipped, the quota step still counts it
//! as one request against the consumer's request limits (and nothing against its token or cost
//! budgets), and the walk ends with the answer served ([`serve`], a [`Stop::Serve`]). An expired
//! entry within the stale window is remembered, not read: it is served only when no provider can
//! take the request ([`instead`], when the route step finds every key cooling or every circuit
//! open) or when the provider's answer is a 5xx (the answer side).
//!
//! Not configured: [`ask`] and [`check`] return at once (no host call, no shared-data read, no
//! digest).

use super::{Admission, Incoming, LocalAnswer, Stop};
use crate::api::errors::ClientApi;
use crate::cache::entry::{Age, Entry};
use crate::cache::key::{self, Digest, Subject};
use crate::cache::policy::{self, Asked};
use crate::cache::{replay, slots, HEADER};
use crate::config::Config;
use crate::count::usage::{ApiKind, Usage};
use crate::host::{Headers, Host};
use crate::limit::header_names;

/// What the cache did for the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Outcome {
    /// No cache applies: not configured, or the request is out of its scope or of its APIs.
    #[default]
    Off,
    /// Not looked up: not deterministic and not asked for, or the client said `no-cache`.
    Bypass,
    Miss,
    Hit,
    /// An expired entry served because no provider could answer.
    Stale,
}

impl Outcome {
    /// The `x-tollgate-cache` response header's value; None when no cache applies.
    pub fn header(self) -> Option<&'static str> {
        match self {
            Outcome::Off => None,
            Outcome::Bypass => Some("bypass"),
            Outcome::Miss => Some("miss"),
            Outcome::Hit => Some("hit"),
            Outcome::Stale => Some("stale"),
        }
    }
}

/// The cache's part of the admission.
#[derive(Debug, Default)]
pub struct CacheUse {
    /// What the client asked, read from the request headers; None when no cache is configured.
    pub asked: Option<Asked>,
    /// The client's path and `anthropic-beta`: parts of the key (copied only when configured).
    pub path: String,
    pub beta: String,
    pub outcome: Outcome,
    /// The request's key, when it is cacheable.
    pub digest: Option<Digest>,
    /// The answer is to be stored when it completes.
    pub store: bool,
    /// The way of the request's set holding its expired entry (within the stale window).
    pub stale_way: Option<usize>,
    /// The entry answered from (a hit or a stale answer).
    pub served: Option<Served>,
}

/// An answer from the cache: what the charge needs of its entry, and the answer itself until it is
/// sent (taken then: the body is not copied again).
#[derive(Debug)]
pub struct Served {
    pub stored_at_ms: u64,
    /// What the provider's answer cost when it was stored: what this answer saved.
    pub usage: Usage,
    pub answer: Option<LocalAnswer>,
}

impl CacheUse {
    /// The answer will be served from the cache: no provider is needed.
    pub fn serves(&self) -> bool {
        self.served.is_some()
    }

    /// The answer from the cache, taken to be sent.
    pub fn take_answer(&mut self) -> Option<LocalAnswer> {
        self.served.as_mut().and_then(|s| s.answer.take())
    }

    /// The access-log record's part: ` cache=hit age=12` (the age of an entry served), ` cache=miss`;
    /// nothing when no cache applies.
    pub fn note(&self, now: u64, out: &mut String) {
        let Some(outcome) = self.outcome.header() else {
            return;
        };
        out.push_str(" cache=");
        out.push_str(outcome);
        if let Some(served) = &self.served {
            out.push_str(" age=");
            out.push_str(&(now.saturating_sub(served.stored_at_ms) / 1000).to_string());
        }
    }
}

/// From the request headers, before the body: what the client asks of the cache.
pub fn ask(cfg: &Config, hdrs: &Headers, path: &str, adm: &mut Admission) {
    if cfg.cache.is_none() {
        return;
    }
    let cache_control = hdrs
        .raw()
        .filter(|(k, _)| *k == b"cache-control")
        .map(|(_, v)| v);
    adm.cache.asked = Some(Asked::read(hdrs.get(HEADER), cache_control));
    adm.cache.path = path.to_string();
    adm.cache.beta = hdrs
        .get_str("anthropic-beta")
        .unwrap_or_default()
        .to_string();
}

pub fn check<H: Host>(
    host: &mut H,
    incoming: &Incoming<'_>,
    adm: &mut Admission,
) -> Result<(), Stop> {
    let (Some(cc), Some(asked), Some(body)) =
        (incoming.cfg.cache.as_ref(), adm.cache.asked, incoming.body)
    else {
        return Ok(());
    };
    let api = matches!(incoming.api, ApiKind::ChatCompletions | ApiKind::Messages);
    // Names a trusted header gives past `max_from_header` are one consumer: their entries would be
    // shared by callers who never chose to share a scope.
    let overflow = !cc.shared_scope && adm.consumer == header_names::OVERFLOW;
    if !api || overflow || !cc.applies(&adm.consumer, &adm.model, &adm.cache.path) {
        return Ok(());
    }
    let cacheable = asked.opt_in || policy::deterministic(body);
    let digest = if cacheable && !(asked.no_cache && asked.no_store) {
        key::digest(&Subject {
            scope: (!cc.shared_scope).then_some(adm.consumer.as_str()),
            path: &adm.cache.path,
            beta: &adm.cache.beta,
            body,
        })
    } else {
        None
    };
    let Some(digest) = digest else {
        adm.cache.outcome = Outcome::Bypass;
        host.count("tollgate.cache.bypasses", 1);
        return Ok(());
    };
    adm.cache.digest = Some(digest);
    adm.cache.store = !asked.no_store;
    if asked.no_cache {
        adm.cache.outcome = Outcome::Bypass;
        host.count("tollgate.cache.bypasses", 1);
        return Ok(());
    }
    adm.cache.outcome = Outcome::Miss;
    match slots::lookup(host.store(), cc, &digest, incoming.now) {
        Ok(slots::Found::Fresh(e)) => {
            if let Some(served) = answer_of(incoming.client, incoming.now, adm, e, false) {
                adm.cache.outcome = Outcome::Hit;
                adm.cache.store = false;
                adm.cache.served = Some(served);
            }
        }
        Ok(slots::Found::Stale { way }) => adm.cache.stale_way = Some(way),
        Ok(slots::Found::Miss) => {}
        Err(e) => log::warn!("cache lookup failed ({e:?}): treated as a miss"),
    }
    host.count(
        if adm.cache.outcome == Outcome::Hit {
            "tollgate.cache.hits"
        } else {
            "tollgate.cache.misses"
        },
        1,
    );
    Ok(())
}

/// The route step stopped the request: when it is because no provider can take it (every key
/// cooling, every circuit open), an expired entry within the stale window answers instead.
pub fn instead<H: Host>(
    host: &mut H,
    incoming: &Incoming<'_>,
    adm: &mut Admission,
    stop: Stop,
) -> Result<(), Stop> {
    let Stop::Refuse(r) = &stop else {
        return Err(stop);
    };
    if r.outcome != "exhausted" {
        return Err(stop);
    }
    match stale_answer(host, incoming.cfg, incoming.client, incoming.now, adm) {
        true => Ok(()),
        false => Err(stop),
    }
}

/// Reads the request's expired entry and, if it is still its own and within the stale window,
/// makes it the answer (`x-tollgate-cache: stale`). False when there is none.
pub fn stale_answer<H: Host>(
    host: &mut H,
    cfg: &Config,
    client: ClientApi,
    now: u64,
    adm: &mut Admission,
) -> bool {
    let (Some(cc), Some(digest), Some(way)) =
        (cfg.cache.as_ref(), adm.cache.digest, adm.cache.stale_way)
    else {
        return false;
    };
    let Ok(Some((e, _age @ (Age::Stale | Age::Fresh)))) =
        slots::fetch(host.store(), cc, &digest, way, now)
    else {
        return false;
    };
    let Some(served) = answer_of(client, now, adm, e, true) else {
        return false;
    };
    adm.cache.outcome = Outcome::Stale;
    adm.cache.store = false;
    adm.cache.served = Some(served);
    host.count("tollgate.cache.stale_served", 1);
    true
}

/// The last step: a request answered from the cache ends the walk with its answer, carrying the
/// consumer's rate-limit headers as the quota step left them.
pub fn serve(adm: &mut Admission) -> Result<(), Stop> {
    match adm.cache.take_answer() {
        Some(mut answer) => {
            answer.headers.extend(adm.rate_limits.iter().cloned());
            Err(Stop::Serve(answer))
        }
        None => Ok(()),
    }
}

/// The entry as the client asked for it: the JSON as stored, or replayed as a stream of the
/// client's dialect. None when the entry is not of the client's dialect or cannot be replayed.
pub fn answer_of(
    client: ClientApi,
    now: u64,
    adm: &Admission,
    e: Entry,
    stale: bool,
) -> Option<Served> {
    if e.client != client {
        return None;
    }
    let (content_type, body) = if adm.info.stream {
        let body = match e.client {
            ClientApi::OpenAi => replay::chat_stream(&e.body, adm.info.include_usage),
            ClientApi::Anthropic => replay::messages_stream(&e.body),
        }?;
        ("text/event-stream", body)
    } else {
        ("application/json", e.body)
    };
    let age_s = now.saturating_sub(e.stored_at_ms) / 1000;
    let answer = LocalAnswer {
        status: 200,
        headers: vec![
            ("content-type", content_type.to_string()),
            (HEADER, if stale { "stale" } else { "hit" }.to_string()),
            ("age", age_s.to_string()),
        ],
        body,
    };
    Some(Served {
        stored_at_ms: e.stored_at_ms,
        usage: e.usage,
        answer: Some(answer),
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admission, config, incoming};
    use super::*;
    use crate::cache::slots::put;
    use crate::host::fake::FakeHost;
    use crate::store::FakeStore;
    use std::rc::Rc;

    const CFG: &str = r#"{"consumers":{"list":[{"name":"a","key_env":"K"},{"name":"b","key_env":"K"}]},
        "providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}],
        "cache":{"ttl":"1m","stale_window":"1h","consumers":["a","b"]}}"#;
    const ASKED: &[u8] =
        br#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"x"}]}"#;
    const ANSWER: &[u8] = br#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"cached"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;

    fn asked(consumer: &str, body: &[u8], headers: &[(&str, &[u8])]) -> Admission {
        let cfg = config(CFG);
        let mut adm = admission(consumer, body);
        let hdrs = Headers::of(headers.iter().map(|(k, v)| (k.as_bytes(), *v)));
        ask(&cfg, &hdrs, "/v1/chat/completions", &mut adm);
        adm
    }

    fn stored(store: &FakeStore, cfg: &Config, consumer: &str, at: u64) {
        let adm = asked(consumer, ASKED, &[]);
        let digest = key::digest(&Subject {
            scope: Some(consumer),
            path: &adm.cache.path,
            beta: "",
            body: ASKED,
        })
        .unwrap();
        let e = Entry {
            digest,
            stored_at_ms: at,
            ttl_ms: 60_000,
            usage: Usage::default(),
            client: ClientApi::OpenAi,
            body: ANSWER.to_vec(),
        };
        put(store, cfg.cache.as_ref().unwrap(), &e, at).unwrap();
    }

    #[test]
    fn not_configured_costs_nothing() {
        let cfg = config(
            r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}]}"#,
        );
        let store = Rc::new(FakeStore::new());
        let mut h = FakeHost::new(store.clone());
        let mut adm = admission("a", ASKED);
        let hdrs = Headers::of([(&b"x-tollgate-cache"[..], &b"on"[..])].into_iter());
        ask(&cfg, &hdrs, "/v1/chat/completions", &mut adm);
        assert!(check(&mut h, &incoming(&cfg, ASKED), &mut adm).is_ok());
        assert_eq!(adm.cache.outcome, Outcome::Off);
        assert!(adm.cache.asked.is_none() && adm.cache.path.is_empty());
        assert_eq!(store.calls.get(), 0);
        assert!(h.counters.is_empty());
    }

    #[test]
    fn a_deterministic_request_misses_then_hits_and_only_its_own_consumers_entry() {
        let cfg = config(CFG);
        let store = Rc::new(FakeStore::new());
        let mut h = FakeHost::new(store.clone());
        let inc = incoming(&cfg, ASKED);
        let mut adm = asked("a", ASKED, &[]);
        assert!(check(&mut h, &inc, &mut adm).is_ok());
        assert_eq!((adm.cache.outcome, adm.cache.store), (Outcome::Miss, true));
        stored(&store, &cfg, "a", inc.now - 1_000);

        let mut adm = asked("a", ASKED, &[]);
        assert!(check(&mut h, &inc, &mut adm).is_ok());
        assert_eq!((adm.cache.outcome, adm.cache.store), (Outcome::Hit, false));
        adm.rate_limits = vec![("x-ratelimit-remaining-requests", "9".into())];
        let Err(Stop::Serve(a)) = serve(&mut adm) else {
            panic!("not served")
        };
        assert_eq!((a.status, a.body.as_slice()), (200, ANSWER));
        assert!(a.headers.contains(&("age", "1".into())));
        assert!(a.headers.contains(&(HEADER, "hit".into())));
        assert!(a
            .headers
            .contains(&("x-ratelimit-remaining-requests", "9".into())));

        let mut other = asked("b", ASKED, &[]);
        assert!(check(&mut h, &inc, &mut other).is_ok());
        assert_eq!(
            other.cache.outcome,
            Outcome::Miss,
            "another consumer's entry"
        );
        assert_eq!(h.counters.get("tollgate.cache.hits"), Some(&1));
        assert_eq!(h.counters.get("tollgate.cache.misses"), Some(&2));
    }

    #[test]
    fn the_overflow_of_header_named_consumers_is_not_cached_unless_the_scope_is_shared() {
        for (shared, outcome) in [(false, Outcome::Off), (true, Outcome::Miss)] {
            let cfg = config(&format!(
                r#"{{"consumers":{{"trusted_header":"x-team"}},
                    "providers":[{{"name":"oa","type":"openai","keys":[{{"id":"k","env":"K"}}]}}],
                    "cache":{{"shared_scope":{shared}}}}}"#
            ));
            let mut h = FakeHost::new(Rc::new(FakeStore::new()));
            let mut adm = admission(header_names::OVERFLOW, ASKED);
            ask(&cfg, &Headers::default(), "/v1/chat/completions", &mut adm);
            assert!(check(&mut h, &incoming(&cfg, ASKED), &mut adm).is_ok());
            assert_eq!(adm.cache.outcome, outcome, "shared_scope {shared}");
        }
    }

    #[test]
    fn a_streaming_request_gets_the_stored_json_as_a_stream() {
        let cfg = config(CFG);
        let store = Rc::new(FakeStore::new());
        let mut h = FakeHost::new(store.clone());
        let inc = incoming(&cfg, ASKED);
        stored(&store, &cfg, "a", inc.now);
        let streaming = br#"{"model":"m","temperature":0,"stream":true,"messages":[{"role":"user","content":"x"}]}"#;
        let mut adm = asked("a", streaming, &[]);
        let inc = incoming(&cfg, streaming);
        assert!(check(&mut h, &inc, &mut adm).is_ok());
        let Err(Stop::Serve(a)) = serve(&mut adm) else {
            panic!("not served")
        };
        assert!(a
            .headers
            .contains(&("content-type", "text/event-stream".into())));
        let text = String::from_utf8(a.body).unwrap();
        assert!(text.contains("\"content\":\"cached\"") && text.ends_with("data: [DONE]\n\n"));
        assert!(!text.contains("usage"), "the client did not ask for usage");
    }

    #[test]
    fn what_the_client_asks_decides_lookup_and_store() {
        let cfg = config(CFG);
        let store = Rc::new(FakeStore::new());
        let mut h = FakeHost::new(store.clone());
        let random =
            br#"{"model":"m","temperature":0.7,"messages":[{"role":"user","content":"x"}]}"#;
        let inc = incoming(&cfg, random);
        let mut adm = asked("a", random, &[]);
        assert!(check(&mut h, &inc, &mut adm).is_ok());
        assert_eq!(
            (adm.cache.outcome, adm.cache.digest),
            (Outcome::Bypass, None)
        );
        assert_eq!(store.calls.get(), 0, "a bypass reads nothing");

        let mut adm = asked("a", random, &[("x-tollgate-cache", b"on")]);
        assert!(check(&mut h, &inc, &mut adm).is_ok());
        assert_eq!(adm.cache.outcome, Outcome::Miss);

        let inc = incoming(&cfg, ASKED);
        stored(&store, &cfg, "a", inc.now);
        let mut adm = asked("a", ASKED, &[("cache-control", b"no-cache")]);
        assert!(check(&mut h, &inc, &mut adm).is_ok());
        assert_eq!(
            (adm.cache.outcome, adm.cache.store),
            (Outcome::Bypass, true)
        );
        let mut adm = asked("a", ASKED, &[("cache-control", b"no-store")]);
        assert!(check(&mut h, &inc, &mut adm).is_ok());
        assert_eq!((adm.cache.outcome, adm.cache.store), (Outcome::Hit, false));
        let mut adm = asked(
            "a",
            ASKED,
            &[
                ("cache-control", b"no-store"),
                ("cache-control", b"no-cache"),
            ],
        );
        assert!(check(&mut h, &inc, &mut adm).is_ok());
        assert_eq!(
            (adm.cache.outcome, adm.cache.store),
            (Outcome::Bypass, false)
        );
    }

    #[test]
    fn an_expired_entry_is_served_stale_only_when_no_provider_can_answer() {
        let cfg = config(CFG);
        let store = Rc::new(FakeStore::new());
        let mut h = FakeHost::new(store.clone());
        let inc = incoming(&cfg, ASKED);
        stored(&store, &cfg, "a", inc.now - 120_000);
        let mut adm = asked("a", ASKED, &[]);
        assert!(check(&mut h, &inc, &mut adm).is_ok());
        assert_eq!(adm.cache.outcome, Outcome::Miss);
        assert!(adm.cache.stale_way.is_some() && !adm.cache.serves());
        // Another refusal than an exhausted pool goes on as it was.
        let other = Stop::Refuse(super::super::Refusal::new(
            crate::api::errors::ErrorKind::InvalidRequest,
            "x",
        ));
        assert!(matches!(
            instead(&mut h, &inc, &mut adm, other),
            Err(Stop::Refuse(_))
        ));
        let exhausted = Stop::Refuse(
            super::super::Refusal::new(crate::api::errors::ErrorKind::RateLimit, "x")
                .outcome("exhausted"),
        );
        assert!(instead(&mut h, &inc, &mut adm, exhausted).is_ok());
        assert_eq!(adm.cache.outcome, Outcome::Stale);
        let Err(Stop::Serve(a)) = serve(&mut adm) else {
            panic!("not served")
        };
        assert!(a.headers.contains(&(HEADER, "stale".into())));
        assert!(a.headers.contains(&("age", "120".into())));
    }
}
