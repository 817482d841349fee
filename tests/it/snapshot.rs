//! Snapshots and log purging under load: with `--snapshot-threshold 50`, ~500 writes make every
//! node snapshot and purge its log, and a node added afterwards can only catch up through a
//! snapshot install; it must then hold every key.

use crate::harness::verify_reads;
use crate::harness::Cluster;
use crate::harness::Consistency;
use crate::harness::WriteLoad;
use crate::harness::CATCH_UP;

#[test]
fn new_node_catches_up_from_a_snapshot_after_the_log_was_purged() {
    let (mut c, _) = Cluster::formed("snapshot", 3, &["--snapshot-threshold", "50"]);
    let outcome = WriteLoad::run(c.apis(), 4, 500, "snap");
    outcome.assert_all_acked();

    c.wait_for(
        "every node to report a snapshot and a purged log",
        CATCH_UP,
        || {
            for (id, s) in c.statuses()? {
                if s.snapshot.is_none() || s.purged.is_none() {
                    return Err(format!("node {id}: {s}"));
                }
            }
            Ok(())
        },
    );

    let new = c.add_node(&[1]);
    c.wait_for_membership(&c.ids(), &[], CATCH_UP);
    c.wait_caught_up(&[new], CATCH_UP);
    let status = c.api(new).status().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        status.snapshot.is_some(),
        "the new node caught up past a purged log, so it must hold a snapshot: {status}"
    );
    verify_reads(c.api(new), &outcome.acked, Consistency::Stale);
}
