//! How long a provider asked us to rest a key, read from its response headers, plus the formats we
//! send back in our own rate-limit headers. Integer arithmetic only, so "0.1s" is exactly 100 ms.

/// Longest rest any signal can impose: a provider (or a garbled header) asking for more is capped.
pub const MAX_COOLDOWN_MS: u64 = 30 * 24 * 3_600_000;

const NS_PER_MS: u128 = 1_000_000;
const NS_PER_S: u128 = 1_000_000_000;
const MS_PER_DAY: i64 = 86_400_000;
/// 9999-12-31T23:59:59.999Z: the last instant a 4-digit year can name.
const MAX_FORMAT_MS: u64 = 253_402_300_799_999;

const OPENAI: [(&str, &str); 2] = [
    (
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
];
const ANTHROPIC: [(&str, &str); 4] = [
    (
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
    ),
    (
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
    ),
    (
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-reset",
    ),
    (
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-reset",
    ),
];

/// Response headers of an upstream answer, lowercased names. Returns how many milliseconds from
/// `now_ms` (unix epoch ms) the key should rest, from the first signal that parses, in this order:
/// `retry-after-ms`, `retry-after` (delta seconds or HTTP date), OpenAI's `x-ratelimit-reset-*`
/// (longest of the exhausted ones; longest of all when no `x-ratelimit-remaining-*` is sent),
/// Anthropic's `anthropic-ratelimit-*-reset` (the latest of the exhausted ones: the key cannot serve
/// until every exhausted budget is back; with none marked exhausted, the latest reset).
/// Past dates give Some(0); everything is capped at [`MAX_COOLDOWN_MS`].
pub fn cooldown_ms<'a>(
    headers: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    now_ms: u64,
) -> Option<u64> {
    let get = |name: &str| {
        headers
            .clone()
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    };
    let exhausted = |name: &str| {
        get(name)
            .and_then(|v| v.parse::<i64>().ok())
            .map(|r| r <= 0)
    };

    let retry_after_ms = || {
        get("retry-after-ms")
            .and_then(|v| decimal_ns(v, NS_PER_MS))
            .map(ns_to_ms_ceil)
    };
    let retry_after = || {
        let v = get("retry-after")?;
        decimal_ns(v, NS_PER_S)
            .map(ns_to_ms_ceil)
            .or_else(|| Some(parse_http_date_ms(v)?.saturating_sub(now_ms)))
    };
    let openai = || {
        let (mut any_remaining, mut longest, mut longest_exhausted) = (false, None, None);
        for (remaining, reset) in OPENAI {
            let state = exhausted(remaining);
            any_remaining |= state.is_some();
            let Some(wait) = get(reset).and_then(parse_go_duration_ms) else {
                continue;
            };
            longest = longest.max(Some(wait));
            if state == Some(true) {
                longest_exhausted = longest_exhausted.max(Some(wait));
            }
        }
        if any_remaining {
            longest_exhausted
        } else {
            longest
        }
    };
    let anthropic = || {
        let (mut latest, mut latest_exhausted) = (None, None::<u64>);
        for (remaining, reset) in ANTHROPIC {
            let Some(at) = get(reset).and_then(parse_rfc3339_ms) else {
                continue;
            };
            let wait = at.saturating_sub(now_ms);
            latest = latest.max(Some(wait));
            if exhausted(remaining) == Some(true) {
                latest_exhausted = latest_exhausted.max(Some(wait));
            }
        }
        latest_exhausted.or(latest)
    };

    retry_after_ms()
        .or_else(retry_after)
        .or_else(openai)
        .or_else(anthropic)
        .map(|ms| ms.min(MAX_COOLDOWN_MS))
}

/// The wait an answer asks for in `retry-after-ms` or `retry-after` only, as [`cooldown_ms`] reads
/// them. For a 5xx: the rate-limit reset headers some providers send on every answer say when a
/// budget refills, not when the provider is back.
pub fn retry_after_ms<'a>(
    headers: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    now_ms: u64,
) -> Option<u64> {
    let asks = headers.filter(|(k, _)| {
        let k = k.trim();
        k.eq_ignore_ascii_case("retry-after-ms") || k.eq_ignore_ascii_case("retry-after")
    });
    cooldown_ms(asks, now_ms)
}

