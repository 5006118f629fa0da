//! The registration plan of a VM: which files it needs, which directories a module must
//! replicate for them, and why a VM cannot be registered as it is.
//!
//! Pure over the parsed [`Domain`] and a [`Fs`] (the host's filesystem in production, a
//! temporary tree or a fake in tests). Hyper-V domains name Windows paths on the Hyper-V host:
//! their files are collected and their directories proposed without looking at any
//! filesystem.

use std::collections::HashSet;
use std::io;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

use super::domain::{Domain, Source};
use crate::config::{ModuleConfig, ModuleMode, MIRROR_MODULES_MAX};
use crate::replication::mountover::FS_TYPE as MOUNTOVER_FS_TYPE;
use crate::replication::qcow2::QCOW2_MAGIC;

/// Where libvirt (qemu driver) keeps the metadata of each domain's snapshots.
pub const LIBVIRT_SNAPSHOT_DIR: &str = "/var/lib/libvirt/qemu/snapshot";
/// Longest qcow2 backing chain followed.
pub const BACKING_DEPTH_MAX: usize = 64;
/// Longest backing file name the qcow2 format allows.
const BACKING_NAME_BYTES_MAX: u32 = 1023;
/// Longest module name (the configuration's rule, `[A-Za-z0-9_-]{1,32}`).
const MODULE_NAME_BYTES_MAX: usize = 32;

/// Directories that hold far more than one VM: a file directly in one of them cannot have its
/// directory replicated.
const SYSTEM_DIRS: &[&str] = &[
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib64",
    "/media",
    "/mnt",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/usr/local",
    "/usr/share",
    "/var",
    "/var/lib",
    "/var/lib/libvirt",
    "/var/lib/libvirt/qemu",
    "/var/log",
    "/var/tmp",
];

/// libvirt's shared pools: replicated only when every file in them belongs to this VM.
const SHARED_POOLS: &[&str] = &["/var/lib/libvirt/images", "/var/lib/libvirt/qemu/nvram", "/var/lib/libvirt/boot"];

/// `statfs(2)` magics of shared or network filesystems: a disk there is already reachable from
/// both hosts (or from neither after a failure), replicating it is wrong.
const SHARED_FS_MAGICS: &[(i64, &str)] = &[
    (0x6969, "NFS"),
    (0x517B, "SMB"),
    (0xFF53_4D42, "CIFS"),
    (0xFE53_4D42, "SMB2"),
    (0x00C3_6400, "CephFS"),
    (0x6573_5546, "FUSE (GlusterFS or another network filesystem)"),
    (0x7461_636f, "OCFS2"),
    (0x0116_1970, "GFS2"),
    (0x0BD0_0BD0, "Lustre"),
    (0x0102_1997, "9p"),
    (0x6a65_6a63, "virtiofs"),
];
/// `statfs(2)` magic of FUSE, which our own mountover also is.
const FUSE_MAGIC: i64 = 0x6573_5546;

/// What a path is on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    /// A block or character device.
    Device,
    /// A socket, FIFO, ...
    Other,
    Missing,
}

