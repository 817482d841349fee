//! The client HTTP API every node serves: health, cluster view, metrics, the state store, and
//! `/api/...` commands, which go to the proxy (`crate::proxy`).
//!
//! hyper (HTTP/1.1 and h2c via hyper-util's auto builder) with an explicit, small stack around the
//! router — in order, each for a reason:
//! 1. connection limit (semaphore at accept): a flood of sockets cannot exhaust memory/fds;
//! 2. header read timeout (HTTP/1): a slow client cannot hold a connection open forever;
//! 3. body limits (`Content-Length` check, then counted as it arrives): 413 before buffering
//!    more than `--max-body`, and 503 when the node already holds `--max-body-buffered` bytes of
//!    bodies (`BodyBudget`: each body is bounded, but not how many arrive at once);
//! 4. router → handler; every error leaves through `ApiError`, the one status mapping.
//!    Requests are counted and timed per route for Prometheus.
//!
//! The same stack serves plain HTTP (`--http-addr`) and, when configured, HTTPS
//! (`--https-addr`, `tls.rs`): the TLS handshake happens after the connection limit and within the
//! header read timeout, then the connection is served like a plain one.
//!
//! Shutdown: `run` stops accepting when the token fires and gives in-flight connections a bounded
//! grace period to finish.

pub mod error;
pub mod events;
pub mod head;
pub mod snapshot;
pub mod stall;
pub mod stores;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use http::HeaderValue;
use http::Method;
use http::StatusCode;
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper::Request;
use hyper::Response;
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use hyper_util::rt::TokioTimer;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing::warn;

use self::error::ApiError;
use crate::cluster::Cluster;
use crate::raft::Replica;
use crate::raft::state_machine::SmShared;
use crate::store::Precondition;
use crate::store::StateStore;

#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub max_body: usize,
    pub bodies: BodyBudget,
    /// Bytes of answers held at once while they are written to clients (`Answer`).
    pub answers: BodyBudget,
    /// Bytes of request heads held at once until their answers are made (`head_bytes`). Its
    /// own budget, as answers have theirs: in the bodies' budget, a head would leave a body of
    /// `--max-body` in a budget of exactly that no room.
    pub heads: BodyBudget,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// A connection with no request under way for this long is closed (`keep`).
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    /// `--access-log`: a line per request (`Access`).
    pub access_log: bool,
}

/// Longest a starting node keeps clients waiting until it is ready and knows its peer links.
const WARM_UP_MAX: Duration = Duration::from_secs(5);

/// Everything the handlers need.
pub struct App {
    pub replica: Replica,
    pub cluster: Cluster,
    pub store: StateStore,
    pub proxy: Arc<crate::proxy::Proxy>,
    pub broker: Arc<crate::broker::Broker>,
    /// Set by the registry task while this node's registry entry is current.
    pub registered: Arc<std::sync::atomic::AtomicBool>,
    /// The node started with Raft state on disk (a restart, not a first start): it warms up
    /// before accepting clients. Taken from the log at open, because Raft's metrics may not
    /// show the membership yet when the HTTP server starts.
    pub restarting: bool,
    pub sm: Arc<SmShared>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// One `/metrics` render at a time: each runs on a blocking thread, and concurrent scrapes
    /// would each hold one. Never closed; dropped with the app.
    pub rendering: tokio::sync::Semaphore,
    pub settings: HttpSettings,
    /// Client connections open at once, on the plain and the HTTPS listener together: at most
    /// `settings.max_connections` (`App::new_connections`). Never closed; dropped with the app.
    pub connections: Arc<Semaphore>,
    pub cluster_name: String,
    /// `--secrets-token`: the bearer token of `/v1/secrets`; `None`: that API is off.
    pub secrets_token: Option<crate::peer::ClusterSecret>,
    /// `--api-token` (and `--api-token-previous`): the bearer tokens of the rest of the data and
    /// admin API (`needs_api_token`); empty: it is open.
    pub api_tokens: Vec<crate::peer::ClusterSecret>,
    /// `--api-read-token`: a token of that API for GET and HEAD only.
    pub api_read_token: Option<crate::peer::ClusterSecret>,
    /// Long polls on the stores and the event log (`stores::LongPolls`), ended at the drain.
    pub long_polls: stores::LongPolls,
    /// This node's pull subscriptions (`broker::pull`), for the fetch and ack routes.
    pub pulls: Arc<crate::broker::pull::PullConsumers>,
    /// One snapshot download at a time (`snapshot::download`): its permit travels with the
    /// file's reader until the file is sent. Never closed; dropped with the app.
    pub snapshot_downloads: Arc<Semaphore>,
}

impl App {
    /// The shared connection bound for `App::connections`.
    pub fn new_connections(settings: &HttpSettings) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(settings.max_connections))
    }
}

pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    json_body(status, body)
}

