//! The peer service's listener: one thread per address, one per connection.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, RwLock};

use super::{ModuleFile, PeerAnswer, PeerModule, PeerRequest, MODULE_BYTES_MAX, PEER_PORT, PEER_SERVICE_ID};
use crate::cluster::ClusterKey;
use crate::config::{parse_module, ClusterConfig};
use crate::daemon::control::Control;
use crate::paths::Paths;
use crate::replication::channel::{handshake_receiver, Channel, Identity};

/// How long a client has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection with no request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Files in one installed module directory.
const MODULE_FILES_MAX: usize = 256;

/// What the service needs from the daemon.
#[derive(Clone)]
pub struct PeerServerContext {
    pub paths: Paths,
    pub cluster: Arc<ClusterConfig>,
    pub node: String,
    pub node_index: u8,
    pub key: ClusterKey,
    pub control: Arc<RwLock<Control>>,
    pub runtime: tokio::runtime::Handle,
}

/// Binds the service on every cluster.xml address of this node and serves it on threads
/// until the process ends. An address that cannot be bound is logged and skipped: the modules
/// run without it, but the peer cannot reach this node's service there.
pub fn serve(ctx: PeerServerContext) {
    let ctx = Arc::new(ctx);
    for lan in &ctx.cluster.lans {
        let Some(addr) = ctx.cluster.addr(&lan.name, &ctx.node) else { continue };
        let at = SocketAddr::new(addr, PEER_PORT);
        let listener = match TcpListener::bind(at) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("the peer service cannot listen on {at}: {e}; the peer cannot reach it there");
                continue;
            }
        };
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new().name("peer-accept".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let ctx = ctx.clone();
                let _ = std::thread::Builder::new().name("peer-conn".into()).spawn(move || connection(&ctx, stream));
            }
        });
        if let Err(e) = spawned {
            tracing::error!("the peer service cannot start a thread for {at}: {e}");
        }
    }
}

fn connection(ctx: &PeerServerContext, stream: TcpStream) {
    let from = stream.peer_addr().ok();
    let local = Identity { module_id: PEER_SERVICE_ID, node: ctx.node_index };
    let mut channel = match handshake_receiver(stream, &ctx.key, local, HANDSHAKE_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("peer service: connection from {from:?} refused: {e}");
            return;
        }
    };
    if channel.stream.set_read_timeout(Some(IDLE_TIMEOUT)).is_err() {
        return;
    }
    loop {
        let frame = match channel.reader.poll_raw() {
            Ok(Some(f)) => f,
            // Idle, closed, or garbage: end the connection.
            Ok(None) | Err(_) => return,
        };
        let answer = match postcard::from_bytes::<PeerRequest>(&frame) {
            Ok(request) => handle(ctx, request),
            Err(_) => PeerAnswer::Error("the request does not decode (another hamirror version?)".into()),
        };
        if !send(&mut channel, &answer) {
            return;
        }
    }
}

fn send(channel: &mut Channel, answer: &PeerAnswer) -> bool {
    let Ok(bytes) = postcard::to_stdvec(answer) else { return false };
    channel.writer.send_raw(&bytes).is_ok() && channel.writer.flush().is_ok()
}

fn handle(ctx: &PeerServerContext, request: PeerRequest) -> PeerAnswer {
    let result = match request {
        PeerRequest::Modules => return PeerAnswer::Modules(modules(ctx)),
        PeerRequest::InstallModule { name, files } => install(ctx, &name, &files),
        PeerRequest::RemoveModule { name } => remove(ctx, &name),
        PeerRequest::Command { module, command } => admin(ctx, &module, &command),
        PeerRequest::DomainState { uri, name } => {
            return match crate::hypervisor::connect(&uri).state(&name) {
                Ok(state) => PeerAnswer::DomainState(state),
                Err(e) => PeerAnswer::Error(e.to_string()),
            }
        }
        PeerRequest::DefineDomain { uri, xml } => {
            crate::hypervisor::connect(&uri).define(&xml).map_err(|e| e.to_string())
        }
        PeerRequest::UndefineDomain { uri, name } => {
            crate::hypervisor::connect(&uri).undefine(&name).map_err(|e| e.to_string())
        }
        PeerRequest::SetAutostart { uri, name, on } => {
            crate::hypervisor::connect(&uri).set_autostart(&name, on).map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => PeerAnswer::Done,
        Err(e) => PeerAnswer::Error(e),
    }
}

fn modules(ctx: &PeerServerContext) -> Vec<PeerModule> {
    let set = crate::config::load_modules(&ctx.paths, &ctx.cluster);
    let control = ctx.control.blocking_read();
    let state_of = |name: &str| control.get(name).and_then(|v| v.status).map(|s| s.state);
    let mut out: Vec<PeerModule> = set
        .modules
        .iter()
        .map(|m| PeerModule {
            name: m.name.clone(),
            id: Some(m.id),
            vm: m.vm.as_ref().map(|v| v.name.clone()),
            dirs: m.rfs.as_ref().map(|r| r.replicated.iter().map(|d| d.dir.clone()).collect()).unwrap_or_default(),
            state: state_of(&m.name),
        })
        .collect();
    out.extend(set.refused.iter().map(|(name, _)| PeerModule {
        name: name.clone(),
        id: None,
        vm: None,
        dirs: Vec::new(),
        state: None,
    }));
    out
}

/// Checks a relative path of a module file: normal components only.
fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && Path::new(path).components().all(|c| matches!(c, Component::Normal(_)))
        && path.split('/').all(|c| !c.is_empty())
}

