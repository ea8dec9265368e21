//! Requests whose headers the listener role holds, by stream context id.
//!
//! The listener role holds a request's headers until its body is complete. Envoy delivers that body
//! only when the plugin config sets `allow_on_headers_stop_iteration: true`; without it the request
//! would hang until a timeout. The root context's tick asks this registry for requests held too long
//! while no held request of this plugin has ever seen its body: those are answered with an error and
//! the missing setting is logged, instead of hanging. One request that receives its body proves the
//! setting is there, and the check stops. (Requests held for capacity are another matter: see
//! [`crate::limit::waiting`].)

use crate::api::errors::{error_body, ClientApi, ErrorKind};
use crate::host::Host;

/// How long a request may be held without a body callback, while the setting is unproven.
pub const HOLD_LIMIT_MS: u64 = 10_000;

#[derive(Debug, Default)]
pub struct Held {
    /// (context id, held since ms), in the order they were held.
    entries: Vec<(u32, u64)>,
    /// A held request received its body: Envoy delivers bodies of held requests.
    proven: bool,
}

impl Held {
    pub fn hold(&mut self, context_id: u32, now_ms: u64) {
        if !self.proven {
            self.entries.push((context_id, now_ms));
        }
    }

    /// The request's body arrived: the setting works, nothing needs watching any more.
    pub fn body_arrived(&mut self, context_id: u32) {
        self.release(context_id);
        self.proven = true;
        self.entries.clear();
    }

    /// The request ended (answered, reset or gone).
    pub fn release(&mut self, context_id: u32) {
        self.entries.retain(|(id, _)| *id != context_id);
    }

    pub fn proven(&self) -> bool {
        self.proven
    }

    /// Requests held longer than [`HOLD_LIMIT_MS`] while unproven, taken out of the registry.
    pub fn overdue(&mut self, now_ms: u64) -> Vec<u32> {
        if self.proven {
            return Vec::new();
        }
        let (late, on_time): (Vec<_>, Vec<_>) = self
            .entries
            .iter()
            .partition(|(_, since)| now_ms.saturating_sub(*since) > HOLD_LIMIT_MS);
        self.entries = on_time;
        late.into_iter().map(|(id, _)| id).collect()
    }
}

/// The answer to a request held past [`HOLD_LIMIT_MS`] without its body.
pub fn answer_overdue<H: Host>(host: &mut H) {
    log::error!(
        "tollgate: a request was held {} s without its body: the listener role's plugin config \
         (the Wasm filter's `config:` beside `root_id: tollgate.listener`) must set \
         `allow_on_headers_stop_iteration: true` (Envoy 1.35+)",
        HOLD_LIMIT_MS / 1000
    );
    host.count("tollgate.outcome.misconfigured.requests", 1);
    let body = error_body(
        ClientApi::OpenAi,
        ErrorKind::Internal,
        "The gateway is misconfigured and cannot read request bodies; its operator has been told in the log.",
        None,
        None,
    );
    host.respond(500, &[("content-type", "application/json")], &body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_held_too_long_are_overdue_until_one_body_arrives() {
        let mut h = Held::default();
        h.hold(1, 0);
        h.hold(2, 5_000);
        assert_eq!(h.overdue(HOLD_LIMIT_MS), Vec::<u32>::new());
        assert_eq!(h.overdue(HOLD_LIMIT_MS + 1), vec![1]);
        assert_eq!(
            h.overdue(HOLD_LIMIT_MS + 1),
            Vec::<u32>::new(),
            "answered once"
        );
        h.release(2);
        h.hold(3, 0);
        h.body_arrived(4);
        assert!(h.proven());
        assert_eq!(h.overdue(u64::MAX), Vec::<u32>::new());
        h.hold(5, 0);
        assert_eq!(
            h.overdue(u64::MAX),
            Vec::<u32>::new(),
            "nothing watched once proven"
        );
    }
}