/// A JSON answer from anything serializable (events carry their payload as raw JSON text,
/// which must not go through a `serde_json::Value`).
pub fn json_body<T: serde::Serialize + ?Sized>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    // Our own response types: string keys, no maps with non-string keys, so this cannot fail.
    let mut resp = Response::new(Full::new(Bytes::from(serde_json::to_vec(body).unwrap_or_default())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Serve HTTP on `listener` until `shutdown`, then drain for at most the grace period.
pub async fn run(listener: TcpListener, app: Arc<App>, tls: Option<tls::HttpTls>, shutdown: CancellationToken) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // hyper's header timeout also runs while a kept-alive connection waits for its next request:
    // at 10 s it closed every idle HTTP/1 connection, whatever `--http-idle-timeout-ms` said, and
    // a pooled client's next request raced the close. The first request's head is bounded by
    // `keep` (no request begun within the header timeout: dropped), idleness and later heads by
    // `keep`'s idle close (no request is under way while a head is read), and hyper's timer is
    // a backstop past both: at the idle timeout itself it raced `keep`, and an idle connection
    // that hyper closed was not counted (`raftbridge_http_idle_closed_total`).
    let head_timeout = app.settings.header_read_timeout + app.settings.idle_timeout;
    builder.http1().timer(TokioTimer::new()).header_read_timeout(head_timeout).keep_alive(true);
    // A peer that stops answering pings is dropped: its connection would hold a slot for good.
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(MAX_STREAMS).keep_alive_interval(H2_PING).keep_alive_timeout(H2_PING_TIMEOUT);
    // Room for the headers a node passes to a sidecar's app (`proxy::headers`, 32 KiB of names
    // and values) with HTTP/2's 32 bytes per field and the pseudo-headers; hyper's 16 KiB
    // answered such a request with a bare 431 of its own.
    builder.http2().max_header_list_size(H2_MAX_HEADER_LIST);
    let builder = Arc::new(builder);
    // Cancelled when the drain begins: every connection's keeper then shuts it down gracefully
    // (GOAWAY, or `Connection: close` after the request under way). Dropped with this function.
    let drain = CancellationToken::new();
    let conns = app.connections.clone();
    let listener_name: &'static str = if tls.is_some() { "https" } else { "http" };
    // Warm-up: clients connecting meanwhile wait in the listen backlog rather than get a 503
    // from a node that cannot route yet (bounded: a node that cannot join still serves /healthz).
    // Only a node restarting with cluster state warms up; a new node has nothing to wait for.
    let restarting = app.restarting;
    let warm_until = tokio::time::Instant::now() + WARM_UP_MAX;
    while restarting && tokio::time::Instant::now() < warm_until && !shutdown.is_cancelled() {
        let members: Vec<u64> = app.replica.metrics().membership_config.membership().nodes().map(|(id, _)| *id).collect();
        let registered = app.registered.load(std::sync::atomic::Ordering::SeqCst);
        if app.cluster.ready() && registered && app.replica.net.links_settled(&members) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut stopping = false;
    let mut late = 0usize;
    // Every connection's task, so that those still open when the grace period ends are ended
    // (and their commands handed on, see below); finished ones are reaped as connections come.
    // At most `--max-connections` (each holds a permit) plus `BACKLOG_SERVED`.
    let mut connections = tokio::task::JoinSet::new();
    // Bounded: after `shutdown`, at most `BACKLOG_SERVED` more connections.
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, remote) = if !stopping {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(err) => {
                        warn!(listener = listener_name, cause = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => {
                    stopping = true;
                    continue;
                }
            }
        } else {
            // Stopping: take what the kernel has already accepted for us. Closing the listener
            // resets those connections, after their clients may have sent a request they cannot
            // safely send again; served, each gets its answer (with `Connection: close`).
            if late >= BACKLOG_SERVED {
                break;
            }
            match tokio::time::timeout(Duration::ZERO, listener.accept()).await {
                Ok(Ok(x)) => {
                    late += 1;
                    x
                }
                _ => break,
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            metrics::counter!("raftbridge_http_connections_refused_total", "listener" => listener_name).increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let limits = Idle { first_request: app.settings.header_read_timeout, between: app.settings.idle_timeout };
        // Told by the service as requests begin and end (see `keep`).
        let activity = Arc::new(Activity::counting(&app.settings.heads));
        let seen = activity.clone();
        let client = crate::proxy::headers::ClientConn { addr: remote, https: tls.is_some() };
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let app = app.clone();
            let under_way = seen.begin();
            // The head in the budget of what requests hold until the answer is written
            // (`head_bytes`).
            let mut head = Held::default();
            // Probes pass a full budget only alone on their connection (this request the only
            // one under way, no answer unsent), as a kubelet's are: a client that takes no
            // answers held 51,200 `/metrics` answers past both budgets, and checked at accept
            // time, when a burst's answers are not made yet, "no answer unsent" alone passed
            // them all.
            let probes_pass = under_way.0.requests_under_way() == 1 && under_way.0.unsent() == 0;
            let head_fits = count_head(&app.settings.heads, &mut head, &req, probes_pass);
            let h2 = req.version() == http::Version::HTTP_2;
            // Who asked, for the forwarding headers a command's handler gets (`proxy::headers`);
            // only there: an extension is an allocation, and events and state need none.
            if req.uri().path().starts_with("/api/") {
                req.extensions_mut().insert(client);
            }
            // A refused request is dropped here, as hyper accepts its stream, not when its task
            // runs: under a flood, a single worker had 360,000 refused streams' tasks waiting,
            // each with its decoded head (6 KB, 60 KB with a dynamic table's repeated fields).
            // Only with `--access-log`: the path is copied for the line after the answer.
            // Boxed: every stream's future holds it, a refused one's too.
            let access = app.settings.access_log.then(|| Box::new(Access::of(remote, &req)));
            let req = head_fits.map(|()| req);
            async move {
                let mut resp = match req {
                    // Boxed: inline, `handle`'s future made every stream's task 7 KB, a refused
                    // one's too, and a flood of refused streams queued hundreds of thousands.
                    Ok(req) => Box::pin(handle(app, req)).await,
                    Err(refused) => refused.into_response().map(|body| Answer::of(full_bytes(body), Held::default())),
                };
                let refused = resp.extensions().get::<error::Refused>().is_some();
                if h2 && refused && under_way.0.takes_no_refusals() {
                    // Its client takes none of the refusals it has: another, counted in no
                    // budget, would wait in the connection's send buffer with them until the
                    // write-stall clock drops it (1.4 KB each, 1 GB for 1,500 such clients).
                    // RST_STREAM(REFUSED_STREAM) says the same ("not processed, try again",
                    // RFC 9113 §8.7) in a frame that flow control does not hold. A client that
                    // reads gets its refusals as answers, also a burst of them.
                    metrics::counter!("raftbridge_http_refusals_reset_total").increment(1);
                    if let Some(access) = access {
                        (*access).log(resp.status(), None, "reset");
                    }
                    return Err(h2::Error::from(h2::Reason::REFUSED_STREAM));
                }
                if let Some(access) = access {
                    (*access).log(resp.status(), hyper::body::Body::size_hint(resp.body()).exact(), "answered");
                }
                // The request's head and floor stay counted until its answer is written: a
                // client that takes no answers holds each stream's state with it.
                resp.body_mut().hold(head);
                // Under way until its answer is written, not only until it is made (`keep`).
                resp.body_mut().track(&under_way.0, refused);
                drop(under_way);
                Ok::<_, h2::Error>(resp)
            }
        });
        let (builder, drain, tls) = (builder.clone(), drain.clone(), tls.clone());
        connections.spawn(async move {
            let _permit = permit;
            let served = match tls {
                None => {
                    // A malformed first head is answered with JSON here, not by hyper (`head`).
                    let stream = head::FirstHead::counted(stall::Stalling::new(stream, stall::WRITE_STALL), activity.clone());
                    let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    match keep(conn, &activity, limits, &drain).await {
                        Kept::Served(served) => served,
                        Kept::Silent => return tracing::debug!(%remote, "no request within the header timeout, closing"),
                        Kept::Stalled => return tracing::debug!(%remote, "the client took none of its answers for the write stall limit, closing"),
                    }
                }
                // A handshake still under way when the drain begins is dropped: no request has
                // begun on it, and the drain need not wait for it.
                Some(tls) => match tokio::select! {
                    r = tokio::time::timeout(limits.first_request, tls.accept(stream)) => r,
                    () = drain.cancelled() => return tracing::debug!(%remote, "https handshake under way at the drain, closing"),
                } {
                    Ok(Ok(stream)) => {
                        let stream = head::FirstHead::counted(stall::Stalling::new(stream, stall::WRITE_STALL), activity.clone());
                        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                        match keep(conn, &activity, limits, &drain).await {
                            Kept::Served(served) => served,
                            Kept::Silent => return tracing::debug!(%remote, "no request within the header timeout after the handshake, closing"),
                            Kept::Stalled => return tracing::debug!(%remote, "the client took none of its answers for the write stall limit, closing"),
                        }
                    }
                    Ok(Err(err)) => {
                        metrics::counter!("raftbridge_https_handshake_failures_total", "cause" => "error").increment(1);
                        tracing::debug!(%remote, cause = %err, "https handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics::counter!("raftbridge_https_handshake_failures_total", "cause" => "timeout").increment(1);
                        tracing::debug!(%remote, "https handshake timed out");
                        return;
                    }
                },
            };
            if let Err(err) = served {
                tracing::debug!(%remote, cause = %err, "http connection ended with error");
            }
        });
    }
    // Refuse new connections (a client retries a refused connect elsewhere safely), then give
    // those just accepted a moment to deliver their request: the graceful shutdown closes a
    // connection that has not started one, and a request already on its way would meet a closed
    // connection, which a client cannot safely retry unless the request is idempotent.
    drop(listener);
    if late > 0 {
        tracing::debug!(listener = listener_name, connections = late, "served connections accepted while stopping");
    }
    tokio::time::sleep(ACCEPTED_SETTLE).await;
    info!(listener = listener_name, "http: draining connections");
    drain.cancel();
    // Long polls end at once with what they hold (a 304 or the change), rather than keeping
    // their connections, and the drain, for up to their wait.
    app.long_polls.stop.cancel();
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(app.settings.shutdown_grace, drained).await.is_err() {
        warn!(listener = listener_name, connections = connections.len(), "http: grace period over, closing remaining connections");
        // Ended here, not left running past the node's stop: a command whose client is still
        // connected is handed to the proxy's tracker as its request is dropped (`Detachable`),
        // which the node waits for before it stops the broker, so no handler stops part-way.
        connections.abort_all();
        let ended = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(ABORTED_WAIT, ended).await.is_err() {
            warn!(listener = listener_name, "http: connections still ending after they were closed");
        }
    }
}

/// What a request's head holds in memory, about: its target and header fields, with HTTP/2's 32
/// bytes a field (RFC 9113 §6.5.2). Counted in a budget of `--max-body-buffered` bytes of heads
/// (`HttpSettings::heads`) from when the request comes until its answer is written: each HTTP/2 stream may carry 48 KiB of headers
/// (`H2_MAX_HEADER_LIST`) that HPACK lets a client send in a few bytes, and a request waiting
/// on a body that does not come, or on its handler, held them outside any bound but
/// `--max-connections` times `MAX_STREAMS`.
fn head_bytes<B>(req: &Request<B>) -> usize {
    let fields: usize = req.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + 32).sum();
    let uri = req.uri();
    uri.path_and_query().map_or(0, |p| p.as_str().len()) + uri.authority().map_or(0, |a| a.as_str().len()) + fields
}

/// Counts `req`'s head in `budget` (`head_bytes`), or says why not: a 503 while the budget is
/// full, a 431 for a head larger than all of it (it would never fit). The probes, `/metrics`
/// and the cluster view are counted past a full budget when `probes_pass` (the request is
/// alone on its connection, as a kubelet's is), as their answers are (`handle`): a full
/// budget must not make the node look dead, nor let a flood of probes past it.
fn count_head<B>(budget: &BodyBudget, held: &mut Held, req: &Request<B>, probes_pass: bool) -> Result<(), ApiError> {
    let bytes = head_bytes(req);
    let cost = bytes + request_floor(budget.total());
    if cost > budget.total() {
        metrics::counter!("raftbridge_http_heads_refused_total").increment(1);
        let message = format!(
            "the request's header fields and target take {bytes} bytes (and {} for the request), more than --max-body-buffered ({})",
            cost - bytes,
            budget.total()
        );
        return Err(ApiError::HeadTooLarge(message));
    }
    if budget.try_count(held, cost) {
        return Ok(());
    }
    if probes_pass && matches!(req.uri().path().trim_start_matches('/'), "healthz" | "readyz" | "metrics" | "cluster") {
        budget.count_anyway(held, cost);
        return Ok(());
    }
    metrics::counter!("raftbridge_http_heads_refused_total").increment(1);
    Err(ApiError::Busy("this node holds as many bytes of request headers as --max-body-buffered allows: retry shortly".into()))
}

/// What a request under way holds besides its head, counted with it (`count_head`): its
/// HTTP/2 stream's state, its task and its handler's future, 9–10 KB measured. HTTP/2
/// streams held open without a body cost that each while counting only a few dozen bytes of
/// head (HPACK), and `--max-connections` × 256 of them reached 23 GB. At most 1/64 of the
/// budget, so that a small one still holds 64 requests.
const REQUEST_FLOOR: usize = 12 * 1024;

fn request_floor(total: usize) -> usize {
    REQUEST_FLOOR.min(total / 64)
}

/// How long closed connections' tasks may take to end (dropping a request hands its command on).
const ABORTED_WAIT: Duration = Duration::from_secs(1);

/// The largest header list an HTTP/2 client may send (`max_header_list_size`).
const H2_MAX_HEADER_LIST: u32 = 48 * 1024;

/// Streams an HTTP/2 client may have open at once (nginx's default): each costs about 10 KB
/// while under way or unsent (counted in the heads budget), and ~2 KB while it waits for its
/// task to be refused (counted nowhere), times `--max-connections`.
const MAX_STREAMS: u32 = 128;

/// How often an idle HTTP/2 client is pinged, and how long its answer may take.
const H2_PING: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// What a connection's service tells its keeper (`keep`): requests begun, requests under way,
/// and when the last one ended; answers made and not yet written, and when one last moved.
#[derive(Debug)]
struct Activity {
    /// When the connection was accepted: `ended_ms` counts from it.
    opened: tokio::time::Instant,
    begun: std::sync::atomic::AtomicU64,
    under_way: std::sync::atomic::AtomicU64,
    ended_ms: std::sync::atomic::AtomicU64,
    /// Answers made and not yet written (`Sending`).
    unsent: std::sync::atomic::AtomicU64,
    /// Of those, refusals (`error::Refused`).
    refusals_unsent: std::sync::atomic::AtomicU64,
    /// When an answer was last written whole (ms since `opened`).
    written_ms: std::sync::atomic::AtomicU64,
    /// The node's heads budget, whose count of unsent refusals this connection's refusals
    /// join (`BodyBudget::refusals_full`); `None` in tests of the connection alone.
    heads: Option<BodyBudget>,
    /// The stall clock: `keep` moves it on every `STALL_TICK`.
    tick: std::sync::atomic::AtomicU64,
    /// Unsent answers by the tick in which they were made or last had bytes taken, modulo
    /// `STALL_BUCKETS`: each answer's own age, not the connection's, so one stream that moves
    /// does not hide the others that wait.
    waiting: [std::sync::atomic::AtomicU64; STALL_BUCKETS],
    /// The heads being read on the connection, in the heads budget (`head::Reading`): counted
    /// by its `FirstHead`, given back as each request begins.
    reading: head::Reading,
}

/// How often a connection's stall clock ticks (`Activity::tick`).
const STALL_TICK: Duration = Duration::from_secs(10);

/// Ticks the stall clock remembers: an answer in the oldest bucket has waited more than
/// `(STALL_BUCKETS - 2) * STALL_TICK` = `stall::WRITE_STALL` (at most one tick more).
const STALL_BUCKETS: usize = 5;

/// Unsent refusals past which an HTTP/2 connection's refusals are stream resets, not answers,
/// once it has written no answer for `UNTAKEN_FOR` (`Activity::takes_no_refusals`).
const REFUSALS_UNTAKEN: u64 = 16;
const UNTAKEN_FOR: Duration = Duration::from_secs(1);
/// Unsent refusals a connection may hold while those of all connections are at their bound
/// (`BodyBudget::refusals_full`): a few answered past it per connection, then resets.
const REFUSALS_HELD_PAST_BOUND: u64 = 4;

/// A request under way on a connection; its drop ends it.
struct UnderWay(Arc<Activity>);

/// An answer made and not yet written; it travels with the answer's bytes (`Counted`), which
/// the connection drops once they are written, or with the connection.
#[derive(Debug)]
struct Sending {
    activity: Arc<Activity>,
    /// The tick whose bucket counts it (`Activity::waiting`).
    tick: u64,
    /// A refusal's answer (`Activity::refusals_unsent`).
    refusal: bool,
}

impl Sending {
    /// `refusal`: counted in `Activity::refusals_unsent` too.
    fn new(activity: &Arc<Activity>, refusal: bool) -> Sending {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
        let tick = activity.tick.load(Acquire);
        activity.waiting[bucket(tick)].fetch_add(1, AcqRel);
        activity.unsent.fetch_add(1, Release);
        if refusal {
            activity.refusals_unsent.fetch_add(1, Release);
            if let Some(heads) = &activity.heads {
                heads.0.refusals.fetch_add(1, Release);
            }
        }
        Sending { activity: activity.clone(), tick, refusal }
    }

    /// Some of the answer's bytes were taken: the client reads. Moved to the current tick's
    /// bucket (one atomic load when it is there already).
    fn moved(&mut self) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let now = self.activity.tick.load(Acquire);
        if now != self.tick {
            self.activity.waiting[bucket(now)].fetch_add(1, AcqRel);
            self.activity.waiting[bucket(self.tick)].fetch_sub(1, AcqRel);
            self.tick = now;
        }
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::{AcqRel, Relaxed, Release};
        self.activity.waiting[bucket(self.tick)].fetch_sub(1, AcqRel);
        let now = self.activity.now_ms();
        self.activity.ended_ms.fetch_max(now, Relaxed);
        self.activity.unsent.fetch_sub(1, Release);
        self.activity.written_ms.fetch_max(now, Relaxed);
        if self.refusal {
            self.activity.refusals_unsent.fetch_sub(1, Release);
            if let Some(heads) = &self.activity.heads {
                heads.0.refusals.fetch_sub(1, Release);
            }
        }
    }
}

fn bucket(tick: u64) -> usize {
    (tick % STALL_BUCKETS as u64) as usize
}

impl Activity {
    /// Answers made on the connection and not yet written.
    fn unsent(&self) -> u64 {
        self.unsent.load(Ordering::Acquire)
    }

    /// Whether the connection's client takes none of its refusals: `REFUSALS_UNTAKEN` of them
    /// unsent, and no answer written for `UNTAKEN_FOR` (nor since the connection opened). A
    /// client that reads has its answers written all along, and a burst of refusals made
    /// before the connection writes any does not count against it. Or whether the refusals
    /// unsent on all connections are as many as the heads budget bounds (1,500 new connections
    /// took 186,556 refusals within their first second) and this one holds a few of them: a
    /// client that is new, or takes its answers, still gets its refusal as an answer (a reset
    /// on every connection made curl give up while attackers held the bound).
    fn takes_no_refusals(&self) -> bool {
        let unsent = self.refusals_unsent.load(Ordering::Acquire);
        let mine = unsent >= REFUSALS_UNTAKEN
            && self.now_ms().saturating_sub(self.written_ms.load(Ordering::Relaxed)) >= UNTAKEN_FOR.as_millis() as u64;
        mine || (unsent >= REFUSALS_HELD_PAST_BOUND && self.heads.as_ref().is_some_and(BodyBudget::refusals_full))
    }

    /// Requests under way on the connection.
    fn requests_under_way(&self) -> u64 {
        self.under_way.load(Ordering::Acquire)
    }

    fn new() -> Activity {
        Activity {
            opened: tokio::time::Instant::now(),
            begun: 0.into(),
            under_way: 0.into(),
            ended_ms: 0.into(),
            unsent: 0.into(),
            refusals_unsent: 0.into(),
            written_ms: 0.into(),
            heads: None,
            tick: 0.into(),
            waiting: Default::default(),
            reading: head::Reading::default(),
        }
    }

    /// A connection's, whose heads being read count in `heads`.
    fn counting(heads: &BodyBudget) -> Activity {
        Activity { reading: head::Reading::new(heads.clone()), heads: Some(heads.clone()), ..Activity::new() }
    }

    fn now_ms(&self) -> u64 {
        tokio::time::Instant::now().saturating_duration_since(self.opened).as_millis() as u64
    }

    /// Moves the stall clock one tick; true if an answer then counts as stalled: none of its
    /// bytes taken for more than `stall::WRITE_STALL` (the bucket of `STALL_BUCKETS - 1` ticks
    /// ago, which the new tick's bucket is not: that one was emptied or judged a tick ago).
    fn stall_tick(&self) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let now = self.tick.fetch_add(1, AcqRel) + 1;
        now >= STALL_BUCKETS as u64 - 1 && self.waiting[bucket(now + 1)].load(Acquire) > 0
    }

    fn begin(self: &Arc<Self>) -> UnderWay {
        use std::sync::atomic::Ordering::Relaxed;
        self.begun.fetch_add(1, Relaxed);
        self.under_way.fetch_add(1, Relaxed);
        // Its head is counted by `count_head` now, parsed; what was read of it is given back.
        self.reading.release();
        UnderWay(self.clone())
    }

    /// Since when the connection has had no request under way and no answer left to write
    /// (`None`: one is).
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        // Acquire: the `ended_ms` stored before a count fell is seen with it.
        (self.under_way.load(Acquire) == 0 && self.unsent.load(Acquire) == 0).then(|| self.opened + Duration::from_millis(self.ended_ms.load(Relaxed)))
    }
}

