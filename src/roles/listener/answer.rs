//! The listener role's answer side: what the client gets back. The answer translated into the
//! client's API when another provider answered, the usage chunk the client did not ask for removed,
//! the consumer's rate-limit headers, Envoy's own plain-text errors in the client's error shape;
//! and, on the way, the provider's own usage read for the charge ([`super::charge`]).

use super::{Flow, Listener};
use crate::api::envoy_reply;
use crate::api::errors::{error_body, ErrorKind};
use crate::api::headers;
use crate::api::splice;
use crate::cache::assemble::Assembler;
use crate::config::Provider;
use crate::count::sse::{RawEvent, SseEvent, SseParser};
use crate::count::usage::{ChunkKeys, ClientEvent, KeyBuffers, StreamUsage};
use crate::failover::rewrite::{self, Translation};
use crate::failover::translate::{self, ChatToMessagesStream, MessagesToChatStream};
use crate::host::{Body, Edits, Host, Map};

/// The largest non-streaming response body kept to read its `usage`; past it the count is estimated.
const MAX_JSON_RESPONSE: usize = 8 << 20;

/// How a streamed answer is changed on its way to the client.
pub(super) enum StreamEdit {
    /// Passed as it comes; only read for usage.
    None,
    /// tollgate asked an OpenAI-speaking provider for stream usage the client did not ask for: the
    /// usage-only chunk is removed (clients that index `choices[0]` break on it). The other chunks
    /// pass as they came, `"usage": null` included, as OpenAI sends them to a client that asked
    /// for usage: a chunk is written back only when it held the usage chunk (or the end of an
    /// unfinished event).
    StripUsage,
    /// An Anthropic provider answered an OpenAI client.
    ToChat(Box<MessagesToChatStream>),
    /// An OpenAI-speaking provider answered an Anthropic client.
    ToMessages(Box<ChatToMessagesStream>),
}

/// The answer as it comes back.
pub(super) struct Answer {
    pub(super) status: u16,
    /// Who answered, as the attempt named them (empty for an answer of Envoy's own).
    pub(super) provider: String,
    pub(super) key_id: String,
    pub(super) sse: Option<SseParser>,
    pub(super) edit: StreamEdit,
    pub(super) stream_usage: StreamUsage,
    /// A JSON answer in the provider's own shape (usage is read from it).
    pub(super) json: Vec<u8>,
    pub(super) json_overflow: bool,
    /// A JSON answer to be translated for the client once complete.
    pub(super) translate_json: Translation,
    /// Envoy's own plain-text error, collected to be re-shaped for the client.
    pub(super) envoy_error: Option<Vec<u8>>,
    /// Bytes of unfinished events held back from the client while the stream is being edited.
    pub(super) withheld: Vec<u8>,
    /// Reused from chunk to chunk: the stream path allocates nothing per chunk of its own.
    pub(super) out: Vec<u8>,
    pub(super) key_buffers: KeyBuffers,
    pub(super) response_complete: bool,
    /// A stream to be stored in the response cache, assembled as it passes.
    pub(super) assembler: Option<Box<Assembler>>,
    /// The provider's error was replaced by an answer from the cache.
    pub(super) replaced: bool,
}

impl Default for Answer {
    fn default() -> Self {
        Answer {
            status: 0,
            provider: String::new(),
            key_id: String::new(),
            sse: None,
            edit: StreamEdit::None,
            stream_usage: StreamUsage::new(),
            json: Vec::new(),
            json_overflow: false,
            translate_json: Translation::None,
            envoy_error: None,
            withheld: Vec::new(),
            out: Vec::new(),
            key_buffers: KeyBuffers::default(),
            response_complete: false,
            assembler: None,
            replaced: false,
        }
    }
}

impl Listener {
    fn answering_provider(&self) -> Option<&Provider> {
        if self.ans.provider.is_empty() {
            return None;
        }
        self.cfg.provider(&self.ans.provider).map(|(_, p)| p)
    }

