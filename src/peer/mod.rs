//! Peer links: one long-lived, multiplexed, framed TCP connection per peer pair.
//!
//! Raft RPCs, forwarded client operations and cluster management all travel on the same link, each
//! request tagged with a correlation id so many can be in flight at once (no head-of-line wait for
//! a slow request, and one TCP connection's congestion window and batching for everything).
//!
//! Why it is built this way:
//! - *One link per pair.* Either side may dial (a new node only knows seed addresses). When both
//!   dial at once, both sides keep the connection dialed by the lower node id, so they converge on
//!   the same one without a round trip. A changed `incarnation` in the handshake means the peer
//!   restarted, and its new connection always replaces the old one.
//! - *Bounds everywhere.* Frames are capped by the codec, each of a link's two send lanes (Raft's,
//!   written first, and the rest) is a bounded channel with a byte budget (senders wait:
//!   backpressure), in-flight requests per link are capped by a semaphore and
//!   so are concurrently served requests. Garbage, a bad handshake or an oversized frame closes
//!   that connection only.
//! - *Liveness from the links.* Each link pings every 500 ms; a link silent for `idle_timeout` is
//!   closed. `reachable(id)` is what `/cluster` and routing use — not Raft writes.
//! - *Reconnect with exponential backoff and jitter*, per address, so a dead peer costs a dial
//!   every few seconds at most, and a restarted one is found again quickly.

pub mod clock;
pub mod frame;
pub mod message;
pub mod tls;

use std::collections::HashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use futures_util::SinkExt;
use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio_util::codec::FramedRead;
use tokio_util::codec::FramedWrite;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use tracing::info;
use tracing::warn;

use self::frame::Frame;
use self::frame::Hello;
use self::frame::Kind;
use self::message::PeerRequest;
use self::message::PeerResponse;
use crate::lock;
use crate::raft::types::NodeId;

/// A link's frames, read from and written to plain TCP or TLS (`tls`).
type Reader = FramedRead<tls::ReadHalf, tokio_util::codec::LengthDelimitedCodec>;
type Writer = FramedWrite<tls::WriteHalf, tokio_util::codec::LengthDelimitedCodec>;

/// Frames waiting to be written in one link's bulk lane (`Lane`).
const SEND_QUEUE: usize = 4096;
/// Bytes of frames waiting to be written in one lane of a link (queued, or in the writer's buffer until
/// its flush), or four whole frames where that is more (`queue_budget`: a forwarded write batch
/// takes room for a whole frame before it is made, which then never waits for an empty queue). Requests wait for
/// room until their deadline and are then not sent; answers wait while their serving slots
/// hold (the peer is answered `NotServed` meanwhile). Counting frames alone let a peer that
/// reads slowly have `SEND_QUEUE` frames of up to `--max-frame` each held for it. Each of a
/// link's two lanes has this budget: twice it per link at most.
#[cfg(not(test))]
const SEND_QUEUE_BYTES: usize = 64 << 20;
#[cfg(test)]
const SEND_QUEUE_BYTES: usize = 2 << 20;

/// The byte budget of a link's send queue for frames of at most `max_frame` bytes.
fn queue_budget(max_frame: usize) -> usize {
    SEND_QUEUE_BYTES.max(4 * max_frame)
}

/// Frames waiting in a link's Raft lane (`Link::raft`): Raft's requests are bounded by their
/// places (`MAX_RAFT_OUTSTANDING`), its answers by `MAX_RAFT_SERVING` and `MAX_APPENDING`,
/// pings and pongs by the upkeep's pace.
const RAFT_SEND_QUEUE: usize = 1024;

/// One of a link's two send queues, each with its own byte budget (`queue_budget`). The
/// writer takes what the Raft lane holds before anything of the bulk lane: heartbeats, votes,
/// appends and their answers, and pings, used to wait in one queue behind up to 64 MiB of
/// deliveries, forwarded calls and writes (half a second at 1 Gbit/s, past the election
/// timeout), and behind a forwarded batch waiting for room for a whole frame, which the
/// budget's semaphore serves first: followers missed heartbeats and called elections under
/// load, and a heartbeat that found no room was `Unreachable`, pausing replication.
struct Lane {
    /// Frames to write. The writer task owns the receiver; it ends when `closed` fires.
    tx: mpsc::Sender<Queued>,
    /// The byte budget of the frames in `tx` and in the writer's buffer, in permits of one
    /// byte. Closed by `Link::close`, so that nothing waits for room on a closed link.
    bytes: Arc<Semaphore>,
}

impl Lane {
    fn new(frames: usize, budget: usize) -> (Lane, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(frames);
        (Lane { tx, bytes: Arc::new(Semaphore::new(budget)) }, rx)
    }
}

/// One frame in a link's send queue with its share of the lane's byte budget
/// (`Lane::bytes`), given back once the writer has flushed it. Pings, Pongs and shed
/// answers take none: a few bytes each, bounded by their lane's frames (`SEND_QUEUE`,
/// `RAFT_SEND_QUEUE`), and never held up.
struct Queued {
    frame: Bytes,
    room: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Queued {
    fn small(frame: Bytes) -> Queued {
        Queued { frame, room: None }
    }
}
/// Requests this node may have outstanding on one link. Not more than the peer serves at once
/// (`MAX_SERVING`), beyond which it answers `NotServed`: callers wait here instead. (A call that
/// times out frees its place here at once, while the peer may still be serving it.)
const MAX_OUTSTANDING: usize = MAX_SERVING;
/// Raft's own requests (appends, votes, snapshot chunks, leader transfers) this node may have
/// outstanding on one link, in places of their own: in `MAX_OUTSTANDING` they waited behind
/// commands and delivery polls, and a flood of slow commands whose clients had gone (each
/// holding its place for its timeout) left a leader's heartbeats and its followers' votes no
/// place within their timeouts: the leader lost its leadership at 7% CPU. A stream pipelines
/// `raft::network::PIPELINE` appends; the peer serves the others `MAX_RAFT_SERVING` at a time.
const MAX_RAFT_OUTSTANDING: usize = MAX_RAFT_SERVING;
/// Requests from one peer this node serves concurrently, Raft's own aside; more are answered
/// `NotServed` without running (`read_loop`).
const MAX_SERVING: usize = 1024;
// Commands leave room on a link for the other requests (`proxy::COMMANDS_PER_PEER`).
const _: () = assert!(crate::proxy::COMMANDS_PER_PEER < MAX_SERVING && crate::proxy::COMMANDS_PER_PEER < MAX_OUTSTANDING);
/// A leader's long polls for the outcomes of delivery batches (`AwaitDelivery`) served at once
/// per link, in slots of their own: each waits until a handler ends, so very many slow handlers
/// would otherwise take the `MAX_SERVING` slots that the leader's commands and deliveries need.
/// More are answered `NotServed`, and the leader asks again shortly (`dispatch::ASK_AGAIN`).
const MAX_AWAITING: usize = 256;
/// Raft requests other than appends (votes, pre-votes, snapshot chunks, leader transfers) from
/// one peer served concurrently: a leader or candidate has a few at most, and they take no
/// `MAX_SERVING` slot (nothing may hold them up behind other work). Appends are bounded by
/// `MAX_APPENDING`. More are answered `NotServed`, which Raft retries.
const MAX_RAFT_SERVING: usize = 64;
/// Appends from one peer served at once, each until its answer is queued: a leader has
/// `raft::network::PIPELINE` in flight and its lanes hold a few more, so this bound is met only
/// by a peer that floods appends in its own name and reads nothing: each was answered at once
/// (a full lane refuses it) and its task then waited for room to queue the answer, as many
/// tasks as the peer sent. More are answered `NotServed`, which Raft retries.
const MAX_APPENDING: usize = 256;
/// Frames written per flush at most (batched writes).
const WRITE_BATCH: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest frame read before a link is up (`Hello`, `HelloAck`, `Auth`, `Reject` are far
/// smaller): the codec reserves a frame's claimed length as soon as it reads the prefix, and a
/// stranger could claim `--max-frame` (16 MiB) per connection before proving anything.
const HANDSHAKE_FRAME: usize = 64 << 10;
/// Peer connections in their handshake at once, at most, and from one address other than
/// loopback: more are closed at once. Each is held up to `HANDSHAKE_TIMEOUT` (per step), so a flood would otherwise pile up
/// tasks and sockets; the bound per address keeps one source from taking every slot, which
/// would shut real peers out.
const MAX_HANDSHAKES: usize = 256;
const MAX_HANDSHAKES_PER_ADDRESS: usize = 8;

/// Handshakes in progress, by the address they come from (`PeerNet::run`).
#[derive(Default)]
struct Handshakes {
    total: usize,
    by_address: HashMap<std::net::IpAddr, usize>,
}

/// One handshake's place in `Handshakes`, given back when dropped.
struct HandshakeSlot {
    all: Arc<Mutex<Handshakes>>,
    from: std::net::IpAddr,
}

impl HandshakeSlot {
    fn take(all: &Arc<Mutex<Handshakes>>, from: std::net::IpAddr) -> Option<HandshakeSlot> {
        let from = source_of(from);
        let mut h = lock(all);
        let mine = h.by_address.get(&from).copied().unwrap_or(0);
        // Loopback is this machine's own nodes (a local cluster, tests), not a remote source.
        if h.total >= MAX_HANDSHAKES || (mine >= MAX_HANDSHAKES_PER_ADDRESS && !from.is_loopback()) {
            return None;
        }
        h.total += 1;
        h.by_address.insert(from, mine + 1);
        Some(HandshakeSlot { all: all.clone(), from })
    }
}

/// This dial's turn at its address (`PeerNet::dialing`): given back when dropped, also when the
/// dial is abandoned (a caller's deadline); the entry goes with the last holder or waiter.
struct DialTurn<'a> {
    net: &'a PeerNet,
    addr: String,
    turn: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<'a> DialTurn<'a> {
    /// Waits for the address's turn, or (`wait` false) gives up at once when another dial has it.
    async fn take(net: &'a PeerNet, addr: &str, wait: bool) -> Option<DialTurn<'a>> {
        let turn = lock(&net.dialing).entry(addr.to_string()).or_default().clone();
        let mut taken = DialTurn { net, addr: addr.to_string(), turn: turn.clone(), guard: None };
        taken.guard = Some(if wait { turn.lock_owned().await } else { turn.try_lock_owned().ok()? });
        Some(taken)
    }
}

impl Drop for DialTurn<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut dialing = lock(&self.net.dialing);
        // Only the map's and this one's: nobody else holds or waits for the address's turn.
        if Arc::strong_count(&self.turn) == 2 && dialing.get(&self.addr).is_some_and(|t| Arc::ptr_eq(t, &self.turn)) {
            dialing.remove(&self.addr);
        }
    }
}

/// The source a handshake is counted against: an IPv4 address as itself (also when a
/// dual-stack listener sees it as `::ffff:a.b.c.d`, so that loopback stays loopback), an IPv6
/// one by its /64, the least any host is given (one host can use every address in it).
fn source_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) if !v6.is_loopback() => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(std::net::Ipv6Addr::from(prefix))
        }
        other => other,
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut h = lock(&self.all);
        h.total = h.total.saturating_sub(1);
        if let Some(n) = h.by_address.get_mut(&self.from) {
            *n -= 1;
            if *n == 0 {
                h.by_address.remove(&self.from);
            }
        }
    }
}
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const PING_INTERVAL: Duration = Duration::from_millis(500);
/// How long a member's link must have been silent (no frame, pings included: four missed)
/// before a process at another address may take its id (`member_answering_elsewhere`).
const MEMBER_SILENT: Duration = Duration::from_millis(2_000);
/// Each peer's clock offset (`check_clock`), NaN once it left the cluster (`forget_peer`).
const CLOCK_GAUGE: &str = "raftbridge_peer_clock_offset_seconds";
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// How often a refusal that repeats at every redial is said at `warn` (the rest at `debug`).
const REFUSAL_LOGGED_EVERY: Duration = Duration::from_secs(10);
/// When a claimant's refusal (`refuse_claimant`) and a refusal of this node's own link were last
/// said at `warn`; process-wide, as the log is.
static CLAIMANT_WARNED: Mutex<Option<Instant>> = Mutex::new(None);
static REFUSED_WARNED: Mutex<Option<Instant>> = Mutex::new(None);

/// True (and `last` set to now) when `last` is unset or at least `every` ago.
pub(crate) fn now_due(last: &Mutex<Option<Instant>>, every: Duration) -> bool {
    let mut last = lock(last);
    let now = Instant::now();
    if last.is_some_and(|t| now.saturating_duration_since(t) < every) {
        return false;
    }
    *last = Some(now);
    true
}

/// Addresses whose failed dials are remembered (their backoff), at most.
const MAX_DIAL_RECORDS: usize = 1024;
/// Resolved seed addresses whose DNS names TLS remembers at most (`set_tls_name`).
const MAX_TLS_NAMES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    #[error("peer {addr}: handshake failed: {reason}")]
    Handshake { addr: String, reason: String },
    #[error("peer {0}: no address known")]
    UnknownPeer(NodeId),
    #[error("peer {addr}: backing off after failed dials")]
    BackingOff { addr: String },
    #[error("peer {addr} is this node")]
    SelfDial { addr: String },
    /// No link could be made within the request's deadline: the request was not sent.
    #[error("peer {peer}: no link within {timeout:?}")]
    NoLinkInTime { peer: String, timeout: Duration },
    #[error("peer {peer}: link closed")]
    Closed { peer: NodeId },
    #[error("peer {peer}: no response within {timeout:?}")]
    Timeout { peer: NodeId, timeout: Duration },
    /// The link had no room for the request within its deadline (its outstanding requests or
    /// its send queue at their bounds): the request was not sent.
    #[error("peer {peer}: no room on the link within {timeout:?}, not sent")]
    Unsent { peer: NodeId, timeout: Duration },
    /// The link was found closed before the request went on it: not sent.
    #[error("peer {peer}: link closed before the request was sent")]
    ClosedUnsent { peer: NodeId },
    #[error("peer {peer}: bad message: {reason}")]
    Protocol { peer: NodeId, reason: String },
    /// The request encodes to more than a frame may hold: not sent (the link's writer would
    /// have refused it and closed the link, failing everything else in flight on it).
    #[error("peer {peer}: a request of {size} bytes is over the {limit}-byte frame limit")]
    TooLarge { peer: NodeId, size: usize, limit: usize },
}

impl Clone for PeerError {
    fn clone(&self) -> Self {
        match self {
            PeerError::Io { addr, source } => {
                PeerError::Io { addr: addr.clone(), source: std::io::Error::new(source.kind(), source.to_string()) }
            }
            PeerError::Handshake { addr, reason } => PeerError::Handshake { addr: addr.clone(), reason: reason.clone() },
            PeerError::UnknownPeer(id) => PeerError::UnknownPeer(*id),
            PeerError::BackingOff { addr } => PeerError::BackingOff { addr: addr.clone() },
            PeerError::SelfDial { addr } => PeerError::SelfDial { addr: addr.clone() },
            PeerError::NoLinkInTime { peer, timeout } => PeerError::NoLinkInTime { peer: peer.clone(), timeout: *timeout },
            PeerError::Closed { peer } => PeerError::Closed { peer: *peer },
            PeerError::Timeout { peer, timeout } => PeerError::Timeout { peer: *peer, timeout: *timeout },
            PeerError::Unsent { peer, timeout } => PeerError::Unsent { peer: *peer, timeout: *timeout },
            PeerError::ClosedUnsent { peer } => PeerError::ClosedUnsent { peer: *peer },
            PeerError::Protocol { peer, reason } => PeerError::Protocol { peer: *peer, reason: reason.clone() },
            PeerError::TooLarge { peer, size, limit } => PeerError::TooLarge { peer: *peer, size: *size, limit: *limit },
        }
    }
}

impl PeerError {
    /// True when the request certainly never reached the peer (safe to retry anywhere).
    pub fn not_delivered(&self) -> bool {
        matches!(
            self,
            PeerError::Io { .. }
                | PeerError::Handshake { .. }
                | PeerError::UnknownPeer(_)
                | PeerError::BackingOff { .. }
                | PeerError::SelfDial { .. }
                | PeerError::NoLinkInTime { .. }
                | PeerError::Unsent { .. }
                | PeerError::ClosedUnsent { .. }
                | PeerError::TooLarge { .. }
        )
    }
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

tokio::task_local! {
    /// The `closed` token of the link that carried the request being served: each request is
    /// served within it (`read_loop`), read through `served_link_closed`.
    static SERVED_ON: CancellationToken;
}

/// Cancelled when the link that carried the request now being served closes: its sender gave
/// up on the request then (its pending answer failed), so work done only for that answer can
/// stop (`Dispatcher::cut_short`: a pull client's lease must not outlive the leader's wait).
/// The very link, not the one now registered for the peer: two links between a pair (both
/// dialed at once, one retired) close at different times. `None` outside a served request.
pub fn served_link_closed() -> Option<CancellationToken> {
    SERVED_ON.try_with(CancellationToken::clone).ok()
}

/// Serves requests that arrive on links (implemented by the node's composition root).
///
/// `handle` is called in the order requests arrive on a link; the futures it returns then run
/// concurrently, in no particular order (a spawned task each). A handler that needs some requests
/// in arrival order (pipelined AppendEntries) takes them in `handle` itself, before returning.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, from: NodeId, req: PeerRequest) -> BoxFuture<PeerResponse>;
}

/// Static settings of the peer layer.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub node_id: NodeId,
    pub cluster: String,
    /// The address other nodes dial to reach this one.
    pub advertise: String,
    pub max_frame: usize,
    pub idle_timeout: Duration,
    /// When set, peers must prove they know it at the handshake (and this node proves it).
    pub secret: Option<ClusterSecret>,
    /// When set, every link is mutual TLS with certificates from the cluster CA.
    pub tls: Option<tls::PeerTls>,
    /// The local address this node's dials leave from (`--peer-source-addr`; `None`: the kernel
    /// picks), for a host whose firewall expects peer traffic from one of its addresses, and
    /// for the chaos suite's relays, which tell nodes apart by it. Not used toward a
    /// destination it cannot reach: another address family, or a non-loopback address from a
    /// loopback one.
    pub source_ip: Option<std::net::IpAddr>,
    /// The id of the cluster whose history this node's state holds, once known (set by the
    /// state machine): announced in each `Hello`, and a peer that announces another is refused.
    pub cluster_id: crate::raft::types::KnownClusterId,
    /// The members' features as the replicated state records them (set by the state
    /// machine): what `features_known` falls back on for a member not linked since this
    /// process started.
    pub recorded_features: crate::raft::types::RecordedFeatures,
}

/// The cluster's shared secret (`--cluster-secret`). Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(Arc<[u8]>);

