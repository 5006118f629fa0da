//! The Hyper-V driver: Hyper-V's PowerShell cmdlets (`Get-VM`, `Start-VM`, `Stop-VM`, ...),
//! their output read as JSON.
//!
//! A VM is found by exact name (`Where-Object Name -eq`, never `Get-VM -Name`, which takes
//! wildcards and whose "not found" is an error indistinguishable from a broken Hyper-V), then
//! acted on by its id. An empty answer from a successful `Get-VM` is "no such VM"; any error is
//! [`HvError::Failed`], never a VM state.
//!
//! Hyper-V has no XML definition: [`Hypervisor::domain_xml`] synthesises a small libvirt-like
//! document (name, uuid, configuration file, disks) so disk discovery works the same for both
//! hypervisors, and [`Hypervisor::define`] imports the configuration file it names.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use quick_xml::events::{BytesStart, BytesText, Event};
use quick_xml::name::ResolveResult;
use quick_xml::{NsReader, Writer};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{DomainState, DomainSummary, HvError, Hypervisor, StopOutcome};

/// The namespace of the `<hamirror:hyperv config='...'/>` element in a synthesised definition.
pub const XML_NAMESPACE: &str = "https://hamirror.dev/xmlns/hyperv/1";

/// The VM properties every query selects.
const VM_FIELDS: &str = "Name, Id, State, Status, Path, ConfigurationLocation, AutomaticStartAction";

/// The longest one shutdown script waits inside PowerShell, under [`SystemPowerShell`]'s limit.
const STOP_WAIT_CHUNK: Duration = Duration::from_secs(60);

/// Runs one PowerShell script.
pub trait PowerShell: Send + Sync {
    /// Runs `script`; its standard output, or a one-sentence error (from its standard error or
    /// its exit status).
    fn run(&self, script: &str) -> Result<String, String>;
}

/// The real runner: `powershell.exe -NoProfile -NonInteractive -Command -` (`pwsh` where
/// powershell.exe is not found), the script on its standard input.
pub struct SystemPowerShell {
    limit: Duration,
}

impl SystemPowerShell {
    /// A runner that kills a script still running after 2 minutes (a hung Hyper-V service).
    pub fn new() -> SystemPowerShell {
        SystemPowerShell { limit: Duration::from_secs(120) }
    }

    fn spawn(program: &str) -> std::io::Result<std::process::Child> {
        Command::new(program)
            .args(["-NoProfile", "-NonInteractive", "-Command", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    }
}

impl Default for SystemPowerShell {
    fn default() -> Self {
        SystemPowerShell::new()
    }
}

impl PowerShell for SystemPowerShell {
    fn run(&self, script: &str) -> Result<String, String> {
        let mut child = match SystemPowerShell::spawn("powershell.exe") {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SystemPowerShell::spawn("pwsh"),
            other => other,
        }
        .map_err(|e| format!("cannot run PowerShell (powershell.exe or pwsh): {e}"))?;
        let mut stdin = child.stdin.take().ok_or("PowerShell has no standard input")?;
        let stdout = child.stdout.take().ok_or("PowerShell has no standard output")?;
        let stderr = child.stderr.take().ok_or("PowerShell has no standard error")?;
        let read_all = |mut pipe: Box<dyn Read + Send>| {
            thread::spawn(move || {
                let mut text = Vec::new();
                let _ = pipe.read_to_end(&mut text);
                String::from_utf8_lossy(&text).into_owned()
            })
        };
        let (out, err) = (read_all(Box::new(stdout)), read_all(Box::new(stderr)));
        let written = stdin.write_all(script.as_bytes());
        drop(stdin);
        let end = Instant::now() + self.limit;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < end => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("PowerShell did not finish within {} s", self.limit.as_secs()));
                }
                Err(e) => return Err(format!("cannot wait for PowerShell: {e}")),
            }
        };
        let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
        if status.success() {
            written.map_err(|e| format!("cannot send the script to PowerShell: {e}"))?;
            Ok(out)
        } else {
            Err(first_line(&err).unwrap_or_else(|| format!("PowerShell failed ({status})")))
        }
    }
}