impl head::Heads for Activity {
    fn reading(&self) -> &head::Reading {
        &self.reading
    }

    fn under_way(&self) -> bool {
        self.under_way.load(std::sync::atomic::Ordering::Relaxed) > 0
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        let ms = self.0.now_ms();
        self.0.ended_ms.fetch_max(ms, Relaxed);
        self.0.under_way.fetch_sub(1, Release);
    }
}

/// How long a connection may wait for its first request, and sit idle between requests.
#[derive(Debug, Clone, Copy)]
struct Idle {
    first_request: Duration,
    between: Duration,
}

/// A connection that can be asked to finish: hyper's, and a test's stand-in.
trait Finish: std::future::Future {
    fn finish(self: std::pin::Pin<&mut Self>);
}

impl<C: hyper_util::server::graceful::GracefulConnection> Finish for C {
    fn finish(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// How a connection's keeper let it go.
#[derive(Debug, PartialEq)]
enum Kept<O> {
    /// It ended, by itself or finished gracefully.
    Served(O),
    /// Dropped: no request began in time.
    Silent,
    /// Dropped: an answer waited unwritten for `stall::WRITE_STALL`, and the connection did
    /// not end within a tick of being finished then.
    Stalled,
}

/// Serves a connection until it ends, and ends it gracefully once the drain begins or when no
/// request has been under way, and no answer left to write, for `limits.between` (HTTP/2 gets a
/// GOAWAY that names the last stream it took, so a client's request racing it is retried
/// safely; HTTP/1 closes between requests). An idle connection holds one of
/// `--max-connections`, and a client that answers HTTP/2 pings kept one for good.
/// `Kept::Silent`, dropped, when no request began within `limits.first_request`: hyper's HTTP/1
/// header timeout starts only once it has told HTTP/1 from HTTP/2 by the first bytes (up to the
/// 24 of the HTTP/2 preface), and an HTTP/2 connection has none, so a client that connected and
/// sent nothing, or a byte or two, held its slot until the node stopped.
///
/// `Kept::Stalled`, finished at once and dropped `STALL_TICK` later unless it ended, when an
/// answer has waited with none of its bytes taken for `stall::WRITE_STALL` (up to a tick
/// more), finishing or not. `stall::Stalling` sees a write the socket refuses; an HTTP/2 client
/// that sends no window updates (or a zero initial window) makes hyper write nothing at all,
/// and its answers (256 streams of them) were held for as long as it answered pings, and past
/// a graceful finish, which waits for every open stream.
async fn keep<C: Finish>(conn: C, activity: &Activity, limits: Idle, drain: &CancellationToken) -> Kept<C::Output> {
    use std::sync::atomic::Ordering::Relaxed;
    tokio::pin!(conn);
    // From now, not from the accept: after a TLS handshake the first request has its own wait.
    let first_by = tokio::time::Instant::now() + limits.first_request;
    // An idle timeout shorter than the first request's wait is judged from its own end, not
    // first at the first request's (requests 4 s apart kept a 2 s one open).
    let mut wake = tokio::time::Instant::now() + limits.first_request.min(limits.between);
    let mut stall_tick = tokio::time::interval_at(tokio::time::Instant::now() + STALL_TICK, STALL_TICK);
    stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut finishing = false;
    let mut stalled = false;
    loop {
        tokio::select! {
            served = &mut conn => return Kept::Served(served),
            _ = stall_tick.tick() => {
                if stalled {
                    // A tick's grace after the stall for the streams that move to end.
                    return Kept::Stalled;
                }
                if activity.stall_tick() {
                    // Finished first (a GOAWAY), so the client's other requests, under way or
                    // racing it, end well or are retried safely; dropped a tick later.
                    metrics::counter!("raftbridge_http_write_stalls_total").increment(1);
                    stalled = true;
                    if !finishing {
                        conn.as_mut().finish();
                        finishing = true;
                    }
                }
            }
            () = drain.cancelled(), if !finishing => {
                conn.as_mut().finish();
                finishing = true;
            }
            () = tokio::time::sleep_until(wake), if !finishing => {
                if activity.begun.load(Relaxed) == 0 {
                    if tokio::time::Instant::now() >= first_by {
                        return Kept::Silent;
                    }
                    wake = first_by;
                    continue;
                }
                let Some(idle_since) = activity.idle_since() else {
                    // Judged again once it could have been idle that long.
                    wake = tokio::time::Instant::now() + limits.between;
                    continue;
                };
                if tokio::time::Instant::now() >= idle_since + limits.between {
                    metrics::counter!("raftbridge_http_idle_closed_total").increment(1);
                    conn.as_mut().finish();
                    finishing = true;
                } else {
                    wake = idle_since + limits.between;
                }
            }
        }
    }
}

/// What an access-log line (`--access-log`) names of a request, taken as it arrives: no
/// query (it may carry a client's credentials or data), no headers, no body. Logged once: as
/// the answer is made (`answered`), as an HTTP/2 refusal is reset (`reset`), or, when the
/// request's future is dropped before either (its client went away, or its connection was
/// closed at a drain or a write stall), as `cancelled` without a status.
struct Access {
    remote: std::net::SocketAddr,
    method: Method,
    path: String,
    version: http::Version,
    start: Instant,
    logged: bool,
}

impl Access {
    fn of(remote: std::net::SocketAddr, req: &Request<Incoming>) -> Access {
        Access { remote, method: req.method().clone(), path: cut(req.uri().path(), 1024), version: req.version(), start: Instant::now(), logged: false }
    }

    /// With the answer's length when it is known (a streamed snapshot's is). Not when it is
    /// written: a client that never reads it is logged too.
    fn log(mut self, status: StatusCode, bytes: Option<u64>, outcome: &'static str) {
        self.line(Some(status.as_u16()), bytes, outcome);
    }

    fn line(&mut self, status: Option<u16>, bytes: Option<u64>, outcome: &'static str) {
        self.logged = true;
        tracing::info!(
            target: "raftbridge::access",
            client = %self.remote,
            method = %self.method,
            path = %self.path,
            version = ?self.version,
            status,
            ms = self.start.elapsed().as_secs_f64() * 1000.0,
            bytes,
            outcome = %outcome,
            "request"
        );
    }
}

impl Drop for Access {
    fn drop(&mut self) {
        if !self.logged {
            self.line(None, None, "cancelled");
        }
    }
}

/// Connections already in the listen backlog that a stopping node still serves, at most.
const BACKLOG_SERVED: usize = 1024;

/// How long connections accepted just before the listener closed have to send their request
/// before the graceful shutdown closes those without one (a loopback or LAN round trip is far
/// less; each of them carries one request, answered with `Connection: close`, while draining).
const ACCEPTED_SETTLE: Duration = Duration::from_millis(100);

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Answer> {
    let start = Instant::now();
    let http1 = req.version() <= http::Version::HTTP_11;
    // Only an answer to a read of the data API that changed nothing may be refused once made (a
    // command is not, whatever its method: its handler has run), and never the probes, the
    // metrics or the cluster view: a full budget must not make the node look dead.
    // Judged on the path as `route` reads it: without its leading slashes (`//v1/secrets/..`
    // is routed as `/v1/secrets/..`, and used to be answered without `no-store`).
    let routed = req.uri().path().trim_start_matches('/');
    let refusable = matches!(*req.method(), Method::GET | Method::HEAD) && routed.starts_with("v1/");
    // A HEAD (`route` serves it as GET, the proxy as a GET command) is answered without the
    // body here, not by hyper: its HTTP/1 side leaves a HEAD's body out, its HTTP/2 side sends
    // it (DATA frames on a HEAD stream, which clients reset). The length stays as GET's.
    let head = req.method() == Method::HEAD;
    // A long poll (`?wait=`) may take minutes by design: timed apart from quick requests.
    let long_poll = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "wait" || p.starts_with("wait=")));
    let path_is_secrets = routed.starts_with("v1/secrets");
    let (route, result) = route(&app, req).await;
    let mut resp = result.unwrap_or_else(ApiError::into_response);
    // A body streamed from a file (its `Content-Length` set by the route).
    let streamed = resp.extensions_mut().remove::<Streamed>().and_then(|s| crate::lock(&s.0).take());
    if head {
        let len = hyper::body::Body::size_hint(resp.body()).exact().unwrap_or(0);
        *resp.body_mut() = Full::new(Bytes::new());
        // A route that streams its GET answers a HEAD with that length and no body.
        if streamed.is_none() && !(len == 0 && resp.headers().contains_key(http::header::CONTENT_LENGTH)) {
            resp.headers_mut().insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    let timed = if long_poll { long_poll_route(route) } else { route };
    metrics::histogram!("raftbridge_http_request_seconds", "route" => timed).record(start.elapsed().as_secs_f64());
    let mut resp = match streamed.filter(|_| !head) {
        Some(rx) => match resp.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()) {
            Some(len) => resp.map(|_| Answer::streamed(rx, len, &app.settings.answers)),
            // A route that streams names the length (a bug otherwise): never an empty 200.
            None => Answer::counted(ApiError::Internal("a streamed answer without its length".into()).into_response(), &app.settings.answers, false),
        },
        None => Answer::counted(resp, &app.settings.answers, refusable),
    };
    // Draining: an HTTP/1 client is told to reconnect (elsewhere, once this node stops
    // accepting), as Envoy does, so that it does not send its next request on a kept-alive
    // connection just as the drain closes it (HTTP/2 gets a GOAWAY from the graceful shutdown).
    if http1 && app.proxy.is_draining() {
        resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    // Every answer under the secret store's routes, whatever made it (a 405, a 400 for a path
    // that does not decode, a 503 of the answer budget): a cache on the way keeps none of them.
    if path_is_secrets {
        resp.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    let status = resp.status().as_u16().to_string();
    metrics::counter!("raftbridge_http_requests_total", "route" => route, "status" => status).increment(1);
    resp
}

type ApiResult = Result<Response<Full<Bytes>>, ApiError>;

/// The realms a 401's `WWW-Authenticate` names: the secret store's token, and the API token.
pub const REALM_SECRETS: &str = "raftbridge secrets";
pub const REALM_API: &str = "raftbridge";

/// The bearer credential a request carries, if any. Given twice, it is a 400, as `If-Match`
/// is: which of two credentials counts is not ours to pick (a proxy in front may have judged
/// the other).
fn bearer(req: &Request<Incoming>) -> Result<Option<&str>, ApiError> {
    if req.headers().get_all(http::header::AUTHORIZATION).iter().count() > 1 {
        return Err(ApiError::BadRequest("give Authorization once".into()));
    }
    Ok(req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, rest) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    }))
}

/// Whether a route (its path's segments) takes the API token when the node has one. Open: the
/// probes and `/metrics` (orchestrators, load balancers and Prometheus read them), the OpenAPI
/// document, and the secret store, which takes its own token (`stores::authorize`). The
/// services' endpoints under `/api/` never reach this: they are the app's, and so is their auth.
fn needs_api_token(segs: &[&str]) -> bool {
    !matches!(segs, ["healthz"] | ["readyz"] | ["metrics"] | ["openapi.json"] | ["v1", "secrets", ..])
}

/// `--api-token`: the data and admin API answers only a client that sends one of the node's
/// tokens (the current or, while clients move, the previous one), or the read token
/// (`--api-read-token`) for a GET or HEAD. Each is compared in constant time
/// (`ClusterSecret::matches`).
fn authorize_api(app: &App, req: &Request<Incoming>, reads: bool) -> Result<(), ApiError> {
    if app.api_tokens.is_empty() {
        return Ok(());
    }
    match bearer(req)? {
        Some(given) if app.api_tokens.iter().any(|t| t.matches(given.as_bytes())) => Ok(()),
        Some(given) if app.api_read_token.as_ref().is_some_and(|t| t.matches(given.as_bytes())) => match reads {
            true => Ok(()),
            false if matches!(*req.method(), Method::GET | Method::HEAD) => {
                Err(ApiError::Forbidden("the read token (--api-read-token) may not save snapshots: use the --api-token".into()))
            }
            false => Err(ApiError::Forbidden(format!("the read token (--api-read-token) may not {}: only GET and HEAD", req.method()))),
        },
        Some(_) => Err(ApiError::Unauthorized { realm: REALM_API, message: "the bearer token is not this node's --api-token".into() }),
        None => Err(ApiError::Unauthorized {
            realm: REALM_API,
            message: "this API wants a bearer token (Authorization: Bearer <--api-token>)".into(),
        }),
    }
}

