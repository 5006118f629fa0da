//! `hamirror vm register | unregister`: turns a libvirt (or Hyper-V) domain into a mirror
//! module on both hosts, and back (docs/vm.md).

use std::time::{Duration, Instant};

use super::{modules, Ctx, Failure};
use crate::cluster::{load_key, ClusterKey};
use crate::config::{load_cluster, load_modules, parse_module, ClusterConfig, MODULE_ID_MAX};
use crate::daemon::control::ModuleView;
use crate::hypervisor::{self, DomainState, HvError, Hypervisor};
use crate::module::State;
use crate::peer::{ModuleFile, PeerAnswer, PeerClient, PeerModule, PeerRequest};
use crate::vm::plan::{plan, ExistingModule, HostFs, PlanInput};
use crate::vm::{domain, render};

/// How long connecting to the peer daemon may take.
const PEER_CONNECT: Duration = Duration::from_secs(3);
/// How long one peer request may take (an install reloads the peer's daemon).
const PEER_CALL: Duration = Duration::from_secs(60);
/// How long the module may take to become primary on this node.
const START_DEADLINE: Duration = Duration::from_secs(120);
/// Default heartbeat of a registered VM (`--pulse`, `--timeout`).
pub const DEFAULT_PULSE: &str = "700ms";
pub const DEFAULT_TIMEOUT: &str = "30s";

/// The options of `vm register`.
pub struct RegisterArgs<'a> {
    pub domain: &'a str,
    pub uri: &'a str,
    pub module: Option<&'a str>,
    pub node: Option<&'a str>,
    pub pulse: &'a str,
    pub timeout: &'a str,
    pub dry_run: bool,
    pub json: bool,
}

/// This node, its peer and the cluster key.
struct Pair {
    cluster: ClusterConfig,
    node: String,
    peer: String,
    key: ClusterKey,
}

fn pair(ctx: &Ctx, node: Option<&str>) -> Result<Pair, Failure> {
    let cluster = load_cluster(&ctx.paths.cluster_xml()).map_err(|e| Failure::new(e.to_string()))?;
    let node = cluster.local_node(node).map_err(|e| Failure::new(e.to_string()))?;
    let Some((_, peer)) = cluster.pair_position(&node) else {
        return Err(Failure::new(format!("{} must list exactly two nodes", ctx.paths.cluster_xml().display())));
    };
    let key = load_key(&ctx.paths.cluster_key()).map_err(|e| Failure::new(e.to_string()))?;
    Ok(Pair { cluster, node, peer, key })
}

impl Pair {
    fn peer(&self) -> Result<PeerClient, Failure> {
        PeerClient::connect(&self.cluster, &self.key, &self.node, &self.peer, PEER_CONNECT).map_err(|e| {
            Failure::new(format!("{e}; both daemons must run to register or unregister a VM (nothing was changed)"))
        })
    }
}

fn call(peer: &mut PeerClient, request: &PeerRequest) -> Result<PeerAnswer, Failure> {
    peer.call(request, PEER_CALL).map_err(Failure::new)
}

fn peer_modules(peer: &mut PeerClient) -> Result<Vec<PeerModule>, Failure> {
    match call(peer, &PeerRequest::Modules)? {
        PeerAnswer::Modules(m) => Ok(m),
        other => Err(Failure::new(format!("the peer answered {other:?} to a module list request"))),
    }
}

/// The template directory for a domain: `vm-modules/kvm` or `vm-modules/hyperv`.
fn template(kind: &str) -> Result<String, Failure> {
    let found = modules::template_dirs().into_iter().map(|d| d.join(kind).join("userconfig.xml")).find(|p| p.is_file());
    let Some(file) = found else {
        return Err(Failure::new(format!("the VM module template {kind} was not found (set HAMIRROR_TEMPLATES)")));
    };
    std::fs::read_to_string(&file).map_err(|e| Failure::new(format!("cannot read {}: {e}", file.display())))
}

