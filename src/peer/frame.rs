//! Frames of the peer protocol (`proto/PEER.md` is the written spec).
//!
//! A frame is `[u32 BE length][u8 kind][u64 BE correlation id][payload]`. The length prefix is
//! handled by tokio-util's `LengthDelimitedCodec`, which also enforces the maximum frame size: an
//! oversized length prefix is a decode error and closes that one connection before any allocation.
//! Payloads are bincode: compact, fast, and serde-derived for the openraft message types.

use bytes::Buf;
use bytes::BufMut;
use bytes::Bytes;
use bytes::BytesMut;
use serde::Deserialize;
use serde::Serialize;
use tokio_util::codec::LengthDelimitedCodec;

use crate::raft::types::NodeId;

/// "RBRG": the first four bytes of every Hello payload.
pub const MAGIC: u32 = 0x5242_5247;
/// Bumped on any incompatible change to frames or messages.
pub const PROTOCOL_VERSION: u16 = 1;
/// Kind byte + correlation id.
const HEADER_LEN: usize = 9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    HelloAck = 2,
    Reject = 3,
    Request = 4,
    Response = 5,
    Ping = 6,
    Pong = 7,
    /// The dialer's proof of the cluster secret, after a `HelloAck` that asked for it.
    Auth = 8,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::Reject,
            4 => Kind::Request,
            5 => Kind::Response,
            6 => Kind::Ping,
            7 => Kind::Pong,
            8 => Kind::Auth,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame shorter than its header ({0} bytes)")]
    Short(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("payload does not decode: {0}")]
    Payload(#[from] bincode::Error),
}

#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: Kind,
    pub corr: u64,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(kind: Kind, corr: u64, payload: Bytes) -> Frame {
        Frame { kind, corr, payload }
    }

    /// Encode a message as a frame body (the length prefix is added by the codec).
    pub fn encode<T: Serialize>(kind: Kind, corr: u64, msg: &T) -> Result<Bytes, bincode::Error> {
        let size = bincode::serialized_size(msg)? as usize;
        let mut buf = BytesMut::with_capacity(HEADER_LEN + size);
        buf.put_u8(kind as u8);
        buf.put_u64(corr);
        bincode::serialize_into((&mut buf).writer(), msg)?;
        Ok(buf.freeze())
    }

    /// A frame body with raw bytes as payload.
    pub fn encode_raw(kind: Kind, corr: u64, payload: &[u8]) -> Bytes {
        let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len());
        buf.put_u8(kind as u8);
        buf.put_u64(corr);
        buf.put_slice(payload);
        buf.freeze()
    }

    pub fn decode(mut body: BytesMut) -> Result<Frame, FrameError> {
        if body.len() < HEADER_LEN {
            return Err(FrameError::Short(body.len()));
        }
        let kind_byte = body.get_u8();
        let kind = Kind::from_u8(kind_byte).ok_or(FrameError::UnknownKind(kind_byte))?;
        let corr = body.get_u64();
        Ok(Frame { kind, corr, payload: body.freeze() })
    }

    pub fn message<T: for<'de> Deserialize<'de>>(&self) -> Result<T, FrameError> {
        Ok(bincode::deserialize(&self.payload)?)
    }
}

/// The length-delimited codec with our frame bound.
pub fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().big_endian().length_field_type::<u32>().max_frame_length(max_frame).new_codec()
}

