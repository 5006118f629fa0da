//! The mountover on real FUSE mounts over temp directories (needs root and /dev/fuse; each test
//! says "skipped" and passes without them). A RecordingSink stands for the replication: it keeps
//! every op and every sync point. Every mount is taken away by the fixture's Drop, even when
//! an assertion fails.

use hamirror::replication::mountover::{recover_stale_mount, MountMode, Mountover, FS_TYPE, FUSE_SUPER_MAGIC};
use hamirror::replication::{Op, OpSink, RelPath, Timestamp};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// The owner this test creates files with (the mountover and the receiver ship and apply it).
fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}
fn gid() -> u32 {
    nix::unistd::getegid().as_raw()
}

/// Collects the ops and the sync points; `fail` makes every sync point fail.
#[derive(Default)]
struct RecordingSink {
    ops: Mutex<Vec<(u64, Op)>>,
    waits: Mutex<Vec<u64>>,
    next: AtomicU64,
    fail: AtomicBool,
}

impl OpSink for RecordingSink {
    fn submit(&self, op: Op) -> u64 {
        let mut ops = self.ops.lock().unwrap();
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        ops.push((seq, op));
        seq
    }
    fn wait_durable(&self, seq: u64) -> io::Result<()> {
        self.waits.lock().unwrap().push(seq);
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other("peer and dirty map both unavailable"));
        }
        Ok(())
    }
}

impl RecordingSink {
    fn take(&self) -> Vec<Op> {
        std::mem::take(&mut *self.ops.lock().unwrap()).into_iter().map(|(_, op)| op).collect()
    }
    fn take_with_seq(&self) -> Vec<(u64, Op)> {
        std::mem::take(&mut *self.ops.lock().unwrap())
    }
    fn take_waits(&self) -> Vec<u64> {
        std::mem::take(&mut *self.waits.lock().unwrap())
    }
}

fn can_mount() -> bool {
    let ok = nix::unistd::geteuid().is_root() && Path::new("/dev/fuse").exists();
    if !ok {
        eprintln!("skipped: needs root and /dev/fuse");
    }
    ok
}

fn rp(path: &str) -> RelPath {
    RelPath::new(0, path).unwrap()
}

/// A temp dir with `mnt` inside, a mountover on `mnt`, and an fd of the real `mnt` taken before
/// the mount (to look underneath). Unmounts on drop.
struct Fixture {
    sink: Arc<RecordingSink>,
    mount: Option<Mountover>,
    dir: PathBuf,
    under: File,
    tmp: tempfile::TempDir,
}

impl Fixture {
    fn new(mode: MountMode, notreplicated: &[&str], populate: impl FnOnce(&Path)) -> Option<Fixture> {
        if !can_mount() {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mnt");
        fs::create_dir(&dir).unwrap();
        populate(&dir);
        let under = File::open(&dir).unwrap();
        let sink = Arc::new(RecordingSink::default());
        let notreplicated: Vec<PathBuf> = notreplicated.iter().map(PathBuf::from).collect();
        let mount = Mountover::mount(&dir, 0, mode, &notreplicated, sink.clone()).unwrap();
        Some(Fixture { sink, mount: Some(mount), dir, under, tmp })
    }

    /// A path through the mount.
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The same path in the real directory underneath.
    fn real(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{rel}", self.under.as_raw_fd()))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(mount) = self.mount.take() {
            if let Ok(detached) = mount.unmount() {
                let _ = detached.finish(Duration::from_secs(5));
            }
        }
    }
}

fn errno_of<T: std::fmt::Debug>(result: io::Result<T>) -> i32 {
    result.expect_err("expected an error").raw_os_error().unwrap_or(0)
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (path, name) = (cpath(path), CString::new(name).unwrap());
    // SAFETY: NUL-terminated strings and a value slice that live across the call.
    let ret = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_xattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (path, name) = (cpath(path), CString::new(name).unwrap());
    let mut buf = vec![0u8; 4096];
    // SAFETY: NUL-terminated strings; `buf` is writable for its length.
    let ret = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(ret as usize);
    Ok(buf)
}

fn list_xattr(path: &Path) -> io::Result<Vec<String>> {
    let path = cpath(path);
    let mut buf = vec![0u8; 4096];
    // SAFETY: NUL-terminated path; `buf` is writable for its length.
    let ret = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(ret as usize);
    Ok(buf.split(|b| *b == 0).filter(|n| !n.is_empty()).map(|n| String::from_utf8_lossy(n).into_owned()).collect())
}

fn remove_xattr(path: &Path, name: &str) -> io::Result<()> {
    let (path, name) = (cpath(path), CString::new(name).unwrap());
    // SAFETY: NUL-terminated strings.
    let ret = unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn lseek(file: &File, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain integers on an open fd.
    let ret = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn statfs_type(path: &Path) -> io::Result<i64> {
    let st = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(st.filesystem_type().0 as i64)
}

/// A 4 KiB aligned buffer of `len` bytes inside `storage`.
fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + 4096, 0);
    let off = storage.as_ptr().align_offset(4096);
    &mut storage[off..off + len]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8).collect()
}

