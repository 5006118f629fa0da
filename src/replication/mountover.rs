//! The mountover: a FUSE passthrough mounted *over* a replicated directory, so applications and
//! qemu keep using the original path while every change they make becomes an [`Op`].
//!
//! [`Mountover::mount`] opens an `O_PATH` fd of the directory, then mounts FUSE on the same path.
//! The server reaches the real files only through that fd, with `*at` calls on single names and
//! `O_NOFOLLOW`: it never resolves a path itself, so `..` at the root stays at the root, and a
//! symlink (absolute, or pointing out with `../..`) is handed to the kernel as a link, which
//! resolves it for the caller; the server never opens anything outside the directory.
//!
//! The layout follows fuse-backend-rs's passthrough: an inode table (one `O_PATH` fd per real
//! inode, with the names the kernel knows it by, from which an op's [`RelPath`] is rebuilt) and a
//! handle table (the open fds, files and directories apart). Every successful change is handed
//! to the [`OpSink`] after the local change and before the reply to the kernel. Sync points
//! (fsync, fdatasync, flush on close, writes on handles opened with O_SYNC, O_DSYNC or O_DIRECT)
//! wait for [`OpSink::wait_durable`], whose error the application sees as EIO. In
//! [`MountMode::ReadOnly`] (the secondary's view) every change is refused with EROFS.
//!
//! docs/mountover.md explains the choices (O_DIRECT, caching, ownership, limits).

use super::{Op, OpSink, RelPath, Timestamp};
use fuser::{
    AccessFlags, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    Session, SessionACL, TimeOrNow, WriteFlags,
};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Filesystem type of a mountover in /proc/self/mountinfo (`fuse.` + subtype).
pub const FS_TYPE: &str = "fuse.hamirror";
/// Source shown by `mount` and `df`.
const FS_SOURCE: &str = "hamirror";
/// `statfs(2)` magic of every FUSE mount.
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
/// Threads reading requests, each on its own cloned /dev/fuse fd (4 beat 1 by ~20% here).
const SESSION_THREADS: usize = 4;
/// Largest write the kernel sends in one request (`fs.fuse.max_pages_limit` = 256 pages).
const WRITE_BYTES_MAX: u32 = 1 << 20;
/// Largest readahead asked of the kernel (it may grant less).
const READAHEAD_BYTES_MAX: u32 = 1 << 20;
/// Largest read request served; the kernel never asks more than its `max_pages`.
const READ_BYTES_MAX: usize = 16 << 20;
/// Memory and offset alignment of O_DIRECT I/O on the real file.
const DIRECT_ALIGN_BYTES: usize = 4096;
/// O_DIRECT writes whose offset and length are not multiples of this go through a buffered fd.
const DIRECT_SECTOR_BYTES: u64 = 512;
/// Attribute and entry cache time in ReadWrite mode: only this mount changes the files.
const TTL_READ_WRITE: Duration = Duration::from_secs(10);
/// ReadOnly mode: the replication receiver changes the files underneath, so nothing is cached.
const TTL_READ_ONLY: Duration = Duration::ZERO;
/// `getdents64` buffer of an open directory.
const DIRENT_BUF_BYTES: usize = 32 * 1024;
/// Largest extended attribute value or list (Linux XATTR_SIZE_MAX / XATTR_LIST_MAX).
const XATTR_BYTES_MAX: usize = 64 * 1024;
/// Names remembered per inode (hard links the kernel looked up).
const NAMES_PER_INODE_MAX: usize = 32;
/// Deepest path rebuilt from the names (a RelPath holds at most 4096 bytes, so 2048 levels).
const PATH_DEPTH_MAX: usize = 2048;
/// Node ids for inodes that cannot use their own inode number start here.
const NODEID_COUNTER_BASE: u64 = 1 << 63;
/// The FUSE root node id.
const ROOT_ID: u64 = 1;
/// How long a `statfs` of a suspected stale mount may take before it counts as hung.
const STALE_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Stacked dead mounts removed at most by one [`recover_stale_mount`].
const STACKED_MOUNTS_MAX: usize = 16;
/// How long [`Detached::abort`] waits for the session threads after aborting the connection.
const ABORT_JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// fusectl, where a FUSE connection can be aborted.
const FUSECTL_DIR: &str = "/sys/fs/fuse/connections";

/// Who may change the files through the mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountMode {
    /// The primary's view: changes are made and handed to the sink.
    ReadWrite,
    /// The secondary's view: every change is refused with EROFS; only the replication receiver
    /// writes, underneath, through its own fd.
    ReadOnly,
}

/// A mountover serving one replicated directory. Dropping it detaches the mount lazily, like
/// [`Mountover::unmount`], and leaves the session to end when the last held file is closed.
pub struct Mountover {
    dir: PathBuf,
    conn: u32,
    fs: Arc<Fs>,
    session: Option<JoinHandle<io::Result<()>>>,
    mounted: bool,
}

impl std::fmt::Debug for Mountover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mountover")
            .field("dir", &self.dir)
            .field("conn", &self.conn)
            .field("mode", &self.fs.mode)
            .finish()
    }
}

impl Mountover {
    /// Mounts the mountover over `dir` (after removing a dead mountover left there by a crashed
    /// daemon, see [`recover_stale_mount`]). Ops name paths relative to `dir` under `dir_index`;
    /// paths under a `notreplicated` entry (relative to `dir`) are served but produce no op.
    /// Needs root (mount(2), no fusermount).
    pub fn mount(
        dir: &Path,
        dir_index: u16,
        mode: MountMode,
        notreplicated: &[PathBuf],
        sink: Arc<dyn OpSink>,
    ) -> io::Result<Mountover> {
        let excluded = normalize_notreplicated(notreplicated)?;
        recover_stale_mount(dir)?;
        let dir = dir.canonicalize()?;
        let dir_c = path_cstring(&dir)?;
        let root_fd = sys::openat(sys::cwd(), &dir_c, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let root_st = sys::fstat(root_fd.as_fd())?;
        let proc_self_fd = sys::openat(sys::cwd(), c"/proc/self/fd", libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let fs = Arc::new(Fs::new(root_fd, &root_st, proc_self_fd, dir_index, mode, excluded, sink));

        let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse")?;
        let options = format!(
            "fd={},rootmode={:o},user_id={},group_id={},allow_other,default_permissions",
            dev.as_raw_fd(),
            root_st.st_mode & libc::S_IFMT,
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
        if mode == MountMode::ReadOnly {
            flags |= libc::MS_RDONLY;
        }
        sys::mount(&cstring(FS_SOURCE)?, &dir_c, &cstring(FS_TYPE)?, flags, &cstring(&options)?)?;

        // From here on a failure must take the mount away again.
        let conn = match mounts_at(&dir).map(|stack| stack.last().cloned()) {
            Ok(Some(top)) if top.fstype == FS_TYPE => top.minor,
            other => {
                let _ = sys::umount_detach(&dir_c);
                return Err(io::Error::other(format!(
                    "mounted {} but cannot find the mount in /proc/self/mountinfo ({other:?})",
                    dir.display()
                )));
            }
        };
        let mut config = Config::default();
        config.acl = SessionACL::All;
        config.n_threads = Some(SESSION_THREADS);
        config.clone_fd = true;
        let session = match Session::from_fd(MountoverFs(fs.clone()), OwnedFd::from(dev), SessionACL::All, config) {
            Ok(session) => session,
            Err(e) => {
                let _ = sys::umount_detach(&dir_c);
                return Err(e);
            }
        };
        let thread = std::thread::Builder::new().name(format!("mountover-{dir_index}")).spawn(move || session.run());
        let session = match thread {
            Ok(handle) => handle,
            Err(e) => {
                let _ = sys::umount_detach(&dir_c);
                return Err(e);
            }
        };
        tracing::info!(dir = %dir.display(), conn, ?mode, "mountover mounted");
        Ok(Mountover { dir, conn, fs, session: Some(session), mounted: true })
    }

    /// The directory served (canonical path).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Who may change the files through the mount.
    pub fn mode(&self) -> MountMode {
        self.fs.mode
    }

    /// Runs `f` while no change can happen through this mount: every change in progress has
    /// submitted its op before `f` starts, and new ones wait until it returns (reads go on).
    pub fn paused<R>(&self, f: impl FnOnce() -> R) -> R {
        let _changes = write(&self.fs.namespace);
        f()
    }

    /// The FUSE connection number (`/sys/fs/fuse/connections/<conn>`).
    pub fn conn(&self) -> u32 {
        self.conn
    }

    /// Detaches the mount lazily (`umount -l`): new opens of the path reach the real directory at
    /// once, while files already open through the mount keep working (and keep producing ops)
    /// until closed; the session threads end when the last one is closed. The returned
    /// [`Detached`] waits for that, or aborts the connection.
    pub fn unmount(mut self) -> io::Result<Detached> {
        self.detach()?;
        tracing::info!(dir = %self.dir.display(), conn = self.conn, "mountover detached");
        Ok(Detached { dir: self.dir.clone(), conn: self.conn, session: self.session.take() })
    }

    fn detach(&mut self) -> io::Result<()> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        let stack = mounts_at(&self.dir)?;
        let ours = |m: &MountEntry| m.fstype == FS_TYPE && m.minor == self.conn;
        match stack.last() {
            Some(top) if ours(top) => sys::umount_detach(&path_cstring(&self.dir)?),
            _ if stack.iter().any(ours) => Err(io::Error::other(format!(
                "another filesystem is mounted over the mountover of {}; not unmounting it",
                self.dir.display()
            ))),
            // Already gone (someone ran umount): nothing to do.
            _ => Ok(()),
        }
    }
}

impl Drop for Mountover {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::warn!(dir = %self.dir.display(), error = %e, "mountover: lazy unmount on drop failed");
        }
    }
}

/// A mountover detached from its path whose session may still serve files held open.
/// Dropping it leaves the session threads to end on their own when the last file is closed.
#[derive(Debug)]
pub struct Detached {
    dir: PathBuf,
    conn: u32,
    session: Option<JoinHandle<io::Result<()>>>,
}

