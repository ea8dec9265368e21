//! Cluster-level role: runs once per upstream attempt, for whichever endpoint Envoy picked.

use super::abi::{BufferType, MapType};
use super::dispatch::{Action, HttpContext};
use super::handoff;
use super::host::{self, count, gauge, HostStore};
use crate::api::errors::{error_body, ClientApi, ErrorKind};
use crate::api::request;
use crate::config::{Config, Provider};
use crate::count::sse::SseParser;
use crate::count::usage::ApiKind;
use crate::failover::health::{self, CooldownReason, Outcome};
use crate::failover::retry_signal;
use crate::failover::translate::{self, ChatToMessagesStream, MessagesToChatStream};
use crate::gateway::{self, metric_segment, Translation};
use crate::pool::keypool::{self, Choice};
use std::rc::Rc;

/// Metadata namespace and key on an endpoint (or cluster) naming its tollgate provider.
const METADATA_NS: &str = "tollgate";
const METADATA_KEY: &str = "provider";

enum StreamTranslator {
    ToChat(MessagesToChatStream),
    ToMessages(ChatToMessagesStream),
}

pub struct Upstream {
    id: u32,
    original: Option<handoff::Original>,
    /// The attempt's headers went on towards the provider.
    sent: bool,
    rid: Option<u32>,
    cfg: Rc<Config>,
    provider: Option<usize>,
    key: Option<usize>,
    api: ApiKind,
    client: ClientApi,
    path: String,
    translation: Translation,
    client_model: String,
    include_usage: bool,
    status: u16,
    sse: Option<(SseParser, StreamTranslator)>,
    translate_json: bool,
    /// An error answer: buffered to take the key out if the provider quoted it.
    scrub: bool,
}

impl Upstream {
    pub fn new(id: u32, cfg: Rc<Config>) -> Self {
        Upstream {
            id,
            original: None,
            sent: false,
            rid: None,
            cfg,
            provider: None,
            key: None,
            api: ApiKind::Other,
            client: ClientApi::OpenAi,
            path: String::new(),
            translation: Translation::None,
            client_model: String::new(),
            include_usage: false,
            status: 0,
            sse: None,
            translate_json: false,
            scrub: false,
        }
    }

    fn provider(&self) -> Option<&Provider> {
        self.provider.and_then(|i| self.cfg.providers.get(i))
    }

    /// An answer from the attempt itself. Envoy treats it as this attempt's response, so a 429 or
    /// 503 here is retried by the route's retry policy on the next endpoint/priority.
    fn local(&self, kind: ErrorKind, status: u16, message: &str, extra: &[(&str, &str)]) -> Action {
        let body = error_body(self.client, kind, message, None, None);
        let mut headers = vec![("content-type", "application/json")];
        headers.extend_from_slice(extra);
        if let Some(p) = self.provider() {
            headers.push((gateway::HDR_PROVIDER, p.name.as_str()));
        }
        host::respond(status, &headers, &body);
        Action::Pause
    }

