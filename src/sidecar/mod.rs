//! Sidecar mode: commands served by an app in any language running next to the node.
//!
//! The `[sidecar]` section of the TOML config lists commands (service, version, method, path) and
//! the local upstream URL that serves them. Each becomes an ordinary [`ServiceParts`] entry whose
//! handler forwards the call over HTTP/1.1, so the proxy, the registry and the deadlines treat a
//! sidecar command exactly like a compiled-in one.
//!
//! Why it is built this way:
//! - Connections are [`crate::client::Conn`]s kept in a small LIFO pool of idle keep-alive
//!   connections: the upstream is on loopback, where a TCP handshake per request would be most of
//!   the cost, and the most recently used connection is the one least likely to have been closed.
//! - Failures are mapped so the caller can tell whose fault they are: the app's own 4xx pass
//!   through (they are answers), a 5xx or a broken connection is 502 and no answer in time is 504.
//!   An upstream failure is never reported as 400.
//! - A background task probes `health_path`; [`Sidecar::healthy`] lets the node stop advertising
//!   these commands while the app is down, so the proxy routes to nodes whose app is up. It
//!   takes `unhealthy_threshold` failed probes in a row (one slow answer under load does not
//!   withdraw the node), but a refused connection, probe or request, takes the app down at once:
//!   nothing listens. Such a request reached nothing, so it is `not_served` (the proxy tries
//!   another node, a delivery counts no attempt), not a 502 the balancer would read as an answer.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::client::{ClientError, Conn, Response};
use crate::sdk::builder::{deadline, BuildError};
use crate::sdk::{BoxFuture, CommandBuilder, CommandHandler, Ctx, HandlerError, Invocation, Output, Service, ServiceParts};

/// Longest error message taken from an upstream body that is not JSON with a `message`.
const MAX_MESSAGE: usize = 1024;
/// How much sooner than its deadline a request stops waiting for a connection to the app.
const POOL_WAIT_MARGIN: Duration = Duration::from_millis(20);
/// Largest health check answer read (a larger one fails the probe).
const MAX_HEALTH_ANSWER: usize = 64 << 10;
/// Longest a health check may take, whatever the interval.
const MAX_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// A health probe's shortest timeout, whatever the interval.
const MIN_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// The `[sidecar]` section of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// Base URL of the app, `http://host:port` (optionally with a path prefix).
    pub upstream: String,
    /// `GET` path that must answer 2xx while the app can serve; none = always healthy.
    #[serde(default)]
    pub health_path: Option<String>,
    #[serde(default = "default_health_interval_ms")]
    pub health_interval_ms: u64,
    /// Failed probes in a row that take the app's commands out (default 3, as Kubernetes'
    /// `failureThreshold`): one slow answer under load does not withdraw the node. A refused
    /// connection takes them out at once, probe or request.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Passed probes in a row that bring them back (default 1).
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Idle keep-alive connections kept at most.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Connections open to the app at most (busy and idle). A request that finds none free
    /// waits up to its deadline, then gets a 503, as Envoy's circuit breaker does: the app is
    /// not flooded with one connection per concurrent client request.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default)]
    pub commands: Vec<SidecarCommand>,
    /// Events POSTed to the app (`[[sidecar.subscriptions]]`).
    #[serde(default)]
    pub subscriptions: Vec<SidecarSubscription>,
}

/// One `[[sidecar.subscriptions]]` entry: matching events are POSTed (the event's JSON) to
/// `upstream + path`; a 2xx answer acks, anything else or a timeout nacks. The same settings
/// declare a `[[pull.subscriptions]]` entry (`broker::pull`), which takes no `path`,
/// `emit_event`, `service` or `version`.
pub type SidecarSubscription = SubscriptionEntry;

/// A subscription declared in the config file: its name, PURISTA filter and delivery settings
/// (`SubscriptionDecl`), and what the sidecar does with its events.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionEntry {
    pub name: String,
    /// The service the subscription belongs to (the sidecar's default `sidecar`, version 1).
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub version: Option<u32>,
    /// Where the sidecar POSTs its events (required there).
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub event_name: Option<String>,
    #[serde(default)]
    pub sender_service: Option<String>,
    /// A number or a string (`version` above is a number, so a filter on one may be written as
    /// one too); checked as a version when the subscription is declared.
    #[serde(default, deserialize_with = "number_or_text")]
    pub sender_version: Option<String>,
    #[serde(default)]
    pub sender_target: Option<String>,
    #[serde(default)]
    pub message_type: Option<String>,
    #[serde(default)]
    pub principal_id: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default = "default_true")]
    pub shared: bool,
    #[serde(default = "default_true")]
    pub durable: bool,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The kind's own default unless set (`SIDECAR_ACK_DEADLINE_MS`, `pull`'s).
    #[serde(default)]
    pub ack_deadline_ms: Option<u64>,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// When set, the app's 2xx answer to a delivery is emitted as an event of this name (its
    /// body the payload; an empty body emits nothing), once per delivered event, as an SDK
    /// handler's returned event is. An answer that is not JSON is a nack.
    #[serde(default)]
    pub emit_event: Option<String>,
}

/// A sidecar subscription's ack deadline unless it sets one: the timeout of its POST to the app.
pub const SIDECAR_ACK_DEADLINE_MS: u64 = 10_000;

impl SubscriptionEntry {
    /// The declaration, with `ack_deadline_ms` unless the entry sets one.
    pub fn decl(&self, ack_deadline_ms: u64) -> crate::broker::event::SubscriptionDecl {
        crate::broker::event::SubscriptionDecl {
            name: self.name.clone(),
            filter: crate::broker::event::EventFilter {
                event_name: self.event_name.clone(),
                sender_service: self.sender_service.clone(),
                sender_version: self.sender_version.clone(),
                sender_target: self.sender_target.clone(),
                message_type: self.message_type.clone(),
                principal_id: self.principal_id.clone(),
                tenant_id: self.tenant_id.clone(),
            },
            shared: self.shared,
            durable: self.durable,
            max_attempts: self.max_attempts,
            ack_deadline_ms: self.ack_deadline_ms.unwrap_or(ack_deadline_ms),
            max_in_flight: self.max_in_flight,
        }
    }
}

/// An optional setting given as a string or a whole number (`1` and `"1"` alike).
pub(crate) fn number_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Given;
    impl serde::de::Visitor<'_> for Given {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a version: a whole number or a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            u64::try_from(v).map(|v| v.to_string()).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
    }
    d.deserialize_any(Given).map(Some)
}

pub(crate) fn default_true() -> bool {
    true
}
pub(crate) fn default_max_attempts() -> u32 {
    5
}
pub(crate) fn default_max_in_flight() -> u32 {
    64
}

/// Delivers events of one sidecar subscription to the app.
struct EventPost {
    pool: Arc<Pool>,
    /// The subscription's name (`x-subscription`).
    name: String,
    path: String,
    timeout: Duration,
    /// `SidecarSubscription::emit_event`.
    emit: Option<String>,
}

/// The headers of an event's delivery to a subscription's app, beside the event's JSON body:
/// its trace (`traceparent`, a span of its own; `x-request-id`), identity (`x-principal-id`,
/// `x-tenant-id`, as a command's), and which event it is for whom (`x-event-id`,
/// `x-event-position`, `x-subscription`), so that an app's tracing and logging middleware sees a
/// delivery as it sees a command. A value that cannot be a header is left out (it is in the
/// body all the same).
fn delivery_headers(subscription: &str, event: &crate::broker::event::Event) -> http::HeaderMap {
    let b = &event.body;
    let traceparent = b.trace_id.as_deref().filter(|t| t.len() == 32 && t.bytes().all(|c| c.is_ascii_hexdigit()))
        .map(|t| format!("00-{}-{:016x}-01", t.to_ascii_lowercase(), fastrand::u64(1..)));
    let position = event.position.to_string();
    let fields = [
        ("content-type", Some("application/json")),
        ("traceparent", traceparent.as_deref()),
        ("x-request-id", b.correlation_id.as_deref()),
        ("x-principal-id", b.principal_id.as_deref()),
        ("x-tenant-id", b.tenant_id.as_deref()),
        ("x-event-id", Some(b.id.as_str())),
        ("x-event-position", Some(position.as_str())),
        ("x-subscription", Some(subscription)),
    ];
    let mut map = http::HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        if let Some(value) = value.filter(|v| !v.is_empty()).and_then(|v| http::HeaderValue::from_str(v).ok()) {
            map.insert(name, value);
        }
    }
    map
}

/// The event a subscription's app returns: its 2xx answer `body` as the payload of an event
/// named `emit` (none for an empty body, or without `emit_event`). A body that is not readable
/// JSON is the app's fault: a nack (502), retried, then dead-lettered with the reason.
fn returned_event(emit: Option<&str>, body: &[u8]) -> Result<Option<crate::sdk::Emit>, HandlerError> {
    let Some(event_name) = emit else { return Ok(None) };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let unfit = |e: &dyn std::fmt::Display| HandlerError::new(502, format!("the app's answer cannot be emitted as {event_name}: {e}"));
    crate::broker::event::check_event_payload(body).map_err(|e| unfit(&e))?;
    let payload = serde_json::from_slice(body).map_err(|e| unfit(&e))?;
    Ok(Some(crate::sdk::Emit { event_name: event_name.to_string(), payload }))
}

