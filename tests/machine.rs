//! Behaviour tests of the module state machine (`hamirror::module::Module`), one scenario per
//! test, over a small deterministic harness: two machines ("n0" and "n1"), a virtual clock, a
//! perfect network (heartbeats arrive after 1 ms on every lan that is not cut), scripts that
//! end after 1 ms with an outcome set per node and script, witness answers set per node, and a
//! resync that the primary accepts and finishes quickly. Each node's `Persist` actions are its
//! disk, so a node can crash and boot again from it. The randomized counterpart is
//! `tests/sim.rs`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use hamirror::config::{CheckAction, DefaultPrim};
use hamirror::module::{
    Action, AdminCommand, CommandError, Event, LogLevel, Module, ModuleParams, PeerStatus, PersistedState, Role,
    Script, ScriptOutcome, Snapshot, State, Transition, WaitReason,
};

const PULSE: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_secs(1);
/// Delay of every simulated message, script and witness answer.
const TICK: Duration = Duration::from_millis(1);
/// Events one `run_for` may process before the harness calls it a livelock.
const STEPS_MAX: u64 = 1_000_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[derive(Debug, Clone)]
enum Item {
    Heartbeat { to: usize, inc: u64, lan: usize, status: PeerStatus },
    ScriptDone { node: usize, inc: u64, script: Script, outcome: ScriptOutcome },
    Witness { node: usize, inc: u64, reachable: bool },
    ResyncAccept { node: usize, inc: u64, token: u64 },
    ResyncDone { node: usize, inc: u64, token: u64 },
}

impl Item {
    fn target(&self) -> (usize, u64) {
        match *self {
            Item::Heartbeat { to, inc, .. } => (to, inc),
            Item::ScriptDone { node, inc, .. }
            | Item::Witness { node, inc, .. }
            | Item::ResyncAccept { node, inc, .. }
            | Item::ResyncDone { node, inc, .. } => (node, inc),
        }
    }
}

struct Node {
    machine: Option<Module>,
    /// Every `Persist` action, the last one wins: what a reboot starts from.
    disk: PersistedState,
    /// Bumped at each crash: items for an older incarnation are dropped.
    inc: u64,
    frozen: bool,
    /// Items other than heartbeats that arrived while frozen, delivered at the thaw.
    held: Vec<Item>,
    outcomes: HashMap<Script, ScriptOutcome>,
    /// What this node's witness check answers.
    witness: bool,
    resync_token: u64,
    /// Every action but heartbeats, with its virtual time.
    actions: Vec<(Duration, Action)>,
    /// Every (state, transition, wait reason) the node went through, with its virtual time.
    states: Vec<(Duration, State, Option<Transition>, Option<WaitReason>)>,
}

impl Node {
    fn new() -> Node {
        Node {
            machine: None,
            disk: PersistedState::default(),
            inc: 0,
            frozen: false,
            held: Vec::new(),
            outcomes: HashMap::new(),
            witness: true,
            resync_token: 0,
            actions: Vec::new(),
            states: Vec::new(),
        }
    }
}

/// Two machines over a virtual clock and network.
struct Pair {
    base: Instant,
    now: Duration,
    seq: u64,
    queue: BTreeMap<(Duration, u64), Item>,
    nodes: [Node; 2],
    params: [ModuleParams; 2],
    /// Per lan: cut between the two nodes.
    cut: Vec<bool>,
    /// How long an accepted resync takes.
    resync_time: Duration,
}

fn params(node_index: u8) -> ModuleParams {
    ModuleParams {
        name: "m".into(),
        node_index,
        node_names: ["n0".into(), "n1".into()],
        lans: vec!["lan0".into(), "lan1".into()],
        pulse: PULSE,
        timeout: TIMEOUT,
        failover_auto: true,
        defaultprim: DefaultPrim::Alone,
        maxloop: 3,
        loop_interval: secs(60),
        witness_configured: false,
        witness_timeout: hamirror::module::witness_timeout(TIMEOUT),
        replicated: false,
    }
}

impl Pair {
    /// A pair whose two nodes read the same configuration, changed by `configure`.
    fn new(configure: impl Fn(&mut ModuleParams)) -> Pair {
        let mut p = [params(0), params(1)];
        for p in p.iter_mut() {
            configure(p);
        }
        let lans = p[0].lans.len();
        Pair {
            base: Instant::now(),
            now: Duration::ZERO,
            seq: 0,
            queue: BTreeMap::new(),
            nodes: [Node::new(), Node::new()],
            params: p,
            cut: vec![false; lans],
            resync_time: ms(2),
        }
    }

    /// Both nodes booted and started at once, settled: n0 PRIM, n1 SECOND in sync.
    fn started(configure: impl Fn(&mut ModuleParams)) -> Pair {
        let mut pair = Pair::new(configure);
        pair.boot(0);
        pair.boot(1);
        pair.run_for(ms(500));
        pair.admin(0, AdminCommand::Start).unwrap();
        pair.admin(1, AdminCommand::Start).unwrap();
        pair.run_for(secs(3));
        pair.assert_pair(State::Prim, State::Second);
        pair
    }

    fn at(&self) -> Instant {
        self.base + self.now
    }

    fn m(&self, n: usize) -> &Module {
        self.nodes[n].machine.as_ref().expect("the node is up")
    }

    fn state(&self, n: usize) -> State {
        self.m(n).state()
    }

    fn snap(&self, n: usize) -> Snapshot {
        self.m(n).snapshot()
    }

    fn disk(&self, n: usize) -> &PersistedState {
        &self.nodes[n].disk
    }

    /// Both nodes settled (no transition) in these states; n1's SECOND is in sync on n0's
    /// generation, or the reverse.
    fn assert_pair(&self, s0: State, s1: State) {
        let (a, b) = (self.snap(0), self.snap(1));
        assert_eq!((a.state, b.state), (s0, s1), "states of n0 and n1: n0={a:?} n1={b:?}");
        assert_eq!((a.transition, b.transition), (None, None), "n0={a:?} n1={b:?}");
        if (s0, s1) == (State::Prim, State::Second) || (s0, s1) == (State::Second, State::Prim) {
            assert!(a.in_sync || b.in_sync, "the SECOND is in sync: n0={a:?} n1={b:?}");
            assert_eq!(a.generation, b.generation, "same generation: n0={a:?} n1={b:?}");
        }
    }

    fn schedule(&mut self, after: Duration, item: Item) {
        self.seq += 1;
        self.queue.insert((self.now + after, self.seq), item);
    }

