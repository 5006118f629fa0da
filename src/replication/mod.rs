//! Replication of the module's directories (issue 3, being built): the FUSE mountover that
//! turns every change into an [`Op`], the sync protocol that ships ops to the peer, the
//! receiver that applies them, dirty-zone maps and resync.
//!
//! An [`Op`] is plain data: the mountover never talks to the network; it hands ops to an
//! [`OpSink`] and, at a sync point (fsync, O_SYNC/O_DIRECT write, flush on close), waits until
//! the sink says every op before it is durable where the mode requires.

pub mod aside;
pub mod channel;
pub mod dirty;
pub mod mountover;
pub mod qcow2;
pub mod receiver;
pub mod remote;
pub mod resync;
pub mod sender;
pub mod status;
pub mod verify;

use serde::{Deserialize, Serialize};
use std::io;

/// A path inside one replicated directory: the index of the `<replicated>` entry and a
/// relative path of normal components joined by `/` (`""` is the directory itself). Built
/// only through [`RelPath::new`], so it never holds `..`, `.`, an empty component, a NUL or a
/// leading `/`: the receiver can join it under its root without escaping.
/// Decoding goes through [`RelPath::new`] (via [`RelPathWire`]), so a peer cannot send one
/// that escapes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "RelPathWire")]
pub struct RelPath {
    dir: u16,
    path: String,
}

/// The encoded form of a [`RelPath`] (same fields, same order), before its checks.
#[derive(Deserialize)]
struct RelPathWire {
    dir: u16,
    path: String,
}

impl TryFrom<RelPathWire> for RelPath {
    type Error = String;
    fn try_from(wire: RelPathWire) -> Result<RelPath, String> {
        RelPath::new(wire.dir, &wire.path).ok_or_else(|| {
            format!(
                "invalid replicated path {:?} in directory {}: not a relative path of plain components \
                 (no `..`, `.`, empty component, NUL or leading `/`, at most {REL_PATH_BYTES_MAX} bytes)",
                wire.path, wire.dir
            )
        })
    }
}

/// Longest relative path accepted (Linux PATH_MAX).
pub const REL_PATH_BYTES_MAX: usize = 4096;

impl RelPath {
    /// Checks `path` (relative, `/`-separated) and builds the value; `None` when it could
    /// escape or is not a plain path.
    pub fn new(dir: u16, path: &str) -> Option<RelPath> {
        if path.len() > REL_PATH_BYTES_MAX || path.starts_with('/') || path.contains('\0') {
            return None;
        }
        if !path.is_empty() && path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return None;
        }
        Some(RelPath { dir, path: path.to_string() })
    }
    pub fn dir(&self) -> u16 {
        self.dir
    }
    pub fn path(&self) -> &str {
        &self.path
    }
    /// `name` inside this directory path.
    pub fn join(&self, name: &str) -> Option<RelPath> {
        if name.contains('/') {
            return None;
        }
        let joined = if self.path.is_empty() { name.to_string() } else { format!("{}/{name}", self.path) };
        RelPath::new(self.dir, &joined)
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

/// One change to a replicated directory, as the primary made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Write {
        file: RelPath,
        offset: u64,
        /// Encoded as a byte string (the same bytes on the wire as a sequence of `u8` in
        /// postcard, without encoding them one by one).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Truncate {
        file: RelPath,
        size: u64,
    },
    /// `fallocate(2)` with its mode bits (allocate, punch hole, zero range, keep size).
    Fallocate {
        file: RelPath,
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// A new regular file; `uid`/`gid` are the owner it was created with on the primary.
    Create {
        file: RelPath,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Mkdir {
        dir: RelPath,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// A FIFO, socket or device node (`mknod(2)`).
    Mknod {
        node: RelPath,
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    },
    Symlink {
        link: RelPath,
        target: String,
        uid: u32,
        gid: u32,
    },
    Link {
        existing: RelPath,
        new: RelPath,
    },
    Unlink {
        file: RelPath,
    },
    Rmdir {
        dir: RelPath,
    },
    /// `renameat2(2)` with its flags (RENAME_NOREPLACE, RENAME_EXCHANGE).
    Rename {
        from: RelPath,
        to: RelPath,
        flags: u32,
    },
    SetAttr {
        path: RelPath,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<Timestamp>,
        mtime: Option<Timestamp>,
    },
    SetXattr {
        path: RelPath,
        name: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        path: RelPath,
        name: String,
    },
    /// Make everything before it durable on the peer (fsync of `file`, or of all with `None`).
    Fsync {
        file: Option<RelPath>,
        datasync: bool,
    },
}

impl Op {
    /// Every path the op names (none for an `Fsync` of everything).
    pub fn paths(&self) -> Vec<&RelPath> {
        match self {
            Op::Write { file, .. }
            | Op::Truncate { file, .. }
            | Op::Fallocate { file, .. }
            | Op::Create { file, .. }
            | Op::Unlink { file } => vec![file],
            Op::Mkdir { dir, .. } | Op::Rmdir { dir } => vec![dir],
            Op::Mknod { node, .. } => vec![node],
            Op::Symlink { link, .. } => vec![link],
            Op::Link { existing, new } => vec![existing, new],
            Op::Rename { from, to, .. } => vec![from, to],
            Op::SetAttr { path, .. } | Op::SetXattr { path, .. } | Op::RemoveXattr { path, .. } => vec![path],
            Op::Fsync { file, .. } => file.iter().collect(),
        }
    }
}

/// `pread` until `buf` is full or end of file; returns the bytes read.
pub(crate) fn read_full_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Where the mountover hands its ops, in the order the operations happened.
pub trait OpSink: Send + Sync {
    /// Queues `op` (after the local change succeeded) and returns its sequence number.
    fn submit(&self, op: Op) -> u64;
    /// Returns once every op up to `seq` is durable as the sync mode requires (`sync`: on
    /// the peer's disk; `async`: locally, within the lag bound), or the peer was declared
    /// absent and the ops were recorded in the dirty-zone maps. An error only when even the
    /// local record failed: the application sees EIO.
    fn wait_durable(&self, seq: u64) -> io::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Wire<'a> {
        dir: u16,
        path: &'a str,
    }

    #[test]
    fn decoded_rel_path_is_checked() {
        let good = postcard::to_allocvec(&Wire { dir: 2, path: "a/b" }).unwrap();
        assert_eq!(postcard::from_bytes::<RelPath>(&good).unwrap(), RelPath::new(2, "a/b").unwrap());
        let same = postcard::to_allocvec(&RelPath::new(2, "a/b").unwrap()).unwrap();
        assert_eq!(same, good);
        for bad in ["../x", "a/../b", "/etc", "a//b", ".", "a\0b"] {
            let bytes = postcard::to_allocvec(&Wire { dir: 0, path: bad }).unwrap();
            assert!(postcard::from_bytes::<RelPath>(&bytes).is_err(), "{bad:?} decoded");
        }
        // Inside an op too: a valid Create whose path bytes are turned into "../x".
        let op = Op::Create { file: RelPath::new(0, "zz/x").unwrap(), mode: 0o644, uid: 1, gid: 1 };
        let mut bytes = postcard::to_allocvec(&op).unwrap();
        let at = bytes.windows(4).position(|w| w == b"zz/x").unwrap();
        bytes[at..at + 2].copy_from_slice(b"..");
        let err = postcard::from_bytes::<Op>(&bytes).unwrap_err();
        assert!(postcard::from_bytes::<Op>(&postcard::to_allocvec(&op).unwrap()).is_ok(), "{err}");
    }
}
