//! The replicated state machine: the state store's keys, and the last applied log id and
//! membership, in memory, restored from the last snapshot at start.
//!
//! Why in memory: every read is served from here at memory speed, and the durable log plus the
//! latest snapshot (written atomically to `snapshot.bin`) rebuild it exactly on restart — openraft
//! re-applies committed entries after the snapshot's last log id. Snapshots are a bincode image of
//! the whole state with a CRC; the snapshot policy (`--snapshot-threshold`) bounds how much log is
//! kept and replayed. A snapshot received from the leader is decoded and checked *before* it is
//! handed to openraft, because an install error is fatal to the Raft node.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::RwLock;

use futures_util::StreamExt;
use serde::Deserialize;
use serde::Serialize;

use crate::raft::types::Command;
use crate::raft::types::CommandResult;
use crate::raft::types::Entry;
use crate::raft::types::EntryResponder;
use crate::raft::types::KnownClusterId;
use crate::raft::types::MemberFeatures;
use crate::raft::types::RecordedFeatures;
use crate::raft::types::LogId;
use crate::raft::types::NodeId;
use crate::raft::types::StoredResponse;
use crate::raft::types::TxnOp;
use crate::raft::types::WriteTag;
use crate::broker::event::DeadLetter;
use crate::broker::event::Event;
use crate::broker::event::NewEvent;
use crate::broker::event::SubscriptionDecl;
use crate::raft::types::EventLimits;
use crate::raft::types::SubUpdate;
use crate::sdk::ServiceDecl;
use std::collections::BTreeSet;
use crate::raft::types::RaftSnapshotBuilder;
use crate::raft::types::RaftStateMachine;
use crate::raft::types::Snapshot;
use crate::raft::types::SnapshotData;
use crate::raft::types::SnapshotMeta;
use crate::raft::types::StoredMembershipT;
use crate::raft::types::TypeConfig;

/// One stored value: raw JSON bytes and the log index that last wrote it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Versioned {
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub revision: u64,
}

/// The life of one idempotency key (see `SmData::apply`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IdemRecord {
    pub created_ms: u64,
    pub state: IdemState,
    /// Results of the tagged writes made under this key, by sequence number: a re-run handler
    /// gets the recorded result instead of applying the write again.
    pub effects: BTreeMap<u32, CommandResult>,
    /// What the first claim asked (`Command::IdemClaim`); `None` for a record an `IdemBegin` or a
    /// late `IdemComplete` made, which any request may replay. Not in the record's encoding (the
    /// snapshot layout stays as it was): snapshots carry it in their extension (`SmExt`).
    #[serde(skip)]
    pub fingerprint: Option<u64>,
}

impl IdemRecord {
    /// Claimed by a request whose lease has not lapsed at `clock_ms`: its handler may still run
    /// and its tagged writes be retried, so the record is not forgotten (`SmData::tick`), even
    /// past its window or the count and byte bounds. Bounded by the commands running, each
    /// until its deadline.
    fn held_at(&self, clock_ms: u64) -> bool {
        matches!(self.state, IdemState::Pending { until_ms, .. } if until_ms > clock_ms)
    }
}

/// Held claims one tick moves to the back of the order at most (`SmData::tick`).
const REQUEUE_PER_TICK: usize = 64;
/// How many idempotency records `idem_expiry_due` looks at, past held claims, for one to expire.
const EXPIRY_LOOK: usize = 4096;

/// What forgetting one entry of a creation order frees (`bounded_window`).
enum Forget {
    /// The entry's record and its weight.
    Frees(u64),
    /// The key was forgotten or made again since: the entry holds nothing.
    Stale,
    /// The record stays whatever the window (a claim still held).
    Kept,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum IdemState {
    /// `attempt` runs the request; others wait until `until_ms`, then may take over.
    Pending { attempt: u64, until_ms: u64 },
    Done(StoredResponse),
}

/// About the memory one idempotency record takes: its key, its stored answer, its effects, and a
/// fixed allowance for the map and queue entries.
fn idem_weight(key: &str, rec: &IdemRecord) -> u64 {
    let answer = match &rec.state {
        IdemState::Done(r) => r.body.len() + r.content_type.as_ref().map_or(0, String::len) + crate::proxy::headers::size(&r.headers),
        IdemState::Pending { .. } => 0,
    };
    (2 * key.len() + answer + 64 * rec.effects.len() + 160) as u64
}

/// The window to propose so that applying it leaves at most `max_keys` keys (and `max_bytes` by
/// `weigh`) of those in `order`: `window_ms`, or shorter, so that its horizon (`clock_ms -
/// window`) passes the newest entry that must go.
/// `clock_ms` must be the clock the command will be applied at: at least its own `now_ms`
/// (applying moves the clock there first), so that a command after a quiet spell does not
/// reach back past the keys it should keep.
/// The rule that forgets keys is the replicated one (a command carries its window), so a count
/// or byte bound needs no new rule: the proposer shortens the window it asks for. `weigh` says
/// what forgetting an entry frees: stale entries count for nothing, and kept ones (a claim
/// still held, which applying skips and moves to the back of the order) neither count nor
/// bound the window, so an order that is not in creation order any more is judged right.
fn bounded_window(
    order: &imbl::Vector<(u64, String)>,
    clock_ms: u64,
    window_ms: u64,
    (mut keys, mut bytes): (usize, u64),
    (max_keys, max_bytes): (usize, u64),
    weigh: impl Fn(u64, &str) -> Forget,
) -> u64 {
    let mut newest_gone: Option<u64> = None;
    for (created, key) in order {
        if keys <= max_keys && bytes <= max_bytes {
            break;
        }
        if let Forget::Frees(w) = weigh(*created, key) {
            keys = keys.saturating_sub(1);
            bytes = bytes.saturating_sub(w);
            newest_gone = Some(newest_gone.map_or(*created, |n| n.max(*created)));
        }
    }
    match newest_gone {
        None => window_ms,
        // Applied, the horizon is `newest + 1`: every entry counted above is older.
        Some(newest) => window_ms.min(clock_ms.saturating_sub(newest.saturating_add(1))),
    }
}

/// Counts a proposal whose window was shortened by a count or byte bound, and says so in the
/// log at most once a minute per kind (`events`: producer keys, `commands`: idempotency records).
pub fn note_shortened_window(kind: &'static str, window_ms: u64, configured_ms: u64) {
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering;
    static LAST_EVENTS: AtomicU64 = AtomicU64::new(0);
    static LAST_COMMANDS: AtomicU64 = AtomicU64::new(0);
    metrics::counter!("raftbridge_dedup_window_shortened_total", "kind" => kind).increment(1);
    let last = if kind == "events" { &LAST_EVENTS } else { &LAST_COMMANDS };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let before = last.load(Ordering::Relaxed);
    if now >= before + 60 && last.compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        tracing::warn!(kind, window_ms, configured_ms, "more dedup keys than their bound: the oldest are forgotten before the window ends");
    }
}

/// Moves a shared subscription's cursor over done, filtered-out and expired positions;
/// returns how many events retention took from it (also counted and logged): those it had not
/// settled and that match its filter, judged by `trimmed` (what the trim that just ran took,
/// in position order; positions before it count as they cannot be told apart any more).
fn advance(log: &EventLog, sub: &str, s: &mut SubState, trimmed: &[Arc<Event>]) -> u64 {
    if !s.decl.shared {
        // An every-instance subscription keeps a position per node (`instances`) and gets
        // no acks: its cursor would stop at its first matching event, and every trim after
        // that would be counted and logged as events it lost.
        return 0;
    }
    let mut expired = 0;
    let first = log.first();
    if s.cursor < first {
        // Retention (count, bytes or age) dropped events this durable subscription had not
        // settled: they are gone for it. Said, not silent (positions it had settled ahead of
        // its cursor are not counted, nor events its filter does not take).
        let known = trimmed.first().map_or(first, |e| e.position).clamp(s.cursor, first);
        let unknown = (known - s.cursor).saturating_sub(s.done.range(s.cursor..known).count() as u64);
        let lost = trimmed.iter().filter(|e| e.position >= s.cursor && !s.done.contains(&e.position) && s.decl.filter.matches(e));
        expired = unknown + lost.count() as u64;
        if expired > 0 && !replaying() {
            note_expired(sub, expired, first);
        }
        s.cursor = first;
        s.done = s.done.split_off(&first);
        s.attempts = s.attempts.split_off(&first);
    }
    while s.cursor < log.next {
        let c = s.cursor;
        let skip = s.done.remove(&c) || log.get(c).is_none_or(|e| !s.decl.filter.matches(e));
        if !skip {
            break;
        }
        s.attempts.remove(&c);
        s.cursor += 1;
    }
    expired
}

/// FNV-1a over `bytes`, from `h`.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Where a store's entries start hashing (its name, once per write rather than per entry).
fn store_seed(store: &str) -> u64 {
    fnv(0xcbf2_9ce4_8422_2325, store.as_bytes())
}

/// One state-store entry's share of `SmData::stores_digest`: its store's seed, key, value and
/// revision (separated, so moving bytes between them changes it), mixed so that sums of
/// related entries do not cancel.
fn entry_hash(seed: u64, key: &str, v: &Versioned) -> u64 {
    let h = fnv(fnv(fnv(fnv(seed, &[0xff]), key.as_bytes()), &[0xff]), &v.value);
    let mut z = fnv(h, &v.revision.to_le_bytes());
    // splitmix64's finaliser.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `SmData::stores_digest` counted from scratch.
fn stores_digest(stores: &Stores) -> u64 {
    stores.iter().fold(0u64, |sum, (store, keys)| {
        let seed = store_seed(store);
        keys.iter().fold(sum, |sum, (k, v)| sum.wrapping_add(entry_hash(seed, k, v)))
    })
}

/// How often at most the log says, per subscription, that retention took events from it.
const EXPIRED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Counts events retention took from a shared subscription before it settled them, and says so
/// in the log at most every `EXPIRED_LOG_EVERY` per subscription, with how many since its last
/// line. A durable subscription that no consumer runs loses one event or more to every publish
/// entry once the log is at its retention bound: a line per entry (under apply's lock) flooded
/// the log for as long as such a subscription was declared. The counter stays exact.
fn note_expired(sub: &str, expired: u64, first: u64) {
    use std::sync::Mutex;
    /// As many entries as subscription names that ever lost events, dropped ones included (as
    /// the counter keeps a series for each: the exporter cannot remove one).
    static LOGGED: Mutex<ExpiredLog> = Mutex::new(BTreeMap::new());
    metrics::counter!("raftbridge_subscription_expired_events_total", "subscription" => sub.to_string()).increment(expired);
    if let Some(expired) = expired_to_log(&mut crate::lock(&LOGGED), sub, expired, std::time::Instant::now()) {
        tracing::warn!(subscription = sub, expired, first, "retention dropped events this subscription had not settled (count since this subscription's last such line)");
    }
}

/// Subscription → when retention's losses were last logged for it, and what was taken since.
type ExpiredLog = BTreeMap<String, (Option<std::time::Instant>, u64)>;

/// Adds `expired` to what `sub` lost since its last line; returns the sum when a line is due.
fn expired_to_log(logged: &mut ExpiredLog, sub: &str, expired: u64, now: std::time::Instant) -> Option<u64> {
    if !logged.contains_key(sub) {
        logged.insert(sub.to_string(), (None, 0));
    }
    let (at, held) = logged.get_mut(sub)?;
    *held += expired;
    if at.is_some_and(|t| now.duration_since(t) < EXPIRED_LOG_EVERY) {
        return None;
    }
    *at = Some(now);
    Some(std::mem::take(held))
}

/// Dead letters kept per subscription at most (oldest dropped first).
pub const MAX_DEAD_LETTERS: usize = 10_000;

/// New positions one `pending` call adds to its backlog at most.
const BACKLOG_SCAN: usize = 8_192;

/// Retained positions one `events_after` looks at most (a filtered read of a long log), under
/// the lock apply needs. At 100,000 (the default retention) a client polling for a rare name
/// with the same `after` made each read walk the whole log.
const MAX_SCAN: usize = 10_000;

/// What a shared subscription's delivery loop (on the leader) remembers between its calls to
/// `pending`, so that a call does not walk the whole log ahead of the cursor. It used to: with
/// one event stuck in retries (a handler that hangs until its ack deadline, five times), the
/// events acked after it pile up in `done` and every pass, up to one a millisecond, walked all
/// of them under the state machine's read lock, up to the retention bound (100,000 events by
/// default). Now each retained event is looked at once while the backlog lasts, and a pass
/// walks only the positions still open: pending and in flight (those backing off are parked
/// out of it until due). Sound because, for positions at or above the cursor, being done only
/// ever becomes true and a filter's verdict never changes; anything that breaks that (another
/// filter, a cursor that went back) starts it afresh, and a position is checked against both
/// again before it is handed out.
#[derive(Debug, Default)]
pub struct Backlog {
    /// Positions below are settled (the cursor, or the first retained, when last seen).
    from: u64,
    /// Positions below were looked at.
    scanned: u64,
    /// Positions looked at that matched the filter and were not done then, less the parked
    /// ones, plus those unparked (checked again when walked).
    open: BTreeSet<u64>,
    /// The filter they were matched with.
    filter: Option<crate::broker::event::EventFilter>,
    /// The subscription's `SubState::incarnation` when last looked at afresh.
    incarnation: u64,
}

impl Backlog {
    /// Positions it holds as maybe pending (pending, in flight or backing off, unless parked).
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// Whether `position` is open here (maybe pending or in flight, not parked, not yet found
    /// settled).
    pub fn holds(&self, position: u64) -> bool {
        self.open.contains(&position)
    }

    /// Leaves `position` out of the walk until `unpark`: it is backing off after a failure or
    /// refusal, or waiting for a consumer it has not failed on. A consumer that fails everything
    /// (its downstream is down) puts most of the backlog into backoff, and every pass stepped
    /// over all of it.
    pub fn park(&mut self, position: u64) {
        self.open.remove(&position);
    }

    /// `position`'s backoff is over: walked again (dropped at the next walk if it was settled
    /// meanwhile, or no longer matches a filter declared since).
    pub fn unpark(&mut self, position: u64) {
        if position >= self.from && position < self.scanned {
            self.open.insert(position);
        }
    }
}

/// A number each node gives a subscription's progress whenever it starts anew (`SubState::
/// incarnation`). Node-local: not replicated, not in snapshots, and no part of the state's
/// equality (two nodes number alike progress differently).
#[derive(Debug, Clone, Copy, Default)]
pub struct Incarnation(u64);

impl PartialEq for Incarnation {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A subscription's replicated progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubState {
    pub decl: SubscriptionDecl,
    /// Every position below is done (processed, dead, filtered out or expired).
    pub cursor: u64,
    /// Done positions at or above the cursor (acked out of order).
    pub done: BTreeSet<u64>,
    /// Failed attempts per pending position.
    pub attempts: BTreeMap<u64, u32>,
    pub dead: VecDeque<DeadLetter>,
    /// Every-instance subscriptions: each node's next position.
    pub instances: BTreeMap<NodeId, u64>,
    /// Moves (from `SmData::subs_generation`) whenever this progress starts anew: created
    /// (again, after a drop), a registration resets a non-durable one's cursor, a snapshot is
    /// installed. A delivery loop's `Backlog` remembers it and looks afresh once it moved: a
    /// subscription dropped and declared again with its cursor where it was would otherwise keep
    /// the old one's parked positions out of the walk for good. Per subscription, so one
    /// subscription starting anew leaves the others' backlogs as they are.
    #[serde(skip)]
    pub incarnation: Incarnation,
}

/// A subscription's progress in counts (`SmShared::subscription_summary`).
#[derive(Debug, Clone, PartialEq)]
pub struct SubSummary {
    pub shared: bool,
    pub durable: bool,
    pub cursor: u64,
    pub done_ahead: usize,
    pub retrying: usize,
    pub dead_letters: usize,
    pub instances: BTreeMap<NodeId, u64>,
    /// Registered nodes whose services declare it (none: `DELETE /v1/subscriptions/{name}` may
    /// drop it).
    pub declared_by: Vec<NodeId>,
    /// Those of them whose service is available now (the consumers events go to: a sidecar's
    /// app passes its health check, a client fetches a pull subscription there).
    pub offered_by: Vec<NodeId>,
}

/// `s`'s summary: counts, not copies of its sets (they may hold the whole retained log).
fn summary(d: &SmData, name: &str, s: &SubState) -> SubSummary {
    let declared_by = d.declared_by(name);
    let offered_by = d.registry_nodes(name, true);
    SubSummary {
        shared: s.decl.shared,
        durable: s.decl.durable,
        cursor: s.cursor,
        done_ahead: s.done.len(),
        retrying: s.attempts.len(),
        // The letters as copied here, counted once the lock is let go (`count_listed`).
        dead_letters: s.dead.len(),
        instances: s.instances.clone(),
        declared_by,
        offered_by,
    }
}

/// The replicated event log (retained part) and producer-dedup keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventLog {
    /// Shared so a snapshot can copy the log under the lock in O(n) pointer copies and serialize
    /// it outside, without stalling apply.
    pub events: VecDeque<Arc<Event>>,
    pub bytes: u64,
    /// Position the next event gets (positions start at 1 and survive restarts via the log).
    pub next: u64,
    /// idempotency key → (id, position, accepted at ms). Persistent, as `key_order`, for the
    /// reason `Stores` are (see `ordmap_from_btree_map`).
    #[serde(deserialize_with = "ordmap_from_btree_map")]
    pub keys: imbl::OrdMap<String, (String, u64, u64)>,
    #[serde(deserialize_with = "vector_from_vec_deque")]
    pub key_order: imbl::Vector<(u64, String)>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog { events: VecDeque::new(), bytes: 0, next: 1, keys: imbl::OrdMap::new(), key_order: imbl::Vector::new() }
    }
}

/// The producer-dedup keys (`EventLog::keys`, `key_order`) and the idempotency records
/// (`SmData::idem`, `idem_order`) are persistent too, as `Stores` are: each is up to
/// `--dedup-max-keys` (250,000) entries of strings, and the deep copy a snapshot took of them
/// under the read lock stalled apply 60-100 ms per snapshot for the event keys alone (measured
/// on 250,000 keys and their order), every commit waiting behind it. They encode as the `std`
/// collections did, and decode through them (`ordmap_from_btree_map`, `vector_from_vec_deque`).
fn ordmap_from_btree_map<'de, D, K, V>(d: D) -> Result<imbl::OrdMap<K, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    K: Deserialize<'de> + Ord + Clone,
    V: Deserialize<'de> + Clone,
{
    Ok(BTreeMap::<K, V>::deserialize(d)?.into_iter().collect())
}

/// See `ordmap_from_btree_map`.
fn vector_from_vec_deque<'de, D, T>(d: D) -> Result<imbl::Vector<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Clone,
{
    Ok(VecDeque::<T>::deserialize(d)?.into_iter().collect())
}

impl EventLog {
    pub fn first(&self) -> u64 {
        self.events.front().map_or(self.next, |e| e.position)
    }

    pub fn get(&self, position: u64) -> Option<&Event> {
        let first = self.first();
        if position < first {
            return None;
        }
        self.events.get((position - first) as usize).map(|e| &**e)
    }
}

/// The state stores: store name → key → value. Persistent maps (`imbl`), so that the copy a
/// snapshot takes under the state machine's read lock costs O(1) rather than a copy of every
/// key and value, which apply waited on: 20-55 ms per snapshot with 200,000 keys (`raftbridge
/// bench state --keys 200000`, `copy_us` in the "snapshot built" line). A write after a copy
/// copies the nodes on its path only. They encode as `BTreeMap`s do (length, then the pairs in
/// order), so snapshots of either kind decode as the other.
pub type Stores = imbl::OrdMap<String, imbl::OrdMap<String, Versioned>>;

/// Decodes `Stores` through `BTreeMap`s: `imbl`'s own decoder reserves room for as many entries
/// as the input's length field says, so a corrupt length in a snapshot from a peer would abort
/// the process (a failed allocation) instead of failing the install with an error.
fn stores_from_btree_maps<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Stores, D::Error> {
    let maps = BTreeMap::<String, BTreeMap<String, Versioned>>::deserialize(d)?;
    Ok(maps.into_iter().map(|(store, keys)| (store, keys.into_iter().collect::<imbl::OrdMap<_, _>>())).collect())
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembershipT,
    /// store name → key → value (persistent maps: see `Stores`).
    #[serde(deserialize_with = "stores_from_btree_maps")]
    pub stores: Stores,
    /// The digest of `stores` (`GET /cluster`'s `state_digest`), kept as they change: the
    /// wrapping sum of every entry's `entry_hash`, so a write subtracts the old entry's and adds
    /// the new one's. Hashing every store on each call held the lock apply needs for
    /// milliseconds per MB of state, and the chaos harness polls it. Not in snapshots (their
    /// layout stays as it was): counted again when one is decoded.
    #[serde(skip)]
    pub stores_digest: u64,
    /// How many keys `stores` holds and what they weigh (`entry_weight`), kept as they change
    /// for the store's quota (`store::StateStore`). Not in snapshots: counted when one is decoded.
    #[serde(skip)]
    pub stores_keys: u64,
    #[serde(skip)]
    pub stores_bytes: u64,
    /// Which node offers which services (the routing table's source).
    pub registry: BTreeMap<NodeId, Vec<ServiceDecl>>,
    /// Log index of the last registry change (lets readers cache derived tables).
    pub registry_revision: u64,
    /// Persistent (see `ordmap_from_btree_map`).
    #[serde(deserialize_with = "ordmap_from_btree_map")]
    pub idem: imbl::OrdMap<String, IdemRecord>,
    /// Keys in creation order, for expiry.
    #[serde(deserialize_with = "vector_from_vec_deque")]
    pub idem_order: imbl::Vector<(u64, String)>,
    /// What the idempotency records weigh (`idem_weight`), kept as they change. Not in
    /// snapshots (their layout stays as it was): counted again when one is decoded.
    #[serde(skip)]
    pub idem_bytes: u64,
    /// The latest `now_ms` seen in a command: the state machine's deterministic clock.
    pub clock_ms: u64,
    pub log: EventLog,
    pub subs: BTreeMap<String, SubState>,
    /// The last `SubState::incarnation` this node gave (on this node only: not replicated, not
    /// in snapshots).
    #[serde(skip)]
    pub subs_generation: u64,
    /// Keys that expire (`Command::PutExpiring`). In snapshots through their extension
    /// (`SmExtLast`), so the image's layout stays as it was.
    #[serde(skip)]
    pub expiries: Expiries,
}

/// How many expired keys one `Command::Expire` names at most, and about how many bytes of
/// names: its entry stays small, and the leader proposes the next at once while more are due.
pub const EXPIRE_BATCH: usize = 1024;
pub const EXPIRE_BYTES: usize = 256 << 10;

/// Keys that expire, by when (Unix ms) and by store and key. Persistent maps, as the stores
/// are: the copy of the state a snapshot takes shares them. Looked up by `&str` without
/// allocating (a read of a key asks for its expiry).
#[derive(Debug, Clone, Default)]
pub struct Expiries {
    by_time: imbl::OrdSet<(u64, String, String)>,
    by_key: imbl::OrdMap<String, imbl::OrdMap<String, u64>>,
    len: usize,
}

impl Expiries {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// When `store/key` expires, if it does.
    pub fn of(&self, store: &str, key: &str) -> Option<u64> {
        self.by_key.get(store)?.get(key).copied()
    }

    /// Whether any key of `store` expires.
    pub fn of_store(&self, store: &str) -> bool {
        self.by_key.get(store).is_some_and(|keys| !keys.is_empty())
    }

    /// The earliest expiry.
    pub fn next(&self) -> Option<u64> {
        self.by_time.get_min().map(|(at, _, _)| *at)
    }

    fn set(&mut self, store: &str, key: &str, at: u64) {
        self.clear(store, key);
        self.by_key.entry(store.to_string()).or_default().insert(key.to_string(), at);
        self.by_time.insert((at, store.to_string(), key.to_string()));
        self.len += 1;
    }

    fn clear(&mut self, store: &str, key: &str) {
        // Looked up first: `get_mut` copies the path of nodes a snapshot's copy shares, which
        // every put would otherwise pay once any key expires.
        if self.of(store, key).is_none() {
            return;
        }
        let Some(keys) = self.by_key.get_mut(store) else { return };
        let Some(at) = keys.remove(key) else { return };
        if keys.is_empty() {
            self.by_key.remove(store);
        }
        self.by_time.remove(&(at, store.to_string(), key.to_string()));
        self.len -= 1;
    }

    /// The keys whose expiry is at or before `now`, the earliest first: at most `EXPIRE_BATCH`
    /// of them and about `max_bytes` of names (at least one).
    pub fn due(&self, now: u64, max_bytes: usize) -> Vec<(String, String)> {
        let mut bytes = 0;
        self.by_time
            .iter()
            .take_while(|(at, _, _)| *at <= now)
            .take(EXPIRE_BATCH)
            .take_while(|(_, store, key)| {
                let fits = bytes == 0 || bytes + store.len() + key.len() <= max_bytes;
                bytes += store.len() + key.len() + 16;
                fits
            })
            .map(|(_, store, key)| (store.clone(), key.clone()))
            .collect()
    }
}

/// The reserved store that holds the cluster's id (key `id`, a JSON string of 32 hex digits):
/// a name no client can give (U+0001, as the config and secret spaces), read by no API. A
/// store entry rather than a field of its own, so that every build, older ones included,
/// applies the put that names the cluster alike and keeps it in its snapshots: an id that an
/// older build's snapshot dropped would let the next leader name the cluster again, and
/// nodes that kept the first would refuse the others.
pub const CLUSTER_STORE: &str = "\u{1}cluster";
const CLUSTER_ID_KEY: &str = "id";
/// The reserved key that records the peer features each member announced: a JSON object of
/// node id (a decimal string) to features (`record_features`).
const CLUSTER_FEATURES_KEY: &str = "features";

/// The command that records `by_node` as the members' features, a put of the reserved key
/// while it still has `revision` (0: absent), so that two leaders' records cannot interleave.
/// A put, which every build applies and keeps alike, so no feature gates it.
pub fn record_features(by_node: &BTreeMap<NodeId, u64>, revision: u64) -> Command {
    let object: serde_json::Map<String, serde_json::Value> = by_node.iter().map(|(id, f)| (id.to_string(), serde_json::Value::from(*f))).collect();
    let value = serde_json::Value::Object(object).to_string().into_bytes();
    Command::Put { store: CLUSTER_STORE.into(), key: CLUSTER_FEATURES_KEY.into(), value, if_revision: Some(revision), tag: None }
}

/// The recorded features read back (`record_features`); entries that do not read are left out.
fn parse_features(value: &[u8]) -> BTreeMap<NodeId, u64> {
    let Ok(serde_json::Value::Object(object)) = serde_json::from_slice::<serde_json::Value>(value) else { return BTreeMap::new() };
    object.iter().filter_map(|(id, f)| Some((id.parse().ok()?, f.as_u64()?))).collect()
}

/// The command that names the cluster `id`: a put of the reserved key that applies only while
/// it is absent (the first committed stands).
pub fn name_cluster(id: u128) -> Command {
    Command::Put { store: CLUSTER_STORE.into(), key: CLUSTER_ID_KEY.into(), value: cluster_id_value(id), if_revision: Some(0), tag: None }
}

/// A cluster id as the reserved key holds it: a JSON string of 32 hex digits.
fn cluster_id_value(id: u128) -> Vec<u8> {
    format!("\"{id:032x}\"").into_bytes()
}

/// The reserved key's value read back (`cluster_id_value`).
fn parse_cluster_id(value: &[u8]) -> Option<u128> {
    hex_cluster_id(std::str::from_utf8(value).ok()?.strip_prefix('"')?.strip_suffix('"')?)
}

