//! The replicated state, config and secret stores: JSON values under `store/key`, a revision
//! per key, compare-and-set, listing, and long polls that wait for a change.
//!
//! Values live in the Raft state machine, so a write is acknowledged only after it is committed
//! (fsynced on a quorum) and applied. Reads are linearizable by default — a read barrier through
//! the leader's read index, then a local read — or `stale` straight from the local copy. The
//! revision of a key is the log index of the write that set it: unique, increasing, and equal on
//! every node.
//!
//! The config and secret stores are further namespaces (`Space`) of the same maps, under store
//! names no client can give (they start with U+0001, and client names may hold no control
//! characters): one quota, one snapshot, one apply path, and their own HTTP routes. The secret
//! store seals its values before they are proposed (`secret`), so the log, snapshots and peer
//! links hold them encrypted.
//!
//! A long poll (`wait_changed`) waits on the state machine's store watch and compares the
//! store's persistent map by pointer (a write makes a new root), so an unchanged store costs a
//! pointer compare per apply, not a scan; its tag (`ListTag`) is the largest revision and the
//! number of keys in what the client reads, which tells every change apart: a key written later
//! has a larger revision, and a state reached by deletes alone has fewer keys.

pub mod secret;

use std::sync::Arc;
use std::time::Duration;

use crate::raft::Replica;
use crate::raft::ReplicaError;
use crate::raft::state_machine::SmShared;
use crate::raft::state_machine::entry_weight;
use crate::raft::state_machine::Versioned;
use crate::raft::types::Command;
use crate::raft::types::CommandResult;
use crate::raft::types::TxnOp;
use crate::raft::types::WriteTag;

pub const MAX_STORE_NAME: usize = 128;
pub const MAX_KEY: usize = 1024;
/// Operations in one transaction at most (Consul's bound is 64 too).
pub const MAX_TXN_OPS: usize = 64;
/// The longest TTL a write takes: ten years, in seconds.
pub const MAX_TTL_S: u64 = 10 * 365 * 24 * 3600;
/// Keys one listing answers at most (`?limit=`), and by default.
pub const MAX_LIST: usize = 10_000;
pub const DEFAULT_LIST: usize = 1_000;
/// About how many bytes of keys and values one listing page holds at most, besides its count
/// (an HTTP listing's and a handler's `StateHandle::list` alike).
pub const PAGE_BYTES: usize = 4 << 20;

/// Which of the three stores a `StateStore` reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    State,
    Config,
    Secrets,
}

impl Space {
    /// Where the space's store names start in the state machine: U+0001, which no client's
    /// store name may hold (`check_names`), so no client of one space reaches another's keys.
    pub fn prefix(self) -> &'static str {
        match self {
            Space::State => "",
            Space::Config => "\u{1}config/",
            Space::Secrets => "\u{1}secrets/",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Space::State => "state",
            Space::Config => "config",
            Space::Secrets => "secret",
        }
    }
}

/// What a listing (or a key) looks like to a long poll: the largest revision among its keys
/// and how many there are. Two states of one store's history with the same tag hold the same
/// keys at the same revisions (see the module's comment), so an equal tag means unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListTag {
    pub max_revision: u64,
    pub keys: u64,
}

impl std::fmt::Display for ListTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.max_revision, self.keys)
    }
}

/// One page of a store's keys under a prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    pub items: Vec<(String, Versioned)>,
    /// The last key of this page when more follow (`?after=` it for the next page).
    pub next: Option<String>,
    /// The tag of every key under the prefix, not only this page's.
    pub tag: ListTag,
}

/// The keys of `map` under `prefix`, after `after`: at most `limit` of them and about
/// `max_bytes` of keys and values (at least one), with the tag of all the keys under `prefix`.
/// The page is read from where it starts (`after`), not from the prefix's first key: paging
/// through a large prefix used to walk it from the start for every page.
pub fn list_map(map: Option<&imbl::OrdMap<String, Versioned>>, prefix: &str, after: Option<&str>, limit: usize, max_bytes: usize) -> Listing {
    list_page(map, prefix, after, limit, max_bytes, list_tag(map, prefix))
}

/// `list_map` with the prefix's tag already known (`TagCache`).
fn list_page(map: Option<&imbl::OrdMap<String, Versioned>>, prefix: &str, after: Option<&str>, limit: usize, max_bytes: usize, tag: ListTag) -> Listing {
    use std::ops::Bound;
    let mut listing = Listing { items: Vec::new(), next: None, tag };
    let mut bytes = 0usize;
    let Some(map) = map else { return listing };
    let start = match after {
        Some(a) if a >= prefix => Bound::Excluded(a.to_string()),
        _ => Bound::Included(prefix.to_string()),
    };
    for (key, v) in map.range((start, Bound::Unbounded)) {
        if !key.starts_with(prefix) {
            break;
        }
        let size = key.len() + v.value.len();
        if !listing.items.is_empty() && (listing.items.len() >= limit || bytes + size > max_bytes) {
            listing.next = listing.items.last().map(|(k, _)| k.clone());
            break;
        }
        bytes += size;
        listing.items.push((key.clone(), v.clone()));
    }
    listing
}

/// The tags of the listings made lately, by store, prefix and the store's map they were
/// made of (compared by pointer): a tag walks every key under its prefix, and the long polls
/// and pages of one prefix at one state of its store share one walk instead of one each (200
/// polls answered by one write made 200 walks of the same keys). Holds `TAG_CACHE` entries; an
/// entry keeps its map's version alive until it is pushed out, or until the first listing
/// after a snapshot install drops the older generation's.
#[derive(Default)]
pub struct TagCache(std::sync::Mutex<std::collections::VecDeque<CachedTag>>);

struct CachedTag {
    store: String,
    prefix: String,
    map: imbl::OrdMap<String, Versioned>,
    tag: ListTag,
    /// `SmShared::installs` when it was made: a tag is moved only within one generation.
    installs: u64,
}

/// Listings' tags kept at most (`TagCache`).
const TAG_CACHE: usize = 64;

