//! Multi-host labs for integration tests: a thin wrapper over `tools/lab` (docs/lab.md).
//!
//! A [`Lab`] is a set of hosts (network + PID + mount + UTS namespaces on this machine),
//! each with its own `/etc/hamirror` and `/var/lib/hamirror`, wired to one bridge per lan.
//! Dropping the `Lab` tears it down, also when the test panics. Labs need root.
//!
//! ```ignore
//! mod support;
//! use support::lab::*;
//!
//! let lab = Lab::up(LabSpec::new(&["hostA", "hostB"]).lans(&["default", "replication"]));
//! std::fs::write(lab.host_dir("hostA").join("etc/cluster.xml"), xml)?;
//! let pid = lab.spawn("hostA", &log, &["hamirror", "daemon"]);
//! lab.cut("replication", None);
//! wait_until("hostB to go ALONE", Duration::from_secs(30), || state_is(&lab, "hostB", 2));
//! ```

use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How often [`wait_until`] looks at its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Exit code of `tools/lab exec` when the lab itself refused (host off, frozen, unknown),
/// as opposed to an exit code of the command.
pub const LAB_ERROR_EXIT_CODE: i32 = 125;

/// What a lab is made of.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Host names; host i (from 0) has the address 10.231.<lan+1>.<i+1> on every lan.
    pub hosts: Vec<String>,
    /// Lan names (at most 11 characters); a host's interface on lan L is `lan-L`.
    pub lans: Vec<String>,
    /// A witness node at .254 on every lan (a bare network namespace, no PID 1).
    pub witness: bool,
    /// More directories made private per host, like /etc/hamirror (e.g. libvirt's).
    pub binds: Vec<PathBuf>,
    /// Each host runs its own libvirtd (`tools/lab up --libvirt`).
    pub libvirt: bool,
}

impl LabSpec {
    /// These hosts on the single lan `default`, no witness, no extra private directory.
    pub fn new(hosts: &[&str]) -> Self {
        LabSpec {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            lans: vec!["default".to_string()],
            witness: false,
            binds: Vec::new(),
            libvirt: false,
        }
    }

    /// Replaces the lans.
    pub fn lans(mut self, lans: &[&str]) -> Self {
        self.lans = lans.iter().map(|l| l.to_string()).collect();
        self
    }

    /// Adds a witness.
    pub fn witness(mut self) -> Self {
        self.witness = true;
        self
    }

    /// Gives each host its own libvirtd and virtlogd.
    pub fn libvirt(mut self) -> Self {
        self.libvirt = true;
        self
    }

    /// Makes `path` (a directory) private to each host.
    pub fn bind(mut self, path: impl Into<PathBuf>) -> Self {
        self.binds.push(path.into());
        self
    }
}

impl Default for LabSpec {
    /// `hostA` and `hostB` on the lan `default`.
    fn default() -> Self {
        LabSpec::new(&["hostA", "hostB"])
    }
}

/// A running lab. Every method panics with `tools/lab`'s message when the lab refuses.
#[derive(Debug)]
pub struct Lab {
    name: String,
    dir: PathBuf,
    spec: LabSpec,
}

