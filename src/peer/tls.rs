//! Mutual TLS for peer links (`--peer-tls-cert`, `--peer-tls-key`, `--peer-tls-ca`), and the
//! cluster CA that `raftbridge certs` makes.
//!
//! Why it is built this way:
//! - *Mutual.* A peer link carries Raft RPCs and forwarded writes, so both ends must be members:
//!   the acceptor demands a client certificate and both sides check the other's chain against the
//!   cluster CA (not the system roots: a public CA's certificate must not make anyone a member).
//!   One certificate per node serves both directions (it carries the serverAuth and clientAuth
//!   key usages).
//! - *Names.* The dialer checks the acceptor's certificate against the host it dialed (a DNS name
//!   or an IP address, as in the seed list and the advertised address), like any TLS client.
//!   Where addresses are not known in advance (DHCP, NAT), `--peer-tls-server-name` makes every
//!   node check for one shared name instead, as Consul's `server.<dc>.consul` does.
//! - *Node ids bound to certificates.* The chain check makes a peer a member; it does not stop
//!   one member from claiming another's node id in its `Hello` (to vote or answer as it). A
//!   certificate from `raftbridge certs --node-id N` carries the URI name
//!   `urn:raftbridge:node:N`; a peer whose certificate names node ids must claim one of them, or
//!   the handshake is refused, and a node will not load a certificate bound to another id. A
//!   certificate that names none (one shared by every node, as in deploy/k8s) is accepted unless
//!   `--peer-tls-require-node-id` is set, which makes every member's certificate bound.
//! - *TLS under the frames, not instead of them.* The handshake, framing and the cluster-secret
//!   proof are unchanged on top (proto/PEER.md); TLS only wraps the byte stream, so a link is the
//!   same code with or without it.
//! - *Reloadable.* Certificates expire and get rotated: `reload` reads the files again and swaps
//!   the configuration for new connections (links up keep theirs); the node calls it on SIGHUP
//!   and when the files change. A reload that fails keeps what was loaded.
//! - *rustls with ring*: no system OpenSSL to match, no cmake for aws-lc; TLS 1.3 and 1.2 with
//!   rustls' safe defaults. `rcgen` makes certificates so that a test or a newcomer needs no
//!   openssl recipe.

use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

/// ALPN protocol of a peer link: a TLS client that offers other protocols only is refused in
/// the handshake (one that offers none is served, and fails at the `Hello`).
const ALPN: &[u8] = b"raftbridge-peer/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    File { what: &'static str, path: PathBuf, reason: String },
    #[error("peer TLS: {0}")]
    Config(String),
    #[error("TLS configuration: {0}")]
    Https(String),
    #[error("peer TLS server name {name:?}: {reason}")]
    ServerName { name: String, reason: String },
}

/// The byte stream under a link's frames: plain TCP, or TLS over it.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// A plain TCP stream in two halves (no lock between them).
pub fn plain(stream: TcpStream) -> (ReadHalf, WriteHalf) {
    let (rd, wr) = stream.into_split();
    (Box::new(rd), Box::new(wr))
}

/// This node's certificate and key, and the CA its peers' certificates must chain to; cheap to
/// clone (all clones see a reload).
#[derive(Clone)]
pub struct PeerTls {
    /// Swapped whole by `reload`; a handshake takes the current one (a clone of two `Arc`s).
    current: Arc<Reloadable<Configs>>,
    /// Where it was loaded from.
    source: Arc<Source>,
}

#[derive(Clone)]
struct Configs {
    connector: tokio_rustls::TlsConnector,
    acceptor: tokio_rustls::TlsAcceptor,
    /// The name every acceptor's certificate must carry, instead of the dialed host.
    server_name: Option<ServerName<'static>>,
}

struct Source {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    server_name: Option<String>,
    /// This node's id, when its certificate must not be bound to another (`load_for`).
    node_id: Option<u64>,
    /// Every certificate, ours and the peers', must name a node id.
    require_node_id: bool,
}

/// The URI name prefix by which a certificate binds node ids: `urn:raftbridge:node:<id>`.
pub const NODE_URI: &str = "urn:raftbridge:node:";

