//! Pacing keys before the provider refuses: what each key has left, and whether it can take a
//! request, in one shared-data entry per provider (`tollgate:pace1:<provider>`), global across
//! workers.
//!
//! Two sources, per key:
//! - the provider's announcement on its last answer (OpenAI's `x-ratelimit-remaining-*` /
//!   `-reset-*`, Anthropic's `anthropic-ratelimit-*-remaining` / `-reset`): the truth until its
//!   reset time passes, after which the key is taken as full again until the next answer says
//!   otherwise;
//! - the key's configured limits (`requests_per_minute`, `tokens_per_minute`): a window of one
//!   minute that tollgate counts itself, from the first request sent in it.
//!
//! Between announcements, what tollgate's own requests in flight to the key will spend (one
//! request; the request's estimate in tokens) is taken off what the key was announced to have, so
//! a burst does not overshoot: [`take`] adds an attempt to its key's spend as it is sent, and
//! [`settle`] takes it off as the key's answer arrives, with the announcement that answer carries.
//! A request in flight that the provider had already counted in an announcement is counted twice
//! until it answers: pacing errs towards caution.
//!
//! The entry holds one fixed slot per configured key (matched by a hash of its id, as the health
//! entry does): its size is bounded by the configuration. The durations and times in the headers are
//! read with [`crate::failover::retry_signal`]'s parsers, already used for 429s.

use crate::config::{Key, Provider};
use crate::failover::health::fnv1a;
use crate::failover::retry_signal::{parse_go_duration_ms, parse_rfc3339_ms};
use crate::store::{decode_u64s, encode_u64s, update_if, SharedStore, StoreError};

/// The configured limits' window.
pub const WINDOW_MS: u64 = 60_000;

/// id hash; announced requests left and when that resets; announced tokens left and when that
/// resets (0: nothing announced); requests and tokens in flight; the configured window's start and
/// its requests and tokens; when an attempt last left on the key.
const FIELDS: usize = 11;

/// Requests in flight on a key no attempt has left on for this long are forgotten: an attempt whose
/// VM went away without ending it (a crash, a VM replaced mid-request) never takes its spend off,
/// and no attempt lasts this long.
pub const IN_FLIGHT_FORGOTTEN_MS: u64 = 10 * 60_000;

/// A slot's requests and tokens in flight at `now` (none once forgotten).
fn in_flight(s: &Slot, now: u64) -> (u64, u64) {
    if now.saturating_sub(s[10]) >= IN_FLIGHT_FORGOTTEN_MS {
        (0, 0)
    } else {
        (s[5], s[6])
    }
}
type Slot = [u64; FIELDS];

pub fn entry_key(provider: &str) -> String {
    format!("tollgate:pace1:{provider}")
}

/// What a key cannot take more of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Requests,
    Tokens,
}

impl Dim {
    /// OpenAI's `error.type` for a 429 of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Dim::Requests => "requests",
            Dim::Tokens => "tokens",
        }
    }
}

/// A key (or every key of a provider) cannot take the request until `until_ms`, for lack of `by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paced {
    pub until_ms: u64,
    pub by: Dim,
}

/// What a provider's answer announced of its key: what is left and when each resets (unix ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Announcement {
    pub requests: Option<(u64, u64)>,
    pub tokens: Option<(u64, u64)>,
}

