//! A [`Plan`] turned into text: the module's `userconfig.xml` from a `vm-modules/` template,
//! the human description printed by `vm register --dry-run`, and its stable JSON form.
//!
//! Template macros: `%MODULE_NAME%`, `%VM_NAME%`, `%VM_URI%`, `%PULSE%`, `%TIMEOUT%` (replaced
//! wherever they appear, XML-escaped) and `%REPLICATED_DIRS%` (the line holding it becomes one
//! `<replicated dir=".."/>` line per directory, with the same indentation). `id="auto"` on the
//! root `<module>` tag becomes the module's id.

use std::fmt::Write as _;

use super::plan::{Plan, Role};

/// Macro replaced by the module name.
pub const MACRO_MODULE_NAME: &str = "%MODULE_NAME%";
/// Macro replaced by the domain name.
pub const MACRO_VM_NAME: &str = "%VM_NAME%";
/// Macro replaced by the hypervisor URI.
pub const MACRO_VM_URI: &str = "%VM_URI%";
/// Macros replaced by the heartbeat's `pulse` and `timeout`.
pub const MACRO_PULSE: &str = "%PULSE%";
pub const MACRO_TIMEOUT: &str = "%TIMEOUT%";
/// Macro whose line is replaced by one `<replicated dir=".."/>` line per directory.
pub const MACRO_REPLICATED_DIRS: &str = "%REPLICATED_DIRS%";

/// Escapes a value for an XML attribute (quoted with `"`) or text.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The module's heartbeat (`<heart pulse timeout>`), as written in the file.
#[derive(Debug, Clone, Copy)]
pub struct Heart<'a> {
    pub pulse: &'a str,
    pub timeout: &'a str,
}

/// The module's `userconfig.xml`: `template` with its macros expanded, the hypervisor `uri`,
/// the module `id` (which replaces `id="auto"` on the `<module>` tag) and its `heart`.
pub fn userconfig(plan: &Plan, template: &str, uri: &str, id: u16, heart: Heart<'_>) -> String {
    let mut out = String::with_capacity(template.len() + 256);
    let mut root_done = false;
    for line in template.split_inclusive('\n') {
        if let Some(at) = line.find(MACRO_REPLICATED_DIRS) {
            let indent = &line[..at];
            let indent = if indent.trim().is_empty() { indent } else { "    " };
            for d in &plan.dirs {
                let _ = writeln!(out, "{indent}<replicated dir=\"{}\"/>", escape(&d.dir));
            }
            continue;
        }
        let mut line = line
            .replace(MACRO_MODULE_NAME, &escape(&plan.module))
            .replace(MACRO_VM_NAME, &escape(&plan.domain))
            .replace(MACRO_VM_URI, &escape(uri))
            .replace(MACRO_PULSE, &escape(heart.pulse))
            .replace(MACRO_TIMEOUT, &escape(heart.timeout));
        if !root_done && line.trim_start().starts_with("<module") {
            root_done = true;
            line = line.replacen("id=\"auto\"", &format!("id=\"{id}\""), 1);
        }
        out.push_str(&line);
    }
    out
}

/// The plan for humans (`vm register --dry-run`).
pub fn describe(plan: &Plan) -> String {
    let mut s = String::new();
    let peer = plan.peer.as_deref().unwrap_or("the peer");
    let id = plan.id.map_or_else(|| "the lowest free id".to_string(), |i| format!("id {i}"));
    let _ = writeln!(s, "domain {} ({}) at {}", plan.domain, plan.domain_type, plan.uri);
    if let Some(u) = &plan.uuid {
        let _ = writeln!(s, "  uuid {u}");
    }
    let _ = writeln!(s, "\nreplicated directories:");
    for d in &plan.dirs {
        let _ = writeln!(s, "  {}", d.dir);
        for f in &d.files {
            let _ = writeln!(s, "      {:<14} {}", role_label(&f.role), f.path);
        }
        if !d.others.is_empty() {
            let _ = writeln!(s, "      also replicated: {}", d.others.join(", "));
        }
    }
    if !plan.peer_files.is_empty() {
        let _ = writeln!(s, "\nnot replicated, must exist at the same path on {peer}:");
        for f in &plan.peer_files {
            let _ = writeln!(s, "  {}  {}", f.path, f.what);
        }
    }
    if !plan.notes.is_empty() {
        let _ = writeln!(s, "\nnotes:");
        for n in &plan.notes {
            let _ = writeln!(s, "  {n}");
        }
    }
    let template = if plan.domain_type == "hyperv" { "hyperv" } else { "kvm" };
    let _ = writeln!(s, "\nregister will:");
    let steps = [
        format!("disable autostart of {} here and on {peer} (hamirror decides where it runs)", plan.domain),
        format!(
            "create module {} with {id} from the vm-modules/{template} template, replicating {} director{}",
            plan.module,
            plan.dirs.len(),
            if plan.dirs.len() == 1 { "y" } else { "ies" }
        ),
        format!("define {} on {peer} with this host's definition", plan.domain),
        format!("shut {} down if it runs (qemu must reopen its disks through the mirror)", plan.domain),
        format!("install module {} on both hosts", plan.module),
        format!(
            "start module {} here (primary: it starts {}), then on {peer} (secondary, after a full copy)",
            plan.module, plan.domain
        ),
    ];
    for (i, step) in steps.iter().enumerate() {
        let _ = writeln!(s, "  {}. {step}", i + 1);
    }
    s
}

/// The plan as stable, pretty-printed JSON (`vm register --dry-run --json`).
pub fn json(plan: &Plan) -> String {
    // A Plan holds only strings, numbers and lists: serialising it cannot fail.
    serde_json::to_string_pretty(plan).unwrap_or_default()
}

fn role_label(role: &Role) -> String {
    match role {
        Role::Disk { target } => format!("disk {target}"),
        Role::Media { target } => format!("media {target}"),
        Role::Backing { target } => format!("backing {target}"),
        Role::Nvram => "nvram".to_string(),
        Role::Kernel => "kernel".to_string(),
        Role::Initrd => "initrd".to_string(),
        Role::Snapshot => "snapshot".to_string(),
        Role::HypervConfig => "vm config".to_string(),
    }
}
