//! A tiny blocking HTTP/1.1 client over `std::net::TcpStream`, plus a raw-bytes exchange.
//!
//! The integration tests may only use std (and serde_json), so this is the whole client: one
//! request per connection (`Connection: close`), the body sent with `Content-Length`, and the
//! response read as status line, headers and a body delimited by `Content-Length`, chunked
//! encoding or EOF. Every read and write is bounded by one overall deadline, so a hung node makes
//! a test fail with a timeout error instead of hanging it.

use std::io;
use std::io::Read;
use std::io::Write;
use std::net::Shutdown;
use std::net::SocketAddr;
use std::net::TcpStream;
use std::time::Duration;
use std::time::Instant;

use serde_json::Value;

/// Largest response the client accepts; the tests never expect anything near it.
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names are lower-cased; values are trimmed.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8, for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| {
            format!(
                "HTTP {} body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// The `x-revision` header as a number.
    pub fn revision_header(&self) -> Option<u64> {
        self.header("x-revision")?.parse().ok()
    }

    /// One line describing the response, for assertion messages.
    pub fn describe(&self) -> String {
        let mut text = self.text();
        if text.len() > 300 {
            let mut cut = 300;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("...");
        }
        format!("HTTP {} {:?}", self.status, text)
    }
}

/// Sends one request and reads the whole response, all within `timeout`.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> io::Result<Response> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_nodelay(true)?;

    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty()
        && !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    // One write for head and body: a server that rejects early (413) has then usually read it
    // all, so it does not reset the connection over unread bytes before we see its answer.
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    stream.write_all(&bytes)?;

    let mut reader = DeadlineReader {
        stream,
        deadline,
        buf: Vec::new(),
        pos: 0,
    };
    read_response(&mut reader, method == "HEAD")
}

/// One HTTP/1.1 connection kept alive across requests, as a client's connection pool keeps it.
pub struct KeepAlive {
    addr: SocketAddr,
    reader: DeadlineReader,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<KeepAlive> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        let reader = DeadlineReader { stream, deadline: Instant::now() + timeout, buf: Vec::new(), pos: 0 };
        Ok(KeepAlive { addr, reader })
    }

    /// `GET path` on this connection; the answer is read whole, within `timeout`.
    pub fn get(&mut self, path: &str, timeout: Duration) -> io::Result<Response> {
        self.reader.deadline = Instant::now() + timeout;
        let head = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr);
        self.reader.stream.set_write_timeout(Some(remaining(self.reader.deadline)?))?;
        self.reader.stream.write_all(head.as_bytes())?;
        read_response(&mut self.reader, false)
    }
}

/// What a raw exchange produced: the bytes the peer sent, and whether it closed the connection.
#[derive(Debug)]
pub struct RawOutcome {
    pub received: Vec<u8>,
    /// The peer closed (EOF) or reset the connection before the deadline.
    pub closed: bool,
    /// How the exchange ended, for messages.
    pub how: String,
}

/// Writes `bytes` to `addr`, then reads until the peer closes the connection or `deadline`
/// passes. A write error (the peer already closed) counts as closed.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8], deadline: Duration) -> io::Result<RawOutcome> {
    let end = Instant::now() + deadline;
    let mut stream = TcpStream::connect_timeout(&addr, deadline)?;
    stream.set_write_timeout(Some(deadline))?;
    let mut received = Vec::new();
    if let Err(e) = stream.write_all(bytes) {
        return Ok(RawOutcome {
            received,
            closed: true,
            how: format!("write failed: {e}"),
        });
    }
    let _ = stream.flush();
    let mut chunk = [0u8; 4096];
    // Bounded by time (each read waits at most 250 ms) and by count.
    for _ in 0..100_000 {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left.min(Duration::from_millis(250))))?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Ok(RawOutcome {
                    received,
                    closed: true,
                    how: "EOF".into(),
                })
            }
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Ok(RawOutcome {
                    received,
                    closed: true,
                    how: format!("read error: {e}"),
                })
            }
        }
        if received.len() > MAX_RESPONSE {
            break;
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    Ok(RawOutcome {
        received,
        closed: false,
        how: format!("still open after {deadline:?}"),
    })
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "HTTP request deadline passed",
        ))
    } else {
        Ok(left)
    }
}

/// A buffered reader whose every read respects one deadline.
struct DeadlineReader {
    stream: TcpStream,
    deadline: Instant,
    buf: Vec<u8>,
    pos: usize,
}

impl DeadlineReader {
    /// Reads more bytes into the buffer; Ok(false) at EOF.
    fn fill(&mut self) -> io::Result<bool> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        if self.buf.len() > MAX_RESPONSE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response too large",
            ));
        }
        let mut chunk = [0u8; 16 * 1024];
        loop {
            self.stream
                .set_read_timeout(Some(remaining(self.deadline)?))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "HTTP response timed out",
                    ))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One line without its CRLF.
    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf[self.pos..].windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[self.pos..self.pos + i]).into_owned();
                self.pos += i + 2;
                return Ok(line);
            }
            if !self.fill()? {
                return Err(unexpected_eof("in a header line"));
            }
        }
    }

    /// Exactly `n` bytes.
    fn exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() - self.pos < n {
            if !self.fill()? {
                return Err(unexpected_eof("in the body"));
            }
        }
        let out = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(out)
    }

    /// Everything up to EOF.
    fn until_eof(&mut self) -> io::Result<Vec<u8>> {
        while self.fill()? {}
        let out = self.buf[self.pos..].to_vec();
        self.pos = self.buf.len();
        Ok(out)
    }
}

fn unexpected_eof(where_: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("connection closed {where_}"),
    )
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn read_response(r: &mut DeadlineReader, head_only: bool) -> io::Result<Response> {
    // Interim 1xx responses are skipped; bounded because each one consumes input.
    for _ in 0..16 {
        let status_line = r.line()?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .filter(|_| version.starts_with("HTTP/1."))
            .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = r.line()?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
            if headers.len() > 200 {
                return Err(invalid("too many headers".into()));
            }
        }
        if (100..200).contains(&status) {
            continue;
        }
        let find = |n: &str| headers.iter().find(|(h, _)| h == n).map(|(_, v)| v.clone());
        let body = if head_only || status == 204 || status == 304 {
            Vec::new()
        } else if find("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            read_chunked(r)?
        } else if let Some(len) = find("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| invalid(format!("bad content-length {len:?}")))?;
            if len > MAX_RESPONSE {
                return Err(invalid(format!("content-length {len} too large")));
            }
            r.exact(len)?
        } else {
            r.until_eof()?
        };
        return Ok(Response {
            status,
            headers,
            body,
        });
    }
    Err(invalid("too many interim responses".into()))
}

fn read_chunked(r: &mut DeadlineReader) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = r.line()?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
        if size == 0 {
            // Trailers, up to the empty line.
            for _ in 0..200 {
                if r.line()?.is_empty() {
                    return Ok(body);
                }
            }
            return Err(invalid("too many trailers".into()));
        }
        if body.len() + size > MAX_RESPONSE {
            return Err(invalid("chunked body too large".into()));
        }
        body.extend_from_slice(&r.exact(size)?);
        if !r.line()?.is_empty() {
            return Err(invalid("chunk not followed by CRLF".into()));
        }
    }
}
