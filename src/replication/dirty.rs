//! Dirty-zone maps: what the peer may lack, per module, so that a resync sends only that.
//!
//! Per file ([`RelPath`]), the zones (`zone_bytes`, 1 MiB by default) written while the peer
//! is absent or while a write is not yet acknowledged by the peer; and, in order, the
//! namespace changes (create, mkdir, mknod, symlink, link, unlink, rmdir, rename, truncate,
//! allocation, setattr, xattrs) so that a resync can replay them on the peer.
//!
//! # Durability
//! The maps are an append-only log (`dirty.log` in the module's map directory), mirrored by
//! an in-memory set. [`DirtyMaps::mark`] appends a record and fsyncs it *before returning*
//! when the op changes the persisted set: the caller acknowledges the write only after. A
//! write to a zone already dirty costs no I/O at all. A crash keeps every record that `mark`
//! returned for; a torn last record (power loss during an append) is ignored on reopen;
//! damage in the middle of the log makes the maps ask for a full resync (never a silent loss).
//!
//! # Generations
//! Every `mark` gets a generation number (increasing). A zone remembers the last generation
//! that marked it, so clearing "everything up to generation G" (the peer acknowledged it, or a
//! resync sent a snapshot taken at G) keeps the zones written again after G. Clears are lazy:
//! they are appended without fsync (losing one only resends a zone).
//!
//! # Bounds
//! Memory is bounded by [`DirtyLimits`]: beyond `zones_max` zones the file with the most
//! zones becomes "whole file dirty" (the resync then compares that file by checksums); beyond
//! `files_max` files or the namespace-log bounds the maps fall back to "full resync needed".
//! Coarsening only ever adds work for the resync; it never forgets a change.
//!
//! The log is rewritten compactly on open and whenever it grows past 4 times its last
//! compacted size (and past `log_compact_bytes_min`).

use super::{Op, RelPath};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use tracing::{error, warn};

/// Default bound on dirty zones held in memory (1 TiB of changes at 1 MiB zones, ~50 MiB).
pub const DIRTY_ZONES_MAX: usize = 1 << 20;
/// Default bound on files with dirty zones.
pub const DIRTY_FILES_MAX: usize = 100_000;
/// Default bound on recorded namespace changes.
pub const NAMESPACE_OPS_MAX: usize = 100_000;
/// Default bound on the encoded bytes of recorded namespace changes.
pub const NAMESPACE_BYTES_MAX: usize = 32 << 20;
/// The log is not compacted below this size.
pub const LOG_COMPACT_BYTES_MIN: u64 = 16 << 20;
/// Largest record payload; anything longer is damage.
pub const RECORD_BYTES_MAX: usize = 1 << 20;
/// Zones per `ClearFile` record (keeps records under [`RECORD_BYTES_MAX`]).
const CLEAR_ZONES_PER_RECORD: usize = 16 << 10;

/// File name of the log inside the map directory.
pub const LOG_FILE: &str = "dirty.log";
const LOG_MAGIC: &[u8; 8] = b"HMDIRTY1";
/// A record is `len: u32 LE`, `xxh3-64(payload): u64 LE`, then `payload` (postcard).
const RECORD_HEADER_BYTES: usize = 12;

// fallocate(2) mode bits (linux/falloc.h).
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_COLLAPSE_RANGE: i32 = 0x08;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;
const FALLOC_FL_INSERT_RANGE: i32 = 0x20;
// renameat2(2) flag.
const RENAME_EXCHANGE: u32 = 1 << 1;

/// Memory bounds of one module's maps (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyLimits {
    pub zones_max: usize,
    pub files_max: usize,
    pub namespace_ops_max: usize,
    pub namespace_bytes_max: usize,
    pub log_compact_bytes_min: u64,
}

impl Default for DirtyLimits {
    fn default() -> Self {
        DirtyLimits {
            zones_max: DIRTY_ZONES_MAX,
            files_max: DIRTY_FILES_MAX,
            namespace_ops_max: NAMESPACE_OPS_MAX,
            namespace_bytes_max: NAMESPACE_BYTES_MAX,
            log_compact_bytes_min: LOG_COMPACT_BYTES_MIN,
        }
    }
}

/// What a resync must send for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirtyFile {
    /// These zones (sorted indexes; zone `z` is bytes `z * zone_bytes ..`).
    Zones(Vec<u64>),
    /// Any part of the file may differ: compare it by checksums.
    Whole,
}

/// Sizes of the maps (see [`DirtyMaps::counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirtyCounts {
    pub zones: u64,
    pub files: u64,
    pub namespace: u64,
    pub full: bool,
}

