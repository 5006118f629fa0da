//! A real pair of `hamirror daemon`s in two lab hosts (tools/lab, docs/lab.md), with UDP
//! heartbeats between network namespaces: failover, swap, split brain (with and without a
//! witness), a frozen primary, and 32 modules on one pair. Needs root; tools/test runs it.
//! The pair and the application are described in tests/support/pair.rs.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use serde_json::Value;

use support::lab::*;
use support::pair::*;

#[test]
fn failover_when_primary_is_powered_off() {
    // Proves: the secondary takes over when the primary's host dies; the repaired host rejoins as SECOND.
    let pair = pair_with_web(false);
    for h in HOSTS {
        pair.run(h, &["start", "web"]);
    }
    let (primary, survivor) = pair.wait_pair("web", DEADLINE);
    pair.app_runs_on(primary, "web");

    pair.poweroff(primary);
    wait_until("the survivor to be ALONE", DEADLINE, || {
        (pair.settled(survivor, "web").as_deref() == Some("ALONE")).then_some(())
    });
    pair.app_runs_on(survivor, "web");

    pair.lab.poweron(primary);
    pair.start_daemon(primary); // the module was running: the daemon starts it again
    pair.wait_states("web", (primary, "SECOND"), (survivor, "PRIM"), DEADLINE);
    pair.app_runs_on(survivor, "web");
}

#[test]
fn swap_stops_primary_before_starting_secondary() {
    // Proves: swap ends stop_prim on the old primary before start_prim begins on the new one.
    let pair = pair_with_web(false);
    for h in HOSTS {
        pair.run(h, &["start", "web"]);
    }
    let (old, new) = pair.wait_pair("web", DEADLINE);
    pair.app_runs_on(old, "web");
    let starts_before = pair.trace(new, "web").len();

    pair.run(old, &["swap", "web"]);
    pair.wait_states("web", (new, "PRIM"), (old, "SECOND"), DEADLINE);
    pair.app_runs_on(new, "web");

    let stopped = pair.last_trace(old, "web", "stop_prim", "end").expect("stop_prim ran on the old primary");
    let new_trace = pair.trace(new, "web");
    let started = new_trace[starts_before..]
        .iter()
        .find(|t| t.script == "start_prim" && t.edge == "begin")
        .unwrap_or_else(|| panic!("start_prim did not run on {new}: {new_trace:?}"))
        .ns;
    assert!(
        stopped < started,
        "start_prim began on {new} {} ms before stop_prim ended on {old}",
        (stopped - started) as f64 / 1e6
    );
    assert!(new_trace.iter().all(|t| t.host == new), "{new_trace:?}");
}

/// hostA (the primary) is cut from every lan while the witness answers hostB only.
fn cut_primary_from_everything(pair: &Pair) {
    pair.start_with_primary_a("web");
    pair.lab.cut("all", Some(HOSTS[0]));
}

fn split_settled(pair: &Pair) -> bool {
    pair.settled(HOSTS[0], "web").as_deref() == Some("WAIT")
        && pair.settled(HOSTS[1], "web").as_deref() == Some("ALONE")
}

#[test]
fn split_brain_with_witness_leaves_exactly_one_primary() {
    // Proves: with a witness, a primary cut from everything is never primary at once with its
    // peer, the application never runs on both, and the healed pair is PRIM/SECOND.
    let pair = pair_with_web(true);
    cut_primary_from_everything(&pair);
    never_both_primary(&pair, "web", "hostA WAIT and hostB ALONE", DEADLINE, || split_settled(&pair));
    // The application never ran on both: hostA's stop_prim ended before hostB's start_prim.
    let stopped = pair.last_trace(HOSTS[0], "web", "stop_prim", "end").expect("stop_prim ran on hostA");
    let started = pair.last_trace(HOSTS[1], "web", "start_prim", "begin").expect("start_prim ran on hostB");
    assert!(
        stopped < started,
        "hostB started the application {} ms before hostA's stop ended",
        (stopped - started) as f64 / 1e6
    );
    pair.app_runs_on(HOSTS[1], "web");

    pair.lab.heal("all", Some(HOSTS[0]));
    pair.wait_states("web", (HOSTS[1], "PRIM"), (HOSTS[0], "SECOND"), DEADLINE);
    pair.app_runs_on(HOSTS[1], "web");
}

