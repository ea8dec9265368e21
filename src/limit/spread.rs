//! Spreading the `Retry-After` of refused clients so that they do not all come back in the same
//! second (no thundering herd), and never earlier than the capacity returns.
//!
//! A refusal knows when capacity returns (`recovery`, ms from now). Its client is told to come back
//! at `recovery + offset`, the offset drawn uniformly from `[0, spread)`, where the spread is the
//! configured fraction (`retry_after_spread`, 0.5 by default) of the wait until recovery, and at
//! least one second (`Retry-After` counts whole seconds: a smaller spread would round away). Clients
//! refused together for the same reason then come back over the window that follows the recovery,
//! instead of at its first second; none is told to come back before it.
//!
//! The draw comes from a small per-worker generator (`fastrand`'s wyrand), seeded once per worker:
//! the module has no operating-system randomness it can count on in Envoy, and the spread needs
//! no unpredictability, only a different draw per client.

use core::cell::RefCell;

/// When to come back, ms from now: `recovery_ms` plus an offset in `[0, spread)`.
pub fn retry_after_ms(recovery_ms: u64, fraction: f64, draw: u64) -> u64 {
    if fraction <= 0.0 {
        return recovery_ms;
    }
    // Float to int saturates: a huge recovery gives a huge spread, not a wrapped one.
    let spread = ((recovery_ms as f64) * fraction) as u64;
    recovery_ms.saturating_add(draw % spread.max(1000))
}

std::thread_local! {
    static RNG: RefCell<Option<fastrand::Rng>> = const { RefCell::new(None) };
}

/// One draw from this worker's generator, seeded by `seed` the first time (called only then).
pub fn draw(seed: impl FnOnce() -> u64) -> u64 {
    RNG.with(|cell| {
        let mut rng = cell.borrow_mut();
        rng.get_or_insert_with(|| fastrand::Rng::with_seed(seed()))
            .u64(..)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_earlier_than_recovery_and_spread_over_the_window() {
        let mut rng = fastrand::Rng::with_seed(7);
        let recovery = 40_300;
        let secs: Vec<u64> = (0..200)
            .map(|_| retry_after_ms(recovery, 0.5, rng.u64(..)).div_ceil(1000))
            .collect();
        assert!(secs.iter().all(|s| s * 1000 >= recovery));
        let (lo, hi) = (*secs.iter().min().unwrap(), *secs.iter().max().unwrap());
        // The window is [40.3 s, 60.45 s): every whole second of it is drawn by 200 clients.
        assert_eq!(lo, 41);
        assert_eq!(hi, 61);
        let distinct: std::collections::BTreeSet<_> = secs.iter().collect();
        assert_eq!(distinct.len(), 21);
        // Roughly uniform: no second takes more than three times its share.
        for s in distinct {
            assert!(secs.iter().filter(|x| *x == s).count() < 3 * 200 / 20);
        }
    }

    #[test]
    fn a_short_wait_still_spreads_over_a_second_and_zero_turns_it_off() {
        let ms: Vec<u64> = (0..100).map(|d| retry_after_ms(200, 0.5, d * 13)).collect();
        assert!(ms.iter().all(|m| (200..1_200).contains(m)));
        assert!(ms.iter().any(|m| m.div_ceil(1000) == 2));
        assert_eq!(retry_after_ms(200, 0.0, 999), 200);
        assert_eq!(retry_after_ms(u64::MAX, 1.0, 5), u64::MAX);
    }

    #[test]
    fn draws_differ_and_the_seed_is_asked_once() {
        let mut asked = 0;
        let a = draw(|| {
            asked += 1;
            42
        });
        let b = draw(|| {
            asked += 1;
            42
        });
        assert_ne!(a, b);
        assert_eq!(asked, 1);
    }
}
