//! The split-brain checker against real ICMP. Raw sockets and network namespaces need root:
//! without it these tests say so on stderr and pass without checking anything.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use hamirror::quorum::witness_reachable;
use nix::sched::{unshare, CloneFlags};
use tokio::time::{timeout, Instant};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Bound on every await: past it the checker is hung, not slow.
const AWAIT_MAX: Duration = Duration::from_secs(5);

fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipped: raw ICMP sockets need root");
    }
    root
}

// The local host answers ping, so 127.0.0.1 as a witness is reachable within 1 s.
#[tokio::test]
async fn loopback_witness_is_reachable_within_one_second() {
    if !is_root() {
        return;
    }
    let started = Instant::now();
    assert!(witness_reachable(&[LOOPBACK], Duration::from_secs(1)).await);
    assert!(started.elapsed() < Duration::from_secs(1));
}

// One answering witness is enough, even listed after one that cannot answer, of the other family.
#[tokio::test]
async fn one_answering_witness_is_enough() {
    if !is_root() {
        return;
    }
    // 100::1 is in the IPv6 discard prefix (RFC 6666): nothing answers there.
    let silent = IpAddr::V6(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 1));
    assert!(witness_reachable(&[silent, LOOPBACK], Duration::from_secs(1)).await);
}

// ::1 is reachable over ICMPv6 where the host has IPv6 on its loopback.
#[tokio::test]
async fn ipv6_loopback_witness_is_reachable() {
    if !is_root() {
        return;
    }
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 on loopback");
        return;
    }
    assert!(witness_reachable(&[IpAddr::V6(Ipv6Addr::LOCALHOST)], Duration::from_secs(1)).await);
}

// No witness at all is never reachable, and the answer comes at once.
#[tokio::test]
async fn no_witness_is_unreachable() {
    let answer = timeout(AWAIT_MAX, witness_reachable(&[], Duration::from_secs(60))).await;
    assert_eq!(answer, Ok(false));
}

/// Run `f` on a thread moved into a fresh network namespace (loopback down), with its own
/// current-thread runtime. unshare() moves only the calling thread, so the rest of the test
/// binary keeps the host's network; processes the thread starts inherit the namespace.
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f()
    })
    .join()
    .unwrap()
}

fn reachable_within(witness: IpAddr, probe_for: Duration) -> Result<bool, tokio::time::error::Elapsed> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async { timeout(AWAIT_MAX, witness_reachable(&[witness], probe_for)).await })
}

// In a fresh network namespace (loopback down) 127.0.0.1 cannot be pinged: the witness is unreachable.
#[test]
fn witness_in_an_empty_network_namespace_is_unreachable() {
    if !is_root() {
        return;
    }
    let answer = in_fresh_netns(|| reachable_within(LOOPBACK, Duration::from_millis(500)));
    assert_eq!(answer, Ok(false));
}

// A witness that is up but never answers is unreachable once the timeout elapses, and not before.
#[test]
fn silent_witness_is_unreachable_after_the_timeout() {
    if !is_root() {
        return;
    }
    let answers = in_fresh_netns(|| {
        // Loopback up in this namespace, so probes leave without error.
        let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status();
        if !up.is_ok_and(|s| s.success()) {
            return None;
        }
        let answering = reachable_within(LOOPBACK, Duration::from_secs(1));
        // This namespace's own sysctl: the host keeps answering pings.
        std::fs::write("/proc/sys/net/ipv4/icmp_echo_ignore_all", "1").unwrap();
        let started = std::time::Instant::now();
        let silent = reachable_within(LOOPBACK, Duration::from_millis(500));
        Some((answering, silent, started.elapsed()))
    });
    let Some((answering, silent, elapsed)) = answers else {
        eprintln!("skipped: `ip link set lo up` failed");
        return;
    };
    assert_eq!(answering, Ok(true), "the namespace's loopback answers before pings are ignored");
    assert_eq!(silent, Ok(false));
    assert!(elapsed >= Duration::from_millis(500), "gave up after {elapsed:?}");
}
