//! The replication channel: one TCP connection from the primary's sender to the secondary's
//! receiver, authenticated with the cluster key and encrypted, carrying [`Message`]s.
//!
//! ```text
//! handshake (sender S connects to receiver R)
//!   S -> R  hello_s   45 bytes: "HAMRREPL", version, role 0, node, module id (BE), 32-byte nonce
//!   R -> S  hello_r   45 bytes: the same with role 1 and R's nonce
//!   S -> R  mac_s     HMAC-SHA256(cluster key, LABEL | " sender" | hello_s | hello_r)
//!   R -> S  mac_r     HMAC-SHA256(cluster key, LABEL | " receiver" | hello_s | hello_r)
//! frame (each direction)
//!   u32 BE n | n bytes: ChaCha20-Poly1305(key of the direction, nonce = frame counter, aad = n)
//! ```
//!
//! R checks S's tag before it sends its own and before it reads any frame, so a peer with
//! another cluster key learns nothing and gets nothing applied. The keys of the two directions
//! come from HKDF-SHA256 over the cluster key, salted with both nonces: fresh for every
//! connection, so a frame recorded on one connection never opens on another. The 96-bit AEAD
//! nonce is the direction's frame counter: it is never reused, and the connection ends before
//! the counter could wrap. A frame that fails to open, is larger than [`FRAME_BYTES_MAX`] or
//! does not decode ends the connection. See docs/replication-protocol.md.
//!
//! Every [`Op`] also carries an xxh3-64 checksum computed where the op was submitted
//! ([`op_checksum`]) and checked by the receiver before it applies the op: an end-to-end check
//! of the data, independent of the transport.
//!
//! The I/O here is blocking (`std::net`): the sender is driven by the mountover's threads and
//! the receiver writes to disk, both blocking work. [`FrameReader::poll`] keeps a partly read
//! frame across read timeouts, so the caller can wake up on a timer without losing bytes.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use xxhash_rust::xxh3::Xxh3;

use super::{Op, RelPath};
use crate::cluster::key::ClusterKey;

type HmacSha256 = Hmac<Sha256>;

/// Bound into every tag and key derivation, so nothing here can be confused with another use
/// of the cluster key.
pub const PROTOCOL_LABEL: &[u8] = b"hamirror replication v1";
pub const HELLO_MAGIC: [u8; 8] = *b"HAMRREPL";
pub const PROTOCOL_VERSION: u8 = 1;
pub const NONCE_BYTES: usize = 32;
/// magic, version, role, node, module id, nonce.
pub const HELLO_BYTES: usize = 8 + 1 + 1 + 1 + 2 + NONCE_BYTES;
pub const MAC_BYTES: usize = 32;
/// Poly1305 tag at the end of every frame.
pub const TAG_BYTES: usize = 16;
/// Bytes of the length prefix of a frame.
pub const LENGTH_BYTES: usize = 4;
/// Largest `Write` payload in one frame; the sender splits larger writes.
pub const WRITE_DATA_BYTES_MAX: usize = 1 << 20;
/// Largest plaintext of one frame: a full write, two 4 KiB paths, a 64 KiB xattr value and
/// the encoding all fit with room to spare.
pub const FRAME_PLAINTEXT_BYTES_MAX: usize = 2 << 20;
/// Largest frame body accepted (ciphertext and tag); anything larger ends the connection.
pub const FRAME_BYTES_MAX: usize = FRAME_PLAINTEXT_BYTES_MAX + TAG_BYTES;
/// Longest error sentence carried by [`Message::Error`]; longer ones are cut.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;
/// Frames per direction before the connection must end (the AEAD nonce is this counter).
pub const FRAMES_PER_CONNECTION_MAX: u64 = u64::MAX - 1;

/// Which end of the stream a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The primary: connects, sends ops.
    Sender,
    /// The secondary: accepts, applies ops, acknowledges.
    Receiver,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Sender => 0,
            Role::Receiver => 1,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Role::Sender => "sender",
            Role::Receiver => "receiver",
        }
    }
}

