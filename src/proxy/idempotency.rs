//! Exactly-once effects for requests with an `Idempotency-Key`.
//!
//! The key's life is a replicated record (`state_machine::IdemRecord`):
//! 1. `IdemBegin` claims the key for this attempt with a lease (the request's deadline). Raft
//!    orders concurrent claims, so of two concurrent requests with one key exactly one runs the
//!    handler; the other waits for the result (or for the lease to lapse, then takes over).
//! 2. The handler runs; every state write it makes is tagged (key, sequence number) and applied
//!    once. If the node running it dies, the proxy retries elsewhere under the same claim, and the
//!    re-run's writes are answered from the record instead of applied again: the effect happens
//!    exactly once even though the handler ran twice.
//! 3. `IdemComplete` stores the first finished answer (2xx or 4xx); later requests with the key
//!    get it back with `idempotent-replay: true` until the window (10 min) passes. A 5xx is not
//!    stored: the claim is released so a retry can run it again.
//!
//! Leases use the proxies' wall clocks; skew between nodes only moves when a stalled claim may be
//! taken over, never whether an effect applies twice.

use std::time::Duration;
use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::Full;
use hyper::Response;
use tokio::time::Instant;

use super::Proxy;
use super::answer;
use super::routing::Route;
use crate::api::error::ApiError;
use crate::raft::state_machine::IdemState;
use crate::raft::types::Command;
use crate::raft::types::CommandResult;
use crate::raft::types::StoredResponse;
use crate::sdk::Invocation;
use crate::sdk::Output;

/// How often a waiting duplicate looks for the first request's result.
const POLL: Duration = Duration::from_millis(20);
/// A claim's lease; the owner renews it every `RENEW` while the handler runs, so a claim left by
/// a dead proxy lapses within seconds rather than at the request's (maybe long) deadline.
const LEASE: Duration = Duration::from_secs(5);
const RENEW: Duration = Duration::from_secs(2);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn replay(stored: StoredResponse) -> Response<Full<Bytes>> {
    let out = Output { status: stored.status, body: Bytes::from(stored.body), content_type: stored.content_type };
    let mut resp = answer(Ok(out));
    resp.headers_mut().insert("idempotent-replay", HeaderValue::from_static("true"));
    resp
}

impl Proxy {
    pub(super) async fn idempotent(
        &self,
        key: &str,
        inv: Invocation,
        route: &Route,
        deadline: Instant,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        // Scoped by command, as the handler's writes are (`run_local`).
        let key = super::idempotency_scope(&route.service, route.version, &route.decl.name, key);
        let attempt = fastrand::u64(1..);
        let full_window_ms = self.settings.idempotency_window.as_millis() as u64;
        // Shorter while the records exceed their bounds, so that applying it forgets the oldest.
        let window_ms = |now: u64| {
            let s = &self.settings;
            let w = self.sm.idem_window(now, full_window_ms, s.idempotency_max_keys, s.idempotency_max_bytes);
            if w < full_window_ms {
                crate::raft::state_machine::note_shortened_window("commands", w, full_window_ms);
            }
            w
        };
        // Bounded: each pass ends in a return, or waits for a lease that the deadline bounds.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ApiError::Timeout);
            }
            let lease_ms = LEASE.as_millis() as u64;
            let now = now_ms();
            let begin = Command::IdemBegin { key: key.clone(), attempt, now_ms: now, lease_ms, window_ms: window_ms(now) };
            match self.store.command(begin, left).await? {
                CommandResult::IdemBegun => break,
                CommandResult::IdemDone(stored) => return Ok(replay(stored)),
                CommandResult::IdemPending { until_ms } => {
                    if let Some(stored) = self.wait_for(&key, until_ms, deadline).await {
                        return Ok(replay(stored));
                    }
                }
                other => return Err(ApiError::Internal(format!("unexpected {other:?}"))),
            }
        }
        // Keyed requests may always be retried on another node: their writes are deduplicated.
        let result = {
            let run = self.dispatch(inv, route, deadline, true);
            tokio::pin!(run);
            let mut renew = tokio::time::interval_at(Instant::now() + RENEW, RENEW);
            loop {
                tokio::select! {
                    r = &mut run => break r,
                    _ = renew.tick() => {
                        let now = now_ms();
                        let again = Command::IdemBegin {
                            key: key.clone(), attempt, now_ms: now, lease_ms: LEASE.as_millis() as u64, window_ms: window_ms(now),
                        };
                        let _ = self.store.command(again, RENEW).await;
                    }
                }
            }
        };
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        match result {
            Ok((out, _)) if out.as_ref().map_or_else(|e| e.status < 500, |o| o.status < 500) => {
                let response = match &out {
                    Ok(o) => StoredResponse { status: o.status, body: o.body.to_vec(), content_type: o.content_type.clone() },
                    Err(e) => StoredResponse {
                        status: e.status,
                        body: e.to_json().to_string().into_bytes(),
                        content_type: Some("application/json".into()),
                    },
                };
                let complete = Command::IdemComplete { key, attempt, response: response.clone() };
                match self.store.command(complete, left).await {
                    // Another attempt finished first (its lease lapsed while ours ran): its answer stands.
                    Ok(CommandResult::IdemDone(first)) if first != response => Ok(replay(first)),
                    // Recorded, or not recorded (no quorum): the effects are committed either way,
                    // and a retry re-runs with deduplicated writes.
                    _ => Ok(answer(out)),
                }
            }
            other => {
                // Nothing to keep: release the claim at once so a retry need not wait the lease out.
                let now = now_ms();
                let release = Command::IdemBegin { key, attempt, now_ms: now, lease_ms: 0, window_ms: window_ms(now) };
                let _ = self.store.command(release, left).await;
                other.map(|(out, _)| answer(out))
            }
        }
    }

    /// Wait until the key is done (its answer) or the other attempt's lease lapses (`None`).
    async fn wait_for(&self, key: &str, until_ms: u64, deadline: Instant) -> Option<StoredResponse> {
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            if let Some(IdemState::Done(stored)) = self.sm.idem_state(key) {
                return Some(stored);
            }
            if now_ms() >= until_ms || Instant::now() >= deadline {
                return None;
            }
        }
    }
}
