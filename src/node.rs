//! The composition root: opens storage, starts Raft, the peer layer, the cluster tasks and the
//! HTTP API, wires them together and shuts them down in order. No logic of its own beyond the
//! dispatch of peer requests to the module that serves them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use tracing::error;
use tracing::info;
use tracing::warn;

use crate::api;
use crate::cluster::Cluster;
use crate::cluster::ClusterSettings;
use crate::cluster::Membership;
use crate::config::NodeConfig;
use crate::peer::BoxFuture;
use crate::peer::Handler;
use crate::peer::PeerConfig;
use crate::peer::PeerNet;
use crate::peer::message::PeerRequest;
use crate::peer::message::PeerResponse;
use crate::peer::message::RemoteError;
use crate::peer::tls::PeerTls;
use crate::raft::RaftSettings;
use crate::raft::Replica;
use crate::raft::log_store::Founding;
use crate::raft::log_store::LogStore;
use crate::raft::log_store::LogStoreOptions;
use crate::raft::network::AppendLanes;
use crate::raft::network::Network;
use crate::raft::state_machine::StateMachine;
use crate::raft::types::*;
use crate::broker::Broker;
use crate::broker::dispatch::Dispatcher;
use crate::broker::dispatch::LocalSubscriber;
use crate::proxy::LocalServices;
use crate::raft::types::Command;
use crate::raft::types::EventLimits;
use crate::sdk::Sender;
use crate::proxy::Proxy;
use crate::proxy::ProxySettings;
use crate::proxy::registry;
use crate::proxy::registry::Offering;
use crate::sdk::ServiceParts;
use crate::store::StateStore;


#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data dir {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error(
        "data dir {path} belongs to node {stored}, not --id {given}; use that id or another data dir"
    )]
    IdMismatch { path: String, stored: u64, given: u64 },
    /// Another process (or another run in this one) holds the data dir's lock: two nodes
    /// writing one Raft log would each acknowledge what the other overwrites.
    #[error("data dir {path} is in use by another running node ({holder}); stop it first, or give this node its own data dir")]
    DataDirInUse { path: String, holder: String },
    #[error("data dir {path}: a `raftbridge snapshot restore` into it did not finish ({marker} is there): empty the dir and restore again")]
    RestoreUnfinished { path: String, marker: String },
    #[error("bind {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("raft config: {0}")]
    RaftConfig(#[from] openraft::ConfigError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("raft stopped on its own ({0}); restart the node to recover from its disk")]
    RaftStopped(String),
    #[error("{0}; restart the node (a bug: please report it with the log)")]
    LoopFailed(crate::supervise::Failure),
    #[error("sidecar: {0}")]
    Sidecar(#[from] crate::sidecar::SidecarError),
    /// The services this node offers do not fit together (one subscription name twice).
    #[error("services: {0}")]
    Services(String),
    #[error("peer TLS: {0}")]
    Tls(#[from] crate::peer::tls::TlsError),
    #[error("HTTPS: {0}")]
    Https(crate::peer::tls::TlsError),
}

/// How often the peer TLS files are looked at for changes (a renewed certificate, a Kubernetes
/// secret updated in place).
const TLS_CHECK: Duration = Duration::from_secs(30);

/// A certificate this close to its expiry is warned about (at most once an hour per listener):
/// a week leaves time to renew before clients or peers start failing their handshakes.
const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// When each listener's certificate chain stops working, as a Unix timestamp; NaN when its dates
/// could not be read.
const EXPIRY_GAUGE: &str = "raftbridge_tls_cert_expiry_timestamp_seconds";

/// Reloads the TLS files (peer links, HTTPS) on SIGHUP and when they change, until `shutdown`.
/// New connections use what was loaded; connections up keep theirs. A reload that fails is
/// logged and the previous certificates stay in use. Without TLS it only takes SIGHUP, which
/// has nothing to do. At every check it also publishes when each listener's certificates expire
/// (`raftbridge_tls_cert_expiry_timestamp_seconds{listener}`, for an alert on `… - time()`), and
/// warns when that is less than `EXPIRY_WARNING` away.
async fn reload_tls(
    peer: Option<PeerTls>,
    https: Option<api::tls::HttpTls>,
    mut hup: Option<tokio::signal::unix::Signal>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + TLS_CHECK, TLS_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned: [Option<tokio::time::Instant>; 2] = [None, None];
    let mut publish_expiry = |peer: &Option<PeerTls>, https: &Option<api::tls::HttpTls>| {
        // Outer `None`: that listener has no TLS (no series); inner `None`: its dates are unknown.
        let listeners = [("peer", peer.as_ref().map(PeerTls::expires)), ("https", https.as_ref().map(api::tls::HttpTls::expires))];
        for ((listener, expires), warned) in listeners.into_iter().zip(&mut warned) {
            match expires {
                Some(Some(expires)) => note_expiry(listener, expires, std::time::SystemTime::now(), warned),
                // A reload to a certificate whose dates could not be read (warned about then):
                // NaN, not the previous certificate's date, which would no longer be true.
                // An alert on `… - time() < N` does not fire on NaN; `absent`/`isnan` checks can.
                Some(None) => {
                    metrics::gauge!(EXPIRY_GAUGE, "listener" => listener).set(f64::NAN);
                    *warned = None; // the next readable certificate gets its own warning
                }
                None => {}
            }
        }
    };
    publish_expiry(&peer, &https);
    loop {
        let asked = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        if asked && peer.is_none() && https.is_none() {
            info!("SIGHUP: no TLS configured, nothing to reload");
        }
        if let Some(tls) = &peer {
            let outcome = if asked { tls.reload().map(|()| true) } else { tls.reload_if_changed() };
            note_reload("raftbridge_peer_tls_reloads_total", "peer TLS", asked, outcome);
        }
        if let Some(tls) = &https {
            let outcome = if asked { tls.reload().map(|()| true) } else { tls.reload_if_changed() };
            note_reload("raftbridge_https_reloads_total", "HTTPS", asked, outcome);
        }
        publish_expiry(&peer, &https);
    }
}

/// Publishes when `listener`'s certificates expire, and warns (at most hourly, `warned` holds
/// when it last did) once that is within `EXPIRY_WARNING` of `now`.
fn note_expiry(listener: &'static str, expires: std::time::SystemTime, now: std::time::SystemTime, warned: &mut Option<tokio::time::Instant>) {
    let at = expires.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!(EXPIRY_GAUGE, "listener" => listener).set(at);
    let left = expires.duration_since(now).unwrap_or_default();
    if left >= EXPIRY_WARNING || warned.is_some_and(|t| t.elapsed() < Duration::from_secs(3600)) {
        return;
    }
    *warned = Some(tokio::time::Instant::now());
    if left.is_zero() {
        error!(listener, "a TLS certificate has expired: handshakes fail until it is renewed (replace the files; they are reloaded)");
    } else {
        warn!(listener, hours_left = left.as_secs() / 3600, "a TLS certificate expires soon: renew it (replace the files; they are reloaded)");
    }
}

/// Counts and logs one reload of `what` (see `reload_tls`).
fn note_reload(counter: &'static str, what: &'static str, asked: bool, outcome: Result<bool, crate::peer::tls::TlsError>) {
    let trigger = if asked { "signal" } else { "change" };
    match outcome {
        Ok(true) => {
            metrics::counter!(counter, "outcome" => "ok", "trigger" => trigger).increment(1);
            info!(signal = asked, "{what} certificates reloaded");
        }
        Ok(false) => {}
        Err(e) => {
            metrics::counter!(counter, "outcome" => "failed", "trigger" => trigger).increment(1);
            warn!(cause = %e, "{what} reload failed; the certificates loaded before stay in use");
        }
    }
}

/// The data dir's lock file: held (`flock`, exclusive) for as long as a node runs on the dir,
/// and it names the process that holds it.
const LOCK_FILE: &str = "LOCK";

/// How long a node waits for the data dir's lock before it gives up: a process killed just
/// before (`kill -9` and a restart at once, one stuck in uninterruptible I/O) lets it go when it
/// has ended.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Lock the data dir for this run (released when the returned file is dropped, at the end of
/// `run`, or by the kernel when the process dies: a killed node leaves no stale lock), then
/// check or record the node id in it: a data dir belongs to one node id forever. A filesystem
/// without `flock` (some NFS and FUSE mounts) runs without the lock, with a warning.
async fn claim_data_dir(dir: &Path, id: u64) -> Result<std::fs::File, NodeError> {
    let path = dir.display().to_string();
    let ctx = |source| NodeError::DataDir { path: path.clone(), source };
    crate::fsutil::create_private_dir(dir).map_err(ctx)?;
    let lock_path = dir.join(LOCK_FILE);
    let mut lock = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&lock_path).map_err(ctx)?;
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    // Bounded by the deadline: a pass every 200 ms.
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&lock_path).ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
                return Err(NodeError::DataDirInUse { path, holder: holder.unwrap_or_else(|| "a process that has not named itself yet".into()) });
            }
            Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported || e.raw_os_error() == Some(37) => {
                // 37: ENOLCK on Linux (an NFS mount without a lock manager).
                warn!(path = %lock_path.display(), cause = %e, "the data dir's filesystem takes no lock: nothing keeps a second node off this data dir");
                break;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(ctx(e)),
        }
    }
    {
        use std::io::Write;
        let me = format!("pid {} on node {id}\n", std::process::id());
        lock.set_len(0).and_then(|()| lock.write_all(me.as_bytes())).map_err(ctx)?;
    }
    // A restore that did not finish leaves a data dir that would start as a member holding a
    // snapshot but no log, or a log but no snapshot (`backup::restore`).
    let marker = dir.join(crate::backup::RESTORING);
    if marker.exists() {
        return Err(NodeError::RestoreUnfinished { path, marker: marker.display().to_string() });
    }
    claim_node_id(dir, id)?;
    Ok(lock)
}

pub(crate) fn claim_node_id(dir: &Path, id: u64) -> Result<(), NodeError> {
    let path = dir.display().to_string();
    let ctx = |source| NodeError::DataDir { path: path.clone(), source };
    match std::fs::read_to_string(dir.join("node_id")) {
        Ok(text) => {
            let stored: u64 = text.trim().parse().map_err(|_| {
                ctx(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("node_id file holds {text:?}")))
            })?;
            if stored != id {
                return Err(NodeError::IdMismatch { path, stored, given: id });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::fsutil::write_atomic(dir, "node_id", format!("{id}\n").as_bytes()).map_err(ctx)?;
            // A first start: the directory's own entry (made above) is durable too.
            crate::fsutil::sync_parent(dir).map_err(ctx)
        }
        Err(e) => Err(ctx(e)),
    }
}

