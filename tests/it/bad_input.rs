//! Hostile or broken input must cost only the offending connection or request: garbage, a junk
//! handshake and an oversized length prefix on the peer port each get their connection closed,
//! bad HTTP requests get JSON errors (400, 404, 413) or a closed connection, and afterwards the
//! cluster is still healthy and takes writes.

use std::time::Duration;

use serde_json::json;

use crate::harness::assert_json_error;
use crate::harness::Cluster;
use crate::harness::FORMATION;
use crate::http::raw_exchange;

/// How long a node may take to drop a bad peer connection.
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

/// Deterministic pseudo-random bytes (xorshift64).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// A frame: `[u32 big-endian length][body]`.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// Asserts the whole cluster still serves: every node ready and accepting a write.
fn assert_healthy(c: &Cluster, what: &str) {
    c.assert_alive();
    c.wait_all_ready(FORMATION);
    for api in c.apis() {
        api.must_put(
            &format!("healthy-after-{what}-via-{}", api.id),
            &json!({"after": what}),
        );
    }
}

#[test]
fn peer_port_closes_bad_connections_and_keeps_serving() {
    let (c, _) = Cluster::formed("bad-peer", 3, &[]);

    // Garbage that does not start like a frame (as text, its "length" is ~1 GiB), junk of a
    // well-formed length, and a length prefix far over the 16 MiB limit.
    let mut garbage = b"GET / HTTP/1.1\r\nHost: raftbridge\r\n\r\n".to_vec();
    garbage.extend(noise(4096, 0x9e37_79b9_7f4a_7c15));
    let junk_handshake = frame(&noise(64, 42));
    let mut oversized = 0x7FFF_FFFFu32.to_be_bytes().to_vec();
    oversized.extend(noise(256, 7));
    let cases = [
        ("garbage", garbage),
        ("junk handshake", junk_handshake),
        ("oversized length prefix", oversized),
    ];

    for id in c.ids() {
        for (what, bytes) in &cases {
            let outcome = raw_exchange(c.peer(id), bytes, CLOSE_DEADLINE)
                .unwrap_or_else(|e| panic!("node {id}: connect to peer port for {what}: {e}"));
            assert!(
                outcome.closed,
                "node {id} kept the peer connection open after {what}: {}",
                outcome.how
            );
        }
    }
    assert_healthy(&c, "bad-peer-input");
    // The peer listener itself is still accepting.
    for id in c.ids() {
        std::net::TcpStream::connect_timeout(&c.peer(id), Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("node {id}: peer port no longer accepts: {e}"));
    }
}

