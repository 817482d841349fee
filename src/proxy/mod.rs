//! The proxy: any node takes a `METHOD /api/v{version}/{path}` request, runs the command on a
//! node that offers it, and answers with the result.
//!
//! The request passes an explicit stack of small layers, outermost first; each sits where it does
//! for a reason:
//! 1. `trace` — `x-request-id`/`traceparent` are read or created first, so every answer (errors
//!    included) echoes them and every hop passes them on.
//! 2. `route` — the cached routing table names the command (404/405 before any work).
//! 3. `liveness` — only nodes with a live peer link (or this node) are candidates; none → 503 at
//!    once, never a timeout.
//! 4. `deadline` — the client's: the command's timeout, shortened by `x-timeout-ms` (→ 504 when
//!    it passes); the command itself runs under its own timeout (→ 504 too), and remote nodes
//!    get the *remaining* time of that.
//! 5. `body` — bounded read (413), parameters (400) and the headers passed to a sidecar's app
//!    (431, `headers.rs`); only now is memory spent on the request.
//! 6. `detach` — from here on a client that disconnects, or whose deadline passes, does not cut
//!    the command short: what is left of it finishes in a task of its own, holding what the
//!    request held (bounded in number, waited for at drain), so no handler stops between its
//!    write and its emit.
//! 7. `idempotency` — with `Idempotency-Key`, the first finished result is replayed and
//!    concurrent duplicates wait for it (`idempotency.rs`).
//! 8. `retry` — another node only when safe (never delivered, idempotent command, or keyed),
//!    within the retry budget (`balance.rs`).
//! 9. `balance` — power of two choices, outlier ejection, a bound on in-flight requests per peer.
//! 10. `dispatch` — the local handler, or `PeerRequest::InvokeWith` (`Invoke` to a build without
//!     `features::APP_HEADERS`) over the peer link.

pub mod balance;
pub mod headers;
pub mod idempotency;
pub mod registry;
pub mod routing;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http::HeaderValue;
use http::StatusCode;
use http_body_util::Full;
use hyper::Request;
use hyper::Response;
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::debug;

use self::balance::Outcome;
use self::balance::RetryBudget;
use self::routing::Lookup;
use self::routing::Route;
use self::routing::RouteTable;
use self::routing::SharedTable;
use crate::lock;
use crate::api::error::ApiError;
use crate::peer::PeerError;
use crate::peer::PeerNet;
use crate::peer::message::PeerRequest;
use crate::peer::message::PeerResponse;
use crate::peer::message::RemoteError;
use crate::raft::state_machine::SmShared;
use crate::raft::types::NodeId;
use crate::sdk::CommandHandler;
use crate::sdk::Ctx;
use crate::sdk::HandlerError;
use crate::sdk::Invocation;
use crate::sdk::MessageMeta;
use crate::sdk::Output;
use crate::sdk::ServiceDecl;
use crate::sdk::ServiceParts;
use crate::store::StateStore;

/// Attempts per request at most (first try + retries).
const MAX_ATTEMPTS: usize = 3;
/// Why a command offered here is refused while its handler is not available.
const UNAVAILABLE: &str = "the command's app is down here";
/// Longest path and query of a command request, in bytes (its parameters travel in the peer
/// frame with the body, and are copied per attempt): nginx answers 414 past 8 KiB by default.
pub const MAX_URI: usize = 16 << 10;

#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Run on this node when it offers the command and is healthy.
    pub local_first: bool,
    /// Forwarded requests in flight to one peer at most; beyond, that peer is skipped.
    /// `COMMANDS_PER_PEER` in a node.
    pub max_inflight_per_peer: usize,
    /// How long an idempotency key's result is kept.
    pub idempotency_window: Duration,
    /// Idempotency records kept at most, by count and by weight (`--dedup-max-keys`,
    /// `--idempotency-max-bytes`): beyond either, the oldest are forgotten before their window.
    pub idempotency_max_keys: usize,
    pub idempotency_max_bytes: u64,
    /// A command's answer body at most (half of `--max-frame`): it crosses a peer link as one
    /// frame, and under an idempotency key it is stored in one Raft entry. A larger answer
    /// would close the link (the codec refuses it) or stall the log, so it becomes a 502.
    pub max_output: usize,
}

/// The replicated key of an idempotent request: the client's key scoped by command, so one key
/// reused for another command neither replays a wrong answer nor has its writes (tagged with
/// this key) answered from the other command's record; and by tenant (`x-tenant-id`), so one
/// tenant's key never replays another tenant's answer. Line breaks enclose the tenant: header
/// values cannot hold one, so no other key or tenant takes that form. Without a tenant the form
/// is the one records were kept under before tenants counted.
pub fn idempotency_scope(service: &str, version: u32, command: &str, tenant: Option<&str>, key: &str) -> String {
    match tenant {
        None => format!("{service}/v{version}/{command}:{key}"),
        Some(t) => format!("{service}/v{version}/{command}\n{t}\n{key}"),
    }
}

/// The handlers this node runs, by (service, version, command).
pub struct LocalServices {
    handlers: HashMap<(String, u32, String), Arc<dyn CommandHandler>>,
    /// Commands whose successful results are also emitted as events.
    success_events: HashMap<(String, u32, String), String>,
    decls: Vec<ServiceDecl>,
}

impl LocalServices {
    pub fn new(parts: Vec<ServiceParts>) -> LocalServices {
        let mut handlers = HashMap::new();
        let mut success_events = HashMap::new();
        let mut decls = Vec::new();
        for p in parts {
            for c in &p.decl.commands {
                if let Some(e) = &c.success_event {
                    success_events.insert((p.decl.name.clone(), p.decl.version, c.name.clone()), e.clone());
                }
            }
            for (name, h) in p.handlers {
                handlers.insert((p.decl.name.clone(), p.decl.version, name), h);
            }
            decls.push(p.decl);
        }
        LocalServices { handlers, success_events, decls }
    }

    pub fn decls(&self) -> &[ServiceDecl] {
        &self.decls
    }

    fn get(&self, service: &str, version: u32, command: &str) -> Option<Arc<dyn CommandHandler>> {
        self.handlers.get(&(service.to_string(), version, command.to_string())).cloned()
    }
}

/// Why an attempt on one node did not produce an answer.
enum Miss {
    /// No handler ran: safe to try another node.
    NotServed(String),
    /// The request may have reached a handler; its fate is unknown.
    Lost(String),
    /// The request is more than a peer frame holds: no node could take it (nothing was sent).
    TooLarge(String),
    /// This node already has `--max-inflight-per-peer` requests out to the target: nothing was
    /// sent, and nothing is known of the target.
    Busy(String),
}

