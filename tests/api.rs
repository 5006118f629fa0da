//! The admin HTTP API against a hand-built Control whose modules are fake tasks: every
//! endpoint, status codes, bad requests, the token on TCP, the health check, verify, and
//! `serve`.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hamirror::api::{router, serve};
use hamirror::cli::client::{Client, Endpoint, Response};
use hamirror::config::ModuleMode;
use hamirror::daemon::control::{Control, ModuleHandle, ModuleRequest, ModuleView, ReloadReport, VerifyRequest};
use hamirror::module::{AdminCommand, CommandError, LanStatus, Role, Snapshot, State, Transition};
use hamirror::paths::Paths;
use hamirror::replication::status::{DataRole, Difference, DifferenceKind, ReplicationView, VerifyReport};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch, RwLock};

const TOKEN: &str = "s3cret-token";

fn snapshot(state: State) -> Snapshot {
    Snapshot {
        state,
        transition: None,
        wait_reason: None,
        role: Role::None,
        lans: vec![LanStatus { name: "default".into(), up: true }, LanStatus { name: "replication".into(), up: false }],
        peer: None,
        generation: None,
        in_sync: false,
        restarts_in_window: 0,
    }
}

fn view(name: &str, error: Option<&str>) -> ModuleView {
    ModuleView {
        name: name.into(),
        id: Some(1),
        mode: Some(ModuleMode::Mirror),
        node: "hostA".into(),
        peer_node: Some("hostB".into()),
        status: None,
        error: error.map(str::to_string),
        heartbeats_rejected: None,
        replication: None,
    }
}

/// The fake daemon: what the modules were asked, and the knobs of their state.
struct Fake {
    control: Arc<RwLock<Control>>,
    seen: Arc<Mutex<Vec<(String, AdminCommand)>>>,
    web01: watch::Sender<Snapshot>,
    _dir: tempfile::TempDir,
    log_dir: std::path::PathBuf,
}

/// A running module answering like a machine would: `start` is refused (already running),
/// everything else is accepted.
fn fake_module(
    name: &str,
    state: State,
    seen: Arc<Mutex<Vec<(String, AdminCommand)>>>,
) -> (ModuleHandle, watch::Sender<Snapshot>) {
    let (snap_tx, snap_rx) = watch::channel(snapshot(state));
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<ModuleRequest>(8);
    let module = name.to_string();
    tokio::spawn(async move {
        while let Some(req) = cmd_rx.recv().await {
            seen.lock().unwrap().push((module.clone(), req.command.clone()));
            let answer = match req.command {
                AdminCommand::Start => Err(CommandError::AlreadyRunning(module.clone())),
                _ => Ok(()),
            };
            let _ = req.reply.send(answer);
        }
    });
    let mut v = view(name, None);
    v.status = None;
    (
        ModuleHandle { view: v, snapshot: snap_rx, commands: cmd_tx, rejected: None, replication: None, verify: None },
        snap_tx,
    )
}

fn fake() -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    std::fs::create_dir_all(&log_dir).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut control = Control { node: "hostA".into(), log_dir: log_dir.clone(), ..Control::default() };
    let (web01, web01_tx) = fake_module("web01", State::Prim, seen.clone());
    let (db, db_tx) = fake_module("db", State::Second, seen.clone());
    // A module whose task has ended: its channel is closed.
    let (gone_tx, gone_rx) = mpsc::channel(1);
    drop(gone_rx);
    let (_, gone_snap) = watch::channel(snapshot(State::Stop));
    control.running.insert("web01".into(), web01);
    control.running.insert("db".into(), db);
    control.running.insert(
        "gone".into(),
        ModuleHandle {
            view: view("gone", None),
            snapshot: gone_snap,
            commands: gone_tx,
            rejected: None,
            replication: None,
            verify: None,
        },
    );
    control.broken.insert("bad".into(), view("bad", Some("userconfig.xml:3: <heart>: bad pulse")));
    let (reload_tx, mut reload_rx) = mpsc::channel::<oneshot::Sender<ReloadReport>>(1);
    tokio::spawn(async move {
        while let Some(reply) = reload_rx.recv().await {
            let report = ReloadReport {
                started: vec!["new".into()],
                removed: vec!["old".into()],
                refused: vec![("worse".into(), "no id".into())],
            };
            let _ = reply.send(report);
        }
    });
    control.reload = Some(reload_tx);
    // Keep the db snapshot sender alive for the whole test.
    std::mem::forget(db_tx);
    Fake { control: Arc::new(RwLock::new(control)), seen, web01: web01_tx, _dir: dir, log_dir }
}

