//! Listener-level role: runs once per client request, and decides before any attempt exists.
//!
//! It holds the request headers while it reads the body (`allow_on_headers_stop_iteration`), then:
//! who is calling, where the request starts (the first provider that serves the model and can take
//! it), whether the consumer's budgets admit it, and what the body must say (lowered max_tokens,
//! stream usage asked for). Only then does the request go on, with its plan in filter state for the
//! cluster-level role. On the way back it owns what the client sees: the answer translated into the
//! client's API when another provider answered, the usage chunk the client did not ask for removed,
//! rate-limit headers; and it counts the provider's own usage and charges it exactly once.

use super::plan::{self, Plan};
use super::{status, Flow};
use crate::api::errors::{error_body, error_body_typed, ClientApi, ErrorKind};
use crate::api::headers;
use crate::api::request::{self, RequestInfo};
use crate::api::splice;
use crate::config::{Config, Consumers, Provider};
use crate::count::estimate;
use crate::count::metric_segment;
use crate::count::sse::{RawEvent, SseEvent, SseParser};
use crate::count::usage::{usage_from_json, ApiKind, ChunkKeys, ClientEvent, StreamUsage, Usage};
use crate::failover::rewrite::{self, Translation};
use crate::failover::route::{self, Start};
use crate::failover::translate::{self, ChatToMessagesStream, MessagesToChatStream};
use crate::host::prof::span;
use crate::host::tally::{Charge, LimitUse};
use crate::host::{Body, Edits, Headers, Host, Map};
use crate::limit::admission::{self, Verdict};
use crate::limit::consumer;
use crate::limit::headers as limit_headers;
use crate::limit::quota::{self, Demand, Metric, Reservation, Standing};
use core::fmt::Write;
use std::rc::Rc;

/// The largest non-streaming response body kept to read its `usage`; past it the count is estimated.
const MAX_JSON_RESPONSE: usize = 8 << 20;

/// How a streamed answer is changed on its way to the client.
enum StreamEdit {
    /// Passed as it comes; only read for usage.
    None,
    /// tollgate asked an OpenAI-speaking provider for stream usage the client did not ask for: the
    /// usage chunk and the `"usage": null` of every other chunk are removed.
    StripUsage,
    /// An Anthropic provider answered an OpenAI client.
    ToChat(Box<MessagesToChatStream>),
    /// An OpenAI-speaking provider answered an Anthropic client.
    ToMessages(Box<ChatToMessagesStream>),
}

pub struct Listener {
    cfg: Rc<Config>,
    api: ApiKind,
    client: ClientApi,
    path: String,
    authority: String,
    consumer: String,
    info: Option<RequestInfo>,
    model_label: String,
    /// The request went on (or was answered): nothing more to decide on the request path.
    decided: bool,
    /// The request headers, read once and edited until the request goes on (one write).
    request_headers: Edits<'static>,
    admitted: bool,
    reservations: Vec<Reservation>,
    standings: Vec<Standing>,
    /// Their rate-limit headers, in the client API's dialect (resets counted from the request's
    /// arrival).
    rate_limits: Vec<(&'static str, String)>,
    /// tollgate forced `stream_options.include_usage` for this request.
    forced_stream_usage: bool,
    started_ms: u64,
    // The answer.
    status: u16,
    provider: String,
    key_id: String,
    sse: Option<SseParser>,
    edit: StreamEdit,
    stream_usage: StreamUsage,
    /// A JSON answer in the provider's own shape (usage is read from it).
    json: Vec<u8>,
    json_overflow: bool,
    /// A JSON answer to be translated for the client once complete.
    translate_json: Translation,
    /// Envoy's own plain-text error, collected to be re-shaped for the client.
    envoy_error: Option<Vec<u8>>,
    /// Bytes of unfinished events held back from the client while the stream is being edited.
    withheld: Vec<u8>,
    out: Vec<u8>,
    response_complete: bool,
    charged: bool,
}

impl Listener {
    pub fn new(cfg: Rc<Config>) -> Self {
        Listener {
            cfg,
            api: ApiKind::Other,
            client: ClientApi::OpenAi,
            path: String::new(),
            authority: String::new(),
            consumer: String::new(),
            info: None,
            model_label: "none".into(),
            decided: false,
            request_headers: Edits::default(),
            admitted: false,
            reservations: Vec::new(),
            standings: Vec::new(),
            rate_limits: Vec::new(),
            forced_stream_usage: false,
            started_ms: 0,
            status: 0,
            provider: String::new(),
            key_id: String::new(),
            sse: None,
            edit: StreamEdit::None,
            stream_usage: StreamUsage::new(),
            json: Vec::new(),
            json_overflow: false,
            translate_json: Translation::None,
            envoy_error: None,
            withheld: Vec::new(),
            out: Vec::new(),
            response_complete: false,
            charged: false,
        }
    }

