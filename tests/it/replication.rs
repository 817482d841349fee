//! Replication: every acknowledged write, made concurrently through all nodes, is read back by
//! content from every node, linearizably and (once applied indices match) from the local copy.

use crate::harness::verify_reads;
use crate::harness::Cluster;
use crate::harness::Consistency;
use crate::harness::WriteLoad;
use crate::harness::CATCH_UP;

#[test]
fn every_acknowledged_write_is_readable_on_every_node() {
    let (c, _) = Cluster::formed("replication", 3, &[]);

    let outcome = WriteLoad::run(c.apis(), 4, 300, "rep");
    outcome.assert_all_acked();
    outcome.assert_revisions_consistent();
    assert_eq!(outcome.acked.len(), 300);

    for api in c.apis() {
        verify_reads(api, &outcome.acked, Consistency::Linearizable);
    }
    c.wait_caught_up(&c.ids(), CATCH_UP);
    for api in c.apis() {
        verify_reads(api, &outcome.acked, Consistency::Stale);
    }
}
