//! One module's supervisor task: the only code that turns the machine's actions into I/O
//! (scripts, heartbeats, witness pings, checkers, the state file, the module log).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::cluster::{ClusterKey, HeartbeatLan, Heartbeats};
use crate::config::{ClusterConfig, ModuleConfig};
use crate::module::{Action, Event, LogLevel, Module, ModuleParams, PersistedState, Snapshot};
use crate::paths::Paths;

use super::checkers::{spawn_checkers, CheckerSet};
use super::control::{ModuleHandle, ModuleRequest, ModuleView, VerifyRequest};
use super::logs::ModuleLog;
use super::replication::Replication;
use super::scripts::{run_script, ScriptEnv};
use super::vm::{ModuleVm, PeerLink};
use crate::module::{Script, ScriptOutcome, State};
use crate::replication::status::DataRole;

/// Admin requests waiting for one module's task.
const COMMAND_QUEUE_MAX: usize = 16;
/// Script, witness and checker results waiting for one module's task.
const EVENT_QUEUE_MAX: usize = 64;
/// How often a VM module's primary checks that the peer has its domain's current definition.
const DEFINITION_SYNC_EVERY: Duration = Duration::from_secs(10);

/// A timer that fires this much after its deadline means this daemon was stalled (see
/// [`Supervisor::read_backlog`]); the machine's pulse timer keeps deadlines at most one pulse
/// apart, so a longer delay is a stall, not a quiet period.
const STALL_MIN: Duration = Duration::from_millis(100);
/// After a stall: heartbeats are read until none arrives for this long...
const BACKLOG_QUIET: Duration = Duration::from_millis(20);
/// ... or for at most this long.
const BACKLOG_MAX: Duration = Duration::from_millis(250);

/// Everything a module needs that comes from outside its own config.
pub struct ModuleContext {
    pub paths: Paths,
    pub cluster: Arc<ClusterConfig>,
    pub node: String,
    pub pair: [String; 2],
    pub key: ClusterKey,
    pub epoch: u64,
}

/// Loads the module's persisted state: a missing file is a fresh module; an unreadable one
/// refuses the module (guessing could make it primary on stale data).
pub fn load_state(path: &Path) -> Result<PersistedState, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "its state file {} is damaged ({e}); move it away to start this node as a fresh secondary",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PersistedState::default()),
        Err(e) => Err(format!("its state file {} cannot be read: {e}", path.display())),
    }
}

/// Writes the state durably (see [`crate::paths::write_durably`]).
fn save_state(path: &Path, state: &PersistedState) -> std::io::Result<()> {
    crate::paths::write_durably(path, &serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)
}

