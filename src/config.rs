//! Node configuration: flags, `RAFTBRIDGE_*` environment variables and an optional TOML file.
//!
//! Precedence is flag > environment > file > default. clap reads flags and env vars into
//! `NodeArgs` (every field optional so an absent flag can fall back to the file), the TOML file
//! deserializes into the same shape, and `NodeArgs::resolve` merges them into a validated
//! `NodeConfig`. Field names in the file are the flag names with `_` for `-`.

use std::time::Duration;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// A file that is not the settings' TOML. Said by line and column and the parser's message
    /// with any value it quotes left out (`parse_error`): the file holds `cluster_secret` and
    /// `secrets_token`, and toml's own message shows the offending line, which ends up in the
    /// journal or a container's log.
    #[error("config file {path}, line {line}, column {column}: {message}")]
    Parse { path: PathBuf, line: usize, column: usize, message: String },
    #[error("missing required setting `{0}` (flag, RAFTBRIDGE_* env var, or config file)")]
    Missing(&'static str),
    #[error("invalid `{name}`: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// A secret given as text (a flag, an env var, the config file): a cluster secret or a bearer
/// token. Its `Debug` shows only its length, so that the flag structs that hold one
/// (`NodeArgs`, the CLI's) can derive theirs and still never print it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretText(String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretText(<{} bytes>)", self.0.len())
    }
}

impl std::str::FromStr for SecretText {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretText(s.to_string()))
    }
}

impl From<&str> for SecretText {
    fn from(s: &str) -> Self {
        SecretText(s.to_string())
    }
}

