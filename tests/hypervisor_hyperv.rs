//! The Hyper-V driver against recorded PowerShell outputs (tests/fixtures/hyperv/): there is
//! no Windows here. The fixtures are what `Get-VM | Select-Object ... | ConvertTo-Json` prints:
//! Windows PowerShell 5.1 (enums as integers, `'<>&` as \u escapes) and pwsh -EnumsAsStrings.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hamirror::hypervisor::hyperv::{quote, HyperV, PowerShell};
use hamirror::hypervisor::{connect, DomainState, DomainSummary, HvError, Hypervisor, StopOutcome};

/// A PowerShell that answers a script with the fixture of the first rule whose needle the
/// script contains (an `err:` fixture is returned as the error), and records every script.
struct Recorded {
    rules: Vec<(&'static str, &'static str)>,
    scripts: Arc<Mutex<Vec<String>>>,
}

impl PowerShell for Recorded {
    fn run(&self, script: &str) -> Result<String, String> {
        self.scripts.lock().unwrap().push(script.to_string());
        let (_, fixture) = self
            .rules
            .iter()
            .find(|(needle, _)| script.contains(needle))
            .unwrap_or_else(|| panic!("no recorded output for script {script}"));
        let (fixture, is_err) = match fixture.strip_prefix("err:") {
            Some(fixture) => (fixture, true),
            None => (*fixture, false),
        };
        let text = std::fs::read_to_string(Path::new("tests/fixtures/hyperv").join(fixture)).unwrap();
        if is_err {
            Err(text)
        } else {
            Ok(text)
        }
    }
}

/// A driver answering with `rules`, and the scripts it ran.
fn hyperv(rules: Vec<(&'static str, &'static str)>) -> (HyperV, Arc<Mutex<Vec<String>>>) {
    let scripts = Arc::new(Mutex::new(Vec::new()));
    (HyperV::new("hyperv:///local", Box::new(Recorded { rules, scripts: scripts.clone() })), scripts)
}

fn ran(scripts: &Arc<Mutex<Vec<String>>>, needle: &str) -> usize {
    scripts.lock().unwrap().iter().filter(|s| s.contains(needle)).count()
}

const FIND: &str = "Where-Object";

#[test]
fn state_of_a_running_vm_ps51() {
    let (hv, scripts) = hyperv(vec![(FIND, "get-vm-running.json")]);
    assert_eq!(hv.state("web01").unwrap(), DomainState::Running);
    let script = scripts.lock().unwrap()[0].clone();
    assert!(script.contains("Get-VM | Where-Object { $_.Name -eq 'web01' }"), "{script}");
    assert!(script.contains("| ConvertTo-Json -Depth 4 -Compress"), "{script}");
    assert!(script.contains("$ErrorActionPreference = 'Stop'"), "{script}");
    assert!(hv.autostart("web01").unwrap());
}

#[test]
fn state_of_an_off_vm_ps51_integer_enums() {
    let (hv, _) = hyperv(vec![(FIND, "get-vm-off-ps51.json")]);
    assert_eq!(hv.state("web01").unwrap(), DomainState::ShutOff { reason: "off".into() });
    assert!(!hv.autostart("web01").unwrap());
}

fn summary(name: &str, state: DomainState) -> DomainSummary {
    DomainSummary { name: name.into(), state }
}

#[test]
fn list_with_integer_states() {
    let (hv, scripts) = hyperv(vec![("Get-VM", "get-vm-list.json")]);
    let list = hv.list().unwrap();
    assert_eq!(
        list[..6],
        [
            summary("web01", DomainState::Running),
            summary("db01", DomainState::ShutOff { reason: "off".into() }),
            summary("archive", DomainState::Suspended),
            summary("paused", DomainState::Paused { io_error: false, reason: "paused".into() }),
            summary("booting", DomainState::Starting),
            summary("stopping", DomainState::ShuttingDown),
        ]
    );
    // A critical state's number differs between Windows versions: alive, with an I/O error.
    assert!(
        matches!(&list[6], DomainSummary { name, state: DomainState::Paused { io_error: true, .. } } if name == "critical")
    );
    assert_eq!(list.len(), 7);
    assert!(!scripts.lock().unwrap()[0].contains(FIND));
}

#[test]
fn list_with_string_states_from_pwsh() {
    let (hv, _) = hyperv(vec![("Get-VM", "get-vm-pwsh-strings.json")]);
    let list = hv.list().unwrap();
    assert_eq!(list.len(), 5);
    assert_eq!(list[0], summary("web01", DomainState::Running));
    assert_eq!(list[1], summary("db01", DomainState::ShutOff { reason: "off".into() }));
    assert_eq!(list[2], summary("archive", DomainState::Suspended));
    assert!(matches!(&list[3].state, DomainState::Paused { io_error: true, .. }));
    assert_eq!(list[4], summary("booting", DomainState::Starting));
}

