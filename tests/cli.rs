//! The `hamirror` binary as an administrator runs it: without a daemon, with a fake daemon
//! on the admin socket (status, state, commands, verify, resync followed while the test
//! drives the module), and the file commands (cluster genkey, module install/list/remove).

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hamirror::config::ModuleMode;
use hamirror::daemon::control::{Control, ModuleHandle, ModuleRequest, ModuleView, ReloadReport, VerifyRequest};
use hamirror::module::{AdminCommand, CommandError, LanStatus, Role, Snapshot, State, Transition, WaitReason};
use hamirror::paths::Paths;
use hamirror::replication::status::{
    DataRole, Difference, DifferenceKind, LagView, ReplicationView, ResyncSummary, ResyncView, VerifyReport,
};
use tokio::sync::{mpsc, oneshot, watch, RwLock};

/// How long a test waits for the binary to do what it should.
const DEADLINE: Duration = Duration::from_secs(20);

const CLUSTER_XML: &str = r#"<cluster name="pair1">
  <lan name="default">
    <node name="hostA" addr="192.168.1.10"/>
    <node name="hostB" addr="192.168.1.11"/>
  </lan>
</cluster>
"#;

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    /// An empty home (with cluster.xml when asked) and state directory.
    fn new(with_cluster: bool) -> Node {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("home")).unwrap();
        fs::create_dir_all(dir.path().join("state")).unwrap();
        if with_cluster {
            fs::write(dir.path().join("home/cluster.xml"), CLUSTER_XML).unwrap();
        }
        Node { dir }
    }
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
    fn paths(&self) -> Paths {
        Paths::new(self.home(), self.dir.path().join("state"))
    }
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hamirror"));
        c.args(args)
            .env("HAMIRROR_HOME", self.home())
            .env("HAMIRROR_STATE_DIR", self.dir.path().join("state"))
            .env("HAMIRROR_TEMPLATES", Path::new(env!("CARGO_MANIFEST_DIR")).join("app-modules"))
            .env_remove("HAMIRROR_NODE")
            .env_remove("HAMIRROR_TOKEN");
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
    /// Starts the binary; its output arrives line by line.
    fn spawn(&self, args: &[&str]) -> Running {
        let mut child =
            self.command(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let lines = |pipe: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = std_mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().unwrap()));
        let stderr = lines(Box::new(child.stderr.take().unwrap()));
        Running { child, stdout, stderr, err_seen: Vec::new() }
    }
}

/// A command running in the background.
struct Running {
    child: Child,
    stdout: std_mpsc::Receiver<String>,
    stderr: std_mpsc::Receiver<String>,
    /// stderr lines read so far.
    err_seen: Vec<String>,
}

impl Running {
    fn next_line(&self) -> String {
        self.stdout.recv_timeout(DEADLINE).unwrap_or_else(|e| panic!("no line on stdout: {e}"))
    }
    /// Reads stderr until a line satisfies `want`.
    fn wait_stderr(&mut self, want: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.err_seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                Err(e) => panic!("no such line on stderr ({e}); seen: {:?}", self.err_seen),
            }
        }
    }
    /// Waits for the exit; the rest of stdout, and all of stderr.
    fn finish(mut self) -> (ExitStatus, Vec<String>, Vec<String>) {
        let end = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < end, "the command did not end; stderr so far: {:?}", self.err_seen);
            std::thread::sleep(Duration::from_millis(10));
        };
        // The pipes close with the process: the readers end.
        let out: Vec<String> = self.stdout.iter().collect();
        let rest: Vec<String> = self.stderr.iter().collect();
        self.err_seen.extend(rest);
        (status, out, std::mem::take(&mut self.err_seen))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code, and stderr which must be one `hamirror: ` line.
fn failure(o: &Output) -> (i32, String) {
    let e = stderr(o);
    assert!(e.starts_with("hamirror: ") && e.ends_with('\n') && e.lines().count() == 1, "{e:?}");
    (o.status.code().unwrap(), e.trim_end().to_string())
}