impl Detached {
    /// True once the session threads have ended (no file is held open through the mount any more).
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.is_finished())
    }

    /// Waits up to `timeout` for the session to end; true when it has.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(handle) = self.session.take() {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "mountover session ended with an error")
                }
                Err(_) => tracing::error!(dir = %self.dir.display(), "mountover session thread panicked"),
            }
        }
        true
    }

    /// Aborts the FUSE connection (fusectl `abort`): files still held open through the mount
    /// get ENOTCONN from now on, and the session threads stop.
    pub fn abort(mut self) -> io::Result<()> {
        if !self.is_finished() {
            abort_connection(self.conn)?;
        }
        if self.wait(ABORT_JOIN_TIMEOUT) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("mountover session of {} did not stop after the abort", self.dir.display()),
            ))
        }
    }

    /// Waits up to `grace` for the files held open to be closed, then aborts the connection.
    /// Returns true when it had to abort.
    pub fn finish(mut self, grace: Duration) -> io::Result<bool> {
        if self.wait(grace) {
            return Ok(false);
        }
        tracing::warn!(dir = %self.dir.display(), "files still open through the detached mountover: aborting it");
        self.abort()?;
        Ok(true)
    }
}

/// Removes dead mountovers stacked on `dir` (left by a daemon killed with its mount in place:
/// every access then fails with ENOTCONN) with a lazy unmount, and returns how many it removed.
/// A dead FUSE mount of another kind is removed too (it serves nobody). A live mountover is an
/// error (the directory is already served), and so is one that does not answer `statfs` within
/// a few seconds (a hung daemon: its connection can be aborted through fusectl).
pub fn recover_stale_mount(dir: &Path) -> io::Result<usize> {
    let path = mount_point_path(dir)?;
    let path_c = path_cstring(&path)?;
    let mut recovered = 0;
    for _ in 0..STACKED_MOUNTS_MAX {
        let Some(top) = mounts_at(&path)?.pop() else { break };
        if !top.fstype.starts_with("fuse") {
            break;
        }
        match probe_mount(&path) {
            Probe::Dead => {
                sys::umount_detach(&path_c)?;
                recovered += 1;
                let fstype = &top.fstype;
                tracing::warn!(dir = %path.display(), %fstype, "removed a stale FUSE mount left by a dead daemon");
            }
            Probe::Live if top.fstype == FS_TYPE => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} is already served by a running hamirror mountover", path.display()),
                ));
            }
            Probe::Live => break,
            Probe::Hung => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the FUSE mount on {} does not answer; if its daemon is gone, abort it with \
                         `echo 1 > {FUSECTL_DIR}/{}/abort` and retry",
                        path.display(),
                        top.minor
                    ),
                ));
            }
        }
    }
    Ok(recovered)
}

enum Probe {
    Live,
    Dead,
    Hung,
}

/// `statfs` of the path in a helper thread: a hung FUSE daemon would block the caller forever.
fn probe_mount(path: &Path) -> Probe {
    let Ok(path_c) = path_cstring(path) else { return Probe::Live };
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("mountover-probe".into()).spawn(move || {
        let _ = tx.send(sys::statfs(&path_c));
    });
    if spawned.is_err() {
        return Probe::Hung;
    }
    match rx.recv_timeout(STALE_PROBE_TIMEOUT) {
        Ok(Ok(_)) => Probe::Live,
        Ok(Err(e)) if is_dead_connection(&e) => Probe::Dead,
        Ok(Err(_)) => Probe::Live,
        Err(_) => Probe::Hung,
    }
}

fn is_dead_connection(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::ECONNABORTED))
}

/// The canonical path of a directory that may have a dead FUSE mount on it (which makes
/// `canonicalize` itself fail with ENOTCONN).
fn mount_point_path(dir: &Path) -> io::Result<PathBuf> {
    match dir.canonicalize() {
        Ok(path) => Ok(path),
        Err(e) if is_dead_connection(&e) => {
            let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else { return Err(e) };
            let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
            Ok(parent.canonicalize()?.join(name))
        }
        Err(e) => Err(e),
    }
}

fn abort_connection(conn: u32) -> io::Result<()> {
    let ctl = Path::new(FUSECTL_DIR);
    let abort = ctl.join(conn.to_string()).join("abort");
    if !abort.exists() && !ctl.join(conn.to_string()).exists() {
        // fusectl may simply not be mounted yet.
        let _ = sys::mount(c"fusectl", &path_cstring(ctl)?, c"fusectl", 0, c"");
    }
    match std::fs::write(&abort, b"1") {
        Ok(()) => Ok(()),
        // The connection ended meanwhile.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    minor: u32,
    fstype: String,
}

/// The mounts stacked on `path`, bottom first.
fn mounts_at(path: &Path) -> io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text, path.as_os_str().as_bytes()))
}

fn parse_mountinfo(text: &str, path: &[u8]) -> Vec<MountEntry> {
    let mut found = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else { continue };
        let (Some(devs), Some(mount_point), Some(fstype)) = (fields.get(2), fields.get(4), fields.get(sep + 1)) else {
            continue;
        };
        if unescape_mountinfo(mount_point) != path {
            continue;
        }
        let Some(minor) = devs.split_once(':').and_then(|(_, minor)| minor.parse().ok()) else { continue };
        found.push(MountEntry { minor, fstype: (*fstype).to_string() });
    }
    found
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = bytes[i + 1..i + 4].iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Checks and joins the `<notreplicated path>` entries: relative, plain components, UTF-8.
fn normalize_notreplicated(entries: &[PathBuf]) -> io::Result<Vec<String>> {
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let mut parts = Vec::new();
        for component in entry.components() {
            match component {
                Component::Normal(part) => parts.push(part.to_str().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("notreplicated path {entry:?} is not UTF-8"))
                })?),
                Component::CurDir => {}
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "notreplicated path {} must be relative to the directory, without `..`",
                            entry.display()
                        ),
                    ))
                }
            }
        }
        if parts.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("notreplicated path {entry:?} names the whole directory"),
            ));
        }
        out.push(parts.join("/"));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The server state: inode table and handle table.
// ---------------------------------------------------------------------------------------------

/// One real inode the kernel knows, pinned by an `O_PATH` fd.
struct Inode {
    nodeid: u64,
    file_type: u32,
    fd: OwnedFd,
    /// The kernel's lookup count (changed under the table lock).
    lookups: AtomicU64,
    /// The names the kernel knows this inode by; the first one builds its RelPath.
    names: Mutex<Vec<Name>>,
    /// Serialises a local data change with its submit, so ops reach the sink in the order the
    /// changes hit the file (the kernel already serialises writes per inode without
    /// FOPEN_PARALLEL_DIRECT_WRITES; mmap writeback does not take that lock).
    data_lock: Mutex<()>,
    /// Mark (sequence + 1) of the last op about this inode; 0 when none.
    last_mark: AtomicU64,
    warned_unnamed: AtomicBool,
}

struct Name {
    parent: Arc<Inode>,
    name: OsString,
}

#[derive(Default)]
struct InodeTable {
    by_id: HashMap<u64, Arc<Inode>>,
    /// (st_dev, st_ino) to the inode object, kept while anything (a child's name, an op in
    /// flight) holds it, so a forgotten directory looked up again is the same object.
    by_key: HashMap<(u64, u64), Weak<Inode>>,
    next_counter_id: u64,
}

impl InodeTable {
    /// The inode's own number when it is on the directory's filesystem and free, so `ls -i`
    /// matches the real files; a counter otherwise.
    fn allocate_id(&mut self, st: &libc::stat, root_dev: u64) -> u64 {
        let own = st.st_ino;
        if st.st_dev == root_dev && own > ROOT_ID && own < NODEID_COUNTER_BASE && !self.by_id.contains_key(&own) {
            return own;
        }
        loop {
            let id = NODEID_COUNTER_BASE.saturating_add(self.next_counter_id);
            self.next_counter_id = self.next_counter_id.wrapping_add(1);
            if !self.by_id.contains_key(&id) {
                return id;
            }
        }
    }

    fn sweep(&mut self) {
        if self.by_key.len() > 2 * self.by_id.len() + 1024 {
            self.by_key.retain(|_, inode| inode.strong_count() > 0);
        }
    }
}

/// An open file: the real fd and what the application asked for.
struct OpenFile {
    inode: Arc<Inode>,
    file: File,
    /// Flags of the real fd.
    flags: i32,
    /// O_DIRECT is kept on the real fd (aligned bounce buffer).
    direct: bool,
    /// O_SYNC, O_DSYNC or O_DIRECT: every write is a sync point.
    sync_writes: bool,
    writable: bool,
    /// Lazily opened fd without O_DIRECT, for I/O the real file refuses unaligned.
    buffered: OnceLock<File>,
    /// Mark (sequence + 1) of the last op through this handle; 0 when none.
    last_mark: AtomicU64,
}

/// An open directory: the real fd and a getdents buffer.
struct OpenDir {
    inode: Arc<Inode>,
    file: File,
    buf: Mutex<Vec<u8>>,
}

/// Where a change lands for replication.
enum Target {
    /// A replicated path: the change produces an op.
    Replicated(RelPath),
    /// Under a notreplicated entry: served, no op.
    Local,
    /// The inode has no name left (deleted while open): nothing to ship.
    Gone,
}

struct Fs {
    dir_index: u16,
    mode: MountMode,
    ttl: Duration,
    root: Arc<Inode>,
    root_dev: u64,
    proc_self_fd: OwnedFd,
    excluded: Vec<String>,
    sink: Arc<dyn OpSink>,
    inodes: RwLock<InodeTable>,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    dirs: RwLock<HashMap<u64, Arc<OpenDir>>>,
    next_handle: AtomicU64,
    /// Held for writing by renames and removals (they change which path an inode has), for
    /// reading by every other change from the moment it resolves its path until it has
    /// submitted its op: so an op never names a path that an earlier submitted op renamed.
    namespace: RwLock<()>,
    /// Highest mark known durable (wait_durable returned for it).
    durable_mark: AtomicU64,
    /// FUSE_DONT_MASK granted: the kernel leaves the umask to us (with FUSE_POSIX_ACL).
    dont_mask: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}
fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn errno(code: i32) -> Errno {
    Errno::from_i32(code)
}
fn os_err(e: io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

type FsResult<T> = Result<T, Errno>;

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string contains a NUL byte"))
}
fn path_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// A single directory entry name from the kernel: not empty, no `/`, no NUL, at most 255 bytes.
fn entry_name(name: &OsStr) -> FsResult<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    if bytes.len() > 255 {
        return Err(errno(libc::ENAMETOOLONG));
    }
    CString::new(bytes).map_err(|_| errno(libc::EINVAL))
}

/// The fd number as a name relative to /proc/self/fd.
fn fd_name(fd: BorrowedFd<'_>) -> CString {
    CString::new(fd.as_raw_fd().to_string()).unwrap_or_default()
}

/// /proc/self/fd/N: the path form for calls without an *at variant (xattrs).
fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

fn mark_of(seq: u64) -> u64 {
    seq.saturating_add(1)
}

