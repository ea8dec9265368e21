//! Cluster-level role: runs once per upstream attempt, for whichever endpoint Envoy picked.
//!
//! It owns what the provider sees: the key (chosen from the pool, never one cooling down), the
//! provider's credential headers, path and authority, and the request body rewritten or translated
//! for that provider. On the way back it records what the answer says of the key and the provider
//! (cooldown for as long as the provider asked, circuit), names them in response headers for the
//! listener role, and takes the key out of any error body that quotes it. Everything else the client
//! sees is the listener role's.

use super::listener::CLIENT_GONE;
use super::plan::{self, Plan};
use super::refused::{self, Refused};
use super::Flow;
use crate::api::errors::{error_body, error_body_typed, ClientApi, ErrorKind};
use crate::api::headers;
use crate::api::request;
use crate::api::splice;
use crate::config::{Config, KeySecret, Provider};
use crate::count::usage::ApiKind;
use crate::failover::health::{self, CooldownReason, Seen};
use crate::failover::pace::{self, Announcement};
use crate::failover::refusal::{self, Scope, Why};
use crate::failover::retry_signal;
use crate::failover::rewrite::{self, Translation};
use crate::failover::route;
use crate::failover::translate::{self, TranslateError};
use crate::host::prof::span;
use crate::host::tally::Attempt;
use crate::host::{Body, Edits, Headers, Host, Map};
use crate::limit::headers as limit_headers;
use crate::limit::in_flight::{self, key_lane, Subject, Take};
use crate::pool::credentials;
use crate::pool::keypool::{self, Choice};
use crate::store::StoreError;
use core::ops::Range;
use std::rc::Rc;

