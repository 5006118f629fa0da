//! The module state machine, sans-IO: plain data in ([`Event`]), plain data out ([`Action`]),
//! with no sockets, clocks, threads or processes inside. The daemon's supervisor is the only
//! code that turns actions into I/O; the simulator in `tests/` drives two of these machines
//! over a simulated network and clock.

mod machine;
mod types;

pub use machine::{relation, Module, Relation};
pub use types::*;

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::config::{DefaultPrim, ModuleConfig};

/// The parameters of one module on one node, taken from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleParams {
    pub name: String,
    /// 0 or 1: this node's index in the pair (cluster.xml node names, sorted).
    pub node_index: u8,
    /// Names of the two nodes, indexed by node index.
    pub node_names: [String; 2],
    /// Names of the heartbeat lans; events and snapshots index them.
    pub lans: Vec<String>,
    pub pulse: Duration,
    pub timeout: Duration,
    pub failover_auto: bool,
    pub defaultprim: DefaultPrim,
    pub maxloop: u32,
    pub loop_interval: Duration,
    pub witness_configured: bool,
    /// How long the witnesses get to answer (see [`witness_timeout`]).
    pub witness_timeout: Duration,
    /// The module replicates directories: a primary counts its secondary as fed (PRIM) only
    /// once [`Event::ReplicationUp`] said the real-time stream carries every change.
    pub replicated: bool,
}

/// How long the witnesses get to answer a ping: a third of the heartbeat timeout, within
/// 300 ms and 3 s.
pub fn witness_timeout(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout / 3).clamp(Duration::from_millis(300), Duration::from_secs(3))
}

impl ModuleParams {
    /// Parameters for `config` on the node called `local` of the pair `nodes`.
    pub fn from_config(config: &ModuleConfig, local: &str, nodes: [String; 2]) -> ModuleParams {
        let node_index = if nodes[0] == local { 0 } else { 1 };
        ModuleParams {
            name: config.name.clone(),
            node_index,
            node_names: nodes,
            lans: config.heart.lans.clone(),
            pulse: config.heart.pulse,
            timeout: config.heart.timeout,
            failover_auto: config.failover.auto,
            defaultprim: config.failover.defaultprim.clone(),
            maxloop: config.failover.maxloop,
            loop_interval: config.failover.loop_interval,
            witness_configured: config.splitbrain.is_some(),
            replicated: config.rfs.is_some(),
            witness_timeout: witness_timeout(config.heart.timeout),
        }
    }
}

/// What survives a restart of the daemon, per module and node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    /// The administrator wants the module running: a restarted daemon starts it again.
    pub running: bool,
    pub last_role: Role,
    /// This node cannot rule out that the peer holds data it lacks (it was secondary).
    pub peer_may_be_newer: bool,
    /// This node's data is known to be older than the peer's, or a resync into it did not
    /// finish: it is never made primary without `prim --force`.
    pub stale: bool,
    /// Newest last; at most [`HISTORY_MAX`].
    pub history: Vec<Generation>,
    /// Highest generation counter this node has used.
    pub gen_seq: u64,
    /// start_prim began and stop_prim has not run since: after a daemon crash, the
    /// application may still run and is stopped before anything else.
    #[serde(default)]
    pub app_running: bool,
}

impl Default for PersistedState {
    fn default() -> Self {
        PersistedState {
            running: false,
            last_role: Role::None,
            peer_may_be_newer: false,
            stale: false,
            history: Vec::new(),
            gen_seq: 0,
            app_running: false,
        }
    }
}

/// An input to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An authenticated heartbeat from the peer on lan `lan` (index into [`ModuleParams::lans`]).
    Heartbeat { lan: usize, status: PeerStatus },
    /// The answer to [`Action::CheckWitness`]: did at least one witness answer?
    Witness { reachable: bool },
    /// A script asked by [`Action::RunScript`] ended.
    ScriptDone { script: Script, outcome: ScriptOutcome },
    /// A checker of the application failed.
    CheckerFailed { ident: String, action: crate::config::CheckAction },
    /// The peer accepted the resync asked by [`Action::StartResync`]: from now until it ends,
    /// this node's data is a mix of old and new.
    ResyncStarted,
    /// The resync asked by [`Action::StartResync`] ended (`ok: false` when the peer refused it
    /// or it broke off).
    ResyncDone { ok: bool },
    /// Primary: the real-time replication stream to the peer broke (the peer is unreachable on
    /// the replication lan, refused an operation, or stopped answering); changes are tracked.
    ReplicationLost { reason: String },
    /// Primary: the peer is up to date and the real-time stream carries every change.
    ReplicationUp,
}

/// An output of the machine, executed by the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run a script; answer with [`Event::ScriptDone`]. Stop scripts escalate to `force`
    /// after `nicestoptimeout` inside the supervisor.
    RunScript(Script),
    /// Send this heartbeat on every heartbeat lan.
    SendHeartbeat(PeerStatus),
    /// Ping the witnesses; answer with [`Event::Witness`].
    CheckWitness,
    /// Bring this node's data up to date from the peer; answer with [`Event::ResyncStarted`]
    /// once the peer serves it (before any data changes), then [`Event::ResyncDone`].
    StartResync { full: bool },
    /// Abandon a resync in progress.
    StopResync,
    /// Run (true) or stop (false) the application checkers.
    Checkers(bool),
    /// Write this to stable storage before acting further.
    Persist(PersistedState),
    /// One line for the module's log.
    Log(LogLevel, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Info,
    Warn,
    Error,
}

/// Why an admin command was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("module {0} is already running")]
    AlreadyRunning(String),
    #[error("module {0} is stopped: start it first")]
    NotRunning(String),
    #[error("module {module} cannot {command} now: {why}")]
    Refused { module: String, command: &'static str, why: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LanStatus {
    pub name: String,
    pub up: bool,
}

/// A read-only picture of the machine, for `status` and the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub state: State,
    pub transition: Option<Transition>,
    pub wait_reason: Option<WaitReason>,
    pub role: Role,
    /// Every heartbeat lan and whether the peer's heartbeats arrive on it.
    pub lans: Vec<LanStatus>,
    pub peer: Option<PeerStatus>,
    pub generation: Option<Generation>,
    pub in_sync: bool,
    pub restarts_in_window: u32,
}
