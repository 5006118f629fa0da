//! The heartbeat datagram (authentication, parsing of hostile bytes, replay guard) and the
//! UDP heartbeat transport over loopback.

use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::Ordering;
use std::time::Duration;

use hamirror::cluster::wire::{DATAGRAM_BYTES_MIN, HEADER_BYTES, TAG_BYTES};
use hamirror::cluster::{
    decode, encode, ClusterKey, HeartbeatHeader, HeartbeatLan, Heartbeats, ReplayGuard, WireError, DATAGRAM_BYTES_MAX,
};
use hamirror::module::{Generation, Origin, PeerStatus, Role, State, Transition, HISTORY_MAX};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::net::UdpSocket;
use tokio::time::timeout;

const KEY: [u8; 32] = [7; 32];
/// Bound on every await in the transport tests: loopback delivers in microseconds.
const AWAIT_MAX: Duration = Duration::from_secs(5);

fn key() -> ClusterKey {
    ClusterKey::from_bytes(KEY)
}

fn status(swap_request: u32) -> PeerStatus {
    PeerStatus {
        state: State::Second,
        transition: Some(Transition::Resyncing),
        history: vec![
            Generation { node: 0, seq: 1, origin: Origin::Startup },
            Generation { node: 1, seq: 4, origin: Origin::Primary },
        ],
        in_sync: false,
        eligible: true,
        last_role: Role::Secondary,
        swap_request,
        resync_request: 7,
        handover: false,
    }
}

fn header() -> HeartbeatHeader {
    HeartbeatHeader { node: 1, module_id: 42, epoch: 1_700_000_000_123_456_789, seq: 9 }
}

/// A frame with a valid tag around any payload bytes and length field: what only a holder of
/// the key can produce.
fn signed_frame(node: u8, payload: &[u8], length_field: u16) -> Vec<u8> {
    let mut frame = b"HAMR\x01".to_vec();
    frame.push(node);
    frame.extend_from_slice(&42u16.to_be_bytes());
    frame.extend_from_slice(&1u64.to_be_bytes());
    frame.extend_from_slice(&2u64.to_be_bytes());
    frame.extend_from_slice(&length_field.to_be_bytes());
    frame.extend_from_slice(payload);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&KEY).unwrap();
    mac.update(&frame);
    frame.extend_from_slice(&mac.finalize().into_bytes());
    frame
}

/// Deterministic xorshift64* generator: the fuzz test replays the same inputs on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

// A heartbeat decodes back to the same header and status with the same key.
#[test]
fn round_trip_keeps_header_and_status() {
    let frame = encode(&key(), &header(), &status(3));
    assert_eq!(&frame[..5], b"HAMR\x01");
    let (h, s) = decode(&key(), &frame).unwrap();
    assert_eq!(h, header());
    assert_eq!(s, status(3));
}

// A status with the longest history and the widest values still fits in one datagram.
#[test]
fn largest_status_fits_in_one_datagram() {
    let widest = PeerStatus {
        state: State::Second,
        transition: Some(Transition::StartingSecondary),
        history: vec![Generation { node: 1, seq: u64::MAX, origin: Origin::Primary }; HISTORY_MAX],
        in_sync: true,
        eligible: true,
        last_role: Role::Secondary,
        swap_request: u32::MAX,
        resync_request: u32::MAX,
        handover: true,
    };
    let h = HeartbeatHeader { node: 1, module_id: u16::MAX, epoch: u64::MAX, seq: u64::MAX };
    let frame = encode(&key(), &h, &widest);
    assert!(frame.len() <= DATAGRAM_BYTES_MAX, "{} bytes", frame.len());
    assert_eq!(decode(&key(), &frame).unwrap(), (h, widest));
}

// A datagram made with another key fails authentication.
#[test]
fn wrong_key_is_rejected() {
    let frame = encode(&ClusterKey::from_bytes([8; 32]), &header(), &status(0));
    assert_eq!(decode(&key(), &frame), Err(WireError::BadMac));
}