/// OpenAI's Go-style durations: "6m0s", "1.5s", "20ms", "1h2m3.5s", "0s" (also "0", "us", "ns").
/// No days, no signs, no inner spaces. Rounded up to whole ms, capped at [`MAX_COOLDOWN_MS`].
pub fn parse_go_duration_ms(s: &str) -> Option<u64> {
    let mut rest = s.trim();
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let is_num = |c: char| c.is_ascii_digit() || c == '.';
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let (num, tail) = rest.split_at(rest.find(|c| !is_num(c)).unwrap_or(rest.len()));
        let (unit, tail) = tail.split_at(tail.find(is_num).unwrap_or(tail.len()));
        let unit_ns = match unit {
            "h" => 3600 * NS_PER_S,
            "m" => 60 * NS_PER_S,
            "s" => NS_PER_S,
            "ms" => NS_PER_MS,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            _ => return None,
        };
        total = total.saturating_add(decimal_ns(num, unit_ns)?);
        rest = tail;
    }
    Some(ns_to_ms_ceil(total).min(MAX_COOLDOWN_MS))
}

/// HTTP-date in any of RFC 9110's three forms, to unix ms:
/// IMF-fixdate "Sun, 06 Nov 1994 08:49:37 GMT", RFC 850 "Sunday, 06-Nov-94 08:49:37 GMT",
/// asctime "Sun Nov  6 08:49:37 1994". Case and spacing are lenient; the weekday is optional and
/// not checked against the date. Two-digit years are 1970..2069. Dates before 1970 give 0.
pub fn parse_http_date_ms(s: &str) -> Option<u64> {
    let mut t = s
        .split(|c: char| c.is_whitespace() || c == ',' || c == '-')
        .filter(|t| !t.is_empty())
        .peekable();
    if t.peek().is_some_and(|w| is_weekday(w)) {
        t.next();
    }
    let first = t.next()?;
    let (day, mon, year, time, zone) = match month(first) {
        Some(mon) => {
            let (day, time, year) = (t.next()?, t.next()?, t.next()?);
            (day, mon, year, time, t.next())
        }
        None => {
            let (mon, year, time) = (month(t.next()?)?, t.next()?, t.next()?);
            (first, mon, year, time, Some(t.next()?))
        }
    };
    if t.next().is_some()
        || !zone.is_none_or(|z| {
            ["gmt", "utc", "ut", "z", "+0000"]
                .iter()
                .any(|g| z.eq_ignore_ascii_case(g))
        })
    {
        return None;
    }
    let year = match (digits(year)?, year.len()) {
        (y, 2) if y < 70 => 2000 + y,
        (y, 2) => 1900 + y,
        (y, 4) => y,
        _ => return None,
    };
    let day = if day.len() <= 2 {
        digits(day)?
    } else {
        return None;
    };
    let mut hms = time.split(':');
    let mut field = || hms.next().filter(|f| f.len() <= 2).and_then(digits);
    let (h, m, sec) = (field()?, field()?, field()?);
    if hms.next().is_some() {
        return None;
    }
    to_unix_ms(civil_ms(year, mon, day, h, m, sec)?)
}

/// RFC 3339 to unix ms: "2024-08-01T12:00:30Z", "2024-08-01t12:00:30.123+02:00", "... 12:00:30-0530".
/// Fractions beyond ms are truncated. Dates before 1970 give 0.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.trim().as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let d = b.get(from..from.checked_add(len)?)?;
        d.iter()
            .all(u8::is_ascii_digit)
            .then(|| d.iter().fold(0, |a, c| a * 10 + u32::from(c - b'0')))
    };
    let seps = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if seps.iter().any(|&(i, c)| b.get(i) != Some(&c))
        || !matches!(b.get(10), Some(b'T' | b't' | b' '))
    {
        return None;
    }
    let base = civil_ms(
        num(0, 4)?,
        num(5, 2)?,
        num(8, 2)?,
        num(11, 2)?,
        num(14, 2)?,
        num(17, 2)?,
    )?;
    let mut i = 19;
    let mut frac_ms = 0;
    if b.get(i) == Some(&b'.') {
        let len = b
            .get(i + 1..)?
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if len == 0 {
            return None;
        }
        // First three fraction digits are the ms, padded on the right: ".5" is 500.
        frac_ms = (0..3).fold(0, |acc, k| {
            acc * 10
                + if k < len {
                    num(i + 1 + k, 1).unwrap_or(0)
                } else {
                    0
                }
        });
        i += 1 + len;
    }
    let offset_min = match b.get(i..)? {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let (h, m) = match rest {
                [_, _, b':', _, _] => (num(i + 1, 2)?, num(i + 4, 2)?),
                [_, _, _, _] => (num(i + 1, 2)?, num(i + 3, 2)?),
                _ => return None,
            };
            if h > 23 || m > 59 {
                return None;
            }
            let off = i64::from(h * 60 + m);
            if *sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    to_unix_ms(base + i64::from(frac_ms) - offset_min * 60_000)
}