impl Fs {
    fn new(
        root_fd: OwnedFd,
        root_st: &libc::stat,
        proc_self_fd: OwnedFd,
        dir_index: u16,
        mode: MountMode,
        excluded: Vec<String>,
        sink: Arc<dyn OpSink>,
    ) -> Fs {
        let root = Arc::new(Inode {
            nodeid: ROOT_ID,
            file_type: libc::S_IFDIR,
            fd: root_fd,
            lookups: AtomicU64::new(1),
            names: Mutex::new(Vec::new()),
            data_lock: Mutex::new(()),
            last_mark: AtomicU64::new(0),
            warned_unnamed: AtomicBool::new(false),
        });
        let mut table = InodeTable::default();
        table.by_id.insert(ROOT_ID, root.clone());
        table.by_key.insert((root_st.st_dev, root_st.st_ino), Arc::downgrade(&root));
        Fs {
            dir_index,
            mode,
            ttl: match mode {
                MountMode::ReadWrite => TTL_READ_WRITE,
                MountMode::ReadOnly => TTL_READ_ONLY,
            },
            root,
            root_dev: root_st.st_dev,
            proc_self_fd,
            excluded,
            sink,
            inodes: RwLock::new(table),
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            namespace: RwLock::new(()),
            durable_mark: AtomicU64::new(0),
            dont_mask: AtomicBool::new(false),
        }
    }

    fn writable(&self) -> FsResult<()> {
        match self.mode {
            MountMode::ReadWrite => Ok(()),
            MountMode::ReadOnly => Err(errno(libc::EROFS)),
        }
    }

    fn fopen_flags(&self) -> FopenFlags {
        match self.mode {
            // Every change goes through this mount, so the kernel's page cache stays right.
            MountMode::ReadWrite => FopenFlags::FOPEN_KEEP_CACHE,
            MountMode::ReadOnly => FopenFlags::empty(),
        }
    }

    // --- inode table -------------------------------------------------------------------------

    fn inode(&self, ino: INodeNo) -> FsResult<Arc<Inode>> {
        read(&self.inodes).by_id.get(&ino.0).cloned().ok_or(errno(libc::ESTALE))
    }

    fn alive(&self, key: (u64, u64)) -> Option<Arc<Inode>> {
        read(&self.inodes).by_key.get(&key).and_then(Weak::upgrade)
    }

    /// Records one more kernel lookup of the inode behind `fd` (a new `O_PATH` fd), reusing the
    /// object already known for that real inode, and remembers the name it was reached by.
    fn remember(&self, fd: OwnedFd, st: &libc::stat, name: Option<(&Arc<Inode>, &OsStr)>) -> Arc<Inode> {
        let key = (st.st_dev, st.st_ino);
        let mut table = write(&self.inodes);
        let known = table.by_key.get(&key).and_then(Weak::upgrade);
        let inode = match known {
            Some(inode) if table.by_id.get(&inode.nodeid).is_none_or(|other| Arc::ptr_eq(other, &inode)) => {
                inode.lookups.fetch_add(1, Ordering::Relaxed);
                table.by_id.insert(inode.nodeid, inode.clone());
                inode
            }
            _ => {
                let nodeid = table.allocate_id(st, self.root_dev);
                let inode = Arc::new(Inode {
                    nodeid,
                    file_type: st.st_mode & libc::S_IFMT,
                    fd,
                    lookups: AtomicU64::new(1),
                    names: Mutex::new(Vec::new()),
                    data_lock: Mutex::new(()),
                    last_mark: AtomicU64::new(0),
                    warned_unnamed: AtomicBool::new(false),
                });
                table.by_id.insert(nodeid, inode.clone());
                table.by_key.insert(key, Arc::downgrade(&inode));
                table.sweep();
                inode
            }
        };
        drop(table);
        if let Some((parent, name)) = name {
            add_name(&inode, parent, name, false);
        }
        inode
    }

    fn add_lookup(&self, inode: &Arc<Inode>) {
        let mut table = write(&self.inodes);
        inode.lookups.fetch_add(1, Ordering::Relaxed);
        table.by_id.entry(inode.nodeid).or_insert_with(|| inode.clone());
    }

    fn forget_inode(&self, ino: u64, count: u64) {
        if ino == ROOT_ID {
            return;
        }
        let mut table = write(&self.inodes);
        let Some(inode) = table.by_id.get(&ino) else { return };
        let left = inode.lookups.load(Ordering::Relaxed).saturating_sub(count);
        inode.lookups.store(left, Ordering::Relaxed);
        if left == 0 {
            table.by_id.remove(&ino);
        }
    }

    fn forget_name(&self, key: Option<(u64, u64)>, parent: &Arc<Inode>, name: &OsStr) {
        if let Some(inode) = key.and_then(|key| self.alive(key)) {
            lock(&inode.names).retain(|n| !(Arc::ptr_eq(&n.parent, parent) && n.name == name));
        }
    }

    fn stat_inode(&self, inode: &Inode) -> FsResult<libc::stat> {
        sys::fstat(inode.fd.as_fd()).map_err(os_err)
    }

    /// Opens the inode again through /proc/self/fd (the `O_PATH` fd cannot do I/O).
    fn reopen(&self, fd: BorrowedFd<'_>, flags: i32) -> io::Result<File> {
        sys::openat(self.proc_self_fd.as_fd(), &fd_name(fd), flags & !libc::O_NOFOLLOW, 0).map(File::from)
    }

