//! The replication protocol over loopback TCP: a `Sender` (the primary's `OpSink`) ships ops
//! to a receiver `Server` that applies them under temporary directories.
//!
//! No test sleeps to wait: each one waits for a condition (a channel message, a counter, a
//! state) with a deadline.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hamirror::cluster::key::ClusterKey;
use hamirror::config::SyncMode;
use hamirror::replication::channel::{HELLO_BYTES, LENGTH_BYTES, MAC_BYTES};
use hamirror::replication::receiver::{serve, ApplyError, Receiver, ReceiverConfig, ReceiverEvent, Server};
use hamirror::replication::sender::{MemoryTracker, Sender, SenderConfig, ASYNC_LAG_BYTES_MAX};
use hamirror::replication::{Op, OpSink, RelPath, Timestamp};

/// The owner this test creates files with (the mountover and the receiver ship and apply it).
fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}
fn gid() -> u32 {
    nix::unistd::getegid().as_raw()
}

const MODULE_ID: u16 = 7;
/// Long enough that a busy machine never makes a healthy peer look absent.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(20);
/// Short, for the tests where the peer dies.
const DEAD_TIMEOUT: Duration = Duration::from_millis(600);
/// The longest any condition is waited for before the test fails.
const DEADLINE: Duration = Duration::from_secs(60);

fn key(byte: u8) -> ClusterKey {
    ClusterKey::from_bytes([byte; 32])
}

fn rel(dir: u16, path: &str) -> RelPath {
    RelPath::new(dir, path).unwrap()
}

/// Waits until `cond` holds, failing the test after [`DEADLINE`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::yield_now();
        std::thread::park_timeout(Duration::from_millis(2));
    }
}

fn start_receiver(roots: Vec<PathBuf>, key: ClusterKey, configure: impl FnOnce(&mut Receiver)) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut receiver = Receiver::new(roots).unwrap();
    configure(&mut receiver);
    let config = ReceiverConfig { key, module_id: MODULE_ID, node: 1, timeout: HEALTHY_TIMEOUT, on_warning: None };
    serve(listener, config, receiver).unwrap()
}

/// A connected sender, its tracker, and the reasons it gives when it declares the peer absent.
struct Primary {
    sender: Sender,
    tracker: Arc<MemoryTracker>,
    absent: Mutex<mpsc::Receiver<String>>,
}

impl Primary {
    fn try_connect(peer: SocketAddr, key: ClusterKey, mode: SyncMode, timeout: Duration) -> Result<Primary, String> {
        let tracker = Arc::new(MemoryTracker::new());
        let (tx, absent) = mpsc::channel();
        let config = SenderConfig { peer, key, module_id: MODULE_ID, node: 0, mode, timeout };
        let on_absent = Box::new(move |reason: &str| {
            let _ = tx.send(reason.to_string());
        });
        let sender = Sender::connect(config, tracker.clone(), on_absent).map_err(|e| e.to_string())?;
        Ok(Primary { sender, tracker, absent: Mutex::new(absent) })
    }

    fn connect(peer: SocketAddr, mode: SyncMode, timeout: Duration) -> Primary {
        Primary::try_connect(peer, key(1), mode, timeout).unwrap()
    }

    /// The reason given when the peer was declared absent.
    fn absent_reason(&self) -> String {
        self.absent.lock().unwrap().recv_timeout(DEADLINE).expect("the peer was never declared absent")
    }
}

/// Runs `f` on a thread and fails the test if it does not finish within [`DEADLINE`].
fn within_deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("{what} did not return within {DEADLINE:?}"))
}

// ---------------------------------------------------------------------------------------
// Tree comparison: type, mode, owner, size, link count, logical content, link targets, xattrs.

#[derive(Debug, PartialEq, Eq)]
enum Node {
    File { mode: u32, uid: u32, gid: u32, nlink: u64, size: u64, content: u64, xattrs: BTreeMap<String, Vec<u8>> },
    Dir { mode: u32, uid: u32, gid: u32, xattrs: BTreeMap<String, Vec<u8>> },
    Symlink { target: PathBuf, uid: u32, gid: u32 },
    Special { mode: u32, rdev: u64 },
}

