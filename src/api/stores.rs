//! The store routes: `/v1/state`, `/v1/config` and `/v1/secrets`, each a key
//! (`/{store}/{key}`: GET, PUT, DELETE) or a listing of a store's keys (`/{store}`: GET).
//!
//! The three share one handler per shape, as they share one replicated map (`store::Space`):
//! what differs is that the secret store's routes want the node's `--secrets-token` as a bearer
//! token and never list values, and that its values are sealed on the way in and opened on the
//! way out (`store::secret`).
//!
//! Reads may be long polls, as Consul's blocking queries: a GET with the tag of what the client
//! holds (`If-None-Match: "<etag>"`, or `?index=<etag>`) and `?wait=30s` is answered once what
//! it reads changed, or when the wait is over with a 304. The tag of a key is its revision, that
//! of a listing its largest revision and key count (`store::ListTag`), equal on every node, so a
//! client may move between nodes. A node holds at most `MAX_LONG_POLLS` at once (503 past it) and
//! ends them all when its drain begins, so they neither hold the drain nor run it out of tasks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http::Method;
use http::Request;
use http::Response;
use http::StatusCode;
use http_body_util::Full;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::ApiResult;
use super::App;
use crate::store::Consistency;
use crate::store::Space;

/// Long polls a node holds at once.
pub const MAX_LONG_POLLS: usize = 1024;
/// The longest `?wait=` (a longer one is cut to it, as Consul cuts its own).
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// The long polls of a node: how many may wait, and the stop that ends them at the drain.
pub struct LongPolls {
    /// Cancelled by `api::run` when the drain begins; never reset.
    pub stop: CancellationToken,
    /// `MAX_LONG_POLLS` permits; never closed.
    slots: Arc<tokio::sync::Semaphore>,
}

impl LongPolls {
    pub fn new() -> LongPolls {
        LongPolls { stop: CancellationToken::new(), slots: Arc::new(tokio::sync::Semaphore::new(MAX_LONG_POLLS)) }
    }

    pub(super) fn slot(&self) -> Result<Held, ApiError> {
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| ApiError::Busy(format!("this node holds {MAX_LONG_POLLS} long polls already")))?;
        metrics::gauge!("raftbridge_long_polls").increment(1.0);
        Ok(Held(permit))
    }
}