/// The lowest id used neither here nor on the peer (or the module's own when it exists).
fn choose_id(own: Option<u16>, local: &[(u16, String)], peer: &[PeerModule], module: &str) -> Result<u16, Failure> {
    if let Some(id) = own {
        return Ok(id);
    }
    let used = |id: u16| {
        local.iter().any(|(i, n)| *i == id && n != module) || peer.iter().any(|m| m.id == Some(id) && m.name != module)
    };
    (1..=MODULE_ID_MAX)
        .find(|id| !used(*id))
        .ok_or_else(|| Failure::new(format!("every module id from 1 to {MODULE_ID_MAX} is in use on one host")))
}

fn hv_failure(e: HvError, what: &str) -> Failure {
    Failure::new(format!("{what}: {e}"))
}

/// `hamirror vm register DOMAIN`.
pub(super) fn register(ctx: &Ctx, args: &RegisterArgs<'_>) -> Result<i32, Failure> {
    let pair = pair(ctx, args.node)?;
    let hv: Box<dyn Hypervisor> = hypervisor::connect(args.uri);
    let xml = hv.domain_xml(args.domain).map_err(|e| hv_failure(e, &format!("cannot read domain {}", args.domain)))?;
    let dom = domain::parse(&xml).map_err(|e| Failure::new(format!("domain {}: {e}", args.domain)))?;
    let module = args.module.unwrap_or(&dom.name).to_string();
    let set = load_modules(&ctx.paths, &pair.cluster);
    let own = set.modules.iter().find(|m| m.name == module);
    if let Some(m) = own {
        if m.vm.as_ref().map(|v| v.name.as_str()) != Some(dom.name.as_str()) {
            return Err(Failure::new(format!(
                "module {module} already exists and does not protect domain {}: choose another name with --module",
                dom.name
            )));
        }
    }
    let existing: Vec<ExistingModule> =
        set.modules.iter().filter(|m| m.name != module).map(ExistingModule::from_config).collect();
    let local_ids: Vec<(u16, String)> = set.modules.iter().map(|m| (m.id, m.name.clone())).collect();
    if !args.dry_run {
        // Both daemons must answer before anything changes.
        ctx.call("GET", "/api/v1/modules", None).map_err(|e| {
            Failure::new(format!(
                "this host's daemon does not answer ({}); both daemons must run to register a VM (nothing was changed)",
                e.message
            ))
        })?;
    }
    let mut peer = match pair.peer() {
        Ok(p) => Some(p),
        Err(e) if args.dry_run => {
            eprintln!("note: {}", e.message);
            None
        }
        Err(e) => return Err(e),
    };
    let peer_mods = match &mut peer {
        Some(p) => peer_modules(p)?,
        None => Vec::new(),
    };
    if let Some(clash) = peer_mods.iter().find(|m| m.name == module && m.vm.as_deref() != Some(dom.name.as_str())) {
        return Err(Failure::new(format!(
            "{} already has a module {} that does not protect domain {}: choose another name with --module",
            pair.peer, clash.name, dom.name
        )));
    }
    let id = choose_id(own.map(|m| m.id), &local_ids, &peer_mods, &module)?;
    let fs = HostFs::default();
    let input = PlanInput {
        module_name: Some(&module),
        modules: &existing,
        uri: args.uri,
        id: Some(id),
        peer: Some(&pair.peer),
        fs: &fs,
    };
    let plan = plan(&dom, &input).map_err(Failure::new)?;
    let running = hv.state(&dom.name).map_err(|e| hv_failure(e, "cannot read the domain's state"))?.is_active();
    if args.dry_run {
        if args.json {
            println!("{}", render::json(&plan));
        } else {
            print!("{}", render::describe(&plan));
            if running {
                println!("{} runs: it will be shut down, then started by hamirror on the replicated disks", dom.name);
            }
            println!("(dry run: nothing was changed)");
        }
        return Ok(0);
    }
    let kind = if dom.is_hyperv() { "hyperv" } else { "kvm" };
    let heart = render::Heart { pulse: args.pulse, timeout: args.timeout };
    let text = render::userconfig(&plan, &template(kind)?, args.uri, id, heart);
    let config_path = ctx.paths.userconfig(&module);
    let config = parse_module(&text, &config_path, &pair.cluster)
        .map_err(|e| Failure::new(format!("the module made for {} is not valid: {e}", dom.name)))?;
    let mut peer = peer.expect("connected unless dry run");
    let mut done: Vec<String> = Vec::new();

    // The hypervisors must not start the VM by themselves at boot: hamirror decides where.
    if hv.autostart(&dom.name).map_err(|e| hv_failure(e, "cannot read autostart"))? {
        hv.set_autostart(&dom.name, false).map_err(|e| hv_failure(e, "cannot disable autostart"))?;
        done.push(format!("disabled autostart of {} on {}", dom.name, pair.node));
    }
    call(&mut peer, &PeerRequest::DefineDomain { uri: args.uri.to_string(), xml: xml.clone() })?;
    done.push(format!("defined domain {} on {}", dom.name, pair.peer));
    let off = PeerRequest::SetAutostart { uri: args.uri.to_string(), name: dom.name.clone(), on: false };
    call(&mut peer, &off)?;
    done.push(format!("autostart of {} is off on {}", dom.name, pair.peer));
    if running {
        // qemu's open files would bypass the replication: the module starts the VM again
        // once its directories are mirrored.
        let stop_timeout = config.vm.as_ref().map_or(Duration::from_secs(120), |v| v.stop_timeout);
        let how = hv.shutdown(&dom.name, stop_timeout).map_err(|e| hv_failure(e, "cannot shut the domain down"))?;
        let verb = match how {
            crate::hypervisor::StopOutcome::Destroyed => "destroyed (it did not shut down in time)",
            _ => "shut down",
        };
        done.push(format!("domain {} {verb} on {}: hamirror starts it on the replicated disks", dom.name, pair.node));
    }
    for d in &plan.dirs {
        std::fs::create_dir_all(&d.dir).map_err(|e| Failure::new(format!("cannot create {}: {e}", d.dir)))?;
    }
    let files = vec![ModuleFile { path: "userconfig.xml".into(), mode: 0o644, data: text.clone().into_bytes() }];
    call(&mut peer, &PeerRequest::InstallModule { name: module.clone(), files })?;
    done.push(format!("installed module {module} (id {id}) on {}", pair.peer));
    crate::paths::write_durably(&config_path, text.as_bytes())
        .map_err(|e| Failure::new(format!("cannot write {}: {e}", config_path.display())))?;
    done.push(format!("installed module {module} (id {id}) on {} in {}", pair.node, config_path.display()));
    let report: crate::daemon::control::ReloadReport =
        ctx.call("POST", "/api/v1/reload", None)?.json().map_err(|e| super::bad_answer(&e))?;
    if let Some((m, why)) = report.refused.iter().find(|(m, _)| *m == module) {
        return Err(Failure::new(format!("this node's daemon refused module {m}: {why}")));
    }
    for line in &done {
        println!("{line}");
    }
    start_pair(ctx, &mut peer, &pair, &module, &dom.name)?;
    Ok(0)
}

