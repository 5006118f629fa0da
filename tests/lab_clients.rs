//! Real clients of a replicated module between two lab hosts running real daemons: qemu
//! (qemu-img, qemu-io with O_DIRECT and with writeback caching) and PostgreSQL on the primary's
//! mount, each surviving a power loss of the primary; a full disk on the secondary; and
//! connections with another cluster key, or garbage, to the secondary's replication ports.
//! Needs root, qemu-utils and postgresql; tools/test installs them and runs it.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hamirror::cluster::ClusterKey;
use hamirror::config::{SyncMode, PORT_BASE};
use hamirror::replication::channel::Identity;
use hamirror::replication::remote::RemotePeer;
use hamirror::replication::sender::{MemoryTracker, Sender, SenderConfig};
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use support::lab::*;
use support::pair::*;
use support::resync_trees::{assert_same_data, same_content};

const A: &str = HOSTS[0];
const B: &str = HOSTS[1];

/// Runs `sh -c SCRIPT` in `host` and panics unless it succeeds; returns its stdout.
fn sh(pair: &Pair, host: &str, script: &str) -> String {
    pair.lab.exec_ok(host, &["sh", "-c", script])
}

fn replication(pair: &Pair, host: &str, module: &str) -> Value {
    pair.view(host, module).map(|v| v["replication"].clone()).unwrap_or(Value::Null)
}

/// A pair with `module` (sync replication, the template's application) installed, hostA PRIM
/// and hostB SECOND.
fn replicated_pair(module: &str) -> Pair {
    let pair = Pair::new(false);
    pair.install(&ModuleSpec::new(module, 1).replicated("sync"));
    pair.start_daemons();
    pair.start_with_primary_a(module);
    pair
}

