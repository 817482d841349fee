//! The config and secret stores beside the state store: their own keys, listings, long polls
//! that wake on a write or a delete on another node, the secret store's bearer token, and
//! secret values that reach no node's disk in clear.

use std::time::Duration;
use std::time::Instant;

use serde_json::json;
use serde_json::Value;

use crate::harness::assert_json_error;
use crate::harness::Api;
use crate::harness::Cluster;
use crate::http::Response;

const TOKEN: &str = "it-secrets-token-0123456789";
const SECRET: &str = "it-cluster-secret-0123456789abcdef";
/// A value no other test writes, looked for in every file of the data dirs.
const PLAIN: &str = "hunter2-plain-Q7x9Zr";
/// A state value, found in the data dirs as the secret must not be.
const CANARY: &str = "canary-state-Vb3kLp";

fn call(api: &Api, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    api.request(method, path, headers, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn status(resp: &Response, code: u16, what: &str) {
    assert_eq!(resp.status, code, "{what}: {}", resp.describe());
}

fn json_of(resp: &Response) -> Value {
    resp.json().unwrap_or_else(|e| panic!("{e}"))
}

fn etag(resp: &Response) -> String {
    resp.header("etag").unwrap_or_else(|| panic!("no etag: {}", resp.describe())).trim_matches('"').to_string()
}

/// Every byte of every file under `dir`, searched for `needle`: the files that hold it.
fn files_holding(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            seen += 1;
            assert!(seen < 100_000, "the walk is bounded");
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    found
}

#[test]
fn config_keys_are_listed_and_long_polls_wake_on_another_nodes_write_or_delete() {
    let (c, _leader) = Cluster::formed("stores", 3, &["--example-services"]);
    let [a, b, cc] = [c.api(1), c.api(2), c.api(3)];
    // A config key is not a state key of the same name.
    let put = call(&a, "PUT", "/v1/config/demo/greeting", &[], br#""hello""#);
    status(&put, 200, "config put");
    let r1 = put.revision_header().expect("x-revision");
    let got = call(&b, "GET", "/v1/config/demo/greeting", &[], b"");
    status(&got, 200, "config get on another node");
    assert_eq!((json_of(&got), etag(&got)), (json!("hello"), r1.to_string()));
    assert_json_error(&call(&b, "GET", "/v1/state/demo/greeting", &[], b""), 404, "the state store has no such key");
    // Once every node's services are registered.
    c.wait_until("the demo's commands to be routed", Duration::from_secs(30), || {
        c.apis().iter().all(|api| api.request("GET", "/api/v1/settings/greeting", &[], b"").is_ok_and(|r| r.status == 200))
    });
    let sdk = call(&cc, "GET", "/api/v1/settings/greeting", &[], b"");
    status(&sdk, 200, "an SDK handler reads the config store");
    // HEAD on a GET command that changes nothing: its answer without the body, over HTTP/1
    // and HTTP/2 (curl fails a transfer that gets DATA on a HEAD stream).
    let head = call(&cc, "HEAD", "/api/v1/settings/greeting", &[], b"");
    assert_eq!((head.status, head.body.len()), (200, 0), "{}", head.describe());
    assert_eq!(head.header("content-length"), Some(sdk.body.len().to_string().as_str()));
    let h2 = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--max-time", "20", "--http2-prior-knowledge", "--head"])
        .arg(format!("http://{}/api/v1/settings/greeting", cc.addr))
        .output()
        .expect("curl runs");
    assert_eq!((h2.status.success(), String::from_utf8_lossy(&h2.stdout).to_string()), (true, "200 2".to_string()), "{h2:?}");
    assert_eq!((json_of(&sdk)["value"].clone(), json_of(&sdk)["secretSet"].clone()), (json!("hello"), Value::Null), "no secret store without a cluster secret");
    // An unchanged key is a 304 with its tag, at once or at the end of a wait.
    let same = call(&b, "GET", "/v1/config/demo/greeting", &[("if-none-match", &format!("\"{r1}\""))], b"");
    assert_eq!((same.status, etag(&same)), (304, r1.to_string()), "{}", same.describe());
    let waited = call(&b, "GET", &format!("/v1/config/demo/greeting?index={r1}&wait=300ms"), &[], b"");
    assert_eq!((waited.status, etag(&waited)), (304, r1.to_string()), "{}", waited.describe());

    // Listings: in key order, under a prefix, in pages.
    for key in ["feature/x", "feature/y", "other"] {
        status(&call(&a, "PUT", &format!("/v1/config/demo/{key}"), &[], b"true"), 200, key);
    }
    let list = call(&b, "GET", "/v1/config/demo?prefix=feature/", &[], b"");
    status(&list, 200, "listing");
    let body = json_of(&list);
    let keys: Vec<&str> = body["items"].as_array().expect("items").iter().map(|i| i["key"].as_str().expect("key")).collect();
    assert_eq!(keys, ["feature/x", "feature/y"], "{body}");
    assert_eq!((body["items"][0]["value"].clone(), body["next"].clone()), (json!(true), Value::Null));
    let index = body["index"].as_str().expect("index").to_string();
    assert_eq!(etag(&list), index);
    let page = json_of(&call(&cc, "GET", "/v1/config/demo?prefix=feature/&limit=1", &[], b""));
    assert_eq!((page["items"].as_array().map(Vec::len), page["next"].clone(), page["index"].clone()), (Some(1), json!("feature/x"), json!(index)));
    let rest = json_of(&call(&cc, "GET", "/v1/config/demo?prefix=feature/&after=feature/x", &[], b""));
    assert_eq!(rest["items"][0]["key"], "feature/y");

    // A long poll on node 3 wakes when node 1 adds a key under its prefix...
    let poll = |api: &Api, path: String, tag: String| {
        let addr = api.addr;
        std::thread::spawn(move || crate::http::request(addr, "GET", &path, &[("if-none-match", &format!("\"{tag}\""))], b"", Duration::from_secs(60)))
    };
    let waiting = |api: &Api, n: f64| {
        c.wait_until("the long poll to wait", Duration::from_secs(20), || api.metric("raftbridge_long_polls", &[]).is_ok_and(|v| v >= n));
    };
    let started = Instant::now();
    let listed = poll(&cc, "/v1/config/demo?prefix=feature/&wait=50s".into(), index.clone());
    waiting(&cc, 1.0);
    status(&call(&a, "PUT", "/v1/config/demo/other2", &[], b"1"), 200, "a key outside the prefix");
    status(&call(&a, "PUT", "/v1/config/demo/feature/z", &[], b"\"z\""), 200, "a key under the prefix");
    let woke = listed.join().expect("poll thread").expect("the poll answers");
    status(&woke, 200, "the poll answered the change");
    let body = json_of(&woke);
    assert_eq!(body["items"].as_array().map(Vec::len), Some(3), "{body}");
    assert_ne!(body["index"], json!(index));
    assert!(started.elapsed() < Duration::from_secs(40), "woken by the write, not the wait's end");
    // ... and a poll on one key wakes when another node deletes it.
    let started = Instant::now();
    let key_poll = poll(&b, "/v1/config/demo/greeting?wait=50s".into(), r1.to_string());
    waiting(&b, 1.0);
    status(&call(&cc, "DELETE", "/v1/config/demo/greeting", &[], b""), 200, "delete");
    let gone = key_poll.join().expect("poll thread").expect("the poll answers");
    assert_json_error(&gone, 404, "the key is gone");
    assert!(started.elapsed() < Duration::from_secs(40), "woken by the delete, not the wait's end");
    // The 404 carries the absent key's tag: polling on with it waits for the key's return.
    assert_eq!(etag(&gone), "0", "{}", gone.describe());
    let absent = call(&b, "GET", "/v1/config/demo/greeting?index=0&wait=300ms", &[], b"");
    assert_eq!((absent.status, etag(&absent)), (304, "0".to_string()), "{}", absent.describe());
    c.wait_until("the polls to let go", Duration::from_secs(20), || {
        [&b, &cc].iter().all(|api| api.metric("raftbridge_long_polls", &[]).is_ok_and(|v| v == 0.0))
    });

    // Bad input.
    assert_json_error(&call(&a, "GET", "/v1/config/demo?limit=0", &[], b""), 400, "limit 0");
    assert_json_error(&call(&a, "GET", "/v1/config/demo?wait=soon", &[], b""), 400, "a wait that is no duration");
    assert_json_error(&call(&a, "GET", "/v1/config/demo?wait=307445734561825861m", &[], b""), 400, "a wait past u64 seconds");
    let patch = call(&a, "PATCH", "/v1/config/demo", &[], b"");
    assert_json_error(&patch, 405, "a store takes a listing or a transaction");
    assert_eq!(patch.header("allow"), Some("GET, HEAD, POST"));
    assert_json_error(&call(&a, "POST", "/v1/config/demo", &[], b""), 400, "a transaction without a body");
    assert_json_error(&call(&a, "PUT", "/v1/config/demo/k", &[], b"{"), 400, "not JSON");
    assert_json_error(&call(&a, "GET", "/v1/secrets/demo/k", &[], b""), 403, "no secrets token on these nodes");
}

#[test]
fn secrets_want_the_token_and_are_sealed_on_every_disk() {
    let flags = ["--example-services", "--cluster-secret", SECRET, "--secrets-token", TOKEN];
    let (c, _leader) = Cluster::formed("secrets", 3, &flags);
    let [a, b] = [c.api(1), c.api(2)];
    let auth = format!("Bearer {TOKEN}");
    let bearer = [("authorization", auth.as_str())];
    let value = json!({"user": "app", "password": PLAIN});
    let body = serde_json::to_vec(&value).expect("encodes");
    // Without the token, or with another: 401, nothing written.
    let none = call(&a, "PUT", "/v1/secrets/db/password", &[], &body);
    assert_json_error(&none, 401, "no token");
    assert!(none.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")), "{}", none.describe());
    assert_json_error(&call(&a, "PUT", "/v1/secrets/db/password", &[("authorization", "Bearer not-the-token-at-all")], &body), 401, "another token");
    // The token before the query: a client without it is not told which parameters exist.
    assert_json_error(&call(&a, "GET", "/v1/secrets/db/password?probe=1", &[], b""), 401, "no token, an unknown parameter");
    assert_json_error(&call(&a, "GET", "/v1/secrets/db/password?probe=1", &bearer, b""), 400, "the token, an unknown parameter");
    let twice = call(&a, "GET", "/v1/secrets/db/password", &[("authorization", auth.as_str()), ("authorization", "Bearer other")], b"");
    assert_json_error(&twice, 400, "the token given twice");
    assert_eq!(twice.header("cache-control"), Some("no-store"), "errors of the secret store too");
    let wrong_method = call(&a, "POST", "/v1/secrets/db", &bearer, b"");
    assert_json_error(&wrong_method, 405, "a listing is read only");
    assert_eq!(wrong_method.header("cache-control"), Some("no-store"), "a 405 the router makes too");
    assert_json_error(&call(&b, "GET", "/v1/secrets/db/password", &bearer, b""), 404, "nothing was written");
    // With it: written on one node, read on another.
    status(&call(&a, "PUT", "/v1/secrets/db/password", &bearer, &body), 200, "secret put");
    let got = call(&b, "GET", "/v1/secrets/db/password", &bearer, b"");
    status(&got, 200, "secret get on another node");
    assert_eq!(json_of(&got), value);
    assert_eq!(got.header("cache-control"), Some("no-store"));
    // The router reads the path without its leading slashes: so does the header's rule.
    let doubled = call(&b, "GET", "//v1/secrets/db/password", &bearer, b"");
    status(&doubled, 200, "secret get with a doubled slash");
    assert_eq!(doubled.header("cache-control"), Some("no-store"), "{}", doubled.describe());
    assert_json_error(&call(&b, "GET", "/v1/secrets/db/password", &[], b""), 401, "a read wants the token too");
    // A listing names the secrets, never their values.
    let list = call(&b, "GET", "/v1/secrets/db", &bearer, b"");
    status(&list, 200, "secret listing");
    assert!(!list.text().contains(PLAIN) && !list.text().contains("rbs1:"), "{}", list.describe());
    assert_eq!(json_of(&list)["items"][0]["key"], "password");
    assert!(json_of(&list)["items"][0].get("value").is_none());
    // The state API cannot name the secret store's keys.
    assert_json_error(&call(&a, "GET", "/v1/state/%01secrets%2Fdb/password", &[], b""), 400, "an internal store name");
    // An SDK handler sees that the secret is set.
    c.wait_until("the demo's commands to be routed", Duration::from_secs(30), || {
        c.apis().iter().all(|api| api.request("GET", "/api/v1/settings/password", &[], b"").is_ok_and(|r| r.status == 200))
    });
    let sdk = json_of(&call(&b, "GET", "/api/v1/settings/password", &[], b""));
    assert_eq!(sdk["secretSet"], json!(false), "{sdk}");
    status(&call(&a, "PUT", "/v1/secrets/demo/password", &bearer, &body), 200, "the demo's secret");
    let sdk = json_of(&call(&b, "GET", "/api/v1/settings/password", &[], b""));
    assert_eq!(sdk["secretSet"], json!(true), "{sdk}");
    // Every node applied it, and no file of any node holds the value in clear (the log, the
    // snapshot, the node logs, anything else), in any quoting, while a state value is found
    // there (the search works).
    status(&call(&a, "PUT", "/v1/state/demo/canary", &[], format!("\"{CANARY}\"").as_bytes()), 200, "state canary");
    for api in c.apis() {
        c.wait_until("the secret to reach every node", Duration::from_secs(20), || {
            api.request("GET", "/v1/secrets/db/password?consistency=stale", &bearer, b"").is_ok_and(|r| r.status == 200)
                && api.request("GET", "/v1/state/demo/canary?consistency=stale", &[], b"").is_ok_and(|r| r.status == 200)
        });
    }
    c.wait_until("the state canary to reach the disks", Duration::from_secs(20), || {
        files_holding(c.dir(), CANARY.as_bytes()).len() >= 3
    });
    let leaked = files_holding(c.dir(), PLAIN.as_bytes());
    assert!(leaked.is_empty(), "the secret in clear in {leaked:?}");
    // After a restart of every node the secret still opens (the key comes from the cluster secret).
    c.kill_all();
    c.start_all();
    c.wait_all_ready(Duration::from_secs(60));
    let again = call(&c.api(3), "GET", "/v1/secrets/db/password", &bearer, b"");
    status(&again, 200, "after a restart");
    assert_eq!(json_of(&again), value);
}

/// `--api-token`: the data and admin API answers only a client with the token (the current or
/// the previous one), before it reads anything of the request; the probes, `/metrics`, the
/// OpenAPI document and the services' endpoints stay open, the secret store keeps its own
/// token, and the CLI's `leave` and `probe` send it with `--api-token`.
#[test]
fn the_api_token_guards_the_data_and_admin_api() {
    const API: &str = "it-api-token-0123456789abcdef";
    const OLD: &str = "it-old-api-token-0123456789";
    const READ: &str = "it-read-api-token-0123456789";
    let flags = ["--example-services", "--cluster-secret", SECRET, "--secrets-token", TOKEN, "--api-token", API, "--api-token-previous", OLD, "--api-read-token", READ];
    let (c, _leader) = Cluster::formed("apitoken", 3, &flags);
    let [a, b] = [c.api(1), c.api(2)];
    let (current, previous) = (format!("Bearer {API}"), format!("Bearer {OLD}"));
    let [with, with_old] = [[("authorization", current.as_str())], [("authorization", previous.as_str())]];
    let guarded: [(&str, &str, &[u8]); 14] = [
        ("PUT", "/v1/state/demo/k", b"1"),
        ("GET", "/cluster/snapshot", b""),
        ("GET", "//v1/state/demo/k", b""),
        ("GET", "/v1/%73ecrets/db/pw", b""),
        ("GET", "/v1/state/demo/k", b""),
        ("GET", "/v1/state/demo", b""),
        ("PUT", "/v1/config/demo/k", b"1"),
        ("POST", "/v1/events/tokenTest", b"{}"),
        ("GET", "/v1/events?after=0", b""),
        ("GET", "/v1/dead-letters?subscription=countOrders", b""),
        ("GET", "/v1/subscriptions", b""),
        ("GET", "/cluster", b""),
        ("DELETE", "/cluster/members/3", b""),
        ("GET", "/no/such/route", b""),
    ];
    for (method, path, body) in guarded {
        for (headers, what) in [(&[][..], "no token"), (&[("authorization", "Bearer not-the-api-token-at-all")][..], "another token"), (&[("authorization", API)][..], "no scheme")] {
            let resp = call(&a, method, path, headers, body);
            assert_json_error(&resp, 401, &format!("{method} {path}, {what}"));
            assert_eq!(resp.header("www-authenticate"), Some("Bearer realm=\"raftbridge\""), "{}", resp.describe());
        }
        let twice = call(&a, method, path, &[("authorization", current.as_str()), ("authorization", previous.as_str())], body);
        assert_json_error(&twice, 400, &format!("{method} {path}, the token given twice"));
    }
    let head = call(&a, "HEAD", "/v1/state/demo/k", &[], b"");
    assert_eq!((head.status, head.header("www-authenticate")), (401, Some("Bearer realm=\"raftbridge\"")), "a HEAD without the token");
    // Nothing of the refused requests happened: no key, no event, node 3 still a member.
    assert_json_error(&call(&b, "GET", "/v1/state/demo/k", &with, b""), 404, "the refused put wrote nothing");
    let events = json_of(&call(&b, "GET", "/v1/events?after=0&eventName=tokenTest", &with, b""));
    assert_eq!(events["events"], json!([]), "the refused publish stored nothing");
    assert_eq!(json_of(&call(&b, "GET", "/cluster", &with, b""))["members"].as_array().map(Vec::len), Some(3), "the refused removal removed nobody");
    // With the current token or the previous one, the API works on any node.
    status(&call(&a, "PUT", "/v1/state/demo/k", &with, b"\"v1\""), 200, "put with the current token");
    status(&call(&b, "GET", "/v1/state/demo/k", &with_old, b""), 200, "get with the previous token");
    status(&call(&b, "POST", "/v1/events/tokenTest", &with_old, b"{\"n\":1}"), 201, "publish with the previous token");
    assert_json_error(&call(&b, "GET", "/no/such/route", &with, b""), 404, "an unknown route, with the token");
    // The read token reads, and may write nothing.
    let reader = format!("Bearer {READ}");
    let read = [("authorization", reader.as_str())];
    status(&call(&b, "GET", "/v1/state/demo/k", &read, b""), 200, "a read with the read token");
    status(&call(&b, "HEAD", "/v1/state/demo/k", &read, b""), 200, "a HEAD with the read token");
    status(&call(&b, "GET", "/v1/events?after=0&eventName=tokenTest", &read, b""), 200, "the event log with the read token");
    status(&call(&b, "GET", "/cluster", &read, b""), 200, "/cluster with the read token");
    for (method, path, body) in [
        ("PUT", "/v1/state/demo/k", &b"\"by reader\""[..]),
        ("DELETE", "/v1/state/demo/k", b""),
        ("POST", "/v1/events/tokenTest", b"{}"),
        ("DELETE", "/v1/subscriptions/countOrders", b""),
        ("DELETE", "/cluster/members/3", b""),
        // A snapshot holds every stored command answer and the secrets' ciphertext.
        ("GET", "/cluster/snapshot", b""),
    ] {
        assert_json_error(&call(&a, method, path, &read, body), 403, &format!("{method} {path} with the read token"));
    }
    assert_eq!(json_of(&call(&b, "GET", "/v1/state/demo/k", &with, b"")), json!("v1"), "the reader changed nothing");
    assert_json_error(&call(&a, "GET", "/v1/secrets/db/pw", &read, b""), 401, "the read token reads no secrets");
    // Open without it: what orchestrators, load balancers and Prometheus read, and the app's own
    // endpoints.
    c.wait_until("the demo's commands to be routed and the node ready", Duration::from_secs(30), || {
        a.request("POST", "/api/v1/echo", &[], b"{\"x\":1}").is_ok_and(|r| r.status == 200) && a.probe("/readyz") == Ok(200)
    });
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        status(&call(&a, "GET", path, &[], b""), 200, path);
    }
    // The secret store takes its own token, not the API's.
    let secrets = format!("Bearer {TOKEN}");
    status(&call(&a, "PUT", "/v1/secrets/db/pw", &[("authorization", secrets.as_str())], b"\"s\""), 200, "a secret with the secrets token");
    let refused = call(&a, "GET", "/v1/secrets/db/pw", &with, b"");
    assert_json_error(&refused, 401, "the API token is not the secrets token");
    assert_eq!(refused.header("www-authenticate"), Some("Bearer realm=\"raftbridge secrets\""), "{}", refused.describe());
    // The CLI sends the token when given one, and says what it needs when not.
    let http = format!("http://{}", a.addr);
    assert!(!c.run_cli("probe-no-token", &["probe", &format!("{http}/cluster")], Duration::from_secs(30)).success());
    assert!(c.run_cli("probe-token", &["probe", &format!("{http}/cluster"), "--api-token", API], Duration::from_secs(30)).success());
    assert!(!c.run_cli("leave-no-token", &["leave", "--http-addr", &http, "--id", "3"], Duration::from_secs(60)).success());
    let said = std::fs::read_to_string(c.dir().join("leave-no-token.cli.log")).expect("the CLI's log");
    assert!(said.contains("--api-token"), "{said}");
    assert_eq!(json_of(&call(&b, "GET", "/cluster", &with, b""))["members"].as_array().map(Vec::len), Some(3));
    assert!(c.run_cli("leave-token", &["leave", "--http-addr", &http, "--id", "3", "--api-token", API], Duration::from_secs(60)).success());
    c.wait_until("node 3 to leave the membership", Duration::from_secs(30), || {
        call(&b, "GET", "/cluster", &with, b"").json().is_ok_and(|v| v["members"].as_array().is_some_and(|m| m.len() == 2))
    });
}

/// A key written with `?ttl=N` is removed by the cluster once N seconds passed (on every node,
/// by content: the others stay), also across a restart of every node while it waits; a later
/// put without a TTL ends the expiry; a read names when a key expires; a TTL that is not whole
/// seconds in range, or one on a secret, is a 400.
#[test]
fn keys_written_with_a_ttl_are_removed_once_it_passes() {
    let flags = ["--cluster-secret", SECRET, "--secrets-token", TOKEN, "--snapshot-threshold", "20"];
    let (c, leader) = Cluster::formed("ttl", 3, &flags);
    let api = c.api(leader);
    let started_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    status(&call(&api, "PUT", "/v1/state/t/short?ttl=2", &[], b"\"short\""), 200, "a put with a TTL");
    status(&call(&api, "PUT", "/v1/state/t/ended?ttl=2", &[], b"1"), 200, "a put with a TTL");
    status(&call(&api, "PUT", "/v1/state/t/ended", &[], b"2"), 200, "the same key without one");
    status(&call(&api, "PUT", "/v1/state/t/long?ttl=3600", &[], b"\"long\""), 200, "a long TTL");
    status(&call(&api, "PUT", "/v1/state/t/plain", &[], b"\"plain\""), 200, "a plain put");
    status(&call(&api, "PUT", "/v1/config/app/flag?ttl=2", &[], b"true"), 200, "a config key with a TTL");
    // Written through another node; its expiry outlives a restart of every node, which reads
    // it from a snapshot taken after it.
    let restarted = call(&c.api(c.ids()[(leader as usize) % 3]), "PUT", "/v1/state/t/restarted?ttl=20", &[], b"\"r\"");
    status(&restarted, 200, "a put via a follower");
    let restarted_rev = json_of(&restarted)["revision"].as_u64().expect("a revision");
    for bad in ["0", "-1", "1.5", "abc", "315360001"] {
        assert_json_error(&call(&api, "PUT", &format!("/v1/state/t/bad?ttl={bad}"), &[], b"1"), 400, &format!("ttl={bad}"));
    }
    let bearer = format!("Bearer {TOKEN}");
    assert_json_error(&call(&api, "PUT", "/v1/secrets/s/k?ttl=5", &[("authorization", bearer.as_str())], b"\"x\""), 400, "a TTL on a secret");
    let read = call(&api, "GET", "/v1/state/t/long", &[], b"");
    status(&read, 200, "the long key");
    let at: u64 = read.header("x-expires-at-ms").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no expiry named: {}", read.describe()));
    assert!(at >= started_ms + 3_590_000 && at <= started_ms + 3_700_000, "expires in an hour: {at} vs {started_ms}");
    assert!(call(&api, "GET", "/v1/state/t/plain", &[], b"").header("x-expires-at-ms").is_none(), "a plain key names no expiry");
    // A listing names the same expiry, and only for the keys that expire.
    let listing = json_of(&call(&api, "GET", "/v1/state/t?prefix=", &[], b""));
    let items = listing["items"].as_array().unwrap_or_else(|| panic!("a listing: {listing}"));
    let listed = |key: &str| items.iter().find(|i| i["key"] == key).unwrap_or_else(|| panic!("{key} listed: {listing}")).clone();
    assert_eq!(listed("long")["expiresAtMs"], json!(at), "{listing}");
    assert_eq!(listed("short")["value"], json!("short"), "{listing}");
    assert!(listed("short")["expiresAtMs"].as_u64().is_some_and(|short| short < at), "{listing}");
    for key in ["plain", "ended"] {
        assert!(listed(key).get("expiresAtMs").is_none(), "{key}: {listing}");
    }
    // A TTL where nothing takes one is refused, not ignored.
    for (method, path) in [("GET", "/v1/state/t/long?ttl=5"), ("DELETE", "/v1/state/t/long?ttl=5"), ("GET", "/v1/state/t?ttl=5")] {
        assert_json_error(&call(&api, method, path, &[], b""), 400, &format!("{method} {path}"));
    }
    status(&call(&api, "GET", "/v1/state/t/long", &[], b""), 200, "the refused DELETE left the key");

    for i in 0..30 {
        status(&call(&api, "PUT", &format!("/v1/state/fill/k{i}"), &[], b"1"), 200, "a filler write");
    }
    c.wait_until("every node to have a snapshot past the TTL writes", Duration::from_secs(60), || {
        c.apis().iter().all(|api| api.status().is_ok_and(|s| s.snapshot.is_some_and(|i| i > restarted_rev)))
    });
    status(&call(&api, "GET", "/v1/state/t/restarted", &[], b""), 200, "the key waits for its expiry at the restart");
    c.kill_all();
    c.start_all();
    c.wait_for_leader(Duration::from_secs(60));
    c.wait_until("the expired keys to be gone on every node", Duration::from_secs(60), || {
        c.apis().iter().all(|api| {
            ["/v1/state/t/short", "/v1/state/t/restarted", "/v1/config/app/flag"]
                .iter()
                .all(|path| api.request("GET", path, &[], b"").is_ok_and(|r| r.status == 404))
        })
    });
    for api in c.apis() {
        for (path, want) in [("/v1/state/t/ended", json!(2)), ("/v1/state/t/long", json!("long")), ("/v1/state/t/plain", json!("plain"))] {
            let resp = call(&api, "GET", path, &[], b"");
            status(&resp, 200, &format!("{path} on node {}", api.id));
            assert_eq!(json_of(&resp), want, "{path} on node {}", api.id);
        }
    }
}

/// A node restarted while a member is down counts that member by the build the cluster
/// recorded of it, not as knowing nothing: nodes 1 and 2 restarted with node 3 down take TTL
/// writes and remove the keys when due. Before the record, every command a build gates on its
/// members' features (key expiry, held claims, a handler's tagged delete) was refused or held
/// back until node 3 came back: here, a 503 for the write.
#[test]
fn a_node_restarted_while_a_member_is_down_knows_that_members_build() {
    let (c, _) = Cluster::formed("features-recorded", 3, &[]);
    c.wait_until("every node knows the cluster recorded all three members' builds", Duration::from_secs(60), || {
        c.apis().iter().all(|api| api.metric("raftbridge_cluster_members_recorded", &[]).is_ok_and(|n| n == 3.0))
    });
    c.kill(3);
    c.kill(1);
    c.kill(2);
    c.start(1);
    c.start(2);
    let leader = c.wait_for_leader(Duration::from_secs(60));
    let api = c.api(leader);
    let view = json_of(&call(&api, "GET", "/cluster", &[], b""));
    let three = view["members"].as_array().and_then(|m| m.iter().find(|m| m["id"] == 3)).cloned().unwrap_or_default();
    assert!(three["features"].as_u64().is_some_and(|f| f & 2048 != 0), "node 3's build as recorded: {three}");
    assert_eq!(three["reachable"], json!(false), "{three}");
    let put = call(&api, "PUT", "/v1/state/t/lease?ttl=1", &[], b"\"held\"");
    status(&put, 200, "a TTL write with node 3 down since the restart");
    c.wait_until("the key is gone on nodes 1 and 2", Duration::from_secs(30), || {
        [1, 2].iter().all(|id| c.api(*id).request("GET", "/v1/state/t/lease", &[], b"").is_ok_and(|r| r.status == 404))
    });
    c.start(3);
    c.wait_until("node 3 removed it too", Duration::from_secs(60), || {
        c.api(3).request("GET", "/v1/state/t/lease?consistency=stale", &[], b"").is_ok_and(|r| r.status == 404)
    });
}

/// `POST /v1/{state|config}/{store}` writes its keys all or none under one revision, through a
/// follower as through the leader: every node then reads each value as written (by content)
/// with that revision; a stale `ifRevision` or a failed `check` is a 412 naming the operation,
/// and nothing of that transaction is written; malformed transactions are 400s; the secret
/// store takes none (405).
#[test]
fn a_transaction_writes_its_keys_all_or_none_on_every_node() {
    let flags = ["--cluster-secret", SECRET, "--secrets-token", TOKEN];
    let (c, leader) = Cluster::formed("txn", 3, &flags);
    let follower = c.api(c.ids().into_iter().find(|id| *id != leader).expect("a follower"));
    let put = call(&follower, "PUT", "/v1/state/bank/a", &[], b"1");
    status(&put, 200, "a plain put");
    let rev_a = json_of(&put)["revision"].as_u64().expect("a revision");
    status(&call(&follower, "PUT", "/v1/state/bank/c", &[], b"\"doomed\""), 200, "a plain put");

    let txn = json!({"operations": [
        {"op": "put", "key": "a", "value": 10, "ifRevision": rev_a},
        {"op": "put", "key": "b", "value": {"x": [1, 2.5, "é"]}, "ifRevision": 0},
        {"op": "delete", "key": "c"},
        {"op": "check", "key": "d", "revision": 0},
        {"op": "put", "key": "n", "value": null},
    ]});
    let done = call(&follower, "POST", "/v1/state/bank", &[], txn.to_string().as_bytes());
    status(&done, 200, "a transaction through a follower");
    let revision = json_of(&done)["revision"].as_u64().expect("the transaction's revision");
    assert!(revision > rev_a);
    for id in c.ids() {
        let api = c.api(id);
        for (key, value) in [("a", json!(10)), ("b", json!({"x": [1, 2.5, "é"]})), ("n", Value::Null)] {
            let got = call(&api, "GET", &format!("/v1/state/bank/{key}"), &[], b"");
            status(&got, 200, &format!("node {id} reads {key}"));
            assert_eq!(json_of(&got), value, "node {id}: {key}");
            assert_eq!(got.header("x-revision"), Some(revision.to_string().as_str()), "node {id}: {key} has the transaction's revision");
        }
        status(&call(&api, "GET", "/v1/state/bank/c", &[], b""), 404, &format!("node {id}: the transaction's delete"));
    }

    // A stale revision in the second op: a 412 naming it, and the first op's key and the new
    // key are unchanged.
    let stale = json!({"operations": [
        {"op": "put", "key": "e", "value": "new"},
        {"op": "put", "key": "a", "value": 11, "ifRevision": rev_a},
    ]});
    let refused = call(&c.api(leader), "POST", "/v1/state/bank", &[], stale.to_string().as_bytes());
    assert_json_error(&refused, 412, "a stale ifRevision");
    assert_eq!(json_of(&refused)["failed"], json!({"operation": 1, "key": "a", "revision": revision}), "{}", refused.describe());
    let checked = json!({"operations": [{"op": "delete", "key": "a"}, {"op": "check", "key": "b", "revision": 0}]});
    let refused = call(&follower, "POST", "/v1/state/bank", &[], checked.to_string().as_bytes());
    assert_json_error(&refused, 412, "a failed check");
    assert_eq!(json_of(&refused)["failed"]["operation"], 1);
    for id in c.ids() {
        let api = c.api(id);
        status(&call(&api, "GET", "/v1/state/bank/e", &[], b""), 404, &format!("node {id}: nothing of the refused transaction"));
        assert_eq!(json_of(&call(&api, "GET", "/v1/state/bank/a", &[], b"")), json!(10), "node {id}: a kept its value");
    }

    // The config store takes them too; the secret store does not.
    let cfg = json!({"operations": [{"op": "put", "key": "x", "value": 1}, {"op": "put", "key": "y", "value": 2}]});
    status(&call(&follower, "POST", "/v1/config/app", &[], cfg.to_string().as_bytes()), 200, "a config transaction");
    assert_eq!(json_of(&call(&follower, "GET", "/v1/config/app/y", &[], b"")), json!(2));
    let bearer = format!("Bearer {TOKEN}");
    assert_json_error(&call(&follower, "POST", "/v1/secrets/s", &[("authorization", bearer.as_str())], cfg.to_string().as_bytes()), 405, "a secret transaction");

    let many: Vec<Value> = (0..65).map(|i| json!({"op": "put", "key": format!("k{i}"), "value": i})).collect();
    for (body, what) in [
        (json!({"operations": []}).to_string(), "no operations"),
        (json!({"operations": many}).to_string(), "65 operations"),
        (json!({"operations": [{"op": "put", "key": "a", "value": 1}, {"op": "delete", "key": "a"}]}).to_string(), "a key twice"),
        (json!({"operations": [{"op": "rename", "key": "a"}]}).to_string(), "an unknown op"),
        (json!({"operations": [{"op": "put", "key": "a"}]}).to_string(), "a put without a value"),
        (json!({"operations": [{"op": "check", "key": "a"}]}).to_string(), "a check without a revision"),
        (json!({"operations": [{"op": "put", "key": "a", "value": 1, "ttl": 5}]}).to_string(), "an unknown field"),
        (json!({"operations": [{"op": "put", "key": "", "value": 1}]}).to_string(), "an empty key"),
        ("{\"operations\": [".to_string(), "truncated JSON"),
    ] {
        assert_json_error(&call(&follower, "POST", "/v1/state/bank", &[], body.as_bytes()), 400, what);
    }
    assert_json_error(&call(&follower, "POST", "/v1/state/bank?dry=1", &[], cfg.to_string().as_bytes()), 400, "a query parameter");
    for (header, value) in [("if-match", "1"), ("if-none-match", "*")] {
        let refused = call(&follower, "POST", "/v1/state/bank", &[(header, value)], cfg.to_string().as_bytes());
        assert_json_error(&refused, 400, &format!("{header} on a transaction"));
        assert!(refused.text().contains("ifRevision"), "the message points to ifRevision: {}", refused.describe());
    }
    // Over --max-body (1 MiB unless set): a 413, nothing written.
    let big = "x".repeat(512 << 10);
    let huge = json!({"operations": (0..3).map(|i| json!({"op": "put", "key": format!("big{i}"), "value": big})).collect::<Vec<_>>()});
    assert_json_error(&call(&follower, "POST", "/v1/state/bank", &[], huge.to_string().as_bytes()), 413, "a transaction over --max-body");
    status(&call(&follower, "GET", "/v1/state/bank/big0", &[], b""), 404, "the oversized transaction wrote nothing");
    assert_eq!(json_of(&call(&follower, "GET", "/v1/state/bank/a", &[], b"")), json!(10), "no refused transaction wrote anything");
    status(&call(&follower, "GET", "/v1/state/bank/k0", &[], b""), 404, "the 65-op transaction wrote nothing");
}

/// A transaction is a 503 that writes nothing while a member announces a build without them
/// (feature bit 8192: node 3 withholds it through the test hook), while single writes go on;
/// once that member runs a build that announces it, the same transaction commits.
#[test]
fn a_transaction_waits_for_every_member_to_apply_them() {
    const TXN: u64 = 8192;
    let c = Cluster::new("txn-gate", 3, &[]);
    c.set_env(3, "RAFTBRIDGE_TEST_WITHHOLD_FEATURES", &TXN.to_string());
    c.start_all();
    c.wait_for_membership(&c.ids(), &[], crate::harness::FORMATION);
    let api = c.api(1);
    let features_of_3 = || -> Result<u64, String> {
        let view = json_of(&call(&api, "GET", "/cluster", &[], b""));
        let members = view["members"].as_array().ok_or("no members")?.clone();
        members.iter().find(|m| m["id"] == 3).and_then(|m| m["features"].as_u64()).ok_or_else(|| format!("node 3's features not known yet: {view}"))
    };
    let seen = c.wait_for("node 1 to know node 3's features", crate::harness::FORMATION, features_of_3);
    assert_eq!(seen & TXN, 0, "node 3 withholds the bit: {seen}");
    assert_ne!(seen & 4096, 0, "and announces the others: {seen}");
    let txn = json!({"operations": [{"op": "put", "key": "a", "value": 1}, {"op": "put", "key": "b", "value": 2}]}).to_string();
    let refused = call(&api, "POST", "/v1/state/gate", &[], txn.as_bytes());
    assert_json_error(&refused, 503, "a transaction while a member lacks them");
    assert!(refused.text().contains("without transactions") && refused.text().contains("members [3]"), "names the member: {}", refused.describe());
    status(&call(&api, "GET", "/v1/state/gate/a", &[], b""), 404, "the refused transaction wrote nothing");
    status(&call(&api, "PUT", "/v1/state/gate/single", &[], b"1"), 200, "single writes go on");

    c.kill(3);
    c.set_env(3, "RAFTBRIDGE_TEST_WITHHOLD_FEATURES", "0");
    c.start(3);
    c.wait_for("the transaction once node 3 announces transactions", Duration::from_secs(60), || {
        let r = call(&api, "POST", "/v1/state/gate", &[], txn.as_bytes());
        if r.status == 200 { Ok(()) } else { Err(r.describe()) }
    });
    for id in c.ids() {
        c.wait_for(&format!("node {id} to read both keys"), Duration::from_secs(30), || {
            let (a, b) = (call(&c.api(id), "GET", "/v1/state/gate/a", &[], b""), call(&c.api(id), "GET", "/v1/state/gate/b", &[], b""));
            if a.status == 200 && b.status == 200 && json_of(&a) == json!(1) && json_of(&b) == json!(2) { Ok(()) } else { Err(format!("{} / {}", a.describe(), b.describe())) }
        });
    }
}

/// A transaction is judged by the quota for what its ops add together: at the key limit, one
/// that adds a key is a 507 and writes nothing, one that deletes a key as it adds another
/// commits.
#[test]
fn a_transaction_is_judged_by_the_quota_for_what_it_adds_together() {
    let (c, leader) = Cluster::formed("txn-quota", 3, &["--state-max-keys", "4"]);
    let api = c.api(leader);
    for k in ["k1", "k2", "k3", "k4"] {
        status(&call(&api, "PUT", &format!("/v1/state/q/{k}"), &[], b"1"), 200, "filling the quota");
    }
    let adds = json!({"operations": [{"op": "put", "key": "k1", "value": 2}, {"op": "put", "key": "n1", "value": 1}]}).to_string();
    assert_json_error(&call(&api, "POST", "/v1/state/q", &[], adds.as_bytes()), 507, "a transaction that adds a key to a full store");
    assert_eq!(json_of(&call(&api, "GET", "/v1/state/q/k1", &[], b"")), json!(1), "nothing of it written");
    let swaps = json!({"operations": [{"op": "put", "key": "n1", "value": 1}, {"op": "delete", "key": "k1"}]}).to_string();
    status(&call(&api, "POST", "/v1/state/q", &[], swaps.as_bytes()), 200, "a transaction that adds nothing in all");
    status(&call(&api, "GET", "/v1/state/q/k1", &[], b""), 404, "its delete");
    status(&call(&api, "GET", "/v1/state/q/n1", &[], b""), 200, "its put");
}

/// `raftbridge kv` and `raftbridge events` through a follower: a put, get (with its revision),
/// a stale conditional put refused with the node's message, a listing by prefix across pages,
/// a delete, a config key, and a keyed publish repeated that answers the first position; the
/// event log printed by name. Checked by content, in the HTTP API and in what the commands print.
#[test]
fn the_kv_and_events_commands_work_through_any_node() {
    let (c, leader) = Cluster::formed("cli-data", 3, &[]);
    let follower = c.api(c.ids().into_iter().find(|id| *id != leader).expect("a follower"));
    let addr = follower.addr.to_string();
    let run = |name: &str, args: &[&str]| -> (bool, String) {
        let mut full = args.to_vec();
        full.extend_from_slice(&["--http-addr", &addr]);
        let ok = c.run_cli(name, &full, Duration::from_secs(60)).success();
        let out = std::fs::read_to_string(c.dir().join(format!("{name}.cli.log"))).expect("the command's output");
        (ok, out)
    };
    let (ok, out) = run("put", &["kv", "put", "app", "a b/c", r#"{"x":[1,"é"]}"#]);
    assert!(ok, "{out}");
    // A value printed as stored: its keys in their order, a large integer whole.
    let exact = r#"{"z":1,"a":18446744073709551616}"#;
    status(&call(&follower, "PUT", "/v1/state/app/exact", &[], exact.as_bytes()), 200, "a value with a large integer");
    let revision = serde_json::from_str::<Value>(out.trim()).expect("JSON")["revision"].as_u64().expect("a revision");
    assert_eq!(json_of(&call(&follower, "GET", "/v1/state/app/a%20b%2Fc", &[], b"")), json!({"x": [1, "é"]}), "the key as given, percent-encoded");
    let (ok, out) = run("get", &["kv", "get", "app", "a b/c"]);
    assert!(ok, "{out}");
    assert_eq!(serde_json::from_str::<Value>(out.trim()).expect("JSON"), json!({"x": [1, "é"]}));
    let (ok, out) = run("get-rev", &["kv", "get", "--revision", "app", "a b/c"]);
    assert!(ok, "{out}");
    assert_eq!(serde_json::from_str::<Value>(out.trim()).expect("JSON"), json!({"value": {"x": [1, "é"]}, "revision": revision}));
    let stale = (revision - 1).to_string();
    let (ok, out) = run("put-stale", &["kv", "put", "--if-revision", &stale, "app", "a b/c", "2"]);
    assert!(!ok && out.contains("HTTP 412"), "a stale --if-revision: {out}");
    let (ok, out) = run("put-bad", &["kv", "put", "app", "k", "not json"]);
    assert!(!ok && out.contains("not JSON"), "{out}");

    for i in 0..5 {
        status(&call(&follower, "PUT", &format!("/v1/state/app/p{i}"), &[], i.to_string().as_bytes()), 200, "a key to list");
    }
    // Two keys a request: three pages.
    let (ok, out) = run("list", &["kv", "list", "--prefix", "p", "--page-size", "2", "app"]);
    assert!(ok, "{out}");
    let keys: Vec<(String, Value)> = out.lines().map(|l| serde_json::from_str::<Value>(l).expect("a JSON line")).map(|v| (v["key"].as_str().expect("key").to_string(), v["value"].clone())).collect();
    assert_eq!(keys, (0..5).map(|i| (format!("p{i}"), json!(i))).collect::<Vec<_>>());
    let (ok, out) = run("list-exact", &["kv", "list", "--prefix", "exact", "app"]);
    assert!(ok && out.contains(&format!(r#""value":{exact}"#)), "the value as stored: {out}");
    let (ok, out) = run("get-exact", &["kv", "get", "--revision", "app", "exact"]);
    assert!(ok && out.starts_with(&format!(r#"{{"value":{exact},"revision":"#)), "{out}");
    let (ok, out) = run("list-max", &["kv", "list", "--max", "2", "--page-size", "1", "app"]);
    let printed: Vec<&str> = out.lines().filter(|l| l.starts_with('{')).collect();
    assert!(ok && printed.len() == 2 && out.contains("note: stopped after --max 2 keys"), "{out}");

    let (ok, out) = run("delete", &["kv", "delete", "app", "a b/c"]);
    assert!(ok && out.contains("\"deleted\":true"), "{out}");
    let (ok, out) = run("get-gone", &["kv", "get", "app", "a b/c"]);
    assert!(!ok && out.contains("HTTP 404"), "{out}");
    let (ok, out) = run("config", &["kv", "put", "--config", "svc", "flag", "true"]);
    assert!(ok, "{out}");
    assert_eq!(json_of(&call(&follower, "GET", "/v1/config/svc/flag", &[], b"")), json!(true));

    let (ok, first) = run("publish", &["events", "publish", "--idempotency-key", "cli-1", "cliEvent", r#"{"n":1}"#]);
    assert!(ok, "{first}");
    let (ok, again) = run("publish-again", &["events", "publish", "--idempotency-key", "cli-1", "cliEvent", r#"{"n":1}"#]);
    assert!(ok, "{again}");
    let position = |out: &str| serde_json::from_str::<Value>(out.trim()).expect("JSON")["position"].as_u64().expect("a position");
    assert_eq!(position(&first), position(&again), "the repeat answers the first position");
    let (ok, out) = run("publish-2", &["events", "publish", "cliEvent", r#"{"n":2}"#]);
    assert!(ok, "{out}");
    for n in 3..=5 {
        let (ok, out) = run(&format!("publish-{n}"), &["events", "publish", "cliEvent", &format!(r#"{{"n":{n}}}"#)]);
        assert!(ok, "{out}");
    }
    // One event a request: the last page ends exactly at the log's end, and is printed.
    let (ok, out) = run("tail", &["events", "tail", "--event-name", "cliEvent", "--page-size", "1"]);
    assert!(ok, "{out}");
    let payloads: Vec<Value> = out.lines().map(|l| serde_json::from_str::<Value>(l).expect("a JSON line")["payload"].clone()).collect();
    assert_eq!(payloads, (1..=5).map(|n| json!({"n": n})).collect::<Vec<_>>(), "each published event once, in order");
    let (ok, out) = run("tail-all", &["events", "tail", "--page-size", "2"]);
    assert!(ok && out.lines().count() == 5, "every event, paged by two: {out}");
    let after = position(&first).to_string();
    let (ok, out) = run("tail-after", &["events", "tail", "--after", &after, "--max", "2"]);
    let printed: Vec<Value> = out.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str::<Value>(l).expect("a JSON line")["payload"].clone()).collect();
    assert!(ok && printed == vec![json!({"n": 2}), json!({"n": 3})] && out.contains("note: stopped after --max 2 events"), "{out}");
}
