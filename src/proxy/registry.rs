//! Keeps this node's entry in the replicated service registry equal to what it offers.
//!
//! The registry is written through Raft (`Command::Register`) only when this node is ready (in a
//! cluster with a leader) and its entry differs from its offering, so a node is never routed to
//! before it is ready, and a sidecar whose health check fails stops being advertised within one
//! period. Liveness is not written here: it comes from the peer links. On drain the entry is
//! cleared so peers stop routing here before the node stops.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::error;
use tracing::info;
use tracing::warn;

use crate::cluster::Cluster;
use crate::raft::types::Command;
use crate::raft::types::NodeId;
use crate::raft::types::SubUpdate;
use crate::sdk::ServiceDecl;
use crate::store::StateStore;

const PERIOD: Duration = Duration::from_millis(300);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the leader looks for departed nodes to forget (`Command::ForgetNodes`), at most.
const FORGET_EVERY: Duration = Duration::from_secs(10);
/// How long a registration that would carry a subscription's progress with `SubUpdate::Rebase`
/// waits for links to every member, to learn whether each applies it.
const FEATURES_WAIT: Duration = Duration::from_secs(30);

/// What this node offers right now (re-evaluated every period).
pub type Offering = Arc<dyn Fn() -> Vec<ServiceDecl> + Send + Sync>;

/// `in_sync` is set while this node's registry entry equals its offering (readiness includes it:
/// a node is routed to by its peers only once registered, so a rolling restart must wait for it).
pub async fn run(
    store: StateStore,
    cluster: Cluster,
    offering: Offering,
    in_sync: Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
) {
    let me = store.replica().id();
    // Conflicting subscription names already reported (once each).
    let mut warned: std::collections::HashSet<String> = std::collections::HashSet::new();
    // Since when a registration waits to learn whether every member applies `Rebase`.
    let mut waiting_for_features: Option<std::time::Instant> = None;
    // Whether the wait ended without it (said once per wait).
    let mut rebase_refused = false;
    // When the leader last proposed to forget departed nodes.
    let mut forgot: Option<std::time::Instant> = None;
    let mut tick = crate::supervise::Ticker::new(PERIOD, &shutdown);
    while tick.next().await {
        if !cluster.ready() {
            continue;
        }
        if store.replica().leader() == Some(me) && forgot.is_none_or(|t| t.elapsed() >= FORGET_EVERY) {
            forget_departed(&store).await;
            forgot = Some(std::time::Instant::now());
        }
        let mut want = offering();
        // Only an offering with subscriptions can clash (the copies below are made every tick).
        let conflicts = if want.iter().any(|s| !s.subscriptions.is_empty()) {
            // The members' entries only (`SmShared::registry`): a node no longer in the cluster
            // owns nothing.
            let (_, registry) = store.local().registry();
            drop_foreign_subscriptions(&mut want, &registry, me)
        } else {
            Vec::new()
        };
        for (sub, service, owner) in conflicts {
            if warned.insert(sub.clone()) {
                metrics::counter!("raftbridge_subscription_name_conflicts_total").increment(1);
                error!(subscription = %sub, service = %service, owner = %owner,
                    "subscription name already declared by another service: not consumed here (names are cluster-wide)");
            }
        }
        let have = store.local().registry_entry(me).unwrap_or_default();
        // In sync for readiness when only availability differs: a sidecar app's health or a
        // pull subscription's clients coming and going must not take the node out of
        // `/readyz` (its load balancer's rotation) while the change commits.
        let same_but_available = want.len() == have.len()
            && want.iter().zip(&have).all(|(w, h)| (&w.name, w.version, &w.commands, &w.subscriptions) == (&h.name, h.version, &h.commands, &h.subscriptions));
        in_sync.store(same_but_available, std::sync::atomic::Ordering::SeqCst);
        if want != have {
            // A subscription this node's build turned from shared to every-instance or back
            // starts the new way where the old one had come, not at the oldest retained event.
            let members: Vec<NodeId> = store.replica().metrics().membership_config.membership().nodes().map(|(id, _)| *id).collect();
            let mut carried = carried_progress(|name| store.local().sub_progress(name), me, &members, &want);
            if carried.iter().any(|u| matches!(u, SubUpdate::Rebase { .. })) && !store.replica().members_have(crate::peer::frame::features::SUB_REBASE) {
                // A member not linked since this node started is not known to apply it yet:
                // wait a while for the links, then register without it, as before this existed.
                let since = match waiting_for_features {
                    Some(since) => since,
                    None => {
                        info!(wait_s = FEATURES_WAIT.as_secs(), "waiting to learn that every member applies subscription rebases before registering");
                        *waiting_for_features.insert(std::time::Instant::now())
                    }
                };
                if since.elapsed() < FEATURES_WAIT {
                    continue;
                }
                if !std::mem::replace(&mut rebase_refused, true) {
                    warn!("a member does not apply subscription rebases (an older build, or down): a subscription made shared starts again at its old cursor");
                }
                carried.retain(|u| !matches!(u, SubUpdate::Rebase { .. }));
            } else {
                waiting_for_features = None;
                rebase_refused = false;
            }
            if !carried.is_empty() {
                info!(updates = carried.len(), "carrying subscription progress across a change between shared and every-instance");
                if let Err(e) = store.command(Command::SubUpdate { updates: carried }, WRITE_TIMEOUT).await {
                    warn!(cause = %e, "could not carry subscription progress; will retry before registering");
                    continue;
                }
            }
            info!(services = want.len(), "updating service registry entry");
            match store.command(Command::Register { node: me, services: want }, WRITE_TIMEOUT).await {
                // The next change that needs a rebase waits for the links afresh.
                Ok(_) => (waiting_for_features, rebase_refused) = (None, false),
                Err(e) => warn!(cause = %e, "registry update failed; will retry"),
            }
        }
    }
    // Drain: stop being routed to.
    in_sync.store(false, std::sync::atomic::Ordering::SeqCst);
    let registered = store.local().registry_entry(me).is_some();
    if registered {
        if let Err(e) = store.command(Command::Register { node: me, services: Vec::new() }, Duration::from_secs(2)).await {
            warn!(cause = %e, "could not clear the registry entry on shutdown");
        }
    }
}

