//! The `hamirror` command line (DESIGN.md, "CLI"). `hamirror daemon` runs the node daemon;
//! every other command is a client of a running daemon (admin socket, or `--api ADDR` over
//! TCP), except those that only read or write files: `log`, `module ...`, `cluster genkey`.
//!
//! Errors are one sentence on stderr, prefixed `hamirror: `, and exit code 1;
//! `hamirror state` exits with the state's code (see [`crate::module::State::exit_code`]),
//! [`STATE_EXIT_UNREACHABLE`] when no daemon answers and [`STATE_EXIT_UNKNOWN`] when the
//! module has no state (not installed, configuration error).

pub mod client;
mod modules;
mod resync;
mod status;
pub(crate) mod units;
mod verify;
mod vm;

pub use modules::check_name as check_module_name;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::paths::{Paths, DEFAULT_API_PORT, DEFAULT_HOME, DEFAULT_STATE_DIR};
use client::{encode_component, Client, ClientError, Endpoint, Response};

/// `hamirror state`: no daemon answers.
pub const STATE_EXIT_UNREACHABLE: i32 = 5;
/// `hamirror state`: the module is not installed, or has no state (configuration error).
pub const STATE_EXIT_UNKNOWN: i32 = 6;
/// Lines shown by `hamirror log` without `-n`.
pub const LOG_LINES_DEFAULT: usize = 100;

#[derive(Debug, Parser)]
#[command(
    name = "hamirror",
    version,
    about = "High availability for hypervisor hosts: real-time mirroring, failover and failback of VMs and applications"
)]
pub struct Cli {
    /// Configuration directory (cluster.xml, cluster.key, modules/).
    #[arg(long, env = "HAMIRROR_HOME", default_value = DEFAULT_HOME, global = true, value_name = "DIR")]
    pub home: PathBuf,
    /// State directory (persisted state, logs, the admin socket).
    #[arg(long, env = "HAMIRROR_STATE_DIR", default_value = DEFAULT_STATE_DIR, global = true, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// This node's name in cluster.xml (default: the node whose address is local).
    #[arg(long, env = "HAMIRROR_NODE", global = true, value_name = "NAME")]
    pub node: Option<String>,
    /// Talk to the daemon over TCP at ADDR (host:port) instead of the admin socket; the
    /// token comes from $HAMIRROR_TOKEN or the home's api.token.
    #[arg(long, global = true, value_name = "ADDR")]
    pub api: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon in the foreground.
    Daemon {
        /// TCP address of the admin API and health-check URL, or `none` for the admin
        /// socket only.
        #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9010")]
        listen: String,
    },
    /// Show every module (or one): local state, peer state, lans, data generation.
    Status {
        module: Option<String>,
        /// Print the daemon's JSON as is (stable field names).
        #[arg(long)]
        json: bool,
    },
    /// Print a module's state; the exit code is STOP 0, WAIT 1, ALONE 2, PRIM 3, SECOND 4
    /// (5: no daemon answers, 6: no state for this module).
    State {
        module: String,
        /// Print nothing on stdout: only the exit code tells the state.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Start a module on this node.
    Start { module: String },
    /// Stop a module on this node.
    Stop { module: String },
    /// Restart the application on this node in its current role.
    Restart { module: String },
    /// Planned role swap: stop on the primary, then start on the peer.
    Swap { module: String },
    /// Make this node primary.
    Prim {
        module: String,
        /// Even on data known to be older than the peer's.
        #[arg(long)]
        force: bool,
    },
    /// Make this node secondary.
    Second {
        module: String,
        /// Ask for a full resync.
        #[arg(long)]
        full: bool,
    },
    /// Follow the module's resync on this node until its data is in sync: a progress bar on
    /// a terminal (bytes, rate, ETA, files, pass), a line every 2 s otherwise.
    Resync {
        module: String,
        /// First ask this node, secondary, for a full resync (`second --full`).
        #[arg(long)]
        full: bool,
        /// Print the module's replication as JSON, one line each time it changes.
        #[arg(long)]
        json: bool,
    },
    /// Compare both copies of the module's data online; the exit code is 1 when they differ.
    Verify {
        module: String,
        /// Print the daemon's report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the last lines of a module's log.
    Log {
        module: String,
        /// The scripts' output instead of the daemon's log of the module.
        #[arg(long)]
        user: bool,
        /// How many lines.
        #[arg(short = 'n', value_name = "N", default_value_t = LOG_LINES_DEFAULT)]
        lines: usize,
    },
    /// Install, list or remove modules.
    Module {
        #[command(subcommand)]
        command: ModuleCommand,
    },
    /// Cluster-wide settings.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Protect a VM with a mirror module on both hosts, or stop protecting it.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Turn a domain into a mirror module: its disk directories replicated, the VM watched and
    /// restarted on the surviving host; installed on both hosts (both daemons must run).
    Register {
        /// The domain's name in the hypervisor.
        domain: String,
        /// The hypervisor: a libvirt URI, or hyperv:///local for Hyper-V.
        #[arg(long, default_value = crate::config::DEFAULT_VM_URI)]
        uri: String,
        /// The module's name (default: the domain's).
        #[arg(long)]
        module: Option<String>,
        /// Show what would be done, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: print the plan as JSON.
        #[arg(long)]
        json: bool,
        /// Heartbeat period of the module.
        #[arg(long, default_value = vm::DEFAULT_PULSE)]
        pulse: String,
        /// Silence after which the peer is declared dead.
        #[arg(long, default_value = vm::DEFAULT_TIMEOUT)]
        timeout: String,
    },
    /// Remove a stopped VM module from both hosts; the disks and this host's domain stay.
    Unregister { module: String },
}

#[derive(Debug, Subcommand)]
pub enum ModuleCommand {
    /// Copy a module directory, or a template by name, into the home's modules/.
    Install {
        /// A module directory (with userconfig.xml), or the name of a template.
        #[arg(value_name = "DIR|TEMPLATE")]
        source: String,
        /// The module's name (default: the name in its userconfig.xml).
        #[arg(long)]
        name: Option<String>,
    },
    /// List the installed modules and whether their configuration is valid.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a stopped module's directory from the home.
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create the cluster key (home/cluster.key, mode 0600); copy it to the other node.
    Genkey,
}

/// Why a command failed: one sentence and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    pub code: i32,
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Failure {
        Failure { message: message.into(), code: 1 }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        Failure::new(e.to_string())
    }
}

/// Entry point of the binary: parses the arguments, runs the command, returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("hamirror: {}", f.message);
            f.code
        }
    }
}

