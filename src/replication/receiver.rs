//! The replication receiver on the secondary: applies the primary's ops to the replicated
//! directories, in order, and acknowledges them.
//!
//! [`Receiver`] is the applier: every path is resolved from a directory fd of its root,
//! opened once (before a read-only view is mounted over the directory), one component at a
//! time with `O_NOFOLLOW | O_DIRECTORY`, and every change is an `*at` call on the last
//! directory with a flag that does not follow a final symbolic link. No op can therefore reach
//! a file outside the root, even when the tree holds symbolic links pointing out: such an op
//! is refused with one sentence and changes nothing. Writes go only to regular files.
//!
//! [`serve`] accepts the primary's connection on the module's replication port, one
//! authenticated connection at a time (a newer one replaces the older), and runs two threads
//! for it: a reader that decrypts frames and answers pings, and an applier that applies ops
//! and sends the acknowledgements: `Ack { durable: true }` after each `Fsync` op, once every
//! file and directory changed since the last one is flushed; `Ack { durable: false }` every
//! [`ACK_EVERY_OPS`] ops or [`ACK_EVERY_BYTES`] bytes, and whenever it has caught up. An op
//! that cannot be applied (refused, full disk, I/O error) is answered with
//! [`Message::Error`](super::channel::Message::Error), and nothing after it is applied on
//! that connection: the primary goes on alone and tracks what this node misses.
//!
//! The applier assumes it is the only writer of the directories (the secondary's view of
//! them is read-only): a final component is checked not to be a symbolic link before a chmod,
//! and nothing else changes it in between.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CStr, CString};
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver as QueueReceiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::channel::{self, op_checksum, Channel, ChannelError, FrameWriter, Identity, Message};
use super::{Op, RelPath, Timestamp};
use crate::cluster::key::ClusterKey;

/// Files kept open for writes, by path; the table is emptied when it is full.
pub const OPEN_FILES_MAX: usize = 64;
/// Changed files and directories remembered for the next flush; beyond this they are flushed
/// at once, so the table and its fds stay bounded.
pub const DIRTY_INODES_MAX: usize = 1024;
/// An applied (not durable) acknowledgement at least every this many ops...
pub const ACK_EVERY_OPS: u64 = 64;
/// ...or this many bytes of op data.
pub const ACK_EVERY_BYTES: u64 = 4 << 20;
/// Decrypted ops waiting for the applier; the reader stops reading (TCP pushes back) beyond.
pub const RECEIVE_QUEUE_FRAMES_MAX: usize = 16;
/// Connections in the handshake at once; more are closed at once.
pub const HANDSHAKES_MAX: usize = 4;
/// A connection that has not authenticated within this is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one warning per reason in this interval (the first one is always logged).
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Longest xattr name and value (Linux XATTR_NAME_MAX, XATTR_SIZE_MAX).
const XATTR_NAME_BYTES_MAX: usize = 255;
const XATTR_VALUE_BYTES_MAX: usize = 65536;
/// Longest file name component (NAME_MAX).
const NAME_BYTES_MAX: usize = 255;

/// Why an op was not applied: one sentence each. [`ApplyError::is_refusal`] tells an op that
/// is refused (bad input, nothing changed) from a local failure.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("refused an operation on replicated directory #{dir}: this module has {count} replicated directories")]
    UnknownDir { dir: u16, count: usize },
    #[error("refused an operation on {path}: {why}")]
    Refused { path: String, why: &'static str },
    #[error(
        "refused operation {seq}: its checksum does not match its content (corrupted on the primary or on the way)"
    )]
    Checksum { seq: u64 },
    #[error("refused operation {got}: operation {expected} was expected next")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: String, source: io::Error },
}

impl ApplyError {
    /// True when the op was refused as bad input; false for a local failure (full disk...).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, ApplyError::Io { .. })
    }
}

/// What applying one op did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The change is made (in the page cache).
    Changed,
    /// An `Fsync`: every change applied so far is on stable storage.
    Durable,
}

/// What the applier is doing, for an observer (tests, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// Op `seq` is about to be applied.
    Applying { seq: u64 },
    /// Op `seq` (an `Fsync`) made everything durable; the durable ack is sent next.
    Synced { seq: u64 },
}

type Observer = Arc<dyn Fn(ReceiverEvent) + Send + Sync>;

struct Root {
    path: PathBuf,
    dir: Arc<File>,
}

/// A changed inode to flush at the next `Fsync`.
struct Dirty {
    file: Arc<File>,
    /// Its metadata changed (attributes, names in a directory): `fsync`, not `fdatasync`.
    metadata: bool,
    shown: String,
}

/// An open regular file of the write cache.
struct OpenFile {
    file: Arc<File>,
    key: (u64, u64),
}

/// The parent directory and name of a path (no name: the root itself).
struct Target {
    root: usize,
    parent: Arc<File>,
    name: Option<CString>,
    shown: String,
}

impl Target {
    fn name(&self) -> Result<&CStr, ApplyError> {
        self.name.as_deref().ok_or_else(|| ApplyError::Refused {
            path: self.shown.clone(),
            why: "the operation needs a name inside the replicated directory, not the directory itself",
        })
    }
}

/// Applies ops under the roots of one module's replicated directories (index = `RelPath::dir`).
pub struct Receiver {
    roots: Vec<Root>,
    files: HashMap<RelPath, OpenFile>,
    dirty: HashMap<(u64, u64), Dirty>,
    syncfs: BTreeSet<usize>,
    observer: Option<Observer>,
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver").field("roots", &self.roots.iter().map(|r| &r.path).collect::<Vec<_>>()).finish()
    }
}

