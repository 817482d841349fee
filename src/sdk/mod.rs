//! The service SDK: how commands are declared, invoked and answered, wherever they run.
//!
//! A *service* (name + version) offers *commands*. Each command is declared once (`CommandDecl`:
//! method, path with `:params`, idempotent flag, timeout, optional JSON schemas) and served by a
//! type-erased `CommandHandler`. Declarations are replicated in the cluster registry so any node
//! can route to any other; handlers stay in the process that offers them. Compiled-in Rust
//! services (`builder`) and sidecar upstreams (`crate::sidecar`) both produce these same parts, so
//! the proxy has one path for both.
//!
//! Handlers get an `Invocation` (parameters, payload, message fields) and a `Ctx` (message fields,
//! node id, and the replicated state store). State writes made through `Ctx` during a request
//! that carries an `Idempotency-Key` are tagged with that key and a sequence number (the write's
//! place in the run and a fingerprint of the key it writes, `StateHandle::next_tag`); the state
//! machine applies each tagged write once, so a handler re-run after a node failure has its
//! effects once, as long as it writes the same keys in the same order.

pub mod builder;
pub mod demo;
pub mod subscription;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::store::StateStore;
use crate::store::StoreError;

pub use self::builder::CommandBuilder;
pub use self::builder::Service;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A command as the cluster registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandDecl {
    pub name: String,
    /// HTTP method exposing it (`GET`, `POST`, ...).
    pub method: String,
    /// Path under `/api/v{version}/`, segments starting with `:` are parameters
    /// (e.g. `counter/:name/increment`).
    pub path: String,
    /// Safe to run twice: the proxy may retry it on another node.
    pub idempotent: bool,
    /// The command's own deadline: a shorter one a client chose (`x-timeout-ms`) ends only its
    /// wait for the answer.
    pub timeout_ms: u64,
    /// JSON Schema of the payload / result, as JSON text, when the SDK has one.
    pub input_schema: Option<String>,
    pub output_schema: Option<String>,
    /// When set, a successful result is also emitted as this event (`commandSuccessResponse`).
    #[serde(default)]
    pub success_event: Option<String>,
}

/// A service version and its commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDecl {
    pub name: String,
    pub version: u32,
    pub commands: Vec<CommandDecl>,
    /// Subscriptions this service's instances consume.
    #[serde(default)]
    pub subscriptions: Vec<crate::broker::event::SubscriptionDecl>,
    /// False while the node cannot serve it (e.g. its sidecar upstream fails its health check):
    /// the commands stay known to the cluster (503, not 404) but this node is not routed to.
    #[serde(default = "yes")]
    pub available: bool,
}

fn yes() -> bool {
    true
}

/// Sender of a message (PURISTA's `sender`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    pub service_name: String,
    pub service_version: String,
    pub service_target: String,
    pub instance_id: String,
}

/// Message fields that travel with a command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageMeta {
    /// W3C trace id (32 hex digits) from `traceparent`, created when absent.
    pub trace_id: String,
    /// `x-request-id`, created when absent; also the message's correlation id.
    pub correlation_id: String,
    pub principal_id: Option<String>,
    pub tenant_id: Option<String>,
    pub sender: Option<Sender>,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// The full `traceparent` header to pass on (new span id per hop is the caller's concern).
    pub traceparent: String,
}

/// HTTP headers passed between a client and the app that runs its command, in order, a
/// repeated name repeated (`proxy::headers` says which and bounds them).
pub type HeaderList = Vec<(String, Vec<u8>)>;

/// One call of a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invocation {
    pub service: String,
    pub version: u32,
    pub command: String,
    /// Query and path parameters, as a JSON object (values are strings).
    pub params: BTreeMap<String, String>,
    /// The request body as received (JSON, or empty).
    pub payload: Bytes,
    pub meta: MessageMeta,
    /// Milliseconds left until the deadline when the call was sent.
    pub timeout_ms: u64,
    /// The client's end-to-end request headers, for a sidecar's app (an SDK handler reads the
    /// message fields instead). Not in this struct's encoding, which builds before them decode
    /// as `Invoke`: they cross a link beside it, in `PeerRequest::InvokeWith`.
    #[serde(skip)]
    pub headers: HeaderList,
}

/// A handler's successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// 200, or 204 when `body` is empty; a sidecar's app may answer any 2xx or 3xx.
    pub status: u16,
    pub body: Bytes,
    pub content_type: Option<String>,
    /// Headers of a sidecar app's answer for the client (`proxy::headers::from_app`). Not in
    /// this struct's encoding: they cross a link in `PeerResponse::InvokedWith`.
    #[serde(skip)]
    pub headers: HeaderList,
}

impl Output {
    pub fn json(body: Bytes) -> Output {
        if body.is_empty() {
            Output { status: 204, body, content_type: None, headers: HeaderList::new() }
        } else {
            Output { status: 200, body, content_type: Some("application/json".into()), headers: HeaderList::new() }
        }
    }
}

/// A failed command: `{"status","message","data"?}` on the wire. 4xx = handled (the caller's
/// fault), 500 = unhandled, 502/503/504 = infrastructure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{status}: {message}")]
pub struct HandlerError {
    pub status: u16,
    pub message: String,
    /// JSON text of extra data, if any.
    pub data: Option<String>,
    /// Set by [`HandlerError::not_served`]: nothing ran, so the caller may go to another node
    /// and count no attempt. Read where the handler runs and turned into the peer protocol's
    /// `NotServed` there; it does not cross a link itself.
    #[serde(skip)]
    not_served: bool,
    /// Set by [`HandlerError::no_retry`]: a subscription's event that failed this way goes to
    /// the dead letters at once. Read by the dispatcher; it crosses a link only as the peer
    /// protocol's `EventOutcome::Rejected`, to a leader that announced it.
    #[serde(skip)]
    no_retry: bool,
    /// Headers of a sidecar app's error answer for the client (`WWW-Authenticate`,
    /// `Retry-After`, ...). Not in this struct's encoding (it is also inside delivery answers):
    /// they cross a link in `PeerResponse::InvokedWith`.
    #[serde(skip)]
    pub headers: HeaderList,
}