/// A Hyper-V host driven through PowerShell.
pub struct HyperV {
    uri: String,
    shell: Box<dyn PowerShell>,
}

/// One VM as `Get-VM | Select-Object ... | ConvertTo-Json` prints it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Vm {
    name: String,
    id: String,
    state: PsEnum,
    #[serde(default)]
    configuration_location: Option<String>,
    #[serde(default)]
    automatic_start_action: Option<PsEnum>,
}

/// An enum as ConvertTo-Json prints it: an integer (Windows PowerShell 5.1, pwsh by default)
/// or its name (pwsh with -EnumsAsStrings).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PsEnum {
    Int(i64),
    Name(String),
}

/// One disk as `Get-VMHardDiskDrive | Select-Object Path, DiskNumber` prints it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Disk {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    disk_number: Option<u32>,
}

/// ConvertTo-Json prints one object alone, several as an array.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    Many(Vec<T>),
    One(T),
}

impl HyperV {
    /// A driver for the Hyper-V host `uri` (for messages, e.g. `hyperv:///local`) that runs its
    /// scripts with `shell`. Runs nothing until the first call.
    pub fn new(uri: &str, shell: Box<dyn PowerShell>) -> HyperV {
        HyperV { uri: uri.to_string(), shell }
    }

    /// Runs `body` with errors stopping it and reported as one line on stderr.
    fn run(&self, body: &str) -> Result<String, HvError> {
        let script = format!(
            "$ErrorActionPreference = 'Stop'; [Console]::OutputEncoding = [Text.Encoding]::UTF8; \
             try {{ {body} }} catch {{ [Console]::Error.WriteLine($_.Exception.Message); exit 1 }}\n"
        );
        self.shell.run(&script).map_err(|e| {
            HvError::Failed(first_line(&e).unwrap_or_else(|| format!("PowerShell failed on {}", self.uri)))
        })
    }

    /// Runs `pipeline | ConvertTo-Json` and parses its output; empty output is no object.
    fn query<T: DeserializeOwned>(&self, pipeline: &str) -> Result<Vec<T>, HvError> {
        let out = self.run(&format!("{pipeline} | ConvertTo-Json -Depth 4 -Compress"))?;
        let out = out.trim().trim_start_matches('\u{feff}');
        if out.is_empty() {
            return Ok(Vec::new());
        }
        match serde_json::from_str(out) {
            Ok(OneOrMany::Many(all)) => Ok(all),
            Ok(OneOrMany::One(one)) => Ok(vec![one]),
            Err(e) => Err(HvError::Failed(format!("unexpected output from PowerShell ({e}): {}", clip(out)))),
        }
    }

    /// The VM named exactly `name`, if any.
    fn find(&self, name: &str) -> Result<Option<Vm>, HvError> {
        let mut vms: Vec<Vm> = self
            .query(&format!("Get-VM | Where-Object {{ $_.Name -eq {} }} | Select-Object {VM_FIELDS}", quote(name)))?;
        match vms.len() {
            0 | 1 => Ok(vms.pop()),
            n => Err(HvError::Failed(format!("{n} Hyper-V virtual machines are named {name}"))),
        }
    }

    /// The VM named `name`, or [`HvError::NoDomain`].
    fn get(&self, name: &str) -> Result<Vm, HvError> {
        self.find(name)?.ok_or_else(|| HvError::NoDomain(name.to_string()))
    }

    /// Powers the VM off at once.
    fn turn_off(&self, vm: &Vm) -> Result<(), HvError> {
        self.run(&format!("Stop-VM -VM {} -TurnOff -Force", by_id(vm))).map(drop)
    }

    /// The VM's state after `script` (which waits for it to be off); off when it is gone.
    fn state_after(&self, script: &str) -> Result<DomainState, HvError> {
        match self.query::<Vm>(script)?.pop() {
            Some(vm) => vm_state(&vm),
            None => Ok(DomainState::Undefined),
        }
    }
}

