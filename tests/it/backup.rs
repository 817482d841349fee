//! Backups: a snapshot saved from a running cluster (`raftbridge snapshot save`), restored
//! after every node lost its data (`raftbridge snapshot restore`), makes a new cluster that
//! holds everything acknowledged before the save, checked by content on every node.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use serde_json::Value;

use crate::harness::Api;
use crate::harness::Cluster;

const TOKEN: &str = "it-backup-secrets-token-0123456789";
const SECRET: &str = "it-backup-cluster-secret-0123456789abcdef";
const CLI: Duration = Duration::from_secs(90);
const REFORM: Duration = Duration::from_secs(120);

fn ok_json(api: Api, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8], want: u16) -> Value {
    let resp = api.request(method, path, headers, body).unwrap_or_else(|e| panic!("{method} {path} via node {}: {e}", api.id));
    assert_eq!(resp.status, want, "{method} {path} via node {}: {}", api.id, resp.describe());
    if resp.body.is_empty() { Value::Null } else { resp.json().unwrap_or_else(|e| panic!("{method} {path}: {e}")) }
}

/// The JSON object a CLI run printed (its log holds stdout and stderr).
fn printed_json(c: &Cluster, name: &str) -> Value {
    let text = std::fs::read_to_string(c.dir().join(format!("{name}.cli.log"))).unwrap_or_default();
    let (Some(start), Some(end)) = (text.find("\n{").map(|i| i + 1).or_else(|| text.starts_with('{').then_some(0)), text.rfind('}')) else {
        panic!("no JSON in the output of {name}:\n{text}")
    };
    serde_json::from_str(&text[start..=end]).unwrap_or_else(|e| panic!("{name}'s output: {e}\n{text}"))
}

fn cli_log(c: &Cluster, name: &str) -> String {
    std::fs::read_to_string(c.dir().join(format!("{name}.cli.log"))).unwrap_or_default()
}

