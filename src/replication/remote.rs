//! Resync over the network: [`RemotePeer`] is [`PeerFiles`] over an authenticated,
//! encrypted [`Channel`], and [`serve_resync`] answers its requests on the peer.
//!
//! The channel carries [`Message`]s only, so each request and response travels as the data
//! of an [`Op::Write`] addressed to a reserved path ([`envelope_path`], directory index
//! `u16::MAX`, which no module has): `offset` 0 is a request, 1 a response, and the `seq` of
//! the message pairs a response with its request. The data is a postcard-encoded
//! [`Request`] or [`Response`]; both are bounded ([`REQUEST_BYTES_MAX`],
//! [`LIST_BATCH_MAX`], [`LIST_BATCH_BYTES_MAX`], [`HASH_BATCH_MAX`]).
//!
//! The server applies ops through the [`Receiver`] (its root confinement: no `..`, no
//! symlink followed on the way, no directory index beyond the module's) and reads entries
//! and block checksums through [`LocalTree`] (the same `O_NOFOLLOW` walk beneath the same
//! root fds, see [`open_roots`]). Nothing a peer sends can make either side panic.

use super::channel::{
    handshake_sender, op_checksum, Channel, ChannelError, Identity, Message, FRAME_PLAINTEXT_BYTES_MAX,
};
use super::receiver::Receiver;
use super::resync::{Entry, Kind, LocalTree, PeerFiles, HASH_BATCH_BLOCKS, TREE_DEPTH_MAX};
use super::status::ResyncView;
use super::{Op, RelPath};
use crate::cluster::key::ClusterKey;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

/// Most entries in one [`Response::List`] page.
pub const LIST_BATCH_MAX: usize = 1024;
/// A list page stops growing past this many (estimated) bytes.
pub const LIST_BATCH_BYTES_MAX: usize = 1 << 20;
/// Most blocks whose checksums one [`Request::BlockHashes`] may ask.
pub const HASH_BATCH_MAX: u64 = HASH_BATCH_BLOCKS * 16;
/// Largest encoded request or response (what fits in one frame with the envelope).
pub const REQUEST_BYTES_MAX: usize = FRAME_PLAINTEXT_BYTES_MAX - 8192;
/// How long the client waits for one answer (a block checksum batch reads up to
/// `HASH_BATCH_MAX` blocks).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);

const OFFSET_REQUEST: u64 = 0;
const OFFSET_RESPONSE: u64 = 1;

/// The reserved path requests and responses are addressed to.
pub fn envelope_path() -> RelPath {
    RelPath::new(u16::MAX, "hamirror-resync").expect("a constant plain path")
}

/// One request of the resync client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Stat {
        path: RelPath,
    },
    /// Entries of `dir` sorted by name, starting after `after` (the last name of the
    /// previous page).
    List {
        dir: RelPath,
        after: Option<String>,
    },
    BlockHashes {
        file: RelPath,
        block_bytes: u64,
        first_block: u64,
        count: u64,
    },
    Apply {
        op: Op,
    },
    RemoveTree {
        path: RelPath,
    },
    Flush,
    /// The source is about to bring the target up to date: is the target ready, and must
    /// the resync be full? Answered [`Response::Begin`]; nothing is changed before.
    Begin,
    /// How far the resync is, for the target's `status` (answered `Done`).
    Progress(ResyncView),
    /// The resync is over: with `ok`, every change up to now is durable on the target and the
    /// real-time stream carries the next ones (answered `Done`; the server then returns).
    Finish {
        ok: bool,
    },
}

/// The server's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Stat(Option<Entry>),
    /// One page; `more` when entries follow the last one.
    List {
        entries: Vec<(String, Entry)>,
        more: bool,
    },
    Hashes(Vec<u64>),
    Done,
    /// The answer to [`Request::Begin`].
    Begin(BeginAnswer),
    /// The request failed or was refused: one sentence, and the errno when there is one.
    Error {
        errno: Option<i32>,
        message: String,
    },
}

/// The target's answer to [`Request::Begin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BeginAnswer {
    /// Not yet (its state machine has not asked for data); ask again shortly.
    NotReady,
    /// Go on; `full`: compare everything (the target's own changes are unknown or diverge).
    Ready { full: bool },
}