/// A snapshot of the maps: what a resync must send.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirtySet {
    /// Every mark up to this generation is in the set; clear up to it once the peer has it.
    pub generation: u64,
    pub zone_bytes: u64,
    /// The maps overflowed or were damaged: only a full resync is safe.
    pub full: bool,
    /// A file that had dirty zones was unlinked or replaced while it may have had other hard
    /// links: the resync must compare every multiply-linked file.
    pub hardlink_orphans: bool,
    /// Namespace changes, in the order they happened (unlinks and rmdirs are the tombstones).
    pub namespace: Vec<Op>,
    /// Files with dirty data, by their current name.
    pub files: BTreeMap<RelPath, DirtyFile>,
}

impl DirtySet {
    /// Nothing to resync.
    pub fn is_empty(&self) -> bool {
        !self.full && !self.hardlink_orphans && self.namespace.is_empty() && self.files.is_empty()
    }
    /// Number of dirty zones (whole files not counted).
    pub fn zone_count(&self) -> usize {
        self.files.values().map(|f| if let DirtyFile::Zones(z) = f { z.len() } else { 0 }).sum()
    }
}

/// Last generation that marked something: in memory, and as persisted in the log. The log
/// may hold a higher generation than memory (compaction merges), never a lower one that
/// matters: a clear re-persists `mem` first when `disk <= upto < mem`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gen {
    mem: u64,
    disk: u64,
}

impl Gen {
    fn new(g: u64) -> Gen {
        Gen { mem: g, disk: g }
    }
    fn bump(&mut self, g: u64) {
        self.mem = self.mem.max(g);
    }
    fn persisted(&mut self, g: u64) {
        self.mem = self.mem.max(g);
        self.disk = self.disk.max(g);
    }
}

#[derive(Debug, Clone)]
enum FileState {
    Zones(BTreeMap<u64, Gen>),
    Whole(Gen),
}

/// One log record. Variants are matched by index in the encoding: only ever add at the end.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Record {
    Header {
        zone_bytes: u64,
        generation: u64,
    },
    Zones {
        gen: u64,
        file: RelPath,
        first: u64,
        count: u64,
    },
    Whole {
        gen: u64,
        file: RelPath,
    },
    /// A namespace change; `effects` false in a compacted log (its effects on the zones are
    /// already in the records that follow).
    Namespace {
        gen: u64,
        op: Op,
        effects: bool,
    },
    Full {
        gen: u64,
    },
    Orphans {
        gen: u64,
    },
    ClearUpto {
        upto: u64,
    },
    ClearFile {
        file: RelPath,
        zones: Option<Vec<u64>>,
        upto: u64,
    },
    ClearNamespace {
        upto: u64,
    },
}

/// The maps as plain data: every change returns the records that persist it.
struct State {
    zone_bytes: u64,
    limits: DirtyLimits,
    gen: u64,
    files: BTreeMap<RelPath, FileState>,
    zone_count: usize,
    /// (generation, op, encoded bytes), in order.
    namespace: VecDeque<(u64, Op, usize)>,
    namespace_bytes: usize,
    full: Option<Gen>,
    orphans: Option<Gen>,
}

fn rel_valid(p: &RelPath) -> bool {
    RelPath::new(p.dir(), p.path()).is_some()
}

fn record_valid(r: &Record) -> bool {
    match r {
        Record::Zones { file, .. } | Record::Whole { file, .. } | Record::ClearFile { file, .. } => rel_valid(file),
        Record::Namespace { op, .. } => op.paths().into_iter().all(rel_valid),
        _ => true,
    }
}

/// Is `p` equal to `root` or below it?
fn in_tree(p: &RelPath, root: &RelPath) -> bool {
    p.dir() == root.dir()
        && (p.path() == root.path()
            || root.path().is_empty()
            || (p.path().len() > root.path().len()
                && p.path().starts_with(root.path())
                && p.path().as_bytes()[root.path().len()] == b'/'))
}

impl State {
    fn new(zone_bytes: u64, limits: DirtyLimits) -> State {
        State {
            zone_bytes,
            limits,
            gen: 0,
            files: BTreeMap::new(),
            zone_count: 0,
            namespace: VecDeque::new(),
            namespace_bytes: 0,
            full: None,
            orphans: None,
        }
    }

