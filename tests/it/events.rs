//! The broker and events API on real clusters: events and orders acknowledged under load survive
//! SIGKILL of the leader and then of another node, and of every node at once (same ids, same
//! positions, exactly once in the log, each order processed by `countOrders` at least once);
//! producer dedup with `idempotency-key` across a node failure; a poison order reaches the dead
//! letters after its attempts while later orders are still processed; the every-instance
//! subscription `auditOrders` runs on every node; batch publishing and its bad-input answers; and
//! sidecar subscriptions POSTing events to `tests/it/upstream.py`, also while one upstream fails.
//!
//! Events are compared by content: every published payload carries a unique `tag`, every order a
//! unique id, so a lost or duplicated event is found whatever ids and positions the log shows.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::thread;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::json;
use serde_json::Value;

use crate::harness::assert_json_error;
use crate::harness::free_loopback_ports;
use crate::harness::poll_until;
use crate::harness::Api;
use crate::harness::Cluster;
use crate::harness::HelperProcess;
use crate::harness::CATCH_UP;
use crate::harness::FAILOVER;
use crate::harness::FORMATION;
use crate::http;

/// Services registered, subscriptions known and the first order routable after formation.
const SERVICES_UP: Duration = Duration::from_secs(30);
/// Subscriptions catching up with everything published (deliveries, retries after failover).
const DELIVERY: Duration = Duration::from_secs(90);
/// A poison order going through its 5 attempts (backoff 200 ms doubling: ~3 s) into the dead letters.
const DEAD_LETTER: Duration = Duration::from_secs(60);
/// Progress the load must make between two steps of a scenario.
const PROGRESS: Duration = Duration::from_secs(60);
const UPSTREAM_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/upstream.py");

// ---------------------------------------------------------------------------------------------
// Small API helpers
// ---------------------------------------------------------------------------------------------

/// `POST /v1/events/{name}` that must answer 201; (id, position). A 201 whose body names no
/// event panics (the load threads' panics fail their test): an acknowledgement that cannot be
/// checked by content must not pass as a failed request.
fn publish(
    api: Api,
    name: &str,
    payload: &Value,
    headers: &[(&str, &str)],
) -> Result<(String, u64), String> {
    let resp = api
        .request(
            "POST",
            &format!("/v1/events/{name}"),
            headers,
            payload.to_string().as_bytes(),
        )
        .map_err(|e| format!("POST /v1/events/{name} via node {}: {e}", api.id))?;
    if resp.status != 201 {
        return Err(format!(
            "POST /v1/events/{name} via node {}: {}",
            api.id,
            resp.describe()
        ));
    }
    let acked = resp.json().and_then(|v| id_position(&v));
    Ok(acked.unwrap_or_else(|e| panic!("POST /v1/events/{name} via node {} answered 201 without its event: {e}", api.id)))
}

fn id_position(v: &Value) -> Result<(String, u64), String> {
    let id = v
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("no string id in {v}"))?;
    let position = v
        .get("position")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("no numeric position in {v}"))?;
    Ok((id.to_string(), position))
}

/// An order the cluster acknowledged.
#[derive(Debug, Clone)]
struct PlacedOrder {
    order_id: String,
    event_id: String,
    position: u64,
    via: u64,
}

/// `POST /api/v1/orders` that must answer 2xx with `{"id","eventId","position","servedBy"}`; a
/// 2xx without them, or naming another order, panics (see `publish`).
fn place_order(api: Api, order: &Value) -> Result<PlacedOrder, String> {
    let resp = api
        .request("POST", "/api/v1/orders", &[], order.to_string().as_bytes())
        .map_err(|e| format!("POST /api/v1/orders via node {}: {e}", api.id))?;
    if !(200..300).contains(&resp.status) {
        return Err(format!(
            "POST /api/v1/orders via node {}: {}",
            api.id,
            resp.describe()
        ));
    }
    match resp.json().and_then(|v| placed(api, order, &v)) {
        Ok(placed) => Ok(placed),
        Err(e) => panic!("POST /api/v1/orders via node {} answered {} without its order: {e}", api.id, resp.status),
    }
}

/// The order an acknowledged `POST /api/v1/orders` answered with (`v`), checked against the one
/// sent.
fn placed(api: Api, order: &Value, v: &Value) -> Result<PlacedOrder, String> {
    let order_id = v
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("order answer without id: {v}"))?;
    if Some(order_id) != order.get("id").and_then(Value::as_str) {
        return Err(format!("order answer names id {order_id}, sent {order}"));
    }
    let event_id = v
        .get("eventId")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("order answer without eventId: {v}"))?;
    let position = v
        .get("position")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("order answer without position: {v}"))?;
    if v.get("servedBy").and_then(Value::as_u64).is_none() {
        return Err(format!("order answer without servedBy: {v}"));
    }
    Ok(PlacedOrder {
        order_id: order_id.to_string(),
        event_id: event_id.to_string(),
        position,
        via: api.id,
    })
}

/// Any GET that must answer 200 with JSON.
fn get_json(api: Api, path: &str) -> Result<Value, String> {
    let resp = api
        .request("GET", path, &[], b"")
        .map_err(|e| format!("GET {path} via node {}: {e}", api.id))?;
    if resp.status != 200 {
        return Err(format!(
            "GET {path} via node {}: {}",
            api.id,
            resp.describe()
        ));
    }
    resp.json()
}

/// A counter of the demo state store (`GET /v1/state/demo/{key}`): None while absent (404).
/// `stale` reads the node's local copy.
fn demo_counter(api: Api, key: &str, stale: bool) -> Result<Option<i64>, String> {
    let q = if stale { "?consistency=stale" } else { "" };
    let path = format!("/v1/state/demo/{key}{q}");
    let resp = api
        .request("GET", &path, &[], b"")
        .map_err(|e| format!("GET {path} via node {}: {e}", api.id))?;
    match resp.status {
        404 => Ok(None),
        200 => resp.json()?.as_i64().map(Some).ok_or_else(|| {
            format!(
                "GET {path} via node {}: not an integer: {}",
                api.id,
                resp.describe()
            )
        }),
        _ => Err(format!(
            "GET {path} via node {}: {}",
            api.id,
            resp.describe()
        )),
    }
}

/// The cursor of a subscription (`GET /v1/subscriptions/{name}`).
fn cursor(api: Api, sub: &str) -> Result<u64, String> {
    let v = get_json(api, &format!("/v1/subscriptions/{sub}"))?;
    v.get("cursor")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("subscription {sub} without numeric cursor: {v}"))
}

/// The dead letters of a subscription.
fn dead_letters(api: Api, sub: &str) -> Result<Vec<Value>, String> {
    let v = get_json(api, &format!("/v1/dead-letters?subscription={sub}"))?;
    if v.get("subscription").and_then(Value::as_str) != Some(sub) {
        return Err(format!(
            "dead letters answer names another subscription: {v}"
        ));
    }
    v.get("deadLetters")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| format!("no deadLetters array: {v}"))
}

/// The whole event log as node `api` serves it, paged with `after`/`next` (1000 at a time).
pub(crate) fn read_log(api: Api) -> Result<Vec<Value>, String> {
    let mut out: Vec<Value> = Vec::new();
    let mut after = 0u64;
    for _ in 0..100_000 {
        let page = get_json(api, &format!("/v1/events?after={after}&limit=1000"))?;
        let events = page
            .get("events")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("no events array: {page}"))?;
        let next = page
            .get("next")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("no numeric next: {page}"))?;
        let end = page
            .get("end")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("no numeric end: {page}"))?;
        if events.len() > 1000 {
            return Err(format!(
                "node {}: {} events in one page, limit is 1000",
                api.id,
                events.len()
            ));
        }
        for e in events {
            let p = e
                .get("position")
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("event without position: {e}"))?;
            if p <= after {
                return Err(format!(
                    "node {}: read after={after} returned position {p}",
                    api.id
                ));
            }
            if let Some(last) = out
                .last()
                .and_then(|l| l.get("position"))
                .and_then(Value::as_u64)
            {
                if p <= last {
                    return Err(format!(
                        "node {}: position {p} after {last}: log not in order",
                        api.id
                    ));
                }
            }
            out.push(e.clone());
        }
        if next >= end || (events.is_empty() && next <= after) {
            return Ok(out);
        }
        if next <= after {
            return Err(format!(
                "node {}: after={after} answered next={next} (no progress) with end={end}",
                api.id
            ));
        }
        after = next;
    }
    Err(format!("node {}: log paging did not end", api.id))
}

/// Log entries indexed by event id (several entries under one id = a duplicate).
fn by_id(log: &[Value]) -> BTreeMap<String, Vec<&Value>> {
    let mut m: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for e in log {
        m.entry(
            e.get("id")
                .and_then(Value::as_str)
                .unwrap_or("<no id>")
                .to_string(),
        )
        .or_default()
        .push(e);
    }
    m
}

/// Log entries indexed by a string field of their payload (`tag` of published events, `id` of orders).
pub(crate) fn by_payload_field<'a>(
    log: &'a [Value],
    event_name: &str,
    field: &str,
) -> BTreeMap<String, Vec<&'a Value>> {
    let mut m: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for e in log
        .iter()
        .filter(|e| e.get("eventName").and_then(Value::as_str) == Some(event_name))
    {
        if let Some(t) = e
            .get("payload")
            .and_then(|p| p.get(field))
            .and_then(Value::as_str)
        {
            m.entry(t.to_string()).or_default().push(e);
        }
    }
    m
}

/// `publish` with an `idempotency-key`, retried with the same key (what a client does with a key)
/// until a 201; transient failures (e.g. a peer link replaced right after formation) are printed.
fn publish_keyed(c: &Cluster, api: Api, name: &str, payload: &Value, key: &str) -> (String, u64) {
    let mut tries = 0;
    c.wait_for(
        &format!(
            "POST /v1/events/{name} with idempotency-key {key} via node {}",
            api.id
        ),
        FORMATION,
        || {
            tries += 1;
            publish(api, name, payload, &[("idempotency-key", key)])
                .inspect_err(|e| eprintln!("[events] try {tries}: {e}"))
        },
    )
}

/// Waits until every node in `apis` serves `GET /v1/subscriptions/{sub}` (registered and applied).
fn wait_subscription(c: &Cluster, apis: &[Api], sub: &str) {
    c.wait_for(
        &format!("subscription {sub} known on every node"),
        SERVICES_UP,
        || {
            for &api in apis {
                cursor(api, sub)?;
            }
            Ok(())
        },
    );
}