impl Hypervisor for HyperV {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn list(&self) -> Result<Vec<DomainSummary>, HvError> {
        self.query::<Vm>(&format!("Get-VM | Select-Object {VM_FIELDS}"))?
            .into_iter()
            .map(|vm| Ok(DomainSummary { state: vm_state(&vm)?, name: vm.name }))
            .collect()
    }

    fn state(&self, name: &str) -> Result<DomainState, HvError> {
        match self.find(name)? {
            Some(vm) => vm_state(&vm),
            None => Ok(DomainState::Undefined),
        }
    }

    fn domain_xml(&self, name: &str) -> Result<String, HvError> {
        let vm = self.get(name)?;
        let disks: Vec<Disk> =
            self.query(&format!("{} | Get-VMHardDiskDrive | Select-Object Path, DiskNumber", by_id(&vm)))?;
        synthesise_xml(&vm, &disks).map_err(|e| HvError::Failed(format!("cannot write the definition of {name}: {e}")))
    }

    fn define(&self, xml: &str) -> Result<(), HvError> {
        let (id, config) = parse_definition(xml).map_err(HvError::Failed)?;
        let registered: Vec<Vm> = self.query(&format!("Get-VM | Select-Object {VM_FIELDS}"))?;
        if registered.iter().any(|vm| vm.id.eq_ignore_ascii_case(&id)) {
            return Ok(());
        }
        self.run(&format!("Import-VM -Path {} -Register | Out-Null", quote(&config))).map(drop)
    }

    fn undefine(&self, name: &str) -> Result<(), HvError> {
        let vm = self.get(name)?;
        // Remove-VM deletes the VM's configuration from Hyper-V but keeps its VHDX files.
        self.run(&format!("Remove-VM -VM {} -Force", by_id(&vm))).map(drop)
    }

    fn start(&self, name: &str) -> Result<(), HvError> {
        let vm = self.get(name)?;
        if vm_state(&vm)? == DomainState::Running {
            return Ok(());
        }
        self.run(&format!("Start-VM -VM {}", by_id(&vm))).map(drop)
    }

    fn shutdown(&self, name: &str, timeout: Duration) -> Result<StopOutcome, HvError> {
        let end = Instant::now() + timeout;
        let vm = self.get(name)?;
        if !vm_state(&vm)?.is_active() {
            return Ok(StopOutcome::AlreadyOff);
        }
        // Stop-VM (graceful: the integration services' shutdown) runs as a job; the script
        // polls until the VM is off or its share of the timeout is spent, then prints the VM.
        let wait = |stop: &str| {
            let millis = end.saturating_duration_since(Instant::now()).min(STOP_WAIT_CHUNK).as_millis();
            format!(
                "{stop}$end = (Get-Date).AddMilliseconds({millis}); \
                 while ((Get-VM -Id {id}).State -ne 'Off' -and (Get-Date) -lt $end) {{ Start-Sleep -Milliseconds 100 }}; \
                 Get-VM -Id {id} | Select-Object {VM_FIELDS}",
                id = quote(&vm.id)
            )
        };
        let mut state = self.state_after(&wait(&format!("$job = Stop-VM -VM {} -Force -AsJob; ", by_id(&vm))))?;
        while state.is_active() && Instant::now() < end {
            state = self.state_after(&wait(""))?;
        }
        if !state.is_active() {
            return Ok(StopOutcome::ShutDown);
        }
        self.turn_off(&vm)?;
        Ok(StopOutcome::Destroyed)
    }

    fn destroy(&self, name: &str) -> Result<(), HvError> {
        let vm = self.get(name)?;
        if !vm_state(&vm)?.is_active() {
            return Ok(());
        }
        self.turn_off(&vm)
    }

    fn autostart(&self, name: &str) -> Result<bool, HvError> {
        let vm = self.get(name)?;
        Ok(match &vm.automatic_start_action {
            Some(PsEnum::Int(n)) => *n != 2,
            Some(PsEnum::Name(action)) => !action.eq_ignore_ascii_case("Nothing"),
            None => false,
        })
    }

