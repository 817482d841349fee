//! HTTP routes of the broker: publish (one or a batch), read the log, dead letters, and a
//! subscription's progress.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper::Request;
use hyper::Response;
use hyper::body::Incoming;

use super::App;
use super::error::ApiError;
use super::json_body;
use super::json_response;
use crate::broker::BrokerError;
use crate::broker::new_event;
use crate::proxy::routing::parse_query;
use crate::sdk::MessageMeta;

/// Events in one batch request at most.
pub const MAX_BATCH_REQUEST: usize = 1_000;
/// How often at most a waiting read of the log looks at what was appended (see `read`).
const POLL_RECHECK: std::time::Duration = std::time::Duration::from_millis(10);
/// Events in one read at most.
const MAX_READ: usize = 1_000;
/// Payload bytes in one read's answer, about (at least one event always goes).
const MAX_READ_BYTES: usize = 4 << 20;

type ApiResult = Result<Response<Full<Bytes>>, ApiError>;

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::Store(s) => s.into(),
            BrokerError::Stopped => ApiError::Unavailable(e.to_string()),
            BrokerError::TooLarge { .. } => ApiError::Oversized(e.to_string()),
            // Never in an entry: a 503 with `Retry-After`, and a retry is safe.
            BrokerError::NotQueued { .. } => ApiError::Busy(e.to_string()),
            BrokerError::Unexpected => ApiError::Internal(e.to_string()),
        }
    }
}

/// A broker error, shared by every publisher whose events were in the failed entry: the HTTP
/// status of its cause, mapped in one place (`From<BrokerError>`).
fn unshare(e: std::sync::Arc<BrokerError>) -> ApiError {
    ApiError::from(std::sync::Arc::unwrap_or_clone(e))
}

fn check_name(name: &str) -> Result<(), ApiError> {
    crate::broker::event::check_event_name(name).map_err(ApiError::BadRequest)
}

/// A subscription name as services declare them (`sdk::builder::check_name`): anything else
/// names none, and is refused before it is looked up, echoed, probed for or proposed.
fn check_subscription(name: &str) -> Result<(), ApiError> {
    crate::sdk::builder::check_name(name).map_err(|_| {
        ApiError::BadRequest(format!("subscription {:?}: a name is 1..=128 characters of A-Z a-z 0-9 - _ .", super::cut(name, 64)))
    })
}

pub(crate) fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > super::MAX_META_LEN {
        return Err(ApiError::BadRequest(format!("idempotencyKey must be 1..={} bytes", super::MAX_META_LEN)));
    }
    // As for the header form (what an HTTP header value may hold); it also keeps `dedup_key`'s
    // tenant separator, a line break, unambiguous.
    if !key.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        return Err(ApiError::BadRequest("idempotencyKey must be visible ASCII".into()));
    }
    Ok(())
}

/// A producer's dedup key as the log keeps it: scoped by tenant (`x-tenant-id`), so that one
/// tenant's key never answers another's event with its id and drops it. A line break, which no
/// key holds (`check_key`, header values), separates the tenant; without one the key is kept
/// as given, as before tenants counted.
fn dedup_key(tenant: Option<&str>, key: Option<String>) -> Option<String> {
    match (tenant, key) {
        (Some(t), Some(k)) => Some(format!("{t}\n{k}")),
        (_, k) => k,
    }
}

/// The event metadata a client sets with headers, as the proxy reads it (`proxy::client_meta`),
/// except that trace context the client did not send is left out rather than created.
fn meta_of(req: &Request<Incoming>) -> Result<MessageMeta, ApiError> {
    let (request_id, traceparent) = crate::proxy::client_trace(req.headers());
    crate::proxy::client_meta(req.headers(), request_id.unwrap_or_default(), traceparent.unwrap_or_default())
}

/// A body must be UTF-8 JSON text: a syntax check alone lets invalid UTF-8 inside strings
/// through, which could not be served back as JSON.
fn check_utf8(body: &[u8]) -> Result<(), ApiError> {
    std::str::from_utf8(body).map(|_| ()).map_err(|e| ApiError::BadRequest(format!("body is not UTF-8: {e}")))
}


/// `POST /v1/events/{eventName}` → 201 `{"id","position"}` once committed.
pub async fn publish_one(app: &App, name: &str, req: Request<Incoming>) -> ApiResult {
    check_name(name)?;
    let mut meta = meta_of(&req)?;
    // The header is the event's dedup key (a batch's items carry their own).
    let key = dedup_key(meta.tenant_id.as_deref(), meta.idempotency_key.take());
    let body = super::read_body(req, app.settings.max_body, &app.settings.bodies).await?;
    crate::broker::event::check_event_payload(&body).map_err(ApiError::BadRequest)?;
    let event = new_event(name, body.to_vec(), &meta, None, key);
    let sent = event.body.id.clone();
    let (id, position) = app.broker.publish_one(event).await.map_err(unshare)?;
    Ok(json_response(StatusCode::CREATED, &published(id, position, &sent)))
}