impl HandlerError {
    pub fn new(status: u16, message: impl Into<String>) -> HandlerError {
        HandlerError { status, message: message.into(), data: None, not_served: false, no_retry: false, headers: HeaderList::new() }
    }
    /// The handler could not take the request at all and did nothing (the sidecar's app
    /// refused the connection): the proxy tries another node, a delivery counts no attempt.
    /// A 503 where no other node is left. Crate-private: a delivery refused this way waits
    /// for the handler's availability to come back (`LocalSubscriber::available`), which only
    /// the sidecar has; an SDK handler returning it would be retried without end.
    pub(crate) fn not_served(message: impl Into<String>) -> HandlerError {
        HandlerError { not_served: true, ..HandlerError::new(503, message) }
    }
    /// Whether this is [`HandlerError::not_served`].
    pub fn is_not_served(&self) -> bool {
        self.not_served
    }
    /// For a subscription handler: the event cannot be handled however often it comes (it is
    /// malformed, it names what does not exist), so it goes to the dead letters now instead of
    /// after the subscription's attempts (JetStream's `TERM`, Dapr's `DROP`). Until every member
    /// is known to run a build that records that, it is retried as any failure is. A command's
    /// error ignores it (and a handler that calls one gets its error without it).
    pub fn no_retry(mut self) -> HandlerError {
        self.no_retry = true;
        self
    }
    /// Whether this is [`HandlerError::no_retry`].
    pub fn is_no_retry(&self) -> bool {
        self.no_retry
    }
    pub fn bad_request(message: impl Into<String>) -> HandlerError {
        HandlerError::new(400, message)
    }
    pub fn not_found(message: impl Into<String>) -> HandlerError {
        HandlerError::new(404, message)
    }
    pub fn unhandled(message: impl Into<String>) -> HandlerError {
        HandlerError::new(500, message)
    }
    /// The status the HTTP API gives the same cause (`api::error`: mapped in one place).
    pub(crate) fn from_api(e: crate::api::error::ApiError) -> HandlerError {
        HandlerError::new(e.status().as_u16(), e.to_string())
    }
    pub fn with_data(mut self, data: &serde_json::Value) -> HandlerError {
        self.data = Some(data.to_string());
        self
    }
    /// Bytes of text it carries (message and data).
    pub fn size(&self) -> usize {
        self.message.len() + self.data.as_ref().map_or(0, String::len)
    }

    /// The same error cut to at most `max` bytes of message, without its data, when it carries
    /// more than `max`: for where only the status matters and the text travels into the log (a
    /// failed delivery's reason, replicated and kept in the dead letters).
    pub fn truncated(mut self, max: usize) -> HandlerError {
        if self.size() > max {
            self.data = None;
            truncate_utf8(&mut self.message, max);
        }
        self
    }

    /// The JSON body sent to clients.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "status": self.status, "message": self.message });
        if let Some(d) = self.data.as_deref().and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok()) {
            v["data"] = d;
        }
        v
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut with `…`.
pub fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
}

impl From<crate::store::secret::SecretError> for HandlerError {
    fn from(e: crate::store::secret::SecretError) -> HandlerError {
        match e {
            crate::store::secret::SecretError::Store(s) => s.into(),
            // The node's setup, not the handler's caller (the HTTP API's 403 says "not for
            // you"): a 500 naming the missing flag.
            e @ crate::store::secret::SecretError::Off => HandlerError::unhandled(e.to_string()),
            e => HandlerError::from_api(e.into()),
        }
    }
}

/// A value that does not encode or decode as JSON in a handler (its stored state, an event's
/// payload, its result): the handler's own fault, a 500. Its caller's bad input never gets
/// here: the SDK decodes a command's input and parameters itself and answers those with 400.
impl From<serde_json::Error> for HandlerError {
    fn from(e: serde_json::Error) -> HandlerError {
        HandlerError::unhandled(format!("JSON: {e}"))
    }
}

impl From<StoreError> for HandlerError {
    fn from(e: StoreError) -> HandlerError {
        match e {
            // A handler's own compare-and-set that lost: a conflict (the client sent no
            // `If-Match`, so the HTTP API's 412 would not fit).
            StoreError::PreconditionFailed { .. } | StoreError::TxnFailed { .. } => HandlerError::new(409, e.to_string()),
            // The handler's own malformed transaction (no ops, too many, a key twice): its
            // mistake, not its client's.
            StoreError::InvalidTxn(m) => HandlerError::unhandled(m),
            // Everything else as the HTTP API answers it (`api::error`, the one mapping): a
            // write whose outcome is unknown is a 503 (a 502 when the leader reported it lost)
            // whose message says it may have applied.
            e => HandlerError::from_api(e.into()),
        }
    }
}

/// Serves one command; implemented by the builder's typed wrappers and by the sidecar.
pub trait CommandHandler: Send + Sync + 'static {
    fn call(&self, ctx: Ctx, inv: Invocation) -> BoxFuture<Result<Output, HandlerError>>;
    /// Whether it can run here now. While false the proxy sends the command to other nodes
    /// and refuses it from them (`NotServed`) without calling it: the sidecar's app is down.
    fn available(&self) -> bool {
        true
    }
}