    fn boot(&mut self, n: usize) {
        assert!(self.nodes[n].machine.is_none(), "n{n} is already up");
        self.nodes[n].machine = Some(Module::new(self.params[n].clone(), self.nodes[n].disk.clone()));
        let now = self.at();
        self.with(n, |m| m.boot(now));
    }

    /// The host dies: the machine is gone, its disk stays.
    fn crash(&mut self, n: usize) {
        self.nodes[n].machine = None;
        self.nodes[n].inc += 1;
        self.nodes[n].frozen = false;
        self.nodes[n].held.clear();
    }

    /// The host stops: nothing is delivered to it (heartbeats are lost) and its timeouts are
    /// not called until `thaw`.
    fn freeze(&mut self, n: usize) {
        self.nodes[n].frozen = true;
    }

    /// The host runs again: the next `run_for` calls its late timeout first.
    fn thaw(&mut self, n: usize) {
        self.nodes[n].frozen = false;
        for item in std::mem::take(&mut self.nodes[n].held) {
            self.schedule(Duration::ZERO, item);
        }
    }

    fn cut_lan(&mut self, lan: usize) {
        self.cut[lan] = true;
    }

    fn heal_lan(&mut self, lan: usize) {
        self.cut[lan] = false;
    }

    fn cut_all(&mut self) {
        self.cut.iter_mut().for_each(|c| *c = true);
    }

    fn heal_all(&mut self) {
        self.cut.iter_mut().for_each(|c| *c = false);
    }

    fn connected(&self) -> bool {
        self.cut.iter().any(|c| !c)
    }

    fn live(&self, n: usize) -> bool {
        self.nodes[n].machine.is_some() && !self.nodes[n].frozen
    }

    fn set_outcome(&mut self, n: usize, script: Script, outcome: ScriptOutcome) {
        self.nodes[n].outcomes.insert(script, outcome);
    }

    fn admin(&mut self, n: usize, cmd: AdminCommand) -> Result<(), CommandError> {
        let now = self.at();
        let mut result = Ok(());
        self.with(n, |m| result = m.handle_admin(now, cmd));
        result
    }

    fn event(&mut self, n: usize, event: Event) {
        let now = self.at();
        self.with(n, |m| m.handle(now, event));
    }

    fn shutdown(&mut self, n: usize) {
        let now = self.at();
        self.with(n, |m| m.shutdown(now));
    }

    /// Runs `f` on node `n`'s machine, then executes the actions it asked for.
    fn with(&mut self, n: usize, f: impl FnOnce(&mut Module)) {
        let Some(m) = self.nodes[n].machine.as_mut() else { return };
        f(m);
        let mut actions = Vec::new();
        while let Some(a) = m.poll_action() {
            actions.push(a);
        }
        let s = m.snapshot();
        let entry = (self.now, s.state, s.transition, s.wait_reason);
        if self.nodes[n].states.last().is_none_or(|l| (l.1, l.2, l.3) != (entry.1, entry.2, entry.3)) {
            self.nodes[n].states.push(entry);
        }
        for a in actions {
            self.execute(n, a);
        }
    }

    fn execute(&mut self, n: usize, action: Action) {
        let inc = self.nodes[n].inc;
        if !matches!(action, Action::SendHeartbeat(_)) {
            self.nodes[n].actions.push((self.now, action.clone()));
        }
        match action {
            Action::RunScript(script) => {
                let outcome = self.nodes[n].outcomes.get(&script).copied().unwrap_or(ScriptOutcome::Ok);
                self.schedule(TICK, Item::ScriptDone { node: n, inc, script, outcome });
            }
            Action::SendHeartbeat(status) => {
                let to = 1 - n;
                for lan in 0..self.cut.len() {
                    if !self.cut[lan] {
                        let inc = self.nodes[to].inc;
                        self.schedule(TICK, Item::Heartbeat { to, inc, lan, status: status.clone() });
                    }
                }
            }
            Action::CheckWitness => {
                let reachable = self.nodes[n].witness;
                self.schedule(TICK, Item::Witness { node: n, inc, reachable });
            }
            Action::StartResync { .. } => {
                self.nodes[n].resync_token += 1;
                let token = self.nodes[n].resync_token;
                self.schedule(TICK, Item::ResyncAccept { node: n, inc, token });
            }
            Action::StopResync => self.nodes[n].resync_token += 1,
            Action::Persist(p) => self.nodes[n].disk = p,
            Action::Checkers(_) | Action::Log(..) => {}
        }
    }

    fn deliver(&mut self, item: Item) {
        let (n, inc) = item.target();
        if self.nodes[n].inc != inc || self.nodes[n].machine.is_none() {
            return;
        }
        if self.nodes[n].frozen {
            if !matches!(item, Item::Heartbeat { .. }) {
                self.nodes[n].held.push(item);
            }
            return;
        }
        let other = 1 - n;
        match item {
            Item::Heartbeat { lan, status, .. } => {
                if !self.cut[lan] {
                    self.event(n, Event::Heartbeat { lan, status });
                }
            }
            Item::ScriptDone { script, outcome, .. } => self.event(n, Event::ScriptDone { script, outcome }),
            Item::Witness { reachable, .. } => self.event(n, Event::Witness { reachable }),
            Item::ResyncAccept { token, .. } => {
                if self.nodes[n].resync_token != token {
                    return;
                }
                let serves = self.live(other) && self.connected() && self.m(other).status().acts_primary();
                if serves {
                    self.event(n, Event::ResyncStarted);
                    let inc = self.nodes[n].inc;
                    self.schedule(self.resync_time, Item::ResyncDone { node: n, inc, token });
                } else {
                    self.event(n, Event::ResyncDone { ok: false });
                }
            }
            Item::ResyncDone { token, .. } => {
                if self.nodes[n].resync_token != token {
                    return;
                }
                let ok = self.live(other) && self.connected() && self.m(other).state().is_primary();
                self.event(n, Event::ResyncDone { ok });
            }
        }
    }

    /// When node `n`'s machine wants its timeout called (never earlier than now).
    fn timer(&self, n: usize) -> Option<Duration> {
        if !self.live(n) {
            return None;
        }
        let t = self.m(n).poll_timeout()?;
        Some(t.saturating_duration_since(self.base).max(self.now))
    }