impl TagCache {
    /// `installs`: `SmShared::installs` before `map` was read.
    fn tag(&self, store: &str, prefix: &str, map: Option<&imbl::OrdMap<String, Versioned>>, installs: u64) -> ListTag {
        let Some(map) = map else { return list_tag(None, prefix) };
        let lock = || self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The newest entry of this listing: the tag itself when it is of this map, else the
        // base that the changes since move (`tag_moved`), unless a snapshot was installed
        // between them: the diff of two maps that share no nodes compares every value.
        let base = match lock().iter().find(|c| c.prefix == prefix && c.store == store) {
            Some(hit) if hit.map.ptr_eq(map) => return hit.tag,
            Some(older) if older.installs == installs => Some((older.map.clone(), older.tag)),
            _ => None,
        };
        // Outside the lock: the changes, or the keys walked, may be many.
        let tag = base.and_then(|(old, tag)| tag_moved(&old, map, prefix, tag)).unwrap_or_else(|| list_tag(Some(map), prefix));
        let mut cached = lock();
        // Entries of a generation before a snapshot install are of no use any more, and each
        // keeps a whole old map of its store alive beside the installed one.
        // (One made before an install that a newer listing already saw is not cached: it
        // would push the newer generation's entries out.)
        if cached.iter().any(|c| c.installs > installs) {
            return tag;
        }
        cached.retain(|c| c.installs == installs);
        cached.push_front(CachedTag { store: store.to_string(), prefix: prefix.to_string(), map: map.clone(), tag, installs });
        cached.truncate(TAG_CACHE);
        tag
    }
}

/// Changes between two maps that `tag_moved` looks through before it walks the prefix instead
/// (fewer for a prefix of fewer keys, at least `TAG_DIFF_MIN`: the diff is of the whole store,
/// and should cost no more than the walk it saves).
const TAG_DIFF_MAX: usize = 4_096;
const TAG_DIFF_MIN: usize = 64;

/// `tag`, the tag of `old`'s keys under `prefix`, moved by the changes from `old` to `new`:
/// what `list_tag(new, prefix)` is, at the cost of the changes (imbl's diff skips what the two
/// share) rather than of every key under the prefix. Paging through a million keys while
/// another client wrote walked all of them again for every page. `None` when the diff is
/// longer than `TAG_DIFF_MAX`, or a key that may have held the largest revision went (which
/// key holds the next largest only a walk can tell).
fn tag_moved(old: &imbl::OrdMap<String, Versioned>, new: &imbl::OrdMap<String, Versioned>, prefix: &str, mut tag: ListTag) -> Option<ListTag> {
    use imbl::ordmap::DiffItem;
    let most = usize::try_from(tag.keys).unwrap_or(usize::MAX).clamp(TAG_DIFF_MIN, TAG_DIFF_MAX);
    for (i, change) in old.diff(new).enumerate() {
        if i == most {
            return None;
        }
        match change {
            DiffItem::Add(key, v) if key.starts_with(prefix) => {
                tag.keys += 1;
                tag.max_revision = tag.max_revision.max(v.revision);
            }
            DiffItem::Remove(key, v) if key.starts_with(prefix) => {
                if v.revision >= tag.max_revision {
                    return None;
                }
                tag.keys = tag.keys.checked_sub(1)?;
            }
            DiffItem::Update { old: (key, was), new: (_, now) } if key.starts_with(prefix) => {
                // Revisions only grow (a key's is the index of its last write); a snapshot of
                // another history could break that: walked then.
                if now.revision < was.revision && was.revision >= tag.max_revision {
                    return None;
                }
                tag.max_revision = tag.max_revision.max(now.revision);
            }
            _ => {}
        }
    }
    Some(tag)
}

/// The tag of the keys of `map` under `prefix` (what `list_map` answers as `tag`).
pub fn list_tag(map: Option<&imbl::OrdMap<String, Versioned>>, prefix: &str) -> ListTag {
    let mut tag = ListTag { max_revision: 0, keys: 0 };
    let Some(map) = map else { return tag };
    for (key, v) in map.range((std::ops::Bound::Included(prefix.to_string()), std::ops::Bound::Unbounded)) {
        if !key.starts_with(prefix) {
            break;
        }
        tag.keys += 1;
        tag.max_revision = tag.max_revision.max(v.revision);
    }
    tag
}

/// Whether `old` and `new` differ in a key that starts with `within`. imbl's diff skips the
/// subtrees the two maps share, so this costs about the changes between them, not their keys;
/// a store that appeared or went costs one look at its first key under `within`.
pub fn changed_within(old: Option<&imbl::OrdMap<String, Versioned>>, new: Option<&imbl::OrdMap<String, Versioned>>, within: &str) -> bool {
    use imbl::ordmap::DiffItem;
    match (old, new) {
        (Some(old), Some(new)) => old.diff(new).any(|d| match d {
            DiffItem::Add(k, _) | DiffItem::Remove(k, _) | DiffItem::Update { new: (k, _), .. } => k.starts_with(within),
        }),
        (None, None) => false,
        (Some(map), None) | (None, Some(map)) => {
            map.range((std::ops::Bound::Included(within.to_string()), std::ops::Bound::Unbounded)).next().is_some_and(|(k, _)| k.starts_with(within))
        }
    }
}

/// What one key looks like to a long poll: its revision, 0 when absent.
pub fn key_tag(map: Option<&imbl::OrdMap<String, Versioned>>, key: &str) -> ListTag {
    let revision = map.and_then(|m| m.get(key)).map_or(0, |v| v.revision);
    ListTag { max_revision: revision, keys: u64::from(revision != 0) }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    Linearizable,
    Stale,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("invalid JSON value: {0}")]
    InvalidJson(String),
    /// A value larger than the node takes in one write (`--max-body`): a bigger one would make
    /// a log entry that no peer frame carries, and replication would stall behind it.
    #[error("value of {bytes} bytes is larger than the limit of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    /// The store is full (`--state-max-keys`, `--state-max-bytes`): 507 until keys are deleted.
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("revision mismatch (current: {})", current.map_or_else(|| "absent".to_string(), |r| format!("revision {r}")))]
    PreconditionFailed { current: Option<u64> },
    /// `transaction`: op `op` wanted `key` at another revision than `current`; nothing written.
    #[error("operation {op} (key {key:?}): revision mismatch (current: {}); nothing was written", current.map_or_else(|| "absent".to_string(), |r| format!("revision {r}")))]
    TxnFailed { op: u32, key: String, current: Option<u64> },
    /// A transaction that cannot be proposed as given (no ops, too many, a key twice, a
    /// secret store).
    #[error("{0}")]
    InvalidTxn(String),
    /// An increment past an i64's range: refused, not saturated (the update was lost unseen).
    #[error("{0}")]
    Overflow(String),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("unexpected result {0:?}")]
    Unexpected(CommandResult),
    /// A write that needs what a member's build does not apply (a key's expiry during a
    /// rolling upgrade): 503 until every member runs one that does.
    #[error("{0}")]
    NotEveryMember(String),
}