// Changing any single byte of a valid datagram, in any way tried, makes it rejected.
#[test]
fn every_single_byte_flip_is_rejected() {
    let frame = encode(&key(), &header(), &status(1));
    for at in 0..frame.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = frame.clone();
            bad[at] ^= mask;
            let got = decode(&key(), &bad);
            assert!(got.is_err(), "flip 0x{mask:02x} at byte {at} was accepted");
            if at >= 5 {
                assert_eq!(got, Err(WireError::BadMac), "flip at byte {at}");
            }
        }
    }
}

// Every truncation of a valid datagram, and an extension by one byte, is rejected.
#[test]
fn every_truncation_is_rejected() {
    let frame = encode(&key(), &header(), &status(1));
    for len in 0..frame.len() {
        let got = decode(&key(), &frame[..len]);
        assert!(got.is_err(), "prefix of {len} bytes was accepted");
        if len < DATAGRAM_BYTES_MIN {
            assert_eq!(got, Err(WireError::TooShort(len)));
        }
    }
    let mut longer = frame.clone();
    longer.push(0);
    assert_eq!(decode(&key(), &longer), Err(WireError::BadMac));
}

// Random bytes never panic and never decode, with or without a valid magic and version.
#[test]
fn random_bytes_never_panic_and_never_decode() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for i in 0..50_000 {
        let len = (rng.next() % (DATAGRAM_BYTES_MAX as u64 + 100)) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Half of them get past the magic and version checks, to reach the tag check.
        if i % 2 == 0 && len >= 5 {
            bytes[..5].copy_from_slice(b"HAMR\x01");
        }
        assert!(decode(&key(), &bytes).is_err(), "random input {i} decoded");
    }
}

// An authenticated but garbled payload never panics: only an error or a valid status comes out.
#[test]
fn authenticated_random_payloads_never_panic() {
    let mut rng = XorShift(42);
    for _ in 0..20_000 {
        let len = (rng.next() % 200) as usize;
        let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let _ = decode(&key(), &signed_frame(0, &payload, len as u16));
    }
}

// A frame with a valid tag but a wrong length, trailing bytes, junk or a bad node index is Malformed.
#[test]
fn authenticated_but_malformed_frames_are_rejected() {
    let payload = postcard::to_allocvec(&status(5)).unwrap();
    let len = payload.len() as u16;
    assert!(decode(&key(), &signed_frame(0, &payload, len)).is_ok());
    let malformed = |frame: Vec<u8>| matches!(decode(&key(), &frame), Err(WireError::Malformed(_)));
    assert!(malformed(signed_frame(0, &payload, len + 1)), "length too large");
    assert!(malformed(signed_frame(0, &payload, len - 1)), "length too small");
    let mut trailing = payload.clone();
    trailing.push(0);
    assert!(malformed(signed_frame(0, &trailing, len + 1)), "trailing byte");
    assert!(malformed(signed_frame(0, &[0xff; 8], 8)), "junk payload");
    assert!(malformed(signed_frame(2, &payload, len)), "node index 2");
}

// The tag is checked before the payload is parsed: junk under a wrong tag is BadMac, not Malformed.
#[test]
fn tag_is_checked_before_the_payload() {
    let mut frame = signed_frame(0, &[0xff; 8], 8);
    let last = frame.len() - 1;
    frame[last] ^= 1;
    assert_eq!(decode(&key(), &frame), Err(WireError::BadMac));
    let mut too_large = vec![0u8; DATAGRAM_BYTES_MAX + 1];
    too_large[..5].copy_from_slice(b"HAMR\x01");
    assert_eq!(decode(&key(), &too_large), Err(WireError::TooLarge(DATAGRAM_BYTES_MAX + 1)));
    let mut other_version = encode(&key(), &header(), &status(0));
    other_version[4] = 2;
    assert_eq!(decode(&key(), &other_version), Err(WireError::BadVersion(2)));
    assert_eq!(HEADER_BYTES + TAG_BYTES, DATAGRAM_BYTES_MIN);
}