/// 32 hex digits, as the key and `CLUSTER_ID_FILE` write an id.
fn hex_cluster_id(text: &str) -> Option<u128> {
    u128::from_str_radix(text, 16).ok().filter(|_| text.len() == 32)
}

impl SmData {
    /// The id of the cluster whose history this state holds (`None`: not named yet).
    pub fn cluster_id(&self) -> Option<u128> {
        self.stores.get(CLUSTER_STORE)?.get(CLUSTER_ID_KEY).and_then(|v| parse_cluster_id(&v.value))
    }

    /// The revision of the recorded members' features (0: none recorded).
    fn features_revision(&self) -> u64 {
        self.stores.get(CLUSTER_STORE).and_then(|s| s.get(CLUSTER_FEATURES_KEY)).map_or(0, |v| v.revision)
    }

    /// The recorded members' features (`record_features`).
    pub fn member_features(&self) -> MemberFeatures {
        match self.stores.get(CLUSTER_STORE).and_then(|s| s.get(CLUSTER_FEATURES_KEY)) {
            Some(v) => MemberFeatures { revision: v.revision, by_node: parse_features(&v.value) },
            None => MemberFeatures::default(),
        }
    }

    /// Names the state's cluster `id` in place, whatever it was (`raftbridge snapshot
    /// restore`: a restored cluster gets an id of its own). The revision is the state's last
    /// applied index, as if an entry there had written it; the digest and quota counts are
    /// made again when the state is decoded. The members' features the old cluster recorded
    /// go: the restored cluster's leader records its own.
    pub fn rename_cluster(&mut self, id: u128) {
        let revision = self.last_applied.map_or(0, |l| l.index);
        let value = Versioned { value: cluster_id_value(id), revision };
        let reserved = self.stores.entry(CLUSTER_STORE.to_string()).or_default();
        reserved.insert(CLUSTER_ID_KEY.to_string(), value);
        // The old cluster's members' builds say nothing of the nodes that will join this one.
        reserved.remove(CLUSTER_FEATURES_KEY);
    }
}

/// What one state-store entry weighs for the quota: its names, its value and an allowance for
/// the maps' nodes and the revision.
pub fn entry_weight(store: &str, key: &str, value_len: usize) -> u64 {
    (store.len() + key.len() + value_len + 64) as u64
}

impl SmData {
    /// Counts an entry written with `weight`, replacing one of `old` (`None`: a new key).
    fn count_entry(&mut self, weight: u64, old: Option<u64>) {
        match old {
            None => self.stores_keys += 1,
            Some(old) => self.stores_bytes = self.stores_bytes.saturating_sub(old),
        }
        self.stores_bytes += weight;
    }

    /// Member nodes whose services declare subscription `name`, available or not (such a node
    /// would create it again on its next registration). A node removed from the cluster does not
    /// count: only its own registration clears its entry, which it can no longer make.
    fn declared_by(&self, name: &str) -> Vec<NodeId> {
        self.registry_nodes(name, false)
    }

    /// Member nodes whose services declare subscription `name` (only available ones, if
    /// `available`).
    fn registry_nodes(&self, name: &str, available: bool) -> Vec<NodeId> {
        let members = self.last_membership.membership();
        self.registry
            .iter()
            .filter(|(node, _)| members.get_node(node).is_some())
            .filter(|(_, services)| services.iter().filter(|s| s.available || !available).flat_map(|s| &s.subscriptions).any(|x| x.name == name))
            .map(|(node, _)| *node)
            .collect()
    }

    fn apply(&mut self, index: u64, cmd: Command) -> CommandResult {
        match cmd {
            Command::Put { store, key, value, if_revision, tag } => self.tagged(tag, |d| {
                let seed = store_seed(&store);
                // Checked before the store's map is made: a refused write to a new store used
                // to leave an empty map behind, one per name a client cared to try.
                let current = d.stores.get(&store).and_then(|entries| entries.get(&key)).map(|v| v.revision);
                if let Some(expected) = if_revision {
                    if current.unwrap_or(0) != expected {
                        return CommandResult::PreconditionFailed { current };
                    }
                }
                // A plain put ends an expiry (`PutExpiring` sets its own after this).
                d.expiries.clear(&store, &key);
                let weight = entry_weight(&store, &key, value.len());
                // The reserved cluster id is no client's: outside the store's quota.
                let counted = store != CLUSTER_STORE;
                let entries = d.stores.entry(store).or_default();
                let new = Versioned { value, revision: index };
                let (added, removed) = (entry_hash(seed, &key, &new), entries.get(&key).map_or(0, |old| entry_hash(seed, &key, old)));
                let old_weight = entries.get(&key).map(|old| weight - new.value.len() as u64 + old.value.len() as u64);
                entries.insert(key, new);
                d.stores_digest = d.stores_digest.wrapping_add(added).wrapping_sub(removed);
                if counted {
                    d.count_entry(weight, old_weight);
                }
                CommandResult::Written { revision: index }
            }),
            Command::Increment { store, key, by, tag } => self.tagged(tag, |d| {
                let seed = store_seed(&store);
                let store_name = store.clone();
                let entries = d.stores.entry(store).or_default();
                let current = match entries.get(&key) {
                    None => 0,
                    Some(v) => match serde_json::from_slice::<i64>(&v.value) {
                        Ok(n) => n,
                        Err(_) => return CommandResult::NotANumber,
                    },
                };
                let value = current.saturating_add(by);
                let new = Versioned { value: value.to_string().into_bytes(), revision: index };
                let (added, removed) = (entry_hash(seed, &key, &new), entries.get(&key).map_or(0, |old| entry_hash(seed, &key, old)));
                let weight = entry_weight(&store_name, &key, new.value.len());
                let old_weight = entries.get(&key).map(|old| entry_weight(&store_name, &key, old.value.len()));
                entries.insert(key, new);
                d.stores_digest = d.stores_digest.wrapping_add(added).wrapping_sub(removed);
                d.count_entry(weight, old_weight);
                CommandResult::Incremented { value, revision: index }
            }),
            Command::Delete { store, key, if_revision } => {
                let Some(entries) = self.stores.get_mut(&store) else {
                    return match if_revision {
                        Some(r) if r != 0 => CommandResult::PreconditionFailed { current: None },
                        _ => CommandResult::Deleted { existed: false },
                    };
                };
                let current = entries.get(&key).map(|v| v.revision);
                if let Some(expected) = if_revision {
                    if current.unwrap_or(0) != expected {
                        return CommandResult::PreconditionFailed { current };
                    }
                }
                let removed = entries.remove(&key);
                let existed = removed.is_some();
                self.expiries.clear(&store, &key);
                if let Some(old) = removed {
                    self.stores_digest = self.stores_digest.wrapping_sub(entry_hash(store_seed(&store), &key, &old));
                    self.stores_keys = self.stores_keys.saturating_sub(1);
                    self.stores_bytes = self.stores_bytes.saturating_sub(entry_weight(&store, &key, old.value.len()));
                }
                if entries.is_empty() {
                    self.stores.remove(&store);
                }
                CommandResult::Deleted { existed }
            }
            Command::Register { node, services } => {
                for (service, sub) in services.iter().flat_map(|s| s.subscriptions.iter().map(move |x| (s.name.as_str(), x))) {
                    // A name belongs to the least service name declaring it (the rule of
                    // `registry::drop_foreign_subscriptions`, which keeps nodes from declaring
                    // another's); a registration racing that rule does not take it over.
                    let members = self.last_membership.membership();
                    let others = self.registry.iter().filter(|(n, _)| **n != node && members.get_node(n).is_some());
                    if others.flat_map(|(_, s)| s.iter()).any(|other| {
                        other.name.as_str() < service && other.subscriptions.iter().any(|x| x.name == sub.name)
                    }) {
                        continue;
                    }
                    // For a non-durable one: the members whose registrations declare it before
                    // this command (this node's own among them or not).
                    let declared = if sub.durable { Vec::new() } else { self.declared_by(&sub.name) };
                    let start = if sub.durable { self.log.first() } else { self.log.next };
                    let next = self.log.next;
                    if !self.subs.contains_key(&sub.name) {
                        self.subs_generation += 1;
                    }
                    let incarnation = Incarnation(self.subs_generation);
                    let state = self.subs.entry(sub.name.clone()).or_insert_with(|| SubState {
                        decl: sub.clone(),
                        cursor: start,
                        done: BTreeSet::new(),
                        attempts: BTreeMap::new(),
                        dead: VecDeque::new(),
                        instances: BTreeMap::new(),
                        incarnation,
                    });
                    state.decl = sub.clone();
                    // Not durable: nothing is kept for it while no registration declares it.
                    // A consumer that registers it when none does (all left at drain or were
                    // removed) starts at the newest event, as the first one did; one that
                    // crashed is still registered and keeps its place. Dead letters stay.
                    if !sub.durable && !declared.contains(&node) {
                        if sub.shared && declared.is_empty() {
                            state.cursor = next;
                            state.done.clear();
                            state.attempts.clear();
                            self.subs_generation += 1;
                            state.incarnation = Incarnation(self.subs_generation);
                        }
                        if !sub.shared {
                            state.instances.insert(node, next);
                        }
                    }
                    if !sub.shared {
                        state.instances.entry(node).or_insert(start);
                    }
                }
                if services.is_empty() {
                    self.registry.remove(&node);
                } else {
                    self.registry.insert(node, services);
                }
                self.registry_revision = index;
                CommandResult::Registered
            }
            Command::IdemBegin { key, attempt, now_ms, lease_ms, window_ms } => self.idem_begin(key, attempt, now_ms, lease_ms, window_ms, None, false),
            Command::IdemTake { key, attempt, now_ms, lease_ms, window_ms, fingerprint } => {
                self.idem_begin(key, attempt, now_ms, lease_ms, window_ms, fingerprint, true)
            }
            Command::IdemClaim { key, attempt, now_ms, lease_ms, window_ms, fingerprint } => {
                self.idem_begin(key, attempt, now_ms, lease_ms, window_ms, Some(fingerprint), false)
            }
            // By reference: the log store keeps its copy of the entry (the `Arc`s are shared),
            // so taking the events or updates by value would clone every one of them.
            Command::Publish { now_ms, events, limits } => self.publish(now_ms, &events, limits),
            Command::SubUpdate { updates } => {
                for u in &updates {
                    self.sub_update(u);
                }
                CommandResult::SubUpdated
            }
            Command::PublishAndSettle { now_ms, events, limits, updates } => {
                for u in updates.iter() {
                    self.sub_update(u);
                }
                self.publish(now_ms, &events, limits)
            }
            Command::ForgetNodes { nodes } => {
                let members = self.last_membership.membership();
                let departed: Vec<NodeId> = nodes.into_iter().filter(|n| members.get_node(n).is_none()).collect();
                for node in &departed {
                    self.registry.remove(node);
                    for s in self.subs.values_mut() {
                        s.instances.remove(node);
                    }
                }
                CommandResult::None
            }
            Command::PutExpiring { store, key, value, if_revision, expires_ms } => {
                let (name, k) = (store.clone(), key.clone());
                let result = self.apply(index, Command::Put { store, key, value, if_revision, tag: None });
                if matches!(result, CommandResult::Written { .. }) {
                    self.expiries.set(&name, &k, expires_ms);
                }
                result
            }
            Command::Expire { keys } => {
                // A key put again since the leader named it has another revision: kept.
                for (store, key, revision) in keys {
                    self.apply(index, Command::Delete { store, key, if_revision: Some(revision) });
                }
                CommandResult::None
            }
            Command::ExpireDue { keys, now_ms } => {
                // A key written again since the leader named it has no expiry or a later one:
                // kept. An increment keeps the expiry, and with it the removal.
                for (store, key) in keys {
                    if self.expiries.of(&store, &key).is_some_and(|at| at <= now_ms) {
                        self.apply(index, Command::Delete { store, key, if_revision: None });
                    }
                }
                CommandResult::None
            }
            Command::Tagged { tag, command } => self.tagged(Some(tag), |d| d.apply(index, *command)),
            Command::Txn { store, ops } => {
                // Every precondition against the state before the first write: the whole or
                // nothing. (The API refuses a key named twice; applied in order regardless, the
                // later op wins, on every node alike.)
                let entries = self.stores.get(&store);
                for (i, op) in ops.iter().enumerate() {
                    let current = entries.and_then(|e| e.get(op.key())).map(|v| v.revision);
                    if op.expects().is_some_and(|expected| current.unwrap_or(0) != expected) {
                        return CommandResult::TxnFailed { op: i as u32, current };
                    }
                }
                for op in ops {
                    let store = store.clone();
                    match op {
                        TxnOp::Put { key, value, .. } => {
                            self.apply(index, Command::Put { store, key, value, if_revision: None, tag: None });
                        }
                        TxnOp::Delete { key, .. } => {
                            self.apply(index, Command::Delete { store, key, if_revision: None });
                        }
                        TxnOp::Check { .. } => {}
                    }
                }
                CommandResult::Written { revision: index }
            }
            Command::DropSubscription { name } => {
                let declared_by = self.declared_by(&name);
                // Gone, its delivery loop's backlog with it; declared again, it gets a new
                // incarnation.
                let existed = if declared_by.is_empty() { self.subs.remove(&name).is_some() } else { self.subs.contains_key(&name) };
                CommandResult::SubscriptionDropped { existed, declared_by }
            }
            Command::SeekSubscription { name, position } => {
                let first = self.log.first();
                let next = self.log.next;
                match self.subs.get_mut(&name) {
                    Some(s) if s.decl.shared => {
                        s.cursor = position.clamp(first, next);
                        s.done.clear();
                        s.attempts.clear();
                        // The delivery loop's backlog looks afresh (`Backlog`).
                        self.subs_generation += 1;
                        s.incarnation = Incarnation(self.subs_generation);
                        // Over what is settled without a delivery (events its filter does
                        // not take), as every other move of the cursor does.
                        advance(&self.log, &name, s, &[]);
                        CommandResult::SubscriptionSought { cursor: Some(s.cursor), shared: true }
                    }
                    Some(_) => CommandResult::SubscriptionSought { cursor: None, shared: false },
                    None => CommandResult::SubscriptionSought { cursor: None, shared: true },
                }
            }
            Command::IdemComplete { key, attempt, mut response } => {
                // Only what the entry's encoding holds, whoever applies it (the leader applies
                // the entry as proposed, the others as decoded).
                response.headers.clear();
                self.apply(index, Command::IdemCompleteWith { key, attempt, response, headers: Vec::new() })
            }
            Command::IdemCompleteWith { key, attempt: _, mut response, headers } => {
                // The headers the entry carries beside the answer (its own are not encoded).
                response.headers = headers;
                // Looked up before `get_mut`, which copies the path a snapshot's copy shares
                // even when the key is missing.
                let found = if self.idem.contains_key(&key) { self.idem.get_mut(&key) } else { None };
                match found {
                    // The first completion wins; a slower duplicate attempt gets the winner's answer.
                    Some(IdemRecord { state: IdemState::Done(first), .. }) => CommandResult::IdemDone(first.clone()),
                    Some(rec) => {
                        let before = idem_weight(&key, rec);
                        rec.state = IdemState::Done(response.clone());
                        self.idem_bytes = (self.idem_bytes + idem_weight(&key, rec)).saturating_sub(before);
                        CommandResult::IdemDone(response)
                    }
                    None => {
                        let rec = IdemRecord {
                            created_ms: self.clock_ms,
                            state: IdemState::Done(response.clone()),
                            effects: BTreeMap::new(),
                            fingerprint: None,
                        };
                        self.idem_bytes += idem_weight(&key, &rec);
                        self.idem.insert(key.clone(), rec);
                        self.idem_order.push_back((self.clock_ms, key));
                        CommandResult::IdemDone(response)
                    }
                }
            }
        }
    }

    fn publish(&mut self, now_ms: u64, events: &[NewEvent], limits: EventLimits) -> CommandResult {
        self.clock_ms = self.clock_ms.max(now_ms);
        let log = &mut self.log;
        let horizon = self.clock_ms.saturating_sub(limits.dedup_window_ms);
        while log.key_order.front().is_some_and(|(at, _)| *at < horizon) {
            if let Some((at, key)) = log.key_order.pop_front() {
                if log.keys.get(&key).is_some_and(|(_, _, t)| *t == at) {
                    log.keys.remove(&key);
                }
            }
        }
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            if let Some(key) = &e.idempotency_key {
                if let Some((id, position, _)) = log.keys.get(key) {
                    out.push((id.clone(), *position));
                    continue;
                }
                log.keys.insert(key.clone(), (e.body.id.clone(), log.next, self.clock_ms));
                log.key_order.push_back((self.clock_ms, key.clone()));
            }
            let event = e.to_event(log.next);
            out.push((event.id.clone(), event.position));
            log.bytes += event.size() as u64;
            log.events.push_back(Arc::new(event));
            log.next += 1;
        }
        let age_horizon = self.clock_ms.saturating_sub(limits.max_age_ms);
        // What retention takes, for the subscriptions' loss count (`advance`); freed after it.
        let mut trimmed = Vec::new();
        while let Some(front) = log.events.front() {
            let over = log.events.len() as u64 > limits.max_events
                || log.bytes > limits.max_bytes
                || front.timestamp < age_horizon;
            if !over {
                break;
            }
            if let Some(e) = log.events.pop_front() {
                log.bytes = log.bytes.saturating_sub(e.size() as u64);
                trimmed.push(e);
            }
        }
        for (name, s) in self.subs.iter_mut() {
            advance(&self.log, name, s, &trimmed);
        }
        CommandResult::Published(out)
    }

    fn sub_update(&mut self, u: &SubUpdate) {
        match u {
            SubUpdate::Ack { sub, position } => {
                let position = *position;
                if let Some(s) = self.subs.get_mut(sub) {
                    if position >= s.cursor {
                        s.done.insert(position);
                    }
                    s.attempts.remove(&position);
                }
                self.advance(sub);
            }
            SubUpdate::Failed { sub, position, reason } | SubUpdate::FailedAt { sub, position, reason, .. } | SubUpdate::Rejected { sub, position, reason, .. } => {
                let position = *position;
                let event_id = self.log.get(position).map(|e| e.id.clone()).unwrap_or_default();
                if let Some(s) = self.subs.get_mut(sub) {
                    if position < s.cursor || s.done.contains(&position) {
                        return;
                    }
                    if let SubUpdate::FailedAt { attempts, .. } | SubUpdate::Rejected { attempts, .. } = u {
                        // Counted already (sent again, or reported by the expiry too), or left
                        // over from the subscription's shared days: nothing to count.
                        if !s.decl.shared || s.attempts.get(&position).copied().unwrap_or(0) != *attempts {
                            return;
                        }
                    }
                    let n = s.attempts.entry(position).or_insert(0);
                    *n += 1;
                    if *n >= s.decl.max_attempts || matches!(u, SubUpdate::Rejected { .. }) {
                        let attempts = *n;
                        s.attempts.remove(&position);
                        s.done.insert(position);
                        push_dead(s, DeadLetter { position, event_id, attempts, reason: reason.clone(), node: None });
                    }
                }
                self.advance(sub);
            }
            SubUpdate::Rebase { sub, position } => {
                if let Some(s) = self.subs.get_mut(sub) {
                    // Also while the subscription is still every-instance (it is proposed just
                    // before the registration that makes it shared), whose cursor stands still.
                    // Not below the oldest retained event either: the events before it are
                    // gone, and a cursor left behind them would count them as expired.
                    let position = (*position).min(self.log.next).max(self.log.first());
                    if position > s.cursor {
                        s.cursor = position;
                        s.done = s.done.split_off(&position);
                        s.attempts = s.attempts.split_off(&position);
                    }
                }
                self.advance(sub);
            }
            SubUpdate::Instance { sub, node, position, dead } => {
                let (node, position) = (*node, *position);
                let event_id = self.log.get(position).map(|e| e.id.clone()).unwrap_or_default();
                if let Some(s) = self.subs.get_mut(sub) {
                    let next = s.instances.entry(node).or_insert(0);
                    if position + 1 > *next {
                        *next = position + 1;
                        if let Some((attempts, reason)) = dead {
                            push_dead(s, DeadLetter { position, event_id, attempts: *attempts, reason: reason.clone(), node: Some(node) });
                        }
                    }
                }
            }
        }
    }

    /// `advance` for the subscription named `sub`.
    fn advance(&mut self, sub: &str) -> u64 {
        let Some(s) = self.subs.get_mut(sub) else { return 0 };
        advance(&self.log, sub, s, &[])
    }

    /// Apply a write at most once per tag.
    fn tagged(&mut self, tag: WriteTag, f: impl FnOnce(&mut SmData) -> CommandResult) -> CommandResult {
        let Some((key, seq)) = tag else { return f(self) };
        if let Some(done) = self.idem.get(&key).and_then(|r| r.effects.get(&seq)) {
            return done.clone();
        }
        let result = f(self);
        if !self.idem.contains_key(&key) {
            // Its begin expired or never ran: keep the record anyway, expiring like the others.
            let state = IdemState::Pending { attempt: 0, until_ms: 0 };
            let rec = IdemRecord { created_ms: self.clock_ms, state, effects: BTreeMap::new(), fingerprint: None };
            self.idem_bytes += idem_weight(&key, &rec);
            self.idem.insert(key.clone(), rec);
            self.idem_order.push_back((self.clock_ms, key.clone()));
        }
        if let Some(rec) = self.idem.get_mut(&key) {
            let before = idem_weight(&key, rec);
            rec.effects.insert(seq, result.clone());
            self.idem_bytes = (self.idem_bytes + idem_weight(&key, rec)).saturating_sub(before);
        }
        result
    }

    /// Advance the deterministic clock and forget idempotency keys older than the window.
    /// `IdemBegin` (`fingerprint` None) and `IdemClaim`: claim `key` for `attempt`, or say who
    /// holds it or what it answered. A claim whose fingerprint differs from the one the record
    /// was made with changes nothing and is answered `IdemMismatch`.
    /// `keep_held`: the tick of `IdemTake`, which keeps claims whose lease holds (`tick`).
    #[allow(clippy::too_many_arguments)]
    fn idem_begin(&mut self, key: String, attempt: u64, now_ms: u64, lease_ms: u64, window_ms: u64, fingerprint: Option<u64>, keep_held: bool) -> CommandResult {
        self.tick(now_ms, window_ms, keep_held);
        let until_ms = now_ms.saturating_add(lease_ms);
        // Looked up first: see `IdemCompleteWith`.
        let found = if self.idem.contains_key(&key) { self.idem.get_mut(&key) } else { None };
        match found {
            None => {
                let state = IdemState::Pending { attempt, until_ms };
                let rec = IdemRecord { created_ms: now_ms, state, effects: BTreeMap::new(), fingerprint };
                self.idem_bytes += idem_weight(&key, &rec);
                self.idem.insert(key.clone(), rec);
                self.idem_order.push_back((now_ms, key));
                CommandResult::IdemBegun
            }
            // Judged only when both sides name one: a record made without one (by an older
            // build's claim) keeps none, so the original request's retry still replays.
            Some(IdemRecord { fingerprint: Some(first), .. }) if fingerprint.is_some_and(|f| f != *first) => CommandResult::IdemMismatch,
            Some(rec) => match &rec.state {
                IdemState::Done(resp) => CommandResult::IdemDone(resp.clone()),
                IdemState::Pending { attempt: owner, until_ms: held } => {
                    if *owner == attempt || *held <= now_ms {
                        rec.state = IdemState::Pending { attempt, until_ms };
                        CommandResult::IdemBegun
                    } else {
                        CommandResult::IdemPending { until_ms: *held }
                    }
                }
            },
        }
    }

    /// Moves the clock to `now_ms` and forgets the records created before the window.
    /// `keep_held` (`IdemTake`): a claim whose lease holds is kept, whatever its age, and moved
    /// to the back of the order (at most `REQUEUE_PER_TICK` per tick, so an apply's work stays
    /// bounded while many commands run); without it (`IdemBegin`, `IdemClaim`) the tick is the
    /// one older builds apply, so that each entry changes every node alike.
    fn tick(&mut self, now_ms: u64, window_ms: u64, keep_held: bool) {
        self.clock_ms = self.clock_ms.max(now_ms);
        let horizon = self.clock_ms.saturating_sub(window_ms);
        if !keep_held {
            while let Some((created, _)) = self.idem_order.front() {
                if *created >= horizon {
                    break;
                }
                if let Some((created, key)) = self.idem_order.pop_front() {
                    if self.idem.get(&key).is_some_and(|r| r.created_ms == created) {
                        if let Some(rec) = self.idem.remove(&key) {
                            self.idem_bytes = self.idem_bytes.saturating_sub(idem_weight(&key, &rec));
                        }
                    }
                }
            }
            return;
        }
        let mut requeued = 0;
        // Each entry is looked at once at most: a held one goes to the back.
        for _ in 0..self.idem_order.len() {
            let Some((created, key)) = self.idem_order.front() else { break };
            let current = self.idem.get(key).filter(|r| r.created_ms == *created);
            if current.is_some_and(|r| r.held_at(self.clock_ms)) {
                // A claim still held: forgetting it would let a second request run beside the
                // first, and the first's retried writes apply twice. Judged again when it comes
                // round (its lease lapses by its deadline). Young ones too: one at the front
                // must not hold back older records behind it.
                if requeued >= REQUEUE_PER_TICK {
                    break;
                }
                requeued += 1;
                if let Some(entry) = self.idem_order.pop_front() {
                    self.idem_order.push_back(entry);
                }
                continue;
            }
            if *created >= horizon {
                break;
            }
            let Some((created, key)) = self.idem_order.pop_front() else { break };
            if self.idem.get(&key).is_some_and(|r| r.created_ms == created) {
                if let Some(rec) = self.idem.remove(&key) {
                    self.idem_bytes = self.idem_bytes.saturating_sub(idem_weight(&key, &rec));
                }
            }
        }
    }

}

/// A snapshot as kept on disk and in memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

/// Shared between openraft (apply, snapshots) and the HTTP API (reads).
pub struct SmShared {
    data: RwLock<SmData>,
    /// `data.registry_revision`, mirrored after every apply and install so that the proxy can
    /// check its cached routing table per request without taking the state-machine lock.
    registry_rev: std::sync::atomic::AtomicU64,
    /// Holds `snapshot.bin`, the latest snapshot (replaced atomically by build and install). Not
    /// kept in memory as well: only a lagging follower's catch-up reads it back, and keeping it
    /// meant tens of MB per node plus a copy of the whole image on an async worker per build.
    dir: PathBuf,
    /// The log id `snapshot.bin` covers, held while the file is written: openraft builds a
    /// snapshot in a task of its own and may install a leader's meanwhile, and the two wrote the
    /// same temp file at once (a corrupt image) or the older build's image replaced the newer
    /// installed one after the log was purged up to it (a node that could not restart). A
    /// write waits for the other, and an image no newer than the file's is not written.
    persisted: std::sync::Mutex<Option<LogId>>,
    /// `data.log.next` (the next event position), sent after every apply that moved it and
    /// every install: delivery loops wait on it instead of polling. Lives as long as this.
    events_next: tokio::sync::watch::Sender<u64>,
    /// `data.stores_digest`, sent after every apply and install that moved it: a long poll on
    /// a store (`store::StateStore::wait_changed`) waits on it instead of polling. Lives as long
    /// as this.
    stores_moved: tokio::sync::watch::Sender<u64>,
    /// One past the last index the log held when this process started (0: none), set once by
    /// the composition root: entries up to it are a replay (`replaying`).
    replay_end: std::sync::atomic::AtomicU64,
    /// Snapshots installed by this process: a store's maps after an install share nothing with
    /// those before, so a listing's cached tag is not moved across one (`store::TagCache`).
    installs: std::sync::atomic::AtomicU64,
    /// `data.cluster_id()` once it is known (at open, or after the apply or install that brought
    /// it), for the peer handshake to read without the lock (`known_cluster_id`).
    cluster_id: KnownClusterId,
    /// `data.member_features()`, replaced after the apply or install that changed it, for
    /// `Replica::members_have` to read without the state's lock (`recorded_features`).
    features: RecordedFeatures,
}