impl std::ops::Deref for SecretText {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// `raftbridge node` flags. Each also reads `RAFTBRIDGE_<NAME>`.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeArgs {
    /// TOML config file (flags and env vars override it).
    #[arg(long, env = "RAFTBRIDGE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's id (unique in the cluster, never reused; stored in the data dir).
    #[arg(long, env = "RAFTBRIDGE_ID")]
    pub id: Option<u64>,
    /// Derive the id from the hostname's trailing `-N` as N+1 (StatefulSet pods `name-0` → 1);
    /// `--id` wins when both are given.
    #[arg(long, env = "RAFTBRIDGE_ID_FROM_HOSTNAME", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub id_from_hostname: Option<bool>,
    /// Async worker threads (default: one per core). When several nodes share a machine (a
    /// loopback test cluster), give each its share of the cores: fewer threads than cores
    /// means fewer wake-ups and context switches (measured: ~11% less CPU per event with
    /// three nodes at 1 thread each on 2 cores). 1 runs tokio's current-thread scheduler
    /// (cheaper still, see `cli::runtime_builder`). Flag or env only: the runtime starts before
    /// the config file is read.
    #[arg(long, env = "RAFTBRIDGE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    #[serde(skip)]
    pub worker_threads: Option<u16>,
    /// Directory for the Raft log, snapshots and the node id.
    #[arg(long, env = "RAFTBRIDGE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address the peer listener binds (may be 0.0.0.0:port with --advertise).
    #[arg(long, env = "RAFTBRIDGE_PEER_ADDR")]
    pub peer_addr: Option<String>,
    /// Address the client HTTP listener binds.
    #[arg(long, env = "RAFTBRIDGE_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Address of a second client listener that serves the same API over TLS (HTTP/1.1 and
    /// HTTP/2). Needs --http-tls-cert and --http-tls-key; plain HTTP stays on --http-addr (bind
    /// it to loopback to keep it for probes and a local sidecar app only).
    #[arg(long, env = "RAFTBRIDGE_HTTPS_ADDR")]
    pub https_addr: Option<String>,
    /// HTTPS: this node's certificate chain (PEM), for the names clients use.
    #[arg(long, env = "RAFTBRIDGE_HTTP_TLS_CERT")]
    pub http_tls_cert: Option<PathBuf>,
    /// HTTPS: the certificate's private key (PEM).
    #[arg(long, env = "RAFTBRIDGE_HTTP_TLS_KEY")]
    pub http_tls_key: Option<PathBuf>,
    /// HTTPS: require client certificates that chain to this CA (PEM); without it any client
    /// may connect.
    #[arg(long, env = "RAFTBRIDGE_HTTP_TLS_CLIENT_CA")]
    pub http_tls_client_ca: Option<PathBuf>,
    /// Peer address other nodes use to reach this one (default: --peer-addr).
    #[arg(long, env = "RAFTBRIDGE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Local IP address this node's peer dials leave from (default: the kernel picks by route),
    /// for a host with several addresses whose firewall rules expect peer traffic from one.
    /// Not used toward a peer it cannot reach (another address family; a non-loopback peer from
    /// a loopback address).
    #[arg(long, env = "RAFTBRIDGE_PEER_SOURCE_ADDR")]
    pub peer_source_addr: Option<std::net::IpAddr>,
    /// Comma-separated peer addresses of seed nodes (host:port; a DNS name may resolve to many).
    /// In the file a list (`seeds = ["a:7400", "b:7400"]`) or, as the flag takes it, one
    /// comma-separated string.
    #[arg(long, env = "RAFTBRIDGE_SEEDS", value_delimiter = ',')]
    #[serde(default, deserialize_with = "list_or_commas")]
    pub seeds: Option<Vec<String>>,
    /// Form a new cluster once this many seeds (this node included) can be reached.
    #[arg(long, env = "RAFTBRIDGE_BOOTSTRAP_EXPECT")]
    pub bootstrap_expect: Option<usize>,
    /// Voters at most; further nodes stay learners (they still serve).
    #[arg(long, env = "RAFTBRIDGE_MAX_VOTERS")]
    pub max_voters: Option<usize>,
    /// Largest accepted request body in bytes.
    #[arg(long, env = "RAFTBRIDGE_MAX_BODY")]
    pub max_body: Option<usize>,
    /// Log entries between snapshots (then the log is purged up to the snapshot).
    #[arg(long, env = "RAFTBRIDGE_SNAPSHOT_THRESHOLD")]
    pub snapshot_threshold: Option<u64>,
    /// Cluster name; peers of another cluster are refused at the handshake.
    #[arg(long, env = "RAFTBRIDGE_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Shared secret of the cluster's nodes (at least 16 bytes, e.g. `openssl rand -hex 32`;
    /// prefer the env var to the flag, which `ps` shows). When set, a peer connection is taken
    /// only from a node that proves it knows the same secret (HMAC-SHA256 challenge-response in
    /// the handshake), and this node proves it in turn. It authenticates peers; it does not
    /// encrypt the link.
    #[arg(long, env = "RAFTBRIDGE_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<SecretText>,
    /// Bearer token that clients of the secret store's HTTP API (`/v1/secrets/...`) must send
    /// (`Authorization: Bearer <token>`; at least 16 bytes; prefer the env var). Without it that
    /// API answers 403; handlers still reach secrets through the SDK. The store itself needs
    /// --cluster-secret, from which the key that seals its values is derived.
    #[arg(long, env = "RAFTBRIDGE_SECRETS_TOKEN", hide_env_values = true)]
    pub secrets_token: Option<SecretText>,
    /// Bearer token that clients of the node's own HTTP API must send (`Authorization: Bearer
    /// <token>`; at least 16 bytes of visible ASCII; prefer the env var): `/v1/state`,
    /// `/v1/config`, `/v1/events`, `/v1/dead-letters`, `/v1/subscriptions` and `/cluster`
    /// (member removal included). Without it those are open to whoever reaches --http-addr.
    /// The probes, `/metrics`, `/openapi.json` and the services' endpoints under `/api/` stay
    /// open; `/v1/secrets` takes --secrets-token instead.
    #[arg(long, env = "RAFTBRIDGE_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<SecretText>,
    /// The API token used before --api-token was changed: still accepted, so that clients can
    /// move to the new one while both work. Drop it once they have.
    #[arg(long, env = "RAFTBRIDGE_API_TOKEN_PREVIOUS", hide_env_values = true)]
    pub api_token_previous: Option<SecretText>,
    /// A second bearer token for the same API that may only read it (GET and HEAD: the stores,
    /// the event log, dead letters, subscriptions, `/cluster`): for dashboards and auditors.
    /// Needs --api-token; at least 16 bytes of visible ASCII.
    #[arg(long, env = "RAFTBRIDGE_API_READ_TOKEN", hide_env_values = true)]
    pub api_read_token: Option<SecretText>,
    /// The cluster secret used before --cluster-secret was changed: the secret store still
    /// opens values sealed under it (a write seals with the current one). Drop it once every
    /// secret was written again.
    #[arg(long, env = "RAFTBRIDGE_CLUSTER_SECRET_PREVIOUS", hide_env_values = true)]
    pub cluster_secret_previous: Option<SecretText>,
    /// Peer links over mutual TLS: this node's certificate chain (PEM). Needs --peer-tls-key and
    /// --peer-tls-ca too; `raftbridge certs` makes all three. Every node of a cluster must use
    /// TLS, or none.
    #[arg(long, env = "RAFTBRIDGE_PEER_TLS_CERT")]
    pub peer_tls_cert: Option<PathBuf>,
    /// This node's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "RAFTBRIDGE_PEER_TLS_KEY")]
    pub peer_tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): a peer's certificate must chain to it, in both directions.
    #[arg(long, env = "RAFTBRIDGE_PEER_TLS_CA")]
    pub peer_tls_ca: Option<PathBuf>,
    /// The name every node's certificate carries, checked instead of the dialed host (when
    /// peers' addresses are not known when certificates are made).
    #[arg(long, env = "RAFTBRIDGE_PEER_TLS_SERVER_NAME")]
    pub peer_tls_server_name: Option<String>,
    /// Every peer certificate, this node's too, must be bound to its node id (`raftbridge certs
    /// --node-id`). Without it, a certificate bound to ids is still checked against the id its
    /// node claims, and one that names none is accepted.
    #[arg(
        long,
        env = "RAFTBRIDGE_PEER_TLS_REQUIRE_NODE_ID",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub peer_tls_require_node_id: Option<bool>,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long, env = "RAFTBRIDGE_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Raft election timeout (min) in milliseconds; the max is twice this.
    #[arg(long, env = "RAFTBRIDGE_ELECTION_TIMEOUT_MS")]
    pub election_timeout_ms: Option<u64>,
    /// How long a write or linearizable read may wait for a leader and a quorum (ms) before 503.
    #[arg(long, env = "RAFTBRIDGE_WRITE_TIMEOUT_MS")]
    pub write_timeout_ms: Option<u64>,
    /// Largest peer frame in bytes.
    #[arg(long, env = "RAFTBRIDGE_MAX_FRAME")]
    pub max_frame: Option<usize>,
    /// Concurrent client HTTP connections at most.
    #[arg(long, env = "RAFTBRIDGE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// How long a client connection may sit with no request under way before the node closes
    /// it (ms, default 60000; HTTP/2 gets a GOAWAY, so a request racing it is retried safely):
    /// an idle connection holds one of `--max-connections`. As nginx's `keepalive_timeout`.
    #[arg(long, env = "RAFTBRIDGE_HTTP_IDLE_TIMEOUT_MS")]
    pub http_idle_timeout_ms: Option<u64>,
    /// Bytes of request bodies held at once across all requests (being received or handled);
    /// past it a request is answered 503. Default 256 MiB. Answers being written to clients,
    /// and request heads until their answers are made, have budgets of the same size.
    #[arg(long, env = "RAFTBRIDGE_MAX_BODY_BUFFERED")]
    pub max_body_buffered: Option<usize>,
    /// Run a command on this node when it offers it (instead of balancing across all nodes).
    #[arg(long, env = "RAFTBRIDGE_LOCAL_FIRST", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub local_first: Option<bool>,
    /// How long the leader may hold a small batch of events for more, in milliseconds (default
    /// 2; 0: never). When its previous entry has committed and fewer than 16 events are queued,
    /// it waits for more until the oldest has waited this long. Like Kafka's `linger.ms`: under
    /// a light load entries get larger, so every node fsyncs and replicates less often (about
    /// half the CPU per event at 2,000 events/s), for up to this much more publish latency; a
    /// saturated leader always has 16 queued and never waits.
    #[arg(long, env = "RAFTBRIDGE_PUBLISH_LINGER_MS")]
    pub publish_linger_ms: Option<u64>,
    /// Deduplication keys kept at most, each for producer keys (`idempotency-key` of events)
    /// and for command idempotency records (default 250000). Keys are kept for their window
    /// (2 min for events, 10 min for commands); past this bound the oldest are forgotten sooner
    /// (`raftbridge_dedup_window_shortened_total` counts it), so memory stays bounded under any
    /// rate of unique keys.
    #[arg(long, env = "RAFTBRIDGE_DEDUP_MAX_KEYS")]
    pub dedup_max_keys: Option<usize>,
    /// Bytes the command idempotency records (their stored answers) may take at most (default
    /// 64 MiB; at least --max-frame); past it the oldest are forgotten sooner.
    #[arg(long, env = "RAFTBRIDGE_IDEMPOTENCY_MAX_BYTES")]
    pub idempotency_max_bytes: Option<u64>,
    /// Keys the state store may hold at most, over all stores (default 1000000): a write that
    /// would add one more is refused with 507 until keys are deleted.
    #[arg(long, env = "RAFTBRIDGE_STATE_MAX_KEYS")]
    pub state_max_keys: Option<u64>,
    /// Bytes the state store may hold at most (keys, values and a small allowance per entry;
    /// default 512 MiB, at least --max-body): a write that would grow it past this is a 507.
    #[arg(long, env = "RAFTBRIDGE_STATE_MAX_BYTES")]
    pub state_max_bytes: Option<u64>,
    /// Events kept in the log at most (oldest dropped first).
    #[arg(long, env = "RAFTBRIDGE_EVENTS_MAX_COUNT")]
    pub events_max_count: Option<u64>,
    /// Bytes of events kept at most.
    #[arg(long, env = "RAFTBRIDGE_EVENTS_MAX_BYTES")]
    pub events_max_bytes: Option<u64>,
    /// Age of the oldest kept event, in seconds.
    #[arg(long, env = "RAFTBRIDGE_EVENTS_MAX_AGE_S")]
    pub events_max_age_s: Option<u64>,
    /// Grace period for in-flight work on shutdown (ms).
    #[arg(long, env = "RAFTBRIDGE_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// On SIGTERM, how long the node keeps accepting and serving after `/readyz` turns 503 and
    /// before it stops accepting (ms, default 500), answering HTTP/1 with `Connection: close`:
    /// time for load balancers and Kubernetes endpoints to stop sending it new connections
    /// (like Envoy's drain time, or a preStop sleep).
    #[arg(long, env = "RAFTBRIDGE_DRAIN_DELAY_MS")]
    pub drain_delay_ms: Option<u64>,
    /// Log one line per answered client request (target `raftbridge::access`, level info):
    /// client address, method, path (not the query), HTTP version, status, duration, answer
    /// bytes; never headers or bodies. Envoy's access log, off unless asked for.
    #[arg(
        long,
        env = "RAFTBRIDGE_ACCESS_LOG",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub access_log: Option<bool>,
    /// Also run the example `demo` service.
    #[arg(
        long,
        env = "RAFTBRIDGE_EXAMPLE_SERVICES",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub example_services: Option<bool>,
    /// Commands served by a local upstream app (`[sidecar]`, config file only).
    #[arg(skip)]
    #[serde(default)]
    pub sidecar: Option<crate::sidecar::SidecarConfig>,
    /// Subscriptions consumed by clients that fetch over HTTP (`[pull]`, config file only).
    #[arg(skip)]
    #[serde(default)]
    pub pull: Option<crate::broker::pull::PullConfig>,
}

