//! The node daemon: one supervisor task per module, the admin API, clean shutdown.

pub mod checkers;
pub mod control;
pub mod logs;
pub mod replication;
pub mod scripts;
pub mod supervisor;
pub mod vm;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::{mpsc, oneshot, watch, RwLock};
use tokio::task::JoinHandle;

use crate::config::{self, ModuleMode};
use crate::paths::Paths;
use control::{Control, ModuleView, ReloadReport};
use supervisor::{start_module, ModuleContext};

/// Worker threads of the daemon's runtime: the work is small and mostly waiting.
const RUNTIME_WORKERS: usize = 2;
/// Reload requests waiting at once.
const RELOAD_QUEUE_MAX: usize = 4;

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
pub fn run(opts: DaemonOptions) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HAMIRROR_LOG").unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_async(opts))
}

/// The heartbeat epoch: the start time in nanoseconds, and never lower than the previous
/// run's (a clock that stepped back would make the peer drop our heartbeats as replays).
fn next_epoch(paths: &Paths) -> anyhow::Result<u64> {
    let file = paths.state_dir.join("epoch");
    let last: u64 = std::fs::read_to_string(&file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let epoch = crate::cluster::epoch_now().max(last.saturating_add(1));
    std::fs::write(&file, format!("{epoch}\n")).with_context(|| format!("cannot write {}", file.display()))?;
    Ok(epoch)
}

struct Running {
    ctx: ModuleContext,
    control: Arc<RwLock<Control>>,
    tasks: BTreeMap<String, JoinHandle<()>>,
    shutdown: watch::Receiver<bool>,
}

impl Running {
    /// Loads the installed modules and starts those not running yet; a module whose config is
    /// refused is reported and skipped, the others run.
    async fn load(&mut self) -> ReloadReport {
        let mut report = ReloadReport::default();
        let set = config::load_modules(&self.ctx.paths, &self.ctx.cluster);
        let mut control = self.control.write().await;
        let installed: Vec<String> =
            set.modules.iter().map(|m| m.name.clone()).chain(set.refused.iter().map(|(n, _)| n.clone())).collect();
        control.broken.clear();
        // Modules whose directory is gone: dropping the command sender ends their task once
        // they are stopped (`module remove` refuses a module that is not STOP). First, so that
        // their places count for the modules loaded below.
        let gone: Vec<String> = control.running.keys().filter(|n| !installed.contains(n)).cloned().collect();
        for name in gone {
            control.running.remove(&name);
            self.tasks.remove(&name);
            report.removed.push(name);
        }
        for (name, error) in set.refused {
            if control.running.contains_key(&name) {
                // A reload never stops a running module: it keeps the configuration it started
                // with (the loader may also refuse it only because a new module comes first in
                // name order; the new one is refused below instead).
                tracing::warn!(
                    module = %name,
                    "its configuration is now refused ({error}); it keeps running with the configuration it started with"
                );
                continue;
            }
            tracing::error!(module = %name, "module refused: {error}");
            report.refused.push((name.clone(), error.to_string()));
            control.broken.insert(name.clone(), broken_view(&name, &self.ctx.node, error.to_string()));
        }
        let mut running_ids: BTreeMap<u16, String> =
            control.running.iter().filter_map(|(n, h)| h.view.id.map(|id| (id, n.clone()))).collect();
        for module in set.modules {
            if control.running.contains_key(&module.name) {
                continue;
            }
            let name = module.name.clone();
            let file = self.ctx.paths.userconfig(&name);
            let refusal = if module.mode == ModuleMode::Farm {
                Some("farm modules are not supported by this version".to_string())
            } else if let Some(other) = running_ids.get(&module.id) {
                Some(format!(
                    "{}: <module> attribute \"id\": id {} is already used by module \"{other}\", which is running; module \"{name}\" is refused",
                    file.display(),
                    module.id
                ))
            } else if control.running.len() >= config::MIRROR_MODULES_MAX {
                Some(format!(
                    "{}: the limit is {} mirror modules per node and {} are running; module \"{name}\" is refused",
                    file.display(),
                    config::MIRROR_MODULES_MAX,
                    control.running.len()
                ))
            } else {
                None
            };
            if let Some(error) = refusal {
                tracing::error!(module = %name, "module refused: {error}");
                report.refused.push((name.clone(), error.clone()));
                control.broken.insert(name.clone(), broken_view(&name, &self.ctx.node, error));
                continue;
            }
            let id = module.id;
            match start_module(&self.ctx, module, self.shutdown.clone()) {
                Ok((handle, task)) => {
                    tracing::info!(module = %name, "module loaded");
                    control.running.insert(name.clone(), handle);
                    self.tasks.insert(name.clone(), watch_task(name.clone(), task));
                    running_ids.insert(id, name.clone());
                    report.started.push(name);
                }
                Err(error) => {
                    tracing::error!(module = %name, "module refused: {error}");
                    report.refused.push((name.clone(), error.clone()));
                    control.broken.insert(name.clone(), broken_view(&name, &self.ctx.node, error));
                }
            }
        }
        report
    }
}

fn broken_view(name: &str, node: &str, error: String) -> ModuleView {
    ModuleView {
        name: name.to_string(),
        id: None,
        mode: None,
        node: node.to_string(),
        peer_node: None,
        status: None,
        error: Some(error),
        heartbeats_rejected: None,
        replication: None,
    }
}

/// Reports a module task that ended by a panic (our bug): the other modules go on.
fn watch_task(name: String, task: JoinHandle<()>) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = task.await {
            if e.is_panic() {
                tracing::error!(module = %name, "the module's supervisor crashed; the other modules go on");
            }
        }
    })
}

