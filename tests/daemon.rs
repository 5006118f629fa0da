//! Two real daemons on loopback (hostA = 127.0.0.1, hostB = 127.0.0.2): shutdown, restart,
//! module isolation and forged heartbeats, without the namespace lab.

mod support;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::lab::wait_until;

const BIN: &str = env!("CARGO_BIN_EXE_hamirror");
const DEADLINE: Duration = Duration::from_secs(30);

struct Node {
    name: &'static str,
    home: PathBuf,
    state: PathBuf,
    daemon: Option<Child>,
}

impl Node {
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(["--home", self.home.to_str().unwrap(), "--state-dir", self.state.to_str().unwrap()])
            .args(args)
            .env("HAMIRROR_NODE", self.name)
            .output()
            .expect("run hamirror")
    }

    fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.state.join("daemon.out")).unwrap();
        let child = Command::new(BIN)
            .args(["--home", self.home.to_str().unwrap(), "--state-dir", self.state.to_str().unwrap()])
            .args(["daemon", "--listen", "none"])
            .env("HAMIRROR_NODE", self.name)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.daemon = Some(child);
        wait_until(&format!("{}'s daemon answers", self.name), DEADLINE, || {
            self.cli(&["status"]).status.success().then_some(())
        });
    }

    /// The module's state as `status --json` shows it ("PRIM", ...), or its config error.
    fn state(&self, module: &str) -> Option<String> {
        let out = self.cli(&["status", module, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["status"]["state"].as_str().map(str::to_string)
    }

    fn status_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.cli(&["status", "--json"]).stdout).expect("status --json")
    }

    fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut child = self.daemon.take().expect("daemon running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .expect("SIGTERM");
        wait_until("the daemon exits after SIGTERM", DEADLINE, || child.try_wait().ok().flatten())
    }

    fn user_log(&self, module: &str) -> String {
        std::fs::read_to_string(self.state.join("log").join(format!("{module}.user.log"))).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Applications started by the mirror template run in their own process group.
        let _ = Command::new("pkill").args(["-f", &format!("hamirror-test-app {}", self.home.display())]).status();
    }
}

/// A pair sharing one cluster key; modules are (name, id, valid?).
fn pair(dir: &Path, modules: &[(&str, u16, bool)]) -> (Node, Node) {
    let cluster = r#"<cluster name="loop">
  <lan name="default">
    <node name="hostA" addr="127.0.0.1"/>
    <node name="hostB" addr="127.0.0.2"/>
  </lan>
</cluster>"#;
    let mut nodes = Vec::new();
    for name in ["hostA", "hostB"] {
        let home = dir.join(name).join("etc");
        let state = dir.join(name).join("state");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(home.join("cluster.xml"), cluster).unwrap();
        nodes.push(Node { name, home, state, daemon: None });
    }
    let out = nodes[0].cli(&["cluster", "genkey"]);
    assert!(out.status.success(), "genkey: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::copy(nodes[0].home.join("cluster.key"), nodes[1].home.join("cluster.key")).unwrap();
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("app-modules/mirror/bin");
    for node in &nodes {
        for (module, id, valid) in modules {
            let dir = node.home.join("modules").join(module);
            std::fs::create_dir_all(dir.join("bin")).unwrap();
            for script in ["start_prim", "stop_prim"] {
                std::fs::copy(template.join(script), dir.join("bin").join(script)).unwrap();
            }
            let heart =
                if *valid { r#"<heart pulse="100ms" timeout="1s"/>"# } else { r#"<heart pulse="100ms" timout="1s"/>"# };
            // $0 of the loop names the test, so that Drop can find it with pkill -f.
            let app = format!("exec sh -c 'while sleep 1; do :; done' hamirror-test-app {}", node.home.display());
            std::fs::write(
                dir.join("userconfig.xml"),
                format!(
                    r#"<module name="{module}" id="{id}">
  {heart}
  <user><var name="APP_COMMAND" value="{app}"/></user>
</module>"#
                ),
            )
            .unwrap();
        }
    }
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    (a, b)
}

/// A pair with both daemons running and `module` started on both, settled in PRIM/SECOND;
/// returns the nodes and their states (hostA's first).
fn running_pair(dir: &Path, modules: &[(&str, u16, bool)], module: &str) -> (Node, Node, String, String) {
    let (mut a, mut b) = pair(dir, modules);
    a.start_daemon();
    b.start_daemon();
    assert!(a.cli(&["start", module]).status.success());
    assert!(b.cli(&["start", module]).status.success());
    let (sa, sb) = wait_roles(&a, &b, module);
    (a, b, sa, sb)
}

fn wait_roles(a: &Node, b: &Node, module: &str) -> (String, String) {
    wait_until(&format!("{module} PRIM/SECOND"), DEADLINE, || {
        let sa = a.state(module)?;
        let sb = b.state(module)?;
        let mut both = [sa.clone(), sb.clone()];
        both.sort();
        (both == ["PRIM", "SECOND"]).then_some((sa, sb))
    })
}

// Proves SIGTERM stops a primary's module (stop scripts run, the peer takes over at once)
// and that the restarted daemon resumes the module, which joins as secondary.
#[test]
fn sigterm_stops_modules_and_a_restarted_daemon_resumes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b, sa, _) = running_pair(dir.path(), &[("app", 41, true)], "app");
    let (prim, second) = if sa == "PRIM" { (&mut a, &mut b) } else { (&mut b, &mut a) };

    let status = prim.sigterm();
    assert!(status.success(), "the daemon exits cleanly after SIGTERM: {status:?}");
    assert!(prim.user_log("app").contains("stop_prim: started"), "stop_prim ran on shutdown");
    assert!(!prim.state.join("hamirror.sock").exists(), "the admin socket is removed");
    wait_until("the secondary takes over", DEADLINE, || (second.state("app")? == "ALONE").then_some(()));

    prim.start_daemon();
    wait_until("the restarted node resumes the module as SECOND", DEADLINE, || {
        (prim.state("app")? == "SECOND" && second.state("app")? == "PRIM").then_some(())
    });
}