impl ClusterSecret {
    pub fn new(bytes: &[u8]) -> ClusterSecret {
        ClusterSecret(bytes.into())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `given` is this secret. The SHA-256 digests of both are compared without stopping
    /// at the first difference, so the time taken tells neither how much of a guess was right
    /// nor, as a length check first did, how long the secret is.
    pub fn matches(&self, given: &[u8]) -> bool {
        use sha2::Digest;
        let (mine, theirs) = (sha2::Sha256::digest(&self.0), sha2::Sha256::digest(given));
        mine.iter().zip(theirs.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// Whether every byte is visible ASCII (a bearer token must be header text).
    pub fn is_visible_ascii(&self) -> bool {
        self.0.iter().all(u8::is_ascii_graphic)
    }

    /// A 32-byte key for another use of the secret (`label` names it): HMAC-SHA256 of the label
    /// under the secret (HKDF's extract step), so no use learns another's key or the secret.
    pub fn derive(&self, label: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        // HMAC takes a key of any length, so this cannot fail.
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        mac.update(b"raftbridge key derivation v1\0");
        mac.update(label);
        mac.finalize().into_bytes().into()
    }

    /// HMAC-SHA256 of one side's proof in a handshake: who proves (`label`), then both nonces
    /// and node ids, dialer first. Fresh nonces on both sides mean no proof is valid twice.
    fn mac(&self, label: &[u8], dialer: &Hello, acceptor: &Hello) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        // HMAC takes a key of any length, so this cannot fail.
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        mac.update(b"raftbridge peer handshake v1\0");
        mac.update(label);
        mac.update(&dialer.nonce);
        mac.update(&acceptor.nonce);
        mac.update(&dialer.node_id.to_be_bytes());
        mac.update(&acceptor.node_id.to_be_bytes());
        mac
    }

    fn prove(&self, label: &[u8], dialer: &Hello, acceptor: &Hello) -> [u8; 32] {
        use hmac::Mac;
        self.mac(label, dialer, acceptor).finalize().into_bytes().into()
    }

    /// Checks a proof in constant time.
    fn verify(&self, label: &[u8], dialer: &Hello, acceptor: &Hello, proof: &[u8]) -> bool {
        use hmac::Mac;
        self.mac(label, dialer, acceptor).verify_slice(proof).is_ok()
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// Labels of the two proofs: an acceptor's proof can never pass for a dialer's.
const PROOF_ACCEPTOR: &[u8] = b"acceptor";
const PROOF_DIALER: &[u8] = b"dialer";

/// A random handshake nonce from the OS.
fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    if getrandom::fill(&mut n).is_err() {
        // The OS source failing is near impossible; a fast PRNG's nonce still differs per
        // handshake, which is what replay protection needs.
        n = fastrand::u128(..).to_le_bytes();
    }
    n
}

/// One established connection to a peer.
pub struct Link {
    pub peer: NodeId,
    pub peer_addr: String,
    /// Node id of the side that dialed this connection (for the duplicate tie-break).
    dialer: NodeId,
    incarnation: u64,
    /// Optional messages both sides understand (`frame::features`).
    features: u64,
    /// Largest frame body both sides' readers take: the smaller of our `--max-frame` and the one
    /// the peer announced in its `Hello` (`link_max_frame`). A larger frame is refused before it
    /// reaches the writer (`send`, and answers in `read_loop`): the peer's reader would close
    /// the link on it, failing everything else in flight there.
    max_frame: usize,
    /// Everything but Raft's frames: calls, deliveries, forwarded writes and their answers.
    bulk: Lane,
    /// Raft's requests and their answers, pings and pongs: written first (`Lane`).
    raft: Lane,
    /// Outstanding requests by correlation id; drained with an error when the link closes.
    pending: Mutex<HashMap<u64, oneshot::Sender<Frame>>>,
    outstanding: Arc<Semaphore>,
    /// Raft's share, apart (`MAX_RAFT_OUTSTANDING`).
    raft_outstanding: Arc<Semaphore>,
    next_corr: AtomicU64,
    /// Cancelled by whoever closes the link (reader end, idle timeout, replacement, shutdown).
    closed: CancellationToken,
    /// When a frame last arrived (tokio's clock: the reader's silence timer is set from it).
    last_seen: Mutex<tokio::time::Instant>,
    /// Requests from the peer being served on this link right now (for retirement).
    serving: AtomicU64,
    /// The cluster id the peer announced in its `Hello`, kept only for a link made while this
    /// node held none yet (a new or emptied node, before it was sent a history), and ours as
    /// the state learns it (`PeerConfig::cluster_id`): such a link carries nothing once ours
    /// differs from theirs (`other_history`). A link made while ours was known passed the
    /// handshake's check, and ours never changes after: it keeps `None` and is not checked.
    their_cluster_id: Option<u128>,
    our_cluster_id: crate::raft::types::KnownClusterId,
    /// Of those, the ones that are not Raft's own (forwarded writes, reads, calls, deliveries),
    /// whose answers someone waits for (`PeerNet::quiesce`).
    answering: AtomicU64,
    /// The latest pings sent (link upkeep; at most `clock::PROBES`, so a round trip longer than
    /// the ping interval is still measured), each until its `Pong` arrives (reader).
    probes: Mutex<VecDeque<clock::Probe>>,
    /// The latest measure of the peer's clock (reader), read by link upkeep and `clock_offset`.
    clock: Mutex<Option<clock::ClockOffset>>,
    /// What the peer announced in its `Hello` (`frame::Settings`), compared by link upkeep.
    settings: Option<frame::Settings>,
}

impl Link {
    pub fn is_alive(&self) -> bool {
        !self.closed.is_cancelled()
    }

    /// Optional messages both sides of this link understand (`frame::features`).
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn close(&self) {
        self.closed.cancel();
        self.bulk.bytes.close();
        self.raft.bytes.close();
    }

    /// Whether the two ends now hold different cluster ids (see `their_cluster_id`): the
    /// handshake would refuse this link today, so it is closed at its next frame either way.
    fn other_history(&self) -> bool {
        self.their_cluster_id.is_some_and(|theirs| self.our_cluster_id.get().is_some_and(|ours| *ours != theirs))
    }

    /// The most bytes of frames queued in each of this link's lanes (`queue_budget`).
    fn queue_budget(&self) -> usize {
        queue_budget(self.max_frame)
    }

    /// The Raft lane for Raft's frames, else the bulk lane.
    fn lane(&self, raft: bool) -> &Lane {
        if raft { &self.raft } else { &self.bulk }
    }

    /// Room for a frame of `len` bytes in a send queue (the Raft lane's for Raft's frames),
    /// waited for (a frame larger than the budget takes all of it); an error once the link is
    /// closed.
    async fn room_for(&self, raft: bool, len: usize) -> Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError> {
        // A frame's length is below 2^32 (the codec's length field), and so is the budget.
        let n = u32::try_from(len.min(self.queue_budget())).unwrap_or(u32::MAX);
        let bytes = &self.lane(raft).bytes;
        // Without a future while there is room (every frame but a congested link's).
        match bytes.clone().try_acquire_many_owned(n) {
            Ok(room) => Ok(room),
            Err(_) => bytes.clone().acquire_many_owned(n).await,
        }
    }

    /// Bytes of frames queued in a lane of this link now.
    #[cfg(test)]
    fn queued(&self, raft: bool) -> usize {
        self.queue_budget() - self.lane(raft).bytes.available_permits()
    }

    /// Largest frame body this link carries either way (see the field).
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Send one request and wait for its response (bounded by `timeout`).
    pub async fn call(self: &Arc<Self>, req: &PeerRequest, timeout: Duration) -> Result<PeerResponse, PeerError> {
        self.send(req, timeout).await?.response().await
    }

    /// Queue one request on the link and return at once, without waiting for the response
    /// (`Call::response`). Requests queued one after another go out in that order (within a
    /// lane: a Raft request may pass others, `Lane`), and a peer
    /// answers in any order: this is what lets a caller keep several in flight (pipelined
    /// AppendEntries). `timeout` bounds the wait here and for the response together.
    pub async fn send(self: &Arc<Self>, req: &PeerRequest, timeout: Duration) -> Result<Call, PeerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let raft = req.raft_sender().is_some();
        let permit = self.place(deadline, timeout, raft).await?;
        let (call, body) = self.open(req, permit, deadline, timeout)?;
        let queued = async {
            let room = self.room_for(raft, body.len()).await.ok()?;
            self.lane(raft).tx.send(Queued { frame: body, room: Some(room) }).await.ok()
        };
        match tokio::time::timeout_at(deadline, queued).await {
            Ok(Some(())) => Ok(call),
            // The writer is gone: this request never reached its queue.
            Ok(None) => Err(PeerError::ClosedUnsent { peer: self.peer }),
            Err(_) => Err(PeerError::Unsent { peer: self.peer, timeout }),
        }
    }

    /// A call whose request is made only once it has a place on the link (one of the
    /// outstanding requests, room in the send queue), both waited for until `deadline`:
    /// `make` then says what to send, or `None` for nothing (`Ok(None)`). A forwarded batch of
    /// writes is made of those whose callers still wait at that moment, so that a write whose
    /// caller was told 503 while the batch waited for its place is not sent; the answer is
    /// waited for until `deadline` too.
    pub async fn call_made(
        self: &Arc<Self>,
        deadline: tokio::time::Instant,
        make: impl FnOnce() -> Option<PeerRequest>,
    ) -> Result<Option<PeerResponse>, PeerError> {
        let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
        let permit = self.place(deadline, timeout, false).await?;
        let unsent = |closed: bool| if closed { PeerError::ClosedUnsent { peer: self.peer } } else { PeerError::Unsent { peer: self.peer, timeout } };
        // Never Raft's: `make` builds forwarded writes.
        let slot = match tokio::time::timeout_at(deadline, self.bulk.tx.reserve()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) => return Err(unsent(true)),
            Err(_) => return Err(unsent(false)),
        };
        // Room for the largest frame the request can be, before it is made: once made it goes
        // at once (its callers may give up while it waits), and the room it does not need is
        // given back.
        let mut bytes = match tokio::time::timeout_at(deadline, self.room_for(false, self.max_frame)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(_)) => return Err(unsent(true)),
            Err(_) => return Err(unsent(false)),
        };
        let Some(req) = make() else { return Ok(None) };
        let (call, body) = self.open(&req, permit, deadline, timeout)?;
        drop(bytes.split(bytes.num_permits().saturating_sub(body.len().max(1))));
        slot.send(Queued { frame: body, room: Some(bytes) });
        call.response().await.map(Some)
    }

    /// One of the requests this side may have outstanding on the link (of Raft's own places for
    /// a Raft request), waited for until `deadline`. Not sent, either way: the caller may try
    /// elsewhere (`not_delivered`).
    async fn place(&self, deadline: tokio::time::Instant, timeout: Duration, raft: bool) -> Result<tokio::sync::OwnedSemaphorePermit, PeerError> {
        let places = if raft { &self.raft_outstanding } else { &self.outstanding };
        tokio::time::timeout_at(deadline, places.clone().acquire_owned())
            .await
            .map_err(|_| PeerError::Unsent { peer: self.peer, timeout })?
            .map_err(|_| PeerError::ClosedUnsent { peer: self.peer })
    }

    /// The frame of `req` and its `Call`, registered for the response (a dropped `Call` takes
    /// its registration and place back).
    fn open(
        self: &Arc<Self>,
        req: &PeerRequest,
        permit: tokio::sync::OwnedSemaphorePermit,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<(Call, Bytes), PeerError> {
        if self.other_history() {
            self.close();
            return Err(PeerError::ClosedUnsent { peer: self.peer });
        }
        let corr = self.next_corr.fetch_add(1, Ordering::Relaxed);
        let body = Frame::encode(Kind::Request, corr, req).map_err(|e| PeerError::Protocol { peer: self.peer, reason: e.to_string() })?;
        if body.len() > self.max_frame {
            return Err(PeerError::TooLarge { peer: self.peer, size: body.len(), limit: self.max_frame });
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(corr, tx);
        let call = Call { link: self.clone(), corr, rx, deadline, timeout, _permit: permit };
        if !self.is_alive() {
            return Err(PeerError::ClosedUnsent { peer: self.peer });
        }
        Ok((call, body))
    }

    fn touch(&self) {
        *lock(&self.last_seen) = tokio::time::Instant::now();
    }
}

/// A request sent on a link, its response still to come. Dropping it (the caller gives up:
/// timeout, cancellation) removes its pending slot and frees its share of `MAX_OUTSTANDING`.
pub struct Call {
    link: Arc<Link>,
    corr: u64,
    rx: oneshot::Receiver<Frame>,
    deadline: tokio::time::Instant,
    timeout: Duration,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Call {
    /// Waits for the response, until the deadline set when the request was sent.
    pub async fn response(mut self) -> Result<PeerResponse, PeerError> {
        let peer = self.link.peer;
        // A closed link drops its pending senders (the reader's exit drains them, and `send`
        // refuses a link closed before its slot went in), so `rx` ends then: no need to wait on
        // `closed` as well (a cancellation waiter per call).
        let frame = match tokio::time::timeout_at(self.deadline, &mut self.rx).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(_)) => return Err(PeerError::Closed { peer }),
            Err(_) => return Err(PeerError::Timeout { peer, timeout: self.timeout }),
        };
        // Decoded here, by the caller, not by the link's reader (which only hands frames over);
        // an answer that does not decode is bad input from the peer all the same: the link is
        // closed, as for a request that does not (`read_loop`), and redialed when next needed.
        frame.message::<PeerResponse>().map_err(|e| {
            warn!(peer, cause = %e, "undecodable response, closing link");
            self.link.close();
            PeerError::Protocol { peer, reason: e.to_string() }
        })
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        lock(&self.link.pending).remove(&self.corr);
    }
}

#[derive(Default)]
struct DialState {
    failures: u32,
    next_try: Option<Instant>,
}

/// The peer layer of one node: its links, known peer addresses and the listener.
pub struct PeerNet {
    cfg: PeerConfig,
    incarnation: u64,
    /// Set by the composition root before the listener starts; taken out by `clear_handler`
    /// once the node's links are down, as the handler holds the node's parts and they hold this
    /// net (a cycle that would otherwise keep them all, and their tasks, after the node ended).
    handler: Mutex<Option<Arc<dyn Handler>>>,
    /// Live links by peer id; shared with each link's read task, which removes its own entry.
    links: Arc<Mutex<HashMap<NodeId, Arc<Link>>>>,
    addrs: Mutex<HashMap<NodeId, String>>,
    dials: Mutex<HashMap<String, DialState>>,
    /// One dial at a time per address (`dial`): each caller that found no link used to dial on
    /// its own, and two links dialed by this node could be kept differently by the two sides
    /// (each keeps the first it registered), which then retired each other's under traffic.
    /// An entry lives while a dial to its address runs or is waited for (`DialTurn`).
    dialing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Links this node made or took (handshakes completed).
    #[cfg(test)]
    links_made: AtomicU64,
    /// Resolved seed address → the DNS name TLS checks there (`set_tls_name`).
    tls_names: Mutex<HashMap<String, String>>,
    /// Cancelled by the node on shutdown; closes the listener, the maintainer and every link.
    shutdown: CancellationToken,
    shutting_down: AtomicBool,
    /// Probe ids for pings (`clock`): distinct across links, never 0 (older builds' pings).
    next_probe: AtomicU64,
    /// Which peers' clocks were warned about (link upkeep only).
    clocks: Mutex<clock::Watch>,
    /// This node's announced settings (`announce_settings`, once, before the first link).
    settings: std::sync::OnceLock<frame::Settings>,
    /// The settings each peer announced last (link upkeep only): a warning is logged when they
    /// change, not on every reconnect. At most one entry per member (`forget_peer` drops it).
    settings_seen: Mutex<HashMap<NodeId, frame::Settings>>,
    /// The smallest `--max-frame` of this node's and every member's in `settings_seen`, kept
    /// as that map changes (`cluster_frame`).
    smallest_frame: AtomicUsize,
    /// The latest clock reading of every member measured, kept after its link goes (a node
    /// taking over a dead node's idempotency claim reads that node's clock through it), until
    /// it leaves the cluster (`forget_peer`): claims of a removed node are then judged in this
    /// node's own clock, as a node that never measured it would. At most one entry per member.
    offsets: Mutex<HashMap<NodeId, clock::ClockOffset>>,
    /// The features each member announced on its latest link, kept after the link goes (until
    /// `forget_peer`), so a change every member must be able to apply can be judged while one
    /// is down: it comes back with the build it had or a newer one. At most one per member.
    features_seen: Mutex<HashMap<NodeId, u64>>,
}

impl PeerNet {
    pub fn new(cfg: PeerConfig, shutdown: CancellationToken) -> Arc<PeerNet> {
        let cfg_frame = cfg.max_frame;
        Arc::new(PeerNet {
            cfg,
            incarnation: fastrand::u64(..),
            handler: Mutex::new(None),
            links: Arc::new(Mutex::new(HashMap::new())),
            addrs: Mutex::new(HashMap::new()),
            dials: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            #[cfg(test)]
            links_made: AtomicU64::new(0),
            tls_names: Mutex::new(HashMap::new()),
            shutdown,
            shutting_down: AtomicBool::new(false),
            next_probe: AtomicU64::new(1),
            clocks: Mutex::new(clock::Watch::default()),
            features_seen: Mutex::new(HashMap::new()),
            offsets: Mutex::new(HashMap::new()),
            settings: std::sync::OnceLock::new(),
            settings_seen: Mutex::new(HashMap::new()),
            smallest_frame: AtomicUsize::new(cfg_frame),
        })
    }

    /// The latest measure of `id`'s clock against ours (`clock`), while a link to it is up and
    /// it runs a build that answers with its clock.
    pub fn clock_offset(&self, id: NodeId) -> Option<clock::ClockOffset> {
        let link = lock(&self.links).get(&id).cloned()?;
        let reading = *lock(&link.clock);
        reading
    }

    /// Whether every known peer's clock has been measured and none can be more than `bound`
    /// behind ours (its offset less the measure's uncertainty).
    /// Asked per keyed request: no allocation, two short locks (`addrs`, then `offsets`; nothing
    /// takes them in the other order).
    pub fn no_peer_clock_behind(&self, bound: Duration) -> bool {
        let floor = -i64::try_from(bound.as_micros()).unwrap_or(i64::MAX);
        let addrs = lock(&self.addrs);
        let offsets = lock(&self.offsets);
        addrs.keys().filter(|id| **id != self.cfg.node_id).all(|id| {
            offsets.get(id).is_some_and(|o| o.offset_us.saturating_sub(i64::try_from(o.uncertainty_us).unwrap_or(i64::MAX)) > floor)
        })
    }

    /// How far (ms) this node's clock is surely ahead of most members' by more than `bound`:
    /// `Some(least such lead)` when those measured that far behind it are a strict majority of
    /// all known members, itself counted among the others (so in a cluster of two, or a tie,
    /// neither side is judged); `None` otherwise. A lead is net of the measure's uncertainty, and
    /// unmeasured members count as not behind, so a node just started judges nothing.
    pub fn clock_ahead_of_most(&self, bound: Duration) -> Option<i64> {
        self.lead_over_most(bound, true)
    }

    /// `clock_ahead_of_most` the other way: how far (ms) this node's clock is surely behind
    /// most members' by more than `bound`.
    pub fn clock_behind_most(&self, bound: Duration) -> Option<i64> {
        self.lead_over_most(bound, false)
    }

    /// What to add to this node's clock to read the time most members' clocks say, once it is
    /// surely more than `bound` off theirs (`clock_ahead_of_most`, `clock_behind_most`); 0
    /// while it is not. What key expiry is stamped and judged in (`store::cluster_now_ms`).
    pub fn clock_correction_ms(&self, bound: Duration) -> i64 {
        match (self.clock_ahead_of_most(bound), self.clock_behind_most(bound)) {
            (Some(lead), _) => -lead,
            (None, Some(lag)) => lag,
            (None, None) => 0,
        }
    }

    /// `clock_ahead_of_most` (`ahead`) or `clock_behind_most`: the largest lead this node has,
    /// net of uncertainty, over a strict majority of all members (itself among them, at no
    /// lead): the majority's `m`-th largest peer lead, `m` = half the members plus one. Not
    /// the least lead of every peer past the bound: with five nodes at 0, 0, 0, -5 and -10 s
    /// against this one, the node is 10 s ahead of most members, not 5.
    fn lead_over_most(&self, bound: Duration, ahead: bool) -> Option<i64> {
        let bound_us = i64::try_from(bound.as_micros()).unwrap_or(i64::MAX);
        let others: Vec<NodeId> = lock(&self.addrs).keys().copied().filter(|id| *id != self.cfg.node_id).collect();
        // A peer's offset is its clock minus ours: behind us is negative. The link's reading
        // first (`last_clock_offset`): `offsets` follows it only at the link's next upkeep.
        // Unmeasured peers lead nothing.
        let mut leads: Vec<i64> = others
            .iter()
            .filter_map(|id| self.last_clock_offset(*id))
            .map(|o| {
                let toward = if ahead { o.offset_us.saturating_neg() } else { o.offset_us };
                toward.saturating_sub(i64::try_from(o.uncertainty_us).unwrap_or(i64::MAX))
            })
            .collect();
        leads.sort_unstable_by(|a, b| b.cmp(a));
        let majority = others.len().div_ceil(2) + 1;
        // Itself counts at no lead, so the majority's `majority`-th member is a peer.
        let lead_us = *leads.get(majority - 1)?;
        (lead_us > bound_us).then_some(lead_us / 1000)
    }

    /// The latest measure of `id`'s clock against ours, also after its link went down; `None`
    /// if it was never measured. Its own node: zero.
    pub fn last_clock_offset(&self, id: NodeId) -> Option<clock::ClockOffset> {
        if id == self.cfg.node_id {
            return Some(clock::ClockOffset { offset_us: 0, uncertainty_us: 0 });
        }
        self.clock_offset(id).or_else(|| lock(&self.offsets).get(&id).copied())
    }