    /// Which provider Envoy picked: the endpoint's `tollgate.provider` metadata, else the cluster's,
    /// else the only provider configured.
    fn pick_provider(&self) -> Result<usize, String> {
        // Reading endpoint metadata is one of the dearest host calls (~5 µs): with a single
        // provider there is nothing to tell apart.
        if self.cfg.providers.len() == 1 {
            return Ok(0);
        }
        let md = |scope: &str| {
            host::property(&["xds", scope, "filter_metadata", METADATA_NS, METADATA_KEY])
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

    /// Everything that does not need the body: provider, key, credentials.
    fn prepare(&mut self, hdrs: &[(String, String)], attempt: u32) -> Result<(), Action> {
        let pi = match self.pick_provider() {
            Ok(i) => i,
            Err(msg) => {
                log::error!("{msg}");
                return Err(self.local(
                    ErrorKind::Internal,
                    500,
                    "The gateway's provider routing is misconfigured.",
                    &[],
                ));
            }
        };
        self.provider = Some(pi);
        let cfg = self.cfg.clone();
        let Some(p) = cfg.providers.get(pi) else {
            return Err(self.local(ErrorKind::Internal, 500, "provider index out of range", &[]));
        };
        let now = host::now_ms();
        // The circuit was consulted by the listener role when it chose where the request starts
        // (and took the half-open probe slot there); a retry that Envoy moved here goes ahead.
        let health =
            health::read(&HostStore, p).unwrap_or_else(|_| health::ProviderHealth::decode(None, p));
        let consumer = self.original.as_ref().map(|o| o.consumer.as_str());
        let sticky = cfg
            .sticky_header
            .as_deref()
            .and_then(|h| host::find(hdrs, h))
            .or(consumer);
        let choice = keypool::choose(&HostStore, p, &health, sticky, now).unwrap_or_else(|e| {
            // The rotation counter failed: still serve, from the first healthy key.
            log::warn!("key rotation counter unavailable: {e:?}");
            (0..p.keys.len())
                .find(|&i| health.key_available(i, now))
                .map(Choice::Key)
                .unwrap_or(Choice::Exhausted { retry_at_ms: now })
        });
        let ki = match choice {
            Choice::Key(i) => i,
            Choice::Exhausted { retry_at_ms } => {
                let secs = gateway::retry_after_secs(retry_at_ms.saturating_sub(now)).to_string();
                count(
                    &format!("tollgate.provider.{}.exhausted_attempts", p.name),
                    1,
                );
                return Err(self.local(
                    ErrorKind::RateLimit,
                    429,
                    "Every key of this provider is cooling down.",
                    &[("retry-after", &secs), ("x-tollgate-exhausted", "true")],
                ));
            }
        };
        self.key = Some(ki);
        let Some(key) = p.keys.get(ki) else {
            return Err(self.local(ErrorKind::Internal, 500, "key index out of range", &[]));
        };
        let auth = gateway::auth_headers(p, &key.secret);
        // Credentials of another provider's kind (a previous attempt's, in this same header map)
        // go; the listener role already took out the client's. Internal headers stay out of the
        // provider's request, but for the request id: the next attempt gets this same header map
        // and needs it to find the request's hand-off. Only headers present are removed: each
        // removal is a host call.
        for h in gateway::CREDENTIAL_HEADERS
            .iter()
            .chain([&gateway::HDR_ROUTE])
        {
            if host::find(hdrs, h).is_some() && !auth.iter().any(|(name, _)| name == h) {
                host::set_header(MapType::HttpRequestHeaders, h, None);
            }
        }
        for (name, value) in auth {
            host::set_header(MapType::HttpRequestHeaders, name, Some(&value));
        }
        if let Some(h) = &p.host {
            host::set_header(MapType::HttpRequestHeaders, ":authority", Some(h));
        }
        count(&format!("tollgate.provider.{}.attempts", p.name), 1);
        if attempt > 1 {
            // A retry that landed here: a failover onto this provider (or another key of it).
            count(&format!("tollgate.provider.{}.retried_attempts", p.name), 1);
        }
        Ok(())
    }

    /// Rewrites the buffered request body and path for the provider; headers are still paused.
    fn rewrite(&mut self, body: &[u8]) -> Action {
        let cfg = self.cfg.clone();
        let Some(p) = self.provider.and_then(|i| cfg.providers.get(i)) else {
            return Action::Continue;
        };
        let info = match request::inspect(self.api, body) {
            Ok(i) => i,
            // The listener role validated it already; a direct caller of the cluster gets the same 400.
            Err(e) => return self.local(ErrorKind::InvalidRequest, 400, &e.to_string(), &[]),
        };
        self.client_model = info.model.clone().unwrap_or_default();
        self.include_usage = info.include_usage;
        let provider_model = match p.map_model(&self.client_model) {
            Some(m) => m.to_string(),
            None => {
                let msg = format!(
                    "The model '{}' is not served by provider '{}'.",
                    self.client_model, p.name
                );
                return self.local(ErrorKind::InvalidRequest, 400, &msg, &[]);
            }
        };
        let new_body = match self.translation {
            Translation::ChatToMessages => {
                translate::chat_request_to_messages(body, &provider_model, cfg.default_max_tokens)
            }
            Translation::MessagesToChat => {
                translate::messages_request_to_chat(body, &provider_model)
            }
            Translation::None if provider_model != self.client_model => {
                request::with_model(body, &provider_model).ok_or_else(|| {
                    translate::TranslateError {
                        field: "model".into(),
                        reason: "the body is not a JSON object".into(),
                    }
                })
            }
            Translation::None => Ok(body.to_vec()),
        };
        let new_body = match new_body {
            Ok(b) => b,
            Err(e) => {
                count(&format!("tollgate.provider.{}.untranslatable", p.name), 1);
                return self.local(ErrorKind::InvalidRequest, 400, &e.to_string(), &[]);
            }
        };
        if self.translation == Translation::MessagesToChat {
            self.include_usage = true;
        }
        // The headers are gone already (path and content-length were settled before they left).
        if new_body.as_slice() != body {
            host::replace_body(BufferType::HttpRequestBody, body.len(), &new_body);
        }
        Action::Continue
    }

    fn needs_body(&self, p: &Provider) -> bool {
        self.translation != Translation::None || !p.models.is_empty()
    }

    fn record_outcome(&self, headers: &[(String, String)]) {
        let Some(p) = self.provider() else { return };
        let cfg = &self.cfg;
        let now = host::now_ms();
        let key = self.key.and_then(|k| p.keys.get(k));
        let key_id = key.map(|k| k.id.as_str()).unwrap_or("");
        match self.status {
            429 => {
                let wait = retry_signal::cooldown_ms(
                    headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                    now,
                )
                .unwrap_or(cfg.health.default_cooldown_ms);
                if let Some(k) = self.key {
                    let until = now.saturating_add(wait);
                    if health::cool_key(&HostStore, p, k, until, CooldownReason::RateLimited)
                        .is_ok()
                    {
                        log::info!(
                            "key {}/{} rate limited, cooling down for {} ms",
                            p.name,
                            key_id,
                            wait
                        );
                    }
                    count(
                        &format!("tollgate.provider.{}.key.{}.cooldowns", p.name, key_id),
                        1,
                    );
                    gauge(
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
                    let _ = health::cool_key(&HostStore, p, k, until, CooldownReason::Disabled);
                    log::warn!(
                        "tollgate: key {}/{} refused by the provider with {}: disabled for {} s",
                        p.name,
                        key_id,
                        self.status,
                        cfg.health.auth_failure_cooldown_ms / 1000
                    );
                    count(
                        &format!("tollgate.provider.{}.key.{}.disabled", p.name, key_id),
                        1,
                    );
                    gauge(
                        &format!(
                            "tollgate.provider.{}.key.{}.cooldown_until_s",
                            p.name, key_id
                        ),
                        until / 1000,
                    );
                }
            }
            500..=599 => {
                if let Ok(health::Circuit::Open { .. }) =
                    health::record(&HostStore, p, &cfg.health, Outcome::ProviderFailure, now)
                {
                    count(&format!("tollgate.provider.{}.circuit_opened", p.name), 1);
                }
                count(&format!("tollgate.provider.{}.failures", p.name), 1);
            }
            _ => {
                let _ = health::record(&HostStore, p, &cfg.health, Outcome::Success, now);
            }
        }
    }
}

impl Upstream {
    fn finish(&mut self) {
        let mut client_gone = false;
        if let Some(rid) = self.rid.take() {
            handoff::unpark(rid, self.id);
            client_gone = handoff::attempt_ended(rid);
        }
        // Sent, but no answer: a per-try timeout, a reset or a refused connection. (A parked
        // attempt that the listener refused was never sent, and an attempt cut short because the
        // client left is not the provider's failure: neither counts.)
        if self.status == 0 && self.sent && !client_gone {
            self.status = 504; // counted once, whichever of on_log/on_done comes first
            let cfg = self.cfg.clone();
            if let Some(p) = self.provider.and_then(|i| cfg.providers.get(i)) {
                count(&format!("tollgate.provider.{}.failures", p.name), 1);
                count(
                    &format!("tollgate.provider.{}.timeouts_or_resets", p.name),
                    1,
                );
                let _ = health::record(
                    &HostStore,
                    p,
                    &cfg.health,
                    Outcome::ProviderFailure,
                    host::now_ms(),
                );
            }
        }
    }
}

impl HttpContext for Upstream {
    /// The attempt ends. Envoy runs no `on_log` for cluster-level contexts, so this is where an
    /// attempt that never got response headers (per-try timeout, reset) is held against its provider.
    fn on_done(&mut self) -> bool {
        let _p = super::prof::span("upstream on_done");
        self.finish();
        true
    }

    fn on_log(&mut self) {
        let _p = super::prof::span("upstream on_log");
        self.finish();
    }

    fn on_http_request_headers(&mut self, _num: usize, _end_of_stream: bool) -> Action {
        let _p = super::prof::span("upstream on_http_request_headers");
        // One read of the whole map serves every header this attempt looks at.
        let hdrs = host::headers(MapType::HttpRequestHeaders);
        self.rid = host::find(&hdrs, gateway::HDR_RID).and_then(|v| v.parse().ok());
        let attempt = self.rid.map(handoff::attempt_started).unwrap_or(0);
        // Every attempt starts from the request as the client sent it: the header map Envoy hands
        // to this attempt is the one the previous attempt rewrote.
        self.original = self.rid.and_then(handoff::original);
        let current_path = host::find(&hdrs, ":path").unwrap_or_default();
        self.path = match &self.original {
            Some(o) => {
                let current_authority = host::find(&hdrs, ":authority").unwrap_or_default();
                if current_authority != o.authority && !o.authority.is_empty() {
                    host::set_header(
                        MapType::HttpRequestHeaders,
                        ":authority",
                        Some(&o.authority),
                    );
                }
                if current_path != o.path {
                    host::set_header(MapType::HttpRequestHeaders, ":path", Some(&o.path));
                }
                o.path.clone()
            }
            None => current_path.to_string(),
        };
        self.api = ApiKind::from_path(&self.path);
        self.client = ClientApi::from_path(&self.path);
        if let Err(action) = self.prepare(&hdrs, attempt) {
            return action;
        }
        let cfg = self.cfg.clone();
        let Some((pi, p)) = self
            .provider
            .and_then(|i| cfg.providers.get(i).map(|p| (i, p)))
        else {
            return Action::Continue;
        };
        self.translation = match gateway::translation(self.api, p.kind) {
            Ok(t) => t,
            Err(msg) => return self.local(ErrorKind::InvalidRequest, 400, &msg, &[]),
        };
        let decision = match self.rid.map(handoff::state) {
            Some(handoff::State::Pending) => {
                // First attempt: wait, headers unsent, for the listener role's verdict on the body.
                if let Some(rid) = self.rid {
                    handoff::park(rid, self.id, pi);
                }
                return Action::Pause;
            }
            Some(handoff::State::Decided(d)) => d,
            // No listener role in this VM: the model is unknown here, go on with the path as is.
            Some(handoff::State::Unknown) | None => handoff::Decision::default(),
        };
        match gateway::attempt_plan(
            p,
            self.api,
            &self.path,
            Some(decision.client_model.as_str()),
            decision.body_rewritten,
        ) {
            Ok((path, drop_length)) => {
                if path != self.path {
                    host::set_header(MapType::HttpRequestHeaders, ":path", Some(&path));
                }
                if drop_length {
                    host::set_header(MapType::HttpRequestHeaders, "content-length", None);
                }
                self.sent = true;
                Action::Continue
            }
            Err(msg) => self.local(ErrorKind::InvalidRequest, 400, &msg, &[]),
        }
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let _p = super::prof::span("upstream on_http_request_body");
        // A parked attempt sees its body only once the listener role has resumed it.
        self.sent = true;
        if self.provider.is_none() {
            return Action::Continue;
        }
        let cfg = self.cfg.clone();
        let needs = self
            .provider
            .and_then(|i| cfg.providers.get(i))
            .map(|p| self.needs_body(p))
            .unwrap_or(false);
        if !needs {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host::body(BufferType::HttpRequestBody, size);
        self.rewrite(&body)
    }

    fn on_http_response_headers(&mut self, _num: usize, _end_of_stream: bool) -> Action {
        let _p = super::prof::span("upstream on_http_response_headers");
        // The status is all a successful untranslated answer needs: one value read instead of
        // the whole map (the retry signals of a 429 and a stream's content type need the rest).
        self.status = host::header(MapType::HttpResponseHeaders, ":status")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let headers = if self.status == 429 || self.translation != Translation::None {
            host::headers(MapType::HttpResponseHeaders)
        } else {
            Vec::new()
        };
        self.record_outcome(&headers);
        let Some(p) = self.provider() else {
            return Action::Continue;
        };
        let (pname, kid) = (
            p.name.clone(),
            self.key
                .and_then(|k| p.keys.get(k))
                .map(|k| k.id.clone())
                .unwrap_or_default(),
        );
        host::set_header(
            MapType::HttpResponseHeaders,
            gateway::HDR_PROVIDER,
            Some(&pname),
        );
        host::set_header(
            MapType::HttpResponseHeaders,
            gateway::HDR_KEY_ID,
            Some(&kid),
        );
        count(
            &format!(
                "tollgate.provider.{}.responses_{}xx",
                metric_segment(&pname),
                self.status / 100
            ),
            1,
        );
        if self.status >= 400 && self.key.is_some() {
            self.scrub = true;
            host::set_header(MapType::HttpResponseHeaders, "content-length", None);
        }
        if self.translation != Translation::None {
            let sse = headers.iter().any(|(k, v)| {
                k == "content-type" && v.to_ascii_lowercase().contains("text/event-stream")
            });
            host::set_header(MapType::HttpResponseHeaders, "content-length", None);
            if sse {
                let created = host::now_ms() / 1000;
                let t = match self.translation {
                    Translation::ChatToMessages => StreamTranslator::ToChat(
                        MessagesToChatStream::new(&self.client_model, self.include_usage, created),
                    ),
                    _ => {
                        StreamTranslator::ToMessages(ChatToMessagesStream::new(&self.client_model))
                    }
                };
                self.sse = Some((SseParser::new(self.cfg.max_sse_event_bytes), t));
            } else {
                self.translate_json = true;
                host::set_header(
                    MapType::HttpResponseHeaders,
                    "content-type",
                    Some("application/json"),
                );
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let _p = super::prof::span("upstream on_http_response_body");
        if let Some((parser, t)) = self.sse.as_mut() {
            let chunk = host::body(BufferType::HttpResponseBody, size);
            let mut out = Vec::with_capacity(chunk.len() * 2);
            let mut on = |ev: crate::count::sse::SseEvent<'_>| match t {
                StreamTranslator::ToChat(s) => s.on_event(&ev, &mut out),
                StreamTranslator::ToMessages(s) => s.on_event(&ev, &mut out),
            };
            parser.feed(&chunk, &mut on);
            if end_of_stream {
                parser.finish(&mut on);
                match t {
                    StreamTranslator::ToChat(s) => s.finish(&mut out),
                    StreamTranslator::ToMessages(s) => s.finish(&mut out),
                }
            }
            host::replace_body(BufferType::HttpResponseBody, size, &out);
            return Action::Continue;
        }
        if self.translate_json || self.scrub {
            if !end_of_stream {
                return Action::Pause;
            }
            let mut body = host::body(BufferType::HttpResponseBody, size);
            if self.scrub {
                // Some providers quote the key they refused ("Incorrect API key provided: sk-...").
                if let Some(k) = self
                    .key
                    .and_then(|k| self.provider().and_then(|p| p.keys.get(k)))
                {
                    body = gateway::scrub(&body, &k.secret, &k.id);
                }
            }
            if !self.translate_json {
                host::replace_body(BufferType::HttpResponseBody, size, &body);
                return Action::Continue;
            }
            let ok = (200..300).contains(&self.status);
            let out = match (self.translation, ok) {
                (Translation::ChatToMessages, true) => translate::messages_response_to_chat_at(
                    &body,
                    &self.client_model,
                    host::now_ms() / 1000,
                ),
                (Translation::MessagesToChat, true) => {
                    translate::chat_response_to_messages(&body, &self.client_model)
                }
                (Translation::ChatToMessages, false) => {
                    Ok(translate::messages_error_to_chat(&body, self.status))
                }
                (_, false) => Ok(translate::chat_error_to_messages(&body, self.status)),
                (Translation::None, true) => Ok(body.clone()),
            };
            let out = out.unwrap_or_else(|e| {
                log::warn!("could not translate the provider's response: {e}");
                error_body(
                    self.client,
                    ErrorKind::BadGateway,
                    "The provider's response could not be translated.",
                    None,
                    None,
                )
            });
            host::replace_body(BufferType::HttpResponseBody, size, &out);
        }
        Action::Continue
    }
}