/// One event's answer: `{"id","position"}`, with `"duplicate":true` when its idempotency key
/// named an event already stored (NATS JetStream's `duplicate`), whose id and position these
/// are: the log holds nothing new, whatever this request's payload was. The node gives each
/// request's event a fresh id, so another id in the answer is the dedup's.
fn published(id: String, position: u64, sent: &str) -> serde_json::Value {
    if id == sent {
        serde_json::json!({ "id": id, "position": position })
    } else {
        serde_json::json!({ "id": id, "position": position, "duplicate": true })
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BatchItem<'a> {
    event_name: String,
    /// Kept as the client's JSON text: validated by the parse, stored without re-encoding.
    #[serde(borrow, default)]
    payload: Option<&'a serde_json::value::RawValue>,
    idempotency_key: Option<String>,
}

/// A batch's items, refused as soon as there are more than `MAX_BATCH_REQUEST`: a 1 MiB body of
/// tiny items (about 58,000) used to be parsed whole before its length was checked.
struct BatchItems<'a>(Vec<BatchItem<'a>>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for BatchItems<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Bounded<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Bounded<'a> {
            type Value = BatchItems<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "an array of at most {MAX_BATCH_REQUEST} events")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<BatchItem<'a>>()? {
                    if items.len() == MAX_BATCH_REQUEST {
                        return Err(serde::de::Error::custom(format!("a batch holds 1..={MAX_BATCH_REQUEST} events")));
                    }
                    items.push(item);
                }
                Ok(BatchItems(items))
            }
        }
        d.deserialize_seq(Bounded(std::marker::PhantomData))
    }
}

/// `POST /v1/events` with a JSON array → 201 `{"events":[{"id","position"},..]}` once committed.
pub async fn publish_batch(app: &App, req: Request<Incoming>) -> ApiResult {
    let meta = meta_of(&req)?;
    if meta.idempotency_key.is_some() {
        // Silently dropped, a retry of the batch would publish it twice.
        return Err(ApiError::BadRequest("an idempotency-key header names one event: give each batch item its own idempotencyKey".into()));
    }
    let body = super::read_body(req, app.settings.max_body, &app.settings.bodies).await?;
    check_utf8(&body)?;
    let BatchItems(items) =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("expected an array of events: {e}")))?;
    if items.is_empty() || items.len() > MAX_BATCH_REQUEST {
        return Err(ApiError::BadRequest(format!("a batch holds 1..={MAX_BATCH_REQUEST} events")));
    }
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        // Which item: in a batch of a thousand, "event name must be ..." alone finds nothing.
        let at = |e: ApiError| match e {
            ApiError::BadRequest(m) => ApiError::BadRequest(format!("item {i}: {m}")),
            other => other,
        };
        check_name(&item.event_name).map_err(at)?;
        if let Some(key) = &item.idempotency_key {
            check_key(key).map_err(at)?;
        }
        if let Some(p) = item.payload {
            crate::broker::event::check_payload(p.get().as_bytes()).map_err(ApiError::BadRequest).map_err(at)?;
        }
        let payload = item.payload.map_or_else(|| b"null".to_vec(), |p| p.get().as_bytes().to_vec());
        events.push(new_event(&item.event_name, payload, &meta, None, dedup_key(meta.tenant_id.as_deref(), item.idempotency_key)));
    }
    let sent: Vec<String> = events.iter().map(|e| e.body.id.clone()).collect();
    let ids = app.broker.publish_batch(events).await.map_err(unshare)?;
    let list: Vec<serde_json::Value> =
        ids.into_iter().zip(&sent).map(|((id, position), sent)| published(id, position, sent)).collect();
    Ok(json_response(StatusCode::CREATED, &serde_json::json!({ "events": list })))
}