// Each change through the mount gives exactly one op, in order, naming the path relative to
// the mounted directory: create, write, truncate, chmod, chown, utimes, xattrs, mkdir,
// symlink, link, rename, unlink, mknod, rmdir.
#[test]
fn each_change_gives_one_op_with_the_relative_path() {
    // Open to other users, for the creations by a non-root user at the end.
    let open_up = |dir: &Path| {
        fs::set_permissions(dir.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
    };
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], open_up) else { return };
    let sink = &fx.sink;

    fs::write(fx.path("a"), b"hello").unwrap();
    let mode = fs::metadata(fx.real("a")).unwrap().mode() & 0o7777;
    assert_eq!(
        sink.take(),
        vec![
            Op::Create { file: rp("a"), mode, uid: uid(), gid: gid() },
            Op::Write { file: rp("a"), offset: 0, data: b"hello".to_vec() }
        ]
    );

    OpenOptions::new().write(true).open(fx.path("a")).unwrap().set_len(2).unwrap();
    assert_eq!(sink.take(), vec![Op::Truncate { file: rp("a"), size: 2 }]);

    fs::set_permissions(fx.path("a"), fs::Permissions::from_mode(0o640)).unwrap();
    let setattr = |mode, uid, gid, atime, mtime| Op::SetAttr { path: rp("a"), mode, uid, gid, atime, mtime };
    assert_eq!(sink.take(), vec![setattr(Some(0o640), None, None, None, None)]);

    std::os::unix::fs::chown(fx.path("a"), Some(1234), Some(5678)).unwrap();
    assert_eq!(sink.take(), vec![setattr(None, Some(1234), Some(5678), None, None)]);

    let when = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
    let times = fs::FileTimes::new().set_accessed(when).set_modified(when);
    File::options().write(true).open(fx.path("a")).unwrap().set_times(times).unwrap();
    let ts = Some(Timestamp { secs: 1_700_000_000, nanos: 123_456_789 });
    assert_eq!(sink.take(), vec![setattr(None, None, None, ts, ts)]);

    set_xattr(&fx.path("a"), "user.colour", b"blue").unwrap();
    remove_xattr(&fx.path("a"), "user.colour").unwrap();
    assert_eq!(
        sink.take(),
        vec![
            Op::SetXattr { path: rp("a"), name: "user.colour".into(), value: b"blue".to_vec(), flags: 0 },
            Op::RemoveXattr { path: rp("a"), name: "user.colour".into() },
        ]
    );

    fs::create_dir(fx.path("d")).unwrap();
    let dmode = fs::metadata(fx.real("d")).unwrap().mode() & 0o7777;
    std::os::unix::fs::symlink("../a", fx.path("d/l")).unwrap();
    fs::hard_link(fx.path("a"), fx.path("d/h")).unwrap();
    fs::rename(fx.path("a"), fx.path("d/b")).unwrap();
    fs::remove_file(fx.path("d/h")).unwrap();
    nix::unistd::mkfifo(&fx.path("d/f"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert_eq!(
        sink.take(),
        vec![
            Op::Mkdir { dir: rp("d"), mode: dmode, uid: uid(), gid: gid() },
            Op::Symlink { link: rp("d/l"), target: "../a".into(), uid: uid(), gid: gid() },
            Op::Link { existing: rp("a"), new: rp("d/h") },
            Op::Rename { from: rp("a"), to: rp("d/b"), flags: 0 },
            Op::Unlink { file: rp("d/h") },
            Op::Mknod { node: rp("d/f"), mode: libc::S_IFIFO | 0o600, rdev: 0, uid: uid(), gid: gid() },
        ]
    );

    // The renamed file keeps producing ops under its new name.
    fs::OpenOptions::new().append(true).open(fx.path("d/b")).unwrap().write_all(b"!").unwrap();
    assert_eq!(sink.take(), vec![Op::Write { file: rp("d/b"), offset: 2, data: b"!".to_vec() }]);

    for name in ["d/f", "d/l", "d/b"] {
        fs::remove_file(fx.path(name)).unwrap();
    }
    fs::remove_dir(fx.path("d")).unwrap();
    assert_eq!(
        sink.take(),
        vec![
            Op::Unlink { file: rp("d/f") },
            Op::Unlink { file: rp("d/l") },
            Op::Unlink { file: rp("d/b") },
            Op::Rmdir { dir: rp("d") }
        ]
    );
    assert!(fs::read_dir(fx.real("")).unwrap().next().is_none());

    // Entries created by a non-root user carry that owner, and the receiver gives it to its
    // copies.
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("user nobody");
    let (n_uid, n_gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let script = "touch file && mkdir dir && ln -s file link && mkfifo fifo";
    let runuser = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--", "sh", "-c", script])
        .current_dir(fx.path(""))
        .status();
    let status = match runuser {
        Ok(status) => status,
        Err(_) => std::process::Command::new("setpriv")
            .arg(format!("--reuid={n_uid}"))
            .arg(format!("--regid={n_gid}"))
            .args(["--clear-groups", "sh", "-c", script])
            .current_dir(fx.path(""))
            .status()
            .unwrap(),
    };
    assert!(status.success(), "creating as nobody failed: {status}");
    let ops = sink.take();
    let created: Vec<(RelPath, u32, u32)> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Create { file: p, uid, gid, .. }
            | Op::Mkdir { dir: p, uid, gid, .. }
            | Op::Mknod { node: p, uid, gid, .. }
            | Op::Symlink { link: p, uid, gid, .. } => Some((p.clone(), *uid, *gid)),
            _ => None,
        })
        .collect();
    let names = ["file", "dir", "link", "fifo"];
    assert_eq!(created, names.iter().map(|n| (rp(n), n_uid, n_gid)).collect::<Vec<_>>(), "{ops:?}");
    let peer = tempfile::tempdir().unwrap();
    let mut receiver = hamirror::replication::receiver::Receiver::new(vec![peer.path().to_path_buf()]).unwrap();
    for op in &ops {
        receiver.apply(op).unwrap();
    }
    for name in names {
        let copy = fs::symlink_metadata(peer.path().join(name)).unwrap();
        let real = fs::symlink_metadata(fx.real(name)).unwrap();
        assert_eq!((copy.uid(), copy.gid()), (n_uid, n_gid), "{name} on the receiver");
        assert_eq!((real.uid(), real.gid()), (n_uid, n_gid), "{name} on the primary");
        assert_eq!(copy.mode(), real.mode(), "{name}");
    }
}

