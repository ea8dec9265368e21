//! tollgate: an Envoy proxy-wasm filter that injects provider API keys from a rotating pool,
//! counts tokens, enforces quotas and fails over between keys and providers.
//!
//! The tree follows what the filter does. Everything but `filter/` is pure logic that knows nothing
//! of proxy-wasm and is tested on the host:
//! - `config`: the plugin configuration (serde, then validation that names the field);
//! - `api`: the client APIs' shapes (request inspection, error bodies);
//! - `pool`: which key an attempt carries;
//! - `count`: tokens out of JSON and SSE answers, and estimates when a provider gives none;
//! - `limit`: consumers' budgets, admission and settlement in shared data;
//! - `cache`: a response cache for deterministic requests (key, policy, stored form, replay);
//! - `failover`: key cooldowns and provider circuits, and rewriting a request for another provider;
//! - `store`: the shared-data seam (Envoy's CAS store, and a fake that behaves like it);
//! - `host`: everything a role asks of Envoy, as one trait, with a fake host for tests;
//! - `roles`: the listener-level and upstream roles' decisions, written against `host::Host`.

pub mod api;
pub mod cache;
pub mod config;
pub mod count;
pub mod failover;
pub mod host;
pub mod limit;
pub mod maps;
pub mod pool;
pub mod roles;
pub mod store;

/// The Envoy glue: the proxy-wasm SDK's contexts adapted to the roles. Only built for Wasm.
#[cfg(target_arch = "wasm32")]
mod filter;
