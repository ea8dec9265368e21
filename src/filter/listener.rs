//! Listener-level role: runs once per client request.

use super::abi::{BufferType, MapType};
use super::dispatch::{Action, HttpContext};
use super::handoff::{self, Decision};
use super::host::{self, count, gauge, HostStore};
use crate::api::errors::{error_body, ClientApi, ErrorKind};
use crate::api::request::{self, RequestInfo};
use crate::config::Config;
use crate::count::estimate;
use crate::count::sse::SseParser;
use crate::count::usage::{usage_from_json, ApiKind, StreamUsage, Usage};
use crate::gateway::{self, metric_segment};
use crate::limit::admission::{self, Start, Verdict};
use crate::limit::quota::{self, Demand, Reservation, Standing};
use crate::store::add_u64s;
use std::rc::Rc;

/// The largest non-streaming response body kept to read its `usage`; past it the count is estimated.
const MAX_JSON_RESPONSE: usize = 8 << 20;

pub struct Listener {
    id: u32,
    cfg: Rc<Config>,
    api: ApiKind,
    client: ClientApi,
    consumer: String,
    info: Option<RequestInfo>,
    model_label: String,
    admitted: bool,
    reservations: Vec<Reservation>,
    standings: Vec<Standing>,
    /// tollgate asked the provider for a usage chunk the client did not ask for: remove it.
    strip_usage_chunk: bool,
    status: u16,
    provider: String,
    key_id: String,
    sse: Option<SseParser>,
    stream_usage: StreamUsage,
    json: Vec<u8>,
    json_overflow: bool,
    charged: bool,
    started_ms: u64,
    path: String,
    body_rewritten: bool,
    /// The provider (index) this request starts on.
    start: usize,
    /// Stream bytes held back from the client while usage chunks are being removed.
    withheld: Vec<u8>,
    /// The stream chunk as it goes to the client (usage chunk removed).
    out: Vec<u8>,
    /// Envoy's own plain-text error, collected to be re-shaped for the client.
    envoy_error: Option<Vec<u8>>,
    response_complete: bool,
}

impl Listener {
    pub fn new(id: u32, cfg: Rc<Config>) -> Self {
        Listener {
            id,
            cfg,
            api: ApiKind::Other,
            client: ClientApi::OpenAi,
            consumer: String::new(),
            info: None,
            model_label: "none".into(),
            admitted: false,
            reservations: Vec::new(),
            standings: Vec::new(),
            strip_usage_chunk: false,
            status: 0,
            provider: String::new(),
            key_id: String::new(),
            sse: None,
            stream_usage: StreamUsage::new(),
            json: Vec::new(),
            json_overflow: false,
            charged: false,
            started_ms: 0,
            path: String::new(),
            body_rewritten: false,
            start: 0,
            withheld: Vec::new(),
            out: Vec::new(),
            envoy_error: None,
            response_complete: false,
        }
    }

    fn reject(
        &self,
        kind: ErrorKind,
        message: &str,
        code: Option<&str>,
        extra: &[(String, String)],
    ) -> Action {
        let body = error_body(self.client, kind, message, code, None);
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        headers.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        host::respond(kind.status(), &headers, &body);
        let outcome = match kind {
            ErrorKind::Authentication => "rejected_auth",
            ErrorKind::RateLimit => "rejected_quota",
            ErrorKind::RequestTooLarge | ErrorKind::InvalidRequest => "rejected_invalid",
            _ => "rejected_other",
        };
        count(&format!("tollgate.outcome.{outcome}.requests"), 1);
        Action::Pause
    }

    fn model(&self) -> &str {
        self.info
            .as_ref()
            .and_then(|i| i.model.as_deref())
            .unwrap_or("")
    }