async fn route(app: &App, req: Request<Incoming>) -> (&'static str, ApiResult) {
    let path = req.uri().path().to_string();
    // HEAD is GET without the body (RFC 9110 §9.3.2; hyper leaves the body out and keeps its
    // length): load balancers and uptime checks probe with it. Commands under `/api/` keep
    // their own method (a command is declared for one).
    let method = match req.method() {
        &Method::HEAD => Method::GET,
        m => m.clone(),
    };
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(4, '/').collect();
    // A node removed while it runs takes no work (`/readyz` says so): it keeps no state in
    // step (its reads fail), so a write it passed on could not be read back through it, and its
    // routing holds the registry as it last learned it. Its probes, `/cluster` and the answers
    // to leases it still holds stay.
    let answers_lease = matches!((&method, segs.as_slice()), (&Method::POST, ["v1", "subscriptions", _, "ack" | "nack" | "term"]));
    if matches!(segs.first(), Some(&("v1" | "api"))) && !answers_lease && app.cluster.takes_no_work() {
        return ("removed", Err(ApiError::Unavailable(REMOVED.into())));
    }
    if path.starts_with("/api/") {
        return ("api", Ok(app.proxy.handle(req, app.settings.max_body, &app.settings.bodies).await));
    }
    // Before any route reads the request: a client without the token learns nothing from the
    // answer but that it needs one (not which stores, keys or members exist).
    if needs_api_token(&segs) {
        // A snapshot holds every command's stored answer and the secrets' ciphertext: not for
        // a read-only client, as Consul's wants a management token.
        let reads = matches!(method, Method::GET) && !matches!(segs.as_slice(), ["cluster", "snapshot"]);
        if let Err(e) = authorize_api(app, &req, reads) {
            return ("unauthorized", Err(e));
        }
    }
    if let Some(takes) = query_params_of(&method, segs.as_slice()) {
        // The secret store's token (its routes skip the API token's check above) before the
        // query's: a client without it learns nothing, not even which parameters a route takes.
        if let ["v1", "secrets", ..] = segs.as_slice() {
            if let Err(e) = stores::authorize(app, &req) {
                return ("unauthorized", Err(e));
            }
        }
        if let Err(e) = only_query_params(req.uri().query(), takes) {
            return ("bad_query", Err(e));
        }
    }
    match (method, segs.as_slice()) {
        (Method::GET, ["openapi.json"]) => ("openapi", Ok(json_response(StatusCode::OK, &app.proxy.openapi()))),
        (Method::GET, ["healthz"]) => ("healthz", Ok(json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))))
        ,
        (Method::GET, ["readyz"]) => ("readyz", readyz(app)),
        (Method::GET, ["metrics"]) => ("metrics", metrics_text(app).await),
        (Method::GET, ["cluster"]) => ("cluster", Ok(json_response(StatusCode::OK, &cluster_view(app)))),
        (Method::DELETE, ["cluster", "members", id]) => ("cluster_remove", remove_member(app, id).await),
        (Method::GET, ["cluster", "snapshot"]) => {
            // Without an API token, a node whose secret store has a token of its own wants that
            // one: the snapshot names every secret's key (sealed values), which that token guards.
            // A node with neither serves no snapshot of a state that holds secrets: the tokens
            // may differ per node, and another node's secrets token guards them there.
            if app.api_tokens.is_empty() && app.secrets_token.is_some() {
                if let Err(e) = stores::authorize(app, &req) {
                    return ("unauthorized", Err(e));
                }
            } else if app.api_tokens.is_empty() && app.sm.holds_store_under(crate::store::Space::Secrets.prefix()) {
                return (
                    "unauthorized",
                    Err(ApiError::Forbidden(
                        "the state holds secrets, and this node has neither --api-token nor --secrets-token to check a client by: save the snapshot through a node that has one".into(),
                    )),
                );
            }
            ("cluster_snapshot", snapshot::download(app, req.method() == Method::HEAD).await)
        }
        (Method::POST, ["v1", "events", name]) => match crate::proxy::routing::percent_decode_with(name, false) {
            Some(name) => ("events_publish", events::publish_one(app, &name, req).await),
            None => ("events_publish", Err(ApiError::BadRequest("the event name in the path is not valid percent-encoded UTF-8".into()))),
        },
        (Method::POST, ["v1", "events"]) => ("events_batch", events::publish_batch(app, req).await),
        (Method::GET, ["v1", "events"]) => ("events_read", events::read(app, req.uri().query()).await),
        (Method::GET, ["v1", "dead-letters"]) => ("dead_letters", events::dead_letters(app, req.uri().query())),
        (Method::GET, ["v1", "subscriptions"]) => ("subscriptions", events::subscriptions(app)),
        (m @ (Method::GET | Method::DELETE), ["v1", "subscriptions", name]) => match crate::proxy::routing::percent_decode_with(name, false) {
            Some(name) if m == Method::GET => ("subscription", events::subscription(app, &name)),
            Some(name) => ("subscription_drop", events::drop_subscription(app, &name).await),
            None => ("subscription", Err(ApiError::BadRequest("the subscription name in the path is not valid percent-encoded UTF-8".into()))),
        },
        (m, ["v1", space @ ("state" | "config" | "secrets"), store, key]) => {
            let (space, route, _) = store_space(space);
            // Percent-decoded, as the proxy decodes a command's path parameters: a handler's
            // key `counter/a b` is `/v1/state/demo/counter/a%20b` here.
            let decode = |s: &str| crate::proxy::routing::percent_decode_with(s, false);
            match (decode(store), decode(key)) {
                (Some(store), Some(key)) => (route, stores::key(app, space, m, &store, &key, req).await),
                _ => (route, Err(ApiError::BadRequest("store or key is not valid percent-encoded UTF-8".into()))),
            }
        }
        (Method::GET, ["v1", space @ ("state" | "config" | "secrets"), store]) => {
            let (space, _, route) = store_space(space);
            match crate::proxy::routing::percent_decode_with(store, false) {
                Some(store) => (route, stores::listing(app, space, &store, req).await),
                None => (route, Err(ApiError::BadRequest("the store name is not valid percent-encoded UTF-8".into()))),
            }
        }
        (_, ["healthz" | "readyz" | "metrics" | "cluster" | "openapi.json"])
        | (_, ["v1", "dead-letters"])
        | (_, ["v1", "subscriptions"]) => ("other", Err(not_allowed("GET, HEAD"))),
        (_, ["v1", "subscriptions", _]) => ("other", Err(not_allowed("GET, HEAD, DELETE"))),
        (Method::POST, ["v1", "subscriptions", name, action @ ("fetch" | "ack" | "nack" | "term")]) => match crate::proxy::routing::percent_decode_with(name, false) {
            Some(name) if *action == "fetch" => ("pull_fetch", events::pull_fetch(app, &name, req.uri().query()).await),
            Some(name) => ("pull_answer", events::pull_answer(app, &name, action, req).await),
            None => ("pull", Err(ApiError::BadRequest("the subscription name in the path is not valid percent-encoded UTF-8".into()))),
        },
        (Method::POST, ["v1", "subscriptions", name, "seek"]) => match crate::proxy::routing::percent_decode_with(name, false) {
            Some(name) => ("subscription_seek", events::seek_subscription(app, &name, req).await),
            None => ("subscription_seek", Err(ApiError::BadRequest("the subscription name in the path is not valid percent-encoded UTF-8".into()))),
        },
        (_, ["v1", "subscriptions", _, "fetch" | "ack" | "nack" | "term" | "seek"]) => ("other", Err(not_allowed("POST"))),
        (Method::POST, ["v1", space @ ("state" | "config"), store]) => {
            let (space, route) = match *space {
                "config" => (crate::store::Space::Config, "config_txn"),
                _ => (crate::store::Space::State, "state_txn"),
            };
            match crate::proxy::routing::percent_decode_with(store, false) {
                Some(store) => (route, stores::transaction(app, space, &store, req).await),
                None => (route, Err(ApiError::BadRequest("the store name is not valid percent-encoded UTF-8".into()))),
            }
        }
        (_, ["v1", "state" | "config", _]) => ("other", Err(not_allowed("GET, HEAD, POST"))),
        (_, ["v1", "secrets", _]) => ("other", Err(not_allowed("GET, HEAD"))),
        (_, ["v1", "events"]) => ("other", Err(not_allowed("GET, HEAD, POST"))),
        (_, ["v1", "events", _]) => ("other", Err(not_allowed("POST"))),
        (_, ["cluster", "members", _]) => ("other", Err(not_allowed("DELETE"))),
        (_, ["cluster", "snapshot"]) => ("other", Err(not_allowed("GET, HEAD"))),
        // The path is echoed cut to 256 bytes: an answer need not repeat 64 KiB of input.
        _ => ("unknown", Err(ApiError::NotFound(format!("no route for {}", cut(&path, 256))))),
    }
}

/// `s` cut to at most `max` bytes at a character boundary (`sdk::truncate_utf8`), for echoing
/// client input in an error.
pub(crate) fn cut(s: &str, max: usize) -> String {
    let mut s = s.to_string();
    crate::sdk::truncate_utf8(&mut s, max);
    s
}

fn readyz(app: &App) -> ApiResult {
    if app.proxy.is_draining() {
        return Err(ApiError::Unavailable("draining: shutting down".into()));
    }
    if !app.registered.load(std::sync::atomic::Ordering::SeqCst) && app.cluster.ready() {
        return Err(ApiError::Unavailable("registering this node's services".into()));
    }
    if app.cluster.ready() {
        Ok(json_response(StatusCode::OK, &serde_json::json!({"status": "ready"})))
    } else if app.cluster.removed_while_running() {
        Err(ApiError::Unavailable(REMOVED.into()))
    } else {
        match app.cluster.apply_backlog() {
            behind if behind > crate::cluster::KEEP_UP_LAG => Err(ApiError::Unavailable(format!("catching up: {behind} entries of its log to apply"))),
            _ => Err(ApiError::Unavailable("not in a cluster with a leader".into())),
        }
    }
}