#[test]
fn http_rejects_bad_requests_with_json_errors_and_keeps_serving() {
    let (c, _) = Cluster::formed("bad-http", 3, &["--max-body", "1024"]);
    let api = c.api(c.ids()[1]);
    let send = |method: &str, path: &str, body: &[u8]| {
        api.request(method, path, &[], body)
            .unwrap_or_else(|e| panic!("{method} {path}: request failed: {e}"))
    };

    assert_json_error(
        &send("PUT", "/v1/state/default/bad", b"{\"a\":"),
        400,
        "truncated JSON body",
    );
    assert_json_error(
        &send("PUT", "/v1/state/default/bad", b"not json at all"),
        400,
        "non-JSON body",
    );
    assert_json_error(&send("GET", "/no/such/route", b""), 404, "unknown route");
    // A misspelt query parameter is a 400 naming it, not a request served as if it were
    // absent (a key that never expires, a read of every event name); nothing is written.
    for (method, path, body, what) in [
        ("PUT", "/v1/state/default/typo?tll=30", &b"1"[..], "a PUT with ?tll="),
        ("GET", "/v1/state/default/small?consitency=stale", b"", "a read with ?consitency="),
        ("GET", "/v1/state/default?prefx=a", b"", "a listing with ?prefx="),
        ("GET", "/v1/events?after=0&evenName=x", b"", "an events read with ?evenName="),
        ("POST", "/v1/events/typo?retain=5", b"{}", "a publish with a query"),
        ("GET", "/v1/dead-letters?subscription=countOrders&afer=3", b"", "dead letters with ?afer="),
    ] {
        let resp = send(method, path, body);
        assert_json_error(&resp, 400, what);
        assert!(resp.text().contains("unknown query parameter"), "{what}: {}", resp.describe());
    }
    assert_json_error(&send("GET", "/v1/state/default/typo", b""), 404, "the PUT with ?tll= wrote nothing");
    let read = send("GET", "/v1/events?eventName=typo&limit=5", b"");
    assert_eq!(read.status, 200, "{}", read.describe());
    assert_eq!(read.json().expect("a JSON page")["events"], json!([]), "the publish with a query stored nothing");
    // A command's parameters travel to the node that runs it: its path and query are bounded.
    let long = format!("/api/v1/anything?{}", "k=v&".repeat(5_000));
    assert_json_error(&send("GET", &long, b""), 414, "a command URI over 16 KiB");

    let big = json!({ "pad": "x".repeat(4096) }).to_string();
    assert_json_error(
        &send("PUT", "/v1/state/default/big", big.as_bytes()),
        413,
        "body over --max-body 1024",
    );
    let small = json!({ "pad": "x".repeat(900) }).to_string();
    assert!(small.len() < 1024);
    let resp = send("PUT", "/v1/state/default/small", small.as_bytes());
    assert_eq!(
        resp.status,
        200,
        "a body under --max-body: {}",
        resp.describe()
    );

    // Malformed HTTP: a JSON 400 with a message (414 and 431 for a request line or headers
    // past the bounds), and the connection closed.
    let long_line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(70_000));
    let many_headers = format!("GET / HTTP/1.1\r\n{}\r\n", "x: y\r\n".repeat(101));
    for (raw, status) in [
        (&b"GARBAGE\r\n\r\n"[..], 400),
        (&b"\x00\x01\x02\x03 nonsense \xff\xfe\r\n\r\n"[..], 400),
        (&b"GET / HTTP/1.1\r\nno colon here\r\n\r\n"[..], 400),
        (long_line.as_bytes(), 414),
        (many_headers.as_bytes(), 431),
    ] {
        let outcome =
            raw_exchange(api.addr, raw, CLOSE_DEADLINE).unwrap_or_else(|e| panic!("connect: {e}"));
        let text = String::from_utf8_lossy(&outcome.received);
        let what = String::from_utf8_lossy(&raw[..raw.len().min(40)]).to_string();
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "malformed HTTP {what:?}: {text:?}");
        let body: serde_json::Value = text
            .split_once("\r\n\r\n")
            .and_then(|(_, b)| serde_json::from_str(b).ok())
            .unwrap_or_else(|| panic!("malformed HTTP {what:?}: no JSON body in {text:?}"));
        assert_eq!(body["status"], status, "{text:?}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{text:?}");
        assert!(
            outcome.closed,
            "malformed HTTP {what:?}: connection left open ({})",
            outcome.how
        );
    }
    // A client that connects and sends nothing, or only the start of the HTTP/2 preface, is
    // closed after the header timeout (10 s): it held one of `--max-connections` until the node
    // stopped. (Together, so the test waits the timeout once.)
    std::thread::scope(|s| {
        for start in [&b""[..], b"P", b"PRI * HTTP/2.0"] {
            s.spawn(move || {
                let outcome = raw_exchange(api.addr, start, Duration::from_secs(25)).unwrap_or_else(|e| panic!("connect: {e}"));
                assert!(outcome.closed && outcome.received.is_empty(), "a connection that sent {start:?}: {} {:?}", outcome.how, outcome.received);
            });
        }
    });
    assert_healthy(&c, "bad-http-input");
}

