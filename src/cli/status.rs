//! `hamirror status` and `hamirror state`.

use super::client::ClientError;
use super::{bad_answer, module_path, Ctx, Failure, STATE_EXIT_UNKNOWN, STATE_EXIT_UNREACHABLE};
use crate::daemon::control::ModuleView;
use crate::module::State;

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

/// The human table of `status`: one row per module and, below it, why it waits or what is
/// wrong with its configuration.
pub fn table(views: &[ModuleView]) -> String {
    let header = ["MODULE", "STATE", "PEER STATE", "LANS", "GENERATION"];
    let mut rows: Vec<([String; 5], Option<String>)> = Vec::new();
    for v in views {
        let (cells, note) = match &v.status {
            None => (
                [v.name.clone(), "ERROR".into(), "-".into(), "-".into(), "-".into()],
                Some(format!("configuration error: {}", v.error.as_deref().unwrap_or("unknown"))),
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
                let note = match (s.state, s.wait_reason) {
                    (State::Wait, Some(r)) => Some(r.describe().to_string()),
                    _ => v.error.clone(),
                };
                ([v.name.clone(), state, peer, lans, generation], note)
            }
        };
        rows.push((cells, note));
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
    for (cells, note) in rows {
        out.push_str(&line(&cells));
        if let Some(note) = note {
            out.push_str(&format!("    {note}\n"));
        }
    }
    out
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
