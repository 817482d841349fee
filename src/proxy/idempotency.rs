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
//!    stored, nor a 408, 425 or 429 (`kept`): the claim is released so a retry can run it again.
//!    A sidecar app's answer headers are stored with it (`IdemCompleteWith`, once every member
//!    can apply it), and then its 3xx too when it has a `location`; a replay sends them again,
//!    looked up in this node's record when the answer came from the leader without them.
//!
//! A lease is written in its owner's wall clock. Whether it has lapsed is judged in the owner's
//! clock too: an attempt id names the node that made it (`new_attempt`), and a node waiting on
//! another's claim reads its own clock shifted by that node's measured offset (`peer::clock`,
//! from the pings), less the measure's uncertainty, so a claim whose owner still renews it is not
//! taken over because the waiter's clock runs ahead. That reading also goes into the waiter's
//! `IdemBegin`, which the state machine checks against the lease: a waiter whose clock runs
//! behind need not wait out the difference. A node that holds no record of the key while some
//! peer's clock runs behind its own catches up with the leader's commit first (a read barrier),
//! so a claim made a moment ago elsewhere is judged too, not proposed over blind. The lease a
//! claim writes always ends `LEASE` after its owner's clock. Without a measure (an older build's
//! attempt, a node never linked, or one that has left the cluster, whose reading is forgotten)
//! the waiter's own clock counts, as before. Skew never decides whether an effect applies twice:
//! writes are tagged.

use std::sync::Arc;
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
use crate::peer::clock::ClockOffset;
use crate::raft::state_machine::IdemState;
use crate::raft::types::Command;
use crate::raft::types::CommandResult;
use crate::raft::types::NodeId;
use crate::raft::types::StoredResponse;
use crate::sdk::Invocation;
use crate::sdk::Output;

/// The claim that `expire_records` makes to tick the replicated clock. No client key has this
/// form (theirs are scoped `service/vN/command:key`, a handler's `sub:…`).
const EXPIRY_KEY: &str = "\u{0}expiry";
/// How often the leader looks for idempotency records past their window.
const EXPIRY_CHECK: Duration = Duration::from_secs(30);

/// How often a waiting duplicate looks for the first request's result.
const POLL: Duration = Duration::from_millis(20);
/// A claim's lease; the owner renews it every `RENEW` while the handler runs, so a claim left by
/// a dead proxy lapses within seconds rather than at the request's (maybe long) deadline.
const LEASE: Duration = Duration::from_secs(5);
const RENEW: Duration = Duration::from_secs(2);
/// A claim write that fails with less than this left of the request's deadline failed for the
/// deadline: `Replica::write` gives up as soon as its next pause (up to 220 ms) would cross
/// it, before the deadline itself. A 504, then, not the 503 of a write that found no leader.
const CLAIM_MARGIN: Duration = Duration::from_millis(250);
/// How long past the request's deadline its answer may wait for the write that records it.
const COMPLETE_GRACE: Duration = Duration::from_millis(250);
/// How long a released claim's write may take, in the background (the lease lapses anyway).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// How far ahead of most members a node's clock may run and still claim keys.
const CLOCK_REFUSE: Duration = crate::peer::clock::FAR_AHEAD;

/// An attempt id that names this node (bit 63 set, the node id in bits 32–62, 32 random bits),
/// so that another node can judge its lease in this node's clock (module comment). A node id
/// that does not fit gets a plain random id below bit 63, as older builds made.
fn new_attempt(node: NodeId) -> u64 {
    if node < (1 << 31) {
        (1 << 63) | (node << 32) | u64::from(fastrand::u32(..))
    } else {
        fastrand::u64(1..(1 << 63))
    }
}

/// The node that made `attempt`, if its id names one (`new_attempt`). An older build's random
/// id may seem to name one; its lease is then judged with that node's clock, which a synced
/// cluster keeps within milliseconds of any other.
fn attempt_node(attempt: u64) -> Option<NodeId> {
    (attempt >> 63 == 1).then_some((attempt >> 32) & 0x7fff_ffff)
}

