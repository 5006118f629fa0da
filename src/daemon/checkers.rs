//! The application checkers of one module (`<check>` in userconfig.xml): proc, tcp, custom, vm.
//!
//! Each checker is its own task and each of its checks runs in a task of its own, so a
//! checker that panics, errors or hangs only affects itself. A checker reports to the
//! module's supervisor only after [`CHECK_FAILURES_BEFORE_REPORT`] consecutive failures,
//! once, and stays quiet until it has succeeded again.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::logs::{self, ModuleLog};
use super::scripts::{End, ScriptEnv, Spawned};
use crate::config::{CheckAction, CheckConfig, CheckKind};
use crate::hypervisor::{HvError, Hypervisor};
use crate::module::{Event, LogLevel};
use crate::paths::Paths;

/// Consecutive failures before a checker reports [`Event::CheckerFailed`].
pub const CHECK_FAILURES_BEFORE_REPORT: u32 = 3;
/// A shorter configured interval is raised to this (a zero interval would spin).
pub const CHECK_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// `/proc/<pid>/comm` holds at most this many bytes of a process name.
const COMM_BYTES_MAX: usize = 15;

/// The running checkers of one module; dropping it stops them all.
#[derive(Debug, Default)]
pub struct CheckerSet {
    tasks: Vec<JoinHandle<()>>,
}

impl CheckerSet {
    /// How many checkers run.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl Drop for CheckerSet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts one task per check of `module`; each sends [`Event::CheckerFailed`] on `tx`.
/// `hypervisor` serves the `<vm>` checks. Must be called inside a tokio runtime.
pub fn spawn_checkers(
    module: &str,
    paths: &Paths,
    env: &ScriptEnv,
    checks: &[CheckConfig],
    hypervisor: Option<Arc<dyn Hypervisor>>,
    tx: mpsc::Sender<Event>,
) -> CheckerSet {
    let shared = Arc::new(Shared {
        module: module.to_string(),
        paths: paths.clone(),
        env: env.clone(),
        log: ModuleLog::new(paths, module),
        hypervisor,
        hypervisor_unknown: AtomicBool::new(false),
    });
    let tasks =
        checks.iter().map(|check| tokio::spawn(checker_loop(shared.clone(), check.clone(), tx.clone()))).collect();
    CheckerSet { tasks }
}

/// What the checkers of one module share.
struct Shared {
    module: String,
    paths: Paths,
    env: ScriptEnv,
    log: ModuleLog,
    hypervisor: Option<Arc<dyn Hypervisor>>,
    /// The hypervisor did not answer the last vm check (said once in the log).
    hypervisor_unknown: AtomicBool,
}

/// Aborts the task when dropped, so that stopping a checker also stops its current check.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn checker_loop(shared: Arc<Shared>, check: CheckConfig, tx: mpsc::Sender<Event>) {
    let ident = check.ident.clone();
    let interval = check.interval.max(CHECK_INTERVAL_MIN);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: give the application one interval to come up.
    ticker.tick().await;
    let mut failures: u32 = 0;
    let mut reported = false;
    loop {
        ticker.tick().await;
        let mut task = AbortOnDrop(tokio::spawn(check_once(shared.clone(), check.kind.clone(), interval)));
        let result = match (&mut task.0).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err("the checker itself failed (panic)".to_string()),
            Err(_) => Err("the check was cancelled".to_string()),
        };
        match result {
            Ok(()) => {
                if reported {
                    shared.log.line(LogLevel::Info, &format!("checker {ident} succeeds again"));
                }
                failures = 0;
                reported = false;
            }
            Err(_) if reported => {}
            Err(why) => {
                failures = failures.saturating_add(1);
                let n = CHECK_FAILURES_BEFORE_REPORT;
                if failures < n {
                    let text = format!("checker {ident} failed ({failures}/{n}): {why}");
                    shared.log.line(LogLevel::Warn, &text);
                    continue;
                }
                let text = format!(
                    "checker {ident} failed {failures} times in a row: {why}; asking for {}",
                    action_name(check.action)
                );
                shared.log.line(LogLevel::Error, &text);
                reported = true;
                let event = Event::CheckerFailed { ident: ident.clone(), action: check.action };
                if tx.send(event).await.is_err() {
                    // The supervisor is gone: nobody to report to any more.
                    return;
                }
            }
        }
    }
}

fn action_name(action: CheckAction) -> &'static str {
    match action {
        CheckAction::Restart => "restart",
        CheckAction::Stopstart => "stopstart",
    }
}

/// One check; `Err` says why it failed.
async fn check_once(shared: Arc<Shared>, kind: CheckKind, interval: Duration) -> Result<(), String> {
    match kind {
        CheckKind::Proc { name, atleast } => {
            let wanted = name.clone();
            let count = tokio::task::spawn_blocking(move || count_processes(&wanted))
                .await
                .map_err(|_| "cannot list the processes (the check task failed)".to_string())?
                .map_err(|e| format!("cannot list the processes in /proc: {e}"))?;
            if count >= atleast {
                Ok(())
            } else {
                Err(format!("{count} process(es) named {name} run, at least {atleast} wanted"))
            }
        }
        CheckKind::Tcp { addr, port } => {
            let to = SocketAddr::new(addr, port);
            match tokio::time::timeout(interval, tokio::net::TcpStream::connect(to)).await {
                Ok(Ok(_stream)) => Ok(()),
                Ok(Err(e)) => Err(format!("cannot connect to {to}: {e}")),
                Err(_) => Err(format!("no answer from {to} within {} ms", interval.as_millis())),
            }
        }
        CheckKind::Custom { script } => run_custom(&shared, &script, interval).await,
        CheckKind::Vm { name, .. } => check_vm(&shared, name).await,
    }
}