/// Optional messages this build understands, announced in `Hello::features`: a node sends one
/// only to peers that announced it, so nodes of older builds (which know none) keep working
/// with newer ones in one cluster, e.g. during a rolling upgrade. A feature that gates a log
/// command or snapshot content is a log feature (`cluster::LOG_FEATURES`: a new node lacking one
/// that every member announces is refused at its join), and a later build must go on announcing
/// it as long as it decodes what it gates, or older leaders would refuse that build's nodes.
pub mod features {
    /// `PeerRequest::DeliverBatch` / `PeerResponse::DeliveredBatch`.
    pub const DELIVER_BATCH: u64 = 1;
    /// The node serves `AppendEntries` from one peer in arrival order (`raft::network`), so a
    /// leader may keep several in flight to it (pipelined replication).
    pub const ORDERED_APPENDS: u64 = 2;
    /// The node applies `Command::DropSubscription` (older builds cannot decode it).
    pub const DROP_SUBSCRIPTION: u64 = 4;
    /// The node applies `Command::IdemClaim` and keeps its fingerprints in snapshots.
    pub const IDEM_FINGERPRINT: u64 = 8;
    /// The node applies `Command::IdemTake` (held claims outlive their window).
    pub const HELD_CLAIMS: u64 = 16;
    /// The node reads `PeerResponse::DeliveredEach` as the answer to a `DeliverBatch`.
    pub const DELIVERED_EACH: u64 = 32;
    /// The node serves `PeerRequest::InvokeWith` (answered with `PeerResponse::InvokedWith`).
    pub const APP_HEADERS: u64 = 64;
    /// The node applies `SubUpdate::Rebase` (a subscription made shared keeps its progress).
    pub const SUB_REBASE: u64 = 128;
    /// The node applies `Command::ForgetNodes` (older builds cannot decode it).
    pub const FORGET_NODES: u64 = 256;
    /// The node applies `SubUpdate::FailedAt` (a failure counted once, however often sent).
    pub const FAILED_AT: u64 = 512;
    /// The node applies `Command::PutExpiring` and `Command::Expire`, and keeps key expiries in
    /// its snapshots.
    pub const KEY_TTL: u64 = 2048;
    /// The node applies `Command::Tagged` (any write applied once per handler tag).
    pub const TAGGED: u64 = 4096;
    /// The node applies `Command::Txn` (several keys of a store written all or none).
    pub const TXN: u64 = 8192;
    /// The node serves `PeerRequest::PullAnswer` (a client's answer to what it fetched here,
    /// forwarded by the node that received it).
    pub const PULL_FORWARD: u64 = 16384;
    /// The node applies `SubUpdate::Rejected` and reads `EventOutcome::Rejected` (a failure
    /// dead-lettered at once).
    pub const REJECTED: u64 = 32768;
    /// The node applies `Command::SeekSubscription` (a shared subscription's cursor moved).
    pub const SUB_SEEK: u64 = 65536;
    /// The node decodes `RemoteError::Timeout` (a membership change past its deadline: 504).
    pub const REMOTE_TIMEOUT: u64 = 131072;
    /// The node puts a keyed request's principal in its fingerprint (`proxy::idempotency`):
    /// used only once every member announces it, so that all compute the same one.
    pub const IDEM_PRINCIPAL: u64 = 262144;
    /// The node applies `Command::ExpireDue` (keys removed by their expiry, not their revision).
    pub const EXPIRE_DUE: u64 = 524288;
    /// Env var of a test-only hook: a node started with it set to a number announces `ALL`
    /// less those bits, as a build without them would, so that the cluster tests can hold a
    /// feature's gate shut. Not for production: the node still applies what it withholds.
    pub const WITHHOLD_ENV: &str = "RAFTBRIDGE_TEST_WITHHOLD_FEATURES";

    /// What this node announces on its links and counts itself as: `ALL`, less
    /// `WITHHOLD_ENV`'s bits when that is set (read once).
    pub fn announced() -> u64 {
        static ANNOUNCED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        *ANNOUNCED.get_or_init(|| ALL & !std::env::var(WITHHOLD_ENV).ok().and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0))
    }

    /// Everything this build understands.
    pub const ALL: u64 =
        DELIVER_BATCH | ORDERED_APPENDS | DROP_SUBSCRIPTION | IDEM_FINGERPRINT | HELD_CLAIMS | DELIVERED_EACH | APP_HEADERS | SUB_REBASE | FORGET_NODES | FAILED_AT | KEY_TTL | TAGGED | TXN | PULL_FORWARD | REJECTED | SUB_SEEK | REMOTE_TIMEOUT | IDEM_PRINCIPAL | EXPIRE_DUE;
}

