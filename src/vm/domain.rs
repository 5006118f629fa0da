//! A libvirt domain definition (`virsh dumpxml --inactive`), reduced to what a VM module needs:
//! the name, the disks and their sources, the firmware and boot files. Hyper-V domains come in
//! the same form, synthesised by the Hyper-V driver (`<domain type='hyperv'>` with the `.vmcx`
//! in `<metadata><hamirror:hyperv config=".."/>`).

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use serde::Serialize;

/// Namespace of the Hyper-V metadata element written by the Hyper-V driver.
pub const HYPERV_XMLNS: &str = "https://hamirror.dev/xmlns/hyperv/1";
/// Deeper nesting is refused (libvirt needs about 8 levels, plus one per listed backing file).
const DEPTH_MAX: usize = 64;

/// One libvirt domain, as read from its XML definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Domain {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`, when given.
    pub uuid: Option<String>,
    /// `<domain type=..>`: `kvm`, `qemu`, `hyperv`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// `<devices><disk>`, in document order.
    pub disks: Vec<Disk>,
    /// `<os><loader>` path (firmware code, usually read-only and installed by a package).
    pub loader: Option<String>,
    /// `<os><nvram>`: the per-VM firmware variables.
    pub nvram: Option<Nvram>,
    /// `<os><kernel>` path (direct kernel boot).
    pub kernel: Option<String>,
    /// `<os><initrd>` path.
    pub initrd: Option<String>,
    /// Hyper-V: the path of the VM's `.vmcx` configuration file.
    pub hyperv_config: Option<String>,
}

impl Domain {
    /// True for a Hyper-V domain (paths are Windows paths on the Hyper-V host).
    pub fn is_hyperv(&self) -> bool {
        self.kind == "hyperv"
    }
}

/// `<os><nvram>`: the variables file, and the template libvirt copies it from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nvram {
    /// The file (element text, or `<source file=..>` in libvirt 8.5 and later).
    pub path: Option<String>,
    /// `template=`: the read-only file the variables were first copied from.
    pub template: Option<String>,
}

/// One `<disk>` of `<devices>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disk {
    /// `type=`: `file`, `block`, `network`, `volume`, `dir`, `nvme`, ... (default `file`).
    #[serde(rename = "type")]
    pub kind: String,
    /// `device=`: `disk`, `cdrom`, `floppy`, `lun` (default `disk`).
    pub device: String,
    /// `<source>`, `None` for an empty drive (a cdrom without a medium).
    pub source: Option<Source>,
    /// `<driver type=..>`: the image format (`qcow2`, `raw`, ...).
    pub format: Option<String>,
    /// `<target dev=..>`: `vda`, `sdb`, ...
    pub target: Option<String>,
    /// `<readonly/>`.
    pub readonly: bool,
    /// `<shareable/>`: the disk is meant to be used by several VMs at once.
    pub shareable: bool,
    /// `<backingStore>` chain as libvirt lists it, nearest first.
    pub backing: Vec<Backing>,
}

impl Disk {
    /// Target name for messages: `vda`, or the source when there is no target.
    pub fn label(&self) -> String {
        match (&self.target, &self.source) {
            (Some(t), _) => t.clone(),
            (None, Some(s)) => s.to_string(),
            (None, None) => format!("{} without a target", self.device),
        }
    }
}

/// Where a disk's (or backing file's) data lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Source {
    /// `<source file=..>`.
    File { path: String },
    /// `<source dev=..>`: a block device.
    Dev { path: String },
    /// `<source dir=..>`: a directory exposed as a FAT disk.
    Dir { path: String },
    /// `<source protocol=.. name=..>`: network storage (rbd, iscsi, nbd, gluster, ...).
    Network { protocol: String, name: String },
    /// `<source pool=.. volume=..>`: a libvirt storage pool volume.
    Volume { pool: String, volume: String },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File { path } | Source::Dev { path } | Source::Dir { path } => f.write_str(path),
            Source::Network { protocol, name } => write!(f, "{protocol}:{name}"),
            Source::Volume { pool, volume } => write!(f, "volume {volume} of pool {pool}"),
        }
    }
}

/// One `<backingStore>` libvirt lists under a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backing {
    /// `type=` of the backing store.
    #[serde(rename = "type")]
    pub kind: String,
    /// `<format type=..>`.
    pub format: Option<String>,
    pub source: Option<Source>,
}

/// Parses a domain's XML definition; a malformed or unexpected document is one sentence.
pub fn parse(xml: &str) -> Result<Domain, String> {
    let root = tree(xml)?;
    if root.local() != "domain" {
        return Err(format!(
            "this is not a libvirt domain definition: its root element is <{}>, not <domain>",
            root.name
        ));
    }
    let name = root.child("name").map(|n| n.text.trim().to_string()).unwrap_or_default();
    if name.is_empty() {
        return Err("the domain definition has no <name>".to_string());
    }
    let uuid = root.child("uuid").map(|u| u.text.trim().to_string()).filter(|u| !u.is_empty());
    let kind = root.attr("type").unwrap_or("").to_string();
    let os = root.child("os");
    let os_text = |n: &str| os.and_then(|o| o.child(n)).map(|e| e.text.trim().to_string()).filter(|t| !t.is_empty());
    let nvram = os.and_then(|o| o.child("nvram")).map(|n| {
        let text = Some(n.text.trim().to_string()).filter(|t| !t.is_empty());
        let source = n.child("source").and_then(|s| s.attr("file")).map(str::to_string);
        Nvram { path: text.or(source), template: n.attr("template").map(str::to_string) }
    });
    let mut disks = Vec::new();
    if let Some(devices) = root.child("devices") {
        for d in devices.children.iter().filter(|c| c.name == "disk") {
            disks.push(disk(d));
        }
    }
    let hyperv_config = root.child("metadata").and_then(|m| {
        m.children
            .iter()
            .find(|c| c.local() == "hyperv" && root.namespace_of(m, c) == Some(HYPERV_XMLNS))
            .and_then(|c| c.attr("config"))
            .map(str::to_string)
    });
    Ok(Domain {
        name,
        uuid,
        kind,
        disks,
        loader: os_text("loader"),
        nvram,
        kernel: os_text("kernel"),
        initrd: os_text("initrd"),
        hyperv_config,
    })
}

