//! Incremental Server-Sent Events parser (WHATWG `text/event-stream` rules).
//!
//! Hand-written: no crate on the card parses SSE, and the ones that do elsewhere own the stream
//! (async readers, owned events), while a proxy filter is handed chunks split anywhere and must give
//! back every byte it does not drop.
//!
//! Built for a proxy that both inspects and forwards a stream: every byte that is not part of a
//! dropped (oversized) event comes back in exactly one [`SseEvent::raw`], so re-emitting `raw` for
//! every event reproduces the stream byte for byte.

use std::borrow::Cow;

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

/// One complete event before its fields are read as text ([`SseParser::feed_raw`]): a caller that
/// passes most events on as they came can decide from the bytes, and validate UTF-8 only for the
/// events it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent<'a> {
    /// The `event:` field's bytes, empty when absent.
    pub event: &'a [u8],
    /// The `data:` lines joined with '\n', empty when absent.
    pub data: &'a [u8],
    /// The event's bytes exactly as received, blank-line terminator included.
    pub raw: &'a [u8],
}

impl RawEvent<'_> {
    /// The event with its fields as text (invalid UTF-8 replaced by U+FFFD, which allocates).
    pub fn with_text<R>(&self, f: impl FnOnce(&SseEvent<'_>) -> R) -> R {
        let (event, data) = (utf8(self.event), utf8(self.data));
        f(&SseEvent {
            event: &event,
            data: &data,
            raw: self.raw,
        })
    }
}

/// Whether the parser is in the middle of discarding an event that outgrew its cap
/// ([`SseParser::overflow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    None,
    /// An event grew past the cap: the rest of it is being skipped up to its terminating blank line.
    Dropped,
}

/// Incremental SSE parser.
///
/// Pass-through choice: a block without any `data:` line (comments, keep-alives, a lone `event:`,
/// stray blank lines) is not an event under the spec, but it is still passed to `on_event` with
/// `event == ""` and `data == ""` so that its `raw` bytes can be re-emitted. Callers that count or
/// inspect events should skip events whose `data` is empty.
///
/// Cap: an event whose raw size exceeds `max_event_bytes` is never dispatched, however it is split
/// into chunks. Once the unfinished event outgrows the cap its bytes are released and the rest of
/// it is skipped up to its blank line, so memory stays bounded by the cap plus one chunk.
///
/// Events that lie whole inside a chunk are parsed in place and their fields borrowed from it; only
/// an event split across chunks is copied (into a buffer reused across calls), and only a field made
/// of several `data:` lines is assembled. In steady state feeding a chunk allocates nothing (invalid
/// UTF-8 in a field is replaced with U+FFFD, which does allocate).
#[derive(Debug)]
pub struct SseParser {
    /// The unfinished event's bytes (while skipping, at most an unresolved trailing CR).
    buf: Vec<u8>,
    lines: Lines,
}

/// Parser state. Its offsets index the slice being scanned: a chunk, or `buf` when an event is
/// split across chunks (they are rebased when the unfinished tail moves into `buf`).
#[derive(Debug)]
struct Lines {
    max_event_bytes: usize,
    event_start: usize,
    /// Start of the current, not yet terminated, line.
    line_start: usize,
    /// Where the search for the next line terminator resumes.
    scan: usize,
    data: Data,
    /// The value of the last `event:` line.
    event: Option<(usize, usize)>,
    /// The event's data when it has several `data:` lines (`Data::Joined`).
    joined: Vec<u8>,
    /// The first line of the stream may start with a BOM, which the spec strips.
    at_stream_start: bool,
    overflow: Overflow,
    /// While skipping, the partial line's bytes are discarded: remember whether it had any.
    skipped_line_nonempty: bool,
    warned: bool,
    dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Data {
    None,
    /// A single `data:` line's value, borrowed from the scanned slice.
    Line(usize, usize),
    Joined,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl SseParser {
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            buf: Vec::new(),
            lines: Lines {
                max_event_bytes,
                event_start: 0,
                line_start: 0,
                scan: 0,
                data: Data::None,
                event: None,
                joined: Vec::new(),
                at_stream_start: true,
                overflow: Overflow::None,
                skipped_line_nonempty: false,
                warned: false,
                dropped: 0,
            },
        }
    }

