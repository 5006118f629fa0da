//! The heartbeat datagram, authenticated with the cluster key.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "HAMR"
//!      4     1  version (1)
//!      5     1  sender node index (0 or 1)
//!      6     2  module id            (big-endian)
//!      8     8  epoch                (big-endian) sender daemon's start, ns since the Unix epoch
//!     16     8  seq                  (big-endian) per datagram, per sender daemon run
//!     24     2  payload length       (big-endian)
//!     26     n  payload: postcard of `PeerStatus`
//!   26+n    32  HMAC-SHA256 over bytes 0 .. 26+n, keyed with the cluster key
//! ```
//!
//! [`decode`] checks the tag before it looks at anything past the version byte, so an
//! unauthenticated payload is never deserialized.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::key::ClusterKey;
use crate::module::{PeerStatus, HISTORY_MAX};

type HmacSha256 = Hmac<Sha256>;

/// Largest heartbeat datagram: below a 1500-byte Ethernet MTU with room for IPv6 and UDP headers.
pub const DATAGRAM_BYTES_MAX: usize = 1400;
pub const MAGIC: [u8; 4] = *b"HAMR";
pub const VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_BYTES: usize = 26;
/// Bytes of the HMAC-SHA256 tag at the end.
pub const TAG_BYTES: usize = 32;
/// Shortest possible datagram: a header, an empty payload and the tag.
pub const DATAGRAM_BYTES_MIN: usize = HEADER_BYTES + TAG_BYTES;
/// Largest payload that fits in [`DATAGRAM_BYTES_MAX`].
pub const PAYLOAD_BYTES_MAX: usize = DATAGRAM_BYTES_MAX - DATAGRAM_BYTES_MIN;

/// The authenticated header fields of one heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeartbeatHeader {
    /// Sender's node index (0 or 1).
    pub node: u8,
    pub module_id: u16,
    /// Start time of the sender's daemon in nanoseconds since the Unix epoch (see [`epoch_now`]).
    pub epoch: u64,
    /// Per datagram; strictly increasing within one epoch.
    pub seq: u64,
}

/// Why a datagram is not an acceptable heartbeat: one sentence each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the datagram is too short to be a heartbeat ({0} bytes, at least {min} expected)", min = DATAGRAM_BYTES_MIN)]
    TooShort(usize),
    #[error("the datagram is too large to be a heartbeat ({0} bytes, at most {max} expected)", max = DATAGRAM_BYTES_MAX)]
    TooLarge(usize),
    #[error("the datagram is not a hamirror heartbeat (bad magic)")]
    BadMagic,
    #[error("the heartbeat has protocol version {0} but this node speaks version {v}: run the same hamirror version on both nodes", v = VERSION)]
    BadVersion(u8),
    #[error(
        "the heartbeat failed authentication: the nodes have different cluster keys, or the datagram was tampered with"
    )]
    BadMac,
    #[error("the authenticated heartbeat is malformed: {0}")]
    Malformed(&'static str),
    #[error("the heartbeat is a replay, or older than the newest one already accepted from this sender")]
    Replayed,
}

/// The epoch of a daemon starting now: nanoseconds since the Unix epoch.
///
/// The receiver rejects a lower epoch than the one it has seen, so if the clock of a node can
/// go backwards across a restart (no RTC, NTP stepping back), the daemon should use
/// `max(epoch_now(), last_persisted_epoch + 1)`.
pub fn epoch_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)).unwrap_or(0)
}

fn mac(key: &ClusterKey) -> HmacSha256 {
    // HMAC accepts a key of any length; 32 bytes can never be refused.
    <HmacSha256 as Mac>::new_from_slice(key.as_bytes()).expect("HMAC accepts 32-byte keys")
}

