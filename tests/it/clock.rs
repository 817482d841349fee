//! A node whose wall clock is off: its peers measure and report it, and an idempotency claim is
//! judged in its owner's clock, so a node whose clock runs ahead does not take over a claim that
//! another node is still running.
//!
//! The skewed node runs under libfaketime (`LD_PRELOAD`, Debian's `faketime` package; `.ci/run`
//! installs it), which shifts what `clock_gettime(CLOCK_REALTIME)` returns and leaves the
//! monotonic clock alone: the node's timers run as usual, only its wall clock is ahead.

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use crate::harness::Api;
use crate::harness::Cluster;
use crate::harness::FORMATION;

/// How far node 3's clock runs ahead: twice the 5 s idempotency lease.
const AHEAD_MS: i64 = 10_000;

/// libfaketime's multi-threaded build, where Debian puts it (any architecture).
fn faketime_lib() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .chain([PathBuf::from("/usr/lib/faketime/libfaketimeMT.so.1")])
        .find(|p| p.exists());
    found.unwrap_or_else(|| panic!("libfaketime not found: install Debian's `faketime` package (apt-get install faketime)"))
}

/// Three nodes with the demo services, node 3's wall clock `ahead_s` seconds ahead, formed and
/// each routing `route` (its registrations committed and applied).
fn skewed_cluster(name: &str, ahead_s: i64, route: &str) -> Cluster {
    let lib = faketime_lib();
    let c = Cluster::new(name, 3, &["--example-services"]);
    c.set_env(3, "LD_PRELOAD", &lib.display().to_string());
    c.set_env(3, "FAKETIME", &format!("{ahead_s:+}s"));
    c.set_env(3, "FAKETIME_DONT_FAKE_MONOTONIC", "1");
    c.start_all();
    c.wait_for_membership(&c.ids(), &[], FORMATION);
    c.wait_for(&format!("every node routes {route}"), FORMATION, || {
        for api in c.apis() {
            let page = api.request("GET", "/openapi.json", &[], b"").map_err(|e| e.to_string())?;
            if !String::from_utf8_lossy(&page.body).contains(route) {
                return Err(format!("node {} does not list it yet", api.id));
            }
        }
        Ok(())
    });
    c
}