/// A service ready to be run by a node: its declaration, one handler per command name and one
/// per subscription name.
#[derive(Clone)]
pub struct ServiceParts {
    pub decl: ServiceDecl,
    pub handlers: BTreeMap<String, Arc<dyn CommandHandler>>,
    pub subscribers: BTreeMap<String, Arc<dyn SubscriptionHandler>>,
}

/// What a subscription handler may ask for after processing an event: another event to emit.
#[derive(Debug, Clone, PartialEq)]
pub struct Emit {
    pub event_name: String,
    pub payload: serde_json::Value,
}

impl Emit {
    /// An event to emit with `payload` encoded as JSON.
    pub fn new(event_name: impl Into<String>, payload: &(impl Serialize + ?Sized)) -> Result<Emit, HandlerError> {
        Ok(Emit { event_name: event_name.into(), payload: serde_json::to_value(payload)? })
    }
}

/// Processes one event; `Ok` acks it (emitting the returned event first), `Err` nacks it.
pub trait SubscriptionHandler: Send + Sync + 'static {
    fn handle(&self, ctx: Ctx, event: crate::broker::event::Event) -> BoxFuture<Result<Option<Emit>, HandlerError>>;
}

/// The first value of header `name` (any case) in `list`, if it is text.
fn header_in<'a>(list: &'a HeaderList, name: &str) -> Option<&'a str> {
    list.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// What runs a command for a handler's `Ctx::invoke`: the node's proxy, which routes it to any
/// node that offers it, as it routes a client's request. A trait so that the SDK does not
/// depend on the proxy, which builds the contexts.
pub trait Invoker: Send + Sync + 'static {
    /// Runs `inv` (its `timeout_ms` is the caller's time left, at most) under `key` when the
    /// caller runs under an idempotency key (derived per call: a re-run of the caller gets the
    /// first run's answer instead of running the command again).
    fn invoke(&self, inv: Invocation, key: Option<String>) -> BoxFuture<Result<Output, HandlerError>>;
}

/// The request header in which a command called from a handler carries how deep in such calls
/// it runs (1 for a client's command's call). Set by the node only: a client's is dropped.
pub const CALL_DEPTH_HEADER: &str = "x-raftbridge-call-depth";

/// How deep handlers may call commands from their handlers: a call past it is a 508 (Loop
/// Detected), as a command that calls itself, directly or around a cycle, would otherwise fill
/// the nodes with runs until their deadlines.
pub const MAX_CALL_DEPTH: u32 = 8;

/// A command to run from a handler (`Ctx::invoke`): named by service, version and command name,
/// as the registry knows it (`GET /v1/registry`), not by its HTTP path.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    service: String,
    version: u32,
    command: String,
    params: BTreeMap<String, String>,
    payload: Bytes,
    headers: HeaderList,
    timeout: Option<Duration>,
}

impl Call {
    pub fn new(service: impl Into<String>, version: u32, command: impl Into<String>) -> Call {
        Call { service: service.into(), version, command: command.into(), params: BTreeMap::new(), payload: Bytes::new(), headers: HeaderList::new(), timeout: None }
    }
    /// A path or query parameter, as the command's handler reads them (`:name` in its path).
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Call {
        self.params.insert(name.into(), value.into());
        self
    }
    /// The payload, as JSON.
    pub fn json(mut self, payload: &(impl Serialize + ?Sized)) -> Result<Call, HandlerError> {
        self.payload = Bytes::from(serde_json::to_vec(payload)?);
        Ok(self)
    }
    /// A request header for the command (a sidecar's app sees it; an SDK handler reads it with
    /// `Ctx::header`). The caller's own client headers are not passed on unless given here.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Call {
        self.headers.push((name.into().to_ascii_lowercase(), value.into()));
        self
    }
    /// At most this long (the command's own timeout and the caller's time left bound it too).
    pub fn timeout(mut self, timeout: Duration) -> Call {
        self.timeout = Some(timeout);
        self
    }
}

/// What a handler may use while it runs.
#[derive(Clone)]
pub struct Ctx {
    pub meta: MessageMeta,
    pub node_id: u64,
    /// The service this handler belongs to (the `sender` of events it emits).
    pub service: Option<Sender>,
    state: StateHandle,
    broker: Option<Arc<crate::broker::Broker>>,
    /// A command's client request headers (`proxy::headers`: end to end, with the forwarding
    /// ones); none for a subscription's handler, or a command sent by a node of an older build.
    headers: HeaderList,
    /// For `invoke`; none outside a node (a handler's unit test).
    invoker: Option<Arc<dyn Invoker>>,
    /// When the run's time is up (its command's timeout, its subscription's ack deadline):
    /// what a command it calls may have at most.
    deadline: Option<tokio::time::Instant>,
}

impl Ctx {
    pub fn new(meta: MessageMeta, node_id: u64, store: StateStore) -> Ctx {
        let dedup = meta.idempotency_key.clone().map(|k| (k, Arc::new(AtomicU32::new(0))));
        Ctx { meta, node_id, service: None, state: StateHandle { store, dedup }, broker: None, headers: HeaderList::new(), invoker: None, deadline: None }
    }

