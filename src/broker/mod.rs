//! The broker: publishing events into the replicated log and delivering them to subscriptions.
//!
//! Why it is built this way:
//! - *Events are Raft entries.* `Command::Publish` carries a batch of events; the state machine
//!   assigns positions when it applies the entry, so every node has the same log, and a 201 is
//!   sent only after the entry is committed (fsynced on a quorum). Events are kept by the state
//!   machine within the retention limits (count, bytes, age) and persist through the Raft log and
//!   snapshots; positions survive restarts.
//! - *Batching.* Publishers on a node queue their events; a batcher turns everything queued into
//!   one `Publish` entry, with at most `MAX_INFLIGHT_BATCHES` entries in flight. While those are
//!   being committed, new events queue up and form the next batch: no fixed linger when idle,
//!   large batches under load (bounded by `MAX_BATCH`).
//! - *Delivery is driven by the leader for shared subscriptions* (`dispatch.rs`): it reads the
//!   replicated progress (cursor, done set, attempts), hands each pending event to one live
//!   consumer instance, and commits acks and failures back through Raft. A new leader resumes from
//!   the replicated state, so an event is delivered at least once whatever fails; a delivery not
//!   acked within the ack deadline is given to another instance; after `max_attempts` it goes to
//!   the dead letters. Every-instance subscriptions are driven by each node for itself, with its
//!   position replicated.

pub mod dispatch;
pub mod event;

use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;

use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use self::event::EventBody;
use self::event::NewEvent;
use crate::raft::types::Command;
use crate::raft::types::CommandResult;
use crate::raft::types::EventLimits;
use crate::sdk::MessageMeta;
use crate::sdk::Sender;
use crate::store::StateStore;
use crate::store::StoreError;

/// Events per `Publish` entry at most.
pub const MAX_BATCH: usize = 500;
/// `Publish` entries a node has in flight at most. Small on purpose: with 32, a node with ~20
/// concurrent publishers always had a free slot and sent every event as its own entry (median
/// batch 1, measured with `raftbridge bench events`); with 2 the median batch is ~5 under the
/// same load, throughput is the same and p99/p999 publish-ack latency is lower. All in-flight
/// entries go to the same leader, so more slots would not help during a failover either.
const MAX_INFLIGHT_BATCHES: usize = 2;
/// Events waiting to be batched at most (publishers wait beyond it: backpressure).
const QUEUE: usize = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the broker is shutting down")]
    Stopped,
    #[error("unexpected result from the state machine")]
    Unexpected,
}

type Pending = (NewEvent, oneshot::Sender<Result<(String, u64), Arc<BrokerError>>>);

pub struct Broker {
    store: StateStore,
    limits: EventLimits,
    /// Feeds the batcher; closed when the broker (every clone of the Arc) is dropped.
    queue: mpsc::Sender<Pending>,
    timeout: Duration,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A new random event id (32 hex digits).
pub fn new_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// Build an event from a handler's or an HTTP producer's context.
pub fn new_event(
    event_name: &str,
    payload: Vec<u8>,
    meta: &MessageMeta,
    sender: Option<Sender>,
    idempotency_key: Option<String>,
) -> NewEvent {
    let body = EventBody {
        id: new_id(),
        event_name: event_name.to_string(),
        timestamp: now_ms(),
        message_type: "customMessage".into(),
        sender,
        principal_id: meta.principal_id.clone(),
        tenant_id: meta.tenant_id.clone(),
        trace_id: Some(meta.trace_id.clone()).filter(|t| !t.is_empty()),
        correlation_id: Some(meta.correlation_id.clone()).filter(|c| !c.is_empty()),
        payload,
    };
    NewEvent { body, idempotency_key }
}

impl Broker {
    pub fn start(store: StateStore, limits: EventLimits, timeout: Duration, shutdown: CancellationToken) -> Arc<Broker> {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(batcher(store.clone(), limits, timeout, rx, shutdown));
        Arc::new(Broker { store, limits, queue: tx, timeout })
    }

    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// Publish one event through the batcher; (id, position) once committed.
    pub async fn publish_one(&self, event: NewEvent) -> Result<(String, u64), Arc<BrokerError>> {
        let (tx, rx) = oneshot::channel();
        self.queue.send((event, tx)).await.map_err(|_| Arc::new(BrokerError::Stopped))?;
        rx.await.map_err(|_| Arc::new(BrokerError::Stopped))?
    }

    /// Publish a client's batch as one entry (all or nothing); (id, position) per event.
    pub async fn publish_batch(&self, events: Vec<NewEvent>) -> Result<Vec<(String, u64)>, BrokerError> {
        let cmd = Command::Publish { now_ms: now_ms(), events, limits: self.limits };
        match self.store.command(cmd, self.timeout).await? {
            CommandResult::Published(ids) => Ok(ids),
            _ => Err(BrokerError::Unexpected),
        }
    }
}

async fn batcher(
    store: StateStore,
    limits: EventLimits,
    timeout: Duration,
    mut rx: mpsc::Receiver<Pending>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT_BATCHES));
    loop {
        // Wait for a free slot first: while all are busy, events accumulate into the next batch.
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let first = tokio::select! {
            f = rx.recv() => match f { Some(f) => f, None => return },
            _ = shutdown.cancelled() => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        metrics::histogram!("raftbridge_publish_batch_events").record(batch.len() as f64);
        let store = store.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (events, txs): (Vec<NewEvent>, Vec<_>) = batch.into_iter().unzip();
            let n = events.len();
            let cmd = Command::Publish { now_ms: now_ms(), events, limits };
            match store.command(cmd, timeout).await {
                Ok(CommandResult::Published(ids)) if ids.len() == n => {
                    for (tx, id) in txs.into_iter().zip(ids) {
                        let _ = tx.send(Ok(id));
                    }
                }
                Ok(_) => {
                    let e = Arc::new(BrokerError::Unexpected);
                    for tx in txs {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    let e = Arc::new(BrokerError::Store(e));
                    for tx in txs {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}
