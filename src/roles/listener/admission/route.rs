//! Where the request starts: the first provider, in failover order, that serves its model and can
//! take it now ([`crate::failover::route`]); and whether the request can be sent there as the client
//! wrote it (a request that would need translating, but cannot be, is refused here with the field
//! named, before any attempt leaves).

use super::{Admission, Incoming, Refusal, Stop};
use crate::api::errors::{ClientApi, ErrorKind};
use crate::failover::refusal::{self, Scope, Why};
use crate::failover::rewrite::{self, Translation};
use crate::failover::route::{self, Start};
use crate::failover::translate;
use crate::host::prof::span;
use crate::host::Host;
use crate::limit::headers::retry_after_secs;

pub fn check<H: Host>(
    host: &mut H,
    incoming: &Incoming<'_>,
    adm: &mut Admission,
) -> Result<(), Stop> {
    let routing = span("listener route");
    let (start, health) = if adm.passthrough {
        let anthropic = incoming.client == ClientApi::Anthropic;
        route::start_speaking(host.store(), incoming.cfg, anthropic, incoming.now)
    } else {
        let tokens = paced_tokens(incoming.cfg, adm);
        route::start_reading(host.store(), incoming.cfg, &adm.model, tokens, incoming.now)
    };
    drop(routing);
    match start {
        Start::Provider(i) => {
            adm.start = i;
            adm.start_health = health;
        }
        Start::NotServed if adm.passthrough => {
            let msg = "No provider of this gateway speaks this client's API: the request cannot be passed through.";
            return Err(Refusal::new(ErrorKind::NotFound, msg)
                .outcome("rejected_path")
                .into());
        }
        Start::NotServed => {
            let msg = format!("The model '{}' is not served by this gateway.", adm.model);
            return Err(Refusal::new(ErrorKind::InvalidRequest, msg)
                .code("model_not_found")
                .into());
        }
        Start::Exhausted {
            retry_after_secs,
            by,
        } => {
            // What blocks the provider that is back soonest, and when: a 429 for its keys' rate
            // limits, a 503 when it fails or refuses the gateway's keys.
            let why = Why::from(by);
            let msg = refusal::with_retry(
                &refusal::blocked_message(why, Scope::Request),
                retry_after_secs,
            );
            return Err(Refusal::new(why.kind(), msg)
                .code(why.code())
                .header("retry-after", retry_after_secs.to_string())
                .outcome("exhausted")
                .retry_in(u32::try_from(retry_after_secs.saturating_mul(1000)).unwrap_or(u32::MAX))
                .into());
        }
        Start::Paced(paced) => {
            // No key can take it before the provider would refuse it: refused here, with no
            // attempt spent on a 429.
            let wait_ms = paced.until_ms.saturating_sub(incoming.now);
            let secs = retry_after_secs(wait_ms);
            let msg = format!(
                "Every provider key that can serve this request has spent the {} its provider allows for now. Please try again in {secs}s.",
                paced.by.as_str()
            );
            return Err(Refusal::new(ErrorKind::RateLimit, msg)
                .code("provider_keys_paced")
                .openai_type(paced.by.as_str())
                .header("retry-after", secs.to_string())
                .outcome("keys_paced")
                .retry_in(u32::try_from(wait_ms).unwrap_or(u32::MAX))
                .into());
        }
        Start::AtLimit => {
            let msg = "Every provider key that can serve this request is at its limit of requests in flight. Please try again in 1s.";
            return Err(Refusal::new(ErrorKind::RateLimit, msg)
                .code("provider_keys_at_limit")
                .header("retry-after", "1")
                .outcome("keys_at_limit")
                .retry_in(super::concurrency::RETRY_IN_MS)
                .into());
        }
    }
    if let (Some(body), false) = (incoming.body, adm.passthrough) {
        translatable(incoming, adm, body)?;
    }
    Ok(())
}

/// What a request will spend of a paced key's tokens: its prompt's estimate and the most it may
/// answer (`max_tokens`, else `default_max_tokens`), as providers count it against their limits.
/// A request passed through counts no tokens.
pub fn paced_tokens(cfg: &crate::config::Config, adm: &Admission) -> u64 {
    if adm.passthrough {
        return 0;
    }
    adm.info
        .prompt_tokens_estimate
        .saturating_add(adm.info.max_tokens.unwrap_or(cfg.default_max_tokens))
}

