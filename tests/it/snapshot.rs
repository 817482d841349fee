//! Snapshots and log purging under load: with `--snapshot-threshold 50`, ~500 writes make every
//! node snapshot and purge its log, and a node added afterwards can only catch up through a
//! snapshot install; it must then hold every key.

use crate::harness::verify_reads;
use crate::harness::Cluster;
use crate::harness::Consistency;
use crate::harness::WriteLoad;
use crate::harness::Acked;
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

/// A snapshot larger than a peer frame goes in chunks that fit the frame: with `--max-frame`
/// 128 KiB on every node and about 320 KiB of state, a node added after the log was purged
/// catches up through it. A fixed 1 MiB chunk (the whole snapshot, here) was refused by the
/// link before it was sent, at every retry, and the new node never caught up.
#[test]
fn a_snapshot_larger_than_a_frame_reaches_a_new_node_in_pieces() {
    let flags = ["--max-frame", "131072", "--max-body", "65536", "--snapshot-threshold", "20"];
    let (mut c, leader) = Cluster::formed("snapshot-small-frame", 3, &flags);
    // 40 keys of 8 KB, written three times over: the log grows past what a purge takes at
    // once (openraft purges 64 entries or more), the state stays about 320 KiB.
    let mut acked = std::collections::BTreeMap::new();
    for round in 0..3 {
        let value = serde_json::json!(format!("{round}").repeat(8_000));
        for i in 0..40 {
            let key = format!("big-{i}");
            let resp = c.wait_for(&format!("PUT {key}"), CATCH_UP, || match c.api(leader).put(&key, &value) {
                Ok(r) if r.status == 200 || r.status == 201 => Ok(r),
                Ok(r) => Err(r.describe()),
                Err(e) => Err(e.to_string()),
            });
            let revision = resp.revision_header().unwrap_or_else(|| panic!("PUT {key}: no x-revision: {}", resp.describe()));
            acked.insert(key.clone(), Acked { key, value: value.clone(), revision, via: leader, writer: 0 });
        }
    }
    let acked: Vec<Acked> = acked.into_values().collect();
    c.wait_for("every node to report a snapshot and a purged log", CATCH_UP, || {
        for (id, s) in c.statuses()? {
            if s.snapshot.is_none() || s.purged.is_none() {
                return Err(format!("node {id}: {s}"));
            }
        }
        Ok(())
    });
    // The cluster's flags go to the new node too: its frame is 128 KiB as well.
    let new = c.add_node(&[leader]);
    c.wait_for_membership(&c.ids(), &[], CATCH_UP);
    c.wait_caught_up(&[new], CATCH_UP);
    let status = c.api(new).status().unwrap_or_else(|e| panic!("{e}"));
    assert!(status.snapshot.is_some(), "caught up past a purged log through a snapshot: {status}");
    verify_reads(c.api(new), &acked, Consistency::Stale);
}
