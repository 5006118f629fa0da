//! Which clusters of a qcow2 image file a full resync must send.
//!
//! The rule: a cluster of the image *file* is needed when its refcount is not zero, and
//! cluster 0 (the header) always is. In a consistent image every cluster qemu may read
//! carries a refcount: the header, the L1 and L2 tables of the active layer and of every
//! snapshot, the refcount table and blocks, the snapshot table, bitmaps, the encryption
//! header, and every data cluster (compressed ones included, counted on the host clusters
//! they sit in). A free cluster (refcount 0) is never read, so the resync leaves it a hole on
//! the target. The resync then also skips the needed clusters that hold no data in the file
//! (SEEK_DATA), like any sparse file.
//!
//! The refcount is used rather than a walk of the L1/L2 tables because it covers every kind
//! of metadata by construction: a walk would have to know every structure qemu may add.
//!
//! Anything doubtful makes [`Qcow2Map::open`] refuse the image, and the caller treats the
//! file as raw (every byte with data is compared): a bad magic or version, a cluster size or
//! refcount width out of the specification, the `dirty` bit (lazy refcounts not yet repaired:
//! refcounts may be too low), the `corrupt` bit, a refcount table or block outside the file
//! or misaligned. A refcount block that cannot be read whole, and clusters beyond what the
//! refcount table covers, count as needed. Parsing never panics.
//!
//! Reference: qemu `docs/interop/qcow2.txt`.

use std::fs::File;
use std::io;

use super::read_full_at;

/// The first four bytes of a qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Largest refcount table loaded (64 MiB covers petabytes of image at 64 KiB clusters).
pub const REFCOUNT_TABLE_BYTES_MAX: u64 = 64 << 20;

/// Smallest and largest `cluster_bits` the specification allows (512 B to 2 MiB).
const CLUSTER_BITS_MIN: u32 = 9;
const CLUSTER_BITS_MAX: u32 = 21;
/// Bits 9-63 of a refcount table entry hold the refcount block offset.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Incompatible feature bits that make refcounts untrustworthy.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;