    /// Opens with `flags`; a filesystem refusing O_DIRECT gets the open without it.
    fn reopen_maybe_direct(&self, inode: &Inode, flags: i32) -> FsResult<(File, bool)> {
        match self.reopen(inode.fd.as_fd(), flags) {
            Ok(file) => Ok((file, flags & libc::O_DIRECT != 0)),
            Err(e) if flags & libc::O_DIRECT != 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                let file = self.reopen(inode.fd.as_fd(), flags & !libc::O_DIRECT).map_err(os_err)?;
                Ok((file, false))
            }
            Err(e) => Err(os_err(e)),
        }
    }

    // --- paths ----------------------------------------------------------------------------

    /// Rebuilds the inode's path from the names the kernel knows, and says whether a change to
    /// it is replicated. EILSEQ for a name that is not UTF-8, ENAMETOOLONG past PATH_MAX.
    fn target_of(&self, inode: &Arc<Inode>) -> FsResult<Target> {
        let mut components: Vec<OsString> = Vec::new();
        let mut current = inode.clone();
        while current.nodeid != ROOT_ID {
            if components.len() >= PATH_DEPTH_MAX {
                return Err(errno(libc::ENAMETOOLONG));
            }
            let first = lock(&current.names).first().map(|n| (n.parent.clone(), n.name.clone()));
            let Some((parent, name)) = first else {
                self.warn_unnamed(inode);
                return Ok(Target::Gone);
            };
            components.push(name);
            current = parent;
        }
        let mut path = String::new();
        for component in components.iter().rev() {
            let part = component.to_str().ok_or(errno(libc::EILSEQ))?;
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(part);
        }
        self.classify(path)
    }

    /// The target of `name` inside `parent`.
    fn child_target(&self, parent: &Arc<Inode>, name: &OsStr) -> FsResult<Target> {
        match self.target_of(parent)? {
            Target::Replicated(dir) => {
                let name = name.to_str().ok_or(errno(libc::EILSEQ))?;
                let path = if dir.path().is_empty() { name.to_string() } else { format!("{}/{name}", dir.path()) };
                self.classify(path)
            }
            other => Ok(other),
        }
    }

    fn classify(&self, path: String) -> FsResult<Target> {
        let excluded = self.excluded.iter().any(|e| {
            path == *e || (path.len() > e.len() && path.starts_with(e.as_str()) && path.as_bytes()[e.len()] == b'/')
        });
        if excluded {
            return Ok(Target::Local);
        }
        RelPath::new(self.dir_index, &path).map(Target::Replicated).ok_or(errno(libc::ENAMETOOLONG))
    }

    /// An inode without names but with links left on disk (another hard link the kernel never
    /// looked up): its changes cannot be named, so they are not shipped; say so once.
    fn warn_unnamed(&self, inode: &Inode) {
        let linked = sys::fstat(inode.fd.as_fd()).map(|st| st.st_nlink > 0).unwrap_or(false);
        if linked && !inode.warned_unnamed.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                nodeid = inode.nodeid,
                "mountover: a file whose known names were all removed still has another hard link; \
                 its changes are not replicated until a resync"
            );
        }
    }

    /// Hands the op for `target` to the sink; returns the op's mark (sequence + 1).
    fn emit(&self, inode: Option<&Inode>, target: &Target, op: impl FnOnce(RelPath) -> Op) -> Option<u64> {
        let Target::Replicated(path) = target else { return None };
        let mark = mark_of(self.sink.submit(op(path.clone())));
        if let Some(inode) = inode {
            inode.last_mark.fetch_max(mark, Ordering::AcqRel);
        }
        Some(mark)
    }

    /// A sync point: returns once every op up to `mark` is durable; EIO when the sink fails.
    fn wait_mark(&self, mark: u64) -> FsResult<()> {
        if mark == 0 || mark <= self.durable_mark.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.sink.wait_durable(mark - 1) {
            Ok(()) => {
                self.durable_mark.fetch_max(mark, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "mountover: replication could not make a sync point durable: EIO");
                Err(errno(libc::EIO))
            }
        }
    }

    // --- handles ----------------------------------------------------------------------------

    fn file(&self, fh: FileHandle) -> FsResult<Arc<OpenFile>> {
        read(&self.files).get(&fh.0).cloned().ok_or(errno(libc::EBADF))
    }

    fn dir(&self, fh: FileHandle) -> FsResult<Arc<OpenDir>> {
        read(&self.dirs).get(&fh.0).cloned().ok_or(errno(libc::EBADF))
    }

    fn new_handle_id(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    fn insert_file(&self, inode: Arc<Inode>, file: File, flags: i32, direct: bool, mark: u64) -> u64 {
        let handle = OpenFile {
            inode,
            file,
            flags,
            direct,
            sync_writes: flags & (libc::O_DSYNC | libc::O_DIRECT) != 0,
            writable: flags & libc::O_ACCMODE != libc::O_RDONLY,
            buffered: OnceLock::new(),
            last_mark: AtomicU64::new(mark),
        };
        let id = self.new_handle_id();
        write(&self.files).insert(id, Arc::new(handle));
        id
    }

    /// The fd without O_DIRECT, opened on first need.
    fn buffered<'a>(&self, handle: &'a OpenFile) -> FsResult<BorrowedFd<'a>> {
        if handle.buffered.get().is_none() {
            let file = self.reopen(handle.inode.fd.as_fd(), handle.flags & !libc::O_DIRECT).map_err(os_err)?;
            let _ = handle.buffered.set(file);
        }
        handle.buffered.get().map(|f| f.as_fd()).ok_or(errno(libc::EIO))
    }

    // --- operations -------------------------------------------------------------------------

    fn lookup_child(&self, parent: &Arc<Inode>, name: &OsStr) -> FsResult<(libc::stat, Arc<Inode>)> {
        let bytes = name.as_bytes();
        if bytes == b"." || bytes == b".." {
            // `..` of the root is the root: the server never walks above the directory.
            let inode = if bytes == b"." || parent.nodeid == ROOT_ID {
                parent.clone()
            } else {
                lock(&parent.names).first().map(|n| n.parent.clone()).ok_or(errno(libc::ENOENT))?
            };
            let st = self.stat_inode(&inode)?;
            self.add_lookup(&inode);
            return Ok((st, inode));
        }
        let cname = entry_name(name)?;
        let fd = sys::openat(parent.fd.as_fd(), &cname, libc::O_PATH | libc::O_NOFOLLOW, 0).map_err(os_err)?;
        let st = sys::fstat(fd.as_fd()).map_err(os_err)?;
        let inode = self.remember(fd, &st, Some((parent, name)));
        Ok((st, inode))
    }

    /// Umask for a create: with FUSE_DONT_MASK the request's (the real filesystem then applies
    /// it or the parent's default ACL), otherwise none (the kernel already applied it).
    fn create_umask(&self, umask: u32) -> u32 {
        if self.dont_mask.load(Ordering::Relaxed) {
            umask & 0o777
        } else {
            0
        }
    }

    /// Gives a new entry to the caller: created as root, it takes the caller's uid, and its gid
    /// unless the parent is set-group-ID (the filesystem then gave it the parent's group).
    fn give_to_caller(&self, fd: BorrowedFd<'_>, parent: &Inode, uid: u32, gid: u32) -> FsResult<()> {
        let parent_st = self.stat_inode(parent)?;
        let gid = if parent_st.st_mode & libc::S_ISGID != 0 { None } else { Some(gid) };
        if uid == 0 && gid.is_none_or(|g| g == 0) {
            return Ok(());
        }
        sys::fchownat(fd, c"", Some(uid), gid, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW).map_err(os_err)
    }

    /// After mkdir, mknod or symlink: pins the new entry, gives it to the caller (removing it
    /// again if that fails) and records it.
    fn adopt_new_entry(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
        cname: &CStr,
        owner: (u32, u32),
        is_dir: bool,
    ) -> FsResult<(libc::stat, Arc<Inode>)> {
        let undo = || {
            let _ = sys::unlinkat(parent.fd.as_fd(), cname, if is_dir { libc::AT_REMOVEDIR } else { 0 });
        };
        let fd = match sys::openat(parent.fd.as_fd(), cname, libc::O_PATH | libc::O_NOFOLLOW, 0) {
            Ok(fd) => fd,
            Err(e) => {
                undo();
                return Err(os_err(e));
            }
        };
        if let Err(e) = self.give_to_caller(fd.as_fd(), parent, owner.0, owner.1) {
            undo();
            return Err(e);
        }
        let st = sys::fstat(fd.as_fd()).map_err(os_err)?;
        let inode = self.remember(fd, &st, Some((parent, name)));
        Ok((st, inode))
    }

    fn do_setattr(&self, ino: INodeNo, change: AttrChange) -> FsResult<libc::stat> {
        let inode = self.inode(ino)?;
        if change.is_empty() {
            return self.stat_inode(&inode);
        }
        self.writable()?;
        let _data = lock(&inode.data_lock);
        let namespace = read(&self.namespace);
        let target = self.target_of(&inode)?;
        let mut failure = None;
        let mut truncated = None;
        let mut owner_changed = false;
        let mut mode_changed = None;
        let mut times_changed = false;

        if let Some(size) = change.size {
            match self.truncate(&inode, change.fh, size) {
                Ok(()) => truncated = Some(size),
                Err(e) => failure = Some(e),
            }
        }
        // Owner before mode: chown may clear set-user-ID bits that the mode then sets.
        if failure.is_none() && (change.uid.is_some() || change.gid.is_some()) {
            let flags = libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW;
            match sys::fchownat(inode.fd.as_fd(), c"", change.uid, change.gid, flags) {
                Ok(()) => owner_changed = true,
                Err(e) => failure = Some(os_err(e)),
            }
        }
        if failure.is_none() {
            if let Some(mode) = change.mode {
                let mode = mode & 0o7777;
                let result = if inode.file_type == libc::S_IFLNK {
                    Err(errno(libc::EOPNOTSUPP))
                } else {
                    sys::fchmodat(self.proc_self_fd.as_fd(), &fd_name(inode.fd.as_fd()), mode).map_err(os_err)
                };
                match result {
                    Ok(()) => mode_changed = Some(mode),
                    Err(e) => failure = Some(e),
                }
            }
        }
        if failure.is_none() && (change.atime.is_some() || change.mtime.is_some()) {
            let times = [timespec_of(change.atime.as_ref()), timespec_of(change.mtime.as_ref())];
            let result = if inode.file_type == libc::S_IFLNK {
                sys::utimensat(inode.fd.as_fd(), c"", &times, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
            } else {
                sys::utimensat(self.proc_self_fd.as_fd(), &fd_name(inode.fd.as_fd()), &times, 0)
            };
            match result {
                Ok(()) => times_changed = true,
                Err(e) => failure = Some(os_err(e)),
            }
        }

        // The ops say what was changed, even when a later part failed.
        if let Some(size) = truncated {
            self.emit(Some(&inode), &target, |file| Op::Truncate { file, size });
        }
        // A truncate sets the times to "now" by itself, on the peer too.
        let explicit = |t: &Option<TimeOrNow>| match t {
            Some(TimeOrNow::SpecificTime(_)) => true,
            Some(TimeOrNow::Now) => truncated.is_none(),
            None => false,
        };
        let ship_atime = times_changed && explicit(&change.atime);
        let ship_mtime = times_changed && explicit(&change.mtime);
        if owner_changed || mode_changed.is_some() || ship_atime || ship_mtime {
            // The times as the file now has them, so "now" is the same instant on both hosts.
            let st = self.stat_inode(&inode).ok();
            let (atime, mtime) = match &st {
                Some(st) => (
                    ship_atime.then(|| Timestamp { secs: st.st_atime, nanos: clamp_nanos(st.st_atime_nsec) }),
                    ship_mtime.then(|| Timestamp { secs: st.st_mtime, nanos: clamp_nanos(st.st_mtime_nsec) }),
                ),
                None => (None, None),
            };
            let (uid, gid) = if owner_changed { (change.uid, change.gid) } else { (None, None) };
            self.emit(Some(&inode), &target, |path| Op::SetAttr { path, mode: mode_changed, uid, gid, atime, mtime });
        }
        drop(namespace);
        match failure {
            Some(e) => Err(e),
            None => self.stat_inode(&inode),
        }
    }

    fn truncate(&self, inode: &Inode, fh: Option<FileHandle>, size: u64) -> FsResult<()> {
        let size = i64::try_from(size).map_err(|_| errno(libc::EFBIG))?;
        if let Some(handle) = fh.and_then(|fh| self.file(fh).ok()).filter(|h| h.writable) {
            return sys::ftruncate(handle.file.as_fd(), size).map_err(os_err);
        }
        match inode.file_type {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(errno(libc::EISDIR)),
            _ => return Err(errno(libc::EINVAL)),
        }
        let file = self.reopen(inode.fd.as_fd(), libc::O_WRONLY).map_err(os_err)?;
        sys::ftruncate(file.as_fd(), size).map_err(os_err)
    }

    fn do_mknod(
        &self,
        req: (u32, u32),
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> EntryResult {
        self.writable()?;
        let parent = self.inode(parent)?;
        let cname = entry_name(name)?;
        let file_type = match mode & libc::S_IFMT {
            0 => libc::S_IFREG,
            t @ (libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK) => t,
            _ => return Err(errno(libc::EINVAL)),
        };
        let namespace = read(&self.namespace);
        let target = self.child_target(&parent, name)?;
        let dev = decode_dev(rdev);
        with_umask(self.create_umask(umask), || {
            sys::mknodat(parent.fd.as_fd(), &cname, file_type | (mode & 0o7777), dev)
        })
        .map_err(os_err)?;
        let (st, inode) = self.adopt_new_entry(&parent, name, &cname, req, false)?;
        if file_type == libc::S_IFREG {
            self.emit(Some(&inode), &target, |file| Op::Create {
                file,
                mode: st.st_mode & 0o7777,
                uid: st.st_uid,
                gid: st.st_gid,
            });
        } else {
            self.emit(Some(&inode), &target, |node| Op::Mknod {
                node,
                mode: st.st_mode,
                rdev: st.st_rdev,
                uid: st.st_uid,
                gid: st.st_gid,
            });
        }
        drop(namespace);
        Ok((st, inode))
    }

    fn do_mkdir(&self, req: (u32, u32), parent: INodeNo, name: &OsStr, mode: u32, umask: u32) -> EntryResult {
        self.writable()?;
        let parent = self.inode(parent)?;
        let cname = entry_name(name)?;
        let namespace = read(&self.namespace);
        let target = self.child_target(&parent, name)?;
        with_umask(self.create_umask(umask), || sys::mkdirat(parent.fd.as_fd(), &cname, mode & 0o7777))
            .map_err(os_err)?;
        let (st, inode) = self.adopt_new_entry(&parent, name, &cname, req, true)?;
        self.emit(Some(&inode), &target, |dir| Op::Mkdir {
            dir,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
        });
        drop(namespace);
        Ok((st, inode))
    }

    fn do_symlink(&self, req: (u32, u32), parent: INodeNo, name: &OsStr, link_target: &Path) -> EntryResult {
        self.writable()?;
        let parent = self.inode(parent)?;
        let cname = entry_name(name)?;
        let target_c = CString::new(link_target.as_os_str().as_bytes()).map_err(|_| errno(libc::EINVAL))?;
        let namespace = read(&self.namespace);
        let target = self.child_target(&parent, name)?;
        let target_text = match &target {
            Target::Replicated(_) => Some(link_target.to_str().ok_or(errno(libc::EILSEQ))?.to_string()),
            _ => None,
        };
        sys::symlinkat(&target_c, parent.fd.as_fd(), &cname).map_err(os_err)?;
        let (st, inode) = self.adopt_new_entry(&parent, name, &cname, req, false)?;
        if let Some(text) = target_text {
            self.emit(Some(&inode), &target, |link| Op::Symlink { link, target: text, uid: st.st_uid, gid: st.st_gid });
        }
        drop(namespace);
        Ok((st, inode))
    }

    fn do_remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> FsResult<()> {
        self.writable()?;
        let parent = self.inode(parent)?;
        let cname = entry_name(name)?;
        let namespace = write(&self.namespace);
        // A name that cannot be replicated (not UTF-8, too long) never reached the peer.
        let target = self.child_target(&parent, name).unwrap_or(Target::Local);
        let victim = sys::fstatat(parent.fd.as_fd(), &cname, libc::AT_SYMLINK_NOFOLLOW).ok();
        sys::unlinkat(parent.fd.as_fd(), &cname, if dir { libc::AT_REMOVEDIR } else { 0 }).map_err(os_err)?;
        self.forget_name(victim.map(|st| (st.st_dev, st.st_ino)), &parent, name);
        if dir {
            self.emit(None, &target, |dir| Op::Rmdir { dir });
        } else {
            self.emit(None, &target, |file| Op::Unlink { file });
        }
        drop(namespace);
        Ok(())
    }

    fn do_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        self.writable()?;
        let allowed = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !allowed != 0 {
            return Err(errno(libc::EINVAL));
        }
        let parent = self.inode(parent)?;
        let new_parent = self.inode(new_parent)?;
        let cname = entry_name(name)?;
        let new_cname = entry_name(new_name)?;
        let namespace = write(&self.namespace);
        let from = self.child_target(&parent, name)?;
        let to = self.child_target(&new_parent, new_name)?;
        match (&from, &to) {
            (Target::Replicated(_), Target::Replicated(_)) | (Target::Local, Target::Local) => {}
            // Like a move to another filesystem: `mv` then copies and deletes, which ships.
            (Target::Replicated(_), Target::Local) | (Target::Local, Target::Replicated(_)) => {
                return Err(errno(libc::EXDEV))
            }
            _ => return Err(errno(libc::ENOENT)),
        }
        let key_of = |dir: &Inode, c: &CStr| {
            sys::fstatat(dir.fd.as_fd(), c, libc::AT_SYMLINK_NOFOLLOW).ok().map(|st| (st.st_dev, st.st_ino))
        };
        let moved = key_of(&parent, &cname);
        let replaced = key_of(&new_parent, &new_cname);
        sys::renameat2(parent.fd.as_fd(), &cname, new_parent.fd.as_fd(), &new_cname, flags).map_err(os_err)?;
        if moved != replaced {
            let moved = moved.and_then(|key| self.alive(key));
            let replaced = replaced.and_then(|key| self.alive(key));
            if let Some(inode) = &replaced {
                lock(&inode.names).retain(|n| !(Arc::ptr_eq(&n.parent, &new_parent) && n.name == new_name));
            }
            if let Some(inode) = &moved {
                lock(&inode.names).retain(|n| !(Arc::ptr_eq(&n.parent, &parent) && n.name == name));
                add_name(inode, &new_parent, new_name, true);
            }
            if flags & libc::RENAME_EXCHANGE != 0 {
                if let Some(inode) = &replaced {
                    add_name(inode, &parent, name, true);
                }
            }
        }
        if let (Target::Replicated(from), Target::Replicated(to)) = (from, to) {
            self.sink.submit(Op::Rename { from, to, flags });
        }
        drop(namespace);
        Ok(())
    }

    fn do_link(&self, ino: INodeNo, new_parent: INodeNo, new_name: &OsStr) -> EntryResult {
        self.writable()?;
        let inode = self.inode(ino)?;
        let new_parent = self.inode(new_parent)?;
        let new_cname = entry_name(new_name)?;
        let namespace = read(&self.namespace);
        let existing = self.target_of(&inode)?;
        let new = self.child_target(&new_parent, new_name)?;
        match (&existing, &new) {
            (Target::Replicated(_), Target::Replicated(_)) | (Target::Local, Target::Local) => {}
            (Target::Gone, _) | (_, Target::Gone) => return Err(errno(libc::ENOENT)),
            _ => return Err(errno(libc::EXDEV)),
        }
        sys::linkat_empty(inode.fd.as_fd(), new_parent.fd.as_fd(), &new_cname).map_err(os_err)?;
        let st = self.stat_inode(&inode)?;
        self.add_lookup(&inode);
        add_name(&inode, &new_parent, new_name, false);
        if let (Target::Replicated(existing), Target::Replicated(new)) = (existing, new) {
            let mark = mark_of(self.sink.submit(Op::Link { existing, new }));
            inode.last_mark.fetch_max(mark, Ordering::AcqRel);
        }
        drop(namespace);
        Ok((st, inode))
    }

    fn do_open(&self, ino: INodeNo, flags: i32) -> FsResult<u64> {
        let inode = self.inode(ino)?;
        if self.mode == MountMode::ReadOnly && (flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0)
        {
            return Err(errno(libc::EROFS));
        }
        let real = real_open_flags(flags);
        let (file, direct) = self.reopen_maybe_direct(&inode, real)?;
        Ok(self.insert_file(inode, file, real, direct, 0))
    }

    #[allow(clippy::too_many_arguments)]
    fn do_create(
        &self,
        req: (u32, u32),
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> FsResult<(libc::stat, Arc<Inode>, u64)> {
        self.writable()?;
        let parent = self.inode(parent)?;
        let cname = entry_name(name)?;
        let namespace = read(&self.namespace);
        let target = self.child_target(&parent, name)?;
        let real = real_open_flags(flags);
        let create = |flags: i32| {
            with_umask(self.create_umask(umask), || {
                sys::openat(parent.fd.as_fd(), &cname, flags | libc::O_CREAT | libc::O_EXCL, mode & 0o7777)
            })
        };
        let (fd, direct) = match create(real) {
            Ok(fd) => (fd, real & libc::O_DIRECT != 0),
            Err(e) if real & libc::O_DIRECT != 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                (create(real & !libc::O_DIRECT).map_err(os_err)?, false)
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                // The kernel thought the name was free (a stale negative entry): open the
                // existing file, as open(2) without O_EXCL does. Nothing was created.
                drop(namespace);
                let (st, inode) = self.lookup_child(&parent, name)?;
                let opened = self.reopen_maybe_direct(&inode, real).and_then(|(file, direct)| {
                    let st = if flags & libc::O_TRUNC != 0 {
                        // The kernel believes it created the file, so it sends no truncate.
                        let change = AttrChange { size: Some(0), ..AttrChange::none() };
                        self.do_setattr(INodeNo(inode.nodeid), change)?
                    } else {
                        st
                    };
                    Ok((st, self.insert_file(inode.clone(), file, real, direct, 0)))
                });
                return match opened {
                    Ok((st, id)) => Ok((st, inode, id)),
                    Err(e) => {
                        self.forget_inode(inode.nodeid, 1);
                        Err(e)
                    }
                };
            }
            Err(e) => return Err(os_err(e)),
        };
        let undo = |e: Errno| {
            let _ = sys::unlinkat(parent.fd.as_fd(), &cname, 0);
            e
        };
        self.give_to_caller(fd.as_fd(), &parent, req.0, req.1).map_err(undo)?;
        let path_fd = sys::openat(self.proc_self_fd.as_fd(), &fd_name(fd.as_fd()), libc::O_PATH, 0)
            .map_err(|e| undo(os_err(e)))?;
        let st = sys::fstat(fd.as_fd()).map_err(os_err)?;
        let inode = self.remember(path_fd, &st, Some((&parent, name)));
        let mark = self.emit(Some(&inode), &target, |file| Op::Create {
            file,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
        });
        drop(namespace);
        let real = if direct { real } else { real & !libc::O_DIRECT };
        let id = self.insert_file(inode.clone(), File::from(fd), real, direct, mark.unwrap_or(0));
        Ok((st, inode, id))
    }

    fn do_read(&self, fh: FileHandle, offset: u64, size: u32, reply: ReplyData) {
        let handle = match self.file(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let size = size as usize;
        if size > READ_BYTES_MAX || i64::try_from(offset).is_err() {
            return reply.error(errno(libc::EINVAL));
        }
        BOUNCE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => match self.read_into(&handle, offset, size, &mut buf) {
                Ok(range) => reply.data(&buf[range]),
                Err(e) => reply.error(e),
            },
            Err(_) => {
                let mut buf = Vec::new();
                match self.read_into(&handle, offset, size, &mut buf) {
                    Ok(range) => reply.data(&buf[range]),
                    Err(e) => reply.error(e),
                }
            }
        })
    }

    /// Reads into the (reused) buffer and returns where the data is in it.
    fn read_into(&self, handle: &OpenFile, offset: u64, size: usize, buf: &mut Vec<u8>) -> FsResult<Range<usize>> {
        if handle.direct {
            // Read the aligned superset of the request into an aligned buffer.
            let align = DIRECT_ALIGN_BYTES as u64;
            let start = offset - offset % align;
            let end = round_up(offset + size as u64, align);
            let len = (end - start) as usize;
            let base = aligned_region(buf, len);
            match sys::pread(handle.file.as_fd(), &mut buf[base..base + len], start) {
                Ok(n) => {
                    let skip = (offset - start) as usize;
                    let take = n.saturating_sub(skip).min(size);
                    return Ok(base + skip..base + skip + take);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(os_err(e)),
            }
        }
        let fd = if handle.direct { self.buffered(handle)? } else { handle.file.as_fd() };
        if buf.len() < size {
            buf.resize(size, 0);
        }
        let n = pread_full(fd, &mut buf[..size], offset).map_err(os_err)?;
        Ok(0..n)
    }

    fn do_write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.writable()?;
        let handle = self.file(fh)?;
        if !handle.writable {
            return Err(errno(libc::EBADF));
        }
        let len = u32::try_from(data.len()).map_err(|_| errno(libc::EINVAL))?;
        offset.checked_add(u64::from(len)).filter(|end| *end <= i64::MAX as u64).ok_or(errno(libc::EFBIG))?;
        let mark = {
            let _data = lock(&handle.inode.data_lock);
            let _namespace = read(&self.namespace);
            let target = self.target_of(&handle.inode)?;
            let written = self.write_local(&handle, offset, data)?;
            let mark = self.emit(Some(&handle.inode), &target, |file| Op::Write {
                file,
                offset,
                data: data[..written].to_vec(),
            });
            if let Some(mark) = mark {
                handle.last_mark.fetch_max(mark, Ordering::AcqRel);
            }
            (mark, written)
        };
        if handle.sync_writes {
            if let Some(m) = mark.0 {
                self.wait_mark(m)?;
            }
        }
        Ok(mark.1 as u32)
    }

    /// Writes to the real file; O_DIRECT handles go through the aligned bounce buffer, or the
    /// buffered fd when the request is not sector aligned. Returns the bytes written (> 0).
    fn write_local(&self, handle: &OpenFile, offset: u64, data: &[u8]) -> FsResult<usize> {
        if handle.direct && offset % DIRECT_SECTOR_BYTES == 0 && data.len() as u64 % DIRECT_SECTOR_BYTES == 0 {
            let result = BOUNCE.with(|cell| {
                let mut buf = cell.try_borrow_mut().ok()?;
                let base = aligned_region(&mut buf, data.len());
                buf[base..base + data.len()].copy_from_slice(data);
                Some(pwrite_all(handle.file.as_fd(), &buf[base..base + data.len()], offset))
            });
            match result {
                Some(Ok(n)) => return Ok(n),
                Some(Err(e)) if e.raw_os_error() != Some(libc::EINVAL) => return Err(os_err(e)),
                _ => {}
            }
        }
        let fd = if handle.direct { self.buffered(handle)? } else { handle.file.as_fd() };
        pwrite_all(fd, data, offset).map_err(os_err)
    }

    fn do_flush(&self, fh: FileHandle) -> FsResult<()> {
        let Ok(handle) = self.file(fh) else { return Ok(()) };
        if self.mode == MountMode::ReadOnly {
            return Ok(());
        }
        let mut mark = handle.last_mark.load(Ordering::Acquire);
        if handle.writable {
            mark = mark.max(handle.inode.last_mark.load(Ordering::Acquire));
        }
        self.wait_mark(mark)
    }

    fn do_fsync(&self, inode: &Arc<Inode>, file: &File, datasync: bool) -> FsResult<()> {
        if self.mode == MountMode::ReadOnly {
            return if datasync { sys::fdatasync(file.as_fd()) } else { sys::fsync(file.as_fd()) }.map_err(os_err);
        }
        // The peer's flush is asked first, so that it runs while this host flushes: both are
        // done before the call returns, in whichever order they finish.
        let mark = {
            let _namespace = read(&self.namespace);
            match self.target_of(inode).unwrap_or(Target::Local) {
                Target::Replicated(path) => mark_of(self.sink.submit(Op::Fsync { file: Some(path), datasync })),
                Target::Local => 0,
                Target::Gone => inode.last_mark.load(Ordering::Acquire),
            }
        };
        if datasync { sys::fdatasync(file.as_fd()) } else { sys::fsync(file.as_fd()) }.map_err(os_err)?;
        self.wait_mark(mark)
    }

    fn do_opendir(&self, ino: INodeNo) -> FsResult<u64> {
        let inode = self.inode(ino)?;
        let file = self.reopen(inode.fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(os_err)?;
        let id = self.new_handle_id();
        write(&self.dirs).insert(id, Arc::new(OpenDir { inode, file, buf: Mutex::new(vec![0; DIRENT_BUF_BYTES]) }));
        Ok(id)
    }

    /// Lists from `offset`, the real filesystem's own directory cookie (`d_off`), so offsets
    /// are as stable as the filesystem makes them (telldir/seekdir work).
    fn do_readdir(&self, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let dir = match self.dir(fh) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let Ok(offset) = i64::try_from(offset) else { return reply.error(errno(libc::EINVAL)) };
        let mut buf = lock(&dir.buf);
        if let Err(e) = sys::lseek(dir.file.as_fd(), offset, libc::SEEK_SET) {
            return reply.error(os_err(e));
        }
        loop {
            let n = match sys::getdents64(dir.file.as_fd(), &mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return reply.error(os_err(e)),
            };
            for entry in DirEntries::new(&buf[..n]) {
                if entry.ino == 0 {
                    continue;
                }
                let name = OsStr::from_bytes(entry.name);
                let kind = match dtype_kind(entry.kind) {
                    Some(kind) => kind,
                    None => match CString::new(entry.name)
                        .ok()
                        .and_then(|c| sys::fstatat(dir.file.as_fd(), &c, libc::AT_SYMLINK_NOFOLLOW).ok())
                    {
                        Some(st) => file_kind(st.st_mode),
                        None => continue,
                    },
                };
                let ino = if entry.name == b"." && dir.inode.nodeid == ROOT_ID { ROOT_ID } else { entry.ino };
                if reply.add(INodeNo(ino), entry.next_offset as u64, kind, name) {
                    return reply.ok();
                }
            }
        }
        reply.ok()
    }

    fn do_setxattr(&self, ino: INodeNo, name: &OsStr, value: &[u8], flags: i32, position: u32) -> FsResult<()> {
        self.writable()?;
        if position != 0 {
            return Err(errno(libc::EINVAL));
        }
        let inode = self.inode(ino)?;
        let cname = CString::new(name.as_bytes()).map_err(|_| errno(libc::EINVAL))?;
        let _namespace = read(&self.namespace);
        let target = self.target_of(&inode)?;
        let name_text = match &target {
            Target::Replicated(_) => name.to_str().ok_or(errno(libc::EILSEQ))?.to_string(),
            _ => String::new(),
        };
        sys::setxattr(&proc_path(inode.fd.as_fd()), &cname, value, flags).map_err(os_err)?;
        self.emit(Some(&inode), &target, |path| Op::SetXattr { path, name: name_text, value: value.to_vec(), flags });
        Ok(())
    }

    fn do_getxattr(&self, ino: INodeNo, name: &OsStr, size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(ino)?;
        let cname = CString::new(name.as_bytes()).map_err(|_| errno(libc::EINVAL))?;
        let path = proc_path(inode.fd.as_fd());
        let mut buf = vec![0u8; (size as usize).min(XATTR_BYTES_MAX)];
        match sys::getxattr(&path, &cname, &mut buf) {
            Ok(n) if size == 0 => Ok(XattrReply::Size(n)),
            Ok(n) => {
                buf.truncate(n);
                Ok(XattrReply::Data(buf))
            }
            // With FUSE_POSIX_ACL the kernel asks for ACLs on every permission check: a
            // filesystem without ACLs has none, which is not an error.
            Err(e)
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) && name.as_bytes().starts_with(b"system.posix_acl_") =>
            {
                Err(errno(libc::ENODATA))
            }
            Err(e) => Err(os_err(e)),
        }
    }

    fn do_listxattr(&self, ino: INodeNo, size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(ino)?;
        let mut buf = vec![0u8; (size as usize).min(XATTR_BYTES_MAX)];
        let n = sys::listxattr(&proc_path(inode.fd.as_fd()), &mut buf).map_err(os_err)?;
        if size == 0 {
            return Ok(XattrReply::Size(n));
        }
        buf.truncate(n);
        Ok(XattrReply::Data(buf))
    }

    fn do_removexattr(&self, ino: INodeNo, name: &OsStr) -> FsResult<()> {
        self.writable()?;
        let inode = self.inode(ino)?;
        let cname = CString::new(name.as_bytes()).map_err(|_| errno(libc::EINVAL))?;
        let _namespace = read(&self.namespace);
        let target = self.target_of(&inode)?;
        let name_text = match &target {
            Target::Replicated(_) => name.to_str().ok_or(errno(libc::EILSEQ))?.to_string(),
            _ => String::new(),
        };
        sys::removexattr(&proc_path(inode.fd.as_fd()), &cname).map_err(os_err)?;
        self.emit(Some(&inode), &target, |path| Op::RemoveXattr { path, name: name_text });
        Ok(())
    }

    fn do_fallocate(&self, fh: FileHandle, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        self.writable()?;
        let handle = self.file(fh)?;
        if !handle.writable {
            return Err(errno(libc::EBADF));
        }
        let off = i64::try_from(offset).map_err(|_| errno(libc::EFBIG))?;
        let len = i64::try_from(length).map_err(|_| errno(libc::EFBIG))?;
        let _data = lock(&handle.inode.data_lock);
        let _namespace = read(&self.namespace);
        let target = self.target_of(&handle.inode)?;
        sys::fallocate(handle.file.as_fd(), mode, off, len).map_err(os_err)?;
        let mark = self.emit(Some(&handle.inode), &target, |file| Op::Fallocate { file, mode, offset, len: length });
        if let Some(mark) = mark {
            handle.last_mark.fetch_max(mark, Ordering::AcqRel);
        }
        Ok(())
    }
}

