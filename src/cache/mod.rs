//! A response cache: the same deterministic question answered once, not once per caller.
//!
//! Envoy's own cache filter does not cache POST, and an LLM answer is worth reusing only when the
//! question fixes it (`temperature` 0, a `seed`) or the client says so: the policy is tollgate's.
//! Everything here is pure (no proxy-wasm); the listener role applies it:
//! - [`key`]: the digest of everything that determines the answer (the client's API path, its
//!   body in a canonical form without the streaming flags, the consumer unless the scope is
//!   shared);
//! - [`policy`]: what a client's request asks of the cache, whether a request is deterministic by
//!   its own parameters, and whether an answer may be stored;
//! - [`entry`]: the stored form (the answer in the client's dialect as one complete JSON, with its
//!   usage) and the two-way index of a set of slots;
//! - [`slots`]: lookup and store over Envoy's shared data, in a fixed number of slots;
//! - [`assemble`]: a streamed answer assembled into the equivalent non-streamed JSON;
//! - [`replay`]: a stored JSON answer written back as a well-formed stream.
//!
//! Hand-written because no crate does this over proxy-wasm shared data; the stream shapes are the
//! providers' own, built with serde_json's `Value` (this is not the hot path: it runs for
//! cacheable streams and streamed hits only).

pub mod assemble;
pub mod entry;
pub mod key;
pub mod policy;
pub mod replay;
pub mod slots;

/// The response header that says what the cache did (`hit`, `miss`, `bypass`, `stale`), and the
/// request header by which a client asks for its request to be cached (`on`).
pub const HEADER: &str = "x-tollgate-cache";
