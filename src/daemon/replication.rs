//! One module's data replication inside the daemon: the pieces of `crate::replication` put to
//! work according to the module's state.
//!
//! - **Source** (the node runs the application: ALONE, PRIM, starting or stopping as primary):
//!   a read-write mountover over each replicated directory; its changes go to a
//!   [`ReplicaSink`], which ships them to the peer through a [`Sender`] when the peer is an
//!   up-to-date secondary, and otherwise records them in the dirty-zone maps. When the peer
//!   is SECOND and not fed, a *join* runs on a thread: changes-only (or full) resync passes
//!   until what changed meanwhile is small, then, with every change paused, a last pass, the
//!   real-time connection, and `Finish`: the target is now up to date and fed.
//! - **Target** (SECOND): the directories are mounted read-only; the real-time receiver and the
//!   resync server write underneath through fds opened before the mounts.
//!
//! Fencing: a synchronous write is acknowledged only when the peer has it durably, or when the
//! peer cannot claim to be an up-to-date secondary any more (it says so in its heartbeats, or
//! its heartbeats are lost). So a secondary that takes over never lacks an acknowledged write.

use std::fs::File;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};

use crate::cluster::ClusterKey;
use crate::config::{ModuleConfig, RfsConfig, SyncMode};
use crate::module::{Event, LogLevel, Snapshot, State, Transition};
use crate::replication::channel::{handshake_receiver, Identity};
use crate::replication::dirty::DirtyMaps;
use crate::replication::mountover::{MountMode, Mountover};
use crate::replication::receiver::{self, ReceiverConfig, WarningHook};
use crate::replication::remote::{open_root_files, roots_from_files, BeginAnswer, RemotePeer, Served, TargetHooks};
use crate::replication::resync::{
    full_resync, incremental_resync, Entry, Flow, LocalTree, Outcome, PeerFiles, Progress, ResyncOptions,
};
use crate::replication::sender::{Sender, SenderConfig, Tracker};
use crate::replication::status::{DataRole, LagView, ReplicationView, ResyncSummary, ResyncView};
use crate::replication::{Op, OpSink, RelPath};

use super::control::VerifyRequest;
use super::logs::ModuleLog;
use super::supervisor::ModuleContext;
use crate::cli::units::bytes;
use crate::replication::status::VerifyReport;
use crate::replication::verify::{verify, verify_paths, VerifyOptions};

/// A join stops repeating changes-only passes once what changed during the last one is at
/// most this much (the last pass runs with changes paused).
const FINAL_PASS_BYTES_MAX: u64 = 32 << 20;
/// ... and at most this many namespace changes.
const FINAL_PASS_NAMESPACE_MAX: u64 = 10_000;
/// Passes before the last one, at most (a writer faster than the link never lets the dirty
/// set shrink: the last pass then pauses changes for longer).
const PASSES_MAX: u32 = 8;
/// Retry delays after a failed join: doubled from the first up to the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A target that is not ready yet is asked again after this.
const NOT_READY_RETRY: Duration = Duration::from_millis(300);
/// How often the target is told the progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Files still held open through a released mount get this long to be closed before the
/// mount is aborted (their changes would otherwise arrive after the role changed).
const RELEASE_GRACE: Duration = Duration::from_secs(5);
/// How often a fenced write logs that it still waits.
const FENCE_LOG_EVERY: Duration = Duration::from_secs(10);
/// File in the module's state directory that exists while this node is a source that has
/// not stopped cleanly: after a crash, this node may hold writes its peer never
/// acknowledged, so the next resync in either direction compares everything.
const UNCLEAN_MARKER: &str = "replication.unclean";
/// File in the module's state directory naming the folder where this node's split-brain
/// changes were saved, until the resync that overwrites them has finished (so a resync that
/// breaks off and starts again does not save a half-overwritten copy).
const ASIDE_MARKER: &str = "splitbrain.saved";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_epoch() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// The sink between the mountovers and the sender

/// The source's [`OpSink`]: hands ops to the current [`Sender`] (connected to the peer, or
/// absent and recording into the dirty-zone maps), numbers them across senders, and fences
/// acknowledgements while the peer may still claim to be up to date.
pub struct ReplicaSink {
    current: RwLock<Current>,
    /// The peer says it is an up-to-date secondary (heartbeats) while it does not get the
    /// changes: a write only recorded locally must not be acknowledged yet.
    fence: Mutex<bool>,
    fence_changed: Condvar,
    mode: SyncMode,
    module: String,
}

struct Current {
    sender: Arc<Sender>,
    /// Sequence numbers of this sender are offset by this (those of earlier senders).
    base: u64,
}

impl ReplicaSink {
    fn new(sender: Sender, mode: SyncMode, module: &str) -> ReplicaSink {
        ReplicaSink {
            current: RwLock::new(Current { sender: Arc::new(sender), base: 0 }),
            fence: Mutex::new(false),
            fence_changed: Condvar::new(),
            mode,
            module: module.to_string(),
        }
    }

    fn current(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    fn sender(&self) -> Arc<Sender> {
        self.current().sender.clone()
    }

    /// Makes `sender` the current one. Call with every mountover paused (no op in flight).
    fn replace(&self, sender: Sender) {
        {
            let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
            let base = current.base + current.sender.status().submitted_upto;
            *current = Current { sender: Arc::new(sender), base };
        }
        // Fenced ops of the replaced sender may be done (see `wait_fence`).
        let _fence = lock(&self.fence);
        self.fence_changed.notify_all();
    }

    /// Ops numbered up to this went to earlier senders.
    fn base(&self) -> u64 {
        self.current().base
    }

    fn connected(&self) -> bool {
        !self.sender().is_absent()
    }

    fn set_fence(&self, on: bool) {
        let mut fence = lock(&self.fence);
        if *fence != on {
            *fence = on;
            self.fence_changed.notify_all();
        }
    }

    /// Waits until the peer cannot claim to be up to date, or until a join has replaced the
    /// sender that got op `seq` (the join sent every op recorded before it, durably).
    fn wait_fence(&self, seq: u64) {
        let mut fence = lock(&self.fence);
        let started = Instant::now();
        let mut logged = started;
        while *fence && self.base() < seq {
            fence = self.fence_changed.wait_timeout(fence, Duration::from_secs(1)).unwrap_or_else(|e| e.into_inner()).0;
            if *fence && self.base() < seq && logged.elapsed() >= FENCE_LOG_EVERY {
                logged = Instant::now();
                tracing::warn!(
                    module = %self.module,
                    "a synchronous write has waited {:?}: the peer still says it is up to date but does not receive the changes",
                    started.elapsed()
                );
            }
        }
    }

    /// Everything submitted so far is durable on the peer, or recorded in the maps. It does
    /// not wait for the fence: its callers (a role being left, verify) acknowledge nothing to
    /// an application, and a stop must not wait for heartbeats only this module's task reads.
    fn flush(&self) -> io::Result<()> {
        self.sender().flush()
    }
}

impl OpSink for ReplicaSink {
    fn submit(&self, op: Op) -> u64 {
        let current = self.current();
        current.base + current.sender.submit(op)
    }