    /// Processes every item and timeout due within `d`, in time order, then sets the clock to
    /// the end of the period.
    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        for _ in 0..STEPS_MAX {
            let item = self.queue.first_key_value().map(|(k, _)| *k);
            let timers = [self.timer(0), self.timer(1)];
            let timer = (0..2).filter_map(|n| timers[n].map(|t| (t, n))).min();
            match (item, timer) {
                (Some((ti, _)), t) if ti <= until && t.is_none_or(|(tt, _)| ti <= tt) => {
                    let (key, item) = self.queue.pop_first().expect("an item");
                    self.now = key.0;
                    self.deliver(item);
                }
                (_, Some((tt, n))) if tt <= until => {
                    self.now = tt;
                    let now = self.at();
                    self.with(n, |m| m.handle_timeout(now));
                }
                _ => {
                    self.now = until;
                    return;
                }
            }
        }
        panic!("livelock: more than {STEPS_MAX} steps before {until:?}");
    }

    // ----- records -----

    fn scripts_since(&self, n: usize, since: Duration) -> Vec<Script> {
        self.script_times(n).into_iter().filter(|&(t, _)| t >= since).map(|(_, s)| s).collect()
    }

    fn scripts(&self, n: usize) -> Vec<Script> {
        self.scripts_since(n, Duration::ZERO)
    }

    fn script_times(&self, n: usize) -> Vec<(Duration, Script)> {
        self.nodes[n]
            .actions
            .iter()
            .filter_map(|(t, a)| match a {
                Action::RunScript(s) => Some((*t, *s)),
                _ => None,
            })
            .collect()
    }

    /// When node `n` last ran `script` (panics if it never did).
    fn last_run(&self, n: usize, script: Script) -> Duration {
        self.script_times(n)
            .into_iter()
            .filter(|&(_, s)| s == script)
            .map(|(t, _)| t)
            .next_back()
            .unwrap_or_else(|| panic!("n{n} never ran {}", script.file_name()))
    }

    /// The `full` flag of every resync node `n` asked for since `since`.
    fn resyncs_since(&self, n: usize, since: Duration) -> Vec<bool> {
        self.nodes[n]
            .actions
            .iter()
            .filter(|(t, _)| *t >= since)
            .filter_map(|(_, a)| match a {
                Action::StartResync { full } => Some(*full),
                _ => None,
            })
            .collect()
    }

    fn logs(&self, n: usize, level: LogLevel) -> Vec<&str> {
        self.nodes[n]
            .actions
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Log(l, text) if *l == level => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The states node `n` went through since `since` (transitions included).
    fn states_since(&self, n: usize, since: Duration) -> Vec<(State, Option<Transition>, Option<WaitReason>)> {
        self.nodes[n].states.iter().filter(|e| e.0 >= since).map(|e| (e.1, e.2, e.3)).collect()
    }

    /// Whether node `n` was primary at any moment since `since`.
    fn was_primary_since(&self, n: usize, since: Duration) -> bool {
        let before = self.nodes[n].states.iter().rfind(|e| e.0 < since).is_some_and(|e| e.1.is_primary());
        before || self.states_since(n, since).iter().any(|s| s.0.is_primary())
    }
}

fn with_witness(p: &mut ModuleParams) {
    p.witness_configured = true;
}

fn defaults(_: &mut ModuleParams) {}

// ----- start -----

// Proves that two nodes started together choose n0 as PRIM and n1 as SECOND in sync, with the
// scripts prestart, start_both, then start_prim on the primary and start_second on the secondary.
#[test]
fn both_nodes_started_become_prim_and_second() {
    let pair = Pair::started(defaults);
    assert_eq!(pair.scripts(0), [Script::Prestart, Script::StartBoth, Script::StartPrim]);
    assert_eq!(pair.scripts(1), [Script::Prestart, Script::StartBoth, Script::StartSecond]);
    // The first pairing: a full resync into the secondary, none into the primary.
    assert_eq!(pair.resyncs_since(1, Duration::ZERO), [true]);
    assert!(pair.resyncs_since(0, Duration::ZERO).is_empty());
    assert_eq!(pair.snap(0).generation.map(|g| (g.node, g.seq)), Some((0, 1)));
    assert!(pair.snap(1).in_sync);
    assert_eq!(pair.disk(0).last_role, Role::Primary);
    assert_eq!(pair.disk(1).last_role, Role::Secondary);
    assert!(pair.disk(0).running && pair.disk(1).running);
    assert_eq!(pair.disk(0).history, pair.disk(1).history);
}

// ----- heartbeats -----

// Proves that losing one of two heartbeat lans is logged on both nodes but changes no role
// and runs no script, and that its return is logged too.
#[test]
fn losing_one_lan_of_two_is_logged_but_no_failover() {
    let mut pair = Pair::started(defaults);
    let cut_at = pair.now;
    pair.cut_lan(1);
    pair.run_for(secs(5));
    pair.assert_pair(State::Prim, State::Second);
    for n in 0..2 {
        assert!(pair.scripts_since(n, cut_at).is_empty(), "n{n} ran {:?}", pair.scripts_since(n, cut_at));
        let lans: Vec<bool> = pair.snap(n).lans.iter().map(|l| l.up).collect();
        assert_eq!(lans, [true, false], "n{n}");
        assert!(
            pair.logs(n, LogLevel::Warn).iter().any(|l| l.contains("lan1") && l.contains("still seen")),
            "n{n} logs the lost lan: {:?}",
            pair.logs(n, LogLevel::Warn)
        );
    }
    pair.heal_lan(1);
    pair.run_for(secs(1));
    pair.assert_pair(State::Prim, State::Second);
    for n in 0..2 {
        assert!(pair.snap(n).lans.iter().all(|l| l.up), "n{n}");
        assert!(pair.logs(n, LogLevel::Info).iter().any(|l| l.contains("lan1") && l.contains("back")), "n{n}");
    }
}

// Proves that without a witness, losing every lan makes the SECOND in sync take over (ALONE,
// stop_second then start_prim, within about one timeout) and leaves the former PRIM ALONE.
#[test]
fn losing_every_lan_makes_the_secondary_alone_without_witness() {
    let mut pair = Pair::started(defaults);
    let cut_at = pair.now;
    pair.cut_all();
    pair.run_for(secs(3));
    pair.assert_pair(State::Alone, State::Alone);
    assert_eq!(pair.scripts_since(1, cut_at), [Script::StopSecond, Script::StartPrim]);
    let took_over = pair.last_run(1, Script::StartPrim) - cut_at;
    assert!(took_over > TIMEOUT - PULSE && took_over <= TIMEOUT + ms(10), "took over after {took_over:?}");
    // The former primary keeps the application running, on a new generation.
    assert!(pair.scripts_since(0, cut_at).is_empty());
    assert_ne!(pair.snap(0).generation, pair.snap(1).generation);
}