/// Who is at one end: the module and the node index (0 or 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub module_id: u16,
    pub node: u8,
}

/// One message of the stream, after decryption and decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Sender to receiver: apply `op`; `seq` is one more than the previous op's on this
    /// connection; `checksum` is [`op_checksum`] of `op`, computed at submission.
    Op {
        seq: u64,
        checksum: u64,
        op: Op,
    },
    /// Receiver to sender: every op up to `upto_seq` is applied; with `durable`, it is also on
    /// the receiver's stable storage.
    Ack {
        upto_seq: u64,
        durable: bool,
    },
    /// Receiver to sender: op `seq` could not be applied (nothing after it will be); the
    /// receiver ends the connection. One sentence.
    Error {
        seq: u64,
        message: String,
    },
    /// Liveness probe; the other end answers [`Message::Pong`] with the same id.
    Ping {
        id: u64,
    },
    Pong {
        id: u64,
    },
}

/// Encoding side of the wire messages. Must match [`WireIn`] variant for variant, field for
/// field: postcard encodes a reference like the value. A `Write`'s data follows the encoded
/// message raw, which spares postcard's byte-by-byte encoding of a `Vec<u8>`.
#[derive(Serialize)]
enum WireOut<'a> {
    Op { seq: u64, checksum: u64, op: &'a Op },
    Write { seq: u64, checksum: u64, file: &'a RelPath, offset: u64 },
    Ack { upto_seq: u64, durable: bool },
    Error { seq: u64, message: &'a str },
    Ping { id: u64 },
    Pong { id: u64 },
}

#[derive(Deserialize)]
enum WireIn {
    Op { seq: u64, checksum: u64, op: Op },
    Write { seq: u64, checksum: u64, file: RelPath, offset: u64 },
    Ack { upto_seq: u64, durable: bool },
    Error { seq: u64, message: String },
    Ping { id: u64 },
    Pong { id: u64 },
}

/// The end-to-end checksum of an op: xxh3-64 over its encoding (for a `Write`, the encoded
/// file and offset, then the data).
pub fn op_checksum(op: &Op) -> u64 {
    let mut hasher = Xxh3::new();
    match op {
        Op::Write { file, offset, data } => {
            // Serializing plain data into a Vec cannot fail; an empty prefix would still be
            // computed identically on both sides.
            hasher.update(&postcard::to_allocvec(&(file, offset)).unwrap_or_default());
            hasher.update(data);
        }
        other => hasher.update(&postcard::to_allocvec(other).unwrap_or_default()),
    }
    hasher.digest()
}

/// Why the channel failed: one sentence each.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("the peer did not complete the handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer closed the connection during the handshake: it has a different cluster key or serves another module (its log says why)")]
    ClosedDuringHandshake,
    #[error("the peer does not speak the hamirror replication protocol")]
    NotHamirror,
    #[error("the peer speaks replication protocol version {0} but this node speaks version {v}: run the same hamirror version on both nodes", v = PROTOCOL_VERSION)]
    Version(u8),
    #[error("the peer is not a replication {expected}")]
    WrongRole { expected: &'static str },
    #[error("the peer is module {got}, but this end is module {expected}: check the module ids in userconfig.xml")]
    WrongModule { expected: u16, got: u16 },
    #[error("the peer has node index {0}, the same as this node or not 0 or 1: check cluster.xml on both nodes")]
    WrongNode(u8),
    #[error(
        "the peer failed authentication: the nodes have different cluster keys, or the connection was tampered with"
    )]
    AuthFailed,
    #[error("the peer sent a frame of {0} bytes, more than the {max} allowed", max = FRAME_BYTES_MAX)]
    FrameTooLarge(usize),
    #[error("the peer sent a frame of {0} bytes, too short to hold a tag")]
    FrameTooShort(usize),
    #[error("a frame failed authentication: it was corrupted or forged on the way")]
    FrameAuth,
    #[error("an authenticated frame is malformed: {0}")]
    Malformed(&'static str),
    #[error("the connection ended in the middle of a frame")]
    Truncated,
    #[error("the connection used up its frame counter and must be reopened")]
    CounterExhausted,
    #[error("a message of {0} bytes does not fit in one frame")]
    MessageTooLarge(usize),
}

impl ChannelError {
    /// True for failures that mean the peer does not hold the cluster key (or is not a
    /// well-behaved hamirror), as opposed to a network failure.
    pub fn is_authentication(&self) -> bool {
        matches!(self, ChannelError::AuthFailed | ChannelError::FrameAuth | ChannelError::ClosedDuringHandshake)
    }
}

/// The fixed-size first message of each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hello {
    role: u8,
    node: u8,
    module_id: u16,
    nonce: [u8; NONCE_BYTES],
}

