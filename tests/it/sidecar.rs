//! Sidecar mode: each node forwards commands to its own local upstream app (`tests/it/upstream.py`,
//! Python stdlib, one process per node with its own `--name`), configured by a `[sidecar]`
//! section in a TOML file passed with `--config`. Requests through any node reach every
//! upstream, with `x-request-id` and `traceparent` passed on; upstream failures become 502/504
//! while the app's own 4xx passes through; an upstream that dies or fails its health check stops
//! being advertised, and comes back when healthy again.
//!
//! The upstream processes are killed when the test ends (also on failure).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use serde_json::Value;

use crate::harness::assert_json_error;
use crate::harness::assert_json_error_within;
use crate::harness::free_loopback_ports;
use crate::harness::is_traceparent;
use crate::harness::poll_until;
use crate::harness::Api;
use crate::harness::Cluster;
use crate::harness::HelperProcess;
use crate::harness::FORMATION;
use crate::http;
use crate::http::Response;

const UPSTREAM_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/upstream.py");
/// Every node routing to every upstream after formation (registry, first health checks).
const ROUTING: Duration = Duration::from_secs(30);
/// "Within a few seconds": an upstream failing its health check leaves the routing table.
const HEALTH_DROP: Duration = Duration::from_secs(10);
/// A 300 ms `x-timeout-ms` must be a 504 within about a second.
const DEADLINE_504: Duration = Duration::from_millis(1500);
/// "At once": nobody offering a command.
const AT_ONCE: Duration = Duration::from_secs(1);
/// Consecutive good answers that show requests are routed around a bad upstream.
const STREAK: usize = 15;
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

// ---------------------------------------------------------------------------------------------
// Upstream processes and the cluster around them
// ---------------------------------------------------------------------------------------------

/// One `upstream.py` process.
struct Upstream {
    name: String,
    addr: SocketAddr,
    process: HelperProcess,
}

impl Upstream {
    fn spawn(dir: &Path, name: &str, addr: SocketAddr) -> Upstream {
        assert!(
            Path::new(UPSTREAM_PY).exists(),
            "the test upstream app {UPSTREAM_PY} is missing"
        );
        let args = [
            UPSTREAM_PY.to_string(),
            "--port".into(),
            addr.port().to_string(),
            "--name".into(),
            name.to_string(),
        ];
        let log = dir.join(format!("{name}.log"));
        let upstream = Upstream {
            name: name.to_string(),
            addr,
            process: HelperProcess::spawn(name, "python3", &args, log),
        };
        upstream.wait_health(200);
        upstream
    }

    /// A request straight to the upstream, bypassing raftbridge.
    fn request(&self, method: &str, path: &str) -> io::Result<Response> {
        http::request(self.addr, method, path, &[], b"", Duration::from_secs(5))
    }

    /// Waits until the upstream's own `/health` answers `code`.
    fn wait_health(&self, code: u16) {
        poll_until(
            &format!("upstream {} /health {code}", self.name),
            FORMATION,
            || match self.request("GET", "/health") {
                Ok(r) if r.status == code => Ok(()),
                Ok(r) => Err(r.describe()),
                Err(e) => Err(format!("{e}; log: {}", self.process.log_tail())),
            },
        );
    }

    /// Flips the app's health check (`POST /admin/unhealthy` or `/admin/healthy`).
    fn set_healthy(&self, healthy: bool) {
        let path = if healthy {
            "/admin/healthy"
        } else {
            "/admin/unhealthy"
        };
        let resp = self
            .request("POST", path)
            .unwrap_or_else(|e| panic!("upstream {}: POST {path}: {e}", self.name));
        assert!(
            (200..300).contains(&resp.status),
            "upstream {}: POST {path}: {}",
            self.name,
            resp.describe()
        );
        self.wait_health(if healthy { 200 } else { 503 });
    }
}