fn translatable(incoming: &Incoming<'_>, adm: &Admission, body: &[u8]) -> Result<(), Refusal> {
    let Some(p) = incoming.cfg.providers.get(adm.start) else {
        return Ok(());
    };
    let model = incoming.cfg.map_model(adm.start, &adm.model).unwrap_or("");
    let result = match rewrite::translation(incoming.api, p.kind) {
        Ok(Translation::ChatToMessages) => {
            translate::chat_request_to_messages(body, model, incoming.cfg.default_max_tokens)
                .map(|_| ())
        }
        Ok(Translation::MessagesToChat) => {
            translate::messages_request_to_chat(body, model).map(|_| ())
        }
        Ok(Translation::None) => Ok(()),
        Err(msg) => {
            return Err(Refusal::new(ErrorKind::InvalidRequest, msg).code("unsupported_api"))
        }
    };
    result.map_err(|e| {
        Refusal::new(ErrorKind::InvalidRequest, e.to_string()).code("untranslatable_request")
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admission, config, incoming};
    use super::*;
    use crate::failover::health::{cool_key, CooldownReason};
    use crate::host::fake::FakeHost;
    use crate::store::FakeStore;
    use std::rc::Rc;

    const CFG: &str = r#"{"providers":[
        {"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}],"models":{"gpt-4o":"gpt-4o"}},
        {"name":"an","type":"anthropic","keys":[{"id":"a","env":"K"}],"models":{"gpt-4o":"claude","claude":"claude"}}]}"#;
    const GPT: &[u8] = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}"#;

    fn walk_route(
        h: &mut FakeHost,
        cfg: &crate::config::Config,
        body: &[u8],
    ) -> (Result<(), Stop>, Admission) {
        let mut adm = admission("c", body);
        adm.model = adm.info.model.clone().unwrap_or_default();
        let r = check(h, &incoming(cfg, body), &mut adm);
        (r, adm)
    }

    #[test]
    fn starts_on_the_first_provider_that_can_take_it() {
        let cfg = config(CFG);
        let store = Rc::new(FakeStore::new());
        let mut h = FakeHost::new(store.clone());
        let (r, adm) = walk_route(&mut h, &cfg, GPT);
        assert!(r.is_ok());
        assert_eq!(adm.start, 0);
        assert!(
            adm.start_health.is_some(),
            "the attempt reuses this reading"
        );
        cool_key(
            &*store,
            &cfg.providers[0],
            0,
            2_000_000,
            CooldownReason::RateLimited,
        )
        .unwrap();
        let (r, adm) = walk_route(&mut h, &cfg, GPT);
        assert!(r.is_ok());
        assert_eq!(adm.start, 1, "steered past the cooling provider");
    }

    #[test]
    fn an_unserved_model_and_an_exhausted_pool_are_refused_with_their_reasons() {
        let cfg = config(CFG);
        let store = Rc::new(FakeStore::new());
        let mut h = FakeHost::new(store.clone());
        let body = br#"{"model":"nobody","messages":[{"role":"user","content":"x"}]}"#;
        let Err(Stop::Refuse(r)) = walk_route(&mut h, &cfg, body).0 else {
            panic!("not refused")
        };
        assert_eq!(
            (r.kind, r.code),
            (ErrorKind::InvalidRequest, Some("model_not_found"))
        );
        for p in 0..2 {
            cool_key(
                &*store,
                &cfg.providers[p],
                0,
                1_030_000,
                CooldownReason::RateLimited,
            )
            .unwrap();
        }
        let Err(Stop::Refuse(r)) = walk_route(&mut h, &cfg, GPT).0 else {
            panic!("not refused")
        };
        assert_eq!(r.kind, ErrorKind::RateLimit);
        assert_eq!(r.outcome, "exhausted");
        assert_eq!(r.headers, vec![("retry-after", "30".to_string())]);
    }

    #[test]
    fn failing_providers_are_refused_as_unavailable_naming_what_is_back_soonest() {
        use crate::failover::health::{failed, read};
        let cfg = config(CFG);
        let store = Rc::new(FakeStore::new());
        let mut h = FakeHost::new(store.clone());
        let now = incoming(&cfg, GPT).now;
        // oa fails five times in a row: its circuit is open for 30 s.
        for _ in 0..5 {
            let seen = read(&*store, &cfg.providers[0]).unwrap().seen();
            failed(&*store, &cfg.providers[0], &cfg.health, seen, now, None).unwrap();
        }
        let refused = |h: &mut FakeHost| match walk_route(h, &cfg, GPT).0 {
            Err(Stop::Refuse(r)) => (r.kind, r.code, r.headers),
            Ok(()) | Err(Stop::Serve(_)) => panic!("not refused"),
        };
        let rest = |until| {
            let seen = read(&*store, &cfg.providers[1]).unwrap().seen();
            failed(
                &*store,
                &cfg.providers[1],
                &cfg.health,
                seen,
                now,
                Some((0, until)),
            )
            .unwrap();
        };
        // an's only key rests 2 s after a 5xx: that is back first.
        rest(now + 2_000);
        assert_eq!(
            refused(&mut h),
            (
                ErrorKind::Overloaded,
                Some("provider_unavailable"),
                vec![("retry-after", "2".to_string())]
            )
        );
        // Resting past oa's open circuit: the circuit is what to wait for.
        rest(now + 60_000);
        assert_eq!(
            refused(&mut h),
            (
                ErrorKind::Overloaded,
                Some("provider_circuit_open"),
                vec![("retry-after", "30".to_string())]
            )
        );
    }
}
