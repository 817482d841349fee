//! The HTTP headers a command's request and answer carry between the client and the app that
//! runs it (a sidecar's upstream), and their bounds.
//!
//! A node in front of an app is its reverse proxy, so it passes headers as Envoy or nginx do:
//! every end-to-end header goes through, and only what belongs to one hop (RFC 9110 §7.6.1:
//! `Connection` and the names it lists, `Keep-Alive`, `TE`, `Upgrade`, ...) or what the node
//! sets itself from its own knowledge (the trace ids, the identity and key headers it has
//! checked, the body's length, the deadline) stays behind. The headers travel in the peer
//! protocol beside the invocation (`PeerRequest::InvokeWith`), so each list is bounded in count
//! and bytes: a request over the bound is a 431, an app's answer over it a 502 (its headers
//! cannot be passed whole, and cutting some could change what the answer means).

use http::HeaderMap;
use http::HeaderName;
use http::HeaderValue;

use crate::sdk::HeaderList;

/// Headers passed each way, repeats of a name counted each time (hyper's own bound on an
/// HTTP/1 request, which it answers with a 431 itself).
pub const MAX_PASSED_HEADERS: usize = 100;
/// Bytes of names and values passed each way.
pub const MAX_PASSED_HEADER_BYTES: usize = 32 * 1024;

/// One hop's headers (RFC 9110 §7.6.1, with the old `Proxy-Connection` and the proxy's own
/// authentication pair): never passed on.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers that stay behind: those the node sends the app itself (`sidecar::Forward`:
/// `host`, the body's length, the checked message fields), those it consumes (`expect`, the
/// deadline), the forwarding headers it sets (`forwarded_for`), and those that would change
/// the answer's body from what the node reads, stores and emits (a compressed or partial body
/// is not the JSON a success event or a keyed replay needs).
const SET_BY_NODE_ON_REQUESTS: &[&str] = &[
    "host",
    "content-length",
    "expect",
    "x-request-id",
    "traceparent",
    "x-principal-id",
    "x-tenant-id",
    "idempotency-key",
    "x-timeout-ms",
    "x-forwarded-host",
    "x-forwarded-proto",
    "accept-encoding",
    "range",
    "if-range",
    crate::sdk::CALL_DEPTH_HEADER,
];

/// Answer headers the node writes itself: the body's type and length (`Output::content_type`),
/// its own `date`, the trace ids it echoes to its client, and its mark of a keyed replay.
const SET_BY_NODE_ON_ANSWERS: &[&str] = &["content-length", "content-type", "date", "x-request-id", "traceparent", "idempotent-replay"];

/// The headers over the bound: how many and how many bytes there were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{count} headers of {bytes} bytes to pass on, at most {MAX_PASSED_HEADERS} of {MAX_PASSED_HEADER_BYTES} bytes")]
pub struct TooManyHeaders {
    pub count: usize,
    pub bytes: usize,
}

/// The end-to-end headers of `map` but those named in `skip` or by `also_skip`, in order. As
/// many as hyper took in (its own bounds); `bounded` judges the list that is to be passed.
fn end_to_end(map: &HeaderMap, skip: &[&str], also_skip: impl Fn(&str) -> bool) -> HeaderList {
    // Names the sender's `Connection` header lists are that hop's too (RFC 9110 §7.6.1).
    let listed: Vec<String> = map
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    let mut out = HeaderList::new();
    let mut cookie: Option<usize> = None;
    for (name, value) in map {
        let name = name.as_str();
        if HOP_BY_HOP.contains(&name) || skip.contains(&name) || also_skip(name) || listed.iter().any(|l| l == name) {
            continue;
        }
        // An HTTP/2 client sends its cookies as crumbs, one field each (RFC 9113 §8.2.3): they
        // go to an HTTP/1.1 app as one `cookie` line, joined by "; ", as that RFC says.
        if name == "cookie" {
            if let Some(at) = cookie {
                out[at].1.extend_from_slice(b"; ");
                out[at].1.extend_from_slice(value.as_bytes());
                continue;
            }
            cookie = Some(out.len());
        }
        out.push((name.to_string(), value.as_bytes().to_vec()));
    }
    out
}

/// `list` if it is within what a node passes on each way, else how far over it is.
fn bounded(list: HeaderList) -> Result<HeaderList, TooManyHeaders> {
    let (count, bytes) = (list.len(), size(&list));
    if count > MAX_PASSED_HEADERS || bytes > MAX_PASSED_HEADER_BYTES {
        return Err(TooManyHeaders { count, bytes });
    }
    Ok(list)
}