/// `GET /v1/events?after=N&limit=M[&eventName=..]`: the log in order, from the local replica
/// (every committed event is on every node once applied), once it holds every event this node
/// has acknowledged (`Broker::caught_up_with_acks`: a client reads its own writes). One answer
/// holds at most `MAX_READ` events and about `MAX_READ_BYTES` of payload (or a quarter of
/// `--max-body-buffered`, if less; at least one event); `next` says where to continue.
///
/// With `?wait=30s` (at most 5 minutes), a read that finds nothing more to look at (no event
/// after `after` that it asks for, and the end of the log reached) waits for the next events
/// it asks for, as a Kafka fetch's `fetch.max.wait.ms` or a NATS pull's expiry: it answers as
/// soon as one is applied on this node, or with the empty page when the wait is over. It holds
/// one of the node's long polls (`stores::LongPolls`: 503 past them) and ends at the drain.
pub async fn read(app: &App, query: Option<&str>) -> ApiResult {
    let q = parse_query(query.unwrap_or("")).ok_or_else(|| ApiError::BadRequest("malformed query".into()))?;
    let after = number(&q, "after")?.unwrap_or(0);
    let limit = limit(&q, 100)?;
    let name = q.get("eventName").map(String::as_str);
    if let Some(name) = name {
        crate::broker::event::check_event_name_to_read(name).map_err(ApiError::BadRequest)?;
    }
    let wait = super::stores::parse_wait(&q)?;
    // After the checks: bad parameters are a 400 at once, not after this wait (up to 2 s).
    app.broker.caught_up_with_acks().await;
    // A page fits a quarter of the node's answer budget, which may be set below it: a page
    // the budget could never hold would be refused (503) at every retry.
    let max_bytes = MAX_READ_BYTES.min(app.settings.answers.total() / 4);
    // Taken before the first look, so that an event applied right after it wakes the wait.
    let mut appended = wait.map(|_| app.sm.watch_events());
    // The log's end before each read: a read that reaches it looked at everything up to it, and
    // what is appended after wakes the watch (an end read after the read could be past an
    // event appended meanwhile, and end the wait with an empty page).
    let mut end_before = app.sm.event_bounds().1;
    let (mut events, mut next) = app.sm.events_after(after, limit, max_bytes, name);
    if let (Some(wait), Some(appended)) = (wait, appended.as_mut()) {
        let at_end = |next: u64, end: u64| next.saturating_add(1) >= end;
        if events.is_empty() && at_end(next, end_before) {
            let _slot = app.long_polls.slot()?;
            let deadline = tokio::time::Instant::now() + wait;
            // When the log was last read: while events flow, a poll whose filter skips them
            // reads the new ones at most every `POLL_RECHECK`, not at every entry applied. The
            // first wake reads at once: the event it waited for goes out as it is applied.
            let now = tokio::time::Instant::now();
            let mut read_at = now.checked_sub(POLL_RECHECK).unwrap_or(now);
            // Bounded by the deadline: each pass waits for an append, the deadline or the stop.
            loop {
                // The stop and the deadline first: events flowing past the filter must not keep
                // a poll beyond either.
                tokio::select! {
                    biased;
                    () = app.long_polls.stop.cancelled() => break,
                    () = tokio::time::sleep_until(deadline) => break,
                    changed = appended.changed() => if changed.is_err() { break },
                }
                tokio::select! {
                    () = tokio::time::sleep_until((read_at + POLL_RECHECK).min(deadline)) => {}
                    () = app.long_polls.stop.cancelled() => {}
                }
                read_at = tokio::time::Instant::now();
                appended.borrow_and_update();
                // Only what came since: positions up to `next` were looked at.
                end_before = app.sm.event_bounds().1;
                (events, next) = app.sm.events_after(next, limit, max_bytes, name);
                if !events.is_empty() || !at_end(next, end_before) {
                    break;
                }
            }
        }
    }
    let (first, end) = app.sm.event_bounds();
    #[derive(serde::Serialize)]
    struct Page<'a> {
        events: Vec<crate::broker::event::EventJson<'a>>,
        next: u64,
        first: u64,
        end: u64,
    }
    let page = Page { events: events.iter().map(|e| e.to_json()).collect(), next, first, end: end.saturating_sub(1) };
    Ok(json_body(StatusCode::OK, &page))
}

/// `limit`: `default` when absent, at most `MAX_READ` (a larger one is read as that, as a page
/// may hold fewer than asked anyway); 0 or anything but a number is a 400 (0 used to read as 1,
/// and moved `next` on past an event the client asked not to see).
fn limit(q: &std::collections::BTreeMap<String, String>, default: usize) -> Result<usize, ApiError> {
    let bad = || ApiError::BadRequest(format!("limit must be a whole number from 1 (at most {MAX_READ} are read)"));
    match q.get("limit") {
        None => Ok(default),
        Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => match v.trim_start_matches('0') {
            "" => Err(bad()),
            digits if digits.len() > 9 => Ok(MAX_READ),
            digits => Ok(digits.parse::<usize>().map_err(|_| bad())?.min(MAX_READ)),
        },
        Some(_) => Err(bad()),
    }
}

