//! Split brain: before a resync overwrites the losing node's copy, the data it changed on its
//! own is saved aside, so that nothing written there is lost for good.
//!
//! [`save_aside`] copies what the loser's dirty-zone maps name (every file with dirty data and
//! every path a namespace change touched, as they are now; everything when the maps are
//! incomplete) below [`aside_dir`], next to the state directory. It reads through the
//! [`LocalTree`] root fds (never following a symlink) and writes through another one opened
//! on the destination, so a symlink in either tree is copied as a symlink, never followed.

use super::dirty::DirtySet;
use super::resync::{children, data_ranges, is_enoent, show, Entry, Kind, LocalTree};
use super::{read_full_at, Op, RelPath};
use crate::daemon::logs::UtcTime;
use std::collections::{BTreeSet, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use tracing::warn;

/// Bytes read and written at a time.
const COPY_CHUNK_BYTES: usize = 1 << 20;
/// Permission bits a copy keeps: not set-user-ID nor set-group-ID, so that a saved file
/// never becomes a way to run something as its owner.
const KEPT_MODE_BITS: u32 = 0o1777;
/// `dest-1` ... `dest-N` are tried when `dest` exists.
const SUFFIX_MAX: u32 = 1000;

/// Where a split-brain loser's data is saved:
/// `<parent of state_dir>/<name of state_dir>-splitbrain/<module>/<UTC time as
/// YYYY-MM-DDTHH-MM-SSZ>`.
pub fn aside_dir(state_dir: &Path, module: &str, now: SystemTime) -> PathBuf {
    let parent = state_dir.parent().unwrap_or(state_dir);
    let mut base: OsString = state_dir.file_name().unwrap_or(OsStr::new("hamirror")).to_os_string();
    base.push("-splitbrain");
    let t = UtcTime::of(now);
    let stamp = format!("{:04}-{:02}-{:02}T{:02}-{:02}-{:02}Z", t.year, t.month, t.day, t.hour, t.minute, t.second);
    parent.join(base).join(module).join(stamp)
}

/// What [`save_aside`] saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsideReport {
    /// Where: the `dest` asked for, or it with a `-N` suffix when that already existed.
    pub dest: PathBuf,
    /// Regular files and symbolic links copied.
    pub files: u64,
    /// Data bytes copied (holes stay holes and are not counted).
    pub bytes: u64,
}

/// Copies what `set` names from `tree` (whose replicated directory `i` is `roots[i]`) to
/// `dest/<i>-<last component of roots[i]>/<path>`: every regular file with dirty data and
/// every path a namespace change names that still exists (regular files with their holes,
/// mode and mtime; symbolic links as links; directories as needed; FIFOs, sockets and device
/// nodes hold no data and are skipped). With `set.full` (the maps are incomplete) the whole
/// trees are copied. `dest` is created with mode 0700; when it exists, `dest-1`, `dest-2`...
pub fn save_aside(tree: &LocalTree, roots: &[PathBuf], set: &DirtySet, dest: &Path) -> io::Result<AsideReport> {
    if roots.len() != tree.dirs() as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} directory names were given for {} replicated directories", roots.len(), tree.dirs()),
        ));
    }
    let dest = create_fresh(dest)?;
    let mut subdirs = Vec::with_capacity(roots.len());
    for (i, root) in roots.iter().enumerate() {
        let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into());
        let sub = dest.join(format!("{i}-{name}"));
        create_private(&sub)?;
        subdirs.push(sub);
    }
    let mut c = Copier {
        src: tree,
        out: LocalTree::open(&subdirs)?,
        report: AsideReport { dest, files: 0, bytes: 0 },
        made: HashSet::new(),
        dirs: Vec::new(),
        buf: vec![0u8; COPY_CHUNK_BYTES],
    };
    if set.full {
        for root in (0..tree.dirs()).filter_map(|d| RelPath::new(d, "")) {
            c.tree(&root, 0)?;
        }
    } else {
        let paths: BTreeSet<&RelPath> =
            set.files.keys().chain(set.namespace.iter().flat_map(|op| op.paths())).collect();
        for p in paths {
            c.path(p)?;
        }
    }
    c.finish()
}

/// Creates `dest` (its missing parents too), mode 0700, or the first free `dest-N`.
fn create_fresh(dest: &Path) -> io::Result<PathBuf> {
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new().recursive(true).mode(0o700).create(parent).map_err(creating(parent))?;
    }
    for n in 0..=SUFFIX_MAX {
        let candidate = if n == 0 {
            dest.to_path_buf()
        } else {
            let mut s = dest.as_os_str().to_os_string();
            s.push(format!("-{n}"));
            PathBuf::from(s)
        };
        match create_private(&candidate) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            r => return r.map(|()| candidate),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{} and its {SUFFIX_MAX} numbered variants all exist already", dest.display()),
    ))
}