/// A client's request headers to pass to the app that runs its command, with the forwarding
/// headers a reverse proxy adds (`forwarded_for`).
pub fn from_client<B>(req: &http::Request<B>) -> Result<HeaderList, TooManyHeaders> {
    let mut list = end_to_end(req.headers(), SET_BY_NODE_ON_REQUESTS, |_| false);
    if let Some(client) = req.extensions().get::<ClientConn>() {
        // HTTP/1's `host`, or HTTP/2's `:authority`, which hyper keeps in the URI.
        // Without the `user:password@` an absolute-form request line may carry.
        let authority = req.uri().authority().and_then(|a| a.as_str().rsplit('@').next());
        let host = authority.map(str::as_bytes).or_else(|| req.headers().get(http::header::HOST).map(HeaderValue::as_bytes));
        forwarded_for(host, client, &mut list);
    }
    bounded(list)
}

/// A handler's own headers for a command it calls (`sdk::Call::header`): valid names and
/// values, within the bounds, and none that a client's request could not pass on either (one
/// hop's, or one the node sets from what it checked: the identity and key headers come from
/// the caller's message fields, and an app must get its body whole). The call depth the
/// handler's context set last is the one exception.
pub fn checked(list: HeaderList) -> Result<HeaderList, String> {
    for (name, value) in &list {
        let valid = HeaderName::from_bytes(name.as_bytes()).is_ok() && HeaderValue::from_bytes(value).is_ok();
        let reserved = HOP_BY_HOP.contains(&name.as_str()) || (SET_BY_NODE_ON_REQUESTS.contains(&name.as_str()) && name != crate::sdk::CALL_DEPTH_HEADER);
        if !valid || reserved {
            return Err(format!("{name:?} is not a header a handler can set on a command it calls"));
        }
    }
    bounded(list).map_err(|e| e.to_string())
}

/// The connection a client request came on (a request extension the HTTP server sets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConn {
    pub addr: std::net::SocketAddr,
    pub https: bool,
}

/// What nginx and Envoy tell an app behind them: `x-forwarded-for` with the client's address
/// added to what the client sent (an app trusts only the entries its own proxies added),
/// `x-forwarded-proto` and `x-forwarded-host` as this node saw them (the client's own are
/// replaced: the app builds links to itself from them).
fn forwarded_for(host: Option<&[u8]>, client: &ClientConn, list: &mut HeaderList) {
    // The client's lines (it may have sent several) joined in order, then this node's entry.
    let mut chain: Vec<u8> = Vec::new();
    for (_, value) in list.iter().filter(|(n, _)| n == "x-forwarded-for") {
        chain.extend_from_slice(value);
        chain.extend_from_slice(b", ");
    }
    chain.extend_from_slice(client.addr.ip().to_canonical().to_string().as_bytes());
    list.retain(|(n, _)| n != "x-forwarded-for");
    list.push(("x-forwarded-for".into(), chain));
    list.push(("x-forwarded-proto".into(), if client.https { b"https".to_vec() } else { b"http".to_vec() }));
    if let Some(host) = host {
        list.push(("x-forwarded-host".into(), host.to_vec()));
    }
}

/// An app's answer headers to pass to the client. An error answer (4xx) reaches the client as
/// the node's JSON error body, so the app's headers that describe its own body stay behind too.
pub fn from_app(map: &HeaderMap, status: u16) -> Result<HeaderList, TooManyHeaders> {
    let error = (400..500).contains(&status);
    bounded(end_to_end(map, SET_BY_NODE_ON_ANSWERS, |name| error && (name.starts_with("content-") || name == "etag" || name == "last-modified")))
}

/// Bytes of names and values in `list`: what it adds to a frame or a stored answer.
pub fn size(list: &HeaderList) -> usize {
    list.iter().map(|(n, v)| n.len() + v.len()).sum()
}