pub struct Proxy {
    node_id: NodeId,
    /// Whether this node is ready (in a cluster with a leader): an unready node runs nothing.
    cluster: crate::cluster::Cluster,
    /// For handlers' `ctx.emit`.
    broker: Arc<crate::broker::Broker>,
    store: StateStore,
    net: Arc<PeerNet>,
    sm: Arc<SmShared>,
    local: LocalServices,
    table: Mutex<SharedTable>,
    /// One balancer per service version (`balancer_for`): latency, load and outlier ejection
    /// are judged per service, as Envoy judges hosts per cluster. One for all let a service
    /// whose handler fails (or a client whose input makes it fail) eject the node for every
    /// other service's commands too.
    balancers: balance::Balancers,
    budget: RetryBudget,
    peer_slots: Mutex<HashMap<NodeId, Arc<Semaphore>>>,
    settings: ProxySettings,
    /// Set when the node starts draining: remote invocations are refused (`NotServed`).
    draining: AtomicBool,
    /// The commands whose clients left before they ended, each finishing in a task of its own
    /// (`Detachable`): waited for by the node's shutdown (`commands_finished`) before the broker
    /// and the links stop, so that none is cut off between its write and its emit.
    running: tokio_util::task::TaskTracker,
    /// At most `MAX_RUNNING` client commands at once: a client that disconnects right after
    /// sending no longer ends its command, so without a bound one could start any number.
    /// Commands called from handlers (`call_from_handler`) take one each too.
    running_slots: Arc<Semaphore>,
    /// What this node's handlers call commands through (`Ctx::invoke`), set once by
    /// `handler_calls` after the proxy is shared: it holds the proxy weakly.
    calls: std::sync::OnceLock<Arc<dyn crate::sdk::Invoker>>,
}

/// `sdk::Invoker` for this node's handlers: the proxy, held weakly (the proxy holds the
/// services whose handlers' contexts hold this, and a stopped node's proxy must go).
struct HandlerCalls(std::sync::Weak<Proxy>);

impl crate::sdk::Invoker for HandlerCalls {
    fn invoke(&self, inv: Invocation, key: Option<String>) -> crate::sdk::BoxFuture<Result<Output, HandlerError>> {
        let proxy = self.0.upgrade();
        Box::pin(async move {
            match proxy {
                Some(proxy) => proxy.call_from_handler(inv, key).await,
                None => Err(HandlerError::new(503, "the node is stopping")),
            }
        })
    }
}

/// Runs a command in place (no task hop while its client waits) and, if it is dropped before
/// the command ends (hyper drops a request's future when its client goes away), hands the rest
/// to `tracker` to finish in a task of its own: a handler is never cut off part-way.
struct Detachable<F: Future + Send + 'static> {
    /// `None` once finished; pinned on the heap, so what is left can move into a task.
    run: Option<Pin<Box<F>>>,
    tracker: tokio_util::task::TaskTracker,
}

impl<F: Future + Send + 'static> Future for Detachable<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let Some(run) = self.run.as_mut() else { return std::task::Poll::Pending };
        let out = run.as_mut().poll(cx);
        if out.is_ready() {
            self.run = None;
        }
        out
    }
}

impl<F: Future + Send + 'static> Drop for Detachable<F> {
    fn drop(&mut self) {
        // Outside a runtime (the process ending) there is nothing to finish it on.
        if let (Some(run), Ok(rt)) = (self.run.take(), tokio::runtime::Handle::try_current()) {
            metrics::counter!("raftbridge_proxy_commands_detached_total").increment(1);
            self.tracker.spawn_on(
                async move {
                    let _ = run.await;
                },
                &rt,
            );
        }
    }
}

/// How often the routing table is brought up to the registry without a request (`refresh_routes`).
const ROUTES_REFRESH: Duration = Duration::from_secs(1);

/// Commands a node has in flight on one peer at most (`ProxySettings::max_inflight_per_peer`):
/// less than the requests a link carries and a peer serves at once (`peer`'s `MAX_SERVING`,
/// 1,024), so that commands, which may each run for their timeout (past their clients'
/// deadlines too), leave room for the forwarded writes, deliveries and reads on the same link.
pub const COMMANDS_PER_PEER: usize = 768;

/// Client commands running at once on a node at most (`Proxy::running_slots`); past it a new
/// one is a 503 with `Retry-After`.
const MAX_RUNNING: usize = 16_384;

impl Proxy {
    pub fn new(
        node_id: NodeId,
        cluster: crate::cluster::Cluster,
        broker: Arc<crate::broker::Broker>,
        store: StateStore,
        local: LocalServices,
        settings: ProxySettings,
    ) -> Proxy {
        let net = store.replica().net.clone();
        let sm = store.local().clone();
        Proxy {
            node_id,
            cluster,
            broker,
            store,
            net,
            sm,
            local,
            table: Mutex::new(Arc::new(RouteTable::default())),
            balancers: balance::Balancers::default(),
            budget: RetryBudget::default(),
            running: tokio_util::task::TaskTracker::new(),
            running_slots: Arc::new(Semaphore::new(MAX_RUNNING)),
            calls: std::sync::OnceLock::new(),
            peer_slots: Mutex::new(HashMap::new()),
            settings,
            draining: AtomicBool::new(false),
        }
    }

    pub fn local(&self) -> &LocalServices {
        &self.local
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The routing table for the current registry (rebuilt when the registry changed, or when a
    /// departed node's commands are due to be forgotten: `RouteTable::next`).
    pub fn table(&self) -> SharedTable {
        let revision = self.sm.registry_revision();
        let now = tokio::time::Instant::now();
        let mut cached = lock(&self.table);
        if cached.revision == revision && revision != 0 && cached.expires().is_none_or(|at| now < at) {
            return cached.clone();
        }
        // Under the lock: two requests that find it stale build it once, in order, so the
        // departed nodes are judged against the table that came before.
        let (revision, registry) = self.sm.registry();
        let table = Arc::new(cached.next(revision, registry, now));
        *cached = table.clone();
        table
    }

    /// Every `ROUTES_REFRESH` until `shutdown`: brings the routing table up to the registry
    /// even while no request comes, so that a node leaving the registry is seen to leave within
    /// about that long (its commands stay known for `routing::DEPARTED_FOR` from then), not at
    /// the next request, which could be long after, or never for a node that came and went.
    pub async fn refresh_routes(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = crate::supervise::Ticker::new(ROUTES_REFRESH, &shutdown);
        while tick.next().await {
            self.table();
        }
    }

    /// Serve a client request under `/api/`.
    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>, max_body: usize, bodies: &crate::api::BodyBudget) -> Response<Full<Bytes>> {
        let (request_id, traceparent) = trace_ids(req.headers());
        let mut resp = match self.serve(req, &request_id, &traceparent, max_body, bodies).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            h.insert("x-request-id", v);
        }
        if let Ok(v) = HeaderValue::from_str(&traceparent) {
            h.insert("traceparent", v);
        }
        resp
    }