/// Renders on a blocking thread: draining a histogram waits for any thread that is recording
/// into it at that moment (the fsync thread, a preempted task), and under load that wait took up
/// to 65 ms; on the async worker it stalled every request of the node, and `raftbridge bench`,
/// which scrapes at the start and end of its window, measured it as publish outliers.
async fn metrics_text(app: &App) -> ApiResult {
    let m = app.replica.metrics();
    metrics::gauge!("raftbridge_raft_term").set(m.current_term as f64);
    metrics::gauge!("raftbridge_raft_applied_index").set(m.last_applied.map(|l| l.index).unwrap_or(0) as f64);
    metrics::gauge!("raftbridge_raft_last_log_index").set(m.last_log_index.unwrap_or(0) as f64);
    // By its state, not by whom it names: a leader that removed itself steps down (a learner)
    // and still names itself, and would count as a second leader.
    metrics::gauge!("raftbridge_raft_is_leader").set(if m.state == openraft::ServerState::Leader { 1.0 } else { 0.0 });
    metrics::gauge!("raftbridge_http_body_bytes_held").set(app.settings.bodies.held() as f64);
    metrics::gauge!("raftbridge_http_answer_bytes_held").set(app.settings.answers.held() as f64);
    metrics::gauge!("raftbridge_http_head_bytes_held").set(app.settings.heads.held() as f64);
    app.pulls.export_gauges();
    if let Some(cpu) = crate::process::cpu_time() {
        metrics::gauge!("process_cpu_seconds_total").set(cpu.as_secs_f64());
    }
    let body = match app.metrics.clone() {
        Some(h) => {
            let _one = app.rendering.acquire().await.map_err(|_| ApiError::Unavailable("shutting down".into()))?;
            tokio::task::spawn_blocking(move || h.render())
            .await
            .map_err(|e| ApiError::Internal(format!("rendering metrics: {e}")))?
        }
        None => String::new(),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    Ok(resp)
}

fn cluster_view(app: &App) -> serde_json::Value {
    let m = app.replica.metrics();
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let members: Vec<serde_json::Value> = membership
        .nodes()
        .map(|(id, node)| {
            serde_json::json!({
                "id": id,
                "addr": node.addr,
                "voter": voters.contains(id),
                "reachable": app.replica.net.reachable(*id),
                // Since anything arrived from it (null: no live link); a stopped peer's link
                // stays up a while, silent.
                "heard_ms_ago": app.replica.net.heard_ago(*id).map(|d| d.as_millis() as u64),
                // Its clock minus ours (`peer::clock`): 0 for this node, null while unmeasured.
                "clock_offset_ms": if *id == m.id {
                    Some(0.0)
                } else {
                    app.replica.net.clock_offset(*id).map(|c| c.offset_us as f64 / 1000.0)
                },
                // The peer features (`peer::frame::features`, a bit set) it announced on its
                // link to this node, or as the state records them; null: neither.
                "features": app.replica.net.features_known(*id, m.membership_config.log_id().as_ref().map_or(0, |l| l.index)),
            })
        })
        .collect();
    let state = match m.state {
        crate::raft::types::ServerState::Leader => "Leader",
        crate::raft::types::ServerState::Follower => "Follower",
        crate::raft::types::ServerState::Learner => "Learner",
        crate::raft::types::ServerState::Candidate => "Candidate",
        crate::raft::types::ServerState::Shutdown => "Shutdown",
    };
    serde_json::json!({
        "node_id": m.id,
        "cluster_name": app.cluster_name,
        // The id of the history this node's state holds (null: none yet); nodes with
        // different ids refuse each other's links.
        "cluster_id": app.replica.net.cluster_id().map(|id| format!("{id:032x}")),
        // As writes see it: a leader that removed itself names nobody (openraft keeps its
        // own id there, with the node a learner).
        "leader": app.replica.leader(),
        "term": m.current_term,
        "state": state,
        "committed": m.local_committed.map(|l| l.index),
        "applied": m.last_applied.map(|l| l.index),
        "last_log": m.last_log_index,
        "snapshot": m.snapshot.map(|l| l.index),
        "purged": m.purged.map(|l| l.index),
        "members": members,
        // This node was removed while it ran: the rest of this view is as it last learned it.
        "removed": app.cluster.removed_while_running(),
        // A membership change in progress: `voter` then marks a voter of either configuration.
        "joint": membership.get_joint_config().len() > 1,
        "state_digest": format!("{:016x}", app.sm.digest()),
    })
}

async fn remove_member(app: &App, id: &str) -> ApiResult {
    // Percent-decoded as every path parameter is, then in canonical decimal only: this route
    // removes a member, and `+1` or `01` read as node 1 is not what a client that sent them
    // can be assumed to mean.
    let id = crate::proxy::routing::percent_decode_with(id, false).unwrap_or_else(|| id.to_string());
    let id: u64 = decimal(&id)
        .filter(|n| n.to_string() == id)
        .ok_or_else(|| ApiError::BadRequest(format!("bad node id {:?}: a node id is a whole number in decimal digits", cut(&id, 64))))?;
    // This node's view of the membership: a node added a moment ago may not be in it yet, which
    // a retry settles.
    let metrics = app.replica.metrics();
    if metrics.membership_config.membership().get_node(&id).is_none() {
        // A repeat sent to the node that was removed (a leader's own log holds the membership
        // without it; a follower's is forwarded, as it never receives that entry): its removal
        // is done, as the README promises. Only for a process that saw itself a member: a
        // joiner still catching up does not find itself in its view either, and nothing of it
        // was removed.
        if id == app.replica.id() && app.cluster.was_member() {
            return Ok(json_response(StatusCode::OK, &serde_json::json!({"removed": id})));
        }
        return Err(ApiError::NotFound(format!("node {id} is not a member")));
    }
    app.cluster.remove(id).await?;
    Ok(json_response(StatusCode::OK, &serde_json::json!({"removed": id})))
}

/// A state write's precondition: `If-Match: N` (revision N; 0: absent), `If-Match: *` (exists),
/// `If-None-Match: *` (absent). Anything else, or both headers, is a 400.
fn precondition(req: &Request<Incoming>) -> Result<Precondition, ApiError> {
    let text = |name: http::header::HeaderName| -> Result<Option<String>, ApiError> {
        // Two lines of one header are a list (RFC 9110 §5.3), which a one-value form refuses
        // too: reading only the first would compare against a revision the client did not mean.
        if req.headers().get_all(&name).iter().count() > 1 {
            return Err(ApiError::BadRequest(format!("give {name} once")));
        }
        match req.headers().get(&name) {
            None => Ok(None),
            Some(v) => {
                let s = v.to_str().map_err(|_| ApiError::BadRequest(format!("{name} is not text")))?;
                Ok(Some(s.trim().trim_matches('"').to_string()))
            }
        }
    };
    match (text(http::header::IF_MATCH)?, text(http::header::IF_NONE_MATCH)?) {
        (None, None) => Ok(Precondition::Any),
        (Some(_), Some(_)) => Err(ApiError::BadRequest("give If-Match or If-None-Match, not both".into())),
        (Some(m), None) if m == "*" => Ok(Precondition::Exists),
        (Some(m), None) => decimal(&m)
            .map(Precondition::Revision)
            .ok_or_else(|| ApiError::BadRequest(format!("If-Match must be a revision number or *, got {m:?}"))),
        (None, Some(n)) if n == "*" => Ok(Precondition::Absent),
        (None, Some(n)) => Err(ApiError::BadRequest(format!("If-None-Match takes only *, got {n:?}"))),
    }
}

/// A whole number written in decimal digits only (Rust's parse also takes a leading `+`).
pub fn decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Longest value of a client-set metadata header (`x-principal-id`, `x-tenant-id`,
/// `idempotency-key`): each travels with every event and command it is set on, into the log.
pub const MAX_META_LEN: usize = 256;

/// A client-set metadata header: `None` when absent or blank, else its trimmed value, which must
/// be 1..=`MAX_META_LEN` bytes of visible ASCII (HTTP header text). Anything else is a 400: a
/// key or identity silently dropped would make a retry publish twice, or an event lose its
/// tenant. Given twice, it is a 400 too (as `If-Match` is): which of two tenants or keys the
/// client meant is not ours to pick.
pub fn meta_header<'a>(h: &'a http::HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    let mut values = h.get_all(name).iter();
    let Some(v) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ApiError::BadRequest(format!("give {name} once")));
    }
    let v = v.to_str().map_err(|_| ApiError::BadRequest(format!("{name} must be visible ASCII")))?.trim();
    if v.len() > MAX_META_LEN {
        return Err(ApiError::BadRequest(format!("{name} must be at most {MAX_META_LEN} bytes")));
    }
    // A blank key is refused rather than read as none: the client meant its request to be
    // deduplicated, and dropping the key would publish or run its retry twice (a batch item's
    // blank `idempotencyKey` is refused alike).
    if v.is_empty() && name.eq_ignore_ascii_case("idempotency-key") {
        return Err(ApiError::BadRequest(format!("{name} is blank: give a key of 1..={MAX_META_LEN} bytes, or none")));
    }
    Ok(Some(v).filter(|v| !v.is_empty()))
}

/// How long a request's body may take to arrive, whole.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes of request bodies this node holds at once, across all connections and streams
/// (`--max-body-buffered`). Each body is bounded by `--max-body`, but 10,000 connections with
/// up to 256 HTTP/2 streams each could otherwise make the node hold terabytes; past the budget a
/// request is refused with 503 at once (not queued: a queue would hold the connection anyway).
/// A body's bytes are counted as they arrive (not from what `Content-Length` announces: a client
/// announcing big bodies and sending nothing would hold the budget for free) and given back
/// when its handler has answered ([`Received`] is dropped). Copies a handler makes (an event
/// built from the body, a peer frame) are not counted: the budget bounds what clients send,
/// and what is held is at most a small multiple of it.
#[derive(Debug, Clone)]
pub struct BodyBudget(Arc<BudgetInner>);

#[derive(Debug)]
struct BudgetInner {
    /// Bytes counted now; added to by `read_body`, taken off when a `Held` drops. Exported as
    /// `raftbridge_http_body_bytes_held` when `/metrics` is scraped.
    used: AtomicUsize,
    total: usize,
    /// Whether an answer larger than `total` is held (at most one: `Answer::counted`).
    whole: std::sync::atomic::AtomicBool,
    /// The heads budget's: refusals made past it and not yet written, on every connection
    /// (`Sending`). They are counted in no budget (they say the budget is full); past
    /// `refusals_full` an HTTP/2 refusal is a stream reset instead.
    refusals: AtomicUsize,
}

/// What an unsent refusal is reckoned to hold (its stream's state in h2 and its frames) when
/// the number of them is bounded by the heads budget (`BodyBudget::refusals_full`).
const REFUSAL_COST: usize = 16 * 1024;

impl BodyBudget {
    pub fn new(total: usize) -> BodyBudget {
        BodyBudget(Arc::new(BudgetInner { used: AtomicUsize::new(0), total, whole: std::sync::atomic::AtomicBool::new(false), refusals: AtomicUsize::new(0) }))
    }

    /// Whether the refusals unsent on every connection reckon a sixteenth of this budget
    /// (`REFUSAL_COST` each, at least `REFUSALS_UNTAKEN` of them).
    fn refusals_full(&self) -> bool {
        let most = (self.0.total / 16 / REFUSAL_COST).max(REFUSALS_UNTAKEN as usize);
        self.0.refusals.load(Ordering::Acquire) >= most
    }

    /// Bytes it may count (`--max-body-buffered`).
    pub fn total(&self) -> usize {
        self.0.total
    }

    /// Bytes of bodies counted now.
    pub fn held(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }

    /// Counts `n` more bytes into `held`, or refuses (503) if the budget has no room for them.
    fn take(&self, held: &mut Held, n: usize) -> Result<(), ApiError> {
        if !self.try_count(held, n) {
            metrics::counter!("raftbridge_http_bodies_refused_total").increment(1);
            return Err(ApiError::Busy(
                "this node holds as many bytes of request bodies as --max-body-buffered allows: retry shortly".into(),
            ));
        }
        Ok(())
    }

    /// Counts `n` more bytes into `held` whether or not the budget has room for them.
    fn count_anyway(&self, held: &mut Held, n: usize) {
        self.0.used.fetch_add(n, Ordering::AcqRel);
        held.budget.get_or_insert_with(|| self.clone());
        held.bytes += n;
    }

    /// Counts `n` more bytes into `held` if the budget has room for them.
    fn try_count(&self, held: &mut Held, n: usize) -> bool {
        let inner = &self.0;
        if inner.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(n).filter(|u| *u <= inner.total)).is_err() {
            return false;
        }
        // The budget is referenced only by bodies that took from it (not by empty ones).
        held.budget.get_or_insert_with(|| self.clone());
        held.bytes += n;
        true
    }
}

/// An answer on its way to a client, its bytes counted in the node's answer budget
/// (`HttpSettings::answers`) until they are written or its connection drops. Answers are built
/// whole (a page of events, a state value), and a client that reads slowly holds its answer
/// for as long as it makes progress (`stall`): their total, not only their time, has a bound.
/// The count travels with the bytes (`Counted`): hyper keeps the buffer it was given until it
/// is written (the streams are write-vectored), and HTTP/2 until it is sent.
#[derive(Debug)]
pub struct Answer {
    /// `None` once handed to the connection.
    data: Option<Counted>,
    /// A body read from a file chunk by chunk (`Streamed`), after `data`.
    stream: Option<Stream>,
}

/// A body too large to make whole (`GET /cluster/snapshot`: the whole state): its route
/// starts a reader that sends the chunks through a channel of `STREAM_CHUNKS`, and puts the
/// receiving end in its answer's extensions, which `handle` moves into the `Answer`. So a
/// download holds a few chunks at a time, each counted in the answer budget until written,
/// whatever its size. The reader stops when the receiver is dropped (the client went).
/// (Clone, as an extension must be; taken once.)
#[derive(Clone)]
pub(crate) struct Streamed(Arc<std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>>>>);

/// Chunks a streamed body's reader may have read ahead of the connection.
pub(crate) const STREAM_CHUNKS: usize = 4;

impl Streamed {
    pub(crate) fn new(rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>) -> Streamed {
        Streamed(Arc::new(std::sync::Mutex::new(Some(rx))))
    }
}

#[derive(Debug)]
struct Stream {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    budget: BodyBudget,
    /// Bytes still to come (the answer's `Content-Length`).
    left: u64,
    /// The request's head and floor (`Answer::hold`), until the last chunk is written.
    head: Option<Held>,
    /// The connection each chunk is unsent on until written (`Answer::track`).
    activity: Option<Arc<Activity>>,
}

/// The least answer that may be refused when the answer budget is full (`Answer::counted`).
const REFUSABLE_ANSWER: usize = 64 * 1024;

/// An answer's bytes and their share of the answer budget, given back when dropped (written).
#[derive(Debug)]
pub struct Counted {
    bytes: Bytes,
    _held: Held,
    /// The request's head and floor in the heads budget (`count_head`), until its answer is
    /// written.
    _head: Held,
    /// Tells the connection's keeper the answer is unsent, and when its bytes move (`keep`).
    sending: Option<Sending>,
}

impl hyper::body::Buf for Counted {
    fn remaining(&self) -> usize {
        self.bytes.remaining()
    }
    fn chunk(&self) -> &[u8] {
        self.bytes.chunk()
    }
    fn advance(&mut self, n: usize) {
        self.bytes.advance(n);
        if let Some(sending) = self.sending.as_mut().filter(|_| n > 0) {
            sending.moved();
        }
    }
}

impl Answer {
    /// `resp` counted in `budget`. One that does not fit: a 503 (a short one, not counted)
    /// when `refusable` (a request that changed nothing: refusing a write that committed would
    /// say "not stored, retry" of a stored write), else counted past the budget.
    fn counted(resp: Response<Full<Bytes>>, budget: &BodyBudget, refusable: bool) -> Response<Answer> {
        let (parts, body) = resp.into_parts();
        let bytes = full_bytes(body);
        let mut held = Held::default();
        if !bytes.is_empty() && !budget.try_count(&mut held, bytes.len()) {
            // Small answers are counted past the budget too: a 503 would save little. So is
            // one larger than the whole budget, one at a time (the budget's `whole` place, taken
            // here and given back when the answer is written or dropped): it would be refused
            // however often it was asked for (reads size their pages to a quarter of the
            // budget, so only a single large value or event comes here), and one at a time
            // keeps what is held past the budget to one answer.
            let whole = bytes.len() > budget.total() && budget.0.whole.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok();
            if refusable && bytes.len() >= REFUSABLE_ANSWER && !whole {
                metrics::counter!("raftbridge_http_answers_refused_total").increment(1);
                let busy = ApiError::Busy("this node holds as many bytes of answers being sent as --max-body-buffered allows: retry shortly".into());
                // Short, and not counted.
                return busy.into_response().map(|body| Answer::of(full_bytes(body), Held::default()));
            }
            budget.count_anyway(&mut held, bytes.len());
            held.whole = whole;
        }
        Response::from_parts(parts, Answer::of(bytes, held))
    }

