//! Dirty-zone maps: durability, generations, renames and unlinks, torn logs, memory bounds.

use hamirror::replication::dirty::{DirtyFile, DirtyLimits, DirtyMaps, LOG_FILE};
use hamirror::replication::{Op, RelPath};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// The owner this test creates files with (the mountover and the receiver ship and apply it).
fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}
fn gid() -> u32 {
    nix::unistd::getegid().as_raw()
}

const MIB: u64 = 1 << 20;

fn rel(s: &str) -> RelPath {
    RelPath::new(0, s).unwrap()
}

fn write(file: &str, offset: u64, len: usize) -> Op {
    Op::Write { file: rel(file), offset, data: vec![7u8; len] }
}

fn zones(maps: &DirtyMaps, file: &str) -> Option<DirtyFile> {
    maps.snapshot().files.get(&rel(file)).cloned()
}

#[test]
fn marks_survive_reopen() {
    // Proves: what was marked (zones, whole files, namespace changes) is there after a reopen.
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let maps = DirtyMaps::open(dir.path(), MIB).unwrap();
        maps.mark(&write("vm.img", 0, 4096)).unwrap();
        maps.mark(&write("vm.img", 5 * MIB + 10, 2 * MIB as usize)).unwrap();
        maps.mark(&Op::Create { file: rel("new"), mode: 0o644, uid: uid(), gid: gid() }).unwrap();
        maps.mark(&write("new", 0, 100)).unwrap();
        maps.mark(&Op::Link { existing: rel("new"), new: rel("other") }).unwrap();
        maps.mark(&Op::Mkdir { dir: rel("d"), mode: 0o755, uid: uid(), gid: gid() }).unwrap();
        let s = maps.snapshot();
        assert_eq!(s.files.get(&rel("vm.img")), Some(&DirtyFile::Zones(vec![0, 5, 6, 7])));
        assert_eq!(s.files.get(&rel("other")), Some(&DirtyFile::Whole));
        assert_eq!(s.namespace.len(), 3);
        s
    };
    let maps = DirtyMaps::open(dir.path(), MIB).unwrap();
    let after = maps.snapshot();
    assert_eq!(after.files, before.files);
    assert_eq!(after.namespace, before.namespace);
    assert!(after.generation >= before.generation);
}

/// Child side of `a_killed_writer_keeps_every_mark_it_returned` (does nothing in a normal run).
#[test]
fn child_marks_until_killed() {
    // Helper process of the test below: proves nothing on its own.
    let Ok(dir) = std::env::var("HAMIRROR_DIRTY_CHILD") else { return };
    let maps = DirtyMaps::open(Path::new(&dir), MIB).unwrap();
    for i in 0u64.. {
        maps.mark(&write("disk.img", i * MIB, 512)).unwrap();
        println!("marked {i}");
        std::io::stdout().flush().unwrap();
    }
}

#[test]
fn a_killed_writer_keeps_every_mark_it_returned() {
    // Proves: after a kill -9 in the middle of marking, a reopen has every zone whose mark returned.
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_marks_until_killed", "--nocapture", "--test-threads=1"])
        .env("HAMIRROR_DIRTY_CHILD", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut acknowledged = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("marked ") {
            let n: u64 = n.trim().parse().unwrap();
            acknowledged = Some(n);
            if n == 200 {
                child.kill().unwrap();
                break;
            }
        }
    }
    child.wait().unwrap();
    let acknowledged = acknowledged.expect("the child marked nothing");
    let maps = DirtyMaps::open(dir.path(), MIB).unwrap();
    let Some(DirtyFile::Zones(z)) = zones(&maps, "disk.img") else { panic!("no zones after the kill") };
    for i in 0..=acknowledged {
        assert!(z.contains(&i), "zone {i} acknowledged but lost");
    }
}