/// Bodies held at once share one budget per node (`--max-body-buffered`): clients that send big
/// bodies slowly fill it (counted as the bytes arrive), further requests with a body get a JSON
/// 503 with `Retry-After` at once (not a hang, not an out-of-memory node), and once those
/// clients go the node takes bodies again.
#[test]
fn slow_bodies_fill_the_body_budget_and_further_requests_get_503() {
    use std::io::Write;
    let (c, _) = Cluster::formed("bodybudget", 1, &["--max-body", "1048576", "--max-body-buffered", "2097152"]);
    let api = c.api(1);
    // Two requests that announce 1 MiB each and send all but 576 bytes of it: 2,096,000 bytes
    // held, 1,152 left in the budget.
    let mut slow = Vec::new();
    for i in 0..2 {
        let mut s = std::net::TcpStream::connect(c.http(1)).expect("connect");
        write!(s, "PUT /v1/state/default/slow{i} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1048576\r\n\r\n").expect("send headers");
        s.write_all(&vec![b' '; 1_048_000]).expect("send most of the body");
        slow.push(s);
    }
    // Counted once the node has read them (a write sent before could take room a slow body
    // then lacks, and the slow body would be the one refused).
    c.wait_until("the slow bodies are counted", Duration::from_secs(20), || {
        api.metric("raftbridge_http_body_bytes_held", &[]).is_ok_and(|n| n >= 2_096_000.0)
    });
    let big = json!({"pad": "x".repeat(4096)});
    let mut refused = None;
    c.wait_until("a 4 KiB write is refused while the budget is held", Duration::from_secs(20), || {
        match api.put("budget-big", &big) {
            Ok(r) if r.status == 503 => {
                refused = Some(r);
                true
            }
            _ => false,
        }
    });
    let refused = refused.expect("set when the wait ended");
    assert_json_error(&refused, 503, "a body past the node's budget");
    assert!(String::from_utf8_lossy(&refused.body).contains("--max-body-buffered"), "{}", refused.describe());
    assert!(refused.header("retry-after").is_some(), "{}", refused.describe());
    assert!(api.metric("raftbridge_http_bodies_refused_total", &[]).expect("metrics") >= 1.0);
    assert_eq!(api.probe("/healthz").expect("healthz"), 200, "bodiless requests are served");
    drop(slow);
    c.wait_until("writes are taken again once the slow clients are gone", Duration::from_secs(20), || {
        api.put("budget-big", &big).is_ok_and(|r| r.status == 200)
    });
}

/// One HTTP/2 frame: 9-byte head (length, type, flags, stream) and its payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads HTTP/2 frames from `s` until it closes or `deadline`, acking the node's SETTINGS and
/// answering its PINGs, and hands every frame (kind, flags, stream, payload) to `seen`; the
/// time the connection closed after `started`, if it did.
fn h2_frames(
    s: &mut std::net::TcpStream,
    started: std::time::Instant,
    deadline: std::time::Instant,
    mut seen: impl FnMut(u8, u8, u32, &[u8]),
) -> Option<Duration> {
    use std::io::Read;
    use std::io::Write;
    let mut buf = Vec::new();
    while std::time::Instant::now() < deadline {
        s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return Some(started.elapsed()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                seen(u8::MAX, 0, 0, &[]);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(started.elapsed()),
            Err(e) => panic!("read: {e}"),
        }
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags, stream) = (buf[3], buf[4], u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff);
            let payload: Vec<u8> = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match (kind, flags & 1) {
                (4, 0) => s.write_all(&h2_frame(4, 1, 0, &[])).expect("ack the settings"),
                (6, 0) => s.write_all(&h2_frame(6, 1, 0, &payload)).expect("answer the ping"),
                _ => {}
            }
            seen(kind, flags, stream, &payload);
        }
    }
    None
}

/// An HTTP/2 client that answers the node's SETTINGS and PINGs but sends no further request
/// holds one of `--max-connections` while it stays connected: once no request has been under
/// way for `--http-idle-timeout-ms`, the node sends a GOAWAY (no error) and closes.
#[test]
fn an_idle_http2_connection_gets_a_goaway_and_is_closed() {
    use std::io::Write;
    let (c, _) = Cluster::formed("h2idle", 1, &["--http-idle-timeout-ms", "1500"]);
    c.wait_all_ready(FORMATION);
    let mut s = std::net::TcpStream::connect(c.http(1)).expect("connect");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(4, 0, 0, &[]));
    // GET /healthz (HPACK: :method GET, :scheme http, :authority literal, :path literal).
    let mut block = vec![0x82, 0x86, 0x41, 9];
    block.extend(b"127.0.0.1");
    block.extend([0x04, 8]);
    block.extend(b"/healthz");
    hello.extend(h2_frame(1, 0x5, 1, &block));
    s.write_all(&hello).expect("send the request");
    let now = std::time::Instant::now();
    let (mut answered, mut goaway) = (false, None);
    let closed = h2_frames(&mut s, now, now + Duration::from_secs(30), |kind, _, stream, payload| match kind {
        1 if stream == 1 => answered = true,
        7 => goaway = Some(u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]])),
        _ => {}
    })
    .is_some();
    assert!(answered, "the request was answered");
    assert_eq!(goaway, Some(0), "a GOAWAY without an error before the close");
    assert!(closed, "the idle connection was closed");
    assert!(c.api(1).metric("raftbridge_http_idle_closed_total", &[]).expect("metrics") >= 1.0);
}

