//! The first request head of every client connection, read and checked before hyper sees it,
//! so that a malformed one is answered like any other bad input: a JSON 400 (414, 431) with a
//! message, then the connection closed (the brief: "malformed HTTP → 400 with a message").
//!
//! Why a wrapper around the connection: hyper answers a request it cannot parse itself, with a
//! bare status and no body, and offers no hook to make that answer. Here the bytes of a
//! connection's first head are held back from hyper until they parse (with `httparse`, the
//! parser hyper uses, with hyper's defaults: at most 100 headers): a whole, valid head is then
//! handed on unchanged, together with whatever followed it; an invalid one never reaches hyper,
//! which sees a connection closed before any request and ends quietly, while this wrapper
//! writes the JSON answer. Only the first head: after it the bytes pass straight through, as
//! following heads start wherever the previous request's body ends, which only hyper knows.
//! A malformed request later on a kept-alive connection still gets hyper's bare answer; clients
//! that send one are rare, a connection's first bytes being garbage is the usual case (a port
//! scan, a TLS client on the plain port, a typo in a hand-written request). The HTTP/2 prior
//! knowledge preface passes untouched, and the check costs one parse per connection.
//!
//! It also counts the bytes of every HTTP/1 head being read in the heads budget
//! (`HttpSettings::heads`, `Reading`): a head may take 408 KiB before it parses, held here for
//! the first and in hyper's read buffer for later ones, and `--max-connections` clients sending
//! such heads slowly held 4 GiB outside any budget. What is read while no request is under way
//! on an HTTP/1 connection is a head (and what came with it); it counts from the read until
//! its request begins (the service then counts the parsed head, `count_head`) or the connection
//! ends. Past a full budget a first head is refused with a 503, and a later one waits to be
//! read (hyper holds it, and the connection's idle timeout bounds the wait); the first
//! `UNCHECKED_HEAD` bytes of each are read regardless and counted only past them, so a probe's head still passes and a usual one costs the shared counter nothing.

use std::io;
use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::task::Poll;

use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;

/// Bytes of a first head held back at most: hyper's own bound on a head (its read buffer's
/// default, `8192 + 4096 * 100`), past which it would refuse it (431), here with a message.
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// A request line that grew past this without its end is judged once then (`open_uri_too_long`),
/// whatever the other rules of `judge_now` say.
const MAX_REQUEST_LINE: usize = MAX_URI + 32;
/// The longest request target hyper takes (`u16::MAX - 1` bytes).
const MAX_URI: usize = 65_534;
/// Below this, a head is judged at every read (a parse of a few KiB costs little), so that
/// short garbage without a line break is answered at once.
const ALWAYS_JUDGED: usize = 2048;
/// Headers a request may have, as hyper's default.
const MAX_HEADERS: usize = 100;
/// Bytes read and dropped after a refusal at most (`State::Draining`).
const MAX_DRAINED: usize = 1 << 20;
/// How long after a refusal what the client still sends is read and dropped at most, as
/// nginx's `lingering_timeout`: a client that keeps its socket open without sending holds the
/// connection's place this long, not until the header timeout.
const MAX_LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes of one head read whether or not the heads budget has room: a probe's or a usual
/// request's head, so a budget that attackers fill does not make the node look dead (the
/// probes are counted past it by `count_head` too). At most this plus one read over the budget
/// per connection.
const UNCHECKED_HEAD: usize = 4096;
/// The most one read takes while it is counted as a head's (a later head: hyper would read up
/// to its buffer's room, a few hundred KiB, at once).
const COUNTED_READ: usize = 4096;
/// The most one read takes on an HTTP/1 connection while a request is under way (uncounted:
/// its body is counted where the handler reads it). hyper reads into all of its buffer's room
/// (up to 408 KiB once earlier reads filled it) also when it only looks for the connection's
/// end while it answers, and a pipelined next head would sit there uncounted: this bounds
/// that to one read per connection.
const UNDER_WAY_READ: usize = 16 * 1024;
/// How often a later head's read that waits for room in the heads budget looks again.
const ROOM_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// The bytes of the heads being read on one connection, counted in the node's heads budget
/// (see the module): added by `FirstHead`'s reads, given back when a request begins
/// (`release`, from `Activity::begin`), at a refusal, or when dropped with the connection.
#[derive(Debug, Default)]
pub struct Reading {
    /// `None`: nothing is counted (a test's connection).
    budget: Option<super::BodyBudget>,
    bytes: std::sync::atomic::AtomicUsize,
}

