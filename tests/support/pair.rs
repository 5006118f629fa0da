//! A real pair of `hamirror daemon`s in two lab hosts (tools/lab, docs/lab.md), for the lab
//! tests (tests/lab_cluster.rs, tests/lab_replication.rs, tests/lab_lostwrite.rs).
//!
//! Every module runs the `mirror` template's scripts (app-modules/mirror/bin), wrapped so that
//! each run of start_prim / stop_prim leaves "<host> <script> begin|end <ns>" lines in the
//! host's `/var/lib/hamirror/trace-<module>`. The application (unless [`ModuleSpec::app`] names
//! another) writes "<host> <counter>" into `/var/lib/hamirror/app-<module>.alive` every 100 ms:
//! a test proves it runs on a host (the file changes) and not on the other (`pgrep` in that
//! host finds nothing).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use super::lab::*;
use serde_json::Value;

pub const HOSTS: [&str; 2] = ["hostA", "hostB"];
pub const LANS: [&str; 2] = ["default", "replication"];
/// How long a role change may take (a few heartbeat timeouts and script runs, on a loaded CI).
pub const DEADLINE: Duration = Duration::from_secs(30);
/// After a decision: how long the pair must keep it.
pub const HOLD: Duration = Duration::from_secs(3);

pub fn hamirror() -> &'static str {
    env!("CARGO_BIN_EXE_hamirror")
}

pub fn other(host: &str) -> &'static str {
    if host == HOSTS[0] {
        HOSTS[1]
    } else {
        HOSTS[0]
    }
}

pub fn is_primary(state: Option<&str>) -> bool {
    matches!(state, Some("PRIM") | Some("ALONE"))
}

pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `<`, `>`, `&` and `"` as XML attribute text.
pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// How a module is installed.
#[derive(Clone, Debug)]
pub struct ModuleSpec {
    pub name: String,
    pub id: u16,
    pub pulse: &'static str,
    pub timeout: &'static str,
    /// Replicates `DATA_DIR/<name>` over the lan `replication` with this `sync` mode.
    pub replicated: Option<&'static str>,
    /// How long start_prim may run (`starttimeout`).
    pub start_timeout: &'static str,
    /// Scripts run instead of the `mirror` template's (`start_prim`, `stop_prim`), still
    /// traced: (script, shell text).
    pub scripts: Vec<(&'static str, String)>,
    /// The application's shell command (APP_COMMAND); `None`: [`app_command`].
    pub app: Option<String>,
    /// A VM module instead of an application: `<vm>`, a `<check><vm/>` and `<rfs>` over the
    /// VM's directory; no scripts.
    pub vm: Option<VmSpec>,
    /// `<failover maxloop>`.
    pub maxloop: u32,
}

/// The VM of a VM module.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub domain: String,
    /// Its directory (disk, kernel, initrd), replicated.
    pub dir: String,
    pub stop_timeout: &'static str,
}

/// Directory private to each host under which replicated modules keep their data
/// (`DATA_DIR/<module>`); [`Pair::data_dir`] is its real path, seen from outside the lab.
pub const DATA_DIR: &str = "/srv/hamirror-data";

/// Where a node keeps its split-brain changes (beside its state directory), private per host.
pub const SPLITBRAIN_DIR: &str = "/var/lib/hamirror-splitbrain";

