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