impl Reading {
    pub fn new(budget: super::BodyBudget) -> Reading {
        Reading { budget: Some(budget), bytes: 0.into() }
    }

    /// Whether another head read may take `COUNTED_READ` bytes: the head so far is short, or
    /// the budget has room for them.
    fn may_read(&self) -> bool {
        let Some(budget) = &self.budget else { return true };
        self.bytes.load(std::sync::atomic::Ordering::Relaxed) < UNCHECKED_HEAD || budget.held().saturating_add(COUNTED_READ) <= budget.total()
    }

    /// Whether the head so far and another read would not fit into the whole budget (a 431,
    /// as `count_head` answers a parsed head larger than the budget).
    fn past_whole_budget(&self) -> bool {
        self.budget.as_ref().is_some_and(|budget| self.bytes.load(std::sync::atomic::Ordering::Relaxed).saturating_add(COUNTED_READ) > budget.total())
    }

    /// Counts `n` more bytes of the head: in the budget only past its first `UNCHECKED_HEAD`
    /// bytes, which are read regardless (a usual head then costs the node-wide counter nothing).
    fn count(&self, n: usize) {
        if let Some(budget) = &self.budget {
            let before = self.bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            let shared = (before + n).saturating_sub(UNCHECKED_HEAD) - before.saturating_sub(UNCHECKED_HEAD);
            if shared > 0 {
                budget.0.used.fetch_add(shared, std::sync::atomic::Ordering::AcqRel);
            }
        }
    }

    /// Gives back what is counted: the head was parsed (its request holds it now), refused, or
    /// the connection ended.
    pub fn release(&self) {
        if let Some(budget) = &self.budget {
            let shared = self.bytes.swap(0, std::sync::atomic::Ordering::Relaxed).saturating_sub(UNCHECKED_HEAD);
            if shared > 0 {
                budget.0.used.fetch_sub(shared, std::sync::atomic::Ordering::AcqRel);
            }
        }
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.release();
    }
}

/// What `FirstHead` needs of its connection to count heads: the count, and whether a request
/// is under way (what is read then is a body's or the next pipelined head's, which hyper reads
/// only as far as the request needs).
pub trait Heads: Send + Sync {
    fn reading(&self) -> &Reading;
    fn under_way(&self) -> bool;
}