// Proves a module whose configuration is refused is reported while the others run.
#[test]
fn a_module_with_a_bad_config_does_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _b, _, _) = running_pair(dir.path(), &[("good", 42, true), ("bad", 43, false)], "good");
    let all = a.status_json();
    let bad = all.as_array().unwrap().iter().find(|m| m["name"] == "bad").expect("bad module listed");
    let error = bad["error"].as_str().expect("an error sentence");
    assert!(error.contains("timout") && error.contains("did you mean \"timeout\""), "error: {error}");
    let out = a.cli(&["start", "bad"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("configuration"), "{}", String::from_utf8_lossy(&out.stderr));
}

// Proves forged, garbage and truncated datagrams on a module's heartbeat port are dropped,
// counted, and change nothing.
#[test]
fn forged_heartbeats_are_counted_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, sa, sb) = running_pair(dir.path(), &[("hb", 44, true)], "hb");
    let port = 10000 + 4 * 44;
    let sock = UdpSocket::bind("127.0.0.2:0").unwrap();
    let mut forged = b"HAMR\x01\x01".to_vec();
    forged.extend(std::iter::repeat_n(0xAB, 200));
    for payload in [&b"garbage"[..], &forged[..], &forged[..40]] {
        sock.send_to(payload, ("127.0.0.1", port)).unwrap();
    }
    let counted = wait_until("hostA counts the forged datagrams", DEADLINE, || {
        let all = a.status_json();
        let r = &all.as_array()?.iter().find(|m| m["name"] == "hb")?["heartbeats_rejected"];
        let total: u64 =
            r.as_object()?.iter().filter(|(k, _)| !k.ends_with("errors")).filter_map(|(_, v)| v.as_u64()).sum();
        (total >= 3).then_some(total)
    });
    assert!(counted >= 3);
    assert_eq!(a.state("hb"), Some(sa));
    assert_eq!(b.state("hb"), Some(sb));
}

// Proves a second daemon on the same node is refused with one sentence and the running one
// keeps its role (its heartbeats are not made stale by the newcomer's epoch).
#[test]
fn a_second_daemon_on_the_same_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, sa, sb) = running_pair(dir.path(), &[("dup", 45, true)], "dup");
    let out = Command::new(BIN)
        .args(["--home", a.home.to_str().unwrap(), "--state-dir", a.state.to_str().unwrap()])
        .args(["daemon", "--listen", "none"])
        .env("HAMIRROR_NODE", a.name)
        .output()
        .expect("run a second daemon");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another hamirror daemon"), "stderr: {err}");
    // Several timeouts later both still hold their roles.
    let settle = std::time::Instant::now() + Duration::from_secs(3);
    wait_until("three seconds of stable roles", DEADLINE, || {
        assert_eq!(a.state("dup").as_deref(), Some(sa.as_str()));
        assert_eq!(b.state("dup").as_deref(), Some(sb.as_str()));
        (std::time::Instant::now() >= settle).then_some(())
    });
}