#[test]
fn a_new_zone_is_fsynced_once_and_repeats_cost_nothing() {
    // Proves: a mark that changes the persisted set fsyncs before returning; writes to an already-dirty zone do no I/O.
    let dir = tempfile::tempdir().unwrap();
    let maps = DirtyMaps::open(dir.path(), MIB).unwrap();
    let f0 = maps.fsync_count();
    let log0 = maps.log_bytes();
    maps.mark(&write("a", 100, 10)).unwrap();
    assert_eq!(maps.fsync_count(), f0 + 1);
    let log1 = maps.log_bytes();
    assert!(log1 > log0);
    for i in 0..100 {
        maps.mark(&write("a", i * 4096 % MIB, 4096)).unwrap();
    }
    assert_eq!(maps.fsync_count(), f0 + 1, "repeated writes to a dirty zone must not fsync");
    assert_eq!(maps.log_bytes(), log1, "nor write anything");
    maps.mark(&write("a", MIB, 1)).unwrap();
    assert_eq!(maps.fsync_count(), f0 + 2);
    maps.mark(&Op::Truncate { file: rel("a"), size: 0 }).unwrap();
    assert_eq!(maps.fsync_count(), f0 + 3, "namespace changes are durable too");
    maps.mark(&Op::Fsync { file: None, datasync: false }).unwrap();
    assert_eq!(maps.fsync_count(), f0 + 3);
    // A batch of deferred marks costs one fsync.
    for i in 10..20 {
        maps.mark_deferred(&write("b", i * MIB, 1)).unwrap();
    }
    assert_eq!(maps.fsync_count(), f0 + 3);
    maps.sync().unwrap();
    assert_eq!(maps.fsync_count(), f0 + 4);
    maps.sync().unwrap();
    assert_eq!(maps.fsync_count(), f0 + 4);
}

#[test]
fn renames_move_the_dirty_state_and_unlinks_leave_tombstones() {
    // Proves: renames (files, directories, exchange) carry the zones; unlinks drop them and keep the op for the peer.
    let dir = tempfile::tempdir().unwrap();
    let maps = DirtyMaps::open(dir.path(), MIB).unwrap();
    maps.mark(&write("a", 0, 1)).unwrap();
    maps.mark(&write("a", 3 * MIB, 1)).unwrap();
    maps.mark(&Op::Rename { from: rel("a"), to: rel("b"), flags: 0 }).unwrap();
    assert_eq!(zones(&maps, "a"), None);
    assert_eq!(zones(&maps, "b"), Some(DirtyFile::Zones(vec![0, 3])));

    maps.mark(&write("d/x", 0, 1)).unwrap();
    maps.mark(&write("d/sub/y", MIB, 1)).unwrap();
    maps.mark(&write("d-other", 0, 1)).unwrap();
    maps.mark(&Op::Rename { from: rel("d"), to: rel("e"), flags: 0 }).unwrap();
    assert_eq!(zones(&maps, "e/x"), Some(DirtyFile::Zones(vec![0])));
    assert_eq!(zones(&maps, "e/sub/y"), Some(DirtyFile::Zones(vec![1])));
    assert_eq!(zones(&maps, "d/x"), None);
    assert_eq!(zones(&maps, "d-other"), Some(DirtyFile::Zones(vec![0])), "a sibling with a common prefix stays");

    maps.mark(&Op::Rename { from: rel("b"), to: rel("e/x"), flags: 2 /* RENAME_EXCHANGE */ }).unwrap();
    assert_eq!(zones(&maps, "b"), Some(DirtyFile::Zones(vec![0])));
    assert_eq!(zones(&maps, "e/x"), Some(DirtyFile::Zones(vec![0, 3])));

    assert!(!maps.snapshot().hardlink_orphans);
    maps.mark(&Op::Unlink { file: rel("e/x") }).unwrap();
    let s = maps.snapshot();
    assert_eq!(s.files.get(&rel("e/x")), None);
    assert_eq!(s.namespace.last(), Some(&Op::Unlink { file: rel("e/x") }), "the unlink is kept for the peer");
    assert!(s.hardlink_orphans, "the unlinked file may have had another name");

    // Renaming over a file drops the replaced file's zones.
    maps.mark(&Op::Rename { from: rel("b"), to: rel("d-other"), flags: 0 }).unwrap();
    assert_eq!(zones(&maps, "d-other"), Some(DirtyFile::Zones(vec![0])));
    assert_eq!(zones(&maps, "b"), None);

    let s = maps.snapshot();
    drop(maps);
    let again = DirtyMaps::open(dir.path(), MIB).unwrap().snapshot();
    assert_eq!(again.files, s.files, "replay gives the same renames");
    assert_eq!(again.namespace, s.namespace);
    assert_eq!(again.hardlink_orphans, s.hardlink_orphans);
}

