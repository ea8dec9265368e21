//! Counting tokens: usage read from JSON and SSE answers, and estimates when a provider gives none.
pub mod estimate;
pub mod sse;
pub mod usage;
