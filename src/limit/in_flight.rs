//! Requests in flight, counted across every worker in Envoy's shared data, so that a consumer or a
//! provider key can be held to a number of concurrent requests.
//!
//! One shared number would leak whenever a request's end is never seen: a VM that trapped (and was
//! reloaded by `FAIL_RELOAD`) or was replaced runs none of its streams' callbacks again, and shared
//! data has no delete and no TTL. So each VM counts its own requests in a slot of its own, a lease:
//! the slot carries the VM's id (random, made when the VM starts) and a heartbeat the VM refreshes
//! on its tick ([`Leases::tick`]). Readers sum only the slots whose heartbeat is younger than
//! [`LEASE_MS`], and every writer drops the older ones: a vanished VM's requests stop counting
//! within that time, and an entry holds only the slots of VMs that have requests in flight (a VM
//! takes its slot out when its last request ends), so the key space and each value stay bounded.
//!
//! One entry per subject (`tollgate:if:c:<consumer>`, `tollgate:if:p:<provider>`, and
//! `tollgate:if:held` for the requests held for capacity, [`crate::limit::waiting`]); a provider's
//! entry counts each limited key in a lane of its own (the hash of the key's id, which survives a
//! configuration that reorders the keys), so choosing a key reads one entry whatever the number of
//! keys. A consumer's entry has the one lane [`CONSUMER_LANE`].
//!
//! Only its own VM writes a slot's counts: the VM keeps them here and writes them whole, with
//! Envoy's CAS, so a write that failed is made good by the next one, and a slot another VM dropped
//! (its VM stalled past the lease) comes back with it.
//!
//! Cost, per request whose consumer has a limit: taking a place is one read and one write (a
//! refusal only the read), giving it back one read and one write; a key's place is the same per
//! attempt, its read shared with the choice of the key. On the tick, per subject with requests in
//! flight: one read (for the gauges), and one write a second (the heartbeat).

use crate::failover::health::fnv1a;
use crate::maps::HashMap;
use crate::store::{update_if, update_if_read, Read, SharedStore, StoreError};

/// A slot whose heartbeat is older than this is a vanished VM's: its requests no longer count.
pub const LEASE_MS: u64 = 5_000;
/// How often a VM with requests in flight refreshes its slots' heartbeat (on its tick).
pub const BEAT_MS: u64 = 1_000;
/// Ticks closer together than this are one (two roles' root contexts may share a VM).
const MIN_TICK_MS: u64 = 100;

/// The one lane of a consumer's entry.
pub const CONSUMER_LANE: u64 = 0;

/// A provider key's lane in its provider's entry.
pub fn key_lane(key_id: &str) -> u64 {
    fnv1a(key_id.as_bytes())
}

/// What a count is kept for: one shared-data entry each.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Consumer(String),
    Provider(String),
    /// Requests held for capacity, whoever they are (the one lane [`CONSUMER_LANE`]).
    Held,
}

impl Subject {
    pub fn key(&self) -> String {
        match self {
            Subject::Consumer(c) => format!("tollgate:if:c:{c}"),
            Subject::Provider(p) => format!("tollgate:if:p:{p}"),
            Subject::Held => "tollgate:if:held".to_string(),
        }
    }
}

/// Requests in flight by lane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals(Vec<(u64, u64)>);

impl Totals {
    pub fn of(&self, lane: u64) -> u64 {
        count(&self.0, lane)
    }

    pub fn sum(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }

    fn add(&mut self, lanes: &[(u64, u64)]) {
        for &(lane, n) in lanes {
            self.0 = with(&self.0, lane, n, true);
        }
    }
}

fn count(lanes: &[(u64, u64)], lane: u64) -> u64 {
    lanes
        .iter()
        .find(|(l, _)| *l == lane)
        .map_or(0, |(_, n)| *n)
}

/// `lanes` with `by` added to (or taken from) `lane`; lanes at 0 are left out.
fn with(lanes: &[(u64, u64)], lane: u64, by: u64, add: bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = lanes.iter().copied().filter(|(l, _)| *l != lane).collect();
    let n = count(lanes, lane);
    let n = if add {
        n.saturating_add(by)
    } else {
        n.saturating_sub(by)
    };
    if n > 0 {
        out.push((lane, n));
    }
    out
}

