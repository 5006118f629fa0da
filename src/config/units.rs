//! Durations (`700ms`, `30s`, `5m`, `24h`) and sizes (`4096`, `64KiB`, `1MiB`, `2GiB`).

use std::time::Duration;

/// What a duration looks like, as shown in error messages.
pub const DURATION_EXPECTED: &str = "a duration with a unit (ms, s, m, h)";
/// What a size looks like, as shown in error messages.
pub const SIZE_EXPECTED: &str = "a size in bytes or with a unit (KiB, MiB, GiB)";
/// The longest duration accepted: one year (8760h). Longer values are refused so that no later
/// `Instant + duration` can overflow.
pub const DURATION_MAX: Duration = Duration::from_secs(8760 * 3600);

/// Why a duration or size was refused: the phrase for "expected", an optional corrected value
/// and an optional explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnitError {
    pub expected: &'static str,
    pub suggestion: Option<String>,
    pub note: Option<String>,
}

impl UnitError {
    fn plain(expected: &'static str) -> UnitError {
        UnitError { expected, suggestion: None, note: None }
    }
    fn note(expected: &'static str, note: impl Into<String>) -> UnitError {
        UnitError { expected, suggestion: None, note: Some(note.into()) }
    }
    fn suggest(expected: &'static str, suggestion: String) -> UnitError {
        UnitError { expected, suggestion: Some(suggestion), note: None }
    }
    /// `expected X, found "v" (did you mean "w"?) (note)`
    pub(crate) fn message(&self, found: &str) -> String {
        let mut s = format!("expected {}, found \"{found}\"", self.expected);
        if let Some(sugg) = &self.suggestion {
            s.push_str(&format!(" (did you mean \"{sugg}\"?)"));
        }
        if let Some(note) = &self.note {
            s.push_str(&format!(" ({note})"));
        }
        s
    }
}

/// Splits `" 30 s "` into `("30", "s")`: leading ASCII digits, then the rest with the
/// whitespace between number and unit removed.
fn split_number(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    (num, unit.trim_start())
}

/// Common sanity checks shared by durations and sizes; returns the number and the unit.
fn number_and_unit(s: &str, expected: &'static str) -> Result<(u64, String), UnitError> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(UnitError::note(expected, "negative values are not allowed"));
    }
    let (num, unit) = split_number(t);
    if num.is_empty() {
        return Err(UnitError::plain(expected));
    }
    if unit.starts_with('.') || unit.starts_with(',') {
        return Err(UnitError::note(expected, "use a whole number, with a smaller unit if needed"));
    }
    let n: u64 = num.parse().map_err(|_| UnitError::note(expected, "the value is too large"))?;
    Ok((n, unit.to_string()))
}

pub(crate) fn duration(s: &str) -> Result<Duration, UnitError> {
    let e = DURATION_EXPECTED;
    let (n, unit) = number_and_unit(s, e)?;
    let factor: u64 = match unit.as_str() {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(UnitError::plain(e)),
        other => {
            let sugg = match other.to_ascii_lowercase().as_str() {
                "ms" | "msec" | "msecs" | "millis" | "millisecond" | "milliseconds" => Some(format!("{n}ms")),
                "s" | "sec" | "secs" | "second" | "seconds" => Some(format!("{n}s")),
                "min" | "mins" | "minute" | "minutes" => Some(format!("{n}m")),
                "h" | "hr" | "hrs" | "hour" | "hours" => Some(format!("{n}h")),
                "d" | "day" | "days" => n.checked_mul(24).map(|h| format!("{h}h")),
                _ => None,
            };
            return Err(match sugg {
                Some(sugg) => UnitError::suggest(e, sugg),
                None => UnitError::note(e, format!("unknown unit \"{other}\"")),
            });
        }
    };
    let ms = n
        .checked_mul(factor)
        .filter(|ms| u128::from(*ms) <= DURATION_MAX.as_millis())
        .ok_or_else(|| UnitError::note(e, "the longest accepted duration is 8760h"))?;
    Ok(Duration::from_millis(ms))
}

