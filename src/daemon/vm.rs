//! A VM module's domain (DESIGN.md, "VMs"): `start_prim` defines it if needed and starts it,
//! `stop_prim` shuts it down (ACPI, `stop_timeout`, then destroy), and the primary keeps the
//! peer's definition in step. Before starting, the peer's hypervisor is asked: the VM never
//! runs on both hosts.
//!
//! Every method blocks (hypervisor and peer calls): call them off the async path.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cluster::ClusterKey;
use crate::config::{ClusterConfig, VmConfig};
use crate::hypervisor::{DomainState, Hypervisor, StopOutcome};
use crate::module::LogLevel;
use crate::peer::{PeerAnswer, PeerClient, PeerRequest};

use super::logs::ModuleLog;

/// How long connecting to the peer daemon may take before a start goes on without its word
/// (a powered-off peer refuses or drops the connection: this bounds the failover's cost).
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the peer may take to answer one request.
const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the peer daemon is.
pub struct PeerLink {
    pub cluster: Arc<ClusterConfig>,
    pub key: ClusterKey,
    pub node: String,
    pub peer: String,
}

impl PeerLink {
    /// One request to the peer's service.
    pub fn call(&self, request: &PeerRequest) -> Result<PeerAnswer, String> {
        let mut client = PeerClient::connect(&self.cluster, &self.key, &self.node, &self.peer, PEER_CONNECT_TIMEOUT)?;
        client.call(request, PEER_CALL_TIMEOUT)
    }
}

/// The domain of one VM module.
pub struct ModuleVm {
    module: String,
    config: VmConfig,
    hv: Arc<dyn Hypervisor>,
    peer: PeerLink,
    /// This node's copy of the definition, to define the domain again if the hypervisor lost it.
    saved_xml: PathBuf,
    /// The definition last defined on the peer.
    pushed: Mutex<Option<String>>,
    log: ModuleLog,
}

impl ModuleVm {
    pub fn new(
        module: &str,
        config: VmConfig,
        hv: Arc<dyn Hypervisor>,
        peer: PeerLink,
        state_dir: PathBuf,
        log: ModuleLog,
    ) -> ModuleVm {
        ModuleVm {
            module: module.to_string(),
            config,
            hv,
            peer,
            saved_xml: state_dir.join("domain.xml"),
            pushed: Mutex::new(None),
            log,
        }
    }