impl ModuleSpec {
    pub fn new(name: &str, id: u16) -> ModuleSpec {
        ModuleSpec {
            name: name.to_string(),
            id,
            pulse: "200ms",
            timeout: "1s",
            replicated: None,
            start_timeout: "10s",
            scripts: Vec::new(),
            app: None,
            vm: None,
            maxloop: 3,
        }
    }
    /// Protects the domain `domain` whose files are in `dir`.
    pub fn vm(mut self, domain: &str, dir: &str) -> ModuleSpec {
        self.vm = Some(VmSpec { domain: domain.to_string(), dir: dir.to_string(), stop_timeout: "20s" });
        self
    }
    pub fn maxloop(mut self, maxloop: u32) -> ModuleSpec {
        self.maxloop = maxloop;
        self
    }
    /// Replicates `DATA_DIR/<name>` in `sync` mode (`"sync"` or `"async"`).
    pub fn replicated(mut self, sync: &'static str) -> ModuleSpec {
        self.replicated = Some(sync);
        self
    }
    pub fn timeout(mut self, timeout: &'static str) -> ModuleSpec {
        self.timeout = timeout;
        self
    }
    pub fn start_timeout(mut self, start_timeout: &'static str) -> ModuleSpec {
        self.start_timeout = start_timeout;
        self
    }
    /// Runs `text` (a shell script) instead of the template's `script`: `"start_prim"` or
    /// `"stop_prim"`.
    pub fn script(mut self, script: &'static str, text: String) -> ModuleSpec {
        assert!(SCRIPTS.contains(&script), "the lab modules have no script {script} (only {SCRIPTS:?})");
        self.scripts.push((script, text));
        self
    }
    /// Runs `command` as the application instead of [`app_command`] (then [`Pair::app_runs_on`]
    /// and [`Pair::app_process`] do not find it).
    pub fn app(mut self, command: &str) -> ModuleSpec {
        self.app = Some(command.to_string());
        self
    }
}

/// The scripts a lab module has, from the `mirror` template unless [`ModuleSpec::script`]
/// replaces them.
pub const SCRIPTS: [&str; 2] = ["start_prim", "stop_prim"];

/// The shell loop that stands for the application (see the file's docs).
pub fn app_command(module: &str) -> String {
    let file = format!("/var/lib/hamirror/app-{module}.alive");
    format!(
        "h=$(hostname); i=0; while :; do i=$((i+1)); echo \"$h $i\" > {file}.tmp && mv -f {file}.tmp {file}; sleep 0.1; done"
    )
}

/// A `pgrep -f` pattern that finds the application's shell but not pgrep itself.
pub fn app_pattern(module: &str) -> String {
    let (first, rest) = module.split_at(1);
    format!("app-[{first}]{rest}\\.alive")
}

