//! Per-request profile of the module, built only with `--features profile` (`make profile`):
//! how many host calls of each kind a request makes, and how long the module's callbacks and its
//! host calls take. Every 4,000 requests the listener logs the averages at warn level. Without the
//! feature every function here is an empty inline one, so the release module carries none of it.

#[cfg(feature = "profile")]
mod on {
    use core::cell::{Cell, RefCell};
    use std::time::Instant;

    #[derive(Default)]
    struct Tally {
        /// (name, calls, nanoseconds), in order of first use.
        rows: Vec<(&'static str, u64, u64)>,
        /// The same, for what the roots do on their timer tick: work per unit of time, not per
        /// request or per event, reported apart.
        tick_rows: Vec<(&'static str, u64, u64)>,
        requests: u64,
    }

    thread_local! {
        static TALLY: RefCell<Tally> = RefCell::new(Tally::default());
        static IN_TICK: Cell<bool> = const { Cell::new(false) };
    }

    fn add(name: &'static str, ns: u64) {
        let in_tick = IN_TICK.with(Cell::get);
        TALLY.with(|t| {
            let mut t = t.borrow_mut();
            let rows = if in_tick {
                &mut t.tick_rows
            } else {
                &mut t.rows
            };
            match rows.iter_mut().find(|r| r.0 == name) {
                Some(r) => {
                    r.1 += 1;
                    r.2 += ns;
                }
                None => rows.push((name, 1, ns)),
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

    /// Marks what runs until it is dropped as the timer tick's (see `Tally::tick_rows`).
    pub struct Tick(bool);

    impl Drop for Tick {
        fn drop(&mut self) {
            IN_TICK.with(|t| t.set(self.0));
        }
    }

    pub fn tick() -> Tick {
        Tick(IN_TICK.with(|t| t.replace(true)))
    }

    pub fn request_done() {
        let report = TALLY.with(|t| {
            let mut t = t.borrow_mut();
            t.requests += 1;
            // Calls are counted when made and requests when done: the requests in flight at either
            // edge of the window blur the averages by about their share of it (16 streams of 60 ms
            // moved a 1,000-request window's calls per SSE event by ±0.01).
            if t.requests < 4000 {
                return None;
            }
            let n = t.requests as f64;
            let mut s = format!(
                "tollgate profile over {} requests (per request: calls, µs):",
                t.requests
            );
            for (prefix, rows) in [("", &t.rows), ("tick ", &t.tick_rows)] {
                for (name, calls, ns) in rows {
                    s.push_str(&format!(
                        "\n  {:<34} {:>7.2} {:>8.2}",
                        format!("{prefix}{name}"),
                        *calls as f64 / n,
                        *ns as f64 / n / 1000.0
                    ));
                }
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
pub use on::{request_done, span, tick, Tick};

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

#[cfg(not(feature = "profile"))]
pub struct Tick;

#[cfg(not(feature = "profile"))]
#[inline(always)]
pub fn tick() -> Tick {
    Tick
}