type EntryResult = FsResult<(libc::stat, Arc<Inode>)>;

enum XattrReply {
    Size(usize),
    Data(Vec<u8>),
}

/// What a SETATTR asks for.
struct AttrChange {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    fh: Option<FileHandle>,
}

impl AttrChange {
    fn none() -> AttrChange {
        AttrChange { mode: None, uid: None, gid: None, size: None, atime: None, mtime: None, fh: None }
    }

    fn is_empty(&self) -> bool {
        self.mode.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.size.is_none()
            && self.atime.is_none()
            && self.mtime.is_none()
    }
}

fn add_name(inode: &Inode, parent: &Arc<Inode>, name: &OsStr, first: bool) {
    let mut names = lock(&inode.names);
    if let Some(at) = names.iter().position(|n| Arc::ptr_eq(&n.parent, parent) && n.name == name) {
        if first && at != 0 {
            let entry = names.remove(at);
            names.insert(0, entry);
        }
        return;
    }
    let entry = Name { parent: parent.clone(), name: name.to_os_string() };
    if first {
        names.insert(0, entry);
    } else {
        names.push(entry);
    }
    names.truncate(NAMES_PER_INODE_MAX);
}

/// The flags for the real fd: creation and truncation were handled already (the kernel sends
/// O_TRUNC as a SETATTR), and O_APPEND is dropped because the kernel computed the offset.
fn real_open_flags(flags: i32) -> i32 {
    flags
        & !(libc::O_CREAT
            | libc::O_EXCL
            | libc::O_NOCTTY
            | libc::O_TRUNC
            | libc::O_APPEND
            | libc::O_NOFOLLOW
            | libc::O_PATH
            | libc::O_DIRECTORY)
}