/// The node ids a certificate is bound to (its `urn:raftbridge:node:<id>` URI names, the
/// prefix in any case); empty when it names none. A certificate whose names cannot be read, or
/// with such a name that does not end in a number, is an error: it must not pass for one that
/// binds nothing.
pub fn node_ids(cert: &CertificateDer<'_>) -> Result<Vec<u64>, String> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    let cert = x509_cert::Certificate::from_der(cert).map_err(|e| format!("cannot read the certificate's names: {e}"))?;
    let names = match cert.tbs_certificate().get_extension::<SubjectAltName>() {
        Ok(Some((_, SubjectAltName(names)))) => names,
        Ok(None) => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read the certificate's names: {e}")),
    };
    let mut ids = Vec::new();
    for name in &names {
        let GeneralName::UniformResourceIdentifier(uri) = name else { continue };
        let uri = uri.as_str();
        let Some(prefix) = uri.get(..NODE_URI.len()).filter(|p| p.eq_ignore_ascii_case(NODE_URI)) else { continue };
        let id = uri[prefix.len()..].parse().map_err(|_| format!("the certificate names {uri:?}, which is not {NODE_URI}<number>"))?;
        ids.push(id);
    }
    Ok(ids)
}

/// The node ids a peer's certificate binds (`node_ids`), or why they could not be read.
pub type Bound = Result<Vec<u64>, String>;

/// Whether a node may claim `claimed` with a certificate bound to `bound` (`node_ids`); the
/// reason names `whose` certificate it is.
fn check_binding(whose: &str, claimed: u64, bound: &[u64], required: bool) -> Result<(), String> {
    if bound.is_empty() {
        if required {
            return Err(format!("{whose} certificate names no node id ({NODE_URI}<id>), and --peer-tls-require-node-id is set"));
        }
        return Ok(());
    }
    if bound.contains(&claimed) {
        Ok(())
    } else {
        Err(format!("{whose} certificate is bound to node {bound:?}, not to node {claimed}"))
    }
}

/// A configuration built from files, swapped whole when they are read again (peer TLS and
/// HTTPS both reload this way). It keeps the files' modification times at the last (re)load,
/// taken *before* reading them, so a periodic check reloads only when one moved, and a file
/// replaced during a read is read again at the next check. A read that fails keeps the value.
pub(crate) struct Reloadable<T> {
    current: std::sync::RwLock<T>,
    paths: Vec<PathBuf>,
    /// Written by whoever (re)loads.
    seen: std::sync::Mutex<Vec<Option<std::time::SystemTime>>>,
    /// When the loaded chain stops working (`check_dates`), in seconds since the Unix epoch,
    /// 0 when its dates could not be read; written after `current` by whoever (re)loads, and
    /// read by the node's TLS task, which also does the reloads (no order to keep).
    expires: std::sync::atomic::AtomicU64,
}

/// What a read of the files gives: the value and when its chain stops working, if known
/// (`check_dates`).
pub(crate) type Read<T> = Result<(T, Option<std::time::SystemTime>), TlsError>;

fn unix_secs(t: Option<std::time::SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs())
}

impl<T: Clone> Reloadable<T> {
    /// Reads the value the first time (`read` reads `paths`).
    pub(crate) fn load(paths: Vec<PathBuf>, read: impl FnOnce() -> Read<T>) -> Result<Reloadable<T>, TlsError> {
        let stamps = stamps(&paths);
        let (value, expires) = read()?;
        Ok(Reloadable {
            current: std::sync::RwLock::new(value),
            paths,
            seen: std::sync::Mutex::new(stamps),
            expires: unix_secs(expires).into(),
        })
    }

    /// When the loaded certificate chain stops working (`check_dates`), if known.
    pub(crate) fn expires(&self) -> Option<std::time::SystemTime> {
        let secs = self.expires.load(std::sync::atomic::Ordering::Relaxed);
        (secs > 0).then(|| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
    }

    /// The value now (a clone: connections take it and let go of the lock at once).
    pub(crate) fn get(&self) -> T {
        // A poisoned lock only means a panic elsewhere while swapping; the value is whole.
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads again and swaps the value in; on an error the value loaded before stays.
    pub(crate) fn reload(&self, read: impl FnOnce() -> Read<T>) -> Result<(), TlsError> {
        let stamps = stamps(&self.paths);
        let (value, expires) = read()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = value;
        self.expires.store(unix_secs(expires), std::sync::atomic::Ordering::Relaxed);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = stamps;
        Ok(())
    }

    /// `reload` when a file's modification time moved since the last load. `Ok(true)` when it
    /// reloaded.
    pub(crate) fn reload_if_changed(&self, read: impl FnOnce() -> Read<T>) -> Result<bool, TlsError> {
        if stamps(&self.paths) == *self.seen.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(false);
        }
        self.reload(read).map(|()| true)
    }
}

/// The files' modification times now (None for a file that cannot be read).
fn stamps(paths: &[PathBuf]) -> Vec<Option<std::time::SystemTime>> {
    paths.iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
}

/// The TLS name of the host in `addr` (`host:port`, `[v6]:port`, or a bare host): what a
/// server's certificate must carry for a client that dialed `addr`.
pub(crate) fn host_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => addr,
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|e| TlsError::ServerName { name: host.into(), reason: e.to_string() })
}

