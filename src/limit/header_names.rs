//! Consumers named by a trusted header, with no list: the first `consumers.max_from_header`
//! distinct names are consumers of their own, every later one is counted as [`OVERFLOW`].
//!
//! The set of names is in Envoy's shared data, so the bound holds across workers, and across
//! configuration reloads (shared data outlives a VM). Shared data has no delete, so the set lives in
//! a bounded number of entries: pages of [`PAGE`] names (`tollgate:hc:<n>`), filled in order, each
//! appended to with a CAS. Only the last page changes; a full page never does again. That makes the
//! bound exact and a name never taken twice: a worker appends only to a page it has just read whole
//! (the CAS fails if anyone wrote it since), after finding the name in none of the pages before it.
//!
//! Each worker keeps the names it has seen ([`Seen`], one per configuration): a known name costs
//! no host call. A new one costs a read of the last page (and one write when it is admitted); once
//! the set is full, the worker knows it for good and overflow names cost nothing either.

use crate::maps::HashSet;
use crate::store::{update_if, SharedStore};
use core::cell::RefCell;

/// The consumer that names past the bound are counted as. A trusted header cannot make a consumer
/// of that name: such a value is counted as the overflow too, and takes no place in the set.
pub const OVERFLOW: &str = "_overflow";

/// Names per shared-data entry: a page is at most 64 × 65 bytes.
pub const PAGE: usize = 64;

fn page_key(page: usize) -> String {
    format!("tollgate:hc:{page}")
}

/// This worker's view of the set. A copy (a configuration cloned) starts with no view.
#[derive(Default)]
pub struct Seen(RefCell<View>);

#[derive(Default)]
struct View {
    /// Names known to be in the set, at places below the bound.
    names: HashSet<String>,
    /// Pages read and full: they never change again.
    full_pages: usize,
    /// The set is full: no name will be added to it any more.
    complete: bool,
    /// The overflow was logged (once per worker and configuration).
    warned: bool,
}

impl Clone for Seen {
    fn clone(&self) -> Self {
        Seen::default()
    }
}

impl core::fmt::Debug for Seen {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0.try_borrow() {
            Ok(v) => write!(f, "Seen({} names)", v.names.len()),
            Err(_) => write!(f, "Seen(..)"),
        }
    }
}

/// What reading one page told.
enum Page {
    /// The name is there, at this place in the set.
    Found(usize),
    /// It was not, and was appended at this place.
    Added(usize),
    /// Full, without the name: look at the next page.
    Full,
    /// The set is full, without the name.
    Exhausted,
}

fn names_of(page: Option<&[u8]>) -> impl Iterator<Item = &[u8]> {
    page.unwrap_or_default()
        .split(|&b| b == b'\n')
        .filter(|n| !n.is_empty())
}

/// The consumer `name` (a valid name, read from the trusted header) is counted as: itself while it
/// is among the first `max` distinct names, else [`OVERFLOW`]. When shared data fails, the overflow
/// too: the bound holds whatever happens.
pub fn consumer_name<'a>(
    seen: &Seen,
    store: &dyn SharedStore,
    max: usize,
    name: &'a str,
) -> &'a str {
    if name == OVERFLOW {
        return OVERFLOW;
    }
    let Ok(mut view) = seen.0.try_borrow_mut() else {
        return OVERFLOW;
    };
    if view.names.contains(name) {
        return name;
    }
    if view.complete {
        return overflow(&mut view, max, name, None);
    }
    let mut page = view.full_pages;
    loop {
        let base = page.saturating_mul(PAGE);
        if base >= max {
            view.complete = true;
            return overflow(&mut view, max, name, None);
        }
        let mut learned: Vec<String> = Vec::new();
        let read = update_if(store, &page_key(page), |cur| {
            learned.clear();
            let mut found = None;
            for (i, n) in names_of(cur).enumerate() {
                if n == name.as_bytes() {
                    found = Some(base + i);
                }
                if base + i < max {
                    learned.push(String::from_utf8_lossy(n).into_owned());
                }
            }
            let len = names_of(cur).count();
            if let Some(at) = found {
                return (None, Page::Found(at));
            }
            if len >= PAGE {
                return (None, Page::Full);
            }
            if base + len >= max {
                return (None, Page::Exhausted);
            }
            let mut next = cur.unwrap_or_default().to_vec();
            if !next.is_empty() {
                next.push(b'\n');
            }
            next.extend_from_slice(name.as_bytes());
            (Some(next), Page::Added(base + len))
        });
        view.names.extend(learned);
        match read {
            Ok((Page::Found(at) | Page::Added(at), _)) if at < max => {
                view.names.insert(name.to_string());
                return name;
            }
            Ok((Page::Found(_) | Page::Added(_), _)) => {
                return overflow(&mut view, max, name, None)
            }
            Ok((Page::Full, _)) => {
                view.full_pages = page + 1;
                page += 1;
            }
            Ok((Page::Exhausted, _)) => {
                view.complete = true;
                return overflow(&mut view, max, name, None);
            }
            Err(e) => return overflow(&mut view, max, name, Some(e)),
        }
    }
}

