//! A real pair of `hamirror daemon`s in two lab hosts (tools/lab, docs/lab.md), with UDP
//! heartbeats between network namespaces: failover, swap, split brain (with and without a
//! witness), a frozen primary, and 32 modules on one pair. Needs root; tools/test runs it.
//!
//! Every module runs the `mirror` template's scripts (app-modules/mirror/bin), wrapped so that
//! each run of start_prim / stop_prim leaves "<host> <script> begin|end <ns>" lines in the
//! host's `/var/lib/hamirror/trace-<module>`. The application writes "<host> <counter>" into
//! `/var/lib/hamirror/app-<module>.alive` every 100 ms: a test proves it runs on a host (the
//! file changes) and not on the other (`pgrep` in that host finds nothing).

mod support;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::lab::*;

const HOSTS: [&str; 2] = ["hostA", "hostB"];
const LANS: [&str; 2] = ["default", "replication"];
/// How long a role change may take (a few heartbeat timeouts and script runs, on a loaded CI).
const DEADLINE: Duration = Duration::from_secs(30);
/// After a decision: how long the pair must keep it.
const HOLD: Duration = Duration::from_secs(3);

fn hamirror() -> &'static str {
    env!("CARGO_BIN_EXE_hamirror")
}

fn other(host: &str) -> &'static str {
    if host == HOSTS[0] {
        HOSTS[1]
    } else {
        HOSTS[0]
    }
}

