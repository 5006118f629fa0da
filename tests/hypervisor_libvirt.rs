//! The libvirt driver against libvirt's built-in `test:///default` driver (no daemon; it has a
//! running persistent domain "test"). Connections open at the same time share that driver's
//! state, so only `lifecycle_of_the_test_domain` touches "test"; the others use their own names.

use std::time::Duration;

use hamirror::hypervisor::libvirt::Libvirt;
use hamirror::hypervisor::{connect, DomainState, HvError, Hypervisor, StopOutcome};

const TEST_URI: &str = "test:///default";

fn domain_xml(name: &str) -> String {
    format!(
        "<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type></os>\
         <devices><disk type='file' device='disk'><source file='/var/lib/hamirror/{name}.qcow2'/>\
         <target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
}

#[test]
fn lifecycle_of_the_test_domain() {
    let hv = Libvirt::new(TEST_URI);
    assert_eq!(hv.uri(), TEST_URI);
    let list = hv.list().unwrap();
    let test = list.iter().find(|d| d.name == "test").expect("the test driver's domain is listed");
    assert_eq!(test.state, DomainState::Running);
    assert_eq!(hv.state("test").unwrap(), DomainState::Running);

    assert_eq!(hv.shutdown("test", Duration::from_secs(5)).unwrap(), StopOutcome::ShutDown);
    assert!(matches!(hv.state("test").unwrap(), DomainState::ShutOff { .. }));
    assert_eq!(hv.shutdown("test", Duration::from_secs(5)).unwrap(), StopOutcome::AlreadyOff);

    hv.start("test").unwrap();
    assert_eq!(hv.state("test").unwrap(), DomainState::Running);
    hv.start("test").unwrap(); // already running: Ok

    hv.destroy("test").unwrap();
    assert_eq!(hv.state("test").unwrap(), DomainState::ShutOff { reason: "destroyed".into() });
    hv.destroy("test").unwrap(); // not running: Ok

    let before = hv.autostart("test").unwrap();
    hv.set_autostart("test", !before).unwrap();
    assert_eq!(hv.autostart("test").unwrap(), !before);
    hv.set_autostart("test", before).unwrap();
    assert_eq!(hv.autostart("test").unwrap(), before);

    hv.start("test").unwrap();
    assert_eq!(hv.state("test").unwrap(), DomainState::Running);
}

#[test]
fn define_round_trip_and_undefine() {
    let hv = connect(TEST_URI);
    let name = "hamirror-defined";
    assert_eq!(hv.state(name).unwrap(), DomainState::Undefined);
    hv.define(&domain_xml(name)).unwrap();
    assert!(matches!(hv.state(name).unwrap(), DomainState::ShutOff { .. }));
    assert!(hv.list().unwrap().iter().any(|d| d.name == name));

    let xml = hv.domain_xml(name).unwrap();
    assert!(xml.contains(&format!("<name>{name}</name>")), "{xml}");
    assert!(xml.contains("/var/lib/hamirror/hamirror-defined.qcow2"), "{xml}");
    // Defining the XML it gave back is accepted and changes nothing.
    hv.define(&xml).unwrap();
    assert_eq!(hv.domain_xml(name).unwrap(), xml);

    hv.start(name).unwrap();
    assert_eq!(hv.state(name).unwrap(), DomainState::Running);
    assert_eq!(hv.shutdown(name, Duration::from_secs(5)).unwrap(), StopOutcome::ShutDown);

    hv.undefine(name).unwrap();
    assert_eq!(hv.state(name).unwrap(), DomainState::Undefined);
    assert_eq!(hv.undefine(name), Err(HvError::NoDomain(name.into())));
}

#[test]
fn an_unknown_name_is_no_domain() {
    let hv = Libvirt::new(TEST_URI);
    let name = "hamirror-no-such-domain";
    assert_eq!(hv.state(name).unwrap(), DomainState::Undefined);
    let no = Err(HvError::NoDomain(name.into()));
    assert_eq!(hv.domain_xml(name), no.clone().map(|()| String::new()));
    assert_eq!(hv.start(name), no);
    assert_eq!(hv.destroy(name), no);
    assert_eq!(hv.undefine(name), no);
    assert_eq!(hv.set_autostart(name, true), no);
    assert_eq!(hv.autostart(name), no.clone().map(|()| false));
    assert_eq!(hv.shutdown(name, Duration::from_secs(1)), no.map(|()| StopOutcome::AlreadyOff));
}

#[test]
fn a_bad_definition_is_failed() {
    let hv = Libvirt::new(TEST_URI);
    match hv.define("<domain type='test'><name>x</name>") {
        Err(HvError::Failed(why)) => assert!(!why.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_absent_daemon_is_unreachable_never_a_dead_vm() {
    let uri = "qemu:///system?socket=/nonexistent/sock";
    let hv = connect(uri);
    for _ in 0..2 {
        match hv.state("vm1") {
            Err(HvError::Unreachable { uri: u, why }) => {
                assert_eq!(u, uri);
                assert!(why.contains("/nonexistent/sock"), "{why}");
            }
            other => panic!("an absent daemon must be Unreachable, got {other:?}"),
        }
    }
    assert!(matches!(hv.list(), Err(HvError::Unreachable { .. })));
    assert!(matches!(hv.shutdown("vm1", Duration::from_secs(1)), Err(HvError::Unreachable { .. })));
}