/// The filesystem questions the plan asks, behind a trait so that tests run on temporary
/// trees or fakes.
pub trait Fs {
    /// What `path` is (symbolic links followed).
    fn kind(&self, path: &Path) -> io::Result<FileKind>;
    /// Up to `len` bytes of `path` from `offset` (fewer at the end of the file).
    fn read(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// The `statfs(2)` type magic of the filesystem holding `path`.
    fn fs_magic(&self, path: &Path) -> io::Result<i64>;
    /// The mount points of hamirror's own mountovers.
    fn mountovers(&self) -> Vec<PathBuf>;
    /// The names in directory `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// The XML of every snapshot libvirt keeps for `domain` (none when it keeps none).
    fn snapshots(&self, domain: &str) -> io::Result<Vec<String>>;
}

/// The host's filesystem.
#[derive(Debug, Clone)]
pub struct HostFs {
    /// Where snapshot metadata lives, [`LIBVIRT_SNAPSHOT_DIR`] by default.
    pub snapshot_dir: PathBuf,
}

impl Default for HostFs {
    fn default() -> HostFs {
        HostFs { snapshot_dir: PathBuf::from(LIBVIRT_SNAPSHOT_DIR) }
    }
}

impl Fs for HostFs {
    fn kind(&self, path: &Path) -> io::Result<FileKind> {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(path) {
            Ok(m) => {
                let t = m.file_type();
                Ok(if t.is_file() {
                    FileKind::File
                } else if t.is_dir() {
                    FileKind::Dir
                } else if t.is_block_device() || t.is_char_device() {
                    FileKind::Device
                } else {
                    FileKind::Other
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(FileKind::Missing),
            Err(e) => Err(e),
        }
    }

    fn read(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(path)?;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = file.read_at(&mut buf[got..], offset + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }

    fn fs_magic(&self, path: &Path) -> io::Result<i64> {
        let st = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
        // The magic is a 32-bit value stored in a signed or unsigned word depending on the
        // platform.
        #[allow(clippy::unnecessary_cast)]
        Ok(st.filesystem_type().0 as i64 & 0xFFFF_FFFF)
    }

    fn mountovers(&self) -> Vec<PathBuf> {
        std::fs::read_to_string("/proc/self/mountinfo").map(|t| mountovers_in(&t)).unwrap_or_default()
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        std::fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned())).collect()
    }

    fn snapshots(&self, domain: &str) -> io::Result<Vec<String>> {
        let dir = self.snapshot_dir.join(domain);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|x| x == "xml") {
                out.push(std::fs::read_to_string(&path)?);
            }
        }
        Ok(out)
    }
}

/// The mount points of `fuse.hamirror` mounts in the text of /proc/self/mountinfo.
fn mountovers_in(mountinfo: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        if fields.get(dash + 1) == Some(&MOUNTOVER_FS_TYPE) {
            if let Some(mp) = fields.get(4) {
                out.push(PathBuf::from(unescape_octal(mp)));
            }
        }
    }
    out
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |acc, c| acc.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A module already installed, as far as the plan is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingModule {
    pub name: String,
    pub mode: ModuleMode,
    /// Its replicated directories.
    pub dirs: Vec<PathBuf>,
}

impl ExistingModule {
    /// The module of a loaded configuration.
    pub fn from_config(m: &ModuleConfig) -> ExistingModule {
        let dirs = m.rfs.as_ref().map(|r| r.replicated.iter().map(|d| d.dir.clone()).collect()).unwrap_or_default();
        ExistingModule { name: m.name.clone(), mode: m.mode, dirs }
    }
}

/// What the plan needs besides the domain.
pub struct PlanInput<'a> {
    /// `--module`; the domain's name when `None`.
    pub module_name: Option<&'a str>,
    /// The modules installed on this node.
    pub modules: &'a [ExistingModule],
    /// The hypervisor URI the module will use.
    pub uri: &'a str,
    /// The id the module will get, when already chosen.
    pub id: Option<u16>,
    /// The peer's node name, for the description.
    pub peer: Option<&'a str>,
    /// The filesystem (ignored for Hyper-V domains).
    pub fs: &'a dyn Fs,
}

/// Why a file belongs to the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "role")]
pub enum Role {
    /// The image of a disk.
    Disk {
        target: String,
    },
    /// A medium in a cdrom or floppy drive.
    Media {
        target: String,
    },
    /// A backing file of a disk's image (qcow2 chain).
    Backing {
        target: String,
    },
    /// The firmware variables.
    Nvram,
    /// Direct kernel boot.
    Kernel,
    Initrd,
    /// An external snapshot's file.
    Snapshot,
    /// Hyper-V: the VM's configuration file.
    HypervConfig,
}

/// One file of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmFile {
    pub path: String,
    #[serde(flatten)]
    pub role: Role,
}