#[test]
fn a_torn_last_record_is_ignored() {
    // Proves: a log cut in its last record (power loss during an append) reopens with everything before it.
    let dir = tempfile::tempdir().unwrap();
    {
        let maps = DirtyMaps::open(dir.path(), MIB).unwrap();
        maps.mark(&write("f", 0, 1)).unwrap();
        maps.mark(&write("f", MIB, 1)).unwrap();
        maps.mark(&write("f", 2 * MIB, 1)).unwrap();
    }
    let log = dir.path().join(LOG_FILE);
    let len = std::fs::metadata(&log).unwrap().len();
    OpenOptions::new().write(true).open(&log).unwrap().set_len(len - 3).unwrap();
    let maps = DirtyMaps::open(dir.path(), MIB).unwrap();
    let s = maps.snapshot();
    assert!(!s.full);
    assert_eq!(s.files.get(&rel("f")), Some(&DirtyFile::Zones(vec![0, 1])));
    // The maps keep working and the next reopen is clean.
    maps.mark(&write("f", 9 * MIB, 1)).unwrap();
    drop(maps);
    // Garbage after the last record (a partly written append) is ignored too.
    OpenOptions::new().append(true).open(&log).unwrap().write_all(&[0xff; 7]).unwrap();
    let maps = DirtyMaps::open(dir.path(), MIB).unwrap();
    assert_eq!(zones(&maps, "f"), Some(DirtyFile::Zones(vec![0, 1, 9])));
}

#[test]
fn damage_in_the_middle_asks_for_a_full_resync() {
    // Proves: a log damaged before its tail (not a torn append) is never trusted partially: the maps ask for a full resync.
    let dir = tempfile::tempdir().unwrap();
    {
        let maps = DirtyMaps::open(dir.path(), 4096).unwrap();
        // Enough records that the damage is far from the tail.
        for i in 0..120_000u64 {
            maps.mark_deferred(&write("f", i * 2 * 4096, 1)).unwrap();
        }
        maps.sync().unwrap();
    }
    let log = dir.path().join(LOG_FILE);
    let mut bytes = std::fs::read(&log).unwrap();
    assert!(bytes.len() > 2 << 20, "log of {} bytes", bytes.len());
    bytes[100] ^= 0x55;
    std::fs::write(&log, &bytes).unwrap();
    let maps = DirtyMaps::open(dir.path(), 4096).unwrap();
    assert!(maps.snapshot().full);
}

#[test]
fn clear_keeps_what_was_written_again_after_the_snapshot() {
    // Proves: clearing up to a snapshot's generation keeps zones marked again after it, also across a reopen.
    let dir = tempfile::tempdir().unwrap();
    let maps = DirtyMaps::open(dir.path(), MIB).unwrap();
    maps.mark(&write("f", 0, 1)).unwrap();
    maps.mark(&write("f", MIB, 1)).unwrap();
    maps.mark(&write("g", 0, 1)).unwrap();
    let snap = maps.snapshot();
    // Written again while the resync runs: zone 0 of f (already dirty: no I/O) and zone 5.
    let f = maps.fsync_count();
    maps.mark(&write("f", 10, 1)).unwrap();
    assert_eq!(maps.fsync_count(), f);
    maps.mark(&write("f", 5 * MIB, 1)).unwrap();
    maps.clear_upto(snap.generation).unwrap();
    assert_eq!(zones(&maps, "f"), Some(DirtyFile::Zones(vec![0, 5])));
    assert_eq!(zones(&maps, "g"), None);
    drop(maps);
    let maps = DirtyMaps::open(dir.path(), MIB).unwrap();
    assert_eq!(zones(&maps, "f"), Some(DirtyFile::Zones(vec![0, 5])), "the re-marked zone survives the reopen");

    // Per-file clears after a resync sent zones.
    let gen = maps.generation();
    maps.clear(&rel("f"), &[5], gen).unwrap();
    assert_eq!(zones(&maps, "f"), Some(DirtyFile::Zones(vec![0])));
    maps.clear_file(&rel("f"), gen).unwrap();
    assert!(maps.is_clean());
    drop(maps);
    assert!(DirtyMaps::open(dir.path(), MIB).unwrap().is_clean());
}

#[test]
fn acknowledged_in_flight_writes_are_cleared() {
    // Proves: the sender's pattern (mark, ship, clear once the peer acked) leaves nothing behind, and an unacked later write stays.
    let dir = tempfile::tempdir().unwrap();
    let maps = DirtyMaps::open(dir.path(), MIB).unwrap();
    let g1 = maps.mark(&write("f", 0, 1)).unwrap();
    let g2 = maps.mark(&write("f", 100, 1)).unwrap();
    assert!(g2 > g1);
    maps.clear_upto(g1).unwrap();
    assert_eq!(zones(&maps, "f"), Some(DirtyFile::Zones(vec![0])), "the second write is not acked yet");
    maps.clear_upto(g2).unwrap();
    assert!(maps.is_clean());
    drop(maps);
    assert!(DirtyMaps::open(dir.path(), MIB).unwrap().is_clean());
}