    fn set_autostart(&self, name: &str, on: bool) -> Result<(), HvError> {
        let vm = self.get(name)?;
        let action = if on { "StartIfRunning" } else { "Nothing" };
        self.run(&format!("Set-VM -VM {} -AutomaticStartAction {action}", by_id(&vm))).map(drop)
    }
}

/// `s` as a PowerShell single-quoted string. PowerShell also takes the typographic single
/// quotes as quotes: every quote character is doubled.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if matches!(c, '\'' | '\u{2018}' | '\u{2019}' | '\u{201a}' | '\u{201b}') {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// The expression for `vm`, found again by its id.
fn by_id(vm: &Vm) -> String {
    format!("(Get-VM -Id {})", quote(&vm.id))
}

/// The first non-empty line of `text`, trimmed.
fn first_line(text: &str) -> Option<String> {
    text.lines().map(str::trim).find(|line| !line.is_empty()).map(str::to_string)
}

/// At most 200 characters of `text`, for a message.
fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

/// Hyper-V's VMState names and values (Microsoft.HyperV.PowerShell.VMState). The values from
/// 32783 on differ between Windows versions (Hibernated and ComponentServicing were inserted
/// before the critical states): an integer there is not trusted, see [`vm_state`].
const VM_STATES: [(i64, &str); 17] = [
    (1, "Other"),
    (2, "Running"),
    (3, "Off"),
    (4, "Stopping"),
    (6, "Saved"),
    (9, "Paused"),
    (10, "Starting"),
    (11, "Reset"),
    (32773, "Saving"),
    (32776, "Pausing"),
    (32777, "Resuming"),
    (32779, "FastSaved"),
    (32780, "FastSaving"),
    (32781, "ForceShutdown"),
    (32782, "ForceReboot"),
    (32783, "Hibernated"),
    (32784, "ComponentServicing"),
];

/// Maps Hyper-V's state of `vm`.
fn vm_state(vm: &Vm) -> Result<DomainState, HvError> {
    let unknown = |what: &dyn std::fmt::Display| HvError::Failed(format!("{}: unknown Hyper-V state {what}", vm.name));
    let name = match &vm.state {
        PsEnum::Name(name) => name.as_str(),
        // A "critical" state (its storage is not accessible) or one whose number this driver
        // cannot be sure of: alive as far as anyone knows, so never reported as off.
        PsEnum::Int(n) if *n >= 32783 => {
            return Ok(DomainState::Paused { io_error: true, reason: format!("Hyper-V state {n} (critical)") })
        }
        PsEnum::Int(n) => {
            VM_STATES.iter().find(|(value, _)| value == n).map(|(_, name)| *name).ok_or_else(|| unknown(n))?
        }
    };
    let (base, critical) = match name.strip_suffix("Critical") {
        Some(base) => (base, true),
        None => (name, false),
    };
    if critical && base != "Running" && base != "Paused" {
        // Off-Critical included: the storage is lost, nobody knows whether the VM is off.
        return Ok(DomainState::Paused { io_error: true, reason: format!("Hyper-V state {name}") });
    }
    Ok(match base {
        "Running" | "Reset" | "ForceReboot" | "Resuming" if !critical => DomainState::Running,
        "Running" | "Paused" => DomainState::Paused {
            io_error: critical,
            reason: if critical {
                format!("Hyper-V state {name}: its storage is not accessible")
            } else {
                "paused".into()
            },
        },
        "Pausing" => DomainState::Paused { io_error: false, reason: "pausing".into() },
        "Off" => DomainState::ShutOff { reason: "off".into() },
        "Stopping" | "ForceShutdown" => DomainState::ShuttingDown,
        "Saved" | "Saving" | "FastSaved" | "FastSaving" | "Hibernated" => DomainState::Suspended,
        "Starting" => DomainState::Starting,
        _ => return Err(unknown(&name)),
    })
}

