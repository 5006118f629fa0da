//! `hamirror module install | list | remove`: files in the home's `modules/`, validated with
//! the configuration loader, then a reload of the daemon when one answers.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use quick_xml::events::Event;
use quick_xml::Reader;
use serde::Serialize;

use super::client::ClientError;
use super::{bad_answer, module_path, Ctx, Failure};
use crate::config::{
    load_cluster, load_module, load_modules, ClusterConfig, ModuleMode, MIRROR_MODULES_MAX, MODULE_ID_MAX,
};
use crate::daemon::control::{ModuleView, ReloadReport};
use crate::module::State;

/// Longest module name (the configuration's rule).
pub const MODULE_NAME_BYTES_MAX: usize = 32;
/// Deepest directory nesting copied from a module directory.
const COPY_DEPTH_MAX: usize = 32;

/// Refuses names the configuration would refuse, and anything that could leave `modules/`.
pub fn check_name(name: &str) -> Result<(), Failure> {
    let ok = (1..=MODULE_NAME_BYTES_MAX).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Failure::new(format!(
            "{name:?} is not a valid module name: expected 1 to {MODULE_NAME_BYTES_MAX} letters, digits, '_' or '-'"
        )))
    }
}

/// Where module templates are looked up, first match wins: the directories of
/// `$HAMIRROR_TEMPLATES` (a `:`-separated list), else `<dir of the executable>/../share/hamirror`,
/// `/usr/share/hamirror` and the source tree, each with its `app-modules/` then its
/// `vm-modules/`.
pub fn template_dirs() -> Vec<PathBuf> {
    if let Some(list) = std::env::var_os("HAMIRROR_TEMPLATES").filter(|d| !d.is_empty()) {
        return std::env::split_paths(&list).filter(|d| !d.as_os_str().is_empty()).collect();
    }
    let mut bases = Vec::new();
    if let Some(bin_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        bases.push(bin_dir.join("../share/hamirror"));
    }
    bases.push(PathBuf::from("/usr/share/hamirror"));
    bases.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    bases.iter().flat_map(|b| [b.join("app-modules"), b.join("vm-modules")]).collect()
}

/// `DIR` if it is a directory, else the template of that name.
fn resolve_source(source: &str) -> Result<PathBuf, Failure> {
    let as_dir = Path::new(source);
    if as_dir.is_dir() {
        return Ok(as_dir.to_path_buf());
    }
    let dirs = template_dirs();
    let is_template_name = !source.is_empty() && !source.contains('/') && source != "." && source != "..";
    if is_template_name {
        if let Some(found) = dirs.iter().map(|d| d.join(source)).find(|p| p.is_dir()) {
            return Ok(found);
        }
    }
    let known: Vec<&PathBuf> = dirs.iter().filter(|d| d.is_dir()).collect();
    let hint = if known.is_empty() {
        "no template directory was found (set HAMIRROR_TEMPLATES)".to_string()
    } else {
        let mut names: Vec<String> = known
            .iter()
            .filter_map(|d| fs::read_dir(d).ok())
            .flat_map(|rd| rd.flatten())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.dedup();
        let places: Vec<String> = known.iter().map(|d| d.display().to_string()).collect();
        format!("the templates in {} are: {}", places.join(" and "), names.join(", "))
    };
    Err(Failure::new(format!("there is no module directory or template named {source} ({hint})")))
}

/// The attributes of a userconfig.xml's root element, and where its start tag lies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootTag {
    pub name: Option<String>,
    pub mode: Option<String>,
    pub id: Option<String>,
    /// Byte range of `<module ...>` in the text.
    span: (usize, usize),
    /// Every attribute as written: (key, raw value).
    raw: Vec<(String, String)>,
    empty: bool,
}

