//! Plain data that goes in and out of the module state machine, and over the wire in heartbeats.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A module's stable state (SafeKit's vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    /// Not running.
    Stop,
    /// Running but not allowed to be primary (see [`WaitReason`]).
    Wait,
    /// Primary without an up-to-date peer: changes are tracked for the later resync.
    Alone,
    /// Primary with an up-to-date SECOND.
    Prim,
    /// Receives replication; the application is stopped.
    Second,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Stop => "STOP",
            State::Wait => "WAIT",
            State::Alone => "ALONE",
            State::Prim => "PRIM",
            State::Second => "SECOND",
        }
    }
    /// Exit code of `hamirror state MODULE --quiet`.
    pub fn exit_code(self) -> i32 {
        match self {
            State::Stop => 0,
            State::Wait => 1,
            State::Alone => 2,
            State::Prim => 3,
            State::Second => 4,
        }
    }
    pub fn is_primary(self) -> bool {
        matches!(self, State::Alone | State::Prim)
    }
}

impl PeerStatus {
    /// The sender runs, or is about to run, the application: primary and not leaving the
    /// role, or starting as primary.
    pub fn acts_primary(&self) -> bool {
        match self.transition {
            Some(Transition::StartingPrimary) => true,
            Some(Transition::Stopping) | Some(Transition::StartingSecondary) => false,
            _ => self.state.is_primary(),
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transient step, shown beside the state (`WAIT (starting)`), never hidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// prestart and the first decision: heartbeats are exchanged, the role is not chosen yet.
    Starting,
    /// Start scripts of the role being entered are running.
    StartingPrimary,
    StartingSecondary,
    /// Stop scripts of the role being left are running.
    Stopping,
    /// The application is being restarted in place (the role is kept).
    Restarting,
    /// The data is being brought up to date from the peer (SECOND only).
    Resyncing,
    /// Waiting for the witness's answer after losing every heartbeat.
    CheckingWitness,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Starting => "starting",
            Transition::StartingPrimary => "starting primary",
            Transition::StartingSecondary => "starting secondary",
            Transition::Stopping => "stopping",
            Transition::Restarting => "restarting",
            Transition::Resyncing => "resyncing",
            Transition::CheckingWitness => "checking witness",
        }
    }
}

/// Why a module sits in WAIT; shown in `status` so the admin knows what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitReason {
    /// Deciding: waiting for the peer's heartbeat or the startup delay.
    Deciding,
    /// Every heartbeat is lost and no witness answered: an admin must run `prim` on one node.
    WitnessUnreachable,
    /// `failover auto="off"`: the peer was lost and an admin must run `prim`.
    FailoverOff,
    /// This node was secondary when it stopped: the peer may hold newer data.
    PeerMayBeNewer,
    /// This node's data is known to be older than the peer's (`prim --force` overrides).
    StaleData,
    /// `second` was asked: this node waits for the peer to be primary.
    SecondRequested,
    /// The peer is primary and this node waits to become its secondary.
    PeerPrimary,
}

impl WaitReason {
    pub fn describe(self) -> &'static str {
        match self {
            WaitReason::Deciding => "waiting for the peer's heartbeat before choosing a role",
            WaitReason::WitnessUnreachable => {
                "every heartbeat is lost and no witness answers: run `hamirror prim` on the node that must be primary"
            }
            WaitReason::FailoverOff => {
                "the peer was lost and automatic failover is off: run `hamirror prim` to take over"
            }
            WaitReason::PeerMayBeNewer => {
                "this node was secondary and the peer may hold newer data: start the peer, or run `hamirror prim`"
            }
            WaitReason::StaleData => {
                "this node's data is older than the peer's: start the peer, or run `hamirror prim --force` to accept losing the newer data"
            }
            WaitReason::SecondRequested => "waiting for the peer to become primary (secondary requested)",
            WaitReason::PeerPrimary => "the peer is primary; waiting to join it as secondary",
        }
    }
}

/// The role a node held last, persisted so that a restart resumes correctly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    None,
    Primary,
    Secondary,
}

/// One data generation. A new one starts whenever a node becomes primary without an
/// up-to-date peer, so the histories of two nodes tell which data descends from which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Generation {
    /// Index of the node that started it (0 or 1, order of the pair's node names).
    pub node: u8,
    /// Per-node counter: unique with `node`.
    pub seq: u64,
    /// How the node that started it became primary: after a split brain, the branch whose
    /// origin ranks higher wins.
    pub origin: Origin,
}

/// How a generation began, in the order a split brain is decided (highest wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A node became primary without an up-to-date peer: at start, or by an admin's `prim`.
    Startup,
    /// An up-to-date secondary took over from its lost or stopped primary.
    Failover,
    /// A primary lost its peer, or its peer stopped replicating, and went on alone.
    Primary,
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.node, self.seq)
    }
}

/// The administrator's commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum AdminCommand {
    Start,
    Stop,
    /// Restart the application on this node in its current role (no failover).
    Restart,
    /// Planned role swap: stop on the primary, then start on the secondary.
    Swap,
    /// Make this node primary; `force` even on data known to be stale.
    Prim {
        #[serde(default)]
        force: bool,
    },
    /// Make this node secondary; `full` asks for a full resync.
    Second {
        #[serde(default)]
        full: bool,
    },
}

impl AdminCommand {
    pub fn name(&self) -> &'static str {
        match self {
            AdminCommand::Start => "start",
            AdminCommand::Stop => "stop",
            AdminCommand::Restart => "restart",
            AdminCommand::Swap => "swap",
            AdminCommand::Prim { .. } => "prim",
            AdminCommand::Second { .. } => "second",
        }
    }
}

/// The user scripts of `modules/<name>/bin/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Script {
    Prestart,
    StartPrim,
    StopPrim,
    StartSecond,
    StopSecond,
    StartBoth,
    StopBoth,
    Poststop,
}

impl Script {
    pub fn file_name(self) -> &'static str {
        match self {
            Script::Prestart => "prestart",
            Script::StartPrim => "start_prim",
            Script::StopPrim => "stop_prim",
            Script::StartSecond => "start_second",
            Script::StopSecond => "stop_second",
            Script::StartBoth => "start_both",
            Script::StopBoth => "stop_both",
            Script::Poststop => "poststop",
        }
    }
    /// Stop scripts run gracefully first, then again with `force` after `nicestoptimeout`.
    pub fn is_stop(self) -> bool {
        matches!(self, Script::StopPrim | Script::StopSecond | Script::StopBoth | Script::Poststop)
    }
}

/// How a script ended. A missing script counts as `Ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScriptOutcome {
    Ok,
    Failed,
    TimedOut,
}

/// What one node tells the other in every heartbeat, per module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub state: State,
    pub transition: Option<Transition>,
    /// Newest last; at most [`HISTORY_MAX`] entries.
    pub history: Vec<Generation>,
    /// SECOND: its data equals the primary's (resync finished).
    pub in_sync: bool,
    /// WAIT: this node would accept to become primary now.
    pub eligible: bool,
    pub last_role: Role,
    /// Counter bumped by each swap request the sender makes; the primary acts once per value.
    pub swap_request: u32,
    /// Counter bumped by each resync this node asks for (SECOND); the primary serves each value
    /// once.
    pub resync_request: u32,
    /// Set by a primary that stopped for a swap: the receiver (SECOND in sync) takes over.
    pub handover: bool,
}

/// Highest number of generations kept in a history (older ones are dropped).
pub const HISTORY_MAX: usize = 64;
