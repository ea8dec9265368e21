//! The Envoy glue: the proxy-wasm SDK's contexts, each callback handing its arguments to a role
//! (`crate::roles`) with [`sdk_host::SdkHost`] and mapping the role's [`Flow`] to an `Action`.
//! No decision lives here. Which role a plugin plays comes from its `root_id`.

mod hostcalls;
use crate::host::prof;

mod sdk_host;

use crate::api::errors::{error_body, ClientApi, ErrorKind};
use crate::config::{self, Config};
use crate::failover::health;
use crate::host::Host;
use crate::maps::HashMap;
use crate::roles::held::{self, Held};
use crate::roles::listener::admission::wait;
use crate::roles::listener::Listener;
use crate::roles::refused::Refused;
use crate::roles::upstream::Upstream;
use crate::roles::Flow;
use core::cell::{Cell, RefCell};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel};
use sdk_host::SdkHost;
use std::rc::Rc;
use std::time::Duration;

/// How often a worker flushes its metrics and usage totals (both roles tick: whichever comes
/// first flushes the worker's tally).
const TICK_MS: u64 = 200;
/// The listener's tick while it holds requests for capacity: how late a request is released after
/// capacity appears, at most. Only while something is held; flushes still go every [`TICK_MS`].
const WAITING_TICK_MS: u64 = 50;

/// How many times a plugin's end tries to flush rows the store refused (another worker's CAS won)
/// before it gives them up.
const FLUSH_TRIES_AT_DONE: u32 = 8;

thread_local! {
    /// Requests this VM's listener contexts hold (one VM runs on one worker thread).
    static HELD: RefCell<Held> = RefCell::new(Held::default());
    /// Listeners of requests held for capacity, kept here (by context id) for the tick; a
    /// context takes its listener back at its next callback.
    static PARKED: RefCell<HashMap<u32, Listener>> = RefCell::new(HashMap::default());
    /// A context that held a request has sped up its root's tick since the list was last empty.
    static SPED_UP: Cell<bool> = const { Cell::new(false) };
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { role: Role::Listener, config: None, fast: false, last_flush_ms: 0 })
    });
}}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Listener,
    Upstream,
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause | Flow::Stop | Flow::Hold => Action::Pause,
    }
}

struct Root {
    role: Role,
    config: Option<Rc<Config>>,
    /// This root ticks every [`WAITING_TICK_MS`]: this VM holds requests for capacity.
    fast: bool,
    last_flush_ms: u64,
}

