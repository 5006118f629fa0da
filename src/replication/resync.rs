//! Resync: bring the peer's copy of a module's replicated directories to this host's state,
//! sending as little as possible. Independent of the network: the peer side is the
//! [`PeerFiles`] trait ([`DirPeer`] serves it over a local directory: tests, and the
//! receiver's side of the network version).
//!
//! - [`incremental_resync`]: from the dirty-zone maps alone. Replays the namespace changes
//!   in order (tombstones included), checks each path they touched, then sends the dirty
//!   zones of each file (hole-aware) and compares "whole file" entries by checksums.
//!   Progress is cleared from the maps as the peer makes it durable, so an interrupted
//!   incremental resync resumes from the maps.
//! - [`full_resync`]: walks the source tree; for each regular file compares per-block xxh3
//!   checksums on both sides and sends only the blocks that differ, never the holes of the
//!   source (SEEK_DATA/SEEK_HOLE; holes are punched on the target, never written as zeros),
//!   nor the clusters a qcow2 image does not need ([`super::qcow2`]). Deletes what the
//!   target has and the source has not; copies symlinks, device nodes, modes, ownership,
//!   xattrs and mtimes; keeps hard links. A checkpoint (last position made durable on the
//!   peer) lets an interrupted full resync resume where it stopped.
//!
//! Neither marks the target in sync: that is the module state machine's decision after a
//! resync returns [`Outcome::Done`]. Writes made during a resync must be marked in the maps
//! (the resync may have read a block before it changed); run incremental passes until one
//! finds nothing.

use super::dirty::{DirtyFile, DirtyMaps};
use super::qcow2::{self, Qcow2Map};
use super::{read_full_at, Op, RelPath, Timestamp};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use xxhash_rust::xxh3::{xxh3_64, Xxh3Default};

/// Blocks whose checksums are asked of the peer in one request.
pub const HASH_BATCH_BLOCKS: u64 = 1024;
/// Largest `Op::Write` payload a resync sends.
pub const WRITE_CHUNK_BYTES: u64 = 1 << 20;
/// A full resync makes the peer durable and saves its checkpoint after this many bytes
/// examined.
pub const CHECKPOINT_INTERVAL_BYTES: u64 = 256 << 20;
/// An incremental resync makes the peer durable and clears the maps after this many bytes
/// sent, or [`CLEAR_INTERVAL_FILES`] files.
pub const CLEAR_INTERVAL_BYTES: u64 = 64 << 20;
pub const CLEAR_INTERVAL_FILES: usize = 1000;
/// Hard-linked inodes remembered by a full resync (beyond, links are copied as files).
pub const HARDLINKS_MAX: usize = 100_000;
/// Deepest directory nesting walked.
pub const TREE_DEPTH_MAX: usize = 1024;
/// Largest xattr value read (the Linux limit).
const XATTR_VALUE_BYTES_MAX: usize = 64 << 10;
/// Largest xattr name list read.
const XATTR_LIST_BYTES_MAX: usize = 64 << 10;

const PUNCH_MODE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

// ---------------------------------------------------------------------------------------------
// Entries

/// The type of a directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink(String),
    /// FIFO, socket or device node; the type bits are in [`Entry::mode`].
    Special {
        rdev: u64,
    },
}

/// What a resync needs to know of one entry, on either side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    pub size: u64,
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub nlink: u64,
    /// `(st_dev, st_ino)`: identifies hard links on the side that listed it.
    pub id: (u64, u64),
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Entry {
    pub(crate) fn perm(&self) -> u32 {
        self.mode & 0o7777
    }
    pub(crate) fn same_kind(&self, other: &Entry) -> bool {
        match (&self.kind, &other.kind) {
            (Kind::File, Kind::File) | (Kind::Dir, Kind::Dir) => true,
            (Kind::Symlink(a), Kind::Symlink(b)) => a == b,
            (Kind::Special { rdev: a }, Kind::Special { rdev: b }) => {
                a == b && self.mode & libc::S_IFMT == other.mode & libc::S_IFMT
            }
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The peer side

/// The peer's copy of the replicated directories, as the resync sees it. Every path is a
/// [`RelPath`]; changes go through [`Op`]s, the same ones live replication ships.
pub trait PeerFiles {
    /// The entry at `path`, `None` when there is none.
    fn stat(&mut self, path: &RelPath) -> io::Result<Option<Entry>>;
    /// The entries of directory `dir` (not recursive), sorted by name.
    fn list(&mut self, dir: &RelPath) -> io::Result<Vec<(String, Entry)>>;
    /// xxh3-64 of `count` blocks of `block_bytes` from block `first_block` of `file` (the last
    /// one as long as the file is; a block past the end hashes as empty).
    fn block_hashes(&mut self, file: &RelPath, block_bytes: u64, first_block: u64, count: u64) -> io::Result<Vec<u64>>;
    /// Applies one change.
    fn apply(&mut self, op: &Op) -> io::Result<()>;
    /// Removes `path` whatever it is, a directory with everything in it.
    fn remove_tree(&mut self, path: &RelPath) -> io::Result<()>;
    /// Makes every change so far durable.
    fn flush(&mut self) -> io::Result<()>;
}

// ---------------------------------------------------------------------------------------------
// Local file-system access, beneath root fds

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// No such entry (or, for a path, one that would go through a symlink or leave the tree:
/// no entry of the tree is there either).
pub(crate) fn is_enoent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP) | Some(libc::EXDEV))
}

/// Opens directory `path` (relative, may be empty) beneath `root` without following any
/// symlink and without leaving `root` (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`).
fn open_dir_beneath(root: BorrowedFd<'_>, path: &str) -> io::Result<OwnedFd> {
    let p = cstring(if path.is_empty() { "." } else { path })?;
    // SAFETY: an all-zero `open_how` is valid (no flags, no mode, no resolve bits).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `p` is a valid C string and `how` a valid open_how of the size passed; the
    // kernel only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            p.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A parent directory fd and a final name (`.` for a replicated directory itself).
struct Loc {
    dir: OwnedFd,
    name: CString,
}

impl Loc {
    fn fd(&self) -> RawFd {
        self.dir.as_raw_fd()
    }
    /// `/proc/self/fd/N/name`: for the xattr calls, which have no `*at` form.
    fn proc_path(&self) -> io::Result<CString> {
        let name = self.name.to_str().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name"))?;
        cstring(&format!("/proc/self/fd/{}/{name}", self.fd()))
    }
}

fn fstatat(loc: &Loc) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, C string and a pointer to a `stat` we own.
    cvt(unsafe { libc::fstatat(loc.fd(), loc.name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// Gives a just-created entry its owner on the source (never following a link). EPERM (a
/// peer not running as root) is left to the attribute pass, which warns about it.
fn give_owner(loc: &Loc, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid fd and C string.
    match cvt(unsafe { libc::fchownat(loc.fd(), loc.name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) }) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        r => r.map(drop),
    }
}

fn readlinkat(loc: &Loc) -> io::Result<String> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: the buffer is valid for `buf.len()` bytes.
    let n = unsafe { libc::readlinkat(loc.fd(), loc.name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(errno());
    }
    buf.truncate(n as usize);
    String::from_utf8(buf).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "symlink target is not UTF-8"))
}

fn xattrs_of(loc: &Loc) -> io::Result<Vec<(String, Vec<u8>)>> {
    let path = loc.proc_path()?;
    let mut names = vec![0u8; XATTR_LIST_BYTES_MAX];
    // SAFETY: valid C string, buffer valid for its length.
    let n = unsafe { libc::llistxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = errno();
        return match e.raw_os_error() {
            Some(libc::ENOTSUP) => Ok(Vec::new()),
            _ => Err(e),
        };
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for raw in names.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let Ok(name) = std::str::from_utf8(raw) else {
            warn!("xattr with a non-UTF-8 name skipped");
            continue;
        };
        let cname = cstring(name)?;
        let mut value = vec![0u8; XATTR_VALUE_BYTES_MAX];
        // SAFETY: valid C strings, buffer valid for its length.
        let v = unsafe { libc::lgetxattr(path.as_ptr(), cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if v < 0 {
            let e = errno();
            if e.raw_os_error() == Some(libc::ENODATA) {
                continue;
            }
            return Err(e);
        }
        value.truncate(v as usize);
        out.push((name.to_string(), value));
    }
    out.sort();
    Ok(out)
}

fn timestamp(secs: i64, nanos: i64) -> Timestamp {
    Timestamp { secs, nanos: nanos.clamp(0, 999_999_999) as u32 }
}

fn entry_of(loc: &Loc) -> io::Result<Entry> {
    let st = fstatat(loc)?;
    let fmt = st.st_mode & libc::S_IFMT;
    let kind = match fmt {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink(readlinkat(loc)?),
        _ => Kind::Special { rdev: st.st_rdev },
    };
    Ok(Entry {
        kind,
        size: st.st_size.max(0) as u64,
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: timestamp(st.st_mtime, st.st_mtime_nsec),
        nlink: st.st_nlink,
        id: (st.st_dev, st.st_ino),
        xattrs: xattrs_of(loc)?,
    })
}

/// The byte ranges holding data in `[start, end)` of `file` (SEEK_DATA / SEEK_HOLE).
pub fn data_ranges(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on an fd we hold; no memory involved.
        let d = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            let e = errno();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(out),
                // No SEEK_DATA here: everything is data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(vec![(start, end)]),
                _ => Err(e),
            };
        }
        let d = d as u64;
        if d >= end {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d as libc::off_t, libc::SEEK_HOLE) };
        if h < 0 {
            return Err(errno());
        }
        let h = (h as u64).max(d + 1);
        out.push((d, h.min(end)));
        pos = h;
    }
    Ok(out)
}