/// Forgets what the replicated state keeps of nodes that are no longer members: a node killed
/// and then removed never clears its registry entry (a graceful drain does), nor its
/// every-instance subscription positions, and each stayed in every node's memory and every
/// snapshot for good. Proposed by the leader, once every member applies it.
async fn forget_departed(store: &StateStore) {
    let departed = store.local().departed();
    if departed.is_empty() || !store.replica().members_have(crate::peer::frame::features::FORGET_NODES) {
        return;
    }
    match store.command(Command::ForgetNodes { nodes: departed.clone() }, WRITE_TIMEOUT).await {
        Ok(_) => info!(nodes = ?departed, "forgot the registry entries and subscription positions of nodes that are no longer members"),
        Err(e) => warn!(cause = %e, "could not forget departed nodes; will retry"),
    }
}

/// The progress updates that carry a subscription across a change of its `shared` flag: what
/// this node offers now (`want`) against the subscription's declaration as the cluster keeps
/// it (`progress(name)`, `SubProgress`; the last registration's, kept while none declares it,
/// also across graceful restarts). `Command::Register` would otherwise start the new way where
/// it was last left: an every-instance position at the oldest retained event, a shared cursor
/// wherever it stopped when the subscription turned every-instance; either delivers every
/// retained event again.
/// - Shared to every-instance: the position of this node, of every member declaring it now and
///   of every member that was an instance of it before moves up to the shared cursor (events
///   settled ahead of it out of order are delivered again: at least once); a node declaring it
///   now and stopped for the rollout later comes back with the new build and goes on there.
/// - Every-instance to shared: the shared cursor moves up to the least position of the nodes
///   that declare it now (of this node, when none does), with `SubUpdate::Rebase`.
///
/// Nothing else changes where it starts: a member that first declares an every-instance
/// subscription later starts at the oldest retained event, as a new instance does.
pub(crate) fn carried_progress(progress: impl Fn(&str) -> Option<SubProgress>, me: NodeId, members: &[NodeId], want: &[ServiceDecl]) -> Vec<SubUpdate> {
    let mut updates = Vec::new();
    for sub in want.iter().flat_map(|s| &s.subscriptions) {
        let Some(p) = progress(&sub.name).filter(|p| p.shared != sub.shared) else { continue };
        if p.shared {
            let was_instance = |node: &NodeId| node == &me || p.declared_by.contains(node) || p.instances.contains_key(node);
            for node in members.iter().copied().filter(was_instance) {
                if p.cursor > 0 && p.instances.get(&node).is_none_or(|&n| n < p.cursor) {
                    updates.push(SubUpdate::Instance { sub: sub.name.clone(), node, position: p.cursor - 1, dead: None });
                }
            }
        } else {
            let declaring = p.declared_by.iter().filter_map(|n| p.instances.get(n)).min().copied();
            if let Some(position) = declaring.or_else(|| p.instances.get(&me).copied()).filter(|&n| n > p.cursor) {
                updates.push(SubUpdate::Rebase { sub: sub.name.clone(), position });
            }
        }
    }
    updates
}

