//! Running the user scripts of `modules/<m>/bin/` (DESIGN.md, "Scripts").
//!
//! Each run gets its own process group, so that a timeout kills everything the script
//! started, and writes straight into the module's user log: never through a pipe, because a
//! start script typically leaves a background process that keeps its stdout open, and a pipe
//! would then never reach end of file.

use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::logs::{self, ModuleLog};
use crate::config::UserConfig;
use crate::module::{LogLevel, Script, ScriptOutcome, State};
use crate::paths::Paths;

/// How many times a spawn failing with ETXTBSY (the script was being written while another
/// thread forked) is retried.
const SPAWN_TEXT_BUSY_RETRIES_MAX: u32 = 50;
const SPAWN_TEXT_BUSY_DELAY: Duration = Duration::from_millis(10);

/// What every script (and custom checker) of one module finds in its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptEnv {
    /// `HAMIRROR_MODULE`
    pub module: String,
    /// `HAMIRROR_NODE`: this node's name.
    pub node: String,
    /// `HAMIRROR_PEER`: the other node's name (empty when there is none).
    pub peer: Option<String>,
    /// The `<user><var name value/></user>` variables, exported in order.
    pub vars: Vec<(String, String)>,
    /// `HAMIRROR_HOME`
    pub home: PathBuf,
    /// `HAMIRROR_STATE_DIR`
    pub state_dir: PathBuf,
}

impl ScriptEnv {
    pub fn new(paths: &Paths, module: &str, node: &str, peer: Option<&str>, vars: &[(String, String)]) -> ScriptEnv {
        ScriptEnv {
            module: module.to_string(),
            node: node.to_string(),
            peer: peer.map(str::to_string),
            vars: vars.to_vec(),
            home: paths.home.clone(),
            state_dir: paths.state_dir.clone(),
        }
    }

    /// The variables given to a process; `HAMIRROR_STATE` only when `state` is known.
    pub fn variables(&self, state: Option<State>) -> Vec<(String, String)> {
        let mut all = vec![
            ("HAMIRROR_MODULE".to_string(), self.module.clone()),
            ("HAMIRROR_NODE".to_string(), self.node.clone()),
            ("HAMIRROR_PEER".to_string(), self.peer.clone().unwrap_or_default()),
            ("HAMIRROR_HOME".to_string(), self.home.display().to_string()),
            ("HAMIRROR_STATE_DIR".to_string(), self.state_dir.display().to_string()),
        ];
        if let Some(state) = state {
            all.push(("HAMIRROR_STATE".to_string(), state.as_str().to_string()));
        }
        all.extend(self.vars.iter().cloned());
        all
    }
}

/// Runs `modules/<m>/bin/<script>` to its end and says how it went. A missing script is `Ok`.
///
/// Start scripts (prestart, start_*) are killed with their whole process group after
/// `user.starttimeout` (`TimedOut`). Stop scripts run gracefully; after `nicestoptimeout`
/// that run is killed and the script runs again with the argument `force`, which is killed
/// after `forcestoptimeout` (`TimedOut`). A non-zero exit is `Failed`.
pub async fn run_script(
    paths: &Paths,
    env: &ScriptEnv,
    state: State,
    script: Script,
    user: &UserConfig,
) -> ScriptOutcome {
    let name = script.file_name();
    let path = paths.script(&env.module, name);
    let user_log = paths.user_log(&env.module);
    match find(&path) {
        Found::Missing => return ScriptOutcome::Ok,
        Found::Runnable => {}
        Found::NotExecutable(why) => {
            let text = format!("{name}: {} {why}: run chmod +x {}", path.display(), path.display());
            note(&user_log, &text);
            ModuleLog::new(paths, &env.module).line(LogLevel::Error, &format!("script {text}"));
            return ScriptOutcome::Failed;
        }
    }
    if let Err(e) = logs::rotate_if_large(&user_log) {
        tracing::warn!("cannot rotate {}: {e}", user_log.display());
    }
    let cwd = paths.module_dir(&env.module);
    let vars = env.variables(Some(state));
    let first = Invocation { label: name.to_string(), path: &path, args: &[], cwd: &cwd, vars: &vars };
    if !script.is_stop() {
        return match first.run(&user_log, user.starttimeout).await {
            End::Exit(0) => ScriptOutcome::Ok,
            End::TimedOut => ScriptOutcome::TimedOut,
            _ => ScriptOutcome::Failed,
        };
    }
    match first.run(&user_log, user.nicestoptimeout).await {
        End::Exit(0) => return ScriptOutcome::Ok,
        End::TimedOut => {}
        _ => return ScriptOutcome::Failed,
    }
    let forced = Invocation { label: format!("{name} force"), args: &["force"], ..first };
    match forced.run(&user_log, user.forcestoptimeout).await {
        End::Exit(0) => ScriptOutcome::Ok,
        End::TimedOut => ScriptOutcome::TimedOut,
        _ => ScriptOutcome::Failed,
    }
}