/// The datagram carrying `status`.
///
/// Panics if the status does not fit in [`DATAGRAM_BYTES_MAX`]: a status with at most
/// [`HISTORY_MAX`] generations always fits (tested), so that is a programming error.
pub fn encode(key: &ClusterKey, header: &HeartbeatHeader, status: &PeerStatus) -> Vec<u8> {
    assert!(header.node <= 1, "node index {} is not 0 or 1", header.node);
    assert!(status.history.len() <= HISTORY_MAX, "history longer than HISTORY_MAX");
    let payload = postcard::to_allocvec(status).expect("PeerStatus always serializes");
    assert!(
        payload.len() <= PAYLOAD_BYTES_MAX,
        "heartbeat payload of {} bytes exceeds {PAYLOAD_BYTES_MAX}",
        payload.len()
    );
    let mut frame = Vec::with_capacity(DATAGRAM_BYTES_MIN + payload.len());
    frame.extend_from_slice(&MAGIC);
    frame.push(VERSION);
    frame.push(header.node);
    frame.extend_from_slice(&header.module_id.to_be_bytes());
    frame.extend_from_slice(&header.epoch.to_be_bytes());
    frame.extend_from_slice(&header.seq.to_be_bytes());
    // Cannot truncate: checked against PAYLOAD_BYTES_MAX above.
    frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(&payload);
    let mut mac = mac(key);
    mac.update(&frame);
    frame.extend_from_slice(&mac.finalize().into_bytes());
    debug_assert!(frame.len() <= DATAGRAM_BYTES_MAX);
    frame
}

/// Authenticate and parse one datagram. Never panics, whatever the bytes.
pub fn decode(key: &ClusterKey, datagram: &[u8]) -> Result<(HeartbeatHeader, PeerStatus), WireError> {
    if datagram.len() < DATAGRAM_BYTES_MIN {
        return Err(WireError::TooShort(datagram.len()));
    }
    if datagram.len() > DATAGRAM_BYTES_MAX {
        return Err(WireError::TooLarge(datagram.len()));
    }
    if datagram[0..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    if datagram[4] != VERSION {
        return Err(WireError::BadVersion(datagram[4]));
    }
    let (signed, tag) = datagram.split_at(datagram.len() - TAG_BYTES);
    let mut mac = mac(key);
    mac.update(signed);
    // Constant-time comparison.
    mac.verify_slice(tag).map_err(|_| WireError::BadMac)?;

    let be_u64 = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&signed[at..at + 8]);
        u64::from_be_bytes(bytes)
    };
    let header = HeartbeatHeader {
        node: signed[5],
        module_id: u16::from_be_bytes([signed[6], signed[7]]),
        epoch: be_u64(8),
        seq: be_u64(16),
    };
    if header.node > 1 {
        return Err(WireError::Malformed("the node index is not 0 or 1"));
    }
    let payload_len = usize::from(u16::from_be_bytes([signed[24], signed[25]]));
    let payload = &signed[HEADER_BYTES..];
    if payload.len() != payload_len {
        return Err(WireError::Malformed("the payload length does not match the datagram"));
    }
    let (status, rest) = postcard::take_from_bytes::<PeerStatus>(payload)
        .map_err(|_| WireError::Malformed("the payload does not decode"))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed("trailing bytes after the payload"));
    }
    if status.history.len() > HISTORY_MAX {
        return Err(WireError::Malformed("the generation history is too long"));
    }
    Ok((header, status))
}

/// Remembers, per (sender node, module id), the highest (epoch, seq) accepted, and accepts
/// only strictly greater ones.
///
/// The epoch is the sender daemon's start time, so a restarted sender (higher epoch, seq back
/// to 0) is accepted and datagrams of its earlier runs are not.
///
/// Residual risk: the guard lives in memory. After the *receiver* restarts it knows nothing,
/// so datagrams of the sender's current epoch captured earlier could each be accepted once, in
/// increasing order, until the first fresh one from the sender raises the bar. An attacker
/// who captured them could so replay an old status for as long as the capture lasts (for
/// example to delay a failover while the peer is really dead); a persisted guard or a
/// challenge would close that window.
#[derive(Debug, Clone, Default)]
pub struct ReplayGuard {
    highest: HashMap<(u8, u16), (u64, u64)>,
}

impl ReplayGuard {
    pub fn new() -> ReplayGuard {
        ReplayGuard::default()
    }

    /// Accept `header` (and remember it) if its (epoch, seq) is strictly greater than every
    /// one accepted before from the same (node, module id); otherwise [`WireError::Replayed`].
    pub fn check(&mut self, header: &HeartbeatHeader) -> Result<(), WireError> {
        let now = (header.epoch, header.seq);
        match self.highest.get_mut(&(header.node, header.module_id)) {
            Some(highest) if *highest >= now => Err(WireError::Replayed),
            Some(highest) => {
                *highest = now;
                Ok(())
            }
            None => {
                self.highest.insert((header.node, header.module_id), now);
                Ok(())
            }
        }
    }
}