impl Announcement {
    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }

    /// Reads an answer's headers (lowercase names). OpenAI's resets are durations from now
    /// ("6m0s", "20ms"); Anthropic's are RFC 3339 times. Of Anthropic's token budgets (total, input,
    /// output), the one with the least left counts. Values that do not parse are ignored.
    pub fn parse<'a>(headers: impl Iterator<Item = (&'a str, &'a [u8])>, now_ms: u64) -> Self {
        let mut openai = [(None, None), (None, None)];
        let mut tokens: Option<(u64, u64)> = None;
        let mut anthropic_tokens: [(Option<u64>, Option<u64>); 3] = [(None, None); 3];
        let mut anthropic_requests = (None, None);
        for (name, value) in headers {
            let Some(v) = core::str::from_utf8(value).ok().map(str::trim) else {
                continue;
            };
            let count = || v.parse::<u64>().ok();
            if let Some(rest) = name.strip_prefix("x-ratelimit-") {
                match rest {
                    "remaining-requests" => openai[0].0 = count(),
                    "reset-requests" => openai[0].1 = parse_go_duration_ms(v),
                    "remaining-tokens" => openai[1].0 = count(),
                    "reset-tokens" => openai[1].1 = parse_go_duration_ms(v),
                    _ => {}
                }
            } else if let Some(rest) = name.strip_prefix("anthropic-ratelimit-") {
                let at = || parse_rfc3339_ms(v).map(|t| t.max(now_ms));
                match rest {
                    "requests-remaining" => anthropic_requests.0 = count(),
                    "requests-reset" => anthropic_requests.1 = at(),
                    "tokens-remaining" => anthropic_tokens[0].0 = count(),
                    "tokens-reset" => anthropic_tokens[0].1 = at(),
                    "input-tokens-remaining" => anthropic_tokens[1].0 = count(),
                    "input-tokens-reset" => anthropic_tokens[1].1 = at(),
                    "output-tokens-remaining" => anthropic_tokens[2].0 = count(),
                    "output-tokens-reset" => anthropic_tokens[2].1 = at(),
                    _ => {}
                }
            }
        }
        let from_now = |pair: (Option<u64>, Option<u64>)| match pair {
            (Some(left), Some(wait)) => Some((left, now_ms.saturating_add(wait))),
            _ => None,
        };
        let both = |pair: (Option<u64>, Option<u64>)| pair.0.zip(pair.1);
        for t in anthropic_tokens.into_iter().filter_map(both) {
            if tokens.is_none_or(|cur| t.0 < cur.0) {
                tokens = Some(t);
            }
        }
        Announcement {
            requests: from_now(openai[0]).or(both(anthropic_requests)),
            tokens: from_now(openai[1]).or(tokens),
        }
    }
}

/// A provider's entry as read: one slot per configured key, in config order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pace {
    slots: Vec<Slot>,
}

impl Pace {
    pub fn decode(bytes: Option<&[u8]>, provider: &Provider) -> Self {
        let stored: Vec<Slot> = bytes
            .unwrap_or(&[])
            .chunks_exact(FIELDS * 8)
            .map(|c| decode_u64s::<FIELDS>(Some(c)))
            .collect();
        let slots = provider
            .keys
            .iter()
            .map(|k| {
                let h = fnv1a(k.id.as_bytes());
                let mut fresh = [0; FIELDS];
                fresh[0] = h;
                stored.iter().find(|s| s[0] == h).copied().unwrap_or(fresh)
            })
            .collect();
        Pace { slots }
    }

    pub fn encode(&self) -> Vec<u8> {
        encode_u64s(&self.slots.concat())
    }

    /// Whether key `idx` can take a request of `tokens` now; when not, until when and for lack of
    /// what. A key with nothing announced (or whose announcement has reset) and no configured limit
    /// can always take it.
    pub fn can_take(&self, idx: usize, key: &Key, tokens: u64, now: u64) -> Result<(), Paced> {
        let Some(s) = self.slots.get(idx) else {
            return Ok(());
        };
        let [_, req_left, req_reset, tok_left, tok_reset, _, _, win_start, win_req, win_tok, _] =
            *s;
        let (fly_req, fly_tok) = in_flight(s, now);
        let mut paced: Option<Paced> = None;
        let mut block = |until_ms: u64, by: Dim| {
            // Every exhausted budget must be back before the key can take it.
            if paced.is_none_or(|p| until_ms > p.until_ms) {
                paced = Some(Paced { until_ms, by });
            }
        };
        if req_reset > now && req_left.saturating_sub(fly_req) < 1 {
            block(req_reset, Dim::Requests);
        }
        if tok_reset > now && tok_left.saturating_sub(fly_tok) < tokens.max(1) {
            block(tok_reset, Dim::Tokens);
        }
        let window_end = win_start.saturating_add(WINDOW_MS);
        if window_end > now {
            if key.requests_per_minute.is_some_and(|rpm| win_req >= rpm) {
                block(window_end, Dim::Requests);
            }
            if key
                .tokens_per_minute
                .is_some_and(|tpm| win_tok.saturating_add(tokens) > tpm && win_tok > 0)
            {
                block(window_end, Dim::Tokens);
            }
        }
        paced.map_or(Ok(()), Err)
    }

