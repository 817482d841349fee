//! Durability across process death: a SIGKILLed follower restarts from its data dir and catches
//! up, and after SIGKILL of every node at once (during concurrent writes) every write that was
//! acknowledged with 200 is still there, by content. Unacknowledged writes may go either way.

use crate::harness::verify_reads;
use crate::harness::Cluster;
use crate::harness::Consistency;
use crate::harness::WriteLoad;
use crate::harness::CATCH_UP;
use crate::harness::FORMATION;

#[test]
fn killed_follower_restarts_from_its_data_dir_and_catches_up() {
    let (c, leader) = Cluster::formed("follower-restart", 3, &[]);
    let before = WriteLoad::run(c.apis(), 2, 40, "before");
    before.assert_all_acked();

    let follower = c
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower");
    c.kill(follower);
    let during = WriteLoad::run(c.apis(), 3, 120, "during");
    during.assert_all_acked();

    c.restart(follower);
    let voters = c.ids();
    c.wait_for_membership(&voters, &[], CATCH_UP);
    c.wait_caught_up(&[follower], CATCH_UP);
    let api = c.api(follower);
    verify_reads(api, &before.acked, Consistency::Stale);
    verify_reads(api, &during.acked, Consistency::Stale);
    verify_reads(api, &during.acked, Consistency::Linearizable);
}

#[test]
fn acknowledged_writes_survive_killing_every_node_at_once() {
    let (c, _) = Cluster::formed("kill-all", 3, &[]);
    let settled = WriteLoad::run(c.apis(), 2, 30, "settled");
    settled.assert_all_acked();

    // Writers keep going through every node while all nodes are SIGKILLed together.
    let load = WriteLoad::start(c.apis(), 4, 10_000, "inflight");
    c.wait_until("60 in-flight writes acknowledged", CATCH_UP, || {
        load.acked() >= 60
    });
    c.kill_all();
    let inflight = load.stop();
    eprintln!(
        "[kill-all] {} writes acknowledged, {} not, when the nodes died",
        inflight.acked.len(),
        inflight.failed
    );
    inflight.assert_revisions_consistent();

    c.start_all();
    let voters = c.ids();
    c.wait_for_membership(&voters, &[], FORMATION);
    for api in c.apis() {
        verify_reads(api, &settled.acked, Consistency::Linearizable);
        verify_reads(api, &inflight.acked, Consistency::Linearizable);
    }
    c.wait_caught_up(&voters, CATCH_UP);
    for api in c.apis() {
        verify_reads(api, &inflight.acked, Consistency::Stale);
    }
    // The restarted cluster takes new writes too.
    WriteLoad::run(c.apis(), 1, 3, "after").assert_all_acked();
}

/// A leader that restarts must win a new election (a higher term), never resume its old term:
/// it may have lost unsynced entries that followers already hold, and reusing their log ids in
/// the same term would make the logs diverge unnoticed (found by the chaos suite's power cuts).
#[test]
fn restarted_leader_never_resumes_its_old_term() {
    let (c, leader) = Cluster::formed("leader-restart", 3, &[]);
    WriteLoad::run(c.apis(), 1, 5, "before").assert_all_acked();
    let term = c.api(leader).status().expect("leader status").term;
    // Every node restarts at once, so nobody elects before the old leader is back.
    c.kill_all();
    c.start_all();
    let voters = c.ids();
    c.wait_for_membership(&voters, &[], FORMATION);
    let new_leader = c.wait_for_leader(FORMATION);
    let new_term = c.api(new_leader).status().expect("leader status").term;
    assert!(new_term > term, "leader {new_leader} leads term {new_term}; the old leader {leader} led term {term}");
    WriteLoad::run(c.apis(), 1, 5, "after").assert_all_acked();
}
