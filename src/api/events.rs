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
use super::json_response;
use crate::broker::BrokerError;
use crate::broker::new_event;
use crate::proxy::routing::parse_query;
use crate::sdk::MessageMeta;

/// Events in one batch request at most.
pub const MAX_BATCH_REQUEST: usize = 1_000;
/// Events in one read at most.
const MAX_READ: usize = 1_000;

type ApiResult = Result<Response<Full<Bytes>>, ApiError>;

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::Store(s) => s.into(),
            BrokerError::Stopped => ApiError::Unavailable(e.to_string()),
            BrokerError::Unexpected => ApiError::Internal(e.to_string()),
        }
    }
}

/// A broker error, shared by every publisher whose events were in the failed entry: the HTTP
/// status of its cause, mapped in one place (`From<BrokerError>`).
fn unshare(e: std::sync::Arc<BrokerError>) -> ApiError {
    ApiError::from(std::sync::Arc::unwrap_or_clone(e))
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers().get(name).and_then(|v| v.to_str().ok()).map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest("event name must be 1..=256 printable characters".into()));
    }
    Ok(())
}

fn meta_of(req: &Request<Incoming>) -> MessageMeta {
    let traceparent = header(req, "traceparent").unwrap_or_default();
    MessageMeta {
        trace_id: traceparent.split('-').nth(1).unwrap_or_default().to_string(),
        correlation_id: header(req, "x-request-id").unwrap_or_default(),
        principal_id: header(req, "x-principal-id"),
        tenant_id: header(req, "x-tenant-id"),
        sender: None,
        idempotency_key: None,
        traceparent,
    }
}

/// `POST /v1/events/{eventName}` → 201 `{"id","position"}` once committed.
pub async fn publish_one(app: &App, name: &str, req: Request<Incoming>) -> ApiResult {
    check_name(name)?;
    let meta = meta_of(&req);
    let key = header(&req, "idempotency-key");
    let body = super::read_body(req, app.settings.max_body).await?;
    serde_json::from_slice::<serde::de::IgnoredAny>(&body).map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
    let event = new_event(name, body.to_vec(), &meta, None, key);
    let (id, position) = app.broker.publish_one(event).await.map_err(unshare)?;
    Ok(json_response(StatusCode::CREATED, &serde_json::json!({ "id": id, "position": position })))
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

/// `POST /v1/events` with a JSON array → 201 `{"events":[{"id","position"},..]}` once committed.
pub async fn publish_batch(app: &App, req: Request<Incoming>) -> ApiResult {
    let meta = meta_of(&req);
    let body = super::read_body(req, app.settings.max_body).await?;
    let items: Vec<BatchItem> =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("expected an array of events: {e}")))?;
    if items.is_empty() || items.len() > MAX_BATCH_REQUEST {
        return Err(ApiError::BadRequest(format!("a batch holds 1..={MAX_BATCH_REQUEST} events")));
    }
    let mut events = Vec::with_capacity(items.len());
    for item in items {
        check_name(&item.event_name)?;
        let payload = item.payload.map_or_else(|| b"null".to_vec(), |p| p.get().as_bytes().to_vec());
        events.push(new_event(&item.event_name, payload, &meta, None, item.idempotency_key));
    }
    let ids = app.broker.publish_batch(events).await.map_err(unshare)?;
    let list: Vec<serde_json::Value> = ids.into_iter().map(|(id, position)| serde_json::json!({"id": id, "position": position})).collect();
    Ok(json_response(StatusCode::CREATED, &serde_json::json!({ "events": list })))
}

/// `GET /v1/events?after=N&limit=M[&eventName=..]`: the log in order, from the local replica
/// (every committed event is on every node once applied).
pub fn read(app: &App, query: Option<&str>) -> ApiResult {
    let q = parse_query(query.unwrap_or("")).ok_or_else(|| ApiError::BadRequest("malformed query".into()))?;
    let num = |k: &str, default: u64| -> Result<u64, ApiError> {
        q.get(k).map_or(Ok(default), |v| v.parse().map_err(|_| ApiError::BadRequest(format!("{k} must be a number"))))
    };
    let after = num("after", 0)?;
    let limit = num("limit", 100)?.clamp(1, MAX_READ as u64) as usize;
    let (events, next) = app.sm.events_after(after, limit, q.get("eventName").map(String::as_str));
    let list: Vec<serde_json::Value> = events.iter().map(|e| e.to_json()).collect();
    let (first, end) = app.sm.event_bounds();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "events": list, "next": next, "first": first, "end": end.saturating_sub(1) }),
    ))
}

/// `GET /v1/dead-letters?subscription=NAME`.
pub fn dead_letters(app: &App, query: Option<&str>) -> ApiResult {
    let q = parse_query(query.unwrap_or("")).ok_or_else(|| ApiError::BadRequest("malformed query".into()))?;
    let name = q.get("subscription").ok_or_else(|| ApiError::BadRequest("subscription=NAME is required".into()))?;
    let state = app.sm.subscription(name).ok_or_else(|| ApiError::NotFound(format!("no subscription {name}")))?;
    let list: Vec<serde_json::Value> = state
        .dead
        .iter()
        .map(|d| {
            let event = app.sm.event(d.position).map(|e| e.to_json());
            serde_json::json!({"position": d.position, "eventId": d.event_id, "attempts": d.attempts,
                "reason": d.reason, "node": d.node, "event": event})
        })
        .collect();
    Ok(json_response(StatusCode::OK, &serde_json::json!({ "subscription": name, "deadLetters": list })))
}

/// `GET /v1/subscriptions/{name}`: replicated progress, for operators and tests.
pub fn subscription(app: &App, name: &str) -> ApiResult {
    let s = app.sm.subscription(name).ok_or_else(|| ApiError::NotFound(format!("no subscription {name}")))?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "name": name,
            "shared": s.decl.shared,
            "durable": s.decl.durable,
            "cursor": s.cursor,
            "doneAhead": s.done.len(),
            "retrying": s.attempts.len(),
            "deadLetters": s.dead.len(),
            "instances": s.instances,
        }),
    ))
}