/// A wrapper of the template's script that traces its begin and end with a ns timestamp.
pub fn traced_script(script: &str) -> String {
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
pub struct TraceLine {
    pub host: String,
    pub script: String,
    pub edge: String,
    pub ns: u128,
}

/// Two lab hosts running `hamirror daemon`. Dropping it prints the logs when the test
/// panicked, kills the daemons, then tears the lab down.
pub struct Pair {
    pub daemons: RefCell<BTreeMap<String, u32>>,
    pub modules: RefCell<Vec<String>>,
    pub witness: bool,
    pub lab: Lab,
}

impl Pair {
    /// Two hosts on the lans default and replication (and a witness when asked), with the
    /// same cluster.xml and cluster key in both homes. No module, no daemon yet.
    pub fn new(witness: bool) -> Pair {
        Pair::with_spec(witness, |spec| spec)
    }

    /// [`Pair::new`] with more to the lab (libvirt, binds).
    pub fn with_spec(witness: bool, more: impl FnOnce(LabSpec) -> LabSpec) -> Pair {
        let mut spec = more(LabSpec::new(&HOSTS).lans(&LANS).bind(DATA_DIR).bind(SPLITBRAIN_DIR));
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
    pub fn install(&self, m: &ModuleSpec) {
        for h in HOSTS {
            self.write_module(&self.lab.host_dir(h).join("etc/modules").join(&m.name), m);
        }
        self.modules.borrow_mut().push(m.name.clone());
    }

    /// Writes a module directory (userconfig.xml, the traced template scripts) at `dir`.
    pub fn write_module(&self, dir: &Path, m: &ModuleSpec) {
        let splitbrain = if self.witness {
            format!("  <splitbrain witness=\"{}\"/>\n", self.lab.addr("witness", "default"))
        } else {
            String::new()
        };
        let head = format!(
            "<module name=\"{name}\" mode=\"mirror\" id=\"{id}\">\n  <heart pulse=\"{pulse}\" timeout=\"{timeout}\"/>\n  \
             <failover auto=\"on\" defaultprim=\"alone\" maxloop=\"{maxloop}\"/>\n{splitbrain}",
            name = m.name,
            id = m.id,
            pulse = m.pulse,
            timeout = m.timeout,
            maxloop = m.maxloop,
        );
        let rfs = |path: &str, sync: &str| {
            format!("  <rfs sync=\"{sync}\" lan=\"replication\">\n    <replicated dir=\"{path}\"/>\n  </rfs>\n")
        };
        fs::create_dir_all(dir).unwrap();
        if let Some(vm) = &m.vm {
            let xml = format!(
                "{head}{rfs}  <vm name=\"{domain}\" stop_timeout=\"{stop}\"/>\n  <user starttimeout=\"{start}\"/>\n  \
                 <check>\n    <vm action=\"restart\"/>\n  </check>\n</module>\n",
                rfs = rfs(&vm.dir, "sync"),
                domain = vm.domain,
                stop = vm.stop_timeout,
                start = m.start_timeout,
            );
            fs::write(dir.join("userconfig.xml"), xml).unwrap();
            return;
        }
        let rfs = match m.replicated {
            Some(sync) => {
                for h in HOSTS {
                    fs::create_dir_all(self.data_dir(h, &m.name)).unwrap();
                }
                rfs(&format!("{DATA_DIR}/{}", m.name), sync)
            }
            None => String::new(),
        };
        let xml = format!(
            "{head}{rfs}  <user nicestoptimeout=\"10s\" forcestoptimeout=\"10s\" starttimeout=\"{start_timeout}\">\n    \
             <var name=\"APP_COMMAND\" value=\"{app}\"/>\n  </user>\n</module>\n",
            start_timeout = m.start_timeout,
            app = xml_escape(&m.app.clone().unwrap_or_else(|| app_command(&m.name))),
        );
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("app-modules/mirror/bin");
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).unwrap();
        fs::write(dir.join("userconfig.xml"), &xml).unwrap();
        for script in SCRIPTS {
            let real = bin.join(format!("mirror_{script}"));
            match m.scripts.iter().find(|(s, _)| *s == script) {
                Some((_, text)) => fs::write(&real, text).unwrap(),
                None => {
                    fs::copy(template.join(script), &real).unwrap();
                }
            }
            fs::write(bin.join(script), traced_script(script)).unwrap();
            for f in [real, bin.join(script)] {
                fs::set_permissions(f, fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
    }

    /// The real directory under the module's replicated directory on `host` (what the
    /// replication wrote there, not the mountover's view).
    pub fn data_dir(&self, host: &str, module: &str) -> PathBuf {
        self.lab.host_dir(host).join("bind").join(DATA_DIR.trim_start_matches('/')).join(module)
    }

    /// The real path, seen from outside the lab, of `path` inside `host` under one of the
    /// lab's private binds.
    pub fn host_path(&self, host: &str, path: &str) -> PathBuf {
        self.lab.host_dir(host).join("bind").join(path.trim_start_matches('/'))
    }

    pub fn daemon_log(&self, host: &str) -> PathBuf {
        self.lab.dir().join(format!("daemon-{host}.log"))
    }

    /// Starts `hamirror daemon` in `host` and waits until its admin socket answers.
    pub fn start_daemon(&self, host: &str) {
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
    pub fn start_daemons(&self) {
        for h in HOSTS {
            self.start_daemon(h);
        }
    }

    /// Runs `hamirror ARGS` inside `host`.
    pub fn exec(&self, host: &str, args: &[&str]) -> Output {
        let mut cmd = vec![hamirror()];
        cmd.extend_from_slice(args);
        self.lab.exec(host, &cmd)
    }

    /// Runs `hamirror ARGS` inside `host` and panics unless it succeeds.
    pub fn run(&self, host: &str, args: &[&str]) -> String {
        let out = self.exec(host, args);
        assert!(out.status.success(), "hamirror {args:?} on {host}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `hamirror status MODULE --json` inside `host`; `None` when no daemon answers (or the
    /// host is off or frozen).
    pub fn view(&self, host: &str, module: &str) -> Option<Value> {
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
    pub fn state(&self, host: &str, module: &str) -> Option<String> {
        self.view(host, module)?["status"]["state"].as_str().map(str::to_string)
    }

    /// The module's state on `host` when no transition (script, resync, witness) is under way.
    pub fn settled(&self, host: &str, module: &str) -> Option<String> {
        let v = self.view(host, module)?;
        if !v["status"]["transition"].is_null() {
            return None;
        }
        v["status"]["state"].as_str().map(str::to_string)
    }

    /// Waits until `host_a` is in state `a` and `host_b` in state `b`, both settled.
    pub fn wait_states(&self, module: &str, a: (&str, &str), b: (&str, &str), deadline: Duration) {
        wait_until(&format!("{module}: {} {} and {} {}", a.0, a.1, b.0, b.1), deadline, || {
            (self.settled(a.0, module).as_deref() == Some(a.1) && self.settled(b.0, module).as_deref() == Some(b.1))
                .then_some(())
        });
    }

    /// Waits until one host is PRIM and the other SECOND; returns (primary, secondary).
    pub fn wait_pair(&self, module: &str, deadline: Duration) -> (&'static str, &'static str) {
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
    pub fn start_with_primary_a(&self, module: &str) {
        self.run(HOSTS[0], &["start", module]);
        wait_until(&format!("{module} ALONE on hostA"), DEADLINE, || {
            (self.settled(HOSTS[0], module).as_deref() == Some("ALONE")).then_some(())
        });
        self.run(HOSTS[1], &["start", module]);
        self.wait_states(module, (HOSTS[0], "PRIM"), (HOSTS[1], "SECOND"), DEADLINE);
        self.app_runs_on(HOSTS[0], module);
    }

    /// Whether the application's process exists in `host` (`None`: the host is off or frozen).
    pub fn app_process(&self, host: &str, module: &str) -> Option<bool> {
        let out = self.lab.exec(host, &["pgrep", "-f", &app_pattern(module)]);
        match out.status.code() {
            Some(0) => Some(true),
            Some(1) => Some(false),
            Some(LAB_ERROR_EXIT_CODE) => None,
            _ => panic!("pgrep in {host}: {}", text(&out)),
        }
    }

    pub fn alive_file(&self, host: &str, module: &str) -> PathBuf {
        self.lab.host_dir(host).join(format!("state/app-{module}.alive"))
    }

    /// Proves that the application runs on `host` and not on the other host: its file on
    /// `host` keeps changing, and the other host has no such process.
    pub fn app_runs_on(&self, host: &str, module: &str) {
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
    pub fn app_stopped_on(&self, host: &str, module: &str) {
        wait_until(&format!("the application of {module} to be stopped on {host}"), DEADLINE, || {
            (self.app_process(host, module) != Some(true)).then_some(())
        });
    }

    /// The trace lines of `host` for `module`, oldest first.
    pub fn trace(&self, host: &str, module: &str) -> Vec<TraceLine> {
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
    pub fn last_trace(&self, host: &str, module: &str, script: &str, edge: &str) -> Option<u128> {
        self.trace(host, module).iter().rev().find(|t| t.script == script && t.edge == edge).map(|t| t.ns)
    }

    pub fn module_log(&self, host: &str, module: &str) -> String {
        fs::read_to_string(self.lab.host_dir(host).join(format!("state/log/{module}.log"))).unwrap_or_default()
    }

    /// The powered-off host's daemon is gone with it.
    pub fn poweroff(&self, host: &str) {
        self.lab.poweroff(host);
        self.daemons.borrow_mut().remove(host);
    }

    pub fn tail(&self, path: &Path, lines: usize) -> String {
        let all = fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})\n", path.display()));
        let v: Vec<&str> = all.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Everything that helps understand a failure.
    pub fn dump(&self) {
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
pub fn pair_with_web(witness: bool) -> Pair {
    let pair = Pair::new(witness);
    pair.install(&ModuleSpec::new("web", 1));
    pair.start_daemons();
    pair
}

/// Polls both hosts until `until` returns true, and panics as soon as both are seen primary
/// at once. hostA is sampled before and after hostB: primary at both samples and hostB
/// primary between them means both were primary at the same moment.
pub fn never_both_primary(pair: &Pair, module: &str, what: &str, deadline: Duration, mut until: impl FnMut() -> bool) {
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
pub fn hold(what: &str, duration: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < duration {
        assert!(ok(), "{what}: no longer true after {:?}", start.elapsed());
        std::thread::sleep(POLL_INTERVAL);
    }
}
