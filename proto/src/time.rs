//! Timestamps on the wire are RFC 3339 strings (UTC, millisecond precision).
use std::time::{Duration, SystemTime};

pub fn now() -> String {
    format(SystemTime::now())
}

pub fn format(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `t` in milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A time given in milliseconds since the Unix epoch, as RFC 3339.
pub fn format_unix_ms(ms: i64) -> String {
    format(SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
}

/// Parses an RFC 3339 timestamp; None for empty or malformed input.
pub fn parse(s: &str) -> Option<SystemTime> {
    if s.is_empty() {
        return None;
    }
    humantime::parse_rfc3339_weak(s).ok()
}

/// Time elapsed since `s`, zero if `s` is in the future or malformed.
pub fn since(s: &str) -> Duration {
    parse(s).and_then(|t| SystemTime::now().duration_since(t).ok()).unwrap_or_default()
}

/// Short human age, as `kubectl get` prints it: 5s, 3m, 2h, 4d.
pub fn age(s: &str) -> String {
    if parse(s).is_none() {
        return "<unknown>".into();
    }
    let secs = since(s).as_secs();
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}
