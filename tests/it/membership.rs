//! Removing a node for good, through `DELETE /cluster/members/{id}` on another node and through
//! `raftbridge leave`: the cluster stops listing it, does not let it back in, and counts its
//! quorum without it.

use std::time::Duration;

use serde_json::json;

use crate::harness::assert_json_error;
use crate::harness::Cluster;
use crate::harness::CATCH_UP;
use crate::harness::FORMATION;

/// Asserts that none of `nodes` lists `outsider` as a member for the whole of `period`.
fn assert_kept_out(c: &Cluster, nodes: &[u64], outsider: u64, period: Duration) {
    c.assert_stays(&format!("node {outsider} out of the membership"), period, || {
        for &id in nodes {
            let s = c.api(id).status()?;
            if s.member(outsider).is_some() {
                return Err(format!("node {outsider} is listed by node {id}: {s}"));
            }
        }
        Ok(())
    });
}

/// Every member's peer address, as the leader lists them.
fn member_addrs(c: &Cluster, leader: u64) -> Vec<(u64, String)> {
    let s = c.api(leader).status().expect("status");
    c.ids().into_iter().map(|id| (id, s.member(id).expect("member").addr.clone())).collect()
}

/// Asserts for 3 s that every node lists each of `addrs` as a voter at that address.
fn assert_members_stay(c: &Cluster, addrs: &[(u64, String)], desc: &str) {
    c.assert_stays(desc, Duration::from_secs(3), || {
        for id in c.ids() {
            let s = c.api(id).status()?;
            for (member, addr) in addrs {
                match s.member(*member) {
                    Some(m) if m.voter && m.addr == *addr => {}
                    m => return Err(format!("node {id} lists node {member} as {m:?}, expected a voter at {addr}")),
                }
            }
        }
        Ok(())
    });
}

/// A peer endpoint of this test's own, outside the cluster's processes, that claims `node_id`
/// (in a Tokio runtime; `stop` ends it).
fn foreign_peer(node_id: u64, cluster: &str, advertise: &str, stop: &tokio_util::sync::CancellationToken) -> std::sync::Arc<raftbridge::peer::PeerNet> {
    let cfg = raftbridge::peer::PeerConfig {
        node_id,
        cluster: cluster.to_string(),
        advertise: advertise.to_string(),
        max_frame: 16 << 20,
        idle_timeout: Duration::from_secs(10),
        secret: None,
        tls: None,
        source_ip: None,
        cluster_id: Default::default(),
        recorded_features: Default::default(),
    };
    raftbridge::peer::PeerNet::new(cfg, stop.clone())
}

/// Builds a 4-node cluster (3 + one joined), removes a follower with `remove(cluster, victim,
/// via)`, where `via` is a third node (neither leader nor victim), and checks the outcome.
fn removal_scenario(name: &str, remove: impl FnOnce(&Cluster, u64, u64)) {
    let (mut c, _) = Cluster::formed(name, 3, &[]);
    let n4 = c.add_node(&[1]);
    let leader = c.wait_for_membership(&c.ids(), &[], CATCH_UP);
    let followers: Vec<u64> = c.ids().into_iter().filter(|&id| id != leader).collect();
    let (victim, via) = (followers[followers.len() - 1], followers[0]);
    eprintln!("[membership] leader {leader}, removing {victim} via {via} (joined node: {n4})");

    c.allow_exit(victim);
    remove(&c, victim, via);
    let remaining: Vec<u64> = c.ids().into_iter().filter(|&id| id != victim).collect();
    c.wait_for_membership_seen_by(&remaining, &remaining, &[], CATCH_UP);

    // It stays out, even while its process (with its --seeds) may still run.
    assert_kept_out(&c, &remaining, victim, Duration::from_secs(3));
    if c.is_running(victim) {
        c.kill(victim);
    }

    // Three voters now: one more loss still leaves a quorum of two.
    let leader = c.wait_for_leader(CATCH_UP);
    let expendable = remaining
        .iter()
        .copied()
        .find(|&id| id != leader)
        .expect("a follower");
    c.kill(expendable);
    c.api(leader)
        .must_put("after-removal", &json!({"removed": victim}));

    // Now removing the other live voter would leave {leader, dead node}: no live majority, and
    // every write would stall behind the change. It is refused with a 503 and writes go on.
    let other = remaining
        .iter()
        .copied()
        .find(|&id| id != leader && id != expendable)
        .expect("another follower");
    c.wait_for(&format!("node {expendable} unreachable from the leader"), CATCH_UP, || {
        let s = c.api(leader).status()?;
        match s.member(expendable) {
            Some(m) if !m.reachable => Ok(()),
            m => Err(format!("{m:?}")),
        }
    });
    let resp = c
        .api(leader)
        .request("DELETE", &format!("/cluster/members/{other}"), &[], b"")
        .expect("DELETE");
    assert_json_error(&resp, 503, "removing a voter that would leave no live majority");
    c.api(leader)
        .must_put("after-refused-removal", &json!({"kept": other}));
    let s = c.api(leader).status().expect("status");
    assert!(s.voters().contains(&other), "node {other} is still a voter: {s}");
}

/// A voter that stopped answering (SIGSTOP: its links stay up, silent) counts as down: removing
/// another voter then would need it to commit the change, and every write would stall behind
/// the change until it came back. The removal is refused with a 503 and writes go on; once it
/// answers again, the same removal goes through.
#[test]
fn a_removal_that_needs_a_silent_voter_is_refused() {
    // A longer election timeout keeps a silent peer's link up for 4 s (`idle_timeout`), well
    // past the 1.5 s after which the leader counts it as not answering.
    let (c, leader) = Cluster::formed("remove-needs-silent", 3, &["--election-timeout-ms", "1000"]);
    let followers: Vec<u64> = c.ids().into_iter().filter(|&id| id != leader).collect();
    let (silent, victim) = (followers[0], followers[1]);
    c.signal(silent, "STOP");
    c.wait_for(&format!("node {silent} silent for the leader"), CATCH_UP, || {
        let v = c.api(leader).request("GET", "/cluster", &[], b"").map_err(|e| e.to_string())?.json()?;
        let member = v["members"].as_array().and_then(|all| all.iter().find(|m| m["id"] == silent)).cloned();
        // Still linked (the check this replaces counted that as up), silent for a while.
        match member.as_ref().map(|m| (&m["reachable"], &m["heard_ms_ago"])) {
            Some((serde_json::Value::Bool(true), ago)) if ago.as_u64().is_some_and(|ms| ms > 1_700) => Ok(()),
            other => Err(format!("reachable, heard_ms_ago: {other:?}")),
        }
    });
    let resp = c.api(leader).request("DELETE", &format!("/cluster/members/{victim}"), &[], b"").expect("DELETE");
    assert_json_error(&resp, 503, "removing a voter while the third one is silent");
    c.api(leader).must_put("silent-voter", &json!({"silent": silent}));
    let s = c.api(leader).status().expect("status");
    assert!(s.voters().contains(&victim) && s.voters().contains(&silent), "both still voters: {s}");

    c.signal(silent, "CONT");
    c.allow_exit(victim);
    c.wait_for(&format!("node {victim} removed once node {silent} answers"), CATCH_UP, || {
        let resp = c.api(leader).request("DELETE", &format!("/cluster/members/{victim}"), &[], b"").map_err(|e| e.to_string())?;
        if !(200..300).contains(&resp.status) {
            return Err(resp.describe());
        }
        let s = c.api(leader).status()?;
        if s.member(victim).is_none() { Ok(()) } else { Err(format!("still listed: {s}")) }
    });
    c.api(leader).must_put("after-removal", &json!({"removed": victim}));
}