// ----- witness -----

// Proves that with a witness, when every lan is lost, only the node that reaches the witness
// is primary: the PRIM that does not reach it stops (WAIT witness_unreachable) and the SECOND
// that does takes over (ALONE).
#[test]
fn with_a_witness_only_the_node_that_reaches_it_becomes_primary() {
    let mut pair = Pair::started(with_witness);
    pair.nodes[0].witness = false;
    pair.nodes[1].witness = true;
    let cut_at = pair.now;
    pair.cut_all();
    pair.run_for(secs(5));
    pair.assert_pair(State::Wait, State::Alone);
    assert_eq!(pair.snap(0).wait_reason, Some(WaitReason::WitnessUnreachable));
    assert_eq!(pair.scripts_since(0, cut_at), [Script::StopPrim]);
    assert_eq!(pair.scripts_since(1, cut_at), [Script::StopSecond, Script::StartPrim]);
    // n0 asked the witness before its heartbeat timeout expired, and stopped right at it.
    let asked = pair.nodes[0]
        .actions
        .iter()
        .find(|(t, a)| *t >= cut_at && matches!(a, Action::CheckWitness))
        .map(|(t, _)| *t - cut_at)
        .expect("n0 asked the witness");
    assert!(asked < TIMEOUT - PULSE, "n0 asked the witness {asked:?} after the cut");
    let stopped = pair.last_run(0, Script::StopPrim) - cut_at;
    assert!(stopped <= TIMEOUT + ms(10), "n0 began stop_prim {stopped:?} after the cut");
    // n0 stopped its application before n1 started its own.
    assert!(pair.last_run(0, Script::StopPrim) <= pair.last_run(1, Script::StartPrim));
    // n1 keeps reaching the witness: it stays ALONE.
    pair.run_for(secs(5));
    pair.assert_pair(State::Wait, State::Alone);
}

// Proves that when no witness answers anyone after every lan is lost, both nodes end in WAIT
// witness_unreachable and stay there, and that `prim` on one of them makes it ALONE.
#[test]
fn no_witness_answer_leaves_both_waiting_until_admin_prim() {
    let mut pair = Pair::started(with_witness);
    pair.nodes[0].witness = false;
    pair.nodes[1].witness = false;
    pair.cut_all();
    pair.run_for(secs(10));
    pair.assert_pair(State::Wait, State::Wait);
    for n in 0..2 {
        assert_eq!(pair.snap(n).wait_reason, Some(WaitReason::WitnessUnreachable), "n{n}");
    }
    let prim_at = pair.now;
    pair.admin(1, AdminCommand::Prim { force: false }).unwrap();
    pair.run_for(ms(100));
    pair.assert_pair(State::Wait, State::Alone);
    assert_eq!(pair.scripts_since(1, prim_at), [Script::StartPrim]);
    // The admin's decision holds: the application keeps running on n1.
    pair.run_for(secs(10));
    pair.assert_pair(State::Wait, State::Alone);
    assert_eq!(pair.scripts_since(1, prim_at), [Script::StartPrim]);
}

// Proves that with `failover auto="off"` a SECOND that loses every lan stops and waits
// (WAIT failover_off) while the PRIM keeps running ALONE; once the lans are back the pair
// heals by itself.
#[test]
fn failover_off_makes_the_secondary_wait() {
    let mut pair = Pair::started(|p| p.failover_auto = false);
    let cut_at = pair.now;
    pair.cut_all();
    pair.run_for(secs(5));
    pair.assert_pair(State::Alone, State::Wait);
    assert_eq!(pair.snap(1).wait_reason, Some(WaitReason::FailoverOff));
    assert_eq!(pair.scripts_since(1, cut_at), [Script::StopSecond]);
    assert!(!pair.was_primary_since(1, cut_at));
    pair.heal_all();
    pair.run_for(secs(3));
    pair.assert_pair(State::Prim, State::Second);
}

// ----- swap -----

// Proves that a planned swap stops the application on the primary (stop_prim) before the
// peer starts it (start_prim), keeps the generation, and ends with the roles exchanged.
#[test]
fn swap_runs_stop_prim_before_start_prim_on_the_peer() {
    let mut pair = Pair::started(defaults);
    let generation = pair.snap(0).generation;
    let swap_at = pair.now;
    pair.admin(0, AdminCommand::Swap).unwrap();
    pair.run_for(secs(2));
    pair.assert_pair(State::Second, State::Prim);
    assert_eq!(pair.scripts_since(0, swap_at), [Script::StopPrim, Script::StartSecond]);
    assert_eq!(pair.scripts_since(1, swap_at), [Script::StopSecond, Script::StartPrim]);
    let stopped = pair.last_run(0, Script::StopPrim);
    let started = pair.last_run(1, Script::StartPrim);
    assert!(stopped < started, "stop_prim on n0 at {stopped:?}, start_prim on n1 at {started:?}");
    // Application stopped on n0 (stop_prim ended) before n1 started it.
    assert!(stopped + TICK <= started);
    // A handover keeps the data generation and needs no resync.
    assert_eq!(pair.snap(1).generation, generation);
    assert!(pair.resyncs_since(0, swap_at).is_empty());
    // Never two primaries during the swap.
    assert!(!pair.was_primary_since(0, started));
    // And back again, asked from the secondary this time.
    let back_at = pair.now;
    pair.admin(0, AdminCommand::Swap).unwrap();
    pair.run_for(secs(2));
    pair.assert_pair(State::Prim, State::Second);
    assert!(pair.last_run(1, Script::StopPrim) < pair.last_run(0, Script::StartPrim));
    assert!(pair.last_run(1, Script::StopPrim) >= back_at);
}