// Every client command says the daemon is unreachable, in one sentence with the socket path,
// and exits 1 (`state` exits 5).
#[test]
fn commands_fail_clearly_without_a_daemon() {
    let node = Node::new(true);
    let socket = node.paths().socket();
    let expected = format!("hamirror: cannot reach the hamirror daemon at {} (is it running?)", socket.display());
    for args in [
        &["status"][..],
        &["status", "web01", "--json"],
        &["start", "web01"],
        &["prim", "web01", "--force"],
        &["second", "web01", "--full"],
    ] {
        let o = node.run(args);
        assert_eq!(failure(&o), (1, expected.clone()), "{args:?}");
        assert!(o.stdout.is_empty());
    }
    let o = node.run(&["state", "web01", "--quiet"]);
    assert_eq!(failure(&o), (5, expected.clone()));
    assert!(o.stdout.is_empty());
    let o = node.run(&["--api", "127.0.0.1:1", "status"]);
    let (code, e) = failure(&o);
    assert_eq!(code, 1);
    assert!(e.contains("cannot reach the hamirror daemon at 127.0.0.1:1"), "{e}");
}

// genkey writes a 0600 key and prints its path; a second run refuses to overwrite it.
#[test]
fn cluster_genkey_creates_once() {
    let node = Node::new(false);
    let key = node.paths().cluster_key();
    let o = node.run(&["cluster", "genkey"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), key.display().to_string());
    assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let first = fs::read_to_string(&key).unwrap();
    assert_eq!(first.trim().len(), 64);

    let o = node.run(&["cluster", "genkey"]);
    let (code, e) = failure(&o);
    assert_eq!(code, 1);
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(fs::read_to_string(&key).unwrap(), first, "the key was overwritten");
}