/// Holds `hamirror.lock` in the state directory for the daemon's life: a second daemon on the
/// same node would send heartbeats with a newer epoch and make the peer drop the first one's.
fn lock_state_dir(paths: &Paths) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let path = paths.state_dir.join("hamirror.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0)?;
            lock.rewind()?;
            writeln!(lock, "{}", std::process::id())?;
            Ok(lock)
        }
        Err((mut file, _)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            bail!(
                "another hamirror daemon (pid {}) already runs with the state directory {}",
                pid.trim(),
                paths.state_dir.display()
            )
        }
    }
}

async fn run_async(opts: DaemonOptions) -> anyhow::Result<()> {
    let paths = opts.paths.clone();
    std::fs::create_dir_all(paths.log_dir())
        .with_context(|| format!("cannot create the state directory {}", paths.state_dir.display()))?;
    let _lock = lock_state_dir(&paths)?;
    let cluster = config::load_cluster(&paths.cluster_xml())?;
    let node = cluster.local_node(opts.node.as_deref())?;
    let (Some(pair), Some((node_index, _))) = (cluster.pair(), cluster.pair_position(&node)) else {
        bail!("{} must list exactly two nodes for mirror modules", paths.cluster_xml().display());
    };
    let key = crate::cluster::load_key(&paths.cluster_key())?;
    let epoch = next_epoch(&paths)?;
    tracing::info!("node {node} of cluster {} starting", cluster.name);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (reload_tx, mut reload_rx) = mpsc::channel::<oneshot::Sender<ReloadReport>>(RELOAD_QUEUE_MAX);
    let control = Arc::new(RwLock::new(Control {
        node: node.clone(),
        running: BTreeMap::new(),
        broken: BTreeMap::new(),
        log_dir: paths.log_dir(),
        reload: Some(reload_tx),
    }));
    let cluster = Arc::new(cluster);
    crate::peer::serve(crate::peer::PeerServerContext {
        paths: paths.clone(),
        cluster: cluster.clone(),
        node_index,
        node: node.clone(),
        key: key.clone(),
        control: control.clone(),
        runtime: tokio::runtime::Handle::current(),
    });
    let mut running = Running {
        ctx: ModuleContext { paths: paths.clone(), cluster, node, pair, key, epoch },
        control: control.clone(),
        tasks: BTreeMap::new(),
        shutdown: shutdown_rx.clone(),
    };
    running.load().await;

    let mut api_shutdown = shutdown_rx.clone();
    let mut api = {
        let control = control.clone();
        let paths = paths.clone();
        let listen = opts.api_listen;
        tokio::spawn(async move {
            let stop = async move {
                let _ = api_shutdown.wait_for(|s| *s).await;
            };
            crate::api::serve(control, &paths, listen, stop).await
        })
    };

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            Some(reply) = reload_rx.recv() => {
                let report = running.load().await;
                let _ = reply.send(report);
            }
            result = &mut api => {
                // The API could not start (socket in use...): nothing can reach this daemon.
                let _ = shutdown_tx.send(true);
                return match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(anyhow::anyhow!("the admin API stopped: {e}")),
                    Err(e) => Err(anyhow::anyhow!("the admin API crashed: {e}")),
                };
            }
        }
    }
    tracing::info!("stopping every module before exiting");
    let _ = shutdown_tx.send(true);
    for (name, task) in std::mem::take(&mut running.tasks) {
        if tokio::time::timeout(Duration::from_secs(3600), task).await.is_err() {
            tracing::error!(module = %name, "the module did not stop within an hour; exiting anyway");
        }
    }
    let _ = api.await;
    tracing::info!("stopped");
    Ok(())
}