    async fn serve(
        self: &Arc<Self>,
        req: Request<Incoming>,
        request_id: &str,
        traceparent: &str,
        max_body: usize,
        bodies: &crate::api::BodyBudget,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        if uri_len > MAX_URI {
            return Err(ApiError::UriTooLong(format!("path and query of {uri_len} bytes, at most {MAX_URI}")));
        }
        // route
        let path = req.uri().path().to_string();
        let rest = path.strip_prefix("/api/v").ok_or_else(|| ApiError::NotFound(format!("no route for {path}")))?;
        let (version, cmd_path) = rest.split_once('/').unwrap_or((rest, ""));
        // `/api/v1//echo` is no alias of `/api/v1/echo` either.
        if cmd_path.starts_with('/') {
            return Err(ApiError::NotFound(format!("no route for {}", crate::api::cut(&path, 256))));
        }
        // Canonical decimal only: `v+1` and `v01` are no aliases of `v1` (an ACL in front that
        // matches paths exactly would not see them as the same route).
        let version = crate::api::decimal(version)
            .filter(|_| version == "0" || !version.starts_with('0'))
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| ApiError::NotFound(format!("no route for {path}")))?;
        // A path that does not decode names no command: the client's mistake (400), not an
        // unknown route (404), as the state and event routes answer it.
        if cmd_path.split('/').any(|seg| crate::proxy::routing::percent_decode_with(seg, false).is_none()) {
            return Err(ApiError::BadRequest(format!("the path {:?} is not valid percent-encoded UTF-8", crate::api::cut(&path, 256))));
        }
        let table = self.table();
        let mut found = table.lookup(version, req.method().as_str(), cmd_path);
        // HEAD is GET without the body (RFC 9110 §9.3.2), as on every other route: a GET
        // command answers it (`api::handle` leaves the body out) when running it changes
        // nothing, as far as its declaration says: idempotent and without a success event. A
        // load balancer's HEAD probe must not run a handler that writes or emits. One declared
        // for HEAD itself comes first.
        if req.method() == http::Method::HEAD && !matches!(found, Lookup::Found { .. }) {
            if let get @ Lookup::Found { route, .. } = table.lookup(version, "GET", cmd_path) {
                if route.decl.idempotent && route.decl.success_event.is_none() {
                    found = get;
                }
            }
        }
        let (route, path_params) = match found {
            Lookup::Found { route, params } => (route.clone(), params),
            Lookup::WrongMethod(mut allowed) => {
                // HEAD too where the GET command answers it (above).
                if !allowed.iter().any(|m| m == "HEAD") {
                    if let Lookup::Found { route, .. } = table.lookup(version, "GET", cmd_path) {
                        if route.decl.idempotent && route.decl.success_event.is_none() {
                            allowed.push("HEAD".into());
                            allowed.sort();
                        }
                    }
                }
                return Err(ApiError::MethodNotAllowed { allow: allowed.join(", ") });
            }
            // A node that is not ready and knows no command at all (one joining or rebuilt
            // from nothing, before the registry reached it) cannot tell an unknown command:
            // its 404 read as "no such command" for good, to a client that skipped `/readyz`;
            // a 503 sends it to another node. A node that knows some keeps issue 3's 404.
            Lookup::NotFound if table.all().next().is_none() && !self.cluster.ready() => {
                return Err(ApiError::Unavailable(format!(
                    "no command for {} {path} known here yet: this node is not ready and knows no command (joining or catching up); retry, or ask another node",
                    req.method()
                )))
            }
            Lookup::NotFound => return Err(ApiError::NotFound(format!("no command for {} {path}", req.method()))),
        };
        // deadline: the request's own headers are checked before anything about the cluster,
        // so a malformed one is a 400 whether or not a node offers the command now.
        let own = Duration::from_millis(route.decl.timeout_ms.max(1));
        let mut timeout = own;
        if req.headers().get_all("x-timeout-ms").iter().nth(1).is_some() {
            // Which of two deadlines the client meant is not ours to pick (as `meta_header`).
            return Err(ApiError::BadRequest("give x-timeout-ms once".into()));
        }
        if let Some(v) = req.headers().get("x-timeout-ms") {
            let ms = v.to_str().ok().map(str::trim).and_then(crate::api::decimal);
            let ms = ms.ok_or_else(|| ApiError::BadRequest(format!("x-timeout-ms must be a number of milliseconds, got {v:?}")))?;
            timeout = timeout.min(Duration::from_millis(ms.max(1)));
        }
        let started = Instant::now();
        let deadline = started + timeout;
        // body and parameters
        let mut params = routing::parse_query(req.uri().query().unwrap_or(""))
            .ok_or_else(|| ApiError::BadRequest("malformed query string".into()))?;
        params.extend(path_params);
        let meta = client_meta(req.headers(), request_id, traceparent)?;
        let headers = headers::from_client(&req)?;
        // liveness
        if self.candidates(&route, false).is_empty() {
            debug!(
                service = %route.service,
                nodes = ?route.nodes,
                draining = self.is_draining(),
                serving = self.cluster.serving(),
                reachable = ?route.nodes.iter().map(|n| (*n, self.net.maybe_reachable(*n))).collect::<Vec<_>>(),
                "no candidate"
            );
            return Err(ApiError::Unavailable(format!("no live node offers {} v{}", route.service, route.version)));
        }
        // A body still arriving at the deadline is the client's delay: 408, not a gateway's 504.
        // `received` holds the body's share of the node's budget until the answer is back.
        let received = tokio::time::timeout_at(deadline, crate::api::read_body(req, max_body, bodies))
            .await
            .map_err(|_| ApiError::RequestTimeout(timeout))??;
        // Nothing has started: a client whose deadline passed while its body came gets its 504
        // without a run that nobody waits for.
        if Instant::now() >= deadline {
            metrics::counter!("raftbridge_proxy_client_deadlines_total").increment(1);
            return Err(ApiError::Timeout);
        }
        let payload = Bytes::clone(&received);
        // The command runs to its own timeout whatever the client chose: a shorter deadline of
        // the client's (`x-timeout-ms`) ends the client's wait only (below). Dropped at it, a
        // handler stopped at its next await, between its write and its emit.
        let run_deadline = started + own;
        let inv = Invocation {
            service: route.service.clone(),
            version: route.version,
            command: route.decl.name.clone(),
            params,
            payload,
            meta,
            timeout_ms: run_deadline.saturating_duration_since(Instant::now()).as_millis().max(1) as u64,
            headers,
        };
        metrics::counter!("raftbridge_proxy_requests_total", "service" => route.service.clone()).increment(1);
        // From here on the command cannot be cut short: a client that disconnects, or whose
        // deadline passes, drops this future, and a handler dropped part-way (its put done, its
        // emit not; a key's claim never completed) would leave half a command behind.
        // `Detachable` then finishes it in a task of its own, ended by the command's timeout;
        // the task keeps what the request held (its running slot, `received`'s share of the
        // body budget, a key's claim and its renewals, a peer's in-flight permit while a peer
        // runs it), so detached commands stay within the bounds that running ones have.
        let slot = self
            .running_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Busy(format!("{MAX_RUNNING} commands are running on this node")))?;
        let this = Arc::clone(self);
        let run = async move {
            let (_slot, _received) = (slot, received);
            match inv.meta.idempotency_key.clone() {
                Some(key) => this.idempotent(&key, inv, &route, deadline, run_deadline).await,
                None => {
                    let retry = route.decl.idempotent;
                    this.dispatch(inv, &route, run_deadline, retry).await.map(|(out, _)| answer(out))
                }
            }
        };
        let run = Detachable { run: Some(Box::pin(run)), tracker: self.running.clone() };
        if deadline >= run_deadline {
            return run.await;
        }
        match tokio::time::timeout_at(deadline, run).await {
            Ok(answered) => answered,
            Err(_) => {
                metrics::counter!("raftbridge_proxy_client_deadlines_total").increment(1);
                Err(ApiError::Timeout)
            }
        }
    }

    /// What this node's handlers call commands through (`Ctx::invoke`); the composition root
    /// gives it to the subscriptions' dispatcher too.
    pub fn handler_calls(self: &Arc<Self>) -> Arc<dyn crate::sdk::Invoker> {
        self.calls.get_or_init(|| Arc::new(HandlerCalls(Arc::downgrade(self)))).clone()
    }

    /// A command called by a handler on this node (`Ctx::invoke`): routed, balanced, retried
    /// and bounded as a client's request is (`serve`), from the name the registry knows it by.
    /// Its deadline is the caller's time left (`inv.timeout_ms`) or the command's own
    /// timeout, whichever ends first; under `key` (the caller's run is keyed) it is claimed
    /// and answered once, as a client's keyed request is.
    async fn call_from_handler(self: Arc<Self>, mut inv: Invocation, key: Option<String>) -> Result<Output, HandlerError> {
        // While this node drains it has left the registry, and a command only it offered has
        // no route; its handlers still finish their work here (every-instance loops end their
        // pass, a delivery in flight runs on), so their calls may run here too.
        let mut route = self.table().by_name(&inv.service, inv.version, &inv.command);
        if self.is_draining() {
            if let Some(own) = self.local_route(&inv.service, inv.version, &inv.command) {
                match &mut route {
                    Some(r) if !r.nodes.contains(&self.node_id) && self.candidates(r, true).is_empty() => r.nodes.push(self.node_id),
                    Some(_) => {}
                    None => route = Some(own),
                }
            }
        }
        let route = route.ok_or_else(|| HandlerError::not_found(format!("no node declares command {} of service {} v{}", inv.command, inv.service, inv.version)))?;
        // The caller's own mistake: a 500 of its handler, not a 431 of a client's.
        inv.headers = headers::checked(std::mem::take(&mut inv.headers)).map_err(|e| HandlerError::unhandled(format!("the headers of a call of {}: {e}", inv.command)))?;
        if self.candidates(&route, true).is_empty() {
            return Err(HandlerError::from_api(ApiError::Unavailable(format!("no live node offers {} v{}", route.service, route.version))));
        }
        // Judged here, not by whichever node the balancer picks: a local callee would take it
        // and a remote one not.
        if inv.payload.len() > self.settings.max_output {
            return Err(HandlerError::unhandled(format!(
                "the call of {} carries {} bytes, more than the {} a node can carry (half of --max-frame)",
                inv.command,
                inv.payload.len(),
                self.settings.max_output
            )));
        }
        let own = Duration::from_millis(route.decl.timeout_ms.max(1));
        let deadline = Instant::now() + own.min(Duration::from_millis(inv.timeout_ms.max(1)));
        inv.timeout_ms = deadline.saturating_duration_since(Instant::now()).as_millis().max(1) as u64;
        let slot = self
            .running_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| HandlerError::from_api(ApiError::Busy(format!("{MAX_RUNNING} commands are running on this node"))))?;
        metrics::counter!("raftbridge_proxy_handler_calls_total", "service" => route.service.clone()).increment(1);
        let this = Arc::clone(&self);
        // Finished in a task of its own if the caller is dropped part-way (its deadline, its
        // client gone), as a client's command is (`Detachable`).
        let run = async move {
            let _slot = slot;
            match key {
                Some(key) => {
                    inv.meta.idempotency_key = Some(key.clone());
                    match this.idempotent(&key, inv, &route, deadline, deadline).await {
                        Ok(resp) => Ok(output_of(resp).await),
                        Err(e) => Err(e),
                    }
                }
                None => {
                    let retry = route.decl.idempotent;
                    this.dispatch(inv, &route, deadline, retry).await.map(|(out, _)| out)
                }
            }
        };
        let run = Detachable { run: Some(Box::pin(run)), tracker: self.running.clone() };
        match run.await {
            Ok(out) => out,
            Err(e) => Err(call_error(e)),
        }
    }

    /// Waits up to `grace` for the commands still running, its clients' (they may be gone; the
    /// node calls this once its HTTP listeners have stopped, so no new ones come) and its peers'
    /// (refused once draining); false if some were still running.
    pub async fn commands_finished(&self, grace: Duration) -> bool {
        self.running.close();
        tokio::time::timeout(grace, self.running.wait()).await.is_ok()
    }

    /// This node's own route to a command it offers, whether or not the registry lists it.
    fn local_route(&self, service: &str, version: u32, command: &str) -> Option<Route> {
        self.local.get(service, version, command)?;
        let decl = self.local.decls.iter().find(|d| d.name == service && d.version == version)?.commands.iter().find(|c| c.name == command)?;
        Some(Route { service: service.to_string(), version, decl: decl.clone(), nodes: vec![self.node_id] })
    }

    /// Live nodes offering the route. A draining node runs no more of its clients' or peers'
    /// commands, but runs its own handlers' calls (`handler_call`): they are the end of work
    /// it had taken before the drain.
    fn candidates(&self, route: &Route, handler_call: bool) -> Vec<NodeId> {
        let here = || self.cluster.serving() && self.local.get(&route.service, route.version, &route.decl.name).is_some_and(|h| h.available());
        let draining = self.is_draining();
        let live: Vec<NodeId> = route
            .nodes
            .iter()
            .copied()
            .filter(|n| if *n == self.node_id { !draining && here() } else { self.net.maybe_reachable(*n) && self.cluster.is_member(*n) })
            .collect();
        // Draining, this node takes its handlers' calls only when no other node can: its
        // registry entry may outlive the drain's start (the write that clears it can fail).
        if live.is_empty() && handler_call && draining && route.nodes.contains(&self.node_id) && here() {
            return vec![self.node_id];
        }
        live
    }

    /// Run on some node, retrying elsewhere when that is safe. Returns the handler's answer and
    /// the node that gave it.
    async fn dispatch(
        &self,
        inv: Invocation,
        route: &Route,
        deadline: Instant,
        retry_after_delivery: bool,
    ) -> Result<(Result<Output, HandlerError>, NodeId), ApiError> {
        self.budget.deposit();
        // Only the node sets the call depth, on a handler's call (`Ctx::invoke`); a client's is
        // dropped on the way in (`headers::from_client`). Looked for only while draining, the
        // one time `candidates` tells the two apart.
        let handler_call = self.is_draining() && inv.headers.iter().any(|(n, _)| n == crate::sdk::CALL_DEPTH_HEADER);
        let balancer = self.balancers.of(&route.service, route.version);
        // The deadline is the command's own timeout (a client's shorter one ends only its wait,
        // `handle`): passing it says something of the node's health (a hung handler, local
        // ones too).
        let expired = Outcome::Failed;
        let mut tried: Vec<NodeId> = Vec::new();
        let mut last = ApiError::Unavailable(format!("no live node offers {} v{}", route.service, route.version));
        // Whether the last attempt was `NotServed`: a retry after it costs no budget. Nothing
        // ran, so a retry adds no work for the cluster; the budget is there to stop retries
        // multiplying the load of handlers that fail, and attempts stay at most MAX_ATTEMPTS.
        let mut unserved = false;
        // Whether the last attempt's answer was lost and a retry may follow: counted in
        // `raftbridge_proxy_retries_total` when it is sent.
        let mut retrying = false;
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 && !unserved && !self.budget.withdraw() {
                break;
            }
            unserved = false;
            let all = self.candidates(route, handler_call);
            let fresh: Vec<NodeId> = all.iter().copied().filter(|n| !tried.contains(n)).collect();
            let pool = if fresh.is_empty() { all } else { fresh };
            let local = self.settings.local_first.then_some(self.node_id);
            let Some(target) = balancer.pick(&pool, local) else { break };
            if std::mem::take(&mut retrying) {
                metrics::counter!("raftbridge_proxy_retries_total").increment(1);
            }
            tried.push(target);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ApiError::Timeout);
            }
            let mut inv = inv.clone();
            inv.timeout_ms = left.as_millis().max(1) as u64;
            let started = Instant::now();
            let flight = balancer.start(target);
            let outcome = tokio::time::timeout_at(deadline, self.invoke(target, inv)).await;
            match outcome {
                Err(_) => {
                    flight.finish(expired, started.elapsed());
                    return Err(ApiError::Timeout);
                }
                Ok(Ok(answer)) => {
                    let outcome = scored(&answer, deadline.saturating_duration_since(Instant::now()));
                    flight.finish(outcome, started.elapsed());
                    return Ok((answer, target));
                }
                Ok(Err(Miss::NotServed(why))) => {
                    flight.finish(Outcome::Failed, started.elapsed());
                    debug!(target, %why, "not served; trying another node");
                    unserved = true;
                    // An earlier attempt that may have run keeps its 502: a 503 would tell the
                    // client that nothing happened.
                    if !matches!(last, ApiError::BadGateway(_)) {
                        last = ApiError::Unavailable(format!("node {target}: {why}"));
                    }
                }
                Ok(Err(Miss::TooLarge(why))) => {
                    // Nothing was sent: says nothing of the node, so its record is left alone.
                    drop(flight);
                    // An earlier attempt that may have run keeps its 502 (another link's frame
                    // can be smaller than the first one's).
                    return Err(if matches!(last, ApiError::BadGateway(_)) { last } else { ApiError::Oversized(why) });
                }
                Ok(Err(Miss::Busy(why))) => {
                    // This node's own bound, not the target's doing: its record is left alone.
                    drop(flight);
                    // Nothing was sent: another node is tried without spending retry budget.
                    unserved = true;
                    if !matches!(last, ApiError::BadGateway(_)) {
                        last = ApiError::Unavailable(format!("node {target}: {why}"));
                    }
                }
                Ok(Err(Miss::Lost(_))) if Instant::now() >= deadline => {
                    flight.finish(expired, started.elapsed());
                    return Err(ApiError::Timeout);
                }
                Ok(Err(Miss::Lost(why))) => {
                    flight.finish(Outcome::Failed, started.elapsed());
                    last = ApiError::BadGateway(format!("node {target}: {why}"));
                    if !retry_after_delivery {
                        return Err(last);
                    }
                    // Counted once the retry is sent (the budget and a node allowing).
                    retrying = true;
                }
            }
        }
        Err(last)
    }

    /// One attempt on one node.
    async fn invoke(&self, target: NodeId, inv: Invocation) -> Result<Result<Output, HandlerError>, Miss> {
        let place = if target == self.node_id { "local" } else { "remote" };
        metrics::counter!("raftbridge_proxy_dispatch_total", "target" => place).increment(1);
        if target == self.node_id {
            let handler = self
                .local
                .get(&inv.service, inv.version, &inv.command)
                .ok_or_else(|| Miss::NotServed("not offered here".into()))?;
            if !handler.available() {
                return Err(Miss::NotServed(UNAVAILABLE.into()));
            }
            return match self.run_local(handler, inv).await {
                Err(e) if e.is_not_served() => Err(Miss::NotServed(e.message)),
                answer => Ok(answer),
            };
        }
        let slots = lock(&self.peer_slots)
            .entry(target)
            .or_insert_with(|| Arc::new(Semaphore::new(self.settings.max_inflight_per_peer)))
            .clone();
        let _permit = slots.try_acquire_owned().map_err(|_| Miss::Busy("too many requests in flight to it".into()))?;
        // A little longer than the time left: the caller's deadline fires first and answers 504,
        // rather than the link's timeout turning a deadline into a 502.
        let timeout = Duration::from_millis(inv.timeout_ms) + Duration::from_millis(50);
        // The link first (dialed if need be), so that the request is made for the build at its
        // other end: one that announced no `APP_HEADERS` gets the invocation alone (its app
        // sees no client headers, its answer brings none back), as it would close the link
        // on a request it cannot decode, failing everything else in flight there.
        let sent = async {
            let link = self.net.link(target).await?;
            let request = if link.features() & crate::peer::frame::features::APP_HEADERS != 0 {
                let mut inv = inv;
                let headers = std::mem::take(&mut inv.headers);
                PeerRequest::InvokeWith { inv, headers }
            } else {
                PeerRequest::Invoke(inv)
            };
            link.call(&request, timeout).await
        };
        match sent.await {
            Ok(PeerResponse::Invoked(r)) => Ok(r),
            Ok(PeerResponse::InvokedWith { answer, headers }) => Ok(with_answer_headers(answer, headers)),
            Ok(PeerResponse::Error(RemoteError::NotServed(why))) => Err(Miss::NotServed(why)),
            Ok(PeerResponse::Error(e)) => Err(Miss::Lost(e.to_string())),
            Ok(_) => Err(Miss::Lost("unexpected response".into())),
            Err(e @ PeerError::TooLarge { .. }) => Err(Miss::TooLarge(e.to_string())),
            Err(e) if e.not_delivered() => Err(Miss::NotServed(e.to_string())),
            Err(e @ PeerError::Timeout { .. }) => Err(Miss::Lost(e.to_string())),
            Err(e) => Err(Miss::Lost(e.to_string())),
        }
    }

    async fn run_local(&self, handler: Arc<dyn CommandHandler>, inv: Invocation) -> Result<Output, HandlerError> {
        let sender = crate::sdk::Sender {
            service_name: inv.service.clone(),
            service_version: inv.version.to_string(),
            service_target: inv.command.clone(),
            instance_id: self.node_id.to_string(),
        };
        let scoped = inv.meta.idempotency_key.as_deref().map(|k| idempotency_scope(&inv.service, inv.version, &inv.command, inv.meta.tenant_id.as_deref(), k));
        let timeout = Duration::from_millis(inv.timeout_ms.max(1));
        let ctx = Ctx::new(inv.meta.clone(), self.node_id, self.store.clone())
            .with_dedup_key(scoped.clone())
            .with_broker(self.broker.clone(), sender.clone())
            .with_invoker(self.calls.get().cloned(), Instant::now() + timeout);
        let key = (inv.service.clone(), inv.version, inv.command.clone());
        let meta = inv.meta.clone();
        let out = match tokio::time::timeout(timeout, handler.call(ctx, inv)).await {
            Ok(r) => r,
            Err(_) => Err(HandlerError::new(504, "deadline exceeded")),
        };
        if matches!(&out, Err(e) if e.is_not_served()) {
            return out;
        }
        // The handler ran on this node (a keyed command re-run after a failover counts again).
        metrics::counter!("raftbridge_command_runs_total", "service" => key.0.clone(), "command" => key.2.clone()).increment(1);
        // An error answer is bounded like a result: it crosses the link as one frame and, as a
        // 4xx under an idempotency key, is stored in one Raft entry.
        // Measured as sent on a link (`size`) and as stored under a key (its JSON text, where
        // escapes may make it several times longer).
        let out = out.map_err(|e| {
            if !(400..=599).contains(&e.status) {
                tracing::warn!(service = %key.0, command = %key.2, status = e.status, "command error with a status that is no error status: answered 500");
                return error_status_checked(e);
            }
            let passed = headers::size(&e.headers);
            let bytes = if e.size() + passed > self.settings.max_output {
                e.size() + passed
            } else {
                serde_json::to_vec(&e.to_json()).map_or(usize::MAX, |v| v.len()) + passed
            };
            if bytes <= self.settings.max_output {
                return e;
            }
            tracing::warn!(service = %key.0, command = %key.2, bytes, "command error answer too large");
            let why = format!("the command's error answer was {bytes} bytes, more than the {} a node can carry (half of --max-frame)", self.settings.max_output);
            HandlerError::new(502, why)
        })?;
        let bytes = out.body.len() + headers::size(&out.headers);
        if bytes > self.settings.max_output {
            let why = format!("the command answered {bytes} bytes, more than the {} a node can carry (half of --max-frame)", self.settings.max_output);
            tracing::warn!(service = %key.0, command = %key.2, bytes, "command answer too large");
            return Err(HandlerError::new(502, why));
        }
        // A sidecar app's redirect (3xx) is passed on as it is, not a result to emit.
        let success_event = self.local.success_events.get(&key).filter(|_| (200..300).contains(&out.status));
        if let Some(event_name) = success_event {
            // The result as an event; under an idempotency key a re-run with the same result
            // emits nothing new, one with another result (`sdk::StateHandle::next_tag`) emits it.
            let payload = if out.body.is_empty() { b"null".to_vec() } else { out.body.to_vec() };
            // An SDK handler answers JSON; a sidecar app may answer anything, and an event's
            // payload is JSON a consumer can read (the API's rule for a publish).
            if let Err(e) = crate::broker::event::check_event_payload(&payload) {
                return Err(HandlerError::new(502, format!("the command ran but its answer cannot be its success event {event_name}: {e}")));
            }
            let dedup = scoped.map(|k| crate::broker::internal_key(format_args!("{k}#success#{:08x}", crate::sdk::content_fingerprint(&[event_name.as_bytes(), &payload]))));
            let mut event = crate::broker::new_event(event_name, payload, &meta, Some(sender), dedup);
            // Just built, so not shared yet: no copy.
            Arc::make_mut(&mut event.body).message_type = crate::broker::event::COMMAND_SUCCESS_RESPONSE.into();
            // The command has run and its writes are committed: a 502 (the result could not be
            // passed on), not a 503, which tells a client nothing happened and invites a retry.
            self.broker.publish_one(event).await.map_err(|e| HandlerError::new(502, format!("the command ran but its result was not emitted: {e}")))?;
        }
        Ok(out)
    }

    /// Serve `PeerRequest::InvokeWith` from another node's proxy: `serve_remote`, with the
    /// answer's headers beside it.
    pub async fn serve_remote_with(self: &Arc<Self>, mut inv: Invocation, headers: crate::sdk::HeaderList) -> PeerResponse {
        inv.headers = headers;
        match self.serve_remote(inv).await {
            PeerResponse::Invoked(mut answer) => {
                let headers = match &mut answer {
                    Ok(o) => std::mem::take(&mut o.headers),
                    Err(e) => std::mem::take(&mut e.headers),
                };
                PeerResponse::InvokedWith { answer, headers }
            }
            other => other,
        }
    }

    /// Serve `PeerRequest::Invoke` from another node's proxy.
    pub async fn serve_remote(self: &Arc<Self>, inv: Invocation) -> PeerResponse {
        if self.draining.load(Ordering::SeqCst) {
            return PeerResponse::Error(RemoteError::NotServed("node is draining".into()));
        }
        if !self.cluster.serving() {
            return PeerResponse::Error(RemoteError::NotServed("node is not ready".into()));
        }
        match self.local.get(&inv.service, inv.version, &inv.command) {
            None => PeerResponse::Error(RemoteError::NotServed("not offered here".into())),
            Some(handler) if !handler.available() => PeerResponse::Error(RemoteError::NotServed(UNAVAILABLE.into())),
            Some(handler) => {
                // In the tracker that a drain waits for before it stops the broker
                // (`commands_finished`), as this node's own clients' commands are: a peer's
                // command cut off between its write and its emit answered 503 for a stored
                // write. Tracked before the first await, so after the draining check above a
                // drain cannot miss it; a caller that gives up does not cut it off either.
                let this = Arc::clone(self);
                let run = Detachable { run: Some(Box::pin(async move { this.run_local(handler, inv).await })), tracker: self.running.clone() };
                match self.running.track_future(run).await {
                // Nothing ran (the sidecar's app refused the connection): the caller goes on.
                    Err(e) if e.is_not_served() => PeerResponse::Error(RemoteError::NotServed(e.message)),
                    answer => PeerResponse::Invoked(answer),
                }
            }
        }
    }

    /// `GET /openapi.json`: every command exposed in the cluster.
    pub fn openapi(&self) -> serde_json::Value {
        let table = self.table();
        let mut paths: BTreeMap<String, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
        for route in table.all() {
            let mut params = Vec::new();
            let segs: Vec<String> = route
                .decl
                .path
                .trim_matches('/')
                .split('/')
                .map(|s| match s.strip_prefix(':') {
                    Some(name) => {
                        params.push(serde_json::json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}));
                        format!("{{{name}}}")
                    }
                    None => s.to_string(),
                })
                .collect();
            let p = format!("/api/v{}/{}", route.version, segs.join("/"));
            let schema = |s: &Option<String>| {
                s.as_deref().and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()).unwrap_or(serde_json::json!({}))
            };
            let mut op = serde_json::json!({
                "operationId": format!("{}.v{}.{}", route.service, route.version, route.decl.name),
                "tags": [route.service],
                "parameters": params,
                "responses": {
                    "200": {"description": "result", "content": {"application/json": {"schema": schema(&route.decl.output_schema)}}},
                    "204": {"description": "no result"},
                    "default": {"description": "error {status, message, data?}"}
                },
                "x-raftbridge": {"idempotent": route.decl.idempotent, "timeoutMs": route.decl.timeout_ms, "nodes": route.nodes},
            });
            if route.decl.method != "GET" && route.decl.method != "DELETE" {
                op["requestBody"] = serde_json::json!({"content": {"application/json": {"schema": schema(&route.decl.input_schema)}}});
            }
            paths.entry(p).or_default().insert(route.decl.method.to_ascii_lowercase(), op);
        }
        serde_json::json!({
            "openapi": "3.0.3",
            "info": {"title": "raftbridge cluster commands", "version": env!("CARGO_PKG_VERSION")},
            "paths": paths,
        })
    }
}

