//! The UDP heartbeat transport of one module: one socket per heartbeat lan, every datagram
//! authenticated, checked against the peer's address, node index and module id, and
//! replay-checked before it reaches the module.
//!
//! One reader task per socket does the stateless checks (size, tag, sender) and feeds a
//! bounded queue; [`Heartbeats::recv`] does the replay check. Waiting on the queue is
//! cancel-safe, so `recv` can sit in a `tokio::select!` beside timers.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::key::ClusterKey;
use super::wire::{self, HeartbeatHeader, ReplayGuard, WireError, DATAGRAM_BYTES_MAX};
use crate::module::PeerStatus;

/// Authenticated heartbeats waiting for [`Heartbeats::recv`]; when full, readers wait and the
/// kernel drops newer datagrams.
const RECV_QUEUE_DATAGRAMS_MAX: usize = 32;
/// At most one warning per reject reason in this interval (the first one is always logged).
const REJECT_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Pause of a reader after a receive error, so a persistent error cannot spin a core.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(100);
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

/// What the reader tasks and the receiver share: the counters and the warning rate limiter.
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

/// The heartbeat sockets of one module. Dropping it stops its reader tasks.
pub struct Heartbeats {
    key: ClusterKey,
    node_index: u8,
    module_id: u16,
    epoch: u64,
    lans: Vec<HeartbeatLan>,
    sockets: Vec<Arc<UdpSocket>>,
    /// Next datagram's sequence number, shared by all lans.
    seq: AtomicU64,
    queue: mpsc::Receiver<Authenticated>,
    readers: Vec<JoinHandle<()>>,
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
    /// Bind one socket per lan on its `local` address (SO_REUSEADDR) and start a reader task
    /// for each. Must be called inside a Tokio runtime. `epoch` is this daemon's start
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
        let (tx, queue) = mpsc::channel(RECV_QUEUE_DATAGRAMS_MAX);
        let readers = lans
            .iter()
            .zip(&sockets)
            .enumerate()
            .map(|(index, (lan, socket))| {
                let reader = Reader {
                    index,
                    lan: lan.clone(),
                    socket: Arc::clone(socket),
                    key: key.clone(),
                    peer_node: 1 - node_index,
                    module_id,
                    shared: Arc::clone(&shared),
                    tx: tx.clone(),
                };
                tokio::spawn(reader.run())
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
            queue,
            readers,
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
            let Some(got) = self.queue.recv().await else {
                // Readers never stop while `self` lives; if they did, no heartbeat comes.
                return std::future::pending().await;
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

    pub fn counters(&self) -> Arc<RejectCounters> {
        Arc::clone(&self.shared.counters)
    }

    /// The bound address of each lan's socket, in lan order.
    pub fn local_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.sockets.iter().map(|s| s.local_addr()).collect()
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
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
struct Reader {
    index: usize,
    lan: HeartbeatLan,
    socket: Arc<UdpSocket>,
    key: ClusterKey,
    peer_node: u8,
    module_id: u16,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Authenticated>,
}

impl Reader {
    async fn run(self) {
        // One byte more than the largest heartbeat, so that a larger datagram shows as such.
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX + 1];
        loop {
            let (len, from) = match self.socket.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) => {
                    self.shared.counters.recv_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(module_id = self.module_id, lan = %self.lan.name, "cannot receive a heartbeat: {e}");
                    tokio::time::sleep(RECV_ERROR_BACKOFF).await;
                    continue;
                }
            };
            // The tag is checked before the sender, so a peer with another key is reported as such.
            let (header, status) = match wire::decode(&self.key, &buf[..len]) {
                Ok(decoded) => decoded,
                Err(e) => {
                    self.shared.reject(Reason::of(&e), &self.lan.name, from, &e);
                    continue;
                }
            };
            if from != self.lan.peer || header.node != self.peer_node {
                let why = format_args!(
                    "it comes from {from} with node index {}, but the peer on this lan is {} with node index {}",
                    header.node, self.lan.peer, self.peer_node
                );
                self.shared.reject(Reason::WrongSender, &self.lan.name, from, &why);
                continue;
            }
            if header.module_id != self.module_id {
                let why = format_args!(
                    "it is for module id {}, but this port belongs to module id {}",
                    header.module_id, self.module_id
                );
                self.shared.reject(Reason::WrongModule, &self.lan.name, from, &why);
                continue;
            }
            let got = Authenticated { lan: self.index, from, header, status };
            if self.tx.send(got).await.is_err() {
                return; // Heartbeats was dropped.
            }
        }
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