/// Binds the module's heartbeat sockets and starts its task; returns the handle the API uses
/// and the task, or the sentence that explains why the module cannot run.
pub fn start_module(
    ctx: &ModuleContext,
    config: ModuleConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(ModuleHandle, tokio::task::JoinHandle<()>), String> {
    let (node_index, peer) = ctx
        .cluster
        .pair_position(&ctx.node)
        .ok_or_else(|| format!("{} is not one of the two nodes of cluster.xml", ctx.node))?;
    let port = config.heartbeat_port();
    let mut lans = Vec::new();
    for lan in &config.heart.lans {
        let (Some(local), Some(remote)) = (ctx.cluster.addr(lan, &ctx.node), ctx.cluster.addr(lan, &peer)) else {
            return Err(format!("lan {lan} of its <heart> does not list both {} and {peer} in cluster.xml", ctx.node));
        };
        lans.push(HeartbeatLan { name: lan.clone(), local: (local, port).into(), peer: (remote, port).into() });
    }
    let heartbeats = Heartbeats::bind(ctx.key.clone(), node_index, config.id, lans, ctx.epoch)
        .map_err(|e| format!("its heartbeat sockets cannot be opened: {e}"))?;
    let persisted = load_state(&ctx.paths.module_state_file(&config.name))?;
    let params = ModuleParams::from_config(&config, &ctx.node, ctx.pair.clone());
    let machine = Module::new(params, persisted);
    let (snapshot_tx, snapshot_rx) = watch::channel(machine.snapshot());
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE_MAX);
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE_MAX);
    let view = ModuleView {
        name: config.name.clone(),
        id: Some(config.id),
        mode: Some(config.mode),
        node: ctx.node.clone(),
        peer_node: Some(peer.clone()),
        status: None,
        error: None,
        heartbeats_rejected: None,
        replication: None,
    };
    let replication = Replication::new(ctx, &config, &peer, node_index, events_tx.clone())?;
    let (replication, replication_view, verify_tx, verify_rx) = match replication {
        Some((r, view)) => {
            let (tx, rx) = mpsc::channel(COMMAND_QUEUE_MAX);
            (Some(r), Some(view), Some(tx), Some(rx))
        }
        None => (None, None, None, None),
    };
    let env = ScriptEnv::new(&ctx.paths, &config.name, &ctx.node, Some(&peer), &config.user.vars);
    let vm = config.vm.as_ref().map(|vm| {
        let link =
            PeerLink { cluster: ctx.cluster.clone(), key: ctx.key.clone(), node: ctx.node.clone(), peer: peer.clone() };
        Arc::new(ModuleVm::new(
            &config.name,
            vm.clone(),
            Arc::from(crate::hypervisor::connect(&vm.uri)),
            link,
            ctx.paths.module_state_dir(&config.name),
            ModuleLog::new(&ctx.paths, &config.name),
        ))
    });
    let supervisor = Supervisor {
        log: ModuleLog::new(&ctx.paths, &config.name),
        paths: ctx.paths.clone(),
        env,
        config,
        machine,
        heartbeats,
        snapshot_tx,
        commands: commands_rx,
        events_tx,
        events: events_rx,
        checkers: None,
        shutdown,
        replication,
        verify: verify_rx,
        vm,
    };
    let rejected = Some(supervisor.heartbeats.counters());
    let task = tokio::spawn(supervisor.run());
    Ok((
        ModuleHandle {
            view,
            snapshot: snapshot_rx,
            commands: commands_tx,
            rejected,
            replication: replication_view,
            verify: verify_tx,
        },
        task,
    ))
}

struct Supervisor {
    paths: Paths,
    config: ModuleConfig,
    env: ScriptEnv,
    machine: Module,
    heartbeats: Heartbeats,
    log: ModuleLog,
    snapshot_tx: watch::Sender<Snapshot>,
    commands: mpsc::Receiver<ModuleRequest>,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    checkers: Option<CheckerSet>,
    shutdown: watch::Receiver<bool>,
    /// `None` when the module replicates no directory.
    replication: Option<Replication>,
    verify: Option<mpsc::Receiver<VerifyRequest>>,
    /// The module's domain (`<vm>`), started and stopped with the primary role.
    vm: Option<Arc<ModuleVm>>,
}