    fn of(bytes: Bytes, held: Held) -> Answer {
        Answer { data: (!bytes.is_empty()).then_some(Counted { bytes, _held: held, _head: Held::default(), sending: None }), stream: None }
    }

    /// The chunks `rx` brings, `len` bytes in all, each counted in `budget` until written.
    fn streamed(rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>, len: u64, budget: &BodyBudget) -> Answer {
        Answer { data: None, stream: Some(Stream { rx, budget: budget.clone(), left: len, head: None, activity: None }) }
    }

    /// Keeps the request's `head` counted until the answer is written (dropped at once for an
    /// answer without bytes: its head frame is not held by flow control).
    fn hold(&mut self, head: Held) {
        if let Some(data) = &mut self.data {
            data._head = head;
        } else if let Some(stream) = &mut self.stream {
            stream.head = Some(head);
        }
    }

    /// Counted on `activity`'s connection as unsent until its bytes are written (`keep` ends a
    /// connection whose answers wait unwritten for `stall::WRITE_STALL`).
    fn track(&mut self, activity: &Arc<Activity>, refusal: bool) {
        if let Some(data) = &mut self.data {
            data.sending = Some(Sending::new(activity, refusal));
        } else if let Some(stream) = &mut self.stream {
            stream.activity = Some(activity.clone());
        }
    }
}

/// The one buffer a `Full` holds: it is ready at once and cannot fail (polled in place, with no
/// waker to wake and nothing allocated, on the path of every answer).
fn full_bytes(mut body: Full<Bytes>) -> Bytes {
    use hyper::body::Body as _;
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(&mut body).poll_frame(&mut cx) {
        std::task::Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

impl hyper::body::Body for Answer {
    type Data = Counted;
    /// Only a streamed body fails (its file could not be read on): hyper then resets the
    /// stream or closes the connection, so the client sees a download cut short, never one
    /// that looks whole.
    type Error = std::io::Error;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<hyper::body::Frame<Counted>, std::io::Error>>> {
        use std::task::Poll;
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(hyper::body::Frame::data(d))));
        }
        let Some(stream) = self.stream.as_mut() else { return Poll::Ready(None) };
        if stream.left == 0 {
            self.stream = None;
            return Poll::Ready(None);
        }
        match stream.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(bytes))) if bytes.len() as u64 <= stream.left && !bytes.is_empty() => {
                stream.left -= bytes.len() as u64;
                let mut held = Held::default();
                // Counted past a full budget: the download is under way, and its chunks are few.
                stream.budget.count_anyway(&mut held, bytes.len());
                let sending = stream.activity.as_ref().map(|a| Sending::new(a, false));
                // The last chunk carries the head, so it stays counted until the end is written.
                let head = if stream.left == 0 { stream.head.take().unwrap_or_default() } else { Held::default() };
                Poll::Ready(Some(Ok(hyper::body::Frame::data(Counted { bytes, _held: held, _head: head, sending }))))
            }
            Poll::Ready(Some(Ok(_))) => {
                self.stream = None;
                Poll::Ready(Some(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the streamed file changed length while it was read"))))
            }
            Poll::Ready(Some(Err(e))) => {
                self.stream = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.stream = None;
                Poll::Ready(Some(Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the streamed file ended early"))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.stream.as_ref().is_none_or(|s| s.left == 0)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let data = self.data.as_ref().map_or(0, |d| d.bytes.len() as u64);
        hyper::body::SizeHint::with_exact(data + self.stream.as_ref().map_or(0, |s| s.left))
    }
}

/// The bytes one body counts in the [`BodyBudget`], given back when dropped.
#[derive(Debug, Default)]
struct Held {
    /// Set by the first `take`.
    budget: Option<BodyBudget>,
    bytes: usize,
    /// Holds the budget's one place for an answer larger than all of it (`Answer::counted`).
    whole: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.0.used.fetch_sub(self.bytes, Ordering::AcqRel);
            if self.whole {
                budget.0.whole.store(false, Ordering::Release);
            }
        }
    }
}

/// A request body read whole, holding its share of the node's [`BodyBudget`] until dropped.
#[derive(Debug)]
pub struct Received {
    bytes: Bytes,
    _held: Held,
}

impl std::ops::Deref for Received {
    type Target = Bytes;
    fn deref(&self) -> &Bytes {
        &self.bytes
    }
}

/// Read the whole body, enforcing the size limit (413), the node's body budget (503) and
/// `BODY_READ_TIMEOUT` (408).
pub async fn read_body<B>(req: Request<B>, limit: usize, budget: &BodyBudget) -> Result<Received, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut announced = None;
    if let Some(len) = req.headers().get(http::header::CONTENT_LENGTH) {
        let len: u64 = len.to_str().ok().and_then(|s| s.parse().ok()).ok_or_else(|| ApiError::BadRequest("bad Content-Length".into()))?;
        if len > limit as u64 {
            return Err(ApiError::TooLarge { limit });
        }
        announced = Some(len as usize); // at most `limit`, a usize
    }
    // A client that trickles its body would hold a connection slot for ever (hyper's header
    // timeout does not cover the body), hence the deadline. Most bodies have arrived with their
    // headers: one poll takes them without arming a timer (one per publish otherwise).
    let mut held = Held::default();
    let collect = async move {
        let mut body = std::pin::pin!(req.into_body());
        // One chunk (the usual case) is kept as it came; more are copied into one buffer.
        let mut first: Option<Bytes> = None;
        let mut rest: Option<bytes::BytesMut> = None;
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::BadRequest(format!("reading body: {}", e.into())))?;
            let Ok(data) = frame.into_data() else { continue }; // trailers: not part of the body
            if data.is_empty() {
                continue;
            }
            total = total.saturating_add(data.len());
            if total > limit {
                return Err(ApiError::TooLarge { limit });
            }
            if announced.is_some_and(|len| total > len) {
                // hyper enforces it for HTTP/1 and HTTP/2; other bodies are checked here.
                return Err(ApiError::BadRequest("body longer than its Content-Length".into()));
            }
            budget.take(&mut held, data.len())?;
            match (&mut first, &mut rest) {
                (None, _) => first = Some(data),
                (Some(one), None) => {
                    // Sized by what arrived (and at most 64 KiB more of what was announced), not
                    // by the announced length alone: a client that announces 1 MiB and trickles
                    // bytes would hold memory the body budget does not count. It grows as
                    // bytes come.
                    let mut buf = bytes::BytesMut::with_capacity(total.max(announced.unwrap_or(0).min(total + (64 << 10))));
                    buf.extend_from_slice(one);
                    buf.extend_from_slice(&data);
                    rest = Some(buf);
                }
                (Some(_), Some(buf)) => buf.extend_from_slice(&data),
            }
        }
        let bytes = match rest {
            Some(buf) => buf.freeze(),
            None => first.unwrap_or_default(),
        };
        Ok((bytes, held))
    };
    tokio::pin!(collect);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(std::future::Future::poll(collect.as_mut(), cx))).await;
    let (bytes, held) = match first {
        std::task::Poll::Ready(c) => c,
        std::task::Poll::Pending => match tokio::time::timeout(BODY_READ_TIMEOUT, collect).await {
            Ok(c) => c,
            Err(_) => return Err(ApiError::RequestTimeout(BODY_READ_TIMEOUT)),
        },
    }?;
    Ok(Received { bytes, _held: held })
}

/// The store a `/v1/{space}/...` path names, and its route labels (key, listing) for metrics.
/// The route a long poll (`?wait=`) is timed under in `raftbridge_http_request_seconds`: a
/// watch that waits its minutes by design would otherwise set the route's tail, and hide how
/// long its quick reads and writes take. Routes that take no `wait` keep their name.
fn long_poll_route(route: &'static str) -> &'static str {
    match route {
        "state" => "state_wait",
        "config" => "config_wait",
        "secrets" => "secrets_wait",
        "state_list" => "state_list_wait",
        "config_list" => "config_list_wait",
        "secrets_list" => "secrets_list_wait",
        "events_read" => "events_read_wait",
        other => other,
    }
}

/// What a node removed while it ran answers `/readyz` and its data API and commands with.
const REMOVED: &str = "removed from the cluster while it ran: stop this node (to bring the machine back, start a node with an empty data dir and a new --id: it joins as a new member)";

fn store_space(space: &str) -> (crate::store::Space, &'static str, &'static str) {
    match space {
        "config" => (crate::store::Space::Config, "config", "config_list"),
        "secrets" => (crate::store::Space::Secrets, "secrets", "secrets_list"),
        _ => (crate::store::Space::State, "state", "state_list"),
    }
}

/// The query parameters a route under `/v1/` or `/cluster/` takes (`None`: not checked). A
/// misspelt one (`?tll=30`, `?consitency=stale`, `?evenName=`) used to be ignored and the
/// request served as if it were absent: a key that never expires, a read that waited for the
/// leader, a page of every event. Probes (`/healthz`, `/readyz`, `/metrics`, `/cluster`,
/// `/openapi.json`) stay lenient, as a checker may add a parameter of its own; commands under
/// `/api/` hand theirs to the handler. A `ttl` where none is taken gets a message that says
/// which request takes one.
fn query_params_of(method: &Method, segs: &[&str]) -> Option<&'static [&'static str]> {
    Some(match (method, segs) {
        (&Method::GET, ["v1", "state" | "config" | "secrets", _, _]) => &["consistency", "wait", "index"],
        (&Method::PUT, ["v1", "state" | "config" | "secrets", _, _]) => &["ttl"],
        (&Method::GET, ["v1", "state" | "config" | "secrets", _]) => &["prefix", "after", "limit", "consistency", "wait", "index"],
        (&Method::GET, ["v1", "events"]) => &["after", "limit", "eventName", "wait"],
        (&Method::GET, ["v1", "dead-letters"]) => &["subscription", "after", "limit"],
        (&Method::POST, ["v1", "subscriptions", _, "fetch"]) => &["max", "wait"],
        (&Method::POST, ["v1", "subscriptions", _, "ack" | "nack" | "term" | "seek"]) => &[],
        (&Method::POST, ["v1", "events"] | ["v1", "events", _] | ["v1", "state" | "config", _])
        | (&Method::GET, ["v1", "subscriptions"])
        | (&Method::GET | &Method::DELETE, ["v1", "subscriptions", _])
        | (&Method::DELETE, ["cluster", "members", _] | ["v1", "state" | "config" | "secrets", _, _])
        | (&Method::GET, ["cluster", "snapshot"]) => &[],
        _ => return None,
    })
}

/// 400 for a query parameter the route does not take, naming it and the ones it does.
fn only_query_params(query: Option<&str>, takes: &[&str]) -> Result<(), ApiError> {
    let Some(query) = query.filter(|q| !q.is_empty()) else { return Ok(()) };
    let q = crate::proxy::routing::parse_query(query).ok_or_else(|| ApiError::BadRequest("malformed query".into()))?;
    match q.keys().find(|k| !takes.contains(&k.as_str())) {
        None => Ok(()),
        // Said plainly: a client that meant to set an expiry would otherwise believe it had.
        Some(ttl) if ttl == "ttl" => Err(ApiError::BadRequest("ttl: only a PUT of a key takes one".into())),
        Some(unknown) if takes.is_empty() => Err(ApiError::BadRequest(format!("unknown query parameter {:?}: this route takes none", cut(unknown, 64)))),
        Some(unknown) => Err(ApiError::BadRequest(format!("unknown query parameter {:?}: this route takes {}", cut(unknown, 64), takes.join(", ")))),
    }
}