/// Reads the root `<module>` start tag of a userconfig.xml.
pub fn read_root(text: &str) -> Result<RootTag, String> {
    let mut reader = Reader::from_str(text);
    loop {
        let before = reader.buffer_position() as usize;
        let event =
            reader.read_event().map_err(|e| format!("malformed XML near byte {}: {e}", reader.error_position()))?;
        let after = reader.buffer_position() as usize;
        let (tag, empty) = match event {
            Event::Start(t) => (t, false),
            Event::Empty(t) => (t, true),
            Event::Eof => return Err("it has no <module> element".to_string()),
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) | Event::DocType(_) | Event::Text(_) => continue,
            _ => return Err("its first element is not <module>".to_string()),
        };
        if tag.name().as_ref() != b"module" {
            let found = String::from_utf8_lossy(tag.name().as_ref()).into_owned();
            return Err(format!("its root element is <{found}>, not <module>"));
        }
        let start = text[before..after].find('<').map(|i| before + i).ok_or("cannot locate <module>")?;
        let mut root = RootTag { span: (start, after), empty, ..RootTag::default() };
        for attr in tag.attributes() {
            let attr = attr.map_err(|e| format!("malformed attribute on <module>: {e}"))?;
            let key = String::from_utf8_lossy(attr.key.as_ref()).into_owned();
            let raw = String::from_utf8_lossy(&attr.value).into_owned();
            let value = attr.unescape_value().map(|v| v.into_owned()).unwrap_or_else(|_| raw.clone());
            match key.as_str() {
                "name" => root.name = Some(value),
                "mode" => root.mode = Some(value),
                "id" => root.id = Some(value),
                _ => {}
            }
            root.raw.push((key, raw));
        }
        return Ok(root);
    }
}

/// `text` with the root tag's `name` and `id` replaced (or added); the rest of the file is
/// kept byte for byte.
pub fn rewrite_root(text: &str, root: &RootTag, name: &str, id: u16) -> String {
    let mut tag = String::from("<module");
    let mut has_name = false;
    let mut has_id = false;
    for (key, raw) in &root.raw {
        let value = match key.as_str() {
            "name" => {
                has_name = true;
                name.to_string()
            }
            "id" => {
                has_id = true;
                id.to_string()
            }
            _ => raw.clone(),
        };
        let quote = if value.contains('"') { '\'' } else { '"' };
        tag.push_str(&format!(" {key}={quote}{value}{quote}"));
    }
    if !has_name {
        tag.push_str(&format!(" name=\"{name}\""));
    }
    if !has_id {
        tag.push_str(&format!(" id=\"{id}\""));
    }
    tag.push_str(if root.empty { "/>" } else { ">" });
    format!("{}{tag}{}", &text[..root.span.0], &text[root.span.1..])
}

/// The ids written in the installed modules' userconfig.xml (unreadable ones are skipped),
/// with the module using each.
fn used_ids(modules_dir: &Path, except: &str) -> Vec<(u16, String)> {
    let mut used = Vec::new();
    let Ok(entries) = fs::read_dir(modules_dir) else {
        return used;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == except || name.starts_with('.') {
            continue;
        }
        let Ok(text) = fs::read_to_string(entry.path().join("userconfig.xml")) else {
            continue;
        };
        if let Some(id) = read_root(&text).ok().and_then(|r| r.id).and_then(|i| i.trim().parse().ok()) {
            used.push((id, name));
        }
    }
    used
}

pub(super) fn install(ctx: &Ctx, source: &str, name: Option<&str>) -> Result<i32, Failure> {
    let src = resolve_source(source)?;
    let src_config = src.join("userconfig.xml");
    let text = fs::read_to_string(&src_config).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Failure::new(format!("{} is not a module directory: it has no userconfig.xml", src.display()))
        } else {
            Failure::new(format!("cannot read {}: {e}", src_config.display()))
        }
    })?;
    let root = read_root(&text).map_err(|why| Failure::new(format!("{}: {why}", src_config.display())))?;
    let name = match name.map(str::to_string).or_else(|| root.name.clone()) {
        Some(n) => n,
        None => {
            return Err(Failure::new(format!(
                "{} has no name attribute: give the module a name with --name",
                src_config.display()
            )))
        }
    };
    check_name(&name)?;
    let paths = &ctx.paths;
    let dest = paths.module_dir(&name);
    if dest.exists() {
        return Err(Failure::new(format!(
            "module {name} is already installed in {} (remove it first with `hamirror module remove {name}`)",
            dest.display()
        )));
    }
    let cluster = load_cluster(&paths.cluster_xml())
        .map_err(|e| Failure::new(format!("cannot install module {name} without a valid cluster.xml: {e}")))?;
    let used = used_ids(&paths.modules_dir(), &name);
    let id = choose_id(root.id.as_deref(), &used, &src_config)?;
    if let Ok(src_abs) = fs::canonicalize(&src) {
        let modules_abs = fs::canonicalize(paths.modules_dir()).unwrap_or_else(|_| paths.modules_dir());
        if modules_abs.starts_with(&src_abs) {
            return Err(Failure::new(format!(
                "cannot install {} into itself: the home's modules/ lies inside it",
                src.display()
            )));
        }
    }

    // Counted before the copy: the loader applies the limit in name order, so a new module
    // that sorts first would pass and push out a module that runs now.
    let mirrors = load_modules(paths, &cluster).modules.iter().filter(|m| m.mode == ModuleMode::Mirror).count();
    fs::create_dir_all(paths.modules_dir())
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", paths.modules_dir().display())))?;
    let undo = |f: Failure| {
        let _ = fs::remove_dir_all(&dest);
        f
    };
    copy_dir(&src, &dest, 0).map_err(undo)?;
    let edited = rewrite_root(&text, &root, &name, id);
    let config = paths.userconfig(&name);
    fs::write(&config, edited)
        .map_err(|e| Failure::new(format!("cannot write {}: {e}", config.display())))
        .map_err(undo)?;
    validate(ctx, &name, &cluster, mirrors).map_err(undo)?;
    println!("installed module {name} (id {id}) in {}", dest.display());
    reload_after(ctx, Some(&name))
}

