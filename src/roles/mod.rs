//! The two roles of the module, their decisions written against [`crate::host::Host`]:
//! - [`listener::Listener`] (listener-level HTTP filter, root_id `tollgate.listener`): once per
//!   request; decides before the first attempt (consumer, starting provider, admission, body
//!   rewrites) and owns what the client gets back (translation, usage stripping, rate-limit
//!   headers, charging).
//! - [`upstream::Upstream`] (cluster-level filter before `upstream_codec`, root_id
//!   `tollgate.upstream`): once per attempt; key choice and injection, the request rewritten for
//!   the provider Envoy picked, what the answer says of the key and provider.
//!
//! `filter/` only adapts the proxy-wasm SDK's callbacks to these methods.

pub mod held;
pub mod in_flight;
pub mod listener;
pub mod plan;
pub mod refused;
pub mod status;
pub mod upstream;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_models;
#[cfg(test)]
mod tests_pacing;

/// What a callback tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Hold (headers) or buffer (body) until a later callback continues.
    Pause,
    /// Answered locally: nothing more goes on.
    Stop,
    /// Held for capacity: the adapter keeps the role for its tick, which lets the request go on
    /// (or answers it) later ([`listener::Listener::retry`]).
    Hold,
}