    /// Admission: reserve against the consumer's budgets. `None` means go on.
    fn admit(&mut self, now: u64) -> Option<Action> {
        let _p = super::prof::span("listener admit");
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
        match admission::admit(&HostStore, &self.cfg, &ask, now) {
            Verdict::Admit {
                reservations,
                standings,
                lower_max_tokens_to,
            } => {
                if let Some(max) = lower_max_tokens_to {
                    let body = host::body(BufferType::HttpRequestBody, usize::MAX);
                    if let Some(b) = request::with_max_tokens(&body, max) {
                        if host::replace_body(BufferType::HttpRequestBody, usize::MAX, &b) {
                            self.body_rewritten = true;
                            count("tollgate.max_tokens_lowered", 1);
                        }
                    }
                }
                self.reservations = reservations;
                self.standings = standings;
                self.admitted = true;
                self.publish_use();
                None
            }
            Verdict::Refuse {
                retry_after_secs,
                message,
                standings,
            } => {
                self.standings = standings;
                self.publish_use();
                let mut headers = gateway::rate_limit_headers(self.client, &self.standings, now);
                headers.push(("retry-after".into(), retry_after_secs.to_string()));
                Some(self.reject(
                    ErrorKind::RateLimit,
                    &message,
                    Some("rate_limit_exceeded"),
                    &headers,
                ))
            }
            Verdict::AdmitUnmetered => {
                count("tollgate.degraded", 1);
                self.admitted = true;
                None
            }
            Verdict::Unavailable => {
                count("tollgate.degraded", 1);
                Some(self.reject(
                    ErrorKind::Overloaded,
                    "The gateway cannot meter this request right now; try again shortly.",
                    None,
                    &[],
                ))
            }
        }
    }

    /// Picks the provider this request starts on. When it is not the first, the request is steered
    /// there with the `x-tollgate-route` header, which the Envoy routes match on (the route cache is
    /// cleared so the router sees it). When none can take it, answers 429 with the earliest
    /// recovery, without calling anyone.
    fn route(&mut self, now: u64) -> Option<Action> {
        match admission::start(&HostStore, &self.cfg, "", now) {
            Start::Provider(0) | Start::Unknown => None,
            Start::Provider(i) => {
                self.start = i;
                if let Some(p) = self.cfg.providers.get(i) {
                    host::set_header(
                        MapType::HttpRequestHeaders,
                        gateway::HDR_ROUTE,
                        Some(&p.name),
                    );
                    host::clear_route_cache();
                    count(&format!("tollgate.provider.{}.steered_requests", p.name), 1);
                }
                None
            }
            Start::Exhausted { retry_after_secs } => {
                count("tollgate.outcome.exhausted.requests", 1);
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
                host::respond(
                    429,
                    &[("content-type", "application/json"), ("retry-after", &secs)],
                    &body,
                );
                Some(Action::Pause)
            }
        }
    }

    /// Gauges of each limit's use, in per mille, for alerting at 80%.
    fn publish_use(&self) {
        for s in &self.standings {
            let name = format!(
                "tollgate.consumer.{}.limit.{}_{}s.used_permille",
                metric_segment(&self.consumer),
                s.limit.metric.as_str(),
                s.limit.window_ms / 1000
            );
            gauge(&name, (s.used_fraction.clamp(0.0, 10.0) * 1000.0) as u64);
        }
    }

