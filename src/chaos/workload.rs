//! The steady mixed load of a chaos run, and the record of every operation it tried.
//!
//! Several client tasks run concurrently, each with one keep-alive connection per node. A task
//! stays on one node until a request fails at the transport level or with 5xx, then moves on to
//! the next node (a load balancer would do the same). Every operation is recorded with its
//! *content* and its outcome, because the checker verifies by content, never by counts alone:
//!
//! - **state writes**: `PUT /v1/state/chaos/w-<task>-<n>`, each key written once with a unique
//!   value;
//! - **compare-and-set counters**: GET `chaos/c-<k>` then PUT with `If-Match: <x-revision>` of
//!   `{"n": n+1, "op": <unique id>, "prev": <op id read>}`; the `prev` links let the checker
//!   rebuild the exact chain of writes that took effect;
//! - **keyed increments**: `POST /api/v1/counter/chaos-keyed/increment` with a unique
//!   `Idempotency-Key`, retried with the same key until a 2xx answer (or the run ends; the checker
//!   then finishes it);
//! - **unkeyed increments** of `chaos-unkeyed`: never retried by the client;
//! - **events**: `POST /v1/events/chaos` with a unique nonce that is also the producer's
//!   `Idempotency-Key` (retried like keyed commands). The events API is always built in: a run
//!   whose first publish ([`probe_events`]) fails does not start.
//!
//! Outcomes: `Acked` (2xx), `Rejected` (a definite "no", e.g. 412: it did not take effect) and
//! `Unknown` (timeout, connection lost, 5xx: it may or may not have taken effect).

use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use http::Method;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::client::Conn;
use crate::client::Response;

/// Client-side bound of one request (the node's write timeout is 5 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(7);
/// Command deadline asked of the proxy.
const COMMAND_TIMEOUT_MS: &str = "5000";
pub const KEYED_COUNTER: &str = "chaos-keyed";
pub const UNKEYED_COUNTER: &str = "chaos-unkeyed";
pub const CAS_COUNTERS: usize = 3;
pub const EVENT_NAME: &str = "chaos";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Acked,
    Rejected,
    Unknown,
}

#[derive(Debug, Clone)]
pub struct StateWrite {
    pub key: String,
    pub value: serde_json::Value,
    pub outcome: Outcome,
}

#[derive(Debug, Clone)]
pub struct CasAttempt {
    pub counter: usize,
    pub op: String,
    /// Op id of the value this attempt was based on ("" = the key was absent).
    pub prev: String,
    /// The counter value it writes.
    pub n: u64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone)]
pub struct KeyedOp {
    pub key: String,
    pub attempts: u32,
    /// Counter value of the 2xx answer.
    pub value: Option<i64>,
    pub replayed: bool,
    /// The definite non-2xx answer (status and body) that ended it, if one did.
    pub rejected: Option<String>,
    /// A 2xx that carried no counter value (its body): acknowledged, but its content cannot be
    /// checked, which the checker reports rather than counting the key unresolved.
    pub malformed: Option<String>,
}

#[derive(Debug, Clone)]
pub struct UnkeyedOp {
    pub outcome: Outcome,
    pub value: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct EventOp {
    pub nonce: String,
    pub id: Option<String>,
    pub outcome: Outcome,
}

/// Everything the load did. Ack times are ms since the load started (for unavailability).
#[derive(Debug, Default, Clone)]
pub struct Records {
    pub writes: Vec<StateWrite>,
    pub cas: Vec<CasAttempt>,
    pub keyed: Vec<KeyedOp>,
    pub unkeyed: Vec<UnkeyedOp>,
    pub events: Vec<EventOp>,
    pub ack_ms: Vec<u64>,
}

impl Records {
    fn merge(&mut self, other: Records) {
        self.writes.extend(other.writes);
        self.cas.extend(other.cas);
        self.keyed.extend(other.keyed);
        self.unkeyed.extend(other.unkeyed);
        self.events.extend(other.events);
        self.ack_ms.extend(other.ack_ms);
    }
}

/// One keep-alive connection per node; requests go to the current node, which moves on after
/// a failure.
pub struct Client {
    conns: Vec<Conn>,
    cur: usize,
}

/// What one request came to.
pub enum Reply {
    Ok(Response),
    /// A definite answer that is not 2xx (4xx other than 408/429).
    Refused(Response),
    /// Timeout, connection error, 5xx, 408, 429: the effect is unknown.
    Unknown(String),
}

impl Client {
    pub fn new(addrs: &[String], start: usize) -> Client {
        let conns: Vec<Conn> = addrs.iter().map(|a| Conn::new(a.clone())).collect();
        let cur = if conns.is_empty() { 0 } else { start % conns.len() };
        Client { conns, cur }
    }

