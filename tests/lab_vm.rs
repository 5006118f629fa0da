//! VM modules end to end: real libvirtd per lab host, a real qemu guest under TCG whose disk
//! is a qcow2 image in a replicated directory (tools/guest, docs/guest.md). The guest writes a
//! counter to its disk (durably) before printing `counter N` on its serial console, so a
//! counter printed on one host must be found by the guest when it boots on the other.
//!
//! One test at a time: two hosts of TCG guests on a 2-vCPU machine are enough.

mod support;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::lab::wait_until;
use support::pair::*;

/// Where the guests live, private per host, the same path on both.
const VM_DIR: &str = "/srv/hamirror-vm";
/// Booting under TCG on a loaded machine, plus a full first copy.
const BOOT: Duration = Duration::from_secs(120);
const URI: &str = "qemu:///system";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn guest_tool() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/guest")
}

fn vm_pair() -> Pair {
    let out = std::process::Command::new(guest_tool()).arg("build").output().expect("run tools/guest build");
    assert!(out.status.success(), "tools/guest build: {}", text(&out));
    Pair::with_spec(false, |spec| spec.libvirt().bind(VM_DIR))
}

/// Creates guest `name` in hostA's `VM_DIR/name` and defines it in hostA's libvirt; with
/// `on_b`, also the empty directory and the definition on hostB (as `vm register` would).
fn create_guest(p: &Pair, name: &str, on_b: bool) -> String {
    let dir = format!("{VM_DIR}/{name}");
    p.lab.exec_ok(HOSTS[0], &[guest_tool().to_str().unwrap(), "create", &dir, name]);
    let xml_file = format!("{dir}/{name}.xml");
    let xml = std::fs::read_to_string(p.host_path(HOSTS[0], &xml_file)).expect("tools/guest create writes NAME.xml");
    p.lab.exec_ok(HOSTS[0], &["virsh", "-c", URI, "define", &xml_file]);
    if on_b {
        // Installed by hand, not by `vm register`, which creates it on the peer.
        p.lab.exec_ok(HOSTS[1], &["mkdir", "-p", &dir]);
        let tmp = "/tmp/hamirror-test-domain.xml";
        std::fs::write(p.lab.host_dir(HOSTS[1]).join("domain.xml"), &xml).unwrap();
        let outside = p.lab.host_dir(HOSTS[1]).join("domain.xml");
        p.lab.exec_ok(HOSTS[1], &["cp", outside.to_str().unwrap(), tmp]);
        p.lab.exec_ok(HOSTS[1], &["virsh", "-c", URI, "define", tmp]);
    }
    dir
}