    /// When this run's time is up (its command's timeout, its subscription's ack deadline in
    /// force), if the node set one.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline
    }

    /// Lets the handler call commands (`invoke`) until `deadline`.
    pub fn with_invoker(mut self, invoker: Option<Arc<dyn Invoker>>, deadline: tokio::time::Instant) -> Ctx {
        self.invoker = invoker;
        self.deadline = Some(deadline);
        self
    }

    /// Runs a command on any node that offers it (this one or a peer, chosen and retried as
    /// for a client's request), with this run's message fields (trace, correlation, principal,
    /// tenant; this service as the sender), and returns its answer: a 2xx or 3xx as `Ok`, a
    /// failure with the status a client would get (the command's own 4xx or 500; 404 when no
    /// node declares it, 503 when none that does is live, 504 at the deadline, 502 when its
    /// node was lost while it ran, 508 past `MAX_CALL_DEPTH`).
    /// Under an idempotency key (a client's, or a delivery's) the call is keyed too, by its
    /// place in this run and its content: a re-run of this handler gets the first run's answer
    /// without running the command again, as its state writes apply once.
    pub async fn invoke(&self, call: Call) -> Result<Output, HandlerError> {
        let invoker = self.invoker.as_ref().ok_or_else(|| HandlerError::unhandled("no node to run commands in this context"))?;
        // Capped: a peer of an older build passes a client's value on unchecked.
        let depth = self.header(CALL_DEPTH_HEADER).and_then(|d| d.parse::<u32>().ok()).unwrap_or(0).min(MAX_CALL_DEPTH) + 1;
        if depth > MAX_CALL_DEPTH {
            return Err(HandlerError::new(
                508,
                format!("calling {} v{} {} would be the {depth}th command called from a handler in a row (at most {MAX_CALL_DEPTH}): a cycle of commands calling each other?", call.service, call.version, call.command),
            ));
        }
        // Its place is taken first: whatever happens to the call, a re-run's later writes keep
        // their places. Named by everything the callee's key record compares (parameters and
        // payload): a re-run that calls with other content makes another call.
        let version = call.version.to_string();
        // Parameters length-prefixed: `a=bc` and `ab=c` are other calls.
        let mut params = Vec::new();
        for text in call.params.iter().flat_map(|(name, value)| [name, value]) {
            params.extend_from_slice(&(text.len() as u64).to_le_bytes());
            params.extend_from_slice(text.as_bytes());
        }
        let parts: [&[u8]; 6] = [b"invoke", call.service.as_bytes(), version.as_bytes(), call.command.as_bytes(), &params, &call.payload];
        let key = next_tag(self.state.dedup.as_ref(), &parts)?.map(|(k, seq)| crate::broker::internal_key(format_args!("{k}#invoke{seq}")));
        let now = tokio::time::Instant::now();
        let mut left = self.deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(now));
        if let Some(t) = call.timeout {
            left = left.min(t);
        }
        if left.is_zero() {
            return Err(HandlerError::new(504, "deadline exceeded before the command was called"));
        }
        let mut headers = call.headers;
        headers.retain(|(n, _)| n != CALL_DEPTH_HEADER);
        headers.push((CALL_DEPTH_HEADER.to_string(), depth.to_string().into_bytes()));
        // The same trace, a span of its own (W3C trace context: each hop's parent id is new).
        let flags = self.meta.traceparent.rsplit('-').next().filter(|f| f.len() == 2 && f.bytes().all(|b| b.is_ascii_hexdigit())).unwrap_or("01");
        let traceparent = if self.meta.trace_id.len() == 32 && self.meta.trace_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            format!("00-{}-{:016x}-{flags}", self.meta.trace_id, fastrand::u64(1..))
        } else {
            String::new()
        };
        let meta = MessageMeta { sender: self.service.clone(), idempotency_key: None, traceparent, ..self.meta.clone() };
        let inv = Invocation {
            service: call.service,
            version: call.version,
            command: call.command,
            params: call.params,
            payload: call.payload,
            meta,
            // `Duration::MAX` (no deadline known) is capped by the command's own timeout.
            timeout_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1),
            headers,
        };
        // A command's error says nothing of the event the calling handler runs for: a
        // `no_retry` it set (kept only when it ran on this node) is dropped.
        invoker.invoke(inv, key).await.map_err(|mut e| {
            e.no_retry = false;
            e
        })
    }

    /// `invoke`, with the answer's body decoded from JSON (an empty body as JSON `null`); a
    /// body that is not a `T` is a 500.
    pub async fn invoke_json<T: DeserializeOwned>(&self, call: Call) -> Result<T, HandlerError> {
        let out = self.invoke(call).await?;
        let body: &[u8] = if out.body.is_empty() { b"null" } else { &out.body };
        serde_json::from_slice(body).map_err(|e| HandlerError::unhandled(format!("the command's answer is not what was expected: {e}")))
    }

    /// The command's client request headers (moved out of its `Invocation` by the SDK).
    pub fn with_headers(mut self, headers: HeaderList) -> Ctx {
        self.headers = headers;
        self
    }

    /// The first value of the client's request header `name` (any case), if it is text: e.g.
    /// `authorization`, `accept`, `x-forwarded-for`. The trace, identity and key headers are in
    /// `meta`, checked.
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }

    /// Every client request header passed to the command, in order (a repeated name repeated).
    pub fn headers(&self) -> &HeaderList {
        &self.headers
    }

    /// Tag the handler's writes (and emits) with `key` instead of the request's own
    /// idempotency key: the proxy scopes a command's key by command.
    pub fn with_dedup_key(mut self, key: Option<String>) -> Ctx {
        self.state.dedup = key.map(|k| (k, Arc::new(AtomicU32::new(0))));
        self
    }

    /// Give the handler the broker (for `emit`) and its service identity.
    pub fn with_broker(mut self, broker: Arc<crate::broker::Broker>, service: Sender) -> Ctx {
        self.broker = Some(broker);
        self.service = Some(service);
        self
    }

    /// The replicated state store.
    pub fn state(&self) -> &StateHandle {
        &self.state
    }

    /// The replicated config store: the state store's calls on keys of its own
    /// (`/v1/config/...` over HTTP), deduplicated alike under an idempotency key.
    pub fn config(&self) -> StateHandle {
        StateHandle { store: self.state.store.in_space(crate::store::Space::Config), dedup: self.state.dedup.clone() }
    }

    /// The replicated secret store (`/v1/secrets/...` over HTTP): values sealed with the key
    /// derived from the cluster secret; every call fails with a 500 naming the flag on a node
    /// without one (`SecretHandle::is_on`).
    pub fn secrets(&self) -> SecretHandle {
        SecretHandle { secrets: self.state.store.secrets(), dedup: self.state.dedup.clone() }
    }

    /// Emit an event; returns (id, position) once it is committed on a quorum. Under an
    /// idempotency key the event is deduplicated like the handler's state writes.
    pub async fn emit(&self, event_name: &str, payload: &(impl Serialize + ?Sized)) -> Result<(String, u64), HandlerError> {
        let broker = self.broker.as_ref().ok_or_else(|| HandlerError::unhandled("no broker in this context"))?;
        // The handler's own fault (a 500), not its caller's: the API's rule for names.
        crate::broker::event::check_event_name(event_name).map_err(HandlerError::unhandled)?;
        let payload = crate::broker::event::encode_payload(payload).map_err(HandlerError::unhandled)?;
        let idempotency_key = self.state.next_tag(&[b"emit", event_name.as_bytes(), &payload])?.map(|(k, seq)| crate::broker::internal_key(format_args!("{k}#emit{seq}")));
        let event = crate::broker::new_event(event_name, payload, &self.meta, self.service.clone(), idempotency_key);
        // Statuses as the HTTP API's for a publish: too large 413, nothing committed 503, an
        // outcome unknown a 503 that says so when the leader was lost under it, a 502 when the
        // leader said it lost it (the handler's writes before it may have committed).
        broker.publish_one(event).await.map_err(|e| HandlerError::from_api(std::sync::Arc::unwrap_or_clone(e).into()))
    }
}