// The real directory holds exactly the bytes written through the mount, and replaying the
// Write/Truncate ops rebuilds the same bytes.
#[test]
fn real_directory_and_replayed_ops_hold_the_written_bytes() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |_| {}) else { return };
    let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(fx.path("img")).unwrap();
    let mut model = vec![0u8; 0];
    let writes = [(0u64, 3 << 20, 1u8), (4096, 1 << 20, 2), (1_000_001, 70_000, 3), (5 << 20, 12_345, 4)];
    for (offset, len, seed) in writes {
        let data = pattern(len, seed);
        file.write_all_at(&data, offset).unwrap();
        let end = offset as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[offset as usize..end].copy_from_slice(&data);
    }
    file.set_len(6 << 20).unwrap();
    model.resize(6 << 20, 0);
    drop(file);

    assert_eq!(fs::read(fx.real("img")).unwrap(), model);
    assert_eq!(fs::read(fx.path("img")).unwrap(), model);

    let mut replay = Vec::new();
    for op in fx.sink.take() {
        match op {
            Op::Write { file, offset, data } => {
                assert_eq!(file, rp("img"));
                let end = offset as usize + data.len();
                if replay.len() < end {
                    replay.resize(end, 0);
                }
                replay[offset as usize..end].copy_from_slice(&data);
            }
            Op::Truncate { size, .. } => replay.resize(size as usize, 0),
            Op::Create { .. } => {}
            other => panic!("unexpected op {other:?}"),
        }
    }
    assert!(replay == model, "replayed ops differ from the file");
}

// `..` is resolved by the kernel's mount tree, never by the server: from a subdirectory it is
// the mount's root, from the root it is the real parent, and the server sees no lookup that
// could take it above the directory (the server's own `..` handling is a unit test in
// src/replication/mountover.rs).
#[test]
fn dotdot_stays_inside_and_root_dotdot_is_the_real_parent() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |dir| fs::create_dir(dir.join("sub")).unwrap()) else {
        return;
    };
    let root = fs::metadata(fx.path("")).unwrap();
    let via_sub = fs::metadata(fx.path("sub/..")).unwrap();
    assert_eq!((via_sub.dev(), via_sub.ino()), (root.dev(), root.ino()));
    assert_eq!(statfs_type(&fx.path("sub/..")).unwrap(), FUSE_SUPER_MAGIC);

    let parent = fs::metadata(fx.tmp.path()).unwrap();
    let above = fs::metadata(fx.path("..")).unwrap();
    assert_eq!((above.dev(), above.ino()), (parent.dev(), parent.ino()));
    let above2 = fs::metadata(fx.path("sub/../..")).unwrap();
    assert_eq!((above2.dev(), above2.ino()), (parent.dev(), parent.ino()));

    // The root lists `..`, and nothing was changed.
    let names: Vec<_> = fs::read_dir(fx.path("")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("sub")]);
    assert!(fx.sink.take().is_empty());
}

// An absolute symlink and a `..` symlink pointing out are stored as links (same targets in the
// real directory, shipped as Symlink ops); following them is the kernel's job: a write through
// them lands on the outside file and produces no op, and lchown changes the link, not the target.
#[test]
fn symlinks_pointing_out_are_links_and_the_server_never_follows_them() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |_| {}) else { return };
    let outside = fx.tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"outside data").unwrap();
    let absolute = outside.join("secret");

    std::os::unix::fs::symlink(&absolute, fx.path("abs")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", fx.path("rel")).unwrap();
    std::os::unix::fs::symlink("../../../../../../etc", fx.path("etc")).unwrap();
    assert_eq!(
        fx.sink.take(),
        vec![
            Op::Symlink { link: rp("abs"), target: absolute.to_str().unwrap().into(), uid: uid(), gid: gid() },
            Op::Symlink { link: rp("rel"), target: "../outside/secret".into(), uid: uid(), gid: gid() },
            Op::Symlink { link: rp("etc"), target: "../../../../../../etc".into(), uid: uid(), gid: gid() },
        ]
    );
    assert!(fs::symlink_metadata(fx.real("abs")).unwrap().file_type().is_symlink());
    assert_eq!(fs::read_link(fx.real("abs")).unwrap(), absolute);
    assert_eq!(fs::read_link(fx.real("rel")).unwrap(), PathBuf::from("../outside/secret"));
    assert_eq!(fs::read_link(fx.path("rel")).unwrap(), PathBuf::from("../outside/secret"));

    // The kernel follows them, from the caller's view of the tree.
    assert_eq!(fs::read(fx.path("abs")).unwrap(), b"outside data");
    assert_eq!(fs::read(fx.path("rel")).unwrap(), b"outside data");
    assert!(fs::metadata(fx.path("etc/passwd")).is_ok());
    OpenOptions::new().append(true).open(fx.path("rel")).unwrap().write_all(b"!").unwrap();
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"outside data!");
    assert!(fx.sink.take().is_empty(), "a write through a link pointing out must not reach the server");

    // lchown acts on the link itself.
    std::os::unix::fs::lchown(fx.path("abs"), Some(4321), Some(4321)).unwrap();
    assert_eq!(fs::symlink_metadata(fx.real("abs")).unwrap().uid(), 4321);
    assert_eq!(fs::metadata(&absolute).unwrap().uid(), 0);
    assert_eq!(
        fx.sink.take(),
        vec![Op::SetAttr { path: rp("abs"), mode: None, uid: Some(4321), gid: Some(4321), atime: None, mtime: None }]
    );
}

