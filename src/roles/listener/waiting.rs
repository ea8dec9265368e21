//! The listener's side of waiting for capacity ([`admission::wait`]): holding a request the walk
//! refused, walking again for it on the worker's tick ([`Listener::retry`]), and letting it go when
//! its client leaves. The adapter keeps a held listener aside and calls `retry` with the stream as
//! the current one.

use super::admission::{self, wait, Incoming, Refusal, Stop};
use super::Listener;
use crate::api::errors::ErrorKind;
use crate::api::headers;
use crate::config::waiting::Wait;
use crate::host::{Body, Host};
use crate::limit::waiting::Held;
use crate::roles::Flow;

/// A request's waiting: None of it is set unless its consumer waits.
#[derive(Debug, Default)]
pub(super) struct Waiting {
    /// The stream's context id (the adapter's).
    pub stream: u32,
    /// What the client asked with `x-tollgate-max-wait`, in ms.
    pub asked_ms: Option<u64>,
    /// How this request may wait.
    wait: Option<Wait>,
    /// The request as it was before the walk, to walk again.
    as_read: wait::AsRead,
    has_body: bool,
    /// In the worker's list now.
    held: bool,
    /// How long it was held, once it left the list.
    pub waited_ms: Option<u64>,
}

impl Listener {
    /// The stream's context id, for the worker's list of held requests.
    pub fn with_stream(mut self, id: u32) -> Self {
        self.waiting.stream = id;
        self
    }

    /// What the client asked with `x-tollgate-max-wait` (read only where waiting is configured).
    pub(super) fn read_max_wait(&mut self) -> Result<(), Refusal> {
        if self.cfg.waiting.is_none() {
            return Ok(());
        }
        let Some(v) = self.request_headers.base().get(headers::HDR_MAX_WAIT) else {
            return Ok(());
        };
        match core::str::from_utf8(v).ok().and_then(wait::asked_ms) {
            Some(ms) => {
                self.waiting.asked_ms = Some(ms);
                Ok(())
            }
            None => {
                let msg = format!(
                    "The header {} must be a number of seconds, such as 2 or 0.5.",
                    headers::HDR_MAX_WAIT
                );
                Err(Refusal::new(ErrorKind::InvalidRequest, msg).code("invalid_max_wait"))
            }
        }
    }

    /// Before the walk: whether this request may wait. When its consumer has requests held, it
    /// queues behind them (`Some`: held, or refused at once past a cap) without a walk.
    pub(super) fn wait_behind<H: Host>(&mut self, host: &mut H, has_body: bool) -> Option<Flow> {
        let w = wait::policy(
            &self.cfg,
            &self.adm.consumer,
            &self.path,
            self.waiting.asked_ms,
        )?;
        self.waiting.wait = Some(w);
        self.waiting.as_read = wait::AsRead::of(&self.adm);
        self.waiting.has_body = has_body;
        wait::queued_ahead(host, &self.adm.consumer, &w).then(|| self.hold(host, None))
    }

    /// The walk refused: held instead, when the request may wait for what refused it.
    pub(super) fn wait_or_reject<H: Host>(&mut self, host: &mut H, r: Refusal) -> Flow {
        match self.waiting.wait {
            Some(w) if wait::could_wait(&r, &w, self.started_ms, host.now_ms()) => {
                self.hold(host, Some(r))
            }
            _ => self.reject(host, &r),
        }
    }

    fn hold<H: Host>(&mut self, host: &mut H, base: Option<Refusal>) -> Flow {
        let Some(w) = self.waiting.wait else {
            return Flow::Pause;
        };
        let held = Held {
            id: self.waiting.stream,
            consumer: self.adm.consumer.as_str().into(),
            priority: w.priority,
            since_ms: self.started_ms,
            deadline_ms: self.started_ms.saturating_add(w.max_wait_ms),
            next_try_ms: base
                .as_ref()
                .map_or(0, |r| wait::next_try(r, self.started_ms)),
        };
        match wait::hold(host, &self.cfg, held, &w, base) {
            Ok(()) => {
                self.waiting.held = true;
                Flow::Hold
            }
            Err(r) => self.reject(host, &r),
        }
    }

    /// The worker's tick, with this request's stream current: admission walked again. `Continue`:
    /// admitted, the adapter lets it go on; `Stop`: answered (its wait is over); `Hold`: still held.
    pub fn retry<H: Host>(&mut self, host: &mut H) -> Flow {
        if !self.waiting.held {
            return Flow::Stop;
        }
        let now = host.now_ms();
        wait::rewind(&mut self.adm, self.waiting.as_read);
        let body = self
            .waiting
            .has_body
            .then(|| host.body(Body::Request, usize::MAX));
        let cfg = self.cfg.clone();
        let incoming = Incoming {
            cfg: &cfg,
            api: self.api,
            client: self.client,
            now,
            body: body.as_deref(),
        };
        match admission::walk(host, &incoming, &mut self.adm) {
            Ok(()) => {
                self.leave(host, "released");
                self.go_on(host, &incoming)
            }
            Err(Stop::Serve(a)) => {
                self.leave(host, "released");
                self.serve(host, a)
            }
            Err(Stop::Refuse(r)) => {
                let still = self
                    .waiting
                    .wait
                    .is_some_and(|w| wait::could_wait(&r, &w, self.started_ms, now));
                if still {
                    let (id, at) = (self.waiting.stream, wait::next_try(&r, now));
                    host.with_waiting(&mut |w| w.snooze(id, at));
                    return Flow::Hold;
                }
                self.leave(host, "expired");
                self.reject(host, &r)
            }
        }
    }

    /// Whether the request, admitted, goes to a provider whose keys have limits on requests in
    /// flight: its attempt takes its key's place when Envoy sends it, not at admission.
    pub fn takes_key_place(&self) -> bool {
        self.cfg.in_flight.provider(self.adm.start)
    }

    /// The stream ends while the request is held (its client left): out of the list, having
    /// reserved nothing and reached no provider.
    pub(super) fn leave_if_held<H: Host>(&mut self, host: &mut H) {
        if self.waiting.held {
            self.leave(host, "gone");
        }
    }

    fn leave<H: Host>(&mut self, host: &mut H, outcome: &str) {
        self.waiting.held = false;
        self.waiting.waited_ms = wait::unhold(host, self.waiting.stream, outcome);
    }
}