#[derive(Clone)]
pub struct StateStore {
    replica: Replica,
    sm: Arc<SmShared>,
    timeout: Duration,
    /// Largest value a write takes (`--max-body`, which is at most half a peer frame). HTTP
    /// bodies are bounded before they get here; a handler's `put` is bounded only by this.
    max_value: usize,
    /// Keys and bytes (`entry_weight`) the store may hold (`--state-max-keys`,
    /// `--state-max-bytes`). Checked against this node's copy before a write is proposed, as
    /// etcd checks its quota: writes racing on several nodes may overshoot by what they add.
    quota: (u64, u64),
    space: Space,
    /// Seals the secret store's values (`secret`); `None` without a cluster secret.
    sealer: Option<Arc<secret::Sealer>>,
    /// Listings' tags, shared by the node's stores in every space.
    tags: Arc<TagCache>,
}

/// A value must be JSON text that can be served back as JSON: UTF-8 throughout, no lone
/// surrogate escapes (a syntax check alone lets both through inside strings).
fn check_json(value: &[u8]) -> Result<(), StoreError> {
    let text = std::str::from_utf8(value).map_err(|e| StoreError::InvalidJson(format!("value is not UTF-8: {e}")))?;
    serde_json::from_str::<serde_json::Value>(text).map(drop).map_err(|e| StoreError::InvalidJson(e.to_string()))
}

pub fn check_names(store: &str, key: &str) -> Result<(), StoreError> {
    check_store_name(store)?;
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(StoreError::InvalidName(format!("key must be 1..={MAX_KEY} bytes")));
    }
    if key.chars().any(char::is_control) {
        return Err(StoreError::InvalidName("names may not contain control characters".into()));
    }
    Ok(())
}

pub fn check_store_name(store: &str) -> Result<(), StoreError> {
    if store.is_empty() || store.len() > MAX_STORE_NAME {
        return Err(StoreError::InvalidName(format!("store name must be 1..={MAX_STORE_NAME} bytes")));
    }
    if store.chars().any(char::is_control) {
        return Err(StoreError::InvalidName("names may not contain control characters".into()));
    }
    Ok(())
}

/// A write's condition on the key's current revision (HTTP `If-Match` / `If-None-Match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Unconditional.
    Any,
    /// The key is at this revision (0: the key does not exist).
    Revision(u64),
    /// The key exists, at whatever revision (`If-Match: *`).
    Exists,
    /// The key does not exist (`If-None-Match: *`).
    Absent,
}

impl Precondition {
    /// The `if_revision` of a single write (`None` inside: unconditional), or `None` for
    /// `Exists`, which no single revision expresses.
    fn revision(self) -> Option<Option<u64>> {
        match self {
            Precondition::Any => Some(None),
            Precondition::Revision(r) => Some(Some(r)),
            Precondition::Absent => Some(Some(0)),
            Precondition::Exists => None,
        }
    }
}

/// How often the leader looks for keys past their expiry (`expire_keys`).
const EXPIRE_EVERY: Duration = Duration::from_millis(250);
/// `Command::ExpireDue` (or `Expire`) entries one look proposes at most (each removes up to
/// `EXPIRE_BATCH`).
const EXPIRE_ROUNDS: usize = 16;

/// The time key expiry is stamped and judged in: this node's clock, read in most members' time
/// once it is surely more than `clock::MAX_OFFSET` (1 s) off theirs (`clock_correction_ms`).
/// A writer whose clock ran behind gave its keys that much less (a lock taken with a TTL
/// through it was removed early, while its holder still counted on it), and a leader whose
/// clock ran ahead removed every key early by its lead.
pub fn cluster_now_ms(replica: &Replica) -> u64 {
    let by = replica.net.clock_correction_ms(crate::peer::clock::MAX_OFFSET);
    metrics::gauge!("raftbridge_expiry_clock_correction_seconds").set(by as f64 / 1000.0);
    crate::broker::now_ms().saturating_add_signed(by)
}

/// Removes the keys past their expiry (`Command::PutExpiring`) while this node leads: each
/// look proposes `Command::ExpireDue` (`Expire` while a member's build lacks it), judged in most members' time (`cluster_now_ms`), while the
/// earliest expiry has passed, and again while more are due. On the leader only, so that the
/// keys go in one order, by one clock; a leader change leaves what is due to the next one.
pub async fn expire_keys(store: StateStore, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = crate::supervise::Ticker::new(EXPIRE_EVERY, &shutdown);
    while tick.next().await {
        let (_, expiring) = store.sm.next_expiry();
        metrics::gauge!("raftbridge_state_keys_expiring").set(expiring as f64);
        for _ in 0..EXPIRE_ROUNDS {
            let (next, _) = store.sm.next_expiry();
            let Some(next) = next.filter(|_| store.replica.leader() == Some(store.replica.id())) else { break };
            let now = cluster_now_ms(&store.replica);
            if next > now {
                break;
            }
            // Every member must decode it (a member down since this node started, or of an
            // older build, holds expiry back: README, "Keys that expire").
            if !store.replica.members_have(crate::peer::frame::features::KEY_TTL) {
                break;
            }
            // Names of about half an entry at most: an entry over the smallest member's frame
            // is refused, and the same earliest keys would be named again at every look.
            let max_bytes = crate::raft::state_machine::EXPIRE_BYTES.min(crate::raft::entry_limit(store.replica.net.cluster_frame()) / 2);
            let keys = store.sm.due_keys(now, max_bytes);
            if keys.is_empty() {
                break;
            }
            // By expiry once every member applies it: an increment keeps a key's expiry but
            // moves its revision, and a key incremented all the time outran every `Expire`.
            let command = if store.replica.members_have(crate::peer::frame::features::EXPIRE_DUE) {
                Command::ExpireDue { keys: keys.into_iter().map(|(s, k, _)| (s, k)).collect(), now_ms: now }
            } else {
                Command::Expire { keys }
            };
            match store.replica.write(command, store.timeout).await {
                Ok(_) => metrics::counter!("raftbridge_state_expire_entries_total").increment(1),
                Err(e) => {
                    tracing::warn!(cause = %e, "could not remove expired keys; will retry");
                    break;
                }
            }
        }
    }
}