/// Run a node until `shutdown` fires, then drain and stop.
///
/// `services` are the compiled-in services this node runs (an application embedding raftbridge
/// passes its own, built with `sdk::Service`).
pub async fn run(
    cfg: NodeConfig,
    services: Vec<ServiceParts>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    // Panics of this run's loops only (`supervise`): a process may run a node again.
    let supervised = crate::supervise::global().mark();
    let announced = crate::peer::frame::features::announced();
    if announced != crate::peer::frame::features::ALL {
        warn!(
            withheld = crate::peer::frame::features::ALL & !announced,
            "{} is set: this node announces fewer peer features than it has, which holds the cluster's gated writes back (a test hook, not for production)",
            crate::peer::frame::features::WITHHOLD_ENV
        );
    }
    // Every stop token of this run is a child of this one, which fires when the run's future is
    // dropped (an application that stops awaiting it): its loops stop with it, not with the
    // process.
    let run_stop = CancellationToken::new();
    let _stop_on_drop = run_stop.clone().drop_guard();
    // First, so that SIGHUP (systemd's reload) never ends the node once it runs (its default).
    let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(h) => Some(h),
        Err(e) => {
            warn!(cause = %e, "cannot take SIGHUP: it would end the node, and certificates reload only on change");
            None
        }
    };
    check_subscription_names(&services, cfg.sidecar.as_ref(), cfg.pull.as_ref())?;
    // Held until `run` returns.
    let _data_dir_lock = claim_data_dir(&cfg.data_dir, cfg.id).await?;
    let tls = match &cfg.peer_tls {
        Some(files) => {
            let tls = PeerTls::load_for(&files.cert, &files.key, &files.ca, files.server_name.as_deref(), Some(cfg.id), files.require_node_id)?;
            info!(cert = %files.cert.display(), ca = %files.ca.display(), server_name = ?files.server_name,
                require_node_id = files.require_node_id, "peer links over mutual TLS");
            Some(tls)
        }
        None => None,
    };
    let https = match &cfg.https {
        Some(h) => {
            let tls = api::tls::HttpTls::load(&h.cert, &h.key, h.client_ca.as_deref()).map_err(NodeError::Https)?;
            info!(addr = %h.addr, cert = %h.cert.display(), client_ca = ?h.client_ca, "HTTPS for clients");
            Some(tls)
        }
        None => None,
    };
    let peer_listener = listen(&cfg.peer_addr).await.map_err(|source| NodeError::Bind { addr: cfg.peer_addr.clone(), source })?;
    let http_listener = listen(&cfg.http_addr).await.map_err(|source| NodeError::Bind { addr: cfg.http_addr.clone(), source })?;
    let https_listener = match &cfg.https {
        Some(h) => Some(listen(&h.addr).await.map_err(|source| NodeError::Bind { addr: h.addr.clone(), source })?),
        None => None,
    };

    let dir_err = |source| NodeError::DataDir { path: cfg.data_dir.display().to_string(), source };
    let log_store = LogStore::open(&cfg.data_dir.join("log"), LogStoreOptions { grow_phase: LogStoreOptions::grow_phase_for(cfg.id), ..LogStoreOptions::default() }).map_err(dir_err)?;
    let sm = StateMachine::open(&cfg.data_dir.join("sm")).map_err(dir_err)?;
    let sm_shared = sm.shared();
    sm_shared.replay_through(log_store.last_index());

    // Links and listeners stop with `net_stop`, after the HTTP API has drained.
    let net_stop = run_stop.child_token();
    let net = PeerNet::new(
        PeerConfig {
            node_id: cfg.id,
            cluster: cfg.cluster_name.clone(),
            advertise: cfg.advertise.clone(),
            max_frame: cfg.max_frame,
            idle_timeout: Duration::from_millis((cfg.election_timeout_ms * 4).max(2_000)),
            secret: cfg.cluster_secret.clone(),
            tls: tls.clone(),
            source_ip: cfg.peer_source_addr,
            cluster_id: sm_shared.known_cluster_id(),
            recorded_features: sm_shared.recorded_features(),
        },
        net_stop.clone(),
    );
    net.announce_settings(crate::peer::frame::Settings {
        max_frame: cfg.max_frame as u64,
        events_max_count: cfg.events_max_count,
        events_max_bytes: cfg.events_max_bytes,
        events_max_age_s: cfg.events_max_age_s,
        dedup_max_keys: cfg.dedup_max_keys as u64,
        idempotency_max_bytes: cfg.idempotency_max_bytes,
        state_max_keys: cfg.state_max_keys,
        state_max_bytes: cfg.state_max_bytes,
    });
    let log_bytes = log_store.clone();
    let restarting = log_store.has_state();
    // An empty log (a first start, or a data dir that was lost, whether or not its node id
    // file survived): the node may have acknowledged entries in an earlier life (`withhold_vote`).
    let empty_log = !log_store.holds_entries();
    // Unless the empty log is a founder's, kept since before the cluster's first entry (`found`).
    let founder = log_store.founder();
    // Or a log whose open cut off a damaged tail that may have been acknowledged.
    let cut_damage = log_store.cut_damage();
    let unproven = (empty_log && !founder) || cut_damage;
    info!(empty_log, founder, cut_damage, "raft state at start");
    let raft_cfg = crate::raft::openraft_config(&RaftSettings {
        cluster: cfg.cluster_name.clone(),
        heartbeat_ms: cfg.heartbeat_ms,
        election_min_ms: cfg.election_timeout_ms,
        election_max_ms: cfg.election_timeout_ms * 2,
        snapshot_threshold: cfg.snapshot_threshold,
        // Off from the core's start for an unproven node (no window before `prove` runs).
        elect: !unproven,
    })?;
    let founder_log = log_store.clone();
    let reversions = Arc::new(crate::raft::network::Reversions::default());
    let outsider = Arc::new(crate::raft::network::Outsider::default());
    let raft = Raft::new(cfg.id, raft_cfg, Network { net: net.clone(), reversions: reversions.clone(), outsider: outsider.clone() }, log_store, sm)
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    // The last step that can fail, before any loop starts: an application that runs the node
    // again after an error must not find the first run's Raft core still writing the same log.
    let sidecar_stop = run_stop.child_token();
    let sidecar = match cfg.sidecar.clone().map(|sc| crate::sidecar::Sidecar::start(sc, cfg.max_frame / 2, sidecar_stop.clone())).transpose() {
        Ok(sidecar) => sidecar,
        Err(e) => {
            if let Err(stop) = raft.shutdown().await {
                warn!(cause = %stop, "raft shutdown");
            }
            return Err(e.into());
        }
    };
    // Also without TLS: SIGHUP (systemd's reload) must not end the node, as its default would.
    // Its own stop, not the caller's `shutdown`: a node that fails on its own returns without
    // `shutdown` firing, and the loop (holding SIGHUP) must not outlive the run.
    let reload_stop = run_stop.child_token();
    let reload_task = crate::supervise::spawn_until("certificate reload", &reload_stop, reload_tls(tls.clone(), https.clone(), hup, reload_stop.clone()));
    let replica = Replica::new(raft.clone(), net.clone());
    let guard_stop = run_stop.child_token();
    crate::supervise::spawn_until("log guard", &guard_stop, log_guard(raft.clone(), log_bytes, log_max_bytes(cfg.id), guard_stop.clone()));
    let cluster_stop = run_stop.child_token();
    // Set by the peer handler at the first Raft request; read by the bootstrap and `found`.
    let raft_seen = Arc::new(AtomicBool::new(false));
    let cluster = Cluster::start(
        replica.clone(),
        ClusterSettings { seeds: cfg.seeds.clone(), bootstrap_expect: cfg.bootstrap_expect, max_voters: cfg.max_voters },
        reversions,
        outsider,
        founder_log.clone(),
        raft_seen.clone(),
        cluster_stop.clone(),
    );
    // Compiled-in services are always offered; sidecar commands only while the upstream is healthy.
    let compiled: Vec<crate::sdk::ServiceDecl> = services.iter().map(|p| p.decl.clone()).collect();
    let mut services = services;
    let mut sidecar_offer: Option<(Vec<crate::sdk::ServiceDecl>, tokio::sync::watch::Receiver<bool>)> = None;
    if let Some(sidecar) = sidecar {
        let parts = sidecar.parts();
        sidecar_offer = Some((parts.iter().map(|p| p.decl.clone()).collect(), sidecar.healthy()));
        services.extend(parts);
    }
    // Pull subscriptions are offered while a client fetches from this node (`broker::pull`).
    let mut pull_offer: Vec<crate::sdk::ServiceDecl> = Vec::new();
    let pulls = match cfg.pull.as_ref().map(|p| p.parts(cfg.id)).transpose() {
        Ok(Some((parts, consumers))) => {
            pull_offer = parts.iter().map(|p| p.decl.clone()).collect();
            services.extend(parts);
            Arc::new(consumers)
        }
        Ok(None) => Arc::new(crate::broker::pull::PullConsumers::default()),
        // Checked with the config (`NodeConfig::validate`): only an application's own config.
        Err(e) => {
            if let Err(stop) = raft.shutdown().await {
                warn!(cause = %stop, "raft shutdown");
            }
            return Err(NodeError::Services(format!("pull: {e}")));
        }
    };
    let timeout = Duration::from_millis(cfg.write_timeout_ms);
    // The secret store's key, derived from the cluster secret (the store is off without one).
    let previous: Vec<[u8; 32]> = cfg.cluster_secret_previous.iter().map(|s| s.derive(b"secret store")).collect();
    let sealer = cfg.cluster_secret.as_ref().map(|s| Arc::new(crate::store::secret::Sealer::new(s.derive(b"secret store"), &previous)));
    let store = StateStore::new(replica.clone(), sm_shared.clone(), timeout, cfg.max_body, (cfg.state_max_keys, cfg.state_max_bytes)).with_sealer(sealer);
    let broker_stop = run_stop.child_token();
    let limits = EventLimits {
        max_events: cfg.events_max_count,
        max_bytes: cfg.events_max_bytes,
        max_age_ms: cfg.events_max_age_s.saturating_mul(1000),
        dedup_window_ms: 120_000,
    };
    let linger = Duration::from_millis(cfg.publish_linger_ms);
    // Half a peer frame: an entry of one group always fits into AppendEntries (module doc of
    // `broker`), whatever `--max-body` allows.
    let broker =
        Broker::start(store.clone(), limits, timeout, linger, cfg.max_frame / 2, cfg.dedup_max_keys, broker_stop.clone());
    // A sidecar's subscriptions run only while its app passes the health check.
    let sidecar_healthy = sidecar_offer.as_ref().map(|(_, healthy)| healthy.clone());
    let sidecar_subs: std::collections::HashSet<String> = sidecar_offer
        .iter()
        .flat_map(|(decls, _)| decls.iter().flat_map(|d| d.subscriptions.iter().map(|s| s.name.clone())))
        .collect();
    let (sidecar_healthy, sidecar_subs, pull_queues) = (&sidecar_healthy, &sidecar_subs, &pulls);
    let subscribers: HashMap<String, LocalSubscriber> = services
        .iter()
        .flat_map(|p| {
            let service = Sender {
                service_name: p.decl.name.clone(),
                service_version: p.decl.version.to_string(),
                service_target: String::new(),
                instance_id: cfg.id.to_string(),
            };
            let decls = p.decl.subscriptions.clone();
            p.subscribers.iter().map(move |(name, h)| {
                let decl = decls.iter().find(|d| &d.name == name);
                let shared = decl.is_none_or(|d| d.shared);
                let ack_deadline = Duration::from_millis(decl.map_or(crate::broker::event::DEFAULT_ACK_DEADLINE_MS, |d| d.ack_deadline_ms).max(1));
                let available = match pull_queues.get(name) {
                    Some(queue) => Some(queue.demand()),
                    None => sidecar_subs.contains(name.as_str()).then(|| sidecar_healthy.clone()).flatten(),
                };
                // What it emits names the subscription as its sender's target, as a command's
                // events name the command (PURISTA's `serviceTarget`).
                let service = Sender { service_target: name.clone(), ..service.clone() };
                (name.clone(), LocalSubscriber { handler: h.clone(), service, shared, ack_deadline, available })
            })
        })
        .collect();
    let dispatcher = Dispatcher::start(broker.clone(), net.clone(), cluster.clone(), subscribers, Some(cfg.data_dir.join("attempts")), broker_stop.clone());
    let proxy = Arc::new(Proxy::new(
        cfg.id,
        cluster.clone(),
        broker.clone(),
        store.clone(),
        LocalServices::new(services),
        ProxySettings {
            local_first: cfg.local_first,
            max_inflight_per_peer: crate::proxy::COMMANDS_PER_PEER,
            idempotency_window: Duration::from_secs(600),
            idempotency_max_keys: cfg.dedup_max_keys,
            idempotency_max_bytes: cfg.idempotency_max_bytes,
            max_output: cfg.max_frame / 2,
        },
    ));
    dispatcher.set_handler_calls(proxy.handler_calls());
    let appends = AppendLanes::new(replica.raft.clone());
    // The handler holds the node's parts, which hold `net`: the cycle is cut when the run ends
    // (returns or is dropped), once its links are down.
    let _clear_handler = ClearHandler(net.clone());
    let unproven = Arc::new(AtomicBool::new(unproven));
    let seen_commit = Arc::new(Mutex::new((0, 0)));
    if unproven.load(Ordering::Relaxed) {
        if cut_damage {
            warn!("this node's log lost a damaged tail at its open: it withholds its vote and does not campaign until a leader has brought it up to date");
        } else {
            info!("this node started with an empty log: it withholds its vote and does not campaign until a leader has brought it up to date, or it founds a cluster");
        }
        // Ends once the node is proven (`spawn`: a return is no failure), or with the run.
        crate::supervise::spawn("unproven", prove(replica.clone(), founder_log.clone(), unproven.clone(), seen_commit.clone(), run_stop.child_token()));
    }
    let snapshots = Arc::new(Snapshots::new(cfg.snapshot_cap()));
    crate::supervise::spawn_until("snapshot transfer expiry", &guard_stop, snapshots.clone().expire_idle(guard_stop.clone()));
    net.set_handler(Arc::new(PeerHandler {
        replica: replica.clone(),
        cluster: cluster.clone(),
        proxy: proxy.clone(),
        dispatcher: dispatcher.clone(),
        broker: broker.clone(),
        pulls: pulls.clone(),
        snapshots: snapshots.clone(),
        appends: appends.clone(),
        unproven,
        seen_commit,
        log: founder_log,
        raft_seen,
    }));
    let peer_task = crate::supervise::spawn_until("peer listener", &net_stop, net.clone().run(peer_listener));

    let offered_pulls = pulls.clone();
    let offering: Offering = Arc::new(move || {
        let mut decls = compiled.clone();
        // Each pull subscription's own service: offered while a client fetches that one here.
        for pull in &pull_offer {
            let demanded = pull.subscriptions.iter().all(|s| offered_pulls.demanded(&s.name));
            decls.push(crate::sdk::ServiceDecl { available: demanded, ..pull.clone() });
        }
        if let Some((sidecar_decls, healthy)) = &sidecar_offer {
            let up = *healthy.borrow();
            decls.extend(sidecar_decls.iter().cloned().map(|mut d| {
                d.available = up;
                d
            }));
        }
        decls
    });
    let registry_stop = run_stop.child_token();
    // Nothing to register: in sync from the start (readiness then is just "in a cluster with a leader").
    let registered = Arc::new(std::sync::atomic::AtomicBool::new(offering().is_empty()));
    let registry_task =
        crate::supervise::spawn_until("service registry", &registry_stop, registry::run(store.clone(), cluster.clone(), offering, registered.clone(), registry_stop.clone()));

    if !pulls.is_empty() {
        crate::supervise::spawn_until("pull demand", &registry_stop, pulls.clone().demand_loop(registry_stop.clone()));
    }
    crate::supervise::spawn_until("idempotency expiry", &registry_stop, proxy.clone().expire_records(registry_stop.clone()));
    crate::supervise::spawn_until("key expiry", &registry_stop, crate::store::expire_keys(store.clone(), registry_stop.clone()));
    crate::supervise::spawn_until("route refresh", &registry_stop, proxy.clone().refresh_routes(registry_stop.clone()));
    if let Some(handle) = metrics.clone() {
        crate::supervise::spawn_until("metrics upkeep", &guard_stop, metrics_upkeep(handle, guard_stop.clone()));
    }
    let settings = api::HttpSettings {
        max_body: cfg.max_body,
        bodies: api::BodyBudget::new(cfg.max_body_buffered),
        answers: api::BodyBudget::new(cfg.max_body_buffered),
        heads: api::BodyBudget::new(cfg.max_body_buffered),
        max_connections: cfg.max_connections,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_millis(cfg.http_idle_timeout_ms),
        shutdown_grace: Duration::from_millis(cfg.shutdown_grace_ms),
        access_log: cfg.access_log,
    };
    let app = Arc::new(api::App {
        replica: replica.clone(),
        cluster: cluster.clone(),
        store,
        proxy: proxy.clone(),
        broker: broker.clone(),
        registered,
        restarting,
        sm: sm_shared,
        metrics,
        rendering: tokio::sync::Semaphore::new(1),
        connections: api::App::new_connections(&settings),
        settings,
        cluster_name: cfg.cluster_name.clone(),
        secrets_token: cfg.secrets_token.clone(),
        api_tokens: cfg.api_tokens.clone(),
        api_read_token: cfg.api_read_token.clone(),
        long_polls: api::stores::LongPolls::new(),
        pulls: pulls.clone(),
        snapshot_downloads: Arc::new(tokio::sync::Semaphore::new(1)),
    });
    let http_stop = run_stop.child_token();
    let https_task = match (https_listener, https) {
        (Some(listener), Some(tls)) => Some(crate::supervise::spawn_until("HTTPS listener", &http_stop, api::run(listener, app.clone(), Some(tls), http_stop.clone()))),
        _ => None,
    };
    let http_task = crate::supervise::spawn_until("HTTP listener", &http_stop, api::run(http_listener, app, None, http_stop.clone()));
    // Client connections, peer links, log segments, snapshots and the runtime's own descriptors
    // (`process::raise_open_files_limit` ran at start).
    let wanted = cfg.max_connections as u64 + 512;
    if let Some(limit) = crate::process::open_files_limit().filter(|l| *l < wanted) {
        warn!(limit, wanted, "the open-file limit is below what --max-connections may open: raise it (ulimit -n, LimitNOFILE, the container's nofile ulimit) or lower --max-connections");
    }
    // Whether the data and admin API wants a token: an empty or mistyped setting leaves it open,
    // which the start line says rather than leaving it to be found out.
    let api = match (cfg.api_tokens.is_empty(), cfg.api_read_token.is_some()) {
        (true, _) => "open (no --api-token)",
        (false, false) => "token required",
        (false, true) => "token required (and a read token)",
    };
    info!(id = cfg.id, peer = %cfg.peer_addr, http = %cfg.http_addr, https = ?cfg.https.as_ref().map(|h| &h.addr), advertise = %cfg.advertise, api, "node started");

    // A Raft core that stops on its own (its log or snapshot could not be written) leaves a node
    // that answers reads from a frozen copy and fails every write: it drains and exits with an
    // error instead, so that its supervisor restarts it and recovery starts from what the disk
    // holds (etcd and PostgreSQL end the process on a failed fsync for the same reason).
    // A loop the node cannot work without that panicked (`supervise`) ends it the same way.
    let failure = tokio::select! {
        _ = shutdown.cancelled() => None,
        why = replica.core_stopped() => Some(Fatal::Core(why)),
        failed = crate::supervise::global().failed_since(supervised) => Some(Fatal::Loop(failed)),
    };
    let core_failure = match &failure {
        Some(Fatal::Core(why)) => {
            error!(cause = %why, "raft stopped on its own: this node can no longer vote, replicate or apply; \
                draining and exiting with an error so that it is restarted and recovers from its disk");
            true
        }
        // `supervise` logged the panic.
        Some(Fatal::Loop(_)) | None => false,
    };
    // Drain in order: say "not ready" (load balancers and probes stop sending), leave the
    // registry (peers stop routing here), keep serving for a moment so in-flight clients see the
    // change, stop accepting and finish in-flight requests, hand Raft leadership over, stop.
    info!("shutting down: readyz 503, leaving the registry, draining HTTP, handing over leadership");
    proxy.set_draining();
    pulls.hand_back();
    registry_stop.cancel();
    let _ = registry_task.await;
    tokio::time::sleep(Duration::from_millis(cfg.drain_delay_ms)).await;
    let http_drain = tokio::time::Instant::now();
    http_stop.cancel();
    let _ = http_task.await;
    if let Some(task) = https_task {
        let _ = task.await;
    }
    // Commands whose clients left, or whose clients' deadlines passed, run on in tasks of their
    // own: they still need the broker. They get what is left of the shutdown grace, as their
    // connections would have had, and at least `IN_FLIGHT_GRACE`.
    let grace = Duration::from_millis(cfg.shutdown_grace_ms).saturating_sub(http_drain.elapsed()).max(IN_FLIGHT_GRACE);
    // Pull clients answer what they fetched here meanwhile, on any node (the links serve on).
    let (finished, answered) = tokio::join!(proxy.commands_finished(grace), pulls.answered(grace));
    if !finished {
        warn!(?grace, "commands still running at shutdown; they may stop part-way");
    }
    if !answered {
        warn!(?grace, "pull subscription events fetched here and not answered at shutdown; they are delivered again");
    }
    if !core_failure {
        // An election round trip, with room for a busy host: the stop goes on after it.
        let _ = crate::cluster::hand_over_leadership(&replica, Duration::from_secs(3)).await;
    }
    sidecar_stop.cancel();
    reload_stop.cancel();
    let _ = reload_task.await;
    guard_stop.cancel();
    // Every-instance loops let their running handler end and commit what they handled, while
    // the broker (their progress, their handlers' emits), the links and the core still serve.
    if !dispatcher.stop_instances(IN_FLIGHT_GRACE).await {
        warn!(grace = ?IN_FLIGHT_GRACE, "every-instance handlers still running at shutdown; what they handled since their last commit is delivered again after the restart");
    }
    broker_stop.cancel();
    cluster_stop.cancel();
    // What is still in flight needs the links: this node's last event entries (a drained
    // leader's go to the new one), and the answers to what peers asked of it.
    if !broker.drained(IN_FLIGHT_GRACE).await {
        warn!(grace = ?IN_FLIGHT_GRACE, "event entries still in flight at shutdown; their publishers get no answer");
    }
    // Deliveries answered early whose last handlers ran on (or were cut by the stop) hand their
    // outcomes to their leaders before the links close.
    if !dispatcher.handed_over(IN_FLIGHT_GRACE).await {
        warn!(grace = ?IN_FLIGHT_GRACE, "delivery outcomes not asked for by their leader at shutdown; their events count an attempt");
    }
    if !net.quiesce(IN_FLIGHT_GRACE).await {
        warn!(grace = ?IN_FLIGHT_GRACE, "peer requests still being served at shutdown; their senders get no answer");
    }
    // Links first: a request that reached a stopped core would be logged as an error on every
    // rolling restart (openraft: "failed to send RaftMsg to RaftCore … raft stopped").
    net_stop.cancel();
    let _ = peer_task.await;
    // Then what the core took from the links: an append it never answered is logged as an error.
    if !appends.close(IN_FLIGHT_GRACE).await {
        warn!(grace = ?IN_FLIGHT_GRACE, "appends still in the raft core at shutdown");
    }
    if let Err(e) = raft.shutdown().await {
        warn!(cause = %e, "raft shutdown");
    }
    // A loop that panicked while the node drained also makes the exit an error.
    match failure.or_else(|| crate::supervise::global().failure_since(supervised).map(Fatal::Loop)) {
        Some(Fatal::Core(why)) => Err(NodeError::RaftStopped(why)),
        Some(Fatal::Loop(failed)) => Err(NodeError::LoopFailed(failed)),
        None => {
            info!("node stopped");
            Ok(())
        }
    }
}