/// A query parameter that must be a number (decimal digits, `api::decimal`) when present.
fn number(q: &std::collections::BTreeMap<String, String>, k: &str) -> Result<Option<u64>, ApiError> {
    q.get(k).map(|v| super::decimal(v).ok_or_else(|| ApiError::BadRequest(format!("{k} must be a number")))).transpose()
}

/// `GET /v1/dead-letters?subscription=NAME[&after=POSITION][&limit=M]`: in position order, at
/// most `limit` positions' worth (default and bound `MAX_READ`) and about `MAX_READ_BYTES` of
/// event payload; `next` (when present) is the `after` to continue from.
pub fn dead_letters(app: &App, query: Option<&str>) -> ApiResult {
    let q = parse_query(query.unwrap_or("")).ok_or_else(|| ApiError::BadRequest("malformed query".into()))?;
    let name = q.get("subscription").ok_or_else(|| ApiError::BadRequest("subscription=NAME is required".into()))?;
    check_subscription(name)?;
    let after = number(&q, "after")?;
    let limit = limit(&q, MAX_READ)?;
    let dead = app.sm.dead_letters(name, after, limit).ok_or_else(|| ApiError::NotFound(format!("no subscription {name}")))?;
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Letter<'a> {
        position: u64,
        event_id: &'a str,
        attempts: u32,
        reason: &'a str,
        node: Option<u64>,
        event: Option<crate::broker::event::EventJson<'a>>,
    }
    // The events, fetched once per position; the page ends (at a position boundary) once their
    // payloads pass the byte bound.
    let mut events: Vec<(u64, Option<crate::broker::event::Event>)> = Vec::new();
    let mut bytes = 0;
    let mut kept = dead.len();
    for (i, d) in dead.iter().enumerate() {
        if events.last().is_some_and(|(p, _)| *p == d.position) {
            continue;
        }
        if bytes >= MAX_READ_BYTES {
            kept = i;
            break;
        }
        let event = app.sm.event(d.position);
        bytes += event.as_ref().map_or(0, |e| e.payload.len());
        events.push((d.position, event));
    }
    let dead = &dead[..kept];
    // Letters are cut at a position boundary, so the page ends with all of its last position's.
    let next = dead.last().map(|d| d.position).or(after);
    let event_of = |p: u64| events.binary_search_by_key(&p, |(q, _)| *q).ok().and_then(|i| events[i].1.as_ref());
    let list: Vec<Letter> = dead
        .iter()
        .map(|d| Letter {
            position: d.position,
            event_id: &d.event_id,
            attempts: d.attempts,
            reason: &d.reason,
            node: d.node,
            event: event_of(d.position).map(|e| e.to_json()),
        })
        .collect();
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Page<'a> {
        subscription: &'a str,
        dead_letters: Vec<Letter<'a>>,
        next: Option<u64>,
    }
    Ok(json_body(StatusCode::OK, &Page { subscription: name, dead_letters: list, next }))
}

/// `GET /v1/subscriptions/{name}`: replicated progress, for operators and tests.
pub fn subscription(app: &App, name: &str) -> ApiResult {
    check_subscription(name)?;
    let s = app.sm.subscription_summary(name).ok_or_else(|| ApiError::NotFound(format!("no subscription {name}")))?;
    Ok(json_response(StatusCode::OK, &summary_json(name, &s)))
}

/// `GET /v1/subscriptions`: every subscription's progress, by name (this node's view).
pub fn subscriptions(app: &App) -> ApiResult {
    let all: Vec<serde_json::Value> = app.sm.subscription_summaries().iter().map(|(name, s)| summary_json(name, s)).collect();
    Ok(json_response(StatusCode::OK, &serde_json::json!({ "subscriptions": all })))
}

fn summary_json(name: &str, s: &crate::raft::state_machine::SubSummary) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "shared": s.shared,
        "durable": s.durable,
        "cursor": s.cursor,
        "doneAhead": s.done_ahead,
        "retrying": s.retrying,
        "deadLetters": s.dead_letters,
        "instances": s.instances,
        "declaredBy": s.declared_by,
        "offeredBy": s.offered_by,
    })
}

/// How long `DELETE /v1/subscriptions/{name}` waits for a link to a member to learn its build.
const FEATURE_PROBE: std::time::Duration = std::time::Duration::from_secs(2);

