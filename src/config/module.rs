//! `modules/<name>/userconfig.xml`: parsing, validation and defaults, and loading every module
//! of a node (a bad module is refused, the others load).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::check::{Ck, R};
use super::error::{nearest, ConfigError};
use super::units::{self, format_duration, format_size};
use super::xml::{self, Element};
use super::*;

/// Default heartbeat period.
pub const DEFAULT_PULSE: Duration = Duration::from_millis(700);
/// Shortest heartbeat period accepted.
pub const MIN_PULSE: Duration = Duration::from_millis(50);
/// Default time without heartbeats after which a lan is considered down.
pub const DEFAULT_HEART_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `maxloop` (restarts allowed within `loop_interval`).
pub const DEFAULT_MAXLOOP: u32 = 3;
/// Default `loop_interval`.
pub const DEFAULT_LOOP_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Default replication zone (dirty-zone map granularity).
pub const DEFAULT_ZONE: u64 = 1 << 20;
/// Smallest and largest replication zone.
pub const MIN_ZONE: u64 = 4 << 10;
pub const MAX_ZONE: u64 = 64 << 20;
/// Default libvirt URI of `<vm>`.
pub const DEFAULT_VM_URI: &str = "qemu:///system";
/// Default `<vm stop_timeout>`.
pub const DEFAULT_VM_STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// Default `nicestoptimeout`, `forcestoptimeout` and `starttimeout` of `<user>`.
pub const DEFAULT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default checker interval, and the shortest accepted.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);

const MODULE_CHILDREN: &[&str] = &["heart", "failover", "splitbrain", "rfs", "vm", "user", "check"];
const MODULE_NAME_EXPECTED: &str = "a module name of 1 to 32 letters, digits, '_' or '-'";
const ADDR_EXPECTED: &str = "an IPv4 or IPv6 address";
const ON_OFF_ALIASES: &[(&str, &str)] = &[
    ("yes", "on"),
    ("true", "on"),
    ("1", "on"),
    ("enabled", "on"),
    ("no", "off"),
    ("false", "off"),
    ("0", "off"),
    ("disabled", "off"),
];
const MIN_TIMEOUT: Duration = Duration::from_secs(1);

/// `[A-Za-z0-9_-]{1,32}`
pub(crate) fn is_module_name(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `[A-Za-z_][A-Za-z0-9_]*`, not starting with `HAMIRROR_`.
fn is_var_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
        && !s.starts_with("HAMIRROR_")
}

/// A checker ident: 1 to 64 characters, no whitespace, control character or '/'.
fn is_ident(s: &str) -> bool {
    (1..=64).contains(&s.chars().count()) && s.chars().all(|c| !c.is_whitespace() && !c.is_control() && c != '/')
}

/// A process name as in /proc/<pid>/comm: 1 to 15 bytes, no '/' or control character.
fn is_proc_name(s: &str) -> bool {
    (1..=15).contains(&s.len()) && s.chars().all(|c| !c.is_control() && c != '/')
}

/// A script file name in `bin/`: no '/', not `.` or `..`, no control character.
fn is_script_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.len() <= 255 && s.chars().all(|c| !c.is_control() && c != '/')
}

/// A libvirt domain name: 1 to 255 characters, no '/' or control character.
fn is_domain_name(s: &str) -> bool {
    (1..=255).contains(&s.len()) && s.chars().all(|c| !c.is_control() && c != '/')
}

/// `driver[+transport]://...`
fn is_libvirt_uri(s: &str) -> bool {
    match s.split_once("://") {
        Some((scheme, _)) => {
            let mut b = scheme.bytes();
            matches!(b.next(), Some(c) if c.is_ascii_alphabetic())
                && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'.' | b'-'))
        }
        None => false,
    }
}

/// An absolute path, normalised (no empty or `.` components, no trailing '/'); `None` when it
/// is not absolute, is `/`, or has a `..` component.
fn normalize_abs(s: &str) -> Option<PathBuf> {
    if !s.starts_with('/') {
        return None;
    }
    let rel = normalize_rel(s.trim_start_matches('/'))?;
    Some(Path::new("/").join(rel))
}