    fn wait_durable(&self, seq: u64) -> io::Result<()> {
        let (sender, base) = {
            let current = self.current();
            (current.sender.clone(), current.base)
        };
        if seq <= base {
            // Submitted to an earlier sender: the join that replaced it sent everything
            // recorded before it, durably.
            return Ok(());
        }
        sender.wait_durable(seq - base)?;
        if sender.is_absent() && self.mode == SyncMode::Sync {
            self.wait_fence(seq);
        }
        Ok(())
    }
}

/// The sink of a read-only mountover: it refuses every change before one could produce an op.
struct NoChanges;

impl OpSink for NoChanges {
    fn submit(&self, _op: Op) -> u64 {
        0
    }
    fn wait_durable(&self, _seq: u64) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Shared by the roles

/// What every part of one module's replication needs.
struct Shared {
    module: String,
    rfs: RfsConfig,
    roots: Vec<PathBuf>,
    key: ClusterKey,
    identity: Identity,
    peer_name: String,
    peer_realtime: SocketAddr,
    peer_resync: SocketAddr,
    local_realtime: SocketAddr,
    local_resync: SocketAddr,
    timeout: Duration,
    maps: Arc<DirtyMaps>,
    state_dir: PathBuf,
    /// The daemon's state directory (split-brain folders go beside it).
    state_root: PathBuf,
    view: watch::Sender<ReplicationView>,
    events: mpsc::Sender<Event>,
    log: ModuleLog,
}

impl Shared {
    fn say(&self, level: LogLevel, text: &str) {
        self.log.say(&self.module, level, text);
    }

    /// Hands an event to the module's machine from a plain thread, without blocking (the
    /// sender's absence handler must return quickly), in order in all but a full queue.
    fn event(&self, event: Event) {
        if let Err(mpsc::error::TrySendError::Full(event)) = self.events.try_send(event) {
            let events = self.events.clone();
            let _ = std::thread::Builder::new().name("repl-event".into()).spawn(move || {
                let _ = events.blocking_send(event);
            });
        }
    }

    fn unclean_marker(&self) -> PathBuf {
        self.state_dir.join(UNCLEAN_MARKER)
    }

    fn resync_options(&self) -> ResyncOptions {
        let mut opts = ResyncOptions::from_config(&self.rfs);
        opts.checkpoint = Some(self.state_dir.join("resync.checkpoint"));
        opts
    }