// Proves that a swap is refused while the SECOND is not in sync (on either node), with a
// clear error, and that the refusal changes nothing.
#[test]
fn swap_refused_when_the_secondary_is_not_in_sync() {
    let mut pair = Pair::new(defaults);
    pair.resync_time = secs(60);
    pair.boot(0);
    pair.boot(1);
    pair.run_for(ms(500));
    pair.admin(0, AdminCommand::Start).unwrap();
    pair.admin(1, AdminCommand::Start).unwrap();
    pair.run_for(secs(3));
    assert_eq!(pair.state(0), State::Alone);
    assert_eq!((pair.state(1), pair.snap(1).transition), (State::Second, Some(Transition::Resyncing)));
    assert!(!pair.snap(1).in_sync);
    for n in 0..2 {
        let before = (pair.snap(n), pair.m(n).persisted().clone(), pair.nodes[n].actions.len());
        let peer_before = pair.snap(1 - n);
        let err = pair.admin(n, AdminCommand::Swap).unwrap_err();
        assert!(matches!(err, CommandError::Refused { command: "swap", .. }), "n{n}: {err:?}");
        assert!(err.to_string().contains("SECOND in sync"), "n{n}: {err}");
        let after = (pair.snap(n), pair.m(n).persisted().clone());
        assert_eq!((before.0, before.1), after, "n{n}: the refusal changed the machine");
        assert_eq!(pair.snap(1 - n), peer_before);
        // The only action is the log line of the refusal.
        let new: Vec<&Action> = pair.nodes[n].actions[before.2..].iter().map(|(_, a)| a).collect();
        assert!(new.iter().all(|a| matches!(a, Action::Log(..))), "n{n}: {new:?}");
    }
    pair.run_for(secs(2));
    assert_eq!(pair.state(0), State::Alone);
    assert_eq!(pair.state(1), State::Second);
}

// ----- application failures -----

// Proves that a failing start_prim is retried in place (stop_prim, start_prim) up to maxloop
// times, that the next failure stops the module (persisted running=false), and that the peer
// then takes over.
#[test]
fn start_prim_failure_restarts_then_stops_after_maxloop() {
    let mut pair = Pair::new(|p| p.maxloop = 2);
    pair.set_outcome(0, Script::StartPrim, ScriptOutcome::Failed);
    pair.boot(0);
    pair.boot(1);
    pair.run_for(ms(500));
    pair.admin(0, AdminCommand::Start).unwrap();
    pair.admin(1, AdminCommand::Start).unwrap();
    pair.run_for(secs(3));
    assert_eq!(
        pair.scripts(0),
        [
            Script::Prestart,
            Script::StartBoth,
            Script::StartPrim,
            Script::StopPrim,
            Script::StartPrim,
            Script::StopPrim,
            Script::StartPrim,
            Script::StopPrim,
            Script::StopBoth,
            Script::Poststop,
        ]
    );
    assert_eq!(pair.state(0), State::Stop);
    assert!(!pair.disk(0).running, "maxloop persists running=false");
    assert!(pair.logs(0, LogLevel::Error).iter().any(|l| l.contains("maxloop")));
    assert_eq!(pair.state(1), State::Alone);
    assert_eq!(pair.last_run(1, Script::StartPrim), *pair.script_times(1).iter().map(|(t, _)| t).max().unwrap());
    // A stopped module stays stopped.
    pair.run_for(secs(5));
    assert_eq!((pair.state(0), pair.state(1)), (State::Stop, State::Alone));
}

// Proves that a `stopstart` checker failure on the primary stops the module (the peer takes
// over), then starts it again, and it rejoins as SECOND of the new primary.
#[test]
fn checker_failure_with_stopstart_stops_then_starts_again_as_secondary() {
    let mut pair = Pair::started(defaults);
    let fail_at = pair.now;
    pair.event(0, Event::CheckerFailed { ident: "app".into(), action: CheckAction::Stopstart });
    pair.run_for(secs(5));
    pair.assert_pair(State::Second, State::Prim);
    assert_eq!(
        pair.scripts_since(0, fail_at),
        [
            Script::StopPrim,
            Script::StopBoth,
            Script::Poststop,
            Script::Prestart,
            Script::StartBoth,
            Script::StartSecond
        ]
    );
    assert_eq!(pair.scripts_since(1, fail_at), [Script::StopSecond, Script::StartPrim]);
    // n1 took over after n0 stopped its application.
    assert!(pair.last_run(0, Script::StopPrim) < pair.last_run(1, Script::StartPrim));
    assert!(pair.states_since(0, fail_at).iter().any(|s| s.0 == State::Stop));
    assert!(pair.disk(0).running);
    // The returning node resyncs only what changed.
    assert_eq!(pair.resyncs_since(0, fail_at), [false]);
    assert_eq!(pair.snap(0).restarts_in_window, 1);
}

// Proves that checker failures further apart than loop_interval never add up to maxloop (the
// application is restarted each time), while the same failures within loop_interval do.
#[test]
fn restarts_outside_loop_interval_do_not_count() {
    let mut pair = Pair::started(|p| {
        p.maxloop = 1;
        p.loop_interval = secs(2);
    });
    let first = pair.now;
    for _ in 0..4 {
        pair.event(0, Event::CheckerFailed { ident: "app".into(), action: CheckAction::Restart });
        pair.run_for(secs(3));
        pair.assert_pair(State::Prim, State::Second);
        assert_eq!(pair.snap(0).restarts_in_window, 1);
    }
    assert_eq!(pair.scripts_since(0, first), [Script::StopPrim, Script::StartPrim].repeat(4));
    assert!(pair.scripts_since(1, first).is_empty());
    assert!(pair.disk(0).running);
    // Two failures within loop_interval pass maxloop=1: the module stops, the peer takes over.
    let second = pair.now;
    pair.event(0, Event::CheckerFailed { ident: "app".into(), action: CheckAction::Restart });
    pair.run_for(secs(1));
    pair.event(0, Event::CheckerFailed { ident: "app".into(), action: CheckAction::Restart });
    pair.run_for(secs(3));
    assert_eq!((pair.state(0), pair.state(1)), (State::Stop, State::Alone));
    assert!(!pair.disk(0).running);
    assert_eq!(
        pair.scripts_since(0, second),
        [Script::StopPrim, Script::StartPrim, Script::StopPrim, Script::StopBoth, Script::Poststop]
    );
}

// ----- preferences -----

// Proves that with defaultprim set to a node, that node gets the primary role back
// automatically once it is repaired and in sync, but an admin's swap away from it holds.
#[test]
fn defaultprim_node_swaps_back_after_a_repair_but_not_after_an_admin_swap() {
    let mut pair = Pair::started(|p| p.defaultprim = DefaultPrim::Node("n0".into()));
    // n0 dies: n1 takes over.
    pair.crash(0);
    pair.run_for(secs(3));
    assert_eq!(pair.state(1), State::Alone);
    // n0 is repaired: it rejoins as SECOND, resyncs, then the pair swaps back to it.
    let repaired_at = pair.now;
    pair.boot(0);
    pair.run_for(secs(5));
    pair.assert_pair(State::Prim, State::Second);
    assert_eq!(
        pair.scripts_since(0, repaired_at),
        [
            Script::StopPrim,
            Script::Prestart,
            Script::StartBoth,
            Script::StartSecond,
            Script::StopSecond,
            Script::StartPrim
        ]
    );
    assert_eq!(pair.scripts_since(1, repaired_at), [Script::StopPrim, Script::StartSecond]);
    assert!(pair.last_run(1, Script::StopPrim) < pair.last_run(0, Script::StartPrim));
    // The admin swaps away from the default primary: that holds.
    let swap_at = pair.now;
    pair.admin(0, AdminCommand::Swap).unwrap();
    pair.run_for(secs(10));
    pair.assert_pair(State::Second, State::Prim);
    assert_eq!(pair.scripts_since(0, swap_at), [Script::StopPrim, Script::StartSecond]);
    assert_eq!(pair.scripts_since(1, swap_at), [Script::StopSecond, Script::StartPrim]);
}