// The replay guard accepts only strictly newer (epoch, seq) per sender and module; a restart (newer epoch) is accepted.
#[test]
fn replay_guard_accepts_only_newer_heartbeats() {
    let mut guard = ReplayGuard::new();
    let h = |node: u8, module_id: u16, epoch: u64, seq: u64| HeartbeatHeader { node, module_id, epoch, seq };
    assert_eq!(guard.check(&h(1, 42, 100, 5)), Ok(()));
    assert_eq!(guard.check(&h(1, 42, 100, 5)), Err(WireError::Replayed), "duplicate");
    assert_eq!(guard.check(&h(1, 42, 100, 4)), Err(WireError::Replayed), "older seq");
    assert_eq!(guard.check(&h(1, 42, 99, 1000)), Err(WireError::Replayed), "older epoch");
    assert_eq!(guard.check(&h(1, 42, 100, 6)), Ok(()), "next seq");
    assert_eq!(guard.check(&h(1, 42, 101, 0)), Ok(()), "newer epoch: the sender restarted");
    assert_eq!(guard.check(&h(1, 42, 100, 7)), Err(WireError::Replayed), "the previous run");
    // Senders and modules are tracked apart.
    assert_eq!(guard.check(&h(0, 42, 1, 0)), Ok(()));
    assert_eq!(guard.check(&h(1, 43, 1, 0)), Ok(()));
}

