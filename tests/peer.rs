//! The peer service of a real daemon on loopback: what `vm register` and VM modules ask the
//! other node, and what a stranger or garbage gets (nothing changed, the service goes on).

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hamirror::cluster::{load_key, ClusterKey};
use hamirror::config::parse_cluster;
use hamirror::hypervisor::DomainState;
use hamirror::peer::{ModuleFile, PeerAnswer, PeerClient, PeerRequest, PEER_PORT};
use support::lab::wait_until;

const BIN: &str = env!("CARGO_BIN_EXE_hamirror");
const DEADLINE: Duration = Duration::from_secs(30);
const CALL: Duration = Duration::from_secs(10);

/// hostA's daemon on a loopback address of its own; the test plays hostB.
struct Daemon {
    home: PathBuf,
    cluster: String,
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        // A loopback address no other test uses, so that port 10000 is ours.
        let a = format!("127.{}.{}.1", 100 + std::process::id() % 100, rand_octet());
        let cluster = format!(
            r#"<cluster name="peer"><lan name="default"><node name="hostA" addr="{a}"/><node name="hostB" addr="127.0.0.2"/></lan></cluster>"#
        );
        let home = dir.join("etc");
        let state = dir.join("state");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(home.join("cluster.xml"), &cluster).unwrap();
        let cli = |args: &[&str]| {
            Command::new(BIN)
                .args(["--home", home.to_str().unwrap(), "--state-dir", state.to_str().unwrap()])
                .args(args)
                .env("HAMIRROR_NODE", "hostA")
                .output()
                .unwrap()
        };
        assert!(cli(&["cluster", "genkey"]).status.success());
        let log = std::fs::File::create(state.join("daemon.out")).unwrap();
        let child = Command::new(BIN)
            .args(["--home", home.to_str().unwrap(), "--state-dir", state.to_str().unwrap()])
            .args(["daemon", "--listen", "none"])
            .env("HAMIRROR_NODE", "hostA")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon { home, cluster, child };
        wait_until("the daemon's peer service answers", DEADLINE, || d.client().ok());
        d
    }

    fn key(&self) -> ClusterKey {
        load_key(&self.home.join("cluster.key")).unwrap()
    }

    fn client_with(&self, key: &ClusterKey) -> Result<PeerClient, String> {
        let cluster = parse_cluster(&self.cluster, Path::new("cluster.xml")).unwrap();
        PeerClient::connect(&cluster, key, "hostB", "hostA", Duration::from_secs(2))
    }

    fn client(&self) -> Result<PeerClient, String> {
        self.client_with(&self.key())
    }

    fn addr(&self) -> String {
        let start = self.cluster.find("addr=\"").unwrap() + 6;
        let end = self.cluster[start..].find('"').unwrap() + start;
        format!("{}:{PEER_PORT}", &self.cluster[start..end])
    }

    fn modules(&self) -> Vec<String> {
        match self.client().unwrap().call(&PeerRequest::Modules, CALL).unwrap() {
            PeerAnswer::Modules(m) => m.into_iter().map(|m| m.name).collect(),
            other => panic!("unexpected answer {other:?}"),
        }
    }
}

fn rand_octet() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    1 + t % 250
}

fn file(path: &str, text: &str) -> ModuleFile {
    ModuleFile { path: path.into(), mode: 0o644, data: text.as_bytes().to_vec() }
}

const USERCONFIG: &str = r#"<module name="web01" mode="mirror" id="7"><heart pulse="100ms" timeout="1s"/></module>"#;

// A module sent by the peer is validated, installed and loaded (STOP); it can be removed.
// Bad input is refused with one sentence and installs nothing.
#[test]
fn install_and_remove_a_module() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut c = d.client().unwrap();
    let install = |files: Vec<ModuleFile>| PeerRequest::InstallModule { name: "web01".into(), files };

    let e = c.call(&install(vec![file("../escape", "x"), file("userconfig.xml", USERCONFIG)]), CALL).unwrap_err();
    assert_eq!(e, "\"../escape\" is not a plain relative path inside a module directory");
    let e = c.call(&install(vec![file("bin/start_prim", "#!/bin/sh\n")]), CALL).unwrap_err();
    assert_eq!(e, "module web01 has no userconfig.xml");
    let e = c.call(&install(vec![file("userconfig.xml", "<module name=\"web01\" id=\"x\"/>")]), CALL).unwrap_err();
    assert!(e.contains("userconfig.xml") && e.contains("id"), "{e}");
    let other = USERCONFIG.replace("web01", "web02");
    let e = c.call(&install(vec![file("userconfig.xml", &other)]), CALL).unwrap_err();
    assert_eq!(e, "its userconfig.xml names the module \"web02\", not \"web01\"");
    let e = c.call(&PeerRequest::InstallModule { name: "../x".into(), files: vec![] }, CALL).unwrap_err();
    assert!(e.contains("not a valid module name"), "{e}");
    assert!(!d.home.join("modules/web01").exists(), "a refused install left files");
    assert!(!d.home.join("../x").exists());

    let script = ModuleFile { path: "bin/start_prim".into(), mode: 0o755, data: b"#!/bin/sh\nexit 0\n".to_vec() };
    assert_eq!(c.call(&install(vec![file("userconfig.xml", USERCONFIG), script]), CALL), Ok(PeerAnswer::Done));
    assert_eq!(d.modules(), vec!["web01".to_string()]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.home.join("modules/web01/bin/start_prim")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o755);
    // Installing again replaces the directory (registration is idempotent).
    assert_eq!(c.call(&install(vec![file("userconfig.xml", USERCONFIG)]), CALL), Ok(PeerAnswer::Done));
    assert!(!d.home.join("modules/web01/bin/start_prim").exists());

    // A module the daemon refuses (its id is taken) is not left installed; the one in place stays.
    let web02 = USERCONFIG.replace("web01", "web02");
    let e = c
        .call(&PeerRequest::InstallModule { name: "web02".into(), files: vec![file("userconfig.xml", &web02)] }, CALL)
        .unwrap_err();
    assert!(e.contains("refused") && e.contains("id 7"), "{e}");
    assert!(!d.home.join("modules/web02").exists(), "a refused module was left installed");
    assert_eq!(d.modules(), vec!["web01".to_string()]);

    assert_eq!(c.call(&PeerRequest::RemoveModule { name: "web01".into() }, CALL), Ok(PeerAnswer::Done));
    assert!(d.modules().is_empty());
}

// A client without the cluster key is refused before any request is read; garbage bytes end
// their connection; the service goes on answering the real peer.
#[test]
fn strangers_and_garbage_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let e = d.client_with(&ClusterKey::generate()).err().expect("another key must be refused");
    assert!(e.contains("does not answer") || e.contains("authentic"), "{e}");
    let mut garbage = TcpStream::connect(d.addr()).unwrap();
    let _ = garbage.write_all(&[0x55; 4096]);
    drop(garbage);
    assert!(d.modules().is_empty());
}

// The peer's hypervisor is asked through the service (libvirt's built-in test driver: its
// domain "test" runs); an unknown URI scheme or domain is one sentence, not a crash.
#[test]
fn domain_state_through_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut c = d.client().unwrap();
    let ask = |name: &str| PeerRequest::DomainState { uri: "test:///default".into(), name: name.into() };
    assert_eq!(c.call(&ask("test"), CALL), Ok(PeerAnswer::DomainState(DomainState::Running)));
    assert_eq!(c.call(&ask("nope"), CALL), Ok(PeerAnswer::DomainState(DomainState::Undefined)));
}