#[test]
fn empty_output_is_no_vm() {
    let (hv, scripts) = hyperv(vec![(FIND, "empty.txt")]);
    assert_eq!(hv.state("ghost").unwrap(), DomainState::Undefined);
    let no = Err(HvError::NoDomain("ghost".into()));
    assert_eq!(hv.start("ghost"), no);
    assert_eq!(hv.destroy("ghost"), no);
    assert_eq!(hv.undefine("ghost"), no);
    assert_eq!(hv.domain_xml("ghost"), no.clone().map(|()| String::new()));
    assert_eq!(hv.shutdown("ghost", Duration::from_secs(1)), no.map(|()| StopOutcome::AlreadyOff));
    // Nothing but the lookups ran.
    assert_eq!(ran(&scripts, FIND), scripts.lock().unwrap().len());
    let (hv, _) = hyperv(vec![("Get-VM", "empty.txt")]);
    assert_eq!(hv.list().unwrap(), []);
}

#[test]
fn an_error_is_failed_in_one_sentence_never_a_dead_vm() {
    let (hv, _) = hyperv(vec![(FIND, "err:error-stderr.txt"), ("Get-VM", "err:error-stderr.txt")]);
    let expected = HvError::Failed(
        "Hyper-V encountered an error trying to access an object on computer 'HV01' because the object was not found."
            .into(),
    );
    assert_eq!(hv.state("web01"), Err(expected.clone()));
    assert_eq!(hv.list(), Err(expected.clone()));
    assert_eq!(hv.start("web01"), Err(expected));
}

#[test]
fn garbage_output_is_failed() {
    let (hv, _) = hyperv(vec![(FIND, "error-stderr.txt")]);
    assert!(matches!(hv.state("web01"), Err(HvError::Failed(why)) if why.contains("unexpected output")));
}

#[test]
fn names_are_quoted_for_powershell() {
    assert_eq!(quote("web01"), "'web01'");
    assert_eq!(quote("O'Brien's VM"), "'O''Brien''s VM'");
    assert_eq!(quote("a\u{2019}b"), "'a\u{2019}\u{2019}b'");
    assert_eq!(quote("$(Remove-Item C:\\)"), "'$(Remove-Item C:\\)'");

    let (hv, scripts) = hyperv(vec![(FIND, "get-vm-quote.json")]);
    assert_eq!(hv.state("O'Brien's VM").unwrap(), DomainState::ShutOff { reason: "off".into() });
    assert_eq!(ran(&scripts, "$_.Name -eq 'O''Brien''s VM'"), 1);
}