/// `local_ms` read in a clock `offset` from ours: shifted by the offset, less its uncertainty,
/// so that the reading is never ahead of that clock. Unchanged without a measure.
fn in_clock_of(local_ms: u64, offset: Option<ClockOffset>) -> u64 {
    let Some(o) = offset else { return local_ms };
    let shift_ms = o.offset_us.saturating_sub(i64::try_from(o.uncertainty_us).unwrap_or(i64::MAX)) / 1000;
    u64::try_from(i64::try_from(local_ms).unwrap_or(i64::MAX).saturating_add(shift_ms)).unwrap_or(0)
}

/// Whether the answer a key's completion got back (`IdemDone`) is `response` with `headers`:
/// the same status, body and type, and the same headers or none (it crossed a link).
fn first_is_ours<'a>(response: &'a StoredResponse, headers: &'a crate::sdk::HeaderList) -> impl Fn(&StoredResponse) -> bool + 'a {
    move |first| first.same_answer(response) && (first.headers.is_empty() || first.headers == *headers)
}

/// How long a replay waits for this node's record of its key to show the answer's headers.
const HEADERS_CATCH_UP: Duration = Duration::from_secs(1);

/// Whether an answer with `status` is stored as the key's for the window: a 2xx or a 4xx, but
/// not a 5xx nor the 4xx that say "not now" (408 timeout, 425 too early, 429 too many
/// requests: a retry may well succeed, and replaying them for 10 minutes would refuse it). A
/// sidecar app's 3xx is stored only `with_headers` (its `location` among them).
fn kept(status: u16, with_headers: bool) -> bool {
    // Below 200 is no final answer (a handler's 42 went out as a 500 and replayed as a 200).
    // A redirect (3xx, a sidecar app's) is kept only with its headers: replayed without its
    // `Location` it would say nothing.
    (200..500).contains(&status) && (with_headers || !(300..400).contains(&status)) && !matches!(status, 408 | 425 | 429)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What a keyed request asks, as the state machine compares it (`Command::IdemClaim`): FNV-1a
/// (64 bit) taken over 8-byte little-endian words (the last one padded with zeros) instead of
/// bytes, 8 times faster for the same mixing (a body may be 8 MiB, hashed on the runtime), of
/// its path and query parameters (sorted by name) and its body, exactly as received, each part
/// led by its length; with `principal` (once every member puts it in, `IDEM_PRINCIPAL`), then
/// its principal when it names one, after a marker no parameter count takes. The route
/// (service, version, command) and the tenant are in the key already. A function of the bytes
/// alone, written out here, so that every build and node computes the same value for the same
/// request (std's hasher promises no such thing).
///
/// Why the principal: the key is the client's, and two callers of one tenant may pick the same
/// (or one may learn another's): the second then got the first's answer, without the app ever
/// seeing its request (Stripe scopes keys by account). Now it gets a 422, as a key reused with
/// another body does. In the fingerprint rather than the key, so that a node that puts it in and
/// one that does not (the moment the last member announces it) disagree with a 422, never by
/// running the request twice; a request without a principal gets the value it always had.
pub(super) fn fingerprint(inv: &Invocation, principal: bool) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h = OFFSET;
    let mut feed = |bytes: &[u8]| {
        h = (h ^ bytes.len() as u64).wrapping_mul(PRIME);
        let mut words = bytes.chunks_exact(8);
        for w in words.by_ref() {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            h = (h ^ u64::from_le_bytes(word)).wrapping_mul(PRIME);
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            h = (h ^ u64::from_le_bytes(word)).wrapping_mul(PRIME);
        }
    };
    feed(&(inv.params.len() as u64).to_le_bytes());
    for (name, value) in &inv.params {
        feed(name.as_bytes());
        feed(value.as_bytes());
    }
    feed(&inv.payload);
    if let Some(p) = inv.meta.principal_id.as_deref().filter(|_| principal) {
        feed(&u64::MAX.to_le_bytes());
        feed(p.as_bytes());
    }
    h
}