#[test]
fn a_saved_snapshot_restores_a_cluster_whose_nodes_all_lost_their_data() {
    let flags = ["--cluster-secret", SECRET, "--secrets-token", TOKEN];
    let (c, leader) = Cluster::formed("backup", 3, &flags);
    let ids = c.ids();
    let follower = *ids.iter().find(|&&id| id != leader).expect("a follower");
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];

    // Acknowledged before the save, through every node: state keys, a config key, a secret
    // and keyed events.
    let mut state = BTreeMap::new();
    for i in 0..60usize {
        let value = json!({"i": i, "pad": "x".repeat(i * 17)});
        c.api(ids[i % ids.len()]).must_put(&format!("k{i:03}"), &value);
        state.insert(format!("k{i:03}"), value);
    }
    ok_json(c.api(ids[1]), "PUT", "/v1/config/app/mode", &[], b"\"blue\"", 200);
    ok_json(c.api(ids[2]), "PUT", "/v1/secrets/db/pw", &auth, b"\"s3cret-value\"", 200);
    let mut events = BTreeMap::new();
    // The events' dedup window is 2 minutes of wall-clock time: the duplicate is checked
    // below only while evt-0 is well within it (a slow machine may take longer to re-form).
    let first_published = std::time::Instant::now();
    for i in 0..40usize {
        let key = format!("evt-{i}");
        let v = ok_json(c.api(ids[i % ids.len()]), "POST", "/v1/events/backupTest", &[("idempotency-key", key.as_str())], json!({"n": i}).to_string().as_bytes(), 201);
        let (id, position) = (v["id"].as_str().expect("an id").to_string(), v["position"].as_u64().expect("a position"));
        events.insert(position, (id, i));
    }

    // Saved through a follower; a HEAD names its size without the body.
    let file = c.dir().join("backup.snap");
    let file_arg = file.display().to_string();
    let http = c.http(follower).to_string();
    // Without an API token, the secret store's token guards the snapshot (it names every
    // secret's key).
    let refused = c.api(follower).request("GET", "/cluster/snapshot", &[], b"").expect("GET /cluster/snapshot");
    assert_eq!(refused.status, 401, "a snapshot without the secrets token: {}", refused.describe());
    let status = c.run_cli("save", &["snapshot", "save", &file_arg, "--http-addr", &http, "--secrets-token", TOKEN], CLI);
    assert!(status.success(), "snapshot save failed:\n{}", cli_log(&c, "save"));
    let saved = printed_json(&c, "save");
    let head = c.api(leader).request("HEAD", "/cluster/snapshot", &auth, b"").expect("HEAD /cluster/snapshot");
    assert_eq!(head.status, 200, "{}", head.describe());
    assert!(head.body.is_empty(), "a HEAD carries no body");
    assert!(head.header("content-length").and_then(|v| v.parse::<u64>().ok()).is_some_and(|n| n > 1000), "a HEAD names the length: {}", head.describe());
    assert!(head.header("x-raftbridge-snapshot-index").and_then(|v| v.parse::<u64>().ok()).is_some_and(|i| i >= saved["index"].as_u64().unwrap_or(0)), "{}", head.describe());
    // Written after the save: not in the backup.
    c.api(leader).must_put("after-save", &json!("late"));

    let status = c.run_cli("inspect", &["snapshot", "inspect", &file_arg], CLI);
    assert!(status.success(), "snapshot inspect failed:\n{}", cli_log(&c, "inspect"));
    let summary = printed_json(&c, "inspect");
    assert_eq!(summary, saved, "inspect and save describe the same file");
    assert_eq!((summary["state_keys"].as_u64(), summary["config_keys"].as_u64(), summary["secret_keys"].as_u64()), (Some(60), Some(1), Some(1)), "{summary}");
    assert_eq!(summary["events"].as_u64(), Some(40), "{summary}");
    assert_eq!(summary["members"].as_array().map(Vec::len), Some(3), "{summary}");
    // The secret is sealed in the file, as on the nodes' disks.
    let bytes = std::fs::read(&file).expect("read the backup");
    // Bytes after the snapshot's end (two downloads run together): not a saved snapshot.
    let longer = c.dir().join("longer.snap");
    std::fs::write(&longer, [&bytes[..], b"garbage"].concat()).expect("write a longer file");
    let status = c.run_cli("inspect-longer", &["snapshot", "inspect", &longer.display().to_string()], CLI);
    assert!(!status.success() && cli_log(&c, "inspect-longer").contains("after its end"), "{}", cli_log(&c, "inspect-longer"));
    assert!(!bytes.windows(b"s3cret-value".len()).any(|w| w == b"s3cret-value"), "the secret's plain value is in the backup");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("stat the backup").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the backup is its owner's only");
    }

    // Every node loses its data; node 1 comes back from the backup, the others empty.
    c.kill_all();
    for id in &ids {
        let dir = c.dir().join(format!("n{id}"));
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    }
    let n1 = c.dir().join("n1").display().to_string();
    let peer1 = c.peer(1).to_string();
    let restore = ["snapshot", "restore", file_arg.as_str(), "--data-dir", n1.as_str(), "--id", "1", "--advertise", peer1.as_str()];
    let status = c.run_cli("restore", &restore, CLI);
    assert!(status.success(), "snapshot restore failed:\n{}", cli_log(&c, "restore"));
    // A restore that did not finish (its marker still there) is refused by the node.
    let marker = c.dir().join("n1").join("RESTORING");
    std::fs::write(&marker, b"x").expect("write the marker");
    let free = crate::harness::free_loopback_ports(2);
    let (peer, http) = (free[0].to_string(), free[1].to_string());
    let status = c.run_cli("unfinished", &["node", "--id", "1", "--data-dir", n1.as_str(), "--peer-addr", &peer, "--http-addr", &http], CLI);
    assert!(!status.success(), "a node must refuse a data dir whose restore did not finish");
    assert!(cli_log(&c, "unfinished").contains("did not finish"), "{}", cli_log(&c, "unfinished"));
    std::fs::remove_file(&marker).expect("remove the marker");
    let status = c.run_cli("restore-again", &restore, CLI);
    assert!(!status.success(), "a restore into a data dir that holds one must be refused");
    assert!(cli_log(&c, "restore-again").contains("not empty"), "{}", cli_log(&c, "restore-again"));
    for id in &ids {
        if *id != 1 {
            raftbridge::fsutil::create_private_dir(&c.dir().join(format!("n{id}"))).expect("an empty data dir");
        }
    }
    c.start_all();
    c.wait_for_membership(&ids, &[], REFORM);
    c.wait_all_ready(REFORM);

    // Everything acknowledged before the save, by content, on every node; nothing after it.
    for api in c.apis() {
        for (key, value) in &state {
            let got = ok_json(api, "GET", &format!("/v1/state/default/{key}"), &[], b"", 200);
            assert_eq!(&got, value, "{key} on node {}", api.id);
        }
        assert_eq!(ok_json(api, "GET", "/v1/config/app/mode", &[], b"", 200), json!("blue"), "config on node {}", api.id);
        assert_eq!(ok_json(api, "GET", "/v1/secrets/db/pw", &auth, b"", 200), json!("s3cret-value"), "secret on node {}", api.id);
        let late = api.request("GET", "/v1/state/default/after-save", &[], b"").expect("GET after-save");
        assert_eq!(late.status, 404, "a write after the save is not in the backup: {}", late.describe());
        let log = ok_json(api, "GET", "/v1/events?after=0&limit=1000&eventName=backupTest", &[], b"", 200);
        let got: BTreeMap<u64, (String, usize)> = log["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| (e["position"].as_u64().expect("position"), (e["id"].as_str().expect("id").to_string(), e["payload"]["n"].as_u64().expect("n") as usize)))
            .collect();
        assert_eq!(got, events, "the event log on node {}", api.id);
    }

    // The new cluster goes on from the backup's position: a new event comes after the old
    // ones, a key repeated within the dedup window names the stored event, writes commit.
    let last = *events.keys().next_back().expect("events");
    let v = ok_json(c.api(3), "POST", "/v1/events/backupTest", &[], b"{\"n\":99}", 201);
    assert!(v["position"].as_u64().is_some_and(|p| p > last), "a new event after {last}: {v}");
    let (first_position, (first_id, _)) = events.iter().find(|(_, (_, n))| *n == 0).expect("event 0");
    if first_published.elapsed() < Duration::from_secs(100) {
        let again = ok_json(c.api(2), "POST", "/v1/events/backupTest", &[("idempotency-key", "evt-0")], b"{\"n\":0}", 201);
        assert_eq!((again["id"].as_str(), again["position"].as_u64(), again["duplicate"].as_bool()), (Some(first_id.as_str()), Some(*first_position), Some(true)), "{again}");
    } else {
        eprintln!("the restored cluster re-formed after evt-0's dedup window: its duplicate is not checked");
    }
    // Revisions jump past any the old cluster may have given after the backup: a write's
    // revision is over the saved index by the gap.
    let saved_index = saved["index"].as_u64().expect("the saved index");
    let revision = c.api(2).must_put("after-restore", &json!(1));
    assert!(revision > saved_index + raftbridge::backup::REVISION_GAP, "revision {revision} after a restore of index {saved_index}");
}