impl Hello {
    fn fresh(role: Role, local: Identity) -> Hello {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        Hello { role: role.byte(), node: local.node, module_id: local.module_id, nonce }
    }

    fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut out = [0u8; HELLO_BYTES];
        out[0..8].copy_from_slice(&HELLO_MAGIC);
        out[8] = PROTOCOL_VERSION;
        out[9] = self.role;
        out[10] = self.node;
        out[11..13].copy_from_slice(&self.module_id.to_be_bytes());
        out[13..].copy_from_slice(&self.nonce);
        out
    }

    /// Parses the peer's hello and checks it against what this end expects.
    fn decode(bytes: &[u8; HELLO_BYTES], expect_role: Role, local: Identity) -> Result<Hello, ChannelError> {
        if bytes[0..8] != HELLO_MAGIC {
            return Err(ChannelError::NotHamirror);
        }
        if bytes[8] != PROTOCOL_VERSION {
            return Err(ChannelError::Version(bytes[8]));
        }
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&bytes[13..]);
        let hello =
            Hello { role: bytes[9], node: bytes[10], module_id: u16::from_be_bytes([bytes[11], bytes[12]]), nonce };
        if hello.role != expect_role.byte() {
            return Err(ChannelError::WrongRole { expected: expect_role.name() });
        }
        if hello.module_id != local.module_id {
            return Err(ChannelError::WrongModule { expected: local.module_id, got: hello.module_id });
        }
        if hello.node > 1 || hello.node == local.node {
            return Err(ChannelError::WrongNode(hello.node));
        }
        Ok(hello)
    }
}

fn handshake_mac(key: &ClusterKey, role: Role, hello_s: &[u8; HELLO_BYTES], hello_r: &[u8; HELLO_BYTES]) -> HmacSha256 {
    // HMAC accepts a key of any length: 32 bytes can never be refused.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key.as_bytes()).expect("HMAC accepts 32-byte keys");
    mac.update(PROTOCOL_LABEL);
    mac.update(if role == Role::Sender { b" sender" } else { b" receiver" });
    mac.update(hello_s);
    mac.update(hello_r);
    mac
}

/// The two directions' AEAD keys of one connection.
fn direction_keys(key: &ClusterKey, hello_s: &Hello, hello_r: &Hello) -> (Key, Key) {
    let mut salt = [0u8; 2 * NONCE_BYTES];
    salt[..NONCE_BYTES].copy_from_slice(&hello_s.nonce);
    salt[NONCE_BYTES..].copy_from_slice(&hello_r.nonce);
    let hkdf = Hkdf::<Sha256>::new(Some(&salt), key.as_bytes());
    let derive = |direction: &[u8]| {
        let mut info = Vec::with_capacity(PROTOCOL_LABEL.len() + direction.len() + 4);
        info.extend_from_slice(PROTOCOL_LABEL);
        info.extend_from_slice(direction);
        info.extend_from_slice(&hello_s.module_id.to_be_bytes());
        info.push(hello_s.node);
        info.push(hello_r.node);
        let mut okm = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
        hkdf.expand(&info, &mut okm).expect("HKDF can expand 32 bytes");
        Key::from(okm)
    };
    (derive(b" sender to receiver"), derive(b" receiver to sender"))
}

