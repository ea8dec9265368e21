//! What the listener-level role decided for a request, handed to every upstream attempt.
//!
//! The listener role decides before any attempt exists (it holds the request headers while it reads
//! the body). It writes this record into the stream's filter state; the cluster-level role reads it
//! on each attempt (Envoy lets an upstream filter read its downstream stream's filter state). Each
//! attempt starts again from the request as the client sent it: Envoy hands every attempt the same
//! header map, which the previous attempt rewrote (`:path`, `:authority`).

use serde::{Deserialize, Serialize};

/// Filter-state name (`wasm.tollgate_plan`).
pub const FILTER_STATE: &str = "tollgate_plan";

/// Borrowed from the listener's state when written and from the filter-state bytes when read: no
/// string is copied either way.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan<'a> {
    /// The client's `:path` and `:authority`.
    pub path: &'a str,
    pub authority: &'a str,
    /// The model the client asked for ("" when the request has none).
    pub model: &'a str,
    /// The listener changed the body (lowered max_tokens, asked for stream usage): the client's
    /// content-length no longer holds.
    pub rewritten: bool,
    /// Who is calling: sticky rotation falls back to it.
    pub consumer: &'a str,
    /// The provider the request starts on, and its health as the listener read it (shared-data
    /// encoding): the first attempt chooses its key from it instead of reading it again.
    pub start: Option<(usize, &'a [u8])>,
    /// When the request arrived (ms): the first attempt's clock.
    pub at_ms: Option<u64>,
    /// The hash of the request's leading prompt, for `prompt_affinity` rotation (None when no
    /// provider rotates so, or the request has no prompt to hash).
    pub prefix: Option<u64>,
    /// The rate-limit headers of the consumer's budgets as admission saw them: the attempt writes
    /// them with the headers it writes anyway, so that the listener need not write the answer's
    /// headers again.
    pub rate_limits: Vec<(&'a str, &'a str)>,
    /// What the request will spend of a paced key's tokens (see
    /// `admission::route::paced_tokens`).
    pub tokens: u64,
}

impl<'a> Plan<'a> {
    /// postcard: a few hundred nanoseconds where JSON took microseconds. Filter state is read only
    /// by tollgate itself, so the form need not be readable.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_extend(self, Vec::with_capacity(256)).unwrap_or_default()
    }

    pub fn decode(bytes: &'a [u8]) -> Option<Plan<'a>> {
        postcard::from_bytes(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let p = Plan {
            path: "/v1/chat/completions?x=1",
            authority: "gw",
            model: "gpt-4o \"mini\"\n",
            rewritten: true,
            consumer: "team-a",
            start: Some((1, &[0, 255])),
            at_ms: Some(17),
            prefix: Some(u64::MAX),
            rate_limits: vec![("x-ratelimit-limit-tokens", "1000")],
            tokens: 4_200,
        };
        let bytes = p.encode();
        assert_eq!(Plan::decode(&bytes), Some(p));
        assert_eq!(Plan::decode(b"garbage"), None);
    }
}