/// A directory the module replicates, with the VM's files in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedDir {
    pub dir: String,
    /// The VM's files in it (or below it).
    pub files: Vec<VmFile>,
    /// Other names found directly in it: replicated too.
    pub others: Vec<String>,
}

/// A file the VM needs that is not replicated: it must exist at the same path on the peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerFile {
    pub path: String,
    /// What it is: "firmware code", "cdrom medium of sda", ...
    pub what: String,
}

/// What `vm register` will do. Its JSON form is a stable contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub domain: String,
    pub uuid: Option<String>,
    /// `kvm`, `qemu`, `hyperv`, ...
    pub domain_type: String,
    pub module: String,
    pub uri: String,
    pub id: Option<u16>,
    pub peer: Option<String>,
    /// The directories to replicate, sorted.
    pub dirs: Vec<PlannedDir>,
    /// Files needed at the same path on the peer, not replicated.
    pub peer_files: Vec<PeerFile>,
    /// Things the administrator should know.
    pub notes: Vec<String>,
}

/// Builds the plan, or says why the VM cannot be registered as it is: one sentence per
/// problem, separated by newlines.
pub fn plan(domain: &Domain, input: &PlanInput<'_>) -> Result<Plan, String> {
    let mut p = Planner::new(domain, input);
    let module = module_name(domain, input);
    p.collect();
    let dirs = p.propose();
    p.check_modules(&module, &dirs);
    if dirs.is_empty() && p.refusals.is_empty() {
        p.refusals.push(format!("{} has no disk image to replicate: a VM module needs at least one", domain.name));
    }
    if !p.refusals.is_empty() {
        return Err(p.refusals.join("\n"));
    }
    let planned = p.distribute(&dirs);
    let module = module?;
    Ok(Plan {
        domain: domain.name.clone(),
        uuid: domain.uuid.clone(),
        domain_type: domain.kind.clone(),
        module,
        uri: input.uri.to_string(),
        id: input.id,
        peer: input.peer.map(str::to_string),
        dirs: planned,
        peer_files: p.peer_files,
        notes: p.notes,
    })
}

/// `--module`, or the domain's name when it is a valid module name.
fn module_name(domain: &Domain, input: &PlanInput<'_>) -> Result<String, String> {
    let check = crate::cli::check_module_name;
    match input.module_name {
        Some(n) => check(n).map(|()| n.to_string()).map_err(|f| f.message),
        None => check(&domain.name).map(|()| domain.name.clone()).map_err(|_| {
            format!(
                "the domain name {:?} is not a valid module name (1 to {MODULE_NAME_BYTES_MAX} letters, digits, '_' or '-'): choose one with --module NAME",
                domain.name
            )
        }),
    }
}

/// A file found, before directories are chosen.
struct Found {
    file: VmFile,
    /// Its directory must be replicated (else the file only has to exist on the peer).
    needs_dir: bool,
    /// For peer-only files: what it is.
    what: String,
}

struct Planner<'a> {
    domain: &'a Domain,
    input: &'a PlanInput<'a>,
    windows: bool,
    found: Vec<Found>,
    peer_files: Vec<PeerFile>,
    notes: Vec<String>,
    refusals: Vec<String>,
    mountovers: Option<Vec<PathBuf>>,
}