// Proves that with defaultprim="lastprim", when both nodes start together on equal data, the
// node that was primary last (n1, although n0 comes first) becomes primary again.
#[test]
fn lastprim_prefers_the_node_that_was_primary_last_when_both_start() {
    let mut pair = Pair::started(|p| p.defaultprim = DefaultPrim::Lastprim);
    pair.admin(0, AdminCommand::Swap).unwrap();
    pair.run_for(secs(2));
    pair.assert_pair(State::Second, State::Prim);
    // Both stop at once: the data stays equal.
    pair.admin(0, AdminCommand::Stop).unwrap();
    pair.admin(1, AdminCommand::Stop).unwrap();
    pair.run_for(secs(2));
    assert_eq!((pair.state(0), pair.state(1)), (State::Stop, State::Stop));
    assert_eq!(pair.disk(0).history, pair.disk(1).history);
    assert_eq!((pair.disk(0).last_role, pair.disk(1).last_role), (Role::Secondary, Role::Primary));
    let start_at = pair.now;
    pair.admin(0, AdminCommand::Start).unwrap();
    pair.admin(1, AdminCommand::Start).unwrap();
    pair.run_for(secs(3));
    pair.assert_pair(State::Second, State::Prim);
    assert_eq!(pair.scripts_since(1, start_at), [Script::Prestart, Script::StartBoth, Script::StartPrim]);
    assert_eq!(pair.scripts_since(0, start_at), [Script::Prestart, Script::StartBoth, Script::StartSecond]);
}

// ----- stale data -----

// Proves that a node that was SECOND, restarted while its peer is away, does not become
// primary by itself (WAIT peer_may_be_newer), and that `prim` without --force makes it ALONE.
#[test]
fn a_secondary_restarted_alone_waits_because_the_peer_may_be_newer() {
    let mut pair = Pair::started(defaults);
    // A power cut takes both hosts; only n1 comes back.
    pair.crash(0);
    pair.crash(1);
    pair.run_for(secs(1));
    let boot_at = pair.now;
    pair.boot(1);
    pair.run_for(secs(5));
    assert_eq!(pair.state(1), State::Wait);
    assert_eq!(pair.snap(1).wait_reason, Some(WaitReason::PeerMayBeNewer));
    assert_eq!(pair.scripts_since(1, boot_at), [Script::Prestart, Script::StartBoth]);
    pair.admin(1, AdminCommand::Prim { force: false }).unwrap();
    pair.run_for(secs(1));
    assert_eq!((pair.state(1), pair.snap(1).transition), (State::Alone, None));
    assert_eq!(pair.scripts_since(1, boot_at), [Script::Prestart, Script::StartBoth, Script::StartPrim]);
    assert!(!pair.disk(1).peer_may_be_newer);
}

/// Started pair; n1 is stopped while n0 goes on ALONE on a new generation, then n0's host
/// dies. n1 has seen the newer generation while stopped.
fn pair_where_n1_saw_newer_data() -> Pair {
    let mut pair = Pair::started(defaults);
    pair.admin(1, AdminCommand::Stop).unwrap();
    pair.run_for(secs(1));
    assert_eq!((pair.state(0), pair.state(1)), (State::Alone, State::Stop));
    assert_ne!(pair.snap(0).generation, pair.disk(1).history.last().copied());
    assert!(pair.disk(1).stale, "the stopped node persisted that its data is older");
    pair.crash(0);
    pair.run_for(secs(2));
    pair
}