    /// Waits, at most `grace`, for a moment when no request from a peer is being served here,
    /// Raft's own aside (a leader keeps appending; a stopping follower need not answer), so that
    /// closing the links (shutdown) cuts no answer short: a forwarded write this node was
    /// committing would otherwise reach its sender as "outcome unknown". Returns whether it came.
    pub async fn quiesce(&self, grace: Duration) -> bool {
        let until = tokio::time::Instant::now() + grace;
        // Bounded by `grace`.
        loop {
            let busy: u64 = lock(&self.links).values().map(|l| l.answering.load(Ordering::Relaxed)).sum();
            if busy == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Largest frame a link sends or accepts.
    pub fn max_frame(&self) -> usize {
        self.cfg.max_frame
    }

    /// Largest frame body that reaches `target`: its live link's (`Link::max_frame`), else
    /// ours (a link made later takes the smaller of the two, and refuses what is over it).
    pub fn max_frame_to(&self, target: NodeId) -> usize {
        lock(&self.links).get(&target).filter(|l| l.is_alive()).map_or(self.cfg.max_frame, |l| l.max_frame)
    }

    pub fn node_id(&self) -> NodeId {
        self.cfg.node_id
    }

    /// How long a link may stay silent before it is closed: `max(4 × election timeout, 2 s)`.
    pub fn idle_timeout(&self) -> Duration {
        self.cfg.idle_timeout
    }

    pub fn advertise(&self) -> &str {
        &self.cfg.advertise
    }

    /// Set once by the composition root before the listener starts: while one is set, another
    /// is ignored.
    pub fn set_handler(&self, handler: Arc<dyn Handler>) {
        let mut slot = lock(&self.handler);
        if slot.is_none() {
            *slot = Some(handler);
        }
        // A refused `handler` drops after the lock is released (parameters drop after locals).
    }

    /// Drops the handler, once the node's links are down (see the field); links made after
    /// this serve no requests.
    pub fn clear_handler(&self) {
        let old = lock(&self.handler).take();
        // Outside the lock: the last reference tears the node's parts down.
        drop(old);
    }

    /// Remember where a peer listens (from the Raft membership).
    pub fn set_peer_addr(&self, id: NodeId, addr: &str) {
        if id == self.cfg.node_id {
            return;
        }
        let added = {
            let mut addrs = lock(&self.addrs);
            let added = !addrs.contains_key(&id);
            if addrs.get(&id).map(String::as_str) != Some(addr) {
                addrs.insert(id, addr.to_string());
            }
            added
        };
        // A member linked before it was one (a joiner's first link): what it announced counts
        // from now on (`register` notes members only). `addrs` is released first (lock order).
        if added {
            // Under `links`, as `register` notes them: a newer link registered meanwhile cannot
            // have its features overwritten by this one's.
            let links = lock(&self.links);
            if let Some(link) = links.get(&id).filter(|l| l.is_alive()) {
                lock(&self.features_seen).insert(id, link.features);
            }
        }
    }

    /// Forget a removed peer and retire its link (closed once what is in flight on it is done).
    pub fn forget_peer(&self, id: NodeId) {
        if id == self.cfg.node_id {
            // This node was removed: it has no link, reading or gauge of its own.
            return;
        }
        lock(&self.addrs).remove(&id);
        // Retired, not closed: the membership changes as its entry is appended, and the answer
        // to the node's own request to leave (or anything else it asked) is still on its way.
        if let Some(link) = lock(&self.links).remove(&id) {
            retire(&link);
        }
        // Its clock is no longer measured: neither `/cluster` nor the keyed-request check may
        // go on reading the last offset, and its gauge says "unknown" (NaN: an alert on
        // `abs(…) > 1` does not fire on it) rather than a stale figure. The exporter cannot
        // drop one series; one per node id that ever left is the bound.
        lock(&self.offsets).remove(&id);
        lock(&self.features_seen).remove(&id);
        self.frames_changed(|seen| seen.remove(&id).is_some());
        lock(&self.clocks).forget(id);
        metrics::gauge!(CLOCK_GAUGE, "peer" => id.to_string()).set(f64::NAN);
        metrics::gauge!("raftbridge_peer_settings_differ", "peer" => id.to_string()).set(0.0);
    }

    /// Reachable, or not known to be unreachable: a known peer with no live link whose address
    /// has not failed a dial since (a restarted node before its links are up, or a peer whose link
    /// just dropped). Routing uses this so a fresh node is not cut off from everyone for the moment
    /// its links take to form; a dial to a dead peer fails fast and is then excluded.
    pub fn maybe_reachable(&self, id: NodeId) -> bool {
        if self.reachable(id) {
            return true;
        }
        let Some(addr) = lock(&self.addrs).get(&id).cloned() else { return false };
        lock(&self.dials).get(&addr).is_none_or(|d| d.failures == 0)
    }

    /// True when every listed peer has a live link or has failed a dial since it was last up:
    /// the node knows who it can reach (used before serving clients after a start).
    pub fn links_settled(&self, ids: &[NodeId]) -> bool {
        ids.iter().filter(|id| **id != self.cfg.node_id).all(|id| {
            if self.reachable(*id) {
                return true;
            }
            // Settled as unreachable only once its address is known and a dial to it failed.
            let Some(addr) = lock(&self.addrs).get(id).cloned() else { return false };
            lock(&self.dials).get(&addr).is_some_and(|d| d.failures > 0)
        })
    }

    /// Optional messages (`frame::features`) the live link to `id` may carry; 0 without one.
    pub fn features(&self, id: NodeId) -> u64 {
        lock(&self.links).get(&id).filter(|l| l.is_alive()).map_or(0, |l| l.features)
    }

    /// The features `id` announced on its latest link since this process started, live or not
    /// (`None`: never linked, or removed since).
    pub fn features_seen(&self, id: NodeId) -> Option<u64> {
        if id == self.cfg.node_id {
            return Some(frame::features::announced());
        }
        lock(&self.features_seen).get(&id).copied()
    }

    /// The members' features as the replicated state records them.
    pub fn recorded_features(&self) -> crate::raft::types::MemberFeatures {
        self.cfg.recorded_features.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// `features_seen`, or, for a member not linked since this process started (down since
    /// before it, say), the features the replicated state records it announced
    /// (`state_machine::record_features`): a leader restarted while one member was down
    /// counted that member as knowing nothing, and held back every gated command (key expiry,
    /// held claims, tagged deletes) until it came back. A member that was rolled back to an
    /// older build while down is counted with its newer build until it links: the README's
    /// "do not roll back" holds.
    /// The record counts only when it was written after the membership in force
    /// (`membership_index`, its entry's log index): the leader writes it again after every
    /// change, so an id removed and added again (on another build) is never judged by what
    /// the record said of its earlier self.
    pub fn features_known(&self, id: NodeId, membership_index: u64) -> Option<u64> {
        self.features_seen(id).or_else(|| {
            let recorded = self.cfg.recorded_features.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            recorded.by_node.get(&id).copied().filter(|_| recorded.revision > membership_index)
        })
    }

    pub fn reachable(&self, id: NodeId) -> bool {
        id == self.cfg.node_id || lock(&self.links).get(&id).is_some_and(|l| l.is_alive())
    }

    /// How long ago anything arrived from `id` on its live link (zero for this node; `None`
    /// without a live link). A link stays up for its idle timeout after the peer goes silent (a
    /// stopped process, a hung host): this tells a silent peer from one that answers.
    pub fn heard_ago(&self, id: NodeId) -> Option<Duration> {
        if id == self.cfg.node_id {
            return Some(Duration::ZERO);
        }
        let link = lock(&self.links).get(&id).filter(|l| l.is_alive()).cloned()?;
        let heard = *lock(&link.last_seen);
        Some(heard.elapsed())
    }

    /// Send a request to a node by id, dialing if needed.
    /// `timeout` bounds the call once a link is there; making the link (at most a second to
    /// connect and a few for the handshake) comes on top. Not cut short on purpose: Raft's
    /// heartbeats ask with 60 ms, less than a handshake over TLS or a slow network takes, and a
    /// dial given up at their deadline would never finish and start again at the next beat.
    pub async fn request(&self, target: NodeId, req: &PeerRequest, timeout: Duration) -> Result<PeerResponse, PeerError> {
        let link = self.link(target).await?;
        link.call(req, timeout).await
    }

    /// `request`, with the answer waited for `wait` from the moment the request went into the
    /// link's send queue, which is returned with it: the wait for a place on the link and for
    /// room in its queue (itself bounded by `wait`) does not eat into the answer's time. For a
    /// caller whose peer measures the same time from the request's arrival (a delivery's ack
    /// deadline), so that a congested link does not end the caller's wait before the peer's.
    pub async fn request_from_queued(&self, target: NodeId, req: &PeerRequest, wait: Duration) -> Result<(PeerResponse, tokio::time::Instant), PeerError> {
        let link = self.link(target).await?;
        let mut call = link.send(req, wait).await?;
        let queued = tokio::time::Instant::now();
        call.deadline = queued + wait;
        Ok((call.response().await?, queued))
    }

    /// Send a request to an address (a seed whose id we may not know yet); returns the peer's id.
    pub async fn request_addr(
        &self,
        addr: &str,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<(NodeId, PeerResponse), PeerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let link = tokio::time::timeout_at(deadline, self.dial(addr))
            .await
            .map_err(|_| PeerError::NoLinkInTime { peer: addr.to_string(), timeout })??;
        let resp = link.call(req, deadline.saturating_duration_since(tokio::time::Instant::now())).await?;
        Ok((link.peer, resp))
    }

    /// The node that answers at `addr` and the features it announced in its handshake (a
    /// joiner's, which no member's link records until it is added: `features_seen`).
    pub async fn features_at(&self, addr: &str, timeout: Duration) -> Result<(NodeId, u64), PeerError> {
        let link = tokio::time::timeout(timeout, self.dial(addr))
            .await
            .map_err(|_| PeerError::NoLinkInTime { peer: addr.to_string(), timeout })??;
        Ok((link.peer, link.features))
    }

    /// The live link to a node, dialing if needed. Requests sent on one link one after another
    /// arrive in that order (`Link::send`); two links to the same node (a reconnect, or both
    /// sides dialing at once) give no order between them.
    pub async fn link(&self, target: NodeId) -> Result<Arc<Link>, PeerError> {
        if let Some(link) = lock(&self.links).get(&target).filter(|l| l.is_alive()) {
            return Ok(link.clone());
        }
        let addr = lock(&self.addrs).get(&target).cloned().ok_or(PeerError::UnknownPeer(target))?;
        let link = self.dial(&addr).await?;
        if link.peer != target {
            return Err(PeerError::Handshake {
                addr,
                reason: format!("expected node {target}, found node {}", link.peer),
            });
        }
        Ok(link)
    }

    /// The live link to whichever node answers at `addr`, if there is one.
    fn link_at(&self, addr: &str) -> Option<Arc<Link>> {
        lock(&self.links).values().find(|l| l.peer_addr == addr && l.is_alive()).cloned()
    }

    /// Dial an address, or reuse a live link to whichever node answers there. A dial to the
    /// same address already under way is waited for, and its link used (`dialing`).
    async fn dial(&self, addr: &str) -> Result<Arc<Link>, PeerError> {
        self.dial_turn(addr, true).await
    }

    /// `dial` for link upkeep: a dial to the address already under way is not waited for.
    async fn redial(&self, addr: &str) -> Result<Arc<Link>, PeerError> {
        self.dial_turn(addr, false).await
    }

    async fn dial_turn(&self, addr: &str, wait: bool) -> Result<Arc<Link>, PeerError> {
        if let Some(link) = self.link_at(addr) {
            return Ok(link);
        }
        let turn = DialTurn::take(self, addr, wait).await.ok_or_else(|| PeerError::BackingOff { addr: addr.to_string() })?;
        // The dial waited for may have made it.
        if let Some(link) = self.link_at(addr) {
            return Ok(link);
        }
        let result = self.dial_now(addr).await;
        drop(turn);
        result
    }

    async fn dial_now(&self, addr: &str) -> Result<Arc<Link>, PeerError> {
        {
            let dials = lock(&self.dials);
            if let Some(next) = dials.get(addr).and_then(|d| d.next_try) {
                if Instant::now() < next {
                    return Err(PeerError::BackingOff { addr: addr.to_string() });
                }
            }
        }
        let result = self.connect(addr).await;
        // Members' addresses keep their records at the bound below (read before `dials` is
        // locked: no lock is taken under it).
        let members: Vec<String> = match &result {
            Err(_) if lock(&self.dials).len() >= MAX_DIAL_RECORDS => lock(&self.addrs).values().cloned().collect(),
            _ => Vec::new(),
        };
        let mut dials = lock(&self.dials);
        match &result {
            Ok(_) => {
                dials.remove(addr);
            }
            Err(PeerError::SelfDial { .. }) => {}
            Err(_) => {
                if dials.len() >= MAX_DIAL_RECORDS && !dials.contains_key(addr) {
                    // Bounded: records of addresses that failed once (old pod addresses, moved
                    // members, seeds' answers) were kept for good. Those whose wait is over
                    // hold nothing a dial needs but their count of failures, except a member's
                    // (routing takes a member with failures as down, `maybe_reachable`).
                    let now = Instant::now();
                    dials.retain(|a, d| d.next_try.is_some_and(|t| t > now) || members.contains(a));
                    if dials.len() >= MAX_DIAL_RECORDS {
                        dials.retain(|a, _| members.contains(a));
                    }
                }
                let state = dials.entry(addr.to_string()).or_default();
                state.failures = state.failures.saturating_add(1);
                metrics::counter!("raftbridge_peer_dial_failures_total").increment(1);
                let exp = BACKOFF_MIN.saturating_mul(1u32 << state.failures.min(10)).min(BACKOFF_MAX);
                // Full jitter in [exp/2, exp): peers that lost the same node do not redial in step.
                let jittered = exp / 2 + exp.mul_f64(fastrand::f64() / 2.0);
                state.next_try = Some(Instant::now() + jittered);
            }
        }
        result
    }

    /// When TLS dials `addr` (an address a seed's DNS name resolved to), the certificate must
    /// carry `host`, the name, not the address. Bounded: the oldest names go past `MAX_TLS_NAMES`.
    pub fn set_tls_name(&self, addr: &str, host: &str) {
        let mut names = lock(&self.tls_names);
        if names.len() >= MAX_TLS_NAMES && !names.contains_key(addr) {
            names.clear();
        }
        names.insert(addr.to_string(), host.to_string());
    }

    async fn connect(&self, addr: &str) -> Result<Arc<Link>, PeerError> {
        let io_err = |source| PeerError::Io { addr: addr.to_string(), source };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, open_tcp(addr, self.cfg.source_ip))
            .await
            .map_err(|_| io_err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))?
            .map_err(io_err)?;
        stream.set_nodelay(true).map_err(io_err)?;
        // `bound`: the node ids the acceptor's certificate names, checked once it says who it is.
        let (rd, wr, bound) = match &self.cfg.tls {
            Some(tls) => tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.connect(&self.tls_dial_name(addr), stream))
                .await
                .map_err(|_| PeerError::Handshake { addr: addr.to_string(), reason: "TLS handshake timed out".into() })?
                .map_err(|e| PeerError::Handshake { addr: addr.to_string(), reason: format!("TLS: {e}") })?,
            None => {
                let (rd, wr) = tls::plain(stream);
                (rd, wr, Ok(Vec::new()))
            }
        };
        let mut reader = FramedRead::new(rd, frame::codec(HANDSHAKE_FRAME.min(self.cfg.max_frame)));
        let mut writer = FramedWrite::new(wr, frame::codec(self.cfg.max_frame));
        let hello = self.hello();
        // The member the address book has at `addr` (none for a seed, or if two share it).
        let expected = {
            let addrs = lock(&self.addrs);
            let mut at = addrs.iter().filter(|(_, a)| a.as_str() == addr).map(|(id, _)| *id);
            match (at.next(), at.next()) {
                (Some(id), None) => Some(id),
                _ => None,
            }
        };
        let handshake = async {
            let body = Frame::encode(Kind::Hello, 0, &hello).map_err(|e| e.to_string())?;
            writer.send(body).await.map_err(|e| e.to_string())?;
            let raw = reader.next().await.ok_or("closed during handshake")?.map_err(|e| e.to_string())?;
            let frame = Frame::decode(raw).map_err(|e| e.to_string())?;
            match frame.kind {
                Kind::HelloAck => {
                    let theirs = Hello::decode(&frame).map_err(|e| e.to_string())?;
                    self.check_hello(&theirs)?;
                    if let Some(tls) = &self.cfg.tls {
                        tls.check_peer(theirs.node_id, &bound)?;
                    }
                    let asked = theirs.proof != [0; 32];
                    match &self.cfg.secret {
                        Some(secret) if asked => {
                            // Our proof is for the node that answered: one that answers at a
                            // member's address in another node's name may be relaying this
                            // handshake to that node (a stale address, a hijacked name), and
                            // our `Auth` would let it act as us there. Not sent; `link` would
                            // refuse the link anyway. Without TLS the frames after it are not
                            // protected (the module doc of `proof`), but this much is cheap.
                            if let Some(want) = expected.filter(|want| *want != theirs.node_id) {
                                return Err(format!("node {} answered at node {want}'s address: no proof sent to it", theirs.node_id));
                            }
                            if !secret.verify(PROOF_ACCEPTOR, &hello, &theirs, &theirs.proof) {
                                return Err("the peer's proof of the cluster secret is wrong (another secret?)".to_string());
                            }
                            let proof = secret.prove(PROOF_DIALER, &hello, &theirs);
                            writer.send(Frame::encode_raw(Kind::Auth, 0, &proof)).await.map_err(|e| e.to_string())?;
                        }
                        Some(_) => return Err("the peer has no cluster secret, and this node requires one".to_string()),
                        None if asked => return Err("the peer requires a cluster secret (--cluster-secret)".to_string()),
                        None => {}
                    }
                    Ok(theirs)
                }
                Kind::Reject => Err(format!("rejected: {}", String::from_utf8_lossy(&frame.payload))),
                other => Err(format!("unexpected {other:?} during handshake")),
            }
        };
        let theirs = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| PeerError::Handshake { addr: addr.to_string(), reason: "timed out".into() })?
            .map_err(|reason| PeerError::Handshake { addr: addr.to_string(), reason })?;
        if theirs.node_id == self.cfg.node_id {
            return Err(PeerError::SelfDial { addr: addr.to_string() });
        }
        // We dialed `addr`; remember it as the way to reach this peer.
        reader.decoder_mut().set_max_frame_length(self.cfg.max_frame);
        let link = self.start_link(theirs.node_id, addr.to_string(), self.cfg.node_id, &theirs, reader, writer);
        Ok(link)
    }

    /// What TLS checks for `addr`: the DNS name it was resolved from, if any, with its port.
    fn tls_dial_name(&self, addr: &str) -> String {
        match (lock(&self.tls_names).get(addr), addr.rsplit_once(':')) {
            (Some(host), Some((_, port))) => format!("{host}:{port}"),
            _ => addr.to_string(),
        }
    }

    fn hello(&self) -> Hello {
        Hello {
            magic: frame::MAGIC,
            version: frame::PROTOCOL_VERSION,
            cluster: self.cfg.cluster.clone(),
            node_id: self.cfg.node_id,
            addr: self.cfg.advertise.clone(),
            incarnation: self.incarnation,
            features: frame::features::announced(),
            nonce: nonce(),
            proof: [0; 32],
            settings: self.settings.get().copied(),
            cluster_id: self.cluster_id(),
        }
    }

    /// The cluster id this node's state holds (`PeerConfig::cluster_id`), if it is known.
    pub fn cluster_id(&self) -> Option<u128> {
        self.cfg.cluster_id.get().copied()
    }

    /// This node's flags that its proposals carry to every node, announced in each `Hello`
    /// from now on (`frame::Settings`). Set once, before the first link; a second call is ignored.
    pub fn announce_settings(&self, settings: frame::Settings) {
        let _ = self.settings.set(settings);
    }

    /// Compares a member's announced settings with ours (link upkeep, every ping): warns once
    /// per member and change, and exports how many differ (`raftbridge_peer_settings_differ{peer}`;
    /// 0 when they agree or the peer did not announce them).
    fn note_settings(&self, peer: NodeId, theirs: Option<frame::Settings>) {
        let Some(ours) = self.settings.get() else { return };
        // Members only (the address book, as for clock readings): a node that completes a
        // handshake without joining leaves no entry and no gauge behind.
        if !lock(&self.addrs).contains_key(&peer) {
            return;
        }
        let Some(theirs) = theirs else {
            // A build from before settings (say, rolled back): nothing to compare.
            self.frames_changed(|seen| seen.remove(&peer).is_some());
            metrics::gauge!("raftbridge_peer_settings_differ", "peer" => peer.to_string()).set(0.0);
            return;
        };
        let mut seen = None;
        self.frames_changed(|map| {
            seen = map.insert(peer, theirs);
            seen != Some(theirs)
        });
        if seen == Some(theirs) {
            return;
        }
        let differ = ours.differences(&theirs);
        metrics::gauge!("raftbridge_peer_settings_differ", "peer" => peer.to_string()).set(differ.len() as f64);
        if differ.is_empty() {
            return;
        }
        let list: Vec<String> = differ.iter().map(|(flag, a, b)| format!("{flag} {a} here, {b} there")).collect();
        warn!(
            peer,
            differ = %list.join("; "),
            "peer settings differ from ours: event retention follows the leader's flags and the dedup, idempotency and state bounds the proposing node's, so the cluster's rules change with who leads; set them alike on every node"
        );
    }