impl<'a> Planner<'a> {
    fn new(domain: &'a Domain, input: &'a PlanInput<'a>) -> Planner<'a> {
        Planner {
            domain,
            input,
            windows: domain.is_hyperv(),
            found: Vec::new(),
            peer_files: Vec::new(),
            notes: Vec::new(),
            refusals: Vec::new(),
            mountovers: None,
        }
    }

    fn refuse(&mut self, why: String) {
        if !self.refusals.contains(&why) {
            self.refusals.push(why);
        }
    }

    /// Every file of the domain: disks, backing chains, firmware, boot files, snapshots.
    fn collect(&mut self) {
        let d = self.domain;
        for disk in &d.disks {
            let target = disk.label();
            let media = matches!(disk.device.as_str(), "cdrom" | "floppy");
            let name = format!("{} {target}", disk.device);
            if disk.shareable {
                self.refuse(format!(
                    "{name} is shareable (used by several VMs at once): a shared disk cannot be replicated with one VM"
                ));
                continue;
            }
            let path = match (&disk.source, disk.kind.as_str()) {
                (None, _) if media => continue,
                (None, _) => {
                    self.refuse(format!("{name} has no source: give it an image file or remove it"));
                    continue;
                }
                (Some(Source::File { path }), "file") => path.clone(),
                // A host's optical or floppy drive passed through: the peer needs one too.
                (Some(Source::Dev { path }), _) if media => {
                    let what = format!("host {} drive passed to {target}", disk.device);
                    self.peer_file(path, &what);
                    continue;
                }
                (Some(s @ Source::Dev { .. }), _) => {
                    self.refuse(format!(
                        "{name} uses the block device {s}: raw block devices cannot be replicated: move the disk to a file, e.g. qemu-img convert"
                    ));
                    continue;
                }
                (Some(s @ Source::Network { .. }), _) => {
                    self.refuse(format!(
                        "{name} is on network storage ({s}): it is not a local file; copy it to a local file (qemu-img convert) to replicate it, or keep it out of hamirror"
                    ));
                    continue;
                }
                (Some(s @ Source::Volume { .. }), _) => {
                    self.refuse(format!(
                        "{name} is a storage pool volume ({s}): give the disk as type='file' with the volume's path (virsh vol-path) to replicate it"
                    ));
                    continue;
                }
                (Some(s), kind) => {
                    self.refuse(format!("{name} of type '{kind}' ({s}) cannot be replicated: only file disks can"));
                    continue;
                }
            };
            let role =
                if media { Role::Media { target: target.clone() } } else { Role::Disk { target: target.clone() } };
            let what = format!("{} medium of {target}", disk.device);
            if !self.add(&name, path.clone(), role, !media, what) {
                continue;
            }
            let mut listed: Vec<String> = Vec::new();
            for b in &disk.backing {
                match &b.source {
                    Some(Source::File { path }) => listed.push(path.clone()),
                    Some(s) => self.refuse(format!(
                        "{name} has a backing store that is not a local file ({s}): only file images can be replicated"
                    )),
                    None => {}
                }
            }
            if !self.windows && disk.format.as_deref().is_none_or(|f| f == "qcow2") {
                self.chain(&name, &target, &path, !media);
            }
            for path in listed {
                self.add(
                    &name,
                    path,
                    Role::Backing { target: target.clone() },
                    !media,
                    format!("backing file of {target}"),
                );
            }
        }
        if let Some(loader) = &d.loader {
            self.peer_file(loader, "firmware code (<loader>)");
        }
        if let Some(nv) = &d.nvram {
            if let Some(t) = &nv.template {
                self.peer_file(t, "firmware variables template (<nvram template>)");
            }
            if let Some(path) = &nv.path {
                self.add("the NVRAM", path.clone(), Role::Nvram, true, String::new());
            }
        }
        for (role, path, what) in [(Role::Kernel, &d.kernel, "kernel"), (Role::Initrd, &d.initrd, "initrd")] {
            let Some(path) = path else { continue };
            // A host's own kernel (in /boot, /usr/lib, ...) is a host file, not the VM's.
            let in_system = !self.windows && parent(false, path).is_some_and(|p| SYSTEM_DIRS.contains(&p.as_str()));
            self.add(what, path.clone(), role, !in_system, format!("{what} for direct kernel boot"));
        }
        if let Some(cfg) = &d.hyperv_config {
            self.add("the Hyper-V configuration", cfg.clone(), Role::HypervConfig, true, String::new());
        }
        if !self.windows {
            self.snapshot_files();
        }
    }

    /// Records a file; checks it on this host (Linux). `false` when refused.
    fn add(&mut self, name: &str, path: String, role: Role, needs_dir: bool, what: String) -> bool {
        let path = match normalize(self.windows, &path) {
            Some(p) => p,
            None => {
                self.refuse(format!("{name}: {path:?} is not an absolute path"));
                return false;
            }
        };
        if self.found.iter().any(|f| same(self.windows, &f.file.path, &path)) {
            return true;
        }
        if !self.windows && !self.check_host(name, &path, needs_dir) {
            return false;
        }
        self.found.push(Found { file: VmFile { path, role }, needs_dir, what });
        true
    }

    /// The checks of one Linux file on this host.
    fn check_host(&mut self, name: &str, path: &str, needs_dir: bool) -> bool {
        let fs = self.input.fs;
        let p = Path::new(path);
        let kind = fs.kind(p);
        if let Ok(FileKind::Device) = kind {
            self.refuse(format!(
                "{name} uses the device {path}: raw block devices cannot be replicated: move the disk to a file, e.g. qemu-img convert"
            ));
            return false;
        }
        let dir = parent(false, path).unwrap_or_else(|| "/".to_string());
        if needs_dir && SYSTEM_DIRS.contains(&dir.as_str()) {
            self.refuse(format!(
                "{name}: {path} lies directly in {dir}, which cannot be replicated as a whole: move the disk to a directory of its own such as /var/lib/libvirt/images/{}/",
                self.domain.name
            ));
            return false;
        }
        match kind {
            Ok(FileKind::File) => {}
            Ok(FileKind::Missing) => {
                self.refuse(format!("{name}: {path} does not exist on this host"));
                return false;
            }
            Ok(_) => {
                self.refuse(format!("{name}: {path} is not a regular file"));
                return false;
            }
            Err(e) => {
                self.refuse(format!("{name}: cannot read {path}: {e}"));
                return false;
            }
        }
        if !needs_dir {
            return true;
        }
        match fs.fs_magic(p) {
            Ok(FUSE_MAGIC) if self.under_mountover(p) => {}
            Ok(magic) => {
                if let Some((_, fs_name)) = SHARED_FS_MAGICS.iter().find(|(m, _)| *m == magic) {
                    self.refuse(format!(
                        "{name}: {path} is on shared or network storage ({fs_name}): hamirror replicates local disks; copy it to a local directory first, or keep it out of hamirror"
                    ));
                    return false;
                }
            }
            Err(e) => {
                self.refuse(format!("{name}: cannot tell the filesystem of {path}: {e}"));
                return false;
            }
        }
        true
    }

    fn under_mountover(&mut self, p: &Path) -> bool {
        let fs = self.input.fs;
        self.mountovers.get_or_insert_with(|| fs.mountovers()).iter().any(|m| p.starts_with(m))
    }

    fn peer_file(&mut self, path: &str, what: &str) {
        if !self.peer_files.iter().any(|f| f.path == path) {
            self.peer_files.push(PeerFile { path: path.to_string(), what: what.to_string() });
        }
    }

    /// Follows the qcow2 backing chain of `image` from its headers.
    fn chain(&mut self, name: &str, target: &str, image: &str, needs_dir: bool) {
        let mut seen: HashSet<String> = HashSet::new();
        let mut current = match normalize(false, image) {
            Some(p) => p,
            None => return,
        };
        seen.insert(current.clone());
        for _ in 0..BACKING_DEPTH_MAX {
            let backing = match backing_file(self.input.fs, Path::new(&current)) {
                Ok(Some(b)) => b,
                Ok(None) => return,
                Err(why) => {
                    self.refuse(format!("{name}: cannot read the qcow2 header of {current}: {why}"));
                    return;
                }
            };
            if backing.contains("://") || backing.starts_with("json:") {
                self.refuse(format!(
                    "{name}: the image {current} has a backing file on network storage ({backing}): only local files can be replicated"
                ));
                return;
            }
            let dir = parent(false, &current).unwrap_or_else(|| "/".to_string());
            let joined = if backing.starts_with('/') { backing.clone() } else { format!("{dir}/{backing}") };
            let Some(next) = normalize(false, &joined) else {
                self.refuse(format!("{name}: the backing file {backing:?} of {current} is not a usable path"));
                return;
            };
            if !seen.insert(next.clone()) {
                self.refuse(format!("{name}: the backing chain of {image} loops back to {next}"));
                return;
            }
            if !self.add(
                name,
                next.clone(),
                Role::Backing { target: target.to_string() },
                needs_dir,
                format!("backing file of {target}"),
            ) {
                return;
            }
            current = next;
        }
        self.refuse(format!("{name}: the backing chain of {image} is longer than {BACKING_DEPTH_MAX} images"));
    }

    /// The files of external snapshots libvirt lists for the domain.
    fn snapshot_files(&mut self) {
        let xmls = match self.input.fs.snapshots(&self.domain.name) {
            Ok(x) => x,
            Err(e) => {
                self.notes.push(format!("the snapshot metadata of {} cannot be read: {e}", self.domain.name));
                return;
            }
        };
        if xmls.is_empty() {
            return;
        }
        self.notes.push(format!(
            "{} has {} snapshot(s): their metadata stays on this host, libvirt on the peer does not list them",
            self.domain.name,
            xmls.len()
        ));
        for xml in xmls {
            for path in snapshot_sources(&xml) {
                let known = normalize(false, &path).is_some_and(|p| self.found.iter().any(|f| f.file.path == p));
                if known {
                    continue;
                }
                match self.input.fs.kind(Path::new(&path)) {
                    Ok(FileKind::Missing) => {
                        self.notes.push(format!("the snapshot file {path} listed by libvirt does not exist"))
                    }
                    _ => {
                        self.add("a snapshot", path, Role::Snapshot, true, String::new());
                    }
                }
            }
        }
    }

    /// The directories of the files that need one, nested ones merged into their parents.
    fn propose(&mut self) -> Vec<String> {
        let w = self.windows;
        let mut dirs: Vec<String> = Vec::new();
        for f in self.found.iter().filter(|f| f.needs_dir) {
            match parent(w, &f.file.path) {
                Some(d) if !(w && is_windows_root(&d)) => dirs.push(d),
                _ => self
                    .refusals
                    .push(format!("{} lies at the root of a drive: move it to a folder of its own", f.file.path)),
            }
        }
        dirs.sort_by_key(|d| key(w, d));
        dirs.dedup_by(|a, b| same(w, a, b));
        let all = dirs.clone();
        dirs.retain(|d| !all.iter().any(|o| !same(w, o, d) && inside(w, d, o)));
        // libvirt's shared pools hold other VMs' files.
        if !w {
            for d in &dirs {
                if !SHARED_POOLS.contains(&d.as_str()) {
                    continue;
                }
                let others = self.others_in(d);
                if !others.is_empty() {
                    let what = self
                        .found
                        .iter()
                        .filter(|f| parent(false, &f.file.path).as_deref() == Some(d.as_str()))
                        .map(|f| f.file.path.clone())
                        .collect::<Vec<_>>()
                        .join(", ");
                    self.refusals.push(format!(
                        "{what} lies in {d}, which also holds files of other VMs ({}): move this VM's files to a directory of its own such as /var/lib/libvirt/images/{}/ and update the domain (virsh edit)",
                        shorten(&others),
                        self.domain.name
                    ));
                }
            }
        }
        dirs
    }

    /// Names directly in `dir` that are not files of this VM.
    fn others_in(&self, dir: &str) -> Vec<String> {
        let mut names = self.input.fs.list(Path::new(dir)).unwrap_or_default();
        names.retain(|n| !self.found.iter().any(|f| f.file.path == format!("{}/{n}", dir.trim_end_matches('/'))));
        names.sort();
        names
    }

    /// Refuses a name in use, a directory another module replicates, the module limit.
    fn check_modules(&mut self, module: &Result<String, String>, dirs: &[String]) {
        let w = self.windows;
        let modules = self.input.modules;
        match module {
            Err(e) => self.refusals.push(e.clone()),
            Ok(name) => {
                if modules.iter().any(|m| &m.name == name) {
                    self.refusals
                        .push(format!("a module named {name} is already installed: choose another name with --module"));
                }
            }
        }
        for d in dirs {
            for m in modules {
                for o in &m.dirs {
                    let o = o.display().to_string();
                    if same(w, d, &o) {
                        self.refusals.push(format!("{d} is already replicated by module {}", m.name));
                    } else if inside(w, d, &o) {
                        self.refusals.push(format!("{d} lies inside {o}, replicated by module {}", m.name));
                    } else if inside(w, &o, d) {
                        self.refusals.push(format!("{d} contains {o}, replicated by module {}", m.name));
                    }
                }
            }
        }
        let mirrors = modules.iter().filter(|m| m.mode == ModuleMode::Mirror).count();
        if mirrors >= MIRROR_MODULES_MAX {
            self.refusals.push(format!(
                "{mirrors} mirror modules are installed and a node runs at most {MIRROR_MODULES_MAX}: remove one first"
            ));
        }
    }

    /// Puts every file in its directory; files outside them go to the peer list.
    fn distribute(&mut self, dirs: &[String]) -> Vec<PlannedDir> {
        let w = self.windows;
        let mut planned: Vec<PlannedDir> =
            dirs.iter().map(|d| PlannedDir { dir: d.clone(), files: Vec::new(), others: Vec::new() }).collect();
        for f in &self.found {
            match planned.iter_mut().find(|p| inside(w, &f.file.path, &p.dir)) {
                Some(p) => p.files.push(f.file.clone()),
                None if !self.peer_files.iter().any(|p| p.path == f.file.path) => {
                    self.peer_files.push(PeerFile { path: f.file.path.clone(), what: f.what.clone() })
                }
                None => {}
            }
        }
        if !w {
            for p in &mut planned {
                p.others = self.others_in(&p.dir);
            }
        }
        planned
    }
}

/// The `<source file>` of every external disk snapshot in a `<domainsnapshot>` document.
fn snapshot_sources(xml: &str) -> Vec<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    let mut external = false;
    let mut out = Vec::new();
    loop {
        let (e, empty) = match reader.read_event() {
            Ok(Event::Start(e)) => (e, false),
            Ok(Event::Empty(e)) => (e, true),
            Ok(Event::End(_)) => {
                path.pop();
                continue;
            }
            Ok(Event::Eof) | Err(_) => break,
            Ok(_) => continue,
        };
        let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
        let attr = |k: &str| {
            e.attributes()
                .flatten()
                .find(|a| a.key.as_ref() == k.as_bytes())
                .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
        };
        let parents: Vec<&str> = path.iter().map(String::as_str).collect();
        if name == "disk" && parents == ["domainsnapshot", "disks"] {
            external = attr("snapshot").as_deref() == Some("external");
        } else if name == "source" && external && parents == ["domainsnapshot", "disks", "disk"] {
            if let Some(f) = attr("file") {
                out.push(f);
            }
        }
        if !empty {
            path.push(name);
        }
    }
    out
}

