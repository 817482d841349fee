//! The typed service builder: how a Rust service is written for raftbridge.
//!
//! A handler is a plain `async fn(Ctx, Input, Params) -> Result<Output, HandlerError>` over serde
//! types. The builder erases it into a [`CommandHandler`] so the proxy sees compiled-in services
//! and sidecar upstreams through the same [`ServiceParts`]. Everything a handler should not have to
//! think about lives here, once:
//! - decoding: a body that is not the input type, or parameters that are not the params type, is
//!   the caller's fault (400, "invalid payload: ..." / "invalid parameters: ..."). An empty body
//!   decodes as JSON `null`, so `()`, `Option<T>` and `serde_json::Value` accept it;
//! - parameters (query + path) arrive as strings; a small serde deserializer parses numbers, bools
//!   and unit enum variants out of them, so `struct P { ms: u64 }` just works, and `P = ()` ignores
//!   whatever parameters came;
//! - a result that serializes to `null` (`()`, `None`) is answered 204 with an empty body;
//! - a panicking handler is caught (500 "handler panicked") and never takes the node down, and the
//!   deadline (the command's timeout, less what the request has spent of it before the handler
//!   started) is enforced here too, so a hung handler is dropped rather than left running (504).
//!   A shorter deadline of the client's (`x-timeout-ms`) does not reach here: it ends only the
//!   client's wait (`proxy`), and the handler runs on.
//!
//! [`Service::into_parts`] validates the declarations (names, methods, paths, no two commands on
//! one route) because a bad route found at startup is far cheaper than one found by a client.

use std::collections::btree_map;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::Serialize;

use super::{BoxFuture, CommandDecl, CommandHandler, Ctx, HandlerError, Invocation, Output, ServiceDecl, ServiceParts};
use super::SubscriptionHandler;
use crate::broker::event::SubscriptionDecl;

/// Timeout of a command that does not set one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// A subscription's ack deadline at most: one day.
pub const MAX_ACK_DEADLINE_MS: u64 = 86_400_000;
/// A subscription's events in flight per consumer at most: every one holds a slot in the
/// leader's delivery state and a running handler on the consumer.
pub const MAX_IN_FLIGHT: u32 = 65_536;

/// A service or command declaration that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("service `{service}` v{version}: {reason}")]
    Service { service: String, version: u32, reason: String },
    #[error("service `{service}` v{version}, command `{command}`: {reason}")]
    Command { service: String, version: u32, command: String, reason: String },
}

/// A service (name + version) being assembled from commands.
pub struct Service {
    name: String,
    version: u32,
    commands: Vec<(CommandDecl, Arc<dyn CommandHandler>)>,
    subscriptions: Vec<(SubscriptionDecl, Arc<dyn SubscriptionHandler>)>,
}

impl Service {
    pub fn new(name: impl Into<String>, version: u32) -> Service {
        Service { name: name.into(), version, commands: Vec::new(), subscriptions: Vec::new() }
    }

    /// Adds a subscription, as returned by [`super::subscription::SubscriptionBuilder::handler`].
    pub fn subscription(mut self, sub: (SubscriptionDecl, Arc<dyn SubscriptionHandler>)) -> Service {
        self.subscriptions.push(sub);
        self
    }

    /// Adds a command, as returned by [`CommandBuilder::handler`].
    pub fn command(mut self, command: (CommandDecl, Arc<dyn CommandHandler>)) -> Service {
        self.commands.push(command);
        self
    }