// O_DIRECT opens (qemu cache=none) work with 4 KiB aligned buffers: the bytes reach the real
// file, read back equal, and each write is a sync point; an unaligned O_DIRECT write works too.
#[test]
fn o_direct_writes_and_reads_with_aligned_buffers() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |_| {}) else { return };
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(fx.path("disk.raw"))
        .unwrap();
    let mut storage = Vec::new();
    let first = pattern(64 << 10, 7);
    aligned(&mut storage, first.len()).copy_from_slice(&first);
    file.write_all_at(aligned(&mut storage, first.len()), 0).unwrap();
    let second = pattern(16 << 10, 9);
    aligned(&mut storage, second.len()).copy_from_slice(&second);
    file.write_all_at(aligned(&mut storage, second.len()), (1 << 20) + 4096).unwrap();

    let mut back = Vec::new();
    file.read_exact_at(aligned(&mut back, first.len()), 0).unwrap();
    assert!(aligned(&mut back, first.len()) == &first[..]);
    file.read_exact_at(aligned(&mut back, second.len()), (1 << 20) + 4096).unwrap();
    assert!(aligned(&mut back, second.len()) == &second[..]);

    let real = fs::read(fx.real("disk.raw")).unwrap();
    assert_eq!(real.len(), (1 << 20) + 4096 + second.len());
    assert!(real[..first.len()] == first[..] && real[(1 << 20) + 4096..] == second[..]);

    let ops = fx.sink.take_with_seq();
    let writes: Vec<u64> = ops.iter().filter(|(_, op)| matches!(op, Op::Write { .. })).map(|(seq, _)| *seq).collect();
    assert!(!writes.is_empty());
    let waits = fx.sink.take_waits();
    for seq in &writes {
        assert!(waits.contains(seq), "O_DIRECT write {seq} did not wait for durability ({waits:?})");
    }

    // Unaligned O_DIRECT request: the server falls back to a buffered fd for it.
    let mut odd = Vec::new();
    aligned(&mut odd, 100).copy_from_slice(&[0xab; 100]);
    match file.write_at(aligned(&mut odd, 100), 10) {
        Ok(n) => {
            assert_eq!(n, 100);
            assert_eq!(&fs::read(fx.real("disk.raw")).unwrap()[10..110], &[0xab; 100][..]);
        }
        // The kernel may refuse unaligned O_DIRECT itself; then the server never saw it.
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL)),
    }
}

// A sparse file with data at 5 GiB has the right size, holes and data for SEEK_HOLE/SEEK_DATA
// through the mount, stays sparse underneath, and a punched hole is shipped as Fallocate.
#[test]
fn sparse_file_beyond_4_gib_keeps_its_holes() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |_| {}) else { return };
    let five_gib: u64 = 5 << 30;
    let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(fx.path("sparse")).unwrap();
    file.write_all_at(&[0x5a; 4096], five_gib).unwrap();
    assert_eq!(fs::metadata(fx.path("sparse")).unwrap().len(), five_gib + 4096);
    assert_eq!(lseek(&file, 0, libc::SEEK_HOLE).unwrap(), 0);
    assert_eq!(lseek(&file, 0, libc::SEEK_DATA).unwrap() as u64, five_gib);
    let real = fs::metadata(fx.real("sparse")).unwrap();
    assert_eq!(real.len(), five_gib + 4096);
    assert!(real.blocks() < 1024, "the real file is not sparse: {} blocks", real.blocks());
    let mut back = [0u8; 4096];
    file.read_exact_at(&mut back, five_gib).unwrap();
    assert_eq!(back, [0x5a; 4096]);

    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain integers on an open fd.
    let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, five_gib as i64, 4096) };
    assert_eq!(ret, 0, "{}", io::Error::last_os_error());
    assert_eq!(errno_of(lseek(&file, 0, libc::SEEK_DATA)), libc::ENXIO);
    let ops = fx.sink.take();
    assert!(ops.contains(&Op::Write { file: rp("sparse"), offset: five_gib, data: vec![0x5a; 4096] }));
    assert_eq!(ops.last(), Some(&Op::Fallocate { file: rp("sparse"), mode, offset: five_gib, len: 4096 }));
}