/// The `[sidecar]` section routing the `orders` service v1 to `upstream`, with a health check
/// of `/health` or none.
fn sidecar_toml(upstream: SocketAddr, health_check: bool) -> String {
    let mut toml = format!("[sidecar]\nupstream = \"http://{upstream}\"\nhealth_interval_ms = 250\n");
    if health_check {
        toml.push_str("health_path = \"/health\"\n");
    }
    for (name, method, path, upstream_path) in [
        ("create", "POST", "orders/:id", "/orders/:id"),
        ("fail", "GET", "fail", "/fail"),
        ("bad", "GET", "bad", "/bad"),
        ("sleep", "GET", "sleep", "/sleep"),
        ("echo", "POST", "echo/:id", "/echo/:id"),
        ("locked", "GET", "locked", "/locked"),
        ("moved", "GET", "moved", "/moved"),
    ] {
        toml.push_str(&format!(
            "\n[[sidecar.commands]]\nservice = \"orders\"\nversion = 1\nname = \"{name}\"\n\
             method = \"{method}\"\npath = \"{path}\"\nupstream_path = \"{upstream_path}\"\n"
        ));
    }
    toml
}

/// Three nodes, node `i` with upstream `up{i}`, once node 1 routes to every upstream.
/// Field order matters on drop: the upstreams go first, then the cluster.
struct SidecarCluster {
    upstreams: Vec<Upstream>,
    c: Cluster,
}

impl SidecarCluster {
    fn formed(name: &str) -> SidecarCluster {
        SidecarCluster::formed_with(name, true)
    }

    fn formed_with(name: &str, health_check: bool) -> SidecarCluster {
        let ports = free_loopback_ports(3);
        let upstreams = RefCell::new(Vec::new());
        let (c, _) = Cluster::formed_with(name, 3, &[], |dir, id| {
            let upstream = Upstream::spawn(dir, &format!("up{id}"), ports[id as usize - 1]);
            let config = dir.join(format!("n{id}-sidecar.toml"));
            fs::write(&config, sidecar_toml(upstream.addr, health_check))
                .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
            upstreams.borrow_mut().push(upstream);
            vec!["--config".to_string(), config.display().to_string()]
        });
        let sc = SidecarCluster {
            upstreams: upstreams.into_inner(),
            c,
        };
        sc.wait_reaches(sc.c.api(1), &sc.names());
        sc
    }

    fn names(&self) -> Vec<String> {
        self.upstreams.iter().map(|u| u.name.clone()).collect()
    }

    fn upstream(&mut self, name: &str) -> &mut Upstream {
        self.upstreams
            .iter_mut()
            .find(|u| u.name == name)
            .unwrap_or_else(|| panic!("no upstream {name}"))
    }

    /// Sends orders via `api` until each upstream of `want` has served one; once answers start
    /// arriving, each must be correct.
    fn wait_reaches(&self, api: Api, want: &[String]) {
        let mut seen = BTreeSet::new();
        let mut n = 0;
        let desc = format!("orders via node {} to reach each of {want:?}", api.id);
        self.c.wait_for(&desc, ROUTING, || {
            for _ in 0..10 {
                n += 1;
                let order = Order::new(n);
                let seen_by = order
                    .check(order.send(api, &[]))
                    .map_err(|e| format!("order {n}: {e}; reached so far {seen:?}"))?;
                seen.insert(seen_by.served_by);
                if want.iter().all(|w| seen.contains(w)) {
                    return Ok(());
                }
            }
            Err(format!("reached so far {seen:?}"))
        });
    }