/// The backing file name of a qcow2 image, `None` for no backing file or a non-qcow2 file.
fn backing_file(fs: &dyn Fs, image: &Path) -> Result<Option<String>, String> {
    let head = fs.read(image, 0, 20).map_err(|e| e.to_string())?;
    if head.len() < 20 || head[0..4] != QCOW2_MAGIC {
        return Ok(None);
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&head[8..16]);
    let mut size = [0u8; 4];
    size.copy_from_slice(&head[16..20]);
    let (offset, size) = (u64::from_be_bytes(off), u32::from_be_bytes(size));
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    if size > BACKING_NAME_BYTES_MAX {
        return Err(format!("its backing file name is {size} bytes long (at most {BACKING_NAME_BYTES_MAX})"));
    }
    let name = fs.read(image, offset, size as usize).map_err(|e| e.to_string())?;
    if name.len() != size as usize {
        return Err("its backing file name lies beyond the end of the file".to_string());
    }
    String::from_utf8(name).map(Some).map_err(|_| "its backing file name is not UTF-8".to_string())
}

/// An absolute path with `.`, `..` and repeated separators resolved; Windows paths use `\`.
fn normalize(windows: bool, path: &str) -> Option<String> {
    if windows {
        let p = path.replace('/', "\\");
        let bytes = p.as_bytes();
        let drive = bytes.len() >= 3 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' && bytes[2] == b'\\';
        if !drive && !p.starts_with("\\\\") {
            return None;
        }
        let (root, rest) = if drive { (&p[..3], &p[3..]) } else { ("\\\\", &p[2..]) };
        let mut parts: Vec<&str> = Vec::new();
        for c in rest.split('\\') {
            match c {
                "" | "." => {}
                ".." => {
                    parts.pop()?;
                }
                c => parts.push(c),
            }
        }
        return Some(format!("{root}{}", parts.join("\\")));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out.display().to_string())
}

