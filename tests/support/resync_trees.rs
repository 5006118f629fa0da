//! Trees and helpers shared by the resync tests (local and over the network).

use hamirror::replication::resync::{DirPeer, Kind, LocalTree, Outcome, ResyncStats};
use hamirror::replication::RelPath;
use rand::{RngCore, SeedableRng};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

pub fn rel(s: &str) -> RelPath {
    RelPath::new(0, s).unwrap()
}

pub fn random(len: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// A source and a target directory, and the module's map directory.
pub struct Pair {
    _tmp: tempfile::TempDir,
    pub src: PathBuf,
    pub dst: PathBuf,
    pub state: PathBuf,
}

impl Pair {
    pub fn new() -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst, state) = (tmp.path().join("src"), tmp.path().join("dst"), tmp.path().join("state"));
        for d in [&src, &dst, &state] {
            std::fs::create_dir(d).unwrap();
        }
        Pair { _tmp: tmp, src, dst, state }
    }
    pub fn source(&self) -> LocalTree {
        LocalTree::open(&[&self.src]).unwrap()
    }
    pub fn peer(&self) -> DirPeer {
        DirPeer::open(&[&self.dst]).unwrap()
    }
}

pub fn done(o: Outcome) -> ResyncStats {
    match o {
        Outcome::Done(s) => s,
        Outcome::Stopped(s) => panic!("stopped: {s:?}"),
    }
}

pub fn same_content(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

pub fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Both trees hold the same entries: types, content, modes, owners, xattrs, symlink targets,
/// mtimes of files and symlinks.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (LocalTree::open(&[a]).unwrap(), LocalTree::open(&[b]).unwrap());
    compare_dir(&ta, &tb, a, b, &rel(""), true);
}

/// Like [`assert_same_tree`] but without comparing the modification times of regular files:
/// live replication ships data, not the time each write landed (docs/guarantees.md).
pub fn assert_same_data(a: &Path, b: &Path) {
    let (ta, tb) = (LocalTree::open(&[a]).unwrap(), LocalTree::open(&[b]).unwrap());
    compare_dir(&ta, &tb, a, b, &rel(""), false);
}

pub fn compare_dir(ta: &LocalTree, tb: &LocalTree, a: &Path, b: &Path, dir: &RelPath, file_mtimes: bool) {
    let la = ta.list(dir).unwrap();
    let lb = tb.list(dir).unwrap();
    let na: Vec<&String> = la.iter().map(|(n, _)| n).collect();
    let nb: Vec<&String> = lb.iter().map(|(n, _)| n).collect();
    assert_eq!(na, nb, "entries of /{}", dir.path());
    for ((name, ea), (_, eb)) in la.iter().zip(lb.iter()) {
        let p = dir.join(name).unwrap();
        let what = p.path();
        assert_eq!(ea.kind, eb.kind, "{what}: kind");
        assert_eq!(ea.mode, eb.mode, "{what}: mode");
        assert_eq!((ea.uid, ea.gid), (eb.uid, eb.gid), "{what}: owner");
        assert_eq!(ea.xattrs, eb.xattrs, "{what}: xattrs");
        match ea.kind {
            Kind::File => {
                assert_eq!(ea.size, eb.size, "{what}: size");
                if file_mtimes {
                    assert_eq!(ea.mtime, eb.mtime, "{what}: mtime");
                }
                assert!(same_content(&a.join(what), &b.join(what)), "{what}: content differs");
            }
            Kind::Symlink(_) => assert_eq!(ea.mtime, eb.mtime, "{what}: mtime"),
            Kind::Dir => compare_dir(ta, tb, a, b, &p, file_mtimes),
            Kind::Special { .. } => {}
        }
    }
}
