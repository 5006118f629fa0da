//! A small blocking HTTP/1.1 client for the admin API, over the Unix socket or TCP.
//!
//! One request per connection (`Connection: close`): the CLI sends one or two requests per
//! run, so keeping connections alive would buy nothing.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;

/// Largest answer read from the daemon.
pub const RESPONSE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// How long connecting over TCP may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the client waits for an answer by default (commands may wait for a module).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(180);

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The admin socket (`<state>/hamirror.sock`).
    Unix(PathBuf),
    /// `host:port` of the TCP listener.
    Tcp(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a) => f.write_str(a),
        }
    }
}

/// Why a request got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the hamirror daemon at {0} (is it running?)")]
    Unreachable(String),
    #[error("permission denied on {0}: the admin socket is for root only")]
    PermissionDenied(String),
    #[error("the connection to the hamirror daemon at {endpoint} failed: {error}")]
    Io { endpoint: String, error: io::Error },
    #[error("the hamirror daemon at {endpoint} sent an answer that is not valid HTTP: {why}")]
    BadResponse { endpoint: String, why: String },
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The sentence of an `{"error":"..."}` body, or a description of the status.
    pub fn error_message(&self) -> String {
        #[derive(serde::Deserialize)]
        struct ErrorBody {
            error: String,
        }
        match self.json::<ErrorBody>() {
            Ok(b) => b.error,
            Err(_) => format!("the daemon answered HTTP {}", self.status),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A client of one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    pub endpoint: Endpoint,
    /// Sent as `Authorization: Bearer <token>` when set.
    pub token: Option<String>,
    pub timeout: Duration,
}

impl Client {
    pub fn new(endpoint: Endpoint, token: Option<String>) -> Client {
        Client { endpoint, token, timeout: REPLY_TIMEOUT }
    }

    pub fn get(&self, path: &str) -> Result<Response, ClientError> {
        self.request("GET", path, None)
    }

    /// POST with an optional JSON body.
    pub fn post(&self, path: &str, body: Option<&serde_json::Value>) -> Result<Response, ClientError> {
        let body = body.map(|b| b.to_string().into_bytes());
        self.request("POST", path, body.as_deref())
    }

    /// Sends one request and reads the whole answer.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response, ClientError> {
        let endpoint = self.endpoint.to_string();
        let io_error = |error: io::Error| ClientError::Io { endpoint: endpoint.clone(), error };
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(token) = &self.token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() || method != "GET" {
            request.push_str("Content-Type: application/json\r\n");
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);

        let mut answer = Vec::new();
        match &self.endpoint {
            Endpoint::Unix(p) => {
                let mut s = UnixStream::connect(p).map_err(|e| self.connect_error(e))?;
                s.set_read_timeout(Some(self.timeout)).map_err(io_error)?;
                s.set_write_timeout(Some(self.timeout)).map_err(io_error)?;
                exchange(&mut s, &bytes, &mut answer).map_err(io_error)?;
            }
            Endpoint::Tcp(addr) => {
                let mut s = connect_tcp(addr).map_err(|e| self.connect_error(e))?;
                s.set_read_timeout(Some(self.timeout)).map_err(io_error)?;
                s.set_write_timeout(Some(self.timeout)).map_err(io_error)?;
                exchange(&mut s, &bytes, &mut answer).map_err(io_error)?;
            }
        }
        parse_response(&answer).map_err(|why| ClientError::BadResponse { endpoint, why })
    }

    fn connect_error(&self, e: io::Error) -> ClientError {
        if e.kind() == io::ErrorKind::PermissionDenied {
            ClientError::PermissionDenied(self.endpoint.to_string())
        } else {
            ClientError::Unreachable(self.endpoint.to_string())
        }
    }
}

fn connect_tcp(addr: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr} has no address"));
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn exchange<S: Read + Write>(s: &mut S, request: &[u8], answer: &mut Vec<u8>) -> io::Result<()> {
    s.write_all(request)?;
    s.flush()?;
    s.take(RESPONSE_BYTES_MAX).read_to_end(answer)?;
    Ok(())
}

/// Parses a whole HTTP/1.1 answer: status line, headers, body by `Content-Length`, chunked,
/// or up to the end.
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let head_end = find(raw, b"\r\n\r\n").ok_or("the answer ended before its headers did")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "the headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unexpected status line {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| format!("unexpected status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line.split_once(':').ok_or_else(|| format!("malformed header {line:?}"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let rest = &raw[head_end + 4..];
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        decode_chunked(rest)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| format!("bad Content-Length {len:?}"))?;
        if rest.len() < len {
            return Err(format!("the body ended after {} of {len} bytes", rest.len()));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, headers, body })
}

fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or("a chunk size line is cut")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("a chunk is cut".to_string());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Percent-encodes one path segment or query value.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Answers with a length, chunked, or read to the end all give the same body.
    #[test]
    fn parses_lengths_and_chunks() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"abcde"[..]));
        let r = parse_response(b"HTTP/1.0 503 Busy\r\nX-A: b\r\n\r\nrest").unwrap();
        assert_eq!((r.status, r.body.as_slice(), r.header("x-a")), (503, &b"rest"[..], Some("b")));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
    }

    // Module names with unusual characters cannot change the request path.
    #[test]
    fn encodes_path_components() {
        assert_eq!(encode_component("web-01_a.b"), "web-01_a.b");
        assert_eq!(encode_component("a/b c?"), "a%2Fb%20c%3F");
    }
}
