//! Target choice and retry budget.
//!
//! - *Power of two choices* on `(in-flight + 1) × EWMA latency`: two random candidates, the
//!   cheaper wins. It needs no global view, adapts to a slow node within a few requests, and
//!   avoids the herding of "always the least loaded" (Mitzenmacher; used by Envoy and Linkerd).
//! - The latency estimate *decays toward zero* while a node gets no answers (time constant
//!   `DECAY`, as Linkerd's peak-EWMA does). Without it a node that answered slowly once would
//!   never be picked again under light load: with nothing in flight its cost stays above its
//!   peers', and only a new sample could lower it. With the decay it is probed again within a few
//!   seconds and judged by what it measures then.
//! - *Failures cost latency*: a failed attempt (a lost link, a handler's 500 or its app's 502) is sampled as at
//!   least `FAILURE_PENALTY`, as Finagle's and Linkerd's balancers penalise errors. A node that
//!   fails fast otherwise measured as the cheapest and drew the traffic it could not serve (the
//!   "black hole" of least-latency balancing).
//! - *Outlier ejection*: after `EJECT_AFTER` consecutive failures (infrastructure, or a
//!   handler's 500s and its app's 502s, as Envoy's consecutive-5xx detection) a node is skipped
//!   for that service (the proxy keeps one balancer per service version, as Envoy one per cluster)
//!   for a backoff that doubles with each ejection (1 s … 30 s); one success clears it. If every
//!   candidate is ejected, they are used anyway (a guess beats a certain 503).
//! - *Retry budget*: retries may add at most ~20 % to the request rate plus a floor of 10 per
//!   second, so retries cannot multiply load during an outage (Finagle/Linkerd style).
//!
//! Time comes from `tokio::time::Instant`, so the tests run on a paused clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::lock;
use crate::raft::types::NodeId;

const EJECT_AFTER: u32 = 5;
/// Service versions whose balancers are kept (`Balancers`): far more than a cluster declares;
/// past it all start afresh, as after a restart.
const MAX_BALANCERS: usize = 1_024;

/// One `Balancer` per service version, made on first use. Keyed by version, then name, so that
/// a lookup (once per proxied command) borrows the name instead of allocating a key.
#[derive(Default)]
pub struct Balancers(Mutex<HashMap<u32, HashMap<String, std::sync::Arc<Balancer>>>>);

impl Balancers {
    /// The balancer of `service` v`version`.
    pub fn of(&self, service: &str, version: u32) -> std::sync::Arc<Balancer> {
        let mut all = lock(&self.0);
        if let Some(b) = all.get(&version).and_then(|by_name| by_name.get(service)) {
            return b.clone();
        }
        if all.values().map(HashMap::len).sum::<usize>() >= MAX_BALANCERS {
            all.clear();
        }
        all.entry(version).or_default().entry(service.to_string()).or_default().clone()
    }
}
const EJECT_BASE: Duration = Duration::from_secs(1);
const EJECT_MAX: Duration = Duration::from_secs(30);
/// Weight of a new latency sample in the EWMA.
const EWMA_ALPHA: f64 = 0.2;
/// Latency assumed for a node never measured (ms): zero, so a new or returning node is tried at
/// once and then judged by what it measures (otherwise a faster known node starves it forever).
const EWMA_START_MS: f64 = 0.0;
/// Time constant of the estimate's decay while a node is not answering: a 100× slower sample is
/// forgotten (back to parity) after about 4.6 × `DECAY` without answers.
const DECAY: Duration = Duration::from_secs(1);

/// What a failed attempt counts as in the latency estimate, at least: well above a healthy
/// node's few milliseconds, so that a failing node is picked again only once the decay has
/// brought it back (about 4 × `DECAY` later) or its peers are slower still.
const FAILURE_PENALTY: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
struct NodeStats {
    inflight: u64,
    /// As of `sampled`; read through [`NodeStats::latency_ms`], which applies the decay.
    ewma_ms: f64,
    /// When `ewma_ms` last took a sample (None: never).
    sampled: Option<Instant>,
    failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Default for NodeStats {
    fn default() -> Self {
        NodeStats { inflight: 0, ewma_ms: EWMA_START_MS, sampled: None, failures: 0, ejections: 0, ejected_until: None }
    }
}

impl NodeStats {
    /// The latency estimate at `now`: the EWMA, decayed by the time since its last sample.
    fn latency_ms(&self, now: Instant) -> f64 {
        match self.sampled {
            None => self.ewma_ms,
            Some(t) => {
                let idle = now.saturating_duration_since(t).as_secs_f64();
                self.ewma_ms * (-idle / DECAY.as_secs_f64()).exp()
            }
        }
    }