    fn model(&self) -> &str {
        self.info
            .as_ref()
            .and_then(|i| i.model.as_deref())
            .unwrap_or("")
    }

    /// A local answer in the client API's error shape, counted by outcome.
    fn reject<H: Host>(
        &mut self,
        host: &mut H,
        kind: ErrorKind,
        message: &str,
        code: Option<&str>,
        openai_type: Option<&str>,
        extra: &[(&str, String)],
    ) -> Flow {
        self.decided = true;
        // Not even a refusal's access-log line shows the client's credential.
        self.request_headers.apply(host, Map::RequestHeaders);
        self.write_record(host, None);
        let body = error_body_typed(self.client, kind, message, code, None, openai_type);
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        headers.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
        host.respond(kind.status(), &headers, &body);
        let outcome = match kind {
            ErrorKind::Authentication => "rejected_auth",
            ErrorKind::RateLimit => "rejected_quota",
            ErrorKind::RequestTooLarge | ErrorKind::InvalidRequest => "rejected_invalid",
            _ => "rejected_other",
        };
        host.count(&format!("tollgate.outcome.{outcome}.requests"), 1);
        Flow::Stop
    }

    fn too_large<H: Host>(&mut self, host: &mut H) -> Flow {
        let msg = format!(
            "Request body is larger than the gateway's limit of {} bytes.",
            self.cfg.max_request_bytes
        );
        self.reject(
            host,
            ErrorKind::RequestTooLarge,
            &msg,
            Some("request_too_large"),
            None,
            &[],
        )
    }

    pub fn on_request_headers<H: Host>(&mut self, host: &mut H, end_of_stream: bool) -> Flow {
        self.started_ms = host.now_ms();
        // One read of the whole map serves every header this role looks at, and one write (when
        // the request goes on) carries every change to it.
        let hdrs = host.headers(Map::RequestHeaders);
        self.path = hdrs.get_str(":path").unwrap_or_default().to_string();
        self.authority = hdrs.get_str(":authority").unwrap_or_default().to_string();
        self.api = ApiKind::from_path(&self.path);
        self.client = ClientApi::from_path(&self.path);
        if let Some(st) = &self.cfg.status {
            if self
                .path
                .strip_prefix(st.path.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('?'))
            {
                self.decided = true;
                return status::serve(host, &self.cfg, &hdrs);
            }
        }
        let identified = consumer::identify(&self.cfg, |name| credential(&hdrs, name));
        // Credentials and tollgate's internal headers leave the request, by name and whatever
        // their bytes: neither a provider nor an access-log line sees them.
        let trusted = match &self.cfg.consumers {
            Consumers::TrustedHeader { header, .. } => Some(header.clone()),
            _ => None,
        };
        let spoofed = hdrs
            .iter()
            .any(|(k, _)| k.starts_with(headers::INTERNAL_PREFIX));
        self.request_headers = Edits::of(hdrs);
        self.request_headers.remove_where(|name| {
            name.starts_with(headers::INTERNAL_PREFIX)
                || headers::CREDENTIAL_HEADERS.contains(&name)
                || Some(name) == trusted.as_deref()
        });
        if spoofed {
            // The route was matched on the client's copy of tollgate's internal headers.
            host.clear_route_cache();
        }
        match identified {
            Ok(c) => self.consumer = c,
            Err(e) => {
                return self.reject(
                    host,
                    ErrorKind::Authentication,
                    e.message(),
                    Some("invalid_api_key"),
                    None,
                    &[],
                )
            }
        }
        if let Some(len) = self
            .request_headers
            .get("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            if len > self.cfg.max_request_bytes {
                return self.too_large(host);
            }
        }
        if end_of_stream {
            return self.decide(host, None);
        }
        // Hold the headers: the body decides where the request goes and what it may cost.
        Flow::Pause
    }