/// Go's `Duration.String()` at ms resolution, as OpenAI's x-ratelimit-reset-* headers use it:
/// "0s", "20ms", "1.5s", "6m0s", "1h2m3s".
pub fn format_go_duration(ms: u64) -> String {
    let mut out = String::with_capacity(12);
    let mut digits = itoa::Buffer::new();
    if ms < 1000 {
        if ms == 0 {
            out.push_str("0s");
        } else {
            out.push_str(digits.format(ms));
            out.push_str("ms");
        }
        return out;
    }
    let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    if h > 0 {
        out.push_str(digits.format(h));
        out.push('h');
    }
    if h > 0 || m > 0 {
        out.push_str(digits.format(m));
        out.push('m');
    }
    out.push_str(digits.format(s));
    if frac > 0 {
        // Milliseconds as a decimal fraction of the second, without trailing zeros (".5", ".25").
        out.push('.');
        push_zero_padded(&mut out, frac, 3);
        while out.ends_with('0') {
            out.pop();
        }
    }
    out.push('s');
    out
}

/// `n` in decimal, left-padded with zeros to `width` digits.
fn push_zero_padded(out: &mut String, n: u64, width: usize) {
    let mut digits = itoa::Buffer::new();
    let text = digits.format(n);
    out.extend(core::iter::repeat_n('0', width.saturating_sub(text.len())));
    out.push_str(text);
}

/// RFC 3339 UTC, whole seconds: "2024-08-01T12:00:30Z". Clamped to year 9999.
pub fn format_rfc3339(ms: u64) -> String {
    let ms = ms.min(MAX_FORMAT_MS);
    let (days, in_day) = (ms / 86_400_000, ms % 86_400_000 / 1000);
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    let mut out = String::with_capacity(20);
    // Years from 1970 on (a u64 of ms): never negative.
    push_zero_padded(&mut out, u64::try_from(y).unwrap_or(0), 4);
    for (sep, n, width) in [
        ('-', u64::from(m), 2),
        ('-', u64::from(d), 2),
        ('T', in_day / 3600, 2),
        (':', in_day / 60 % 60, 2),
        (':', in_day % 60, 2),
    ] {
        out.push(sep);
        push_zero_padded(&mut out, n, width);
    }
    out.push('Z');
    out
}

/// Plain non-negative decimal ("12", "1.5", ".5") times `unit_ns`, exact, saturating.
/// Signs, exponents, "inf" and the like are rejected so garbage falls through to the next signal.
fn decimal_ns(s: &str, unit_ns: u128) -> Option<u128> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let whole = int.bytes().fold(0u128, |a, b| {
        a.saturating_mul(10).saturating_add(u128::from(b - b'0'))
    });
    // Digits past the ninth are below a nanosecond of an hour's precision that matters here.
    let frac = frac.get(..9).unwrap_or(frac);
    let (f, scale) = frac.bytes().fold((0u128, 1u128), |(a, s), b| {
        (a * 10 + u128::from(b - b'0'), s * 10)
    });
    Some(
        whole
            .saturating_mul(unit_ns)
            .saturating_add(f * unit_ns / scale),
    )
}

fn ns_to_ms_ceil(ns: u128) -> u64 {
    u64::try_from(ns.div_ceil(NS_PER_MS)).unwrap_or(u64::MAX)
}