/// Reads exactly `buf.len()` bytes before `deadline`.
fn read_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant, timeout: Duration) -> Result<(), ChannelError> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ChannelError::HandshakeTimeout(timeout));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(ChannelError::ClosedDuringHandshake),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(ChannelError::HandshakeTimeout(timeout))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(ChannelError::ClosedDuringHandshake),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn write_by(stream: &mut TcpStream, bytes: &[u8], deadline: Instant, timeout: Duration) -> Result<(), ChannelError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ChannelError::HandshakeTimeout(timeout));
    }
    stream.set_write_timeout(Some(left))?;
    stream.write_all(bytes).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ChannelError::HandshakeTimeout(timeout),
        _ => ChannelError::Io(e),
    })
}

/// Runs the sender's side of the handshake on a connected stream; on success the stream
/// carries frames.
pub fn handshake_sender(
    mut stream: TcpStream,
    key: &ClusterKey,
    local: Identity,
    timeout: Duration,
) -> Result<Channel, ChannelError> {
    let deadline = Instant::now() + timeout;
    let hello_s = Hello::fresh(Role::Sender, local);
    let hello_s_bytes = hello_s.encode();
    write_by(&mut stream, &hello_s_bytes, deadline, timeout)?;
    let mut hello_r_bytes = [0u8; HELLO_BYTES];
    read_by(&mut stream, &mut hello_r_bytes, deadline, timeout)?;
    let hello_r = Hello::decode(&hello_r_bytes, Role::Receiver, local)?;
    let mac_s = handshake_mac(key, Role::Sender, &hello_s_bytes, &hello_r_bytes).finalize().into_bytes();
    write_by(&mut stream, &mac_s, deadline, timeout)?;
    let mut mac_r = [0u8; MAC_BYTES];
    read_by(&mut stream, &mut mac_r, deadline, timeout)?;
    // Constant-time comparison.
    handshake_mac(key, Role::Receiver, &hello_s_bytes, &hello_r_bytes)
        .verify_slice(&mac_r)
        .map_err(|_| ChannelError::AuthFailed)?;
    let (send_key, recv_key) = direction_keys(key, &hello_s, &hello_r);
    Channel::new(stream, Identity { module_id: hello_r.module_id, node: hello_r.node }, send_key, recv_key)
}

/// Runs the receiver's side of the handshake on an accepted stream. The sender's tag is
/// checked before this side sends its own, and before anything else is read.
pub fn handshake_receiver(
    mut stream: TcpStream,
    key: &ClusterKey,
    local: Identity,
    timeout: Duration,
) -> Result<Channel, ChannelError> {
    let deadline = Instant::now() + timeout;
    let mut hello_s_bytes = [0u8; HELLO_BYTES];
    read_by(&mut stream, &mut hello_s_bytes, deadline, timeout)?;
    let hello_s = Hello::decode(&hello_s_bytes, Role::Sender, local)?;
    let hello_r = Hello::fresh(Role::Receiver, local);
    let hello_r_bytes = hello_r.encode();
    write_by(&mut stream, &hello_r_bytes, deadline, timeout)?;
    let mut mac_s = [0u8; MAC_BYTES];
    read_by(&mut stream, &mut mac_s, deadline, timeout)?;
    handshake_mac(key, Role::Sender, &hello_s_bytes, &hello_r_bytes)
        .verify_slice(&mac_s)
        .map_err(|_| ChannelError::AuthFailed)?;
    let mac_r = handshake_mac(key, Role::Receiver, &hello_s_bytes, &hello_r_bytes).finalize().into_bytes();
    write_by(&mut stream, &mac_r, deadline, timeout)?;
    let (s_to_r, r_to_s) = direction_keys(key, &hello_s, &hello_r);
    Channel::new(stream, Identity { module_id: hello_s.module_id, node: hello_s.node }, r_to_s, s_to_r)
}