/// Creates directory `dir` with mode 0700 whatever the umask.
fn create_private(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .and_then(|()| fs::set_permissions(dir, Permissions::from_mode(0o700)))
        .map_err(creating(dir))
}

fn creating(dir: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))
}

fn saving(p: &RelPath) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("cannot save {} aside: {e}", show(p)))
}

struct Copier<'a> {
    src: &'a LocalTree,
    /// The copy: replicated directory `i` is `dest/<i>-<name>`.
    out: LocalTree,
    report: AsideReport,
    /// Directories created in the copy.
    made: HashSet<RelPath>,
    /// Those with their source entry: mode and mtime are set last (children first), so that
    /// a read-only directory can be filled and its mtime is not changed by filling it.
    dirs: Vec<(RelPath, Entry)>,
    buf: Vec<u8>,
}

impl Copier<'_> {
    /// A path named by the maps, its parent directories created as needed.
    fn path(&mut self, p: &RelPath) -> io::Result<()> {
        // The replicated directory itself: its copy is `dest/<i>-<name>`.
        if p.path().is_empty() {
            return Ok(());
        }
        let Some(e) = self.src.stat(p).map_err(saving(p))? else { return Ok(()) };
        let names: Vec<&str> = p.path().split('/').collect();
        for n in 1..names.len() {
            let Some(parent) = RelPath::new(p.dir(), &names[..n].join("/")) else { continue };
            if self.made.contains(&parent) {
                continue;
            }
            match self.src.stat(&parent).map_err(saving(&parent))? {
                Some(pe) if pe.kind == Kind::Dir => self.mkdir(&parent, pe).map_err(saving(&parent))?,
                _ => {
                    warn!(path = %show(p), "moved while being saved aside: not saved");
                    return Ok(());
                }
            }
        }
        self.entry(p, e).map_err(saving(p))
    }

    /// Everything below directory `dir`.
    fn tree(&mut self, dir: &RelPath, depth: usize) -> io::Result<()> {
        for (p, e) in children(dir, depth, &[], |d| self.src.list(d)).map_err(saving(dir))? {
            let is_dir = e.kind == Kind::Dir;
            self.entry(&p, e).map_err(saving(&p))?;
            if is_dir {
                self.tree(&p, depth + 1)?;
            }
        }
        Ok(())
    }

    fn entry(&mut self, p: &RelPath, e: Entry) -> io::Result<()> {
        match &e.kind {
            Kind::File => self.file(p, &e),
            Kind::Symlink(target) => {
                self.out.apply(&Op::Symlink { link: p.clone(), target: target.clone(), uid: e.uid, gid: e.gid })?;
                self.report.files += 1;
                self.attrs(p, &e)
            }
            Kind::Dir => self.mkdir(p, e),
            Kind::Special { .. } => Ok(()),
        }
    }

    fn mkdir(&mut self, p: &RelPath, e: Entry) -> io::Result<()> {
        if self.made.insert(p.clone()) {
            self.out.apply(&Op::Mkdir { dir: p.clone(), mode: 0o700, uid: e.uid, gid: e.gid })?;
            self.dirs.push((p.clone(), e));
        }
        Ok(())
    }

    /// A regular file: its data ranges written, its holes left as holes.
    fn file(&mut self, p: &RelPath, e: &Entry) -> io::Result<()> {
        let f = match self.src.open_file(p) {
            Ok(f) => f,
            Err(err) if is_enoent(&err) => return Ok(()),
            Err(err) => return Err(err),
        };
        let size = f.metadata()?.len();
        self.out.apply(&Op::Create { file: p.clone(), mode: 0o600, uid: e.uid, gid: e.gid })?;
        for (start, end) in data_ranges(&f, 0, size)? {
            let mut at = start;
            while at < end {
                let want = (end - at).min(self.buf.len() as u64) as usize;
                let got = read_full_at(&f, &mut self.buf[..want], at)?;
                if got == 0 {
                    break;
                }
                self.out.apply(&Op::Write { file: p.clone(), offset: at, data: self.buf[..got].to_vec() })?;
                self.report.bytes += got as u64;
                at += got as u64;
            }
        }
        self.out.apply(&Op::Truncate { file: p.clone(), size })?;
        self.report.files += 1;
        self.attrs(p, e)
    }

    /// Mode (set-id bits dropped; not for a symlink) and mtime of the source entry.
    fn attrs(&self, p: &RelPath, e: &Entry) -> io::Result<()> {
        self.out.apply(&Op::SetAttr {
            path: p.clone(),
            mode: Some(e.perm() & KEPT_MODE_BITS),
            uid: None,
            gid: None,
            atime: None,
            mtime: Some(e.mtime),
        })
    }

    /// Gives the directories their mode and mtime, deepest first.
    fn finish(mut self) -> io::Result<AsideReport> {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.path().split('/').count()));
        for (p, e) in &dirs {
            self.attrs(p, e).map_err(saving(p))?;
        }
        Ok(self.report)
    }
}