/// How long before the dispatch's deadline a 504 may come and still be the handler's own
/// timeout: its limit is the time left, cut to the millisecond, so it fires a moment early.
const OWN_TIMEOUT_SLACK: Duration = Duration::from_millis(50);

/// What an answer says of the node that gave it, `left` before the dispatch's deadline. A
/// handler's own failure (500) or its sidecar app's (502) counts against the node; a 503 or a
/// 504 comes from the platform under it (a leader change fails every node's writes alike),
/// except a 504 at the deadline: the handler's (or the app's) own timeout, which the node's SDK
/// or sidecar answers a moment before this one fires, is a hung handler, a failure as the
/// deadline passing is (it was scored a healthy answer, and such a node never ejected).
fn scored(answer: &Result<Output, HandlerError>, left: Duration) -> Outcome {
    match answer {
        Err(e) if matches!(e.status, 500 | 502) => Outcome::Errored,
        Err(e) if e.status == 504 && left <= OWN_TIMEOUT_SLACK => Outcome::Failed,
        _ => Outcome::Answered,
    }
}

/// A peer's answer with the headers that crossed the link beside it put back in it.
fn with_answer_headers(mut answer: Result<Output, HandlerError>, headers: crate::sdk::HeaderList) -> Result<Output, HandlerError> {
    match &mut answer {
        Ok(o) => o.headers = headers,
        Err(e) => e.headers = headers,
    }
    answer
}

