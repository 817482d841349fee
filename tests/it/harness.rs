//! The multi-node test harness: real `raftbridge` processes on loopback ports.
//!
//! A `Cluster` owns a temp dir (data dirs and one log file per node), spawns the binary cargo
//! built for this test (`CARGO_BIN_EXE_raftbridge`) as child processes, and offers what the tests
//! need to drive and observe them: start, add (join via seeds), SIGKILL, restart from the same
//! data dir, the HTTP API of each node (`Api`), typed `/cluster` status, and bounded polling
//! (`wait_for`, `assert_stays`) instead of sleeps. Tests run one at a time: nextest through the
//! test group in `.config/nextest.toml`, plain `cargo test` through the global mutex held by every
//! `Cluster`.
//!
//! Failures are made debuggable: a timed-out wait says what it waited for and what it last saw, a
//! node that dies unexpectedly fails the test at the next poll, and when a test panics the
//! harness prints the tail of every node's log and keeps the temp dir (its path is printed).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::io::Write;
use std::net::SocketAddr;
use std::net::TcpListener;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::ExitStatus;
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::thread;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;

use serde_json::json;
use serde_json::Value;

use crate::http;
use crate::http::Response;

/// The node binary cargo built for this test target.
pub const BIN: &str = env!("CARGO_BIN_EXE_raftbridge");

/// Cluster formation (first election, joins) on a loaded 2-core box.
pub const FORMATION: Duration = Duration::from_secs(30);
/// Electing a new leader after the old one died.
pub const FAILOVER: Duration = Duration::from_secs(10);
/// A node catching up (log replication or snapshot) or a membership change settling.
pub const CATCH_UP: Duration = Duration::from_secs(30);
/// One HTTP request, including a write that waits for a quorum (the node's own deadline is shorter).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// One probe of `/cluster`, `/readyz` or `/healthz`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Poll interval of `wait_for` and `assert_stays`.
const POLL: Duration = Duration::from_millis(75);
/// Lines of each node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// Serializes tests under plain `cargo test` (which runs them on threads of one process).
static SERIAL: Mutex<()> = Mutex::new(());
/// Makes temp dir names unique within the process.
static DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);

// ---------------------------------------------------------------------------------------------
// Per-node HTTP API
// ---------------------------------------------------------------------------------------------

/// The HTTP API of one node. `Copy`, so writer threads can take it along.
#[derive(Debug, Clone, Copy)]
pub struct Api {
    pub id: u64,
    pub addr: SocketAddr,
    /// The cluster's `--api-token`, if its nodes have one: the harness's own reads of
    /// `/cluster` send it (a test's requests say what they send themselves).
    pub token: Option<&'static str>,
}

impl Api {
    /// Any request to this node.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        http::request(self.addr, method, path, headers, body, REQUEST_TIMEOUT)
    }

    fn key_path(key: &str) -> String {
        format!("/v1/state/default/{key}")
    }

    /// `PUT /v1/state/default/{key}` with `value` as the body.
    pub fn put(&self, key: &str, value: &Value) -> io::Result<Response> {
        self.request(
            "PUT",
            &Self::key_path(key),
            &[],
            value.to_string().as_bytes(),
        )
    }

    /// `PUT` with `If-Match: {revision}` (compare-and-set; 0 = must not exist).
    pub fn put_if(&self, key: &str, value: &Value, revision: u64) -> io::Result<Response> {
        let rev = revision.to_string();
        self.request(
            "PUT",
            &Self::key_path(key),
            &[("If-Match", &rev)],
            value.to_string().as_bytes(),
        )
    }

    /// `PUT` that must succeed; returns the revision from the `{"revision":N}` body.
    pub fn must_put(&self, key: &str, value: &Value) -> u64 {
        let resp = self
            .put(key, value)
            .unwrap_or_else(|e| panic!("PUT {key} via node {}: request failed: {e}", self.id));
        assert_eq!(
            resp.status,
            200,
            "PUT {key} via node {}: {}",
            self.id,
            resp.describe()
        );
        body_revision(&resp).unwrap_or_else(|e| panic!("PUT {key} via node {}: {e}", self.id))
    }

    /// Linearizable `GET`.
    pub fn get(&self, key: &str) -> io::Result<Response> {
        self.request("GET", &Self::key_path(key), &[], b"")
    }

    /// `GET ?consistency=stale`: this node's local copy.
    pub fn get_stale(&self, key: &str) -> io::Result<Response> {
        self.request(
            "GET",
            &format!("{}?consistency=stale", Self::key_path(key)),
            &[],
            b"",
        )
    }

    /// `DELETE /v1/state/default/{key}`.
    pub fn delete(&self, key: &str) -> io::Result<Response> {
        self.request("DELETE", &Self::key_path(key), &[], b"")
    }

    /// `GET /cluster`, parsed.
    pub fn status(&self) -> Result<Status, String> {
        let auth = self.token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|v| ("authorization", v.as_str())).collect();
        let resp = http::request(self.addr, "GET", "/cluster", &headers, b"", PROBE_TIMEOUT)
            .map_err(|e| format!("node {}: GET /cluster failed: {e}", self.id))?;
        if resp.status != 200 {
            return Err(format!(
                "node {}: GET /cluster: {}",
                self.id,
                resp.describe()
            ));
        }
        Status::parse(&resp.json()?).map_err(|e| format!("node {}: /cluster: {e}", self.id))
    }

    /// The sum of the samples of `name` on `/metrics` whose labels include every one of `labels`
    /// (each `key="value"`); 0 when there are none yet (a counter appears once counted).
    pub fn metric(&self, name: &str, labels: &[&str]) -> Result<f64, String> {
        let resp = self
            .request("GET", "/metrics", &[], b"")
            .map_err(|e| format!("node {}: GET /metrics: {e}", self.id))?;
        let text = String::from_utf8_lossy(&resp.body);
        let mut sum = 0.0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let (sample, tags) = series.split_once('{').unwrap_or((series, ""));
            if sample == name && labels.iter().all(|l| tags.contains(l)) {
                sum += value.parse::<f64>().map_err(|e| format!("node {}: {line:?}: {e}", self.id))?;
            }
        }
        Ok(sum)
    }

    /// HTTP status of a probe endpoint (`/healthz`, `/readyz`), or the error.
    pub fn probe(&self, path: &str) -> Result<u16, String> {
        http::request(self.addr, "GET", path, &[], b"", PROBE_TIMEOUT)
            .map(|r| r.status)
            .map_err(|e| format!("node {}: GET {path} failed: {e}", self.id))
    }
}