/// Intersection of two sorted lists of disjoint ranges.
fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let s = a[i].0.max(b[j].0);
        let e = a[i].1.min(b[j].1);
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The part of sorted `ranges` inside `[s, e)`.
fn clip(ranges: &[(u64, u64)], s: u64, e: u64) -> Vec<(u64, u64)> {
    intersect(ranges, &[(s, e)])
}

/// xxh3-64 of `len` zero bytes, remembered for the common length.
struct ZeroHash {
    block_bytes: u64,
    block_hash: u64,
}

impl ZeroHash {
    fn new(block_bytes: u64) -> ZeroHash {
        ZeroHash { block_bytes, block_hash: zero_hash(block_bytes) }
    }
    fn of(&self, len: u64) -> u64 {
        if len == self.block_bytes {
            self.block_hash
        } else {
            zero_hash(len)
        }
    }
}

fn zero_hash(len: u64) -> u64 {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut h = Xxh3Default::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        left -= n as u64;
    }
    h.digest()
}

/// The replicated directories of one module on one host, each opened once (an `O_PATH` fd:
/// the daemon opens it before mounting over it). Every access resolves beneath these fds,
/// never following a symlink on the way.
pub struct LocalTree {
    roots: Vec<OwnedFd>,
}

impl std::fmt::Debug for LocalTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTree").field("roots", &self.roots.len()).finish()
    }
}