/// The module's state on this node (`None`: it does not run, its configuration is refused).
fn local_state(ctx: &Ctx, module: &str) -> Result<Option<State>, Failure> {
    let view: ModuleView =
        ctx.call("GET", &super::module_path(module), None)?.json().map_err(|e| super::bad_answer(&e))?;
    Ok(view.status.map(|s| s.state))
}

/// `None` or the state, for messages.
fn state_word(state: Option<State>) -> String {
    state.map_or_else(|| "?".to_string(), |s| s.to_string())
}

/// Starts a freshly registered module: here first, where the VM runs, then on the peer,
/// which joins as secondary and receives a full copy. A module already running is left as
/// it is.
fn start_pair(ctx: &Ctx, peer: &mut PeerClient, pair: &Pair, module: &str, vm: &str) -> Result<(), Failure> {
    let here = local_state(ctx, module)?;
    let there = peer_modules(peer)?.into_iter().find(|m| m.name == module).and_then(|m| m.state);
    let stopped = |s: Option<State>| matches!(s, None | Some(State::Stop));
    if !stopped(here) || !stopped(there) {
        println!(
            "module {module} already runs ({}: {}, {}: {}): left as it is",
            pair.node,
            state_word(here),
            pair.peer,
            state_word(there)
        );
        return Ok(());
    }
    ctx.call("POST", &format!("{}/start", super::module_path(module)), None)?;
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let state = local_state(ctx, module)?;
        if state.is_some_and(State::is_primary) {
            break;
        }
        if Instant::now() > deadline {
            return Err(Failure::new(format!(
                "module {module} is {} on {} after {START_DEADLINE:?}, not primary: see `hamirror log {module}`",
                state_word(state),
                pair.node
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("started module {module} on {}: primary, domain {vm} runs here", pair.node);
    call(peer, &PeerRequest::Command { module: module.to_string(), command: "start".into() })?;
    println!(
        "started module {module} on {}: it becomes secondary after a full copy (follow it there with `hamirror resync {module}`)",
        pair.peer
    );
    Ok(())
}

/// `hamirror vm unregister MODULE`: removes the module from both hosts, and the domain's
/// definition from the peer; the disks and this host's definition stay.
pub(super) fn unregister(ctx: &Ctx, module: &str, node: Option<&str>) -> Result<i32, Failure> {
    modules::check_name(module)?;
    let pair = pair(ctx, node)?;
    let set = load_modules(&ctx.paths, &pair.cluster);
    let Some(config) = set.modules.iter().find(|m| m.name == module) else {
        return Err(Failure::new(format!("no valid module named {module} is installed on {}", pair.node)));
    };
    let Some(vm) = config.vm.clone() else {
        return Err(Failure::new(format!(
            "module {module} protects no VM: remove it with `hamirror module remove {module}`"
        )));
    };
    let mut peer = pair.peer()?;
    let here = local_state(ctx, module)?;
    let there = peer_modules(&mut peer)?.into_iter().find(|m| m.name == module).and_then(|m| m.state);
    for (node, state) in [(&pair.node, here), (&pair.peer, there)] {
        if let Some(s) = state.filter(|s| *s != State::Stop) {
            return Err(Failure::new(format!(
                "module {module} is {s} on {node}: stop it on both hosts first (`hamirror stop {module}`, the \
                 secondary first; this shuts the VM down), nothing was changed"
            )));
        }
    }
    let peer_vm = match call(&mut peer, &PeerRequest::DomainState { uri: vm.uri.clone(), name: vm.name.clone() })? {
        PeerAnswer::DomainState(s) => s,
        other => return Err(Failure::new(format!("the peer answered {other:?} to a domain state request"))),
    };
    call(&mut peer, &PeerRequest::RemoveModule { name: module.to_string() })?;
    println!("removed module {module} from {}", pair.peer);
    modules::remove(ctx, module)?;
    match peer_vm {
        DomainState::Undefined => {}
        s if s.is_active() => println!("domain {} runs on {}: its definition is kept there", vm.name, pair.peer),
        _ => {
            call(&mut peer, &PeerRequest::UndefineDomain { uri: vm.uri.clone(), name: vm.name.clone() })?;
            println!("removed the definition of domain {} from {} (its files are kept)", vm.name, pair.peer);
        }
    }
    println!("domain {} stays defined on {} with autostart off; its disks were not touched", vm.name, pair.node);
    Ok(0)
}