#[test]
fn memory_bounds_coarsen_and_never_forget() {
    // Proves: beyond the zone bound a file becomes whole-dirty; beyond the file or namespace bounds the maps ask for a full resync.
    let dir = tempfile::tempdir().unwrap();
    let limits = DirtyLimits { zones_max: 8, files_max: 4, namespace_ops_max: 5, ..DirtyLimits::default() };
    let maps = DirtyMaps::open_with_limits(dir.path(), MIB, limits).unwrap();
    for i in 0..6 {
        maps.mark(&write("small", i * MIB, 1)).unwrap();
    }
    for i in 0..4 {
        maps.mark(&write("big", i * MIB, 1)).unwrap();
    }
    let s = maps.snapshot();
    assert_eq!(s.files.get(&rel("small")), Some(&DirtyFile::Whole), "the file with most zones coarsened");
    assert_eq!(s.files.get(&rel("big")), Some(&DirtyFile::Zones(vec![0, 1, 2, 3])));
    assert!(s.zone_count() <= 8);
    drop(maps);
    let maps = DirtyMaps::open_with_limits(dir.path(), MIB, limits).unwrap();
    assert_eq!(zones(&maps, "small"), Some(DirtyFile::Whole));

    for f in ["c", "d", "e"] {
        maps.mark(&write(f, 0, 1)).unwrap();
    }
    let s = maps.snapshot();
    assert!(s.full, "five files exceed the bound of four");
    assert!(s.files.is_empty());
    drop(maps);
    let maps = DirtyMaps::open_with_limits(dir.path(), MIB, limits).unwrap();
    assert!(maps.snapshot().full);
    maps.clear_upto(maps.generation()).unwrap();
    assert!(maps.is_clean());

    for i in 0..6 {
        maps.mark(&Op::Mkdir { dir: rel(&format!("d{i}")), mode: 0o755, uid: uid(), gid: gid() }).unwrap();
    }
    assert!(maps.snapshot().full, "six namespace ops exceed the bound of five");
}

#[test]
fn a_huge_punch_marks_the_whole_file() {
    // Proves: a range op covering more zones than a quarter of the bound costs one record, not millions of zones.
    let dir = tempfile::tempdir().unwrap();
    let maps = DirtyMaps::open(dir.path(), 4096).unwrap();
    maps.mark(&Op::Fallocate { file: rel("disk"), mode: 3, offset: 0, len: 1 << 40 }).unwrap();
    assert_eq!(zones(&maps, "disk"), Some(DirtyFile::Whole));
    assert!(maps.log_bytes() < 4096);
}

#[test]
fn a_changed_zone_size_is_converted() {
    // Proves: maps written with 1 MiB zones reopen with 64 KiB zones covering the same bytes.
    let dir = tempfile::tempdir().unwrap();
    DirtyMaps::open(dir.path(), MIB).unwrap().mark(&write("f", MIB + 5, 1)).unwrap();
    let maps = DirtyMaps::open(dir.path(), 64 << 10).unwrap();
    assert_eq!(zones(&maps, "f"), Some(DirtyFile::Zones((16..32).collect())));
}

#[test]
fn the_log_is_compacted_when_it_grows() {
    // Proves: marking and clearing in a loop keeps the log bounded.
    let dir = tempfile::tempdir().unwrap();
    let limits = DirtyLimits { log_compact_bytes_min: 64 << 10, ..DirtyLimits::default() };
    let maps = DirtyMaps::open_with_limits(dir.path(), MIB, limits).unwrap();
    for i in 0..20_000u64 {
        let g = maps.mark_deferred(&write("f", (i % 50) * MIB, 1)).unwrap();
        maps.clear_upto(g).unwrap();
    }
    assert!(maps.log_bytes() < 256 << 10, "log of {} bytes", maps.log_bytes());
    maps.mark(&write("f", 7 * MIB, 1)).unwrap();
    drop(maps);
    let maps = DirtyMaps::open_with_limits(dir.path(), MIB, limits).unwrap();
    assert_eq!(zones(&maps, "f"), Some(DirtyFile::Zones(vec![7])));
}
