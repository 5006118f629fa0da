//! The replication sender on the primary: an [`OpSink`] that ships the mountover's ops to the
//! peer's receiver over one authenticated, encrypted connection, pipelined.
//!
//! `submit` numbers the op, checksums it and queues it; a writer thread sends the queue, a
//! reader thread takes the acks. An op stays queued until the peer says it is durable, so
//! whatever the peer might still lose can be handed to the [`Tracker`] (the dirty-zone maps)
//! if the peer goes away. The queue is bounded by [`IN_FLIGHT_BYTES_MAX`]: beyond it `submit`
//! waits for acks. The sender adds an `Fsync` op of its own every [`FLUSH_EVERY_BYTES`] and
//! when the queue has been idle for a while, so the peer's durable point keeps moving even
//! when the application never flushes.
//!
//! `wait_durable(seq)`: in `sync` mode, returns once the peer acknowledged `seq` as durable
//! (adding an `Fsync` op if none is queued after `seq`); in `async` mode, once the ops not yet
//! applied by the peer weigh at most [`ASYNC_LAG_BYTES_MAX`].
//!
//! The peer is declared absent when it cannot be reached, sends an error, breaks the
//! connection, sends nothing for the timeout (the heartbeat timeout; the sender pings four
//! times per timeout), or leaves an op unapplied for the timeout. Then, once: the connection
//! is closed, the handler given at construction is called (the daemon turns it into an event
//! of the module's state machine: the primary goes ALONE), every op not acknowledged as
//! durable is handed to the tracker in order, and from then on every op is tracked as it is
//! submitted and `wait_durable` returns as soon as it is recorded. Nothing blocks longer than
//! the timeout. A `Sender` serves one connection; a new pairing (after the resync) builds a
//! new one.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::channel::{self, op_checksum, ChannelError, Identity, Message, WRITE_DATA_BYTES_MAX};
use super::{Op, OpSink};
use crate::cluster::key::ClusterKey;
use crate::config::SyncMode;

/// Bytes of ops queued and not yet durable on the peer; `submit` waits beyond this.
pub const IN_FLIGHT_BYTES_MAX: u64 = 64 << 20;
/// In `async` mode, `wait_durable` returns once the ops not yet applied by the peer weigh at
/// most this.
pub const ASYNC_LAG_BYTES_MAX: u64 = 8 << 20;
/// The sender queues an `Fsync` of its own after this many bytes without one.
pub const FLUSH_EVERY_BYTES: u64 = 16 << 20;
/// Most bytes of ops the writer takes from the queue at once (then it flushes the socket).
pub const SEND_BATCH_BYTES_MAX: u64 = 4 << 20;
/// Weight of an op beyond its data, for the byte bounds.
const OP_OVERHEAD_BYTES: u64 = 64;

/// Records what the peer misses while it is absent, for the later resync: the dirty-zone
/// maps. `track` returns once the record is persisted. It is given every op but `Fsync`
/// (which changes nothing a resync would copy), in submission order.
pub trait Tracker: Send + Sync {
    fn track(&self, op: &Op) -> io::Result<()>;
}

/// A [`Tracker`] that keeps the ops in memory (tests, and a stand-in until the dirty-zone maps
/// exist). It can be told to fail.
#[derive(Debug, Default)]
pub struct MemoryTracker {
    ops: Mutex<Vec<Op>>,
    failing: AtomicBool,
}

impl MemoryTracker {
    pub fn new() -> MemoryTracker {
        MemoryTracker::default()
    }
    /// The ops tracked so far, in order.
    pub fn ops(&self) -> Vec<Op> {
        lock(&self.ops).clone()
    }
    /// From now on, `track` fails (`true`) or succeeds (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }
}

impl Tracker for MemoryTracker {
    fn track(&self, op: &Op) -> io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(io::Error::other("the test tracker was told to fail"));
        }
        lock(&self.ops).push(op.clone());
        Ok(())
    }
}

