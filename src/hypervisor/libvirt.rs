//! The libvirt driver, on the `virt` crate.
//!
//! libvirt calls block, sometimes for long (a hung daemon): every call runs on one thread per
//! [`Libvirt`] that owns the connection. A public method sends the call to that thread and
//! waits for the answer up to [`CALL_DEADLINE`]; no answer is [`HvError::Unreachable`]. A call
//! whose caller gave up before the thread reached it is skipped, so a late `start` never runs
//! behind the caller's back.
//!
//! The connection opens on the first call. A call that fails because of the connection (no
//! connection, an RPC or system error from the remote driver, a dead connection) drops it,
//! reconnects and retries once; a second such failure is [`HvError::Unreachable`], never a
//! domain state.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::{self, Domain};
use virt::error::{Error as VirtError, ErrorDomain, ErrorNumber};
use virt::sys;

use super::{DomainState, DomainSummary, HvError, Hypervisor, StopOutcome};

/// How long a caller waits for one libvirt call.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// How often [`Hypervisor::shutdown`] looks whether the guest is off.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// Undefine flags, best first: keep NVRAM and TPM state, drop only snapshot and checkpoint
/// metadata (their data stays in the disks). The managed-save flag is left out on purpose:
/// it deletes the saved memory image, a file; with a managed save, undefine fails and says so.
const UNDEFINE_FLAGS: [sys::virDomainUndefineFlagsValues; 3] = [
    sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
        | sys::VIR_DOMAIN_UNDEFINE_KEEP_TPM
        | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
    sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
    0,
];

/// A call for the connection thread.
type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// A libvirt connection (any URI libvirt understands), shared by reference between threads.
pub struct Libvirt {
    uri: String,
    jobs: mpsc::Sender<Job>,
}

impl Libvirt {
    /// A driver for `uri`. It starts the connection thread but opens nothing: the connection
    /// opens on the first call. The thread ends when the `Libvirt` is dropped.
    pub fn new(uri: &str) -> Libvirt {
        let (jobs, queue) = mpsc::channel::<Job>();
        let mut session = Session { uri: uri.to_string(), conn: None };
        thread::Builder::new()
            .name("hv-libvirt".into())
            .spawn(move || {
                // libvirt's default error handler prints every error on stderr: errors are
                // returned to the caller instead.
                virt::error::clear_error_callback();
                for job in queue {
                    if catch_unwind(AssertUnwindSafe(|| job(&mut session))).is_err() {
                        // The virt crate panics when it cannot release a reference: leak this
                        // connection rather than panic again, and open a new one next call.
                        std::mem::forget(session.conn.take());
                    }
                }
            })
            .expect("spawning the libvirt connection thread");
        Libvirt { uri: uri.to_string(), jobs }
    }

    fn unreachable(&self, why: &str) -> HvError {
        HvError::Unreachable { uri: self.uri.clone(), why: why.to_string() }
    }

    /// Runs `call` on the connection thread and waits for its answer up to [`CALL_DEADLINE`].
    fn call<T: Send + 'static>(
        &self,
        call: impl FnOnce(&mut Session) -> Result<T, HvError> + Send + 'static,
    ) -> Result<T, HvError> {
        let (answer, reply) = mpsc::sync_channel(1);
        let deadline = Instant::now() + CALL_DEADLINE;
        let job: Job = Box::new(move |session| {
            if Instant::now() < deadline {
                let _ = answer.send(call(session));
            }
        });
        self.jobs.send(job).map_err(|_| self.unreachable("the libvirt connection thread has stopped"))?;
        match reply.recv_timeout(CALL_DEADLINE) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(self.unreachable(&format!("no answer within {} s", CALL_DEADLINE.as_secs())))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self.unreachable("the libvirt call panicked")),
        }
    }

    /// Runs `op` on the domain `name` (see [`Session::run`]).
    fn on_domain<T: Send + 'static>(
        &self,
        name: &str,
        op: impl Fn(&Domain) -> Result<T, VirtError> + Send + 'static,
    ) -> Result<T, HvError> {
        let name = name.to_string();
        self.call(move |session| session.run(Some(&name), |conn| op(&conn.lookup_domain_by_name(&name)?)))
    }

    /// Powers `name` off; whether it was running.
    fn power_off(&self, name: &str) -> Result<bool, HvError> {
        self.on_domain(name, |dom| match dom.destroy() {
            Ok(()) => Ok(true),
            Err(_) if !dom.is_active()? => Ok(false),
            Err(e) => Err(e),
        })
    }
}