#[test]
fn delete_member_removes_a_follower_from_the_cluster() {
    removal_scenario("remove-delete", |c, victim, via| {
        let unknown = c
            .api(via)
            .request("DELETE", "/cluster/members/999", &[], b"")
            .expect("DELETE an unknown member");
        assert_json_error(&unknown, 404, "DELETE /cluster/members/999 (no such member)");
        let resp = c
            .api(via)
            .request("DELETE", &format!("/cluster/members/{victim}"), &[], b"")
            .unwrap_or_else(|e| panic!("DELETE /cluster/members/{victim} via {via}: {e}"));
        assert!(
            (200..300).contains(&resp.status),
            "DELETE /cluster/members/{victim} via {via}: {}",
            resp.describe()
        );
    });
}

#[test]
fn leave_command_removes_a_follower_from_the_cluster() {
    removal_scenario("remove-leave", |c, victim, via| {
        let http = c.http(via).to_string();
        let id = victim.to_string();
        let status = c.run_cli(
            "leave",
            &["leave", "--http-addr", &http, "--id", &id],
            CATCH_UP,
        );
        assert!(
            status.success(),
            "`raftbridge leave --http-addr {http} --id {id}` exited with {status}"
        );
    });
}

/// A removal whose joint configuration could not commit within the change's timeout (two of
/// four voters stopped just after the leader last heard them) answers 503, and its joint entry
/// commits once they are back: openraft proposes the second half from the abandoned wait, so
/// the cluster stayed joint for good and every later change waited behind it. The leader now
/// finishes it (the live node it dropped stays a learner), and the removal asked again works.
#[test]
fn a_membership_change_left_joint_is_finished_by_the_leader() {
    let (mut c, _) = Cluster::formed("joint-left", 3, &[]);
    c.add_node(&[1]);
    let leader = c.wait_for_membership(&c.ids(), &[], CATCH_UP);
    let followers: Vec<u64> = c.ids().into_iter().filter(|&id| id != leader).collect();
    let (victim, stopped) = (followers[0], [followers[1], followers[2]]);
    c.allow_exit(victim);
    let delete = || c.api(leader).request("DELETE", &format!("/cluster/members/{victim}"), &[], b"").expect("DELETE");
    // Within `RESPONSIVE` of their last word the leader still counts the stopped voters: the
    // change starts, and its joint configuration (3 of the 4 voters needed) cannot commit. On a
    // loaded machine the leader may already count them out and refuse it up front: again then.
    let mut left_joint = false;
    for _ in 0..3 {
        for id in stopped {
            c.signal(id, "STOP");
        }
        let resp = delete();
        for id in stopped {
            c.signal(id, "CONT");
        }
        // Past its deadline: a 504 that says it may still commit.
        if resp.status == 504 {
            assert_json_error(&resp, 504, "a removal that cannot commit in time");
            assert!(resp.describe().contains("may still commit"), "{}", resp.describe());
            left_joint = true;
            break;
        }
        assert_json_error(&resp, 503, "a removal refused up front");
        c.wait_for_membership(&c.ids(), &[], CATCH_UP);
    }
    assert!(left_joint, "the removal never started within three tries");
    c.wait_for("the change left joint is finished", CATCH_UP, || {
        let s = c.api(leader).status()?;
        if s.joint { Err(format!("{s}")) } else { Ok(()) }
    });
    let remaining: Vec<u64> = c.ids().into_iter().filter(|&id| id != victim).collect();
    c.wait_for("the removal asked again succeeds", CATCH_UP, || {
        let resp = delete();
        match resp.status {
            200 | 404 => Ok(()),
            _ => Err(resp.describe()),
        }
    });
    c.wait_for_membership_seen_by(&remaining, &remaining, &[], CATCH_UP);
    c.api(leader).must_put("after-the-change", &json!(1));
}

/// A member that restarts with its data at a new peer address (a rescheduled container that
/// kept its volume) is moved there in the membership. Only a node without cluster state used to
/// join, so the old address stayed, and peers could reach the node only while it dialed them.
#[test]
fn a_member_restarted_at_a_new_address_is_moved_there() {
    let (mut c, leader) = Cluster::formed("moved-member", 3, &[]);
    let mover = c.ids().into_iter().find(|&id| id != leader).expect("a follower");
    c.kill(mover);
    let new = c.move_peer_addr(mover).to_string();
    c.restart(mover);
    c.wait_for(&format!("node {mover} listed at {new}"), CATCH_UP, || {
        let s = c.api(leader).status()?;
        match s.member(mover) {
            Some(m) if m.addr == new => Ok(()),
            m => Err(format!("{m:?}")),
        }
    });
    c.wait_all_ready(CATCH_UP);
    c.api(mover).must_put("after-the-move", &json!(1));
}

/// `raftbridge leave` sent to the node being removed (the StatefulSet recipe's pod, or a
/// Service that picked it): the leader closed that node's link as the change was appended,
/// before its answer went out, so the command failed although the node was removed; and a
/// repeat was refused (400) as a request of a node outside the cluster. Both succeed now.
#[test]
fn leave_through_the_node_being_removed_succeeds_and_so_does_a_repeat() {
    removal_scenario("remove-leave-self", |c, victim, _| {
        let http = c.http(victim).to_string();
        let id = victim.to_string();
        for what in ["leave", "leave again"] {
            let status = c.run_cli(what, &["leave", "--http-addr", &http, "--id", &id], CATCH_UP);
            assert!(status.success(), "{what}: `raftbridge leave --http-addr {http} --id {id}` exited with {status}");
        }
    });
}

