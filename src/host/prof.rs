//! Per-request profile of the module, built only with `--features profile` (`make profile`):
//! how many host calls of each kind a request makes, and how long the module's callbacks and its
//! host calls take. Every 1,000 requests the listener logs the averages at warn level. Without the
//! feature every function here is an empty inline one, so the release module carries none of it.

#[cfg(feature = "profile")]
mod on {
    use core::cell::RefCell;
    use std::time::Instant;

    #[derive(Default)]
    struct Tally {
        /// (name, calls, nanoseconds), in order of first use.
        rows: Vec<(&'static str, u64, u64)>,
        requests: u64,
    }

    thread_local! {
        static TALLY: RefCell<Tally> = RefCell::new(Tally::default());
    }

    fn add(name: &'static str, ns: u64) {
        TALLY.with(|t| {
            let mut t = t.borrow_mut();
            match t.rows.iter_mut().find(|r| r.0 == name) {
                Some(r) => {
                    r.1 += 1;
                    r.2 += ns;
                }
                None => t.rows.push((name, 1, ns)),
            }
        });
    }

    pub struct Span(&'static str, Instant);

    impl Drop for Span {
        fn drop(&mut self) {
            add(self.0, self.1.elapsed().as_nanos() as u64);
        }
    }

    pub fn span(name: &'static str) -> Span {
        Span(name, Instant::now())
    }

    pub fn request_done() {
        let report = TALLY.with(|t| {
            let mut t = t.borrow_mut();
            t.requests += 1;
            if t.requests < 1000 {
                return None;
            }
            let n = t.requests as f64;
            let mut s = format!(
                "tollgate profile over {} requests (per request: calls, µs):",
                t.requests
            );
            for (name, calls, ns) in &t.rows {
                s.push_str(&format!(
                    "\n  {name:<34} {:>7.2} {:>8.2}",
                    *calls as f64 / n,
                    *ns as f64 / n / 1000.0
                ));
            }
            *t = Tally::default();
            Some(s)
        });
        if let Some(s) = report {
            log::warn!("{s}");
        }
    }
}

#[cfg(feature = "profile")]
pub use on::{request_done, span};

#[cfg(not(feature = "profile"))]
pub struct Span;

/// Empty, so that a span can end early with `drop(span)` in either build.
#[cfg(not(feature = "profile"))]
impl Drop for Span {
    #[inline(always)]
    fn drop(&mut self) {}
}

#[cfg(not(feature = "profile"))]
#[inline(always)]
pub fn span(_: &'static str) -> Span {
    Span
}

#[cfg(not(feature = "profile"))]
#[inline(always)]
pub fn request_done() {}
