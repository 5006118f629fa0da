//! Resync engine against an in-process peer (a second directory): incremental from the maps,
//! full by checksums, holes, qcow2 images, bandwidth cap, resume after an interruption.

mod support;

use hamirror::replication::dirty::{DirtyLimits, DirtyMaps};
use hamirror::replication::resync::{
    data_ranges, full_resync, incremental_resync, Flow, LocalTree, Outcome, PeerFiles, Progress, ResyncOptions,
};
use hamirror::replication::Op;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::Command;
use std::time::Instant;
use support::resync_trees::*;

/// The owner this test creates files with (the mountover and the receiver ship and apply it).
fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}
fn gid() -> u32 {
    nix::unistd::getegid().as_raw()
}

impl Pair {
    fn full(&self, opts: &ResyncOptions, maps: Option<&DirtyMaps>) -> Outcome {
        full_resync(&self.source(), &mut self.peer(), maps, opts, &mut |_| Flow::Continue).unwrap()
    }
    fn incremental(&self, opts: &ResyncOptions, maps: &DirtyMaps) -> Outcome {
        incremental_resync(&self.source(), &mut self.peer(), maps, opts, &mut |_| Flow::Continue).unwrap()
    }
}

/// Acts as the mountover: applies `op` to the source and records it in the maps.
fn change(src: &LocalTree, maps: &DirtyMaps, op: Op) {
    src.apply(&op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    maps.track(&op).unwrap();
}

fn qemu(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} not runnable ({e}): install qemu-utils (tools/test installs it)"));
    out
}