impl SmShared {
    /// The members' features as the state records them, shared: the peer network reads it.
    pub fn recorded_features(&self) -> RecordedFeatures {
        self.features.clone()
    }

    /// Notes the state's record of the members' features when its revision moved.
    fn note_features(&self, d: &SmData) {
        let revision = d.features_revision();
        if read(&self.features).revision != revision {
            *write(&self.features) = d.member_features();
        }
    }

    /// The cluster's id as this node's state knows it, shared: the peer handshake reads it.
    pub fn known_cluster_id(&self) -> KnownClusterId {
        self.cluster_id.clone()
    }

    /// Notes the state's cluster id (`None`: it has none yet). Set once: a state that holds
    /// another later is a history this node's links should have refused (said, not followed).
    /// The first one also goes to `CLUSTER_ID_FILE`, off the runtime.
    fn note_cluster_id(&self, id: Option<u128>) {
        let Some(id) = id else { return };
        let mut fresh = false;
        let known = *self.cluster_id.get_or_init(|| {
            fresh = true;
            id
        });
        if known != id {
            tracing::error!(known = %format!("{known:032x}"), state = %format!("{id:032x}"), "the state now holds another cluster id than this process started with; the handshake goes on announcing the first");
        }
        if fresh && !self.dir.as_os_str().is_empty() {
            let dir = self.dir.clone();
            // Not awaited: until it is written, a restart knows the id from the state, as
            // soon as it has applied the entry or opened the snapshot that holds it.
            drop(tokio::task::spawn_blocking(move || write_cluster_id(&dir, id)));
        }
    }

    /// The file holding this node's latest snapshot (replaced whole by each new one: a handle
    /// opened on it keeps reading the one it opened).
    pub fn snapshot_path(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_FILE)
    }

    /// Snapshots installed since this process started (`installs`).
    pub fn installs(&self) -> u64 {
        self.installs.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks the entries up to `last` (the log's last index at start) as applied before this
    /// process started: applying them again is a replay, which counts nothing on `/metrics`.
    pub fn replay_through(&self, last: Option<u64>) {
        self.replay_end.store(last.map_or(0, |l| l + 1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Read a key from the local copy.
    pub fn get(&self, store: &str, key: &str) -> Option<Versioned> {
        read(&self.data).stores.get(store).and_then(|s| s.get(key)).cloned()
    }

    /// When `store/key` expires (Unix ms), if it does (`Command::PutExpiring`) and still has
    /// `revision` (a read names the expiry of the value it answers, not of a newer one).
    pub fn expires_at(&self, store: &str, key: &str, revision: u64) -> Option<u64> {
        let d = read(&self.data);
        if d.expiries.is_empty() || d.stores.get(store)?.get(key)?.revision != revision {
            return None;
        }
        d.expiries.of(store, key)
    }

    /// `expires_at` of each (key, revision) of `store`, under one read lock; nothing to look
    /// up (an empty list) when no key of the store expires.
    pub fn expiries_of<'a>(&self, store: &str, keys: impl Iterator<Item = (&'a str, u64)>) -> Vec<Option<u64>> {
        let d = read(&self.data);
        let Some(current) = d.stores.get(store).filter(|_| d.expiries.of_store(store)) else { return Vec::new() };
        keys.map(|(key, revision)| if current.get(key)?.revision == revision { d.expiries.of(store, key) } else { None }).collect()
    }

    /// The earliest expiry of any key, and how many keys expire.
    pub fn next_expiry(&self) -> (Option<u64>, usize) {
        let d = read(&self.data);
        (d.expiries.next(), d.expiries.len())
    }

    /// The keys due at `now` (`Expiries::due`, about `max_bytes` of names) with their
    /// revisions: what `Command::Expire` names (`ExpireDue` names them without).
    pub fn due_keys(&self, now: u64, max_bytes: usize) -> Vec<(String, String, u64)> {
        let d = read(&self.data);
        d.expiries
            .due(now, max_bytes)
            .into_iter()
            .filter_map(|(store, key)| {
                let revision = d.stores.get(&store)?.get(&key)?.revision;
                Some((store, key, revision))
            })
            .collect()
    }

    /// The service registry of the cluster's members, and the log index of its last change or
    /// of the membership's, whichever is later (`registry_view_revision`). A node removed from
    /// the cluster while its entry stood (killed, then `leave`) kept it for good, and its
    /// commands were "no live node offers" 503s for ever, never the 404 of a command nobody
    /// offers; left out here, it departs from the routing table as a stopped node does.
    pub fn registry(&self) -> (u64, BTreeMap<NodeId, Vec<ServiceDecl>>) {
        let d = read(&self.data);
        let members = d.last_membership.membership();
        let registry = d.registry.iter().filter(|(n, _)| members.get_node(n).is_some()).map(|(n, s)| (*n, s.clone())).collect();
        (registry_view_revision(&d), registry)
    }

    /// Nodes outside the membership that the state still keeps something of: a registry entry
    /// or an every-instance subscription position (`Command::ForgetNodes`).
    pub fn departed(&self) -> Vec<NodeId> {
        let d = read(&self.data);
        let members = d.last_membership.membership();
        let kept = d.registry.keys().chain(d.subs.values().flat_map(|s| s.instances.keys()));
        let departed: BTreeSet<NodeId> = kept.filter(|n| members.get_node(n).is_none()).copied().collect();
        departed.into_iter().collect()
    }

    /// One node's registry entry (what `registry` would copy for all of them).
    pub fn registry_entry(&self, node: NodeId) -> Option<Vec<ServiceDecl>> {
        read(&self.data).registry.get(&node).cloned()
    }

    /// What `registry` answers as its revision, without copying the registry.
    pub fn registry_revision(&self) -> u64 {
        self.registry_rev.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Changes when events are appended (or a snapshot installed).
    pub fn watch_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events_next.subscribe()
    }

    fn events_moved(&self, next: u64) {
        self.events_next.send_if_modified(|v| std::mem::replace(v, next) != next);
    }

    /// Changes when a state, config or secret store changes (or a snapshot is installed).
    pub fn watch_stores(&self) -> tokio::sync::watch::Receiver<u64> {
        self.stores_moved.subscribe()
    }

    fn stores_changed(&self, digest: u64) {
        self.stores_moved.send_if_modified(|v| std::mem::replace(v, digest) != digest);
    }

    /// Store `store`'s keys as they are now (a persistent map: the copy costs O(1), and a
    /// later write to the store makes a new root, so `OrdMap::ptr_eq` says whether it changed).
    pub fn store_map(&self, store: &str) -> Option<imbl::OrdMap<String, Versioned>> {
        read(&self.data).stores.get(store).cloned()
    }

    /// Up to `limit` retained events after position `after` (optionally one name), and the
    /// position to continue from. Bounded three ways, so one read neither holds the lock that
    /// apply needs for long nor builds a huge answer: `limit` events, payloads of about
    /// `max_bytes` (at least one event always), and `MAX_SCAN` positions looked at (a name that
    /// matches nothing returns no events and a `next` further on, to continue from).
    pub fn events_after(&self, after: u64, limit: usize, max_bytes: usize, name: Option<&str>) -> (Vec<Event>, u64) {
        let d = read(&self.data);
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut next = after.max(d.log.first().saturating_sub(1));
        let start = after.saturating_add(1).max(d.log.first());
        let skip = usize::try_from(start - d.log.first()).unwrap_or(usize::MAX);
        for e in d.log.events.iter().skip(skip).take(MAX_SCAN) {
            if out.len() >= limit || (bytes >= max_bytes && !out.is_empty()) {
                break;
            }
            if name.is_none_or(|n| n == e.event_name) {
                if bytes + e.payload.len() > max_bytes && !out.is_empty() {
                    break;
                }
                bytes += e.payload.len();
                out.push((**e).clone());
            }
            next = e.position;
        }
        (out, next)
    }

    /// A subscription's dead letters in position order (several nodes' letters for one position
    /// of an every-instance subscription in the order they were written), those after position
    /// `after`, at most `limit` positions' worth (a position's letters are never split). `None`
    /// for an unknown subscription.
    pub fn dead_letters(&self, sub: &str, after: Option<u64>, limit: usize) -> Option<Vec<DeadLetter>> {
        let d = read(&self.data);
        let s = d.subs.get(sub)?;
        // Ordered and cut by position and index first, so that only the page's letters are
        // copied (reasons of up to 1 KiB each), not every letter after `after`.
        let mut order: Vec<(u64, usize)> = listed_letters(&s.dead).into_iter().filter(|&(p, _)| after.is_none_or(|a| p > a)).collect();
        order.sort_unstable();
        let mut positions = 0;
        let cut = order
            .iter()
            .enumerate()
            .position(|(i, (p, _))| {
                if i == 0 || order[i - 1].0 != *p {
                    positions += 1;
                }
                positions > limit
            })
            .unwrap_or(order.len());
        Some(order[..cut].iter().map(|&(_, i)| s.dead[i].clone()).collect())
    }

    /// The failed attempts counted for `position` of subscription `sub`, or `None` once it is
    /// settled (acked, dead-lettered, passed) or the subscription is gone.
    pub fn attempts_at(&self, sub: &str, position: u64) -> Option<u32> {
        let d = read(&self.data);
        let s = d.subs.get(sub)?;
        (position >= s.cursor && !s.done.contains(&position)).then(|| s.attempts.get(&position).copied().unwrap_or(0))
    }

    pub fn event(&self, position: u64) -> Option<Event> {
        read(&self.data).log.get(position).cloned()
    }

    /// (first retained position, next position).
    pub fn event_bounds(&self) -> (u64, u64) {
        let d = read(&self.data);
        (d.log.first(), d.log.next)
    }

    /// Nodes whose registry entry consumes the subscription (and is available).
    /// The state store's keys and weight now (`SmData::stores_keys`, `stores_bytes`), and the
    /// length of `store/key`'s value if it exists: what a write's quota check needs, under one
    /// lock and without copying the value.
    pub fn stores_usage(&self, store: &str, key: &str) -> (u64, u64, Option<usize>) {
        let d = read(&self.data);
        let old = d.stores.get(store).and_then(|s| s.get(key)).map(|v| v.value.len());
        (d.stores_keys, d.stores_bytes, old)
    }

    /// Whether `node`'s registry entry declares subscription `sub` (available or not).
    pub fn declares(&self, node: NodeId, sub: &str) -> bool {
        read(&self.data).registry.get(&node).is_some_and(|services| services.iter().any(|s| s.subscriptions.iter().any(|x| x.name == sub)))
    }

    pub fn subscribers_of(&self, sub: &str) -> Vec<NodeId> {
        let d = read(&self.data);
        d.registry
            .iter()
            .filter(|(_, services)| services.iter().any(|s| s.available && s.subscriptions.iter().any(|x| x.name == sub)))
            .map(|(node, _)| *node)
            .collect()
    }

    /// Shared subscriptions and their declarations.
    pub fn shared_subscriptions(&self) -> Vec<(String, SubscriptionDecl)> {
        read(&self.data).subs.iter().filter(|(_, s)| s.decl.shared).map(|(n, s)| (n.clone(), s.decl.clone())).collect()
    }

    /// Up to `limit` events a shared subscription still has to process, in log order, with
    /// their failed-attempt counts, leaving out positions `skip` names (in flight, backing off)
    /// before copying anything. `backlog` is the caller's memory of this subscription from its
    /// earlier calls (see `Backlog`): each retained event is looked at once, not on every call.
    pub fn pending(&self, sub: &str, limit: usize, backlog: &mut Backlog, skip: impl Fn(u64) -> bool) -> Vec<(Event, u32)> {
        let d = read(&self.data);
        let Some(s) = d.subs.get(sub) else {
            *backlog = Backlog::default();
            return Vec::new();
        };
        let (first, next) = (d.log.first(), d.log.next);
        let start = s.cursor.max(first);
        if backlog.filter.as_ref() != Some(&s.decl.filter) || start < backlog.from || backlog.scanned > next || backlog.incarnation != s.incarnation.0 {
            // New to the caller, declared with another filter, or a state that went back (a
            // snapshot installed in between), or begun anew (created, dropped and declared
            // again, a non-durable one's cursor reset: `SubState::incarnation`): looked at
            // afresh.
            *backlog = Backlog { from: start, scanned: start, open: BTreeSet::new(), filter: Some(s.decl.filter.clone()), incarnation: s.incarnation.0 };
        }
        if start > backlog.from {
            // Settled below the cursor, or dropped by retention.
            backlog.open = backlog.open.split_off(&start);
            backlog.from = start;
        }
        backlog.scanned = backlog.scanned.max(start);
        // At most `BACKLOG_SCAN` new positions a call (positions are consecutive): a fresh
        // backlog of a subscription far behind would otherwise scan the whole retained log at
        // once under the lock. What lies beyond comes after all of `open` in log order, so the
        // order of handouts holds; it is reached in the next calls.
        for e in d.log.events.iter().skip((backlog.scanned - first) as usize).take(BACKLOG_SCAN) {
            if !s.done.contains(&e.position) && s.decl.filter.matches(e) {
                backlog.open.insert(e.position);
            }
        }
        backlog.scanned = (backlog.scanned + BACKLOG_SCAN as u64).min(next);
        let mut out = Vec::new();
        let mut settled = Vec::new();
        for &p in &backlog.open {
            if out.len() >= limit {
                break;
            }
            match d.log.get(p) {
                // Acked out of order, or (put back by `unpark` after the filter changed) not a
                // match: never pending again.
                Some(e) if !s.done.contains(&p) && s.decl.filter.matches(e) => {
                    if !skip(p) {
                        out.push((e.clone(), s.attempts.get(&p).copied().unwrap_or(0)));
                    }
                }
                _ => settled.push(p),
            }
        }
        for p in settled {
            backlog.open.remove(&p);
        }
        out
    }

    /// Up to `limit` events matching a subscription's filter from position `from` on, and the
    /// position to continue scanning from (`None` when nothing was scanned or skipped), and how
    /// many positions from `from` on retention had already dropped (which of them matched can
    /// no longer be told).
    pub fn matching_from(&self, sub: &str, from: u64, limit: usize) -> (Vec<Event>, Option<u64>, u64) {
        let d = read(&self.data);
        let Some(s) = d.subs.get(sub) else { return (Vec::new(), None, 0) };
        let first = d.log.first();
        let start = from.max(first);
        let mut out = Vec::new();
        // Past what retention dropped, even if nothing is left to scan (so it is counted once).
        let mut scanned = (start > from).then_some(start);
        // Bounded scan so a long run of non-matching events does not hold the lock for long.
        for e in d.log.events.iter().skip((start - first) as usize).take(limit * 16) {
            if out.len() >= limit {
                break;
            }
            scanned = Some(e.position + 1);
            if s.decl.filter.matches(e) {
                out.push((**e).clone());
            }
        }
        // Matching events are delivered first; continue scanning after the last returned one.
        if let Some(last) = out.last() {
            scanned = Some(last.position + 1);
        }
        (out, scanned, start - from)
    }

    /// The whole replicated state of a subscription, copied (tests; the API reads
    /// `subscription_summary`).
    #[cfg(test)]
    pub fn subscription(&self, name: &str) -> Option<SubState> {
        read(&self.data).subs.get(name).cloned()
    }

    /// A subscription's progress in counts, for `GET /v1/subscriptions/{name}`: `subscription`
    /// copies its done set and dead letters (up to the retained events and `MAX_DEAD_LETTERS`
    /// with their reasons, megabytes) under the lock that apply needs, on every poll.
    pub fn subscription_summary(&self, name: &str) -> Option<SubSummary> {
        let d = read(&self.data);
        let s = d.subs.get(name)?;
        let (mut summary, letters) = (summary(&d, name, s), letter_keys(s));
        drop(d);
        summary.dead_letters = count_listed(letters);
        Some(summary)
    }

    /// Every subscription's summary, by name.
    pub fn subscription_summaries(&self) -> Vec<(String, SubSummary)> {
        let d = read(&self.data);
        let copied: Vec<_> = d.subs.iter().map(|(name, s)| (name.clone(), summary(&d, name, s), letter_keys(s))).collect();
        drop(d);
        copied.into_iter().map(|(name, mut summary, letters)| {
            summary.dead_letters = count_listed(letters);
            (name, summary)
        }).collect()
    }

    /// A subscription's mode and progress (for `registry::carried_progress`).
    pub fn sub_progress(&self, name: &str) -> Option<crate::proxy::registry::SubProgress> {
        let d = read(&self.data);
        let s = d.subs.get(name)?;
        Some(crate::proxy::registry::SubProgress { shared: s.decl.shared, cursor: s.cursor, instances: s.instances.clone(), declared_by: d.declared_by(name) })
    }

    /// The ack deadline of a subscription as replicated (the declaration of the node that
    /// registered it last), which the leader's redelivery follows.
    pub fn sub_ack_deadline_ms(&self, name: &str) -> Option<u64> {
        read(&self.data).subs.get(name).map(|s| s.decl.ack_deadline_ms)
    }

    /// What an every-instance loop needs on each pass: the declaration and `node`'s next
    /// position, without copying the rest of the state (its dead letters alone may be
    /// `MAX_DEAD_LETTERS` entries, which `subscription` copies every time).
    pub fn instance_position(&self, name: &str, node: NodeId) -> Option<(SubscriptionDecl, u64)> {
        let d = read(&self.data);
        let s = d.subs.get(name)?;
        // `None` until `node` registered it: from 0 the loop would start at the oldest retained
        // event, which a non-durable subscription must not see.
        Some((s.decl.clone(), *s.instances.get(&node)?))
    }

    /// The window an `IdemBegin` proposes: `window_ms`, or shorter while the records younger
    /// than it are more than `max_keys` or weigh more than `max_bytes` (`bounded_window`).
    /// `now_ms`: the command's own, which applying it moves the clock to.
    /// When some idempotency record is past `window_ms` (or the records are over their bounds)
    /// in the state machine's own clock: that clock and the window to expire them with. A
    /// record made by a handler's tagged write (a subscription's delivery) is forgotten only
    /// when a claim ticks the clock, and a cluster without keyed commands makes none.
    /// `keep_held`: the tick will be `IdemTake`'s (held claims stay), not the old one.
    pub fn idem_expiry_due(&self, window_ms: u64, max_keys: usize, max_bytes: u64, keep_held: bool) -> Option<(u64, u64)> {
        let clock = read(&self.data).clock_ms;
        let window = self.idem_window(clock, window_ms, max_keys, max_bytes, keep_held);
        let d = read(&self.data);
        // Held claims stay under `IdemTake`'s tick: they make nothing due. A bounded look past them.
        let oldest = d
            .idem_order
            .iter()
            .take(EXPIRY_LOOK)
            .find(|(created, key)| !(keep_held && d.idem.get(key).is_some_and(|r| r.created_ms == *created && r.held_at(clock))))
            .map(|(created, _)| *created);
        // Over the bounds is due whatever the oldest record is.
        (window < window_ms || oldest.is_some_and(|o| o < clock.saturating_sub(window))).then_some((clock, window))
    }

    /// `keep_held`: the window is for `IdemTake`, whose tick keeps held claims (they then free
    /// nothing); the old tick forgets them like the others.
    pub fn idem_window(&self, now_ms: u64, window_ms: u64, max_keys: usize, max_bytes: u64, keep_held: bool) -> u64 {
        let d = read(&self.data);
        if d.idem.len() <= max_keys && d.idem_bytes <= max_bytes {
            return window_ms;
        }
        let clock = d.clock_ms.max(now_ms);
        let weigh = |created, key: &str| match d.idem.get(key).filter(|r| r.created_ms == created) {
            None => Forget::Stale,
            Some(r) if keep_held && r.held_at(clock) => Forget::Kept,
            Some(r) => Forget::Frees(idem_weight(key, r)),
        };
        bounded_window(&d.idem_order, clock, window_ms, (d.idem.len(), d.idem_bytes), (max_keys, max_bytes), weigh)
    }

    /// Whether retention by age or the producer-dedup window has something to drop at `now_ms`
    /// (or the state machine's clock, if later). Both are applied by a `Publish` only, so while
    /// nothing is published the leader proposes an empty one when this says so
    /// (`broker::expire_loop`). Like the trim itself, it looks at the oldest event only.
    pub fn events_expiry_due(&self, now_ms: u64, max_age_ms: u64, dedup_window_ms: u64) -> bool {
        let d = read(&self.data);
        let clock = d.clock_ms.max(now_ms);
        d.log.events.front().is_some_and(|e| e.timestamp < clock.saturating_sub(max_age_ms))
            || d.log.key_order.front().is_some_and(|(at, _)| *at < clock.saturating_sub(dedup_window_ms))
    }

    /// The state machine's clock: the latest `now_ms` of the entries applied here. A floor
    /// for a new entry's timestamps, which retention by age judges against it.
    pub fn clock_ms(&self) -> u64 {
        read(&self.data).clock_ms
    }

    /// The producer-dedup window a `Publish` proposes: `window_ms`, or shorter while more than
    /// `max_keys` keys are younger than it.
    /// `now_ms`: the command's own, which applying it moves the clock to.
    pub fn dedup_window(&self, now_ms: u64, window_ms: u64, max_keys: usize) -> u64 {
        let d = read(&self.data);
        let log = &d.log;
        if log.keys.len() <= max_keys {
            return window_ms;
        }
        let weigh = |at, key: &str| if log.keys.get(key).is_some_and(|(_, _, t)| *t == at) { Forget::Frees(0) } else { Forget::Stale };
        bounded_window(&log.key_order, d.clock_ms.max(now_ms), window_ms, (log.keys.len(), 0), (max_keys, u64::MAX), weigh)
    }

    /// The local view of an idempotency key's state.
    pub fn idem_state(&self, key: &str) -> Option<IdemState> {
        read(&self.data).idem.get(key).map(|r| r.state.clone())
    }

    /// Who holds an idempotency key here, without copying a stored answer: `None` without a
    /// record, `Some(None)` when done, `Some(Some(attempt))` while that attempt's claim stands.
    pub fn idem_owner(&self, key: &str) -> Option<Option<u64>> {
        read(&self.data).idem.get(key).map(|r| match r.state {
            IdemState::Pending { attempt, .. } => Some(attempt),
            IdemState::Done(_) => None,
        })
    }

    pub fn last_applied_index(&self) -> Option<u64> {
        read(&self.data).last_applied.as_ref().map(|l| l.index)
    }

    /// A digest of the state stores (for divergence checks): see `SmData::stores_digest`.
    pub fn digest(&self) -> u64 {
        read(&self.data).stores_digest
    }

    /// Whether some store whose name starts with `prefix` holds a key (a store left empty is
    /// removed).
    pub fn holds_store_under(&self, prefix: &str) -> bool {
        read(&self.data).stores.range(prefix.to_string()..).next().is_some_and(|(name, _)| name.starts_with(prefix))
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Poisoning only means a panic elsewhere; the data is replaced whole or mutated per entry.
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<SmShared>,
}

const SNAPSHOT_FILE: &str = "snapshot.bin";
/// The cluster id this node's state holds (32 hex digits), written once it is first known: a
/// restarted node announces it from its first handshake, not only once it has applied the
/// entry that names the cluster again (the log's replay, which waits for a leader to tell it
/// what is committed when the committed hint was lost). Only a committed and applied id is
/// written, so it never names a history the node's state does not hold.
const CLUSTER_ID_FILE: &str = "cluster_id";

/// Writes `id` to `dir`'s `CLUSTER_ID_FILE` (atomically; a failure is logged: the state holds
/// the id in any case).
fn write_cluster_id(dir: &Path, id: u128) {
    if let Err(e) = crate::fsutil::write_atomic(dir, CLUSTER_ID_FILE, format!("{id:032x}\n").as_bytes()) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not write the cluster id file; a restart announces the id once its state holds it again");
    }
}

/// The id in `dir`'s `CLUSTER_ID_FILE`, if it holds one (one that does not read is ignored,
/// with a warning: the state names the id too).
fn read_cluster_id(dir: &Path) -> Option<u128> {
    let path = dir.join(CLUSTER_ID_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not read the cluster id file");
            return None;
        }
    };
    let parsed = hex_cluster_id(text.trim());
    if parsed.is_none() {
        tracing::warn!(path = %path.display(), "the cluster id file does not hold one; ignored");
    }
    parsed
}

impl StateMachine {
    /// Open the state machine in `dir`, restoring the last snapshot if there is one.
    pub fn open(dir: &Path) -> io::Result<StateMachine> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(SNAPSHOT_FILE);
        // The directory's own entry, made by `create_dir_all` on a first start, is durable too;
        // and so is what is in it: a snapshot renamed into place by a process killed before its
        // directory sync is read below from the page cache, and the log is purged up to it, so
        // the rename must not be lost to a power cut after that (the log store syncs its own
        // directory at its open likewise).
        crate::fsutil::sync_parent(dir)?;
        crate::fsutil::sync_dir(dir)?;
        // A crash while a snapshot was being written leaves its temp file (`write_atomic_parts`):
        // as large as a snapshot and never read, so it would hold that much disk until the next
        // snapshot replaced it.
        let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(path = %tmp.display(), error = %e, "could not remove a snapshot left half written by a crash");
            }
            _ => {}
        }
        let (data, persisted) = match read_snapshot_file(&path)? {
            Some(snap) => (decode_data(&snap.data)?, snap.meta.last_log_id),
            None => (SmData::default(), None),
        };
        let cluster_id = KnownClusterId::default();
        match (data.cluster_id(), read_cluster_id(dir)) {
            (Some(id), file) => {
                let _ = cluster_id.set(id);
                if file != Some(id) {
                    if let Some(other) = file {
                        tracing::error!(state = %format!("{id:032x}"), file = %format!("{other:032x}"), "the cluster id file names another cluster than the snapshot; the snapshot's stands");
                    }
                    write_cluster_id(dir, id);
                }
            }
            (None, Some(id)) => {
                let _ = cluster_id.set(id);
            }
            (None, None) => {}
        }
        Ok(StateMachine {
            shared: Arc::new(SmShared {
                cluster_id,
                features: Arc::new(std::sync::RwLock::new(data.member_features())),
                registry_rev: std::sync::atomic::AtomicU64::new(registry_view_revision(&data)),
                events_next: tokio::sync::watch::Sender::new(data.log.next),
                stores_moved: tokio::sync::watch::Sender::new(data.stores_digest),
                replay_end: std::sync::atomic::AtomicU64::new(0),
                installs: std::sync::atomic::AtomicU64::new(0),
                data: RwLock::new(data),
                dir: dir.to_path_buf(),
                persisted: std::sync::Mutex::new(persisted),
            }),
        })
    }

    pub fn shared(&self) -> Arc<SmShared> {
        self.shared.clone()
    }

    /// Write `[crc32][len][bincode(StoredSnapshot)]` without copying the (large) data again: the
    /// bincode form of the struct is bincode(meta) ++ u64 length ++ data bytes, written in parts.
    /// One write at a time, and only an image newer than the file's (see `SmShared::persisted`):
    /// false when the file already held one at least as new.
    fn persist(&self, snap: &StoredSnapshot) -> io::Result<bool> {
        let stale = |persisted: &Option<LogId>| persisted.is_some() && snap.meta.last_log_id <= *persisted;
        // Checked before the checksum (a pass over the whole image) and again under the lock,
        // which covers only the write: an install, with apply stalled, waits for less.
        if stale(&crate::lock(&self.shared.persisted)) {
            return Ok(false);
        }
        let mut head = bincode::serialize(&snap.meta).map_err(io::Error::other)?;
        head.extend_from_slice(&(snap.data.len() as u64).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(&snap.data);
        let len = (head.len() + snap.data.len()) as u64;
        let mut prefix = Vec::with_capacity(12);
        prefix.extend_from_slice(&crc.finalize().to_le_bytes());
        prefix.extend_from_slice(&len.to_le_bytes());
        let mut persisted = crate::lock(&self.shared.persisted);
        if stale(&persisted) {
            return Ok(false);
        }
        crate::fsutil::write_atomic_parts(&self.shared.dir, SNAPSHOT_FILE, &[&prefix, &head, &snap.data])?;
        *persisted = snap.meta.last_log_id;
        Ok(true)
    }
}