fn pem_err(what: &'static str, path: &Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsError {
    let path = path.to_path_buf();
    move |e| TlsError::File { what, path, reason: e.to_string() }
}

/// A certificate chain from a PEM file (leaf first); at least one certificate.
pub(crate) fn read_chain(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(path).map_err(pem_err(what, path))?.collect::<Result<_, _>>().map_err(pem_err(what, path))?;
    if chain.is_empty() {
        return Err(TlsError::File { what, path: path.into(), reason: "no CERTIFICATE in the file".into() });
    }
    Ok(chain)
}

/// Checks that the leaf of `chain` (read from `path`) is valid at `now`, and returns when the
/// chain stops working: the earliest `notAfter` of the leaf and of the other certificates that
/// are valid now. rustls checks the dates of the *other* side's certificates only, so without
/// this a node would start, or reload, with an expired certificate of its own and every
/// client's handshake would fail. The other certificates are only warned about when they are
/// out of date (a chain may carry an expired cross-signature that no client needs), and a
/// certificate whose dates cannot be read (x509-cert is stricter than rustls about some
/// encodings) is not checked, with a warning: `None` when that is the leaf.
pub(crate) fn check_dates(
    what: &'static str,
    path: &Path,
    chain: &[CertificateDer<'_>],
    now: std::time::SystemTime,
) -> Result<Option<std::time::SystemTime>, TlsError> {
    use x509_cert::der::Decode;
    let invalid = |reason: String| TlsError::File { what, path: path.into(), reason };
    let mut earliest: Option<std::time::SystemTime> = None;
    for (i, der) in chain.iter().enumerate() {
        let which = if i == 0 { "the certificate".to_string() } else { format!("certificate {} of the chain", i + 1) };
        let cert = match x509_cert::Certificate::from_der(der) {
            Ok(cert) => cert,
            Err(e) if i == 0 => {
                tracing::warn!(path = %path.display(), cause = %e, "cannot read the certificate's dates: not checked");
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), cause = %e, "cannot read the dates of {which}: not checked");
                continue;
            }
        };
        let validity = cert.tbs_certificate().validity();
        let problem = if now < validity.not_before.to_system_time() {
            Some(format!("{which} is not valid before {} (is this node's clock right?)", validity.not_before))
        } else if now > validity.not_after.to_system_time() {
            Some(format!("{which} expired at {}", validity.not_after))
        } else {
            None
        };
        match problem {
            Some(reason) if i == 0 => return Err(invalid(reason)),
            Some(reason) => tracing::warn!(path = %path.display(), "{reason}: clients that need it will refuse the chain"),
            None => {
                let not_after = validity.not_after.to_system_time();
                earliest = Some(earliest.map_or(not_after, |e| e.min(not_after)));
            }
        }
    }
    Ok(earliest)
}

/// A private key from a PEM file (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(pem_err("private key", path))
}

/// Trust anchors from a PEM file of CA certificates; at least one.
pub(crate) fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in read_chain("CA certificate", path)? {
        roots.add(c).map_err(|e| TlsError::File { what: "CA certificate", path: path.into(), reason: e.to_string() })?;
    }
    Ok(roots)
}