fn not_allowed(allow: &str) -> ApiError {
    ApiError::MethodNotAllowed { allow: allow.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_parameter_a_route_does_not_take_is_refused_by_name() {
        let takes = |m: Method, path: &str| query_params_of(&m, &path.trim_start_matches('/').splitn(4, '/').collect::<Vec<_>>());
        let check = |m: Method, path: &str, q: &str| takes(m, path).map(|t| only_query_params(Some(q), t));
        assert!(matches!(check(Method::PUT, "/v1/state/s/k", "ttl=5"), Some(Ok(()))));
        assert!(matches!(check(Method::GET, "/v1/state/s/k", "consistency=stale&wait=5s&index=3"), Some(Ok(()))));
        assert!(matches!(check(Method::GET, "/v1/config/s", "prefix=a&after=b&limit=3"), Some(Ok(()))));
        assert!(matches!(check(Method::GET, "/v1/events", "after=1&limit=2&eventName=x&wait=1s"), Some(Ok(()))));
        assert!(matches!(check(Method::GET, "/v1/events", ""), Some(Ok(()))));
        let refused = |m: Method, path: &str, q: &str| match check(m, path, q) {
            Some(Err(ApiError::BadRequest(msg))) => msg,
            other => panic!("{path}?{q}: {:?}", other.map(|r| r.is_ok())),
        };
        assert_eq!(refused(Method::PUT, "/v1/state/s/k", "tll=5"), "unknown query parameter \"tll\": this route takes ttl");
        assert!(refused(Method::GET, "/v1/state/s/k", "consitency=stale").ends_with("takes consistency, wait, index"));
        assert_eq!(refused(Method::DELETE, "/v1/state/s/k", "ttl=5"), "ttl: only a PUT of a key takes one");
        assert_eq!(refused(Method::GET, "/v1/config/s", "ttl=5"), "ttl: only a PUT of a key takes one");
        assert_eq!(refused(Method::DELETE, "/v1/state/s/k", "x=1"), "unknown query parameter \"x\": this route takes none");
        assert_eq!(refused(Method::POST, "/v1/events/e", "x"), "unknown query parameter \"x\": this route takes none");
        assert!(refused(Method::GET, "/v1/dead-letters", "subscription=a&afer=3").contains("\"afer\""));
        assert!(refused(Method::GET, "/v1/events", "a=%zz").contains("malformed"));
        // Probes and commands are not checked here.
        for path in ["/healthz", "/readyz", "/metrics", "/cluster", "/openapi.json", "/api/v1/orders"] {
            assert!(takes(Method::GET, path).is_none(), "{path}");
        }
    }

    /// Stands in for hyper's connection: ends once asked to finish.
    struct Conn(bool);

    impl std::future::Future for Conn {
        type Output = ();
        fn poll(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<()> {
            if self.0 { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
        }
    }

    impl Finish for Conn {
        fn finish(mut self: std::pin::Pin<&mut Self>) {
            self.0 = true;
        }
    }

    const LIMITS: Idle = Idle { first_request: Duration::from_secs(10), between: Duration::from_secs(60) };

    /// Runs `keep` on a stand-in connection; the answer is how it ended (`Kept`), and when.
    fn kept(activity: &Arc<Activity>, drain: &CancellationToken) -> tokio::task::JoinHandle<(Kept<()>, tokio::time::Instant)> {
        let (activity, drain) = (activity.clone(), drain.clone());
        tokio::spawn(async move { (keep(Conn(false), &activity, LIMITS, &drain).await, tokio::time::Instant::now()) })
    }

    /// A streamed answer (a snapshot download) takes its chunks as they come, each counted in
    /// the answer budget until written; the request's head stays counted until the last chunk
    /// is written; a stream that ends before its length, or fails, is an error, never a body
    /// that looks whole.
    #[tokio::test]
    async fn a_streamed_answer_counts_each_chunk_until_written_and_fails_when_cut_short() {
        use hyper::body::Body as _;
        let budget = BodyBudget::new(1 << 20);
        let heads = BodyBudget::new(1 << 20);
        let next = |body: &mut Answer| {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            std::pin::Pin::new(body).poll_frame(&mut cx)
        };
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_CHUNKS);
        let mut body = Answer::streamed(rx, 10, &budget);
        let mut head = Held::default();
        heads.count_anyway(&mut head, 100);
        body.hold(head);
        assert_eq!(body.size_hint().exact(), Some(10));
        assert!(!body.is_end_stream());
        assert!(next(&mut body).is_pending(), "nothing read yet");
        tx.send(Ok(Bytes::from_static(b"0123"))).await.expect("send");
        let std::task::Poll::Ready(Some(Ok(frame))) = next(&mut body) else { panic!("a chunk") };
        let mut first = frame.into_data().expect("data");
        assert_eq!((budget.held(), heads.held(), body.size_hint().exact()), (4, 100, Some(6)));
        hyper::body::Buf::advance(&mut first, 4);
        drop(first);
        assert_eq!(budget.held(), 0, "written: given back");
        tx.send(Ok(Bytes::from_static(b"456789"))).await.expect("send");
        let std::task::Poll::Ready(Some(Ok(frame))) = next(&mut body) else { panic!("the last chunk") };
        assert!(body.is_end_stream());
        assert_eq!((budget.held(), heads.held()), (6, 100), "the head goes with the last chunk");
        drop(frame);
        assert_eq!((budget.held(), heads.held()), (0, 0));
        assert!(matches!(next(&mut body), std::task::Poll::Ready(None)));
        // Cut short: the reader ends (or fails) before the length.
        for failure in [None, Some(std::io::Error::other("disk gone"))] {
            let (tx, rx) = tokio::sync::mpsc::channel(STREAM_CHUNKS);
            let mut body = Answer::streamed(rx, 10, &budget);
            tx.send(Ok(Bytes::from_static(b"01234"))).await.expect("send");
            let std::task::Poll::Ready(Some(Ok(_))) = next(&mut body) else { panic!("a chunk") };
            match failure {
                None => drop(tx),
                Some(e) => tx.send(Err(e)).await.expect("send"),
            }
            assert!(matches!(next(&mut body), std::task::Poll::Ready(Some(Err(_)))), "an error, not the end");
            assert!(matches!(next(&mut body), std::task::Poll::Ready(None)));
        }
        // A chunk past the length is an error too (the file grew under the reader).
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_CHUNKS);
        let mut body = Answer::streamed(rx, 3, &budget);
        tx.send(Ok(Bytes::from_static(b"0123"))).await.expect("send");
        assert!(matches!(next(&mut body), std::task::Poll::Ready(Some(Err(_)))));
        assert_eq!(budget.held(), 0);
    }

    /// Answers count in their budget from when they are made until their bytes are written
    /// (the buffer handed to the connection is dropped) or dropped unwritten; one that does not
    /// fit is a 503 instead if it may be refused, else counted past the budget.
    #[tokio::test]
    async fn answers_are_held_in_their_budget_until_written() {
        use hyper::body::Body as _;
        let k = REFUSABLE_ANSWER;
        let budget = BodyBudget::new(2 * k);
        let text = |s: &'static str| Response::new(Full::new(Bytes::from_static(s.as_bytes())));
        let sized = |n: usize| Response::new(Full::new(Bytes::from(vec![b'x'; n])));
        let first = Answer::counted(sized(k + 5), &budget, true);
        assert_eq!((first.status(), budget.held()), (StatusCode::OK, k + 5));
        assert_eq!(first.body().size_hint().exact(), Some(k as u64 + 5));
        let over = Answer::counted(sized(k), &budget, true);
        assert_eq!((over.status(), budget.held()), (StatusCode::SERVICE_UNAVAILABLE, k + 5), "past the budget");
        let small = Answer::counted(text("12345"), &budget, true);
        assert_eq!((small.status(), budget.held()), (StatusCode::OK, k + 10), "a small answer is never refused");
        drop(small);
        let write = Answer::counted(sized(k), &budget, false);
        assert_eq!((write.status(), budget.held()), (StatusCode::OK, 2 * k + 5), "a write's answer is never refused");
        drop(write);
        assert_eq!(budget.held(), k + 5, "a dropped answer gives its bytes back");
        // Taken by the connection: still counted while its buffer is held, until written.
        let mut body = first.into_body();
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await.expect("a frame").expect("infallible");
        assert!(body.is_end_stream());
        let mut data = frame.into_data().expect("data");
        assert_eq!(budget.held(), k + 5, "handed over, not yet written");
        hyper::body::Buf::advance(&mut data, k + 5);
        drop(data);
        assert_eq!(budget.held(), 0, "written: given back");
        assert_eq!(Answer::counted(text(""), &budget, true).status(), StatusCode::OK, "an empty answer always fits");
        // One larger than the whole budget is taken while the budget holds nothing else (a
        // retry could never fit it), and refused while another is held: one at a time.
        let small = Answer::counted(sized(k), &budget, true);
        let whole = Answer::counted(sized(2 * k + 1), &budget, true);
        assert_eq!(whole.status(), StatusCode::OK, "taken beside others");
        assert_eq!(Answer::counted(sized(2 * k + 1), &budget, true).status(), StatusCode::SERVICE_UNAVAILABLE, "not two at once");
        drop(whole);
        assert_eq!(Answer::counted(sized(2 * k + 1), &budget, true).status(), StatusCode::OK, "its place is given back");
        drop(small);
    }

    /// Stands in for a connection that does not end when finished (a stream that waits).
    struct Stuck(Arc<std::sync::atomic::AtomicBool>);

    impl std::future::Future for Stuck {
        type Output = ();
        fn poll(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<()> {
            std::task::Poll::Pending
        }
    }

    impl Finish for Stuck {
        fn finish(self: std::pin::Pin<&mut Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Runs `keep` on a connection that does not end when finished; the flag tells whether it
    /// was finished, the handle how it ended and when.
    fn kept_stuck(activity: &Arc<Activity>) -> (Arc<std::sync::atomic::AtomicBool>, tokio::task::JoinHandle<(Kept<()>, tokio::time::Instant)>) {
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (activity, flag) = (activity.clone(), finished.clone());
        let keeper = tokio::spawn(async move { (keep(Stuck(flag), &activity, LIMITS, &CancellationToken::new()).await, tokio::time::Instant::now()) });
        (finished, keeper)
    }

    /// An answer made on `activity`'s connection and taken by it, not yet written.
    async fn unsent(activity: &Arc<Activity>, budget: &BodyBudget) -> Counted {
        use hyper::body::Body as _;
        let mut answer = Answer::counted(Response::new(Full::new(Bytes::from(vec![b'x'; 1000]))), budget, true).into_body();
        answer.track(activity, false);
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut answer).poll_frame(cx)).await.unwrap().unwrap().into_data().unwrap()
    }

    /// An HTTP/2 client that takes no bytes of an answer (a zero window): hyper writes nothing,
    /// so only the answers' own count tells. An answer that waits unwritten past the stall
    /// limit finishes the connection (a GOAWAY), and a tick later it is dropped if it has not
    /// ended; another answer on it that moves all along does not hide the one that waits.
    #[tokio::test(start_paused = true)]
    async fn a_connection_with_an_answer_that_waits_unwritten_is_finished_then_dropped() {
        let activity = Arc::new(Activity::new());
        let budget = BodyBudget::new(1 << 20);
        let (finished, keeper) = kept_stuck(&activity);
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(activity.begin());
        let waits = unsent(&activity, &budget).await;
        let made = tokio::time::Instant::now();
        assert!(activity.idle_since().is_none(), "an unsent answer is not idle");
        let mut moves = unsent(&activity, &budget).await;
        let mut finished_at = None;
        for _ in 0..120 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            hyper::body::Buf::advance(&mut moves, 1);
            if finished_at.is_none() && finished.load(std::sync::atomic::Ordering::SeqCst) {
                finished_at = Some(tokio::time::Instant::now());
            }
            if keeper.is_finished() {
                break;
            }
        }
        let finished_at = finished_at.expect("finished");
        assert!(finished_at - made > stall::WRITE_STALL && finished_at - made <= stall::WRITE_STALL + STALL_TICK, "finished {:?} after the answer was made", finished_at - made);
        let (kept, at) = keeper.await.unwrap();
        assert_eq!(kept, Kept::Stalled);
        assert!(at - finished_at <= STALL_TICK, "dropped {:?} after the GOAWAY", at - finished_at);
        drop((waits, moves));
        assert_eq!((activity.unsent.load(std::sync::atomic::Ordering::SeqCst), budget.held()), (0, 0), "written or dropped: nothing waits");
        assert!(activity.waiting.iter().all(|w| w.load(std::sync::atomic::Ordering::SeqCst) == 0));
    }

    /// A slow client whose answer moves, however slowly, is served: only an answer with none
    /// of its bytes taken for the stall limit counts.
    #[tokio::test(start_paused = true)]
    async fn an_answer_that_moves_slowly_keeps_its_connection() {
        let activity = Arc::new(Activity::new());
        let budget = BodyBudget::new(1 << 20);
        let (finished, keeper) = kept_stuck(&activity);
        drop(activity.begin());
        let mut slow = unsent(&activity, &budget).await;
        for _ in 0..20 {
            tokio::time::sleep(stall::WRITE_STALL - Duration::from_secs(2)).await;
            hyper::body::Buf::advance(&mut slow, 1);
        }
        assert!(!finished.load(std::sync::atomic::Ordering::SeqCst) && !keeper.is_finished(), "a moving answer for 10 minutes");
        keeper.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_written_answer_leaves_the_connection_to_the_idle_timeout() {
        let activity = Arc::new(Activity::new());
        let budget = BodyBudget::new(1 << 20);
        let keeper = kept(&activity, &CancellationToken::new());
        let mut answer = Answer::counted(Response::new(Full::new(Bytes::from_static(b"ok"))), &budget, true).into_body();
        drop(activity.begin());
        answer.track(&activity, false);
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(answer);
        let written = tokio::time::Instant::now();
        let (kept, at) = keeper.await.unwrap();
        assert_eq!(kept, Kept::Served(()));
        assert_eq!(at - written, LIMITS.between, "idle from when the answer was written");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_is_dropped_at_the_header_timeout() {
        let activity = Arc::new(Activity::new());
        let (served, at) = kept(&activity, &CancellationToken::new()).await.unwrap();
        assert_eq!(served, Kept::Silent);
        assert_eq!(at - activity.opened, LIMITS.first_request, "counted from when the keeper starts (here: at once)");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_finished_once_no_request_was_under_way_for_the_idle_timeout() {
        let activity = Arc::new(Activity::new());
        let keeper = kept(&activity, &CancellationToken::new());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let first = activity.begin();
        // A request longer than the idle timeout keeps the connection.
        tokio::time::sleep(LIMITS.between * 2).await;
        assert!(!keeper.is_finished(), "a request is under way");
        drop(first);
        let ended = tokio::time::Instant::now();
        tokio::time::sleep(LIMITS.between / 2).await;
        // Another request restarts the wait.
        drop(activity.begin());
        let last = tokio::time::Instant::now();
        tokio::time::sleep(LIMITS.between / 2 + Duration::from_secs(1)).await;
        assert!(!keeper.is_finished(), "idle for {:?} only", tokio::time::Instant::now() - last);
        let (served, at) = keeper.await.unwrap();
        assert_eq!(served, Kept::Served(()), "finished, not dropped");
        assert!(at - last >= LIMITS.between && at - last < LIMITS.between + Duration::from_secs(1), "{:?} after the last request", at - last);
        assert!(at - ended > LIMITS.between);
    }

    /// An idle timeout shorter than the header timeout is judged from the last request's end,
    /// not first once the header timeout has passed.
    #[tokio::test(start_paused = true)]
    async fn a_short_idle_timeout_is_judged_from_the_last_request() {
        let limits = Idle { first_request: Duration::from_secs(10), between: Duration::from_secs(2) };
        let activity = Arc::new(Activity::new());
        let keeper = {
            let activity = activity.clone();
            tokio::spawn(async move { (keep(Conn(false), &activity, limits, &CancellationToken::new()).await, tokio::time::Instant::now()) })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(activity.begin());
        let ended = tokio::time::Instant::now();
        let (served, at) = keeper.await.unwrap();
        assert_eq!(served, Kept::Served(()));
        assert_eq!(at - ended, limits.between, "idle for the idle timeout after the request");
        // Without a request, the first request's wait still holds in full.
        let silent = Arc::new(Activity::new());
        assert_eq!(keep(Conn(false), &silent, limits, &CancellationToken::new()).await, Kept::Silent);
        assert_eq!(tokio::time::Instant::now() - silent.opened, limits.first_request);
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_finishes_a_connection_at_once() {
        let activity = Arc::new(Activity::new());
        let drain = CancellationToken::new();
        let keeper = kept(&activity, &drain);
        let _under_way = activity.begin();
        tokio::time::sleep(Duration::from_secs(2)).await;
        drain.cancel();
        let cancelled = tokio::time::Instant::now();
        let (served, at) = keeper.await.unwrap();
        assert_eq!((served, at), (Kept::Served(()), cancelled));
    }

    #[test]
    fn echoed_input_is_cut_at_a_character_boundary() {
        assert_eq!(cut("short", 256), "short");
        let long = "é".repeat(200);
        let c = cut(&long, 255);
        assert!(c.len() <= 255 && c.ends_with('…') && c.starts_with("éé"), "{c}");
    }

    type Chunks = futures_util::stream::BoxStream<'static, Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>;

    /// A body whose first chunk comes at once and the rest never.
    fn trickle() -> Request<http_body_util::StreamBody<Chunks>> {
        use futures_util::StreamExt;
        let first = futures_util::stream::iter([Ok(hyper::body::Frame::data(Bytes::from_static(b"{\"a\":")))]);
        let stream = first.chain(futures_util::stream::pending()).boxed();
        Request::new(http_body_util::StreamBody::new(stream))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_does_not_arrive_in_time_is_a_408() {
        let budget = BodyBudget::new(4096);
        let err = read_body(trickle(), 1024, &budget).await.expect_err("never complete");
        assert!(matches!(err, ApiError::RequestTimeout(_)), "{err:?}");
        assert_eq!(err.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(budget.held(), 0, "what the trickle took is given back");
        let whole = Request::new(Full::new(Bytes::from_static(b"{}")));
        assert_eq!(*read_body(whole, 1024, &budget).await.expect("a whole body"), Bytes::from_static(b"{}"));
    }

    /// A body of `chunks`, each sent as its own frame, without a `Content-Length`.
    fn chunked(chunks: &[&'static [u8]]) -> Request<http_body_util::StreamBody<Chunks>> {
        use futures_util::StreamExt;
        let frames: Vec<_> = chunks.iter().map(|c| Ok(hyper::body::Frame::data(Bytes::from_static(c)))).collect();
        Request::new(http_body_util::StreamBody::new(futures_util::stream::iter(frames).boxed()))
    }

    fn with_length(body: &'static [u8]) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::from_static(body)));
        req.headers_mut().insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        req
    }

    /// A request counts its head and a floor for what it holds besides (`REQUEST_FLOOR`):
    /// HTTP/2 streams opened with a few bytes of head each cost ~9 KB, so a full budget of
    /// them is bounded; a small budget still takes 64 requests; a head larger than the whole
    /// budget is a 431 whatever the floor.
    #[test]
    fn a_request_counts_at_least_the_floor_in_the_heads_budget() {
        let req = |extra: usize| Request::get("/v1/state/s/k").header("x-pad", "p".repeat(extra)).body(()).unwrap();
        let big = BodyBudget::new(256 << 20);
        let mut held = Held::default();
        count_head(&big, &mut held, &req(0), true).expect("room");
        assert_eq!(big.held(), head_bytes(&req(0)) + REQUEST_FLOOR);
        drop(held);
        let budget = BodyBudget::new(100 * REQUEST_FLOOR);
        let mut taken = Vec::new();
        for _ in 0..200 {
            let mut held = Held::default();
            if count_head(&budget, &mut held, &req(10), true).is_err() {
                break;
            }
            taken.push(held);
        }
        assert!((90..=100).contains(&taken.len()), "about the budget over the floor: {}", taken.len());
        let small = BodyBudget::new(8192);
        let mut held = Held::default();
        count_head(&small, &mut held, &req(0), true).expect("a small budget takes a small request");
        assert!(small.held() < 1024, "the floor is at most 1/64 of it: {}", small.held());
        assert!(matches!(count_head(&small, &mut Held::default(), &req(9000), true), Err(ApiError::HeadTooLarge(_))));
        // A full budget: probes pass on a connection that takes its answers, not on one that
        // takes none.
        let probe = Request::get("/metrics").body(()).unwrap();
        assert!(matches!(count_head(&budget, &mut Held::default(), &req(10), true), Err(ApiError::Busy(_))));
        let mut passed = Held::default();
        count_head(&budget, &mut passed, &probe, true).expect("a probe passes a full budget");
        assert!(matches!(count_head(&budget, &mut Held::default(), &probe, false), Err(ApiError::Busy(_))));
    }

    /// Refusals unsent on all connections are bounded by the heads budget (16 KiB each, a
    /// sixteenth of it, at least 16): past that a new connection's refusals are resets too.
    #[test]
    fn refusals_unsent_on_every_connection_are_bounded_by_the_heads_budget() {
        let budget = BodyBudget::new(32 * 16 * REFUSAL_COST);
        let (a, b) = (Arc::new(Activity::counting(&budget)), Arc::new(Activity::counting(&budget)));
        let mut held: Vec<Sending> = (0..20).map(|_| Sending::new(&a, true)).collect();
        held.extend((0..11).map(|_| Sending::new(&b, true)));
        drop(Sending::new(&b, false));
        assert!(!b.takes_no_refusals(), "31 of 32: b is new and wrote an answer");
        held.push(Sending::new(&b, true));
        assert!(a.takes_no_refusals() && b.takes_no_refusals(), "32 unsent on the node");
        let c = Arc::new(Activity::counting(&budget));
        assert!(!c.takes_no_refusals(), "a connection that holds none still gets an answer");
        held.extend((0..REFUSALS_HELD_PAST_BOUND).map(|_| Sending::new(&c, true)));
        assert!(c.takes_no_refusals(), "then a few, past the bound");
        held.truncate(10);
        assert!(!b.takes_no_refusals(), "written, given back");
        assert_eq!(budget.0.refusals.load(Ordering::Acquire), 10);
        drop(held);
        assert_eq!(budget.0.refusals.load(Ordering::Acquire), 0);
    }

    /// A connection takes no refusals once 16 wait unsent and no answer was written for a
    /// second (nor since it opened): a burst of refusals on a client that reads does not count.
    #[tokio::test(start_paused = true)]
    async fn a_connection_takes_no_refusals_only_with_many_unsent_and_nothing_written_for_a_second() {
        let activity = Arc::new(Activity::new());
        let mut refusals: Vec<Sending> = (0..REFUSALS_UNTAKEN).map(|_| Sending::new(&activity, true)).collect();
        assert!(!activity.takes_no_refusals(), "a new connection: a burst before its first write");
        tokio::time::sleep(UNTAKEN_FOR).await;
        assert!(activity.takes_no_refusals(), "16 unsent, nothing written for a second");
        drop(Sending::new(&activity, false));
        assert!(!activity.takes_no_refusals(), "an answer was just written");
        tokio::time::sleep(UNTAKEN_FOR).await;
        assert!(activity.takes_no_refusals());
        tokio::time::sleep(UNTAKEN_FOR).await;
        refusals.pop();
        assert!(!activity.takes_no_refusals(), "15 unsent");
        refusals.push(Sending::new(&activity, true));
        assert!(!activity.takes_no_refusals(), "16 again, but one was written just now");
    }

    #[tokio::test]
    async fn bodies_held_at_once_share_the_node_budget() {
        let budget = BodyBudget::new(10);
        let used = |b: &BodyBudget| b.held();
        let first = read_body(with_length(b"12345678"), 100, &budget).await.expect("fits the budget");
        assert_eq!(*first, Bytes::from_static(b"12345678"));
        assert_eq!(used(&budget), 8);
        let err = read_body(with_length(b"1234"), 100, &budget).await.expect_err("no room while the first is held");
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE, "{err:?}");
        let err = read_body(chunked(&[b"12", b"34"]), 100, &budget).await.expect_err("no room chunk by chunk either");
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE, "{err:?}");
        assert_eq!(used(&budget), 8, "the refused body's first chunk was given back");
        drop(first);
        let whole = read_body(chunked(&[b"1234", b"5678", b"90"]), 100, &budget).await.expect("room again");
        assert_eq!(*whole, Bytes::from_static(b"1234567890"));
        assert_eq!(used(&budget), 10, "a chunked body holds what it took");
        drop(whole);
        let err = read_body(chunked(&[b"1234", b"5678"]), 6, &budget).await.expect_err("over the body limit");
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE, "{err:?}");
        assert_eq!(*read_body(chunked(&[]), 6, &budget).await.expect("empty"), Bytes::new());
        // A body is counted as it arrives, not as announced: announcing 1,000 bytes takes nothing.
        let mut announced = chunked(&[b"12"]);
        announced.headers_mut().insert(http::header::CONTENT_LENGTH, HeaderValue::from(9));
        let partial = read_body(announced, 100, &budget).await.expect("what came");
        assert_eq!(*partial, Bytes::from_static(b"12"));
        let mut longer = chunked(&[b"1234", b"56"]);
        longer.headers_mut().insert(http::header::CONTENT_LENGTH, HeaderValue::from(4));
        let err = read_body(longer, 100, &budget).await.expect_err("longer than announced");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{err:?}");
        drop(partial);
        assert_eq!(used(&budget), 0);
    }

    #[test]
    fn metadata_headers_are_visible_ascii_of_bounded_length() {
        let mut h = http::HeaderMap::new();
        assert_eq!(meta_header(&h, "x-tenant-id").unwrap(), None);
        h.insert("x-tenant-id", HeaderValue::from_static("  t1 "));
        assert_eq!(meta_header(&h, "x-tenant-id").unwrap(), Some("t1"));
        h.insert("x-tenant-id", HeaderValue::from_static("   "));
        assert_eq!(meta_header(&h, "x-tenant-id").unwrap(), None, "blank is absent");
        h.insert("x-tenant-id", HeaderValue::from_str(&"t".repeat(MAX_META_LEN)).unwrap());
        assert!(meta_header(&h, "x-tenant-id").is_ok());
        h.insert("x-tenant-id", HeaderValue::from_str(&"t".repeat(MAX_META_LEN + 1)).unwrap());
        assert!(matches!(meta_header(&h, "x-tenant-id"), Err(ApiError::BadRequest(_))));
        h.insert("idempotency-key", HeaderValue::from_bytes("café".as_bytes()).unwrap());
        assert!(matches!(meta_header(&h, "idempotency-key"), Err(ApiError::BadRequest(m)) if m.contains("idempotency-key")));
        h.insert("idempotency-key", HeaderValue::from_static(" "));
        assert!(matches!(meta_header(&h, "idempotency-key"), Err(ApiError::BadRequest(m)) if m.contains("blank")), "a blank key is not dropped");
        // Twice: a 400 naming the header, not the first value taken.
        let mut h = http::HeaderMap::new();
        h.append("x-tenant-id", http::HeaderValue::from_static("t1"));
        h.append("x-tenant-id", http::HeaderValue::from_static("t2"));
        assert!(matches!(meta_header(&h, "x-tenant-id"), Err(ApiError::BadRequest(m)) if m.contains("x-tenant-id")));
    }
}
