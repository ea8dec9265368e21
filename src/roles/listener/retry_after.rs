//! The `Retry-After` of a refusal, spread over the window after recovery
//! ([`crate::limit::spread`]) so that clients refused together do not come back together. Written
//! with `retry-after-ms` (which OpenAI's SDKs read before `Retry-After`); the rate-limit headers
//! (`x-ratelimit-reset-*`, `anthropic-ratelimit-*-reset`) keep saying when capacity truly returns.

use super::admission::Refusal;
use crate::config::Config;
use crate::host::Host;
use crate::limit::spread;

/// `Retry-After` and `retry-after-ms` for a refusal that carries a `Retry-After`; None when the
/// spread is off (or the refusal says no time). Never earlier than the refusal's own recovery: its
/// `retry_in` where it has one, else the whole seconds it wrote.
pub(super) fn spread<H: Host>(host: &H, cfg: &Config, r: &Refusal) -> Option<(String, String)> {
    if cfg.pacing.spread <= 0.0 {
        return None;
    }
    let (_, written) = r.headers.iter().find(|(k, _)| *k == "retry-after")?;
    let secs: u64 = written.parse().ok()?;
    // `retry_in` is the finer of the two, but saturates (u32 ms): never below what the header says.
    let whole = secs.saturating_mul(1000);
    let recovery = r.retry_in_ms().map_or(whole, |ms| {
        u64::from(ms).max(whole.saturating_sub(999)).max(1)
    });
    // Seeded once per worker, from what tells two workers apart: their connections.
    let draw = spread::draw(|| {
        let conn = host
            .property(&["connection", "id"])
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_le_bytes);
        conn.rotate_left(32) ^ host.now_ms()
    });
    let ms = spread::retry_after_ms(recovery, cfg.pacing.spread, draw);
    Some((ms.div_ceil(1000).max(1).to_string(), ms.to_string()))
}
