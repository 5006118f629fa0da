//! The `hamirror` binary as an administrator runs it: without a daemon, with a fake daemon
//! on the admin socket, and the file commands (cluster genkey, module install/list/remove).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use hamirror::config::ModuleMode;
use hamirror::daemon::control::{Control, ModuleHandle, ModuleRequest, ModuleView, ReloadReport};
use hamirror::module::{AdminCommand, LanStatus, Role, Snapshot, State, WaitReason};
use hamirror::paths::Paths;
use tokio::sync::{mpsc, oneshot, watch, RwLock};

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
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_hamirror"))
            .args(args)
            .env("HAMIRROR_HOME", self.home())
            .env("HAMIRROR_STATE_DIR", self.dir.path().join("state"))
            .env("HAMIRROR_TEMPLATES", Path::new(env!("CARGO_MANIFEST_DIR")).join("app-modules"))
            .env_remove("HAMIRROR_NODE")
            .env_remove("HAMIRROR_TOKEN")
            .output()
            .unwrap()
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
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut waiting = snapshot(State::Wait);
    waiting.wait_reason = Some(WaitReason::StaleData);
    let control = rt.block_on(async {
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
        Arc::new(RwLock::new(c))
    });
    let paths = node.paths();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = rt.spawn({
        let (control, paths) = (control.clone(), paths.clone());
        async move {
            hamirror::api::serve(control, &paths, None, async move {
                let _ = stop_rx.await;
            })
            .await
        }
    });
    for _ in 0..500 {
        if paths.socket().exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

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

    stop_tx.send(()).unwrap();
    rt.block_on(server).unwrap().unwrap();
}