impl Source {
    fn read(&self) -> Read<Configs> {
        let chain = read_chain("certificate", &self.cert)?;
        // Before the chain check below, whose date error would not name the file.
        let expires = check_dates("certificate", &self.cert, &chain, std::time::SystemTime::now())?;
        if let Some(id) = self.node_id {
            // `read_chain` refused an empty chain.
            node_ids(&chain[0])
                .and_then(|bound| check_binding("the", id, &bound, self.require_node_id))
                .map_err(|reason| TlsError::File { what: "certificate", path: self.cert.clone(), reason: format!("not this node's: {reason}") })?;
        }
        Ok((PeerTls::from_parts(chain, read_key(&self.key)?, read_roots(&self.ca)?, self.server_name.as_deref())?, expires))
    }
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.configs().server_name;
        f.debug_struct("PeerTls").field("server_name", &name).finish_non_exhaustive()
    }
}

impl PeerTls {
    fn configs(&self) -> Configs {
        self.current.get()
    }

    /// Reads the PEM files and builds both sides' configurations, for any node id.
    pub fn load(cert: &Path, key: &Path, ca: &Path, server_name: Option<&str>) -> Result<PeerTls, TlsError> {
        Self::load_for(cert, key, ca, server_name, None, false)
    }

    /// `load` for node `node_id` when given: a certificate bound to other node ids is refused,
    /// now and at every reload; with `require`, so is one that names none (ours and the peers').
    pub fn load_for(
        cert: &Path,
        key: &Path,
        ca: &Path,
        server_name: Option<&str>,
        node_id: Option<u64>,
        require: bool,
    ) -> Result<PeerTls, TlsError> {
        let source = Source {
            cert: cert.into(),
            key: key.into(),
            ca: ca.into(),
            server_name: server_name.map(str::to_string),
            node_id,
            require_node_id: require,
        };
        let paths = vec![source.cert.clone(), source.key.clone(), source.ca.clone()];
        let current = Reloadable::load(paths, || source.read())?;
        Ok(PeerTls { current: Arc::new(current), source: Arc::new(source) })
    }

    /// Reads the files again and uses them for every connection from now on; on an error the
    /// configuration loaded before stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current.reload(|| self.source.read())
    }

    /// `reload` when a file's modification time moved since the last load (a renewed
    /// certificate, a Kubernetes secret updated in place). `Ok(true)` when it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.current.reload_if_changed(|| self.source.read())
    }

    /// Whether a peer whose certificate is bound to `bound` (`node_ids`, or why they could not
    /// be read) may be node `claimed`, as its `Hello` says.
    pub fn check_peer(&self, claimed: u64, bound: &Bound) -> Result<(), String> {
        let bound = bound.as_ref().map_err(|e| format!("node {claimed}: {e}"))?;
        check_binding(&format!("node {claimed}'s"), claimed, bound, self.source.require_node_id)
    }

    /// When the loaded certificate chain stops working (`check_dates`), if known.
    pub fn expires(&self) -> Option<std::time::SystemTime> {
        self.current.expires()
    }

    fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
        server_name: Option<&str>,
    ) -> Result<Configs, TlsError> {
        let config_err = |e: rustls::Error| TlsError::Config(e.to_string());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        // This node's own certificate must pass the check its peers make (chain to the CA, a
        // client's key usage): a wrong file is refused here, at start or reload, rather than
        // cutting the node off at its next reconnect.
        if let Some((leaf, intermediates)) = chain.split_first() {
            verifier
                .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
                .map_err(|e| TlsError::Config(format!("this node's certificate does not pass its peers' check: {e}")))?;
        }
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_err)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(config_err)?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        let server_name = match server_name {
            Some(name) => Some(
                ServerName::try_from(name.to_string())
                    .map_err(|e| TlsError::ServerName { name: name.into(), reason: e.to_string() })?,
            ),
            None => None,
        };
        Ok(Configs {
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            server_name,
        })
    }

    /// The name the acceptor at `addr` must prove: `--peer-tls-server-name`, or the dialed host.
    pub fn name_for(&self, addr: &str) -> Result<ServerName<'static>, TlsError> {
        if let Some(name) = self.configs().server_name {
            return Ok(name);
        }
        host_name(addr)
    }

    /// TLS as the dialer, over a connected stream; also the node ids the acceptor's certificate
    /// is bound to (`node_ids`), for `check_peer` once it has said who it is.
    pub async fn connect(&self, addr: &str, stream: TcpStream) -> std::io::Result<(ReadHalf, WriteHalf, Bound)> {
        let name = self.name_for(addr).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let connector = self.configs().connector;
        let tls = connector.connect(name, stream).await?;
        let bound = peer_ids(tls.get_ref().1.peer_certificates());
        let (rd, wr) = tokio::io::split(tls);
        Ok((Box::new(rd), Box::new(wr), bound))
    }

    /// TLS as the acceptor: the peer must present a certificate from the cluster CA. Also the
    /// node ids that certificate is bound to, as `connect`.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<(ReadHalf, WriteHalf, Bound)> {
        let acceptor = self.configs().acceptor;
        let tls = acceptor.accept(stream).await?;
        let bound = peer_ids(tls.get_ref().1.peer_certificates());
        let (rd, wr) = tokio::io::split(tls);
        Ok((Box::new(rd), Box::new(wr), bound))
    }
}

