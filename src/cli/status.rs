//! `hamirror status` and `hamirror state`.

use super::client::ClientError;
use super::units::{bytes, count};
use super::{bad_answer, module_path, Ctx, Failure, STATE_EXIT_UNKNOWN, STATE_EXIT_UNREACHABLE};
use crate::daemon::control::ModuleView;
use crate::module::{Snapshot, State};
use crate::replication::status::{DataRole, ReplicationView, ResyncView};

pub(super) fn status(ctx: &Ctx, module: Option<&str>, json: bool) -> Result<i32, Failure> {
    let path = match module {
        Some(m) => module_path(m),
        None => "/api/v1/modules".to_string(),
    };
    let response = ctx.call("GET", &path, None)?;
    if json {
        println!("{}", String::from_utf8_lossy(&response.body).trim_end());
        return Ok(0);
    }
    let views: Vec<ModuleView> = match module {
        Some(_) => vec![response.json().map_err(|e| bad_answer(&e))?],
        None => response.json().map_err(|e| bad_answer(&e))?,
    };
    if views.is_empty() {
        println!("no modules are installed (see `hamirror module install`)");
        return Ok(0);
    }
    print!("{}", table(&views));
    Ok(0)
}

/// The human table of `status`: one row per module and, below it, why it waits, what is
/// wrong with its configuration, and what its replication needs the admin to know.
pub fn table(views: &[ModuleView]) -> String {
    let header = ["MODULE", "STATE", "PEER STATE", "LANS", "GENERATION", "DATA"];
    let mut rows: Vec<([String; 6], Vec<String>)> = Vec::new();
    for v in views {
        let (cells, notes) = match &v.status {
            None => (
                [v.name.clone(), "ERROR".into(), "-".into(), "-".into(), "-".into(), "-".into()],
                vec![format!("configuration error: {}", v.error.as_deref().unwrap_or("unknown"))],
            ),
            Some(s) => {
                let state = match s.transition {
                    Some(t) => format!("{} ({})", s.state, t.as_str()),
                    None => s.state.to_string(),
                };
                let peer = match &s.peer {
                    Some(p) => match p.transition {
                        Some(t) => format!("{} ({})", p.state, t.as_str()),
                        None => p.state.to_string(),
                    },
                    None => "-".into(),
                };
                let up = s.lans.iter().filter(|l| l.up).count();
                let lans = format!("{up}/{}", s.lans.len());
                let generation = s.generation.map_or("-".to_string(), |g| g.to_string());
                let mut notes: Vec<String> = match (s.state, s.wait_reason) {
                    (State::Wait, Some(r)) => Some(r.describe().to_string()),
                    _ => v.error.clone(),
                }
                .into_iter()
                .collect();
                let data = match &v.replication {
                    Some(r) => {
                        notes.extend(data_notes(r));
                        data(s, r)
                    }
                    None => "-".into(),
                };
                ([v.name.clone(), state, peer, lans, generation, data], notes)
            }
        };
        rows.push((cells, notes));
    }
    let mut widths = header.map(str::len);
    for (cells, _) in &rows {
        for (w, c) in widths.iter_mut().zip(cells) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&header.map(String::from));
    for (cells, notes) in rows {
        out.push_str(&line(&cells));
        for note in notes {
            out.push_str(&format!("    {note}\n"));
        }
    }
    out
}

/// The DATA column: what this node's copy of the data is doing.
fn data(s: &Snapshot, r: &ReplicationView) -> String {
    if let Some(resync) = &r.resync {
        return format!("resyncing {}", resync_progress(resync));
    }
    match r.role {
        DataRole::Source if !r.connected => format!("alone: {} to resync", bytes(r.dirty_bytes)),
        DataRole::Source if r.lag.ops > 0 => format!("lag {} / {}", count(r.lag.ops, "op", "ops"), bytes(r.lag.bytes)),
        DataRole::Source if r.dirty_zones > 0 || r.dirty_bytes > 0 => format!("{} to resync", bytes(r.dirty_bytes)),
        DataRole::Source => "in sync".into(),
        DataRole::Target if s.in_sync => "in sync".into(),
        DataRole::Target => "out of date: waiting for a resync".into(),
        DataRole::None => "-".into(),
    }
}

/// The lines under a module's row about its data: why the peer gets no changes, a failed
/// resync, files a split brain set aside.
fn data_notes(r: &ReplicationView) -> Vec<String> {
    let mut notes = Vec::new();
    if let (DataRole::Source, false, Some(why)) = (r.role, r.connected, &r.absent_reason) {
        notes.push(format!("not connected: {why}"));
    }
    if let (None, Some(last)) = (&r.resync, &r.last_resync) {
        if !last.ok {
            notes.push(format!("last resync failed: {}", last.error.as_deref().unwrap_or("no reason was given")));
        }
    }
    if let Some(path) = &r.split_brain_saved {
        notes.push(format!("split brain: this node's divergent files were saved in {path}"));
    }
    notes
}

/// `45% (full, 1.2 GiB of 2.7 GiB, pass 1)`.
pub(super) fn resync_progress(r: &ResyncView) -> String {
    format!(
        "{}% ({}, {} of {}, pass {})",
        percent(r.bytes_done, r.bytes_total),
        if r.full { "full" } else { "changes" },
        bytes(r.bytes_done),
        bytes(r.bytes_total),
        r.pass
    )
}

/// Rounded down, so 100% only when done.
fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 0;
    }
    (u128::from(done.min(total)) * 100 / u128::from(total)) as u64
}

/// `hamirror state`: returns the exit code; messages go to stderr even with `--quiet`.
pub(super) fn state(ctx: &Ctx, module: &str, quiet: bool) -> i32 {
    let response = match ctx.client().get(&module_path(module)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hamirror: {e}");
            return unreachable_code(&e);
        }
    };
    if !response.is_success() {
        eprintln!("hamirror: {}", response.error_message());
        return STATE_EXIT_UNKNOWN;
    }
    let view: ModuleView = match response.json() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("hamirror: {}", bad_answer(&e).message);
            return STATE_EXIT_UNKNOWN;
        }
    };
    match view.status {
        Some(s) => {
            if !quiet {
                println!("{}", s.state);
            }
            s.state.exit_code()
        }
        None => {
            let error = view.error.unwrap_or_default();
            eprintln!("hamirror: module {module} is not running because of its configuration: {error}");
            STATE_EXIT_UNKNOWN
        }
    }
}

/// The exit code of `state` for a request that got no answer.
fn unreachable_code(e: &ClientError) -> i32 {
    match e {
        ClientError::Unreachable(_) | ClientError::PermissionDenied(_) => STATE_EXIT_UNREACHABLE,
        _ => STATE_EXIT_UNKNOWN,
    }
}