/// `DELETE /v1/subscriptions/{name}`: forget a subscription and its progress, as deleting a
/// JetStream consumer does. 409 while a registered node declares it (it would come back with
/// that node's next registration), 404 when there is none, 503 unless every member runs a build
/// that can apply the drop (an older one could not decode the entry and would stall): a member
/// is judged by the features it announced on its latest link, so one that is down counts with
/// the build it had.
pub async fn drop_subscription(app: &App, name: &str) -> ApiResult {
    check_subscription(name)?;
    let me = app.replica.id();
    let members: Vec<u64> = app.replica.metrics().membership_config.membership().nodes().map(|(id, _)| *id).filter(|id| *id != me).collect();
    for id in members {
        let features = match app.replica.net.features_seen(id) {
            Some(features) => features,
            // Never linked since this node started: ask it (a node that is down stays unknown).
            None => match tokio::time::timeout(FEATURE_PROBE, app.replica.net.link(id)).await {
                Ok(Ok(link)) => link.features(),
                Ok(Err(e)) => return Err(ApiError::Unavailable(format!("cannot learn node {id}'s build to drop a subscription: {e}"))),
                Err(_) => return Err(ApiError::Unavailable(format!("cannot learn node {id}'s build to drop a subscription: no link within {FEATURE_PROBE:?}"))),
            },
        };
        if features & crate::peer::frame::features::DROP_SUBSCRIPTION == 0 {
            return Err(ApiError::Unavailable(format!("node {id} runs a build that cannot apply a subscription drop; upgrade it first")));
        }
    }
    match app.store.drop_subscription(name).await? {
        (_, declared_by) if !declared_by.is_empty() => Err(ApiError::Conflict(format!(
            "subscription {name} is declared by node(s) {declared_by:?}: it can be dropped once no registered node declares it"
        ))),
        (false, _) => Err(ApiError::NotFound(format!("no subscription {name}"))),
        (true, _) => Ok(json_response(StatusCode::OK, &serde_json::json!({ "deleted": true, "name": name }))),
    }
}

/// Where a seek moves a subscription's cursor: a position, or either end of the retained log.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum SeekTo {
    Position(u64),
    /// `"start"` or `"end"`.
    Named(String),
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SeekBody {
    position: SeekTo,
}

