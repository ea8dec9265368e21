//! Listener-level role: runs once per client request, and decides before any attempt exists.
//!
//! It holds the request headers while it reads the body (`allow_on_headers_stop_iteration`): who is
//! calling comes from the headers ([`admission::consumer`]); the rest of the decision is a walk over
//! small admission steps ([`admission`]) once the body is whole. A request they admit goes on with
//! its plan in filter state for the cluster-level role, and the body as the steps left it.
//!
//! The answer side is in [`answer`] (what the client gets back) and [`charge`] (usage settled
//! exactly once, metrics, the access-log record); [`cached`] answers from the response cache and
//! stores in it; [`waiting`] holds a refused request for capacity and walks again for it.

pub mod admission;
mod answer;
mod cached;
mod charge;
mod models;
mod retry_after;
mod waiting;

use super::plan::{self, Plan};
use super::refused::{self, Refused};
use super::{status, Flow};
use crate::api::errors::{error_body_typed, ClientApi, ErrorKind};
use crate::api::headers;
use crate::api::request;
use crate::config::{Config, Consumers};
use crate::count::usage::ApiKind;
use crate::host::prof::span;
use crate::host::{Body, Edits, Host, Map};
use admission::path::PathUse;
use admission::{Admission, Incoming, Refusal, Stop};
use answer::Answer;
use std::rc::Rc;

pub use cached::saved_row;
pub use charge::RECORD;

/// Filter-state name of the consumer, for Envoy's rate limit filter (`wasm.tollgate_consumer`).
pub const CONSUMER: &str = "tollgate_consumer";
/// Filter state the listener role writes when its client went away before the answer completed.
pub const CLIENT_GONE: &str = "tollgate_client_gone";

pub struct Listener {
    cfg: Rc<Config>,
    api: ApiKind,
    client: ClientApi,
    path: String,
    authority: String,
    started_ms: u64,
    /// The request went on (or was answered): nothing more to decide on the request path.
    decided: bool,
    /// The request headers, read once and edited until the request goes on (one write).
    request_headers: Edits<'static>,
    /// What admission decided (consumer, model, start, budgets).
    adm: Admission,
    /// tollgate forced `stream_options.include_usage` for this request.
    forced_stream_usage: bool,
    ans: Answer,
    charged: bool,
    waiting: waiting::Waiting,
}

impl Listener {
    pub fn new(cfg: Rc<Config>) -> Self {
        Listener {
            cfg,
            api: ApiKind::Other,
            client: ClientApi::OpenAi,
            path: String::new(),
            authority: String::new(),
            started_ms: 0,
            decided: false,
            request_headers: Edits::default(),
            adm: Admission {
                model_label: "none".into(),
                ..Admission::default()
            },
            forced_stream_usage: false,
            ans: Answer::default(),
            charged: false,
            waiting: waiting::Waiting::default(),
        }
    }

    /// A local answer in the client API's error shape, counted by outcome.
    fn reject<H: Host>(&mut self, host: &mut H, r: &Refusal) -> Flow {
        self.decided = true;
        // Not even a refusal's access-log line shows the client's credential.
        self.request_headers.apply(host, Map::RequestHeaders);
        self.write_record(host, None);
        let body = error_body_typed(
            self.client,
            r.kind,
            &r.message,
            r.code,
            r.param,
            r.openai_type,
        );
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        let spread = retry_after::spread(host, &self.cfg, r);
        headers.extend(
            r.headers
                .iter()
                .filter(|(k, _)| spread.is_none() || *k != "retry-after")
                .map(|(k, v)| (*k, v.as_str())),
        );
        if let Some((secs, ms)) = &spread {
            headers.extend([
                ("retry-after", secs.as_str()),
                ("retry-after-ms", ms.as_str()),
            ]);
        }
        host.respond(r.kind.status(), &headers, &body);
        host.count(&format!("tollgate.outcome.{}.requests", r.outcome), 1);
        Flow::Stop
    }