/// The snapshot in `path`, if there is one.
fn read_snapshot_file(path: &Path) -> io::Result<Option<StoredSnapshot>> {
    match std::fs::read(path) {
        Ok(bytes) => decode_file(&bytes).map(Some).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

fn decode_file(bytes: &[u8]) -> io::Result<StoredSnapshot> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file: {m}"));
    if bytes.len() < 12 {
        return Err(bad("too short"));
    }
    let crc = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[4..12]);
    let len = usize::try_from(u64::from_le_bytes(len8)).map_err(|_| bad("length out of range"))?;
    let body = 12usize.checked_add(len).and_then(|end| bytes.get(12..end)).ok_or_else(|| bad("truncated"))?;
    if crc32fast::hash(body) != crc {
        return Err(bad("checksum mismatch"));
    }
    bincode::deserialize(body).map_err(|e| bad(&e.to_string()))
}

/// The meta at the head of a snapshot file (`SmShared::snapshot_path`), read without the rest:
/// what a download's headers name.
pub fn read_snapshot_meta(file: &mut impl io::Read) -> io::Result<SnapshotMeta> {
    let mut prefix = [0u8; 12];
    file.read_exact(&mut prefix)?;
    // The meta is a membership and two log ids: a megabyte is far past any.
    bincode::deserialize_from(io::Read::take(file, 1 << 20)).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot meta: {e}")))
}

/// A saved snapshot file (`GET /cluster/snapshot`, `raftbridge snapshot save`): its meta and
/// its state, checked as a node checks its own at open (the file's CRC, the image, the
/// extension's CRC).
pub fn read_backup(bytes: &[u8]) -> io::Result<(SnapshotMeta, SmData)> {
    let snap = decode_file(bytes)?;
    // A node's own file ends where its length says; a saved one with bytes after that (two
    // downloads run together, a copy gone wrong) is not what was saved.
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[4..12]);
    let end = 12u64.saturating_add(u64::from_le_bytes(len8));
    if end != bytes.len() as u64 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file: {} bytes after its end", bytes.len() as u64 - end)));
    }
    let data = decode_data(&snap.data)?;
    Ok((snap.meta, data))
}

/// Writes `data`, a backup's state taken at `meta`, into the state machine directory `dir` as
/// the snapshot of a new cluster whose one member is `id` at `addr` (`raftbridge snapshot
/// restore`). The position stays the backup's (event positions, revisions and the log index go
/// on from it); only the membership is new, in the meta and in the image, which a node reads
/// at open. What the state keeps of the old members (their registry entries, their
/// every-instance positions) the new leader forgets as it forgets any departed node.
pub fn write_restored(dir: &Path, meta: &SnapshotMeta, mut data: SmData, id: NodeId, addr: &str) -> io::Result<SnapshotMeta> {
    let membership = crate::raft::types::Membership::new(
        vec![BTreeSet::from([id])],
        BTreeMap::from([(id, crate::raft::types::BasicNode { addr: addr.to_string() })]),
    )
    .map_err(io::Error::other)?;
    let stored = StoredMembershipT::new(meta.last_log_id, membership);
    data.last_applied = meta.last_log_id;
    data.last_membership = stored.clone();
    // What the state kept of the old members is forgotten here, as the leader's `ForgetNodes`
    // forgets departed nodes, but not at a time that races the first joins: an id a joiner
    // reused kept the old node's registry entry and every-instance positions when its join
    // committed before the forget, and lost them when it came after.
    data.registry.retain(|node, _| *node == id);
    for s in data.subs.values_mut() {
        s.instances.retain(|node, _| *node == id);
    }
    let image = encode_image(&data)?;
    let meta = SnapshotMeta { last_log_id: meta.last_log_id, last_membership: stored };
    let sm = StateMachine::open(dir)?;
    if read(&sm.shared.data).last_applied.is_some() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} holds a snapshot already", dir.display())));
    }
    sm.persist(&StoredSnapshot { meta: meta.clone(), data: image })?;
    Ok(meta)
}

/// Keys and weight (`entry_weight`) of every state-store entry, counted afresh.
fn stores_usage(stores: &Stores) -> (u64, u64) {
    let mut usage = (0, 0);
    for (store, entries) in stores.iter().filter(|(store, _)| store.as_str() != CLUSTER_STORE) {
        for (key, v) in entries {
            usage.0 += 1;
            usage.1 += entry_weight(store, key, v.value.len());
        }
    }
    usage
}

/// State that joined after the snapshot layout was fixed. It travels after the image: the
/// bincode of this struct, its length (u32 LE), its CRC-32 (u32 LE) and `EXT_MAGIC`. Older
/// builds decode the image and leave the trailing bytes alone (bincode allows them), so both
/// builds read each other's snapshots; an image without the trailer decodes with nothing here.
/// New fields go after it, in `SmExtMore`: the extension's bytes are this struct's bincode, then
/// that one's, which builds before it leave unread (bincode allows trailing bytes) and this
/// build reads when they are there (an extension of an older build ends after this struct).
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct SmExt {
    /// `IdemRecord::fingerprint` of the records that have one, by key.
    idem_prints: Vec<(String, u64)>,
    /// What `SmExtMore` held (not in this struct's encoding).
    #[serde(skip)]
    more: SmExtMore,
}

/// The extension's second part (see `SmExt`); the third follows it the same way.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct SmExtMore {
    /// The headers of stored answers that have some (`StoredResponse::headers`), by key.
    idem_headers: Vec<(String, crate::sdk::HeaderList)>,
    /// What `SmExtLast` held (not in this struct's encoding).
    #[serde(skip)]
    last: SmExtLast,
}

/// The extension's third part (see `SmExt`).
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct SmExtLast {
    /// `SmData::expiries`: (store, key, when), the earliest first.
    expiries: Vec<(String, String, u64)>,
}

const EXT_MAGIC: [u8; 8] = *b"rbSmExt1";
const EXT_TRAILER: usize = 16;

/// Appends `d`'s extension (`SmExt`) to its image.
/// A snapshot image of `d` (what `decode_data` reads): its bincode, then the extension.
pub fn encode_image(d: &SmData) -> io::Result<Vec<u8>> {
    let mut image = Vec::new();
    bincode::serialize_into(&mut image, d).map_err(io::Error::other)?;
    append_ext(&mut image, d)?;
    Ok(image)
}

fn append_ext(image: &mut Vec<u8>, d: &SmData) -> io::Result<()> {
    let ext = SmExt { idem_prints: d.idem.iter().filter_map(|(k, r)| Some((k.clone(), r.fingerprint?))).collect(), more: SmExtMore::default() };
    let more = SmExtMore {
        idem_headers: d
            .idem
            .iter()
            .filter_map(|(k, r)| match &r.state {
                IdemState::Done(answer) if !answer.headers.is_empty() => Some((k.clone(), answer.headers.clone())),
                _ => None,
            })
            .collect(),
        last: SmExtLast::default(),
    };
    let last = SmExtLast { expiries: d.expiries.by_time.iter().map(|(at, store, key)| (store.clone(), key.clone(), *at)).collect() };
    let start = image.len();
    bincode::serialize_into(&mut *image, &ext).map_err(io::Error::other)?;
    bincode::serialize_into(&mut *image, &more).map_err(io::Error::other)?;
    bincode::serialize_into(&mut *image, &last).map_err(io::Error::other)?;
    let len = u32::try_from(image.len() - start).map_err(|_| io::Error::other("snapshot extension over 4 GiB"))?;
    let crc = crc32fast::hash(&image[start..]);
    image.extend_from_slice(&len.to_le_bytes());
    image.extend_from_slice(&crc.to_le_bytes());
    image.extend_from_slice(&EXT_MAGIC);
    Ok(())
}

/// The extension at the end of `image`, if it has one (an image ends in the magic by chance
/// once in 2^64; the whole image's CRC has been checked already). A trailer that ends in the
/// magic but whose length or CRC does not fit is damage, not an older image: an error, since a
/// node without the fingerprints would apply claims differently from the others.
fn read_ext(image: &[u8]) -> io::Result<SmExt> {
    let Some(body_end) = image.len().checked_sub(EXT_TRAILER) else { return Ok(SmExt::default()) };
    let trailer = &image[body_end..];
    if trailer[8..] != EXT_MAGIC {
        return Ok(SmExt::default());
    }
    let word = |at: usize| u32::from_le_bytes([trailer[at], trailer[at + 1], trailer[at + 2], trailer[at + 3]]);
    let (len, crc) = (word(0) as usize, word(4));
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot extension: {m}"));
    let Some(ext) = body_end.checked_sub(len).map(|start| &image[start..body_end]) else { return Err(bad("longer than the image")) };
    if crc32fast::hash(ext) != crc {
        return Err(bad("checksum mismatch"));
    }
    let undecodable = |e: bincode::Error| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot extension does not decode: {e}"));
    let mut first: SmExt = bincode::deserialize(ext).map_err(undecodable)?;
    let used = usize::try_from(bincode::serialized_size(&first).map_err(undecodable)?).map_err(|_| bad("longer than the image"))?;
    if let Some(rest) = ext.get(used..).filter(|rest| !rest.is_empty()) {
        first.more = bincode::deserialize(rest).map_err(undecodable)?;
        let used = usize::try_from(bincode::serialized_size(&first.more).map_err(undecodable)?).map_err(|_| bad("longer than the image"))?;
        if let Some(rest) = rest.get(used..).filter(|rest| !rest.is_empty()) {
            first.more.last = bincode::deserialize(rest).map_err(undecodable)?;
        }
    }
    Ok(first)
}

