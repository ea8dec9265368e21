//! Failing over: keys that cool down for as long as the provider asked, provider circuits, and the
//! rewriting of a request and its answer for another provider.
pub mod health;
pub mod pace;
pub mod refusal;
pub mod retry_signal;
pub mod rewrite;
pub mod route;
pub mod translate;
