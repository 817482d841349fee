//! Leader failure: after a SIGKILL of the leader the survivors elect a new leader within
//! seconds, accept writes through every survivor, and the old leader rejoins as a follower.

use serde_json::json;

use crate::harness::verify_reads;
use crate::harness::Acked;
use crate::harness::Cluster;
use crate::harness::Consistency;
use crate::harness::CATCH_UP;
use crate::harness::FAILOVER;

#[test]
fn killing_the_leader_elects_a_new_one_and_survivors_accept_writes() {
    let (c, old_leader) = Cluster::formed("failover", 3, &[]);
    let old_term = c
        .api(old_leader)
        .status()
        .unwrap_or_else(|e| panic!("{e}"))
        .term;

    c.kill(old_leader);
    let new_leader = c.wait_for_leader(FAILOVER);
    assert_ne!(new_leader, old_leader);
    let status = c.api(new_leader).status().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        status.term > old_term,
        "a new election means a new term (was {old_term}): {status}"
    );
    c.wait_until(
        &format!("new leader to show node {old_leader} unreachable"),
        CATCH_UP,
        || {
            c.api(new_leader)
                .status()
                .is_ok_and(|s| s.member(old_leader).is_some_and(|m| !m.reachable))
        },
    );

    let mut writes = Vec::new();
    for api in c.apis() {
        let key = format!("after-failover-via-{}", api.id);
        let value = json!({"via": api.id, "old_leader": old_leader});
        let revision = api.must_put(&key, &value);
        writes.push(Acked {
            key,
            value,
            revision,
            via: api.id,
            writer: writes.len(),
        });
    }
    for api in c.apis() {
        verify_reads(api, &writes, Consistency::Linearizable);
    }

    // The old leader comes back from its data dir as a follower and gets the writes it missed.
    c.restart(old_leader);
    let voters = c.ids();
    c.wait_for_membership(&voters, &[], CATCH_UP);
    c.wait_caught_up(&[old_leader], CATCH_UP);
    verify_reads(c.api(old_leader), &writes, Consistency::Stale);
}

/// While a follower is down, the leader retries replicating to it at openraft's backoff pace
/// (`Config::backoff`, 200 ms), not in a tight loop. Each failed try to open a replication
/// stream logs one line on the leader: a few seconds of writes leave tens of them, where a retry
/// that skipped the backoff left some 170,000 a second (and burned a core).
#[test]
fn a_dead_follower_is_retried_at_the_backoff_pace() {
    let (c, leader) = Cluster::formed("dead-follower-retries", 3, &[]);
    let victim = c.ids().into_iter().find(|&id| id != leader).expect("a follower");
    let log = c.dir().join(format!("n{leader}.log"));
    let tries = || std::fs::read_to_string(&log).unwrap_or_default().matches("initiate-stream-replication").count();
    c.kill(victim);
    let before = tries();
    let started = std::time::Instant::now();
    let mut writes = 0u64;
    let mut acked = Vec::new();
    while started.elapsed() < std::time::Duration::from_secs(3) && writes < 5_000 {
        let (key, value) = (format!("while-down-{writes}"), json!(writes));
        let revision = c.api(leader).must_put(&key, &value);
        acked.push(Acked { key, value, revision, via: leader, writer: 0 });
        writes += 1;
    }
    let window = started.elapsed().as_secs_f64();
    let during = tries() - before;
    eprintln!("{during} failed replication tries to node {victim} in {window:.1} s, {writes} writes");
    assert!(writes > 10, "the two survivors kept accepting writes ({writes} in {window:.1} s)");
    // 200 ms apart: about 15 in 3 s. The bound leaves room for the first tries (before the
    // backoff is on) and a slow machine, and is still far below a loop's count.
    assert!(during > 0, "no failed try logged: the count below would prove nothing (log filter? message reworded?)");
    assert!(during < 100, "{during} failed replication tries to node {victim} in {window:.1} s ({writes} writes)");
    // Back up, it is replicated to again: it serves the last write from its own copy.
    c.start(victim);
    c.wait_healthy(victim);
    let last = format!("while-down-{}", writes - 1);
    c.wait_for("the restarted follower has the writes made while it was down", CATCH_UP, || {
        let resp = c.api(victim).get_stale(&last).map_err(|e| e.to_string())?;
        if resp.status == 200 { Ok(()) } else { Err(format!("{} {}", resp.status, String::from_utf8_lossy(&resp.body))) }
    });
    // Every acknowledged write, by content and revision, on every node (the restarted one from
    // its own copy).
    verify_reads(c.api(victim), &acked, Consistency::Stale);
    for api in c.apis() {
        verify_reads(api, &acked, Consistency::Linearizable);
    }
}
