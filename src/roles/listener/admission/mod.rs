//! Admission: the listener role's decision before any attempt exists, as a walk over small steps.
//!
//! Each step is one policy in its own file, with its own tests against the fake host. A step reads
//! what earlier steps decided from [`Admission`], adds its own decision to it, and either lets the
//! request go on or stops it ([`Stop`]). The walk ([`walk`]) is the one place that says in which
//! order they run:
//!
//! 1. [`model`]: the model the client named, and the name it goes by in metrics;
//! 2. [`allow`]: whether the consumer may use that model;
//! 3. [`cache`]: the response cache's lookup; a hit skips the route and the context window, and
//!    ends the walk with its answer once the quota step has counted it;
//! 4. [`route`]: the provider the request starts on (the first that serves the model and can take
//!    it now), and whether the request can be sent there as the client wrote it; when none can, an
//!    expired cache entry within the stale window may answer instead;
//! 5. [`context`]: the model's context window: the request refused, or fitted to it where the
//!    configuration allows (`max_tokens` lowered, the oldest turns dropped);
//! 6. [`concurrency`]: a place among the consumer's requests in flight, held until the request ends
//!    (not for a request answered from the cache);
//! 7. [`quota`]: the consumer's budgets, reserved against the request's estimate (as the steps
//!    before left it: a trimmed prompt, a lowered `max_tokens`; a request answered from the cache:
//!    one request, no tokens).
//!
//! The consumer ([`consumer`]) and what the path is for ([`path`]: an API tollgate counts, the
//! gateway's own model list, a path passed through, or one refused) are known earlier, from the
//! request headers alone, and are inputs of the walk. A step that is not configured returns at
//! once: no host call, no shared-data read. A step that takes something a later step's refusal must give back (a reservation, a slot) says
//! so in [`release`], which the walk calls when it stops.
//!
//! A refusal that says when the same request could go ([`Refusal::retry_in_ms`]) may hold the
//! request instead, for a consumer that waits ([`wait`]): the walk is then run again for it later.

pub mod allow;
pub mod cache;
pub mod concurrency;
pub mod consumer;
pub mod context;
pub mod model;
pub mod path;
pub mod quota;
pub mod route;
pub mod wait;

use crate::api::errors::{ClientApi, ErrorKind};
use crate::api::request::RequestInfo;
use crate::config::Config;
use crate::count::usage::ApiKind;
use crate::host::Host;
use crate::limit::in_flight::Subject;
use crate::limit::quota::{Reservation, Standing};

/// What every step may read of the request: fixed before the walk starts.
pub struct Incoming<'a> {
    pub cfg: &'a Config,
    pub api: ApiKind,
    pub client: ClientApi,
    /// The request's arrival (ms): every step judges by the same instant.
    pub now: u64,
    /// The body as the client sent it; None when the request has none.
    pub body: Option<&'a [u8]>,
}