/// A handler's answer as an HTTP response.
/// A keyed command's answer (`answer`, or a stored one replayed) as a handler's call gets it
/// (`call_from_handler`): the inverse of `answer`, for both of its shapes of error body.
async fn output_of(resp: Response<Full<Bytes>>) -> Result<Output, HandlerError> {
    use http_body_util::BodyExt;
    let (parts, body) = resp.into_parts();
    // A `Full` body is in memory already: its one frame, no error possible.
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let content_type = parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let headers: crate::sdk::HeaderList = parts
        .headers
        .iter()
        .filter(|(n, _)| !matches!(n.as_str(), "content-type" | "content-length" | "idempotent-replay"))
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    let status = parts.status.as_u16();
    if status < 400 {
        return Ok(Output { status, body, content_type, headers });
    }
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let message = json.as_ref().and_then(|j| j["message"].as_str()).map(str::to_string).unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    let mut e = HandlerError::new(status, message);
    if let Some(data) = json.as_ref().map(|j| &j["data"]).filter(|d| !d.is_null()) {
        e = e.with_data(data);
    }
    e.headers = headers;
    Err(e)
}

fn answer(out: Result<Output, HandlerError>) -> Response<Full<Bytes>> {
    match out {
        Ok(o) => {
            let mut resp = Response::new(Full::new(o.body));
            *resp.status_mut() = StatusCode::from_u16(o.status).unwrap_or(StatusCode::OK);
            headers::append(&o.headers, resp.headers_mut());
            if let Some(ct) = o.content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
                resp.headers_mut().insert(http::header::CONTENT_TYPE, ct);
            }
            resp
        }
        Err(e) => {
            // Also for an answer from another node (an older build's handler).
            let e = error_status_checked(e);
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = crate::api::json_response(status, &e.to_json());
            headers::append(&e.headers, resp.headers_mut());
            resp
        }
    }
}