/// Runs a program of the machine (outside the lab) and returns its output; panics unless it
/// succeeds.
fn run_here(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// qemu

/// A range filled with one byte, as qemu-io's `-P` takes it: (byte, offset, length).
type Pattern = (u8, &'static str, &'static str);

/// One qemu-io run: the image, its format, the cache mode, and its writes.
struct QemuRun {
    image: &'static str,
    format: &'static str,
    cache: &'static str,
    writes: &'static [Pattern],
}

const QEMU_RUNS: [QemuRun; 4] = [
    QemuRun {
        image: "disk.qcow2",
        format: "qcow2",
        cache: "none",
        writes: &[(0x11, "0", "64k"), (0x22, "5M", "128k"), (0x33, "33M", "4k"), (0x44, "63M", "1M")],
    },
    QemuRun {
        image: "disk.qcow2",
        format: "qcow2",
        cache: "writeback",
        writes: &[(0x55, "2M", "64k"), (0x66, "5M", "64k"), (0x77, "40M", "512")],
    },
    QemuRun {
        image: "disk.raw",
        format: "raw",
        cache: "none",
        writes: &[(0x88, "0", "64k"), (0x99, "3M", "1M"), (0xaa, "15M", "4k")],
    },
    QemuRun {
        image: "disk.raw",
        format: "raw",
        cache: "writeback",
        writes: &[(0xbb, "1M", "4k"), (0xcc, "3M", "64k"), (0xdd, "12M", "512")],
    },
];

/// The pattern each image holds where `QEMU_RUNS` left it: later runs overwrite earlier
/// ones, so a read checks the newest pattern of ranges no later write touches.
const QEMU_READS: [(&str, &str, &[Pattern]); 2] = [
    (
        "disk.qcow2",
        "qcow2",
        &[
            (0x11, "0", "64k"),
            (0x55, "2M", "64k"),
            (0x66, "5M", "64k"),
            (0x22, "5184k", "64k"),
            (0x33, "33M", "4k"),
            (0x77, "40M", "512"),
            (0x44, "63M", "1M"),
            (0x00, "10M", "1M"),
        ],
    ),
    (
        "disk.raw",
        "raw",
        &[
            (0x88, "0", "64k"),
            (0xbb, "1M", "4k"),
            (0xcc, "3M", "64k"),
            (0x99, "3136k", "960k"),
            (0xdd, "12M", "512"),
            (0xaa, "15M", "4k"),
            (0x00, "8M", "1M"),
        ],
    ),
];

fn qemu_io_args(commands: &[String]) -> String {
    commands.iter().map(|c| format!("-c '{c}'")).collect::<Vec<_>>().join(" ")
}

#[test]
fn qemu_images_written_through_the_mount_are_identical_on_the_secondary_when_flush_returns_and_survive_failover() {
    // Proves: qcow2 and raw images created with qemu-img and written by qemu-io through the primary's mount, with O_DIRECT (cache=none) and with writeback caching, are identical on the secondary's disk as soon as qemu-io's flush has returned (no other wait); after the primary is powered off, qemu-img check of the survivor's qcow2 is clean and every pattern reads back there.
    let module = "vm";
    let pair = replicated_pair(module);
    let dir = format!("{DATA_DIR}/{module}");
    sh(
        &pair,
        A,
        &format!("qemu-img create -q -f qcow2 {dir}/disk.qcow2 64M && qemu-img create -q -f raw {dir}/disk.raw 16M"),
    );
    let real = |host: &str, image: &str| pair.data_dir(host, module).join(image).to_str().unwrap().to_string();
    for run in &QEMU_RUNS {
        let mut commands: Vec<String> =
            run.writes.iter().map(|(p, offset, len)| format!("write -P {p:#04x} {offset} {len}")).collect();
        commands.push("flush".into());
        let started = Instant::now();
        let out = sh(
            &pair,
            A,
            &format!("qemu-io -f {} -t {} {} {dir}/{}", run.format, run.cache, qemu_io_args(&commands), run.image),
        );
        assert!(!out.contains("failed"), "qemu-io -t {} on {}: {out}", run.cache, run.image);
        // No waiting: the flush returned only once hostB had every write durably.
        let compared = run_here(
            "qemu-img",
            &["compare", "-f", run.format, "-F", run.format, &real(A, run.image), &real(B, run.image)],
        );
        assert!(compared.contains("Images are identical"), "{}: {compared}", run.image);
        assert!(
            same_content(Path::new(&real(A, run.image)), Path::new(&real(B, run.image))),
            "{}: the files differ byte for byte after qemu-io -t {} returned",
            run.image,
            run.cache
        );
        eprintln!("qemu-io -t {} on {}: {:?}, identical on hostB", run.cache, run.image, started.elapsed());
    }
    assert_same_data(&pair.data_dir(A, module), &pair.data_dir(B, module));

    pair.poweroff(A);
    pair.wait_states(module, (B, "ALONE"), (B, "ALONE"), DEADLINE);
    let check = sh(&pair, B, &format!("qemu-img check -f qcow2 {dir}/disk.qcow2"));
    assert!(check.contains("No errors were found"), "qemu-img check on the survivor: {check}");
    for (image, format, reads) in QEMU_READS {
        let commands: Vec<String> =
            reads.iter().map(|(p, offset, len)| format!("read -P {p:#04x} {offset} {len}")).collect();
        let out = sh(&pair, B, &format!("qemu-io -r -f {format} {} {dir}/{image}", qemu_io_args(&commands)));
        assert!(!out.contains("failed"), "patterns of {image} on the survivor: {out}");
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// Where the module keeps the cluster (replicated), and the server's socket, lock and log
/// directory (private to each host: /var/lib/hamirror is).
const PG_MODULE: &str = "pg";
const PG_RUN: &str = "/var/lib/hamirror/pg-run";

fn pg_data() -> String {
    format!("{DATA_DIR}/{PG_MODULE}/data")
}

/// The newest PostgreSQL server's bin directory (/usr/lib/postgresql/<version>/bin).
fn pg_bin() -> String {
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (Debian package postgresql; tools/test installs it)")
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    let (_, bin) = found.pop().expect("a server under /usr/lib/postgresql/*/bin");
    bin.to_str().unwrap().to_string()
}

/// Shell text shared by the scripts: the variables, and `postmaster`, which prints the pid of
/// the postmaster of the cluster when one runs on this host. postmaster.pid alone cannot say:
/// it may come from the other node or from before a crash, and its number may belong to
/// another process here.
fn pg_script_head() -> String {
    format!(
        r#"#!/bin/sh
bin={bin}
data={data}
run={PG_RUN}
postmaster() {{
    pid=$(head -n 1 "$data/postmaster.pid" 2>/dev/null) || return 1
    case "$pid" in '' | *[!0-9]*) return 1 ;; esac
    [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$bin/postgres" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -e "-D $data" || return 1
    echo "$pid"
}}
"#,
        bin = pg_bin(),
        data = pg_data(),
    )
}

/// start_prim: creates the cluster on the first start (initdb as postgres, through the
/// replication mount), removes a stale postmaster.pid, starts the server and waits until it
/// accepts connections (after crash recovery, when it crashed).
fn pg_start_prim() -> String {
    pg_script_head()
        + r#"set -eu
mkdir -p "$run"
chown postgres:postgres "$run"
if [ ! -d "$data" ]; then
    # Created aside and renamed when complete, so that an interrupted initdb starts over.
    rm -rf "$data.new"
    mkdir -m 700 "$data.new"
    chown postgres:postgres "$data.new"
    runuser -u postgres -- "$bin/initdb" --auth=trust --username=postgres -D "$data.new"
    cat >>"$data.new/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$run'
fsync = on
synchronous_commit = on
EOF
    mv "$data.new" "$data"
fi
if postmaster >/dev/null; then
    echo "start_prim: PostgreSQL already runs"
    exit 0
fi
if [ -e "$data/postmaster.pid" ]; then
    echo "start_prim: removing $data/postmaster.pid: no postgres of this host runs on $data (it crashed, or ran on the other node)"
    rm -f "$data/postmaster.pid"
fi
if ! runuser -u postgres -- "$bin/pg_ctl" start -w -t 60 -D "$data" -l "$run/server.log"; then
    tail -n 30 "$run/server.log"
    exit 1
fi
"#
}

/// stop_prim [force]: `pg_ctl stop -m fast` (`immediate` when forced) of this host's server.
fn pg_stop_prim() -> String {
    pg_script_head()
        + r#"set -u
if ! postmaster >/dev/null; then
    echo "stop_prim: PostgreSQL does not run on this host"
    exit 0
fi
if [ "${1:-}" = force ]; then mode=immediate; else mode=fast; fi
runuser -u postgres -- "$bin/pg_ctl" stop -w -t 60 -D "$data" -m "$mode"
"#
}

/// `psql` of this host's server, as the shell words of a command (append `-c SQL`).
fn psql() -> String {
    format!("{}/psql -X -q -At -v ON_ERROR_STOP=1 -h {PG_RUN} -U postgres -d postgres", pg_bin())
}

/// The ids in table t on `host`.
fn pg_ids(pair: &Pair, host: &str) -> BTreeSet<u64> {
    sh(pair, host, &format!("{} -c 'SELECT id FROM t'", psql()))
        .lines()
        .map(|l| l.trim().parse().unwrap_or_else(|_| panic!("psql printed {l:?}, not an id")))
        .collect()
}

/// Waits until PostgreSQL runs as the module's application on `host`, alone.
fn pg_runs_on(pair: &Pair, host: &str) {
    wait_until(&format!("PostgreSQL to answer on {host}"), DEADLINE, || {
        pair.lab.exec(host, &["sh", "-c", &format!("{} -c 'SELECT 1'", psql())]).status.success().then_some(())
    });
    let out = pair.lab.exec(other(host), &["pgrep", "-x", "postgres"]);
    assert_ne!(out.status.code(), Some(0), "PostgreSQL also runs on {}: {}", other(host), text(&out));
}

#[test]
fn postgresql_commits_survive_a_power_loss_of_the_primary_and_failback_leaves_equal_copies() {
    // Proves: a PostgreSQL cluster created (initdb) and run through the primary's mount loses no committed transaction when the primary is powered off in the middle of a stream of commits: the survivor's start_prim runs crash recovery and every id whose COMMIT returned is there; after the host is powered back on it becomes SECOND, a swap brings PostgreSQL back to it (stop_prim: pg_ctl stop -m fast), the commits are there too, and with the server stopped both copies are byte-identical.
    let pair = Pair::new(false);
    pair.install(
        &ModuleSpec::new(PG_MODULE, 1)
            .replicated("sync")
            // initdb syncs every file through the mount: slow on a loaded machine.
            .start_timeout("60s")
            .script("start_prim", pg_start_prim())
            .script("stop_prim", pg_stop_prim()),
    );
    pair.start_daemons();
    let started = Instant::now();
    pair.run(A, &["start", PG_MODULE]);
    pair.wait_states(PG_MODULE, (A, "ALONE"), (A, "ALONE"), DEADLINE);
    pair.run(B, &["start", PG_MODULE]);
    pair.wait_states(PG_MODULE, (A, "PRIM"), (B, "SECOND"), DEADLINE);
    pg_runs_on(&pair, A);
    eprintln!("initdb, start, and hostB up to date: {:?}", started.elapsed());
    sh(&pair, A, &format!("{} -c 'CREATE TABLE t (id bigint PRIMARY KEY)'", psql()));

    // One transaction per INSERT; an id goes to `committed` only once its COMMIT returned.
    let committed = pair.lab.host_dir(A).join("state/committed");
    let client_log = pair.lab.dir().join("pg-client.log");
    let client = pair.lab.spawn(
        A,
        &client_log,
        &[
            "sh",
            "-c",
            &format!(
                "i=0; while :; do i=$((i+1)); {} -c \"INSERT INTO t VALUES ($i)\" || exit 1; echo $i >>/var/lib/hamirror/committed; done",
                psql()
            ),
        ],
    );
    let started = Instant::now();
    let count = || fs::read_to_string(&committed).map(|s| s.lines().count()).unwrap_or(0);
    wait_until("200 committed transactions", Duration::from_secs(120), || {
        assert!(process_alive(client), "the client stopped:\n{}", pair.tail(&client_log, 20));
        (count() >= 200).then_some(())
    });
    pair.poweroff(A);
    let ids: BTreeSet<u64> = fs::read_to_string(&committed).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    eprintln!("{} transactions committed in {:?} before the power loss", ids.len(), started.elapsed());

    pair.wait_states(PG_MODULE, (B, "ALONE"), (B, "ALONE"), DEADLINE);
    pg_runs_on(&pair, B);
    let server_log = fs::read_to_string(pair.lab.host_dir(B).join("state/pg-run/server.log")).unwrap();
    assert!(server_log.contains("automatic recovery in progress"), "no crash recovery on hostB:\n{server_log}");
    let survived = pg_ids(&pair, B);
    let lost: Vec<&u64> = ids.difference(&survived).collect();
    assert!(lost.is_empty(), "committed transactions lost by the failover: {lost:?}");
    // At most the one in flight at the power loss is there without being recorded.
    let last = *ids.last().unwrap();
    assert!(survived.iter().all(|id| *id <= last + 1), "ids never inserted: {survived:?}");

    pair.lab.poweron(A);
    pair.start_daemon(A);
    pair.wait_states(PG_MODULE, (B, "PRIM"), (A, "SECOND"), DEADLINE);
    pair.run(B, &["swap", PG_MODULE]);
    pair.wait_states(PG_MODULE, (A, "PRIM"), (B, "SECOND"), DEADLINE);
    // Once its stop_prim is done, the old primary's data is the target's, never read-write again.
    let log = pair.module_log(B, PG_MODULE);
    let after_swap = &log[log.rfind("swap: stopping here").expect("hostB logged the swap")..];
    let unmounted = after_swap.find("data unmounted").expect("hostB unmounted its read-write data");
    assert!(!after_swap[unmounted..].contains("read-write"), "hostB mounted its data read-write again:\n{after_swap}");
    pg_runs_on(&pair, A);
    assert_eq!(pg_ids(&pair, A), survived, "the failback changed the table");

    // With the server stopped (cleanly) and the directory synced, nothing is in flight.
    sh(
        &pair,
        A,
        &format!("runuser -u postgres -- {}/pg_ctl stop -w -D {} -m fast && sync {}", pg_bin(), pg_data(), pg_data()),
    );
    assert_same_data(&pair.data_dir(A, PG_MODULE), &pair.data_dir(B, PG_MODULE));
}

// ---------------------------------------------------------------------------------------------
// A full disk on the secondary

#[test]
fn a_full_disk_on_the_secondary_makes_the_primary_alone_and_growing_it_resyncs() {
    // Proves: when the secondary's disk fills up, the primary's synchronous writes still succeed and are intact in its own copy, the primary goes ALONE, the secondary's log says in one sentence that its disk is full, neither daemon crashes; once the disk is grown, the pair resyncs by itself to PRIM/SECOND and both copies are equal.
    let module = "full";
    let pair = Pair::new(false);
    pair.install(&ModuleSpec::new(module, 1).replicated("sync"));
    // hostB's copy lives on a 16 MiB tmpfs, mounted in its own mount namespace (and seen
    // from the test through its PID 1's root).
    let disk = "/var/lib/hamirror/small-disk";
    sh(
        &pair,
        B,
        &format!(
            "mkdir -p {disk} && mount -t tmpfs -o size=16m tmpfs {disk} && mount --bind {disk} {DATA_DIR}/{module}"
        ),
    );
    pair.start_daemons();
    pair.start_with_primary_a(module);
    let daemons: Vec<(String, u32)> = pair.daemons.borrow().iter().map(|(h, p)| (h.clone(), *p)).collect();

    // 24 files of 1 MiB, each written with fsync: more than hostB can hold.
    let sources = pair.lab.host_dir(A).join("state/sources");
    fs::create_dir_all(&sources).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let dir = format!("{DATA_DIR}/{module}");
    let started = Instant::now();
    for i in 0..24 {
        let mut data = vec![0u8; 1 << 20];
        rng.fill_bytes(&mut data);
        fs::write(sources.join(format!("f{i}")), &data).unwrap();
        let out = pair.lab.exec(
            A,
            &[
                "dd",
                &format!("if=/var/lib/hamirror/sources/f{i}"),
                &format!("of={dir}/f{i}"),
                "bs=1M",
                "conv=fsync",
                "status=none",
            ],
        );
        assert!(out.status.success(), "the primary refused a write because hostB's disk is full: f{i}: {}", text(&out));
    }
    eprintln!("24 MiB written with fsync in {:?}", started.elapsed());
    for i in 0..24 {
        let name = format!("f{i}");
        assert!(
            same_content(&sources.join(&name), &pair.data_dir(A, module).join(&name)),
            "{name} differs on the primary from what was written"
        );
    }
    wait_until("hostA to go ALONE", DEADLINE, || (pair.state(A, module).as_deref() == Some("ALONE")).then_some(()));
    let full_line = wait_until("hostB to log that its disk is full", DEADLINE, || {
        let log = fs::read_to_string(pair.daemon_log(B)).unwrap_or_default() + &pair.module_log(B, module);
        log.lines().find(|l| l.contains("No space left on device")).map(str::to_string)
    });
    eprintln!("hostB says: {full_line}");
    // While the disk stays full, the primary's resyncs fail on it and are retried.
    let failed = wait_until("a resync to fail on hostB's full disk", DEADLINE, || {
        let r = replication(&pair, A, module)["last_resync"].clone();
        (r["ok"] == Value::Bool(false)).then_some(r)
    });
    assert!(failed["error"].as_str().unwrap_or("").contains("No space left on device"), "{failed}");
    for (host, pid) in &daemons {
        assert!(process_alive(*pid), "the daemon of {host} died:\n{}", pair.tail(&pair.daemon_log(host), 40));
        assert!(pair.view(host, module).is_some(), "the daemon of {host} does not answer");
    }

    let grown = Instant::now();
    sh(&pair, B, &format!("mount -o remount,size=256m {disk}"));
    // A failed resync is retried after at most 30 s (doubling from 0.5 s).
    pair.wait_states(module, (A, "PRIM"), (B, "SECOND"), Duration::from_secs(90));
    eprintln!("PRIM/SECOND again {:?} after the disk grew", grown.elapsed());
    let real_b = PathBuf::from(format!("/proc/{}/root{disk}", pair.lab.pid1(B)));
    assert_same_data(&pair.data_dir(A, module), &real_b);
    for (host, pid) in &daemons {
        assert!(process_alive(*pid), "the daemon of {host} died:\n{}", pair.tail(&pair.daemon_log(host), 40));
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input on the replication ports

/// Runs `f` on a thread inside `host`'s network namespace (the test process is outside the lab).
fn in_netns<T: Send + 'static>(lab: &Lab, host: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = fs::File::open(format!("/proc/{}/ns/net", lab.pid1(host))).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into the lab host");
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn connections_with_another_key_or_garbage_to_the_secondary_are_refused_and_change_nothing() {
    // Proves: from the primary's host, a replication stream and a resync connection that use another cluster key, and random bytes sent to both ports, are refused by the secondary with a clear log line; the secondary's data does not change, and the real replication stream goes on (a later synced write is on the secondary).
    let module = "data";
    let pair = replicated_pair(module);
    let dir = format!("{DATA_DIR}/{module}");
    sh(&pair, A, &format!("dd if=/dev/urandom of={dir}/disk.img bs=1M count=4 conv=fsync status=none"));
    assert_same_data(&pair.data_dir(A, module), &pair.data_dir(B, module));

    let b = pair.lab.addr(B, "replication");
    // Module 1's block of ports: replication stream, then resync.
    let realtime = SocketAddr::new(b, PORT_BASE + 4 + 1);
    let resync = SocketAddr::new(b, PORT_BASE + 4 + 2);
    in_netns(&pair.lab, A, move || {
        let key = ClusterKey::generate();
        let me = Identity { module_id: 1, node: 0 };
        let timeout = Duration::from_secs(5);
        let config =
            SenderConfig { peer: realtime, key: key.clone(), module_id: 1, node: 0, mode: SyncMode::Sync, timeout };
        match Sender::connect(config, Arc::new(MemoryTracker::new()), Box::new(|_: &str| {})) {
            Ok(_) => panic!("hostB accepted a replication stream with another cluster key"),
            Err(e) => assert!(e.is_authentication(), "replication port: {e}"),
        }
        match RemotePeer::connect(resync, &key, me, timeout) {
            Ok(_) => panic!("hostB accepted a resync connection with another cluster key"),
            Err(e) => assert!(e.is_authentication(), "resync port: {e}"),
        }
    });
    let garbage = |port: u16| format!("head -c 65536 /dev/urandom >/dev/tcp/{b}/{port} 2>/dev/null || true");
    for port in [realtime.port(), resync.port()] {
        pair.lab.exec_ok(A, &["bash", "-c", &garbage(port)]);
    }

    let from = pair.lab.addr(A, "replication").to_string();
    let daemon_log = || fs::read_to_string(pair.daemon_log(B)).unwrap_or_default();
    for (what, needle) in [
        ("a replication stream with another key", "failed authentication"),
        ("garbage on the replication port", "does not speak the hamirror replication protocol"),
    ] {
        let line = wait_until(&format!("hostB to log that it refused {what}"), DEADLINE, || {
            daemon_log()
                .lines()
                .find(|l| l.contains(&format!("refused a replication connection from {from}")) && l.contains(needle))
                .map(str::to_string)
        });
        eprintln!("{what}: {line}");
    }
    for (what, needle) in [
        ("a resync connection with another key", "failed authentication"),
        ("garbage on the resync port", "does not speak the hamirror replication protocol"),
    ] {
        let line = wait_until(&format!("hostB to log that it refused {what}"), DEADLINE, || {
            pair.module_log(B, module)
                .lines()
                .find(|l| l.contains(&format!("refused a resync connection from {from}")) && l.contains(needle))
                .map(str::to_string)
        });
        eprintln!("{what}: {line}");
    }

    pair.wait_states(module, (A, "PRIM"), (B, "SECOND"), DEADLINE);
    assert_eq!(replication(&pair, A, module)["connected"], Value::Bool(true), "the real stream was dropped");
    assert_same_data(&pair.data_dir(A, module), &pair.data_dir(B, module));
    sh(&pair, A, &format!("echo after > {dir}/after && sync {dir}/after"));
    assert_eq!(fs::read_to_string(pair.data_dir(B, module).join("after")).unwrap(), "after\n");
}