/// How often at most a long poll judges its store again while it keeps changing.
const RECHECK_EVERY: Duration = Duration::from_millis(20);

/// Compare-and-set rounds an `Exists` write makes at most when the key keeps changing under it.
const EXISTS_ROUNDS: usize = 16;

impl StateStore {
    pub fn new(replica: Replica, sm: Arc<SmShared>, timeout: Duration, max_value: usize, quota: (u64, u64)) -> StateStore {
        StateStore { replica, sm, timeout, max_value, quota, space: Space::State, sealer: None, tags: Arc::default() }
    }

    /// Turns the secret store on, with the key derived from the cluster secret.
    pub fn with_sealer(mut self, sealer: Option<Arc<secret::Sealer>>) -> StateStore {
        self.sealer = sealer;
        self
    }

    /// The secret store beside this one.
    pub fn secrets(&self) -> secret::SecretStore {
        secret::SecretStore::new(self, self.sealer.clone(), self.max_value)
    }

    /// The same store in another space (the config or the secret store).
    pub fn in_space(&self, space: Space) -> StateStore {
        StateStore { space, ..self.clone() }
    }

    pub fn space(&self) -> Space {
        self.space
    }

    /// `store` as the state machine names it in this store's space.
    fn inner(&self, store: &str) -> String {
        format!("{}{store}", self.space.prefix())
    }

    /// Refuses a write of `value_len` bytes to `store/key` that would take the store past its
    /// quota; a write that adds nothing (an overwrite no larger than before) always passes, so a
    /// full store can still be changed and emptied.
    fn check_quota(&self, store: &str, key: &str, value_len: usize) -> Result<(), StoreError> {
        let store = &self.inner(store);
        let (keys, bytes, old_len) = self.sm.stores_usage(store, key);
        let (max_keys, max_bytes) = self.quota;
        let old = old_len.map(|len| entry_weight(store, key, len));
        let new = entry_weight(store, key, value_len);
        if old.is_none() && keys >= max_keys {
            return Err(StoreError::QuotaExceeded(format!(
                "the state, config and secret stores hold {keys} keys together, their limit (--state-max-keys)"
            )));
        }
        if new > old.unwrap_or(0) && bytes.saturating_sub(old.unwrap_or(0)) + new > max_bytes {
            return Err(StoreError::QuotaExceeded(format!(
                "the state, config and secret stores hold {bytes} of their {max_bytes} bytes together (--state-max-bytes); this write needs {new}"
            )));
        }
        Ok(())
    }

    /// When `store/key` at `revision` expires (Unix ms), by this node's copy, if it does.
    pub fn expires_at(&self, store: &str, key: &str, revision: u64) -> Option<u64> {
        self.sm.expires_at(&self.inner(store), key, revision)
    }