fn qemu_ok(cmd: &str, args: &[&str]) {
    let out = qemu(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn incremental_sends_only_the_dirty_zones() {
    // Proves: with 1% of a 64 MiB file changed, an incremental resync sends that 1% and the copies end equal.
    let pair = Pair::new();
    std::fs::write(pair.src.join("vm.img"), random(64 * MIB, 1)).unwrap();
    let opts = ResyncOptions::new(64 * KIB);
    let first = done(pair.full(&opts, None));
    assert_eq!(first.bytes_sent, 64 * MIB, "first pairing copies everything");

    let maps = DirtyMaps::open(&pair.state, 64 * KIB).unwrap();
    let src = pair.source();
    // Ten 64 KiB writes at distinct zones (1% of the file).
    for (i, zone) in [3u64, 77, 150, 151, 400, 512, 700, 888, 1000, 1023].iter().enumerate() {
        change(
            &src,
            &maps,
            Op::Write { file: rel("vm.img"), offset: zone * 64 * KIB, data: random(64 * KIB, 100 + i as u64) },
        );
    }
    let stats = done(pair.incremental(&opts, &maps));
    eprintln!(
        "incremental, 1% of 64 MiB dirty: sent {} bytes ({:.2}%)",
        stats.bytes_sent,
        stats.bytes_sent as f64 * 100.0 / (64 * MIB) as f64
    );
    assert_eq!(stats.bytes_sent, 10 * 64 * KIB);
    assert!(!stats.full);
    assert_same_tree(&pair.src, &pair.dst);
    assert!(maps.is_clean(), "the maps are cleared once the peer has the data");

    // A small write inside one zone sends only that zone, and a second pass sends nothing.
    change(&src, &maps, Op::Write { file: rel("vm.img"), offset: 5 * MIB + 3, data: vec![1, 2, 3] });
    assert_eq!(done(pair.incremental(&opts, &maps)).bytes_sent, 64 * KIB);
    assert_eq!(done(pair.incremental(&opts, &maps)).bytes_sent, 0);
    assert_same_tree(&pair.src, &pair.dst);
}

#[test]
fn incremental_replays_namespace_changes_in_order() {
    // Proves: creates, mkdirs, renames (file and directory), symlinks, hard links, unlinks, rmdirs, truncates, modes, owners and xattrs made while the peer was away reach it.
    let pair = Pair::new();
    std::fs::create_dir(pair.src.join("a")).unwrap();
    std::fs::write(pair.src.join("a/file"), random(3 * MIB, 2)).unwrap();
    std::fs::write(pair.src.join("keep.txt"), b"keep").unwrap();
    std::fs::write(pair.src.join("old.txt"), b"old").unwrap();
    std::fs::create_dir(pair.src.join("olddir")).unwrap();
    std::fs::write(pair.src.join("olddir/inside"), random(100 * KIB, 3)).unwrap();
    let opts = ResyncOptions::new(MIB);
    done(pair.full(&opts, None));
    assert_same_tree(&pair.src, &pair.dst);

    let maps = DirtyMaps::open(&pair.state, MIB).unwrap();
    let src = pair.source();
    let ops = vec![
        Op::Create { file: rel("new.txt"), mode: 0o644, uid: uid(), gid: gid() },
        Op::Write { file: rel("new.txt"), offset: 0, data: b"hello".to_vec() },
        Op::Mkdir { dir: rel("d"), mode: 0o750, uid: uid(), gid: gid() },
        Op::Create { file: rel("d/f"), mode: 0o600, uid: uid(), gid: gid() },
        Op::Write { file: rel("d/f"), offset: 2 * MIB, data: random(10 * KIB, 4) },
        Op::Rename { from: rel("keep.txt"), to: rel("d/kept.txt"), flags: 0 },
        Op::Symlink { link: rel("ln"), target: "d/f".into(), uid: uid(), gid: gid() },
        Op::Link { existing: rel("d/f"), new: rel("hard") },
        Op::Unlink { file: rel("old.txt") },
        Op::SetAttr { path: rel("d/f"), mode: Some(0o640), uid: Some(1000), gid: Some(1001), atime: None, mtime: None },
        Op::SetXattr { path: rel("d/f"), name: "user.origin".into(), value: b"alone".to_vec(), flags: 0 },
        Op::Mkdir { dir: rel("tmp"), mode: 0o755, uid: uid(), gid: gid() },
        Op::Rmdir { dir: rel("tmp") },
        Op::Truncate { file: rel("a/file"), size: 10 },
        Op::Write { file: rel("a/file"), offset: MIB, data: b"tail".to_vec() },
        Op::Rename { from: rel("olddir"), to: rel("newdir"), flags: 0 },
        Op::Write { file: rel("newdir/inside"), offset: 0, data: b"changed".to_vec() },
        Op::Create { file: rel("gone"), mode: 0o644, uid: uid(), gid: gid() },
        Op::Write { file: rel("gone"), offset: 0, data: b"x".to_vec() },
        Op::Unlink { file: rel("gone") },
    ];
    for op in ops {
        change(&src, &maps, op);
    }
    let stats = done(pair.incremental(&opts, &maps));
    eprintln!(
        "namespace replay: {} ops replayed, {} failed, {} bytes sent",
        stats.namespace_replayed, stats.namespace_failed, stats.bytes_sent
    );
    assert_eq!(stats.namespace_failed, 0);
    assert_same_tree(&pair.src, &pair.dst);
    let (f, h) = (std::fs::metadata(pair.dst.join("d/f")).unwrap(), std::fs::metadata(pair.dst.join("hard")).unwrap());
    assert_eq!(f.ino(), h.ino(), "the hard link is a hard link on the peer");
    assert!(!pair.dst.join("olddir").exists());
    assert!(maps.is_clean());
}

#[test]
fn a_replay_interrupted_by_a_crash_is_checked_by_checksums() {
    // Proves: replaying "rename x y; create x" a second time (the maps were not cleared) cannot lose y's content on the peer.
    let pair = Pair::new();
    std::fs::write(pair.src.join("x"), random(2 * MIB, 5)).unwrap();
    let opts = ResyncOptions::new(MIB);
    done(pair.full(&opts, None));
    let maps = DirtyMaps::open(&pair.state, MIB).unwrap();
    let src = pair.source();
    change(&src, &maps, Op::Rename { from: rel("x"), to: rel("y"), flags: 0 });
    change(&src, &maps, Op::Create { file: rel("x"), mode: 0o644, uid: uid(), gid: gid() });
    // A first replay reached the peer, then the primary crashed before the maps forgot it.
    let mut peer = pair.peer();
    for op in &maps.snapshot().namespace {
        peer.apply(op).unwrap();
    }
    std::fs::write(pair.state.join(hamirror::replication::resync::REPLAY_MARKER), b"").unwrap();
    let stats = done(pair.incremental(&opts, &maps));
    assert!(stats.bytes_sent >= 2 * MIB, "y was compared and resent: {stats:?}");
    assert_same_tree(&pair.src, &pair.dst);
}

#[test]
fn full_resync_sends_only_the_blocks_that_differ() {
    // Proves: a full resync compares blocks by checksums and sends only differing ones; deletes extras; copies symlinks, fifos, modes, owners, xattrs, hard links; leaves notreplicated paths alone.
    let pair = Pair::new();
    let big = random(64 * MIB, 6);
    std::fs::write(pair.src.join("big.bin"), &big).unwrap();
    std::fs::write(pair.dst.join("big.bin"), &big).unwrap();
    // Three blocks differ on the target.
    let f = std::fs::OpenOptions::new().write(true).open(pair.dst.join("big.bin")).unwrap();
    for block in [0u64, 31, 63] {
        f.write_all_at(b"stale", block * MIB + 100).unwrap();
    }
    drop(f);
    std::fs::create_dir_all(pair.dst.join("junk/deep")).unwrap();
    std::fs::write(pair.dst.join("junk/deep/x"), b"junk").unwrap();
    std::fs::write(pair.dst.join("extra.txt"), b"extra").unwrap();
    std::fs::create_dir_all(pair.src.join("only-src/sub")).unwrap();
    std::fs::write(pair.src.join("only-src/sub/file"), random(300 * KIB, 7)).unwrap();
    std::os::unix::fs::symlink("only-src/sub/file", pair.src.join("link")).unwrap();
    std::fs::hard_link(pair.src.join("only-src/sub/file"), pair.src.join("hard")).unwrap();
    let fifo = std::ffi::CString::new(pair.src.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    std::os::unix::fs::chown(pair.src.join("big.bin"), Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(pair.src.join("big.bin"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    pair.source()
        .apply(&Op::SetXattr { path: rel("big.bin"), name: "user.vm".into(), value: b"web01".to_vec(), flags: 0 })
        .unwrap();
    // Not replicated: the target's own copy stays as it is.
    std::fs::create_dir(pair.src.join("cache")).unwrap();
    std::fs::write(pair.src.join("cache/a"), b"src cache").unwrap();
    std::fs::create_dir(pair.dst.join("cache")).unwrap();
    std::fs::write(pair.dst.join("cache/b"), b"dst cache").unwrap();

    let mut opts = ResyncOptions::new(MIB);
    opts.exclude = vec![rel("cache")];
    let stats = done(pair.full(&opts, None));
    eprintln!("full resync, 3 blocks of 64 MiB differ + 300 KiB new: sent {} bytes, {:?}", stats.bytes_sent, stats);
    assert_eq!(stats.bytes_sent, 3 * MIB + 300 * KIB);
    assert_eq!(stats.entries_deleted, 2);
    std::fs::remove_dir_all(pair.src.join("cache")).unwrap();
    std::fs::remove_dir_all(pair.dst.join("cache")).unwrap();
    assert_same_tree(&pair.src, &pair.dst);
    let (f, h) = (
        std::fs::metadata(pair.dst.join("only-src/sub/file")).unwrap(),
        std::fs::metadata(pair.dst.join("hard")).unwrap(),
    );
    assert_eq!(f.ino(), h.ino());

    let again = done(pair.full(&opts, None));
    assert_eq!(again.bytes_sent, 0, "a second full resync sends nothing");
}

#[test]
fn a_sparse_file_stays_sparse() {
    // Proves: holes of the source are never sent nor written as zeros: the target keeps the same data/hole layout, and data where the source has a hole is punched.
    let pair = Pair::new();
    let f = File::create(pair.src.join("sparse.img")).unwrap();
    f.set_len(MIB * 1024).unwrap();
    f.write_all_at(&random(MIB, 8), 0).unwrap();
    f.write_all_at(&random(MIB, 9), 512 * MIB).unwrap();
    f.write_all_at(&random(4 * KIB, 10), 1024 * MIB - 4 * KIB).unwrap();
    f.sync_all().unwrap();
    // The target has 64 MiB of other data where the source has (mostly) holes.
    std::fs::write(pair.dst.join("sparse.img"), random(64 * MIB, 11)).unwrap();

    let stats = done(pair.full(&ResyncOptions::new(MIB), None));
    eprintln!(
        "sparse 1 GiB with 2 MiB + 4 KiB of data: sent {} bytes, {} punches",
        stats.bytes_sent, stats.holes_punched
    );
    assert_eq!(stats.bytes_sent, 2 * MIB + 4 * KIB);
    let (s, d) = (File::open(pair.src.join("sparse.img")).unwrap(), File::open(pair.dst.join("sparse.img")).unwrap());
    let (ms, md) = (s.metadata().unwrap(), d.metadata().unwrap());
    assert_eq!(md.len(), ms.len());
    eprintln!("st_blocks: source {} target {}", ms.blocks(), md.blocks());
    assert!(md.blocks() <= ms.blocks() + 64, "target {} blocks vs source {}", md.blocks(), ms.blocks());
    assert_eq!(
        data_ranges(&d, 0, md.len()).unwrap(),
        data_ranges(&s, 0, ms.len()).unwrap(),
        "same SEEK_DATA/SEEK_HOLE layout"
    );
    assert_same_tree(&pair.src, &pair.dst);
}

#[test]
fn qcow2_sends_only_allocated_clusters_and_compares_identical() {
    // Proves: for a preallocated qcow2, only clusters with data that the image needs are sent (not the preallocation, not freed clusters), and qemu-img compare says identical.
    let pair = Pair::new();
    let img = pair.src.join("img.qcow2");
    let img_s = img.to_str().unwrap();
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "preallocation=falloc", img_s, "256M"]);
    qemu_ok("qemu-io", &["-c", "write -P 0xab 0 16M", img_s]);
    // 4 MiB written then discarded without punching: data in the file, refcount 0.
    qemu_ok("qemu-io", &["-c", "write -P 0xcd 100M 4M", img_s]);
    let opts_s = format!("driver=qcow2,file.filename={img_s},pass-discard-request=off");
    qemu_ok("qemu-io", &["-d", "unmap", "--image-opts", &opts_s, "-c", "discard 100M 4M"]);
    let f = File::open(&img).unwrap();
    let data: u64 = data_ranges(&f, 0, f.metadata().unwrap().len()).unwrap().iter().map(|(s, e)| e - s).sum();
    assert!(data >= 20 * MIB, "the file holds {data} bytes of data, freed clusters included");

    let stats = done(pair.full(&ResyncOptions::new(MIB), None));
    eprintln!(
        "qcow2 256M falloc, 16M written + 4M freed ({data} bytes of data in the file): sent {} bytes",
        stats.bytes_sent
    );
    assert!(stats.bytes_sent >= 16 * MIB, "sent {}", stats.bytes_sent);
    assert!(stats.bytes_sent <= 17 * MIB, "sent {}: more than the allocated clusters and metadata", stats.bytes_sent);
    let dst = pair.dst.join("img.qcow2");
    let dst_s = dst.to_str().unwrap();
    qemu_ok("qemu-img", &["compare", "-q", img_s, dst_s]);
    qemu_ok("qemu-img", &["check", "-q", dst_s]);

    // Later writes: a second full resync sends only the clusters that changed.
    qemu_ok("qemu-io", &["-c", "write -P 0x11 200M 1M", img_s]);
    let stats = done(pair.full(&ResyncOptions::new(MIB), None));
    eprintln!("qcow2 after a 1M write: sent {} bytes", stats.bytes_sent);
    assert!(stats.bytes_sent >= MIB && stats.bytes_sent <= 4 * MIB, "sent {}", stats.bytes_sent);
    qemu_ok("qemu-img", &["compare", "-q", img_s, dst_s]);
}

#[test]
fn a_corrupt_qcow2_header_is_resynced_as_raw() {
    // Proves: a file with the qcow2 magic and a nonsense header is copied as a raw file, without a panic.
    let pair = Pair::new();
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.extend(random(3 * MIB - 4, 12));
    std::fs::write(pair.src.join("bad.qcow2"), &bytes).unwrap();
    // A header that parses but points its refcount table outside the file.
    let mut h = vec![0u8; 2 * MIB as usize];
    h[..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes());
    h[48..56].copy_from_slice(&(1u64 << 40).to_be_bytes());
    h[56..60].copy_from_slice(&1u32.to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[MIB as usize..].fill(0x5a);
    std::fs::write(pair.src.join("odd.qcow2"), &h).unwrap();
    let stats = done(pair.full(&ResyncOptions::new(MIB), None));
    assert_eq!(stats.bytes_sent, 3 * MIB + 2 * MIB);
    assert_same_tree(&pair.src, &pair.dst);
}

#[test]
fn the_bandwidth_cap_is_respected() {
    // Proves: with an 8 MiB/s cap, sending 16 MiB takes at least 1.5 s.
    let pair = Pair::new();
    std::fs::write(pair.src.join("f"), random(16 * MIB, 13)).unwrap();
    let mut opts = ResyncOptions::new(MIB);
    opts.bandwidth_bytes_per_s = 8 * MIB;
    let t = Instant::now();
    let stats = done(pair.full(&opts, None));
    let took = t.elapsed();
    eprintln!("16 MiB at an 8 MiB/s cap: {took:?}");
    assert_eq!(stats.bytes_sent, 16 * MIB);
    assert!(took.as_secs_f64() >= 1.5, "took {took:?}");
}

#[test]
fn an_interrupted_full_resync_resumes_and_sends_only_the_rest() {
    // Proves: a full resync stopped after 12 of 32 MiB resumes from its checkpoint and examines and sends only the remaining part.
    let pair = Pair::new();
    for i in 0..4 {
        std::fs::write(pair.src.join(format!("f{i}")), random(8 * MIB, 20 + i)).unwrap();
    }
    let mut opts = ResyncOptions::new(MIB);
    opts.checkpoint = Some(pair.state.join("full.checkpoint"));
    let mut stop = |p: &Progress| if p.bytes_sent >= 12 * MIB { Flow::Stop } else { Flow::Continue };
    let first = full_resync(&pair.source(), &mut pair.peer(), None, &opts, &mut stop).unwrap();
    let Outcome::Stopped(first) = first else { panic!("not stopped: {first:?}") };
    assert!(pair.state.join("full.checkpoint").exists());
    assert_eq!(first.bytes_sent, 12 * MIB);

    let mut first_progress = None;
    let mut watch = |p: &Progress| {
        first_progress.get_or_insert(*p);
        Flow::Continue
    };
    let second = full_resync(&pair.source(), &mut pair.peer(), None, &opts, &mut watch).unwrap();
    let second = done(second);
    eprintln!(
        "resume: first run sent {}, second run sent {} and examined {}",
        first.bytes_sent, second.bytes_sent, second.bytes_examined
    );
    assert!(second.resumed_from.is_some());
    assert_eq!(second.bytes_sent, 20 * MIB, "only the rest is sent");
    assert!(second.bytes_examined <= 20 * MIB, "only the rest is examined: {}", second.bytes_examined);
    let p = first_progress.unwrap();
    assert_eq!(p.bytes_total, 32 * MIB);
    assert!(p.bytes_done >= 12 * MIB, "progress starts where the first run stopped: {p:?}");
    assert!(!pair.state.join("full.checkpoint").exists(), "the checkpoint is removed when done");
    assert_same_tree(&pair.src, &pair.dst);
}

#[test]
fn an_interrupted_incremental_resync_resumes_from_the_maps() {
    // Proves: an incremental resync stopped half way clears what the peer has, and the next one sends only the rest.
    let pair = Pair::new();
    std::fs::write(pair.src.join("vm.img"), random(16 * MIB, 30)).unwrap();
    let opts = ResyncOptions::new(64 * KIB);
    done(pair.full(&opts, None));
    let maps = DirtyMaps::open(&pair.state, 64 * KIB).unwrap();
    let src = pair.source();
    for z in 0..40u64 {
        change(
            &src,
            &maps,
            Op::Write { file: rel("vm.img"), offset: z * 3 * 64 * KIB, data: random(64 * KIB, 200 + z) },
        );
    }
    let mut stop = |p: &Progress| if p.bytes_sent >= MIB { Flow::Stop } else { Flow::Continue };
    let first = incremental_resync(&src, &mut pair.peer(), &maps, &opts, &mut stop).unwrap();
    let Outcome::Stopped(first) = first else { panic!("not stopped") };
    let left = maps.snapshot().zone_count() as u64;
    assert_eq!(left, 40 - first.bytes_sent / (64 * KIB));
    let second = done(pair.incremental(&opts, &maps));
    eprintln!("incremental resume: first {} bytes, second {} bytes", first.bytes_sent, second.bytes_sent);
    assert_eq!(first.bytes_sent + second.bytes_sent, 40 * 64 * KIB);
    assert_same_tree(&pair.src, &pair.dst);
    assert!(maps.is_clean());
}

#[test]
fn overflowed_maps_fall_back_to_a_full_resync() {
    // Proves: when the maps coarsened to "full", the incremental resync runs a full one and the copies end equal.
    let pair = Pair::new();
    std::fs::write(pair.src.join("a"), random(MIB, 40)).unwrap();
    let opts = ResyncOptions::new(MIB);
    done(pair.full(&opts, None));
    let limits = DirtyLimits { files_max: 1, ..DirtyLimits::default() };
    let maps = DirtyMaps::open_with_limits(&pair.state, MIB, limits).unwrap();
    let src = pair.source();
    change(&src, &maps, Op::Write { file: rel("a"), offset: 10, data: b"xyz".to_vec() });
    change(&src, &maps, Op::Create { file: rel("b"), mode: 0o644, uid: uid(), gid: gid() });
    change(&src, &maps, Op::Write { file: rel("b"), offset: 0, data: b"b".to_vec() });
    assert!(maps.snapshot().full);
    let stats = done(pair.incremental(&opts, &maps));
    assert!(stats.full);
    assert_eq!(stats.bytes_sent, MIB + 1, "the changed block of a and all of b");
    assert_same_tree(&pair.src, &pair.dst);
    assert!(maps.is_clean());
}

#[test]
fn the_peer_refuses_paths_through_symlinks() {
    // Proves: a peer path never goes through a symlink, even one inside the tree pointing out of it.
    let pair = Pair::new();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), pair.dst.join("esc")).unwrap();
    let mut peer = pair.peer();
    let r = peer.apply(&Op::Create { file: rel("esc/x"), mode: 0o644, uid: uid(), gid: gid() });
    assert!(r.is_err());
    assert!(!outside.path().join("x").exists());
    assert!(peer.stat(&rel("esc/x")).unwrap().is_none());
}