    /// None when one of the keys `usable` lets through can take the request now; else the earliest
    /// moment one can (what it lacks until then).
    pub fn earliest(
        &self,
        provider: &Provider,
        usable: impl Fn(usize) -> bool,
        tokens: u64,
        now: u64,
    ) -> Option<Paced> {
        let mut earliest: Option<Paced> = None;
        for (i, k) in provider.keys.iter().enumerate().filter(|(i, _)| usable(*i)) {
            match self.can_take(i, k, tokens, now) {
                Ok(()) => return None,
                Err(p) if earliest.is_none_or(|e| p.until_ms < e.until_ms) => earliest = Some(p),
                Err(_) => {}
            }
        }
        earliest
    }

    fn spend(&mut self, idx: usize, tokens: u64, now: u64) {
        if let Some(s) = self.slots.get_mut(idx) {
            let (fly_req, fly_tok) = in_flight(s, now);
            s[5] = fly_req.saturating_add(1);
            s[6] = fly_tok.saturating_add(tokens);
            s[10] = now;
            if s[8] == 0 || s[7].saturating_add(WINDOW_MS) <= now {
                (s[7], s[8], s[9]) = (now, 0, 0);
            }
            s[8] = s[8].saturating_add(1);
            s[9] = s[9].saturating_add(tokens);
        }
    }

    fn answered(&mut self, idx: usize, spent: Option<u64>, said: Announcement, now: u64) {
        if let Some(s) = self.slots.get_mut(idx) {
            if let Some(tokens) = spent {
                s[5] = s[5].saturating_sub(1);
                s[6] = s[6].saturating_sub(tokens);
            }
            // Answers arrive out of order: until what is recorded resets, an announcement that
            // says more is left is an older one, and is not taken.
            let newer =
                |left: u64, recorded: u64, reset_at: u64| reset_at <= now || left < recorded;
            if let Some((left, reset)) = said.requests.filter(|(l, _)| newer(*l, s[1], s[2])) {
                (s[1], s[2]) = (left, reset);
            }
            if let Some((left, reset)) = said.tokens.filter(|(l, _)| newer(*l, s[3], s[4])) {
                (s[3], s[4]) = (left, reset);
            }
        }
    }
}

pub fn read<S: SharedStore + ?Sized>(store: &S, provider: &Provider) -> Result<Pace, StoreError> {
    let (bytes, _) = store.get(&entry_key(&provider.name))?;
    Ok(Pace::decode(bytes.as_deref(), provider))
}

/// Takes key `idx` for an attempt of `tokens` when it can take it (its spend added, in one CAS
/// write), else says until when it cannot (and writes nothing).
pub fn take<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
    idx: usize,
    tokens: u64,
    now: u64,
) -> Result<Result<(), Paced>, StoreError> {
    let Some(key) = provider.keys.get(idx) else {
        return Ok(Ok(()));
    };
    update_if(store, &entry_key(&provider.name), |cur| {
        let mut pace = Pace::decode(cur, provider);
        match pace.can_take(idx, key, tokens, now) {
            Ok(()) => {
                pace.spend(idx, tokens, now);
                (Some(pace.encode()), Ok(()))
            }
            Err(p) => (None, Err(p)),
        }
    })
    .map(|(out, _)| out)
}