// mmap'd reads see the data written through the mount, including a later write.
#[test]
fn mmap_reads_see_written_data() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |_| {}) else { return };
    let data = pattern(3 * 4096 + 100, 3);
    fs::write(fx.path("m"), &data).unwrap();
    let file = File::open(fx.path("m")).unwrap();
    let len = data.len();
    // SAFETY: a fresh read-only shared mapping of an open file, unmapped below.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    assert_ne!(ptr, libc::MAP_FAILED, "{}", io::Error::last_os_error());
    // SAFETY: the mapping is `len` bytes long and readable until munmap.
    let mapped = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
    assert!(mapped == &data[..]);
    OpenOptions::new().write(true).open(fx.path("m")).unwrap().write_all_at(b"NEW", 4096).unwrap();
    assert_eq!(&mapped[4096..4099], b"NEW");
    // SAFETY: unmapping the mapping made above; `mapped` is not used afterwards.
    unsafe { libc::munmap(ptr, len) };

    // A shared writable mapping is written back through the server, and shipped.
    fx.sink.take();
    let file = OpenOptions::new().read(true).write(true).open(fx.path("m")).unwrap();
    let flags = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a fresh shared mapping of an open file, unmapped below.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, flags, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    assert_ne!(ptr, libc::MAP_FAILED, "{}", io::Error::last_os_error());
    // SAFETY: the mapping is `len` bytes long and writable until munmap.
    let mapped = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
    mapped[8192..8197].copy_from_slice(b"MMAP!");
    // SAFETY: msync and munmap of the mapping made above; `mapped` is not used afterwards.
    unsafe {
        assert_eq!(libc::msync(ptr, len, libc::MS_SYNC), 0);
        libc::munmap(ptr, len);
    }
    drop(file);
    assert_eq!(&fs::read(fx.real("m")).unwrap()[8192..8197], b"MMAP!");
    let shipped = fx.sink.take().into_iter().any(|op| match op {
        Op::Write { file, offset, data } => {
            file == rp("m") && offset <= 8192 && offset as usize + data.len() >= 8197 && {
                let at = 8192 - offset as usize;
                &data[at..at + 5] == b"MMAP!"
            }
        }
        _ => false,
    });
    assert!(shipped, "the mmap write-back was not shipped");
}

// Renaming a file over one that is held open keeps the held fd working on the old inode, and
// its later writes are not shipped under the name that now belongs to the new file.
#[test]
fn rename_over_an_open_file_keeps_the_fd_working() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |_| {}) else { return };
    fs::write(fx.path("a"), b"old").unwrap();
    let held = OpenOptions::new().read(true).write(true).open(fx.path("a")).unwrap();
    fs::write(fx.path("b"), b"new").unwrap();
    fx.sink.take();
    fs::rename(fx.path("b"), fx.path("a")).unwrap();
    assert_eq!(fx.sink.take(), vec![Op::Rename { from: rp("b"), to: rp("a"), flags: 0 }]);

    let mut buf = [0u8; 3];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"old");
    held.write_all_at(b"OLD", 0).unwrap();
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"OLD");
    held.sync_all().unwrap();
    assert_eq!(fs::read(fx.path("a")).unwrap(), b"new");
    assert_eq!(fs::read(fx.real("a")).unwrap(), b"new");
    assert!(
        fx.sink.take().iter().all(|op| !matches!(op, Op::Write { .. })),
        "a write to the replaced inode was shipped"
    );
}

// fsync and fdatasync ship an Fsync op and wait for it, O_SYNC writes and close wait too, and
// an erroring sink gives EIO to the application.
#[test]
fn sync_points_wait_for_durability_and_a_failing_sink_gives_eio() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |_| {}) else { return };
    let mut file = File::create(fx.path("db")).unwrap();
    file.write_all(b"commit 1").unwrap();
    file.sync_all().unwrap();
    file.sync_data().unwrap();
    let ops = fx.sink.take_with_seq();
    let fsyncs: Vec<_> = ops.iter().filter(|(_, op)| matches!(op, Op::Fsync { .. })).collect();
    assert_eq!(fsyncs.len(), 2);
    assert_eq!(fsyncs[0].1, Op::Fsync { file: Some(rp("db")), datasync: false });
    assert_eq!(fsyncs[1].1, Op::Fsync { file: Some(rp("db")), datasync: true });
    let waits = fx.sink.take_waits();
    assert!(waits.contains(&fsyncs[0].0) && waits.contains(&fsyncs[1].0), "{waits:?}");

    // Close after a write waits for that write.
    file.write_all(b" commit 2").unwrap();
    let write_seq = fx.sink.take_with_seq().last().unwrap().0;
    drop(file);
    assert!(fx.sink.take_waits().contains(&write_seq));

    // O_SYNC: every write waits.
    let mut synced = OpenOptions::new().write(true).custom_flags(libc::O_SYNC).open(fx.path("db")).unwrap();
    synced.write_all(b"C").unwrap();
    let seq = fx.sink.take_with_seq().last().unwrap().0;
    assert!(fx.sink.take_waits().contains(&seq));

    // The sink cannot make anything durable: the application sees EIO at each sync point.
    fx.sink.fail.store(true, Ordering::SeqCst);
    assert_eq!(errno_of(synced.write_all(b"D")), libc::EIO);
    let mut file = OpenOptions::new().write(true).open(fx.path("db")).unwrap();
    file.write_all(b"x").unwrap();
    assert_eq!(errno_of(file.sync_all()), libc::EIO);
    assert_eq!(errno_of(file.sync_data()), libc::EIO);
    // close(2) reports the flush error too.
    let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
    // SAFETY: `fd` was just released by the File, so it is closed exactly once.
    let ret = unsafe { libc::close(fd) };
    assert_eq!(ret, -1);
    assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EIO));
    fx.sink.fail.store(false, Ordering::SeqCst);
}

