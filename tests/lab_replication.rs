//! Replication between two lab hosts running real daemons: the mountover on the primary, the
//! encrypted stream to the secondary, failover on the replicated data, and failback by resync.
//! Needs root; tools/test runs it.

mod support;

use std::fs;

use serde_json::Value;
use support::lab::*;
use support::pair::*;
use support::resync_trees::assert_same_data;

const MODULE: &str = "data";

/// A pair with the replicated module `data` (sync mode) running, hostA PRIM and hostB SECOND.
fn data_pair() -> Pair {
    let pair = Pair::new(false);
    pair.install(&ModuleSpec::new(MODULE, 1).replicated("sync"));
    pair.start_daemons();
    pair.start_with_primary_a(MODULE);
    pair
}

/// Runs `sh -c SCRIPT` in `host` and panics unless it succeeds.
fn sh(pair: &Pair, host: &str, script: &str) -> String {
    pair.lab.exec_ok(host, &["sh", "-c", script])
}

fn replication(pair: &Pair, host: &str) -> Value {
    pair.view(host, MODULE).map(|v| v["replication"].clone()).unwrap_or(Value::Null)
}

/// Waits until `host`'s view of the module's last resync says it ended well; returns it.
fn last_resync(pair: &Pair, host: &str) -> Value {
    wait_until(&format!("a finished resync on {host}"), DEADLINE, || {
        let r = replication(pair, host)["last_resync"].clone();
        (r["ok"] == Value::Bool(true)).then_some(r)
    })
}

#[test]
fn synced_writes_are_on_the_secondary_and_survive_failover_then_failback_resyncs() {
    // Proves: a write made durable through the primary's mount (dd conv=fsync) is already on the secondary's disk when dd returns; after the primary is powered off the survivor runs on the same bytes; the repaired host comes back SECOND and both copies are identical, the resync having compared everything (the old primary crashed).
    let pair = data_pair();
    let dir = format!("{DATA_DIR}/{MODULE}");
    sh(&pair, "hostA", &format!("dd if=/dev/urandom of={dir}/disk.img bs=1M count=8 conv=fsync status=none"));
    sh(&pair, "hostA", &format!("mkdir -p {dir}/sub && echo hello > {dir}/sub/note && sync {dir}/sub/note"));
    // No waiting: dd's fsync returned only once hostB had the data durably.
    assert_same_data(&pair.data_dir("hostA", MODULE), &pair.data_dir("hostB", MODULE));
    assert!(replication(&pair, "hostA")["connected"].as_bool().unwrap_or(false));

    pair.poweroff("hostA");
    pair.wait_states(MODULE, ("hostB", "ALONE"), ("hostB", "ALONE"), DEADLINE);
    pair.app_runs_on("hostB", MODULE);
    let before = fs::read(pair.data_dir("hostB", MODULE).join("disk.img")).unwrap();
    assert_eq!(before.len(), 8 << 20);
    // The survivor changes 1 MiB and adds a file while hostA is away.
    sh(
        &pair,
        "hostB",
        &format!("dd if=/dev/urandom of={dir}/disk.img bs=1M seek=3 count=1 conv=notrunc,fsync status=none"),
    );
    sh(&pair, "hostB", &format!("echo new > {dir}/added && sync {dir}/added"));

    pair.lab.poweron("hostA");
    pair.start_daemon("hostA");
    pair.wait_states(MODULE, ("hostB", "PRIM"), ("hostA", "SECOND"), DEADLINE);
    let r = last_resync(&pair, "hostB");
    assert_eq!(r["full"], Value::Bool(true), "the old primary crashed: everything is compared: {r}");
    assert_same_data(&pair.data_dir("hostA", MODULE), &pair.data_dir("hostB", MODULE));
}

#[test]
fn a_secondary_that_was_stopped_gets_only_the_changes() {
    // Proves: while the secondary is stopped the primary goes ALONE and tracks its writes; when the secondary starts again it becomes SECOND through a changes-only resync that sends the two zones the 1 MiB write touched, not the 32 MiB file, and both copies are identical.
    let pair = data_pair();
    let dir = format!("{DATA_DIR}/{MODULE}");
    sh(&pair, "hostA", &format!("dd if=/dev/urandom of={dir}/disk.img bs=1M count=32 conv=fsync status=none"));
    pair.run("hostB", &["stop", MODULE]);
    pair.wait_states(MODULE, ("hostA", "ALONE"), ("hostB", "STOP"), DEADLINE);
    sh(
        &pair,
        "hostA",
        &format!("dd if=/dev/urandom of={dir}/disk.img bs=64K seek=100 count=16 conv=notrunc,fsync status=none"),
    );
    pair.run("hostB", &["start", MODULE]);
    pair.wait_states(MODULE, ("hostA", "PRIM"), ("hostB", "SECOND"), DEADLINE);
    // The rejoin sent the two 1 MiB zones the write touched (6.25 MiB to 7.25 MiB), changes
    // only (a join with nothing left to send may follow it).
    let log = pair.module_log("hostA", MODULE);
    assert!(log.contains("(changes-only resync sent 2 MiB"), "{log}");
    assert_eq!(log.matches("(full resync sent").count(), 1, "only the first pairing was full: {log}");
    assert_same_data(&pair.data_dir("hostA", MODULE), &pair.data_dir("hostB", MODULE));
    // Live replication resumed: a new synced write is on hostB when it returns.
    sh(&pair, "hostA", &format!("echo after > {dir}/after && sync {dir}/after"));
    assert_eq!(fs::read_to_string(pair.data_dir("hostB", MODULE).join("after")).unwrap(), "after\n");
}