/// Appends `list` to `map` (a repeated name stays repeated). Every entry was a valid header
/// when it was read; one that no longer parses (from a peer of another build) is left out.
pub fn append(list: &HeaderList, map: &mut HeaderMap) {
    for (name, value) in list {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) {
            map.append(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        m
    }

    fn names(list: &HeaderList) -> Vec<&str> {
        list.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// A handler's headers for a command it calls: its own pass, those the node sets (the
    /// identity and key fields, a body's encoding) or one hop's are refused, as is a header
    /// that is none; the call depth its context sets goes through.
    #[test]
    fn a_handlers_call_headers_are_checked_like_a_clients() {
        let list = |pairs: &[(&str, &[u8])]| -> HeaderList { pairs.iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect() };
        let own = list(&[("authorization", b"Bearer t"), ("x-app", b"1"), (crate::sdk::CALL_DEPTH_HEADER, b"2")]);
        assert_eq!(checked(own.clone()), Ok(own));
        for name in ["x-tenant-id", "idempotency-key", "accept-encoding", "host", "connection", "bad name"] {
            let e = checked(list(&[("x-app", b"1"), (name, b"v")])).unwrap_err();
            assert!(e.contains(name), "{name}: {e}");
        }
        assert!(checked(list(&[("x-app", b"a\nb")])).is_err(), "a value no header carries");
        let many: HeaderList = (0..=MAX_PASSED_HEADERS).map(|i| (format!("x-h{i}"), b"v".to_vec())).collect();
        assert!(checked(many).is_err());
    }

    #[test]
    fn a_clients_end_to_end_headers_pass_and_one_hops_stay() {
        let m = map(&[
            ("content-type", "text/plain"),
            ("accept", "text/csv"),
            ("authorization", "Bearer t"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "hop"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("host", "node:8080"),
            ("content-length", "3"),
            ("x-request-id", "r"),
            ("x-principal-id", "p"),
            ("idempotency-key", "k"),
            ("x-timeout-ms", "100"),
            ("proxy-authorization", "Basic x"),
        ]);
        let mut req = http::Request::new(());
        *req.headers_mut() = m;
        let list = from_client(&req).unwrap();
        assert_eq!(names(&list), ["content-type", "accept", "authorization", "cookie"]);
        assert_eq!(list[3].1, b"a=1; b=2", "cookie crumbs go as one line");
        // Behind a node, the app learns who asked and how.
        req.headers_mut().append("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        req.headers_mut().append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        req.headers_mut().append("x-forwarded-proto", HeaderValue::from_static("gopher"));
        req.headers_mut().append("accept-encoding", HeaderValue::from_static("gzip"));
        req.extensions_mut().insert(ClientConn { addr: "[::ffff:192.0.2.1]:5000".parse().unwrap(), https: true });
        let list = from_client(&req).unwrap();
        let value = |name: &str| list.iter().find(|(n, _)| n == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        assert_eq!(value("x-forwarded-for").as_deref(), Some("203.0.113.7, 10.0.0.1, 192.0.2.1"));
        assert_eq!(value("x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(value("x-forwarded-host").as_deref(), Some("node:8080"));
        assert_eq!(value("accept-encoding"), None, "the node reads the body as it is");
        assert_eq!(list.iter().filter(|(n, _)| n.starts_with("x-forwarded")).count(), 3);
    }

    #[test]
    fn an_error_answer_keeps_its_meaning_headers_not_those_of_its_body() {
        let m = map(&[
            ("content-type", "text/html"),
            ("content-language", "de"),
            ("etag", "\"1\""),
            ("www-authenticate", "Bearer"),
            ("retry-after", "3"),
            ("date", "Sat, 05 Dec 2026 20:00:00 GMT"),
            ("transfer-encoding", "chunked"),
        ]);
        assert_eq!(names(&from_app(&m, 401).unwrap()), ["www-authenticate", "retry-after"]);
        assert_eq!(names(&from_app(&m, 200).unwrap()), ["content-language", "etag", "www-authenticate", "retry-after"]);
    }

    #[test]
    fn headers_over_the_bound_are_refused_with_how_far_over() {
        let many: Vec<(String, String)> = (0..=MAX_PASSED_HEADERS).map(|i| (format!("x-h{i}"), "v".to_string())).collect();
        let mut req = http::Request::new(());
        *req.headers_mut() = map(&many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
        assert_eq!(from_client(&req).unwrap_err().count, MAX_PASSED_HEADERS + 1);
        // The node's own forwarding headers count too.
        req.headers_mut().remove("x-h0");
        assert!(from_client(&req).is_ok());
        req.extensions_mut().insert(ClientConn { addr: "127.0.0.1:1".parse().unwrap(), https: false });
        assert_eq!(from_client(&req).unwrap_err().count, MAX_PASSED_HEADERS + 2);
        let big = "v".repeat(MAX_PASSED_HEADER_BYTES);
        let e = from_app(&map(&[("x-big", &big)]), 200).unwrap_err();
        assert_eq!((e.count, e.bytes), (1, MAX_PASSED_HEADER_BYTES + 5));
        // At the bound exactly: passed.
        let fits = "v".repeat(MAX_PASSED_HEADER_BYTES - 5);
        assert_eq!(from_app(&map(&[("x-big", &fits)]), 200).unwrap().len(), 1);
    }

    #[test]
    fn appended_headers_keep_their_repeats_and_skip_what_no_longer_parses() {
        let list: HeaderList = vec![
            ("link".into(), b"<a>".to_vec()),
            ("link".into(), b"<b>".to_vec()),
            ("bad name".into(), b"x".to_vec()),
            ("x-ok".into(), b"line\nbreak".to_vec()),
        ];
        let mut m = HeaderMap::new();
        append(&list, &mut m);
        assert_eq!(m.get_all("link").iter().count(), 2);
        assert_eq!(m.len(), 2);
        assert_eq!(size(&list), 4 + 3 + 4 + 3 + 8 + 1 + 4 + 10);
    }
}