pub(crate) fn size(s: &str) -> Result<u64, UnitError> {
    let e = SIZE_EXPECTED;
    let (n, unit) = number_and_unit(s, e)?;
    let factor: u64 = match unit.as_str() {
        "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            let fixed = match other.to_ascii_lowercase().as_str() {
                "b" | "byte" | "bytes" => Some(""),
                "k" | "kb" | "kib" => Some("KiB"),
                "m" | "mb" | "mib" => Some("MiB"),
                "g" | "gb" | "gib" => Some("GiB"),
                _ => None,
            };
            return Err(match fixed {
                Some(u) => UnitError::suggest(e, format!("{n}{u}")),
                None => UnitError::note(e, format!("unknown unit \"{other}\"")),
            });
        }
    };
    n.checked_mul(factor).ok_or_else(|| UnitError::note(e, "the value is too large"))
}

/// Parses a duration with a unit: `700ms`, `30s`, `5m`, `24h` (a whole number; at most 8760h).
/// Plain numbers, negative values, fractions and unknown units are refused; the error is
/// `expected a duration with a unit (ms, s, m, h), found "..."`, with a suggestion when the
/// unit is recognisable (`30sec` → `30s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    duration(s).map_err(|e| e.message(s))
}

/// Parses a size: plain bytes (`4096`) or `KiB`, `MiB`, `GiB` (binary units). Decimal units
/// are refused with a suggestion (`1MB` → did you mean `1MiB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    size(s).map_err(|e| e.message(s))
}

/// Formats a duration with the largest unit that represents it exactly: `700ms`, `30s`, `90s`,
/// `5m`, `24h`; `0s` for zero. Whole-millisecond durations round-trip through
/// [`parse_duration`]; finer ones are printed like `1.5ms`.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() % 1_000_000 != 0 {
        return format!("{d:?}");
    }
    let ms = d.as_millis();
    if ms == 0 {
        "0s".to_string()
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Formats a byte count with the largest binary unit that represents it exactly (`1MiB`,
/// `64KiB`, `4097`).
pub fn format_size(n: u64) -> String {
    if n == 0 {
        "0".to_string()
    } else if n % (1 << 30) == 0 {
        format!("{}GiB", n >> 30)
    } else if n % (1 << 20) == 0 {
        format!("{}MiB", n >> 20)
    } else if n % (1 << 10) == 0 {
        format!("{}KiB", n >> 10)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("700ms"), Ok(Duration::from_millis(700)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration(" 30 s "), Ok(Duration::from_secs(30)));
        assert_eq!(
            parse_duration("700"),
            Err("expected a duration with a unit (ms, s, m, h), found \"700\"".to_string())
        );
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(parse_duration("1.5s").unwrap_err().contains("whole number"));
        assert!(parse_duration("99999999999999999999999h").unwrap_err().contains("too large"));
        assert!(parse_duration("9000h").unwrap_err().contains("8760h"));
        assert!(parse_duration("30sec").unwrap_err().contains("did you mean \"30s\""));
        assert!(parse_duration("2d").unwrap_err().contains("did you mean \"48h\""));
        assert!(parse_duration("3w").unwrap_err().contains("unknown unit \"w\""));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("+5s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(
            parse_size("1MB"),
            Err("expected a size in bytes or with a unit (KiB, MiB, GiB), found \"1MB\" \
                 (did you mean \"1MiB\"?)"
                .to_string())
        );
        assert!(parse_size("99999999999GiB").unwrap_err().contains("too large"));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1TiB").is_err());
    }

    #[test]
    fn formatting_round_trips() {
        for ms in [0u64, 1, 700, 1000, 1500, 30_000, 90_000, 300_000, 3_600_000, 86_400_000] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{ms}ms");
        }
        assert_eq!(format_duration(Duration::from_millis(700)), "700ms");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(86400)), "24h");
        assert_eq!(format_size(1 << 20), "1MiB");
        assert_eq!(format_size(4097), "4097");
    }
}
