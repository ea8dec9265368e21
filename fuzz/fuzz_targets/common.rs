//! Shared by the fuzz targets. Inputs stay raw payloads (so fixtures work as seeds as they are);
//! the few parameters a target needs besides the payload are drawn from a hash of the input.

#![allow(dead_code)]

use tollgate::count::sse::{SseEvent, SseParser};

/// FNV-1a, then a splitmix step so every bit depends on the whole input.
pub fn hash(data: &[u8]) -> u64 {
    let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    let z = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Deterministic stream of parameters for one input.
pub struct Params(u64);

impl Params {
    pub fn new(data: &[u8]) -> Self {
        Params(hash(data))
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let z = (self.0 ^ (self.0 >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// Edge values half of the time, anything otherwise.
    pub fn number(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => 1,
            2 => u64::MAX,
            3 => u64::from(u32::MAX),
            4 => self.below(100_000),
            _ => self.next(),
        }
    }
}

/// An owned copy of an [`SseEvent`] (events borrow the parser's buffers).
#[derive(Clone, PartialEq, Eq)]
pub struct Event {
    pub event: String,
    pub data: String,
    pub raw: Vec<u8>,
}

/// Raw bytes escaped, so that a failed assertion shows the stream as text.
impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Event {{ event: {:?}, data: {:?}, raw: b\"{}\" }}", self.event, self.data, self.raw.escape_ascii())
    }
}

impl Event {
    pub fn as_sse(&self) -> SseEvent<'_> {
        SseEvent { event: &self.event, data: &self.data, raw: &self.raw }
    }
}

/// Parses a whole stream fed in the given chunks, then `finish`; returns the events and the number
/// of dropped (oversized) events.
pub fn parse_sse<'a>(cap: usize, chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Event>, u64) {
    let mut p = SseParser::new(cap);
    let mut out = Vec::new();
    let mut push = |e: SseEvent<'_>| {
        out.push(Event { event: e.event.to_owned(), data: e.data.to_owned(), raw: e.raw.to_vec() })
    };
    for c in chunks {
        p.feed(c, &mut push);
    }
    p.finish(&mut push);
    (out, p.dropped_events())
}
