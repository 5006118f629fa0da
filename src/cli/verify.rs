//! `hamirror verify`: compares both copies of a module's data online.

use super::units::{bytes, count, duration_ms};
use super::{bad_answer, module_path, Ctx, Failure};
use crate::replication::status::{Difference, DifferenceKind, VerifyReport};

/// Byte ranges listed for one file whose content differs; the others are counted.
const RANGES_SHOWN: usize = 8;

/// Exit 0 when both copies are identical; else one line per difference, then a failure.
pub(super) fn verify(ctx: &Ctx, module: &str, json: bool) -> Result<i32, Failure> {
    let mut client = ctx.client();
    // The daemon answers when both copies are read, or gives up after VERIFY_TIMEOUT.
    client.timeout = crate::api::VERIFY_TIMEOUT + std::time::Duration::from_secs(60);
    let response = client.post(&format!("{}/verify", module_path(module)), None)?;
    if !response.is_success() {
        return Err(Failure::new(response.error_message()));
    }
    let report: VerifyReport = response.json().map_err(|e| bad_answer(&e))?;
    if json {
        println!("{}", String::from_utf8_lossy(&response.body).trim_end());
    } else if report.differences.is_empty() {
        println!(
            "{module}: both copies are identical ({}, {} compared in {})",
            count(report.files_compared, "file", "files"),
            bytes(report.bytes_compared),
            duration_ms(report.elapsed_ms)
        );
    } else {
        for d in &report.differences {
            println!("{}: {}", location(d), describe(d));
        }
        if report.truncated {
            println!("(more differences were found than the daemon lists)");
        }
    }
    if report.differences.is_empty() {
        return Ok(0);
    }
    let places = count(report.differences.len() as u64, "place", "places");
    Err(Failure::new(if report.truncated {
        format!("{module}: the two copies differ in more than {places}")
    } else {
        format!("{module}: the two copies differ in {places}")
    }))
}

/// `<dir>/<path>`.
fn location(d: &Difference) -> String {
    let path = d.path.trim_start_matches('/');
    if path.is_empty() {
        d.dir.clone()
    } else {
        format!("{}/{path}", d.dir.trim_end_matches('/'))
    }
}

/// What differs, for people.
fn describe(d: &Difference) -> String {
    match d.kind {
        DifferenceKind::MissingOnSecondary => "missing on the secondary".into(),
        DifferenceKind::OnlyOnSecondary => "only on the secondary".into(),
        DifferenceKind::Type => "the type differs (file, directory, symbolic link...)".into(),
        DifferenceKind::Size => "size differs".into(),
        DifferenceKind::LinkTarget => "symbolic link target differs".into(),
        DifferenceKind::Attributes => "mode, owner or extended attributes differ".into(),
        DifferenceKind::Content => {
            let total: u64 = d.ranges.iter().map(|(start, end)| end.saturating_sub(*start)).sum();
            let mut shown: Vec<String> =
                d.ranges.iter().take(RANGES_SHOWN).map(|(start, end)| format!("{start}..{end}")).collect();
            if d.ranges.len() > RANGES_SHOWN {
                shown.push(format!("and {} more", d.ranges.len() - RANGES_SHOWN));
            }
            let ranges = count(d.ranges.len() as u64, "range", "ranges");
            if shown.is_empty() {
                "content differs".into()
            } else {
                format!("content differs in {ranges} ({}): {}", bytes(total), shown.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(kind: DifferenceKind, ranges: Vec<(u64, u64)>) -> Difference {
        Difference { dir: "/srv/data/".into(), path: "a/b.img".into(), kind, ranges }
    }

    // Each difference is one line naming the file and what differs.
    #[test]
    fn differences_read_as_sentences() {
        let d = diff(DifferenceKind::Content, vec![(0, 4096), (1_048_576, 1_052_672)]);
        assert_eq!(location(&d), "/srv/data/a/b.img");
        assert_eq!(describe(&d), "content differs in 2 ranges (8 KiB): 0..4096, 1048576..1052672");
        let many = diff(DifferenceKind::Content, (0..10).map(|i| (i * 8192, i * 8192 + 4096)).collect());
        assert!(describe(&many).ends_with("57344..61440, and 2 more"), "{}", describe(&many));
        assert_eq!(describe(&diff(DifferenceKind::Content, vec![])), "content differs");
        assert_eq!(describe(&diff(DifferenceKind::MissingOnSecondary, vec![])), "missing on the secondary");
        let root = Difference { path: String::new(), ..diff(DifferenceKind::Attributes, vec![]) };
        assert_eq!(location(&root), "/srv/data/");
    }
}
