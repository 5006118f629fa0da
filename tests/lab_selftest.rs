//! Self-test of the multi-host lab (tools/lab, tests/support/lab.rs): what the failover
//! tests rely on. Needs root; tools/test runs it.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::lab::*;

/// How long a network or power change may take to be visible: generous for a loaded CI.
const SETTLE: Duration = Duration::from_secs(10);

/// Whether `from` gets an answer to one ping to `to` (iputils-ping, installed by tools/test).
fn ping(lab: &Lab, from: &str, to: std::net::IpAddr) -> bool {
    let out = lab.exec(from, &["ping", "-n", "-c1", "-W1", &to.to_string()]);
    match out.status.code() {
        Some(0) => true,
        Some(1) | Some(2) => false, // no answer / network unreachable
        _ => panic!(
            "ping in {from} did not run ({}): {} (tools/test installs iputils-ping)",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The network namespace name of a host, from its PID 1.
fn netns_of(lab: &Lab, host: &str) -> String {
    let pid = lab.pid1(host).to_string();
    let out = Command::new("ip").args(["netns", "identify", &pid]).output().expect("ip netns identify");
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(name.starts_with("hm"), "netns of {host}: {name:?}");
    name
}

fn read_counter(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[test]
fn hosts_reach_each_other_on_every_lan_and_nothing_else() {
    // Proves: every host answers every other host on each lan, and no host has a route out.
    let lab = Lab::up(LabSpec::new(&["hostA", "hostB", "hostC"]).lans(&["default", "replication"]));
    for lan in ["default", "replication"] {
        for from in ["hostA", "hostB", "hostC"] {
            for to in ["hostA", "hostB", "hostC"] {
                assert!(ping(&lab, from, lab.addr(to, lan)), "{from} -> {to} on {lan}\n{}", lab.status());
            }
        }
    }
    assert_eq!(lab.addr("hostB", "replication").to_string(), "10.231.2.2");
    let routes = lab.exec_ok("hostA", &["ip", "-4", "route", "show"]);
    assert!(!routes.lines().any(|r| r.starts_with("default")), "hostA has a route out of the lab:\n{routes}");
    assert!(!lab.exec("hostA", &["ip", "route", "get", "1.1.1.1"]).status.success());
    let links = lab.exec_ok("hostA", &["ip", "-br", "link"]);
    assert!(links.contains(&ifname("default")) && links.contains(&ifname("replication")), "{links}");
    assert_eq!(lab.exec_ok("hostB", &["hostname"]).trim(), "hostB");
}

#[test]
fn cut_of_one_lan_stops_only_that_lan_and_heal_restores_it() {
    // Proves: cutting hostB's replication cable leaves the default lan working, heal restores it,
    // and a cut without a host takes the whole lan down.
    let lab = Lab::up(LabSpec::default().lans(&["default", "replication"]));
    let b_repl = lab.addr("hostB", "replication");
    let b_default = lab.addr("hostB", "default");
    assert!(ping(&lab, "hostA", b_repl));

    lab.cut("replication", Some("hostB"));
    assert!(!ping(&lab, "hostA", b_repl), "replication still works after the cut");
    assert!(ping(&lab, "hostA", b_default), "the cut of replication broke default");

    lab.heal("replication", Some("hostB"));
    assert!(ping(&lab, "hostA", b_repl), "replication does not work after heal");

    lab.cut("default", None);
    assert!(!ping(&lab, "hostA", b_default));
    assert!(!ping(&lab, "hostB", lab.addr("hostA", "default")));
    assert!(ping(&lab, "hostA", b_repl));
    lab.heal("all", None);
    assert!(ping(&lab, "hostA", b_default));
}

#[test]
fn poweroff_kills_the_host_and_poweron_boots_it_with_its_files() {
    // Proves: poweroff kills every process of the host, exec then refuses, and poweron gives
    // a fresh PID 1 that still sees the private files written before.
    let lab = Lab::up(LabSpec::default());
    fs::write(lab.host_dir("hostA").join("etc/cluster.xml"), "<cluster/>\n").unwrap();
    lab.exec_ok("hostA", &["sh", "-c", "echo 42 > /var/lib/hamirror/generation"]);
    let log = lab.dir().join("sleep.log");
    let sleeper = lab.spawn("hostA", &log, &["sleep", "1000"]);
    let other = lab.spawn("hostB", &log, &["sleep", "1000"]);
    let pid1 = lab.pid1("hostA");
    assert!(process_alive(sleeper) && process_alive(pid1));

    lab.poweroff("hostA");
    assert!(!process_alive(sleeper), "a process of hostA survived its poweroff");
    assert!(!process_alive(pid1));
    assert!(process_alive(other), "powering hostA off killed a process of hostB");
    assert_eq!(lab.exec("hostA", &["true"]).status.code(), Some(LAB_ERROR_EXIT_CODE));
    // a dead machine is silent: no ARP, no ping, no TCP reset from its kernel
    assert!(!ping(&lab, "hostB", lab.addr("hostA", "default")));
    lab.poweroff("hostA"); // idempotent

    lab.poweron("hostA");
    assert!(ping(&lab, "hostB", lab.addr("hostA", "default")));
    assert_ne!(lab.pid1("hostA"), pid1);
    assert_eq!(lab.exec_ok("hostA", &["cat", "/etc/hamirror/cluster.xml"]), "<cluster/>\n");
    assert_eq!(lab.exec_ok("hostA", &["cat", "/var/lib/hamirror/generation"]), "42\n");
    let ps = lab.exec_ok("hostA", &["ps", "-e", "-o", "comm="]);
    assert!(!ps.contains("sleep\nsleep"), "an old process is back:\n{ps}");
}

#[test]
fn freeze_stops_the_host_and_thaw_resumes_it() {
    // Proves: a frozen host makes no progress at all, exec refuses to hang on it, and thaw
    // resumes it where it was.
    let lab = Lab::up(LabSpec::default());
    let counter = lab.host_dir("hostA").join("state/counter");
    let log = lab.dir().join("counter.log");
    lab.spawn(
        "hostA",
        &log,
        &[
            "bash",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i > /var/lib/hamirror/counter.tmp; \
             mv /var/lib/hamirror/counter.tmp /var/lib/hamirror/counter; sleep 0.02; done",
        ],
    );
    wait_until("the counter to start", SETTLE, || read_counter(&counter).filter(|&n| n > 2));

    lab.freeze("hostA");
    let frozen_at = read_counter(&counter).unwrap();
    // Watch for a while: running, the counter would move every 20 ms.
    let watch = std::time::Instant::now();
    while watch.elapsed() < Duration::from_millis(500) {
        assert_eq!(read_counter(&counter), Some(frozen_at), "a frozen host made progress");
        std::thread::sleep(POLL_INTERVAL);
    }
    assert_eq!(lab.exec("hostA", &["true"]).status.code(), Some(LAB_ERROR_EXIT_CODE));
    assert!(lab.status().contains("frozen"));

    lab.thaw("hostA");
    wait_until("the counter to move after thaw", SETTLE, || read_counter(&counter).filter(|&n| n > frozen_at));
    lab.exec_ok("hostA", &["true"]);
}

#[test]
fn witness_down_makes_the_witness_unreachable() {
    // Proves: the witness answers on every lan, and witness down/up unplugs/replugs it.
    let lab = Lab::up(LabSpec::default().lans(&["default", "replication"]).witness());
    let w = lab.addr("witness", "default");
    assert_eq!(w.to_string(), "10.231.1.254");
    assert!(ping(&lab, "hostA", w));
    assert!(ping(&lab, "hostB", lab.addr("witness", "replication")));

    lab.witness_down();
    assert!(!ping(&lab, "hostA", w));
    assert!(!ping(&lab, "hostB", lab.addr("witness", "replication")));
    assert!(ping(&lab, "hostA", lab.addr("hostB", "default")), "witness down cut the hosts apart");

    lab.witness_up();
    assert!(ping(&lab, "hostA", w));
}

#[test]
fn private_dirs_of_one_host_are_invisible_to_the_others() {
    // Proves: /etc/hamirror, /var/lib/hamirror and --bind paths are per host, and none of it
    // lands on the machine's real directories.
    let bound = tempfile::tempdir().unwrap();
    let lab = Lab::up(LabSpec::default().bind(bound.path()));
    let b = bound.path().to_str().unwrap();
    lab.exec_ok(
        "hostA",
        &[
            "sh",
            "-c",
            &format!("echo a > /etc/hamirror/only-a && echo a > /var/lib/hamirror/only-a && echo a > {b}/only-a"),
        ],
    );
    for path in ["/etc/hamirror/only-a", "/var/lib/hamirror/only-a", &format!("{b}/only-a")] {
        assert!(!lab.exec("hostB", &["test", "-e", path]).status.success(), "hostB sees {path}");
        assert!(!Path::new(path).exists(), "{path} is on the real machine");
        assert_eq!(lab.exec_ok("hostA", &["cat", path]), "a\n");
    }
    assert!(lab.host_dir("hostA").join("etc/only-a").exists());
    assert!(lab.host_dir("hostA").join("state/only-a").exists());
    assert!(lab.host_dir("hostA").join(format!("bind{b}/only-a")).exists());
    // each host sees only its own processes
    let ps = lab.exec_ok("hostB", &["ps", "-e", "-o", "pid="]);
    assert!(ps.split_whitespace().count() < 10, "hostB sees foreign processes:\n{ps}");
}

#[test]
fn drop_tears_the_lab_down_even_when_the_test_panics() {
    // Proves: dropping a Lab (on success or on a panic) leaves no namespace, cgroup,
    // process or state directory behind.
    let mut left = Vec::new();
    for panics in [false, true] {
        let result = std::panic::catch_unwind(|| {
            let lab = Lab::up(LabSpec::default().witness());
            let names = vec![netns_of(&lab, "hostA"), netns_of(&lab, "hostB")];
            let pids = vec![lab.pid1("hostA"), lab.pid1("hostB")];
            let dir = lab.dir().to_path_buf();
            let name = lab.name().to_string();
            assert!(netns_list().contains(&names[0]));
            let _lab = lab;
            if panics {
                std::panic::panic_any((names, pids, dir, name));
            }
            (names, pids, dir, name)
        });
        let (names, pids, dir, name) = match result {
            Ok(v) => v,
            Err(e) => *e.downcast::<(Vec<String>, Vec<u32>, std::path::PathBuf, String)>().unwrap(),
        };
        left.push((panics, names, pids, dir, name));
    }
    let netns = netns_list();
    for (panics, names, pids, dir, name) in left {
        let tag = &names[0][..8]; // hm + 6 hex: every namespace of the lab
        assert!(!netns.contains(tag), "namespaces left (panicked: {panics}):\n{netns}");
        assert!(pids.iter().all(|&p| !process_alive(p)), "a PID 1 survived");
        assert!(!dir.exists(), "{} left", dir.display());
        assert!(!Path::new(&format!("/sys/fs/cgroup/freezer/hamirror-{name}-hostA")).exists());
    }
}