/// Runs one parsed command; `Ok` carries the exit code.
pub fn run(cli: Cli) -> Result<i32, Failure> {
    let ctx = Ctx { paths: Paths::new(cli.home, cli.state_dir), api: cli.api };
    let node = cli.node.as_deref();
    match cli.command {
        Command::Daemon { listen } => {
            let api_listen = parse_listen(&listen)?;
            let opts = crate::daemon::DaemonOptions { paths: ctx.paths, node: node.map(str::to_string), api_listen };
            crate::daemon::run(opts).map_err(|e| Failure::new(format!("{e:#}")))?;
            Ok(0)
        }
        Command::Status { module, json } => status::status(&ctx, module.as_deref(), json),
        Command::State { module, quiet } => Ok(status::state(&ctx, &module, quiet)),
        Command::Start { module } => admin(&ctx, &module, "start", None),
        Command::Stop { module } => admin(&ctx, &module, "stop", None),
        Command::Restart { module } => admin(&ctx, &module, "restart", None),
        Command::Swap { module } => admin(&ctx, &module, "swap", None),
        Command::Prim { module, force } => admin(&ctx, &module, "prim", Some(serde_json::json!({ "force": force }))),
        Command::Second { module, full } => admin(&ctx, &module, "second", Some(serde_json::json!({ "full": full }))),
        Command::Resync { module, full, json } => resync::resync(&ctx, &module, full, json),
        Command::Verify { module, json } => verify::verify(&ctx, &module, json),
        Command::Log { module, user, lines } => log(&ctx, &module, user, lines),
        Command::Module { command } => match command {
            ModuleCommand::Install { source, name } => modules::install(&ctx, &source, name.as_deref()),
            ModuleCommand::List { json } => modules::list(&ctx, json),
            ModuleCommand::Remove { name } => modules::remove(&ctx, &name),
        },
        Command::Cluster { command: ClusterCommand::Genkey } => genkey(&ctx),
        Command::Vm { command: VmCommand::Register { domain, uri, module, dry_run, json, pulse, timeout } } => {
            let args = vm::RegisterArgs {
                domain: &domain,
                uri: &uri,
                module: module.as_deref(),
                node,
                pulse: &pulse,
                timeout: &timeout,
                dry_run,
                json,
            };
            vm::register(&ctx, &args)
        }
        Command::Vm { command: VmCommand::Unregister { module } } => vm::unregister(&ctx, &module, node),
    }
}

/// `--listen`: `none`, `ADDR:PORT`, or an address alone (port 9010).
pub fn parse_listen(text: &str) -> Result<Option<SocketAddr>, Failure> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(Some(addr));
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(Some(SocketAddr::new(ip, DEFAULT_API_PORT)));
    }
    Err(Failure::new(format!("--listen expects ADDR:PORT, an IP address, or none, not {text:?}")))
}

/// What every client command needs.
pub(crate) struct Ctx {
    pub paths: Paths,
    /// `--api ADDR`
    pub api: Option<String>,
}

impl Ctx {
    /// A client of the daemon: the admin socket, or `--api` over TCP with the token.
    pub fn client(&self) -> Client {
        match &self.api {
            None => Client::new(Endpoint::Unix(self.paths.socket()), None),
            Some(addr) => {
                let token = std::env::var("HAMIRROR_TOKEN")
                    .ok()
                    .filter(|t| !t.trim().is_empty())
                    .or_else(|| std::fs::read_to_string(self.paths.api_token()).ok())
                    .map(|t| t.trim().to_string());
                Client::new(Endpoint::Tcp(with_default_port(addr)), token)
            }
        }
    }