/// The resolved, validated configuration of one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    pub data_dir: PathBuf,
    pub peer_addr: String,
    pub http_addr: String,
    pub advertise: String,
    /// `--peer-source-addr`; `None` also for an unspecified address (0.0.0.0, ::).
    pub peer_source_addr: Option<std::net::IpAddr>,
    pub seeds: Vec<String>,
    pub bootstrap_expect: usize,
    pub max_voters: usize,
    pub max_body: usize,
    pub snapshot_threshold: u64,
    pub cluster_name: String,
    pub cluster_secret: Option<crate::peer::ClusterSecret>,
    /// `--secrets-token`: what `/v1/secrets` requests must carry; `None`: that API is off.
    pub secrets_token: Option<crate::peer::ClusterSecret>,
    /// `--api-token` then `--api-token-previous`: the bearer tokens the rest of the data and
    /// admin API takes; empty: that API is open.
    pub api_tokens: Vec<crate::peer::ClusterSecret>,
    /// `--api-read-token`: a token of that API for reads only.
    pub api_read_token: Option<crate::peer::ClusterSecret>,
    /// `--cluster-secret-previous`: opens secrets sealed before the cluster secret changed.
    pub cluster_secret_previous: Option<crate::peer::ClusterSecret>,
    pub peer_tls: Option<PeerTlsFiles>,
    pub https: Option<HttpsConfig>,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    pub write_timeout_ms: u64,
    pub max_frame: usize,
    pub max_connections: usize,
    pub http_idle_timeout_ms: u64,
    pub max_body_buffered: usize,
    pub shutdown_grace_ms: u64,
    pub drain_delay_ms: u64,
    pub events_max_count: u64,
    pub dedup_max_keys: usize,
    pub idempotency_max_bytes: u64,
    pub state_max_keys: u64,
    pub state_max_bytes: u64,
    pub publish_linger_ms: u64,
    pub local_first: bool,
    pub events_max_bytes: u64,
    pub events_max_age_s: u64,
    pub example_services: bool,
    pub access_log: bool,
    pub sidecar: Option<crate::sidecar::SidecarConfig>,
    pub pull: Option<crate::broker::pull::PullConfig>,
}

/// Where a node's peer TLS material is (`--peer-tls-*`); read when the node starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub server_name: Option<String>,
    pub require_node_id: bool,
}

/// The HTTPS listener (`--https-addr`, `--http-tls-*`); its files are read when the node starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsConfig {
    pub addr: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// `ConfigError::Parse` for `e`: where in `text` (1-based line and column, from the error's
/// span) and what, without the source line and without a value serde's message quotes
/// ("invalid type: string \"…\", expected …" keeps only the kind of value it found).
fn parse_error(path: &std::path::Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or(0, |s| s.start).min(text.len());
    let before = text.get(..at).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let mut message = e.message().trim().to_string();
    for lead in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(lead) {
            // The last one: a quoted value may hold the words too.
            let expected = rest.rfind(", expected").map_or("", |i| &rest[i..]);
            let kind = rest.split([' ', ',']).next().unwrap_or("");
            message = format!("{lead}{kind} (value not shown){expected}");
            break;
        }
    }
    ConfigError::Parse { path: path.to_path_buf(), line, column, message }
}

/// A file's list setting: a list of strings, or one string of comma-separated items (how the
/// flag and the env var take it).
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCommas {
        List(Vec<String>),
        Commas(String),
    }
    Ok(Option::<ListOrCommas>::deserialize(d)?.map(|v| match v {
        ListOrCommas::List(list) => list,
        ListOrCommas::Commas(text) => text.split(',').map(str::to_owned).collect(),
    }))
}

impl NodeArgs {
    /// Merge flags/env (self) over the TOML file (if any) over defaults.
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        // Blanks first: an empty `RAFTBRIDGE_CONFIG` is no file to read.
        let this = self.without_blanks();
        let file = match &this.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str::<NodeArgs>(&text).map_err(|e| parse_error(path, &text, &e))?
            }
            None => NodeArgs::default(),
        };
        this.merge(file.without_blanks())
    }

    /// Text settings left empty count as not given: an environment variable set to nothing
    /// (compose's `${VAR:-}`, a systemd `EnvironmentFile` line `VAR=`) used to override the
    /// config file's value with an empty one — for `--cluster-secret` that meant peer links
    /// without authentication, for `--seeds` a joiner that waited for nobody.
    fn without_blanks(mut self) -> NodeArgs {
        fn text<T: std::ops::Deref<Target = str>>(v: &mut Option<T>) {
            if v.as_deref().is_some_and(|t| t.trim().is_empty()) {
                *v = None;
            }
        }
        fn path(v: &mut Option<PathBuf>) {
            if v.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *v = None;
            }
        }
        for v in [
            &mut self.peer_addr,
            &mut self.http_addr,
            &mut self.https_addr,
            &mut self.advertise,
            &mut self.cluster_name,
            &mut self.peer_tls_server_name,
        ] {
            text(v);
        }
        for v in [
            &mut self.cluster_secret,
            &mut self.secrets_token,
            &mut self.api_token,
            &mut self.api_token_previous,
            &mut self.api_read_token,
            &mut self.cluster_secret_previous,
        ] {
            text(v);
        }
        for v in [
            &mut self.config,
            &mut self.data_dir,
            &mut self.http_tls_cert,
            &mut self.http_tls_key,
            &mut self.http_tls_client_ca,
            &mut self.peer_tls_cert,
            &mut self.peer_tls_key,
            &mut self.peer_tls_ca,
        ] {
            path(v);
        }
        if self.seeds.as_ref().is_some_and(|s| s.iter().all(|s| s.trim().is_empty())) {
            self.seeds = None;
        }
        self
    }

    /// `self` (flags and env) over `file` over defaults.
    fn merge(self, file: NodeArgs) -> Result<NodeConfig, ConfigError> {
        macro_rules! pick {
            ($f:ident) => {
                self.$f.clone().or(file.$f.clone())
            };
        }
        let id = match pick!(id) {
            Some(id) => id,
            None if pick!(id_from_hostname).unwrap_or(false) => id_from_hostname(&hostname())?,
            None => return Err(ConfigError::Missing("id")),
        };
        let data_dir = pick!(data_dir).ok_or(ConfigError::Missing("data-dir"))?;
        let api_tokens: Vec<_> = match (pick!(api_token).filter(|s| !s.is_empty()), pick!(api_token_previous).filter(|s| !s.is_empty())) {
            (None, Some(_)) => return Err(ConfigError::Invalid { name: "api-token-previous", reason: "needs --api-token".into() }),
            (current, previous) => current.into_iter().chain(previous).map(|s| crate::peer::ClusterSecret::new(s.as_bytes())).collect(),
        };
        let peer_addr = pick!(peer_addr).unwrap_or_else(|| "127.0.0.1:7400".into());
        let http_addr = pick!(http_addr).unwrap_or_else(|| "127.0.0.1:8400".into());
        let advertise = match pick!(advertise) {
            Some(a) => {
                check_address("advertise", &a)?;
                a
            }
            None => {
                if let Ok(sa) = peer_addr.parse::<SocketAddr>() {
                    if sa.ip().is_unspecified() {
                        return Err(ConfigError::Invalid {
                            name: "advertise",
                            reason: format!("--peer-addr {peer_addr} is a wildcard; give --advertise host:port"),
                        });
                    }
                }
                peer_addr.clone()
            }
        };
        let seeds: Vec<String> =
            pick!(seeds).unwrap_or_default().into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        let (server_name, require_node_id) = (pick!(peer_tls_server_name), pick!(peer_tls_require_node_id).unwrap_or(false));
        let peer_tls = match (pick!(peer_tls_cert), pick!(peer_tls_key), pick!(peer_tls_ca)) {
            (Some(cert), Some(key), Some(ca)) => Some(PeerTlsFiles { cert, key, ca, server_name, require_node_id }),
            (None, None, None) if server_name.is_none() && !require_node_id => None,
            (None, None, None) => {
                return Err(ConfigError::Invalid {
                    name: if server_name.is_some() { "peer-tls-server-name" } else { "peer-tls-require-node-id" },
                    reason: "applies to peer TLS, which needs --peer-tls-cert, --peer-tls-key and --peer-tls-ca".into(),
                })
            }
            _ => {
                return Err(ConfigError::Invalid {
                    name: "peer-tls-cert",
                    reason: "peer TLS needs all of --peer-tls-cert, --peer-tls-key and --peer-tls-ca".into(),
                })
            }
        };
        let https = match (pick!(https_addr), pick!(http_tls_cert), pick!(http_tls_key)) {
            (Some(addr), Some(cert), Some(key)) => Some(HttpsConfig { addr, cert, key, client_ca: pick!(http_tls_client_ca) }),
            (None, None, None) if pick!(http_tls_client_ca).is_none() => None,
            (Some(_), _, _) => {
                return Err(ConfigError::Invalid {
                    name: "https-addr",
                    reason: "HTTPS needs --http-tls-cert and --http-tls-key".into(),
                })
            }
            (None, cert, key) => {
                let name = if cert.is_some() {
                    "http-tls-cert"
                } else if key.is_some() {
                    "http-tls-key"
                } else {
                    "http-tls-client-ca"
                };
                return Err(ConfigError::Invalid {
                    name,
                    reason: "--http-tls-cert, --http-tls-key and --http-tls-client-ca need --https-addr (the listener that serves TLS)".into(),
                })
            }
        };
        let cfg = NodeConfig {
            id,
            data_dir,
            peer_addr,
            http_addr,
            advertise,
            peer_source_addr: pick!(peer_source_addr).filter(|ip| !ip.is_unspecified()),
            seeds,
            bootstrap_expect: pick!(bootstrap_expect).unwrap_or(0),
            max_voters: pick!(max_voters).unwrap_or(5),
            max_body: pick!(max_body).unwrap_or(1 << 20),
            snapshot_threshold: pick!(snapshot_threshold).unwrap_or(50_000),
            cluster_name: pick!(cluster_name).unwrap_or_else(|| "raftbridge".into()),
            cluster_secret: pick!(cluster_secret).filter(|s| !s.is_empty()).map(|s| crate::peer::ClusterSecret::new(s.as_bytes())),
            secrets_token: pick!(secrets_token).filter(|s| !s.is_empty()).map(|s| crate::peer::ClusterSecret::new(s.as_bytes())),
            api_tokens,
            api_read_token: pick!(api_read_token).filter(|s| !s.is_empty()).map(|s| crate::peer::ClusterSecret::new(s.as_bytes())),
            cluster_secret_previous: pick!(cluster_secret_previous).filter(|s| !s.is_empty()).map(|s| crate::peer::ClusterSecret::new(s.as_bytes())),
            peer_tls,
            https,
            heartbeat_ms: pick!(heartbeat_ms).unwrap_or(60),
            election_timeout_ms: pick!(election_timeout_ms).unwrap_or(300),
            write_timeout_ms: pick!(write_timeout_ms).unwrap_or(5_000),
            max_frame: pick!(max_frame).unwrap_or(16 << 20),
            max_connections: pick!(max_connections).unwrap_or(10_000),
            http_idle_timeout_ms: pick!(http_idle_timeout_ms).unwrap_or(60_000),
            max_body_buffered: pick!(max_body_buffered).unwrap_or(256 << 20),
            shutdown_grace_ms: pick!(shutdown_grace_ms).unwrap_or(10_000),
            drain_delay_ms: pick!(drain_delay_ms).unwrap_or(500),
            events_max_count: pick!(events_max_count).unwrap_or(100_000),
            dedup_max_keys: pick!(dedup_max_keys).unwrap_or(250_000),
            idempotency_max_bytes: pick!(idempotency_max_bytes).unwrap_or(64 << 20),
            state_max_keys: pick!(state_max_keys).unwrap_or(1_000_000),
            state_max_bytes: pick!(state_max_bytes).unwrap_or(512 << 20),
            publish_linger_ms: pick!(publish_linger_ms).unwrap_or(DEFAULT_PUBLISH_LINGER_MS),
            local_first: pick!(local_first).unwrap_or(false),
            events_max_bytes: pick!(events_max_bytes).unwrap_or(64 << 20),
            events_max_age_s: pick!(events_max_age_s).unwrap_or(7 * 24 * 3600),
            example_services: pick!(example_services).unwrap_or(false),
            access_log: pick!(access_log).unwrap_or(false),
            sidecar: pick!(sidecar),
            pull: pick!(pull),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// An address another node dials (`--advertise`, each of `--seeds`): `host:port` with a host
/// (an IPv6 address in brackets), a port other than 0 and, for an IP, not a wildcard. An
/// advertised address goes into join requests and the membership, where a value peers cannot
/// dial cuts this node off for good; a seed without its port (or an IPv6 one without
/// brackets, whose last group read as the port) never resolved, and the node waited for good.
fn check_address(name: &'static str, a: &str) -> Result<(), ConfigError> {
    let invalid = |reason: &str| Err(ConfigError::Invalid { name, reason: format!("{a:?}: {reason}") });
    let Some((host, port)) = a.rsplit_once(':') else { return invalid("must be host:port") };
    let host = match host.strip_prefix('[') {
        Some(inner) => match inner.strip_suffix(']') {
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
            _ => return invalid("brackets hold an IPv6 address: [addr]:port"),
        },
        None if host.contains([':', ']']) => return invalid("an IPv6 address goes in brackets: [addr]:port"),
        None => host,
    };
    if host.is_empty() {
        return invalid("has no host");
    }
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return invalid("needs a port from 1 to 65535");
    }
    if host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
        return invalid("is a wildcard, which peers cannot dial");
    }
    Ok(())
}