#[test]
fn wait_wait_without_witness_answer_then_admin_prim() {
    // Proves: no witness answering gives WAIT-WAIT; prim makes hostB ALONE; after the heal hostA is SECOND.
    let pair = pair_with_web(true);
    wait_wait(&pair);
    pair.run(HOSTS[1], &["prim", "web"]);
    wait_until("hostB ALONE after prim", DEADLINE, || {
        (pair.settled(HOSTS[1], "web").as_deref() == Some("ALONE")).then_some(())
    });

    pair.lab.heal("all", Some(HOSTS[0]));
    pair.lab.witness_up();
    pair.wait_states("web", (HOSTS[1], "PRIM"), (HOSTS[0], "SECOND"), DEADLINE);
    pair.app_runs_on(HOSTS[1], "web");
}

#[test]
fn admin_prim_holds_while_no_witness_answers() {
    // Proves: an admin's prim during WAIT-WAIT keeps hostB ALONE, its app running, while the split lasts.
    let pair = pair_with_web(true);
    wait_wait(&pair);
    pair.run(HOSTS[1], &["prim", "web"]);
    wait_until("hostB ALONE after prim", DEADLINE, || {
        (pair.settled(HOSTS[1], "web").as_deref() == Some("ALONE")).then_some(())
    });
    hold("hostB ALONE after the admin's prim", HOLD, || pair.state(HOSTS[1], "web").as_deref() == Some("ALONE"));
    pair.app_runs_on(HOSTS[1], "web");
}

/// hostA primary, then the witness down and hostA cut from every lan: both end in WAIT with
/// no application running, never both primary on the way.
fn wait_wait(pair: &Pair) {
    pair.start_with_primary_a("web");
    pair.lab.witness_down();
    pair.lab.cut("all", Some(HOSTS[0]));
    never_both_primary(pair, "web", "WAIT on both hosts", DEADLINE, || {
        pair.settled(HOSTS[0], "web").as_deref() == Some("WAIT")
            && pair.settled(HOSTS[1], "web").as_deref() == Some("WAIT")
    });
    for h in HOSTS {
        pair.app_stopped_on(h, "web");
    }
}

#[test]
fn alone_alone_without_witness_resolves_on_reconnection() {
    // Proves: no witness: a split gives ALONE-ALONE; on reconnection the old primary wins, the other resyncs.
    let pair = pair_with_web(false);
    pair.start_with_primary_a("web");

    pair.lab.cut("all", Some(HOSTS[0]));
    pair.wait_states("web", (HOSTS[0], "ALONE"), (HOSTS[1], "ALONE"), DEADLINE);
    for h in HOSTS {
        assert_eq!(pair.app_process(h, "web"), Some(true), "the application does not run on {h}");
    }

    pair.lab.heal("all", Some(HOSTS[0]));
    pair.wait_states("web", (HOSTS[0], "PRIM"), (HOSTS[1], "SECOND"), DEADLINE);
    pair.app_runs_on(HOSTS[0], "web");
    let log = pair.module_log(HOSTS[1], "web");
    assert!(log.contains("divergent data will be replaced by a full resync"), "hostB's module log:\n{log}");
}

#[test]
fn frozen_primary_that_thaws_does_not_stay_primary() {
    // Proves: a frozen primary is replaced, and once thawed it becomes SECOND with its app stopped.
    let pair = pair_with_web(false);
    pair.start_with_primary_a("web");

    pair.lab.freeze(HOSTS[0]);
    wait_until("hostB ALONE", DEADLINE, || (pair.settled(HOSTS[1], "web").as_deref() == Some("ALONE")).then_some(()));
    // hostA's application is frozen too, so the file of hostB proves hostB runs it.
    let file = pair.alive_file(HOSTS[1], "web");
    let first = wait_until("hostB's application to write", DEADLINE, || fs::read_to_string(&file).ok());
    wait_until("hostB's application to keep writing", DEADLINE, || {
        fs::read_to_string(&file).ok().filter(|s| *s != first)
    });

    pair.lab.thaw(HOSTS[0]);
    pair.wait_states("web", (HOSTS[0], "SECOND"), (HOSTS[1], "PRIM"), DEADLINE);
    pair.app_runs_on(HOSTS[1], "web");
    assert_eq!(pair.app_process(HOSTS[0], "web"), Some(false));
}