/// A relative path, normalised; `None` when empty, absolute, or with a `..` component.
fn normalize_rel(s: &str) -> Option<PathBuf> {
    if s.starts_with('/') || s.contains('\0') {
        return None;
    }
    let mut parts = Vec::new();
    for part in s.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.iter().collect())
}

/// Lines of the root element and of its attributes, for errors raised by [`load_modules`].
struct RootLines {
    module: usize,
    name: usize,
    id: usize,
}

/// Reads and validates one `userconfig.xml` against `cluster`.
pub fn load_module(path: &Path, cluster: &ClusterConfig) -> Result<ModuleConfig, ConfigError> {
    let text = super::read_file(path)?;
    parse_module(&text, path, cluster)
}

/// Validates the text of a `userconfig.xml` against `cluster`; `file` is only used in errors.
pub fn parse_module(text: &str, file: &Path, cluster: &ClusterConfig) -> Result<ModuleConfig, ConfigError> {
    parse_module_lines(text, file, cluster).map(|(m, _)| m)
}

fn parse_module_lines(text: &str, file: &Path, cluster: &ClusterConfig) -> R<(ModuleConfig, RootLines)> {
    let root = xml::parse(text, file, "module")?;
    let ck = Ck::new(file);
    ck.root(&root, "module")?;
    ck.attrs(&root, &["name", "mode", "id"])?;
    let name = ck.name(&root, "name", is_module_name, MODULE_NAME_EXPECTED)?;
    let mode = match ck.choice(&root, "mode", &["mirror", "farm"], "mirror", &[])? {
        "farm" => ModuleMode::Farm,
        _ => ModuleMode::Mirror,
    };
    let id = ck.number(&root, "id", None, 1u16, MODULE_ID_MAX)?;
    let lines = RootLines {
        module: root.line,
        name: root.attr("name").map_or(root.line, |a| a.line),
        id: root.attr("id").map_or(root.line, |a| a.line),
    };
    if cluster.lans.is_empty() {
        return Err(ck.bad_el(&root, "a cluster.xml with at least one lan", "none"));
    }
    let nodes = cluster.node_names();
    if mode == ModuleMode::Mirror && nodes.len() != 2 {
        let err = ck.bad_el(
            &root,
            "exactly two nodes in cluster.xml for a mirror module",
            format!("{} ({})", nodes.len(), nodes.join(", ")),
        );
        return Err(match root.attr("mode") {
            Some(_) => err,
            None => err.with_note("mode defaults to mirror; use mode=\"farm\" for a module on more nodes"),
        });
    }
    ck.children(&root, MODULE_CHILDREN)?;
    let mut single = HashMap::new();
    for child in MODULE_CHILDREN {
        single.insert(*child, ck.single(&root, child)?);
    }
    let get = |n: &str| single.get(n).copied().flatten();

    let heart = heart(&ck, get("heart"), cluster)?;
    let failover = failover(&ck, get("failover"), cluster)?;
    let splitbrain = match get("splitbrain") {
        Some(el) => splitbrain(&ck, el)?,
        None => None,
    };
    let rfs = match get("rfs") {
        Some(el) if mode == ModuleMode::Farm => {
            return Err(ck
                .bad_el(el, "no <rfs> in a farm module", "<rfs>")
                .with_note("replication needs mode=\"mirror\""))
        }
        Some(el) => Some(rfs(&ck, el, cluster, &heart)?),
        None => None,
    };
    let vm = match get("vm") {
        Some(el) => Some(vm(&ck, el)?),
        None => None,
    };
    let user = user(&ck, get("user"))?;
    let checks = match get("check") {
        Some(el) => checks(&ck, el, vm.as_ref())?,
        None => Vec::new(),
    };
    let m = ModuleConfig { name, mode, id, heart, failover, splitbrain, rfs, vm, user, checks };
    Ok((m, lines))
}

fn lan_names(cluster: &ClusterConfig) -> Vec<&str> {
    cluster.lans.iter().map(|l| l.name.as_str()).collect()
}

