//! The cluster key, the authenticated heartbeat wire format and its UDP transport.
//!
//! - [`key`]: `cluster.key`, created by `hamirror cluster genkey`, mode 0600.
//! - [`wire`]: the heartbeat datagram (HMAC-SHA256 with the cluster key) and the replay guard.
//! - [`transport`]: one module's heartbeat sockets, one per lan; only authenticated, fresh
//!   heartbeats from the peer come out, everything else is dropped and counted.

pub mod key;
pub mod transport;
pub mod wire;

pub use key::{genkey, load_key, ClusterKey, KeyError};
pub use transport::{HeartbeatLan, Heartbeats, RejectCounters, RejectCounts};
pub use wire::{decode, encode, epoch_now, HeartbeatHeader, ReplayGuard, WireError, DATAGRAM_BYTES_MAX};