    fn finished(&self, summary: ResyncSummary) {
        self.view.send_modify(|v| {
            v.resync = None;
            v.last_resync = Some(summary);
        });
    }
}

/// Creates the marker durably.
fn write_marker(path: &Path) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(b"this node was a replication source and has not stopped cleanly\n")?;
    f.sync_all()?;
    File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
}

fn remove_marker(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------------------------
// The replication of one module

/// One module's replication; see the module documentation.
pub struct Replication {
    shared: Arc<Shared>,
    role: Role,
    /// What the machine asked of this node as a target; kept across roles, since the machine
    /// may ask for a resync while the target role is still being set up.
    target: Arc<Mutex<TargetState>>,
}

enum Role {
    None,
    Source(Source),
    Target(Target),
}

impl Replication {
    /// Opens the module's dirty-zone maps and works out the addresses; `Ok(None)` when the
    /// module replicates nothing.
    pub fn new(
        ctx: &ModuleContext,
        config: &ModuleConfig,
        peer: &str,
        node_index: u8,
        events: mpsc::Sender<Event>,
    ) -> Result<Option<(Replication, watch::Receiver<ReplicationView>)>, String> {
        let Some(rfs) = config.rfs.clone() else { return Ok(None) };
        let (paths, cluster, node) = (&ctx.paths, &ctx.cluster, ctx.node.as_str());
        let addr = |n: &str| {
            cluster
                .addr(&rfs.lan, n)
                .ok_or_else(|| format!("lan {} of its <rfs> does not list node {n} in cluster.xml", rfs.lan))
        };
        let (local, remote) = (addr(node)?, addr(peer)?);
        let state_dir = paths.module_state_dir(&config.name);
        let maps = DirtyMaps::open(&state_dir.join("dirty"), rfs.zone_bytes)
            .map_err(|e| format!("its dirty-zone maps in {} cannot be opened: {e}", state_dir.display()))?;
        let (view_tx, view_rx) = watch::channel(ReplicationView {
            mode: match rfs.sync {
                SyncMode::Sync => "sync",
                SyncMode::Async => "async",
            }
            .to_string(),
            ..ReplicationView::default()
        });
        let shared = Shared {
            module: config.name.clone(),
            roots: receiver::replicated_roots(&rfs),
            rfs,
            key: ctx.key.clone(),
            identity: Identity { module_id: config.id, node: node_index },
            peer_name: peer.to_string(),
            peer_realtime: SocketAddr::new(remote, config.replication_port()),
            peer_resync: SocketAddr::new(remote, config.resync_port()),
            local_realtime: SocketAddr::new(local, config.replication_port()),
            local_resync: SocketAddr::new(local, config.resync_port()),
            timeout: config.heart.timeout,
            maps: Arc::new(maps),
            state_dir,
            state_root: paths.state_dir.clone(),
            view: view_tx,
            events,
            log: ModuleLog::new(paths, &config.name),
        };
        let target = Arc::new(Mutex::new(TargetState::default()));
        Ok(Some((Replication { shared: Arc::new(shared), role: Role::None, target }, view_rx)))
    }

    /// The role the machine's state calls for.
    pub fn wanted(snapshot: &Snapshot) -> DataRole {
        match snapshot.transition {
            // A role being entered wins over the state being left.
            Some(Transition::StartingSecondary) => DataRole::Target,
            Some(Transition::StartingPrimary) => DataRole::Source,
            _ if snapshot.state.is_primary() => DataRole::Source,
            _ if snapshot.state == State::Second => DataRole::Target,
            _ => DataRole::None,
        }
    }

    pub fn role(&self) -> DataRole {
        match self.role {
            Role::None => DataRole::None,
            Role::Source(_) => DataRole::Source,
            Role::Target(_) => DataRole::Target,
        }
    }

    /// Takes `role`, leaving the current one first. Blocking (mounts, threads).
    pub fn set_role(&mut self, role: DataRole) -> Result<(), String> {
        if self.role() == role {
            return Ok(());
        }
        self.release();
        self.role = match role {
            DataRole::None => Role::None,
            DataRole::Source => Role::Source(Source::start(&self.shared)?),
            DataRole::Target => Role::Target(Target::start(&self.shared, self.target.clone())?),
        };
        self.shared.view.send_modify(|v| v.role = role);
        Ok(())
    }

    fn release(&mut self) {
        match std::mem::replace(&mut self.role, Role::None) {
            Role::None => {}
            Role::Source(s) => s.stop(&self.shared),
            Role::Target(t) => t.stop(&self.shared),
        }
        self.shared.view.send_modify(|v| {
            v.role = DataRole::None;
            v.connected = false;
            v.absent_reason = None;
            v.lag = LagView::default();
            v.resync = None;
        });
    }

    /// The machine asked for the data to be brought up to date (this node is the target).
    pub fn request_resync(&mut self, full: bool) {
        lock(&self.target).requested = Some(full);
    }

    /// The machine abandoned the resync it asked for.
    pub fn cancel_resync(&mut self) {
        lock(&self.target).requested = None;
    }

    /// Compares both copies online (this node must be the primary with its secondary fed);
    /// answers on `reply` from a thread of its own.
    pub fn verify(&self, reply: VerifyRequest) {
        let shared = self.shared.clone();
        let ready = match &self.role {
            Role::Source(s) if !s.sink.connected() || s.job.is_some() => Err(format!(
                "{} is not an up-to-date secondary yet (resync running or peer away): verify compares an up-to-date pair",
                shared.peer_name
            )),
            Role::Source(s) => s
                .tree()
                .map(|tree| (tree, s.sink.clone()))
                .map_err(|e| format!("cannot open the replicated directories: {e}")),
            Role::Target(_) => Err(format!("this node is the secondary: run verify on the primary ({})", shared.peer_name)),
            Role::None => Err("the module is not primary on this node".to_string()),
        };
        let (tree, sink) = match ready {
            Ok(x) => x,
            Err(why) => {
                let _ = reply.send(Err(why));
                return;
            }
        };
        let spawned = std::thread::Builder::new().name("repl-verify".into()).spawn(move || {
            let _ = reply.send(run_verify(&shared, &sink, &tree));
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start a verify thread: {e}");
        }
    }

    /// Follows the machine: fencing, starting a join, the view. Call after every change.
    pub fn update(&mut self, snapshot: &Snapshot) {
        let peer_visible = snapshot.lans.iter().any(|l| l.up);
        let peer = snapshot.peer.as_ref().filter(|_| peer_visible);
        match &mut self.role {
            Role::None => {}
            Role::Target(_) => lock(&self.target).in_sync = snapshot.in_sync,
            Role::Source(s) => {
                // Fenced while the peer says it is an up-to-date secondary (it could take over
                // without what is only recorded here) or acts as primary (a split: this node
                // may be about to step down, and what it acknowledged now would be lost).
                s.sink.set_fence(peer.is_some_and(|p| (p.state == State::Second && p.in_sync) || p.acts_primary()));
                let peer_second =
                    peer.is_some_and(|p| p.state == State::Second && p.transition != Some(Transition::Stopping));
                // Also while start_prim runs: after a swap the peer is an up-to-date secondary,
                // so the application's synchronous writes wait for this join.
                let running = (snapshot.state.is_primary() || snapshot.transition == Some(Transition::StartingPrimary))
                    && snapshot.transition != Some(Transition::Stopping);
                // A resync the peer asked for and no join served yet (an in-sync secondary can
                // ask too: `second --full`).
                let asked = peer.filter(|p| p.transition == Some(Transition::Resyncing) && !p.in_sync);
                let peer_asks = asked.is_some_and(|p| s.served_request != Some(p.resync_request));
                s.reap(&self.shared);
                if running
                    && peer_second
                    && (!s.sink.connected() || peer_asks)
                    && s.job.is_none()
                    && Instant::now() >= s.next_attempt
                {
                    s.served_request = asked.map(|p| p.resync_request);
                    s.start_join(&self.shared);
                }
                s.refresh_view(&self.shared);
            }
        }
    }
}

impl Drop for Replication {
    fn drop(&mut self) {
        self.release();
    }
}

// ---------------------------------------------------------------------------------------------
// Source

struct Source {
    /// The real directories beneath the mounts.
    roots: Vec<(PathBuf, File)>,
    mounts: Arc<Vec<Mountover>>,
    sink: Arc<ReplicaSink>,
    job: Option<Job>,
    next_attempt: Instant,
    failures: u32,
    last_view: Option<Instant>,
    /// The peer's resync request (its counter) the last join started for.
    served_request: Option<u32>,
}

struct Job {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<JoinOutcome>,
}

enum JoinOutcome {
    Done,
    NotReady,
    Stopped,
    Failed(String),
}

impl Source {
    fn start(shared: &Arc<Shared>) -> Result<Source, String> {
        let marker = shared.unclean_marker();
        if marker.exists() {
            shared.say(
                LogLevel::Warn,
                "this node stopped without flushing its replication last time: the next resync compares everything",
            );
            shared.maps.mark_full().map_err(|e| format!("cannot update the dirty-zone maps: {e}"))?;
        }
        std::fs::create_dir_all(&shared.state_dir)
            .and_then(|()| write_marker(&marker))
            .map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
        let roots = open_root_files(&shared.roots).map_err(|e| e.to_string())?;
        let tracker: Arc<dyn Tracker> = shared.maps.clone();
        let sender = Sender::alone(shared.rfs.sync, tracker, "the peer is not connected yet");
        let sink = Arc::new(ReplicaSink::new(sender, shared.rfs.sync, &shared.module));
        let mut mounts = Vec::new();
        for (i, r) in shared.rfs.replicated.iter().enumerate() {
            let index = u16::try_from(i).map_err(|_| "too many replicated directories".to_string())?;
            match Mountover::mount(&r.dir, index, MountMode::ReadWrite, &r.notreplicated, sink.clone()) {
                Ok(m) => mounts.push(m),
                Err(e) => {
                    unmount_all(shared, mounts, Duration::ZERO);
                    return Err(format!("cannot mount the replication over {}: {e}", r.dir.display()));
                }
            }
        }
        shared.say(LogLevel::Info, "data mounted read-write: changes are replicated or tracked");
        Ok(Source {
            roots,
            mounts: Arc::new(mounts),
            sink,
            job: None,
            next_attempt: Instant::now(),
            failures: 0,
            last_view: None,
            served_request: None,
        })
    }

    fn tree(&self) -> io::Result<LocalTree> {
        roots_from_files(&self.roots).map(|(_, tree)| tree)
    }

    fn start_join(&mut self, shared: &Arc<Shared>) {
        let tree = match self.tree() {
            Ok(t) => t,
            Err(e) => {
                shared.say(LogLevel::Error, &format!("cannot open the replicated directories for a resync: {e}"));
                self.next_attempt = Instant::now() + RETRY_MAX;
                return;
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = JoinContext {
            shared: shared.clone(),
            mounts: self.mounts.clone(),
            sink: self.sink.clone(),
            tree,
            stop: stop.clone(),
        };
        match std::thread::Builder::new().name("repl-join".into()).spawn(move || ctx.run()) {
            Ok(thread) => self.job = Some(Job { stop, thread }),
            Err(e) => {
                shared.say(LogLevel::Error, &format!("cannot start a resync thread: {e}"));
                self.next_attempt = Instant::now() + RETRY_MAX;
            }
        }
    }

    /// Collects a finished join.
    fn reap(&mut self, shared: &Shared) {
        if !self.job.as_ref().is_some_and(|j| j.thread.is_finished()) {
            return;
        }
        let Some(job) = self.job.take() else { return };
        let outcome = job.thread.join().unwrap_or_else(|_| JoinOutcome::Failed("the resync thread panicked".into()));
        match outcome {
            JoinOutcome::Done => {
                self.failures = 0;
                self.next_attempt = Instant::now();
            }
            JoinOutcome::NotReady | JoinOutcome::Stopped => {
                self.served_request = None;
                self.next_attempt = Instant::now() + NOT_READY_RETRY;
            }
            JoinOutcome::Failed(why) => {
                self.served_request = None;
                let delay = RETRY_FIRST.saturating_mul(1 << self.failures.min(6)).min(RETRY_MAX);
                self.failures += 1;
                self.next_attempt = Instant::now() + delay;
                shared.say(
                    LogLevel::Error,
                    &format!(
                        "resync of {} failed: {why}; retrying in {}",
                        shared.peer_name,
                        crate::config::format_duration(delay)
                    ),
                );
            }
        }
    }

    fn refresh_view(&mut self, shared: &Shared) {
        if self.last_view.is_some_and(|t| t.elapsed() < Duration::from_millis(250)) {
            return;
        }
        self.last_view = Some(Instant::now());
        let status = self.sink.sender().status();
        let counts = shared.maps.counts();
        shared.view.send_modify(|v| {
            v.connected = status.link == crate::replication::sender::LinkState::Connected;
            v.absent_reason = match status.link {
                crate::replication::sender::LinkState::Absent { reason } => Some(reason),
                crate::replication::sender::LinkState::Connected => None,
            };
            v.lag = LagView { ops: status.lag.ops, bytes: status.lag.bytes, oldest_ms: status.lag.oldest_ms };
            v.dirty_zones = counts.zones;
            v.dirty_bytes = counts.zones.saturating_mul(shared.rfs.zone_bytes);
        });
    }

    fn stop(mut self, shared: &Shared) {
        if let Some(job) = self.job.take() {
            job.stop.store(true, Ordering::SeqCst);
            let _ = job.thread.join();
        }
        let mounts = match Arc::try_unwrap(self.mounts) {
            Ok(m) => m,
            Err(_) => {
                shared.say(LogLevel::Error, "internal error: a replication mount is still in use; it stays mounted");
                return;
            }
        };
        unmount_all(shared, mounts, RELEASE_GRACE);
        let flushed = self.sink.flush();
        let tracker: Arc<dyn Tracker> = shared.maps.clone();
        self.sink.replace(Sender::alone(shared.rfs.sync, tracker, "this node is no longer primary"));
        match flushed {
            Ok(()) => match remove_marker(&shared.unclean_marker()) {
                Ok(()) => shared.say(LogLevel::Info, "data unmounted; every change is on the peer or tracked"),
                Err(e) => shared.say(LogLevel::Error, &format!("cannot remove the replication marker: {e}")),
            },
            Err(e) => shared.say(
                LogLevel::Error,
                &format!("data unmounted, but the last changes could not be made durable: {e}; the next resync compares everything"),
            ),
        }
    }
}

/// Detaches every mount; files still held open get `grace` to be closed, on a thread.
fn unmount_all(shared: &Shared, mounts: Vec<Mountover>, grace: Duration) {
    for m in mounts {
        let dir = m.dir().to_path_buf();
        match m.unmount() {
            Ok(detached) => {
                if detached.is_finished() {
                    continue;
                }
                let module = shared.module.clone();
                let _ = std::thread::Builder::new().name("repl-unmount".into()).spawn(move || {
                    if let Ok(true) = detached.finish(grace) {
                        tracing::warn!(
                            module = %module,
                            "files under {} were still open {grace:?} after the role changed: their mount was aborted",
                            dir.display()
                        );
                    }
                });
            }
            Err(e) => {
                shared.say(LogLevel::Error, &format!("cannot unmount the replication from {}: {e}", dir.display()))
            }
        }
    }
}

/// Everything a join thread uses.
struct JoinContext {
    shared: Arc<Shared>,
    mounts: Arc<Vec<Mountover>>,
    sink: Arc<ReplicaSink>,
    tree: LocalTree,
    stop: Arc<AtomicBool>,
}

/// [`PeerFiles`] that also tells the target the progress, between requests.
struct Reporting<'a> {
    peer: &'a mut RemotePeer,
    pending: Arc<Mutex<Option<ResyncView>>>,
}

impl Reporting<'_> {
    fn report(&mut self) -> io::Result<()> {
        let pending = lock(&self.pending).take();
        match pending {
            Some(view) => self.peer.progress(&view),
            None => Ok(()),
        }
    }
}

impl PeerFiles for Reporting<'_> {
    fn stat(&mut self, path: &RelPath) -> io::Result<Option<Entry>> {
        self.report()?;
        self.peer.stat(path)
    }
    fn list(&mut self, dir: &RelPath) -> io::Result<Vec<(String, Entry)>> {
        self.report()?;
        self.peer.list(dir)
    }
    fn block_hashes(&mut self, file: &RelPath, block_bytes: u64, first_block: u64, count: u64) -> io::Result<Vec<u64>> {
        self.report()?;
        self.peer.block_hashes(file, block_bytes, first_block, count)
    }
    fn apply(&mut self, op: &Op) -> io::Result<()> {
        self.report()?;
        self.peer.apply(op)
    }
    fn remove_tree(&mut self, path: &RelPath) -> io::Result<()> {
        self.report()?;
        self.peer.remove_tree(path)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.peer.flush()
    }
}

impl JoinContext {
    fn run(self) -> JoinOutcome {
        let started = Instant::now();
        // The stream stops first: from here on every change is tracked, and the target stops
        // applying the stream before the resync writes anything (see `Hooks::begin`), so no
        // old operation can land over what the resync sends.
        self.sink.sender().disconnect("the secondary asked for a resync");
        let mut peer = match RemotePeer::connect(
            self.shared.peer_resync,
            &self.shared.key,
            self.shared.identity,
            self.shared.timeout,
        ) {
            Ok(p) => p,
            Err(e) => {
                let why = format!("cannot connect to {} at {}: {e}", self.shared.peer_name, self.shared.peer_resync);
                // The peer may count as up to date: make it know it is not.
                self.shared.event(Event::ReplicationLost { reason: why.clone() });
                return JoinOutcome::Failed(why);
            }
        };
        let full = match peer.begin() {
            Ok(BeginAnswer::NotReady) => {
                peer.close();
                return JoinOutcome::NotReady;
            }
            Ok(BeginAnswer::Ready { full }) => full,
            Err(e) => return JoinOutcome::Failed(format!("the target did not begin: {e}")),
        };
        let mut sent = 0u64;
        let mut examined = 0u64;
        let result = self.passes(&mut peer, full, started, &mut sent, &mut examined);
        let summary = |ok: bool, error: Option<String>| ResyncSummary {
            ok,
            full,
            bytes_sent: sent,
            bytes_examined: examined,
            elapsed_ms: ms(started.elapsed()),
            ended_at: now_epoch(),
            error,
        };
        match result {
            Ok(true) => {
                peer.close();
                self.shared.say(
                    LogLevel::Info,
                    &format!(
                        "{} is up to date and receives every change ({} resync sent {} in {:.1} s)",
                        self.shared.peer_name,
                        if full { "full" } else { "changes-only" },
                        bytes(sent),
                        started.elapsed().as_secs_f64()
                    ),
                );
                if full || sent > 0 || examined > 0 {
                    self.shared.finished(summary(true, None));
                } else {
                    // Nothing to send (the stream only restarted): the last real resync's
                    // figures stay in `last_resync`.
                    self.shared.view.send_modify(|v| v.resync = None);
                }
                self.shared.event(Event::ReplicationUp);
                JoinOutcome::Done
            }
            Ok(false) => {
                let _ = peer.finish(false);
                peer.close();
                self.shared.finished(summary(false, Some("stopped: this node is leaving the primary role".into())));
                JoinOutcome::Stopped
            }
            Err(why) => {
                let _ = peer.finish(false);
                peer.close();
                self.shared.finished(summary(false, Some(why.clone())));
                self.shared.event(Event::ReplicationLost { reason: why.clone() });
                JoinOutcome::Failed(why)
            }
        }
    }

    /// The passes, then the last one with changes paused. `Ok(false)` when asked to stop.
    fn passes(
        &self,
        peer: &mut RemotePeer,
        full: bool,
        started: Instant,
        sent: &mut u64,
        examined: &mut u64,
    ) -> Result<bool, String> {
        let shared = &self.shared;
        let opts = shared.resync_options();
        let pending = Arc::new(Mutex::new(None));
        let mut pass = 1u32;
        let mut full_pass = full;
        shared.say(
            LogLevel::Info,
            &format!(
                "resync of {} begins ({})",
                shared.peer_name,
                if full { "full: comparing everything" } else { "changes only" }
            ),
        );
        loop {
            let mut reporting = Reporting { peer, pending: pending.clone() };
            let mut last_report = Instant::now();
            let mut progress = |p: &Progress| {
                let view = ResyncView {
                    full,
                    bytes_done: p.bytes_done,
                    bytes_total: p.bytes_total,
                    files_done: p.files_done,
                    files_total: p.files_total,
                    bytes_sent: *sent + p.bytes_sent,
                    elapsed_ms: ms(started.elapsed()),
                    pass,
                };
                if last_report.elapsed() >= PROGRESS_EVERY {
                    last_report = Instant::now();
                    *lock(&pending) = Some(view.clone());
                }
                shared.view.send_modify(|v| v.resync = Some(view));
                if self.stop.load(Ordering::SeqCst) {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            };
            let outcome = if full_pass {
                full_resync(&self.tree, &mut reporting, Some(&shared.maps), &opts, &mut progress)
            } else {
                incremental_resync(&self.tree, &mut reporting, &shared.maps, &opts, &mut progress)
            }
            .map_err(|e| e.to_string())?;
            *sent += outcome.stats().bytes_sent;
            *examined += outcome.stats().bytes_examined;
            if let Outcome::Stopped(_) = outcome {
                return Ok(false);
            }
            full_pass = false;
            let counts = shared.maps.counts();
            let small = !counts.full
                && counts.zones.saturating_mul(shared.rfs.zone_bytes) <= FINAL_PASS_BYTES_MAX
                && counts.namespace <= FINAL_PASS_NAMESPACE_MAX;
            if small || pass >= PASSES_MAX {
                break;
            }
            pass += 1;
        }
        // The last pass: no change can happen meanwhile, so when it ends the target equals
        // this node, and the real-time connection carries every later change.
        let last = paused(&self.mounts, || -> Result<u64, String> {
            let on_absent_shared = self.shared.clone();
            let config = SenderConfig {
                peer: shared.peer_realtime,
                key: shared.key.clone(),
                module_id: shared.identity.module_id,
                node: shared.identity.node,
                mode: shared.rfs.sync,
                timeout: shared.timeout,
            };
            let tracker: Arc<dyn Tracker> = shared.maps.clone();
            let sender = Sender::connect(
                config,
                tracker,
                Box::new(move |reason: &str| {
                    on_absent_shared.say(LogLevel::Warn, &format!("replication stream lost: {reason}"));
                    on_absent_shared.event(Event::ReplicationLost { reason: reason.to_string() });
                }),
            )
            .map_err(|e| format!("cannot open the real-time stream to {}: {e}", shared.peer_realtime))?;
            let mut reporting = Reporting { peer: &mut *peer, pending: pending.clone() };
            let outcome = incremental_resync(&self.tree, &mut reporting, &shared.maps, &opts, &mut |_| Flow::Continue)
                .map_err(|e| e.to_string())?;
            // The target's figures end with the whole resync, not its last progress report.
            let total = *examined + outcome.stats().bytes_examined;
            let last = ResyncView {
                full,
                bytes_done: total,
                bytes_total: total,
                files_done: 0,
                files_total: 0,
                bytes_sent: *sent + outcome.stats().bytes_sent,
                elapsed_ms: ms(started.elapsed()),
                pass: pass + 1,
            };
            peer.progress(&last).map_err(|e| format!("the target did not take the last progress: {e}"))?;
            peer.finish(true).map_err(|e| format!("the target did not confirm the end of the resync: {e}"))?;
            self.sink.replace(sender);
            Ok(outcome.stats().bytes_sent)
        })?;
        *sent += last;
        Ok(true)
    }
}

/// Differences listed by `verify` at most.
const VERIFY_DIFFERENCES_MAX: usize = 1000;

/// Compares the copies; differences are checked a second time after the peer has made every
/// change so far durable, and only those that remain are reported (a live system has writes
/// in flight).
fn run_verify(shared: &Shared, sink: &ReplicaSink, tree: &LocalTree) -> Result<VerifyReport, String> {
    let dir_names: Vec<String> = shared.roots.iter().map(|r| r.display().to_string()).collect();
    let opts = VerifyOptions {
        block_bytes: shared.rfs.zone_bytes,
        exclude: ResyncOptions::from_config(&shared.rfs).exclude,
        dir_names: dir_names.clone(),
        differences_max: VERIFY_DIFFERENCES_MAX,
    };
    sink.flush().map_err(|e| format!("cannot make the peer durable first: {e}"))?;
    let mut peer = RemotePeer::connect(shared.peer_resync, &shared.key, shared.identity, shared.timeout)
        .map_err(|e| format!("cannot connect to {} at {}: {e}", shared.peer_name, shared.peer_resync))?;
    let first = verify(tree, &mut peer, &opts, &mut |_| {}).map_err(|e| e.to_string())?;
    if first.differences.is_empty() {
        peer.close();
        return Ok(first);
    }
    sink.flush().map_err(|e| format!("cannot make the peer durable: {e}"))?;
    let paths: Vec<RelPath> = first
        .differences
        .iter()
        .filter_map(|d| {
            let dir = dir_names.iter().position(|n| *n == d.dir)?;
            RelPath::new(u16::try_from(dir).ok()?, &d.path)
        })
        .collect();
    let again = verify_paths(tree, &mut peer, &opts, &paths, &mut |_| {}).map_err(|e| e.to_string())?;
    peer.close();
    Ok(VerifyReport { differences: again.differences, truncated: first.truncated, ..first })
}

/// Runs `f` with every mount paused (nested, in order).
fn paused<R>(mounts: &[Mountover], f: impl FnOnce() -> R) -> R {
    match mounts.split_first() {
        None => f(),
        Some((first, rest)) => first.paused(|| paused(rest, f)),
    }
}

// ---------------------------------------------------------------------------------------------
// Target

struct Target {
    mounts: Vec<Mountover>,
    realtime: Arc<Realtime>,
    resync: ResyncServer,
}

/// The target's real-time receiver, restarted when a resync begins so that no operation of an
/// older stream is applied over what the resync writes.
struct Realtime {
    roots: Vec<(PathBuf, File)>,
    server: Mutex<Option<receiver::Server>>,
}

impl Realtime {
    fn start(shared: &Shared, roots: Vec<(PathBuf, File)>) -> Result<Realtime, String> {
        let realtime = Realtime { roots, server: Mutex::new(None) };
        realtime.restart(shared)?;
        Ok(realtime)
    }

    /// Ends the current stream (after the operation being applied) and listens again.
    fn restart(&self, shared: &Shared) -> Result<(), String> {
        let mut server = lock(&self.server);
        if let Some(old) = server.take() {
            old.stop();
        }
        let (receiver, _) = roots_from_files(&self.roots).map_err(|e| e.to_string())?;
        let listener = TcpListener::bind(shared.local_realtime)
            .map_err(|e| format!("cannot listen for replication on {}: {e}", shared.local_realtime))?;
        let log = ModuleLog::at(shared.log.path().to_path_buf());
        let config = ReceiverConfig {
            key: shared.key.clone(),
            module_id: shared.identity.module_id,
            node: shared.identity.node,
            timeout: shared.timeout,
            on_warning: Some(WarningHook(Arc::new(move |text: &str| log.line(LogLevel::Warn, text)))),
        };
        *server = Some(
            receiver::serve(listener, config, receiver)
                .map_err(|e| format!("cannot start the replication receiver: {e}"))?,
        );
        Ok(())
    }

    fn stop(&self) {
        if let Some(server) = lock(&self.server).take() {
            server.stop();
        }
    }
}

#[derive(Default)]
struct TargetState {
    /// The machine asked for a resync (`full` or not).
    requested: Option<bool>,
    /// The machine counts this node as up to date.
    in_sync: bool,
    /// Saving the split-brain changes failed (said once).
    aside_failed: bool,
}

impl Target {
    fn start(shared: &Arc<Shared>, state: Arc<Mutex<TargetState>>) -> Result<Target, String> {
        // The fds reach the real directories, under the read-only mounts made next.
        let roots = open_root_files(&shared.roots).map_err(|e| e.to_string())?;
        let copies = |roots: &[(PathBuf, File)]| -> Result<Vec<(PathBuf, File)>, String> {
            roots.iter().map(|(p, f)| Ok((p.clone(), f.try_clone().map_err(|e| e.to_string())?))).collect()
        };
        let realtime = Arc::new(Realtime::start(shared, copies(&roots)?)?);
        let resync = ResyncServer::start(shared, roots, state, realtime.clone())?;
        let mut mounts = Vec::new();
        for (i, r) in shared.rfs.replicated.iter().enumerate() {
            let index = u16::try_from(i).map_err(|_| "too many replicated directories".to_string())?;
            match Mountover::mount(&r.dir, index, MountMode::ReadOnly, &r.notreplicated, Arc::new(NoChanges)) {
                Ok(m) => mounts.push(m),
                Err(e) => {
                    unmount_all(shared, mounts, Duration::ZERO);
                    realtime.stop();
                    resync.stop();
                    return Err(format!("cannot mount the read-only view over {}: {e}", r.dir.display()));
                }
            }
        }
        shared.say(LogLevel::Info, "data mounted read-only: only the replication writes here");
        Ok(Target { mounts, realtime, resync })
    }

    fn stop(mut self, shared: &Shared) {
        self.realtime.stop();
        self.resync.stop();
        unmount_all(shared, std::mem::take(&mut self.mounts), RELEASE_GRACE);
    }
}

/// Accepts the source's resync and verify connections, one at a time.
struct ResyncServer {
    listener: TcpListener,
    stopping: Arc<AtomicBool>,
    /// The connection being served, to end it on stop.
    serving: Arc<Mutex<Option<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl ResyncServer {
    fn start(
        shared: &Arc<Shared>,
        roots: Vec<(PathBuf, File)>,
        state: Arc<Mutex<TargetState>>,
        realtime: Arc<Realtime>,
    ) -> Result<ResyncServer, String> {
        let listener = TcpListener::bind(shared.local_resync)
            .map_err(|e| format!("cannot listen for resyncs on {}: {e}", shared.local_resync))?;
        let accepting = listener.try_clone().map_err(|e| e.to_string())?;
        let stopping = Arc::new(AtomicBool::new(false));
        let serving = Arc::new(Mutex::new(None));
        let ctx = ServeContext {
            shared: shared.clone(),
            roots,
            state,
            realtime,
            stopping: stopping.clone(),
            serving: serving.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("repl-resync".into())
            .spawn(move || ctx.accept_loop(accepting))
            .map_err(|e| format!("cannot start the resync server: {e}"))?;
        Ok(ResyncServer { listener, stopping, serving, thread: Some(thread) })
    }

    fn stop(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: the listener's fd is open for the duration of the call; shutting it down
        // wakes the accept thread.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(stream) = lock(&self.serving).take() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct ServeContext {
    shared: Arc<Shared>,
    roots: Vec<(PathBuf, File)>,
    state: Arc<Mutex<TargetState>>,
    realtime: Arc<Realtime>,
    stopping: Arc<AtomicBool>,
    serving: Arc<Mutex<Option<TcpStream>>>,
}

impl ServeContext {
    fn accept_loop(self, listener: TcpListener) {
        for stream in listener.incoming() {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let Ok(stream) = stream else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let from = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
            if let Ok(clone) = stream.try_clone() {
                *lock(&self.serving) = Some(clone);
            }
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            self.serve(stream, &from);
            lock(&self.serving).take();
        }
    }

    fn serve(&self, stream: TcpStream, from: &str) {
        let shared = &self.shared;
        let channel = match handshake_receiver(stream, &shared.key, shared.identity, shared.timeout) {
            Ok(c) => c,
            Err(e) => {
                shared.say(LogLevel::Warn, &format!("refused a resync connection from {from}: {e}"));
                return;
            }
        };
        let (receiver, tree) = match roots_from_files(&self.roots) {
            Ok(x) => x,
            Err(e) => {
                shared.say(LogLevel::Error, &format!("cannot open the replicated directories for a resync: {e}"));
                return;
            }
        };
        let mut hooks = Hooks { ctx: self, began: None, finished: false };
        let result = crate::replication::remote::serve_resync(channel, receiver, tree, &mut hooks);
        if let Some(requested) = hooks.began {
            if !hooks.finished {
                let why = match &result {
                    Ok(Served::Closed) | Ok(Served::Finished(_)) => {
                        "the source ended the connection before the end".to_string()
                    }
                    Err(e) => e.to_string(),
                };
                shared.say(LogLevel::Warn, &format!("resync from {} broke off: {why}", shared.peer_name));
                shared.finished(ResyncSummary {
                    ok: false,
                    ended_at: now_epoch(),
                    error: Some(why),
                    ..Default::default()
                });
                if requested {
                    shared.event(Event::ResyncDone { ok: false });
                }
            }
        } else if let Err(e) = result {
            shared.say(LogLevel::Warn, &format!("a resync connection from {from} ended: {e}"));
        }
    }
}

/// The target's answers to the source's control requests.
struct Hooks<'a> {
    ctx: &'a ServeContext,
    /// `Some(requested)` once the resync began (whether the machine asked for it).
    began: Option<bool>,
    finished: bool,
}

impl TargetHooks for Hooks<'_> {
    fn begin(&mut self) -> BeginAnswer {
        let shared = &self.ctx.shared;
        let (requested, in_sync) = {
            let st = lock(&self.ctx.state);
            (st.requested, st.in_sync)
        };
        if requested.is_none() && !in_sync {
            return BeginAnswer::NotReady;
        }
        let unclean = shared.unclean_marker().exists();
        let counts = shared.maps.counts();
        let own_changes = counts.zones > 0 || counts.files > 0 || counts.namespace > 0 || counts.full;
        if own_changes && requested.is_some() && !self.save_aside() {
            return BeginAnswer::NotReady;
        }
        if let Err(e) = self.ctx.realtime.restart(shared) {
            shared.say(LogLevel::Error, &e);
            return BeginAnswer::NotReady;
        }
        let full = requested.unwrap_or(false) || unclean || own_changes;
        if unclean {
            shared.say(LogLevel::Info, "this node stopped uncleanly as primary: the resync compares everything");
        }
        if requested.is_some() {
            shared.event(Event::ResyncStarted);
        }
        self.began = Some(requested.is_some());
        BeginAnswer::Ready { full }
    }

    fn progress(&mut self, view: ResyncView) {
        self.ctx.shared.view.send_modify(|v| v.resync = Some(view));
    }

    fn finish(&mut self, ok: bool) {
        let shared = &self.ctx.shared;
        self.finished = true;
        let last = shared.view.borrow().resync.clone().unwrap_or_default();
        let summary = |error: Option<String>| ResyncSummary {
            ok: error.is_none(),
            full: last.full,
            bytes_sent: last.bytes_sent,
            bytes_examined: last.bytes_done,
            elapsed_ms: last.elapsed_ms,
            ended_at: now_epoch(),
            error,
        };
        let requested = self.began == Some(true);
        if ok {
            // This node now equals the source: its own records are void.
            let cleared = shared
                .maps
                .clear_upto(shared.maps.generation())
                .and_then(|()| remove_marker(&shared.unclean_marker()))
                .and_then(|()| remove_marker(&shared.state_dir.join(ASIDE_MARKER)));
            if let Err(e) = cleared {
                shared.say(LogLevel::Error, &format!("cannot clear this node's replication records: {e}"));
            }
            if last.full || last.bytes_sent > 0 || last.bytes_done > 0 {
                shared.finished(summary(None));
            } else {
                // Nothing was sent: the last real resync's figures stay.
                shared.view.send_modify(|v| v.resync = None);
            }
            shared.say(LogLevel::Info, &format!("resync from {} done: this node is up to date", shared.peer_name));
        } else {
            shared.finished(summary(Some("the source ended the resync early".into())));
        }
        if requested {
            lock(&self.ctx.state).requested = None;
            shared.event(Event::ResyncDone { ok });
        }
    }
}

impl Hooks<'_> {
    /// After a split brain this node's own changes are about to be overwritten: copies them
    /// aside first, once. False when they could not be saved (the resync must not begin).
    fn save_aside(&self) -> bool {
        let shared = &self.ctx.shared;
        let marker = shared.state_dir.join(ASIDE_MARKER);
        if let Ok(saved) = std::fs::read_to_string(&marker) {
            shared.view.send_modify(|v| v.split_brain_saved = Some(saved.trim().to_string()));
            return true;
        }
        let dest = crate::replication::aside::aside_dir(&shared.state_root, &shared.module, SystemTime::now());
        let set = shared.maps.snapshot();
        let result = roots_from_files(&self.ctx.roots)
            .and_then(|(_, tree)| crate::replication::aside::save_aside(&tree, &shared.roots, &set, &dest))
            .and_then(|report| {
                std::fs::write(&marker, format!("{}\n", report.dest.display()))?;
                File::open(&marker)?.sync_all()?;
                Ok(report)
            });
        match result {
            Ok(report) => {
                shared.say(
                    LogLevel::Warn,
                    &format!(
                        "split brain: this node's own changes ({} files, {}) were saved in {} before the resync overwrites them",
                        report.files,
                        bytes(report.bytes),
                        report.dest.display()
                    ),
                );
                shared.view.send_modify(|v| v.split_brain_saved = Some(report.dest.display().to_string()));
                true
            }
            Err(e) => {
                let mut st = lock(&self.ctx.state);
                if !st.aside_failed {
                    st.aside_failed = true;
                    shared.say(
                        LogLevel::Error,
                        &format!(
                            "split brain: cannot save this node's own changes in {}: {e}; the resync waits (free space there, or move the data away yourself and run `hamirror second --full`)",
                            dest.display()
                        ),
                    );
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::sender::MemoryTracker;

    fn absent() -> Sender {
        Sender::alone(SyncMode::Sync, Arc::new(MemoryTracker::new()), "no peer in this test")
    }

    /// Whether thread `tid` of this process sleeps (blocked in the kernel).
    fn sleeping(tid: i32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
        stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('S'))
    }

    #[test]
    fn a_fenced_write_is_released_when_a_join_replaces_its_sender() {
        // Proves: a synchronous write recorded while the peer claims to be up to date waits (fence), and returns once a join has replaced the sender it went to (the join shipped it), though the peer still claims to be up to date.
        let sink = Arc::new(ReplicaSink::new(absent(), SyncMode::Sync, "m"));
        sink.set_fence(true);
        let file = RelPath::new(0, "f").unwrap();
        let seq = sink.submit(Op::Write { file, offset: 0, data: b"x".to_vec() });
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let waiter = sink.clone();
        let thread = std::thread::spawn(move || {
            tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
            done_tx.send(waiter.wait_durable(seq).is_ok())
        });
        let tid = tid_rx.recv().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sleeping(tid) {
            assert!(done_rx.try_recv().is_err(), "a fenced write returned before the join");
            assert!(Instant::now() < deadline, "the write never waited");
            std::thread::sleep(Duration::from_millis(5));
        }
        sink.replace(absent());
        let done = done_rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(done, Ok(true), "the write is still fenced after the join replaced its sender");
        thread.join().unwrap().unwrap();
    }
}