impl LocalTree {
    /// Opens the directories (index `i` of `dirs` is `RelPath` directory `i`).
    pub fn open<P: AsRef<Path>>(dirs: &[P]) -> io::Result<LocalTree> {
        let mut roots = Vec::with_capacity(dirs.len());
        for d in dirs {
            let c = cstring(&d.as_ref().to_string_lossy())?;
            // SAFETY: valid C string; the fd returned is ours.
            let fd = cvt(unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) })?;
            // SAFETY: `fd` is a new fd that nothing else owns.
            roots.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        Ok(LocalTree { roots })
    }

    /// Uses directory fds opened by the caller (before a mountover hid the real directory).
    pub fn from_fds(roots: Vec<OwnedFd>) -> LocalTree {
        LocalTree { roots }
    }

    /// Number of replicated directories.
    pub fn dirs(&self) -> u16 {
        self.roots.len().min(u16::MAX as usize) as u16
    }

    fn loc(&self, p: &RelPath) -> io::Result<Loc> {
        let root = self
            .roots
            .get(p.dir() as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no replicated directory {}", p.dir())))?;
        let (parent, name) = match p.path().rsplit_once('/') {
            Some((parent, name)) => (parent, name),
            None if p.path().is_empty() => ("", "."),
            None => ("", p.path()),
        };
        Ok(Loc { dir: open_dir_beneath(root.as_fd(), parent)?, name: cstring(name)? })
    }

    /// The entry at `p`, `None` when there is none.
    pub fn stat(&self, p: &RelPath) -> io::Result<Option<Entry>> {
        let loc = match self.loc(p) {
            Ok(l) => l,
            Err(e) if is_enoent(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        match entry_of(&loc) {
            Ok(e) => Ok(Some(e)),
            Err(e) if is_enoent(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The entries of directory `p`, sorted by name (names that are not UTF-8 are skipped
    /// with a warning: a [`RelPath`] cannot carry them).
    pub fn list(&self, p: &RelPath) -> io::Result<Vec<(String, Entry)>> {
        let dir = self.open_dir(p)?;
        let mut names = Vec::new();
        for de in std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))? {
            let de = de?;
            match de.file_name().into_string() {
                Ok(n) => names.push(n),
                Err(n) => warn!(dir = p.path(), name = ?n, "entry name is not UTF-8: not replicated"),
            }
        }
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let loc = Loc { dir: dup(&dir)?, name: cstring(&name)? };
            match entry_of(&loc) {
                Ok(e) => out.push((name, e)),
                Err(e) if is_enoent(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Directory `p` opened for reading its entries.
    fn open_dir(&self, p: &RelPath) -> io::Result<OwnedFd> {
        let loc = self.loc(p)?;
        self.openat(&loc, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)
    }

    fn openat(&self, loc: &Loc, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
        // SAFETY: valid fd and C string; the fd returned is ours.
        let fd = cvt(unsafe { libc::openat(loc.fd(), loc.name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
        // SAFETY: `fd` is a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Regular file `p` opened read-only (never through a symlink).
    pub fn open_file(&self, p: &RelPath) -> io::Result<File> {
        let loc = self.loc(p)?;
        Ok(File::from(self.openat(&loc, libc::O_RDONLY | libc::O_NOFOLLOW, 0)?))
    }

    fn open_write(&self, p: &RelPath) -> io::Result<File> {
        let loc = self.loc(p)?;
        Ok(File::from(self.openat(&loc, libc::O_WRONLY | libc::O_NOFOLLOW, 0)?))
    }

    /// xxh3-64 per block, hole blocks without reading them.
    pub fn block_hashes(&self, p: &RelPath, block_bytes: u64, first: u64, count: u64) -> io::Result<Vec<u64>> {
        if block_bytes == 0 || count > HASH_BATCH_BLOCKS * 16 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad block hash request"));
        }
        let file = self.open_file(p)?;
        let size = file.metadata()?.len();
        let start = first.saturating_mul(block_bytes);
        let end = first.saturating_add(count).saturating_mul(block_bytes).min(size);
        let data = if start < end { data_ranges(&file, start, end)? } else { Vec::new() };
        let zeros = ZeroHash::new(block_bytes);
        let mut buf = vec![0u8; block_bytes as usize];
        let mut out = Vec::with_capacity(count as usize);
        for b in first..first.saturating_add(count) {
            let bs = b.saturating_mul(block_bytes);
            let be = bs.saturating_add(block_bytes).min(size);
            if bs >= be {
                out.push(xxh3_64(&[]));
                continue;
            }
            let len = be - bs;
            let sub = clip(&data, bs, be);
            if sub.is_empty() {
                out.push(zeros.of(len));
                continue;
            }
            let n = read_full_at(&file, &mut buf[..len as usize], bs)?;
            buf[n..len as usize].fill(0);
            out.push(xxh3_64(&buf[..len as usize]));
        }
        Ok(out)
    }

    /// Applies one [`Op`] to this tree (the receiver's job; tests use it to act as the
    /// mountover on a source tree).
    pub fn apply(&self, op: &Op) -> io::Result<()> {
        match op {
            Op::Write { file, offset, data } => self.open_write(file)?.write_all_at(data, *offset),
            Op::Truncate { file, size } => self.open_write(file)?.set_len(*size),
            Op::Fallocate { file, mode, offset, len } => fallocate(&self.open_write(file)?, *mode, *offset, *len),
            Op::Create { file, mode, uid, gid } => {
                let loc = self.loc(file)?;
                self.openat(&loc, libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW, mode & 0o7777)?;
                give_owner(&loc, *uid, *gid)
            }
            Op::Mkdir { dir, mode, uid, gid } => {
                let loc = self.loc(dir)?;
                // SAFETY: valid fd and C string.
                match cvt(unsafe { libc::mkdirat(loc.fd(), loc.name.as_ptr(), (mode & 0o7777) as libc::mode_t) }) {
                    Err(e)
                        if e.raw_os_error() == Some(libc::EEXIST)
                            && fstatat(&loc)?.st_mode & libc::S_IFMT == libc::S_IFDIR => {}
                    r => {
                        r?;
                    }
                }
                give_owner(&loc, *uid, *gid)
            }
            Op::Mknod { node, mode, rdev, uid, gid } => {
                let loc = self.loc(node)?;
                // SAFETY: valid fd and C string.
                cvt(unsafe {
                    libc::mknodat(loc.fd(), loc.name.as_ptr(), *mode as libc::mode_t, *rdev as libc::dev_t)
                })?;
                give_owner(&loc, *uid, *gid)
            }
            Op::Symlink { link, target, uid, gid } => {
                let loc = self.loc(link)?;
                let t = cstring(target)?;
                // SAFETY: valid fd and C strings.
                cvt(unsafe { libc::symlinkat(t.as_ptr(), loc.fd(), loc.name.as_ptr()) })?;
                give_owner(&loc, *uid, *gid)
            }
            Op::Link { existing, new } => {
                let a = self.loc(existing)?;
                let b = self.loc(new)?;
                // SAFETY: valid fds and C strings.
                cvt(unsafe { libc::linkat(a.fd(), a.name.as_ptr(), b.fd(), b.name.as_ptr(), 0) }).map(drop)
            }
            Op::Unlink { file } => {
                let loc = self.loc(file)?;
                // SAFETY: valid fd and C string.
                cvt(unsafe { libc::unlinkat(loc.fd(), loc.name.as_ptr(), 0) }).map(drop)
            }
            Op::Rmdir { dir } => {
                let loc = self.loc(dir)?;
                // SAFETY: valid fd and C string.
                cvt(unsafe { libc::unlinkat(loc.fd(), loc.name.as_ptr(), libc::AT_REMOVEDIR) }).map(drop)
            }
            Op::Rename { from, to, flags } => {
                let a = self.loc(from)?;
                let b = self.loc(to)?;
                // SAFETY: valid fds and C strings.
                cvt(unsafe { libc::renameat2(a.fd(), a.name.as_ptr(), b.fd(), b.name.as_ptr(), *flags) }).map(drop)
            }
            Op::SetAttr { path, mode, uid, gid, atime, mtime } => {
                let loc = self.loc(path)?;
                if uid.is_some() || gid.is_some() {
                    let u = uid.unwrap_or(u32::MAX);
                    let g = gid.unwrap_or(u32::MAX);
                    // SAFETY: valid fd and C string; -1 (u32::MAX) leaves an id unchanged.
                    cvt(unsafe { libc::fchownat(loc.fd(), loc.name.as_ptr(), u, g, libc::AT_SYMLINK_NOFOLLOW) })?;
                }
                // After chown, which may clear set-id bits.
                if let Some(m) = mode {
                    if fstatat(&loc)?.st_mode & libc::S_IFMT != libc::S_IFLNK {
                        // SAFETY: valid fd and C string.
                        cvt(unsafe { libc::fchmodat(loc.fd(), loc.name.as_ptr(), (m & 0o7777) as libc::mode_t, 0) })?;
                    }
                }
                if atime.is_some() || mtime.is_some() {
                    let ts = |t: &Option<Timestamp>| match t {
                        Some(t) => libc::timespec { tv_sec: t.secs as libc::time_t, tv_nsec: t.nanos as libc::c_long },
                        None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
                    };
                    let times = [ts(atime), ts(mtime)];
                    // SAFETY: valid fd, C string and a two-element timespec array.
                    cvt(unsafe {
                        libc::utimensat(loc.fd(), loc.name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
                    })?;
                }
                Ok(())
            }
            Op::SetXattr { path, name, value, flags } => {
                let loc = self.loc(path)?;
                let p = loc.proc_path()?;
                let n = cstring(name)?;
                // SAFETY: valid C strings and a buffer valid for its length.
                cvt(unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), *flags) })
                    .map(drop)
            }
            Op::RemoveXattr { path, name } => {
                let loc = self.loc(path)?;
                let p = loc.proc_path()?;
                let n = cstring(name)?;
                // SAFETY: valid C strings.
                cvt(unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) }).map(drop)
            }
            Op::Fsync { file: Some(f), .. } => self.open_file(f)?.sync_all(),
            Op::Fsync { file: None, .. } => self.syncfs(),
        }
    }

    /// Removes `p` whatever it is (a directory with its contents; absent is fine).
    pub fn remove_tree(&self, p: &RelPath) -> io::Result<()> {
        self.remove_tree_at(p, 0)
    }

    fn remove_tree_at(&self, p: &RelPath, depth: usize) -> io::Result<()> {
        if p.path().is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "refusing to remove a replicated directory"));
        }
        let loc = match self.loc(p) {
            Ok(l) => l,
            Err(e) if is_enoent(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let st = match fstatat(&loc) {
            Ok(st) => st,
            Err(e) if is_enoent(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            if depth >= TREE_DEPTH_MAX {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "directory tree too deep"));
            }
            for (name, _) in self.list(p)? {
                if let Some(child) = p.join(&name) {
                    self.remove_tree_at(&child, depth + 1)?;
                }
            }
            // SAFETY: valid fd and C string.
            cvt(unsafe { libc::unlinkat(loc.fd(), loc.name.as_ptr(), libc::AT_REMOVEDIR) })?;
        } else {
            // SAFETY: valid fd and C string.
            cvt(unsafe { libc::unlinkat(loc.fd(), loc.name.as_ptr(), 0) })?;
        }
        Ok(())
    }

    /// `syncfs` of every replicated directory's file system.
    pub fn syncfs(&self) -> io::Result<()> {
        for root in &self.roots {
            let d = open_dir_beneath(root.as_fd(), "")?;
            let f = File::from(
                // SAFETY: valid fd and a constant C string; the fd returned is ours.
                unsafe {
                    OwnedFd::from_raw_fd(cvt(libc::openat(
                        d.as_raw_fd(),
                        c".".as_ptr(),
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    ))?)
                },
            );
            // SAFETY: syncfs on an fd we hold.
            cvt(unsafe { libc::syncfs(f.as_raw_fd()) })?;
        }
        Ok(())
    }
}

fn dup(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

/// fallocate(2); a punch the file system refuses becomes zeros written (never past EOF).
fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an fd we hold; no memory involved.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    let e = errno();
    if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 && e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        let size = file.metadata()?.len();
        let end = offset.saturating_add(len).min(size);
        let zeros = vec![0u8; WRITE_CHUNK_BYTES as usize];
        let mut at = offset;
        while at < end {
            let n = (end - at).min(WRITE_CHUNK_BYTES) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        return Ok(());
    }
    Err(e)
}

/// [`PeerFiles`] over a local directory tree: the in-process peer of the tests, and what the
/// network receiver serves.
#[derive(Debug)]
pub struct DirPeer {
    tree: LocalTree,
}

impl DirPeer {
    pub fn new(tree: LocalTree) -> DirPeer {
        DirPeer { tree }
    }
    pub fn open<P: AsRef<Path>>(dirs: &[P]) -> io::Result<DirPeer> {
        Ok(DirPeer { tree: LocalTree::open(dirs)? })
    }
    pub fn tree(&self) -> &LocalTree {
        &self.tree
    }
}

impl PeerFiles for DirPeer {
    fn stat(&mut self, path: &RelPath) -> io::Result<Option<Entry>> {
        self.tree.stat(path)
    }
    fn list(&mut self, dir: &RelPath) -> io::Result<Vec<(String, Entry)>> {
        self.tree.list(dir)
    }
    fn block_hashes(&mut self, file: &RelPath, block_bytes: u64, first_block: u64, count: u64) -> io::Result<Vec<u64>> {
        self.tree.block_hashes(file, block_bytes, first_block, count)
    }
    fn apply(&mut self, op: &Op) -> io::Result<()> {
        self.tree.apply(op)
    }
    fn remove_tree(&mut self, path: &RelPath) -> io::Result<()> {
        self.tree.remove_tree(path)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tree.syncfs()
    }
}

// ---------------------------------------------------------------------------------------------
// Options, progress, results

/// How a resync runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncOptions {
    /// Checksum block = dirty zone size.
    pub block_bytes: u64,
    /// Cap on the bytes of data sent per second; 0 = none.
    pub bandwidth_bytes_per_s: u64,
    /// Where a full resync keeps its checkpoint (none: an interrupted full resync restarts;
    /// it still sends only the blocks that differ).
    pub checkpoint: Option<PathBuf>,
    /// Paths neither sent nor deleted on the peer (`<notreplicated>`).
    pub exclude: Vec<RelPath>,
}

impl ResyncOptions {
    pub fn new(block_bytes: u64) -> ResyncOptions {
        ResyncOptions { block_bytes, bandwidth_bytes_per_s: 0, checkpoint: None, exclude: Vec::new() }
    }

    /// Zone size, bandwidth cap and `<notreplicated>` paths of a module's `<rfs>`.
    pub fn from_config(rfs: &crate::config::RfsConfig) -> ResyncOptions {
        let mut exclude = Vec::new();
        for (i, r) in rfs.replicated.iter().enumerate() {
            for n in &r.notreplicated {
                match RelPath::new(i as u16, &n.to_string_lossy()) {
                    Some(p) => exclude.push(p),
                    None => warn!(path = %n.display(), "notreplicated path not usable by the resync"),
                }
            }
        }
        ResyncOptions {
            block_bytes: rfs.zone_bytes,
            bandwidth_bytes_per_s: rfs.bandwidth_bytes_per_s,
            checkpoint: None,
            exclude,
        }
    }
}

/// Progress of a running resync, for the progress bars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Bytes examined (full: file bytes compared; incremental: dirty zones handled).
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub files_total: u64,
    /// Data bytes sent to the peer.
    pub bytes_sent: u64,
}

/// What the progress callback wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop now; a full resync saves its checkpoint, an incremental one clears what it did.
    Stop,
}

/// What a resync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResyncStats {
    /// It ran as a full resync (asked for, or the maps were not enough).
    pub full: bool,
    pub bytes_sent: u64,
    pub bytes_examined: u64,
    pub blocks_compared: u64,
    pub blocks_sent: u64,
    pub holes_punched: u64,
    pub files_examined: u64,
    pub entries_deleted: u64,
    pub namespace_replayed: u64,
    pub namespace_failed: u64,
    /// A full resync resumed from a checkpoint at this position.
    pub resumed_from: Option<(RelPath, u64)>,
    pub elapsed: Duration,
}