impl Supervisor {
    async fn run(mut self) {
        self.machine.boot(Instant::now());
        self.execute().await;
        let mut shutting_down = false;
        let mut commands_open = true;
        let mut definition_sync = tokio::time::interval(DEFINITION_SYNC_EVERY);
        definition_sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if shutting_down && self.machine.is_stopped() {
                break;
            }
            if !commands_open && self.machine.is_stopped() {
                // The module was removed by a reload.
                break;
            }
            let deadline = self.machine.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    let late = deadline.map(|d| tokio::time::Instant::now().saturating_duration_since(d));
                    if late.is_some_and(|l| l > STALL_MIN) {
                        self.read_backlog().await;
                    }
                    self.machine.handle_timeout(Instant::now());
                }
                (lan, status) = self.heartbeats.recv() => {
                    self.machine.handle(Instant::now(), Event::Heartbeat { lan, status });
                }
                Some(event) = self.events.recv() => {
                    self.machine.handle(Instant::now(), event);
                }
                request = self.commands.recv(), if commands_open => match request {
                    Some(request) => {
                        let result = self.machine.handle_admin(Instant::now(), request.command);
                        let _ = request.reply.send(result);
                    }
                    None => commands_open = false,
                },
                Some(reply) = async { match &mut self.verify { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                    match &self.replication {
                        Some(r) => r.verify(reply),
                        None => { let _ = reply.send(Err("this module replicates no directory".into())); }
                    }
                }
                _ = definition_sync.tick(), if self.vm.is_some() => {
                    if let (Some(vm), State::Prim | State::Alone) = (&self.vm, self.machine.state()) {
                        let vm = vm.clone();
                        tokio::task::spawn_blocking(move || vm.sync_definition());
                    }
                }
                changed = self.shutdown.changed(), if !shutting_down => {
                    if changed.is_err() || *self.shutdown.borrow() {
                        shutting_down = true;
                        self.machine.shutdown(Instant::now());
                    }
                }
            }
            self.execute().await;
        }
        self.checkers = None;
        if let Some(mut r) = self.replication.take() {
            tokio::task::block_in_place(|| {
                if let Err(e) = r.set_role(DataRole::None) {
                    self.log.line(LogLevel::Error, &e);
                }
            });
        }
        self.log.line(LogLevel::Info, "supervisor ended");
    }

    /// After a stall (the host was frozen, suspended or starved), the heartbeats the peer sent
    /// meanwhile wait in the sockets, while the timers are overdue.
    /// Hands those heartbeats to the machine first, so that it judges the peer on what the
    /// peer said during the stall rather than on a silence that never happened: otherwise a
    /// thawed primary could time its peer out, start a new generation and win the split
    /// brain against the node that took over while it was frozen.
    async fn read_backlog(&mut self) {
        let end = tokio::time::Instant::now() + BACKLOG_MAX;
        loop {
            let quiet = (tokio::time::Instant::now() + BACKLOG_QUIET).min(end);
            tokio::select! {
                biased;
                (lan, status) = self.heartbeats.recv() => {
                    self.machine.handle(Instant::now(), Event::Heartbeat { lan, status });
                    self.execute().await;
                }
                _ = tokio::time::sleep_until(quiet) => return,
            }
        }
    }

    /// Executes every pending action, in order.
    async fn execute(&mut self) {
        let actions: Vec<Action> = std::iter::from_fn(|| self.machine.poll_action()).collect();
        // The resync request is recorded before anything goes out: the heartbeat that tells the
        // primary about it may be among these actions, and the primary's resync connection must
        // find the request already there.
        for action in &actions {
            match (action, &mut self.replication) {
                (Action::StartResync { full }, Some(r)) => r.request_resync(*full),
                (Action::StopResync, Some(r)) => r.cancel_resync(),
                _ => {}
            }
        }
        for action in actions {
            match action {
                Action::RunScript(script) => {
                    // The data is mounted before the role's start script runs.
                    let role = match script {
                        Script::StartPrim => Some(DataRole::Source),
                        Script::StartSecond => Some(DataRole::Target),
                        _ => None,
                    };
                    if let Some(role) = role {
                        if let Err(e) = self.set_data_role(role) {
                            self.say(LogLevel::Error, &format!("{} not run: {e}", script.file_name()));
                            let _ =
                                self.events_tx.send(Event::ScriptDone { script, outcome: ScriptOutcome::Failed }).await;
                            continue;
                        }
                    }
                    let paths = self.paths.clone();
                    let env = self.env.clone();
                    let user = self.config.user.clone();
                    let state = self.machine.state();
                    let tx = self.events_tx.clone();
                    let vm = self.vm.clone();
                    let peer_heard = self.machine.peer_visible();
                    tokio::spawn(async move {
                        let outcome = match vm {
                            Some(vm) => run_vm_step(&paths, &env, state, script, &user, vm, peer_heard).await,
                            None => run_script(&paths, &env, state, script, &user).await,
                        };
                        let _ = tx.send(Event::ScriptDone { script, outcome }).await;
                    });
                }
                Action::SendHeartbeat(status) => self.heartbeats.send(&status).await,
                Action::CheckWitness => {
                    let witnesses = self.config.splitbrain.as_ref().map(|s| s.witnesses.clone()).unwrap_or_default();
                    let timeout = self.machine.params().witness_timeout;
                    let tx = self.events_tx.clone();
                    tokio::spawn(async move {
                        let reachable = crate::quorum::witness_reachable(&witnesses, timeout).await;
                        let _ = tx.send(Event::Witness { reachable }).await;
                    });
                }
                // Nothing is replicated: there is nothing to copy.
                Action::StartResync { .. } if self.replication.is_none() => {
                    let _ = self.events_tx.send(Event::ResyncDone { ok: true }).await;
                }
                // Recorded above.
                Action::StartResync { .. } | Action::StopResync => {}
                Action::Checkers(on) => {
                    self.checkers = on.then(|| {
                        spawn_checkers(
                            &self.config.name,
                            &self.paths,
                            &self.env,
                            &self.config.checks,
                            self.vm.as_ref().map(|vm| vm.hypervisor()),
                            self.events_tx.clone(),
                        )
                    });
                }
                Action::Persist(state) => {
                    let path = self.paths.module_state_file(&self.config.name);
                    if let Err(e) = save_state(&path, &state) {
                        // The machine goes on; the next persist tries again. Say it loudly.
                        self.log.line(LogLevel::Error, &format!("cannot write the state file {}: {e}", path.display()));
                        tracing::error!(module = %self.config.name, "cannot write the state file {}: {e}", path.display());
                    }
                }
                Action::Log(level, text) => self.say(level, &text),
            }
        }
        let snapshot = self.machine.snapshot();
        if self.replication.is_some() {
            // A swap runs start_second while the state is still PRIM: `wanted` lets the role
            // being entered win.
            let wanted = Replication::wanted(&snapshot);
            if let Err(e) = self.set_data_role(wanted) {
                self.say(LogLevel::Error, &e);
            }
            if let Some(r) = &mut self.replication {
                r.update(&snapshot);
            }
        }
        self.snapshot_tx.send_replace(snapshot);
    }

    /// Mounts or unmounts the replicated data for `role` (blocking work, off the async path).
    fn set_data_role(&mut self, role: DataRole) -> Result<(), String> {
        match &mut self.replication {
            Some(r) if r.role() != role => tokio::task::block_in_place(|| r.set_role(role)),
            _ => Ok(()),
        }
    }

    fn say(&self, level: LogLevel, text: &str) {
        self.log.say(&self.config.name, level, text);
    }
}