// Installing the mirror template names the copy, gives it the lowest free id, keeps the
// scripts executable, and says the daemon will load it at its start; `module list --json`
// shows the modules.
#[test]
fn module_install_template_assigns_names_and_ids() {
    let node = Node::new(true);
    let o = node.run(&["module", "install", "mirror", "--name", "web01"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("installed module web01 (id 1)"), "{out}");
    assert!(stderr(&o).contains("when it starts"), "{}", stderr(&o));
    let paths = node.paths();
    let config = fs::read_to_string(paths.userconfig("web01")).unwrap();
    assert!(config.contains(r#"<module name="web01" mode="mirror" id="1">"#), "{config}");
    assert!(config.contains("APP_COMMAND"), "the rest of the file is kept");
    let mode = fs::metadata(paths.script("web01", "start_prim")).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111);

    let o = node.run(&["module", "install", "mirror", "--name", "app2"]);
    assert!(stdout(&o).contains("installed module app2 (id 2)"), "{}", stderr(&o));
    // Without --name the template's own name is used.
    let o = node.run(&["module", "install", "mirror"]);
    assert!(stdout(&o).contains("installed module mirror (id 3)"), "{}", stderr(&o));

    let o = node.run(&["module", "install", "mirror", "--name", "web01"]);
    let (code, e) = failure(&o);
    assert_eq!(code, 1);
    assert!(e.contains("module web01 is already installed"), "{e}");

    let o = node.run(&["module", "list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let list = list.as_array().unwrap();
    let summary: Vec<(String, u64, String)> = list
        .iter()
        .map(|m| {
            assert!(m["error"].is_null(), "{m}");
            assert_eq!(m["dir"].as_str().unwrap(), paths.module_dir(m["name"].as_str().unwrap()).to_str().unwrap());
            (m["name"].as_str().unwrap().into(), m["id"].as_u64().unwrap(), m["mode"].as_str().unwrap().into())
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("app2".to_string(), 2, "mirror".to_string()),
            ("mirror".to_string(), 3, "mirror".to_string()),
            ("web01".to_string(), 1, "mirror".to_string()),
        ]
    );
}

// A module that does not validate, or a home without cluster.xml, is refused and leaves no
// copy behind.
#[test]
fn module_install_refuses_invalid_modules() {
    let node = Node::new(true);
    let src = node.dir.path().join("src-module");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("userconfig.xml"), r#"<module name="x1" id="auto"><heart pulse="fast"/></module>"#).unwrap();
    let o = node.run(&["module", "install", src.to_str().unwrap()]);
    let (code, e) = failure(&o);
    assert_eq!(code, 1);
    assert!(e.contains("module x1 is refused") && e.contains("pulse"), "{e}");
    assert!(!node.paths().module_dir("x1").exists(), "the refused copy was kept");

    let o = node.run(&["module", "install", "no-such-template"]);
    let (code, e) = failure(&o);
    assert_eq!(code, 1);
    assert!(e.contains("no module directory or template named no-such-template") && e.contains("mirror"), "{e}");

    let o = node.run(&["module", "install", "mirror", "--name", "../evil"]);
    assert!(failure(&o).1.contains("not a valid module name"));

    let bare = Node::new(false);
    let o = bare.run(&["module", "install", "mirror", "--name", "web01"]);
    let (code, e) = failure(&o);
    assert_eq!(code, 1);
    assert!(e.contains("cluster.xml"), "{e}");
    assert!(!bare.paths().module_dir("web01").exists());
}

// remove refuses bad and unknown names, and deletes an installed module when no daemon runs.
#[test]
fn module_remove_checks_the_name() {
    let node = Node::new(true);
    for (name, words) in [
        ("../etc", "not a valid module name"),
        ("a/b", "not a valid module name"),
        ("nope", "no module named nope is installed"),
    ] {
        let o = node.run(&["module", "remove", name]);
        let (code, e) = failure(&o);
        assert_eq!(code, 1);
        assert!(e.contains(words), "{e}");
    }
    assert!(node.run(&["module", "install", "mirror", "--name", "web01"]).status.success());
    let o = node.run(&["module", "remove", "web01"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!node.paths().module_dir("web01").exists());
}

// `log` reads the module's log file directly, so it works without a daemon.
#[test]
fn log_reads_the_files_without_a_daemon() {
    let node = Node::new(true);
    assert!(node.run(&["module", "install", "mirror", "--name", "web01"]).status.success());
    let paths = node.paths();
    fs::create_dir_all(paths.log_dir()).unwrap();
    fs::write(paths.module_log("web01"), "a\nb\nc\n").unwrap();
    fs::write(paths.user_log("web01"), "u\n").unwrap();
    assert_eq!(stdout(&node.run(&["log", "web01", "-n", "2"])), "b\nc\n");
    assert_eq!(stdout(&node.run(&["log", "web01", "--user"])), "u\n");
    let (code, e) = failure(&node.run(&["log", "nope"]));
    assert_eq!(code, 1);
    assert!(e.contains("no module named nope"), "{e}");
}

fn snapshot(state: State) -> Snapshot {
    Snapshot {
        state,
        transition: None,
        wait_reason: None,
        role: Role::None,
        lans: vec![LanStatus { name: "default".into(), up: true }],
        peer: None,
        generation: None,
        in_sync: false,
        restarts_in_window: 0,
    }
}

/// A fake daemon serving a Control on the node's admin socket; stopped when dropped.
struct Daemon {
    rt: tokio::runtime::Runtime,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Daemon {
    /// `build` runs inside the runtime (the fake modules spawn their tasks there).
    fn start(node: &Node, build: impl FnOnce() -> Control) -> Daemon {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let control = Arc::new(RwLock::new(rt.block_on(async { build() })));
        let paths = node.paths();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = rt.spawn({
            let paths = paths.clone();
            async move {
                hamirror::api::serve(control, &paths, None, async move {
                    let _ = stop_rx.await;
                })
                .await
            }
        });
        let end = Instant::now() + DEADLINE;
        while !paths.socket().exists() {
            assert!(Instant::now() < end, "the admin socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon { rt, stop: Some(stop_tx), server: Some(server) }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let (Some(stop), Some(server)) = (self.stop.take(), self.server.take()) {
            let _ = stop.send(());
            let result = self.rt.block_on(server);
            if !std::thread::panicking() {
                result.unwrap().unwrap();
            }
        }
    }
}

fn handle(name: &str, snap: Snapshot, seen: Arc<Mutex<Vec<AdminCommand>>>) -> ModuleHandle {
    let (snap_tx, snap_rx) = watch::channel(snap);
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<ModuleRequest>(4);
    tokio::spawn(async move {
        let _keep = snap_tx;
        while let Some(req) = cmd_rx.recv().await {
            seen.lock().unwrap().push(req.command.clone());
            let _ = req.reply.send(Ok(()));
        }
    });
    let view = ModuleView {
        name: name.into(),
        id: Some(1),
        mode: Some(ModuleMode::Mirror),
        node: "hostA".into(),
        peer_node: Some("hostB".into()),
        status: None,
        error: None,
        heartbeats_rejected: None,
        replication: None,
    };
    ModuleHandle { view, snapshot: snap_rx, commands: cmd_tx, rejected: None, replication: None, verify: None }
}

// With a daemon on the socket: `state` exits with the state's code, `status` prints the
// table with the wait reason, `--json` the daemon's JSON, commands reach the module, and
// `module remove` refuses a module that is not stopped.
#[test]
fn client_commands_talk_to_the_daemon() {
    let node = Node::new(true);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut waiting = snapshot(State::Wait);
    waiting.wait_reason = Some(WaitReason::StaleData);
    let daemon = Daemon::start(&node, || {
        let mut c = Control { node: "hostA".into(), ..Control::default() };
        c.running.insert("web01".into(), handle("web01", snapshot(State::Prim), seen.clone()));
        c.running.insert("db".into(), handle("db", waiting, seen.clone()));
        let (reload_tx, mut reload_rx) = mpsc::channel::<oneshot::Sender<ReloadReport>>(1);
        tokio::spawn(async move {
            while let Some(reply) = reload_rx.recv().await {
                let _ = reply.send(ReloadReport::default());
            }
        });
        c.reload = Some(reload_tx);
        c
    });
    let paths = node.paths();

    let o = node.run(&["state", "web01", "--quiet"]);
    assert_eq!((o.status.code(), stdout(&o)), (Some(3), String::new()));
    let o = node.run(&["state", "db"]);
    assert_eq!((o.status.code(), stdout(&o)), (Some(1), "WAIT\n".to_string()));
    let o = node.run(&["state", "nope", "-q"]);
    assert_eq!(failure(&o), (6, "hamirror: no module named nope is installed".to_string()));

    let o = node.run(&["status"]);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("MODULE") && lines[0].contains("PEER STATE"), "{out}");
    assert!(lines[1].starts_with("db") && lines[1].contains("WAIT") && lines[1].contains("1/1"), "{out}");
    assert!(lines[2].starts_with("    ") && lines[2].contains("older than the peer's"), "{out}");
    assert!(lines[3].starts_with("web01") && lines[3].contains("PRIM"), "{out}");
    let o = node.run(&["status", "web01", "--json"]);
    let v: ModuleView = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.status.unwrap().state, State::Prim);

    let o = node.run(&["prim", "db", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("db: prim accepted"));
    assert_eq!(seen.lock().unwrap().clone(), [AdminCommand::Prim { force: true }]);

    assert!(node.run(&["module", "install", "mirror", "--name", "web01"]).status.success());
    let o = node.run(&["module", "remove", "web01"]);
    let (code, e) = failure(&o);
    assert_eq!(code, 1);
    assert!(e.contains("module web01 is PRIM on this node: stop it first"), "{e}");
    assert!(paths.module_dir("web01").exists());
    drop(daemon);
}

/// The test's hold on a replicated module: its state and replication, which it changes while
/// the binary follows them.
struct Replicated {
    snapshot: Arc<watch::Sender<Snapshot>>,
    replication: Arc<watch::Sender<ReplicationView>>,
}

/// A module with a replication view, answering `verify` with `answer`. Like the machine, it
/// refuses `second --full` on a primary and otherwise marks its data out of date.
fn replicated(
    name: &str,
    snap: Snapshot,
    rep: Option<ReplicationView>,
    answer: Result<VerifyReport, String>,
    seen: Arc<Mutex<Vec<AdminCommand>>>,
) -> (ModuleHandle, Replicated) {
    let (snap_tx, snap_rx) = watch::channel(snap);
    let snap_tx = Arc::new(snap_tx);
    let (rep_tx, rep_rx) = watch::channel(rep.clone().unwrap_or_default());
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<ModuleRequest>(4);
    let (verify_tx, mut verify_rx) = mpsc::channel::<VerifyRequest>(4);
    let (module, snap) = (name.to_string(), snap_tx.clone());
    tokio::spawn(async move {
        while let Some(req) = cmd_rx.recv().await {
            seen.lock().unwrap().push(req.command.clone());
            let answer = match req.command {
                AdminCommand::Second { full: true } if snap.borrow().state.is_primary() => Err(CommandError::Refused {
                    module: module.clone(),
                    command: "second",
                    why: "--full applies to a secondary; swap first, then run `second --full` there".into(),
                }),
                AdminCommand::Second { full: true } => {
                    snap.send_modify(|s| s.in_sync = false);
                    Ok(())
                }
                _ => Ok(()),
            };
            let _ = req.reply.send(answer);
        }
    });
    tokio::spawn(async move {
        while let Some(reply) = verify_rx.recv().await {
            let _ = reply.send(answer.clone());
        }
    });
    let mut handle = handle(name, snapshot(State::Stop), Arc::new(Mutex::new(Vec::new())));
    handle.snapshot = snap_rx;
    handle.commands = cmd_tx;
    if rep.is_some() {
        handle.replication = Some(rep_rx);
        handle.verify = Some(verify_tx);
    }
    (handle, Replicated { snapshot: snap_tx, replication: Arc::new(rep_tx) })
}

fn with_state(state: State, in_sync: bool) -> Snapshot {
    Snapshot { in_sync, ..snapshot(state) }
}

fn source(connected: bool) -> ReplicationView {
    ReplicationView { role: DataRole::Source, mode: "sync".into(), connected, ..Default::default() }
}

fn target() -> ReplicationView {
    ReplicationView { role: DataRole::Target, mode: "sync".into(), ..Default::default() }
}

fn running(full: bool, done: u64, total: u64, sent: u64, elapsed_ms: u64) -> Option<ResyncView> {
    Some(ResyncView {
        full,
        bytes_done: done,
        bytes_total: total,
        files_done: 1,
        files_total: 4,
        bytes_sent: sent,
        elapsed_ms,
        pass: 1,
    })
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn report(differences: Vec<Difference>) -> VerifyReport {
    VerifyReport { files_compared: 3, bytes_compared: 2 << 30, elapsed_ms: 64_000, differences, truncated: false }
}

// verify: identical copies print one line and exit 0; different ones one line per difference,
// then the count on stderr and exit 1; --json prints the report; errors are one sentence.
#[test]
fn verify_prints_the_differences() {
    let node = Node::new(true);
    let differences = vec![
        Difference {
            dir: "/srv/web02".into(),
            path: "disk.img".into(),
            kind: DifferenceKind::Content,
            ranges: vec![(0, 4096), (1_048_576, 1_052_672)],
        },
        Difference {
            dir: "/srv/web02".into(),
            path: "new.txt".into(),
            kind: DifferenceKind::MissingOnSecondary,
            ranges: vec![],
        },
    ];
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut keep = Vec::new();
    let daemon = Daemon::start(&node, || {
        let mut c = Control { node: "hostA".into(), ..Control::default() };
        for (name, rep, answer) in [
            ("web01", Some(source(true)), Ok(report(vec![]))),
            ("web02", Some(source(true)), Ok(report(differences.clone()))),
            ("web03", Some(source(false)), Err("the peer is not connected".to_string())),
            ("plain", None, Ok(report(vec![]))),
        ] {
            let (h, r) = replicated(name, with_state(State::Prim, false), rep, answer, seen.clone());
            c.running.insert(name.into(), h);
            keep.push(r);
        }
        c
    });

    let o = node.run(&["verify", "web01"]);
    assert_eq!(
        (o.status.code(), stdout(&o), stderr(&o)),
        (Some(0), "web01: both copies are identical (3 files, 2 GiB compared in 1 min 4 s)\n".into(), String::new())
    );
    let o = node.run(&["verify", "web02"]);
    assert_eq!(
        stdout(&o),
        "/srv/web02/disk.img: content differs in 2 ranges (8 KiB): 0..4096, 1048576..1052672\n\
         /srv/web02/new.txt: missing on the secondary\n"
    );
    assert_eq!(failure(&o), (1, "hamirror: web02: the two copies differ in 2 places".into()));
    let o = node.run(&["verify", "web02", "--json"]);
    assert_eq!(serde_json::from_slice::<VerifyReport>(&o.stdout).unwrap(), report(differences.clone()));
    assert_eq!(failure(&o).0, 1);
    let o = node.run(&["verify", "web01", "--json"]);
    assert_eq!(
        (o.status.code(), serde_json::from_slice::<VerifyReport>(&o.stdout).unwrap()),
        (Some(0), report(vec![]))
    );

    for (module, expected) in [
        ("web03", "hamirror: verify of module web03 failed: the peer is not connected"),
        ("plain", "hamirror: module plain replicates no directory: there is nothing to verify"),
        ("nope", "hamirror: no module named nope is installed"),
    ] {
        let o = node.run(&["verify", module]);
        assert_eq!(failure(&o), (1, expected.to_string()), "{module}");
        assert!(o.stdout.is_empty());
    }
    assert!(seen.lock().unwrap().is_empty(), "verify sent a command");
    drop(daemon);
}

// resync --json follows the replication view the test drives: one line per change, a warning
// for a failed pass, and exit 0 once this node's data is in sync.
#[test]
fn resync_follows_until_in_sync() {
    let node = Node::new(true);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut start = with_state(State::Second, false);
    start.transition = Some(Transition::Resyncing);
    let first = ReplicationView { resync: running(false, 10 << 20, 100 << 20, 5 << 20, 1000), ..target() };
    let mut module = None;
    let daemon = Daemon::start(&node, || {
        let mut c = Control { node: "hostA".into(), ..Control::default() };
        let (h, r) = replicated("web02", start, Some(first.clone()), Ok(report(vec![])), seen.clone());
        c.running.insert("web02".into(), h);
        module = Some(r);
        c
    });
    let module = module.unwrap();
    let mut cli = node.spawn(&["resync", "web02", "--json"]);
    let read = |line: String| serde_json::from_str::<ReplicationView>(&line).unwrap();
    assert_eq!(read(cli.next_line()), first);

    let later = ReplicationView { resync: running(false, 60 << 20, 100 << 20, 30 << 20, 4000), ..target() };
    module.replication.send_replace(later.clone());
    assert_eq!(read(cli.next_line()), later);

    let failed = ResyncSummary {
        ok: false,
        full: false,
        bytes_sent: 30 << 20,
        bytes_examined: 60 << 20,
        elapsed_ms: 4000,
        ended_at: now(),
        error: Some("the peer went away".into()),
    };
    let retried = ReplicationView { last_resync: Some(failed.clone()), ..later.clone() };
    module.replication.send_replace(retried.clone());
    assert_eq!(read(cli.next_line()), retried);
    cli.wait_stderr(|l| l == "hamirror: web02: resync failed: the peer went away; it is retried automatically");

    // The resync ends, then the machine says the data is in sync.
    let ended =
        ResyncSummary { ok: true, bytes_sent: 42 << 20, elapsed_ms: 9000, ended_at: now(), error: None, ..failed };
    let done = ReplicationView { resync: None, last_resync: Some(ended), ..target() };
    module.replication.send_replace(done.clone());
    assert_eq!(read(cli.next_line()), done);
    module.snapshot.send_replace(with_state(State::Second, true));
    let (status, out, err) = cli.finish();
    assert!(status.success(), "{err:?}");
    assert!(out.is_empty(), "no line after the last change: {out:?}");
    assert_eq!(err, ["hamirror: web02: resync failed: the peer went away; it is retried automatically"]);
    assert!(seen.lock().unwrap().is_empty(), "resync without --full sent a command");
    drop(daemon);
}

// resync --full asks for a full resync first, then (stderr not a terminal) prints plain
// progress lines and ends with the summary on stdout.
#[test]
fn resync_full_asks_then_follows_with_plain_lines() {
    let node = Node::new(true);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut module = None;
    let daemon = Daemon::start(&node, || {
        let mut c = Control { node: "hostA".into(), ..Control::default() };
        let (h, r) =
            replicated("web03", with_state(State::Second, true), Some(target()), Ok(report(vec![])), seen.clone());
        c.running.insert("web03".into(), h);
        module = Some(r);
        c
    });
    let module = module.unwrap();
    let mut cli = node.spawn(&["resync", "web03", "--full"]);
    // The module marked its data out of date when it took the command.
    let end = Instant::now() + DEADLINE;
    while seen.lock().unwrap().is_empty() {
        assert!(Instant::now() < end, "second --full never came");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(seen.lock().unwrap().clone(), [AdminCommand::Second { full: true }]);
    let resyncing = ReplicationView { resync: running(true, 40 << 20, 100 << 20, 40 << 20, 2000), ..target() };
    module.replication.send_replace(resyncing);
    let line = cli.wait_stderr(|l| l.starts_with("web03: resyncing"));
    assert_eq!(line, "web03: resyncing 40% (full, 40 MiB of 100 MiB, pass 1), 20 MiB/s, ETA 3 s, files 1/4");

    let ended = ResyncSummary {
        ok: true,
        full: true,
        bytes_sent: 40 << 20,
        bytes_examined: 100 << 20,
        elapsed_ms: 2500,
        ended_at: now(),
        error: None,
    };
    module.replication.send_replace(ReplicationView { last_resync: Some(ended), ..target() });
    module.snapshot.send_replace(with_state(State::Second, true));
    let (status, out, err) = cli.finish();
    assert!(status.success(), "{err:?}");
    assert_eq!(out, ["web03: in sync (resync sent 40 MiB in 2.5 s)"]);
    assert!(err.iter().all(|l| l.starts_with("web03: ")), "{err:?}");
    drop(daemon);
}

// resync ends at once on a primary with an in-sync peer, and fails in one sentence where
// there is nothing to follow: a stopped or blocked module, no replication, --full refused.
#[test]
fn resync_exits_where_there_is_nothing_to_follow() {
    let node = Node::new(true);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut stale = with_state(State::Wait, false);
    stale.wait_reason = Some(WaitReason::StaleData);
    let mut keep = Vec::new();
    let daemon = Daemon::start(&node, || {
        let mut c = Control { node: "hostA".into(), ..Control::default() };
        for (name, snap, rep) in [
            ("web01", with_state(State::Prim, false), Some(source(true))),
            ("stopped", with_state(State::Stop, false), Some(ReplicationView::default())),
            ("stale", stale, Some(ReplicationView::default())),
            ("plain", with_state(State::Second, true), None),
        ] {
            let (h, r) = replicated(name, snap, rep, Ok(report(vec![])), seen.clone());
            c.running.insert(name.into(), h);
            keep.push(r);
        }
        c
    });
    let o = node.run(&["resync", "web01"]);
    assert_eq!((o.status.code(), stdout(&o)), (Some(0), "web01: in sync (no resync was running)\n".into()));
    for (args, expected) in [
        (
            &["resync", "stopped"][..],
            "hamirror: stopped is STOP on this node: nothing to follow (start it, or run this on a node where it runs)",
        ),
        (
            &["resync", "stale", "--json"],
            "hamirror: stale is WAIT on this node: nothing to follow (start it, or run this on a node where it runs)",
        ),
        (&["resync", "plain"], "hamirror: module plain replicates no directory"),
        (&["resync", "nope"], "hamirror: no module named nope is installed"),
        (
            &["resync", "web01", "--full"],
            "hamirror: module web01 cannot second now: --full applies to a secondary; swap first, then run `second --full` there",
        ),
    ] {
        let o = node.run(args);
        assert_eq!(failure(&o), (1, expected.to_string()), "{args:?}");
    }
    // `--json` printed the view it read before it gave up.
    let o = node.run(&["resync", "stale", "--json"]);
    assert_eq!(serde_json::from_slice::<ReplicationView>(&o.stdout).unwrap(), ReplicationView::default());
    assert_eq!(seen.lock().unwrap().clone(), [AdminCommand::Second { full: true }]);
    drop(daemon);
}

// status shows what each module's data is doing in the DATA column, and below the row why
// the peer gets nothing and where a split brain put this node's files.
#[test]
fn status_shows_the_replication() {
    let node = Node::new(true);
    let seen = Arc::new(Mutex::new(Vec::new()));
    // 2.7 GiB, 45% of it done.
    let (total, done) = (2_900_000_000, 1_305_000_000);
    let mut keep = Vec::new();
    let daemon = Daemon::start(&node, || {
        let mut c = Control { node: "hostA".into(), ..Control::default() };
        let lagging = ReplicationView { lag: LagView { ops: 3, bytes: 12 << 10, oldest_ms: Some(4) }, ..source(true) };
        let resyncing = ReplicationView { resync: running(true, done, total, 0, 1000), ..target() };
        let alone = ReplicationView {
            dirty_zones: 12,
            dirty_bytes: 12 << 20,
            absent_reason: Some("the replication lan is down".into()),
            ..source(false)
        };
        let saved = ReplicationView { split_brain_saved: Some("/var/lib/hamirror/sb/db".into()), ..target() };
        for (name, snap, rep) in [
            ("a-lag", with_state(State::Prim, false), Some(lagging)),
            ("b-resync", with_state(State::Second, false), Some(resyncing)),
            ("c-alone", with_state(State::Alone, false), Some(alone)),
            ("d-saved", with_state(State::Second, true), Some(saved)),
            ("e-plain", with_state(State::Prim, false), None),
        ] {
            let (h, r) = replicated(name, snap, rep, Ok(report(vec![])), seen.clone());
            c.running.insert(name.into(), h);
            keep.push(r);
        }
        c
    });
    let o = node.run(&["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("MODULE") && lines[0].ends_with("GENERATION  DATA"), "{out}");
    let expect = [
        ("a-lag", "lag 3 ops / 12 KiB"),
        ("b-resync", "resyncing 45% (full, 1.2 GiB of 2.7 GiB, pass 1)"),
        ("c-alone", "alone: 12 MiB to resync"),
        ("    not connected: the replication lan is down", ""),
        ("d-saved", "in sync"),
        ("    split brain: this node's divergent files were saved in /var/lib/hamirror/sb/db", ""),
        ("e-plain", "  -"),
    ];
    assert_eq!(lines.len(), expect.len() + 1, "{out}");
    for (line, (start, end)) in lines[1..].iter().zip(expect) {
        assert!(line.starts_with(start) && line.ends_with(end), "{line:?} in\n{out}");
    }
    let o = node.run(&["status", "c-alone", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["replication"]["dirty_bytes"], 12 << 20);
    assert_eq!(v["replication"]["absent_reason"], "the replication lan is down");
    drop(daemon);
}
