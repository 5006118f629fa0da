//! The UDP heartbeat transport of one module: one socket per heartbeat lan, every datagram
//! authenticated, checked against the peer's address, node index and module id, and
//! replay-checked before it reaches the module.
//!
//! [`Heartbeats::recv`] polls every socket itself (no task in between: one wake-up per
//! datagram), does the stateless checks (size, tag, sender), then the replay check. A datagram
//! is taken from a socket only when it is handled at once, so `recv` is cancel-safe and can
//! sit in a `tokio::select!` beside timers.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use super::key::ClusterKey;
use super::wire::{self, HeartbeatHeader, ReplayGuard, WireError, DATAGRAM_BYTES_MAX};
use crate::module::PeerStatus;

/// At most one warning per reject reason in this interval (the first one is always logged).
const REJECT_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// How many sequence numbers below the newest accepted one are remembered across lans.
const SEEN_WINDOW_DATAGRAMS: u64 = 64;

/// One heartbeat lan of a module: this node's address and the peer's, both with the module's
/// heartbeat port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatLan {
    pub name: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// Datagrams dropped, per reason, and send/receive errors. Never reset.
#[derive(Debug, Default)]
pub struct RejectCounters {
    pub too_short: AtomicU64,
    pub too_large: AtomicU64,
    pub bad_magic: AtomicU64,
    pub bad_version: AtomicU64,
    /// Wrong cluster key or tampered datagram.
    pub bad_mac: AtomicU64,
    /// Authenticated but undecodable.
    pub malformed: AtomicU64,
    /// Authenticated, but not from the peer's address on that lan or not the peer's node index.
    pub wrong_sender: AtomicU64,
    /// Authenticated, but for another module id.
    pub wrong_module: AtomicU64,
    pub replayed: AtomicU64,
    /// Datagrams that could not be sent (a lan may be down).
    pub send_errors: AtomicU64,
    pub recv_errors: AtomicU64,
}

/// A copy of [`RejectCounters`] at one moment, for `status --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RejectCounts {
    pub too_short: u64,
    pub too_large: u64,
    pub bad_magic: u64,
    pub bad_version: u64,
    pub bad_mac: u64,
    pub malformed: u64,
    pub wrong_sender: u64,
    pub wrong_module: u64,
    pub replayed: u64,
    pub send_errors: u64,
    pub recv_errors: u64,
}

impl RejectCounters {
    /// The counters now.
    pub fn counts(&self) -> RejectCounts {
        let get = |c: &AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        RejectCounts {
            too_short: get(&self.too_short),
            too_large: get(&self.too_large),
            bad_magic: get(&self.bad_magic),
            bad_version: get(&self.bad_version),
            bad_mac: get(&self.bad_mac),
            malformed: get(&self.malformed),
            wrong_sender: get(&self.wrong_sender),
            wrong_module: get(&self.wrong_module),
            replayed: get(&self.replayed),
            send_errors: get(&self.send_errors),
            recv_errors: get(&self.recv_errors),
        }
    }