/// Size of the buffered reader and writer around the socket.
const SOCKET_BUFFER_BYTES: usize = 256 * 1024;

/// An authenticated connection, ready to carry frames.
pub struct Channel {
    pub peer: Identity,
    pub peer_addr: Option<SocketAddr>,
    pub reader: FrameReader<BufReader<TcpStream>>,
    pub writer: FrameWriter<BufWriter<TcpStream>>,
    /// A handle on the socket, to set timeouts or shut it down from another thread.
    pub stream: TcpStream,
}

impl Channel {
    fn new(stream: TcpStream, peer: Identity, send_key: Key, recv_key: Key) -> Result<Channel, ChannelError> {
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        stream.set_nodelay(true)?;
        let reader = BufReader::with_capacity(SOCKET_BUFFER_BYTES, stream.try_clone()?);
        let writer = BufWriter::with_capacity(SOCKET_BUFFER_BYTES, stream.try_clone()?);
        Ok(Channel {
            peer,
            peer_addr: stream.peer_addr().ok(),
            reader: FrameReader::new(reader, recv_key),
            writer: FrameWriter::new(writer, send_key),
            stream,
        })
    }

    /// Ends the connection in both directions (the other threads' reads and writes fail).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn frame_nonce(counter: u64) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::from(nonce)
}

/// Encrypts and writes frames in one direction.
pub struct FrameWriter<W: Write> {
    out: W,
    cipher: ChaCha20Poly1305,
    counter: u64,
    buf: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(out: W, key: Key) -> FrameWriter<W> {
        FrameWriter { out, cipher: ChaCha20Poly1305::new(&key), counter: 0, buf: Vec::new() }
    }

    /// Sends op `seq` with its checksum; the op is borrowed, not copied into a message.
    pub fn send_op(&mut self, seq: u64, checksum: u64, op: &Op) -> Result<(), ChannelError> {
        self.start();
        match op {
            Op::Write { file, offset, data } => {
                self.encode(&WireOut::Write { seq, checksum, file, offset: *offset })?;
                self.buf.extend_from_slice(data);
            }
            other => self.encode(&WireOut::Op { seq, checksum, op: other })?,
        }
        self.finish()
    }

    /// Sends one message (for ops, [`FrameWriter::send_op`] avoids a copy).
    pub fn send(&mut self, message: &Message) -> Result<(), ChannelError> {
        let wire = match message {
            Message::Op { seq, checksum, op } => return self.send_op(*seq, *checksum, op),
            Message::Ack { upto_seq, durable } => WireOut::Ack { upto_seq: *upto_seq, durable: *durable },
            Message::Error { seq, message } => WireOut::Error { seq: *seq, message: cut_sentence(message) },
            Message::Ping { id } => WireOut::Ping { id: *id },
            Message::Pong { id } => WireOut::Pong { id: *id },
        };
        self.start();
        self.encode(&wire)?;
        self.finish()
    }

    /// Sends one frame carrying `plaintext` as it is (see [`FrameReader::poll_raw`]).
    pub fn send_raw(&mut self, plaintext: &[u8]) -> Result<(), ChannelError> {
        self.start();
        self.buf.extend_from_slice(plaintext);
        self.finish()
    }

    /// Pushes buffered frames to the socket.
    pub fn flush(&mut self) -> Result<(), ChannelError> {
        self.out.flush().map_err(ChannelError::Io)
    }

    pub fn get_ref(&self) -> &W {
        &self.out
    }

