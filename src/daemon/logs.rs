//! Per-module log files: the daemon's own log (`<state>/log/<m>.log`: state changes,
//! decisions, checker failures) and the helpers the scripts' user log shares with it
//! (timestamps, rotation, reading the last lines).
//!
//! Writes are plain appends (`O_APPEND`), so lines from several writers never interleave
//! inside a line. A write error is reported through `tracing` and otherwise ignored: a full
//! disk must not stop a module.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::module::LogLevel;
use crate::paths::Paths;

/// A log file is moved to `<file>.1` (replacing the previous one) once it grows past this.
pub const LOG_ROTATE_BYTES: u64 = 10 * 1024 * 1024;
/// [`tail`] reads the file backwards in blocks of this size.
const TAIL_BLOCK_BYTES: u64 = 64 * 1024;

/// The daemon's log of one module.
#[derive(Debug)]
pub struct ModuleLog {
    path: PathBuf,
    /// Serialises rotation with writes from the tasks of one module.
    lock: Mutex<()>,
}

impl ModuleLog {
    /// The log of `module`: `paths.module_log(module)`.
    pub fn new(paths: &Paths, module: &str) -> ModuleLog {
        ModuleLog::at(paths.module_log(module))
    }

    /// A log written to `path` (its directory is created at the first write).
    pub fn at(path: PathBuf) -> ModuleLog {
        ModuleLog { path, lock: Mutex::new(()) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `text` here and to the daemon's own log (tracing), tagged with `module`.
    pub fn say(&self, module: &str, level: LogLevel, text: &str) {
        self.line(level, text);
        match level {
            LogLevel::Info => tracing::info!(module, "{text}"),
            LogLevel::Warn => tracing::warn!(module, "{text}"),
            LogLevel::Error => tracing::error!(module, "{text}"),
        }
    }

    /// Appends `<rfc3339 UTC time> <LEVEL> <text>`; a newline inside `text` is kept on one
    /// line (shown as `\n`) so that every log line starts with a time.
    pub fn line(&self, level: LogLevel, text: &str) {
        let text = text.trim_end().replace('\n', "\\n");
        let line = format!("{} {} {}\n", rfc3339_now(), level_name(level), text);
        let _guard = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(e) = rotate_if_large(&self.path).and_then(|()| append(&self.path, &line)) {
            tracing::warn!("cannot write to {}: {e}", self.path.display());
        }
    }
}

/// The word written for `level`.
pub fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Info => "INFO",
        LogLevel::Warn => "WARN",
        LogLevel::Error => "ERROR",
    }
}

/// Opens `path` for appending, creating it (mode 0640) and its directory if needed.
pub fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

/// Appends `text` to `path` in one write.
pub fn append(path: &Path, text: &str) -> io::Result<()> {
    open_append(path)?.write_all(text.as_bytes())
}

