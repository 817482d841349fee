//! A small HTTP/1.1 keep-alive client: one [`Conn`] is one TCP connection to one `host:port`.
//!
//! Why not a pooled client (`hyper_util::client::legacy`, reqwest)? The bench wants exactly one
//! connection per worker so that "64 connections" means 64 sockets, the node probes one peer at a
//! time, and tests want to observe reuse and reconnects. A hand-held `SendRequest` gives all of
//! that in a few lines with no pool and no extra dependencies. `https://` addresses need a
//! [`ClientTls`] (the CA their certificates chain to; `bench --cacert`): the bench measures a
//! node's HTTPS listener with the same client.
//!
//! Behaviour worth knowing:
//! - The connection is opened lazily and reopened transparently on the next request after it
//!   closed (server `Connection: close`, idle timeout, error, or our own timeout).
//! - `timeout` bounds the whole exchange: connect, send, and reading the full body.
//! - A request that fails on a *reused* connection before any response arrived (the server closed
//!   the idle socket under us) is retried once on a fresh connection, but only when hyper says it
//!   was never sent or the method is idempotent — the same rule browsers apply.
//! - Response bodies are capped at [`MAX_BODY`] so a misbehaving peer cannot balloon memory.

use std::{io, time::Duration};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, task::JoinHandle};

/// Largest response body accepted, in bytes.
pub const MAX_BODY: usize = 16 << 20;
/// How long a new connection may take to open, the name's lookup included and TLS aside (the
/// request's own timeout bounds the rest, and this too when shorter): Envoy's default, past
/// the kernel's second SYN resend (about 3 s), which a loaded server's full accept queue may
/// need.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    /// The TLS handshake failed: most often the server's certificate does not chain to the CA
    /// given, or does not name the host dialed.
    #[error("TLS with {addr}: {source}")]
    Tls { addr: String, source: io::Error },
    #[error("{addr}: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error("{addr}: request timed out")]
    Timeout { addr: String },
    /// The answer's status came, its body was larger than the limit.
    #[error("{addr}: response body larger than {limit} bytes")]
    BodyTooLarge { addr: String, limit: usize, status: u16 },
    #[error("bad url: {0}")]
    BadUrl(String),
    #[error("bad header {0}")]
    BadHeader(String),
    #[error("decoding JSON response: {0}")]
    Json(#[from] serde_json::Error),
    /// A download's bytes could not be stored where they were to go (`Conn::download`).
    #[error("storing the answer from {addr}: {source}")]
    Sink { addr: String, source: io::Error },
}

impl ClientError {
    /// Short stable label for counting errors by kind (used by the bench).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Connect { .. } => "connect",
            ClientError::Tls { .. } => "tls",
            ClientError::Http { .. } => "http",
            ClientError::Timeout { .. } => "timeout",
            ClientError::BodyTooLarge { .. } => "body too large",
            ClientError::BadUrl(_) => "bad url",
            ClientError::BadHeader(_) => "bad header",
            ClientError::Json(_) => "json",
            ClientError::Sink { .. } => "sink",
        }
    }

    /// True when the transport failed (as opposed to a slow or malformed answer);
    /// callers hammering a node should back off before reconnecting.
    pub fn is_connection(&self) -> bool {
        matches!(self, ClientError::Connect { .. } | ClientError::Tls { .. } | ClientError::Http { .. })
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClientError> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// One keep-alive HTTP/1.1 connection to one `host:port`; reconnects transparently on the next
/// request after the connection closed.
pub struct Conn {
    addr: String,
    /// The address was `https://…`: requests need `tls`.
    https: bool,
    tls: Option<ClientTls>,
    live: Option<Live>,
    /// The largest response body read (`with_max_body`).
    max_body: usize,
    /// How long a new connection may take to open (`with_connect_timeout`).
    connect_timeout: Duration,
}

/// TLS for `https://` addresses: the CA certificates a server's chain must lead to, checked for
/// the host of the address; cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
}