    /// Validates the declarations and returns what a node runs.
    pub fn into_parts(self) -> Result<ServiceParts, BuildError> {
        let (service, version) = (self.name, self.version);
        let fail = |reason: String| BuildError::Service { service: service.clone(), version, reason };
        check_name(&service).map_err(fail)?;
        if version == 0 {
            return Err(fail("version must be at least 1".into()));
        }
        let mut routes = BTreeSet::new();
        let mut handlers = BTreeMap::new();
        let mut commands = Vec::with_capacity(self.commands.len());
        for (decl, handler) in self.commands {
            let fail = |reason: String| BuildError::Command {
                service: service.clone(),
                version,
                command: decl.name.clone(),
                reason,
            };
            check_name(&decl.name).map_err(fail)?;
            check_method(&decl.method).map_err(fail)?;
            let shape = check_path(&decl.path).map_err(fail)?;
            if decl.timeout_ms == 0 {
                return Err(fail("timeout must be at least 1 ms".into()));
            }
            if let Some(event) = &decl.success_event {
                crate::broker::event::check_event_name(event).map_err(|e| fail(format!("success event: {e}")))?;
            }
            if !routes.insert((decl.method.clone(), shape)) {
                return Err(fail(format!("route {} {} is already taken by another command", decl.method, decl.path)));
            }
            if handlers.insert(decl.name.clone(), handler).is_some() {
                return Err(fail("two commands have this name".into()));
            }
            commands.push(decl);
        }
        let mut subscribers = BTreeMap::new();
        let mut subscriptions = Vec::with_capacity(self.subscriptions.len());
        for (decl, handler) in self.subscriptions {
            let fail = |reason: String| BuildError::Service { service: service.clone(), version, reason };
            check_name(&decl.name).map_err(|r| fail(format!("subscription: {r}")))?;
            if decl.max_attempts == 0 || decl.max_in_flight == 0 || decl.ack_deadline_ms == 0 {
                return Err(fail(format!("subscription {}: attempts, in-flight and ack deadline (ms) must be ≥ 1", decl.name)));
            }
            if decl.max_in_flight > MAX_IN_FLIGHT {
                return Err(fail(format!("subscription {}: max in flight {} is over the limit of {MAX_IN_FLIGHT}", decl.name, decl.max_in_flight)));
            }
            decl.filter.check().map_err(|e| fail(format!("subscription {}: {e}", decl.name)))?;
            // A deadline is added to `Instant`s on the delivery path (it would overflow one).
            if decl.ack_deadline_ms > MAX_ACK_DEADLINE_MS {
                return Err(fail(format!("subscription {}: ack deadline {} ms is over the limit of one day", decl.name, decl.ack_deadline_ms)));
            }
            if subscribers.insert(decl.name.clone(), handler).is_some() {
                return Err(fail(format!("two subscriptions are named {}", decl.name)));
            }
            subscriptions.push(decl);
        }
        Ok(ServiceParts {
            decl: ServiceDecl { name: service, version, commands, subscriptions, available: true },
            handlers,
            subscribers,
        })
    }
}

/// Declares one command; finish with [`CommandBuilder::handler`].
#[derive(Debug, Clone)]
pub struct CommandBuilder {
    decl: CommandDecl,
}

impl CommandBuilder {
    /// `path` is relative to `/api/v{version}/` (a leading `/` is dropped), `:name` segments are
    /// parameters. Not idempotent, 30 s timeout, no schemas until said otherwise.
    pub fn new(name: impl Into<String>, method: http::Method, path: &str) -> CommandBuilder {
        CommandBuilder {
            decl: CommandDecl {
                name: name.into(),
                method: method.as_str().to_string(),
                path: path.strip_prefix('/').unwrap_or(path).to_string(),
                idempotent: false,
                timeout_ms: DEFAULT_TIMEOUT.as_millis() as u64,
                input_schema: None,
                output_schema: None,
                success_event: None,
            },
        }
    }
    pub fn get(name: impl Into<String>, path: &str) -> CommandBuilder {
        CommandBuilder::new(name, http::Method::GET, path)
    }
    pub fn post(name: impl Into<String>, path: &str) -> CommandBuilder {
        CommandBuilder::new(name, http::Method::POST, path)
    }
    pub fn put(name: impl Into<String>, path: &str) -> CommandBuilder {
        CommandBuilder::new(name, http::Method::PUT, path)
    }
    pub fn delete(name: impl Into<String>, path: &str) -> CommandBuilder {
        CommandBuilder::new(name, http::Method::DELETE, path)
    }

