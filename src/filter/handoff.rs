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

#[derive(Default)]
struct Entry {
    parked: Option<(u32, usize)>,
    decision: Option<Decision>,
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

pub fn open(rid: u32) {
    ENTRIES.with(|e| e.borrow_mut().insert(rid, Entry::default()));
}

pub fn close(rid: u32) {
    ENTRIES.with(|e| e.borrow_mut().remove(&rid));
}

pub fn state(rid: u32) -> State {
    ENTRIES.with(|e| match e.borrow().get(&rid) {
        None => State::Unknown,
        Some(Entry { decision: Some(d), .. }) => State::Decided(d.clone()),
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