/// The user.* extended attributes of `path` itself (not of a link's target).
fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: `cpath` is NUL-terminated and `names` a writable buffer of the given length.
    let len = unsafe { libc::llistxattr(cpath.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(len >= 0, "llistxattr {}: {}", path.display(), io::Error::last_os_error());
    let mut out = BTreeMap::new();
    for name in names[..len as usize].split(|b| *b == 0).filter(|n| n.starts_with(b"user.")) {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: both strings are NUL-terminated and `value` a writable buffer of the given length.
        let n = unsafe { libc::lgetxattr(cpath.as_ptr(), cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        assert!(n >= 0, "lgetxattr: {}", io::Error::last_os_error());
        value.truncate(n as usize);
        out.insert(String::from_utf8(name.to_vec()).unwrap(), value);
    }
    out
}

/// A hash of the logical content: every non-zero 4 KiB block with its offset, read only where
/// the file has data (so a 5 GiB sparse file is cheap, and a hole equals written zeros).
fn content_hash(path: &Path) -> u64 {
    let mut file = File::open(path).unwrap();
    let size = file.metadata().unwrap().len();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut at: i64 = 0;
    let mut block = vec![0u8; 4096];
    while (at as u64) < size {
        // SAFETY: `fd` is open; lseek takes plain integers.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after `at`.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let start = data - data % 4096;
        file.seek(SeekFrom::Start(start as u64)).unwrap();
        let mut offset = start;
        while offset < hole {
            let n = file.read(&mut block).unwrap();
            if n == 0 {
                break;
            }
            if block[..n].iter().any(|b| *b != 0) {
                hasher.update(&offset.to_le_bytes());
                hasher.update(&block[..n]);
            }
            offset += n as i64;
        }
        at = hole.max(offset);
    }
    hasher.update(&size.to_le_bytes());
    hasher.digest()
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let kind = meta.file_type();
            let node = if kind.is_symlink() {
                Node::Symlink { target: fs::read_link(&path).unwrap(), uid: meta.uid(), gid: meta.gid() }
            } else if kind.is_dir() {
                todo.push(path.clone());
                Node::Dir { mode: meta.mode(), uid: meta.uid(), gid: meta.gid(), xattrs: xattrs(&path) }
            } else if kind.is_file() {
                Node::File {
                    mode: meta.mode(),
                    uid: meta.uid(),
                    gid: meta.gid(),
                    nlink: meta.nlink(),
                    size: meta.len(),
                    content: content_hash(&path),
                    xattrs: xattrs(&path),
                }
            } else {
                Node::Special { mode: meta.mode(), rdev: meta.rdev() }
            };
            out.insert(rel, node);
        }
    }
    out
}

/// The ops a tracker is given: all but the flushes.
fn changes(ops: &[Op]) -> Vec<Op> {
    ops.iter().filter(|op| !matches!(op, Op::Fsync { .. })).cloned().collect()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// One of each op, on nested directories, a sparse file past 4 GiB, links and attributes.
fn sample_ops() -> Vec<Op> {
    let t = |secs| Timestamp { secs, nanos: 123_456_789 };
    vec![
        Op::Mkdir { dir: rel(0, "d"), mode: 0o750, uid: uid(), gid: gid() },
        Op::Mkdir { dir: rel(0, "d/e"), mode: 0o700, uid: uid(), gid: gid() },
        Op::Create { file: rel(0, "d/f"), mode: 0o640, uid: uid(), gid: gid() },
        Op::Write { file: rel(0, "d/f"), offset: 0, data: b"hello, replica".to_vec() },
        Op::Create { file: rel(0, "d/e/big.img"), mode: 0o600, uid: uid(), gid: gid() },
        // 3 MiB at 5 GiB: larger than a frame (split by the sender) and beyond 4 GiB.
        Op::Write { file: rel(0, "d/e/big.img"), offset: 5 << 30, data: pattern(3 << 20, 1) },
        Op::Write { file: rel(0, "d/e/big.img"), offset: 4096, data: pattern(8192, 2) },
        Op::Fallocate {
            file: rel(0, "d/e/big.img"),
            mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset: 4096,
            len: 4096,
        },
        Op::Fallocate { file: rel(0, "d/e/big.img"), mode: 0, offset: 1 << 20, len: 1 << 20 },
        Op::Create { file: rel(0, "t"), mode: 0o644, uid: uid(), gid: gid() },
        Op::Write { file: rel(0, "t"), offset: 0, data: pattern(100_000, 3) },
        Op::Truncate { file: rel(0, "t"), size: 50_000 },
        Op::Symlink { link: rel(0, "abs"), target: "/etc/passwd".into(), uid: uid(), gid: gid() },
        Op::Symlink { link: rel(0, "d/rel"), target: "../t".into(), uid: uid(), gid: gid() },
        Op::Link { existing: rel(0, "d/f"), new: rel(0, "d/e/hard") },
        Op::Mknod { node: rel(0, "fifo"), mode: libc::S_IFIFO | 0o620, rdev: 0, uid: uid(), gid: gid() },
        Op::Create { file: rel(0, "gone"), mode: 0o600, uid: uid(), gid: gid() },
        Op::Unlink { file: rel(0, "gone") },
        Op::Mkdir { dir: rel(0, "empty"), mode: 0o755, uid: uid(), gid: gid() },
        Op::Rmdir { dir: rel(0, "empty") },
        Op::Create { file: rel(0, "old"), mode: 0o600, uid: uid(), gid: gid() },
        Op::Write { file: rel(0, "old"), offset: 0, data: b"renamed".to_vec() },
        Op::Rename { from: rel(0, "old"), to: rel(0, "d/new"), flags: 0 },
        Op::SetAttr {
            path: rel(0, "d/f"),
            mode: Some(0o4711),
            uid: Some(1234),
            gid: Some(5678),
            atime: Some(t(1_000_000)),
            mtime: Some(t(2_000_000)),
        },
        Op::SetAttr { path: rel(0, "abs"), mode: None, uid: Some(42), gid: Some(43), atime: None, mtime: None },
        Op::SetXattr { path: rel(0, "d/f"), name: "user.color".into(), value: b"blue".to_vec(), flags: 0 },
        Op::SetXattr { path: rel(0, "d"), name: "user.dir".into(), value: vec![0, 1, 2, 255], flags: 0 },
        Op::SetXattr { path: rel(0, "t"), name: "user.tmp".into(), value: b"x".to_vec(), flags: 0 },
        Op::RemoveXattr { path: rel(0, "t"), name: "user.tmp".into() },
        Op::SetAttr { path: rel(0, ""), mode: Some(0o711), uid: None, gid: None, atime: None, mtime: None },
        Op::Fsync { file: Some(rel(0, "d/f")), datasync: false },
    ]
}

// Every kind of op, shipped over the network and applied, gives the same tree as applying the
// ops locally: bytes, holes, modes, owners, link targets, hard links, FIFOs and xattrs.
#[test]
fn ops_applied_by_the_receiver_give_an_identical_tree() {
    let base = tempfile::tempdir().unwrap();
    let (local, remote) = (base.path().join("primary"), base.path().join("secondary"));
    fs::create_dir(&local).unwrap();
    fs::create_dir(&remote).unwrap();
    let mut reference = Receiver::new(vec![local.clone()]).unwrap();
    let server = start_receiver(vec![remote.clone()], key(1), |_| {});
    let primary = Primary::connect(server.local_addr(), SyncMode::Sync, HEALTHY_TIMEOUT);

    let mut last = 0;
    for op in sample_ops() {
        reference.apply(&op).unwrap();
        last = primary.sender.submit(op);
    }
    primary.sender.wait_durable(last).unwrap();
    assert!(!primary.sender.is_absent());
    assert_eq!(primary.sender.status().durable_upto, last);
    // Before anything reads the file (a read may move its atime).
    let f = fs::metadata(remote.join("d/f")).unwrap();
    assert_eq!(
        (f.mtime(), f.mtime_nsec(), f.atime(), f.atime_nsec()),
        (2_000_000, 123_456_789, 1_000_000, 123_456_789)
    );

    let (want, got) = (snapshot(&local), snapshot(&remote));
    assert_eq!(want, got);
    assert_eq!(fs::read(remote.join("d/f")).unwrap(), b"hello, replica");
    assert_eq!(fs::read(remote.join("d/new")).unwrap(), b"renamed");
    assert_eq!(fs::read_link(remote.join("abs")).unwrap(), Path::new("/etc/passwd"));
    let f = fs::metadata(remote.join("d/f")).unwrap();
    assert_eq!((f.mode() & 0o7777, f.uid(), f.gid(), f.nlink()), (0o4711, 1234, 5678, 2));
    assert_eq!(fs::metadata(remote.join("d/e/big.img")).unwrap().len(), (5 << 30) + (3 << 20));
    assert!(fs::symlink_metadata(remote.join("fifo")).unwrap().file_type().is_fifo());
    assert_eq!(xattrs(&remote.join("d/f")).get("user.color").map(Vec::as_slice), Some(&b"blue"[..]));
    assert!(xattrs(&remote.join("t")).is_empty());
    assert_eq!(fs::metadata(&remote).unwrap().permissions().mode() & 0o7777, 0o711);
    let counts = server.counters().counts();
    assert_eq!((counts.connections, counts.refused_ops, counts.apply_errors, counts.bad_frames), (1, 0, 0, 0));
    assert!(primary.tracker.ops().is_empty(), "nothing is tracked while the peer keeps up");
}

/// Holds the receiver's applier at chosen ops and records its events.
#[derive(Default)]
struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
    log: Mutex<Vec<String>>,
    applying: AtomicU64,
}

impl Gate {
    fn closed() -> Arc<Gate> {
        let gate = Arc::new(Gate::default());
        *gate.closed.lock().unwrap() = true;
        gate
    }
    fn open(&self) {
        self.record("gate opened".into());
        *self.closed.lock().unwrap() = false;
        self.opened.notify_all();
    }
    fn record(&self, line: String) {
        self.log.lock().unwrap().push(line);
    }
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    /// The observer: records, and blocks every op while the gate is closed.
    fn observer(self: &Arc<Gate>) -> impl Fn(ReceiverEvent) + Send + Sync + 'static {
        let gate = Arc::clone(self);
        move |event| match event {
            ReceiverEvent::Applying { seq } => {
                gate.applying.store(seq, Ordering::SeqCst);
                let mut closed = gate.closed.lock().unwrap();
                while *closed {
                    closed = gate.opened.wait(closed).unwrap();
                }
            }
            ReceiverEvent::Synced { seq } => gate.record(format!("synced {seq}")),
        }
    }
}