    fn on_body_complete(&mut self, body: &[u8]) -> Action {
        let now = host::now_ms();
        match request::inspect(self.api, body) {
            Ok(info) => self.info = Some(info),
            Err(e) => {
                let msg = e.to_string();
                return self.reject(
                    ErrorKind::InvalidRequest,
                    &msg,
                    Some("invalid_request"),
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
        host::set_property("tollgate_model", &model);
        if let Err((msg, code)) = self.check_servable(body) {
            return self.reject(ErrorKind::InvalidRequest, &msg, Some(code), &[]);
        }
        if let Some(a) = self.admit(now) {
            return a;
        }
        let wants_stream_usage = self.api == ApiKind::ChatCompletions
            && self
                .info
                .as_ref()
                .map(|i| i.stream && !i.include_usage)
                .unwrap_or(false);
        let mut body_rewritten = self.body_rewritten;
        // Admission may have rewritten the body already (lowered max_tokens): build on that one.
        let lowered;
        let body: &[u8] = if self.body_rewritten {
            lowered = host::body(BufferType::HttpRequestBody, usize::MAX);
            &lowered
        } else {
            body
        };
        if wants_stream_usage {
            if let Some(b) = request::with_include_usage(body) {
                if host::replace_body(BufferType::HttpRequestBody, usize::MAX, &b) {
                    self.strip_usage_chunk = true;
                    body_rewritten = true;
                }
            }
        }
        let decision = Decision {
            client_model: model,
            body_rewritten,
        };
        if let Some((attempt, provider)) = handoff::decide(self.id, decision.clone()) {
            if let Err(msg) = self.resume_attempt(attempt, provider, &decision) {
                self.unadmit();
                return self.reject(
                    ErrorKind::InvalidRequest,
                    &msg,
                    Some("model_not_found"),
                    &[],
                );
            }
        }
        Action::Continue
    }

    /// A request refused after its reservation was made costs nothing.
    fn unadmit(&mut self) {
        if self.admitted {
            let _ = quota::settle(
                &HostStore,
                &self.reservations,
                &Demand::default(),
                host::now_ms(),
            );
            self.reservations.clear();
            self.admitted = false;
        }
    }

    /// The provider the request starts on must serve the model, in a dialect the request can be
    /// translated to: otherwise a 400 naming the problem, before anything is reserved or sent.
    fn check_servable(&self, body: &[u8]) -> Result<(), (String, &'static str)> {
        let Some(p) = self.cfg.providers.get(self.start) else {
            return Ok(());
        };
        let model = self.model();
        if !model.is_empty() && p.map_model(model).is_none() {
            return Err((
                format!(
                    "The model '{model}' is not served by provider '{}'.",
                    p.name
                ),
                "model_not_found",
            ));
        }
        self.check_translatable(self.start, body)
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
        let result = match gateway::translation(self.api, p.kind) {
            Ok(gateway::Translation::ChatToMessages) => {
                crate::failover::translate::chat_request_to_messages(
                    body,
                    model,
                    self.cfg.default_max_tokens,
                )
                .map(|_| ())
            }
            Ok(gateway::Translation::MessagesToChat) => {
                crate::failover::translate::messages_request_to_chat(body, model).map(|_| ())
            }
            Ok(gateway::Translation::None) => Ok(()),
            Err(msg) => return Err((msg, "unsupported_api")),
        };
        result.map_err(|e| (e.to_string(), "untranslatable_request"))
    }

    /// Applies what the body decided to the parked first attempt, and lets it go.
    fn resume_attempt(&self, attempt: u32, provider: usize, d: &Decision) -> Result<(), String> {
        let Some(p) = self.cfg.providers.get(provider) else {
            return Ok(());
        };
        let (path, drop_length) = gateway::attempt_plan(
            p,
            self.api,
            &self.path,
            Some(d.client_model.as_str()),
            d.body_rewritten,
        )?;
        // The attempt may be gone (reset meanwhile): then there is nothing to resume.
        host::with_context(attempt, self.id, || {
            if path != self.path {
                host::set_header(MapType::HttpRequestHeaders, ":path", Some(&path));
            }
            if drop_length {
                host::set_header(MapType::HttpRequestHeaders, "content-length", None);
            }
            host::resume_request();
        });
        Ok(())
    }

    /// Charges the request exactly once: at the end of the response, or at teardown.
    fn charge(&mut self, torn_down: bool) {
        if self.charged || !self.admitted {
            return;
        }
        let _p = super::prof::span("listener charge");
        self.charged = true;
        let ok = (200..300).contains(&self.status);
        let (usage, estimated) = self.final_usage(ok, torn_down);
        let store = HostStore;
        let model_label = self.model_label.clone();
        let consumer = metric_segment(&self.consumer);
        let row = [
            1,
            usage.input,
            usage.output,
            usage.cache_read,
            usage.cache_write,
            u64::from(estimated),
        ];
        let mut conflicts = 0;
        let mut failed = false;
        let mut add = |key: String| match add_u64s(&store, &key, row) {
            Ok((_, c)) => conflicts += c,
            Err(e) => {
                failed = true;
                log::warn!("usage counter {key} not updated: {e:?}");
            }
        };
        add(format!("tollgate:u:c:{}", self.consumer));
        add(format!("tollgate:u:m:{model_label}"));
        let served_by_key = !self.provider.is_empty() && !self.key_id.is_empty();
        if served_by_key {
            add(format!("tollgate:u:k:{}:{}", self.provider, self.key_id));
        }
        count("tollgate.shared_data.cas_conflicts", u64::from(conflicts));
        if failed {
            count("tollgate.shared_data.failures", 1);
        }
        let now = host::now_ms();
        if !self.reservations.is_empty() {
            let cost = self
                .cfg
                .prices
                .get(self.model())
                .map(|p| quota::cost_micro_usd(p, usage.input, usage.cache_read, usage.output))
                .unwrap_or(0);
            let actual = Demand {
                requests: 1,
                input: usage.input,
                output: usage.output,
                cost_micro_usd: cost,
            };
            if let Err(e) = quota::settle(&store, &self.reservations, &actual, now) {
                log::warn!("quota settlement failed: {e:?}");
            }
        }
        // Metrics: per consumer x model, per provider key, and by outcome.
        let cm = format!("tollgate.consumer.{consumer}.model.{model_label}");
        count(&format!("{cm}.requests"), 1);
        count(&format!("{cm}.tokens_in"), usage.input);
        count(&format!("{cm}.tokens_out"), usage.output);
        count(&format!("{cm}.tokens_cached"), usage.cache_read);
        if estimated {
            count(&format!("{cm}.estimated_requests"), 1);
        }
        if served_by_key {
            let pk = format!("tollgate.provider.{}.key.{}", self.provider, self.key_id);
            count(&format!("{pk}.requests"), 1);
            count(&format!("{pk}.tokens_in"), usage.input);
            count(&format!("{pk}.tokens_out"), usage.output);
        }
        let outcome = match (ok, torn_down) {
            (_, true) => "incomplete",
            (true, _) => "ok",
            (false, _) if self.status == 429 => "upstream_429",
            (false, _) if self.status >= 500 => "upstream_5xx",
            (false, _) => "upstream_4xx",
        };
        count(&format!("tollgate.outcome.{outcome}.requests"), 1);
        // Access-log values (read as %FILTER_STATE(wasm.tollgate_...:PLAIN)%).
        host::set_property("tollgate_provider", &self.provider);
        host::set_property("tollgate_key_id", &self.key_id);
        host::set_property("tollgate_input_tokens", &usage.input.to_string());
        host::set_property("tollgate_output_tokens", &usage.output.to_string());
        host::set_property(
            "tollgate_usage",
            if estimated { "estimated" } else { "exact" },
        );
        // For Envoy's global rate limit filter: `hits_addend` on stream done charges these.
        host::set_property(
            "tollgate_total_tokens",
            &usage.input.saturating_add(usage.output).to_string(),
        );
        log::debug!(
            "tollgate: charged consumer={} model={} provider={} key={} in={} out={} estimated={} ms={}",
            self.consumer,
            self.model(),
            self.provider,
            self.key_id,
            usage.input,
            usage.output,
            estimated,
            now.saturating_sub(self.started_ms)
        );
    }

    /// The provider's usage when it gave one; otherwise an estimate from the request and whatever
    /// text was received. Errors from the provider are not billed: they charge the request only.
    fn final_usage(&mut self, ok: bool, torn_down: bool) -> (Usage, bool) {
        if let Some(sse) = self.sse.as_mut() {
            let su = &mut self.stream_usage;
            sse.finish(|ev| su.on_event(&ev));
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

impl HttpContext for Listener {
    fn on_done(&mut self) -> bool {
        let _p = super::prof::span("listener on_done");
        if !self.response_complete {
            handoff::mark_client_gone(self.id);
        }
        true
    }

    fn on_http_request_headers(&mut self, _num: usize, end_of_stream: bool) -> Action {
        let _p = super::prof::span("listener on_http_request_headers");
        self.started_ms = host::now_ms();
        // One read of the whole map serves every header this callback looks at.
        let hdrs = host::headers(MapType::HttpRequestHeaders);
        let get = |name: &str| host::find(&hdrs, name);
        let path = get(":path").unwrap_or_default().to_string();
        if let Some(sp) = &self.cfg.status_path {
            if path
                .strip_prefix(sp.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('?'))
            {
                return super::status::serve(&self.cfg);
            }
        }
        self.api = ApiKind::from_path(&path);
        self.client = ClientApi::from_path(&path);
        self.path = path;
        let lookup = |name: &str| -> Option<&str> {
            let mut it = hdrs.iter().filter(|(k, _)| k == name);
            let first = it.next()?;
            // A repeated credential header is ambiguous: treat it as not given.
            if it.next().is_some() && gateway::CREDENTIAL_HEADERS.contains(&name) {
                return Some("\u{0}repeated");
            }
            Some(first.1.as_str())
        };
        // Out of the stream's headers first, so that not even a refusal's access-log line can
        // show the client's credential.
        for h in gateway::CREDENTIAL_HEADERS {
            if get(h).is_some() {
                host::set_header(MapType::HttpRequestHeaders, h, None);
            }
        }
        match gateway::identify(&self.cfg, lookup) {
            Ok(c) => self.consumer = c,
            Err(e) => {
                return self.reject(
                    ErrorKind::Authentication,
                    e.message(),
                    Some("invalid_api_key"),
                    &[],
                );
            }
        }
        host::set_property("tollgate_consumer", &self.consumer);
        let mut spoofed = false;
        for (k, _) in hdrs
            .iter()
            .filter(|(k, _)| k.starts_with(gateway::INTERNAL_PREFIX))
        {
            host::set_header(MapType::HttpRequestHeaders, k, None);
            spoofed = true;
        }
        if spoofed {
            // The route was matched on the client's copy of tollgate's internal headers: match again.
            host::clear_route_cache();
        }
        if let Some(len) = hdrs
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        {
            if len > self.cfg.max_request_bytes {
                return self.too_large();
            }
        }
        let now = self.started_ms;
        if let Some(a) = self.route(now) {
            return a;
        }
        let original = handoff::Original {
            path: self.path.clone(),
            authority: get(":authority").unwrap_or_default().to_string(),
            consumer: self.consumer.clone(),
        };
        if end_of_stream {
            // No body (GET /v1/models and the like): only the request counts.
            if let Some(a) = self.admit(now) {
                return a;
            }
            handoff::open(self.id, original);
            handoff::decide(self.id, Decision::default());
        } else {
            handoff::open(self.id, original);
        }
        host::set_header(
            MapType::HttpRequestHeaders,
            gateway::HDR_RID,
            Some(&self.id.to_string()),
        );
        // Never pause here: proxy-wasm would then withhold the body from this filter too. The first
        // upstream attempt waits for the body's verdict instead (see handoff).
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let _p = super::prof::span("listener on_http_request_body");
        if size as u64 > self.cfg.max_request_bytes {
            return self.too_large();
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host::body(BufferType::HttpRequestBody, size);
        self.on_body_complete(&body)
    }

    fn on_http_response_headers(&mut self, _num: usize, end_of_stream: bool) -> Action {
        let _p = super::prof::span("listener on_http_response_headers");
        // One read of the whole map serves every header this callback looks at.
        let hdrs = host::headers(MapType::HttpResponseHeaders);
        let get = |name: &str| host::find(&hdrs, name);
        self.status = get(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
        self.provider = get(gateway::HDR_PROVIDER).unwrap_or_default().to_string();
        self.key_id = get(gateway::HDR_KEY_ID).unwrap_or_default().to_string();
        if self.status == 429 && self.provider.is_empty() && get("x-envoy-ratelimited").is_some() {
            // Envoy's global rate limit filter refused it (fleet-wide budget): give the client the
            // same signals as tollgate's own 429.
            count("tollgate.outcome.rejected_global.requests", 1);
            if get("retry-after").is_none() {
                let secs = get("x-ratelimit-reset")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1)
                    .max(1);
                host::set_header(
                    MapType::HttpResponseHeaders,
                    "retry-after",
                    Some(&secs.to_string()),
                );
            }
        }
        let content_type = get("content-type").unwrap_or_default().to_ascii_lowercase();
        let sse = content_type.contains("text/event-stream");
        if self.status >= 500
            && self.provider.is_empty()
            && content_type.starts_with("text/plain")
            && !end_of_stream
        {
            // Envoy's own answer (upstream timeout, no healthy upstream, reset): in the client's
            // error shape like every other error.
            self.envoy_error = Some(Vec::new());
            host::set_header(
                MapType::HttpResponseHeaders,
                "content-type",
                Some("application/json"),
            );
            host::set_header(MapType::HttpResponseHeaders, "content-length", None);
        }
        if sse {
            self.sse = Some(SseParser::new(self.cfg.max_sse_event_bytes));
            if self.strip_usage_chunk {
                host::set_header(MapType::HttpResponseHeaders, "content-length", None);
            }
        }
        if !self.standings.is_empty() {
            let now = host::now_ms();
            for (k, v) in gateway::rate_limit_headers(self.client, &self.standings, now) {
                host::set_header(MapType::HttpResponseHeaders, &k, Some(&v));
            }
        }
        if end_of_stream {
            self.response_complete = true;
            self.charge(false);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let _p = super::prof::span("listener on_http_response_body");
        let chunk = host::body(BufferType::HttpResponseBody, size);
        if let Some(text) = self.envoy_error.as_mut() {
            text.extend_from_slice(&chunk);
            if !end_of_stream {
                return Action::Pause;
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
            host::replace_body(BufferType::HttpResponseBody, size, &body);
            self.response_complete = true;
            self.charge(false);
            return Action::Continue;
        }
        if let Some(sse) = self.sse.as_mut() {
            let su = &mut self.stream_usage;
            if self.strip_usage_chunk {
                let dropped_before = sse.dropped_events();
                // Reused from chunk to chunk: the stream path allocates nothing per chunk of its own.
                let mut out = core::mem::take(&mut self.out);
                out.clear();
                sse.feed(&chunk, |ev| {
                    if !su.on_event_is_usage_only(&ev) {
                        out.extend_from_slice(ev.raw);
                    }
                });
                if end_of_stream {
                    sse.finish(|ev| {
                        if !su.on_event_is_usage_only(&ev) {
                            out.extend_from_slice(ev.raw);
                        }
                    });
                }
                if sse.dropped_events() > dropped_before {
                    // An event too large to hold cannot be re-emitted from the parser: give the
                    // client every byte withheld so far plus this chunk, and pass the rest of the
                    // stream through as it comes (the usage chunk included).
                    let mut all = core::mem::take(&mut self.withheld);
                    all.extend_from_slice(&chunk);
                    host::replace_body(BufferType::HttpResponseBody, size, &all);
                    self.strip_usage_chunk = false;
                    log::warn!("an SSE event exceeded max_sse_event_bytes; passing the stream through unfiltered");
                } else {
                    // Bytes of an unfinished event stay withheld until the event is complete.
                    let pending = sse.pending();
                    match chunk.len().checked_sub(pending) {
                        // The common case: the unfinished event began in this chunk.
                        Some(from) => {
                            self.withheld.clear();
                            self.withheld
                                .extend_from_slice(chunk.get(from..).unwrap_or_default());
                        }
                        None => {
                            self.withheld.extend_from_slice(&chunk);
                            let keep_from = self.withheld.len().saturating_sub(pending);
                            self.withheld.drain(..keep_from);
                        }
                    }
                    if out != chunk {
                        host::replace_body(BufferType::HttpResponseBody, size, &out);
                    }
                }
                self.out = out;
            } else {
                sse.feed(&chunk, |ev| su.on_event(&ev));
            }
        } else if !self.json_overflow {
            if self.json.len() + chunk.len() > MAX_JSON_RESPONSE {
                self.json_overflow = true;
                self.json = Vec::new();
            } else {
                self.json.extend_from_slice(&chunk);
            }
        }
        if end_of_stream {
            self.response_complete = true;
            self.charge(false);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let _p = super::prof::span("listener on_log");
        // Reached without a charge: the client went away or the upstream reset mid-response.
        self.charge(true);
        handoff::close(self.id);
        super::prof::request_done();
    }
}

impl Listener {
    fn too_large(&self) -> Action {
        let msg = format!(
            "Request body is larger than the gateway's limit of {} bytes.",
            self.cfg.max_request_bytes
        );
        self.reject(
            ErrorKind::RequestTooLarge,
            &msg,
            Some("request_too_large"),
            &[],
        )
    }
}
