//! The peer service: what one node daemon asks the other outside the modules' own streams.
//!
//! `hamirror vm register` installs a module and defines its domain on the peer through it, and
//! a VM module asks it, before starting its VM, whether the VM runs on the peer. It listens on
//! TCP port [`PEER_PORT`] of every cluster.xml address of the node and speaks the replication
//! channel's handshake and encrypted frames (module id 0): a connection that does not hold the
//! cluster key is dropped before any request is read. Each frame is one postcard-encoded
//! [`PeerRequest`] or [`PeerAnswer`]; requests are answered in order.

mod server;

pub use server::{serve, PeerServerContext};

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterKey;
use crate::config::{ClusterConfig, PORT_BASE};
use crate::hypervisor::DomainState;
use crate::module::State;
use crate::replication::channel::{handshake_sender, Channel, ChannelError, Identity};

/// The peer service's TCP port (module ids start at 1, so no module uses it).
pub const PEER_PORT: u16 = PORT_BASE;
/// The module id the peer service's handshake carries.
const PEER_SERVICE_ID: u16 = 0;
/// Largest module directory sent by [`PeerRequest::InstallModule`] (files' bytes).
pub const MODULE_BYTES_MAX: usize = 1 << 20;

/// One file of a module directory, relative to `modules/<name>/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleFile {
    /// '/'-separated, no `..`, no leading '/'.
    pub path: String,
    /// Unix permission bits.
    pub mode: u32,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A module installed on the peer, as [`PeerRequest::Modules`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerModule {
    pub name: String,
    /// `None` when its configuration is refused there.
    pub id: Option<u16>,
    /// The domain of its `<vm>`, if any.
    pub vm: Option<String>,
    /// Its replicated directories.
    pub dirs: Vec<PathBuf>,
    /// Its state there, `None` when it does not run.
    pub state: Option<State>,
}

/// What one node asks the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Every installed module.
    Modules,
    /// Writes `modules/<name>/` (replacing it) and loads it.
    InstallModule { name: String, files: Vec<ModuleFile> },
    /// Removes a stopped module's directory and unloads it.
    RemoveModule { name: String },
    /// Runs an admin command (`start`, `stop`...) on one module.
    Command { module: String, command: String },
    /// The state of a domain in the peer's hypervisor.
    DomainState { uri: String, name: String },
    /// Defines (or redefines) a domain from its XML.
    DefineDomain { uri: String, xml: String },
    /// Removes a domain's definition, keeping its files.
    UndefineDomain { uri: String, name: String },
    /// Turns the hypervisor's own autostart of a domain on or off.
    SetAutostart { uri: String, name: String, on: bool },
}

/// The answer to one [`PeerRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerAnswer {
    Done,
    Modules(Vec<PeerModule>),
    DomainState(DomainState),
    /// The request was refused or failed: one sentence.
    Error(String),
}

/// A connection to the peer daemon's service.
pub struct PeerClient {
    channel: Channel,
    peer: String,
}

impl PeerClient {
    /// Connects to `peer`'s service, trying each of its cluster.xml addresses in lan order,
    /// all within `timeout` (each address gets an equal share of what is left).
    pub fn connect(
        cluster: &ClusterConfig,
        key: &ClusterKey,
        local: &str,
        peer: &str,
        timeout: Duration,
    ) -> Result<PeerClient, String> {
        let (local_index, _) = cluster
            .pair_position(local)
            .ok_or_else(|| format!("{local} is not one of the two nodes of cluster.xml"))?;
        let mut last = format!("{peer} has no address in cluster.xml");
        let addrs: Vec<SocketAddr> = cluster
            .lans
            .iter()
            .filter_map(|lan| cluster.addr(&lan.name, peer))
            .map(|a| SocketAddr::new(a, PEER_PORT))
            .collect();
        let deadline = Instant::now() + timeout;
        for (i, &to) in addrs.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let share = left / (addrs.len() - i) as u32;
            if share.is_zero() {
                break;
            }
            let identity = Identity { module_id: PEER_SERVICE_ID, node: local_index };
            let attempt = TcpStream::connect_timeout(&to, share)
                .map_err(ChannelError::Io)
                .and_then(|stream| handshake_sender(stream, key, identity, left));
            match attempt {
                Ok(channel) => return Ok(PeerClient { channel, peer: peer.to_string() }),
                Err(e) => last = format!("the hamirror daemon of {peer} does not answer at {to}: {e}"),
            }
        }
        Err(last)
    }

    /// Sends one request and waits up to `timeout` for its answer; [`PeerAnswer::Error`]
    /// becomes `Err`.
    pub fn call(&mut self, request: &PeerRequest, timeout: Duration) -> Result<PeerAnswer, String> {
        let lost = |e: ChannelError| format!("the connection to {} broke: {e}", self.peer);
        let bytes = postcard::to_stdvec(request).map_err(|e| format!("a request does not encode: {e}"))?;
        self.channel.writer.send_raw(&bytes).map_err(lost)?;
        self.channel.writer.flush().map_err(lost)?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("{} did not answer within {timeout:?}", self.peer));
            }
            self.channel.stream.set_read_timeout(Some(left)).map_err(|e| lost(ChannelError::Io(e)))?;
            if let Some(frame) = self.channel.reader.poll_raw().map_err(lost)? {
                let answer: PeerAnswer = postcard::from_bytes(&frame)
                    .map_err(|_| format!("{} sent an answer that does not decode", self.peer))?;
                return match answer {
                    PeerAnswer::Error(e) => Err(e),
                    other => Ok(other),
                };
            }
        }
    }
}