impl crate::sdk::SubscriptionHandler for EventPost {
    fn handle(
        &self,
        ctx: Ctx,
        event: crate::broker::event::Event,
    ) -> BoxFuture<Result<Option<crate::sdk::Emit>, HandlerError>> {
        // The ack deadline in force (the dispatcher's, which may be the replicated declaration's,
        // shorter than this node's): a wait for a connection measured by this node's own one
        // outlived it, and the delivery was cut as late, an attempt counted, where a refusal
        // (no attempt) was meant.
        let timeout = ctx.deadline().map_or(self.timeout, |d| d.saturating_duration_since(tokio::time::Instant::now()).min(self.timeout));
        let (pool, path) = (self.pool.clone(), format!("{}{}", self.pool.base, self.path));
        let emit = self.emit.clone();
        let headers = delivery_headers(&self.name, &event);
        Box::pin(post_event(pool, path, timeout, headers, event, emit))
    }
}

/// POSTs `event` to the app at `path` within `timeout` (its subscription's ack deadline).
async fn post_event(
    pool: Arc<Pool>,
    path: String,
    timeout: Duration,
    headers: http::HeaderMap,
    event: crate::broker::event::Event,
    emit: Option<String>,
) -> Result<Option<crate::sdk::Emit>, HandlerError> {
    // Serializing borrowed strings and a raw payload cannot fail.
    let body = bytes::Bytes::from(serde_json::to_vec(&event.to_json()).unwrap_or_default());
    let started = tokio::time::Instant::now();
    // The app never saw the event: no attempt (as a consumer that is draining), and it
    // is handed out again after the refusal pause, to another consumer if one is live. A
    // busy app's events used to count attempts until they were dead-lettered unseen.
    let Some(mut conn) = pool.take(pool_wait(timeout)).await else {
        return Err(HandlerError::not_served("every connection to the app is busy"));
    };
    let timeout = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
    // The ack deadline left, for the app, as for a command (`Forward::forward`).
    let mut headers = headers;
    headers.insert("x-timeout-ms", http::HeaderValue::from(timeout.as_millis() as u64));
    // Not resent once it may have reached the app (a reset may be the app crashing on this
    // event: sent again at once, a poison event would crash it twice per attempt); a kept
    // connection seldom turns out closed (`IDLE_MAX`).
    match conn.conn.request_with(Method::POST, &path, headers, body, timeout, false).await {
        Ok(resp) if (200..300).contains(&resp.status) => {
            pool.put(conn);
            returned_event(emit.as_deref(), &resp.body)
        }
        Ok(resp) => {
            pool.put(conn);
            Err(app_refusal(&resp, &event.id))
        }
        Err(ClientError::Timeout { .. }) => Err(HandlerError::new(504, "app did not answer in time")),
        Err(e @ ClientError::Connect { .. }) => Err(pool.connect_failed(&e)),
        // Only the status counts here: a long body beside a 2xx is still an ack,
        // unless that body was to be emitted.
        Err(ClientError::BodyTooLarge { status, .. }) if (200..300).contains(&status) && emit.is_none() => Ok(None),
        Err(e) => Err(HandlerError::new(502, format!("the request to the app failed: {}", cause(&e)))),
    }
}

/// The header with which an app's answer other than 2xx says that no retry can mend the event
/// (`x-no-retry: true`): it goes to the dead letters at this attempt, as an SDK handler's
/// `HandlerError::no_retry()` does (JetStream's `TERM`, Dapr's `DROP`). A header and not a body
/// status, because a 2xx answer acks whatever its body says.
pub const NO_RETRY_HEADER: &str = "x-no-retry";

/// The failure an app's answer other than 2xx to a delivery is: its status and its own words
/// (the `message` of a JSON body, else the text, cut to [`MAX_MESSAGE`]) as the attempt's
/// reason, with no retry when the app said so ([`NO_RETRY_HEADER`]).
fn app_refusal(resp: &Response, event_id: &str) -> HandlerError {
    let (message, _) = error_message(&resp.body);
    let message = cut(&message, MAX_MESSAGE);
    let mut reason = format!("app answered {} to event {event_id}", resp.status);
    if !message.is_empty() {
        reason = format!("{reason}: {message}");
    }
    let no_retry = resp.headers.get(NO_RETRY_HEADER).and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true") || v.trim() == "1");
    let e = HandlerError::new(502, reason);
    if no_retry { e.no_retry() } else { e }
}

/// One `[[sidecar.commands]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarCommand {
    pub service: String,
    pub version: u32,
    pub name: String,
    pub method: String,
    /// Exposed as `/api/v{version}/{path}`; `:name` segments are parameters.
    pub path: String,
    /// Path on the upstream (`:name` substituted); default `/{path}`.
    #[serde(default)]
    pub upstream_path: Option<String>,
    #[serde(default)]
    pub idempotent: bool,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// When set, the app's 2xx answer (JSON) is also emitted as an event of this name, message
    /// type `commandSuccessResponse`, as an SDK command's `success_event`; an answer that is not
    /// JSON is then a 502.
    #[serde(default)]
    pub success_event: Option<String>,
}

fn default_health_interval_ms() -> u64 {
    1000
}
fn default_unhealthy_threshold() -> u32 {
    3
}
fn default_healthy_threshold() -> u32 {
    1
}
/// The most probes a threshold may ask for.
const MAX_THRESHOLD: u32 = 100;
fn default_pool_size() -> usize {
    32
}
/// Connections to the app at most (`max_connections`), as many as a node's own clients.
const MAX_APP_CONNECTIONS: usize = 1_000_000;
/// The longest health check interval (`health_interval_ms`): an hour.
const MAX_HEALTH_INTERVAL_MS: u64 = 3_600_000;

fn default_max_connections() -> usize {
    1024
}
fn default_timeout_ms() -> u64 {
    crate::sdk::builder::DEFAULT_TIMEOUT.as_millis() as u64
}

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("sidecar upstream {url:?}: {reason}")]
    Upstream { url: String, reason: String },
    #[error("sidecar command {service} v{version} `{command}`: {reason}")]
    Command { service: String, version: u32, command: String, reason: String },
    /// (Said as what the declaration says: `NodeError::Sidecar` names the sidecar.)
    #[error("{0}")]
    Declaration(#[from] BuildError),
    #[error("sidecar: must be started inside a Tokio runtime")]
    NoRuntime,
}

/// A running sidecar: its commands as services, and the upstream's health.
pub struct Sidecar {
    parts: Vec<ServiceParts>,
    pool: Arc<Pool>,
}

impl Sidecar {
    /// Validates the config and starts the health checks (until `shutdown`). Needs a Tokio runtime.
    /// The app's answers are read up to `max_answer` bytes (the most a node passes on: a
    /// larger one is a 502 either way), so the answers being read hold at most
    /// `max_connections` × `max_answer`.
    pub fn start(cfg: SidecarConfig, max_answer: usize, shutdown: CancellationToken) -> Result<Sidecar, SidecarError> {
        // Checked first: spawning the health check outside a runtime would panic.
        tokio::runtime::Handle::try_current().map_err(|_| SidecarError::NoRuntime)?;
        let (pool, forwards) = forwarders(&cfg, max_answer)?;
        let mut services: BTreeMap<(String, u32), Service> = BTreeMap::new();
        for (c, forward) in cfg.commands.iter().zip(forwards) {
            let method = forward.method.clone();
            let mut command = CommandBuilder::new(&c.name, method, &c.path).idempotent(c.idempotent).timeout(Duration::from_millis(c.timeout_ms));
            if let Some(event) = &c.success_event {
                command = command.success_event(event);
            }
            let command = command.raw_handler(Arc::new(forward));
            let key = (c.service.clone(), c.version);
            let service = services.remove(&key).unwrap_or_else(|| Service::new(&c.service, c.version));
            services.insert(key, service.command(command));
        }
        for sub in &cfg.subscriptions {
            let path = sub.path.as_deref().unwrap_or_default();
            if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
                return Err(SidecarError::Upstream {
                    url: shown_url(&cfg.upstream),
                    reason: format!("subscription {}: path is required and must start with /", sub.name),
                });
            }
            let decl = sub.decl(SIDECAR_ACK_DEADLINE_MS);
            if let Some(event) = &sub.emit_event {
                crate::broker::event::check_event_name(event).map_err(|reason| SidecarError::Upstream {
                    url: shown_url(&cfg.upstream),
                    reason: format!("subscription {}: emit_event: {reason}", sub.name),
                })?;
            }
            let post = EventPost {
                pool: pool.clone(),
                name: sub.name.clone(),
                path: path.to_string(),
                timeout: Duration::from_millis(decl.ack_deadline_ms),
                emit: sub.emit_event.clone(),
            };
            let key = (sub.service.clone().unwrap_or_else(|| "sidecar".into()), sub.version.unwrap_or(1));
            let service = services.remove(&key).unwrap_or_else(|| Service::new(&key.0, key.1));
            services.insert(key, service.subscription((decl, Arc::new(post))));
        }
        let parts = services.into_values().map(Service::into_parts).collect::<Result<Vec<_>, _>>()?;
        let check = HealthCheck {
            path: cfg.health_path.map(|path| format!("{}{path}", pool.base)),
            interval: Duration::from_millis(cfg.health_interval_ms),
            unhealthy_threshold: cfg.unhealthy_threshold,
            healthy_threshold: cfg.healthy_threshold,
        };
        crate::supervise::spawn_until("sidecar health check", &shutdown, health_loop(pool.clone(), check, shutdown.clone()));
        Ok(Sidecar { parts, pool })
    }

    /// One `ServiceParts` per (service, version) in the config.
    pub fn parts(&self) -> Vec<ServiceParts> {
        self.parts.clone()
    }

    /// True while the app can take requests: its health checks pass (`health_path`), and no
    /// connection to it was refused since the probes that brought it back began.
    pub fn healthy(&self) -> watch::Receiver<bool> {
        self.pool.up.subscribe()
    }
}