/// The `revision` of a `{"revision":N}` body.
pub fn body_revision(resp: &Response) -> Result<u64, String> {
    resp.json()?
        .get("revision")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("no numeric \"revision\" in {}", resp.describe()))
}

/// Asserts an error response: the expected status and a JSON body `{"status":code,"message":".."}`.
pub fn assert_json_error(resp: &Response, code: u16, what: &str) {
    assert_eq!(
        resp.status,
        code,
        "{what}: expected HTTP {code}, got {}",
        resp.describe()
    );
    let body = resp
        .json()
        .unwrap_or_else(|e| panic!("{what}: error body must be JSON: {e}"));
    assert_eq!(
        body.get("status").and_then(Value::as_u64),
        Some(u64::from(code)),
        "{what}: error JSON must carry \"status\": {code}; got {body}"
    );
    assert!(
        body.get("message").is_some_and(Value::is_string),
        "{what}: error JSON must carry a string \"message\"; got {body}"
    );
}

// ---------------------------------------------------------------------------------------------
// /cluster status
// ---------------------------------------------------------------------------------------------

/// One entry of `/cluster` `members`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub addr: String,
    pub voter: bool,
    pub reachable: bool,
    /// Its clock minus the answering node's, once measured (rounded to a millisecond).
    pub clock_offset_ms: Option<i64>,
}

/// The `/cluster` document of one node.
#[derive(Debug, Clone)]
pub struct Status {
    pub node_id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub committed: u64,
    pub applied: u64,
    pub state: String,
    pub members: Vec<Member>,
    pub snapshot: Option<u64>,
    pub purged: Option<u64>,
    /// A membership change is half done (joint configuration): `voter` covers both halves.
    pub joint: bool,
}