    /// Datagrams received and dropped, all reasons together.
    pub fn rejected(&self) -> u64 {
        [
            &self.too_short,
            &self.too_large,
            &self.bad_magic,
            &self.bad_version,
            &self.bad_mac,
            &self.malformed,
            &self.wrong_sender,
            &self.wrong_module,
            &self.replayed,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    fn counter(&self, reason: Reason) -> &AtomicU64 {
        match reason {
            Reason::TooShort => &self.too_short,
            Reason::TooLarge => &self.too_large,
            Reason::BadMagic => &self.bad_magic,
            Reason::BadVersion => &self.bad_version,
            Reason::BadMac => &self.bad_mac,
            Reason::Malformed => &self.malformed,
            Reason::WrongSender => &self.wrong_sender,
            Reason::WrongModule => &self.wrong_module,
            Reason::Replayed => &self.replayed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    TooShort,
    TooLarge,
    BadMagic,
    BadVersion,
    BadMac,
    Malformed,
    WrongSender,
    WrongModule,
    Replayed,
}

impl Reason {
    const COUNT: usize = 9;

    fn of(error: &WireError) -> Reason {
        match error {
            WireError::TooShort(_) => Reason::TooShort,
            WireError::TooLarge(_) => Reason::TooLarge,
            WireError::BadMagic => Reason::BadMagic,
            WireError::BadVersion(_) => Reason::BadVersion,
            WireError::BadMac => Reason::BadMac,
            WireError::Malformed(_) => Reason::Malformed,
            WireError::Replayed => Reason::Replayed,
        }
    }
}

/// What the lans of one module share: the counters and the warning rate limiter.
struct Shared {
    counters: Arc<RejectCounters>,
    module_id: u16,
    last_warned: Mutex<[Option<Instant>; Reason::COUNT]>,
}

impl Shared {
    fn reject(&self, reason: Reason, lan: &str, from: SocketAddr, why: &dyn fmt::Display) {
        let count = self.counters.counter(reason).fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let warn_now = {
            // A poisoned lock only means another thread panicked while logging: keep going.
            let mut last = self.last_warned.lock().unwrap_or_else(|e| e.into_inner());
            let slot = &mut last[reason as usize];
            let due = !matches!(*slot, Some(at) if now.duration_since(at) < REJECT_WARN_INTERVAL);
            if due {
                *slot = Some(now);
            }
            due
        };
        if warn_now {
            warn!(
                module_id = self.module_id,
                lan,
                %from,
                "dropped a heartbeat datagram: {why} ({count} dropped for this reason so far)"
            );
        }
    }
}

/// An authenticated heartbeat from the right sender, not yet replay-checked.
struct Authenticated {
    lan: usize,
    from: SocketAddr,
    header: HeartbeatHeader,
    status: PeerStatus,
}

/// The replay check across lans.
///
/// Each lan has its own [`ReplayGuard`], because the sender numbers datagrams across all its
/// lans and a faster lan would otherwise make every datagram of a slower one look old. On top,
/// a window of the last [`SEEN_WINDOW_DATAGRAMS`] sequence numbers accepted on any lan stops
/// a datagram captured on one lan from being replayed on another.
#[derive(Debug)]
struct Freshness {
    guards: Vec<ReplayGuard>,
    /// The newest (epoch, seq) accepted on any lan.
    newest: Option<(u64, u64)>,
    /// Bit `i` set: `newest.seq - i` was accepted (same epoch).
    seen_bits: u64,
}

impl Freshness {
    fn new(lans: usize) -> Freshness {
        Freshness { guards: vec![ReplayGuard::new(); lans], newest: None, seen_bits: 0 }
    }

    fn admit(&mut self, lan: usize, header: &HeartbeatHeader) -> Result<(), WireError> {
        if let Some((epoch, seq)) = self.newest {
            let fresh = match header.epoch.cmp(&epoch) {
                std::cmp::Ordering::Greater => true,
                std::cmp::Ordering::Less => false,
                std::cmp::Ordering::Equal => {
                    header.seq > seq || {
                        let back = seq - header.seq;
                        back < SEEN_WINDOW_DATAGRAMS && self.seen_bits & (1 << back) == 0
                    }
                }
            };
            if !fresh {
                return Err(WireError::Replayed);
            }
        }
        let guard = self.guards.get_mut(lan).ok_or(WireError::Replayed)?;
        guard.check(header)?;
        match self.newest {
            Some((epoch, seq)) if epoch == header.epoch && header.seq <= seq => {
                self.seen_bits |= 1 << (seq - header.seq);
            }
            Some((epoch, seq)) if epoch == header.epoch => {
                let shift = header.seq - seq;
                self.seen_bits = if shift >= SEEN_WINDOW_DATAGRAMS { 0 } else { self.seen_bits << shift };
                self.seen_bits |= 1;
                self.newest = Some((epoch, header.seq));
            }
            _ => {
                self.newest = Some((header.epoch, header.seq));
                self.seen_bits = 1;
            }
        }
        Ok(())
    }
}

/// The heartbeat sockets of one module.
pub struct Heartbeats {
    key: ClusterKey,
    node_index: u8,
    module_id: u16,
    epoch: u64,
    lans: Vec<HeartbeatLan>,
    sockets: Vec<Arc<UdpSocket>>,
    /// Next datagram's sequence number, shared by all lans.
    seq: AtomicU64,
    inbound: Vec<Inbound>,
    /// One byte more than the largest heartbeat, so that a larger datagram shows as such.
    buf: Vec<u8>,
    /// The socket polled first next time, so that a busy lan cannot starve the others.
    next_socket: usize,
    shared: Arc<Shared>,
    freshness: Freshness,
    /// The newest status accepted on any lan, with its (epoch, seq).
    newest: Option<((u64, u64), PeerStatus)>,
}

impl fmt::Debug for Heartbeats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Heartbeats")
            .field("node_index", &self.node_index)
            .field("module_id", &self.module_id)
            .field("epoch", &self.epoch)
            .field("lans", &self.lans)
            .finish_non_exhaustive()
    }
}

impl Heartbeats {
    /// Bind one socket per lan on its `local` address (SO_REUSEADDR). Must be called inside a
    /// Tokio runtime. `epoch` is this daemon's start
    /// ([`wire::epoch_now`]).
    pub fn bind(
        key: ClusterKey,
        node_index: u8,
        module_id: u16,
        lans: Vec<HeartbeatLan>,
        epoch: u64,
    ) -> io::Result<Heartbeats> {
        if node_index > 1 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("node index {node_index} is not 0 or 1")));
        }
        if lans.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("module id {module_id} has no heartbeat lan"),
            ));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other("the heartbeat transport must be created inside a Tokio runtime"));
        }
        let sockets = lans.iter().map(|lan| bind_socket(lan).map(Arc::new)).collect::<io::Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            counters: Arc::new(RejectCounters::default()),
            module_id,
            last_warned: Mutex::new([None; Reason::COUNT]),
        });
        let inbound = lans
            .iter()
            .enumerate()
            .map(|(index, lan)| Inbound {
                index,
                lan: lan.clone(),
                key: key.clone(),
                peer_node: 1 - node_index,
                module_id,
            })
            .collect();
        let freshness = Freshness::new(lans.len());
        Ok(Heartbeats {
            key,
            node_index,
            module_id,
            epoch,
            lans,
            sockets,
            seq: AtomicU64::new(0),
            inbound,
            buf: vec![0u8; DATAGRAM_BYTES_MAX + 1],
            next_socket: 0,
            shared,
            freshness,
            newest: None,
        })
    }

    /// Send `status` once on every lan. A failed send is counted and logged at debug level,
    /// never fatal: a lan can be down.
    pub async fn send(&self, status: &PeerStatus) {
        for (lan, socket) in self.lans.iter().zip(&self.sockets) {
            let header = HeartbeatHeader {
                node: self.node_index,
                module_id: self.module_id,
                epoch: self.epoch,
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
            };
            let datagram = wire::encode(&self.key, &header, status);
            if let Err(e) = socket.send_to(&datagram, lan.peer).await {
                self.shared.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                debug!(module_id = self.module_id, lan = %lan.name, peer = %lan.peer, "cannot send a heartbeat: {e}");
            }
        }
    }

    /// The next authenticated, fresh heartbeat from the peer, with the index of the lan it
    /// came on. Everything else is dropped and counted. Cancel-safe.
    pub async fn recv(&mut self) -> (usize, PeerStatus) {
        loop {
            let (lan, len, from) = std::future::poll_fn(|cx| self.poll_sockets(cx)).await;
            let Some(got) = self.inbound[lan].accept(&self.buf[..len], from, &self.shared) else {
                continue;
            };
            match self.freshness.admit(got.lan, &got.header) {
                Ok(()) => {
                    // A slower lan may deliver a datagram older than one already seen on
                    // another lan: it still proves that lan alive, but the status handed on
                    // is always the newest, so a decision never rests on an outdated one.
                    let order = (got.header.epoch, got.header.seq);
                    match &self.newest {
                        Some((seen, status)) if *seen > order => return (got.lan, status.clone()),
                        _ => {
                            self.newest = Some((order, got.status.clone()));
                            return (got.lan, got.status);
                        }
                    }
                }
                Err(e) => {
                    let lan = &self.lans[got.lan].name;
                    let why = format_args!("{e} (epoch {} seq {})", got.header.epoch, got.header.seq);
                    self.shared.reject(Reason::Replayed, lan, got.from, &why);
                }
            }
        }
    }

    /// The first socket with a datagram waiting: (lan index, length in `buf`, sender).
    fn poll_sockets(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<(usize, usize, SocketAddr)> {
        let count = self.sockets.len();
        for k in 0..count {
            let i = (self.next_socket + k) % count;
            let mut read = ReadBuf::new(&mut self.buf);
            match self.sockets[i].poll_recv_from(cx, &mut read) {
                std::task::Poll::Ready(Ok(from)) => {
                    self.next_socket = (i + 1) % count;
                    return std::task::Poll::Ready((i, read.filled().len(), from));
                }
                std::task::Poll::Ready(Err(e)) => {
                    // An ICMP error reported on the socket, for instance: count it and go on.
                    self.shared.counters.recv_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(module_id = self.module_id, lan = %self.lans[i].name, "cannot receive a heartbeat: {e}");
                    // Poll again soon: the error did not register this task for the socket.
                    cx.waker().wake_by_ref();
                }
                std::task::Poll::Pending => {}
            }
        }
        std::task::Poll::Pending
    }

    pub fn counters(&self) -> Arc<RejectCounters> {
        Arc::clone(&self.shared.counters)
    }

    /// The bound address of each lan's socket, in lan order.
    pub fn local_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.sockets.iter().map(|s| s.local_addr()).collect()
    }
}