/// A loopback port that was free a moment ago.
fn free_port() -> SocketAddr {
    StdUdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn lan(local: SocketAddr, peer: SocketAddr) -> Vec<HeartbeatLan> {
    vec![HeartbeatLan { name: "default".into(), local, peer }]
}

async fn recv(node: &mut Heartbeats) -> (usize, PeerStatus) {
    timeout(AWAIT_MAX, node.recv()).await.expect("no heartbeat arrived")
}

// Two nodes on loopback exchange statuses in both directions, and recv() loses nothing when cancelled.
#[tokio::test]
async fn two_nodes_exchange_heartbeats_over_loopback() {
    let (a, b) = (free_port(), free_port());
    let mut node0 = Heartbeats::bind(key(), 0, 42, lan(a, b), 1).unwrap();
    let mut node1 = Heartbeats::bind(key(), 1, 42, lan(b, a), 2).unwrap();
    node0.send(&status(10)).await;
    assert_eq!(recv(&mut node1).await, (0, status(10)));
    node1.send(&status(11)).await;
    assert_eq!(recv(&mut node0).await, (0, status(11)));
    // A recv() abandoned by a timeout (as in a select!) does not swallow the next heartbeat.
    assert!(timeout(Duration::from_millis(20), node1.recv()).await.is_err());
    node0.send(&status(12)).await;
    node0.send(&status(13)).await;
    assert_eq!(recv(&mut node1).await, (0, status(12)));
    assert_eq!(recv(&mut node1).await, (0, status(13)));
    assert_eq!(node1.counters().rejected(), 0);
    assert_eq!(node0.counters().rejected(), 0);
}

// A datagram made with another key, from a third socket, is counted as bad_mac and never delivered.
#[tokio::test]
async fn wrong_key_datagram_is_counted_and_dropped() {
    let (a, b) = (free_port(), free_port());
    let node0 = Heartbeats::bind(key(), 0, 42, lan(a, b), 1).unwrap();
    let mut node1 = Heartbeats::bind(key(), 1, 42, lan(b, a), 2).unwrap();
    let intruder = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let forged = encode(
        &ClusterKey::from_bytes([9; 32]),
        &HeartbeatHeader { node: 0, module_id: 42, epoch: u64::MAX, seq: 0 },
        &status(666),
    );
    intruder.send_to(&forged, b).await.unwrap();
    // Loopback keeps the order: the good heartbeat is read after the forged one.
    node0.send(&status(1)).await;
    assert_eq!(recv(&mut node1).await, (0, status(1)));
    let counters = node1.counters();
    assert_eq!(counters.bad_mac.load(Ordering::Relaxed), 1);
    assert_eq!(counters.rejected(), 1);
}

/// Send `s` from `node` and return the datagram as the relay received it from `from`.
async fn capture(relay: &UdpSocket, node: &Heartbeats, from: SocketAddr, s: PeerStatus) -> Vec<u8> {
    node.send(&s).await;
    let mut buf = vec![0u8; 2048];
    let (len, got_from) = timeout(AWAIT_MAX, relay.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(got_from, from);
    buf.truncate(len);
    buf
}

// Through a relay standing between the nodes: replays, tampering, reflection and wrong module ids are counted and dropped.
#[tokio::test]
async fn relayed_replay_and_forgeries_are_counted_and_dropped() {
    let (a, b) = (free_port(), free_port());
    let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let r = relay.local_addr().unwrap();
    // Each node takes the relay for its peer: the relay sees and can resend every datagram.
    let node0 = Heartbeats::bind(key(), 0, 42, lan(a, r), 1).unwrap();
    let mut node1 = Heartbeats::bind(key(), 1, 42, lan(b, r), 2).unwrap();
    let first = capture(&relay, &node0, a, status(1)).await;
    relay.send_to(&first, b).await.unwrap();
    assert_eq!(recv(&mut node1).await, (0, status(1)));

    // Replay of the captured datagram, then a tampered copy of a fresh one.
    relay.send_to(&first, b).await.unwrap();
    let mut tampered = capture(&relay, &node0, a, status(2)).await;
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    relay.send_to(&tampered, b).await.unwrap();
    // Node 1's own kind of datagram reflected back to it, and one for another module.
    let reflected = encode(&key(), &HeartbeatHeader { node: 1, module_id: 42, epoch: 5, seq: 0 }, &status(3));
    relay.send_to(&reflected, b).await.unwrap();
    let other_module = encode(&key(), &HeartbeatHeader { node: 0, module_id: 43, epoch: 5, seq: 0 }, &status(4));
    relay.send_to(&other_module, b).await.unwrap();

    let fresh = capture(&relay, &node0, a, status(5)).await;
    relay.send_to(&fresh, b).await.unwrap();
    assert_eq!(recv(&mut node1).await, (0, status(5)));
    let counters = node1.counters();
    assert_eq!(counters.replayed.load(Ordering::Relaxed), 1);
    assert_eq!(counters.bad_mac.load(Ordering::Relaxed), 1);
    assert_eq!(counters.wrong_sender.load(Ordering::Relaxed), 1);
    assert_eq!(counters.wrong_module.load(Ordering::Relaxed), 1);
    assert_eq!(counters.rejected(), 4);
}

// An authenticated datagram from an address that is not the peer's on that lan is dropped as wrong_sender.
#[tokio::test]
async fn valid_datagram_from_another_address_is_dropped() {
    let (a, b) = (free_port(), free_port());
    let node0 = Heartbeats::bind(key(), 0, 42, lan(a, b), 1).unwrap();
    let mut node1 = Heartbeats::bind(key(), 1, 42, lan(b, a), 2).unwrap();
    let elsewhere = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let valid = encode(&key(), &HeartbeatHeader { node: 0, module_id: 42, epoch: u64::MAX, seq: 0 }, &status(9));
    elsewhere.send_to(&valid, b).await.unwrap();
    node0.send(&status(1)).await;
    assert_eq!(recv(&mut node1).await, (0, status(1)));
    assert_eq!(node1.counters().wrong_sender.load(Ordering::Relaxed), 1);
}

// A bind failure is an error that names the lan and the address.
#[tokio::test]
async fn bind_failure_names_the_address() {
    let not_local: SocketAddr = "192.0.2.1:10004".parse().unwrap();
    let err = Heartbeats::bind(key(), 0, 1, lan(not_local, free_port()), 1).unwrap_err();
    let sentence = err.to_string();
    assert!(sentence.contains("192.0.2.1:10004") && sentence.contains("default"), "{sentence}");
}