impl Receiver {
    /// Opens each root directory (following links in the configured path itself: it is
    /// configuration, not replicated data).
    pub fn new(roots: Vec<PathBuf>) -> io::Result<Receiver> {
        let mut opened = Vec::with_capacity(roots.len());
        for path in roots {
            let cpath = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{} contains a NUL byte", path.display()))
            })?;
            // SAFETY: `cpath` is a NUL-terminated string that outlives the call.
            let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
            if fd < 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot open the replicated directory {}: {e}", path.display()),
                ));
            }
            // SAFETY: `fd` was just returned by open and is owned by nothing else.
            let dir = unsafe { File::from_raw_fd(fd) };
            opened.push((path, dir));
        }
        Ok(Receiver::from_dirs(opened))
    }

    /// Uses directory fds opened earlier (for example before a read-only view was mounted
    /// over the directories); each path is only used in messages.
    pub fn from_dirs(roots: Vec<(PathBuf, File)>) -> Receiver {
        Receiver {
            roots: roots.into_iter().map(|(path, dir)| Root { path, dir: Arc::new(dir) }).collect(),
            files: HashMap::new(),
            dirty: HashMap::new(),
            syncfs: BTreeSet::new(),
            observer: None,
        }
    }

    /// Calls `observer` from the applier thread at each [`ReceiverEvent`]; it may block (a
    /// test uses that to hold the applier).
    pub fn set_observer(&mut self, observer: impl Fn(ReceiverEvent) + Send + Sync + 'static) {
        self.observer = Some(Arc::new(observer));
    }

    fn notify(&self, event: ReceiverEvent) {
        if let Some(observer) = &self.observer {
            observer(event);
        }
    }

    /// Applies one op. A refused op changes nothing.
    pub fn apply(&mut self, op: &Op) -> Result<Applied, ApplyError> {
        match op {
            Op::Write { file, offset, data } => {
                let shown = self.shown(file);
                if offset.checked_add(data.len() as u64).is_none_or(|end| end > i64::MAX as u64) {
                    return Err(ApplyError::Refused {
                        path: shown,
                        why: "the write goes beyond the largest file offset",
                    });
                }
                let open = self.open_file(file)?;
                open.file.write_all_at(data, *offset).map_err(|source| ApplyError::Io {
                    action: "write to",
                    path: shown.clone(),
                    source,
                })?;
                self.mark(open.key, &open.file, false, shown);
            }
            Op::Truncate { file, size } => {
                let shown = self.shown(file);
                if *size > i64::MAX as u64 {
                    return Err(ApplyError::Refused { path: shown, why: "the size is beyond the largest file size" });
                }
                let open = self.open_file(file)?;
                open.file.set_len(*size).map_err(|source| ApplyError::Io {
                    action: "truncate",
                    path: shown.clone(),
                    source,
                })?;
                self.mark(open.key, &open.file, false, shown);
            }
            Op::Fallocate { file, mode, offset, len } => {
                let shown = self.shown(file);
                let (Ok(offset), Ok(len)) = (i64::try_from(*offset), i64::try_from(*len)) else {
                    return Err(ApplyError::Refused {
                        path: shown,
                        why: "the range is beyond the largest file offset",
                    });
                };
                let open = self.open_file(file)?;
                // SAFETY: the fd is open for the duration of the call; fallocate takes plain integers.
                let rc = unsafe { libc::fallocate(open.file.as_raw_fd(), *mode, offset, len) };
                check(rc).map_err(|source| ApplyError::Io {
                    action: "allocate space in",
                    path: shown.clone(),
                    source,
                })?;
                self.mark(open.key, &open.file, false, shown);
            }
            Op::Create { file, mode, uid, gid } => self.create(file, *mode, *uid, *gid)?,
            Op::Mkdir { dir, mode, uid, gid } => {
                let t = self.resolve(dir)?;
                let name = t.name()?;
                let perm = mode & 0o7777;
                // SAFETY: the parent fd is open and `name` is NUL-terminated for the duration of the call.
                let rc = unsafe { libc::mkdirat(t.parent.as_raw_fd(), name.as_ptr(), perm) };
                match check(rc) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) && kind(&t)? == Kind::Dir => {}
                    Err(source) => {
                        return Err(ApplyError::Io { action: "create the directory", path: t.shown, source })
                    }
                }
                chown_at(&t, *uid, *gid)?;
                // The umask applied by mkdir is undone: the copy gets the primary's mode.
                chmod_at(&t, perm).map_err(|source| ApplyError::Io {
                    action: "set the mode of",
                    path: t.shown.clone(),
                    source,
                })?;
                self.mark_dir(&t.parent, t.root, &t.shown);
            }
            Op::Mknod { node, mode, rdev, uid, gid } => {
                let t = self.resolve(node)?;
                let name = t.name()?;
                let format = mode & libc::S_IFMT;
                if ![libc::S_IFIFO, libc::S_IFCHR, libc::S_IFBLK, libc::S_IFSOCK, libc::S_IFREG].contains(&format) {
                    return Err(ApplyError::Refused {
                        path: t.shown,
                        why: "mknod is only for FIFOs, sockets, device nodes and files",
                    });
                }
                // SAFETY: the parent fd is open and `name` is NUL-terminated for the duration of the call.
                let rc = unsafe { libc::mknodat(t.parent.as_raw_fd(), name.as_ptr(), *mode, *rdev) };
                check(rc).map_err(|source| ApplyError::Io {
                    action: "create the node",
                    path: t.shown.clone(),
                    source,
                })?;
                chown_at(&t, *uid, *gid)?;
                chmod_at(&t, mode & 0o7777).map_err(|source| ApplyError::Io {
                    action: "set the mode of",
                    path: t.shown.clone(),
                    source,
                })?;
                self.mark_dir(&t.parent, t.root, &t.shown);
            }
            Op::Symlink { link, target, uid, gid } => {
                let t = self.resolve(link)?;
                let name = t.name()?;
                let Ok(target) = CString::new(target.as_bytes()) else {
                    return Err(ApplyError::Refused { path: t.shown, why: "the link target contains a NUL byte" });
                };
                if target.as_bytes().len() > super::REL_PATH_BYTES_MAX {
                    return Err(ApplyError::Refused { path: t.shown, why: "the link target is longer than PATH_MAX" });
                }
                // The target is stored, never followed: it may point anywhere.
                // SAFETY: both strings are NUL-terminated and the parent fd is open during the call.
                let rc = unsafe { libc::symlinkat(target.as_ptr(), t.parent.as_raw_fd(), name.as_ptr()) };
                check(rc).map_err(|source| ApplyError::Io {
                    action: "create the symbolic link",
                    path: t.shown.clone(),
                    source,
                })?;
                chown_at(&t, *uid, *gid)?;
                self.mark_dir(&t.parent, t.root, &t.shown);
            }
            Op::Link { existing, new } => {
                self.same_dir(existing, new)?;
                let from = self.resolve(existing)?;
                let to = self.resolve(new)?;
                let (from_name, to_name) = (from.name()?, to.name()?);
                // Flags 0: a symbolic link is linked itself, never followed.
                // SAFETY: both parent fds are open and both names NUL-terminated during the call.
                let rc = unsafe {
                    libc::linkat(
                        from.parent.as_raw_fd(),
                        from_name.as_ptr(),
                        to.parent.as_raw_fd(),
                        to_name.as_ptr(),
                        0,
                    )
                };
                check(rc).map_err(|source| ApplyError::Io {
                    action: "create the hard link",
                    path: to.shown.clone(),
                    source,
                })?;
                self.mark_dir(&to.parent, to.root, &to.shown);
            }
            Op::Unlink { file } => {
                let t = self.resolve(file)?;
                let name = t.name()?;
                // SAFETY: the parent fd is open and `name` is NUL-terminated during the call.
                let rc = unsafe { libc::unlinkat(t.parent.as_raw_fd(), name.as_ptr(), 0) };
                check(rc).map_err(|source| ApplyError::Io { action: "remove", path: t.shown.clone(), source })?;
                self.files.remove(file);
                self.mark_dir(&t.parent, t.root, &t.shown);
            }
            Op::Rmdir { dir } => {
                let t = self.resolve(dir)?;
                let name = t.name()?;
                // SAFETY: the parent fd is open and `name` is NUL-terminated during the call.
                let rc = unsafe { libc::unlinkat(t.parent.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) };
                check(rc).map_err(|source| ApplyError::Io {
                    action: "remove the directory",
                    path: t.shown.clone(),
                    source,
                })?;
                self.files.clear();
                self.mark_dir(&t.parent, t.root, &t.shown);
            }
            Op::Rename { from, to, flags } => {
                self.same_dir(from, to)?;
                let src = self.resolve(from)?;
                let dst = self.resolve(to)?;
                if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
                    return Err(ApplyError::Refused {
                        path: src.shown,
                        why: "the rename flags are not RENAME_NOREPLACE or RENAME_EXCHANGE",
                    });
                }
                let (src_name, dst_name) = (src.name()?, dst.name()?);
                // SAFETY: both parent fds are open and both names NUL-terminated during the call.
                let rc = unsafe {
                    libc::renameat2(
                        src.parent.as_raw_fd(),
                        src_name.as_ptr(),
                        dst.parent.as_raw_fd(),
                        dst_name.as_ptr(),
                        *flags,
                    )
                };
                check(rc).map_err(|source| ApplyError::Io { action: "rename", path: src.shown.clone(), source })?;
                // Paths may now name other files (or directories full of them).
                self.files.clear();
                self.mark_dir(&src.parent, src.root, &src.shown);
                self.mark_dir(&dst.parent, dst.root, &dst.shown);
            }
            Op::SetAttr { path, mode, uid, gid, atime, mtime } => {
                self.set_attr(path, *mode, *uid, *gid, *atime, *mtime)?
            }
            Op::SetXattr { path, name, value, flags } => {
                let t = self.resolve(path)?;
                let attr = xattr_name(&t, name)?;
                if value.len() > XATTR_VALUE_BYTES_MAX {
                    return Err(ApplyError::Refused {
                        path: t.shown,
                        why: "the extended attribute value is larger than 64 KiB",
                    });
                }
                if flags & !(libc::XATTR_CREATE | libc::XATTR_REPLACE) != 0 {
                    return Err(ApplyError::Refused {
                        path: t.shown,
                        why: "the setxattr flags are not XATTR_CREATE or XATTR_REPLACE",
                    });
                }
                xattr_set(&t, &attr, Some((value, *flags))).map_err(|source| ApplyError::Io {
                    action: "set an extended attribute of",
                    path: t.shown.clone(),
                    source,
                })?;
                self.mark_target(&t)?;
            }
            Op::RemoveXattr { path, name } => {
                let t = self.resolve(path)?;
                let attr = xattr_name(&t, name)?;
                xattr_set(&t, &attr, None).map_err(|source| ApplyError::Io {
                    action: "remove an extended attribute of",
                    path: t.shown.clone(),
                    source,
                })?;
                self.mark_target(&t)?;
            }
            Op::Fsync { file, datasync } => {
                if let Some(file) = file {
                    self.root_of(file)?;
                }
                self.sync(*datasync)?;
                return Ok(Applied::Durable);
            }
        }
        Ok(Applied::Changed)
    }

    /// Flushes every file and directory changed since the last flush.
    pub fn sync(&mut self, datasync: bool) -> Result<(), ApplyError> {
        let dirty = std::mem::take(&mut self.dirty);
        for entry in dirty.into_values() {
            let done = if datasync && !entry.metadata { entry.file.sync_data() } else { entry.file.sync_all() };
            done.map_err(|source| ApplyError::Io { action: "flush", path: entry.shown, source })?;
        }
        for root in std::mem::take(&mut self.syncfs) {
            let dir = &self.roots[root];
            // SAFETY: the root fd stays open for the life of the receiver.
            let rc = unsafe { libc::syncfs(dir.dir.as_raw_fd()) };
            check(rc).map_err(|source| ApplyError::Io {
                action: "flush the file system of",
                path: dir.path.display().to_string(),
                source,
            })?;
        }
        Ok(())
    }

    fn create(&mut self, file: &RelPath, mode: u32, uid: u32, gid: u32) -> Result<(), ApplyError> {
        let t = self.resolve(file)?;
        let name = t.name()?;
        let perm = mode & 0o7777;
        let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let created = match open_at(&t.parent, name, flags, perm) {
            Ok(created) => created,
            // Already there (a replay after a reconnection): it must be a regular file.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                return match kind(&t)? {
                    Kind::Regular => {
                        chown_at(&t, uid, gid)?;
                        let open = self.open_file(file)?;
                        open.file.set_permissions(std::fs::Permissions::from_mode(perm)).map_err(|source| {
                            ApplyError::Io { action: "set the mode of", path: t.shown.clone(), source }
                        })?;
                        self.mark(open.key, &open.file, true, t.shown.clone());
                        self.mark_dir(&t.parent, t.root, &t.shown);
                        Ok(())
                    }
                    Kind::Symlink => Err(refused_link(t.shown)),
                    _ => Err(ApplyError::Refused { path: t.shown, why: "it exists and is not a regular file" }),
                };
            }
            Err(source) => return Err(ApplyError::Io { action: "create", path: t.shown, source }),
        };
        // Owner first (chown clears set-user-ID bits), then the mode: the umask applied by open
        // is undone and the copy gets the primary's mode.
        chown_at(&t, uid, gid)?;
        created.set_permissions(std::fs::Permissions::from_mode(perm)).map_err(|source| ApplyError::Io {
            action: "set the mode of",
            path: t.shown.clone(),
            source,
        })?;
        let key = inode_key(&created).map_err(|source| ApplyError::Io {
            action: "examine",
            path: t.shown.clone(),
            source,
        })?;
        let created = Arc::new(created);
        self.cache(file.clone(), OpenFile { file: Arc::clone(&created), key });
        self.mark(key, &created, true, t.shown.clone());
        self.mark_dir(&t.parent, t.root, &t.shown);
        Ok(())
    }

    fn set_attr(
        &mut self,
        path: &RelPath,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<Timestamp>,
        mtime: Option<Timestamp>,
    ) -> Result<(), ApplyError> {
        let t = self.resolve(path)?;
        let io_err = |action: &'static str| {
            let shown = t.shown.clone();
            move |source| ApplyError::Io { action, path: shown, source }
        };
        for ts in [atime, mtime].into_iter().flatten() {
            if ts.nanos >= 1_000_000_000 {
                return Err(ApplyError::Refused {
                    path: t.shown,
                    why: "a timestamp has more than a second of nanoseconds",
                });
            }
        }
        // Owner first: chown clears the set-user-id bits the mode may then set again.
        if uid.is_some() || gid.is_some() {
            let (uid, gid) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
            let (fd, name, flags) = at_args(&t);
            // SAFETY: the fd is open and `name` NUL-terminated during the call; -1 (u32::MAX) keeps an id.
            let rc = unsafe { libc::fchownat(fd, name.as_ptr(), uid, gid, flags | libc::AT_SYMLINK_NOFOLLOW) };
            check(rc).map_err(io_err("change the owner of"))?;
        }
        if let Some(mode) = mode {
            // A symbolic link has no mode of its own on Linux: nothing to copy.
            if kind(&t)? != Kind::Symlink {
                chmod_at(&t, mode & 0o7777).map_err(io_err("set the mode of"))?;
            }
        }
        if atime.is_some() || mtime.is_some() {
            let spec = |ts: Option<Timestamp>| match ts {
                Some(ts) => libc::timespec { tv_sec: ts.secs as libc::time_t, tv_nsec: ts.nanos as libc::c_long },
                None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
            };
            let times = [spec(atime), spec(mtime)];
            let rc = match &t.name {
                // SAFETY: the fd is open, `name` NUL-terminated and `times` two timespecs, all during the call.
                Some(name) => unsafe {
                    libc::utimensat(t.parent.as_raw_fd(), name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
                },
                // SAFETY: the root fd is open and `times` two timespecs during the call.
                None => unsafe { libc::futimens(t.parent.as_raw_fd(), times.as_ptr()) },
            };
            check(rc).map_err(io_err("set the times of"))?;
        }
        self.mark_target(&t)
    }

    /// The root of `path`, after checking the index and re-checking the path (a decoded
    /// `RelPath` did not go through `RelPath::new`).
    fn root_of(&self, path: &RelPath) -> Result<usize, ApplyError> {
        let index = usize::from(path.dir());
        if index >= self.roots.len() {
            return Err(ApplyError::UnknownDir { dir: path.dir(), count: self.roots.len() });
        }
        if RelPath::new(path.dir(), path.path()).is_none() {
            return Err(ApplyError::Refused {
                path: format!("{:?} in {}", path.path(), self.roots[index].path.display()),
                why: "it is not a plain relative path (absolute, `..`, `.`, empty component or NUL)",
            });
        }
        Ok(index)
    }

    fn shown(&self, path: &RelPath) -> String {
        match self.roots.get(usize::from(path.dir())) {
            Some(root) if path.path().is_empty() => root.path.display().to_string(),
            Some(root) => root.path.join(path.path()).display().to_string(),
            None => format!("{:?} in replicated directory #{}", path.path(), path.dir()),
        }
    }

    fn same_dir(&self, a: &RelPath, b: &RelPath) -> Result<(), ApplyError> {
        if a.dir() == b.dir() {
            return Ok(());
        }
        Err(ApplyError::Refused {
            path: self.shown(b),
            why: "a link or rename cannot cross two replicated directories",
        })
    }

    /// Opens every directory on the way from the root, never following a link.
    fn resolve(&self, path: &RelPath) -> Result<Target, ApplyError> {
        let root = self.root_of(path)?;
        let shown = self.shown(path);
        let mut parent = Arc::clone(&self.roots[root].dir);
        if path.path().is_empty() {
            return Ok(Target { root, parent, name: None, shown });
        }
        let components: Vec<&str> = path.path().split('/').collect();
        let Some((last, dirs)) = components.split_last() else {
            return Ok(Target { root, parent, name: None, shown });
        };
        for component in dirs {
            let name = component_name(component, &shown)?;
            let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            parent = Arc::new(open_at(&parent, &name, flags, 0).map_err(|source| match source.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::ENOTDIR) => ApplyError::Refused {
                    path: shown.clone(),
                    why: "a directory on the way is a symbolic link or not a directory, and replication never follows links",
                },
                _ => ApplyError::Io { action: "open a directory on the way to", path: shown.clone(), source },
            })?);
        }
        let name = component_name(last, &shown)?;
        Ok(Target { root, parent, name: Some(name), shown })
    }

    /// The open regular file at `path`, from the cache or opened now; a link, a directory or a
    /// device is refused.
    fn open_file(&mut self, path: &RelPath) -> Result<OpenFile, ApplyError> {
        if let Some(open) = self.files.get(path) {
            return Ok(OpenFile { file: Arc::clone(&open.file), key: open.key });
        }
        let t = self.resolve(path)?;
        let name = t.name()?;
        match kind(&t)? {
            Kind::Regular => {}
            Kind::Symlink => return Err(refused_link(t.shown)),
            _ => return Err(ApplyError::Refused { path: t.shown, why: "it is not a regular file" }),
        }
        let flags = libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
        let file = open_at(&t.parent, name, flags, 0).map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => refused_link(t.shown.clone()),
            _ => ApplyError::Io { action: "open", path: t.shown.clone(), source },
        })?;
        let key =
            inode_key(&file).map_err(|source| ApplyError::Io { action: "examine", path: t.shown.clone(), source })?;
        let open = OpenFile { file: Arc::new(file), key };
        self.cache(path.clone(), OpenFile { file: Arc::clone(&open.file), key });
        Ok(open)
    }

    fn cache(&mut self, path: RelPath, open: OpenFile) {
        if self.files.len() >= OPEN_FILES_MAX {
            self.files.clear();
        }
        self.files.insert(path, open);
    }

    fn mark(&mut self, key: (u64, u64), file: &Arc<File>, metadata: bool, shown: String) {
        if self.dirty.len() >= DIRTY_INODES_MAX && !self.dirty.contains_key(&key) {
            // Flushing early is always allowed; a failure shows up again at the next Fsync.
            if let Err(e) = self.sync(false) {
                warn!("early flush of the replicated files failed: {e}");
            }
        }
        let entry = self.dirty.entry(key).or_insert_with(|| Dirty { file: Arc::clone(file), metadata: false, shown });
        entry.metadata |= metadata;
    }

    /// Remembers the directory `dir` (whose entries changed) for the next flush.
    fn mark_dir(&mut self, dir: &Arc<File>, root: usize, shown: &str) {
        match inode_key(dir) {
            Ok(key) => self.mark(key, dir, true, format!("the directory of {shown}")),
            Err(_) => {
                self.syncfs.insert(root);
            }
        }
    }

    /// Remembers the inode of `t` (whose attributes changed) for the next flush.
    fn mark_target(&mut self, t: &Target) -> Result<(), ApplyError> {
        let Some(name) = &t.name else {
            self.mark_dir(&t.parent, t.root, &t.shown);
            return Ok(());
        };
        let flags = match kind(t)? {
            Kind::Regular => libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
            Kind::Dir => libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            // A link, FIFO, socket or device node cannot be opened to be flushed on its own.
            Kind::Symlink | Kind::Other => {
                self.syncfs.insert(t.root);
                return Ok(());
            }
        };
        let file = open_at(&t.parent, name, flags, 0).map_err(|source| ApplyError::Io {
            action: "open",
            path: t.shown.clone(),
            source,
        })?;
        let key =
            inode_key(&file).map_err(|source| ApplyError::Io { action: "examine", path: t.shown.clone(), source })?;
        self.mark(key, &Arc::new(file), true, t.shown.clone());
        Ok(())
    }
}