/// Serves `router` on a fresh local TCP port.
async fn listen(control: Arc<RwLock<Control>>, token: Option<&str>) -> Endpoint {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(control, token.map(str::to_string));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Endpoint::Tcp(addr.to_string())
}

async fn call(endpoint: &Endpoint, token: Option<&str>, method: &str, path: &str, body: Option<&str>) -> Response {
    let client = Client::new(endpoint.clone(), token.map(str::to_string));
    let (method, path, body) = (method.to_string(), path.to_string(), body.map(|b| b.as_bytes().to_vec()));
    tokio::task::spawn_blocking(move || client.request(&method, &path, body.as_deref()).unwrap()).await.unwrap()
}

fn json(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&r.body)))
}

/// The status and the error sentence of a failed request.
fn error(r: &Response) -> (u16, String) {
    let v = json(r);
    let e = v["error"].as_str().unwrap_or_else(|| panic!("no error in {v}")).to_string();
    assert!(!e.contains('\n'), "one sentence: {e}");
    (r.status, e)
}

// The module list and one module show the live snapshot, and broken modules with their error.
#[tokio::test(flavor = "multi_thread")]
async fn get_modules_lists_running_and_broken() {
    let f = fake();
    let ep = listen(f.control.clone(), None).await;
    let r = call(&ep, None, "GET", "/api/v1/modules", None).await;
    assert_eq!(r.status, 200);
    let views: Vec<ModuleView> = r.json().unwrap();
    let names: Vec<&str> = views.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["bad", "db", "gone", "web01"]);
    assert_eq!(views[0].error.as_deref(), Some("userconfig.xml:3: <heart>: bad pulse"));
    assert!(views[0].status.is_none());

    let mut s = snapshot(State::Wait);
    s.transition = Some(Transition::Starting);
    f.web01.send(s.clone()).unwrap();
    let r = call(&ep, None, "GET", "/api/v1/modules/web01", None).await;
    assert_eq!(r.status, 200);
    let v: ModuleView = r.json().unwrap();
    assert_eq!(v.status, Some(s));

    let r = call(&ep, None, "GET", "/api/v1/modules/nope", None).await;
    assert_eq!(error(&r), (404, "no module named nope is installed".into()));
}