#[test]
fn domain_xml_is_synthesised_from_get_vm_and_its_disks() {
    let (hv, scripts) =
        hyperv(vec![("Get-VMHardDiskDrive", "get-vmharddiskdrive.json"), (FIND, "get-vm-running.json")]);
    let xml = hv.domain_xml("web01").unwrap();
    assert!(
        xml.starts_with(r#"<domain type="hyperv"><name>web01</name><uuid>4f3c2a1e-8b7d-4e6f-9a0b-1c2d3e4f5a6b</uuid>"#),
        "{xml}"
    );
    assert!(
        xml.contains(
            r#"<metadata><hamirror:hyperv xmlns:hamirror="https://hamirror.dev/xmlns/hyperv/1" config="C:\ProgramData\Microsoft\Windows\Hyper-V\Virtual Machines\4F3C2A1E-8B7D-4E6F-9A0B-1C2D3E4F5A6B.vmcx"/></metadata>"#
        ),
        "{xml}"
    );
    assert!(
        xml.contains(
            r#"<disk type="file" device="disk"><driver type="vhdx"/><source file="C:\Hyper-V\Virtual Hard Disks\web01 &amp; &lt;data&gt;.vhdx"/></disk>"#
        ),
        "{xml}"
    );
    assert!(
        xml.contains(r#"<driver type="vpc"/><source file="C:\Hyper-V\Virtual Hard Disks\web01-legacy.vhd"/>"#),
        "{xml}"
    );
    assert!(xml.contains(r#"<disk type="block" device="disk"><source dev="\\.\PhysicalDrive2"/></disk>"#), "{xml}");
    assert!(xml.ends_with("</devices></domain>"), "{xml}");
    assert_eq!(ran(&scripts, "(Get-VM -Id '4f3c2a1e-8b7d-4e6f-9a0b-1c2d3e4f5a6b') | Get-VMHardDiskDrive"), 1);
}

#[test]
fn define_imports_the_configuration_unless_registered() {
    let (hv, _) = hyperv(vec![("Get-VMHardDiskDrive", "get-vmharddiskdrive.json"), (FIND, "get-vm-running.json")]);
    let xml = hv.domain_xml("web01").unwrap();

    // Not registered here: Import-VM -Register from the configuration file.
    let (hv, scripts) = hyperv(vec![("Import-VM", "empty.txt"), ("Get-VM", "get-vm-pwsh-strings.json")]);
    let other = xml.replace("4f3c2a1e-8b7d-4e6f-9a0b-1c2d3e4f5a6b", "9f9f9f9f-0000-4000-8000-000000000001");
    hv.define(&other).unwrap();
    assert_eq!(
        ran(
            &scripts,
            r"Import-VM -Path 'C:\ProgramData\Microsoft\Windows\Hyper-V\Virtual Machines\4F3C2A1E-8B7D-4E6F-9A0B-1C2D3E4F5A6B.vmcx' -Register"
        ),
        1
    );

    // Already registered (same id): nothing to do.
    let (hv, scripts) = hyperv(vec![("Import-VM", "empty.txt"), ("Get-VM", "get-vm-list.json")]);
    hv.define(&xml).unwrap();
    assert_eq!(ran(&scripts, "Import-VM"), 0);

    // A libvirt definition cannot be imported.
    assert!(matches!(hv.define("<domain type='kvm'><name>x</name><uuid>1</uuid></domain>"), Err(HvError::Failed(_))));
}

#[test]
fn shutdown_that_times_out_turns_the_vm_off() {
    let (hv, scripts) =
        hyperv(vec![("-TurnOff", "empty.txt"), ("Start-Sleep", "get-vm-running.json"), (FIND, "get-vm-running.json")]);
    assert_eq!(hv.shutdown("web01", Duration::from_millis(300)).unwrap(), StopOutcome::Destroyed);
    let scripts = scripts.lock().unwrap();
    assert!(scripts[1].contains("Stop-VM -VM (Get-VM -Id '4f3c2a1e-8b7d-4e6f-9a0b-1c2d3e4f5a6b') -Force -AsJob"));
    assert!(scripts[1].contains("-ne 'Off'"));
    let last = scripts.last().unwrap();
    assert!(last.contains("Stop-VM -VM (Get-VM -Id '4f3c2a1e-8b7d-4e6f-9a0b-1c2d3e4f5a6b') -TurnOff -Force"), "{last}");
    assert_eq!(scripts.iter().filter(|s| s.contains("-TurnOff")).count(), 1);
}

#[test]
fn shutdown_that_completes() {
    let (hv, scripts) =
        hyperv(vec![("-TurnOff", "empty.txt"), ("Start-Sleep", "get-vm-off-ps51.json"), (FIND, "get-vm-running.json")]);
    assert_eq!(hv.shutdown("web01", Duration::from_secs(60)).unwrap(), StopOutcome::ShutDown);
    assert_eq!(ran(&scripts, "-TurnOff"), 0);

    let (hv, scripts) = hyperv(vec![(FIND, "get-vm-off-ps51.json")]);
    assert_eq!(hv.shutdown("web01", Duration::from_secs(60)).unwrap(), StopOutcome::AlreadyOff);
    assert_eq!(ran(&scripts, "Stop-VM"), 0);
}

#[test]
fn start_destroy_undefine_and_autostart_commands() {
    let (hv, scripts) = hyperv(vec![(FIND, "get-vm-off-ps51.json"), ("-VM", "empty.txt")]);
    hv.start("web01").unwrap();
    hv.set_autostart("web01", false).unwrap();
    hv.set_autostart("web01", true).unwrap();
    hv.undefine("web01").unwrap();
    hv.destroy("web01").unwrap(); // off: nothing to do
    let id = "(Get-VM -Id '4f3c2a1e-8b7d-4e6f-9a0b-1c2d3e4f5a6b')";
    assert_eq!(ran(&scripts, &format!("Start-VM -VM {id}")), 1);
    assert_eq!(ran(&scripts, &format!("Set-VM -VM {id} -AutomaticStartAction Nothing")), 1);
    assert_eq!(ran(&scripts, &format!("Set-VM -VM {id} -AutomaticStartAction StartIfRunning")), 1);
    assert_eq!(ran(&scripts, &format!("Remove-VM -VM {id} -Force")), 1);
    assert_eq!(ran(&scripts, "Stop-VM"), 0);

    let (hv, scripts) = hyperv(vec![(FIND, "get-vm-running.json"), ("-VM", "empty.txt")]);
    hv.start("web01").unwrap(); // running: nothing to do
    hv.destroy("web01").unwrap();
    assert_eq!(ran(&scripts, "Start-VM"), 0);
    assert_eq!(ran(&scripts, &format!("Stop-VM -VM {id} -TurnOff -Force")), 1);
}

#[test]
fn connect_picks_the_driver_by_scheme_without_running_anything() {
    assert_eq!(connect("hyperv:///local").uri(), "hyperv:///local");
    assert_eq!(connect("HyperV:///local").uri(), "HyperV:///local");
    assert_eq!(connect("qemu:///system").uri(), "qemu:///system");
}