/// A value read with its revision (`StateHandle::get_with_revision`, `list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revisioned<T> {
    pub value: T,
    pub revision: u64,
}

/// One page of a store's keys (`StateHandle::list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage<T> {
    pub items: Vec<(String, Revisioned<T>)>,
    /// The last key of this page when more follow: pass it as `after` for the next page.
    pub next: Option<String>,
}

pub use crate::raft::types::TxnOp;

/// The writes and checks of one `StateHandle::transaction`, in order: at most 64, each key
/// once (`store::MAX_TXN_OPS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    ops: Vec<TxnOp>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    /// Set `key` to `value` encoded as JSON; with `if_revision`, only while the key has it (0:
    /// only while it is absent).
    pub fn put(&mut self, key: &str, value: &(impl Serialize + ?Sized), if_revision: Option<u64>) -> Result<&mut Txn, HandlerError> {
        self.ops.push(TxnOp::Put { key: key.into(), value: serde_json::to_vec(value)?, if_revision });
        Ok(self)
    }

    /// Remove `key` (absent is no failure unless `if_revision` names a revision).
    pub fn delete(&mut self, key: &str, if_revision: Option<u64>) -> &mut Txn {
        self.ops.push(TxnOp::Delete { key: key.into(), if_revision });
        self
    }

    /// Write nothing, but fail the transaction unless `key` has `revision` (0: absent).
    pub fn check(&mut self, key: &str, revision: u64) -> &mut Txn {
        self.ops.push(TxnOp::Check { key: key.into(), revision });
        self
    }
}

/// The state store as a handler sees it: JSON values, writes deduplicated per idempotency key.
#[derive(Clone)]
pub struct StateHandle {
    store: StateStore,
    /// (idempotency key, next write sequence number) when the request carries a key.
    dedup: Option<(String, Arc<AtomicU32>)>,
}

/// Bits of a tag's sequence number that count the write's place in the handler's run
/// (`StateHandle::next_tag`); the bits above hold a fingerprint of what it writes.
const TAG_PLACE_BITS: u32 = 16;
/// Writes and emits one handler run may make under an idempotency key.
pub const MAX_TAGGED_WRITES: u32 = 1 << TAG_PLACE_BITS;

