//! Requests held for capacity on one worker, and the order they are released in.
//!
//! A request that cannot be admitted now, but could be within its consumer's longest wait, is held
//! (the listener role keeps it, the worker's tick tries it again). This list is what the tick and
//! the admission of new requests agree on:
//! - caps: a consumer may hold at most its `max_held`, the worker at most the global cap (which the
//!   listener also counts across workers, in shared data);
//! - order: higher priority lanes first, then arrival ([`WaitList::round`]); within one consumer
//!   strictly by arrival: once a consumer's oldest held request cannot go, its later ones are not
//!   tried in that round (a smaller one must not overtake it forever), and a new request of a
//!   consumer that has requests held queues behind them instead of taking the capacity that
//!   appeared for them ([`WaitList::queued_ahead`]).
//!
//! Each worker's VM has its own list: order holds per worker, and so does a consumer's cap.
//! Hand-written: a handful of held requests (bounded by the caps), kept in arrival order in a
//! `Vec`, sorted only when the tick walks them.

use crate::maps::HashMap;
use std::rc::Rc;

/// One held request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The stream's context id (what the tick resumes).
    pub id: u32,
    /// Shared, not copied, by each pass of the tick ([`WaitList::round`]).
    pub consumer: Rc<str>,
    /// Higher is released first.
    pub priority: u8,
    pub since_ms: u64,
    /// Past this, the request is answered (admitted by a last try, or refused).
    pub deadline_ms: u64,
    /// Not tried before this: what refused it cannot change sooner (a request budget refills
    /// at a known time). 0: tried on every tick.
    pub next_try_ms: u64,
}

/// Why a request could not be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The consumer already holds `cap` requests.
    Consumer { cap: u32 },
    /// The worker already holds `cap` requests.
    Global { cap: u32 },
}

#[derive(Debug, Default)]
pub struct WaitList {
    /// In arrival order.
    held: Vec<Held>,
    by_consumer: HashMap<Rc<str>, u32>,
}

impl WaitList {
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// How many requests `consumer` holds on this worker.
    pub fn held_by(&self, consumer: &str) -> u32 {
        self.by_consumer.get(consumer).copied().unwrap_or(0)
    }

    /// Holds a request, unless a cap is reached.
    pub fn hold(&mut self, held: Held, consumer_cap: u32, global_cap: u32) -> Result<(), Full> {
        if self.held.len() >= global_cap as usize {
            return Err(Full::Global { cap: global_cap });
        }
        if self.held_by(&held.consumer) >= consumer_cap {
            return Err(Full::Consumer { cap: consumer_cap });
        }
        *self.by_consumer.entry(held.consumer.clone()).or_insert(0) += 1;
        self.held.push(held);
        Ok(())
    }

    /// Takes a request out (released, answered, or its client gone). None: it was not held.
    pub fn remove(&mut self, id: u32) -> Option<Held> {
        let at = self.held.iter().position(|h| h.id == id)?;
        let held = self.held.remove(at);
        if let Some(n) = self.by_consumer.get_mut(&held.consumer) {
            *n -= 1;
            if *n == 0 {
                self.by_consumer.remove(&held.consumer);
            }
        }
        Some(held)
    }

    pub fn get(&self, id: u32) -> Option<&Held> {
        self.held.iter().find(|h| h.id == id)
    }

    /// The request stays held and is not tried again before `at`.
    pub fn snooze(&mut self, id: u32, at: u64) {
        if let Some(h) = self.held.iter_mut().find(|h| h.id == id) {
            h.next_try_ms = at;
        }
    }

    /// Whether a new request of `consumer` in lane `priority` must queue behind requests of that
    /// consumer already held (in the same lane or a higher one).
    pub fn queued_ahead(&self, consumer: &str, priority: u8) -> bool {
        self.held_by(consumer) > 0
            && self
                .held
                .iter()
                .any(|h| &*h.consumer == consumer && h.priority >= priority)
    }

    /// The held requests in release order, for one pass of the tick.
    pub fn round(&self) -> Round {
        let mut order: Vec<Held> = self.held.clone();
        // Stable: arrival order within a lane.
        order.sort_by_key(|h| core::cmp::Reverse(h.priority));
        order.reverse();
        Round {
            order,
            blocked: Vec::new(),
        }
    }
}

/// One pass over the held requests: which to try next, skipping those whose consumer has an older
/// request (in the same lane or higher) that could not go in this pass.
#[derive(Debug)]
pub struct Round {
    /// Release order, reversed: the next is at the end.
    order: Vec<Held>,
    /// Consumers whose request stayed held in this pass, with its lane.
    blocked: Vec<(Rc<str>, u8)>,
}

impl Round {
    /// The next request to try at `now`. One past its deadline is always tried: it is answered.
    /// One snoozed stays as it is, and its consumer's later ones wait behind it.
    pub fn next(&mut self, now: u64) -> Option<Held> {
        while let Some(h) = self.order.pop() {
            if now >= h.deadline_ms {
                return Some(h);
            }
            let behind = self
                .blocked
                .iter()
                .any(|(c, p)| *c == h.consumer && *p >= h.priority);
            if behind {
                continue;
            }
            if now < h.next_try_ms {
                self.stayed(&h);
                continue;
            }
            return Some(h);
        }
        None
    }

    /// The request tried last stays held: its consumer's later requests wait behind it.
    pub fn stayed(&mut self, held: &Held) {
        self.blocked.push((held.consumer.clone(), held.priority));
    }

