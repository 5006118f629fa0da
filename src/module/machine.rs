//! The failover rules of one module on one node.
//!
//! Every input goes through [`Module::handle`], [`Module::handle_admin`] or
//! [`Module::handle_timeout`]; each ends with [`Module::evaluate`], the one place where the
//! machine decides what to do next. While scripts run (a [`Run`]), decisions wait until the
//! run ends, so the application is never started and stopped at once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::*;
use crate::config::{CheckAction, DefaultPrim};

/// How much later than its deadline a heartbeat timeout may fire before the machine concludes
/// that this host was frozen or stalled, and gives the peer one more timeout to speak before
/// acting on the silence (a thawed primary must learn that the peer took over, not fail over).
/// After the witness approved a takeover, the time left beyond one pulse (the difference
/// between the two nodes' timeouts) for a primary that cannot reach the witness to run its
/// stop script. That primary asked the witness early, so it knows at its own timeout.
const FENCE_MARGIN: Duration = Duration::from_millis(200);

fn freeze_slack(timeout: Duration, pulse: Duration) -> Duration {
    (timeout / 2).max(pulse * 2)
}

/// How two generation histories relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// Neither node has ever held data.
    BothEmpty,
    /// Same newest generation: the data is the same.
    Same,
    /// The peer's history contains this node's newest generation and more.
    PeerNewer,
    /// This node's history contains the peer's newest generation and more.
    MineNewer,
    /// Both moved on separately (split brain).
    Divergent,
}

/// Compares two histories (newest last).
pub fn relation(mine: &[Generation], theirs: &[Generation]) -> Relation {
    match (mine.last(), theirs.last()) {
        (None, None) => Relation::BothEmpty,
        (None, Some(_)) => Relation::PeerNewer,
        (Some(_), None) => Relation::MineNewer,
        (Some(m), Some(t)) if m == t => Relation::Same,
        (Some(m), Some(t)) => {
            if theirs.contains(m) {
                Relation::PeerNewer
            } else if mine.contains(t) {
                Relation::MineNewer
            } else {
                Relation::Divergent
            }
        }
    }
}

/// The first generation of `h` that is not in `other` (where `h` forked off).
fn fork_point<'a>(h: &'a [Generation], other: &[Generation]) -> Option<&'a Generation> {
    h.iter().find(|g| !other.contains(g))
}

/// What a sequence of scripts leads to once every script has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goal {
    /// After prestart/start_both: choose a role.
    Decide,
    /// After start_prim: primary (PRIM when the peer is an in-sync SECOND, else ALONE).
    Primary,
    /// After start_second: SECOND, with a resync unless the data is already the peer's.
    Secondary { resync: bool, full: bool },
    /// After stop_prim/stop_second: WAIT for this reason.
    Wait(WaitReason),
    /// After stop scripts, stop_both, poststop: STOP.
    Stop,
    /// `stopstart`: STOP, then start again once the peer took over (or a timeout passed).
    StopThenStart,
    /// At boot, stop an application a crashed daemon left running; then start if running.
    Cleanup,
    /// A local restart of the application: back to the same state.
    Same,
}

/// Scripts running one after another, and where they lead.
#[derive(Debug, Clone)]
struct Run {
    queue: VecDeque<Script>,
    current: Option<Script>,
    goal: Goal,
}

/// What a witness answer is awaited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WitnessFor {
    /// A primary lost every heartbeat: keep the role only if a witness answers.
    PrimaryLostPeer,
    /// A secondary (or a deciding node) lost the peer: take over only if a witness answers.
    TakeOver,
    /// An isolated primary checks that it still reaches a witness.
    Recheck,
}

/// The early witness question of a primary whose heartbeats have gone quiet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EarlyWitness {
    None,
    /// Asked; the answer belongs to the current silence.
    Pending,
    /// Asked, but the peer spoke since: the answer is thrown away when it comes.
    Obsolete,
    Answered(bool),
}

/// Who the admin asked this node to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    Auto,
    Primary { force: bool },
    Secondary { full: bool },
}

/// One module on one node. See the crate-level docs of [`crate::module`].
pub struct Module {
    params: ModuleParams,
    p: PersistedState,
    state: State,
    transition: Option<Transition>,
    wait_reason: Option<WaitReason>,
    intent: Intent,
    /// Per heartbeat lan: when its heartbeats time out (`None`: the lan is down).
    lan_deadline: Vec<Option<Instant>>,
    /// The peer's latest status (kept after the peer is lost, for the record).
    peer: Option<PeerStatus>,
    /// Set when the last lan went down; consumed by `evaluate` once no script runs.
    peer_lost: bool,
    /// A late timeout was already forgiven once since the last heartbeat.
    freeze_grace_used: bool,
    /// SECOND: the data equals the primary's.
    in_sync: bool,
    /// Primary of a replicating module: the join finished and the real-time stream is up.
    replication_up: bool,
    resync_running: bool,
    full_resync: bool,
    run: Option<Run>,
    witness: Option<WitnessFor>,
    next_pulse: Option<Instant>,
    startup_deadline: Option<Instant>,
    /// SECOND whose peer is not primary: when to stop waiting for it.
    orphan_deadline: Option<Instant>,
    /// `stopstart`: when to start again at the latest.
    restart_deadline: Option<Instant>,
    /// A primary whose heartbeats have gone quiet asks the witness before its timeout expires,
    /// so that it knows at the timeout itself whether to go on or stop: `Pending` while the
    /// question is out, then the answer, valid until the peer speaks again.
    early_witness: EarlyWitness,
    /// The witness approved a takeover: it happens at this time unless the peer speaks first,
    /// leaving a primary that cannot reach the witness the time to stop its application.
    fence_deadline: Option<Instant>,
    /// This node is primary because an admin said so while the peer was unseen: it does not
    /// re-ask the witness until the peer is seen again.
    admin_primary: bool,
    /// An isolated primary asks the witness again at this time: with a witness, only a node
    /// that keeps reaching it may stay primary without its peer.
    witness_recheck: Option<Instant>,
    stop_requested: bool,
    /// A checker failed while the primary was busy: handled when it is idle again.
    checker_failure: Option<CheckAction>,
    restarts: VecDeque<Instant>,
    swap_requests_sent: u32,
    resync_requests_sent: u32,
    peer_swap_requests_seen: u32,
    handover: bool,
    actions: VecDeque<Action>,
}

impl Module {
    pub fn new(params: ModuleParams, persisted: PersistedState) -> Module {
        assert!(params.node_index < 2, "a pair has two nodes");
        assert!(!params.lans.is_empty(), "a module has at least one heartbeat lan");
        let lans = params.lans.len();
        Module {
            params,
            p: persisted,
            state: State::Stop,
            transition: None,
            wait_reason: None,
            intent: Intent::Auto,
            lan_deadline: vec![None; lans],
            peer: None,
            peer_lost: false,
            freeze_grace_used: false,
            in_sync: false,
            replication_up: false,
            resync_running: false,
            full_resync: false,
            run: None,
            witness: None,
            next_pulse: None,
            startup_deadline: None,
            orphan_deadline: None,
            restart_deadline: None,
            admin_primary: false,
            early_witness: EarlyWitness::None,
            fence_deadline: None,
            witness_recheck: None,
            stop_requested: false,
            checker_failure: None,
            restarts: VecDeque::new(),
            swap_requests_sent: 0,
            resync_requests_sent: 0,
            peer_swap_requests_seen: 0,
            handover: false,
            actions: VecDeque::new(),
        }
    }

