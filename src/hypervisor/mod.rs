//! The hypervisor driver: what a VM module needs from libvirt (or Hyper-V) to define, start,
//! stop and watch one domain.
//!
//! Every call is blocking and may take seconds; async code runs it with `spawn_blocking`.
//! A driver never reports a VM as dead because the hypervisor did not answer: an unreachable
//! hypervisor is [`HvError::Unreachable`], which callers treat as "unknown", never as
//! "shut off".

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The state of one domain, as the hypervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    /// Running (or blocked on a resource: still alive).
    Running,
    /// Paused; `io_error` when the hypervisor paused it on a disk I/O error.
    Paused { io_error: bool, reason: String },
    /// A shutdown is in progress.
    ShuttingDown,
    /// Not running; `reason` says why (shut down from inside, destroyed, never started, ...).
    ShutOff { reason: String },
    /// The guest crashed (libvirt's crashed state, a guest panic).
    Crashed,
    /// Suspended to memory or saved to disk.
    Suspended,
    /// Starting (Hyper-V reports it; libvirt goes straight to running).
    Starting,
    /// No domain of that name is defined.
    Undefined,
}

impl DomainState {
    /// Running, or on its way to run: the VM must not be started elsewhere.
    pub fn is_active(&self) -> bool {
        !matches!(self, DomainState::ShutOff { .. } | DomainState::Undefined | DomainState::Crashed)
    }
}

/// One line of [`Hypervisor::list`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DomainSummary {
    pub name: String,
    pub state: DomainState,
}

/// How a graceful stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopOutcome {
    /// It was not running.
    AlreadyOff,
    /// The guest shut down within the timeout.
    ShutDown,
    /// The guest did not shut down in time and was destroyed (powered off).
    Destroyed,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HvError {
    /// The hypervisor did not answer (daemon down, restarting, connection lost): nothing is
    /// known about the domain.
    #[error("the hypervisor at {uri} does not answer: {why}")]
    Unreachable { uri: String, why: String },
    /// No domain of that name is defined.
    #[error("there is no domain named {0}")]
    NoDomain(String),
    /// The hypervisor answered with an error.
    #[error("{0}")]
    Failed(String),
}

/// What a VM module drives. Implementations are cheap to share between threads.
pub trait Hypervisor: Send + Sync {
    /// The URI this driver talks to, for messages.
    fn uri(&self) -> &str;
    /// Every defined domain and its state.
    fn list(&self) -> Result<Vec<DomainSummary>, HvError>;
    /// The state of `name`; [`DomainState::Undefined`] when no such domain is defined.
    fn state(&self, name: &str) -> Result<DomainState, HvError>;
    /// The persistent definition of `name` (libvirt: inactive XML, secure fields included).
    fn domain_xml(&self, name: &str) -> Result<String, HvError>;
    /// Defines (or redefines) a domain from its XML definition.
    fn define(&self, xml: &str) -> Result<(), HvError>;
    /// Removes the definition of `name`, keeping every file (disks, NVRAM).
    fn undefine(&self, name: &str) -> Result<(), HvError>;
    /// Starts a defined domain.
    fn start(&self, name: &str) -> Result<(), HvError>;
    /// Asks the guest to shut down (ACPI), waits up to `timeout` for it to be off, then
    /// destroys it.
    fn shutdown(&self, name: &str, timeout: Duration) -> Result<StopOutcome, HvError>;
    /// Powers the domain off at once.
    fn destroy(&self, name: &str) -> Result<(), HvError>;
    /// Whether the hypervisor starts `name` at its own boot.
    fn autostart(&self, name: &str) -> Result<bool, HvError>;
    fn set_autostart(&self, name: &str, on: bool) -> Result<(), HvError>;
}

pub mod hyperv;
pub mod libvirt;

/// The driver for `uri`: Hyper-V (through PowerShell) for a `hyperv` scheme such as
/// `hyperv:///local`, libvirt for anything else. Opens nothing: the first call does.
pub fn connect(uri: &str) -> Box<dyn Hypervisor> {
    let scheme = uri.split_once(':').map_or("", |(scheme, _)| scheme);
    if scheme.eq_ignore_ascii_case("hyperv") {
        Box::new(hyperv::HyperV::new(uri, Box::new(hyperv::SystemPowerShell::new())))
    } else {
        Box::new(libvirt::Libvirt::new(uri))
    }
}
