//! The example `demo` service (version 1), run with `--example-services` and by `raftbridge dev`.
//!
//! Each command exists to make one property of the cluster observable from outside:
//! - `echo` (idempotent) answers with the node that served it: load balancing and failover;
//! - `increment` (not idempotent) changes replicated state: exactly-once effects when the client
//!   sends an `Idempotency-Key` (the state layer deduplicates tagged writes);
//! - `slow` (idempotent) sleeps: deadlines, and requests in flight on a node that dies.
//! - `notify` answers its input and declares a success event, `notified`: a command's result
//!   emitted as an event;
//! - `orders` stores an order and emits `orderPlaced` (an order's `"holdMs": N` waits N ms
//!   between the two: a node stopped then must still emit); the shared durable subscription
//!   `countOrders` increments `orders-seen/<order id>` for each one it processes, so a test can see
//!   at-least-once delivery and count duplicates by content (an order with `"poison": true`
//!   fails each attempt, one with `"malformed": true` fails with no retry: dead letters); the
//!   every-instance subscription
//!   `auditOrders` records `orders-audit/<node>/<order id>` on each node.
//! - `benchSink`, a shared durable subscription to `benchEvent` (what `raftbridge bench events`
//!   publishes), only acknowledges: the bench reads its end-to-end delivery latency from
//!   `/metrics` (`raftbridge_delivery_latency_seconds{subscription="benchSink"}`). It takes
//!   1,024 events in flight per consumer, not the default 64: with 64, three consumers handled
//!   about 55,000 events/s (64 per node over a ~3.5 ms round), so under `--batch 100` (~170,000/s)
//!   delivery fell seconds behind and retention dropped what it had not reached; with 1,024 it
//!   kept up (p99 ≤ 75 ms, measured with `raftbridge bench events --batch 100`).
//! - `benchEveryNode`, an every-instance subscription to `benchBroadcast`, only acknowledges
//!   too: the same measurement for the every-instance path (`raftbridge bench events --name
//!   benchBroadcast --subscription benchEveryNode`).
//! - `answerPings`, a shared durable subscription to `demoPing`, returns an event: each ping is
//!   answered by a `demoPong` whose payload is `{"ping": <the ping's payload>, "servedBy": node}`,
//!   emitted once per ping (deduplicated across redeliveries) with the ping's trace, principal
//!   and tenant: a subscription's returned event, observable from outside. A ping with
//!   `"echo": true` has its pong carry what the `echo` command, called from the handler,
//!   answered (`"echo"`): a subscription's handler calling a command.
//!
//! - `relay` calls `increment` (for the counter in its path) and then `echo` from its handler
//!   (`Ctx::invoke`), each on whichever node the proxy picks, and answers both results:
//!   service-to-service calls inside the cluster (`?holdMs=N` waits N ms between the two). With `x-demo-fail-after-calls` it fails
//!   (500) after the calls, so that a client's retry under the same `Idempotency-Key` re-runs
//!   it and shows that the calls are answered from the first run, not run again.
//! - `chain?n=N` calls itself with `n=N-1` until 0 and answers how deep it went: the bound on
//!   commands calling commands (`sdk::MAX_CALL_DEPTH`, a 508 past it).
//!
//! Its routes and answers are a contract the integration tests rely on.

use std::time::Duration;

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde::Serialize;
use serde_json::json;

use super::subscription::SubscriptionBuilder;
use super::{Call, CommandBuilder, Ctx, Emit, HandlerError, Service, ServiceParts};

pub const SERVICE: &str = "demo";
pub const VERSION: u32 = 1;
/// State store holding the counters (`counter/<name>`).
pub const STATE_STORE: &str = "demo";
/// Longest sleep `slow` accepts; its timeout is a little longer so the bound is reachable.
pub const MAX_SLEEP_MS: u64 = 120_000;

