//! Supervision of the loops that run for a node's whole life: the event batcher, subscription
//! dispatch and its progress writer, the write forwarder, the membership, address-book and join
//! tasks, the peer listener and link upkeep, the registry, the log guard, certificate reload,
//! metrics upkeep, the sidecar's health check and the HTTP listeners.
//!
//! Why: tokio catches a panic in a spawned task and ends only that task. For a task that serves
//! one request or one connection that is right (and user handlers are caught closer still, in
//! `sdk`). For a loop that the node cannot work without it is not: a batcher that panicked left a
//! node that was up, said ready, and let every publish time out; a dispatcher that panicked
//! stopped delivery on that node without a word. A bug there leaves state nobody can trust, so
//! the node does what it does when its Raft core stops (`node::run`): it logs the panic, drains,
//! and exits with an error, and its own supervisor (systemd `Restart=on-failure`, Kubernetes,
//! compose) starts it again from what its disk holds. Erlang's "let it crash", with the operating
//! system's supervisor as the one-for-all restart.
//!
//! Why one process-wide supervisor rather than a handle passed to every module: a process runs
//! one node at a time (the binary does; an application embedding raftbridge does), its loops are
//! started deep inside the modules that own them, and a panic is process-wide state anyway (as
//! the panic hook is). A node run counts only the panics after its start (`mark`), so a process
//! may run a node again after one failed. `Supervisor::new` makes a separate one for tests.
//!
//! A panic is a failure. So is a return before the loop's stop token fires, for the loops
//! spawned with `spawn_until`: they run until their node stops them, and one that returns
//! earlier (a bug: a `break` or `?` on a path nobody thought of, a channel closed by a part
//! that went away) leaves the node as broken as a panic does, only more quietly. The loops
//! that legitimately end on their own use `spawn`: the join task (once the node is in a
//! cluster) and the write forwarder (when its senders go at shutdown).
//!
//! The supervisor also knows which loops are running (`running_since`): a node run that has
//! returned must have none left, or an application that runs a node again would have two sets
//! (the test of a failed node checks it).

use std::any::Any;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, LazyLock, Mutex};

use futures_util::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::error;

/// A supervised loop that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The loop's name, as given to `spawn`.
    pub task: Cow<'static, str>,
    /// How it ended.
    pub ending: Ending,
}

/// How a supervised loop failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// It panicked, with this message.
    Panicked(String),
    /// It returned while its stop token had not fired (`spawn_until`).
    ReturnedEarly,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.ending {
            Ending::Panicked(cause) => write!(f, "{} panicked: {}", self.task, cause),
            Ending::ReturnedEarly => write!(f, "{} returned while its node was running", self.task),
        }
    }
}

/// Records the loops that failed and wakes whoever waits for one (`failed_since`).
#[derive(Clone)]
pub struct Supervisor {
    /// The failures so far. The sender lives as long as the supervisor (for the global one, the
    /// process), so receivers never see it closed.
    failures: Arc<watch::Sender<Failures>>,
    /// The loops running now, by spawn number; each task removes itself when it ends, however
    /// it ends (`Running`'s drop).
    running: Arc<Mutex<Loops>>,
}

/// The loops a supervisor runs: spawn numbers handed out so far, and the running ones' names.
#[derive(Default)]
struct Loops {
    spawned: u64,
    names: BTreeMap<u64, Cow<'static, str>>,
}

/// Removes a loop from `Supervisor::running` when its task ends: returns, panics (after
/// `catch_unwind`) or is aborted (the future is dropped).
struct Running {
    loops: Arc<Mutex<Loops>>,
    number: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        crate::lock(&self.loops).names.remove(&self.number);
    }
}

/// A point in a supervisor's failures and spawns (`Supervisor::mark`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    failures: u64,
    spawned: u64,
}

/// How many failures a supervisor keeps: a node run needs only the first after its mark, and a
/// node that saw one is exiting.
const KEPT: usize = 16;

#[derive(Default)]
struct Failures {
    /// Panics so far.
    count: u64,
    /// The latest ones (at most `KEPT`), each with its number in `count`.
    recent: VecDeque<(u64, Failure)>,
}

impl Failures {
    fn first_after(&self, mark: Mark) -> Option<Failure> {
        self.recent.iter().find(|(n, _)| *n > mark.failures).map(|(_, f)| f.clone())
    }
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

static GLOBAL: LazyLock<Supervisor> = LazyLock::new(Supervisor::new);

/// The process's supervisor, which `node::run` watches.
pub fn global() -> &'static Supervisor {
    &GLOBAL
}

/// Spawns a loop the node cannot work without, on the process's supervisor; it may end on its
/// own (see the module doc), only a panic is a failure.
pub fn spawn<F>(task: impl Into<Cow<'static, str>>, fut: F) -> JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    GLOBAL.spawn(task, fut)
}

/// Spawns a loop that runs until `stop` fires, on the process's supervisor: a panic, or a
/// return before `stop` fired, is a failure.
pub fn spawn_until<F>(task: impl Into<Cow<'static, str>>, stop: &CancellationToken, fut: F) -> JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    GLOBAL.spawn_until(task, stop, fut)
}

