//! A module directory in a temp home and state dir, for tests of scripts and checkers.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use hamirror::daemon::scripts::ScriptEnv;
use hamirror::paths::Paths;

/// The module every fixture holds.
pub const MODULE: &str = "web01";

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub paths: Paths,
    pub env: ScriptEnv,
}

/// An empty `modules/web01/bin/` on node hostA (peer hostB), with these user variables.
pub fn fixture(vars: &[(&str, &str)]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(dir.path().join("home"), dir.path().join("state"));
    fs::create_dir_all(paths.module_dir(MODULE).join("bin")).unwrap();
    let vars: Vec<(String, String)> = vars.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    let env = ScriptEnv::new(&paths, MODULE, "hostA", Some("hostB"), &vars);
    Fixture { _dir: dir, paths, env }
}

/// Writes an executable `bin/<name>` running `body` with /bin/sh.
pub fn write_script(paths: &Paths, name: &str, body: &str) {
    let p = paths.script(MODULE, name);
    fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
}