/// Handler runs of `command` on one node, from its `/metrics`.
fn runs(api: &Api, command: &str) -> u64 {
    let r = api.request("GET", "/metrics", &[], b"").expect("metrics");
    let text = String::from_utf8_lossy(&r.body).to_string();
    text.lines()
        .filter(|l| l.starts_with("raftbridge_command_runs_total{") && l.contains(&format!("command=\"{command}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn a_node_whose_clock_runs_ahead_is_reported_and_does_not_take_over_a_live_claim() {
    // Every node routes the demo's `slow` command (registrations committed and applied): a
    // slow disk under a loaded machine can take longer than the clock checks below.
    let c = skewed_cluster("clock", AHEAD_MS / 1000, "/api/v1/slow");

    // Node 1 sees node 3 ten seconds ahead, node 3 sees node 1 ten seconds behind, within a
    // generous margin for the round trip.
    let offset = |from: u64, of: u64| {
        c.api(from).status().ok()?.members.iter().find(|m| m.id == of)?.clock_offset_ms
    };
    // Node 2 too: each link is measured on its own schedule, so one reading says nothing of another's.
    c.wait_until("nodes 1 and 3 measured each other's clocks, and node 1 node 2's", Duration::from_secs(20), || {
        offset(1, 3).is_some() && offset(3, 1).is_some() && offset(1, 2).is_some()
    });
    let (ahead, behind) = (offset(1, 3).unwrap_or(0), offset(3, 1).unwrap_or(0));
    assert!((ahead - AHEAD_MS).abs() < 1_000, "node 1 sees node 3 {ahead} ms ahead");
    assert!((behind + AHEAD_MS).abs() < 1_000, "node 3 sees node 1 {behind} ms off");
    let same = offset(1, 2).expect("node 1 measured node 2");
    assert!(same.abs() < 1_000, "nodes 1 and 2 share a clock: {same} ms");
    let log = |id: u64| std::fs::read_to_string(c.dir().join(format!("n{id}.log"))).expect("node log");
    c.wait_until("node 1 warned about node 3's clock", Duration::from_secs(10), || {
        log(1).lines().any(|l| l.contains("peer clock differs from ours") && l.contains("peer=3"))
    });
    assert!(!log(1).lines().any(|l| l.contains("peer clock differs from ours") && l.contains("peer=2")), "node 2's clock is fine");

    // A keyed command runs on node 1 for 4 s (its claim renewed every 2 s, each lease 5 s by
    // node 1's clock). The same key at node 3, whose clock reads every lease as lapsed, must wait
    // for node 1's answer and replay it: the handler runs once. Judged in node 3's own clock, it
    // took the claim over at once and ran the handler a second time.
    // And the other way round: node 3 owns the claim, node 1 waits. Node 3's lease must be
    // written in node 3's own clock, in which node 1 judges it.
    for (key, owner, waiter) in [("clock-skew-1", 1, 3), ("clock-skew-2", 3, 1)] {
        let apis = c.apis();
        let before: u64 = apis.iter().map(|a| runs(a, "slow")).sum();
        let header = [("idempotency-key", key)];
        // What the first request got, once it ends: said if it ends before its handler ran.
        let answered = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let first = {
            let (api, answered) = (c.api(owner), answered.clone());
            thread::spawn(move || {
                let resp = api.request("GET", "/api/v1/slow?ms=4000", &header, b"").expect("first request");
                *answered.lock().unwrap_or_else(|p| p.into_inner()) = Some(resp.describe());
                resp
            })
        };
        c.wait_for("the first request's handler runs", Duration::from_secs(10), || {
            let ran = apis.iter().map(|a| runs(a, "slow")).sum::<u64>();
            match answered.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                _ if ran > before => Ok(()),
                Some(answer) => Err(format!("{key}: the first request ended before a handler ran: {answer}")),
                None => Err(format!("{key}: {ran} runs")),
            }
        });
        let second = c.api(waiter).request("GET", "/api/v1/slow?ms=4000", &header, b"").expect("second request");
        let first = first.join().expect("first request thread");
        assert_eq!(first.status, 200, "{key}: {}", first.describe());
        assert_eq!(second.status, 200, "{key}: {}", second.describe());
        assert_eq!(second.header("idempotent-replay"), Some("true"), "{key}: node {waiter} replays node {owner}'s answer: {}", second.describe());
        assert_eq!(second.body, first.body, "{key}: the same answer");
        let after: u64 = apis.iter().map(|a| runs(a, "slow")).sum();
        assert_eq!(after - before, 1, "{key}: the handler ran once");
    }
}

/// A node whose clock runs two minutes ahead of the others' is refused keyed requests: a claim
/// carries its clock, and applying it would move the state machine's clock (which only goes
/// forward) two minutes on for good, so that an event key published a moment ago counts as past
/// the 2 min dedup window and its producer's retry is stored a second time. Without the refusal
/// this test fails at that retry.
#[test]
fn a_node_whose_clock_runs_far_ahead_claims_no_keys_and_dedup_holds() {
    let c = skewed_cluster("clock-far", 150, "/api/v1/echo");
    let offset = |from: u64, of: u64| c.api(from).status().ok()?.members.iter().find(|m| m.id == of)?.clock_offset_ms;
    c.wait_until("node 3 measured both peers' clocks", Duration::from_secs(20), || offset(3, 1).is_some() && offset(3, 2).is_some());

    // A producer's event with a key, through node 1.
    let key = [("idempotency-key", "far-clock-event-1")];
    let publish = |api: &Api| {
        let resp = api.request("POST", "/v1/events/farClock", &key, br#"{"n":1}"#).expect("publish");
        assert_eq!(resp.status, 201, "{}", resp.describe());
        let v: serde_json::Value = resp.json().expect("json");
        (v["id"].as_str().unwrap_or_default().to_string(), v["position"].as_u64().unwrap_or(0))
    };
    let first = publish(&c.api(1));

    // A keyed command at node 3: refused at once, with the reason.
    let asked = std::time::Instant::now();
    let refused = c.api(3).request("POST", "/api/v1/echo", &[("idempotency-key", "far-clock-cmd")], b"{}").expect("keyed command at node 3");
    assert_eq!(refused.status, 503, "{}", refused.describe());
    assert!(String::from_utf8_lossy(&refused.body).contains("clock runs"), "{}", refused.describe());
    assert!(asked.elapsed() < Duration::from_secs(3), "refused at once, not after a deadline");
    // Unkeyed requests at node 3, and keyed ones elsewhere, are served.
    let plain = c.api(3).request("POST", "/api/v1/echo", &[], b"{}").expect("plain command at node 3");
    assert_eq!(plain.status, 200, "{}", plain.describe());
    let keyed = c.api(1).request("POST", "/api/v1/echo", &[("idempotency-key", "near-clock-cmd")], b"{}").expect("keyed command at node 1");
    assert_eq!(keyed.status, 200, "{}", keyed.describe());

    // The producer retries through node 2: the same event, nothing new stored.
    let again = publish(&c.api(2));
    assert_eq!(again, first, "the retry is deduplicated");
    let page = c.api(2).request("GET", "/v1/events?after=0&eventName=farClock", &[], b"").expect("read");
    let events: serde_json::Value = page.json().expect("json");
    assert_eq!(events["events"].as_array().map(Vec::len), Some(1), "one farClock event: {events}");

    // An event accepted by node 3 is stamped with the entry's corrected clock, not node 3's own
    // (150 s ahead): retention by age judges it by the cluster's clock.
    let resp = c.api(3).request("POST", "/v1/events/aheadStamp", &[], b"{}").expect("publish at node 3");
    assert_eq!(resp.status, 201, "{}", resp.describe());
    let page = c.api(1).request("GET", "/v1/events?after=0&eventName=aheadStamp", &[], b"").expect("read");
    let events: serde_json::Value = page.json().expect("json");
    let stamp = events["events"][0]["timestamp"].as_u64().expect("a timestamp");
    let real = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    assert!(stamp <= real + 30_000, "stamped {} ms ahead of this clock: {events}", stamp.saturating_sub(real));
}

/// Key expiry is stamped and judged in most members' time: node 3's clock runs 20 s behind the
/// others', and a key it writes with a 25 s TTL is named to expire 25 s from now in their
/// clocks, stays 12 s, and is gone soon after its 25 s (judged by the leader: when that is node
/// 3, in the others' time too). Stamped in node 3's own clock, it expired 5 s after it was
/// written (or, node 3 leading, 45 s after).
#[test]
fn a_key_written_through_a_node_whose_clock_runs_behind_expires_on_time() {
    const BEHIND_S: i64 = 20;
    let c = skewed_cluster("clock-ttl", -BEHIND_S, "/api/v1/echo");
    let offset = |from: u64, of: u64| c.api(from).status().ok()?.members.iter().find(|m| m.id == of)?.clock_offset_ms;
    c.wait_until("node 3 measured both others' clocks", Duration::from_secs(20), || {
        offset(3, 1).is_some_and(|o| o > 15_000) && offset(3, 2).is_some_and(|o| o > 15_000)
    });
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let written_at = now_ms();
    let put = c.api(3).request("PUT", "/v1/state/ttl/lock?ttl=25", &[], b"\"held\"").expect("a put");
    assert_eq!(put.status, 200, "{}", put.describe());
    let read = c.api(1).request("GET", "/v1/state/ttl/lock", &[], b"").expect("a read");
    let at: i64 = read.header("x-expires-at-ms").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no expiry named: {}", read.describe()));
    assert!((at - (written_at + 25_000)).abs() < 3_000, "named to expire {} ms after it was written, not 25 s", at - written_at);
    while now_ms() < written_at + 12_000 {
        for api in c.apis() {
            let r = api.request("GET", "/v1/state/ttl/lock", &[], b"").expect("a read");
            assert_eq!(r.status, 200, "node {}: the key is gone {} ms after it was written: {}", api.id, now_ms() - written_at, r.describe());
        }
        thread::sleep(Duration::from_millis(500));
    }
    c.wait_until("the key is gone on every node", Duration::from_secs(30), || {
        c.apis().iter().all(|api| api.request("GET", "/v1/state/ttl/lock", &[], b"").is_ok_and(|r| r.status == 404))
    });
    let gone_after = now_ms() - written_at;
    assert!(gone_after < 38_000, "the key went {gone_after} ms after it was written, for a 25 s TTL");
}