    /// Folds a request's `latency` into the estimate.
    fn sample(&mut self, latency: Duration, now: Instant) {
        let ms = latency.as_secs_f64() * 1000.0;
        self.ewma_ms = self.latency_ms(now) * (1.0 - EWMA_ALPHA) + ms * EWMA_ALPHA;
        self.sampled = Some(now);
    }
}

#[derive(Default)]
pub struct Balancer {
    stats: Mutex<HashMap<NodeId, NodeStats>>,
}

/// Outcome of one attempt, for the stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The node answered, with what its handler said.
    Answered,
    /// The node answered, but with its handler's 500 (or its sidecar app's failure, a 502):
    /// passed on to the client, and counted as a failure of the node.
    Errored,
    /// The node or the link failed, or the command's own timeout passed while it worked. (A
    /// shorter deadline the client chose ends only the client's wait: the attempt goes on and
    /// finishes with its real outcome and latency, `Proxy::handle`.)
    Failed,
}

impl Balancer {
    /// Pick a target among `candidates` (non-empty), preferring `local` when given and healthy.
    pub fn pick(&self, candidates: &[NodeId], local: Option<NodeId>) -> Option<NodeId> {
        let now = Instant::now();
        let stats = lock(&self.stats);
        let healthy = |id: &NodeId| stats.get(id).and_then(|s| s.ejected_until).is_none_or(|t| t <= now);
        if let Some(l) = local.filter(|l| candidates.contains(l) && healthy(l)) {
            return Some(l);
        }
        let mut pool: Vec<NodeId> = candidates.iter().copied().filter(|c| healthy(c)).collect();
        if pool.is_empty() {
            pool = candidates.to_vec();
        }
        let cost = |id: &NodeId| {
            let (inflight, latency) = stats.get(id).map_or((0, EWMA_START_MS), |s| (s.inflight, s.latency_ms(now)));
            // The small floor keeps in-flight counts meaningful between near-zero latencies.
            (inflight as f64 + 1.0) * (latency + 0.05)
        };
        match pool.len() {
            0 => None,
            1 => Some(pool[0]),
            n => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                Some(if cost(&pool[a]) <= cost(&pool[b]) { pool[a] } else { pool[b] })
            }
        }
    }

    /// Count a request to `node` as in flight until the returned guard is finished or dropped.
    pub fn start(&self, node: NodeId) -> InFlight<'_> {
        lock(&self.stats).entry(node).or_default().inflight += 1;
        InFlight { balancer: self, node, done: false }
    }

    pub fn finish(&self, node: NodeId, outcome: Outcome, latency: Duration) {
        let now = Instant::now();
        let mut stats = lock(&self.stats);
        let s = stats.entry(node).or_default();
        s.inflight = s.inflight.saturating_sub(1);
        match outcome {
            Outcome::Answered => {
                s.sample(latency, now);
                s.failures = 0;
                s.ejections = 0;
                s.ejected_until = None;
            }
            Outcome::Failed | Outcome::Errored => {
                s.sample(latency.max(FAILURE_PENALTY), now);
                s.failures += 1;
                if s.failures >= EJECT_AFTER {
                    s.ejections += 1;
                    s.failures = 0;
                    let backoff = EJECT_BASE.saturating_mul(1 << (s.ejections - 1).min(5)).min(EJECT_MAX);
                    s.ejected_until = Some(now + backoff);
                    metrics::counter!("raftbridge_proxy_ejections_total").increment(1);
                }
            }
        }
    }

    pub fn is_ejected(&self, node: NodeId) -> bool {
        let now = Instant::now();
        lock(&self.stats).get(&node).and_then(|s| s.ejected_until).is_some_and(|t| t > now)
    }
}

/// Token bucket for retries: each request deposits a fifth of a retry, each retry takes a whole
/// one; at least `FLOOR_PER_SEC` retries per second are always allowed.
pub struct RetryBudget {
    state: Mutex<BudgetState>,
}

