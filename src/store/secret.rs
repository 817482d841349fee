//! The secret store: values sealed (encrypted and authenticated) on the node that takes the
//! write, before they are proposed, and opened on the node that serves a read.
//!
//! Why seal before Raft rather than at rest on each disk: the value then crosses the peer links,
//! lies in every node's log, snapshots and memory, and in the chaos harness's copies of data
//! dirs, only as ciphertext, and one code path covers all of them. The key is derived from the
//! cluster secret (`--cluster-secret`), which every node has and no data dir holds, so a stolen
//! data dir (or backup of one) gives the secrets away only together with that secret; the store
//! is off without it. ChaCha20-Poly1305 (`ring`, already built for rustls) with a random 96-bit
//! nonce per write, and the store and key as associated data, so a sealed value copied to
//! another key does not open there.
//!
//! A sealed value is kept as a JSON string (`"rbs1:" + hex(nonce ‖ ciphertext ‖ tag)`), so the
//! state machine, snapshots and digests treat it as any other value.

use ring::aead;
use ring::rand::SecureRandom;

use super::Consistency;
use super::Listing;
use super::Precondition;
use super::StateStore;
use super::StoreError;

const PREFIX: &str = "rbs1:";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SecretError {
    #[error("the secret store is off: start the nodes with --cluster-secret, from which its key is derived")]
    Off,
    /// The value was sealed under another cluster secret, or damaged.
    #[error("secret {store}/{key} does not open with this cluster's secret (written under another --cluster-secret? give that one as --cluster-secret-previous, or write it again)")]
    Unreadable { store: String, key: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Seals and opens secret values with the key derived from the cluster secret.
pub struct Sealer {
    /// Seals; opens first.
    key: aead::LessSafeKey,
    /// Keys of earlier cluster secrets (`--cluster-secret-previous`): they open what was sealed
    /// before a change of the cluster secret, until it is written again.
    previous: Vec<aead::LessSafeKey>,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

/// What the seal binds a value to: its store and key, each length-prefixed.
fn associated(store: &str, key: &str) -> Vec<u8> {
    let mut ad = Vec::with_capacity(32 + store.len() + key.len());
    ad.extend_from_slice(b"raftbridge secret v1\0");
    ad.extend_from_slice(&(store.len() as u64).to_be_bytes());
    ad.extend_from_slice(store.as_bytes());
    ad.extend_from_slice(key.as_bytes());
    ad
}

impl Sealer {
    /// `key`: 32 bytes derived from the cluster secret (`ClusterSecret::derive`); `previous`:
    /// those of earlier cluster secrets, which only open.
    pub fn new(key: [u8; 32], previous: &[[u8; 32]]) -> Sealer {
        // CHACHA20_POLY1305 takes exactly 32 bytes, which each key is: this cannot fail.
        let make = |k: &[u8; 32]| aead::LessSafeKey::new(aead::UnboundKey::new(&aead::CHACHA20_POLY1305, k).expect("a 32-byte ChaCha20-Poly1305 key"));
        Sealer { key: make(&key), previous: previous.iter().map(make).collect(), rng: ring::rand::SystemRandom::new() }
    }

    /// The length of `plain_len` bytes once sealed (`seal`'s JSON string).
    pub fn sealed_len(plain_len: usize) -> usize {
        PREFIX.len() + 2 + 2 * (NONCE_LEN + plain_len + TAG_LEN)
    }

    /// `plain` sealed for `store/key`, as JSON text.
    pub fn seal(&self, store: &str, key: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        // The system's random source does not fail once the process runs (getrandom); a node
        // that cannot draw randomness could not have made its peer handshake nonces either.
        self.rng.fill(&mut nonce).expect("the system random source");
        let mut data = plain.to_vec();
        // Sealing in place fails only for inputs past ChaCha20's 256 GiB: bodies are bounded far below.
        self.key
            .seal_in_place_append_tag(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(associated(store, key)), &mut data)
            .expect("a value far below ChaCha20-Poly1305's limit");
        let mut text = String::with_capacity(Self::sealed_len(plain.len()));
        text.push('"');
        text.push_str(PREFIX);
        for b in nonce.iter().chain(&data) {
            text.push_str(&format!("{b:02x}"));
        }
        text.push('"');
        text.into_bytes()
    }

    /// The plain value of `sealed` (as `seal` made it for `store/key`).
    pub fn open(&self, store: &str, key: &str, sealed: &[u8]) -> Result<Vec<u8>, SecretError> {
        let unreadable = || SecretError::Unreadable { store: store.to_string(), key: key.to_string() };
        let text = std::str::from_utf8(sealed).map_err(|_| unreadable())?;
        let hex = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).and_then(|t| t.strip_prefix(PREFIX)).ok_or_else(unreadable)?;
        if hex.len() % 2 != 0 || hex.len() < 2 * (NONCE_LEN + TAG_LEN) {
            return Err(unreadable());
        }
        let mut bytes = Vec::with_capacity(hex.len() / 2);
        for pair in hex.as_bytes().chunks_exact(2) {
            let pair = std::str::from_utf8(pair).map_err(|_| unreadable())?;
            bytes.push(u8::from_str_radix(pair, 16).map_err(|_| unreadable())?);
        }
        let sealed = bytes.split_off(NONCE_LEN);
        let ad = associated(store, key);
        for k in std::iter::once(&self.key).chain(&self.previous) {
            let nonce = aead::Nonce::try_assume_unique_for_key(&bytes).map_err(|_| unreadable())?;
            let mut data = sealed.clone();
            if let Ok(plain) = k.open_in_place(nonce, aead::Aad::from(ad.as_slice()), &mut data) {
                return Ok(plain.to_vec());
            }
        }
        Err(unreadable())
    }
}

/// The secret store: the state store's `Secrets` space with values sealed.
#[derive(Clone)]
pub struct SecretStore {
    store: StateStore,
    /// `None` without a cluster secret: every call is `SecretError::Off`.
    sealer: Option<std::sync::Arc<Sealer>>,
    /// Largest plain value a write takes: what seals to at most the store's `--max-body`.
    max_plain: usize,
}

impl SecretStore {
    pub fn new(store: &StateStore, sealer: Option<std::sync::Arc<Sealer>>, max_body: usize) -> SecretStore {
        let overhead = Sealer::sealed_len(0);
        SecretStore { store: store.in_space(super::Space::Secrets), sealer, max_plain: max_body.saturating_sub(overhead) / 2 }
    }

    pub fn is_on(&self) -> bool {
        self.sealer.is_some()
    }

    fn sealer(&self) -> Result<&Sealer, SecretError> {
        self.sealer.as_deref().ok_or(SecretError::Off)
    }

    /// A secret's plain JSON value and revision.
    pub async fn get(&self, store: &str, key: &str, consistency: Consistency) -> Result<Option<(Vec<u8>, u64)>, SecretError> {
        let sealer = self.sealer()?;
        match self.store.get(store, key, consistency).await? {
            None => Ok(None),
            Some(v) => Ok(Some((sealer.open(store, key, &v.value)?, v.revision))),
        }
    }

    /// Sets a secret to a JSON value (checked as the state store checks one); the new revision.
    pub async fn put_if(&self, store: &str, key: &str, value: &[u8], pre: Precondition) -> Result<u64, SecretError> {
        self.put_tagged(store, key, value, pre, None).await
    }

    /// `put_if`, applied at most once per `tag` (a handler's write under an idempotency key;
    /// the precondition must be `Any` or a revision).
    pub async fn put_tagged(&self, store: &str, key: &str, value: &[u8], pre: Precondition, tag: crate::raft::types::WriteTag) -> Result<u64, SecretError> {
        let sealer = self.sealer()?;
        super::check_names(store, key)?;
        if value.len() > self.max_plain {
            return Err(StoreError::TooLarge { bytes: value.len(), limit: self.max_plain }.into());
        }
        super::check_json(value)?;
        let sealed = sealer.seal(store, key, value);
        Ok(match (pre, tag) {
            (Precondition::Any, tag) => self.store.put_tagged(store, key, &sealed, None, tag).await?,
            (Precondition::Revision(r), tag) => self.store.put_tagged(store, key, &sealed, Some(r), tag).await?,
            (pre, _) => self.store.put_if(store, key, &sealed, pre).await?,
        })
    }

    pub async fn delete_if(&self, store: &str, key: &str, pre: Precondition) -> Result<bool, SecretError> {
        self.sealer()?;
        Ok(self.store.delete_if(store, key, pre).await?)
    }

    /// A handler's unconditional delete, applied once per `tag` (`StateStore::delete_tagged`).
    pub async fn delete_tagged(&self, store: &str, key: &str, tag: crate::raft::types::WriteTag) -> Result<bool, SecretError> {
        self.sealer()?;
        Ok(self.store.delete_tagged(store, key, None, tag).await?)
    }

    /// The names and revisions of a store's secrets (the values, still sealed, are the
    /// caller's to leave out).
    pub async fn list(&self, store: &str, prefix: &str, after: Option<&str>, limit: usize, max_bytes: usize, consistency: Consistency) -> Result<Listing, SecretError> {
        self.sealer()?;
        Ok(self.store.list(store, prefix, after, limit, max_bytes, consistency).await?)
    }

    /// The plain value of `sealed`, read from `store/key` of the raw store (`raw`).
    pub fn open(&self, store: &str, key: &str, sealed: &[u8]) -> Result<Vec<u8>, SecretError> {
        self.sealer()?.open(store, key, sealed)
    }

    /// The state store in the secrets space, for long polls (`StateStore::wait_changed`).
    pub fn raw(&self) -> &StateStore {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_for_its_key_and_cluster_secret() {
        let sealer = Sealer::new([7; 32], &[]);
        let sealed = sealer.seal("db", "password", br#""hunter2""#);
        assert_eq!(sealed.len(), Sealer::sealed_len(9));
        let text = std::str::from_utf8(&sealed).unwrap();
        assert!(serde_json::from_str::<String>(text).is_ok(), "kept as a JSON string: {text}");
        assert!(!text.contains("hunter2"));
        assert_eq!(sealer.open("db", "password", &sealed).unwrap(), br#""hunter2""#);
        assert_ne!(sealer.seal("db", "password", br#""hunter2""#), sealed, "a fresh nonce per seal");
        assert!(matches!(sealer.open("db", "other", &sealed), Err(SecretError::Unreadable { .. })), "moved to another key");
        assert!(matches!(sealer.open("dbx", "password", &sealed), Err(SecretError::Unreadable { .. })), "moved to another store");
        assert!(matches!(Sealer::new([8; 32], &[]).open("db", "password", &sealed), Err(SecretError::Unreadable { .. })), "another cluster secret");
        let changed = Sealer::new([8; 32], &[[9; 32], [7; 32]]);
        assert_eq!(changed.open("db", "password", &sealed).unwrap(), br#""hunter2""#, "opened with an earlier cluster secret's key");
        let resealed = changed.seal("db", "password", br#""hunter2""#);
        assert!(sealer.open("db", "password", &resealed).is_err(), "a write seals with the current key only");
        let mut flipped = sealed.clone();
        let at = flipped.len() - 3;
        flipped[at] = if flipped[at] == b'0' { b'1' } else { b'0' };
        assert!(matches!(sealer.open("db", "password", &flipped), Err(SecretError::Unreadable { .. })), "a changed byte");
        for bad in [&b"\"hunter2\""[..], b"\"rbs1:zz\"", b"\"rbs1:00\"", b"", b"\"rbs1:0\""] {
            assert!(matches!(sealer.open("db", "password", bad), Err(SecretError::Unreadable { .. })), "{bad:?}");
        }
    }
}