/// The same for the leader: `leave` of the leader sent to the leader itself succeeds, and so
/// does a repeat there (the repeat was a 404 once), and so does a twin asked at the same moment
/// (it was a 503 when it waited in the queue behind the hand-over). The leader hands over first and the new
/// leader removes it (Consul's way), so writes go on at once: with a 4 s election timeout, a
/// leader that removed itself and stepped down left the others leaderless for 4 s or more, and
/// here one of them leads as soon as the `leave` has returned.
#[test]
fn leave_of_the_leader_through_itself_succeeds_and_so_does_a_repeat() {
    let (mut c, _) = Cluster::formed("remove-leave-leader", 3, &["--election-timeout-ms", "4000"]);
    c.add_node(&[1]);
    let leader = c.wait_for_membership(&c.ids(), &[], CATCH_UP);
    c.wait_all_ready(CATCH_UP);
    c.allow_exit(leader);
    let (http, id) = (c.http(leader).to_string(), leader.to_string());
    let remaining: Vec<u64> = c.ids().into_iter().filter(|&n| n != leader).collect();
    // Writes through the other nodes while it leaves: the hand-over happens under load, and
    // nothing acknowledged is lost.
    let load = crate::harness::WriteLoad::start(remaining.iter().map(|&n| c.api(n)).collect(), 2, 100_000, "leave-leader");
    c.wait_until("writes are acknowledged before the leave", CATCH_UP, || load.acked() >= 20);
    for what in ["leave-leader", "leave-leader-again"] {
        // The first leave has a twin asked of the leader at the same moment: whichever waits in
        // the leader's queue behind the other's hand-over is asked of the new leader, not
        // refused because the node it was queued on leads no more.
        let (status, twin) = std::thread::scope(|s| {
            let twin = (what == "leave-leader").then(|| s.spawn(|| c.api(leader).request("DELETE", &format!("/cluster/members/{leader}"), &[], b"")));
            let status = c.run_cli(what, &["leave", "--http-addr", &http, "--id", &id], CATCH_UP);
            (status, twin.map(|t| t.join().expect("twin leave thread")))
        });
        if let Some(twin) = twin {
            let twin = twin.expect("the twin leave is answered");
            assert_eq!(twin.status, 200, "the twin leave succeeds too: {}", twin.describe());
        }
        let log = std::fs::read_to_string(c.dir().join(format!("{what}.cli.log"))).unwrap_or_default();
        assert!(status.success(), "{what}: `raftbridge leave --http-addr {http} --id {id}` exited with {status}: {log}");
        if what == "leave-leader" {
            let leading: Vec<u64> = remaining
                .iter()
                .copied()
                .filter(|&n| c.api(n).metric("raftbridge_raft_is_leader", &[]).is_ok_and(|v| v == 1.0))
                .collect();
            assert_eq!(leading.len(), 1, "one of {remaining:?} leads as soon as the leader's leave returned: {leading:?}");
            let handed = c.api(leader).metric("raftbridge_cluster_removals_handed_over_total", &[]).expect("hand-over counter");
            assert_eq!(handed, 1.0, "the leader handed over before its removal");
            c.api(leading[0]).must_put("after-leader-left", &json!({"left": leader}));
        }
    }
    let before = load.acked();
    c.wait_until("writes are acknowledged after the leave", CATCH_UP, || load.acked() >= before + 20);
    let written = load.stop();
    for &n in &remaining {
        crate::harness::verify_reads(c.api(n), &written.acked, crate::harness::Consistency::Linearizable);
    }
    c.wait_for_membership_seen_by(&remaining, &remaining, &[], CATCH_UP);
    // Still running, it leads no more and says it was removed (learnt from the change, or
    // from the members refusing its votes as a non-member's).
    assert!(c.is_running(leader), "the case under test: the old leader runs on");
    c.wait_for("the removed leader counts as no leader and says it was removed", CATCH_UP, || {
        let is_leader = c.api(leader).metric("raftbridge_raft_is_leader", &[])?;
        let r = c.api(leader).request("GET", "/readyz", &[], b"").map_err(|e| e.to_string())?;
        let message = r.json().ok().and_then(|v| v["message"].as_str().map(str::to_owned)).unwrap_or_default();
        if is_leader == 0.0 && r.status == 503 && message.contains("removed from the cluster") { Ok(()) } else { Err(format!("is_leader {is_leader}, /readyz {}", r.describe())) }
    });
    // Its `/cluster` names no leader of its own and says it was removed.
    let view = c.api(leader).request("GET", "/cluster", &[], b"").expect("/cluster").json().expect("JSON");
    assert_eq!(view["removed"], json!(true), "{view}");
    assert_ne!(view["leader"], json!(leader), "{view}");
}

/// A node whose build cannot read what the members write (it lacks a log feature every member
/// announces: here transactions) is refused at its join, said in the joiner's log and counted
/// on the leader, and stays out; started again with the members' build, it joins.
#[test]
fn a_node_of_an_older_build_is_refused_at_its_join() {
    use raftbridge::peer::frame::features::{TXN, WITHHOLD_ENV};
    let (mut c, _) = Cluster::formed("join-older-build", 3, &[]);
    let old = c.add_node_env(&[1], &[(WITHHOLD_ENV, &TXN.to_string())]);
    c.wait_for(&format!("node {old}'s join refused for its build"), CATCH_UP, || {
        let refused: f64 = [1, 2, 3].iter().filter_map(|&n| c.api(n).metric("raftbridge_cluster_joins_refused_total", &["reason=\"build\""]).ok()).sum();
        let said = c.log_text(old).contains("join refused") && c.log_text(old).contains("cannot read the cluster's log");
        if refused >= 1.0 && said { Ok(()) } else { Err(format!("refused {refused}, said in its log: {said}")) }
    });
    let s = c.api(1).status().expect("status");
    assert!(s.member(old).is_none(), "node {old} stays out: {s}");
    c.api(1).must_put("older-build-kept-out", &json!({"node": old}));

    c.kill(old);
    c.set_env(old, WITHHOLD_ENV, "0");
    c.start(old);
    c.wait_for_membership(&c.ids(), &[], CATCH_UP);
}

/// With `--cluster-secret` the nodes form a cluster as usual, and a node that does not know the
/// secret is refused at every handshake: seeded with the cluster, it never becomes a member,
/// and the cluster keeps taking writes.
#[test]
fn a_node_without_the_cluster_secret_cannot_join() {
    let mut c = Cluster::new("peer-secret", 3, &[]);
    for id in c.ids() {
        c.add_node_flags(
            id,
            &["--cluster-secret".into(), "it-secret-0123456789abcdef".into()],
        );
    }
    c.start_all();
    let leader = c.wait_for_membership(&c.ids(), &[], crate::harness::FORMATION);
    c.api(leader).must_put("with-a-secret", &json!({"formed": true}));

    // SIGHUP (systemd's reload) does not end a node without peer TLS: nothing to reload.
    c.signal(leader, "HUP");
    c.api(leader).must_put("after-sighup", &json!({"still": "up"}));
    c.assert_alive();

    let members = c.ids();
    let intruder = c.add_node(&[leader]);
    assert_kept_out(&c, &members, intruder, Duration::from_secs(5));
    // It did try: the members refused its handshakes (not merely never heard from it).
    assert_refused_a_handshake(&c, &members);
    c.api(leader).must_put("after-intruder", &json!({"still": "serving"}));
}

/// Waits until some member counts a refused peer connection (`raftbridge_peer_rejected_total`).
fn assert_refused_a_handshake(c: &Cluster, members: &[u64]) {
    c.wait_for("a member refused the intruder's handshake", CATCH_UP, || {
        for &id in members {
            if c.api(id).metric("raftbridge_peer_rejected_total", &[])? > 0.0 {
                return Ok(());
            }
        }
        Err("no member counted a refused peer connection".to_string())
    });
}