/// The upstream URL as errors say it: without user info or a query, which may carry a
/// password or a token (a config refused at start is printed to the node's log).
fn shown_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").map_or(("", url), |(s, r)| (s, r));
    // All up to the last `@` may be user info: a password may hold `/`, `?` or `#` unencoded
    // (the URLs refused as unparsable, whose error is printed).
    let rest = rest.rsplit_once('@').map_or(rest, |(_, after)| after);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    if scheme.is_empty() { rest.to_string() } else { format!("{scheme}://{rest}") }
}

/// Validates the config; returns the shared pool and one forwarder per command, in order.
fn forwarders(cfg: &SidecarConfig, max_answer: usize) -> Result<(Arc<Pool>, Vec<Forward>), SidecarError> {
    let bad_upstream = |reason: &str| SidecarError::Upstream { url: shown_url(&cfg.upstream), reason: reason.into() };
    let uri: http::Uri = cfg.upstream.parse().map_err(|e| bad_upstream(&format!("{e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad_upstream("must be an http:// URL (the app runs next to the node)"));
    }
    let authority = uri.authority().ok_or_else(|| bad_upstream("has no host"))?;
    if uri.query().is_some() || authority.as_str().contains('@') {
        return Err(bad_upstream("may not have a query or user info"));
    }
    let addr = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
    let base = uri.path().trim_end_matches('/').to_string();
    if cfg.health_path.as_deref().is_some_and(|p| !p.starts_with('/') || p.parse::<http::Uri>().is_err()) {
        return Err(bad_upstream("health_path must be a path starting with /"));
    }
    if cfg.health_interval_ms == 0 || cfg.health_interval_ms > MAX_HEALTH_INTERVAL_MS {
        return Err(bad_upstream(&format!("health_interval_ms must be 1..={MAX_HEALTH_INTERVAL_MS}")));
    }
    for (name, n) in [("unhealthy_threshold", cfg.unhealthy_threshold), ("healthy_threshold", cfg.healthy_threshold)] {
        if n == 0 || n > MAX_THRESHOLD {
            return Err(bad_upstream(&format!("{name} must be 1..={MAX_THRESHOLD}")));
        }
    }
    // Bounded above too: a huge one reached tokio's semaphore bound and panicked at start.
    if cfg.max_connections == 0 || cfg.max_connections > MAX_APP_CONNECTIONS {
        return Err(bad_upstream(&format!("max_connections must be 1..={MAX_APP_CONNECTIONS}")));
    }
    let pool = Arc::new(Pool {
        addr,
        base,
        max_answer,
        max_idle: cfg.pool_size.min(cfg.max_connections),
        idle: Mutex::new(Idle::default()),
        open: Arc::new(tokio::sync::Semaphore::new(cfg.max_connections)),
        open_max: cfg.max_connections,
        // Without a health check the app counts as up until a connection to it is refused.
        up: watch::Sender::new(cfg.health_path.is_none()),
        went_down: tokio::sync::Notify::new(),
        refusals: std::sync::atomic::AtomicU64::new(0),
        suspect: tokio::sync::Notify::new(),
    });
    let forwards = cfg.commands.iter().map(|c| forwarder(&pool, c)).collect::<Result<_, _>>()?;
    Ok((pool, forwards))
}

fn forwarder(pool: &Arc<Pool>, c: &SidecarCommand) -> Result<Forward, SidecarError> {
    let fail = |reason: String| SidecarError::Command {
        service: c.service.clone(),
        version: c.version,
        command: c.name.clone(),
        reason,
    };
    let method = Method::from_bytes(c.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| fail(format!("method {:?} is not an HTTP method", c.method)))?;
    let path = c.path.strip_prefix('/').unwrap_or(&c.path);
    let upstream_path = c.upstream_path.clone().unwrap_or_else(|| format!("/{path}"));
    if !upstream_path.starts_with('/') || upstream_path.contains(['?', '#']) {
        return Err(fail(format!("upstream_path {upstream_path:?} must start with / and have no query")));
    }
    let template: Vec<Segment> = format!("{}{upstream_path}", pool.base)
        .split('/')
        .map(|s| match s.strip_prefix(':') {
            Some(name) => Segment::Param(name.to_string()),
            None => Segment::Literal(s.to_string()),
        })
        .collect();
    let exposed: Vec<&str> = path.split('/').filter_map(|s| s.strip_prefix(':')).collect();
    for seg in &template {
        match seg {
            Segment::Param(name) if !exposed.contains(&name.as_str()) => {
                return Err(fail(format!("upstream_path uses :{name}, which path {path:?} does not have")))
            }
            Segment::Literal(s) if format!("/{s}").parse::<http::uri::PathAndQuery>().is_err() => {
                return Err(fail(format!("upstream_path segment {s:?} is not valid in a URL")))
            }
            _ => {}
        }
    }
    Ok(Forward {
        pool: pool.clone(),
        method,
        idempotent: c.idempotent,
        template: Arc::new(template),
        timeout: Duration::from_millis(c.timeout_ms),
    })
}

/// How long a request with `limit` left waits for a connection: a little less, so that "every
/// connection is busy" (503) is what its caller hears, not the deadline (504) that the
/// caller's own timer would give at about the same moment, one or the other by chance. (For a
/// request from another node, whose timer started a link's transit earlier, only while that
/// transit is shorter than the margin.)
fn pool_wait(limit: Duration) -> Duration {
    limit.saturating_sub(POOL_WAIT_MARGIN.min(limit / 2))
}

/// Connections to the upstream: at most `open_max` open, of which up to `max_idle` kept idle
/// for reuse.
struct Pool {
    /// `host:port`.
    addr: String,
    /// Path prefix of the upstream URL, without a trailing `/`.
    base: String,
    /// The largest answer read from the app.
    max_answer: usize,
    max_idle: usize,
    idle: Mutex<Idle>,
    /// One permit per open connection, held by its `Leased` (busy or idle) and returned when
    /// the connection is dropped.
    open: Arc<tokio::sync::Semaphore>,
    open_max: usize,
    /// Whether the app can take requests. Set by the health loop from its probes, and cleared
    /// by any request or delivery whose connection the app refused (`refused`): nothing listens,
    /// so the node stops taking the app's work at once, not a probe and a threshold later.
    up: watch::Sender<bool>,
    /// Wakes the health loop when a refusal took the app down: without `health_path` it only
    /// probes (by connecting) while the app is down.
    went_down: tokio::sync::Notify,
    /// Connections refused so far: a probe that passed while one was refused does not count.
    refusals: std::sync::atomic::AtomicU64,
    /// Wakes the health loop after a connect that failed without a refusal: it then probes
    /// until a probe passes, also without `health_path` (`Pool::connect_failed`).
    suspect: tokio::sync::Notify,
}

/// The pool's free connections and the requests waiting for one, under one lock: a request
/// that finds no idle connection queues itself before the lock is let go, so a connection put
/// back meanwhile is handed to it rather than kept idle.
#[derive(Default)]
struct Idle {
    conns: Vec<Leased>,
    /// Oldest first. A waiter that gave up (deadline, or a place of its own came free) has
    /// dropped its receiver: a hand-over to it fails and goes to the next, and queueing clears
    /// such waiters out (`prune_at`). So about one per request in flight, which the proxy and
    /// the subscription loops bound.
    waiters: std::collections::VecDeque<tokio::sync::oneshot::Sender<Leased>>,
    /// Queue length at which the next waiter clears out those that gave up.
    prune_at: usize,
}

/// A connection and its place among the pool's open ones.
struct Leased {
    conn: Conn,
    _open: tokio::sync::OwnedSemaphorePermit,
    /// When it was last put back idle (`Pool::put`).
    idle_since: tokio::time::Instant,
}

/// How long a connection may sit idle and still be used: less than the keep-alive timeouts of
/// common app servers (gunicorn's 2 s, Node's and uvicorn's 5 s), so that a request seldom
/// races the app closing it. Lost that race, a request that may not be sent twice (a
/// non-idempotent command) failed with a 502, and a delivery with an attempt counted.
const IDLE_MAX: Duration = Duration::from_millis(1_500);

impl Pool {
    /// A connection to the app could not be made (nothing was sent): not served, so the proxy
    /// tries another node and a delivery counts no attempt. Only a refusal says the app is down
    /// (`refused`); this node's own shortage (no file descriptor or local port left, EMFILE or
    /// EADDRNOTAVAIL under a burst of connections) withdrew the app's every command and
    /// subscription from the cluster and put them back a moment later, a registry write each.
    ///
    /// Such a failure makes the health loop probe the app until a probe passes (without a
    /// `health_path` it probes only while the app is down): failures that go on (an upstream on
    /// another host that became unreachable, a name that stopped resolving) withdraw it after
    /// `unhealthy_threshold` failed probes in a row, spread over the interval, not at the
    /// first burst of them.
    fn connect_failed(&self, e: &ClientError) -> HandlerError {
        let refused = matches!(e, ClientError::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused);
        if refused {
            return self.refused(e);
        }
        self.suspect.notify_one();
        metrics::counter!("raftbridge_sidecar_connect_failures_total").increment(1);
        tracing::debug!(addr = %self.addr, error = %e, "could not connect to the sidecar app (not a refusal: it stays advertised)");
        HandlerError::not_served(format!("no connection to the app could be made: {}", cause(e)))
    }

    /// Notes that the app refused a connection (nothing was sent) and returns the error for
    /// it: not served, so the proxy tries another node and a delivery counts no attempt.
    fn refused(&self, e: &ClientError) -> HandlerError {
        self.refusals.fetch_add(1, SeqCst);
        if self.up.send_if_modified(|up| std::mem::replace(up, false)) {
            metrics::gauge!("raftbridge_sidecar_upstream_healthy").set(0.0);
            tracing::warn!(addr = %self.addr, error = %e, "sidecar app refused a connection; its commands and subscriptions move to other nodes until it answers again");
            self.went_down.notify_one();
        }
        HandlerError::not_served("the app refused the connection")
    }

    fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// An idle connection, or a new one once fewer than `open_max` are open (waiting up to
    /// `wait` for that); `None` if none came free in time.
    async fn take(&self, wait: Duration) -> Option<Leased> {
        // A poisoned lock only means a panic elsewhere while holding it; the lists stay valid.
        let handed = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(conn) = idle.conns.pop() {
                if conn.idle_since.elapsed() < IDLE_MAX {
                    return Some(conn);
                }
                // Last in, first out: the others have been idle longer still. Closed, they free
                // their places for the new connection below.
                idle.conns.clear();
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            // Waiters that gave up are cleared out whenever the queue has doubled since the last
            // pass: it stays within twice the live ones, at amortized O(1) per request.
            if idle.waiters.len() >= idle.prune_at {
                idle.waiters.retain(|w| !w.is_closed());
                idle.prune_at = (2 * idle.waiters.len()).max(16);
            }
            idle.waiters.push_back(tx);
            rx
        };
        // Whichever comes first: a connection a finished request hands over (kept alive, no
        // new handshake), or a free place to open one.
        let got = tokio::time::timeout(wait, async {
            tokio::select! {
                conn = handed => conn.ok(),
                permit = self.open.clone().acquire_owned() => {
                    permit.ok().map(|permit| Leased {
                        conn: Conn::new(self.addr.clone()).with_max_body(self.max_answer),
                        _open: permit,
                        idle_since: tokio::time::Instant::now(),
                    })
                }
            }
        });
        got.await.ok().flatten()
    }

    /// Returns a connection after a request: to the oldest waiting request, else to the idle
    /// list (up to `max_idle`); a broken one, or one beyond that, is closed and frees its place.
    fn put(&self, mut conn: Leased) {
        if !conn.conn.is_connected() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(waiter) = idle.waiters.pop_front() {
            match waiter.send(conn) {
                Ok(()) => return,
                Err(back) => conn = back,
            }
        }
        if idle.conns.len() < self.max_idle {
            conn.idle_since = tokio::time::Instant::now();
            idle.conns.push(conn);
        }
    }
}

enum Segment {
    Literal(String),
    Param(String),
}

/// The handler of one sidecar command.
#[derive(Clone)]
struct Forward {
    pool: Arc<Pool>,
    method: Method,
    /// The command is declared idempotent: a request that may have reached the app on a pooled
    /// connection that then failed may be sent again (a non-idempotent PUT may not).
    idempotent: bool,
    template: Arc<Vec<Segment>>,
    timeout: Duration,
}

impl CommandHandler for Forward {
    fn call(&self, _ctx: Ctx, inv: Invocation) -> BoxFuture<Result<Output, HandlerError>> {
        let this = self.clone();
        Box::pin(async move { this.forward(inv).await })
    }

    fn available(&self) -> bool {
        self.pool.is_up()
    }
}

impl Forward {
    /// The upstream path and query: path parameters substituted, the other parameters as query.
    fn target(&self, params: &BTreeMap<String, String>) -> Result<String, HandlerError> {
        let mut used = Vec::new();
        let mut segments = Vec::with_capacity(self.template.len());
        for seg in self.template.iter() {
            segments.push(match seg {
                Segment::Literal(s) => s.clone(),
                Segment::Param(name) => {
                    let value = params.get(name).ok_or_else(|| {
                        HandlerError::unhandled(format!("path parameter `{name}` missing from the invocation"))
                    })?;
                    used.push(name.as_str());
                    crate::proxy::routing::percent_encode(value)
                }
            });
        }
        let mut target = segments.join("/");
        let query: Vec<String> = params
            .iter()
            .filter(|(k, _)| !used.contains(&k.as_str()))
            .map(|(k, v)| format!("{}={}", crate::proxy::routing::percent_encode(k), crate::proxy::routing::percent_encode(v)))
            .collect();
        if !query.is_empty() {
            target.push('?');
            target.push_str(&query.join("&"));
        }
        Ok(target)
    }

    async fn forward(&self, inv: Invocation) -> Result<Output, HandlerError> {
        let target = self.target(&inv.params)?;
        let limit = deadline(self.timeout, inv.timeout_ms);
        let m = &inv.meta;
        // A client's key as it sent it; the key of a call from a handler (`Ctx::invoke`, made
        // from the caller's, with characters no header carries) percent-encoded: the same on a
        // re-run, so the app can deduplicate by it too.
        let app_key: Option<std::borrow::Cow<'_, str>> =
            m.idempotency_key.as_deref().map(|k| if http::HeaderValue::from_str(k).is_ok() { k.into() } else { crate::proxy::routing::percent_encode(k).into() });
        // The client's own headers first (`proxy::headers::from_client` left out those below),
        // then the message fields the node checked; a body without a type goes as JSON.
        let mut headers = http::HeaderMap::new();
        crate::proxy::headers::append(&inv.headers, &mut headers);
        let fields = [
            ("x-request-id", Some(m.correlation_id.as_str())),
            ("traceparent", Some(m.traceparent.as_str())),
            ("x-principal-id", m.principal_id.as_deref()),
            ("x-tenant-id", m.tenant_id.as_deref()),
            ("idempotency-key", app_key.as_deref()),
        ];
        for (name, value) in fields.into_iter().filter_map(|(k, v)| v.filter(|v| !v.is_empty()).map(|v| (k, v))) {
            // Checked at the node that took the request (`api::meta_header`); a value that does
            // not make a header (from a peer of another build) is left out.
            if let Ok(value) = http::HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        }
        let started = tokio::time::Instant::now();
        let Some(mut conn) = self.pool.take(pool_wait(limit)).await else {
            return Err(HandlerError::new(503, format!("all {} connections to the app are busy", self.pool.open_max)));
        };
        // The wait for a connection counts against the deadline.
        let limit = limit.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
        // What is left of it, for the app (Envoy's expected-timeout header): it stops work
        // nobody waits for, and passes it on to calls it makes through its node, whose
        // deadlines then end with this one.
        headers.insert("x-timeout-ms", http::HeaderValue::from(limit.as_millis() as u64));
        // GET and HEAD are safe by HTTP's rules, whatever the declaration says.
        let resend = self.method.is_safe() || (self.idempotent && self.method.is_idempotent());
        let result = conn.conn.request_with(self.method.clone(), &target, headers, inv.payload.clone(), limit, resend).await;
        match result {
            Ok(resp) => {
                self.pool.put(conn);
                answer(resp)
            }
            // No connection could be made: nothing reached the app. (A resend that could not
            // connect after a send that may have reached it fails as that send did, a 502 the
            // client gets, not "not served", which another node would run again.)
            Err(e @ ClientError::Connect { .. }) => Err(self.pool.connect_failed(&e)),
            // The app's own error, too long to pass on: still its error, with its status.
            Err(ClientError::BodyTooLarge { status: status @ 400..=499, limit, .. }) => {
                Err(HandlerError::new(status, format!("the app answered {status} with a body larger than the {limit} bytes a node passes on")))
            }
            Err(e) => {
                let status = if matches!(e, ClientError::Timeout { .. }) { 504 } else { 502 };
                // Not the target: its path and query carry the client's parameters (tokens, ids).
                tracing::warn!(command = %inv.command, error = %e, status, "sidecar upstream failed");
                // The connection broke under the request (the app crashed, say, and a resend
                // could not connect): the health loop looks at the app now, as after a connect
                // that failed, and withdraws it if it is gone.
                if e.is_connection() {
                    self.pool.suspect.notify_one();
                }
                Err(match e {
                    ClientError::Timeout { .. } => {
                        HandlerError::new(504, format!("upstream did not answer within {} ms", limit.as_millis()))
                    }
                    e => HandlerError::new(502, format!("the request to the app failed: {}", cause(&e))),
                })
            }
        }
    }
}

/// What went wrong with a request to the app, for its caller: without the app's address,
/// which is this node's business (the node's log names it).
fn cause(e: &ClientError) -> String {
    match e {
        ClientError::Http { source, .. } => source.to_string(),
        ClientError::BodyTooLarge { limit, .. } => format!("its answer is larger than the {limit} bytes a node passes on"),
        ClientError::Timeout { .. } => "no answer in time".into(),
        e => e.kind().to_string(),
    }
}

/// Maps an upstream answer: 2xx and 3xx pass with the app's headers, 4xx is the app's own
/// error (its JSON body from the node, with the app's headers that are not about its body),
/// anything else is 502.
fn answer(resp: Response) -> Result<Output, HandlerError> {
    let content_type = resp.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(String::from);
    let headers = || {
        crate::proxy::headers::from_app(&resp.headers, resp.status)
            .map_err(|e| HandlerError::new(502, format!("the app answered {} with {e}", resp.status)))
    };
    match resp.status {
        200..=399 => Ok(Output { status: resp.status, content_type, headers: headers()?, body: resp.body }),
        400..=499 => {
            let headers = headers()?;
            let (message, data) = error_message(&resp.body);
            let mut e = HandlerError::new(resp.status, message);
            e.data = data;
            e.headers = headers;
            Err(e)
        }
        500..=599 => {
            let (message, _) = error_message(&resp.body);
            // The app's own words go to the client, cut as a text body's are (a JSON message
            // was passed whole: a stack trace, a query).
            Err(HandlerError::new(502, format!("upstream answered {}: {}", resp.status, cut(&message, MAX_MESSAGE))))
        }
        status => Err(HandlerError::new(502, format!("upstream answered unexpected status {status}"))),
    }
}

/// The `message` (and `data`) of a JSON error body, else the body text cut to [`MAX_MESSAGE`].
fn error_message(body: &[u8]) -> (String, Option<String>) {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) {
        if let Some(serde_json::Value::String(message)) = map.get("message") {
            return (message.clone(), map.get("data").map(|d| d.to_string()));
        }
    }
    let text = String::from_utf8_lossy(body);
    (cut(&text, MAX_MESSAGE).trim().to_string(), None)
}

/// `text` cut to at most `max` bytes at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}


/// How the health loop probes the app.
struct HealthCheck {
    /// `GET` path (with the upstream's prefix); none = a TCP connect, and only while the app
    /// is down (after a refused connection).
    path: Option<String>,
    interval: Duration,
    unhealthy_threshold: u32,
    healthy_threshold: u32,
}

/// Probes the app every `interval` and sets `pool.up` once `unhealthy_threshold` probes in a
/// row failed (false) or `healthy_threshold` passed (true). A refused connection elsewhere
/// clears it at once and restarts the count of passes.
async fn health_loop(pool: Arc<Pool>, check: HealthCheck, shutdown: CancellationToken) {
    let addr = pool.addr.clone();
    let fresh = || Conn::new(addr.clone()).with_max_body(MAX_HEALTH_ANSWER);
    let mut conn = fresh();
    // Not tied to a short interval: a probe of a busy app that takes longer than 100 ms is
    // not a failure (it made the app flap in and out under load, and never come back at an
    // interval of a few ms).
    let timeout = check.interval.clamp(MIN_HEALTH_TIMEOUT, MAX_HEALTH_TIMEOUT);
    let (mut passes, mut fails) = (0u32, 0u32);
    let mut checked = false;
    // Refused connections counted by the last probe (`Pool::refusals`).
    let mut seen = pool.refusals.load(SeqCst);
    // A connect failed without a refusal (`Pool::connect_failed`): probed until one passes.
    let mut suspected = false;
    loop {
        if check.path.is_none() && pool.is_up() && !suspected {
            // Nothing to probe while it answers: wait for a refused connection, or one that
            // failed otherwise.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = pool.went_down.notified() => {}
                _ = pool.suspect.notified() => suspected = true,
            }
            continue;
        }
        if !pool.is_up() {
            // A fresh connection: an app that closed its listener may still answer on one
            // that stayed open, while it refuses every new one.
            conn = fresh();
        }
        let before = pool.refusals.load(SeqCst);
        if before != seen {
            // A connection was refused since the last probe: the passes before it do not count.
            passes = 0;
        }
        let mut probed = tokio::select! {
            _ = shutdown.cancelled() => return,
            probed = probe(&mut conn, check.path.as_deref(), timeout) => probed,
        };
        seen = pool.refusals.load(SeqCst);
        if seen != before {
            // One was refused while this probe ran: the refusal is the newer news.
            probed = Probe::Refused;
        }
        let up = pool.is_up();
        let ok = probed == Probe::Passed;
        suspected &= !ok;
        let flip = if ok {
            (fails, passes) = (0, passes.saturating_add(1));
            !up && passes >= check.healthy_threshold
        } else {
            (passes, fails) = (0, fails.saturating_add(1));
            // Refused: nothing listens, which no later probe can make less certain.
            up && (fails >= check.unhealthy_threshold || probed == Probe::Refused)
        };
        // Back up only if no connection was refused since the probe: `refused` counts before it
        // takes the watch's lock, which this check holds, so the later of the two decides.
        let flipped = flip && pool.up.send_if_modified(|v| {
            if ok && pool.refusals.load(SeqCst) != seen {
                return false;
            }
            *v = ok;
            true
        });
        metrics::gauge!("raftbridge_sidecar_upstream_healthy").set(if pool.is_up() { 1.0 } else { 0.0 });
        if flipped || !checked {
            if pool.is_up() {
                tracing::info!(%addr, "sidecar upstream is healthy");
            } else {
                let path = check.path.as_deref().unwrap_or("(connect)");
                tracing::warn!(%addr, %path, fails, "sidecar upstream is unhealthy; its commands are not advertised and its subscriptions wait");
            }
        }
        checked = true;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(check.interval) => {}
            // A refusal took the app down: probe at once whether it is back.
            _ = pool.went_down.notified() => {}
        }
    }
}