    /// Sends orders round-robin through every node until `STREAK` in a row succeed without
    /// touching the upstreams in `avoid`. Before that, every answer must be a success or a
    /// gateway error (502/503/504), never another status. Returns the statuses seen.
    fn wait_routed_around(&self, avoid: &[&str]) -> Vec<u16> {
        let (apis, mut statuses, mut streak, mut n) = (self.c.apis(), Vec::new(), 0, 0);
        let desc = format!("{STREAK} orders in a row via every node to avoid {avoid:?}");
        self.c.wait_for(&desc, HEALTH_DROP, || {
            while streak < STREAK {
                n += 1;
                let api = apis[n % apis.len()];
                let order = Order::new(n);
                let resp = order.send(api, &[]).map_err(|e| format!("order {n}: {e}"))?;
                statuses.push(resp.status);
                assert!(
                    matches!(resp.status, 200 | 502 | 503 | 504),
                    "order {n} via node {} around {avoid:?}: expected success or 502/503/504, got {}",
                    api.id,
                    resp.describe()
                );
                match order.check(Ok(resp)) {
                    Ok(seen) if !avoid.contains(&seen.served_by.as_str()) => streak += 1,
                    Ok(seen) => {
                        streak = 0;
                        return Err(format!("order {n} served by {}", seen.served_by));
                    }
                    Err(e) => {
                        streak = 0;
                        return Err(format!("order {n} via node {}: {e}", api.id));
                    }
                }
            }
            Ok(())
        });
        statuses
    }
}

// ---------------------------------------------------------------------------------------------
// The `orders.create` command and what the upstream saw
// ---------------------------------------------------------------------------------------------

/// One `POST /api/v1/orders/:id` with a distinct id and body.
struct Order {
    id: String,
    body: Value,
}

/// What the upstream reported for an order: its name and the request headers it received.
struct Seen {
    served_by: String,
    headers: Value,
}

impl Seen {
    /// A header the upstream received (case-insensitive name).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .as_object()?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_str())
    }
}

impl Order {
    fn new(n: usize) -> Order {
        Order {
            id: format!("order-{n}"),
            body: json!({ "n": n, "items": ["a", "b"], "note": "é✓" }),
        }
    }

    fn send(&self, api: Api, headers: &[(&str, &str)]) -> io::Result<Response> {
        let path = format!("/api/v1/orders/{}", self.id);
        api.request("POST", &path, headers, self.body.to_string().as_bytes())
    }