fn to_unix_ms(ms: i64) -> Option<u64> {
    u64::try_from(ms.max(0)).ok()
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn is_weekday(w: &str) -> bool {
    const DAYS: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    DAYS.iter()
        .any(|d| w.eq_ignore_ascii_case(d) || d.get(..3).is_some_and(|a| w.eq_ignore_ascii_case(a)))
}

fn month(m: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    (1..)
        .zip(MONTHS)
        .find(|(_, name)| m.eq_ignore_ascii_case(name))
        .map(|(n, _)| n)
}

/// Validated civil UTC date-time to (possibly negative) unix ms. Years are 0..=9999, so nothing overflows.
fn civil_ms(y: u32, m: u32, d: u32, h: u32, min: u32, s: u32) -> Option<i64> {
    let leap = y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400));
    let month_len = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    // s == 60 admits a leap second, which unix time folds into the next second.
    if y > 9999 || d == 0 || d > month_len || h > 23 || min > 59 || s > 60 {
        return None;
    }
    let secs = i64::from(h * 3600 + min * 60 + s);
    Some(days_from_civil(i64::from(y), m, d) * MS_PER_DAY + secs * 1000)
}

/// Howard Hinnant's days_from_civil: days since 1970-01-01 in the proleptic Gregorian calendar.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = i64::from((153 * ((m + 9) % 12) + 2) / 5 + d - 1);
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_722_513_630_000; // 2024-08-01T12:00:30Z

    fn cd(h: &[(&str, &str)], now: u64) -> Option<u64> {
        cooldown_ms(h.iter().copied(), now)
    }

    #[test]
    fn go_durations() {
        let ok = [
            ("0s", 0),
            ("0", 0),
            ("20ms", 20),
            ("1.5s", 1500),
            ("0.1s", 100),
            ("6m0s", 360_000),
            ("1h2m3.5s", 3_723_500),
            (" 59.999s ", 59_999),
            ("1.0001s", 1001), // rounded up: never rest shorter than asked
            ("1500us", 2),
            ("1µs", 1),
            ("7ns", 1),
            ("2m", 120_000),
            (".5s", 500),
            ("720h1s", MAX_COOLDOWN_MS),
            ("99999999999999999999999999999h", MAX_COOLDOWN_MS),
        ];
        for (s, want) in ok {
            assert_eq!(parse_go_duration_ms(s), Some(want), "{s:?}");
        }
        for s in [
            "", "s", "5", "2d", "-1s", "+1s", "1.2.3s", "6m 0s", "1e3s", "abc", "1sx", ".s", "1S",
        ] {
            assert_eq!(parse_go_duration_ms(s), None, "{s:?}");
        }
    }

    #[test]
    fn go_duration_format() {
        let cases = [
            (0, "0s"),
            (20, "20ms"),
            (999, "999ms"),
            (1000, "1s"),
            (1500, "1.5s"),
            (1020, "1.02s"),
            (59_999, "59.999s"),
            (360_000, "6m0s"),
            (90_500, "1m30.5s"),
            (3_600_000, "1h0m0s"),
            (3_723_000, "1h2m3s"),
        ];
        for (ms, want) in cases {
            assert_eq!(format_go_duration(ms), want);
            assert_eq!(parse_go_duration_ms(want), Some(ms), "round trip {want}");
        }
    }

    #[test]
    fn http_dates_all_three_forms() {
        let want = Some(784_111_777_000); // 1994-11-06T08:49:37Z
        for s in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "sun, 06 nov 1994 08:49:37 gmt",
            "  Sun,06 NOV 1994   08:49:37  GMT ",
            "06 Nov 1994 08:49:37 UTC",
            "Mon, 06 Nov 1994 08:49:37 GMT", // wrong weekday is ignored
        ] {
            assert_eq!(parse_http_date_ms(s), want, "{s:?}");
        }
        assert_eq!(
            parse_http_date_ms("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(1_445_412_480_000)
        );
        assert_eq!(
            parse_http_date_ms("Thursday, 01-Jan-70 00:00:00 GMT"),
            Some(0)
        );
        assert_eq!(
            parse_http_date_ms("Tue, 29 Feb 2000 00:00:00 GMT"),
            Some(951_782_400_000)
        );
        assert_eq!(parse_http_date_ms("Sat, 01 Jan 1960 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date_ms("Fri, 31 Dec 9999 23:59:59 GMT"),
            Some(253_402_300_799_000)
        );
        for s in [
            "",
            "Sun, 06 Nov 1994 08:49:37", // IMF without zone
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 06 Nov 1994 08:49:37 GMT x",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 29 Feb 1900 08:49:37 GMT", // 1900 is not a leap year
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:49 GMT",
            "Sun, 06 Nov 1994 08:49:37:1 GMT",
            "Sun, 06 Nov 19940 08:49:37 GMT", // year > 9999
            "Sun, 06 Nov 994 08:49:37 GMT",
            "Sun, 06 Nov 1994 +8:49:37 GMT",
            "120",
        ] {
            assert_eq!(parse_http_date_ms(s), None, "{s:?}");
        }
    }

    #[test]
    fn rfc3339() {
        let cases = [
            ("2024-08-01T12:00:30Z", T0),
            ("2024-08-01t12:00:30z", T0),
            ("2024-08-01 12:00:30Z", T0),
            (" 2024-08-01T12:00:30.5Z ", T0 + 500),
            ("2024-08-01T12:00:30.123456789Z", T0 + 123),
            ("2024-08-01T14:00:30+02:00", T0),
            ("2024-08-01T06:30:30-05:30", T0),
            ("2024-08-01T06:30:30.25-0530", T0 + 250),
            ("1970-01-01T00:00:00Z", 0),
            ("1969-12-31T23:59:59Z", 0),
            ("1970-01-01T00:30:00+01:00", 0),
            ("2016-12-31T23:59:60Z", 1_483_228_800_000),
        ];
        for (s, want) in cases {
            assert_eq!(parse_rfc3339_ms(s), Some(want), "{s:?}");
        }
        for s in [
            "",
            "2024-08-01",
            "2024-08-01T12:00:30",
            "2024-08-01T12:00:30.Z",
            "2024-13-01T12:00:30Z",
            "2024-02-30T12:00:30Z",
            "2024-08-01T12:60:30Z",
            "2024-08-01T12:00:30+24:00",
            "2024-08-01T12:00:30+2:00",
            "2024-08-01T12:00:30ZZ",
            "2024/08/01T12:00:30Z",
            "+024-08-01T12:00:30Z",
            "2024-08-01T12:00:30é",
            "Wed, 21 Oct 2015 07:28:00 GMT",
        ] {
            assert_eq!(parse_rfc3339_ms(s), None, "{s:?}");
        }
    }

    #[test]
    fn truncated_inputs_are_rejected_not_panics() {
        let prefixes = |s: &'static str| {
            (0..s.len())
                .filter(move |&i| s.is_char_boundary(i))
                .map(move |i| &s[..i])
        };
        for p in prefixes("2024-08-01T12:00:30.123+02:00") {
            assert_eq!(parse_rfc3339_ms(p), None, "{p:?}");
        }
        for p in prefixes("Sun, 06 Nov 1994 08:49:37 GMT")
            .chain(prefixes("Sunday, 06-Nov-94 08:49:37 GMT"))
        {
            assert_eq!(parse_http_date_ms(p), None, "{p:?}");
        }
        for p in prefixes("1h2m3.5µs") {
            let want = match p {
                "1h" => Some(3_600_000),
                "1h2m" => Some(3_720_000),
                _ => None,
            };
            assert_eq!(parse_go_duration_ms(p), want, "{p:?}");
        }
    }

    #[test]
    fn rfc3339_format_and_calendar_round_trip() {
        assert_eq!(format_rfc3339(T0 + 999), "2024-08-01T12:00:30Z");
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
        // Every day 1970..~2300 survives format -> parse, which pins both civil conversions.
        for day in (0..120_000u64)
            .step_by(7)
            .chain([59, 60, 365, 10_957, 11_016])
        {
            let ms = day * 86_400_000 + 45_296_000; // 12:34:56
            let s = format_rfc3339(ms);
            assert_eq!(parse_rfc3339_ms(&s), Some(ms), "{s}");
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(cd(&[("retry-after-ms", "1500.2")], T0), Some(1501));
        assert_eq!(cd(&[("retry-after", "20")], T0), Some(20_000));
        assert_eq!(cd(&[("retry-after", " 0.25 ")], T0), Some(250));
        assert_eq!(cd(&[("Retry-After", "3")], T0), Some(3000)); // caller forgot to lowercase
        assert_eq!(
            cd(&[("retry-after", "Thu, 01 Aug 2024 12:01:00 GMT")], T0),
            Some(30_000)
        );
        assert_eq!(
            cd(&[("retry-after", "Thu, 01 Aug 2024 11:00:00 GMT")], T0),
            Some(0)
        );
        assert_eq!(
            cd(&[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")], T0),
            Some(MAX_COOLDOWN_MS)
        );
        assert_eq!(
            cd(&[("retry-after", "99999999999999999999999")], T0),
            Some(MAX_COOLDOWN_MS)
        );
        for bad in ["-5", "soon", "inf", "NaN", "1e3", "", "+3"] {
            assert_eq!(
                cd(&[("retry-after", bad), ("retry-after-ms", bad)], T0),
                None,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn priority_and_fall_through() {
        let all = [
            ("x-ratelimit-reset-requests", "7s"),
            ("anthropic-ratelimit-requests-reset", "2024-08-01T12:00:39Z"),
            ("retry-after", "5"),
            ("retry-after-ms", "1200"),
        ];
        assert_eq!(cd(&all, T0), Some(1200));
        assert_eq!(cd(&all[..3], T0), Some(5000));
        assert_eq!(cd(&all[..2], T0), Some(7000));
        assert_eq!(cd(&all[..1], T0), Some(7000));
        assert_eq!(cd(&all[1..2], T0), Some(9000));
        // Garbage at a higher rank is skipped, not fatal.
        let garbled = [
            ("retry-after-ms", "-1"),
            ("retry-after", "later"),
            ("x-ratelimit-reset-tokens", "2d"),
            all[1],
        ];
        assert_eq!(cd(&garbled, T0), Some(9000));
        assert_eq!(cd(&[("content-type", "application/json")], T0), None);
        assert_eq!(cd(&[], T0), None);
    }

    #[test]
    fn a_server_errors_wait_is_its_retry_after_only() {
        let ra = |h: &[(&'static str, &'static str)]| retry_after_ms(h.iter().copied(), T0);
        let resets = [
            ("x-ratelimit-reset-requests", "7s"),
            ("anthropic-ratelimit-requests-reset", "2024-08-01T12:00:39Z"),
        ];
        assert_eq!(ra(&resets), None, "budget resets are no outage's end");
        let with = [resets[0], resets[1], (" Retry-After", "5")];
        assert_eq!(ra(&with), Some(5000));
        assert_eq!(
            ra(&[("retry-after-ms", "300"), ("retry-after", "5")]),
            Some(300)
        );
        assert_eq!(ra(&[("retry-after", "soon")]), None);
    }

    #[test]
    fn openai_exhausted_limits() {
        let h = |rr: &'static str, rt: &'static str| {
            vec![
                ("x-ratelimit-remaining-requests", rr),
                ("x-ratelimit-reset-requests", "1s"),
                ("x-ratelimit-remaining-tokens", rt),
                ("x-ratelimit-reset-tokens", "6m0s"),
            ]
        };
        assert_eq!(cd(&h("0", "5000"), T0), Some(1000));
        assert_eq!(cd(&h("12", "0"), T0), Some(360_000));
        assert_eq!(cd(&h("0", "0"), T0), Some(360_000));
        // Remaining counts are sent but nothing is exhausted: no signal here.
        assert_eq!(cd(&h("12", "5000"), T0), None);
        // No remaining headers at all: the longest reset.
        let resets = [
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "20ms"),
        ];
        assert_eq!(cd(&resets, T0), Some(1000));
    }

    #[test]
    fn anthropic_exhausted_limits() {
        let h = |req: &'static str, inp: &'static str| {
            vec![
                ("anthropic-ratelimit-requests-remaining", req),
                ("anthropic-ratelimit-requests-reset", "2024-08-01T12:01:30Z"),
                ("anthropic-ratelimit-input-tokens-remaining", inp),
                (
                    "anthropic-ratelimit-input-tokens-reset",
                    "2024-08-01T12:00:40.5Z",
                ),
                ("anthropic-ratelimit-output-tokens-remaining", "100"),
                (
                    "anthropic-ratelimit-output-tokens-reset",
                    "2024-08-01T14:00:30+02:00",
                ),
            ]
        };
        assert_eq!(cd(&h("0", "900"), T0), Some(60_000));
        assert_eq!(cd(&h("3", "0"), T0), Some(10_500));
        assert_eq!(cd(&h("0", "0"), T0), Some(60_000)); // the latest of the exhausted
        assert_eq!(cd(&h("3", "900"), T0), Some(60_000)); // none exhausted: the latest
        assert_eq!(cd(&h("0", "0"), T0 + 3_600_000), Some(0)); // resets already passed
        let bad = [
            ("anthropic-ratelimit-tokens-reset", "2024-08-01T12:00:30"),
            ("anthropic-ratelimit-tokens-remaining", "0"),
        ];
        assert_eq!(cd(&bad, T0), None);
    }
}