    /// Sends a request and turns any answer but 2xx into its error sentence.
    pub fn call(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> Result<Response, Failure> {
        let client = self.client();
        let response = match method {
            "GET" => client.get(path)?,
            _ => client.post(path, body)?,
        };
        if response.is_success() {
            Ok(response)
        } else {
            Err(Failure::new(response.error_message()))
        }
    }
}

/// `host` → `host:9010`; `host:port` and `[v6]:port` stay.
fn with_default_port(addr: &str) -> String {
    if addr.parse::<SocketAddr>().is_ok() {
        return addr.to_string();
    }
    if let Ok(ip) = addr.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return SocketAddr::new(ip, DEFAULT_API_PORT).to_string();
    }
    if addr.contains(':') {
        addr.to_string()
    } else {
        format!("{addr}:{DEFAULT_API_PORT}")
    }
}

pub(crate) fn module_path(module: &str) -> String {
    format!("/api/v1/modules/{}", encode_component(module))
}

pub(crate) fn bad_answer(e: &serde_json::Error) -> Failure {
    Failure::new(format!("the daemon's answer could not be read: {e}"))
}

/// `start`, `stop`, `restart`, `swap`, `prim`, `second`.
fn admin(ctx: &Ctx, module: &str, command: &str, body: Option<serde_json::Value>) -> Result<i32, Failure> {
    let path = format!("{}/{command}", module_path(module));
    ctx.call("POST", &path, body.as_ref())?;
    println!("{module}: {command} accepted (follow it with `hamirror status {module}`)");
    Ok(0)
}

/// `log`: read from the daemon with `--api`, else straight from the state directory, which
/// works when the daemon is down too.
fn log(ctx: &Ctx, module: &str, user: bool, lines: usize) -> Result<i32, Failure> {
    let shown: Vec<String> = if ctx.api.is_some() {
        let path = format!("{}/log?n={lines}&user={user}", module_path(module));
        ctx.call("GET", &path, None)?.json().map_err(|e| bad_answer(&e))?
    } else {
        modules::check_name(module)?;
        let file = if user { ctx.paths.user_log(module) } else { ctx.paths.module_log(module) };
        match crate::daemon::logs::tail(&file, lines) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !ctx.paths.module_dir(module).is_dir() {
                    return Err(Failure::new(format!("no module named {module} is installed")));
                }
                Vec::new()
            }
            Err(e) => return Err(Failure::new(format!("cannot read {}: {e}", file.display()))),
        }
    };
    for line in shown {
        println!("{line}");
    }
    Ok(0)
}

fn genkey(ctx: &Ctx) -> Result<i32, Failure> {
    let path = ctx.paths.cluster_key();
    std::fs::create_dir_all(&ctx.paths.home)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", ctx.paths.home.display())))?;
    crate::cluster::key::genkey(&path).map_err(|e| Failure::new(e.to_string()))?;
    println!("{}", path.display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    // --listen takes an address with or without port, or none.
    #[test]
    fn listen_forms() {
        assert_eq!(parse_listen("none").unwrap(), None);
        assert_eq!(parse_listen("127.0.0.1:80").unwrap(), Some("127.0.0.1:80".parse().unwrap()));
        assert_eq!(parse_listen("10.0.0.1").unwrap(), Some("10.0.0.1:9010".parse().unwrap()));
        assert_eq!(parse_listen("::1").unwrap(), Some("[::1]:9010".parse().unwrap()));
        assert!(parse_listen("hostA").is_err());
    }

    // --api accepts a host without port.
    #[test]
    fn api_address_gets_default_port() {
        assert_eq!(with_default_port("10.0.0.1"), "10.0.0.1:9010");
        assert_eq!(with_default_port("10.0.0.1:80"), "10.0.0.1:80");
        assert_eq!(with_default_port("hostA"), "hostA:9010");
        assert_eq!(with_default_port("::1"), "[::1]:9010");
    }

    // The command line parses as DESIGN.md writes it.
    #[test]
    fn cli_parses_design_examples() {
        Cli::try_parse_from(["hamirror", "state", "web01", "--quiet"]).unwrap();
        Cli::try_parse_from(["hamirror", "prim", "web01", "--force"]).unwrap();
        Cli::try_parse_from(["hamirror", "log", "web01", "--user", "-n", "5"]).unwrap();
        Cli::try_parse_from(["hamirror", "--api", "h:1", "status", "--json"]).unwrap();
        Cli::try_parse_from(["hamirror", "module", "install", "mirror", "--name", "x"]).unwrap();
        Cli::try_parse_from(["hamirror", "daemon", "--listen", "none"]).unwrap();
        Cli::try_parse_from(["hamirror", "resync", "web01", "--full", "--json"]).unwrap();
        Cli::try_parse_from(["hamirror", "verify", "web01", "--json"]).unwrap();
        Cli::try_parse_from(["hamirror", "vm", "register", "web01", "--uri", "qemu:///system", "--module", "w"])
            .unwrap();
        Cli::try_parse_from(["hamirror", "vm", "register", "web01", "--dry-run", "--json"]).unwrap();
        Cli::try_parse_from(["hamirror", "vm", "unregister", "web01"]).unwrap();
    }
}