/// A lan name attribute that must name a lan of cluster.xml.
fn cluster_lan(ck: &Ck<'_>, el: &Element, attr: &str, cluster: &ClusterConfig) -> R<String> {
    let names = lan_names(cluster);
    let expected = format!("a lan of cluster.xml ({})", names.join(", "));
    let a = ck.req(el, attr, &expected)?;
    if names.contains(&a.value.as_str()) {
        Ok(a.value.clone())
    } else {
        Err(ck.bad(el, a, expected).with_suggestion(nearest(&a.value, names.iter().copied())))
    }
}

fn heart(ck: &Ck<'_>, el: Option<&Element>, cluster: &ClusterConfig) -> R<HeartConfig> {
    let Some(el) = el else {
        return Ok(HeartConfig {
            pulse: DEFAULT_PULSE,
            timeout: DEFAULT_HEART_TIMEOUT,
            lans: lan_names(cluster).into_iter().map(str::to_string).collect(),
        });
    };
    ck.attrs(el, &["pulse", "timeout"])?;
    ck.children(el, &["lan"])?;
    let pulse = ck.duration(el, "pulse", DEFAULT_PULSE, MIN_PULSE)?;
    let timeout = ck.duration(el, "timeout", DEFAULT_HEART_TIMEOUT, Duration::ZERO)?;
    let twice = pulse.saturating_mul(2);
    if timeout < twice {
        return Err(match el.attr("timeout") {
            Some(a) => ck.bad(el, a, format!("at least twice the pulse ({} or more)", format_duration(twice))),
            None => ck.bad_named(
                el,
                "pulse",
                format!(
                    "at most half the timeout ({} or less, the default timeout being {})",
                    format_duration(timeout / 2),
                    format_duration(timeout)
                ),
            ),
        });
    }
    let mut lans: Vec<String> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for lan in &el.children {
        ck.attrs(lan, &["name"])?;
        ck.children(lan, &[])?;
        let name = cluster_lan(ck, lan, "name", cluster)?;
        if let Some(prev) = seen.get(&name) {
            return Err(ck
                .bad_named(lan, "name", "each lan once in <heart>")
                .with_note(format!("lan \"{name}\" is already listed on line {prev}")));
        }
        seen.insert(name.clone(), lan.line);
        lans.push(name);
    }
    if lans.is_empty() {
        lans = lan_names(cluster).into_iter().map(str::to_string).collect();
    }
    Ok(HeartConfig { pulse, timeout, lans })
}

fn failover(ck: &Ck<'_>, el: Option<&Element>, cluster: &ClusterConfig) -> R<FailoverConfig> {
    let Some(el) = el else {
        return Ok(FailoverConfig {
            auto: true,
            defaultprim: DefaultPrim::Alone,
            maxloop: DEFAULT_MAXLOOP,
            loop_interval: DEFAULT_LOOP_INTERVAL,
        });
    };
    ck.attrs(el, &["auto", "defaultprim", "maxloop", "loop_interval"])?;
    ck.children(el, &[])?;
    let auto = ck.choice(el, "auto", &["on", "off"], "on", ON_OFF_ALIASES)? == "on";
    let defaultprim = match el.attr("defaultprim") {
        None => DefaultPrim::Alone,
        Some(a) if a.value == "alone" => DefaultPrim::Alone,
        Some(a) if a.value == "lastprim" => DefaultPrim::Lastprim,
        Some(a) => {
            let nodes = cluster.node_names();
            if nodes.contains(&a.value) {
                DefaultPrim::Node(a.value.clone())
            } else {
                let mut options: Vec<&str> = vec!["alone", "lastprim"];
                options.extend(nodes.iter().map(String::as_str));
                return Err(ck
                    .bad(el, a, format!("alone, lastprim or a node of cluster.xml ({})", nodes.join(", ")))
                    .with_suggestion(nearest(&a.value, options)));
            }
        }
    };
    let maxloop = ck.number(el, "maxloop", Some(DEFAULT_MAXLOOP), 0, 1000)?;
    let loop_interval = ck.duration(el, "loop_interval", DEFAULT_LOOP_INTERVAL, MIN_TIMEOUT)?;
    Ok(FailoverConfig { auto, defaultprim, maxloop, loop_interval })
}