/// The id to write: the template's, or the lowest free one when it says `0` or `auto`.
fn choose_id(written: Option<&str>, used: &[(u16, String)], file: &Path) -> Result<u16, Failure> {
    let taken: BTreeSet<u16> = used.iter().map(|(id, _)| *id).collect();
    match written.map(str::trim) {
        None | Some("0") | Some("auto") => (1..=MODULE_ID_MAX)
            .find(|id| !taken.contains(id))
            .ok_or_else(|| Failure::new(format!("every module id from 1 to {MODULE_ID_MAX} is in use"))),
        Some(text) => {
            let id: u16 = text.parse().ok().filter(|id| (1..=MODULE_ID_MAX).contains(id)).ok_or_else(|| {
                Failure::new(format!(
                    "{}: <module> attribute \"id\": expected a number from 1 to {MODULE_ID_MAX}, 0 or auto, found \"{text}\"",
                    file.display()
                ))
            })?;
            match used.iter().find(|(u, _)| *u == id) {
                Some((_, other)) => Err(Failure::new(format!(
                    "id {id} is already used by module {other}: set id=\"auto\" in {} or choose another id",
                    file.display()
                ))),
                None => Ok(id),
            }
        }
    }
}

/// The installed copy must load, alone and beside the other modules (`mirrors`: the valid
/// mirror modules installed before it).
fn validate(ctx: &Ctx, name: &str, cluster: &ClusterConfig, mirrors: usize) -> Result<(), Failure> {
    let refused = |why: String| Failure::new(format!("module {name} is refused and was not installed: {why}"));
    let module = load_module(&ctx.paths.userconfig(name), cluster).map_err(|e| refused(e.to_string()))?;
    if module.mode == ModuleMode::Mirror && mirrors >= MIRROR_MODULES_MAX {
        return Err(refused(format!(
            "the limit is {MIRROR_MODULES_MAX} mirror modules per node and {mirrors} are installed"
        )));
    }
    let set = load_modules(&ctx.paths, cluster);
    match set.refused.iter().find(|(n, _)| n == name) {
        Some((_, e)) => Err(refused(e.to_string())),
        None => Ok(()),
    }
}

/// Copies `src` to the new directory `dest`: files with their permissions, directories,
/// symbolic links as links.
fn copy_dir(src: &Path, dest: &Path, depth: usize) -> Result<(), Failure> {
    let fail = |what: &str, p: &Path, e: std::io::Error| Failure::new(format!("cannot {what} {}: {e}", p.display()));
    if depth > COPY_DEPTH_MAX {
        return Err(Failure::new(format!("{} is nested too deeply to copy", src.display())));
    }
    fs::create_dir(dest).map_err(|e| fail("create", dest, e))?;
    let perms = fs::metadata(src).map_err(|e| fail("read", src, e))?.permissions();
    fs::set_permissions(dest, perms).map_err(|e| fail("set the permissions of", dest, e))?;
    for entry in fs::read_dir(src).map_err(|e| fail("read", src, e))? {
        let entry = entry.map_err(|e| fail("read", src, e))?;
        let from = entry.path();
        let to = dest.join(entry.file_name());
        let kind = entry.file_type().map_err(|e| fail("read", &from, e))?;
        if kind.is_dir() {
            copy_dir(&from, &to, depth + 1)?;
        } else if kind.is_file() {
            fs::copy(&from, &to).map_err(|e| fail("copy", &from, e))?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&from).map_err(|e| fail("read", &from, e))?;
            std::os::unix::fs::symlink(&target, &to).map_err(|e| fail("create", &to, e))?;
        } else {
            return Err(Failure::new(format!(
                "cannot copy {}: it is not a file, directory or symbolic link",
                from.display()
            )));
        }
    }
    Ok(())
}