/// A subscription as the cluster keeps it, for `carried_progress`.
#[derive(Debug, Clone, Default)]
pub struct SubProgress {
    pub shared: bool,
    pub cursor: u64,
    /// Each node's next position as an instance.
    pub instances: std::collections::BTreeMap<NodeId, u64>,
    /// The members whose registrations declare it now.
    pub declared_by: Vec<NodeId>,
}

/// Removes from `want` the subscriptions whose name another service declares. A subscription's
/// progress, filter and dead letters are kept under its name alone, cluster-wide, so two
/// services declaring one name would take each other's events under whichever filter registered
/// last. The name belongs to the least service name (by byte order) that declares it on any
/// node, this one included: every node decides the same from the same registry, also when two
/// registered at once. Returns (subscription, this node's service, the owner) per removal.
fn drop_foreign_subscriptions(
    want: &mut [ServiceDecl],
    registry: &std::collections::BTreeMap<NodeId, Vec<ServiceDecl>>,
    me: NodeId,
) -> Vec<(String, String, String)> {
    let mut owner: std::collections::BTreeMap<&str, &str> = std::collections::BTreeMap::new();
    let others = registry.iter().filter(|(node, _)| **node != me).flat_map(|(_, services)| services.iter());
    for service in others.chain(want.iter()) {
        for sub in &service.subscriptions {
            let least = owner.entry(sub.name.as_str()).or_insert(service.name.as_str());
            if service.name.as_str() < *least {
                *least = service.name.as_str();
            }
        }
    }
    let owner: std::collections::BTreeMap<String, String> =
        owner.into_iter().map(|(sub, service)| (sub.to_string(), service.to_string())).collect();
    let mut dropped = Vec::new();
    for service in want.iter_mut() {
        service.subscriptions.retain(|sub| match owner.get(&sub.name) {
            Some(o) if *o != service.name => {
                dropped.push((sub.name.clone(), service.name.clone(), o.clone()));
                false
            }
            _ => true,
        });
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::event::EventFilter;
    use crate::broker::event::SubscriptionDecl;

    fn service(name: &str, subs: &[&str]) -> ServiceDecl {
        ServiceDecl {
            name: name.into(),
            version: 1,
            commands: Vec::new(),
            subscriptions: subs.iter().map(|s| SubscriptionDecl::new(*s, EventFilter::default())).collect(),
            available: true,
        }
    }

    fn names(want: &[ServiceDecl]) -> Vec<(String, Vec<String>)> {
        want.iter().map(|s| (s.name.clone(), s.subscriptions.iter().map(|x| x.name.clone()).collect())).collect()
    }

    #[test]
    fn a_subscription_name_belongs_to_one_service_cluster_wide() {
        let registry = std::collections::BTreeMap::from([
            (1, vec![service("billing", &["invoices", "audit"])]),
            (2, vec![service("shipping", &["parcels"])]),
            // This node's own earlier entry does not count against it.
            (3, vec![service("zeta", &["parcels"])]),
        ]);
        let mut want = vec![service("zeta", &["parcels", "mine"]), service("audit", &["audit"])];
        let dropped = drop_foreign_subscriptions(&mut want, &registry, 3);
        assert_eq!(dropped, vec![("parcels".to_string(), "zeta".to_string(), "shipping".to_string())]);
        // `audit` sorts before `billing`: the name is this node's service's, on every node alike.
        assert_eq!(names(&want), [("zeta".to_string(), vec!["mine".to_string()]), ("audit".to_string(), vec!["audit".to_string()])]);
        let mut theirs = registry.get(&1).cloned().unwrap();
        let mine = std::collections::BTreeMap::from([(3, want.clone())]);
        let dropped = drop_foreign_subscriptions(&mut theirs, &mine, 1);
        assert_eq!(dropped, vec![("audit".to_string(), "billing".to_string(), "audit".to_string())]);
        // Without conflicts nothing changes.
        let mut alone = vec![service("x", &["a", "b"])];
        assert!(drop_foreign_subscriptions(&mut alone, &registry, 9).is_empty());
        assert_eq!(names(&alone), [("x".to_string(), vec!["a".to_string(), "b".to_string()])]);
    }
}
