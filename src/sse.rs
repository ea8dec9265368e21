//! Incremental Server-Sent Events parser (to be implemented).

/// One complete SSE event. Borrowed from the parser's buffers: valid only inside the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field, "" when absent.
    pub event: &'a str,
    /// The `data:` lines joined with '\n' (per the SSE spec), "" when absent.
    pub data: &'a str,
    /// The event's bytes exactly as received, blank-line terminator included.
    pub raw: &'a [u8],
}