// The secondary's read-only view serves reads and refuses every change with EROFS, no op.
#[test]
fn read_only_mode_refuses_changes_with_erofs() {
    let Some(fx) = Fixture::new(MountMode::ReadOnly, &[], |dir| {
        fs::write(dir.join("f"), b"replica").unwrap();
        fs::create_dir(dir.join("d")).unwrap();
    }) else {
        return;
    };
    assert_eq!(fs::read(fx.path("f")).unwrap(), b"replica");
    assert_eq!(errno_of(File::create(fx.path("new"))), libc::EROFS);
    assert_eq!(errno_of(OpenOptions::new().write(true).open(fx.path("f"))), libc::EROFS);
    assert_eq!(errno_of(fs::create_dir(fx.path("d2"))), libc::EROFS);
    assert_eq!(errno_of(fs::remove_file(fx.path("f"))), libc::EROFS);
    assert_eq!(errno_of(fs::rename(fx.path("f"), fx.path("g"))), libc::EROFS);
    assert_eq!(errno_of(fs::set_permissions(fx.path("f"), fs::Permissions::from_mode(0o600))), libc::EROFS);
    assert_eq!(errno_of(set_xattr(&fx.path("f"), "user.x", b"1")), libc::EROFS);
    assert_eq!(errno_of(std::os::unix::fs::symlink("f", fx.path("l"))), libc::EROFS);
    assert!(fx.sink.take().is_empty());

    // The receiver writes underneath; the view shows it (nothing is cached in this mode).
    fs::write(fx.real("f"), b"replica v2").unwrap();
    assert_eq!(fs::read(fx.path("f")).unwrap(), b"replica v2");
}

// Paths under a notreplicated entry are served but produce no op; a sibling sharing the
// prefix is replicated; renames across the boundary are refused with EXDEV (mv then copies).
#[test]
fn notreplicated_paths_are_served_without_ops() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &["cache"], |_| {}) else { return };
    fs::create_dir(fx.path("cache")).unwrap();
    fs::write(fx.path("cache/x"), b"scratch").unwrap();
    fs::create_dir(fx.path("cache/sub")).unwrap();
    fs::rename(fx.path("cache/x"), fx.path("cache/sub/y")).unwrap();
    let mut f = File::create(fx.path("cache/sub/z")).unwrap();
    f.write_all(b"z").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(fx.real("cache/sub/y")).unwrap(), b"scratch");
    assert!(fx.sink.take().is_empty());
    assert!(fx.sink.take_waits().is_empty());

    fs::write(fx.path("cachet"), b"kept").unwrap();
    assert_eq!(fx.sink.take().len(), 2);

    assert_eq!(errno_of(fs::rename(fx.path("cache/sub/y"), fx.path("y"))), libc::EXDEV);
    assert_eq!(errno_of(fs::rename(fx.path("cachet"), fx.path("cache/t"))), libc::EXDEV);
    assert_eq!(errno_of(fs::hard_link(fx.path("cachet"), fx.path("cache/t"))), libc::EXDEV);
    assert!(fx.sink.take().is_empty());
}

// A lazy unmount with a file held open: new opens reach the real directory at once (no op),
// the held fd keeps working through the detached mount (its writes still ship), and the
// session ends when it is closed.
#[test]
fn lazy_unmount_with_a_file_held_open_keeps_the_fd_working() {
    let Some(mut fx) = Fixture::new(MountMode::ReadWrite, &[], |_| {}) else { return };
    let held = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(fx.path("vm.img")).unwrap();
    held.write_all_at(b"before", 0).unwrap();
    fx.sink.take();

    let mut detached = fx.mount.take().unwrap().unmount().unwrap();
    assert_ne!(statfs_type(&fx.dir).unwrap(), FUSE_SUPER_MAGIC);
    assert!(!detached.is_finished());

    held.write_all_at(b"after!", 0).unwrap();
    let mut buf = [0u8; 6];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"after!");
    assert_eq!(fx.sink.take(), vec![Op::Write { file: rp("vm.img"), offset: 0, data: b"after!".to_vec() }]);

    fs::write(fx.dir.join("plain"), b"direct").unwrap();
    assert_eq!(fs::read(fx.dir.join("vm.img")).unwrap(), b"after!");
    assert!(fx.sink.take().is_empty());

    drop(held);
    assert!(detached.wait(Duration::from_secs(10)), "session still running after the last file was closed");
}

// Not a test by itself: the child process of `stale_mount_of_a_killed_daemon_is_recovered`,
// which mounts and waits to be killed (does nothing unless the parent sets the variable).
#[test]
fn stale_mount_child_process() {
    let Some(dir) = std::env::var_os("HAMIRROR_MOUNTOVER_CHILD_DIR") else { return };
    let mount = Mountover::mount(Path::new(&dir), 0, MountMode::ReadWrite, &[], Arc::new(RecordingSink::default()));
    let _mount = mount.unwrap();
    println!("CHILD MOUNTED");
    io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

// A mountover whose daemon was killed with -9 leaves a dead mount (ENOTCONN); the next mount
// detects it, removes it with a lazy unmount and serves the directory again.
#[test]
fn stale_mount_of_a_killed_daemon_is_recovered() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnt");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("kept"), b"data").unwrap();

    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "stale_mount_child_process", "--nocapture", "--test-threads=1"])
        .env("HAMIRROR_MOUNTOVER_CHILD_DIR", &dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard { child, dir: dir.clone() };
    let child = &mut guard.child;
    let stdout = child.stdout.take().unwrap();
    let mounted = BufReader::new(stdout).lines().map_while(Result::ok).any(|line| line.contains("CHILD MOUNTED"));
    assert!(mounted, "the child did not mount");
    assert_eq!(statfs_type(&dir).unwrap(), FUSE_SUPER_MAGIC);
    child.kill().unwrap();
    child.wait().unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::metadata(&dir) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)) => break,
            other if Instant::now() > deadline => panic!("the killed daemon's mount is not dead: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(mountinfo.contains(FS_TYPE));

    let sink = Arc::new(RecordingSink::default());
    let mount = Mountover::mount(&dir, 0, MountMode::ReadWrite, &[], sink.clone());
    let mount = match mount {
        Ok(mount) => mount,
        Err(e) => {
            let _ = recover_stale_mount(&dir);
            panic!("mount over the stale mount failed: {e}");
        }
    };
    drop(guard);
    // `under` is not used here (the real directory was only reachable before the child mounted).
    let fx = Fixture { sink, mount: Some(mount), under: File::open(tmp.path()).unwrap(), dir: dir.clone(), tmp };
    assert_eq!(fs::read(fx.path("kept")).unwrap(), b"data");
    fs::write(fx.path("new"), b"x").unwrap();
    assert_eq!(fx.sink.take().len(), 2);
    assert_eq!(recover_stale_mount(&dir).map_err(|e| e.kind()), Err(io::ErrorKind::AlreadyExists));
}