// Each command reaches the module with its options; refusals, broken and ended modules map
// to 409, 503 and 503, and unknown modules or commands to 404.
#[tokio::test(flavor = "multi_thread")]
async fn commands_reach_the_module_and_map_errors() {
    let f = fake();
    let ep = listen(f.control.clone(), None).await;
    for (path, body) in [
        ("/api/v1/modules/web01/stop", None),
        ("/api/v1/modules/web01/restart", Some("{}")),
        ("/api/v1/modules/web01/swap", Some("  ")),
        ("/api/v1/modules/web01/prim", Some(r#"{"force":true}"#)),
        ("/api/v1/modules/web01/prim", None),
        ("/api/v1/modules/db/second", Some(r#"{"full":true}"#)),
    ] {
        let r = call(&ep, None, "POST", path, body).await;
        assert_eq!((r.status, json(&r)), (200, serde_json::json!({"ok": true})), "{path}");
    }
    let seen = f.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            ("web01".to_string(), AdminCommand::Stop),
            ("web01".to_string(), AdminCommand::Restart),
            ("web01".to_string(), AdminCommand::Swap),
            ("web01".to_string(), AdminCommand::Prim { force: true }),
            ("web01".to_string(), AdminCommand::Prim { force: false }),
            ("db".to_string(), AdminCommand::Second { full: true }),
        ]
    );

    let r = call(&ep, None, "POST", "/api/v1/modules/web01/start", None).await;
    assert_eq!(error(&r), (409, "module web01 is already running".into()));
    let r = call(&ep, None, "POST", "/api/v1/modules/bad/start", None).await;
    let (status, e) = error(&r);
    assert_eq!(status, 503);
    assert!(e.contains("bad pulse"), "{e}");
    let r = call(&ep, None, "POST", "/api/v1/modules/gone/stop", None).await;
    assert_eq!(error(&r).0, 503);
    let r = call(&ep, None, "POST", "/api/v1/modules/nope/stop", None).await;
    assert_eq!(error(&r), (404, "no module named nope is installed".into()));
    let r = call(&ep, None, "POST", "/api/v1/modules/web01/explode", None).await;
    let (status, e) = error(&r);
    assert_eq!(status, 404);
    assert!(e.contains("start, stop, restart, swap, prim, second"), "{e}");
}

// Bodies with unknown fields, wrong types or bad JSON are refused with 400 and change nothing.
#[tokio::test(flavor = "multi_thread")]
async fn bad_bodies_are_refused() {
    let f = fake();
    let ep = listen(f.control.clone(), None).await;
    for (cmd, body) in [
        ("prim", r#"{"force":"yes"}"#),
        ("prim", r#"{"full":true}"#),
        ("second", r#"{"force":true}"#),
        ("stop", r#"{"now":true}"#),
        ("start", "not json"),
        ("prim", "[true]"),
        ("prim", "null"),
    ] {
        let r = call(&ep, None, "POST", &format!("/api/v1/modules/web01/{cmd}"), Some(body)).await;
        let (status, e) = error(&r);
        assert_eq!(status, 400, "{cmd} {body}: {e}");
        assert!(e.starts_with(&format!("the body of {cmd} must be")), "{e}");
    }
    assert!(f.seen.lock().unwrap().is_empty(), "a bad request reached a module");
    let r = call(&ep, None, "POST", "/api/v1/reload", Some(r#"{"x":1}"#)).await;
    assert_eq!(error(&r).0, 400);
}

// The log endpoint returns the last n lines of the daemon's or the user's log.
#[tokio::test(flavor = "multi_thread")]
async fn log_returns_last_lines() {
    let f = fake();
    let ep = listen(f.control.clone(), None).await;
    let text: String = (0..300).map(|i| format!("line {i}\n")).collect();
    std::fs::write(f.log_dir.join("web01.log"), &text).unwrap();
    std::fs::write(f.log_dir.join("web01.user.log"), "user 1\nuser 2\n").unwrap();

    let r = call(&ep, None, "GET", "/api/v1/modules/web01/log", None).await;
    let lines: Vec<String> = r.json().unwrap();
    assert_eq!(lines.len(), 100);
    assert_eq!(lines[99], "line 299");
    let r = call(&ep, None, "GET", "/api/v1/modules/web01/log?n=2&user=false", None).await;
    assert_eq!(r.json::<Vec<String>>().unwrap(), ["line 298", "line 299"]);
    let r = call(&ep, None, "GET", "/api/v1/modules/web01/log?user=true", None).await;
    assert_eq!(r.json::<Vec<String>>().unwrap(), ["user 1", "user 2"]);
    let r = call(&ep, None, "GET", "/api/v1/modules/db/log", None).await;
    assert_eq!((r.status, r.json::<Vec<String>>().unwrap()), (200, vec![]), "no log yet");

    for bad in ["n=-1", "n=abc", "user=maybe", "lines=3", "n=100000000"] {
        let r = call(&ep, None, "GET", &format!("/api/v1/modules/web01/log?{bad}"), None).await;
        assert_eq!(error(&r).0, 400, "{bad}");
    }
    let r = call(&ep, None, "GET", "/api/v1/modules/nope/log", None).await;
    assert_eq!(error(&r).0, 404);
}

// Reload hands the daemon's report back as is.
#[tokio::test(flavor = "multi_thread")]
async fn reload_returns_the_report() {
    let f = fake();
    let ep = listen(f.control.clone(), None).await;
    let r = call(&ep, None, "POST", "/api/v1/reload", None).await;
    assert_eq!(r.status, 200);
    let report: ReloadReport = r.json().unwrap();
    assert_eq!(report.started, ["new"]);
    assert_eq!(report.refused, [("worse".to_string(), "no id".to_string())]);

    f.control.write().await.reload = None;
    let r = call(&ep, None, "POST", "/api/v1/reload", None).await;
    assert_eq!(error(&r).0, 503);
}

// The health URL says OK only where the module is primary (ALONE or PRIM).
#[tokio::test(flavor = "multi_thread")]
async fn health_is_ok_only_on_the_primary() {
    let f = fake();
    let ep = listen(f.control.clone(), Some(TOKEN)).await;
    let r = call(&ep, None, "GET", "/health/web01", None).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"OK\n"[..]));
    f.web01.send(snapshot(State::Alone)).unwrap();
    assert_eq!(call(&ep, None, "GET", "/health/web01", None).await.status, 200);
    for state in [State::Stop, State::Wait, State::Second] {
        f.web01.send(snapshot(state)).unwrap();
        let r = call(&ep, None, "GET", "/health/web01", None).await;
        let (status, e) = error(&r);
        assert_eq!(status, 404);
        assert!(e.contains(state.as_str()), "{e}");
    }
    assert_eq!(call(&ep, None, "GET", "/health/db", None).await.status, 404);
    assert_eq!(call(&ep, None, "GET", "/health/bad", None).await.status, 404);
    assert_eq!(call(&ep, None, "GET", "/health/nope", None).await.status, 404);
}

// On TCP, requests that change state need the bearer token; reads do not.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_requires_token_for_posts() {
    let f = fake();
    let ep = listen(f.control.clone(), Some(TOKEN)).await;
    assert_eq!(call(&ep, None, "GET", "/api/v1/modules", None).await.status, 200);
    assert_eq!(call(&ep, None, "GET", "/api/v1/modules/web01/log", None).await.status, 200);
    for token in [None, Some("wrong"), Some("s3cret-token-and-more")] {
        let r = call(&ep, token, "POST", "/api/v1/modules/web01/stop", None).await;
        let (status, e) = error(&r);
        assert_eq!(status, 401, "{token:?}");
        assert!(e.contains("token"), "{e}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(call(&ep, token, "POST", "/api/v1/reload", None).await.status, 401);
    }
    assert!(f.seen.lock().unwrap().is_empty());
    let r = call(&ep, Some(TOKEN), "POST", "/api/v1/modules/web01/stop", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(f.seen.lock().unwrap().len(), 1);
}

// Unknown endpoints and methods answer with a JSON error too.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_routes_answer_json() {
    let f = fake();
    let ep = listen(f.control.clone(), None).await;
    let r = call(&ep, None, "GET", "/api/v2/things", None).await;
    assert_eq!(error(&r).0, 404);
    let r = call(&ep, None, "DELETE", "/api/v1/modules", None).await;
    assert_eq!(error(&r).0, 405);
    let r = call(&ep, None, "GET", "/api/v1/modules/web01/stop", None).await;
    assert_eq!(error(&r).0, 405);
}

/// A replicated module whose verify answers `answer` to every request, once `release` is
/// dropped or sent (`None`: at once). Its replication view is `rep`.
fn replicated(
    name: &str,
    rep: ReplicationView,
    answer: Result<VerifyReport, String>,
    release: Option<oneshot::Receiver<()>>,
    asked: Option<oneshot::Sender<()>>,
) -> (ModuleHandle, watch::Sender<ReplicationView>) {
    let (handle, snap_tx) = fake_module(name, State::Prim, Arc::new(Mutex::new(Vec::new())));
    std::mem::forget(snap_tx);
    let (rep_tx, rep_rx) = watch::channel(rep);
    let (verify_tx, mut verify_rx) = mpsc::channel::<VerifyRequest>(4);
    tokio::spawn(async move {
        let (mut release, mut asked) = (release, asked);
        while let Some(reply) = verify_rx.recv().await {
            if let Some(asked) = asked.take() {
                let _ = asked.send(());
            }
            if let Some(release) = release.take() {
                let _ = release.await;
            }
            let _ = reply.send(answer.clone());
        }
    });
    (ModuleHandle { replication: Some(rep_rx), verify: Some(verify_tx), ..handle }, rep_tx)
}

fn report(differences: Vec<Difference>) -> VerifyReport {
    VerifyReport { files_compared: 3, bytes_compared: 3 << 30, elapsed_ms: 64_000, differences, truncated: false }
}

fn content_difference() -> Difference {
    Difference {
        dir: "/srv/web01".into(),
        path: "disk.img".into(),
        kind: DifferenceKind::Content,
        ranges: vec![(0, 4096), (1_048_576, 1_052_672)],
    }
}

// verify answers the module's report, equal or not; a failed verify and a module without
// replication are 409 with the sentence, unknown modules 404, broken or ended ones 503;
// GET shows the replication view.
#[tokio::test(flavor = "multi_thread")]
async fn verify_answers_the_report_and_maps_errors() {
    let f = fake();
    let rep = ReplicationView { role: DataRole::Source, mode: "sync".into(), connected: true, ..Default::default() };
    let (same, _same_rep) = replicated("same", rep.clone(), Ok(report(vec![])), None, None);
    let differing = report(vec![content_difference()]);
    let (differ, _differ_rep) = replicated("differ", rep.clone(), Ok(differing.clone()), None, None);
    let (failing, _failing_rep) =
        replicated("failing", rep.clone(), Err("the peer is not connected".into()), None, None);
    // A module whose replication task has ended: the verify channel is closed.
    let (ended, _ended_rep) = replicated("ended", rep.clone(), Ok(report(vec![])), None, None);
    let (closed_tx, closed_rx) = mpsc::channel(1);
    drop(closed_rx);
    let ended = ModuleHandle { verify: Some(closed_tx), ..ended };
    {
        let mut c = f.control.write().await;
        for (name, handle) in [("same", same), ("differ", differ), ("failing", failing), ("ended", ended)] {
            c.running.insert(name.into(), handle);
        }
    }
    let ep = listen(f.control.clone(), None).await;

    let r = call(&ep, None, "POST", "/api/v1/modules/same/verify", None).await;
    assert_eq!((r.status, r.json::<VerifyReport>().unwrap()), (200, report(vec![])));
    let r = call(&ep, None, "POST", "/api/v1/modules/differ/verify", Some("{}")).await;
    assert_eq!((r.status, r.json::<VerifyReport>().unwrap()), (200, differing));
    assert_eq!(json(&r)["differences"][0]["kind"], "content", "the report's JSON is the contract");

    let r = call(&ep, None, "POST", "/api/v1/modules/failing/verify", None).await;
    assert_eq!(error(&r), (409, "verify of module failing failed: the peer is not connected".into()));
    let r = call(&ep, None, "POST", "/api/v1/modules/web01/verify", None).await;
    assert_eq!(error(&r), (409, "module web01 replicates no directory: there is nothing to verify".into()));
    let r = call(&ep, None, "POST", "/api/v1/modules/nope/verify", None).await;
    assert_eq!(error(&r), (404, "no module named nope is installed".into()));
    let r = call(&ep, None, "POST", "/api/v1/modules/bad/verify", None).await;
    assert_eq!(error(&r).0, 503);
    let r = call(&ep, None, "POST", "/api/v1/modules/ended/verify", None).await;
    assert_eq!(error(&r).0, 503);
    let r = call(&ep, None, "POST", "/api/v1/modules/same/verify", Some(r#"{"deep":true}"#)).await;
    let (status, e) = error(&r);
    assert_eq!(status, 400);
    assert!(e.starts_with("the body of verify must be empty or {}"), "{e}");
    let r = call(&ep, None, "GET", "/api/v1/modules/same/verify", None).await;
    assert_eq!(error(&r).0, 405);
    assert!(f.seen.lock().unwrap().is_empty(), "verify went to the command channel");

    // The six commands still reach the module beside the verify route.
    let r = call(&ep, None, "POST", "/api/v1/modules/same/stop", None).await;
    assert_eq!(r.status, 200);

    let r = call(&ep, None, "GET", "/api/v1/modules/same", None).await;
    let v: ModuleView = r.json().unwrap();
    assert_eq!(v.replication, Some(rep));
    assert_eq!(json(&r)["replication"]["role"], "source");
    let r = call(&ep, None, "GET", "/api/v1/modules/web01", None).await;
    assert!(json(&r)["replication"].is_null());
}

// On TCP, verify needs the token like every POST.
#[tokio::test(flavor = "multi_thread")]
async fn verify_needs_the_token_on_tcp() {
    let f = fake();
    let (same, _rep) = replicated("same", ReplicationView::default(), Ok(report(vec![])), None, None);
    f.control.write().await.running.insert("same".into(), same);
    let ep = listen(f.control.clone(), Some(TOKEN)).await;
    for token in [None, Some("wrong")] {
        let r = call(&ep, token, "POST", "/api/v1/modules/same/verify", None).await;
        assert_eq!(error(&r).0, 401, "{token:?}");
    }
    let r = call(&ep, Some(TOKEN), "POST", "/api/v1/modules/same/verify", None).await;
    assert_eq!(r.status, 200);
}

// A verify in progress holds no lock: a reload (which takes the write lock) and reads go on
// while it runs.
#[tokio::test(flavor = "multi_thread")]
async fn verify_in_progress_does_not_block_the_daemon() {
    let f = fake();
    let (release_tx, release_rx) = oneshot::channel();
    let (asked_tx, asked_rx) = oneshot::channel();
    let (slow, _rep) =
        replicated("slow", ReplicationView::default(), Ok(report(vec![])), Some(release_rx), Some(asked_tx));
    f.control.write().await.running.insert("slow".into(), slow);
    let ep = listen(f.control.clone(), None).await;
    let pending = tokio::spawn({
        let ep = ep.clone();
        async move { call(&ep, None, "POST", "/api/v1/modules/slow/verify", None).await }
    });
    tokio::time::timeout(Duration::from_secs(10), asked_rx).await.unwrap().unwrap();
    let write = tokio::time::timeout(Duration::from_secs(10), f.control.write()).await;
    drop(write.expect("the write lock is free while a verify runs"));
    let r = tokio::time::timeout(Duration::from_secs(10), call(&ep, None, "GET", "/api/v1/modules", None)).await;
    assert_eq!(r.unwrap().status, 200);
    assert!(!pending.is_finished());
    release_tx.send(()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), pending).await.unwrap().unwrap();
    assert_eq!(r.status, 200);
}

async fn wait_for_socket(p: &Path) {
    for _ in 0..500 {
        if p.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", p.display());
}

// serve: replaces a stale socket, makes it 0600, writes a 0600 token for TCP, enforces the
// token there, refuses a second daemon, and removes the socket on shutdown.
#[tokio::test(flavor = "multi_thread")]
async fn serve_listens_on_socket_and_tcp() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(dir.path().join("home"), dir.path().join("state"));
    std::fs::create_dir_all(&paths.state_dir).unwrap();
    drop(std::os::unix::net::UnixListener::bind(paths.socket()).unwrap()); // stale socket
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tcp: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (control, p) = (f.control.clone(), paths.clone());
    let server = tokio::spawn(async move {
        serve(control, &p, Some(tcp), async move {
            let _ = stop_rx.await;
        })
        .await
    });
    // The stale socket is replaced: wait until the new one answers.
    let unix = Endpoint::Unix(paths.socket());
    let mut up = false;
    for _ in 0..500 {
        let c = Client::new(unix.clone(), None);
        if tokio::task::spawn_blocking(move || c.get("/api/v1/modules").is_ok()).await.unwrap() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(up, "the socket never answered");
    wait_for_socket(&paths.api_token()).await;
    let meta = std::fs::metadata(paths.socket()).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(paths.api_token()).unwrap();
    let token = token.trim();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(std::fs::metadata(paths.api_token()).unwrap().permissions().mode() & 0o777, 0o600);

    // No token on the socket.
    assert_eq!(call(&unix, None, "POST", "/api/v1/modules/web01/stop", None).await.status, 200);
    let tcp_ep = Endpoint::Tcp(tcp.to_string());
    assert_eq!(call(&tcp_ep, None, "POST", "/api/v1/modules/web01/stop", None).await.status, 401);
    assert_eq!(call(&tcp_ep, Some(token), "POST", "/api/v1/modules/web01/stop", None).await.status, 200);
    assert_eq!(call(&tcp_ep, None, "GET", "/health/web01", None).await.status, 200);

    let second = serve(f.control.clone(), &paths, None, async {}).await;
    let e = second.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    assert!(e.to_string().contains("another hamirror daemon"), "{e}");

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap().unwrap();
    assert!(!paths.socket().exists(), "the socket file is left behind");
}

// A token file that exists is reused, not replaced.
#[test]
fn existing_token_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("api.token");
    std::fs::write(&p, "abc\n").unwrap();
    assert_eq!(hamirror::api::load_or_create_token(&p).unwrap(), "abc");
    let q = dir.path().join("sub/api.token");
    let t = hamirror::api::load_or_create_token(&q).unwrap();
    assert_eq!(hamirror::api::load_or_create_token(&q).unwrap(), t);
}
