//! Verify: compare the primary's copy of a module's replicated directories with the peer's,
//! online and without writing anything on either side.
//!
//! [`verify`] walks every replicated directory on both sides at once (the sorted listings
//! merged, depth first, with the resync's depth bound and `<notreplicated>` exclusions) and
//! reports each [`Difference`]: an entry on one side only, of another type, a symbolic link
//! with another target, a regular file of another size, or of the same size with blocks whose
//! xxh3 checksums differ (the differing blocks merged into byte ranges), and differing
//! attributes (permission bits, owner, extended attributes; never mtimes, link counts or
//! inode numbers). Content is compared by checksums computed on each side, hole blocks
//! without reading them, so only checksums cross the network.
//!
//! On a live system writes are in flight while it runs: a difference may be a change the
//! peer has not applied yet. [`verify_paths`] compares only the given paths; the daemon uses
//! it to check the differences found once more after making the peer durable.

use super::resync::{
    check_block_bytes, children, is_enoent, is_excluded, local, remote, walk_cmp, Entry, Halt, Kind, LocalTree,
    PeerFiles, ResyncError, HASH_BATCH_BLOCKS, R,
};
use super::status::{Difference, DifferenceKind, VerifyReport};
use super::RelPath;
use std::cmp::Ordering;
use std::io;
use std::time::Instant;

/// A batch of checksums covering at least this many bytes is computed on this host in a
/// thread of its own, while the peer computes its part (below, a thread costs more than it
/// saves).
const PARALLEL_BYTES_MIN: u64 = 1 << 20;

/// How a verify runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Checksum block: a power of two up to 256 MiB (the module's zone size).
    pub block_bytes: u64,
    /// Paths not compared (`<notreplicated>`), with everything below them.
    pub exclude: Vec<RelPath>,
    /// The replicated directories as configured, shown in [`Difference::dir`]: index `i`
    /// names [`RelPath::dir`] `i` (a directory without a name is shown by its index).
    pub dir_names: Vec<String>,
    /// Differences listed at most; past it the report says `truncated` and the walk stops.
    pub differences_max: usize,
}

/// Compares every replicated directory of `source` with `peer` (see the module doc). The
/// replicated directories themselves are compared too (their attributes). `progress` is
/// called after each batch of checksums with the file bytes compared so far.
///
/// `files_compared` counts the regular files present as regular files on both sides,
/// `bytes_compared` the bytes of those whose content was compared by checksums (same size).
pub fn verify(
    source: &LocalTree,
    peer: &mut dyn PeerFiles,
    opts: &VerifyOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyReport, ResyncError> {
    check_block_bytes(opts.block_bytes)?;
    let started = Instant::now();
    let mut v = Verifier { src: source, peer, opts, progress, report: VerifyReport::default() };
    let r = (0..source.dirs()).filter_map(|d| RelPath::new(d, "")).try_for_each(|root| v.root(&root));
    v.finish(r, started)
}

/// The comparison of [`verify`] restricted to `paths` (in walk order, each once; excluded
/// ones skipped). A directory in `paths` is compared as an entry (type and attributes), not
/// its contents. A path absent on both sides is no difference.
pub fn verify_paths(
    source: &LocalTree,
    peer: &mut dyn PeerFiles,
    opts: &VerifyOptions,
    paths: &[RelPath],
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyReport, ResyncError> {
    check_block_bytes(opts.block_bytes)?;
    let started = Instant::now();
    let mut sorted: Vec<&RelPath> = paths.iter().filter(|p| !is_excluded(&opts.exclude, p)).collect();
    sorted.sort_by(|a, b| walk_cmp(a, b));
    sorted.dedup();
    let mut v = Verifier { src: source, peer, opts, progress, report: VerifyReport::default() };
    let r = sorted.into_iter().try_for_each(|p| v.path(p));
    v.finish(r, started)
}

/// The peer's "no such entry": over the network only the error kind survives.
fn vanished(e: &io::Error) -> bool {
    is_enoent(e) || matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory)
}

struct Verifier<'a> {
    src: &'a LocalTree,
    peer: &'a mut dyn PeerFiles,
    opts: &'a VerifyOptions,
    progress: &'a mut dyn FnMut(u64),
    report: VerifyReport,
}