/// The attempt number Envoy gives this attempt (1, 2, ...; 8 bytes little-endian), 0 if unknown.
fn attempt_number<H: Host>(host: &H) -> u64 {
    host.property(&["upstream", "request_attempt_count"])
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// Filter state (`wasm.tollgate_last_attempt`) an attempt that failed leaves for the request's next
/// attempt: its status (0: no answer). Written on failures only.
pub const LAST_ATTEMPT: &str = "tollgate_last_attempt";

/// On this role's own refusals: the attempt never reached a provider.
const HDR_EXHAUSTED: &str = "x-tollgate-exhausted";

/// Metadata namespace and key on an endpoint (or cluster) naming its tollgate provider.
const METADATA_NS: &str = "tollgate";
const METADATA_KEY: &str = "provider";

pub struct Upstream {
    cfg: Rc<Config>,
    /// The plan as read (empty without a listener role in front), and where in it the rate-limit
    /// headers the answer gets are.
    plan: Vec<u8>,
    rate_limits: Vec<(Range<usize>, Range<usize>)>,
    api: ApiKind,
    client: ClientApi,
    provider: Option<usize>,
    key: Option<usize>,
    translation: Translation,
    /// The body must be read to rewrite it (translated, or another model name).
    rewrites: bool,
    /// The model the client asked for, as the listener's plan names it: the body need not be read
    /// again to learn it. None without a listener role in front (the body tells it then).
    planned_model: Option<String>,
    /// The attempt's headers went on towards the provider.
    sent: bool,
    status: u16,
    /// An error answer: buffered to take the key out if the provider quoted it.
    scrub: bool,
    finished: bool,
    /// What the attempt saw of its provider's circuit when it began.
    seen: Seen,
    /// The key was on probation when it was chosen: a 2xx answer counts towards its full share.
    probation: bool,
    /// The attempt holds a place among its key's requests in flight (its provider's entry and the
    /// key's lane), given back when the attempt ends: kept whole, since the attempt may forget its
    /// provider and key before it ends (a header write refused).
    place: Option<(Subject, u64)>,
    /// The provider's answer came to its end.
    answered: bool,
    /// Pacing of the attempt's key ([`pace`]): what the request will spend of its tokens, whether
    /// its provider was known to announce what its keys have left, and what [`pace::take`] counted
    /// against the key (settled once, when the answer comes or the attempt ends).
    tokens: u64,
    announced: bool,
    spent: Option<u64>,
}

impl Upstream {
    pub fn new(cfg: Rc<Config>) -> Self {
        Upstream {
            cfg,
            plan: Vec::new(),
            rate_limits: Vec::new(),
            api: ApiKind::Other,
            client: ClientApi::OpenAi,
            provider: None,
            key: None,
            translation: Translation::None,
            rewrites: false,
            planned_model: None,
            sent: false,
            status: 0,
            scrub: false,
            finished: false,
            seen: Seen::default(),
            probation: false,
            place: None,
            answered: false,
            tokens: 0,
            announced: false,
            spent: None,
        }
    }

    fn provider(&self) -> Option<&Provider> {
        self.provider.and_then(|i| self.cfg.providers.get(i))
    }

    /// An answer from the attempt itself, in the client's shape. Envoy does not retry an upstream
    /// filter's own answer: it is the request's.
    fn local<H: Host>(
        &self,
        host: &mut H,
        kind: ErrorKind,
        status: u16,
        message: &str,
        extra: &[(&str, &str)],
    ) -> Flow {
        let body = error_body(self.client, kind, message, None, None);
        let mut headers = vec![("content-type", "application/json")];
        headers.extend_from_slice(extra);
        host.respond(status, &headers, &body);
        Flow::Stop
    }

    /// A refusal of this attempt in the client's shape. Final: Envoy does not retry an upstream
    /// filter's local answer, so it says what the request's attempts came to.
    fn refuse<H: Host>(
        &self,
        host: &mut H,
        why: Why,
        message: &str,
        retry_after_secs: u64,
    ) -> Flow {
        let a = refusal::answer(self.client, why, message, retry_after_secs);
        host.respond(
            a.status,
            &[
                ("content-type", "application/json"),
                ("retry-after", &a.retry_after),
                (HDR_EXHAUSTED, "true"),
            ],
            &a.body,
        );
        Flow::Stop
    }

    /// Envoy's retry moved the request to a provider that does not serve its model: it is not
    /// called. The client gets what the request's last real attempt meant (its 429, or its 5xx's
    /// class; what blocks the providers that serve the model when that attempt left no word), and
    /// `Retry-After` when one of them can take it again. This ends the request's attempts: a
    /// provider after this one that serves the model is not tried (see the README's failover
    /// section); the client's retry starts on it when it is the one available.
    fn not_served<H: Host>(&self, host: &mut H, p: &Provider, model: &str) -> Flow {
        let now = host.now_ms();
        let recovery = route::recovery(host.store(), &self.cfg, model, now);
        let last = host
            .property(&[LAST_ATTEMPT])
            .and_then(|v| core::str::from_utf8(&v).ok()?.parse::<u16>().ok());
        let why = match (last, recovery) {
            (Some(status), _) => Why::of_status(status),
            (None, Some(b)) => b.by.into(),
            (None, None) => Why::ServerErrors,
        };
        let until = recovery.map_or(now, |b| b.until_ms);
        let secs = limit_headers::retry_after_secs(until.saturating_sub(now));
        host.count(
            &format!("tollgate.provider.{}.not_served_attempts", p.name),
            1,
        );
        let after = match last {
            Some(429) => "after an attempt that was rate limited (429)".to_string(),
            Some(0) => "after an attempt that got no answer".to_string(),
            Some(s) => format!("after an attempt answered {s}"),
            None => "after an attempt that failed".to_string(),
        };
        let msg = format!(
            "The model '{model}' is not served by provider '{}', next in the failover order, {after}.",
            p.name
        );
        self.refuse(host, why, &msg, secs)
    }

    /// Which provider Envoy picked: the endpoint's `tollgate.provider` metadata, else the cluster's,
    /// else the only provider configured.
    fn pick_provider<H: Host>(&self, host: &H) -> Result<usize, String> {
        // Reading endpoint metadata is one of the dearest host calls (~5 µs): with a single
        // provider there is nothing to tell apart.
        if self.cfg.providers.len() == 1 {
            return Ok(0);
        }
        let md = |scope: &str| {
            host.property(&["xds", scope, "filter_metadata", METADATA_NS, METADATA_KEY])
                .and_then(|b| String::from_utf8(b).ok())
        };
        match md("upstream_host_metadata").or_else(|| md("cluster_metadata")) {
            Some(name) => self
                .cfg
                .provider(&name)
                .map(|(i, _)| i)
                .ok_or_else(|| format!("endpoint metadata names provider '{name}', which is not configured")),
            None => Err("the endpoint carries no tollgate.provider metadata and several providers are configured".into()),
        }
    }

    pub fn on_request_headers<H: Host>(&mut self, host: &mut H) -> Flow {
        // One read of the map and one write carry the whole attempt's headers.
        let mut map = Edits::of(host.headers(Map::RequestHeaders));
        self.plan = host.property(&[plan::FILTER_STATE]).unwrap_or_default();
        let decoding = span("upstream plan decode");
        let planned = Plan::decode(&self.plan);
        drop(decoding);
        // Kept as places in the plan's bytes: the answer's headers borrow them from there.
        let at = |s: &str| splice::span_bytes(&self.plan, s.as_bytes());
        self.rate_limits = planned
            .iter()
            .flat_map(|p| &p.rate_limits)
            .filter_map(|(k, v)| Some((at(k)?, at(v)?)))
            .collect();
        // The listener role took the client's credentials out: one found here was set by an
        // earlier attempt of this request (by tollgate, or by Envoy for an `sds` key), in this same
        // header map. This is a retry. Envoy injects nothing for a secret it does not have: with
        // `sds` keys configured, the attempt count tells (one property read).
        let listener = planned.is_some();
        let retry = listener
            && (headers::CREDENTIAL_HEADERS.iter().any(|h| map.has(h))
                || (self.cfg.has_sds_keys() && attempt_number(host) > 1));
        // Every attempt starts again from the request as the client sent it: the header map Envoy
        // hands to this attempt is the one the previous attempt rewrote.
        let current: (String, String);
        let direct = planned.is_none();
        let plan = match planned {
            Some(plan) => plan,
            None => {
                // No listener role in front (a direct caller of the cluster): the headers as they are.
                current = (
                    map.get(":path").unwrap_or_default().to_string(),
                    map.get(":authority").unwrap_or_default().to_string(),
                );
                Plan {
                    path: &current.0,
                    authority: &current.1,
                    ..Plan::default()
                }
            }
        };
        self.api = ApiKind::from_path(plan.path);
        self.client = ClientApi::from_path(plan.path);
        let pi = match self.pick_provider(host) {
            Ok(i) => i,
            Err(msg) => {
                log::error!("{msg}");
                return self.local(
                    host,
                    ErrorKind::Internal,
                    500,
                    "The gateway's provider routing is misconfigured.",
                    &[],
                );
            }
        };
        self.provider = Some(pi);
        let cfg = self.cfg.clone();
        let Some(p) = cfg.providers.get(pi) else {
            return self.local(
                host,
                ErrorKind::Internal,
                500,
                "provider index out of range",
                &[],
            );
        };
        if listener && !plan.model.is_empty() && cfg.map_model(pi, plan.model).is_none() {
            return self.not_served(host, p, plan.model);
        }
        self.translation = match rewrite::translation(self.api, p.kind) {
            Ok(t) => t,
            Err(msg) => return self.local(host, ErrorKind::InvalidRequest, 400, &msg, &[]),
        };
        let attempt = match rewrite::attempt_plan(
            &cfg,
            pi,
            self.api,
            plan.path,
            Some(plan.model),
            plan.rewritten,
        ) {
            Ok(x) => x,
            Err(msg) => return self.local(host, ErrorKind::InvalidRequest, 400, &msg, &[]),
        };
        // Without a plan (a direct caller of the cluster) the model is known only from the body. A
        // path tollgate does not count goes as it is.
        self.rewrites = self.translation != Translation::None
            || attempt.remodel
            || (direct
                && self.api != ApiKind::Other
                && (!p.models.is_empty() || !cfg.aliases.is_empty()));
        self.planned_model =
            (self.rewrites && listener && !plan.model.is_empty()).then(|| plan.model.to_string());
        // The first attempt goes out milliseconds after the listener read the clock.
        let now = match plan.at_ms {
            Some(t) if !retry => t,
            _ => host.now_ms(),
        };
        // The first attempt, on the provider the listener chose, takes the health the listener
        // read microseconds ago; a retry reads it afresh. (The circuit was consulted by the
        // listener when it chose where the request starts; a retry Envoy moved here goes ahead.)
        let choosing = span("upstream key choice");
        let snapshot = plan
            .start
            .filter(|(start, _)| *start == pi && !retry)
            .map(|(_, bytes)| health::ProviderHealth::decode(Some(bytes), p));
        let health = match snapshot {
            Some(h) => h,
            None => health::read(host.store(), p)
                .unwrap_or_else(|_| health::ProviderHealth::decode(None, p)),
        };
        self.seen = health.seen();
        self.tokens = plan.tokens;
        self.announced = health.announces();
        let paced = cfg.pacing.configured(pi) || self.announced;
        let sticky = cfg
            .sticky_header
            .as_deref()
            .and_then(|h| map.get(h))
            .or(Some(plan.consumer).filter(|c| !c.is_empty()));
        let ask = keypool::Ask {
            sticky,
            prefix: plan.prefix,
            ..keypool::Ask::default()
        };
        let limited = cfg.in_flight.provider(pi);
        let paced = paced.then_some(self.tokens);
        let (choice, place, spent) = choose_key(host, p, &health, ask, now, limited, paced);
        self.place = place;
        let ki = match choice {
            Choice::Key(i) => {
                self.spent = spent.ok().flatten();
                i
            }
            Choice::AtLimit if spent.is_err() => {
                // Every key was spent by other workers since the listener read them.
                host.count(&format!("tollgate.provider.{}.paced_attempts", p.name), 1);
                let paced = spent.err();
                let until = paced.map_or(now, |pc| pc.until_ms);
                let by = paced.map_or("requests", |pc| pc.by.as_str());
                let secs = limit_headers::retry_after_secs(until.saturating_sub(now)).to_string();
                let msg = format!(
                    "Every key of provider '{}' has spent the {by} its provider allows for now.",
                    p.name
                );
                let body = error_body_typed(
                    self.client,
                    ErrorKind::RateLimit,
                    &msg,
                    Some("provider_keys_paced"),
                    None,
                    Some(by),
                );
                host.respond(
                    429,
                    &[
                        ("content-type", "application/json"),
                        ("retry-after", &secs),
                        (HDR_EXHAUSTED, "true"),
                    ],
                    &body,
                );
                return Flow::Stop;
            }
            Choice::AtLimit => {
                host.count(
                    &format!("tollgate.provider.{}.at_limit_attempts", p.name),
                    1,
                );
                // Another worker filled the keys since the listener chose this provider (it passes
                // over a provider whose keys are all full): this answer reaches the client.
                return self.local(
                    host,
                    ErrorKind::RateLimit,
                    429,
                    "Every key of this provider is at its limit of requests in flight; try again in a second.",
                    &[("retry-after", "1"), (HDR_EXHAUSTED, "true")],
                );
            }
            Choice::Exhausted { retry_at_ms } => {
                host.count(
                    &format!("tollgate.provider.{}.exhausted_attempts", p.name),
                    1,
                );
                let why = health
                    .blocked(&cfg.health, now)
                    .map_or(Why::RateLimited, |b| b.by.into());
                let msg = refusal::blocked_message(why, Scope::Provider(&p.name));
                let secs = limit_headers::retry_after_secs(retry_at_ms.saturating_sub(now));
                return self.refuse(host, why, &msg, secs);
            }
        };
        drop(choosing);
        self.key = Some(ki);
        self.probation = health.probation_left(ki) > 0;
        let Some(key) = p.keys.get(ki) else {
            return self.local(
                host,
                ErrorKind::Internal,
                500,
                "key index out of range",
                &[],
            );
        };
        let auth = credentials::auth_headers(p, key);
        // Credentials of another provider's kind (a previous attempt's) and tollgate's routing
        // header go; the listener role already took out the client's.
        map.remove_where(|name| {
            name.starts_with(headers::INTERNAL_PREFIX.as_bytes())
                || (headers::is_credential(name) && !auth.iter().any(|(a, _)| a.as_bytes() == name))
        });
        for (name, value) in &auth {
            map.set(*name, value.as_str());
        }
        match &p.host {
            Some(h) => map.set(":authority", h),
            None if !plan.authority.is_empty() => map.set(":authority", plan.authority),
            None => {}
        }
        map.set(":path", &attempt.path);
        if attempt.rewrites_body {
            map.remove("content-length");
        }
        if !map.apply(host, Map::RequestHeaders) {
            // The attempt never leaves: nothing it did is held against the key or the provider.
            (self.key, self.provider) = (None, None);
            return refused::fail_closed(host, self.client, Refused::Credential);
        }
        host.attempt(&p.name, Attempt::Sent);
        if retry {
            // A retry that landed here: a failover onto this provider (or another key of it).
            host.attempt(&p.name, Attempt::Retried);
        }
        self.sent = true;
        Flow::Continue
    }

    /// Gives back the attempt's place among its key's requests in flight, once. An attempt cut
    /// before its answer ended (reset, timeout, client gone) gives it back on the VM's next tick:
    /// Envoy may close its connection to the provider after the teardown callbacks, and until then
    /// the provider still has it (as the listener's place, `admission::concurrency::give_back`).
    fn give_back_place<H: Host>(&mut self, host: &mut H) {
        let Some((subject, lane)) = self.place.take() else {
            return;
        };
        if !self.answered {
            let mut subject = Some(subject);
            host.with_leases(&mut |leases, _| {
                if let Some(s) = subject.take() {
                    leases.give_back_on_tick(s, lane);
                }
            });
            return;
        }
        let now = host.now_ms();
        host.with_leases(&mut |leases, store| {
            // A write the store refused is made on the tick.
            let _ = leases.give_back(store, &subject, lane, now);
        });
    }

    pub fn on_request_body<H: Host>(
        &mut self,
        host: &mut H,
        size: usize,
        end_of_stream: bool,
    ) -> Flow {
        let cfg = self.cfg.clone();
        let Some((pi, p)) = self.provider.and_then(|i| Some((i, cfg.providers.get(i)?))) else {
            return Flow::Continue;
        };
        if !self.rewrites {
            return Flow::Continue;
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        let body = host.body(Body::Request, size);
        self.rewrite(host, pi, p, &body)
    }

    /// Rewrites the buffered request body for the provider (its model name, its API).
    fn rewrite<H: Host>(&mut self, host: &mut H, pi: usize, p: &Provider, body: &[u8]) -> Flow {
        // With a listener role in front, its plan names the model and the listener validated the
        // body; a direct caller of the cluster gets the listener's 400 for a body that is not valid.
        let client_model = match self.planned_model.take() {
            Some(m) => m,
            None => match request::inspect(self.api, body) {
                Ok(i) => i.model.unwrap_or_default(),
                Err(e) => {
                    return self.local(host, ErrorKind::InvalidRequest, 400, &e.to_string(), &[])
                }
            },
        };
        let provider_model = match self.cfg.map_model(pi, &client_model) {
            Some(m) => m.to_string(),
            None => {
                let msg = format!(
                    "The model '{client_model}' is not served by provider '{}'.",
                    p.name
                );
                return self.local(host, ErrorKind::InvalidRequest, 400, &msg, &[]);
            }
        };
        let new_body = match self.translation {
            Translation::ChatToMessages => translate::chat_request_to_messages(
                body,
                &provider_model,
                self.cfg.default_max_tokens,
            ),
            Translation::MessagesToChat => {
                translate::messages_request_to_chat(body, &provider_model)
            }
            Translation::None if provider_model != client_model => {
                request::with_model(body, &provider_model).ok_or_else(|| TranslateError {
                    field: "model".into(),
                    reason: "the body is not a JSON object".into(),
                })
            }
            Translation::None => return Flow::Continue,
        };
        match new_body {
            Ok(b) => {
                if b.as_slice() != body && !host.set_body(Body::Request, body.len(), &b) {
                    return refused::fail_closed(host, self.client, Refused::AttemptBody);
                }
                Flow::Continue
            }
            Err(e) => {
                host.count(&format!("tollgate.provider.{}.untranslatable", p.name), 1);
                self.local(host, ErrorKind::InvalidRequest, 400, &e.to_string(), &[])
            }
        }
    }

    pub fn on_response_headers<H: Host>(&mut self, host: &mut H) -> Flow {
        // One read of the map (its status, a 429's reset signals) and one write for all this role
        // adds: provider, key id, and the consumer's rate-limit headers, which the listener role
        // would otherwise write in a second whole-map write of its own.
        let mut map = Edits::of(host.headers(Map::ResponseHeaders));
        self.status = map.get(":status").and_then(|v| v.parse().ok()).unwrap_or(0);
        self.record_outcome(host, map.base());
        self.pace_answer(host, map.base());
        let cfg = self.cfg.clone();
        let Some(p) = self.provider.and_then(|i| cfg.providers.get(i)) else {
            return Flow::Continue;
        };
        let key_id = self.key.and_then(|k| p.keys.get(k)).map(|k| k.id.as_str());
        map.set(headers::HDR_PROVIDER, p.name.as_str());
        map.set(headers::HDR_KEY_ID, key_id.unwrap_or_default());
        // As the listener role would write them (it leaves values already right alone).
        for (k, v) in &self.rate_limits {
            let text = |r: &Range<usize>| {
                self.plan
                    .get(r.clone())
                    .and_then(|b| core::str::from_utf8(b).ok())
                    .unwrap_or_default()
            };
            map.set(text(k), text(v));
        }
        host.attempt(&p.name, Attempt::Answered(self.status));
        if self.status >= 400 && self.key.is_some() {
            // The body may change length once scrubbed.
            self.scrub = true;
            map.remove("content-length");
        }
        if !map.apply(host, Map::ResponseHeaders) {
            if self.scrub {
                // The body may quote the key, and could not be given another length: it does not
                // go on.
                self.scrub = false;
                return refused::fail_closed(host, self.client, Refused::Scrub);
            }
            refused::record(host, Refused::AnswerHeaders);
        }
        Flow::Continue
    }

    pub fn on_response_body<H: Host>(
        &mut self,
        host: &mut H,
        size: usize,
        end_of_stream: bool,
    ) -> Flow {
        self.answered |= end_of_stream;
        if !self.scrub {
            return Flow::Continue;
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        // Some providers quote the key they refused ("Incorrect API key provided: sk-...").
        let body = host.body(Body::Response, size);
        // The attempt's own key by its value, when the VM holds it; then any key by its shape
        // (an `sds` key, whose value the VM never sees, or another the provider quotes).
        let exact = match self
            .key
            .and_then(|k| self.provider().and_then(|p| p.keys.get(k)))
        {
            Some(k) => credentials::scrub(&body, &k.secret, &k.id),
            None => body.clone(),
        };
        let clean = credentials::redact_key_shaped(&exact);
        if clean != body && !host.set_body(Body::Response, size, &clean) {
            return refused::fail_closed(host, self.client, Refused::Scrub);
        }
        Flow::Continue
    }

    /// What the answer says of the key and the provider: a 429 cools the key for as long as the
    /// provider asked, 401-403 disable it, 5xx count against the provider's circuit.
    fn record_outcome<H: Host>(&self, host: &mut H, headers: &Headers) {
        let Some(p) = self.provider() else { return };
        let cfg = &self.cfg;
        // The clock is read only when the answer changes the provider's health.
        let now = if matches!(self.status, 200..=399) {
            0
        } else {
            host.now_ms()
        };
        let key_id = self
            .key
            .and_then(|k| p.keys.get(k))
            .map(|k| k.id.as_str())
            .unwrap_or("");
        if matches!(self.status, 429 | 401..=403) {
            host.set_filter_state(LAST_ATTEMPT, self.status.to_string().as_bytes());
        }
        let signals = headers
            .iter()
            .filter_map(|(k, v)| core::str::from_utf8(v).ok().map(|v| (k, v)));
        match self.status {
            429 => {
                let wait = retry_signal::cooldown_ms(signals, now)
                    .unwrap_or(cfg.health.default_cooldown_ms);
                if let Some(k) = self.key {
                    let until = now.saturating_add(wait);
                    if health::cool_key(host.store(), p, k, until, CooldownReason::RateLimited)
                        .is_ok()
                    {
                        log::info!(
                            "key {}/{} rate limited, cooling down for {} ms",
                            p.name,
                            key_id,
                            wait
                        );
                    }
                    host.count(
                        &format!("tollgate.provider.{}.key.{}.cooldowns", p.name, key_id),
                        1,
                    );
                    host.gauge(
                        &format!(
                            "tollgate.provider.{}.key.{}.cooldown_until_s",
                            p.name, key_id
                        ),
                        until / 1000,
                    );
                }
            }
            401..=403 => {
                if let Some(k) = self.key {
                    let until = now.saturating_add(cfg.health.auth_failure_cooldown_ms);
                    host.count(
                        &format!("tollgate.provider.{}.key.{}.disabled", p.name, key_id),
                        1,
                    );
                    if let Ok(health::Refusal::Revoked) = health::refuse(host.store(), p, k, until)
                    {
                        log::warn!(
                            "tollgate: key {}/{} refused by the provider with {} during probation: disabled until it enters the pool again (a configuration that disables and re-enables it, or names it anew)",
                            p.name,
                            key_id,
                            self.status
                        );
                        return;
                    }
                    log::warn!(
                        "tollgate: key {}/{} refused by the provider with {}: disabled for {} s",
                        p.name,
                        key_id,
                        self.status,
                        cfg.health.auth_failure_cooldown_ms / 1000
                    );
                    // Whether Envoy injected a credential at all is not known here: reading the
                    // request headers from a cluster-level response callback made the SDK trap the
                    // VM (Envoy 1.40).
                    if let Some(KeySecret::Sds(secret)) = p.keys.get(k).map(|k| &k.source) {
                        log::warn!(
                            "tollgate: key {}/{} takes its secret from Envoy's SDS secret '{}': \
                             check that Envoy has that secret and that the cluster's credential \
                             filter matches `{}: {}`",
                            p.name,
                            key_id,
                            secret,
                            headers::HDR_CREDENTIAL,
                            secret
                        );
                    }
                    host.gauge(
                        &format!(
                            "tollgate.provider.{}.key.{}.cooldown_until_s",
                            p.name, key_id
                        ),
                        until / 1000,
                    );
                }
            }
            500..=599 => {
                // One key's 5xx rests that key, as long as the provider asked or briefly: its
                // neighbours take its traffic.
                let wait = retry_signal::retry_after_ms(signals, now)
                    .unwrap_or(cfg.health.server_error_cooldown_ms);
                self.failed(host, p, now, wait);
            }
            // A key on probation that answered counts towards its full share (one write, for
            // such keys only).
            200..=299 if self.probation => {
                if let Some(k) = self.key {
                    if let Ok(Some(0)) = health::probation_answered(host.store(), p, k) {
                        log::info!(
                            "tollgate: key {}/{} passed probation: it takes its full share",
                            p.name,
                            key_id
                        );
                    }
                }
                let _ = health::answered(host.store(), p, &cfg.health, self.seen);
            }
            // An answer ends the run of failures the attempt saw; when it saw none there is
            // nothing to end, and no host call (failures of attempts beside it are one step).
            _ => {
                let _ = health::answered(host.store(), p, &cfg.health, self.seen);
            }
        }
    }

    /// What the answer announced of its key ([`pace`]), and the attempt's spend taken off it. The
    /// first answer of a provider that announces marks it as such (one write, once): from then on
    /// its keys are paced.
    fn pace_answer<H: Host>(&mut self, host: &mut H, headers: &Headers) {
        // A count is only usable with its reset time (Azure and some OpenAI-compatible servers send
        // counts alone): without one, no clock read and no pacing.
        let announces = headers.raw().any(|(k, _)| {
            k.starts_with(b"x-ratelimit-reset-")
                || (k.starts_with(b"anthropic-ratelimit-") && k.ends_with(b"-reset"))
        });
        if !announces && self.spent.is_none() {
            return;
        }
        let cfg = self.cfg.clone();
        let Some((p, k)) = self
            .provider
            .and_then(|i| cfg.providers.get(i))
            .zip(self.key)
        else {
            return;
        };
        let now = host.now_ms();
        let said = if announces {
            Announcement::parse(headers.iter(), now)
        } else {
            Announcement::default()
        };
        if self.spent.is_none() && said.is_empty() {
            return;
        }
        if !self.announced && !said.is_empty() {
            let _ = health::mark_announcing(host.store(), p, k);
        }
        if let Err(e) = pace::settle(host.store(), p, k, self.spent.take(), said, now) {
            log::warn!("key pacing unavailable: {e:?}");
        }
    }

    /// The attempt failed (a 5xx, or no answer): held against the provider's circuit in the order
    /// the attempt saw it, its key rests for `wait` ms (none when 0), and the request's next attempt
    /// is told.
    fn failed<H: Host>(&self, host: &mut H, p: &Provider, now: u64, wait: u64) {
        let cfg = &self.cfg;
        let rest = self
            .key
            .filter(|_| wait > 0)
            .map(|k| (k, now.saturating_add(wait)));
        if let Ok(true) = health::failed(host.store(), p, &cfg.health, self.seen, now, rest) {
            host.count(&format!("tollgate.provider.{}.circuit_opened", p.name), 1);
            log::warn!(
                "tollgate: provider {} failed {} times in a row: circuit open for {} s",
                p.name,
                cfg.health.circuit_failures,
                cfg.health.circuit_open_ms / 1000
            );
        }
        host.count(&format!("tollgate.provider.{}.failures", p.name), 1);
        if let Some((k, until)) = rest {
            let key_id = p.keys.get(k).map_or("", |k| k.id.as_str());
            host.gauge(
                &format!(
                    "tollgate.provider.{}.key.{}.cooldown_until_s",
                    p.name, key_id
                ),
                until / 1000,
            );
        }
        host.set_filter_state(LAST_ATTEMPT, self.status.to_string().as_bytes());
    }

    /// The attempt ends. Envoy runs no `on_log` for cluster-level contexts, so this is where an
    /// attempt that never got response headers (per-try timeout, reset) is held against its
    /// provider: once, and not when the client went away (that is not the provider's failure).
    /// Its place among its key's requests in flight is given back here, however it ended.
    pub fn on_done<H: Host>(&mut self, host: &mut H) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.give_back_place(host);
        if let (Some(spent), Some(k)) = (self.spent.take(), self.key) {
            // No answer came: what the attempt was counted to spend is no longer in flight.
            let cfg = self.cfg.clone();
            if let Some(p) = self.provider.and_then(|i| cfg.providers.get(i)) {
                let now = host.now_ms();
                let _ = pace::settle(
                    host.store(),
                    p,
                    k,
                    Some(spent),
                    Announcement::default(),
                    now,
                );
            }
        }
        if self.status != 0 || !self.sent || host.property(&[CLIENT_GONE]).is_some() {
            return;
        }
        let cfg = self.cfg.clone();
        if let Some(p) = self.provider.and_then(|i| cfg.providers.get(i)) {
            host.count(
                &format!("tollgate.provider.{}.timeouts_or_resets", p.name),
                1,
            );
            let now = host.now_ms();
            self.failed(host, p, now, cfg.health.server_error_cooldown_ms);
        }
    }
}

/// An attempt's place among its key's requests in flight: its provider's entry and the key's lane.
type Place = (Subject, u64);

/// What a paced attempt counted against its key (`Some(tokens)`; None: nothing), or, when every
/// key is paced out, the earliest one can take the request.
type Spent = Result<Option<u64>, pace::Paced>;

/// The key for this attempt. Where the provider has keys with a limit on requests in flight,
/// one read of its counts tells which keys are full (skipped as cooling keys are), and a key
/// with a limit is only chosen once the attempt has taken a place in it (returned with it); a key
/// another worker filled meanwhile is skipped in turn. When the counts cannot be read or written,
/// the key is chosen as if none were full: a limit is no reason to fail a request.
///
/// For a paced provider (`paced`: the request's tokens), the chosen key's spend is counted in one
/// CAS (a read and a write); a key that cannot take the request (its take writes nothing) is
/// skipped as a full one is, its place given back, and the next chosen. When every key is paced
/// out: [`Choice::AtLimit`] and the earliest a key can take it. An entry that cannot be read or
/// written paces nothing.
fn choose_key<H: Host>(
    host: &mut H,
    p: &Provider,
    health: &health::ProviderHealth,
    ask: keypool::Ask<'_>,
    now: u64,
    limited: bool,
    paced: Option<u64>,
) -> (Choice, Option<Place>, Spent) {
    let subject = limited.then(|| Subject::Provider(p.name.clone()));
    // Leases are stamped with the clock as it is, not with when the request arrived.
    let lease_now = if limited { host.now_ms() } else { now };
    // Keys found paced out, as their take said: no reading ahead of the take, whose CAS reads the
    // entry anyway.
    let mut paced_out: Vec<Option<pace::Paced>> = Vec::new();
    let earliest = |out: &[Option<pace::Paced>]| {
        out.iter()
            .flatten()
            .min_by_key(|pc| pc.until_ms)
            .copied()
            .map_or(Ok(None), Err)
    };
    let mut full: Vec<bool> = Vec::new();
    let mut reading = None;
    if let Some(subject) = &subject {
        match in_flight::read(host.store(), subject, lease_now) {
            Ok((totals, read)) => {
                full = p
                    .keys
                    .iter()
                    .map(|k| {
                        k.max_in_flight
                            .is_some_and(|m| totals.of(key_lane(&k.id)) >= u64::from(m))
                    })
                    .collect();
                reading = Some(read);
            }
            Err(e) => log::warn!("requests in flight unavailable: {e:?}"),
        }
    }
    let mark_full = |full: &mut Vec<bool>, i: usize| {
        if full.is_empty() {
            *full = vec![false; p.keys.len()];
        }
        if let Some(f) = full.get_mut(i) {
            *f = true;
        }
    };
    for _ in 0..=p.keys.len() {
        let ask = keypool::Ask { full: &full, ..ask };
        let mut chosen = Err(StoreError::Host);
        host.with_rotation(&mut |worker, store| {
            chosen = keypool::choose(p, health, ask, now, worker, store);
        });
        let choice = chosen.unwrap_or_else(|e| {
            // The rotation counter failed: still serve, from the first healthy key.
            log::warn!("key rotation counter unavailable: {e:?}");
            let free = |i: usize| !full.get(i).copied().unwrap_or(false);
            (0..p.keys.len())
                .find(|&i| health.key_available(i, now) && free(i))
                .map(Choice::Key)
                .unwrap_or(Choice::Exhausted { retry_at_ms: now })
        });
        let Choice::Key(i) = choice else {
            return (choice, None, earliest(&paced_out));
        };
        let mut place = None;
        let limit = subject.as_ref().and_then(|subject| {
            let k = p.keys.get(i)?;
            Some((subject, key_lane(&k.id), k.max_in_flight?))
        });
        if let Some((subject, lane, limit)) = limit {
            let mut read = reading.take();
            let mut taken = Err(StoreError::Host);
            host.with_leases(&mut |leases, store| {
                taken = leases.take(
                    store,
                    subject,
                    lane,
                    u64::from(limit),
                    lease_now,
                    read.take(),
                );
            });
            match taken {
                Ok(Take::Taken) => place = Some((subject.clone(), lane)),
                Ok(Take::Full { .. }) => {
                    mark_full(&mut full, i);
                    continue;
                }
                Err(e) => log::warn!("requests in flight unavailable: {e:?}"),
            }
        }
        let Some(tokens) = paced else {
            return (choice, place, Ok(None));
        };
        match pace::take(host.store(), p, i, tokens, now) {
            Ok(Ok(())) => return (choice, place, Ok(Some(tokens))),
            Err(e) => {
                log::warn!("key pacing unavailable: {e:?}");
                return (choice, place, Ok(None));
            }
            Ok(Err(pc)) => {
                if let Some((subject, lane)) = place {
                    host.with_leases(&mut |leases, store| {
                        let _ = leases.give_back(store, &subject, lane, lease_now);
                    });
                }
                if paced_out.is_empty() {
                    paced_out = vec![None; p.keys.len()];
                }
                if let Some(slot) = paced_out.get_mut(i) {
                    *slot = Some(pc);
                }
                mark_full(&mut full, i);
            }
        }
    }
    (Choice::AtLimit, None, earliest(&paced_out))
}