// Proves that a node that saw the peer's newer data is refused `prim` with a clear error that
// names --force (changing nothing), and that `prim --force` makes it ALONE.
#[test]
fn a_node_that_saw_newer_data_needs_prim_force() {
    let mut pair = pair_where_n1_saw_newer_data();
    pair.admin(1, AdminCommand::Start).unwrap();
    pair.run_for(secs(3));
    assert_eq!(pair.state(1), State::Wait);
    assert_eq!(pair.snap(1).wait_reason, Some(WaitReason::StaleData));
    let before = (pair.snap(1), pair.disk(1).clone());
    let err = pair.admin(1, AdminCommand::Prim { force: false }).unwrap_err();
    assert!(matches!(err, CommandError::Refused { command: "prim", .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("older") && text.contains("prim --force"), "{text}");
    pair.run_for(secs(1));
    assert_eq!((pair.snap(1), pair.disk(1).clone()), before, "the refusal changed nothing");
    let forced_at = pair.now;
    pair.admin(1, AdminCommand::Prim { force: true }).unwrap();
    pair.run_for(secs(1));
    assert_eq!((pair.state(1), pair.snap(1).transition), (State::Alone, None));
    assert_eq!(pair.scripts_since(1, forced_at), [Script::StartPrim]);
    assert!(!pair.disk(1).stale);
    assert!(pair.logs(1, LogLevel::Warn).iter().any(|l| l.contains("forced")));
}

// Proves that a stopped node that hears the peer move to a newer generation keeps that
// knowledge (persisted, across a daemon restart) and never leads on its old data, even with
// the peer gone; when the peer returns, the peer leads and this node resyncs from it.
#[test]
fn a_stopped_node_learns_that_the_peer_moved_on_and_never_leads_on_old_data() {
    let mut pair = pair_where_n1_saw_newer_data();
    let since = pair.now;
    pair.admin(1, AdminCommand::Start).unwrap();
    pair.run_for(secs(5));
    assert_eq!(pair.snap(1).wait_reason, Some(WaitReason::StaleData));
    // Even after its own daemon restarts.
    pair.crash(1);
    pair.boot(1);
    pair.run_for(secs(5));
    assert_eq!(pair.snap(1).wait_reason, Some(WaitReason::StaleData));
    assert!(!pair.was_primary_since(1, since));
    assert!(!pair.scripts_since(1, since).contains(&Script::StartPrim));
    // The peer comes back: it leads, n1 resyncs from it (changes only: its history is older).
    let back_at = pair.now;
    pair.boot(0);
    pair.run_for(secs(5));
    pair.assert_pair(State::Prim, State::Second);
    assert!(!pair.was_primary_since(1, since));
    assert_eq!(pair.resyncs_since(1, back_at), [false]);
    assert!(pair.resyncs_since(0, back_at).is_empty());
    assert!(!pair.disk(1).stale);
}

// Proves that a primary frozen for 10 s, while the peer took over, steps down to SECOND when
// it runs again and never starts a generation of its own.
#[test]
fn thawed_primary_steps_down_when_the_peer_took_over() {
    let mut pair = Pair::started(defaults);
    let gen_seq = pair.disk(0).gen_seq;
    pair.freeze(0);
    pair.run_for(secs(10));
    assert_eq!(pair.state(1), State::Alone);
    let n1_generation = pair.snap(1).generation;
    assert_ne!(n1_generation, pair.snap(0).generation);
    let thaw_at = pair.now;
    pair.thaw(0);
    pair.run_for(secs(3));
    pair.assert_pair(State::Second, State::Prim);
    assert_eq!(pair.snap(0).generation, n1_generation);
    assert_eq!(pair.snap(1).generation, n1_generation, "n1's generation still leads");
    assert_eq!(pair.disk(0).gen_seq, gen_seq, "n0 never started a generation");
    assert!(pair.disk(0).history.iter().all(|g| g.node == 1 || g.seq <= gen_seq));
    // n0 never went ALONE after the thaw: it stopped its application and became SECOND.
    assert!(!pair.states_since(0, thaw_at).iter().any(|s| s.0 == State::Alone));
    assert_eq!(pair.scripts_since(0, thaw_at), [Script::StopPrim, Script::StartSecond]);
    assert!(pair.scripts_since(1, thaw_at).is_empty(), "n1 kept running: {:?}", pair.scripts_since(1, thaw_at));
    assert_eq!(pair.resyncs_since(0, thaw_at), [false]);
    // Its late timeout was recognised as a freeze, not taken as the peer's silence.
    assert!(pair.logs(0, LogLevel::Warn).iter().any(|l| l.contains("frozen")));
}

#[test]
fn a_thawed_primary_that_finds_its_stream_closed_starts_no_generation() {
    // Proves: a primary that thaws after its SECOND took over, and learns first (before its late timers and the heartbeats waiting for it) that its replication stream was closed, starts no generation of origin `primary` that would win the split brain: it steps down, and the generation of the node that took over leads, so what that node acknowledged is kept.
    let mut pair = Pair::started(defaults);
    let gen_seq = pair.disk(0).gen_seq;
    pair.freeze(0);
    pair.run_for(secs(10));
    assert_eq!(pair.state(1), State::Alone);
    let n1_generation = pair.snap(1).generation;
    pair.thaw(0);
    pair.event(0, Event::ReplicationLost { reason: "the peer closed the connection".into() });
    assert_eq!(pair.disk(0).gen_seq, gen_seq, "no generation on a silence that is not judged yet");
    pair.run_for(secs(3));
    pair.assert_pair(State::Second, State::Prim);
    assert_eq!(pair.snap(1).generation, n1_generation, "n1's generation still leads");
    assert!(pair.logs(0, LogLevel::Warn).iter().any(|l| l.contains("the heartbeat timeout decides")));
}

#[test]
fn a_primary_stepping_down_for_want_of_a_witness_starts_no_generation_on_a_lost_stream() {
    // Proves: a primary cut off from its peer and from the witness, whose replication stream is declared lost while it stops its application, starts no generation of origin `primary`: once the lans are back, the node that reached the witness and took over stays primary (its acknowledged writes are kept) and the other joins it as SECOND.
    let mut pair = Pair::started(with_witness);
    pair.nodes[0].witness = false;
    pair.nodes[1].witness = true;
    let gen_seq = pair.disk(0).gen_seq;
    pair.cut_all();
    for _ in 0..5_000 {
        if pair.snap(0).transition == Some(Transition::Stopping) {
            break;
        }
        pair.run_for(TICK);
    }
    assert_eq!((pair.state(0), pair.snap(0).transition), (State::Prim, Some(Transition::Stopping)));
    pair.event(0, Event::ReplicationLost { reason: "the peer has not applied an operation within the timeout".into() });
    assert_eq!(pair.disk(0).gen_seq, gen_seq, "no generation while stepping down");
    pair.run_for(secs(5));
    pair.assert_pair(State::Wait, State::Alone);
    let n1_generation = pair.snap(1).generation;
    pair.heal_all();
    pair.run_for(secs(5));
    pair.assert_pair(State::Second, State::Prim);
    assert_eq!(pair.snap(1).generation, n1_generation, "the node the witness chose keeps its data");
}

// ----- split brain and generations -----

// Proves that without a witness, a split (ALONE-ALONE) is resolved on reconnection in favour
// of the node that was PRIM before the split (n1 here, although n0 comes first), and that the
// other node runs stop_prim, start_second and a full resync from it.
#[test]
fn after_alone_alone_the_former_prim_wins_and_the_other_resyncs_fully() {
    let mut pair = Pair::started(defaults);
    pair.admin(0, AdminCommand::Swap).unwrap();
    pair.run_for(secs(2));
    pair.assert_pair(State::Second, State::Prim);
    pair.cut_all();
    pair.run_for(secs(3));
    pair.assert_pair(State::Alone, State::Alone);
    let n1_generation = pair.snap(1).generation;
    let heal_at = pair.now;
    pair.heal_all();
    pair.run_for(secs(3));
    pair.assert_pair(State::Second, State::Prim);
    assert_eq!(pair.snap(1).generation, n1_generation, "the former PRIM's data wins");
    assert_eq!(pair.scripts_since(0, heal_at), [Script::StopPrim, Script::StartSecond]);
    assert!(pair.scripts_since(1, heal_at).is_empty());
    assert_eq!(pair.resyncs_since(0, heal_at), [true]);
    assert!(pair.resyncs_since(1, heal_at).is_empty());
    assert!(pair.logs(0, LogLevel::Warn).iter().any(|l| l.contains("divergent")), "the loser says so");
}

// Proves that after the SECOND took over and the old primary returns, the histories send the
// resync towards the returning node only, changes only.
#[test]
fn generation_history_decides_resync_direction() {
    let mut pair = Pair::started(defaults);
    pair.crash(0);
    pair.run_for(secs(3));
    assert_eq!(pair.state(1), State::Alone);
    let back_at = pair.now;
    // The old primary returns with its older history and its role as primary on disk.
    assert_eq!(pair.disk(0).last_role, Role::Primary);
    assert!(!pair.disk(0).stale);
    pair.boot(0);
    pair.run_for(secs(3));
    pair.assert_pair(State::Second, State::Prim);
    assert_eq!(pair.resyncs_since(0, back_at), [false]);
    assert!(pair.resyncs_since(1, back_at).is_empty());
    // It crashed as primary: stop_prim first, in case its application outlived the daemon.
    assert_eq!(
        pair.scripts_since(0, back_at),
        [Script::StopPrim, Script::Prestart, Script::StartBoth, Script::StartSecond]
    );
    assert!(pair.scripts_since(1, back_at).is_empty());
    assert_eq!(pair.disk(0).history, pair.disk(1).history);
}

// ----- admin commands and the daemon -----

// Proves that on a stopped module restart and swap are refused with NotRunning, stop is
// accepted (and persists running=false), and start starts it.
#[test]
fn admin_commands_on_a_stopped_module_are_refused_or_start_it() {
    let mut pair = Pair::new(defaults);
    pair.boot(0);
    pair.run_for(ms(500));
    let before = (pair.snap(0), pair.disk(0).clone());
    for cmd in [AdminCommand::Restart, AdminCommand::Swap] {
        let err = pair.admin(0, cmd.clone()).unwrap_err();
        assert_eq!(err, CommandError::NotRunning("m".into()), "{cmd:?}");
        assert!(err.to_string().contains("start it first"));
    }
    pair.admin(0, AdminCommand::Stop).unwrap();
    assert_eq!((pair.snap(0), pair.disk(0).clone()), before, "nothing changed");
    assert!(pair.scripts(0).is_empty());
    // start works: alone, n0 becomes ALONE after one timeout.
    pair.admin(0, AdminCommand::Start).unwrap();
    assert!(pair.disk(0).running);
    assert_eq!(pair.admin(0, AdminCommand::Start), Err(CommandError::AlreadyRunning("m".into())));
    pair.run_for(secs(2));
    assert_eq!((pair.state(0), pair.snap(0).transition), (State::Alone, None));
    // A module stopped by the daemon's shutdown is still marked running: stop clears the mark.
    pair.shutdown(0);
    pair.run_for(ms(100));
    assert_eq!(pair.state(0), State::Stop);
    assert!(pair.disk(0).running);
    pair.admin(0, AdminCommand::Stop).unwrap();
    assert_eq!(pair.state(0), State::Stop);
    assert!(!pair.disk(0).running, "stop on STOP persists running=false");
    for cmd in [AdminCommand::Restart, AdminCommand::Swap] {
        assert_eq!(pair.admin(0, cmd), Err(CommandError::NotRunning("m".into())));
    }
}

// Proves that a daemon shutdown stops the module (the peer takes over) but keeps it marked
// running, so that the rebooted daemon starts it again (here as SECOND of the new primary).
#[test]
fn daemon_shutdown_stops_but_keeps_running_flag() {
    let mut pair = Pair::started(defaults);
    let down_at = pair.now;
    pair.shutdown(0);
    pair.run_for(secs(2));
    assert_eq!(pair.state(0), State::Stop);
    assert!(pair.m(0).is_stopped());
    assert!(pair.disk(0).running, "shutdown keeps running=true");
    assert_eq!(pair.scripts_since(0, down_at), [Script::StopPrim, Script::StopBoth, Script::Poststop]);
    assert_eq!(pair.state(1), State::Alone);
    // The daemon exits and starts again.
    pair.crash(0);
    let boot_at = pair.now;
    pair.boot(0);
    pair.run_for(secs(3));
    pair.assert_pair(State::Second, State::Prim);
    assert_eq!(pair.scripts_since(0, boot_at), [Script::Prestart, Script::StartBoth, Script::StartSecond]);
}

// ----- replication -----

// Proves that a PRIM whose replication stream breaks (heartbeats still fine) goes ALONE in a
// new generation, that its in-sync secondary learns from the next heartbeat that its data is
// no longer current (so it could not take over with it), resyncs, and the pair is PRIM/SECOND
// again; and that the same event on a node that is not primary changes nothing.
#[test]
fn a_broken_replication_stream_makes_the_primary_alone_and_the_secondary_resync() {
    let mut pair = Pair::started(defaults);
    let gen = pair.snap(0).generation;
    let since = pair.now;
    pair.event(1, Event::ReplicationLost { reason: "test".into() });
    assert_eq!(pair.snap(1).state, State::Second, "a secondary ignores it");
    pair.event(0, Event::ReplicationLost { reason: "the peer refused an operation".into() });
    assert_eq!(pair.snap(0).state, State::Alone);
    assert_ne!(pair.snap(0).generation, gen, "a new generation starts");
    pair.run_for(ms(5));
    assert!(!pair.snap(1).in_sync, "the secondary knows at once that it is behind");
    pair.run_for(secs(2));
    assert_eq!(pair.resyncs_since(1, since), [false], "a changes-only resync");
    assert_eq!((pair.snap(0).state, pair.snap(1).state), (State::Prim, State::Second));
    assert!(pair.snap(1).in_sync);
}

// Proves that for a replicating module the primary stays ALONE, and a swap is refused, while
// its in-sync secondary is not yet fed by the real-time stream; ReplicationUp makes it PRIM.
#[test]
fn a_replicating_primary_is_prim_only_once_the_stream_is_up() {
    let mut pair = Pair::new(|p| p.replicated = true);
    pair.boot(0);
    pair.boot(1);
    pair.run_for(ms(500));
    pair.admin(0, AdminCommand::Start).unwrap();
    pair.admin(1, AdminCommand::Start).unwrap();
    pair.run_for(secs(3));
    assert_eq!((pair.state(0), pair.state(1)), (State::Alone, State::Second));
    assert!(pair.snap(1).in_sync, "the resync itself is done");
    let err = pair.admin(0, AdminCommand::Swap).unwrap_err();
    assert!(matches!(err, CommandError::Refused { command: "swap", .. }), "{err:?}");
    pair.event(0, Event::ReplicationUp);
    assert_eq!(pair.state(0), State::Prim);
    // Losing the stream again: ALONE, and the stream must come up again before PRIM.
    pair.event(0, Event::ReplicationLost { reason: "test".into() });
    pair.run_for(secs(3));
    assert_eq!((pair.state(0), pair.state(1)), (State::Alone, State::Second));
    pair.event(0, Event::ReplicationUp);
    assert_eq!(pair.state(0), State::Prim);
}