fn splitbrain(ck: &Ck<'_>, el: &Element) -> R<Option<SplitBrainConfig>> {
    ck.attrs(el, &["witness"])?;
    ck.children(el, &[])?;
    let Some(a) = el.attr("witness") else {
        return Ok(None);
    };
    let expected = "IP addresses separated by spaces";
    let mut witnesses: Vec<IpAddr> = Vec::new();
    for tok in a.value.split_whitespace() {
        let ip: IpAddr = match tok.parse() {
            Ok(ip) => ip,
            Err(_) => return Err(ck.bad(el, a, expected).with_note(format!("\"{tok}\" is not an IP address"))),
        };
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(ck.bad(el, a, expected).with_note(format!("{tok} is not a host address")));
        }
        if witnesses.contains(&ip) {
            return Err(ck.bad(el, a, expected).with_note(format!("{tok} is listed twice")));
        }
        witnesses.push(ip);
    }
    Ok(if witnesses.is_empty() { None } else { Some(SplitBrainConfig { witnesses }) })
}

fn rfs(ck: &Ck<'_>, el: &Element, cluster: &ClusterConfig, heart: &HeartConfig) -> R<RfsConfig> {
    ck.attrs(el, &["sync", "lan", "zone", "bandwidth"])?;
    ck.children(el, &["replicated", "notreplicated"])?;
    let sync = match ck.choice(el, "sync", &["sync", "async"], "sync", &[])? {
        "async" => SyncMode::Async,
        _ => SyncMode::Sync,
    };
    let lan = match el.attr("lan") {
        Some(_) => cluster_lan(ck, el, "lan", cluster)?,
        None => match heart.lans.first() {
            Some(l) => l.clone(),
            None => return Err(ck.bad_el(el, "a lan for replication", "none")),
        },
    };
    let zone_bytes = ck.size(el, "zone", DEFAULT_ZONE)?;
    if !zone_bytes.is_power_of_two() || !(MIN_ZONE..=MAX_ZONE).contains(&zone_bytes) {
        return Err(ck.bad_named(
            el,
            "zone",
            format!("a power of two between {} and {}", format_size(MIN_ZONE), format_size(MAX_ZONE)),
        ));
    }
    let bandwidth_bytes_per_s = match el.attr("bandwidth") {
        None => 0,
        Some(a) => {
            let v = a.value.trim();
            let v = v.strip_suffix("/s").unwrap_or(v);
            units::size(v).map_err(|e| {
                let err = ck
                    .bad(el, a, "bytes per second, plain or with a unit (KiB, MiB, GiB), 0 for no cap")
                    .with_suggestion(e.suggestion);
                match e.note {
                    Some(note) => err.with_note(note),
                    None => err,
                }
            })?
        }
    };

    // <replicated dir> children, with their own <notreplicated> children.
    let mut replicated: Vec<ReplicatedDir> = Vec::new();
    let mut dir_lines: Vec<usize> = Vec::new();
    let dir_expected = "an absolute directory path other than \"/\", without \"..\"";
    for r in el.children_named("replicated") {
        ck.attrs(r, &["dir"])?;
        ck.children(r, &["notreplicated"])?;
        let a = ck.req(r, "dir", dir_expected)?;
        let dir = normalize_abs(a.value.trim()).ok_or_else(|| ck.bad(r, a, dir_expected))?;
        for (other, line) in replicated.iter().zip(&dir_lines) {
            let o = &other.dir;
            let why = if *o == dir {
                format!("it is already listed on line {line}")
            } else if dir.starts_with(o) {
                format!("it is inside {} (line {line})", o.display())
            } else if o.starts_with(&dir) {
                format!("it contains {} (line {line})", o.display())
            } else {
                continue;
            };
            return Err(ck
                .bad(r, a, "a directory neither inside nor containing another replicated directory")
                .with_note(why));
        }
        let mut rd = ReplicatedDir { dir, notreplicated: Vec::new() };
        for n in &r.children {
            ck.attrs(n, &["path"])?;
            ck.children(n, &[])?;
            let expected = format!("a path relative to {} (or absolute inside it), without \"..\"", rd.dir.display());
            let pa = ck.req(n, "path", &expected)?;
            let rel = relative_in(&rd.dir, pa.value.trim()).ok_or_else(|| ck.bad(n, pa, expected))?;
            add_notreplicated(ck, n, &mut rd, rel)?;
        }
        replicated.push(rd);
        dir_lines.push(r.line);
    }
    if replicated.is_empty() {
        return Err(ck.bad_el(el, "at least one <replicated dir=\"/...\"/>", "none"));
    }
    // <notreplicated> directly under <rfs>: absolute inside a replicated dir, or relative to
    // the only one.
    for n in el.children_named("notreplicated") {
        ck.attrs(n, &["path"])?;
        ck.children(n, &[])?;
        let dirs: Vec<String> = replicated.iter().map(|r| r.dir.display().to_string()).collect();
        let expected = if replicated.len() == 1 {
            format!("a path relative to {} (or absolute inside it), without \"..\"", dirs.join(""))
        } else {
            format!("an absolute path inside one of the replicated directories ({}), without \"..\"", dirs.join(", "))
        };
        let pa = ck.req(n, "path", &expected)?;
        let v = pa.value.trim();
        let found = if v.starts_with('/') || replicated.len() == 1 {
            replicated.iter().position(|r| relative_in(&r.dir, v).is_some())
        } else {
            None
        };
        let Some(i) = found else {
            return Err(ck.bad(n, pa, expected));
        };
        let Some(rd) = replicated.get_mut(i) else {
            return Err(ck.bad(n, pa, expected));
        };
        let Some(rel) = relative_in(&rd.dir, v) else {
            return Err(ck.bad(n, pa, expected));
        };
        add_notreplicated(ck, n, rd, rel)?;
    }
    Ok(RfsConfig { sync, lan, zone_bytes, bandwidth_bytes_per_s, replicated })
}