enum Found {
    Missing,
    Runnable,
    /// Present but cannot be run; the words say why.
    NotExecutable(&'static str),
}

fn find(path: &Path) -> Found {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Found::Missing,
        Err(_) => Found::NotExecutable("cannot be read"),
        Ok(m) if m.is_dir() => Found::NotExecutable("is a directory, not a script"),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Found::NotExecutable("is not executable"),
        Ok(_) => Found::Runnable,
    }
}

/// Appends one line with the time to a user log.
fn note(user_log: &Path, text: &str) {
    let line = format!("{} {text}\n", logs::rfc3339_now());
    if let Err(e) = logs::append(user_log, &line) {
        tracing::warn!("cannot write to {}: {e}", user_log.display());
    }
}

/// How one run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Exit(i32),
    Signal(i32),
    /// Still running at the deadline: its process group was killed.
    TimedOut,
    /// It could not be started or waited for.
    Error,
}

/// One run of a script, written to the user log between a header and a footer line.
struct Invocation<'a> {
    /// `stop_prim` or `stop_prim force`, for the header and footer.
    label: String,
    path: &'a Path,
    args: &'a [&'a str],
    cwd: &'a Path,
    vars: &'a [(String, String)],
}

impl Invocation<'_> {
    async fn run(&self, user_log: &Path, limit: Duration) -> End {
        let label = &self.label;
        let out = match logs::open_append(user_log) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("cannot open {}: {e}; {label} runs without its output", user_log.display());
                None
            }
        };
        note(user_log, &format!("{label}: started"));
        let end = match Spawned::spawn(self.path, self.args, self.vars, self.cwd, out.as_ref(), out.as_ref()).await {
            Ok(mut run) => run.wait_timeout(limit).await,
            Err(e) => {
                note(user_log, &format!("{label}: cannot be started: {e}"));
                return End::Error;
            }
        };
        let footer = match end {
            End::Exit(code) => format!("exit {code}"),
            End::Signal(sig) => format!("killed (signal {sig})"),
            End::TimedOut => format!("timed out after {}", human_duration(limit)),
            End::Error => "lost (cannot wait for it)".to_string(),
        };
        note(user_log, &format!("{label}: {footer}"));
        end
    }
}

/// `1.5s`, `300s`, `250ms`.
fn human_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else if d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// A child process leading its own process group. Dropping it before it was reaped kills the
/// group: a run that nobody waits for any more must not linger.
pub(crate) struct Spawned {
    child: tokio::process::Child,
    pgid: Option<Pid>,
}

impl Spawned {
    /// Starts `program args` in `cwd` with `vars` added to the daemon's environment, stdin
    /// from /dev/null, stdout and stderr appended to the given files (`None`: /dev/null).
    pub(crate) async fn spawn(
        program: &Path,
        args: &[&str],
        vars: &[(String, String)],
        cwd: &Path,
        stdout: Option<&File>,
        stderr: Option<&File>,
    ) -> io::Result<Spawned> {
        let mut attempt = 0;
        loop {
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args)
                .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .current_dir(cwd)
                .stdin(Stdio::null())
                .process_group(0);
            cmd.stdout(match stdout {
                Some(f) => Stdio::from(f.try_clone()?),
                None => Stdio::null(),
            });
            cmd.stderr(match stderr {
                Some(f) => Stdio::from(f.try_clone()?),
                None => Stdio::null(),
            });
            match cmd.spawn() {
                Ok(child) => {
                    let pgid = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
                    return Ok(Spawned { child, pgid });
                }
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < SPAWN_TEXT_BUSY_RETRIES_MAX => {
                    attempt += 1;
                    tokio::time::sleep(SPAWN_TEXT_BUSY_DELAY).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for the process; past `limit`, kills its process group with SIGKILL.
    pub(crate) async fn wait_timeout(&mut self, limit: Duration) -> End {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status,
            Err(_elapsed) => {
                self.kill_group();
                let _ = self.child.wait().await;
                self.pgid = None;
                return End::TimedOut;
            }
        };
        self.pgid = None;
        match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => End::Exit(code),
                (None, Some(sig)) => End::Signal(sig),
                (None, None) => End::Error,
            },
            Err(e) => {
                tracing::warn!("cannot wait for a script: {e}");
                End::Error
            }
        }
    }

    fn kill_group(&self) {
        if let Some(pgid) = self.pgid {
            // ESRCH: the group is already gone, which is what we want.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Only while the leader is not reaped: its pid cannot have been reused yet.
        self.kill_group();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Durations in footers read like the configuration's.
    #[test]
    fn human_duration_reads_like_config() {
        assert_eq!(human_duration(Duration::from_secs(300)), "300s");
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1.5s");
    }
}