/// A step of a VM module: the domain starts after `start_prim` succeeded and stops before
/// `stop_prim` runs (the user's scripts see the VM's data mounted either way). A domain that
/// cannot start or stop fails the step like a failed script. `peer_heard`: the peer's
/// heartbeats arrive on some lan (its daemon is asked whether the VM runs there).
async fn run_vm_step(
    paths: &Paths,
    env: &ScriptEnv,
    state: State,
    script: Script,
    user: &crate::config::UserConfig,
    vm: Arc<ModuleVm>,
    peer_heard: bool,
) -> ScriptOutcome {
    let blocking = |f: fn(&ModuleVm, bool) -> Result<(), String>| {
        let vm = vm.clone();
        async move {
            match tokio::task::spawn_blocking(move || f(&vm, peer_heard)).await {
                Ok(result) => result,
                Err(_) => Err("the hypervisor call failed (its task ended)".to_string()),
            }
        }
    };
    match script {
        Script::StartPrim => {
            let outcome = run_script(paths, env, state, script, user).await;
            if outcome != ScriptOutcome::Ok {
                return outcome;
            }
            match blocking(|vm, peer_heard| vm.start(peer_heard)).await {
                Ok(()) => {
                    let vm = vm.clone();
                    tokio::task::spawn_blocking(move || vm.sync_definition());
                    ScriptOutcome::Ok
                }
                Err(e) => {
                    vm.say(LogLevel::Error, &e);
                    ScriptOutcome::Failed
                }
            }
        }
        Script::StopPrim => {
            let stopped = blocking(|vm, _| vm.stop().map(|_| ())).await;
            if let Err(e) = &stopped {
                vm.say(LogLevel::Error, e);
            }
            let outcome = run_script(paths, env, state, script, user).await;
            if stopped.is_err() {
                ScriptOutcome::Failed
            } else {
                outcome
            }
        }
        _ => run_script(paths, env, state, script, user).await,
    }
}