/// How a resync ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done(ResyncStats),
    Stopped(ResyncStats),
}

impl Outcome {
    pub fn stats(&self) -> &ResyncStats {
        match self {
            Outcome::Done(s) | Outcome::Stopped(s) => s,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("reading {path} on this host: {source}")]
    Local { path: String, source: io::Error },
    #[error("the peer failed on {path}: {source}")]
    Peer { path: String, source: io::Error },
    #[error("dirty-zone maps: {0}")]
    Maps(io::Error),
    #[error("resync checkpoint {path}: {source}")]
    Checkpoint { path: PathBuf, source: io::Error },
    #[error("replicated directory {0} is missing on {1}")]
    MissingRoot(u16, &'static str),
}

pub(crate) fn show(p: &RelPath) -> String {
    format!("[{}]/{}", p.dir(), p.path())
}

/// Internal: the callback asked to stop, or an error.
pub(crate) enum Halt {
    Stop,
    Err(ResyncError),
}

impl From<ResyncError> for Halt {
    fn from(e: ResyncError) -> Halt {
        Halt::Err(e)
    }
}

pub(crate) type R<T> = Result<T, Halt>;

pub(crate) fn local(p: &RelPath) -> impl FnOnce(io::Error) -> Halt + '_ {
    move |source| Halt::Err(ResyncError::Local { path: show(p), source })
}

pub(crate) fn remote(p: &RelPath) -> impl FnOnce(io::Error) -> Halt + '_ {
    move |source| Halt::Err(ResyncError::Peer { path: show(p), source })
}

/// Byte-rate cap: a token bucket refilled at the rate, holding at most one write chunk or a
/// tenth of a second of rate.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(bytes_per_s: u64) -> TokenBucket {
        let rate = bytes_per_s as f64;
        let burst = (WRITE_CHUNK_BYTES as f64).max(rate / 10.0);
        TokenBucket { rate, burst, tokens: burst, last: Instant::now() }
    }
    fn take(&mut self, bytes: u64) {
        if self.rate <= 0.0 {
            return;
        }
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.tokens / self.rate));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoint

/// Position of an interrupted full resync: everything before `path` (walk order) is durable
/// on the peer, and `path` itself up to `offset` (`u64::MAX`: finished).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Checkpoint {
    version: u32,
    block_bytes: u64,
    dir: u16,
    path: String,
    offset: u64,
}

const CHECKPOINT_VERSION: u32 = 1;

fn load_checkpoint(path: &Path, block_bytes: u64) -> Option<(RelPath, u64)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(checkpoint = %path.display(), "cannot read the resync checkpoint ({e}): starting from the beginning");
            return None;
        }
    };
    match serde_json::from_str::<Checkpoint>(&text) {
        Ok(c) if c.version == CHECKPOINT_VERSION && c.block_bytes == block_bytes => {
            RelPath::new(c.dir, &c.path).map(|p| (p, c.offset))
        }
        _ => {
            warn!(checkpoint = %path.display(), "resync checkpoint unusable: starting from the beginning");
            None
        }
    }
}

fn save_checkpoint(path: &Path, block_bytes: u64, at: &RelPath, offset: u64) -> io::Result<()> {
    let c = Checkpoint { version: CHECKPOINT_VERSION, block_bytes, dir: at.dir(), path: at.path().to_string(), offset };
    crate::paths::write_durably(path, &serde_json::to_vec(&c).map_err(io::Error::other)?)
}

