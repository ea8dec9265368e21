//! The client APIs' shapes: what a request asks for, and errors in the client's own dialect.
pub mod envoy_reply;
pub mod errors;
pub mod headers;
pub mod models;
pub mod request;
pub(crate) mod splice;
pub mod trim;