    fn too_large<H: Host>(&mut self, host: &mut H) -> Flow {
        let msg = format!(
            "Request body is larger than the gateway's limit of {} bytes.",
            self.cfg.max_request_bytes
        );
        let r = Refusal::new(ErrorKind::RequestTooLarge, msg).code("request_too_large");
        self.reject(host, &r)
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
        let path_use = admission::path::classify(&self.cfg, &hdrs, &self.path, self.api);
        if matches!(path_use, PathUse::Models(_)) && hdrs.get_str("anthropic-version").is_some() {
            // The Anthropic SDK asks for the same path as OpenAI's, and gets its own shape.
            self.client = ClientApi::Anthropic;
        }
        admission::cache::ask(&self.cfg, &hdrs, &self.path, &mut self.adm);
        let identified = admission::consumer::identify(&self.cfg, host.store(), &hdrs);
        // Credentials and tollgate's internal headers leave the request, by name and whatever
        // their bytes: neither a provider nor an access-log line sees them.
        let trusted = match &self.cfg.consumers {
            Consumers::TrustedHeader { header, .. } => Some(header.clone()),
            _ => None,
        };
        let spoofed = hdrs
            .raw()
            .any(|(k, _)| k.starts_with(headers::INTERNAL_PREFIX.as_bytes()));
        self.request_headers = Edits::of(hdrs);
        self.request_headers.remove_where(|name| {
            name.starts_with(headers::INTERNAL_PREFIX.as_bytes())
                || headers::is_credential(name)
                || trusted.as_deref().is_some_and(|t| t.as_bytes() == name)
        });
        if spoofed {
            // The route was matched on the client's copy of tollgate's internal headers.
            host.clear_route_cache();
        }
        match identified {
            Ok(c) => self.adm.consumer = c,
            Err(r) => return self.reject(host, &r),
        }
        if let Err(r) = self.read_max_wait() {
            return self.reject(host, &r);
        }
        match path_use {
            PathUse::Counted => {}
            PathUse::Passthrough => self.adm.passthrough = true,
            PathUse::Models(id) => return self.list_models(host, id.as_deref()),
            PathUse::Refused(r) => return self.reject(host, &r),
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
        let needs_body = !matches!(self.api, ApiKind::Other);
        let inspect = span("listener inspect");
        let info = match (body, needs_body) {
            (Some(b), _) => request::inspect_with(self.api, b, self.cfg.prompt_affinity()),
            (None, true) => request::inspect(self.api, &[]),
            (None, false) => Ok(Default::default()),
        };
        drop(inspect);
        match info {
            Ok(i) => self.adm.info = i,
            // A body passed through need not be JSON (audio, files): it goes as it is.
            Err(_) if self.adm.passthrough => {}
            Err(e) => {
                let r =
                    Refusal::new(ErrorKind::InvalidRequest, e.to_string()).code("invalid_request");
                return self.reject(host, &r);
            }
        }
        let cfg = self.cfg.clone();
        let incoming = Incoming {
            cfg: &cfg,
            api: self.api,
            client: self.client,
            // The time the request arrived: milliseconds before its body, and no clock read.
            now: self.started_ms,
            body,
        };
        if let Some(flow) = self.wait_behind(host, body.is_some()) {
            return flow;
        }
        match admission::walk(host, &incoming, &mut self.adm) {
            Ok(()) => self.go_on(host, &incoming),
            Err(Stop::Refuse(r)) => self.wait_or_reject(host, r),
            Err(Stop::Serve(a)) => self.serve(host, a),
        }
    }

    /// The request was admitted: the body and headers as the steps left them, and the plan for
    /// every attempt.
    fn go_on<H: Host>(&mut self, host: &mut H, incoming: &Incoming<'_>) -> Flow {
        let lowered = self.adm.rewritten.is_some();
        let wants_stream_usage = self.api == ApiKind::ChatCompletions
            && self.adm.info.stream
            && !self.adm.info.include_usage;
        if wants_stream_usage {
            let current = self.adm.body(incoming).unwrap_or_default();
            if let Some(b) = request::with_include_usage(current) {
                self.adm.rewritten = Some(b);
                self.forced_stream_usage = true;
            }
        }
        if let Some(b) = &self.adm.rewritten {
            let size = incoming.body.map_or(0, <[u8]>::len);
            if !host.set_body(Body::Request, size, b) {
                if lowered {
                    return refused::fail_closed(host, self.client, Refused::Budget);
                }
                self.forced_stream_usage = false;
                self.adm.rewritten = None;
            }
        }
        let start = self.adm.start;
        let steered = self.cfg.providers.get(start).filter(|_| start > 0);
        if let Some(p) = steered {
            // The routes match on this header to pick a cluster whose priorities start there.
            self.request_headers.set(headers::HDR_ROUTE, p.name.clone());
            host.count(&format!("tollgate.provider.{}.steered_requests", p.name), 1);
        }
        if self.adm.rewritten.is_some() {
            // The body changed length: the client's content-length no longer holds.
            self.request_headers.remove("content-length");
        }
        if !self.request_headers.apply(host, Map::RequestHeaders) {
            return refused::fail_closed(host, self.client, Refused::ClientCredential);
        }
        if steered.is_some() {
            host.clear_route_cache();
        }
        let planning = span("listener plan");
        let health = self.adm.start_health.as_deref().map(|h| (start, h));
        let plan = Plan {
            path: &self.path,
            authority: &self.authority,
            // A request passed through is sent as it is: no model of it is mapped.
            model: if self.adm.passthrough {
                ""
            } else {
                &self.adm.model
            },
            rewritten: self.adm.rewritten.is_some(),
            consumer: &self.adm.consumer,
            start: health,
            // When admission judged it: its arrival, or its release after a wait.
            at_ms: Some(incoming.now),
            prefix: self.adm.info.prefix,
            rate_limits: self
                .adm
                .rate_limits
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect(),
            tokens: admission::route::paced_tokens(&self.cfg, &self.adm),
        };
        if !host.set_filter_state(plan::FILTER_STATE, &plan.encode()) {
            return refused::fail_closed(host, self.client, Refused::Plan);
        }
        drop(planning);
        // For Envoy's rate limit filter (fleet-wide budgets): its descriptor is the consumer.
        if !host.set_filter_state(CONSUMER, self.adm.consumer.as_bytes()) {
            return refused::fail_closed(host, self.client, Refused::Consumer);
        }
        self.decided = true;
        Flow::Continue
    }

    /// The end of the request on this stream: charge it now if the answer did not complete.
    pub fn on_log<H: Host>(&mut self, host: &mut H) {
        self.charge(host, true);
    }

    /// The stream is torn down. If the answer did not complete, the client went away (or the
    /// upstream reset): the cluster-level role then knows the attempt's end is not the provider's
    /// failure.
    pub fn on_done<H: Host>(&mut self, host: &mut H) {
        self.leave_if_held(host);
        // Given back at the end of the answer or in `on_log` already, unless neither came.
        admission::concurrency::give_back(host, &mut self.adm, !self.ans.response_complete);
        if !self.ans.response_complete {
            host.set_filter_state(CLIENT_GONE, b"1");
        }
    }
}
