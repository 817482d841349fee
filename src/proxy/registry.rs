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
use tracing::info;
use tracing::warn;

use crate::cluster::Cluster;
use crate::raft::types::Command;
use crate::sdk::ServiceDecl;
use crate::store::StateStore;

const PERIOD: Duration = Duration::from_millis(300);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

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
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if !cluster.ready() {
            continue;
        }
        let want = offering();
        let have = store.local().registry_entry(me).unwrap_or_default();
        in_sync.store(want == have, std::sync::atomic::Ordering::SeqCst);
        if want != have {
            info!(services = want.len(), "updating service registry entry");
            if let Err(e) = store.command(Command::Register { node: me, services: want }, WRITE_TIMEOUT).await {
                warn!(cause = %e, "registry update failed; will retry");
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