    pub fn on_request_body<H: Host>(
        &mut self,
        host: &mut H,
        size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if self.decided {
            return Flow::Continue;
        }
        if size as u64 > self.cfg.max_request_bytes {
            return self.too_large(host);
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        let body = host.body(Body::Request, size);
        self.decide(host, Some(&body))
    }

    /// The request's end came in trailers (HTTP/2, gRPC-style clients): the body is complete now.
    pub fn on_request_trailers<H: Host>(&mut self, host: &mut H) -> Flow {
        if self.decided {
            return Flow::Continue;
        }
        let body = host.body(Body::Request, usize::MAX);
        if body.len() as u64 > self.cfg.max_request_bytes {
            return self.too_large(host);
        }
        self.decide(host, Some(&body))
    }

    /// Everything before the first attempt. `body` is None when the request has none.
    fn decide<H: Host>(&mut self, host: &mut H, body: Option<&[u8]>) -> Flow {
        // The time the request arrived: milliseconds before its body, and no clock read.
        let now = self.started_ms;
        let needs_body = !matches!(self.api, ApiKind::Other);
        let inspect = span("listener inspect");
        let info = match (body, needs_body) {
            (Some(b), _) => request::inspect_with(self.api, b, self.cfg.prompt_affinity()),
            (None, true) => request::inspect(self.api, &[]),
            (None, false) => Ok(RequestInfo::default()),
        };
        drop(inspect);
        match info {
            Ok(i) => self.info = Some(i),
            Err(e) => {
                let msg = e.to_string();
                return self.reject(
                    host,
                    ErrorKind::InvalidRequest,
                    &msg,
                    Some("invalid_request"),
                    None,
                    &[],
                );
            }
        }
        let model = self.model().to_string();
        self.model_label = if model.is_empty() {
            "none".into()
        } else if self.cfg.is_known_model(&model) {
            metric_segment(&model)
        } else {
            "other".into()
        };
        let routing = span("listener route");
        let (start, start_health) = route::start_reading(host.store(), &self.cfg, &model, now);
        drop(routing);
        let start = match start {
            Start::Provider(i) => i,
            Start::NotServed => {
                let msg = format!("The model '{model}' is not served by this gateway.");
                return self.reject(
                    host,
                    ErrorKind::InvalidRequest,
                    &msg,
                    Some("model_not_found"),
                    None,
                    &[],
                );
            }
            Start::Exhausted { retry_after_secs } => {
                host.count("tollgate.outcome.exhausted.requests", 1);
                self.decided = true;
                self.request_headers.apply(host, Map::RequestHeaders);
                self.write_record(host, None);
                let msg = format!(
                    "Every provider key that can serve this request is cooling down after provider rate limits or failures. Please try again in {retry_after_secs}s."
                );
                let body = error_body(
                    self.client,
                    ErrorKind::RateLimit,
                    &msg,
                    Some("provider_keys_exhausted"),
                    None,
                );
                let secs = retry_after_secs.to_string();
                host.respond(
                    429,
                    &[("content-type", "application/json"), ("retry-after", &secs)],
                    &body,
                );
                return Flow::Stop;
            }
        };
        if let Some(b) = body {
            if let Err(msg) = self.check_translatable(start, b) {
                return self.reject(
                    host,
                    ErrorKind::InvalidRequest,
                    &msg.0,
                    Some(msg.1),
                    None,
                    &[],
                );
            }
        }
        if !model.is_empty()
            && self.cfg.has_cost_limit(&self.consumer, &model)
            && self.cfg.price_for(&model).is_none()
        {
            let msg = format!(
                "The model '{model}' has no price configured, and consumer '{}' has a cost budget: ask the gateway's operator to add it to 'prices' (or set 'default_price').",
                self.consumer
            );
            return self.reject(
                host,
                ErrorKind::InvalidRequest,
                &msg,
                Some("model_not_priced"),
                None,
                &[],
            );
        }
        let mut rewritten: Option<Vec<u8>> = None;
        let admitting = span("listener admit");
        let admitted = self.admit(host, now, body, &mut rewritten);
        drop(admitting);
        if let Some(flow) = admitted {
            return flow;
        }
        let wants_stream_usage = self.api == ApiKind::ChatCompletions
            && self
                .info
                .as_ref()
                .is_some_and(|i| i.stream && !i.include_usage);
        if wants_stream_usage {
            let current = rewritten.as_deref().or(body).unwrap_or_default();
            if let Some(b) = request::with_include_usage(current) {
                rewritten = Some(b);
                self.forced_stream_usage = true;
            }
        }
        if let Some(b) = &rewritten {
            let size = body.map_or(0, <[u8]>::len);
            if !host.set_body(Body::Request, size, b) {
                self.forced_stream_usage = false;
                rewritten = None;
            }
        }
        let steered = self.cfg.providers.get(start).filter(|_| start > 0);
        if let Some(p) = steered {
            // The routes match on this header to pick a cluster whose priorities start there.
            self.request_headers.set(headers::HDR_ROUTE, p.name.clone());
            host.count(&format!("tollgate.provider.{}.steered_requests", p.name), 1);
        }
        if rewritten.is_some() {
            // The body changed length: the client's content-length no longer holds.
            self.request_headers.remove("content-length");
        }
        self.request_headers.apply(host, Map::RequestHeaders);
        if steered.is_some() {
            host.clear_route_cache();
        }
        let planning = span("listener plan");
        let health = start_health.and_then(|h| {
            let p = self.cfg.providers.get(start)?;
            Some((start, h.encode(p)))
        });
        let plan = Plan {
            path: &self.path,
            authority: &self.authority,
            model: &model,
            rewritten: rewritten.is_some(),
            consumer: &self.consumer,
            start: health.as_ref().map(|(i, h)| (*i, h.as_slice())),
            at_ms: Some(self.started_ms),
            prefix: self.info.as_ref().and_then(|i| i.prefix),
            rate_limits: self
                .rate_limits
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect(),
        };
        host.set_filter_state(plan::FILTER_STATE, &plan.encode());
        drop(planning);
        // For Envoy's rate limit filter (fleet-wide budgets): its descriptor is the consumer.
        host.set_filter_state(CONSUMER, self.consumer.as_bytes());
        self.decided = true;
        Flow::Continue
    }

    /// A request the first provider would need translated, but that cannot be, is refused here,
    /// before the attempt leaves, with the field named.
    fn check_translatable(
        &self,
        provider: usize,
        body: &[u8],
    ) -> Result<(), (String, &'static str)> {
        let Some(p) = self.cfg.providers.get(provider) else {
            return Ok(());
        };
        let model = p.map_model(self.model()).unwrap_or("");
        let result = match rewrite::translation(self.api, p.kind) {
            Ok(Translation::ChatToMessages) => {
                translate::chat_request_to_messages(body, model, self.cfg.default_max_tokens)
                    .map(|_| ())
            }
            Ok(Translation::MessagesToChat) => {
                translate::messages_request_to_chat(body, model).map(|_| ())
            }
            Ok(Translation::None) => Ok(()),
            Err(msg) => return Err((msg, "unsupported_api")),
        };
        result.map_err(|e| (e.to_string(), "untranslatable_request"))
    }

    /// Admission: reserve against the consumer's budgets. `None` means go on; a lowered max_tokens
    /// is written into `rewritten`.
    fn admit<H: Host>(
        &mut self,
        host: &mut H,
        now: u64,
        body: Option<&[u8]>,
        rewritten: &mut Option<Vec<u8>>,
    ) -> Option<Flow> {
        let (prompt_tokens, max_tokens) = self
            .info
            .as_ref()
            .map(|i| (i.prompt_tokens_estimate, i.max_tokens))
            .unwrap_or((0, Some(0)));
        let model = self.model().to_string();
        let ask = admission::Ask {
            consumer: &self.consumer,
            model: &model,
            prompt_tokens,
            max_tokens,
        };
        match admission::admit(host.store(), &self.cfg, &ask, now) {
            Verdict::Admit {
                reservations,
                standings,
                lower_max_tokens_to,
            } => {
                if let (Some(max), Some(b)) = (lower_max_tokens_to, body) {
                    if let Some(b) = request::with_max_tokens(b, max) {
                        *rewritten = Some(b);
                        host.count("tollgate.max_tokens_lowered", 1);
                    }
                }
                self.reservations = reservations;
                self.standings = standings;
                self.rate_limits =
                    limit_headers::rate_limit_headers(self.client, &self.standings, now);
                self.admitted = true;
                self.publish_use(host);
                None
            }
            Verdict::Refuse {
                retry_after_secs,
                message,
                standings,
                limit,
            } => {
                self.standings = standings;
                self.publish_use(host);
                self.rate_limits =
                    limit_headers::rate_limit_headers(self.client, &self.standings, now);
                let mut headers = self.rate_limits.clone();
                headers.push(("retry-after", retry_after_secs.to_string()));
                // OpenAI names the exhausted limit in `error.type`.
                let kind = if limit.metric == Metric::Requests {
                    "requests"
                } else {
                    "tokens"
                };
                Some(self.reject(
                    host,
                    ErrorKind::RateLimit,
                    &message,
                    Some("rate_limit_exceeded"),
                    Some(kind),
                    &headers,
                ))
            }
            Verdict::AdmitUnmetered => {
                host.count("tollgate.degraded", 1);
                self.admitted = true;
                None
            }
            Verdict::Unavailable => {
                host.count("tollgate.degraded", 1);
                Some(self.reject(
                    host,
                    ErrorKind::Overloaded,
                    "The gateway cannot meter this request right now; try again shortly.",
                    None,
                    None,
                    &[],
                ))
            }
        }
    }

    /// Gauges of each limit's use, in per mille, for alerting at 80%.
    fn publish_use<H: Host>(&self, host: &mut H) {
        let uses: Vec<LimitUse> = self
            .standings
            .iter()
            .map(|s| LimitUse {
                metric: s.limit.metric.as_str(),
                window_s: s.limit.window_ms / 1000,
                permille: (s.used_fraction.clamp(0.0, 10.0) * 1000.0) as u64,
            })
            .collect();
        host.limit_use(&self.consumer, &uses);
    }

    fn answering_provider(&self) -> Option<&Provider> {
        if self.provider.is_empty() {
            return None;
        }
        self.cfg.provider(&self.provider).map(|(_, p)| p)
    }

    pub fn on_response_headers<H: Host>(&mut self, host: &mut H, end_of_stream: bool) -> Flow {
        // One read of the whole map serves every header this callback looks at, and one write
        // carries every change (rate-limit headers, content type and length).
        let mut map = Edits::of(host.headers(Map::ResponseHeaders));
        self.status = map.get(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
        self.provider = map
            .get(headers::HDR_PROVIDER)
            .unwrap_or_default()
            .to_string();
        self.key_id = map.get(headers::HDR_KEY_ID).unwrap_or_default().to_string();
        if self.status == 429 && self.provider.is_empty() && map.has("x-envoy-ratelimited") {
            // Envoy's global rate limit filter refused it (fleet-wide budget): give the client the
            // same signals as tollgate's own 429.
            host.count("tollgate.outcome.rejected_global.requests", 1);
            if !map.has("retry-after") {
                let secs = map
                    .get("x-ratelimit-reset")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1)
                    .max(1);
                map.set("retry-after", secs.to_string());
            }
        }
        let content_type = map
            .get("content-type")
            .unwrap_or_default()
            .to_ascii_lowercase();
        let sse = content_type.contains("text/event-stream");
        let translation = self
            .answering_provider()
            .and_then(|p| rewrite::translation(self.api, p.kind).ok())
            .unwrap_or(Translation::None);
        if self.status >= 500
            && self.provider.is_empty()
            && content_type.starts_with("text/plain")
            && !end_of_stream
        {
            // Envoy's own answer (upstream timeout, no healthy upstream, reset): in the client's
            // error shape like every other error.
            self.envoy_error = Some(Vec::new());
            map.set("content-type", "application/json");
            map.remove("content-length");
        } else if sse {
            self.sse = Some(SseParser::new(self.cfg.max_sse_event_bytes));
            let include_usage = self.info.as_ref().is_some_and(|i| i.include_usage);
            let model = self.model().to_string();
            self.edit = match translation {
                Translation::ChatToMessages => StreamEdit::ToChat(Box::new(
                    MessagesToChatStream::new(&model, include_usage, self.started_ms / 1000),
                )),
                Translation::MessagesToChat => {
                    StreamEdit::ToMessages(Box::new(ChatToMessagesStream::new(&model)))
                }
                Translation::None if self.forced_stream_usage => StreamEdit::StripUsage,
                Translation::None => StreamEdit::None,
            };
            if !matches!(self.edit, StreamEdit::None) {
                map.remove("content-length");
            }
        } else if translation != Translation::None && !end_of_stream {
            self.translate_json = translation;
            map.set("content-type", "application/json");
            map.remove("content-length");
        }
        // The budgets as admission saw them: resets are counted from the request's arrival.
        // Already there when the attempt wrote them (Edits leave a value as it is).
        for (k, v) in &self.rate_limits {
            map.set(*k, v.as_str());
        }
        map.apply(host, Map::ResponseHeaders);
        if end_of_stream {
            self.response_complete = true;
            self.charge(host, false);
        }
        Flow::Continue
    }

    pub fn on_response_body<H: Host>(
        &mut self,
        host: &mut H,
        size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if let Some(text) = self.envoy_error.as_mut() {
            text.extend_from_slice(&host.body(Body::Response, size));
            if !end_of_stream {
                return Flow::Pause;
            }
            let detail = String::from_utf8_lossy(text).trim().to_string();
            let kind = if self.status == 503 {
                ErrorKind::Overloaded
            } else {
                ErrorKind::BadGateway
            };
            let body = error_body(
                self.client,
                kind,
                &format!("The gateway could not get an answer from the provider: {detail}."),
                None,
                None,
            );
            host.set_body(Body::Response, size, &body);
            self.response_complete = true;
            self.charge(host, false);
            return Flow::Continue;
        }
        if self.sse.is_some() {
            // HTTP/1 ends a body with an empty chunk: nothing to read.
            let chunk = if size == 0 {
                Vec::new()
            } else {
                host.body(Body::Response, size)
            };
            self.on_stream_chunk(host, size, &chunk, end_of_stream);
        } else if self.translate_json != Translation::None {
            // Whole, then translated: a JSON answer cannot be translated piecewise.
            if !end_of_stream {
                return Flow::Pause;
            }
            let body = host.body(Body::Response, size);
            self.keep_json(&body);
            let out = self.translated_json(&body);
            host.set_body(Body::Response, size, &out);
        } else if !self.json_overflow && size > 0 {
            let chunk = host.body(Body::Response, size);
            self.keep_json(&chunk);
        }
        if end_of_stream {
            self.response_complete = true;
            self.charge(host, false);
        }
        Flow::Continue
    }

    fn keep_json(&mut self, chunk: &[u8]) {
        if self.json_overflow {
            return;
        }
        if self.json.len() + chunk.len() > MAX_JSON_RESPONSE {
            self.json_overflow = true;
            self.json = Vec::new();
        } else {
            self.json.extend_from_slice(chunk);
        }
    }

    fn translated_json(&self, body: &[u8]) -> Vec<u8> {
        let ok = (200..300).contains(&self.status);
        let model = self.model();
        let out = match (self.translate_json, ok) {
            (Translation::ChatToMessages, true) => {
                translate::messages_response_to_chat_at(body, model, self.started_ms / 1000)
            }
            (Translation::MessagesToChat, true) => {
                translate::chat_response_to_messages(body, model)
            }
            (Translation::ChatToMessages, false) => {
                Ok(translate::messages_error_to_chat(body, self.status))
            }
            (_, false) => Ok(translate::chat_error_to_messages(body, self.status)),
            (Translation::None, true) => Ok(body.to_vec()),
        };
        out.unwrap_or_else(|e| {
            log::warn!("could not translate the provider's response: {e}");
            error_body(
                self.client,
                ErrorKind::BadGateway,
                "The provider's response could not be translated.",
                None,
                None,
            )
        })
    }

    /// One chunk of a streamed answer: every complete event is counted in the provider's own shape,
    /// then edited for the client; bytes of an unfinished event wait for the rest of it.
    fn on_stream_chunk<H: Host>(&mut self, host: &mut H, size: usize, chunk: &[u8], end: bool) {
        let Some(sse) = self.sse.as_mut() else {
            return;
        };
        let su = &mut self.stream_usage;
        if matches!(self.edit, StreamEdit::None) {
            sse.feed(chunk, |ev| su.on_event(&ev));
            if end {
                sse.finish(|ev| su.on_event(&ev));
            }
            return;
        }
        let dropped_before = sse.dropped_events();
        // Reused from chunk to chunk: the stream path allocates nothing per chunk of its own.
        let mut out = core::mem::take(&mut self.out);
        out.clear();
        // While the client gets the chunk's own bytes unchanged, only how many: nothing is copied
        // (most chunks of a stripped stream pass as they came).
        let mut same = None;
        match &mut self.edit {
            StreamEdit::StripUsage => {
                same = Some(0);
                let keys = ChunkKeys::of(chunk);
                let mut on = |ev: RawEvent<'_>| {
                    let seen = su.on_scanned_event_for_client(&ev, keys.of_data(ev.data));
                    strip_event(seen, &ev, chunk, &mut same, &mut out)
                };
                sse.feed_raw(chunk, &mut on);
                if end {
                    sse.finish_raw(&mut on);
                }
            }
            edit => {
                let mut on = |ev: SseEvent<'_>| edit_event(edit, su, &ev, &mut out);
                sse.feed(chunk, &mut on);
                if end {
                    sse.finish(&mut on);
                    match edit {
                        StreamEdit::ToChat(t) => t.finish(&mut out),
                        StreamEdit::ToMessages(t) => t.finish(&mut out),
                        _ => {}
                    }
                }
            }
        }
        if sse.dropped_events() > dropped_before && matches!(self.edit, StreamEdit::StripUsage) {
            // An event too large to hold cannot be re-emitted from the parser: give the client
            // every byte withheld so far plus this chunk, and pass the rest of the stream through
            // as it comes (its usage chunk included).
            let mut all = core::mem::take(&mut self.withheld);
            all.extend_from_slice(chunk);
            host.set_body(Body::Response, size, &all);
            self.edit = StreamEdit::None;
            log::warn!(
                "an SSE event exceeded max_sse_event_bytes; passing the stream through unedited"
            );
        } else {
            let pending = sse.pending();
            match chunk.len().checked_sub(pending) {
                // The common case: the unfinished event began in this chunk.
                Some(from) => {
                    self.withheld.clear();
                    self.withheld
                        .extend_from_slice(chunk.get(from..).unwrap_or_default());
                }
                None => {
                    self.withheld.extend_from_slice(chunk);
                    let keep_from = self.withheld.len().saturating_sub(pending);
                    self.withheld.drain(..keep_from);
                }
            }
            match same {
                Some(n) if n == chunk.len() => {}
                Some(n) => {
                    // Only the unfinished event at the end is held back.
                    out.extend_from_slice(chunk.get(..n).unwrap_or_default());
                    host.set_body(Body::Response, size, &out);
                }
                None if out != chunk => {
                    host.set_body(Body::Response, size, &out);
                }
                None => {}
            }
        }
        self.out = out;
    }

