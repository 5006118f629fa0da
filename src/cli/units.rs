//! Sizes, durations and rates as the CLI writes them for people.

/// `512 B`, `8 KiB`, `1.2 GiB`: binary units, one decimal below 10.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{} {}", number(value), UNITS[unit])
}

/// `12 MiB/s`.
pub fn rate(bytes_per_second: u64) -> String {
    format!("{}/s", bytes(bytes_per_second))
}

/// `250 ms`, `2.5 s`, `42 s`, `3 min 4 s`, `1 h 2 min`.
pub fn duration_ms(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{} s", number(ms as f64 / 1000.0)),
        60_000..3_600_000 => match (ms / 60_000, ms / 1000 % 60) {
            (m, 0) => format!("{m} min"),
            (m, s) => format!("{m} min {s} s"),
        },
        _ => match (ms / 3_600_000, ms / 60_000 % 60) {
            (h, 0) => format!("{h} h"),
            (h, m) => format!("{h} h {m} min"),
        },
    }
}

/// `1 file`, `3 files`.
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// One decimal below 10 (without a trailing `.0`), none above.
fn number(v: f64) -> String {
    if v < 10.0 {
        let s = format!("{v:.1}");
        s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Sizes keep two significant figures at most, in binary units.
    #[test]
    fn sizes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(8192), "8 KiB");
        assert_eq!(bytes(12 << 20), "12 MiB");
        assert_eq!(bytes((1.2 * (1u64 << 30) as f64) as u64), "1.2 GiB");
        assert_eq!(bytes(u64::MAX), "16 EiB");
        assert_eq!(rate(1536), "1.5 KiB/s");
    }

    // Durations use the largest units that say it in two numbers.
    #[test]
    fn durations() {
        assert_eq!(duration_ms(250), "250 ms");
        assert_eq!(duration_ms(2500), "2.5 s");
        assert_eq!(duration_ms(42_000), "42 s");
        assert_eq!(duration_ms(184_000), "3 min 4 s");
        assert_eq!(duration_ms(120_000), "2 min");
        assert_eq!(duration_ms(3_720_000), "1 h 2 min");
        assert_eq!(duration_ms(7_200_000), "2 h");
        assert_eq!(count(1, "place", "places"), "1 place");
        assert_eq!(count(2, "place", "places"), "2 places");
    }
}