    fn mark(&mut self, op: &Op, out: &mut Vec<Record>) -> u64 {
        self.gen += 1;
        let gen = self.gen;
        match op {
            Op::Write { file, offset, data } => self.mark_range(file, *offset, data.len() as u64, gen, out),
            Op::Fallocate { file, mode, offset, len } => {
                if mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE) != 0 {
                    // Data shifts: every zone after `offset` changes.
                    self.mark_whole(file, gen, out);
                } else if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
                    self.mark_range(file, *offset, *len, gen, out);
                } else {
                    // A plain allocation changes no byte: replayed to keep the preallocation.
                    self.mark_namespace(op, gen, out);
                }
            }
            Op::Fsync { .. } => {}
            _ => self.mark_namespace(op, gen, out),
        }
        self.enforce_limits(out);
        gen
    }

    fn mark_range(&mut self, file: &RelPath, offset: u64, len: u64, gen: u64, out: &mut Vec<Record>) {
        if len == 0 {
            return;
        }
        let first = offset / self.zone_bytes;
        let last = offset.saturating_add(len - 1) / self.zone_bytes;
        let count = last - first + 1;
        // A huge range (a punch over a whole disk) goes straight to "whole file".
        if count > (self.limits.zones_max / 4).max(1) as u64 {
            self.mark_whole(file, gen, out);
            return;
        }
        let state = self.files.entry(file.clone()).or_insert_with(|| FileState::Zones(BTreeMap::new()));
        let zones = match state {
            FileState::Whole(g) => {
                g.bump(gen);
                return;
            }
            FileState::Zones(z) => z,
        };
        let mut run: Option<(u64, u64)> = None;
        for zone in first..=last {
            match zones.get_mut(&zone) {
                Some(g) => g.bump(gen),
                None => {
                    zones.insert(zone, Gen::new(gen));
                    self.zone_count += 1;
                    run = match run {
                        Some((s, n)) if s + n == zone => Some((s, n + 1)),
                        Some((s, n)) => {
                            out.push(Record::Zones { gen, file: file.clone(), first: s, count: n });
                            Some((zone, 1))
                        }
                        None => Some((zone, 1)),
                    };
                }
            }
        }
        if let Some((s, n)) = run {
            out.push(Record::Zones { gen, file: file.clone(), first: s, count: n });
        }
    }

    fn mark_whole(&mut self, file: &RelPath, gen: u64, out: &mut Vec<Record>) {
        self.set_whole(file, gen);
        out.push(Record::Whole { gen, file: file.clone() });
    }

    /// Makes `file` whole-dirty at a generation at least `gen` (no record).
    fn set_whole(&mut self, file: &RelPath, gen: u64) {
        let g = match self.files.remove(file) {
            Some(FileState::Zones(z)) => {
                self.zone_count -= z.len();
                z.values().fold(Gen::new(gen), |acc, g| Gen { mem: acc.mem.max(g.mem), disk: acc.disk.max(g.disk) })
            }
            Some(FileState::Whole(mut g)) => {
                g.persisted(gen);
                g
            }
            None => Gen::new(gen),
        };
        self.files.insert(file.clone(), FileState::Whole(Gen { mem: g.mem.max(gen), disk: g.disk.max(gen) }));
    }

    fn mark_namespace(&mut self, op: &Op, gen: u64, out: &mut Vec<Record>) {
        self.push_namespace(gen, op.clone());
        self.namespace_effects(op, gen);
        out.push(Record::Namespace { gen, op: op.clone(), effects: true });
    }

    fn push_namespace(&mut self, gen: u64, op: Op) {
        let bytes = postcard::experimental::serialized_size(&op).unwrap_or(RECORD_BYTES_MAX);
        self.namespace_bytes += bytes;
        self.namespace.push_back((gen, op, bytes));
    }

    /// What a namespace change does to the dirty data (the same live and on replay).
    fn namespace_effects(&mut self, op: &Op, gen: u64) {
        match op {
            // Two names for one inode: a write through one changes the other, and the maps
            // only know names; compare both by checksums.
            Op::Link { existing, new } => {
                self.set_whole(existing, gen);
                self.set_whole(new, gen);
            }
            Op::Unlink { file } => {
                // Its data may live on under another name the maps do not know.
                let had_dirt = self.remove_tree(file).is_some_and(|t| !t.is_empty());
                if had_dirt {
                    self.set_orphans(gen);
                }
            }
            Op::Rename { from, to, flags } => {
                if from == to {
                    return;
                }
                if flags & RENAME_EXCHANGE != 0 {
                    let a = self.remove_tree(from).unwrap_or_default();
                    let b = self.remove_tree(to).unwrap_or_default();
                    self.insert_tree(to, from, a, gen);
                    self.insert_tree(from, to, b, gen);
                } else {
                    let replaced = self.remove_tree(to).unwrap_or_default();
                    if !replaced.is_empty() {
                        self.set_orphans(gen);
                    }
                    let moved = self.remove_tree(from).unwrap_or_default();
                    self.insert_tree(to, from, moved, gen);
                }
            }
            _ => {}
        }
    }

    fn set_orphans(&mut self, gen: u64) {
        match &mut self.orphans {
            Some(g) => g.persisted(gen),
            None => self.orphans = Some(Gen::new(gen)),
        }
    }

    /// Removes `root` and everything below it; `None` when nothing was there.
    fn remove_tree(&mut self, root: &RelPath) -> Option<Vec<(RelPath, FileState)>> {
        // `root` and `root/...` sort in [root, root + "0") ('0' follows '/'): stop there
        // rather than scan every later file.
        let upper = format!("{}0", root.path());
        let keys: Vec<RelPath> = self
            .files
            .range(root.clone()..)
            .map(|(k, _)| k)
            .take_while(|k| k.dir() == root.dir() && (root.path().is_empty() || k.path() < upper.as_str()))
            .filter(|k| in_tree(k, root))
            .cloned()
            .collect();
        if keys.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(s) = self.files.remove(&k) {
                if let FileState::Zones(z) = &s {
                    self.zone_count -= z.len();
                }
                out.push((k, s));
            }
        }
        Some(out)
    }

    /// Re-inserts states taken from under `old_root` below `new_root`.
    fn insert_tree(&mut self, new_root: &RelPath, old_root: &RelPath, states: Vec<(RelPath, FileState)>, gen: u64) {
        for (old, state) in states {
            let suffix = &old.path()[old_root.path().len()..];
            let joined = if old_root.path().is_empty() && !suffix.is_empty() {
                format!("{}/{suffix}", new_root.path())
            } else {
                format!("{}{suffix}", new_root.path())
            };
            match RelPath::new(new_root.dir(), joined.trim_start_matches('/')) {
                Some(new) => {
                    if let FileState::Zones(z) = &state {
                        self.zone_count += z.len();
                    }
                    self.files.insert(new, state);
                }
                // The new name is too long to be valid: only a full resync is safe.
                None => self.go_full(gen),
            }
        }
    }

    /// Forgets every detail: everything up to `gen` may differ.
    fn go_full(&mut self, gen: u64) {
        self.files.clear();
        self.zone_count = 0;
        self.namespace.clear();
        self.namespace_bytes = 0;
        self.orphans = None;
        match &mut self.full {
            Some(g) => g.persisted(gen),
            None => self.full = Some(Gen::new(gen)),
        }
    }

    fn enforce_limits(&mut self, out: &mut Vec<Record>) {
        let l = self.limits;
        if self.files.len() > l.files_max
            || self.namespace.len() > l.namespace_ops_max
            || self.namespace_bytes > l.namespace_bytes_max
        {
            warn!(
                files = self.files.len(),
                namespace_ops = self.namespace.len(),
                "dirty-zone maps over their memory bound: the next resync will be a full one"
            );
            let gen = self.gen;
            self.go_full(gen);
            out.push(Record::Full { gen });
            return;
        }
        while self.zone_count > l.zones_max {
            let Some(file) = self
                .files
                .iter()
                .filter_map(|(k, s)| match s {
                    FileState::Zones(z) => Some((z.len(), k)),
                    FileState::Whole(_) => None,
                })
                .max()
                .map(|(_, k)| k.clone())
            else {
                break;
            };
            let Some(FileState::Zones(z)) = self.files.get(&file) else { break };
            let gen = z.values().map(|g| g.mem).max().unwrap_or(self.gen);
            self.set_whole(&file, gen);
            out.push(Record::Whole { gen, file });
        }
    }

    /// Drops what is acknowledged up to `upto`; re-persists what was marked again since.
    fn clear_upto(&mut self, upto: u64, out: &mut Vec<Record>) {
        let mut empty = Vec::new();
        for (file, state) in self.files.iter_mut() {
            match state {
                FileState::Whole(g) => {
                    if g.mem <= upto {
                        empty.push(file.clone());
                    } else if g.disk <= upto {
                        g.disk = g.mem;
                        out.push(Record::Whole { gen: g.mem, file: file.clone() });
                    }
                }
                FileState::Zones(zones) => {
                    let before = zones.len();
                    zones.retain(|zone, g| {
                        if g.mem <= upto {
                            return false;
                        }
                        if g.disk <= upto {
                            g.disk = g.mem;
                            out.push(Record::Zones { gen: g.mem, file: file.clone(), first: *zone, count: 1 });
                        }
                        true
                    });
                    self.zone_count -= before - zones.len();
                    if zones.is_empty() {
                        empty.push(file.clone());
                    }
                }
            }
        }
        for f in empty {
            self.files.remove(&f);
        }
        self.clear_namespace(upto);
        for (flag, kind) in [(&mut self.full, 0), (&mut self.orphans, 1)] {
            if let Some(g) = flag {
                if g.mem <= upto {
                    *flag = None;
                } else if g.disk <= upto {
                    g.disk = g.mem;
                    out.push(if kind == 0 { Record::Full { gen: g.mem } } else { Record::Orphans { gen: g.mem } });
                }
            }
        }
        out.push(Record::ClearUpto { upto });
    }

    fn clear_namespace(&mut self, upto: u64) {
        while self.namespace.front().is_some_and(|(g, _, _)| *g <= upto) {
            if let Some((_, _, bytes)) = self.namespace.pop_front() {
                self.namespace_bytes -= bytes;
            }
        }
    }

    /// Clears `zones` of `file` (all of it with `None`) marked up to `upto`.
    fn clear_file(&mut self, file: &RelPath, zones: Option<&[u64]>, upto: u64, out: &mut Vec<Record>) {
        let mut remove = false;
        match self.files.get_mut(file) {
            None => return,
            Some(FileState::Whole(g)) => {
                // Part of a whole-dirty file says nothing about the rest.
                if zones.is_some() {
                    return;
                }
                if g.mem <= upto {
                    remove = true;
                } else if g.disk <= upto {
                    g.disk = g.mem;
                    out.push(Record::Whole { gen: g.mem, file: file.clone() });
                }
            }
            Some(FileState::Zones(map)) => {
                let before = map.len();
                let targets: Vec<u64> = match zones {
                    Some(list) => list.to_vec(),
                    None => map.keys().copied().collect(),
                };
                for zone in targets {
                    if let Some(g) = map.get_mut(&zone) {
                        if g.mem <= upto {
                            map.remove(&zone);
                        } else if g.disk <= upto {
                            g.disk = g.mem;
                            out.push(Record::Zones { gen: g.mem, file: file.clone(), first: zone, count: 1 });
                        }
                    }
                }
                self.zone_count -= before - map.len();
                remove = map.is_empty();
            }
        }
        if remove {
            self.files.remove(file);
        }
        match zones {
            Some(list) => {
                for chunk in list.chunks(CLEAR_ZONES_PER_RECORD) {
                    out.push(Record::ClearFile { file: file.clone(), zones: Some(chunk.to_vec()), upto });
                }
            }
            None => out.push(Record::ClearFile { file: file.clone(), zones: None, upto }),
        }
    }

    /// Applies a record read back from the log.
    fn replay(&mut self, rec: Record) {
        let mut scratch = Vec::new();
        match rec {
            Record::Header { generation, .. } => self.gen = self.gen.max(generation),
            Record::Zones { gen, file, first, count } => {
                self.gen = self.gen.max(gen);
                if count > (self.limits.zones_max / 4).max(1) as u64 {
                    self.set_whole(&file, gen);
                } else {
                    let state = self.files.entry(file).or_insert_with(|| FileState::Zones(BTreeMap::new()));
                    match state {
                        FileState::Whole(g) => g.persisted(gen),
                        FileState::Zones(z) => {
                            for zone in first..first.saturating_add(count) {
                                match z.get_mut(&zone) {
                                    Some(g) => g.persisted(gen),
                                    None => {
                                        z.insert(zone, Gen::new(gen));
                                        self.zone_count += 1;
                                    }
                                }
                            }
                        }
                    }
                }
                self.enforce_limits(&mut scratch);
            }
            Record::Whole { gen, file } => {
                self.gen = self.gen.max(gen);
                self.set_whole(&file, gen);
            }
            Record::Namespace { gen, op, effects } => {
                self.gen = self.gen.max(gen);
                self.push_namespace(gen, op.clone());
                if effects {
                    self.namespace_effects(&op, gen);
                }
                self.enforce_limits(&mut scratch);
            }
            Record::Full { gen } => {
                self.gen = self.gen.max(gen);
                self.go_full(gen);
            }
            Record::Orphans { gen } => {
                self.gen = self.gen.max(gen);
                self.set_orphans(gen);
            }
            Record::ClearUpto { upto } => {
                self.gen = self.gen.max(upto);
                self.clear_upto(upto, &mut scratch);
            }
            Record::ClearFile { file, zones, upto } => {
                self.gen = self.gen.max(upto);
                self.clear_file(&file, zones.as_deref(), upto, &mut scratch);
            }
            Record::ClearNamespace { upto } => {
                self.gen = self.gen.max(upto);
                self.clear_namespace(upto);
            }
        }
    }

    /// Re-expresses the zones in another zone size (a changed `zone` attribute).
    fn rezone(&mut self, new_zone_bytes: u64) {
        let old = self.zone_bytes;
        if old == new_zone_bytes {
            return;
        }
        let mut count = 0;
        for state in self.files.values_mut() {
            if let FileState::Zones(z) = state {
                let mut next: BTreeMap<u64, Gen> = BTreeMap::new();
                for (zone, g) in z.iter() {
                    let start = zone.saturating_mul(old);
                    let end = start.saturating_add(old - 1);
                    for nz in start / new_zone_bytes..=end / new_zone_bytes {
                        let e = next.entry(nz).or_insert(*g);
                        e.mem = e.mem.max(g.mem);
                        e.disk = e.disk.max(g.disk);
                    }
                }
                count += next.len();
                *z = next;
            }
        }
        self.zone_count = count;
        self.zone_bytes = new_zone_bytes;
        self.enforce_limits(&mut Vec::new());
    }

    /// The records that rebuild this state, for a compacted log; marks everything persisted.
    fn compacted(&mut self) -> Vec<Record> {
        let mut out = vec![Record::Header { zone_bytes: self.zone_bytes, generation: self.gen }];
        if let Some(g) = &mut self.full {
            g.disk = g.disk.max(g.mem);
            out.push(Record::Full { gen: g.disk });
        }
        for (gen, op, _) in &self.namespace {
            out.push(Record::Namespace { gen: *gen, op: op.clone(), effects: false });
        }
        if let Some(g) = &mut self.orphans {
            g.disk = g.disk.max(g.mem);
            out.push(Record::Orphans { gen: g.disk });
        }
        for (file, state) in self.files.iter_mut() {
            match state {
                FileState::Whole(g) => {
                    g.disk = g.disk.max(g.mem);
                    out.push(Record::Whole { gen: g.disk, file: file.clone() });
                }
                FileState::Zones(zones) => {
                    // Runs of consecutive zones share one record with their highest generation
                    // (a higher generation only keeps a zone longer); memory follows the log.
                    let keys: Vec<u64> = zones.keys().copied().collect();
                    let mut i = 0;
                    while i < keys.len() {
                        let mut j = i + 1;
                        while j < keys.len() && keys[j] == keys[j - 1] + 1 {
                            j += 1;
                        }
                        let run = &keys[i..j];
                        let top = run.iter().filter_map(|k| zones.get(k)).map(|g| g.mem.max(g.disk)).max().unwrap_or(0);
                        for k in run {
                            if let Some(g) = zones.get_mut(k) {
                                g.disk = top;
                            }
                        }
                        out.push(Record::Zones { gen: top, file: file.clone(), first: keys[i], count: (j - i) as u64 });
                        i = j;
                    }
                }
            }
        }
        out
    }

    fn snapshot(&self) -> DirtySet {
        DirtySet {
            generation: self.gen,
            zone_bytes: self.zone_bytes,
            full: self.full.is_some(),
            hardlink_orphans: self.orphans.is_some(),
            namespace: self.namespace.iter().map(|(_, op, _)| op.clone()).collect(),
            files: self
                .files
                .iter()
                .map(|(k, s)| {
                    let f = match s {
                        FileState::Whole(_) => DirtyFile::Whole,
                        FileState::Zones(z) => DirtyFile::Zones(z.keys().copied().collect()),
                    };
                    (k.clone(), f)
                })
                .collect(),
        }
    }
}

