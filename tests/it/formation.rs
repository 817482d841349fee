//! Cluster formation: nodes started together or one at a time form exactly one cluster, and
//! later nodes join by themselves through `--seeds` (as voters up to `--max-voters`, then as
//! learners that still serve reads and writes).

use std::time::Duration;

use serde_json::json;

use crate::harness::verify_reads;
use crate::harness::Acked;
use crate::harness::Cluster;
use crate::harness::Consistency;
use crate::harness::CATCH_UP;
use crate::harness::FORMATION;

#[test]
fn three_nodes_started_together_form_one_cluster() {
    let (c, leader) = Cluster::formed("together", 3, &[]);

    let statuses = c.statuses().unwrap_or_else(|e| panic!("{e}"));
    let term = statuses[&leader].term;
    for (id, s) in &statuses {
        assert_eq!(s.node_id, *id, "{s}");
        assert_eq!(s.leader, Some(leader), "{s}");
        assert_eq!(s.term, term, "all nodes are in the leader's term: {s}");
        let expected_state = if *id == leader { "Leader" } else { "Follower" };
        assert_eq!(s.state, expected_state, "{s}");
        for m in &s.members {
            let known = [c.peer(m.id).to_string(), c.http(m.id).to_string()];
            assert!(
                known.contains(&m.addr),
                "member {} addr {:?} is none of its addresses {known:?}",
                m.id,
                m.addr
            );
        }
    }
    // Every node measures every other's clock with its pings: one host, one clock.
    c.wait_until("every node knows every peer's clock offset", Duration::from_secs(20), || {
        c.statuses().is_ok_and(|all| all.values().all(|s| s.members.iter().all(|m| m.clock_offset_ms.is_some())))
    });
    for (id, s) in c.statuses().unwrap_or_else(|e| panic!("{e}")) {
        for m in &s.members {
            let off = m.clock_offset_ms.expect("measured");
            // Give or take half a round trip, which a loaded host can stretch: the warning's bound.
            assert!(off.abs() < 1_000, "node {id} sees node {}'s clock {off} ms off", m.id);
        }
    }
    for api in c.apis() {
        assert_eq!(api.probe("/healthz"), Ok(200), "node {} /healthz", api.id);
        assert_eq!(api.probe("/readyz"), Ok(200), "node {} /readyz", api.id);
        // Prometheus text: the node's role and its CPU time (what `raftbridge bench` reads).
        let m = api.request("GET", "/metrics", &[], b"").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.status, 200, "node {} /metrics", api.id);
        let text = m.text();
        let value = |name: &str| -> Option<f64> {
            text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        };
        let is_leader = if api.id == leader { 1.0 } else { 0.0 };
        assert_eq!(value("raftbridge_raft_is_leader"), Some(is_leader), "node {}:\n{text}", api.id);
        assert!(value("process_cpu_seconds_total").is_some_and(|s| s >= 0.0), "node {}:\n{text}", api.id);
    }
}

#[test]
fn nodes_started_one_at_a_time_form_one_cluster_and_later_nodes_join() {
    let mut c = Cluster::new("staggered", 3, &[]);
    let not_ready = |ids: &[u64]| {
        let apis: Vec<_> = ids.iter().map(|&id| c.api(id)).collect();
        move || -> Result<(), String> {
            for api in &apis {
                match api.probe("/readyz")? {
                    503 => {}
                    code => return Err(format!("node {} /readyz {code} (expected 503)", api.id)),
                }
            }
            Ok(())
        }
    };

    // One node of an expected three is up but must not consider itself a cluster.
    c.start(1);
    c.wait_healthy(1);
    c.assert_stays(
        "node 1 alone not ready",
        Duration::from_secs(2),
        not_ready(&[1]),
    );
    let alone = c.api(1).status().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        alone.leader, None,
        "a lone node expecting 3 must not know a leader: {alone}"
    );

    // Two of three: still no bootstrap.
    c.start(2);
    c.wait_healthy(2);
    c.assert_stays(
        "nodes 1 and 2 not ready",
        Duration::from_millis(1500),
        not_ready(&[1, 2]),
    );

    c.start(3);
    c.wait_for_membership(&[1, 2, 3], &[], FORMATION);
    c.wait_all_ready(FORMATION);

    // Later nodes join through a single seed each, becoming voters up to the default max (5).
    let n4 = c.add_node(&[3]);
    let n5 = c.add_node(&[1]);
    let leader = c.wait_for_membership(&[1, 2, 3, n4, n5], &[], CATCH_UP);
    c.wait_all_ready(CATCH_UP);

    // The grown cluster replicates to everyone.
    let key = "staggered";
    let value = json!({"joined": [n4, n5]});
    let revision = c.api(n5).must_put(key, &value);
    let write = [Acked {
        key: key.into(),
        value,
        revision,
        via: n5,
        writer: 0,
    }];
    c.wait_caught_up(&c.ids(), CATCH_UP);
    for api in c.apis() {
        verify_reads(api, &write, Consistency::Stale);
    }
    verify_reads(c.api(leader), &write, Consistency::Linearizable);
}