    fn start(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; LENGTH_BYTES]);
    }

    fn encode(&mut self, wire: &WireOut<'_>) -> Result<(), ChannelError> {
        let buf = std::mem::take(&mut self.buf);
        self.buf = postcard::to_extend(wire, buf).map_err(|_| ChannelError::Malformed("a message does not encode"))?;
        Ok(())
    }

    /// Encrypts the plaintext after the length prefix in place, fills the prefix, appends the
    /// tag and hands the frame to the buffered writer.
    fn finish(&mut self) -> Result<(), ChannelError> {
        let plaintext_len = self.buf.len() - LENGTH_BYTES;
        if plaintext_len > FRAME_PLAINTEXT_BYTES_MAX {
            return Err(ChannelError::MessageTooLarge(plaintext_len));
        }
        if self.counter >= FRAMES_PER_CONNECTION_MAX {
            return Err(ChannelError::CounterExhausted);
        }
        // Fits in u32: bounded by FRAME_BYTES_MAX just above.
        let length = ((plaintext_len + TAG_BYTES) as u32).to_be_bytes();
        self.buf[..LENGTH_BYTES].copy_from_slice(&length);
        let nonce = frame_nonce(self.counter);
        self.counter += 1;
        let (prefix, plaintext) = self.buf.split_at_mut(LENGTH_BYTES);
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce, prefix, plaintext)
            .map_err(|_| ChannelError::MessageTooLarge(plaintext_len))?;
        self.buf.extend_from_slice(&tag);
        self.out.write_all(&self.buf)?;
        Ok(())
    }
}