/// Where and how to replicate.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// The peer's receiver (see [`super::receiver::replication_addr`]).
    pub peer: SocketAddr,
    pub key: ClusterKey,
    pub module_id: u16,
    /// This node's index (0 or 1).
    pub node: u8,
    pub mode: SyncMode,
    /// The heartbeat timeout: the longest the sender waits for the peer before declaring it
    /// absent.
    pub timeout: Duration,
}

/// Called once, with one sentence, when the peer is declared absent. It runs on whichever
/// thread noticed (a sender thread or an application thread): it must return quickly.
pub type AbsentHandler = Box<dyn Fn(&str) + Send + Sync>;

/// Whether ops reach the peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Connected,
    /// Ops are tracked for the resync; `reason` is one sentence.
    Absent {
        reason: String,
    },
}

/// How far the peer trails: ops submitted but not yet applied by it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lag {
    pub ops: u64,
    pub bytes: u64,
    /// Age of the oldest op not yet applied, in milliseconds.
    pub oldest_ms: Option<u64>,
}

/// A snapshot of the sender for `status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SenderStatus {
    pub link: LinkState,
    /// Highest sequence number handed out.
    pub submitted_upto: u64,
    /// Every op up to this one is applied on the peer.
    pub applied_upto: u64,
    /// Every op up to this one is durable on the peer.
    pub durable_upto: u64,
    pub lag: Lag,
    /// Bytes queued and not yet durable on the peer.
    pub in_flight_bytes: u64,
}

struct Entry {
    seq: u64,
    op: Arc<Op>,
    checksum: u64,
    bytes: u64,
    submitted: Instant,
}

struct State {
    /// Sequence number of the next op (the first is 1).
    next_seq: u64,
    /// Ops not yet durable on the peer, in order, with consecutive sequence numbers.
    entries: VecDeque<Entry>,
    entries_bytes: u64,
    /// Bytes of the entries not yet applied on the peer.
    unapplied_bytes: u64,
    next_to_send: u64,
    applied_upto: u64,
    durable_upto: u64,
    /// Highest sequence number of a queued `Fsync`.
    fsync_queued_upto: u64,
    /// Bytes queued since the last `Fsync`.
    unflushed_bytes: u64,
    absent: Option<String>,
    /// The sender is being dropped: no handler call.
    closing: bool,
    /// Ops to hand to the tracker, in order.
    to_track: VecDeque<Entry>,
    last_heard: Instant,
    last_sent: Instant,
    ping_id: u64,
}

impl State {
    fn new(now: Instant, absent: Option<String>) -> State {
        State {
            next_seq: 1,
            entries: VecDeque::new(),
            entries_bytes: 0,
            unapplied_bytes: 0,
            next_to_send: 1,
            applied_upto: 0,
            durable_upto: 0,
            fsync_queued_upto: 0,
            unflushed_bytes: 0,
            absent,
            closing: false,
            to_track: VecDeque::new(),
            last_heard: now,
            last_sent: now,
            ping_id: 0,
        }
    }

    /// Index in `entries` of sequence number `seq` (which must be queued).
    fn index(&self, seq: u64) -> Option<usize> {
        let front = self.entries.front()?.seq;
        let index = usize::try_from(seq.checked_sub(front)?).ok()?;
        (index < self.entries.len()).then_some(index)
    }

    /// The oldest op the peer has not applied yet.
    fn oldest_unapplied(&self) -> Option<&Entry> {
        self.index(self.applied_upto + 1).and_then(|i| self.entries.get(i))
    }

