#![cfg_attr(feature = "probes", allow(dead_code))]
//! The floor of `make bench`: a root context that creates an HttpContext whose callbacks are all
//! the SDK's defaults (Continue). Envoy still crosses into V8 for every callback the SDK exports,
//! which is what a proxy-wasm filter costs before doing anything.
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

#[cfg(feature = "probes")]
mod probes;

#[cfg(not(feature = "probes"))]
proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

#[cfg(feature = "probes")]
proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::<probes::Root>::default() });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Empty))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Empty;

impl Context for Empty {}

impl HttpContext for Empty {}