    pub fn params(&self) -> &ModuleParams {
        &self.params
    }

    pub fn persisted(&self) -> &PersistedState {
        &self.p
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn transition(&self) -> Option<Transition> {
        self.transition
    }

    /// Starts sending heartbeats (a stopped module still tells the peer it is stopped), and
    /// starts the module when the admin left it running.
    pub fn boot(&mut self, now: Instant) {
        self.next_pulse = Some(now);
        if self.p.app_running {
            self.log(
                LogLevel::Warn,
                "the application may still run from before this daemon stopped: running stop_prim",
            );
            self.begin(now, &[Script::StopPrim], Goal::Cleanup);
        } else if self.p.running {
            self.log(LogLevel::Info, "the module was running before this daemon started: starting it");
            self.start(now, Intent::Auto);
        }
        self.evaluate(now);
    }

    /// The daemon is shutting down: stop the module (scripts run as for `stop`) but leave it
    /// marked running, so that the next daemon start resumes it.
    pub fn shutdown(&mut self, now: Instant) {
        self.restart_deadline = None;
        if self.state != State::Stop || self.run.is_some() {
            self.log(
                LogLevel::Info,
                "the daemon is shutting down: stopping the module (it starts again with the daemon)",
            );
            self.stop_requested = true;
        }
        self.evaluate(now);
    }

    /// Stopped, with no script running: nothing left to wait for.
    pub fn is_stopped(&self) -> bool {
        self.state == State::Stop && self.run.is_none()
    }

    /// An admin command; refused with no change when it cannot apply now.
    pub fn handle_admin(&mut self, now: Instant, cmd: AdminCommand) -> Result<(), CommandError> {
        let result = self.admin(now, &cmd);
        match &result {
            Ok(()) => self.log(LogLevel::Info, format!("admin command {}: accepted", cmd.name())),
            Err(e) => self.log(LogLevel::Warn, format!("admin command {}: refused: {e}", cmd.name())),
        }
        self.evaluate(now);
        result
    }

    pub fn handle(&mut self, now: Instant, event: Event) {
        match event {
            Event::Heartbeat { lan, status } => self.on_heartbeat(now, lan, status),
            Event::Witness { reachable } => self.on_witness(now, reachable),
            Event::ScriptDone { script, outcome } => self.on_script_done(now, script, outcome),
            Event::CheckerFailed { ident, action } => {
                if self.state.is_primary() {
                    self.log(LogLevel::Error, format!("checker {ident} failed"));
                    // Acted on once no script runs and no witness answer is awaited.
                    self.checker_failure = Some(action);
                }
            }
            Event::ResyncStarted => {
                if self.resync_running && !self.p.stale {
                    self.p.stale = true;
                    self.persist();
                }
            }
            Event::ResyncDone { ok } => self.on_resync_done(ok),
            Event::ReplicationLost { reason } => self.on_replication_lost(now, &reason),
            Event::ReplicationUp => self.replication_up = true,
        }
        self.evaluate(now);
    }

    /// Call when `now` reached [`Module::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_pulse.is_some_and(|t| t <= now) {
            self.actions.push_back(Action::SendHeartbeat(self.status()));
            self.next_pulse = Some(now + self.params.pulse);
        }
        self.check_lans(now);
        if self.startup_deadline.is_some_and(|t| t <= now) {
            self.startup_deadline = None;
        }
        if self.orphan_deadline.is_some_and(|t| t <= now) {
            self.orphan_deadline = None;
            if self.state == State::Second && self.run.is_none() && !self.peer_is_primary() {
                self.log(LogLevel::Warn, "the peer did not become primary: choosing a role again");
                self.handover = false;
                self.leave_second_for_wait(now);
            }
        }
        if self.early_witness_time().is_some_and(|t| t <= now) && self.peer_visible() {
            self.early_witness = EarlyWitness::Pending;
            self.actions.push_back(Action::CheckWitness);
        }
        if self.fence_deadline.is_some_and(|t| t <= now) {
            self.fence_deadline = None;
            self.transition = None;
            if !self.peer_visible() && self.run.is_none() && matches!(self.state, State::Second | State::Wait) {
                self.become_primary(now, false);
            }
        }
        if self.witness_recheck.is_some_and(|t| t <= now) {
            self.witness_recheck = None;
            if self.state.is_primary() && !self.peer_visible() && self.run.is_none() && self.witness.is_none() {
                self.ask_witness(WitnessFor::Recheck);
            }
        }
        if self.restart_deadline.is_some_and(|t| t <= now) {
            self.restart_deadline = None;
            if self.state == State::Stop && self.p.running && self.run.is_none() {
                self.start(now, Intent::Auto);
            }
        }
        self.evaluate(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.next_pulse,
            self.startup_deadline,
            self.orphan_deadline,
            self.restart_deadline,
            self.witness_recheck,
            self.fence_deadline,
            self.early_witness_time().filter(|_| self.peer_visible()),
        ]
        .into_iter()
        .chain(self.lan_deadline.iter().copied())
        .flatten()
        .min()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            state: self.state,
            transition: self.transition,
            wait_reason: if self.state == State::Wait { self.wait_reason } else { None },
            role: self.p.last_role,
            lans: self
                .params
                .lans
                .iter()
                .zip(&self.lan_deadline)
                .map(|(name, d)| LanStatus { name: name.clone(), up: d.is_some() })
                .collect(),
            peer: self.peer.clone().filter(|_| self.peer_visible()),
            generation: self.p.history.last().copied(),
            in_sync: self.state == State::Second && self.in_sync,
            restarts_in_window: self.restarts.len() as u32,
        }
    }

    /// What this node tells its peer.
    pub fn status(&self) -> PeerStatus {
        PeerStatus {
            state: self.state,
            transition: self.transition,
            history: self.p.history.clone(),
            in_sync: self.state == State::Second && self.in_sync && !self.resync_running,
            eligible: self.eligible(),
            last_role: self.p.last_role,
            swap_request: self.swap_requests_sent,
            resync_request: self.resync_requests_sent,
            handover: self.handover && self.state == State::Second,
        }
    }

    // ----- inputs -----

    fn admin(&mut self, now: Instant, cmd: &AdminCommand) -> Result<(), CommandError> {
        let busy = |m: &Module, command: &'static str| -> Result<(), CommandError> {
            if m.run.is_some() || m.witness.is_some() || m.fence_deadline.is_some() {
                return Err(m.refuse(command, format!("it is busy ({})", m.transition_name())));
            }
            Ok(())
        };
        match *cmd {
            AdminCommand::Start => {
                if self.state != State::Stop {
                    return Err(CommandError::AlreadyRunning(self.params.name.clone()));
                }
                busy(self, "start")?;
                self.start(now, Intent::Auto);
            }
            AdminCommand::Stop => {
                if self.state == State::Stop && self.run.is_none() {
                    self.restart_deadline = None;
                    if self.p.running {
                        self.p.running = false;
                        self.persist();
                    }
                    return Ok(());
                }
                self.p.running = false;
                self.persist();
                self.restart_deadline = None;
                self.stop_requested = true;
            }
            AdminCommand::Restart => {
                busy(self, "restart")?;
                match self.state {
                    State::Stop => return Err(CommandError::NotRunning(self.params.name.clone())),
                    State::Alone | State::Prim => {
                        self.actions.push_back(Action::Checkers(false));
                        self.begin(now, &[Script::StopPrim, Script::StartPrim], Goal::Same)
                    }
                    State::Second => self.begin(now, &[Script::StopSecond, Script::StartSecond], Goal::Same),
                    State::Wait => {}
                }
            }
            AdminCommand::Swap => {
                busy(self, "swap")?;
                match self.state {
                    State::Prim if self.peer_in_sync_second() => self.swap_out(now),
                    State::Second if self.in_sync && self.peer_visible() && self.peer_state() == Some(State::Prim) => {
                        self.swap_requests_sent += 1;
                        self.send_heartbeat_now(now);
                    }
                    State::Stop => return Err(CommandError::NotRunning(self.params.name.clone())),
                    _ => {
                        return Err(
                            self.refuse("swap", "a swap needs one node PRIM and the other SECOND in sync".to_string())
                        )
                    }
                }
            }
            AdminCommand::Prim { force } => {
                busy(self, "prim")?;
                match self.state {
                    State::Stop => self.start(now, Intent::Primary { force }),
                    State::Alone | State::Prim => {}
                    State::Wait | State::Second => {
                        if self.peer_visible() && self.peer_is_primary() {
                            let peer = self.peer_name().to_string();
                            return Err(self.refuse("prim", format!("{peer} is primary; use swap")));
                        }
                        if self.peer_visible() && self.peer_state().is_some_and(State::is_primary) {
                            let peer = self.peer_name().to_string();
                            return Err(self.refuse(
                                "prim",
                                format!("{peer} is still stopping its application; try again once it has stopped"),
                            ));
                        }
                        let rel = self.relation_to_peer();
                        let known_stale = self.p.stale
                            || (self.state == State::Second && !self.in_sync)
                            || (self.peer_visible() && matches!(rel, Some(Relation::PeerNewer)));
                        if known_stale && !force {
                            return Err(self.refuse(
                                "prim",
                                "its data is older than the peer's; `prim --force` makes it primary anyway and the newer data on the peer will be overwritten".to_string(),
                            ));
                        }
                        if force && known_stale {
                            self.log(LogLevel::Warn, "forced primary on data known to be stale");
                        }
                        self.intent = Intent::Auto;
                        self.admin_primary = !self.peer_visible();
                        self.become_primary(now, false);
                    }
                }
            }
            AdminCommand::Second { full } => {
                busy(self, "second")?;
                match self.state {
                    State::Stop => self.start(now, Intent::Secondary { full }),
                    State::Wait => {
                        self.intent = Intent::Secondary { full };
                        self.wait_reason = Some(WaitReason::SecondRequested);
                    }
                    State::Second => {
                        if full {
                            if !self.peer_visible() || !self.peer_is_primary() {
                                return Err(
                                    self.refuse("second", "a full resync needs the peer to be primary".to_string())
                                );
                            }
                            self.in_sync = false;
                            self.full_resync = true;
                            if self.resync_running {
                                self.actions.push_back(Action::StopResync);
                                self.resync_running = false;
                            }
                        }
                    }
                    State::Alone | State::Prim => {
                        if full {
                            return Err(self.refuse(
                                "second",
                                "--full applies to a secondary; swap first, then run `second --full` there".to_string(),
                            ));
                        }
                        if self.state == State::Prim && self.peer_in_sync_second() {
                            self.swap_out(now);
                        } else {
                            return Err(self.refuse("second", "no secondary in sync can take over".to_string()));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn on_heartbeat(&mut self, now: Instant, lan: usize, status: PeerStatus) {
        if lan >= self.lan_deadline.len() {
            return;
        }
        let was_visible = self.peer_visible();
        let was_up = self.lan_deadline[lan].is_some();
        self.lan_deadline[lan] = Some(now + self.params.timeout);
        self.freeze_grace_used = false;
        self.early_witness = match self.early_witness {
            EarlyWitness::Pending | EarlyWitness::Obsolete => EarlyWitness::Obsolete,
            EarlyWitness::None | EarlyWitness::Answered(_) => EarlyWitness::None,
        };
        if !was_up {
            let name = self.params.lans[lan].clone();
            if was_visible {
                self.log(LogLevel::Info, format!("heartbeats on lan {name} are back"));
            } else {
                self.log(LogLevel::Info, format!("peer {} seen on lan {name}: {}", self.peer_name(), status.state));
            }
        }
        let first_sighting = self.peer.is_none();
        let peer_changed = self.peer.as_ref().is_none_or(|p| p.state != status.state || p.history != status.history);
        if peer_changed && !first_sighting {
            self.log(LogLevel::Info, format!("peer {} is now {}", self.peer_name(), describe(&status)));
        }
        self.peer = Some(status);
        if !was_visible {
            self.peer_lost = false;
            if self.fence_deadline.take().is_some() {
                self.transition = None;
                self.log(LogLevel::Info, "the peer is back: no takeover");
            }
        }
    }

    fn on_witness(&mut self, now: Instant, reachable: bool) {
        let Some(purpose) = self.witness.take() else {
            self.early_witness = match self.early_witness {
                EarlyWitness::Pending => EarlyWitness::Answered(reachable),
                _ => EarlyWitness::None,
            };
            return;
        };
        if self.run.is_some() {
            // Scripts started meanwhile (the admin stopped the module): they decide.
            return;
        }
        self.transition = None;
        if self.state == State::Stop || self.peer_visible() {
            // The peer spoke again while the witness was asked: its heartbeat decides instead.
            return;
        }
        if purpose != WitnessFor::Recheck || !reachable {
            self.log(
                if reachable { LogLevel::Info } else { LogLevel::Warn },
                format!("witness {}", if reachable { "answered" } else { "did not answer" }),
            );
        }
        match (purpose, reachable) {
            (WitnessFor::Recheck, true) => {}
            (WitnessFor::PrimaryLostPeer, true) => self.primary_without_peer(),
            (WitnessFor::PrimaryLostPeer | WitnessFor::Recheck, false) => {
                self.log(LogLevel::Warn, "no witness answers: stopping the application to avoid two primaries");
                self.actions.push_back(Action::Checkers(false));
                self.begin(now, &[Script::StopPrim], Goal::Wait(WaitReason::WitnessUnreachable));
            }
            (WitnessFor::TakeOver, true) => {
                let fence = self.params.pulse + FENCE_MARGIN;
                self.log(
                    LogLevel::Info,
                    format!(
                        "taking over in {} ms, once a primary that cannot reach the witness has stopped",
                        fence.as_millis()
                    ),
                );
                self.fence_deadline = Some(now + fence);
                self.transition = Some(Transition::CheckingWitness);
            }
            (WitnessFor::TakeOver, false) => self.go_wait(now, WaitReason::WitnessUnreachable),
        }
    }

    fn on_script_done(&mut self, now: Instant, script: Script, outcome: ScriptOutcome) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        if run.current != Some(script) {
            return;
        }
        run.current = None;
        let goal = run.goal;
        if script == Script::StopPrim && self.p.app_running {
            self.p.app_running = false;
            self.persist();
        }
        if outcome != ScriptOutcome::Ok {
            let what = if outcome == ScriptOutcome::TimedOut { "timed out" } else { "failed" };
            if script.is_stop() {
                self.log(LogLevel::Warn, format!("script {} {what}; continuing", script.file_name()));
            } else {
                self.log(LogLevel::Error, format!("script {} {what}", script.file_name()));
                self.run = None;
                self.transition = None;
                self.start_failed(now, script, goal);
                return;
            }
        }
        self.next_script(now);
    }

    /// The peer no longer receives the changes. If it counts as an up-to-date secondary of
    /// this generation and is still heard, a new generation starts, so that it knows (from the
    /// next heartbeat) that its data is no longer current and cannot take over with it.
    fn on_replication_lost(&mut self, now: Instant, reason: &str) {
        if !self.state.is_primary() {
            return;
        }
        self.replication_up = false;
        self.log(LogLevel::Warn, format!("replication to {} lost: {reason}", self.peer_name()));
        // A peer silent for `timeout` may have taken over unseen (this node was cut off and is
        // stepping down for want of a witness, or was frozen and has not handled its timers
        // yet): a generation of origin `primary` started now would win the split brain and
        // discard what the peer acknowledged. The heartbeat timeout decides that case.
        if !self.lan_deadline.iter().flatten().any(|&deadline| deadline > now) {
            self.log(LogLevel::Warn, "the peer is not heard either: the heartbeat timeout decides");
            return;
        }
        if self.state == State::Prim || self.peer_in_sync_second_same_gen() {
            self.log(LogLevel::Warn, "ALONE: the changes are tracked for the resync");
            self.primary_without_peer();
        }
    }

    fn on_resync_done(&mut self, ok: bool) {
        if !self.resync_running {
            return;
        }
        self.resync_running = false;
        if self.transition == Some(Transition::Resyncing) {
            self.transition = None;
        }
        if !ok {
            self.log(LogLevel::Error, "resync failed; it will be retried");
            return;
        }
        if let Some(peer) = self.peer.clone().filter(|p| p.state.is_primary()) {
            self.p.history = peer.history;
            self.p.stale = false;
            self.persist();
            self.in_sync = true;
            self.full_resync = false;
            self.log(LogLevel::Info, "resync done: this node is an up-to-date secondary");
        }
    }

    fn check_lans(&mut self, now: Instant) {
        let expired: Vec<usize> =
            (0..self.lan_deadline.len()).filter(|&i| self.lan_deadline[i].is_some_and(|t| t <= now)).collect();
        if expired.is_empty() {
            return;
        }
        let latest_missed = expired.iter().filter_map(|&i| self.lan_deadline[i]).min().unwrap_or(now);
        let late = now.saturating_duration_since(latest_missed);
        if late > freeze_slack(self.params.timeout, self.params.pulse) && !self.freeze_grace_used {
            self.freeze_grace_used = true;
            self.log(
                LogLevel::Warn,
                format!(
                    "heartbeat timeout handled {} ms late: this host was frozen or stalled; giving the peer one more timeout before deciding",
                    late.as_millis()
                ),
            );
            for d in self.lan_deadline.iter_mut().flatten() {
                *d = now + self.params.timeout;
            }
            return;
        }
        for i in expired {
            self.lan_deadline[i] = None;
            let name = self.params.lans[i].clone();
            if self.peer_visible() {
                self.log(
                    LogLevel::Warn,
                    format!("heartbeats lost on lan {name}; the peer is still seen on another lan"),
                );
            } else {
                self.log(
                    LogLevel::Warn,
                    format!("heartbeats lost on lan {name}: the peer {} is lost", self.peer_name()),
                );
                self.peer_lost = true;
            }
        }
    }

    // ----- the decision point -----

    fn evaluate(&mut self, now: Instant) {
        // Bounded: each pass either acts (and a script run, witness question or state change
        // ends the loop) or finds nothing to do.
        for _ in 0..4 {
            if self.run.is_some() || self.witness.is_some() || self.fence_deadline.is_some() {
                return;
            }
            if self.stop_requested {
                self.stop_requested = false;
                self.checker_failure = None;
                self.stop_module(now, Goal::Stop);
                continue;
            }
            if let Some(action) = self.checker_failure.take() {
                if self.state.is_primary() {
                    self.failure(now, action);
                    continue;
                }
            }
            let before = (self.state, self.transition, self.p.history.len(), self.in_sync, self.resync_running);
            match self.state {
                State::Stop => self.evaluate_stopped(),
                State::Wait => self.evaluate_wait(now),
                State::Second => self.evaluate_second(now),
                State::Alone | State::Prim => self.evaluate_primary(now),
            }
            let after = (self.state, self.transition, self.p.history.len(), self.in_sync, self.resync_running);
            if before == after {
                return;
            }
        }
    }

    /// A stopped module still hears its peer: learning that the peer moved to newer data is
    /// kept, so that a later start never leads on this node's older data.
    fn evaluate_stopped(&mut self) {
        if !self.peer_visible() || self.p.stale {
            return;
        }
        if self.relation_to_peer() == Some(Relation::PeerNewer) {
            self.p.stale = true;
            self.persist();
            self.log(LogLevel::Info, format!("{} moved to newer data while this node was stopped", self.peer_name()));
        }
    }

    fn evaluate_wait(&mut self, now: Instant) {
        if self.peer_visible() {
            self.peer_lost = false;
            self.decide_with_peer(now);
            return;
        }
        if self.startup_deadline.is_some() {
            return;
        }
        if self.wait_reason != Some(WaitReason::Deciding) && !self.peer_lost {
            // A settled WAIT (witness, failover off, stale data...) changes on a heartbeat or an
            // admin command, not by itself.
            return;
        }
        self.peer_lost = false;
        self.decide_alone(now);
    }

    fn decide_with_peer(&mut self, now: Instant) {
        let Some(peer) = self.peer.clone() else { return };
        let rel = relation(&self.p.history, &peer.history);
        if peer.acts_primary() && rel == Relation::MineNewer {
            // A primary on older data that has not noticed yet (a thawed host): it steps down
            // when it sees this node's newer generation; never resync in that direction.
            self.set_wait_reason(WaitReason::Deciding);
            return;
        }
        if peer.acts_primary()
            && rel == Relation::Divergent
            && self.wins_split_brain(&peer)
            && !self.p.stale
            && !matches!(self.intent, Intent::Secondary { .. })
        {
            // Split brain, and this node's branch wins: the peer steps down when it sees it.
            self.set_wait_reason(WaitReason::Deciding);
            return;
        }
        if peer.acts_primary() {
            if matches!(rel, Relation::PeerNewer) && !self.p.stale {
                self.p.stale = true;
                self.persist();
            }
            if let Intent::Primary { .. } = self.intent {
                self.log(LogLevel::Warn, format!("{} is already primary: joining it as secondary", self.peer_name()));
            }
            let full = matches!(self.intent, Intent::Secondary { full: true }) || self.needs_full_resync(rel);
            self.intent = Intent::Auto;
            self.become_second(now, full);
            return;
        }
        if peer.state.is_primary() {
            // The peer is leaving the primary role (its stop scripts run): the application may
            // still run there, so nothing starts here until it has stopped.
            self.set_wait_reason(WaitReason::PeerPrimary);
            return;
        }
        if let Intent::Primary { force } = self.intent {
            if force || (!self.p.stale && rel != Relation::PeerNewer) {
                self.intent = Intent::Auto;
                if self.p.stale || rel == Relation::PeerNewer {
                    self.log(LogLevel::Warn, "forced primary on data known to be stale");
                }
                self.admin_primary = true;
                self.become_primary(now, false);
                return;
            }
            self.intent = Intent::Auto;
        }
        if let Intent::Secondary { .. } = self.intent {
            self.set_wait_reason(WaitReason::SecondRequested);
            return;
        }
        // Judging by the data alone, could this node lead? Then who should?
        if self.p.stale || rel == Relation::PeerNewer {
            if rel == Relation::PeerNewer && !self.p.stale {
                self.p.stale = true;
                self.persist();
            }
            self.set_wait_reason(WaitReason::StaleData);
            return;
        }
        if peer.state == State::Stop && peer.transition.is_none() {
            self.become_primary(now, false);
            return;
        }
        if peer.state == State::Stop {
            // Its boot-time stop_prim runs: its application may still be running.
            self.set_wait_reason(WaitReason::PeerPrimary);
            return;
        }
        let peer_ok = peer.eligible || (peer.state == State::Second && peer.in_sync);
        let i_win = match rel {
            Relation::MineNewer => true,
            Relation::PeerNewer => false,
            Relation::Divergent => self.wins_split_brain(&peer),
            Relation::Same | Relation::BothEmpty => self.preferred_over(&peer),
        };
        if i_win || !peer_ok {
            self.become_primary(now, false);
        } else {
            self.set_wait_reason(WaitReason::Deciding);
        }
    }

    fn decide_alone(&mut self, now: Instant) {
        match self.intent {
            Intent::Secondary { .. } => {
                self.set_wait_reason(WaitReason::SecondRequested);
                return;
            }
            Intent::Primary { force } => {
                self.intent = Intent::Auto;
                if self.p.stale && !force {
                    self.go_wait(now, WaitReason::StaleData);
                } else {
                    self.admin_primary = true;
                    self.become_primary(now, false);
                }
                return;
            }
            Intent::Auto => {}
        }
        if self.p.stale {
            self.go_wait(now, WaitReason::StaleData);
        } else if self.p.peer_may_be_newer {
            self.go_wait(now, WaitReason::PeerMayBeNewer);
        } else if self.params.witness_configured {
            self.ask_witness(WitnessFor::TakeOver);
        } else {
            self.become_primary(now, false);
        }
    }

    fn evaluate_second(&mut self, now: Instant) {
        if !self.peer_visible() {
            if self.peer_lost {
                self.peer_lost = false;
                self.second_lost_peer(now);
            }
            return;
        }
        let Some(peer) = self.peer.clone() else { return };
        let rel = relation(&self.p.history, &peer.history);
        if self.in_sync && rel != Relation::Same {
            // The peer moved to a newer generation without this node (it lost us for a while).
            self.log(LogLevel::Warn, "the peer moved on without this node: its data here is no longer current");
            self.in_sync = false;
            self.full_resync = self.needs_full_resync(rel);
            if rel == Relation::PeerNewer {
                self.p.stale = true;
                self.persist();
            }
        }
        if peer.acts_primary() {
            self.orphan_deadline = None;
            self.handover = false;
            if peer.swap_request > self.peer_swap_requests_seen {
                self.peer_swap_requests_seen = peer.swap_request;
            }
            if !self.in_sync && !self.resync_running {
                self.resync_running = true;
                self.transition = Some(Transition::Resyncing);
                self.resync_requests_sent = self.resync_requests_sent.wrapping_add(1);
                self.actions.push_back(Action::StartResync { full: self.full_resync });
                self.log(
                    LogLevel::Info,
                    format!(
                        "resync from {} ({})",
                        self.peer_name(),
                        if self.full_resync { "full" } else { "changes only" }
                    ),
                );
            }
            return;
        }
        // A node that is itself handing over ignores the peer's older handover still in flight.
        if peer.handover && !self.handover && self.in_sync && rel == Relation::Same {
            self.log(LogLevel::Info, format!("{} handed over: taking over", self.peer_name()));
            self.become_primary(now, true);
            return;
        }
        if peer.state.is_primary() {
            // Its stop scripts run (a swap or a stop): wait for them, however long they take.
            self.orphan_deadline = None;
            return;
        }
        if peer.state == State::Stop && peer.transition.is_some() {
            // Its boot-time stop_prim runs: wait for it.
            self.orphan_deadline = None;
            return;
        }
        if peer.state == State::Stop {
            if self.in_sync {
                self.log(LogLevel::Info, format!("{} stopped: taking over", self.peer_name()));
                self.become_primary(now, false);
            } else {
                self.leave_second_for_wait(now);
            }
            return;
        }
        // The peer is neither primary nor handing over: give it one timeout, then decide again.
        if self.orphan_deadline.is_none() {
            self.orphan_deadline = Some(now + self.params.timeout);
        }
    }

    fn evaluate_primary(&mut self, now: Instant) {
        if !self.peer_visible() {
            if self.peer_lost {
                self.peer_lost = false;
                self.primary_lost_peer(now);
            } else if self.params.witness_configured && self.witness_recheck.is_none() && !self.admin_primary {
                self.witness_recheck = Some(now + self.params.timeout);
            }
            return;
        }
        self.witness_recheck = None;
        self.admin_primary = false;
        let Some(peer) = self.peer.clone() else { return };
        let rel = relation(&self.p.history, &peer.history);
        if peer.acts_primary() && self.transition.is_none() {
            let i_win = match rel {
                Relation::MineNewer => true,
                Relation::PeerNewer => false,
                Relation::Divergent => self.wins_split_brain(&peer),
                Relation::Same | Relation::BothEmpty => self.params.node_index == 0,
            };
            if i_win {
                return;
            }
            self.log(
                LogLevel::Warn,
                format!(
                    "both nodes are primary; {} wins ({}): stopping the application here and becoming its secondary",
                    self.peer_name(),
                    match rel {
                        Relation::PeerNewer => "its data is newer",
                        Relation::Divergent => self.split_brain_verdict(&peer).1,
                        _ => "tie-break",
                    }
                ),
            );
            if rel == Relation::Divergent {
                self.log(LogLevel::Warn, "this node's divergent data will be replaced by a full resync from the peer");
            }
            let full = self.needs_full_resync(rel);
            self.become_second(now, full);
            return;
        }
        if rel == Relation::Divergent
            && self.transition.is_none()
            && peer.state == State::Wait
            && peer.eligible
            && !self.wins_split_brain(&peer)
        {
            let why = self.split_brain_verdict(&peer).1;
            self.log(
                LogLevel::Warn,
                format!(
                    "{} holds the winning branch of a split brain ({why}): stopping the application here",
                    self.peer_name()
                ),
            );
            self.go_wait(now, WaitReason::Deciding);
            return;
        }
        if rel == Relation::PeerNewer && self.transition.is_none() {
            self.log(
                LogLevel::Warn,
                format!("{} holds newer data than this primary: stopping the application here", self.peer_name()),
            );
            self.p.stale = true;
            self.persist();
            self.go_wait(now, WaitReason::StaleData);
            return;
        }
        let peer_in_sync = peer.state == State::Second && peer.in_sync && rel == Relation::Same;
        let mut rejoined = false;
        match self.state {
            State::Alone if peer_in_sync && self.peer_fed() => {
                self.state = State::Prim;
                rejoined = true;
                self.log(LogLevel::Info, format!("{} is an up-to-date secondary: PRIM", self.peer_name()));
            }
            State::Prim if !peer_in_sync => {
                self.log(LogLevel::Warn, format!("{} is no longer an up-to-date secondary: ALONE", self.peer_name()));
                self.primary_without_peer();
            }
            State::Alone if peer.state != State::Second && rel == Relation::Same => {
                self.primary_without_peer();
            }
            _ => {}
        }
        if self.state == State::Prim && peer_in_sync {
            if peer.swap_request > self.peer_swap_requests_seen {
                self.peer_swap_requests_seen = peer.swap_request;
                self.log(LogLevel::Info, format!("{} asked for a swap", self.peer_name()));
                self.swap_out(now);
            } else if let DefaultPrim::Node(n) = &self.params.defaultprim {
                // Only after a repair (the preferred node just came back in sync), never
                // against an admin's swap.
                if rejoined && n == self.peer_name() {
                    self.log(
                        LogLevel::Info,
                        format!("{n} is the default primary and is back in sync: swapping back to it"),
                    );
                    self.swap_out(now);
                }
            }
        }
        self.peer_swap_requests_seen = self.peer_swap_requests_seen.max(peer.swap_request);
    }

    // ----- role changes -----

    fn start(&mut self, now: Instant, intent: Intent) {
        self.p.running = true;
        self.persist();
        self.intent = intent;
        self.state = State::Wait;
        self.wait_reason = Some(WaitReason::Deciding);
        self.in_sync = false;
        self.handover = false;
        self.startup_deadline = if self.peer_visible() { None } else { Some(now + self.params.timeout) };
        if matches!(intent, Intent::Primary { .. }) {
            // The admin asked for this node: do not wait for the peer to speak.
            self.startup_deadline = None;
        }
        self.log(LogLevel::Info, "starting");
        self.begin(now, &[Script::Prestart, Script::StartBoth], Goal::Decide);
    }

    fn become_primary(&mut self, now: Instant, handover: bool) {
        let from = self.state;
        let peer_in_sync_same_gen = self.peer_visible()
            && self
                .peer
                .as_ref()
                .is_some_and(|p| p.state == State::Second && p.in_sync && p.history.last() == self.p.history.last());
        // Handover: the peer stopped for us, our data is its data: same generation, PRIM at once.
        if !(handover || (peer_in_sync_same_gen && self.p.history.last().is_some())) {
            // An up-to-date secondary succeeds its primary; anything else starts afresh.
            let origin = if from == State::Second && self.in_sync { Origin::Failover } else { Origin::Startup };
            self.new_generation(origin);
        }
        self.p.last_role = Role::Primary;
        self.p.peer_may_be_newer = false;
        self.p.stale = false;
        self.persist();
        self.orphan_deadline = None;
        self.wait_reason = None;
        self.in_sync = false;
        if self.resync_running {
            self.resync_running = false;
            self.actions.push_back(Action::StopResync);
        }
        self.log(LogLevel::Info, format!("becoming primary (generation {})", self.generation_name()));
        let scripts: &[Script] = match from {
            State::Second => &[Script::StopSecond, Script::StartPrim],
            _ => &[Script::StartPrim],
        };
        self.begin(now, scripts, Goal::Primary);
    }

    fn become_second(&mut self, now: Instant, full: bool) {
        let from = self.state;
        self.p.last_role = Role::Secondary;
        self.p.peer_may_be_newer = true;
        self.persist();
        self.wait_reason = None;
        self.full_resync = full;
        let resync = full
            || self.peer.as_ref().is_none_or(|p| relation(&self.p.history, &p.history) != Relation::Same)
            || self.p.stale;
        let scripts: &[Script] = if from.is_primary() {
            self.actions.push_back(Action::Checkers(false));
            &[Script::StopPrim, Script::StartSecond]
        } else {
            &[Script::StartSecond]
        };
        self.log(LogLevel::Info, format!("becoming secondary of {}", self.peer_name()));
        self.begin(now, scripts, Goal::Secondary { resync, full });
    }

    /// A primary that lost its peer, or whose peer stopped replicating, continues alone on a
    /// new generation: the peer may hold the current one (a resync it finished unseen, or an
    /// in-sync SECOND), so later writes must be told apart from it.
    fn primary_without_peer(&mut self) {
        self.new_generation(Origin::Primary);
        self.persist();
        self.state = State::Alone;
    }

    fn primary_lost_peer(&mut self, now: Instant) {
        if !self.params.witness_configured {
            self.primary_without_peer();
            return;
        }
        match std::mem::replace(&mut self.early_witness, EarlyWitness::None) {
            EarlyWitness::Answered(true) => {
                self.log(LogLevel::Warn, "every heartbeat is lost; the witness answered (asked before the timeout)");
                self.primary_without_peer();
            }
            EarlyWitness::Answered(false) => {
                self.log(LogLevel::Warn, "every heartbeat is lost and no witness answered (asked before the timeout)");
                self.log(LogLevel::Warn, "no witness answers: stopping the application to avoid two primaries");
                self.actions.push_back(Action::Checkers(false));
                self.begin(now, &[Script::StopPrim], Goal::Wait(WaitReason::WitnessUnreachable));
            }
            EarlyWitness::Pending => {
                // The answer is on its way: it now decides as the loss question.
                self.log(LogLevel::Warn, "every heartbeat is lost: waiting for the witness's answer");
                self.witness = Some(WitnessFor::PrimaryLostPeer);
                self.transition = Some(Transition::CheckingWitness);
            }
            EarlyWitness::Obsolete | EarlyWitness::None => self.ask_witness(WitnessFor::PrimaryLostPeer),
        }
    }

    /// When a primary whose heartbeats went quiet asks the witness: one witness timeout before
    /// the last lan times out.
    fn early_witness_time(&self) -> Option<Instant> {
        if !self.params.witness_configured
            || !self.state.is_primary()
            || self.early_witness != EarlyWitness::None
            || self.witness.is_some()
            || self.run.is_some()
        {
            return None;
        }
        let last = self.lan_deadline.iter().flatten().max()?;
        Some(last.checked_sub(self.params.witness_timeout).unwrap_or(*last))
    }

    fn second_lost_peer(&mut self, now: Instant) {
        self.orphan_deadline = None;
        if !self.in_sync {
            if self.resync_running {
                self.resync_running = false;
                self.actions.push_back(Action::StopResync);
            }
            self.log(LogLevel::Error, "the peer was lost before this node was in sync: it cannot take over");
            self.go_wait(now, WaitReason::StaleData);
            return;
        }
        if !self.params.failover_auto {
            self.go_wait(now, WaitReason::FailoverOff);
            return;
        }
        if self.params.witness_configured {
            self.ask_witness(WitnessFor::TakeOver);
        } else {
            self.become_primary(now, false);
        }
    }

    /// A planned swap, on the primary: stop the application, then hand over to the peer.
    fn swap_out(&mut self, now: Instant) {
        self.log(LogLevel::Info, format!("swap: stopping here, then {} takes over", self.peer_name()));
        self.actions.push_back(Action::Checkers(false));
        self.p.last_role = Role::Secondary;
        self.p.peer_may_be_newer = true;
        self.persist();
        self.handover = true;
        self.begin(now, &[Script::StopPrim, Script::StartSecond], Goal::Secondary { resync: false, full: false });
    }

    fn leave_second_for_wait(&mut self, now: Instant) {
        self.orphan_deadline = None;
        self.begin(now, &[Script::StopSecond], Goal::Wait(WaitReason::Deciding));
    }

    fn go_wait(&mut self, now: Instant, reason: WaitReason) {
        match self.state {
            State::Second => self.begin(now, &[Script::StopSecond], Goal::Wait(reason)),
            State::Alone | State::Prim => {
                self.actions.push_back(Action::Checkers(false));
                self.begin(now, &[Script::StopPrim], Goal::Wait(reason))
            }
            _ => {
                self.state = State::Wait;
                self.set_wait_reason(reason);
            }
        }
    }

    fn stop_module(&mut self, now: Instant, goal: Goal) {
        let role_stop: &[Script] = match self.state {
            State::Alone | State::Prim => &[Script::StopPrim],
            State::Second => &[Script::StopSecond],
            _ => &[],
        };
        if self.state == State::Stop {
            return;
        }
        if self.state.is_primary() {
            self.actions.push_back(Action::Checkers(false));
            if self.peer_visible() && self.peer_state() == Some(State::Second) {
                // The peer takes over: it may hold newer data by the time this node is back.
                self.p.peer_may_be_newer = true;
                self.persist();
            }
        }
        if self.resync_running {
            self.resync_running = false;
            self.actions.push_back(Action::StopResync);
        }
        self.orphan_deadline = None;
        self.startup_deadline = None;
        self.log(LogLevel::Info, "stopping");
        let mut scripts: Vec<Script> = role_stop.to_vec();
        scripts.extend([Script::StopBoth, Script::Poststop]);
        self.begin(now, &scripts, goal);
    }

    /// A start script failed: restart per maxloop, or stop the module.
    fn start_failed(&mut self, now: Instant, script: Script, goal: Goal) {
        match goal {
            Goal::Decide => {
                self.log(LogLevel::Error, format!("{} failed: the module is stopped", script.file_name()));
                self.p.running = false;
                self.persist();
                self.state = State::Wait;
                self.stop_module(now, Goal::Stop);
            }
            Goal::Primary | Goal::Same if self.state.is_primary() || goal == Goal::Primary => {
                // The generation is already this node's: restart the application in place.
                if !self.state.is_primary() {
                    self.state = State::Alone;
                }
                self.failure(now, CheckAction::Restart);
            }
            _ => {
                if !self.maxloop_reached(now) {
                    self.state = State::Wait;
                    self.set_wait_reason(WaitReason::Deciding);
                }
            }
        }
    }

    /// Counts one failure; when `maxloop` is passed within `loop_interval`, stops the module
    /// (so the peer takes over) and says so.
    fn maxloop_reached(&mut self, now: Instant) -> bool {
        while self.restarts.front().is_some_and(|&t| now.duration_since(t) >= self.params.loop_interval) {
            self.restarts.pop_front();
        }
        self.restarts.push_back(now);
        let count = self.restarts.len() as u32;
        if count <= self.params.maxloop {
            return false;
        }
        self.log(
            LogLevel::Error,
            format!(
                "{count} restarts within {} s: maxloop reached, stopping the module",
                self.params.loop_interval.as_secs()
            ),
        );
        self.p.running = false;
        self.persist();
        self.stop_module(now, Goal::Stop);
        true
    }

    /// The application failed (checker or start script): restart in place up to `maxloop`
    /// times per `loop_interval`, then stop the module so the peer takes over.
    fn failure(&mut self, now: Instant, action: CheckAction) {
        if self.maxloop_reached(now) {
            return;
        }
        let count = self.restarts.len();
        let maxloop = self.params.maxloop;
        match action {
            CheckAction::Restart => {
                self.log(LogLevel::Warn, format!("restarting the application (restart {count} of {maxloop})"));
                if self.state.is_primary() {
                    self.actions.push_back(Action::Checkers(false));
                    self.begin(now, &[Script::StopPrim, Script::StartPrim], Goal::Same)
                }
            }
            CheckAction::Stopstart => {
                self.log(LogLevel::Warn, format!("stopping and restarting the module (restart {count} of {maxloop})"));
                self.stop_module(now, Goal::StopThenStart);
            }
        }
    }

    // ----- script runs -----

    fn begin(&mut self, now: Instant, scripts: &[Script], goal: Goal) {
        assert!(self.run.is_none(), "a script run is already in progress");
        self.transition = Some(match goal {
            Goal::Decide => Transition::Starting,
            Goal::Primary => Transition::StartingPrimary,
            Goal::Secondary { .. } => Transition::StartingSecondary,
            Goal::Wait(_) | Goal::Stop | Goal::StopThenStart | Goal::Cleanup => Transition::Stopping,
            Goal::Same => Transition::Restarting,
        });
        self.run = Some(Run { queue: scripts.iter().copied().collect(), current: None, goal });
        self.send_heartbeat_now(now);
        self.next_script(now);
    }

    fn next_script(&mut self, now: Instant) {
        let Some(run) = self.run.as_mut() else { return };
        if let Some(script) = run.queue.pop_front() {
            run.current = Some(script);
            if script == Script::StartPrim && !self.p.app_running {
                self.p.app_running = true;
                self.persist();
            }
            self.actions.push_back(Action::RunScript(script));
            return;
        }
        let goal = run.goal;
        self.run = None;
        self.transition = None;
        self.finish(now, goal);
        self.send_heartbeat_now(now);
    }

    fn finish(&mut self, now: Instant, goal: Goal) {
        match goal {
            Goal::Decide => {
                self.state = State::Wait;
                if self.wait_reason.is_none() {
                    self.wait_reason = Some(WaitReason::Deciding);
                }
            }
            Goal::Primary => {
                self.state =
                    if self.peer_in_sync_second_same_gen() && self.peer_fed() { State::Prim } else { State::Alone };
                self.actions.push_back(Action::Checkers(true));
                self.log(LogLevel::Info, format!("{} (generation {})", self.state, self.generation_name()));
            }
            Goal::Secondary { resync, full } => {
                self.replication_up = false;
                self.state = State::Second;
                self.in_sync = !resync;
                self.full_resync = full;
                self.log(LogLevel::Info, "SECOND");
                if self.handover {
                    self.orphan_deadline = Some(now + self.params.timeout);
                }
            }
            Goal::Wait(reason) => {
                self.replication_up = false;
                self.admin_primary = false;
                self.state = State::Wait;
                self.set_wait_reason(reason);
            }
            Goal::Stop | Goal::StopThenStart => {
                self.replication_up = false;
                self.admin_primary = false;
                self.state = State::Stop;
                self.wait_reason = None;
                self.intent = Intent::Auto;
                self.in_sync = false;
                self.handover = false;
                self.log(LogLevel::Info, "STOP");
                if goal == Goal::StopThenStart && self.p.running {
                    self.restart_deadline = Some(now + self.params.timeout);
                }
            }
            Goal::Same => {
                if self.state.is_primary() {
                    self.actions.push_back(Action::Checkers(true));
                }
            }
            Goal::Cleanup => {
                if self.p.running {
                    self.log(LogLevel::Info, "the module was running before this daemon started: starting it");
                    self.start(now, Intent::Auto);
                }
            }
        }
    }

    // ----- helpers -----

    fn ask_witness(&mut self, purpose: WitnessFor) {
        if purpose != WitnessFor::Recheck {
            self.log(LogLevel::Warn, "every heartbeat is lost: asking the witness");
        }
        self.witness = Some(purpose);
        self.transition = Some(Transition::CheckingWitness);
        self.actions.push_back(Action::CheckWitness);
    }

    fn new_generation(&mut self, origin: Origin) {
        self.p.gen_seq += 1;
        let g = Generation { node: self.params.node_index, seq: self.p.gen_seq, origin };
        self.p.history.push(g);
        if self.p.history.len() > HISTORY_MAX {
            self.p.history.remove(0);
        }
    }

    fn needs_full_resync(&self, rel: Relation) -> bool {
        !matches!(rel, Relation::Same | Relation::PeerNewer) || self.p.history.is_empty()
    }

    /// After a split brain: the branch started by the node that was primary before the split
    /// wins, then the one started by a secondary taking over, over one started at a restart or
    /// by `prim`; between equals, the default primary, then the first node of the pair.
    fn wins_split_brain(&self, peer: &PeerStatus) -> bool {
        self.split_brain_verdict(peer).0
    }

    /// The split-brain winner and the rule that chose it, for the log.
    fn split_brain_verdict(&self, peer: &PeerStatus) -> (bool, &'static str) {
        let mine = fork_point(&self.p.history, &peer.history).map(|g| g.origin).unwrap_or(Origin::Startup);
        let theirs = fork_point(&peer.history, &self.p.history).map(|g| g.origin).unwrap_or(Origin::Startup);
        if mine != theirs {
            let why = match mine.max(theirs) {
                Origin::Primary => "split brain: it was primary before the split",
                _ => "split brain: it took over as an up-to-date secondary",
            };
            return (mine > theirs, why);
        }
        (self.preferred_over(peer), "split brain between equals: default primary, then node order")
    }

    /// With equal data: the default primary, then the last primary (`lastprim`), then the
    /// first node of the pair.
    fn preferred_over(&self, peer: &PeerStatus) -> bool {
        match &self.params.defaultprim {
            DefaultPrim::Node(n) if n == self.my_name() => return true,
            DefaultPrim::Node(n) if n == self.peer_name() => return false,
            DefaultPrim::Lastprim => {
                let me = self.p.last_role == Role::Primary;
                let them = peer.last_role == Role::Primary;
                if me != them {
                    return me;
                }
            }
            _ => {}
        }
        self.params.node_index == 0
    }

    fn eligible(&self) -> bool {
        self.state == State::Wait && !self.p.stale && !matches!(self.intent, Intent::Secondary { .. })
    }

    fn set_wait_reason(&mut self, reason: WaitReason) {
        if self.wait_reason != Some(reason) {
            self.wait_reason = Some(reason);
            self.log(LogLevel::Info, format!("WAIT: {}", reason.describe()));
        }
    }

    fn refuse(&self, command: &'static str, why: String) -> CommandError {
        CommandError::Refused { module: self.params.name.clone(), command, why }
    }

    fn transition_name(&self) -> &'static str {
        self.transition.map(Transition::as_str).unwrap_or("busy")
    }

    /// The peer's heartbeats arrive on at least one lan.
    pub fn peer_visible(&self) -> bool {
        self.lan_deadline.iter().any(Option::is_some)
    }

    fn peer_state(&self) -> Option<State> {
        self.peer.as_ref().map(|p| p.state)
    }

    fn peer_is_primary(&self) -> bool {
        self.peer.as_ref().is_some_and(PeerStatus::acts_primary)
    }

    fn peer_in_sync_second(&self) -> bool {
        self.peer_visible() && self.peer.as_ref().is_some_and(|p| p.state == State::Second && p.in_sync)
    }

    /// The secondary gets every change (always, for a module that replicates nothing).
    fn peer_fed(&self) -> bool {
        !self.params.replicated || self.replication_up
    }

    fn peer_in_sync_second_same_gen(&self) -> bool {
        self.peer_in_sync_second() && self.peer.as_ref().is_some_and(|p| p.history.last() == self.p.history.last())
    }

    fn relation_to_peer(&self) -> Option<Relation> {
        self.peer.as_ref().map(|p| relation(&self.p.history, &p.history))
    }

    fn my_name(&self) -> &str {
        &self.params.node_names[self.params.node_index as usize]
    }

    fn peer_name(&self) -> &str {
        &self.params.node_names[1 - self.params.node_index as usize]
    }

    fn generation_name(&self) -> String {
        self.p.history.last().map(|g| g.to_string()).unwrap_or_else(|| "none".to_string())
    }

    fn send_heartbeat_now(&mut self, now: Instant) {
        if self.next_pulse.is_some() {
            self.actions.push_back(Action::SendHeartbeat(self.status()));
            self.next_pulse = Some(now + self.params.pulse);
        }
    }

    fn persist(&mut self) {
        self.actions.push_back(Action::Persist(self.p.clone()));
    }

    fn log(&mut self, level: LogLevel, text: impl Into<String>) {
        self.actions.push_back(Action::Log(level, text.into()));
    }
}

fn describe(s: &PeerStatus) -> String {
    match s.transition {
        Some(t) => format!("{} ({})", s.state, t.as_str()),
        None => s.state.to_string(),
    }
}