/// Makes lab names unique within this test process (the pid makes them unique across).
static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Builds the lab and powers every host on.
    pub fn up(spec: LabSpec) -> Lab {
        require_root();
        let name = format!("t{}-{}", std::process::id(), LAB_COUNTER.fetch_add(1, Ordering::Relaxed));
        let mut args: Vec<String> = vec![
            "up".into(),
            name.clone(),
            "--hosts".into(),
            spec.hosts.join(","),
            "--lans".into(),
            spec.lans.join(","),
        ];
        if spec.witness {
            args.push("--witness".into());
        }
        if spec.libvirt {
            args.push("--libvirt".into());
        }
        for b in &spec.binds {
            args.push("--bind".into());
            args.push(b.to_str().expect("bind paths are UTF-8").into());
        }
        let out = lab_command()
            .args(&args)
            // The lab lives as long as this process; `tools/lab clean` removes it after.
            .env("HAMIRROR_LAB_OWNER", std::process::id().to_string())
            .output()
            .expect("run tools/lab");
        check(&args.join(" "), &out);
        let dir = lab_root().join(&name);
        Lab { name, dir, spec }
    }

    /// The lab's name (for `tools/lab status NAME` by hand).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn spec(&self) -> &LabSpec {
        &self.spec
    }

    /// The lab's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host's private root: `etc/` is its /etc/hamirror, `state/` its
    /// /var/lib/hamirror, `bind/<path>` each bound path. Writable from the test directly.
    pub fn host_dir(&self, host: &str) -> PathBuf {
        assert!(self.spec.hosts.iter().any(|h| h == host), "lab {} has no host {host}", self.name);
        self.dir.join(host)
    }

    /// Runs `cmd` inside `host` (cwd /) and returns its output; the exit code is the
    /// command's, or [`LAB_ERROR_EXIT_CODE`] when the host is off or frozen.
    pub fn exec<S: AsRef<OsStr>>(&self, host: &str, cmd: &[S]) -> Output {
        lab_command().args(["exec", &self.name, host, "--"]).args(cmd).output().expect("run tools/lab exec")
    }

    /// Like [`Lab::exec`], but panics unless the command succeeds; returns its stdout.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, host: &str, cmd: &[S]) -> String {
        let out = self.exec(host, cmd);
        let shown: Vec<_> = cmd.iter().map(|c| c.as_ref().to_string_lossy()).collect();
        assert!(
            out.status.success(),
            "{shown:?} on {}/{host} failed ({}):\nstdout: {}\nstderr: {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `cmd` in the background inside `host`, stdout and stderr appended to `log`;
    /// returns its pid (as seen from the test). It dies with the host's power.
    pub fn spawn<S: AsRef<OsStr>>(&self, host: &str, log: &Path, cmd: &[S]) -> u32 {
        let out = lab_command()
            .args(["spawn", &self.name, host])
            .arg(log)
            .arg("--")
            .args(cmd)
            .output()
            .expect("run tools/lab spawn");
        check(&format!("spawn {} {host}", self.name), &out);
        let pid = String::from_utf8_lossy(&out.stdout);
        pid.trim().parse().unwrap_or_else(|_| panic!("tools/lab spawn printed {pid:?}, not a pid"))
    }

    /// The address of `host` (or `"witness"`) on `lan`.
    pub fn addr(&self, host: &str, lan: &str) -> IpAddr {
        let out = self.tool(&["addr", &self.name, host, lan]);
        out.trim().parse().unwrap_or_else(|_| panic!("tools/lab addr printed {out:?}, not an address"))
    }

    /// The pid (as seen from the test) of the host's PID 1; panics when the host is off.
    pub fn pid1(&self, host: &str) -> u32 {
        let out = self.tool(&["pid1", &self.name, host]);
        out.trim().parse().unwrap_or_else(|_| panic!("tools/lab pid1 printed {out:?}, not a pid"))
    }

    /// Cuts the power: every process of the host is dead when this returns.
    pub fn poweroff(&self, host: &str) {
        self.tool(&["poweroff", &self.name, host]);
    }

    /// Boots the host again (a fresh PID 1; its private directories are kept).
    pub fn poweron(&self, host: &str) {
        self.tool(&["poweron", &self.name, host]);
    }

    /// Freezes every process of the host (like a hung machine); `exec` then refuses.
    pub fn freeze(&self, host: &str) {
        self.tool(&["freeze", &self.name, host]);
    }

    pub fn thaw(&self, host: &str) {
        self.tool(&["thaw", &self.name, host]);
    }

    /// Unplugs `host`'s cable on `lan` (`"all"`: every lan); `None`: every port of the lan.
    pub fn cut(&self, lan: &str, host: Option<&str>) {
        self.ports("cut", lan, host);
    }

    /// Plugs the cable back; the lan carries traffic again when this returns.
    pub fn heal(&self, lan: &str, host: Option<&str>) {
        self.ports("heal", lan, host);
    }

    /// Unplugs the witness from every lan.
    /// `tools/lab libvirtd NAME HOST stop|start|restart`: only that host's libvirtd.
    pub fn libvirtd(&self, host: &str, action: &str) {
        self.tool(&["libvirtd", &self.name, host, action]);
    }

    pub fn witness_down(&self) {
        self.tool(&["witness", &self.name, "down"]);
    }

    pub fn witness_up(&self) {
        self.tool(&["witness", &self.name, "up"]);
    }

    /// `tools/lab status`: hosts, power, PID 1, addresses, links.
    pub fn status(&self) -> String {
        self.tool(&["status", &self.name])
    }

    fn ports(&self, verb: &str, lan: &str, host: Option<&str>) {
        let mut args = vec![verb, self.name.as_str(), lan];
        args.extend(host);
        self.tool(&args);
    }

    /// Runs `tools/lab ARGS`, panics on failure, returns stdout.
    fn tool(&self, args: &[&str]) -> String {
        let out = lab_command().args(args).output().expect("run tools/lab");
        check(&args.join(" "), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking && std::env::var_os("HAMIRROR_LAB_KEEP").is_some() {
            eprintln!(
                "HAMIRROR_LAB_KEEP: keeping lab {} for inspection (tools/lab status {0}; \
                 tools/lab down {0})",
                self.name
            );
            return;
        }
        let out = lab_command().args(["down", &self.name]).output();
        let failure = match out {
            Ok(out) if out.status.success() => return,
            Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
            Err(e) => e.to_string(),
        };
        let msg = format!("tools/lab down {} failed: {failure}", self.name);
        if panicking {
            eprintln!("{msg}"); // a second panic would abort and hide the first
        } else {
            panic!("{msg}");
        }
    }
}

/// The name of `lan`'s interface inside every host (the kernel refuses `default` itself).
pub fn ifname(lan: &str) -> String {
    format!("lan-{lan}")
}

/// `tools/lab` in this checkout.
pub fn lab_tool() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/lab")
}

/// Where `tools/lab` keeps its labs.
pub fn lab_root() -> PathBuf {
    std::env::var_os("HAMIRROR_LAB_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp/hamirror-lab"))
}

/// Whether `pid` names a live process (a zombie is dead).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // the state is the first field after "(comm) "
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Some`, and returns that; panics
/// naming `what` once `deadline` has passed. This is how tests wait: never a bare sleep.
pub fn wait_until<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Panics with a clear message unless the test runs as root (labs need it).
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .expect("an Uid: line in /proc/self/status");
    assert!(
        euid == "0",
        "this test needs root: it builds network-namespace hosts with tools/lab \
         (run it as root, e.g. through tools/test)"
    );
}

fn lab_command() -> Command {
    Command::new(lab_tool())
}

/// Panics with `tools/lab`'s output unless it succeeded.
fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "tools/lab {what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