/// Connections the kernel holds for a listener until they are accepted, as nginx's 511 and
/// Envoy's 1,024 (capped by `net.core.somaxconn`). `TcpListener::bind` asks for 128, and
/// hundreds of clients reconnecting at once (a node restarted, a drain's `Connection: close`)
/// overflowed it: the dropped SYNs cost each of those clients a second's retransmit.
const LISTEN_BACKLOG: u32 = 1024;

/// A listener on `addr` (the first of its addresses that binds, as `TcpListener::bind`) with
/// `LISTEN_BACKLOG`.
async fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for at in tokio::net::lookup_host(addr).await? {
        let socket = if at.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        // As `TcpListener::bind`: a restarted node rebinds at once, past the old sockets' TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(at).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr} names no address"))))
}

/// Drops the peer handler when the run ends (see where it is made).
struct ClearHandler(Arc<PeerNet>);

impl Drop for ClearHandler {
    fn drop(&mut self) {
        self.0.clear_handler();
    }
}

/// Why a node stops without being asked to.
enum Fatal {
    /// Its Raft core stopped on its own, with this reason.
    Core(String),
    /// A loop it cannot work without panicked.
    Loop(crate::supervise::Failure),
}

/// How long a stopping node waits for its event entries in flight, then for the peer requests
/// it is serving, before it closes its links (each; an entry commits in milliseconds).
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(3);

/// How often histogram samples are folded into the exported summaries and histograms.
const METRICS_UPKEEP: Duration = Duration::from_secs(1);

/// The Prometheus recorder keeps every histogram sample until upkeep folds it into the exported
/// summaries (and histograms, for metrics given buckets); `install_recorder` (we serve `/metrics` ourselves) leaves running upkeep to us.
/// Without it, samples piled up for as long as nobody scraped (memory without bound) and the
/// next scrape folded them all. Every second, on a blocking thread, each fold stays small and
/// off the async workers. (The scrape stalls themselves came from rendering on the worker; see
/// `api::metrics_text`.)
async fn metrics_upkeep(handle: metrics_exporter_prometheus::PrometheusHandle, stop: CancellationToken) {
    let mut tick = crate::supervise::Ticker::new(METRICS_UPKEEP, &stop);
    while tick.next().await {
        let handle = handle.clone();
        let _ = tokio::task::spawn_blocking(move || handle.run_upkeep()).await;
    }
}

/// Log bytes on disk (and so in memory) that trigger a snapshot and purge regardless of the
/// entry-count policy: event batches make entries large, and the count alone would let the log grow
/// to gigabytes.
const LOG_MAX_BYTES: u64 = 128 << 20;

/// This node's log byte bound: `LOG_MAX_BYTES` plus a quarter of it per step of the node id
/// (mod 4). Every node holds the same log, so with one bound all of them would serialize their
/// snapshot at the same moment, and on a small machine the whole cluster stalled for it
/// (100-300 ms p99 publish-ack spikes in `bench events --batch 100 --rate 750`). Staggered,
/// one node snapshots at a time while the others keep committing.
fn log_max_bytes(id: NodeId) -> u64 {
    LOG_MAX_BYTES + (id % 4) * (LOG_MAX_BYTES / 4)
}