fn install(ctx: &PeerServerContext, name: &str, files: &[ModuleFile]) -> Result<(), String> {
    crate::cli::check_module_name(name).map_err(|f| f.message)?;
    if files.len() > MODULE_FILES_MAX {
        return Err(format!("a module directory holds at most {MODULE_FILES_MAX} files"));
    }
    if files.iter().map(|f| f.data.len()).sum::<usize>() > MODULE_BYTES_MAX {
        return Err(format!("a module directory holds at most {MODULE_BYTES_MAX} bytes"));
    }
    if let Some(bad) = files.iter().find(|f| !safe_relative(&f.path)) {
        return Err(format!("{:?} is not a plain relative path inside a module directory", bad.path));
    }
    let userconfig = files
        .iter()
        .find(|f| f.path == "userconfig.xml")
        .ok_or_else(|| format!("module {name} has no userconfig.xml"))?;
    let text = std::str::from_utf8(&userconfig.data).map_err(|_| "its userconfig.xml is not UTF-8".to_string())?;
    let target = ctx.paths.module_dir(name);
    let module = parse_module(text, &target.join("userconfig.xml"), &ctx.cluster).map_err(|e| e.to_string())?;
    if module.name != name {
        return Err(format!("its userconfig.xml names the module {:?}, not {name:?}", module.name));
    }
    // The replicated directories must exist here too: the replication fills them.
    for dir in module.rfs.iter().flat_map(|r| r.replicated.iter()) {
        std::fs::create_dir_all(&dir.dir).map_err(|e| format!("cannot create {}: {e}", dir.dir.display()))?;
    }
    let modules_dir = ctx.paths.modules_dir();
    let incoming = modules_dir.join(format!(".incoming-{name}"));
    let old = modules_dir.join(format!(".old-{name}"));
    let io = |what: &str, p: &Path, e: std::io::Error| format!("cannot {what} {}: {e}", p.display());
    for stale in [&incoming, &old] {
        if stale.exists() {
            std::fs::remove_dir_all(stale).map_err(|e| io("remove", stale, e))?;
        }
    }
    for f in files {
        use std::os::unix::fs::PermissionsExt;
        let dest = incoming.join(&f.path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
        }
        std::fs::write(&dest, &f.data).map_err(|e| io("write", &dest, e))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(f.mode & 0o7777))
            .map_err(|e| io("set the mode of", &dest, e))?;
    }
    if target.exists() {
        std::fs::rename(&target, &old).map_err(|e| io("move away", &target, e))?;
    }
    std::fs::rename(&incoming, &target).map_err(|e| io("install", &target, e))?;
    if let Err(why) = reload(ctx) {
        // Refused by the daemon (an id in use here...): put back what was there.
        let _ = std::fs::remove_dir_all(&target);
        if old.exists() {
            let _ = std::fs::rename(&old, &target);
        }
        let _ = reload(ctx);
        return Err(why);
    }
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io("remove", &old, e))?;
    }
    tracing::info!(module = %name, "module installed by the peer");
    Ok(())
}

fn remove(ctx: &PeerServerContext, name: &str) -> Result<(), String> {
    crate::cli::check_module_name(name).map_err(|f| f.message)?;
    {
        let control = ctx.control.blocking_read();
        if let Some(state) = control.get(name).and_then(|v| v.status).map(|s| s.state) {
            if state != crate::module::State::Stop {
                return Err(format!("module {name} is {state} on {}: stop it first", ctx.node));
            }
        }
    }
    let dir = ctx.paths.module_dir(name);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", dir.display())),
    }
    tracing::info!(module = %name, "module removed by the peer");
    reload(ctx)
}

fn admin(ctx: &PeerServerContext, module: &str, command: &str) -> Result<(), String> {
    let command = crate::api::parse_command(command, b"").map_err(|e| e.to_string())?;
    let control = ctx.control.clone();
    let module = module.to_string();
    ctx.runtime.block_on(async move { control.read().await.command(&module, command).await }).map_err(|e| e.to_string())
}

fn reload(ctx: &PeerServerContext) -> Result<(), String> {
    let Some(tx) = ctx.control.blocking_read().reload.clone() else {
        return Err("this daemon cannot reload its modules".into());
    };
    let (reply, rx) = oneshot::channel();
    tx.blocking_send(reply).map_err(|_| "the daemon is stopping".to_string())?;
    let report = rx.blocking_recv().map_err(|_| "the daemon is stopping".to_string())?;
    match report.refused.first() {
        Some((module, why)) => Err(format!("module {module} was refused on {}: {why}", ctx.node)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::safe_relative;

    #[test]
    fn module_paths() {
        for ok in ["userconfig.xml", "bin/start_prim", "a/b/c"] {
            assert!(safe_relative(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "bin/../../x", "a//b", "./a", "bin/"] {
            assert!(!safe_relative(bad), "{bad}");
        }
    }
}