/// `HOSTNAME`, else the kernel's (`uname`: systemd sets no `HOSTNAME`, and the shipped unit's
/// `ProcSubset=pid` hides `/proc/sys/kernel/hostname`, which was read before).
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| rustix::system::uname().nodename().to_string_lossy().into_owned())
        .trim()
        .to_string()
}

/// `raftbridge-2` → 3: StatefulSet ordinals start at 0, node ids at 1.
fn id_from_hostname(host: &str) -> Result<u64, ConfigError> {
    let invalid = || ConfigError::Invalid {
        name: "id-from-hostname",
        reason: format!("hostname {host:?} does not end in -<number>"),
    };
    let (_, ordinal) = host.rsplit_once('-').ok_or_else(invalid)?;
    let n: u64 = ordinal.parse().map_err(|_| invalid())?;
    n.checked_add(1).ok_or_else(invalid)
}

/// `--publish-linger-ms` when not given: measured with `raftbridge bench events --rate` on three
/// loopback nodes, 2 ms halved node CPU per event at 2,000 events/s and cut it by a third at
/// 5,000/s (p99 13.7 → 10.6 ms there), for 1–2 ms more p50; saturation within noise.
pub const DEFAULT_PUBLISH_LINGER_MS: u64 = 2;
/// Most `--max-connections` accepted (each open connection holds a socket and a task).
const MAX_CONNECTIONS: usize = 1_000_000;
/// `--max-frame` at most: a log record holds at most 64 MiB (`raft::log_store`).
const MAX_FRAME: usize = 64 << 20;
/// The least `--max-frame` a node takes.
pub const MIN_MAX_FRAME: usize = 64 * 1024;
/// Longest `--election-timeout-ms` accepted.
const MAX_ELECTION_TIMEOUT_MS: u64 = 60_000;
/// Shortest and longest `--write-timeout-ms` accepted.
const MIN_WRITE_TIMEOUT_MS: u64 = 100;
const MAX_WRITE_TIMEOUT_MS: u64 = 300_000;
/// Most events one entry holds: `--events-max-count` keeps at least that many.
const MAX_ENTRY_EVENTS: u64 = crate::broker::MAX_BATCH as u64;
/// Longest `--publish-linger-ms` accepted: beyond a second it would only hold publishers up.
const MAX_PUBLISH_LINGER_MS: u64 = 1_000;

/// The least `--heartbeat-ms`.
const MIN_HEARTBEAT_MS: u64 = 10;
/// The least `--max-body`.
const MIN_MAX_BODY: usize = 1024;
/// The most `--snapshot-threshold` (log entries between snapshots).
const MAX_SNAPSHOT_THRESHOLD: u64 = 10_000_000;