fn refused_link(path: String) -> ApplyError {
    ApplyError::Refused { path, why: "it is a symbolic link, and replication never writes through links" }
}

fn component_name(component: &str, shown: &str) -> Result<CString, ApplyError> {
    let refuse = |why| ApplyError::Refused { path: shown.to_string(), why };
    if component.is_empty() || component == "." || component == ".." {
        return Err(refuse("a path component is empty, `.` or `..`"));
    }
    if component.len() > NAME_BYTES_MAX {
        return Err(refuse("a path component is longer than 255 bytes"));
    }
    CString::new(component).map_err(|_| refuse("a path component contains a NUL byte"))
}

fn xattr_name(t: &Target, name: &str) -> Result<CString, ApplyError> {
    if name.is_empty() || name.len() > XATTR_NAME_BYTES_MAX {
        return Err(ApplyError::Refused {
            path: t.shown.clone(),
            why: "the extended attribute name is empty or longer than 255 bytes",
        });
    }
    CString::new(name).map_err(|_| ApplyError::Refused {
        path: t.shown.clone(),
        why: "the extended attribute name contains a NUL byte",
    })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_at(dir: &File, name: &CStr, flags: libc::c_int, mode: u32) -> io::Result<File> {
    // SAFETY: `dir` is an open fd and `name` a NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn inode_key(file: &File) -> io::Result<(u64, u64)> {
    let meta = file.metadata()?;
    Ok((std::os::unix::fs::MetadataExt::dev(&meta), std::os::unix::fs::MetadataExt::ino(&meta)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Regular,
    Dir,
    Symlink,
    Other,
}

/// The type of `t`'s final component, without following a link.
fn kind(t: &Target) -> Result<Kind, ApplyError> {
    let (fd, name, flags) = at_args(t);
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: the fd is open, `name` NUL-terminated and `st` a writable stat buffer during the call.
    let rc = unsafe { libc::fstatat(fd, name.as_ptr(), st.as_mut_ptr(), flags | libc::AT_SYMLINK_NOFOLLOW) };
    check(rc).map_err(|source| ApplyError::Io { action: "examine", path: t.shown.clone(), source })?;
    // SAFETY: fstatat succeeded, so it filled `st`.
    let mode = unsafe { st.assume_init() }.st_mode & libc::S_IFMT;
    Ok(match mode {
        libc::S_IFREG => Kind::Regular,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    })
}

const EMPTY: &CStr = c"";

/// The `*at` arguments naming `t`: its parent and name, or the root fd itself.
fn at_args(t: &Target) -> (libc::c_int, &CStr, libc::c_int) {
    match &t.name {
        Some(name) => (t.parent.as_raw_fd(), name.as_c_str(), 0),
        None => (t.parent.as_raw_fd(), EMPTY, libc::AT_EMPTY_PATH),
    }
}

/// Gives a just-created `t` the owner it has on the primary, never following a link. Before
/// the mode is set: chown clears the set-user-ID and set-group-ID bits.
fn chown_at(t: &Target, uid: u32, gid: u32) -> Result<(), ApplyError> {
    let (fd, name, flags) = at_args(t);
    // SAFETY: the fd is open and `name` NUL-terminated during the call.
    let rc = unsafe { libc::fchownat(fd, name.as_ptr(), uid, gid, flags | libc::AT_SYMLINK_NOFOLLOW) };
    check(rc).map_err(|source| ApplyError::Io { action: "set the owner of", path: t.shown.clone(), source })
}

/// chmod of `t`, which the caller knows is not a symbolic link (fchmodat follows one).
fn chmod_at(t: &Target, mode: u32) -> io::Result<()> {
    match &t.name {
        None => t.parent.set_permissions(std::fs::Permissions::from_mode(mode)),
        Some(name) => {
            // SAFETY: the parent fd is open and `name` NUL-terminated during the call.
            check(unsafe { libc::fchmodat(t.parent.as_raw_fd(), name.as_ptr(), mode, 0) })
        }
    }
}

/// Sets (`Some`) or removes (`None`) an extended attribute of `t` itself, never of what a
/// link points to: through `/proc/self/fd/<parent>/<name>` with the `l*` calls, which resolve
/// the parent exactly as the fd and do not follow the final component.
fn xattr_set(t: &Target, attr: &CStr, value: Option<(&Vec<u8>, i32)>) -> io::Result<()> {
    let rc = match &t.name {
        None => {
            let fd = t.parent.as_raw_fd();
            match value {
                // SAFETY: the fd is open; the name is NUL-terminated and the value a live slice during the call.
                Some((v, flags)) => unsafe { libc::fsetxattr(fd, attr.as_ptr(), v.as_ptr().cast(), v.len(), flags) },
                // SAFETY: the fd is open and the name NUL-terminated during the call.
                None => unsafe { libc::fremovexattr(fd, attr.as_ptr()) },
            }
        }
        Some(name) => {
            let mut path = format!("/proc/self/fd/{}/", t.parent.as_raw_fd()).into_bytes();
            path.extend_from_slice(name.to_bytes());
            let path = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            match value {
                // SAFETY: both strings are NUL-terminated and the value a live slice during the call.
                Some((v, flags)) => unsafe {
                    libc::lsetxattr(path.as_ptr(), attr.as_ptr(), v.as_ptr().cast(), v.len(), flags)
                },
                // SAFETY: both strings are NUL-terminated during the call.
                None => unsafe { libc::lremovexattr(path.as_ptr(), attr.as_ptr()) },
            }
        }
    };
    check(rc)
}

/// What the receiver has done and refused since it started. Never reset.
#[derive(Debug, Default)]
pub struct ReceiverCounters {
    /// Authenticated connections accepted.
    pub connections: AtomicU64,
    /// Connections whose peer failed authentication (another cluster key).
    pub refused_auth: AtomicU64,
    /// Connections refused for another reason (wrong module, version, timeout, too many).
    pub refused_handshake: AtomicU64,
    /// Frames that failed authentication, were too large or did not decode: each ends its
    /// connection.
    pub bad_frames: AtomicU64,
    /// Ops refused as bad input (unknown directory, path escape, bad checksum, out of order).
    pub refused_ops: AtomicU64,
    /// Ops that failed locally (full disk, I/O error).
    pub apply_errors: AtomicU64,
    pub ops_applied: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Flushes done for `Fsync` ops (each followed by a durable ack).
    pub syncs: AtomicU64,
}

/// A copy of [`ReceiverCounters`] at one moment, for `status --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceiverCounts {
    pub connections: u64,
    pub refused_auth: u64,
    pub refused_handshake: u64,
    pub bad_frames: u64,
    pub refused_ops: u64,
    pub apply_errors: u64,
    pub ops_applied: u64,
    pub bytes_written: u64,
    pub syncs: u64,
}

impl ReceiverCounters {
    pub fn counts(&self) -> ReceiverCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ReceiverCounts {
            connections: get(&self.connections),
            refused_auth: get(&self.refused_auth),
            refused_handshake: get(&self.refused_handshake),
            bad_frames: get(&self.bad_frames),
            refused_ops: get(&self.refused_ops),
            apply_errors: get(&self.apply_errors),
            ops_applied: get(&self.ops_applied),
            bytes_written: get(&self.bytes_written),
            syncs: get(&self.syncs),
        }
    }
}

/// What the receiver needs to authenticate the primary.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub key: ClusterKey,
    pub module_id: u16,
    /// This node's index (0 or 1).
    pub node: u8,
    /// The heartbeat timeout: a connection silent this long is closed (the sender pings more
    /// often), and an ack that cannot be written this long ends the connection.
    pub timeout: Duration,
    /// Also gets every warning sentence (refused connections, failed operations), e.g. for
    /// the module's own log.
    pub on_warning: Option<WarningHook>,
}