    pub fn on_response_headers<H: Host>(&mut self, host: &mut H, end_of_stream: bool) -> Flow {
        // One read of the whole map serves every header this callback looks at, and one write
        // carries every change (rate-limit headers, content type and length).
        let mut map = Edits::of(host.headers(Map::ResponseHeaders));
        self.ans.status = map.get(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
        self.ans.provider = map
            .get(headers::HDR_PROVIDER)
            .unwrap_or_default()
            .to_string();
        self.ans.key_id = map.get(headers::HDR_KEY_ID).unwrap_or_default().to_string();
        if self.stale_instead_of_error(host, map.has("x-tollgate-exhausted")) {
            return Flow::Stop;
        }
        if self.ans.status == 429 && self.ans.provider.is_empty() && map.has("x-envoy-ratelimited")
        {
            // Envoy's global rate limit filter refused it (fleet-wide budget): give the client the
            // same signals as tollgate's own 429.
            host.count("tollgate.outcome.rejected_global.requests", 1);
            if !map.has("retry-after") {
                let secs = map
                    .get("x-ratelimit-reset")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1)
                    .max(1);
                map.set("retry-after", secs.to_string());
            }
        }
        let content_type = map
            .get("content-type")
            .unwrap_or_default()
            .to_ascii_lowercase();
        let sse = content_type.contains("text/event-stream");
        if self.adm.passthrough && !content_type.contains("json") {
            // A file or audio passed through: no usage to read in it, so nothing is kept.
            self.ans.json_overflow = true;
        }
        let translation = self
            .answering_provider()
            .and_then(|p| rewrite::translation(self.api, p.kind).ok())
            .unwrap_or(Translation::None);
        if envoy_reply::reshapes(self.ans.status)
            && self.ans.provider.is_empty()
            && content_type.starts_with("text/plain")
            && !end_of_stream
        {
            // Envoy's own answer (body over its buffer limit, upstream timeout, no healthy upstream,
            // reset): in the client's error shape like every other error.
            self.ans.envoy_error = Some(Vec::new());
            map.set("content-type", "application/json");
            map.remove("content-length");
        } else if sse {
            self.ans.sse = Some(SseParser::new(self.cfg.max_sse_event_bytes));
            if let (Some(cc), true) = (&self.cfg.cache, self.adm.cache.store) {
                if self.ans.status == 200 && self.adm.cache.digest.is_some() {
                    let anthropic = self
                        .answering_provider()
                        .is_some_and(|p| p.kind.speaks_anthropic());
                    let bound = usize::try_from(cc.max_entry_bytes).unwrap_or(usize::MAX);
                    self.ans.assembler = Some(Box::new(Assembler::new(anthropic, bound)));
                }
            }
            let include_usage = self.adm.info.include_usage;
            let model = self.adm.model.as_str().to_string();
            self.ans.edit = match translation {
                Translation::ChatToMessages => StreamEdit::ToChat(Box::new(
                    MessagesToChatStream::new(&model, include_usage, self.started_ms / 1000),
                )),
                Translation::MessagesToChat => {
                    StreamEdit::ToMessages(Box::new(ChatToMessagesStream::new(&model)))
                }
                Translation::None if self.forced_stream_usage => StreamEdit::StripUsage,
                Translation::None => StreamEdit::None,
            };
            if !matches!(self.ans.edit, StreamEdit::None) {
                map.remove("content-length");
            }
        } else if translation != Translation::None && !end_of_stream {
            self.ans.translate_json = translation;
            map.set("content-type", "application/json");
            map.remove("content-length");
        }
        // The budgets as admission saw them: resets are counted from the request's arrival. An
        // answer a provider gave has them already: the attempt wrote them from the plan, in the same
        // write as the provider's name. Any other answer (Envoy's own, a local one) gets them here.
        if self.ans.provider.is_empty() {
            for (k, v) in &self.adm.rate_limits {
                map.set(*k, v.as_str());
            }
        }
        if self.adm.trimmed_messages > 0 {
            map.set(headers::HDR_TRIMMED, self.adm.trimmed_messages.to_string());
        }
        if let Some(v) = self.adm.cache.outcome.header() {
            map.set(crate::cache::HEADER, v);
        }
        if let Some(ms) = self.waiting.waited_ms {
            map.set(headers::HDR_WAITED, ms.to_string());
        }
        map.apply(host, Map::ResponseHeaders);
        if end_of_stream {
            self.ans.response_complete = true;
            self.charge(host, false);
        }
        Flow::Continue
    }