impl ClientTls {
    /// Trusts the CA certificates in the PEM file at `ca`.
    pub fn from_ca_file(ca: &std::path::Path) -> Result<ClientTls, crate::peer::tls::TlsError> {
        let roots = crate::peer::tls::read_roots(ca)?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| crate::peer::tls::TlsError::Https(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // This client speaks HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ClientTls { connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)) })
    }
}

struct Live {
    sender: SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Live {
    fn drop(&mut self) {
        // The driver may be stuck on a request we gave up on (timeout); don't leak it.
        self.driver.abort();
    }
}

impl Conn {
    /// `addr` is `host:port`; a leading `http://` and trailing `/` are stripped. A leading
    /// `https://` is stripped too, and then requests need [`Conn::with_tls`].
    pub fn new(addr: impl Into<String>) -> Conn {
        let addr = addr.into();
        let trimmed = addr.trim();
        let (https, rest) = match trimmed.strip_prefix("https://") {
            Some(rest) => (true, rest),
            None => (false, trimmed.strip_prefix("http://").unwrap_or(trimmed)),
        };
        Conn {
            addr: rest.trim_end_matches('/').to_string(),
            https,
            tls: None,
            live: None,
            max_body: MAX_BODY,
            connect_timeout: CONNECT_TIMEOUT,
        }
    }

    /// How long a new connection may take to open ([`CONNECT_TIMEOUT`] unless set); past it,
    /// a [`ClientError::Connect`] (nothing was sent).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Conn {
        self.connect_timeout = timeout;
        self
    }

    /// The largest response body read ([`MAX_BODY`] unless set); a larger one is
    /// [`ClientError::BodyTooLarge`].
    pub fn with_max_body(mut self, max_body: usize) -> Conn {
        self.max_body = max_body;
        self
    }

    /// The TLS configuration for an `https://` address (ignored for a plain one).
    pub fn with_tls(mut self, tls: Option<ClientTls>) -> Conn {
        self.tls = tls;
        self
    }

    /// The normalized `host:port` this connection talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// True if a connection is currently open (it may still turn out to be stale).
    pub fn is_connected(&self) -> bool {
        self.live.as_ref().is_some_and(|l| !l.sender.is_closed())
    }

    pub async fn get(&mut self, path: &str, timeout: Duration) -> Result<Response, ClientError> {
        self.request(Method::GET, path, &[], Bytes::new(), timeout)
            .await
    }

    pub async fn put_json(
        &mut self,
        path: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let body = Bytes::from(serde_json::to_vec(body)?);
        self.request(Method::PUT, path, &[], body, timeout).await
    }

    pub async fn request(
        &mut self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let resend = method.is_idempotent();
        self.request_resending(method, path_and_query, headers, body, timeout, resend).await
    }

    /// `request`, saying whether a request that may have reached the server on a reused
    /// connection that then failed may be sent again on a new one. `request` allows it for
    /// HTTP's idempotent methods; a caller that knows better (a command declared
    /// non-idempotent behind a PUT) passes `false`. A request known unsent is always resent.
    pub async fn request_resending(
        &mut self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
        resend: bool,
    ) -> Result<Response, ClientError> {
        let map = header_map(headers)?;
        self.request_with(method, path_and_query, map, body, timeout, resend).await
    }