/// `path` (relative, or absolute inside `dir`) as a normalised path relative to `dir`.
fn relative_in(dir: &Path, path: &str) -> Option<PathBuf> {
    if path.starts_with('/') {
        let abs = normalize_abs(path)?;
        let rel = abs.strip_prefix(dir).ok()?;
        if rel.as_os_str().is_empty() {
            None
        } else {
            Some(rel.to_path_buf())
        }
    } else {
        normalize_rel(path)
    }
}

fn add_notreplicated(ck: &Ck<'_>, n: &Element, rd: &mut ReplicatedDir, rel: PathBuf) -> R<()> {
    if rd.notreplicated.contains(&rel) {
        return Err(ck
            .bad_named(n, "path", "each path once")
            .with_note(format!("{} is already not replicated", rd.dir.join(&rel).display())));
    }
    rd.notreplicated.push(rel);
    Ok(())
}

fn vm(ck: &Ck<'_>, el: &Element) -> R<VmConfig> {
    ck.attrs(el, &["name", "uri", "stop_timeout"])?;
    ck.children(el, &[])?;
    let name = ck.name(el, "name", is_domain_name, "a libvirt domain name (no '/')")?;
    let uri = match el.attr("uri") {
        None => DEFAULT_VM_URI.to_string(),
        Some(a) if is_libvirt_uri(a.value.trim()) => a.value.trim().to_string(),
        Some(a) => return Err(ck.bad(el, a, "a libvirt URI such as qemu:///system")),
    };
    let stop_timeout = ck.duration(el, "stop_timeout", DEFAULT_VM_STOP_TIMEOUT, MIN_TIMEOUT)?;
    Ok(VmConfig { name, uri, stop_timeout })
}