fn is_primary(state: Option<&str>) -> bool {
    matches!(state, Some("PRIM") | Some("ALONE"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `<`, `>`, `&` and `"` as XML attribute text.
fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// How a module is installed.
#[derive(Clone, Debug)]
struct ModuleSpec {
    name: String,
    id: u16,
    pulse: &'static str,
    timeout: &'static str,
}

impl ModuleSpec {
    fn new(name: &str, id: u16) -> ModuleSpec {
        ModuleSpec { name: name.to_string(), id, pulse: "200ms", timeout: "1s" }
    }
    fn timeout(mut self, timeout: &'static str) -> ModuleSpec {
        self.timeout = timeout;
        self
    }
}

/// The shell loop that stands for the application (see the file's docs).
fn app_command(module: &str) -> String {
    let file = format!("/var/lib/hamirror/app-{module}.alive");
    format!(
        "h=$(hostname); i=0; while :; do i=$((i+1)); echo \"$h $i\" > {file}.tmp && mv -f {file}.tmp {file}; sleep 0.1; done"
    )
}

/// A `pgrep -f` pattern that finds the application's shell but not pgrep itself.
fn app_pattern(module: &str) -> String {
    let (first, rest) = module.split_at(1);
    format!("app-[{first}]{rest}\\.alive")
}

/// A wrapper of the template's script that traces its begin and end with a ns timestamp.
fn traced_script(script: &str) -> String {
    format!(
        r#"#!/bin/sh
trace() {{ echo "$(hostname) {script} $1 $(date +%s%N)" >>"$HAMIRROR_STATE_DIR/trace-$HAMIRROR_MODULE"; }}
trace begin
"$HAMIRROR_HOME/modules/$HAMIRROR_MODULE/bin/mirror_{script}" "$@"
rc=$?
trace end
exit $rc
"#
    )
}

/// One line of a trace file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TraceLine {
    host: String,
    script: String,
    edge: String,
    ns: u128,
}

/// Two lab hosts running `hamirror daemon`. Dropping it prints the logs when the test
/// panicked, kills the daemons, then tears the lab down.
struct Pair {
    daemons: RefCell<BTreeMap<String, u32>>,
    modules: RefCell<Vec<String>>,
    witness: bool,
    lab: Lab,
}

impl Pair {
    /// Two hosts on the lans default and replication (and a witness when asked), with the
    /// same cluster.xml and cluster key in both homes. No module, no daemon yet.
    fn new(witness: bool) -> Pair {
        let mut spec = LabSpec::new(&HOSTS).lans(&LANS);
        if witness {
            spec = spec.witness();
        }
        let lab = Lab::up(spec);
        let mut xml = String::from("<cluster name=\"pair1\">\n");
        for lan in LANS {
            xml.push_str(&format!("  <lan name=\"{lan}\">\n"));
            for h in HOSTS {
                xml.push_str(&format!("    <node name=\"{h}\" addr=\"{}\"/>\n", lab.addr(h, lan)));
            }
            xml.push_str("  </lan>\n");
        }
        xml.push_str("</cluster>\n");
        for h in HOSTS {
            let etc = lab.host_dir(h).join("etc");
            fs::create_dir_all(&etc).unwrap();
            fs::write(etc.join("cluster.xml"), &xml).unwrap();
        }
        let key_a = lab.host_dir(HOSTS[0]).join("etc/cluster.key");
        let out = std::process::Command::new(hamirror())
            .args(["--home"])
            .arg(lab.host_dir(HOSTS[0]).join("etc"))
            .args(["cluster", "genkey"])
            .output()
            .unwrap();
        assert!(out.status.success(), "hamirror cluster genkey: {}", text(&out));
        let key_b = lab.host_dir(HOSTS[1]).join("etc/cluster.key");
        fs::copy(&key_a, &key_b).unwrap();
        fs::set_permissions(&key_b, fs::Permissions::from_mode(0o600)).unwrap();
        Pair { daemons: RefCell::new(BTreeMap::new()), modules: RefCell::new(Vec::new()), witness, lab }
    }

    /// Writes the module's userconfig.xml and scripts into both homes.
    fn install(&self, m: &ModuleSpec) {
        for h in HOSTS {
            self.write_module(&self.lab.host_dir(h).join("etc/modules").join(&m.name), m);
        }
        self.modules.borrow_mut().push(m.name.clone());
    }

    /// Writes a module directory (userconfig.xml, the traced template scripts) at `dir`.
    fn write_module(&self, dir: &Path, m: &ModuleSpec) {
        let splitbrain = if self.witness {
            format!("  <splitbrain witness=\"{}\"/>\n", self.lab.addr("witness", "default"))
        } else {
            String::new()
        };
        let xml = format!(
            "<module name=\"{name}\" mode=\"mirror\" id=\"{id}\">\n  <heart pulse=\"{pulse}\" timeout=\"{timeout}\"/>\n  \
             <failover auto=\"on\" defaultprim=\"alone\"/>\n{splitbrain}  \
             <user nicestoptimeout=\"10s\" forcestoptimeout=\"10s\" starttimeout=\"10s\">\n    \
             <var name=\"APP_COMMAND\" value=\"{app}\"/>\n  </user>\n</module>\n",
            name = m.name,
            id = m.id,
            pulse = m.pulse,
            timeout = m.timeout,
            app = xml_escape(&app_command(&m.name)),
        );
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("app-modules/mirror/bin");
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).unwrap();
        fs::write(dir.join("userconfig.xml"), &xml).unwrap();
        for script in ["start_prim", "stop_prim"] {
            let real = bin.join(format!("mirror_{script}"));
            fs::copy(template.join(script), &real).unwrap();
            fs::write(bin.join(script), traced_script(script)).unwrap();
            for f in [real, bin.join(script)] {
                fs::set_permissions(f, fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
    }

    fn daemon_log(&self, host: &str) -> PathBuf {
        self.lab.dir().join(format!("daemon-{host}.log"))
    }

    /// Starts `hamirror daemon` in `host` and waits until its admin socket answers.
    fn start_daemon(&self, host: &str) {
        let node = format!("HAMIRROR_NODE={host}");
        let pid =
            self.lab.spawn(host, &self.daemon_log(host), &["env", &node, hamirror(), "daemon", "--listen", "none"]);
        self.daemons.borrow_mut().insert(host.to_string(), pid);
        wait_until(&format!("the daemon of {host} to answer"), DEADLINE, || {
            assert!(process_alive(pid), "the daemon of {host} exited:\n{}", self.tail(&self.daemon_log(host), 40));
            self.exec(host, &["status", "--json"]).status.success().then_some(())
        });
    }

    /// Starts both daemons.
    fn start_daemons(&self) {
        for h in HOSTS {
            self.start_daemon(h);
        }
    }

    /// Runs `hamirror ARGS` inside `host`.
    fn exec(&self, host: &str, args: &[&str]) -> Output {
        let mut cmd = vec![hamirror()];
        cmd.extend_from_slice(args);
        self.lab.exec(host, &cmd)
    }

    /// Runs `hamirror ARGS` inside `host` and panics unless it succeeds.
    fn run(&self, host: &str, args: &[&str]) -> String {
        let out = self.exec(host, args);
        assert!(out.status.success(), "hamirror {args:?} on {host}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `hamirror status MODULE --json` inside `host`; `None` when no daemon answers (or the
    /// host is off or frozen).
    fn view(&self, host: &str, module: &str) -> Option<Value> {
        let out = self.exec(host, &["status", module, "--json"]);
        if !out.status.success() {
            return None;
        }
        Some(
            serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("status --json of {host}: {e}: {}", text(&out))),
        )
    }

    /// The module's state on `host` (`"PRIM"`...), whatever its transition.
    fn state(&self, host: &str, module: &str) -> Option<String> {
        self.view(host, module)?["status"]["state"].as_str().map(str::to_string)
    }

    /// The module's state on `host` when no transition (script, resync, witness) is under way.
    fn settled(&self, host: &str, module: &str) -> Option<String> {
        let v = self.view(host, module)?;
        if !v["status"]["transition"].is_null() {
            return None;
        }
        v["status"]["state"].as_str().map(str::to_string)
    }

    /// Waits until `host_a` is in state `a` and `host_b` in state `b`, both settled.
    fn wait_states(&self, module: &str, a: (&str, &str), b: (&str, &str), deadline: Duration) {
        wait_until(&format!("{module}: {} {} and {} {}", a.0, a.1, b.0, b.1), deadline, || {
            (self.settled(a.0, module).as_deref() == Some(a.1) && self.settled(b.0, module).as_deref() == Some(b.1))
                .then_some(())
        });
    }

    /// Waits until one host is PRIM and the other SECOND; returns (primary, secondary).
    fn wait_pair(&self, module: &str, deadline: Duration) -> (&'static str, &'static str) {
        wait_until(&format!("{module}: PRIM and SECOND"), deadline, || {
            let a = self.settled(HOSTS[0], module)?;
            let b = self.settled(HOSTS[1], module)?;
            match (a.as_str(), b.as_str()) {
                ("PRIM", "SECOND") => Some((HOSTS[0], HOSTS[1])),
                ("SECOND", "PRIM") => Some((HOSTS[1], HOSTS[0])),
                _ => None,
            }
        })
    }

    /// hostA starts the module first (it becomes ALONE), then hostB joins as SECOND: hostA
    /// is the primary, deterministically.
    fn start_with_primary_a(&self, module: &str) {
        self.run(HOSTS[0], &["start", module]);
        wait_until(&format!("{module} ALONE on hostA"), DEADLINE, || {
            (self.settled(HOSTS[0], module).as_deref() == Some("ALONE")).then_some(())
        });
        self.run(HOSTS[1], &["start", module]);
        self.wait_states(module, (HOSTS[0], "PRIM"), (HOSTS[1], "SECOND"), DEADLINE);
        self.app_runs_on(HOSTS[0], module);
    }

    /// Whether the application's process exists in `host` (`None`: the host is off or frozen).
    fn app_process(&self, host: &str, module: &str) -> Option<bool> {
        let out = self.lab.exec(host, &["pgrep", "-f", &app_pattern(module)]);
        match out.status.code() {
            Some(0) => Some(true),
            Some(1) => Some(false),
            Some(LAB_ERROR_EXIT_CODE) => None,
            _ => panic!("pgrep in {host}: {}", text(&out)),
        }
    }

    fn alive_file(&self, host: &str, module: &str) -> PathBuf {
        self.lab.host_dir(host).join(format!("state/app-{module}.alive"))
    }

    /// Proves that the application runs on `host` and not on the other host: its file on
    /// `host` keeps changing, and the other host has no such process.
    fn app_runs_on(&self, host: &str, module: &str) {
        let file = self.alive_file(host, module);
        let first = wait_until(&format!("the application of {module} to write on {host}"), DEADLINE, || {
            fs::read_to_string(&file).ok().filter(|s| s.starts_with(&format!("{host} ")))
        });
        wait_until(&format!("the application of {module} to keep writing on {host}"), DEADLINE, || {
            fs::read_to_string(&file).ok().filter(|s| s.starts_with(&format!("{host} ")) && *s != first)
        });
        assert_eq!(self.app_process(host, module), Some(true), "no process of {module}'s application on {host}");
        self.app_stopped_on(other(host), module);
    }

    /// Waits until no process of the application runs on `host` (an off host has none).
    fn app_stopped_on(&self, host: &str, module: &str) {
        wait_until(&format!("the application of {module} to be stopped on {host}"), DEADLINE, || {
            (self.app_process(host, module) != Some(true)).then_some(())
        });
    }

    /// The trace lines of `host` for `module`, oldest first.
    fn trace(&self, host: &str, module: &str) -> Vec<TraceLine> {
        let file = self.lab.host_dir(host).join(format!("state/trace-{module}"));
        fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() != 4 {
                    return None;
                }
                Some(TraceLine { host: f[0].into(), script: f[1].into(), edge: f[2].into(), ns: f[3].parse().ok()? })
            })
            .collect()
    }

    /// The newest trace time of `script`'s `edge` on `host`.
    fn last_trace(&self, host: &str, module: &str, script: &str, edge: &str) -> Option<u128> {
        self.trace(host, module).iter().rev().find(|t| t.script == script && t.edge == edge).map(|t| t.ns)
    }

    fn module_log(&self, host: &str, module: &str) -> String {
        fs::read_to_string(self.lab.host_dir(host).join(format!("state/log/{module}.log"))).unwrap_or_default()
    }

    /// The powered-off host's daemon is gone with it.
    fn poweroff(&self, host: &str) {
        self.lab.poweroff(host);
        self.daemons.borrow_mut().remove(host);
    }

    fn tail(&self, path: &Path, lines: usize) -> String {
        let all = fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})\n", path.display()));
        let v: Vec<&str> = all.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Everything that helps understand a failure.
    fn dump(&self) {
        eprintln!(
            "==== lab {} ====\n{}",
            self.lab.name(),
            std::process::Command::new(lab_tool())
                .args(["status", self.lab.name()])
                .output()
                .map(|o| text(&o))
                .unwrap_or_default()
        );
        for h in HOSTS {
            eprintln!("==== daemon log of {h} ====\n{}", self.tail(&self.daemon_log(h), 200));
            let modules = self.modules.borrow();
            for m in modules.iter().take(4) {
                let log = self.lab.host_dir(h).join(format!("state/log/{m}.log"));
                eprintln!("==== {h}: {m}.log ====\n{}", self.tail(&log, 80));
                let user = self.lab.host_dir(h).join(format!("state/log/{m}.user.log"));
                eprintln!("==== {h}: {m}.user.log ====\n{}", self.tail(&user, 40));
                let trace = self.lab.host_dir(h).join(format!("state/trace-{m}"));
                eprintln!("==== {h}: trace-{m} ====\n{}", self.tail(&trace, 20));
            }
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        for (_, pid) in std::mem::take(&mut *self.daemons.borrow_mut()) {
            if process_alive(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
            }
        }
        // then the Lab field is dropped: every process of the lab dies, the lab is torn down
    }
}

/// A pair with module `web` (pulse 200 ms, timeout 1 s) installed and both daemons running.
fn pair_with_web(witness: bool) -> Pair {
    let pair = Pair::new(witness);
    pair.install(&ModuleSpec::new("web", 1));
    pair.start_daemons();
    pair
}

/// Polls both hosts until `until` returns true, and panics as soon as both are seen primary
/// at once. hostA is sampled before and after hostB: primary at both samples and hostB
/// primary between them means both were primary at the same moment.
fn never_both_primary(pair: &Pair, module: &str, what: &str, deadline: Duration, mut until: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        let a1 = pair.state(HOSTS[0], module);
        let b = pair.state(HOSTS[1], module);
        let a2 = pair.state(HOSTS[0], module);
        assert!(
            !(is_primary(a1.as_deref()) && is_primary(a2.as_deref()) && is_primary(b.as_deref())),
            "{module}: both nodes primary at once ({what}): hostA {a1:?}/{a2:?}, hostB {b:?}"
        );
        if until() {
            return;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `ok` for `duration` and panics as soon as it is false.
fn hold(what: &str, duration: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < duration {
        assert!(ok(), "{what}: no longer true after {:?}", start.elapsed());
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[test]
fn failover_when_primary_is_powered_off() {
    // Proves: the secondary takes over when the primary's host dies; the repaired host rejoins as SECOND.
    let pair = pair_with_web(false);
    for h in HOSTS {
        pair.run(h, &["start", "web"]);
    }
    let (primary, survivor) = pair.wait_pair("web", DEADLINE);
    pair.app_runs_on(primary, "web");

    pair.poweroff(primary);
    wait_until("the survivor to be ALONE", DEADLINE, || {
        (pair.settled(survivor, "web").as_deref() == Some("ALONE")).then_some(())
    });
    pair.app_runs_on(survivor, "web");

    pair.lab.poweron(primary);
    pair.start_daemon(primary); // the module was running: the daemon starts it again
    pair.wait_states("web", (primary, "SECOND"), (survivor, "PRIM"), DEADLINE);
    pair.app_runs_on(survivor, "web");
}

#[test]
fn swap_stops_primary_before_starting_secondary() {
    // Proves: swap ends stop_prim on the old primary before start_prim begins on the new one.
    let pair = pair_with_web(false);
    for h in HOSTS {
        pair.run(h, &["start", "web"]);
    }
    let (old, new) = pair.wait_pair("web", DEADLINE);
    pair.app_runs_on(old, "web");
    let starts_before = pair.trace(new, "web").len();

    pair.run(old, &["swap", "web"]);
    pair.wait_states("web", (new, "PRIM"), (old, "SECOND"), DEADLINE);
    pair.app_runs_on(new, "web");

    let stopped = pair.last_trace(old, "web", "stop_prim", "end").expect("stop_prim ran on the old primary");
    let new_trace = pair.trace(new, "web");
    let started = new_trace[starts_before..]
        .iter()
        .find(|t| t.script == "start_prim" && t.edge == "begin")
        .unwrap_or_else(|| panic!("start_prim did not run on {new}: {new_trace:?}"))
        .ns;
    assert!(
        stopped < started,
        "start_prim began on {new} {} ms before stop_prim ended on {old}",
        (stopped - started) as f64 / 1e6
    );
    assert!(new_trace.iter().all(|t| t.host == new), "{new_trace:?}");
}

/// hostA (the primary) is cut from every lan while the witness answers hostB only.
fn cut_primary_from_everything(pair: &Pair) {
    pair.start_with_primary_a("web");
    pair.lab.cut("all", Some(HOSTS[0]));
}

fn split_settled(pair: &Pair) -> bool {
    pair.settled(HOSTS[0], "web").as_deref() == Some("WAIT")
        && pair.settled(HOSTS[1], "web").as_deref() == Some("ALONE")
}

#[test]
fn split_brain_with_witness_leaves_exactly_one_primary() {
    // Proves: with a witness, a primary cut from everything is never primary at once with its
    // peer, the application never runs on both, and the healed pair is PRIM/SECOND.
    let pair = pair_with_web(true);
    cut_primary_from_everything(&pair);
    never_both_primary(&pair, "web", "hostA WAIT and hostB ALONE", DEADLINE, || split_settled(&pair));
    // The application never ran on both: hostA's stop_prim ended before hostB's start_prim.
    let stopped = pair.last_trace(HOSTS[0], "web", "stop_prim", "end").expect("stop_prim ran on hostA");
    let started = pair.last_trace(HOSTS[1], "web", "start_prim", "begin").expect("start_prim ran on hostB");
    assert!(
        stopped < started,
        "hostB started the application {} ms before hostA's stop ended",
        (stopped - started) as f64 / 1e6
    );
    pair.app_runs_on(HOSTS[1], "web");

    pair.lab.heal("all", Some(HOSTS[0]));
    pair.wait_states("web", (HOSTS[1], "PRIM"), (HOSTS[0], "SECOND"), DEADLINE);
    pair.app_runs_on(HOSTS[1], "web");
}

#[test]
fn wait_wait_without_witness_answer_then_admin_prim() {
    // Proves: no witness answering gives WAIT-WAIT; prim makes hostB ALONE; after the heal hostA is SECOND.
    let pair = pair_with_web(true);
    wait_wait(&pair);
    pair.run(HOSTS[1], &["prim", "web"]);
    wait_until("hostB ALONE after prim", DEADLINE, || {
        (pair.settled(HOSTS[1], "web").as_deref() == Some("ALONE")).then_some(())
    });

    pair.lab.heal("all", Some(HOSTS[0]));
    pair.lab.witness_up();
    pair.wait_states("web", (HOSTS[1], "PRIM"), (HOSTS[0], "SECOND"), DEADLINE);
    pair.app_runs_on(HOSTS[1], "web");
}

#[test]
fn admin_prim_holds_while_no_witness_answers() {
    // Proves: an admin's prim during WAIT-WAIT keeps hostB ALONE, its app running, while the split lasts.
    let pair = pair_with_web(true);
    wait_wait(&pair);
    pair.run(HOSTS[1], &["prim", "web"]);
    wait_until("hostB ALONE after prim", DEADLINE, || {
        (pair.settled(HOSTS[1], "web").as_deref() == Some("ALONE")).then_some(())
    });
    hold("hostB ALONE after the admin's prim", HOLD, || pair.state(HOSTS[1], "web").as_deref() == Some("ALONE"));
    pair.app_runs_on(HOSTS[1], "web");
}

/// hostA primary, then the witness down and hostA cut from every lan: both end in WAIT with
/// no application running, never both primary on the way.
fn wait_wait(pair: &Pair) {
    pair.start_with_primary_a("web");
    pair.lab.witness_down();
    pair.lab.cut("all", Some(HOSTS[0]));
    never_both_primary(pair, "web", "WAIT on both hosts", DEADLINE, || {
        pair.settled(HOSTS[0], "web").as_deref() == Some("WAIT")
            && pair.settled(HOSTS[1], "web").as_deref() == Some("WAIT")
    });
    for h in HOSTS {
        pair.app_stopped_on(h, "web");
    }
}

#[test]
fn alone_alone_without_witness_resolves_on_reconnection() {
    // Proves: no witness: a split gives ALONE-ALONE; on reconnection the old primary wins, the other resyncs.
    let pair = pair_with_web(false);
    pair.start_with_primary_a("web");

    pair.lab.cut("all", Some(HOSTS[0]));
    pair.wait_states("web", (HOSTS[0], "ALONE"), (HOSTS[1], "ALONE"), DEADLINE);
    for h in HOSTS {
        assert_eq!(pair.app_process(h, "web"), Some(true), "the application does not run on {h}");
    }

    pair.lab.heal("all", Some(HOSTS[0]));
    pair.wait_states("web", (HOSTS[0], "PRIM"), (HOSTS[1], "SECOND"), DEADLINE);
    pair.app_runs_on(HOSTS[0], "web");
    let log = pair.module_log(HOSTS[1], "web");
    assert!(log.contains("divergent data will be replaced by a full resync"), "hostB's module log:\n{log}");
}

#[test]
fn frozen_primary_that_thaws_does_not_stay_primary() {
    // Proves: a frozen primary is replaced, and once thawed it becomes SECOND with its app stopped.
    let pair = pair_with_web(false);
    pair.start_with_primary_a("web");

    pair.lab.freeze(HOSTS[0]);
    wait_until("hostB ALONE", DEADLINE, || (pair.settled(HOSTS[1], "web").as_deref() == Some("ALONE")).then_some(()));
    // hostA's application is frozen too, so the file of hostB proves hostB runs it.
    let file = pair.alive_file(HOSTS[1], "web");
    let first = wait_until("hostB's application to write", DEADLINE, || fs::read_to_string(&file).ok());
    wait_until("hostB's application to keep writing", DEADLINE, || {
        fs::read_to_string(&file).ok().filter(|s| *s != first)
    });

    pair.lab.thaw(HOSTS[0]);
    pair.wait_states("web", (HOSTS[0], "SECOND"), (HOSTS[1], "PRIM"), DEADLINE);
    pair.app_runs_on(HOSTS[1], "web");
    assert_eq!(pair.app_process(HOSTS[0], "web"), Some(false));
}

#[test]
fn thirty_two_modules_on_one_pair() {
    // Proves: 32 modules run on one pair; a 33rd is refused (the 32 limit) and the 32 keep running.
    const MODULES: u16 = 32;
    let pair = Pair::new(false);
    let names: Vec<String> = (1..=MODULES + 1).map(|i| format!("m{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        pair.install(&ModuleSpec::new(name, i as u16 + 1).timeout("2s"));
    }
    pair.start_daemons();
    let running = &names[..MODULES as usize];
    let starts = running.iter().map(|m| format!("{} start {m}", hamirror())).collect::<Vec<_>>().join(" && ");
    for h in HOSTS {
        pair.lab.exec_ok(h, &["sh", "-c", &starts]);
    }

    // every module PRIM on one host and SECOND on the other, settled
    let all_paired = || -> Option<()> {
        let mut views = BTreeMap::new();
        for h in HOSTS {
            let out = pair.exec(h, &["status", "--json"]);
            if !out.status.success() {
                return None;
            }
            let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
            views.insert(h, list);
        }
        for m in running {
            let mut states = Vec::new();
            for h in HOSTS {
                let v = views[h].iter().find(|v| v["name"] == m.as_str())?;
                if !v["status"]["transition"].is_null() {
                    return None;
                }
                states.push(v["status"]["state"].as_str()?.to_string());
            }
            states.sort();
            if states != ["PRIM", "SECOND"] {
                return None;
            }
        }
        Some(())
    };
    wait_until("32 modules PRIM/SECOND", Duration::from_secs(60), all_paired);

    let refused = &names[MODULES as usize];
    for h in HOSTS {
        let v = pair.view(h, refused).unwrap_or_else(|| panic!("{refused} is not shown on {h}"));
        assert!(v["status"].is_null(), "{refused} runs on {h}: {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains("32 mirror modules"), "{refused} on {h}: {error}");
        let out = pair.exec(h, &["start", refused]);
        assert!(!out.status.success(), "{refused} started on {h}");
    }
    // the 32 keep running
    hold("the 32 modules to stay PRIM/SECOND", HOLD, || all_paired().is_some());

    // One more installed while the 32 run, named to come first in name order (the loader
    // applies the limit in name order): `module install` refuses it on hostA; on hostB its
    // files are put in place by hand and a reload (`module remove` of the refused m33) makes
    // the daemon refuse it, not one of the running modules.
    let late = ModuleSpec::new("a00", MODULES + 2).timeout("2s");
    let src = pair.lab.dir().join("a00-src");
    pair.write_module(&src, &late);
    let out = pair.exec(HOSTS[0], &["module", "install", src.to_str().unwrap(), "--name", "a00"]);
    assert!(!out.status.success(), "installing a 33rd module while 32 run: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("32 mirror modules"), "{}", text(&out));
    assert!(!pair.lab.host_dir(HOSTS[0]).join("etc/modules/a00").exists(), "the refused a00 stays installed");

    pair.write_module(&pair.lab.host_dir(HOSTS[1]).join("etc/modules/a00"), &late);
    pair.run(HOSTS[1], &["module", "remove", refused]);
    let list: Vec<Value> = serde_json::from_str(&pair.run(HOSTS[1], &["status", "--json"])).unwrap();
    let shown: Vec<&str> = list.iter().filter_map(|v| v["name"].as_str()).collect();
    let mut unique = shown.clone();
    unique.dedup();
    assert_eq!(shown, unique, "a module is listed twice");
    let a00 = list.iter().find(|v| v["name"] == "a00").expect("a00 is listed");
    assert!(a00["status"].is_null(), "a00 runs: {a00}");
    assert!(a00["error"].as_str().unwrap_or_default().contains("32 mirror modules"), "{a00}");
    for m in running {
        let v = list.iter().find(|v| v["name"] == m.as_str()).unwrap();
        assert!(v["error"].is_null() && !v["status"].is_null(), "{m} after the reload: {v}");
    }
    hold("the 32 modules to stay PRIM/SECOND", HOLD, || all_paired().is_some());
}