// In sync mode wait_durable returns only after the receiver flushed the op to disk: for an
// explicit Fsync op, and for a plain write (an O_DIRECT-style sync point) too.
#[test]
fn sync_mode_wait_durable_returns_only_after_the_receiver_flushed() {
    let base = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let observer = gate.observer();
    let server = start_receiver(vec![base.path().to_path_buf()], key(1), |r| r.set_observer(observer));
    let primary = Arc::new(Primary::connect(server.local_addr(), SyncMode::Sync, HEALTHY_TIMEOUT));

    let sender = &primary.sender;
    sender.submit(Op::Create { file: rel(0, "f"), mode: 0o600, uid: uid(), gid: gid() });
    sender.submit(Op::Write { file: rel(0, "f"), offset: 0, data: b"one".to_vec() });
    let counters = server.counters();
    wait_until("the first two ops are applied", || counters.counts().ops_applied == 2);
    // Close the gate before the fsync goes out, so the receiver is held right at it.
    *gate.closed.lock().unwrap() = true;
    let fsync = sender.submit(Op::Fsync { file: Some(rel(0, "f")), datasync: false });
    let waiter = {
        let (primary, gate) = (Arc::clone(&primary), Arc::clone(&gate));
        std::thread::spawn(move || {
            primary.sender.wait_durable(fsync).unwrap();
            gate.record("wait_durable returned".into());
        })
    };
    wait_until("the receiver holds the fsync", || gate.applying.load(Ordering::SeqCst) == fsync);
    assert!(!gate.log().iter().any(|l| l.contains("returned")), "returned before the peer flushed: {:?}", gate.log());
    gate.open();
    within_deadline("wait_durable", move || waiter.join().unwrap());
    assert_eq!(gate.log(), vec!["gate opened".to_string(), format!("synced {fsync}"), "wait_durable returned".into()]);
    assert_eq!(fs::read(base.path().join("f")).unwrap(), b"one");

    // A write waited on directly: the sender adds a flush of its own and waits for it.
    let write = sender.submit(Op::Write { file: rel(0, "f"), offset: 3, data: b"two".to_vec() });
    sender.wait_durable(write).unwrap();
    let log = gate.log();
    let synced_after_write =
        log.iter().filter_map(|l| l.strip_prefix("synced ")).any(|s| s.parse::<u64>().unwrap() > write);
    assert!(synced_after_write, "no flush covering the write: {log:?}");
    assert_eq!(fs::read(base.path().join("f")).unwrap(), b"onetwo");
    assert!(sender.status().durable_upto > write);
}

