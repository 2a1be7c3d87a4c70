//! Times as the node prints and reads them: RFC 3339 UTC with microseconds, from and to
//! microseconds since the Unix epoch, with no time-zone database.

/// `2026-11-26T01:02:03.456789Z` from µs since the epoch (UTC, proleptic Gregorian).
pub fn timestamp(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses `--since`: seconds since the epoch, or `YYYY-MM-DD[THH[:MM[:SS]]][Z]` (UTC). Strict:
/// a date that does not exist (February 31), a part that is not a number, or a year outside
/// 1970–9999 is refused rather than guessed.
pub fn parse_since(s: &str) -> Option<i64> {
    let s = s.trim();
    // All digits and not a YYYYMMDD-looking 8: seconds since the epoch.
    if !s.is_empty() && s.len() != 8 && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<i64>().ok()?.checked_mul(1_000_000);
    }
    let s = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = s.split_once('T').unwrap_or((s, "00"));
    let num = |p: &str| -> Option<i64> {
        (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .then(|| p.parse().ok())
            .flatten()
    };
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || t.is_empty() || t.len() > 3 {
        return None;
    }
    let (y, m, day) = (num(d[0])?, num(d[1])?, num(d[2])?);
    let hh = num(t[0])?;
    let mm = t.get(1).map_or(Some(0), |p| num(p))?;
    let ss = t.get(2).map_or(Some(0), |p| num(p))?;
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || hh > 23
        || mm > 59
        || ss > 59
    {
        return None;
    }
    // Days from civil (the inverse of `timestamp`).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let micros = (days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000;
    // February 31 would roll into March: refuse a date that does not come back unchanged.
    (timestamp(micros)[..10] == format!("{y:04}-{m:02}-{day:02}")).then_some(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_and_parse_back() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000000Z");
        let t = parse_since("2026-11-26T01:02:03").unwrap();
        assert_eq!(timestamp(t + 456_789), "2026-11-26T01:02:03.456789Z");
        assert_eq!(parse_since("2024-02-29"), Some(1_709_164_800 * 1_000_000));
        assert_eq!(parse_since("1700000000"), Some(1_700_000_000 * 1_000_000));
        assert_eq!(parse_since("2024-13-01"), None);
        assert_eq!(parse_since("yesterday"), None);
        assert_eq!(parse_since("2024-02-29Z"), parse_since("2024-02-29"));
        assert_eq!(parse_since("2026-02-31"), None);
        assert_eq!(parse_since("2026-01-01T10:xx"), None);
        assert_eq!(parse_since("20260101"), None);
        assert_eq!(parse_since("99999999999999999"), None);
        assert_eq!(
            parse_since("2026-11-26T01"),
            parse_since("2026-11-26T01:00:00")
        );
    }
}