#[test]
fn thirty_two_modules_on_one_pair() {
    // Proves: 32 modules run on one pair; a 33rd is refused (the 32 limit) and the 32 keep running.
    const MODULES: u16 = 32;
    let pair = Pair::new(false);
    let names: Vec<String> = (1..=MODULES + 1).map(|i| format!("m{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        pair.install(&ModuleSpec::new(name, i as u16 + 1).timeout("2s"));
    }
    pair.start_daemons();
    let running = &names[..MODULES as usize];
    let starts = running.iter().map(|m| format!("{} start {m}", hamirror())).collect::<Vec<_>>().join(" && ");
    for h in HOSTS {
        pair.lab.exec_ok(h, &["sh", "-c", &starts]);
    }

    // every module PRIM on one host and SECOND on the other, settled
    let all_paired = || -> Option<()> {
        let mut views = BTreeMap::new();
        for h in HOSTS {
            let out = pair.exec(h, &["status", "--json"]);
            if !out.status.success() {
                return None;
            }
            let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
            views.insert(h, list);
        }
        for m in running {
            let mut states = Vec::new();
            for h in HOSTS {
                let v = views[h].iter().find(|v| v["name"] == m.as_str())?;
                if !v["status"]["transition"].is_null() {
                    return None;
                }
                states.push(v["status"]["state"].as_str()?.to_string());
            }
            states.sort();
            if states != ["PRIM", "SECOND"] {
                return None;
            }
        }
        Some(())
    };
    wait_until("32 modules PRIM/SECOND", Duration::from_secs(60), all_paired);

    let refused = &names[MODULES as usize];
    for h in HOSTS {
        let v = pair.view(h, refused).unwrap_or_else(|| panic!("{refused} is not shown on {h}"));
        assert!(v["status"].is_null(), "{refused} runs on {h}: {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains("32 mirror modules"), "{refused} on {h}: {error}");
        let out = pair.exec(h, &["start", refused]);
        assert!(!out.status.success(), "{refused} started on {h}");
    }
    // the 32 keep running
    hold("the 32 modules to stay PRIM/SECOND", HOLD, || all_paired().is_some());

    // One more installed while the 32 run, named to come first in name order (the loader
    // applies the limit in name order): `module install` refuses it on hostA; on hostB its
    // files are put in place by hand and a reload (`module remove` of the refused m33) makes
    // the daemon refuse it, not one of the running modules.
    let late = ModuleSpec::new("a00", MODULES + 2).timeout("2s");
    let src = pair.lab.dir().join("a00-src");
    pair.write_module(&src, &late);
    let out = pair.exec(HOSTS[0], &["module", "install", src.to_str().unwrap(), "--name", "a00"]);
    assert!(!out.status.success(), "installing a 33rd module while 32 run: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("32 mirror modules"), "{}", text(&out));
    assert!(!pair.lab.host_dir(HOSTS[0]).join("etc/modules/a00").exists(), "the refused a00 stays installed");

    pair.write_module(&pair.lab.host_dir(HOSTS[1]).join("etc/modules/a00"), &late);
    pair.run(HOSTS[1], &["module", "remove", refused]);
    let list: Vec<Value> = serde_json::from_str(&pair.run(HOSTS[1], &["status", "--json"])).unwrap();
    let shown: Vec<&str> = list.iter().filter_map(|v| v["name"].as_str()).collect();
    let mut unique = shown.clone();
    unique.dedup();
    assert_eq!(shown, unique, "a module is listed twice");
    let a00 = list.iter().find(|v| v["name"] == "a00").expect("a00 is listed");
    assert!(a00["status"].is_null(), "a00 runs: {a00}");
    assert!(a00["error"].as_str().unwrap_or_default().contains("32 mirror modules"), "{a00}");
    for m in running {
        let v = list.iter().find(|v| v["name"] == m.as_str()).unwrap();
        assert!(v["error"].is_null() && !v["status"].is_null(), "{m} after the reload: {v}");
    }
    hold("the 32 modules to stay PRIM/SECOND", HOLD, || all_paired().is_some());
}