// In async mode wait_durable returns while the peer trails by less than the lag bound, and
// waits for the peer once the lag would exceed it; lag() reports the trail.
#[test]
fn async_mode_returns_at_once_within_the_lag_bound_and_waits_beyond_it() {
    let base = tempfile::tempdir().unwrap();
    let gate = Gate::closed();
    let observer = gate.observer();
    let server = start_receiver(vec![base.path().to_path_buf()], key(1), |r| r.set_observer(observer));
    let primary = Arc::new(Primary::connect(server.local_addr(), SyncMode::Async, HEALTHY_TIMEOUT));
    let sender = &primary.sender;
    let mib = 1usize << 20;

    sender.submit(Op::Create { file: rel(0, "f"), mode: 0o600, uid: uid(), gid: gid() });
    let mut last = 0;
    for i in 0..4 {
        last = sender.submit(Op::Write { file: rel(0, "f"), offset: (i * mib) as u64, data: pattern(mib, i as u8) });
    }
    sender.wait_durable(last).unwrap();
    let lag = sender.lag();
    assert_eq!(server.counters().counts().ops_applied, 0, "the receiver is held: nothing is applied yet");
    assert!(lag.bytes >= 4 << 20 && lag.bytes <= ASYNC_LAG_BYTES_MAX, "{lag:?}");
    assert_eq!(lag.ops, 5);
    assert!(lag.oldest_ms.is_some());

    let more = (ASYNC_LAG_BYTES_MAX as usize / mib) + 1;
    for i in 4..4 + more {
        last = sender.submit(Op::Write { file: rel(0, "f"), offset: (i * mib) as u64, data: pattern(mib, i as u8) });
    }
    assert!(sender.lag().bytes > ASYNC_LAG_BYTES_MAX);
    let waiter = {
        let (primary, gate) = (Arc::clone(&primary), Arc::clone(&gate));
        std::thread::spawn(move || {
            primary.sender.wait_durable(last).unwrap();
            gate.record("wait_durable returned".into());
        })
    };
    assert!(gate.log().is_empty(), "returned beyond the lag bound: {:?}", gate.log());
    gate.open();
    within_deadline("wait_durable", move || waiter.join().unwrap());
    let log: Vec<String> = gate.log().into_iter().filter(|l| !l.starts_with("synced")).collect();
    assert_eq!(log, vec!["gate opened", "wait_durable returned"]);
    assert!(sender.lag().bytes <= ASYNC_LAG_BYTES_MAX);
    wait_until("the peer caught up", || sender.lag().ops == 0);
    assert_eq!(fs::metadata(base.path().join("f")).unwrap().len(), ((4 + more) * mib) as u64);
    assert!(!sender.is_absent());
}