/// `raftbridge certs` for node `name` in `dir` (the cluster CA is made on first use), bound to
/// `id` when given (`--node-id`); returns the node's `--peer-tls-*` flags, which require bound
/// certificates when it is.
fn node_certs(c: &Cluster, dir: &std::path::Path, name: &str, id: Option<u64>) -> Vec<String> {
    let id_arg = id.map(|id| id.to_string());
    let extra: Vec<&str> = id_arg.iter().flat_map(|id| ["--node-id", id.as_str()]).collect();
    let (cert, key) = c.certs_with(dir, name, &extra);
    let ca = dir.join("ca.pem").display().to_string();
    let mut flags = vec!["--peer-tls-cert".into(), cert, "--peer-tls-key".into(), key, "--peer-tls-ca".into(), ca];
    if id.is_some() {
        flags.push("--peer-tls-require-node-id".into());
    }
    flags
}

/// Three nodes over mutual peer TLS, each with a certificate bound to its id (required), formed;
/// also the directory of the cluster CA and the leader.
fn tls_cluster(name: &str) -> (Cluster, std::path::PathBuf, u64) {
    let mut c = Cluster::new(name, 3, &[]);
    let pki = c.dir().join("pki");
    for id in c.ids() {
        let flags = node_certs(&c, &pki, &format!("n{id}"), Some(id));
        c.add_node_flags(id, &flags);
    }
    c.start_all();
    let leader = c.wait_for_membership(&c.ids(), &[], crate::harness::FORMATION);
    (c, pki, leader)
}