/// A connection whose first request head is checked before it is read through (see the module).
pub struct FirstHead<S> {
    inner: S,
    state: State,
    /// Where heads' bytes are counted (`None`: nowhere, a test's connection).
    heads: Option<std::sync::Arc<dyn Heads>>,
    /// Set once the HTTP/2 preface passed: frames are not heads, and nothing is counted.
    h2: bool,
    /// A later head's read waiting for room in the heads budget: when to look again.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

enum State {
    /// Reading the first head; nothing handed on yet. With what was judged (see `Judged`).
    Gathering(Vec<u8>, Judged),
    /// Handing on what was held back, from `.1` on.
    Releasing(Vec<u8>, usize),
    /// Writing the refusal from `.1` on; then its end is sent (the write side shut down).
    Refusing(Vec<u8>, usize),
    /// Refused and answered: what the client still sends is read and dropped (at most
    /// `MAX_DRAINED` bytes) until it closes, as nginx's lingering close does. Closed at once,
    /// a socket with unread bytes is reset, and a reset can cost the client the answer before
    /// it has read it. Ends at `MAX_LINGER` (the timer) too.
    Draining(usize, Pin<Box<tokio::time::Sleep>>),
    /// Refused and answered: reads as closed.
    Refused,
    /// Past the first head: every byte passes.
    Through,
}

/// How often a gathering head was judged, and its length then: past `ALWAYS_JUDGED` bytes it is
/// judged again only when a line ended (at most `MAX_LINE_JUDGEMENTS` times) or 4 KiB more
/// came, so a client that sends its head a byte at a time costs a few hundred parses, not one
/// per byte.
#[derive(Default)]
struct Judged {
    /// Reads that ended a line of the head.
    lines: usize,
    /// Whether anything but empty lines came.
    started: bool,
    len: usize,
}

const MAX_LINE_JUDGEMENTS: usize = 2 * MAX_HEADERS;

/// What the bytes held so far say.
enum Verdict {
    /// A whole head (or the HTTP/2 preface): hand it on.
    Pass,
    /// Not enough to tell yet.
    More,
    /// Refuse with this status and message.
    Refuse(u16, String),
}

fn judge(held: &[u8]) -> Verdict {
    // The HTTP/2 preface, or the start of it, is hyper's to read (its h2 side parses frames).
    let n = held.len().min(H2_PREFACE.len());
    if held[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Verdict::Pass } else { Verdict::More };
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(held) {
        Ok(httparse::Status::Complete(_)) => match after_parse(&req) {
            Ok(()) => Verdict::Pass,
            Err((status, message)) => Verdict::Refuse(status, message),
        },
        Ok(httparse::Status::Partial) if open_uri_too_long(held) => {
            Verdict::Refuse(414, format!("the request target is longer than {MAX_URI} bytes"))
        }
        Ok(httparse::Status::Partial) if held.len() < MAX_HEAD => Verdict::More,
        Ok(httparse::Status::Partial) => Verdict::Refuse(431, format!("the request's head is longer than {MAX_HEAD} bytes")),
        Err(httparse::Error::TooManyHeaders) => Verdict::Refuse(431, format!("more than {MAX_HEADERS} request headers")),
        Err(e) => Verdict::Refuse(400, format!("malformed HTTP request: {e}")),
    }
}

/// Whether a request line that has not ended holds a request target longer than hyper takes
/// (after the empty lines a request may start with, and its method): such a target is a 414
/// once the line ends, as hyper answers it; a line without a target yet waits for the head's
/// bound (431, as hyper).
fn open_uri_too_long(held: &[u8]) -> bool {
    let line = held.iter().position(|b| !matches!(b, b'\r' | b'\n')).map_or(&held[held.len()..], |i| &held[i..]);
    if line.contains(&b'\n') {
        return false;
    }
    let Some(space) = line.iter().position(|b| *b == b' ') else { return false };
    let target = &line[space + 1..];
    target.iter().position(|b| matches!(b, b' ' | b'\r')).unwrap_or(target.len()) > MAX_URI
}

/// What hyper checks of a head that parsed, before it takes it (`Server::parse` in hyper's
/// `proto::h1::role`), so that a head it would refuse is refused here with a message: the URI's
/// length and form, a header name's length, `Transfer-Encoding` (not in HTTP/1.0; `chunked`
/// last) and `Content-Length` (digits; several must agree; ignored after `Transfer-Encoding`).
fn after_parse(req: &httparse::Request<'_, '_>) -> Result<(), (u16, String)> {
    let path = req.path.unwrap_or("");
    if path.len() > MAX_URI {
        return Err((414, format!("the request target is longer than {MAX_URI} bytes")));
    }
    if req.headers.iter().any(|h| h.name.len() >= 1 << 16) {
        return Err((431, "a header name is longer than 64 KiB".into()));
    }
    if http::Uri::try_from(path).is_err() {
        return Err((400, "malformed HTTP request: the request target is not a URI".into()));
    }
    let http11 = req.version == Some(1);
    let (mut te, mut chunked, mut cl, mut length) = (false, false, false, None::<u64>);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !http11 {
                return Err((400, "malformed HTTP request: Transfer-Encoding in an HTTP/1.0 request".into()));
            }
            te = true;
            if cl {
                length = None;
            }
            // As hyper reads it (`HeaderValue::to_str`): visible ASCII and tabs, or not chunked.
            let text = h.value.iter().all(|b| *b == b'\t' || (0x20..0x7f).contains(b));
            chunked = text && std::str::from_utf8(h.value).ok().and_then(|v| v.rsplit(',').next()).is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            cl = true;
            if te {
                continue;
            }
            let digits = !h.value.is_empty() && h.value.iter().all(u8::is_ascii_digit);
            let Some(len) = std::str::from_utf8(h.value).ok().filter(|_| digits).and_then(|v| v.parse::<u64>().ok()) else {
                return Err((400, "malformed HTTP request: Content-Length is not a number".into()));
            };
            // In hyper's order: a repeat must equal the first, whose size alone is bounded.
            match length {
                Some(l) if l != len => return Err((400, "malformed HTTP request: Content-Length headers that differ".into())),
                Some(_) => continue,
                None if len > u64::MAX - 2 => return Err((431, "Content-Length is larger than a body may be".into())),
                None => length = Some(len),
            }
        }
    }
    if te && !chunked {
        return Err((400, "malformed HTTP request: Transfer-Encoding without chunked last".into()));
    }
    Ok(())
}