/// The cluster id a node's `/cluster` names (`None`: its state holds none yet).
fn cluster_id(api: Api) -> Result<Option<String>, String> {
    let resp = api.request("GET", "/cluster", &[], b"").map_err(|e| e.to_string())?;
    let v: Value = resp.json().map_err(|e| format!("node {}: {e}", api.id))?;
    Ok(v["cluster_id"].as_str().map(str::to_string))
}

/// A node of the old cluster left running beside the cluster restored from its backup, under
/// the same `--cluster-name` and at its old address, while the restored cluster reuses its id
/// for a new node elsewhere: the restored cluster has an id of its own, so their links are
/// refused both ways. The old node never answers a linearizable read with its old state (which
/// holds a write the backup does not), and the new node 3, not the old one, is the member.
#[test]
fn a_node_of_the_old_cluster_left_running_is_refused_by_the_restored_one() {
    let (mut c, _) = Cluster::formed("backup-old-node", 3, &[]);
    let ids = c.ids();
    // The cluster's first leader named it, and every node holds that id.
    let old_id = c.wait_for("every node to hold the cluster's id", REFORM, || {
        let seen: Vec<Option<String>> = ids.iter().map(|&id| cluster_id(c.api(id))).collect::<Result<_, _>>()?;
        match seen.first() {
            Some(Some(first)) if seen.iter().all(|s| s.as_deref() == Some(first.as_str())) => Ok(first.clone()),
            _ => Err(format!("ids seen: {seen:?}")),
        }
    });
    c.api(1).must_put("k", &json!("before"));
    let file = c.dir().join("old.snap");
    let file_arg = file.display().to_string();
    let http = c.http(1).to_string();
    let status = c.run_cli("save", &["snapshot", "save", &file_arg, "--http-addr", &http], CLI);
    assert!(status.success(), "snapshot save failed:\n{}", cli_log(&c, "save"));
    assert_eq!(printed_json(&c, "save")["cluster_id"].as_str(), Some(old_id.as_str()), "the backup names its cluster");
    // Acknowledged by the old cluster after the save: node 3 holds it.
    c.api(3).must_put("k", &json!("after"));
    c.wait_caught_up(&[3], REFORM);

    // Node 3 goes on outside the harness, with its data, at its address, as the old node.
    c.kill(3);
    let old_dir = c.dir().join("old3");
    std::fs::rename(c.dir().join("n3"), &old_dir).expect("move node 3's data dir");
    let old_http = crate::harness::free_loopback_ports(1)[0];
    let seeds: Vec<String> = ids.iter().map(|&id| c.peer(id).to_string()).collect();
    let old_args: Vec<String> = [
        "node", "--id", "3", "--data-dir", &old_dir.display().to_string(), "--peer-addr", &c.peer(3).to_string(),
        "--http-addr", &old_http.to_string(), "--cluster-name", "it-backup-old-node", "--seeds", &seeds.join(","),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let _old = crate::harness::HelperProcess::spawn("old node 3", crate::harness::BIN, &old_args, c.dir().join("old3.log"));
    let old = Api { id: 3, addr: old_http, token: None };
    c.wait_until("the old node 3 to serve", REFORM, || old.probe("/healthz") == Ok(200));

    // Nodes 1 and 2 lose their data; node 1 is restored, node 2 and a new node 3 (another
    // address) join it empty.
    c.kill(1);
    c.kill(2);
    for id in [1u64, 2] {
        let dir = c.dir().join(format!("n{id}"));
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    }
    let n1 = c.dir().join("n1").display().to_string();
    let peer1 = c.peer(1).to_string();
    let status = c.run_cli("restore", &["snapshot", "restore", file_arg.as_str(), "--data-dir", n1.as_str(), "--id", "1", "--advertise", peer1.as_str()], CLI);
    assert!(status.success(), "snapshot restore failed:\n{}", cli_log(&c, "restore"));
    for id in [2u64, 3] {
        raftbridge::fsutil::create_private_dir(&c.dir().join(format!("n{id}"))).expect("an empty data dir");
    }
    let new3 = c.move_peer_addr(3);
    c.start_all();
    c.wait_for_membership(&ids, &[], REFORM);
    let new_id = cluster_id(c.api(1)).expect("node 1's /cluster").expect("the restored node holds an id");
    assert_ne!(new_id, old_id, "the restored cluster has an id of its own");
    c.wait_until("every node to hold the restored cluster's id", REFORM, || {
        ids.iter().all(|&id| cluster_id(c.api(id)).ok().flatten().as_deref() == Some(new_id.as_str()))
    });
    assert_eq!(cluster_id(old).expect("the old node's /cluster").as_deref(), Some(old_id.as_str()), "the old node holds the old history");
    c.api(1).must_put("k", &json!("new"));

    // The new node 3 stops for a while (a restart, a rescheduled pod): the old one, at the
    // address the old membership holds for node 3, is not let in in its place.
    c.kill(3);
    c.assert_stays("the old node outside the restored cluster, its old state never read as current", Duration::from_secs(10), || {
        for api in c.apis() {
            let status = api.status()?;
            let addr = status.member(3).map(|m| m.addr.clone());
            if addr.as_deref() != Some(new3.to_string().as_str()) {
                return Err(format!("member 3 at {addr:?}, not the new node's {new3}: {status}"));
            }
        }
        let read = old.get("k").map_err(|e| e.to_string())?;
        if read.status == 200 {
            return Err(format!("the old node answered a linearizable read: {}", read.describe()));
        }
        Ok(())
    });
    c.wait_until("the restored cluster to refuse the old node's links", REFORM, || {
        [1u64, 2].iter().any(|&id| c.api(id).metric("raftbridge_peer_other_cluster_total", &[]).is_ok_and(|n| n >= 1.0))
    });
    c.start(3);
    c.wait_for_membership(&ids, &[], REFORM);
    for api in c.apis() {
        assert_eq!(ok_json(api, "GET", "/v1/state/default/k", &[], b"", 200), json!("new"), "node {}", api.id);
    }
}

/// A node started without an API token and without the secrets token serves no snapshot of a
/// state that holds secrets (the tokens may differ per node: another node's secrets token
/// guards them), and serves one while the state holds none; a node with the secrets token
/// wants it.
#[test]
fn a_node_without_a_token_serves_no_snapshot_of_secrets() {
    let (c, _) = Cluster::formed_with("backup-auth", 3, &["--cluster-secret", SECRET], |_, id| {
        if id == 3 { Vec::new() } else { vec!["--secrets-token".to_string(), TOKEN.to_string()] }
    });
    c.wait_all_ready(REFORM);
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    ok_json(c.api(1), "PUT", "/v1/state/app/plain", &[], b"1", 200);
    let plain = c.api(3).request("GET", "/cluster/snapshot", &[], b"").expect("GET /cluster/snapshot");
    assert_eq!(plain.status, 200, "no secrets yet: {}", plain.describe());

    ok_json(c.api(1), "PUT", "/v1/secrets/db/pw", &auth, b"\"s3cret\"", 200);
    let refused = c.wait_for("node 3 refuses a snapshot that holds the secret", Duration::from_secs(30), || {
        let r = c.api(3).request("GET", "/cluster/snapshot", &[], b"").map_err(|e| e.to_string())?;
        if r.status == 403 { Ok(r) } else { Err(r.describe()) }
    });
    assert!(refused.text().contains("--secrets-token"), "{}", refused.describe());
    assert_eq!(c.api(2).request("GET", "/cluster/snapshot", &[], b"").expect("GET").status, 401, "node 2 wants its token");
    assert_eq!(c.api(2).request("HEAD", "/cluster/snapshot", &auth, b"").expect("HEAD").status, 200, "and takes it");
}