    pub fn on_response_body<H: Host>(
        &mut self,
        host: &mut H,
        size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if self.ans.replaced {
            return Flow::Stop;
        }
        if let Some(text) = self.ans.envoy_error.as_mut() {
            text.extend_from_slice(&host.body(Body::Response, size));
            if !end_of_stream {
                return Flow::Pause;
            }
            let detail = String::from_utf8_lossy(text).trim().to_string();
            let body = envoy_reply::client_body(self.client, self.ans.status, &detail);
            host.set_body(Body::Response, size, &body);
            if !self.decided {
                // Refused by Envoy before tollgate decided: a body over Envoy's buffer limit.
                host.count("tollgate.outcome.rejected_invalid.requests", 1);
            }
            self.ans.response_complete = true;
            self.charge(host, false);
            return Flow::Continue;
        }
        if self.ans.sse.is_some() {
            // HTTP/1 ends a body with an empty chunk: nothing to read.
            let chunk = if size == 0 {
                Vec::new()
            } else {
                host.body(Body::Response, size)
            };
            self.on_stream_chunk(host, size, &chunk, end_of_stream);
        } else if self.ans.translate_json != Translation::None {
            // Whole, then translated: a JSON answer cannot be translated piecewise.
            if !end_of_stream {
                return Flow::Pause;
            }
            let body = host.body(Body::Response, size);
            self.keep_json(&body);
            let out = self.translated_json(&body);
            host.set_body(Body::Response, size, &out);
        } else if !self.ans.json_overflow && size > 0 {
            let chunk = host.body(Body::Response, size);
            self.keep_json(&chunk);
        }
        if end_of_stream {
            self.ans.response_complete = true;
            self.charge(host, false);
        }
        Flow::Continue
    }

    fn keep_json(&mut self, chunk: &[u8]) {
        if self.ans.json_overflow {
            return;
        }
        if self.ans.json.len() + chunk.len() > MAX_JSON_RESPONSE {
            self.ans.json_overflow = true;
            self.ans.json = Vec::new();
        } else {
            self.ans.json.extend_from_slice(chunk);
        }
    }

    fn translated_json(&self, body: &[u8]) -> Vec<u8> {
        let ok = (200..300).contains(&self.ans.status);
        let model = self.adm.model.as_str();
        let out = match (self.ans.translate_json, ok) {
            (Translation::ChatToMessages, true) => {
                translate::messages_response_to_chat_at(body, model, self.started_ms / 1000)
            }
            (Translation::MessagesToChat, true) => {
                translate::chat_response_to_messages(body, model)
            }
            (Translation::ChatToMessages, false) => {
                Ok(translate::messages_error_to_chat(body, self.ans.status))
            }
            (_, false) => Ok(translate::chat_error_to_messages(body, self.ans.status)),
            (Translation::None, true) => Ok(body.to_vec()),
        };
        out.unwrap_or_else(|e| {
            log::warn!("could not translate the provider's response: {e}");
            error_body(
                self.client,
                ErrorKind::BadGateway,
                "The provider's response could not be translated.",
                None,
                None,
            )
        })
    }

