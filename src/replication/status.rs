//! What the daemon shows of a module's replication (`status`, `GET /api/v1/modules/<m>`) and
//! what `verify` reports. Field names are a stable contract (`--json`).

use serde::{Deserialize, Serialize};

/// A module's replication as one node sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationView {
    /// What this node's copy is doing.
    pub role: DataRole,
    /// `sync` or `async` (the module's `<rfs sync>`).
    pub mode: String,
    /// Primary: the real-time stream to the peer is up (every change reaches it).
    pub connected: bool,
    /// Primary: why the peer does not get the changes (one sentence), when it does not.
    pub absent_reason: Option<String>,
    /// Primary: changes submitted but not yet applied by the peer.
    pub lag: LagView,
    /// Primary: zones and namespace changes the peer lacks (the next resync's work).
    pub dirty_zones: u64,
    pub dirty_bytes: u64,
    /// A resync in progress (on both nodes: the source computes it and tells the target).
    pub resync: Option<ResyncView>,
    /// How the last resync ended.
    pub last_resync: Option<ResyncSummary>,
    /// Secondary after a split brain: where this node's divergent files were saved before
    /// the resync overwrote them.
    pub split_brain_saved: Option<String>,
}

/// What this node's copy of the data is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataRole {
    /// Not mounted (STOP, WAIT).
    #[default]
    None,
    /// Primary: the mountover is read-write and changes are shipped or tracked.
    Source,
    /// Secondary: read-only view; only the replication receiver writes.
    Target,
}

/// How far the peer trails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagView {
    pub ops: u64,
    pub bytes: u64,
    pub oldest_ms: Option<u64>,
}

/// A running resync.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncView {
    pub full: bool,
    /// Bytes examined (full: compared by checksum; changes only: dirty zones handled).
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub files_total: u64,
    /// Data bytes sent to the target.
    pub bytes_sent: u64,
    /// Milliseconds since it started.
    pub elapsed_ms: u64,
    /// Pass number (a changes-only resync repeats until what changed meanwhile is small).
    pub pass: u32,
}

/// How a resync ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncSummary {
    pub ok: bool,
    pub full: bool,
    pub bytes_sent: u64,
    pub bytes_examined: u64,
    pub elapsed_ms: u64,
    /// Seconds since the Unix epoch when it ended.
    pub ended_at: u64,
    /// Why it failed, one sentence.
    pub error: Option<String>,
}

/// What `verify` found: the primary's copy compared with the secondary's, by checksum.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub files_compared: u64,
    pub bytes_compared: u64,
    pub elapsed_ms: u64,
    /// Empty when both copies are equal.
    pub differences: Vec<Difference>,
    /// More differences than listed (the list is bounded).
    pub truncated: bool,
}

/// One difference between the two copies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// The replicated directory as configured, and the path below it.
    pub dir: String,
    pub path: String,
    pub kind: DifferenceKind,
    /// For `content`: the byte ranges `[start, end)` whose checksums differ (merged).
    #[serde(default)]
    pub ranges: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DifferenceKind {
    /// On the primary only.
    MissingOnSecondary,
    /// On the secondary only.
    OnlyOnSecondary,
    /// File, directory, symbolic link... differ.
    Type,
    /// Regular files of different sizes.
    Size,
    /// Same size, some blocks differ.
    Content,
    /// Symbolic link targets differ.
    LinkTarget,
    /// Mode, owner or extended attributes differ.
    Attributes,
}
