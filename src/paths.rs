//! Where things live on a node (DESIGN.md, "Files").

use std::path::{Path, PathBuf};

pub const DEFAULT_HOME: &str = "/etc/hamirror";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/hamirror";
/// Default TCP port of the admin HTTP API and health-check URL.
pub const DEFAULT_API_PORT: u16 = 9010;

/// Replaces `path` with `bytes` durably: a temporary file beside it (`<name>.tmp`), fsync,
/// rename, fsync of the directory (created if missing). A crash leaves the old file or the
/// new one, never a mix.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The config home and the state directory of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub home: PathBuf,
    pub state_dir: PathBuf,
}

impl Paths {
    /// Relative directories are made absolute against the current directory, because
    /// scripts run with their module directory as working directory.
    pub fn new(home: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Paths {
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        Paths { home: absolute(home.into()), state_dir: absolute(state_dir.into()) }
    }
    pub fn cluster_xml(&self) -> PathBuf {
        self.home.join("cluster.xml")
    }
    pub fn cluster_key(&self) -> PathBuf {
        self.home.join("cluster.key")
    }
    /// The admin API token for the TCP listener (created by the daemon, mode 0600).
    pub fn api_token(&self) -> PathBuf {
        self.home.join("api.token")
    }
    pub fn modules_dir(&self) -> PathBuf {
        self.home.join("modules")
    }
    pub fn module_dir(&self, module: &str) -> PathBuf {
        self.modules_dir().join(module)
    }
    pub fn userconfig(&self, module: &str) -> PathBuf {
        self.module_dir(module).join("userconfig.xml")
    }
    pub fn script(&self, module: &str, script: &str) -> PathBuf {
        self.module_dir(module).join("bin").join(script)
    }
    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("hamirror.sock")
    }
    /// Per-module state: persisted machine state, later dirty-zone maps.
    pub fn module_state_dir(&self, module: &str) -> PathBuf {
        self.state_dir.join("modules").join(module)
    }
    pub fn module_state_file(&self, module: &str) -> PathBuf {
        self.module_state_dir(module).join("state.json")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.state_dir.join("log")
    }
    /// The daemon's own log for this module (state changes, decisions).
    pub fn module_log(&self, module: &str) -> PathBuf {
        self.log_dir().join(format!("{module}.log"))
    }
    /// Output of the module's scripts.
    pub fn user_log(&self, module: &str) -> PathBuf {
        self.log_dir().join(format!("{module}.user.log"))
    }
    pub fn is_under(&self, p: &Path) -> bool {
        p.starts_with(&self.home) || p.starts_with(&self.state_dir)
    }
}