thread_local! {
    /// Reused per session thread: read buffer and O_DIRECT bounce buffer.
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Whether this thread has its own umask (unshare(CLONE_FS) done).
    static OWN_UMASK: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Grows `buf` if needed and returns the start of a `len`-byte region aligned for O_DIRECT.
fn aligned_region(buf: &mut Vec<u8>, len: usize) -> usize {
    let need = len + DIRECT_ALIGN_BYTES;
    if buf.len() < need {
        buf.resize(need, 0);
    }
    let offset = buf.as_ptr().align_offset(DIRECT_ALIGN_BYTES);
    if offset + len <= buf.len() {
        offset
    } else {
        // align_offset may decline; an unaligned region makes the O_DIRECT call fail with
        // EINVAL, which falls back to the buffered fd.
        0
    }
}

fn round_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align).saturating_mul(align)
}

/// Runs a create under the request's umask, in a thread whose umask is its own.
fn with_umask<T>(mask: u32, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let own = OWN_UMASK.with(|cell| match cell.get() {
        Some(own) => own,
        None => {
            let own = sys::unshare_fs().is_ok();
            if !own {
                tracing::warn!("mountover: cannot give a session thread its own umask; new files follow the daemon's");
            }
            cell.set(Some(own));
            own
        }
    });
    if !own {
        return f();
    }
    let old = sys::umask(mask);
    let result = f();
    sys::umask(old);
    result
}

fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match sys::pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes all of `data`, or as much as the file takes before an error (an error only when
/// nothing was written).
fn pwrite_all(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match sys::pwrite(fd, &data[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    if done == 0 && !data.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(done)
}

/// Entries of a getdents64 buffer.
struct DirEntries<'a> {
    buf: &'a [u8],
    pos: usize,
}

struct DirEntry<'a> {
    ino: u64,
    next_offset: i64,
    kind: u8,
    name: &'a [u8],
}

impl<'a> DirEntries<'a> {
    fn new(buf: &'a [u8]) -> Self {
        DirEntries { buf, pos: 0 }
    }
}

impl<'a> Iterator for DirEntries<'a> {
    type Item = DirEntry<'a>;

    fn next(&mut self) -> Option<DirEntry<'a>> {
        // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
        let rest = self.buf.get(self.pos..)?;
        let header = rest.get(..19)?;
        let ino = u64::from_ne_bytes(header[0..8].try_into().ok()?);
        let next_offset = i64::from_ne_bytes(header[8..16].try_into().ok()?);
        let reclen = usize::from(u16::from_ne_bytes(header[16..18].try_into().ok()?));
        let kind = header[18];
        let record = rest.get(..reclen).filter(|_| reclen >= 19)?;
        let name = &record[19..];
        let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
        self.pos += reclen;
        Some(DirEntry { ino, next_offset, kind, name })
    }
}

fn dtype_kind(d_type: u8) -> Option<FileType> {
    Some(match d_type {
        libc::DT_DIR => FileType::Directory,
        libc::DT_REG => FileType::RegularFile,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => return None,
    })
}

fn file_kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn system_time(secs: i64, nanos: i64) -> SystemTime {
    let nanos = clamp_nanos(nanos);
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs as u64, nanos)).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nanos))))
            .unwrap_or(UNIX_EPOCH)
    }
}

fn clamp_nanos(nanos: i64) -> u32 {
    nanos.clamp(0, 999_999_999) as u32
}

fn timespec_of(time: Option<&TimeOrNow>) -> libc::timespec {
    match time {
        None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        Some(TimeOrNow::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(d.subsec_nanos()),
            },
            Err(before) => {
                let d = before.duration();
                let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                if d.subsec_nanos() == 0 {
                    libc::timespec { tv_sec: -secs, tv_nsec: 0 }
                } else {
                    libc::timespec { tv_sec: -secs - 1, tv_nsec: 1_000_000_000 - i64::from(d.subsec_nanos()) }
                }
            }
        },
    }
}