    pub fn rotate(&mut self) {
        if !self.conns.is_empty() {
            self.cur = (self.cur + 1) % self.conns.len();
        }
    }

    pub async fn call(&mut self, method: Method, path: &str, headers: &[(&str, &str)], body: Bytes) -> Reply {
        let Some(conn) = self.conns.get_mut(self.cur) else { return Reply::Unknown("no nodes".into()) };
        match conn.request(method, path, headers, body, REQUEST_TIMEOUT).await {
            Ok(r) if r.is_success() => Reply::Ok(r),
            Ok(r) if (400..500).contains(&r.status) && r.status != 408 && r.status != 429 => Reply::Refused(r),
            Ok(r) => {
                self.rotate();
                Reply::Unknown(format!("status {}", r.status))
            }
            Err(e) => {
                self.rotate();
                Reply::Unknown(e.to_string())
            }
        }
    }
}

/// Shared settings of the load tasks.
#[derive(Clone)]
pub struct Load {
    pub addrs: Vec<String>,
    pub seed: u64,
    pub started: Instant,
    pub stop: CancellationToken,
}

impl Load {
    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Pacing between operations of one task; returns false once the load should stop.
    async fn pace(&self, ms: u64) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(Duration::from_millis(ms)) => true,
        }
    }
}

/// How long the event probe retries answers of unknown outcome (503 while the cluster settles,
/// timeouts) before the run fails.
const PROBE_DEADLINE: Duration = Duration::from_secs(30);

/// Publishes the first event (`POST /v1/events/{name}`), so that a run whose event load cannot
/// start fails instead of passing without an event check: the events API is always built in.
/// Answers of unknown outcome are retried (same nonce, which is also the Idempotency-Key) for
/// [`PROBE_DEADLINE`]; a definite non-2xx answer fails at once. The accepted probe event is
/// returned, to be checked like any other.
pub async fn probe_events(load: &Load) -> anyhow::Result<EventOp> {
    let mut client = Client::new(&load.addrs, 0);
    let nonce = format!("probe-{}", load.seed);
    let body = Bytes::from(json!({"nonce": nonce}).to_string());
    let path = format!("/v1/events/{EVENT_NAME}");
    let t = Instant::now();
    let mut last = String::new();
    // Bounded by count and by time (each request by REQUEST_TIMEOUT).
    for _ in 0..200 {
        if t.elapsed() >= PROBE_DEADLINE {
            break;
        }
        match client.call(Method::POST, &path, &[("idempotency-key", nonce.as_str())], body.clone()).await {
            Reply::Ok(r) => {
                let id = r.json::<serde_json::Value>().ok().and_then(|v| v["id"].as_str().map(str::to_string));
                return Ok(EventOp { nonce, id, outcome: Outcome::Acked });
            }
            Reply::Refused(r) => {
                anyhow::bail!("POST {path} answered {} {}: the event load cannot run", r.status, String::from_utf8_lossy(&r.body).trim())
            }
            Reply::Unknown(why) => last = why,
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    anyhow::bail!("POST {path} got no definite answer within {PROBE_DEADLINE:?} (last: {last}): the event load cannot run")
}

/// Runs every load task until `load.stop` is cancelled and returns what they did. A task that
/// fails (panics) takes its records, acknowledged operations included, with it: then the rest
/// of the load is stopped and the run fails, since what it acknowledged can no longer be checked.
pub async fn run(load: Load) -> anyhow::Result<Records> {
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..2 {
        tasks.spawn(writer(load.clone(), t));
        tasks.spawn(cas(load.clone(), t));
        tasks.spawn(keyed(load.clone(), t));
        tasks.spawn(publisher(load.clone(), t));
    }
    tasks.spawn(unkeyed(load.clone()));
    let mut all = Records::default();
    let mut failed = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(r) => all.merge(r),
            Err(e) => {
                tracing::error!(error = %e, "a chaos load task failed");
                failed.push(e.to_string());
                load.stop.cancel();
            }
        }
    }
    anyhow::ensure!(failed.is_empty(), "{} load tasks failed and their records are lost: {}", failed.len(), failed.join("; "));
    Ok(all)
}