    /// Feeds one body chunk; calls `on_event` once per complete event (terminated by a blank line).
    /// An event can be split across chunks at ANY byte, including inside a CRLF pair.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        self.feed_dyn(chunk, &mut |ev: RawEvent<'_>| {
            ev.with_text(|ev| on_event(*ev))
        });
    }

    /// [`Self::feed`], the events' fields left as bytes.
    pub fn feed_raw(&mut self, chunk: &[u8], mut on_event: impl FnMut(RawEvent<'_>)) {
        self.feed_dyn(chunk, &mut on_event);
    }

    /// One copy of the parser whatever the callback (module size).
    fn feed_dyn(&mut self, chunk: &[u8], on_event: &mut dyn FnMut(RawEvent<'_>)) {
        let mut rest = chunk;
        // An event left unfinished by the previous chunk is completed in `buf` one line at a time,
        // so that only its own bytes are copied; the rest of the chunk is parsed in place.
        while !self.buf.is_empty() {
            if rest.is_empty() {
                self.settle(true);
                return;
            }
            let n = find_eol(rest).map_or(rest.len(), |i| match rest.get(i..i.saturating_add(2)) {
                Some(b"\r\n") => i + 2,
                _ => i + 1,
            });
            let (line, tail) = rest.split_at(n.min(rest.len()));
            self.buf.extend_from_slice(line);
            self.lines.scan(&self.buf, false, on_event);
            self.settle(false);
            rest = tail;
        }
        let lines = &mut self.lines;
        lines.scan(rest, false, on_event);
        let keep_from = if lines.overflow == Overflow::None {
            lines.event_start
        } else {
            // Skipping: only an unresolved trailing CR is worth keeping.
            lines.skipped_line_nonempty |= lines.line_start < lines.scan;
            lines.line_start = lines.scan;
            lines.scan
        };
        self.buf
            .extend_from_slice(rest.get(keep_from..).unwrap_or_default());
        lines.rebase(keep_from);
        self.settle(true);
    }

    /// End of stream: dispatches a final event that lacks its blank line if it has data.
    ///
    /// A trailing block without data (e.g. a final comment) is passed on as an empty event so that
    /// its bytes are not lost (see the type's doc). The parser is then ready for a new stream;
    /// [`Self::dropped_events`] keeps counting.
    pub fn finish(&mut self, mut on_event: impl FnMut(SseEvent<'_>)) {
        self.finish_dyn(&mut |ev: RawEvent<'_>| ev.with_text(|ev| on_event(*ev)));
    }

    /// [`Self::finish`], the events' fields left as bytes.
    pub fn finish_raw(&mut self, mut on_event: impl FnMut(RawEvent<'_>)) {
        self.finish_dyn(&mut on_event);
    }

    fn finish_dyn(&mut self, on_event: &mut dyn FnMut(RawEvent<'_>)) {
        let (src, l) = (&self.buf, &mut self.lines);
        l.scan(src, true, on_event);
        if l.overflow == Overflow::None {
            let end = src.len();
            let start = l.skip_bom(src, l.line_start, end);
            if start < end {
                l.field_line(src, start, end);
            }
            if l.event_start < end {
                l.end_block(src, end, on_event);
            }
        }
        self.buf.clear();
        l.event_start = 0;
        l.line_start = 0;
        l.scan = 0;
        l.reset_fields();
        l.at_stream_start = true;
        l.overflow = Overflow::None;
        l.skipped_line_nonempty = false;
        l.warned = false;
    }

    /// Bytes of the unfinished event currently held.
    pub fn pending(&self) -> usize {
        self.buf.len().saturating_sub(self.lines.event_start)
    }

    /// Number of events dropped because they exceeded the cap (then skipped up to their end).
    pub fn dropped_events(&self) -> u64 {
        self.lines.dropped
    }

    /// Whether the parser is in the middle of skipping an oversized event.
    pub fn overflow(&self) -> Overflow {
        self.lines.overflow
    }

    /// After a scan of `buf`: releases what is done with and, once the whole chunk is scanned,
    /// enforces the cap on the rest (checking it per line would let an unresolved CR trip it).
    fn settle(&mut self, check_cap: bool) {
        let l = &mut self.lines;
        if l.overflow == Overflow::None {
            let done = l.event_start.min(self.buf.len());
            self.buf.drain(..done);
            l.rebase(done);
            if check_cap && self.buf.len() > l.max_event_bytes {
                l.count_drop(self.buf.len());
                l.overflow = Overflow::Dropped;
            }
        }
        if l.overflow == Overflow::Dropped {
            // Nothing before an unresolved trailing CR is needed any more.
            let keep_from = l.scan.min(self.buf.len());
            l.skipped_line_nonempty |= l.line_start < keep_from;
            self.buf.drain(..keep_from);
            l.at_stream_start = false;
            l.event_start = 0;
            l.line_start = 0;
            l.scan = 0;
            l.reset_fields();
        }
    }
}

impl Lines {
    /// Processes every complete line in `src`. A CR at the very end of `src` may be the first half
    /// of a CRLF, so it is left for the next chunk unless `at_eof`.
    fn scan(&mut self, src: &[u8], at_eof: bool, on_event: &mut dyn FnMut(RawEvent<'_>)) {
        loop {
            let Some(i) = src.get(self.scan..).and_then(find_eol) else {
                self.scan = src.len();
                return;
            };
            let term = self.scan + i;
            let after = match (src.get(term), src.get(term + 1)) {
                (Some(b'\r'), Some(b'\n')) => term + 2,
                (Some(b'\r'), None) if !at_eof => {
                    self.scan = term;
                    return;
                }
                _ => term + 1,
            };
            let start = self.skip_bom(src, self.line_start, term);
            let blank = start == term && !self.skipped_line_nonempty;
            self.skipped_line_nonempty = false;
            self.line_start = after;
            self.scan = after;
            if blank {
                self.end_block(src, after, on_event);
            } else if self.overflow == Overflow::None {
                self.field_line(src, start, term);
            }
        }
    }

    /// Closes the block that runs from `event_start` to `end` (just past its blank line).
    fn end_block(&mut self, src: &[u8], end: usize, on_event: &mut dyn FnMut(RawEvent<'_>)) {
        let size = end.saturating_sub(self.event_start);
        if self.overflow == Overflow::Dropped {
            self.overflow = Overflow::None;
        } else if size > self.max_event_bytes {
            self.count_drop(size);
        } else if let Some(raw) = src.get(self.event_start..end) {
            let span =
                |s: Option<(usize, usize)>| s.and_then(|(a, b)| src.get(a..b)).unwrap_or_default();
            let (event, data) = match self.data {
                Data::None => (&b""[..], &b""[..]),
                Data::Line(a, b) => (span(self.event), span(Some((a, b)))),
                Data::Joined => (span(self.event), self.joined.as_slice()),
            };
            on_event(RawEvent { event, data, raw });
        }
        self.event_start = end;
        self.reset_fields();
    }

    fn field_line(&mut self, src: &[u8], start: usize, end: usize) {
        let Some(line) = src.get(start..end) else {
            return;
        };
        let (name, value_at) = if line.starts_with(b"data:") {
            (&b"data"[..], 5)
        } else if line.first() == Some(&b':') {
            return;
        } else {
            match line.iter().position(|&b| b == b':') {
                Some(colon) => (line.get(..colon).unwrap_or_default(), colon + 1),
                None => (line, line.len()),
            }
        };
        let mut value = start + value_at;
        if value < end && src.get(value) == Some(&b' ') {
            value += 1;
        }
        match name {
            b"data" => self.push_data(src, value, end),
            b"event" => self.event = Some((value, end)),
            _ => {}
        }
    }

    fn push_data(&mut self, src: &[u8], start: usize, end: usize) {
        let value = src.get(start..end).unwrap_or_default();
        match self.data {
            Data::None => self.data = Data::Line(start, end),
            Data::Line(a, b) => {
                self.joined.clear();
                self.joined
                    .extend_from_slice(src.get(a..b).unwrap_or_default());
                self.joined.push(b'\n');
                self.joined.extend_from_slice(value);
                self.data = Data::Joined;
            }
            Data::Joined => {
                self.joined.push(b'\n');
                self.joined.extend_from_slice(value);
            }
        }
    }

    /// Where the line `start..end` begins once the stream's leading BOM, if any, is stripped.
    fn skip_bom(&mut self, src: &[u8], start: usize, end: usize) -> usize {
        let first = std::mem::take(&mut self.at_stream_start);
        match src.get(start..end) {
            Some(line) if first && line.starts_with(BOM) => start + BOM.len(),
            _ => start,
        }
    }

    /// The scanned slice now starts `by` bytes later (its head was consumed or left behind).
    fn rebase(&mut self, by: usize) {
        self.event_start = self.event_start.saturating_sub(by);
        self.line_start = self.line_start.saturating_sub(by);
        self.scan = self.scan.saturating_sub(by);
        let shift = |(a, b): (usize, usize)| (a.saturating_sub(by), b.saturating_sub(by));
        self.event = self.event.map(shift);
        if let Data::Line(a, b) = self.data {
            let (a, b) = shift((a, b));
            self.data = Data::Line(a, b);
        }
    }

    fn count_drop(&mut self, size: usize) {
        self.dropped = self.dropped.saturating_add(1);
        if !std::mem::replace(&mut self.warned, true) {
            log::warn!(
                "sse: dropped an event that reached {size} bytes (cap {})",
                self.max_event_bytes
            );
        }
    }

    fn reset_fields(&mut self) {
        self.data = Data::None;
        self.event = None;
    }
}

/// Validated once per event; only invalid UTF-8 allocates (the std validator has an ASCII fast path,
/// unlike `from_utf8_lossy`'s).
#[inline(never)]
fn utf8(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// Index of the first '\n' or '\r' (memchr: 16 bytes at a time with Wasm SIMD).
fn find_eol(s: &[u8]) -> Option<usize> {
    memchr::memchr2(b'\n', b'\r', s)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ev = (String, String, Vec<u8>);

    const OPENAI: &[u8] = include_bytes!("../../tests/fixtures/openai_stream.sse");
    const ANTHROPIC: &[u8] = include_bytes!("../../tests/fixtures/anthropic_stream.sse");

    fn own(ev: SseEvent<'_>) -> Ev {
        (ev.event.to_owned(), ev.data.to_owned(), ev.raw.to_vec())
    }

    fn parse_chunks<'a>(
        cap: usize,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<Ev>, SseParser) {
        let mut p = SseParser::new(cap);
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |e| out.push(own(e)));
        }
        p.finish(|e| out.push(own(e)));
        (out, p)
    }

    fn parse(input: &[u8]) -> Vec<Ev> {
        parse_chunks(1 << 20, [input]).0
    }

    fn to_crlf(input: &[u8]) -> Vec<u8> {
        input
            .iter()
            .flat_map(|&b| {
                if b == b'\n' {
                    vec![b'\r', b'\n']
                } else {
                    vec![b]
                }
            })
            .collect()
    }

    fn fields(evs: &[Ev]) -> Vec<(String, String)> {
        evs.iter().map(|(e, d, _)| (e.clone(), d.clone())).collect()
    }

    fn raw_concat(evs: &[Ev]) -> Vec<u8> {
        evs.iter().flat_map(|(_, _, r)| r.clone()).collect()
    }

    /// Whole, every two-chunk split, byte by byte and CRLF all give the same events.
    fn check_fixture(input: &[u8]) -> Vec<Ev> {
        let whole = parse(input);
        assert_eq!(raw_concat(&whole), input);
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(parse_chunks(1 << 20, [a, b]).0, whole, "split at {cut}");
        }
        assert_eq!(parse_chunks(1 << 20, input.chunks(1)).0, whole);

        let crlf = to_crlf(input);
        let crlf_whole = parse(&crlf);
        assert_eq!(fields(&crlf_whole), fields(&whole));
        assert_eq!(raw_concat(&crlf_whole), crlf);
        for cut in 0..=crlf.len() {
            let (a, b) = crlf.split_at(cut);
            assert_eq!(
                parse_chunks(1 << 20, [a, b]).0,
                crlf_whole,
                "crlf split at {cut}"
            );
        }
        assert_eq!(parse_chunks(1 << 20, crlf.chunks(1)).0, crlf_whole);
        whole
    }

    #[test]
    fn openai_stream_any_split() {
        let evs = check_fixture(OPENAI);
        assert_eq!(evs.len(), 13);
        assert!(evs.iter().all(|(e, _, _)| e.is_empty()));
        let first = &evs.first().map(|e| e.1.clone()).unwrap_or_default();
        assert!(first.starts_with(
            r#"{"id":"chatcmpl-BqX3kY8mJ1sV0pQzR7tLwN2eHfA9c","object":"chat.completion.chunk""#
        ));
        assert!(first.ends_with(r#""obfuscation":"Zk3"}"#));
        let last = evs.last().cloned().unwrap_or_default();
        assert_eq!(
            last,
            (String::new(), "[DONE]".into(), b"data: [DONE]\n\n".to_vec())
        );
    }

    #[test]
    fn anthropic_stream_any_split() {
        let evs = check_fixture(ANTHROPIC);
        let names: Vec<&str> = evs.iter().map(|(e, _, _)| e.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(evs.get(2).map(|e| e.1.as_str()), Some(r#"{"type":"ping"}"#));
        assert_eq!(
            evs.get(9).map(|e| e.2.as_slice()),
            Some(&b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"[..])
        );
    }

    #[test]
    fn other_fixtures_round_trip() {
        for input in [
            &include_bytes!("../../tests/fixtures/openai_stream_tools.sse")[..],
            include_bytes!("../../tests/fixtures/openai_responses_stream.sse"),
            include_bytes!("../../tests/fixtures/anthropic_stream_tools.sse"),
        ] {
            let evs = parse_chunks(1 << 20, input.chunks(7)).0;
            assert_eq!(raw_concat(&evs), input);
            assert!(evs
                .iter()
                .all(|(_, d, _)| d.starts_with('{') || d == "[DONE]"));
        }
    }

    #[test]
    fn comments_and_keepalives_pass_through_as_empty_events() {
        let input = b": keep-alive\n\ndata: a\n: note\ndata: b\n\n\n:tail";
        let evs = parse(input);
        assert_eq!(
            evs,
            vec![
                ("".into(), "".into(), b": keep-alive\n\n".to_vec()),
                (
                    "".into(),
                    "a\nb".into(),
                    b"data: a\n: note\ndata: b\n\n".to_vec()
                ),
                ("".into(), "".into(), b"\n".to_vec()),
                ("".into(), "".into(), b":tail".to_vec()),
            ]
        );
    }

    #[test]
    fn field_syntax() {
        let evs = parse(
            b"event: first\nevent:second\ndata:x\ndata:  two\ndata\nid: 7\nretry: 10\nfoo: bar\n\n",
        );
        assert_eq!(fields(&evs), vec![("second".into(), "x\n two\n".into())]);
        // Event type does not leak into the next event, a data-less `event:` block is not an event.
        let evs = parse(b"event: lone\n\ndata: y\n\n");
        assert_eq!(
            fields(&evs),
            vec![("".into(), "".into()), ("".into(), "y".into())]
        );
        // An empty data line is still data; value colons are kept.
        let evs = parse(b"data:\n\ndata: {\"a\":\"b:c\"}\n\n");
        assert_eq!(
            fields(&evs),
            vec![
                ("".into(), "".into()),
                ("".into(), "{\"a\":\"b:c\"}".into())
            ]
        );
    }

    #[test]
    fn cr_only_line_endings() {
        let input = b"event: e\rdata: 1\rdata: 2\r\rdata: 3\r\r";
        let whole = parse(input);
        assert_eq!(
            whole,
            vec![
                (
                    "e".into(),
                    "1\n2".into(),
                    b"event: e\rdata: 1\rdata: 2\r\r".to_vec()
                ),
                ("".into(), "3".into(), b"data: 3\r\r".to_vec()),
            ]
        );
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(parse_chunks(1024, [a, b]).0, whole, "split at {cut}");
        }
        assert_eq!(parse_chunks(1024, input.chunks(1)).0, whole);
    }

    #[test]
    fn crlf_split_between_cr_and_lf() {
        let mut p = SseParser::new(1024);
        let mut out = Vec::new();
        p.feed(b"data: a\r", |e| out.push(own(e)));
        p.feed(b"\n\r", |e| out.push(own(e)));
        assert!(
            out.is_empty(),
            "the blank line's CR may still be followed by LF"
        );
        assert_eq!(p.pending(), 10);
        p.feed(b"\ndata: b\r\n\r", |e| out.push(own(e)));
        assert_eq!(
            out,
            vec![("".into(), "a".into(), b"data: a\r\n\r\n".to_vec())]
        );
        // The trailing CR is resolved as a line end at end of stream.
        p.finish(|e| out.push(own(e)));
        assert_eq!(
            out.get(1),
            Some(&("".into(), "b".into(), b"data: b\r\n\r".to_vec()))
        );
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn finish_dispatches_unterminated_event() {
        let (evs, p) = parse_chunks(1024, [&b"data: a\n\ndata: b\ndata: c"[..]]);
        assert_eq!(
            fields(&evs),
            vec![("".into(), "a".into()), ("".into(), "b\nc".into())]
        );
        assert_eq!(p.pending(), 0);
        assert_eq!(
            parse(b"data: x\n"),
            vec![("".into(), "x".into(), b"data: x\n".to_vec())]
        );
        assert!(parse(b"").is_empty());
        let mut p = SseParser::new(1024);
        let mut n = 0;
        p.feed(b"data: partial", |_| n += 1);
        assert_eq!((n, p.pending()), (0, 13));
    }

    #[test]
    fn bom_and_invalid_utf8() {
        let evs = parse(b"\xEF\xBB\xBFdata: hi\n\ndata: \xFF!\n\n");
        assert_eq!(
            fields(&evs),
            vec![("".into(), "hi".into()), ("".into(), "\u{FFFD}!".into())]
        );
        assert_eq!(evs.first().map(|e| e.2.len()), Some(13));
    }

    #[test]
    fn oversized_events_are_dropped_however_split() {
        let big = format!("data: {}\n\n", "x".repeat(100));
        let input = [
            b"data: ok1\n\n".as_slice(),
            big.as_bytes(),
            b": c\ndata: ok2\r\n\r\n",
        ]
        .concat();
        let expect = vec![("".into(), "ok1".into()), ("".into(), "ok2".into())];
        for chunk in [input.len(), 1, 2, 3, 17] {
            let mut p = SseParser::new(64);
            let mut out = Vec::new();
            let mut max_pending = 0;
            for c in input.chunks(chunk) {
                p.feed(c, |e| out.push(own(e)));
                max_pending = max_pending.max(p.pending());
            }
            p.finish(|e| out.push(own(e)));
            assert_eq!(fields(&out), expect, "chunk {chunk}");
            assert_eq!(p.dropped_events(), 1);
            if chunk < 64 {
                assert!(max_pending <= 64 + chunk, "pending {max_pending}");
            }
        }
        // An event of exactly the cap passes.
        let exact = format!("data: {}\n\n", "y".repeat(56));
        let (evs, p) = parse_chunks(64, exact.as_bytes().chunks(5));
        assert_eq!((evs.len(), p.dropped_events()), (1, 0));
    }

    #[test]
    fn oversized_event_reports_overflow_until_its_end() {
        let mut p = SseParser::new(16);
        let mut out = Vec::new();
        p.feed(b"data: 0123456789abcdef", |e| out.push(own(e)));
        assert_eq!(
            (p.overflow(), p.dropped_events(), p.pending()),
            (Overflow::Dropped, 1, 0)
        );
        p.feed(b"more\n", |e| out.push(own(e)));
        p.feed(b"data: still the same event\r", |e| out.push(own(e)));
        assert_eq!(p.overflow(), Overflow::Dropped);
        p.feed(b"\n\r\ndata: next\n\n", |e| out.push(own(e)));
        assert_eq!(p.overflow(), Overflow::None);
        assert_eq!(fields(&out), vec![("".into(), "next".into())]);
        // Unterminated oversized tail: nothing dispatched at finish, counted once.
        p.feed(&[b'a'; 40], |e| out.push(own(e)));
        p.finish(|e| out.push(own(e)));
        assert_eq!((out.len(), p.dropped_events()), (1, 2));
    }

    #[test]
    fn random_streams_are_lossless_and_split_independent() {
        let alphabet = b"\r\n\n:dataevent \xC3\xA9x";
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..300 {
            let len = next(120);
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet.get(next(alphabet.len())).copied().unwrap_or(b'x'))
                .collect();
            let whole = parse(&input);
            assert_eq!(raw_concat(&whole), input);
            let mut chunks = Vec::new();
            let mut rest = input.as_slice();
            while !rest.is_empty() {
                let (a, b) = rest.split_at(1 + next(rest.len()));
                chunks.push(a);
                rest = b;
            }
            assert_eq!(
                parse_chunks(1 << 20, chunks).0,
                whole,
                "{:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    #[test]
    fn events_straddling_chunks_keep_fields_and_exact_pending() {
        // Fields are borrowed from a chunk, from the buffer, or assembled across lines: cut in three
        // anywhere, the events are those of the whole input, and after each chunk `pending` is
        // exactly what was not dispatched yet.
        let input = b"\xEF\xBB\xBFevent: a\ndata: 1\ndata: 22\n\n: c\r\nevent: b\r\ndata: x\r\n\r\ndata: last";
        let whole = parse(input);
        assert_eq!(
            fields(&whole),
            [("a", "1\n22"), ("b", "x"), ("", "last")].map(|(e, d)| (e.to_owned(), d.to_owned()))
        );
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let mut p = SseParser::new(1 << 20);
                let mut out = Vec::new();
                for (chunk, fed) in [
                    (&input[..i], i),
                    (&input[i..j], j),
                    (&input[j..], input.len()),
                ] {
                    p.feed(chunk, |e| out.push(own(e)));
                    let done: usize = out.iter().map(|e| e.2.len()).sum();
                    assert_eq!(p.pending(), fed - done, "cuts {i} {j}");
                }
                p.finish(|e| out.push(own(e)));
                assert_eq!(out, whole, "cuts {i} {j}");
            }
        }
    }
}