#[derive(Debug, Deserialize)]
pub struct CounterParams {
    pub name: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CounterValue {
    pub name: String,
    pub value: i64,
    pub served_by: u64,
}

#[derive(Debug, Deserialize)]
pub struct SlowParams {
    pub ms: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Slept {
    pub slept_ms: u64,
    pub served_by: u64,
}

/// The `demo` service: `POST echo`, `POST counter/:name/increment`, `GET slow?ms=N`.
pub fn demo_service() -> ServiceParts {
    let echo_out = json!({"type": "object", "required": ["echo", "servedBy"],
        "properties": {"echo": {}, "servedBy": {"type": "integer"}, "forwardedFor": {}}});
    let counter_out = json!({"type": "object", "required": ["name", "value", "servedBy"],
        "properties": {"name": {"type": "string"}, "value": {"type": "integer"}, "servedBy": {"type": "integer"}}});
    Service::new(SERVICE, VERSION)
        .command(
            CommandBuilder::post("echo", "echo")
                .idempotent(true)
                .input_schema(json!({"description": "any JSON value (or no body)"}))
                .output_schema(echo_out)
                .handler(echo),
        )
        .command(
            CommandBuilder::post("increment", "counter/:name/increment")
                .input_schema(json!({"description": "ignored (may be empty)"}))
                .output_schema(counter_out)
                .handler(increment),
        )
        .command(
            CommandBuilder::post("placeOrder", "orders")
                .input_schema(json!({"type": "object", "properties": {"id": {"type": "string", "minLength": 1, "maxLength": 128}}}))
                .output_schema(json!({"type": "object", "required": ["id", "position", "servedBy"]}))
                .handler(place_order),
        )
        .command(
            CommandBuilder::post("notify", "notify")
                .success_event("notified")
                .input_schema(json!({"description": "any JSON value; the result is also emitted as `notified`"}))
                .handler(notify),
        )
        .subscription(SubscriptionBuilder::new("countOrders").event_name("orderPlaced").handler(count_order))
        .subscription(SubscriptionBuilder::new("auditOrders").event_name("orderPlaced").shared(false).handler(audit_order))
        .subscription(SubscriptionBuilder::new("benchSink").event_name("benchEvent").max_in_flight(1024).handler(bench_sink))
        .subscription(SubscriptionBuilder::new("benchEveryNode").event_name("benchBroadcast").shared(false).handler(bench_sink))
        .subscription(
            SubscriptionBuilder::new("answerPings")
                .event_name("demoPing")
                .ack_deadline(Duration::from_millis(PING_ACK_DEADLINE_MS))
                .handler(answer_ping),
        )
        .command(
            CommandBuilder::get("slow", "slow")
                .idempotent(true)
                .timeout(Duration::from_millis(MAX_SLEEP_MS + 5_000))
                .handler(slow),
        )
        .command(
            CommandBuilder::get("settings", "settings/:name")
                .idempotent(true)
                .output_schema(json!({"type": "object", "required": ["name", "value", "secretSet", "servedBy"]}))
                .handler(settings),
        )
        .command(
            CommandBuilder::post("relay", "relay/:name")
                .input_schema(json!({"description": "ignored (may be empty)"}))
                .output_schema(json!({"type": "object", "required": ["counter", "echo", "servedBy"]}))
                .handler(relay),
        )
        .command(
            CommandBuilder::post("chain", "chain")
                .idempotent(true)
                .input_schema(json!({"description": "ignored (may be empty)"}))
                .output_schema(json!({"type": "object", "required": ["depth", "servedBy"]}))
                .handler(chain),
        )
        .into_parts()
        // The declarations above are constants; the unit test below proves they validate.
        .expect("the demo service's declarations are valid")
}

async fn echo(ctx: Ctx, body: serde_json::Value, _: ()) -> Result<serde_json::Value, HandlerError> {
    // Who asked, as the node that took the request saw it (a client header an SDK handler reads).
    Ok(json!({"echo": body, "servedBy": ctx.node_id, "forwardedFor": ctx.header("x-forwarded-for")}))
}

async fn increment(ctx: Ctx, _: IgnoredAny, p: CounterParams) -> Result<CounterValue, HandlerError> {
    let value = ctx.state().increment(STATE_STORE, &format!("counter/{}", p.name), 1).await?;
    Ok(CounterValue { name: p.name, value, served_by: ctx.node_id })
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Placed {
    pub id: String,
    pub event_id: String,
    pub position: u64,
    pub served_by: u64,
}

/// Store the order (its `id`, or a new one) and emit `orderPlaced` with it.
async fn place_order(ctx: Ctx, mut order: serde_json::Value, _: ()) -> Result<Placed, HandlerError> {
    if !order.is_object() {
        return Err(HandlerError::bad_request("an order is a JSON object"));
    }
    let id = match order.get("id") {
        Some(serde_json::Value::String(id)) if !id.is_empty() && id.len() <= 128 => id.clone(),
        Some(_) => return Err(HandlerError::bad_request("order id must be a string of 1..=128 characters")),
        None => crate::broker::new_id(),
    };
    order["id"] = json!(id);
    let hold = order.get("holdMs").and_then(serde_json::Value::as_u64);
    ctx.state().put(STATE_STORE, &format!("orders/{id}"), &order).await?;
    if let Some(ms) = hold {
        // Lets tests stop a node between a command's write and its emit.
        tokio::time::sleep(Duration::from_millis(ms.min(MAX_SLEEP_MS))).await;
    }
    let (event_id, position) = ctx.emit("orderPlaced", &order).await?;
    Ok(Placed { id, event_id, position, served_by: ctx.node_id })
}

/// `settings/:name`: the config store's `demo/<name>` and whether the secret store holds
/// `demo/<name>` (`null` where the secret store is off), never the secret itself: a handler
/// reading both stores through the SDK.
async fn settings(ctx: Ctx, _: IgnoredAny, p: CounterParams) -> Result<serde_json::Value, HandlerError> {
    let value = ctx.config().get(STATE_STORE, &p.name).await?;
    let secrets = ctx.secrets();
    let secret_set = if secrets.is_on() { Some(secrets.get(STATE_STORE, &p.name).await?.is_some()) } else { None };
    Ok(json!({"name": p.name, "value": value, "secretSet": secret_set, "servedBy": ctx.node_id}))
}

/// `notify`: answers its input; the command's declared success event carries the result.
async fn notify(ctx: Ctx, body: serde_json::Value, _: ()) -> Result<serde_json::Value, HandlerError> {
    Ok(json!({"notified": body, "servedBy": ctx.node_id}))
}

#[derive(Debug, Deserialize)]
pub struct RelayParams {
    pub name: String,
    /// Waits this many ms between the two calls (at most `MAX_SLEEP_MS`): lets a test stop the
    /// node between them.
    #[serde(rename = "holdMs", default)]
    pub hold_ms: Option<u64>,
}

/// `relay/:name[?holdMs=N]`: `increment` of counter `name`, then `echo`, each called through
/// the cluster from this handler.
async fn relay(ctx: Ctx, _: IgnoredAny, p: RelayParams) -> Result<serde_json::Value, HandlerError> {
    let counter: serde_json::Value = ctx.invoke_json(Call::new(SERVICE, VERSION, "increment").param("name", p.name.as_str())).await?;
    if let Some(ms) = p.hold_ms {
        tokio::time::sleep(Duration::from_millis(ms.min(MAX_SLEEP_MS))).await;
    }
    let echo: serde_json::Value = ctx.invoke_json(Call::new(SERVICE, VERSION, "echo").json(&json!({"relayedBy": ctx.node_id}))?).await?;
    if ctx.header("x-demo-fail-after-calls").is_some() {
        return Err(HandlerError::unhandled("failed after its calls, as asked (x-demo-fail-after-calls)"));
    }
    Ok(json!({"counter": counter, "echo": echo, "servedBy": ctx.node_id}))
}

#[derive(Debug, Deserialize)]
pub struct ChainParams {
    pub n: u32,
}

/// `chain?n=N`: itself with `n=N-1`, down to 0; answers the depth reached below it.
async fn chain(ctx: Ctx, _: IgnoredAny, p: ChainParams) -> Result<serde_json::Value, HandlerError> {
    if p.n == 0 {
        return Ok(json!({"depth": 0, "servedBy": ctx.node_id}));
    }
    let below: serde_json::Value = ctx.invoke_json(Call::new(SERVICE, VERSION, "chain").param("n", (p.n - 1).to_string())).await?;
    let depth = below["depth"].as_u64().unwrap_or(0) + 1;
    Ok(json!({"depth": depth, "servedBy": ctx.node_id}))
}

/// `countOrders`: one increment of `orders-seen/<order id>` per processed `orderPlaced`.
async fn count_order(ctx: Ctx, event: crate::broker::event::Event) -> Result<Option<Emit>, HandlerError> {
    let order: serde_json::Value = event.payload_as()?;
    let id = order.get("id").and_then(|v| v.as_str()).ok_or_else(|| HandlerError::bad_request("order without id"))?;
    if order.get("poison").and_then(|v| v.as_bool()) == Some(true) {
        // Lets tests exercise redelivery and the dead letters.
        return Err(HandlerError::unhandled("poison order"));
    }
    if order.get("malformed").and_then(|v| v.as_bool()) == Some(true) {
        // One no retry can mend: dead-lettered at its first attempt.
        return Err(HandlerError::bad_request("malformed order").no_retry());
    }
    // Untagged on purpose: each delivery counts, so duplicates stay visible.
    ctx.state().increment_untagged(STATE_STORE, &format!("orders-seen/{id}"), 1).await?;
    Ok(None)
}

/// `auditOrders` (every instance): each node records `orders-audit/<node>/<order id>`.
async fn audit_order(ctx: Ctx, event: crate::broker::event::Event) -> Result<Option<Emit>, HandlerError> {
    let order: serde_json::Value = event.payload_as()?;
    let id = order.get("id").and_then(|v| v.as_str()).ok_or_else(|| HandlerError::bad_request("order without id"))?;
    ctx.state().increment_untagged(STATE_STORE, &format!("orders-audit/{}/{id}", ctx.node_id), 1).await?;
    Ok(None)
}

/// `answerPings`' ack deadline: short, so a test sees a stalled ping through its attempts.
pub const PING_ACK_DEADLINE_MS: u64 = 2_000;

/// `answerPings`: answers each `demoPing` with a `demoPong` (the dispatcher emits it). A ping
/// with `"stallMs": N` first waits N ms (at most `MAX_SLEEP_MS`): lets tests hold a handler
/// past its ack deadline.
async fn answer_ping(ctx: Ctx, event: crate::broker::event::Event) -> Result<Option<Emit>, HandlerError> {
    let ping: serde_json::Value = event.payload_as()?;
    if let Some(ms) = ping.get("stallMs").and_then(serde_json::Value::as_u64) {
        tokio::time::sleep(Duration::from_millis(ms.min(MAX_SLEEP_MS))).await;
    }
    let mut pong = json!({"ping": ping, "servedBy": ctx.node_id});
    if ping.get("echo").and_then(serde_json::Value::as_bool) == Some(true) {
        // A subscription's handler calls a command too (keyed by the delivery: a redelivery
        // gets the first answer).
        pong["echo"] = ctx.invoke_json(Call::new(SERVICE, VERSION, "echo").json(&ping)?).await?;
    }
    Ok(Some(Emit::new("demoPong", &pong)?))
}

/// Acknowledges: the delivery itself is what the bench measures.
async fn bench_sink(_: Ctx, _: crate::broker::event::Event) -> Result<Option<Emit>, HandlerError> {
    Ok(None)
}

async fn slow(ctx: Ctx, _: IgnoredAny, p: SlowParams) -> Result<Slept, HandlerError> {
    check_sleep(&p)?;
    tokio::time::sleep(Duration::from_millis(p.ms)).await;
    Ok(Slept { slept_ms: p.ms, served_by: ctx.node_id })
}

fn check_sleep(p: &SlowParams) -> Result<(), HandlerError> {
    if p.ms > MAX_SLEEP_MS {
        return Err(HandlerError::bad_request(format!("ms must be at most {MAX_SLEEP_MS}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::sdk::builder::{decode_params, decode_payload, match_path};

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn declares_the_contract_routes() {
        let parts = demo_service();
        assert_eq!((parts.decl.name.as_str(), parts.decl.version), ("demo", 1));
        let routes: Vec<_> = parts
            .decl
            .commands
            .iter()
            .map(|c| (c.name.as_str(), c.method.as_str(), c.path.as_str(), c.idempotent))
            .collect();
        assert_eq!(
            routes,
            [
                ("echo", "POST", "echo", true),
                ("increment", "POST", "counter/:name/increment", false),
                ("placeOrder", "POST", "orders", false),
                ("notify", "POST", "notify", false),
                ("slow", "GET", "slow", true),
                ("settings", "GET", "settings/:name", true),
                ("relay", "POST", "relay/:name", false),
                ("chain", "POST", "chain", true)
            ]
        );
        assert!(parts.decl.commands[0].input_schema.is_some() && parts.decl.commands[1].output_schema.is_some());
        assert_eq!(parts.handlers.len(), 8);
        assert_eq!(parts.decl.commands[3].success_event.as_deref(), Some("notified"));
        let subs: Vec<_> = parts.decl.subscriptions.iter().map(|s| (s.name.as_str(), s.shared, s.durable)).collect();
        assert_eq!(
            subs,
            [("countOrders", true, true), ("auditOrders", false, true), ("benchSink", true, true), ("benchEveryNode", false, true), ("answerPings", true, true)]
        );
        assert_eq!(parts.subscribers.len(), 5);
    }

    #[test]
    fn decodes_requests_as_the_handlers_see_them() {
        let path = match_path("counter/:name/increment", "counter/visits/increment").unwrap();
        assert_eq!(decode_params::<CounterParams>(&path).unwrap().name, "visits");
        decode_payload::<IgnoredAny>(b"").unwrap();
        decode_payload::<IgnoredAny>(br#"{"any": [1]}"#).unwrap();
        assert_eq!(decode_payload::<serde_json::Value>(b"").unwrap(), serde_json::Value::Null);
        assert_eq!(decode_params::<SlowParams>(&params(&[("ms", "250")])).unwrap().ms, 250);
        for bad in [&[("ms", "soon")][..], &[("ms", "-1")], &[]] {
            assert_eq!(decode_params::<SlowParams>(&params(bad)).unwrap_err().status, 400, "{bad:?}");
        }
        assert!(check_sleep(&SlowParams { ms: MAX_SLEEP_MS }).is_ok());
        assert_eq!(check_sleep(&SlowParams { ms: MAX_SLEEP_MS + 1 }).unwrap_err().status, 400);
        let out = serde_json::to_value(Slept { slept_ms: 5, served_by: 2 }).unwrap();
        assert_eq!(out, json!({"sleptMs": 5, "servedBy": 2}));
        let out = serde_json::to_value(CounterValue { name: "n".into(), value: 3, served_by: 1 }).unwrap();
        assert_eq!(out, json!({"name": "n", "value": 3, "servedBy": 1}));
    }
}