/// Keep the log within `max` bytes: when it grows past it, purge up to the latest snapshot, and
/// if that snapshot covers nothing more, build a new one (then purge up to it on a later tick).
/// One snapshot at a time: under steady load `applied` moves every tick, and re-triggering on
/// each tick (as this once did) rebuilt the whole state every second while the purge never ran,
/// so the log kept growing and every node stalled for its snapshots.
async fn log_guard(raft: Raft, log: LogStore, max: u64, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut guard = GuardState::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let bytes = log.disk_bytes();
        if bytes <= max {
            continue;
        }
        let (applied, snapshot) = {
            let m = raft.metrics().borrow_watched().clone();
            (m.last_applied.map(|l| l.index), m.snapshot.map(|l| l.index))
        };
        match guard.step(applied, snapshot) {
            GuardAction::Purge(upto) => {
                debug!(bytes, max, upto, "log over its byte bound: purging up to the snapshot");
                let _ = raft.trigger().purge_log(upto).await;
            }
            GuardAction::Snapshot => {
                info!(bytes, max, "log over its byte bound: snapshotting");
                let _ = raft.trigger().snapshot().await;
            }
            GuardAction::Wait => {}
        }
    }
}

/// What the log guard has asked for so far (see `log_guard`).
#[derive(Debug, Default)]
struct GuardState {
    /// Applied index when the pending snapshot was requested, and ticks since.
    requested: Option<(u64, u32)>,
    /// Highest index a purge was requested up to.
    purged: Option<u64>,
}

#[derive(Debug, PartialEq, Eq)]
enum GuardAction {
    Purge(u64),
    Snapshot,
    Wait,
}

/// Ticks a requested snapshot may take before the guard asks again (openraft ignores a
/// trigger while one is being built, so this only matters if a build failed).
const SNAPSHOT_PATIENCE_TICKS: u32 = 60;

impl GuardState {
    /// One tick while the log is over its bound, given the applied and snapshot indexes.
    fn step(&mut self, applied: Option<u64>, snapshot: Option<u64>) -> GuardAction {
        if let Some(s) = snapshot {
            if self.purged.is_none_or(|p| s > p) {
                self.purged = Some(s);
                if self.requested.is_some_and(|(r, _)| s >= r) {
                    self.requested = None;
                }
                return GuardAction::Purge(s);
            }
        }
        let Some(a) = applied else { return GuardAction::Wait };
        match &mut self.requested {
            Some((_, ticks)) if *ticks < SNAPSHOT_PATIENCE_TICKS => {
                *ticks += 1;
                GuardAction::Wait
            }
            _ if snapshot.is_some_and(|s| s >= a) => GuardAction::Wait,
            _ => {
                self.requested = Some((a, 0));
                GuardAction::Snapshot
            }
        }
    }
}

/// A snapshot being received: the sender's vote, its last log index, the bytes so far, and
/// when it last grew (`Snapshots::expire`).
type Assembly = (Vote, Option<u64>, Vec<u8>, tokio::time::Instant);

/// How long a snapshot being received may go without a chunk before it is dropped. A sender
/// that crashed, was deposed or gave up part-way (the follower then caught up from the log, or
/// was removed) sends no later chunk and, often, no new transfer that would replace it: its
/// partial image, up to the snapshot cap (1 GiB or more), stayed in memory for the life of the
/// process. A live transfer sends its next chunk within a peer call's timeout.
const ASSEMBLY_IDLE: Duration = Duration::from_secs(60);

/// Snapshots being received (one at a time) and the largest image accepted: what this node's
/// own bounds let a leader's image reach (`NodeConfig::snapshot_cap`). A fixed 1 GiB refused,
/// for good, the image of a node whose bounds had been raised past it.
struct Snapshots {
    assembling: Mutex<HashMap<NodeId, Assembly>>,
    cap: usize,
    /// Images assembled and being checked or installed (`Installing`). While one is, a new
    /// transfer is refused at its first chunk: a follower whose disk stalled held each image
    /// the leader sent again after its request timed out, behind the first install, and grew
    /// by one image (73 MB in a helper's run) per retry until the disk came back.
    installing: std::sync::atomic::AtomicUsize,
}

/// An assembled image being checked or installed; counted in `Snapshots::installing` until
/// dropped (also when the peer request's future is dropped part-way).
struct Installing<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Installing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Snapshots {
    fn new(cap: usize) -> Snapshots {
        Snapshots { assembling: Mutex::new(HashMap::new()), cap, installing: 0.into() }
    }

    /// Whether a chunk at `offset` may be taken: a new transfer (offset 0) waits until no image
    /// is being installed.
    fn admits(&self, offset: u64) -> bool {
        offset != 0 || self.installing.load(std::sync::atomic::Ordering::Acquire) == 0
    }

    fn installing(&self) -> Installing<'_> {
        self.installing.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Installing(&self.installing)
    }

    /// Drops the transfers that have had no chunk for `ASSEMBLY_IDLE`; true if any was.
    fn expire(&self, now: tokio::time::Instant) -> bool {
        let mut map = crate::lock(&self.assembling);
        let before = map.len();
        map.retain(|from, a| {
            let live = now.saturating_duration_since(a.3) < ASSEMBLY_IDLE;
            if !live {
                warn!(peer = *from, bytes = a.2.len(), "dropped a snapshot transfer that had no chunk for {ASSEMBLY_IDLE:?}");
            }
            live
        });
        map.len() != before
    }

    /// Runs `expire` until `stop` (the node's guard stop).
    async fn expire_idle(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(ASSEMBLY_IDLE / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.expire(tokio::time::Instant::now());
        }
    }
}

/// Serves peer requests by handing each to the module that owns it.
struct PeerHandler {
    replica: Replica,
    cluster: Cluster,
    proxy: Arc<Proxy>,
    dispatcher: Arc<Dispatcher>,
    broker: Arc<Broker>,
    /// This node's pull subscriptions, for clients' answers another node forwards.
    pulls: Arc<crate::broker::pull::PullConsumers>,
    snapshots: Arc<Snapshots>,
    /// AppendEntries in arrival order per leader (pipelined replication, `raft::network`).
    appends: Arc<AppendLanes>,
    /// Set while this node started with an empty log and has not yet been brought up to date by
    /// a leader (`withhold_vote`); cleared for good once it has, or once its log is marked a
    /// founder's (`found`).
    unproven: Arc<AtomicBool>,
    /// While `unproven`: the commit index of the first append of the highest term that reached
    /// this node, with that term (`note_commit`); it votes again only once its log reaches it
    /// (`vote_rule`).
    seen_commit: Arc<Mutex<(u64, u64)>>,
    /// This node's Raft log, for the founder mark (`found`).
    log: LogStore,
    /// Set once any Raft request (a vote, pre-vote, append or snapshot) reached this process:
    /// a cluster exists somewhere, so `found` marks nothing.
    raft_seen: Arc<AtomicBool>,
}

/// Serves `PeerRequest::Found`: `from` is about to bootstrap a cluster of `members` with this
/// node among them, having seen every one of them without cluster state. This node marks its
/// log, if still empty and with no cluster state, as a founder's (durably, before answering).
///
/// Why that is safe: the mark is made while no seed holds an entry of the cluster, so this
/// node cannot have acknowledged one before; it is kept with the log's segments, so a node
/// that lost its log has lost the mark too, and it is removed before the log acknowledges its
/// first entry (`LogStore::mark_founder`). A node that restarts with an empty log and the
/// mark therefore never acknowledged an entry, and votes as Raft says: the new-cluster stall
/// of `withhold_vote` (a first leader that dies after its first entry reached only some nodes)
/// does not hold up the founders that missed that entry.
async fn found(replica: &Replica, log: &LogStore, unproven: &AtomicBool, raft_seen: &AtomicBool, from: NodeId, members: Vec<NodeId>) -> PeerResponse {
    let me = replica.id();
    // The receiver need not be among `members`: a seed past the founders is marked too, so that
    // it defers to `from` and bootstraps no cluster of its own (it joins `from`'s).
    if !members.contains(&from) {
        return PeerResponse::Error(RemoteError::Invalid(format!("node {from} is not among the founders {members:?} it names")));
    }
    // A bootstrapping node sees only the seeds: Raft traffic here means a cluster exists beyond
    // them (members outside the seed list, say, while the seeds lost their data), and this
    // node may once have acknowledged its entries.
    if raft_seen.load(Ordering::SeqCst) {
        return PeerResponse::Error(RemoteError::Invalid(format!("node {me} has had Raft requests: a cluster exists")));
    }
    // (Entries without cluster state are refused by `mark_founder`, under the log's lock.)
    match replica.raft.is_initialized().await {
        Ok(false) => {}
        Ok(true) => return PeerResponse::Error(RemoteError::Invalid(format!("node {me} already has cluster state"))),
        Err(e) => return PeerResponse::Error(RemoteError::Internal(e.to_string())),
    }
    let marked = log.clone();
    let ids = members.clone();
    match tokio::task::spawn_blocking(move || marked.mark_founder(from, &ids)).await {
        Ok(Ok(Founding::HoldsEntries)) => PeerResponse::Error(RemoteError::Invalid(format!("node {me} holds log entries"))),
        Ok(Ok(Founding::Other(by))) => {
            PeerResponse::Error(RemoteError::Invalid(format!("node {me} is a founder of the cluster node {by} forms")))
        }
        Ok(Ok(Founding::Marked { new })) => {
            unproven.store(false, Ordering::Relaxed);
            if new {
                info!(from, ?members, "forming a new cluster: this node's empty log is marked as a founder's");
            }
            PeerResponse::Done
        }
        Ok(Err(e)) => PeerResponse::Error(RemoteError::Internal(format!("marking the log: {e}"))),
        Err(panicked) => PeerResponse::Error(RemoteError::Internal(format!("marking the log: {panicked}"))),
    }
}

/// A subscription's name is its identity cluster-wide (its progress and dead letters are kept
/// under it), and this node's handlers are looked up by it: two declarations of one name on a
/// node, by two services, two versions of one or a service and the sidecar, would take each
/// other's events. Refused at start. (Across nodes, `registry` keeps one service per name.)
fn check_subscription_names(services: &[ServiceParts], sidecar: Option<&crate::sidecar::SidecarConfig>, pull: Option<&crate::broker::pull::PullConfig>) -> Result<(), NodeError> {
    let compiled = services.iter().flat_map(|p| p.decl.subscriptions.iter().map(move |s| (s.name.as_str(), p.decl.name.as_str(), p.decl.version)));
    let configured = sidecar.into_iter().flat_map(|c| c.subscriptions.iter().map(|s| (s.name.as_str(), s.service.as_deref().unwrap_or("sidecar"), s.version.unwrap_or(1))));
    let pulled = pull.into_iter().flat_map(|c| c.subscriptions.iter().map(|s| (s.name.as_str(), c.service.as_str(), c.version)));
    let mut seen: HashMap<&str, (&str, u32)> = HashMap::new();
    for (name, service, version) in compiled.chain(configured).chain(pulled) {
        if let Some((other, v)) = seen.insert(name, (service, version)) {
            return Err(NodeError::Services(format!(
                "subscription {name:?} is declared twice on this node ({other} v{v} and {service} v{version}); subscription names are cluster-wide: give each its own"
            )));
        }
    }
    Ok(())
}

/// Whether to refuse `req`'s vote (or pre-vote). A node that started with an empty log cannot
/// tell a first start from one after its data was lost, and in the second case it may once have
/// acknowledged entries that a candidate lacks: granting with an empty or partial log could elect
/// that candidate. So it votes only for a candidate whose log is at most the bootstrap membership
/// entry (index 0: forming a cluster) until it holds an entry of the term of the leader it
/// follows. By log matching it then holds that leader's log up to there, and by leader
/// completeness every entry committed before that leader's term, so it votes as usual from then
/// on. (Entries acknowledged to that same leader later in its term are covered by the leader,
/// which notices the lost log and keeps the node a learner: `cluster`.) The refusal is an error,
/// which the candidate counts as no answer.
///
/// A node whose empty log is a founder's (`found`) is not held to this: its log was never lost,
/// so it never acknowledged an entry. That is what lets a new cluster whose first leader dies
/// after its first entry reached some founders but not others elect among them. Left as a gap:
/// a founder that the bootstrapping node could not mark (no answer within `FOUND_TIMEOUT`, or a
/// build from before the mark) still withholds in that case until the first leader is back.
/// (A vote for a candidate that merely reaches the leader's term is no way out: it would let one
/// that lacks entries of that very term win.)
/// Notes the `commit` of an append of `term` that this node took whole (answered `Success`)
/// for `vote_rule`: the first one of each higher `term` (not the highest of all: the leader's
/// commit index moves on, and a follower a few entries behind it when the next election comes
/// would withhold its vote with nothing wrong). The first append taken whole follows the
/// leader's handling of this node's conflict (its log went back), after which the leader
/// counts no old acknowledgement of it: it covers every entry committed with one. A deposed
/// leader's append of a lower term is replaced by the current one's. (Left: a leader deposed
/// in a term below one in which this node acknowledged entries, whose appends it takes with
/// its vote lost along with its data, records that lower term until the current leader's
/// first append: the rule of a node that lost its vote.)
fn note_commit(seen: &Mutex<(u64, u64)>, term: u64, commit: u64) {
    let mut seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if term > seen.0 {
        *seen = (term, commit);
    }
}