/// The kernel's `new_encode_dev` form (what FUSE carries) to a `dev_t`.
fn decode_dev(rdev: u32) -> libc::dev_t {
    let major = (rdev & 0xfff00) >> 8;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

/// A `dev_t` to the kernel's `new_encode_dev` form.
fn encode_dev(dev: libc::dev_t) -> u32 {
    // 12 bits of major and 20 of minor fit; larger numbers are cut, never overflow.
    let (major, minor) = (libc::major(dev) & 0xfff, libc::minor(dev) & 0xf_ffff);
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

fn file_attr(nodeid: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(nodeid),
        size: u64::try_from(st.st_size).unwrap_or(0),
        blocks: u64::try_from(st.st_blocks).unwrap_or(0),
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_kind(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: encode_dev(st.st_rdev),
        blksize: u32::try_from(st.st_blksize).unwrap_or(4096),
        flags: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// The FUSE edge: errno values out, everything else inside.
// ---------------------------------------------------------------------------------------------

struct MountoverFs(Arc<Fs>);

impl MountoverFs {
    fn reply_entry(&self, reply: ReplyEntry, result: EntryResult) {
        match result {
            Ok((st, inode)) => reply.entry(&self.0.ttl, &file_attr(inode.nodeid, &st), Generation(0)),
            Err(e) => reply.error(e),
        }
    }
}

fn reply_empty(reply: ReplyEmpty, result: FsResult<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn reply_xattr(reply: ReplyXattr, result: FsResult<XattrReply>) {
    match result {
        Ok(XattrReply::Size(n)) => reply.size(u32::try_from(n).unwrap_or(u32::MAX)),
        Ok(XattrReply::Data(data)) => reply.data(&data),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for MountoverFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(WRITE_BYTES_MAX);
        if let Err(nearest) = config.set_max_readahead(READAHEAD_BYTES_MAX) {
            let _ = config.set_max_readahead(nearest);
        }
        // Never FUSE_WRITEBACK_CACHE (writes must reach us one by one, synchronously) and
        // never passthrough (writes would bypass us).
        let mut wanted = InitFlags::FUSE_PARALLEL_DIROPS | InitFlags::FUSE_POSIX_ACL;
        wanted |= match self.0.mode {
            MountMode::ReadWrite => InitFlags::FUSE_CACHE_SYMLINKS,
            MountMode::ReadOnly => InitFlags::FUSE_AUTO_INVAL_DATA,
        };
        for flag in wanted.iter() {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!(?flag, "mountover: kernel lacks a FUSE capability");
            }
        }
        // The umask is left to us only together with kernel ACL checks, so a default ACL of
        // the parent wins over the umask as on the real filesystem.
        if config.capabilities().contains(InitFlags::FUSE_POSIX_ACL)
            && config.add_capabilities(InitFlags::FUSE_DONT_MASK).is_ok()
        {
            self.0.dont_mask.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self.0.inode(parent).and_then(|parent| self.0.lookup_child(&parent, name));
        self.reply_entry(reply, result);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.0.forget_inode(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.inode(ino).and_then(|inode| self.0.stat_inode(&inode).map(|st| (inode, st))) {
            Ok((inode, st)) => reply.attr(&self.0.ttl, &file_attr(inode.nodeid, &st)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = AttrChange { mode, uid, gid, size, atime, mtime, fh };
        match self.0.do_setattr(ino, change) {
            Ok(st) => reply.attr(&self.0.ttl, &file_attr(ino.0, &st)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let mut buf = [0u8; libc::PATH_MAX as usize];
        match self.0.inode(ino).and_then(|inode| sys::readlinkat(inode.fd.as_fd(), &mut buf).map_err(os_err)) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let result = self.0.do_mknod((req.uid(), req.gid()), parent, name, mode, umask, rdev);
        self.reply_entry(reply, result);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let result = self.0.do_mkdir((req.uid(), req.gid()), parent, name, mode, umask);
        self.reply_entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.0.do_remove(parent, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.0.do_remove(parent, name, true));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let result = self.0.do_symlink((req.uid(), req.gid()), parent, link_name, target);
        self.reply_entry(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.0.do_rename(parent, name, newparent, newname, flags.bits()));
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let result = self.0.do_link(ino, newparent, newname);
        self.reply_entry(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.0.do_open(ino, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), self.0.fopen_flags()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.0.do_read(fh, offset, size, reply);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.0.do_write(fh, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply_empty(reply, self.0.do_flush(fh));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        write(&self.0.files).remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let result = self.0.file(fh).and_then(|h| self.0.do_fsync(&h.inode, &h.file, datasync));
        reply_empty(reply, result);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.0.do_opendir(ino) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        self.0.do_readdir(fh, offset, reply);
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        write(&self.0.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let result = self.0.dir(fh).and_then(|d| self.0.do_fsync(&d.inode, &d.file, datasync));
        reply_empty(reply, result);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match sys::fstatvfs(self.0.root.fd.as_fd()) {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                u32::try_from(st.f_bsize).unwrap_or(4096),
                u32::try_from(st.f_namemax).unwrap_or(255),
                u32::try_from(st.f_frsize).unwrap_or(4096),
            ),
            Err(e) => reply.error(os_err(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.0.do_setxattr(ino, name, value, flags, position));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, self.0.do_getxattr(ino, name, size));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, self.0.do_listxattr(ino, size));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.0.do_removexattr(ino, name));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks the modes; only a read-only view says no here.
        if self.0.mode == MountMode::ReadOnly && mask.bits() & libc::W_OK != 0 {
            return reply.error(errno(libc::EROFS));
        }
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.0.do_create((req.uid(), req.gid()), parent, name, mode, umask, flags) {
            Ok((st, inode, fh)) => reply.created(
                &self.0.ttl,
                &file_attr(inode.nodeid, &st),
                Generation(0),
                FileHandle(fh),
                self.0.fopen_flags(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.0.do_fallocate(fh, offset, length, mode));
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        match self.0.file(fh).and_then(|h| sys::lseek(h.file.as_fd(), offset, whence).map_err(os_err)) {
            Ok(position) => reply.offset(position),
            Err(e) => reply.error(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// System calls: thin wrappers returning io::Result.
// ---------------------------------------------------------------------------------------------

mod sys {
    use std::ffi::CStr;
    use std::io;
    use std::mem::MaybeUninit;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    fn check_size(ret: isize) -> io::Result<usize> {
        usize::try_from(ret).map_err(|_| io::Error::last_os_error())
    }

    fn offset(value: u64) -> io::Result<libc::off_t> {
        libc::off_t::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
    }

    /// AT_FDCWD as a borrowed fd.
    pub fn cwd() -> BorrowedFd<'static> {
        // SAFETY: AT_FDCWD is a sentinel the *at calls understand; it is never closed.
        unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) }
    }

    pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
        // SAFETY: `name` is NUL-terminated and lives across the call; `dir` is open.
        let fd = check(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
        // SAFETY: openat just returned this descriptor; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<libc::stat> {
        let mut st = MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `st` is writable memory of the right size, `name` is NUL-terminated.
        check(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), flags) })?;
        // SAFETY: fstatat succeeded, so it filled the whole struct.
        Ok(unsafe { st.assume_init() })
    }

    /// The stat of the fd itself (an `O_PATH` fd of a symlink included).
    pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
        fstatat(fd, c"", libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
    }

    pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated and lives across the call.
        check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
    }

    pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, dev: libc::dev_t) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated and lives across the call.
        check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) }).map(drop)
    }

    pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        // SAFETY: both strings are NUL-terminated and live across the call.
        check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
    }

    /// A new name for the inode of `fd` (AT_EMPTY_PATH: the fd itself, no path resolved).
    pub fn linkat_empty(fd: BorrowedFd<'_>, new_dir: BorrowedFd<'_>, new_name: &CStr) -> io::Result<()> {
        // SAFETY: both strings are NUL-terminated and live across the call.
        check(unsafe {
            libc::linkat(fd.as_raw_fd(), c"".as_ptr(), new_dir.as_raw_fd(), new_name.as_ptr(), libc::AT_EMPTY_PATH)
        })
        .map(drop)
    }

    pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated and lives across the call.
        check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
    }

    pub fn renameat2(
        old_dir: BorrowedFd<'_>,
        old: &CStr,
        new_dir: BorrowedFd<'_>,
        new: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        // SAFETY: both names are NUL-terminated and live across the call.
        check(unsafe { libc::renameat2(old_dir.as_raw_fd(), old.as_ptr(), new_dir.as_raw_fd(), new.as_ptr(), flags) })
            .map(drop)
    }

    /// The target of the symlink `fd` (an `O_PATH` fd of the link).
    pub fn readlinkat(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for `buf.len()` bytes; the empty name means the fd itself.
        check_size(unsafe { libc::readlinkat(fd.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
    }

    pub fn fchownat(
        dir: BorrowedFd<'_>,
        name: &CStr,
        uid: Option<u32>,
        gid: Option<u32>,
        flags: i32,
    ) -> io::Result<()> {
        let (uid, gid) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
        // SAFETY: `name` is NUL-terminated and lives across the call; -1 leaves an id unchanged.
        check(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, flags) }).map(drop)
    }

    pub fn fchmodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated and lives across the call.
        check(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) }).map(drop)
    }

    pub fn utimensat(dir: BorrowedFd<'_>, name: &CStr, times: &[libc::timespec; 2], flags: i32) -> io::Result<()> {
        // SAFETY: `times` points to two timespecs and `name` is NUL-terminated.
        check(unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), times.as_ptr(), flags) }).map(drop)
    }

    pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: i64, len: i64) -> io::Result<()> {
        // SAFETY: plain integer arguments on an open fd.
        check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) }).map(drop)
    }

    pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> io::Result<i64> {
        // SAFETY: plain integer arguments on an open fd.
        let position = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
        if position < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(position)
        }
    }

    pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], at: u64) -> io::Result<usize> {
        let at = offset(at)?;
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        check_size(unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), at) })
    }

    pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], at: u64) -> io::Result<usize> {
        let at = offset(at)?;
        // SAFETY: `buf` is readable for `buf.len()` bytes.
        check_size(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), at) })
    }

    pub fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: an open fd.
        check(unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
    }

    pub fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: an open fd.
        check(unsafe { libc::fdatasync(fd.as_raw_fd()) }).map(drop)
    }

    pub fn ftruncate(fd: BorrowedFd<'_>, size: i64) -> io::Result<()> {
        // SAFETY: an open fd and an integer.
        check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }).map(drop)
    }

    pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
        let mut st = MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `st` is writable memory of the right size.
        check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: fstatvfs succeeded, so it filled the struct.
        Ok(unsafe { st.assume_init() })
    }

    pub fn statfs(path: &CStr) -> io::Result<libc::statfs> {
        let mut st = MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: `path` is NUL-terminated, `st` is writable memory of the right size.
        check(unsafe { libc::statfs(path.as_ptr(), st.as_mut_ptr()) })?;
        // SAFETY: statfs succeeded, so it filled the struct.
        Ok(unsafe { st.assume_init() })
    }

    pub fn getdents64(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for `buf.len()` bytes; getdents64 writes at most that.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    pub fn getxattr(path: &CStr, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: strings are NUL-terminated; `buf` is writable for `buf.len()` bytes (0 asks the size).
        check_size(unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
    }

    pub fn setxattr(path: &CStr, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
        // SAFETY: strings are NUL-terminated; `value` is readable for its length.
        check(unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags) })
            .map(drop)
    }

    pub fn listxattr(path: &CStr, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `path` is NUL-terminated; `buf` is writable for `buf.len()` bytes.
        check_size(unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
    }

    pub fn removexattr(path: &CStr, name: &CStr) -> io::Result<()> {
        // SAFETY: strings are NUL-terminated.
        check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
    }

    pub fn mount(source: &CStr, target: &CStr, fstype: &CStr, flags: libc::c_ulong, data: &CStr) -> io::Result<()> {
        // SAFETY: all strings are NUL-terminated and live across the call.
        check(unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) })
            .map(drop)
    }

    /// `umount -l`.
    pub fn umount_detach(target: &CStr) -> io::Result<()> {
        // SAFETY: `target` is NUL-terminated.
        check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) }).map(drop)
    }

    /// Gives the calling thread its own cwd, root and umask.
    pub fn unshare_fs() -> io::Result<()> {
        // SAFETY: CLONE_FS only affects this thread's filesystem information.
        check(unsafe { libc::unshare(libc::CLONE_FS) }).map(drop)
    }

    pub fn umask(mask: u32) -> u32 {
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(mask) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NullSink;
    impl OpSink for NullSink {
        fn submit(&self, _op: Op) -> u64 {
            0
        }
        fn wait_durable(&self, _seq: u64) -> io::Result<()> {
            Ok(())
        }
    }

    fn server_on(dir: &Path) -> Fs {
        let dir_c = path_cstring(dir).unwrap();
        let root_fd = sys::openat(sys::cwd(), &dir_c, libc::O_PATH | libc::O_DIRECTORY, 0).unwrap();
        let st = sys::fstat(root_fd.as_fd()).unwrap();
        let proc_fd = sys::openat(sys::cwd(), c"/proc/self/fd", libc::O_PATH | libc::O_DIRECTORY, 0).unwrap();
        Fs::new(root_fd, &st, proc_fd, 0, MountMode::ReadWrite, vec!["cache".into()], Arc::new(NullSink))
    }

    // `..` looked up at the root is the root itself, and `..` of a subdirectory its parent: the
    // server never opens anything above the directory.
    #[test]
    fn dotdot_lookup_at_the_root_returns_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        let fs = server_on(tmp.path());
        let (_, up) = fs.lookup_child(&fs.root, OsStr::new("..")).unwrap();
        assert!(Arc::ptr_eq(&up, &fs.root));
        let (_, sub) = fs.lookup_child(&fs.root, OsStr::new("sub")).unwrap();
        let (_, sub_up) = fs.lookup_child(&sub, OsStr::new("..")).unwrap();
        assert!(Arc::ptr_eq(&sub_up, &fs.root));
        assert!(fs.lookup_child(&fs.root, OsStr::new("a/b")).is_err());
    }

    // Paths are rebuilt from the names the kernel used, follow renames of a parent, and a
    // notreplicated entry covers its subtree only.
    #[test]
    fn paths_follow_names_and_notreplicated_entries() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("d/e")).unwrap();
        std::fs::create_dir_all(tmp.path().join("cache/x")).unwrap();
        std::fs::create_dir_all(tmp.path().join("cachet")).unwrap();
        let fs = server_on(tmp.path());
        let (_, d) = fs.lookup_child(&fs.root, OsStr::new("d")).unwrap();
        let (_, e) = fs.lookup_child(&d, OsStr::new("e")).unwrap();
        let path = |t: Target| match t {
            Target::Replicated(p) => p.path().to_string(),
            Target::Local => "<local>".into(),
            Target::Gone => "<gone>".into(),
        };
        assert_eq!(path(fs.target_of(&e).unwrap()), "d/e");
        fs.do_rename(INodeNo(ROOT_ID), OsStr::new("d"), INodeNo(ROOT_ID), OsStr::new("f"), 0).unwrap();
        assert_eq!(path(fs.target_of(&e).unwrap()), "f/e");
        let (_, cache) = fs.lookup_child(&fs.root, OsStr::new("cache")).unwrap();
        let (_, x) = fs.lookup_child(&cache, OsStr::new("x")).unwrap();
        assert_eq!(path(fs.target_of(&x).unwrap()), "<local>");
        let (_, cachet) = fs.lookup_child(&fs.root, OsStr::new("cachet")).unwrap();
        assert_eq!(path(fs.target_of(&cachet).unwrap()), "cachet");
    }

    // The device number round-trips through the kernel's FUSE encoding.
    #[test]
    fn device_numbers_round_trip() {
        for (major, minor) in [(1, 3), (8, 17), (259, 0x12345), (0, 0)] {
            let dev = libc::makedev(major, minor);
            assert_eq!(decode_dev(encode_dev(dev)), dev);
        }
    }

    // mountinfo lines are matched on the unescaped mount point, with the connection minor.
    #[test]
    fn mountinfo_is_parsed_and_unescaped() {
        let text = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - fuse.hamirror hamirror rw\n\
                    37 35 0:52 / /mnt/a\\040b rw - fuse.hamirror hamirror rw,user_id=0\n\
                    38 35 0:53 / /other rw - ext4 /dev/vda rw\n";
        let found = parse_mountinfo(text, b"/mnt/a b");
        assert_eq!(found.len(), 2);
        assert_eq!(found[1], MountEntry { minor: 52, fstype: "fuse.hamirror".into() });
        assert!(parse_mountinfo(text, b"/mnt").is_empty());
    }

    // notreplicated entries must be relative plain paths.
    #[test]
    fn notreplicated_entries_are_checked() {
        let ok = normalize_notreplicated(&[PathBuf::from("./cache/"), PathBuf::from("a/b")]).unwrap();
        assert_eq!(ok, vec!["cache".to_string(), "a/b".to_string()]);
        assert!(normalize_notreplicated(&[PathBuf::from("/abs")]).is_err());
        assert!(normalize_notreplicated(&[PathBuf::from("a/../b")]).is_err());
        assert!(normalize_notreplicated(&[PathBuf::from(".")]).is_err());
    }

    // A directory buffer that lies about its record lengths ends the listing, never panics.
    #[test]
    fn malformed_dirents_do_not_panic() {
        let mut buf = vec![0u8; 40];
        buf[16..18].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(DirEntries::new(&buf).count(), 0);
        buf[16..18].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(DirEntries::new(&buf).count(), 0);
    }
}