/// What the steps decided so far. The listener keeps it for the answer and the charge.
#[derive(Debug, Default)]
pub struct Admission {
    pub consumer: String,
    pub info: RequestInfo,
    /// The model the client named ("" when none).
    pub model: String,
    /// The model as metrics and shared-data keys name it: a configured model, "other" or "none".
    pub model_label: String,
    /// The provider the request starts on (config order), and its health entry as read when
    /// choosing it (shared-data bytes): the first attempt chooses its key from that reading
    /// instead of reading it again.
    pub start: usize,
    pub start_health: Option<Vec<u8>>,
    /// A path passed through as it is (`passthrough_paths`): counted as one request, routed by the
    /// client's API alone (no model mapped, nothing translated).
    pub passthrough: bool,
    /// The body as it goes on, when a step changed it.
    pub rewritten: Option<Vec<u8>>,
    /// Messages the context step dropped (the answer says how many).
    pub trimmed_messages: usize,
    /// Admitted against the consumer's budgets: the answer is charged.
    pub metered: bool,
    pub reservations: Vec<Reservation>,
    pub standings: Vec<Standing>,
    /// The standings as rate-limit headers in the client API's dialect.
    pub rate_limits: Vec<(&'static str, String)>,
    /// The place the request holds among its consumer's requests in flight, until it ends.
    pub in_flight: Option<Subject>,
    /// What the response cache did, and what the answer side needs to store the answer.
    pub cache: cache::CacheUse,
}

impl Admission {
    /// The body as it stands: as a step rewrote it, else as the client sent it.
    pub fn body<'a>(&'a self, incoming: &Incoming<'a>) -> Option<&'a [u8]> {
        self.rewritten.as_deref().or(incoming.body)
    }
}

/// Why the walk ended before the request could go on. (Answering from a cache is a stop too, a
/// variant of its own. Holding a request until there is capacity follows a refusal that says when
/// the request could go: [`wait`].)
#[derive(Debug)]
pub enum Stop {
    /// Answered with an error in the client API's shape.
    Refuse(Refusal),
    /// Answered locally with this answer (from the response cache).
    Serve(LocalAnswer),
}

/// A local answer that is not an error: status, headers and the whole body.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalAnswer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// A local error answer, counted by outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
    /// OpenAI's `error.code`.
    pub code: Option<&'static str>,
    /// OpenAI's `error.param`: the field at fault.
    pub param: Option<&'static str>,
    /// OpenAI's `error.type` where it is not the kind's own (a 429 names the exhausted limit).
    pub openai_type: Option<&'static str>,
    pub headers: Vec<(&'static str, String)>,
    /// The `tollgate.outcome.<outcome>.requests` counter it adds to.
    pub outcome: &'static str,
    /// See [`Refusal::retry_in_ms`]. (Kept in 4 bytes: a larger `Refusal` is one clippy's
    /// `result_large_err` refuses.)
    retry_in: Option<core::num::NonZeroU32>,
}

impl Refusal {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let outcome = match kind {
            ErrorKind::Authentication => "rejected_auth",
            ErrorKind::RateLimit => "rejected_quota",
            ErrorKind::RequestTooLarge | ErrorKind::InvalidRequest => "rejected_invalid",
            _ => "rejected_other",
        };
        Refusal {
            kind,
            message: message.into(),
            code: None,
            param: None,
            openai_type: None,
            headers: Vec::new(),
            outcome,
            retry_in: None,
        }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn openai_type(mut self, kind: &'static str) -> Self {
        self.openai_type = Some(kind);
        self
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn outcome(mut self, outcome: &'static str) -> Self {
        self.outcome = outcome;
        self
    }

    pub fn retry_in(mut self, ms: u32) -> Self {
        self.retry_in = core::num::NonZeroU32::new(ms);
        self
    }

    /// The same request could be admitted after about this long (a place frees, a window
    /// refills): a step that waits for capacity may hold it instead of refusing.
    pub fn retry_in_ms(&self) -> Option<u32> {
        self.retry_in.map(core::num::NonZeroU32::get)
    }
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Self {
        Stop::Refuse(r)
    }
}

/// Every step, in order. `adm.consumer` and `adm.info` are filled in before (from the headers and
/// the body).
pub fn walk<H: Host>(
    host: &mut H,
    incoming: &Incoming<'_>,
    adm: &mut Admission,
) -> Result<(), Stop> {
    let walked = (|| {
        model::check(incoming, adm)?;
        allow::check(incoming, adm)?;
        cache::check(host, incoming, adm)?;
        if !adm.cache.serves() {
            match route::check(host, incoming, adm) {
                Ok(()) => {
                    context::check(host, incoming, adm)?;
                    concurrency::check(host, incoming, adm)?;
                }
                Err(stop) => cache::instead(host, incoming, adm, stop)?,
            }
        }
        quota::check(host, incoming, adm)?;
        cache::serve(adm)?;
        Ok(())
    })();
    if matches!(walked, Err(Stop::Refuse(_))) {
        release(host, adm);
    }
    walked
}

/// Gives back what steps took for a request refused. The quota step runs last, so nothing it
/// reserved is ever given back here. (A request answered from the cache took no place in flight,
/// and keeps its reservation: the listener settles it as one request.)
fn release<H: Host>(host: &mut H, adm: &mut Admission) {
    concurrency::give_back(host, adm, false);
}

#[cfg(test)]
pub(crate) mod testing {
    //! A configuration and an incoming request for the steps' own tests.
    use super::*;
    use crate::config::parse;

    pub fn config(json: &str) -> Config {
        parse(json.as_bytes(), &|_| Some("sk-secret".to_string())).unwrap()
    }

    pub fn incoming<'a>(cfg: &'a Config, body: &'a [u8]) -> Incoming<'a> {
        Incoming {
            cfg,
            api: ApiKind::ChatCompletions,
            client: ClientApi::OpenAi,
            now: 1_000_000,
            body: Some(body),
        }
    }

    /// An admission whose model and prompt were read from `body` as the listener reads them.
    pub fn admission(consumer: &str, body: &[u8]) -> Admission {
        let info = crate::api::request::inspect(ApiKind::ChatCompletions, body).unwrap_or_default();
        Admission {
            consumer: consumer.to_string(),
            model: info.model.clone().unwrap_or_default(),
            info,
            ..Admission::default()
        }
    }
}