impl NodeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |name, reason: &str| Err(ConfigError::Invalid { name, reason: reason.to_string() });
        if self.max_voters == 0 {
            return invalid("max-voters", "must be at least 1");
        }
        if self.heartbeat_ms < MIN_HEARTBEAT_MS {
            // Below a timer tick and a loopback round trip: every follower campaigns at once.
            return invalid("heartbeat-ms", "must be at least 10");
        }
        if self.heartbeat_ms.checked_mul(2).is_none_or(|least| self.election_timeout_ms < least) {
            return invalid("election-timeout-ms", "must be at least twice --heartbeat-ms");
        }
        if self.election_timeout_ms > MAX_ELECTION_TIMEOUT_MS {
            // Timeouts derived from it (a peer link's idle timeout is four of them) must not
            // overflow, and a leader that is gone for longer than a minute is not waited for.
            return invalid("election-timeout-ms", "must be at most 60000");
        }
        if self.write_timeout_ms < MIN_WRITE_TIMEOUT_MS || self.write_timeout_ms > MAX_WRITE_TIMEOUT_MS {
            // Every write waits at most this long for its commit: at 0 each one timed out at
            // once (503) while the node still said it was ready. (Five minutes at most: a
            // write's retries are bounded in count for that.)
            return invalid("write-timeout-ms", "must be 100..=300000");
        }
        if let Some(sub) = self.sidecar.iter().flat_map(|s| &s.subscriptions).find(|s| s.path.is_none()) {
            return Err(ConfigError::Invalid { name: "sidecar", reason: format!("subscription {}: path is required (where its events are POSTed, starting with /)", sub.name) });
        }
        if let Some(pull) = &self.pull {
            // Its declarations, as a service's are checked at start (names, filters, bounds).
            pull.parts(self.id).map_err(|e| ConfigError::Invalid { name: "pull", reason: e.to_string() })?;
        }
        if self.bootstrap_expect > self.max_voters {
            // Every node a cluster forms with is a voter.
            return invalid("bootstrap-expect", "must be at most --max-voters");
        }
        // An entry's bytes: its events' up to `MAX_BATCH_BYTES`, or one group (a body) alone.
        let entry_bytes = self.max_body.max(crate::broker::MAX_BATCH_BYTES) as u64;
        if self.events_max_count < MAX_ENTRY_EVENTS || self.events_max_bytes < 2 * entry_bytes || self.events_max_age_s == 0 {
            // Retention trims as an entry is applied: below one entry's events or bytes, events
            // would be acknowledged (201) and dropped by the same apply, never delivered.
            let name = if self.events_max_count < MAX_ENTRY_EVENTS {
                "events-max-count"
            } else if self.events_max_age_s == 0 {
                "events-max-age-s"
            } else {
                "events-max-bytes"
            };
            return invalid(
                name,
                "must keep at least one entry's events: --events-max-count at least 1024, --events-max-bytes at least twice the larger of --max-body and 256 KiB, --events-max-age-s at least 1",
            );
        }
        if self.max_connections == 0 || self.max_connections > MAX_CONNECTIONS {
            // tokio's semaphore takes at most `usize::MAX >> 3` permits (it panics beyond).
            return invalid("max-connections", "must be 1..=1000000");
        }
        if self.http_idle_timeout_ms == 0 {
            return invalid("http-idle-timeout-ms", "must be at least 1");
        }
        if self.max_frame < MIN_MAX_FRAME {
            return invalid("max-frame", "must be at least 65536");
        }
        if self.max_frame > MAX_FRAME {
            // An entry may take 7/8 of a frame, and the log stores a record of at most 64 MiB: a
            // larger entry would stop the Raft core (and, retried, the next leader's).
            return invalid("max-frame", "must be at most 64 MiB (67108864)");
        }
        if self.max_body < MIN_MAX_BODY {
            // Every request with a body would be a 413: no write could be made.
            return invalid("max-body", "must be at least 1024");
        }
        if self.max_body > self.max_frame / 2 {
            // A body is written as one Raft entry, and an entry must fit into a peer frame with
            // room to spare, or it could never be replicated and every later write would stall.
            return invalid("max-body", "must be at most half of --max-frame");
        }
        if self.max_body_buffered < self.max_body {
            // Room for at least one whole body.
            return invalid("max-body-buffered", "must be at least --max-body");
        }
        if self.cluster_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return invalid("cluster-secret", "must be at least 16 bytes");
        }
        if self.secrets_token.as_ref().is_some_and(|s| s.len() < 16 || !s.is_visible_ascii()) {
            return invalid("secrets-token", "must be at least 16 bytes of visible ASCII");
        }
        if self.api_tokens.iter().any(|s| s.len() < 16 || !s.is_visible_ascii()) {
            let name = if self.api_tokens.first().is_some_and(|s| s.len() < 16 || !s.is_visible_ascii()) { "api-token" } else { "api-token-previous" };
            return invalid(name, "must be at least 16 bytes of visible ASCII");
        }
        if !self.api_tokens.is_empty() && self.cluster_secret.is_none() && self.peer_tls.is_none() {
            // The peer port takes the same writes and member changes from any peer: a token on
            // HTTP alone would guard a door beside an open one.
            return invalid("api-token", "needs --cluster-secret or peer TLS (--peer-tls-*): without either, the peer port takes writes and member changes from anyone");
        }
        // One value for two uses would give a client of one what the other guards: the read
        // token's holder the secret store, an API client the peer port and the secrets' key.
        let others: Vec<&crate::peer::ClusterSecret> =
            self.secrets_token.iter().chain(self.cluster_secret.iter()).chain(self.cluster_secret_previous.iter()).collect();
        if self.api_tokens.iter().chain(self.api_read_token.iter()).any(|t| others.contains(&t)) {
            return invalid("api-token", "the API tokens must differ from --secrets-token and --cluster-secret (and its previous one)");
        }
        if self.api_read_token.as_ref().is_some_and(|s| s.len() < 16 || !s.is_visible_ascii()) {
            return invalid("api-read-token", "must be at least 16 bytes of visible ASCII");
        }
        if self.api_read_token.is_some() && self.api_tokens.is_empty() {
            // Writes would be open to all while reads want a token.
            return invalid("api-read-token", "needs --api-token");
        }
        if self.api_read_token.as_ref().is_some_and(|r| self.api_tokens.iter().any(|t| t == r)) {
            return invalid("api-read-token", "must differ from --api-token and --api-token-previous");
        }
        if self.secrets_token.is_some() && self.cluster_secret.is_none() {
            // The secret store's key is derived from the cluster secret: without one every
            // request the token lets in would be refused.
            return invalid("secrets-token", "needs --cluster-secret, from which the secret store's key is derived");
        }
        if self.cluster_secret_previous.is_some() && self.cluster_secret.is_none() {
            return invalid("cluster-secret-previous", "needs --cluster-secret");
        }
        if self.cluster_secret_previous.as_ref().is_some_and(|s| s.len() < 16) {
            return invalid("cluster-secret-previous", "must be at least 16 bytes");
        }
        if self.dedup_max_keys == 0 {
            return invalid("dedup-max-keys", "must be at least 1");
        }
        if self.idempotency_max_bytes < self.max_frame as u64 {
            // One stored answer may take half a frame; a smaller bound would forget each at once.
            return invalid("idempotency-max-bytes", "must be at least --max-frame");
        }
        if self.state_max_keys == 0 {
            return invalid("state-max-keys", "must be at least 1");
        }
        if self.state_max_bytes < self.max_body as u64 {
            // One value may be as large as a body.
            return invalid("state-max-bytes", "must be at least --max-body");
        }
        if self.snapshot_threshold == 0 {
            return invalid("snapshot-threshold", "must be at least 1");
        }
        if self.snapshot_threshold > MAX_SNAPSHOT_THRESHOLD {
            // No snapshot would ever be taken: the log is never purged and fills the disk.
            return invalid("snapshot-threshold", "must be at most 10000000");
        }
        if self.publish_linger_ms > MAX_PUBLISH_LINGER_MS {
            return invalid("publish-linger-ms", "must be at most 1000");
        }
        if self.bootstrap_expect > 0 && self.seeds.is_empty() && self.bootstrap_expect > 1 {
            return invalid("bootstrap-expect", "needs --seeds listing the other nodes");
        }
        for seed in &self.seeds {
            check_address("seeds", seed)?;
        }
        Ok(())
    }
}

impl NodeConfig {
    /// The largest snapshot image a leader with these bounds can send, generously, and never
    /// below 1 GiB: every bounded store at its bound (state and idempotency records by the
    /// weights their bounds count, events by `--events-max-bytes` plus 2 KiB of metadata for
    /// each of `--events-max-count`, 1 KiB per producer key), twice over for what the counting
    /// leaves out. A node accepts a leader's image up to this; the members of a cluster should
    /// share their bounds (a smaller node refuses a larger node's image).
    pub fn snapshot_cap(&self) -> usize {
        let bounded = self
            .state_max_bytes
            .saturating_add(self.idempotency_max_bytes)
            .saturating_add(self.events_max_bytes)
            .saturating_add(self.events_max_count.saturating_mul(2048))
            .saturating_add((self.dedup_max_keys as u64).saturating_mul(1024));
        usize::try_from(bounded.saturating_mul(2)).unwrap_or(usize::MAX).max(1 << 30)
    }
}