/// Kills the child and removes its dead mount when the stale-mount test fails half-way.
struct ChildGuard {
    child: std::process::Child,
    dir: PathBuf,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let _ = recover_stale_mount(&self.dir);
        }
    }
}

// Hard links share their bytes through the mount; a write is shipped under a name that still
// exists (after the first name is removed, under the other), and user xattrs and a POSIX ACL
// round-trip and ship.
#[test]
fn hard_links_and_xattrs() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |_| {}) else { return };
    fs::write(fx.path("a"), b"one").unwrap();
    fs::hard_link(fx.path("a"), fx.path("b")).unwrap();
    assert_eq!(fs::metadata(fx.path("a")).unwrap().ino(), fs::metadata(fx.path("b")).unwrap().ino());
    assert_eq!(fs::metadata(fx.real("a")).unwrap().nlink(), 2);
    OpenOptions::new().write(true).open(fx.path("b")).unwrap().write_all_at(b"TWO", 0).unwrap();
    assert_eq!(fs::read(fx.path("a")).unwrap(), b"TWO");
    fs::remove_file(fx.path("a")).unwrap();
    fx.sink.take();
    OpenOptions::new().write(true).open(fx.path("b")).unwrap().write_all_at(b"3", 0).unwrap();
    assert_eq!(fx.sink.take(), vec![Op::Write { file: rp("b"), offset: 0, data: b"3".to_vec() }]);

    set_xattr(&fx.path("b"), "user.k", b"v").unwrap();
    assert_eq!(get_xattr(&fx.path("b"), "user.k").unwrap(), b"v");
    assert_eq!(get_xattr(&fx.real("b"), "user.k").unwrap(), b"v");
    assert!(list_xattr(&fx.path("b")).unwrap().contains(&"user.k".to_string()));
    assert_eq!(errno_of(get_xattr(&fx.path("b"), "user.missing")), libc::ENODATA);

    // system.posix_acl_access: version 2, then (tag, perm, id) entries.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in
        [(0x01u16, 6u16, u32::MAX), (0x02, 4, 1000), (0x04, 4, u32::MAX), (0x10, 4, u32::MAX), (0x20, 0, u32::MAX)]
    {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    set_xattr(&fx.path("b"), "system.posix_acl_access", &acl).unwrap();
    assert_eq!(get_xattr(&fx.real("b"), "system.posix_acl_access").unwrap(), acl);
    assert_eq!(get_xattr(&fx.path("b"), "system.posix_acl_access").unwrap(), acl);
    let ops = fx.sink.take();
    assert!(ops.contains(&Op::SetXattr { path: rp("b"), name: "user.k".into(), value: b"v".to_vec(), flags: 0 }));
    assert!(ops.iter().any(|op| matches!(op, Op::SetXattr { name, .. } if name == "system.posix_acl_access")));
}

// Large directories list completely, and offsets are stable: seekdir back to a telldir
// position gives the same next entry.
#[test]
fn readdir_lists_everything_with_stable_offsets() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |dir| {
        for i in 0..3000 {
            File::create(dir.join(format!("entry-{i:05}-with-a-longer-name"))).unwrap();
        }
    }) else {
        return;
    };
    let mut names: Vec<_> = fs::read_dir(fx.path("")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 3000);
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 3000);

    let dir = cpath(&fx.path(""));
    // SAFETY: opendir on a NUL-terminated path; the stream is closed below.
    let stream = unsafe { libc::opendir(dir.as_ptr()) };
    assert!(!stream.is_null());
    let next_name = || {
        // SAFETY: `stream` is an open directory stream; the entry is read before the next call.
        let entry = unsafe { libc::readdir(stream) };
        assert!(!entry.is_null());
        // SAFETY: readdir returned a valid entry whose d_name is NUL-terminated.
        unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) }.to_owned()
    };
    for _ in 0..1500 {
        next_name();
    }
    // SAFETY: `stream` is open.
    let position = unsafe { libc::telldir(stream) };
    let expected = next_name();
    for _ in 0..700 {
        next_name();
    }
    // SAFETY: `stream` is open and `position` came from telldir on it.
    unsafe { libc::seekdir(stream, position) };
    assert_eq!(next_name(), expected);
    // SAFETY: closing the stream opened above, once.
    unsafe { libc::closedir(stream) };
}

// statfs through the mount reports the real filesystem.
#[test]
fn statfs_reports_the_real_filesystem() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |_| {}) else { return };
    let through = nix::sys::statvfs::statvfs(&fx.path("")).unwrap();
    let real = nix::sys::statvfs::statvfs(&fx.real("")).unwrap();
    assert_eq!(through.blocks(), real.blocks());
    assert_eq!(through.fragment_size(), real.fragment_size());
    assert_eq!(through.files(), real.files());
}