/// A fingerprint of a write's content (its parts, each length-prefixed so that no two splits
/// of the same bytes agree): the same on every node and build, as it goes into the log.
pub fn content_fingerprint(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for part in parts {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize()
}

impl StateHandle {
    /// The tag of the handler's next write or emit, which `what` names: the request's
    /// idempotency key and a sequence number made of the write's place in this run (low bits)
    /// and a fingerprint of `what` (high bits). The state machine answers a tag it has seen
    /// from its record, without applying the write again. With the place alone, a re-run that
    /// writes another key in that place (a handler that draws a random id, or branches on a
    /// read) was answered with the first run's result and its write never applied. A state
    /// write is named by its kind, store and key, not its value: a re-run that reads what the
    /// first run wrote and writes the key again (`v = get(k); put(k, v + 1)`,
    /// `put_if_revision`) is the same write and applies once. An emit is named by its event
    /// name and payload (a re-run that emits other content emits it: events are delivered at
    /// least once, and an event missing for the answer the client got would be worse). (A run
    /// on an earlier build tagged by place alone: a re-run across that upgrade applies again;
    /// so does one across the upgrade that tagged deletes, which take a place since.)
    fn next_tag(&self, what: &[&[u8]]) -> Result<Option<(String, u32)>, HandlerError> {
        match self.store.space() {
            crate::store::Space::State => next_tag(self.dedup.as_ref(), what),
            // The config store's writes are named by their space too: a re-run that writes
            // the state key where the first run wrote the config key of that name is another
            // write.
            space => {
                let mut parts = vec![space.name().as_bytes()];
                parts.extend_from_slice(what);
                next_tag(self.dedup.as_ref(), &parts)
            }
        }
    }

    /// A key's value as JSON (linearizable).
    pub async fn get(&self, store: &str, key: &str) -> Result<Option<serde_json::Value>, HandlerError> {
        self.get_as(store, key).await
    }

    /// A key's value decoded as `T` (linearizable); a value that is not a `T` is a 500.
    pub async fn get_as<T: DeserializeOwned>(&self, store: &str, key: &str) -> Result<Option<T>, HandlerError> {
        match self.store.get(store, key, crate::store::Consistency::Linearizable).await? {
            None => Ok(None),
            Some(v) => Ok(Some(serde_json::from_slice(&v.value)?)),
        }
    }

    /// A key's value decoded as `T` and its revision (linearizable): the read of a
    /// read-modify-write that `put_if_revision` or `delete_if_revision` completes, as Consul's
    /// `ModifyIndex` or Dapr's ETag serve. Without it a handler could pass only 0 or a revision
    /// it had written itself, and fell back to a `get` then a `put` that loses a concurrent
    /// update.
    pub async fn get_with_revision<T: DeserializeOwned>(&self, store: &str, key: &str) -> Result<Option<Revisioned<T>>, HandlerError> {
        match self.store.get(store, key, crate::store::Consistency::Linearizable).await? {
            None => Ok(None),
            Some(v) => Ok(Some(Revisioned { value: serde_json::from_slice(&v.value)?, revision: v.revision })),
        }
    }

    /// One page of the keys of `store` that start with `prefix`, in key order after `after`
    /// (the previous page's `next`), with their values decoded as `T` and revisions
    /// (linearizable): at most `limit` (1 to 10,000) keys and about 4 MiB of values, as
    /// `GET /v1/state/{store}?prefix=` pages. A value that is not a `T` is a 500.
    pub async fn list<T: DeserializeOwned>(&self, store: &str, prefix: &str, after: Option<&str>, limit: usize) -> Result<KeyPage<T>, HandlerError> {
        if !(1..=crate::store::MAX_LIST).contains(&limit) {
            return Err(HandlerError::unhandled(format!("list: a limit from 1 to {}, not {limit}", crate::store::MAX_LIST)));
        }
        let page = self.store.list(store, prefix, after, limit, crate::store::PAGE_BYTES, crate::store::Consistency::Linearizable).await?;
        let mut items = Vec::with_capacity(page.items.len());
        for (key, v) in page.items {
            items.push((key, Revisioned { value: serde_json::from_slice(&v.value)?, revision: v.revision }));
        }
        Ok(KeyPage { items, next: page.next })
    }

    /// Set a key to `value` encoded as JSON; returns its new revision.
    pub async fn put(&self, store: &str, key: &str, value: &(impl Serialize + ?Sized)) -> Result<u64, HandlerError> {
        let bytes = serde_json::to_vec(value)?;
        let tag = self.next_tag(&[b"put", store.as_bytes(), key.as_bytes()])?;
        Ok(self.store.put_tagged(store, key, &bytes, None, tag).await?)
    }

    /// Set a key only while its revision is `revision` (0: only while it is absent); returns
    /// the new revision, or a 409 with the current one when another write came first.
    pub async fn put_if_revision(&self, store: &str, key: &str, value: &(impl Serialize + ?Sized), revision: u64) -> Result<u64, HandlerError> {
        let bytes = serde_json::to_vec(value)?;
        let tag = self.next_tag(&[b"put", store.as_bytes(), key.as_bytes()])?;
        Ok(self.store.put_tagged(store, key, &bytes, Some(revision), tag).await?)
    }

    /// Set a key to `value` encoded as JSON, to be removed `ttl` from now (rounded up to whole
    /// seconds, as the HTTP API's `?ttl=` takes them; at most ten years, and not zero: a 500,
    /// the handler's own mistake); returns its new revision. A later `put` ends the expiry, an
    /// `increment` keeps it. A 503 while a member runs a build without expiring keys. Tagged
    /// as its own kind of write: a re-run that puts the key without a TTL where the first run
    /// put it with one (or the other way round) writes again.
    pub async fn put_with_ttl(&self, store: &str, key: &str, value: &(impl Serialize + ?Sized), ttl: Duration) -> Result<u64, HandlerError> {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        if secs == 0 || secs > crate::store::MAX_TTL_S {
            return Err(HandlerError::unhandled(format!("put_with_ttl: a TTL from 1 s to {} s, not {ttl:?}", crate::store::MAX_TTL_S)));
        }
        let ttl = Duration::from_secs(secs);
        let bytes = serde_json::to_vec(value)?;
        let tag = self.next_tag(&[b"put-ttl", store.as_bytes(), key.as_bytes()])?;
        Ok(self.store.put_expiring_tagged(store, key, &bytes, ttl, tag).await?)
    }

    /// Remove a key; returns whether it existed. Tagged like a put, once every member can
    /// apply it (`Command::Tagged`): a re-run of the handler that deleted a key and then put
    /// it again had its delete applied again and its put answered from the record, and the
    /// key was gone. A re-run answers with what the first run found.
    pub async fn delete(&self, store: &str, key: &str) -> Result<bool, HandlerError> {
        let tag = self.next_tag(&[b"delete", store.as_bytes(), key.as_bytes()])?;
        Ok(self.store.delete_tagged(store, key, None, tag).await?)
    }

    /// Writes `txn`'s ops to keys of `store` all or none, under one revision, which it
    /// returns; a 409 naming the first op whose revision did not match, with nothing written
    /// (read again and retry, as after `put_if_revision`). A 503 while a member runs a build
    /// without transactions. Tagged as one write, named by its ops' kinds and keys: a re-run
    /// that makes the same transaction is answered from the first run's record.
    pub async fn transaction(&self, store: &str, txn: Txn) -> Result<u64, HandlerError> {
        let kinds: Vec<&[u8]> = txn.ops.iter().map(|op| match op {
            TxnOp::Put { .. } => &b"put"[..],
            TxnOp::Delete { .. } => b"delete",
            TxnOp::Check { .. } => b"check",
        }).collect();
        let mut parts: Vec<&[u8]> = vec![b"txn", store.as_bytes()];
        for (kind, op) in kinds.iter().zip(&txn.ops) {
            parts.push(kind);
            parts.push(op.key().as_bytes());
        }
        let tag = self.next_tag(&parts)?;
        Ok(self.store.transaction(store, txn.ops, tag).await?)
    }

    /// Remove a key only while its revision is `revision`; returns whether it existed, or a
    /// 409 with the current revision when another write came first. Tagged as `delete` is (the
    /// same write: a re-run answers with what the first run found).
    pub async fn delete_if_revision(&self, store: &str, key: &str, revision: u64) -> Result<bool, HandlerError> {
        let tag = self.next_tag(&[b"delete", store.as_bytes(), key.as_bytes()])?;
        Ok(self.store.delete_tagged(store, key, Some(revision), tag).await?)
    }

    /// `increment` without the idempotency tag: applied on every call, even a repeated one.
    pub async fn increment_untagged(&self, store: &str, key: &str, by: i64) -> Result<i64, HandlerError> {
        Ok(self.store.increment(store, key, by, None).await?)
    }

    /// Atomically add `by` to an integer key (absent = 0); returns the new value.
    pub async fn increment(&self, store: &str, key: &str, by: i64) -> Result<i64, HandlerError> {
        let tag = self.next_tag(&[b"increment", store.as_bytes(), key.as_bytes()])?;
        Ok(self.store.increment(store, key, by, tag).await?)
    }
}

/// The secret store as a handler sees it: JSON values, writes deduplicated per idempotency key.
#[derive(Clone)]
pub struct SecretHandle {
    secrets: crate::store::secret::SecretStore,
    dedup: Option<(String, Arc<AtomicU32>)>,
}

impl SecretHandle {
    /// Whether this node has the secret store (it needs `--cluster-secret`).
    pub fn is_on(&self) -> bool {
        self.secrets.is_on()
    }

    /// A secret's value (linearizable).
    pub async fn get(&self, store: &str, key: &str) -> Result<Option<serde_json::Value>, HandlerError> {
        self.get_as(store, key).await
    }

    /// A secret's value decoded as `T` (linearizable); a value that is not a `T` is a 500.
    pub async fn get_as<T: DeserializeOwned>(&self, store: &str, key: &str) -> Result<Option<T>, HandlerError> {
        match self.secrets.get(store, key, crate::store::Consistency::Linearizable).await? {
            None => Ok(None),
            Some((value, _)) => Ok(Some(serde_json::from_slice(&value)?)),
        }
    }

    /// Set a secret to `value` encoded as JSON; returns its new revision.
    pub async fn put(&self, store: &str, key: &str, value: &(impl Serialize + ?Sized)) -> Result<u64, HandlerError> {
        let bytes = serde_json::to_vec(value)?;
        let tag = next_tag(self.dedup.as_ref(), &[b"put-secret", store.as_bytes(), key.as_bytes()])?;
        Ok(self.secrets.put_tagged(store, key, &bytes, crate::store::Precondition::Any, tag).await?)
    }

    /// Remove a secret; returns whether it existed. Tagged as `StateHandle::delete` is.
    pub async fn delete(&self, store: &str, key: &str) -> Result<bool, HandlerError> {
        let tag = next_tag(self.dedup.as_ref(), &[b"delete-secret", store.as_bytes(), key.as_bytes()])?;
        Ok(self.secrets.delete_tagged(store, key, tag).await?)
    }
}

/// `StateHandle::next_tag` on a handler run's (idempotency key, next place).
pub(crate) fn next_tag(dedup: Option<&(String, Arc<AtomicU32>)>, what: &[&[u8]]) -> Result<Option<(String, u32)>, HandlerError> {
    let Some((key, next)) = dedup else { return Ok(None) };
    let place = next.fetch_add(1, Ordering::SeqCst);
    if place >= MAX_TAGGED_WRITES {
        return Err(HandlerError::unhandled(format!(
            "a handler run makes at most {MAX_TAGGED_WRITES} state writes and emits under one idempotency key"
        )));
    }
    let print = content_fingerprint(what) >> TAG_PLACE_BITS;
    Ok(Some((key.clone(), print << TAG_PLACE_BITS | place)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handler's `ctx.header`: any case, the first of a repeated name, text only.
    #[test]
    fn a_header_is_found_in_any_case_first_value_first() {
        let list: HeaderList = vec![
            ("accept".into(), b"text/csv".to_vec()),
            ("cookie".into(), b"a=1".to_vec()),
            ("cookie".into(), b"b=2".to_vec()),
            ("x-raw".into(), vec![0xff, 0xfe]),
        ];
        assert_eq!(header_in(&list, "Accept"), Some("text/csv"));
        assert_eq!(header_in(&list, "cookie"), Some("a=1"));
        assert_eq!(header_in(&list, "x-raw"), None, "not text");
        assert_eq!(header_in(&list, "authorization"), None);
    }

    /// The typed helpers: an `Emit` of any `Serialize`, an event's payload decoded as a type,
    /// and a JSON error that `?` turns into the handler's own 500.
    #[test]
    fn typed_payloads_encode_decode_and_fail_as_the_handlers_own_500() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Order {
            id: String,
            qty: u32,
        }
        let emit = Emit::new("orderPlaced", &Order { id: "o1".into(), qty: 2 }).expect("encodes");
        assert_eq!(emit, Emit { event_name: "orderPlaced".into(), payload: serde_json::json!({"id": "o1", "qty": 2}) });
        let body = crate::broker::event::EventBody {
            id: "e".into(),
            event_name: "orderPlaced".into(),
            timestamp: 0,
            message_type: crate::broker::event::CUSTOM_MESSAGE.into(),
            sender: None,
            principal_id: None,
            tenant_id: None,
            trace_id: None,
            correlation_id: None,
            payload: serde_json::to_vec(&emit.payload).expect("encodes"),
        };
        assert_eq!(body.payload_as::<Order>().expect("decodes"), Order { id: "o1".into(), qty: 2 });
        let wrong = || -> Result<Vec<u8>, HandlerError> { Ok(body.payload_as::<Vec<u8>>()?) };
        let e = wrong().expect_err("an object is not a list");
        assert_eq!(e.status, 500, "{e}");
        assert!(e.message.starts_with("JSON: "), "{e}");
        // A map with non-string keys does not encode as JSON: the handler's fault too.
        let bad: BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
        assert_eq!(Emit::new("x", &bad).expect_err("no JSON for tuple keys").status, 500);
    }

    #[test]
    fn a_long_error_is_cut_on_a_character_boundary_and_loses_its_data() {
        let mut s = "é".repeat(10);
        truncate_utf8(&mut s, 8);
        assert!(s.len() <= 8 && s.ends_with('…'), "{s:?}");
        assert_eq!(s, "éé…");
        let mut short = "abc".to_string();
        truncate_utf8(&mut short, 3);
        assert_eq!(short, "abc", "what fits is kept as it is");

        let e = HandlerError::new(422, "x".repeat(5000)).with_data(&serde_json::json!({"field": "y"}));
        let cut = e.clone().truncated(1024);
        assert_eq!((cut.status, cut.data.clone()), (422, None), "the status stays, the data goes");
        assert!(cut.size() <= 1024, "{}", cut.size());
        let small = HandlerError::new(400, "bad").with_data(&serde_json::json!(1));
        assert_eq!(small.clone().truncated(1024), small, "a small error is kept whole");
    }

    #[test]
    fn a_handlers_store_and_emit_errors_get_the_http_apis_statuses() {
        use crate::raft::ReplicaError;
        use crate::raft::types::CommandResult;
        use crate::broker::BrokerError;
        use crate::peer::message::RemoteError;
        let replica = |r: ReplicaError| HandlerError::from(StoreError::Replica(r)).status;
        assert_eq!(replica(ReplicaError::Unavailable), 503, "no quorum in time: nothing to tell");
        assert_eq!(replica(ReplicaError::Undecided), 503, "no quorum in time, though proposed: still issue 1's 503");
        assert_eq!(replica(ReplicaError::Stopped), 503, "this node's core stopped: another node may take it");
        assert_eq!(replica(ReplicaError::Remote(RemoteError::Internal("outcome unknown".into()))), 502);
        // The leader lost after the write reached it: issue 2's no-quorum 503, saying so.
        let lost = ReplicaError::Forward { leader: 1, source: crate::peer::PeerError::Closed { peer: 1 } };
        assert!(lost.to_string().contains("outcome is unknown"), "{lost}");
        assert_eq!(replica(lost), 503);
        assert_eq!(replica(ReplicaError::Remote(RemoteError::NotLeader { leader: None })), 503);
        assert_eq!(replica(ReplicaError::Remote(RemoteError::Invalid("x".into()))), 400);
        assert_eq!(replica(ReplicaError::TooLarge { bytes: 2, limit: 1 }), 413);
        assert_eq!(HandlerError::from(StoreError::QuotaExceeded("full".into())).status, 507);
        assert_eq!(HandlerError::from(StoreError::InvalidJson("x".into())).status, 400);
        assert_eq!(HandlerError::from(StoreError::Unexpected(CommandResult::SubUpdated)).status, 500);
        assert_eq!(HandlerError::from(StoreError::PreconditionFailed { current: Some(3) }).status, 409, "a handler's lost CAS");
        for (e, status) in [
            (BrokerError::Stopped, 503),
            (BrokerError::TooLarge { bytes: 2, limit: 1 }, 413),
            (BrokerError::Store(StoreError::Replica(ReplicaError::Remote(RemoteError::Internal("?".into())))), 502),
        ] {
            // What `Ctx::emit` answers with.
            assert_eq!(HandlerError::from_api(e.clone().into()).status, status, "{e}");
            let api: crate::api::error::ApiError = e.into();
            assert_eq!(api.status().as_u16(), status);
        }
    }
}