    /// `request_resending` with the headers as a map, which may repeat a name; `host` is this
    /// connection's, and a body without a `content-type` is sent as JSON.
    pub async fn request_with(
        &mut self,
        method: Method,
        path_and_query: &str,
        mut map: HeaderMap,
        body: Bytes,
        timeout: Duration,
        resend: bool,
    ) -> Result<Response, ClientError> {
        let host = HeaderValue::from_str(&self.addr).ok();
        let host = host.filter(|_| !self.addr.is_empty() && !self.addr.contains('/'));
        let host =
            host.ok_or_else(|| ClientError::BadUrl(format!("{:?} (want host:port)", self.addr)))?;
        if self.https && self.tls.is_none() {
            return Err(ClientError::BadUrl(format!(
                "https://{} needs the CA its certificate chains to (--cacert)",
                self.addr
            )));
        }
        if !path_and_query.starts_with('/') {
            return Err(ClientError::BadUrl(format!(
                "{path_and_query:?} (want /path)"
            )));
        }
        map.insert(header::HOST, host);
        if !body.is_empty() && !map.contains_key(header::CONTENT_TYPE) {
            map.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        let result =
            tokio::time::timeout(timeout, self.exchange(&method, path_and_query, &map, body, resend)).await;
        let result = result.unwrap_or_else(|_| {
            Err(ClientError::Timeout {
                addr: self.addr.clone(),
            })
        });
        if result.is_err() {
            // After a failure the connection state is unknown (request half-sent, body unread).
            self.live = None;
        }
        result
    }

    async fn exchange(
        &mut self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
        resend: bool,
    ) -> Result<Response, ClientError> {
        let build = || {
            let mut req = Request::new(Full::new(body.clone()));
            *req.method_mut() = method.clone();
            *req.uri_mut() = path
                .parse()
                .map_err(|_| bad_target(path))?;
            *req.headers_mut() = headers.clone();
            Ok::<_, ClientError>(req)
        };
        let mut req = build()?;
        let mut retried = false;
        // The failure of a send that may have reached the server, which a resend follows: what
        // the resend's own failure to connect is reported as. A connect error says nothing
        // reached the server, which is no longer so (a caller may run such a request elsewhere
        // as never served: a request that crashed the app would crash the next one too).
        let mut maybe_delivered: Option<ClientError> = None;
        loop {
            let (mut live, reused) = match self.take_ready().await {
                Ok(taken) => taken,
                Err(e @ ClientError::Connect { .. }) => return Err(maybe_delivered.unwrap_or(e)),
                Err(e) => return Err(e),
            };
            match live.sender.try_send_request(req).await {
                Ok(resp) => {
                    self.live = Some(live);
                    return self.read_response(resp).await;
                }
                Err(mut e) => {
                    let unsent = e.take_message().is_some();
                    if reused && !retried && (unsent || (resend && is_stale(e.error()))) {
                        retried = true;
                        if !unsent {
                            maybe_delivered = Some(self.http_err(e.into_error()));
                        }
                        req = build()?;
                        continue;
                    }
                    return Err(self.http_err(e.into_error()));
                }
            }
        }
    }

    /// GETs `path` and hands a 2xx answer's body to `sink` chunk by chunk as it arrives, at
    /// most `max_bytes` in all and each chunk within `idle` of the one before: an answer too
    /// large to hold in memory (`raftbridge snapshot save`). The `Response` has the status and
    /// headers, and the body of an answer that is not a 2xx (read whole, as `request` reads
    /// it); with it, the bytes handed to `sink`. The connection is not kept.
    pub async fn download(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        max_bytes: u64,
        idle: Duration,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(Response, u64), ClientError> {
        use hyper::body::Body as _;
        let timeout = |addr: &str| ClientError::Timeout { addr: addr.to_string() };
        if self.https && self.tls.is_none() {
            return Err(ClientError::BadUrl(format!("https://{} needs the CA its certificate chains to (--cacert)", self.addr)));
        }
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = path.parse().map_err(|_| bad_target(path))?;
        let host = HeaderValue::from_str(&self.addr).map_err(|_| ClientError::BadUrl(format!("{:?} (want host:port)", self.addr)))?;
        req.headers_mut().insert(header::HOST, host);
        req.headers_mut().extend(header_map(headers)?);
        let (mut live, _) = tokio::time::timeout(idle, self.take_ready()).await.map_err(|_| timeout(&self.addr))??;
        let resp = tokio::time::timeout(idle, live.sender.send_request(req))
            .await
            .map_err(|_| timeout(&self.addr))?
            .map_err(|e| self.http_err(e))?;
        if !resp.status().is_success() {
            let answer = tokio::time::timeout(idle, self.read_response(resp)).await.map_err(|_| timeout(&self.addr))??;
            return Ok((answer, 0));
        }
        let (parts, mut body) = resp.into_parts();
        let mut written = 0u64;
        // Bounded by `max_bytes` and, per chunk, by `idle`.
        while !body.is_end_stream() {
            let frame = tokio::time::timeout(idle, std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)))
                .await
                .map_err(|_| timeout(&self.addr))?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| self.http_err(e))?;
            if let Some(data) = frame.data_ref() {
                written += data.len() as u64;
                if written > max_bytes {
                    return Err(ClientError::BodyTooLarge { addr: self.addr.clone(), limit: usize::try_from(max_bytes).unwrap_or(usize::MAX), status: parts.status.as_u16() });
                }
                sink(data).map_err(|source| ClientError::Sink { addr: self.addr.clone(), source })?;
            }
        }
        Ok((Response { status: parts.status.as_u16(), headers: parts.headers, body: Bytes::new() }, written))
    }