/// Why an image is not parsed as qcow2 (the caller then treats it as raw).
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("reading the image: {0}")]
    Io(#[from] io::Error),
    #[error("not a qcow2 image (no QFI\\xfb magic)")]
    NotQcow2,
    #[error("header: {0}")]
    BadHeader(String),
    #[error("its refcounts cannot be trusted: {0}")]
    Untrusted(&'static str),
}

/// The refcount structures of one qcow2 image file, enough to tell needed clusters.
#[derive(Debug, Clone)]
pub struct Qcow2Map {
    cluster_bits: u32,
    refcount_order: u32,
    /// Refcount table: entry `i` is the offset of the refcount block for clusters
    /// `i * entries_per_block ..`, or 0.
    table: Vec<u64>,
}

/// True when the file starts with the qcow2 magic.
pub fn is_qcow2(file: &File) -> io::Result<bool> {
    let mut magic = [0u8; 4];
    match read_full_at(file, &mut magic, 0)? {
        4 => Ok(magic == QCOW2_MAGIC),
        _ => Ok(false),
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

impl Qcow2Map {
    /// Reads and checks the header and the refcount table.
    pub fn open(file: &File) -> Result<Qcow2Map, Qcow2Error> {
        let file_bytes = file.metadata()?.len();
        let mut h = [0u8; 104];
        let got = read_full_at(file, &mut h, 0)?;
        if got < 72 || h[0..4] != QCOW2_MAGIC {
            return Err(Qcow2Error::NotQcow2);
        }
        let bad = |s: String| Err(Qcow2Error::BadHeader(s));
        let version = be32(&h, 4);
        let cluster_bits = be32(&h, 20);
        let refcount_table_offset = be64(&h, 48);
        let refcount_table_clusters = be32(&h, 56);
        let (incompat, refcount_order) = match version {
            2 => (0, 4),
            3 => {
                if got < 104 {
                    return bad("version 3 header shorter than 104 bytes".into());
                }
                (be64(&h, 72), be32(&h, 96))
            }
            v => return bad(format!("version {v} (expected 2 or 3)")),
        };
        if !(CLUSTER_BITS_MIN..=CLUSTER_BITS_MAX).contains(&cluster_bits) {
            return bad(format!("cluster_bits {cluster_bits} (expected {CLUSTER_BITS_MIN} to {CLUSTER_BITS_MAX})"));
        }
        if refcount_order > 6 {
            return bad(format!("refcount_order {refcount_order} (expected 0 to 6)"));
        }
        if incompat & INCOMPAT_DIRTY != 0 {
            return Err(Qcow2Error::Untrusted("the dirty bit is set (lazy refcounts not repaired)"));
        }
        if incompat & INCOMPAT_CORRUPT != 0 {
            return Err(Qcow2Error::Untrusted("the corrupt bit is set"));
        }
        let cluster_bytes = 1u64 << cluster_bits;
        let table_bytes = u64::from(refcount_table_clusters) * cluster_bytes;
        if refcount_table_offset % cluster_bytes != 0 || refcount_table_offset == 0 {
            return bad(format!("refcount table offset {refcount_table_offset} not cluster aligned"));
        }
        if table_bytes == 0 || table_bytes > REFCOUNT_TABLE_BYTES_MAX {
            return bad(format!("refcount table of {table_bytes} bytes"));
        }
        if refcount_table_offset.checked_add(table_bytes).is_none_or(|end| end > file_bytes) {
            return bad("refcount table beyond the end of the file".into());
        }
        let table_len = usize::try_from(table_bytes).map_err(|_| Qcow2Error::BadHeader("table size".into()))?;
        let mut raw = vec![0u8; table_len];
        if read_full_at(file, &mut raw, refcount_table_offset)? != table_len {
            return bad("short refcount table".into());
        }
        let mut table = Vec::with_capacity(table_len / 8);
        for chunk in raw.chunks_exact(8) {
            let entry = be64(chunk, 0);
            let off = entry & REFT_OFFSET_MASK;
            if off != 0 && (off % cluster_bytes != 0 || off.checked_add(cluster_bytes).is_none_or(|e| e > file_bytes)) {
                return Err(Qcow2Error::Untrusted("a refcount block is misaligned or beyond the end of the file"));
            }
            table.push(off);
        }
        // Trailing empty entries cover nothing: keep the table short.
        while table.last() == Some(&0) {
            table.pop();
        }
        Ok(Qcow2Map { cluster_bits, refcount_order, table })
    }

    /// Cluster size of the image, in bytes.
    pub fn cluster_bytes(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn entries_per_block(&self) -> u64 {
        (self.cluster_bytes() * 8) >> self.refcount_order
    }

    /// Refcount of entry `index` in a refcount block (qemu's bit order for widths < 8).
    fn refcount_in(&self, block: &[u8], index: u64) -> u64 {
        let order = self.refcount_order;
        let bits = 1u64 << order;
        if bits < 8 {
            let per_byte = 8 / bits;
            let Some(&byte) = block.get((index / per_byte) as usize) else { return 1 };
            let shift = (index % per_byte) * bits;
            u64::from(byte >> shift) & ((1 << bits) - 1)
        } else {
            let width = (bits / 8) as usize;
            let at = index as usize * width;
            let Some(s) = block.get(at..at + width) else { return 1 };
            s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        }
    }

    /// The byte ranges in `[start, end)` (sorted, merged, clipped) covered by clusters that
    /// the image needs.
    pub fn needed_ranges(&self, file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        if start >= end {
            return Ok(out);
        }
        let cb = self.cluster_bytes();
        let per_block = self.entries_per_block();
        let first = start >> self.cluster_bits;
        let last = (end - 1) >> self.cluster_bits;
        let mut loaded: Option<(u64, Option<Vec<u8>>)> = None;
        let mut cluster = first;
        while cluster <= last {
            let t = cluster / per_block;
            let needed = if cluster == 0 {
                true
            } else {
                match self.table.get(t as usize) {
                    // Beyond the table's coverage: refcount 0 by the specification, needed
                    // here (a healthy image never reaches this).
                    None => true,
                    Some(0) => false,
                    Some(&off) => {
                        if loaded.as_ref().map(|(lt, _)| *lt) != Some(t) {
                            let mut block = vec![0u8; cb as usize];
                            let whole = read_full_at(file, &mut block, off)? == block.len();
                            loaded = Some((t, whole.then_some(block)));
                        }
                        match loaded.as_ref().and_then(|(_, b)| b.as_ref()) {
                            Some(block) => self.refcount_in(block, cluster % per_block) != 0,
                            None => true,
                        }
                    }
                }
            };
            if needed {
                let s = (cluster << self.cluster_bits).max(start);
                let e = ((cluster + 1) << self.cluster_bits).min(end);
                match out.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => out.push((s, e)),
                }
            }
            cluster += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Sub-byte refcount widths follow qemu's bit order (low bits first).
    #[test]
    fn refcount_widths_read_like_qemu() {
        let mut m = Qcow2Map { cluster_bits: 9, refcount_order: 0, table: vec![] };
        assert_eq!(m.refcount_in(&[0b0000_0010], 0), 0);
        assert_eq!(m.refcount_in(&[0b0000_0010], 1), 1);
        m.refcount_order = 2;
        assert_eq!(m.refcount_in(&[0x3a], 0), 0xa);
        assert_eq!(m.refcount_in(&[0x3a], 1), 0x3);
        m.refcount_order = 4;
        assert_eq!(m.refcount_in(&[0, 0, 1, 2], 1), 0x102);
        m.refcount_order = 6;
        assert_eq!(m.refcount_in(&[0, 0, 0, 0, 0, 0, 0, 7], 0), 7);
        assert_eq!(m.refcount_in(&[0, 0, 0, 0, 0, 0, 0, 7], 5), 1);
    }
}