impl Verifier<'_> {
    /// The report, or the error; a stop (the list is full) is a report.
    fn finish(self, r: R<()>, started: Instant) -> Result<VerifyReport, ResyncError> {
        match r {
            Ok(()) | Err(Halt::Stop) => {}
            Err(Halt::Err(e)) => return Err(e),
        }
        let mut report = self.report;
        report.elapsed_ms = started.elapsed().as_millis().min(u64::MAX as u128) as u64;
        Ok(report)
    }

    /// Lists a difference; stops the walk once the list is full.
    fn differ(&mut self, p: &RelPath, kind: DifferenceKind, ranges: Vec<(u64, u64)>) -> R<()> {
        if self.report.differences.len() >= self.opts.differences_max {
            self.report.truncated = true;
            return Err(Halt::Stop);
        }
        let dir = match self.opts.dir_names.get(p.dir() as usize) {
            Some(name) => name.clone(),
            None => p.dir().to_string(),
        };
        self.report.differences.push(Difference { dir, path: p.path().to_string(), kind, ranges });
        Ok(())
    }

    /// A replicated directory: its attributes, then everything in it.
    fn root(&mut self, root: &RelPath) -> R<()> {
        let se = self.src.stat(root).map_err(local(root))?.ok_or(ResyncError::MissingRoot(root.dir(), "this host"))?;
        let pe = self.peer_stat(root)?.ok_or(ResyncError::MissingRoot(root.dir(), "the peer"))?;
        self.entry(root, &se, &pe)?;
        self.dir(root, 0)
    }

    /// One path of [`verify_paths`].
    fn path(&mut self, p: &RelPath) -> R<()> {
        let se = self.src.stat(p).map_err(local(p))?;
        let pe = self.peer_stat(p)?;
        self.pair(p, se.as_ref(), pe.as_ref())
    }

    fn peer_stat(&mut self, p: &RelPath) -> R<Option<Entry>> {
        match self.peer.stat(p) {
            Err(e) if vanished(&e) => Ok(None),
            r => r.map_err(remote(p)),
        }
    }

    /// The contents of directory `dir` on both sides, merged by name; subdirectories present
    /// on both sides are walked.
    fn dir(&mut self, dir: &RelPath, depth: usize) -> R<()> {
        let exclude = &self.opts.exclude;
        let ours = children(dir, depth, exclude, |d| self.src.list(d)).map_err(local(dir))?;
        let peer = &mut *self.peer;
        let theirs = children(dir, depth, exclude, |d| match peer.list(d) {
            Err(e) if vanished(&e) => Ok(Vec::new()),
            r => r,
        })
        .map_err(remote(dir))?;
        let (mut i, mut j) = (0, 0);
        loop {
            let order = match (ours.get(i), theirs.get(j)) {
                (None, None) => return Ok(()),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((pa, _)), Some((pb, _))) => pa.path().cmp(pb.path()),
            };
            let se = ours.get(i).filter(|_| order != Ordering::Greater);
            let pe = theirs.get(j).filter(|_| order != Ordering::Less);
            i += usize::from(se.is_some());
            j += usize::from(pe.is_some());
            let Some((p, _)) = se.or(pe) else { return Ok(()) };
            let (se, pe) = (se.map(|(_, e)| e), pe.map(|(_, e)| e));
            self.pair(p, se, pe)?;
            if se.is_some_and(|e| e.kind == Kind::Dir) && pe.is_some_and(|e| e.kind == Kind::Dir) {
                self.dir(p, depth + 1)?;
            }
        }
    }

    /// An entry as each side has it (`None`: absent there).
    fn pair(&mut self, p: &RelPath, se: Option<&Entry>, pe: Option<&Entry>) -> R<()> {
        match (se, pe) {
            (None, None) => Ok(()),
            (Some(_), None) => self.differ(p, DifferenceKind::MissingOnSecondary, Vec::new()),
            (None, Some(_)) => self.differ(p, DifferenceKind::OnlyOnSecondary, Vec::new()),
            (Some(se), Some(pe)) => self.entry(p, se, pe),
        }
    }

    /// An entry present on both sides: type (or link target), attributes, then content.
    fn entry(&mut self, p: &RelPath, se: &Entry, pe: &Entry) -> R<()> {
        if !se.same_kind(pe) {
            let kind = match (&se.kind, &pe.kind) {
                (Kind::Symlink(_), Kind::Symlink(_)) => DifferenceKind::LinkTarget,
                _ => DifferenceKind::Type,
            };
            self.differ(p, kind, Vec::new())?;
            if kind == DifferenceKind::Type {
                return Ok(());
            }
        }
        let is_link = matches!(se.kind, Kind::Symlink(_));
        if (!is_link && se.perm() != pe.perm()) || se.uid != pe.uid || se.gid != pe.gid || se.xattrs != pe.xattrs {
            self.differ(p, DifferenceKind::Attributes, Vec::new())?;
        }
        if se.kind != Kind::File {
            return Ok(());
        }
        self.report.files_compared += 1;
        if se.size != pe.size {
            return self.differ(p, DifferenceKind::Size, Vec::new());
        }
        self.content(p, se.size)
    }

    /// Block checksums of a file of `size` bytes on both sides, a batch at a time (for a large
    /// batch, this host's computed while the peer computes its own).
    fn content(&mut self, p: &RelPath, size: u64) -> R<()> {
        let bb = self.opts.block_bytes;
        let blocks = size.div_ceil(bb);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut first = 0;
        while first < blocks {
            let count = (blocks - first).min(HASH_BATCH_BLOCKS);
            let (ours, theirs) = if count * bb < PARALLEL_BYTES_MIN {
                (self.src.block_hashes(p, bb, first, count), self.peer.block_hashes(p, bb, first, count))
            } else {
                std::thread::scope(|s| {
                    let src = self.src;
                    let ours = s.spawn(move || src.block_hashes(p, bb, first, count));
                    let theirs = self.peer.block_hashes(p, bb, first, count);
                    (ours.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)), theirs)
                })
            };
            // A file that vanished meanwhile: on one side only now (a live system).
            let ours = match ours {
                Err(e) if is_enoent(&e) => return self.differ(p, DifferenceKind::OnlyOnSecondary, Vec::new()),
                r => r.map_err(local(p))?,
            };
            let theirs = match theirs {
                Err(e) if vanished(&e) => return self.differ(p, DifferenceKind::MissingOnSecondary, Vec::new()),
                r => r.map_err(remote(p))?,
            };
            if theirs.len() as u64 != count {
                let e = io::Error::new(io::ErrorKind::InvalidData, "wrong number of block hashes");
                return Err(remote(p)(e));
            }
            for (i, (a, b)) in (first..).zip(ours.iter().zip(&theirs)) {
                if a == b {
                    continue;
                }
                let (start, end) = (i * bb, ((i + 1) * bb).min(size));
                match ranges.last_mut() {
                    Some(last) if last.1 == start => last.1 = end,
                    _ => ranges.push((start, end)),
                }
            }
            self.report.bytes_compared += ((first + count) * bb).min(size) - first * bb;
            (self.progress)(self.report.bytes_compared);
            first += count;
        }
        if ranges.is_empty() {
            return Ok(());
        }
        self.differ(p, DifferenceKind::Content, ranges)
    }
}