/// An HTTP/2 client that takes none of its answers (a zero initial window, no WINDOW_UPDATE)
/// while it answers pings: hyper writes nothing, so no write of the socket's stalls. Its
/// answers waited unwritten for as long as it stayed, past the idle timeout's GOAWAY (a
/// graceful close waits for every open stream). Now, once an answer has waited `WRITE_STALL`
/// (30 s, up to a 10 s tick more) with none of its bytes taken, the connection gets a GOAWAY and
/// is dropped a tick later, and the answers' bytes leave the answer budget.
#[test]
fn an_http2_client_that_takes_no_answer_bytes_gets_a_goaway_and_is_dropped_after_the_write_stall_limit() {
    use std::io::Write;
    let (c, _) = Cluster::formed("h2stall", 1, &["--http-idle-timeout-ms", "5000"]);
    c.wait_all_ready(FORMATION);
    let api = c.api(1);
    let mut s = std::net::TcpStream::connect(c.http(1)).expect("connect");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE (4) = 0: the node may send no DATA until a WINDOW_UPDATE.
    hello.extend(h2_frame(4, 0, 0, &[0, 4, 0, 0, 0, 0]));
    // 100 GETs of /openapi.json (HPACK: :method GET, :scheme http, :authority, :path literals).
    let mut block = vec![0x82, 0x86, 0x41, 9];
    block.extend(b"127.0.0.1");
    block.extend([0x04, 13]);
    block.extend(b"/openapi.json");
    for stream in 0..100u32 {
        hello.extend(h2_frame(1, 0x5, 2 * stream + 1, &block));
    }
    let started = std::time::Instant::now();
    s.write_all(&hello).expect("send the requests");
    let (mut answered, mut data, mut goaway) = (0, 0, None);
    let mut held_while_open = 0.0f64;
    let closed_after = h2_frames(&mut s, started, started + Duration::from_secs(90), |kind, _, _, _| match kind {
        0 => data += 1,
        1 => answered += 1,
        7 => goaway = goaway.or(Some(started.elapsed())),
        // A read that timed out: the answers are all in, and held unsent.
        u8::MAX if answered == 100 && held_while_open == 0.0 => {
            held_while_open = api.metric("raftbridge_http_answer_bytes_held", &[]).unwrap_or(0.0);
        }
        _ => {}
    });
    assert_eq!((answered, data), (100, 0), "every answer's head came, and no DATA (a zero window)");
    assert!(held_while_open >= 100.0 * 50.0, "the 100 answers were counted while unsent: {held_while_open}");
    let closed_after = closed_after.expect("the connection was dropped within 90 s");
    assert!(closed_after >= Duration::from_secs(25), "not before the stall limit: {closed_after:?}");
    let goaway = goaway.expect("a GOAWAY before the close");
    assert!(goaway >= Duration::from_secs(25) && goaway <= closed_after, "GOAWAY at {goaway:?}, closed at {closed_after:?}");
    assert!(api.metric("raftbridge_http_write_stalls_total", &[]).expect("metrics") >= 1.0);
    c.wait_until("the answers leave the answer budget", Duration::from_secs(10), || {
        api.metric("raftbridge_http_answer_bytes_held", &[]).is_ok_and(|n| n == 0.0)
    });
}