/// The directory of a normalised path.
fn parent(windows: bool, path: &str) -> Option<String> {
    if windows {
        let (dir, _) = path.rsplit_once('\\')?;
        return Some(if dir.len() == 2 && dir.ends_with(':') { format!("{dir}\\") } else { dir.to_string() });
    }
    Path::new(path).parent().map(|p| p.display().to_string())
}

fn is_windows_root(dir: &str) -> bool {
    dir.len() == 3 && dir.ends_with(":\\")
}

/// Comparison key: Windows paths are case-insensitive.
fn key(windows: bool, p: &str) -> String {
    if windows {
        p.to_lowercase()
    } else {
        p.to_string()
    }
}

fn same(windows: bool, a: &str, b: &str) -> bool {
    key(windows, a) == key(windows, b)
}

/// `path` equals `dir` or lies below it.
fn inside(windows: bool, path: &str, dir: &str) -> bool {
    let (p, d) = (key(windows, path), key(windows, dir));
    let sep = if windows { '\\' } else { '/' };
    p == d || p.starts_with(&format!("{}{sep}", d.trim_end_matches(sep)))
}

/// At most five names, then how many more.
fn shorten(names: &[String]) -> String {
    let mut s = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        s.push_str(&format!(" and {} more", names.len() - 5));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_and_compared() {
        assert_eq!(normalize(false, "/a//b/./c/../d").as_deref(), Some("/a/b/d"));
        assert_eq!(normalize(false, "a/b"), None);
        assert_eq!(normalize(true, "C:/VMs/x/../y.vhdx").as_deref(), Some("C:\\VMs\\y.vhdx"));
        assert_eq!(normalize(true, "/x"), None);
        assert_eq!(parent(true, "C:\\x.vhdx").as_deref(), Some("C:\\"));
        assert!(inside(true, "c:\\vms\\A\\x", "C:\\VMs\\a"));
        assert!(!inside(false, "/a/bc", "/a/b"));
        assert!(inside(false, "/a/b/c", "/a/b"));
    }

    #[test]
    fn mountinfo_lists_only_our_mounts() {
        let text = "36 35 0:50 / /var/lib/x\\040y rw - fuse.hamirror hamirror rw\n\
                    37 35 0:51 / /mnt/g rw shared:1 - fuse.glusterfs g rw\n";
        assert_eq!(mountovers_in(text), vec![PathBuf::from("/var/lib/x y")]);
    }

    #[test]
    fn snapshot_sources_are_the_external_disks() {
        let xml = "<domainsnapshot><name>s1</name><disks>\
            <disk name='vda' snapshot='external'><source file='/vm/a.s1'/></disk>\
            <disk name='vdb' snapshot='internal'/><disk name='vdc' snapshot='no'><source file='/x'/></disk>\
            </disks><domain><devices><disk><source file='/vm/a.qcow2'/></disk></devices></domain></domainsnapshot>";
        assert_eq!(snapshot_sources(xml), vec!["/vm/a.s1".to_string()]);
    }
}