/// With `--peer-tls-*` (certificates from `raftbridge certs --node-id`, bound ones required) the
/// nodes form a cluster over mutual TLS and replicate and forward as usual; a node whose
/// certificate comes from another CA, or from the cluster CA but bound to no node id, is
/// refused at every handshake and never becomes a member, and a node will not start with
/// another node's certificate.
#[test]
fn peers_link_over_mutual_tls_and_a_node_of_another_ca_is_kept_out() {
    let (mut c, pki, leader) = tls_cluster("peer-tls");
    let followers: Vec<u64> = c.ids().into_iter().filter(|&id| id != leader).collect();
    // A write at a follower is forwarded to the leader and replicated; the other follower
    // reads it back: every hop crossed a TLS link.
    let value = json!({"over": "tls", "at": followers[0]});
    c.api(followers[0]).must_put("over-tls", &value);
    c.wait_for("the write is readable at the other follower", CATCH_UP, || {
        let resp = c.api(followers[1]).get("over-tls").map_err(|e| e.to_string())?;
        let body: serde_json::Value = serde_json::from_slice(&resp.body).map_err(|e| e.to_string())?;
        if resp.status == 200 && body == value {
            Ok(())
        } else {
            Err(format!("{} {body}", resp.status))
        }
    });

    // Each node publishes when its peer certificate expires (`raftbridge certs` gives 825 days).
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_secs_f64();
    for id in c.ids() {
        let expiry = c.api(id).metric("raftbridge_tls_cert_expiry_timestamp_seconds", &["listener=\"peer\""]).expect("expiry metric");
        let days = (expiry - now) / 86_400.0;
        assert!((823.0..=825.0).contains(&days), "node {id}'s peer certificate expires in {days} days");
    }

    // A renewed certificate, written over the old files, is taken on SIGHUP without a restart.
    let renewed = node_certs(&c, &pki, "n1-renewed", Some(1));
    for (from, to) in [(&renewed[1], "n1.pem"), (&renewed[3], "n1-key.pem")] {
        std::fs::copy(from, pki.join(to)).unwrap_or_else(|e| panic!("copy {from}: {e}"));
    }
    c.signal(1, "HUP");
    c.wait_for("node 1 reloaded its certificate", CATCH_UP, || {
        let reloads = c.api(1).metric("raftbridge_peer_tls_reloads_total", &["outcome=\"ok\"", "trigger=\"signal\""])?;
        if reloads > 0.0 { Ok(()) } else { Err("no successful reload on SIGHUP counted yet".to_string()) }
    });
    c.api(1).must_put("after-reload", &json!({"renewed": true}));
    c.assert_alive();

    let members = c.ids();
    let other_ca = c.dir().join("other-pki");
    let flags = node_certs(&c, &other_ca, "n4", Some(4));
    let intruder = c.add_node_with(&[leader], &flags);
    assert_kept_out(&c, &members, intruder, Duration::from_secs(5));
    assert_refused_a_handshake(&c, &members);
    // From the cluster CA, but bound to no node id, while the members require bound ones.
    let flags = node_certs(&c, &pki, "unbound", None);
    let unbound = c.add_node_with(&[leader], &flags);
    assert_kept_out(&c, &members, unbound, Duration::from_secs(5));
    // Another node's certificate: the node refuses to start with it, naming the file.
    let ports = crate::harness::free_loopback_ports(2);
    let data = c.dir().join("impostor").display().to_string();
    let mut args: Vec<String> = ["node", "--id", "9", "--data-dir", &data, "--peer-addr", &ports[0].to_string(), "--http-addr", &ports[1].to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(node_certs(&c, &pki, "n2-copy", Some(2)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let status = c.run_cli("impostor", &args, Duration::from_secs(20));
    let log = std::fs::read_to_string(c.dir().join("impostor.cli.log")).unwrap_or_default();
    assert!(!status.success() && log.contains("n2-copy.pem") && log.contains("not this node's"), "{log}");
    c.api(leader).must_put("after-intruder", &json!({"still": "serving"}));
}

/// A node outside the cluster (a bare peer endpoint with an id of its own) may only ask to join
/// as itself: asking a member to remove a node, or to join under another node's id (which would
/// move that member to a new address), is refused, at the leader and at a follower (which would
/// otherwise forward it), and the membership stays as it was.
#[test]
fn a_node_outside_the_cluster_cannot_remove_or_move_a_member() {
    use raftbridge::peer::message::PeerRequest;
    use raftbridge::peer::message::PeerResponse;
    use raftbridge::peer::message::RemoteError;

    let (c, leader) = Cluster::formed("outsider-requests", 3, &[]);
    let addrs = member_addrs(&c, leader);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let stop = tokio_util::sync::CancellationToken::new();
    let net = rt.block_on(async { foreign_peer(99, "it-outsider-requests", "127.0.0.1:9", &stop) });
    let follower = c.ids().into_iter().find(|&id| id != leader).expect("a follower");
    let other = c.ids().into_iter().find(|&id| id != leader && id != follower).expect("another follower");
    for asked in [leader, follower] {
        for req in [PeerRequest::Remove { id: other }, PeerRequest::Join { id: other, addr: "127.0.0.1:9".to_string() }] {
            let peer = c.peer(asked).to_string();
            let (_, resp) = rt
                .block_on(net.request_addr(&peer, &req, Duration::from_secs(10)))
                .unwrap_or_else(|e| panic!("{} at node {asked}: {e}", req.name()));
            match resp {
                PeerResponse::Error(RemoteError::Invalid(msg)) if msg.contains("not a member") => {}
                other => panic!("{} at node {asked}: expected a refusal, got {other:?}", req.name()),
            }
        }
    }
    stop.cancel();
    assert_members_stay(&c, &addrs, "the membership is unchanged");
    let refused: f64 = c.ids().iter().map(|&id| {
        ["remove", "join"].iter().map(|r| c.api(id).metric("raftbridge_peer_membership_refused_total", &[&format!("request=\"{r}\"")]).unwrap_or(0.0)).sum::<f64>()
    }).sum();
    assert_eq!(refused, 4.0, "each refusal is counted once, where it arrived");
    c.api(leader).must_put("after-outsider", &json!({"still": "serving"}));
}

/// A second process started with a member's `--id` at another address asks to join as that id:
/// while the member still answers at its own address, its peer links are refused (the live node
/// would be cut off). Once the member is gone, the same request moves it, as for a rescheduled
/// container.
#[test]
fn a_second_process_with_a_members_id_does_not_take_its_place() {
    use raftbridge::peer::message::PeerRequest;
    use raftbridge::peer::message::PeerResponse;

    let (c, leader) = Cluster::formed("duplicate-id", 3, &[]);
    let twin = c.ids().into_iter().find(|&id| id != leader).expect("a follower");
    let addrs = member_addrs(&c, leader);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let stop = tokio_util::sync::CancellationToken::new();
    let elsewhere = "127.0.0.1:9".to_string();
    let net = rt.block_on(async { foreign_peer(twin, "it-duplicate-id", &elsewhere, &stop) });
    let join = PeerRequest::Join { id: twin, addr: elsewhere.clone() };
    let leader_peer = c.peer(leader).to_string();
    // While the member answers at its own address, the twin gets no peer link at all (its
    // links used to replace the member's at every node, and the member's theirs in turn): the
    // handshake is refused, and the leader counts it. (The leader's refusal of a join under a
    // running member's id, `raftbridge_peer_duplicate_id_refused_total`, stays behind it.)
    let refused = || c.api(leader).metric("raftbridge_peer_links_refused_total", &["cause=\"id_in_use\""]);
    match rt.block_on(net.request_addr(&leader_peer, &join, Duration::from_secs(20))) {
        Err(e) if e.to_string().contains("in use by a member that still answers") => {}
        other => panic!("join as running node {twin}: expected the handshake refused, got {other:?}"),
    }
    c.wait_for("the leader refused the twin's link", CATCH_UP, || match refused()? {
        n if n >= 1.0 => Ok(()),
        n => Err(format!("{n} refusals counted")),
    });
    assert_members_stay(&c, &addrs, "every member at its own address");
    c.api(twin).must_put("twin-refused", &json!({"node": twin, "serving": true}));

    // The member is gone: the same request is a move to the new address.
    c.kill(twin);
    c.wait_for("the member moved to its new address", CATCH_UP, || {
        match rt.block_on(net.request_addr(&leader_peer, &join, Duration::from_secs(20))) {
            Ok((_, PeerResponse::Done)) => {}
            Ok((_, other)) => return Err(format!("join answered {other:?}")),
            Err(e) => return Err(format!("join: {e}")),
        }
        let s = c.api(leader).status()?;
        match s.member(twin) {
            Some(m) if m.addr == elsewhere => Ok(()),
            m => Err(format!("node {twin} listed as {m:?}")),
        }
    });
    stop.cancel();
}

/// A removed node that still runs (its process was not stopped) answers as a cluster member that
/// knows a leader, so a joiner may pick it first; it refuses to forward the join (the leader
/// would refuse a request from outside the cluster), and the joiner goes on to its other seeds.
#[test]
fn a_removed_node_that_still_runs_does_not_hold_up_a_join() {
    let (mut c, leader) = Cluster::formed("removed-seed", 3, &[]);
    let followers: Vec<u64> = c.ids().into_iter().filter(|&id| id != leader).collect();
    let (victim, via) = (followers[0], followers[1]);
    c.allow_exit(victim);
    let resp = c.api(leader).request("DELETE", &format!("/cluster/members/{victim}"), &[], b"").expect("DELETE");
    assert!((200..300).contains(&resp.status), "DELETE /cluster/members/{victim}: {}", resp.describe());
    let remaining = [leader, via];
    c.wait_for_membership_seen_by(&remaining, &remaining, &[], CATCH_UP);
    assert!(c.is_running(victim), "the removed node still runs (the case under test)");
    // It never learns of its removal (no leader replicates to it any more), and its metrics
    // still name the leader: it must stop saying it serves.
    c.wait_for(&format!("the removed node {victim} is not ready"), CATCH_UP, || match c.api(victim).probe("/readyz")? {
        503 => Ok(()),
        code => Err(format!("/readyz {code}")),
    });
    // Its pre-votes are refused as a non-member's, which tells it: it says so and campaigns no
    // more (it used to pre-vote every election timeout for as long as it ran).
    c.wait_for(&format!("the removed node {victim} learns it was removed"), CATCH_UP, || {
        let r = c.api(victim).request("GET", "/readyz", &[], b"").map_err(|e| e.to_string())?;
        let message = r.json().ok().and_then(|v| v["message"].as_str().map(str::to_owned)).unwrap_or_default();
        if r.status == 503 && message.contains("removed from the cluster") { Ok(()) } else { Err(format!("/readyz {}", r.describe())) }
    });
    let view = c.api(victim).request("GET", "/cluster", &[], b"").expect("its /cluster").json().expect("JSON");
    assert_eq!(view["removed"], json!(true), "its /cluster says so too: {view}");
    // It takes no work from clients either: a write it passed on could not be read back
    // through it (it used to forward writes and events, and route commands).
    for (method, path, body) in [("PUT", "/v1/state/default/after-removal", "1"), ("POST", "/v1/events/afterRemoval", "{}"), ("GET", "/v1/state/default/x", "")] {
        let r = c.api(victim).request(method, path, &[], body.as_bytes()).expect("request");
        assert_json_error(&r, 503, &format!("{method} {path} on the removed node"));
        assert!(r.text().contains("removed from the cluster"), "{}", r.describe());
    }
    assert!(c.api(leader).get("after-removal").expect("GET").status == 404, "nothing written through the removed node");
    assert_eq!(c.api(leader).request("GET", "/cluster", &[], b"").expect("/cluster").json().expect("JSON")["removed"], json!(false));
    let refused = || -> f64 { remaining.iter().map(|&id| c.api(id).metric("raftbridge_raft_outsider_votes_refused_total", &[]).unwrap_or(0.0)).sum() };
    let before = refused();
    assert!(before >= 1.0, "a member refused its vote as an outsider's");
    c.assert_stays("the removed node campaigns no more", Duration::from_secs(5), || {
        let now = refused();
        if now == before { Ok(()) } else { Err(format!("{} more votes refused", now - before)) }
    });

    let joiner = c.add_node(&[victim, via]);
    c.wait_for(&format!("node {joiner} joins through its second seed"), crate::harness::FORMATION, || {
        let s = c.api(leader).status()?;
        if s.member(joiner).is_some() { Ok(()) } else { Err(format!("not a member yet: {s}")) }
    });
    assert!(c.api(leader).status().expect("status").member(victim).is_none(), "node {victim} stays out");
}

/// A node stopped gracefully under peer TLS ends its links with a TLS close_notify: its peers
/// read an orderly end, where they used to warn of a truncated TLS stream ("peer closed
/// connection without sending TLS close_notify") at every rolling restart.
#[test]
fn a_graceful_stop_under_peer_tls_ends_the_links_cleanly() {
    let (c, _, leader) = tls_cluster("peer-tls-close");
    let victim = c.ids().into_iter().find(|&id| id != leader).expect("a follower");
    c.api(leader).must_put("before-stop", &json!(1));
    let log = |id: u64| std::fs::read_to_string(c.dir().join(format!("n{id}.log"))).unwrap_or_default();
    let others: Vec<u64> = c.ids().into_iter().filter(|&id| id != victim).collect();
    let downs = |id: u64| log(id).matches(&format!("peer link down peer={victim}")).count();
    let before: Vec<usize> = others.iter().map(|&id| downs(id)).collect();
    c.terminate(victim);
    // Both peers saw the links go (so the check below looks at the right moment).
    c.wait_until("the peers saw the stopped node's links close", CATCH_UP, || {
        others.iter().zip(&before).all(|(&id, &b)| downs(id) > b)
    });
    for &id in &others {
        let truncated: Vec<String> =
            log(id).lines().filter(|l| l.contains("close_notify")).map(str::to_string).collect();
        assert!(truncated.is_empty(), "node {id} read a truncated TLS stream from node {victim}: {truncated:#?}");
    }
}


/// A follower whose data directory is lost comes back under its id with an empty log. The
/// leader notices from its answers, replicates to it from the start (it used to resend the same
/// append forever, and the node never caught up), keeps it a learner until it holds again what
/// it had acknowledged, then makes it a voter: it then holds every acknowledged write, by
/// content, and carries the cluster when the old leader dies.
#[test]
fn a_voter_whose_data_was_lost_catches_up_as_a_learner_and_votes_again() {
    let (c, leader) = Cluster::formed("wiped", 3, &[]);
    let api = c.api(leader);
    let mut written = Vec::new();
    for i in 0..150 {
        let key = format!("wiped/k{i}");
        api.must_put(&key, &json!({"i": i}));
        written.push((key, i));
    }
    let victim = c.ids().into_iter().find(|&id| id != leader).expect("a follower");
    // Every node acknowledged every write (so the leader saw the victim hold them).
    c.wait_caught_up(&c.ids(), CATCH_UP);
    eprintln!("[membership] leader {leader}, wiping node {victim}");
    c.kill(victim);
    let dir = c.dir().join(format!("n{victim}"));
    std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    c.start(victim);

    // The leader saw the victim's log go back (and it did not move since).
    c.wait_until("the leader counts the lost log and makes the node a learner", CATCH_UP, || {
        let leader = c.api(leader);
        leader.metric("raftbridge_raft_follower_reversions_total", &[]).is_ok_and(|n| n >= 1.0)
            && leader.metric("raftbridge_raft_voters_held_back_total", &[]).is_ok_and(|n| n >= 1.0)
    });
    // It holds every write again, by content, from its own copy.
    c.wait_until("the wiped node holds every write", CATCH_UP, || {
        written.iter().all(|(key, i)| {
            c.api(victim).get_stale(key).is_ok_and(|r| r.status == 200 && r.json().is_ok_and(|v| v == json!({"i": i})))
        })
    });
    // And is a voter again (a finished change: not the joint half of one).
    c.wait_for_membership(&c.ids(), &[], CATCH_UP);

    // It carries a quorum with the third node once the old leader is gone.
    c.kill(leader);
    let new_leader = c.wait_for_leader(CATCH_UP);
    assert_ne!(new_leader, leader);
    c.api(new_leader).must_put("wiped/after", &json!({"leader": new_leader}));
    for (key, i) in &written {
        let r = c.api(victim).get(key).unwrap_or_else(|e| panic!("GET {key} on node {victim}: {e}"));
        assert_eq!(r.status, 200, "GET {key} on node {victim}: {}", r.describe());
        assert_eq!(r.json().expect("json"), json!({"i": i}), "{key} on node {victim}");
    }
}

/// In a cluster of two voters (a third removed), the voter whose data was lost is made a
/// learner and, once it holds again what it had, a voter again on its own: the leader used to
/// wait for a second learner to promote two at once, and the cluster stayed at one voter.
#[test]
fn a_two_voter_cluster_gets_its_second_voter_back_after_a_data_loss() {
    let (c, leader) = Cluster::formed("wiped-two", 3, &[]);
    let followers: Vec<u64> = c.ids().into_iter().filter(|&id| id != leader).collect();
    let (removed, victim) = (followers[0], followers[1]);
    c.allow_exit(removed);
    c.wait_for(&format!("node {removed} removed"), CATCH_UP, || {
        let resp = c.api(leader).request("DELETE", &format!("/cluster/members/{removed}"), &[], b"").map_err(|e| e.to_string())?;
        if !(200..300).contains(&resp.status) {
            return Err(resp.describe());
        }
        let s = c.api(leader).status()?;
        if s.member(removed).is_none() { Ok(()) } else { Err(format!("still listed: {s}")) }
    });
    let api = c.api(leader);
    let written: Vec<(String, i32)> = (0..50).map(|i| (format!("wiped-two/k{i}"), i)).collect();
    for (key, i) in &written {
        api.must_put(key, &json!({"i": i}));
    }
    c.wait_caught_up(&[leader, victim], CATCH_UP);
    c.kill(victim);
    let dir = c.dir().join(format!("n{victim}"));
    std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    c.start(victim);
    // The leader sees the loss and makes the node a learner until it holds again what it had
    // acknowledged; a node that catches up before the change can commit (in a cluster of two
    // it needs that node) is let go without it.
    c.wait_until("the leader finds the node's data lost", CATCH_UP, || {
        c.api(leader).metric("raftbridge_raft_follower_reversions_total", &[]).is_ok_and(|n| n >= 1.0)
    });
    // A voter again (if it was made a learner: with no other learner to go with it).
    c.wait_caught_up(&[leader, victim], CATCH_UP);
    c.wait_for_membership_seen_by(&[leader], &[leader, victim], &[], CATCH_UP);
    for (key, i) in &written {
        let r = c.api(victim).get_stale(key).unwrap_or_else(|e| panic!("GET {key} on node {victim}: {e}"));
        assert_eq!((r.status, r.json().ok()), (200, Some(json!({"i": i}))), "{key} on node {victim}");
    }
    api.must_put("wiped-two/after", &json!({"voters": 2}));
}

/// The same loss while the leader is down as well: the node whose data was lost cannot tell it
/// from a first start, so it grants no vote with an empty log to a candidate whose log holds
/// more than the bootstrap entry. With the old leader down and the wiped node withholding, the
/// third node cannot win; once the old leader is back, a leader that holds every acknowledged
/// write is elected, the wiped node catches up, and nothing acknowledged is missing.
#[test]
fn a_node_whose_data_was_lost_votes_for_no_one_until_a_leader_reaches_it() {
    let (c, leader) = Cluster::formed("wipedvote", 3, &[]);
    let mut written = Vec::new();
    for i in 0..50 {
        let key = format!("wipedvote/k{i}");
        c.api(leader).must_put(&key, &json!({"i": i}));
        written.push((key, i));
    }
    c.wait_caught_up(&c.ids(), CATCH_UP);
    let followers: Vec<u64> = c.ids().into_iter().filter(|&id| id != leader).collect();
    let (victim, other) = (followers[0], followers[1]);
    eprintln!("[membership] leader {leader} down, node {victim} wiped, node {other} left to campaign");
    c.kill(leader);
    c.kill(victim);
    let dir = c.dir().join(format!("n{victim}"));
    std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    c.start(victim);

    c.wait_until("the wiped node withholds a vote", CATCH_UP, || {
        c.api(victim).metric("raftbridge_raft_votes_withheld_total", &["reason=\"empty_log\""]).is_ok_and(|n| n >= 1.0)
    });
    c.assert_stays("no leader elected with the wiped node's vote", Duration::from_secs(3), || {
        for id in [victim, other] {
            let s = c.api(id).status()?;
            if s.state == "Leader" {
                return Err(format!("node {id} leads: {s}"));
            }
        }
        Ok(())
    });

    // Restarted once more before any leader reached it (its node id file is back by now): still
    // an empty log, still no vote.
    c.kill(victim);
    c.start(victim);
    c.wait_until("the restarted wiped node withholds a vote again", CATCH_UP, || {
        c.api(victim).metric("raftbridge_raft_votes_withheld_total", &["reason=\"empty_log\""]).is_ok_and(|n| n >= 1.0)
    });
    c.assert_stays("still no leader", Duration::from_secs(2), || match c.api(other).status()? {
        s if s.state == "Leader" => Err(format!("node {other} leads: {s}")),
        _ => Ok(()),
    });

    c.start(leader);
    c.wait_for_membership(&c.ids(), &[], CATCH_UP);
    c.wait_until("the wiped node holds every write again", CATCH_UP, || {
        written.iter().all(|(key, i)| {
            c.api(victim).get_stale(key).is_ok_and(|r| r.status == 200 && r.json().is_ok_and(|v| v == json!({"i": i})))
        })
    });
    let now = c.wait_for_leader(CATCH_UP);
    for (key, i) in &written {
        let r = c.api(now).get(key).unwrap_or_else(|e| panic!("GET {key}: {e}"));
        assert_eq!(r.status, 200, "GET {key}: {}", r.describe());
        assert_eq!(r.json().expect("json"), json!({"i": i}), "{key}");
    }
}

/// A new cluster whose first leader dies after its first entries reached one founder but not
/// the other. The one that missed them restarts with an empty log, as a node that lost its data
/// would; but its log was marked as a founder's while the cluster formed (`PeerRequest::Found`),
/// so it votes, and the two elect a leader without the first. (Before the mark it withheld its
/// vote until the first leader was back.)
#[test]
fn founders_elect_a_leader_when_the_first_dies_before_its_entries_reached_them_all() {
    let c = Cluster::new("founders", 3, &[]);
    c.start_all();
    // Node 1 (the lowest id) marks the other two as founders in the round that plans the
    // cluster, and bootstraps a round later; its election comes an election timeout after
    // that, so node 3, stopped as soon as node 1 says it bootstraps, gets no entry.
    let start = std::time::Instant::now();
    let mut polls = 0u32;
    while !c.log_text(1).contains("bootstrapping the cluster") {
        assert!(start.elapsed() < FORMATION && polls < 1_000_000, "node 1 never bootstrapped");
        polls += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    c.signal(3, "STOP");
    assert!(c.log_text(3).contains("marked as a founder"), "node 3 was marked before the bootstrap");
    eprintln!("[membership] node 3 stopped as node 1 bootstraps");
    let leader = c.wait_for("a leader between nodes 1 and 2 whose entries node 2 holds", FORMATION, || {
        let s = c.api(2).status()?;
        match s.leader {
            Some(l) if l != 3 && s.applied >= 1 => Ok(l),
            _ => Err(format!("node 2: {s}")),
        }
    });
    let first = if leader == 1 { 1 } else { 2 };
    let survivor = 3 - first;
    eprintln!("[membership] first leader {first}; killing it and node 3, restarting node 3");
    c.kill(first);
    c.kill(3);
    c.start(3);
    // What is under test: node 3 is back with an empty log that is a founder's.
    c.wait_until("node 3 reopened an empty log marked as a founder's", CATCH_UP, || {
        c.log_text(3).lines().filter(|l| l.contains("raft state at start")).nth(1).is_some_and(|l| l.contains("empty_log=true") && l.contains("founder=true"))
    });
    let now = c.wait_for_leader(CATCH_UP);
    assert_ne!(now, first);
    c.api(survivor).must_put("founders/after", &json!({"leader": now}));
    c.start(first);
    c.wait_for_membership(&c.ids(), &[], CATCH_UP);
    for id in c.ids() {
        let r = c.api(id).get("founders/after").unwrap_or_else(|e| panic!("GET on node {id}: {e}"));
        assert_eq!(r.status, 200, "node {id}: {}", r.describe());
        assert_eq!(r.json().expect("json"), json!({"leader": now}), "node {id}");
    }
    assert_eq!(c.api(3).metric("raftbridge_raft_votes_withheld_total", &[]), Ok(0.0), "node 3 withheld no vote");
}

/// A member started with other cluster-rule flags than the rest (here `--events-max-count`) is
/// named by its peers: a warning that says which flag differs, and a gauge per peer. Event
/// retention follows the leader's flags, so such a cluster trims differently after a failover.
#[test]
fn members_whose_cluster_rules_differ_are_warned_about() {
    let c = Cluster::new("settings-differ", 3, &[]);
    c.set_env(2, "RAFTBRIDGE_EVENTS_MAX_COUNT", "50000");
    c.start_all();
    c.wait_all_ready(FORMATION);
    let log = |id: u64| std::fs::read_to_string(c.dir().join(format!("n{id}.log"))).unwrap_or_default();
    c.wait_until("node 1 warned about node 2's settings", Duration::from_secs(20), || {
        log(1).lines().any(|l| l.contains("peer settings differ") && l.contains("peer=2") && l.contains("--events-max-count 100000 here, 50000 there"))
    });
    assert!(!log(1).lines().any(|l| l.contains("peer settings differ") && l.contains("peer=3")), "node 3's settings are node 1's");
    // Node 2 compares at its own link upkeep (every 500 ms), maybe a moment later.
    c.wait_until("node 2 warned about node 1's settings too", Duration::from_secs(20), || {
        log(2).lines().any(|l| l.contains("peer settings differ") && l.contains("peer=1"))
    });
    let gauge = |peer: &str| c.api(1).metric("raftbridge_peer_settings_differ", &[&format!("peer=\"{peer}\"")]);
    assert_eq!(gauge("2"), Ok(1.0));
    assert_eq!(gauge("3"), Ok(0.0));
}

/// A member with a smaller `--max-frame` than the others (a rolling change of the flag): a
/// write that fits the others' frames but not its own is refused (413) wherever it is made,
/// since an entry larger than one member's frame could never be replicated to it, and that
/// member would stall at the entry for good. Later writes reach it.
#[test]
fn a_write_over_the_smallest_members_frame_is_refused_and_that_member_keeps_up() {
    let c = Cluster::new("frame-smallest", 3, &[]);
    c.set_env(3, "RAFTBRIDGE_MAX_FRAME", "131072");
    c.set_env(3, "RAFTBRIDGE_MAX_BODY", "65536");
    c.start_all();
    c.wait_all_ready(FORMATION);
    for id in [1, 2] {
        c.wait_until(&format!("node {id} saw node 3's frame"), Duration::from_secs(20), || {
            c.api(id).metric("raftbridge_peer_settings_differ", &["peer=\"3\""]).is_ok_and(|n| n >= 1.0)
        });
    }
    // 200 KiB: within nodes 1 and 2's own --max-body and frame, over node 3's frame.
    let big = json!({ "blob": "x".repeat(200 << 10) });
    for id in [1, 2] {
        let r = c.api(id).put("frame/big", &big).expect("PUT");
        assert_eq!(r.status, 413, "node {id}: {}", r.describe());
    }
    let small = json!({ "after": "big" });
    c.api(1).must_put("frame/small", &small);
    c.wait_for("node 3 applied the later write", Duration::from_secs(20), || {
        let r = c.api(3).get_stale("frame/small").map_err(|e| e.to_string())?;
        if r.status == 200 { Ok(()) } else { Err(r.describe()) }
    });
}

/// A node killed (so it never cleared its registry entry) and then removed: the leader makes
/// the cluster forget its entry and its every-instance subscription positions
/// (`Command::ForgetNodes`); they stayed in every node's state and snapshot for good. The
/// members keep theirs.
#[test]
fn a_removed_node_that_was_killed_is_forgotten_by_the_state() {
    let (mut c, _) = Cluster::formed("forget-departed", 3, &["--example-services"]);
    let n4 = c.add_node(&[1]);
    let leader = c.wait_for_membership(&c.ids(), &[], CATCH_UP);
    let instances = |via: u64| -> Result<Vec<String>, String> {
        let v = c.api(via).request("GET", "/v1/subscriptions/auditOrders", &[], b"").map_err(|e| e.to_string())?.json()?;
        let map = v["instances"].as_object().ok_or_else(|| format!("no instances in {v}"))?;
        Ok(map.keys().cloned().collect())
    };
    c.wait_for(&format!("node {n4} registered an every-instance position"), CATCH_UP, || {
        let keys = instances(leader)?;
        if keys.contains(&n4.to_string()) { Ok(()) } else { Err(format!("instances {keys:?}")) }
    });
    c.allow_exit(n4);
    c.kill(n4);
    let resp = c.api(leader).request("DELETE", &format!("/cluster/members/{n4}"), &[], b"").expect("DELETE");
    assert!((200..300).contains(&resp.status), "DELETE /cluster/members/{n4}: {}", resp.describe());
    let remaining: Vec<u64> = c.ids().into_iter().filter(|&id| id != n4).collect();
    for &id in &remaining {
        c.wait_for(&format!("node {id} forgets node {n4}'s position"), Duration::from_secs(60), || {
            let keys = instances(id)?;
            if keys.contains(&n4.to_string()) { Err(format!("instances {keys:?}")) } else { Ok(()) }
        });
        let keys = instances(id).expect("instances");
        for &member in &remaining {
            assert!(keys.contains(&member.to_string()), "node {id}: member {member} keeps its position: {keys:?}");
        }
    }
    let log = c.log_text(c.wait_for_leader(CATCH_UP));
    assert!(log.contains("forgot the registry entries"), "the leader said what it forgot");
}

/// A node that formed the cluster alone (`--bootstrap-expect 1`, no seeds) and grew it by
/// joins, restarted with the same flags after its data dir was lost, does not form a second
/// cluster beside the first: the leader that still counts it reaches it first (a lone founder
/// waits for that longer than the leader's longest redial), and it is sent the cluster's log.
/// The leader's dials to it fail until their backoff is at its longest before it comes back.
#[test]
fn a_lone_founder_whose_data_was_lost_rejoins_instead_of_forming_another_cluster() {
    let c = Cluster::seeded("lone-wiped", 3, 1, |id| if id == 1 { Vec::new() } else { vec![1] }, &[]);
    c.start(1);
    c.wait_for_membership_seen_by(&[1], &[1], &[], FORMATION);
    c.start(2);
    c.start(3);
    c.wait_for_membership(&[1, 2, 3], &[], FORMATION);
    let leader = c.wait_for_leader(FORMATION);
    let written: Vec<(String, i32)> = (0..20).map(|i| (format!("lone/k{i}"), i)).collect();
    for (key, i) in &written {
        c.api(leader).must_put(key, &json!({"i": i}));
    }
    c.wait_caught_up(&c.ids(), CATCH_UP);
    c.kill(1);
    let survivors = [2, 3];
    let leader = c.wait_for(&format!("a leader among {survivors:?}"), CATCH_UP, || {
        let l = c.agreed_leader_among(&survivors)?;
        if l == 1 { Err("node 1 still named".into()) } else { Ok(l) }
    });
    // Dials to the lost node fail fast (nothing listens): after eight in a row, each waits
    // the longest backoff (1.5–3 s).
    c.wait_until("the leader's dials to node 1 back off at their longest", CATCH_UP, || {
        c.api(leader).metric("raftbridge_peer_dial_failures_total", &[]).is_ok_and(|n| n >= 8.0)
    });
    let dir = c.dir().join("n1");
    std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    let logged = c.log_text(1).len();
    c.start(1);
    c.wait_until("node 1 holds every write of the cluster it left", CATCH_UP, || {
        written.iter().all(|(key, i)| c.api(1).get_stale(key).is_ok_and(|r| r.status == 200 && r.json().is_ok_and(|v| v == json!({"i": i}))))
    });
    let status = c.api(1).status().unwrap_or_else(|e| panic!("status of node 1: {e}"));
    assert_eq!(status.members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 2, 3], "{status}");
    assert!(!c.log_text(1).get(logged..).unwrap_or_default().contains("bootstrapping the cluster"), "node 1 formed a cluster of its own");
}