/// Cuts `message` to [`ERROR_MESSAGE_BYTES_MAX`] on a character boundary.
fn cut_sentence(message: &str) -> &str {
    if message.len() <= ERROR_MESSAGE_BYTES_MAX {
        return message;
    }
    let mut end = ERROR_MESSAGE_BYTES_MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Reads and decrypts frames in one direction.
pub struct FrameReader<R: Read> {
    input: R,
    cipher: ChaCha20Poly1305,
    counter: u64,
    /// The frame being read: the length prefix, then the body.
    buf: Vec<u8>,
    /// Bytes of `buf` filled so far.
    have: usize,
}

impl<R: Read> FrameReader<R> {
    pub fn new(input: R, key: Key) -> FrameReader<R> {
        FrameReader { input, cipher: ChaCha20Poly1305::new(&key), counter: 0, buf: vec![0u8; LENGTH_BYTES], have: 0 }
    }

    pub fn get_ref(&self) -> &R {
        &self.input
    }

    /// The next message, or `None` when the underlying read timed out (a partly read frame is
    /// kept for the next call). Never panics, whatever the bytes.
    pub fn poll(&mut self) -> Result<Option<Message>, ChannelError> {
        self.poll_with(decode_plaintext)
    }

    /// The next frame's plaintext, for protocols other than replication that use this
    /// transport (the peer service); `None` as in [`FrameReader::poll`].
    pub fn poll_raw(&mut self) -> Result<Option<Vec<u8>>, ChannelError> {
        self.poll_with(|plaintext| Ok(plaintext.to_vec()))
    }

    fn poll_with<T>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> Result<T, ChannelError>,
    ) -> Result<Option<T>, ChannelError> {
        loop {
            let need = if self.have < LENGTH_BYTES { LENGTH_BYTES } else { self.buf.len() };
            if self.have == need {
                if need == LENGTH_BYTES {
                    let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
                    if len > FRAME_BYTES_MAX {
                        return Err(ChannelError::FrameTooLarge(len));
                    }
                    if len < TAG_BYTES {
                        return Err(ChannelError::FrameTooShort(len));
                    }
                    self.buf.resize(LENGTH_BYTES + len, 0);
                    continue;
                }
                let message = self.open().and_then(decode);
                self.have = 0;
                self.buf.truncate(LENGTH_BYTES);
                return message.map(Some);
            }
            match self.input.read(&mut self.buf[self.have..need]) {
                Ok(0) if self.have == 0 => return Err(ChannelError::Closed),
                Ok(0) => return Err(ChannelError::Truncated),
                Ok(n) => self.have += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Decrypts and decodes the complete frame in `buf`.
    fn open(&mut self) -> Result<&[u8], ChannelError> {
        if self.counter >= FRAMES_PER_CONNECTION_MAX {
            return Err(ChannelError::CounterExhausted);
        }
        let nonce = frame_nonce(self.counter);
        self.counter += 1;
        let (prefix, body) = self.buf.split_at_mut(LENGTH_BYTES);
        // The length was checked to be at least TAG_BYTES.
        let (ciphertext, tag) = body.split_at_mut(body.len() - TAG_BYTES);
        let tag = Tag::from_slice(tag);
        self.cipher.decrypt_in_place_detached(&nonce, prefix, ciphertext, tag).map_err(|_| ChannelError::FrameAuth)?;
        Ok(ciphertext)
    }
}

fn decode_plaintext(plaintext: &[u8]) -> Result<Message, ChannelError> {
    let (wire, rest) = postcard::take_from_bytes::<WireIn>(plaintext)
        .map_err(|_| ChannelError::Malformed("the message does not decode"))?;
    if !rest.is_empty() && !matches!(wire, WireIn::Write { .. }) {
        return Err(ChannelError::Malformed("trailing bytes after the message"));
    }
    Ok(match wire {
        WireIn::Op { seq, checksum, op } => Message::Op { seq, checksum, op },
        WireIn::Write { seq, checksum, file, offset } => {
            Message::Op { seq, checksum, op: Op::Write { file, offset, data: rest.to_vec() } }
        }
        WireIn::Ack { upto_seq, durable } => Message::Ack { upto_seq, durable },
        WireIn::Error { seq, message } => Message::Error { seq, message: cut_sentence(&message).to_string() },
        WireIn::Ping { id } => Message::Ping { id },
        WireIn::Pong { id } => Message::Pong { id },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn key_pair() -> (Key, Key) {
        (Key::from([1u8; 32]), Key::from([2u8; 32]))
    }

    fn path(p: &str) -> RelPath {
        RelPath::new(0, p).unwrap()
    }

    fn sample_messages() -> Vec<Message> {
        let op = |op: Op| Message::Op { seq: 7, checksum: op_checksum(&op), op };
        vec![
            op(Op::Write { file: path("a/b"), offset: 1 << 40, data: vec![5u8; 70_000] }),
            op(Op::Write { file: path("empty"), offset: 0, data: vec![] }),
            op(Op::Truncate { file: path("a"), size: 9 }),
            op(Op::Rename { from: path("x"), to: path("y"), flags: 1 }),
            op(Op::SetXattr { path: path(""), name: "user.k".into(), value: vec![0, 1, 2], flags: 0 }),
            op(Op::Fsync { file: None, datasync: true }),
            Message::Ack { upto_seq: 12, durable: true },
            Message::Error { seq: 3, message: "no space left".into() },
            Message::Ping { id: 1 },
            Message::Pong { id: u64::MAX },
        ]
    }

    // Every message survives a trip through the writer and the reader, in order.
    #[test]
    fn messages_round_trip_through_frames() {
        let (k, _) = key_pair();
        let mut writer = FrameWriter::new(Vec::new(), k);
        for m in sample_messages() {
            writer.send(&m).unwrap();
        }
        let mut reader = FrameReader::new(Cursor::new(writer.out), k);
        for m in sample_messages() {
            assert_eq!(reader.poll().unwrap(), Some(m));
        }
        assert!(matches!(reader.poll(), Err(ChannelError::Closed)));
    }

    // A flipped bit anywhere in a frame, a frame under the other direction's key, a replayed
    // or reordered frame: each fails authentication, never decodes, never panics.
    #[test]
    fn tampered_replayed_or_misdirected_frames_fail_authentication() {
        let (k, other) = key_pair();
        let mut writer = FrameWriter::new(Vec::new(), k);
        writer.send(&Message::Ping { id: 1 }).unwrap();
        writer.send(&Message::Ping { id: 2 }).unwrap();
        let bytes = writer.out;
        let first_len = LENGTH_BYTES + u32::from_be_bytes(bytes[0..4].try_into().unwrap()) as usize;
        for at in 0..first_len {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            let mut reader = FrameReader::new(Cursor::new(bad), k);
            assert!(reader.poll().is_err(), "flip at {at} accepted");
        }
        let mut reader = FrameReader::new(Cursor::new(bytes.clone()), other);
        assert!(matches!(reader.poll(), Err(ChannelError::FrameAuth)));
        // The second frame alone (as if the first were dropped) is under counter 1, read as 0.
        let mut reader = FrameReader::new(Cursor::new(bytes[first_len..].to_vec()), k);
        assert!(matches!(reader.poll(), Err(ChannelError::FrameAuth)));
        // The first frame twice: the replay is under the wrong counter.
        let mut twice = bytes[..first_len].to_vec();
        twice.extend_from_slice(&bytes[..first_len]);
        let mut reader = FrameReader::new(Cursor::new(twice), k);
        assert!(reader.poll().unwrap().is_some());
        assert!(matches!(reader.poll(), Err(ChannelError::FrameAuth)));
    }

    // A length prefix beyond the bound is refused before anything is allocated or read.
    #[test]
    fn oversized_and_undersized_frames_are_refused() {
        let (k, _) = key_pair();
        let too_big = ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes().to_vec();
        let mut reader = FrameReader::new(Cursor::new(too_big), k);
        assert!(matches!(reader.poll(), Err(ChannelError::FrameTooLarge(_))));
        let mut reader = FrameReader::new(Cursor::new(vec![0, 0, 0, 3, 1, 2, 3]), k);
        assert!(matches!(reader.poll(), Err(ChannelError::FrameTooShort(3))));
        let mut reader = FrameReader::new(Cursor::new(vec![0, 0, 0, 40, 1, 2, 3]), k);
        assert!(matches!(reader.poll(), Err(ChannelError::Truncated)));
        let mut writer = FrameWriter::new(Vec::new(), k);
        let huge = Op::Write { file: path("f"), offset: 0, data: vec![0; FRAME_PLAINTEXT_BYTES_MAX] };
        assert!(matches!(writer.send_op(1, 0, &huge), Err(ChannelError::MessageTooLarge(_))));
    }

    // Random bytes authenticated with the right key still never panic the decoder.
    #[test]
    fn garbage_plaintext_is_malformed_not_a_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = decode_plaintext(&bytes);
        }
    }

    // A read timeout in the middle of a frame loses nothing: the next poll completes it.
    #[test]
    fn a_partly_read_frame_survives_a_timeout() {
        struct Trickle {
            bytes: Vec<u8>,
            at: usize,
            stall: bool,
        }
        impl Read for Trickle {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                self.stall = !self.stall;
                if self.stall {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                if self.at == self.bytes.len() {
                    return Ok(0);
                }
                out[0] = self.bytes[self.at];
                self.at += 1;
                Ok(1)
            }
        }
        let (k, _) = key_pair();
        let mut writer = FrameWriter::new(Vec::new(), k);
        writer.send(&Message::Error { seq: 4, message: "x".repeat(2000) }).unwrap();
        let mut reader = FrameReader::new(Trickle { bytes: writer.out, at: 0, stall: false }, k);
        let mut polls = 0;
        let message = loop {
            polls += 1;
            assert!(polls < 10_000);
            if let Some(m) = reader.poll().unwrap() {
                break m;
            }
        };
        assert_eq!(message, Message::Error { seq: 4, message: "x".repeat(ERROR_MESSAGE_BYTES_MAX) });
    }

    // The checksum covers the file, the offset and the data of a write.
    #[test]
    fn checksum_changes_with_every_part_of_a_write() {
        let w =
            |p: &str, offset: u64, data: &[u8]| op_checksum(&Op::Write { file: path(p), offset, data: data.to_vec() });
        let base = w("f", 0, b"abc");
        assert_eq!(base, w("f", 0, b"abc"));
        assert_ne!(base, w("g", 0, b"abc"));
        assert_ne!(base, w("f", 1, b"abc"));
        assert_ne!(base, w("f", 0, b"abd"));
    }
}
