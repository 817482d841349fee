//! Durability across process death: a SIGKILLed follower restarts from its data dir and catches
//! up, and after SIGKILL of every node at once (during concurrent writes) every write that was
//! acknowledged with 200 is still there, by content. Unacknowledged writes may go either way.
//! A node whose log cannot be written any more leaves (not ready, exits with an error) rather
//! than serve a frozen copy, and recovers from its disk once restarted.

use crate::harness::verify_reads;
use crate::harness::Cluster;
use crate::harness::Consistency;
use crate::harness::WriteLoad;
use crate::harness::CATCH_UP;
use crate::harness::FAILOVER;
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

/// The leader's log store fails for real: a directory where it writes its metadata file
/// (`meta.tmp`) makes its next vote or purge write fail (EISDIR), with frequent snapshots
/// making a purge come soon. Its Raft core stops: before, the node kept saying ready and
/// answering with a frozen leader and data; now it must exit with an error, the others must
/// elect a leader and keep every acknowledged write, and once the disk is writable again a
/// restart recovers it from its own data dir.
#[test]
fn a_node_whose_log_cannot_be_written_exits_and_recovers_on_restart() {
    let (c, leader) = Cluster::formed("log-write-fails", 3, &["--snapshot-threshold", "20"]);
    let before = WriteLoad::run(c.apis(), 2, 40, "before");
    before.assert_all_acked();

    let blocker = c.dir().join(format!("n{leader}")).join("log").join("meta.tmp");
    std::fs::create_dir(&blocker).expect("create the blocking directory");
    c.allow_exit(leader);
    let others: Vec<_> = c.ids().into_iter().filter(|&id| id != leader).map(|id| c.api(id)).collect();
    let load = WriteLoad::start(others, 2, 2_000, "during");
    let status = c.wait_exit(leader, FORMATION);
    let after_exit = load.acked();
    assert!(!status.success(), "node {leader} exited with {status} after its log failed; expected an error");
    let log = std::fs::read_to_string(c.dir().join(format!("n{leader}.log"))).unwrap_or_default();
    assert!(log.contains("raft stopped on its own"), "node {leader}'s log does not say why it stopped");

    // The two others go on: a new leader, and writes acknowledged after the exit.
    let survivors: Vec<u64> = c.ids().into_iter().filter(|&id| id != leader).collect();
    c.wait_for("the survivors elect a leader", FAILOVER + FORMATION, || {
        c.agreed_leader_among(&survivors).and_then(|l| if l != leader { Ok(l) } else { Err("the old leader".into()) })
    });
    c.wait_until("writes are acknowledged after the failed node exited", FORMATION, || load.acked() > after_exit + 20);
    let during = load.stop();
    assert!(!during.acked.is_empty(), "no write acknowledged while node {leader} was gone");

    std::fs::remove_dir(&blocker).expect("remove the blocking directory");
    c.start(leader);
    c.wait_healthy(leader);
    c.wait_caught_up(&[leader], CATCH_UP);
    for id in c.ids() {
        verify_reads(c.api(id), &before.acked, Consistency::Stale);
        verify_reads(c.api(id), &during.acked, Consistency::Stale);
    }
    verify_reads(c.api(leader), &during.acked, Consistency::Linearizable);
}