/// What the peer's leaf certificate binds (`node_ids`); both sides demand a certificate, so
/// one is there after a handshake.
fn peer_ids(certs: Option<&[CertificateDer<'static>]>) -> Result<Vec<u64>, String> {
    certs.and_then(<[_]>::first).map_or_else(|| Err("no certificate".to_string()), node_ids)
}

/// Files `raftbridge certs` writes into its directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";

/// The CA's subject. A CA is re-made from its key with this same name to sign more node
/// certificates later: the chain check matches a certificate to its issuer by name and key.
const CA_NAME: &str = "raftbridge cluster CA";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} already exists (remove it to make a new one)")]
    Exists { path: PathBuf },
    #[error("certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

/// What `raftbridge certs` wrote.
#[derive(Debug)]
pub struct Issued {
    pub ca_created: bool,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes the cluster CA in `dir` unless it is there, then a certificate and key for one node,
/// `<name>.pem` and `<name>-key.pem`, valid for `days` for the names `sans` (DNS names or IP
/// addresses the node is dialed by), and bound to `node_id` when given (`NODE_URI`). Keys are
/// written readable by their owner only.
pub fn issue(dir: &Path, name: &str, sans: &[String], days: u32, node_id: Option<u64>) -> Result<Issued, CertError> {
    use rcgen::BasicConstraints;
    use rcgen::CertificateParams;
    use rcgen::DnType;
    use rcgen::ExtendedKeyUsagePurpose;
    use rcgen::IsCa;
    use rcgen::KeyPair;
    use rcgen::KeyUsagePurpose;

    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(CertError::Invalid(format!("node name {name:?}: use letters, digits, '-', '_' and '.'")));
    }
    if sans.is_empty() {
        return Err(CertError::Invalid("give at least one --san (the host or IP address peers dial)".into()));
    }
    if days == 0 {
        return Err(CertError::Invalid("--days must be at least 1".into()));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}-key.pem"));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(CertError::Exists { path: path.clone() });
        }
    }
    let now = time::OffsetDateTime::now_utc();
    let ca_params = |valid_until| -> Result<CertificateParams, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, CA_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = now - time::Duration::days(1);
        params.not_after = valid_until;
        Ok(params)
    };
    let (ca_path, ca_key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let ca_created = match (ca_path.exists(), ca_key_path.exists()) {
        (false, false) => true,
        (true, true) => false,
        (true, false) => {
            return Err(CertError::Invalid(format!(
                "{} is there but its key {} is not (moved away?): put the key back to sign more certificates, or use another --dir for a new CA",
                ca_path.display(),
                ca_key_path.display()
            )))
        }
        (false, true) => {
            return Err(CertError::Invalid(format!("{} is there without {}", ca_key_path.display(), ca_path.display())))
        }
    };
    let (ca_cert, ca_key) = if ca_created {
        let key = KeyPair::generate()?;
        let cert = ca_params(now + time::Duration::days(3650))?.self_signed(&key)?;
        // The certificate first: a key without it would be taken for a CA on the next run.
        write_new(&ca_path, cert.pem().as_bytes(), false)?;
        if let Err(e) = write_new(&ca_key_path, key.serialize_pem().as_bytes(), true) {
            let _ = std::fs::remove_file(&ca_path);
            return Err(e);
        }
        (cert, key)
    } else {
        let pem = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
        let key = KeyPair::from_pem(&pem)?;
        // The same name and key as the CA in ca.pem: what it signs chains to that certificate
        // (checked below, before anything is written).
        let cert = ca_params(now + time::Duration::days(3650))?.self_signed(&key)?;
        (cert, key)
    };

    let mut params = CertificateParams::new(sans.to_vec())?;
    if let Some(id) = node_id {
        let uri = rcgen::Ia5String::try_from(format!("{NODE_URI}{id}"))?;
        params.subject_alt_names.push(rcgen::SanType::URI(uri));
    }
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    // A wildcard name is checked as one name it covers.
    let name = sans[0].strip_prefix("*.").map_or_else(|| sans[0].clone(), |rest| format!("a.{rest}"));
    chains_to(&ca_path, cert.der(), &name)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_new(&cert_path, cert.pem().as_bytes(), false)?;
    Ok(Issued { ca_created, cert: cert_path, key: key_path })
}