/// What the target does with the resync's control requests (the data requests it answers
/// itself). Called on the serving thread.
pub trait TargetHooks {
    /// Before any change: may the resync start, and must it be full?
    fn begin(&mut self) -> BeginAnswer;
    fn progress(&mut self, view: ResyncView);
    /// The source says the resync ended.
    fn finish(&mut self, ok: bool);
}

/// How a served connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The source sent [`Request::Finish`] with this `ok`.
    Finished(bool),
    /// The source closed the connection without finishing (a verify, or a broken resync).
    Closed,
}

/// Why a resync connection ended: one sentence each.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the resync channel failed: {0}")]
    Channel(#[from] ChannelError),
    #[error("the resync peer broke the protocol: {0}")]
    Protocol(&'static str),
}

fn protocol_error(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("the resync peer broke the protocol: {why}"))
}

fn channel_error(e: ChannelError) -> io::Error {
    match e {
        ChannelError::Io(e) => io::Error::new(e.kind(), format!("the resync connection failed: {e}")),
        other => io::Error::new(io::ErrorKind::ConnectionAborted, other.to_string()),
    }
}

fn envelope(seq: u64, offset: u64, data: Vec<u8>) -> Message {
    let op = Op::Write { file: envelope_path(), offset, data };
    Message::Op { seq, checksum: op_checksum(&op), op }
}

/// The payload of an envelope from the peer, after its checks.
fn open_envelope(message: Message, want_offset: u64) -> Result<(u64, Vec<u8>), &'static str> {
    match message {
        Message::Op { seq, checksum, op } => {
            if op_checksum(&op) != checksum {
                return Err("a message checksum does not match its content");
            }
            match op {
                Op::Write { file, offset, data } if file == envelope_path() && offset == want_offset => {
                    if data.len() > REQUEST_BYTES_MAX {
                        return Err("a message is larger than allowed");
                    }
                    Ok((seq, data))
                }
                _ => Err("an operation arrived where a resync message was expected"),
            }
        }
        _ => Err("a message of another kind arrived where a resync message was expected"),
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// [`PeerFiles`] on the other node, through an authenticated encrypted channel.
pub struct RemotePeer {
    channel: Channel,
    seq: u64,
    /// `Apply` requests sent whose answers are not read yet (see [`APPLY_WINDOW`]).
    unanswered: u64,
}

/// `Apply` requests (the resync's data) sent ahead of their answers: the server answers in
/// order, so a resync streams blocks instead of waiting a round trip for each. A failure is
/// reported by the next call.
pub const APPLY_WINDOW: u64 = 32;

impl std::fmt::Debug for RemotePeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemotePeer").field("peer", &self.channel.peer).field("seq", &self.seq).finish()
    }
}