fn user(ck: &Ck<'_>, el: Option<&Element>) -> R<UserConfig> {
    let Some(el) = el else {
        return Ok(UserConfig {
            nicestoptimeout: DEFAULT_SCRIPT_TIMEOUT,
            forcestoptimeout: DEFAULT_SCRIPT_TIMEOUT,
            starttimeout: DEFAULT_SCRIPT_TIMEOUT,
            vars: Vec::new(),
        });
    };
    ck.attrs(el, &["nicestoptimeout", "forcestoptimeout", "starttimeout"])?;
    ck.children(el, &["var"])?;
    let d = |n: &str| ck.duration(el, n, DEFAULT_SCRIPT_TIMEOUT, MIN_TIMEOUT);
    let nicestoptimeout = d("nicestoptimeout")?;
    let forcestoptimeout = d("forcestoptimeout")?;
    let starttimeout = d("starttimeout")?;
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for v in &el.children {
        ck.attrs(v, &["name", "value"])?;
        ck.children(v, &[])?;
        let expected = "an environment variable name ([A-Za-z_][A-Za-z0-9_]*) not starting with HAMIRROR_";
        let name = ck.name(v, "name", is_var_name, expected)?;
        let value = ck.req(v, "value", "the variable's value (may be empty)")?.value.clone();
        if let Some(prev) = seen.get(&name) {
            return Err(ck
                .bad_named(v, "name", "each variable once")
                .with_note(format!("{name} is already set on line {prev}")));
        }
        seen.insert(name.clone(), v.line);
        vars.push((name, value));
    }
    Ok(UserConfig { nicestoptimeout, forcestoptimeout, starttimeout, vars })
}

fn checks(ck: &Ck<'_>, el: &Element, vm: Option<&VmConfig>) -> R<Vec<CheckConfig>> {
    ck.attrs(el, &[])?;
    let allowed = ["proc", "tcp", "custom", "vm"];
    let mut out: Vec<CheckConfig> = Vec::new();
    let mut seen: HashMap<String, (String, usize)> = HashMap::new();
    for c in &el.children {
        let (ident, kind) = match c.name.as_str() {
            "proc" => {
                ck.attrs(c, &["name", "ident", "atleast", "action", "interval"])?;
                let expected = "a process name as in /proc/PID/comm (1 to 15 characters, no '/')";
                let name = ck.name(c, "name", is_proc_name, expected)?;
                let ident = match c.attr("ident") {
                    Some(_) => ck.name(c, "ident", is_ident, IDENT_EXPECTED)?,
                    None => name.clone(),
                };
                let atleast = ck.number(c, "atleast", Some(1u32), 1, 100_000)?;
                (ident, CheckKind::Proc { name, atleast })
            }
            "tcp" => {
                ck.attrs(c, &["ident", "addr", "port", "action", "interval"])?;
                let ident = ck.name(c, "ident", is_ident, IDENT_EXPECTED)?;
                let a = ck.req(c, "addr", ADDR_EXPECTED)?;
                let addr = ck.ip(c, a, ADDR_EXPECTED)?;
                let port = ck.number(c, "port", None, 1u16, u16::MAX)?;
                (ident, CheckKind::Tcp { addr, port })
            }
            "custom" => {
                ck.attrs(c, &["ident", "script", "action", "interval"])?;
                let ident = ck.name(c, "ident", is_ident, IDENT_EXPECTED)?;
                let script = ck.name(
                    c,
                    "script",
                    is_script_name,
                    "the file name of a script in the module's bin/ directory (no '/')",
                )?;
                (ident, CheckKind::Custom { script })
            }
            "vm" => {
                ck.attrs(c, &["ident", "action", "interval"])?;
                let Some(vm) = vm else {
                    return Err(ck
                        .bad_el(
                            c,
                            "a <vm name=\"..\"/> element in the module naming the domain to watch",
                            "a <vm> check in a module without one",
                        )
                        .with_note("add <vm name=\"DOMAIN\"/> to the module, or remove this check"));
                };
                let ident = match c.attr("ident") {
                    Some(_) => ck.name(c, "ident", is_ident, IDENT_EXPECTED)?,
                    None => "vm".to_string(),
                };
                (ident, CheckKind::Vm { name: vm.name.clone(), uri: vm.uri.clone() })
            }
            other => return Err(ConfigError::unknown_element(ck.file, c.line, other, Some("check"), &allowed)),
        };
        ck.children(c, &[])?;
        let action = match ck.choice(c, "action", &["restart", "stopstart"], "restart", &[])? {
            "stopstart" => CheckAction::Stopstart,
            _ => CheckAction::Restart,
        };
        let interval = ck.duration(c, "interval", DEFAULT_CHECK_INTERVAL, MIN_CHECK_INTERVAL)?;
        if let Some((kind, line)) = seen.get(&ident) {
            let attr = if c.attr("ident").is_some() { "ident" } else { "name" };
            return Err(ck
                .bad_named(c, attr, "an ident no other check uses")
                .with_note(format!("the <{kind}> check on line {line} is already \"{ident}\"")));
        }
        seen.insert(ident.clone(), (c.name.clone(), c.line));
        out.push(CheckConfig { ident, kind, action, interval });
    }
    Ok(out)
}