    /// The request tried last was released. One bound for a provider whose keys have limits on
    /// requests in flight ends the pass: its attempt takes its key's place only when Envoy sends
    /// it, after the tick, so a request tried after it would see the place free too, and its
    /// attempt be refused. The rest are tried on the next tick.
    pub fn released(&mut self, takes_key_place: bool) {
        if takes_key_place {
            self.order.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(id: u32, consumer: &str, priority: u8, since_ms: u64) -> Held {
        Held {
            id,
            consumer: consumer.into(),
            priority,
            since_ms,
            deadline_ms: since_ms + 1_000,
            next_try_ms: 0,
        }
    }

    fn ids(round: &mut Round, now: u64, stays: &[u32]) -> Vec<u32> {
        let mut tried = Vec::new();
        while let Some(h) = round.next(now) {
            tried.push(h.id);
            if stays.contains(&h.id) {
                round.stayed(&h);
            }
        }
        tried
    }

    #[test]
    fn released_by_lane_then_arrival() {
        let mut w = WaitList::default();
        for (id, c, p) in [
            (1, "low", 0),
            (2, "low", 0),
            (3, "high", 5),
            (4, "mid", 2),
            (5, "high", 5),
        ] {
            w.hold(held(id, c, p, u64::from(id)), 10, 10).unwrap();
        }
        assert_eq!(ids(&mut w.round(), 0, &[]), vec![3, 5, 4, 1, 2]);
    }

    #[test]
    fn a_consumer_whose_oldest_stays_is_not_overtaken_by_its_later_ones() {
        let mut w = WaitList::default();
        w.hold(held(1, "a", 0, 0), 10, 10).unwrap();
        w.hold(held(2, "b", 0, 1), 10, 10).unwrap();
        w.hold(held(3, "a", 0, 2), 10, 10).unwrap();
        w.hold(held(4, "b", 0, 3), 10, 10).unwrap();
        // a's oldest cannot go: a's later one is not tried; b's are, in order.
        assert_eq!(ids(&mut w.round(), 0, &[1]), vec![1, 2, 4]);
        // Past its deadline a later one is tried anyway (to be answered).
        assert_eq!(ids(&mut w.round(), 1_002, &[1]), vec![1, 2, 3, 4]);
    }

    #[test]
    fn newcomers_queue_behind_held_requests_of_their_consumer_in_their_lane_or_higher() {
        let mut w = WaitList::default();
        assert!(!w.queued_ahead("a", 0));
        w.hold(held(1, "a", 3, 0), 10, 10).unwrap();
        assert!(w.queued_ahead("a", 3));
        assert!(w.queued_ahead("a", 0));
        assert!(!w.queued_ahead("a", 4), "a higher lane goes first");
        assert!(
            !w.queued_ahead("b", 0),
            "another consumer does not wait behind a"
        );
        w.remove(1);
        assert!(!w.queued_ahead("a", 0));
    }

    #[test]
    fn a_snoozed_request_is_not_tried_and_its_consumers_later_ones_wait_behind_it() {
        let mut w = WaitList::default();
        w.hold(held(1, "a", 0, 0), 10, 10).unwrap();
        w.hold(held(2, "a", 0, 1), 10, 10).unwrap();
        w.hold(held(3, "b", 0, 2), 10, 10).unwrap();
        w.snooze(1, 500);
        assert_eq!(ids(&mut w.round(), 499, &[]), vec![3]);
        assert_eq!(ids(&mut w.round(), 500, &[]), vec![1, 2, 3]);
        assert_eq!(
            ids(&mut w.round(), 1_001, &[]),
            vec![1, 2, 3],
            "past the deadline: answered"
        );
    }

    #[test]
    fn a_release_that_takes_a_key_place_ends_the_pass() {
        let mut w = WaitList::default();
        for id in 1..=3 {
            w.hold(held(id, "a", 0, u64::from(id)), 10, 10).unwrap();
        }
        let mut round = w.round();
        round.released(false);
        assert_eq!(round.next(0).map(|h| h.id), Some(1));
        round.released(false);
        assert_eq!(round.next(0).map(|h| h.id), Some(2));
        round.released(true);
        assert_eq!(round.next(0), None, "the third waits for the next tick");
    }

    #[test]
    fn caps_per_consumer_and_per_worker() {
        let mut w = WaitList::default();
        w.hold(held(1, "a", 0, 0), 2, 3).unwrap();
        w.hold(held(2, "a", 0, 0), 2, 3).unwrap();
        assert_eq!(
            w.hold(held(3, "a", 0, 0), 2, 3),
            Err(Full::Consumer { cap: 2 })
        );
        w.hold(held(4, "b", 0, 0), 2, 3).unwrap();
        assert_eq!(
            w.hold(held(5, "c", 0, 0), 2, 3),
            Err(Full::Global { cap: 3 })
        );
        assert_eq!((w.len(), w.held_by("a"), w.held_by("c")), (3, 2, 0));
        assert_eq!(w.remove(2).map(|h| h.id), Some(2));
        assert_eq!(w.remove(2), None, "taken out once");
        w.hold(held(6, "a", 0, 0), 2, 3).unwrap();
        assert_eq!(w.held_by("a"), 2);
    }

    #[test]
    fn a_dropped_request_leaves_no_trace() {
        let mut w = WaitList::default();
        w.hold(held(1, "a", 0, 0), 1, 1).unwrap();
        assert!(w.remove(1).is_some());
        assert!(w.is_empty());
        assert_eq!(w.held_by("a"), 0);
        assert!(w.by_consumer.is_empty(), "no entry kept for a consumer");
        assert_eq!(ids(&mut w.round(), 0, &[]), Vec::<u32>::new());
    }
}