/// A vote or pre-vote from `from`, a node outside this member's settled membership: it was
/// removed while it ran (no leader replicates to it any more, so it never learned it) and
/// campaigns in vain; openraft would even grant its vote. Refused with `NOT_A_MEMBER`, which
/// tells it to stop (`raft::network::Outsider`; it believes it once more than half of the other
/// voters it knows said so, as a member whose view is old may not know a node that joined
/// since, and a candidate whose log reaches this node's membership entry is not judged at all).
/// Not while this node's view
/// says nothing of others: it is no member itself (forming a cluster, or removed too) or a
/// change is half done.
fn refuse_outsider(cluster: &Cluster, from: NodeId, req: &VoteRequest) -> Option<PeerResponse> {
    if !cluster.is_outsider(from, req.last_log_id.as_ref()) {
        return None;
    }
    metrics::counter!("raftbridge_raft_outsider_votes_refused_total").increment(1);
    debug!(from, "refused a vote request from a node outside the membership");
    Some(PeerResponse::Error(RemoteError::NotServed(format!(
        "{}: node {from} is not in node {}'s membership (removed); stop it (to bring it back, start it with an empty data dir)",
        crate::raft::network::NOT_A_MEMBER,
        cluster.id()
    ))))
}

/// While this node is unproven (`withhold_vote`), its elections are off too (from the core's
/// start: `RaftSettings::elect`): a candidate votes for itself, and its vote is what is in
/// doubt (a node whose data was lost, elected with the vote of another that lacks an entry
/// both had acknowledged, would lose it). They go on once it is brought up (an append of its
/// leader's term that reaches the commit index that leader first told it: `vote_rule`) or
/// marked a founder (`found`), and when its own bootstrap claims the log to found a cluster
/// (which needs its election; it keeps withholding votes until an election proves it, as the
/// claim is no proof that this node never acknowledged another cluster's entries). Looked at
/// every 200 ms: the rule's inputs change with appends, and an election waits that long anyway.
async fn prove(replica: Replica, log: LogStore, unproven: Arc<AtomicBool>, seen_commit: Arc<Mutex<(u64, u64)>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut electing = false;
    // Bounded by the stop, and ends once the node is proven.
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A damaged tail on the cluster's only voter: no other node holds what it lost, and
        // no leader but itself can bring it up; waiting would leave the cluster leaderless for
        // good (a node restored from a snapshot, before others joined, say).
        if unproven.load(Ordering::Relaxed) && log.cut_damage() {
            let m = replica.metrics();
            let mut voters = m.membership_config.membership().voter_ids();
            if voters.next() == Some(replica.id()) && voters.next().is_none() {
                warn!("this node's log lost a damaged tail and it is the cluster's only voter: it campaigns, as no other node holds what it lost");
                unproven.store(false, Ordering::Relaxed);
            }
        }
        if unproven.load(Ordering::Relaxed) {
            let vote = replica.raft.server_metrics().borrow_watched().vote;
            let last = replica.raft.data_metrics().borrow_watched().last_log;
            let seen = *seen_commit.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if vote_rule(replica.id(), &vote, last.as_ref(), None, seen, !log.cut_damage()) == VoteRule::BroughtUp {
                unproven.store(false, Ordering::Relaxed);
            }
        }
        let proven = !unproven.load(Ordering::Relaxed);
        if proven && log.cut_damage() {
            // Brought up by a leader: what the damaged tail held is back. Until the mark is
            // gone, a restart would find the node unproven again (harmless): looked at again.
            let cleared = log.clone();
            match tokio::task::spawn_blocking(move || cleared.clear_cut_damage()).await {
                Ok(Ok(())) => info!("this node's log is whole again since its damaged tail was cut: a leader brought it up to date"),
                Ok(Err(e)) => warn!(cause = %e, "could not clear the damaged-log mark"),
                Err(e) => warn!(cause = %e, "could not clear the damaged-log mark"),
            }
        }
        if !electing && (proven || log.claimed_founding()) {
            replica.raft.runtime_config().elect(true);
            electing = true;
            info!(proven, "this node campaigns as a voter does (its log is proven, or it founds the cluster)");
        }
        if proven {
            return;
        }
    }
}

fn withhold_vote(unproven: &AtomicBool, seen_commit: &Mutex<(u64, u64)>, replica: &Replica, log: &LogStore, req: &VoteRequest) -> Option<PeerResponse> {
    if !unproven.load(Ordering::Relaxed) {
        return None;
    }
    let vote = replica.raft.server_metrics().borrow_watched().vote;
    let last = replica.raft.data_metrics().borrow_watched().last_log;
    let seen = *seen_commit.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match vote_rule(replica.id(), &vote, last.as_ref(), req.last_log_id.as_ref(), seen, !log.cut_damage()) {
        VoteRule::BroughtUp => {
            unproven.store(false, Ordering::Relaxed);
            None
        }
        VoteRule::Grant => None,
        VoteRule::Withhold if log.cut_damage() => {
            metrics::counter!("raftbridge_raft_votes_withheld_total", "reason" => "damaged_log").increment(1);
            warn!(candidate = req.vote.leader_id().node_id, "vote withheld: this node's log lost a damaged tail at its start and no leader has brought it up to date yet");
            Some(PeerResponse::Error(RemoteError::NotServed(
                "this node's log lost a damaged tail (maybe acknowledged entries): it votes once a leader has brought it up to date".into(),
            )))
        }
        VoteRule::Withhold => {
            metrics::counter!("raftbridge_raft_votes_withheld_total", "reason" => "empty_log").increment(1);
            info!(candidate = req.vote.leader_id().node_id, "vote withheld: this node started with an empty log and no leader has brought it up to date yet");
            Some(PeerResponse::Error(RemoteError::NotServed(
                "this node started with an empty log: it votes once a leader has brought it up to date".into(),
            )))
        }
    }
}

/// A vote for a founder other than the one whose mark this node's empty log holds
/// (`LogStore::founder_vote`): refused, so that two founders never both get elected.
fn refuse_rival_founder(log: &LogStore, req: &VoteRequest) -> Option<PeerResponse> {
    let candidate = req.vote.leader_id().node_id;
    match log.founder_vote(candidate, req.last_log_id.as_ref().map(|l| l.index)) {
        Ok(None) => None,
        Ok(Some(founder)) => {
            metrics::counter!("raftbridge_raft_votes_withheld_total", "reason" => "rival_founder").increment(1);
            info!(candidate, founder, "vote withheld: this node's empty log is marked as a founder of another node's cluster");
            Some(PeerResponse::Error(RemoteError::NotServed(format!(
                "this node's empty log is marked as a founder of node {founder}'s cluster: it votes for that node"
            ))))
        }
        Err(e) => Some(PeerResponse::Error(RemoteError::Internal(format!("reading the founder mark: {e}")))),
    }
}

/// What a node that started with an empty log does with a vote request (`withhold_vote`).
#[derive(Debug, PartialEq, Eq)]
enum VoteRule {
    /// Its log holds an entry of the term of the leader it follows: it votes as usual for good.
    BroughtUp,
    /// Not yet, but this candidate is safe to vote for (Raft's own checks still apply).
    Grant,
    Withhold,
}

/// The rule of `withhold_vote` on this node's `vote` and last log id, for a candidate whose log
/// ends at `candidate`; `seen`, the leader term and commit index a leader told it
/// (`note_commit`).
/// Brought up takes both an entry of its leader's term and a log that reaches `seen_commit`:
/// an entry of that term alone (the leader's first of it) may lie below entries this node
/// acknowledged before it lost its data and that were committed with its ack, and if the
/// leader's other voter is down meanwhile the leader cannot demote it (`cluster`), so its vote
/// could elect a node that lacks them. Every entry committed with its old acks is at or below
/// the commit index the leader sends it after its start.
/// A candidate whose log reaches that point of that leader's log (an entry of a later term, or
/// of that term at or past the index) holds, by log matching and leader completeness,
/// everything this node could have acknowledged before: its vote is safe even while this node
/// is not brought up itself (its leader gone before it caught up).
/// A node elected leader itself (`me`; a committed vote of its own and an entry of that term:
/// the cluster's founder, which no other leader ever sent an append) is brought up too: a
/// quorum found its log complete when it voted for it, and every entry it acknowledged since
/// is its own. (Had it lost data that a quorum counted, it would have lost it at that election,
/// not at a vote it gives later: any candidate it votes for must reach its leader's log.)
/// Not so for a log whose open cut off a damaged tail (`own_term_proves` false,
/// `LogStore::cut_damage`): what it lost may be entries of its own term it acknowledged as
/// leader, so only a leader's append can bring it up.
fn vote_rule(me: NodeId, vote: &Vote, last: Option<&LogId>, candidate: Option<&LogId>, seen: (u64, u64), own_term_proves: bool) -> VoteRule {
    let term = vote.leader_id().term;
    let (seen_term, seen_commit) = seen;
    if vote.is_committed() && seen_term == term && last.is_some_and(|l| l.committed_leader_id().term == term && l.index >= seen_commit) {
        return VoteRule::BroughtUp;
    }
    if own_term_proves && term > 0 && vote.is_committed() && vote.leader_id().node_id == me && last.is_some_and(|l| l.committed_leader_id().term == term) {
        return VoteRule::BroughtUp;
    }
    if candidate.is_none_or(|l| l.index == 0) {
        return VoteRule::Grant;
    }
    let reaches = |l: &LogId| {
        let t = l.committed_leader_id().term;
        t > seen_term || (t == seen_term && l.index >= seen_commit)
    };
    if seen_term > 0 && candidate.is_some_and(reaches) {
        return VoteRule::Grant;
    }
    VoteRule::Withhold
}