/// Forgets a saved full-resync checkpoint (`second --full` starts from the beginning).
pub fn clear_checkpoint(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Walk order: by replicated directory, then component by component (a directory's
/// contents right after it).
pub(crate) fn walk_cmp(a: &RelPath, b: &RelPath) -> Ordering {
    a.dir().cmp(&b.dir()).then_with(|| {
        let ca = a.path().split('/').filter(|c| !c.is_empty());
        let cb = b.path().split('/').filter(|c| !c.is_empty());
        ca.cmp(cb)
    })
}

/// `a` is a strict ancestor of `b`.
fn is_ancestor(a: &RelPath, b: &RelPath) -> bool {
    a.dir() == b.dir()
        && a.path() != b.path()
        && (a.path().is_empty()
            || (b.path().starts_with(a.path()) && b.path().as_bytes().get(a.path().len()) == Some(&b'/')))
}

fn in_tree(p: &RelPath, root: &RelPath) -> bool {
    p == root || is_ancestor(root, p)
}

/// `p` is one of the `exclude` (notreplicated) paths or below one.
pub(crate) fn is_excluded(exclude: &[RelPath], p: &RelPath) -> bool {
    exclude.iter().any(|e| in_tree(p, e))
}

/// The entries of directory `dir`, listed on one side by `list`, that a tree walk visits:
/// none below the depth bound or when `dir` vanished meanwhile, and never an `exclude`d path.
pub(crate) fn children(
    dir: &RelPath,
    depth: usize,
    exclude: &[RelPath],
    list: impl FnOnce(&RelPath) -> io::Result<Vec<(String, Entry)>>,
) -> io::Result<Vec<(RelPath, Entry)>> {
    if depth > TREE_DEPTH_MAX {
        return Ok(Vec::new());
    }
    let list = match list(dir) {
        Ok(l) => l,
        Err(e) if is_enoent(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(list
        .into_iter()
        .filter_map(|(name, e)| dir.join(&name).map(|p| (p, e)))
        .filter(|(p, _)| !is_excluded(exclude, p))
        .collect())
}

/// What a resumed walk does with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// Done in an earlier run.
    Skip,
    /// Process from this offset (0: all of it).
    From(u64),
}

// ---------------------------------------------------------------------------------------------
// The engine

struct Engine<'a> {
    src: &'a LocalTree,
    peer: &'a mut dyn PeerFiles,
    opts: &'a ResyncOptions,
    progress: &'a mut dyn FnMut(&Progress) -> Flow,
    bucket: TokenBucket,
    p: Progress,
    stats: ResyncStats,
    zeros: ZeroHash,
    buf: Vec<u8>,
    hardlinks: HashMap<(u64, u64), RelPath>,
    /// Full resync: where to resume, and the position reached (for the checkpoint).
    resume: Option<(RelPath, u64)>,
    pos: Option<(RelPath, u64)>,
    since_checkpoint: u64,
    /// Incremental: (file, zones or whole) sent but not yet cleared from the maps.
    pending: Vec<(RelPath, Option<Vec<u64>>)>,
    pending_bytes: u64,
    warned_owner: bool,
    /// Incremental mode: files are counted per dirty-map entry, not per entry synced.
    incremental: bool,
    /// A stop request is honoured (not while the namespace is being replayed).
    stoppable: bool,
}

impl<'a> Engine<'a> {
    fn new(
        src: &'a LocalTree,
        peer: &'a mut dyn PeerFiles,
        opts: &'a ResyncOptions,
        progress: &'a mut dyn FnMut(&Progress) -> Flow,
    ) -> Engine<'a> {
        Engine {
            src,
            peer,
            opts,
            progress,
            bucket: TokenBucket::new(opts.bandwidth_bytes_per_s),
            p: Progress::default(),
            stats: ResyncStats::default(),
            zeros: ZeroHash::new(opts.block_bytes),
            buf: vec![0u8; opts.block_bytes as usize],
            hardlinks: HashMap::new(),
            resume: None,
            pos: None,
            since_checkpoint: 0,
            pending: Vec::new(),
            pending_bytes: 0,
            warned_owner: false,
            incremental: false,
            stoppable: true,
        }
    }

    fn excluded(&self, p: &RelPath) -> bool {
        is_excluded(&self.opts.exclude, p)
    }

    fn resume_of(&self, p: &RelPath) -> Resume {
        match &self.resume {
            None => Resume::From(0),
            Some((at, _)) if is_ancestor(p, at) => Resume::From(0),
            Some((at, off)) => match walk_cmp(p, at) {
                Ordering::Less => Resume::Skip,
                Ordering::Equal if *off == u64::MAX => Resume::Skip,
                Ordering::Equal => Resume::From(*off),
                Ordering::Greater => Resume::From(0),
            },
        }
    }

    /// Reports progress; stops when asked; saves a checkpoint now and then (full resync).
    fn tick(&mut self) -> R<()> {
        self.stats.bytes_sent = self.p.bytes_sent;
        self.p.bytes_total = self.p.bytes_total.max(self.p.bytes_done);
        self.p.files_total = self.p.files_total.max(self.p.files_done);
        if (self.progress)(&self.p) == Flow::Stop && self.stoppable {
            return Err(Halt::Stop);
        }
        if self.since_checkpoint >= CHECKPOINT_INTERVAL_BYTES {
            self.save_checkpoint()?;
        }
        Ok(())
    }

    fn save_checkpoint(&mut self) -> R<()> {
        self.since_checkpoint = 0;
        let (Some(path), Some((at, off))) = (&self.opts.checkpoint, &self.pos) else { return Ok(()) };
        self.peer.flush().map_err(remote(at))?;
        save_checkpoint(path, self.opts.block_bytes, at, *off)
            .map_err(|source| Halt::Err(ResyncError::Checkpoint { path: path.clone(), source }))
    }

    /// Sends a data op (write or punch), through the bandwidth cap.
    fn send(&mut self, op: Op) -> R<()> {
        match &op {
            Op::Write { data, .. } => {
                self.bucket.take(data.len() as u64);
                self.p.bytes_sent += data.len() as u64;
            }
            Op::Fallocate { .. } => self.stats.holes_punched += 1,
            _ => {}
        }
        self.peer.apply(&op).map_err(|source| Halt::Err(ResyncError::Peer { path: ns_label(&op), source }))
    }

    /// Sends bytes `[s, e)` of `buf` (holding file bytes from `base`) as writes.
    fn send_range(&mut self, file: &RelPath, base: u64, s: u64, e: u64) -> R<()> {
        let mut at = s;
        while at < e {
            let n = (e - at).min(WRITE_CHUNK_BYTES);
            let from = (at - base) as usize;
            let data = self.buf[from..from + n as usize].to_vec();
            self.send(Op::Write { file: file.clone(), offset: at, data })?;
            at += n;
        }
        Ok(())
    }

    fn punch(&mut self, file: &RelPath, s: u64, e: u64) -> R<()> {
        if s < e {
            self.send(Op::Fallocate { file: file.clone(), mode: PUNCH_MODE, offset: s, len: e - s })?;
        }
        Ok(())
    }

    /// Reads block `[bs, be)` of `file` into `buf`, zero outside the `data` ranges.
    fn read_block(&mut self, file: &File, path: &RelPath, bs: u64, be: u64, data: &[(u64, u64)]) -> R<()> {
        let len = (be - bs) as usize;
        self.buf[..len].fill(0);
        for &(s, e) in data {
            let from = (s - bs) as usize;
            let to = (e - bs) as usize;
            read_full_at(file, &mut self.buf[from..to], s).map_err(local(path))?;
        }
        Ok(())
    }

    /// Sends the data ranges of a block and punches its other parts (`punch_gaps`: the peer
    /// may hold data there).
    fn send_block(&mut self, path: &RelPath, bs: u64, be: u64, data: &[(u64, u64)], punch_gaps: bool) -> R<()> {
        let mut at = bs;
        for &(s, e) in data {
            if punch_gaps {
                self.punch(path, at, s)?;
            }
            self.send_range(path, bs, s, e)?;
            at = e;
        }
        if punch_gaps {
            self.punch(path, at, be)?;
        }
        Ok(())
    }

    /// The entries of source directory `dir` that a tree walk visits (see [`children`]).
    fn children(&self, dir: &RelPath, depth: usize) -> R<Vec<(RelPath, Entry)>> {
        children(dir, depth, &self.opts.exclude, |d| self.src.list(d)).map_err(local(dir))
    }

    // ---- full resync ------------------------------------------------------------------------

    fn count(&mut self, dir: &RelPath, depth: usize) -> R<()> {
        for (p, e) in self.children(dir, depth)? {
            let r = self.resume_of(&p);
            match e.kind {
                Kind::Dir => {
                    if r == Resume::Skip {
                        self.count_skipped(&p, depth + 1)?;
                    } else {
                        self.count(&p, depth + 1)?;
                    }
                }
                Kind::File => {
                    self.p.files_total += 1;
                    self.p.bytes_total += e.size;
                    match r {
                        Resume::Skip => {
                            self.p.files_done += 1;
                            self.p.bytes_done += e.size;
                        }
                        Resume::From(off) => self.p.bytes_done += off.min(e.size),
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Counts a subtree done in an earlier run (for the progress figures).
    fn count_skipped(&mut self, dir: &RelPath, depth: usize) -> R<()> {
        let before_done = (self.p.files_done, self.p.bytes_done);
        let (ft, bt) = (self.p.files_total, self.p.bytes_total);
        let saved = self.resume.take();
        self.count(dir, depth)?;
        self.resume = saved;
        self.p.files_done = before_done.0 + (self.p.files_total - ft);
        self.p.bytes_done = before_done.1 + (self.p.bytes_total - bt);
        Ok(())
    }

    fn full(&mut self) -> R<()> {
        for d in 0..self.src.dirs() {
            let Some(root) = RelPath::new(d, "") else { continue };
            if self.resume.as_ref().is_some_and(|(at, _)| at.dir() > d) {
                self.count_skipped(&root, 0)?;
            } else {
                self.count(&root, 0)?;
            }
        }
        for d in 0..self.src.dirs() {
            let Some(root) = RelPath::new(d, "") else { continue };
            if self.resume.as_ref().is_some_and(|(at, _)| at.dir() > d) {
                continue;
            }
            let se = self.src.stat(&root).map_err(local(&root))?.ok_or(ResyncError::MissingRoot(d, "this host"))?;
            let pe = self.peer.stat(&root).map_err(remote(&root))?.ok_or(ResyncError::MissingRoot(d, "the peer"))?;
            self.sync_dir_contents(&root, 0)?;
            self.fix_attrs(&root, &se, Some(&pe), true)?;
        }
        Ok(())
    }

    fn sync_dir_contents(&mut self, dir: &RelPath, depth: usize) -> R<()> {
        if depth > TREE_DEPTH_MAX {
            warn!(dir = %show(dir), "directory tree deeper than {TREE_DEPTH_MAX}: not resynced below");
            return Ok(());
        }
        let src_list = match self.src.list(dir) {
            Ok(l) => l,
            Err(e) if is_enoent(&e) => return Ok(()),
            Err(e) => return Err(local(dir)(e)),
        };
        let peer_list: BTreeMap<String, Entry> = self.peer.list(dir).map_err(remote(dir))?.into_iter().collect();
        let src_names: BTreeSet<&str> = src_list.iter().map(|(n, _)| n.as_str()).collect();
        for name in peer_list.keys() {
            if src_names.contains(name.as_str()) {
                continue;
            }
            let Some(p) = dir.join(name) else { continue };
            if self.excluded(&p) {
                continue;
            }
            debug!(path = %show(&p), "not on the source: deleted on the peer");
            self.peer.remove_tree(&p).map_err(remote(&p))?;
            self.stats.entries_deleted += 1;
        }
        for (name, se) in &src_list {
            let Some(p) = dir.join(name) else { continue };
            if self.excluded(&p) {
                continue;
            }
            let Resume::From(start) = self.resume_of(&p) else { continue };
            self.sync_entry(&p, se, peer_list.get(name), start, true, depth)?;
        }
        Ok(())
    }

    /// Makes the peer's `path` like the source's `se`: type, content (by checksums from
    /// `start`), attributes; a new directory's contents too, or any directory's with `recurse`.
    fn sync_entry(
        &mut self,
        path: &RelPath,
        se: &Entry,
        pe: Option<&Entry>,
        start: u64,
        recurse: bool,
        depth: usize,
    ) -> R<()> {
        let mut pe = pe.cloned();
        if pe.as_ref().is_some_and(|p| !p.same_kind(se)) {
            self.peer.remove_tree(path).map_err(remote(path))?;
            self.stats.entries_deleted += 1;
            pe = None;
        }
        match &se.kind {
            Kind::Dir => {
                let fresh = pe.is_none();
                if fresh {
                    self.send_ns(Op::Mkdir { dir: path.clone(), mode: se.perm(), uid: se.uid, gid: se.gid })?;
                }
                if recurse || fresh {
                    self.sync_dir_contents(path, depth + 1)?;
                }
                self.fix_attrs(path, se, pe.as_ref(), true)?;
            }
            Kind::File => {
                if se.nlink > 1 {
                    if let Some(first) = self.hardlinks.get(&se.id).filter(|f| *f != path).cloned() {
                        if pe.is_some() {
                            self.peer.remove_tree(path).map_err(remote(path))?;
                        }
                        self.send_ns(Op::Link { existing: first, new: path.clone() })?;
                        if !self.incremental {
                            self.p.files_done += 1;
                        }
                        self.p.bytes_done += se.size.saturating_sub(start);
                        self.pos = Some((path.clone(), u64::MAX));
                        return self.tick();
                    }
                    if self.hardlinks.len() < HARDLINKS_MAX {
                        self.hardlinks.insert(se.id, path.clone());
                    }
                }
                if pe.is_none() {
                    self.send_ns(Op::Create { file: path.clone(), mode: 0o600, uid: se.uid, gid: se.gid })?;
                }
                let wrote = self.sync_file_content(path, pe.as_ref(), start)?;
                self.fix_attrs(path, se, pe.as_ref(), wrote)?;
                if !self.incremental {
                    self.p.files_done += 1;
                }
            }
            Kind::Symlink(target) => {
                if pe.is_none() {
                    self.send_ns(Op::Symlink { link: path.clone(), target: target.clone(), uid: se.uid, gid: se.gid })?;
                }
                self.fix_attrs(path, se, pe.as_ref(), pe.is_none())?;
            }
            Kind::Special { rdev } => {
                if pe.is_none() {
                    self.send_ns(Op::Mknod {
                        node: path.clone(),
                        mode: se.mode,
                        rdev: *rdev,
                        uid: se.uid,
                        gid: se.gid,
                    })?;
                }
                self.fix_attrs(path, se, pe.as_ref(), pe.is_none())?;
            }
        }
        self.stats.files_examined += 1;
        self.pos = Some((path.clone(), u64::MAX));
        self.tick()
    }

    fn send_ns(&mut self, op: Op) -> R<()> {
        self.peer.apply(&op).map_err(|source| Halt::Err(ResyncError::Peer { path: ns_label(&op), source }))
    }

    /// Block-by-block comparison of a regular file from `start`; returns whether anything
    /// was sent. `pe`: the peer's entry before (None: the file was just created, empty).
    fn sync_file_content(&mut self, path: &RelPath, pe: Option<&Entry>, start: u64) -> R<bool> {
        let file = match self.src.open_file(path) {
            Ok(f) => f,
            Err(e) if is_enoent(&e) => {
                debug!(path = %show(path), "vanished from the source during the resync");
                return Ok(false);
            }
            Err(e) => return Err(local(path)(e)),
        };
        let size = file.metadata().map_err(local(path))?.len();
        let sent_before = self.p.bytes_sent;
        let punched_before = self.stats.holes_punched;
        if pe.map(|p| p.size).unwrap_or(0) != size {
            self.send_ns(Op::Truncate { file: path.clone(), size })?;
        }
        let fresh = pe.is_none();
        let qmap = match qcow2::is_qcow2(&file) {
            Ok(true) => match Qcow2Map::open(&file) {
                Ok(m) => Some(m),
                Err(e) => {
                    warn!(path = %show(path), "qcow2 image not parsed ({e}): resynced as a raw file");
                    None
                }
            },
            _ => None,
        };
        let bb = self.opts.block_bytes;
        let mut off = (start / bb).saturating_mul(bb);
        while off < size {
            let batch_end = off.saturating_add(bb * HASH_BATCH_BLOCKS).min(size);
            let nblocks = (batch_end - off).div_ceil(bb);
            let peer_hashes = if fresh {
                None
            } else {
                let h = self.peer.block_hashes(path, bb, off / bb, nblocks).map_err(remote(path))?;
                if h.len() as u64 != nblocks {
                    return Err(remote(path)(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "wrong number of block hashes",
                    )));
                }
                Some(h)
            };
            let mut data = data_ranges(&file, off, batch_end).map_err(local(path))?;
            if let Some(q) = &qmap {
                data = intersect(&data, &q.needed_ranges(&file, off, batch_end).map_err(local(path))?);
            }
            for i in 0..nblocks {
                let bs = off + i * bb;
                let be = (bs + bb).min(size);
                let len = be - bs;
                let sub = clip(&data, bs, be);
                let zero = self.zeros.of(len);
                let theirs = peer_hashes.as_ref().and_then(|h| h.get(i as usize).copied()).unwrap_or(zero);
                if sub.is_empty() {
                    if theirs != zero {
                        self.punch(path, bs, be)?;
                        self.stats.blocks_sent += 1;
                    }
                } else {
                    self.read_block(&file, path, bs, be, &sub)?;
                    if xxh3_64(&self.buf[..len as usize]) != theirs {
                        self.send_block(path, bs, be, &sub, !fresh)?;
                        self.stats.blocks_sent += 1;
                    }
                }
                self.stats.blocks_compared += 1;
                self.stats.bytes_examined += len;
                self.p.bytes_done += len;
                self.since_checkpoint += len;
                self.pos = Some((path.clone(), be));
                self.tick()?;
            }
            off = batch_end;
        }
        Ok(self.p.bytes_sent != sent_before || self.stats.holes_punched != punched_before)
    }

    /// Sets on the peer the attributes of `se` that differ from `pe` (all with `None`); the
    /// mtime too when `touched` (content or entries changed).
    fn fix_attrs(&mut self, path: &RelPath, se: &Entry, pe: Option<&Entry>, touched: bool) -> R<()> {
        let is_link = matches!(se.kind, Kind::Symlink(_));
        let owner = pe.is_none_or(|p| p.uid != se.uid || p.gid != se.gid);
        let mode = !is_link && pe.is_none_or(|p| p.perm() != se.perm() || owner);
        if owner || mode {
            let op = Op::SetAttr {
                path: path.clone(),
                mode: mode.then_some(se.perm()),
                uid: owner.then_some(se.uid),
                gid: owner.then_some(se.gid),
                atime: None,
                mtime: None,
            };
            if let Err(e) = self.peer.apply(&op) {
                if e.raw_os_error() == Some(libc::EPERM) {
                    if !self.warned_owner {
                        warn!(path = %show(path), "cannot set owner or mode on the peer ({e}): continuing");
                        self.warned_owner = true;
                    }
                } else {
                    return Err(remote(path)(e));
                }
            }
        }
        let theirs: &[(String, Vec<u8>)] = pe.map(|p| p.xattrs.as_slice()).unwrap_or(&[]);
        for (name, value) in &se.xattrs {
            if theirs.iter().any(|(n, v)| n == name && v == value) {
                continue;
            }
            let op = Op::SetXattr { path: path.clone(), name: name.clone(), value: value.clone(), flags: 0 };
            if let Err(e) = self.peer.apply(&op) {
                warn!(path = %show(path), xattr = %name, "xattr not set on the peer: {e}");
            }
        }
        for (name, _) in theirs {
            if se.xattrs.iter().any(|(n, _)| n == name) {
                continue;
            }
            let op = Op::RemoveXattr { path: path.clone(), name: name.clone() };
            if let Err(e) = self.peer.apply(&op) {
                warn!(path = %show(path), xattr = %name, "xattr not removed on the peer: {e}");
            }
        }
        if touched || pe.is_none_or(|p| p.mtime != se.mtime) || owner || mode {
            let op = Op::SetAttr {
                path: path.clone(),
                mode: None,
                uid: None,
                gid: None,
                atime: None,
                mtime: Some(se.mtime),
            };
            self.peer.apply(&op).map_err(remote(path))?;
        }
        Ok(())
    }

    // ---- incremental resync -----------------------------------------------------------------

    fn incremental(&mut self, maps: &DirtyMaps, set: &super::dirty::DirtySet) -> R<()> {
        self.incremental = true;
        let zb = set.zone_bytes;
        self.p.files_total = set.files.len() as u64;
        for (file, d) in &set.files {
            self.p.bytes_total += match d {
                DirtyFile::Zones(z) => z.len() as u64 * zb,
                DirtyFile::Whole => self.src.stat(file).ok().flatten().map(|e| e.size).unwrap_or(0),
            };
        }
        let gen = set.generation;

        // 1. Namespace changes, in order; a failure is noted and its paths checked below. A
        // replay is not idempotent (replaying "rename x y; create x" twice moves the new x
        // over y): when an earlier replay was cut before the maps forgot it, every path it
        // touches is compared by checksums.
        self.stoppable = false;
        let marker = maps.dir().join(REPLAY_MARKER);
        let replayed_before = marker.exists();
        if replayed_before {
            warn!("an earlier namespace replay was interrupted: touched files are compared by checksums");
        }
        if !set.namespace.is_empty() {
            write_marker(&marker).map_err(|e| Halt::Err(ResyncError::Maps(e)))?;
        }
        let mut touched: BTreeSet<RelPath> = BTreeSet::new();
        let mut suspect: BTreeSet<RelPath> = BTreeSet::new();
        for op in &set.namespace {
            let paths = op.paths();
            let excluded = paths.iter().any(|p| self.excluded(p));
            if excluded {
                continue;
            }
            match self.peer.apply(op) {
                Ok(()) => self.stats.namespace_replayed += 1,
                Err(e) => {
                    self.stats.namespace_failed += 1;
                    debug!(op = op_name(op), path = %ns_label(op), "replay on the peer failed ({e}): checked below");
                    suspect.extend(paths.iter().map(|p| (*p).clone()));
                }
            }
            if replayed_before {
                suspect.extend(paths.iter().map(|p| (*p).clone()));
            }
            touched.extend(paths.into_iter().cloned());
        }
        // 2. Every touched path as the source has it now (parents first).
        let mut ordered: Vec<RelPath> = touched.into_iter().collect();
        ordered.sort_by_key(|p| (p.dir(), p.path().split('/').count(), p.path().to_string()));
        for p in &ordered {
            self.reconcile(p, suspect.contains(p), 0)?;
        }
        if !set.namespace.is_empty() || replayed_before {
            self.peer.flush().map_err(flush_failed)?;
            maps.clear_namespace(gen).map_err(|e| Halt::Err(ResyncError::Maps(e)))?;
            remove_marker(&marker).map_err(|e| Halt::Err(ResyncError::Maps(e)))?;
        }
        self.stoppable = true;

        // 3. Data.
        for (file, d) in &set.files {
            if self.excluded(file) {
                continue;
            }
            let r = match d {
                DirtyFile::Zones(zones) => self.send_zones(file, zones, zb),
                DirtyFile::Whole => self.sync_whole(file),
            };
            if let Err(h) = r {
                if matches!(h, Halt::Stop) {
                    self.commit_clears(maps, gen)?;
                }
                return Err(h);
            }
            self.p.files_done += 1;
            if self.pending_bytes >= CLEAR_INTERVAL_BYTES || self.pending.len() >= CLEAR_INTERVAL_FILES {
                self.commit_clears(maps, gen)?;
            }
            self.tick()?;
        }
        self.commit_clears(maps, gen)?;

        // 4. Hard links whose other names the maps could not follow.
        if set.hardlink_orphans {
            for d in 0..self.src.dirs() {
                if let Some(root) = RelPath::new(d, "") {
                    self.relink_check(&root, 0)?;
                }
            }
        }
        Ok(())
    }

    /// Makes the peer durable, then clears from the maps what was sent.
    fn commit_clears(&mut self, maps: &DirtyMaps, gen: u64) -> R<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.peer.flush().map_err(flush_failed)?;
        for (file, zones) in std::mem::take(&mut self.pending) {
            let r = match zones {
                Some(z) => maps.clear(&file, &z, gen),
                None => maps.clear_file(&file, gen),
            };
            r.map_err(|e| Halt::Err(ResyncError::Maps(e)))?;
        }
        self.pending_bytes = 0;
        Ok(())
    }

    /// The peer's `p` made like the source's, after a namespace replay.
    fn reconcile(&mut self, p: &RelPath, suspect: bool, depth: usize) -> R<()> {
        if self.excluded(p) || depth > TREE_DEPTH_MAX {
            return Ok(());
        }
        let se = self.src.stat(p).map_err(local(p))?;
        let pe = self.peer.stat(p).map_err(remote(p))?;
        match (se, pe) {
            (None, None) => Ok(()),
            (None, Some(_)) => {
                if p.path().is_empty() {
                    return Ok(());
                }
                self.peer.remove_tree(p).map_err(remote(p))?;
                self.stats.entries_deleted += 1;
                Ok(())
            }
            (Some(se), pe) => {
                if pe.is_none() {
                    if let Some(parent) = parent_of(p) {
                        if self.peer.stat(&parent).map_err(remote(&parent))?.is_none() {
                            self.reconcile(&parent, true, depth + 1)?;
                            // The parent's creation brought `p` along.
                            return Ok(());
                        }
                    }
                }
                let whole = suspect || pe.as_ref().is_none_or(|x| !x.same_kind(&se));
                match (&se.kind, whole) {
                    // Content: compared by checksums when the replay may have gone wrong;
                    // otherwise the dirty zones bring it.
                    (Kind::File, false) | (Kind::Dir, false) => self.fix_attrs(p, &se, pe.as_ref(), false),
                    (Kind::Dir, true) => self.sync_entry(p, &se, pe.as_ref(), 0, pe.is_none(), depth),
                    _ => self.sync_entry(p, &se, pe.as_ref(), 0, false, depth),
                }
            }
        }
    }

    /// Sends the dirty zones of `file` (hole-aware: data written, holes punched).
    fn send_zones(&mut self, file: &RelPath, zones: &[u64], zb: u64) -> R<()> {
        let Some(se) = self.src.stat(file).map_err(local(file))? else {
            self.pending.push((file.clone(), None));
            return Ok(());
        };
        if se.kind != Kind::File {
            self.pending.push((file.clone(), None));
            return Ok(());
        }
        let pe = self.peer.stat(file).map_err(remote(file))?;
        if pe.as_ref().is_none_or(|p| !p.same_kind(&se)) {
            // Missing or of another type on the peer: the whole file, by checksums.
            self.sync_entry(file, &se, pe.as_ref(), 0, false, 0)?;
            self.pending.push((file.clone(), None));
            return Ok(());
        }
        let f = match self.src.open_file(file) {
            Ok(f) => f,
            Err(e) if is_enoent(&e) => return Ok(()),
            Err(e) => return Err(local(file)(e)),
        };
        let size = f.metadata().map_err(local(file))?.len();
        if pe.as_ref().map(|p| p.size) != Some(size) {
            self.send_ns(Op::Truncate { file: file.clone(), size })?;
        }
        let mut done: Vec<u64> = Vec::new();
        for &z in zones {
            let bs = z.saturating_mul(zb);
            if bs < size {
                let be = bs.saturating_add(zb).min(size);
                let mut sub_start = bs;
                // Zones may be larger than the copy buffer (a zone size changed): by pieces.
                while sub_start < be {
                    let sub_end = sub_start.saturating_add(self.buf.len() as u64).min(be);
                    let data = data_ranges(&f, sub_start, sub_end).map_err(local(file))?;
                    self.read_block(&f, file, sub_start, sub_end, &data)?;
                    let before = self.p.bytes_sent;
                    self.send_block(file, sub_start, sub_end, &data, true)?;
                    self.pending_bytes += self.p.bytes_sent - before;
                    sub_start = sub_end;
                }
                self.stats.blocks_sent += 1;
            }
            self.stats.bytes_examined += zb;
            self.p.bytes_done += zb;
            done.push(z);
            if let Err(h) = self.tick() {
                self.pending.push((file.clone(), Some(done)));
                return Err(h);
            }
        }
        self.fix_attrs(file, &se, pe.as_ref(), true)?;
        self.stats.files_examined += 1;
        self.pending.push((file.clone(), Some(done)));
        Ok(())
    }

    /// A whole-dirty file: compared block by block.
    fn sync_whole(&mut self, file: &RelPath) -> R<()> {
        let se = self.src.stat(file).map_err(local(file))?;
        if let Some(se) = se {
            let pe = self.peer.stat(file).map_err(remote(file))?;
            self.sync_entry(file, &se, pe.as_ref(), 0, false, 0)?;
        }
        self.pending.push((file.clone(), None));
        Ok(())
    }

    /// Compares every multiply-linked regular file (see `DirtySet::hardlink_orphans`).
    fn relink_check(&mut self, dir: &RelPath, depth: usize) -> R<()> {
        for (p, e) in self.children(dir, depth)? {
            match e.kind {
                Kind::Dir => self.relink_check(&p, depth + 1)?,
                Kind::File if e.nlink > 1 => {
                    let pe = self.peer.stat(&p).map_err(remote(&p))?;
                    self.sync_entry(&p, &e, pe.as_ref(), 0, false, depth)?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// In the maps directory while a namespace replay is not yet cleared from the maps.
pub const REPLAY_MARKER: &str = "replay.inprogress";

fn write_marker(path: &Path) -> io::Result<()> {
    File::create(path)?.sync_all()?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn remove_marker(path: &Path) -> io::Result<()> {
    clear_checkpoint(path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn flush_failed(source: io::Error) -> Halt {
    Halt::Err(ResyncError::Peer { path: "(flush)".into(), source })
}

fn parent_of(p: &RelPath) -> Option<RelPath> {
    if p.path().is_empty() {
        return None;
    }
    let parent = p.path().rsplit_once('/').map(|(a, _)| a).unwrap_or("");
    RelPath::new(p.dir(), parent)
}

/// The path an op is about, for messages.
fn ns_label(op: &Op) -> String {
    op.paths().first().map(|p| show(p)).unwrap_or_else(|| "(all)".into())
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Write { .. } => "write",
        Op::Truncate { .. } => "truncate",
        Op::Fallocate { .. } => "fallocate",
        Op::Create { .. } => "create",
        Op::Mkdir { .. } => "mkdir",
        Op::Mknod { .. } => "mknod",
        Op::Symlink { .. } => "symlink",
        Op::Link { .. } => "link",
        Op::Unlink { .. } => "unlink",
        Op::Rmdir { .. } => "rmdir",
        Op::Rename { .. } => "rename",
        Op::SetAttr { .. } => "setattr",
        Op::SetXattr { .. } => "setxattr",
        Op::RemoveXattr { .. } => "removexattr",
        Op::Fsync { .. } => "fsync",
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points

/// Checks that a checksum block size is a power of two up to 256 MiB.
pub(crate) fn check_block_bytes(block_bytes: u64) -> Result<(), ResyncError> {
    if !block_bytes.is_power_of_two() || block_bytes > (256 << 20) {
        return Err(ResyncError::Local {
            path: "(options)".into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "block size must be a power of two up to 256 MiB"),
        });
    }
    Ok(())
}

/// Full resync of every replicated directory of `source` onto `peer` (see the module doc).
/// With `maps`, the changes marked before it started are cleared when it is done. Resumes
/// from `opts.checkpoint` when one is saved; removes it when done.
pub fn full_resync(
    source: &LocalTree,
    peer: &mut dyn PeerFiles,
    maps: Option<&DirtyMaps>,
    opts: &ResyncOptions,
    progress: &mut dyn FnMut(&Progress) -> Flow,
) -> Result<Outcome, ResyncError> {
    check_block_bytes(opts.block_bytes)?;
    let started = Instant::now();
    let gen = maps.map(|m| m.generation());
    let mut e = Engine::new(source, peer, opts, progress);
    e.stats.full = true;
    if let Some(cp) = &opts.checkpoint {
        e.resume = load_checkpoint(cp, opts.block_bytes);
        if let Some((at, off)) = &e.resume {
            info!(path = %show(at), offset = off, "full resync resumes from its checkpoint");
        }
        e.stats.resumed_from = e.resume.clone();
    }
    let r = e.full();
    let mut stats = std::mem::take(&mut e.stats);
    stats.bytes_sent = e.p.bytes_sent;
    stats.elapsed = started.elapsed();
    match r {
        Ok(()) => {
            e.peer.flush().map_err(|source| ResyncError::Peer { path: "(flush)".into(), source })?;
            if let (Some(m), Some(g)) = (maps, gen) {
                m.clear_upto(g).map_err(ResyncError::Maps)?;
                // Every path was compared: an interrupted replay needs no more checking.
                remove_marker(&m.dir().join(REPLAY_MARKER)).map_err(ResyncError::Maps)?;
            }
            if let Some(cp) = &opts.checkpoint {
                clear_checkpoint(cp).map_err(|source| ResyncError::Checkpoint { path: cp.clone(), source })?;
            }
            info!(bytes_sent = stats.bytes_sent, examined = stats.bytes_examined, "full resync done");
            Ok(Outcome::Done(stats))
        }
        Err(Halt::Stop) => {
            match e.save_checkpoint() {
                Ok(()) => {}
                Err(Halt::Err(err)) => return Err(err),
                Err(Halt::Stop) => {}
            }
            info!(bytes_sent = stats.bytes_sent, "full resync stopped; checkpoint saved");
            Ok(Outcome::Stopped(stats))
        }
        Err(Halt::Err(err)) => Err(err),
    }
}

/// Incremental resync from the maps (see the module doc). Falls back to a full resync when
/// the maps say it is needed. Clears from the maps what the peer has made durable.
pub fn incremental_resync(
    source: &LocalTree,
    peer: &mut dyn PeerFiles,
    maps: &DirtyMaps,
    opts: &ResyncOptions,
    progress: &mut dyn FnMut(&Progress) -> Flow,
) -> Result<Outcome, ResyncError> {
    check_block_bytes(opts.block_bytes)?;
    let set = maps.snapshot();
    if set.full {
        warn!("the dirty-zone maps are incomplete (overflow or damage): running a full resync");
        return full_resync(source, peer, Some(maps), opts, progress);
    }
    let started = Instant::now();
    let mut e = Engine::new(source, peer, opts, progress);
    let r = e.incremental(maps, &set);
    let mut stats = std::mem::take(&mut e.stats);
    stats.bytes_sent = e.p.bytes_sent;
    stats.elapsed = started.elapsed();
    match r {
        Ok(()) => {
            e.peer.flush().map_err(|source| ResyncError::Peer { path: "(flush)".into(), source })?;
            maps.clear_upto(set.generation).map_err(ResyncError::Maps)?;
            info!(bytes_sent = stats.bytes_sent, zones = set.zone_count(), "incremental resync done");
            Ok(Outcome::Done(stats))
        }
        Err(Halt::Stop) => Ok(Outcome::Stopped(stats)),
        Err(Halt::Err(err)) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Walk order puts a directory's contents right after it, before its next sibling.
    #[test]
    fn walk_order_is_depth_first_by_component() {
        let p = |s: &str| RelPath::new(0, s).unwrap();
        assert_eq!(walk_cmp(&p("a/b"), &p("a-c")), Ordering::Less);
        assert_eq!(walk_cmp(&p("a"), &p("a/b")), Ordering::Less);
        assert_eq!(walk_cmp(&p("b"), &p("a/z")), Ordering::Greater);
        assert!(is_ancestor(&p(""), &p("a")));
        assert!(is_ancestor(&p("a"), &p("a/b")));
        assert!(!is_ancestor(&p("a"), &p("ab")));
    }

    // Range intersection keeps only the overlap, sorted.
    #[test]
    fn intersect_ranges() {
        assert_eq!(intersect(&[(0, 10), (20, 30)], &[(5, 25)]), vec![(5, 10), (20, 25)]);
        assert_eq!(clip(&[(0, 100)], 10, 20), vec![(10, 20)]);
        assert!(clip(&[(0, 5)], 5, 10).is_empty());
    }

    // The zero-block hash equals xxh3 of real zeros.
    #[test]
    fn zero_hash_matches() {
        assert_eq!(zero_hash(100_000), xxh3_64(&vec![0u8; 100_000]));
        assert_eq!(zero_hash(0), xxh3_64(&[]));
    }
}