/// A receiver of warning sentences (see [`ReceiverConfig::on_warning`]).
#[derive(Clone)]
pub struct WarningHook(pub Arc<dyn Fn(&str) + Send + Sync>);

impl fmt::Debug for WarningHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WarningHook")
    }
}

#[derive(Debug, Clone, Copy)]
enum Warning {
    Handshake,
    Auth,
    Frame,
    Op,
}

const WARNINGS: usize = 4;

struct Shared {
    config: ReceiverConfig,
    receiver: Mutex<Receiver>,
    active: Mutex<Option<Connection>>,
    handshakes: AtomicUsize,
    stopping: AtomicBool,
    counters: Arc<ReceiverCounters>,
    warned: Mutex<[Option<Instant>; WARNINGS]>,
}

impl Shared {
    /// Logs a warning unless one for the same reason was logged in the last [`WARN_INTERVAL`].
    fn warn(&self, reason: Warning, message: fmt::Arguments<'_>) {
        let now = Instant::now();
        let due = {
            let mut warned = lock(&self.warned);
            let slot = &mut warned[reason as usize];
            let due = !matches!(*slot, Some(at) if now.duration_since(at) < WARN_INTERVAL);
            if due {
                *slot = Some(now);
            }
            due
        };
        if due {
            warn!(module_id = self.config.module_id, "{message}");
            if let Some(WarningHook(hook)) = &self.config.on_warning {
                hook(&message.to_string());
            }
        }
    }
}