impl Handler for PeerHandler {
    fn handle(&self, from: NodeId, req: PeerRequest) -> BoxFuture<PeerResponse> {
        if req.raft_sender().is_some() {
            self.raft_seen.store(true, Ordering::Relaxed);
        }
        let req = match req {
            // Taken now, in arrival order: a leader may have several in flight.
            PeerRequest::AppendEntries(r) => {
                // Noted once openraft took it (`note_commit`): not an append it refused (a
                // lower term), nor the commit of one built before the leader saw this node's
                // log go back (it may still have counted the old acknowledgements then).
                let note = self.unproven.load(Ordering::Relaxed).then(|| (r.vote.leader_id().term, r.leader_commit.map_or(0, |c| c.index)));
                let seen_commit = self.seen_commit.clone();
                let served = self.appends.submit(from, r);
                let cluster = self.cluster.clone();
                return Box::pin(async move {
                    let served = served.await;
                    // In touch with the leader once its append is answered, not when it comes: a
                    // node whose disk stalled (its core waits on the log's sync) kept taking
                    // appends it never answered and said it was ready for as long as the stall.
                    if served.is_ok() {
                        cluster.note_append(from);
                    }
                    if let (Some((term, commit)), Ok(openraft::raft::AppendEntriesResponse::Success)) = (note, &served) {
                        note_commit(&seen_commit, term, commit);
                    }
                    served.map_or_else(|e| PeerResponse::Error(RemoteError::Internal(e)), PeerResponse::AppendEntries)
                });
            }
            other => other,
        };
        let replica = self.replica.clone();
        let cluster = self.cluster.clone();
        let snapshots = self.snapshots.clone();
        let proxy = self.proxy.clone();
        let dispatcher = self.dispatcher.clone();
        let broker = self.broker.clone();
        let pulls = self.pulls.clone();
        let unproven = self.unproven.clone();
        let seen_commit = self.seen_commit.clone();
        let log = self.log.clone();
        let raft_seen = self.raft_seen.clone();
        Box::pin(async move {
            let raft = &replica.raft;
            let fatal = |e: &dyn std::fmt::Display| PeerResponse::Error(RemoteError::Internal(e.to_string()));
            match req {
                // Served by `appends` above; kept for an exhaustive match.
                PeerRequest::AppendEntries(_) => fatal(&"append entries go through their lane"),
                PeerRequest::Vote(r) => match refuse_outsider(&cluster, from, &r)
                    .or_else(|| withhold_vote(&unproven, &seen_commit, &replica, &log, &r))
                    .or_else(|| refuse_rival_founder(&log, &r))
                {
                    Some(refused) => refused,
                    None => raft.vote(r).await.map_or_else(|e| fatal(&e), PeerResponse::Vote),
                },
                PeerRequest::PreVote(r) => match refuse_outsider(&cluster, from, &r).or_else(|| withhold_vote(&unproven, &seen_commit, &replica, &log, &r)) {
                    Some(refused) => refused,
                    None => raft.pre_vote(r).await.map_or_else(|e| fatal(&e), PeerResponse::Vote),
                },
                PeerRequest::SnapshotChunk { vote, meta, offset, data, done } => {
                    snapshot_chunk(&replica, &snapshots, from, vote, meta, offset, data, done).await
                }
                PeerRequest::TransferLeader(r) => match raft.handle_transfer_leader(r).await {
                    Ok(Ok(())) => PeerResponse::TransferLeader,
                    Ok(Err(e)) => PeerResponse::Error(RemoteError::Invalid(e.to_string())),
                    Err(e) => fatal(&e),
                },
                PeerRequest::Status => PeerResponse::Status(cluster.status()),
                PeerRequest::Write(cmd) => match replica.write_local(cmd).await {
                    Ok((index, result)) => PeerResponse::Written { index, result },
                    Err(e) => PeerResponse::Error(e),
                },
                PeerRequest::Invoke(inv) => proxy.serve_remote(inv).await,
                PeerRequest::InvokeWith { inv, headers } => proxy.serve_remote_with(inv, headers).await,
                PeerRequest::Deliver { sub, event } => dispatcher.serve_delivery(from, sub, event).await,
                PeerRequest::DeliverBatch { sub, events } => {
                    let each = replica.net.features(from) & crate::peer::frame::features::DELIVERED_EACH != 0;
                    dispatcher.serve_delivery_batch(from, sub, events, replica.net.max_frame_to(from), each).await
                }
                PeerRequest::AwaitDelivery { ticket } => dispatcher.serve_await_delivery(from, ticket).await,
                PeerRequest::WriteBatch(cmds) => {
                    let replayable: Vec<bool> = cmds.iter().map(|c| matches!(c, Command::IdemBegin { .. } | Command::IdemClaim { .. } | Command::IdemTake { .. })).collect();
                    // Sized for the link's frame (the smaller of both sides'), which the reply
                    // crosses: a reply over it would reach the follower as one error for all.
                    let frame = replica.net.max_frame_to(from);
                    PeerResponse::WrittenBatch(crate::raft::fit_answers(broker.write_forwarded(cmds).await, &replayable, frame))
                }
                PeerRequest::ReadIndex => replica.read_index_local().await.map_or_else(PeerResponse::Error, PeerResponse::ReadIndex),
                PeerRequest::Join { id, addr } => async { cluster.admits(from, id, Membership::Join)?; cluster.join(id, addr).await }
                    .await
                    .map_or_else(PeerResponse::Error, |()| PeerResponse::Done),
                PeerRequest::Remove { id } => async { cluster.admits(from, id, Membership::Remove)?; cluster.remove(id).await }
                    .await
                    .map_or_else(PeerResponse::Error, |()| PeerResponse::Done),
                PeerRequest::Found { members } => found(&replica, &log, &unproven, &raft_seen, from, members).await,
                PeerRequest::PullAnswer { sub, ids, verdict } => match pulls.answer_forwarded(&sub, &ids, verdict) {
                    Ok(unknown) => PeerResponse::PullAnswered { unknown },
                    Err(why) => PeerResponse::Error(RemoteError::Invalid(why)),
                },
            }
        })
    }
}

/// Adds a chunk of `from`'s snapshot (sent under `vote`; `key`: its last log index) to the
/// assemblies; the whole image once `done`. One snapshot is assembled at a time (from the leader
/// of the moment): a transfer that a crashed or deposed leader left half done goes when a new
/// one starts, so at most one image of `cap` bytes is held; a transfer under an older vote (from any
/// sender) does not displace one under a newer vote. A chunk that fits no transfer under way
/// (out of order, or a late one from a transfer its sender gave up) is refused without ending
/// the one under way: a stale chunk used to cost the current transfer. The sender restarts
/// from offset 0 after a refusal, which replaces the assembly.
#[allow(clippy::too_many_arguments)]
fn assemble(
    map: &mut HashMap<NodeId, Assembly>,
    cap: usize,
    from: NodeId,
    vote: &Vote,
    key: Option<u64>,
    offset: u64,
    data: &[u8],
    done: bool,
) -> Result<Option<Vec<u8>>, String> {
    if offset == 0 {
        if map.values().any(|a| a.0 > *vote) {
            return Err("snapshot from a leader of an older term than the transfer under way".into());
        }
        map.clear();
        map.insert(from, (*vote, key, Vec::new(), tokio::time::Instant::now()));
    }
    let Some(entry) = map.get_mut(&from) else { return Err(format!("snapshot chunk at {offset} of no transfer")) };
    if entry.0 != *vote || entry.1 != key || entry.2.len() as u64 != offset {
        return Err(format!("snapshot chunk at {offset} out of order"));
    }
    if entry.2.len() + data.len() > cap {
        map.remove(&from);
        return Err(format!("snapshot larger than {cap} bytes, what this node's bounds allow (--state-max-bytes and the like)"));
    }
    entry.2.extend_from_slice(data);
    entry.3 = tokio::time::Instant::now();
    if !done {
        return Ok(None);
    }
    Ok(map.remove(&from).map(|(_, _, bytes, _)| bytes))
}