/// Asks a running daemon to load or drop modules; without a daemon, says when it will happen.
fn reload_after(ctx: &Ctx, installed: Option<&str>) -> Result<i32, Failure> {
    let response = match ctx.client().post("/api/v1/reload", None) {
        Ok(r) => r,
        Err(ClientError::Unreachable(at)) => {
            if installed.is_some() {
                eprintln!("no hamirror daemon answers at {at}: the daemon loads the module when it starts");
            }
            return Ok(0);
        }
        Err(e) => return Err(Failure::new(format!("the files are in place but the daemon was not told: {e}"))),
    };
    if !response.is_success() {
        return Err(Failure::new(format!(
            "the files are in place but the daemon did not reload: {}",
            response.error_message()
        )));
    }
    let report: ReloadReport = response.json().map_err(|e| bad_answer(&e))?;
    if let Some(name) = installed {
        if let Some((_, why)) = report.refused.iter().find(|(n, _)| n == name) {
            return Err(Failure::new(format!("the daemon refused module {name}: {why}")));
        }
        if report.started.iter().any(|n| n == name) {
            println!("the daemon loaded module {name} (start it with `hamirror start {name}`)");
        }
    }
    for name in &report.removed {
        println!("the daemon dropped module {name}");
    }
    Ok(0)
}

/// One line of `module list --json`. Field names are a stable contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Installed {
    pub name: String,
    pub id: Option<u16>,
    pub mode: Option<String>,
    pub dir: PathBuf,
    /// Why the daemon would refuse this module; `None` when its configuration is valid.
    pub error: Option<String>,
}

pub(super) fn list(ctx: &Ctx, json: bool) -> Result<i32, Failure> {
    let installed = installed(ctx)?;
    if json {
        let text = serde_json::to_string_pretty(&installed)
            .map_err(|e| Failure::new(format!("cannot write the list as JSON: {e}")))?;
        println!("{text}");
        return Ok(0);
    }
    if installed.is_empty() {
        println!("no modules are installed in {}", ctx.paths.modules_dir().display());
        return Ok(0);
    }
    let width = installed.iter().map(|m| m.name.len()).max().unwrap_or(0).max(4);
    println!("{:<width$}  {:<4}  {:<6}  DIR", "NAME", "ID", "MODE");
    for m in &installed {
        let id = m.id.map_or("-".to_string(), |i| i.to_string());
        let mode = m.mode.as_deref().unwrap_or("-");
        println!("{:<width$}  {id:<4}  {mode:<6}  {}", m.name, m.dir.display());
        if let Some(e) = &m.error {
            println!("    {e}");
        }
    }
    Ok(0)
}

/// Every directory of `modules/`, with the loader's verdict.
fn installed(ctx: &Ctx) -> Result<Vec<Installed>, Failure> {
    let dir = ctx.paths.modules_dir();
    let mut names: Vec<String> = match fs::read_dir(&dir) {
        Ok(rd) => rd
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Failure::new(format!("cannot read {}: {e}", dir.display()))),
    };
    names.sort();
    let verdicts = match load_cluster(&ctx.paths.cluster_xml()) {
        Ok(cluster) => Ok(load_modules(&ctx.paths, &cluster)),
        Err(e) => Err(e.to_string()),
    };
    let mut out = Vec::new();
    for name in names {
        let root = fs::read_to_string(ctx.paths.userconfig(&name)).ok().and_then(|t| read_root(&t).ok());
        let mut item = Installed {
            name: name.clone(),
            id: root.as_ref().and_then(|r| r.id.as_deref()).and_then(|i| i.trim().parse().ok()),
            mode: root.as_ref().map(|r| r.mode.clone().unwrap_or_else(|| "mirror".to_string())),
            dir: ctx.paths.module_dir(&name),
            error: None,
        };
        match &verdicts {
            Err(cluster_error) => item.error = Some(cluster_error.clone()),
            Ok(set) => {
                if let Some((_, e)) = set.refused.iter().find(|(n, _)| *n == name) {
                    item.error = Some(e.to_string());
                }
            }
        }
        out.push(item);
    }
    Ok(out)
}