async fn writer(load: Load, t: usize) -> Records {
    let mut out = Records::default();
    let mut client = Client::new(&load.addrs, t);
    let mut rng = fastrand::Rng::with_seed(load.seed ^ (0x57 + t as u64));
    let mut n = 0u64;
    while load.pace(8).await {
        n += 1;
        let key = format!("w-{t}-{n}");
        let value = json!({"t": t, "n": n, "nonce": format!("{:016x}", rng.u64(..))});
        let body = Bytes::from(value.to_string());
        let outcome = match client.call(Method::PUT, &format!("/v1/state/chaos/{key}"), &[], body).await {
            Reply::Ok(_) => {
                out.ack_ms.push(load.ms());
                Outcome::Acked
            }
            Reply::Refused(_) => Outcome::Rejected,
            Reply::Unknown(_) => Outcome::Unknown,
        };
        out.writes.push(StateWrite { key, value, outcome });
    }
    out
}

/// Reads a CAS counter: (n, op id, revision); an absent key is (0, "", 0).
pub fn parse_cas_value(body: &[u8]) -> Option<(u64, String)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some((v["n"].as_u64()?, v["op"].as_str()?.to_string()))
}

async fn cas(load: Load, t: usize) -> Records {
    let mut out = Records::default();
    let mut client = Client::new(&load.addrs, t + 1);
    let mut rng = fastrand::Rng::with_seed(load.seed ^ (0xca5 + t as u64));
    let mut seq = 0u64;
    while load.pace(8).await {
        let counter = rng.usize(..CAS_COUNTERS);
        let path = format!("/v1/state/chaos/c-{counter}");
        let (n, prev, revision) = match client.call(Method::GET, &path, &[], Bytes::new()).await {
            Reply::Ok(r) => {
                let rev = r.headers.get("x-revision").and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u64>().ok());
                match (parse_cas_value(&r.body), rev) {
                    (Some((n, op)), Some(rev)) => (n, op, rev),
                    _ => {
                        tracing::error!(body = %String::from_utf8_lossy(&r.body), "chaos: unreadable CAS counter");
                        continue;
                    }
                }
            }
            Reply::Refused(r) if r.status == 404 => (0, String::new(), 0),
            Reply::Refused(_) | Reply::Unknown(_) => continue,
        };
        seq += 1;
        let op = format!("{t}-{seq}");
        let body = Bytes::from(json!({"n": n + 1, "op": op, "prev": prev}).to_string());
        let if_match = revision.to_string();
        let outcome = match client.call(Method::PUT, &path, &[("if-match", &if_match)], body).await {
            Reply::Ok(_) => {
                out.ack_ms.push(load.ms());
                Outcome::Acked
            }
            Reply::Refused(_) => Outcome::Rejected,
            Reply::Unknown(_) => Outcome::Unknown,
        };
        out.cas.push(CasAttempt { counter, op, prev, n: n + 1, outcome });
    }
    out
}