/// One VM's part of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    vm: u64,
    beat_ms: u64,
    lanes: Vec<(u64, u64)>,
}

impl Slot {
    fn live(&self, now: u64) -> bool {
        now.saturating_sub(self.beat_ms) <= LEASE_MS
    }
}

/// An entry: little-endian u64s, per slot `vm, beat_ms, lanes, (lane, count) × lanes`. A malformed
/// tail (which tollgate does not write) is left out, and goes with the next write.
fn decode(bytes: Option<&[u8]>) -> Vec<Slot> {
    let mut words = bytes.unwrap_or_default().chunks_exact(8).map(|c| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        u64::from_le_bytes(w)
    });
    let mut slots = Vec::new();
    while let (Some(vm), Some(beat_ms), Some(n)) = (words.next(), words.next(), words.next()) {
        let mut lanes = Vec::new();
        for _ in 0..n {
            match (words.next(), words.next()) {
                (Some(lane), Some(n)) => lanes.push((lane, n)),
                _ => return slots,
            }
        }
        slots.push(Slot { vm, beat_ms, lanes });
    }
    slots
}

fn encode(slots: &[Slot]) -> Vec<u8> {
    let words = slots.iter().map(|s| 3 + 2 * s.lanes.len()).sum::<usize>();
    let mut out = Vec::with_capacity(words * 8);
    for s in slots {
        for w in [s.vm, s.beat_ms, s.lanes.len() as u64] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for (lane, n) in &s.lanes {
            out.extend_from_slice(&lane.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
    out
}

/// The live slots of VMs other than `vm`, and their totals.
fn others(value: Option<&[u8]>, vm: u64, now: u64) -> (Vec<Slot>, Totals) {
    let mut slots = decode(value);
    slots.retain(|s| s.vm != vm && s.live(now));
    let mut totals = Totals::default();
    for s in &slots {
        totals.add(&s.lanes);
    }
    (slots, totals)
}

/// The entry with `own` as `vm`'s slot (none when it has nothing in flight).
fn with_own(mut slots: Vec<Slot>, vm: u64, own: &[(u64, u64)], now: u64) -> Vec<u8> {
    if !own.is_empty() {
        slots.push(Slot {
            vm,
            beat_ms: now,
            lanes: own.to_vec(),
        });
    }
    encode(&slots)
}

/// A subject's requests in flight as every live VM counts them, and the reading they come from
/// (for [`Leases::take`] to write back without reading again).
pub fn read<S: SharedStore + ?Sized>(
    store: &S,
    subject: &Subject,
    now: u64,
) -> Result<(Totals, Read), StoreError> {
    let read = store.get(&subject.key())?;
    let (_, totals) = others(read.0.as_deref(), 0, now);
    // VM ids are random and never 0: every live slot counted.
    Ok((totals, read))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Taken,
    /// The lane was at its limit: nothing was taken.
    Full {
        in_flight: u64,
    },
}

/// This VM's part of a subject's entry.
#[derive(Debug, Default)]
struct Held {
    /// This VM's requests in flight by lane: what its slot says once written.
    own: Vec<(u64, u64)>,
    /// When this VM last wrote its slot.
    beat_ms: u64,
    /// A write failed: the slot in shared data is behind `own` until the tick writes it.
    unsynced: bool,
    /// Something changed since the tick last read the entry.
    changed: bool,
    /// The tick's last reading had requests in flight: it reads again until it sees none.
    shown: bool,
}

/// One VM's leases: its id and its own counts, by subject.
#[derive(Debug)]
pub struct Leases {
    vm: u64,
    held: HashMap<Subject, Held>,
    last_tick_ms: u64,
    /// Places to give back on the next tick ([`Leases::give_back_on_tick`]).
    later: Vec<(Subject, u64)>,
}

impl Leases {
    /// `vm`: this VM's id, random and not 0.
    pub fn new(vm: u64) -> Self {
        Leases {
            vm: vm.max(1),
            held: HashMap::default(),
            last_tick_ms: 0,
            later: Vec::new(),
        }
    }

    /// Whether the tick has nothing to do: no place held, nothing to write or to show.
    pub fn is_idle(&self) -> bool {
        self.held.is_empty() && self.later.is_empty()
    }

    /// This VM's requests in flight in `subject`'s `lane`.
    pub fn own(&self, subject: &Subject, lane: u64) -> u64 {
        self.held.get(subject).map_or(0, |h| count(&h.own, lane))
    }

    /// Takes a place in `subject`'s `lane` if it has fewer than `limit` requests in flight.
    /// `read`: the entry as the caller just read it ([`read`]), for the first round.
    pub fn take<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        subject: &Subject,
        lane: u64,
        limit: u64,
        now: u64,
        read: Option<Read>,
    ) -> Result<Take, StoreError> {
        let vm = self.vm;
        let own = self
            .held
            .get(subject)
            .map(|h| h.own.clone())
            .unwrap_or_default();
        let next = with(&own, lane, 1, true);
        let (taken, _) = update_if_read(store, &subject.key(), read, |cur| {
            let (slots, others) = others(cur, vm, now);
            let in_flight = others.of(lane).saturating_add(count(&own, lane));
            if in_flight >= limit {
                return (None, Take::Full { in_flight });
            }
            (Some(with_own(slots, vm, &next, now)), Take::Taken)
        })?;
        if taken == Take::Taken {
            let held = match self.held.get_mut(subject) {
                Some(h) => h,
                None => self.held.entry(subject.clone()).or_default(),
            };
            held.own = next;
            held.beat_ms = now;
            held.unsynced = false;
            held.changed = true;
        }
        Ok(taken)
    }

    /// Gives back a place taken in `subject`'s `lane`. Given back here whatever the store says:
    /// when the write fails, the tick writes it.
    pub fn give_back<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        subject: &Subject,
        lane: u64,
        now: u64,
    ) -> Result<(), StoreError> {
        let vm = self.vm;
        let Some(held) = self.held.get_mut(subject) else {
            return Ok(());
        };
        if count(&held.own, lane) == 0 {
            return Ok(());
        }
        held.own = with(&held.own, lane, 1, false);
        held.changed = true;
        let own = held.own.clone();
        let written = update_if(store, &subject.key(), |cur| {
            let (slots, _) = others(cur, vm, now);
            (Some(with_own(slots, vm, &own, now)), ())
        });
        match written {
            Ok(_) => {
                held.beat_ms = now;
                held.unsynced = false;
                Ok(())
            }
            Err(e) => {
                held.unsynced = true;
                Err(e)
            }
        }
    }

    /// Gives back a place on the VM's next tick rather than now: for a request whose end Envoy is
    /// still tearing down, so that the place goes to another request only once the provider no
    /// longer has this one.
    pub fn give_back_on_tick(&mut self, subject: Subject, lane: u64) {
        self.later.push((subject, lane));
    }

    /// The VM's tick: gives back the places left for it, refreshes the heartbeat of its slots (every [`BEAT_MS`]), writes the ones a
    /// failed write left behind, and reads the subjects whose counts changed or were not yet seen
    /// back at 0. Returns those readings, for the gauges. Whichever VM read last records last, so
    /// a gauge settles on the count as it is.
    pub fn tick<S: SharedStore + ?Sized>(&mut self, store: &S, now: u64) -> Vec<(Subject, Totals)> {
        if self.last_tick_ms != 0 && now < self.last_tick_ms.saturating_add(MIN_TICK_MS) {
            return Vec::new();
        }
        self.last_tick_ms = now;
        for (subject, lane) in core::mem::take(&mut self.later) {
            // A write the store refuses is left to the loop below (`unsynced`).
            let _ = self.give_back(store, &subject, lane, now);
        }
        let vm = self.vm;
        let mut seen = Vec::new();
        for (subject, held) in self.held.iter_mut() {
            let beat = !held.own.is_empty() && now.saturating_sub(held.beat_ms) >= BEAT_MS;
            let write = held.unsynced || beat;
            if !write && !held.changed && !held.shown {
                continue;
            }
            let own = &held.own;
            let read = update_if(store, &subject.key(), |cur| {
                let (slots, mut totals) = others(cur, vm, now);
                totals.add(own);
                let next = write.then(|| with_own(slots, vm, own, now));
                (next, totals)
            });
            if let Ok((totals, _)) = read {
                if write {
                    held.beat_ms = now;
                    held.unsynced = false;
                }
                held.changed = false;
                held.shown = totals.sum() > 0;
                seen.push((subject.clone(), totals));
            }
        }
        self.held
            .retain(|_, h| !h.own.is_empty() || h.unsynced || h.changed || h.shown);
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FakeStore;

    fn team() -> Subject {
        Subject::Consumer("team-a".into())
    }

    fn in_flight(s: &FakeStore, subject: &Subject, now: u64) -> Totals {
        read(s, subject, now).unwrap().0
    }

    #[test]
    fn two_workers_share_one_limit_and_give_back_exactly_what_they_took() {
        let s = FakeStore::new();
        let (mut a, mut b) = (Leases::new(1), Leases::new(2));
        let t = team();
        let lane = CONSUMER_LANE;
        assert_eq!(a.take(&s, &t, lane, 3, 0, None), Ok(Take::Taken));
        assert_eq!(b.take(&s, &t, lane, 3, 0, None), Ok(Take::Taken));
        assert_eq!(a.take(&s, &t, lane, 3, 0, None), Ok(Take::Taken));
        assert_eq!(
            b.take(&s, &t, lane, 3, 0, None),
            Ok(Take::Full { in_flight: 3 })
        );
        assert_eq!(in_flight(&s, &t, 0).of(lane), 3);
        assert_eq!((a.own(&t, lane), b.own(&t, lane)), (2, 1));
        a.give_back(&s, &t, lane, 10).unwrap();
        assert_eq!(b.take(&s, &t, lane, 3, 10, None), Ok(Take::Taken));
        for _ in 0..5 {
            // More give-backs than takes change nothing.
            a.give_back(&s, &t, lane, 20).unwrap();
            b.give_back(&s, &t, lane, 20).unwrap();
        }
        assert_eq!(in_flight(&s, &t, 20), Totals::default());
        assert_eq!(s.keys(), vec!["tollgate:if:c:team-a".to_string()]);
        assert!(
            decode(s.get("tollgate:if:c:team-a").unwrap().0.as_deref()).is_empty(),
            "no slot is left once nothing is in flight"
        );
    }

    #[test]
    fn a_refusal_costs_one_read_and_a_place_a_read_and_a_write_each_way() {
        let s = FakeStore::new();
        let mut a = Leases::new(7);
        let t = team();
        let calls = |f: &mut dyn FnMut()| {
            let before = s.calls.get();
            f();
            s.calls.get() - before
        };
        assert_eq!(
            calls(&mut || assert_eq!(a.take(&s, &t, 0, 1, 0, None), Ok(Take::Taken))),
            2
        );
        assert_eq!(
            calls(&mut || assert!(matches!(
                a.take(&s, &t, 0, 1, 0, None),
                Ok(Take::Full { .. })
            ))),
            1
        );
        assert_eq!(calls(&mut || a.give_back(&s, &t, 0, 0).unwrap()), 2);
        // With the entry read already (the key choice reads it), taking is one write.
        let (_, r) = read(&s, &t, 0).unwrap();
        assert_eq!(
            calls(&mut || assert_eq!(a.take(&s, &t, 0, 1, 0, Some(r.clone())), Ok(Take::Taken))),
            1
        );
    }

    #[test]
    fn cas_conflicts_lose_no_place_and_never_pass_the_limit() {
        let s = FakeStore::new();
        let (mut a, mut b) = (Leases::new(1), Leases::new(2));
        let t = team();
        let mut taken = 0;
        for i in 0..40 {
            s.inject_conflicts.set(i % 4);
            let w = if i % 2 == 0 { &mut a } else { &mut b };
            if w.take(&s, &t, 0, 25, 0, None) == Ok(Take::Taken) {
                taken += 1;
            }
        }
        assert_eq!(taken, 25);
        assert_eq!(in_flight(&s, &t, 0).of(0), 25);
        for i in 0..40 {
            s.inject_conflicts.set(i % 3);
            let w = if i % 2 == 0 { &mut a } else { &mut b };
            w.give_back(&s, &t, 0, 0).unwrap();
        }
        assert_eq!(in_flight(&s, &t, 0).sum(), 0);
    }

    #[test]
    fn a_read_taken_before_another_worker_wrote_is_read_again() {
        let s = FakeStore::new();
        let (mut a, mut b) = (Leases::new(1), Leases::new(2));
        let t = team();
        let (_, stale) = read(&s, &t, 0).unwrap();
        assert_eq!(b.take(&s, &t, 0, 1, 0, None), Ok(Take::Taken));
        assert_eq!(
            a.take(&s, &t, 0, 1, 0, Some(stale)),
            Ok(Take::Full { in_flight: 1 })
        );
    }

    #[test]
    fn a_vanished_vms_places_stop_counting_after_the_lease_and_are_dropped() {
        let s = FakeStore::new();
        let t = team();
        let mut gone = Leases::new(1);
        for _ in 0..4 {
            gone.take(&s, &t, 0, 4, 1_000, None).unwrap();
        }
        // The VM trapped: no callback of its streams, no tick ever again.
        drop(gone);
        let mut a = Leases::new(2);
        assert_eq!(
            a.take(&s, &t, 0, 4, 1_000 + LEASE_MS, None),
            Ok(Take::Full { in_flight: 4 }),
            "within the lease they still count"
        );
        let later = 1_000 + LEASE_MS + 1;
        assert_eq!(in_flight(&s, &t, later).sum(), 0);
        assert_eq!(a.take(&s, &t, 0, 4, later, None), Ok(Take::Taken));
        let slots = decode(s.get(&t.key()).unwrap().0.as_deref());
        assert_eq!(slots.len(), 1, "the dead slot was dropped: {slots:?}");
        assert_eq!(slots[0].vm, 2);
    }

    #[test]
    fn the_tick_keeps_a_busy_vms_lease_alive_for_as_long_as_its_requests_run() {
        let s = FakeStore::new();
        let t = team();
        let (mut a, mut b) = (Leases::new(1), Leases::new(2));
        a.take(&s, &t, 0, 2, 0, None).unwrap();
        a.take(&s, &t, 0, 2, 0, None).unwrap();
        // A minute of long requests: A ticks every 200 ms.
        let mut now = 0;
        while now < 60_000 {
            now += 200;
            a.tick(&s, now);
        }
        assert_eq!(
            b.take(&s, &t, 0, 2, now, None),
            Ok(Take::Full { in_flight: 2 })
        );
        // Heartbeats are written once a second, not on every tick.
        let before = s.calls.get();
        for _ in 0..5 {
            now += 200;
            a.tick(&s, now);
        }
        assert_eq!(s.calls.get() - before, 5 + 1, "five reads, one write");
        // Two root contexts of one VM ticking at once: one tick.
        let before = s.calls.get();
        a.tick(&s, now + 50);
        assert_eq!(s.calls.get(), before);
    }

    #[test]
    fn the_tick_reads_what_changed_until_it_sees_nothing_in_flight_then_nothing() {
        let s = FakeStore::new();
        let t = team();
        let mut a = Leases::new(1);
        assert!(a.tick(&s, 100).is_empty(), "nothing held: no call");
        assert_eq!(s.calls.get(), 0);
        a.take(&s, &t, 0, 2, 100, None).unwrap();
        let seen = a.tick(&s, 300);
        assert_eq!(seen, vec![(t.clone(), Totals(vec![(0, 1)]))]);
        a.give_back(&s, &t, 0, 400).unwrap();
        let seen = a.tick(&s, 500);
        assert_eq!(seen, vec![(t.clone(), Totals::default())]);
        let before = s.calls.get();
        assert!(a.tick(&s, 700).is_empty());
        assert_eq!(s.calls.get(), before, "idle: no call at all");
    }

    #[test]
    fn a_place_left_for_the_tick_is_held_until_then_and_given_back_once() {
        let s = FakeStore::new();
        let t = team();
        let mut a = Leases::new(1);
        a.take(&s, &t, 0, 1, 0, None).unwrap();
        a.give_back_on_tick(t.clone(), 0);
        assert!(!a.is_idle());
        assert_eq!(
            a.take(&s, &t, 0, 1, 10, None),
            Ok(Take::Full { in_flight: 1 })
        );
        a.tick(&s, 200);
        assert_eq!(in_flight(&s, &t, 200).of(0), 0);
        assert_eq!(a.take(&s, &t, 0, 1, 210, None), Ok(Take::Taken));
        a.tick(&s, 400);
        assert_eq!(in_flight(&s, &t, 400).of(0), 1, "given back once");
    }

    #[test]
    fn a_give_back_the_store_refused_is_written_by_the_tick() {
        let s = FakeStore::new();
        let t = team();
        let mut a = Leases::new(1);
        a.take(&s, &t, 0, 1, 0, None).unwrap();
        s.broken.set(true);
        assert_eq!(a.give_back(&s, &t, 0, 10), Err(StoreError::Host));
        assert_eq!(a.own(&t, 0), 0, "given back here whatever the store said");
        a.tick(&s, 200);
        s.broken.set(false);
        assert_eq!(in_flight(&s, &t, 300).of(0), 1, "not yet written");
        a.tick(&s, 400);
        assert_eq!(in_flight(&s, &t, 500).of(0), 0);
    }

    #[test]
    fn a_slot_dropped_while_its_vm_stalled_comes_back_with_its_next_write() {
        let s = FakeStore::new();
        let t = team();
        let (mut a, mut b) = (Leases::new(1), Leases::new(2));
        a.take(&s, &t, 0, 5, 0, None).unwrap();
        a.take(&s, &t, 0, 5, 0, None).unwrap();
        // A stalls past its lease; B's write drops A's slot.
        b.take(&s, &t, 0, 5, LEASE_MS + 1, None).unwrap();
        assert_eq!(in_flight(&s, &t, LEASE_MS + 1).of(0), 1);
        a.tick(&s, LEASE_MS + 2);
        assert_eq!(in_flight(&s, &t, LEASE_MS + 2).of(0), 3);
    }

    #[test]
    fn key_lanes_are_counted_apart_in_one_entry() {
        let s = FakeStore::new();
        let p = Subject::Provider("openai".into());
        let (k1, k2) = (key_lane("oa-1"), key_lane("oa-2"));
        let (mut a, mut b) = (Leases::new(1), Leases::new(2));
        assert_eq!(a.take(&s, &p, k1, 1, 0, None), Ok(Take::Taken));
        assert_eq!(
            b.take(&s, &p, k1, 1, 0, None),
            Ok(Take::Full { in_flight: 1 })
        );
        assert_eq!(b.take(&s, &p, k2, 1, 0, None), Ok(Take::Taken));
        let totals = in_flight(&s, &p, 0);
        assert_eq!((totals.of(k1), totals.of(k2), totals.sum()), (1, 1, 2));
        a.give_back(&s, &p, k1, 0).unwrap();
        assert_eq!(in_flight(&s, &p, 0).of(k1), 0);
        assert_eq!(s.keys(), vec!["tollgate:if:p:openai".to_string()]);
    }

    #[test]
    fn malformed_entries_read_as_far_as_they_go() {
        let slots = vec![
            Slot {
                vm: 1,
                beat_ms: 2,
                lanes: vec![(0, 3)],
            },
            Slot {
                vm: 4,
                beat_ms: 5,
                lanes: vec![(6, 7), (8, 9)],
            },
        ];
        let bytes = encode(&slots);
        assert_eq!(decode(Some(&bytes)), slots);
        assert_eq!(decode(Some(&bytes[..bytes.len() - 8])), slots[..1].to_vec());
        assert_eq!(decode(Some(&[1, 2, 3])), vec![]);
        assert_eq!(decode(None), vec![]);
    }
}
