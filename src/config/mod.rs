//! Configuration: `cluster.xml` and `modules/<name>/userconfig.xml`, parsed with quick-xml into
//! the typed structs below and validated before anything starts.
//!
//! Every error names the file, the line, the element or attribute, what was expected and what
//! was found (see [`ConfigError`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod check;
mod cluster;
mod error;
mod module;
mod units;
mod xml;

pub use cluster::{load_cluster, parse_cluster, LocalNodeError};
pub use error::{ConfigError, ConfigErrorKind};
pub use module::{
    load_module, load_modules, parse_module, ModuleSet, DEFAULT_CHECK_INTERVAL, DEFAULT_HEART_TIMEOUT,
    DEFAULT_LOOP_INTERVAL, DEFAULT_MAXLOOP, DEFAULT_PULSE, DEFAULT_SCRIPT_TIMEOUT, DEFAULT_VM_STOP_TIMEOUT,
    DEFAULT_VM_URI, DEFAULT_ZONE, MAX_ZONE, MIN_CHECK_INTERVAL, MIN_PULSE, MIN_ZONE,
};
pub use units::{
    format_duration, format_size, parse_duration, parse_size, DURATION_EXPECTED, DURATION_MAX, SIZE_EXPECTED,
};

/// Reads a configuration file as UTF-8 text; a missing or unreadable file, or one that is not
/// UTF-8, is a [`ConfigError`] naming the path.
fn read_file(path: &Path) -> Result<String, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::io(path, &e))?;
    xml::decode(&bytes, path)
}

/// Highest number of mirror modules one node runs; the next one is refused.
pub const MIRROR_MODULES_MAX: usize = 32;
/// Module ids run from 1 to this value; ports derive from the id (see [`ModuleConfig::heartbeat_port`]).
pub const MODULE_ID_MAX: u16 = 1000;
/// First port of the per-module port block: module `id` uses `PORT_BASE + 4*id .. + 3`.
pub const PORT_BASE: u16 = 10000;

/// `cluster.xml`: the same file on every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub name: String,
    pub lans: Vec<Lan>,
}

/// One network (`<lan name="...">`) and the address of every node on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lan {
    pub name: String,
    pub nodes: Vec<LanNode>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanNode {
    pub name: String,
    pub addr: IpAddr,
}

/// `modules/<name>/userconfig.xml`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleConfig {
    pub name: String,
    pub mode: ModuleMode,
    pub id: u16,
    pub heart: HeartConfig,
    pub failover: FailoverConfig,
    /// `None` when there is no `<splitbrain>` element or its witness list is empty.
    pub splitbrain: Option<SplitBrainConfig>,
    pub rfs: Option<RfsConfig>,
    pub vm: Option<VmConfig>,
    pub user: UserConfig,
    pub checks: Vec<CheckConfig>,
}

impl ModuleConfig {
    /// UDP port of this module's heartbeats, on every heartbeat lan.
    pub fn heartbeat_port(&self) -> u16 {
        PORT_BASE + 4 * self.id
    }
    /// TCP port of this module's real-time replication stream (the secondary listens).
    pub fn replication_port(&self) -> u16 {
        PORT_BASE + 4 * self.id + 1
    }
    /// TCP port of this module's resync and verify connections (the secondary listens).
    pub fn resync_port(&self) -> u16 {
        PORT_BASE + 4 * self.id + 2
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleMode {
    Mirror,
    Farm,
}

/// `<heart pulse=".." timeout=".."><lan name=".."/>...</heart>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartConfig {
    pub pulse: Duration,
    pub timeout: Duration,
    /// Lan names from cluster.xml; never empty (default: every lan of cluster.xml).
    pub lans: Vec<String>,
}

/// `<failover auto="on" defaultprim="alone" maxloop="3" loop_interval="24h"/>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverConfig {
    pub auto: bool,
    pub defaultprim: DefaultPrim,
    pub maxloop: u32,
    pub loop_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPrim {
    /// No preference.
    Alone,
    /// Prefer the node that was primary last.
    Lastprim,
    /// Prefer this node: swap back to it automatically once it is back in sync.
    Node(String),
}

/// `<splitbrain witness="ip ip"/>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitBrainConfig {
    pub witnesses: Vec<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    Sync,
    Async,
}

/// `<rfs sync=".." lan=".." zone=".." bandwidth="..">`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RfsConfig {
    pub sync: SyncMode,
    pub lan: String,
    pub zone_bytes: u64,
    /// Resync rate cap in bytes per second; 0 = no cap.
    pub bandwidth_bytes_per_s: u64,
    pub replicated: Vec<ReplicatedDir>,
}

/// `<replicated dir="/abs"/>`, with the paths below it that are served but not shipped
/// (`<notreplicated path="rel"/>`, relative to `dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatedDir {
    pub dir: PathBuf,
    pub notreplicated: Vec<PathBuf>,
}

/// `<vm name=".." uri=".." stop_timeout=".."/>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub name: String,
    pub uri: String,
    pub stop_timeout: Duration,
}

/// `<user nicestoptimeout=".." forcestoptimeout=".."><var name=".." value=".."/></user>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserConfig {
    pub nicestoptimeout: Duration,
    pub forcestoptimeout: Duration,
    /// Start scripts (prestart, start_*) are killed after this long; their failure is a module failure.
    pub starttimeout: Duration,
    /// Exported to every script's environment, in order.
    pub vars: Vec<(String, String)>,
}

/// What a checker does when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckAction {
    /// Restart the application on this node (counts toward maxloop).
    Restart,
    /// Stop the module (the peer takes over), then start it again (counts toward maxloop).
    Stopstart,
}

/// One `<check>` child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConfig {
    pub ident: String,
    pub kind: CheckKind,
    pub action: CheckAction,
    /// How often the checker runs (`interval`, default 1s).
    pub interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// `<proc name="nginx" atleast="1"/>`: at least `atleast` processes whose comm is `name`.
    Proc { name: String, atleast: u32 },
    /// `<tcp ident=".." addr=".." port=".."/>`: a TCP connect succeeds.
    Tcp { addr: IpAddr, port: u16 },
    /// `<custom ident=".." script=".."/>`: a script in `modules/<name>/bin/` exits 0.
    Custom { script: String },
    /// `<vm ident=".."/>`: the module's domain (from its `<vm>`) is running: not crashed, not
    /// shut off from inside the guest, not paused on an I/O error.
    Vm { name: String, uri: String },
}