fn overflow(
    view: &mut View,
    max: usize,
    name: &str,
    failure: Option<crate::store::StoreError>,
) -> &'static str {
    if !view.warned {
        view.warned = true;
        match failure {
            None => log::warn!(
                "consumers.trusted_header: more than {max} distinct consumer names (consumers.max_from_header); '{name}' and every later new name are counted as consumer '{OVERFLOW}'"
            ),
            Some(e) => log::warn!(
                "consumers.trusted_header: the set of consumer names in shared data could not be read ({e:?}); '{name}' is counted as consumer '{OVERFLOW}' meanwhile"
            ),
        }
    }
    OVERFLOW
}

/// The names in the set, at places below `max`, in the order they came: for the status endpoint.
pub fn names(store: &dyn SharedStore, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut page = 0usize;
    while page.saturating_mul(PAGE) < max {
        let Ok((Some(v), _)) = store.get(&page_key(page)) else {
            break;
        };
        let full = names_of(Some(&v)).count() >= PAGE;
        out.extend(
            names_of(Some(&v))
                .take(max - page * PAGE)
                .map(|n| String::from_utf8_lossy(n).into_owned()),
        );
        if !full {
            break;
        }
        page += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FakeStore;

    fn name(i: usize) -> String {
        format!("team-{i}")
    }

    #[test]
    fn the_first_names_are_their_own_and_later_ones_overflow() {
        let store = FakeStore::new();
        let seen = Seen::default();
        let max = 150;
        for i in 0..300 {
            let n = name(i);
            let want = if i < max { n.as_str() } else { OVERFLOW };
            assert_eq!(consumer_name(&seen, &store, max, &n), want, "{n}");
        }
        // Known names again: still their own, and no host call.
        let calls = store.calls.get();
        for i in 0..300 {
            let n = name(i);
            let want = if i < max { n.as_str() } else { OVERFLOW };
            assert_eq!(consumer_name(&seen, &store, max, &n), want);
        }
        assert_eq!(
            store.calls.get(),
            calls,
            "no host call once the set is full"
        );
        assert_eq!(
            store.keys(),
            ["tollgate:hc:0", "tollgate:hc:1", "tollgate:hc:2"],
            "ceil(150 / 64) entries, whatever came after"
        );
        let listed = names(&store, max);
        assert_eq!(listed.len(), max);
        assert_eq!(listed.first().map(String::as_str), Some("team-0"));
        assert_eq!(listed.last(), Some(&name(max - 1)));
    }

    #[test]
    fn workers_share_one_set_and_never_take_a_name_twice() {
        let store = FakeStore::new();
        let (a, b) = (Seen::default(), Seen::default());
        let max = 100;
        for i in 0..100 {
            let n = name(i);
            // Each name is seen first by one worker, then by the other.
            let (first, second) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
            assert_eq!(consumer_name(first, &store, max, &n), n);
            assert_eq!(consumer_name(second, &store, max, &n), n);
        }
        for i in 100..130 {
            assert_eq!(consumer_name(&b, &store, max, &name(i)), OVERFLOW);
        }
        let listed = names(&store, max);
        let distinct: HashSet<&String> = listed.iter().collect();
        assert_eq!((listed.len(), distinct.len()), (100, 100));
    }

    #[test]
    fn conflicting_appends_are_retried_and_the_bound_is_exact() {
        let store = FakeStore::new();
        let seen = Seen::default();
        for i in 0..70 {
            store.inject_conflicts.set(2);
            assert_eq!(consumer_name(&seen, &store, 70, &name(i)), name(i));
        }
        assert_eq!(consumer_name(&seen, &store, 70, "late"), OVERFLOW);
        assert_eq!(names(&store, 70).len(), 70);
    }

    #[test]
    fn a_new_configuration_keeps_the_set_and_its_own_bound() {
        let store = FakeStore::new();
        let old = Seen::default();
        for i in 0..80 {
            consumer_name(&old, &store, 80, &name(i));
        }
        // Reloaded with a lower bound: names past it overflow, earlier ones stay their own.
        let lower = Seen::default();
        assert_eq!(consumer_name(&lower, &store, 10, &name(3)), name(3));
        assert_eq!(consumer_name(&lower, &store, 10, &name(70)), OVERFLOW);
        assert_eq!(consumer_name(&lower, &store, 10, "new"), OVERFLOW);
        assert_eq!(names(&store, 10).len(), 10);
        // Raised: the set grows on from where it was.
        let higher = Seen::default();
        assert_eq!(consumer_name(&higher, &store, 90, &name(70)), name(70));
        assert_eq!(consumer_name(&higher, &store, 90, "new"), "new");
        assert_eq!(names(&store, 90).len(), 81);
    }

    #[test]
    fn the_reserved_name_and_a_failing_store_count_as_the_overflow() {
        let store = FakeStore::new();
        let seen = Seen::default();
        assert_eq!(consumer_name(&seen, &store, 10, OVERFLOW), OVERFLOW);
        assert!(store.keys().is_empty(), "takes no place in the set");
        store.broken.set(true);
        assert_eq!(consumer_name(&seen, &store, 10, "a"), OVERFLOW);
        store.broken.set(false);
        assert_eq!(consumer_name(&seen, &store, 10, "a"), "a", "not for good");
    }
}