fn disk(d: &Node) -> Disk {
    let kind = d.attr("type").unwrap_or("file").to_string();
    let mut backing = Vec::new();
    let mut next = d.child("backingStore");
    while let Some(b) = next {
        // An empty <backingStore/> ends the chain.
        if b.attrs.is_empty() && b.children.is_empty() {
            break;
        }
        let bkind = b.attr("type").unwrap_or("file").to_string();
        backing.push(Backing {
            format: b.child("format").and_then(|f| f.attr("type")).map(str::to_string),
            source: b.child("source").and_then(|s| source(&bkind, s)),
            kind: bkind,
        });
        next = b.child("backingStore");
    }
    Disk {
        device: d.attr("device").unwrap_or("disk").to_string(),
        source: d.child("source").and_then(|s| source(&kind, s)),
        format: d.child("driver").and_then(|x| x.attr("type")).map(str::to_string),
        target: d.child("target").and_then(|t| t.attr("dev")).map(str::to_string),
        readonly: d.child("readonly").is_some(),
        shareable: d.child("shareable").is_some(),
        backing,
        kind,
    }
}

/// The `<source>` of a disk of type `kind`; `None` when it names nothing.
fn source(kind: &str, s: &Node) -> Option<Source> {
    let get = |a: &str| s.attr(a).map(str::to_string).filter(|v| !v.is_empty());
    match kind {
        "block" => get("dev").map(|path| Source::Dev { path }),
        "dir" => get("dir").map(|path| Source::Dir { path }),
        "network" => Some(Source::Network {
            protocol: get("protocol").unwrap_or_else(|| "network".to_string()),
            name: get("name").unwrap_or_default(),
        }),
        "volume" => {
            Some(Source::Volume { pool: get("pool").unwrap_or_default(), volume: get("volume").unwrap_or_default() })
        }
        _ => get("file").map(|path| Source::File { path }).or_else(|| get("dev").map(|path| Source::Dev { path })),
    }
}

/// An element of the document: name as written (with its prefix), attributes, text.
#[derive(Debug, Default)]
struct Node {
    name: String,
    attrs: Vec<(String, String)>,
    text: String,
    children: Vec<Node>,
}

impl Node {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }
    /// The name without its namespace prefix.
    fn local(&self) -> &str {
        self.name.rsplit_once(':').map_or(self.name.as_str(), |(_, l)| l)
    }
    /// The namespace URI of `el`, a child of `parent`, itself a child of `self` (the root):
    /// the nearest `xmlns[:prefix]` declaration.
    fn namespace_of<'a>(&'a self, parent: &'a Node, el: &'a Node) -> Option<&'a str> {
        let key = match el.name.split_once(':') {
            Some((prefix, _)) => format!("xmlns:{prefix}"),
            None => "xmlns".to_string(),
        };
        [el, parent, self].into_iter().find_map(|n| n.attr(&key))
    }
}

/// 1-based line of a byte offset.
fn line_at(text: &str, offset: u64) -> usize {
    let end = usize::try_from(offset).unwrap_or(usize::MAX).min(text.len());
    1 + text.as_bytes()[..end].iter().filter(|b| **b == b'\n').count()
}

/// Reads the document into its root element.
fn tree(xml: &str) -> Result<Node, String> {
    let xml = xml.strip_prefix('\u{feff}').unwrap_or(xml);
    let malformed = |pos: u64, why: String| format!("the domain XML is malformed at line {}: {why}", line_at(xml, pos));
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    loop {
        let event = reader.read_event().map_err(|e| malformed(reader.error_position(), e.to_string()))?;
        let pos = reader.buffer_position();
        let closed = match event {
            Event::Start(e) => {
                if stack.len() >= DEPTH_MAX {
                    return Err(malformed(pos, format!("elements are nested more than {DEPTH_MAX} levels deep")));
                }
                stack.push(node(&e).map_err(|why| malformed(pos, why))?);
                None
            }
            Event::Empty(e) => Some(node(&e).map_err(|why| malformed(pos, why))?),
            Event::End(_) => stack.pop(),
            Event::Text(t) => {
                let text = t.unescape().map_err(|e| malformed(pos, e.to_string()))?;
                match stack.last_mut() {
                    Some(top) => top.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err(malformed(pos, "text outside the root element".to_string())),
                }
                None
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&t));
                }
                None
            }
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => None,
            Event::Eof => break,
        };
        if let Some(el) = closed {
            match stack.last_mut() {
                Some(parent) => parent.children.push(el),
                None if root.is_none() => root = Some(el),
                None => return Err(malformed(pos, format!("a second root element <{}>", el.name))),
            }
        }
    }
    if let Some(open) = stack.last() {
        return Err(format!("the domain XML is malformed: it ends before <{}> is closed", open.name));
    }
    root.ok_or_else(|| "the domain XML is empty: it has no <domain> element".to_string())
}

fn node(e: &BytesStart<'_>) -> Result<Node, String> {
    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|err| format!("<{name}> has a bad attribute: {err}"))?;
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        let value = a.unescape_value().map_err(|err| format!("<{name}> attribute {key}: {err}"))?.into_owned();
        attrs.push((key, value));
    }
    Ok(Node { name, attrs, text: String::new(), children: Vec::new() })
}