impl Status {
    fn parse(v: &Value) -> Result<Status, String> {
        let u64_field = |name: &str| {
            v.get(name)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("field {name:?} is not a number in {v}"))
        };
        let opt_u64 = |name: &str| match v.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("field {name:?} is not a number or null in {v}")),
        };
        let members = v
            .get("members")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("field \"members\" is not an array in {v}"))?
            .iter()
            .map(|m| {
                Ok(Member {
                    id: m
                        .get("id")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| format!("member without id: {m}"))?,
                    addr: m
                        .get("addr")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    voter: m
                        .get("voter")
                        .and_then(Value::as_bool)
                        .ok_or_else(|| format!("member without voter: {m}"))?,
                    reachable: m
                        .get("reachable")
                        .and_then(Value::as_bool)
                        .ok_or_else(|| format!("member without reachable: {m}"))?,
                    clock_offset_ms: m.get("clock_offset_ms").and_then(Value::as_f64).map(|ms| ms.round() as i64),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Status {
            node_id: u64_field("node_id")?,
            leader: opt_u64("leader")?,
            term: u64_field("term")?,
            // Log indices; a node that has applied nothing yet may report null.
            committed: opt_u64("committed")?.unwrap_or(0),
            applied: opt_u64("applied")?.unwrap_or(0),
            state: v
                .get("state")
                .and_then(Value::as_str)
                .unwrap_or("<missing>")
                .to_string(),
            members,
            snapshot: opt_u64("snapshot")?,
            purged: opt_u64("purged")?,
            joint: v.get("joint").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    pub fn member(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    pub fn voters(&self) -> BTreeSet<u64> {
        self.members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect()
    }

    pub fn learners(&self) -> BTreeSet<u64> {
        self.members
            .iter()
            .filter(|m| !m.voter)
            .map(|m| m.id)
            .collect()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let leader = self.leader.map_or("none".to_string(), |l| l.to_string());
        write!(
            f,
            "node {} {} term={} leader={leader} committed={} applied={} snapshot={:?} purged={:?} members=[",
            self.node_id, self.state, self.term, self.committed, self.applied, self.snapshot, self.purged
        )?;
        for (i, m) in self.members.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            let kind = if m.voter { "voter" } else { "learner" };
            let reach = if m.reachable { "" } else { ",unreachable" };
            write!(f, "{sep}{}:{kind}{reach}", m.id)?;
        }
        write!(f, "]{}", if self.joint { " joint" } else { "" })
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster of child processes
// ---------------------------------------------------------------------------------------------

struct Node {
    id: u64,
    peer: SocketAddr,
    http: SocketAddr,
    log: PathBuf,
    /// Everything after the binary name; identical on every (re)start.
    args: Vec<String>,
    child: Mutex<Option<Child>>,
    starts: AtomicUsize,
    /// The test expects this node may exit by itself (e.g. after being removed).
    may_exit: AtomicBool,
    /// Environment variables set for this node only (`set_env`), on every (re)start.
    env: Mutex<Vec<(String, String)>>,
}

/// A set of `raftbridge` processes on loopback, in one temp dir. Dropping it kills them all.
pub struct Cluster {
    name: String,
    dir: PathBuf,
    /// Flags given to every node (the test's options).
    flags: Vec<String>,
    /// The value of `--api-token` among `flags` (leaked once per cluster: `Api` is `Copy`).
    api_token: Option<&'static str>,
    nodes: Vec<Node>,
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    /// Prepares `n` nodes (ids 1..=n) that seed each other with `--bootstrap-expect n`; nothing is
    /// started yet. `flags` go to every node, including nodes added later.
    pub fn new(name: &str, n: usize, flags: &[&str]) -> Cluster {
        let all: Vec<u64> = (1..=n as u64).collect();
        Cluster::seeded(name, n, n, |_| all.clone(), flags)
    }

    /// Prepares `n` nodes (ids 1..=n) with `--bootstrap-expect expect`, node `id` seeded with
    /// the peer addresses of `seeds(id)`; nothing is started yet.
    pub fn seeded(name: &str, n: usize, expect: usize, seeds: impl Fn(u64) -> Vec<u64>, flags: &[&str]) -> Cluster {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "raftbridge-it-{name}-{}-{nanos}-{}",
            std::process::id(),
            DIR_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut cluster = Cluster {
            name: name.to_string(),
            dir,
            flags: flags.iter().map(|s| s.to_string()).collect(),
            api_token: flags
                .iter()
                .position(|f| *f == "--api-token")
                .and_then(|i| flags.get(i + 1))
                .map(|t| &*Box::leak(t.to_string().into_boxed_str())),
            nodes: Vec::new(),
            _serial: serial,
        };
        let ports = free_ports(2 * n);
        let peers: Vec<SocketAddr> = ports[..n].to_vec();
        for i in 0..n {
            let of: Vec<SocketAddr> = seeds(i as u64 + 1).iter().map(|&s| peers[s as usize - 1]).collect();
            let extra = vec![
                "--seeds".to_string(),
                join_addrs(&of),
                "--bootstrap-expect".to_string(),
                expect.to_string(),
            ];
            cluster.push_node(peers[i], ports[n + i], extra);
        }
        eprintln!(
            "[harness] cluster {name}: {n} nodes in {}",
            cluster.dir.display()
        );
        cluster
    }

    /// Starts `n` nodes together and waits until they form one cluster of `n` reachable voters
    /// with an agreed leader. Returns the cluster and the leader.
    pub fn formed(name: &str, n: usize, flags: &[&str]) -> (Cluster, u64) {
        let cluster = Cluster::new(name, n, flags);
        cluster.start_all();
        let voters: Vec<u64> = cluster.ids();
        let leader = cluster.wait_for_membership(&voters, &[], FORMATION);
        (cluster, leader)
    }

    fn push_node(&mut self, peer: SocketAddr, http: SocketAddr, extra: Vec<String>) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let data_dir = self.dir.join(format!("n{id}"));
        // Private, as a node makes its own (it warns about one open to other users).
        raftbridge::fsutil::create_private_dir(&data_dir)
            .unwrap_or_else(|e| panic!("create {}: {e}", data_dir.display()));
        let mut args: Vec<String> = vec![
            "node".into(),
            "--id".into(),
            id.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--peer-addr".into(),
            peer.to_string(),
            "--http-addr".into(),
            http.to_string(),
            "--cluster-name".into(),
            format!("it-{}", self.name),
        ];
        // Odd ids run one worker thread (tokio's current-thread scheduler, as `raftbridge dev`
        // and the benchmarks do on small machines), even ids the default multi-thread one: every
        // cluster test covers both runtimes and a cluster that mixes them.
        if id % 2 == 1 {
            args.extend(["--worker-threads".to_string(), "1".to_string()]);
        }
        args.extend(extra);
        args.extend(self.flags.iter().cloned());
        self.nodes.push(Node {
            id,
            peer,
            http,
            log: self.dir.join(format!("n{id}.log")),
            args,
            child: Mutex::new(None),
            starts: AtomicUsize::new(0),
            may_exit: AtomicBool::new(false),
            env: Mutex::new(Vec::new()),
        });
        id
    }

    /// Sets an environment variable for node `id` from its next start on.
    pub fn set_env(&self, id: u64, key: &str, value: &str) {
        lock(&self.node(id).env).push((key.to_string(), value.to_string()));
    }

    fn node(&self, id: u64) -> &Node {
        self.nodes
            .get((id as usize).wrapping_sub(1))
            .unwrap_or_else(|| {
                panic!(
                    "no node {id} in cluster {} (has {})",
                    self.name,
                    self.nodes.len()
                )
            })
    }

    /// All node ids, started or not.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Ids of the nodes whose process the harness has running.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| lock(&n.child).is_some())
            .map(|n| n.id)
            .collect()
    }

    pub fn is_running(&self, id: u64) -> bool {
        lock(&self.node(id).child).is_some()
    }

    /// The HTTP address of node `id`.
    pub fn http(&self, id: u64) -> SocketAddr {
        self.node(id).http
    }

    /// The peer (raft) address of node `id`.
    pub fn peer(&self, id: u64) -> SocketAddr {
        self.node(id).peer
    }

    pub fn api(&self, id: u64) -> Api {
        Api {
            id,
            addr: self.http(id),
            token: self.api_token,
        }
    }

    /// The APIs of every running node.
    pub fn apis(&self) -> Vec<Api> {
        self.running().into_iter().map(|id| self.api(id)).collect()
    }

    /// Starts node `id` (first start or restart, with the same flags and data dir).
    pub fn start(&self, id: u64) {
        let node = self.node(id);
        let mut child = lock(&node.child);
        assert!(child.is_none(), "node {id} is already running");
        let n = node.starts.fetch_add(1, Ordering::Relaxed) + 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", node.log.display()));
        let _ = writeln!(
            log,
            "===== harness: start #{n} of node {id}: {BIN} {} =====",
            node.args.join(" ")
        );
        let stderr = log.try_clone().expect("clone log file handle");
        let mut cmd = Command::new(BIN);
        cmd.args(&node.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        // Only the flags above configure the node: no RAFTBRIDGE_* leaking in from the caller.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RAFTBRIDGE_") {
                cmd.env_remove(&key);
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(lock(&node.env).iter().cloned());
        node.may_exit.store(false, Ordering::Relaxed);
        *child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawn {BIN} for node {id}: {e}")),
        );
    }

    /// Starts every node that is not running.
    pub fn start_all(&self) {
        for id in self.ids() {
            if !self.is_running(id) {
                self.start(id);
            }
        }
    }

    /// Same as `start`: the node comes back with the same flags and data dir.
    pub fn restart(&self, id: u64) {
        self.start(id);
    }

    /// Sends `signal` (a `kill` name such as `HUP`) to node `id`, which must be running.
    pub fn signal(&self, id: u64, signal: &str) {
        let guard = lock(&self.node(id).child);
        let child = guard.as_ref().unwrap_or_else(|| panic!("node {id} is not running"));
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("kill -{signal} node {id}: {e}"));
        assert!(status.success(), "kill -{signal} node {id}: {status}");
    }

    /// SIGKILLs node `id` and reaps it.
    pub fn kill(&self, id: u64) {
        let mut guard = lock(&self.node(id).child);
        let mut child = guard
            .take()
            .unwrap_or_else(|| panic!("node {id} is not running"));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILLs every running node, as close to simultaneously as possible, then reaps them.
    pub fn kill_all(&self) {
        let mut children: Vec<Child> = self
            .nodes
            .iter()
            .filter_map(|n| lock(&n.child).take())
            .collect();
        for child in &mut children {
            let _ = child.kill();
        }
        for child in &mut children {
            let _ = child.wait();
        }
    }

    /// Adds node `len+1`, seeded with the peer addresses of `seeds` and no `--bootstrap-expect`,
    /// and starts it: it must join the running cluster by itself. Returns its id.
    pub fn add_node(&mut self, seeds: &[u64]) -> u64 {
        self.add_node_with(seeds, &[])
    }

    /// `add_node` with environment variables of its own (`set_env`) from its first start.
    pub fn add_node_env(&mut self, seeds: &[u64], env: &[(&str, &str)]) -> u64 {
        let seeds: Vec<SocketAddr> = seeds.iter().map(|&s| self.peer(s)).collect();
        let ports = free_ports(2);
        let id = self.push_node(ports[0], ports[1], vec!["--seeds".into(), join_addrs(&seeds)]);
        for (k, v) in env {
            self.set_env(id, k, v);
        }
        self.start(id);
        id
    }

    /// `add_node` with `flags` of its own besides the cluster's.
    pub fn add_node_with(&mut self, seeds: &[u64], flags: &[String]) -> u64 {
        let seeds: Vec<SocketAddr> = seeds.iter().map(|&s| self.peer(s)).collect();
        let ports = free_ports(2);
        let mut extra = vec!["--seeds".into(), join_addrs(&seeds)];
        extra.extend(flags.iter().cloned());
        let id = self.push_node(ports[0], ports[1], extra);
        self.start(id);
        id
    }

    /// Everything node `id` has logged so far (all its starts).
    pub fn log_text(&self, id: u64) -> String {
        let path = &self.node(id).log;
        fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    /// The cluster's temp dir (removed with the cluster unless a test failed).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Declares that node `id` may exit on its own from now on (the liveness check skips it).
    pub fn allow_exit(&self, id: u64) {
        self.node(id).may_exit.store(true, Ordering::Relaxed);
    }

    /// Panics if a node the harness started has exited while the test did not expect it.
    pub fn assert_alive(&self) {
        for node in &self.nodes {
            let mut guard = lock(&node.child);
            let Some(child) = guard.as_mut() else {
                continue;
            };
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) if node.may_exit.load(Ordering::Relaxed) => {
                    eprintln!("[harness] node {} exited ({status}), as allowed", node.id);
                    *guard = None;
                }
                Ok(Some(status)) => {
                    *guard = None;
                    drop(guard);
                    panic!(
                        "node {} exited unexpectedly: {}",
                        node.id,
                        describe_exit(status)
                    );
                }
                Err(e) => panic!("try_wait on node {}: {e}", node.id),
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Waiting
    // -----------------------------------------------------------------------------------------

    /// Polls `probe` until it returns `Ok`, for at most `deadline`. On timeout, panics with `desc`
    /// and the last `Err` observation. Also fails as soon as a node dies unexpectedly.
    pub fn wait_for<T>(
        &self,
        desc: &str,
        deadline: Duration,
        mut probe: impl FnMut() -> Result<T, String>,
    ) -> T {
        let start = Instant::now();
        let max_polls = (deadline.as_millis() / POLL.as_millis()) as usize + 10;
        let mut last = String::from("(never probed)");
        for poll in 1..=max_polls {
            self.assert_alive();
            match probe() {
                Ok(v) => return v,
                Err(e) => last = e,
            }
            if start.elapsed() >= deadline {
                panic!("timed out after {:?} ({poll} polls) waiting for {desc}\n  last observation: {last}", start.elapsed());
            }
            thread::sleep(POLL);
        }
        panic!(
            "gave up after {max_polls} polls ({:?}) waiting for {desc}\n  last observation: {last}",
            start.elapsed()
        );
    }

    /// Like `wait_for` with a boolean condition.
    pub fn wait_until(&self, desc: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
        self.wait_for(desc, deadline, || {
            if cond() {
                Ok(())
            } else {
                Err("condition false".into())
            }
        })
    }

    /// Polls `probe` for the whole of `duration`; panics at the first `Err`.
    pub fn assert_stays(
        &self,
        desc: &str,
        duration: Duration,
        mut probe: impl FnMut() -> Result<(), String>,
    ) {
        let start = Instant::now();
        let max_polls = (duration.as_millis() / POLL.as_millis()) as usize + 10;
        for _ in 0..max_polls {
            self.assert_alive();
            if let Err(e) = probe() {
                panic!(
                    "expected {desc} for {duration:?}, but after {:?}: {e}",
                    start.elapsed()
                );
            }
            if start.elapsed() >= duration {
                return;
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until node `id` serves `/healthz` with 200 (the process is up).
    pub fn wait_healthy(&self, id: u64) {
        let api = self.api(id);
        self.wait_for(&format!("node {id} /healthz 200"), FORMATION, || match api
            .probe("/healthz")?
        {
            200 => Ok(()),
            code => Err(format!("node {id}: /healthz {code}")),
        });
    }

    /// The `/cluster` status of every running node, or the first failure.
    pub fn statuses(&self) -> Result<BTreeMap<u64, Status>, String> {
        self.running()
            .into_iter()
            .map(|id| Ok((id, self.api(id).status()?)))
            .collect()
    }

    /// The leader all `observers` agree on; that node must itself report being the leader.
    pub fn agreed_leader_among(&self, observers: &[u64]) -> Result<u64, String> {
        let mut leader = None;
        let mut seen = Vec::new();
        for &id in observers {
            let status = self.api(id).status()?;
            seen.push(status.to_string());
            match (leader, status.leader) {
                (_, None) => {
                    return Err(format!(
                        "node {id} knows no leader; seen: {}",
                        seen.join(" | ")
                    ))
                }
                (None, Some(l)) => leader = Some(l),
                (Some(a), Some(b)) if a != b => {
                    return Err(format!(
                        "leaders disagree ({a} vs {b}); seen: {}",
                        seen.join(" | ")
                    ))
                }
                _ => {}
            }
        }
        let leader = leader.ok_or("no observers")?;
        if !self.running().contains(&leader) {
            return Err(format!(
                "agreed leader {leader} is not running; seen: {}",
                seen.join(" | ")
            ));
        }
        let own = self.api(leader).status()?;
        if own.state != "Leader" {
            return Err(format!("node {leader} is named leader but reports {own}"));
        }
        Ok(leader)
    }

    /// Waits until every running node agrees on one running leader; returns it.
    pub fn wait_for_leader(&self, deadline: Duration) -> u64 {
        self.wait_for("all running nodes to agree on a leader", deadline, || {
            self.agreed_leader_among(&self.running())
        })
    }

    /// Waits until every running node agrees on the leader and reports exactly these voters and
    /// learners, every running member reachable. Returns the leader.
    pub fn wait_for_membership(&self, voters: &[u64], learners: &[u64], deadline: Duration) -> u64 {
        self.wait_for_membership_seen_by(&self.running(), voters, learners, deadline)
    }

    /// `wait_for_membership` as seen by `observers` only.
    pub fn wait_for_membership_seen_by(
        &self,
        observers: &[u64],
        voters: &[u64],
        learners: &[u64],
        deadline: Duration,
    ) -> u64 {
        let want_voters: BTreeSet<u64> = voters.iter().copied().collect();
        let want_learners: BTreeSet<u64> = learners.iter().copied().collect();
        let desc = format!("nodes {observers:?} to agree on a leader with voters {voters:?} and learners {learners:?}");
        self.wait_for(&desc, deadline, || {
            let leader = self.agreed_leader_among(observers)?;
            for &id in observers {
                let status = self.api(id).status()?;
                if status.node_id != id {
                    return Err(format!("node {id} reports node_id {}", status.node_id));
                }
                if status.voters() != want_voters || status.learners() != want_learners || status.joint {
                    return Err(format!("membership differs: {status}"));
                }
                if let Some(m) = status
                    .members
                    .iter()
                    .find(|m| self.is_running(m.id) && !m.reachable)
                {
                    return Err(format!("running node {} shown unreachable: {status}", m.id));
                }
            }
            Ok(leader)
        })
    }

    /// Waits until each of `ids` has applied at least what the leader has applied (re-read at
    /// every poll). Returns the leader's applied index.
    pub fn wait_caught_up(&self, ids: &[u64], deadline: Duration) -> u64 {
        let desc = format!("nodes {ids:?} to apply everything the leader applied");
        self.wait_for(&desc, deadline, || {
            let leader = self.agreed_leader_among(&self.running())?;
            let target = self.api(leader).status()?.applied;
            for &id in ids {
                let status = self.api(id).status()?;
                if status.applied < target {
                    return Err(format!("leader {leader} applied {target}; {status}"));
                }
            }
            Ok(target)
        })
    }

    /// Waits until every running node answers `/readyz` with 200.
    pub fn wait_all_ready(&self, deadline: Duration) {
        self.wait_for("every running node /readyz 200", deadline, || {
            for api in self.apis() {
                match api.probe("/readyz")? {
                    200 => {}
                    code => return Err(format!("node {}: /readyz {code}", api.id)),
                }
            }
            Ok(())
        })
    }

    /// Runs `raftbridge <args>` to completion within `deadline`, output into `<name>.cli.log`.
    pub fn run_cli(&self, name: &str, args: &[&str], deadline: Duration) -> ExitStatus {
        let path = self.dir.join(format!("{name}.cli.log"));
        let log = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        let err = log.try_clone().expect("clone log file handle");
        let mut cmd = Command::new(BIN);
        // Only the test's arguments configure the command, as for the nodes.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RAFTBRIDGE_") {
                cmd.env_remove(&key);
            }
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN} {args:?}: {e}"));
        let start = Instant::now();
        let max_polls = (deadline.as_millis() / POLL.as_millis()) as usize + 10;
        for _ in 0..max_polls {
            if let Some(status) = child.try_wait().expect("try_wait on CLI") {
                return status;
            }
            if start.elapsed() >= deadline {
                break;
            }
            thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "`raftbridge {}` did not finish within {deadline:?}; output:\n{}",
            args.join(" "),
            tail(&path, LOG_TAIL_LINES)
        );
    }

    /// `raftbridge certs` for `name` in `dir` (its CA made on first use), valid for 127.0.0.1
    /// and localhost; returns the certificate's and the key's paths.
    pub fn certs(&self, dir: &Path, name: &str) -> (String, String) {
        self.certs_with(dir, name, &[])
    }

    /// `certs` with more of `raftbridge certs`' flags (`--node-id N`).
    pub fn certs_with(&self, dir: &Path, name: &str, extra: &[&str]) -> (String, String) {
        let d = dir.display().to_string();
        let mut args = vec!["certs", "--dir", &d, "--name", name, "--san", "127.0.0.1", "--san", "localhost"];
        args.extend_from_slice(extra);
        let status = self.run_cli(&format!("certs-{name}"), &args, Duration::from_secs(30));
        assert!(status.success(), "`raftbridge certs --dir {d} --name {name}` exited with {status}");
        let file = |f: String| dir.join(f).display().to_string();
        (file(format!("{name}.pem")), file(format!("{name}-key.pem")))
    }

    /// Prints the last lines of every node's log to stderr.
    pub fn print_logs(&self) {
        for node in &self.nodes {
            eprintln!(
                "----- last {LOG_TAIL_LINES} lines of node {} log ({}) -----",
                node.id,
                node.log.display()
            );
            eprintln!("{}", tail(&node.log, LOG_TAIL_LINES));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            if let Some(mut child) = lock(&node.child).take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if thread::panicking() {
            self.print_logs();
            eprintln!(
                "[harness] test failed; keeping {} for inspection",
                self.dir.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("[harness] could not remove {}: {e}", self.dir.display());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn describe_exit(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("killed by signal {signal}");
        }
    }
    status.to_string()
}

/// Distinct free loopback ports: all bound at once (so they differ), then released.
/// `n` free loopback ports, chosen below the kernel's ephemeral range (32768+ here): a port
/// handed out by `bind(:0)` is ephemeral, and between the probe and the node's own bind any
/// outgoing connection (our HTTP clients, the nodes' peer dials) may take it. Random ports in
/// 10000..32000, checked by binding, do not race with those.
fn free_ports(n: usize) -> Vec<SocketAddr> {
    use std::hash::BuildHasher;
    static TAKEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut out = Vec::with_capacity(n);
    let mut taken = lock(&TAKEN);
    for _ in 0..100_000 {
        if out.len() == n {
            break;
        }
        let random = std::collections::hash_map::RandomState::new().hash_one(out.len());
        let port = 10_000 + (random % 22_000) as u16;
        if taken.contains(&port) {
            continue;
        }
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            taken.insert(port);
            out.push(l.local_addr().expect("local_addr"));
        }
    }
    assert_eq!(out.len(), n, "could not find {n} free loopback ports");
    out
}

fn join_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The last `lines` lines of a file (or why it can't be read).
fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// Write load and read-back verification
// ---------------------------------------------------------------------------------------------

/// A write the cluster acknowledged with 200.
#[derive(Debug, Clone)]
pub struct Acked {
    pub key: String,
    pub value: Value,
    pub revision: u64,
    pub via: u64,
    pub writer: usize,
}

/// What a write load produced.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    /// Acknowledged writes, each writer's in the order it issued them.
    pub acked: Vec<Acked>,
    /// Writes without a 200 (count).
    pub failed: usize,
    /// The first few failures, for messages.
    pub failures: Vec<String>,
}

impl LoadOutcome {
    /// Panics unless every write was acknowledged.
    pub fn assert_all_acked(&self) {
        assert_eq!(
            self.failed, 0,
            "{} writes failed in a healthy cluster; first: {:#?}",
            self.failed, self.failures
        );
    }

    /// Sanity of revisions: all distinct (one log entry per write), and increasing for the
    /// writes of one writer (each was issued after the previous one was acknowledged).
    pub fn assert_revisions_consistent(&self) {
        let mut seen = BTreeMap::new();
        for w in &self.acked {
            if let Some(other) = seen.insert(w.revision, &w.key) {
                panic!(
                    "revision {} returned for both {other} and {}",
                    w.revision, w.key
                );
            }
        }
        let mut last: BTreeMap<usize, &Acked> = BTreeMap::new();
        for w in &self.acked {
            if let Some(prev) = last.insert(w.writer, w) {
                assert!(
                    w.revision > prev.revision,
                    "writer {}: {} got revision {} after {} got {}",
                    w.writer,
                    w.key,
                    w.revision,
                    prev.key,
                    prev.revision
                );
            }
        }
    }
}

struct LoadShared {
    stop: AtomicBool,
    acked_count: AtomicUsize,
    outcome: Mutex<LoadOutcome>,
}

/// Concurrent writers putting distinct keys with distinct values, round-robin over nodes.
pub struct WriteLoad {
    shared: Arc<LoadShared>,
    handles: Vec<JoinHandle<()>>,
}

impl WriteLoad {
    /// Starts `writers` threads writing keys `{prefix}-{writer}-{seq}` through `targets`, each at
    /// most `per_writer` writes (or until `stop`).
    pub fn start(targets: Vec<Api>, writers: usize, per_writer: usize, prefix: &str) -> WriteLoad {
        assert!(!targets.is_empty(), "a write load needs targets");
        let shared = Arc::new(LoadShared {
            stop: AtomicBool::new(false),
            acked_count: AtomicUsize::new(0),
            outcome: Mutex::new(LoadOutcome::default()),
        });
        let handles = (0..writers)
            .map(|writer| {
                let shared = Arc::clone(&shared);
                let targets = targets.clone();
                let prefix = prefix.to_string();
                thread::spawn(move || run_writer(&shared, &targets, writer, per_writer, &prefix))
            })
            .collect();
        WriteLoad { shared, handles }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> usize {
        self.shared.acked_count.load(Ordering::Relaxed)
    }

    /// Waits for every writer to finish its writes.
    pub fn finish(mut self) -> LoadOutcome {
        for h in std::mem::take(&mut self.handles) {
            h.join().expect("writer thread panicked");
        }
        std::mem::take(&mut *lock(&self.shared.outcome))
    }

    /// Tells the writers to stop after their current request, then collects the outcome.
    pub fn stop(self) -> LoadOutcome {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.finish()
    }

    /// Writes `count` keys with `writers` threads through `targets` and waits for them.
    pub fn run(targets: Vec<Api>, writers: usize, count: usize, prefix: &str) -> LoadOutcome {
        WriteLoad::start(targets, writers, count.div_ceil(writers), prefix).finish()
    }
}

impl Drop for WriteLoad {
    /// A test that fails mid-load must not leave writers running into the next test's ports.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn run_writer(
    shared: &LoadShared,
    targets: &[Api],
    writer: usize,
    per_writer: usize,
    prefix: &str,
) {
    for seq in 0..per_writer {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let api = targets[(writer + seq) % targets.len()];
        let key = format!("{prefix}-{writer}-{seq}");
        let value = json!({ "key": key, "writer": writer, "seq": seq, "via": api.id });
        let result = api
            .put(&key, &value)
            .map_err(|e| e.to_string())
            .and_then(|resp| {
                if resp.status == 200 {
                    // An acknowledgement without its revision cannot be checked: it fails the
                    // test (the writer threads' panics do), not the request.
                    Ok(body_revision(&resp).unwrap_or_else(|e| panic!("PUT {key} via node {} answered 200 without a revision: {e}", api.id)))
                } else {
                    Err(resp.describe())
                }
            });
        let mut outcome = lock(&shared.outcome);
        match result {
            Ok(revision) => {
                outcome.acked.push(Acked {
                    key,
                    value,
                    revision,
                    via: api.id,
                    writer,
                });
                shared.acked_count.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                outcome.failed += 1;
                if outcome.failures.len() < 10 {
                    outcome
                        .failures
                        .push(format!("PUT {key} via node {}: {e}", api.id));
                }
                drop(outcome);
                // A dead node refuses at once; don't spin on it.
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// How to read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    Linearizable,
    Stale,
}

/// Reads every write back from `api` and panics listing the writes that are missing or differ
/// (by content and `x-revision`).
pub fn verify_reads(api: Api, writes: &[Acked], read: Consistency) {
    let mut bad = Vec::new();
    for w in writes {
        let resp = match read {
            Consistency::Linearizable => api.get(&w.key),
            Consistency::Stale => api.get_stale(&w.key),
        };
        let problem = match resp {
            Err(e) => Some(format!("request failed: {e}")),
            Ok(r) if r.status != 200 => Some(r.describe()),
            Ok(r) => match r.json() {
                Err(e) => Some(e),
                Ok(v) if v != w.value => Some(format!("value {v}, expected {}", w.value)),
                Ok(_) if r.revision_header() != Some(w.revision) => Some(format!(
                    "x-revision {:?}, expected {}",
                    r.header("x-revision"),
                    w.revision
                )),
                Ok(_) => None,
            },
        };
        if let Some(p) = problem {
            bad.push(format!("{} (written via node {}): {p}", w.key, w.via));
        }
    }
    assert!(
        bad.is_empty(),
        "{read:?} reads from node {}: {} of {} acknowledged writes wrong; first: {:#?}",
        api.id,
        bad.len(),
        writes.len(),
        &bad[..bad.len().min(10)]
    );
}

// ---------------------------------------------------------------------------------------------
// Per-node flags, files next to the nodes, and helper processes (commands and sidecar tests)
// ---------------------------------------------------------------------------------------------

impl Cluster {
    /// Like `formed`, but node `id` also gets `per_node(cluster_dir, id)` as extra flags (e.g. its
    /// own `--config` file written into the cluster dir).
    pub fn formed_with(
        name: &str,
        n: usize,
        flags: &[&str],
        per_node: impl Fn(&Path, u64) -> Vec<String>,
    ) -> (Cluster, u64) {
        let mut cluster = Cluster::new(name, n, flags);
        for id in cluster.ids() {
            let extra = per_node(&cluster.dir, id);
            cluster.add_node_flags(id, &extra);
        }
        cluster.start_all();
        let voters: Vec<u64> = cluster.ids();
        let leader = cluster.wait_for_membership(&voters, &[], FORMATION);
        (cluster, leader)
    }

    /// Gives node `id` (stopped) a new peer address for its next (re)start, as a rescheduled
    /// container that kept its volume gets; returns it.
    pub fn move_peer_addr(&mut self, id: u64) -> SocketAddr {
        let new = free_ports(1)[0];
        let index = (id as usize).wrapping_sub(1);
        let node = self.nodes.get_mut(index).unwrap_or_else(|| panic!("no node {id} in cluster {}", self.name));
        let at = node.args.iter().position(|a| a == "--peer-addr").expect("a --peer-addr flag") + 1;
        node.args[at] = new.to_string();
        node.peer = new;
        new
    }

    /// Appends `flags` to node `id`'s command line, for its next (re)start and every later one.
    pub fn add_node_flags(&mut self, id: u64, flags: &[String]) {
        let index = (id as usize).wrapping_sub(1);
        let node = self
            .nodes
            .get_mut(index)
            .unwrap_or_else(|| panic!("no node {id} in cluster {}", self.name));
        node.args.extend(flags.iter().cloned());
    }
}

/// `n` distinct free loopback ports.
pub fn free_loopback_ports(n: usize) -> Vec<SocketAddr> {
    free_ports(n)
}

/// Polls `probe` until it returns `Ok`, for at most `deadline`; panics with `desc` and the last
/// observation otherwise. For conditions outside a `Cluster` (helper processes).
pub fn poll_until<T>(
    desc: &str,
    deadline: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        let last = match probe() {
            Ok(v) => return v,
            Err(e) => e,
        };
        if start.elapsed() >= deadline {
            panic!(
                "timed out after {:?} waiting for {desc}\n  last observation: {last}",
                start.elapsed()
            );
        }
        thread::sleep(POLL);
    }
}

/// A helper process (e.g. the Python upstream of the sidecar tests) with its output in `log`;
/// killed and reaped on drop, its log tail printed if the test is failing.
pub struct HelperProcess {
    pub name: String,
    program: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl HelperProcess {
    /// Spawns `program args` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, program: &str, args: &[String], log: PathBuf) -> HelperProcess {
        let mut p = HelperProcess {
            name: name.to_string(),
            program: program.to_string(),
            args: args.to_vec(),
            log,
            child: None,
        };
        p.start();
        p
    }

    /// (Re)starts the process with the same command line.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        let err = log.try_clone().expect("clone log file handle");
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} {:?}: {e}", self.program, self.args));
        self.child = Some(child);
    }

    /// SIGKILLs and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of the process's output.
    pub fn log_tail(&self) -> String {
        tail(&self.log, LOG_TAIL_LINES)
    }
}

impl Drop for HelperProcess {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "----- last {LOG_TAIL_LINES} lines of {} ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

/// Sends one request that must fail with the JSON error `code` in less than `within` (a fast
/// 503, a deadline turned into a 504); returns how long it took.
pub fn assert_json_error_within(
    api: Api,
    (method, path): (&str, &str),
    headers: &[(&str, &str)],
    body: &[u8],
    (code, within): (u16, Duration),
    what: &str,
) -> Duration {
    let start = Instant::now();
    let resp = api
        .request(method, path, headers, body)
        .unwrap_or_else(|e| panic!("{what}: {method} {path} via node {}: {e}", api.id));
    let took = start.elapsed();
    assert_json_error(
        &resp,
        code,
        &format!("{what} ({method} {path} via node {})", api.id),
    );
    assert!(
        took < within,
        "{what}: {method} {path} via node {} answered {code} after {took:?}; expected under {within:?}",
        api.id
    );
    took
}

/// True for a W3C `traceparent`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`,
/// lower-case, ids not all zeros.
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && nonzero(parts[1])
        && hex(parts[2], 16)
        && nonzero(parts[2])
        && hex(parts[3], 2)
}

impl Cluster {
    /// Sends SIGTERM to node `id` (graceful drain) and waits, bounded, for it to exit.
    pub fn terminate(&self, id: u64) {
        let mut guard = lock(&self.node(id).child);
        let mut child = guard.take().unwrap_or_else(|| panic!("node {id} is not running"));
        let status = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -TERM node {id}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("node {id} did not exit within 30 s of SIGTERM");
                }
            }
        }
    }

    /// Waits, bounded by `deadline`, for node `id` to exit on its own; returns how it exited.
    /// The node must have been allowed to exit (`allow_exit`).
    pub fn wait_exit(&self, id: u64, deadline: Duration) -> ExitStatus {
        let node = self.node(id);
        assert!(node.may_exit.load(Ordering::Relaxed), "node {id}: call allow_exit first");
        let until = Instant::now() + deadline;
        loop {
            let mut guard = lock(&node.child);
            let child = guard.as_mut().unwrap_or_else(|| panic!("node {id} is not running"));
            match child.try_wait() {
                Ok(Some(status)) => {
                    *guard = None;
                    return status;
                }
                Ok(None) if Instant::now() < until => {}
                Ok(None) => panic!("node {id} did not exit within {deadline:?}"),
                Err(e) => panic!("try_wait on node {id}: {e}"),
            }
            drop(guard);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until node `id` answers `/readyz` 200.
    pub fn wait_ready(&self, id: u64) {
        let api = self.api(id);
        self.wait_for(&format!("node {id} /readyz 200"), FORMATION, || match api.probe("/readyz")? {
            200 => Ok(()),
            code => Err(format!("node {id}: /readyz {code}")),
        });
    }
}