pub(super) fn remove(ctx: &Ctx, name: &str) -> Result<i32, Failure> {
    check_name(name)?;
    let dest = ctx.paths.module_dir(name);
    if !dest.is_dir() {
        return Err(Failure::new(format!(
            "no module named {name} is installed in {}",
            ctx.paths.modules_dir().display()
        )));
    }
    match ctx.client().get(&module_path(name)) {
        Ok(r) if r.is_success() => {
            let view: ModuleView = r.json().map_err(|e| bad_answer(&e))?;
            if let Some(s) = view.status {
                if s.state != State::Stop || s.transition.is_some() {
                    let state = match s.transition {
                        Some(t) => format!("{} ({})", s.state, t.as_str()),
                        None => s.state.to_string(),
                    };
                    return Err(Failure::new(format!(
                        "module {name} is {state} on this node: stop it first with `hamirror stop {name}`"
                    )));
                }
            }
        }
        // The daemon does not know the module: nothing runs.
        Ok(r) if r.status == 404 => {}
        Ok(r) => return Err(Failure::new(r.error_message())),
        Err(ClientError::Unreachable(_)) => {}
        Err(e) => return Err(e.into()),
    }
    fs::remove_dir_all(&dest).map_err(|e| Failure::new(format!("cannot remove {}: {e}", dest.display())))?;
    println!(
        "removed module {name} ({}); its state and logs in {} are kept",
        dest.display(),
        ctx.paths.state_dir.display()
    );
    reload_after(ctx, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "<?xml version=\"1.0\"?>\n<!-- a comment -->\n<module name=\"mirror\" mode=\"mirror\" id=\"auto\">\n  <user/>\n</module>\n";

    // The root tag is found after a declaration and a comment, and rewriting it keeps the
    // rest of the file byte for byte.
    #[test]
    fn rewrite_root_changes_only_the_root_tag() {
        let root = read_root(TEXT).unwrap();
        assert_eq!(root.name.as_deref(), Some("mirror"));
        assert_eq!(root.id.as_deref(), Some("auto"));
        let out = rewrite_root(TEXT, &root, "web01", 7);
        assert_eq!(
            out,
            TEXT.replace("name=\"mirror\" mode=\"mirror\" id=\"auto\"", "name=\"web01\" mode=\"mirror\" id=\"7\"")
        );
        let bare = "<module mode='mirror'/>";
        let root = read_root(bare).unwrap();
        assert_eq!(rewrite_root(bare, &root, "a", 1), "<module mode=\"mirror\" name=\"a\" id=\"1\"/>");
        assert!(read_root("<cluster/>").is_err());
        assert!(read_root("").is_err());
        assert!(read_root("<module name=\"x").is_err());
    }

    // auto and 0 take the lowest free id; an explicit id must be free.
    #[test]
    fn choose_id_picks_lowest_free() {
        let used = vec![(1, "a".to_string()), (3, "b".to_string())];
        let f = Path::new("u.xml");
        assert_eq!(choose_id(Some("auto"), &used, f).unwrap(), 2);
        assert_eq!(choose_id(Some("0"), &used, f).unwrap(), 2);
        assert_eq!(choose_id(None, &[], f).unwrap(), 1);
        assert_eq!(choose_id(Some("5"), &used, f).unwrap(), 5);
        assert!(choose_id(Some("3"), &used, f).unwrap_err().message.contains("module b"));
        assert!(choose_id(Some("1001"), &used, f).is_err());
        assert!(choose_id(Some("x"), &used, f).is_err());
    }

    // Names that could leave modules/ are refused.
    #[test]
    fn check_name_refuses_paths() {
        assert!(check_name("web-01_a").is_ok());
        for bad in ["", "../x", "a/b", ".", "a b", &"x".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