/// An HTTP/2 client that takes none of its answers (a zero window) keeps each answered
/// stream's head and floor in the heads budget until the answer is written, so what its
/// streams hold has a bound; and once the budget is full, its refusals are stream resets
/// (REFUSED_STREAM: not processed, safe to retry), not JSON 503s that would wait unsent in
/// the connection's send buffer beside the others (1.4 KB each, outside every budget). Other
/// clients' probes are still served, and closing the connection gives everything back.
#[test]
fn an_http2_client_that_takes_no_answers_has_its_refusals_reset_and_its_streams_counted() {
    use std::io::Write;
    let budget: usize = 1 << 20;
    let (c, _) = Cluster::formed("h2refuse", 1, &["--max-body-buffered", &budget.to_string()]);
    c.wait_all_ready(FORMATION);
    let api = c.api(1);
    let mut s = std::net::TcpStream::connect(c.http(1)).expect("connect");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE (4) = 0: the node may send no DATA until a WINDOW_UPDATE.
    hello.extend(h2_frame(4, 0, 0, &[0, 4, 0, 0, 0, 0]));
    // GETs (HPACK: :method GET, :scheme http, :authority and :path literals).
    let get = |path: &str| {
        let mut block = vec![0x82, 0x86, 0x41, 9];
        block.extend(b"127.0.0.1");
        block.extend([0x04, path.len() as u8]);
        block.extend(path.as_bytes());
        block
    };
    let absent = get("/v1/state/default/absent");
    // First 110 GETs of an absent key (a 404 with a JSON body): the budget holds about 85
    // requests at their 12 KiB floor, and the rest are refused: 16 with JSON 503s (what a
    // 1 MiB budget bounds of refusals unsent on the whole node), then with stream resets.
    let first = 110u32;
    for stream in 0..first {
        hello.extend(h2_frame(1, 0x5, 2 * stream + 1, &absent));
    }
    let started = std::time::Instant::now();
    s.write_all(&hello).expect("send the requests");
    // Answers by their first header: 0x8d is `:status 404` in HPACK's static table; a 503 is
    // not there (a literal, then an index into the dynamic table).
    // [DATA, 404s, other answers, REFUSED_STREAM resets, other resets]
    let mut n = [0u32; 5];
    let count = |n: &mut [u32; 5], kind: u8, payload: &[u8]| match kind {
        0 => n[0] += 1,
        1 if payload.first() == Some(&0x8d) => n[1] += 1,
        1 => n[2] += 1,
        3 if payload == [0, 0, 0, 7] => n[3] += 1,
        3 => n[4] += 1,
        _ => {}
    };
    // Read for 3 s: the answers all come within it, and the connection's own rule needs a
    // second without any answer written (none is: the window is 0).
    h2_frames(&mut s, started, started + Duration::from_secs(3), |kind, _, _, payload| count(&mut n, kind, payload));
    let (answered_first, busy_first, reset_first) = (n[1], n[2], n[3]);
    // Then 16 more and a probe on the same connection: it takes none of its answers, so each
    // refusal is a stream reset now, the probe's too (a probe passes a full budget only on a
    // connection that takes its answers). 127 streams open in all, within the 128 allowed.
    let mut more = Vec::new();
    for stream in first..first + 16 {
        more.extend(h2_frame(1, 0x5, 2 * stream + 1, &absent));
    }
    more.extend(h2_frame(1, 0x5, 2 * (first + 16) + 1, &get("/healthz")));
    let again = std::time::Instant::now();
    s.write_all(&more).expect("send more requests");
    let mut held = None;
    h2_frames(&mut s, again, again + Duration::from_secs(10), |kind, _, _, payload| {
        count(&mut n, kind, payload);
        // A read that timed out: every stream is answered or reset by now.
        if kind == u8::MAX && held.is_none() {
            held = api.metric("raftbridge_http_head_bytes_held", &[]).ok();
        }
    });
    let [data, answered, busy, refused, other] = n;
    assert_eq!((data, other), (0, 0), "no DATA (a zero window), no other reset");
    assert!((70..=90).contains(&answered_first), "as many answered as the budget holds: {answered_first}");
    assert_eq!((busy_first, answered_first + busy_first + reset_first), (16, first), "the first burst: 16 refusals answered, the rest reset");
    assert_eq!((answered, busy, refused - reset_first), (answered_first, busy_first, 17), "the later refusals and the probe reset");
    let held = held.expect("a quiet read");
    assert!(held >= f64::from(answered) * 12.0 * 1024.0, "the unsent answers' requests stay counted: {held}");
    assert!(api.metric("raftbridge_http_refusals_reset_total", &[]).expect("metrics") >= f64::from(refused));
    assert_eq!(api.probe("/healthz").expect("healthz"), 200, "probes are served past a full budget to a client that reads");
    drop(s);
    // What is left is the scrape's own request: its head and its 12 KiB floor.
    c.wait_until("the closed connection's streams leave the heads budget", Duration::from_secs(20), || {
        api.metric("raftbridge_http_head_bytes_held", &[]).is_ok_and(|n| n < 14.0 * 1024.0)
    });
    let r = api.request("GET", "/v1/state/default/absent", &[], b"").expect("request");
    assert_eq!(r.status, 404, "served again: {}", r.describe());
}