fn encode(rec: &Record) -> io::Result<Vec<u8>> {
    let payload = postcard::to_stdvec(rec).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if payload.len() > RECORD_BYTES_MAX {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "dirty-map record too large"));
    }
    let mut buf = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
    buf.extend_from_slice(&payload);
    Ok(buf)
}

/// How reading the log back ended.
enum LogEnd {
    Clean,
    /// A torn last record (ignored).
    Torn,
    /// Damage with more log after it, or a bad magic: the maps cannot be trusted.
    Damaged(String),
}

/// Reads every record of the log at `path` into `state`.
fn read_log(path: &Path, state: &mut State) -> io::Result<LogEnd> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    if r.read_exact(&mut magic).is_err() || &magic != LOG_MAGIC {
        return Ok(if len < 8 { LogEnd::Torn } else { LogEnd::Damaged("bad magic".into()) });
    }
    let mut at: u64 = 8;
    let mut first = true;
    loop {
        if at == len {
            return Ok(LogEnd::Clean);
        }
        let bad = |why: &str| {
            if len - at <= (RECORD_HEADER_BYTES + RECORD_BYTES_MAX) as u64 {
                LogEnd::Torn
            } else {
                LogEnd::Damaged(format!("{why} at byte {at} of {len}"))
            }
        };
        let mut head = [0u8; RECORD_HEADER_BYTES];
        if r.read_exact(&mut head).is_err() {
            return Ok(bad("short record header"));
        }
        let mut l4 = [0u8; 4];
        l4.copy_from_slice(&head[0..4]);
        let mut h8 = [0u8; 8];
        h8.copy_from_slice(&head[4..12]);
        let plen = u32::from_le_bytes(l4) as usize;
        if plen == 0 || plen > RECORD_BYTES_MAX {
            return Ok(bad("bad record length"));
        }
        let mut payload = vec![0u8; plen];
        if r.read_exact(&mut payload).is_err() {
            return Ok(bad("short record"));
        }
        if xxhash_rust::xxh3::xxh3_64(&payload) != u64::from_le_bytes(h8) {
            return Ok(bad("checksum mismatch"));
        }
        let rec: Record = match postcard::from_bytes(&payload) {
            Ok(r) if record_valid(&r) => r,
            _ => return Ok(bad("undecodable record")),
        };
        if first {
            match rec {
                Record::Header { zone_bytes, .. } if zone_bytes.is_power_of_two() => state.zone_bytes = zone_bytes,
                _ => return Ok(LogEnd::Damaged("no header record".into())),
            }
            first = false;
        }
        state.replay(rec);
        at += (RECORD_HEADER_BYTES + plen) as u64;
    }
}

