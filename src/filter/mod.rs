//! The Envoy glue: proxy-wasm contexts that gather inputs, call the pure modules and apply their
//! decisions. Two roles of one module, chosen by the plugin's `root_id`:
//! - `tollgate` / `tollgate.listener` (listener-level HTTP filter): consumer check, quota admission,
//!   token accounting, rate-limit headers, access-log values. Runs once per request.
//! - `tollgate.upstream` (cluster-level filter, before `upstream_codec`): key choice and injection,
//!   provider rewrite and translation, passive health. Runs once per upstream attempt.

mod abi;
mod dispatch;
mod handoff;
mod host;
mod listener;
mod logger;
mod prof;
mod status;
mod upstream;

use crate::config::{self, Config};
use dispatch::{Action, HttpContext, RootContext};
use host::{count, property};
use std::rc::Rc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Listener,
    Upstream,
}

/// Every plugin's root context, as `dispatch` creates it; its configuration says which role it is.
fn new_root(_context_id: u32) -> Box<dyn RootContext> {
    Box::new(Root {
        role: Role::Listener,
        config: None,
    })
}

struct Root {
    role: Role,
    config: Option<Rc<Config>>,
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        follow_log_level();
        let root_id = property(&["plugin_root_id"])
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
        let raw = host::body(abi::BufferType::PluginConfiguration, usize::MAX);
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
                self.config = Some(Rc::new(cfg));
                true
            }
            Err(e) => {
                // One line that names the field; Envoy then refuses the config.
                log::error!("invalid configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Box<dyn HttpContext> {
        let _p = prof::span(if self.role == Role::Listener {
            "listener create"
        } else {
            "upstream create"
        });
        if context_id.is_multiple_of(256) {
            follow_log_level();
        }
        match (&self.config, self.role) {
            (Some(cfg), Role::Listener) => {
                Box::new(listener::Listener::new(context_id, cfg.clone()))
            }
            (Some(cfg), Role::Upstream) => {
                Box::new(upstream::Upstream::new(context_id, cfg.clone()))
            }
            (None, _) => Box::new(Unconfigured),
        }
    }
}

/// Formats log lines only at the level Envoy would print them: `debug!` on the hot path then costs
/// nothing in production. Re-read now and then, since the level can be changed at runtime.
fn follow_log_level() {
    match abi::log_level() {
        Ok(level) => logger::set_level(level),
        Err(status) => {
            log::warn!("proxy_get_log_level failed ({status:?}): keeping the level as it is")
        }
    }
}

/// A worker whose configuration is missing (Envoy normally refuses such a config; this is the
/// defensive answer if a context is created anyway): refuse with 503 rather than pass traffic
/// through without keys or quotas.
struct Unconfigured;

impl HttpContext for Unconfigured {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        count("tollgate.outcome.unconfigured.requests", 1);
        let body = crate::api::errors::error_body(
            crate::api::errors::ClientApi::OpenAi,
            crate::api::errors::ErrorKind::Overloaded,
            "The gateway is not configured.",
            None,
            None,
        );
        host::respond(503, &[("content-type", "application/json")], &body);
        Action::Pause
    }
}