impl Hypervisor for Libvirt {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn list(&self) -> Result<Vec<DomainSummary>, HvError> {
        self.call(|session| {
            session.run(None, |conn| {
                let mut out = Vec::new();
                for dom in conn.list_all_domains(0)? {
                    let state = match dom.state() {
                        Ok(state) => map_state(state),
                        // Undefined between the listing and this call.
                        Err(e) if is_code(&e, ErrorNumber::NoDomain) => continue,
                        Err(e) => return Err(e),
                    };
                    out.push((dom.name()?, state));
                }
                Ok(out)
            })
        })?
        .into_iter()
        .map(|(name, state)| {
            Ok(DomainSummary { state: state.map_err(|why| HvError::Failed(format!("{name}: {why}")))?, name })
        })
        .collect()
    }

    fn state(&self, name: &str) -> Result<DomainState, HvError> {
        let owned = name.to_string();
        let state = self.call(move |session| {
            session.run(Some(&owned), |conn| match conn.lookup_domain_by_name(&owned).and_then(|dom| dom.state()) {
                Ok(state) => Ok(Some(state)),
                // Only a definite "no such domain" answer (also: undefined since the lookup);
                // a connection problem is retried, then reported as Unreachable by `run`.
                Err(e) if is_code(&e, ErrorNumber::NoDomain) => Ok(None),
                Err(e) => Err(e),
            })
        })?;
        match state {
            Some(state) => map_state(state).map_err(|why| HvError::Failed(format!("{name}: {why}"))),
            None => Ok(DomainState::Undefined),
        }
    }

    fn domain_xml(&self, name: &str) -> Result<String, HvError> {
        self.on_domain(name, |dom| dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE))
    }

    fn define(&self, xml: &str) -> Result<(), HvError> {
        let xml = xml.to_string();
        self.call(move |session| session.run(None, |conn| conn.define_domain_xml(&xml).map(drop)))
    }

    fn undefine(&self, name: &str) -> Result<(), HvError> {
        self.on_domain(name, |dom| {
            let mut result = Ok(());
            for flags in UNDEFINE_FLAGS {
                result = if flags == 0 { dom.undefine() } else { dom.undefine_flags(flags) };
                match &result {
                    // An older libvirt that does not know a flag: try fewer.
                    Err(e) if is_unsupported_flags(e) => continue,
                    _ => break,
                }
            }
            result
        })
    }

    fn start(&self, name: &str) -> Result<(), HvError> {
        // Drivers differ in how they say "already running" (the test driver: an internal
        // error): whatever the error, a domain that is now running was started.
        self.on_domain(name, |dom| match dom.create() {
            Ok(()) => Ok(()),
            Err(_) if dom.is_active()? => Ok(()),
            Err(e) => Err(e),
        })
    }

    fn shutdown(&self, name: &str, timeout: Duration) -> Result<StopOutcome, HvError> {
        let end = Instant::now() + timeout;
        let requested = self.on_domain(name, |dom| {
            if !dom.is_active()? {
                return Ok(false);
            }
            match dom.shutdown() {
                Ok(()) => Ok(true),
                Err(_) if !dom.is_active()? => Ok(false),
                Err(e) => Err(e),
            }
        })?;
        if !requested {
            return Ok(StopOutcome::AlreadyOff);
        }
        // Polled from the caller's thread, so the connection thread stays free for others.
        loop {
            if !self.state(name)?.is_active() {
                return Ok(StopOutcome::ShutDown);
            }
            let now = Instant::now();
            if now >= end {
                break;
            }
            thread::sleep(SHUTDOWN_POLL.min(end - now));
        }
        Ok(if self.power_off(name)? { StopOutcome::Destroyed } else { StopOutcome::ShutDown })
    }

    fn destroy(&self, name: &str) -> Result<(), HvError> {
        self.power_off(name).map(drop)
    }

    fn autostart(&self, name: &str) -> Result<bool, HvError> {
        self.on_domain(name, |dom| dom.autostart())
    }

    fn set_autostart(&self, name: &str, on: bool) -> Result<(), HvError> {
        self.on_domain(name, move |dom| dom.set_autostart(on).map(drop))
    }
}

/// The connection thread's side: the URI and the connection, once open.
struct Session {
    uri: String,
    conn: Option<Connect>,
}