/// The handshake message, sent first by the dialer (`Hello`) and answered with `HelloAck`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub magic: u32,
    pub version: u16,
    pub cluster: String,
    pub node_id: NodeId,
    /// The address peers should dial to reach this node.
    pub addr: String,
    /// Random per process start: a changed incarnation means the peer restarted.
    pub incarnation: u64,
    /// Bits of [`features`]. Last, so that older builds, which stop decoding before it (bincode
    /// allows trailing bytes), read the rest as before; a `Hello` from them ends before it and
    /// decodes with no features (`Hello::decode`).
    pub features: u64,
    /// Random per handshake (zero from builds without authentication): what the other side's
    /// proof of the cluster secret must cover, so no recorded proof can be replayed.
    pub nonce: [u8; 16],
    /// In a `HelloAck` from a node with a cluster secret: HMAC-SHA256 over both nonces and node
    /// ids (see `peer::proof`), which also tells the dialer to answer with `Auth`. Zero otherwise.
    pub proof: [u8; 32],
    /// The sender's flags that become cluster-wide rules through its proposals (`None` from
    /// builds before it, and from a node that has not set them): peers warn when theirs differ.
    pub settings: Option<Settings>,
    /// The id of the cluster whose history the sender's state holds (`state_machine::CLUSTER_STORE`;
    /// `None` from builds before it and from a node that has no history yet or whose cluster
    /// was never named). Two nodes that both know one refuse a link when they differ: a
    /// cluster restored from a backup gets a new id, and a node of the old one left running
    /// under the same `--cluster-name` would otherwise follow the new leader with its old state.
    pub cluster_id: Option<u128>,
}

/// A node's flags that its proposals carry to every node: event retention comes from the
/// leader's, the dedup, idempotency and state-store bounds from the proposing node's, and the
/// frame size bounds what a peer accepts. Members that differ apply different rules depending on
/// who leads or proposes, so each announces them and its peers warn about a difference.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Settings {
    pub max_frame: u64,
    pub events_max_count: u64,
    pub events_max_bytes: u64,
    pub events_max_age_s: u64,
    pub dedup_max_keys: u64,
    pub idempotency_max_bytes: u64,
    pub state_max_keys: u64,
    pub state_max_bytes: u64,
}

impl Settings {
    /// The flags (as written on the command line) whose values differ: (flag, ours, theirs).
    pub fn differences(&self, theirs: &Settings) -> Vec<(&'static str, u64, u64)> {
        let pairs = [
            ("--max-frame", self.max_frame, theirs.max_frame),
            ("--events-max-count", self.events_max_count, theirs.events_max_count),
            ("--events-max-bytes", self.events_max_bytes, theirs.events_max_bytes),
            ("--events-max-age-s", self.events_max_age_s, theirs.events_max_age_s),
            ("--dedup-max-keys", self.dedup_max_keys, theirs.dedup_max_keys),
            ("--idempotency-max-bytes", self.idempotency_max_bytes, theirs.idempotency_max_bytes),
            ("--state-max-keys", self.state_max_keys, theirs.state_max_keys),
            ("--state-max-bytes", self.state_max_bytes, theirs.state_max_bytes),
        ];
        pairs.into_iter().filter(|(_, a, b)| a != b).collect()
    }
}

/// `Hello` as builds before `cluster_id` sent it. Each older shape is the one before it with
/// the fields that build added: bincode lays a nested struct out as its fields, so nesting them
/// is the same wire format as writing each out.
#[derive(Deserialize)]
struct HelloWithoutClusterId {
    without_settings: HelloWithoutSettings,
    settings: Option<Settings>,
}

/// `Hello` as builds before `settings` sent it.
#[derive(Deserialize)]
struct HelloWithoutSettings {
    without_auth: HelloWithoutAuth,
    nonce: [u8; 16],
    proof: [u8; 32],
}

/// `Hello` as builds before `nonce` and `proof` sent it.
#[derive(Deserialize)]
struct HelloWithoutAuth {
    before: HelloBefore,
    features: u64,
}

/// `Hello` as builds before `features` sent it.
#[derive(Deserialize)]
struct HelloBefore {
    magic: u32,
    version: u16,
    cluster: String,
    node_id: NodeId,
    addr: String,
    incarnation: u64,
}