struct Inner {
    state: State,
    log: File,
    log_bytes: u64,
    compacted_bytes: u64,
    /// Marks appended since the last fsync.
    unsynced: bool,
}

/// One module's dirty-zone maps (see the module doc). Shared between threads.
pub struct DirtyMaps {
    dir: PathBuf,
    zone_bytes: u64,
    inner: Mutex<Inner>,
    fsyncs: AtomicU64,
}

impl std::fmt::Debug for DirtyMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyMaps").field("dir", &self.dir).field("zone_bytes", &self.zone_bytes).finish()
    }
}

impl DirtyMaps {
    /// Opens (or creates) the maps in `dir` with the default bounds.
    pub fn open(dir: &Path, zone_bytes: u64) -> io::Result<DirtyMaps> {
        DirtyMaps::open_with_limits(dir, zone_bytes, DirtyLimits::default())
    }

    /// Opens (or creates) the maps in `dir`. A log written with another zone size is
    /// converted; a torn last record is dropped; a damaged log gives maps that ask for a full
    /// resync. The log is rewritten compactly before this returns.
    pub fn open_with_limits(dir: &Path, zone_bytes: u64, limits: DirtyLimits) -> io::Result<DirtyMaps> {
        if !zone_bytes.is_power_of_two() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "zone size must be a power of two"));
        }
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE);
        let mut state = State::new(zone_bytes, limits);
        match read_log(&path, &mut state) {
            Ok(LogEnd::Clean) => {}
            Ok(LogEnd::Torn) => warn!(log = %path.display(), "dirty-zone log: torn last record ignored"),
            Ok(LogEnd::Damaged(why)) => {
                error!(log = %path.display(), "dirty-zone log damaged ({why}): the next resync will be a full one");
                let gen = state.gen + 1;
                state.gen = gen;
                state.go_full(gen);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        state.rezone(zone_bytes);
        let (log, log_bytes) = write_compacted(dir, &mut state)?;
        let inner = Inner { state, log, log_bytes, compacted_bytes: log_bytes, unsynced: false };
        Ok(DirtyMaps { dir: dir.to_path_buf(), zone_bytes, inner: Mutex::new(inner), fsyncs: AtomicU64::new(1) })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Zone size in bytes.
    pub fn zone_bytes(&self) -> u64 {
        self.zone_bytes
    }

    /// The map directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records `op` and makes the record durable before returning when it changes the
    /// persisted set (a new zone, a namespace change). Returns the op's generation, for
    /// [`DirtyMaps::clear_upto`] once the peer has acknowledged it.
    pub fn mark(&self, op: &Op) -> io::Result<u64> {
        let mut inner = self.lock();
        let gen = self.append_mark(&mut inner, op)?;
        self.sync_locked(&mut inner)?;
        Ok(gen)
    }

    /// Records `op` without waiting for the disk: call [`DirtyMaps::sync`] before the write
    /// is acknowledged (one fsync for a batch of marks).
    pub fn mark_deferred(&self, op: &Op) -> io::Result<u64> {
        let mut inner = self.lock();
        self.append_mark(&mut inner, op)
    }

    /// Makes every mark so far durable (no I/O when nothing is pending).
    pub fn sync(&self) -> io::Result<()> {
        let mut inner = self.lock();
        self.sync_locked(&mut inner)
    }

    /// Records a change the absent peer misses (durable before returning, like `mark`).
    pub fn track(&self, op: &Op) -> io::Result<()> {
        self.mark(op).map(|_| ())
    }

    /// Asks for a full resync (maps known to be incomplete: writes bypassed the mountover).
    pub fn mark_full(&self) -> io::Result<u64> {
        let mut inner = self.lock();
        inner.state.gen += 1;
        let gen = inner.state.gen;
        inner.state.go_full(gen);
        self.append(&mut inner, &[Record::Full { gen }])?;
        inner.unsynced = true;
        self.sync_locked(&mut inner)?;
        Ok(gen)
    }

    fn append_mark(&self, inner: &mut Inner, op: &Op) -> io::Result<u64> {
        let mut recs = Vec::new();
        let gen = inner.state.mark(op, &mut recs);
        if !recs.is_empty() {
            self.append(inner, &recs)?;
            inner.unsynced = true;
        }
        Ok(gen)
    }

    fn sync_locked(&self, inner: &mut Inner) -> io::Result<()> {
        if inner.unsynced {
            inner.log.sync_data()?;
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            inner.unsynced = false;
        }
        Ok(())
    }

    /// Appends records (one write), compacting the log when it has grown too much.
    fn append(&self, inner: &mut Inner, recs: &[Record]) -> io::Result<()> {
        let mut buf = Vec::new();
        for r in recs {
            buf.extend_from_slice(&encode(r)?);
        }
        if let Err(e) = inner.log.write_all(&buf) {
            // Never leave half a record in the middle of the log.
            let _ = inner.log.set_len(inner.log_bytes);
            return Err(e);
        }
        inner.log_bytes += buf.len() as u64;
        let limit = inner.state.limits.log_compact_bytes_min.max(inner.compacted_bytes.saturating_mul(4));
        if inner.log_bytes > limit {
            let (log, bytes) = write_compacted(&self.dir, &mut inner.state)?;
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            inner.log = log;
            inner.log_bytes = bytes;
            inner.compacted_bytes = bytes;
            inner.unsynced = false;
        }
        Ok(())
    }

    /// Dirty zones, files marked whole, recorded namespace changes, and whether only a full
    /// resync is safe: what `status` shows, without copying the set.
    pub fn counts(&self) -> DirtyCounts {
        let inner = self.lock();
        let st = &inner.state;
        DirtyCounts {
            zones: st.zone_count as u64,
            files: st.files.len() as u64,
            namespace: st.namespace.len() as u64,
            full: st.full.is_some() || st.orphans.is_some(),
        }
    }

    /// The peer acknowledged durably everything up to generation `upto`: forget it, except
    /// what was marked again since. Lazy: appended without fsync; callers may batch acks.
    pub fn clear_upto(&self, upto: u64) -> io::Result<()> {
        let mut inner = self.lock();
        let mut recs = Vec::new();
        inner.state.clear_upto(upto, &mut recs);
        self.append(&mut inner, &recs)
    }

    /// The peer has these zones of `file` as they were at generation `upto` (a resync sent
    /// them from a snapshot taken then).
    pub fn clear(&self, file: &RelPath, zones: &[u64], upto: u64) -> io::Result<()> {
        let mut inner = self.lock();
        let mut recs = Vec::new();
        inner.state.clear_file(file, Some(zones), upto, &mut recs);
        self.append(&mut inner, &recs)
    }

    /// Like [`DirtyMaps::clear`] for the whole entry of `file` (zones or whole-file).
    pub fn clear_file(&self, file: &RelPath, upto: u64) -> io::Result<()> {
        let mut inner = self.lock();
        let mut recs = Vec::new();
        inner.state.clear_file(file, None, upto, &mut recs);
        self.append(&mut inner, &recs)
    }

    /// The namespace changes up to `upto` are replayed on the peer. Durable before it returns
    /// (unlike the other clears): replaying them a second time would not be harmless.
    pub fn clear_namespace(&self, upto: u64) -> io::Result<()> {
        let mut inner = self.lock();
        inner.state.clear_namespace(upto);
        self.append(&mut inner, &[Record::ClearNamespace { upto }])?;
        inner.log.sync_data()?;
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// What a resync must send now.
    pub fn snapshot(&self) -> DirtySet {
        self.lock().state.snapshot()
    }

    /// The last generation handed out.
    pub fn generation(&self) -> u64 {
        self.lock().state.gen
    }

    /// Nothing is dirty.
    pub fn is_clean(&self) -> bool {
        let inner = self.lock();
        let s = &inner.state;
        s.files.is_empty() && s.namespace.is_empty() && s.full.is_none() && s.orphans.is_none()
    }

    /// Number of fsyncs of the log since open (the open's own included): a test hook, and a
    /// figure for `status`.
    pub fn fsync_count(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// Current log size in bytes.
    pub fn log_bytes(&self) -> u64 {
        self.lock().log_bytes
    }
}

/// Writes the state as a fresh log (temp file, fsync, rename, fsync of the directory) and
/// returns it opened for appending.
fn write_compacted(dir: &Path, state: &mut State) -> io::Result<(File, u64)> {
    let path = dir.join(LOG_FILE);
    let mut buf = LOG_MAGIC.to_vec();
    for r in state.compacted() {
        buf.extend_from_slice(&encode(&r)?);
    }
    crate::paths::write_durably(&path, &buf)?;
    let log = OpenOptions::new().append(true).open(&path)?;
    Ok((log, buf.len() as u64))
}

impl super::sender::Tracker for DirtyMaps {
    fn track(&self, op: &Op) -> io::Result<()> {
        DirtyMaps::track(self, op)
    }
}