/// A long poll's place, counted in `raftbridge_long_polls` while held.
pub(super) struct Held(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Drop for Held {
    fn drop(&mut self) {
        metrics::gauge!("raftbridge_long_polls").decrement(1.0);
    }
}

impl Default for LongPolls {
    fn default() -> Self {
        LongPolls::new()
    }
}

/// What a read asked for besides the value: its consistency, and a long poll's known tags and
/// wait.
struct ReadArgs {
    consistency: Consistency,
    /// The tags the client holds (`If-None-Match`, `?index=`); `*` stands for any.
    known: Vec<String>,
    wait: Option<Duration>,
    q: std::collections::BTreeMap<String, String>,
}

/// A long poll's `?wait=` (`ms`, `s` or `m`), at most `MAX_WAIT`; absent: `None`. The stores'
/// reads and the event log's read take it alike.
pub(super) fn parse_wait(q: &std::collections::BTreeMap<String, String>) -> Result<Option<Duration>, ApiError> {
    q.get("wait")
        .map(|w| {
            crate::config::parse_duration(w)
                .map(|d| d.min(MAX_WAIT))
                .map_err(|_| ApiError::BadRequest(format!("wait must be a duration such as 30s or 500ms, got {:?}", super::cut(w, 64))))
        })
        .transpose()
}

impl ReadArgs {
    fn parse(req: &Request<Incoming>) -> Result<ReadArgs, ApiError> {
        // Read as every other query parameter is (`parse_query`: percent-decoded, the last of
        // repeated ones).
        let q = crate::proxy::routing::parse_query(req.uri().query().unwrap_or("")).ok_or_else(|| ApiError::BadRequest("malformed query".into()))?;
        let consistency = match q.get("consistency").map(String::as_str) {
            None | Some("linearizable") | Some("strong") => Consistency::Linearizable,
            Some("stale") => Consistency::Stale,
            Some(other) => return Err(ApiError::BadRequest(format!("unknown consistency {:?}", super::cut(other, 64)))),
        };
        if q.contains_key("ttl") {
            return Err(no_ttl());
        }
        let wait = parse_wait(&q)?;
        let mut known = Vec::new();
        for line in req.headers().get_all(http::header::IF_NONE_MATCH) {
            let text = line.to_str().map_err(|_| ApiError::BadRequest("If-None-Match is not text".into()))?;
            // A list of entity tags (RFC 9110 §13.1.2); a weak one compares as a strong one here.
            known.extend(text.split(',').map(|t| t.trim().trim_start_matches("W/").trim_matches('"').to_string()).filter(|t| !t.is_empty()));
        }
        if let Some(index) = q.get("index") {
            known.push(index.trim_matches('"').to_string());
        }
        Ok(ReadArgs { consistency, known, wait, q })
    }

    /// Whether the client holds `tag` (`*`: any tag of something that exists).
    fn holds(&self, tag: &str, exists: bool) -> bool {
        self.known.iter().any(|k| k == tag || (k == "*" && exists))
    }
}

/// The secret store's routes take only the node's `--secrets-token`, as a bearer token.
pub(super) fn authorize(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(token) = &app.secrets_token else {
        return Err(ApiError::Forbidden("the secret store's HTTP API is off on this node: start it with --secrets-token".into()));
    };
    let given = super::bearer(req)?;
    match given {
        Some(given) if token.matches(given.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized { realm: super::REALM_SECRETS, message: "the bearer token is not this node's --secrets-token".into() }),
        None => Err(ApiError::Unauthorized {
            realm: super::REALM_SECRETS,
            message: "the secret store wants a bearer token (Authorization: Bearer <--secrets-token>)".into(),
        }),
    }
}

fn etag(tag: &str) -> HeaderValue {
    // Digits and a dash: always a valid header value.
    HeaderValue::from_str(&format!("\"{tag}\"")).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

/// A long poll that waited and found nothing changed is a read at its end, not at its start: a
/// node cut off from the cluster while the poll waited (its copy stale, a change committed
/// elsewhere) answered "still current" (304) for the whole wait, up to 5 minutes, a reloading
/// client keeping its stale config. So the poll passes the read barrier again (unless the
/// client asked for a stale read) and is judged on the copy after it; a node out of touch
/// answers 503, and the client polls another node.
async fn barrier_again(plain: &crate::store::StateStore, store: &str, consistency: Consistency) -> Result<Option<imbl::OrdMap<String, crate::raft::state_machine::Versioned>>, ApiError> {
    plain.barrier(consistency).await?;
    Ok(plain.map(store)?)
}

fn not_modified(tag: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    resp.headers_mut().insert(http::header::ETAG, etag(tag));
    resp
}


/// A write's `?ttl=N` (whole seconds, 1 to `store::MAX_TTL_S`), if it names one.
fn ttl(req: &Request<Incoming>) -> Result<Option<Duration>, ApiError> {
    let q = crate::proxy::routing::parse_query(req.uri().query().unwrap_or("")).ok_or_else(|| ApiError::BadRequest("malformed query".into()))?;
    let Some(text) = q.get("ttl") else { return Ok(None) };
    match text.parse::<u64>() {
        Ok(s) if (1..=crate::store::MAX_TTL_S).contains(&s) => Ok(Some(Duration::from_secs(s))),
        _ => Err(ApiError::BadRequest(format!("ttl: whole seconds from 1 to {}, not {:?}", crate::store::MAX_TTL_S, super::cut(text, 32)))),
    }
}

/// A `ttl` where no write takes one (a read, a delete): refused rather than ignored, as a
/// client that meant to set an expiry would otherwise believe it had.
fn no_ttl() -> ApiError {
    ApiError::BadRequest("ttl: only a PUT of a key takes one".into())
}

/// `METHOD /v1/{space}/{store}/{key}`.
///
/// Every answer under `/v1/secrets`, errors included, says `Cache-Control: no-store`
/// (`api::handle`, for whatever makes it): a cache on the way keeps neither a value nor what a
/// 404 or a revision tells.
pub(super) async fn key(app: &App, space: Space, method: Method, store: &str, key: &str, req: Request<Incoming>) -> ApiResult {
    if space == Space::Secrets {
        authorize(app, &req)?;
    }
    let plain = app.store.in_space(space);
    // Only the secret routes need the sealer (a state read is the hot path of this handler).
    let secrets = (space == Space::Secrets).then(|| app.store.secrets());
    if secrets.as_ref().is_some_and(|s| !s.is_on()) {
        return Err(crate::store::secret::SecretError::Off.into());
    }
    crate::store::check_names(store, key)?;
    match method {
        Method::GET => {
            let args = ReadArgs::parse(&req)?;
            plain.barrier(args.consistency).await?;
            let mut map = plain.map(store)?;
            let tag_of = |m: Option<&imbl::OrdMap<String, crate::raft::state_machine::Versioned>>| crate::store::key_tag(m, key);
            let unchanged = |m: Option<&imbl::OrdMap<String, crate::raft::state_machine::Versioned>>| {
                let tag = tag_of(m);
                args.holds(&tag.max_revision.to_string(), tag.keys > 0)
            };
            if let Some(wait) = args.wait.filter(|_| unchanged(map.as_ref())) {
                let _slot = app.long_polls.slot()?;
                map = plain.wait_changed(store, key, unchanged, wait, &app.long_polls.stop).await?;
                if unchanged(map.as_ref()) {
                    map = barrier_again(&plain, store, args.consistency).await?;
                }
            }
            let tag = tag_of(map.as_ref()).max_revision.to_string();
            if unchanged(map.as_ref()) {
                return Ok(not_modified(&tag));
            }
            let Some(v) = map.as_ref().and_then(|m| m.get(key)) else {
                // With the absent key's tag ("0"), as Consul's 404 carries its index: a watcher
                // that polls on with the tag of the value it last saw would be answered this
                // 404 at once, every time, until the key came back.
                let mut resp = ApiError::NotFound(format!("no key {}/{}", super::cut(store, 128), super::cut(key, 256))).into_response();
                resp.headers_mut().insert(http::header::ETAG, etag(&tag));
                return Ok(resp);
            };
            let value = match &secrets {
                Some(secrets) => secrets.open(store, key, &v.value)?,
                None => v.value.clone(),
            };
            let mut resp = Response::new(Full::new(Bytes::from(value)));
            resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp.headers_mut().insert("x-revision", HeaderValue::from(v.revision));
            if let Some(at) = plain.expires_at(store, key, v.revision) {
                resp.headers_mut().insert("x-expires-at-ms", HeaderValue::from(at));
            }
            resp.headers_mut().insert(http::header::ETAG, etag(&tag));
            Ok(resp)
        }
        Method::PUT => {
            let pre = super::precondition(&req)?;
            let ttl = ttl(&req)?;
            if ttl.is_some() && secrets.is_some() {
                return Err(ApiError::BadRequest("ttl: secrets do not expire (delete one to end it)".into()));
            }
            let body = super::read_body(req, app.settings.max_body, &app.settings.bodies).await?;
            let written = match (&secrets, ttl) {
                (Some(secrets), _) => secrets.put_if(store, key, &body, pre).await.map_err(|e| match e {
                    crate::store::secret::SecretError::Store(e) => write_error(e),
                    other => other.into(),
                }),
                (None, Some(ttl)) => plain.put_expiring_if(store, key, &body, pre, ttl).await.map_err(write_error),
                (None, None) => plain.put_if(store, key, &body, pre).await.map_err(write_error),
            };
            let revision = written?;
            let mut resp = super::json_response(StatusCode::OK, &serde_json::json!({ "revision": revision }));
            resp.headers_mut().insert("x-revision", HeaderValue::from(revision));
            resp.headers_mut().insert(http::header::ETAG, etag(&revision.to_string()));
            Ok(resp)
        }
        Method::DELETE => {
            if req.uri().query().is_some_and(|q| crate::proxy::routing::parse_query(q).is_some_and(|q| q.contains_key("ttl"))) {
                return Err(no_ttl());
            }
            let pre = super::precondition(&req)?;
            if plain.delete_if(store, key, pre).await.map_err(write_error)? {
                Ok(super::json_response(StatusCode::OK, &serde_json::json!({ "deleted": true })))
            } else {
                Err(ApiError::NotFound(format!("no key {}/{}", super::cut(store, 128), super::cut(key, 256))))
            }
        }
        _ => Err(super::not_allowed("GET, HEAD, PUT, DELETE")),
    }
}

/// A store write whose outcome is unknown (it reached the leader, then the deadline passed,
/// its link failed, or the leader discarded its entry) says how to learn it here: the store's
/// routes take no `Idempotency-Key` (the generic message names it, for commands and events), so
/// a client that repeated the write with one applied it twice.
fn write_error(e: crate::store::StoreError) -> ApiError {
    unknown_outcome(e, "read the key back, or make the write conditional with If-Match, to learn it: the state routes take no Idempotency-Key")
}

/// `write_error` for a transaction: its ops' revisions say whether it applied.
fn txn_error(e: crate::store::StoreError) -> ApiError {
    unknown_outcome(e, "read its keys back, or give each write an ifRevision or a check, to learn it: the state routes take no Idempotency-Key")
}

/// A 503 (a 502 when the leader itself reported the entry discarded) whose message says the
/// write may have applied and how to learn it (`advice`); any other error as mapped in one place.
fn unknown_outcome(e: crate::store::StoreError, advice: &str) -> ApiError {
    use crate::raft::ReplicaError;
    use crate::store::StoreError;
    match e {
        StoreError::Replica(ReplicaError::Undecided) => ApiError::Unavailable(format!("no quorum within the deadline; the write reached the leader and may still commit ({advice})")),
        StoreError::Replica(ReplicaError::Forward { leader, source }) => {
            ApiError::Unavailable(format!("leader {leader}: {source}; the write reached the leader and its outcome is unknown (it may have committed: {advice})"))
        }
        // The leader's own word that the entry was lost, by the start of its message (the wire
        // has no variant of its own for it; another build's wording falls to the generic 502).
        StoreError::Replica(ReplicaError::Remote(crate::peer::message::RemoteError::Internal(m))) if m.starts_with(crate::raft::DISCARDED) => {
            ApiError::BadGateway(format!("{}: its outcome is unknown (it may have committed, or may still commit: {advice})", crate::raft::DISCARDED))
        }
        StoreError::Replica(ReplicaError::Remote(crate::peer::message::RemoteError::Internal(m))) if m.starts_with(crate::raft::STOPPED) => {
            ApiError::BadGateway(format!("{m}; the leader's raft stopped under the write (it may have committed, or may still commit: {advice})"))
        }
        other => other.into(),
    }
}


/// One item of a transaction's `operations` (`POST /v1/{state|config}/{store}`): a flat
/// record rather than a tagged enum, as serde reads a `RawValue` (the value kept as the client
/// wrote it, as a PUT keeps its body) only outside a tagged enum's buffering.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TxnItem {
    op: String,
    key: String,
    /// Present (`null` too) or absent, told apart: `Option` alone reads `null` as absent.
    #[serde(default, deserialize_with = "present")]
    value: Option<Box<serde_json::value::RawValue>>,
    if_revision: Option<u64>,
    revision: Option<u64>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<serde_json::value::RawValue>>, D::Error> {
    <Box<serde_json::value::RawValue> as serde::Deserialize>::deserialize(d).map(Some)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnBody {
    operations: Vec<TxnItem>,
}

/// `POST /v1/{state|config}/{store}` with `{"operations":[{"op":"put","key","value",
/// "ifRevision"?}, {"op":"delete","key","ifRevision"?}, {"op":"check","key","revision"}]}`:
/// the writes all or none under one revision (`StateStore::transaction`), as Consul's `/v1/txn`
/// and Dapr's state transactions; 200 `{"revision":N}`, or 412 naming the first operation
/// whose revision did not match (`failed`), with nothing written; 400 for a malformed one and
/// for an `If-Match` or `If-None-Match` header (each operation takes its own precondition).
pub(super) async fn transaction(app: &App, space: Space, store: &str, req: Request<Incoming>) -> ApiResult {
    // A habit from PUT that would otherwise be ignored and write unconditionally.
    if req.headers().contains_key(http::header::IF_MATCH) || req.headers().contains_key(http::header::IF_NONE_MATCH) {
        return Err(ApiError::BadRequest(
            "a transaction takes no If-Match or If-None-Match: give each operation its precondition (\"ifRevision\", or a \"check\" operation)".into(),
        ));
    }
    let body = super::read_body(req, app.settings.max_body, &app.settings.bodies).await?;
    let parsed: TxnBody = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("a transaction is {{\"operations\":[{{\"op\":\"put\"|\"delete\"|\"check\",\"key\",..}}]}}: {e}")))?;
    let mut ops = Vec::with_capacity(parsed.operations.len().min(crate::store::MAX_TXN_OPS));
    for (i, item) in parsed.operations.into_iter().enumerate() {
        let bad = |what: &str| ApiError::BadRequest(format!("operation {i} ({:?}): {what}", super::cut(&item.op, 32)));
        let op = match item.op.as_str() {
            "put" if item.revision.is_some() => return Err(bad("a put takes ifRevision, not revision")),
            "put" => {
                let value = item.value.as_ref().ok_or_else(|| bad("a put needs a value"))?;
                crate::raft::types::TxnOp::Put { key: item.key, value: value.get().as_bytes().to_vec(), if_revision: item.if_revision }
            }
            "delete" if item.value.is_some() || item.revision.is_some() => return Err(bad("a delete takes a key and ifRevision only")),
            "delete" => crate::raft::types::TxnOp::Delete { key: item.key, if_revision: item.if_revision },
            "check" if item.value.is_some() || item.if_revision.is_some() => return Err(bad("a check takes a key and revision only")),
            "check" => crate::raft::types::TxnOp::Check { key: item.key, revision: item.revision.ok_or_else(|| bad("a check needs a revision (0: absent)"))? },
            _ => return Err(bad("op is put, delete or check")),
        };
        ops.push(op);
    }
    drop(body);
    let revision = app.store.in_space(space).transaction(store, ops, None).await.map_err(txn_error)?;
    let mut resp = super::json_response(StatusCode::OK, &serde_json::json!({ "revision": revision }));
    resp.headers_mut().insert("x-revision", HeaderValue::from(revision));
    Ok(resp)
}

/// `GET /v1/{space}/{store}?prefix=P&after=K&limit=N`: the store's keys in order, with their
/// values (not for secrets) and revisions; `next` is the key to continue `after`.
pub(super) async fn listing(app: &App, space: Space, store: &str, req: Request<Incoming>) -> ApiResult {
    if space == Space::Secrets {
        authorize(app, &req)?;
        if !app.store.secrets().is_on() {
            return Err(crate::store::secret::SecretError::Off.into());
        }
    }
    // Bad input before the read barrier: during an election it waited, then answered 503.
    crate::store::check_store_name(store)?;
    let plain = app.store.in_space(space);
    let args = ReadArgs::parse(&req)?;
    let prefix = args.q.get("prefix").map_or("", String::as_str);
    if prefix.len() > crate::store::MAX_KEY {
        return Err(ApiError::BadRequest(format!("prefix must be at most {} bytes", crate::store::MAX_KEY)));
    }
    let after = args.q.get("after").map(String::as_str);
    let limit = match args.q.get("limit") {
        None => crate::store::DEFAULT_LIST,
        Some(v) => match super::decimal(v) {
            Some(n) if n >= 1 => (n as usize).min(crate::store::MAX_LIST),
            _ => return Err(ApiError::BadRequest(format!("limit must be a whole number from 1 (at most {} are listed)", crate::store::MAX_LIST))),
        },
    };
    // A page fits a quarter of the node's answer budget, as an events page does.
    let max_bytes = crate::store::PAGE_BYTES.min(app.settings.answers.total() / 4);
    plain.barrier(args.consistency).await?;
    let mut map = plain.map(store)?;
    let tag_of = |m: Option<&imbl::OrdMap<String, crate::raft::state_machine::Versioned>>| plain.tag_of(store, m, prefix);
    let unchanged = |m: Option<&imbl::OrdMap<String, crate::raft::state_machine::Versioned>>| {
        let tag = tag_of(m);
        args.holds(&tag.to_string(), tag.keys > 0)
    };
    if let Some(wait) = args.wait.filter(|_| unchanged(map.as_ref())) {
        let _slot = app.long_polls.slot()?;
        map = plain.wait_changed(store, prefix, unchanged, wait, &app.long_polls.stop).await?;
        if unchanged(map.as_ref()) {
            map = barrier_again(&plain, store, args.consistency).await?;
        }
    }
    let page = plain.page(store, map.as_ref(), prefix, after, limit, max_bytes);
    let tag = page.tag.to_string();
    if args.holds(&tag, page.tag.keys > 0) {
        return Ok(not_modified(&tag));
    }
    // Each under one look at the expiries; only for the revision listed (`expires_at`).
    let expiries = plain.expiries_of(store, page.items.iter().map(|(k, v)| (k.as_str(), v.revision)));
    let mut body = Vec::with_capacity(64 + page.items.iter().map(|(k, v)| k.len() + v.value.len() + 72).sum::<usize>());
    body.extend_from_slice(b"{\"items\":[");
    for (i, (k, v)) in page.items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"key\":");
        // A string always serializes.
        serde_json::to_writer(&mut body, k).map_err(|e| ApiError::Internal(e.to_string()))?;
        if space != Space::Secrets {
            body.extend_from_slice(b",\"value\":");
            // Values were checked as JSON when written; one that is not is served as null
            // rather than breaking the page.
            match serde_json::from_slice::<&serde_json::value::RawValue>(&v.value) {
                Ok(raw) => body.extend_from_slice(raw.get().as_bytes()),
                Err(_) => body.extend_from_slice(b"null"),
            }
        }
        body.extend_from_slice(format!(",\"revision\":{}", v.revision).as_bytes());
        if let Some(at) = expiries.get(i).copied().flatten() {
            body.extend_from_slice(format!(",\"expiresAtMs\":{at}").as_bytes());
        }
        body.push(b'}');
    }
    body.extend_from_slice(b"],\"next\":");
    serde_json::to_writer(&mut body, &page.next).map_err(|e| ApiError::Internal(e.to_string()))?;
    body.extend_from_slice(format!(",\"index\":\"{tag}\"}}").as_bytes());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(http::header::ETAG, etag(&tag));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store write whose outcome is unknown is told how to learn it on these routes (read
    /// back, `If-Match`, a transaction's revisions), never to repeat it with an
    /// `Idempotency-Key` they do not take: a 503 when the deadline passed or the link failed, a
    /// 502 when the leader reported its entry discarded or its core stopped under it.
    #[test]
    fn an_unknown_outcome_says_how_to_learn_it_here() {
        use crate::peer::message::RemoteError;
        use crate::raft::ReplicaError;
        use crate::store::StoreError;
        let discarded = || StoreError::Replica(ReplicaError::Remote(RemoteError::Internal(format!("{}: its outcome is unknown; repeat it with the same Idempotency-Key", crate::raft::DISCARDED))));
        let stopped = || StoreError::Replica(ReplicaError::Remote(RemoteError::Internal(format!("{}: fatal: storage", crate::raft::STOPPED))));
        for (e, status) in [
            (StoreError::Replica(ReplicaError::Undecided), StatusCode::SERVICE_UNAVAILABLE),
            (discarded(), StatusCode::BAD_GATEWAY),
            (stopped(), StatusCode::BAD_GATEWAY),
        ] {
            let put = write_error(e);
            assert_eq!(put.status(), status);
            assert!(put.to_string().contains("If-Match") && !put.to_string().contains("same Idempotency-Key"), "{put}");
        }
        let txn = txn_error(discarded());
        assert!(txn.to_string().contains("ifRevision") && !txn.to_string().contains("same Idempotency-Key"), "{txn}");
        // Anything else as mapped in one place.
        assert_eq!(write_error(StoreError::PreconditionFailed { current: Some(3) }).status(), StatusCode::PRECONDITION_FAILED);
    }

    #[test]
    fn tokens_compare_whole() {
        let token = crate::peer::ClusterSecret::new(b"0123456789abcdef");
        assert!(token.matches(b"0123456789abcdef"));
        assert!(!token.matches(b"0123456789abcdeg"));
        assert!(!token.matches(b"0123456789abcde"));
        assert!(!crate::peer::ClusterSecret::new(b"").matches(b"x"));
    }
}