/// Decode and check a snapshot image; used before installing one received from the leader.
pub fn decode_data(bytes: &[u8]) -> io::Result<SmData> {
    let mut data: SmData = bincode::deserialize(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot data does not decode: {e}")))?;
    let ext = read_ext(bytes)?;
    for (key, print) in ext.idem_prints {
        if let Some(rec) = data.idem.get_mut(&key) {
            rec.fingerprint = Some(print);
        }
    }
    for (store, key, at) in ext.more.last.expiries {
        // Only for keys the image holds (an extension names no others).
        if data.stores.get(&store).is_some_and(|m| m.contains_key(&key)) {
            data.expiries.set(&store, &key, at);
        }
    }
    for (key, headers) in ext.more.idem_headers {
        if let Some(IdemRecord { state: IdemState::Done(answer), .. }) = data.idem.get_mut(&key) {
            answer.headers = headers;
        }
    }
    data.idem_bytes = data.idem.iter().map(|(k, r)| idem_weight(k, r)).sum();
    data.stores_digest = stores_digest(&data.stores);
    (data.stores_keys, data.stores_bytes) = stores_usage(&data.stores);
    Ok(data)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // Copy under the read lock (events are shared pointers), serialize and write outside it,
        // so applying entries does not wait for the snapshot.
        let started = std::time::Instant::now();
        let copy = read(&self.shared.data).clone();
        // How long apply waited on the copy (a write waits for the read lock).
        let copy_us = started.elapsed().as_micros() as u64;
        metrics::histogram!("raftbridge_snapshot_copy_seconds").record(copy_us as f64 / 1e6);
        let meta = SnapshotMeta { last_log_id: copy.last_applied, last_membership: copy.last_membership.clone() };
        let this = self.clone();
        let meta2 = meta.clone();
        // At background priority: see `process::background_thread`.
        let snap = crate::process::run_in_background("snapshot-build", move || {
            // Sized by the previous image (plus an eighth) rather than by `serialized_size`,
            // which walks every event once more only to count bytes.
            let previous = std::fs::metadata(this.shared.dir.join(SNAPSHOT_FILE)).map_or(0, |m| m.len() as usize);
            let mut data = Vec::with_capacity(previous + previous / 8);
            bincode::serialize_into(&mut data, &copy).map_err(io::Error::other)?;
            append_ext(&mut data, &copy)?;
            drop(copy);
            let snap = StoredSnapshot { meta: meta2, data };
            let written = this.persist(&snap)?;
            if !written {
                // A leader's newer snapshot was installed while this one was built: openraft
                // keeps that one and drops this.
                tracing::info!(last = ?snap.meta.last_log_id, "snapshot built behind the one on disk, not written");
            }
            Ok(snap)
        })
        .await?;
        let data = snap.data;
        metrics::counter!("raftbridge_snapshots_built_total").increment(1);
        tracing::info!(bytes = data.len(), ms = started.elapsed().as_millis() as u64, copy_us, last = ?meta.last_log_id, "snapshot built");
        Ok(Snapshot { meta, snapshot: data })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembershipT), io::Error> {
        let d = read(&self.shared.data);
        Ok((d.last_applied, d.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where Strm: futures_util::Stream<Item = Result<EntryResponder, io::Error>> + Unpin + Send {
        let replay_end = self.shared.replay_end.load(std::sync::atomic::Ordering::Relaxed);
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let (result, digest) = {
                let mut d = write(&self.shared.data);
                let result = apply_entry(&mut d, entry, replay_end);
                self.shared.registry_rev.store(registry_view_revision(&d), std::sync::atomic::Ordering::Release);
                (result, d.stores_digest)
            };
            // Per entry, not once per call: a key written by one entry of a call and deleted by
            // the next leaves the digest where the call found it, and a long poll that looked
            // between the two (the lock is taken per entry) would sleep on through the delete.
            self.shared.stores_changed(digest);
            if let Some(responder) = responder {
                responder.send(result);
            }
        }
        let (next, cluster_id) = {
            let d = read(&self.shared.data);
            // Under the same look: the record's revision, compared with the shared copy's.
            self.shared.note_features(&d);
            // Looked up until known: the first put stands (no apply changes it after), and
            // this runs after every batch of entries.
            (d.log.next, if self.shared.cluster_id.get().is_some() { None } else { d.cluster_id() })
        };
        self.shared.events_moved(next);
        self.shared.note_cluster_id(cluster_id);
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        // Off the runtime, as the old state's drop below: either takes long for a large image.
        let (mut data, snapshot) =
            tokio::task::spawn_blocking(move || decode_data(&snapshot).map(|d| (d, snapshot))).await.map_err(io::Error::other)??;
        // The meta is authoritative for what the image covers.
        data.last_applied = meta.last_log_id;
        data.last_membership = meta.last_membership.clone();
        let snap = StoredSnapshot { meta: meta.clone(), data: snapshot };
        let this = self.clone();
        // openraft installs only a snapshot newer than what this node committed, so the file
        // never holds a newer one; if it did, memory and file would disagree: say so.
        let written = tokio::task::spawn_blocking(move || this.persist(&snap)).await.map_err(io::Error::other)??;
        if !written {
            tracing::error!(last = ?meta.last_log_id, "installed snapshot not written: the file holds one at least as new");
        }
        let old = {
            let mut d = write(&self.shared.data);
            self.shared.registry_rev.store(registry_view_revision(&data), std::sync::atomic::Ordering::Release);
            let mut data = data;
            data.subs_generation = d.subs_generation;
            for sub in data.subs.values_mut() {
                data.subs_generation += 1;
                sub.incarnation = Incarnation(data.subs_generation);
            }
            let old = std::mem::replace(&mut *d, data);
            self.shared.note_cluster_id(d.cluster_id());
            self.shared.note_features(&d);
            self.shared.installs.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            self.shared.events_moved(d.log.next);
            // Sent even when the digest is equal: the maps are new, and a waiter compares them.
            self.shared.stores_moved.send_modify(|v| *v = d.stores_digest);
            old
        };
        // Freed after the lock is released, off the runtime: the old state may be as large as
        // the new one.
        drop(tokio::task::spawn_blocking(move || drop(old)));
        metrics::counter!("raftbridge_snapshots_installed_total").increment(1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        // The file is replaced atomically, so it holds one whole snapshot, its meta included.
        let path = self.shared.dir.join(SNAPSHOT_FILE);
        let snap = tokio::task::spawn_blocking(move || read_snapshot_file(&path)).await.map_err(io::Error::other)??;
        Ok(snap.map(|s| Snapshot { meta: s.meta, snapshot: s.data }))
    }
}

/// The dead letters a subscription lists, as (position, index in `dead`): a position
/// dead-lettered again (its subscription was sought back over it and it failed again) once, as
/// it ended last; per node for an every-instance subscription. The state keeps every letter
/// (bounded by `MAX_DEAD_LETTERS`): what members apply is not changed, only what is shown.
fn listed_letters(dead: &VecDeque<DeadLetter>) -> Vec<(u64, usize)> {
    let mut seen = std::collections::HashSet::with_capacity(dead.len());
    let mut listed: Vec<(u64, usize)> = dead.iter().enumerate().rev().filter(|(_, l)| seen.insert((l.position, l.node))).map(|(i, l)| (l.position, i)).collect();
    listed.reverse();
    listed
}

/// What tells a subscription's dead letters apart as listed (`listed_letters`), copied under
/// the state's lock (a few bytes a letter) to be counted after it (`count_listed`): apply waits
/// for that lock, and a subscription holds up to `MAX_DEAD_LETTERS`.
fn letter_keys(s: &SubState) -> Vec<(u64, Option<u64>)> {
    s.dead.iter().map(|l| (l.position, l.node)).collect()
}

/// How many letters a subscription lists (`listed_letters`) of those `letter_keys` copied.
fn count_listed(mut keys: Vec<(u64, Option<u64>)>) -> usize {
    keys.sort_unstable();
    keys.dedup();
    keys.len()
}

fn push_dead(s: &mut SubState, d: DeadLetter) {
    let counted = !replaying();
    if s.dead.len() >= MAX_DEAD_LETTERS {
        s.dead.pop_front();
        // Counted, not silent (as the other counters bumped in apply, not again on a replay).
        if counted {
            metrics::counter!("raftbridge_dead_letters_evicted_total").increment(1);
        }
    }
    if counted {
        metrics::counter!("raftbridge_dead_letters_total").increment(1);
    }
    s.dead.push_back(d);
}

thread_local! {
    /// Set by `apply_entry` while it applies an entry this process replays (see `replaying`).
    /// A thread-local, not a field: what reads it sits deep in apply's helpers, and apply runs
    /// synchronously between the set and the reset, on one thread.
    static REPLAYING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the entry being applied was in this node's log when the process started, so that
/// an earlier process applied it already (the state machine is rebuilt from the snapshot and
/// the log at each start). The counters apply bumps (dead letters, events retention took from
/// a subscription) skip it, and so does the warning: Prometheus counters start at zero with a
/// process, and counting a replay again showed as a burst of dead letters at every restart,
/// which an alert on their rate took for new ones. An entry that was in the log but not yet
/// applied by the earlier process (the crash came between its append and its commit) is not
/// counted on this node either: a count short by a few on one node, not doubled.
fn replaying() -> bool {
    REPLAYING.with(std::cell::Cell::get)
}

/// The revision of the members' registry (`SmShared::registry`): the later of the registry's
/// last change and the membership's, both log indexes.
fn registry_view_revision(d: &SmData) -> u64 {
    d.registry_revision.max(d.last_membership.log_id().map_or(0, |l| l.index))
}

/// Applies one entry; `replay_end` is one past the last index of the log at start
/// (`SmShared::replay_through`, 0: none).
fn apply_entry(d: &mut SmData, entry: Entry, replay_end: u64) -> CommandResult {
    REPLAYING.with(|r| r.set(entry.log_id.index < replay_end));
    d.last_applied = Some(entry.log_id);
    let result = match entry.payload {
        openraft::EntryPayload::Blank => CommandResult::None,
        openraft::EntryPayload::Normal(cmd) => d.apply(entry.log_id.index, cmd),
        openraft::EntryPayload::Membership(m) => {
            d.last_membership = StoredMembershipT::new(Some(entry.log_id), m);
            CommandResult::None
        }
    };
    REPLAYING.with(|r| r.set(false));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: EventLimits = EventLimits { max_events: 100, max_bytes: 1 << 20, max_age_ms: 3_600_000, dedup_window_ms: 60_000 };

    /// `n` new events named `e`.
    fn events(n: usize) -> Arc<Vec<crate::broker::event::NewEvent>> {
        let meta = crate::sdk::MessageMeta::default();
        Arc::new((0..n).map(|_| crate::broker::new_event("e", b"1".to_vec(), &meta, None, None)).collect())
    }

    /// With a short `--events-max-age-s`, an event stamped by its node long before its entry
    /// (a follower whose clock is behind, or a group that waited out an election) is stored
    /// and readable after the apply that acknowledges it: the entry's builder stamps it anew.
    /// It used to be published and trimmed by the same apply, acknowledged and never read.
    #[test]
    fn an_event_stamped_long_before_its_entry_outlives_a_short_max_age() {
        let limits = EventLimits { max_age_ms: 20_000, ..LIMITS };
        let now = 1_000_000;
        let mut old = (*events(2)).clone();
        for e in &mut old {
            Arc::make_mut(&mut e.body).timestamp = now - 40_000;
        }
        let mut d = SmData::default();
        let cmd = crate::broker::events_entry(old, now, limits);
        assert!(matches!(d.apply(2, cmd), CommandResult::Published(ids) if ids.len() == 2));
        assert_eq!(d.log.events.len(), 2, "both acknowledged events are still there to read");
        assert!(d.log.events.iter().all(|e| e.timestamp == now), "stamped with the entry's clock");
        // What the entry's builder prevents: the same events as they came, trimmed at once.
        let mut old = (*events(1)).clone();
        Arc::make_mut(&mut old[0].body).timestamp = now - 40_000;
        let mut d = SmData::default();
        d.apply(2, Command::Publish { now_ms: now, events: Arc::new(old), limits });
        assert!(d.log.events.is_empty());
    }

    /// A service with one shared durable subscription to every event.
    fn one_subscription(name: &str) -> crate::sdk::ServiceDecl {
        use crate::broker::event::EventFilter;
        use crate::broker::event::SubscriptionDecl;
        let subscriptions = vec![SubscriptionDecl::new(name, EventFilter::default())];
        crate::sdk::ServiceDecl { name: "svc".into(), version: 1, commands: Vec::new(), subscriptions, available: true }
    }

    /// An every-instance durable subscription to every event, and a service with it alone.
    fn every_instance(name: &str) -> (crate::broker::event::SubscriptionDecl, crate::sdk::ServiceDecl) {
        let mut decl = crate::broker::event::SubscriptionDecl::new(name, crate::broker::event::EventFilter::default());
        decl.shared = false;
        let service = crate::sdk::ServiceDecl { name: "svc".into(), version: 1, commands: Vec::new(), subscriptions: vec![decl.clone()], available: true };
        (decl, service)
    }

    /// A membership entry of one configuration of `ids` at `index`, in term 1.
    fn membership(ids: &[NodeId], index: u64) -> Entry {
        use openraft::vote::RaftLeaderIdExt;
        let m = crate::raft::types::Membership::new_with_defaults(vec![ids.iter().copied().collect()], []);
        let log_id = LogId::new(<TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(1, 1), index);
        Entry { log_id, payload: openraft::EntryPayload::Membership(m) }
    }

    /// A state machine's shared part, empty and without a directory.
    fn empty_shared() -> SmShared {
        SmShared {
            data: RwLock::new(SmData::default()),
            registry_rev: std::sync::atomic::AtomicU64::new(0),
            dir: PathBuf::new(),
            events_next: tokio::sync::watch::Sender::new(0),
            stores_moved: tokio::sync::watch::Sender::new(0),
            persisted: std::sync::Mutex::new(None),
            replay_end: std::sync::atomic::AtomicU64::new(0),
            installs: std::sync::atomic::AtomicU64::new(0),
            cluster_id: KnownClusterId::default(),
            features: RecordedFeatures::default(),
        }
    }

    /// Counts what is recorded into counters, by name, for `metrics::with_local_recorder`.
    #[derive(Default)]
    struct Counted(std::sync::Mutex<BTreeMap<String, Arc<std::sync::atomic::AtomicU64>>>);

    impl Counted {
        fn get(&self, name: &str) -> u64 {
            crate::lock(&self.0).get(name).map_or(0, |c| c.load(std::sync::atomic::Ordering::Relaxed))
        }
    }

    impl metrics::Recorder for Counted {
        fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
            metrics::Counter::from_arc(crate::lock(&self.0).entry(key.name().to_string()).or_default().clone())
        }
        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::noop()
        }
        fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    /// Entries a restarted node applies again from its log (up to the log's last index at
    /// start) leave the counters apply bumps alone; the same entries applied for the first time
    /// count. Before, every restart counted its replayed dead letters and expired events again.
    #[test]
    fn a_replayed_entry_counts_nothing_again() {
        use openraft::entry::RaftEntry;
        use openraft::vote::RaftLeaderIdExt;
        let log_id = |index| LogId::new(<TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(1, 1), index);
        let mut service = one_subscription("sub");
        service.subscriptions[0].max_attempts = 1;
        // Two events retention keeps one of (count bound 1): the subscription loses the first.
        let limits = EventLimits { max_events: 1, ..LIMITS };
        // The event retention keeps: the one the subscription fails.
        let kept = {
            let mut d = SmData::default();
            d.apply(1, Command::Register { node: 1, services: vec![service.clone()] });
            d.apply(2, Command::Publish { now_ms: 10, events: events(2), limits });
            d.log.first()
        };
        let entries = || {
            [
                Entry::new_normal(log_id(1), Command::Register { node: 1, services: vec![service.clone()] }),
                Entry::new_normal(log_id(2), Command::Publish { now_ms: 10, events: events(2), limits }),
                Entry::new_normal(log_id(3), Command::SubUpdate { updates: vec![SubUpdate::Failed { sub: "sub".into(), position: kept, reason: "poison".into() }] }),
            ]
        };
        let names = ["raftbridge_dead_letters_total", "raftbridge_subscription_expired_events_total"];
        for (replay_end, counted) in [(4, 0), (0, 1), (3, 0)] {
            let recorder = Counted::default();
            let mut d = SmData::default();
            metrics::with_local_recorder(&recorder, || {
                for entry in entries() {
                    apply_entry(&mut d, entry, replay_end);
                }
            });
            assert_eq!(d.subs["sub"].dead.len(), 1, "the dead letter is in the state whether replayed or not");
            // With the log ending at entry 2, the dead letter of entry 3 is new.
            let dead = if replay_end == 3 { 1 } else { counted };
            assert_eq!((recorder.get(names[0]), recorder.get(names[1])), (dead, counted), "log ends before {replay_end}");
            assert!(!replaying(), "the mark is reset after each entry");
        }
    }

    /// A failure reported with the attempts its delivery was handed out at counts once, however
    /// often it is sent (a forwarded update sent again after its link closed); the next
    /// delivery's failure counts; the last attempt dead-letters; on a subscription that is not
    /// shared (it changed mode) it counts nothing. `Failed`, from older builds, counts each time.
    #[test]
    fn a_failure_at_an_attempt_counts_once_and_only_on_a_shared_subscription() {
        let mut service = one_subscription("sub");
        service.subscriptions[0].max_attempts = 3;
        let mut d = SmData::default();
        d.apply(1, Command::Register { node: 1, services: vec![service] });
        d.apply(2, Command::Publish { now_ms: 10, events: events(2), limits: LIMITS });
        let (first, second) = (d.log.first(), d.log.first() + 1);
        let at = |position, attempts| SubUpdate::FailedAt { sub: "sub".into(), position, attempts, reason: "no".into() };
        let mut index = 3;
        let mut apply = |d: &mut SmData, u: SubUpdate| {
            d.apply(index, Command::SubUpdate { updates: vec![u] });
            index += 1;
        };
        apply(&mut d, at(first, 0));
        apply(&mut d, at(first, 0));
        assert_eq!(d.subs["sub"].attempts.get(&first), Some(&1), "sent twice, counted once");
        apply(&mut d, at(first, 1));
        apply(&mut d, at(first, 0));
        assert_eq!(d.subs["sub"].attempts.get(&first), Some(&2), "the next delivery's failure counts, a stale one not");
        apply(&mut d, at(first, 2));
        assert_eq!((d.subs["sub"].attempts.get(&first), d.subs["sub"].dead.len()), (None, 1), "the last attempt: a dead letter");
        apply(&mut d, at(first, 2));
        assert_eq!(d.subs["sub"].dead.len(), 1, "once");
        // The older variant counts each report.
        apply(&mut d, SubUpdate::Failed { sub: "sub".into(), position: second, reason: "no".into() });
        apply(&mut d, SubUpdate::Failed { sub: "sub".into(), position: second, reason: "no".into() });
        assert_eq!(d.subs["sub"].attempts.get(&second), Some(&2));

        let (_, every) = every_instance("sub");
        let mut d = SmData::default();
        d.apply(1, Command::Register { node: 1, services: vec![every] });
        d.apply(2, Command::Publish { now_ms: 10, events: events(1), limits: LIMITS });
        let first = d.log.first();
        let before = d.subs["sub"].clone();
        d.apply(3, Command::SubUpdate { updates: vec![at(first, 0)] });
        assert_eq!(d.subs["sub"].attempts.get(&first), None, "not counted on an every-instance subscription");
        assert_eq!((d.subs["sub"].cursor, d.subs["sub"].dead.len()), (before.cursor, before.dead.len()));
    }

    /// A failure no retry can mend (`Rejected`) dead-letters at once with the attempts it had
    /// plus one, under `FailedAt`'s rule: a stale report (another attempt count) and a second
    /// one count nothing.
    #[test]
    fn a_rejected_delivery_is_dead_lettered_at_once() {
        let mut service = one_subscription("sub");
        service.subscriptions[0].max_attempts = 5;
        let mut d = SmData::default();
        d.apply(1, Command::Register { node: 1, services: vec![service] });
        d.apply(2, Command::Publish { now_ms: 10, events: events(2), limits: LIMITS });
        let (first, second) = (d.log.first(), d.log.first() + 1);
        let rejected = |position, attempts| SubUpdate::Rejected { sub: "sub".into(), position, attempts, reason: "never".into() };
        d.apply(3, Command::SubUpdate { updates: vec![rejected(first, 1)] });
        assert_eq!((d.subs["sub"].attempts.get(&first), d.subs["sub"].dead.len()), (None, 0), "stale: it had no failed attempt");
        d.apply(4, Command::SubUpdate { updates: vec![SubUpdate::FailedAt { sub: "sub".into(), position: first, attempts: 0, reason: "no".into() }, rejected(first, 1)] });
        let dead = &d.subs["sub"].dead;
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].position, dead[0].attempts, dead[0].reason.as_str()), (first, 2, "never"));
        assert_eq!(d.subs["sub"].cursor, second, "settled: the cursor passed it");
        d.apply(5, Command::SubUpdate { updates: vec![rejected(first, 1), rejected(second, 0)] });
        assert_eq!(d.subs["sub"].dead.len(), 2, "the first once, the second at its first attempt");
        assert_eq!(d.subs["sub"].dead[1].attempts, 1);
    }

    /// A seek moves a shared subscription's cursor into the retained log (clamped at both
    /// ends), forgets acks and attempts, keeps dead letters, and starts its progress anew (the
    /// delivery loop's backlog looks afresh); an every-instance or unknown one is not moved.
    #[test]
    fn a_seek_moves_a_shared_subscriptions_cursor_within_the_retained_log() {
        let mut d = SmData::default();
        d.apply(1, Command::Register { node: 1, services: vec![one_subscription("sub")] });
        d.apply(2, Command::Publish { now_ms: 10, events: events(4), limits: LIMITS });
        let (first, end) = (d.log.first(), d.log.next);
        let ack = |position| SubUpdate::Ack { sub: "sub".into(), position };
        d.apply(3, Command::SubUpdate { updates: vec![ack(first), ack(first + 1), ack(first + 3)] });
        d.apply(4, Command::SubUpdate { updates: vec![SubUpdate::Rejected { sub: "sub".into(), position: first + 2, attempts: 0, reason: "bad".into() }] });
        assert_eq!((d.subs["sub"].cursor, d.subs["sub"].dead.len()), (end, 1), "all settled, one dead");
        // The delivery loop's backlog, as it stands with everything settled.
        let shared = empty_shared();
        *write(&shared.data) = d.clone();
        let mut backlog = Backlog::default();
        assert!(shared.pending("sub", 10, &mut backlog, |_| false).is_empty());
        let before = d.subs["sub"].incarnation.0;
        let seek = |position| Command::SeekSubscription { name: "sub".into(), position };
        assert_eq!(d.apply(5, seek(first + 1)), CommandResult::SubscriptionSought { cursor: Some(first + 1), shared: true });
        let s = &d.subs["sub"];
        assert_eq!((s.cursor, s.done.len(), s.attempts.len(), s.dead.len()), (first + 1, 0, 0, 1), "back: acks forgotten, dead letters kept");
        assert_ne!(s.incarnation.0, before, "progress starts anew");
        *write(&shared.data) = d.clone();
        let pending: Vec<u64> = shared.pending("sub", 10, &mut backlog, |_| false).iter().map(|(e, _)| e.position).collect();
        assert_eq!(pending, vec![first + 1, first + 2, first + 3], "delivered again from there, the dead letter too");
        assert_eq!(d.apply(6, seek(0)), CommandResult::SubscriptionSought { cursor: Some(first), shared: true }, "before the oldest retained");
        assert_eq!(d.apply(7, seek(u64::MAX)), CommandResult::SubscriptionSought { cursor: Some(end), shared: true }, "past the end");
        // A late ack of a delivery handed out before the seek still settles its event.
        d.apply(8, seek(first));
        d.apply(9, Command::SubUpdate { updates: vec![ack(first)] });
        assert_eq!(d.subs["sub"].cursor, first + 1);

        let (_, every) = every_instance("each");
        d.apply(10, Command::Register { node: 2, services: vec![every] });
        let instances = d.subs["each"].instances.clone();
        assert_eq!(d.apply(11, Command::SeekSubscription { name: "each".into(), position: first }), CommandResult::SubscriptionSought { cursor: None, shared: false });
        assert_eq!(d.subs["each"].instances, instances, "an every-instance subscription is not moved");
        assert_eq!(d.apply(12, Command::SeekSubscription { name: "nope".into(), position: first }), CommandResult::SubscriptionSought { cursor: None, shared: true });
    }

    /// A state machine where `node` registered `service` (entry 1), then `events` were published
    /// under `limits` (entry 2).
    fn registered_and_published(
        node: NodeId,
        service: crate::sdk::ServiceDecl,
        events: Arc<Vec<crate::broker::event::NewEvent>>,
        limits: EventLimits,
    ) -> SmShared {
        let sm = empty_shared();
        {
            let mut d = write(&sm.data);
            d.apply(1, Command::Register { node, services: vec![service] });
            d.apply(2, Command::Publish { now_ms: 10, events, limits });
        }
        sm
    }

    fn put(store: &str, key: &str, v: &str, if_revision: Option<u64>) -> Command {
        Command::Put { store: store.into(), key: key.into(), value: v.as_bytes().to_vec(), if_revision, tag: None }
    }

    /// Idempotency records past their count or byte bound: the proposed window shrinks to what
    /// keeps the newest within the bounds, applying it forgets exactly the oldest, and the
    /// running weight always equals a fresh count (as a decoded snapshot makes it).
    #[test]
    fn idempotency_records_stay_within_their_bounds() {
        let shared = empty_shared();
        let begin = |key: &str, now_ms, window_ms| Command::IdemBegin { key: key.into(), attempt: 1, now_ms, lease_ms: 1000, window_ms };
        let answer = |kib: usize| StoredResponse { status: 200, body: vec![b'a'; kib << 10], content_type: None, headers: Vec::new() };
        {
            let mut d = shared.data.write().unwrap();
            for i in 0..10u64 {
                let key = format!("k{i}");
                assert_eq!(d.apply(i + 1, begin(&key, 1_000 + i, 600_000)), CommandResult::IdemBegun);
                let done = Command::IdemComplete { key, attempt: 1, response: answer(10) };
                assert!(matches!(d.apply(i + 100, done), CommandResult::IdemDone(_)));
            }
            let recount: u64 = d.idem.iter().map(|(k, r)| idem_weight(k, r)).sum();
            assert_eq!(d.idem_bytes, recount, "the running weight is the sum of the records");
        }
        assert_eq!(shared.idem_window(1_009, 600_000, 10, u64::MAX, true), 600_000, "within the bounds: the full window");
        // Six keys at most: the window reaches back to k4 (created at 1004), the clock is 1009.
        assert_eq!(shared.idem_window(1_009, 600_000, 6, u64::MAX, true), 5);
        // 35 KiB at most: three 10 KiB answers and their keys fit, so the window starts at k7.
        assert_eq!(shared.idem_window(1_009, 600_000, 100, 35 << 10, true), 2);
        // After a quiet spell the command's own clock counts: 5 s later the window is 5 s longer,
        // so applying it still keeps k4..k9 (it used to forget them all).
        assert_eq!(shared.idem_window(6_009, 600_000, 6, u64::MAX, true), 5_005);
        {
            let mut d = shared.data.write().unwrap();
            let w = shared_window(&d, 6);
            d.apply(200, begin("k9", 1_009, w));
            let kept: Vec<&String> = d.idem.keys().collect();
            assert_eq!(kept, ["k4", "k5", "k6", "k7", "k8", "k9"], "the oldest are forgotten first");
            let recount: u64 = d.idem.iter().map(|(k, r)| idem_weight(k, r)).sum();
            assert_eq!(d.idem_bytes, recount);
            let image = bincode::serialize(&*d).unwrap();
            assert_eq!(decode_data(&image).unwrap().idem_bytes, recount, "a decoded snapshot counts the same");
        }

        fn shared_window(d: &SmData, max_keys: usize) -> u64 {
            let weigh = |created, key: &str| match d.idem.get(key).filter(|r| r.created_ms == created) {
                None => Forget::Stale,
                Some(r) if r.held_at(d.clock_ms) => Forget::Kept,
                Some(r) => Forget::Frees(idem_weight(key, r)),
            };
            bounded_window(&d.idem_order, d.clock_ms, 600_000, (d.idem.len(), d.idem_bytes), (max_keys, u64::MAX), weigh)
        }
    }

    /// Producer keys past their count bound: a publish with the proposed window keeps the newest
    /// `max_keys` keys; a forgotten key publishes anew, a kept one is still deduplicated.
    #[test]
    fn producer_keys_stay_within_their_bound() {
        let shared = empty_shared();
        let meta = crate::sdk::MessageMeta::default();
        let keyed = |k: &str| Arc::new(vec![crate::broker::new_event("e", b"1".to_vec(), &meta, None, Some(k.to_string()))]);
        let publish = |now_ms, key: &str, window_ms| Command::Publish {
            now_ms,
            events: keyed(key),
            limits: EventLimits { dedup_window_ms: window_ms, ..LIMITS },
        };
        {
            let mut d = shared.data.write().unwrap();
            for i in 0..8u64 {
                d.apply(i + 1, publish(5_000 + i, &format!("p{i}"), 60_000));
            }
            assert_eq!(d.log.keys.len(), 8);
        }
        assert_eq!(shared.dedup_window(5_007, 60_000, 8), 60_000);
        // A publish 30 s after the last one still keeps the newest three.
        let later = shared.dedup_window(35_007, 60_000, 3);
        assert_eq!(later, 30_002);
        {
            let mut quiet = shared.data.read().unwrap().clone();
            quiet.apply(19, publish(35_007, "p-new", later));
            let kept: Vec<&str> = quiet.log.keys.keys().map(String::as_str).collect();
            assert_eq!(kept, ["p-new", "p5", "p6", "p7"], "after a pause the newest keys stay");
        }
        let w = shared.dedup_window(5_007, 60_000, 3);
        assert_eq!(w, 2, "the clock is 5007; the newest three keys start at 5005");
        let mut d = shared.data.write().unwrap();
        let CommandResult::Published(first) = d.apply(20, publish(5_007, "p7", w)) else { panic!() };
        let kept: Vec<&str> = d.log.keys.keys().map(String::as_str).collect();
        assert_eq!(kept, ["p5", "p6", "p7"], "the oldest keys are forgotten first");
        assert_eq!(first[0].1, 8, "a kept key is deduplicated: p7 keeps its position");
        let CommandResult::Published(again) = d.apply(21, publish(5_008, "p0", w)) else { panic!() };
        assert_eq!(again[0].1, 9, "a forgotten key is published anew");
    }

    /// Two services declaring one subscription name: the least service name's declaration
    /// stands, whichever registered first or last.
    #[test]
    fn a_subscription_name_keeps_the_declaration_of_its_owner() {
        let register = |d: &mut SmData, index, node, service: &str, event: &str| {
            let filter = crate::broker::event::EventFilter { event_name: Some(event.into()), ..Default::default() };
            let decl = SubscriptionDecl::new("s", filter);
            let svc = crate::sdk::ServiceDecl { name: service.into(), version: 1, commands: Vec::new(), subscriptions: vec![decl], available: true };
            d.apply(index, Command::Register { node, services: vec![svc] });
        };
        let filter_of = |d: &SmData| d.subs.get("s").and_then(|s| s.decl.filter.event_name.clone());
        let mut d = SmData::default();
        let members = crate::raft::types::Membership::new_with_defaults(vec![[1, 2, 3].into()], []);
        d.last_membership = StoredMembershipT::new(None, members);
        register(&mut d, 1, 1, "billing", "b");
        assert_eq!(filter_of(&d).as_deref(), Some("b"));
        register(&mut d, 2, 2, "audit", "a");
        assert_eq!(filter_of(&d).as_deref(), Some("a"), "audit sorts first: it owns the name");
        register(&mut d, 3, 1, "billing", "b2");
        register(&mut d, 4, 3, "zeta", "z");
        assert_eq!(filter_of(&d).as_deref(), Some("a"), "later registrations of other services do not take it over");
        // The entry of a node that left the cluster owns nothing.
        d.last_membership = StoredMembershipT::new(None, crate::raft::types::Membership::new_with_defaults(vec![[1, 3].into()], []));
        register(&mut d, 5, 1, "billing", "b3");
        assert_eq!(filter_of(&d).as_deref(), Some("b3"), "node 2 (audit) is gone: billing owns it");
    }

    /// The registry the proxy routes by holds the members' entries only: a node removed while
    /// its entry stood (killed, then `leave`) leaves it with the membership entry that removes
    /// it, whose index is the registry's revision then (the routing table is built again).
    #[test]
    fn a_removed_nodes_registry_entry_is_left_out_of_the_routing_registry() {
        let sm = empty_shared();
        let svc = crate::sdk::ServiceDecl { name: "solo".into(), version: 2, commands: Vec::new(), subscriptions: Vec::new(), available: true };
        {
            let mut d = write(&sm.data);
            apply_entry(&mut d, membership(&[1, 2, 4], 1), 0);
            d.apply(2, Command::Register { node: 4, services: vec![svc.clone()] });
            d.apply(3, Command::Register { node: 1, services: vec![svc] });
        }
        let (revision, registry) = sm.registry();
        assert_eq!((revision, registry.keys().copied().collect::<Vec<_>>()), (3, vec![1, 4]));
        apply_entry(&mut write(&sm.data), membership(&[1, 2], 4), 0);
        let (revision, registry) = sm.registry();
        assert_eq!((revision, registry.keys().copied().collect::<Vec<_>>()), (4, vec![1]), "node 4 was removed");
        assert!(sm.registry_entry(4).is_some(), "its entry itself stays in the replicated state");
    }

    /// `ForgetNodes` drops the registry entry and the every-instance positions of each listed
    /// node that is not a member when it applies, and nothing of a member's (a node listed that
    /// joined meanwhile keeps its own).
    #[test]
    fn departed_nodes_are_forgotten_and_members_are_not() {
        let sm = empty_shared();
        let (_, svc) = every_instance("each");
        {
            let mut d = write(&sm.data);
            apply_entry(&mut d, membership(&[1, 2, 4], 1), 0);
            for (i, node) in [1, 2, 4].into_iter().enumerate() {
                d.apply(2 + i as u64, Command::Register { node, services: vec![svc.clone()] });
            }
        }
        assert!(sm.departed().is_empty(), "all are members");
        apply_entry(&mut write(&sm.data), membership(&[1, 2], 5), 0);
        assert_eq!(sm.departed(), vec![4], "node 4 was removed: its entry and its position stay");
        assert!(read(&sm.data).subs["each"].instances.contains_key(&4));
        write(&sm.data).apply(6, Command::ForgetNodes { nodes: vec![4, 2] });
        assert!(sm.departed().is_empty());
        assert!(sm.registry_entry(4).is_none() && !read(&sm.data).subs["each"].instances.contains_key(&4), "node 4 is forgotten");
        assert!(sm.registry_entry(2).is_some() && read(&sm.data).subs["each"].instances.contains_key(&2), "node 2, a member, keeps its own");
        assert!(Command::ForgetNodes { nodes: vec![4] }.retry_safe());
    }

    /// A subscription handler's tagged write leaves a record that no claim ticks away; the
    /// expiry claim (`Proxy::expire_records`) is due once it is past the window, in the state
    /// machine's own clock, and applying it forgets the record.
    #[test]
    fn handler_records_are_due_for_expiry_past_their_window() {
        let shared = empty_shared();
        let incr = Command::Increment { store: "s".into(), key: "c".into(), by: 1, tag: Some(("sub:audit:e1".into(), 0)) };
        {
            let mut d = write(&shared.data);
            d.clock_ms = 1_000;
            assert!(matches!(d.apply(1, incr), CommandResult::Incremented { value: 1, .. }));
        }
        assert_eq!(shared.idem_expiry_due(60_000, 1000, u64::MAX, true), None, "young");
        // Events move the clock on (their own `now_ms`), nothing else happens to the record.
        {
            let mut d = write(&shared.data);
            d.clock_ms = 70_000;
            assert!(d.idem.contains_key("sub:audit:e1"));
        }
        assert_eq!(shared.idem_expiry_due(60_000, 1000, u64::MAX, true), Some((70_000, 60_000)));
        // Over the count bound, due at once with a shorter window.
        assert!(shared.idem_expiry_due(600_000, 0, u64::MAX, true).is_some_and(|(_, w)| w < 600_000));
        let tick = Command::IdemBegin { key: "\u{0}expiry".into(), attempt: 0, now_ms: 70_000, lease_ms: 0, window_ms: 60_000 };
        assert_eq!(write(&shared.data).apply(2, tick), CommandResult::IdemBegun);
        let d = read(&shared.data);
        assert!(!d.idem.contains_key("sub:audit:e1"), "expired");
        assert_eq!(d.idem.len(), 1, "only the expiry claim's own record is left");
    }

    /// A transaction writes all its keys under one revision or, when any op's revision does
    /// not match the state before it, nothing; its writes count in the quota and the digest as
    /// single writes do, end expiries, and a tagged one applies once.
    #[test]
    fn a_transaction_applies_all_or_nothing_under_one_revision() {
        let mut d = SmData::default();
        d.apply(2, put("s", "a", "1", None));
        d.apply(3, put("s", "b", "2", None));
        d.apply(4, Command::PutExpiring { store: "s".into(), key: "lease".into(), value: b"1".to_vec(), if_revision: None, expires_ms: 9_000 });
        let tput = |key: &str, v: &str, if_revision| TxnOp::Put { key: key.into(), value: v.as_bytes().to_vec(), if_revision };
        let txn = |ops: Vec<TxnOp>| Command::Txn { store: "s".into(), ops };
        let before = (d.stores.clone(), d.stores_keys, d.stores_bytes, d.stores_digest);
        // The third op's check fails: nothing of the first two is written.
        let failing = txn(vec![tput("a", "10", Some(2)), TxnOp::Delete { key: "b".into(), if_revision: None }, TxnOp::Check { key: "c".into(), revision: 3 }]);
        assert_eq!(d.apply(5, failing), CommandResult::TxnFailed { op: 2, current: None });
        assert_eq!((d.stores.clone(), d.stores_keys, d.stores_bytes, d.stores_digest), before, "nothing written");
        // A put's precondition is judged against the state before the transaction.
        assert_eq!(d.apply(6, txn(vec![tput("c", "1", Some(0)), tput("a", "1", Some(5))])), CommandResult::TxnFailed { op: 1, current: Some(2) });
        let ok = txn(vec![
            tput("a", "10", Some(2)),
            TxnOp::Delete { key: "b".into(), if_revision: Some(3) },
            TxnOp::Check { key: "c".into(), revision: 0 },
            tput("c", "\"new\"", None),
            tput("lease", "2", None),
            TxnOp::Delete { key: "gone".into(), if_revision: None },
        ]);
        assert_eq!(d.apply(7, ok), CommandResult::Written { revision: 7 });
        let got = |d: &SmData, k: &str| d.stores.get("s").and_then(|m| m.get(k)).map(|v| (String::from_utf8(v.value.clone()).unwrap(), v.revision));
        assert_eq!(got(&d, "a"), Some(("10".into(), 7)));
        assert_eq!(got(&d, "b"), None);
        assert_eq!(got(&d, "c"), Some(("\"new\"".into(), 7)));
        assert_eq!(got(&d, "lease"), Some(("2".into(), 7)));
        assert_eq!(d.expiries.of("s", "lease"), None, "a put in a transaction ends the key's expiry, as a put does");
        // The counts and the digest are those of the same keys written one by one.
        let mut single = SmData::default();
        for (i, (k, v)) in [("a", "10"), ("c", "\"new\""), ("lease", "2")].into_iter().enumerate() {
            single.apply(7 + i as u64, put("s", k, v, None));
        }
        assert_eq!((d.stores_keys, d.stores_bytes), (single.stores_keys, single.stores_bytes));
        assert_eq!(d.stores_digest, stores_digest(&d.stores), "the digest follows the transaction's writes");
        // Tagged (a handler's), it applies once: the re-run is answered from the record.
        let tagged = |ops| Command::Tagged { tag: ("run".into(), 0), command: Box::new(txn(ops)) };
        assert_eq!(d.apply(8, tagged(vec![tput("n", "1", Some(0))])), CommandResult::Written { revision: 8 });
        assert_eq!(d.apply(9, tagged(vec![tput("n", "1", Some(0))])), CommandResult::Written { revision: 8 }, "the first run's answer");
        assert_eq!(got(&d, "n"), Some(("1".into(), 8)));
        // It survives a snapshot's encoding as the single writes do.
        let decoded = decode_data(&bincode::serialize(&d).expect("encodes")).expect("decodes");
        assert_eq!((decoded.stores_keys, decoded.stores_bytes, stores_digest(&decoded.stores)), (d.stores_keys, d.stores_bytes, d.stores_digest));
    }

    #[test]
    fn compare_and_set() {
        let mut d = SmData::default();
        assert_eq!(d.apply(5, put("s", "k", "1", Some(0))), CommandResult::Written { revision: 5 });
        assert_eq!(d.apply(6, put("s", "k", "2", Some(0))), CommandResult::PreconditionFailed { current: Some(5) });
        assert_eq!(d.apply(7, put("s", "k", "2", Some(5))), CommandResult::Written { revision: 7 });
        let del = Command::Delete { store: "s".into(), key: "k".into(), if_revision: Some(6) };
        assert_eq!(d.apply(8, del), CommandResult::PreconditionFailed { current: Some(7) });
        let del = Command::Delete { store: "s".into(), key: "k".into(), if_revision: None };
        assert_eq!(d.apply(9, del), CommandResult::Deleted { existed: true });
        assert!(d.stores.is_empty());
        // The quota's count follows every write, and a decoded snapshot counts the same.
        assert_eq!((d.stores_keys, d.stores_bytes), (0, 0));
        d.apply(11, put("s", "a", "12345", None));
        d.apply(12, put("s", "a", "1", None));
        d.apply(13, Command::Increment { store: "t".into(), key: "n".into(), by: 7, tag: None });
        d.apply(14, put("t", "m", "\"x\"", None));
        let expect = entry_weight("s", "a", 1) + entry_weight("t", "n", 1) + entry_weight("t", "m", 3);
        assert_eq!((d.stores_keys, d.stores_bytes), (3, expect));
        d.apply(15, Command::Delete { store: "t".into(), key: "m".into(), if_revision: None });
        assert_eq!((d.stores_keys, d.stores_bytes), (2, expect - entry_weight("t", "m", 3)));
        let decoded = decode_data(&bincode::serialize(&d).expect("encodes")).expect("decodes");
        assert_eq!((decoded.stores_keys, decoded.stores_bytes), (d.stores_keys, d.stores_bytes));
        d.apply(16, Command::Delete { store: "s".into(), key: "a".into(), if_revision: None });
        d.apply(17, Command::Delete { store: "t".into(), key: "n".into(), if_revision: None });
        assert_eq!((d.stores_keys, d.stores_bytes), (0, 0));
        // A refused write to a store that does not exist leaves nothing behind.
        assert_eq!(d.apply(10, put("new", "k", "1", Some(3))), CommandResult::PreconditionFailed { current: None });
        assert!(d.stores.is_empty(), "{:?}", d.stores.keys().collect::<Vec<_>>());
    }

    /// A handler's delete and expiring put carry their tag in `Command::Tagged`: a re-run of a
    /// run that deleted a key and put it again leaves the key as the first run did (before,
    /// the delete applied again and the put was answered from the record), a re-run's
    /// expiring put keeps the first run's expiry, and each answers what the first run heard.
    #[test]
    fn a_rerun_applies_its_tagged_delete_and_expiring_put_once() {
        let mut d = SmData::default();
        let tagged = |place: u32, command: Command| Command::Tagged { tag: ("run".into(), place), command: Box::new(command) };
        let delete = |key: &str| Command::Delete { store: "s".into(), key: key.into(), if_revision: None };
        let put_tagged = |key: &str, v: &str, place: u32| Command::Put { store: "s".into(), key: key.into(), value: v.as_bytes().to_vec(), if_revision: None, tag: Some(("run".into(), place)) };
        let expiring = |at: u64| Command::PutExpiring { store: "s".into(), key: "lease".into(), value: b"1".to_vec(), if_revision: None, expires_ms: at };
        d.apply(1, put("s", "cart", "\"old\"", None));
        // The first run: delete the cart, put a new one, put a lease that expires.
        assert_eq!(d.apply(2, tagged(0, delete("cart"))), CommandResult::Deleted { existed: true });
        assert_eq!(d.apply(3, put_tagged("cart", "\"new\"", 1)), CommandResult::Written { revision: 3 });
        assert_eq!(d.apply(4, tagged(2, expiring(1_000))), CommandResult::Written { revision: 4 });
        // The re-run, its writes made again in the same places.
        assert_eq!(d.apply(5, tagged(0, delete("cart"))), CommandResult::Deleted { existed: true }, "the first run's answer");
        assert_eq!(d.apply(6, put_tagged("cart", "\"new\"", 1)), CommandResult::Written { revision: 3 });
        assert_eq!(d.apply(7, tagged(2, expiring(9_000))), CommandResult::Written { revision: 4 });
        let cart = d.stores.get("s").and_then(|m| m.get("cart")).expect("the cart the first run wrote is there");
        assert_eq!((cart.value.as_slice(), cart.revision), (&b"\"new\""[..], 3));
        assert_eq!(d.expiries.of("s", "lease"), Some(1_000), "the first run's expiry stands");
        // Untagged, the same delete applies every time.
        assert_eq!(d.apply(8, delete("cart")), CommandResult::Deleted { existed: true });
        assert_eq!(d.apply(9, delete("cart")), CommandResult::Deleted { existed: false });
        // The digest follows the tagged writes as it follows plain ones.
        let mut plain = SmData::default();
        plain.apply(1, put("s", "cart", "\"old\"", None));
        plain.apply(2, delete("cart"));
        plain.apply(3, put("s", "cart", "\"new\"", None));
        plain.apply(4, expiring(1_000));
        plain.apply(8, delete("cart"));
        assert_eq!(plain.stores_digest, d.stores_digest);
        // Encoded and decoded as the log and the snapshots' peers do.
        let cmd = tagged(7, expiring(5));
        assert_eq!(bincode::deserialize::<Command>(&bincode::serialize(&cmd).unwrap()).unwrap(), cmd);
    }

    #[test]
    fn tagged_writes_apply_once() {
        let mut d = SmData::default();
        let incr = |tag: Option<(String, u32)>| Command::Increment { store: "s".into(), key: "c".into(), by: 1, tag };
        let begin = |attempt, now_ms| Command::IdemBegin { key: "k1".into(), attempt, now_ms, lease_ms: 1000, window_ms: 60_000 };
        assert_eq!(d.apply(1, begin(7, 100)), CommandResult::IdemBegun);
        assert_eq!(d.apply(2, incr(Some(("k1".into(), 0)))), CommandResult::Incremented { value: 1, revision: 2 });
        // The same write again (a re-run handler) gets the recorded result; the counter stays.
        assert_eq!(d.apply(3, incr(Some(("k1".into(), 0)))), CommandResult::Incremented { value: 1, revision: 2 });
        assert_eq!(d.apply(4, incr(None)), CommandResult::Incremented { value: 2, revision: 4 });
        // Another attempt waits while the lease holds, takes over after it.
        assert_eq!(d.apply(5, begin(8, 500)), CommandResult::IdemPending { until_ms: 1100 });
        assert_eq!(d.apply(6, begin(8, 1200)), CommandResult::IdemBegun);
        let resp = StoredResponse { status: 200, body: b"{}".to_vec(), content_type: None, headers: Vec::new() };
        let done = Command::IdemComplete { key: "k1".into(), attempt: 8, response: resp.clone() };
        assert_eq!(d.apply(7, done), CommandResult::IdemDone(resp.clone()));
        assert_eq!(d.apply(8, begin(9, 1300)), CommandResult::IdemDone(resp));
        // Past the window the key is forgotten.
        let later = Command::IdemBegin { key: "k2".into(), attempt: 1, now_ms: 100_000, lease_ms: 10, window_ms: 60_000 };
        d.apply(9, later);
        assert!(!d.idem.contains_key("k1"));
        assert!(d.idem.contains_key("k2"));
    }

    /// A claim whose lease holds is not forgotten past its window or its count bound by an
    /// `IdemTake`: a second request with its key waits, and its handler's retried writes still
    /// apply once. Once the lease lapses it goes like the others; the window then forgets what
    /// the bound asks. `IdemBegin` keeps the tick older builds apply.
    #[test]
    fn a_held_claim_outlives_its_window_and_the_count_bound() {
        let shared = empty_shared();
        let incr = |tag: Option<(String, u32)>| Command::Increment { store: "s".into(), key: "c".into(), by: 1, tag };
        let begin = |key: &str, attempt, now_ms, lease_ms| Command::IdemTake { key: key.into(), attempt, now_ms, lease_ms, window_ms: 60_000, fingerprint: None };
        let resp = StoredResponse { status: 200, body: b"{}".to_vec(), content_type: None, headers: Vec::new() };
        let mut d = shared.data.write().unwrap();
        assert_eq!(d.apply(1, begin("a", 1, 1_000, 100_000)), CommandResult::IdemBegun);
        let first = d.apply(2, incr(Some(("a".into(), 0))));
        for (i, key) in ["b", "c"].into_iter().enumerate() {
            let i = i as u64;
            assert_eq!(d.apply(3 + 2 * i, begin(key, 1, 2_000 + i, 1_000)), CommandResult::IdemBegun);
            d.apply(4 + 2 * i, Command::IdemComplete { key: key.into(), attempt: 1, response: resp.clone() });
        }
        drop(d);
        // Two keys at most: "a" is the oldest, but held, so "b" is what goes.
        let w = shared.idem_window(3_000, 60_000, 2, u64::MAX, true);
        assert_eq!(w, 999, "the horizon passes b (created at 2000), not c (2001)");
        let mut d = shared.data.write().unwrap();
        // What an older build applies: the held claim goes with its window.
        let mut older = d.clone();
        older.apply(7, Command::IdemBegin { key: "d".into(), attempt: 1, now_ms: 3_000, lease_ms: 1_000, window_ms: w });
        assert!(!older.idem.contains_key("a") && !older.idem.contains_key("b"), "{:?}", older.idem.keys().collect::<Vec<_>>());
        d.apply(7, Command::IdemTake { key: "d".into(), attempt: 1, now_ms: 3_000, lease_ms: 1_000, window_ms: w, fingerprint: None });
        assert!(d.idem.contains_key("a"), "held: {:?}", d.idem.keys().collect::<Vec<_>>());
        assert!(!d.idem.contains_key("b") && d.idem.contains_key("c"), "the oldest unheld went: {:?}", d.idem.keys().collect::<Vec<_>>());
        assert_eq!(d.apply(10, begin("a", 2, 3_002, 1_000)), CommandResult::IdemPending { until_ms: 101_000 });
        assert_eq!(d.apply(11, incr(Some(("a".into(), 0)))), first, "the retried write applies once");
        // Past its window, still held.
        d.apply(12, begin("g", 1, 90_000, 1_000));
        assert!(d.idem.contains_key("a") && !d.idem.contains_key("d"), "{:?}", d.idem.keys().collect::<Vec<_>>());
        // Its lease lapsed: the next pass over it forgets it.
        d.apply(13, begin("h", 1, 200_000, 1_000));
        assert!(!d.idem.contains_key("a"), "{:?}", d.idem.keys().collect::<Vec<_>>());
        let recount: u64 = d.idem.iter().map(|(k, r)| idem_weight(k, r)).sum();
        assert_eq!(d.idem_bytes, recount);
        // `IdemTake` judges fingerprints as `IdemClaim` does.
        assert_eq!(d.apply(14, Command::IdemTake { key: "p".into(), attempt: 1, now_ms: 200_001, lease_ms: 1_000, window_ms: 60_000, fingerprint: Some(1) }), CommandResult::IdemBegun);
        assert_eq!(d.apply(15, Command::IdemTake { key: "p".into(), attempt: 2, now_ms: 200_002, lease_ms: 1_000, window_ms: 60_000, fingerprint: Some(2) }), CommandResult::IdemMismatch);
    }

    /// Many claims held at once: one tick moves at most `REQUEUE_PER_TICK` of them to the back
    /// (an apply's work stays bounded), and records behind them are still forgotten in time.
    #[test]
    fn a_tick_moves_a_bounded_number_of_held_claims() {
        let mut d = SmData::default();
        let take = |key: String, now_ms, lease_ms| Command::IdemTake { key, attempt: 1, now_ms, lease_ms, window_ms: 1_000, fingerprint: None };
        for i in 0..200u64 {
            d.apply(i + 1, take(format!("held{i}"), 1_000, 1_000_000));
        }
        // "old" sits behind 200 held claims: the first tick moves 64 of them and stops.
        let mut order: Vec<(u64, String)> = vec![(0, "old".into())];
        order.splice(0..0, d.idem_order.iter().cloned());
        let mut d2 = d.clone();
        d2.idem_order = order.into_iter().collect();
        d2.apply(300, take("tick".into(), 5_000, 0));
        assert!(d2.idem.contains_key("held0"));
        let moved = d2.idem_order.iter().rev().skip(1).take_while(|(_, k)| k.starts_with("held")).count();
        assert!(moved <= 64, "{moved} moved in one tick");
        d.apply(300, take("old".into(), 1_001, 0));
        for i in 0..5u64 {
            d.apply(301 + i, take(format!("tick{i}"), 5_000 + i, 0));
        }
        assert!(!d.idem.contains_key("old"), "forgotten once the ticks passed the held ones");
        assert_eq!(d.idem.keys().filter(|k| k.starts_with("held")).count(), 200, "the held ones stay");
    }

    /// `ExpireDue` removes each named key whose expiry has passed by the entry's clock, whatever
    /// its revision: a key incremented after the leader named it goes (with `Expire` it was
    /// kept, and named again at every look while increments kept coming), one put again without
    /// a TTL or with a later one stays, and so does one not due yet. The batch of names fits
    /// the bytes it is given (at least one key), so an entry is never over a small frame.
    #[test]
    fn expire_due_removes_by_expiry_so_an_incremented_key_goes() {
        let expiring = |key: &str, at: u64| Command::PutExpiring { store: "s".into(), key: key.into(), value: b"1".to_vec(), if_revision: None, expires_ms: at };
        let mut d = SmData::default();
        d.apply(1, expiring("hot", 1_000));
        d.apply(2, expiring("again", 1_000));
        d.apply(3, expiring("later", 1_000));
        d.apply(4, expiring("early", 1_000));
        d.apply(5, expiring("not-yet", 5_000));
        // The leader names what is due by its clock, then these land before its entry.
        let named: Vec<(String, String)> = d.expiries.due(1_500, EXPIRE_BYTES);
        assert_eq!(named.len(), 4);
        let mut stale = Command::Expire { keys: named.iter().map(|(s, k)| (s.clone(), k.clone(), d.stores[s][k].revision)).collect() };
        d.apply(6, Command::Increment { store: "s".into(), key: "hot".into(), by: 1, tag: None });
        d.apply(7, put("s", "again", "2", None));
        d.apply(8, expiring("later", 9_000));
        let mut by_revision = d.clone();
        by_revision.apply(9, std::mem::replace(&mut stale, Command::Expire { keys: Vec::new() }));
        assert!(by_revision.stores["s"].contains_key("hot"), "by revision, the incremented key outran its removal");
        let mut named_all = named;
        named_all.push(("s".into(), "not-yet".into()));
        d.apply(9, Command::ExpireDue { keys: named_all, now_ms: 1_500 });
        let left: Vec<&String> = d.stores["s"].keys().collect();
        assert_eq!(left, vec!["again", "later", "not-yet"], "hot and early went; the rewritten and the not yet due stayed");
        assert_eq!((d.expiries.of("s", "hot"), d.expiries.of("s", "later"), d.expiries.len()), (None, Some(9_000), 2));

        // Names of at most about `max_bytes`: with long keys, fewer of them, never none.
        let long = "k".repeat(1_000);
        let mut d = SmData::default();
        for i in 0..10u64 {
            d.apply(10 + i, expiring(&format!("{long}{i}"), 1_000 + i));
        }
        assert_eq!(d.expiries.due(2_000, 3_000).len(), 2);
        assert_eq!(d.expiries.due(2_000, 10).len(), 1, "at least one");
        assert_eq!(d.expiries.due(2_000, EXPIRE_BYTES).len(), 10);
    }

    /// Keys put with an expiry (`PutExpiring`) are removed by the `Expire` that names them with
    /// their revision (the leader's due keys, the earliest first, at most `EXPIRE_BATCH`); a key
    /// put again since is kept; a node whose copy of the expiries lacks them (an older build's
    /// snapshot) removes the same keys; a plain put or a delete ends an expiry, an increment
    /// keeps it, a failed precondition neither sets nor ends one; the digest and the quota
    /// counts follow; snapshots carry the expiries in their extension's third part, which an
    /// older build's extension (two parts) lacks.
    #[test]
    fn keys_expire_in_order_and_snapshots_keep_their_expiries() {
        let expiring = |key: &str, at: u64, if_revision: Option<u64>| Command::PutExpiring { store: "s".into(), key: key.into(), value: b"1".to_vec(), if_revision, expires_ms: at };
        // What the leader proposes at `now` (`store::expire_keys`).
        let expire = |d: &SmData, now: u64| Command::Expire {
            keys: d.expiries.due(now, EXPIRE_BYTES).into_iter().map(|(s, k)| { let r = d.stores[&s][&k].revision; (s, k, r) }).collect(),
        };
        let mut d = SmData::default();
        assert_eq!(d.apply(1, expiring("a", 1_000, None)), CommandResult::Written { revision: 1 });
        d.apply(2, expiring("b", 2_000, None));
        d.apply(3, expiring("c", 3_000, None));
        d.apply(4, put("s", "keep", "1", None));
        assert_eq!(d.apply(5, expiring("keep", 1_500, Some(99))), CommandResult::PreconditionFailed { current: Some(4) });
        assert_eq!(d.expiries.of("s", "keep"), None, "a failed precondition sets no expiry");
        assert_eq!(d.apply(6, put("s", "b", "2", Some(99))), CommandResult::PreconditionFailed { current: Some(2) });
        assert_eq!(d.expiries.of("s", "b"), Some(2_000), "nor ends one");
        d.apply(7, expiring("plain", 1_000, None));
        d.apply(8, put("s", "plain", "2", None));
        d.apply(9, expiring("gone", 1_000, None));
        d.apply(10, Command::Delete { store: "s".into(), key: "gone".into(), if_revision: None });
        d.apply(11, Command::Increment { store: "s".into(), key: "c".into(), by: 2, tag: None });
        assert_eq!((d.expiries.len(), d.expiries.next(), d.expiries.of("s", "c")), (3, Some(1_000), Some(3_000)), "plain put and delete end theirs; an increment keeps it");

        // Snapshots keep them; an older build's extension (no third part) reads with none.
        let mut image = bincode::serialize(&d).expect("encodes");
        let plain_len = image.len();
        append_ext(&mut image, &d).expect("extension");
        let back = decode_data(&image).expect("decodes");
        assert_eq!((back.expiries.len(), back.expiries.of("s", "b")), (3, Some(2_000)));
        let ext = &image[plain_len..image.len() - EXT_TRAILER];
        let first: SmExt = bincode::deserialize(ext).expect("the first part");
        let used = bincode::serialized_size(&first).unwrap() as usize;
        let more: SmExtMore = bincode::deserialize(&ext[used..]).expect("an older build decodes the second part");
        let mut old_image = bincode::serialize(&d).expect("encodes");
        let mut old_ext = bincode::serialize(&first).unwrap();
        old_ext.extend(bincode::serialize(&more).unwrap());
        let crc = crc32fast::hash(&old_ext);
        old_image.extend_from_slice(&old_ext);
        old_image.extend_from_slice(&(old_ext.len() as u32).to_le_bytes());
        old_image.extend_from_slice(&crc.to_le_bytes());
        old_image.extend_from_slice(&EXT_MAGIC);
        let mut without = decode_data(&old_image).expect("an older build's image decodes");
        assert!(without.expiries.is_empty());

        let (digest, keys) = (d.stores_digest, d.stores_keys);
        assert!(d.expiries.due(999, EXPIRE_BYTES).is_empty(), "nothing is due before its time");
        let named = expire(&d, 2_000);
        assert_eq!(named, Command::Expire { keys: vec![("s".into(), "a".into(), 1), ("s".into(), "b".into(), 2)] });
        // `a` is put again (with a new expiry) after the leader named it: kept.
        d.apply(12, expiring("a", 9_000, None));
        without.apply(12, expiring("a", 9_000, None));
        d.apply(13, named.clone());
        without.apply(13, named);
        let left: Vec<&String> = d.stores["s"].keys().collect();
        assert_eq!(left, vec!["a", "c", "keep", "plain"], "b expired; a was put again");
        assert_eq!(d.stores_digest, without.stores_digest, "a node without the expiries removes the same keys");
        assert_eq!(d.stores["s"].keys().collect::<Vec<_>>(), without.stores["s"].keys().collect::<Vec<_>>());
        assert_eq!((d.expiries.len(), d.expiries.next()), (2, Some(3_000)));
        assert_ne!(d.stores_digest, digest);
        assert_eq!(d.stores_keys, keys - 1);
        // At most `EXPIRE_BATCH` an entry, the earliest first.
        for i in 0..(EXPIRE_BATCH as u64 + 5) {
            d.apply(100 + i, expiring(&format!("m{i:05}"), 10_000 + i, None));
        }
        let batch = expire(&d, 1_000_000);
        d.apply(5_000, batch);
        assert_eq!(d.expiries.len(), 7, "one batch: c, a and the earliest of the others went");
        assert_eq!(d.expiries.next(), Some(10_000 + EXPIRE_BATCH as u64 - 2));
        let batch = expire(&d, 1_000_000);
        d.apply(5_001, batch);
        assert!(d.expiries.is_empty());
        assert_eq!(d.stores["s"].keys().collect::<Vec<_>>(), vec!["keep", "plain"]);
    }

    /// An answer completed with its headers (`IdemCompleteWith`) replays them, also from a
    /// snapshot, whose extension carries them after the fingerprints where an older build reads
    /// the fingerprints alone; `IdemComplete` stores none, whatever its response held in memory
    /// (the leader applies the entry it proposed, the others what they decoded).
    #[test]
    fn an_answers_headers_are_kept_with_it_and_in_snapshots() {
        let mut d = SmData::default();
        let claim = |key: &str, attempt| Command::IdemClaim { key: key.into(), attempt, now_ms: 100, lease_ms: 1000, window_ms: 60_000, fingerprint: 1 };
        let headers: crate::sdk::HeaderList = vec![("location".into(), b"/orders/9".to_vec()), ("set-cookie".into(), b"a=1".to_vec())];
        let resp = StoredResponse { status: 201, body: b"{}".to_vec(), content_type: Some("application/json".into()), headers: Vec::new() };
        d.apply(1, claim("with", 7));
        let before = d.idem_bytes;
        let done = d.apply(2, Command::IdemCompleteWith { key: "with".into(), attempt: 7, response: resp.clone(), headers: headers.clone() });
        let with = StoredResponse { headers: headers.clone(), ..resp.clone() };
        assert_eq!(done, CommandResult::IdemDone(with.clone()));
        assert_eq!(d.idem_bytes - before, (2 + crate::proxy::headers::size(&headers) + "application/json".len()) as u64);
        assert_eq!(d.apply(3, claim("with", 8)), CommandResult::IdemDone(with.clone()), "replayed with its headers");
        d.apply(4, claim("plain", 9));
        let in_memory = StoredResponse { headers: headers.clone(), ..resp.clone() };
        assert_eq!(d.apply(5, Command::IdemComplete { key: "plain".into(), attempt: 9, response: in_memory }), CommandResult::IdemDone(resp.clone()));
        // The encoding of a stored answer is the older one: no headers in it.
        let encoded: StoredResponse = bincode::deserialize(&bincode::serialize(&with).unwrap()).unwrap();
        assert_eq!(encoded, resp);
        assert!(encoded.same_answer(&with));

        let mut image = bincode::serialize(&d).expect("encodes");
        let plain_len = image.len();
        append_ext(&mut image, &d).expect("extension");
        let back = decode_data(&image).expect("decodes");
        assert!(matches!(&back.idem["with"].state, IdemState::Done(r) if *r == with));
        assert!(matches!(&back.idem["plain"].state, IdemState::Done(r) if *r == resp));
        assert_eq!(back.idem_bytes, d.idem_bytes);
        // What an older build reads of the extension: the fingerprints, the rest left alone.
        let ext = &image[plain_len..image.len() - EXT_TRAILER];
        let older: SmExt = bincode::deserialize(ext).expect("an older build decodes the extension");
        assert_eq!(older.idem_prints.len(), 2);
        assert!(older.more.idem_headers.is_empty());
        // And an older build's extension (the fingerprints alone) reads here with no headers.
        let mut old_image = bincode::serialize(&d).expect("encodes");
        let old_ext = bincode::serialize(&SmExt { idem_prints: vec![("with".into(), 1)], more: SmExtMore::default() }).unwrap();
        let crc = crc32fast::hash(&old_ext);
        old_image.extend_from_slice(&old_ext);
        old_image.extend_from_slice(&(old_ext.len() as u32).to_le_bytes());
        old_image.extend_from_slice(&crc.to_le_bytes());
        old_image.extend_from_slice(&EXT_MAGIC);
        let back = decode_data(&old_image).expect("an older build's image decodes");
        assert_eq!(back.idem["with"].fingerprint, Some(1));
        assert!(matches!(&back.idem["with"].state, IdemState::Done(r) if r.headers.is_empty()));
    }

    /// The first put that names the cluster stands and a later one changes nothing; the id is
    /// a store entry, so the snapshot image carries it and an older build, which decodes the
    /// image and passes over the extension, keeps it; a restore renames the cluster in place.
    #[test]
    fn the_first_cluster_name_stands_and_snapshots_carry_it() {
        let mut d = SmData::default();
        assert_eq!(d.cluster_id(), None);
        assert_eq!(d.apply(1, name_cluster(0xabc)), CommandResult::Written { revision: 1 });
        assert_eq!(d.apply(2, name_cluster(0xdef)), CommandResult::PreconditionFailed { current: Some(1) });
        assert_eq!(d.cluster_id(), Some(0xabc), "the first applied stands");
        assert_eq!((d.stores_keys, d.stores_bytes), (0, 0), "outside the store's quota");
        let mut image = bincode::serialize(&d).expect("encodes");
        append_ext(&mut image, &d).expect("extension");
        let decoded = decode_data(&image).expect("decodes");
        assert_eq!((decoded.cluster_id(), decoded.stores_keys), (Some(0xabc), 0));
        let older: SmData = bincode::deserialize(&image).expect("an older build decodes the image");
        assert_eq!(older.cluster_id(), Some(0xabc), "an older build keeps it");
        use openraft::vote::RaftLeaderIdExt;
        d.last_applied = Some(LogId::new(<TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(3, 1), 9));
        d.rename_cluster(0x123);
        assert_eq!(d.cluster_id(), Some(0x123));
        assert_eq!(d.stores[CLUSTER_STORE][CLUSTER_ID_KEY].revision, 9);
        assert_eq!(parse_cluster_id(b"\"abc\""), None, "32 digits or none");
    }

    /// The members' features, recorded by a put of the reserved key under a revision
    /// precondition (a second leader's stale record is refused), read back, outside the quota,
    /// kept by an older build's decode of the image, and shared with the peer network once
    /// applied or installed.
    #[tokio::test]
    async fn the_members_features_are_recorded_in_the_state() {
        let mut d = SmData::default();
        assert_eq!(d.member_features(), MemberFeatures::default());
        let first: BTreeMap<NodeId, u64> = [(1, 4095), (2, 4095), (3, 2047)].into();
        assert_eq!(d.apply(1, record_features(&first, 0)), CommandResult::Written { revision: 1 });
        assert_eq!(d.member_features(), MemberFeatures { revision: 1, by_node: first.clone() });
        let upgraded: BTreeMap<NodeId, u64> = [(1, 4095), (2, 4095), (3, 4095)].into();
        assert_eq!(d.apply(2, record_features(&upgraded, 0)), CommandResult::PreconditionFailed { current: Some(1) }, "made from a stale read");
        assert_eq!(d.apply(3, record_features(&upgraded, 1)), CommandResult::Written { revision: 3 });
        assert_eq!(d.member_features().by_node, upgraded);
        assert_eq!((d.stores_keys, d.stores_bytes), (0, 0), "outside the store's quota");
        let mut image = bincode::serialize(&d).expect("encodes");
        append_ext(&mut image, &d).expect("extension");
        assert_eq!(decode_data(&image).expect("decodes").member_features(), d.member_features());
        let older: SmData = bincode::deserialize(&image).expect("an older build decodes the image");
        assert_eq!(older.member_features().by_node, upgraded, "an older build keeps it");
        assert_eq!(parse_features(b"{\"1\":5,\"x\":6,\"2\":\"7\"}"), [(1, 5)].into(), "entries that do not read are left out");
        assert!(parse_features(b"[1]").is_empty());
        let mut restored = d.clone();
        restored.rename_cluster(0xfeed);
        assert_eq!(restored.member_features(), MemberFeatures::default(), "a restored cluster records its own");

        // The shared copy follows the applies that move the record, and only those.
        let dir = std::env::temp_dir().join(format!("rb-sm-{}", fastrand::u64(..)));
        let mut sm = StateMachine::open(&dir).unwrap();
        let shared = sm.shared.recorded_features();
        use openraft::vote::RaftLeaderIdExt;
        let entry = |index: u64, command| Entry {
            log_id: LogId::new(<TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(1, 1), index),
            payload: openraft::EntryPayload::Normal(command),
        };
        let entries = [put("s", "k", "1", None), record_features(&first, 0), put("s", "k", "2", None)];
        let entries: Vec<_> = entries.into_iter().zip(1..).map(|(c, i)| Ok((entry(i, c), None))).collect();
        sm.apply(futures_util::stream::iter(entries)).await.expect("applies");
        assert_eq!(*shared.read().unwrap(), MemberFeatures { revision: 2, by_node: first.clone() });
        let reopened = StateMachine::open(&dir).unwrap();
        assert_eq!(*reopened.shared.recorded_features().read().unwrap(), MemberFeatures::default(), "no snapshot yet: known once replayed");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A key first claimed with one fingerprint answers a claim with another `IdemMismatch`,
    /// pending or done, and changes nothing; the same one waits or replays as before. A record
    /// made without one (an older build's `IdemBegin`) is never judged. Snapshots keep the
    /// fingerprints in their extension, which a plain decode (an older build's) passes over.
    #[test]
    fn a_claim_with_another_fingerprint_is_a_mismatch_and_snapshots_keep_them() {
        let mut d = SmData::default();
        let claim = |key: &str, attempt, now_ms, fingerprint| Command::IdemClaim {
            key: key.into(), attempt, now_ms, lease_ms: 1000, window_ms: 60_000, fingerprint,
        };
        assert_eq!(d.apply(1, claim("k", 7, 100, 0xaa)), CommandResult::IdemBegun);
        assert_eq!(d.apply(2, claim("k", 8, 200, 0xbb)), CommandResult::IdemMismatch, "pending, other request");
        assert_eq!(d.apply(3, claim("k", 8, 5_000, 0xbb)), CommandResult::IdemMismatch, "lapsed lease, still not its key");
        assert_eq!(d.apply(4, claim("k", 8, 300, 0xaa)), CommandResult::IdemPending { until_ms: 1100 });
        let resp = StoredResponse { status: 201, body: b"{\"id\":1}".to_vec(), content_type: None, headers: Vec::new() };
        d.apply(5, Command::IdemComplete { key: "k".into(), attempt: 7, response: resp.clone() });
        assert_eq!(d.apply(6, claim("k", 9, 400, 0xaa)), CommandResult::IdemDone(resp.clone()));
        assert_eq!(d.apply(7, claim("k", 9, 400, 0xcc)), CommandResult::IdemMismatch);
        // A renewal or an older build's claim names none and is not judged.
        let begin = Command::IdemBegin { key: "k".into(), attempt: 9, now_ms: 400, lease_ms: 1000, window_ms: 60_000 };
        assert_eq!(d.apply(8, begin), CommandResult::IdemDone(resp.clone()));
        let old = Command::IdemBegin { key: "o".into(), attempt: 1, now_ms: 400, lease_ms: 1000, window_ms: 60_000 };
        assert_eq!(d.apply(9, old), CommandResult::IdemBegun);
        assert_eq!(d.apply(10, claim("o", 1, 450, 0xdd)), CommandResult::IdemBegun, "no fingerprint to judge by");
        assert_eq!(d.idem["o"].fingerprint, None, "nor does a later claim give it one");

        // The image with its extension: fingerprints come back, and the image part alone decodes
        // as before (what an older build reads).
        let mut image = bincode::serialize(&d).expect("encodes");
        let plain_len = image.len();
        append_ext(&mut image, &d).expect("extension");
        let back = decode_data(&image).expect("decodes");
        assert_eq!(back.idem["k"].fingerprint, Some(0xaa));
        assert_eq!(back.idem["o"].fingerprint, None);
        let older: SmData = bincode::deserialize(&image).expect("an older build decodes it");
        assert_eq!(older.idem.len(), 2);
        assert_eq!(decode_data(&image[..plain_len]).expect("an image without one").idem["k"].fingerprint, None);
        // A trailer whose checksum does not match is damage: refused.
        let last = image.len() - 9;
        image[last - 8] ^= 0xff;
        assert!(read_ext(&image).is_err());
        assert!(decode_data(&image).is_err());
        // After the window the record and its fingerprint go together.
        d.apply(11, claim("z", 1, 100_000, 0x11));
        assert!(!d.idem.contains_key("k"));
    }

    /// A handler re-run (its first run's node died before the result was recorded) that draws
    /// another random id stores another key in the same place: that write is applied, not
    /// answered with the first run's result; a write the re-run repeats is answered from the
    /// record (tags as the SDK makes them, `sdk::next_tag`).
    #[test]
    fn a_rerun_that_writes_another_key_is_applied_and_a_repeated_write_is_not() {
        use std::sync::atomic::AtomicU32;
        let mut d = SmData::default();
        let run = || ("k1".to_string(), Arc::new(AtomicU32::new(0)));
        let put_value = |run: &(String, Arc<AtomicU32>), key: &str, value: &str| {
            let tag = crate::sdk::next_tag(Some(run), &[b"put", b"s", key.as_bytes()]).unwrap();
            Command::Put { store: "s".into(), key: key.into(), value: value.as_bytes().to_vec(), if_revision: None, tag }
        };
        let put = |run: &(String, Arc<AtomicU32>), key: &str| put_value(run, key, "1");
        let incr = |run: &(String, Arc<AtomicU32>)| {
            let tag = crate::sdk::next_tag(Some(run), &[b"increment", b"s", b"n"]).unwrap();
            Command::Increment { store: "s".into(), key: "n".into(), by: 1, tag }
        };
        let (first, second) = (run(), run());
        assert_eq!(d.apply(1, put(&first, "orders/a")), CommandResult::Written { revision: 1 });
        assert_eq!(d.apply(2, incr(&first)), CommandResult::Incremented { value: 1, revision: 2 });
        assert_eq!(d.apply(3, put(&second, "orders/b")), CommandResult::Written { revision: 3 }, "another key: applied");
        assert_eq!(d.apply(4, incr(&second)), CommandResult::Incremented { value: 1, revision: 2 }, "the same increment: once");
        assert!(d.stores["s"].contains_key("orders/a") && d.stores["s"].contains_key("orders/b"));
        // Read, then write the same key again (`v = get(k); put(k, v + 1)`): the re-run read
        // what the first run wrote, and its write of the same key in the same place is the
        // same write, whatever its value: applied once.
        let (first, second) = (run(), run());
        assert_eq!(d.apply(5, put_value(&first, "v", "6")), CommandResult::Written { revision: 5 });
        assert_eq!(d.apply(6, put_value(&second, "v", "7")), CommandResult::Written { revision: 5 }, "answered from the record");
        assert_eq!(d.stores["s"]["v"].value, b"6".to_vec());
        // A run past the bound on tagged writes is refused, not wrapped onto an earlier place.
        let first = run();
        first.1.store(crate::sdk::MAX_TAGGED_WRITES, std::sync::atomic::Ordering::SeqCst);
        assert!(crate::sdk::next_tag(Some(&first), &[b"x"]).is_err());
    }

    #[test]
    fn progress_in_an_event_entry_applies_like_its_own_entry_then_the_events() {
        let (limits, service) = (LIMITS, one_subscription("sub"));
        let ack = |position| SubUpdate::Ack { sub: "sub".into(), position };
        // Two nodes apply the same progress, one as its own entry and one inside an event entry.
        let (mut apart, mut merged) = (SmData::default(), SmData::default());
        for d in [&mut apart, &mut merged] {
            d.apply(1, Command::Register { node: 1, services: vec![service.clone()] });
            assert!(matches!(d.apply(2, Command::Publish { now_ms: 10, events: events(3), limits }), CommandResult::Published(ids) if ids.len() == 3));
        }
        let first = apart.subs["sub"].cursor;
        assert_eq!(apart.apply(3, Command::SubUpdate { updates: vec![ack(first), ack(first + 1)] }), CommandResult::SubUpdated);
        let published = apart.apply(4, Command::Publish { now_ms: 20, events: events(2), limits });
        let both = Command::PublishAndSettle { now_ms: 20, events: events(2), limits, updates: Arc::new(vec![ack(first), ack(first + 1)]) };
        let CommandResult::Published(ids) = merged.apply(3, both) else { panic!("the events' ids and positions") };
        let CommandResult::Published(apart_ids) = published else { panic!("published") };
        assert_eq!(ids.iter().map(|(_, p)| p).collect::<Vec<_>>(), apart_ids.iter().map(|(_, p)| p).collect::<Vec<_>>());
        assert_eq!(merged.subs["sub"].cursor, first + 2, "the two acks moved the cursor");
        assert_eq!(merged.subs["sub"].cursor, apart.subs["sub"].cursor);
        assert_eq!(merged.log.next, apart.log.next);
    }

    /// A build that turns a subscription from every-instance to shared, or back, carries its
    /// progress (`registry::carried_progress`): the new way starts where the nodes had come, not
    /// at the oldest retained event (every retained event delivered again).
    #[test]
    fn a_subscription_turned_shared_or_every_instance_keeps_its_progress() {
        use crate::proxy::registry::carried_progress;
        use crate::proxy::registry::SubProgress;
        let shared = one_subscription("sub");
        let mut every = shared.clone();
        every.subscriptions[0].shared = false;
        let members = crate::raft::types::Membership::new_with_defaults(vec![[1, 2, 3].into()], []);
        let mut d = SmData { last_membership: StoredMembershipT::new(None, members), ..SmData::default() };
        d.apply(1, Command::Register { node: 1, services: vec![every.clone()] });
        d.apply(2, Command::Register { node: 2, services: vec![every.clone()] });
        d.apply(3, Command::Publish { now_ms: 10, events: events(10), limits: LIMITS });
        let first = d.log.first();
        let instance = |node, next: u64| SubUpdate::Instance { sub: "sub".into(), node, position: next - 1, dead: None };
        d.apply(4, Command::SubUpdate { updates: vec![instance(1, first + 7), instance(2, first + 4), instance(3, first + 1)] });
        let progress = |d: &SmData| {
            let s = d.subs["sub"].clone();
            let declared_by = d.declared_by("sub");
            move |name: &str| (name == "sub").then(|| SubProgress { shared: s.decl.shared, cursor: s.cursor, instances: s.instances.clone(), declared_by: declared_by.clone() })
        };
        // Node 1's build makes it shared: the cursor moves to the least position of the nodes
        // declaring it (node 3, a member that declares nothing, does not hold it back).
        let carried = carried_progress(progress(&d), 1, &[1, 2, 3], std::slice::from_ref(&shared));
        assert_eq!(carried, vec![SubUpdate::Rebase { sub: "sub".into(), position: first + 4 }]);
        let mut without = d.clone();
        d.apply(5, Command::SubUpdate { updates: carried });
        for x in [&mut d, &mut without] {
            x.apply(6, Command::Register { node: 1, services: vec![shared.clone()] });
        }
        assert_eq!(without.subs["sub"].cursor, first, "without the carry: every retained event again");
        assert_eq!(d.subs["sub"].cursor, first + 4, "where the slowest instance had come");
        // Node 2, on the old build still, or on the new one: nothing more to carry.
        assert!(carried_progress(progress(&d), 2, &[1, 2, 3], std::slice::from_ref(&shared)).is_empty());
        assert!(carried_progress(progress(&d), 2, &[1, 2, 3], std::slice::from_ref(&every)).iter().all(|u| matches!(u, SubUpdate::Instance { .. })));
        // The shared subscription settles more, and a build makes it every-instance again:
        // each node that declares it or was an instance before goes on from the shared cursor.
        d.apply(7, Command::SubUpdate { updates: vec![SubUpdate::Ack { sub: "sub".into(), position: first + 4 }] });
        let cursor = d.subs["sub"].cursor;
        assert_eq!(cursor, first + 5);
        let carried = carried_progress(progress(&d), 2, &[1, 2, 3, 4], std::slice::from_ref(&every));
        assert_eq!(carried, vec![instance(2, cursor), instance(3, cursor)], "node 1 stood ahead of the cursor already; node 4 never was an instance (a new one starts at the oldest event)");
        let mut without = d.clone();
        d.apply(8, Command::SubUpdate { updates: carried });
        for x in [&mut d, &mut without] {
            x.apply(9, Command::Register { node: 2, services: vec![every.clone()] });
            x.apply(10, Command::Register { node: 3, services: vec![every.clone()] });
        }
        assert_eq!(without.subs["sub"].instances[&3], first + 1, "without the carry: from where node 3 stood long ago");
        for node in [2, 3] {
            assert_eq!(d.subs["sub"].instances[&node], cursor, "node {node} goes on from the shared cursor");
        }
        assert_eq!(d.subs["sub"].instances[&1], first + 7);
        assert!(carried_progress(progress(&d), 1, &[1, 2, 3], std::slice::from_ref(&every)).is_empty(), "nothing changed");
        // A rebase never moves a cursor back, nor past the log.
        d.apply(11, Command::SubUpdate { updates: vec![SubUpdate::Rebase { sub: "sub".into(), position: first }] });
        assert_eq!(d.subs["sub"].cursor, cursor);
        d.apply(12, Command::SubUpdate { updates: vec![SubUpdate::Rebase { sub: "sub".into(), position: u64::MAX }] });
        assert_eq!(d.subs["sub"].cursor, d.log.next);
    }

    #[test]
    fn pending_leaves_out_skipped_and_done_positions_and_stops_at_the_limit() {
        let (limits, service, events) = (LIMITS, one_subscription("sub"), events(6));
        let sm = registered_and_published(1, service, events, limits);
        // Applying does not move the watch: `events_moved` below does, as `apply` would.
        let appended = sm.watch_events();
        let first = read(&sm.data).subs["sub"].cursor;
        write(&sm.data).apply(3, Command::SubUpdate { updates: vec![SubUpdate::Ack { sub: "sub".into(), position: first + 2 }] });
        let mut backlog = Backlog::default();
        let got: Vec<u64> = sm.pending("sub", 3, &mut backlog, |p| p == first + 1).iter().map(|(e, _)| e.position).collect();
        assert_eq!(got, vec![first, first + 3, first + 4], "skipped and acked positions are left out, in log order");
        sm.events_moved(read(&sm.data).log.next);
        assert!(appended.has_changed().unwrap(), "appending events wakes the delivery loops");
    }

    /// What `pending` returned before it kept a `Backlog`: every retained position from the
    /// cursor on, looked at on every call.
    fn pending_by_walking(d: &SmData, sub: &str, limit: usize, skip: impl Fn(u64) -> bool) -> Vec<u64> {
        let s = &d.subs[sub];
        let first = d.log.first();
        d.log
            .events
            .iter()
            .skip((s.cursor.max(first) - first) as usize)
            .filter(|e| !skip(e.position) && !s.done.contains(&e.position) && s.decl.filter.matches(e))
            .take(limit)
            .map(|e| e.position)
            .collect()
    }

    /// A service with one shared subscription to events named `e` only.
    fn subscription_to_e(name: &str) -> crate::sdk::ServiceDecl {
        let mut service = one_subscription(name);
        service.subscriptions[0].filter.event_name = Some("e".into());
        service
    }

    #[test]
    fn a_subscription_is_dropped_only_once_no_registered_node_declares_it() {
        let sm = registered_and_published(1, one_subscription("sub"), events(3), LIMITS);
        let mut d = write(&sm.data);
        let members = crate::raft::types::Membership::new_with_defaults(vec![[1, 2].into()], []);
        d.last_membership = StoredMembershipT::new(None, members);
        d.apply(3, Command::Register { node: 2, services: vec![one_subscription("sub")] });
        // Node 3 is no member (removed, say): its stale registration does not hold the drop up.
        d.apply(3, Command::Register { node: 3, services: vec![one_subscription("sub")] });
        d.apply(4, Command::SubUpdate { updates: vec![SubUpdate::Ack { sub: "sub".into(), position: 1 }] });
        let drop_sub = |d: &mut SmData, index| d.apply(index, Command::DropSubscription { name: "sub".into() });
        assert_eq!(drop_sub(&mut d, 5), CommandResult::SubscriptionDropped { existed: true, declared_by: vec![1, 2] });
        assert_eq!(d.subs["sub"].cursor, 2, "a refused drop leaves the progress alone");
        // Node 1 stops declaring it (a graceful stop registers nothing); node 2's service is
        // unavailable, which still counts: its next registration would bring it back.
        d.apply(6, Command::Register { node: 1, services: Vec::new() });
        let mut unavailable = one_subscription("sub");
        unavailable.available = false;
        d.apply(7, Command::Register { node: 2, services: vec![unavailable] });
        assert_eq!(drop_sub(&mut d, 8), CommandResult::SubscriptionDropped { existed: true, declared_by: vec![2] });
        d.apply(9, Command::Register { node: 2, services: vec![one_subscription("other")] });
        assert_eq!(drop_sub(&mut d, 10), CommandResult::SubscriptionDropped { existed: true, declared_by: vec![] });
        assert!(!d.subs.contains_key("sub"), "dropped with its progress");
        assert!(d.subs.contains_key("other"), "other subscriptions stay");
        assert_eq!(drop_sub(&mut d, 11), CommandResult::SubscriptionDropped { existed: false, declared_by: vec![] });
        // Declared again: a new subscription, from the oldest retained event as a durable one
        // starts (the old acks are gone with it).
        d.apply(12, Command::Register { node: 1, services: vec![one_subscription("sub")] });
        assert_eq!(d.subs["sub"].cursor, 1);
        drop(d);
        let summary = sm.subscription_summary("sub").expect("declared again");
        assert_eq!(summary.declared_by, vec![1]);
        let names: Vec<String> = sm.subscription_summaries().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["other", "sub"]);
    }

    /// Events past their age and dedup keys past their window go with an empty publish, which
    /// the leader proposes while nothing else is published.
    #[test]
    fn an_empty_publish_applies_retention_by_age_and_the_dedup_window() {
        let limits = EventLimits { max_events: 100, max_bytes: 1 << 20, max_age_ms: 60_000, dedup_window_ms: 10_000 };
        let sm = empty_shared();
        let meta = crate::sdk::MessageMeta::default();
        // The event's timestamp is its publisher's clock, the key's stamp the state machine's.
        let keyed = Arc::new(vec![crate::broker::new_event("e", b"1".to_vec(), &meta, None, Some("k".into()))]);
        let t = crate::broker::now_ms();
        write(&sm.data).apply(1, Command::Publish { now_ms: t, events: keyed, limits });
        let front = read(&sm.data).log.events.front().map(|e| e.timestamp).expect("one event");
        assert!(front <= t);
        assert!(!sm.events_expiry_due(t, limits.max_age_ms, limits.dedup_window_ms), "nothing due yet");
        assert!(sm.events_expiry_due(t + 10_001, u64::MAX, limits.dedup_window_ms), "the key is past its window");
        assert!(sm.events_expiry_due(front + 60_001, limits.max_age_ms, u64::MAX), "the event is past its age");
        let now = t + 60_001;
        {
            let mut d = write(&sm.data);
            assert_eq!(d.apply(2, Command::Publish { now_ms: now, events: Arc::new(Vec::new()), limits }), CommandResult::Published(Vec::new()));
            assert!(d.log.events.is_empty() && d.log.keys.is_empty() && d.log.key_order.is_empty());
        }
        assert!(!sm.events_expiry_due(now, limits.max_age_ms, limits.dedup_window_ms), "nothing left to drop");
    }

    /// A non-durable subscription keeps nothing while no registration declares it: a consumer
    /// that registers it then starts at the newest event. A durable one keeps its place.
    #[test]
    fn a_non_durable_subscription_skips_what_was_published_while_nobody_declared_it() {
        let nd = |shared: bool| {
            let mut s = one_subscription("nd");
            s.subscriptions[0].durable = false;
            s.subscriptions[0].shared = shared;
            s
        };
        let register = |d: &mut SmData, index, node, services| d.apply(index, Command::Register { node, services });
        for shared in [true, false] {
            let sm = empty_shared();
            let mut d = write(&sm.data);
            d.last_membership = StoredMembershipT::new(None, crate::raft::types::Membership::new_with_defaults(vec![[1, 2].into()], []));
            let at = |d: &SmData, node| if shared { d.subs["nd"].cursor } else { d.subs["nd"].instances[&node] };
            register(&mut d, 1, 1, vec![nd(shared)]);
            let first = d.log.next;
            d.apply(2, Command::Publish { now_ms: 10, events: events(3), limits: LIMITS });
            assert_eq!(at(&d, 1), first, "registered before they were published: it gets them");
            register(&mut d, 3, 1, vec![nd(shared)]);
            assert_eq!(at(&d, 1), first, "registered again while declared: its place is kept");
            // Gone (a graceful stop registers nothing), events meanwhile, back.
            register(&mut d, 4, 1, Vec::new());
            d.apply(5, Command::Publish { now_ms: 20, events: events(2), limits: LIMITS });
            register(&mut d, 6, 1, vec![nd(shared)]);
            let back = d.log.next;
            assert_eq!(at(&d, 1), back, "shared: {shared}");
            assert!(d.subs["nd"].done.is_empty() && d.subs["nd"].attempts.is_empty());
            d.apply(7, Command::Publish { now_ms: 30, events: events(1), limits: LIMITS });
            register(&mut d, 8, 2, vec![nd(shared)]);
            // Node 1 leaves and comes back while node 2 declares it: a shared subscription had
            // a consumer all along; an every-instance one is node 1's own and starts anew.
            register(&mut d, 9, 1, Vec::new());
            register(&mut d, 10, 1, vec![nd(shared)]);
            if shared {
                assert_eq!(at(&d, 1), back);
            } else {
                assert_eq!((at(&d, 1), at(&d, 2)), (d.log.next, d.log.next));
            }
        }
        let sm = registered_and_published(1, one_subscription("d"), events(3), LIMITS);
        let mut d = write(&sm.data);
        let first = d.subs["d"].cursor;
        register(&mut d, 3, 1, Vec::new());
        d.apply(4, Command::Publish { now_ms: 20, events: events(2), limits: LIMITS });
        register(&mut d, 5, 1, vec![one_subscription("d")]);
        assert_eq!(d.subs["d"].cursor, first, "a durable subscription keeps its place");
    }

    /// `n` new events, named `e` or `f` at random.
    fn mixed_events(rng: &mut fastrand::Rng, n: usize) -> Arc<Vec<crate::broker::event::NewEvent>> {
        let meta = crate::sdk::MessageMeta::default();
        let name = |rng: &mut fastrand::Rng| if rng.bool() { "e" } else { "f" };
        Arc::new((0..n).map(|_| crate::broker::new_event(name(rng), b"1".to_vec(), &meta, None, None)).collect())
    }

    /// The backlog gives what walking the whole log gave, whatever happens between calls:
    /// events appended and trimmed by retention, acks in and out of order, failures up to the
    /// dead letters, positions skipped (in flight, backing off), parked and unparked, another
    /// filter declared.
    #[test]
    fn pending_with_a_backlog_finds_what_walking_the_log_finds() {
        for seed in 0..20 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let sm = empty_shared();
            write(&sm.data).apply(1, Command::Register { node: 1, services: vec![subscription_to_e("sub")] });
            let mut backlog = Backlog::default();
            let mut parked = BTreeSet::new();
            for round in 0..300u64 {
                let index = 2 + round;
                let mut d = write(&sm.data);
                match rng.u8(0..10) {
                    0..=2 => {
                        let n = rng.usize(1..20);
                        let events = mixed_events(&mut rng, n);
                        d.apply(index, Command::Publish { now_ms: 10 + round, events, limits: LIMITS });
                    }
                    3..=6 => {
                        let (first, next) = (d.log.first(), d.log.next);
                        let updates = (0..rng.usize(1..8))
                            .map(|_| {
                                let position = rng.u64(first.saturating_sub(2)..next + 2);
                                let sub = "sub".to_string();
                                if rng.u8(0..4) == 0 { SubUpdate::Failed { sub, position, reason: "no".into() } } else { SubUpdate::Ack { sub, position } }
                            })
                            .collect();
                        d.apply(index, Command::SubUpdate { updates });
                    }
                    7 if round % 50 == 49 => {
                        // Declared again: to every event, or back to `e` alone.
                        let mut service = subscription_to_e("sub");
                        if rng.bool() {
                            service.subscriptions[0].filter.event_name = None;
                        }
                        d.apply(index, Command::Register { node: 1, services: vec![service] });
                    }
                    _ => {}
                }
                drop(d);
                let limit = rng.usize(1..12);
                let salt = rng.u64(..);
                let skip = |p: u64| (p ^ salt).is_multiple_of(5) || parked.contains(&p);
                let expected = pending_by_walking(&read(&sm.data), "sub", limit, skip);
                let got: Vec<u64> = sm.pending("sub", limit, &mut backlog, skip).iter().map(|(e, _)| e.position).collect();
                assert_eq!(got, expected, "seed {seed}, round {round}");
                // Some of what was handed out fails and backs off (parked, and skipped as the
                // dispatcher skips what backs off); some backoffs end.
                for p in got {
                    if rng.u8(0..4) == 0 {
                        parked.insert(p);
                        backlog.park(p);
                    }
                }
                for p in parked.clone() {
                    if rng.u8(0..6) == 0 {
                        parked.remove(&p);
                        backlog.unpark(p);
                    }
                }
            }
        }
    }

    /// With one event stuck at the cursor (backing off) and everything after it acked, a call
    /// no longer walks the acked positions again: the backlog keeps only the open ones.
    #[test]
    fn a_stuck_cursor_does_not_make_each_call_walk_the_acked_events_behind_it() {
        let limits = EventLimits { max_events: 10_000, ..LIMITS };
        let sm = registered_and_published(1, one_subscription("sub"), events(1_000), limits);
        let stuck = read(&sm.data).subs["sub"].cursor;
        let mut backlog = Backlog::default();
        let first_pass = sm.pending("sub", 64, &mut backlog, |_| false);
        assert_eq!(first_pass.len(), 64);
        assert_eq!(backlog.open(), 1_000, "every event is open before it is acked");
        let acks = (stuck + 1..stuck + 1_000).map(|position| SubUpdate::Ack { sub: "sub".into(), position }).collect();
        write(&sm.data).apply(3, Command::SubUpdate { updates: acks });
        let summary = sm.subscription_summary("sub").expect("known");
        assert_eq!((summary.cursor, summary.done_ahead, summary.retrying), (stuck, 999, 0), "the unacked first event holds the cursor");
        let backing_off = |p: u64| p == stuck;
        assert!(sm.pending("sub", 64, &mut backlog, backing_off).is_empty());
        assert_eq!(backlog.open(), 1, "the acked events were dropped from the backlog once seen done");
        write(&sm.data).apply(4, Command::Publish { now_ms: 20, events: events(3), limits });
        let got: Vec<u64> = sm.pending("sub", 64, &mut backlog, backing_off).iter().map(|(e, _)| e.position).collect();
        assert_eq!(got, vec![stuck + 1_000, stuck + 1_001, stuck + 1_002], "new events after the stuck one");
        assert_eq!(backlog.open(), 4, "the stuck event and the three new ones, nothing acked");
    }

    /// Retention takes events from a shared subscription that had not settled them (counted),
    /// but not from an every-instance one, whose progress is per node and never acked: its
    /// cursor used to stop at its first event and count every later trim as lost.
    #[test]
    fn retention_counts_what_it_takes_from_shared_subscriptions_only() {
        let (each, _) = every_instance("each");
        let mut service = one_subscription("shared");
        service.subscriptions.push(each);
        let mut d = SmData::default();
        d.apply(1, Command::Register { node: 1, services: vec![service] });
        let limits = EventLimits { max_events: 4, ..LIMITS };
        d.apply(2, Command::Publish { now_ms: 10, events: events(3), limits });
        let first = d.log.first();
        d.apply(3, Command::SubUpdate { updates: vec![SubUpdate::Ack { sub: "shared".into(), position: first }] });
        // Three more: the log keeps four, so the oldest two go; the shared subscription had
        // settled one of them.
        d.apply(4, Command::Publish { now_ms: 20, events: events(3), limits });
        assert_eq!(d.log.first(), first + 2);
        // `advance` ran while applying; running it again shows what it would count now.
        assert_eq!(d.subs["shared"].cursor, first + 2, "the shared cursor moved to the oldest kept event");
        assert_eq!(d.advance("shared"), 0, "counted once, when they went");
        // Both subscriptions as they stood before the trim (cursors at their first unsettled
        // event): retention counts for the shared one, not for the every-instance one.
        let mut behind = d.clone();
        for sub in ["shared", "each"] {
            behind.subs.get_mut(sub).expect("registered").cursor = first + 1;
        }
        assert_eq!(behind.advance("shared"), 1, "an unsettled event retention took is counted");
        assert_eq!(behind.advance("each"), 0, "nothing counted for the every-instance subscription");
        assert_eq!(d.subs["each"].instances[&1], first, "its node's position is its own");
    }

    /// Retention's loss count for a subscription with a filter counts the unsettled events it
    /// takes that the filter matches, not every position past the cursor.
    #[test]
    fn retention_counts_only_the_events_a_subscription_takes() {
        use crate::broker::event::EventFilter;
        use crate::broker::event::SubscriptionDecl;
        let filter = EventFilter { event_name: Some("wanted".into()), ..EventFilter::default() };
        let service = crate::sdk::ServiceDecl {
            name: "svc".into(), version: 1, commands: Vec::new(),
            subscriptions: vec![SubscriptionDecl::new("picky", filter)], available: true,
        };
        let mut d = SmData::default();
        d.apply(1, Command::Register { node: 1, services: vec![service] });
        let meta = crate::sdk::MessageMeta::default();
        let named = |names: &[&str]| -> Arc<Vec<crate::broker::event::NewEvent>> {
            Arc::new(names.iter().map(|n| crate::broker::new_event(n, b"1".to_vec(), &meta, None, None)).collect())
        };
        let limits = EventLimits { max_events: 100, ..LIMITS };
        // other, wanted, other, wanted, other: the cursor stops at the first wanted one.
        d.apply(2, Command::Publish { now_ms: 10, events: named(&["other", "wanted", "other", "wanted", "other"]), limits });
        let first = d.log.first();
        assert_eq!(d.subs["picky"].cursor, first + 1);
        // Keep two events: the first three go, one of which the subscription wanted.
        let mut trim = d.clone();
        trim.apply(3, Command::Publish { now_ms: 20, events: named(&[]), limits: EventLimits { max_events: 2, ..LIMITS } });
        assert_eq!(trim.log.first(), first + 3);
        let mut behind = d.clone();
        let trimmed: Vec<Arc<Event>> = behind.log.events.drain(..3).collect();
        let s = behind.subs.get_mut("picky").expect("registered");
        assert_eq!(advance(&behind.log, "picky", s, &trimmed), 1, "one wanted event lost, not three positions");
        // Without the trimmed events (positions no longer known): each unsettled position counts.
        let mut unknown = d.clone();
        unknown.log.events.drain(..3);
        let s = unknown.subs.get_mut("picky").expect("registered");
        assert_eq!(advance(&unknown.log, "picky", s, &[]), 2);
    }

    /// The digest kept as writes apply is the one counted from scratch, also after a snapshot
    /// round trip, and it tells states apart (a value, a revision, a key moved to another store).
    #[test]
    fn the_kept_state_digest_is_the_one_counted_from_scratch() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut d = SmData::default();
        let mut seen = std::collections::HashMap::new();
        for index in 1..2_000u64 {
            let store = format!("s{}", rng.u8(0..3));
            let key = format!("k{}", rng.u8(0..20));
            let cmd = match rng.u8(0..4) {
                0 => Command::Increment { store, key, by: rng.i64(-3..4), tag: None },
                1 => Command::Delete { store, key, if_revision: None },
                _ => Command::Put { store, key, value: rng.u8(..).to_string().into_bytes(), if_revision: None, tag: None },
            };
            d.apply(index, cmd);
            assert_eq!(d.stores_digest, stores_digest(&d.stores), "after entry {index}");
            let state = seen.entry(d.stores_digest).or_insert_with(|| d.stores.clone());
            assert_eq!(*state, d.stores, "two states with one digest, after entry {index}");
        }
        assert!(seen.len() > 1_500, "states seen: {}", seen.len());
        let decoded = decode_data(&bincode::serialize(&d).expect("encodes")).expect("decodes");
        assert_eq!(decoded.stores_digest, d.stores_digest, "counted again from a snapshot");
        // The same bytes in other places: another store, another revision.
        let one = |store: &str, key: &str, revision: u64| {
            let mut d = SmData::default();
            d.apply(revision, Command::Put { store: store.into(), key: key.into(), value: b"1".to_vec(), if_revision: None, tag: None });
            d.stores_digest
        };
        assert_ne!(one("ab", "c", 1), one("a", "bc", 1));
        assert_ne!(one("a", "b", 1), one("a", "b", 2));
    }

    /// Snapshots written while the stores were `BTreeMap`s decode into the persistent maps, and
    /// the other way round: the bytes are the same.
    #[test]
    fn stores_encode_as_the_btree_maps_they_replaced() {
        let mut d = SmData::default();
        for (index, (store, key)) in [("a", "x"), ("a", "y"), ("b", "x"), ("c", "z")].into_iter().enumerate() {
            let value = format!("{index}").into_bytes();
            d.apply(index as u64 + 1, Command::Put { store: store.into(), key: key.into(), value, if_revision: None, tag: None });
        }
        let old: BTreeMap<String, BTreeMap<String, Versioned>> =
            d.stores.iter().map(|(s, keys)| (s.clone(), keys.iter().map(|(k, v)| (k.clone(), v.clone())).collect())).collect();
        let old_bytes = bincode::serialize(&old).expect("encodes");
        assert_eq!(bincode::serialize(&d.stores).expect("encodes"), old_bytes, "the same bytes");
        let decoded: Stores = bincode::deserialize(&old_bytes).expect("an old image decodes");
        assert_eq!(decoded, d.stores);
        let back: BTreeMap<String, BTreeMap<String, Versioned>> = bincode::deserialize(&old_bytes).expect("decodes");
        assert_eq!(back, old);
    }

    /// The producer-dedup keys and the idempotency records encode as the `std` collections they
    /// replaced (the same bytes, so snapshots of either build decode in the other), and a
    /// snapshot's copy of them shares their nodes: a write after it changes the state only.
    #[test]
    fn dedup_keys_and_idempotency_records_encode_as_before_and_copy_in_constant_time() {
        let mut d = SmData::default();
        let meta = crate::sdk::MessageMeta::default();
        for i in 0..300u64 {
            let keyed = vec![crate::broker::new_event("e", b"1".to_vec(), &meta, None, Some(format!("p{i}")))];
            d.apply(2 * i + 1, Command::Publish { now_ms: 10 + i, events: Arc::new(keyed), limits: LIMITS });
            d.apply(2 * i + 2, Command::IdemBegin { key: format!("c{i}"), attempt: 1, now_ms: 10 + i, lease_ms: 1000, window_ms: 600_000 });
        }
        assert_eq!((d.log.keys.len(), d.log.key_order.len(), d.idem.len(), d.idem_order.len()), (300, 300, 300, 300));
        let keys: BTreeMap<String, (String, u64, u64)> = d.log.keys.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let key_order: VecDeque<(u64, String)> = d.log.key_order.iter().cloned().collect();
        let idem: BTreeMap<String, IdemRecord> = d.idem.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let idem_order: VecDeque<(u64, String)> = d.idem_order.iter().cloned().collect();
        for (new, old) in [
            (bincode::serialize(&d.log.keys), bincode::serialize(&keys)),
            (bincode::serialize(&d.log.key_order), bincode::serialize(&key_order)),
            (bincode::serialize(&d.idem), bincode::serialize(&idem)),
            (bincode::serialize(&d.idem_order), bincode::serialize(&idem_order)),
        ] {
            assert_eq!(new.expect("encodes"), old.expect("encodes"), "the same bytes");
        }
        let image = bincode::serialize(&d).expect("encodes");
        let decoded: SmData = bincode::deserialize(&image).expect("decodes");
        assert_eq!((decoded.log.keys, decoded.idem_order), (d.log.keys.clone(), d.idem_order.clone()));
        // The copy shares: a key added after it is in the state only.
        let copy = d.clone();
        let keyed = vec![crate::broker::new_event("e", b"1".to_vec(), &meta, None, Some("late".into()))];
        d.apply(1_000, Command::Publish { now_ms: 400, events: Arc::new(keyed), limits: LIMITS });
        assert!(d.log.keys.contains_key("late") && !copy.log.keys.contains_key("late"));
        assert_eq!(copy.log.keys.len(), 300);
    }

    /// A position parked under one filter and unparked after another was declared that leaves
    /// it out is not handed out again.
    #[test]
    fn an_unparked_position_that_no_longer_matches_is_dropped() {
        let sm = empty_shared();
        let meta = crate::sdk::MessageMeta::default();
        let named = |name: &str| Arc::new(vec![crate::broker::new_event(name, b"1".to_vec(), &meta, None, None)]);
        {
            let mut d = write(&sm.data);
            d.apply(1, Command::Register { node: 1, services: vec![one_subscription("sub")] });
            d.apply(2, Command::Publish { now_ms: 10, events: named("f"), limits: LIMITS });
            d.apply(3, Command::Publish { now_ms: 10, events: named("e"), limits: LIMITS });
        }
        let mut backlog = Backlog::default();
        let first: Vec<u64> = sm.pending("sub", 10, &mut backlog, |_| false).iter().map(|(e, _)| e.position).collect();
        assert_eq!(first.len(), 2, "no filter: both");
        // The `f` event failed and backs off; meanwhile the subscription is declared for `e` only.
        let f = first[0];
        backlog.park(f);
        write(&sm.data).apply(4, Command::Register { node: 1, services: vec![subscription_to_e("sub")] });
        let got: Vec<u64> = sm.pending("sub", 10, &mut backlog, |p| p == f).iter().map(|(e, _)| e.position).collect();
        assert_eq!(got, vec![first[1]]);
        backlog.unpark(f);
        let got: Vec<u64> = sm.pending("sub", 10, &mut backlog, |_| false).iter().map(|(e, _)| e.position).collect();
        assert_eq!(got, vec![first[1]], "the `f` event is not handed out under a filter for `e`");
    }

    /// A state machine with subscription `sub` and two events, both handed out from `backlog`
    /// (parked while in flight).
    fn two_events_parked(sub: &str) -> (SmShared, Backlog, Vec<u64>) {
        let sm = registered_and_published(1, one_subscription(sub), events(2), LIMITS);
        let mut backlog = Backlog::default();
        let first: Vec<u64> = sm.pending(sub, 10, &mut backlog, |_| false).iter().map(|(e, _)| e.position).collect();
        assert_eq!(first.len(), 2);
        backlog.park(first[0]);
        backlog.park(first[1]);
        (sm, backlog, first)
    }

    /// A position parked while in flight comes back when its subscription is dropped and
    /// declared again, even with the cursor where it was: its ack, applied while the
    /// subscription was gone, settled nothing, and the new subscription must hand it out.
    #[test]
    fn a_subscription_dropped_and_declared_again_is_looked_at_afresh() {
        // Both handed out (parked while in flight); the node stops declaring it, it is dropped,
        // one ack lands in between, and the node declares it again.
        let (sm, mut backlog, first) = two_events_parked("sub");
        {
            let mut d = write(&sm.data);
            d.apply(10, Command::Register { node: 1, services: vec![] });
            d.apply(11, Command::DropSubscription { name: "sub".into() });
            d.apply(12, Command::SubUpdate { updates: vec![SubUpdate::Ack { sub: "sub".into(), position: first[0] }] });
            d.apply(13, Command::Register { node: 1, services: vec![one_subscription("sub")] });
        }
        assert_eq!(read(&sm.data).subs["sub"].cursor, first[0], "begun anew where the first one began");
        let got: Vec<u64> = sm.pending("sub", 10, &mut backlog, |_| false).iter().map(|(e, _)| e.position).collect();
        assert_eq!(got, first, "both are pending again");
    }

    /// Another subscription created leaves a backlog as it was: its parked positions stay
    /// parked (a global number looked at every backlog afresh, walking again what was in
    /// flight).
    #[test]
    fn another_subscription_starting_anew_leaves_a_backlog_as_it_was() {
        let (sm, mut backlog, _) = two_events_parked("sub");
        write(&sm.data).apply(10, Command::Register { node: 2, services: vec![one_subscription("other")] });
        assert!(read(&sm.data).subs.contains_key("other"));
        assert!(sm.pending("sub", 10, &mut backlog, |_| false).is_empty(), "both still parked");
    }

    /// A fresh backlog far behind scans the log a bounded stretch per call, in log order.
    #[test]
    fn a_fresh_backlog_scans_a_long_log_a_stretch_per_call() {
        let limits = EventLimits { max_events: 100_000, max_bytes: 1 << 30, ..LIMITS };
        let sm = registered_and_published(1, one_subscription("sub"), events(3 * BACKLOG_SCAN), limits);
        let cursor = read(&sm.data).subs["sub"].cursor;
        // All of the first stretch in flight: nothing from it to hand out.
        let busy = |p: u64| p < cursor + BACKLOG_SCAN as u64;
        let mut backlog = Backlog::default();
        assert!(sm.pending("sub", 4, &mut backlog, busy).is_empty());
        assert_eq!((backlog.scanned, backlog.open()), (cursor + BACKLOG_SCAN as u64, BACKLOG_SCAN));
        let got: Vec<u64> = sm.pending("sub", 4, &mut backlog, busy).iter().map(|(e, _)| e.position).collect();
        let second = cursor + BACKLOG_SCAN as u64;
        assert_eq!(got, (second..second + 4).collect::<Vec<_>>(), "the next stretch, in order");
        sm.pending("sub", 4, &mut backlog, busy);
        assert_eq!(backlog.scanned, read(&sm.data).log.next, "all of it after three calls");
    }

    /// A snapshot whose stores claim more entries than it holds fails to decode (it used to
    /// reserve room for them first).
    #[test]
    fn stores_with_a_corrupt_length_are_an_error() {
        use bincode::Options;
        let bad = (u64::MAX / 4).to_le_bytes();
        let options = bincode::DefaultOptions::new().with_fixint_encoding().allow_trailing_bytes();
        assert!(stores_from_btree_maps(&mut bincode::Deserializer::from_slice(&bad, options)).is_err());
    }

    /// Retention's losses are logged at once, then at most every `EXPIRED_LOG_EVERY` per
    /// subscription with the sum since the last line.
    #[test]
    fn expired_events_are_logged_at_most_every_so_often_with_their_sum() {
        let mut logged = ExpiredLog::new();
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        assert_eq!(expired_to_log(&mut logged, "a", 3, at(0)), Some(3), "the first loss is logged");
        assert_eq!(expired_to_log(&mut logged, "a", 2, at(1_000)), None);
        assert_eq!(expired_to_log(&mut logged, "b", 7, at(1_000)), Some(7), "each subscription on its own");
        assert_eq!(expired_to_log(&mut logged, "a", 4, at(9_999)), None);
        assert_eq!(expired_to_log(&mut logged, "a", 1, at(10_000)), Some(7), "the sum since the last line");
        assert_eq!(expired_to_log(&mut logged, "a", 1, at(15_000)), None);
        assert_eq!(logged.len(), 2);
    }

    /// An every-instance loop that fell behind retention goes on from the oldest kept event.
    #[test]
    fn matching_from_a_trimmed_position_starts_at_the_oldest_kept_event() {
        let (_, service) = every_instance("each");
        let sm = registered_and_published(1, service, events(6), EventLimits { max_events: 4, ..LIMITS });
        let (first, next) = (read(&sm.data).log.first(), read(&sm.data).log.next);
        assert_eq!(next - first, 4);
        let (got, scanned, expired) = sm.matching_from("each", first - 2, 10);
        assert_eq!(got.iter().map(|e| e.position).collect::<Vec<_>>(), (first..next).collect::<Vec<_>>());
        assert_eq!((scanned, expired), (Some(next), 2), "past the kept events; the two dropped ones counted");
        assert_eq!(sm.matching_from("each", next, 10), (Vec::new(), None, 0), "nothing new: nothing scanned");
    }

    #[test]
    fn an_instance_position_is_the_nodes_next_event_and_its_declaration() {
        let (_, service) = every_instance("each");
        let sm = registered_and_published(2, service, events(3), LIMITS);
        let first = read(&sm.data).log.first();
        let dead = Some((5, "boom".to_string()));
        let updates = vec![
            SubUpdate::Instance { sub: "each".into(), node: 2, position: first, dead },
            SubUpdate::Instance { sub: "each".into(), node: 2, position: first + 1, dead: None },
        ];
        write(&sm.data).apply(3, Command::SubUpdate { updates });
        let (decl, next) = sm.instance_position("each", 2).expect("known");
        assert!(!decl.shared);
        assert_eq!(next, first + 2, "past the dead-lettered and the handled event");
        let full = sm.subscription("each").expect("known");
        assert_eq!((full.instances[&2], full.dead.len()), (next, 1), "the same as the full state says");
        assert!(sm.instance_position("each", 3).is_none(), "a node that has not registered it has no position yet");
        assert!(sm.instance_position("other", 2).is_none());
    }

    #[test]
    fn a_read_is_bounded_by_count_bytes_and_scan_and_takes_any_after() {
        let sm = empty_shared();
        let meta = crate::sdk::MessageMeta::default();
        let named = |name: &str, n: usize, payload: usize| -> Arc<Vec<crate::broker::event::NewEvent>> {
            Arc::new((0..n).map(|_| crate::broker::new_event(name, vec![b'1'; payload], &meta, None, None)).collect())
        };
        let limits = EventLimits { max_events: 1_000_000, max_bytes: 1 << 30, max_age_ms: 3_600_000, dedup_window_ms: 60_000 };
        {
            let mut d = write(&sm.data);
            d.apply(1, Command::Publish { now_ms: 10, events: named("big", 5, 1000), limits });
            d.apply(2, Command::Publish { now_ms: 10, events: named("small", MAX_SCAN + 10, 1), limits });
            d.apply(3, Command::Publish { now_ms: 10, events: named("late", 1, 1), limits });
        }
        let first = read(&sm.data).log.first();
        // By count, then by bytes (at least one event, whatever its size).
        let (got, next) = sm.events_after(0, 3, usize::MAX, None);
        assert_eq!((got.len(), next), (3, first + 2));
        let (got, next) = sm.events_after(0, 100, 2500, None);
        assert_eq!((got.len(), next), (2, first + 1), "two 1000-byte payloads fit 2500 bytes, a third not");
        let (got, _) = sm.events_after(0, 100, 10, None);
        assert_eq!(got.len(), 1, "one event always goes");
        // A filter that matches only far away: one read looks at MAX_SCAN positions and says
        // where to go on; the next read finds the event.
        let (got, next) = sm.events_after(0, 10, usize::MAX, Some("late"));
        assert!(got.is_empty());
        assert_eq!(next, first + MAX_SCAN as u64 - 1);
        let (got, _) = sm.events_after(next, 10, usize::MAX, Some("late"));
        assert_eq!(got.iter().map(|e| e.event_name.as_str()).collect::<Vec<_>>(), vec!["late"]);
        // `after` at the end of the numbers: nothing, no overflow.
        let (got, next) = sm.events_after(u64::MAX, 10, usize::MAX, None);
        assert_eq!((got.len(), next), (0, u64::MAX));
    }

    #[test]
    fn dead_letters_page_in_position_order_without_splitting_a_position() {
        let sm = empty_shared();
        {
            let mut d = write(&sm.data);
            d.apply(1, Command::Register { node: 1, services: vec![one_subscription("sub")] });
            let s = d.subs.get_mut("sub").expect("registered");
            // Dead-lettered out of position order; position 5 by two nodes.
            for (position, node) in [(7, 1), (5, 1), (9, 1), (5, 2)] {
                let letter = DeadLetter { position, event_id: format!("e{position}"), attempts: 5, reason: "x".into(), node: Some(node) };
                push_dead(s, letter);
            }
        }
        let page = |after, limit| -> Vec<(u64, Option<u64>)> {
            sm.dead_letters("sub", after, limit).expect("known").iter().map(|l| (l.position, l.node)).collect()
        };
        assert_eq!(page(None, 10), vec![(5, Some(1)), (5, Some(2)), (7, Some(1)), (9, Some(1))]);
        assert_eq!(page(None, 1), vec![(5, Some(1)), (5, Some(2))], "a position's letters stay together");
        assert_eq!(page(Some(5), 1), vec![(7, Some(1))]);
        assert_eq!(page(Some(9), 10), vec![]);
        assert!(sm.dead_letters("other", None, 10).is_none());
        // Position 7 dead-lettered again by node 1 (a seek back over it): listed once, as last.
        {
            let mut d = write(&sm.data);
            let s = d.subs.get_mut("sub").expect("registered");
            push_dead(s, DeadLetter { position: 7, event_id: "e7".into(), attempts: 2, reason: "again".into(), node: Some(1) });
        }
        let listed = sm.dead_letters("sub", None, 10).expect("known");
        let sevens: Vec<_> = listed.iter().filter(|l| l.position == 7).map(|l| (l.attempts, l.reason.as_str())).collect();
        assert_eq!(sevens, vec![(2, "again")], "{listed:?}");
        assert_eq!(listed.len(), 4);
        assert_eq!(sm.subscription_summary("sub").map(|s| s.dead_letters), Some(4));
    }

    /// openraft builds a snapshot in a task of its own and may install a leader's meanwhile: the
    /// writes take turns (they shared one temp file), and an image no newer than the file's is
    /// not written over it (an older build replaced a newer install after the log was purged up
    /// to it, and the node could not restart). Images of 512 KiB, 40 synced writes: enough to
    /// overlap, light enough not to stall the cluster tests running beside it.
    #[test]
    fn snapshot_writes_take_turns_and_never_replace_a_newer_image() {
        let dir = std::env::temp_dir().join(format!("rb-sm-{}", fastrand::u64(..)));
        let sm = StateMachine::open(&dir).unwrap();
        use openraft::vote::RaftLeaderIdExt;
        let log_id = |index| LogId::new(<TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(1, 1), index);
        // Large enough that writes overlap; the fill tells the writers apart.
        let image = |index: u64| StoredSnapshot {
            meta: SnapshotMeta { last_log_id: Some(log_id(index)), last_membership: Default::default() },
            data: vec![index as u8; 512 << 10],
        };
        std::thread::scope(|s| {
            for first in [1u64, 2] {
                let sm = &sm;
                s.spawn(move || {
                    for index in (first..=40).step_by(2) {
                        sm.persist(&image(index)).unwrap();
                    }
                });
            }
        });
        let on_disk = read_snapshot_file(&dir.join(SNAPSHOT_FILE)).unwrap().expect("a snapshot");
        assert_eq!(on_disk.meta.last_log_id, Some(log_id(40)), "the newest image is the one kept");
        assert!(on_disk.data.iter().all(|b| *b == 40), "one writer's image, whole");
        assert!(!sm.persist(&image(39)).unwrap(), "an older image is not written");
        assert!(!sm.persist(&image(40)).unwrap(), "nor the same one again");
        assert_eq!(read_snapshot_file(&dir.join(SNAPSHOT_FILE)).unwrap().unwrap().meta.last_log_id, Some(log_id(40)));
        assert!(sm.persist(&image(41)).unwrap(), "a newer one is");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_snapshot_file_with_a_huge_length_is_an_error() {
        let mut bytes = vec![0u8; 16];
        bytes[4..12].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_file(&bytes).is_err());
    }

    /// A saved snapshot read back and restored for a new cluster of one member: the same state
    /// at the same position, the new membership in the meta and in the image (what a node
    /// reads at open); a file with bytes after its end is refused, and so is a dir that holds
    /// a snapshot already.
    #[tokio::test]
    async fn a_backup_restores_the_state_under_a_membership_of_one() {
        let dir = std::env::temp_dir().join(format!("rb-sm-{}", fastrand::u64(..)));
        let mut sm = StateMachine::open(&dir).unwrap();
        {
            let mut d = write(&sm.shared.data);
            apply_entry(&mut d, membership(&[1, 2, 3], 1), 0);
            d.apply(2, put("s", "k", "{\"a\":1}", None));
            d.apply(3, name_cluster(0x01d));
            apply_entry(&mut d, membership(&[1, 2, 3, 7], 5), 0);
            for node in [2, 7] {
                d.apply(6, Command::Register { node, services: vec![every_instance("each").1] });
            }
        }
        let built = sm.build_snapshot().await.unwrap();
        let bytes = std::fs::read(dir.join(SNAPSHOT_FILE)).unwrap();
        let (meta, mut data) = read_backup(&bytes).expect("the saved file reads back");
        assert_eq!(meta, built.meta);
        assert_eq!(data.cluster_id(), Some(0x01d), "the backup names its cluster");
        // `backup::restore` gives the new cluster an id of its own.
        data.rename_cluster(0x2ee);
        assert!(read_backup(&[&bytes[..], b"x"].concat()).is_err(), "bytes after the end");
        let restored = std::env::temp_dir().join(format!("rb-sm-{}", fastrand::u64(..)));
        let new_meta = write_restored(&restored, &meta, data.clone(), 7, "127.0.0.1:7").unwrap();
        assert_eq!(new_meta.last_log_id, meta.last_log_id, "the backup's position");
        let opened = StateMachine::open(&restored).unwrap();
        {
            let d = read(&opened.shared.data);
            assert_eq!(d.last_applied, meta.last_log_id);
            assert_eq!(d.last_membership.membership().voter_ids().collect::<Vec<_>>(), vec![7], "the image names the new member");
            assert_eq!(d.last_membership.membership().get_node(&7).map(|n| n.addr.as_str()), Some("127.0.0.1:7"));
        }
        assert_eq!(opened.shared.get("s", "k").unwrap().revision, 2);
        {
            // Of the old members, only the restored node's id is kept (a joiner that reuses
            // node 2's id starts afresh, whenever it joins).
            let d = read(&opened.shared.data);
            assert_eq!(d.registry.keys().copied().collect::<Vec<_>>(), vec![7]);
            assert_eq!(d.subs["each"].instances.keys().copied().collect::<Vec<_>>(), vec![7]);
        }
        assert_eq!(opened.shared.known_cluster_id().get(), Some(&0x2ee), "the handshake announces the new id from the start");
        assert_eq!(read_cluster_id(&restored), Some(0x2ee), "and the id file names it");
        let mut reopened = StateMachine::open(&restored).unwrap();
        assert_eq!(reopened.get_current_snapshot().await.unwrap().expect("the restored snapshot").meta, new_meta);
        assert!(write_restored(&restored, &meta, data, 7, "127.0.0.1:7").is_err(), "a dir that holds a snapshot");
        std::fs::remove_dir_all(restored).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The first cluster id the state holds goes to the id file, and a restart announces it
    /// from the file before it has replayed the entry that named the cluster (a file that does
    /// not read is ignored); a snapshot's id stands over the file's.
    #[tokio::test]
    async fn a_restart_knows_the_cluster_id_before_its_replay() {
        let dir = std::env::temp_dir().join(format!("rb-sm-{}", fastrand::u64(..)));
        let mut sm = StateMachine::open(&dir).unwrap();
        assert!(sm.shared.known_cluster_id().get().is_none());
        use openraft::vote::RaftLeaderIdExt;
        let entry = |index, id| Entry {
            log_id: LogId::new(<TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(1, 1), index),
            payload: openraft::EntryPayload::Normal(name_cluster(id)),
        };
        let entries = futures_util::stream::iter([Ok((entry(1, 0xa1), None)), Ok((entry(2, 0xb2), None))]);
        sm.apply(entries).await.unwrap();
        assert_eq!(sm.shared.known_cluster_id().get(), Some(&0xa1));
        // Written off the runtime: polled, 10 s at most.
        let mut written = None;
        for _ in 0..1000 {
            written = read_cluster_id(&dir);
            if written.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(written, Some(0xa1), "the id file is written");
        drop(sm);
        // A restart whose state does not hold the id yet (the entry is in the log, to replay).
        let reopened = StateMachine::open(&dir).unwrap();
        assert_eq!(reopened.shared.known_cluster_id().get(), Some(&0xa1), "known from the file");
        assert_eq!(read(&reopened.shared.data).cluster_id(), None);
        drop(reopened);
        std::fs::write(dir.join(CLUSTER_ID_FILE), b"not an id\n").unwrap();
        assert!(StateMachine::open(&dir).unwrap().shared.known_cluster_id().get().is_none(), "a file that does not read");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn snapshot_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("rb-sm-{}", fastrand::u64(..)));
        let mut sm = StateMachine::open(&dir).unwrap();
        write(&sm.shared.data).apply(3, put("s", "k", "{\"a\":1}", None));
        assert!(sm.get_current_snapshot().await.unwrap().is_none(), "none built yet");
        let snap = sm.build_snapshot().await.unwrap();
        // A temp file a crash left mid-write is removed at open; the snapshot is kept.
        let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        std::fs::write(&tmp, b"half a snapshot").unwrap();
        let sm2 = StateMachine::open(&dir).unwrap();
        assert!(!tmp.exists(), "the crashed write's temp file is gone");
        assert_eq!(sm2.shared.get("s", "k").unwrap().revision, 3);
        assert_eq!(decode_data(&snap.snapshot).unwrap().stores.len(), 1);
        // The current snapshot is read back from the file: the same image and meta.
        let current = sm.get_current_snapshot().await.unwrap().expect("a snapshot");
        assert_eq!((current.meta.clone(), &current.snapshot), (snap.meta.clone(), &snap.snapshot));
        // One installed from a leader becomes the current one, and what a reopen restores.
        let other = std::env::temp_dir().join(format!("rb-sm-{}", fastrand::u64(..)));
        let mut follower = StateMachine::open(&other).unwrap();
        follower.install_snapshot(&current.meta, current.snapshot.clone()).await.unwrap();
        let installed = follower.get_current_snapshot().await.unwrap().expect("installed");
        assert_eq!(installed.snapshot, current.snapshot);
        assert_eq!(StateMachine::open(&other).unwrap().shared.get("s", "k").unwrap().revision, 3);
        std::fs::remove_dir_all(other).unwrap();
        // A corrupt file is refused, not half-loaded.
        let path = dir.join(SNAPSHOT_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert!(StateMachine::open(&dir).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}

