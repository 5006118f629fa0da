//! The split-brain checker: is at least one witness answering ICMP echo (ping)?
//!
//! When every heartbeat is lost, only a node that reaches a witness may be primary. The
//! probes use raw ICMP sockets (the daemon runs as root). A reply counts only if it comes
//! from a witness address and carries this call's identifier, a sequence number this call
//! sent and this call's random cookie, so neither another module's probes nor a blind forger
//! can answer for a witness.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rand::RngCore;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::warn;

/// Interval between two probes to the same witness.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Bytes of the random cookie carried in each probe's payload and checked in the reply.
const COOKIE_BYTES: usize = 16;
const ICMP_HEADER_BYTES: usize = 8;
const PROBE_BYTES: usize = ICMP_HEADER_BYTES + COOKIE_BYTES;
/// Largest reply read; anything longer is not one of our echoes anyway.
const REPLY_BYTES_MAX: usize = 1500;

const ICMPV4_ECHO_REQUEST: u8 = 8;
const ICMPV4_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// True as soon as one witness answers an ICMP echo, false if none does within `timeout`.
///
/// Each witness is probed every [`PROBE_INTERVAL`]. A socket error makes the witnesses
/// concerned count as unreachable, with one warning per witness and call.
pub async fn witness_reachable(witnesses: &[IpAddr], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let witnesses: Vec<IpAddr> = witnesses.iter().map(|w| w.to_canonical()).collect();
    let mut probe = Probe::new();
    let mut families: Vec<Family> = [false, true]
        .into_iter()
        .filter_map(|v6| {
            let targets: Vec<IpAddr> = witnesses.iter().copied().filter(|w| w.is_ipv6() == v6).collect();
            if targets.is_empty() {
                return None;
            }
            match open_socket(v6) {
                Ok(socket) => Some(Family { v6, socket, targets }),
                Err(e) => {
                    warn!("cannot ping the witnesses {targets:?}, counted as unreachable: cannot open a raw ICMP socket: {e}");
                    None
                }
            }
        })
        .collect();

    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut bufs = [vec![0u8; REPLY_BYTES_MAX], vec![0u8; REPLY_BYTES_MAX]];
    loop {
        if families.iter().all(|f| f.targets.is_empty()) {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return false,
            _ = ticks.tick() => {
                if let Some(seq) = probe.next_seq() {
                    for family in &mut families {
                        family.send_probes(&probe, seq).await;
                    }
                }
            }
            got = recv_any(&families, &mut bufs) => match got {
                (index, Ok((len, from))) => {
                    if families[index].is_reply(&probe, &bufs[index][..len], from.ip()) {
                        return true;
                    }
                }
                (index, Err(e)) => {
                    let family = &mut families[index];
                    warn!(
                        "cannot ping the witnesses {:?}, counted as unreachable: cannot receive ICMP replies: {e}",
                        family.targets
                    );
                    family.targets.clear();
                }
            },
        }
    }
}

/// The identity of one call's probes.
struct Probe {
    ident: u16,
    cookie: [u8; COOKIE_BYTES],
    /// Sequence numbers `0 .. seq_sent` have been sent.
    seq_sent: u16,
}

impl Probe {
    fn new() -> Probe {
        let mut cookie = [0u8; COOKIE_BYTES];
        rand::thread_rng().fill_bytes(&mut cookie);
        Probe { ident: rand::random(), cookie, seq_sent: 0 }
    }

    /// The sequence number of the next round, or None once they are all used (a timeout of
    /// about 3.6 hours); the call then only waits.
    fn next_seq(&mut self) -> Option<u16> {
        let seq = self.seq_sent;
        self.seq_sent = self.seq_sent.checked_add(1)?;
        Some(seq)
    }