impl Supervisor {
    /// A supervisor of its own (the process's is `global()`).
    pub fn new() -> Supervisor {
        Supervisor { failures: Arc::new(watch::Sender::new(Failures::default())), running: Arc::default() }
    }

    /// Spawns `fut` as a task; if it panics, the panic is logged and recorded. The handle
    /// completes when the task does, also after a panic, so a shutdown that awaits it does not
    /// wait for a loop that is gone; aborting it aborts the loop.
    pub fn spawn<F>(&self, task: impl Into<Cow<'static, str>>, fut: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.supervised(task.into(), None, fut)
    }

    /// As `spawn`, and a return before `stop` fired is recorded as a failure too.
    pub fn spawn_until<F>(&self, task: impl Into<Cow<'static, str>>, stop: &CancellationToken, fut: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.supervised(task.into(), Some(stop.clone()), fut)
    }

    fn supervised<F>(&self, task: Cow<'static, str>, stop: Option<CancellationToken>, fut: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let failures = self.failures.clone();
        let running = {
            let mut loops = crate::lock(&self.running);
            loops.spawned += 1;
            let number = loops.spawned;
            loops.names.insert(number, task.clone());
            Running { loops: self.running.clone(), number }
        };
        // Unwind safety: after a panic nothing reads the loop's state again except the drain,
        // whose locks go on past poisoning (`crate::lock`) and whose waits are all bounded.
        tokio::spawn(async move {
            let _running = running;
            let ending = match AssertUnwindSafe(fut).catch_unwind().await {
                Err(panic) => Ending::Panicked(panic_message(panic.as_ref())),
                Ok(()) if stop.is_some_and(|s| !s.is_cancelled()) => Ending::ReturnedEarly,
                Ok(()) => return,
            };
            match &ending {
                Ending::Panicked(cause) => error!(task = %task, cause = %cause, "a background loop panicked: this node can no \
                    longer be trusted to work; draining and exiting with an error so that it is restarted"),
                Ending::ReturnedEarly => error!(task = %task, "a background loop returned while its node was running: this \
                    node can no longer be trusted to work; draining and exiting with an error so that it is restarted"),
            }
            failures.send_modify(|f| {
                f.count += 1;
                f.recent.push_back((f.count, Failure { task, ending }));
                if f.recent.len() > KEPT {
                    f.recent.pop_front();
                }
            });
        })
    }

    /// Where the failures stand now: a node run takes one at its start and counts only the
    /// panics after it (`failure_since`, `failed_since`).
    pub fn mark(&self) -> Mark {
        Mark { failures: self.failures.borrow().count, spawned: crate::lock(&self.running).spawned }
    }