// A peer with another cluster key is refused at the handshake, counted, and gets nothing
// applied; the sender's error says why.
#[test]
fn a_peer_with_another_cluster_key_is_refused_at_the_handshake() {
    let base = tempfile::tempdir().unwrap();
    let server = start_receiver(vec![base.path().to_path_buf()], key(1), |_| {});
    let error = Primary::try_connect(server.local_addr(), key(2), SyncMode::Sync, HEALTHY_TIMEOUT)
        .err()
        .expect("connected with the wrong key");
    assert!(error.contains("different cluster key"), "{error}");
    let counters = server.counters();
    wait_until("the refusal is counted", || counters.counts().refused_auth == 1);
    let counts = counters.counts();
    assert_eq!((counts.connections, counts.ops_applied), (0, 0));
    assert_eq!(fs::read_dir(base.path()).unwrap().count(), 0);
    // The right key still gets in afterwards.
    let primary = Primary::connect(server.local_addr(), SyncMode::Sync, HEALTHY_TIMEOUT);
    let seq = primary.sender.submit(Op::Create { file: rel(0, "ok"), mode: 0o600, uid: uid(), gid: gid() });
    primary.sender.wait_durable(seq).unwrap();
    assert!(base.path().join("ok").exists());
}

/// A TCP proxy between the sender and the receiver that can flip one byte of the sender's
/// stream or swallow everything (a frozen peer).
struct Proxy {
    addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: SocketAddr, flip_at: Option<u64>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let hole = Arc::clone(&blackhole);
        std::thread::spawn(move || {
            let Ok((client, _)) = listener.accept() else { return };
            let server = TcpStream::connect(upstream).unwrap();
            let pump = |mut from: TcpStream, mut to: TcpStream, flip_at: Option<u64>, hole: Arc<AtomicBool>| {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut offset = 0u64;
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if let Some(at) = flip_at {
                            if (offset..offset + n as u64).contains(&at) {
                                buf[(at - offset) as usize] ^= 0x40;
                            }
                        }
                        offset += n as u64;
                        if hole.load(Ordering::SeqCst) {
                            continue;
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            };
            pump(client.try_clone().unwrap(), server.try_clone().unwrap(), flip_at, Arc::clone(&hole));
            pump(server, client, None, hole);
        });
        Proxy { addr, blackhole }
    }
}

// A frame altered on the way fails authentication: the receiver drops the connection and
// applies nothing of it, and the sender declares the peer absent and tracks the ops.
#[test]
fn a_corrupted_frame_drops_the_connection_and_changes_nothing() {
    let base = tempfile::tempdir().unwrap();
    let server = start_receiver(vec![base.path().to_path_buf()], key(1), |_| {});
    // A byte inside the ciphertext of the first frame after the handshake.
    let first_frame = (HELLO_BYTES + MAC_BYTES + LENGTH_BYTES) as u64;
    let proxy = Proxy::start(server.local_addr(), Some(first_frame + 5));
    let primary = Primary::connect(proxy.addr, SyncMode::Sync, HEALTHY_TIMEOUT);
    let ops = vec![
        Op::Create { file: rel(0, "f"), mode: 0o600, uid: uid(), gid: gid() },
        Op::Write { file: rel(0, "f"), offset: 0, data: b"data".to_vec() },
        Op::Fsync { file: None, datasync: false },
    ];
    let mut last = 0;
    for op in ops.clone() {
        last = primary.sender.submit(op);
    }
    let reason = primary.absent_reason();
    assert!(reason.contains("closed") || reason.contains("failed"), "{reason}");
    primary.sender.wait_durable(last).unwrap();
    assert_eq!(primary.tracker.ops(), changes(&ops), "every change not durable on the peer is tracked, in order");
    assert_eq!(primary.sender.status().durable_upto, 0);
    let counters = server.counters();
    wait_until("the bad frame is counted", || counters.counts().bad_frames == 1);
    assert_eq!(counters.counts().ops_applied, 0);
    assert_eq!(fs::read_dir(base.path()).unwrap().count(), 0);
}