/// Moves `path` to `<path>.1` when it is larger than [`LOG_ROTATE_BYTES`]. A missing file is
/// not an error.
pub fn rotate_if_large(path: &Path) -> io::Result<()> {
    match fs::metadata(path) {
        Ok(m) if m.len() > LOG_ROTATE_BYTES => {
            let mut old = path.as_os_str().to_owned();
            old.push(".1");
            fs::rename(path, PathBuf::from(old))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The last `n` lines of `path`, oldest first, without their newline. Reads backwards from
/// the end, so a large file costs only what is returned. Bytes that are not UTF-8 are
/// replaced. A missing file is an error (`NotFound`).
pub fn tail(path: &Path, n: usize) -> io::Result<Vec<String>> {
    let mut file = File::open(path)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let len = file.metadata()?.len();
    let mut start = len;
    // `buf` holds the bytes from `start` to the end of the file.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // A final newline ends the last line; it does not start a new one.
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let newlines = body.iter().filter(|&&b| b == b'\n').count();
        if newlines >= n || start == 0 {
            break;
        }
        let block = TAIL_BLOCK_BYTES.min(start);
        start -= block;
        file.seek(SeekFrom::Start(start))?;
        let mut chunk = vec![0u8; block as usize];
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
    }
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
    let mut lines: Vec<String> = body
        .split(|&b| b == b'\n')
        .map(|l| String::from_utf8_lossy(l.strip_suffix(b"\r").unwrap_or(l)).into_owned())
        .collect();
    if lines.len() > n {
        lines.drain(..lines.len() - n);
    }
    Ok(lines)
}

/// The current time as RFC 3339 UTC with milliseconds: `2024-05-01T12:34:56.789Z`.
pub fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

/// `t` as RFC 3339 UTC with milliseconds. Times before 1970 print as the epoch.
pub fn rfc3339(t: SystemTime) -> String {
    let u = UtcTime::of(t);
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", u.year, u.month, u.day, u.hour, u.minute, u.second, u.millis)
}

/// A time broken down in UTC (proleptic Gregorian calendar), for names and log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub millis: u32,
}

impl UtcTime {
    /// `t` in UTC; times before 1970 are taken as the epoch.
    pub fn of(t: SystemTime) -> UtcTime {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let rem = (secs % 86_400) as u32;
        let (year, month, day) = civil_from_days((secs / 86_400) as i64);
        UtcTime {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: (rem % 3600) / 60,
            second: rem % 60,
            millis: since.subsec_millis(),
        }
    }
}

/// (year, month, day) of the day `z` days after 1970-01-01, in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    // The civil calendar conversion matches known dates, leap days included.
    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_714_566_896); // 2024-05-01T12:34:56Z
        assert_eq!(rfc3339(t), "2024-05-01T12:34:56.000Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_799); // 2099-12-31T23:59:59Z
        assert_eq!(rfc3339(t), "2099-12-31T23:59:59.000Z");
    }

    // tail returns the last lines across block boundaries, with or without a final newline.
    #[test]
    fn tail_reads_last_lines_across_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        let mut text = String::new();
        for i in 0..20_000 {
            text.push_str(&format!("line {i}\n"));
        }
        fs::write(&p, &text).unwrap();
        assert_eq!(tail(&p, 2).unwrap(), vec!["line 19998", "line 19999"]);
        let many = tail(&p, 15_000).unwrap();
        assert_eq!(many.len(), 15_000);
        assert_eq!(many[0], "line 5000");
        assert_eq!(tail(&p, 50_000).unwrap().len(), 20_000);
        fs::write(&p, "a\nb").unwrap();
        assert_eq!(tail(&p, 5).unwrap(), vec!["a", "b"]);
        fs::write(&p, "").unwrap();
        assert!(tail(&p, 5).unwrap().is_empty());
        fs::write(&p, "\n").unwrap();
        assert_eq!(tail(&p, 5).unwrap(), vec![""]);
        assert_eq!(tail(&p, 0).unwrap(), Vec::<String>::new());
        assert_eq!(tail(&dir.path().join("none"), 3).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    // A module log line carries the time and the level, and the file rotates past the limit.
    #[test]
    fn module_log_writes_lines_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path().join("home"), dir.path().join("state"));
        let log = ModuleLog::new(&paths, "web01");
        log.line(LogLevel::Warn, "checker http failed\nsecond line");
        let lines = tail(log.path(), 10).unwrap();
        assert_eq!(lines.len(), 1);
        assert!(lines[0].ends_with(" WARN checker http failed\\nsecond line"), "{}", lines[0]);
        assert!(lines[0].as_bytes()[4] == b'-' && lines[0].contains('T'));

        let big = vec![b'x'; (LOG_ROTATE_BYTES + 1) as usize];
        fs::write(log.path(), big).unwrap();
        log.line(LogLevel::Info, "after rotation");
        assert_eq!(tail(log.path(), 10).unwrap().len(), 1);
        let rotated = paths.module_log("web01").with_extension("log.1");
        assert_eq!(fs::metadata(rotated).unwrap().len(), LOG_ROTATE_BYTES + 1);
    }
}
