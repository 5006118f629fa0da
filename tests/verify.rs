//! Verify against an in-process peer (a second directory): every kind of difference, content
//! ranges by checksums on sparse files, exclusions, a bounded list, re-checking given paths.
//! The peer fails the test if verify tries to write anything.

mod support;

use hamirror::replication::resync::{full_resync, DirPeer, Entry, Flow, LocalTree, PeerFiles, ResyncOptions};
use hamirror::replication::status::{DifferenceKind, VerifyReport};
use hamirror::replication::verify::{verify, verify_paths, VerifyOptions};
use hamirror::replication::{Op, RelPath};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use support::resync_trees::*;

use DifferenceKind::*;

/// A peer that only answers questions: verify must never change it.
struct ReadOnly(DirPeer);

impl PeerFiles for ReadOnly {
    fn stat(&mut self, path: &RelPath) -> io::Result<Option<Entry>> {
        self.0.stat(path)
    }
    fn list(&mut self, dir: &RelPath) -> io::Result<Vec<(String, Entry)>> {
        self.0.list(dir)
    }
    fn block_hashes(&mut self, file: &RelPath, block_bytes: u64, first_block: u64, count: u64) -> io::Result<Vec<u64>> {
        self.0.block_hashes(file, block_bytes, first_block, count)
    }
    fn apply(&mut self, op: &Op) -> io::Result<()> {
        panic!("verify changed the peer: {op:?}")
    }
    fn remove_tree(&mut self, path: &RelPath) -> io::Result<()> {
        panic!("verify removed {path:?} on the peer")
    }
    fn flush(&mut self) -> io::Result<()> {
        panic!("verify flushed the peer")
    }
}

fn options(block_bytes: u64) -> VerifyOptions {
    VerifyOptions { block_bytes, exclude: Vec::new(), dir_names: vec!["/srv/data".into()], differences_max: 100 }
}

impl Pair {
    /// The target made equal to the source by a full resync.
    fn sync(&self) {
        let mut peer = self.peer();
        done(
            full_resync(&self.source(), &mut peer, None, &ResyncOptions::new(64 * KIB), &mut |_| Flow::Continue)
                .unwrap(),
        );
    }
    fn verify(&self, opts: &VerifyOptions) -> VerifyReport {
        verify(&self.source(), &mut ReadOnly(self.peer()), opts, &mut |_| {}).unwrap()
    }
    fn verify_paths(&self, opts: &VerifyOptions, paths: &[&str]) -> VerifyReport {
        let paths: Vec<RelPath> = paths.iter().map(|p| rel(p)).collect();
        verify_paths(&self.source(), &mut ReadOnly(self.peer()), opts, &paths, &mut |_| {}).unwrap()
    }
}

/// (path, kind) of each difference, in report order.
fn kinds(r: &VerifyReport) -> Vec<(&str, DifferenceKind)> {
    r.differences.iter().map(|d| (d.path.as_str(), d.kind)).collect()
}

fn write_at(path: &std::path::Path, data: &[u8], offset: u64) {
    OpenOptions::new().write(true).open(path).unwrap().write_all_at(data, offset).unwrap();
}

/// A small tree of every entry type; returns the bytes of its regular files.
fn build(pair: &Pair) -> u64 {
    let s = &pair.src;
    fs::write(s.join("a.txt"), random(100 * KIB, 1)).unwrap();
    fs::write(s.join("big.bin"), random(3 * MIB, 2)).unwrap();
    fs::create_dir_all(s.join("d/sub")).unwrap();
    fs::write(s.join("d/inner.txt"), b"inner").unwrap();
    fs::write(s.join("d/sub/deep.txt"), b"deep").unwrap();
    for f in ["own.txt", "perm.txt", "x.txt"] {
        fs::write(s.join(f), f.as_bytes()).unwrap();
    }
    symlink("a.txt", s.join("link")).unwrap();
    let fifo = std::ffi::CString::new(s.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    pair.source()
        .apply(&Op::SetXattr { path: rel("x.txt"), name: "user.tag".into(), value: b"one".to_vec(), flags: 0 })
        .unwrap();
    100 * KIB + 3 * MIB + 5 + 4 + 7 + 8 + 5
}

#[test]
fn identical_copies_have_no_difference() {
    // Proves: after a full resync, verify finds nothing, compares every regular file and all their bytes, and ignores mtimes.
    let pair = Pair::new();
    let bytes = build(&pair);
    pair.sync();
    let mut seen = Vec::new();
    let r = verify(&pair.source(), &mut ReadOnly(pair.peer()), &options(4 * KIB), &mut |b| seen.push(b)).unwrap();
    assert!(r.differences.is_empty(), "{:?}", r.differences);
    assert!(!r.truncated);
    assert_eq!(r.files_compared, 7);
    assert_eq!(r.bytes_compared, bytes);
    assert_eq!(seen.last(), Some(&bytes));
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "progress goes forward: {seen:?}");

    // An mtime is not compared.
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    File::options().write(true).open(pair.dst.join("a.txt")).unwrap().set_modified(old).unwrap();
    assert!(pair.verify(&options(4 * KIB)).differences.is_empty());
}