/// A root holding links that point out of it, and the directory they point to.
struct EscapeFixture {
    _base: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

impl EscapeFixture {
    fn new() -> EscapeFixture {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        let outside = base.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), b"safe").unwrap();
        fs::set_permissions(outside.join("victim"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("out")).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), root.join("file_out")).unwrap();
        std::os::unix::fs::symlink("/", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("up")).unwrap();
        EscapeFixture { _base: base, root, outside }
    }

    fn outside_unchanged(&self) {
        let names: Vec<_> = fs::read_dir(&self.outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("victim")]);
        let victim = self.outside.join("victim");
        assert_eq!(fs::read(&victim).unwrap(), b"safe");
        let meta = fs::metadata(&victim).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.uid(), meta.nlink()), (0o600, 0, 1));
        assert!(xattrs(&victim).is_empty());
    }
}

// No op reaches outside the root through a link in the tree (relative, absolute, to a
// directory or to a file), nor through a `..` smuggled into a decoded path: each is refused
// or touches only the link itself.
#[test]
fn path_escapes_through_links_are_refused_and_nothing_outside_changes() {
    let fx = EscapeFixture::new();
    let mut receiver = Receiver::new(vec![fx.root.clone()]).unwrap();
    let refused = [
        Op::Create { file: rel(0, "out/new"), mode: 0o600, uid: uid(), gid: gid() },
        Op::Write { file: rel(0, "out/victim"), offset: 0, data: b"owned".to_vec() },
        Op::Truncate { file: rel(0, "up/victim"), size: 0 },
        Op::Write { file: rel(0, "abs/tmp/escape"), offset: 0, data: b"x".to_vec() },
        Op::Mkdir { dir: rel(0, "out/d"), mode: 0o777, uid: uid(), gid: gid() },
        Op::Symlink { link: rel(0, "out/l"), target: "x".into(), uid: uid(), gid: gid() },
        Op::Mknod { node: rel(0, "out/n"), mode: libc::S_IFIFO | 0o600, rdev: 0, uid: uid(), gid: gid() },
        Op::Unlink { file: rel(0, "out/victim") },
        Op::Rename { from: rel(0, "out/victim"), to: rel(0, "stolen"), flags: 0 },
        Op::Rename { from: rel(0, "stolen"), to: rel(0, "out/planted"), flags: 0 },
        Op::Link { existing: rel(0, "out/victim"), new: rel(0, "hard") },
        Op::Write { file: rel(0, "file_out"), offset: 0, data: b"owned".to_vec() },
        Op::Truncate { file: rel(0, "file_out"), size: 0 },
        Op::Fallocate { file: rel(0, "file_out"), mode: 0, offset: 0, len: 4096 },
        Op::Create { file: rel(0, "file_out"), mode: 0o666, uid: uid(), gid: gid() },
        Op::SetAttr { path: rel(0, "out/victim"), mode: Some(0o777), uid: None, gid: None, atime: None, mtime: None },
        Op::SetXattr { path: rel(0, "out/victim"), name: "user.x".into(), value: b"1".to_vec(), flags: 0 },
    ];
    for op in &refused {
        let e = receiver.apply(op).expect_err(&format!("{op:?} was applied"));
        assert!(e.is_refusal(), "{op:?}: {e}");
        assert!(e.to_string().contains("symbolic link"), "{op:?}: {e}");
    }
    // On the link itself: allowed, and the target is untouched.
    let on_the_link = [
        Op::SetAttr {
            path: rel(0, "file_out"),
            mode: Some(0o777),
            uid: Some(99),
            gid: Some(99),
            atime: None,
            mtime: None,
        },
        Op::Link { existing: rel(0, "file_out"), new: rel(0, "link_to_link") },
    ];
    for op in &on_the_link {
        receiver.apply(op).unwrap();
    }
    // A user xattr cannot be set on a link: an error, never a write to the target.
    let e = receiver
        .apply(&Op::SetXattr { path: rel(0, "file_out"), name: "user.x".into(), value: b"1".to_vec(), flags: 0 })
        .unwrap_err();
    assert!(!e.is_refusal(), "{e}");
    // A `..` smuggled into an encoded path does not even decode: decoding goes through
    // RelPath::new.
    #[derive(serde::Serialize)]
    struct Forged<'a> {
        dir: u16,
        path: &'a str,
    }
    for bad in ["../outside/victim", "/etc/passwd", "a/../../x", "./x", "a//b"] {
        let e = postcard::from_bytes::<RelPath>(&postcard::to_allocvec(&Forged { dir: 0, path: bad }).unwrap())
            .expect_err(bad);
        assert!(
            e.to_string().contains("invalid replicated path") || matches!(e, postcard::Error::SerdeDeCustom),
            "{bad}: {e}"
        );
    }
    fx.outside_unchanged();
    assert_eq!(fs::symlink_metadata(fx.root.join("file_out")).unwrap().uid(), 99);
}

