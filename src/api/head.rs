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

use std::io;
use std::pin::Pin;
use std::task::Context;
use std::task::Poll;

use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;

/// Bytes of a first head held back at most: a request line or headers past it are refused
/// (414, 431), as hyper would refuse them further on, here with a message.
const MAX_HEAD: usize = 64 * 1024;
/// Headers a request may have, as hyper's default.
const MAX_HEADERS: usize = 100;
/// Bytes read and dropped after a refusal at most (`State::Draining`).
const MAX_DRAINED: usize = 1 << 20;
/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection whose first request head is checked before it is read through (see the module).
pub struct FirstHead<S> {
    inner: S,
    state: State,
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
    /// it has read it. `keep`'s header timeout bounds the wait.
    Draining(usize),
    /// Refused and answered: reads as closed.
    Refused,
    /// Past the first head: every byte passes.
    Through,
}

/// How often a gathering head was judged, and its length then: it is judged again only when a
/// line ended (at most `MAX_LINE_JUDGEMENTS` times) or 1 KiB more came, so a client that sends
/// its head a byte at a time costs at most a few hundred parses, not one per byte.
#[derive(Default)]
struct Judged {
    times: usize,
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
    match httparse::Request::new(&mut headers).parse(held) {
        Ok(httparse::Status::Complete(_)) => Verdict::Pass,
        Ok(httparse::Status::Partial) if held.len() < MAX_HEAD => Verdict::More,
        Ok(httparse::Status::Partial) if !held.contains(&b'\n') => {
            Verdict::Refuse(414, format!("the request line is longer than {MAX_HEAD} bytes"))
        }
        Ok(httparse::Status::Partial) => Verdict::Refuse(431, format!("the request's headers are longer than {MAX_HEAD} bytes")),
        Err(httparse::Error::TooManyHeaders) => Verdict::Refuse(431, format!("more than {MAX_HEADERS} request headers")),
        Err(e) => Verdict::Refuse(400, format!("malformed HTTP request: {e}")),
    }
}

/// `judge`, when `held` (grown from `start` bytes) is worth judging again (see `Judged`).
fn judge_now(held: &[u8], start: usize, judged: &mut Judged) -> Verdict {
    let line_ended = held[start..].contains(&b'\n');
    if line_ended && judged.times >= MAX_LINE_JUDGEMENTS {
        // More lines than a head within the bounds has (each judgement ended one).
        return Verdict::Refuse(431, format!("more than {MAX_HEADERS} request headers"));
    }
    let preface = held.len() <= H2_PREFACE.len();
    if !(line_ended || preface || held.len() >= judged.len + 1024 || held.len() >= MAX_HEAD) {
        return Verdict::More;
    }
    judged.times += 1;
    judged.len = held.len();
    judge(held)
}

/// The whole answer to a refused head: JSON like every error of the API (`ApiError`), and the
/// connection closed after it.
fn refusal(status: u16, message: &str) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Bad Request");
    let body = serde_json::json!({ "status": status, "message": message }).to_string();
    format!("HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
        .into_bytes()
}

impl<S> FirstHead<S> {
    pub fn new(inner: S) -> FirstHead<S> {
        FirstHead { inner, state: State::Gathering(Vec::new(), Judged::default()) }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for FirstHead<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Bounded: each pass either returns or moves the state on (gathering reads at least a
        // byte per pass, or returns; releasing and refusing end with their buffers, draining
        // with `MAX_DRAINED`).
        loop {
            match &mut this.state {
                State::Through => return Pin::new(&mut this.inner).poll_read(cx, out),
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
                    this.state = State::Draining(0);
                }
                State::Draining(dropped) => {
                    let mut scratch = [0u8; 4096];
                    let mut buf = ReadBuf::new(&mut scratch);
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
                    let room = (MAX_HEAD + 1 - start).min(16 * 1024);
                    held.resize(start + room, 0);
                    let mut buf = ReadBuf::new(&mut held[start..]);
                    let read = Pin::new(&mut this.inner).poll_read(cx, &mut buf);
                    let got = buf.filled().len();
                    held.truncate(start + got);
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
                            Verdict::Pass => this.state = State::Releasing(std::mem::take(held), 0),
                            Verdict::Refuse(status, message) => {
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
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// What a server reading through `FirstHead` gets of `sent` (sent in `pieces`), and what
    /// the client gets back.
    async fn through(sent: &[u8], pieces: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
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
    }

    #[tokio::test]
    async fn a_malformed_head_is_answered_with_json_and_never_read_through() {
        let long_line = [b"GET /".as_slice(), &vec![b'a'; MAX_HEAD + 10]].concat();
        let many = [b"GET / HTTP/1.1\r\n".as_slice(), &b"x: y\r\n".repeat(MAX_HEADERS + 1), b"\r\n"].concat();
        let long_headers = [b"GET / HTTP/1.1\r\nx: ".as_slice(), &vec![b'a'; MAX_HEAD + 10]].concat();
        for (sent, status) in [
            (&b"GARBAGE\r\n\r\n"[..], 400),
            (b"\x00\x01\x02\x03 nonsense \xff\xfe\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
            (&long_line, 414),
            (&many, 431),
            (&long_headers, 431),
        ] {
            // In two pieces, and a byte at a time (each judged only at a line's end).
            let (read, back) = through(sent, if sent.len() < 4096 { sent.len() } else { 2 }).await;
            assert!(read.is_empty(), "nothing of it is read through ({status})");
            let text = String::from_utf8_lossy(&back);
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
            let body: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            assert_eq!(body["status"], status, "{text}");
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{text}");
            assert!(text.contains("connection: close\r\n"), "{text}");
        }
    }

    #[tokio::test]
    async fn a_connection_closed_mid_head_hands_on_what_came() {
        assert_eq!(through(b"GET / HT", 2).await, (b"GET / HT".to_vec(), Vec::new()));
        assert_eq!(through(b"PRI * HTTP/2.0", 1).await, (b"PRI * HTTP/2.0".to_vec(), Vec::new()));
        assert_eq!(through(b"", 1).await, (Vec::new(), Vec::new()));
    }
}