    /// Changes `settings_seen` with `change` (true: it changed) and keeps `smallest_frame`.
    fn frames_changed(&self, change: impl FnOnce(&mut HashMap<NodeId, frame::Settings>) -> bool) {
        let mut seen = lock(&self.settings_seen);
        if change(&mut seen) {
            let smallest = seen.values().map(|s| link_max_frame(self.cfg.max_frame, Some(*s))).fold(self.cfg.max_frame, usize::min);
            self.smallest_frame.store(smallest, Ordering::Release);
        }
    }

    /// The smallest `--max-frame` among this node and the members whose settings it has seen
    /// (announced on their latest link, kept while they are down): the largest frame every
    /// member takes. A log entry must fit it (`raft::entry_limit`), or replication to the
    /// member with the smaller frame stops at that entry for good: a node that accepted writes
    /// up to its own, larger frame (say, the first restarted in a rolling raise of the flag)
    /// stalled them.
    pub fn cluster_frame(&self) -> usize {
        self.smallest_frame.load(Ordering::Acquire)
    }

    fn check_hello(&self, h: &Hello) -> Result<(), String> {
        if h.magic != frame::MAGIC {
            return Err(format!("bad magic {:#x}", h.magic));
        }
        if h.version != frame::PROTOCOL_VERSION {
            return Err(format!("protocol version {} (we speak {})", h.version, frame::PROTOCOL_VERSION));
        }
        // Not naming this node's own cluster: the reason goes to whoever connected, and where
        // the name is the only gate (no secret, no TLS) it would hand it out.
        if h.cluster != self.cfg.cluster {
            return Err(format!("cluster {:?} is not this node's", h.cluster));
        }
        // Same name, another history: a cluster restored from a backup and a node of the one
        // it replaced, or two clusters started under one name. A node without an id yet (a
        // new or emptied one, or a build before ids) links to either, and takes the id of the
        // history it is sent. Ours is not named, as the name is not above.
        if let (Some(theirs), Some(ours)) = (h.cluster_id, self.cluster_id()) {
            if theirs == ours {
                return Ok(());
            }
            metrics::counter!("raftbridge_peer_other_cluster_total").increment(1);
            return Err(format!(
                "cluster id {theirs:032x} is not this node's: the same cluster name with another history (a cluster restored from a backup, and a node of the one it replaced, or two clusters started under one name)"
            ));
        }
        Ok(())
    }

    /// Accept peer connections until `shutdown`.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let maintainer = crate::supervise::spawn_until("peer link upkeep", &self.shutdown, self.clone().maintain());
        // Also when this loop panics (the node then drains): upkeep must not redial, and the
        // links must close before the node stops Raft.
        let _stop = StopLinks { net: self.clone(), maintainer };
        let handshakes = Arc::new(Mutex::new(Handshakes::default()));
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = self.shutdown.cancelled() => break,
            };
            match accepted {
                Ok((stream, remote)) => {
                    let Some(permit) = HandshakeSlot::take(&handshakes, remote.ip()) else {
                        metrics::counter!("raftbridge_peer_rejected_total").increment(1);
                        debug!(%remote, "peer connection closed: too many handshakes in progress (from it, or in all)");
                        continue;
                    };
                    let net = self.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Err(reason) = net.accept(stream).await {
                            metrics::counter!("raftbridge_peer_rejected_total").increment(1);
                            info!(%remote, %reason, "peer connection rejected");
                        }
                    });
                }
                Err(err) => {
                    warn!(cause = %err, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn accept(self: &Arc<Self>, stream: TcpStream) -> Result<(), String> {
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (rd, wr, bound) = match &self.cfg.tls {
            // Before anything of ours is read: a peer without a certificate from the cluster CA
            // gets no further than the TLS handshake.
            Some(tls) => tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream))
                .await
                .map_err(|_| "no TLS handshake in time".to_string())?
                .map_err(|e| format!("TLS: {e}"))?,
            None => {
                let (rd, wr) = tls::plain(stream);
                (rd, wr, Ok(Vec::new()))
            }
        };
        let mut reader = FramedRead::new(rd, frame::codec(HANDSHAKE_FRAME.min(self.cfg.max_frame)));
        let mut writer = FramedWrite::new(wr, frame::codec(self.cfg.max_frame));
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next())
            .await
            .map_err(|_| "no handshake in time".to_string())?
            .ok_or("closed before handshake")?
            .map_err(|e| format!("bad first frame: {e}"))?;
        let frame = Frame::decode(first).map_err(|e| e.to_string())?;
        if frame.kind != Kind::Hello {
            return Err(format!("expected Hello, got {:?}", frame.kind));
        }
        let theirs = Hello::decode(&frame).map_err(|e| format!("bad Hello: {e}"))?;
        // A member's certificate does not make it any member: the id it claims must be one its
        // certificate is bound to, if it names any (`tls::NODE_URI`).
        let checked = self.check_hello(&theirs).and_then(|()| match &self.cfg.tls {
            Some(tls) => tls.check_peer(theirs.node_id, &bound),
            None => Ok(()),
        });
        if let Err(reason) = checked {
            let _ = writer.send(Frame::encode_raw(Kind::Reject, 0, reason.as_bytes())).await;
            return Err(reason);
        }
        if theirs.node_id == self.cfg.node_id && theirs.incarnation != self.incarnation {
            let reason = format!("node id {} is already in use by this node", theirs.node_id);
            let _ = writer.send(Frame::encode_raw(Kind::Reject, 0, reason.as_bytes())).await;
            return Err(reason);
        }
        if self.cfg.secret.is_none() {
            if let Some(reason) = self.refuse_claimant(&theirs) {
                let _ = writer.send(Frame::encode_raw(Kind::Reject, 0, reason.as_bytes())).await;
                return Err(reason);
            }
        }
        let mut ours = self.hello();
        if let Some(secret) = &self.cfg.secret {
            ours.proof = secret.prove(PROOF_ACCEPTOR, &theirs, &ours);
        }
        let ack = Frame::encode(Kind::HelloAck, 0, &ours).map_err(|e| e.to_string())?;
        writer.send(ack).await.map_err(|e| e.to_string())?;
        if theirs.node_id == self.cfg.node_id {
            // We dialed ourselves (our own address is in the seed list); the dialer notices too.
            return Ok(());
        }
        if let Some(secret) = &self.cfg.secret {
            // Nothing of the peer's is served before it has proved the secret.
            let next = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await;
            let proved = match next {
                Ok(Some(Ok(raw))) => Frame::decode(raw).ok().filter(|f| f.kind == Kind::Auth),
                _ => None,
            };
            if !proved.is_some_and(|f| secret.verify(PROOF_DIALER, &theirs, &ours, &f.payload)) {
                let reason = format!("node {} did not prove the cluster secret", theirs.node_id);
                let _ = writer.send(Frame::encode_raw(Kind::Reject, 0, reason.as_bytes())).await;
                return Err(reason);
            }
        }
        // With a secret, judged once the dialer has proved it: nothing of the membership is
        // told to whoever merely connects. (Without one, before the `HelloAck` above, which
        // ends the handshake for the dialer.)
        if self.cfg.secret.is_some() {
            if let Some(reason) = self.refuse_claimant(&theirs) {
                let _ = writer.send(Frame::encode_raw(Kind::Reject, 0, reason.as_bytes())).await;
                return Err(reason);
            }
        }
        reader.decoder_mut().set_max_frame_length(self.cfg.max_frame);
        self.start_link(theirs.node_id, theirs.addr.clone(), theirs.node_id, &theirs, reader, writer);
        Ok(())
    }

    /// Why a handshake from `theirs` is refused when it claims the id of a member that still
    /// answers elsewhere (`member_answering_elsewhere`), said in the log and counted.
    fn refuse_claimant(&self, theirs: &Hello) -> Option<String> {
        let member = self.member_answering_elsewhere(theirs)?;
        // The claimant redials every link-upkeep tick (500 ms): a warning at most every
        // `REFUSAL_LOGGED_EVERY`, the rest at debug (all counted).
        if now_due(&CLAIMANT_WARNED, REFUSAL_LOGGED_EVERY) {
            warn!(peer = theirs.node_id, claimant = %theirs.addr, %member, "refused a peer link under the id of a member that still answers at its own address (said at most every 10 s)");
        } else {
            debug!(peer = theirs.node_id, claimant = %theirs.addr, %member, "refused a peer link under the id of a member that still answers at its own address");
        }
        metrics::counter!("raftbridge_peer_links_refused_total", "cause" => "id_in_use").increment(1);
        Some(format!(
            "node id {} is in use by a member that still answers at {member}: a second process started with its id? \
             (a member that moved to a new address gets in once the old one has been silent for {} ms)",
            theirs.node_id,
            MEMBER_SILENT.as_millis()
        ))
    }

    /// The address of member `theirs.node_id`'s live link when `theirs` claims that id from
    /// another process (another incarnation) at another address while the member still
    /// answers at the address the membership holds for it: a second process started with a
    /// member's id (a copied data dir, a container rescheduled while the old one runs). Let in,
    /// its link replaced the member's at every node, the member's own came back and replaced
    /// it in turn, and between them Raft's appends went to both (the leader saw the member's
    /// log "go back" and demoted it, again and again). A member that really moved gets in once
    /// its old link has been silent for `MEMBER_SILENT` (a dead process answers no pings), and
    /// one restarted at its own address always does.
    fn member_answering_elsewhere(&self, theirs: &Hello) -> Option<String> {
        let links = lock(&self.links);
        let old = links.get(&theirs.node_id)?;
        let answering = old.is_alive() && lock(&old.last_seen).elapsed() < MEMBER_SILENT;
        if !answering || old.incarnation == theirs.incarnation || old.peer_addr == theirs.addr {
            return None;
        }
        // `links` then `addrs`, as everywhere.
        let at_member_addr = lock(&self.addrs).get(&theirs.node_id).is_some_and(|a| *a == old.peer_addr);
        at_member_addr.then(|| old.peer_addr.clone())
    }

    fn start_link(
        &self,
        peer: NodeId,
        peer_addr: String,
        dialer: NodeId,
        theirs: &Hello,
        reader: Reader,
        writer: Writer,
    ) -> Arc<Link> {
        let budget = queue_budget(link_max_frame(self.cfg.max_frame, theirs.settings));
        let (bulk, rx) = Lane::new(SEND_QUEUE, budget);
        let (raft, raft_rx) = Lane::new(RAFT_SEND_QUEUE, budget);
        let link = Arc::new(Link {
            peer,
            peer_addr,
            dialer,
            incarnation: theirs.incarnation,
            features: theirs.features & frame::features::ALL,
            max_frame: link_max_frame(self.cfg.max_frame, theirs.settings),
            bulk,
            raft,
            pending: Mutex::new(HashMap::new()),
            outstanding: Arc::new(Semaphore::new(MAX_OUTSTANDING)),
            raft_outstanding: Arc::new(Semaphore::new(MAX_RAFT_OUTSTANDING)),
            next_corr: AtomicU64::new(1),
            closed: self.shutdown.child_token(),
            last_seen: Mutex::new(tokio::time::Instant::now()),
            serving: AtomicU64::new(0),
            their_cluster_id: theirs.cluster_id.filter(|_| self.cluster_id().is_none()),
            our_cluster_id: self.cfg.cluster_id.clone(),
            answering: AtomicU64::new(0),
            probes: Mutex::new(VecDeque::new()),
            clock: Mutex::new(None),
            settings: theirs.settings,
        });
        #[cfg(test)]
        self.links_made.fetch_add(1, Ordering::Relaxed);
        let existing = self.register(&link);
        if existing.is_some() {
            debug!(peer, "duplicate link retired by tie-break");
            retire(&link);
        } else {
            metrics::counter!("raftbridge_peer_links_opened_total").increment(1);
            info!(peer, addr = %link.peer_addr, "peer link up");
        }
        tokio::spawn(write_loop(link.clone(), [raft_rx, rx], writer, write_stall(self.cfg.idle_timeout)));
        let handler = lock(&self.handler).clone();
        let idle = self.cfg.idle_timeout;
        let net_links = self.links.clone();
        let reader_link = link.clone();
        let chosen = existing.unwrap_or_else(|| link.clone());
        tokio::spawn(async move {
            let link = reader_link;
            read_loop(link.clone(), reader, handler, idle).await;
            link.close();
            for (_, tx) in lock(&link.pending).drain() {
                drop(tx);
            }
            let mut links = lock(&net_links);
            if links.get(&link.peer).is_some_and(|l| Arc::ptr_eq(l, &link)) {
                links.remove(&link.peer);
                info!(peer = link.peer, "peer link down");
            }
        });
        chosen
    }

    /// Decide whether a new link replaces the current one (see the module comment). Returns the
    /// existing link when it wins; `None` when the new one is registered.
    fn register(&self, link: &Arc<Link>) -> Option<Arc<Link>> {
        let mut links = lock(&self.links);
        if self.shutting_down.load(Ordering::Relaxed) {
            // Shutting down: register nothing; the new link is closed and its callers fail fast.
            return Some(link.clone());
        }
        if let Some(old) = links.get(&link.peer) {
            if old.is_alive() && old.incarnation == link.incarnation {
                let preferred = self.cfg.node_id.min(link.peer);
                if !(link.dialer == preferred && old.dialer != preferred) {
                    return Some(old.clone());
                }
                // The same process on both ends: requests in flight on the old link may still
                // complete; it just takes no new ones.
                retire(old);
            } else {
                // The peer restarted (or the link died): nothing in flight can complete.
                old.close();
            }
        }
        // Members only (the address book; `links` is held here, then `addrs`, never the other
        // way round): a node id that merely completed a handshake left an entry for good
        // (`forget_peer` runs for members only). A node that links before it is in the address
        // book (a joiner) has its features noted when it is added (`set_peer_addr`).
        if lock(&self.addrs).contains_key(&link.peer) {
            lock(&self.features_seen).insert(link.peer, link.features);
        }
        links.insert(link.peer, link.clone());
        None
    }

    /// Exports the peer's latest clock offset, and warns while it is beyond `clock::MAX_OFFSET`.
    fn check_clock(&self, link: &Link) {
        let Some(reading) = *lock(&link.clock) else { return };
        let verdict = {
            // Under `addrs` (then `offsets` or `clocks`, each alone; `no_peer_clock_behind`
            // takes `addrs` then `offsets` too): a peer forgotten meanwhile (`forget_peer`) is
            // not brought back by a link it had, neither its reading nor its warning state.
            let addrs = lock(&self.addrs);
            if !addrs.contains_key(&link.peer) {
                return;
            }
            lock(&self.offsets).insert(link.peer, reading);
            metrics::gauge!(CLOCK_GAUGE, "peer" => link.peer.to_string()).set(reading.seconds());
            lock(&self.clocks).note(link.peer, &reading, std::time::Instant::now())
        };
        let offset_ms = reading.offset_us / 1000;
        let uncertainty_ms = reading.uncertainty_us / 1000;
        match verdict {
            clock::Verdict::Warn => warn!(peer = link.peer, offset_ms, uncertainty_ms, max_ms = clock::MAX_OFFSET.as_millis() as u64,
                "peer clock differs from ours: idempotency leases, dedup windows and event retention assume clocks within \
                 about a second; check time sync (chrony, NTP) on both nodes"),
            clock::Verdict::Recovered => info!(peer = link.peer, offset_ms, "peer clock agrees with ours again"),
            clock::Verdict::Quiet => {}
        }
    }

    /// Keep links to every known peer up; pings keep idle links verified and measure the
    /// peers' clocks.
    async fn maintain(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PING_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = tokio::time::Instant::now();
            let links: Vec<Arc<Link>> = lock(&self.links).values().cloned().collect();
            for link in &links {
                if now.duration_since(*lock(&link.last_seen)) > self.cfg.idle_timeout {
                    warn!(peer = link.peer, "peer link idle too long, closing");
                    link.close();
                } else {
                    self.check_clock(link);
                    self.note_settings(link.peer, link.settings);
                    let corr = self.next_probe.fetch_add(1, Ordering::Relaxed);
                    {
                        let mut probes = lock(&link.probes);
                        if probes.len() >= clock::PROBES {
                            probes.pop_front();
                        }
                        probes.push_back(clock::Probe { corr, sent: std::time::Instant::now(), sent_wall_us: clock::wall_us() });
                    }
                    let _ = link.raft.tx.try_send(Queued::small(Frame::encode_raw(Kind::Ping, corr, &[])));
                }
            }
            let wanted: Vec<(NodeId, String)> =
                lock(&self.addrs).iter().map(|(id, a)| (*id, a.clone())).collect();
            for (id, addr) in wanted {
                if !self.reachable(id) {
                    let net = self.clone();
                    tokio::spawn(async move {
                        if let Err(err) = net.redial(&addr).await {
                            debug!(peer = id, cause = %err, "redial failed");
                        }
                    });
                }
            }
        }
    }
}

/// Ends what `PeerNet::run` started when it returns or unwinds: link upkeep (no more redials),
/// then every link.
struct StopLinks {
    net: Arc<PeerNet>,
    maintainer: tokio::task::JoinHandle<()>,
}

impl Drop for StopLinks {
    fn drop(&mut self) {
        self.net.shutting_down.store(true, Ordering::Relaxed);
        self.maintainer.abort();
        for link in lock(&self.net.links).drain().map(|(_, l)| l) {
            link.close();
        }
    }
}

/// How long a link that lost the duplicate tie-break keeps serving what is in flight on it.
const RETIRE_GRACE: Duration = Duration::from_secs(10);

