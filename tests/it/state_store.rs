//! State-store semantics over HTTP: compare-and-set with `If-Match` (right revision, stale
//! revision, must-not-exist), delete, and 404 for absent keys, with JSON error bodies.

use serde_json::json;

use crate::harness::assert_json_error;
use crate::harness::body_revision;
use crate::harness::Cluster;
use crate::http::Response;

/// Unwraps a request that must answer 200.
fn ok(resp: std::io::Result<Response>, what: &str) -> Response {
    let resp = resp.unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
    assert_eq!(resp.status, 200, "{what}: {}", resp.describe());
    resp
}

/// Unwraps a request that must answer with a JSON error `code`.
fn fail(resp: std::io::Result<Response>, code: u16, what: &str) {
    assert_json_error(
        &resp.unwrap_or_else(|e| panic!("{what}: request failed: {e}")),
        code,
        what,
    );
}

#[test]
fn compare_and_set_and_delete() {
    let (c, leader) = Cluster::formed("cas", 3, &[]);
    let follower = c.api(
        c.ids()
            .into_iter()
            .find(|&id| id != leader)
            .expect("a follower"),
    );
    let api = c.api(leader);
    // If-Match: 0 creates only a key that does not exist.
    let r1 = body_revision(&ok(
        api.put_if("cas", &json!({"v": 1}), 0),
        "create with If-Match: 0",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    fail(
        api.put_if("cas", &json!({"v": "dup"}), 0),
        412,
        "If-Match: 0 on an existing key",
    );

    // The right revision wins (also through a follower), a stale one loses.
    let r2 = body_revision(&ok(
        follower.put_if("cas", &json!({"v": 2}), r1),
        "If-Match: current revision",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(r2 > r1, "revisions increase: {r1} then {r2}");
    fail(
        api.put_if("cas", &json!({"v": "stale"}), r1),
        412,
        "If-Match: stale revision",
    );
    // A revision is decimal digits, given once: a sign, or two lines (a list), is a 400.
    let path = "/v1/state/default/cas";
    let plus = format!("+{r2}");
    for (headers, what) in [
        (vec![("If-Match", plus.as_str())], "If-Match with a sign"),
        (vec![("If-Match", "1"), ("If-Match", "2")], "If-Match twice"),
    ] {
        let r = api.request("PUT", path, &headers, br#"{"v":"bad"}"#).expect("PUT");
        assert_json_error(&r, 400, what);
    }
    fail(
        follower.put_if("cas", &json!({"v": "future"}), r2 + 1000),
        412,
        "If-Match: unknown revision",
    );

    let got = ok(follower.get("cas"), "GET after CAS");
    assert_eq!(
        got.json().unwrap_or_else(|e| panic!("{e}")),
        json!({"v": 2})
    );
    assert_eq!(
        got.revision_header(),
        Some(r2),
        "x-revision after CAS: {got:?}"
    );

    // Unconditional writes still work and move the revision on.
    let r3 = body_revision(&ok(api.put("cas", &json!({"v": 3})), "unconditional PUT"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(r3 > r2, "revisions increase: {r2} then {r3}");

    // Delete, then the key is gone everywhere; a second delete finds nothing.
    let deleted = ok(follower.delete("cas"), "DELETE");
    assert_eq!(
        deleted.json().unwrap_or_else(|e| panic!("{e}")),
        json!({"deleted": true})
    );
    fail(api.get("cas"), 404, "GET after DELETE");
    fail(follower.get("cas"), 404, "GET after DELETE via follower");
    fail(api.delete("cas"), 404, "second DELETE");
    fail(api.get("never-written"), 404, "GET of a key never written");

    // After the delete the key counts as absent for If-Match: 0.
    ok(
        api.put_if("cas", &json!({"v": "reborn"}), 0),
        "If-Match: 0 after DELETE",
    );
}

/// `If-Match: *` writes only an existing key (at whatever revision, also while another writer
/// moves it on), `If-None-Match: *` only an absent one; both at once or other values are 400s.
#[test]
fn if_match_star_needs_the_key_and_if_none_match_star_its_absence() {
    let (c, leader) = Cluster::formed("cas-star", 3, &[]);
    let follower = c
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower");
    let path = "/v1/state/default/star";
    for id in [leader, follower] {
        let api = c.api(id);
        let send = |method: &str, headers: &[(&str, &str)], body: &str| {
            api.request(method, path, headers, body.as_bytes())
        };
        let _ = send("DELETE", &[], "");
        fail(send("PUT", &[("If-Match", "*")], "1"), 412, "If-Match: * on an absent key");
        fail(send("DELETE", &[("If-Match", "*")], ""), 412, "DELETE If-Match: * on an absent key");
        let created = body_revision(&ok(send("PUT", &[("If-None-Match", "*")], "2"), "If-None-Match: * creates"))
            .unwrap_or_else(|e| panic!("{e}"));
        fail(send("PUT", &[("If-None-Match", "*")], "3"), 412, "If-None-Match: * on an existing key");
        // Another writer moves the key on; `*` still matches whatever revision it has now.
        ok(api.put("star", &json!(4)), "an unconditional write in between");
        let updated = body_revision(&ok(send("PUT", &[("If-Match", "*")], "5"), "If-Match: * on an existing key"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(updated > created + 1, "via node {id}: {created} then {updated}");
        let got = ok(api.get("star"), "GET");
        assert_eq!(got.json().unwrap_or_else(|e| panic!("{e}")), json!(5));
        fail(send("PUT", &[("If-Match", "*"), ("If-None-Match", "*")], "6"), 400, "both headers");
        fail(send("PUT", &[("If-None-Match", "\"7\"")], "6"), 400, "If-None-Match with a revision");
        fail(send("PUT", &[("If-Match", "x")], "6"), 400, "If-Match neither a number nor *");
        ok(send("DELETE", &[("If-Match", "*")], ""), "DELETE If-Match: * on an existing key");
        fail(api.get("star"), 404, "GET after the delete");
    }
}

/// The state store is bounded (`--state-max-keys`, `--state-max-bytes`): a write that would add
/// a key past the count, or bytes past the size, is a 507 with a JSON message; overwrites that
/// add nothing and deletes still work, and once keys are deleted new ones fit again.
#[test]
fn a_full_state_store_refuses_new_keys_with_507_and_takes_them_after_deletes() {
    let (c, leader) = Cluster::formed("state-quota", 3, &["--state-max-keys", "4", "--state-max-bytes", "1048576"]);
    let api = c.api(leader);
    for i in 0..4 {
        api.must_put(&format!("q{i}"), &json!({"i": i}));
    }
    // Every node's copy counts the same: each refuses the fifth key.
    c.wait_caught_up(&c.ids(), crate::harness::CATCH_UP);
    for node in c.apis() {
        let resp = node.put("q4", &json!({"i": 4})).expect("PUT");
        assert_json_error(&resp, 507, &format!("a fifth key via node {}", node.id));
    }
    api.must_put("q0", &json!({"i": "again"}));
    ok(api.delete("q1"), "delete one");
    api.must_put("q4", &json!({"i": 4}));
    assert_json_error(&api.put("q5", &json!({})).expect("PUT"), 507, "full again");
    // By bytes: three values of 300 KiB fit into 1 MiB, a fourth does not.
    // (One cluster at a time: the harness serializes them.)
    drop(c);
    let (c, leader) = Cluster::formed("state-quota-bytes", 1, &["--state-max-bytes", "1048576", "--example-services"]);
    let api = c.api(leader);
    let big = json!("b".repeat(300 << 10));
    for i in 0..3 {
        api.must_put(&format!("big{i}"), &big);
    }
    assert_json_error(&api.put("big3", &big).expect("PUT"), 507, "a fourth 300 KiB value");
    api.must_put("big0", &json!("small now"));
    api.must_put("big3", &big);
    // Filled to the last byte, an existing counter still counts: its new value is no longer
    // (it used to be checked as if 20 bytes long, a 507).
    let incr = || api.request("POST", "/api/v1/counter/c/increment", &[], b"{}").expect("POST");
    let counted = |resp: Response, want: u64| {
        assert_eq!(resp.status, 200, "increment: {}", resp.describe());
        assert_eq!(resp.json().expect("JSON")["value"], json!(want));
    };
    c.wait_ready(leader);
    counted(incr(), 1);
    // The largest filler that fits, found by halving (each probe overwrites the last).
    let (mut fits, mut too_big) = (0usize, 1usize << 20);
    for _ in 0..24 {
        if too_big - fits <= 1 {
            break;
        }
        let mid = (fits + too_big) / 2;
        let resp = api.put("edge", &json!("e".repeat(mid))).expect("PUT");
        match resp.status {
            200 => fits = mid,
            507 => too_big = mid,
            _ => panic!("filler of {mid}: {}", resp.describe()),
        }
    }
    assert_eq!(too_big - fits, 1, "the edge was found");
    api.must_put("edge", &json!("e".repeat(fits)));
    assert_json_error(&api.put("edge", &json!("e".repeat(fits + 1))).expect("PUT"), 507, "one byte more");
    counted(incr(), 2);
    assert_json_error(&api.put("another", &json!(1)).expect("PUT"), 507, "a new key");
}

/// A long poll that waited and found nothing changed is judged after a read barrier at its
/// end, not only at its start: a node that lost the cluster while its polls waited answered
/// them "still current" (304) at the end of the wait, a change committed elsewhere meanwhile
/// (a helper's partition test). Now it answers 503 (no quorum), and the client polls
/// another node; a poll that asked for a stale read is still a 304 from the node's copy.
#[test]
fn a_long_poll_on_a_node_that_lost_its_quorum_is_not_answered_still_current() {
    let (c, leader) = Cluster::formed("poll-cut-off", 3, &[]);
    let watcher = c.ids().into_iter().find(|&id| id != leader).expect("a follower");
    let revision = c.api(leader).must_put("watched/k", &json!("v1"));
    let listed = ok(c.api(watcher).request("GET", "/v1/state/default?prefix=watched/", &[], b""), "listing");
    let index = listed.header("etag").expect("a listing's etag").trim_matches('"').to_string();
    let addr = c.api(watcher).addr;
    let poll = |path: String| std::thread::spawn(move || crate::http::request(addr, "GET", &path, &[], b"", std::time::Duration::from_secs(60)));
    let polls = [
        ("key", poll(format!("/v1/state/default/watched/k?index={revision}&wait=12s"))),
        ("listing", poll(format!("/v1/state/default?prefix=watched/&index={index}&wait=12s"))),
        ("stale key", poll(format!("/v1/state/default/watched/k?index={revision}&wait=12s&consistency=stale"))),
    ];
    let api = c.api(watcher);
    c.wait_until("the long polls to wait", std::time::Duration::from_secs(20), || api.metric("raftbridge_long_polls", &[]).is_ok_and(|v| v >= 3.0));
    // The watcher loses both of its peers while its polls wait.
    for id in c.ids().into_iter().filter(|&id| id != watcher) {
        c.kill(id);
    }
    for (what, handle) in polls {
        let resp = handle.join().expect("the poll's thread").unwrap_or_else(|e| panic!("{what} poll: {e}"));
        let want = if what.starts_with("stale") { 304 } else { 503 };
        assert_eq!(resp.status, want, "the {what} poll on a node without a quorum: {}", resp.describe());
    }
}