const IDENT_EXPECTED: &str = "an identifier of 1 to 64 characters without spaces or '/'";

/// The modules of a node: those that loaded, and those refused with the reason.
#[derive(Debug, Clone, Default)]
pub struct ModuleSet {
    /// Valid modules, sorted by name.
    pub modules: Vec<ModuleConfig>,
    /// Refused modules: the module directory's name and why.
    pub refused: Vec<(String, ConfigError)>,
}

/// Loads every `modules/<name>/userconfig.xml` of `paths`, sorted by name. A module is
/// refused (and the others still load) when its file is missing or invalid, when its `name`
/// differs from its directory's name, when its id is already used by an earlier module, or
/// when it would be mirror module number 33 or more. Directories whose name starts with '.'
/// are skipped; a missing `modules/` directory means no modules.
pub fn load_modules(paths: &crate::paths::Paths, cluster: &ClusterConfig) -> ModuleSet {
    let dir = paths.modules_dir();
    let mut set = ModuleSet::default();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return set,
        Err(e) => {
            set.refused.push(("modules".to_string(), ConfigError::io(&dir, &e)));
            return set;
        }
    };
    let mut names: Vec<String> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        names.push(name);
    }
    names.sort();
    let mut ids: HashMap<u16, String> = HashMap::new();
    let mut mirrors = 0usize;
    for name in names {
        let file = paths.userconfig(&name);
        let parsed = super::read_file(&file).and_then(|text| parse_module_lines(&text, &file, cluster));
        let (m, lines) = match parsed {
            Ok(ok) => ok,
            Err(e) => {
                set.refused.push((name, e));
                continue;
            }
        };
        if m.name != name {
            let e = ConfigError::invalid_attr(
                &file,
                lines.name,
                "module",
                "name",
                format!("\"{name}\", the name of the module's directory"),
                m.name.clone(),
            );
            set.refused.push((name, e));
            continue;
        }
        if let Some(other) = ids.get(&m.id) {
            let e = ConfigError::invalid_attr(
                &file,
                lines.id,
                "module",
                "id",
                "an id no other module uses",
                m.id.to_string(),
            )
            .with_note(format!("module \"{other}\" already uses id {}", m.id));
            set.refused.push((name, e));
            continue;
        }
        if m.mode == ModuleMode::Mirror {
            if mirrors >= MIRROR_MODULES_MAX {
                let e = ConfigError::invalid_element(
                    &file,
                    lines.module,
                    "module",
                    format!("at most {MIRROR_MODULES_MAX} mirror modules per node"),
                    format!("mirror module number {}", mirrors + 1),
                )
                .with_note(format!(
                    "the limit is {MIRROR_MODULES_MAX} mirror modules per node; module \"{name}\" is refused"
                ));
                set.refused.push((name, e));
                continue;
            }
            mirrors += 1;
        }
        ids.insert(m.id, name);
        set.modules.push(m);
    }
    set
}