#[test]
fn every_kind_of_difference_is_reported() {
    // Proves: a targeted change on the target yields exactly its difference kind, in walk order, and a replaced directory's contents are not listed.
    let pair = Pair::new();
    build(&pair);
    pair.sync();
    let t = &pair.dst;
    write_at(&t.join("a.txt"), b"changed", 70_000);
    write_at(&t.join("big.bin"), b"longer", 3 * MIB);
    fs::remove_file(t.join("d/inner.txt")).unwrap();
    fs::remove_dir_all(t.join("d/sub")).unwrap();
    fs::write(t.join("d/sub"), b"now a file").unwrap();
    fs::write(t.join("extra.txt"), b"only here").unwrap();
    fs::remove_file(t.join("fifo")).unwrap();
    fs::write(t.join("fifo"), b"").unwrap();
    fs::remove_file(t.join("link")).unwrap();
    symlink("big.bin", t.join("link")).unwrap();
    std::os::unix::fs::chown(t.join("own.txt"), Some(4321), None).unwrap();
    fs::set_permissions(t.join("perm.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    DirPeer::open(&[t])
        .unwrap()
        .apply(&Op::SetXattr { path: rel("x.txt"), name: "user.tag".into(), value: b"two".to_vec(), flags: 0 })
        .unwrap();

    let r = pair.verify(&options(4 * KIB));
    assert_eq!(
        kinds(&r),
        vec![
            ("a.txt", Content),
            ("big.bin", Size),
            ("d/inner.txt", MissingOnSecondary),
            ("d/sub", Type),
            ("extra.txt", OnlyOnSecondary),
            ("fifo", Type),
            ("link", LinkTarget),
            ("own.txt", Attributes),
            ("perm.txt", Attributes),
            ("x.txt", Attributes),
        ]
    );
    assert_eq!(r.differences[0].ranges, vec![(69_632, 73_728)], "the one 4 KiB block written");
    assert!(r.differences.iter().all(|d| d.dir == "/srv/data"));
    assert!(r.differences[1..].iter().all(|d| d.ranges.is_empty()));
    assert!(!r.truncated);
}

#[test]
fn one_block_differing_in_a_sparse_64_mib_file_is_one_range() {
    // Proves: in a sparse 64 MiB file, one 4 KiB block changed on the target is reported as exactly that block, every batch is compared, and progress reaches 64 MiB.
    let pair = Pair::new();
    let f = File::create(pair.src.join("disk.img")).unwrap();
    f.set_len(64 * MIB).unwrap();
    f.write_all_at(&random(MIB, 3), 0).unwrap();
    f.write_all_at(&random(64 * KIB, 4), 40 * MIB).unwrap();
    drop(f);
    pair.sync();
    let block = 10_000 * 4 * KIB;
    write_at(&pair.dst.join("disk.img"), b"x", block + 123);

    let mut seen = Vec::new();
    let r = verify(&pair.source(), &mut ReadOnly(pair.peer()), &options(4 * KIB), &mut |b| seen.push(b)).unwrap();
    assert_eq!(kinds(&r), vec![("disk.img", Content)]);
    assert_eq!(r.differences[0].ranges, vec![(block, block + 4 * KIB)]);
    assert_eq!((r.files_compared, r.bytes_compared), (1, 64 * MIB));
    assert_eq!(seen.len(), 16, "16 batches of 1024 blocks");
    assert_eq!(seen.last(), Some(&(64 * MIB)));
}

#[test]
fn adjacent_blocks_merge_and_the_last_range_ends_at_the_file_size() {
    // Proves: differing neighbour blocks become one range, also across a checksum batch boundary, and a range in the last partial block stops at the file size.
    let pair = Pair::new();
    fs::write(pair.src.join("f"), random(8 * MIB + 1000, 5)).unwrap();
    pair.sync();
    let f = pair.dst.join("f");
    write_at(&f, b"abcd", 1024 * 4 * KIB - 2); // blocks 1023 and 1024: two batches
    write_at(&f, b"z", 3 * 4 * KIB); // block 3
    write_at(&f, b"yy", 4 * 4 * KIB + 5); // block 4, next to 3
    write_at(&f, b"w", 8 * MIB + 999); // the last, partial block
    let r = pair.verify(&options(4 * KIB));
    assert_eq!(
        r.differences[0].ranges,
        vec![(3 * 4 * KIB, 5 * 4 * KIB), (1023 * 4 * KIB, 1025 * 4 * KIB), (8 * MIB, 8 * MIB + 1000)]
    );
}

#[test]
fn excluded_paths_are_not_compared() {
    // Proves: differences inside or at notreplicated paths, on either side, are not reported, and a link count changed by a hard link there is no difference.
    let pair = Pair::new();
    build(&pair);
    fs::create_dir(pair.src.join("cache")).unwrap();
    fs::write(pair.src.join("cache/src-only"), b"x").unwrap();
    pair.sync();
    fs::remove_file(pair.dst.join("cache/src-only")).unwrap();
    fs::hard_link(pair.dst.join("a.txt"), pair.dst.join("cache/second-name")).unwrap();
    fs::write(pair.dst.join("d/sub/deep.txt"), b"DEEP").unwrap();
    fs::write(pair.dst.join("tmp.swp"), b"editor").unwrap();
    let mut opts = options(4 * KIB);
    opts.exclude = vec![rel("cache"), rel("d/sub"), rel("tmp.swp")];
    assert!(pair.verify(&opts).differences.is_empty());
    assert!(pair.verify_paths(&opts, &["d/sub/deep.txt", "tmp.swp", "cache"]).differences.is_empty());
    opts.exclude.clear();
    assert_eq!(
        kinds(&pair.verify(&opts)),
        vec![
            ("cache/second-name", OnlyOnSecondary),
            ("cache/src-only", MissingOnSecondary),
            ("d/sub/deep.txt", Content),
            ("tmp.swp", OnlyOnSecondary)
        ]
    );
}

#[test]
fn the_list_is_bounded() {
    // Proves: past differences_max the report says truncated; exactly that many differences is not truncated.
    let pair = Pair::new();
    for i in 0..5 {
        fs::write(pair.src.join(format!("f{i}")), b"x").unwrap();
    }
    let mut opts = options(4 * KIB);
    opts.differences_max = 3;
    let r = pair.verify(&opts);
    assert_eq!(kinds(&r), vec![("f0", MissingOnSecondary), ("f1", MissingOnSecondary), ("f2", MissingOnSecondary)]);
    assert!(r.truncated);
    opts.differences_max = 5;
    let r = pair.verify(&opts);
    assert_eq!(r.differences.len(), 5);
    assert!(!r.truncated);
}

#[test]
fn verify_paths_compares_only_the_given_entries() {
    // Proves: verify_paths reports only the given paths, in walk order and once each; a directory is compared as an entry, not its contents; a path absent on both sides is no difference.
    let pair = Pair::new();
    build(&pair);
    pair.sync();
    write_at(&pair.dst.join("a.txt"), b"changed", 0);
    fs::set_permissions(pair.dst.join("d"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_file(pair.dst.join("d/inner.txt")).unwrap();
    fs::write(pair.dst.join("perm.txt"), b"not asked about").unwrap();
    let opts = options(4 * KIB);

    let r = pair.verify_paths(&opts, &["d", "a.txt", "gone", "a.txt"]);
    assert_eq!(kinds(&r), vec![("a.txt", Content), ("d", Attributes)]);
    assert_eq!((r.files_compared, r.bytes_compared), (1, 100 * KIB));
    assert_eq!(kinds(&pair.verify_paths(&opts, &["d/inner.txt"])), vec![("d/inner.txt", MissingOnSecondary)]);
    assert!(pair.verify_paths(&opts, &[]).differences.is_empty());
    assert_eq!(pair.verify(&opts).differences.len(), 4);
}

#[test]
fn several_directories_are_named_as_configured() {
    // Proves: a difference names its replicated directory as configured; a directory the peer lacks and a bad block size are errors.
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = ["s0", "s1", "t0", "t1"].iter().map(|d| tmp.path().join(d)).collect();
    for d in &dirs {
        fs::create_dir(d).unwrap();
    }
    fs::write(dirs[1].join("vm.img"), b"source").unwrap();
    fs::write(dirs[3].join("vm.img"), b"target").unwrap();
    let source = LocalTree::open(&dirs[..2]).unwrap();
    let mut opts = options(4 * KIB);
    opts.dir_names = vec!["/srv/data".into(), "/srv/vms".into()];
    let r = verify(&source, &mut ReadOnly(DirPeer::open(&dirs[2..]).unwrap()), &opts, &mut |_| {}).unwrap();
    assert_eq!(r.differences.len(), 1);
    let d = &r.differences[0];
    assert_eq!((d.dir.as_str(), d.path.as_str(), d.kind), ("/srv/vms", "vm.img", Content));
    assert_eq!(d.ranges, vec![(0, 6)]);

    let err = verify(&source, &mut ReadOnly(DirPeer::open(&dirs[2..3]).unwrap()), &opts, &mut |_| {}).unwrap_err();
    assert_eq!(err.to_string(), "replicated directory 1 is missing on the peer");
    opts.block_bytes = 3000;
    assert!(verify(&source, &mut ReadOnly(DirPeer::open(&dirs[2..]).unwrap()), &opts, &mut |_| {}).is_err());
}