fn replay(stored: StoredResponse) -> Response<Full<Bytes>> {
    let out = Output { status: stored.status, body: Bytes::from(stored.body), content_type: stored.content_type, headers: stored.headers };
    let mut resp = answer(Ok(out));
    resp.headers_mut().insert("idempotent-replay", HeaderValue::from_static("true"));
    resp
}

impl Proxy {
    /// Whether claims are proposed as `IdemTake` (every member applies it).
    fn holds_claims(&self) -> bool {
        self.store.replica().members_have(crate::peer::frame::features::HELD_CLAIMS)
    }

    /// A claim of `key` (also a renewal, a release with no lease, the expiry tick): `IdemTake`
    /// once every member applies it (its tick keeps held claims), else what older builds know,
    /// `IdemClaim` when it names a fingerprint and `IdemBegin` when not.
    fn claim(&self, key: String, attempt: u64, now_ms: u64, lease_ms: u64, window_ms: u64, fingerprint: Option<u64>) -> Command {
        if self.holds_claims() {
            return Command::IdemTake { key, attempt, now_ms, lease_ms, window_ms, fingerprint };
        }
        match fingerprint {
            Some(fingerprint) => Command::IdemClaim { key, attempt, now_ms, lease_ms, window_ms, fingerprint },
            None => Command::IdemBegin { key, attempt, now_ms, lease_ms, window_ms },
        }
    }

    /// On the leader, every `EXPIRY_CHECK`: when idempotency records are past their window (or
    /// over their bounds), a claim of `EXPIRY_KEY` with no lease, which applies the expiry. It
    /// is proposed in the state machine's own clock (the latest any command brought), so a node
    /// whose clock runs ahead expires nothing early. Ends with `shutdown`.
    pub async fn expire_records(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut check = crate::supervise::Ticker::new(EXPIRY_CHECK, &shutdown);
        while check.next().await {
            if !self.store.replica().raft.is_leader() {
                continue;
            }
            let s = &self.settings;
            let full = s.idempotency_window.as_millis() as u64;
            let keep_held = self.holds_claims();
            let Some((clock, window)) = self.sm.idem_expiry_due(full, s.idempotency_max_keys, s.idempotency_max_bytes, keep_held) else { continue };
            let tick = self.claim(EXPIRY_KEY.into(), 0, clock, 0, window, None);
            if let Err(e) = self.store.command(tick, EXPIRY_CHECK).await {
                tracing::debug!(cause = %e, "idempotency expiry not applied; next round");
            }
        }
    }