/// A handler's error as answered: a 4xx or 5xx as it is, any other status (a 200 with an
/// error's body, a 204 whose body is dropped, a 101 the connection cannot carry, a 42) a 500
/// that says so, as it is the handler's bug.
fn error_status_checked(e: HandlerError) -> HandlerError {
    if (400..=599).contains(&e.status) {
        return e;
    }
    HandlerError::new(500, format!("the handler failed with status {}, which is no error status (400-599)", e.status))
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

fn hex(n: usize) -> String {
    (0..n).map(|_| char::from_digit(fastrand::u32(..16), 16).unwrap_or('0')).collect()
}

/// The client's own `x-request-id` (at most 200 bytes) and W3C `traceparent`, each `None` when
/// absent or malformed.
pub(crate) fn client_trace(h: &HeaderMap) -> (Option<&str>, Option<&str>) {
    let request_id = header(h, "x-request-id").filter(|v| v.len() <= 200);
    (request_id, header(h, "traceparent").filter(|t| valid_traceparent(t)))
}

/// `x-request-id` and a valid W3C `traceparent` (both created when absent or malformed).
fn trace_ids(h: &HeaderMap) -> (String, String) {
    let (request_id, traceparent) = client_trace(h);
    let request_id = request_id.map_or_else(|| hex(32), str::to_string);
    let traceparent = traceparent.map_or_else(|| format!("00-{}-{}-01", hex(32), hex(16)), str::to_string);
    (request_id, traceparent)
}

/// A client request's message fields: the given trace context (empty = none) and the identity
/// and dedup headers, which must be valid (`api::meta_header`). Shared by commands and events.
pub(crate) fn client_meta(h: &HeaderMap, request_id: &str, traceparent: &str) -> Result<MessageMeta, ApiError> {
    let text = |name| crate::api::meta_header(h, name).map(|v| v.map(str::to_string));
    Ok(MessageMeta {
        trace_id: traceparent.split('-').nth(1).unwrap_or_default().to_string(),
        correlation_id: request_id.to_string(),
        principal_id: text("x-principal-id")?,
        tenant_id: text("x-tenant-id")?,
        sender: None,
        idempotency_key: text("idempotency-key")?,
        traceparent: traceparent.to_string(),
    })
}

/// A W3C `traceparent`: version, 32-hex trace id, 16-hex parent id, flags; ids not all zero.
fn valid_traceparent(t: &str) -> bool {
    let parts: Vec<&str> = t.split('-').collect();
    let is_hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    parts.len() == 4
        && is_hex(parts[0], 2)
        && parts[0] != "ff"
        && is_hex(parts[1], 32)
        && is_hex(parts[2], 16)
        && is_hex(parts[3], 2)
        && parts[1] != "0".repeat(32)
        && parts[2] != "0".repeat(16)
}

/// A handler's call that failed, as its handler sees it: as a client would (`from_api`), but a
/// call too large for a peer link is the calling handler's own fault, a 500, not a 413 that
/// its client would read as "your body was too large" (and keep under its key).
fn call_error(e: ApiError) -> HandlerError {
    match e {
        ApiError::Oversized(why) => HandlerError::unhandled(format!("a command called from this handler is larger than a node can carry: {why}")),
        e => HandlerError::from_api(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call too large for a link is the caller's 500; the platform's other failures keep
    /// their statuses.
    #[test]
    fn an_oversized_call_is_the_calling_handlers_fault() {
        let e = call_error(ApiError::Oversized("frame of 9 bytes over 8".into()));
        assert_eq!(e.status, 500, "{e}");
        assert!(e.message.contains("frame of 9 bytes over 8"), "{e}");
        for (api, status) in [(ApiError::Timeout, 504), (ApiError::Unavailable("x".into()), 503), (ApiError::BadGateway("x".into()), 502)] {
            assert_eq!(call_error(api).status, status);
        }
    }

    /// A keyed call from a handler gets the answer as the client would, and back as the
    /// handler returned it: status, body, type, headers, and an error's message and data.
    #[tokio::test]
    async fn a_keyed_answer_reads_back_as_the_handlers_answer() {
        let ok = Output { status: 201, body: Bytes::from_static(br#"{"a":1}"#), content_type: Some("application/json".into()), headers: vec![("x-app".into(), b"v".to_vec())] };
        assert_eq!(output_of(answer(Ok(ok.clone()))).await, Ok(ok));
        let mut e = HandlerError::new(409, "taken").with_data(&serde_json::json!({"by": "n2"}));
        e.headers = vec![("retry-after".into(), b"1".to_vec())];
        let back = output_of(answer(Err(e.clone()))).await.unwrap_err();
        assert_eq!((back.status, back.message.as_str(), back.data.as_deref(), &back.headers), (409, "taken", e.data.as_deref(), &e.headers));
        // The platform's own errors (`ApiError`) have the same shape.
        let back = output_of(ApiError::Timeout.into_response()).await.unwrap_err();
        assert_eq!(back.status, 504);
        assert!(!back.message.is_empty());
    }

    /// A handler's error answers with a 4xx or 5xx; another status is its bug, answered 500.
    /// A 504 at the deadline is the handler's own timeout, a hung handler: a failure of the
    /// node. One well before it came from under the handler (a write that timed out), as a 503
    /// does: not the node's fault. A 500 or a 502 is the handler's or its app's.
    #[test]
    fn a_timeout_at_the_deadline_counts_against_the_node() {
        let e = |status| Err(HandlerError::new(status, "x"));
        let at = Duration::from_millis(1);
        let early = Duration::from_secs(5);
        assert_eq!(scored(&e(504), at), Outcome::Failed);
        assert_eq!(scored(&e(504), early), Outcome::Answered);
        assert_eq!(scored(&e(503), at), Outcome::Answered);
        assert_eq!(scored(&e(500), early), Outcome::Errored);
        assert_eq!(scored(&e(502), early), Outcome::Errored);
        assert_eq!(scored(&e(404), at), Outcome::Answered);
    }

    #[test]
    fn a_handler_error_without_an_error_status_is_a_500() {
        for status in [0, 42, 101, 200, 204, 304, 600] {
            let e = error_status_checked(HandlerError::new(status, "x"));
            assert_eq!(e.status, 500, "{status}");
            assert!(e.message.contains(&format!("status {status}")), "{}", e.message);
        }
        for status in [400, 404, 499, 500, 503, 599] {
            assert_eq!(error_status_checked(HandlerError::new(status, "x")).status, status);
        }
    }

    #[test]
    fn trace_ids_are_kept_or_created() {
        let mut h = HeaderMap::new();
        let (rid, tp) = trace_ids(&h);
        assert_eq!(rid.len(), 32);
        assert!(valid_traceparent(&tp), "{tp}");
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        h.insert("traceparent", HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let (rid, tp) = trace_ids(&h);
        assert_eq!(rid, "abc");
        assert_eq!(tp, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        h.insert("traceparent", HeaderValue::from_static("00-xyz-1-01"));
        assert_ne!(trace_ids(&h).1, "00-xyz-1-01");
        // Version ff is forbidden (W3C Trace Context): a new trace starts.
        h.insert("traceparent", HeaderValue::from_static("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(trace_ids(&h).1.starts_with("00-"));
    }
}