    /// Safe to run twice: the proxy may then retry it on another node.
    pub fn idempotent(mut self, yes: bool) -> CommandBuilder {
        self.decl.idempotent = yes;
        self
    }
    pub fn timeout(mut self, timeout: Duration) -> CommandBuilder {
        self.decl.timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }
    pub fn input_schema(mut self, schema: serde_json::Value) -> CommandBuilder {
        self.decl.input_schema = Some(schema.to_string());
        self
    }
    pub fn output_schema(mut self, schema: serde_json::Value) -> CommandBuilder {
        self.decl.output_schema = Some(schema.to_string());
        self
    }
    /// Also emit a successful result as this event (message type `commandSuccessResponse`).
    pub fn success_event(mut self, event_name: impl Into<String>) -> CommandBuilder {
        self.decl.success_event = Some(event_name.into());
        self
    }

    pub fn decl(&self) -> &CommandDecl {
        &self.decl
    }

    /// Serves the command with a typed handler: `I` is decoded from the body (empty = `null`),
    /// `P` from the query and path parameters, and `O` is the JSON answer (`null` → 204).
    pub fn handler<I, P, O, F, Fut>(self, f: F) -> (CommandDecl, Arc<dyn CommandHandler>)
    where
        I: DeserializeOwned + Send + 'static,
        P: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(Ctx, I, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        let limit = Duration::from_millis(self.decl.timeout_ms);
        let typed = Typed { f, limit, types: Types::<I, P, O>::default() };
        (self.decl, Arc::new(typed))
    }

    /// Serves the command with an already type-erased handler (the sidecar's forwarder).
    pub fn raw_handler(self, handler: Arc<dyn CommandHandler>) -> (CommandDecl, Arc<dyn CommandHandler>) {
        (self.decl, handler)
    }
}

/// Names the handler's types without owning values of them (keeps `Typed` `Send + Sync`).
type Types<I, P, O> = PhantomData<fn() -> (I, P, O)>;

struct Typed<F, I, P, O> {
    f: F,
    limit: Duration,
    types: Types<I, P, O>,
}

impl<I, P, O, F, Fut> CommandHandler for Typed<F, I, P, O>
where
    I: DeserializeOwned + Send + 'static,
    P: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(Ctx, I, P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
{
    fn call(&self, ctx: Ctx, mut inv: Invocation) -> BoxFuture<Result<Output, HandlerError>> {
        // Moved, not copied: the handler reads them through its `Ctx`.
        let ctx = ctx.with_headers(std::mem::take(&mut inv.headers));
        invoke(|i, p| (self.f)(ctx, i, p), &inv, self.limit)
    }
}

/// Decode, start, await under the deadline with panics caught, encode. Generic over how the
/// handler is started so it can be tested without a state store.
fn invoke<I, P, O, Fut>(
    start: impl FnOnce(I, P) -> Fut,
    inv: &Invocation,
    limit: Duration,
) -> BoxFuture<Result<Output, HandlerError>>
where
    I: DeserializeOwned,
    P: DeserializeOwned,
    O: Serialize,
    Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
{
    let decoded = decode_payload::<I>(&inv.payload).and_then(|i| Ok((i, decode_params::<P>(&inv.params)?)));
    let (input, params) = match decoded {
        Ok(decoded) => decoded,
        Err(e) => return Box::pin(std::future::ready(Err(e))),
    };
    let command = inv.command.clone();
    // A handler may also panic before returning its future.
    let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| start(input, params))) {
        Ok(fut) => fut,
        Err(panic) => return Box::pin(std::future::ready(Err(panicked(&command, &*panic)))),
    };
    let limit = deadline(limit, inv.timeout_ms);
    Box::pin(async move {
        match tokio::time::timeout(limit, AssertUnwindSafe(fut).catch_unwind()).await {
            Err(_) => Err(HandlerError::new(504, format!("command `{command}` did not finish within {} ms", limit.as_millis()))),
            Ok(Err(panic)) => Err(panicked(&command, &*panic)),
            Ok(Ok(result)) => result.and_then(encode_output),
        }
    })
}