    /// `expires_at` of each (key, revision) of `store`, under one look at this node's copy.
    pub fn expiries_of<'a>(&self, store: &str, keys: impl Iterator<Item = (&'a str, u64)>) -> Vec<Option<u64>> {
        self.sm.expiries_of(&self.inner(store), keys)
    }

    pub async fn get(&self, store: &str, key: &str, consistency: Consistency) -> Result<Option<Versioned>, StoreError> {
        check_names(store, key)?;
        if consistency == Consistency::Linearizable {
            self.replica.read_barrier(self.timeout).await?;
        }
        Ok(self.sm.get(&self.inner(store), key))
    }

    /// One page of the keys of `store` under `prefix` (see `list_map`).
    pub async fn list(&self, store: &str, prefix: &str, after: Option<&str>, limit: usize, max_bytes: usize, consistency: Consistency) -> Result<Listing, StoreError> {
        check_store_name(store)?;
        if consistency == Consistency::Linearizable {
            self.replica.read_barrier(self.timeout).await?;
        }
        Ok(self.page(store, self.sm.store_map(&self.inner(store)).as_ref(), prefix, after, limit, max_bytes))
    }

    /// The tag of `map`'s keys under `prefix`, `map` being this space's `store` (see `TagCache`).
    pub fn tag_of(&self, store: &str, map: Option<&imbl::OrdMap<String, Versioned>>, prefix: &str) -> ListTag {
        self.tags.tag(&self.inner(store), prefix, map, self.sm.installs())
    }

    /// One page of `map`, this space's `store` (see `list_map`), its tag from the cache.
    pub fn page(&self, store: &str, map: Option<&imbl::OrdMap<String, Versioned>>, prefix: &str, after: Option<&str>, limit: usize, max_bytes: usize) -> Listing {
        list_page(map, prefix, after, limit, max_bytes, self.tag_of(store, map, prefix))
    }

    /// Waits for a linearizable read's barrier (or not, for `Stale`): what a long poll does
    /// once before it reads the local copy.
    pub async fn barrier(&self, consistency: Consistency) -> Result<(), StoreError> {
        if consistency == Consistency::Linearizable {
            self.replica.read_barrier(self.timeout).await?;
        }
        Ok(())
    }

    /// The keys of `store` as this node holds them now.
    pub fn map(&self, store: &str) -> Result<Option<imbl::OrdMap<String, Versioned>>, StoreError> {
        check_store_name(store)?;
        Ok(self.sm.store_map(&self.inner(store)))
    }

    /// Waits while `unchanged` holds of the store's keys, at most `wait` or until `stop` is
    /// cancelled (a drain); returns the keys as they are then (changed or not). `unchanged`
    /// looks only at keys that start with `within` (the listing's prefix, or the key): a store
    /// that did not change since the last look is passed over by a pointer compare, and one
    /// whose changes are all outside `within` by comparing the changes alone
    /// (`changed_within`), not by judging its keys again.
    pub async fn wait_changed<F>(
        &self,
        store: &str,
        within: &str,
        unchanged: F,
        wait: Duration,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<imbl::OrdMap<String, Versioned>>, StoreError>
    where
        F: Fn(Option<&imbl::OrdMap<String, Versioned>>) -> bool,
    {
        check_store_name(store)?;
        let name = self.inner(store);
        let mut changes = self.sm.watch_stores();
        let mut map = self.sm.store_map(&name);
        let deadline = tokio::time::Instant::now() + wait;
        // When the store was last judged: a store written faster than `RECHECK_EVERY` is judged
        // that often, not at every write (a listing's judgement scans the keys under its prefix).
        let mut judged = tokio::time::Instant::now();
        let same = |a: &Option<imbl::OrdMap<String, Versioned>>, b: &Option<imbl::OrdMap<String, Versioned>>| match (a, b) {
            (Some(a), Some(b)) => a.ptr_eq(b),
            (None, None) => true,
            _ => false,
        };
        // Bounded by the deadline: each pass waits for a change, the deadline or the stop, and
        // judges the keys again only when the store's map is another.
        'waiting: while unchanged(map.as_ref()) {
            loop {
                tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() {
                            break 'waiting;
                        }
                    }
                    () = tokio::time::sleep_until(deadline) => break 'waiting,
                    () = stop.cancelled() => break 'waiting,
                }
                let next = (judged + RECHECK_EVERY).min(deadline);
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    () = stop.cancelled() => {}
                }
                judged = tokio::time::Instant::now();
                let now = self.sm.store_map(&name);
                if !same(&map, &now) {
                    // A listing's judgement scans every key under its prefix: writes elsewhere in
                    // its store, which wake every poll on it, made each poll rescan 50 times a
                    // second, and a few hundred polls on a large prefix starved the node.
                    let touched = changed_within(map.as_ref(), now.as_ref(), within);
                    map = now;
                    if touched {
                        continue 'waiting;
                    }
                }
            }
        }
        // As the store is now, not as last judged: at the deadline or the stop the answer is
        // made from this, and a change since the last look (one whose wake-up was missed, or
        // that came within `RECHECK_EVERY`) belongs in it.
        Ok(self.sm.store_map(&name))
    }

    /// Set a key to a JSON value; returns the new revision.
    pub async fn put(&self, store: &str, key: &str, value: &[u8], if_revision: Option<u64>) -> Result<u64, StoreError> {
        self.put_tagged(store, key, value, if_revision, None).await
    }

    /// `put`, applied at most once per `tag` (a handler's write under an idempotency key).
    pub async fn put_tagged(
        &self,
        store: &str,
        key: &str,
        value: &[u8],
        if_revision: Option<u64>,
        tag: WriteTag,
    ) -> Result<u64, StoreError> {
        self.write_put(store, key, value, if_revision, tag, None).await
    }

    /// `put_if` of a key that expires `ttl` from now (`Command::PutExpiring`): the leader
    /// removes it then (`expire_keys`), within a second or so; until that removal commits, reads
    /// still see it, as etcd's keys stay until their lease's revocation commits. A later put
    /// without a TTL, or a delete, ends the expiry; an increment keeps it.
    pub async fn put_expiring_if(&self, store: &str, key: &str, value: &[u8], pre: Precondition, ttl: Duration) -> Result<u64, StoreError> {
        match pre.revision() {
            Some(expected) => self.write_put(store, key, value, expected, None, Some(ttl)).await,
            None => self.while_exists(store, key, |rev| self.write_put(store, key, value, Some(rev), None, Some(ttl))).await,
        }
    }

    /// `put_tagged` of a key that expires `ttl` from now (see `put_expiring_if`); untagged
    /// while a member cannot apply `Command::Tagged` (`tag`).
    pub async fn put_expiring_tagged(&self, store: &str, key: &str, value: &[u8], ttl: Duration, tag: WriteTag) -> Result<u64, StoreError> {
        self.write_put(store, key, value, None, tag, Some(ttl)).await
    }

    /// A put, with an expiry `ttl` from now when given.
    async fn write_put(&self, store: &str, key: &str, value: &[u8], if_revision: Option<u64>, tag: WriteTag, ttl: Option<Duration>) -> Result<u64, StoreError> {
        check_names(store, key)?;
        if value.len() > self.max_value {
            return Err(StoreError::TooLarge { bytes: value.len(), limit: self.max_value });
        }
        check_json(value)?;
        self.check_quota(store, key, value.len())?;
        let cmd = match ttl {
            None => Command::Put { store: self.inner(store), key: key.into(), value: value.to_vec(), if_revision, tag },
            Some(ttl) => {
                self.every_member_applies(crate::peer::frame::features::KEY_TTL, "without key expiry", "a write with a TTL")?;
                let expires_ms = cluster_now_ms(&self.replica).saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
                let put = Command::PutExpiring { store: self.inner(store), key: key.into(), value: value.to_vec(), if_revision, expires_ms };
                self.tag(put, tag)
            }
        };
        match self.replica.write(cmd, self.timeout).await?.1 {
            CommandResult::Written { revision } => Ok(revision),
            CommandResult::PreconditionFailed { current } => Err(StoreError::PreconditionFailed { current }),
            other => Err(StoreError::Unexpected(other)),
        }
    }

    /// `put` under a precondition. `Exists` is a compare-and-set on the revision the key has
    /// (the replicated rule knows revisions, and "absent" as revision 0), repeated while the key
    /// changes under it: the write applies only while the key exists, and a key that changes
    /// faster than `EXISTS_ROUNDS` rounds is a 503, not a false 412.
    pub async fn put_if(&self, store: &str, key: &str, value: &[u8], pre: Precondition) -> Result<u64, StoreError> {
        match pre.revision() {
            Some(expected) => self.put(store, key, value, expected).await,
            None => self.while_exists(store, key, |rev| self.put(store, key, value, Some(rev))).await,
        }
    }

    /// `delete` under a precondition (see `put_if`); `Exists` on an absent key is a 412.
    pub async fn delete_if(&self, store: &str, key: &str, pre: Precondition) -> Result<bool, StoreError> {
        match pre.revision() {
            Some(expected) => self.delete(store, key, expected).await,
            None => self.while_exists(store, key, |rev| self.delete(store, key, Some(rev))).await,
        }
    }

    /// Runs `write` as a compare-and-set on the key's current revision, again with the newer
    /// revision while another writer moves it on (at most `EXISTS_ROUNDS` rounds, then a 503);
    /// a key that is absent, or becomes absent, is a 412.
    async fn while_exists<T, W, F>(&self, store: &str, key: &str, mut write: W) -> Result<T, StoreError>
    where
        W: FnMut(u64) -> F,
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut rev = self.existing_revision(store, key).await?;
        for _ in 0..EXISTS_ROUNDS {
            match write(rev).await {
                Err(StoreError::PreconditionFailed { current: Some(now) }) => rev = now,
                other => return other,
            }
        }
        Err(StoreError::Replica(crate::raft::ReplicaError::Unavailable))
    }

    /// The key's revision to start an `Exists` compare-and-set from: this node's copy, or a
    /// linearizable read when the copy has none (it may lag); absent there too is a 412.
    async fn existing_revision(&self, store: &str, key: &str) -> Result<u64, StoreError> {
        check_names(store, key)?;
        if let Some(v) = self.sm.get(&self.inner(store), key) {
            return Ok(v.revision);
        }
        match self.get(store, key, Consistency::Linearizable).await? {
            Some(v) => Ok(v.revision),
            None => Err(StoreError::PreconditionFailed { current: None }),
        }
    }

    /// Atomically add `by` to an integer key; returns the new value.
    pub async fn increment(&self, store: &str, key: &str, by: i64, tag: WriteTag) -> Result<i64, StoreError> {
        check_names(store, key)?;
        // The new value's length as this node's copy predicts it (an increment of an existing
        // counter in a full store adds a byte at most, and often nothing), else the most an i64
        // takes in text, 20 bytes.
        let current = self.sm.get(&self.inner(store), key).and_then(|v| std::str::from_utf8(&v.value).ok()?.trim().parse::<i64>().ok());
        // Judged on this node's copy: apply saturates, and a counter at the bound reported
        // success while its update was lost. Best effort: a copy that lags, or increments that
        // race, still saturate (a check in apply needs a command older builds cannot decode).
        if let Some(n) = current.filter(|n| n.checked_add(by).is_none()) {
            return Err(StoreError::Overflow(format!("{store}/{key} is {n}: adding {by} overflows a 64-bit integer")));
        }
        self.check_quota(store, key, current.map_or(20, |n| n.saturating_add(by).to_string().len()))?;
        let cmd = Command::Increment { store: self.inner(store), key: key.into(), by, tag };
        match self.replica.write(cmd, self.timeout).await?.1 {
            CommandResult::Incremented { value, .. } => Ok(value),
            CommandResult::NotANumber => Err(StoreError::InvalidJson(format!("{store}/{key} is not an integer"))),
            other => Err(StoreError::Unexpected(other)),
        }
    }

    /// Commit any other state-machine command (registry, idempotency records).
    pub async fn command(&self, cmd: Command, timeout: Duration) -> Result<CommandResult, StoreError> {
        Ok(self.replica.write(cmd, timeout).await?.1)
    }

    pub fn local(&self) -> &Arc<SmShared> {
        &self.sm
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// Remove a key; returns whether it existed.
    pub async fn delete(&self, store: &str, key: &str, if_revision: Option<u64>) -> Result<bool, StoreError> {
        self.delete_tagged(store, key, if_revision, None).await
    }

    /// `delete`, applied at most once per `tag` (a handler's delete under an idempotency key)
    /// once every member can apply `Command::Tagged` (`tag`).
    pub async fn delete_tagged(&self, store: &str, key: &str, if_revision: Option<u64>, tag: WriteTag) -> Result<bool, StoreError> {
        check_names(store, key)?;
        let cmd = self.tag(Command::Delete { store: self.inner(store), key: key.into(), if_revision }, tag);
        match self.replica.write(cmd, self.timeout).await?.1 {
            CommandResult::Deleted { existed } => Ok(existed),
            CommandResult::PreconditionFailed { current } => Err(StoreError::PreconditionFailed { current }),
            other => Err(StoreError::Unexpected(other)),
        }
    }

    /// `command` under `tag` (`Command::Tagged`), for the commands that carry no tag of their
    /// own, once every member can apply that; untagged until then, as older builds wrote (a
    /// re-run applies it again), rather than failing handlers while a cluster is upgraded: a
    /// subscription handler always runs under a tag, and its events would be retried into the
    /// dead letters.
    fn tag(&self, command: Command, tag: WriteTag) -> Command {
        match tag {
            Some(tag) if self.replica.members_have(crate::peer::frame::features::TAGGED) => Command::Tagged { tag, command: Box::new(command) },
            _ => command,
        }
    }

    /// Writes `ops` to keys of `store`, all or none, under one revision (`Command::Txn`), which
    /// it returns; the first op whose precondition fails fails the whole (`TxnFailed`, a 412
    /// or a handler's 409) and nothing is written. At most `MAX_TXN_OPS` ops, each key once,
    /// values JSON, all the values and keys together within one write's bound (`--max-body`),
    /// and the quota judged for what they add together. Not for secrets: each secret value is
    /// sealed for its key on its own. A 503 while a member runs a build without transactions.
    pub async fn transaction(&self, store: &str, ops: Vec<TxnOp>, tag: WriteTag) -> Result<u64, StoreError> {
        if self.space == Space::Secrets {
            return Err(StoreError::InvalidTxn("transactions are for the state and config stores (a secret is sealed for its key, one write at a time)".into()));
        }
        check_store_name(store)?;
        if ops.is_empty() || ops.len() > MAX_TXN_OPS {
            return Err(StoreError::InvalidTxn(format!("a transaction takes 1 to {MAX_TXN_OPS} operations, not {}", ops.len())));
        }
        let inner = self.inner(store);
        let mut seen = std::collections::HashSet::with_capacity(ops.len());
        // What the ops add to the quota's keys and bytes together (a delete of a key that is
        // there frees its share), judged as one write is: only what adds is refused.
        let (mut size, mut key_delta, mut byte_delta) = (0usize, 0i64, 0i64);
        let (mut keys, mut bytes) = (0, 0);
        let weight = |key: &str, len: usize| i64::try_from(entry_weight(&inner, key, len)).unwrap_or(i64::MAX);
        for (i, op) in ops.iter().enumerate() {
            check_names(store, op.key())?;
            if !seen.insert(op.key()) {
                return Err(StoreError::InvalidTxn(format!("operation {i} names key {:?} again: a transaction writes each key once", op.key())));
            }
            size += op.key().len();
            let old;
            (keys, bytes, old) = self.sm.stores_usage(&inner, op.key());
            match op {
                TxnOp::Put { key, value, .. } => {
                    check_json(value)?;
                    size += value.len();
                    key_delta += i64::from(old.is_none());
                    byte_delta += weight(key, value.len()) - old.map_or(0, |len| weight(key, len));
                }
                TxnOp::Delete { key, .. } => {
                    key_delta -= i64::from(old.is_some());
                    byte_delta -= old.map_or(0, |len| weight(key, len));
                }
                TxnOp::Check { .. } => {}
            }
        }
        if size > self.max_value {
            return Err(StoreError::TooLarge { bytes: size, limit: self.max_value });
        }
        let (max_keys, max_bytes) = self.quota;
        if key_delta > 0 && keys.saturating_add(key_delta.unsigned_abs()) > max_keys {
            return Err(StoreError::QuotaExceeded(format!(
                "the state, config and secret stores hold {keys} keys together and this transaction adds {key_delta}: over their limit (--state-max-keys)"
            )));
        }
        if byte_delta > 0 && bytes.saturating_add(byte_delta.unsigned_abs()) > max_bytes {
            return Err(StoreError::QuotaExceeded(format!(
                "the state, config and secret stores hold {bytes} of their {max_bytes} bytes together (--state-max-bytes); this transaction adds {byte_delta}"
            )));
        }
        self.every_member_applies(crate::peer::frame::features::TXN, "without transactions", "a transaction")?;
        let names: Vec<String> = ops.iter().map(|op| op.key().to_string()).collect();
        let cmd = self.tag(Command::Txn { store: inner, ops }, tag);
        match self.replica.write(cmd, self.timeout).await?.1 {
            CommandResult::Written { revision } => Ok(revision),
            CommandResult::TxnFailed { op, current } => {
                let key = names.get(op as usize).cloned().unwrap_or_default();
                Err(StoreError::TxnFailed { op, key, current })
            }
            other => Err(StoreError::Unexpected(other)),
        }
    }

    /// Ok when every member is known to apply `feature`; else `NotEveryMember` naming those not
    /// known to ("a member runs a build {lacks} ...: {write} waits until every member runs
    /// one"): an older build could not decode the entry and would stall behind it.
    fn every_member_applies(&self, feature: u64, lacks: &str, write: &str) -> Result<(), StoreError> {
        if self.replica.members_have(feature) {
            return Ok(());
        }
        let lacking = self.replica.members_lacking(feature);
        Err(StoreError::NotEveryMember(format!(
            "a member runs a build {lacks} (or is not linked to this node yet: members {lacking:?}, see each one's features in /cluster): {write} waits until every member runs one"
        )))
    }

    /// Moves a shared subscription's cursor to `position` (`Command::SeekSubscription`): the
    /// cursor it got (clamped to the retained log), or `None` with whether the subscription is
    /// shared (`true`: there is none). 503 while a member's build cannot apply it.
    pub async fn seek_subscription(&self, name: &str, position: u64) -> Result<(Option<u64>, bool), StoreError> {
        self.every_member_applies(crate::peer::frame::features::SUB_SEEK, "that cannot move a subscription's cursor", "a seek")?;
        let cmd = Command::SeekSubscription { name: name.into(), position };
        match self.replica.write(cmd, self.timeout).await?.1 {
            CommandResult::SubscriptionSought { cursor, shared } => Ok((cursor, shared)),
            other => Err(StoreError::Unexpected(other)),
        }
    }

    /// Forget subscription `name` and its progress (`Command::DropSubscription`): whether there
    /// was one, and the registered nodes that still declare it (then nothing was dropped).
    pub async fn drop_subscription(&self, name: &str) -> Result<(bool, Vec<crate::raft::types::NodeId>), StoreError> {
        let cmd = Command::DropSubscription { name: name.into() };
        match self.replica.write(cmd, self.timeout).await?.1 {
            CommandResult::SubscriptionDropped { existed, declared_by } => Ok((existed, declared_by)),
            other => Err(StoreError::Unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lost compare-and-set says the current revision in words, not as Rust's `Some(..)`.
    #[test]
    fn a_failed_precondition_says_the_current_revision() {
        assert_eq!(StoreError::PreconditionFailed { current: Some(35) }.to_string(), "revision mismatch (current: revision 35)");
        assert_eq!(StoreError::PreconditionFailed { current: None }.to_string(), "revision mismatch (current: absent)");
    }

    /// A long poll is judged again only for changes under its prefix (or its key), found by
    /// comparing the two maps' changes: writes elsewhere in a large store do not make it scan.
    #[test]
    fn only_changes_under_the_prefix_count_for_a_long_poll() {
        let v = |revision| Versioned { value: b"1".to_vec(), revision };
        let mut before = imbl::OrdMap::new();
        for i in 0..50_000u64 {
            before.insert(format!("k/{i:06}"), v(i + 1));
            before.insert(format!("z/{i:06}"), v(i + 1));
        }
        let mut elsewhere = before.clone();
        elsewhere.insert("z/new".into(), v(100_001));
        elsewhere.insert("z/000007".into(), v(100_002));
        elsewhere.remove("z/000008");
        elsewhere.insert("k".into(), v(100_003));
        assert!(!changed_within(Some(&before), Some(&elsewhere), "k/"), "nothing under k/ changed");
        assert!(changed_within(Some(&before), Some(&elsewhere), "z/"));
        assert!(changed_within(Some(&before), Some(&elsewhere), "k"), "`k` itself is under `k`");
        assert!(changed_within(Some(&before), Some(&elsewhere), ""), "the whole store");
        let mut updated = before.clone();
        updated.insert("k/000009".into(), v(100_004));
        assert!(changed_within(Some(&before), Some(&updated), "k/"));
        assert!(changed_within(Some(&before), Some(&updated), "k/000009"), "a key poll's own key");
        assert!(!changed_within(Some(&before), Some(&updated), "k/000010"));
        let mut removed = before.clone();
        removed.remove("k/049999");
        assert!(changed_within(Some(&before), Some(&removed), "k/"));
        assert!(!changed_within(Some(&before), Some(&before.clone()), ""), "the same map");
        assert!(changed_within(None, Some(&before), "k/") && changed_within(Some(&before), None, "z/0"), "a store that came or went");
        assert!(!changed_within(None, Some(&before), "y/") && !changed_within(None, None, ""));
    }

    /// Pages read from where they start list every key under the prefix once, in order, with
    /// the whole prefix's tag on each; the tag cache answers a map it saw with its walk, and a
    /// changed map with a new one, and keeps at most `TAG_CACHE` entries.
    #[test]
    fn pages_and_cached_tags_of_a_prefix() {
        let v = |revision: u64| Versioned { value: format!("{revision}").into_bytes(), revision };
        let mut map = imbl::OrdMap::new();
        for i in 0..1_000u64 {
            map.insert(format!("a/{i:04}"), v(i + 1));
            map.insert(format!("b/{i:04}"), v(5_000 + i));
        }
        map.insert("a".into(), v(9_999));
        let whole = list_tag(Some(&map), "a/");
        assert_eq!(whole, ListTag { max_revision: 1_000, keys: 1_000 });
        let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let page = list_map(Some(&map), "a/", after.as_deref(), 64, usize::MAX);
            assert_eq!(page.tag, whole, "every page carries the prefix's tag");
            seen.extend(page.items.iter().map(|(k, _)| k.clone()));
            pages += 1;
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let expected: Vec<String> = (0..1_000).map(|i| format!("a/{i:04}")).collect();
        assert_eq!((seen, pages), (expected, 16));
        let small = list_map(Some(&map), "a/", Some("a/0997"), 10, 12);
        assert_eq!(small.items.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a/0998"], "about max_bytes, at least one");
        assert_eq!(small.next.as_deref(), Some("a/0998"));
        assert!(list_map(Some(&map), "a/", Some("a/0999"), 10, usize::MAX).items.is_empty());
        assert_eq!(list_map(Some(&map), "b/", Some("a/0500"), 1, usize::MAX).items[0].0, "b/0000", "an `after` before the prefix");

        let cache = TagCache::default();
        assert_eq!(cache.tag("s", "a/", Some(&map), 0), whole);
        assert_eq!(cache.tag("s", "a/", Some(&map), 0), whole);
        let mut changed = map.clone();
        changed.insert("a/5000".into(), v(20_000));
        assert_eq!(cache.tag("s", "a/", Some(&changed), 0), ListTag { max_revision: 20_000, keys: 1_001 });
        assert_eq!(cache.tag("t", "a/", Some(&changed), 0), ListTag { max_revision: 20_000, keys: 1_001 });
        assert_eq!(cache.tag("s", "b/", Some(&changed), 0), list_tag(Some(&changed), "b/"));
        for i in 0..100 {
            cache.tag("s", &format!("a/00{i:02}"), Some(&map), 0);
        }
        assert_eq!(cache.0.lock().unwrap().len(), TAG_CACHE);
        assert_eq!(cache.tag("s", "x/", None, 0), ListTag { max_revision: 0, keys: 0 });
    }

    /// A listing's tag moved by the changes since a cached one is the tag a walk gives, through
    /// adds, updates and removes under and beside the prefix, the removal of the key with the
    /// largest revision, a prefix emptied and a diff too long to follow.
    #[test]
    fn a_tag_moved_by_the_changes_is_the_walked_tag() {
        let v = |revision: u64| Versioned { value: b"1".to_vec(), revision };
        let mut rng = fastrand::Rng::with_seed(45);
        let mut map: imbl::OrdMap<String, Versioned> = imbl::OrdMap::new();
        let mut revision = 0u64;
        let cache = TagCache::default();
        let (mut moved, mut walked) = (0, 0);
        for round in 0..400 {
            let before = map.clone();
            // A few changes a round, a burst past `TAG_DIFF_MAX` now and then.
            let changes = if round % 97 == 0 { TAG_DIFF_MAX + 10 } else { rng.usize(1..6) };
            for _ in 0..changes {
                let key = format!("{}/{}", ["a", "b", "ab"][rng.usize(0..3)], rng.u32(0..300));
                revision += 1;
                if rng.u8(0..3) == 0 {
                    map.remove(&key);
                } else {
                    map.insert(key, v(revision));
                }
            }
            if round % 50 == 0 {
                // The largest revision under `a/` goes.
                if let Some(top) = map.iter().filter(|(k, _)| k.starts_with("a/")).max_by_key(|(_, v)| v.revision).map(|(k, _)| k.clone()) {
                    map.remove(&top);
                }
            }
            if round == 200 {
                let under: Vec<String> = map.keys().filter(|k| k.starts_with("a/")).cloned().collect();
                for key in under {
                    map.remove(&key);
                }
            }
            for prefix in ["a/", "a", "b/", "c/"] {
                let base = list_tag(Some(&before), prefix);
                match tag_moved(&before, &map, prefix, base) {
                    Some(tag) => {
                        moved += 1;
                        assert_eq!(tag, list_tag(Some(&map), prefix), "round {round}, prefix {prefix}");
                    }
                    None => walked += 1,
                }
                assert_eq!(cache.tag("s", prefix, Some(&map), round / 100), list_tag(Some(&map), prefix), "cached, round {round}, prefix {prefix}");
            }
        }
        assert!(moved > 1_000 && walked > 8, "both ways taken: {moved} moved, {walked} walked");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_names("default", "k").is_ok());
        assert!(check_names("", "k").is_err());
        assert!(check_names("s", "").is_err());
        assert!(check_names("s", &"x".repeat(MAX_KEY + 1)).is_err());
        assert!(check_names("s", "a\nb").is_err());
    }

    #[test]
    fn values_must_be_json_that_can_be_served_back() {
        assert!(check_json(br#"{"a":[1,"\u00e9"]}"#).is_ok());
        assert!(check_json(b"{").is_err());
        // Invalid UTF-8 and a lone surrogate inside a string pass a syntax-only check.
        assert!(check_json(b"\"\xff\"").is_err());
        assert!(check_json(br#""\ud800""#).is_err());
    }
}
