//! Supervision of the loops that run for a node's whole life: the event batcher, subscription
//! dispatch, write forwarding, membership, the peer listener and link upkeep, the registry, the
//! log guard, the HTTP listeners.
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
//! one node (the binary does; an application embedding raftbridge does), its loops are started
//! deep inside the modules that own them, and a panic is process-wide state anyway (as the panic
//! hook is). `Supervisor::new` makes a separate one for tests.
//!
//! A loop that returns normally is not a failure: every supervised loop ends on its own shutdown
//! token, or when what it serves is gone.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, LazyLock};

use futures_util::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::error;

/// A supervised loop that panicked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The loop's name, as given to `spawn`.
    pub task: &'static str,
    /// The panic's message.
    pub cause: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} panicked: {}", self.task, self.cause)
    }
}

/// Records the first loop that panicked and wakes whoever waits for it (`failed`).
#[derive(Clone)]
pub struct Supervisor {
    /// The first failure, set once and never cleared: the node that saw it is exiting. The
    /// sender lives as long as the supervisor (for the global one, the process), so receivers
    /// never see it closed.
    first: Arc<watch::Sender<Option<Failure>>>,
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

/// Spawns a loop the node cannot work without, on the process's supervisor.
pub fn spawn<F>(task: &'static str, fut: F) -> JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    GLOBAL.spawn(task, fut)
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor { first: Arc::new(watch::Sender::new(None)) }
    }

    /// Spawns `fut` as a task; if it panics, the panic is logged and recorded as this
    /// supervisor's failure (the first one wins). The handle completes when the task does, also
    /// after a panic, so a shutdown that awaits it does not wait for a loop that is gone.
    pub fn spawn<F>(&self, task: &'static str, fut: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let first = self.first.clone();
        // Unwind safety: after a panic nothing reads the loop's state again except the drain,
        // whose locks go on past poisoning (`crate::lock`) and whose waits are all bounded.
        tokio::spawn(async move {
            if let Err(panic) = AssertUnwindSafe(fut).catch_unwind().await {
                let failure = Failure { task, cause: panic_message(panic.as_ref()) };
                error!(task, cause = %failure.cause, "a background loop panicked: this node can no longer be trusted \
                    to work; draining and exiting with an error so that it is restarted");
                first.send_if_modified(|f| {
                    if f.is_some() {
                        return false;
                    }
                    *f = Some(failure);
                    true
                });
            }
        })
    }

    /// The first loop that panicked, if one has.
    pub fn failure(&self) -> Option<Failure> {
        self.first.borrow().clone()
    }

    /// Waits until a supervised loop panics (at once if one already has).
    pub async fn failed(&self) -> Failure {
        let mut rx = self.first.subscribe();
        // Bounded: the value changes once (from None to the first failure). The sender outlives
        // this call (`self` holds it), so `changed` does not err.
        loop {
            if let Some(f) = rx.borrow_and_update().clone() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_panics_is_reported_with_its_message() {
        let sup = Supervisor::new();
        let n = 7;
        let handle = sup.spawn("batcher", async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            panic!("slot {n} taken twice");
        });
        assert_eq!(sup.failure(), None);
        let failed = tokio::time::timeout(Duration::from_secs(5), sup.failed()).await.expect("failure reported");
        assert_eq!(failed, Failure { task: "batcher", cause: "slot 7 taken twice".into() });
        // The handle completes after the panic (a drain awaiting it goes on), without a JoinError.
        handle.await.expect("the supervising task itself does not panic");
        // Reported at once to whoever asks later.
        assert_eq!(sup.failed().await.task, "batcher");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_failure_wins_and_normal_ends_are_not_failures() {
        let sup = Supervisor::new();
        sup.spawn("ends", async {}).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(60), sup.failed()).await.is_err(),
            "a loop that returns is not a failure"
        );
        sup.spawn("first", async { panic!("one") }).await.unwrap();
        sup.spawn("second", async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("two")
        })
        .await
        .unwrap();
        assert_eq!(sup.failure(), Some(Failure { task: "first", cause: "one".into() }));
        // A payload that is not a string still names its loop.
        let other = Supervisor::new();
        other.spawn("odd", async { std::panic::panic_any(42u8) }).await.unwrap();
        assert_eq!(other.failure().map(|f| (f.task, f.cause.contains("not a string"))), Some(("odd", true)));
    }
}
