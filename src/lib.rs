//! tollgate: an Envoy proxy-wasm filter that injects provider API keys from a rotating pool,
//! counts tokens, enforces quotas and fails over between keys and providers.
//!
//! Everything but `filter/` is pure logic that knows nothing of proxy-wasm and is tested on the host.

pub mod admission;
pub mod config;
pub mod errors;
pub mod estimate;
pub mod gateway;
pub mod health;
pub mod json;
pub mod keypool;
pub mod quota;
pub mod request;
pub mod retry_signal;
pub mod sha256;
pub mod sse;
pub mod store;
pub mod translate;
pub mod usage;

/// The Envoy glue. Only built for Wasm: it binds the proxy-wasm host ABI directly.
#[cfg(target_arch = "wasm32")]
mod filter;