/// Checks that `cert` chains to the CA certificate in `ca_path` for the name `san`, as a peer
/// will: a `ca-key.pem` that is not the key of `ca.pem` would sign certificates every node
/// refuses.
fn chains_to(ca_path: &Path, cert: &CertificateDer<'_>, san: &str) -> Result<(), CertError> {
    let invalid = |why: String| CertError::Invalid(why);
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(ca_path).map_err(|e| invalid(format!("{}: {e}", ca_path.display())))? {
        roots.add(ca.map_err(|e| invalid(format!("{}: {e}", ca_path.display())))?).map_err(|e| invalid(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    let name = ServerName::try_from(san.to_string()).map_err(|e| invalid(format!("--san {san}: {e}")))?;
    let now = rustls::pki_types::UnixTime::now();
    use rustls::client::danger::ServerCertVerifier;
    verifier.verify_server_cert(cert, &[], &name, &[], now).map(|_| ()).map_err(|e| {
        invalid(format!("the new certificate does not chain to {} ({e}): is {CA_KEY} the key of that CA?", ca_path.display()))
    })
}

/// Creates a file that must not exist yet; a key is readable by its owner only.
fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true).mode(if secret { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::AlreadyExists => CertError::Exists { path: path.into() },
        _ => CertError::Io { path: path.into(), source },
    })?;
    file.write_all(bytes).and_then(|_| file.sync_all()).map_err(|source| CertError::Io { path: path.into(), source })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rb-tls-{tag}-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn certs_make_a_ca_once_and_sign_nodes_with_it() {
        let dir = temp_dir("issue");
        let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let first = issue(&dir, "node1", &sans, 30, None).unwrap();
        assert!(first.ca_created);
        let ca_before = std::fs::read(dir.join(CA_CERT)).unwrap();
        let second = issue(&dir, "node2", &sans, 30, None).unwrap();
        assert!(!second.ca_created, "the CA in the directory is reused");
        assert_eq!(std::fs::read(dir.join(CA_CERT)).unwrap(), ca_before);
        assert!(matches!(issue(&dir, "node1", &sans, 30, None), Err(CertError::Exists { .. })), "nothing is overwritten");
        assert!(matches!(issue(&dir, "../x", &sans, 30, None), Err(CertError::Invalid(_))));
        // The CA key moved away (as advised): a clear error, and nothing is written.
        std::fs::rename(dir.join(CA_KEY), dir.join("moved-key.pem")).unwrap();
        let err = issue(&dir, "node3", &sans, 30, None).unwrap_err();
        assert!(matches!(&err, CertError::Invalid(m) if m.contains("moved away")), "{err}");
        assert!(!dir.join(CA_KEY).exists() && !dir.join("node3.pem").exists(), "no new CA key, no certificate");
        // A key that is not the CA's: refused before anything is written.
        let other = temp_dir("other-ca");
        issue(&other, "x", &sans, 30, None).unwrap();
        std::fs::copy(other.join(CA_KEY), dir.join(CA_KEY)).unwrap();
        let err = issue(&dir, "node3", &sans, 30, None).unwrap_err();
        assert!(err.to_string().contains("does not chain"), "{err}");
        assert!(!dir.join("node3.pem").exists() && !dir.join("node3-key.pem").exists());
        std::fs::rename(dir.join("moved-key.pem"), dir.join(CA_KEY)).unwrap();
        issue(&dir, "node3", &["*.peers.internal".to_string()], 30, None).expect("the key back: signs again, a wildcard too");
        std::fs::remove_dir_all(other).unwrap();
        assert!(matches!(issue(&dir, "n", &[], 30, None), Err(CertError::Invalid(_))));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&second.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "keys are private");
        let mode = std::fs::metadata(dir.join(CA_KEY)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Both node certificates load against the one CA file.
        for n in ["node1", "node2"] {
            PeerTls::load(&dir.join(format!("{n}.pem")), &dir.join(format!("{n}-key.pem")), &dir.join(CA_CERT), None).unwrap();
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A self-signed certificate for `localhost` valid from `from` to `until` days from now,
    /// with its key, as PEM.
    pub(crate) fn dated(from: i64, until: i64) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(from);
        params.not_after = now + time::Duration::days(until);
        let key = rcgen::KeyPair::generate().unwrap();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    fn ders(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn the_leaf_must_be_in_date_and_the_chain_gives_the_earliest_expiry() {
        let now = std::time::SystemTime::now();
        let path = Path::new("/etc/x/cert.pem");
        let (valid, _) = dated(-1, 30);
        let (expired, _) = dated(-30, -1);
        let (early, _) = dated(2, 30);
        let (sooner, _) = dated(-1, 3);
        let at = check_dates("certificate", path, &ders(&valid), now).unwrap().expect("dates read");
        let days = at.duration_since(now).unwrap().as_secs() / 86_400;
        assert!((29..=30).contains(&days), "{days}");
        let err = check_dates("certificate", path, &ders(&expired), now).unwrap_err().to_string();
        assert!(err.contains("/etc/x/cert.pem") && err.contains("the certificate expired at 20"), "{err}");
        let err = check_dates("certificate", path, &ders(&early), now).unwrap_err().to_string();
        assert!(err.contains("is not valid before"), "{err}");
        // A chain: the certificate expiring first gives the date.
        let at = check_dates("certificate", path, &ders(&format!("{valid}{sooner}")), now).unwrap().expect("dates read");
        assert!(at.duration_since(now).unwrap().as_secs() / 86_400 < 3);
        // An expired certificate behind the leaf (an old cross-signature) is only warned about,
        // and does not count for the date; nor does one whose dates cannot be read.
        let at = check_dates("certificate", path, &ders(&format!("{valid}{expired}")), now).unwrap().expect("dates read");
        assert_eq!(at.duration_since(now).unwrap().as_secs() / 86_400, days);
        let junk = CertificateDer::from(vec![1u8, 2, 3]);
        let chain = [ders(&valid).remove(0), junk.clone()];
        assert_eq!(check_dates("certificate", path, &chain, now).unwrap(), Some(at));
        // A leaf whose dates cannot be read is not refused here (rustls has the last word).
        assert_eq!(check_dates("certificate", path, &[junk], now).unwrap(), None);
    }

    #[test]
    fn certs_bind_a_node_id_that_peers_check() {
        let dir = temp_dir("bind");
        issue(&dir, "n7", &["127.0.0.1".into()], 30, Some(7)).unwrap();
        issue(&dir, "any", &["127.0.0.1".into()], 30, None).unwrap();
        let der = |name: &str| read_chain("certificate", &dir.join(format!("{name}.pem"))).unwrap().remove(0);
        assert_eq!(node_ids(&der("n7")), Ok(vec![7]));
        assert_eq!(node_ids(&der("any")), Ok(Vec::new()));
        assert!(node_ids(&CertificateDer::from(vec![1u8, 2, 3])).unwrap_err().contains("cannot read"), "unreadable is not unbound");
        // A node-id name that is not a number: refused, not ignored.
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(rcgen::Ia5String::try_from("URN:raftbridge:node:x").unwrap()));
        let odd = params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
        assert!(node_ids(odd.der()).unwrap_err().contains("not urn:raftbridge:node:<number>"));
        assert!(check_binding("a", 7, &[7], true).is_ok());
        assert!(check_binding("a", 3, &[], false).is_ok(), "an unbound certificate, not required");
        assert!(check_binding("a", 3, &[], true).unwrap_err().contains("names no node id"));
        assert_eq!(check_binding("node 3's", 3, &[7], false).unwrap_err(), "node 3's certificate is bound to node [7], not to node 3");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = temp_dir("bad");
        issue(&dir, "n1", &["127.0.0.1".into()], 30, None).unwrap();
        std::fs::write(dir.join("empty.pem"), "").unwrap();
        let err = PeerTls::load(&dir.join("missing.pem"), &dir.join("n1-key.pem"), &dir.join(CA_CERT), None).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let err = PeerTls::load(&dir.join("n1.pem"), &dir.join("n1-key.pem"), &dir.join("empty.pem"), None).unwrap_err();
        assert!(err.to_string().contains("CA certificate"), "{err}");
        let err = PeerTls::load(&dir.join("n1.pem"), &dir.join("n1.pem"), &dir.join(CA_CERT), None).unwrap_err();
        assert!(err.to_string().contains("private key"), "{err}");
        // A certificate of another CA is refused when loaded, not at the next reconnect.
        let other = dir.join("other");
        issue(&other, "n9", &["127.0.0.1".into()], 30, None).unwrap();
        let err = PeerTls::load(&other.join("n9.pem"), &other.join("n9-key.pem"), &dir.join(CA_CERT), None).unwrap_err();
        assert!(err.to_string().contains("does not pass its peers' check"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A reload takes new files for new handshakes; one that fails keeps what was loaded.
    #[tokio::test]
    async fn a_reload_uses_the_new_files_and_a_bad_one_keeps_the_old() {
        let dir = temp_dir("reload");
        issue(&dir, "by-name", &["localhost".into()], 30, None).unwrap();
        issue(&dir, "by-ip", &["127.0.0.1".into()], 30, None).unwrap();
        issue(&dir, "dialer", &["127.0.0.1".into()], 30, None).unwrap();
        let (cert, key, ca) = (dir.join("live.pem"), dir.join("live-key.pem"), dir.join(CA_CERT));
        std::fs::copy(dir.join("by-name.pem"), &cert).unwrap();
        std::fs::copy(dir.join("by-name-key.pem"), &key).unwrap();
        let acceptor = PeerTls::load(&cert, &key, &ca, None).unwrap();
        let dialer = PeerTls::load(&dir.join("dialer.pem"), &dir.join("dialer-key.pem"), &ca, None).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let serving = acceptor.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tls = serving.clone();
                tokio::spawn(async move {
                    if let Ok((mut rd, _wr, _)) = tls.accept(stream).await {
                        let mut buf = [0u8; 1];
                        let _ = tokio::io::AsyncReadExt::read(&mut rd, &mut buf).await;
                    }
                });
            }
        });
        let handshake = || async { dialer.connect(&addr, tokio::net::TcpStream::connect(&addr).await.unwrap()).await.map(|_| ()) };
        assert!(handshake().await.is_err(), "the certificate names localhost, not the dialed 127.0.0.1");
        assert!(!acceptor.reload_if_changed().unwrap(), "nothing changed yet");
        // Renewed in place: the next handshake uses the new certificate.
        std::fs::write(&cert, std::fs::read(dir.join("by-ip.pem")).unwrap()).unwrap();
        std::fs::write(&key, std::fs::read(dir.join("by-ip-key.pem")).unwrap()).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
        std::fs::File::options().write(true).open(&cert).unwrap().set_modified(later).unwrap();
        assert!(acceptor.reload_if_changed().unwrap(), "a changed file is reloaded");
        handshake().await.expect("the reloaded certificate names 127.0.0.1");
        // A broken file: the reload fails, and handshakes go on with what was loaded.
        std::fs::write(&key, "not a key").unwrap();
        assert!(acceptor.reload().is_err());
        handshake().await.expect("the previous configuration stays");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_dialed_host_is_the_server_name_unless_one_is_configured() {
        let dir = temp_dir("names");
        issue(&dir, "n1", &["127.0.0.1".into()], 30, None).unwrap();
        let load = |name| PeerTls::load(&dir.join("n1.pem"), &dir.join("n1-key.pem"), &dir.join(CA_CERT), name).unwrap();
        let tls = load(None);
        assert_eq!(format!("{:?}", tls.name_for("127.0.0.1:7400").unwrap()), format!("{:?}", ServerName::try_from("127.0.0.1").unwrap()));
        assert_eq!(format!("{:?}", tls.name_for("[::1]:7400").unwrap()), format!("{:?}", ServerName::try_from("::1").unwrap()));
        assert_eq!(format!("{:?}", tls.name_for("rb-0.rb:7400").unwrap()), format!("{:?}", ServerName::try_from("rb-0.rb").unwrap()));
        let tls = load(Some("peers.raftbridge"));
        assert_eq!(format!("{:?}", tls.name_for("10.0.0.1:7400").unwrap()), format!("{:?}", ServerName::try_from("peers.raftbridge").unwrap()));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