/// Stop using a duplicate link for new requests (it is no longer registered) but let requests in
/// flight on it finish, in both directions; close it when nothing is pending or after the grace.
fn retire(link: &Arc<Link>) {
    let link = link.clone();
    tokio::spawn(async move {
        let until = tokio::time::Instant::now() + RETIRE_GRACE;
        while tokio::time::Instant::now() < until && !link.closed.is_cancelled() {
            if lock(&link.pending).is_empty() && link.serving.load(Ordering::Relaxed) == 0 {
                // Give the peer a moment to see the same tie-break before closing under it.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if lock(&link.pending).is_empty() && link.serving.load(Ordering::Relaxed) == 0 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        link.close();
    });
}

/// How long one write to a link (a frame handed to the socket, a flush) may take before the
/// link is closed, besides 1 µs per byte it moves (`write_loop`): the idle timeout, and at
/// least 10 s. The idle timeout itself judges only what the peer sends: a peer that keeps
/// pinging but stopped reading (paused, or hostile) kept the link, its queued frames (up to
/// each lane's bound, answers and appends resent after their callers gave up) and the serving tasks
/// waiting to queue more, for as long as it liked.
fn write_stall(idle_timeout: Duration) -> Duration {
    idle_timeout.max(MIN_WRITE_STALL)
}

/// The least `write_stall` (shorter in unit tests, to see it happen).
#[cfg(not(test))]
const MIN_WRITE_STALL: Duration = Duration::from_secs(10);
#[cfg(test)]
const MIN_WRITE_STALL: Duration = Duration::from_secs(1);

/// Writes queued frames, many per flush, until the link closes, or a write makes no progress
/// for `stall` (`write_stall`). `lanes`: the Raft lane's queue, then the bulk lane's; each
/// frame is taken from the first that holds one (`Lane`).
async fn write_loop(
    link: Arc<Link>,
    lanes: [mpsc::Receiver<Queued>; 2],
    mut writer: Writer,
    stall: Duration,
) {
    let frames = metrics::counter!("raftbridge_peer_frames_written_total");
    let flushes = metrics::counter!("raftbridge_peer_flushes_total");
    // One cancellation waiter for the link's life, not one per flush.
    let closed = link.closed.cancelled();
    tokio::pin!(closed);
    // A write that cannot go out (a peer that stopped reading: paused, cut off) is abandoned
    // when the link closes (idle timeout, shutdown): waiting on it kept this task, the socket
    // and every queued frame, and the serving tasks waiting to queue their answers, for as long
    // as the peer stayed silent.
    // Bytes handed to the writer since its last flush: a write may take `stall` and 1 µs per
    // byte it has to move (1 MB/s), so a big frame on a slow link that is moving is not cut.
    let mut pending = 0usize;
    // The frames' room in each lane's byte budget, merged into one permit per lane (one
    // release per flush).
    let mut held: [Option<tokio::sync::OwnedSemaphorePermit>; 2] = [None, None];
    let [mut raft_rx, mut rx] = lanes;
    let limit = |bytes: usize| stall + Duration::from_micros(bytes as u64);
    macro_rules! or_closed {
        ($io:expr, $bytes:expr) => {
            // The write first: one that can finish (the last answers of a draining node) does,
            // whether or not the link closed meanwhile.
            tokio::select! {
                biased;
                r = tokio::time::timeout(limit($bytes), $io) => match r {
                    Ok(written) => written.is_ok(),
                    Err(_) => {
                        metrics::counter!("raftbridge_peer_write_stalls_total").increment(1);
                        warn!(peer = link.peer, stalled_s = stall.as_secs(), "peer link closed: the peer has read nothing of it for that long");
                        false
                    }
                },
                () = &mut closed => false,
            }
        };
    }
    loop {
        // Frames already queued go out first, also once the link closed (nothing new is queued
        // on a closed link): they are answers someone waits for, a draining node's last ones.
        // (The receivers never end while this holds the link, whose lanes send.)
        let (lane, first) = tokio::select! {
            biased;
            Some(f) = raft_rx.recv() => (0, f),
            Some(f) = rx.recv() => (1, f),
            () = &mut closed => break,
        };
        pending += first.frame.len();
        // The frames' room in the byte budget, given back after the flush: until then the
        // writer's buffer holds a copy of each.
        hold(&mut held[lane], first.room);
        if !or_closed!(writer.feed(first.frame), pending) {
            link.close();
            return;
        }
        let mut n = 1;
        let mut yielded = false;
        while n < WRITE_BATCH {
            match raft_rx.try_recv().map(|f| (0, f)).or_else(|_| rx.try_recv().map(|f| (1, f))) {
                Ok((lane, f)) => {
                    pending += f.frame.len();
                    hold(&mut held[lane], f.room);
                    if !or_closed!(writer.feed(f.frame), pending) {
                        link.close();
                        return;
                    }
                    n += 1;
                }
                // Once per flush, let the tasks that are ready run first: responses completed by
                // one commit are queued by their own tasks a moment apart, and this gathers them
                // into one write (measured: 1.1 -> 4.2 frames per write on the leader's links,
                // a quarter of the writes and their wake-ups on the peer).
                Err(_) if !yielded => {
                    yielded = true;
                    tokio::task::yield_now().await;
                }
                Err(_) => break,
            }
        }
        frames.increment(n as u64);
        flushes.increment(1);
        if !or_closed!(SinkExt::<Bytes>::flush(&mut writer), pending) {
            link.close();
            return;
        }
        pending = 0;
        held = [None, None];
    }
    link.close();
    // Closed by either side, the connection still works: end it cleanly (a TLS close_notify,
    // then FIN), so that the peer reads an orderly end instead of warning of a truncated TLS
    // stream at every graceful restart. Bounded: the peer may have gone.
    let _ = tokio::time::timeout(CLEAN_CLOSE, SinkExt::<Bytes>::close(&mut writer)).await;
}

/// Adds a frame's room to the room the writer holds until its flush (`write_loop`).
fn hold(held: &mut Option<tokio::sync::OwnedSemaphorePermit>, room: Option<tokio::sync::OwnedSemaphorePermit>) {
    match (held.as_mut(), room) {
        (Some(all), Some(room)) => all.merge(room),
        (None, room) => *held = room,
        (Some(_), None) => {}
    }
}

/// How long a link's writer may take to end its connection cleanly.
const CLEAN_CLOSE: Duration = Duration::from_millis(200);

/// Reads frames until the connection ends, errs, or the link closes; serves requests concurrently
/// (bounded) and completes outstanding calls with their responses.
async fn read_loop(
    link: Arc<Link>,
    mut reader: Reader,
    handler: Option<Arc<dyn Handler>>,
    idle: Duration,
) {
    let serving = Arc::new(Semaphore::new(MAX_SERVING));
    let raft_serving = Arc::new(Semaphore::new(MAX_RAFT_SERVING));
    let awaiting = Arc::new(Semaphore::new(MAX_AWAITING));
    let appending = Arc::new(Semaphore::new(MAX_APPENDING));
    // One timer and one cancellation waiter for the link's life, not one of each per frame
    // (perf put ~3% of a node's samples under registering and dropping them; no throughput
    // change was measurable): the timer fires at most once per `idle` and is then pushed to
    // `idle` after the last frame read.
    let closed = link.closed.cancelled();
    tokio::pin!(closed);
    let silence = tokio::time::sleep(idle);
    tokio::pin!(silence);
    loop {
        let next = tokio::select! {
            n = reader.next() => n,
            () = &mut silence => {
                let heard = *lock(&link.last_seen);
                if heard.elapsed() >= idle {
                    warn!(peer = link.peer, "peer link silent, closing");
                    return;
                }
                silence.as_mut().reset(heard + idle);
                continue;
            }
            () = &mut closed => return,
        };
        let raw = match next {
            Some(Ok(raw)) => raw,
            Some(Err(err)) => {
                warn!(peer = link.peer, cause = %err, "peer link read error, closing");
                return;
            }
            None => return,
        };
        link.touch();
        if link.other_history() {
            // Made before this node held its id (a new or emptied node), to a node of another
            // history: nothing more of it is taken, and a redial meets the handshake's check.
            metrics::counter!("raftbridge_peer_other_cluster_total").increment(1);
            warn!(peer = link.peer, "peer link to a node of another cluster id (made before this node held its own), closing");
            return;
        }
        let frame = match Frame::decode(raw) {
            Ok(f) => f,
            Err(err) => {
                warn!(peer = link.peer, cause = %err, "bad frame, closing link");
                return;
            }
        };
        match frame.kind {
            Kind::Ping => {
                let _ = link.raft.tx.try_send(Queued::small(Frame::encode_raw(Kind::Pong, frame.corr, &clock::pong_payload())));
            }
            Kind::Pong => {
                let probe = {
                    // This one, and the older ones too: their Pongs would come first.
                    let mut probes = lock(&link.probes);
                    let at = probes.iter().position(|p| p.corr == frame.corr);
                    at.and_then(|at| probes.drain(..=at).next_back())
                };
                if let Some(reading) = probe.and_then(|p| clock::measure(&p, &frame.payload, std::time::Instant::now())) {
                    *lock(&link.clock) = Some(reading);
                }
            }
            Kind::Response => {
                if let Some(tx) = lock(&link.pending).remove(&frame.corr) {
                    let _ = tx.send(frame);
                }
            }
            Kind::Request => {
                let Some(handler) = handler.clone() else { return };
                let req: PeerRequest = match frame.message() {
                    Ok(r) => r,
                    Err(err) => {
                        warn!(peer = link.peer, cause = %err, "undecodable request, closing link");
                        return;
                    }
                };
                // The link's peer is the node it proved to be at the handshake (its certificate's
                // node id, when bound): a Raft RPC in another node's name (a vote for another
                // candidate, an append as another leader) is hostile, and ends the link.
                if let Some(sender) = req.raft_sender().filter(|s| *s != link.peer) {
                    metrics::counter!("raftbridge_peer_impersonations_total").increment(1);
                    warn!(peer = link.peer, sender, request = req.name(), "a Raft request in another node's name, closing link");
                    return;
                }
                // Raft's own requests (a few appends the leader pipelines, a vote, a snapshot
                // chunk) take no slot of `serving`: nothing may hold them up. Appends are bounded
                // by `appending`, the others by `raft_serving`. Any request without a slot is
                // answered `NotServed` at once (no handler runs; the caller may go elsewhere):
                // waiting for a slot stopped this reader, and with it the link's responses and
                // Raft traffic, whenever the peer had given up on requests still served here (a
                // caller's timeout frees its side, not ours).
                // Raft's own: its serving slots, and its answer in the Raft lane.
                let raft = req.raft_sender().is_some();
                let (slots, n) = match (&req, raft) {
                    (PeerRequest::AppendEntries(_), _) => (&appending, MAX_APPENDING),
                    (_, true) => (&raft_serving, MAX_RAFT_SERVING),
                    (PeerRequest::AwaitDelivery { .. }, _) => (&awaiting, MAX_AWAITING),
                    (_, false) => (&serving, MAX_SERVING),
                };
                let permit = match slots.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        metrics::counter!("raftbridge_peer_requests_shed_total").increment(1);
                        let busy = PeerResponse::Error(message::RemoteError::NotServed(format!("{n} requests of this kind from this node are being served here")));
                        // Not waited for either: with the send queue full the caller times out.
                        if let Ok(body) = Frame::encode(Kind::Response, frame.corr, &busy) {
                            let _ = link.lane(raft).tx.try_send(Queued::small(body));
                        }
                        continue;
                    }
                };
                let link = link.clone();
                let corr = frame.corr;
                link.serving.fetch_add(1, Ordering::Relaxed);
                if !raft {
                    link.answering.fetch_add(1, Ordering::Relaxed);
                }
                // Called here, in arrival order (see `Handler`), not in the spawned task: tasks
                // spawned together may start in any order.
                let serve = handler.handle(link.peer, req);
                let served_on = link.closed.clone();
                tokio::spawn(SERVED_ON.scope(served_on, async move {
                    let _permit = permit;
                    let mut resp = serve.await.for_peer(link.features);
                    let mut encoded = Frame::encode(Kind::Response, corr, &resp);
                    if encoded.as_ref().is_ok_and(|body| body.len() > link.max_frame) {
                        // The writer would refuse it and close the link: answer with why instead.
                        let size = encoded.as_ref().map_or(0, Bytes::len);
                        warn!(peer = link.peer, size, limit = link.max_frame, "response over the frame limit, answering an error instead");
                        resp = PeerResponse::Error(message::RemoteError::Internal(format!("a response of {size} bytes is over the {}-byte frame limit", link.max_frame)));
                        encoded = Frame::encode(Kind::Response, corr, &resp);
                    }
                    match encoded {
                        // Room waited for while this request's serving slot is held: a peer that
                        // reads slowly is answered `NotServed` for new requests meanwhile.
                        Ok(body) => {
                            if let Ok(room) = link.room_for(raft, body.len()).await {
                                let _ = link.lane(raft).tx.send(Queued { frame: body, room: Some(room) }).await;
                            }
                        }
                        Err(err) => warn!(peer = link.peer, cause = %err, "response does not encode"),
                    }
                    link.serving.fetch_sub(1, Ordering::Relaxed);
                    if !raft {
                        link.answering.fetch_sub(1, Ordering::Relaxed);
                    }
                }));
            }
            // With a cluster secret, the dialer's handshake ends with its `Auth`, and a refusal
            // judged after it (`refuse_claimant`) comes as the link's first frame: said, with
            // the acceptor's reason, so that the refused process's log tells why.
            Kind::Reject => {
                let reason = String::from_utf8_lossy(&frame.payload[..frame.payload.len().min(512)]).into_owned();
                // Redialed every link-upkeep tick while the refusal holds.
                if now_due(&REFUSED_WARNED, REFUSAL_LOGGED_EVERY) {
                    warn!(peer = link.peer, %reason, "the peer refused this link, closing (said at most every 10 s)");
                } else {
                    debug!(peer = link.peer, %reason, "the peer refused this link, closing");
                }
                return;
            }
            Kind::Hello | Kind::HelloAck | Kind::Auth => {
                warn!(peer = link.peer, kind = ?frame.kind, "handshake frame on an established link, closing");
                return;
            }
        }
    }
}

/// The frame limit of a link: the smaller of ours and the one the peer announced. Nodes may
/// run with different `--max-frame` during a rolling change of the flag (a warning, not a
/// refusal: `note_settings`), and a frame over the peer's limit would close the link at its
/// reader. A peer that announced none (an older build) or less than any node accepts is taken
/// to have ours.
fn link_max_frame(ours: usize, theirs: Option<frame::Settings>) -> usize {
    match theirs.map(|s| s.max_frame) {
        Some(m) if m >= crate::config::MIN_MAX_FRAME as u64 => ours.min(usize::try_from(m).unwrap_or(usize::MAX)),
        _ => ours,
    }
}