#[allow(clippy::too_many_arguments)]
async fn snapshot_chunk(
    replica: &Replica,
    snapshots: &Snapshots,
    from: NodeId,
    vote: Vote,
    meta: SnapshotMeta,
    offset: u64,
    data: Vec<u8>,
    done: bool,
) -> PeerResponse {
    let invalid = |m: String| PeerResponse::Error(RemoteError::Invalid(m));
    let key = meta.last_log_id.map(|l| l.index);
    if !snapshots.admits(offset) {
        // The leader's replication tries again after its backoff.
        return PeerResponse::Error(RemoteError::Unavailable("an earlier snapshot is still being installed here".into()));
    }
    let complete = match assemble(&mut crate::lock(&snapshots.assembling), snapshots.cap, from, &vote, key, offset, &data, done) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return PeerResponse::Snapshot(None),
        Err(why) => return invalid(why),
    };
    let _installing = snapshots.installing();
    // An install error is fatal to openraft: check the image decodes before handing it over.
    // Off the runtime: a large image takes long to decode (and its copy to free), and with one
    // worker thread the node's links, pings and heartbeats would stop meanwhile.
    let checked = tokio::task::spawn_blocking(move || crate::raft::state_machine::decode_data(&complete).map(|d| (d.cluster_id(), complete))).await;
    let complete = match checked {
        // The handshake lets a link through when either side knew no id yet (a fresh node, or
        // one that has not learnt its id since it started): an image of another cluster's
        // history is refused here, where it would replace this node's state and its id.
        Ok(Ok((Some(theirs), _))) if replica.net.cluster_id().is_some_and(|ours| ours != theirs) => {
            return invalid(format!("a snapshot of cluster {theirs:032x}, not of this node's ({:032x})", replica.net.cluster_id().unwrap_or_default()));
        }
        Ok(Ok((_, complete))) => complete,
        Ok(Err(e)) => return invalid(e.to_string()),
        Err(e) => return PeerResponse::Error(RemoteError::Internal(format!("snapshot check: {e}"))),
    };
    match replica.raft.install_full_snapshot(vote, Snapshot { meta, snapshot: complete }).await {
        Ok(resp) => PeerResponse::Snapshot(Some(resp)),
        Err(e) => PeerResponse::Error(RemoteError::Internal(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-node cluster's config on free loopback ports, its data dir under the temp dir
    /// (named after `prefix`), and its HTTP address.
    fn single_node(prefix: &str) -> (NodeConfig, std::path::PathBuf, String) {
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let (peer, http) = (free(), free());
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", fastrand::u64(..)));
        let cfg = crate::config::NodeArgs {
            id: Some(1),
            data_dir: Some(dir.clone()),
            peer_addr: Some(peer.clone()),
            http_addr: Some(http.clone()),
            seeds: Some(vec![peer]),
            bootstrap_expect: Some(1),
            drain_delay_ms: Some(0),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        (cfg, dir, http)
    }

    /// A node that fails to start (here: its sidecar section is invalid, the last check) leaves
    /// nothing running: an application that runs it again must not find the first attempt's
    /// Raft core still writing the same log. Counted by the log's flusher threads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_fails_to_start_leaves_no_raft_core_running() {
        let _one = ONE_NODE_AT_A_TIME.lock().await;
        let flushers = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(Result::ok)
                .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "raft-log-flush"))
                .count()
        };
        assert_eq!(flushers(), 0, "no log open before the node starts");
        let (mut cfg, dir, _) = single_node("rb-failed-start");
        cfg.sidecar = Some(toml::from_str("upstream = \"not a url\"").unwrap());
        let ended = tokio::time::timeout(Duration::from_secs(60), run(cfg, Vec::new(), None, CancellationToken::new())).await;
        assert!(matches!(ended, Ok(Err(NodeError::Sidecar(_)))), "{ended:?}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while flushers() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "the failed start's raft log is still open after 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A snapshot of another cluster's history is refused, though its sender passed the
    /// handshake (it announced no cluster id, as a fresh node does, and a link is let through
    /// when either side knows none): installed, it replaced this node's state, and its id.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_of_another_cluster_is_refused() {
        use crate::raft::types::{LogId, SnapshotMeta, StoredMembershipT, TypeConfig, Vote};
        use openraft::vote::RaftLeaderIdExt;
        let _one = ONE_NODE_AT_A_TIME.lock().await;
        let (cfg, dir, http) = single_node("rb-foreign-snapshot");
        let (peer, cluster) = (cfg.peer_addr.clone(), cfg.cluster_name.clone());
        let shutdown = CancellationToken::new();
        let node = tokio::spawn(run(cfg, Vec::new(), None, shutdown.clone()));
        // Until the node's cluster has named itself (`/cluster` names its id).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let ours = loop {
            assert!(tokio::time::Instant::now() < deadline, "the node never named its cluster");
            if let Ok(mut conn) = tokio::net::TcpStream::connect(&http).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = conn.write_all(b"GET /cluster HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
                let mut text = String::new();
                let _ = conn.read_to_string(&mut text).await;
                let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
                if let Some(id) = serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v["cluster_id"].as_str().map(str::to_owned)) {
                    break id;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut foreign = crate::raft::state_machine::SmData::default();
        let theirs = crate::cluster::new_cluster_id();
        foreign.rename_cluster(theirs);
        let log_id = LogId::new(<TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(100, 2), 1_000);
        let membership = crate::raft::types::Membership::new(vec![std::collections::BTreeSet::from([2])], std::collections::BTreeMap::from([(2, BasicNode { addr: "127.0.0.1:1".into() })])).unwrap();
        let meta = SnapshotMeta { last_log_id: Some(log_id), last_membership: StoredMembershipT::new(Some(log_id), membership) };
        let data = crate::raft::state_machine::encode_image(&foreign).unwrap();
        let net = PeerNet::new(
            crate::peer::PeerConfig { node_id: 2, cluster, advertise: "127.0.0.1:1".into(), max_frame: 1 << 24, idle_timeout: Duration::from_secs(5), secret: None, tls: None, source_ip: None, cluster_id: Default::default(), recorded_features: Default::default() },
            CancellationToken::new(),
        );
        let req = PeerRequest::SnapshotChunk { vote: Vote::new_committed(100, 2), meta, offset: 0, data, done: true };
        let (_, answer) = net.request_addr(&peer, &req, Duration::from_secs(10)).await.expect("a link without a cluster id is let through");
        let said = format!("{answer:?}");
        assert!(said.contains(&format!("a snapshot of cluster {theirs:032x}")) && said.contains(&ours), "{said}");
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(60), node).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The tests that run a node watch the process's supervisor: one at a time when they share a
    /// process (`cargo test`; nextest gives each test its own).
    static ONE_NODE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Waits (bounded) until no supervised loop spawned after `mark` runs (this test's node's:
    /// see `ONE_NODE_AT_A_TIME`; other modules' tests may still add theirs under `cargo test`).
    async fn no_loops_left(mark: crate::supervise::Mark) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = crate::supervise::global().running_since(mark);
            if left.is_empty() {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "loops still running 10 s after the node returned: {left:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a node (`single_node`) and waits until it serves: its HTTP listener's loop runs
    /// (the socket is bound before that). Returns the run's task, its shutdown token, the
    /// supervisor's mark from before the start, its data dir and its HTTP address.
    async fn serving_node(prefix: &str) -> (tokio::task::JoinHandle<Result<(), NodeError>>, CancellationToken, crate::supervise::Mark, std::path::PathBuf, String) {
        let (cfg, dir, http) = single_node(prefix);
        let (shutdown, mark) = (CancellationToken::new(), crate::supervise::global().mark());
        let node = tokio::spawn(run(cfg, Vec::new(), None, shutdown.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !crate::supervise::global().running_since(mark).iter().any(|l| l == "HTTP listener") {
            assert!(tokio::time::Instant::now() < deadline, "the node never started serving {http}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (node, shutdown, mark, dir, http)
    }

    /// A node asked to stop returns `Ok` and leaves none of its loops running (the write
    /// forwarder and the node's parts stayed, held through the peer handler, before it was
    /// dropped with the links).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_asked_to_stop_leaves_no_loop_running() {
        let _one = ONE_NODE_AT_A_TIME.lock().await;
        let (node, shutdown, mark, dir, _) = serving_node("rb-stop").await;
        shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(60), node).await.expect("the node stops when asked").unwrap();
        assert!(ended.is_ok(), "{ended:?}");
        no_loops_left(mark).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A node whose `run` future is dropped (an application that stopped awaiting it) stops its
    /// loops with it: every stop token of the run is a child of one that fires on drop, and the
    /// peer handler goes too (its cycle kept the write forwarder).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_whose_run_is_dropped_leaves_no_loop_running() {
        let _one = ONE_NODE_AT_A_TIME.lock().await;
        let (node, _shutdown, mark, dir, _) = serving_node("rb-dropped").await;
        node.abort();
        assert!(node.await.unwrap_err().is_cancelled());
        no_loops_left(mark).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A node whose supervised loop panics drains and returns an error (so the binary exits 1),
    /// instead of staying up without it. The panic is injected through the process's supervisor,
    /// which is where every node loop is spawned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_whose_background_loop_panics_drains_and_exits_with_an_error() {
        let _one = ONE_NODE_AT_A_TIME.lock().await;
        let (node, shutdown, mark, dir, http) = serving_node("rb-supervise").await;
        crate::supervise::spawn("injected loop", async { panic!("injected for the test") });
        let ended = tokio::time::timeout(Duration::from_secs(60), node).await.expect("the node exits on its own").unwrap();
        match ended {
            Err(NodeError::LoopFailed(f)) => assert_eq!(f, crate::supervise::Failure { task: "injected loop".into(), ending: crate::supervise::Ending::Panicked("injected for the test".into()) }),
            other => panic!("expected LoopFailed, got {other:?}"),
        }
        assert!(!shutdown.is_cancelled(), "nobody asked the node to stop");
        assert!(tokio::net::TcpStream::connect(&http).await.is_err(), "the stopped node no longer listens");
        // None of its loops outlives the run (the certificate reload loop did, until the caller's
        // `shutdown` fired: an application that ran the node again had two of them).
        no_loops_left(mark).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A certificate near its expiry is warned about, at most once an hour; one far from it is not.
    #[tokio::test(start_paused = true)]
    async fn expiry_is_warned_about_within_a_week_at_most_hourly() {
        let now = std::time::SystemTime::now();
        let day = Duration::from_secs(86_400);
        let mut warned = None;
        note_expiry("https", now + 30 * day, now, &mut warned);
        assert!(warned.is_none(), "a month left: no warning");
        note_expiry("https", now + 2 * day, now, &mut warned);
        let first = warned.expect("two days left: warned");
        tokio::time::advance(Duration::from_secs(600)).await;
        note_expiry("https", now + 2 * day, now, &mut warned);
        assert_eq!(warned, Some(first), "not again within the hour");
        tokio::time::advance(Duration::from_secs(3600)).await;
        note_expiry("https", now - day, now, &mut warned);
        assert!(warned.is_some_and(|t| t > first), "expired, an hour later: warned again");
    }

    #[test]
    fn one_subscription_name_twice_on_a_node_is_refused_at_start() {
        use crate::sdk::demo::demo_service;
        assert!(check_subscription_names(&[demo_service()], None, None).is_ok());
        let twice = check_subscription_names(&[demo_service(), demo_service()], None, None).unwrap_err();
        assert!(twice.to_string().contains("\"countOrders\" is declared twice"), "{twice}");
        let sidecar: crate::sidecar::SidecarConfig = toml::from_str(
            "upstream = \"http://127.0.0.1:1\"\n[[subscriptions]]\nname = \"auditOrders\"\nservice = \"orders\"\npath = \"/audit\"\n",
        )
        .unwrap();
        let clash = check_subscription_names(&[demo_service()], Some(&sidecar), None).unwrap_err();
        assert!(clash.to_string().contains("demo v1 and orders v1"), "{clash}");
        assert!(check_subscription_names(&[], Some(&sidecar), None).is_ok());
        let pull: crate::broker::pull::PullConfig = toml::from_str("[[subscriptions]]\nname = \"auditOrders\"\n").unwrap();
        let clash = check_subscription_names(&[], Some(&sidecar), Some(&pull)).unwrap_err();
        assert!(clash.to_string().contains("orders v1 and pull v1"), "{clash}");
        assert!(check_subscription_names(&[demo_service()], None, Some(&toml::from_str("[[subscriptions]]\nname = \"jobs\"\n").unwrap())).is_ok());
    }

    /// A node that started with an empty log withholds its vote until it holds an entry of its
    /// leader's term, except from a candidate forming the cluster; then it votes as usual. Even
    /// a candidate whose log reaches that term is refused: after lost data, this node may have
    /// acknowledged entries of that term that the candidate lacks.
    #[test]
    fn an_unproven_node_votes_only_to_form_the_cluster_until_brought_up() {
        use openraft::RaftTypeConfig;
        use openraft::vote::RaftLeaderIdExt;
        let id = |term: u64, index: u64| LogId::new(<TypeConfig as RaftTypeConfig>::LeaderId::new_committed(term, 1), index);
        let following_1 = Vote::new_committed(1, 1);
        let bootstrap = id(0, 0);
        assert_eq!(vote_rule(9, &following_1, Some(&bootstrap), Some(&bootstrap), (0, 0), true), VoteRule::Grant, "forming");
        assert_eq!(vote_rule(9, &following_1, None, None, (0, 0), true), VoteRule::Grant, "forming, no log yet");
        assert_eq!(vote_rule(9, &following_1, Some(&bootstrap), Some(&id(1, 1)), (0, 0), true), VoteRule::Withhold);
        let following_5 = Vote::new_committed(5, 2);
        assert_eq!(vote_rule(9, &following_5, None, Some(&id(5, 10)), (0, 0), true), VoteRule::Withhold, "may lack term-5 entries");
        assert_eq!(vote_rule(9, &following_5, Some(&id(4, 40)), Some(&id(4, 90)), (0, 0), true), VoteRule::Withhold);
        assert_eq!(vote_rule(9, &Vote::new(5, 2), Some(&id(5, 41)), Some(&id(5, 41)), (0, 0), true), VoteRule::Withhold, "never followed a leader");
        assert_eq!(vote_rule(9, &following_5, Some(&id(5, 41)), Some(&id(4, 1)), (5, 41), true), VoteRule::BroughtUp);
        // An entry of the leader's term below what the leader said was committed is not enough:
        // the node may have acknowledged entries up to there before it lost its data, and a
        // candidate without them (here one at 45 of term 4) must not win with its vote.
        assert_eq!(vote_rule(9, &following_5, Some(&id(5, 41)), Some(&id(4, 45)), (5, 60), true), VoteRule::Withhold);
        assert_eq!(vote_rule(9, &following_5, Some(&id(5, 60)), Some(&id(4, 45)), (5, 60), true), VoteRule::BroughtUp);
        // The first commit index of each higher term counts, not the latest: a follower a few
        // entries behind its leader at the next election is brought up all the same.
        let seen = Mutex::new((0, 0));
        note_commit(&seen, 4, 30);
        note_commit(&seen, 5, 60);
        note_commit(&seen, 5, 90);
        note_commit(&seen, 4, 95);
        assert_eq!(*seen.lock().unwrap(), (5, 60));
        // Not brought up (its leader went before it caught up), it may still vote for a
        // candidate that reaches what the leader said was committed: one with an entry of that
        // term at or past it, or of a later term; not one short of it.
        assert_eq!(vote_rule(9, &following_5, Some(&id(5, 41)), Some(&id(5, 60)), (5, 60), true), VoteRule::Grant);
        assert_eq!(vote_rule(9, &following_5, Some(&id(5, 41)), Some(&id(6, 50)), (5, 60), true), VoteRule::Grant);
        assert_eq!(vote_rule(9, &following_5, Some(&id(5, 41)), Some(&id(5, 59)), (5, 60), true), VoteRule::Withhold);
        // Elected itself (the founder, which no leader ever sent an append): brought up once it
        // holds an entry of its own term; not while only a candidate, nor before that entry.
        assert_eq!(vote_rule(2, &following_5, Some(&id(5, 41)), Some(&id(4, 1)), (0, 0), true), VoteRule::BroughtUp, "leads term 5");
        assert_eq!(
            vote_rule(2, &following_5, Some(&id(5, 41)), Some(&id(4, 1)), (0, 0), false),
            VoteRule::Withhold,
            "leads term 5, but its log lost a damaged tail: it may have acknowledged more of its term"
        );
        assert_eq!(vote_rule(2, &following_5, Some(&id(5, 60)), Some(&id(4, 1)), (5, 60), false), VoteRule::BroughtUp, "a leader's append still brings it up");
        assert_eq!(vote_rule(2, &Vote::new(5, 2), Some(&id(5, 41)), Some(&id(4, 1)), (0, 0), true), VoteRule::Withhold, "only a candidate");
        assert_eq!(vote_rule(2, &following_5, Some(&id(4, 40)), Some(&id(4, 1)), (0, 0), true), VoteRule::Withhold, "no entry of its term yet");
    }

    #[test]
    fn a_snapshot_is_assembled_in_order_one_transfer_at_a_time() {
        let mut map = HashMap::new();
        let (v1, v2) = (Vote::new_committed(1, 1), Vote::new_committed(2, 2));
        let mut add = |from, vote: &Vote, key, offset, data: &[u8], done| assemble(&mut map, 1 << 20, from, vote, key, offset, data, done);
        assert_eq!(add(1, &v1, Some(9), 0, b"ab", false), Ok(None));
        assert_eq!(add(1, &v1, Some(9), 2, b"cd", true), Ok(Some(b"abcd".to_vec())));
        // A leader that died half way: the next leader's transfer replaces its partial image.
        assert_eq!(add(1, &v1, Some(9), 0, &[7; 1000], false), Ok(None));
        assert_eq!(add(2, &v2, Some(12), 0, b"x", false), Ok(None));
        assert!(add(1, &v1, Some(9), 1000, b"y", true).is_err(), "the old transfer is gone");
        // The deposed leader cannot restart over the newer one's transfer.
        assert!(add(1, &v1, Some(9), 0, b"z", false).is_err());
        assert_eq!(add(2, &v2, Some(12), 1, b"y", true), Ok(Some(b"xy".to_vec())));
        // Out of order, or another snapshot's chunk (a late one from a transfer given up):
        // refused, and the transfer under way goes on.
        assert_eq!(add(3, &v2, Some(5), 0, b"a", false), Ok(None));
        assert!(add(3, &v2, Some(5), 5, b"b", false).is_err());
        assert!(add(3, &v2, Some(6), 1, b"b", true).is_err());
        assert!(add(3, &Vote::new_committed(1, 3), Some(5), 1, b"b", true).is_err());
        // The same sender under an older vote cannot restart over it either.
        assert!(add(3, &Vote::new_committed(1, 3), Some(5), 0, b"z", false).is_err());
        assert_eq!(add(3, &v2, Some(5), 1, b"b", true), Ok(Some(b"ab".to_vec())));
        assert!(map.is_empty(), "nothing is kept of a finished transfer");
    }

    /// While an assembled image is being installed, a new transfer is refused at its first
    /// chunk (the chunks of one under way go on); once the install ends, one is taken again.
    #[test]
    fn a_new_snapshot_transfer_waits_for_the_install_under_way() {
        let snapshots = Snapshots::new(1 << 20);
        assert!(snapshots.admits(0));
        let installing = snapshots.installing();
        assert!(!snapshots.admits(0), "a new transfer waits");
        assert!(snapshots.admits(4096), "a transfer under way goes on");
        let second = snapshots.installing();
        drop(installing);
        assert!(!snapshots.admits(0));
        drop(second);
        assert!(snapshots.admits(0), "taken again once no install is under way");
    }

    /// The node's listeners hold `LISTEN_BACKLOG` connections that are not accepted yet: with
    /// the 128 `TcpListener::bind` asks for, the 129th connect of a burst waited for a SYN
    /// retransmit (a second), here past the connects' timeout.
    #[tokio::test]
    async fn a_listener_holds_a_burst_of_connections_until_they_are_accepted() {
        let listener = listen("127.0.0.1:0").await.expect("bound");
        let addr = listener.local_addr().unwrap();
        // The kernel caps a backlog at `net.core.somaxconn` (4,096 on current kernels).
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|s| s.trim().parse::<usize>().ok()).unwrap_or(128);
        let n = somaxconn.min(LISTEN_BACKLOG as usize).min(400).saturating_sub(8);
        let connects = tokio::task::spawn_blocking(move || {
            let mut held = Vec::new();
            for i in 0..n {
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                    Ok(s) => held.push(s),
                    Err(e) => return Err(format!("connect {i}: {e}")),
                }
            }
            Ok(held.len())
        });
        assert_eq!(connects.await.unwrap(), Ok(n), "none accepted, all held");
        drop(listener);
        assert!(listen("256.1.1.1:80").await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_transfer_without_chunks_is_dropped_after_the_idle_time() {
        let snapshots = Snapshots::new(1 << 20);
        let v1 = Vote::new_committed(1, 1);
        let add = |offset, data: &[u8]| assemble(&mut crate::lock(&snapshots.assembling), 1 << 20, 1, &v1, Some(9), offset, data, false);
        assert_eq!(add(0, &[1; 1000]), Ok(None));
        tokio::time::advance(ASSEMBLY_IDLE - Duration::from_secs(1)).await;
        assert!(!snapshots.expire(tokio::time::Instant::now()), "a transfer within the idle time is kept");
        // Each chunk starts the wait again.
        assert_eq!(add(1000, b"x"), Ok(None));
        tokio::time::advance(ASSEMBLY_IDLE - Duration::from_secs(1)).await;
        assert!(!snapshots.expire(tokio::time::Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(snapshots.expire(tokio::time::Instant::now()), "a sender that went silent: its image is dropped");
        assert!(crate::lock(&snapshots.assembling).is_empty());
        assert!(add(1001, b"y").is_err(), "a late chunk of it fits no transfer");
    }

    #[test]
    fn log_guard_builds_one_snapshot_at_a_time_and_purges_after_it() {
        let mut g = GuardState::default();
        // No snapshot yet: ask for one, then wait while applied keeps moving.
        assert_eq!(g.step(Some(100), None), GuardAction::Snapshot);
        for applied in 101..110 {
            assert_eq!(g.step(Some(applied), None), GuardAction::Wait, "no second snapshot while one is built");
        }
        // The snapshot is done: purge up to it, once.
        assert_eq!(g.step(Some(120), Some(100)), GuardAction::Purge(100));
        // Still over the bound (the purge freed too little): a new snapshot, not the same purge.
        assert_eq!(g.step(Some(130), Some(100)), GuardAction::Snapshot);
        assert_eq!(g.step(Some(140), Some(100)), GuardAction::Wait);
        assert_eq!(g.step(Some(150), Some(130)), GuardAction::Purge(130));
    }

    #[test]
    fn log_guard_asks_again_when_a_snapshot_never_comes() {
        let mut g = GuardState::default();
        assert_eq!(g.step(Some(10), None), GuardAction::Snapshot);
        for _ in 0..SNAPSHOT_PATIENCE_TICKS {
            assert_eq!(g.step(Some(11), None), GuardAction::Wait);
        }
        assert_eq!(g.step(Some(12), None), GuardAction::Snapshot);
    }

    #[test]
    fn log_byte_bounds_differ_per_node() {
        let bounds: Vec<u64> = (1..=4).map(log_max_bytes).collect();
        assert!(bounds.iter().all(|b| *b >= LOG_MAX_BYTES && *b < 2 * LOG_MAX_BYTES));
        let mut distinct = bounds.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), 4, "consecutive ids snapshot at different log sizes: {bounds:?}");
    }

    /// A handler's read-modify-write through the SDK: `get_with_revision` then
    /// `put_if_revision`, retried on a 409, loses no update among concurrent runs (each of
    /// them sees a value no other saw); `list` pages a prefix with revisions; and
    /// `delete_if_revision` deletes only at the revision it names; concurrent `transaction`s
    /// that move a unit between two keys on the revisions they read keep the keys' sum. A one-node cluster with a
    /// service of its own, called over HTTP as a client would.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_sdk_read_modify_write_with_revisions_loses_no_update() {
        use crate::sdk::builder::CommandBuilder;
        use crate::sdk::builder::Service;
        use crate::sdk::Ctx;
        use crate::sdk::HandlerError;
        use serde_json::json;

        #[derive(serde::Deserialize)]
        struct Name {
            name: String,
        }
        async fn bump(ctx: Ctx, _: serde::de::IgnoredAny, p: Name) -> Result<serde_json::Value, HandlerError> {
            for _ in 0..500 {
                let seen = ctx.state().get_with_revision::<u64>("cas", &p.name).await?;
                let (value, revision) = seen.map_or((0, 0), |s| (s.value, s.revision));
                match ctx.state().put_if_revision("cas", &p.name, &(value + 1), revision).await {
                    Ok(_) => return Ok(json!(value + 1)),
                    Err(e) if e.status == 409 => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(HandlerError::unhandled("500 lost races in a row"))
        }
        async fn keys(ctx: Ctx, _: serde::de::IgnoredAny, _: ()) -> Result<serde_json::Value, HandlerError> {
            let (mut all, mut after, mut pages) = (Vec::new(), None::<String>, 0);
            for _ in 0..100 {
                let page = ctx.state().list::<u64>("cas", "n", after.as_deref(), 2).await?;
                pages += 1;
                all.extend(page.items.into_iter().map(|(k, r)| json!([k, r.value, r.revision])));
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            Ok(json!({"keys": all, "pages": pages}))
        }
        async fn drop_at(ctx: Ctx, body: serde_json::Value, p: Name) -> Result<serde_json::Value, HandlerError> {
            let revision = body["revision"].as_u64().ok_or_else(|| HandlerError::bad_request("revision"))?;
            Ok(json!({"existed": ctx.state().delete_if_revision("cas", &p.name, revision).await?}))
        }
        // Moves 1 from key `from` to key `to` (absent = 0) in one transaction on the revisions
        // it read, again after a lost race: the two keys always sum to 0.
        async fn transfer(ctx: Ctx, _: serde::de::IgnoredAny, _: ()) -> Result<serde_json::Value, HandlerError> {
            for _ in 0..500 {
                let read = |key: &'static str| {
                    let ctx = ctx.clone();
                    async move { Ok::<_, HandlerError>(ctx.state().get_with_revision::<i64>("cas", key).await?.map_or((0, 0), |r| (r.value, r.revision))) }
                };
                let ((from, from_rev), (to, to_rev)) = (read("from").await?, read("to").await?);
                let mut txn = crate::sdk::Txn::new();
                txn.put("from", &(from - 1), Some(from_rev))?.put("to", &(to + 1), Some(to_rev))?;
                match ctx.state().transaction("cas", txn).await {
                    Ok(revision) => return Ok(json!(revision)),
                    Err(e) if e.status == 409 => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(HandlerError::unhandled("500 lost races in a row"))
        }
        let service = Service::new("casdemo", 1)
            .command(CommandBuilder::post("transfer", "transfer").handler(transfer))
            .command(CommandBuilder::post("bump", "bump/:name").handler(bump))
            .command(CommandBuilder::get("keys", "keys").idempotent(true).handler(keys))
            .command(CommandBuilder::post("drop", "drop/:name").handler(drop_at))
            .into_parts()
            .expect("valid declarations");

        let _one = ONE_NODE_AT_A_TIME.lock().await;
        let (cfg, dir, http) = single_node("rb-sdk-cas");
        let (shutdown, mark) = (CancellationToken::new(), crate::supervise::global().mark());
        let node = tokio::spawn(run(cfg, vec![service], None, shutdown.clone()));
        let t = Duration::from_secs(30);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut conn = crate::client::Conn::new(http.clone());
        while !conn.get("/readyz", t).await.is_ok_and(|r| r.status == 200) {
            assert!(tokio::time::Instant::now() < deadline, "the node never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let post = |path: String, body: serde_json::Value| {
            let http = http.clone();
            async move {
                let mut conn = crate::client::Conn::new(http);
                conn.request(http::Method::POST, &path, &[], bytes::Bytes::from(body.to_string()), t).await.expect("a request")
            }
        };
        let runs: Vec<_> = (0..16).map(|_| tokio::spawn(post("/api/v1/bump/n1".into(), json!({})))).collect();
        let mut seen = Vec::new();
        for run in runs {
            let resp = run.await.unwrap();
            assert_eq!(resp.status, 200, "{:?}", resp.body);
            seen.push(resp.json::<u64>().unwrap());
        }
        seen.sort_unstable();
        assert_eq!(seen, (1..=16).collect::<Vec<u64>>(), "each concurrent run saw a value no other saw");
        let runs: Vec<_> = (0..12).map(|_| tokio::spawn(post("/api/v1/transfer".into(), json!({})))).collect();
        let mut revisions = Vec::new();
        for run in runs {
            let resp = run.await.unwrap();
            assert_eq!(resp.status, 200, "{:?}", resp.body);
            revisions.push(resp.json::<u64>().unwrap());
        }
        revisions.sort_unstable();
        revisions.dedup();
        assert_eq!(revisions.len(), 12, "each transfer committed on its own");
        let value = |resp: crate::client::Response| (resp.json::<i64>().unwrap(), resp.headers["x-revision"].to_str().unwrap().parse::<u64>().unwrap());
        let (from, from_rev) = value(conn.get("/v1/state/cas/from", t).await.unwrap());
        let (to, to_rev) = value(conn.get("/v1/state/cas/to", t).await.unwrap());
        assert_eq!((from, to), (-12, 12), "no transfer lost or applied twice");
        assert_eq!(from_rev, to_rev, "both keys written by one transaction, under one revision");
        for name in ["n2", "n3", "other"] {
            assert_eq!(post(format!("/api/v1/bump/{name}"), json!({})).await.status, 200);
        }
        let stored = conn.get("/v1/state/cas/n1", t).await.unwrap();
        assert_eq!((stored.status, stored.json::<u64>().unwrap()), (200, 16));
        let n2_revision: u64 = conn.get("/v1/state/cas/n2", t).await.unwrap().headers["x-revision"].to_str().unwrap().parse().unwrap();

        let listed: serde_json::Value = conn.get("/api/v1/keys", t).await.unwrap().json().unwrap();
        let keys: Vec<(String, u64)> = listed["keys"].as_array().unwrap().iter().map(|k| (k[0].as_str().unwrap().to_string(), k[1].as_u64().unwrap())).collect();
        assert_eq!(keys, vec![("n1".to_string(), 16), ("n2".to_string(), 1), ("n3".to_string(), 1)], "{listed}");
        assert_eq!(listed["pages"], 2, "two keys a page: {listed}");
        assert_eq!(listed["keys"][1][2], n2_revision, "the listing's revision is the key's: {listed}");

        let stale = post("/api/v1/drop/n2".into(), json!({"revision": n2_revision - 1})).await;
        assert_eq!(stale.status, 409, "a delete at a revision the key no longer has: {:?}", stale.body);
        assert_eq!(conn.get("/v1/state/cas/n2", t).await.unwrap().status, 200, "the stale delete removed nothing");
        let dropped = post("/api/v1/drop/n2".into(), json!({"revision": n2_revision})).await;
        assert_eq!((dropped.status, dropped.json::<serde_json::Value>().unwrap()), (200, json!({"existed": true})));
        assert_eq!(conn.get("/v1/state/cas/n2", t).await.unwrap().status, 404, "deleted at its revision");

        shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(60), node).await.expect("the node stops when asked").unwrap();
        assert!(ended.is_ok(), "{ended:?}");
        no_loops_left(mark).await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