/// A poisoned lock only means another thread panicked while holding it: keep going.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

struct Connection {
    stream: TcpStream,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Connection {
    /// Ends the connection and waits for its threads (the applier finishes its current op).
    fn end(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        for thread in self.threads {
            let _ = thread.join();
        }
    }

    fn is_alive(&self) -> bool {
        self.threads.iter().any(|t| !t.is_finished())
    }
}

/// The running receiver of one module. Dropping it stops it.
pub struct Server {
    shared: Arc<Shared>,
    listener: TcpListener,
    accept: Option<JoinHandle<()>>,
    local_addr: SocketAddr,
}

/// Starts accepting the primary's connections on `listener` and applying its ops with
/// `receiver`.
pub fn serve(listener: TcpListener, config: ReceiverConfig, receiver: Receiver) -> io::Result<Server> {
    let local_addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        config,
        receiver: Mutex::new(receiver),
        active: Mutex::new(None),
        handshakes: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
        counters: Arc::new(ReceiverCounters::default()),
        warned: Mutex::new([None; WARNINGS]),
    });
    let accepting = listener.try_clone()?;
    let accept_shared = Arc::clone(&shared);
    let accept =
        std::thread::Builder::new().name("repl-accept".into()).spawn(move || accept_loop(accept_shared, accepting))?;
    Ok(Server { shared, listener, accept: Some(accept), local_addr })
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn counters(&self) -> Arc<ReceiverCounters> {
        Arc::clone(&self.shared.counters)
    }

    /// True while an authenticated connection is being served.
    pub fn connected(&self) -> bool {
        lock(&self.shared.active).as_ref().is_some_and(Connection::is_alive)
    }

    /// Stops accepting, ends the current connection (after the op being applied) and waits
    /// for the threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the accept thread: accept(2) on a shut-down listening socket fails at once.
        // SAFETY: the listener's fd is open for the duration of the call.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        if let Some(connection) = lock(&self.shared.active).take() {
            connection.end();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                warn!(module_id = shared.config.module_id, "cannot accept a replication connection: {e}");
                // Out of fds or memory: give the system a moment instead of spinning.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "an unknown address".into());
        if shared.handshakes.fetch_add(1, Ordering::SeqCst) >= HANDSHAKES_MAX {
            shared.handshakes.fetch_sub(1, Ordering::SeqCst);
            let count = shared.counters.refused_handshake.fetch_add(1, Ordering::Relaxed) + 1;
            shared.warn(
                Warning::Handshake,
                format_args!("refused a replication connection from {peer}: {HANDSHAKES_MAX} connections are already authenticating ({count} refused so far)"),
            );
            continue;
        }
        let handshake_shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new().name("repl-handshake".into()).spawn(move || {
            handshake(&handshake_shared, stream, &peer);
            handshake_shared.handshakes.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            shared.handshakes.fetch_sub(1, Ordering::SeqCst);
            warn!(module_id = shared.config.module_id, "cannot start a replication handshake thread: {e}");
        }
    }
}