#[test]
fn verify_finds_a_damaged_block_and_says_identical_otherwise() {
    // Proves: `hamirror verify` on the primary says the copies are identical (exit 0) on a pair in sync, and after a block of the secondary's real file is damaged behind hamirror's back it lists that file's content difference (exit 1).
    let pair = data_pair();
    let dir = format!("{DATA_DIR}/{MODULE}");
    sh(&pair, "hostA", &format!("dd if=/dev/urandom of={dir}/disk.img bs=1M count=4 conv=fsync status=none"));
    let out = pair.run("hostA", &["verify", MODULE]);
    assert!(out.contains("identical"), "{out}");
    let real = pair.data_dir("hostB", MODULE).join("disk.img");
    let f = fs::OpenOptions::new().write(true).open(&real).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"damage", (2 << 20) + 10).unwrap();
    f.sync_all().unwrap();
    let out = pair.exec("hostA", &["verify", MODULE]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("disk.img") && stdout.contains("content differs"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("differ in 1 place"), "{out:?}");
}

#[test]
fn split_brain_loser_keeps_its_changes_aside() {
    // Proves: without a witness a full split makes both nodes ALONE and both write; on reconnection the old primary wins, the loser saves its own changes in a dated folder beside its state directory before the full resync overwrites them, says where in its log and status, and the copies end identical.
    let pair = data_pair();
    let dir = format!("{DATA_DIR}/{MODULE}");
    sh(&pair, "hostA", &format!("echo common > {dir}/note && sync {dir}/note"));
    pair.lab.cut("all", Some("hostA"));
    pair.wait_states(MODULE, ("hostA", "ALONE"), ("hostB", "ALONE"), DEADLINE);
    sh(&pair, "hostA", &format!("echo from-hostA > {dir}/note && sync {dir}/note"));
    sh(&pair, "hostB", &format!("echo from-hostB > {dir}/note && echo only-B > {dir}/b-file && sync {dir}"));
    pair.lab.heal("all", Some("hostA"));
    pair.wait_states(MODULE, ("hostA", "PRIM"), ("hostB", "SECOND"), DEADLINE);
    let saved = wait_until("hostB to say where its changes are", DEADLINE, || {
        replication(&pair, "hostB")["split_brain_saved"].as_str().map(str::to_string)
    });
    assert!(saved.starts_with(&format!("{SPLITBRAIN_DIR}/{MODULE}/")), "{saved}");
    let outside = pair.host_path("hostB", &saved);
    let copy = |name: &str| fs::read_to_string(outside.join(format!("0-{MODULE}")).join(name)).unwrap();
    assert_eq!(copy("note"), "from-hostB\n");
    assert_eq!(copy("b-file"), "only-B\n");
    assert!(pair.module_log("hostB", MODULE).contains(&saved), "the log names the folder");
    assert_eq!(fs::read_to_string(pair.data_dir("hostB", MODULE).join("note")).unwrap(), "from-hostA\n");
    assert!(!pair.data_dir("hostB", MODULE).join("b-file").exists());
    assert_same_data(&pair.data_dir("hostA", MODULE), &pair.data_dir("hostB", MODULE));
}

#[test]
fn resync_full_on_the_secondary_is_followed_to_the_end() {
    // Proves: `hamirror resync MODULE --full` run on the secondary asks a full resync, follows it and exits 0 once this node is an up-to-date SECOND again, the primary having compared everything; the copies are identical.
    let pair = data_pair();
    let dir = format!("{DATA_DIR}/{MODULE}");
    sh(&pair, "hostA", &format!("dd if=/dev/urandom of={dir}/disk.img bs=1M count=16 conv=fsync status=none"));
    let out = pair.run("hostB", &["resync", MODULE, "--full"]);
    assert!(out.contains("in sync"), "{out}");
    // Besides the first pairing, a full resync ran for the request (a changes-only one may
    // follow it: the primary starts a new generation when its secondary stops being in sync).
    let log = pair.module_log("hostA", MODULE);
    assert_eq!(log.matches("resync of hostB begins (full").count(), 2, "{log}");
    pair.wait_states(MODULE, ("hostA", "PRIM"), ("hostB", "SECOND"), DEADLINE);
    assert_same_data(&pair.data_dir("hostA", MODULE), &pair.data_dir("hostB", MODULE));
}

#[test]
fn async_mode_acknowledges_locally_and_catches_up() {
    // Proves: with sync="async" the primary replicates too: after a burst of writes the status shows the stream connected, the lag drains to zero by itself (bounded, nothing waits for it), and both copies end identical.
    let pair = Pair::new(false);
    pair.install(&ModuleSpec::new(MODULE, 1).replicated("async"));
    pair.start_daemons();
    pair.start_with_primary_a(MODULE);
    assert_eq!(replication(&pair, "hostA")["mode"], "async");
    let dir = format!("{DATA_DIR}/{MODULE}");
    sh(&pair, "hostA", &format!("dd if=/dev/urandom of={dir}/burst bs=1M count=32 conv=fsync status=none"));
    wait_until("the async lag to drain", DEADLINE, || {
        let r = replication(&pair, "hostA");
        (r["connected"] == Value::Bool(true) && r["lag"]["ops"] == 0).then_some(())
    });
    wait_until("the secondary's copy to catch up", DEADLINE, || {
        let a = fs::read(pair.data_dir("hostA", MODULE).join("burst")).ok()?;
        let b = fs::read(pair.data_dir("hostB", MODULE).join("burst")).ok()?;
        (a == b).then_some(())
    });
    assert_same_data(&pair.data_dir("hostA", MODULE), &pair.data_dir("hostB", MODULE));
}