struct BudgetState {
    /// In fifths of a retry (each request deposits one fifth): integer, so no rounding drift.
    fifths: u32,
    floor_left: u32,
    window: Instant,
}

/// Fifths of a retry per request (1 = 20 %).
const DEPOSIT: u32 = 1;
const RETRY_COST: u32 = 5;
const FLOOR_PER_SEC: u32 = 10;
const MAX_FIFTHS: u32 = 5_000;

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget { state: Mutex::new(BudgetState { fifths: 0, floor_left: FLOOR_PER_SEC, window: Instant::now() }) }
    }
}

impl RetryBudget {
    pub fn deposit(&self) {
        let mut s = lock(&self.state);
        s.fifths = (s.fifths + DEPOSIT).min(MAX_FIFTHS);
    }

    /// True if a retry may be made now (and takes its token).
    pub fn withdraw(&self) -> bool {
        let now = Instant::now();
        let mut s = lock(&self.state);
        if now.duration_since(s.window) >= Duration::from_secs(1) {
            s.window = now;
            s.floor_left = FLOOR_PER_SEC;
        }
        if s.fifths >= RETRY_COST {
            s.fifths -= RETRY_COST;
            true
        } else if s.floor_left > 0 {
            s.floor_left -= 1;
            true
        } else {
            metrics::counter!("raftbridge_proxy_retries_denied_total").increment(1);
            false
        }
    }
}

/// A request in flight to a node, from [`Balancer::start`] until [`InFlight::finish`] records
/// its outcome. Dropped unfinished (the request's future was cancelled: its client went away, a
/// shutdown's grace ended), it still stops counting as in flight, without a latency sample: a
/// leaked count would make the node look busier forever.
pub struct InFlight<'a> {
    balancer: &'a Balancer,
    node: NodeId,
    done: bool,
}