impl RemotePeer {
    /// Connects to `addr` and runs the sender's side of the handshake.
    pub fn connect(
        addr: SocketAddr,
        key: &ClusterKey,
        local: Identity,
        timeout: Duration,
    ) -> Result<RemotePeer, ChannelError> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        RemotePeer::new(handshake_sender(stream, key, local, timeout)?)
    }

    /// Uses a channel whose handshake is done.
    pub fn new(channel: Channel) -> Result<RemotePeer, ChannelError> {
        channel.stream.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
        Ok(RemotePeer { channel, seq: 0, unanswered: 0 })
    }

    /// Ends the connection (the server returns).
    pub fn close(self) {
        self.channel.shutdown();
    }

    /// Asks the target whether it is ready and whether the resync must be full.
    pub fn begin(&mut self) -> io::Result<BeginAnswer> {
        match self.call(&Request::Begin)? {
            Response::Begin(answer) => Ok(answer),
            _ => Err(unexpected()),
        }
    }

    /// Tells the target how far the resync is.
    pub fn progress(&mut self, view: &ResyncView) -> io::Result<()> {
        match self.call(&Request::Progress(view.clone()))? {
            Response::Done => Ok(()),
            _ => Err(unexpected()),
        }
    }

    /// Tells the target the resync ended (`ok`: it is up to date).
    pub fn finish(&mut self, ok: bool) -> io::Result<()> {
        match self.call(&Request::Finish { ok })? {
            Response::Done => Ok(()),
            _ => Err(unexpected()),
        }
    }

    fn call(&mut self, request: &Request) -> io::Result<Response> {
        self.drain()?;
        let seq = self.send(request)?;
        self.answer(seq)
    }

    /// Sends `request`; returns its sequence number.
    fn send(&mut self, request: &Request) -> io::Result<u64> {
        let data = postcard::to_allocvec(request)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a resync request does not encode"))?;
        if data.len() > REQUEST_BYTES_MAX {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a resync request is larger than allowed"));
        }
        self.seq += 1;
        let seq = self.seq;
        self.channel.writer.send(&envelope(seq, OFFSET_REQUEST, data)).map_err(channel_error)?;
        self.channel.writer.flush().map_err(channel_error)?;
        Ok(seq)
    }

    /// Reads the answers of the `Apply` requests sent ahead; the first failure is returned.
    fn drain(&mut self) -> io::Result<()> {
        while self.unanswered > 0 {
            let seq = self.seq - self.unanswered + 1;
            self.unanswered -= 1;
            match self.answer(seq)? {
                Response::Done => {}
                _ => return Err(unexpected()),
            }
        }
        Ok(())
    }

    /// Reads the answer to request `seq` (answering pings meanwhile).
    fn answer(&mut self, seq: u64) -> io::Result<Response> {
        loop {
            let message = match self.channel.reader.poll().map_err(channel_error)? {
                Some(m) => m,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the resync peer did not answer within {RESPONSE_TIMEOUT:?}"),
                    ))
                }
            };
            match message {
                Message::Ping { id } => {
                    self.channel.writer.send(&Message::Pong { id }).map_err(channel_error)?;
                    self.channel.writer.flush().map_err(channel_error)?;
                    continue;
                }
                Message::Pong { .. } => continue,
                Message::Error { message, .. } => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("the resync peer ended the connection: {message}"),
                    ))
                }
                other => {
                    let (got, data) = open_envelope(other, OFFSET_RESPONSE).map_err(protocol_error)?;
                    if got != seq {
                        return Err(protocol_error("a response does not answer the last request"));
                    }
                    let response: Response =
                        postcard::from_bytes(&data).map_err(|_| protocol_error("a response does not decode"))?;
                    if let Response::Error { errno, message } = response {
                        let kind = errno.map_or(io::ErrorKind::Other, |e| io::Error::from_raw_os_error(e).kind());
                        return Err(io::Error::new(kind, message));
                    }
                    return Ok(response);
                }
            }
        }
    }
}

fn unexpected() -> io::Error {
    protocol_error("a response of the wrong kind arrived")
}

impl PeerFiles for RemotePeer {
    fn stat(&mut self, path: &RelPath) -> io::Result<Option<Entry>> {
        match self.call(&Request::Stat { path: path.clone() })? {
            Response::Stat(e) => Ok(e),
            _ => Err(unexpected()),
        }
    }

    fn list(&mut self, dir: &RelPath) -> io::Result<Vec<(String, Entry)>> {
        let mut out: Vec<(String, Entry)> = Vec::new();
        loop {
            let after = out.last().map(|(n, _)| n.clone());
            match self.call(&Request::List { dir: dir.clone(), after: after.clone() })? {
                Response::List { entries, more } => {
                    if entries.len() > LIST_BATCH_MAX
                        || entries.windows(2).any(|w| w[0].0 >= w[1].0)
                        || matches!((&after, entries.first()), (Some(a), Some((n, _))) if n <= a)
                    {
                        return Err(protocol_error("a list page is too long or not sorted"));
                    }
                    let empty = entries.is_empty();
                    out.extend(entries);
                    if !more || empty {
                        return Ok(out);
                    }
                }
                _ => return Err(unexpected()),
            }
        }
    }