fn panicked(command: &str, panic: &(dyn std::any::Any + Send)) -> HandlerError {
    let what = panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str));
    tracing::error!(command, panic = what.unwrap_or("?"), "command handler panicked");
    HandlerError::unhandled("handler panicked")
}

/// The command's timeout, shortened by the time the invocation has left of it (`0` = not
/// given).
pub(crate) fn deadline(limit: Duration, request_ms: u64) -> Duration {
    if request_ms == 0 {
        limit
    } else {
        limit.min(Duration::from_millis(request_ms))
    }
}

/// Decodes a request body; empty (or blank) decodes as JSON `null`.
pub fn decode_payload<I: DeserializeOwned>(payload: &[u8]) -> Result<I, HandlerError> {
    let json: &[u8] = if payload.iter().all(u8::is_ascii_whitespace) { b"null" } else { payload };
    serde_json::from_slice(json).map_err(|e| HandlerError::bad_request(format!("invalid payload: {e}")))
}

/// Decodes query and path parameters (strings) into `P`; see the module doc.
pub fn decode_params<P: DeserializeOwned>(params: &BTreeMap<String, String>) -> Result<P, HandlerError> {
    P::deserialize(Params(params)).map_err(|e| HandlerError::bad_request(format!("invalid parameters: {e}")))
}

/// Serializes a result: `null` → 204 with an empty body, anything else → 200 JSON.
pub fn encode_output<O: Serialize>(output: O) -> Result<Output, HandlerError> {
    let body = serde_json::to_vec(&output)
        .map_err(|e| HandlerError::unhandled(format!("could not serialize the result: {e}")))?;
    Ok(Output::json(if body == b"null" { Bytes::new() } else { Bytes::from(body) }))
}

pub use crate::proxy::routing::match_path;

/// A service, command or subscription name: 1..=128 characters of `A-Z a-z 0-9 - _ .` (the API
/// refuses any other subscription name with a 400).
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if name.is_empty() || name.len() > 128 || !name.chars().all(ok) {
        return Err(format!("name {name:?} must be 1..=128 characters of A-Z a-z 0-9 - _ ."));
    }
    Ok(())
}

fn check_method(method: &str) -> Result<(), String> {
    let valid = http::Method::from_bytes(method.as_bytes()).is_ok();
    if !valid || method.is_empty() || method != method.to_ascii_uppercase() {
        return Err(format!("method {method:?} is not an upper-case HTTP method"));
    }
    Ok(())
}

/// Validates a route pattern and returns its shape (parameters as `:`), to find clashing routes.
fn check_path(path: &str) -> Result<String, String> {
    let literal = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c));
    let mut names = BTreeSet::new();
    let mut shape = Vec::new();
    for segment in path.split('/') {
        match segment.strip_prefix(':') {
            Some(name) if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                if !names.insert(name) {
                    return Err(format!("path {path:?} names parameter `{name}` twice"));
                }
                shape.push(":");
            }
            None if !segment.is_empty() && literal(segment) => shape.push(segment),
            _ => {
                return Err(format!(
                    "path {path:?}: segment {segment:?} must be non-empty A-Z a-z 0-9 - . _ ~, or :name"
                ))
            }
        }
    }
    Ok(shape.join("/"))
}

/// Deserializes the parameter map: a map for structs/maps/`Value`, anything for `()`.
struct Params<'a>(&'a BTreeMap<String, String>);

impl<'de, 'a> de::Deserializer<'de> for Params<'a> {
    type Error = de::value::Error;
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_map(ParamsAccess { entries: self.0.iter(), value: None })
    }
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_unit()
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_some(self)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

struct ParamsAccess<'a> {
    entries: btree_map::Iter<'a, String, String>,
    value: Option<(&'a str, &'a str)>,
}

impl<'de, 'a> MapAccess<'de> for ParamsAccess<'a> {
    type Error = de::value::Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Self::Error> {
        let Some((key, value)) = self.entries.next() else { return Ok(None) };
        self.value = Some((key, value));
        seed.deserialize(key.as_str().into_deserializer()).map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Self::Error> {
        let (key, value) = self.value.take().ok_or_else(|| de::Error::custom("value before key"))?;
        seed.deserialize(ParamValue(value)).map_err(|e| de::Error::custom(format!("parameter `{key}`: {e}")))
    }
}

/// One parameter: a string that numbers, bools and unit enum variants are parsed from.
struct ParamValue<'a>(&'a str);