impl InFlight<'_> {
    pub fn finish(mut self, outcome: Outcome, latency: Duration) {
        self.done = true;
        self.balancer.finish(self.node, outcome, latency);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut stats = lock(&self.balancer.stats);
            let s = stats.entry(self.node).or_default();
            s.inflight = s.inflight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_request_stops_counting_as_in_flight() {
        let b = Balancer::default();
        let inflight = |b: &Balancer| lock(&b.stats).get(&2).map_or(0, |s| s.inflight);
        let (one, two) = (b.start(2), b.start(2));
        assert_eq!(inflight(&b), 2);
        drop(one);
        assert_eq!(inflight(&b), 1, "a dropped (cancelled) request is no longer in flight");
        two.finish(Outcome::Answered, Duration::from_millis(1));
        assert_eq!(inflight(&b), 0);
        // A request future cancelled while it waits: its guard goes with it.
        let slow = async {
            let _flight = b.start(2);
            std::future::pending::<()>().await;
        };
        assert!(tokio::time::timeout(Duration::from_millis(10), slow).await.is_err());
        assert_eq!(inflight(&b), 0);
    }

    /// A node that fails fast (a lost link, a handler's quick 500s) must not look like the
    /// fastest one: short of ejection, picks still steer away from it, and 5xx answers count
    /// toward ejection as link failures do.
    #[tokio::test(start_paused = true)]
    async fn a_node_that_fails_fast_is_not_preferred() {
        for failure in [Outcome::Failed, Outcome::Errored] {
            let b = Balancer::default();
            for _ in 0..EJECT_AFTER - 1 {
                b.start(1).finish(Outcome::Answered, Duration::from_millis(5));
                b.start(2).finish(failure, Duration::from_millis(1));
            }
            assert!(!b.is_ejected(2));
            let twos = (0..200).filter(|_| b.pick(&[1, 2], None) == Some(2)).count();
            assert_eq!(twos, 0, "{failure:?}: the failing node was picked {twos} of 200 times");
            b.start(2).finish(failure, Duration::from_millis(1));
            assert!(b.is_ejected(2), "{failure:?}: ejected after {EJECT_AFTER} in a row");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_services_failures_do_not_eject_a_node_for_another() {
        let all = Balancers::default();
        let (failing, other) = (all.of("boom", 1), all.of("users", 1));
        for _ in 0..EJECT_AFTER {
            failing.start(2).finish(Outcome::Errored, Duration::from_millis(1));
        }
        assert!(failing.is_ejected(2));
        assert!(!other.is_ejected(2), "another service's balancer judges node 2 by its own answers");
        assert!(all.of("boom", 1).is_ejected(2), "one balancer per service version");
        assert!(!all.of("boom", 2).is_ejected(2), "another version is another");
        for i in 0..MAX_BALANCERS {
            all.of(&format!("s{i}"), 1);
        }
        assert!(!all.of("boom", 1).is_ejected(2), "past the bound, all start afresh");
    }

    #[tokio::test(start_paused = true)]
    async fn failing_node_is_ejected_with_growing_backoff() {
        let b = Balancer::default();
        for _ in 0..EJECT_AFTER {
            b.start(2).finish(Outcome::Failed, Duration::from_millis(1));
        }
        assert!(b.is_ejected(2));
        for _ in 0..100 {
            assert_eq!(b.pick(&[1, 2], None), Some(1));
        }
        tokio::time::advance(EJECT_BASE + Duration::from_millis(1)).await;
        assert!(!b.is_ejected(2));
        for _ in 0..EJECT_AFTER {
            b.finish(2, Outcome::Failed, Duration::from_millis(1));
        }
        tokio::time::advance(EJECT_BASE + Duration::from_millis(1)).await;
        assert!(b.is_ejected(2), "second ejection lasts twice as long");
        // All ejected: still pick one rather than nothing.
        assert_eq!(b.pick(&[2], None), Some(2));
        b.finish(2, Outcome::Answered, Duration::from_millis(1));
        assert!(!b.is_ejected(2));
    }

    #[tokio::test(start_paused = true)]
    async fn two_choices_prefer_the_faster_node() {
        let b = Balancer::default();
        for _ in 0..20 {
            b.finish(1, Outcome::Answered, Duration::from_millis(50));
            b.finish(2, Outcome::Answered, Duration::from_millis(1));
        }
        let picks_2 = (0..200).filter(|_| b.pick(&[1, 2], None) == Some(2)).count();
        assert_eq!(picks_2, 200, "with two candidates the cheaper one always wins");
        assert_eq!(b.pick(&[1, 2], Some(1)), Some(1), "local first when asked");
    }

    /// Sequential requests (nothing in flight): a node that answered slowly once must be tried
    /// again once its estimate has decayed, not starved for good (a CI run saw node 2 get none of
    /// 396 requests in 30 s after one slow answer).
    #[tokio::test(start_paused = true)]
    async fn a_node_slow_once_is_probed_again_under_light_load() {
        let b = Balancer::default();
        b.finish(2, Outcome::Answered, Duration::from_millis(500));
        let mut picked_2_at = None;
        // 100 requests a second, 1 ms each, for at most 20 s.
        for i in 0..2_000u32 {
            let target = b.pick(&[1, 2, 3], None).expect("a target");
            b.start(target).finish(Outcome::Answered, Duration::from_millis(1));
            if target == 2 {
                picked_2_at = Some(i);
                break;
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        let at = picked_2_at.expect("node 2 picked again within 20 s");
        // 500 ms must decay to about 0.2 ms (the peers' 1 ms EWMA may sit anywhere below 1 ms):
        // ln(2500) × 1 s ≈ 7.8 s at the latest.
        assert!(at >= 300, "not while its estimate is still high (picked at request {at})");
        assert!(at <= 900, "picked at request {at}");
        // Its fresh 1 ms sample makes it a peer again: it gets a fair share.
        let picks_2 = (0..300)
            .filter(|_| {
                let t = b.pick(&[1, 2, 3], None).expect("a target");
                b.start(t).finish(Outcome::Answered, Duration::from_millis(1));
                t == 2
            })
            .count();
        assert!(picks_2 >= 30, "node 2 got {picks_2} of 300 once it answered fast");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_budget_caps_retries() {
        let budget = RetryBudget::default();
        let mut allowed = 0;
        for _ in 0..100 {
            budget.deposit();
        }
        for _ in 0..100 {
            allowed += u32::from(budget.withdraw());
        }
        assert_eq!(allowed, 20 + FLOOR_PER_SEC);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(budget.withdraw(), "the floor refills each second");
    }
}
