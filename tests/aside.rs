//! Saving a split-brain loser's data aside: what the dirty-zone maps name (or everything when
//! they are incomplete) is copied with its content, holes and mode; symlinks are copied, never
//! followed; the destination is named by time and never reused.

mod support;

use hamirror::replication::aside::{aside_dir, save_aside, AsideReport};
use hamirror::replication::dirty::{DirtyFile, DirtySet};
use hamirror::replication::resync::{data_ranges, LocalTree};
use hamirror::replication::{Op, RelPath};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::{symlink, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};
use support::resync_trees::*;

/// The loser's two replicated directories and its state directory.
struct Loser {
    _tmp: tempfile::TempDir,
    roots: Vec<PathBuf>,
    state: PathBuf,
}

impl Loser {
    fn new() -> Loser {
        let tmp = tempfile::tempdir().unwrap();
        let roots = vec![tmp.path().join("srv/data"), tmp.path().join("images/vms")];
        for d in &roots {
            fs::create_dir_all(d).unwrap();
        }
        let state = tmp.path().join("var/lib/hamirror");
        fs::create_dir_all(&state).unwrap();
        Loser { _tmp: tmp, roots, state }
    }
    fn tree(&self) -> LocalTree {
        LocalTree::open(&self.roots).unwrap()
    }
    fn dest(&self) -> PathBuf {
        aside_dir(&self.state, "web01", UNIX_EPOCH + Duration::from_secs(1_714_566_896))
    }
    fn save(&self, set: &DirtySet) -> AsideReport {
        save_aside(&self.tree(), &self.roots, set, &self.dest()).unwrap()
    }
}