/// The domain's state says it runs. A hypervisor that does not answer says nothing about the
/// VM: that is not a failure (a libvirtd restart must not fail the VM over).
async fn check_vm(shared: &Arc<Shared>, name: String) -> Result<(), String> {
    let Some(hv) = shared.hypervisor.clone() else {
        return Err("the module has no hypervisor connection".into());
    };
    let state = tokio::task::spawn_blocking(move || hv.state(&name))
        .await
        .map_err(|_| "cannot ask the hypervisor (the check task failed)".to_string())?;
    match state {
        Ok(state) => {
            if shared.hypervisor_unknown.swap(false, Ordering::Relaxed) {
                shared.log.line(LogLevel::Info, "the hypervisor answers again");
            }
            super::vm::judge(&state)
        }
        Err(HvError::Unreachable { uri, why }) => {
            if !shared.hypervisor_unknown.swap(true, Ordering::Relaxed) {
                let text = format!("the hypervisor at {uri} does not answer ({why}): the VM's state is unknown, which is not counted as a failure");
                shared.log.line(LogLevel::Warn, &text);
            }
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Runs the custom checker `bin/<script>`: exit 0 is a success; it is killed after `limit`.
/// Its stderr goes to the user log, its stdout nowhere (it runs every interval).
async fn run_custom(shared: &Shared, script: &str, limit: Duration) -> Result<(), String> {
    if script.is_empty() || script.contains('/') || script == "." || script == ".." {
        return Err(format!("{script:?} is not a script name in bin/"));
    }
    let path = shared.paths.script(&shared.module, script);
    match std::fs::metadata(&path) {
        Err(e) => return Err(format!("cannot use {}: {e}", path.display())),
        Ok(m) if !is_executable(&m) => {
            return Err(format!("{} is not executable: run chmod +x {}", path.display(), path.display()))
        }
        Ok(_) => {}
    }
    let stderr = logs::open_append(&shared.paths.user_log(&shared.module)).ok();
    let cwd = shared.paths.module_dir(&shared.module);
    let vars = shared.env.variables(None);
    let mut run = Spawned::spawn(&path, &[], &vars, &cwd, None, stderr.as_ref())
        .await
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    match run.wait_timeout(limit).await {
        End::Exit(0) => Ok(()),
        End::Exit(code) => Err(format!("{script} exited with code {code}")),
        End::Signal(sig) => Err(format!("{script} was killed by signal {sig}")),
        End::TimedOut => Err(format!("{script} still ran after {} ms and was killed", limit.as_millis())),
        End::Error => Err(format!("{script} could not be waited for")),
    }
}

fn is_executable(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    m.is_file() && m.permissions().mode() & 0o111 != 0
}

/// How many processes have `name` as their command name (`/proc/<pid>/comm`, which the
/// kernel cuts to 15 bytes: a longer `name` is compared on its first 15 bytes).
pub fn count_processes(name: &str) -> std::io::Result<u32> {
    count_processes_in(Path::new("/proc"), name)
}

fn count_processes_in(proc_dir: &Path, name: &str) -> std::io::Result<u32> {
    let wanted = &name.as_bytes()[..name.len().min(COMM_BYTES_MAX)];
    let mut count: u32 = 0;
    for entry in std::fs::read_dir(proc_dir)? {
        let Ok(entry) = entry else { continue };
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str() else {
            continue;
        };
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // The process may have ended since the listing: not an error.
        let Ok(comm) = std::fs::read(entry.path().join("comm")) else {
            continue;
        };
        let comm = comm.strip_suffix(b"\n").unwrap_or(&comm);
        if comm == wanted {
            count = count.saturating_add(1);
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The current test process is found by its command name; a made-up name is not.
    #[test]
    fn count_processes_finds_self() {
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert!(count_processes(comm.trim_end()).unwrap() >= 1);
        assert_eq!(count_processes("no-such-process-name-xyz").unwrap(), 0);
    }

    // Names longer than the kernel's 15 bytes match on their first 15 bytes.
    #[test]
    fn count_processes_compares_truncated_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("12")).unwrap();
        std::fs::write(dir.path().join("12/comm"), "postgres-server\n").unwrap();
        std::fs::create_dir(dir.path().join("self")).unwrap();
        std::fs::write(dir.path().join("self/comm"), "postgres-server\n").unwrap();
        assert_eq!(count_processes_in(dir.path(), "postgres-server-main").unwrap(), 1);
        assert_eq!(count_processes_in(dir.path(), "postgres").unwrap(), 0);
    }
}