/// `POST /v1/subscriptions/{name}/seek` with `{"position": N | "start" | "end"}`: a shared
/// subscription's delivery starts again at event position N (clamped to the retained log), at
/// the oldest retained event, or after the newest, as a Kafka consumer group's offsets are
/// reset or a Pub/Sub subscription seeks (`Command::SeekSubscription`). 200 `{"name","cursor"}`
/// once committed; 404 when there is none; 409 for an every-instance subscription (each node
/// keeps its own position); 503 while a member's build cannot apply it.
/// How long a seek past this node's log end waits to catch up with the cluster's commits.
const SEEK_BARRIER: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn seek_subscription(app: &App, name: &str, req: Request<Incoming>) -> ApiResult {
    check_subscription(name)?;
    let body = super::read_body(req, app.settings.max_body, &app.settings.bodies).await?;
    let bad = |e: &dyn std::fmt::Display| ApiError::BadRequest(format!("a seek is {{\"position\": N | \"start\" | \"end\"}}: {e}"));
    // An object: serde would read a struct from an array too (`[5]`).
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| bad(&e))?;
    if !value.is_object() {
        return Err(bad(&"not an object"));
    }
    let parsed: SeekBody = serde::Deserialize::deserialize(value).map_err(|e| bad(&e))?;
    let numbered = matches!(parsed.position, SeekTo::Position(_));
    let position = match parsed.position {
        SeekTo::Position(n) => n,
        SeekTo::Named(end) if end == "start" => 0,
        SeekTo::Named(end) if end == "end" => u64::MAX,
        SeekTo::Named(other) => return Err(ApiError::BadRequest(format!("position is a number, \"start\" or \"end\", not {:?}", super::cut(&other, 32)))),
    };
    // A position past the log's end is refused (Kafka refuses an offset out of range): taken as
    // the end, a typo passed every pending event. Judged once this node has what the cluster
    // committed (a follower's log may end earlier than the leader's).
    if numbered && position > app.sm.event_bounds().1 && app.sm.sub_ack_deadline_ms(name).is_some() {
        app.replica.read_barrier(SEEK_BARRIER).await?;
        let next = app.sm.event_bounds().1;
        if position > next {
            return Err(ApiError::BadRequest(format!("position {position} is past the end of the log (the next event takes {next}): seek to \"end\" to pass every event")));
        }
    }
    match app.store.seek_subscription(name, position).await? {
        (Some(cursor), _) => Ok(json_response(StatusCode::OK, &serde_json::json!({ "name": name, "cursor": cursor }))),
        (None, false) => Err(ApiError::Conflict(format!(
            "subscription {name} delivers to every instance, and each node keeps its own position: a seek moves a shared subscription's cursor"
        ))),
        (None, true) => Err(ApiError::NotFound(format!("no subscription {name}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `limit` 0 is refused (it read as 1), a large one reads as the bound, anything else that is
    /// not a whole number is refused.
    #[test]
    fn a_read_limit_is_a_whole_number_from_one() {
        let q = |v: &str| limit(&parse_query(&format!("limit={v}")).expect("query"), 100);
        assert_eq!(limit(&parse_query("").expect("query"), 100).ok(), Some(100));
        assert_eq!(q("1").ok(), Some(1));
        assert_eq!(q("007").ok(), Some(7));
        assert_eq!(q("5000").ok(), Some(MAX_READ));
        assert_eq!(q("99999999999999999999999").ok(), Some(MAX_READ));
        for bad in ["0", "000", "", "-1", "+5", "1.5", "x"] {
            assert!(q(bad).is_err(), "{bad:?}");
        }
    }

    /// The keys the runtime gives its handlers' events are ones no producer can send: a client
    /// cannot publish first under one and have the handler's event deduplicated into its own.
    #[test]
    fn no_producer_key_is_an_internal_one() {
        let internal = crate::broker::internal_key("sub:answerPings:0123:emit#00000000");
        assert!(check_key(&internal).is_err());
        assert!(check_key("sub:answerPings:0123:emit#00000000").is_ok());
        assert!(!dedup_key(Some("t"), Some("k".into())).unwrap_or_default().starts_with('\u{1}'));
    }

    #[test]
    fn subscription_names_are_those_services_can_declare() {
        assert!(check_subscription("countOrders").is_ok());
        for bad in ["", "a b", "x/y", &"s".repeat(129), "naïve"] {
            assert!(matches!(check_subscription(bad), Err(ApiError::BadRequest(_))), "{bad:?}");
        }
    }
}

/// This node's pull subscription `name` (`broker::pull`), or a 404 that says where they are.
fn pull_queue<'a>(app: &'a App, name: &str) -> Result<&'a std::sync::Arc<crate::broker::pull::PullQueue>, ApiError> {
    check_subscription(name)?;
    app.pulls.get(name).ok_or_else(|| {
        ApiError::NotFound(format!(
            "this node consumes no pull subscription {name}: a node fetches for the subscriptions of its [pull] config; ask one that has it"
        ))
    })
}

/// `POST /v1/subscriptions/{name}/fetch[?max=N][&wait=D]`: up to `max` (default 1, at most
/// `pull::MAX_FETCH`) events this node holds for the pull subscription, each with the ack id
/// to answer it by; with `wait` (at most 5 minutes), waits that long for the first when none is
/// held, then answers what it has (maybe nothing). A fetch is what makes this node offer the
/// subscription (for `pull::DEMAND_GRACE` after it), so a client that fetches in a loop keeps
/// its events coming here. It holds one of the node's long polls while it runs, and ends at
/// the drain.
pub async fn pull_fetch(app: &App, name: &str, query: Option<&str>) -> ApiResult {
    let queue = pull_queue(app, name)?;
    let q = parse_query(query.unwrap_or("")).ok_or_else(|| ApiError::BadRequest("malformed query".into()))?;
    let max = match number(&q, "max")? {
        None => 1,
        Some(n @ 1..) => usize::try_from(n).unwrap_or(usize::MAX).min(crate::broker::pull::MAX_FETCH),
        Some(_) => return Err(ApiError::BadRequest("max must be a whole number from 1".into())),
    };
    let wait = super::stores::parse_wait(&q)?.unwrap_or_default();
    // Also without `wait`: a fetch after a quiet spell waits (`pull::COLD_WAIT`).
    let _slot = app.long_polls.slot()?;
    // An answer's payload as `GET /v1/events` bounds a page's; the rest stays held.
    let max_bytes = MAX_READ_BYTES.min(app.settings.answers.total() / 4);
    let fetched = queue.fetch(max, max_bytes, wait, &app.long_polls.stop).await;
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Message<'a> {
        ack_id: &'a str,
        position: u64,
        event: crate::broker::event::EventJson<'a>,
    }
    // Serialized as it is, not through a `Value`: that would sort the payload's keys and round
    // its numbers past 64-bit floats (it is served as it was sent, as `GET /v1/events` does).
    #[derive(serde::Serialize)]
    struct Fetched<'a> {
        messages: Vec<Message<'a>>,
    }
    let messages: Vec<Message<'_>> = fetched.iter().map(|(id, e)| Message { ack_id: id, position: e.position, event: e.to_json() }).collect();
    Ok(json_body(StatusCode::OK, &Fetched { messages }))
}