/// libvirt's state of the domain on `host` ("running", "shut off"...); `None` if it cannot say.
fn domstate(p: &Pair, host: &str, name: &str) -> Option<String> {
    let out = p.lab.exec(host, &["virsh", "-c", URI, "domstate", name]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What the guest printed on `host`'s serial console.
fn console(p: &Pair, host: &str, name: &str) -> String {
    let out = p.lab.exec(host, &["cat", &format!("/var/log/libvirt/qemu/{name}-console.log")]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The counters in a console text: every `booted counter=N` and `counter N`, in order.
fn counters(text: &str) -> Vec<(bool, u64)> {
    text.lines()
        .filter_map(|l| {
            if let Some(at) = l.find("booted counter=") {
                l[at + 15..].trim().parse().ok().map(|n| (true, n))
            } else {
                l.trim().strip_prefix("counter ").and_then(|n| n.trim().parse().ok()).map(|n| (false, n))
            }
        })
        .collect()
}

/// The last counter printed on `host` (booted or running).
fn last_counter(p: &Pair, host: &str, name: &str) -> Option<u64> {
    counters(&console(p, host, name)).last().map(|(_, n)| *n)
}

/// Waits until the guest on `host` has booted (its latest boot) and printed `more` counters
/// since; returns the counter it booted with.
fn wait_guest(p: &Pair, host: &str, name: &str, boots: usize, more: usize) -> u64 {
    wait_until(&format!("guest {name} boot {boots} on {host} prints {more} counters"), BOOT, || {
        let c = counters(&console(p, host, name));
        let booted: Vec<usize> = c.iter().enumerate().filter(|(_, (b, _))| *b).map(|(i, _)| i).collect();
        let at = *booted.get(boots - 1)?;
        (c.len() - at > more).then_some(c[at].1)
    })
}

fn qemu_pid(p: &Pair, host: &str, name: &str) -> Option<u32> {
    let out = p.lab.exec(host, &["pgrep", "-f", &format!("guest={name}[, ]")]);
    String::from_utf8_lossy(&out.stdout).lines().next().and_then(|l| l.trim().parse().ok())
}

fn vm_module(name: &str, id: u16, maxloop: u32) -> ModuleSpec {
    ModuleSpec::new(name, id).vm(name, &format!("{VM_DIR}/{name}")).maxloop(maxloop).start_timeout("60s")
}

/// A pair with guest `name` protected by a module installed by hand (not registered): hostA
/// primary with the guest counting there, hostB secondary in sync.
fn running_vm(name: &str, id: u16, maxloop: u32) -> Pair {
    let p = vm_pair();
    create_guest(&p, name, true);
    p.install(&vm_module(name, id, maxloop));
    p.start_daemons();
    p.run(HOSTS[0], &["start", name]);
    wait_until(&format!("{name} primary on hostA"), BOOT, || {
        is_primary(p.settled(HOSTS[0], name).as_deref()).then_some(())
    });
    p.run(HOSTS[1], &["start", name]);
    p.wait_states(name, (HOSTS[0], "PRIM"), (HOSTS[1], "SECOND"), BOOT);
    wait_guest(&p, HOSTS[0], name, 1, 2);
    p
}

// `vm register` on hostA makes the module on both hosts and starts it; the VM runs on hostA.
// Power hostA off: the VM boots on hostB from its replicated disk with its counter intact.
// hostA comes back as secondary; a planned swap shuts the VM down on hostB before it starts
// on hostA, and it never runs on both.
#[test]
fn register_failover_failback_swap() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let p = vm_pair();
    create_guest(&p, "g1", false);
    p.start_daemons();
    p.modules.borrow_mut().push("g1".into());

    let dry = p.run(HOSTS[0], &["vm", "register", "g1", "--dry-run"]);
    assert!(dry.contains(&format!("{VM_DIR}/g1")) && dry.contains("nothing was changed"), "{dry}");
    assert_eq!(domstate(&p, HOSTS[1], "g1"), None, "a dry run defined the domain on hostB");

    let out = p.run(HOSTS[0], &["vm", "register", "g1", "--pulse", "200ms", "--timeout", "1s"]);
    assert!(out.contains("defined domain g1 on hostB"), "{out}");
    assert!(out.contains("installed module g1"), "{out}");
    p.wait_states("g1", (HOSTS[0], "PRIM"), (HOSTS[1], "SECOND"), BOOT);
    assert_eq!(domstate(&p, HOSTS[1], "g1").as_deref(), Some("shut off"));
    wait_guest(&p, HOSTS[0], "g1", 1, 5);
    // Registering again changes nothing and says so.
    let again = p.run(HOSTS[0], &["vm", "register", "g1", "--pulse", "200ms", "--timeout", "1s"]);
    assert!(again.contains("left as it is"), "{again}");
    assert!(is_primary(p.settled(HOSTS[0], "g1").as_deref()));

    // Failover.
    let before = last_counter(&p, HOSTS[0], "g1").unwrap();
    p.poweroff(HOSTS[0]);
    wait_until("g1 ALONE on hostB", DEADLINE, || (p.settled(HOSTS[1], "g1").as_deref() == Some("ALONE")).then_some(()));
    assert_eq!(domstate(&p, HOSTS[1], "g1").as_deref(), Some("running"));
    let booted_b = wait_guest(&p, HOSTS[1], "g1", 1, 3);
    assert!(booted_b >= before, "the guest booted on hostB with counter {booted_b}, hostA had printed {before}");

    // Failback: hostA returns as secondary, in sync.
    p.lab.poweron(HOSTS[0]);
    // The module resumes by itself: it was running when the power went.
    p.start_daemon(HOSTS[0]);
    p.wait_states("g1", (HOSTS[1], "PRIM"), (HOSTS[0], "SECOND"), BOOT);
    let printed_a = last_counter(&p, HOSTS[0], "g1").unwrap();
    assert!(booted_b >= printed_a, "hostA printed counter {printed_a} that hostB's boot ({booted_b}) did not find");
    assert_eq!(domstate(&p, HOSTS[0], "g1").as_deref(), Some("shut off"));

    // Planned swap back to hostA: never running on both.
    let boots_a = counters(&console(&p, HOSTS[0], "g1")).iter().filter(|(b, _)| *b).count();
    p.run(HOSTS[1], &["swap", "g1"]);
    let start = Instant::now();
    loop {
        let a = domstate(&p, HOSTS[0], "g1");
        let b = domstate(&p, HOSTS[1], "g1");
        assert!(
            !(a.as_deref() == Some("running") && b.as_deref() == Some("running")),
            "g1 runs on both hosts during the swap"
        );
        if p.settled(HOSTS[0], "g1").as_deref() == Some("PRIM")
            && p.settled(HOSTS[1], "g1").as_deref() == Some("SECOND")
        {
            break;
        }
        assert!(start.elapsed() < BOOT, "the swap did not finish");
    }
    let last_b = last_counter(&p, HOSTS[1], "g1").unwrap();
    let booted_a = wait_guest(&p, HOSTS[0], "g1", boots_a + 1, 2);
    assert!(booted_a >= last_b, "the guest booted on hostA with {booted_a}, hostB had printed {last_b}");
    assert_eq!(domstate(&p, HOSTS[1], "g1").as_deref(), Some("shut off"));

    // Unregister: refused while the module runs; once stopped on both, it leaves both hosts,
    // the domain stays defined here only, the disk stays.
    let out = p.exec(HOSTS[0], &["vm", "unregister", "g1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("stop it on both hosts first"), "{}", text(&out));
    p.run(HOSTS[1], &["stop", "g1"]);
    p.run(HOSTS[0], &["stop", "g1"]);
    p.wait_states("g1", (HOSTS[0], "STOP"), (HOSTS[1], "STOP"), DEADLINE);
    let out = p.run(HOSTS[0], &["vm", "unregister", "g1"]);
    assert!(out.contains("removed module g1 from hostB"), "{out}");
    for h in HOSTS {
        let list = p.run(h, &["module", "list"]);
        assert!(!list.contains("g1"), "module g1 is still installed on {h}: {list}");
    }
    assert_eq!(domstate(&p, HOSTS[1], "g1"), None, "the domain is still defined on hostB");
    assert_eq!(domstate(&p, HOSTS[0], "g1").as_deref(), Some("shut off"));
    assert!(p.host_path(HOSTS[0], &format!("{VM_DIR}/g1/disk.qcow2")).exists());
}

// A domain that does not exist, and a domain that cannot be protected (its disk is a raw
// block device), are refused with one sentence; nothing is installed anywhere.
#[test]
fn register_refuses_what_it_cannot_protect() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let p = vm_pair();
    p.start_daemons();
    let out = p.exec(HOSTS[0], &["vm", "register", "nosuch"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "hamirror: cannot read domain nosuch: there is no domain named nosuch"
    );
    let xml = "<domain type='qemu'><name>blk</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>\
               <devices><disk type='block' device='disk'><source dev='/dev/loop7'/><target dev='vda' bus='virtio'/>\
               </disk></devices></domain>";
    std::fs::write(p.lab.host_dir(HOSTS[0]).join("blk.xml"), xml).unwrap();
    let file = p.lab.host_dir(HOSTS[0]).join("blk.xml");
    p.lab.exec_ok(HOSTS[0], &["virsh", "-c", URI, "define", file.to_str().unwrap()]);
    let out = p.exec(HOSTS[0], &["vm", "register", "blk"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("block device"), "{}", text(&out));
    for h in HOSTS {
        assert!(!p.run(h, &["module", "list"]).contains("blk"), "a refused register installed a module on {h}");
    }
    assert_eq!(domstate(&p, HOSTS[1], "blk"), None, "a refused register defined the domain on hostB");
}

// A guest whose qemu dies is restarted in place by the VM checker; once `maxloop` restarts
// are used up, the next crash fails the VM over to hostB.
#[test]
fn crashed_guest_restarts_then_fails_over() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let p = running_vm("g2", 2, 1);

    let first = qemu_pid(&p, HOSTS[0], "g2").expect("qemu of g2 runs on hostA");
    p.lab.exec_ok(HOSTS[0], &["kill", "-9", &first.to_string()]);
    let second =
        wait_until("g2 restarted in place on hostA", BOOT, || qemu_pid(&p, HOSTS[0], "g2").filter(|pid| *pid != first));
    assert!(is_primary(p.state(HOSTS[0], "g2").as_deref()), "a restart in place moved the module");
    wait_guest(&p, HOSTS[0], "g2", 2, 2);

    // maxloop="1": the next crash goes over to hostB.
    let before = last_counter(&p, HOSTS[0], "g2").unwrap();
    p.lab.exec_ok(HOSTS[0], &["kill", "-9", &second.to_string()]);
    wait_until("g2 primary on hostB", BOOT, || is_primary(p.settled(HOSTS[1], "g2").as_deref()).then_some(()));
    assert_eq!(domstate(&p, HOSTS[1], "g2").as_deref(), Some("running"));
    let booted = wait_guest(&p, HOSTS[1], "g2", 1, 2);
    assert!(booted >= before, "the guest booted on hostB with {booted}, hostA had printed {before}");
    assert_ne!(domstate(&p, HOSTS[0], "g2").as_deref(), Some("running"));
    assert!(p.module_log(HOSTS[0], "g2").contains("maxloop"), "{}", p.module_log(HOSTS[0], "g2"));
}

// Restarting libvirtd on the primary is not a VM failure: the same qemu keeps running, the
// module stays primary, nothing is restarted.
#[test]
fn libvirtd_restart_does_not_fail_over() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let p = running_vm("g3", 3, 3);
    let pid = qemu_pid(&p, HOSTS[0], "g3").unwrap();
    let log_before = p.module_log(HOSTS[0], "g3").len();

    p.lab.libvirtd(HOSTS[0], "stop");
    // Several checker intervals with libvirt gone: unknown is not dead.
    let gone = Instant::now();
    wait_until("a few checker intervals pass", DEADLINE, || {
        (p.module_log(HOSTS[0], "g3")[log_before..].contains("does not answer") && gone.elapsed() > HOLD).then_some(())
    });
    p.lab.libvirtd(HOSTS[0], "start");
    wait_until("libvirt answers again on hostA", DEADLINE, || {
        (domstate(&p, HOSTS[0], "g3").as_deref() == Some("running")).then_some(())
    });
    // The daemon's connection comes back by itself.
    wait_until("the VM checker reconnects", DEADLINE, || {
        p.module_log(HOSTS[0], "g3")[log_before..].contains("the hypervisor answers again").then_some(())
    });
    let hold = Instant::now();
    while hold.elapsed() < HOLD {
        assert_eq!(p.settled(HOSTS[0], "g3").as_deref(), Some("PRIM"));
        assert_eq!(p.settled(HOSTS[1], "g3").as_deref(), Some("SECOND"));
    }
    assert_eq!(qemu_pid(&p, HOSTS[0], "g3"), Some(pid), "the guest's qemu was replaced");
    let log = &p.module_log(HOSTS[0], "g3")[log_before..];
    assert!(!log.contains("asking for restart"), "the VM checker failed the VM:\n{log}");

    // A definition changed on the primary reaches the peer's libvirt.
    p.lab.exec_ok(HOSTS[0], &["virsh", "-c", URI, "desc", "g3", "--config", "--new-desc", "edited on hostA"]);
    wait_until("the edited definition defined on hostB", DEADLINE, || {
        let out = p.lab.exec(HOSTS[1], &["virsh", "-c", URI, "desc", "g3", "--config"]);
        String::from_utf8_lossy(&out.stdout).contains("edited on hostA").then_some(())
    });
}

// A VM started by hand on hostB (outside hamirror) is never started on hostA too: the module's
// start asks hostB's daemon first, fails, and says why.
#[test]
fn never_started_while_running_on_the_peer() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let p = vm_pair();
    let dir = create_guest(&p, "g5", true);
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(p.host_path(HOSTS[0], &dir))
        .arg(p.host_path(HOSTS[1], VM_DIR))
        .status()
        .unwrap();
    assert!(copied.success());
    p.lab.exec_ok(HOSTS[1], &["virsh", "-c", URI, "start", "g5"]);
    p.install(&vm_module("g5", 5, 3));
    p.start_daemons();
    p.run(HOSTS[0], &["start", "g5"]);
    wait_until("hostA's start of g5 refused", BOOT, || {
        p.module_log(HOSTS[0], "g5").contains("g5 is running on hostB: it is not started here").then_some(())
    });
    assert_eq!(domstate(&p, HOSTS[0], "g5").as_deref(), Some("shut off"), "g5 runs on both hosts");
    assert_eq!(domstate(&p, HOSTS[1], "g5").as_deref(), Some("running"));
}
