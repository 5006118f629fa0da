//! The handle the API uses to read and command the running modules. It only passes data:
//! every decision is taken by the module's machine inside its supervisor task.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tokio::sync::{mpsc, oneshot, watch};

use crate::module::{AdminCommand, CommandError, Snapshot};
use crate::replication::status::{ReplicationView, VerifyReport};

/// What `status` and `GET /api/v1/modules[/m]` show of one module. Field names are a stable
/// contract (`--json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleView {
    pub name: String,
    pub id: Option<u16>,
    pub mode: Option<crate::config::ModuleMode>,
    pub node: String,
    pub peer_node: Option<String>,
    /// `None` when the module could not be loaded (see `error`).
    pub status: Option<Snapshot>,
    /// The configuration error that keeps this module from running.
    pub error: Option<String>,
    /// Heartbeat datagrams dropped since the daemon started, by reason.
    #[serde(default)]
    pub heartbeats_rejected: Option<crate::cluster::RejectCounts>,
    /// The module's data replication (`None`: the module replicates no directory).
    #[serde(default)]
    pub replication: Option<ReplicationView>,
}

/// A request to one module's supervisor task.
pub struct ModuleRequest {
    pub command: AdminCommand,
    pub reply: oneshot::Sender<Result<(), CommandError>>,
}

/// One running module as the API sees it.
pub struct ModuleHandle {
    pub view: ModuleView,
    pub snapshot: watch::Receiver<Snapshot>,
    pub commands: mpsc::Sender<ModuleRequest>,
    /// The heartbeat transport's drop counters (`None` in tests without a transport).
    pub rejected: Option<std::sync::Arc<crate::cluster::RejectCounters>>,
    /// The module's replication as it changes (`None`: no replicated directory).
    pub replication: Option<watch::Receiver<ReplicationView>>,
    /// Asks the module's replication for an online comparison of both copies.
    pub verify: Option<mpsc::Sender<VerifyRequest>>,
}

/// A `verify` request: the reply is the report, or one sentence saying why none was made.
pub type VerifyRequest = oneshot::Sender<Result<VerifyReport, String>>;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no module named {0} is installed")]
    UnknownModule(String),
    #[error("module {name} is not running because of its configuration: {error}")]
    Broken { name: String, error: String },
    #[error("module {0} did not answer (its task has ended)")]
    Gone(String),
    #[error(transparent)]
    Refused(#[from] CommandError),
    #[error("module {0} replicates no directory: there is nothing to verify")]
    NotReplicated(String),
    #[error("verify of module {name} failed: {error}")]
    Verify { name: String, error: String },
}

/// Every installed module, running or broken.
#[derive(Default)]
pub struct Control {
    pub node: String,
    pub running: BTreeMap<String, ModuleHandle>,
    /// Modules whose configuration was refused: name → (view with `error` set).
    pub broken: BTreeMap<String, ModuleView>,
    pub log_dir: PathBuf,
    /// Asks the daemon to load newly installed modules and drop removed ones.
    pub reload: Option<mpsc::Sender<oneshot::Sender<ReloadReport>>>,
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub started: Vec<String>,
    pub removed: Vec<String>,
    /// Modules refused, with the error sentence.
    pub refused: Vec<(String, String)>,
}

impl Control {
    pub fn list(&self) -> Vec<ModuleView> {
        let mut all: Vec<ModuleView> = self.running.keys().filter_map(|n| self.get(n)).collect();
        all.extend(self.broken.values().cloned());
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn get(&self, name: &str) -> Option<ModuleView> {
        if let Some(h) = self.running.get(name) {
            let mut v = h.view.clone();
            v.status = Some(h.snapshot.borrow().clone());
            v.heartbeats_rejected = h.rejected.as_ref().map(|c| c.counts());
            v.replication = h.replication.as_ref().map(|r| r.borrow().clone());
            return Some(v);
        }
        self.broken.get(name).cloned()
    }

    /// The handle of a running module, or why there is none.
    pub fn running(&self, name: &str) -> Result<&ModuleHandle, ControlError> {
        self.running.get(name).ok_or_else(|| match self.broken.get(name) {
            Some(v) => ControlError::Broken { name: name.to_string(), error: v.error.clone().unwrap_or_default() },
            None => ControlError::UnknownModule(name.to_string()),
        })
    }

    pub async fn command(&self, name: &str, command: AdminCommand) -> Result<(), ControlError> {
        let h = self.running(name)?;
        let (reply, rx) = oneshot::channel();
        h.commands.send(ModuleRequest { command, reply }).await.map_err(|_| ControlError::Gone(name.to_string()))?;
        rx.await.map_err(|_| ControlError::Gone(name.to_string()))??;
        Ok(())
    }

    /// The module's daemon log, or with `user` its scripts' output.
    pub fn log_path(&self, name: &str, user: bool) -> Result<PathBuf, ControlError> {
        if !self.running.contains_key(name) && !self.broken.contains_key(name) {
            return Err(ControlError::UnknownModule(name.to_string()));
        }
        let file = if user { format!("{name}.user.log") } else { format!("{name}.log") };
        Ok(self.log_dir.join(file))
    }
}