fn handshake(shared: &Arc<Shared>, stream: TcpStream, peer: &str) {
    let local = Identity { module_id: shared.config.module_id, node: shared.config.node };
    let channel = match channel::handshake_receiver(stream, &shared.config.key, local, HANDSHAKE_TIMEOUT) {
        Ok(channel) => channel,
        Err(e) => {
            let (counter, reason) = if matches!(e, ChannelError::AuthFailed) {
                (&shared.counters.refused_auth, Warning::Auth)
            } else {
                (&shared.counters.refused_handshake, Warning::Handshake)
            };
            let count = counter.fetch_add(1, Ordering::Relaxed) + 1;
            shared.warn(
                reason,
                format_args!(
                    "refused a replication connection from {peer}: {e} ({count} refused for this reason so far)"
                ),
            );
            return;
        }
    };
    install(shared, channel, peer);
}

/// Makes `channel` the served connection, ending the previous one first so their ops never
/// interleave.
fn install(shared: &Arc<Shared>, channel: Channel, peer: &str) {
    let mut active = lock(&shared.active);
    if shared.stopping.load(Ordering::SeqCst) {
        channel.shutdown();
        return;
    }
    if let Some(previous) = active.take() {
        info!(module_id = shared.config.module_id, "a new replication connection from {peer} replaces the current one");
        previous.end();
    }
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    info!(
        module_id = shared.config.module_id,
        "replication connection from {peer} (node {}) authenticated", channel.peer.node
    );
    let Channel { reader, writer, stream, .. } = channel;
    let timeout = shared.config.timeout;
    if let Err(e) = stream.set_read_timeout(Some(timeout)).and_then(|()| stream.set_write_timeout(Some(timeout))) {
        warn!(module_id = shared.config.module_id, "cannot set up the replication connection from {peer}: {e}");
        return;
    }
    let (stream_r, stream_a) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(r), Ok(a)) => (r, a),
        (Err(e), _) | (_, Err(e)) => {
            warn!(module_id = shared.config.module_id, "cannot set up the replication connection from {peer}: {e}");
            return;
        }
    };
    let writer = Arc::new(Mutex::new(writer));
    let (queue, incoming) = mpsc::sync_channel(RECEIVE_QUEUE_FRAMES_MAX);
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let (s, w, p) = (Arc::clone(shared), Arc::clone(&writer), peer.to_string());
    match std::thread::Builder::new()
        .name("repl-read".into())
        .spawn(move || read_loop(&s, reader, &w, queue, stream_r, &p))
    {
        Ok(t) => threads.push(t),
        Err(e) => warn!(module_id = shared.config.module_id, "cannot start the replication reader: {e}"),
    }
    let (s, st, p) = (Arc::clone(shared), Arc::clone(&stop), peer.to_string());
    match std::thread::Builder::new()
        .name("repl-apply".into())
        .spawn(move || apply_loop(&s, incoming, &writer, stream_a, &st, &p))
    {
        Ok(t) => threads.push(t),
        Err(e) => warn!(module_id = shared.config.module_id, "cannot start the replication applier: {e}"),
    }
    *active = Some(Connection { stream, stop, threads });
}