    fn block_hashes(&mut self, file: &RelPath, block_bytes: u64, first_block: u64, count: u64) -> io::Result<Vec<u64>> {
        let mut out = Vec::with_capacity(count.min(HASH_BATCH_MAX) as usize);
        let mut at = first_block;
        let end = first_block.saturating_add(count);
        while at < end {
            let n = (end - at).min(HASH_BATCH_MAX);
            let request = Request::BlockHashes { file: file.clone(), block_bytes, first_block: at, count: n };
            match self.call(&request)? {
                Response::Hashes(h) if h.len() as u64 == n => out.extend(h),
                Response::Hashes(_) => return Err(protocol_error("a checksum batch has the wrong length")),
                _ => return Err(unexpected()),
            }
            at += n;
        }
        Ok(out)
    }

    fn apply(&mut self, op: &Op) -> io::Result<()> {
        if self.unanswered >= APPLY_WINDOW {
            let seq = self.seq - self.unanswered + 1;
            self.unanswered -= 1;
            if !matches!(self.answer(seq)?, Response::Done) {
                return Err(unexpected());
            }
        }
        self.send(&Request::Apply { op: op.clone() })?;
        self.unanswered += 1;
        Ok(())
    }

    fn remove_tree(&mut self, path: &RelPath) -> io::Result<()> {
        match self.call(&Request::RemoveTree { path: path.clone() })? {
            Response::Done => Ok(()),
            _ => Err(unexpected()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.call(&Request::Flush)? {
            Response::Done => Ok(()),
            _ => Err(unexpected()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server

/// Opens each replicated directory once and shares the fd between the [`Receiver`] (which
/// applies ops) and the [`LocalTree`] (which reads entries and checksums).
pub fn open_roots(dirs: &[PathBuf]) -> io::Result<(Receiver, LocalTree)> {
    roots_from_files(&open_root_files(dirs)?)
}

/// Opens each replicated directory (before a mountover hides it: the fds keep reaching the
/// real directories afterwards).
pub fn open_root_files(dirs: &[PathBuf]) -> io::Result<Vec<(PathBuf, File)>> {
    let mut out = Vec::with_capacity(dirs.len());
    for d in dirs {
        let dir = File::open(d).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot open the replicated directory {}: {e}", d.display()))
        })?;
        if !dir.metadata()?.is_dir() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a directory", d.display())));
        }
        out.push((d.clone(), dir));
    }
    Ok(out)
}

/// A [`Receiver`] and a [`LocalTree`] on copies of fds from [`open_root_files`].
pub fn roots_from_files(roots: &[(PathBuf, File)]) -> io::Result<(Receiver, LocalTree)> {
    let mut for_receiver = Vec::with_capacity(roots.len());
    let mut for_tree = Vec::with_capacity(roots.len());
    for (d, dir) in roots {
        for_tree.push(OwnedFd::from(dir.try_clone()?));
        for_receiver.push((d.clone(), dir.try_clone()?));
    }
    Ok((Receiver::from_dirs(for_receiver), LocalTree::from_fds(for_tree)))
}

struct Server {
    receiver: Receiver,
    tree: LocalTree,
    /// The last directory listed, for the pages after the first.
    listing: Option<(RelPath, Vec<(String, Entry)>)>,
    /// The target accepted a [`Request::Begin`]: changes are allowed.
    begun: bool,
}

fn failed(e: io::Error, what: &str, path: &RelPath) -> Response {
    Response::Error {
        errno: e.raw_os_error(),
        message: format!("cannot {what} {:?} in replicated directory #{}: {e}", path.path(), path.dir()),
    }
}

fn refused(path: &RelPath, count: u16) -> Response {
    Response::Error {
        errno: Some(libc::EPERM),
        message: format!(
            "refused a request on replicated directory #{}: this module has {count} replicated directories",
            path.dir()
        ),
    }
}

/// Rough encoded size of an entry, to bound a list page.
fn entry_bytes(name: &str, e: &Entry) -> usize {
    let target = match &e.kind {
        Kind::Symlink(t) => t.len(),
        _ => 0,
    };
    64 + name.len() + target + e.xattrs.iter().map(|(n, v)| n.len() + v.len() + 8).sum::<usize>()
}

impl Server {
    fn inside(&self, path: &RelPath) -> Option<Response> {
        (path.dir() >= self.tree.dirs()).then(|| refused(path, self.tree.dirs()))
    }

    fn answer(&mut self, request: Request) -> Response {
        match request {
            Request::Stat { path } => {
                if let Some(r) = self.inside(&path) {
                    return r;
                }
                match self.tree.stat(&path) {
                    Ok(e) => Response::Stat(e),
                    Err(e) => failed(e, "read the entry", &path),
                }
            }
            Request::List { dir, after } => {
                if let Some(r) = self.inside(&dir) {
                    return r;
                }
                let cached = matches!((&self.listing, &after), (Some((d, _)), Some(_)) if *d == dir);
                if !cached {
                    match self.tree.list(&dir) {
                        Ok(l) => self.listing = Some((dir.clone(), l)),
                        Err(e) => return failed(e, "list", &dir),
                    }
                }
                let Some((_, all)) = &self.listing else { return failed(io::ErrorKind::Other.into(), "list", &dir) };
                let start = match &after {
                    Some(a) => all.partition_point(|(n, _)| n <= a),
                    None => 0,
                };
                let mut entries = Vec::new();
                let mut bytes = 0;
                for (name, e) in &all[start..] {
                    let b = entry_bytes(name, e);
                    if !entries.is_empty() && (entries.len() >= LIST_BATCH_MAX || bytes + b > LIST_BATCH_BYTES_MAX) {
                        break;
                    }
                    bytes += b;
                    entries.push((name.clone(), e.clone()));
                }
                let more = start + entries.len() < all.len();
                if !more {
                    self.listing = None;
                }
                Response::List { entries, more }
            }
            Request::BlockHashes { file, block_bytes, first_block, count } => {
                if let Some(r) = self.inside(&file) {
                    return r;
                }
                if count > HASH_BATCH_MAX || block_bytes == 0 || block_bytes > FRAME_PLAINTEXT_BYTES_MAX as u64 * 64 {
                    return Response::Error {
                        errno: Some(libc::EINVAL),
                        message: format!(
                            "refused a checksum request of {count} blocks of {block_bytes} bytes: at most {HASH_BATCH_MAX} blocks of 1 byte to 128 MiB"
                        ),
                    };
                }
                match self.tree.block_hashes(&file, block_bytes, first_block, count) {
                    Ok(h) => Response::Hashes(h),
                    Err(e) => failed(e, "checksum", &file),
                }
            }
            Request::Apply { .. } | Request::RemoveTree { .. } if !self.begun => Response::Error {
                errno: Some(libc::EPERM),
                message: "refused a change before the resync began (this target did not accept one)".to_string(),
            },
            Request::Apply { op } => {
                self.listing = None;
                match self.receiver.apply(&op) {
                    Ok(_) => Response::Done,
                    Err(e) => Response::Error {
                        errno: match &e {
                            super::receiver::ApplyError::Io { source, .. } => source.raw_os_error(),
                            _ => Some(libc::EPERM),
                        },
                        message: e.to_string(),
                    },
                }
            }
            Request::RemoveTree { path } => {
                self.listing = None;
                if let Some(r) = self.inside(&path) {
                    return r;
                }
                if path.path().is_empty() {
                    return Response::Error {
                        errno: Some(libc::EPERM),
                        message: format!("refused to remove replicated directory #{} itself", path.dir()),
                    };
                }
                match self.remove_tree(&path, 0) {
                    Ok(()) => Response::Done,
                    Err(r) => r,
                }
            }
            Request::Flush => {
                if let Err(e) = self.receiver.sync(false) {
                    return Response::Error { errno: None, message: e.to_string() };
                }
                match self.tree.syncfs() {
                    Ok(()) => Response::Done,
                    Err(e) => Response::Error {
                        errno: e.raw_os_error(),
                        message: format!("cannot flush the replicated directories: {e}"),
                    },
                }
            }
            Request::Begin | Request::Progress(_) | Request::Finish { .. } => {
                Response::Error { errno: None, message: "a control request reached the data server".to_string() }
            }
        }
    }

    /// Removes `path` and everything under it through the receiver (so its open-file cache
    /// forgets what goes away).
    fn remove_tree(&mut self, path: &RelPath, depth: usize) -> Result<(), Response> {
        let entry = self.tree.stat(path).map_err(|e| failed(e, "read the entry", path))?;
        let op = match entry {
            None => return Ok(()),
            Some(e) if e.kind == Kind::Dir => {
                if depth >= TREE_DEPTH_MAX {
                    return Err(Response::Error {
                        errno: Some(libc::ELOOP),
                        message: format!(
                            "refused to remove {:?}: the tree is deeper than {TREE_DEPTH_MAX}",
                            path.path()
                        ),
                    });
                }
                for (name, _) in self.tree.list(path).map_err(|e| failed(e, "list", path))? {
                    if let Some(child) = path.join(&name) {
                        self.remove_tree(&child, depth + 1)?;
                    }
                }
                Op::Rmdir { dir: path.clone() }
            }
            Some(_) => Op::Unlink { file: path.clone() },
        };
        match self.receiver.apply(&op) {
            Ok(_) => Ok(()),
            Err(e) => Err(Response::Error { errno: None, message: e.to_string() }),
        }
    }
}

fn send_response(channel: &mut Channel, seq: u64, response: &Response) -> Result<(), ChannelError> {
    let mut data = postcard::to_allocvec(response).unwrap_or_default();
    if data.is_empty() || data.len() > REQUEST_BYTES_MAX {
        let too_big = Response::Error {
            errno: Some(libc::E2BIG),
            message: "the answer is larger than one resync message (an entry with too many extended attributes)"
                .to_string(),
        };
        data = postcard::to_allocvec(&too_big).unwrap_or_default();
    }
    channel.writer.send(&envelope(seq, OFFSET_RESPONSE, data))?;
    channel.writer.flush()
}

/// Answers the requests of a [`RemotePeer`] on an accepted, authenticated channel until the
/// client finishes or closes it (`Ok`) or breaks the protocol (`Err`, after telling it why).
/// `tree` must be the same roots as `receiver` (see [`open_roots`]). Changes are refused
/// until `hooks.begin` said ready.
pub fn serve_resync(
    mut channel: Channel,
    receiver: Receiver,
    tree: LocalTree,
    hooks: &mut dyn TargetHooks,
) -> Result<Served, RemoteError> {
    let mut server = Server { receiver, tree, listing: None, begun: false };
    loop {
        let message = match channel.reader.poll() {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(ChannelError::Closed) => return Ok(Served::Closed),
            Err(e) => return Err(e.into()),
        };
        let (seq, data) = match message {
            Message::Ping { id } => {
                channel.writer.send(&Message::Pong { id })?;
                channel.writer.flush()?;
                continue;
            }
            Message::Pong { .. } => continue,
            other => match open_envelope(other, OFFSET_REQUEST) {
                Ok(x) => x,
                Err(why) => return Err(refuse(&mut channel, why)),
            },
        };
        let request: Request = match postcard::from_bytes(&data) {
            Ok(r) => r,
            Err(_) => return Err(refuse(&mut channel, "a request does not decode")),
        };
        let finished = match &request {
            Request::Finish { ok } => Some(*ok),
            _ => None,
        };
        let response = match request {
            Request::Begin => {
                let answer = hooks.begin();
                server.begun = matches!(answer, BeginAnswer::Ready { .. });
                Response::Begin(answer)
            }
            Request::Progress(view) => {
                hooks.progress(view);
                Response::Done
            }
            Request::Finish { ok } => {
                hooks.finish(ok && server.begun);
                Response::Done
            }
            request => server.answer(request),
        };
        send_response(&mut channel, seq, &response)?;
        if let Some(ok) = finished {
            return Ok(Served::Finished(ok && server.begun));
        }
    }
}

/// Tells the client why the connection ends, then ends it.
fn refuse(channel: &mut Channel, why: &'static str) -> RemoteError {
    let _ =
        channel.writer.send(&Message::Error { seq: 0, message: format!("the resync peer broke the protocol: {why}") });
    let _ = channel.writer.flush();
    channel.shutdown();
    RemoteError::Protocol(why)
}
