//! `consumers.max_from_header`: how many distinct names a trusted header may make consumers of
//! their own when `consumers.list` is empty. Each consumer has its own metric series, usage totals
//! and budget entry in shared data, which has no delete: without a bound, every distinct value a
//! client (or a misbehaving layer in front) sends would add to them for as long as Envoy runs.
//! Names past the bound are counted together as [`crate::limit::header_names::OVERFLOW`].

use super::{err, Res};

pub const DEFAULT_MAX_FROM_HEADER: usize = 1000;
/// Past this, the bound no longer keeps the metric series few (three or more per consumer and model).
const LARGEST: u32 = 100_000;

pub(super) fn max_from_header(raw: Option<u32>, trusted_header: bool, listed: bool) -> Res<usize> {
    const FIELD: &str = "consumers.max_from_header";
    let Some(n) = raw else {
        return Ok(DEFAULT_MAX_FROM_HEADER);
    };
    if !trusted_header {
        return Err(err(FIELD, "applies only with consumers.trusted_header"));
    }
    if listed {
        return Err(err(
            FIELD,
            "applies only when consumers.list is empty (the list names every consumer already)",
        ));
    }
    if !(1..=LARGEST).contains(&n) {
        return Err(err(FIELD, format!("must be between 1 and {LARGEST}")));
    }
    Ok(n as usize)
}