type Writer = Arc<Mutex<FrameWriter<BufWriter<TcpStream>>>>;

fn send(writer: &Writer, message: &Message) -> Result<(), ChannelError> {
    let mut writer = lock(writer);
    writer.send(message)?;
    writer.flush()
}

/// An op handed from the reader to the applier.
struct Incoming {
    seq: u64,
    checksum: u64,
    op: Op,
}

fn read_loop(
    shared: &Shared,
    mut reader: channel::FrameReader<std::io::BufReader<TcpStream>>,
    writer: &Writer,
    queue: SyncSender<Incoming>,
    stream: TcpStream,
    peer: &str,
) {
    // Once the applier has stopped (after an error), ops are read and dropped until the
    // primary, having read the error, closes.
    let mut draining = false;
    loop {
        match reader.poll() {
            Ok(Some(Message::Op { seq, checksum, op })) => {
                if !draining && queue.send(Incoming { seq, checksum, op }).is_err() {
                    draining = true;
                }
            }
            Ok(Some(Message::Ping { id })) => {
                if send(writer, &Message::Pong { id }).is_err() {
                    break;
                }
            }
            Ok(Some(other)) => {
                let count = shared.counters.bad_frames.fetch_add(1, Ordering::Relaxed) + 1;
                let kind = match other {
                    Message::Ack { .. } => "an acknowledgement",
                    Message::Error { .. } => "an error",
                    _ => "a pong",
                };
                shared.warn(
                    Warning::Frame,
                    format_args!("dropped the replication connection from {peer}: it sent {kind}, which only a receiver sends ({count} bad frames so far)"),
                );
                break;
            }
            Ok(None) => {
                if !draining {
                    warn!(
                        module_id = shared.config.module_id,
                        "the replication connection from {peer} was silent for {:?}: closing it", shared.config.timeout
                    );
                }
                break;
            }
            Err(ChannelError::Closed) => {
                info!(module_id = shared.config.module_id, "the primary {peer} closed the replication connection");
                break;
            }
            Err(ChannelError::Io(e)) => {
                info!(module_id = shared.config.module_id, "the replication connection from {peer} ended: {e}");
                break;
            }
            Err(e) => {
                let count = shared.counters.bad_frames.fetch_add(1, Ordering::Relaxed) + 1;
                shared.warn(
                    Warning::Frame,
                    format_args!("dropped the replication connection from {peer}: {e}; nothing in that frame was applied ({count} bad frames so far)"),
                );
                break;
            }
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn apply_loop(
    shared: &Shared,
    incoming: QueueReceiver<Incoming>,
    writer: &Writer,
    stream: TcpStream,
    stop: &AtomicBool,
    peer: &str,
) {
    let mut receiver = lock(&shared.receiver);
    let mut expected: Option<u64> = None;
    // The newest applied op not yet acknowledged, and how much lies behind it.
    let mut unacked: Option<u64> = None;
    let (mut unacked_ops, mut unacked_bytes) = (0u64, 0u64);
    let ack = |upto_seq: u64, durable: bool| send(writer, &Message::Ack { upto_seq, durable });
    loop {
        let next = match incoming.try_recv() {
            Ok(next) => next,
            Err(TryRecvError::Empty) => {
                // Caught up: acknowledge what was applied before waiting.
                if let Some(seq) = unacked.take() {
                    if ack(seq, false).is_err() {
                        break;
                    }
                    (unacked_ops, unacked_bytes) = (0, 0);
                }
                match incoming.recv() {
                    Ok(next) => next,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Incoming { seq, checksum, op } = next;
        let result = match expected {
            Some(expected) if seq != expected => Err(ApplyError::OutOfOrder { expected, got: seq }),
            _ if op_checksum(&op) != checksum => Err(ApplyError::Checksum { seq }),
            _ => {
                receiver.notify(ReceiverEvent::Applying { seq });
                receiver.apply(&op)
            }
        };
        expected = seq.checked_add(1);
        let sent = match result {
            Ok(Applied::Changed) => {
                shared.counters.ops_applied.fetch_add(1, Ordering::Relaxed);
                let bytes = match &op {
                    Op::Write { data, .. } => data.len() as u64,
                    _ => 0,
                };
                shared.counters.bytes_written.fetch_add(bytes, Ordering::Relaxed);
                unacked = Some(seq);
                unacked_ops += 1;
                unacked_bytes += bytes;
                if unacked_ops >= ACK_EVERY_OPS || unacked_bytes >= ACK_EVERY_BYTES {
                    (unacked, unacked_ops, unacked_bytes) = (None, 0, 0);
                    ack(seq, false)
                } else {
                    Ok(())
                }
            }
            Ok(Applied::Durable) => {
                shared.counters.ops_applied.fetch_add(1, Ordering::Relaxed);
                shared.counters.syncs.fetch_add(1, Ordering::Relaxed);
                receiver.notify(ReceiverEvent::Synced { seq });
                (unacked, unacked_ops, unacked_bytes) = (None, 0, 0);
                ack(seq, true)
            }
            Err(e) => {
                let (counter, what) = if e.is_refusal() {
                    (&shared.counters.refused_ops, "refused")
                } else {
                    (&shared.counters.apply_errors, "failed")
                };
                let count = counter.fetch_add(1, Ordering::Relaxed) + 1;
                shared.warn(
                    Warning::Op,
                    format_args!("replication operation {seq} from {peer} {what}: {e}; nothing after it is applied and the primary goes on alone, tracking the changes ({count} {what} so far)"),
                );
                let _ = send(writer, &Message::Error { seq, message: e.to_string() });
                // FIN after the error, so the primary reads it before the connection ends.
                let _ = stream.shutdown(std::net::Shutdown::Write);
                break;
            }
        };
        if sent.is_err() {
            break;
        }
    }
}

/// The replication address of `node` for `module`: its address on the module's rfs lan and
/// the module's replication port.
pub fn replication_addr(
    cluster: &crate::config::ClusterConfig,
    module: &crate::config::ModuleConfig,
    node: &str,
) -> Option<SocketAddr> {
    let rfs = module.rfs.as_ref()?;
    let lan = cluster.lans.iter().find(|lan| lan.name == rfs.lan)?;
    let addr = lan.nodes.iter().find(|n| n.name == node)?.addr;
    Some(SocketAddr::new(addr, module.replication_port()))
}

/// Root paths as configured, in `<replicated>` order (the `RelPath::dir` index).
pub fn replicated_roots(rfs: &crate::config::RfsConfig) -> Vec<PathBuf> {
    rfs.replicated.iter().map(|r| r.dir.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(dir: u16, p: &str) -> RelPath {
        RelPath::new(dir, p).unwrap()
    }

    // `..` and symbolic links on the way never lead out of the root.
    #[test]
    fn dot_dot_and_links_on_the_way_are_refused() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        let outside = base.path().join("outside");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("out")).unwrap();
        let mut r = Receiver::new(vec![root.clone()]).unwrap();
        let e = r.apply(&Op::Mkdir { dir: rel(0, "out/x"), mode: 0o755, uid: 0, gid: 0 }).unwrap_err();
        assert!(e.is_refusal() && e.to_string().contains("symbolic link"), "{e}");
        let e = r.resolve(&rel(0, "out")).and_then(|t| component_name("..", &t.shown)).unwrap_err();
        assert!(e.to_string().contains("`..`"), "{e}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    // A Write to a FIFO in the tree is refused instead of blocking the applier.
    #[test]
    fn writes_to_a_fifo_are_refused() {
        let base = tempfile::tempdir().unwrap();
        let mut r = Receiver::new(vec![base.path().to_path_buf()]).unwrap();
        r.apply(&Op::Mknod { node: rel(0, "fifo"), mode: libc::S_IFIFO | 0o600, rdev: 0, uid: 0, gid: 0 }).unwrap();
        let e = r.apply(&Op::Write { file: rel(0, "fifo"), offset: 0, data: b"x".to_vec() }).unwrap_err();
        assert!(e.is_refusal() && e.to_string().contains("not a regular file"), "{e}");
    }
}