/// Only the seeds form the cluster. Node 1 seeds with nodes 2 and 3, which seed only each
/// other, all with `--bootstrap-expect 2`: node 1 is the lowest id it sees, but not one of the
/// seeds, and bootstrapping {1, 2, 3} beside their {2, 3} would make two clusters whose first
/// entries Raft cannot tell apart. It joins theirs instead.
#[test]
fn a_node_outside_the_seed_list_does_not_bootstrap_but_joins() {
    let c = Cluster::seeded("outsider", 3, 2, |_| vec![2, 3], &[]);
    c.start_all();
    c.wait_for_membership(&[1, 2, 3], &[], FORMATION);
    let log = c.log_text(1);
    assert!(!log.contains("bootstrapping the cluster"), "node 1 bootstrapped:\n{log}");
    let bootstrapped = [2, 3].into_iter().filter(|&id| c.log_text(id).contains("bootstrapping the cluster")).count();
    assert_eq!(bootstrapped, 1, "exactly one of the seeds bootstrapped");
    // One cluster: a write through the outsider is read back through every node.
    let value = json!({"via": 1});
    let revision = c.api(1).must_put("outsider", &value);
    let write = [Acked { key: "outsider".into(), value, revision, via: 1, writer: 0 }];
    c.wait_caught_up(&c.ids(), CATCH_UP);
    for api in c.apis() {
        verify_reads(api, &write, Consistency::Stale);
    }
}

#[test]
fn node_beyond_max_voters_stays_learner_and_serves() {
    let (mut c, _) = Cluster::formed("max-voters", 3, &["--max-voters", "3"]);
    let n4 = c.add_node(&[2]);
    c.wait_for_membership(&[1, 2, 3], &[n4], CATCH_UP);
    c.assert_stays("node 4 still a learner", Duration::from_secs(2), || {
        let s = c.api(1).status()?;
        if s.voters().contains(&n4) {
            return Err(format!("node 4 was promoted beyond --max-voters 3: {s}"));
        }
        Ok(())
    });
    let own = c.api(n4).status().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(own.state, "Learner", "{own}");
    c.wait_all_ready(CATCH_UP);

    // The learner accepts a write (forwarded) and serves both kinds of read.
    let learner = c.api(n4);
    let value = json!({"from": "learner"});
    let revision = learner.must_put("learner-write", &value);
    let from_learner = Acked {
        key: "learner-write".into(),
        value,
        revision,
        via: n4,
        writer: 0,
    };
    let value = json!({"from": "node 1"});
    let revision = c.api(1).must_put("voter-write", &value);
    let from_voter = Acked {
        key: "voter-write".into(),
        value,
        revision,
        via: 1,
        writer: 1,
    };
    let writes = [from_learner, from_voter];
    verify_reads(learner, &writes, Consistency::Linearizable);
    c.wait_caught_up(&[n4], CATCH_UP);
    verify_reads(learner, &writes, Consistency::Stale);
}

/// A cluster of one voter grows by two: a single joiner stays a learner (two voters would need
/// both for every write, and a joiner that died during or after the change would stall the
/// cluster until it came back), and is promoted with the second joiner, to three voters.
#[test]
fn a_lone_voter_promotes_joiners_two_at_a_time() {
    let (mut c, _) = Cluster::formed("lone-voter", 1, &[]);
    let n2 = c.add_node(&[1]);
    c.wait_for_membership(&[1], &[n2], FORMATION);
    c.assert_stays("one voter and a learner", Duration::from_secs(3), || {
        let s = c.api(1).status()?;
        if s.voters().len() == 1 { Ok(()) } else { Err(format!("promoted alone: {s}")) }
    });
    c.api(n2).must_put("lone/a", &json!(1));
    let n3 = c.add_node(&[1]);
    c.wait_for_membership(&[1, n2, n3], &[], FORMATION);
    c.api(n3).must_put("lone/b", &json!(2));
}

/// Five nodes that seed each other, started together with `--bootstrap-expect 3 --max-voters
/// 3`: the cluster forms with the three lowest ids as voters, and the other two join as
/// learners. Every seed seen used to be a founder (five voters, past `--max-voters`).
#[test]
fn more_seeds_than_expected_bootstrap_only_the_expected_voters() {
    let all: Vec<u64> = (1..=5).collect();
    let c = Cluster::seeded("expect-of-five", 5, 3, |_| all.clone(), &["--max-voters", "3"]);
    c.start_all();
    c.wait_for_membership(&[1, 2, 3], &[4, 5], FORMATION);
    c.wait_all_ready(CATCH_UP);
}

/// A second node started on a running node's data dir is refused at once, before it opens the
/// Raft log (two processes on one log would each acknowledge what the other overwrites), and
/// says which process holds it; the running node keeps serving.
#[test]
fn a_data_dir_in_use_by_a_running_node_is_refused() {
    let (c, _) = Cluster::formed("dir-lock", 1, &[]);
    let dir = c.dir().join("n1").display().to_string();
    assert!(std::path::Path::new(&dir).join("node_id").exists(), "node 1's data dir is {dir}");
    let args = ["node", "--id", "1", "--data-dir", &dir, "--peer-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--seeds", "127.0.0.1:9", "--bootstrap-expect", "1"];
    let status = c.run_cli("second-on-n1", &args, Duration::from_secs(30));
    assert!(!status.success(), "a second node on {dir} exited with {status}");
    let log = std::fs::read_to_string(c.dir().join("second-on-n1.cli.log")).expect("its log");
    assert!(log.contains("is in use by another running node (pid "), "{log}");
    assert!(!log.contains("raft log opened"), "refused before the log is opened: {log}");
    c.api(1).must_put("dir-lock/after", &json!({"still": "serving"}));

    // Killed, it leaves no lock behind: the node starts again on its dir. Empty env vars for a
    // number, a boolean and a list count as not given (compose's `${VAR:-}`), as text ones do.
    c.kill(1);
    for key in ["RAFTBRIDGE_MAX_BODY", "RAFTBRIDGE_EXAMPLE_SERVICES", "RAFTBRIDGE_SEEDS", "RAFTBRIDGE_CLUSTER_NAME"] {
        c.set_env(1, key, "");
    }
    c.restart(1);
    c.wait_all_ready(CATCH_UP);
    assert_eq!(c.api(1).get("dir-lock/after").expect("GET").json().expect("json"), json!({"still": "serving"}));
}