#[derive(Debug, PartialEq)]
enum Probe {
    Passed,
    /// An answer other than 2xx, or none in time.
    Failed,
    /// No connection could be made.
    Refused,
}

/// One probe: `GET path` answers 2xx, or without a path a TCP connection is accepted.
async fn probe(conn: &mut Conn, path: Option<&str>, timeout: Duration) -> Probe {
    let addr = conn.addr().to_string();
    let Some(path) = path else {
        return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr.as_str())).await {
            Ok(Ok(_)) => Probe::Passed,
            Ok(Err(e)) => {
                tracing::debug!(%addr, error = %e, "sidecar connect probe failed");
                // Only a refusal is certain news of the app; this node's own shortage
                // (EMFILE, EADDRNOTAVAIL) counts as a failed probe.
                if e.kind() == std::io::ErrorKind::ConnectionRefused { Probe::Refused } else { Probe::Failed }
            }
            Err(_) => Probe::Failed,
        };
    };
    match conn.get(path, timeout).await {
        Ok(r) if r.is_success() => Probe::Passed,
        Ok(r) => {
            tracing::debug!(%addr, status = r.status, "sidecar health check failed");
            Probe::Failed
        }
        Err(e) => {
            tracing::debug!(%addr, error = %e, "sidecar health check failed");
            if matches!(&e, ClientError::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused) {
                Probe::Refused
            } else {
                Probe::Failed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use serde_json::json;

    use crate::sdk::MessageMeta;

    #[test]
    fn a_refused_upstream_is_named_without_its_credentials_or_query() {
        assert_eq!(shown_url("http://svc:s3cret@127.0.0.1:8080/base?token=abc#x"), "http://127.0.0.1:8080/base");
        assert_eq!(shown_url("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(shown_url("svc:s3cret@host"), "host");
        assert_eq!(shown_url("http://u:pa/ss@h:1/p"), "http://h:1/p");
        assert_eq!(shown_url("http://u:p?x#y@h"), "http://h");
        let cfg: SidecarConfig = toml::from_str("upstream = \"http://svc:s3cret@127.0.0.1:8080/?token=abc\"\n").expect("parses");
        let Err(e) = forwarders(&cfg, 1024) else { panic!("user info is refused") };
        let said = e.to_string();
        assert!(said.contains("127.0.0.1:8080") && !said.contains("s3cret") && !said.contains("abc"), "{said}");
    }

    struct Upstream {
        addr: std::net::SocketAddr,
        healthy: Arc<AtomicBool>,
        conns: Arc<AtomicUsize>,
        /// `/health` requests served.
        health_probes: Arc<AtomicUsize>,
    }

    /// A hyper upstream on 127.0.0.1:0: `/orders/*` echoes the request, `/empty` 204, `/bad` 422
    /// JSON, `/text` 404 with a long text body, `/fail` 500, `/sleep` 2 s, `/health` per flag,
    /// `/moved` a 303 with headers, `/locked` a 401 with headers, `/crowded` 40 KiB of headers.
    async fn upstream() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(AtomicUsize::new(0));
        let health_probes = Arc::new(AtomicUsize::new(0));
        let (h, c, probes) = (healthy.clone(), conns.clone(), health_probes.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                let (h, probes) = (h.clone(), probes.clone());
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (h, probes) = (h.clone(), probes.clone());
                    async move {
                        if req.uri().path() == "/health" {
                            probes.fetch_add(1, Ordering::SeqCst);
                        }
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let header = |n: &str| parts.headers.get(n).map(|v| v.to_str().unwrap().to_string());
                        let (status, text) = match parts.uri.path() {
                            p if p.starts_with("/orders/") => {
                                let names = ["x-request-id", "traceparent", "x-principal-id", "x-tenant-id", "idempotency-key", "content-type", "accept", "x-timeout-ms"];
                                let mut headers: BTreeMap<_, _> = names.iter().map(|n| (*n, json!(header(n)))).collect();
                                let cookies: Vec<_> = parts.headers.get_all("cookie").iter().map(|v| v.to_str().unwrap()).collect();
                                headers.insert("cookie", json!(cookies));
                                let echo = json!({"method": parts.method.as_str(), "uri": parts.uri.to_string(),
                                    "body": String::from_utf8_lossy(&body), "headers": headers});
                                (200, echo.to_string())
                            }
                            "/empty" => (204, String::new()),
                            "/bad" => (422, json!({"message": "bad thing", "data": {"field": "x"}}).to_string()),
                            "/text" => (404, "é".repeat(1000)),
                            "/fail" => (500, "oops".into()),
                            "/sleep" => {
                                tokio::time::sleep(Duration::from_secs(2)).await;
                                (200, "{}".into())
                            }
                            "/health" if h.load(Ordering::SeqCst) => (200, "ok".into()),
                            _ => (503, "down".into()),
                        };
                        let big = "v".repeat(8 << 10);
                        let (status, text, extra): (u16, String, Vec<(String, &str)>) = match parts.uri.path() {
                            "/moved" => (303, String::new(), vec![("location".into(), "/orders/9"), ("link".into(), "<a>"), ("link".into(), "<b>")]),
                            "/locked" => (401, json!({"message": "who?"}).to_string(), vec![
                                ("www-authenticate".into(), "Bearer realm=\"orders\""),
                                ("retry-after".into(), "7"),
                                ("content-language".into(), "de"),
                                ("connection".into(), "x-hop"),
                                ("x-hop".into(), "1"),
                            ]),
                            "/crowded" => (200, "{}".into(), (0..5).map(|i| (format!("x-h{i}"), big.as_str())).collect()),
                            _ => (status, text, Vec::new()),
                        };
                        let mut resp = http::Response::new(Full::new(Bytes::from(text)));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        if status != 204 {
                            resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
                        }
                        for (name, value) in extra {
                            resp.headers_mut().append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
            }
        });
        Upstream { addr, healthy, conns, health_probes }
    }

    fn config(upstream: &str, extra: &str) -> SidecarConfig {
        let text = format!(
            r#"
            upstream = "{upstream}"
            {extra}
            [[commands]]
            service = "orders"
            version = 1
            name = "create"
            method = "post"
            path = "orders/:id"
            [[commands]]
            service = "orders"
            version = 1
            name = "get"
            method = "GET"
            path = "o/:id"
            upstream_path = "/:id"
            idempotent = true
            timeout_ms = 5000
            [[commands]]
            service = "orders"
            version = 2
            name = "create"
            method = "POST"
            path = "orders/:id"
            upstream_path = "/orders/v2/:id"
            "#
        );
        toml::from_str(&text).unwrap()
    }

    /// Only a refused connection withdraws the app at once: a connection this node could not
    /// make for its own reasons (no file descriptor or local port left) is "not served"
    /// (another node takes the request, a delivery counts no attempt), leaves the app
    /// advertised and has the health loop probe it.
    #[test]
    fn an_apps_answer_becomes_the_returned_event_when_asked_for() {
        // Without `emit_event`, the body is not looked at.
        assert_eq!(returned_event(None, b"not json").unwrap(), None);
        // With it: an empty answer (204) emits nothing, a JSON one is the payload.
        assert_eq!(returned_event(Some("pong"), b"").unwrap(), None);
        assert_eq!(returned_event(Some("pong"), b" \r\n").unwrap(), None);
        let emit = returned_event(Some("pong"), br#"{"ok":true,"n":[1,2]}"#).unwrap().expect("an event");
        assert_eq!((emit.event_name.as_str(), emit.payload), ("pong", serde_json::json!({"ok": true, "n": [1, 2]})));
        // What no consumer could read is a nack (502: the app's fault), not an event.
        let deep = "[".repeat(100) + &"]".repeat(100);
        for bad in [&b"ok"[..], b"{\"a\":", br#""\ud800""#, deep.as_bytes(), b"{} {}"] {
            let err = returned_event(Some("pong"), bad).expect_err(&String::from_utf8_lossy(bad));
            assert_eq!(err.status, 502, "{err}");
            assert!(err.message.contains("pong"), "{err}");
        }
    }

    /// An app's failure names its status and words in the reason, and is final only when the
    /// app says `x-no-retry: true` (or `1`).
    #[test]
    fn an_apps_failure_is_retried_unless_it_says_no_retry() {
        let resp = |status: u16, body: &[u8], no_retry: Option<&'static str>| {
            let mut headers = http::HeaderMap::new();
            if let Some(v) = no_retry {
                headers.insert(NO_RETRY_HEADER, http::HeaderValue::from_static(v));
            }
            Response { status, headers, body: Bytes::copy_from_slice(body) }
        };
        let e = app_refusal(&resp(500, br#"{"message":"db down"}"#, None), "ev-1");
        assert_eq!((e.status, e.message.as_str(), e.is_no_retry()), (502, "app answered 500 to event ev-1: db down", false));
        let e = app_refusal(&resp(422, b"", Some("TRUE")), "ev-2");
        assert_eq!((e.message.as_str(), e.is_no_retry()), ("app answered 422 to event ev-2", true));
        assert!(app_refusal(&resp(400, b"bad", Some(" 1 ")), "ev-3").is_no_retry());
        for other in ["false", "0", "yes please"] {
            assert!(!app_refusal(&resp(400, b"bad", Some(other)), "ev-4").is_no_retry(), "{other}");
        }
        // The app's words are cut as a command's are.
        let long = "é".repeat(MAX_MESSAGE);
        let e = app_refusal(&resp(503, long.as_bytes(), None), "ev-5");
        assert!(e.message.len() <= "app answered 503 to event ev-5: ".len() + MAX_MESSAGE, "{}", e.message.len());
    }

    /// A delivery tells the app's middleware what a command's request would: its trace (a span
    /// of its own), identity, and which event for which subscription; what cannot be a header
    /// is left out.
    #[test]
    fn a_delivery_carries_its_events_trace_and_identity_as_headers() {
        let body = crate::broker::event::EventBody {
            id: "ev-1".into(),
            event_name: "orderPlaced".into(),
            timestamp: 1,
            message_type: "customMessage".into(),
            sender: None,
            principal_id: Some("alice".into()),
            tenant_id: None,
            trace_id: Some("0AF7651916CD43DD8448EB211C80319C".into()),
            correlation_id: Some("req\n1".into()),
            payload: b"{}".to_vec(),
        };
        let event = crate::broker::event::Event { position: 42, body: Arc::new(body) };
        let h = delivery_headers("appOrders", &event);
        let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap().to_string());
        let tp = get("traceparent").expect("a traceparent");
        assert!(tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && tp.ends_with("-01") && tp.len() == 55, "{tp}");
        let again = delivery_headers("appOrders", &event);
        assert_ne!(again.get("traceparent").map(|v| v.to_str().unwrap().to_string()), Some(tp), "each delivery a span of its own");
        assert_eq!(get("x-principal-id").as_deref(), Some("alice"));
        assert_eq!((get("x-event-id").as_deref(), get("x-event-position").as_deref()), (Some("ev-1"), Some("42")));
        assert_eq!((get("x-subscription").as_deref(), get("content-type").as_deref()), (Some("appOrders"), Some("application/json")));
        assert_eq!((get("x-tenant-id"), get("x-request-id")), (None, None), "absent, or not a header value");
    }

    #[test]
    fn only_a_refused_connection_withdraws_the_app() {
        let (pool, _) = forwarders(&config("http://127.0.0.1:9", ""), 1 << 20).unwrap();
        let failed = |kind: std::io::ErrorKind| ClientError::Connect { addr: "127.0.0.1:9".into(), source: std::io::Error::from(kind) };
        assert!(pool.is_up(), "up until a refusal, without a health check");
        use futures_util::FutureExt as _;
        for kind in [std::io::ErrorKind::AddrNotAvailable, std::io::ErrorKind::OutOfMemory, std::io::ErrorKind::NetworkUnreachable] {
            let e = pool.connect_failed(&failed(kind));
            assert!(e.is_not_served(), "{kind:?}: {e}");
            assert!(pool.is_up(), "{kind:?} says nothing of the app by itself");
            // The health loop is asked to probe: failures that go on withdraw the app after
            // `unhealthy_threshold` failed probes.
            assert!(pool.suspect.notified().now_or_never().is_some(), "{kind:?}: the health loop is woken");
        }
        let e = pool.connect_failed(&failed(std::io::ErrorKind::ConnectionRefused));
        assert!(e.is_not_served() && !pool.is_up(), "a refusal takes it down: {e}");
    }

    fn inv(params: &[(&str, &str)], body: &str, timeout_ms: u64) -> Invocation {
        Invocation {
            service: "orders".into(),
            version: 1,
            command: "create".into(),
            params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            payload: Bytes::from(body.to_string()),
            meta: MessageMeta {
                trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
                correlation_id: "req-1".into(),
                principal_id: Some("alice".into()),
                tenant_id: None,
                sender: None,
                idempotency_key: Some("k1".into()),
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            },
            timeout_ms,
            headers: Vec::new(),
        }
    }

    /// A forwarder for `method path` on the test upstream.
    fn forward_to(addr: impl std::fmt::Display, method: &str, path: &str) -> Forward {
        let mut cfg = config(&format!("http://{addr}"), "");
        cfg.commands.truncate(1);
        cfg.commands[0].method = method.into();
        cfg.commands[0].path = path.into();
        forwarders(&cfg, crate::client::MAX_BODY).unwrap().1.remove(0)
    }

    #[tokio::test]
    async fn forwards_path_query_body_and_headers_over_pooled_connections() {
        let up = upstream().await;
        let (_, fw) = forwarders(&config(&format!("http://{}/", up.addr), ""), crate::client::MAX_BODY).unwrap();
        let out = fw[0].forward(inv(&[("id", "a b/1"), ("x", "1&2")], r#"{"n":1}"#, 0)).await.unwrap();
        assert_eq!((out.status, out.content_type.as_deref()), (200, Some("application/json")));
        let echo: serde_json::Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["uri"], "/orders/a%20b%2F1?x=1%262");
        assert_eq!(echo["body"], r#"{"n":1}"#);
        let h = &echo["headers"];
        assert_eq!((h["x-request-id"].as_str(), h["x-principal-id"].as_str()), (Some("req-1"), Some("alice")));
        assert_eq!(h["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!((h["idempotency-key"].as_str(), h["content-type"].as_str()), (Some("k1"), Some("application/json")));
        assert!(h["x-tenant-id"].is_null());
        // The time left, within the command's timeout (30 s here: `inv`'s 0 sets none).
        let left: u64 = h["x-timeout-ms"].as_str().expect("x-timeout-ms").parse().expect("a number");
        assert!(left > 20_000 && left <= 30_000, "{left}");
        // The client's own headers pass (a repeated name repeated, its body's type instead of
        // JSON); the node's message fields stand over a client's header of the same name.
        let mut with_headers = inv(&[("id", "1")], "a,b", 0);
        with_headers.headers = [("content-type", "text/csv"), ("accept", "text/plain"), ("cookie", "a=1"), ("cookie", "b=2"), ("x-principal-id", "mallory")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        let echo: serde_json::Value = serde_json::from_slice(&fw[0].forward(with_headers).await.unwrap().body).unwrap();
        let h = &echo["headers"];
        assert_eq!((h["content-type"].as_str(), h["accept"].as_str()), (Some("text/csv"), Some("text/plain")));
        assert_eq!((h["cookie"].clone(), h["x-principal-id"].as_str()), (json!(["a=1", "b=2"]), Some("alice")));
        // upstream_path templates (the GET has no body, so no content-type).
        let got = fw[1].forward(inv(&[("id", "7")], "", 0)).await;
        assert_eq!(got.unwrap_err().status, 502, "/7 is not an /orders path: the stub answers 503");
        let out = fw[2].forward(inv(&[("id", "7")], "", 0)).await.unwrap();
        let echo: serde_json::Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!((echo["uri"].as_str(), echo["headers"]["content-type"].as_str()), (Some("/orders/v2/7"), None));
        for _ in 0..5 {
            fw[0].forward(inv(&[("id", "1")], "{}", 0)).await.unwrap();
        }
        assert_eq!(up.conns.load(Ordering::SeqCst), 1, "one keep-alive connection serves them all");
    }

    /// An app that answers the first request on each connection, then reads the second and
    /// closes the connection without answering (as one that crashes mid-request, or an idle
    /// timeout racing a request). Counts the requests it read.
    async fn drops_second_request() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            for _ in 0..16 {
                let (mut stream, _) = listener.accept().await.unwrap();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for served in 0..2 {
                        // A whole request: headers, then the Content-Length body.
                        let mut chunk = [0u8; 4096];
                        let need = loop {
                            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                                let len = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length:"))
                                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                                break end + 4 + len;
                            }
                            let n = stream.read(&mut chunk).await.unwrap();
                            assert!(n > 0, "client closed mid-request");
                            buf.extend_from_slice(&chunk[..n]);
                        };
                        while buf.len() < need {
                            let n = stream.read(&mut chunk).await.unwrap();
                            assert!(n > 0, "client closed mid-body");
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        buf.drain(..need);
                        counter.fetch_add(1, Ordering::SeqCst);
                        if served == 1 {
                            return; // read, not answered: the connection closes
                        }
                        let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                        stream.write_all(ok.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_non_idempotent_command_is_not_sent_twice_when_a_reused_connection_fails() {
        for idempotent in [false, true] {
            let (addr, seen) = drops_second_request().await;
            let mut cfg = config(&format!("http://{addr}"), "");
            cfg.commands.truncate(1);
            cfg.commands[0].method = "PUT".into();
            cfg.commands[0].idempotent = idempotent;
            let fw = forwarders(&cfg, crate::client::MAX_BODY).unwrap().1.remove(0);
            fw.forward(inv(&[("id", "1")], "{}", 0)).await.unwrap();
            let second = fw.forward(inv(&[("id", "1")], "{}", 0)).await;
            if idempotent {
                // Sent again on a new connection, where it is that connection's first request.
                assert_eq!(second.unwrap().status, 200);
                assert_eq!(seen.load(Ordering::SeqCst), 3, "the idempotent PUT was resent once");
            } else {
                // The app read the PUT: it may have acted on it. Not resent; the client decides.
                let e = second.unwrap_err();
                assert_eq!(e.status, 502);
                assert!(!e.message.contains(&addr.port().to_string()), "the app's address is the node's business: {}", e.message);
                assert_eq!(seen.load(Ordering::SeqCst), 2, "the non-idempotent PUT reached the app once");
            }
        }
    }

    #[tokio::test]
    async fn connections_to_the_app_are_capped_and_overflow_is_a_503() {
        let up = upstream().await;
        let mut cfg = config(&format!("http://{}", up.addr), "max_connections = 2");
        cfg.commands.truncate(1);
        cfg.commands[0].path = "sleep".into();
        cfg.commands[0].upstream_path = Some("/sleep".into());
        let fw = forwarders(&cfg, crate::client::MAX_BODY).unwrap().1.remove(0);
        // Two 2 s requests with a 1.5 s deadline take both places; a third with 300 ms waits for
        // a place until its deadline and gets a 503, the two a 504 from the slow app.
        let slow: Vec<_> = (0..2)
            .map(|_| {
                let fw = fw.clone();
                tokio::spawn(async move { fw.forward(inv(&[], "", 1500)).await.unwrap_err().status })
            })
            .collect();
        for _ in 0..200 {
            if up.conns.load(Ordering::SeqCst) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(up.conns.load(Ordering::SeqCst), 2);
        assert_eq!(fw.forward(inv(&[], "", 300)).await.unwrap_err().status, 503);
        for task in slow {
            assert_eq!(task.await.unwrap(), 504);
        }
        assert_eq!(up.conns.load(Ordering::SeqCst), 2, "never more than max_connections open");
        // The places are free again: a new request gets a connection.
        assert_eq!(fw.forward(inv(&[], "", 300)).await.unwrap_err().status, 504);
    }

    /// A delivery that finds every connection to the app busy until its ack deadline is "not
    /// served" (no attempt; handed out again after the refusal pause), not a failure: the app
    /// never saw the event, and a busy app's events were dead-lettered unseen.
    #[tokio::test]
    async fn a_delivery_that_gets_no_connection_to_the_app_costs_no_attempt() {
        let up = upstream().await;
        let mut cfg = config(&format!("http://{}", up.addr), "max_connections = 1");
        cfg.commands.truncate(1);
        cfg.commands[0].path = "sleep".into();
        cfg.commands[0].upstream_path = Some("/sleep".into());
        let (pool, mut fws) = forwarders(&cfg, crate::client::MAX_BODY).unwrap();
        let fw = fws.remove(0);
        let busy = tokio::spawn(async move { fw.forward(inv(&[], "", 1500)).await });
        for _ in 0..200 {
            if up.conns.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(up.conns.load(Ordering::SeqCst), 1, "the one connection is taken");
        let body = crate::broker::event::EventBody {
            id: "ev-busy".into(),
            event_name: "orderPlaced".into(),
            timestamp: 1,
            message_type: "customMessage".into(),
            sender: None,
            principal_id: None,
            tenant_id: None,
            trace_id: None,
            correlation_id: None,
            payload: b"{}".to_vec(),
        };
        let event = crate::broker::event::Event { position: 7, body: Arc::new(body) };
        let url = format!("{}/events/orders", pool.base);
        let refused = post_event(pool.clone(), url, Duration::from_millis(300), http::HeaderMap::new(), event, None).await.expect_err("no connection");
        assert!(refused.is_not_served(), "{refused}");
        assert!(busy.await.unwrap().is_err(), "the slow request ends at its deadline");
    }

    /// At the cap, a request that waits gets the connection the previous request finishes
    /// with, kept alive: one connection serves them all, none is closed and opened again.
    #[tokio::test]
    async fn a_waiting_request_gets_the_finished_connection() {
        let up = upstream().await;
        let cfg = config(&format!("http://{}", up.addr), "max_connections = 1");
        let fw = forwarders(&cfg, crate::client::MAX_BODY).unwrap().1.remove(0);
        let calls: Vec<_> = (0..8)
            .map(|i| {
                let fw = fw.clone();
                tokio::spawn(async move { fw.forward(inv(&[("id", &i.to_string())], "{}", 10_000)).await })
            })
            .collect();
        for call in calls {
            call.await.unwrap().expect("served");
        }
        assert_eq!(up.conns.load(Ordering::SeqCst), 1, "eight queued requests over one kept-alive connection");
        assert!(fw.pool.idle.lock().unwrap().waiters.iter().all(|w| w.is_closed()), "no live waiter left");
    }

    /// A connection idle longer than `IDLE_MAX` is not used again (the app may be closing it
    /// just then): the next request opens a new one.
    #[tokio::test]
    async fn a_connection_idle_too_long_is_not_reused() {
        let up = upstream().await;
        let cfg = config(&format!("http://{}", up.addr), "");
        let fw = forwarders(&cfg, crate::client::MAX_BODY).unwrap().1.remove(0);
        fw.forward(inv(&[("id", "1")], "{}", 10_000)).await.expect("served");
        fw.forward(inv(&[("id", "2")], "{}", 10_000)).await.expect("served");
        assert_eq!(up.conns.load(Ordering::SeqCst), 1, "reused while fresh");
        tokio::time::pause();
        tokio::time::advance(IDLE_MAX).await;
        tokio::time::resume();
        fw.forward(inv(&[("id", "3")], "{}", 10_000)).await.expect("served");
        assert_eq!(up.conns.load(Ordering::SeqCst), 2, "a new connection after the idle spell");
        assert_eq!(fw.pool.idle.lock().unwrap().conns.len(), 1, "the stale one closed, the new one kept");
    }

    #[tokio::test]
    async fn maps_upstream_answers_and_failures() {
        let up = upstream().await;
        let call = |path: &str, timeout_ms| {
            let fw = forward_to(up.addr, "GET", path);
            async move { fw.forward(inv(&[], "", timeout_ms)).await }
        };
        let out = call("empty", 0).await.unwrap();
        assert_eq!((out.status, out.body.len(), out.content_type), (204, 0, None));
        let e = call("bad", 0).await.unwrap_err();
        assert_eq!(e.to_json(), json!({"status": 422, "message": "bad thing", "data": {"field": "x"}}));
        let e = call("text", 0).await.unwrap_err();
        assert_eq!(e.status, 404);
        assert!(e.message.len() <= MAX_MESSAGE && e.message.len() > MAX_MESSAGE - 4, "{}", e.message.len());
        // An answer larger than a node passes on is not read whole.
        let mut cfg = config(&format!("http://{}", up.addr), "");
        cfg.commands.truncate(1);
        (cfg.commands[0].method, cfg.commands[0].path) = ("GET".into(), "text".into());
        let e = forwarders(&cfg, 100).unwrap().1[0].forward(inv(&[], "", 0)).await.unwrap_err();
        assert_eq!((e.status, e.message.as_str()), (404, "the app answered 404 with a body larger than the 100 bytes a node passes on"));
        cfg.commands[0].path = "orders/big".into();
        let e = forwarders(&cfg, 100).unwrap().1[0].forward(inv(&[], &"x".repeat(200), 0)).await.unwrap_err();
        assert_eq!((e.status, e.message.as_str()), (502, "the request to the app failed: its answer is larger than the 100 bytes a node passes on"));
        let e = call("fail", 0).await.unwrap_err();
        assert_eq!((e.status, e.message.as_str()), (502, "upstream answered 500: oops"));
        // A redirect passes with its headers; an error with those not about its body (the
        // client gets the node's JSON), and without the app's hop-by-hop ones.
        let out = call("moved", 0).await.unwrap();
        assert_eq!(out.status, 303);
        let names: Vec<(&str, &[u8])> = out.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        assert_eq!(names, [("location", &b"/orders/9"[..]), ("link", b"<a>"), ("link", b"<b>")]);
        let e = call("locked", 0).await.unwrap_err();
        assert_eq!((e.status, e.message.as_str()), (401, "who?"));
        let names: Vec<&str> = e.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["www-authenticate", "retry-after"]);
        // More headers than a node passes on: a gateway error, not an answer cut short.
        let e = call("crowded", 0).await.unwrap_err();
        assert_eq!(e.status, 502);
        assert!(e.message.starts_with("the app answered 200 with 5 headers of 40980 bytes"), "{}", e.message);
        let started = std::time::Instant::now();
        let e = call("sleep", 200).await.unwrap_err();
        assert_eq!(e.status, 504, "{e}");
        assert!(started.elapsed() < Duration::from_secs(1));

        // Nothing listens: not served (the proxy goes to another node), and the app is down.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let fw = forward_to(closed, "POST", "orders/:id");
        assert!(fw.available());
        let e = fw.forward(inv(&[("id", "1")], "{}", 0)).await.unwrap_err();
        assert!(e.is_not_served() && e.status == 503, "{e}");
        assert!(!fw.available(), "a refused connection takes the app down at once");
    }

    /// Without `health_path` the app is up until a connection to it is refused; from then on
    /// the node probes by connecting, and the app is up again once one is accepted.
    #[tokio::test]
    async fn a_refused_connection_takes_the_app_down_until_it_accepts_again() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let shutdown = CancellationToken::new();
        let cfg = config(&format!("http://{addr}"), "health_interval_ms = 20");
        let sidecar = Sidecar::start(cfg.clone(), crate::client::MAX_BODY, shutdown.clone()).unwrap();
        let mut healthy = sidecar.healthy();
        assert!(*healthy.borrow(), "up until something says otherwise");
        // The handler the node runs for `create`, on the sidecar's own pool.
        let create = forwarder(&sidecar.pool, &cfg.commands[0]).unwrap();
        assert!(sidecar.parts()[0].handlers["create"].available());
        let e = create.forward(inv(&[("id", "1")], "{}", 0)).await.unwrap_err();
        assert!(e.is_not_served(), "{e}");
        assert!(!*healthy.borrow() && !create.available() && !sidecar.parts()[0].handlers["create"].available());
        // Still down while nothing listens (probes go on), up once the app listens again.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!*healthy.borrow_and_update());
        let app = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), healthy.wait_for(|up| *up)).await.unwrap().unwrap();
        assert!(create.available());
        drop(app);
        shutdown.cancel();
    }

    /// One failed probe does not take the app out: `unhealthy_threshold` in a row do.
    #[tokio::test]
    async fn the_health_check_withdraws_after_failures_in_a_row() {
        let up = upstream().await;
        let shutdown = CancellationToken::new();
        let extra = "health_path = \"/health\"\nhealth_interval_ms = 20\nunhealthy_threshold = 4";
        let sidecar = Sidecar::start(config(&format!("http://{}", up.addr), extra), crate::client::MAX_BODY, shutdown.clone()).unwrap();
        let mut healthy = sidecar.healthy();
        tokio::time::timeout(Duration::from_secs(5), healthy.wait_for(|v| *v)).await.unwrap().unwrap();
        let before = up.health_probes.load(Ordering::SeqCst);
        up.healthy.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), healthy.wait_for(|v| !*v)).await.unwrap().unwrap();
        let failed = up.health_probes.load(Ordering::SeqCst) - before;
        assert!(failed >= 4, "down after {failed} failed probes, want 4 in a row");
        up.healthy.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), healthy.wait_for(|v| *v)).await.unwrap().unwrap();
        shutdown.cancel();
    }

    #[tokio::test]
    async fn parts_group_commands_and_health_flips() {
        let up = upstream().await;
        let shutdown = CancellationToken::new();
        let cfg = config(&format!("http://{}", up.addr), "health_path = \"/health\"\nhealth_interval_ms = 20");
        let sidecar = Sidecar::start(cfg, crate::client::MAX_BODY, shutdown.clone()).unwrap();
        let parts = sidecar.parts();
        let decls: Vec<_> = parts.iter().map(|p| (p.decl.name.as_str(), p.decl.version, p.decl.commands.len())).collect();
        assert_eq!(decls, [("orders", 1, 2), ("orders", 2, 1)]);
        let get = &parts[0].decl.commands[1];
        assert_eq!((get.method.as_str(), get.path.as_str(), get.idempotent, get.timeout_ms), ("GET", "o/:id", true, 5000));
        let create = &parts[0].decl.commands[0];
        assert_eq!((create.method.as_str(), create.idempotent, create.timeout_ms), ("POST", false, 30_000));
        assert!(parts[0].handlers.contains_key("create") && parts[0].handlers.contains_key("get"));

        let wait = |want: bool| {
            let mut rx = sidecar.healthy();
            async move { tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| *v == want)).await.unwrap().unwrap(); }
        };
        wait(true).await;
        up.healthy.store(false, Ordering::SeqCst);
        wait(false).await;
        up.healthy.store(true, Ordering::SeqCst);
        wait(true).await;
        shutdown.cancel();

        let no_health = Sidecar::start(config(&format!("http://{}", up.addr), ""), crate::client::MAX_BODY, CancellationToken::new()).unwrap();
        assert!(*no_health.healthy().borrow());
    }

    #[tokio::test]
    async fn rejects_bad_config() {
        let start = |cfg: SidecarConfig| Sidecar::start(cfg, crate::client::MAX_BODY, CancellationToken::new()).err().map(|e| e.to_string());
        for url in ["https://x:1", "x:1", "http://x:1/?a=1", "ftp://x"] {
            assert!(start(config(url, "")).unwrap().contains("upstream"), "{url}");
        }
        assert!(start(config("http://x:1", "health_path = \"health\"")).unwrap().contains("health_path"));
        for (field, value) in [("max_connections", "0"), ("max_connections", "2305843009213693952"), ("health_interval_ms", "0"), ("health_interval_ms", "3600001"), ("unhealthy_threshold", "0"), ("healthy_threshold", "101")] {
            assert!(start(config("http://x:1", &format!("{field} = {value}"))).unwrap().contains(field), "{field} = {value}");
        }
        assert!(start(config("http://x:1", "max_connections = 1000000\nhealth_interval_ms = 3600000")).is_none());
        let mut cfg = config("http://x:1", "");
        cfg.commands[1].upstream_path = Some("/:nope".into());
        assert!(start(cfg).unwrap().contains(":nope"));
        let mut cfg = config("http://x:1", "");
        cfg.commands[0].method = "G ET".into();
        assert!(start(cfg).unwrap().contains("method"));
        let mut cfg = config("http://x:1", "");
        cfg.commands[1].path = "orders/:id".into();
        cfg.commands[1].method = "POST".into();
        cfg.commands[1].upstream_path = None;
        assert!(start(cfg).unwrap().contains("already taken"));
        let mut cfg = config("http://x:1", "");
        cfg.commands[0].path = "a//b".into();
        assert!(start(cfg).unwrap().contains("path"));
        assert!(toml::from_str::<SidecarConfig>("upstream = \"http://x:1\"\nbogus = 1").is_err());
    }

    /// A subscription's `sender_version` may be written as the number a `version` is, or as a
    /// string; anything else is refused when the file is read.
    #[test]
    fn a_sender_version_is_a_number_or_a_string() {
        let sub = |v: &str| toml::from_str::<SidecarConfig>(&format!("upstream = \"http://x:1\"\n[[subscriptions]]\nname = \"s\"\npath = \"/e\"\n{v}"));
        let version = |v: &str| sub(v).map(|c| c.subscriptions[0].sender_version.clone());
        assert_eq!(version("sender_version = 2").unwrap(), Some("2".into()));
        assert_eq!(version("sender_version = \"2\"").unwrap(), Some("2".into()));
        assert_eq!(version("").unwrap(), None);
        assert!(sub("sender_version = -1").is_err());
        assert!(sub("sender_version = 1.5").is_err());
        assert!(sub("sender_version = [1]").is_err());
    }
}