    /// The end of the request on this stream: charge it now if the answer did not complete.
    pub fn on_log<H: Host>(&mut self, host: &mut H) {
        self.charge(host, true);
    }

    /// The stream is torn down. If the answer did not complete, the client went away (or the
    /// upstream reset): the cluster-level role then knows the attempt's end is not the provider's
    /// failure.
    pub fn on_done<H: Host>(&mut self, host: &mut H) {
        if !self.response_complete {
            host.set_filter_state(CLIENT_GONE, b"1");
        }
    }

    /// Charges the request exactly once: at the end of the response, or at teardown.
    fn charge<H: Host>(&mut self, host: &mut H, torn_down: bool) {
        if self.charged || !self.admitted {
            return;
        }
        let _p = span("listener charge");
        self.charged = true;
        let ok = (200..300).contains(&self.status);
        let reading = span("listener usage read");
        let (usage, estimated) = self.final_usage(ok, torn_down);
        drop(reading);
        let row = [
            1,
            usage.input,
            usage.output,
            usage.cache_read,
            usage.cache_write,
            u64::from(estimated),
        ];
        let settling = span("listener settle");
        if !self.reservations.is_empty() {
            let cost = self
                .cfg
                .price_for(self.model())
                .map(|p| quota::cost_micro_usd(p, usage.input, usage.cache_read, usage.output))
                .unwrap_or(0);
            let actual = Demand {
                requests: 1,
                input: usage.input,
                output: usage.output,
                cost_micro_usd: cost,
            };
            if let Err(e) =
                quota::settle(host.store(), &self.reservations, &actual, self.started_ms)
            {
                log::warn!("quota settlement failed: {e:?}");
            }
        }
        drop(settling);
        let _metrics = span("listener metrics and record");
        let outcome = match (ok, torn_down) {
            (_, true) => "incomplete",
            (true, _) => "ok",
            (false, _) if self.status == 429 => "upstream_429",
            (false, _) if self.status >= 500 => "upstream_5xx",
            (false, _) => "upstream_4xx",
        };
        // Per consumer x model, per provider key, by outcome, and the usage totals.
        host.charge(
            &Charge {
                consumer: &self.consumer,
                model: &self.model_label,
                provider: &self.provider,
                key_id: &self.key_id,
                outcome,
            },
            row,
        );
        self.write_record(host, Some((usage, estimated)));
        // For Envoy's global rate limit filter: `hits_addend` on stream done charges these.
        host.set_filter_state(
            "tollgate_total_tokens",
            usage
                .input
                .saturating_add(usage.output)
                .to_string()
                .as_bytes(),
        );
        if log::log_enabled!(log::Level::Debug) {
            log::debug!(
                "tollgate: charged consumer={} model={} provider={} key={} in={} out={} estimated={} ms={}",
                self.consumer,
                self.model(),
                self.provider,
                self.key_id,
                usage.input,
                usage.output,
                estimated,
                host.now_ms().saturating_sub(self.started_ms)
            );
        }
    }