/// Sends one keyed increment until a 2xx or definite answer, `stop`, or `max_attempts`.
pub async fn keyed_increment(client: &mut Client, op: &mut KeyedOp, stop: &CancellationToken, max_attempts: u32) -> bool {
    let path = format!("/api/v1/counter/{KEYED_COUNTER}/increment");
    while op.attempts < max_attempts {
        op.attempts += 1;
        let headers = [("idempotency-key", op.key.as_str()), ("x-timeout-ms", COMMAND_TIMEOUT_MS)];
        match client.call(Method::POST, &path, &headers, Bytes::new()).await {
            Reply::Ok(r) => {
                op.value = r.json::<serde_json::Value>().ok().and_then(|v| v["value"].as_i64());
                if op.value.is_none() {
                    op.malformed = Some(String::from_utf8_lossy(&r.body).chars().take(200).collect());
                }
                op.replayed = r.headers.get("idempotent-replay").is_some_and(|v| v.as_bytes() == b"true");
                return true;
            }
            Reply::Refused(r) if r.status != 404 && r.status != 409 => {
                let why = format!("{} {}", r.status, String::from_utf8_lossy(&r.body));
                tracing::warn!(key = %op.key, answer = %why, "chaos: keyed increment refused");
                op.rejected = Some(why);
                return false;
            }
            // 404/409 can be transient (routing table not yet rebuilt after a restart).
            Reply::Refused(_) | Reply::Unknown(_) => {
                let pause = tokio::time::sleep(Duration::from_millis(100));
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = pause => {}
                }
            }
        }
    }
    false
}

async fn keyed(load: Load, t: usize) -> Records {
    let mut out = Records::default();
    let mut client = Client::new(&load.addrs, t + 2);
    let mut n = 0u64;
    while load.pace(10).await {
        n += 1;
        let mut op = KeyedOp { key: format!("chaos-{}-{t}-{n}", load.seed), attempts: 0, value: None, replayed: false, rejected: None, malformed: None };
        if keyed_increment(&mut client, &mut op, &load.stop, 1_000).await {
            out.ack_ms.push(load.ms());
        }
        out.keyed.push(op);
    }
    out
}

async fn unkeyed(load: Load) -> Records {
    let mut out = Records::default();
    let mut client = Client::new(&load.addrs, 0);
    let path = format!("/api/v1/counter/{UNKEYED_COUNTER}/increment");
    while load.pace(15).await {
        let op = match client.call(Method::POST, &path, &[("x-timeout-ms", COMMAND_TIMEOUT_MS)], Bytes::new()).await {
            Reply::Ok(r) => {
                out.ack_ms.push(load.ms());
                let value = r.json::<serde_json::Value>().ok().and_then(|v| v["value"].as_i64());
                UnkeyedOp { outcome: Outcome::Acked, value }
            }
            Reply::Refused(r) if r.status == 404 || r.status == 409 => UnkeyedOp { outcome: Outcome::Rejected, value: None },
            Reply::Refused(_) => UnkeyedOp { outcome: Outcome::Rejected, value: None },
            Reply::Unknown(_) => UnkeyedOp { outcome: Outcome::Unknown, value: None },
        };
        out.unkeyed.push(op);
    }
    out
}

async fn publisher(load: Load, t: usize) -> Records {
    let mut out = Records::default();
    let mut client = Client::new(&load.addrs, t);
    let mut n = 0u64;
    while load.pace(15).await {
        n += 1;
        // The nonce doubles as the producer's Idempotency-Key: a publish whose answer was lost
        // is retried with it, and must still be in the log exactly once.
        let nonce = format!("{}-{t}-{n}", load.seed);
        let body = Bytes::from(json!({"nonce": nonce}).to_string());
        let mut op = EventOp { nonce: nonce.clone(), id: None, outcome: Outcome::Unknown };
        for _ in 0..1_000 {
            let headers = [("idempotency-key", nonce.as_str())];
            match client.call(Method::POST, &format!("/v1/events/{EVENT_NAME}"), &headers, body.clone()).await {
                Reply::Ok(r) => {
                    out.ack_ms.push(load.ms());
                    op.id = r.json::<serde_json::Value>().ok().and_then(|v| v["id"].as_str().map(str::to_string));
                    op.outcome = Outcome::Acked;
                    break;
                }
                Reply::Refused(_) => {
                    op.outcome = Outcome::Rejected;
                    break;
                }
                Reply::Unknown(_) => {
                    if !load.pace(100).await {
                        break;
                    }
                }
            }
        }
        out.events.push(op);
    }
    out
}