/// The libvirt-like definition of `vm` with its `disks`.
fn synthesise_xml(vm: &Vm, disks: &[Disk]) -> Result<String, quick_xml::Error> {
    let mut w = Writer::new(Vec::new());
    w.write_event(Event::Start(BytesStart::new("domain").with_attributes([("type", "hyperv")])))?;
    w.create_element("name").write_text_content(BytesText::new(&vm.name))?;
    w.create_element("uuid").write_text_content(BytesText::new(&vm.id))?;
    if let Some(location) = &vm.configuration_location {
        let config = format!("{}\\Virtual Machines\\{}.vmcx", location.trim_end_matches('\\'), vm.id.to_uppercase());
        w.create_element("metadata").write_inner_content(|w| {
            w.create_element("hamirror:hyperv")
                .with_attributes([("xmlns:hamirror", XML_NAMESPACE), ("config", config.as_str())])
                .write_empty()
                .map(drop)
        })?;
    }
    w.create_element("devices").write_inner_content(|w| {
        for disk in disks {
            match (&disk.path, disk.disk_number) {
                // A physical disk passed through to the VM (its Path is a description, not a file).
                (_, Some(number)) => {
                    let dev = format!("\\\\.\\PhysicalDrive{number}");
                    w.create_element("disk")
                        .with_attributes([("type", "block"), ("device", "disk")])
                        .write_inner_content(|w| {
                            w.create_element("source").with_attribute(("dev", dev.as_str())).write_empty().map(drop)
                        })?;
                }
                (Some(path), None) => {
                    let format = match path.rsplit_once('.').map(|(_, ext)| ext.to_ascii_lowercase()) {
                        Some(ext) if ext == "vhdx" => "vhdx",
                        Some(ext) if ext == "vhd" => "vpc",
                        _ => "raw",
                    };
                    w.create_element("disk")
                        .with_attributes([("type", "file"), ("device", "disk")])
                        .write_inner_content(|w| {
                            w.create_element("driver").with_attribute(("type", format)).write_empty()?;
                            w.create_element("source").with_attribute(("file", path.as_str())).write_empty().map(drop)
                        })?;
                }
                (None, None) => {}
            }
        }
        Ok(())
    })?;
    w.write_event(Event::End(BytesStart::new("domain").to_end()))?;
    Ok(String::from_utf8_lossy(&w.into_inner()).into_owned())
}

/// The VM id (`<uuid>`) and configuration file (`<hamirror:hyperv config='...'/>`) of a
/// definition written by [`synthesise_xml`].
fn parse_definition(xml: &str) -> Result<(String, String), String> {
    let bad = |e: &dyn std::fmt::Display| format!("the Hyper-V definition is not valid XML: {e}");
    let mut reader = NsReader::from_str(xml);
    let (mut id, mut config, mut in_uuid) = (None, None, false);
    loop {
        match reader.read_resolved_event().map_err(|e| bad(&e))? {
            (ResolveResult::Bound(ns), Event::Start(e) | Event::Empty(e))
                if ns.as_ref() == XML_NAMESPACE.as_bytes() && e.local_name().as_ref() == b"hyperv" =>
            {
                if let Some(attr) = e.try_get_attribute("config").map_err(|e| bad(&e))? {
                    config = Some(attr.unescape_value().map_err(|e| bad(&e))?.into_owned());
                }
            }
            (_, Event::Start(e)) => in_uuid = e.local_name().as_ref() == b"uuid",
            (_, Event::Text(t)) if in_uuid => id = Some(t.unescape().map_err(|e| bad(&e))?.trim().to_string()),
            (_, Event::End(_)) => in_uuid = false,
            (_, Event::Eof) => break,
            _ => {}
        }
    }
    let id = id.ok_or("the Hyper-V definition has no <uuid>")?;
    let config = config.ok_or(
        "the definition has no <hamirror:hyperv config='...'/>: Hyper-V can only import a VM from its configuration file",
    )?;
    Ok((id, config))
}