// Files and directories created by a user belong to that user, not to the root daemon.
#[test]
fn new_files_belong_to_the_caller() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |dir| {
        fs::create_dir(dir.join("shared")).unwrap();
        fs::set_permissions(dir.join("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    }) else {
        return;
    };
    let path = fx.path("shared");
    let created = std::thread::spawn(move || {
        // SAFETY: setfsuid/setfsgid change only this thread's filesystem ids; the thread ends here.
        unsafe {
            libc::setfsgid(2000);
            libc::setfsuid(1000);
        }
        let file = fs::write(path.join("mine"), b"x");
        let dir = fs::create_dir(path.join("mydir"));
        (file, dir)
    })
    .join()
    .unwrap();
    created.0.unwrap();
    created.1.unwrap();
    let file = fs::metadata(fx.real("shared/mine")).unwrap();
    assert_eq!((file.uid(), file.gid()), (1000, 2000));
    let dir = fs::metadata(fx.real("shared/mydir")).unwrap();
    assert_eq!((dir.uid(), dir.gid()), (1000, 2000));
}

// POSIX ACLs are enforced by the kernel through the mount (FUSE_POSIX_ACL): a user denied by a
// named ACL entry cannot read a file whose mode alone would let everyone read it.
#[test]
fn posix_acls_are_enforced_through_the_mount() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |dir| {
        fs::write(dir.join("f"), b"secret").unwrap();
        fs::set_permissions(dir.join("f"), fs::Permissions::from_mode(0o666)).unwrap();
    }) else {
        return;
    };
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in
        [(0x01u16, 6u16, u32::MAX), (0x02, 0, 1000), (0x04, 6, u32::MAX), (0x10, 6, u32::MAX), (0x20, 6, u32::MAX)]
    {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    set_xattr(&fx.path("f"), "system.posix_acl_access", &acl).unwrap();
    let read_as = |uid: u32| {
        let path = fx.path("f");
        std::thread::spawn(move || {
            // SAFETY: setfsuid/setfsgid change only this thread's filesystem ids; the thread ends here.
            unsafe {
                libc::setfsgid(3000);
                libc::setfsuid(uid);
            }
            fs::read(path)
        })
        .join()
        .unwrap()
    };
    assert_eq!(errno_of(read_as(1000)), libc::EACCES);
    assert_eq!(read_as(1001).unwrap(), b"secret");
}

// New entries get the creating process's umask, as on the real filesystem (FUSE_DONT_MASK
// with a per-thread umask in the server).
#[test]
fn new_entries_follow_the_callers_umask() {
    let Some(fx) = Fixture::new(MountMode::ReadWrite, &[], |_| {}) else { return };
    let dir = fx.path("");
    let modes = std::thread::spawn(move || {
        // SAFETY: CLONE_FS gives this thread its own umask, so other tests keep theirs.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_FS) }, 0);
        let mut modes = Vec::new();
        for mask in [0o077, 0o022, 0o002] {
            // SAFETY: umask only changes this thread's (unshared) umask.
            unsafe { libc::umask(mask) };
            let (file, sub) = (dir.join(format!("f{mask:o}")), dir.join(format!("d{mask:o}")));
            fs::write(&file, b"x").unwrap();
            fs::create_dir(&sub).unwrap();
            modes.push((
                mask,
                fs::metadata(&file).unwrap().mode() & 0o7777,
                fs::metadata(&sub).unwrap().mode() & 0o7777,
            ));
        }
        modes
    })
    .join()
    .unwrap();
    for (mask, file, dir) in modes {
        assert_eq!((file, dir), (0o666 & !mask, 0o777 & !mask), "umask {mask:o}");
    }
}

/// Throughput sanity check: 1 GiB sequential write (1 MiB writes, fsync at the end) through
/// the mount (a sink that only counts) and directly to the same filesystem.
struct CountingSink(AtomicU64);
impl OpSink for CountingSink {
    fn submit(&self, _op: Op) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
    fn wait_durable(&self, _seq: u64) -> io::Result<()> {
        Ok(())
    }
}

fn write_gib(path: &Path) -> f64 {
    let chunk = pattern(1 << 20, 1);
    let started = Instant::now();
    let mut file = File::create(path).unwrap();
    for _ in 0..1024 {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    let secs = started.elapsed().as_secs_f64();
    fs::remove_file(path).unwrap();
    1024.0 * 1024.0 * 1024.0 / secs / 1e6
}

// Prints MB/s of a 1 GiB dd-like write with fsync, through the mount and direct (run with
// --ignored --nocapture; release build for meaningful numbers).
#[test]
#[ignore]
fn throughput_sequential_write_1_gib() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnt");
    let direct = tmp.path().join("direct");
    fs::create_dir(&dir).unwrap();
    fs::create_dir(&direct).unwrap();
    let sink = Arc::new(CountingSink(AtomicU64::new(0)));
    let mount = Mountover::mount(&dir, 0, MountMode::ReadWrite, &[], sink.clone()).unwrap();
    let mut through = Vec::new();
    let mut plain = Vec::new();
    for _ in 0..3 {
        plain.push(write_gib(&direct.join("f")));
        through.push(write_gib(&dir.join("f")));
    }
    mount.unmount().unwrap().finish(Duration::from_secs(5)).unwrap();
    through.sort_by(f64::total_cmp);
    plain.sort_by(f64::total_cmp);
    println!(
        "1 GiB write + fsync: through the mountover {:.0} MB/s, direct {:.0} MB/s (median of 3; {:.2}x); \
         runs {:?} vs {:?}",
        through[1],
        plain[1],
        through[1] / plain[1],
        through.iter().map(|v| v.round()).collect::<Vec<_>>(),
        plain.iter().map(|v| v.round()).collect::<Vec<_>>(),
    );
    assert!(sink.0.load(Ordering::Relaxed) >= 3 * 1024);
}