/// The body of an ack, a nack or a term.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PullAnswer {
    ack_ids: Vec<String>,
    /// A nack's or a term's reason (kept with the failed attempt, and in the dead letters).
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /v1/subscriptions/{name}/ack`, `/nack` and `/term`: `{"ackIds":[..]}` (a nack or a
/// term may add `"reason"`), on any node. An ack settles each event; a nack fails its attempt,
/// and it is delivered again after its backoff (or dead-lettered after its attempts); a term
/// dead-letters it now (where every member's build can record that; a nack until then). An id
/// names the node it was fetched from (`<node>-...`), which holds its lease: ids of other nodes
/// are forwarded there over the peer link, each node's at once. 200 `{"acked"|"nacked"|"terminated": n,
/// "unknown": [ids]}`: `unknown` are ids no node holds a lease for (answered already, or past
/// their ack deadline and maybe delivered again), and those whose node could not be asked or is
/// no member, which `message` then names; the ids of nodes that could not be asked are also in
/// `unreached`. 503 when no id could be answered because no node it names could be asked. 404
/// when this node has no such subscription and no id names another member, or no member asked
/// has it either.
pub async fn pull_answer(app: &App, name: &str, action: &str, req: Request<Incoming>) -> ApiResult {
    check_subscription(name)?;
    let body = super::read_body(req, app.settings.max_body, &app.settings.bodies).await?;
    let mut answer: PullAnswer = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("an answer is {{\"ackIds\":[..]}}: {e}")))?;
    drop(body);
    if answer.ack_ids.is_empty() || answer.ack_ids.len() > crate::broker::pull::MAX_FETCH {
        return Err(ApiError::BadRequest(format!("ackIds holds 1..={} ids", crate::broker::pull::MAX_FETCH)));
    }
    // An id named twice is answered once (and counted once, here and at the node it names).
    let mut named = std::collections::HashSet::with_capacity(answer.ack_ids.len());
    answer.ack_ids.retain(|id| named.insert(id.clone()));
    drop(named);
    use crate::broker::pull::Verdict;
    let reason = || answer.reason.clone().unwrap_or_else(|| "no reason given".into());
    let (verdict, said) = match action {
        "ack" if answer.reason.is_some() => return Err(ApiError::BadRequest("an ack takes no reason (a nack or a term does)".into())),
        "ack" => (Verdict::Ack, "acked"),
        "nack" => (Verdict::Nack(reason()), "nacked"),
        _ => (Verdict::Term(reason()), "terminated"),
    };
    let verdict = verdict.bounded();
    let me = app.replica.id();
    let total = answer.ack_ids.len();
    let (mut here, mut elsewhere) = (Vec::new(), std::collections::BTreeMap::<u64, Vec<String>>::new());
    for id in answer.ack_ids {
        match crate::broker::pull::PullQueue::node_of(&id) {
            Some(node) if node != me => elsewhere.entry(node).or_default().push(id),
            _ => here.push(id),
        }
    }
    // Ids naming no member are unknown without asking (a client cannot make this node dial).
    let (members, strangers): (Vec<_>, Vec<_>) = elsewhere.into_iter().partition(|(node, _)| app.cluster.is_member(*node));
    // Without the subscription here, ids naming this node are unknown: 404 when no id names
    // another member.
    let queue = if members.is_empty() { Some(pull_queue(app, name)?) } else { app.pulls.get(name) };
    let mut unknown = match queue {
        Some(queue) => queue.answer(&here, &verdict),
        None => here,
    };
    let mut notes: Vec<String> = strangers.iter().map(|(node, _)| format!("node {node} is not a member of this cluster")).collect();
    unknown.extend(strangers.into_iter().flat_map(|(_, ids)| ids));
    let mut done = total - unknown.len() - members.iter().map(|(_, ids)| ids.len()).sum::<usize>();
    let (mut asked, mut lacking) = (0, 0);
    // Ids whose node could not be asked (down, or no answer in time): unknown as well (the
    // answer's first form), and named apart, as the ones worth answering again.
    let mut unreached: Vec<String> = Vec::new();
    let forwards = members.into_iter().map(|(node, ids)| forward_answer(app, node, name, ids, verdict.clone()));
    for (ids, result) in futures_util::future::join_all(forwards).await {
        asked += 1;
        match result {
            Ok(theirs) => {
                // Only ids it was sent count (a peer's answer is not taken on trust).
                let mut sent: std::collections::HashSet<&String> = ids.iter().collect();
                let theirs: Vec<String> = theirs.into_iter().filter(|id| sent.remove(id)).collect();
                done += ids.len().saturating_sub(theirs.len());
                unknown.extend(theirs);
            }
            Err(unasked) => {
                lacking += usize::from(matches!(unasked, Unasked::NoSubscription(_)));
                notes.push(unasked.to_string());
                if matches!(unasked, Unasked::Unreached(..)) {
                    unreached.extend(ids.iter().cloned());
                }
                unknown.extend(ids);
            }
        }
    }
    // No node asked has it either: the name is wrong, as a 404 says.
    if queue.is_none() && asked > 0 && lacking == asked {
        pull_queue(app, name)?;
    }
    // Not one id could be answered for want of its node: the peer's failure, not the client's
    // (a 503 says so, and a client's retry policy takes it up), not a 200 that took nothing.
    if unreached.len() == total {
        return Err(ApiError::Unavailable(notes.into_iter().take(MAX_NOTES).collect::<Vec<_>>().join("; ")));
    }
    let mut body = serde_json::json!({ said: done, "unknown": unknown });
    if !unreached.is_empty() {
        body["unreached"] = serde_json::json!(unreached);
    }
    if !notes.is_empty() {
        let more = notes.len().saturating_sub(MAX_NOTES);
        notes.truncate(MAX_NOTES);
        if more > 0 {
            notes.push(format!("{more} more nodes"));
        }
        body["message"] = serde_json::json!(notes.join("; "));
    }
    Ok(json_response(StatusCode::OK, &body))
}