// Over the network, a path escape is answered with an error: the sender declares the peer
// absent and tracks the op, the receiver counts the refusal, and nothing outside changes.
#[test]
fn a_path_escape_over_the_network_is_refused_and_counted() {
    let fx = EscapeFixture::new();
    let server = start_receiver(vec![fx.root.clone()], key(1), |_| {});
    let primary = Primary::connect(server.local_addr(), SyncMode::Sync, HEALTHY_TIMEOUT);
    let escape = Op::Write { file: rel(0, "out/victim"), offset: 0, data: b"owned".to_vec() };
    let seq = primary.sender.submit(escape.clone());
    primary.sender.wait_durable(seq).unwrap();
    let reason = primary.absent_reason();
    assert!(
        reason.contains(&format!("could not apply operation {seq}")) && reason.contains("symbolic link"),
        "{reason}"
    );
    assert_eq!(primary.tracker.ops(), vec![escape]);
    assert_eq!(server.counters().counts().refused_ops, 1);
    fx.outside_unchanged();
}

// An op for a replicated directory the receiver does not have is refused, with a sentence
// naming the index, and nothing is written.
#[test]
fn an_unknown_directory_index_is_refused() {
    let base = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::new(vec![base.path().to_path_buf()]).unwrap();
    let e = receiver.apply(&Op::Create { file: rel(3, "f"), mode: 0o600, uid: uid(), gid: gid() }).unwrap_err();
    assert!(matches!(e, ApplyError::UnknownDir { dir: 3, count: 1 }), "{e}");
    assert!(e.to_string().contains("replicated directory #3"), "{e}");

    let server = start_receiver(vec![base.path().to_path_buf()], key(1), |_| {});
    let primary = Primary::connect(server.local_addr(), SyncMode::Sync, HEALTHY_TIMEOUT);
    primary.sender.submit(Op::Create { file: rel(0, "fine"), mode: 0o600, uid: uid(), gid: gid() });
    let seq = primary.sender.submit(Op::Create { file: rel(3, "f"), mode: 0o600, uid: uid(), gid: gid() });
    let after = primary.sender.submit(Op::Create { file: rel(0, "after"), mode: 0o600, uid: uid(), gid: gid() });
    primary.sender.wait_durable(after).unwrap();
    let reason = primary.absent_reason();
    assert!(reason.contains(&format!("operation {seq}")) && reason.contains("#3"), "{reason}");
    assert_eq!(server.counters().counts().refused_ops, 1);
    assert!(base.path().join("fine").exists());
    assert!(!base.path().join("after").exists(), "nothing after a refused op is applied");
}

/// A small tmpfs mounted for the test, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: PathBuf, size: &str) -> io::Result<SmallDisk> {
        fs::create_dir_all(&path)?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()?;
        if !status.success() {
            return Err(io::Error::other(format!("mount failed: {status}")));
        }
        Ok(SmallDisk { path })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

// A full disk on the secondary (ENOSPC) comes back as an error: the sender declares the peer
// absent, tracks every op not durable there, and no ack is faked.
#[test]
fn a_full_disk_on_the_receiver_makes_the_sender_go_alone_and_track() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(base.path().join("small"), "256k").unwrap();
    let server = start_receiver(vec![disk.path.clone()], key(1), |_| {});
    let primary = Primary::connect(server.local_addr(), SyncMode::Sync, HEALTHY_TIMEOUT);
    let ops = vec![
        Op::Create { file: rel(0, "f"), mode: 0o600, uid: uid(), gid: gid() },
        Op::Write { file: rel(0, "f"), offset: 0, data: pattern(1 << 20, 9) },
        Op::Fsync { file: Some(rel(0, "f")), datasync: false },
    ];
    let mut last = 0;
    for op in ops.clone() {
        last = primary.sender.submit(op);
    }
    let sender = &primary.sender;
    sender.wait_durable(last).unwrap();
    let reason = primary.absent_reason();
    assert!(reason.contains("operation 2") && reason.contains("No space left"), "{reason}");
    assert_eq!(primary.tracker.ops(), changes(&ops));
    let status = sender.status();
    assert_eq!(status.durable_upto, 0, "no durable ack was given for anything");
    assert!(status.applied_upto < 2, "the write was never acknowledged");
    assert_eq!(server.counters().counts().apply_errors, 1);
    // Later ops go straight to the tracker.
    let later = sender.submit(Op::Truncate { file: rel(0, "f"), size: 0 });
    sender.wait_durable(later).unwrap();
    assert_eq!(primary.tracker.ops().len(), 3);
    drop(server);
    drop(disk);
}