/// `judge`, when `held` (grown from `start` bytes) is worth judging again (see `Judged`).
fn judge_now(held: &[u8], start: usize, judged: &mut Judged) -> Verdict {
    // Empty lines before the request line (RFC 9112 §2.2) end no line of the head. Only the
    // new bytes are looked at: a byte-at-a-time client must not make each read scan the head.
    judged.started = judged.started || held[start..].iter().any(|b| !matches!(b, b'\r' | b'\n'));
    let line_ended = judged.started && held[start..].contains(&b'\n');
    if line_ended {
        judged.lines += 1;
        if judged.lines > MAX_LINE_JUDGEMENTS {
            // More lines than a head within the bounds has (each such read ended one).
            return Verdict::Refuse(431, format!("more than {MAX_HEADERS} request headers"));
        }
    }
    let short = start <= ALWAYS_JUDGED;
    let long_line = held.len() > MAX_REQUEST_LINE && judged.len <= MAX_REQUEST_LINE;
    if !(line_ended || short || long_line || held.len() >= judged.len + 4096 || held.len() >= MAX_HEAD) {
        return Verdict::More;
    }
    judged.len = held.len();
    judge(held)
}

/// The whole answer to a refused head: JSON like every error of the API (`ApiError`), and the
/// connection closed after it.
fn refusal(status: u16, message: &str) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Bad Request");
    let body = serde_json::json!({ "status": status, "message": message }).to_string();
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    // A 503 (the heads budget full) frees within seconds, as `ApiError::Busy`'s does.
    let retry = if status == 503 { "retry-after: 1\r\n" } else { "" };
    format!("HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{retry}date: {date}\r\n\r\n{body}", body.len())
        .into_bytes()
}

impl<S> FirstHead<S> {
    pub fn new(inner: S) -> FirstHead<S> {
        FirstHead { inner, state: State::Gathering(Vec::new(), Judged::default()), heads: None, h2: false, pause: None }
    }

    /// Counting the heads read in the connection's `heads` (see the module).
    pub fn counted(inner: S, heads: std::sync::Arc<dyn Heads>) -> FirstHead<S> {
        FirstHead { heads: Some(heads), ..FirstHead::new(inner) }
    }