macro_rules! parse_as {
    ($($method:ident => $visit:ident: $ty:ty),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
            match self.0.trim().parse::<$ty>() {
                Ok(v) => visitor.$visit(v),
                Err(_) => Err(de::Error::custom(format!("{:?} is not a valid {}", self.0, stringify!($ty)))),
            }
        }
    )*};
}

impl<'de, 'a> de::Deserializer<'de> for ParamValue<'a> {
    type Error = de::value::Error;
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_str(self.0)
    }
    parse_as! {
        deserialize_bool => visit_bool: bool, deserialize_i8 => visit_i8: i8, deserialize_i16 => visit_i16: i16,
        deserialize_i32 => visit_i32: i32, deserialize_i64 => visit_i64: i64, deserialize_u8 => visit_u8: u8,
        deserialize_u16 => visit_u16: u16, deserialize_u32 => visit_u32: u32, deserialize_u64 => visit_u64: u64,
        deserialize_f32 => visit_f32: f32, deserialize_f64 => visit_f64: f64,
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_some(self)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self.0.into_deserializer())
    }
    serde::forward_to_deserialize_any! {
        i128 u128 char str string bytes byte_buf unit unit_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    fn inv(payload: &str, params: &[(&str, &str)], timeout_ms: u64) -> Invocation {
        Invocation {
            service: "s".into(),
            version: 1,
            command: "c".into(),
            params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            payload: Bytes::from(payload.to_string()),
            meta: Default::default(),
            timeout_ms,
            headers: Vec::new(),
        }
    }

    fn body(out: &Output) -> serde_json::Value {
        serde_json::from_slice(&out.body).unwrap()
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Page {
        id: String,
        limit: u32,
        offset: Option<i64>,
        desc: Option<bool>,
        order: Option<Order>,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Order {
        Asc,
        Desc,
    }

    #[test]
    fn params_parse_numbers_bools_and_enums_from_strings() {
        let p = |pairs: &[(&str, &str)]| decode_params::<Page>(&inv("", pairs, 0).params);
        let page = p(&[("id", "x 1"), ("limit", "10"), ("desc", "true"), ("order", "desc"), ("extra", "ignored")]).unwrap();
        assert_eq!(page, Page { id: "x 1".into(), limit: 10, offset: None, desc: Some(true), order: Some(Order::Desc) });
        assert_eq!(p(&[("id", "1"), ("limit", "1"), ("offset", "-5")]).unwrap().offset, Some(-5));
        let e = p(&[("id", "1"), ("limit", "ten")]).unwrap_err();
        assert_eq!((e.status, e.message.as_str()), (400, r#"invalid parameters: parameter `limit`: "ten" is not a valid u32"#));
        let e = p(&[("limit", "1")]).unwrap_err();
        assert_eq!(e.message, "invalid parameters: missing field `id`");
        assert!(p(&[("id", "1"), ("limit", "1"), ("order", "up")]).is_err());
        // `()` ignores parameters; `Value` and maps take them as strings.
        decode_params::<()>(&inv("", &[("a", "1")], 0).params).unwrap();
        let v: serde_json::Value = decode_params(&inv("", &[("a", "1")], 0).params).unwrap();
        assert_eq!(v, json!({"a": "1"}));
        let m: BTreeMap<String, u64> = decode_params(&inv("", &[("a", "1")], 0).params).unwrap();
        assert_eq!(m["a"], 1);
    }

    #[test]
    fn payload_empty_is_null_and_garbage_is_400() {
        assert_eq!(decode_payload::<serde_json::Value>(b"").unwrap(), serde_json::Value::Null);
        decode_payload::<()>(b" \n").unwrap();
        assert_eq!(decode_payload::<Option<u32>>(b"").unwrap(), None);
        let e = decode_payload::<serde_json::Value>(b"{nope").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.starts_with("invalid payload: "), "{}", e.message);
        assert_eq!(decode_payload::<u32>(b"\"x\"").unwrap_err().status, 400);
    }

    #[tokio::test]
    async fn invoke_decodes_runs_and_encodes() {
        let limit = Duration::from_secs(5);
        let echo = |i: serde_json::Value, p: BTreeMap<String, String>| async move { Ok(json!({"i": i, "p": p})) };
        let out = invoke(echo, &inv(r#"{"a":1}"#, &[("x", "y")], 0), limit).await.unwrap();
        assert_eq!((out.status, out.content_type.as_deref()), (200, Some("application/json")));
        assert_eq!(body(&out), json!({"i": {"a": 1}, "p": {"x": "y"}}));
        let unit = |_: (), _: ()| async { Ok(()) };
        let out = invoke(unit, &inv("", &[], 0), limit).await.unwrap();
        assert_eq!((out.status, out.body.len(), out.content_type), (204, 0, None));
        let e = invoke(unit, &inv("[1]", &[], 0), limit).await.unwrap_err();
        assert_eq!(e.status, 400);
        let handled = |_: (), _: ()| async { Err::<(), _>(HandlerError::new(409, "taken").with_data(&json!({"k": 1}))) };
        let e = invoke(handled, &inv("", &[], 0), limit).await.unwrap_err();
        assert_eq!(e.to_json(), json!({"status": 409, "message": "taken", "data": {"k": 1}}));
    }

    #[tokio::test]
    async fn panics_become_500_and_deadlines_504() {
        let limit = Duration::from_secs(5);
        let in_future = |_: (), _: ()| async {
            if true {
                panic!("boom");
            }
            Ok(())
        };
        let e = invoke(in_future, &inv("", &[], 0), limit).await.unwrap_err();
        assert_eq!((e.status, e.message.as_str()), (500, "handler panicked"));
        let before_future = |_: (), _: ()| -> std::future::Ready<Result<(), HandlerError>> { panic!("early") };
        assert_eq!(invoke(before_future, &inv("", &[], 0), limit).await.unwrap_err().status, 500);
        let slow = |_: (), _: ()| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(())
        };
        let started = std::time::Instant::now();
        let e = invoke(slow, &inv("", &[], 50), limit).await.unwrap_err();
        assert_eq!(e.status, 504, "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let e = invoke(slow, &inv("", &[], 0), Duration::from_millis(30)).await.unwrap_err();
        assert_eq!(e.status, 504);
    }

    #[test]
    fn match_path_captures_and_is_strict() {
        let m = match_path("counter/:name/increment", "/counter/a%20b/increment").unwrap();
        assert_eq!(m.into_iter().collect::<Vec<_>>(), vec![("name".to_string(), "a b".to_string())]);
        assert_eq!(match_path("echo", "echo"), Some(BTreeMap::new()));
        assert_eq!(match_path("/echo", "/echo"), Some(BTreeMap::new()));
        for path in ["echo/", "ech", "echo/x", "", "/", "//echo"] {
            assert_eq!(match_path("echo", path), None, "{path:?}");
        }
        for path in ["counter//increment", "counter/x/increment/", "counter/x", "counter/%zz/increment", "counter/%ff/increment"] {
            assert_eq!(match_path("counter/:name/increment", path), None, "{path:?}");
        }
        let m = match_path(":a/:b", "1/2").unwrap();
        assert_eq!((m["a"].as_str(), m["b"].as_str()), ("1", "2"));
    }

    fn noop() -> CommandBuilder {
        CommandBuilder::post("noop", "noop")
    }
    fn h(b: CommandBuilder) -> (CommandDecl, Arc<dyn CommandHandler>) {
        b.handler(|_: Ctx, _: (), _: ()| async { Ok(()) })
    }

    #[test]
    fn builder_declares_and_validates() {
        let parts = Service::new("orders", 2)
            .command(h(CommandBuilder::get("list", "/orders").idempotent(true).timeout(Duration::from_secs(3))))
            .command(h(CommandBuilder::post("create", "orders/:id").input_schema(json!({"type": "object"}))))
            .command(h(CommandBuilder::put("update", "orders/:id")))
            .into_parts()
            .unwrap();
        assert_eq!((parts.decl.name.as_str(), parts.decl.version), ("orders", 2));
        let list = &parts.decl.commands[0];
        assert_eq!((list.method.as_str(), list.path.as_str(), list.idempotent, list.timeout_ms), ("GET", "orders", true, 3000));
        let create = &parts.decl.commands[1];
        assert_eq!((create.idempotent, create.timeout_ms), (false, 30_000));
        assert_eq!(create.input_schema.as_deref(), Some(r#"{"type":"object"}"#));
        assert_eq!(parts.handlers.keys().collect::<Vec<_>>(), ["create", "list", "update"]);

        let bad = |s: Service| s.into_parts().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(bad(Service::new("s", 1).command(h(noop())).command(h(noop()))).contains("already taken"));
        let clash = Service::new("s", 1)
            .command(h(CommandBuilder::get("a", "x/:id")))
            .command(h(CommandBuilder::get("b", "x/:name")));
        assert!(bad(clash).contains("already taken"));
        let same_name = Service::new("s", 1).command(h(noop())).command(h(CommandBuilder::get("noop", "noop")));
        assert!(bad(same_name).contains("two commands"));
        for path in ["", "a//b", "a/", "a/:", "a/b?c", ":x/:x", "a b"] {
            let msg = bad(Service::new("s", 1).command(h(CommandBuilder::get("c", path))));
            assert!(msg.contains("path"), "{path:?}: {msg}");
        }
        assert!(bad(Service::new("s", 0).command(h(noop()))).contains("version"));
        assert!(bad(Service::new("a/b", 1)).contains("name"));
        assert!(bad(Service::new("s", 1).command(h(noop().timeout(Duration::ZERO)))).contains("timeout"));
        let lower = CommandBuilder::new("c", http::Method::from_bytes(b"get").unwrap(), "c");
        assert!(bad(Service::new("s", 1).command(h(lower))).contains("method"));
        let sub = |d: Duration| {
            Service::new("s", 1).subscription(crate::sdk::subscription::SubscriptionBuilder::new("sub").ack_deadline(d).handler(|_, _| async { Ok(None) }))
        };
        assert!(sub(Duration::from_secs(86_400)).into_parts().is_ok());
        assert!(bad(sub(Duration::from_secs(86_401))).contains("ack deadline"));
        assert!(bad(sub(Duration::MAX)).contains("ack deadline"));
        assert!(bad(sub(Duration::from_millis(u64::MAX) + Duration::from_millis(6))).contains("ack deadline"), "not wrapped to 5 ms");
        // A zero deadline is refused, as the sidecar's is (it used to become 1 ms: every event
        // dead-lettered after its attempts), and so is a sub-millisecond one.
        assert!(bad(sub(Duration::ZERO)).contains("ack deadline"));
        assert!(bad(sub(Duration::from_micros(500))).contains("ack deadline"));
        let built = |b: crate::sdk::subscription::SubscriptionBuilder| Service::new("s", 1).subscription(b.handler(|_, _| async { Ok(None) }));
        let named = crate::sdk::subscription::SubscriptionBuilder::new;
        assert!(built(named("sub").max_in_flight(MAX_IN_FLIGHT)).into_parts().is_ok());
        assert!(bad(built(named("sub").max_in_flight(MAX_IN_FLIGHT + 1))).contains("in flight"));
        // Filters no event could match (`EventFilter::check`) fail the build, named.
        assert!(bad(built(named("sub").tenant_id(""))).contains("tenantId"));
        assert!(bad(built(named("sub").message_type("command"))).contains("messageType"));
        // A success event is named as any published event must be.
        assert!(bad(Service::new("s", 1).command(h(noop().success_event("")))).contains("success event"));
        assert!(bad(Service::new("s", 1).command(h(noop().success_event("a\nb")))).contains("success event"));
        assert!(Service::new("s", 1).command(h(noop().success_event("done"))).into_parts().is_ok());
    }
}