fn vm(s: &str) -> RelPath {
    RelPath::new(1, s).unwrap()
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Same size, content and data/hole layout.
fn assert_same_file(a: &Path, b: &Path) {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let size = fa.metadata().unwrap().len();
    assert_eq!(size, fb.metadata().unwrap().len(), "{}: size", b.display());
    assert!(same_content(a, b), "{}: content", b.display());
    assert_eq!(data_ranges(&fa, 0, size).unwrap(), data_ranges(&fb, 0, size).unwrap(), "{}: holes", b.display());
}

/// A sparse 64 MiB image with 1 MiB of data at its start and 64 KiB at 32 MiB.
fn sparse_image(path: &Path) {
    let f = File::create(path).unwrap();
    f.set_len(64 * MIB).unwrap();
    f.write_all_at(&random(MIB, 1), 0).unwrap();
    f.write_all_at(&random(64 * KIB, 2), 32 * MIB).unwrap();
}

#[test]
fn files_named_by_zones_and_namespace_changes_are_saved() {
    // Proves: dirty files and the existing paths of namespace changes are copied with content, holes, mode (no set-id) and mtime, parents created; absent paths, fifos and unnamed files are not.
    let l = Loser::new();
    let (data, vms) = (&l.roots[0], &l.roots[1]);
    fs::write(data.join("doc.txt"), random(10 * KIB, 3)).unwrap();
    fs::set_permissions(data.join("doc.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(data.join("untouched.txt"), b"not named").unwrap();
    fs::create_dir_all(data.join("new/dir")).unwrap();
    fs::set_permissions(data.join("new"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(data.join("new/dir/file.txt"), b"created").unwrap();
    fs::write(data.join("renamed.txt"), b"renamed").unwrap();
    fs::create_dir(data.join("emptydir")).unwrap();
    symlink("doc.txt", data.join("ln")).unwrap();
    fs::write(data.join("suid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(data.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    let fifo = std::ffi::CString::new(data.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    sparse_image(&vms.join("disk.img"));

    let me = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
    let set = DirtySet {
        zone_bytes: 64 * KIB,
        files: BTreeMap::from([
            (rel("doc.txt"), DirtyFile::Zones(vec![0])),
            (vm("disk.img"), DirtyFile::Whole),
            (rel("gone.txt"), DirtyFile::Zones(vec![1])),
        ]),
        namespace: vec![
            Op::Create { file: rel("new/dir/file.txt"), mode: 0o644, uid: me.0, gid: me.1 },
            Op::Rename { from: rel("old.txt"), to: rel("renamed.txt"), flags: 0 },
            Op::Mkdir { dir: rel("emptydir"), mode: 0o755, uid: me.0, gid: me.1 },
            Op::Symlink { link: rel("ln"), target: "doc.txt".into(), uid: me.0, gid: me.1 },
            Op::Mknod { node: rel("fifo"), mode: libc::S_IFIFO | 0o640, rdev: 0, uid: me.0, gid: me.1 },
            Op::SetAttr { path: rel("suid"), mode: Some(0o4755), uid: None, gid: None, atime: None, mtime: None },
            Op::Unlink { file: rel("deleted.txt") },
            Op::SetAttr { path: rel(""), mode: Some(0o755), uid: None, gid: None, atime: None, mtime: None },
        ],
        ..DirtySet::default()
    };
    let report = l.save(&set);
    let (a, b) = (report.dest.join("0-data"), report.dest.join("1-vms"));
    assert_eq!(report.dest, l.dest());
    assert_eq!(report.files, 6, "doc.txt, disk.img, file.txt, renamed.txt, ln, suid");
    assert_eq!(report.bytes, 10 * KIB + MIB + 64 * KIB + 7 + 7 + 10);

    assert_same_file(&data.join("doc.txt"), &a.join("doc.txt"));
    assert_eq!(mode(&a.join("doc.txt")), 0o640);
    let mtime = |p: &Path| fs::symlink_metadata(p).unwrap().modified().unwrap();
    assert_eq!(mtime(&a.join("doc.txt")), mtime(&data.join("doc.txt")));
    assert_same_file(&vms.join("disk.img"), &b.join("disk.img"));
    assert!(fs::metadata(b.join("disk.img")).unwrap().blocks() * 512 < 2 * MIB, "the copy stays sparse");
    assert_same_file(&data.join("new/dir/file.txt"), &a.join("new/dir/file.txt"));
    assert_eq!(mode(&a.join("new")), 0o750, "a parent created as needed has the source's mode");
    assert_eq!(fs::read(a.join("renamed.txt")).unwrap(), b"renamed");
    assert!(fs::read_dir(a.join("emptydir")).unwrap().next().is_none());
    assert_eq!(fs::read_link(a.join("ln")).unwrap(), Path::new("doc.txt"));
    assert_eq!(mode(&a.join("suid")), 0o755, "set-id bits are dropped");
    for absent in ["gone.txt", "old.txt", "deleted.txt", "fifo", "untouched.txt"] {
        assert!(fs::symlink_metadata(a.join(absent)).is_err(), "{absent} saved");
    }
}

#[test]
fn incomplete_maps_save_everything() {
    // Proves: with set.full, both trees are copied whole (files with holes and modes, directories, symlinks), fifos excepted.
    let l = Loser::new();
    let (data, vms) = (&l.roots[0], &l.roots[1]);
    fs::create_dir_all(data.join("a/b/c")).unwrap();
    fs::write(data.join("a/b/c/deep.txt"), random(300 * KIB, 4)).unwrap();
    fs::write(data.join("top.txt"), b"top").unwrap();
    fs::set_permissions(data.join("a/b"), fs::Permissions::from_mode(0o500)).unwrap();
    symlink("a/b", data.join("to-b")).unwrap();
    let fifo = std::ffi::CString::new(data.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    sparse_image(&vms.join("disk.img"));
    fs::write(vms.join("empty"), b"").unwrap();

    let report = l.save(&DirtySet { full: true, ..DirtySet::default() });
    let (a, b) = (report.dest.join("0-data"), report.dest.join("1-vms"));
    assert_eq!(report.files, 5);
    assert_eq!(report.bytes, 300 * KIB + 3 + MIB + 64 * KIB);
    assert_same_file(&data.join("a/b/c/deep.txt"), &a.join("a/b/c/deep.txt"));
    assert_same_file(&data.join("top.txt"), &a.join("top.txt"));
    assert_same_file(&vms.join("disk.img"), &b.join("disk.img"));
    assert_same_file(&vms.join("empty"), &b.join("empty"));
    assert_eq!(mode(&a.join("a/b")), 0o500, "a read-only directory is filled, then given its mode");
    assert_eq!(fs::read_link(a.join("to-b")).unwrap(), Path::new("a/b"));
    assert!(fs::symlink_metadata(a.join("fifo")).is_err());
    fs::set_permissions(data.join("a/b"), fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_symlink_out_of_the_tree_is_saved_as_a_link() {
    // Proves: symlinks pointing outside the tree are copied as symlinks; neither a named path through one nor a full copy reads or writes outside.
    let l = Loser::new();
    let data = &l.roots[0];
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret.txt"), b"secret").unwrap();
    symlink(outside.path(), data.join("escape")).unwrap();
    symlink("/etc/passwd", data.join("abs")).unwrap();
    let set = DirtySet {
        files: BTreeMap::from([(rel("abs"), DirtyFile::Whole), (rel("escape/secret.txt"), DirtyFile::Whole)]),
        namespace: vec![Op::Unlink { file: rel("escape/secret.txt") }],
        ..DirtySet::default()
    };
    let named = l.save(&set);
    let a = named.dest.join("0-data");
    assert_eq!(fs::read_link(a.join("abs")).unwrap(), Path::new("/etc/passwd"));
    assert!(fs::symlink_metadata(a.join("escape")).is_err(), "a path through a symlink is not saved");
    assert_eq!((named.files, named.bytes), (1, 0));

    let full = l.save(&DirtySet { full: true, ..DirtySet::default() });
    let a = full.dest.join("0-data");
    assert_eq!(fs::read_link(a.join("abs")).unwrap(), Path::new("/etc/passwd"));
    assert_eq!(fs::read_link(a.join("escape")).unwrap(), outside.path());
    assert_eq!((full.files, full.bytes), (2, 0), "nothing read through a link");
    let names: Vec<_> = fs::read_dir(outside.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec!["secret.txt"], "nothing written outside");
}

#[test]
fn the_destination_is_named_by_time_and_never_reused() {
    // Proves: aside_dir is <state>-splitbrain/<module>/<UTC time>; a second save into an existing destination gets -1, then -2; destinations are private (0700).
    let t = UNIX_EPOCH + Duration::from_secs(1_714_566_896);
    let want = Path::new("/var/lib/hamirror-splitbrain/web01/2024-05-01T12-34-56Z");
    assert_eq!(aside_dir(Path::new("/var/lib/hamirror"), "web01", t), want);
    assert_eq!(aside_dir(Path::new("/var/lib/hamirror/"), "web01", t), want);
    let leap = UNIX_EPOCH + Duration::from_millis(951_868_799_999); // 2000-02-29T23:59:59.999Z
    assert_eq!(aside_dir(Path::new("/s"), "m", leap), Path::new("/s-splitbrain/m/2000-02-29T23-59-59Z"));

    let l = Loser::new();
    let set = DirtySet::default();
    let first = l.save(&set).dest;
    let second = l.save(&set).dest;
    let third = l.save(&set).dest;
    assert_eq!(first, l.dest());
    assert_eq!(second.to_str().unwrap(), format!("{}-1", first.display()));
    assert_eq!(third.to_str().unwrap(), format!("{}-2", first.display()));
    for d in [&first, &second, first.parent().unwrap(), first.parent().unwrap().parent().unwrap()] {
        assert_eq!(mode(d), 0o700, "{}", d.display());
    }
    assert!(first.join("0-data").is_dir() && first.join("1-vms").is_dir());

    let err = save_aside(&l.tree(), &l.roots[..1], &set, &l.dest()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}