impl Context for Root {
    /// The plugin ends: its configuration was replaced, its listener drained, or Envoy stops.
    /// Every stream of the plugin holds it, so its last streams have been charged by now (a request
    /// in flight at a reload ends on the plugin it began on); but their charges wait in this
    /// worker's tally for a tick, and when the VM ends with the plugin (its code or `vm_config`
    /// changed) no tick comes. They go now.
    ///
    /// Teardown is not held for rows the store refuses (`false` here holds the VM until
    /// `proxy_done`, and while Envoy stops no tick may come to call it): they are tried again at
    /// once, a few times, since a CAS conflict lasts only as long as another worker's write.
    fn on_done(&mut self) -> bool {
        follow_log_level();
        let mut kept = 0;
        for _ in 0..FLUSH_TRIES_AT_DONE {
            kept = sdk_host::flush();
            if kept == 0 {
                break;
            }
        }
        if kept > 0 {
            log::error!("{kept} usage total(s) could not be written to shared data as the plugin ended: they are lost");
        }
        log::debug!("{:?} plugin done: this worker's tally flushed", self.role);
        true
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        follow_log_level();
        let root_id = SdkHost::default()
            .property(&["plugin_root_id"])
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        self.role = match root_id.as_str() {
            "" | "tollgate" | "tollgate.listener" => Role::Listener,
            "tollgate.upstream" => Role::Upstream,
            other => {
                log::error!("root_id '{other}' is not a tollgate role (use 'tollgate.listener' or 'tollgate.upstream')");
                return false;
            }
        };
        let raw = proxy_wasm::hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match config::parse(&raw, &|name| std::env::var(name).ok()) {
            Ok(cfg) => {
                for w in &cfg.warnings {
                    log::warn!("{w}");
                }
                log::info!(
                    "configured as {:?} with {} provider(s), {} key(s)",
                    self.role,
                    cfg.providers.len(),
                    cfg.providers.iter().map(|p| p.keys.len()).sum::<usize>()
                );
                // Keys that entered a pool go on probation, decided alike in every VM.
                let host = SdkHost::default();
                for line in health::apply_config(host.store(), &cfg.providers) {
                    log::info!("{line}");
                }
                self.config = Some(Rc::new(cfg));
                // Refused writes are rare: their counters exist from the start, so that an alert
                // on their increase sees the first one.
                for what in Refused::ALL {
                    sdk_host::define_counter(&what.metric());
                }
                // Flushes this worker's metrics and usage totals, and watches held requests.
                let _ = proxy_wasm::hostcalls::set_tick_period(Duration::from_millis(TICK_MS));
                true
            }
            Err(e) => {
                // One line that names the field; Envoy then refuses the config.
                log::error!("invalid configuration: {e}");
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn on_tick(&mut self) {
        // `make profile` reports the tick's host calls apart: they are per unit of time.
        let _tick = crate::host::prof::tick();
        if self.role == Role::Listener && (self.fast || SPED_UP.get()) {
            // Every listener root of the VM releases held requests, whichever plugin (before or
            // after a reload) held them: each listener keeps its own configuration.
            let busy = release_held();
            if busy != self.fast || busy != SPED_UP.get() {
                self.fast = busy;
                let ms = if busy { WAITING_TICK_MS } else { TICK_MS };
                hostcalls::set_tick_period_ms(ms as u32);
                SPED_UP.set(busy);
            }
            let now = sdk_host::now_ms();
            if self.fast && now.saturating_sub(self.last_flush_ms) < TICK_MS {
                return;
            }
            self.last_flush_ms = now;
        }
        // Leases on requests in flight first: the gauges they show go out with this flush.
        if let Some(cfg) = &self.config {
            crate::roles::in_flight::tick(&mut SdkHost::default(), cfg);
        }
        sdk_host::flush();
        if self.role != Role::Listener {
            return;
        }
        let overdue = HELD.with(|h| {
            let mut h = h.borrow_mut();
            if h.proven() {
                Vec::new()
            } else {
                h.overdue(sdk_host::now_ms())
            }
        });
        for id in overdue {
            // The stream may be gone meanwhile: then there is nothing to answer.
            if proxy_wasm::hostcalls::set_effective_context(id).is_ok() {
                held::answer_overdue(&mut SdkHost::default());
            }
        }
    }

    /// Always `Some`: the SDK's dispatcher panics on `None`.
    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        if context_id.is_multiple_of(256) {
            follow_log_level();
        }
        Some(match (&self.config, self.role) {
            (Some(cfg), Role::Listener) => Box::new(ListenerContext {
                id: context_id,
                role: Some(Listener::new(cfg.clone()).with_stream(context_id)),
            }),
            (Some(cfg), Role::Upstream) => Box::new(UpstreamContext(Upstream::new(cfg.clone()))),
            (None, _) => Box::new(Unconfigured),
        })
    }
}

/// Formats log lines only at the level Envoy would print them: `debug!` on the hot path then costs
/// nothing in production. Re-read now and then, since the level can be changed at runtime.
fn follow_log_level() {
    if let Ok(level) = proxy_wasm::hostcalls::get_log_level() {
        proxy_wasm::set_log_level(level);
    }
}

struct ListenerContext {
    id: u32,
    /// None while the request is held for capacity: the listener is in [`PARKED`] for the tick.
    role: Option<Listener>,
}

impl ListenerContext {
    /// The listener, taken back from the tick's keeping after a hold (one branch otherwise).
    fn role(&mut self) -> Option<&mut Listener> {
        if self.role.is_none() {
            self.role = PARKED.with(|p| p.borrow_mut().remove(&self.id));
        }
        self.role.as_mut()
    }

    /// The action for a flow; a request held for capacity leaves its listener to the tick, which
    /// runs faster while anything is held.
    fn act(&mut self, flow: Flow) -> Action {
        if flow == Flow::Hold {
            if let Some(l) = self.role.take() {
                PARKED.with(|p| p.borrow_mut().insert(self.id, l));
            }
            if !SPED_UP.get() {
                SPED_UP.set(true);
                // The tick of this context's root (the listener's): the first release need not
                // wait for a slow tick.
                hostcalls::set_tick_period_ms(WAITING_TICK_MS as u32);
            }
        }
        action(flow)
    }
}

/// The listener's tick while requests are held for capacity: each is tried in release order
/// (lanes, then arrival), its stream made current, admission walked again; those admitted go on.
/// A held request costs nothing between ticks: its stream is paused in Envoy. Whether any is
/// still held afterwards.
fn release_held() -> bool {
    let mut round = None;
    SdkHost::default().with_waiting(&mut |w| round = (!w.is_empty()).then(|| w.round()));
    let Some(mut round) = round else {
        return false;
    };
    let now = sdk_host::now_ms();
    while let Some(held) = round.next(now) {
        // Out of PARKED while it runs: a callback the host makes meanwhile must not find it
        // borrowed.
        let Some(mut listener) = PARKED.with(|p| p.borrow_mut().remove(&held.id)) else {
            // Its stream ended without reaching it: nothing to keep held.
            wait::unhold(&mut SdkHost::default(), held.id, "gone");
            continue;
        };
        if proxy_wasm::hostcalls::set_effective_context(held.id).is_err() {
            listener.on_done(&mut SdkHost::default());
            continue;
        }
        let flow = listener.retry(&mut SdkHost::default());
        let takes_key_place = listener.takes_key_place();
        PARKED.with(|p| p.borrow_mut().insert(held.id, listener));
        match flow {
            Flow::Hold => round.stayed(&held),
            Flow::Continue => {
                // Envoy continues the stream once this tick returns.
                hostcalls::continue_request();
                round.released(takes_key_place);
            }
            Flow::Pause | Flow::Stop => {}
        }
    }
    let mut busy = false;
    SdkHost::default().with_waiting(&mut |w| busy = !w.is_empty());
    busy
}

/// Whether held requests still need watching (cheap: no host call).
fn watching_held() -> bool {
    HELD.with(|h| !h.borrow().proven())
}

impl Context for ListenerContext {
    fn on_done(&mut self) -> bool {
        let _p = prof::span("listener on_done");
        if watching_held() {
            HELD.with(|h| h.borrow_mut().release(self.id));
        }
        if let Some(l) = self.role() {
            l.on_done(&mut SdkHost::default());
        }
        true
    }
}

impl HttpContext for ListenerContext {
    fn on_http_request_headers(&mut self, _num: usize, end_of_stream: bool) -> Action {
        let _p = prof::span("listener on_http_request_headers");
        let Some(l) = self.role() else {
            return Action::Continue;
        };
        let flow = l.on_request_headers(&mut SdkHost::default(), end_of_stream);
        if flow == Flow::Pause && watching_held() {
            let now = sdk_host::now_ms();
            HELD.with(|h| h.borrow_mut().hold(self.id, now));
        }
        self.act(flow)
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let _p = prof::span("listener on_http_request_body");
        if watching_held() {
            HELD.with(|h| h.borrow_mut().body_arrived(self.id));
        }
        let Some(l) = self.role() else {
            return Action::Continue;
        };
        let flow = l.on_request_body(&mut SdkHost::default(), size, end_of_stream);
        self.act(flow)
    }

    fn on_http_request_trailers(&mut self, _num: usize) -> Action {
        let _p = prof::span("listener on_http_request_trailers");
        if watching_held() {
            HELD.with(|h| h.borrow_mut().body_arrived(self.id));
        }
        let Some(l) = self.role() else {
            return Action::Continue;
        };
        let flow = l.on_request_trailers(&mut SdkHost::default());
        self.act(flow)
    }

    fn on_http_response_headers(&mut self, _num: usize, end_of_stream: bool) -> Action {
        let _p = prof::span("listener on_http_response_headers");
        let Some(l) = self.role() else {
            return Action::Continue;
        };
        action(l.on_response_headers(&mut SdkHost::default(), end_of_stream))
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let _p = prof::span("listener on_http_response_body");
        if size > 0 {
            // Counted apart: Envoy also calls with no bytes (a stream's end), which read nothing, and
            // how often it does varies from run to run; calls per SSE event are judged by these.
            drop(prof::span("listener response body with bytes"));
        }
        let Some(l) = self.role() else {
            return Action::Continue;
        };
        action(l.on_response_body(&mut SdkHost::default(), size, end_of_stream))
    }

    fn on_log(&mut self) {
        {
            let _p = prof::span("listener on_log");
            if let Some(l) = self.role() {
                l.on_log(&mut SdkHost::default());
            }
        }
        prof::request_done();
    }
}

struct UpstreamContext(Upstream);

impl Context for UpstreamContext {
    /// The attempt ends (Envoy runs no `on_log` for cluster-level contexts).
    fn on_done(&mut self) -> bool {
        let _p = prof::span("upstream on_done");
        self.0.on_done(&mut SdkHost::default());
        true
    }
}

impl HttpContext for UpstreamContext {
    fn on_http_request_headers(&mut self, _num: usize, _end_of_stream: bool) -> Action {
        let _p = prof::span("upstream on_http_request_headers");
        action(self.0.on_request_headers(&mut SdkHost::default()))
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let _p = prof::span("upstream on_http_request_body");
        action(
            self.0
                .on_request_body(&mut SdkHost::default(), size, end_of_stream),
        )
    }

    fn on_http_response_headers(&mut self, _num: usize, _end_of_stream: bool) -> Action {
        let _p = prof::span("upstream on_http_response_headers");
        action(self.0.on_response_headers(&mut SdkHost::default()))
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let _p = prof::span("upstream on_http_response_body");
        action(
            self.0
                .on_response_body(&mut SdkHost::default(), size, end_of_stream),
        )
    }

    fn on_log(&mut self) {
        self.0.on_done(&mut SdkHost::default());
    }
}

/// A worker whose configuration is missing (Envoy normally refuses such a config; this is the
/// defensive answer if a context is created anyway): refuse with 503 rather than pass traffic
/// through without keys or quotas.
struct Unconfigured;

impl Context for Unconfigured {}

impl HttpContext for Unconfigured {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let mut host = SdkHost::default();
        host.count("tollgate.outcome.unconfigured.requests", 1);
        let body = error_body(
            ClientApi::OpenAi,
            ErrorKind::Overloaded,
            "The gateway is not configured.",
            None,
            None,
        );
        host.respond(503, &[("content-type", "application/json")], &body);
        Action::Pause
    }
}