/// How long a forwarded answer may take, reaching the node included.
const FORWARD_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Nodes a `message` names at most.
const MAX_NOTES: usize = 5;

/// Why a node's ids were not answered there: they count as unknown.
#[derive(Debug, thiserror::Error)]
enum Unasked {
    #[error("node {0} could not be asked ({1}): answer its ids again later")]
    Unreached(u64, String),
    #[error("node {0} runs an older build, which takes answers only from its own clients: answer its ids there")]
    Older(u64),
    #[error("node {0} has no such pull subscription")]
    NoSubscription(u64),
    #[error("node {0}: {1}")]
    Refused(u64, crate::peer::message::RemoteError),
}

/// Sends `ids` (fetched from member `node`) to `node`, which holds their leases: the ids, with
/// those it holds no lease for, or why it was not asked.
async fn forward_answer(app: &App, node: u64, sub: &str, ids: Vec<String>, verdict: crate::broker::pull::Verdict) -> (Vec<String>, Result<Vec<String>, Unasked>) {
    use crate::peer::message::PeerRequest;
    use crate::peer::message::PeerResponse;
    use crate::peer::message::RemoteError;
    let net = &app.replica.net;
    let asked = async {
        let link = net.link(node).await.map_err(|e| Unasked::Unreached(node, e.to_string()))?;
        if link.features() & crate::peer::frame::features::PULL_FORWARD == 0 {
            return Err(Unasked::Older(node));
        }
        let req = PeerRequest::PullAnswer { sub: sub.to_string(), ids: ids.clone(), verdict };
        match link.call(&req, FORWARD_ANSWER_TIMEOUT).await {
            Ok(PeerResponse::PullAnswered { unknown }) => Ok(unknown),
            Ok(PeerResponse::Error(RemoteError::Invalid(why))) if why.starts_with(crate::broker::pull::NO_SUCH_PULL) => Err(Unasked::NoSubscription(node)),
            Ok(PeerResponse::Error(e)) => Err(Unasked::Refused(node, e)),
            Ok(other) => Err(Unasked::Unreached(node, format!("it answered {}", crate::raft::response_name(&other)))),
            Err(e) => Err(Unasked::Unreached(node, e.to_string())),
        }
    };
    let result = tokio::time::timeout(FORWARD_ANSWER_TIMEOUT, asked)
        .await
        .unwrap_or_else(|_| Err(Unasked::Unreached(node, format!("no answer within {} s", FORWARD_ANSWER_TIMEOUT.as_secs()))));
    if let Err(why) = &result {
        // Debug: a member that is down would log once per client answer; the client is told.
        tracing::debug!(node, subscription = sub, ids = ids.len(), cause = %why, "a client's answer to a pull subscription was not forwarded");
    }
    (ids, result)
}