    fn push(&mut self, op: Op, checksum: u64, bytes: u64, now: Instant) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let is_fsync = matches!(op, Op::Fsync { .. });
        let entry = Entry { seq, op: Arc::new(op), checksum, bytes, submitted: now };
        if self.absent.is_some() {
            self.to_track.push_back(entry);
            return seq;
        }
        if is_fsync {
            self.fsync_queued_upto = seq;
            self.unflushed_bytes = 0;
        } else {
            self.unflushed_bytes += bytes;
        }
        self.entries_bytes += bytes;
        self.unapplied_bytes += bytes;
        self.entries.push_back(entry);
        seq
    }

    /// Queues an `Fsync` of the sender's own, covering everything queued.
    fn push_flush(&mut self, now: Instant) -> u64 {
        let op = Op::Fsync { file: None, datasync: true };
        let checksum = op_checksum(&op);
        self.push(op, checksum, OP_OVERHEAD_BYTES, now)
    }

    fn lag(&self, now: Instant) -> Lag {
        if self.absent.is_some() {
            return Lag::default();
        }
        Lag {
            ops: (self.next_seq - 1).saturating_sub(self.applied_upto),
            bytes: self.unapplied_bytes,
            oldest_ms: self
                .oldest_unapplied()
                .map(|e| u64::try_from(now.duration_since(e.submitted).as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

struct Inner {
    mode: SyncMode,
    timeout: Duration,
    peer: String,
    module_id: u16,
    tracker: Arc<dyn Tracker>,
    state: Mutex<State>,
    /// Acks, absence: wakes submitters and waiters.
    changed: Condvar,
    /// New ops: wakes the writer.
    work: Condvar,
    /// Serializes the tracker calls, so ops are tracked in order; holds the lowest sequence
    /// number whose tracking failed.
    tracking: Mutex<Option<u64>>,
    on_absent: Option<AbsentHandler>,
    stream: Option<TcpStream>,
}

/// A poisoned lock only means another thread panicked while holding it: keep going.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often the threads and waiters check the deadlines.
fn tick(timeout: Duration) -> Duration {
    (timeout / 8).clamp(Duration::from_millis(5), Duration::from_secs(1))
}

/// A ping when nothing was sent for this long, so a silent peer is noticed within the timeout.
fn ping_interval(timeout: Duration) -> Duration {
    (timeout / 4).max(Duration::from_millis(5))
}

fn op_bytes(op: &Op) -> u64 {
    let data = match op {
        Op::Write { data, .. } => data.len(),
        Op::SetXattr { value, .. } => value.len(),
        Op::Symlink { target, .. } => target.len(),
        _ => 0,
    };
    data as u64 + OP_OVERHEAD_BYTES
}

/// A write larger than one frame carries, as consecutive writes.
fn split(op: Op) -> Vec<Op> {
    match op {
        Op::Write { file, offset, data } if data.len() > WRITE_DATA_BYTES_MAX => data
            .chunks(WRITE_DATA_BYTES_MAX)
            .enumerate()
            .map(|(i, chunk)| Op::Write {
                file: file.clone(),
                offset: offset + (i * WRITE_DATA_BYTES_MAX) as u64,
                data: chunk.to_vec(),
            })
            .collect(),
        op => vec![op],
    }
}

impl Inner {
    /// Why the peer must be declared absent now, if it must.
    fn overdue(&self, state: &State, now: Instant) -> Option<String> {
        if let Some(oldest) = state.oldest_unapplied() {
            let age = now.duration_since(oldest.submitted);
            if age >= self.timeout {
                return Some(format!(
                    "the peer has not applied operation {} within the timeout of {:?} (slow or stuck)",
                    oldest.seq, self.timeout
                ));
            }
        }
        if now.duration_since(state.last_heard) >= self.timeout {
            return Some(format!("nothing was heard from the peer for {:?}", self.timeout));
        }
        None
    }

    /// Waits for a change, at most one tick, then checks the deadlines (so no caller depends
    /// on the sender's threads to be woken).
    fn wait<'a>(&'a self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let (state, _) = self.changed.wait_timeout(state, tick(self.timeout)).unwrap_or_else(|e| e.into_inner());
        if state.absent.is_none() {
            if let Some(reason) = self.overdue(&state, Instant::now()) {
                self.go_absent(state, reason);
                return lock(&self.state);
            }
        }
        state
    }

    /// Declares the peer absent (once): closes the connection, calls the handler, hands every
    /// op not durable on the peer to the tracker.
    fn go_absent(&self, mut state: MutexGuard<'_, State>, reason: String) {
        if state.absent.is_some() {
            return;
        }
        let pending = state.entries.len();
        let moved: Vec<Entry> = state.entries.drain(..).collect();
        state.to_track.extend(moved);
        state.entries_bytes = 0;
        state.unapplied_bytes = 0;
        state.absent = Some(reason.clone());
        let closing = state.closing;
        let durable_upto = state.durable_upto;
        drop(state);
        self.changed.notify_all();
        self.work.notify_all();
        if let Some(stream) = &self.stream {
            let _ = stream.shutdown(Shutdown::Both);
        }
        if closing {
            info!(module_id = self.module_id, "replication to {} closed: {reason}; {pending} operations not yet durable on the peer are tracked for the resync", self.peer);
        } else {
            warn!(
                module_id = self.module_id,
                "the replication peer {} is declared absent: {reason}; {pending} operations after {durable_upto} (the last one durable on the peer) are tracked for the resync, and so is every later change",
                self.peer
            );
            if let Some(handler) = &self.on_absent {
                handler(&reason);
            }
        }
        self.drain_tracking();
    }

    /// Hands every op waiting for it to the tracker, in order; returns once they all are.
    fn drain_tracking(&self) {
        let mut failed_from = lock(&self.tracking);
        loop {
            let next = lock(&self.state).to_track.pop_front();
            let Some(entry) = next else { break };
            // A flush changes nothing the resync would have to copy.
            if matches!(*entry.op, Op::Fsync { .. }) {
                continue;
            }
            if let Err(e) = self.tracker.track(&entry.op) {
                warn!(
                    module_id = self.module_id,
                    "cannot record operation {} for the resync: {e}; the application gets an I/O error at its next sync",
                    entry.seq
                );
                *failed_from = Some(failed_from.map_or(entry.seq, |f| f.min(entry.seq)));
            }
        }
    }

    /// After the peer went absent: `Ok` if every op up to `seq` is recorded by the tracker.
    fn tracked(&self, seq: u64) -> io::Result<()> {
        self.drain_tracking();
        match *lock(&self.tracking) {
            Some(failed) if failed <= seq => Err(io::Error::other(format!(
                "the replication peer is absent and operation {failed} could not be recorded for the resync"
            ))),
            _ => Ok(()),
        }
    }

    fn handle(&self, message: Message) -> Result<(), String> {
        let mut state = lock(&self.state);
        state.last_heard = Instant::now();
        match message {
            Message::Ack { upto_seq, durable } => {
                if upto_seq >= state.next_to_send {
                    return Err(format!("the peer acknowledged operation {upto_seq}, which was never sent"));
                }
                if upto_seq > state.applied_upto {
                    let from = state.index(state.applied_upto + 1);
                    let to = state.index(upto_seq);
                    if let (Some(from), Some(to)) = (from, to) {
                        let bytes: u64 = state.entries.range(from..=to).map(|e| e.bytes).sum();
                        state.unapplied_bytes = state.unapplied_bytes.saturating_sub(bytes);
                    }
                    state.applied_upto = upto_seq;
                }
                if durable && upto_seq > state.durable_upto {
                    state.durable_upto = upto_seq;
                    while state.entries.front().is_some_and(|e| e.seq <= upto_seq) {
                        if let Some(entry) = state.entries.pop_front() {
                            state.entries_bytes = state.entries_bytes.saturating_sub(entry.bytes);
                        }
                    }
                }
                drop(state);
                self.changed.notify_all();
                Ok(())
            }
            Message::Error { seq, message } => Err(format!("the peer could not apply operation {seq}: {message}")),
            Message::Pong { .. } => Ok(()),
            Message::Op { .. } | Message::Ping { .. } => {
                Err("the peer sent an operation or a ping, which only a sender sends".to_string())
            }
        }
    }
}

/// The primary's end of the replication stream; see the module documentation.
pub struct Sender {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender").field("peer", &self.inner.peer).field("mode", &self.inner.mode).finish()
    }
}

impl Sender {
    /// Connects to the peer's receiver and authenticates, both within the timeout. An error
    /// is one sentence; the daemon then goes on alone (see [`Sender::alone`]).
    pub fn connect(
        config: SenderConfig,
        tracker: Arc<dyn Tracker>,
        on_absent: AbsentHandler,
    ) -> Result<Sender, ChannelError> {
        let stream = TcpStream::connect_timeout(&config.peer, config.timeout)?;
        let local = Identity { module_id: config.module_id, node: config.node };
        let channel = channel::handshake_sender(stream, &config.key, local, config.timeout)?;
        channel.stream.set_read_timeout(Some(tick(config.timeout)))?;
        // A write stuck this long (the peer stopped reading) fails, and the peer is absent.
        channel.stream.set_write_timeout(Some(config.timeout))?;
        let channel::Channel { mut reader, mut writer, stream, .. } = channel;
        let now = Instant::now();
        let inner = Arc::new(Inner {
            mode: config.mode,
            timeout: config.timeout,
            peer: config.peer.to_string(),
            module_id: config.module_id,
            tracker,
            state: Mutex::new(State::new(now, None)),
            changed: Condvar::new(),
            work: Condvar::new(),
            tracking: Mutex::new(None),
            on_absent: Some(on_absent),
            stream: Some(stream),
        });
        info!(module_id = config.module_id, "replicating to {} ({:?} mode)", config.peer, config.mode);
        let mut threads = Vec::new();
        let spawn_failed = |inner: &Inner, e: io::Error| {
            inner.go_absent(lock(&inner.state), format!("cannot start a replication thread: {e}"));
        };
        let read_inner = Arc::clone(&inner);
        match std::thread::Builder::new().name("repl-acks".into()).spawn(move || read_loop(&read_inner, &mut reader)) {
            Ok(t) => threads.push(t),
            Err(e) => spawn_failed(&inner, e),
        }
        let write_inner = Arc::clone(&inner);
        match std::thread::Builder::new().name("repl-send".into()).spawn(move || write_loop(&write_inner, &mut writer))
        {
            Ok(t) => threads.push(t),
            Err(e) => spawn_failed(&inner, e),
        }
        Ok(Sender { inner, threads })
    }

    /// A sender whose peer is absent from the start: every op goes to the tracker.
    pub fn alone(mode: SyncMode, tracker: Arc<dyn Tracker>, reason: &str) -> Sender {
        let inner = Arc::new(Inner {
            mode,
            timeout: Duration::from_secs(1),
            peer: "(none)".into(),
            module_id: 0,
            tracker,
            state: Mutex::new(State::new(Instant::now(), Some(reason.to_string()))),
            changed: Condvar::new(),
            work: Condvar::new(),
            tracking: Mutex::new(None),
            on_absent: None,
            stream: None,
        });
        Sender { inner, threads: Vec::new() }
    }

    /// How far the peer trails (zero once it is absent: everything is tracked instead).
    pub fn lag(&self) -> Lag {
        lock(&self.inner.state).lag(Instant::now())
    }

    pub fn status(&self) -> SenderStatus {
        let state = lock(&self.inner.state);
        SenderStatus {
            link: match &state.absent {
                None => LinkState::Connected,
                Some(reason) => LinkState::Absent { reason: reason.clone() },
            },
            submitted_upto: state.next_seq - 1,
            applied_upto: state.applied_upto,
            durable_upto: state.durable_upto,
            lag: state.lag(Instant::now()),
            in_flight_bytes: state.entries_bytes,
        }
    }

    pub fn is_absent(&self) -> bool {
        lock(&self.inner.state).absent.is_some()
    }

    /// Makes everything submitted durable on the peer (or tracked), as before a clean stop.
    pub fn flush(&self) -> io::Result<()> {
        let seq = self.submit(Op::Fsync { file: None, datasync: false });
        let mut state = lock(&self.inner.state);
        loop {
            if state.absent.is_some() {
                drop(state);
                return self.inner.tracked(seq);
            }
            if state.durable_upto >= seq {
                return Ok(());
            }
            state = self.inner.wait(state);
        }
    }

    /// Ends the connection now, as [`Sender::close`] does, but through a shared reference:
    /// every op not yet durable on the peer, and every later one, is tracked. The absence
    /// handler is not called.
    pub fn disconnect(&self, reason: &str) {
        let mut state = lock(&self.inner.state);
        state.closing = true;
        self.inner.go_absent(state, reason.to_string());
    }

    /// Closes the connection; ops not yet durable on the peer are tracked. The absence
    /// handler is not called.
    pub fn close(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let mut state = lock(&self.inner.state);
        state.closing = true;
        self.inner.go_absent(state, "this node closed the replication connection".into());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl OpSink for Sender {
    fn submit(&self, op: Op) -> u64 {
        let inner = &self.inner;
        let pieces: Vec<(Op, u64, u64)> = split(op)
            .into_iter()
            .map(|op| {
                let checksum = op_checksum(&op);
                let bytes = op_bytes(&op);
                (op, checksum, bytes)
            })
            .collect();
        let total: u64 = pieces.iter().map(|p| p.2).sum();
        let mut state = lock(&inner.state);
        while state.absent.is_none() && !state.entries.is_empty() && state.entries_bytes + total > IN_FLIGHT_BYTES_MAX {
            state = inner.wait(state);
        }
        let now = Instant::now();
        let mut seq = 0;
        for (op, checksum, bytes) in pieces {
            seq = state.push(op, checksum, bytes, now);
        }
        if state.absent.is_some() {
            drop(state);
            inner.drain_tracking();
            return seq;
        }
        if state.unflushed_bytes >= FLUSH_EVERY_BYTES {
            state.push_flush(now);
        }
        drop(state);
        inner.work.notify_one();
        seq
    }

    fn wait_durable(&self, seq: u64) -> io::Result<()> {
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        debug_assert!(seq < state.next_seq, "wait_durable({seq}) for an op never submitted");
        // Never wait for an op that does not exist (it would never be acknowledged).
        let seq = seq.min(state.next_seq - 1);
        loop {
            if state.absent.is_some() {
                drop(state);
                return inner.tracked(seq);
            }
            match inner.mode {
                SyncMode::Sync => {
                    if state.durable_upto >= seq {
                        return Ok(());
                    }
                    if state.fsync_queued_upto < seq {
                        state.push_flush(Instant::now());
                        inner.work.notify_one();
                    }
                }
                SyncMode::Async => {
                    if state.unapplied_bytes <= ASYNC_LAG_BYTES_MAX {
                        return Ok(());
                    }
                }
            }
            state = inner.wait(state);
        }
    }
}

/// Takes the peer's acks and watches the deadlines.
fn read_loop(inner: &Inner, reader: &mut channel::FrameReader<std::io::BufReader<TcpStream>>) {
    loop {
        let outcome = match reader.poll() {
            Ok(Some(message)) => inner.handle(message),
            Ok(None) => Ok(()),
            Err(ChannelError::Closed) => Err("the peer closed the connection".to_string()),
            Err(e) => Err(format!("the connection to the peer failed: {e}")),
        };
        let state = lock(&inner.state);
        if state.absent.is_some() {
            return;
        }
        let reason = match outcome {
            Err(reason) => Some(reason),
            Ok(()) => inner.overdue(&state, Instant::now()),
        };
        if let Some(reason) = reason {
            inner.go_absent(state, reason);
            return;
        }
    }
}

/// Sends the queued ops in batches, a ping when idle, and an `Fsync` of its own when ops have
/// waited a while without one.
fn write_loop(inner: &Inner, writer: &mut channel::FrameWriter<std::io::BufWriter<TcpStream>>) {
    let ping_every = ping_interval(inner.timeout);
    loop {
        let mut batch: Vec<(u64, u64, Arc<Op>)> = Vec::new();
        let mut ping = None;
        {
            let mut state = lock(&inner.state);
            loop {
                if state.absent.is_some() {
                    return;
                }
                let now = Instant::now();
                let last_queued = state.next_seq - 1;
                if state.fsync_queued_upto < last_queued
                    && state.entries.back().is_some_and(|e| now.duration_since(e.submitted) >= ping_every)
                {
                    state.push_flush(now);
                }
                if state.next_to_send < state.next_seq {
                    break;
                }
                let idle = now.duration_since(state.last_sent);
                if idle >= ping_every {
                    state.ping_id += 1;
                    ping = Some(state.ping_id);
                    break;
                }
                let (next, _) = inner.work.wait_timeout(state, ping_every - idle).unwrap_or_else(|e| e.into_inner());
                state = next;
            }
            let mut bytes = 0;
            while state.next_to_send < state.next_seq && bytes < SEND_BATCH_BYTES_MAX {
                let Some(entry) = state.index(state.next_to_send).and_then(|i| state.entries.get(i)) else { break };
                bytes += entry.bytes;
                batch.push((entry.seq, entry.checksum, Arc::clone(&entry.op)));
                state.next_to_send += 1;
            }
            state.last_sent = Instant::now();
        }
        let mut sent = Ok(());
        for (seq, checksum, op) in &batch {
            sent = writer.send_op(*seq, *checksum, op);
            if sent.is_err() {
                break;
            }
        }
        if let (Ok(()), Some(id)) = (&sent, ping) {
            sent = writer.send(&Message::Ping { id });
        }
        if sent.is_ok() {
            sent = writer.flush();
        }
        if let Err(e) = sent {
            inner.go_absent(lock(&inner.state), format!("cannot send to the peer: {e}"));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::RelPath;

    // A write larger than a frame is cut into consecutive writes that cover it exactly.
    #[test]
    fn large_writes_are_split_into_frame_sized_pieces() {
        let file = RelPath::new(0, "f").unwrap();
        let data: Vec<u8> = (0..(2 * WRITE_DATA_BYTES_MAX + 10)).map(|i| i as u8).collect();
        let pieces = split(Op::Write { file: file.clone(), offset: 100, data: data.clone() });
        assert_eq!(pieces.len(), 3);
        let mut joined = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let Op::Write { offset, data, .. } = piece else { panic!("not a write") };
            assert_eq!(*offset, 100 + (i * WRITE_DATA_BYTES_MAX) as u64);
            joined.extend_from_slice(data);
        }
        assert_eq!(joined, data);
    }

    // A sender born alone tracks every op at once, and wait_durable reports a failed record.
    #[test]
    fn an_alone_sender_tracks_everything_and_reports_a_failed_record() {
        let tracker = Arc::new(MemoryTracker::new());
        let sender = Sender::alone(SyncMode::Sync, tracker.clone(), "no peer");
        let file = RelPath::new(0, "f").unwrap();
        let a = sender.submit(Op::Truncate { file: file.clone(), size: 1 });
        sender.wait_durable(a).unwrap();
        assert_eq!(tracker.ops().len(), 1);
        tracker.set_failing(true);
        let b = sender.submit(Op::Truncate { file, size: 2 });
        assert!(sender.wait_durable(a).is_ok(), "an earlier op is not affected");
        let e = sender.wait_durable(b).unwrap_err();
        assert!(e.to_string().contains("could not be recorded"), "{e}");
        assert_eq!(sender.lag(), Lag::default());
    }
}