    /// 200 with this order's id and body echoed by an upstream.
    fn check(&self, resp: io::Result<Response>) -> Result<Seen, String> {
        let resp = resp.map_err(|e| format!("request failed: {e}"))?;
        if resp.status != 200 {
            return Err(resp.describe());
        }
        let v = resp.json()?;
        if v.get("id").and_then(Value::as_str) != Some(self.id.as_str())
            || v.get("body") != Some(&self.body)
        {
            return Err(format!(
                "expected id {} and body {}: {}",
                self.id,
                self.body,
                resp.describe()
            ));
        }
        Ok(Seen {
            served_by: v
                .get("servedBy")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("no \"servedBy\" in {}", resp.describe()))?
                .to_string(),
            headers: v.get("headers").cloned().unwrap_or(Value::Null),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn requests_via_any_node_reach_every_upstream_with_headers_passed_on() {
    let sc = SidecarCluster::formed("sc-spread");
    for api in sc.c.apis() {
        sc.wait_reaches(api, &sc.names());
    }
    let api = sc.c.api(2);
    for n in 0..20 {
        let order = Order::new(1000 + n);
        let request_id = format!("sc-request-{n}");
        let headers = [
            ("x-request-id", request_id.as_str()),
            ("traceparent", TRACEPARENT),
        ];
        let resp = order.send(api, &headers).expect("order");
        let seen = order
            .check(Ok(resp.clone()))
            .unwrap_or_else(|e| panic!("order {n} via node 2: {e}"));
        assert_eq!(
            seen.header("x-request-id"),
            Some(request_id.as_str()),
            "x-request-id at upstream {}: {}",
            seen.served_by,
            seen.headers
        );
        let tp = seen.header("traceparent").unwrap_or_default();
        assert!(
            is_traceparent(tp) && tp[3..35] == TRACEPARENT[3..35],
            "upstream {} should receive the caller's trace id in traceparent, got {tp:?}",
            seen.served_by
        );
        assert_eq!(resp.header("x-request-id"), Some(request_id.as_str()));
        assert_eq!(resp.header("traceparent"), Some(TRACEPARENT));
    }
    // Without one, the upstream receives the x-request-id the client gets back.
    let order = Order::new(2000);
    let resp = order.send(api, &[]).expect("order");
    let seen = order
        .check(Ok(resp.clone()))
        .unwrap_or_else(|e| panic!("{e}"));
    let created = resp.header("x-request-id").unwrap_or_default();
    assert!(
        !created.is_empty(),
        "a created x-request-id: {:?}",
        resp.headers
    );
    assert_eq!(
        seen.header("x-request-id"),
        Some(created),
        "{}",
        seen.headers
    );
    assert!(
        is_traceparent(seen.header("traceparent").unwrap_or_default()),
        "{}",
        seen.headers
    );
}

/// A node is its app's reverse proxy: the client's end-to-end headers reach the app and the
/// app's reach the client, whichever node runs the command (the peer link carries them), and
/// only one hop's headers and the node's own stay behind.
#[test]
fn headers_pass_both_ways_between_a_client_and_the_app_on_any_node() {
    let sc = SidecarCluster::formed("sc-headers");
    for api in sc.c.apis() {
        sc.wait_reaches(api, &sc.names());
    }
    let api = sc.c.api(1);
    let own = sc.upstreams[0].name.clone();
    let mut served = BTreeSet::new();
    // Bounded: three upstreams behind power-of-two choices, so both a local and a remote run
    // come within a few requests.
    for n in 0..60 {
        if served.contains(&own) && served.len() > 1 {
            break;
        }
        let headers = [
            ("content-type", "text/csv"),
            ("accept", "text/plain"),
            ("authorization", "Bearer token-1"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("connection", "x-hop"),
            ("x-hop", "one hop only"),
            ("x-principal-id", "alice"),
            ("accept-encoding", "gzip"),
        ];
        let path = format!("/api/v1/echo/{n}");
        let resp = api.request("POST", &path, &headers, b"a,b\n1,2\n").unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert_eq!(resp.status, 201, "POST {path}: {}", resp.describe());
        let seen = resp.json().unwrap_or_else(|e| panic!("{e}"));
        let by = seen["servedBy"].as_str().unwrap_or_default().to_string();
        let got = &seen["headers"];
        let what = format!("POST {path} run by {by}: the app saw {got}");
        assert_eq!(seen["body"], "a,b\n1,2\n", "{what}");
        assert_eq!(got["content-type"], json!(["text/csv"]), "{what}");
        assert_eq!(got["accept"], json!(["text/plain"]), "{what}");
        assert_eq!(got["authorization"], json!(["Bearer token-1"]), "{what}");
        // A repeated header may arrive as two lines or one joined by a comma (RFC 9110 §5.3).
        let cookies: Vec<String> = got["cookie"].as_array().into_iter().flatten().filter_map(Value::as_str).flat_map(|v| v.split(',')).map(|v| v.trim().to_string()).collect();
        assert!(cookies == ["a=1", "b=2"] || cookies == ["a=1; b=2"], "{what}");
        assert_eq!(got["x-principal-id"], json!(["alice"]), "{what}");
        // The time left of the command's timeout (30 s unless declared), for the app to pass on.
        let left = got["x-timeout-ms"][0].as_str().and_then(|v| v.parse::<u64>().ok());
        assert!(left.is_some_and(|ms| ms > 0 && ms <= 30_000), "{what}");
        assert_eq!((got["x-forwarded-for"].clone(), got["x-forwarded-proto"].clone()), (json!(["127.0.0.1"]), json!(["http"])), "{what}");
        assert_eq!(got["x-forwarded-host"], json!([api.addr.to_string()]), "{what}");
        assert!(got.get("accept-encoding").is_none_or(|v| v == &json!(["identity"])), "{what}");
        assert!(got.get("x-hop").is_none() && got.get("connection").is_none_or(|c| c != &json!(["x-hop"])), "{what}");
        // The app's answer headers come back; the node's own stand.
        assert_eq!(resp.header("location"), Some(format!("/echo/{n}").as_str()), "{what}: {}", resp.describe());
        assert_eq!(resp.header("x-served-by"), Some(by.as_str()), "{what}: {}", resp.describe());
        let set_cookies: Vec<&str> = resp.headers.iter().filter(|(k, _)| k == "set-cookie").map(|(_, v)| v.as_str()).collect();
        assert_eq!(set_cookies, ["a=1", "b=2"], "{}", resp.describe());
        assert_eq!(resp.header("content-type"), Some("application/json"), "{}", resp.describe());
        assert!(resp.header("x-request-id").is_some_and(|v| !v.is_empty()), "{}", resp.describe());
        served.insert(by);
    }
    assert!(served.contains(&own) && served.len() > 1, "runs on node 1's app and another's: {served:?}");
    // An app's error keeps its meaning headers (the body is the node's JSON); a redirect passes.
    let (mut locked_by, mut moved_by) = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..60 {
        if locked_by.iter().any(|b| *b != own) && moved_by.iter().any(|b| *b != own) {
            break;
        }
        let locked = api.request("GET", "/api/v1/locked", &[], b"").expect("GET /api/v1/locked");
        assert_json_error(&locked, 401, "an app's 401");
        assert_eq!(locked.json().ok().and_then(|v| v.get("message").cloned()), Some(json!("who?")), "{}", locked.describe());
        assert_eq!(locked.header("www-authenticate"), Some("Bearer realm=\"orders\""), "{}", locked.describe());
        assert_eq!(locked.header("retry-after"), Some("7"), "{}", locked.describe());
        locked_by.insert(locked.header("x-served-by").unwrap_or_default().to_string());
        let moved = api.request("GET", "/api/v1/moved", &[], b"").expect("GET /api/v1/moved");
        assert_eq!((moved.status, moved.header("location")), (303, Some("/echo/1")), "{}", moved.describe());
        moved_by.insert(moved.header("x-served-by").unwrap_or_default().to_string());
    }
    assert!(locked_by.iter().any(|b| *b != own), "a 401 from another node's app: {locked_by:?}");
    assert!(moved_by.iter().any(|b| *b != own), "a 303 from another node's app: {moved_by:?}");
    // A keyed answer is replayed with its headers, through any node: a created resource's
    // `location` and cookies, a redirect (kept now that its `location` is).
    for (i, (method, path, status)) in [("POST", "/api/v1/echo/keyed", 201), ("GET", "/api/v1/moved", 303)].into_iter().enumerate() {
        let key = format!("headers-key-{i}");
        let keyed = [("idempotency-key", key.as_str())];
        let first = sc.c.api(1).request(method, path, &keyed, b"").expect("first keyed request");
        assert_eq!(first.status, status, "{}", first.describe());
        assert!(first.header("idempotent-replay").is_none(), "{}", first.describe());
        for api in sc.c.apis() {
            let again = api.request(method, path, &keyed, b"").expect("repeat");
            let what = format!("{method} {path} again via node {}: {}", api.id, again.describe());
            assert_eq!((again.status, again.header("idempotent-replay")), (status, Some("true")), "{what}");
            for name in ["location", "x-served-by"] {
                assert_eq!(again.header(name), first.header(name), "{name}: {what}");
            }
            let cookies = |r: &Response| r.headers.iter().filter(|(k, _)| k == "set-cookie").map(|(_, v)| v.clone()).collect::<Vec<_>>();
            assert_eq!(cookies(&again), cookies(&first), "{what}");
            assert_eq!(again.body, first.body, "{what}");
        }
    }
    // Over HTTP/2 (h2c, curl): 20 KiB of headers reach the app (hyper's own bound is 16 KiB
    // there), and cookie crumbs arrive as one line.
    let big = "h".repeat(20 << 10);
    let out = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10", "--http2-prior-knowledge", "--request", "POST", "--data", "{}"])
        .args(["--header", "content-type: application/json", "--header", &format!("x-big: {big}")])
        .args(["--header", "cookie: a=1", "--header", "cookie: b=2"])
        .args(["--write-out", "\n%{http_code} %{http_version}"])
        .arg(format!("http://{}/api/v1/echo/h2", api.addr))
        .output()
        .unwrap_or_else(|e| panic!("run curl (is it installed?): {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or((text.as_str(), ""));
    assert_eq!(tail, "201 2", "HTTP/2 with 20 KiB of headers: {text:.300} {}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:.300}"));
    assert_eq!(seen["headers"]["x-big"], json!([big]), "the app got the big header");
    let cookies: Vec<&str> = seen["headers"]["cookie"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    assert_eq!(cookies, ["a=1; b=2"], "cookie fields as one line");
    // Headers beyond what a node passes on (32 KiB; hyper itself refuses more than 100 lines
    // with a bare 431): a 431 that says why, and the node keeps serving.
    let big = "v".repeat(8 << 10);
    let many: Vec<(String, &str)> = (0..5).map(|i| (format!("x-h{i}"), big.as_str())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let refused = api.request("POST", "/api/v1/echo/x", &many, b"{}").expect("POST with 40 KiB of headers");
    assert_json_error(&refused, 431, "40 KiB of headers for the app");
    assert_eq!(api.request("POST", "/api/v1/echo/y", &[], b"{}").expect("POST").status, 201);
}

#[test]
fn upstream_failures_are_gateway_errors_and_app_errors_pass_through() {
    let sc = SidecarCluster::formed("sc-errors");
    for api in sc.c.apis() {
        let get = |path: &str, headers: &[(&str, &str)]| {
            api.request("GET", path, headers, b"")
                .unwrap_or_else(|e| panic!("GET {path} via node {}: {e}", api.id))
        };
        let what = |s: &str| format!("{s} via node {}", api.id);
        assert_json_error(&get("/api/v1/fail", &[]), 502, &what("upstream 500"));

        let bad = get("/api/v1/bad", &[]);
        assert_eq!(
            bad.status,
            422,
            "{}: {}",
            what("upstream 422"),
            bad.describe()
        );
        assert_eq!(
            bad.json().ok().and_then(|v| v.get("message").cloned()),
            Some(json!("bad thing")),
            "{}: the app's own body passes through: {}",
            what("upstream 422"),
            bad.describe()
        );
        // An error answer longer than a node carries (half of the 16 MiB frame) is not read
        // whole: the app's status stands, with a message that says so, keyed or not. The next
        // request is served as usual.
        for keyed in [false, true] {
            // The second: 4.5 MB of quotes, 9 MB as the app sends them escaped in its JSON.
            for (i, path) in ["/api/v1/bad?pad=9000000", "/api/v1/bad?pad=4500000&quotes=1"].into_iter().enumerate() {
                // A key per request: one key for two requests is a 422 of its own.
                let key = format!("big-error-{}-{i}", api.id);
                let headers: Vec<(&str, &str)> = if keyed { vec![("idempotency-key", key.as_str())] } else { Vec::new() };
                let huge = get(path, &headers);
                assert_json_error(&huge, 422, &what(path));
                let message = huge.json().ok().and_then(|v| v.get("message").cloned());
                assert!(
                    message.as_ref().and_then(Value::as_str).is_some_and(|m| m.contains("larger than")),
                    "{}: {message:?}",
                    what(path)
                );
            }
        }
        assert_eq!(get("/api/v1/bad", &[]).status, 422, "{}", what("served after the huge error"));

        assert_json_error_within(
            api,
            ("GET", "/api/v1/sleep?ms=3000"),
            &[("x-timeout-ms", "300")],
            b"",
            (504, DEADLINE_504),
            "a 3 s upstream call with x-timeout-ms: 300",
        );
        let quick = get("/api/v1/sleep?ms=20", &[("x-timeout-ms", "10000")]);
        assert_eq!(
            quick.status,
            200,
            "{}: {}",
            what("a short sleep"),
            quick.describe()
        );
    }
}

#[test]
fn a_killed_upstream_stops_being_advertised_and_comes_back() {
    let mut sc = SidecarCluster::formed("sc-kill");
    for api in sc.c.apis() {
        sc.wait_reaches(api, &sc.names());
    }
    sc.upstream("up2").process.kill();
    let statuses = sc.wait_routed_around(&["up2"]);
    eprintln!("[sidecar] statuses while routing around the killed up2: {statuses:?}");
    // A refused connection to the app is no answer: the request goes to another node.
    assert!(statuses.iter().all(|s| *s == 200), "every order served elsewhere once up2 died: {statuses:?}");
    // Node 2 itself (whose upstream is gone) keeps answering through the others.
    for n in 0..10 {
        let order = Order::new(3000 + n);
        let seen = order
            .check(order.send(sc.c.api(2), &[]))
            .unwrap_or_else(|e| panic!("order via node 2 with its upstream dead: {e}"));
        assert_ne!(seen.served_by, "up2");
    }

    let up2 = sc.upstream("up2");
    up2.process.start();
    up2.wait_health(200);
    sc.wait_reaches(sc.c.api(1), &["up2".to_string()]);
}

#[test]
fn an_unhealthy_upstream_is_not_advertised_and_none_healthy_is_503() {
    let sc = SidecarCluster::formed("sc-health");
    sc.upstreams[0].set_healthy(false);
    sc.wait_routed_around(&["up1"]);

    for u in &sc.upstreams[1..] {
        u.set_healthy(false);
    }
    // Every node must have seen every sidecar withdraw its commands (each node's health check
    // and the registry writes are independent), so ask each node until all refuse.
    let mut last = Vec::new();
    sc.c.wait_for(
        "orders to be refused with 503 by every node once no upstream is healthy",
        HEALTH_DROP,
        || {
            for api in sc.c.apis() {
                let order = Order::new(4000);
                let resp = order.send(api, &[]).map_err(|e| e.to_string())?;
                if last.len() >= 30 {
                    last.remove(0);
                }
                last.push(resp.status);
                match resp.status {
                    503 => {}
                    200 | 502 | 504 => return Err(format!("statuses so far {last:?}")),
                    _ => panic!(
                        "with unhealthy upstreams: expected 200/502/503/504, got {}",
                        resp.describe()
                    ),
                }
            }
            Ok(())
        },
    );
    for api in sc.c.apis() {
        assert_json_error_within(
            api,
            ("POST", "/api/v1/orders/x"),
            &[],
            b"{}",
            (503, AT_ONCE),
            "no healthy upstream anywhere",
        );
    }

    for u in &sc.upstreams {
        u.set_healthy(true);
    }
    for api in sc.c.apis() {
        sc.wait_reaches(api, &sc.names());
    }
}

/// Without a health check, an app that refuses connections still loses its node no request:
/// each refused one goes to another node, and the node takes the app's work again once it
/// accepts connections (the node probes by connecting while the app is down).
#[test]
fn without_a_health_check_a_dead_app_loses_no_request_and_comes_back() {
    let mut sc = SidecarCluster::formed_with("sc-nocheck", false);
    for api in sc.c.apis() {
        sc.wait_reaches(api, &sc.names());
    }
    sc.upstream("up3").process.kill();
    for n in 0..30u64 {
        let api = sc.c.api(n % 3 + 1);
        let order = Order::new(5000 + n as usize);
        let seen = order
            .check(order.send(api, &[]))
            .unwrap_or_else(|e| panic!("order {n} via node {} with up3 dead: {e}", api.id));
        assert_ne!(seen.served_by, "up3");
    }
    let up3 = sc.upstream("up3");
    up3.process.start();
    up3.wait_health(200);
    for api in sc.c.apis() {
        sc.wait_reaches(api, &["up3".to_string()]);
    }
}