fn bind_socket(lan: &HeartbeatLan) -> io::Result<UdpSocket> {
    let named = |e: io::Error| {
        io::Error::new(e.kind(), format!("cannot bind the heartbeat socket of lan {} to {}: {e}", lan.name, lan.local))
    };
    let socket = Socket::new(Domain::for_address(lan.local), Type::DGRAM, Some(Protocol::UDP)).map_err(named)?;
    socket.set_reuse_address(true).map_err(named)?;
    socket.set_nonblocking(true).map_err(named)?;
    socket.bind(&lan.local.into()).map_err(named)?;
    UdpSocket::from_std(socket.into()).map_err(named)
}

/// The task reading one lan's socket.
/// What one lan's socket accepts: checks a datagram and says why it is dropped.
struct Inbound {
    index: usize,
    lan: HeartbeatLan,
    key: ClusterKey,
    peer_node: u8,
    module_id: u16,
}

impl Inbound {
    /// The authenticated heartbeat in `datagram`, or `None` (dropped and counted).
    fn accept(&self, datagram: &[u8], from: SocketAddr, shared: &Shared) -> Option<Authenticated> {
        // The tag is checked before the sender, so a peer with another key is reported as such.
        let (header, status) = match wire::decode(&self.key, datagram) {
            Ok(decoded) => decoded,
            Err(e) => {
                shared.reject(Reason::of(&e), &self.lan.name, from, &e);
                return None;
            }
        };
        if from != self.lan.peer || header.node != self.peer_node {
            let why = format_args!(
                "it comes from {from} with node index {}, but the peer on this lan is {} with node index {}",
                header.node, self.lan.peer, self.peer_node
            );
            shared.reject(Reason::WrongSender, &self.lan.name, from, &why);
            return None;
        }
        if header.module_id != self.module_id {
            let why = format_args!(
                "it is for module id {}, but this port belongs to module id {}",
                header.module_id, self.module_id
            );
            shared.reject(Reason::WrongModule, &self.lan.name, from, &why);
            return None;
        }
        Some(Authenticated { lan: self.index, from, header, status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(epoch: u64, seq: u64) -> HeartbeatHeader {
        HeartbeatHeader { node: 1, module_id: 7, epoch, seq }
    }

    // A datagram that overtakes an older one sent on another lan does not make that one look replayed.
    #[test]
    fn reordering_across_lans_is_accepted() {
        let mut f = Freshness::new(2);
        assert_eq!(f.admit(1, &header(5, 11)), Ok(()));
        assert_eq!(f.admit(0, &header(5, 10)), Ok(()));
        assert_eq!(f.admit(0, &header(5, 12)), Ok(()));
        assert_eq!(f.admit(1, &header(5, 13)), Ok(()));
    }

    // A datagram accepted on one lan and replayed on another is rejected.
    #[test]
    fn cross_lan_replay_is_rejected() {
        let mut f = Freshness::new(2);
        assert_eq!(f.admit(0, &header(5, 10)), Ok(()));
        assert_eq!(f.admit(1, &header(5, 10)), Err(WireError::Replayed));
        assert_eq!(f.admit(0, &header(5, 10)), Err(WireError::Replayed));
        // Lan 1 was silent; a datagram older than the window is refused there too.
        for seq in 11..100 {
            assert_eq!(f.admit(0, &header(5, seq)), Ok(()));
        }
        assert_eq!(f.admit(1, &header(5, 20)), Err(WireError::Replayed));
        assert_eq!(f.admit(1, &header(5, 98)), Err(WireError::Replayed));
        assert_eq!(f.admit(1, &header(4, 1000)), Err(WireError::Replayed));
    }

    // A restarted peer (higher epoch, seq from 0) is accepted on every lan.
    #[test]
    fn new_epoch_is_accepted_on_every_lan() {
        let mut f = Freshness::new(2);
        assert_eq!(f.admit(0, &header(5, 1000)), Ok(()));
        assert_eq!(f.admit(1, &header(5, 1001)), Ok(()));
        assert_eq!(f.admit(1, &header(6, 1)), Ok(()));
        assert_eq!(f.admit(0, &header(6, 0)), Ok(()));
        assert_eq!(f.admit(0, &header(5, 2000)), Err(WireError::Replayed));
        assert_eq!(f.admit(2, &header(7, 0)), Err(WireError::Replayed), "unknown lan");
    }
}