/// Request heads held at once have a budget of their own (`--max-body-buffered` bytes, from the
/// request's arrival until its answer is made): HTTP/2 lets a client send 48 KiB of headers per
/// stream in a few bytes (HPACK), 128 streams a connection. A head past the room left gets a
/// JSON 503 with `Retry-After` (not the probes or the cluster view: a full budget must not make
/// the node look dead), one larger than the whole budget a 431, and once the heads held go the
/// node takes requests again.
#[test]
fn request_heads_past_their_budget_get_503() {
    use std::io::Write;
    let (c, _) = Cluster::formed("headbudget", 1, &["--max-body", "4096", "--max-body-buffered", "8192"]);
    let api = c.api(1);
    // A write whose body never comes: its 6 KiB head is held while the node waits for it.
    let mut slow = std::net::TcpStream::connect(c.http(1)).expect("connect");
    write!(slow, "PUT /v1/state/default/slow HTTP/1.1\r\nhost: x\r\nx-stuffing: {}\r\ncontent-length: 10\r\n\r\n", "s".repeat(6 * 1024)).expect("send the head");
    c.wait_until("the slow head is counted", Duration::from_secs(20), || {
        api.metric("raftbridge_http_head_bytes_held", &[]).is_ok_and(|n| n >= 6.0 * 1024.0)
    });
    let stuffed = "x".repeat(3 * 1024);
    let refused = api.request("GET", "/v1/state/default/k", &[("x-stuffing", stuffed.as_str())], b"").expect("request");
    assert_json_error(&refused, 503, "a head past the heads' budget");
    assert!(String::from_utf8_lossy(&refused.body).contains("request headers"), "{}", refused.describe());
    assert!(refused.header("retry-after").is_some(), "{}", refused.describe());
    for probe in ["/healthz", "/readyz", "/cluster", "/metrics"] {
        let r = api.request("GET", probe, &[("x-stuffing", stuffed.as_str())], b"").expect("probe");
        assert_eq!(r.status, 200, "{probe} is served past a full budget: {}", r.describe());
    }
    let whole = "w".repeat(10 * 1024);
    let too_large = api.request("GET", "/v1/state/default/k", &[("x-stuffing", whole.as_str())], b"").expect("request");
    assert_json_error(&too_large, 431, "a head larger than the whole budget");
    assert!(api.metric("raftbridge_http_heads_refused_total", &[]).expect("metrics") >= 2.0);
    drop(slow);
    c.wait_until("a 3 KiB head is taken again once the slow request is gone", Duration::from_secs(20), || {
        api.request("GET", "/v1/state/default/k", &[("x-stuffing", stuffed.as_str())], b"").is_ok_and(|r| r.status == 404)
    });
    // The scrape's own head is held while it is answered.
    let held = api.metric("raftbridge_http_head_bytes_held", &[]).expect("metrics");
    assert!(held < 1024.0, "given back once answered: {held}");
}