    fn echo_request(&self, v6: bool, seq: u16) -> [u8; PROBE_BYTES] {
        let mut msg = [0u8; PROBE_BYTES];
        msg[0] = if v6 { ICMPV6_ECHO_REQUEST } else { ICMPV4_ECHO_REQUEST };
        msg[4..6].copy_from_slice(&self.ident.to_be_bytes());
        msg[6..8].copy_from_slice(&seq.to_be_bytes());
        msg[ICMP_HEADER_BYTES..].copy_from_slice(&self.cookie);
        if !v6 {
            // ICMPv6's checksum covers a pseudo-header; the kernel fills it in for raw ICMPv6
            // sockets. ICMPv4's is ours to compute.
            let sum = checksum(&msg);
            msg[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        msg
    }

    /// Is `icmp` (the ICMP message, without IP header) an echo reply to one of our probes?
    fn answers(&self, v6: bool, icmp: &[u8]) -> bool {
        let reply = if v6 { ICMPV6_ECHO_REPLY } else { ICMPV4_ECHO_REPLY };
        icmp.len() == PROBE_BYTES
            && icmp[0] == reply
            && icmp[1] == 0
            && (v6 || checksum(icmp) == 0)
            && u16::from_be_bytes([icmp[4], icmp[5]]) == self.ident
            && u16::from_be_bytes([icmp[6], icmp[7]]) < self.seq_sent
            && icmp[ICMP_HEADER_BYTES..] == self.cookie
    }
}

/// One address family's raw socket and the witnesses still counted as reachable.
struct Family {
    v6: bool,
    socket: UdpSocket,
    targets: Vec<IpAddr>,
}

impl Family {
    async fn send_probes(&mut self, probe: &Probe, seq: u16) {
        let msg = probe.echo_request(self.v6, seq);
        let mut failed = Vec::new();
        for &target in &self.targets {
            // The port is ignored by raw ICMP sockets (and must be 0 for IPv6).
            if let Err(e) = self.socket.send_to(&msg, SocketAddr::new(target, 0)).await {
                warn!("cannot ping the witness {target}, counted as unreachable: {e}");
                failed.push(target);
            }
        }
        self.targets.retain(|t| !failed.contains(t));
    }

    fn is_reply(&self, probe: &Probe, datagram: &[u8], from: IpAddr) -> bool {
        if !self.targets.contains(&from.to_canonical()) {
            return false;
        }
        let icmp = if self.v6 {
            datagram
        } else {
            // A raw IPv4 socket hands over the IP header too.
            match datagram.first() {
                Some(&first) if first >> 4 == 4 => {
                    let header_bytes = usize::from(first & 0x0f) * 4;
                    match datagram.get(header_bytes..) {
                        Some(icmp) if header_bytes >= 20 => icmp,
                        _ => return false,
                    }
                }
                _ => return false,
            }
        };
        probe.answers(self.v6, icmp)
    }
}

/// A non-blocking raw ICMP (or ICMPv6) socket, driven by tokio's `UdpSocket`: it only issues
/// `sendto`/`recvfrom`, which work on any datagram socket, so no unsafe code is needed.
fn open_socket(v6: bool) -> io::Result<UdpSocket> {
    let (domain, protocol) = if v6 { (Domain::IPV6, Protocol::ICMPV6) } else { (Domain::IPV4, Protocol::ICMPV4) };
    let socket = Socket::new(domain, Type::RAW, Some(protocol))?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// Receive on whichever family's socket has something, into that family's buffer; a family
/// with no witness left is not polled.
async fn recv_any(families: &[Family], bufs: &mut [Vec<u8>; 2]) -> (usize, io::Result<(usize, SocketAddr)>) {
    let live = |i: usize| families.get(i).filter(|f| !f.targets.is_empty()).map(|f| &f.socket);
    let [buf0, buf1] = bufs;
    tokio::select! {
        got = recv_from(live(0), buf0) => (0, got),
        got = recv_from(live(1), buf1) => (1, got),
    }
}

async fn recv_from(socket: Option<&UdpSocket>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match socket {
        Some(socket) => socket.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// The Internet checksum (RFC 1071): one's complement of the one's complement sum of the
/// 16-bit big-endian words. Over a message that carries its checksum, it is 0.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut words = data.chunks_exact(2);
    for word in &mut words {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The checksum matches RFC 1071's worked example and verifies to zero once inserted.
    #[test]
    fn checksum_follows_rfc_1071() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
        let probe = Probe::new();
        let msg = probe.echo_request(false, 3);
        assert_eq!(checksum(&msg), 0);
        assert_eq!(checksum(&[0xab]), !0xab00);
    }

    // Only an echo reply with our identifier, a sent sequence number and our cookie counts.
    #[test]
    fn only_our_echo_replies_count() {
        let mut probe = Probe::new();
        assert_eq!(probe.next_seq(), Some(0));
        let reply = |seq: u16| {
            let mut msg = probe.echo_request(false, seq);
            msg[0] = ICMPV4_ECHO_REPLY;
            msg[2..4].fill(0);
            let sum = checksum(&msg);
            msg[2..4].copy_from_slice(&sum.to_be_bytes());
            msg
        };
        assert!(probe.answers(false, &reply(0)));
        assert!(!probe.answers(false, &reply(1)), "sequence not sent yet");
        let mut request = probe.echo_request(false, 0);
        assert!(!probe.answers(false, &request), "our own request is not a reply");
        request[0] = ICMPV4_ECHO_REPLY;
        assert!(!probe.answers(false, &request), "bad checksum");
        let mut forged = reply(0);
        forged[PROBE_BYTES - 1] ^= 1;
        forged[2..4].fill(0);
        let sum = checksum(&forged);
        forged[2..4].copy_from_slice(&sum.to_be_bytes());
        assert!(!probe.answers(false, &forged), "wrong cookie");
        assert!(!probe.answers(false, &reply(0)[..PROBE_BYTES - 1]), "truncated");
        let mut v6 = probe.echo_request(true, 0);
        v6[0] = ICMPV6_ECHO_REPLY;
        assert!(probe.answers(true, &v6));
    }
}