    /// The access-log record, one filter-state value (`%FILTER_STATE(wasm.tollgate:PLAIN)%`), in
    /// logfmt: `consumer=team-a model=gpt-4o provider=openai key=oa-1 in=24 out=8 usage=exact`.
    /// Fields not known (a refused request was never charged) read `-`.
    fn write_record<H: Host>(&self, host: &mut H, charged: Option<(Usage, bool)>) {
        let mut record = String::with_capacity(128);
        let model = if self.info.is_some() {
            self.model()
        } else {
            ""
        };
        for (key, value) in [
            ("consumer=", self.consumer.as_str()),
            (" model=", model),
            (" provider=", &self.provider),
            (" key=", &self.key_id),
        ] {
            record.push_str(key);
            push_logfmt(&mut record, value);
        }
        match charged {
            Some((u, estimated)) => {
                let usage = if estimated { "estimated" } else { "exact" };
                let _ = write!(record, " in={} out={} usage={usage}", u.input, u.output);
            }
            None => record.push_str(" in=- out=- usage=-"),
        }
        host.set_filter_state(RECORD, record.as_bytes());
    }

    /// The provider's usage when it gave one, read from its own answer (before any translation);
    /// otherwise an estimate from the request and whatever text was received. Errors from the
    /// provider are not billed: they charge the request only.
    fn final_usage(&mut self, ok: bool, torn_down: bool) -> (Usage, bool) {
        if let Some(sse) = self.sse.as_mut() {
            if !self.response_complete {
                let su = &mut self.stream_usage;
                sse.finish(|ev| su.on_event(&ev));
            }
            if let Some(u) = self.stream_usage.usage() {
                if self.stream_usage.output_reported() {
                    return (u, false);
                }
            }
        } else if ok && !self.json_overflow {
            if let Some(u) = usage_from_json(&self.json) {
                return (u, false);
            }
        }
        if !ok && !torn_down {
            return (Usage::default(), false);
        }
        let input = self
            .info
            .as_ref()
            .map(|i| i.prompt_tokens_estimate)
            .unwrap_or(0);
        let output = if self.sse.is_some() {
            self.stream_usage.estimated_output_tokens()
        } else {
            estimate::chars_to_tokens(estimate::response_text_chars(&self.json))
        };
        // An Anthropic stream cut before message_delta still told us its input exactly.
        let mut u = self.stream_usage.usage().unwrap_or_default();
        if u.input == 0 {
            u.input = input;
        }
        u.output = u.output.max(output);
        (u, true)
    }
}