/// An attempt ended (answered or not): the spend [`take`] counted for it (`spent`, its tokens;
/// None when it counted none: pacing was off for the provider when it was sent) is taken off its
/// key, and what its answer announced is recorded (at `now`).
pub fn settle<S: SharedStore + ?Sized>(
    store: &S,
    provider: &Provider,
    idx: usize,
    spent: Option<u64>,
    said: Announcement,
    now: u64,
) -> Result<(), StoreError> {
    update_if(store, &entry_key(&provider.name), |cur| {
        let mut pace = Pace::decode(cur, provider);
        pace.answered(idx, spent, said, now);
        (Some(pace.encode()), ())
    })
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::store::FakeStore;

    fn provider(keys: &str) -> Provider {
        let json = format!(r#"{{"providers":[{{"name":"p","type":"openai","keys":[{keys}]}}]}}"#);
        parse(json.as_bytes(), &|_| Some("secret".into()))
            .unwrap()
            .providers
            .remove(0)
    }

    fn paced(until_ms: u64, by: Dim) -> Result<(), Paced> {
        Err(Paced { until_ms, by })
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static [u8])> {
        pairs.iter().map(|(k, v)| (*k, v.as_bytes())).collect()
    }

    #[test]
    fn reads_openai_and_anthropic_announcements() {
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-remaining-tokens", "149000"),
            ("x-ratelimit-reset-tokens", "6m0s"),
            ("x-ratelimit-limit-requests", "60"),
        ]);
        let a = Announcement::parse(h.into_iter(), 1_000);
        assert_eq!(a.requests, Some((59, 2_000)));
        assert_eq!(a.tokens, Some((149_000, 361_000)));
        let h = headers(&[
            ("anthropic-ratelimit-requests-remaining", "3"),
            ("anthropic-ratelimit-requests-reset", "1970-01-01T00:00:10Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "500"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "1970-01-01T00:00:20Z",
            ),
            ("anthropic-ratelimit-tokens-remaining", "900"),
            ("anthropic-ratelimit-tokens-reset", "1970-01-01T00:00:30Z"),
        ]);
        let a = Announcement::parse(h.into_iter(), 1_000);
        assert_eq!(a.requests, Some((3, 10_000)));
        assert_eq!(a.tokens, Some((500, 20_000)), "the budget with least left");
        let garbled = headers(&[
            ("x-ratelimit-remaining-requests", "many"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-remaining-tokens", "5"),
        ]);
        assert!(Announcement::parse(garbled.into_iter(), 0).is_empty());
    }

    #[test]
    fn an_announced_key_takes_what_it_has_left_less_what_is_in_flight() {
        let p = provider(r#"{"id":"a","env":"K"},{"id":"b","env":"K"}"#);
        let s = FakeStore::new();
        let said = Announcement {
            requests: Some((2, 5_000)),
            tokens: Some((1_000, 3_000)),
        };
        settle(&s, &p, 0, None, said, 0).unwrap();
        assert_eq!(take(&s, &p, 0, 100, 0).unwrap(), Ok(()));
        assert_eq!(take(&s, &p, 0, 100, 0).unwrap(), Ok(()));
        assert_eq!(
            take(&s, &p, 0, 100, 0).unwrap(),
            paced(5_000, Dim::Requests),
            "two left, two in flight"
        );
        assert_eq!(
            take(&s, &p, 1, 100, 0).unwrap(),
            Ok(()),
            "b announced nothing"
        );
        let pace = read(&s, &p).unwrap();
        assert_eq!(pace.earliest(&p, |_| true, 100, 0), None);
        assert_eq!(
            pace.earliest(&p, |i| i == 0, 100, 0),
            paced(5_000, Dim::Requests).err()
        );
        // One answers and says one request is left: one in flight still counts against it.
        let one_left = Announcement {
            requests: Some((1, 5_000)),
            tokens: Some((800, 3_000)),
        };
        settle(&s, &p, 0, Some(100), one_left, 5).unwrap();
        assert!(take(&s, &p, 0, 100, 10).unwrap().is_err());
        settle(&s, &p, 0, Some(100), one_left, 6).unwrap();
        assert_eq!(take(&s, &p, 0, 900, 10).unwrap(), paced(3_000, Dim::Tokens));
        assert_eq!(take(&s, &p, 0, 700, 10).unwrap(), Ok(()));
        // An older answer that arrives late says more was left: it is not taken.
        let older = Announcement {
            requests: Some((2, 5_000)),
            tokens: None,
        };
        settle(&s, &p, 0, None, older, 20).unwrap();
        assert_eq!(read(&s, &p).unwrap().slots[0][1], 1);
        // Spend that no answer ever took off (its VM went away) is forgotten after a while.
        let long = Announcement {
            requests: Some((1, 100 * 60_000)),
            tokens: None,
        };
        settle(&s, &p, 1, None, long, 30).unwrap();
        assert!(
            take(&s, &p, 1, 1, 40).unwrap().is_err(),
            "b's one is in flight"
        );
        let later = 10 + IN_FLIGHT_FORGOTTEN_MS;
        assert_eq!(take(&s, &p, 1, 1, later).unwrap(), Ok(()));
        // Past its reset an announcement says nothing: the key takes requests until told again.
        assert_eq!(take(&s, &p, 0, 700, 5_000).unwrap(), Ok(()));
    }

    #[test]
    fn configured_limits_are_a_window_of_one_minute() {
        let p =
            provider(r#"{"id":"a","env":"K","requests_per_minute":2,"tokens_per_minute":1000}"#);
        let s = FakeStore::new();
        assert_eq!(take(&s, &p, 0, 400, 1_000).unwrap(), Ok(()));
        assert_eq!(
            take(&s, &p, 0, 700, 2_000).unwrap(),
            paced(61_000, Dim::Tokens)
        );
        assert_eq!(take(&s, &p, 0, 500, 2_000).unwrap(), Ok(()));
        // Answers do not give back what the window counted: the provider counted those requests.
        settle(&s, &p, 0, Some(400), Announcement::default(), 3_000).unwrap();
        assert_eq!(
            take(&s, &p, 0, 1, 30_000).unwrap(),
            paced(61_000, Dim::Requests)
        );
        assert_eq!(take(&s, &p, 0, 1, 61_000).unwrap(), Ok(()), "a new window");
        // A request larger than the whole budget is not refused forever: a fresh window takes it.
        let big = provider(r#"{"id":"a","env":"K","tokens_per_minute":10}"#);
        let s = FakeStore::new();
        assert_eq!(take(&s, &big, 0, 50, 0).unwrap(), Ok(()));
        assert!(take(&s, &big, 0, 1, 1).unwrap().is_err());
    }

    #[test]
    fn the_entry_keeps_one_slot_per_configured_key() {
        let p = provider(r#"{"id":"a","env":"K"},{"id":"b","env":"K"}"#);
        let s = FakeStore::new();
        for i in 0..50 {
            take(&s, &p, i % 2, 1, i as u64).unwrap().unwrap();
        }
        let (bytes, _) = s.get(&entry_key("p")).unwrap();
        assert_eq!(bytes.unwrap().len(), 2 * FIELDS * 8);
        // Reordered keys keep their own slots.
        let swapped = provider(r#"{"id":"b","env":"K"},{"id":"a","env":"K"}"#);
        let pace = read(&s, &swapped).unwrap();
        assert_eq!(pace.slots[0][0], fnv1a(b"b"));
        assert_eq!(pace.slots[0][5], 25);
    }
}