    /// Takes the open connection if it is still usable, else opens a new one;
    /// also returns whether it was reused. The caller puts it back after a successful send.
    async fn take_ready(&mut self) -> Result<(Live, bool), ClientError> {
        if let Some(mut live) = self.live.take() {
            if !live.sender.is_closed() && live.sender.ready().await.is_ok() {
                return Ok((live, true));
            }
        }
        let addr = &self.addr;
        // The name the server's certificate must carry, found before any socket is opened (a
        // bad one is a bad address, not a connection failure to back off from).
        let tls = match self.tls.as_ref().filter(|_| self.https) {
            None => None,
            Some(tls) => {
                let name = crate::peer::tls::host_name(addr).map_err(|e| ClientError::BadUrl(e.to_string()))?;
                Some((tls, name))
            }
        };
        let connect_timeout = self.connect_timeout;
        let connect = async {
            // Bounded on its own (Envoy's connect timeout): a host that drops SYNs is a connect
            // failure (nothing was sent: another node may take the request), not the whole
            // request's timeout (a 504, the app never withdrawn).
            let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(addr.as_str()))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no connection within {} ms", connect_timeout.as_millis())))??;
            stream.set_nodelay(true)?;
            Ok(stream)
        };
        let stream = connect.await.map_err(|source| ClientError::Connect {
            addr: addr.clone(),
            source,
        })?;
        let (sender, driver) = match tls {
            None => self.handshake(stream).await?,
            Some((tls, name)) => {
                let stream = tls.connector.connect(name, stream).await.map_err(|source| ClientError::Tls {
                    addr: addr.clone(),
                    source,
                })?;
                self.handshake(stream).await?
            }
        };
        Ok((Live { sender, driver }, false))
    }

    /// HTTP/1.1 over an open stream (TCP or TLS); the connection's driver runs as its own task.
    async fn handshake<I>(&self, io: I) -> Result<(SendRequest<Full<Bytes>>, JoinHandle<()>), ClientError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|source| self.http_err(source))?;
        let peer = self.addr.clone();
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(addr = %peer, error = %e, "http connection ended with error");
            }
        });
        Ok((sender, driver))
    }

    fn http_err(&self, source: hyper::Error) -> ClientError {
        ClientError::Http {
            addr: self.addr.clone(),
            source,
        }
    }

    async fn read_response(
        &self,
        resp: http::Response<hyper::body::Incoming>,
    ) -> Result<Response, ClientError> {
        let (parts, body) = resp.into_parts();
        let body = match Limited::new(body, self.max_body).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                return Err(match e.downcast::<hyper::Error>() {
                    Ok(source) => self.http_err(*source),
                    Err(_) => ClientError::BodyTooLarge {
                        addr: self.addr.clone(),
                        limit: self.max_body,
                        status: parts.status.as_u16(),
                    },
                })
            }
        };
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }
}