    /// Before a read in `State::Through`: the most it may take when what it reads counts as a
    /// head (`None`: it does not count), or pending while the heads budget has no room for
    /// more of this one (looked at again every `ROOM_POLL`).
    /// (`Some((most, counted))`: the most it may take, and whether it counts as a head's).
    fn through_room(&mut self, cx: &mut Context<'_>) -> Poll<Option<(usize, bool)>> {
        let Some(heads) = self.heads.as_ref().filter(|_| !self.h2) else { return Poll::Ready(None) };
        if heads.under_way() {
            self.pause = None;
            return Poll::Ready(Some((UNDER_WAY_READ, false)));
        }
        // Bounded: a fresh timer is pending, so the second pass returns.
        loop {
            if heads.reading().may_read() {
                self.pause = None;
                return Poll::Ready(Some((COUNTED_READ, true)));
            }
            let timer = self.pause.get_or_insert_with(|| {
                metrics::counter!("raftbridge_http_head_reads_paused_total").increment(1);
                Box::pin(tokio::time::sleep(ROOM_POLL))
            });
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => self.pause = Some(Box::pin(tokio::time::sleep(ROOM_POLL))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for FirstHead<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Bounded: each pass either returns or moves the state on (gathering reads at least a
        // byte per pass, or returns; releasing and refusing end with their buffers, draining
        // with `MAX_DRAINED` or `MAX_LINGER`).
        loop {
            match &mut this.state {
                State::Through => {
                    let Some((most, counted)) = std::task::ready!(this.through_room(cx)) else {
                        return Pin::new(&mut this.inner).poll_read(cx, out);
                    };
                    // Room for no more than the bound: read in place, no copy (most reads).
                    if out.remaining() <= most {
                        let before = out.filled().len();
                        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                        if let Some(heads) = this.heads.as_ref().filter(|_| counted) {
                            heads.reading().count(out.filled().len() - before);
                        }
                        return Poll::Ready(Ok(()));
                    }
                    // A bounded piece, read into a scratch (a `ReadBuf` cannot be limited in place
                    // without unsafe code), then handed on; a head's is counted.
                    let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); UNDER_WAY_READ];
                    let mut buf = ReadBuf::uninit(&mut scratch[..most.min(out.remaining())]);
                    std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf))?;
                    if let Some(heads) = this.heads.as_ref().filter(|_| counted) {
                        heads.reading().count(buf.filled().len());
                    }
                    out.put_slice(buf.filled());
                    return Poll::Ready(Ok(()));
                }
                State::Refused => return Poll::Ready(Ok(())),
                State::Releasing(held, at) => {
                    let n = (held.len() - *at).min(out.remaining());
                    out.put_slice(&held[*at..*at + n]);
                    *at += n;
                    if *at == held.len() {
                        this.state = State::Through;
                    }
                    return Poll::Ready(Ok(()));
                }
                State::Refusing(answer, at) => {
                    while *at < answer.len() {
                        match Pin::new(&mut this.inner).poll_write(cx, &answer[*at..]) {
                            Poll::Ready(Ok(0)) => break,
                            Poll::Ready(Ok(n)) => *at += n,
                            Poll::Ready(Err(_)) => break,
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    if Pin::new(&mut this.inner).poll_flush(cx).is_pending() || Pin::new(&mut this.inner).poll_shutdown(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.state = State::Draining(0, Box::pin(tokio::time::sleep(MAX_LINGER)));
                }
                State::Draining(dropped, linger) => {
                    if linger.as_mut().poll(cx).is_ready() {
                        this.state = State::Refused;
                        continue;
                    }
                    let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
                    let mut buf = ReadBuf::uninit(&mut scratch);
                    match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() && *dropped + buf.filled().len() <= MAX_DRAINED => {
                            *dropped += buf.filled().len();
                        }
                        _ => this.state = State::Refused,
                    }
                }
                State::Gathering(held, judged) => {
                    let start = held.len();
                    if let Some(heads) = this.heads.as_ref().filter(|heads| !heads.reading().may_read()) {
                        metrics::counter!("raftbridge_http_heads_refused_total").increment(1);
                        this.state = State::Refusing(
                            match heads.reading().past_whole_budget() {
                                true => refusal(431, "the request's head is larger than --max-body-buffered allows"),
                                false => refusal(503, "this node holds as many bytes of request headers as --max-body-buffered allows: retry shortly"),
                            },
                            0,
                        );
                        heads.reading().release();
                        continue;
                    }
                    // Read into a scratch that is not zeroed first (a byte-at-a-time client would
                    // make each read clear it), then kept.
                    let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
                    let room = (MAX_HEAD + 1 - start).min(scratch.len());
                    let mut buf = ReadBuf::uninit(&mut scratch[..room]);
                    let read = Pin::new(&mut this.inner).poll_read(cx, &mut buf);
                    let got = buf.filled().len();
                    held.extend_from_slice(buf.filled());
                    if let Some(heads) = &this.heads {
                        heads.reading().count(got);
                    }
                    match read {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        // Closed before a whole head: hyper is given what came and ends it as
                        // it would have.
                        Poll::Ready(Ok(())) if got == 0 => {
                            let held = std::mem::take(held);
                            this.state = if held.is_empty() { State::Through } else { State::Releasing(held, 0) };
                        }
                        Poll::Ready(Ok(())) => match judge_now(held, start, judged) {
                            Verdict::More => {}
                            Verdict::Pass => {
                                if held.starts_with(H2_PREFACE) {
                                    this.h2 = true;
                                    if let Some(heads) = &this.heads {
                                        heads.reading().release();
                                    }
                                }
                                this.state = State::Releasing(std::mem::take(held), 0);
                            }
                            Verdict::Refuse(status, message) => {
                                if let Some(heads) = &this.heads {
                                    heads.reading().release();
                                }
                                metrics::counter!("raftbridge_http_requests_total", "route" => "malformed", "status" => status.to_string()).increment(1);
                                tracing::debug!(status, %message, "refused a connection's first request head");
                                this.state = State::Refusing(refusal(status, &message), 0);
                            }
                        },
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstHead<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// What a server reading through `FirstHead` gets of `sent` (sent in `pieces`), and what
    /// the client gets back.
    async fn through(sent: &[u8], pieces: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut server = FirstHead::new(server);
        let step = sent.len().div_ceil(pieces.max(1)).max(1);
        let sent = sent.to_vec();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(step) {
                client.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut read = Vec::new();
        server.read_to_end(&mut read).await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        (read, writer.await.unwrap())
    }

    #[tokio::test]
    async fn a_valid_head_and_what_follows_pass_unchanged() {
        let req = b"POST /v1/events/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}GARBAGE after the first head";
        for pieces in [1, 3, 40, req.len()] {
            let (read, back) = through(req, pieces).await;
            assert_eq!((read.as_slice(), back.as_slice()), (&req[..], &b""[..]), "in {pieces} pieces");
        }
        let h2 = [H2_PREFACE, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"].concat();
        assert_eq!(through(&h2, 5).await.0, h2, "the HTTP/2 preface passes");
        assert_eq!(through(b"\r\nGET / HTTP/1.1\r\n\r\n", 1).await.0, b"\r\nGET / HTTP/1.1\r\n\r\n", "a leading empty line, as hyper takes it");
        for valid in [
            &b"POST / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\n{}"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: x\r\n\r\n0\r\n\r\n",
            b"GET http://a:8/x?y=%20 HTTP/1.1\r\nx-e:\r\nx-t: a\tb\r\n\r\n",
            b"OPTIONS * HTTP/1.0\r\n\r\n",
            &[vec![b'A'; 70_000], b" /x HTTP/1.1\r\n\r\n".to_vec()].concat(),
            &[b"\r\n".repeat(40_000), b"GET /x HTTP/1.1\r\n\r\n".to_vec()].concat(),
        ] {
            assert_eq!(through(valid, 1).await, (valid.to_vec(), Vec::new()), "{}", String::from_utf8_lossy(valid));
        }
        let blank_lines = [b"\r\n".repeat(300).as_slice(), b"GET / HTTP/1.1\r\n\r\n"].concat();
        assert_eq!(through(&blank_lines, blank_lines.len()).await.0, blank_lines, "empty lines sent one by one are no header lines");
    }

    #[tokio::test]
    async fn a_malformed_head_is_answered_with_json_and_never_read_through() {
        let long_line = [b"GET /".as_slice(), &vec![b'a'; MAX_REQUEST_LINE + 10]].concat();
        let many = [b"GET / HTTP/1.1\r\n".as_slice(), &b"x: y\r\n".repeat(MAX_HEADERS + 1), b"\r\n"].concat();
        let long_headers = [b"GET / HTTP/1.1\r\nx: ".as_slice(), &vec![b'a'; MAX_HEAD + 10]].concat();
        let uri_too_long = [b"GET /".as_slice(), &vec![b'a'; MAX_URI], b" HTTP/1.1\r\n\r\n"].concat();
        let open_target = [b"GET /".as_slice(), &vec![b'a'; MAX_URI + 10]].concat();
        for (sent, status) in [
            (&b"GARBAGE\r\n\r\n"[..], 400),
            (b"\x00\x01\x02\x03 nonsense \xff\xfe\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
            (&long_line, 414),
            (&many, 431),
            (&long_headers, 431),
            (b"GARBAGE GARBAGE GARBAGE GARBAGE", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"GET http://[::1/x HTTP/1.1\r\n\r\n", 400),
            (&uri_too_long, 414),
            (&open_target, 414),
            (b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\nContent-Length: 2\r\n\r\n", 431),
            (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 18446744073709551615\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: \xc2\xa0chunked\r\n\r\n", 400),
        ] {
            // In two pieces, and a byte at a time (each judged only at a line's end).
            let (read, back) = through(sent, if sent.len() < 4096 { sent.len() } else { 2 }).await;
            assert!(read.is_empty(), "nothing of it is read through ({status})");
            let text = String::from_utf8_lossy(&back);
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
            let body: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            assert_eq!(body["status"], status, "{text}");
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{text}");
            assert!(text.contains("connection: close\r\n") && text.contains("\r\ndate: "), "{text}");
        }
    }

    /// A refused client that keeps its socket open and sends nothing more holds the connection
    /// for `MAX_LINGER`, not until it closes.
    #[tokio::test(start_paused = true)]
    async fn a_refused_client_that_stays_silent_is_let_go_after_the_linger() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut server = FirstHead::new(server);
        client.write_all(b"GARBAGE\r\n\r\n").await.unwrap();
        let started = tokio::time::Instant::now();
        let mut read = Vec::new();
        server.read_to_end(&mut read).await.unwrap();
        assert!(read.is_empty());
        assert_eq!(started.elapsed(), MAX_LINGER, "ended by the linger, the client still open");
        let mut back = vec![0; 1024];
        let n = client.read(&mut back).await.unwrap();
        assert!(back[..n].starts_with(b"HTTP/1.1 400 "), "{}", String::from_utf8_lossy(&back[..n]));
    }

    /// A connection's side of the heads' count, as `Activity` is: whether a request is under
    /// way is the test's to set.
    struct Conn {
        reading: Reading,
        under_way: std::sync::atomic::AtomicBool,
    }

    impl Heads for Conn {
        fn reading(&self) -> &Reading {
            &self.reading
        }

        fn under_way(&self) -> bool {
            self.under_way.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    fn counting(budget: &super::super::BodyBudget) -> std::sync::Arc<Conn> {
        std::sync::Arc::new(Conn { reading: Reading::new(budget.clone()), under_way: false.into() })
    }

    /// What the client of a refused first head gets back, and its status line.
    async fn refused_with(budget: &super::super::BodyBudget, sent: &[u8]) -> String {
        let conn = counting(budget);
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut server = FirstHead::counted(server, conn.clone());
        client.write_all(sent).await.unwrap();
        client.shutdown().await.unwrap();
        let mut read = Vec::new();
        server.read_to_end(&mut read).await.unwrap();
        assert!(read.is_empty(), "nothing of a refused head is read through");
        assert_eq!(conn.reading.bytes(), 0, "a refused head's count is given back");
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        String::from_utf8_lossy(&back).into_owned()
    }

    /// A first head counts in the heads budget as it is read: past a full budget it is refused
    /// with a JSON 503 and `Retry-After`, and one that cannot fit into the whole budget with a
    /// 431; a short head (a probe's) passes a full budget; a passed head stays counted until
    /// its request begins, and the HTTP/2 preface is not counted.
    #[tokio::test]
    async fn a_first_head_counts_in_the_heads_budget_as_it_is_read() {
        let budget = super::super::BodyBudget::new(64 * 1024);
        let mut full = super::super::Held::default();
        budget.count_anyway(&mut full, 60 * 1024);
        let long = [b"GET / HTTP/1.1\r\nx: ".as_slice(), &vec![b'a'; 20 * 1024], b"\r\n\r\n"].concat();
        let answer = refused_with(&budget, &long).await;
        assert!(answer.starts_with("HTTP/1.1 503 ") && answer.contains("retry-after: 1\r\n"), "{answer}");
        assert!(answer.contains("--max-body-buffered"), "{answer}");
        assert_eq!(budget.held(), 60 * 1024, "only what others hold");
        drop(full);
        let small = super::super::BodyBudget::new(8 * 1024);
        let answer = refused_with(&small, &long).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "larger than the whole budget: {answer}");
        assert_eq!(small.held(), 0);

        // A probe's head passes a full budget, counted until its request begins.
        let mut full = super::super::Held::default();
        budget.count_anyway(&mut full, 64 * 1024);
        let conn = counting(&budget);
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut server = FirstHead::counted(server, conn.clone());
        let probe = b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n";
        client.write_all(probe).await.unwrap();
        let mut got = vec![0u8; probe.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, probe);
        assert_eq!((conn.reading.bytes(), budget.held()), (probe.len(), 64 * 1024), "a short head is not in the budget");
        conn.reading.release();
        assert_eq!((conn.reading.bytes(), budget.held()), (0, 64 * 1024));
        drop(full);

        // HTTP/2 frames are not heads.
        let conn = counting(&budget);
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut server = FirstHead::counted(server, conn.clone());
        let h2 = [H2_PREFACE, &[0u8; 4000]].concat();
        client.write_all(&h2).await.unwrap();
        let mut got = vec![0u8; h2.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!((conn.reading.bytes(), budget.held()), (0, 0));
    }

    /// Later heads on a kept-alive connection count while no request is under way (what is read
    /// during one is its body's, counted where it is read); past a full budget the read waits
    /// for room instead of taking more, and goes on once there is some.
    #[tokio::test(start_paused = true)]
    async fn a_later_head_counts_and_waits_for_room_in_a_full_budget() {
        let budget = super::super::BodyBudget::new(64 * 1024);
        let conn = counting(&budget);
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut server = FirstHead::counted(server, conn.clone());
        let first = b"POST /a HTTP/1.1\r\ncontent-length: 3\r\n\r\n";
        client.write_all(first).await.unwrap();
        let mut got = vec![0u8; first.len()];
        server.read_exact(&mut got).await.unwrap();
        // The request begins: its body is read uncounted.
        conn.under_way.store(true, std::sync::atomic::Ordering::Relaxed);
        conn.reading.release();
        client.write_all(b"abc").await.unwrap();
        let mut body = [0u8; 3];
        server.read_exact(&mut body).await.unwrap();
        assert_eq!((&body, conn.reading.bytes()), (b"abc", 0));
        conn.under_way.store(false, std::sync::atomic::Ordering::Relaxed);

        // The next head: 12 KiB of it with others holding all of the budget.
        let mut full = super::super::Held::default();
        budget.count_anyway(&mut full, 64 * 1024);
        client.write_all(&[b"GET /b HTTP/1.1\r\nx: ".as_slice(), &vec![b'b'; 12 * 1024]].concat()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf)).await {
            assert!(n > 0 && n <= COUNTED_READ, "a bounded read: {n}");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.len() >= UNCHECKED_HEAD && got.len() < UNCHECKED_HEAD + COUNTED_READ, "read up to the unchecked part: {}", got.len());
        assert_eq!(conn.reading.bytes(), got.len());
        drop(full);
        let reader = tokio::spawn(async move {
            let mut rest = vec![0u8; 12 * 1024 + 20 - got.len()];
            server.read_exact(&mut rest).await.map(|_| server)
        });
        let server = reader.await.unwrap().expect("read on once the budget has room");
        assert_eq!(conn.reading.bytes(), 12 * 1024 + 20);
        assert_eq!(budget.held(), 12 * 1024 + 20 - UNCHECKED_HEAD, "in the budget past its first part");
        conn.reading.release();
        assert_eq!(budget.held(), 0);
        drop(server);
    }

    #[tokio::test]
    async fn a_connection_closed_mid_head_hands_on_what_came() {
        assert_eq!(through(b"GET / HT", 2).await, (b"GET / HT".to_vec(), Vec::new()));
        assert_eq!(through(b"PRI * HTTP/2.0", 1).await, (b"PRI * HTTP/2.0".to_vec(), Vec::new()));
        assert_eq!(through(b"", 1).await, (Vec::new(), Vec::new()));
    }
}
