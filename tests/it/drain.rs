//! Graceful drain: SIGTERM makes a node say "not ready", leave the registry, finish what is in
//! flight, hand over leadership and exit. A rolling restart of every node under load must cost a
//! client that retries on connection errors no failed request: commands, state writes and event
//! publishes (a drained leader's last event entries and the forwarded publishes it was serving
//! used to be cut off with its links: 502, outcome unknown), and every acknowledged event is in
//! the log once.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use serde_json::json;

use crate::harness::Cluster;
use crate::http;

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    retried: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// Tags of the events whose publish got a 201.
    published: Mutex<Vec<String>>,
    /// Unkeyed publishes whose connection failed after it was made: they may or may not have
    /// been published, and are not sent again (that could publish them twice).
    unknown: AtomicU64,
}

const EVENT: &str = "drainTest";

/// One client: round-robin over the nodes, echo commands, state writes and event publishes
/// (every other one with an idempotency key); a connection error moves on to the next node, any
/// HTTP error is a failure. An unkeyed publish moves on only when its connection was refused
/// (it never reached a node): sent again after a failure mid-request, it could be published
/// twice by the client's own doing, and the check for duplicates would prove nothing.
fn client(addrs: Vec<std::net::SocketAddr>, worker: usize, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut next = worker;
    for seq in 0..1_000_000u64 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let tag = format!("w{worker}-{seq}");
        let (method, path, body) = match seq % 3 {
            0 => ("POST", "/api/v1/echo".to_string(), json!({"w": worker, "n": seq}).to_string()),
            1 => ("PUT", format!("/v1/state/drain/{tag}"), json!(seq).to_string()),
            _ => ("POST", format!("/v1/events/{EVENT}"), json!({"tag": tag}).to_string()),
        };
        let publish = seq % 3 == 2;
        let keyed = publish && (seq / 3) % 2 == 0;
        // A keyed publish retried on another node after a connection error may have reached the
        // first: its key makes the retry return the first event instead of a second one.
        let headers: &[(&str, &str)] = if keyed { &[("idempotency-key", &tag)] } else { &[] };
        // Bounded retries over the nodes for this one request.
        let mut done = false;
        for _ in 0..60 {
            let addr = addrs[next % addrs.len()];
            match http::request(addr, method, &path, headers, body.as_bytes(), Duration::from_secs(20)) {
                Ok(r) if r.status / 100 == 2 => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    if publish {
                        lock(&tally.published).push(tag.clone());
                    }
                    done = true;
                    break;
                }
                Ok(r) => {
                    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    lock(&tally.failures).push(format!("{method} {path} via {addr} at {:.3} (unix s): {}", at.as_secs_f64(), r.describe()));
                    done = true;
                    break;
                }
                Err(e) if publish && !keyed && e.kind() != std::io::ErrorKind::ConnectionRefused => {
                    tally.unknown.fetch_add(1, Ordering::Relaxed);
                    done = true;
                    break;
                }
                Err(_) => {
                    tally.retried.fetch_add(1, Ordering::Relaxed);
                    next += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        if !done {
            lock(&tally.failures).push(format!("{method} {path}: no node accepted a connection"));
        }
        next += 1;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn rolling_restart_under_load_fails_no_request() {
    let (cluster, _leader) = Cluster::formed("drain", 3, &["--example-services"]);
    // Every node ready, which includes its own registration: with only node 1 registered when
    // the load began, its stop (it leaves the registry) left no node offering `echo` for a few
    // ms, and every node rightly answered 404.
    cluster.wait_all_ready(Duration::from_secs(20));
    // On every node: the load goes to all of them, and a node that has not applied any
    // registration yet answers 404 (seen once, 7 ms after node 1 could route it).
    for id in cluster.ids() {
        let api = cluster.api(id);
        cluster.wait_for("echo routable", Duration::from_secs(20), || {
            let r = api.request("POST", "/api/v1/echo", &[], b"{}").map_err(|e| e.to_string())?;
            if r.status == 200 { Ok(()) } else { Err(r.describe()) }
        });
    }
    let addrs: Vec<_> = cluster.ids().iter().map(|&id| cluster.http(id)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (addrs, stop, tally) = (addrs.clone(), stop.clone(), tally.clone());
            std::thread::spawn(move || client(addrs, w, stop, tally))
        })
        .collect();
    let started = Instant::now();
    cluster.wait_until("load running", Duration::from_secs(20), || tally.ok.load(Ordering::Relaxed) > 50);
    for id in cluster.ids() {
        cluster.terminate(id);
        cluster.restart(id);
        cluster.wait_ready(id);
        cluster.wait_for_leader(Duration::from_secs(20));
    }
    let before = tally.ok.load(Ordering::Relaxed);
    cluster.wait_until("load continues after the rolling restart", Duration::from_secs(20), || {
        tally.ok.load(Ordering::Relaxed) > before + 50
    });
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("client thread");
    }
    let failures = lock(&tally.failures).clone();
    eprintln!(
        "rolling restart in {:?}: {} ok, {} connection retries, {} failures, {} unkeyed publishes of unknown outcome",
        started.elapsed(),
        tally.ok.load(Ordering::Relaxed),
        tally.retried.load(Ordering::Relaxed),
        failures.len(),
        tally.unknown.load(Ordering::Relaxed)
    );
    assert!(failures.is_empty(), "requests failed during the rolling restart: {failures:#?}");
    // A graceful stop is not an error: none may be logged (openraft logged one for an append its
    // stopped core never answered, on most followers' stops under load).
    for id in cluster.ids() {
        let log = std::fs::read_to_string(cluster.dir().join(format!("n{id}.log"))).expect("node log");
        let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
        assert!(errors.is_empty(), "node {id} logged errors during a rolling restart: {errors:#?}");
    }

    // Every acknowledged event once, by content (half of them unkeyed, so a publish retried
    // inside the cluster after it was proposed would show twice).
    let published = lock(&tally.published).clone();
    assert!(!published.is_empty(), "no event was published: the check below would prove nothing");
    // The log is read from one node's copy: wait until it has applied what the leader has.
    cluster.wait_caught_up(&cluster.ids(), Duration::from_secs(30));
    for id in cluster.ids() {
        let log = crate::events::read_log(cluster.api(id)).unwrap_or_else(|e| panic!("reading node {id}'s event log: {e}"));
        let tags = crate::events::by_payload_field(&log, EVENT, "tag");
        let missing: Vec<_> = published.iter().filter(|t| !tags.contains_key(*t)).collect();
        let twice: Vec<_> = tags.iter().filter(|(_, e)| e.len() > 1).map(|(t, _)| t).collect();
        assert!(missing.is_empty(), "node {id}: {} of {} acknowledged events missing from the log: {missing:?}", missing.len(), published.len());
        assert!(twice.is_empty(), "node {id}: events in the log more than once: {twice:?}");
    }
}

/// A draining node tells keep-alive clients to reconnect (`Connection: close` on its answers, as
/// Envoy does while draining): a client that reused its connection would otherwise send a
/// request just as the drain closes the connection, and see it fail under the request (the
/// benchmark counted a few such errors per rolling restart).
#[test]
fn a_draining_node_tells_keep_alive_clients_to_reconnect() {
    // A drain window of 3 s: the test thread must send its next request within it.
    let (cluster, leader) = Cluster::formed("drain-keep-alive", 3, &["--drain-delay-ms", "3000"]);
    let victim = cluster.ids().into_iter().find(|&id| id != leader).expect("a follower");
    let mut conn = http::KeepAlive::connect(cluster.http(victim), Duration::from_secs(10)).expect("connect");
    for _ in 0..3 {
        let r = conn.get("/healthz", Duration::from_secs(10)).expect("a request on the kept connection");
        assert_eq!(r.status, 200, "{}", r.describe());
        assert_ne!(r.header("connection"), Some("close"), "closed before the drain");
    }
    cluster.allow_exit(victim);
    cluster.signal(victim, "TERM");
    // Requests keep coming on the connection (never idle long): the first one the drain sees
    // must be answered, and with `Connection: close`.
    let until = Instant::now() + Duration::from_secs(10);
    let mut answered = 0;
    loop {
        let r = conn
            .get("/healthz", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("the kept connection failed under a request after {answered} answers: {e}"));
        answered += 1;
        if r.header("connection") == Some("close") {
            break;
        }
        assert!(Instant::now() < until, "no `Connection: close` within 10 s of SIGTERM ({answered} answers)");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(conn.get("/healthz", Duration::from_secs(5)).is_err(), "the connection stays open after `Connection: close`");
    let status = cluster.wait_exit(victim, Duration::from_secs(30));
    assert!(status.success(), "node {victim} exited with {status} after SIGTERM");
}

/// A command another node forwarded finishes when the node running it drains: a `placeOrder`
/// stopped between its write and its emit answered 503 ("nothing happened", inviting a second
/// order) for an order that was stored and never announced. Node 2 alone offers the command;
/// the order waits 2 s between its write and its emit, and node 2 gets SIGTERM once the write
/// is visible.
#[test]
fn a_forwarded_command_finishes_its_emit_when_its_node_drains() {
    let c = Cluster::new("drain-forwarded", 3, &[]);
    c.set_env(2, "RAFTBRIDGE_EXAMPLE_SERVICES", "true");
    c.start_all();
    c.wait_for_membership(&c.ids(), &[], Duration::from_secs(60));
    c.wait_all_ready(Duration::from_secs(60));
    let api = c.api(1);
    let place = move |order: serde_json::Value| api.request("POST", "/api/v1/orders", &[], order.to_string().as_bytes());
    c.wait_until("node 1 routes placeOrder to node 2", Duration::from_secs(30), || {
        place(json!({"id": "warm-up"})).is_ok_and(|r| r.status == 200 || r.status == 201)
    });
    let id = "held-through-drain";
    let client = std::thread::spawn(move || place(json!({"id": id, "holdMs": 2000})));
    c.wait_until("the order is stored", Duration::from_secs(30), || {
        c.api(1).request("GET", &format!("/v1/state/demo/orders/{id}"), &[], b"").is_ok_and(|r| r.status == 200)
    });
    c.allow_exit(2);
    c.signal(2, "TERM");
    let resp = client.join().expect("client thread").expect("an answer");
    assert!((200..300).contains(&resp.status), "the order was stored: {}", resp.describe());
    let v = resp.json().expect("json");
    assert_eq!(v["servedBy"], 2, "{v}");
    let position = v["position"].as_u64().expect("a position");
    // The log is read from node 1's copy: wait until it has applied what the leader has.
    c.wait_caught_up(&[1, 3], Duration::from_secs(30));
    let log = crate::events::read_log(c.api(1)).expect("node 1's event log");
    let placed = crate::events::by_payload_field(&log, "orderPlaced", "id");
    let ours = placed.get(id).map(Vec::as_slice).unwrap_or_default();
    assert_eq!(ours.len(), 1, "orderPlaced for {id} once in node 1's log: {ours:?}");
    assert_eq!(ours[0]["position"], position, "{}", ours[0]);
}

/// A handler's call runs while its node drains: the node has left the registry, so a command
/// only it offers had no route (404) or no live candidate (503), and a command taken before the
/// drain failed at its next call, as did a delivery's handler (an attempt counted for the drain
/// alone). One node: `relay` calls `increment`, waits 1.5 s, then calls `echo`; the node gets
/// SIGTERM once the increment is visible, and the client's answer carries both calls.
#[test]
fn a_handlers_call_runs_while_its_node_drains() {
    let (c, _) = Cluster::formed("drain-call", 1, &["--example-services", "--drain-delay-ms", "1000"]);
    let api = c.api(1);
    c.wait_until("node 1 routes relay", Duration::from_secs(30), || {
        api.request("POST", "/api/v1/relay/warm-up", &[], b"").is_ok_and(|r| r.status == 200)
    });
    let client = std::thread::spawn(move || api.request("POST", "/api/v1/relay/drain-call?holdMs=1500", &[], b""));
    c.wait_until("the relay's first call is visible", Duration::from_secs(30), || {
        api.request("GET", "/v1/state/demo/counter/drain-call", &[], b"").is_ok_and(|r| r.status == 200)
    });
    c.allow_exit(1);
    c.signal(1, "TERM");
    let resp = client.join().expect("client thread").expect("an answer");
    assert_eq!(resp.status, 200, "the relay's second call ran on its draining node: {}", resp.describe());
    let v = resp.json().expect("json");
    assert_eq!((v["counter"]["value"].clone(), v["echo"]["servedBy"].clone()), (json!(1), json!(1)), "{v}");
    let status = c.wait_exit(1, Duration::from_secs(30));
    assert!(status.success(), "node 1 exited with {status} after its drain");
}

/// A second SIGTERM during a drain ends the node at once (exit status 130), as an operator who
/// presses Ctrl-C twice means: the signal handlers stay installed for the process's life, so
/// the second one used to be swallowed and the drain ran its full course. The drain here is
/// held by a 60 s `--drain-delay-ms`.
#[test]
fn a_second_stop_signal_ends_the_drain_at_once() {
    let (cluster, _) = Cluster::formed("drain-twice", 1, &["--drain-delay-ms", "60000"]);
    cluster.allow_exit(1);
    cluster.signal(1, "TERM");
    cluster.wait_until("node 1 drains (not ready)", Duration::from_secs(20), || cluster.api(1).probe("/readyz") == Ok(503));
    cluster.signal(1, "TERM");
    // Well inside the 60 s the drain would otherwise wait.
    let status = cluster.wait_exit(1, Duration::from_secs(20));
    assert_eq!(status.code(), Some(130), "node 1 exited with {status} after a second SIGTERM");
}