    /// The names of the loops spawned after `mark` that are still running.
    pub fn running_since(&self, mark: Mark) -> Vec<Cow<'static, str>> {
        crate::lock(&self.running).names.range(mark.spawned + 1..).map(|(_, name)| name.clone()).collect()
    }

    /// The first loop that failed after `mark`, if one has.
    pub fn failure_since(&self, mark: Mark) -> Option<Failure> {
        self.failures.borrow().first_after(mark)
    }

    /// Waits until a supervised loop fails after `mark` (at once if one already has).
    pub async fn failed_since(&self, mark: Mark) -> Failure {
        let mut rx = self.failures.subscribe();
        // Bounded by events: each pass consumes one change. The sender outlives this call
        // (`self` holds it), so `changed` does not err.
        loop {
            if let Some(f) = rx.borrow_and_update().first_after(mark) {
                return f;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// The message a panic carried (`panic!` with a literal or with format arguments), or a
/// placeholder for a payload of another type.
fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&'static str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic payload that is not a string)".into()
    }
}

/// A loop's clock: `next` waits for the next tick every `period` (a late tick is not made up
/// for: the next one comes a whole period after it) and says false once `stop` fires. The
/// periodic loops of a node (registry, expiries, route refresh, metrics upkeep) run on it.
pub struct Ticker {
    interval: tokio::time::Interval,
    stop: CancellationToken,
}

impl Ticker {
    pub fn new(period: std::time::Duration, stop: &CancellationToken) -> Ticker {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticker { interval, stop: stop.clone() }
    }

    /// True at the next tick (the first at once), false once `stop` has fired.
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ticker ticks at once, then each period, and says false once its stop fires.
    #[tokio::test(start_paused = true)]
    async fn a_ticker_ticks_each_period_until_stopped() {
        let stop = CancellationToken::new();
        let mut tick = Ticker::new(std::time::Duration::from_secs(1), &stop);
        let start = tokio::time::Instant::now();
        assert!(tick.next().await);
        assert!(tick.next().await);
        assert_eq!(start.elapsed(), std::time::Duration::from_secs(1));
        stop.cancel();
        assert!(!tick.next().await);
    }
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_panics_is_reported_with_its_message() {
        let sup = Supervisor::new();
        let start = sup.mark();
        let n = 7;
        let handle = sup.spawn("batcher", async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            panic!("slot {n} taken twice");
        });
        assert_eq!(sup.failure_since(start), None);
        let failed = tokio::time::timeout(Duration::from_secs(5), sup.failed_since(start)).await.expect("failure reported");
        assert_eq!(failed, Failure { task: "batcher".into(), ending: Ending::Panicked("slot 7 taken twice".into()) });
        // The handle completes after the panic (a drain awaiting it goes on), without a JoinError.
        handle.await.expect("the supervising task itself does not panic");
        // Reported at once to whoever asks later.
        assert_eq!(sup.failed_since(start).await.task, "batcher");
        // A name built at run time (a subscription's).
        sup.spawn(format!("dispatch of {}", "countOrders"), async { panic!("x") }).await.unwrap();
        assert_eq!(sup.failure_since(start).map(|f| f.task), Some("batcher".into()), "the first failure wins");
    }

    #[tokio::test(start_paused = true)]
    async fn normal_ends_are_not_failures_and_a_mark_skips_earlier_panics() {
        let sup = Supervisor::new();
        let start = sup.mark();
        sup.spawn("ends", async {}).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(60), sup.failed_since(start)).await.is_err(),
            "a loop that returns is not a failure"
        );
        sup.spawn("first", async { panic!("one") }).await.unwrap();
        // A node run started after that panic (in the same process) does not see it.
        let later = sup.mark();
        assert_eq!(sup.failure_since(later), None);
        assert!(tokio::time::timeout(Duration::from_secs(60), sup.failed_since(later)).await.is_err());
        sup.spawn("second", async { panic!("two") }).await.unwrap();
        assert_eq!(sup.failure_since(start).map(|f| f.task), Some("first".into()));
        assert_eq!(sup.failure_since(later).map(|f| f.task), Some("second".into()));
        // More panics than are kept: the marks still find the first one after them that is kept.
        for _ in 0..2 * KEPT {
            sup.spawn("many", async { panic!("again") }).await.unwrap();
        }
        assert_eq!(sup.failure_since(later).map(|f| f.task), Some("many".into()));
        // A payload that is not a string still names its loop.
        let other = Supervisor::new();
        let mark = other.mark();
        other.spawn("odd", async { std::panic::panic_any(42u8) }).await.unwrap();
        let odd = other.failure_since(mark).map(|f| f.ending);
        assert!(matches!(&odd, Some(Ending::Panicked(m)) if m.contains("not a string")), "{odd:?}");
    }

    /// The supervisor lists the loops still running, since a mark: one that returns, panics
    /// or is aborted leaves the list, and loops spawned before the mark are not in it.
    #[tokio::test(start_paused = true)]
    async fn running_loops_are_listed_until_they_end_however_they_end() {
        let sup = Supervisor::new();
        let earlier = sup.spawn("before the mark", std::future::pending());
        let mark = sup.mark();
        assert!(sup.running_since(mark).is_empty());
        let stop = CancellationToken::new();
        let (waits, panics) = (stop.clone(), stop.clone());
        let returns = sup.spawn_until("returns", &stop, async move { waits.cancelled().await });
        let panicking = sup.spawn("panics", async move {
            panics.cancelled().await;
            panic!("on stop");
        });
        let aborted = sup.spawn("aborted", std::future::pending());
        tokio::task::yield_now().await;
        assert_eq!(sup.running_since(mark), ["returns", "panics", "aborted"]);
        aborted.abort();
        let _ = aborted.await;
        assert_eq!(sup.running_since(mark), ["returns", "panics"]);
        stop.cancel();
        returns.await.unwrap();
        panicking.await.unwrap();
        assert!(sup.running_since(mark).is_empty(), "{:?}", sup.running_since(mark));
        assert_eq!(sup.running_since(Mark { failures: 0, spawned: 0 }), ["before the mark"]);
        earlier.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_returns_before_its_stop_is_a_failure_and_one_that_returns_after_is_not() {
        let sup = Supervisor::new();
        let start = sup.mark();
        // Ends when asked: no failure.
        let stop = CancellationToken::new();
        let waits = stop.clone();
        let handle = sup.spawn_until("batcher", &stop, async move { waits.cancelled().await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        handle.await.unwrap();
        assert_eq!(sup.failure_since(start), None);
        // Ends on its own while its stop has not fired: a failure, reported to the waiter.
        let running = CancellationToken::new();
        sup.spawn_until("address book", &running, async {
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let failed = tokio::time::timeout(Duration::from_secs(5), sup.failed_since(start)).await.expect("failure reported");
        assert_eq!(failed, Failure { task: "address book".into(), ending: Ending::ReturnedEarly });
        assert_eq!(failed.to_string(), "address book returned while its node was running");
        // A panic in such a loop is still a panic.
        let later = sup.mark();
        sup.spawn_until("dispatch", &running, async { panic!("boom") }).await.unwrap();
        assert_eq!(sup.failure_since(later).map(|f| f.ending), Some(Ending::Panicked("boom".into())));
    }
}