/// `120` (seconds), `120s`, `1500ms`, `10m`: the chaos suite's `--duration` and a long poll's
/// `?wait=` (`api::stores`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        // Checked: a client's `?wait=` reaches this too, and a wrapped product would wait less.
        "m" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(|| format!("duration {s:?} is too long")),
        _ => Err(format!("bad duration unit in {s:?} (use ms, s or m)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config file holding `text` in a directory of its own: (directory, file).
    fn config_file(text: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("rb-cfg-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn durations_are_whole_numbers_of_ms_s_or_m() {
        assert_eq!(parse_duration("120"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("120s"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("x").is_err() && parse_duration("5h").is_err());
        assert!(parse_duration("307445734561825861m").is_err(), "minutes past u64 seconds");
    }

    /// A file the settings cannot be read from is said by line and column, never with the
    /// secrets it holds: toml's message quotes the offending line, serde's the value.
    #[test]
    fn a_bad_config_file_is_reported_without_its_secrets() {
        let secret = "s3cr3t-token-0123456789";
        for (text, line) in [
            (format!("id = 3\nsecrets_tokne = \"{secret}\"\n"), 2),
            (format!("id = 3\n\ncluster_secret = [\"{secret}\"]\n"), 3),
            (format!("cluster_secret = \"{secret}\"\nid = \"{secret}\"\n"), 2),
            (format!("cluster_secret = \"{secret}\nid = 3\n"), 1),
            ("cluster_secret = 1234567890123456789\n".to_string(), 1),
        ] {
            let (dir, path) = config_file(&text);
            let err = NodeArgs { config: Some(path), ..Default::default() }.resolve().unwrap_err().to_string();
            assert!(!err.contains(secret) && !err.contains("1234567890123456789"), "{err}");
            assert!(err.contains(&format!("line {line},")), "{err}");
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    #[test]
    fn file_fills_what_flags_leave_out() {
        let (dir, path) = config_file("id = 3\ndata_dir = \"/tmp/x\"\nseeds = [\"a:1\", \"b:2\"]\nmax_voters = 3\n");
        let args = NodeArgs { config: Some(path), max_voters: Some(7), ..Default::default() };
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.id, 3);
        assert_eq!(cfg.seeds, vec!["a:1", "b:2"]);
        let (dir2, path2) = config_file("id = 3\ndata_dir = \"/tmp/x\"\nseeds = \"a:1, b:2\"\n");
        let text = NodeArgs { config: Some(path2), ..NodeArgs::default() }.resolve().unwrap();
        assert_eq!(text.seeds, vec!["a:1", "b:2"], "one comma-separated string, as the flag takes it");
        let _ = std::fs::remove_dir_all(dir2);
        assert_eq!(cfg.max_voters, 7, "the flag wins over the file");
        assert_eq!(cfg.max_body, 1 << 20);
        assert_eq!(cfg.publish_linger_ms, DEFAULT_PUBLISH_LINGER_MS);
        let linger = |ms| NodeArgs { id: Some(1), data_dir: Some("/tmp/x".into()), publish_linger_ms: Some(ms), ..Default::default() }.resolve();
        assert_eq!(linger(0).unwrap().publish_linger_ms, 0, "0 turns the linger off");
        assert_eq!(linger(5).unwrap().publish_linger_ms, 5);
        assert!(linger(1_001).is_err());
        let conns = |n| NodeArgs { id: Some(1), data_dir: Some("/tmp/x".into()), max_connections: Some(n), ..Default::default() }.resolve();
        assert!(conns(0).is_err() && conns(usize::MAX).is_err() && conns(10).is_ok());
        let beat = |ms| NodeArgs { id: Some(1), data_dir: Some("/tmp/x".into()), heartbeat_ms: Some(ms), ..Default::default() }.resolve();
        assert!(beat(u64::MAX).is_err(), "twice the heartbeat overflows: not a valid setting");
        assert!(matches!(beat(9), Err(ConfigError::Invalid { name: "heartbeat-ms", .. })));
        assert!(beat(10).is_ok());
        let threshold = |n| NodeArgs { id: Some(1), data_dir: Some("/tmp/x".into()), snapshot_threshold: Some(n), ..Default::default() }.resolve();
        assert!(threshold(10_000_000).is_ok() && threshold(20).is_ok());
        assert!(matches!(threshold(10_000_001), Err(ConfigError::Invalid { name: "snapshot-threshold", .. })));
        let sizes = |body: usize, frame: usize| {
            NodeArgs { id: Some(1), data_dir: Some("/tmp/x".into()), max_body: Some(body), max_frame: Some(frame), ..Default::default() }.resolve()
        };
        assert!(sizes(8 << 20, 16 << 20).is_ok(), "a body of half a frame fits an entry");
        assert!(sizes(1024, 16 << 20).is_ok());
        assert!(matches!(sizes(1023, 16 << 20), Err(ConfigError::Invalid { name: "max-body", .. })), "every body a 413");
        assert!(matches!(sizes((8 << 20) + 1, 16 << 20), Err(ConfigError::Invalid { name: "max-body", .. })));
        assert!(matches!(sizes(1 << 20, 1 << 20), Err(ConfigError::Invalid { name: "max-body", .. })));
        assert!(sizes(1 << 20, 64 << 20).is_ok());
        assert!(matches!(sizes(1 << 20, (64 << 20) + 1), Err(ConfigError::Invalid { name: "max-frame", .. })));
        assert_eq!(cfg.max_body_buffered, 256 << 20);
        let buffered = |body: usize, all: usize| {
            NodeArgs { id: Some(1), data_dir: Some("/tmp/x".into()), max_body: Some(body), max_body_buffered: Some(all), ..Default::default() }.resolve()
        };
        assert!(buffered(1 << 20, 1 << 20).is_ok(), "room for one whole body");
        assert!(matches!(buffered(1 << 20, (1 << 20) - 1), Err(ConfigError::Invalid { name: "max-body-buffered", .. })));
        assert!(buffered(1 << 20, usize::MAX).is_ok(), "no upper bound: a count of bytes, not a semaphore");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Text left empty (an environment variable set to nothing) is not a value: the file's
    /// secret and seeds stay, where an empty value used to replace them.
    #[test]
    fn empty_settings_count_as_not_given() {
        let (dir, path) = config_file("id = 3\ndata_dir = \"/tmp/x\"\nseeds = [\"a:1\"]\ncluster_secret = \"0123456789abcdef\"\n");
        let blank = NodeArgs { config: Some(PathBuf::new()), id: Some(1), data_dir: Some("/tmp/x".into()), ..Default::default() };
        assert!(blank.resolve().is_ok(), "an empty config path is no file to read");
        let args = NodeArgs {
            config: Some(path),
            cluster_secret: Some(SecretText::default()),
            seeds: Some(vec![String::new()]),
            advertise: Some(" ".into()),
            peer_tls_cert: Some(PathBuf::new()),
            ..Default::default()
        };
        let cfg = args.resolve().unwrap();
        assert!(cfg.cluster_secret.is_some(), "the file's secret is kept");
        assert_eq!(cfg.seeds, vec!["a:1"]);
        assert_eq!((cfg.advertise.as_str(), cfg.peer_tls.is_none()), ("127.0.0.1:7400", true));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Settings that would break a node start as an error that names them: writes that time
    /// out at once, retention that drops an entry's events as it applies them, a bootstrap
    /// with more voters than allowed, an address peers cannot dial, a timeout that overflows.
    #[test]
    fn the_flags_debug_never_shows_a_secret() {
        let secret = "s3cr3t-0123456789abcdef";
        let args = NodeArgs {
            cluster_secret: Some(secret.into()),
            secrets_token: Some(secret.into()),
            api_token: Some(secret.into()),
            api_token_previous: Some(secret.into()),
            api_read_token: Some(secret.into()),
            cluster_secret_previous: Some(secret.into()),
            ..NodeArgs::default()
        };
        let shown = format!("{args:?}");
        assert!(!shown.contains(secret) && shown.contains("SecretText(<23 bytes>)"), "{shown}");
        let file: NodeArgs = toml::from_str(&format!("cluster_secret = \"{secret}\"\n")).expect("parses");
        assert_eq!(file.cluster_secret.as_deref(), Some(secret));
    }

    #[test]
    fn settings_that_would_break_a_node_are_refused() {
        let base = || NodeArgs { id: Some(1), data_dir: Some("/tmp/x".into()), ..Default::default() };
        let refused = |args: NodeArgs| match args.resolve() {
            Err(ConfigError::Invalid { name, .. }) => name,
            other => panic!("{other:?}"),
        };
        assert_eq!(refused(NodeArgs { write_timeout_ms: Some(0), ..base() }), "write-timeout-ms");
        let secret = || Some(SecretText::from("0123456789abcdef"));
        assert_eq!(refused(NodeArgs { secrets_token: secret(), ..base() }), "secrets-token", "no store without a cluster secret");
        assert_eq!(refused(NodeArgs { secrets_token: Some("short".into()), cluster_secret: secret(), ..base() }), "secrets-token");
        assert_eq!(refused(NodeArgs { secrets_token: Some("0123456789 abcdef".into()), cluster_secret: secret(), ..base() }), "secrets-token");
        assert!(NodeArgs { secrets_token: secret(), cluster_secret: secret(), ..base() }.resolve().is_ok());
        assert_eq!(refused(NodeArgs { cluster_secret_previous: secret(), ..base() }), "cluster-secret-previous");
        assert_eq!(refused(NodeArgs { cluster_secret_previous: Some("short".into()), cluster_secret: secret(), ..base() }), "cluster-secret-previous");
        assert!(NodeArgs { cluster_secret_previous: secret(), cluster_secret: secret(), ..base() }.resolve().is_ok());
        let other = || Some(SecretText::from("another-secret-0123456789"));
        assert_eq!(refused(NodeArgs { api_token: secret(), ..base() }), "api-token", "no token without peer authentication");
        assert_eq!(refused(NodeArgs { api_token: secret(), cluster_secret: secret(), ..base() }), "api-token", "the cluster secret as a token");
        assert_eq!(refused(NodeArgs { api_token: other(), api_read_token: secret(), secrets_token: secret(), cluster_secret: Some("cluster-secret-0123456789".into()), ..base() }), "api-token", "the secrets token as the read token");
        assert_eq!(refused(NodeArgs { api_token: other(), api_token_previous: secret(), cluster_secret_previous: secret(), cluster_secret: Some("cluster-secret-0123456789".into()), ..base() }), "api-token", "the previous cluster secret as a token");
        let base = || NodeArgs { cluster_secret: Some("cluster-secret-0123456789".into()), ..base() };
        assert_eq!(refused(NodeArgs { api_token: Some("short".into()), ..base() }), "api-token");
        assert_eq!(refused(NodeArgs { api_token: Some("0123456789 abcdef".into()), ..base() }), "api-token");
        assert_eq!(refused(NodeArgs { api_token_previous: secret(), ..base() }), "api-token-previous", "a previous token alone");
        assert_eq!(refused(NodeArgs { api_token: secret(), api_token_previous: Some("short".into()), ..base() }), "api-token-previous");
        let both = NodeArgs { api_token: secret(), api_token_previous: Some("fedcba9876543210".into()), ..base() }.resolve().unwrap();
        assert_eq!(both.api_tokens.len(), 2);
        assert!(both.api_tokens[0].matches(b"0123456789abcdef") && both.api_tokens[1].matches(b"fedcba9876543210"), "current first");
        assert!(base().resolve().unwrap().api_tokens.is_empty(), "no token: the API is open");
        assert_eq!(refused(NodeArgs { api_read_token: secret(), ..base() }), "api-read-token", "a read token alone");
        assert_eq!(refused(NodeArgs { api_read_token: Some("short".into()), api_token: secret(), ..base() }), "api-read-token");
        assert_eq!(refused(NodeArgs { api_read_token: secret(), api_token: secret(), ..base() }), "api-read-token", "the same as the full token");
        let (dir, path) = config_file("api_token = \"file-api-token-0123\"\napi_read_token = \"file-read-token-0123\"\n");
        let from_file = NodeArgs { config: Some(path), ..base() }.resolve().unwrap();
        assert!(from_file.api_tokens[0].matches(b"file-api-token-0123") && from_file.api_read_token.is_some_and(|t| t.matches(b"file-read-token-0123")));
        std::fs::remove_dir_all(dir).unwrap();
        let read = NodeArgs { api_read_token: Some("fedcba9876543210".into()), api_token: secret(), ..base() }.resolve().unwrap();
        assert!(read.api_read_token.is_some_and(|t| t.matches(b"fedcba9876543210")));
        assert!(NodeArgs { api_token: Some(SecretText::default()), ..base() }.resolve().unwrap().api_tokens.is_empty(), "an empty token is none");
        assert!(NodeArgs { write_timeout_ms: Some(100), ..base() }.resolve().is_ok());
        assert_eq!(refused(NodeArgs { write_timeout_ms: Some(300_001), ..base() }), "write-timeout-ms");
        assert_eq!(refused(NodeArgs { events_max_count: Some(0), ..base() }), "events-max-count");
        assert_eq!(refused(NodeArgs { events_max_count: Some(1_023), ..base() }), "events-max-count");
        assert!(NodeArgs { events_max_count: Some(1_024), ..base() }.resolve().is_ok());
        assert_eq!(refused(NodeArgs { events_max_age_s: Some(0), ..base() }), "events-max-age-s");
        assert_eq!(refused(NodeArgs { events_max_bytes: Some(1_000), ..base() }), "events-max-bytes");
        assert_eq!(refused(NodeArgs { events_max_bytes: Some((2 << 20) - 1), ..base() }), "events-max-bytes", "twice a 1 MiB body");
        assert!(NodeArgs { events_max_bytes: Some(2 << 20), ..base() }.resolve().is_ok());
        let voters = |expect, max| NodeArgs { seeds: Some(vec!["a:1".into()]), bootstrap_expect: Some(expect), max_voters: Some(max), ..base() };
        assert_eq!(refused(voters(3, 1)), "bootstrap-expect");
        assert!(voters(3, 3).resolve().is_ok());
        for bad in ["0.0.0.0:7400", ":7400", "host", "host:0", "host:x", "[::]:7400"] {
            assert_eq!(refused(NodeArgs { advertise: Some(bad.into()), ..base() }), "advertise", "{bad}");
        }
        for good in ["node-1.peers:7400", "10.0.0.5:7400", "[::1]:7400"] {
            assert_eq!(NodeArgs { advertise: Some(good.into()), ..base() }.resolve().unwrap().advertise, good);
        }
        // A seed is dialed as an advertised address is: without its port it never resolved.
        for bad in ["node1", "node1:", "node1:0", "0.0.0.0:7400", "::1", "2001:db8::5", "[::1:7400", "[node1]:7400", "::1:7400"] {
            assert_eq!(refused(NodeArgs { seeds: Some(vec!["a:1".into(), bad.into()]), ..base() }), "seeds", "{bad}");
        }
        assert!(NodeArgs { seeds: Some(vec!["node-1.peers:7400".into(), "[::1]:7401".into()]), ..base() }.resolve().is_ok());
        assert_eq!(refused(NodeArgs { election_timeout_ms: Some(u64::MAX / 2), ..base() }), "election-timeout-ms");
        assert!(NodeArgs { election_timeout_ms: Some(60_000), ..base() }.resolve().is_ok());
    }

    /// Every boolean flag reads `1`, `yes` and `on` as its environment variable may hold them.
    #[test]
    fn boolean_settings_take_the_same_spellings() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            node: NodeArgs,
        }
        use clap::Parser as _;
        let cli = Cli::try_parse_from(["x", "--local-first", "1", "--id-from-hostname", "yes", "--example-services", "on"]).unwrap();
        assert_eq!((cli.node.local_first, cli.node.id_from_hostname, cli.node.example_services), (Some(true), Some(true), Some(true)));
        let cli = Cli::try_parse_from(["x", "--local-first", "0", "--id-from-hostname", "off"]).unwrap();
        assert_eq!((cli.node.local_first, cli.node.id_from_hostname), (Some(false), Some(false)));
    }

    #[test]
    fn sidecar_section_and_example_services() {
        let text = r#"
            id = 1
            data_dir = "/tmp/x"
            example_services = true
            [sidecar]
            upstream = "http://127.0.0.1:9000"
            health_path = "/health"
            [[sidecar.commands]]
            service = "orders"
            version = 1
            name = "create"
            method = "POST"
            path = "orders/:id"
            upstream_path = "/orders/:id"
            idempotent = true
        "#;
        let file: NodeArgs = toml::from_str(text).unwrap();
        let sidecar = file.sidecar.clone().unwrap();
        assert_eq!((sidecar.health_interval_ms, sidecar.pool_size), (1000, 32));
        let c = &sidecar.commands[0];
        assert_eq!((c.service.as_str(), c.version, c.path.as_str(), c.idempotent, c.timeout_ms), ("orders", 1, "orders/:id", true, 30_000));
        assert_eq!(c.upstream_path.as_deref(), Some("/orders/:id"));
        assert!(toml::from_str::<NodeArgs>("[sidecar]\nupstream = \"http://x:1\"\nport = 1\n").is_err());

        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            node: NodeArgs,
        }
        use clap::Parser;
        let parse = |args: &[&str]| Cli::try_parse_from([&["x"], args].concat()).unwrap().node.example_services;
        assert_eq!(parse(&["--example-services", "--id", "1"]), Some(true));
        assert_eq!(parse(&["--example-services=false"]), Some(false));
        assert_eq!(parse(&[]), None);
        let args = NodeArgs { id: Some(1), data_dir: Some("/tmp/x".into()), ..file };
        let cfg = args.resolve().unwrap();
        assert!(cfg.example_services);
        assert_eq!(cfg.sidecar, Some(sidecar));
    }

    /// A sidecar subscription needs its `path`, and `[pull]` is checked as its services are
    /// (a pull subscription's ack deadline must leave room for its hold), at load, before the
    /// node starts.
    #[test]
    fn sidecar_and_pull_subscriptions_are_checked_at_load() {
        let resolve = |text: &str| NodeArgs { id: Some(1), data_dir: Some("/tmp/x".into()), ..toml::from_str(text).unwrap() }.resolve();
        let no_path = resolve("[sidecar]\nupstream = \"http://x:1\"\n[[sidecar.subscriptions]]\nname = \"s\"\n").unwrap_err();
        assert!(no_path.to_string().contains("path is required"), "{no_path}");
        let pull = resolve("[pull]\n[[pull.subscriptions]]\nname = \"jobs\"\n").unwrap().pull.unwrap();
        assert_eq!((pull.service.as_str(), pull.version, pull.subscriptions[0].name.as_str()), ("pull", 1, "jobs"));
        let short = resolve("[pull]\n[[pull.subscriptions]]\nname = \"jobs\"\nack_deadline_ms = 4000\n").unwrap_err();
        assert!(short.to_string().contains("at least 10000"), "{short}");
        assert!(resolve("[pull]\n[[pull.subscriptions]]\nname = \"jobs\"\npath = \"/x\"\n").is_err());
    }

    #[test]
    fn peer_tls_needs_all_three_files() {
        let base = || NodeArgs { id: Some(1), data_dir: Some("/tmp/x".into()), ..Default::default() };
        assert_eq!(base().resolve().unwrap().peer_tls, None);
        let all = NodeArgs {
            peer_tls_cert: Some("c.pem".into()),
            peer_tls_key: Some("k.pem".into()),
            peer_tls_ca: Some("ca.pem".into()),
            ..base()
        };
        let tls = all.clone().resolve().unwrap().peer_tls.unwrap();
        assert_eq!((tls.cert.to_str(), tls.key.to_str(), tls.ca.to_str(), tls.server_name), (Some("c.pem"), Some("k.pem"), Some("ca.pem"), None));
        assert!(!tls.require_node_id, "bound certificates are not required by default");
        let required = NodeArgs { peer_tls_require_node_id: Some(true), ..all.clone() };
        assert!(required.resolve().unwrap().peer_tls.unwrap().require_node_id);
        let only_required = NodeArgs { peer_tls_require_node_id: Some(true), ..base() };
        assert!(
            matches!(only_required.resolve(), Err(ConfigError::Invalid { name: "peer-tls-require-node-id", .. })),
            "requiring bound certificates without TLS is a mistake, named"
        );
        let missing_ca = NodeArgs { peer_tls_ca: None, ..all };
        assert!(matches!(missing_ca.resolve(), Err(ConfigError::Invalid { name: "peer-tls-cert", .. })));
        let only_name = NodeArgs { peer_tls_server_name: Some("peers".into()), ..base() };
        assert!(only_name.resolve().is_err(), "a server name without certificates is a mistake");
    }

    #[test]
    fn https_needs_its_address_certificate_and_key() {
        let base = || NodeArgs { id: Some(1), data_dir: Some("/tmp/x".into()), ..Default::default() };
        assert_eq!(base().resolve().unwrap().https, None);
        let all = NodeArgs {
            https_addr: Some("0.0.0.0:8443".into()),
            http_tls_cert: Some("c.pem".into()),
            http_tls_key: Some("k.pem".into()),
            ..base()
        };
        let https = all.clone().resolve().unwrap().https.unwrap();
        assert_eq!((https.addr.as_str(), https.cert.to_str(), https.key.to_str(), https.client_ca), ("0.0.0.0:8443", Some("c.pem"), Some("k.pem"), None));
        let mtls = NodeArgs { http_tls_client_ca: Some("ca.pem".into()), ..all.clone() }.resolve().unwrap().https.unwrap();
        assert_eq!(mtls.client_ca.as_deref(), Some(std::path::Path::new("ca.pem")));
        let no_key = NodeArgs { http_tls_key: None, ..all.clone() };
        assert!(matches!(no_key.resolve(), Err(ConfigError::Invalid { name: "https-addr", .. })));
        let no_addr = NodeArgs { https_addr: None, ..all };
        assert!(matches!(no_addr.resolve(), Err(ConfigError::Invalid { name: "http-tls-cert", .. })), "files without a listener");
        let only_ca = NodeArgs { http_tls_client_ca: Some("ca.pem".into()), ..base() };
        assert!(matches!(only_ca.resolve(), Err(ConfigError::Invalid { name: "http-tls-client-ca", .. })), "a client CA without HTTPS");
    }

    #[test]
    fn dedup_bounds_are_checked() {
        let base = || NodeArgs { id: Some(1), data_dir: Some("/tmp/x".into()), ..Default::default() };
        let cfg = base().resolve().unwrap();
        assert_eq!((cfg.dedup_max_keys, cfg.idempotency_max_bytes), (250_000, 64 << 20));
        assert!(matches!(NodeArgs { dedup_max_keys: Some(0), ..base() }.resolve(), Err(ConfigError::Invalid { name: "dedup-max-keys", .. })));
        assert_eq!((cfg.state_max_keys, cfg.state_max_bytes), (1_000_000, 512 << 20));
        assert!(matches!(NodeArgs { state_max_keys: Some(0), ..base() }.resolve(), Err(ConfigError::Invalid { name: "state-max-keys", .. })));
        assert!(matches!(NodeArgs { state_max_bytes: Some(1000), ..base() }.resolve(), Err(ConfigError::Invalid { name: "state-max-bytes", .. })));
        let small = NodeArgs { idempotency_max_bytes: Some((16 << 20) - 1), ..base() };
        assert!(matches!(small.resolve(), Err(ConfigError::Invalid { name: "idempotency-max-bytes", .. })), "below one frame");
        // The snapshot a node accepts grows with the bounds that size it (a fixed 1 GiB refused
        // a larger state's image for good), and is never below 1 GiB.
        assert!(cfg.snapshot_cap() >= 2 * (512 << 20) && cfg.snapshot_cap() < 4 << 30, "{}", cfg.snapshot_cap());
        let big = NodeArgs { state_max_bytes: Some(4 << 30), ..base() }.resolve().unwrap();
        assert!(big.snapshot_cap() > 8 << 30);
        let tiny = NodeArgs { state_max_bytes: Some(1 << 20), events_max_count: Some(1_024), dedup_max_keys: Some(10), ..base() }.resolve().unwrap();
        assert_eq!(tiny.snapshot_cap(), 1 << 30);
    }

    #[test]
    fn id_from_hostname_uses_the_ordinal() {
        assert_eq!(id_from_hostname("raftbridge-0").unwrap(), 1);
        assert_eq!(id_from_hostname("my-app-12").unwrap(), 13);
        assert!(id_from_hostname("raftbridge").is_err());
        assert!(id_from_hostname("raftbridge-x").is_err());
    }

    #[test]
    fn wildcard_needs_advertise() {
        let args = NodeArgs {
            id: Some(1),
            data_dir: Some("/tmp/x".into()),
            peer_addr: Some("0.0.0.0:7400".into()),
            ..Default::default()
        };
        assert!(matches!(args.resolve(), Err(ConfigError::Invalid { name: "advertise", .. })));
    }
}