    pub fn hypervisor(&self) -> Arc<dyn Hypervisor> {
        self.hv.clone()
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn say(&self, level: LogLevel, text: &str) {
        self.log.say(&self.module, level, text);
    }

    /// What the peer's hypervisor says of the domain; `Err` when it cannot be asked.
    fn peer_state(&self) -> Result<DomainState, String> {
        let request = PeerRequest::DomainState { uri: self.config.uri.clone(), name: self.config.name.clone() };
        match self.peer.call(&request)? {
            PeerAnswer::DomainState(state) => Ok(state),
            other => Err(format!("{} answered {other:?} to a domain state request", self.peer.peer)),
        }
    }

    /// `start_prim`: refuses when the domain is active on the peer, defines it from this node's
    /// copy when the hypervisor does not know it, then starts it. The peer's daemon is asked
    /// only while its heartbeats arrive (`peer_heard`): a peer lost on every lan cannot be
    /// reached on those lans either, and asking would only delay the failover.
    pub fn start(&self, peer_heard: bool) -> Result<(), String> {
        let name = &self.config.name;
        let peer =
            if peer_heard { self.peer_state() } else { Err(format!("{} is not heard on any lan", self.peer.peer)) };
        match peer {
            Ok(state) if state.is_active() => {
                return Err(format!(
                    "domain {name} is {} on {}: it is not started here, a VM never runs on both hosts",
                    state_word(&state),
                    self.peer.peer
                ))
            }
            Ok(_) => {}
            Err(why) => self.say(LogLevel::Info, &format!("the peer was not asked whether {name} runs there: {why}")),
        }
        if self.hv.state(name).map_err(|e| e.to_string())? == DomainState::Undefined {
            let xml = std::fs::read_to_string(&self.saved_xml).map_err(|e| {
                format!(
                    "domain {name} is not defined in {} and there is no copy of its definition ({}: {e})",
                    self.hv.uri(),
                    self.saved_xml.display()
                )
            })?;
            self.hv
                .define(&xml)
                .map_err(|e| format!("cannot define domain {name} from {}: {e}", self.saved_xml.display()))?;
            self.say(LogLevel::Info, &format!("domain {name} defined from {}", self.saved_xml.display()));
        }
        self.hv.start(name).map_err(|e| format!("cannot start domain {name}: {e}"))?;
        self.say(LogLevel::Info, &format!("domain {name} started"));
        Ok(())
    }

    /// `stop_prim`: ACPI shutdown, `stop_timeout`, then destroy. A crashed guest or one paused on
    /// an I/O error cannot shut down: it is destroyed at once.
    pub fn stop(&self) -> Result<StopOutcome, String> {
        let name = &self.config.name;
        let state = self.hv.state(name).map_err(|e| e.to_string())?;
        let outcome = match state {
            DomainState::Crashed | DomainState::Paused { io_error: true, .. } => {
                self.hv.destroy(name).map_err(|e| format!("cannot destroy domain {name}: {e}"))?;
                StopOutcome::Destroyed
            }
            _ => self
                .hv
                .shutdown(name, self.config.stop_timeout)
                .map_err(|e| format!("cannot stop domain {name}: {e}"))?,
        };
        let text = match outcome {
            StopOutcome::AlreadyOff => format!("domain {name} was not running"),
            StopOutcome::ShutDown => format!("domain {name} shut down"),
            StopOutcome::Destroyed => {
                format!("domain {name} destroyed (it did not shut down within {:?})", self.config.stop_timeout)
            }
        };
        self.say(LogLevel::Info, &text);
        Ok(outcome)
    }

    /// On the primary: saves the domain's definition on this node and defines it on the peer
    /// when it changed since the last time. Failures are logged; the next call tries again.
    pub fn sync_definition(&self) {
        let name = &self.config.name;
        let xml = match self.hv.domain_xml(name) {
            Ok(xml) => xml,
            Err(e) => {
                self.say(LogLevel::Warn, &format!("cannot read the definition of domain {name}: {e}"));
                return;
            }
        };
        let saved = std::fs::read_to_string(&self.saved_xml).ok();
        if saved.as_deref() != Some(xml.as_str()) {
            if let Err(e) = crate::paths::write_durably(&self.saved_xml, xml.as_bytes()) {
                self.say(LogLevel::Warn, &format!("cannot save the definition of {name}: {e}"));
            }
        }
        let mut pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        if pushed.as_deref() == Some(xml.as_str()) {
            return;
        }
        let request = PeerRequest::DefineDomain { uri: self.config.uri.clone(), xml: xml.clone() };
        match self.peer.call(&request) {
            Ok(_) => {
                if pushed.is_some() {
                    self.say(
                        LogLevel::Info,
                        &format!("the changed definition of {name} is defined on {}", self.peer.peer),
                    );
                }
                *pushed = Some(xml);
            }
            Err(e) => {
                // The peer is down or its hypervisor is: tried again at the next sync.
                tracing::debug!(module = %self.module, "definition of {name} not pushed: {e}");
            }
        }
    }
}

fn state_word(state: &DomainState) -> &'static str {
    match state {
        DomainState::Running => "running",
        DomainState::Paused { .. } => "paused",
        DomainState::ShuttingDown => "shutting down",
        DomainState::Suspended => "suspended",
        DomainState::Starting => "starting",
        DomainState::ShutOff { .. } => "shut off",
        DomainState::Crashed => "crashed",
        DomainState::Undefined => "not defined",
    }
}

/// The VM checker's verdict on one state: `Err` says why the VM is not healthy.
pub fn judge(state: &DomainState) -> Result<(), String> {
    match state {
        DomainState::Running | DomainState::Starting | DomainState::ShuttingDown => Ok(()),
        // Paused by the admin (or a migration): not a failure.
        DomainState::Paused { io_error: false, .. } => Ok(()),
        DomainState::Paused { io_error: true, .. } => Err("the VM is paused on a disk I/O error".into()),
        DomainState::Crashed => Err("the VM crashed".into()),
        DomainState::ShutOff { reason } => Err(format!("the VM is shut off ({reason})")),
        DomainState::Suspended => Err("the VM is suspended".into()),
        DomainState::Undefined => Err("the domain is not defined".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // What the VM checker counts as a failure, and what it does not.
    #[test]
    fn judge_states() {
        let paused = |io_error| DomainState::Paused { io_error, reason: "x".into() };
        for ok in [DomainState::Running, DomainState::Starting, DomainState::ShuttingDown, paused(false)] {
            assert_eq!(judge(&ok), Ok(()), "{ok:?}");
        }
        assert_eq!(judge(&paused(true)), Err("the VM is paused on a disk I/O error".into()));
        assert_eq!(judge(&DomainState::Crashed), Err("the VM crashed".into()));
        let off = DomainState::ShutOff { reason: "shut down from inside the guest".into() };
        assert_eq!(judge(&off), Err("the VM is shut off (shut down from inside the guest)".into()));
        assert_eq!(judge(&DomainState::Undefined), Err("the domain is not defined".into()));
    }
}
