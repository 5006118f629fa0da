//! The user scripts: environment, user log, outcomes, timeouts, the forced stop, and
//! background processes left by a start script.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use hamirror::config::UserConfig;
use hamirror::daemon::scripts::run_script;
use hamirror::module::{Script, ScriptOutcome, State};
use hamirror::paths::Paths;

mod support;

use support::module_fixture::{write_script, Fixture};

fn fixture() -> Fixture {
    support::module_fixture::fixture(&[("APP_COMMAND", "sleep 5")])
}

fn user(start: Duration, nice: Duration, force: Duration) -> UserConfig {
    UserConfig { nicestoptimeout: nice, forcestoptimeout: force, starttimeout: start, vars: vec![] }
}

fn quick() -> UserConfig {
    user(Duration::from_secs(10), Duration::from_secs(10), Duration::from_secs(10))
}

fn user_log(paths: &Paths) -> String {
    fs::read_to_string(paths.user_log("web01")).unwrap_or_default()
}

fn pid_alive(pid: i32) -> bool {
    // Signal 0 only checks that the process exists; a zombie counts as gone.
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

fn wait_for_file(p: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(s) = fs::read_to_string(p) {
            if !s.trim().is_empty() {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

// A script sees the module, node, peer, state, home, state dir and user variables, runs in
// its module directory, and its output lands in the user log between our header and footer.
#[tokio::test]
async fn script_sees_environment_and_writes_user_log() {
    let f = fixture();
    write_script(
        &f.paths,
        "start_prim",
        r#"echo "m=$HAMIRROR_MODULE n=$HAMIRROR_NODE p=$HAMIRROR_PEER s=$HAMIRROR_STATE"
echo "home=$HAMIRROR_HOME sd=$HAMIRROR_STATE_DIR app=$APP_COMMAND cwd=$(pwd)"
echo "to stderr" >&2"#,
    );
    let out = run_script(&f.paths, &f.env, State::Wait, Script::StartPrim, &quick()).await;
    assert_eq!(out, ScriptOutcome::Ok);
    let log = user_log(&f.paths);
    assert!(log.contains("m=web01 n=hostA p=hostB s=WAIT"), "{log}");
    let home = f.paths.home.display();
    let sd = f.paths.state_dir.display();
    let cwd = f.paths.module_dir("web01");
    let cwd = fs::canonicalize(cwd).unwrap();
    assert!(log.contains(&format!("home={home} sd={sd} app=sleep 5 cwd={}", cwd.display())), "{log}");
    assert!(log.contains("to stderr"), "{log}");
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines[0].ends_with(" start_prim: started"), "{log}");
    assert!(lines[lines.len() - 1].ends_with(" start_prim: exit 0"), "{log}");
    assert!(lines[0].starts_with("20") && lines[0].contains('T'), "{log}");
}

// A module without the script succeeds at once and writes nothing.
#[tokio::test]
async fn missing_script_is_ok() {
    let f = fixture();
    let out = run_script(&f.paths, &f.env, State::Prim, Script::StopPrim, &quick()).await;
    assert_eq!(out, ScriptOutcome::Ok);
    assert_eq!(user_log(&f.paths), "");
}

// A script that exits non-zero is Failed, start or stop, and the footer shows the code.
#[tokio::test]
async fn failing_script_is_failed() {
    let f = fixture();
    write_script(&f.paths, "prestart", "exit 3");
    write_script(&f.paths, "stop_second", "exit 1");
    let out = run_script(&f.paths, &f.env, State::Stop, Script::Prestart, &quick()).await;
    assert_eq!(out, ScriptOutcome::Failed);
    assert!(user_log(&f.paths).contains("prestart: exit 3"));
    let out = run_script(&f.paths, &f.env, State::Second, Script::StopSecond, &quick()).await;
    assert_eq!(out, ScriptOutcome::Failed);
    assert!(!user_log(&f.paths).contains("stop_second force"), "a failure is not a timeout");
}

// A script without the executable bit fails with a line telling the admin to chmod +x.
#[tokio::test]
async fn script_not_executable_is_failed_with_advice() {
    let f = fixture();
    let p = f.paths.script("web01", "start_prim");
    fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    let out = run_script(&f.paths, &f.env, State::Wait, Script::StartPrim, &quick()).await;
    assert_eq!(out, ScriptOutcome::Failed);
    assert!(user_log(&f.paths).contains("chmod +x"), "{}", user_log(&f.paths));
    let module_log = fs::read_to_string(f.paths.module_log("web01")).unwrap();
    assert!(module_log.contains("chmod +x"), "{module_log}");
}

// A start script that hangs is killed, with what it started, after starttimeout.
#[tokio::test]
async fn hanging_start_script_times_out_and_is_killed() {
    let f = fixture();
    let pid_file = f.paths.module_dir("web01").join("child.pid");
    write_script(&f.paths, "start_prim", "sleep 30 &\necho $! > child.pid\nsleep 30");
    let limits = user(Duration::from_millis(300), Duration::from_secs(10), Duration::from_secs(10));
    let t0 = Instant::now();
    let out = run_script(&f.paths, &f.env, State::Wait, Script::StartPrim, &limits).await;
    assert_eq!(out, ScriptOutcome::TimedOut);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(user_log(&f.paths).contains("start_prim: timed out after 300ms"), "{}", user_log(&f.paths));
    let child: i32 = wait_for_file(&pid_file).trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(child) {
        assert!(Instant::now() < deadline, "the script's child survived the timeout");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// A stop script that ignores the graceful run is killed after nicestoptimeout and run again
// with `force`; a forced run that succeeds makes the stop Ok.
#[tokio::test]
async fn stop_script_is_rerun_with_force_after_nicestoptimeout() {
    let f = fixture();
    write_script(
        &f.paths,
        "stop_prim",
        r#"echo "stop_prim args=[$*]"
if [ "$1" = force ]; then exit 0; fi
sleep 30"#,
    );
    let limits = user(Duration::from_secs(10), Duration::from_millis(300), Duration::from_secs(10));
    let out = run_script(&f.paths, &f.env, State::Prim, Script::StopPrim, &limits).await;
    assert_eq!(out, ScriptOutcome::Ok);
    let log = user_log(&f.paths);
    let graceful = log.find("stop_prim args=[]").expect("graceful run");
    let timed_out = log.find("stop_prim: timed out after 300ms").expect("graceful run killed");
    let forced = log.find("stop_prim args=[force]").expect("forced run");
    assert!(graceful < timed_out && timed_out < forced, "{log}");
    assert!(log.contains("stop_prim force: exit 0"), "{log}");
}

// A stop script that hangs even when forced is TimedOut after forcestoptimeout.
#[tokio::test]
async fn stop_script_hanging_when_forced_times_out() {
    let f = fixture();
    write_script(&f.paths, "stop_both", "sleep 30");
    let limits = user(Duration::from_secs(10), Duration::from_millis(200), Duration::from_millis(200));
    let t0 = Instant::now();
    let out = run_script(&f.paths, &f.env, State::Prim, Script::StopBoth, &limits).await;
    assert_eq!(out, ScriptOutcome::TimedOut);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(user_log(&f.paths).contains("stop_both force: timed out"), "{}", user_log(&f.paths));
}

// A background process left by start_prim, holding the user log as its stdout, keeps
// running after the script returns, and does not delay the script's outcome.
#[tokio::test]
async fn background_child_of_start_prim_keeps_running() {
    let f = fixture();
    write_script(
        &f.paths,
        "start_prim",
        r#"sh -c 'echo "app is up"; exec sleep 30' &
echo $! > app.pid"#,
    );
    let t0 = Instant::now();
    let out = run_script(&f.paths, &f.env, State::Wait, Script::StartPrim, &quick()).await;
    assert_eq!(out, ScriptOutcome::Ok);
    assert!(t0.elapsed() < Duration::from_secs(5), "the call waited for the background process");
    let pid: i32 = wait_for_file(&f.paths.module_dir("web01").join("app.pid")).trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(pid_alive(pid), "the application was killed");
    assert!(user_log(&f.paths).contains("app is up"));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
}

// The mirror template's start_prim runs APP_COMMAND in its own process group and records it;
// its stop_prim ends that group.
#[tokio::test]
async fn mirror_template_starts_and_stops_the_application() {
    let f = fixture();
    let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("app-modules/mirror/bin");
    for script in ["start_prim", "stop_prim"] {
        fs::copy(template.join(script), f.paths.script("web01", script)).unwrap();
    }
    let limits = quick();
    let out = run_script(&f.paths, &f.env, State::Wait, Script::StartPrim, &limits).await;
    assert_eq!(out, ScriptOutcome::Ok, "{}", user_log(&f.paths));
    let pid_file = f.paths.module_state_dir("web01").join("app.pid");
    // app.pid: "PGID BOOT_ID STARTTIME".
    let record = wait_for_file(&pid_file);
    let fields: Vec<&str> = record.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "app.pid: {record}");
    let pid: i32 = fields[0].parse().unwrap();
    assert_eq!(fields[1], fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap().trim());
    assert!(pid_alive(pid));
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let pgid: i32 = after_name.split(' ').nth(2).unwrap().parse().unwrap();
    assert_eq!(pgid, pid, "the application leads its own process group");

    let out = run_script(&f.paths, &f.env, State::Prim, Script::StopPrim, &limits).await;
    assert_eq!(out, ScriptOutcome::Ok, "{}", user_log(&f.paths));
    assert!(!pid_alive(pid), "the application still runs");
    assert!(!pid_file.exists());
}

// Proves the template's stop_prim never signals a process group recorded before a reboot
// (its id may belong to an unrelated process now).
#[tokio::test]
async fn mirror_template_ignores_a_pid_file_from_before_a_reboot() {
    let f = fixture();
    let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("app-modules/mirror/bin");
    fs::copy(template.join("stop_prim"), f.paths.script("web01", "stop_prim")).unwrap();
    // A live process of ours stands for "an unrelated process that got the recorded id".
    let mut bystander = std::process::Command::new("setsid").args(["sleep", "60"]).spawn().unwrap();
    let pid = bystander.id();
    wait_until_leads_group(pid);
    let pid_file = f.paths.module_state_dir("web01").join("app.pid");
    fs::create_dir_all(pid_file.parent().unwrap()).unwrap();
    fs::write(&pid_file, format!("{pid} 00000000-0000-0000-0000-000000000000 1\n")).unwrap();
    let out = run_script(&f.paths, &f.env, State::Prim, Script::StopPrim, &quick()).await;
    assert_eq!(out, ScriptOutcome::Ok, "{}", user_log(&f.paths));
    assert!(pid_alive(pid as i32), "stop_prim signalled a process group from before a reboot");
    assert!(!pid_file.exists());
    let _ = bystander.kill();
    let _ = bystander.wait();
}

/// Waits until `pid` leads its own process group (setsid has run).
fn wait_until_leads_group(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let pgid = stat.rfind(')').and_then(|i| stat[i + 2..].split(' ').nth(2).map(str::to_string));
        if pgid.as_deref() == Some(&pid.to_string()) {
            return;
        }
        assert!(Instant::now() < deadline, "setsid did not make {pid} a group leader");
        std::thread::sleep(Duration::from_millis(10));
    }
}