impl HelloBefore {
    /// This build's `Hello` with what the older one did not send.
    fn with(self, features: u64, nonce: [u8; 16], proof: [u8; 32]) -> Hello {
        let HelloBefore { magic, version, cluster, node_id, addr, incarnation } = self;
        Hello { magic, version, cluster, node_id, addr, incarnation, features, nonce, proof, settings: None, cluster_id: None }
    }
}

impl Hello {
    /// Decodes a `Hello` or `HelloAck` from this build or an older one.
    pub fn decode(frame: &Frame) -> Result<Hello, FrameError> {
        if let Ok(h) = frame.message::<Hello>() {
            return Ok(h);
        }
        if let Ok(HelloWithoutClusterId { without_settings: HelloWithoutSettings { without_auth, nonce, proof }, settings }) = frame.message() {
            return Ok(Hello { settings, ..without_auth.before.with(without_auth.features, nonce, proof) });
        }
        if let Ok(HelloWithoutSettings { without_auth, nonce, proof }) = frame.message() {
            return Ok(without_auth.before.with(without_auth.features, nonce, proof));
        }
        if let Ok(HelloWithoutAuth { before, features }) = frame.message() {
            return Ok(before.with(features, [0; 16], [0; 32]));
        }
        let before: HelloBefore = frame.message()?;
        Ok(before.with(0, [0; 16], [0; 32]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip() {
        let hello = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            cluster: "c".into(),
            node_id: 7,
            addr: "127.0.0.1:1".into(),
            incarnation: 42,
            features: features::ALL,
            nonce: [3; 16],
            proof: [4; 32],
            settings: Some(Settings { max_frame: 1 << 20, events_max_count: 7, ..Settings::default() }),
            cluster_id: Some(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
        };
        let body = Frame::encode(Kind::Hello, 9, &hello).unwrap();
        let frame = Frame::decode(BytesMut::from(&body[..])).unwrap();
        assert_eq!(frame.kind, Kind::Hello);
        assert_eq!(frame.corr, 9);
        assert_eq!(Hello::decode(&frame).unwrap(), hello);
    }

    /// Nodes of a build before `features` and of this one understand each other's `Hello`.
    #[test]
    fn hello_decodes_across_builds_with_and_without_features() {
        #[derive(Serialize)]
        struct Before<'a> {
            magic: u32,
            version: u16,
            cluster: &'a str,
            node_id: NodeId,
            addr: &'a str,
            incarnation: u64,
        }
        let old = Before { magic: MAGIC, version: PROTOCOL_VERSION, cluster: "c", node_id: 2, addr: "a:1", incarnation: 5 };
        let frame = Frame::decode(BytesMut::from(&Frame::encode(Kind::Hello, 0, &old).unwrap()[..])).unwrap();
        let read = Hello::decode(&frame).unwrap();
        assert_eq!((read.node_id, read.incarnation, read.features), (2, 5, 0), "an old Hello: no features");
        // An old build decodes a new Hello as its own struct: the features are trailing bytes.
        let new = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            cluster: "c".into(),
            node_id: 3,
            addr: "b:2".into(),
            incarnation: 6,
            features: features::ALL,
            nonce: [1; 16],
            proof: [2; 32],
            settings: Some(Settings::default()),
            cluster_id: Some(9),
        };
        let frame = Frame::decode(BytesMut::from(&Frame::encode(Kind::Hello, 0, &new).unwrap()[..])).unwrap();
        let seen_by_old: HelloBefore = frame.message().unwrap();
        assert_eq!((seen_by_old.node_id, seen_by_old.addr.as_str(), seen_by_old.cluster.as_str()), (3, "b:2", "c"));
        // A build with features but before authentication: and back.
        let seen: HelloWithoutAuth = frame.message().unwrap();
        assert_eq!((seen.before.node_id, seen.features), (3, features::ALL));
        #[derive(Serialize)]
        struct WithFeatures<'a> {
            magic: u32,
            version: u16,
            cluster: &'a str,
            node_id: NodeId,
            addr: &'a str,
            incarnation: u64,
            features: u64,
        }
        let mid = WithFeatures { magic: MAGIC, version: PROTOCOL_VERSION, cluster: "c", node_id: 4, addr: "d:4", incarnation: 7, features: features::ALL };
        let frame = Frame::decode(BytesMut::from(&Frame::encode(Kind::Hello, 0, &mid).unwrap()[..])).unwrap();
        let read = Hello::decode(&frame).unwrap();
        assert_eq!((read.node_id, read.features, read.nonce, read.proof), (4, features::ALL, [0; 16], [0; 32]));
        // A build with authentication but before settings reads a new Hello as its own, and a
        // new build reads its Hello with no settings.
        let seen: HelloWithoutSettings = Frame::decode(BytesMut::from(&Frame::encode(Kind::Hello, 0, &new).unwrap()[..])).unwrap().message().unwrap();
        assert_eq!((seen.without_auth.before.node_id, seen.nonce, seen.proof), (3, [1; 16], [2; 32]));
        #[derive(Serialize)]
        struct WithAuth<'a> {
            magic: u32,
            version: u16,
            cluster: &'a str,
            node_id: NodeId,
            addr: &'a str,
            incarnation: u64,
            features: u64,
            nonce: [u8; 16],
            proof: [u8; 32],
        }
        let auth = WithAuth { magic: MAGIC, version: PROTOCOL_VERSION, cluster: "c", node_id: 5, addr: "e:5", incarnation: 8, features: features::ALL, nonce: [5; 16], proof: [6; 32] };
        let frame = Frame::decode(BytesMut::from(&Frame::encode(Kind::Hello, 0, &auth).unwrap()[..])).unwrap();
        let read = Hello::decode(&frame).unwrap();
        assert_eq!((read.node_id, read.nonce, read.proof, read.settings), (5, [5; 16], [6; 32], None));
        // A build with settings but before the cluster id reads a new Hello as its own, and a
        // new build reads its Hello with no cluster id (and its settings).
        let seen: HelloWithoutClusterId = Frame::decode(BytesMut::from(&Frame::encode(Kind::Hello, 0, &new).unwrap()[..])).unwrap().message().unwrap();
        assert_eq!((seen.without_settings.without_auth.before.node_id, seen.settings), (3, Some(Settings::default())));
        #[derive(Serialize)]
        struct WithSettings {
            auth: WithAuth<'static>,
            settings: Option<Settings>,
        }
        let with_settings = WithSettings {
            auth: WithAuth { magic: MAGIC, version: PROTOCOL_VERSION, cluster: "c", node_id: 6, addr: "f:6", incarnation: 9, features: features::ALL, nonce: [7; 16], proof: [8; 32] },
            settings: Some(Settings { max_frame: 77, ..Settings::default() }),
        };
        let frame = Frame::decode(BytesMut::from(&Frame::encode(Kind::Hello, 0, &with_settings).unwrap()[..])).unwrap();
        let read = Hello::decode(&frame).unwrap();
        assert_eq!((read.node_id, read.nonce, read.settings.map(|s| s.max_frame), read.cluster_id), (6, [7; 16], Some(77), None));
    }

    #[test]
    fn settings_that_differ_are_named_by_their_flags() {
        let ours = Settings { max_frame: 1 << 20, events_max_count: 100_000, ..Settings::default() };
        assert!(ours.differences(&ours).is_empty());
        let theirs = Settings { events_max_count: 10, state_max_keys: 5, ..ours };
        assert_eq!(ours.differences(&theirs), vec![("--events-max-count", 100_000, 10), ("--state-max-keys", 0, 5)]);
    }

    #[test]
    fn junk_is_rejected() {
        assert!(matches!(Frame::decode(BytesMut::from(&b"abc"[..])), Err(FrameError::Short(3))));
        let junk = BytesMut::from(&[0xEEu8; 32][..]);
        assert!(matches!(Frame::decode(junk), Err(FrameError::UnknownKind(0xEE))));
        let body = Frame::encode_raw(Kind::Hello, 0, b"\xff\xff\xff");
        let frame = Frame::decode(BytesMut::from(&body[..])).unwrap();
        assert!(frame.message::<Hello>().is_err());
    }
}