/// `headers` as a map (a later repeat of a name replaces the earlier one).
/// A request target that is no URI path, said by its length only: its path and query carry
/// the caller's parameters (tokens, ids), and the error may be logged.
fn bad_target(path: &str) -> ClientError {
    ClientError::BadUrl(format!("a request target of {} bytes that is not a valid URI path", path.len()))
}

fn header_map(headers: &[(&str, &str)]) -> Result<HeaderMap, ClientError> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| ClientError::BadHeader(k.to_string()))?;
        let value = HeaderValue::from_str(v).map_err(|_| ClientError::BadHeader(format!("{k}: {v:?}")))?;
        map.insert(name, value);
    }
    Ok(map)
}

/// Errors that mean "the idle connection was already dead when we used it".
fn is_stale(e: &hyper::Error) -> bool {
    if e.is_canceled() || e.is_closed() || e.is_incomplete_message() {
        return true;
    }
    let io = std::error::Error::source(e).and_then(|s| s.downcast_ref::<io::Error>());
    io.is_some_and(|io| {
        matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
                // TLS: the server closed the socket without a close_notify (an idle timeout).
                | io::ErrorKind::UnexpectedEof
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        convert::Infallible,
        net::SocketAddr,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Hyper server on 127.0.0.1:0 that echoes method, path and body as JSON and counts
    /// connections. `GET /slow` sleeps 2 s; `GET /close` answers with `Connection: close`.
    async fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(
                    |req: Request<hyper::body::Incoming>| async move {
                        let (parts, body) = req.into_parts();
                        if parts.uri.path() == "/slow" {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        let body = body.collect().await.unwrap().to_bytes();
                        let echo = serde_json::json!({
                            "method": parts.method.as_str(),
                            "path": parts.uri.to_string(),
                            "host": parts.headers.get("host").and_then(|h| h.to_str().ok()),
                            "ctype": parts.headers.get("content-type").and_then(|h| h.to_str().ok()),
                            "body": String::from_utf8_lossy(&body),
                        });
                        let mut resp =
                            http::Response::new(Full::new(Bytes::from(echo.to_string())));
                        if parts.uri.path() == "/close" {
                            resp.headers_mut()
                                .insert("connection", HeaderValue::from_static("close"));
                        }
                        Ok::<_, Infallible>(resp)
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        (addr, conns)
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn get_put_and_keep_alive_reuse() {
        let (addr, conns) = echo_server().await;
        let mut c = Conn::new(format!("http://{addr}/"));
        assert_eq!(c.addr(), addr.to_string());
        let r = c.get("/hello?x=1", T).await.unwrap();
        assert_eq!(r.status, 200);
        let v: serde_json::Value = r.json().unwrap();
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/hello?x=1");
        assert_eq!(v["host"], addr.to_string());
        assert!(v["ctype"].is_null());
        let r = c
            .put_json("/v1/state/s/k", &serde_json::json!({"v": 1}), T)
            .await
            .unwrap();
        let v: serde_json::Value = r.json().unwrap();
        assert_eq!(v["method"], "PUT");
        assert_eq!(v["ctype"], "application/json");
        assert_eq!(v["body"], r#"{"v":1}"#);
        for _ in 0..10 {
            c.request(
                Method::POST,
                "/x",
                &[("x-test", "1")],
                Bytes::from_static(b"{}"),
                T,
            )
            .await
            .unwrap();
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "all requests reuse one connection"
        );
    }

    #[tokio::test]
    async fn reconnects_after_connection_close() {
        let (addr, conns) = echo_server().await;
        let mut c = Conn::new(addr.to_string());
        for _ in 0..3 {
            assert_eq!(c.get("/close", T).await.unwrap().status, 200);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    /// Reads a request's head (up to its blank line) off `s`; `None` once the client closed.
    async fn read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        Some(head)
    }

    /// Raw server that answers one request per connection and never says `Connection: close`.
    /// For `/drop-now` it closes right after answering (the client notices the EOF while idle);
    /// otherwise it closes only when the next request arrives, leaving it unanswered — the
    /// stale keep-alive race, made deterministic.
    #[tokio::test]
    async fn reconnects_after_silent_server_close() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    for answered in [false, true] {
                        let Some(head) = read_head(&mut s).await else { return };
                        if answered {
                            return;
                        }
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                        if head.starts_with(b"GET /drop-now ") {
                            return;
                        }
                    }
                });
            }
        });
        let mut c = Conn::new(addr.to_string());
        for _ in 0..2 {
            assert_eq!(&c.get("/drop-now", T).await.unwrap().body[..], b"ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        // Each GET after the first hits a stale connection and is retried once on a new one.
        for path in ["/a", "/b", "/c"] {
            assert_eq!(&c.get(path, T).await.unwrap().body[..], b"ok");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 5);
        // A POST that was already sent is not retried: it may have taken effect.
        let err = c
            .request(Method::POST, "/d", &[], Bytes::new(), T)
            .await
            .unwrap_err();
        assert!(err.is_connection() && err.kind() == "http", "{err}");
        assert_eq!(c.get("/e", T).await.unwrap().status, 200);
        assert_eq!(conns.load(Ordering::SeqCst), 6);
    }

    /// A GET sent on a kept connection that the server closed unanswered may have reached it:
    /// its resend, refused a new connection, fails as that send did, not as a connect error
    /// (which tells a caller that nothing reached the server, and that it may run the request
    /// elsewhere as never served).
    #[tokio::test]
    async fn a_refused_resend_after_a_send_that_may_have_arrived_is_no_connect_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            // From now on a connect is refused.
            drop(listener);
            for answered in [false, true] {
                if read_head(&mut s).await.is_none() || answered {
                    return;
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
            }
        });
        let mut c = Conn::new(addr.to_string());
        assert_eq!(&c.get("/a", T).await.unwrap().body[..], b"ok");
        let err = c.get("/b", T).await.unwrap_err();
        assert!(err.is_connection() && err.kind() == "http", "{err}");
        // Refused from the start, nothing was sent: a connect error, as before.
        let err = c.get("/c", T).await.unwrap_err();
        assert_eq!(err.kind(), "connect", "{err}");
    }

    /// A server that takes no connection (its accept queue full: the kernel drops the SYNs,
    /// as a host gone from the network does) is a connect error once the connect timeout
    /// passes, well within the request's own timeout: nothing was sent.
    #[tokio::test]
    async fn a_connect_that_hangs_is_a_connect_error_at_its_own_timeout() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        // Never accepted: a backlog of 1 fills with the first connections.
        let _listener = socket.listen(1).unwrap();
        let mut fillers = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                _ => break,
            }
        }
        let mut c = Conn::new(addr.to_string()).with_connect_timeout(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let err = c.get("/", Duration::from_secs(20)).await.unwrap_err();
        assert!(err.is_connection() && err.kind() == "connect", "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn timeout_then_recovers() {
        let (addr, conns) = echo_server().await;
        let mut c = Conn::new(addr.to_string());
        let err = c
            .get("/slow", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
        assert_eq!(err.kind(), "timeout");
        assert!(!c.is_connected());
        assert_eq!(c.get("/fast", T).await.unwrap().status, 200);
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connect_error_and_bad_input() {
        // Bind then drop to get a port that is (almost certainly) closed.
        let port = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = Conn::new(format!("127.0.0.1:{port}"));
        let err = c.get("/", T).await.unwrap_err();
        assert!(err.is_connection() && err.kind() == "connect", "{err}");
        assert!(err.to_string().contains(&format!("127.0.0.1:{port}")));
        assert!(matches!(
            c.get("nopath", T).await,
            Err(ClientError::BadUrl(_))
        ));
        assert!(matches!(
            Conn::new("https://x:1").get("/", T).await,
            Err(ClientError::BadUrl(_))
        ));
    }
}