/// Waits until orders are accepted through every running node (demo registered, routable).
fn wait_orders_routable(c: &Cluster, prefix: &str) {
    let mut n = 0;
    for api in c.apis() {
        c.wait_for(
            &format!("an order accepted via node {}", api.id),
            SERVICES_UP,
            || {
                n += 1;
                place_order(api, &json!({"id": format!("{prefix}-warmup-{n}")})).map(|_| ())
            },
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Emit load: threads publishing events and placing orders through every node
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct AckedEvent {
    tag: String,
    id: String,
    position: u64,
    via: u64,
}

#[derive(Debug, Default)]
struct EmitOutcome {
    events: Vec<AckedEvent>,
    orders: Vec<PlacedOrder>,
    failed: usize,
    failures: Vec<String>,
}

struct EmitShared {
    stop: AtomicBool,
    acked: AtomicUsize,
    orders: AtomicUsize,
    outcome: Mutex<EmitOutcome>,
}

/// `threads` threads, each alternating a `POST /v1/events/x` with a unique `tag` and a
/// `POST /api/v1/orders` with a unique id, round-robin over `targets` (dead ones included:
/// they fail fast), recording every acknowledgement.
struct EmitLoad {
    shared: Arc<EmitShared>,
    handles: Vec<JoinHandle<()>>,
}

impl EmitLoad {
    fn start(targets: Vec<Api>, threads: usize, prefix: &str) -> EmitLoad {
        let shared = Arc::new(EmitShared {
            stop: AtomicBool::new(false),
            acked: AtomicUsize::new(0),
            orders: AtomicUsize::new(0),
            outcome: Mutex::new(EmitOutcome::default()),
        });
        let handles = (0..threads)
            .map(|t| {
                let shared = shared.clone();
                let targets = targets.clone();
                let prefix = prefix.to_string();
                thread::spawn(move || {
                    for seq in 0.. {
                        if shared.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let api = targets[(t + seq) % targets.len()];
                        let tag = format!("{prefix}-{t}-{seq}");
                        let result = if seq % 2 == 0 {
                            publish(api, "x", &json!({"tag": tag, "thread": t, "seq": seq}), &[])
                                .map(|(id, position)| {
                                    (
                                        Some(AckedEvent {
                                            tag: tag.clone(),
                                            id,
                                            position,
                                            via: api.id,
                                        }),
                                        None,
                                    )
                                })
                        } else {
                            place_order(api, &json!({"id": tag, "thread": t, "seq": seq}))
                                .map(|o| (None, Some(o)))
                        };
                        let mut out = shared.outcome.lock().unwrap_or_else(|p| p.into_inner());
                        match result {
                            Ok((e, o)) => {
                                if let Some(e) = e {
                                    out.events.push(e);
                                }
                                if let Some(o) = o {
                                    out.orders.push(o);
                                    shared.orders.fetch_add(1, Ordering::Relaxed);
                                }
                                shared.acked.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                out.failed += 1;
                                if out.failures.len() < 10 {
                                    out.failures.push(e);
                                }
                                drop(out);
                                thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                })
            })
            .collect();
        EmitLoad { shared, handles }
    }

    /// Acknowledged requests (events and orders) so far.
    fn acked(&self) -> usize {
        self.shared.acked.load(Ordering::Relaxed)
    }

    fn orders(&self) -> usize {
        self.shared.orders.load(Ordering::Relaxed)
    }

    /// Waits until `more` further requests (and at least one more order) are acknowledged.
    fn wait_progress(&self, c: &Cluster, more: usize, what: &str) {
        let (base, base_orders) = (self.acked(), self.orders());
        c.wait_for(
            &format!("{more} more acknowledged requests {what}"),
            PROGRESS,
            || {
                let (now, orders) = (self.acked(), self.orders());
                if now >= base + more && orders > base_orders {
                    Ok(())
                } else {
                    let out = self
                        .shared
                        .outcome
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    Err(format!(
                        "{} acked ({} orders), {} failed; last failures {:?}",
                        now - base,
                        orders - base_orders,
                        out.failed,
                        out.failures.iter().rev().take(3).collect::<Vec<_>>()
                    ))
                }
            },
        );
    }

    fn stop(mut self) -> EmitOutcome {
        self.shared.stop.store(true, Ordering::Relaxed);
        for h in std::mem::take(&mut self.handles) {
            h.join().expect("load thread panicked");
        }
        std::mem::take(
            &mut *self
                .shared
                .outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }
}

impl Drop for EmitLoad {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Checks a log read from one node against the acknowledged events and orders: each acked event
/// (by tag) and each acked order (by order id and event id) exactly once, at its acknowledged
/// id and position. Err lists what is missing or wrong (missing may still be in flight).
fn check_log(node: u64, log: &[Value], out: &EmitOutcome) -> Result<(), String> {
    let ids = by_id(log);
    let tags = by_payload_field(log, "x", "tag");
    let orders = by_payload_field(log, "orderPlaced", "id");
    let mut bad = Vec::new();
    for (id, entries) in &ids {
        if entries.len() > 1 {
            bad.push(format!("event id {id} appears {} times", entries.len()));
        }
    }
    for e in &out.events {
        match tags.get(&e.tag).map(Vec::as_slice) {
            None | Some([]) => bad.push(format!("acked event {e:?} is missing")),
            Some([one]) => {
                let got = id_position(one)?;
                if got != (e.id.clone(), e.position) {
                    bad.push(format!("acked event {e:?} is in the log as {one}"));
                }
            }
            Some(many) => bad.push(format!(
                "acked event {e:?} appears {} times: {many:?}",
                many.len()
            )),
        }
    }
    for o in &out.orders {
        match orders.get(&o.order_id).map(Vec::as_slice) {
            None | Some([]) => bad.push(format!("orderPlaced of acked order {o:?} is missing")),
            Some([one]) => {
                let got = id_position(one)?;
                if got != (o.event_id.clone(), o.position) {
                    bad.push(format!(
                        "orderPlaced of acked order {o:?} is in the log as {one}"
                    ));
                }
            }
            Some(many) => bad.push(format!(
                "orderPlaced of acked order {o:?} appears {} times: {many:?}",
                many.len()
            )),
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "node {node} ({} events in log; {} acked events, {} acked orders): {} problems; first: {:#?}",
            log.len(),
            out.events.len(),
            out.orders.len(),
            bad.len(),
            &bad[..bad.len().min(8)]
        ))
    }
}

/// Polls until the log on every node in `apis` holds every acknowledged event and order exactly
/// once, and the nodes agree on (position, id) of every event. Returns one node's log.
fn wait_log_complete(c: &Cluster, apis: &[Api], out: &EmitOutcome) -> Vec<Value> {
    c.wait_for("every acknowledged event exactly once in the log of every node", CATCH_UP, || {
        // (node, its (position, id) list, its log)
        type Seen = (u64, Vec<(u64, String)>, Vec<Value>);
        let mut first: Option<Seen> = None;
        for &api in apis {
            let log = read_log(api)?;
            check_log(api.id, &log, out)?;
            let summary: Vec<(u64, String)> = log
                .iter()
                .map(|e| (e["position"].as_u64().unwrap_or(0), e["id"].as_str().unwrap_or("").to_string()))
                .collect();
            match &first {
                None => first = Some((api.id, summary, log)),
                Some((n, s, _)) if *s != summary => {
                    let diff = s.iter().zip(&summary).find(|(a, b)| a != b);
                    return Err(format!(
                        "logs differ between node {n} ({} events) and node {} ({} events); first difference {diff:?}",
                        s.len(),
                        api.id,
                        summary.len()
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(first.map(|(_, _, log)| log).unwrap_or_default())
    })
}

/// Polls until `countOrders` processed each order at least once (`orders-seen/<id>` ≥ 1);
/// returns the counts (values above 1 are redeliveries).
fn wait_orders_counted(
    c: &Cluster,
    api_of: impl Fn() -> Api,
    orders: &[String],
    deadline: Duration,
) -> BTreeMap<String, i64> {
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    c.wait_for(&format!("countOrders to process each of {} acknowledged orders", orders.len()), deadline, || {
        let api = api_of();
        let mut missing = Vec::new();
        for id in orders {
            if counts.get(id).is_some_and(|n| *n >= 1) {
                continue;
            }
            match demo_counter(api, &format!("orders-seen/{id}"), true)? {
                Some(n) if n >= 1 => {
                    counts.insert(id.clone(), n);
                }
                other => missing.push(format!("{id}: {other:?}")),
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            let cur = cursor(api, "countOrders").map_or_else(|e| e, |p| p.to_string());
            Err(format!("{} orders not processed yet (countOrders cursor {cur} on node {}); first: {:?}", missing.len(), api.id, &missing[..missing.len().min(5)]))
        }
    });
    // Re-read linearizably at the end: the final counts.
    let api = api_of();
    for id in orders {
        if let Ok(Some(n)) = demo_counter(api, &format!("orders-seen/{id}"), false) {
            counts.insert(id.clone(), n);
        }
    }
    counts
}

fn example_cluster(name: &str) -> (Cluster, u64) {
    let (c, leader) = Cluster::formed(name, 3, &["--example-services"]);
    c.wait_all_ready(FORMATION);
    wait_subscription(&c, &c.apis(), "countOrders");
    wait_orders_routable(&c, name);
    (c, leader)
}

// ---------------------------------------------------------------------------------------------
// 1. Failover under load
// ---------------------------------------------------------------------------------------------

#[test]
fn acknowledged_events_and_orders_survive_killing_the_leader_then_another_node() {
    let (c, _) = example_cluster("ev-failover");
    let load = EmitLoad::start(c.apis(), 4, "fo");
    load.wait_progress(&c, 200, "before any failure");

    let first = c.wait_for_leader(FAILOVER);
    eprintln!(
        "[ev-failover] SIGKILL leader {first} after {} acks",
        load.acked()
    );
    c.kill(first);
    let second = c.wait_for_leader(FAILOVER);
    load.wait_progress(
        &c,
        100,
        &format!("with node {first} dead (new leader {second})"),
    );

    // The first back, so that the next kill leaves a quorum: the cluster must go on taking
    // events and delivering them without the killed node.
    c.restart(first);
    let voters = c.ids();
    c.wait_for_membership(&voters, &[], FORMATION);
    load.wait_progress(&c, 100, &format!("with node {first} back"));

    // The leader drives every shared delivery (it hands events to consumers, itself included,
    // and commits the acks), so killing it interrupts deliveries in flight: the next leader
    // must redeliver them, to the nodes left.
    let second = c.wait_for_leader(FAILOVER);
    let consumed = cursor(c.api(second), "countOrders").expect("countOrders cursor");
    eprintln!(
        "[ev-failover] SIGKILL leader {second} (countOrders cursor {consumed}) after {} acks",
        load.acked()
    );
    c.kill(second);
    let third = c.wait_for_leader(FAILOVER);
    load.wait_progress(&c, 100, &format!("with node {second} dead (new leader {third})"));
    // An order placed with the node down is consumed by the nodes left.
    let probe = c.wait_for(&format!("an order accepted with node {second} down"), PROGRESS, || {
        place_order(c.api(third), &json!({"id": "fo-while-down"}))
    });
    c.wait_for(&format!("countOrders to go on without node {second}"), DELIVERY, || {
        let now = cursor(c.api(third), "countOrders")?;
        (now > probe.position).then_some(()).ok_or(format!("cursor {now}, {consumed} at the kill, the order at {}", probe.position))
    });
    c.restart(second);
    c.wait_for_membership(&voters, &[], FORMATION);
    load.wait_progress(&c, 100, "after both restarts");
    let out = load.stop();
    eprintln!(
        "[ev-failover] acked {} events and {} orders; {} requests failed (first: {:?})",
        out.events.len(),
        out.orders.len(),
        out.failed,
        out.failures.first()
    );

    let mut per_node: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    out.events
        .iter()
        .for_each(|e| per_node.entry(e.via).or_default().0 += 1);
    out.orders
        .iter()
        .for_each(|o| per_node.entry(o.via).or_default().1 += 1);
    eprintln!("[ev-failover] acked (events, orders) per node it was sent to: {per_node:?}");

    let apis = c.apis();
    let log = wait_log_complete(&c, &apis, &out);
    eprintln!(
        "[ev-failover] log of {} events consistent on nodes {:?}",
        log.len(),
        c.ids()
    );

    let ids: Vec<String> = out.orders.iter().map(|o| o.order_id.clone()).chain([probe.order_id.clone()]).collect();
    let counts = wait_orders_counted(&c, || c.api(1), &ids, DELIVERY);
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "[ev-failover] {} orders processed, {} of them more than once: {:?}",
        counts.len(),
        dups.len(),
        &dups[..dups.len().min(10)]
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Crash of every node at once
// ---------------------------------------------------------------------------------------------

#[test]
fn log_and_consumer_position_survive_killing_every_node_at_once() {
    let (c, _) = example_cluster("ev-kill-all");
    let load = EmitLoad::start(c.apis(), 4, "ka");
    load.wait_progress(&c, 200, "before the crash");
    // Enough orders consumed before the crash that consuming them again after it shows (below).
    c.wait_until("500 orders acknowledged before the crash", PROGRESS, || load.orders() >= 500);
    // The consumer position just before the crash (it only grows).
    let leader = c.wait_for_leader(FAILOVER);
    let before = cursor(c.api(leader), "countOrders").expect("countOrders cursor");
    c.kill_all();
    let out = load.stop();
    eprintln!(
        "[ev-kill-all] cursor {before}; acked {} events and {} orders, {} failed when the nodes died",
        out.events.len(),
        out.orders.len(),
        out.failed
    );
    assert!(before > 0, "countOrders processed nothing before the crash");

    c.start_all();
    let voters = c.ids();
    c.wait_for_membership(&voters, &[], FORMATION);
    let apis = c.apis();
    wait_log_complete(&c, &apis, &out);
    c.wait_caught_up(&voters, CATCH_UP);
    for &api in &apis {
        let after = cursor(api, "countOrders").expect("countOrders cursor after restart");
        assert!(
            after >= before,
            "node {}: countOrders cursor {after} after the restart, {before} before the crash",
            api.id
        );
    }

    // New events keep flowing, and countOrders keeps consuming.
    let (id, position) = c.wait_for("a new event accepted after the restart", PROGRESS, || {
        publish(c.api(2), "x", &json!({"tag": "ka-after"}), &[])
    });
    let order = c.wait_for("a new order accepted after the restart", PROGRESS, || {
        place_order(c.api(3), &json!({"id": "ka-after-order"}))
    });
    // Past every position acknowledged before the crash, and not below the consumer's cursor
    // (which may equal the next position: everything so far was done when it was read).
    let last_acked = out
        .events
        .iter()
        .map(|e| e.position)
        .chain(out.orders.iter().map(|o| o.position))
        .max()
        .unwrap_or(0);
    assert!(
        position > last_acked && position >= before && order.position > position,
        "new event {id} at {position}, order at {}: positions must grow past the old log \
         (last acknowledged before the crash: {last_acked}, cursor then: {before})",
        order.position
    );
    let ids: Vec<String> = out
        .orders
        .iter()
        .map(|o| o.order_id.clone())
        .chain([order.order_id.clone()])
        .collect();
    wait_orders_counted(&c, || c.api(1), &ids, DELIVERY);
    c.wait_for("countOrders cursor past the new order", DELIVERY, || {
        let now = cursor(c.api(2), "countOrders")?;
        if now > order.position {
            Ok(())
        } else {
            Err(format!("cursor {now}, new order at {}", order.position))
        }
    });
    // The position survived, rather than being caught up again: since the restart countOrders
    // ran (on any node) only for orders at or past it, give or take one handout per consumer
    // around the leader's election. A position lost at the restart would have run every order
    // again (the handlers' tagged writes hide that from `orders-seen`, the run count does not).
    let log = read_log(c.api(1)).expect("log after the restart");
    let orders_at = |pred: &dyn Fn(u64) -> bool| {
        log.iter().filter(|e| e["eventName"] == "orderPlaced" && e["position"].as_u64().is_some_and(pred)).count() as f64
    };
    let (below, from) = (orders_at(&|p| p < before), orders_at(&|p| p >= before));
    let runs: f64 = c.apis().into_iter().map(|api| api.metric("raftbridge_delivery_latency_seconds_count", &["subscription=\"countOrders\""]).expect("metrics")).sum();
    eprintln!("[ev-kill-all] {below} orders below the position {before}, {from} at or past it; {runs} countOrders runs since the restart");
    assert!(below >= 300.0, "only {below} orders were consumed before the crash: the check below needs more");
    assert!(runs <= from + 3.0 * 64.0, "{runs} countOrders runs since the restart for {from} orders at or past the position {before}: orders before it ran again");
}

// ---------------------------------------------------------------------------------------------
// 3. Producer dedup across a node failure
// ---------------------------------------------------------------------------------------------

#[test]
fn idempotency_key_dedups_a_retry_on_another_node_after_the_first_died() {
    let (c, leader) = Cluster::formed("ev-dedup", 3, &[]);
    c.wait_all_ready(FORMATION);
    let b = c
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower");
    let key = "order-42-attempt";

    // Through a follower first, then the same key on the leader.
    let f = publish_keyed(
        &c,
        c.api(b),
        "x",
        &json!({"tag": "dd-follower"}),
        "k-follower",
    );
    let again = publish_keyed(
        &c,
        c.api(leader),
        "x",
        &json!({"tag": "dd-follower-2"}),
        "k-follower",
    );
    assert_eq!(
        again, f,
        "a repeated idempotency-key on another live node must return the original id/position"
    );

    // Through the leader, which dies right after its 201.
    let first = publish_keyed(&c, c.api(leader), "x", &json!({"tag": "dd-1"}), key);
    c.kill(leader);
    let retry = publish_keyed(&c, c.api(b), "x", &json!({"tag": "dd-1"}), key);
    assert_eq!(
        retry, first,
        "retry with idempotency-key {key} via node {b} after node {leader} died"
    );
    // Different payload, same key: still the original, nothing stored.
    let other = publish_keyed(&c, c.api(b), "x", &json!({"tag": "dd-1-changed"}), key);
    assert_eq!(
        other, first,
        "a repeat with another payload must return the original too"
    );
    // The answer says it was a duplicate (NATS JetStream's `duplicate`); a first publish's
    // answer does not.
    let resp = c
        .api(b)
        .request("POST", "/v1/events/x", &[("idempotency-key", key)], b"{}")
        .expect("repeat");
    assert_eq!(resp.status, 201, "{}", resp.describe());
    let body = resp.json().expect("json");
    assert_eq!((id_position(&body), &body["duplicate"]), (Ok(first.clone()), &json!(true)), "{body}");
    let resp = c.api(b).request("POST", "/v1/events/x", &[], br#"{"tag": "dd-unkeyed"}"#).expect("unkeyed");
    assert_eq!(resp.status, 201, "{}", resp.describe());
    let body = resp.json().expect("json");
    assert_eq!(body.get("duplicate"), None, "a new event: {body}");
    let fresh = publish_keyed(
        &c,
        c.api(b),
        "x",
        &json!({"tag": "dd-fresh"}),
        "another-key",
    );
    assert_ne!(fresh.0, first.0, "another key is another event");

    c.restart(leader);
    let voters = c.ids();
    c.wait_for_membership(&voters, &[], FORMATION);
    c.wait_caught_up(&voters, CATCH_UP);
    for api in c.apis() {
        let log = read_log(api).expect("read log");
        let ids = by_id(&log);
        let tags = by_payload_field(&log, "x", "tag");
        assert_eq!(
            ids.get(&first.0).map(Vec::len),
            Some(1),
            "node {}: event {first:?} must be in the log once: {log:?}",
            api.id
        );
        assert_eq!(
            ids.get(&f.0).map(Vec::len),
            Some(1),
            "node {}: event {f:?} must be in the log once",
            api.id
        );
        for (tag, want) in [
            ("dd-1", 1),
            ("dd-1-changed", 0),
            ("dd-follower", 1),
            ("dd-follower-2", 0),
            ("dd-fresh", 1),
            ("dd-unkeyed", 1),
        ] {
            assert_eq!(
                tags.get(tag).map_or(0, Vec::len),
                want,
                "node {}: events tagged {tag} in the log: {log:?}",
                api.id
            );
        }
        assert_eq!(
            log.len(),
            4,
            "node {}: exactly four events stored: {log:?}",
            api.id
        );
        let e = &ids[&first.0][0];
        assert_eq!(
            e["position"].as_u64(),
            Some(first.1),
            "node {}: {e}",
            api.id
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Poison order → dead letters
// ---------------------------------------------------------------------------------------------

#[test]
fn poison_order_is_dead_lettered_after_max_attempts_and_later_orders_are_processed() {
    let (c, _) = example_cluster("ev-poison");
    let poison = place_order(c.api(2), &json!({"id": "poison-1", "poison": true}))
        .expect("place the poison order");
    let normal: Vec<PlacedOrder> = (0..5)
        .map(|i| {
            place_order(
                c.api(1 + i % 3),
                &json!({"id": format!("after-poison-{i}")}),
            )
            .expect("place an order")
        })
        .collect();

    // Malformed: its handler fails it with no retry, so one attempt dead-letters it.
    let malformed = place_order(c.api(3), &json!({"id": "malformed-1", "malformed": true})).expect("place the malformed order");
    let letter = c.wait_for("the malformed order dead-lettered", DEAD_LETTER, || {
        dead_letters(c.api(1), "countOrders")?.into_iter().find(|d| d["eventId"].as_str() == Some(malformed.event_id.as_str())).ok_or_else(|| "not yet".to_string())
    });
    assert_eq!(letter["attempts"].as_u64(), Some(1), "{letter}");
    assert!(letter["reason"].as_str().is_some_and(|r| r.contains("malformed order")), "{letter}");
    let dead = c.wait_for(
        "the poison order in countOrders' dead letters",
        DEAD_LETTER,
        || {
            // Every node's replicated copy holds it, once.
            let mut first = None;
            for api in c.apis() {
                let list = dead_letters(api, "countOrders")?;
                let found: Vec<&Value> = list
                    .iter()
                    .filter(|d| d["eventId"].as_str() == Some(poison.event_id.as_str()))
                    .collect();
                match found.as_slice() {
                    [one] => {
                        first.get_or_insert_with(|| (*one).clone());
                    }
                    [] => return Err(format!("node {}: dead letters {list:?}", api.id)),
                    many => panic!(
                        "node {}: poison event dead-lettered {} times: {many:?}",
                        api.id,
                        many.len()
                    ),
                }
            }
            first.ok_or_else(|| "no nodes".to_string())
        },
    );
    eprintln!("[ev-poison] dead letter: {dead}");
    assert_eq!(
        dead["attempts"].as_u64(),
        Some(5),
        "attempts of the dead letter: {dead}"
    );
    assert_eq!(
        dead["position"].as_u64(),
        Some(poison.position),
        "position of the dead letter: {dead}"
    );
    assert!(
        dead["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "a dead letter says why: {dead}"
    );
    assert_eq!(
        dead["event"]["id"].as_str(),
        Some(poison.event_id.as_str()),
        "the dead letter carries the event: {dead}"
    );
    assert_eq!(
        dead["event"]["payload"]["id"].as_str(),
        Some("poison-1"),
        "the dead letter carries the event: {dead}"
    );

    let ids: Vec<String> = normal.iter().map(|o| o.order_id.clone()).collect();
    let counts = wait_orders_counted(&c, || c.api(3), &ids, DELIVERY);
    eprintln!("[ev-poison] later orders processed: {counts:?}");
    for api in c.apis() {
        assert_eq!(
            demo_counter(api, "orders-seen/poison-1", false).expect("read"),
            None,
            "node {}: the poison order never counted",
            api.id
        );
    }
    let last = normal.iter().map(|o| o.position).max().unwrap_or(0);
    c.wait_for(
        "countOrders cursor past the poison order and the later orders",
        DELIVERY,
        || {
            let now = cursor(c.api(1), "countOrders")?;
            if now > last {
                Ok(())
            } else {
                Err(format!(
                    "cursor {now}; poison at {}, last order at {last}",
                    poison.position
                ))
            }
        },
    );
    // Every node agrees on the dead letters, the poison and the malformed order (replicated).
    c.wait_for("the dead letters on every node", CATCH_UP, || {
        for api in c.apis() {
            let list = dead_letters(api, "countOrders")?;
            if list.len() != 2 {
                return Err(format!("node {}: {list:?}", api.id));
            }
        }
        Ok(())
    });
}

/// While a member's build cannot record a failure no retry can mend (feature bit 32768
/// withheld by node 3 through the test hook), such a failure is retried as any other: the
/// malformed order is dead-lettered after all its attempts, not after one.
#[test]
fn a_no_retry_failure_is_retried_while_a_member_cannot_record_it() {
    const REJECTED: u64 = 32768;
    let c = Cluster::new("ev-noretry-gate", 3, &["--example-services"]);
    c.set_env(3, "RAFTBRIDGE_TEST_WITHHOLD_FEATURES", &REJECTED.to_string());
    c.start_all();
    c.wait_for_membership(&c.ids(), &[], FORMATION);
    c.wait_all_ready(FORMATION);
    wait_subscription(&c, &c.apis(), "countOrders");
    wait_orders_routable(&c, "ev-noretry-gate");
    let malformed = place_order(c.api(1), &json!({"id": "malformed-gate", "malformed": true})).expect("place the malformed order");
    let letter = c.wait_for("the malformed order dead-lettered", DEAD_LETTER, || {
        dead_letters(c.api(2), "countOrders")?.into_iter().find(|d| d["eventId"].as_str() == Some(malformed.event_id.as_str())).ok_or_else(|| "not yet".to_string())
    });
    assert_eq!(letter["attempts"].as_u64(), Some(5), "retried through its attempts: {letter}");
}

// ---------------------------------------------------------------------------------------------
// 5. Every-instance subscription
// ---------------------------------------------------------------------------------------------

fn audited(api: Api, node: u64, order: &str) -> Result<(), String> {
    match demo_counter(api, &format!("orders-audit/{node}/{order}"), true)? {
        Some(n) if n >= 1 => Ok(()),
        other => Err(format!("orders-audit/{node}/{order} = {other:?}")),
    }
}

/// Waits until every node's replicated position in every-instance subscription `sub` is past
/// `position` (`what` names it for the failure message).
fn wait_instances_past(c: &Cluster, sub: &str, position: u64, what: &str) {
    c.wait_for(&format!("each node's {sub} position past {what}"), DELIVERY, || {
        let state = get_json(c.api(1), &format!("/v1/subscriptions/{sub}"))?;
        for node in c.ids() {
            let next = state["instances"][node.to_string()].as_u64().unwrap_or(0);
            if next <= position {
                return Err(format!("node {node} at {next}, {what} is at {position}: {state}"));
            }
        }
        Ok(())
    });
}

#[test]
fn every_instance_subscription_reaches_each_node() {
    let (c, _) = example_cluster("ev-audit");
    wait_subscription(&c, &c.apis(), "auditOrders");
    let orders: Vec<PlacedOrder> = c
        .ids()
        .into_iter()
        .map(|id| {
            place_order(c.api(id), &json!({"id": format!("audit-{id}")})).expect("place an order")
        })
        .collect();
    c.wait_for("each node to audit each order", DELIVERY, || {
        for o in &orders {
            for node in c.ids() {
                audited(c.api(1), node, &o.order_id)?;
            }
        }
        Ok(())
    });
    let sub = get_json(c.api(1), "/v1/subscriptions/auditOrders").expect("auditOrders");
    assert_eq!(
        sub["shared"],
        json!(false),
        "auditOrders is every-instance: {sub}"
    );

    // A node that was down catches up when it comes back (durable), the live ones at once.
    let down = 3;
    c.kill(down);
    let missed = c.wait_for("an order accepted with node 3 down", PROGRESS, || {
        place_order(c.api(1), &json!({"id": "audit-missed"}))
    });
    c.wait_for("the live nodes to audit the order", DELIVERY, || {
        audited(c.api(1), 1, &missed.order_id)?;
        audited(c.api(2), 2, &missed.order_id)
    });
    c.restart(down);
    let voters = c.ids();
    c.wait_for_membership(&voters, &[], FORMATION);
    c.wait_for(
        "the restarted node to audit the order it missed",
        DELIVERY,
        || audited(c.api(1), down, &missed.order_id),
    );

    // Events it does not match move each node's replicated position too: a node restarted
    // later goes on from there, not from its last match (retention's trims since that match
    // used to be counted as events it lost).
    let (_, unrelated) = publish(c.api(2), "notAnOrder", &json!({"n": 1}), &[]).expect("publish");
    wait_instances_past(&c, "auditOrders", unrelated, "an event it does not match");
}

/// Publishes `items` (`{"eventName","payload"}`) as one batch through `api`; the position of
/// the last.
fn publish_burst(api: Api, items: Vec<Value>) -> u64 {
    let resp = api
        .request("POST", "/v1/events", &[], Value::Array(items).to_string().as_bytes())
        .expect("burst");
    assert_eq!(resp.status, 201, "burst: {}", resp.describe());
    let body = resp.json().expect("json");
    body["events"]
        .as_array()
        .and_then(|a| a.last())
        .map(|e| id_position(e).expect("id and position").1)
        .unwrap_or_else(|| panic!("no events in {body}"))
}

/// Every `orders-audit/<node>/…` count, read through the listing in pages.
fn audit_counts(api: Api, node: u64) -> Result<BTreeMap<String, i64>, String> {
    let prefix = format!("orders-audit/{node}/");
    let mut counts = BTreeMap::new();
    let mut after: Option<String> = None;
    for _ in 0..1_000 {
        let path = match &after {
            None => format!("/v1/state/demo?prefix={prefix}&limit=500"),
            Some(a) => format!("/v1/state/demo?prefix={prefix}&limit=500&after={a}"),
        };
        let page = get_json(api, &path)?;
        for item in page["items"].as_array().ok_or_else(|| format!("no items: {page}"))? {
            let key = item["key"].as_str().ok_or_else(|| format!("no key: {item}"))?;
            let n = item["value"].as_i64().ok_or_else(|| format!("not a count: {item}"))?;
            counts.insert(key.trim_start_matches(&prefix).to_string(), n);
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => return Ok(counts),
        }
    }
    Err("more than 1,000 pages".into())
}

/// A graceful stop lets an every-instance subscription's running handler end and commits what
/// the node handled before the drain goes on: after the restart no event is delivered to it
/// again (`auditOrders` counts each delivery, untagged). Before, the progress of up to the last
/// 100 ms was dropped with the stop and those orders were audited twice on that node.
#[test]
fn a_graceful_stop_commits_what_an_every_instance_subscription_handled() {
    let (c, _) = example_cluster("ev-stop-audit");
    wait_subscription(&c, &c.apis(), "auditOrders");
    let node = 3;
    for round in 0..2 {
        // A burst of orders (events, as `placeOrder` emits them), then a stop while node 3
        // audits them one by one.
        let orders: Vec<Value> = (0..400)
            .map(|i| json!({"eventName": "orderPlaced", "payload": {"id": format!("stop-{round}-{i:03}")}}))
            .collect();
        let last = publish_burst(c.api(1), orders);
        c.wait_for("node 3 to have audited some of the burst", DELIVERY, || {
            let n = audit_counts(c.api(1), node)?.keys().filter(|k| k.starts_with(&format!("stop-{round}-"))).count();
            if n >= 20 { Ok(()) } else { Err(format!("{n} audited")) }
        });
        c.allow_exit(node);
        c.signal(node, "TERM");
        let status = c.wait_exit(node, Duration::from_secs(60));
        assert!(status.success(), "node 3 drained and exited with {status}");
        c.start(node);
        wait_instances_past(&c, "auditOrders", last, "the burst");
    }
    let counts = audit_counts(c.api(1), node).expect("audits");
    let twice: Vec<(&String, &i64)> = counts.iter().filter(|(k, n)| k.starts_with("stop-") && **n != 1).collect();
    assert_eq!(counts.keys().filter(|k| k.starts_with("stop-")).count(), 800, "every order audited on node 3");
    assert!(twice.is_empty(), "audited other than once on node 3 across its graceful stops: {twice:?}");
}

/// An every-instance subscription's progress is recorded per pass, not per event: a burst of
/// events reaches every node and each node's replicated position covers all of it; an event a
/// node's handler cannot take is dead-lettered for that node, and later events are still
/// delivered and recorded.
#[test]
fn every_instance_progress_covers_a_burst_and_dead_letters_per_node() {
    let (c, _) = example_cluster("ev-burst");
    wait_subscription(&c, &c.apis(), "auditOrders");
    wait_subscription(&c, &c.apis(), "benchEveryNode");
    // `auditOrders` cannot take an order without an id: dead on every node after 5 attempts.
    let (bad_id, bad) = publish(c.api(1), "orderPlaced", &json!({"noId": true}), &[])
        .expect("publish an order without id");
    let burst: Vec<Value> = (0..300)
        .map(|i| json!({"eventName": "benchBroadcast", "payload": {"i": i}}))
        .collect();
    let last = publish_burst(c.api(2), burst);
    assert!(last > bad);
    wait_instances_past(&c, "benchEveryNode", last, "the burst");
    c.wait_for("the bad order dead-lettered once per node", DEAD_LETTER, || {
        let dead = dead_letters(c.api(3), "auditOrders")?;
        let mut nodes: Vec<u64> = dead
            .iter()
            .filter(|d| d["position"].as_u64() == Some(bad))
            .map(|d| {
                assert_eq!(d["eventId"], json!(bad_id), "{d}");
                assert_eq!(d["attempts"], json!(5), "{d}");
                d["node"].as_u64().unwrap_or(0)
            })
            .collect();
        nodes.sort_unstable();
        if nodes == c.ids() { Ok(()) } else { Err(format!("dead letters for {bad} from nodes {nodes:?}: {dead:?}")) }
    });
    let later = place_order(c.api(3), &json!({"id": "after-the-bad-one"})).expect("place an order");
    c.wait_for("each node to audit the later order", DELIVERY, || {
        for node in c.ids() {
            audited(c.api(1), node, &later.order_id)?;
        }
        Ok(())
    });
    wait_instances_past(&c, "auditOrders", later.position, "the later order");
}

/// A subscription's returned event is emitted: the demo's `answerPings` answers a `demoPing`
/// with one `demoPong` carrying the ping's payload, trace, principal and tenant, sent by `demo`.
#[test]
fn a_subscription_returns_an_event_that_is_emitted_once() {
    let (c, _) = example_cluster("ev-pong");
    wait_subscription(&c, &c.apis(), "answerPings");
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let headers = [("x-principal-id", "bob"), ("x-tenant-id", "t2"), ("traceparent", traceparent)];
    let ping = json!({"n": 7, "note": "returned-event test"});
    let (ping_id, ping_position) = publish(c.api(2), "demoPing", &ping, &headers).expect("publish a ping");
    let pongs = c.wait_for("the pong for the ping", DELIVERY, || {
        let page = get_json(c.api(1), "/v1/events?after=0&limit=1000&eventName=demoPong")?;
        let events = page["events"].as_array().cloned().ok_or_else(|| format!("no events array: {page}"))?;
        let mine: Vec<Value> = events.into_iter().filter(|e| e["payload"]["ping"] == ping).collect();
        if mine.is_empty() { Err(format!("no pong yet: {page}")) } else { Ok(mine) }
    });
    assert_eq!(pongs.len(), 1, "one pong per ping: {pongs:?}");
    let pong = &pongs[0];
    assert!(pong["position"].as_u64().is_some_and(|p| p > ping_position), "after the ping: {pong}");
    assert_ne!(pong["id"].as_str(), Some(ping_id.as_str()), "an event of its own: {pong}");
    assert!(pong["payload"]["servedBy"].as_u64().is_some_and(|n| (1..=3).contains(&n)), "{pong}");
    assert_eq!(pong["sender"]["serviceName"], "demo", "sent by the subscribing service: {pong}");
    assert_eq!(pong["principalId"], "bob", "{pong}");
    assert_eq!(pong["tenantId"], "t2", "{pong}");
    assert_eq!(pong["traceId"], "0af7651916cd43dd8448eb211c80319c", "the ping's trace: {pong}");
    // The ping was acknowledged: the subscription's cursor moves past it.
    c.wait_for("answerPings past the ping", DELIVERY, || {
        let at = cursor(c.api(1), "answerPings")?;
        if at > ping_position { Ok(()) } else { Err(format!("cursor {at}")) }
    });

    // A handler calls a command: a ping with `"echo": true` is answered with what `echo`
    // answered it, from whichever node ran it.
    let echoed = json!({"n": 9, "echo": true});
    publish(c.api(1), "demoPing", &echoed, &[]).expect("publish a ping to echo");
    let pong = c.wait_for("the pong of the echoed ping", DELIVERY, || {
        let page = get_json(c.api(3), "/v1/events?after=0&limit=1000&eventName=demoPong")?;
        let events = page["events"].as_array().cloned().ok_or_else(|| format!("no events array: {page}"))?;
        events.into_iter().find(|e| e["payload"]["ping"] == echoed).ok_or_else(|| format!("no pong yet: {page}"))
    });
    assert_eq!(pong["payload"]["echo"]["echo"], echoed, "the echo command's answer: {pong}");
    assert!(pong["payload"]["echo"]["servedBy"].as_u64().is_some_and(|n| (1..=3).contains(&n)), "{pong}");

    // A handler still running at the ack deadline (2 s for `answerPings`) is a nack on the
    // node that runs it too, and is stopped there: each attempt of a ping that stalls 4 s
    // fails, the ping goes to the dead letters, and no stopped handler answers it later.
    let stalled = json!({"n": 8, "stallMs": 4000});
    let (_, stalled_position) = publish(c.api(3), "demoPing", &stalled, &[]).expect("publish a stalling ping");
    let letter = c.wait_for("the stalled ping in the dead letters", DEAD_LETTER, || {
        let list = dead_letters(c.api(2), "answerPings")?;
        list.into_iter()
            .find(|d| d["position"].as_u64() == Some(stalled_position))
            .ok_or_else(|| format!("position {stalled_position} not dead yet"))
    });
    assert!(letter["reason"].as_str().is_some_and(|r| r.contains("ack deadline")), "{letter}");
    assert_eq!(letter["attempts"].as_u64(), Some(5), "{letter}");
    // The last attempt started at most 2 s before the dead letter; a handler left running
    // would answer within 4 s of its start.
    c.assert_stays("no pong for the stalled ping", Duration::from_secs(6), || {
        let page = get_json(c.api(1), "/v1/events?after=0&limit=1000&eventName=demoPong")?;
        let events = page["events"].as_array().cloned().ok_or_else(|| format!("no events array: {page}"))?;
        match events.iter().find(|e| e["payload"]["ping"] == stalled) {
            Some(pong) => Err(format!("a handler past its ack deadline answered: {pong}")),
            None => Ok(()),
        }
    });
    // By now the first ping's acknowledgement is long committed: a redelivery would have
    // emitted a second pong. Counted over the whole log, on every node.
    for api in c.apis() {
        let log = read_log(api).expect("read the whole log");
        let answers: Vec<&Value> = log.iter().filter(|e| e["eventName"] == "demoPong" && e["payload"]["ping"] == ping).collect();
        assert_eq!(answers.len(), 1, "node {}: one pong for the ping in the whole log: {answers:?}", api.id);
    }
}

/// Subscriptions are listed with the nodes that declare them, and one that no node declares any
/// more is dropped with its progress, as a JetStream consumer is deleted: refused (409) while a
/// node declares it, then gone on every node (404), and back when a node declares it again.
#[test]
fn a_subscription_that_no_node_declares_is_dropped_with_its_progress() {
    let (mut c, leader) = Cluster::formed("ev-drop", 3, &[]);
    c.wait_all_ready(FORMATION);
    let demo = c.add_node_with(&[1, 2, 3], &["--example-services".to_string()]);
    c.wait_ready(demo);
    let others = [c.api(1), c.api(2), c.api(3)];
    wait_subscription(&c, &others, "benchSink");
    // Progress to drop: events the demo node's benchSink acknowledged.
    let mut last = 0;
    for n in 0..5 {
        last = publish(c.api(1 + n % 3), "benchEvent", &json!({"n": n}), &[]).expect("publish").1;
    }
    c.wait_for("benchSink past the events", DELIVERY, || {
        let at = cursor(c.api(leader), "benchSink")?;
        if at > last { Ok(()) } else { Err(format!("cursor {at}")) }
    });
    let listed = get_json(c.api(2), "/v1/subscriptions").expect("list");
    let entry = listed["subscriptions"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "benchSink"))
        .cloned()
        .unwrap_or_else(|| panic!("benchSink listed: {listed}"));
    assert_eq!(entry["declaredBy"], json!([demo]), "{entry}");
    assert_eq!((entry["shared"].as_bool(), entry["durable"].as_bool()), (Some(true), Some(true)), "{entry}");
    let resp = c.api(leader).request("DELETE", "/v1/subscriptions/benchSink", &[], b"").expect("answered");
    assert_json_error(&resp, 409, "dropping a subscription a node declares");
    assert!(String::from_utf8_lossy(&resp.body).contains(&format!("[{demo}]")), "names the node: {}", resp.describe());
    assert!(cursor(c.api(leader), "benchSink").expect("still there") > last, "a refused drop keeps the progress");

    // The demo node stops gracefully: it leaves the registry, and no node declares benchSink.
    c.terminate(demo);
    c.wait_for("benchSink declared by no node", CATCH_UP, || {
        let v = get_json(c.api(leader), "/v1/subscriptions/benchSink")?;
        if v["declaredBy"] == json!([]) { Ok(()) } else { Err(format!("{v}")) }
    });
    // The leader linked to the demo node while it ran, so it knows that build applies a drop.
    let resp = c.api(leader).request("DELETE", "/v1/subscriptions/benchSink", &[], b"").expect("answered");
    assert_eq!(resp.status, 200, "{}", resp.describe());
    assert_eq!(resp.json().expect("JSON"), json!({"deleted": true, "name": "benchSink"}));
    for api in others {
        c.wait_for(&format!("benchSink gone on node {}", api.id), CATCH_UP, || {
            match api.request("GET", "/v1/subscriptions/benchSink", &[], b"") {
                Ok(r) if r.status == 404 => Ok(()),
                Ok(r) => Err(r.describe()),
                Err(e) => Err(e.to_string()),
            }
        });
    }
    let resp = c.api(1).request("DELETE", "/v1/subscriptions/benchSink", &[], b"").expect("answered");
    assert_json_error(&resp, 404, "dropping it again");
    let listed = get_json(c.api(3), "/v1/subscriptions").expect("list");
    let names: Vec<&str> = listed["subscriptions"].as_array().into_iter().flatten().filter_map(|s| s["name"].as_str()).collect();
    assert!(!names.contains(&"benchSink") && names.contains(&"countOrders"), "only the dropped one went: {names:?}");

    // Declared again: the demo node's registration brings it back.
    c.start(demo);
    c.wait_ready(demo);
    c.wait_for("benchSink declared again", CATCH_UP, || {
        let v = get_json(c.api(leader), "/v1/subscriptions/benchSink")?;
        if v["declaredBy"] == json!([demo]) { Ok(()) } else { Err(format!("{v}")) }
    });
}

// ---------------------------------------------------------------------------------------------
// 6. Batch publishing and bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn batch_publish_is_contiguous_and_readable_and_bad_batches_are_rejected() {
    let (c, _) = Cluster::formed("ev-batch", 3, &[]);
    c.wait_all_ready(FORMATION);
    let items: Vec<Value> = (0..100)
        .map(|i| {
            let name = if i % 2 == 0 { "even" } else { "odd" };
            let mut item = json!({"eventName": name, "payload": {"i": i}});
            if i == 7 {
                item["idempotencyKey"] = json!("batch-item-7");
            }
            item
        })
        .collect();
    let resp = c
        .api(2)
        .request(
            "POST",
            "/v1/events",
            &[],
            Value::Array(items.clone()).to_string().as_bytes(),
        )
        .expect("batch");
    assert_eq!(resp.status, 201, "batch of 100: {}", resp.describe());
    let body = resp.json().expect("json");
    let acked: Vec<(String, u64)> = body["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events array: {body}"))
        .iter()
        .map(|e| id_position(e).expect("id and position"))
        .collect();
    assert_eq!(acked.len(), 100, "{body}");
    let first = acked[0].1;
    for (i, (_, p)) in acked.iter().enumerate() {
        assert_eq!(
            *p,
            first + i as u64,
            "positions of a batch are contiguous: {acked:?}"
        );
    }
    assert_eq!(
        acked
            .iter()
            .map(|(id, _)| id)
            .collect::<BTreeSet<_>>()
            .len(),
        100,
        "distinct ids"
    );

    for api in c.apis() {
        let page = c.wait_for(
            &format!("the batch readable on node {}", api.id),
            CATCH_UP,
            || {
                let page = get_json(api, &format!("/v1/events?after={}&limit=1000", first - 1))?;
                let n = page["events"].as_array().map_or(0, Vec::len);
                if n == 100 {
                    Ok(page)
                } else {
                    Err(format!("{n} events: {page}"))
                }
            },
        );
        let events = page["events"].as_array().expect("events");
        for (i, e) in events.iter().enumerate() {
            assert_eq!(
                e["id"].as_str(),
                Some(acked[i].0.as_str()),
                "node {}: event {i}: {e}",
                api.id
            );
            assert_eq!(
                e["position"].as_u64(),
                Some(acked[i].1),
                "node {}: event {i}: {e}",
                api.id
            );
            assert_eq!(
                e["eventName"], items[i]["eventName"],
                "node {}: event {i}: {e}",
                api.id
            );
            assert_eq!(
                e["payload"], items[i]["payload"],
                "node {}: event {i}: {e}",
                api.id
            );
            assert!(
                e["timestamp"].as_u64().is_some_and(|t| t > 0),
                "node {}: timestamp: {e}",
                api.id
            );
        }
        assert_eq!(
            page["end"].as_u64(),
            Some(first + 99),
            "node {}: end: {page}",
            api.id
        );
        assert_eq!(
            page["next"].as_u64(),
            Some(first + 99),
            "node {}: next: {page}",
            api.id
        );
        // Paging: `next` continues where a short page stopped.
        let p1 = get_json(api, &format!("/v1/events?after={}&limit=10", first - 1)).expect("page");
        assert_eq!(p1["events"].as_array().map(Vec::len), Some(10), "{p1}");
        let next = p1["next"].as_u64().expect("next");
        let p2 = get_json(api, &format!("/v1/events?after={next}&limit=10")).expect("page");
        assert_eq!(
            p2["events"][0]["position"].as_u64(),
            Some(first + 10),
            "page 2 after next={next}: {p2}"
        );
        // The eventName filter.
        let odd = get_json(
            api,
            &format!("/v1/events?after={}&limit=1000&eventName=odd", first - 1),
        )
        .expect("odd");
        let odd = odd["events"].as_array().expect("events");
        assert_eq!(odd.len(), 50, "node {}: odd events", api.id);
        assert!(
            odd.iter().all(|e| e["eventName"] == "odd"),
            "node {}: filter: {odd:?}",
            api.id
        );
    }
    // The batch item's idempotency key dedups a later single publish.
    let again = publish(
        c.api(3),
        "odd",
        &json!({"i": 7}),
        &[("idempotency-key", "batch-item-7")],
    )
    .expect("repeat");
    assert_eq!(
        again, acked[7],
        "an idempotency key from a batch item dedups a later publish"
    );
    // A batch's items say which were duplicates: one of an earlier publish, one of an item
    // before it in the same batch.
    let resp = c
        .api(2)
        .request(
            "POST",
            "/v1/events",
            &[],
            json!([
                {"eventName": "odd", "payload": {"i": 7}, "idempotencyKey": "batch-item-7"},
                {"eventName": "dup", "payload": 1, "idempotencyKey": "in-batch"},
                {"eventName": "dup", "payload": 2, "idempotencyKey": "in-batch"},
                {"eventName": "dup", "payload": 3}
            ])
            .to_string()
            .as_bytes(),
        )
        .expect("batch with duplicates");
    assert_eq!(resp.status, 201, "{}", resp.describe());
    let body = resp.json().expect("json");
    let items = body["events"].as_array().expect("events");
    let dup: Vec<bool> = items.iter().map(|e| e["duplicate"] == json!(true)).collect();
    assert_eq!(dup, [true, false, true, false], "{body}");
    assert_eq!(id_position(&items[0]), Ok(acked[7].clone()), "{body}");
    assert_eq!(id_position(&items[2]), id_position(&items[1]), "{body}");

    let api = c.api(1);
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"eventName": "x", "payload": i}))
        .collect();
    let resp = api
        .request(
            "POST",
            "/v1/events",
            &[],
            Value::Array(too_many).to_string().as_bytes(),
        )
        .expect("1001");
    assert_json_error(&resp, 400, "a batch of 1001 events");
    let exactly: Vec<Value> = (0..1000)
        .map(|i| json!({"eventName": "max", "payload": i}))
        .collect();
    let resp = api
        .request(
            "POST",
            "/v1/events",
            &[],
            Value::Array(exactly).to_string().as_bytes(),
        )
        .expect("1000");
    assert_eq!(
        resp.status,
        201,
        "a batch of exactly 1000 events: {}",
        resp.describe()
    );
    for (what, body) in [
        ("bad JSON", &b"[{\"eventName\": \"x\", "[..]),
        ("not an array", b"{\"eventName\": \"x\"}"),
        ("an empty batch", b"[]"),
        ("an item without eventName", b"[{\"payload\": 1}]"),
    ] {
        let resp = api
            .request("POST", "/v1/events", &[], body)
            .expect("request");
        assert_json_error(&resp, 400, &format!("batch with {what}"));
    }
    // The header would name one event of many: refused, not dropped (a retry would publish the
    // batch twice).
    let resp = api
        .request("POST", "/v1/events", &[("idempotency-key", "k-batch")], b"[{\"eventName\": \"x\"}]")
        .expect("request");
    assert_json_error(&resp, 400, "a batch with an idempotency-key header");
    // Refused at the 1001st item, not after parsing tens of thousands.
    let tiny = format!("[{}]", vec![r#"{"eventName":"a"}"#; 50_000].join(","));
    let resp = api.request("POST", "/v1/events", &[], tiny.as_bytes()).expect("request");
    assert_json_error(&resp, 400, "a batch of 50,000 tiny events");
    let resp = api
        .request("POST", "/v1/events/x", &[], b"{not json")
        .expect("request");
    assert_json_error(&resp, 400, "single publish with bad JSON");
    let resp = api
        .request("GET", "/v1/events?after=abc", &[], b"")
        .expect("request");
    assert_json_error(&resp, 400, "read with a non-numeric after");
    for path in ["/v1/eventz", "/v1/events/x/y/z", "/v2/events"] {
        let resp = api.request("GET", path, &[], b"").expect("request");
        assert_json_error(&resp, 404, &format!("unknown route GET {path}"));
    }
    let resp = api
        .request("GET", "/v1/subscriptions/no-such-sub", &[], b"")
        .expect("request");
    assert_json_error(&resp, 404, "an unknown subscription");
    // A read never returns more than 1000 events; `next` is the last position returned.
    let big = get_json(api, "/v1/events?after=0&limit=5000").expect("read");
    let events = big["events"].as_array().expect("events");
    assert_eq!(events.len(), 1000, "limit is capped at 1000");
    assert_eq!(
        big["next"], events[999]["position"],
        "next of a full page: {}",
        big["next"]
    );

    // Message fields from the headers of a single publish.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let headers = [
        ("x-principal-id", "alice"),
        ("x-tenant-id", "t1"),
        ("traceparent", traceparent),
    ];
    let (id, position) =
        publish(c.api(3), "withMeta", &json!({"k": "v"}), &headers).expect("publish with headers");
    let e = c.wait_for(
        "the event with message fields readable on node 1",
        CATCH_UP,
        || {
            let page = get_json(api, &format!("/v1/events?after={}&limit=1", position - 1))?;
            page["events"]
                .get(0)
                .cloned()
                .ok_or_else(|| format!("not yet: {page}"))
        },
    );
    assert_eq!(e["id"].as_str(), Some(id.as_str()), "{e}");
    assert_eq!(e["eventName"], "withMeta", "{e}");
    assert_eq!(
        e["principalId"], "alice",
        "principal from x-principal-id: {e}"
    );
    assert_eq!(e["tenantId"], "t1", "tenant from x-tenant-id: {e}");
    assert_eq!(
        e["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "trace id from traceparent: {e}"
    );
    assert_eq!(e["payload"], json!({"k": "v"}), "{e}");

    // Nothing from the rejected requests was stored: 100 + 2 (the batch with duplicates) +
    // 1000 + 1 events.
    let log = read_log(api).expect("log");
    assert_eq!(
        log.len(),
        1103,
        "only the accepted publishes are in the log"
    );

    // A client reads its own writes: right after a 201, a read of the log on the node that
    // answered it holds the event, on followers too (their publish is answered once the leader
    // applied it, before they learn of the commit). No waiting here.
    for round in 0..20 {
        for api in c.apis() {
            let (id, position) = publish(api, "ownWrite", &json!({"round": round}), &[]).expect("publish");
            let page = get_json(api, &format!("/v1/events?after={}&limit=1", position - 1)).expect("read");
            assert_eq!(
                page["events"][0]["id"].as_str(),
                Some(id.as_str()),
                "node {} round {round}: its own event at {position} at once: {page}",
                api.id
            );
        }
    }
    // A limit of 0 is refused rather than read as 1.
    must_refuse(api, "GET", "/v1/events?after=0&limit=0", &[], b"", 400, "limit 0");
}

/// A request that must get a JSON error with `status`.
fn must_refuse(api: Api, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8], status: u16, what: &str) {
    let resp = api
        .request(method, path, headers, body)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_json_error(&resp, status, what);
}

#[test]
fn event_input_is_checked_and_payloads_come_back_as_sent() {
    // A small frame: one entry may hold at most 64 KiB of events with their metadata.
    let (c, _) = Cluster::formed("ev-input", 3, &["--max-frame", "131072", "--max-body", "65536"]);
    c.wait_all_ready(FORMATION);
    let api = c.api(2);

    // The payload comes back byte for byte: a number beyond f64, an integer beyond u64, escapes.
    let sent = r#"{"tag":"raw-1","big":123456789012345678901234567890,"tiny":1e400,"esc":"\ud83d\ude00\u0041","x":[1.50]}"#;
    let resp = api.request("POST", "/v1/events/rawPayload", &[], sent.as_bytes()).expect("publish");
    assert_eq!(resp.status, 201, "a valid JSON body: {}", resp.describe());
    let (_, position) = id_position(&resp.json().expect("json")).expect("id and position");
    let batch = format!(r#"[{{"eventName":"rawPayload","payload":{sent}}}]"#);
    let resp = api.request("POST", "/v1/events", &[], batch.as_bytes()).expect("batch");
    assert_eq!(resp.status, 201, "a batch with that payload: {}", resp.describe());
    for node in c.apis() {
        let text = c.wait_for(&format!("both raw events on node {}", node.id), CATCH_UP, || {
            let resp = node
                .request("GET", &format!("/v1/events?after={}&eventName=rawPayload", position - 1), &[], b"")
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8(resp.body.clone()).map_err(|e| e.to_string())?;
            if text.matches(&format!(r#""payload":{sent}"#)).count() == 2 { Ok(text) } else { Err(format!("not yet: {text}")) }
        });
        assert!(text.starts_with('{') && text.contains(r#""next":"#), "node {}: {text}", node.id);
    }

    // Bodies and names that are not what they must be: 400, and nothing stored.
    let long = "p".repeat(257);
    // (method, path, headers, body, what)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>, &'a str);
    let deep = format!(r#"[{{"eventName":"x","payload":{}1{}}}]"#, "[".repeat(200), "]".repeat(200));
    let long_sub = format!("/v1/subscriptions/{}", "s".repeat(300));
    let cases: [Case; 15] = [
        ("POST", "/v1/events/x", vec![], b"{\"a\":\"\xff\"}".to_vec(), "a body that is not UTF-8"),
        ("POST", "/v1/events", vec![], b"[{\"eventName\":\"x\",\"payload\":\"\xff\"}]".to_vec(), "a batch that is not UTF-8"),
        ("POST", "/v1/events/x", vec![("x-principal-id", long.as_str())], b"{}".to_vec(), "an x-principal-id of 257 bytes"),
        ("POST", "/v1/events/x", vec![("x-tenant-id", "t\u{e9}")], b"{}".to_vec(), "a non-ASCII x-tenant-id"),
        ("POST", "/v1/events/x", vec![("idempotency-key", "caf\u{e9}")], b"{}".to_vec(), "a non-ASCII idempotency-key"),
        ("POST", "/v1/events", vec![("x-principal-id", long.as_str())], b"[{\"eventName\":\"x\"}]".to_vec(), "a batch with an overlong x-principal-id"),
        ("POST", "/v1/events", vec![], b"[{\"eventName\":\"x\",\"idempotencyKey\":\"\"}]".to_vec(), "an empty idempotencyKey"),
        ("POST", "/v1/events", vec![], format!(r#"[{{"eventName":"x","idempotencyKey":"{long}"}}]"#).into_bytes(), "an idempotencyKey of 257 bytes"),
        ("POST", "/v1/events/%ff", vec![], b"{}".to_vec(), "an event name that is not UTF-8"),
        ("GET", "/v1/events?eventName=", vec![], Vec::new(), "an empty eventName filter"),
        // JSON that no consumer could read back: a lone surrogate escape, nesting past 64.
        ("POST", "/v1/events/x", vec![], br#"{"id":"\ud800"}"#.to_vec(), "a lone surrogate escape"),
        ("POST", "/v1/events", vec![], deep.clone().into_bytes(), "a payload nested 200 deep"),
        // Names no service can declare: refused before they are looked up or proposed.
        ("GET", "/v1/dead-letters?subscription=a%20b", vec![], Vec::new(), "a subscription name with a space"),
        ("DELETE", long_sub.as_str(), vec![], Vec::new(), "a subscription name of 300 characters"),
        ("GET", "/v1/subscriptions/a%2Fb", vec![], Vec::new(), "a subscription name with a slash"),
    ];
    for (method, path, headers, body, what) in &cases {
        must_refuse(api, method, path, headers, body, 400, what);
    }
    // Wrong methods on the broker's paths.
    for (method, path, allow) in [
        ("PUT", "/v1/events", "GET, HEAD, POST"),
        ("GET", "/v1/events/x", "POST"),
        ("POST", "/v1/dead-letters", "GET, HEAD"),
        ("POST", "/v1/subscriptions/x", "GET, HEAD, DELETE"),
        ("PUT", "/v1/subscriptions", "GET, HEAD"),
        ("POST", "/v1/state/s/k", "GET, HEAD, PUT, DELETE"),
        ("GET", "/cluster/members/1", "DELETE"),
    ] {
        must_refuse(api, method, path, &[], b"", 405, &format!("{method} {path}"));
        let resp = api.request(method, path, &[], b"").expect("answered");
        assert_eq!(resp.header("allow"), Some(allow), "{method} {path}: the Allow header names the methods");
    }
    // A batch's refused item is named by its place.
    let resp = api.request("POST", "/v1/events", &[], br#"[{"eventName":"ok"},{"eventName":"a\u200bb"}]"#).expect("answered");
    assert_json_error(&resp, 400, "an invisible character in a batch's second name");
    assert!(resp.text().contains("item 1:"), "the item is named: {}", resp.describe());
    // A metadata header given twice is refused, not resolved to one of them.
    let resp = api.request("POST", "/v1/events/x", &[("x-tenant-id", "t1"), ("x-tenant-id", "t2")], b"{}").expect("answered");
    assert_json_error(&resp, 400, "x-tenant-id twice");
    // HEAD is served as GET without its body (load balancers probe with it), never a 405.
    for path in ["/healthz", "/readyz", "/v1/events?after=0&limit=1", "/v1/subscriptions", "/metrics"] {
        let resp = api.request("HEAD", path, &[], b"").expect("answered");
        assert_eq!(resp.status, 200, "HEAD {path}: {}", resp.describe());
        assert!(resp.body.is_empty(), "HEAD {path} has no body");
    }
    // More than an entry may hold, counting metadata: 1000 tiny events under ~700 bytes of
    // headers each are ~750 KiB, over half the 128 KiB frame. A 413, not a stalled log.
    let principal = "p".repeat(256);
    let tenant = "t".repeat(256);
    let request_id = "r".repeat(200);
    let heavy = [("x-principal-id", principal.as_str()), ("x-tenant-id", tenant.as_str()), ("x-request-id", request_id.as_str())];
    let tiny: Vec<Value> = (0..1000).map(|i| json!({"eventName": "heavy", "payload": i})).collect();
    let tiny = Value::Array(tiny).to_string();
    assert!(tiny.len() < 65536, "the body itself is under --max-body");
    must_refuse(api, "POST", "/v1/events", &heavy, tiny.as_bytes(), 413, "events whose metadata overflows an entry");
    // The same headers on one event are fine.
    let (_, heavy_position) = publish(api, "heavy", &json!({"tag": "heavy-1"}), &heavy).expect("one event with long metadata");

    // An event name is percent-decoded in the path, like in the eventName filter.
    let (spaced_id, _) = publish(api, "order%20placed", &json!({"tag": "spaced-1"}), &[]).expect("a percent-encoded name");
    let spaced = c.wait_for("the spaced name readable", CATCH_UP, || {
        let page = get_json(api, "/v1/events?eventName=order%20placed")?;
        page["events"].get(0).cloned().ok_or_else(|| format!("not yet: {page}"))
    });
    assert_eq!((spaced["id"].as_str(), spaced["eventName"].as_str()), (Some(spaced_id.as_str()), Some("order placed")), "{spaced}");

    // `after` at the end of the numbers is an empty page, not an overflow.
    let end = get_json(api, "/v1/events?after=18446744073709551615").expect("after u64::MAX");
    assert_eq!(end["events"].as_array().map(Vec::len), Some(0), "{end}");

    // Nothing from the refused requests was stored: exactly the accepted events, by content.
    // (Read as text first: `1e400` is beyond what serde_json's `Value` takes.)
    let log = c.wait_for("all accepted events on node 2", CATCH_UP, || {
        let resp = api.request("GET", "/v1/events?after=0&limit=1000", &[], b"").map_err(|e| e.to_string())?;
        let text = String::from_utf8(resp.body).map_err(|e| e.to_string())?.replace("1e400", "1");
        let page: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        let log = page["events"].as_array().cloned().unwrap_or_default();
        if log.len() >= 4 { Ok(log) } else { Err(format!("{} events", log.len())) }
    });
    let tags: Vec<&str> = log.iter().map(|e| e["payload"]["tag"].as_str().unwrap_or("?")).collect();
    assert_eq!(tags, vec!["raw-1", "raw-1", "heavy-1", "spaced-1"], "the log by content");
    assert_eq!(log[2]["position"].as_u64(), Some(heavy_position));
    assert_eq!(log[2]["principalId"].as_str(), Some(principal.as_str()));
    for node in c.apis() {
        node.must_put("after-bad-input", &json!({"ok": true}));
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Sidecar subscriptions
// ---------------------------------------------------------------------------------------------

struct EventsUpstream {
    name: String,
    addr: SocketAddr,
    process: HelperProcess,
}

impl EventsUpstream {
    fn spawn(dir: &Path, name: &str, addr: SocketAddr) -> EventsUpstream {
        let args = [
            UPSTREAM_PY.to_string(),
            "--port".into(),
            addr.port().to_string(),
            "--name".into(),
            name.to_string(),
        ];
        let process = HelperProcess::spawn(name, "python3", &args, dir.join(format!("{name}.log")));
        let up = EventsUpstream {
            name: name.to_string(),
            addr,
            process,
        };
        poll_until(&format!("upstream {name} /health"), FORMATION, || {
            up.call("GET", "/health").map(|_| ())
        });
        up
    }

    fn call(&self, method: &str, path: &str) -> Result<Value, String> {
        let resp = http::request(self.addr, method, path, &[], b"", Duration::from_secs(5))
            .map_err(|e| format!("upstream {}: {method} {path}: {e}", self.name))?;
        if resp.status != 200 {
            return Err(format!(
                "upstream {}: {method} {path}: {}",
                self.name,
                resp.describe()
            ));
        }
        resp.json()
    }

    /// Ok once the app has acknowledged every one of `ids` (with 200).
    fn received_all(&self, ids: &[String]) -> Result<(), String> {
        let got = self.list("/events/received")?;
        let missing = ids.iter().filter(|id| !got.contains(id)).count();
        if missing == 0 { Ok(()) } else { Err(format!("{missing} missing")) }
    }

    fn list(&self, path: &str) -> Result<Vec<String>, String> {
        let v = self.call("GET", path)?;
        v.as_array()
            .ok_or_else(|| format!("upstream {}: {path} is not a list: {v}", self.name))
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
    }
}

fn events_sidecar_toml(upstream: SocketAddr) -> String {
    format!(
        "[sidecar]\nupstream = \"http://{upstream}\"\nhealth_path = \"/health\"\nhealth_interval_ms = 500\n\n\
         [[sidecar.subscriptions]]\nname = \"appOrders\"\nevent_name = \"orderPlaced\"\npath = \"/events/orderPlaced\"\n"
    )
}

/// Polls until every id in `want` was acknowledged by some upstream; returns how often each
/// upstream got each.
fn wait_delivered(
    c: &Cluster,
    ups: &[EventsUpstream],
    want: &[String],
    what: &str,
) -> BTreeMap<String, Vec<String>> {
    c.wait_for(&format!("{} events {what} delivered to some upstream", want.len()), DELIVERY, || {
        let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for u in ups {
            for id in u.list("/events/received")? {
                got.entry(id).or_default().push(u.name.clone());
            }
        }
        let missing: Vec<&String> = want.iter().filter(|id| !got.contains_key(*id)).collect();
        if missing.is_empty() {
            Ok(got)
        } else {
            // Dead letters without their event bodies, and how often each app failed a missing event.
            let dead_list = dead_letters(c.api(1), "appOrders")?;
            let dead_missing = dead_list.iter().any(|d| missing.iter().any(|m| d["eventId"].as_str() == Some(m.as_str())));
            let dead: Vec<Value> = dead_list
                .iter()
                .map(|x| json!({"eventId": x["eventId"], "attempts": x["attempts"], "reason": x["reason"]}))
                .collect();
            let mut failures = Vec::new();
            for u in ups {
                let failed = u.list("/events/failed")?;
                for id in &missing {
                    let n = failed.iter().filter(|f| f == id).count();
                    if n > 0 {
                        failures.push(format!("{} answered 500 to {id} {n} times", u.name));
                    }
                }
            }
            let msg = format!(
                "{} of {} missing (first {:?}); {failures:?}; appOrders dead letters: {dead:?}",
                missing.len(),
                want.len(),
                &missing[..missing.len().min(5)]
            );
            // A dead-lettered event is never delivered again: fail now rather than at the deadline.
            assert!(!dead_missing, "events {what} were dead-lettered instead of delivered: {msg}");
            Err(msg)
        }
    })
}

/// Three nodes, node `i` with its own `upN` app and a `[sidecar]` config made by `toml` from
/// the app's address; once every node is ready. The apps are dropped (killed) before the
/// cluster when the caller binds the pair as `let (c, ups)`.
fn sidecar_events_cluster(name: &str, toml: impl Fn(SocketAddr) -> String) -> (Cluster, Vec<EventsUpstream>) {
    let ports = free_loopback_ports(3);
    let ups = std::cell::RefCell::new(Vec::new());
    let (c, _) = Cluster::formed_with(name, 3, &[], |dir, id| {
        let up = EventsUpstream::spawn(dir, &format!("up{id}"), ports[id as usize - 1]);
        let config = dir.join(format!("n{id}-sidecar.toml"));
        fs::write(&config, toml(up.addr)).unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        ups.borrow_mut().push(up);
        vec!["--config".to_string(), config.display().to_string()]
    });
    c.wait_all_ready(FORMATION);
    (c, ups.into_inner())
}

#[test]
fn sidecar_subscription_posts_events_to_the_apps_also_while_one_fails() {
    let (c, ups) = sidecar_events_cluster("ev-sidecar", events_sidecar_toml);
    wait_subscription(&c, &c.apis(), "appOrders");

    let n = 30;
    let publish_all = |prefix: &str| -> Vec<String> {
        (0..n)
            .map(|i| {
                let api = c.api(1 + (i % 3) as u64);
                c.wait_for("an orderPlaced event accepted", PROGRESS, || {
                    publish(
                        api,
                        "orderPlaced",
                        &json!({"id": format!("{prefix}-{i}")}),
                        &[],
                    )
                })
                .0
            })
            .collect()
    };
    // Other events are not delivered to this subscription.
    let other = publish(
        c.api(1),
        "somethingElse",
        &json!({"id": "not-for-apps"}),
        &[],
    )
    .expect("publish")
    .0;

    let healthy = publish_all("sc");
    let got = wait_delivered(&c, &ups, &healthy, "with all apps healthy");
    let per_up: Vec<(String, usize)> = ups
        .iter()
        .map(|u| {
            (
                u.name.clone(),
                got.values().filter(|v| v.contains(&u.name)).count(),
            )
        })
        .collect();
    eprintln!("[ev-sidecar] healthy phase: per upstream {per_up:?}");
    assert!(
        !got.contains_key(&other),
        "an event not matching event_name was delivered: {got:?}"
    );
    // The event as POSTed is the event of GET /v1/events: check one by content.
    let log = read_log(c.api(2)).expect("log");
    assert!(log
        .iter()
        .any(|e| e["id"].as_str() == Some(healthy[0].as_str()) && e["payload"]["id"] == "sc-0"));

    // One app fails every event: they are retried or redelivered, and still arrive.
    let failing = &ups[0];
    failing
        .call("POST", "/admin/fail-events")
        .expect("fail-events");
    let during = publish_all("scf");
    let got = wait_delivered(&c, &ups, &during, "with up1 failing them");
    let failed = failing.list("/events/failed").expect("failed list");
    let mut per_event: BTreeMap<&String, usize> = BTreeMap::new();
    failed
        .iter()
        .for_each(|id| *per_event.entry(id).or_default() += 1);
    eprintln!(
        "[ev-sidecar] failing phase: up1 answered 500 to {} deliveries of {} events, at most {} times to one event",
        failed.len(),
        per_event.len(),
        per_event.values().max().unwrap_or(&0)
    );
    assert!(!failed.is_empty(), "up1 was handed none of the {n} events: the failing path went untested");
    for id in &during {
        assert!(
            !got[id].contains(&failing.name),
            "event {id} acked by the failing app?"
        );
    }
    let dead = dead_letters(c.api(1), "appOrders").expect("dead letters");
    assert!(
        dead.is_empty(),
        "events were dead-lettered although two apps were healthy: {dead:?}"
    );
    failing.call("POST", "/admin/ok-events").expect("ok-events");
    let after = publish_all("sca");
    wait_delivered(&c, &ups, &after, "after up1 recovered");

    // An app that answers `x-no-retry: true` beside its failure dead-letters the event at that
    // attempt (default max_attempts 5), with the app's own words as the reason.
    let malformed = publish(c.api(3), "orderPlaced", &json!({"id": "sc-malformed", "malformed": true}), &[]).expect("publish").0;
    let dead = c.wait_for("the malformed event dead-lettered", DELIVERY, || {
        let dead = dead_letters(c.api(1), "appOrders")?;
        dead.into_iter().find(|d| d["eventId"].as_str() == Some(malformed.as_str())).ok_or("not yet".to_string())
    });
    assert_eq!(dead["attempts"], 1, "a failure the app said no retry mends was retried: {dead}");
    let reason = dead["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("422") && reason.contains("malformed event"), "the reason names the app's answer: {dead}");
    let tried: usize = ups.iter().map(|u| u.list("/events/failed").expect("failed list").iter().filter(|id| **id == malformed).count()).sum();
    assert_eq!(tried, 1, "the malformed event was delivered {tried} times");
}


/// What a sidecar app answers becomes an event when its config asks for it: a subscription's
/// `emit_event` emits the app's answer to a delivery (once per delivered event, with the source
/// event's tenant), and a command's `success_event` emits the app's answer to the command as a
/// `commandSuccessResponse`, as SDK services do.
#[test]
fn a_sidecar_apps_answers_become_events_when_its_config_asks() {
    let (c, _ups) = sidecar_events_cluster("ev-sidecar-emit", |addr| {
        format!(
            "[sidecar]\nupstream = \"http://{addr}\"\nhealth_path = \"/health\"\nhealth_interval_ms = 500\n\n\
             [[sidecar.subscriptions]]\nname = \"appPings\"\nevent_name = \"sidecarPing\"\npath = \"/events/sidecarPing\"\n\
             emit_event = \"sidecarPong\"\n\n\
             [[sidecar.commands]]\nservice = \"shop\"\nversion = 1\nname = \"accept\"\nmethod = \"POST\"\n\
             path = \"accept/:id\"\nupstream_path = \"/orders/:id\"\nsuccess_event = \"orderAccepted\"\n"
        )
    });
    wait_subscription(&c, &c.apis(), "appPings");
    let (ping_id, ping_position) = publish(c.api(2), "sidecarPing", &json!({"n": 1}), &[("x-tenant-id", "t3")]).expect("publish a ping");
    // Acknowledged once the pong is committed (the returned event is published before the ack).
    c.wait_for("appPings past the ping", DELIVERY, || {
        let at = cursor(c.api(1), "appPings")?;
        if at > ping_position { Ok(()) } else { Err(format!("cursor {at}")) }
    });
    let page = get_json(c.api(3), "/v1/events?after=0&limit=1000&eventName=sidecarPong").expect("pongs");
    let pongs = page["events"].as_array().cloned().unwrap_or_default();
    assert_eq!(pongs.len(), 1, "one pong for the one ping: {page}");
    let pong = &pongs[0];
    assert_eq!(pong["payload"]["ok"], true, "the app's answer is the payload: {pong}");
    assert!(pong["payload"]["servedBy"].as_str().is_some_and(|s| s.starts_with("up")), "{pong}");
    assert_eq!(pong["tenantId"], "t3", "the ping's tenant: {pong}");
    assert_eq!(pong["sender"]["serviceName"], "sidecar", "sent by the subscribing service: {pong}");
    assert_ne!(pong["id"].as_str(), Some(ping_id.as_str()));

    // The command's answer as its success event; each try has an id of its own, so the one
    // that was answered 200 must be there exactly once.
    let mut tries = 0;
    let accepted = c.wait_for("the accept command answered", PROGRESS, || {
        tries += 1;
        let id = format!("o-{tries}");
        let resp = c.api(1).request("POST", &format!("/api/v1/accept/{id}"), &[], br#"{"qty":2}"#).map_err(|e| e.to_string())?;
        if resp.status == 200 { Ok(id) } else { Err(resp.describe()) }
    });
    let event = c.wait_for("the success event", DELIVERY, || {
        let page = get_json(c.api(2), "/v1/events?after=0&limit=1000&eventName=orderAccepted")?;
        let mine: Vec<Value> = page["events"].as_array().cloned().unwrap_or_default().into_iter().filter(|e| e["payload"]["id"] == accepted.as_str()).collect();
        match mine.len() {
            0 => Err(format!("none yet: {page}")),
            1 => Ok(mine[0].clone()),
            n => panic!("{n} success events for one command: {page}"),
        }
    });
    assert_eq!(event["messageType"], "commandSuccessResponse", "{event}");
    assert_eq!(event["payload"]["body"], json!({"qty": 2}), "the app's answer, whole: {event}");
    assert_eq!(event["sender"]["serviceName"], "shop", "{event}");
}

/// An every-instance sidecar subscription waits while its app fails its health check, instead
/// of spending its attempts on an app that is down and dead-lettering the events: once the app
/// is healthy again, it gets every event published meanwhile, and nothing is dead.
#[test]
fn an_every_instance_sidecar_subscription_waits_for_its_app_to_be_healthy() {
    let (c, ups) = sidecar_events_cluster("ev-sidecar-down", |addr| {
        format!(
            "[sidecar]\nupstream = \"http://{}\"\nhealth_path = \"/health\"\nhealth_interval_ms = 250\n\n\
             [[sidecar.subscriptions]]\nname = \"appAudit\"\nevent_name = \"auditMe\"\nshared = false\n\
             max_attempts = 2\npath = \"/events/audit\"\n",
            addr
        )
    });
    wait_subscription(&c, &c.apis(), "appAudit");

    let down = &ups[0];
    down.call("POST", "/admin/unhealthy").expect("unhealthy");
    c.wait_for("node 1 sees its app unhealthy", PROGRESS, || {
        match c.api(1).metric("raftbridge_sidecar_upstream_healthy", &[])? {
            0.0 => Ok(()),
            v => Err(format!("healthy gauge {v}")),
        }
    });
    let ids: Vec<String> = (0..10)
        .map(|i| c.wait_for("an auditMe event accepted", PROGRESS, || publish(c.api(2), "auditMe", &json!({"i": i}), &[])).0)
        .collect();
    // The healthy apps get every event; the one that is down none. (This stub fails only its
    // health check and would take them: none arriving shows that none was sent.)
    for up in &ups[1..] {
        c.wait_for(&format!("{} audited every event", up.name), DELIVERY, || up.received_all(&ids));
    }
    assert!(down.list("/events/received").expect("received").is_empty() && down.list("/events/failed").expect("failed").is_empty(),
        "no delivery was tried on the app that is down");
    assert!(dead_letters(c.api(1), "appAudit").expect("dead letters").is_empty(), "nothing dead-lettered while waiting");

    down.call("POST", "/admin/healthy").expect("healthy");
    c.wait_for("up1 audited every event once healthy", DELIVERY, || down.received_all(&ids));
    assert!(dead_letters(c.api(1), "appAudit").expect("dead letters").is_empty(), "nothing dead-lettered");
}

/// A sidecar config with the `appAudit` subscription of `auditMe` events, shared or not.
fn audit_toml(addr: SocketAddr, shared: bool) -> String {
    format!(
        "[sidecar]\nupstream = \"http://{addr}\"\nhealth_path = \"/health\"\nhealth_interval_ms = 250\n\n\
         [[sidecar.subscriptions]]\nname = \"appAudit\"\nevent_name = \"auditMe\"\nshared = {shared}\npath = \"/events/audit\"\n"
    )
}

/// A rollout of `appAudit` as `shared` (or not): each node in turn stopped gracefully and
/// started again with its config rewritten; returns once every node is ready and the cluster
/// keeps the new mode.
fn roll_out_audit(c: &Cluster, ups: &[EventsUpstream], shared: bool) {
    for (i, up) in ups.iter().enumerate() {
        let id = i as u64 + 1;
        let config = c.dir().join(format!("n{id}-sidecar.toml"));
        fs::write(&config, audit_toml(up.addr, shared)).unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        c.allow_exit(id);
        c.signal(id, "TERM");
        c.wait_exit(id, Duration::from_secs(30));
        c.start(id);
        c.wait_all_ready(FORMATION);
    }
    c.wait_for("appAudit's new mode applied", PROGRESS, || {
        let v = get_json(c.api(1), "/v1/subscriptions/appAudit")?;
        if v["shared"] == json!(shared) { Ok(()) } else { Err(format!("{v}")) }
    });
}

/// A sidecar subscription whose config turns it from every-instance to shared, rolled out by
/// graceful restarts, goes on where its instances had come: the events every app got before
/// are not delivered again (the registration would start the shared cursor where it stood when
/// the subscription was made, at the oldest retained event), and the new ones go to one app.
#[test]
fn a_sidecar_subscription_turned_shared_goes_on_where_its_instances_had_come() {
    let (c, ups) = sidecar_events_cluster("ev-sidecar-flip", |addr| audit_toml(addr, false));
    wait_subscription(&c, &c.apis(), "appAudit");
    let before: Vec<String> = (0..10)
        .map(|i| c.wait_for("an auditMe event accepted", PROGRESS, || publish(c.api(2), "auditMe", &json!({"i": i}), &[])).0)
        .collect();
    for up in &ups {
        c.wait_for(&format!("{} audited every event", up.name), DELIVERY, || up.received_all(&before));
    }
    // The rollout: each node stopped gracefully and started with the subscription shared.
    roll_out_audit(&c, &ups, true);
    let after: Vec<String> = (10..15)
        .map(|i| c.wait_for("an auditMe event accepted", PROGRESS, || publish(c.api(3), "auditMe", &json!({"i": i}), &[])).0)
        .collect();
    c.wait_for("the new events delivered to some app", DELIVERY, || {
        let got: Vec<String> = ups.iter().map(|u| u.list("/events/received")).collect::<Result<Vec<_>, _>>()?.concat();
        let missing = after.iter().filter(|id| !got.contains(id)).count();
        if missing == 0 { Ok(()) } else { Err(format!("{missing} missing")) }
    });
    // Settled: the cursor is past every event, and the old ones reached each app once only.
    c.wait_for("appAudit settled", DELIVERY, || {
        let v = get_json(c.api(1), "/v1/subscriptions/appAudit")?;
        let end = get_json(c.api(1), "/v1/events?limit=1")?["end"].as_u64().unwrap_or(0);
        if v["cursor"].as_u64() > Some(end) { Ok(()) } else { Err(format!("{v}, end {end}")) }
    });
    for up in &ups {
        let got = up.list("/events/received").expect("received");
        for id in &before {
            assert_eq!(got.iter().filter(|g| *g == id).count(), 1, "{} got {id} again after the change: {got:?}", up.name);
        }
    }
}

/// The other way: a shared sidecar subscription turned every-instance by a rollout of graceful
/// restarts. Each app then gets the new events, and none of the events the subscription had
/// settled while shared (a node's position as an instance would start at the oldest retained
/// event, and every app would get all of them).
#[test]
fn a_sidecar_subscription_turned_every_instance_starts_at_the_shared_cursor() {
    let (c, ups) = sidecar_events_cluster("ev-sidecar-unshare", |addr| audit_toml(addr, true));
    wait_subscription(&c, &c.apis(), "appAudit");
    let before: Vec<String> = (0..10)
        .map(|i| c.wait_for("an auditMe event accepted", PROGRESS, || publish(c.api(2), "auditMe", &json!({"i": i}), &[])).0)
        .collect();
    let received = |ups: &[EventsUpstream]| -> Result<Vec<String>, String> { Ok(ups.iter().map(|u| u.list("/events/received")).collect::<Result<Vec<_>, _>>()?.concat()) };
    c.wait_for("the shared events delivered and settled", DELIVERY, || {
        let got = received(&ups)?;
        let v = get_json(c.api(1), "/v1/subscriptions/appAudit")?;
        let end = get_json(c.api(1), "/v1/events?limit=1")?["end"].as_u64().unwrap_or(0);
        let missing = before.iter().filter(|id| !got.contains(id)).count();
        if missing == 0 && v["cursor"].as_u64() > Some(end) { Ok(()) } else { Err(format!("{missing} missing; {v}")) }
    });
    let counts_before: Vec<Vec<String>> = ups.iter().map(|u| u.list("/events/received").expect("received")).collect();
    roll_out_audit(&c, &ups, false);
    let after: Vec<String> = (10..13)
        .map(|i| c.wait_for("an auditMe event accepted", PROGRESS, || publish(c.api(3), "auditMe", &json!({"i": i}), &[])).0)
        .collect();
    for up in &ups {
        c.wait_for(&format!("{} got every new event", up.name), DELIVERY, || up.received_all(&after));
    }
    for (up, was) in ups.iter().zip(&counts_before) {
        let got = up.list("/events/received").expect("received");
        for id in &before {
            let (now, then) = (got.iter().filter(|g| *g == id).count(), was.iter().filter(|g| *g == id).count());
            assert_eq!(now, then, "{} got {id} again after the change: {got:?}", up.name);
        }
    }
}

/// An app that refuses connections has received nothing: a delivery to it is no attempt. With
/// `max_attempts = 1` and no health check (only the refusals can tell the node that the app is
/// down), a shared subscription's events go to the other apps and an every-instance
/// subscription's wait on the node whose app is dead, until it runs again; none is dead-lettered.
#[test]
fn deliveries_to_an_app_that_refuses_connections_count_no_attempt() {
    let (c, mut ups) = sidecar_events_cluster("ev-sidecar-refused", |addr| {
        format!(
            "[sidecar]\nupstream = \"http://{}\"\nhealth_interval_ms = 250\n\n\
             [[sidecar.subscriptions]]\nname = \"appOrders\"\nevent_name = \"orderPlaced\"\nmax_attempts = 1\npath = \"/events/orderPlaced\"\n\n\
             [[sidecar.subscriptions]]\nname = \"appAudit\"\nevent_name = \"auditMe\"\nshared = false\nmax_attempts = 1\npath = \"/events/audit\"\n",
            addr
        )
    });
    wait_subscription(&c, &c.apis(), "appOrders");
    wait_subscription(&c, &c.apis(), "appAudit");

    ups[0].process.kill();
    let publish_n = |name: &str, prefix: &str| -> Vec<String> {
        (0..12)
            .map(|i| {
                let api = c.api(1 + (i % 3) as u64);
                c.wait_for(&format!("a {name} event accepted"), PROGRESS, || publish(api, name, &json!({"id": format!("{prefix}-{i}")}), &[])).0
            })
            .collect()
    };
    let orders = publish_n("orderPlaced", "refused");
    let audits = publish_n("auditMe", "refused-audit");
    wait_delivered(&c, &ups[1..], &orders, "with up1 dead");
    for up in &ups[1..] {
        c.wait_for(&format!("{} audited every event", up.name), DELIVERY, || up.received_all(&audits));
    }
    for sub in ["appOrders", "appAudit"] {
        let dead = dead_letters(c.api(2), sub).expect("dead letters");
        assert!(dead.is_empty(), "{sub}: deliveries to the dead app counted as attempts: {dead:?}");
    }

    // Node 1 finds its app again by connecting, and audits what it missed.
    ups[0].process.start();
    poll_until("up1 /health", FORMATION, || ups[0].call("GET", "/health").map(|_| ()));
    c.wait_for("up1 audited every event once it runs again", DELIVERY, || ups[0].received_all(&audits));
    assert!(dead_letters(c.api(2), "appAudit").expect("dead letters").is_empty(), "nothing dead-lettered");
}

/// An event whose handler ends the process does not take the node down for good: each attempt
/// is noted on the node's disk before it runs, so after `max_attempts` restarts during the
/// same event it is dead-lettered there and the node goes on with the next; also for two such
/// events in a row. (The app holds the event, and the test SIGKILLs the node while it waits: as
/// a handler that aborts would.)
#[test]
fn an_event_that_ends_the_process_is_dead_lettered_after_its_attempts() {
    let (c, ups) = sidecar_events_cluster("ev-poison", |addr| {
        format!(
            "[sidecar]\nupstream = \"http://{}\"\n\n\
             [[sidecar.subscriptions]]\nname = \"appAudit\"\nevent_name = \"auditMe\"\nshared = false\n\
             max_attempts = 2\nack_deadline_ms = 60000\npath = \"/events/audit\"\n",
            addr
        )
    });
    wait_subscription(&c, &c.apis(), "appAudit");

    // Two in a row: the second must not wipe out the first's count (nor the first's dead
    // letter, which a kill during the second would lose if it were not committed first).
    let poison: Vec<String> = (0..2)
        .map(|i| c.wait_for("a poison event accepted", PROGRESS, || publish(c.api(2), "auditMe", &json!({"hold": true, "i": i}), &[])).0)
        .collect();
    let held = |up: &EventsUpstream, id: &str| -> usize { up.list("/events/held").map_or(0, |ids| ids.iter().filter(|h| *h == id).count()) };
    for id in &poison {
        for attempt in 1..=2 {
            c.wait_for(&format!("node 1's app holding poison event {id} (attempt {attempt})"), DELIVERY, || {
                match held(&ups[0], id) {
                    n if n == attempt => Ok(()),
                    n => Err(format!("held {n} times; all held: {:?}", ups[0].list("/events/held"))),
                }
            });
            c.kill(1);
            c.restart(1);
        }
        c.wait_for(&format!("node 1 to dead-letter poison event {id}"), DELIVERY, || {
            let dead = dead_letters(c.api(2), "appAudit")?;
            if dead.iter().any(|d| d["eventId"].as_str() == Some(id.as_str()) && d["node"] == json!(1)) {
                Ok(())
            } else {
                Err(format!("dead letters: {dead:?}"))
            }
        });
    }
    // And goes on: the next event reaches its app, and the poison was not handed out a third time.
    let (next, _) = c.wait_for("an auditMe event accepted", PROGRESS, || publish(c.api(2), "auditMe", &json!({"i": 1}), &[]));
    c.wait_for("node 1's app to get the next event", DELIVERY, || {
        let got = ups[0].list("/events/received")?;
        if got.contains(&next) { Ok(()) } else { Err(format!("received {got:?}")) }
    });
    for id in &poison {
        assert_eq!(held(&ups[0], id), 2, "poison event {id} was delivered again after its attempts");
    }
    for up in &ups {
        up.call("POST", "/admin/release").expect("release");
    }
}

/// Node `id`'s sidecar app on `port` (its log in `dir`) and the flags that make the node
/// consume the shared subscription `sub` (events `event`, `max_attempts`, a 60 s ack deadline)
/// through it.
fn app_consuming(dir: &Path, id: u64, port: SocketAddr, sub: &str, event: &str, max_attempts: u32) -> (EventsUpstream, Vec<String>) {
    let up = EventsUpstream::spawn(dir, &format!("up{id}"), port);
    let config = dir.join(format!("n{id}-sidecar.toml"));
    let toml = format!(
        "[sidecar]\nupstream = \"http://{}\"\n\n\
         [[sidecar.subscriptions]]\nname = \"{sub}\"\nevent_name = \"{event}\"\n\
         max_attempts = {max_attempts}\nack_deadline_ms = 60000\npath = \"/events/audit\"\n",
        up.addr
    );
    fs::write(&config, toml).unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
    (up, vec!["--config".to_string(), config.display().to_string()])
}

/// A one-node cluster whose node consumes the shared subscription `sub` (see `app_consuming`)
/// through its app, ready and registered.
fn lone_node_with_app(name: &str, sub: &str, event: &str, max_attempts: u32) -> (Cluster, EventsUpstream) {
    let port = free_loopback_ports(1)[0];
    let ups = std::cell::RefCell::new(Vec::new());
    let (c, _) = Cluster::formed_with(name, 1, &[], |dir, id| {
        let (up, flags) = app_consuming(dir, id, port, sub, event, max_attempts);
        ups.borrow_mut().push(up);
        flags
    });
    c.wait_all_ready(FORMATION);
    wait_subscription(&c, &c.apis(), sub);
    (c, ups.into_inner().pop().expect("the node's app"))
}

/// A shared subscription's event whose handler ends the process of the node that handed it
/// to itself (the leader: here the only node) is counted as an attempt too: the node notes
/// the deliveries it runs for itself on its disk, and after a restart has the unfinished ones
/// counted as failed, so after `max_attempts` restarts the event is dead-lettered and the next
/// one delivered. (The app holds the event, and the test SIGKILLs the node while it waits.)
#[test]
fn a_shared_event_that_ends_the_leaders_process_is_dead_lettered_after_its_attempts() {
    let (c, up) = lone_node_with_app("ev-poison-shared", "appShared", "sharedPoison", 2);
    let ups = [up];
    let (poison, _) = c.wait_for("a poison event accepted", PROGRESS, || publish(c.api(1), "sharedPoison", &json!({"hold": true}), &[]));
    let held = |id: &str| -> usize { ups[0].list("/events/held").map_or(0, |ids| ids.iter().filter(|h| *h == id).count()) };
    for attempt in 1..=2 {
        c.wait_for(&format!("the app holding the poison event (attempt {attempt})"), DELIVERY, || match held(&poison) {
            n if n == attempt => Ok(()),
            n => Err(format!("held {n} times; all held: {:?}", ups[0].list("/events/held"))),
        });
        c.kill(1);
        c.restart(1);
    }
    c.wait_for("the poison event dead-lettered", DELIVERY, || {
        let dead = dead_letters(c.api(1), "appShared")?;
        if dead.iter().any(|d| d["eventId"].as_str() == Some(poison.as_str())) { Ok(()) } else { Err(format!("dead letters: {dead:?}")) }
    });
    let (next, _) = c.wait_for("a sharedPoison event accepted", PROGRESS, || publish(c.api(1), "sharedPoison", &json!({"i": 1}), &[]));
    c.wait_for("the app to get the next event", DELIVERY, || {
        let got = ups[0].list("/events/received")?;
        if got.contains(&next) { Ok(()) } else { Err(format!("received {got:?}")) }
    });
    assert_eq!(held(&poison), 2, "the poison event was delivered again after its attempts");
    ups[0].call("POST", "/admin/release").expect("release");
}

/// A consumer node stopped gracefully while its handler runs a shared delivery costs the event
/// no attempt: the node answers the delivery "not served" at its broker's stop, before its
/// links close (the leader counted the closed link as a failed attempt, so every rolling
/// restart cost slow handlers an attempt each), and the event goes to another consumer. The
/// leader's own app is down, so the delivery goes to a follower's app, which holds it.
#[test]
fn a_consumer_stopped_gracefully_during_a_handler_costs_no_attempt() {
    let (c, mut ups) = sidecar_events_cluster("ev-drain-shared", |addr| {
        format!(
            "[sidecar]\nupstream = \"http://{addr}\"\n\n\
             [[sidecar.subscriptions]]\nname = \"appDrain\"\nevent_name = \"drainMe\"\n\
             max_attempts = 5\nack_deadline_ms = 60000\npath = \"/events/audit\"\n"
        )
    });
    wait_subscription(&c, &c.apis(), "appDrain");
    let leader = c.wait_for_leader(FORMATION);
    ups[leader as usize - 1].process.kill();
    let (id, position) = c.wait_for("an event accepted", PROGRESS, || publish(c.api(leader), "drainMe", &json!({"hold": true}), &[]));
    let held_by = |ups: &[EventsUpstream]| -> Vec<u64> {
        (1..=3u64).filter(|n| ups[*n as usize - 1].list("/events/held").is_ok_and(|h| h.contains(&id))).collect()
    };
    let holder = c.wait_for("a follower's app holding the event", DELIVERY, || match held_by(&ups).as_slice() {
        [one] => Ok(*one),
        other => Err(format!("held by {other:?}")),
    });
    assert_ne!(holder, leader);
    c.allow_exit(holder);
    c.signal(holder, "TERM");
    c.wait_for("the event handed to the other follower's app", DELIVERY, || match held_by(&ups).as_slice() {
        [a, b] if *a != leader && *b != leader => Ok(()),
        other => Err(format!("held by {other:?}")),
    });
    let subs = get_json(c.api(leader), "/v1/subscriptions").expect("subscriptions");
    let ours = subs["subscriptions"].as_array().and_then(|all| all.iter().find(|s| s["name"] == "appDrain")).cloned().expect("appDrain listed");
    assert_eq!(ours["retrying"], 0, "no attempt counted for the handler the drain cut off: {ours}");
    for (i, up) in ups.iter().enumerate() {
        if i as u64 + 1 != leader {
            let _ = up.call("POST", "/admin/release");
        }
    }
    c.wait_for("the event acked", DELIVERY, || {
        let subs = get_json(c.api(leader), "/v1/subscriptions")?;
        let ours = subs["subscriptions"].as_array().and_then(|all| all.iter().find(|s| s["name"] == "appDrain")).cloned().ok_or("appDrain")?;
        if ours["cursor"].as_u64().is_some_and(|c| c > position) && ours["retrying"] == 0 { Ok(()) } else { Err(format!("{ours}")) }
    });
    assert!(dead_letters(c.api(leader), "appDrain").expect("dead letters").is_empty());
}

/// A cluster of three whose node 3 alone consumes the shared subscription `appCut` (events
/// `cutMe`) through its sidecar app, and is not the leader: the events of one batch publish go
/// to it in one delivery. (cluster, node 3's app, leader)
fn one_remote_consumer(name: &str) -> (Cluster, EventsUpstream, u64) {
    let port = free_loopback_ports(1)[0];
    let ups = std::cell::RefCell::new(Vec::new());
    let (c, _) = Cluster::formed_with(name, 3, &[], |dir, id| {
        if id != 3 {
            return Vec::new();
        }
        let (up, flags) = app_consuming(dir, id, port, "appCut", "cutMe", 5);
        ups.borrow_mut().push(up);
        flags
    });
    c.wait_all_ready(FORMATION);
    let up = ups.into_inner().pop().expect("node 3's app");
    // The consumer must be a follower: its deliveries cross a link.
    for _ in 0..5 {
        if c.wait_for_leader(FORMATION) != 3 {
            break;
        }
        c.terminate(3);
        c.restart(3);
        c.wait_ready(3);
    }
    let leader = c.wait_for_leader(FORMATION);
    assert_ne!(leader, 3, "node 3 stayed the leader");
    wait_subscription(&c, &c.apis(), "appCut");
    (c, up, leader)
}

/// `POST /v1/events` of `payloads` as `cutMe` events at `api`, which must answer 201: (id,
/// position) of each.
fn publish_cut_batch(api: Api, payloads: &[Value]) -> Vec<(String, u64)> {
    let batch: Vec<Value> = payloads.iter().map(|p| json!({"eventName": "cutMe", "payload": p})).collect();
    let resp = api.request("POST", "/v1/events", &[], Value::Array(batch).to_string().as_bytes()).expect("POST /v1/events");
    assert_eq!(resp.status, 201, "{}", resp.describe());
    let acked = resp.json().expect("JSON");
    acked["events"].as_array().expect("events").iter().map(|v| id_position(v).expect("id, position")).collect()
}

/// `appCut` as the leader sees it.
fn cut_summary(c: &Cluster, leader: u64) -> Result<Value, String> {
    let subs = get_json(c.api(leader), "/v1/subscriptions")?;
    subs["subscriptions"].as_array().and_then(|all| all.iter().find(|s| s["name"] == "appCut")).cloned().ok_or_else(|| "appCut not listed".to_string())
}

/// One slow handler does not hold the acks of the other events of its batch: the consumer
/// answers for those that ended and is asked for the slow one later.
#[test]
fn a_slow_handler_does_not_hold_the_acks_of_its_batch() {
    let (c, up, leader) = one_remote_consumer("ev-slow-batch");
    slow_handler_in_a_batch(&c, &up, leader);
}

/// The same on the leader's own consumer: a one-node cluster hands its events to itself, and
/// settles each handler's event as it ends.
#[test]
fn a_slow_handler_on_the_leader_does_not_hold_the_acks_of_its_batch() {
    let (c, up) = lone_node_with_app("ev-slow-local", "appCut", "cutMe", 5);
    slow_handler_in_a_batch(&c, &up, 1);
}

/// A batch of a held event, a quick one and one of 200 ms to `appCut`: the two are acked while
/// the first is held, then all three once it is released, each run once.
fn slow_handler_in_a_batch(c: &Cluster, up: &EventsUpstream, leader: u64) {
    let events = publish_cut_batch(c.api(leader), &[json!({"hold": true}), json!({"i": 1}), json!({"sleepMs": 200, "i": 2})]);
    let (held, first) = (events[0].0.clone(), events[0].1);
    c.wait_for("the two other events acked while the first is held", DELIVERY, || {
        let ours = cut_summary(c, leader)?;
        if ours["cursor"].as_u64() == Some(first) && ours["doneAhead"] == 2 { Ok(()) } else { Err(format!("{ours}")) }
    });
    assert_eq!(up.list("/events/held").expect("held"), vec![held], "the first is still held, once");
    up.call("POST", "/admin/release").expect("release");
    wait_cut_all_acked(c, leader, events[2].1);
    let received = up.list("/events/received").expect("received");
    for (id, _) in &events {
        assert_eq!(received.iter().filter(|r| *r == id).count(), 1, "{id} ran once: {received:?}");
    }
}

/// Waits until `appCut`'s cursor passed `last` with nothing retrying.
fn wait_cut_all_acked(c: &Cluster, leader: u64, last: u64) {
    c.wait_for("all acked", DELIVERY, || {
        let ours = cut_summary(c, leader)?;
        if ours["cursor"].as_u64().is_some_and(|c| c > last) && ours["retrying"] == 0 { Ok(()) } else { Err(format!("{ours}")) }
    });
}

/// A consumer node stopped gracefully during a batch keeps the outcomes of the batch's events
/// that finished within the drain's grace: only the event whose handler was cut off is handed
/// out again (no attempt counted), the finished ones are not (they were handed out again with
/// the cut one).
#[test]
fn a_batch_cut_by_a_consumers_drain_hands_out_again_only_the_cut_event() {
    let (c, up, leader) = one_remote_consumer("ev-drain-batch");
    // The second is answered early (at 100 ms), the third ends while node 3 drains, and the
    // first is cut off by the drain: both are asked for by the leader until the links close.
    let events = publish_cut_batch(c.api(leader), &[json!({"hold": true}), json!({"sleepMs": 50, "i": 1}), json!({"sleepMs": 1500, "i": 2})]);
    let (held, finished) = (events[0].0.clone(), [events[1].0.clone(), events[2].0.clone()]);
    c.wait_for("node 3's app holding the first event", DELIVERY, || {
        let got = up.list("/events/held")?;
        if got.contains(&held) { Ok(()) } else { Err(format!("held {got:?}")) }
    });
    // Stopped while the held one and the slow one run: the slow one ends within the grace.
    c.allow_exit(3);
    c.terminate(3);
    let received = up.list("/events/received").expect("received");
    for id in &finished {
        assert_eq!(received.iter().filter(|r| *r == id).count(), 1, "{id} ran once before the stop: {received:?}");
    }
    c.restart(3);
    c.wait_for("the cut event handed to node 3's app again", DELIVERY, || {
        let got = up.list("/events/held")?;
        if got.iter().filter(|h| **h == held).count() == 2 { Ok(()) } else { Err(format!("held {got:?}")) }
    });
    let ours = cut_summary(&c, leader).expect("appCut");
    assert_eq!(ours["retrying"], 0, "no attempt counted for the handler the drain cut off: {ours}");
    up.call("POST", "/admin/release").expect("release");
    wait_cut_all_acked(&c, leader, events[2].1);
    let received = up.list("/events/received").expect("received");
    for id in &finished {
        assert_eq!(received.iter().filter(|r| *r == id).count(), 1, "{id} was handed out again after it finished: {received:?}");
    }
    assert!(dead_letters(c.api(leader), "appCut").expect("dead letters").is_empty());
}

/// With `--dedup-max-keys 40`, 120 keyed events leave only about the newest 40 keys in the
/// dedup set: a repeat of a recent key still gets its original id and position, a repeat of
/// the oldest key is a new event, and the leader counts the shortened window.
#[test]
fn producer_keys_past_their_bound_forget_the_oldest_first() {
    let (c, leader) = Cluster::formed("ev-dedup-bound", 3, &["--dedup-max-keys", "40"]);
    c.wait_all_ready(FORMATION);
    let api = c.api(leader);
    let firsts: Vec<(String, u64)> = (0..120)
        .map(|i| publish_keyed(&c, api, "bounded", &json!({"i": i}), &format!("bound-{i}")))
        .collect();
    let recent = publish_keyed(&c, api, "bounded", &json!({"i": 119}), "bound-119");
    assert_eq!(recent, firsts[119], "a recent key is still deduplicated");
    let recent = publish_keyed(&c, api, "bounded", &json!({"i": 90}), "bound-90");
    assert_eq!(recent, firsts[90], "the newest 40 keys are kept");
    let oldest = publish_keyed(&c, api, "bounded", &json!({"i": 0, "again": true}), "bound-0");
    assert_ne!(oldest, firsts[0], "the oldest key was forgotten: its repeat is a new event");
    assert!(oldest.1 > firsts[119].1, "appended after the others: {oldest:?}");
    let shortened: f64 = c
        .apis()
        .iter()
        .map(|api| api.metric("raftbridge_dedup_window_shortened_total", &["kind=\"events\""]).unwrap_or_else(|e| panic!("{e}")))
        .sum();
    assert!(shortened > 0.0, "the shortened window is counted");
}

/// `GET /v1/events?after=N&wait=..` at the end of the log waits for the next event it asks
/// for (woken by a publish on another node, skipping events its `eventName` leaves out), and
/// answers the empty page with `next` when the wait is over.
#[test]
fn a_read_at_the_end_of_the_log_waits_for_the_next_event() {
    let (c, _) = Cluster::formed("ev-wait", 3, &[]);
    c.wait_all_ready(FORMATION);
    let (_, last) = publish(c.api(1), "before", &json!({"n": 0}), &[]).expect("publish");
    c.wait_caught_up(&c.ids(), CATCH_UP);
    // Nothing more: the empty page at the end of the wait, `next` at the end of the log.
    let started = std::time::Instant::now();
    let idle = get_json(c.api(3), &format!("/v1/events?after={last}&wait=300ms")).expect("idle poll");
    assert!(started.elapsed() >= Duration::from_millis(250), "it waited: {:?}", started.elapsed());
    assert_eq!((idle["events"].as_array().map(Vec::len), idle["next"].as_u64()), (Some(0), Some(last)), "{idle}");
    // A poll on node 3 for `wanted` only, woken by node 1's publishes.
    let addr = c.api(3).addr;
    let path = format!("/v1/events?after={last}&eventName=wanted&wait=50s");
    let poll = thread::spawn(move || http::request(addr, "GET", &path, &[], b"", Duration::from_secs(60)));
    c.wait_until("the read to wait", Duration::from_secs(20), || c.api(3).metric("raftbridge_long_polls", &[]).is_ok_and(|v| v >= 1.0));
    let started = std::time::Instant::now();
    publish(c.api(1), "other", &json!({"n": 1}), &[]).expect("publish other");
    let (_, wanted) = publish(c.api(1), "wanted", &json!({"n": 2}), &[]).expect("publish wanted");
    let resp = poll.join().expect("poll thread").expect("the poll answers");
    assert!(started.elapsed() < Duration::from_secs(40), "woken by the publish, not the wait's end");
    let page: Value = resp.json().unwrap_or_else(|e| panic!("{e}: {}", resp.describe()));
    let got: Vec<(String, u64)> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| (e["eventName"].as_str().unwrap_or("").to_string(), e["position"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(got, vec![("wanted".to_string(), wanted)], "{page}");
    assert_eq!(page["next"].as_u64(), Some(wanted));
    assert_json_error(
        &c.api(2).request("GET", "/v1/events?wait=soon", &[], b"").expect("request"),
        400,
        "a wait that is no duration",
    );
}

/// A node whose build takes no forwarded answers (feature bit 16384 withheld through the test
/// hook, as a build from before forwarding) is not sent them: an answer on another node to what
/// a client fetched there comes back unknown, with a message to answer there, where it is taken.
#[test]
fn an_answer_for_a_node_without_forwarding_is_left_to_that_node() {
    const PULL_FORWARD: u64 = 16384;
    let mut c = Cluster::new("ev-pull-old", 3, &[]);
    for id in c.ids() {
        let config = c.dir().join(format!("n{id}-pull.toml"));
        fs::write(&config, "[pull]\n[[pull.subscriptions]]\nname = \"oldJobs\"\nevent_name = \"oldJob\"\n").unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        c.add_node_flags(id, &["--config".to_string(), config.display().to_string()]);
    }
    c.set_env(2, "RAFTBRIDGE_TEST_WITHHOLD_FEATURES", &PULL_FORWARD.to_string());
    c.start_all();
    c.wait_for_membership(&c.ids(), &[], FORMATION);
    c.wait_all_ready(FORMATION);
    let (_, position) = c.wait_for("a job accepted", PROGRESS, || publish(c.api(1), "oldJob", &json!({"old": 1}), &[]));
    let post = |api: Api, path: &str, body: &Value| api.request("POST", path, &[], body.to_string().as_bytes()).expect("POST");
    let got = c.wait_for("the job fetched from node 2", DELIVERY, || {
        let resp = post(c.api(2), "/v1/subscriptions/oldJobs/fetch?wait=5s", &json!(null));
        let messages = resp.json()?["messages"].as_array().cloned().ok_or_else(|| resp.describe())?;
        messages.into_iter().next().ok_or_else(|| "nothing yet".to_string())
    });
    assert_eq!(got["position"].as_u64(), Some(position), "{got}");
    let ids = json!({"ackIds": [got["ackId"]]});
    let elsewhere = post(c.api(1), "/v1/subscriptions/oldJobs/ack", &ids);
    let a = elsewhere.json().unwrap_or_else(|e| panic!("{e}: {}", elsewhere.describe()));
    assert_eq!((a["acked"].as_u64(), &a["unknown"]), (Some(0), &json!([got["ackId"]])), "{a}");
    assert!(a["message"].as_str().is_some_and(|m| m.contains("node 2") && m.contains("older build")), "{a}");
    let there = post(c.api(2), "/v1/subscriptions/oldJobs/ack", &ids);
    assert_eq!(there.json().unwrap(), json!({"acked": 1, "unknown": []}), "{}", there.describe());
    c.wait_for("the job settled", DELIVERY, || {
        let at = cursor(c.api(3), "oldJobs")?;
        if at > position { Ok(()) } else { Err(format!("cursor {at}")) }
    });
}

/// Three nodes that consume the pull subscription `cutJobs` (events `cutJob`, a 120 s ack
/// deadline), formed: the cluster, its leader and another node, where clients fetch.
fn pull_cut_cluster(name: &str) -> (Cluster, u64, u64) {
    let mut c = Cluster::new(name, 3, &[]);
    for id in c.ids() {
        let config = c.dir().join(format!("n{id}-pull.toml"));
        let toml = "[pull]\n[[pull.subscriptions]]\nname = \"cutJobs\"\nevent_name = \"cutJob\"\nack_deadline_ms = 120000\n";
        fs::write(&config, toml).unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        c.add_node_flags(id, &["--config".to_string(), config.display().to_string()]);
    }
    c.start_all();
    c.wait_for_membership(&c.ids(), &[], FORMATION);
    c.wait_all_ready(FORMATION);
    let leader = c.wait_for_leader(FORMATION);
    let consumer = c.ids().into_iter().find(|id| *id != leader).expect("three nodes");
    (c, leader, consumer)
}

/// Waits until node `consumer`'s link to the stopped `leader` is closed.
fn wait_link_closed(c: &Cluster, consumer: u64, leader: u64) {
    c.wait_for("the consumer's link to the stopped leader closed", CATCH_UP, || {
        let status = c.api(consumer).status()?;
        match status.member(leader) {
            Some(m) if !m.reachable => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

/// The same for events handed over together (one `DeliverBatch`): once one is acked the batch
/// is answered early, and the leader asks for the rest over the link. When the leader stops
/// and that ask's link closes, it has given up on the rest: their leases end too (their
/// handlers ran on to the ack deadline, and an ack was "acked" for an event handed out again).
#[test]
fn a_pull_batchs_leases_end_when_the_leaders_ask_fails() {
    let (c, leader, consumer) = pull_cut_cluster("ev-pull-cut-batch");
    let post = |api: Api, path: &str, body: &str| api.request("POST", path, &[], body.as_bytes()).expect("POST");
    let batch = json!([{"eventName": "cutJob", "payload": {"n": 1}}, {"eventName": "cutJob", "payload": {"n": 2}}, {"eventName": "cutJob", "payload": {"n": 3}}]);
    let published = post(c.api(consumer), "/v1/events", &batch.to_string());
    assert_eq!(published.status, 201, "{}", published.describe());
    let mut held: Vec<Value> = Vec::new();
    c.wait_for("the three jobs fetched", DELIVERY, || {
        let resp = post(c.api(consumer), "/v1/subscriptions/cutJobs/fetch?max=3&wait=5s", "null");
        held.extend(resp.json()?["messages"].as_array().cloned().ok_or_else(|| resp.describe())?);
        if held.len() >= 3 { Ok(()) } else { Err(format!("{} fetched", held.len())) }
    });
    let ack = |m: &Value| post(c.api(consumer), "/v1/subscriptions/cutJobs/ack", &json!({"ackIds": [m["ackId"]]}).to_string());
    let first = ack(&held[0]);
    assert_eq!(first.json().unwrap_or_else(|e| panic!("{e}: {}", first.describe())), json!({"acked": 1, "unknown": []}));
    c.signal(leader, "STOP");
    wait_link_closed(&c, consumer, leader);
    let late: Vec<Value> = held[1..].iter().map(|m| ack(m).json().unwrap_or_else(|e| panic!("{e}"))).collect();
    c.signal(leader, "CONT");
    for (m, a) in held[1..].iter().zip(&late) {
        assert_eq!((a["acked"].as_u64(), &a["unknown"]), (Some(0), &json!([m["ackId"]])), "{a}");
    }
    // Handed out again and acked: the subscription passes all three.
    let last = held.iter().filter_map(|m| m["position"].as_u64()).max().expect("positions");
    c.wait_for("the rest fetched again and acked", DELIVERY, || {
        let resp = post(c.api(consumer), "/v1/subscriptions/cutJobs/fetch?max=3&wait=2s", "null");
        let again = resp.json()?["messages"].as_array().cloned().unwrap_or_default();
        let ids: Vec<Value> = again.iter().map(|m| m["ackId"].clone()).collect();
        if !ids.is_empty() {
            post(c.api(consumer), "/v1/subscriptions/cutJobs/ack", &json!({ "ackIds": ids }).to_string());
        }
        let at = cursor(c.api(consumer), "cutJobs")?;
        if at > last { Ok(()) } else { Err(format!("cursor {at}")) }
    });
}

/// A pull client's lease lasts only while the leader that handed the event to its node still
/// waits for the answer. The leader stops answering (SIGSTOP) until its link to the consumer's
/// node closes: the leader has given up on that delivery then (its request failed with the
/// link) and hands the event out again, so an ack of the old lease is answered unknown, not
/// "acked" (it was, and the event came again). The event is then fetched again and acked once.
#[test]
fn a_pull_lease_ends_when_the_leaders_link_closes() {
    let (c, leader, consumer) = pull_cut_cluster("ev-pull-cut");
    // Keys out of order and a number past 64-bit floats: a fetch serves the payload as sent.
    let payload = r#"{"z":1,"a":2,"big":123456789012345678901234567890,"f":0.1000000000000000000001}"#;
    let position = c.wait_for("a job accepted", PROGRESS, || {
        let resp = c.api(consumer).request("POST", "/v1/events/cutJob", &[], payload.as_bytes()).map_err(|e| e.to_string())?;
        if resp.status != 201 {
            return Err(resp.describe());
        }
        resp.json()?["position"].as_u64().ok_or_else(|| resp.describe())
    });
    let post = |api: Api, path: &str, body: &Value| api.request("POST", path, &[], body.to_string().as_bytes()).expect("POST");
    let fetch = || -> Result<Value, String> {
        let resp = post(c.api(consumer), "/v1/subscriptions/cutJobs/fetch?wait=5s", &json!(null));
        let messages = resp.json()?["messages"].as_array().cloned().ok_or_else(|| resp.describe())?;
        let first = messages.into_iter().next().ok_or_else(|| "nothing yet".to_string())?;
        // The answer's text, not its parse (a `Value` loses what is checked).
        let text = resp.text();
        assert!(text.contains(&format!(r#""payload":{payload}"#)), "{text}");
        Ok(first)
    };
    let got = c.wait_for("the job fetched from the consumer", DELIVERY, fetch);
    assert_eq!(got["position"].as_u64(), Some(position), "{got}");
    c.signal(leader, "STOP");
    wait_link_closed(&c, consumer, leader);
    let ids = json!({"ackIds": [got["ackId"]]});
    let late = post(c.api(consumer), "/v1/subscriptions/cutJobs/ack", &ids);
    let a = late.json().unwrap_or_else(|e| panic!("{e}: {}", late.describe()));
    c.signal(leader, "CONT");
    assert_eq!((a["acked"].as_u64(), &a["unknown"]), (Some(0), &json!([got["ackId"]])), "{a}");
    // Handed out again (by whichever node leads now), fetched and acked once.
    let again = c.wait_for("the job fetched again", DELIVERY, fetch);
    assert_eq!(again["position"].as_u64(), Some(position), "{again}");
    let acked = post(c.api(consumer), "/v1/subscriptions/cutJobs/ack", &json!({"ackIds": [again["ackId"]]}));
    assert_eq!(acked.json().unwrap_or_else(|e| panic!("{e}: {}", acked.describe())), json!({"acked": 1, "unknown": []}));
    c.wait_for("the job settled", DELIVERY, || {
        let at = cursor(c.api(consumer), "cutJobs")?;
        if at > position { Ok(()) } else { Err(format!("cursor {at}")) }
    });
}

/// A pull subscription (`[pull]` in the config): a client fetches events over HTTP from a node
/// that consumes it and acks or nacks each there. Events published before any fetch wait
/// (durable) and come once a client pulls; a nacked event is fetched again, then
/// dead-lettered with the client's reason after its attempts; one fetched and never answered
/// comes again after its ack deadline; every other event is acked, each once by content. A
/// node without it answers 404, and answers to ids it does not hold say so.
#[test]
fn a_pull_subscription_is_fetched_acked_and_nacked_over_http() {
    let (c, _) = Cluster::formed_with("ev-pull", 3, &[], |dir, id| {
        if id == 3 {
            return Vec::new();
        }
        let config = dir.join(format!("n{id}-pull.toml"));
        let toml = "[pull]\n[[pull.subscriptions]]\nname = \"pullJobs\"\nevent_name = \"job\"\nmax_attempts = 2\nack_deadline_ms = 10000\n\
                    [[pull.subscriptions]]\nname = \"pullIdle\"\nevent_name = \"idleJob\"\n";
        fs::write(&config, toml).unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        vec!["--config".to_string(), config.display().to_string()]
    });
    c.wait_all_ready(FORMATION);
    wait_subscription(&c, &c.apis(), "pullJobs");
    // Published before anyone pulls `pullIdle`: it waits for a client, not for its attempts.
    let (_, idle_position) = c.wait_for("an idle job accepted", PROGRESS, || publish(c.api(3), "idleJob", &json!({"idle": 1}), &[]));
    let published: Vec<u64> = (0..20)
        .map(|n| c.wait_for("a job accepted", PROGRESS, || publish(c.api(1 + n % 3), "job", &json!({"n": n}), &[])).1)
        .collect();
    let post = |api: Api, path: &str, body: &Value| api.request("POST", path, &[], body.to_string().as_bytes()).expect("POST");
    let fetch = |api: Api| -> Result<Vec<Value>, String> {
        let resp = post(api, "/v1/subscriptions/pullJobs/fetch?max=8&wait=2s", &json!(null));
        if resp.status != 200 {
            return Err(resp.describe());
        }
        resp.json()?["messages"].as_array().cloned().ok_or_else(|| resp.describe())
    };
    let answer = |what: &str, ids: &[String], reason: Option<&str>| -> Value {
        let mut body = json!({ "ackIds": ids });
        if let Some(r) = reason {
            body["reason"] = json!(r);
        }
        let resp = post(c.api(1), &format!("/v1/subscriptions/pullJobs/{what}"), &body);
        assert_eq!(resp.status, 200, "{what}: {}", resp.describe());
        resp.json().unwrap()
    };
    // n = 3 is nacked at every fetch; n = 5 is left unanswered the first time.
    let mut acked: BTreeMap<u64, usize> = BTreeMap::new();
    let mut fetched_3 = 0;
    let mut fetched_7 = 0;
    let mut fetched_5 = 0;
    c.wait_for("every job but the nacked one acked through node 1", DELIVERY, || {
        let messages = fetch(c.api(1))?;
        let mut acks = Vec::new();
        for m in &messages {
            let id = m["ackId"].as_str().ok_or("no ackId")?.to_string();
            let n = m["event"]["payload"]["n"].as_u64().ok_or_else(|| format!("no job number: {m}"))?;
            assert_eq!(m["position"].as_u64(), Some(published[n as usize]), "{m}");
            assert_eq!(m["event"]["eventName"], "job", "{m}");
            match n {
                3 => {
                    fetched_3 += 1;
                    let a = answer("nack", &[id], Some("bad job"));
                    assert_eq!(a["nacked"], 1, "{a}");
                }
                7 => {
                    fetched_7 += 1;
                    let a = answer("term", &[id], Some("never"));
                    assert_eq!(a["terminated"], 1, "{a}");
                }
                5 if fetched_5 == 0 => fetched_5 += 1,
                _ => {
                    if n == 5 {
                        fetched_5 += 1;
                    }
                    *acked.entry(n).or_default() += 1;
                    acks.push(id);
                }
            }
        }
        if !acks.is_empty() {
            let a = answer("ack", &acks, None);
            assert_eq!((a["acked"].as_u64(), a["unknown"].as_array().map(Vec::len)), (Some(acks.len() as u64), Some(0)), "{a}");
        }
        let want: BTreeSet<u64> = (0..20).filter(|n| *n != 3 && *n != 7).collect();
        if acked.keys().copied().collect::<BTreeSet<u64>>() == want { Ok(()) } else { Err(format!("acked so far: {acked:?}")) }
    });
    assert!(acked.values().all(|n| *n == 1), "each job acked once: {acked:?}");
    assert_eq!(fetched_5, 2, "the unanswered job came again after its ack deadline");
    let letter = c.wait_for("the nacked job dead-lettered", DEAD_LETTER, || {
        dead_letters(c.api(3), "pullJobs")?
            .into_iter()
            .find(|d| d["position"].as_u64() == Some(published[3]))
            .ok_or_else(|| format!("fetched {fetched_3} times; no dead letter yet"))
    });
    assert!(letter["reason"].as_str().is_some_and(|r| r.contains("nacked by the client: bad job")), "{letter}");
    assert_eq!(letter["attempts"].as_u64(), Some(2), "{letter}");
    // Job 7, terminated at its first fetch: dead-lettered after that one attempt, never again.
    let letter = c.wait_for("the terminated job dead-lettered", DEAD_LETTER, || {
        dead_letters(c.api(2), "pullJobs")?.into_iter().find(|d| d["position"].as_u64() == Some(published[7])).ok_or_else(|| "no dead letter yet".to_string())
    });
    assert!(letter["reason"].as_str().is_some_and(|r| r.contains("terminated by the client: never")), "{letter}");
    assert_eq!((letter["attempts"].as_u64(), fetched_7), (Some(1), 1), "{letter}");
    c.wait_for("the cursor past every job", DELIVERY, || {
        let at = cursor(c.api(2), "pullJobs")?;
        if at > published[19] { Ok(()) } else { Err(format!("cursor {at}")) }
    });

    // Only the subscription fetched, and only where it is fetched, is offered: `pullIdle`'s
    // event was not handed out meanwhile (no attempt, no dead letter, its cursor before it).
    let offered = |sub: &str| -> Result<(Value, Value), String> {
        let v = get_json(c.api(3), &format!("/v1/subscriptions/{sub}"))?;
        Ok((v["declaredBy"].clone(), v["offeredBy"].clone()))
    };
    assert_eq!(offered("pullJobs").unwrap(), (json!([1, 2]), json!([1])));
    assert_eq!(offered("pullIdle").unwrap(), (json!([1, 2]), json!([])));
    let idle = get_json(c.api(1), "/v1/subscriptions/pullIdle").unwrap();
    assert!(idle["cursor"].as_u64().is_some_and(|at| at <= idle_position) && idle["retrying"] == 0 && idle["deadLetters"] == 0, "{idle}");
    // A client that pulls it on node 2 gets it there (a cold fetch waits for the registration).
    let got = c.wait_for("the idle job fetched from node 2", DELIVERY, || {
        let resp = post(c.api(2), "/v1/subscriptions/pullIdle/fetch?wait=5s", &json!(null));
        let messages = resp.json()?["messages"].as_array().cloned().ok_or_else(|| resp.describe())?;
        messages.into_iter().next().ok_or_else(|| "nothing yet".to_string())
    });
    assert_eq!((got["position"].as_u64(), &got["event"]["payload"]), (Some(idle_position), &json!({"idle": 1})), "{got}");
    c.wait_for("node 2 offering pullIdle on node 3's copy", PROGRESS, || match offered("pullIdle")?.1 {
        v if v == json!([2]) => Ok(()),
        v => Err(format!("offered by {v}")),
    });
    let ack = post(c.api(2), "/v1/subscriptions/pullIdle/ack", &json!({"ackIds": [got["ackId"]]}));
    assert_eq!(ack.json().unwrap()["acked"], 1, "{}", ack.describe());

    // The same from a shell: `raftbridge events fetch` from node 1, then `ack` on node 3
    // (which consumes no pull subscription) or `nack` on node 2: each forwards its answer to
    // node 1, which holds the leases.
    let cli_on = |node: u64, name: &str, args: &[&str]| -> (bool, String) {
        let addr = c.api(node).addr.to_string();
        let mut full = args.to_vec();
        full.extend_from_slice(&["--http-addr", &addr]);
        let ok = c.run_cli(name, &full, Duration::from_secs(60)).success();
        (ok, fs::read_to_string(c.dir().join(format!("{name}.cli.log"))).expect("the command's output"))
    };
    let mut by_cli = Vec::new();
    // Each answered right after its fetch (the lease lasts the 10 s ack deadline).
    // The term before the nack: the nacked job comes again, and would be in a later fetch.
    for (n, answer_it) in [(100, ["events", "ack", "pullJobs"]), (102, ["events", "term", "pullJobs"]), (101, ["events", "nack", "pullJobs"])] {
        let (_, position) = c.wait_for("a job accepted", PROGRESS, || publish(c.api(2), "job", &json!({"n": n}), &[]));
        let (id, line) = c.wait_for(&format!("job {n} fetched by the CLI"), DELIVERY, || {
            let (ok, out) = cli_on(1, &format!("fetch{n}"), &["events", "fetch", "--max", "5", "--wait", "5s", "pullJobs"]);
            if !ok {
                return Err(out);
            }
            let line = out.lines().next().ok_or("nothing fetched yet")?;
            let m: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {out}"))?;
            Ok((m["ackId"].as_str().ok_or_else(|| out.clone())?.to_string(), m))
        });
        assert_eq!((line["position"].as_u64(), &line["event"]["payload"]), (Some(position), &json!({"n": n})), "{line}");
        let mut args = answer_it.to_vec();
        if n != 100 {
            args.extend(["--reason", "from a shell"]);
        }
        args.push(&id);
        let (ok, out) = cli_on(if n == 100 { 3 } else { 2 }, answer_it[1], &args);
        let said = [(100, "acked"), (101, "nacked"), (102, "terminated")].iter().find(|(k, _)| *k == n).map_or("", |(_, v)| *v);
        let want = json!({ said: 1, "unknown": [] });
        assert!(ok && serde_json::from_str::<Value>(out.trim()).ok() == Some(want), "{out}");
        by_cli.push((position, id));
    }
    // Acked again: no lease is left, and the command says so by failing.
    let (ok, out) = cli_on(3, "ack-again", &["events", "ack", "pullJobs", by_cli[0].1.as_str()]);
    assert!(!ok && out.contains("were not answered"), "{out}");
    c.wait_for("the CLI's ack settling its job", DELIVERY, || {
        let v = get_json(c.api(1), "/v1/subscriptions/pullJobs")?;
        if v["cursor"].as_u64().is_some_and(|at| at > by_cli[0].0) { Ok(()) } else { Err(format!("{v}")) }
    });

    let letter = c.wait_for("the CLI's term dead-lettering its job", DEAD_LETTER, || {
        dead_letters(c.api(3), "pullJobs")?.into_iter().find(|d| d["position"].as_u64() == Some(by_cli[1].0)).ok_or_else(|| "no dead letter yet".to_string())
    });
    assert!(letter["reason"].as_str().is_some_and(|r| r.contains("terminated by the client: from a shell")) && letter["attempts"] == 1, "{letter}");
    c.wait_for("the CLI's nack counted on its job", DELIVERY, || {
        let v = get_json(c.api(2), "/v1/subscriptions/pullJobs")?;
        if v["retrying"].as_u64() == Some(1) { Ok(()) } else { Err(format!("{v}")) }
    });

    // Answers to ids no node holds a lease for (node 2 is asked for its id: no message), to a
    // node that is not there (named), a node without the subscription, bad input.
    let a = answer("ack", &["1-0000".to_string(), "2-0000".to_string()], None);
    assert_eq!((a["acked"].as_u64(), a["unknown"].as_array().map(Vec::len)), (Some(0), Some(2)), "{a}");
    assert!(a.get("message").is_none(), "{a}");
    // An id named twice counts once (it was "acked": 1 when node 2 answered it unknown).
    let a = answer("ack", &["2-0000".to_string(), "2-0000".to_string()], None);
    assert_eq!((a["acked"].as_u64(), &a["unknown"]), (Some(0), &json!(["2-0000"])), "{a}");
    assert!(a.get("unreached").is_none(), "{a}");
    let a = answer("nack", &["9-0000".to_string()], None);
    assert_eq!((a["nacked"].as_u64(), a["unknown"].as_array().map(Vec::len)), (Some(0), Some(1)), "{a}");
    assert!(a["message"].as_str().is_some_and(|m| m.contains("node 9")), "{a}");
    let none = post(c.api(3), "/v1/subscriptions/pullJobs/ack", &json!({"ackIds": ["3-0000"]}));
    assert_eq!(none.status, 404, "{}", none.describe());
    let nowhere = post(c.api(1), "/v1/subscriptions/pullNone/ack", &json!({"ackIds": ["2-0000"]}));
    assert_eq!(nowhere.status, 404, "no member asked has it: {}", nowhere.describe());
    let strangers = post(c.api(3), "/v1/subscriptions/pullJobs/ack", &json!({"ackIds": ["9-0000"]}));
    assert_eq!(strangers.status, 404, "no id names another member: {}", strangers.describe());
    let none = post(c.api(3), "/v1/subscriptions/pullJobs/fetch", &json!(null));
    assert_eq!(none.status, 404, "{}", none.describe());
    for (path, body, status) in [
        ("/v1/subscriptions/pullJobs/ack", json!({"ackIds": []}), 400),
        ("/v1/subscriptions/pullJobs/ack", json!({"ackIds": ["1-a"], "reason": "x"}), 400),
        ("/v1/subscriptions/pullJobs/nack", json!({"ids": ["1-a"]}), 400),
        ("/v1/subscriptions/pullJobs/fetch?max=0", json!(null), 400),
        ("/v1/subscriptions/pullJobs/fetch?count=1", json!(null), 400),
    ] {
        let resp = post(c.api(1), path, &body);
        assert_eq!(resp.status, status, "{path} {body}: {}", resp.describe());
    }
    let get = c.api(1).request("GET", "/v1/subscriptions/pullJobs/fetch", &[], b"").expect("GET");
    assert_eq!(get.status, 405, "{}", get.describe());

    // A node that drains waits for its clients' answers to what they fetched there: job 200,
    // fetched from node 1 and answered on node 2 while node 1 stops, is settled (everything
    // else fetched meanwhile, the CLI's nacked job again among them, is acked at once).
    let (_, last) = c.wait_for("a job accepted", PROGRESS, || publish(c.api(2), "job", &json!({"n": 200}), &[]));
    let kept = c.wait_for("job 200 fetched from node 1", DELIVERY, || {
        let mut kept = None;
        let mut others = Vec::new();
        for m in fetch(c.api(1))? {
            let id = m["ackId"].as_str().ok_or("no ackId")?.to_string();
            if m["event"]["payload"]["n"] == 200 { kept = Some(id) } else { others.push(id) }
        }
        if !others.is_empty() {
            answer("ack", &others, None);
        }
        kept.ok_or_else(|| "not yet".to_string())
    });
    // What node 1 holds for it, as its metrics say: job 200, fetched and not answered.
    let gauge = |name: &str| c.api(1).metric(name, &["subscription=\"pullJobs\""]);
    assert_eq!(gauge("raftbridge_pull_unanswered_events"), Ok(1.0));
    assert!(gauge("raftbridge_pull_held_events").is_ok() && gauge("raftbridge_pull_waiting_fetches").is_ok());
    let (node1, node2) = (c.api(1).addr, c.api(2));
    std::thread::scope(|scope| {
        let stopping = scope.spawn(|| c.terminate(1));
        // Until its HTTP listener is closed (it answers 503 for a moment before): its client
        // cannot answer there now, and without the wait the node would stop at once. Not
        // `c.wait_until`: it looks at every node's process, which `terminate` holds.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while http::request(node1, "GET", "/readyz", &[], b"", Duration::from_secs(1)).is_ok() {
            assert!(std::time::Instant::now() < deadline, "node 1 did not start draining within 20 s");
            thread::sleep(Duration::from_millis(20));
        }
        // The client works on its job for 4 s: longer than a node's 3 s for the peer requests
        // it serves at its stop (a leader's ask for the job's outcome among them), well within
        // the 10 s shutdown grace that the wait for pull clients' answers has.
        thread::sleep(Duration::from_secs(4));
        let a = post(node2, "/v1/subscriptions/pullJobs/ack", &json!({"ackIds": [kept]}));
        assert_eq!(a.json().unwrap(), json!({"acked": 1, "unknown": []}), "{}", a.describe());
        stopping.join().expect("node 1 stopped");
    });
    // A client on node 2 takes what is left (the CLI's nacked job, handed back by the drain if
    // it was held there), never job 200 again: once all is acked the cursor passes it.
    c.wait_for("every job settled, job 200 by its answer during the drain", DELIVERY, || {
        let mut others = Vec::new();
        for m in fetch(c.api(2))? {
            assert_ne!(m["event"]["payload"]["n"], 200, "job 200 was delivered again: {m}");
            others.push(m["ackId"].as_str().ok_or("no ackId")?.to_string());
        }
        if !others.is_empty() {
            let a = post(c.api(2), "/v1/subscriptions/pullJobs/ack", &json!({ "ackIds": others }));
            assert_eq!(a.status, 200, "{}", a.describe());
        }
        let at = cursor(c.api(2), "pullJobs")?;
        if at > last { Ok(()) } else { Err(format!("cursor {at}, job 200 at {last}")) }
    });
    // Node 1 is down: its ids are unknown and unreached beside node 2's, and an answer of its
    // ids alone took nothing for want of a node: a 503, not a 200.
    let a = post(c.api(2), "/v1/subscriptions/pullJobs/ack", &json!({"ackIds": ["1-0000", "2-0000"]}));
    let v = a.json().unwrap_or_default();
    assert_eq!((a.status, v["acked"].as_u64(), v["unknown"].as_array().map(Vec::len), &v["unreached"]), (200, Some(0), Some(2), &json!(["1-0000"])), "{}", a.describe());
    assert!(v["message"].as_str().is_some_and(|m| m.contains("node 1 could not be asked")), "{}", a.describe());
    let a = post(c.api(2), "/v1/subscriptions/pullJobs/ack", &json!({"ackIds": ["1-0000", "1-0001"]}));
    assert_eq!(a.status, 503, "{}", a.describe());
    assert!(a.json().ok().and_then(|v| v["message"].as_str().map(str::to_owned)).is_some_and(|m| m.contains("node 1 could not be asked")), "{}", a.describe());
}

/// A shared subscription's cursor moved by hand (`POST /v1/subscriptions/{name}/seek`, and
/// `raftbridge events seek`): back, the retained events from there are delivered again (the
/// sidecar apps get each again, by id), those before it not; to `start`, every retained one;
/// to `end`, nothing until the next event. An every-instance subscription is a 409, an unknown
/// one a 404, a malformed seek a 400.
#[test]
fn a_seek_delivers_a_shared_subscriptions_retained_events_again_from_there() {
    let (c, ups) = sidecar_events_cluster("ev-seek", |addr| {
        format!(
            "[sidecar]\nupstream = \"http://{addr}\"\nhealth_path = \"/health\"\nhealth_interval_ms = 500\n\n\
             [[sidecar.subscriptions]]\nname = \"appOrders\"\nevent_name = \"orderPlaced\"\npath = \"/events/orderPlaced\"\n\n\
             [[sidecar.subscriptions]]\nname = \"appAudit\"\nevent_name = \"auditMe\"\nshared = false\npath = \"/events/audit\"\n"
        )
    });
    wait_subscription(&c, &c.apis(), "appOrders");
    let ids_positions: Vec<(String, u64)> = (0..5)
        .map(|i| c.wait_for("an order accepted", PROGRESS, || publish(c.api(1 + i % 3), "orderPlaced", &json!({"id": format!("seek-{i}")}), &[])))
        .collect();
    let ids: Vec<String> = ids_positions.iter().map(|(id, _)| id.clone()).collect();
    wait_delivered(&c, &ups, &ids, "before the seek");
    // Settled, not only delivered: an ack committed after the seek settles its event there too
    // (as a delivery in flight at a seek does).
    let end = ids_positions[4].1 + 1;
    c.wait_for("appOrders settled every order", DELIVERY, || match cursor(c.api(1), "appOrders")? {
        n if n >= end => Ok(()),
        n => Err(format!("cursor {n}")),
    });
    let times = |id: &str| -> Result<usize, String> {
        let mut n = 0;
        for u in &ups {
            n += u.list("/events/received")?.iter().filter(|g| *g == id).count();
        }
        Ok(n)
    };
    let post = |api: Api, path: &str, body: &str| api.request("POST", path, &[], body.as_bytes()).expect("POST");

    // Back to the third order: it and the two after it come again, the first two not.
    let third = ids_positions[2].1;
    let sought = post(c.api(2), "/v1/subscriptions/appOrders/seek", &json!({"position": third}).to_string());
    assert_eq!(sought.status, 200, "{}", sought.describe());
    assert_eq!(sought.json().unwrap(), json!({"name": "appOrders", "cursor": third}));
    c.wait_for("the orders from the third on delivered again", DELIVERY, || {
        let again: Vec<usize> = ids[2..].iter().map(|id| times(id)).collect::<Result<_, _>>()?;
        if again.iter().all(|n| *n >= 2) { Ok(()) } else { Err(format!("delivered {again:?} times")) }
    });
    c.wait_for("appOrders settled them again", DELIVERY, || match cursor(c.api(1), "appOrders")? {
        n if n >= end => Ok(()),
        n => Err(format!("cursor {n}")),
    });
    for id in &ids[..2] {
        assert_eq!(times(id).expect("received"), 1, "{id} is before the seek's position");
    }

    // From a shell, to the start: every retained order again.
    let addr = c.api(3).addr.to_string();
    assert!(c.run_cli("seek-start", &["events", "seek", "appOrders", "start", "--http-addr", &addr], Duration::from_secs(60)).success());
    let printed = fs::read_to_string(c.dir().join("seek-start.cli.log")).expect("the command's output");
    let first = read_log(c.api(3)).expect("log").first().and_then(|e| e["position"].as_u64()).expect("a first event");
    assert!(printed.contains(&format!("\"cursor\":{first}")), "the oldest retained event: {printed}");
    c.wait_for("every order delivered again", DELIVERY, || {
        let n: Vec<usize> = ids.iter().map(|id| times(id)).collect::<Result<_, _>>()?;
        if n[..2].iter().all(|n| *n >= 2) && n[2..].iter().all(|n| *n >= 3) { Ok(()) } else { Err(format!("delivered {n:?} times")) }
    });
    c.wait_for("appOrders settled every order again", DELIVERY, || match cursor(c.api(1), "appOrders")? {
        n if n >= end => Ok(()),
        n => Err(format!("cursor {n}")),
    });

    // To the end: the cursor is past the newest event, and the next order is delivered.
    let sought = post(c.api(1), "/v1/subscriptions/appOrders/seek", r#"{"position":"end"}"#);
    assert_eq!(sought.status, 200, "{}", sought.describe());
    assert!(sought.json().unwrap()["cursor"].as_u64().is_some_and(|p| p >= end), "{}", sought.describe());
    let (next, _) = c.wait_for("an order accepted", PROGRESS, || publish(c.api(2), "orderPlaced", &json!({"id": "seek-after"}), &[]));
    wait_delivered(&c, &ups, std::slice::from_ref(&next), "after a seek to the end");

    assert_json_error(&post(c.api(1), "/v1/subscriptions/appAudit/seek", r#"{"position":"start"}"#), 409, "an every-instance subscription");
    assert_json_error(&post(c.api(1), "/v1/subscriptions/noSuchSub/seek", r#"{"position":0}"#), 404, "an unknown subscription");
    assert_json_error(&post(c.api(1), "/v1/subscriptions/noSuchSub/seek", r#"{"position":99999999}"#), 404, "an unknown subscription, past the end");
    for bad in [r#"{"position":-1}"#, r#"{"position":"middle"}"#, "{}", r#"{"position":1,"x":2}"#, "[1]", r#"{"position":99999999}"#] {
        assert_json_error(&post(c.api(1), "/v1/subscriptions/appOrders/seek", bad), 400, bad);
    }
    let past = post(c.api(3), "/v1/subscriptions/appOrders/seek", r#"{"position":99999999}"#);
    assert!(past.text().contains("past the end of the log"), "{}", past.describe());
    assert_json_error(&c.api(1).request("GET", "/v1/subscriptions/appOrders/seek", &[], b"").expect("GET"), 405, "a GET");
}

/// A seek is a 503 that moves nothing while a member announces a build without it (feature bit
/// 65536: node 3 withholds it through the test hook); once that member runs one that
/// announces it, the seek is judged (here: a 404 for a subscription there is none of).
#[test]
fn a_seek_waits_for_every_member_to_apply_it() {
    const SUB_SEEK: u64 = 65536;
    let c = Cluster::new("ev-seek-gate", 3, &[]);
    c.set_env(3, "RAFTBRIDGE_TEST_WITHHOLD_FEATURES", &SUB_SEEK.to_string());
    c.start_all();
    c.wait_all_ready(FORMATION);
    let api = c.api(1);
    let seek = || api.request("POST", "/v1/subscriptions/anySub/seek", &[], br#"{"position":"end"}"#).expect("POST");
    let refused = c.wait_for("node 1 to know node 3's build", FORMATION, || {
        let r = seek();
        if r.status == 503 && r.text().contains("members [3]") { Ok(r) } else { Err(r.describe()) }
    });
    assert!(refused.text().contains("cannot move a subscription's cursor"), "{}", refused.describe());
    c.kill(3);
    c.set_env(3, "RAFTBRIDGE_TEST_WITHHOLD_FEATURES", "0");
    c.start(3);
    c.wait_for("the seek judged once node 3 announces it", Duration::from_secs(60), || {
        let r = seek();
        if r.status == 404 { Ok(()) } else { Err(r.describe()) }
    });
}

/// A handler's event is held to the payload rules of every other way in: the demo's order
/// puts its request's body into `orderPlaced`, and an order nested past
/// `MAX_PAYLOAD_DEPTH` is the handler's 500 (it used to be stored, 121 levels deep, past what
/// `GET /v1/events` and consumers read back); the HTTP publish of the same payload is a 400.
#[test]
fn a_handlers_event_nested_too_deep_is_its_500_and_not_stored() {
    let (c, _) = Cluster::formed("ev-deep-emit", 1, &["--example-services"]);
    c.wait_all_ready(FORMATION);
    wait_orders_routable(&c, "ev-deep-emit");
    let api = c.api(1);
    let deep = format!("{{\"id\":\"deep-1\",\"x\":{}{}}}", "[".repeat(120), "]".repeat(120));
    let resp = api.request("POST", "/api/v1/orders", &[], deep.as_bytes()).expect("order");
    assert_json_error(&resp, 500, "an order too deep for its event");
    assert!(resp.text().contains("nested deeper"), "{}", resp.describe());
    let published = api.request("POST", "/v1/events/orderPlaced", &[], deep.as_bytes()).expect("publish");
    assert_json_error(&published, 400, "a publish too deep");
    let placed = place_order(api, &json!({"id": "shallow-1", "x": [[1]]})).expect("a shallow order");
    let page = get_json(api, "/v1/events?after=0&limit=100&eventName=orderPlaced").expect("events");
    let ids: Vec<&str> = page["events"].as_array().expect("events").iter().filter_map(|e| e["payload"]["id"].as_str()).collect();
    assert!(ids.contains(&"shallow-1") && !ids.contains(&"deep-1"), "the shallow order's event ({}) and not the deep one's: {ids:?}", placed.event_id);
    // The command's deadline header, given twice or not a number, is the client's 400 before
    // anything runs (twice used to run under the first).
    for (headers, what) in [(&[("x-timeout-ms", "5000"), ("x-timeout-ms", "6000")][..], "twice"), (&[("x-timeout-ms", "5s")][..], "not a number")] {
        let resp = api.request("POST", "/api/v1/orders", headers, br#"{"id":"timed-1"}"#).expect("order");
        assert_json_error(&resp, 400, &format!("x-timeout-ms {what}"));
    }
    let stored = api.request("GET", "/v1/state/demo/orders/timed-1", &[], b"").expect("read");
    assert_eq!(stored.status, 404, "nothing ran: {}", stored.describe());
}