/// Filter-state name of the access-log record (`wasm.tollgate`).
pub const RECORD: &str = "tollgate";
/// Filter-state name of the consumer, for Envoy's rate limit filter (`wasm.tollgate_consumer`).
pub const CONSUMER: &str = "tollgate_consumer";

/// A logfmt value: `-` when empty, as is when it has no space, quote, `=` or control character,
/// else quoted.
fn push_logfmt(out: &mut String, s: &str) {
    if s.is_empty() {
        return out.push('-');
    }
    // Ids are printable ASCII: no need to look at them char by char.
    let plain = |b: u8| b.is_ascii_graphic() && b != b'"' && b != b'=';
    if s.bytes().all(plain)
        || s.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '=')
    {
        return out.push_str(s);
    }
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Filter state the listener role writes when its client went away before the answer completed.
pub const CLIENT_GONE: &str = "tollgate_client_gone";

/// What the client gets of one complete event of a stream whose usage tollgate asked for, written to
/// `out`; while the client gets the chunk's own bytes unchanged (`same`: how many so far), nothing
/// is copied.
fn strip_event(
    seen: ClientEvent,
    ev: &RawEvent<'_>,
    chunk: &[u8],
    same: &mut Option<usize>,
    out: &mut Vec<u8>,
) {
    if let Some(n) = *same {
        if seen == ClientEvent::AsIs
            && splice::span_bytes(chunk, ev.raw).is_some_and(|r| r.start == n)
        {
            *same = Some(n + ev.raw.len());
            return;
        }
        out.extend_from_slice(chunk.get(..n).unwrap_or_default());
        *same = None;
    }
    seen.write(ev.raw, out);
}

/// One complete event of a stream being translated: counted, then written for the client.
fn edit_event(edit: &mut StreamEdit, su: &mut StreamUsage, ev: &SseEvent<'_>, out: &mut Vec<u8>) {
    match edit {
        StreamEdit::None | StreamEdit::StripUsage => su.on_event(ev),
        StreamEdit::ToChat(t) => {
            su.on_event(ev);
            t.on_event(ev, out);
        }
        StreamEdit::ToMessages(t) => {
            su.on_event(ev);
            t.on_event(ev, out);
        }
    }
}

/// A credential header's value for identification. Several values of one credential header are
/// ambiguous, and one that is not UTF-8 is no credential: neither is given.
fn credential<'a>(hdrs: &'a Headers, name: &str) -> Option<&'a str> {
    let mut values = hdrs.raw().filter(|(k, _)| *k == name.as_bytes());
    let (_, first) = values.next()?;
    if values.next().is_some() && headers::CREDENTIAL_HEADERS.contains(&name) {
        return Some("\u{0}repeated");
    }
    core::str::from_utf8(first).ok()
}