    /// One chunk of a streamed answer: every complete event is counted in the provider's own shape,
    /// then edited for the client; bytes of an unfinished event wait for the rest of it.
    fn on_stream_chunk<H: Host>(&mut self, host: &mut H, size: usize, chunk: &[u8], end: bool) {
        let Some(sse) = self.ans.sse.as_mut() else {
            return;
        };
        let su = &mut self.ans.stream_usage;
        let mut keep = self.ans.assembler.as_deref_mut();
        if matches!(self.ans.edit, StreamEdit::None) {
            let mut on = |ev: SseEvent<'_>| {
                su.on_event(&ev);
                if let Some(a) = keep.as_mut() {
                    a.on_event(&ev);
                }
            };
            sse.feed(chunk, &mut on);
            if end {
                sse.finish(&mut on);
            }
            return;
        }
        let dropped_before = sse.dropped_events();
        // Reused from chunk to chunk: the stream path allocates nothing per chunk of its own.
        let mut out = core::mem::take(&mut self.ans.out);
        out.clear();
        // While the client gets the chunk's own bytes unchanged, only how many: nothing is copied
        // (most chunks of a stripped stream pass as they came).
        let mut same = None;
        match &mut self.ans.edit {
            StreamEdit::StripUsage => {
                same = Some(0);
                let buffers = core::mem::take(&mut self.ans.key_buffers);
                let keys = ChunkKeys::reusing(chunk, buffers);
                let mut on = |ev: RawEvent<'_>| {
                    let seen = su.on_scanned_event_for_client(&ev, keys.of_data(ev.data));
                    if let Some(a) = keep.as_mut() {
                        ev.with_text(|ev| a.on_event(ev));
                    }
                    strip_event(seen, &ev, chunk, &mut same, &mut out)
                };
                sse.feed_raw(chunk, &mut on);
                if end {
                    sse.finish_raw(&mut on);
                }
                self.ans.key_buffers = keys.into_buffers();
            }
            edit => {
                let mut on = |ev: SseEvent<'_>| {
                    if let Some(a) = keep.as_mut() {
                        a.on_event(&ev);
                    }
                    edit_event(edit, su, &ev, &mut out)
                };
                sse.feed(chunk, &mut on);
                if end {
                    sse.finish(&mut on);
                    match edit {
                        StreamEdit::ToChat(t) => t.finish(&mut out),
                        StreamEdit::ToMessages(t) => t.finish(&mut out),
                        _ => {}
                    }
                }
            }
        }
        if sse.dropped_events() > dropped_before && matches!(self.ans.edit, StreamEdit::StripUsage)
        {
            // An event too large to hold cannot be re-emitted from the parser: give the client
            // every byte withheld so far plus this chunk, and pass the rest of the stream through
            // as it comes (its usage chunk included).
            let mut all = core::mem::take(&mut self.ans.withheld);
            all.extend_from_slice(chunk);
            host.set_body(Body::Response, size, &all);
            self.ans.edit = StreamEdit::None;
            log::warn!(
                "an SSE event exceeded max_sse_event_bytes; passing the stream through unedited"
            );
        } else {
            let pending = sse.pending();
            match chunk.len().checked_sub(pending) {
                // The common case: the unfinished event began in this chunk.
                Some(from) => {
                    self.ans.withheld.clear();
                    self.ans
                        .withheld
                        .extend_from_slice(chunk.get(from..).unwrap_or_default());
                }
                None => {
                    self.ans.withheld.extend_from_slice(chunk);
                    let keep_from = self.ans.withheld.len().saturating_sub(pending);
                    self.ans.withheld.drain(..keep_from);
                }
            }
            match same {
                Some(n) if n == chunk.len() => {}
                Some(n) => {
                    // Only the unfinished event at the end is held back.
                    out.extend_from_slice(chunk.get(..n).unwrap_or_default());
                    host.set_body(Body::Response, size, &out);
                }
                None if out != chunk => {
                    host.set_body(Body::Response, size, &out);
                }
                None => {}
            }
        }
        self.ans.out = out;
    }
}

/// What the client gets of one complete event of a stream whose usage tollgate asked for, written to
/// `out`; while the client gets the chunk's own bytes unchanged (`same`: how many so far), nothing
/// is copied.
fn strip_event(
    seen: ClientEvent,
    ev: &RawEvent<'_>,
    chunk: &[u8],
    same: &mut Option<usize>,
    out: &mut Vec<u8>,
) {
    if let Some(n) = *same {
        if seen == ClientEvent::AsIs
            && splice::span_bytes(chunk, ev.raw).is_some_and(|r| r.start == n)
        {
            *same = Some(n + ev.raw.len());
            return;
        }
        out.extend_from_slice(chunk.get(..n).unwrap_or_default());
        *same = None;
    }
    seen.write(ev.raw, out);
}

/// One complete event of a stream being translated: counted, then written for the client.
fn edit_event(edit: &mut StreamEdit, su: &mut StreamUsage, ev: &SseEvent<'_>, out: &mut Vec<u8>) {
    match edit {
        StreamEdit::None | StreamEdit::StripUsage => su.on_event(ev),
        StreamEdit::ToChat(t) => {
            su.on_event(ev);
            t.on_event(ev, out);
        }
        StreamEdit::ToMessages(t) => {
            su.on_event(ev);
            t.on_event(ev, out);
        }
    }
}