impl Session {
    /// Runs `op` on the connection, opening it if needed; on a connection-level failure,
    /// drops the connection, reopens it and runs `op` once more. `name` is the domain `op`
    /// looks up, for [`HvError::NoDomain`].
    fn run<T>(&mut self, name: Option<&str>, op: impl Fn(&Connect) -> Result<T, VirtError>) -> Result<T, HvError> {
        let mut why = String::new();
        for _attempt in 0..2 {
            if self.conn.as_ref().is_some_and(|conn| !conn.is_alive().unwrap_or(false)) {
                self.conn = None;
            }
            if self.conn.is_none() {
                match Connect::open(Some(&self.uri)) {
                    Ok(conn) => self.conn = Some(conn),
                    Err(e) => {
                        why = e.message().to_string();
                        continue;
                    }
                }
            }
            let Some(conn) = &self.conn else { continue };
            match op(conn) {
                Ok(value) => return Ok(value),
                Err(e) if is_connection_error(&e) || !conn.is_alive().unwrap_or(false) => {
                    why = e.message().to_string();
                    self.conn = None;
                }
                Err(e) => {
                    return Err(match name {
                        Some(name) if is_code(&e, ErrorNumber::NoDomain) => HvError::NoDomain(name.to_string()),
                        _ => HvError::Failed(e.message().to_string()),
                    })
                }
            }
        }
        Err(HvError::Unreachable { uri: self.uri.clone(), why })
    }
}

fn is_code(e: &VirtError, code: ErrorNumber) -> bool {
    e.code().is(code)
}

/// An error about the connection rather than the call: no connection, a broken one, or an
/// RPC/system error from the remote driver (socket closed, daemon restarting).
fn is_connection_error(e: &VirtError) -> bool {
    let from_transport = e.domain().is_any(vec![ErrorDomain::Remote, ErrorDomain::Rpc]);
    e.code().is_any(vec![ErrorNumber::NoConnect, ErrorNumber::InvalidConn, ErrorNumber::Rpc])
        || (from_transport && is_code(e, ErrorNumber::SystemError))
}

/// libvirt's answer to flags it does not know.
fn is_unsupported_flags(e: &VirtError) -> bool {
    e.code().is_any(vec![ErrorNumber::InvalidArg, ErrorNumber::NoSupport, ErrorNumber::ArgumentUnsupported])
        && e.message().contains("flags")
}

/// Maps libvirt's state and reason; an error text for a state this driver cannot name.
fn map_state((state, reason): (domain::DomainStateEnum, domain::DomainStateReasonEnum)) -> Result<DomainState, String> {
    use domain::{DomainPausedReason as P, DomainShutoffReason as S, DomainState as L, DomainStateReason as R};
    let state = state.known().ok_or_else(|| format!("libvirt reports an unknown state {}", state.to_raw()))?;
    let reason = match reason {
        virt::enumutil::Enum::Known(reason) => Some(reason),
        virt::enumutil::Enum::Unknown(_) => None,
    };
    Ok(match state {
        L::Running | L::Blocked => DomainState::Running,
        L::Paused => {
            let why = match reason {
                Some(R::Paused(p)) => p.known(),
                _ => None,
            };
            DomainState::Paused {
                io_error: why == Some(P::IOError),
                reason: match why {
                    Some(P::User) => "paused by a user",
                    Some(P::Migration) => "paused for a migration",
                    Some(P::Save) => "paused while saving",
                    Some(P::Dump) => "paused while dumping its memory",
                    Some(P::IOError) => "paused on a disk I/O error",
                    Some(P::Watchdog) => "paused by its watchdog",
                    Some(P::FromSnapshot) => "paused after reverting to a snapshot",
                    Some(P::ShuttingDown) => "paused while shutting down",
                    Some(P::Snapshot) => "paused while taking a snapshot",
                    Some(P::Crashed) => "paused after a guest crash",
                    Some(P::StartingUp) => "paused while starting up",
                    Some(P::PostCopy) | Some(P::PostCopyFailed) => "paused during a post-copy migration",
                    Some(P::APIError) => "paused after a hypervisor API error",
                    Some(P::Unknown) | None => "paused for an unknown reason",
                }
                .to_string(),
            }
        }
        L::Shutdown => DomainState::ShuttingDown,
        L::Shutoff => {
            let why = match reason {
                Some(R::Shutoff(s)) => s.known(),
                _ => None,
            };
            let reason = match why {
                // libvirt reports a guest that crashed with no on_crash action this way.
                Some(S::Crashed) => return Ok(DomainState::Crashed),
                Some(S::Shutdown) => "shut down from inside the guest or on request",
                Some(S::Destroyed) => "destroyed",
                Some(S::Migrated) => "migrated to another host",
                Some(S::Saved) => "saved to a file",
                Some(S::Failed) => "failed to start",
                Some(S::FromSnapshot) => "reverted to a snapshot",
                Some(S::Daemon) => "stopped by the libvirt daemon",
                Some(S::Unknown) | None => "never started, or stopped for an unknown reason",
            };
            DomainState::ShutOff { reason: reason.to_string() }
        }
        L::Crashed => DomainState::Crashed,
        L::PMSuspended => DomainState::Suspended,
        L::NoState => return Err("libvirt reports no state".to_string()),
    })
}