/// Connects to `addr` (`host:port`, every address it resolves to in turn), from `source` when
/// one is given and can reach that destination (`PeerConfig::source_ip`).
async fn open_tcp(addr: &str, source: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else { return TcpStream::connect(addr).await };
    let mut last = None;
    for dest in tokio::net::lookup_host(addr).await? {
        let fits = source.is_ipv4() == dest.is_ipv4() && (!source.is_loopback() || dest.ip().is_loopback());
        let attempt = async {
            if !fits {
                return TcpStream::connect(dest).await;
            }
            let socket = if dest.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            socket.bind(std::net::SocketAddr::new(source, 0))?;
            socket.connect(dest).await
        };
        match attempt.await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolved to no address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    type RawReader = Reader;
    type RawWriter = Writer;

    /// Dials leave from the configured source address when it can reach the destination (a
    /// loopback one here), and from wherever the kernel picks when it cannot (another family).
    /// Linux: any 127.0.0.0/8 address is a local one there.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn dials_leave_from_the_source_address_that_fits() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        for (source, seen) in [("127.0.0.7", "127.0.0.7"), ("::1", "127.0.0.1")] {
            let _out = open_tcp(&addr, Some(source.parse().unwrap())).await.unwrap();
            let (_in, from) = listener.accept().await.unwrap();
            assert_eq!(from.ip().to_string(), seen, "dialed with source {source}");
        }
        let _out = open_tcp(&addr, None).await.unwrap();
        assert_eq!(listener.accept().await.unwrap().1.ip().to_string(), "127.0.0.1");
    }

    /// Failed dials are remembered per address (their backoff), at most `MAX_DIAL_RECORDS`:
    /// records whose wait is over go first. (Port 1 on loopback addresses refuses at once.)
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn failed_dial_records_are_bounded() {
        let cfg = PeerConfig { node_id: 1, cluster: "t".into(), advertise: "127.0.0.1:1".into(), max_frame: 1 << 20, idle_timeout: Duration::from_secs(5), secret: None, tls: None, source_ip: None, cluster_id: Default::default(), recorded_features: Default::default() };
        let net = PeerNet::new(cfg, CancellationToken::new());
        let addr = |i: usize| format!("127.0.{}.{}:1", 1 + i / 250, 1 + i % 250);
        for i in 0..MAX_DIAL_RECORDS {
            assert!(net.dial_now(&addr(i)).await.is_err());
        }
        assert_eq!(lock(&net.dials).len(), MAX_DIAL_RECORDS);
        // A member's address (node 2 at the first one) keeps its record.
        lock(&net.addrs).insert(2, addr(0));
        // Their waits (at most 100 ms after one failure) are over: the next failure makes room.
        tokio::time::sleep(BACKOFF_MIN * 2).await;
        assert!(net.dial_now(&addr(MAX_DIAL_RECORDS)).await.is_err());
        let mut kept: Vec<String> = lock(&net.dials).keys().cloned().collect();
        kept.sort();
        assert_eq!(kept, vec![addr(0), addr(MAX_DIAL_RECORDS)], "the member's and the new one's");
        assert_eq!(lock(&net.dials)[&addr(MAX_DIAL_RECORDS)].failures, 1);
    }

    /// A member not linked since this process started is counted by the features the state
    /// recorded, only when that record is newer than the membership in force; this node by
    /// its own build.
    #[tokio::test]
    async fn a_member_not_linked_is_known_by_a_record_newer_than_the_membership() {
        let recorded = crate::raft::types::RecordedFeatures::default();
        let cfg = PeerConfig { node_id: 1, cluster: "t".into(), advertise: "127.0.0.1:1".into(), max_frame: 1 << 20, idle_timeout: Duration::from_secs(5), secret: None, tls: None, source_ip: None, cluster_id: Default::default(), recorded_features: recorded.clone() };
        let net = PeerNet::new(cfg, CancellationToken::new());
        assert_eq!(net.features_known(1, 0), Some(frame::features::ALL));
        assert_eq!(net.features_known(5, 0), None, "nothing recorded");
        *recorded.write().unwrap() = crate::raft::types::MemberFeatures { revision: 10, by_node: [(5, 2047)].into() };
        assert_eq!(net.features_known(5, 9), Some(2047));
        assert_eq!(net.features_known(5, 10), None, "the membership changed at or after the record");
        assert_eq!(net.features_known(6, 9), None, "not in the record");
        lock(&net.features_seen).insert(5, frame::features::ALL);
        assert_eq!(net.features_known(5, 10), Some(frame::features::ALL), "a link's own word first");
    }

    /// Judged against a strict majority of all members (itself among them), net of each
    /// measure's uncertainty; a peer's offset is its clock minus ours.
    #[tokio::test]
    async fn a_clock_is_far_ahead_only_of_a_majority_measured_surely_behind() {
        let cfg = PeerConfig { node_id: 1, cluster: "t".into(), advertise: "127.0.0.1:1".into(), max_frame: 1 << 20, idle_timeout: Duration::from_secs(5), secret: None, tls: None, source_ip: None, cluster_id: Default::default(), recorded_features: Default::default() };
        let net = PeerNet::new(cfg, CancellationToken::new());
        let bound = Duration::from_secs(30);
        let set = |readings: &[(NodeId, i64, u64)]| {
            let mut addrs = lock(&net.addrs);
            let mut offsets = lock(&net.offsets);
            addrs.clear();
            offsets.clear();
            addrs.insert(1, "self".into());
            for (id, offset_ms, uncertainty_ms) in readings {
                addrs.insert(*id, format!("n{id}"));
                if *offset_ms != i64::MIN {
                    offsets.insert(*id, clock::ClockOffset { offset_us: offset_ms * 1000, uncertainty_us: uncertainty_ms * 1000 });
                }
            }
        };
        const UNMEASURED: i64 = i64::MIN;
        // Three nodes: both peers 150 s behind us → 150 s ahead (the least lead, net of uncertainty).
        set(&[(2, -150_000, 0), (3, -160_000, 2_000)]);
        assert_eq!(net.clock_ahead_of_most(bound), Some(150_000));
        // One peer behind, one in step: not a majority.
        set(&[(2, -150_000, 0), (3, 100, 0)]);
        assert_eq!(net.clock_ahead_of_most(bound), None);
        // Peers ahead of us (positive offsets) are no lead of ours.
        set(&[(2, 150_000, 0), (3, 160_000, 0)]);
        assert_eq!(net.clock_ahead_of_most(bound), None);
        // A lead within the uncertainty is not sure: 40 s behind ± 15 s is no lead over 30 s.
        set(&[(2, -40_000, 15_000), (3, -40_000, 15_000)]);
        assert_eq!(net.clock_ahead_of_most(bound), None);
        // Unmeasured peers count as not behind (a node just started judges nothing).
        set(&[(2, -150_000, 0), (3, UNMEASURED, 0)]);
        assert_eq!(net.clock_ahead_of_most(bound), None);
        // Two nodes: a tie, neither side is judged.
        set(&[(2, -150_000, 0)]);
        assert_eq!(net.clock_ahead_of_most(bound), None);
        // Five nodes: three of the four others behind is a majority of five.
        set(&[(2, -60_000, 0), (3, -61_000, 0), (4, -62_000, 0), (5, 0, 0)]);
        assert_eq!(net.clock_ahead_of_most(bound), Some(60_000));
        assert_eq!(net.clock_behind_most(bound), None);
        assert_eq!(net.clock_correction_ms(bound), -60_000, "read in most members' time");
        // The other way: both peers ahead of us, by the same rules.
        set(&[(2, 150_000, 0), (3, 160_000, 2_000)]);
        assert_eq!((net.clock_behind_most(bound), net.clock_ahead_of_most(bound)), (Some(150_000), None));
        assert_eq!(net.clock_correction_ms(bound), 150_000);
        set(&[(2, 40_000, 15_000), (3, 40_000, 15_000)]);
        assert_eq!(net.clock_behind_most(bound), None, "within the uncertainty");
        set(&[(2, 150_000, 0), (3, UNMEASURED, 0)]);
        assert_eq!(net.clock_behind_most(bound), None, "not a majority");
        assert_eq!(net.clock_correction_ms(bound), 0);
        // Five nodes at 0, 0, 0, -50 and -100 s against this one: 100 s ahead of most members
        // (three of five), though only 50 s ahead of one of them.
        set(&[(2, -100_000, 0), (3, -100_000, 0), (4, -100_000, 0), (5, -50_000, 0)]);
        assert_eq!(net.clock_correction_ms(bound), -100_000);
        set(&[(2, 100_000, 0), (3, 100_000, 0), (4, 100_000, 0), (5, 50_000, 0)]);
        assert_eq!(net.clock_correction_ms(bound), 100_000);
        // Two of four peers behind: not a majority of five.
        set(&[(2, -100_000, 0), (3, -100_000, 0), (4, 0, 0), (5, 0, 0)]);
        assert_eq!(net.clock_correction_ms(bound), 0);
    }

    /// Node 1 accepting peer links on a free loopback port; `stop` ends it.
    async fn listening(idle_timeout: Duration) -> (Arc<PeerNet>, std::net::SocketAddr, CancellationToken) {
        let cfg = PeerConfig { node_id: 1, cluster: "t".into(), advertise: "127.0.0.1:1".into(), max_frame: 1 << 20, idle_timeout, secret: None, tls: None, source_ip: None, cluster_id: Default::default(), recorded_features: Default::default() };
        let stop = CancellationToken::new();
        let net = PeerNet::new(cfg, stop.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(net.clone().run(listener));
        (net, addr, stop)
    }

    /// A node with `secret` listening on port 0 (id 1), and a second one (id 2) with
    /// `dialer_secret` that knows its address.
    async fn pair(secret: Option<&str>, dialer_secret: Option<&str>) -> (Arc<PeerNet>, Arc<PeerNet>, std::net::SocketAddr, CancellationToken) {
        pair_framed(secret, dialer_secret, (1 << 20, 1 << 20)).await
    }

    /// `pair` with each side's `--max-frame` (acceptor, dialer), each announced in its `Hello`.
    async fn pair_framed(secret: Option<&str>, dialer_secret: Option<&str>, frames: (usize, usize)) -> (Arc<PeerNet>, Arc<PeerNet>, std::net::SocketAddr, CancellationToken) {
        let stop = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = |node_id, advertise: String, secret: Option<&str>| PeerConfig {
            node_id,
            cluster: "t".into(),
            advertise,
            max_frame: if node_id == 1 { frames.0 } else { frames.1 },
            idle_timeout: Duration::from_secs(10),
            secret: secret.map(|s| ClusterSecret::new(s.as_bytes())),
            tls: None,
            source_ip: None,
            cluster_id: Default::default(),
            recorded_features: Default::default(),
        };
        let acceptor = PeerNet::new(cfg(1, addr.to_string(), secret), stop.clone());
        let dialer = PeerNet::new(cfg(2, "127.0.0.1:1".into(), dialer_secret), stop.clone());
        if frames.0 != frames.1 {
            acceptor.announce_settings(frame::Settings { max_frame: frames.0 as u64, ..frame::Settings::default() });
            dialer.announce_settings(frame::Settings { max_frame: frames.1 as u64, ..frame::Settings::default() });
        }
        tokio::spawn(acceptor.clone().run(listener));
        dialer.set_peer_addr(1, &addr.to_string());
        (acceptor, dialer, addr, stop)
    }

    /// A peer that takes the connection but never completes the handshake costs a request to
    /// an address (a seed probe, a join's address check) its own timeout, not the handshake's
    /// several seconds on top; the request was never sent.
    #[tokio::test]
    async fn a_request_to_an_address_includes_making_the_link_in_its_deadline() {
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            for _ in 0..4 {
                open.push(silent.accept().await.unwrap().0);
            }
        });
        let (_acceptor, dialer, _, stop) = pair(None, None).await;
        let asked = tokio::time::Instant::now();
        let e = dialer.request_addr(&addr, &PeerRequest::Status, Duration::from_millis(300)).await.unwrap_err();
        assert!(asked.elapsed() < Duration::from_millis(2_000), "took {:?}", asked.elapsed());
        assert!(matches!(e, PeerError::NoLinkInTime { .. }) && e.not_delivered(), "{e}");
        held.abort();
        stop.cancel();
    }

    /// A second process that claims a member's id from another address is refused while the
    /// member answers at the address the membership holds for it (the member's link stays as
    /// it was); once the member is gone, the same claimant gets in (a member that moved).
    #[tokio::test]
    async fn a_second_process_with_a_members_id_is_refused_while_the_member_answers() {
        let (acceptor, addr, stop) = listening(Duration::from_secs(10)).await;
        let node = |advertise: &str, stop: &CancellationToken| {
            let cfg = PeerConfig { node_id: 2, cluster: "t".into(), advertise: advertise.into(), max_frame: 1 << 20, idle_timeout: Duration::from_secs(10), secret: None, tls: None, source_ip: None, cluster_id: Default::default(), recorded_features: Default::default() };
            let net = PeerNet::new(cfg, stop.clone());
            net.set_peer_addr(1, &addr.to_string());
            net
        };
        acceptor.set_peer_addr(2, "127.0.0.1:1");
        let member_stop = CancellationToken::new();
        let member = node("127.0.0.1:1", &member_stop);
        member.link(1).await.expect("the member links");
        let incarnation = |net: &PeerNet| lock(&net.links).get(&2).map(|l| l.incarnation);
        let before = incarnation(&acceptor);
        assert_eq!(before, Some(member.incarnation));
        let claimant = node("127.0.0.1:2", &stop);
        let Err(err) = claimant.link(1).await else { panic!("the claimant linked") };
        assert!(err.to_string().contains("in use by a member that still answers at 127.0.0.1:1"), "{err}");
        assert_eq!(incarnation(&acceptor), before, "the member's link stays");
        assert!(acceptor.reachable(2));
        // The member stops: its link ends, and the claimant is let in (a member that moved).
        member_stop.cancel();
        let mut linked = false;
        for _ in 0..100 {
            if claimant.link(1).await.is_ok() {
                linked = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(linked, "the claimant gets in once the member is gone");
        assert_eq!(incarnation(&acceptor), Some(claimant.incarnation));
        stop.cancel();
    }

    /// With a cluster secret the refusal comes after the dialer's `Auth`, as the first frame of
    /// its link: the claimant's link is closed at once, and the member's stays.
    #[tokio::test]
    async fn with_a_secret_a_second_process_with_a_members_id_is_refused_after_its_proof() {
        const SECRET: &str = "0123456789abcdef-secret";
        let (acceptor, member, addr, stop) = pair(Some(SECRET), Some(SECRET)).await;
        acceptor.set_peer_addr(2, "127.0.0.1:1");
        member.link(1).await.expect("the member links");
        let incarnation = |net: &PeerNet| lock(&net.links).get(&2).map(|l| l.incarnation);
        // The acceptor registers it once the `Auth` is checked, after the dialer's `link`.
        for _ in 0..100 {
            if incarnation(&acceptor).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(incarnation(&acceptor), Some(member.incarnation));
        let cfg = PeerConfig {
            node_id: 2,
            cluster: "t".into(),
            advertise: "127.0.0.1:2".into(),
            max_frame: 1 << 20,
            idle_timeout: Duration::from_secs(10),
            secret: Some(ClusterSecret::new(SECRET.as_bytes())),
            tls: None,
            source_ip: None,
            cluster_id: Default::default(),
            recorded_features: Default::default(),
        };
        let claimant = PeerNet::new(cfg, stop.clone());
        claimant.set_peer_addr(1, &addr.to_string());
        let _ = claimant.link(1).await;
        let mut closed = false;
        for _ in 0..100 {
            if !claimant.reachable(1) {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(closed, "the claimant's link is closed");
        assert_eq!(incarnation(&acceptor), Some(member.incarnation), "the member's link stays");
        assert!(member.reachable(1));
        stop.cancel();
    }

    #[tokio::test]
    async fn peers_with_the_same_secret_link_and_any_other_is_refused() {
        let (same, other) = ("0123456789abcdef-one", "0123456789abcdef-two");
        let (acceptor, dialer, _, stop) = pair(Some(same), Some(same)).await;
        dialer.link(1).await.expect("the same secret links");
        assert!(dialer.reachable(1));
        stop.cancel();
        for (theirs, ours, why) in [
            (Some(same), Some(other), "another secret"),
            (Some(same), None, "no secret on the dialer"),
            (None, Some(same), "no secret on the acceptor"),
        ] {
            let (acceptor, dialer, _, stop) = pair(theirs, ours).await;
            let Err(err) = dialer.link(1).await else { panic!("{why}: linked") };
            assert!(matches!(err, PeerError::Handshake { .. }), "{why}: {err}");
            assert_unlinked(&acceptor, &dialer, why).await;
            stop.cancel();
        }
        drop(acceptor);
    }

    /// Nodes whose states hold different cluster ids (a cluster restored from a backup and a
    /// node of the one it replaced) refuse each other's links; a node that holds none yet (new,
    /// emptied, or of a build before ids) links to either, and the same id links.
    #[tokio::test]
    async fn nodes_that_hold_different_cluster_ids_do_not_link() {
        for (acceptor_id, dialer_id, links, why) in [
            (Some(1u128), Some(2u128), false, "different ids"),
            (Some(7), Some(7), true, "the same id"),
            (None, Some(2), true, "an acceptor without one"),
            (Some(1), None, true, "a dialer without one"),
        ] {
            let (acceptor, dialer, _, stop) = pair(None, None).await;
            for (net, id) in [(&acceptor, acceptor_id), (&dialer, dialer_id)] {
                if let Some(id) = id {
                    net.cfg.cluster_id.set(id).expect("a new cell");
                }
            }
            assert_eq!((acceptor.hello().cluster_id, dialer.hello().cluster_id), (acceptor_id, dialer_id), "{why}: announced");
            match dialer.link(1).await {
                Ok(_) => assert!(links, "{why}: linked"),
                Err(err) => {
                    assert!(!links, "{why}: {err}");
                    assert!(err.to_string().contains("cluster id"), "{why}: {err}");
                    assert_unlinked(&acceptor, &dialer, why).await;
                }
            }
            stop.cancel();
        }
        // A link made while one side held no id carries nothing once that side holds another
        // id than the other announced: the acceptor closes it at the next frame it reads, the
        // dialer sends nothing more on it; a redial is refused either way.
        for dialer_learns in [false, true] {
            let why = if dialer_learns { "an id the dialer learned after the handshake" } else { "an id the acceptor learned after it" };
            let (acceptor, dialer, _, stop) = pair(None, None).await;
            let (knows, learns) = if dialer_learns { (&acceptor, &dialer) } else { (&dialer, &acceptor) };
            knows.cfg.cluster_id.set(1).expect("a new cell");
            dialer.link(1).await.unwrap_or_else(|e| panic!("{why}: one side holds no id yet: {e}"));
            learns.cfg.cluster_id.set(2).expect("a new cell");
            let sent = dialer.request(1, &PeerRequest::Status, Duration::from_secs(5)).await;
            if dialer_learns {
                assert!(matches!(sent, Err(PeerError::ClosedUnsent { .. })), "{why}: not sent: {sent:?}");
            } else {
                assert!(sent.is_err(), "{why}: a request over it: {sent:?}");
            }
            assert_unlinked(&acceptor, &dialer, why).await;
            let Err(err) = dialer.link(1).await else { panic!("{why}: relinked across cluster ids") };
            assert!(err.to_string().contains("cluster id"), "{why}: {err}");
            stop.cancel();
        }
    }

    /// An answer that does not decode closes the link, as a request that does not does.
    #[tokio::test]
    async fn an_undecodable_answer_closes_the_link() {
        let (net, addr, stop) = listening(Duration::from_secs(60)).await;
        let (mut reader, mut writer) = handshaken(&net, addr, 2).await;
        let answering = tokio::spawn(async move {
            while let Some(Ok(raw)) = reader.next().await {
                let Ok(f) = Frame::decode(raw) else { break };
                if f.kind == Kind::Request {
                    let _ = writer.send(Frame::encode_raw(Kind::Response, f.corr, &[0xff; 16])).await;
                }
            }
        });
        let err = net.request(2, &PeerRequest::Status, Duration::from_secs(5)).await.expect_err("garbage answer");
        assert!(matches!(err, PeerError::Protocol { .. }), "{err}");
        assert!(!net.reachable(2), "the link is closed");
        answering.abort();
        stop.cancel();
    }

    /// Features are noted for members only (the address book): a node id that merely
    /// linked leaves nothing behind, and a joiner that linked first counts once it is added.
    #[tokio::test]
    async fn features_are_noted_for_members_only() {
        let (acceptor, dialer, _, stop) = pair(None, None).await;
        dialer.link(1).await.expect("linked");
        assert_eq!(dialer.features_seen(1), Some(frame::features::ALL), "node 1 is in the dialer's address book");
        for _ in 0..200 {
            if acceptor.reachable(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(acceptor.reachable(2));
        assert_eq!(acceptor.features_seen(2), None, "node 2 linked but is no member of the acceptor's");
        acceptor.set_peer_addr(2, "127.0.0.1:1");
        assert_eq!(acceptor.features_seen(2), Some(frame::features::ALL), "noted once it is a member");
        acceptor.forget_peer(2);
        assert_eq!(acceptor.features_seen(2), None);
        stop.cancel();
    }

    /// A dialer with a secret that is answered at a member's address in another node's name
    /// sends no proof: whoever answers there could relay it to that node and act as us.
    #[tokio::test]
    async fn no_proof_goes_to_another_node_than_the_one_at_that_address() {
        let same = "0123456789abcdef-one";
        let (acceptor, dialer, addr, stop) = pair(Some(same), Some(same)).await;
        // The address book has node 5 at node 1's address (an address node 5 had, say).
        dialer.forget_peer(1);
        dialer.set_peer_addr(5, &addr.to_string());
        let Err(err) = dialer.link(5).await else { panic!("linked") };
        assert!(matches!(&err, PeerError::Handshake { reason, .. } if reason.contains("answered at node 5's address")), "{err}");
        assert_unlinked(&acceptor, &dialer, "no Auth sent").await;
        stop.cancel();
    }

    /// Pings measure each peer's clock: about zero between two nodes of one host, and a peer
    /// whose clock runs 10 s ahead is seen 10 s ahead, beyond the bound that warns.
    #[tokio::test]
    async fn pings_measure_each_peers_clock() {
        let (acceptor, dialer, addr, stop) = pair(None, None).await;
        dialer.link(1).await.expect("linked");
        let net = &acceptor;
        let reading = |id| async move {
            for _ in 0..200 {
                if let Some(r) = net.clock_offset(id) {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("no clock reading of node {id} within 10 s");
        };
        // The answer is stamped between our send and receive: within the uncertainty of the
        // midpoint (1 ms more for rounding).
        let same = reading(2).await;
        assert!(same.offset_us.unsigned_abs() <= same.uncertainty_us + 1_000, "one host, one clock: {same:?}");
        assert!(!same.beyond(clock::MAX_OFFSET));

        let (mut reader, mut writer) = handshaken(&acceptor, addr, 3).await;
        let ahead: i64 = 10_000_000;
        let answering = tokio::spawn(async move {
            while let Some(Ok(raw)) = reader.next().await {
                let Ok(f) = Frame::decode(raw) else { break };
                if f.kind == Kind::Ping && writer.send(Frame::encode_raw(Kind::Pong, f.corr, &(clock::wall_us() + ahead).to_be_bytes())).await.is_err() {
                    break;
                }
            }
        });
        let fast = reading(3).await;
        assert!((fast.offset_us - ahead).unsigned_abs() <= fast.uncertainty_us + 1_000, "10 s ahead: {fast:?}");
        assert!(fast.beyond(clock::MAX_OFFSET));
        // A member's reading is remembered past its link (`/cluster`, idempotency leases)...
        acceptor.set_peer_addr(3, "127.0.0.1:1");
        for _ in 0..200 {
            if lock(&acceptor.offsets).contains_key(&3) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(lock(&acceptor.offsets).contains_key(&3), "node 3's offset remembered within 10 s");
        assert!(acceptor.no_peer_clock_behind(clock::MAX_OFFSET), "node 3 is ahead, not behind");
        // ...until it leaves the cluster: then nothing reads the last figure any more.
        acceptor.forget_peer(3);
        assert_eq!(acceptor.last_clock_offset(3), None);
        assert!(!lock(&acceptor.offsets).contains_key(&3));
        answering.abort();
        stop.cancel();
    }

    /// A dialer that knows no secret cannot get a request served by replaying, or by sending
    /// requests right after the `HelloAck`: the acceptor wants a valid `Auth` first.
    #[tokio::test]
    async fn an_acceptor_with_a_secret_serves_nothing_before_a_valid_proof() {
        let (acceptor, _, addr, stop) = pair(Some("0123456789abcdef"), None).await;
        for first in [Frame::encode_raw(Kind::Auth, 0, &[0; 32]), Frame::encode_raw(Kind::Ping, 0, &[])] {
            let (rd, wr) = tls::plain(TcpStream::connect(addr).await.unwrap());
            let mut reader = FramedRead::new(rd, frame::codec(1 << 20));
            let mut writer = FramedWrite::new(wr, frame::codec(1 << 20));
            let hello = Hello { node_id: 5, addr: "127.0.0.1:1".into(), ..acceptor.hello() };
            writer.send(Frame::encode(Kind::Hello, 0, &hello).unwrap()).await.unwrap();
            let ack = Frame::decode(reader.next().await.unwrap().unwrap()).unwrap();
            assert_eq!(ack.kind, Kind::HelloAck);
            assert_ne!(Hello::decode(&ack).unwrap().proof, [0; 32], "the acceptor asks for a proof");
            writer.send(first).await.unwrap();
            let limit = Duration::from_secs(10);
            let answer = tokio::time::timeout(limit, reader.next()).await.expect("answered in time");
            let answer = Frame::decode(answer.unwrap().unwrap()).unwrap();
            assert_eq!(answer.kind, Kind::Reject, "{:?}", String::from_utf8_lossy(&answer.payload));
            let after = tokio::time::timeout(limit, reader.next()).await.expect("closed in time");
            assert!(after.is_none(), "then the connection is closed");
            assert!(!acceptor.reachable(5));
        }
        stop.cancel();
    }

    /// Two nodes on loopback with the given TLS settings (None: plain TCP); node 2 dials node 1.
    async fn tls_pair(acceptor_tls: Option<tls::PeerTls>, dialer_tls: Option<tls::PeerTls>) -> (Arc<PeerNet>, Arc<PeerNet>, CancellationToken) {
        let stop = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = |node_id, advertise: String, tls| PeerConfig {
            node_id,
            cluster: "t".into(),
            advertise,
            max_frame: 1 << 20,
            idle_timeout: Duration::from_secs(10),
            secret: None,
            tls,
            source_ip: None,
            cluster_id: Default::default(),
            recorded_features: Default::default(),
        };
        let acceptor = PeerNet::new(cfg(1, addr.to_string(), acceptor_tls), stop.clone());
        tokio::spawn(acceptor.clone().run(listener));
        let dialer = PeerNet::new(cfg(2, "127.0.0.1:1".into(), dialer_tls), stop.clone());
        dialer.set_peer_addr(1, &addr.to_string());
        (acceptor, dialer, stop)
    }

    /// Answers every request with `Done` (the link, not the request, is under test).
    struct Answers;
    impl Handler for Answers {
        fn handle(&self, _: NodeId, _: PeerRequest) -> BoxFuture<PeerResponse> {
            Box::pin(async { PeerResponse::Done })
        }
    }

    /// A certificate bound to node ids (`certs --node-id`) serves only a node that claims one of
    /// them, checked by the acceptor and the dialer; with the requirement on, an unbound one is
    /// refused too.
    #[tokio::test]
    async fn node_ids_bound_to_certificates_are_checked_on_both_sides() {
        let dir = std::env::temp_dir().join(format!("rb-peer-bound-{}", fastrand::u64(..)));
        for (name, id) in [("b1", Some(1)), ("b2", Some(2)), ("b3", Some(3)), ("shared", None)] {
            tls::issue(&dir, name, &["127.0.0.1".to_string()], 30, id).unwrap();
        }
        // `name`'s files, for node `node` (or for any), requiring bound certificates or not.
        let load_as = |name: &str, node: Option<u64>, require: bool| {
            let file = |suffix: &str| dir.join(format!("{name}{suffix}.pem"));
            tls::PeerTls::load_for(&file(""), &file("-key"), &dir.join(tls::CA_CERT), None, node, require)
        };
        let load = |name: &str| load_as(name, None, false).unwrap();
        let bound_to = |name: &str, node| load_as(name, Some(node), true).unwrap();
        // A node loads only a certificate bound to its own id (or, unless required, to none).
        let err = load_as("b2", Some(1), false).unwrap_err().to_string();
        assert!(err.contains("b2.pem") && err.contains("not this node's") && err.contains("[2]"), "{err}");
        let err = load_as("shared", Some(1), true).unwrap_err().to_string();
        assert!(err.contains("names no node id"), "{err}");
        load_as("shared", Some(1), false).expect("an unbound certificate, not required");
        // The acceptor is node 1, the dialer node 2.
        let (acceptor, dialer, stop) = tls_pair(Some(bound_to("b1", 1)), Some(bound_to("b2", 2))).await;
        dialer.link(1).await.expect("both bound to the ids they claim: linked");
        assert!(acceptor.reachable(2));
        stop.cancel();
        for (theirs, ours, why, says) in [
            (load("b1"), load("b3"), "the dialer claims 2 with node 3's certificate", None),
            (load("b3"), load("b2"), "the acceptor claims 1 with node 3's certificate", Some("bound to node [3]")),
            (bound_to("b1", 1), load("shared"), "the acceptor requires bound certificates", None),
            (load("shared"), bound_to("b2", 2), "the dialer requires bound certificates", Some("names no node id")),
        ] {
            let (acceptor, dialer, stop) = tls_pair(Some(theirs), Some(ours)).await;
            let Err(err) = dialer.link(1).await else { panic!("{why}: linked") };
            assert!(matches!(err, PeerError::Handshake { .. }), "{why}: {err}");
            if let Some(says) = says {
                assert!(err.to_string().contains(says), "{why}: {err}");
            }
            assert_unlinked(&acceptor, &dialer, why).await;
            stop.cancel();
        }
        // Unbound certificates on both sides, not required: linked as before.
        let (_acceptor, dialer, stop) = tls_pair(Some(load("shared")), Some(load("shared"))).await;
        dialer.link(1).await.expect("unbound and not required: linked");
        stop.cancel();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Nodes with certificates from one CA link over TLS and serve requests both ways; a node
    /// with another CA's certificate, without TLS, or with a certificate for another name is
    /// refused, and the acceptor keeps no link to it.
    #[tokio::test]
    async fn tls_links_need_a_certificate_from_the_cluster_ca() {
        let dir = std::env::temp_dir().join(format!("rb-peer-tls-{}", fastrand::u64(..)));
        let other = dir.join("other");
        for (d, name, san) in [
            (&dir, "n1", "127.0.0.1"),
            (&dir, "n2", "127.0.0.1"),
            (&dir, "elsewhere", "10.9.9.9"),
            (&dir, "shared", "rb-peers"),
            (&dir, "named", "localhost"),
            (&other, "n3", "127.0.0.1"),
        ] {
            tls::issue(d, name, &[san.to_string()], 30, None).unwrap();
        }
        let load = |d: &std::path::Path, name: &str, server_name: Option<&str>| {
            tls::PeerTls::load(&d.join(format!("{name}.pem")), &d.join(format!("{name}-key.pem")), &d.join(tls::CA_CERT), server_name)
                .unwrap()
        };
        let (acceptor, dialer, stop) = tls_pair(Some(load(&dir, "n1", None)), Some(load(&dir, "n2", None))).await;
        acceptor.set_handler(Arc::new(Answers));
        dialer.set_handler(Arc::new(Answers));
        dialer.link(1).await.expect("one CA: linked");
        let status = dialer.request(1, &PeerRequest::Status, Duration::from_secs(5)).await;
        assert!(matches!(status, Ok(PeerResponse::Done)), "{status:?}");
        assert!(acceptor.reachable(2));
        let back = acceptor.request(2, &PeerRequest::Status, Duration::from_secs(5)).await;
        assert!(matches!(back, Ok(PeerResponse::Done)), "and back: {back:?}");
        stop.cancel();
        // A seed given by name is dialed at the address it resolves to; the name is checked.
        let (_acceptor, dialer, stop) = tls_pair(Some(load(&dir, "named", None)), Some(load(&dir, "n2", None))).await;
        assert!(dialer.link(1).await.is_err(), "the certificate does not carry the address");
        let addr = lock(&dialer.addrs).get(&1).cloned().expect("the acceptor's address");
        lock(&dialer.dials).clear();
        dialer.set_tls_name(&addr, "localhost");
        dialer.link(1).await.expect("the name the address was resolved from is checked");
        stop.cancel();
        // One certificate for every node with one shared name, checked whatever address was
        // dialed (--peer-tls-server-name, deploy/k8s/README.md).
        let shared = || Some(load(&dir, "shared", Some("rb-peers")));
        let (_acceptor, dialer, stop) = tls_pair(shared(), shared()).await;
        dialer.link(1).await.expect("the shared name is checked, not the dialed IP address");
        stop.cancel();
        for (theirs, ours, why) in [
            (Some(load(&dir, "n1", None)), Some(load(&other, "n3", None)), "the dialer's certificate is from another CA"),
            (Some(load(&other, "n3", None)), Some(load(&dir, "n2", None)), "the acceptor's certificate is from another CA"),
            (Some(load(&dir, "elsewhere", None)), Some(load(&dir, "n2", None)), "the acceptor's certificate is for another address"),
            (Some(load(&dir, "n1", None)), Some(load(&dir, "n2", Some("peers.example"))), "the acceptor lacks the configured name"),
            (Some(load(&dir, "n1", None)), None, "the dialer speaks plain TCP"),
            (None, Some(load(&dir, "n2", None)), "the acceptor speaks plain TCP"),
        ] {
            let (acceptor, dialer, stop) = tls_pair(theirs, ours).await;
            let Err(err) = dialer.link(1).await else { panic!("{why}: linked") };
            assert!(matches!(err, PeerError::Handshake { .. } | PeerError::Io { .. }), "{why}: {err}");
            assert_unlinked(&acceptor, &dialer, why).await;
            stop.cancel();
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_secret_is_not_shown_by_debug() {
        let s = ClusterSecret::new(b"0123456789abcdef");
        assert_eq!(format!("{s:?}"), "ClusterSecret(..)");
    }

    #[test]
    fn a_secret_matches_itself_only() {
        let s = ClusterSecret::new(b"0123456789abcdef");
        assert!(s.matches(b"0123456789abcdef"));
        for other in [&b"0123456789abcdeF"[..], b"0123456789abcde", b"0123456789abcdef0", b""] {
            assert!(!s.matches(other), "{:?}", String::from_utf8_lossy(other));
        }
    }

    /// A peer that completed the handshake on `addr`, speaking raw frames from here on.
    /// Neither side of a refused handshake keeps a link: the dialer none to node 1, and the
    /// acceptor none to node 2 (one that answered before the dialer refused it had a link
    /// until the dialer hung up: waited for, up to 3 s).
    async fn assert_unlinked(acceptor: &PeerNet, dialer: &PeerNet, why: &str) {
        assert!(!dialer.reachable(1), "{why}: no link on the dialer");
        for _ in 0..300 {
            if !acceptor.reachable(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!acceptor.reachable(2), "{why}: no link on the acceptor");
    }

    async fn handshaken(net: &PeerNet, addr: std::net::SocketAddr, node_id: NodeId) -> (RawReader, RawWriter) {
        let (rd, wr) = tls::plain(TcpStream::connect(addr).await.unwrap());
        let mut reader = FramedRead::new(rd, frame::codec(1 << 20));
        let mut writer = FramedWrite::new(wr, frame::codec(1 << 20));
        let hello = Hello { node_id, addr: "127.0.0.1:1".into(), ..net.hello() };
        writer.send(Frame::encode(Kind::Hello, 0, &hello).unwrap()).await.unwrap();
        let ack = Frame::decode(reader.next().await.unwrap().unwrap()).unwrap();
        assert_eq!(ack.kind, Kind::HelloAck);
        (reader, writer)
    }

    #[tokio::test]
    async fn a_silent_peer_link_is_closed_and_a_talking_one_is_kept() {
        let idle = Duration::from_millis(1500);
        let (net, addr, stop) = listening(idle).await;

        // Pings every 100 ms for three idle periods: the link stays up throughout.
        let (mut reader, mut writer) = handshaken(&net, addr, 2).await;
        let ended = tokio::spawn(async move { while let Some(Ok(_)) = reader.next().await {} });
        for _ in 0..45 {
            writer.send(Frame::encode_raw(Kind::Ping, 0, &[])).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!ended.is_finished() && net.reachable(2), "a link that keeps talking is not closed");
        // Then silent: the node closes the connection within a few idle periods.
        tokio::time::timeout(idle * 10, ended).await.expect("a silent link is closed").unwrap();
        assert!(!net.reachable(2));
        stop.cancel();
    }

    /// A peer that keeps pinging but reads nothing: the link is closed once a write to it
    /// made no progress for `write_stall`, with what was queued for it (it used to stay, with
    /// every queued frame, for as long as the pings came).
    #[tokio::test]
    async fn a_peer_that_reads_nothing_has_its_link_closed() {
        let idle = Duration::from_millis(1000);
        let (net, addr, stop) = listening(idle).await;
        let (reader, mut writer) = handshaken(&net, addr, 2).await;
        let pinging = tokio::spawn(async move {
            for _ in 0..300 {
                if writer.send(Frame::encode_raw(Kind::Ping, 0, &[])).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        // 64 frames of 512 KiB: far more than the socket buffers hold.
        let chunk = big_chunk;
        let started = tokio::time::Instant::now();
        for _ in 0..64 {
            let _ = net.request(2, &chunk(), Duration::from_millis(50)).await;
        }
        for _ in 0..200 {
            if !net.reachable(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!net.reachable(2), "closed within {:?}", started.elapsed());
        drop(reader);
        pinging.abort();
        stop.cancel();
    }

    /// A forwarded write of 512 KiB: a big request of the bulk lane to fill a link with.
    fn big_write() -> PeerRequest {
        PeerRequest::Write(crate::raft::types::Command::Put { store: "s".into(), key: "k".into(), value: vec![7; 512 << 10], if_revision: None, tag: None })
    }

    /// Raft's frames go out before the bulk lane's, whatever waits there: with the bulk lane
    /// full and a forwarded batch waiting for room for a whole frame, a vote is still queued
    /// at once (it used to wait behind the batch, in one queue, and was not sent: `Unsent`),
    /// and the peer, once it reads, gets it before the bulk frames queued ahead of it.
    #[tokio::test]
    async fn raft_frames_overtake_a_full_bulk_lane() {
        let (net, addr, stop) = listening(Duration::from_secs(60)).await;
        let (mut reader, writer) = handshaken(&net, addr, 2).await;
        let link = net.link(2).await.unwrap();
        // Bulk requests queued until the lane is full (the peer reads nothing yet).
        let mut bulk = Vec::new();
        for _ in 0..80 {
            let net = net.clone();
            bulk.push(tokio::spawn(async move { net.request(2, &big_write(), Duration::from_secs(20)).await }));
            tokio::time::sleep(Duration::from_millis(5)).await;
            if link.queued(false) + (512 << 10) > link.queue_budget() {
                break;
            }
        }
        assert!(link.queued(false) + (512 << 10) > link.queue_budget(), "the bulk lane filled: {} bytes", link.queued(false));
        let waiting = {
            let link = link.clone();
            tokio::spawn(async move { link.call_made(tokio::time::Instant::now() + Duration::from_secs(20), || Some(big_write())).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the batch waits for room");
        let vote = PeerRequest::Vote(crate::raft::types::VoteRequest::new(crate::raft::types::Vote::new(3, 1), None));
        let voted = {
            let net = net.clone();
            tokio::spawn(async move { net.request(2, &vote, Duration::from_millis(300)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(link.queued(true) > 0, "the vote is queued in the Raft lane");
        // The peer reads now: the vote comes before the bulk frames still queued behind the
        // writer's current batch and the socket buffers.
        let (mut writes_before, mut writes_after) = (0, 0);
        let mut seen_vote = false;
        for _ in 0..200 {
            let Ok(Some(Ok(bytes))) = tokio::time::timeout(Duration::from_secs(5), reader.next()).await else { break };
            let frame = Frame::decode(bytes).unwrap();
            if frame.kind != Kind::Request {
                continue;
            }
            match frame.message::<PeerRequest>().unwrap() {
                PeerRequest::Vote(_) => seen_vote = true,
                PeerRequest::Write(_) if seen_vote => writes_after += 1,
                PeerRequest::Write(_) => writes_before += 1,
                _ => {}
            }
            if seen_vote && writes_after > 0 {
                break;
            }
        }
        assert!(seen_vote && writes_after > 0, "the vote went out ahead of queued bulk frames ({writes_before} before it, {writes_after} after)");
        assert!(matches!(voted.await.unwrap(), Err(PeerError::Timeout { .. })), "sent, unanswered (the raw peer answers nothing)");
        waiting.abort();
        for b in bulk {
            b.abort();
        }
        drop(writer);
        stop.cancel();
    }

    /// A snapshot chunk of 512 KiB from node 2's term 1: a big request to fill a link with.
    fn big_chunk() -> PeerRequest {
        PeerRequest::SnapshotChunk {
            vote: crate::raft::types::Vote::new(1, 2),
            meta: crate::raft::types::SnapshotMeta::default(),
            offset: 0,
            data: vec![7; 512 << 10],
            done: false,
        }
    }

    /// Frames for a peer that reads slowly are held up to the link's byte budget, not up to
    /// `SEND_QUEUE` frames of any size: a request that finds no room within its deadline is
    /// not sent (and says so), and the queue never holds more than the budget.
    #[tokio::test]
    async fn a_links_send_queue_holds_at_most_its_byte_budget() {
        let (net, addr, stop) = listening(Duration::from_secs(60)).await;
        // Handshaken, then nothing read: the socket buffers fill, then the queue.
        let (reader, writer) = handshaken(&net, addr, 2).await;
        let chunk = big_write;
        let link = net.link(2).await.unwrap();
        assert_eq!(link.queue_budget(), SEND_QUEUE_BYTES.max(4 * link.max_frame()));
        let (mut unsent, mut most) = (0, 0);
        // 80 frames of 512 KiB: 40 MiB, far more than the socket buffers and the budget hold.
        for _ in 0..80 {
            match net.request(2, &chunk(), Duration::from_millis(50)).await {
                Err(PeerError::Unsent { .. }) => unsent += 1,
                Err(PeerError::Timeout { .. }) => {}
                other => panic!("sent and unanswered, or not sent for want of room: {other:?}"),
            }
            most = most.max(link.queued(false));
        }
        let frame = 512 << 10;
        assert!(most + frame > link.queue_budget(), "the queue filled up: {most} bytes of {}", link.queue_budget());
        assert!(unsent > 0, "some requests found no room (the sockets take a few MiB at most)");
        // A request made only once it has its place waits for room for a whole frame first, and
        // is not made when none comes.
        let made = std::sync::atomic::AtomicBool::new(false);
        let late = link.call_made(tokio::time::Instant::now() + Duration::from_millis(100), || {
            made.store(true, Ordering::SeqCst);
            Some(chunk())
        });
        assert!(matches!(late.await, Err(PeerError::Unsent { .. })));
        assert!(!made.load(Ordering::SeqCst), "not made while there was no room to send it");
        assert!(link.is_alive(), "a full queue closes nothing by itself");
        // Closing the link gives nothing room any more: no frame waits for a dead link.
        link.close();
        assert!(link.room_for(false, 1).await.is_err());
        assert!(link.room_for(true, 1).await.is_err());
        drop((reader, writer));
        stop.cancel();
    }

    /// A Raft request in another node's name (here: node 2 asking for votes as candidate 3)
    /// is not served: the link closes. One in its own name is served.
    #[tokio::test]
    async fn a_raft_request_in_another_nodes_name_closes_the_link() {
        let (net, addr, stop) = listening(Duration::from_secs(60)).await;
        net.set_handler(Arc::new(Answers));
        let vote = |candidate| PeerRequest::Vote(crate::raft::types::VoteRequest::new(crate::raft::types::Vote::new(4, candidate), None));
        let (mut reader, mut writer) = handshaken(&net, addr, 2).await;
        writer.send(Frame::encode(Kind::Request, 7, &vote(2)).unwrap()).await.unwrap();
        let answer = loop {
            let frame = Frame::decode(reader.next().await.unwrap().unwrap()).unwrap();
            if frame.kind == Kind::Response {
                break frame;
            }
        };
        assert_eq!(answer.corr, 7, "a vote in its own name is served");
        writer.send(Frame::encode(Kind::Request, 8, &vote(3)).unwrap()).await.unwrap();
        let rest = tokio::time::timeout(Duration::from_secs(10), async {
            let mut kinds = Vec::new();
            while let Some(Ok(raw)) = reader.next().await {
                kinds.push(Frame::decode(raw).unwrap().kind);
            }
            kinds
        })
        .await
        .expect("the link is closed");
        assert!(!rest.contains(&Kind::Response), "no answer to a vote in node 3's name: {rest:?}");
        assert!(!net.reachable(2));
        stop.cancel();
    }

    #[tokio::test]
    async fn a_call_ends_when_its_link_closes_not_at_its_deadline() {
        let (net, addr, stop) = listening(Duration::from_secs(60)).await;
        let (mut reader, writer) = handshaken(&net, addr, 2).await;
        let caller = net.clone();
        let call = tokio::spawn(async move { caller.request(2, &PeerRequest::Status, Duration::from_secs(60)).await });
        // The request reaches the peer, which never answers and hangs up.
        loop {
            let frame = Frame::decode(reader.next().await.unwrap().unwrap()).unwrap();
            if frame.kind == Kind::Request {
                break;
            }
        }
        drop((reader, writer));
        let outcome = tokio::time::timeout(Duration::from_secs(10), call).await.expect("the call ends with its link").unwrap();
        assert!(matches!(outcome, Err(PeerError::Closed { peer: 2 })), "{outcome:?}");
        stop.cancel();
    }

    /// A command invocation carrying `payload` (the link, not the command, is under test).
    fn invoke(payload: Bytes) -> PeerRequest {
        PeerRequest::Invoke(crate::sdk::Invocation {
            service: "s".into(),
            version: 1,
            command: "c".into(),
            params: Default::default(),
            payload,
            meta: Default::default(),
            timeout_ms: 1_000,
            headers: Vec::new(),
        })
    }

    /// Answers an `Invoke` with its payload twice over (so a big one cannot go back in a frame),
    /// anything else with `Done`.
    struct Doubles;
    impl Handler for Doubles {
        fn handle(&self, _: NodeId, req: PeerRequest) -> BoxFuture<PeerResponse> {
            Box::pin(async move {
                match req {
                    PeerRequest::Invoke(inv) => {
                        let body = Bytes::from([inv.payload.as_ref(), inv.payload.as_ref()].concat());
                        PeerResponse::Invoked(Ok(crate::sdk::Output { status: 200, body, content_type: None, headers: Vec::new() }))
                    }
                    _ => PeerResponse::Done,
                }
            })
        }
    }

    /// A request or an answer over the frame limit is refused where it is made, not written:
    /// the writer would have refused it and closed the link, failing everything else on it.
    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused_and_the_link_stays_up() {
        let (acceptor, dialer, _, stop) = pair(None, None).await;
        acceptor.set_handler(Arc::new(Doubles));
        let sized = |bytes: usize| invoke(Bytes::from(vec![b'x'; bytes]));
        let timeout = Duration::from_secs(10);
        let link = dialer.link(1).await.expect("linked");
        let err = dialer.request(1, &sized(2 << 20), timeout).await.expect_err("over the 1 MiB frame");
        assert!(matches!(err, PeerError::TooLarge { peer: 1, limit, .. } if limit == 1 << 20), "{err}");
        assert!(err.not_delivered(), "nothing was sent: another node may be tried");
        // Fits going out, not coming back: an error answer instead of a closed link.
        let answer = dialer.request(1, &sized(600 << 10), timeout).await.expect("answered");
        assert!(matches!(&answer, PeerResponse::Error(message::RemoteError::Internal(why)) if why.contains("frame limit")), "{answer:?}");
        let answer = dialer.request(1, &sized(100 << 10), timeout).await.expect("answered");
        assert!(matches!(&answer, PeerResponse::Invoked(Ok(out)) if out.body.len() == 200 << 10), "a fitting answer arrives");
        assert!(link.is_alive(), "the same link carried all of it");
        assert!(Arc::ptr_eq(&link, &dialer.link(1).await.expect("linked")), "no new link was needed");
        stop.cancel();
    }


    /// The frame every member takes is the smallest announced, kept while a member is down and
    /// given up when it leaves; an announcement below what any node accepts counts as ours.
    #[test]
    fn the_cluster_frame_is_the_smallest_members() {
        let cfg = PeerConfig { node_id: 1, cluster: "t".into(), advertise: "127.0.0.1:1".into(), max_frame: 2 << 20, idle_timeout: Duration::from_secs(5), secret: None, tls: None, source_ip: None, cluster_id: Default::default(), recorded_features: Default::default() };
        let net = PeerNet::new(cfg, CancellationToken::new());
        let frame = |m: u64| frame::Settings { max_frame: m, ..frame::Settings::default() };
        assert_eq!(net.cluster_frame(), 2 << 20);
        net.frames_changed(|seen| seen.insert(5, frame(1 << 20)).is_none());
        net.frames_changed(|seen| seen.insert(6, frame(4 << 20)).is_none());
        net.frames_changed(|seen| seen.insert(7, frame(100)).is_none());
        assert_eq!(net.cluster_frame(), 1 << 20);
        net.frames_changed(|seen| seen.remove(&5).is_some());
        assert_eq!(net.cluster_frame(), 2 << 20);
    }

    /// Nodes with different `--max-frame` (a rolling change of the flag): the dialer's 2 MiB
    /// frames would be refused by the acceptor's 1 MiB reader, closing the link. The link takes
    /// the smaller limit from the acceptor's `Hello`, so the dialer refuses such a request
    /// where it is made and the link carries on.
    #[tokio::test]
    async fn a_link_takes_the_smaller_frame_limit_of_its_two_sides() {
        let (acceptor, dialer, _, stop) = pair_framed(None, None, (1 << 20, 2 << 20)).await;
        acceptor.set_handler(Arc::new(Doubles));
        let timeout = Duration::from_secs(10);
        let link = dialer.link(1).await.expect("linked");
        assert_eq!((link.max_frame(), dialer.max_frame_to(1), dialer.max_frame()), (1 << 20, 1 << 20, 2 << 20));
        let err = dialer.request(1, &invoke(Bytes::from(vec![b'x'; 1_500_000])), timeout).await.expect_err("over the acceptor's limit");
        assert!(matches!(err, PeerError::TooLarge { peer: 1, limit, .. } if limit == 1 << 20), "{err}");
        let answer = dialer.request(1, &invoke(Bytes::from(vec![b'x'; 100 << 10])), timeout).await.expect("answered");
        assert!(matches!(&answer, PeerResponse::Invoked(Ok(out)) if out.body.len() == 200 << 10), "{answer:?}");
        assert!(link.is_alive() && Arc::ptr_eq(&link, &dialer.link(1).await.expect("linked")), "the same link carried both");
        // The acceptor's side of the link keeps its own, smaller limit.
        assert_eq!(acceptor.max_frame_to(2), 1 << 20);
        // A peer that announces nothing (an older build), or a limit no node takes, is taken to have ours.
        assert_eq!(link_max_frame(2 << 20, None), 2 << 20);
        assert_eq!(link_max_frame(2 << 20, Some(frame::Settings { max_frame: 100, ..frame::Settings::default() })), 2 << 20);
        stop.cancel();
    }

    /// Before a link is up, a frame may claim at most `HANDSHAKE_FRAME`: a stranger's claim of a
    /// whole `--max-frame` is refused at its length prefix, not buffered for the handshake's
    /// three seconds.
    #[tokio::test]
    async fn a_big_frame_before_the_handshake_is_refused_at_its_prefix() {
        let (net, _, stop) = listening(Duration::from_secs(60)).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let claim = u32::try_from(HANDSHAKE_FRAME + 1).unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut client, &claim.to_be_bytes()).await.unwrap();
        let reason = net.accept(server).await.expect_err("refused");
        assert!(reason.starts_with("bad first frame"), "{reason}");
        stop.cancel();
    }


    #[test]
    fn handshakes_are_bounded_in_all_and_per_address() {
        let all = Arc::new(Mutex::new(Handshakes::default()));
        let ip = |n: u8| std::net::IpAddr::from([10, 0, 0, n]);
        let one: Vec<_> = (0..MAX_HANDSHAKES_PER_ADDRESS).map(|_| HandshakeSlot::take(&all, ip(1)).expect("a slot")).collect();
        assert!(HandshakeSlot::take(&all, ip(1)).is_none(), "one address takes at most its share");
        assert!(HandshakeSlot::take(&all, ip(2)).is_some(), "others still get in");
        drop(one);
        assert!(lock(&all).by_address.is_empty() && lock(&all).total == 0, "every slot given back");
        let many: Vec<_> = (0..MAX_HANDSHAKES).map(|i| HandshakeSlot::take(&all, ip((i % 200) as u8)).expect("a slot")).collect();
        assert!(HandshakeSlot::take(&all, ip(250)).is_none(), "at most MAX_HANDSHAKES in all");
        drop(many);
        assert!(HandshakeSlot::take(&all, ip(250)).is_some());
        let local: Vec<_> = (0..2 * MAX_HANDSHAKES_PER_ADDRESS).map(|_| HandshakeSlot::take(&all, [127, 0, 0, 1].into()).expect("a slot")).collect();
        assert_eq!(local.len(), 2 * MAX_HANDSHAKES_PER_ADDRESS, "this machine's own nodes share one address");
    }


    /// Never answers the requests its test picks; answers anything else with `Done`.
    struct StallsOn(fn(&PeerRequest) -> bool);
    impl Handler for StallsOn {
        fn handle(&self, _: NodeId, req: PeerRequest) -> BoxFuture<PeerResponse> {
            let stalls = (self.0)(&req);
            Box::pin(async move {
                if stalls {
                    std::future::pending::<()>().await;
                }
                PeerResponse::Done
            })
        }
    }

    /// Never answers an `Invoke` (a handler that hangs).
    fn stalls() -> StallsOn {
        StallsOn(|r| matches!(r, PeerRequest::Invoke(_)))
    }

    /// The caller gave up on requests the peer still serves (its timeouts free its side only):
    /// once `MAX_SERVING` of them are served, more are answered `NotServed` at once, and Raft's
    /// requests and the link's answers still flow. The reader used to stop reading the link.
    #[tokio::test]
    async fn a_peer_serving_its_limit_sheds_requests_and_keeps_reading() {
        let (acceptor, dialer, _, stop) = pair(None, None).await;
        acceptor.set_handler(Arc::new(stalls()));
        dialer.link(1).await.expect("linked");
        // All of this side's places, given up on after 300 ms; then 50 more.
        let send = |n: usize| {
            futures_util::future::join_all((0..n).map(|_| {
                let (dialer, request) = (dialer.clone(), invoke(Bytes::new()));
                tokio::spawn(async move { dialer.request(1, &request, Duration::from_millis(300)).await })
            }))
        };
        let abandoned = send(MAX_OUTSTANDING).await;
        let odd: Vec<String> = abandoned.iter().filter(|o| !matches!(o, Ok(Err(PeerError::Timeout { .. })))).map(|o| format!("{o:?}")).take(3).collect();
        assert!(odd.is_empty(), "the first ones were served, never answered: {odd:?}");
        let outcomes = send(50).await;
        let shed = outcomes
            .iter()
            .filter(|o| matches!(o, Ok(Ok(PeerResponse::Error(message::RemoteError::NotServed(_))))))
            .count();
        assert_eq!(shed, 50, "requests past the limit are shed at once");
        let timeout = Duration::from_secs(10);
        let answer = dialer.request(1, &PeerRequest::Status, timeout).await.expect("answered, not stuck behind the served ones");
        assert!(matches!(answer, PeerResponse::Error(message::RemoteError::NotServed(_))), "{answer:?}");
        let vote = PeerRequest::Vote(crate::raft::types::VoteRequest::new(crate::raft::types::Vote::new(3, 2), None));
        let answer = dialer.request(1, &vote, timeout).await.expect("Raft's requests are served");
        assert!(matches!(answer, PeerResponse::Done), "{answer:?}");
        stop.cancel();
    }

    /// A made call waits for its place on the link until its deadline and only then makes its
    /// request: with every place taken it gives up unsent, without making one, and a request
    /// made empty sends nothing. A forwarded batch is made of the writes whose callers still
    /// wait once it has its place.
    /// Calls (`Invoke`s, answered as the peer's handler answers them) that take every place
    /// on `link`, waited for until they all have one.
    async fn take_every_place(link: &Arc<Link>) -> Vec<tokio::task::JoinHandle<Result<PeerResponse, PeerError>>> {
        let held: Vec<_> = (0..MAX_OUTSTANDING)
            .map(|_| {
                let link = link.clone();
                tokio::spawn(async move { link.call(&invoke(Bytes::new()), Duration::from_secs(30)).await })
            })
            .collect();
        // Bounded: the calls above take every place as they run.
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while link.outstanding.available_permits() > 0 && tokio::time::Instant::now() < until {
            tokio::task::yield_now().await;
        }
        assert_eq!(link.outstanding.available_permits(), 0, "every place taken");
        held
    }

    #[tokio::test]
    async fn a_made_call_makes_its_request_only_once_it_has_a_place() {
        let (acceptor, dialer, _, stop) = pair(None, None).await;
        acceptor.set_handler(Arc::new(stalls()));
        let link = dialer.link(1).await.expect("linked");
        let nothing = link.call_made(tokio::time::Instant::now() + Duration::from_secs(5), || None).await;
        assert!(matches!(nothing, Ok(None)), "{nothing:?}");
        let held = take_every_place(&link).await;
        let mut made = false;
        let outcome = link
            .call_made(tokio::time::Instant::now() + Duration::from_millis(100), || {
                made = true;
                Some(PeerRequest::Status)
            })
            .await;
        assert!(matches!(outcome, Err(PeerError::Unsent { .. })), "{outcome:?}");
        assert!(!made, "no request made without a place");
        for call in held {
            call.abort();
        }
        stop.cancel();
    }

    /// A request that waited for a place on its link has its answer waited for its whole time
    /// from when it was queued (`request_from_queued`): here 600 ms, after a wait of about 400 ms
    /// for a place and with an answer 300 ms after arrival. Counted from the call, as `request` counts,
    /// the wait was over before the answer came.
    #[tokio::test]
    async fn an_answer_is_waited_for_from_when_its_request_was_queued() {
        struct Slow;
        impl Handler for Slow {
            fn handle(&self, _: NodeId, req: PeerRequest) -> BoxFuture<PeerResponse> {
                Box::pin(async move {
                    let ms = if matches!(req, PeerRequest::Invoke(_)) { 400 } else { 300 };
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    PeerResponse::Done
                })
            }
        }
        let (acceptor, dialer, _, stop) = pair(None, None).await;
        acceptor.set_handler(Arc::new(Slow));
        let link = dialer.link(1).await.expect("linked");
        let held = take_every_place(&link).await;
        let started = tokio::time::Instant::now();
        let asked = {
            let dialer = dialer.clone();
            tokio::spawn(async move { dialer.request_from_queued(1, &PeerRequest::Status, Duration::from_millis(600)).await })
        };
        let (answer, queued) = asked.await.expect("joined").expect("answered within its time from the queue");
        assert!(matches!(answer, PeerResponse::Done), "{answer:?}");
        assert!(queued >= started + Duration::from_millis(300), "queued once a place came free");
        for call in held {
            assert!(call.await.expect("joined").is_ok(), "the calls that held the places were answered");
        }
        stop.cancel();
    }

    /// A leader's long polls for delivery outcomes (`AwaitDelivery`) have slots of their own:
    /// with all of them held, one more is shed, and a command is still served. They used to take
    /// the slots commands and deliveries need.
    #[tokio::test]
    async fn long_polls_for_delivery_outcomes_leave_the_other_slots_free() {
        let (acceptor, dialer, _, stop) = pair(None, None).await;
        acceptor.set_handler(Arc::new(StallsOn(|r| matches!(r, PeerRequest::AwaitDelivery { .. }))));
        dialer.link(1).await.expect("linked");
        let polls: Vec<_> = (0..MAX_AWAITING)
            .map(|ticket| {
                let dialer = dialer.clone();
                tokio::spawn(async move { dialer.request(1, &PeerRequest::AwaitDelivery { ticket: ticket as u64 }, Duration::from_secs(30)).await })
            })
            .collect();
        let timeout = Duration::from_secs(10);
        // Bounded: the polls take their slots as the peer reads them.
        let until = tokio::time::Instant::now() + timeout;
        let shed = loop {
            match dialer.request(1, &PeerRequest::AwaitDelivery { ticket: u64::MAX }, Duration::from_millis(200)).await {
                Ok(PeerResponse::Error(message::RemoteError::NotServed(_))) => break true,
                _ if tokio::time::Instant::now() >= until => break false,
                _ => {}
            }
        };
        assert!(shed, "a poll past the bound is shed");
        let answer = dialer.request(1, &invoke(Bytes::new()), timeout).await.expect("a command is served beside the polls");
        assert!(matches!(answer, PeerResponse::Done), "{answer:?}");
        for poll in polls {
            poll.abort();
        }
        stop.cancel();
    }

    /// Handshakes are counted by source: IPv6 by its /64 (a host may hold them all), an IPv4
    /// address seen by a dual-stack listener as itself (loopback stays exempt).
    #[test]
    fn handshakes_are_counted_per_source_host() {
        let all = Arc::new(Mutex::new(Handshakes::default()));
        let v6 = |last: u16| std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last));
        let held: Vec<_> = (1..=MAX_HANDSHAKES_PER_ADDRESS as u16).map(|i| HandshakeSlot::take(&all, v6(i)).expect("within the bound")).collect();
        assert!(HandshakeSlot::take(&all, v6(999)).is_none(), "another address of the same /64 counts as the same host");
        let other_net = std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1));
        assert!(HandshakeSlot::take(&all, other_net).is_some(), "another /64 is another host");
        drop(held);
        let mapped_loopback: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let many: Vec<_> = (0..MAX_HANDSHAKES_PER_ADDRESS + 4).map(|_| HandshakeSlot::take(&all, mapped_loopback)).collect();
        assert!(many.iter().all(Option::is_some), "loopback through a dual-stack listener is exempt too");
        drop(many);
        assert_eq!(lock(&all).total, 0, "every place given back");
        assert!(lock(&all).by_address.is_empty());
    }

    /// Many callers that find no link to a peer at once share one dial: one connection is
    /// made, every caller gets its link, and nothing of the dial is left behind. (Each used to
    /// dial on its own, and the two sides could keep different ones of those links.)
    #[tokio::test]
    async fn callers_without_a_link_share_one_dial() {
        let (acceptor, dialer, addr, stop) = pair(None, None).await;
        acceptor.set_handler(Arc::new(Doubles));
        let links = futures_util::future::join_all((0..16).map(|_| {
            let dialer = dialer.clone();
            tokio::spawn(async move { dialer.link(1).await })
        }))
        .await;
        let links: Vec<Arc<Link>> = links.into_iter().map(|l| l.unwrap().expect("linked")).collect();
        assert!(links.iter().all(|l| Arc::ptr_eq(l, &links[0])), "one link for every caller");
        assert_eq!(dialer.links_made.load(Ordering::Relaxed), 1, "one connection was made");
        assert!(lock(&dialer.dialing).is_empty(), "no dial turn is left behind");
        // Upkeep does not wait for a dial under way: it leaves the address to it.
        let turn = DialTurn::take(&dialer, &addr.to_string(), true).await.expect("free");
        assert!(DialTurn::take(&dialer, &addr.to_string(), false).await.is_none());
        drop(turn);
        assert!(lock(&dialer.dialing).is_empty());
        stop.cancel();
    }

    /// A request that finds no room on the link (all of its outstanding places taken) within
    /// its deadline was never sent: it says so (`Unsent`, not delivered), so a caller may try
    /// another node, where a timeout would have said its outcome is unknown.
    #[tokio::test]
    async fn a_request_with_no_room_on_the_link_is_not_sent_and_says_so() {
        let (acceptor, dialer, _, stop) = pair(None, None).await;
        acceptor.set_handler(Arc::new(stalls()));
        let link = dialer.link(1).await.expect("linked");
        let held: Vec<_> = (0..MAX_OUTSTANDING)
            .map(|_| {
                let dialer = dialer.clone();
                tokio::spawn(async move { dialer.request(1, &invoke(Bytes::new()), Duration::from_secs(30)).await })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while link.outstanding.available_permits() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "the held requests never took every place");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let err = dialer.request(1, &invoke(Bytes::new()), Duration::from_millis(200)).await.expect_err("no room");
        assert!(matches!(err, PeerError::Unsent { peer: 1, .. }) && err.not_delivered(), "{err}");
        // Raft's requests have places of their own: a leader's heartbeats and a candidate's
        // votes do not wait behind commands that hold every other place.
        let pre_vote = PeerRequest::PreVote(crate::raft::types::VoteRequest::new(crate::raft::types::Vote::new(3, 2), None));
        dialer.request(1, &pre_vote, Duration::from_secs(5)).await.expect("a Raft request still goes out and is answered");
        stop.cancel();
        for h in held {
            h.abort();
        }
    }

    /// A request put on a link that closed before it went out was never sent: it says so
    /// (`ClosedUnsent`, not delivered), so a non-idempotent command goes to another node
    /// instead of answering 502 "may have run".
    #[tokio::test]
    async fn a_request_on_a_link_closed_before_it_went_out_is_not_delivered() {
        let (acceptor, dialer, _, stop) = pair(None, None).await;
        acceptor.set_handler(Arc::new(Doubles));
        let link = dialer.link(1).await.expect("linked");
        link.close();
        let err = link.send(&invoke(Bytes::new()), Duration::from_secs(5)).await.err().expect("closed");
        assert!(matches!(err, PeerError::ClosedUnsent { peer: 1 }) && err.not_delivered(), "{err}");
        stop.cancel();
    }

    /// Raft's requests other than appends take no `MAX_SERVING` slot, but are bounded too: past
    /// `MAX_RAFT_SERVING` served at once from one link, more are answered `NotServed` (each
    /// used to run in a task of its own, without a bound), and other requests still flow.
    #[tokio::test]
    async fn raft_requests_from_one_peer_are_served_up_to_their_own_bound() {
        let (acceptor, dialer, _, stop) = pair(None, None).await;
        // Pre-votes never answered: a member that keeps asking in its own name and never reads.
        acceptor.set_handler(Arc::new(StallsOn(|r| matches!(r, PeerRequest::PreVote(_)))));
        dialer.link(1).await.expect("linked");
        let pre_vote = || PeerRequest::PreVote(crate::raft::types::VoteRequest::new(crate::raft::types::Vote::new(3, 2), None));
        let send = |n: usize| {
            futures_util::future::join_all((0..n).map(|_| {
                let (dialer, request) = (dialer.clone(), pre_vote());
                tokio::spawn(async move { dialer.request(1, &request, Duration::from_secs(2)).await })
            }))
        };
        let held = send(MAX_RAFT_SERVING).await;
        assert!(held.iter().all(|o| matches!(o, Ok(Err(PeerError::Timeout { .. })))), "served, never answered");
        let shed = send(10).await;
        let refused = shed.iter().filter(|o| matches!(o, Ok(Ok(PeerResponse::Error(message::RemoteError::NotServed(_)))))).count();
        assert_eq!(refused, 10, "past the bound they are answered at once");
        let answer = dialer.request(1, &invoke(Bytes::new()), Duration::from_secs(10)).await.expect("other requests flow");
        assert!(matches!(answer, PeerResponse::Done), "{answer:?}");
        stop.cancel();
    }

    /// Appends from one link are served up to `MAX_APPENDING` at once, each until its answer
    /// is queued: past that they are answered `NotServed` at once (they took no slot, and a
    /// peer that flooded them and read nothing had a task per append waiting to queue its
    /// answer), and other requests still flow.
    #[tokio::test]
    async fn appends_from_one_peer_are_served_up_to_their_own_bound() {
        let (acceptor, dialer, _, stop) = pair(None, None).await;
        acceptor.set_handler(Arc::new(StallsOn(|r| matches!(r, PeerRequest::AppendEntries(_)))));
        let link = dialer.link(1).await.expect("linked");
        let append = || PeerRequest::AppendEntries(crate::raft::types::AppendEntriesRequest { vote: crate::raft::types::Vote::new_committed(3, 2), prev_log_id: None, leader_commit: None, entries: vec![] });
        let send = |n: usize| {
            futures_util::future::join_all((0..n).map(|_| {
                let (link, request) = (link.clone(), append());
                tokio::spawn(async move { link.call(&request, Duration::from_secs(2)).await })
            }))
        };
        let mut held = Vec::new();
        for _ in 0..MAX_APPENDING / MAX_RAFT_OUTSTANDING {
            held.push(tokio::spawn(send(MAX_RAFT_OUTSTANDING)));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let shed = send(10).await;
        let refused = shed.iter().filter(|o| matches!(o, Ok(Ok(PeerResponse::Error(message::RemoteError::NotServed(_)))))).count();
        assert_eq!(refused, 10, "past the bound they are answered at once: {shed:?}");
        for h in held {
            let outcomes = h.await.expect("joined");
            assert!(outcomes.iter().all(|o| matches!(o, Ok(Err(PeerError::Timeout { .. })))), "served, never answered");
        }
        let answer = dialer.request(1, &invoke(Bytes::new()), Duration::from_secs(10)).await.expect("other requests flow");
        assert!(matches!(answer, PeerResponse::Done), "{answer:?}");
        stop.cancel();
    }

    /// A peer that stops reading (paused, cut off) leaves a write that cannot finish: when the
    /// link closes, the writer gives it up and ends, and so does everything it held.
    #[tokio::test]
    async fn a_closed_link_ends_its_writer_even_if_the_peer_never_reads() {
        let (net, addr, stop) = listening(Duration::from_secs(60)).await;
        let (reader, writer) = handshaken(&net, addr, 2).await;
        let link = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(link) = lock(&net.links).get(&2).cloned() {
                    break link;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the link is up");
        // Queue far more than the socket buffers take; the peer reads none of it.
        let big = invoke(Bytes::from(vec![b'x'; 256 << 10]));
        for _ in 0..64 {
            if link.send(&big, Duration::from_millis(200)).await.is_err() {
                break;
            }
        }
        link.close();
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while Arc::strong_count(&link) > 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(ended.is_ok(), "the link's tasks still hold it ({} references)", Arc::strong_count(&link));
        drop((reader, writer));
        stop.cancel();
    }

}
