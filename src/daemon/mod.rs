//! The node daemon: one supervisor task per module, the admin API, clean shutdown.

pub mod checkers;
pub mod control;
pub mod logs;
pub mod scripts;

use std::net::SocketAddr;

use crate::paths::Paths;

/// How `hamirror daemon` was called.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub paths: Paths,
    /// `--node`: this node's name in cluster.xml; `None` = the node whose address is local.
    pub node: Option<String>,
    /// TCP address of the admin HTTP API and health-check URL (`None` = Unix socket only).
    pub api_listen: Option<SocketAddr>,
}

/// Runs the node daemon until SIGTERM/SIGINT.
pub fn run(_opts: DaemonOptions) -> anyhow::Result<()> {
    anyhow::bail!("the daemon is being written")
}