    pub(super) async fn idempotent(
        &self,
        key: &str,
        inv: Invocation,
        route: &Route,
        client_deadline: Instant,
        deadline: Instant,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        // A claim carries this node's clock (or an owner's), and applying it moves the state
        // machine's clock, which only ever goes forward: from a node whose clock runs far ahead,
        // one claim would shorten every dedup window and age out events early, cluster-wide.
        if let Some(ahead_ms) = self.net.clock_ahead_of_most(CLOCK_REFUSE) {
            metrics::counter!("raftbridge_clock_refusals_total").increment(1);
            return Err(ApiError::Unavailable(format!(
                "this node's clock runs {ahead_ms} ms ahead of most members' (more than {} s): keyed requests are refused here until it is corrected",
                CLOCK_REFUSE.as_secs()
            )));
        }
        // Scoped by command, as the handler's writes are (`run_local`).
        let key = super::idempotency_scope(&route.service, route.version, &route.decl.name, inv.meta.tenant_id.as_deref(), key);
        let attempt = new_attempt(self.node_id);
        // Compared by the state machine only once every member's build can apply the claim
        // that carries it (an older one could not decode the entry and would stall).
        let replica = self.store.replica();
        let print = replica
            .members_have(crate::peer::frame::features::IDEM_FINGERPRINT)
            .then(|| fingerprint(&inv, replica.members_have(crate::peer::frame::features::IDEM_PRINCIPAL)));
        let full_window_ms = self.settings.idempotency_window.as_millis() as u64;
        // Shorter while the records exceed their bounds, so that applying it forgets the oldest.
        let window_ms = |now: u64| {
            let s = &self.settings;
            let w = self.sm.idem_window(now, full_window_ms, s.idempotency_max_keys, s.idempotency_max_bytes, self.holds_claims());
            if w < full_window_ms {
                crate::raft::state_machine::note_shortened_window("commands", w, full_window_ms);
            }
            w
        };
        // Bounded: each pass ends in a return, or waits for a lease that the client's deadline bounds.
        // The client's deadline, not the command's: a request whose client has had its 504 does
        // not go on to claim the key (or wait for another run's answer, then run the handler
        // again for nobody once that answer could not be stored); only a run that holds the
        // claim goes on to the command's own timeout (`Proxy::handle`).
        let mut proposed;
        loop {
            if client_deadline <= Instant::now() {
                return Err(ApiError::Timeout);
            }
            let now = self.claim_clock_ms(&key, attempt, client_deadline).await;
            // Measured after the clock's read barrier, which may have taken some of it.
            let left = client_deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ApiError::Timeout);
            }
            let own = now_ms();
            proposed = Instant::now();
            // Checked in the clock `now` is read in, the lease itself is written in this node's
            // (it ends at `own + LEASE`, as the renewals make it): waiters judge it in the
            // owner's clock.
            let lease_ms = (own + LEASE.as_millis() as u64).saturating_sub(now);
            let window_ms = window_ms(now);
            let begin = self.claim(key.clone(), attempt, now, lease_ms, window_ms, print);
            let claimed = match self.store.command(begin, left).await {
                Ok(claimed) => claimed,
                // The client's deadline ran out waiting for the write: a 504, not the 503 of a
                // write that found no leader within the node's own write timeout.
                Err(_) if client_deadline.saturating_duration_since(Instant::now()) < CLAIM_MARGIN => return Err(ApiError::Timeout),
                Err(e) => return Err(e.into()),
            };
            match claimed {
                CommandResult::IdemBegun => break,
                CommandResult::IdemDone(stored) => return Ok(replay(self.with_headers(&key, stored, client_deadline).await)),
                CommandResult::IdemMismatch => {
                    metrics::counter!("raftbridge_idempotency_mismatches_total").increment(1);
                    return Err(ApiError::Unprocessable(
                        "this Idempotency-Key was first used for a request with other parameters or body; use a new key for a new request".into(),
                    ));
                }
                CommandResult::IdemPending { .. } => {
                    if let Some(stored) = self.wait_for(&key, client_deadline).await {
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
            // The lease is renewed beside the run, not in a select arm: awaiting a renewal's
            // write there stopped the run (a local handler) from being polled for up to `RENEW`
            // each time, exactly when writes are slow. Renewals end with the deadline.
            let renew = async {
                // Counted from when the claim was proposed (its lease runs from then), not from
                // when its write returned: a claim that took longer than `RENEW` to commit is
                // renewed at once, before its lease can lapse and a waiting duplicate take over.
                let mut tick = tokio::time::interval_at(proposed + RENEW, RENEW);
                while Instant::now() < deadline {
                    tick.tick().await;
                    let now = now_ms();
                    let again = self.claim(key.clone(), attempt, now, LEASE.as_millis() as u64, window_ms(now), None);
                    let _ = self.store.command(again, RENEW).await;
                }
            };
            tokio::select! {
                r = &mut run => r,
                () = renew => run.await,
            }
        };
        let left = deadline.saturating_duration_since(Instant::now()).max(COMPLETE_GRACE);
        // An answer's headers are kept with it once every member can apply the entry that
        // carries them (`IdemCompleteWith`); until then a replay has status, body and type.
        let with_headers = self.store.replica().members_have(crate::peer::frame::features::APP_HEADERS);
        // A redirect is kept only with its `location`: stored without headers (not every member
        // can, or none came back over an older build's link) it would say nothing.
        let keeps = |status, headers: &crate::sdk::HeaderList| kept(status, with_headers && headers.iter().any(|(n, _)| n == "location"));
        match result {
            Ok((out, _)) if out.as_ref().map_or_else(|e| keeps(e.status, &e.headers), |o| keeps(o.status, &o.headers)) => {
                let (response, headers) = match &out {
                    Ok(o) => (StoredResponse { status: o.status, body: o.body.to_vec(), content_type: o.content_type.clone(), headers: Vec::new() }, o.headers.clone()),
                    Err(e) => (
                        StoredResponse {
                            status: e.status,
                            body: e.to_json().to_string().into_bytes(),
                            content_type: Some("application/json".into()),
                            headers: Vec::new(),
                        },
                        e.headers.clone(),
                    ),
                };
                let complete = if with_headers && !headers.is_empty() {
                    Command::IdemCompleteWith { key: key.clone(), attempt, response: response.clone(), headers: headers.clone() }
                } else {
                    Command::IdemComplete { key: key.clone(), attempt, response: response.clone() }
                };
                // Ours, unless another attempt finished first (its lease lapsed while ours ran):
                // its answer stands, headers and all. One that came back from the leader without
                // headers (to a follower's forwarded write) is taken as ours when its status,
                // body and type are: looking for its headers here would cost every keyed
                // command of an app through a follower a read barrier, for a race of two
                // attempts whose answers differ in their headers alone.
                let ours = first_is_ours(&response, &headers);
                match self.store.command(complete, left).await {
                    Ok(CommandResult::IdemDone(first)) if !ours(&first) => Ok(replay(self.with_headers(&key, first, deadline).await)),
                    // Recorded, or not recorded (no quorum): the effects are committed either way,
                    // and a retry re-runs with deduplicated writes.
                    _ => Ok(answer(out)),
                }
            }
            other => {
                // Nothing to keep: release the claim so a retry need not wait the lease out, in
                // the background: the client's answer (a 504 at its deadline, say) does not wait
                // for that write, which may be what failed.
                let now = now_ms();
                let release = self.claim(key, attempt, now, 0, window_ms(now), None);
                let store = self.store.clone();
                tokio::spawn(async move {
                    let _ = store.command(release, RELEASE_TIMEOUT).await;
                });
                other.map(|(out, _)| answer(out))
            }
        }
    }

    /// The time a claim of `key` by `attempt` is proposed with: the current owner's clock
    /// (`owner_clock_capped_ms`) if another attempt holds it, else this node's. What this node has
    /// applied may lag what is committed (a claim made a moment ago elsewhere): proposing blind
    /// in its own clock, a node whose clock runs more than the lease ahead would take over such
    /// a claim at once. So when it holds no record of the key and some peer's clock is (or may
    /// be, unmeasured) more than `MAX_OFFSET` behind, it first catches up with the leader's
    /// commit (a read barrier, one round trip); in a synced cluster it need not.
    async fn claim_clock_ms(&self, key: &str, attempt: u64, deadline: Instant) -> u64 {
        // Per keyed request: `idem_owner` copies no stored answer, as `idem_state` would.
        let mut holder = self.sm.idem_owner(key);
        if holder.is_none() && !self.net.no_peer_clock_behind(crate::peer::clock::MAX_OFFSET) {
            let left = deadline.saturating_duration_since(Instant::now());
            // Without a leader the claim itself fails and is retried: nothing to judge here.
            let _ = self.store.replica().read_barrier(left).await;
            holder = self.sm.idem_owner(key);
        }
        match holder {
            // Never more than `CLOCK_REFUSE` past this node's own clock: an owner whose clock
            // runs further ahead (it claimed before it had measured its peers) must not have its
            // clock carried into the state machine by the nodes that wait for it. Its claim then
            // looks held a while longer, and the waiter waits (bounded by its deadline).
            Some(Some(owner)) if owner != attempt => self.owner_clock_capped_ms(owner),
            _ => now_ms(),
        }
    }

    /// `stored` with its headers: an `IdemDone` a follower's forwarded write got back from the
    /// leader does not carry them (older builds share its encoding), this node's record of the
    /// key does once it has applied it (a read barrier catches up, at most once, within the
    /// deadline). Without a record here that is the same answer, `stored` as it came.
    async fn with_headers(&self, key: &str, stored: StoredResponse, deadline: Instant) -> StoredResponse {
        if !stored.headers.is_empty() || !self.store.replica().members_have(crate::peer::frame::features::APP_HEADERS) {
            return stored;
        }
        for pass in 0..2 {
            if let Some(IdemState::Done(local)) = self.sm.idem_state(key) {
                if local.same_answer(&stored) {
                    return local;
                }
            }
            // Briefly: the answer is in hand, and a leader that is gone would hold it until the
            // deadline.
            let left = deadline.saturating_duration_since(Instant::now()).min(HEADERS_CATCH_UP);
            if pass == 0 && !left.is_zero() {
                let _ = self.store.replica().read_barrier(left).await;
            }
        }
        stored
    }

    /// Now, in the clock of the node that made `owner` (module comment), never more than
    /// `CLOCK_REFUSE` past this node's own (`claim_clock_ms`).
    fn owner_clock_capped_ms(&self, owner: u64) -> u64 {
        let owners = in_clock_of(now_ms(), attempt_node(owner).and_then(|n| self.net.last_clock_offset(n)));
        owners.min(now_ms().saturating_add(CLOCK_REFUSE.as_millis() as u64))
    }

    /// Wait until the key is done (its answer) or the other attempt's lease lapses (`None`), by
    /// its owner's clock. The claim is committed (`IdemBegin` answered `IdemPending`) but maybe
    /// not applied here yet: while this node holds no record of the key it catches up once (a
    /// read barrier); a record still missing after that was forgotten (its window or the records'
    /// bounds), and the key is free to claim.
    async fn wait_for(&self, key: &str, deadline: Instant) -> Option<StoredResponse> {
        let mut tick = tokio::time::interval(POLL);
        let mut caught_up = false;
        loop {
            tick.tick().await;
            let lapsed = match self.sm.idem_state(key) {
                Some(IdemState::Done(stored)) => return Some(stored),
                // By the clock the claims go by (`claim_clock_ms`): a lease that lapsed only by
                // an owner's clock far ahead is not over for a claim either, and waiting on it
                // here, rather than claiming again at once, keeps the two from making a loop of
                // writes until the deadline.
                Some(IdemState::Pending { attempt: owner, until_ms: held }) => self.owner_clock_capped_ms(owner) >= held,
                None if caught_up => true,
                None => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    caught_up = self.store.replica().read_barrier(left).await.is_ok();
                    false
                }
            };
            if lapsed || Instant::now() >= deadline {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same request gets the same fingerprint whatever else differs (trace, principal,
    /// deadline); another body, parameter value or split of the same bytes gets another; a
    /// fixed value pins the function, which every build must compute alike.
    #[test]
    fn a_fingerprint_names_the_parameters_and_body() {
        let inv = |params: &[(&str, &str)], body: &str| Invocation {
            service: "s".into(),
            version: 1,
            command: "c".into(),
            params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            payload: Bytes::from(body.to_string()),
            meta: crate::sdk::MessageMeta::default(),
            timeout_ms: 1000,
            headers: Vec::new(),
        };
        let base = fingerprint(&inv(&[("id", "7")], "{\"n\":1}"), true);
        let mut other_meta = inv(&[("id", "7")], "{\"n\":1}");
        other_meta.meta.trace_id = "t".into();
        other_meta.timeout_ms = 5;
        assert_eq!(fingerprint(&other_meta, true), base);
        // The principal counts once every member puts it in; without one, the value is the
        // one it always was.
        let mut bob = other_meta.clone();
        bob.meta.principal_id = Some("bob".into());
        assert_eq!(fingerprint(&bob, false), base);
        let by_bob = fingerprint(&bob, true);
        assert_ne!(by_bob, base);
        bob.meta.principal_id = Some("alice".into());
        assert_ne!(fingerprint(&bob, true), by_bob);
        assert_eq!(fingerprint(&inv(&[("id", "7")], "{\"n\":1}"), false), base);
        for (params, body) in [
            (&[("id", "8")][..], "{\"n\":1}"),
            (&[("id", "7")][..], "{\"n\":2}"),
            (&[("id", "7")][..], "{\"n\":1} "),
            (&[][..], "{\"n\":1}"),
            (&[("i", "d7")][..], "{\"n\":1}"),
            (&[("id", "7"), ("x", "")][..], "{\"n\":1}"),
        ] {
            assert_ne!(fingerprint(&inv(params, body), true), base, "{params:?} {body}");
        }
        // Eight bytes and nine: the padded last word is told apart by the length.
        assert_ne!(fingerprint(&inv(&[], "12345678"), true), fingerprint(&inv(&[], "12345678\0"), true));
        assert_eq!(fingerprint(&inv(&[("id", "7")], "{\"n\":1}"), true), 0xb7be_e41b_6d50_ab8d, "the function every build computes");
        let mut carol = inv(&[("id", "7")], "{\"n\":1}");
        carol.meta.principal_id = Some("carol".into());
        assert_eq!(fingerprint(&carol, true), 0x3e17_7755_f10d_6394, "with a principal too");
    }

    /// 2xx and 4xx answers are the key's for the window, but not 5xx nor the 4xx that say "not
    /// now": a retry of those runs again. A redirect is kept only where its headers are.
    #[test]
    fn answers_that_say_not_now_are_not_kept() {
        for with_headers in [false, true] {
            for status in [200, 201, 204, 400, 404, 409, 412, 422] {
                assert!(kept(status, with_headers), "{status}");
            }
            for status in [0, 42, 100, 199, 408, 425, 429, 500, 502, 503, 504] {
                assert!(!kept(status, with_headers), "{status}");
            }
        }
        for status in [301, 303, 304, 307, 308] {
            assert!(kept(status, true) && !kept(status, false), "{status}");
        }
    }

    /// A completion's `IdemDone` is ours when it is our answer, with our headers or none (an
    /// answer forwarded from the leader carries none); another attempt's answer is not.
    #[test]
    fn a_completion_knows_its_own_answer() {
        let headers: crate::sdk::HeaderList = vec![("location".into(), b"/a".to_vec())];
        let ours = StoredResponse { status: 201, body: b"{}".to_vec(), content_type: None, headers: Vec::new() };
        let is_ours = first_is_ours(&ours, &headers);
        assert!(is_ours(&ours), "as forwarded: no headers");
        assert!(is_ours(&StoredResponse { headers: headers.clone(), ..ours.clone() }));
        assert!(!is_ours(&StoredResponse { headers: vec![("location".into(), b"/b".to_vec())], ..ours.clone() }), "another attempt's location");
        assert!(!is_ours(&StoredResponse { body: b"{\"n\":2}".to_vec(), ..ours.clone() }));
        assert!(!is_ours(&StoredResponse { status: 200, ..ours.clone() }));
    }

    #[test]
    fn an_attempt_names_the_node_that_made_it() {
        for node in [1, 7, (1 << 31) - 1] {
            let a = new_attempt(node);
            assert_eq!(attempt_node(a), Some(node), "{a:#x}");
            assert_ne!(a, new_attempt(node), "attempts of one node differ");
        }
        // An id too large to fit: a plain random attempt, which names no node.
        for _ in 0..100 {
            let a = new_attempt(1 << 40);
            assert!(a != 0 && attempt_node(a).is_none(), "{a:#x}");
        }
    }

    #[test]
    fn a_lease_is_judged_in_its_owners_clock_never_ahead_of_it() {
        let off = |offset_us, uncertainty_us| Some(ClockOffset { offset_us, uncertainty_us });
        assert_eq!(in_clock_of(100_000, None), 100_000, "unmeasured: our clock");
        // The owner runs 10 s behind us: its lease of 5 s from its now lapses 10 s later by ours.
        assert_eq!(in_clock_of(100_000, off(-10_000_000, 0)), 90_000);
        // It runs 10 s ahead: no need to wait out the difference.
        assert_eq!(in_clock_of(100_000, off(10_000_000, 0)), 110_000);
        // The round trip's uncertainty counts against the waiter: never read ahead of the owner.
        assert_eq!(in_clock_of(100_000, off(10_000_000, 2_000)), 109_998);
        assert_eq!(in_clock_of(100_000, off(0, 3_000)), 99_997);
        assert_eq!(in_clock_of(1_000, off(-10_000_000, 0)), 0, "saturates at the epoch");
    }
}