// A receiver that dies (its server stopped) is declared absent within the timeout, and
// wait_durable then returns at once with the ops tracked.
#[test]
fn a_dead_receiver_is_declared_absent_and_wait_durable_does_not_hang() {
    let base = tempfile::tempdir().unwrap();
    let server = start_receiver(vec![base.path().to_path_buf()], key(1), |_| {});
    let primary = Arc::new(Primary::connect(server.local_addr(), SyncMode::Sync, DEAD_TIMEOUT));
    let seq = primary.sender.submit(Op::Create { file: rel(0, "f"), mode: 0o600, uid: uid(), gid: gid() });
    primary.sender.wait_durable(seq).unwrap();
    server.stop();
    let reason = primary.absent_reason();
    assert!(reason.contains("closed") || reason.contains("failed"), "{reason}");
    let write = Op::Write { file: rel(0, "f"), offset: 0, data: b"after death".to_vec() };
    let p = Arc::clone(&primary);
    within_deadline("wait_durable after death", move || {
        let seq = p.sender.submit(write);
        p.sender.wait_durable(seq).unwrap();
    });
    assert_eq!(primary.tracker.ops().len(), 1);
}

// A peer that freezes (the connection stays open, nothing comes back) is declared absent
// after the timeout, and a wait_durable already blocked on it returns.
#[test]
fn a_frozen_receiver_is_declared_absent_after_the_timeout() {
    let base = tempfile::tempdir().unwrap();
    let server = start_receiver(vec![base.path().to_path_buf()], key(1), |_| {});
    let proxy = Proxy::start(server.local_addr(), None);
    let primary = Arc::new(Primary::connect(proxy.addr, SyncMode::Sync, DEAD_TIMEOUT));
    let first = primary.sender.submit(Op::Create { file: rel(0, "f"), mode: 0o600, uid: uid(), gid: gid() });
    primary.sender.wait_durable(first).unwrap();
    proxy.blackhole.store(true, Ordering::SeqCst);
    let write = Op::Write { file: rel(0, "f"), offset: 0, data: b"frozen".to_vec() };
    let started = Instant::now();
    let p = Arc::clone(&primary);
    let tracked = write.clone();
    within_deadline("wait_durable on a frozen peer", move || {
        let seq = p.sender.submit(write);
        p.sender.wait_durable(seq).unwrap();
    });
    let waited = started.elapsed();
    assert!(waited >= DEAD_TIMEOUT / 2, "gave up after {waited:?}, before the timeout");
    let reason = primary.absent_reason();
    assert!(reason.contains("timeout") || reason.contains("nothing was heard"), "{reason}");
    assert!(primary.tracker.ops().contains(&tracked));
    assert!(!base.path().join("f").metadata().map(|m| m.len() > 0).unwrap_or(false));
}

// A second authenticated connection replaces the first: the old sender's peer goes absent,
// the new one replicates.
#[test]
fn a_new_connection_replaces_the_old_one() {
    let base = tempfile::tempdir().unwrap();
    let server = start_receiver(vec![base.path().to_path_buf()], key(1), |_| {});
    let old = Primary::connect(server.local_addr(), SyncMode::Sync, HEALTHY_TIMEOUT);
    let seq = old.sender.submit(Op::Create { file: rel(0, "old"), mode: 0o600, uid: uid(), gid: gid() });
    old.sender.wait_durable(seq).unwrap();
    let new = Primary::connect(server.local_addr(), SyncMode::Sync, HEALTHY_TIMEOUT);
    let reason = old.absent_reason();
    assert!(reason.contains("closed") || reason.contains("failed"), "{reason}");
    let seq = new.sender.submit(Op::Create { file: rel(0, "new"), mode: 0o600, uid: uid(), gid: gid() });
    new.sender.wait_durable(seq).unwrap();
    assert!(base.path().join("new").exists());
    assert!(!new.sender.is_absent());
    assert_eq!(server.counters().counts().connections, 2);
}

// Nothing listening: connect fails at once with a sentence, and alone() tracks instead.
#[test]
fn an_unreachable_peer_is_an_error_and_alone_tracks() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let error =
        Primary::try_connect(port, key(1), SyncMode::Sync, HEALTHY_TIMEOUT).err().expect("connected to nothing");
    assert!(error.contains("connection failed"), "{error}");
    let tracker = Arc::new(MemoryTracker::new());
    let sender = Sender::alone(SyncMode::Sync, tracker.clone(), "the peer is unreachable");
    let seq = sender.submit(Op::Create { file: rel(0, "f"), mode: 0o600, uid: uid(), gid: gid() });
    sender.wait_durable(seq).unwrap();
    assert_eq!(tracker.ops().len(), 1);
}
