//! The hand-off between the two roles of one request.
//!
//! proxy-wasm cannot pause request headers and still see the body (Envoy turns a headers pause into
//! StopAllIteration), so the listener role lets the headers go on at once, and the FIRST upstream
//! attempt parks itself (pauses) in the cluster-level role before anything reaches the provider.
//! When the listener role has the whole body and has admitted the request, it applies what only
//! the body could tell (the model, hence the provider's path) to the parked attempt and resumes it;
//! if it refuses the request, its local reply resets the parked attempt and the provider never sees
//! it. Later attempts (retries) find the decision already made and go straight on.
//!
//! Both roles run in the same VM on a worker thread (same `vm_id` and `vm_config`), so this is a
//! thread-local map keyed by the listener context's id, passed in the `x-tollgate-rid` header.

use core::cell::RefCell;
use hashbrown::HashMap;

#[derive(Debug, Clone, Default)]
pub struct Decision {
    /// The model the client asked for ("" when the request has no body).
    pub client_model: String,
    /// The listener role changed the body (so the client's content-length no longer holds).
    pub body_rewritten: bool,
}

/// The request as the client sent it. Envoy gives every attempt the same header map, so an attempt
/// sees what the previous one rewrote (path, authority): each attempt starts again from this.
#[derive(Debug, Clone, Default)]
pub struct Original {
    pub path: String,
    pub authority: String,
    pub consumer: String,
}

#[derive(Default)]
struct Entry {
    original: Original,
    parked: Option<(u32, usize)>,
    decision: Option<Decision>,
    /// The client went away before its answer was complete: attempts reset now are not the
    /// provider's fault.
    client_gone: bool,
    /// Attempts of this request that have not ended yet; the entry outlives the listener's
    /// context until they have (Envoy ends the listener's side first).
    attempts: u32,
    /// Attempts started so far, ended or not: the current one's number.
    started: u32,
    closed: bool,
}

pub enum State {
    /// No listener role in this VM for this request: go on with what the headers say.
    Unknown,
    Pending,
    Decided(Decision),
}

thread_local! {
    static ENTRIES: RefCell<HashMap<u32, Entry>> = RefCell::new(HashMap::new());
}

pub fn open(rid: u32, original: Original) {
    ENTRIES.with(|e| {
        e.borrow_mut().insert(
            rid,
            Entry {
                original,
                ..Entry::default()
            },
        )
    });
}

pub fn original(rid: u32) -> Option<Original> {
    ENTRIES.with(|e| e.borrow().get(&rid).map(|entry| entry.original.clone()))
}

pub fn close(rid: u32) {
    ENTRIES.with(|e| {
        let mut map = e.borrow_mut();
        match map.get_mut(&rid) {
            Some(entry) if entry.attempts > 0 => entry.closed = true,
            _ => {
                map.remove(&rid);
            }
        }
    });
}

/// An attempt began; returns its number (1 for the first), 0 when the request is unknown here.
pub fn attempt_started(rid: u32) -> u32 {
    ENTRIES.with(|e| {
        let mut map = e.borrow_mut();
        let Some(entry) = map.get_mut(&rid) else {
            return 0;
        };
        entry.attempts = entry.attempts.saturating_add(1);
        entry.started = entry.started.saturating_add(1);
        entry.started
    })
}

/// An attempt ended; returns whether the client had gone by then.
pub fn attempt_ended(rid: u32) -> bool {
    ENTRIES.with(|e| {
        let mut map = e.borrow_mut();
        let Some(entry) = map.get_mut(&rid) else {
            return false;
        };
        entry.attempts = entry.attempts.saturating_sub(1);
        let gone = entry.client_gone;
        if entry.closed && entry.attempts == 0 {
            map.remove(&rid);
        }
        gone
    })
}

pub fn state(rid: u32) -> State {
    ENTRIES.with(|e| match e.borrow().get(&rid) {
        None => State::Unknown,
        Some(Entry {
            decision: Some(d), ..
        }) => State::Decided(d.clone()),
        Some(_) => State::Pending,
    })
}

/// The first attempt waits for the listener's decision: (its context id, its provider index).
pub fn park(rid: u32, context_id: u32, provider: usize) {
    ENTRIES.with(|e| {
        if let Some(entry) = e.borrow_mut().get_mut(&rid) {
            entry.parked = Some((context_id, provider));
        }
    });
}

/// Records the decision; returns the parked attempt to resume, if any.
pub fn decide(rid: u32, decision: Decision) -> Option<(u32, usize)> {
    ENTRIES.with(|e| {
        let mut map = e.borrow_mut();
        let entry = map.entry(rid).or_default();
        entry.decision = Some(decision);
        entry.parked.take()
    })
}

/// A parked attempt that went away (reset, timeout) must not be resumed later.
pub fn unpark(rid: u32, context_id: u32) {
    ENTRIES.with(|e| {
        if let Some(entry) = e.borrow_mut().get_mut(&rid) {
            if entry.parked.map(|(c, _)| c) == Some(context_id) {
                entry.parked = None;
            }
        }
    });
}

/// Called by the listener role when its stream is torn down before the response completed. Envoy
/// destroys the listener-level filters before the router resets the upstream attempts, so the
/// attempts see this when they end.
pub fn mark_client_gone(rid: u32) {
    ENTRIES.with(|e| {
        if let Some(entry) = e.borrow_mut().get_mut(&rid) {
            entry.client_gone = true;
        }
    });
}