/// HTTP/1 heads count in the heads' budget while they are read, before they parse: clients
/// sending 300 KiB heads slowly held up to 408 KiB each in the node's buffers outside any bound
/// (`--max-connections` of them, 4 GiB). Past a full budget a connection's first head gets a
/// JSON 503, a later head on a kept-alive connection waits to be read, probes are still
/// served, and what was held is given back when the connections close.
#[test]
fn heads_being_read_count_in_their_budget() {
    use std::io::Read;
    use std::io::Write;
    let budget = 2usize << 20;
    let (c, _) = Cluster::formed("headread", 1, &["--max-body-buffered", &budget.to_string()]);
    c.wait_all_ready(FORMATION);
    let api = c.api(1);
    // A kept-alive connection that made one request, then starts a long head.
    let mut kept = std::net::TcpStream::connect(c.http(1)).expect("connect");
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").expect("send");
    kept.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut buf = [0u8; 4096];
    let n = kept.read(&mut buf).expect("answer");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    let chunk = format!("x-stuffing-{{}}: {}\r\n", "s".repeat(8 * 1024));
    let stuff = |s: &mut std::net::TcpStream, lines: usize| {
        s.set_write_timeout(Some(Duration::from_secs(2))).expect("timeout");
        for i in 0..lines {
            // A paused read leaves the rest in the socket's buffers; a write that blocks ends it.
            if s.write_all(chunk.replace("{}", &i.to_string()).as_bytes()).is_err() {
                break;
            }
        }
    };
    // First heads on new connections, 300 KiB each, never ended.
    let mut refused = 0;
    let mut open = Vec::new();
    for _ in 0..16 {
        let mut s = std::net::TcpStream::connect(c.http(1)).expect("connect");
        s.write_all(b"GET /v1/state/default/k HTTP/1.1\r\nhost: x\r\n").expect("send");
        stuff(&mut s, 36);
        s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer).into_owned();
        if !text.is_empty() {
            assert!(text.starts_with("HTTP/1.1 503 ") && text.contains("retry-after: 1"), "{text}");
            let body: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or("")).expect("a JSON body");
            assert_eq!(body["status"], 503, "{text}");
            refused += 1;
        }
        open.push(s);
        let held = api.metric("raftbridge_http_head_bytes_held", &[]).expect("metrics");
        // The budget, a probe's unchecked head and a read's worth per connection at most.
        assert!(held <= (budget + 18 * 16 * 1024) as f64, "heads being read are bounded: {held}");
    }
    assert!(refused >= 4, "first heads past the budget are refused: {refused} of 16");
    // The kept-alive connection's next head, with the budget full: it waits to be read.
    kept.write_all(b"GET /v1/state/default/k HTTP/1.1\r\nhost: x\r\n").expect("send");
    stuff(&mut kept, 36);
    c.wait_until("the kept-alive connection's head waits for room", Duration::from_secs(20), || {
        api.metric("raftbridge_http_head_reads_paused_total", &[]).is_ok_and(|n| n >= 1.0)
    });
    let held = api.metric("raftbridge_http_head_bytes_held", &[]).expect("metrics");
    assert!(held <= (budget + 18 * 16 * 1024) as f64, "heads being read are bounded: {held}");
    for probe in ["/healthz", "/readyz", "/metrics"] {
        let r = api.request("GET", probe, &[], b"").expect("probe");
        assert_eq!(r.status, 200, "{probe} is served past a full budget: {}", r.describe());
    }
    drop(open);
    drop(kept);
    c.wait_until("the heads being read are given back", Duration::from_secs(20), || {
        api.metric("raftbridge_http_head_bytes_held", &[]).is_ok_and(|n| n < 16.0 * 1024.0)
    });
    let r = api.request("GET", "/v1/state/default/k", &[], b"").expect("request");
    assert_eq!(r.status, 404, "served again: {}", r.describe());
}

/// An HTTP/1.1 connection kept alive stays open for `--http-idle-timeout-ms` between requests:
/// hyper's header timeout (10 s) also ran while it waited for the next request and closed every
/// idle connection at 10 s, whatever the setting said, so a pooled client's next request raced
/// the close. Then it is closed by the idle timeout (and counted).
#[test]
fn a_kept_alive_http1_connection_lasts_the_idle_timeout_not_the_header_timeout() {
    use std::io::Read;
    use std::io::Write;
    let (c, _) = Cluster::formed("h1idle", 1, &["--http-idle-timeout-ms", "15000"]);
    c.wait_all_ready(FORMATION);
    let mut s = std::net::TcpStream::connect(c.http(1)).expect("connect");
    let ask = |s: &mut std::net::TcpStream| -> String {
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").expect("send");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(ask(&mut s).starts_with("HTTP/1.1 200"), "the first request");
    std::thread::sleep(Duration::from_secs(12));
    let second = ask(&mut s);
    assert!(second.starts_with("HTTP/1.1 200"), "12 s idle is within the 15 s idle timeout: {second:?}");
    let last = std::time::Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the idle connection to be closed, got {other:?}"),
    }
    let after = last.elapsed();
    assert!(after >= Duration::from_secs(14) && after < Duration::from_secs(25), "closed {after:?} after the last request");
    assert!(c.api(1).metric("raftbridge_http_idle_closed_total", &[]).expect("metrics") >= 1.0);
}
