//! The application checkers: failure threshold, single report, recovery, isolation.

use std::fs;
use std::time::Duration;

use hamirror::config::{CheckAction, CheckConfig, CheckKind};
use hamirror::daemon::checkers::{spawn_checkers, CHECK_FAILURES_BEFORE_REPORT};
use hamirror::module::Event;
use tokio::sync::mpsc;

const INTERVAL: Duration = Duration::from_millis(50);

mod support;

use support::module_fixture::{write_script, Fixture};

fn fixture() -> Fixture {
    support::module_fixture::fixture(&[])
}

fn check(ident: &str, kind: CheckKind, action: CheckAction) -> CheckConfig {
    CheckConfig { ident: ident.to_string(), kind, action, interval: INTERVAL }
}

/// The next event within `within`, if any.
async fn next(rx: &mut mpsc::Receiver<Event>, within: Duration) -> Option<Event> {
    tokio::time::timeout(within, rx.recv()).await.ok().flatten()
}

// A tcp checker succeeds while its port listens, then reports once, after three failures in
// a row, when the listener is closed; it stays quiet while the failure lasts.
#[tokio::test]
async fn tcp_checker_reports_once_after_listener_closes() {
    let f = fixture();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = mpsc::channel(8);
    let kind = CheckKind::Tcp { addr: addr.ip(), port: addr.port() };
    let checks = [check("http", kind, CheckAction::Stopstart)];
    let set = spawn_checkers("web01", &f.paths, &f.env, &checks, None, tx);
    assert_eq!(set.len(), 1);
    assert_eq!(next(&mut rx, INTERVAL * 8).await, None, "a listening port is healthy");

    drop(listener);
    let event = next(&mut rx, Duration::from_secs(5)).await.expect("a report");
    assert_eq!(event, Event::CheckerFailed { ident: "http".into(), action: CheckAction::Stopstart });
    assert_eq!(next(&mut rx, INTERVAL * 8).await, None, "reported only once");
    let log = fs::read_to_string(f.paths.module_log("web01")).unwrap();
    // The report came after the third failure in a row, not before.
    assert_eq!(CHECK_FAILURES_BEFORE_REPORT, 3);
    assert!(log.contains("checker http failed (1/3)"), "{log}");
    assert!(log.contains("checker http failed (2/3)"), "{log}");
    assert!(log.contains("checker http failed 3 times in a row"), "{log}");
    assert!(log.contains("asking for stopstart"), "{log}");
}

// A proc checker for a process name that does not exist reports its action.
#[tokio::test]
async fn proc_checker_reports_missing_process() {
    let f = fixture();
    let (tx, mut rx) = mpsc::channel(8);
    let kind = CheckKind::Proc { name: "no-such-proc-zz".into(), atleast: 1 };
    let checks = [check("app", kind, CheckAction::Restart)];
    let _set = spawn_checkers("web01", &f.paths, &f.env, &checks, None, tx);
    let event = next(&mut rx, Duration::from_secs(5)).await.expect("a report");
    assert_eq!(event, Event::CheckerFailed { ident: "app".into(), action: CheckAction::Restart });
}

// A custom checker reports again after it recovered and failed anew; one that passes,
// running beside it, never reports.
#[tokio::test]
async fn custom_checker_reports_again_after_recovery() {
    let f = fixture();
    let flag = f.paths.module_dir("web01").join("healthy");
    write_script(&f.paths, "check_app", "test -e healthy");
    write_script(&f.paths, "check_ok", "exit 0");
    let (tx, mut rx) = mpsc::channel(8);
    let checks = [
        check("app", CheckKind::Custom { script: "check_app".into() }, CheckAction::Restart),
        check("ok", CheckKind::Custom { script: "check_ok".into() }, CheckAction::Restart),
    ];
    let _set = spawn_checkers("web01", &f.paths, &f.env, &checks, None, tx);
    let first = next(&mut rx, Duration::from_secs(5)).await.expect("first report");
    assert_eq!(first, Event::CheckerFailed { ident: "app".into(), action: CheckAction::Restart });

    fs::write(&flag, "").unwrap();
    assert_eq!(next(&mut rx, INTERVAL * 8).await, None);
    fs::remove_file(&flag).unwrap();
    let second = next(&mut rx, Duration::from_secs(5)).await.expect("second report");
    assert_eq!(second, first);
    let log = fs::read_to_string(f.paths.module_log("web01")).unwrap();
    assert!(log.contains("checker app succeeds again"), "{log}");
}

// A custom checker that hangs is killed after its interval and counts as a failure; a
// broken checker (missing script) does not stop a healthy one beside it.
#[tokio::test]
async fn hanging_and_broken_checkers_fail_alone() {
    let f = fixture();
    write_script(&f.paths, "check_hang", "sleep 30");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = mpsc::channel(8);
    let checks = [
        check("hang", CheckKind::Custom { script: "check_hang".into() }, CheckAction::Restart),
        check("gone", CheckKind::Custom { script: "no_such".into() }, CheckAction::Restart),
        check("tcp", CheckKind::Tcp { addr: addr.ip(), port: addr.port() }, CheckAction::Restart),
    ];
    let set = spawn_checkers("web01", &f.paths, &f.env, &checks, None, tx);
    let mut idents = Vec::new();
    for _ in 0..2 {
        match next(&mut rx, Duration::from_secs(5)).await {
            Some(Event::CheckerFailed { ident, .. }) => idents.push(ident),
            other => panic!("unexpected {other:?}"),
        }
    }
    idents.sort();
    assert_eq!(idents, ["gone", "hang"]);
    assert_eq!(next(&mut rx, INTERVAL * 6).await, None, "the tcp checker stays healthy");
    drop(set);
    drop(listener);
    assert_eq!(next(&mut rx, INTERVAL * 8).await, None, "dropping the set stops every checker");
}
