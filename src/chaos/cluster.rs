//! Cluster control for the chaos suite: start, kill, pause, isolate and heal nodes.
//!
//! [`ClusterControl`] is what the driver needs from a cluster; [`ProcessCluster`] implements it
//! with `raftbridge node` child processes of this same binary on free loopback ports (the same
//! way `raftbridge dev` and the integration tests run nodes). A container implementation (docker
//! pause / network disconnect) plugs in behind the same trait.
//!
//! Isolation in process mode: every node *advertises* (and is seeded with) the address of a small
//! TCP relay owned by this process instead of its own peer port, so every peer link runs through
//! a relay. Node N listens for peers on a loopback address of its own, `127.0.1.N`, and its dials
//! leave from that address (`--peer-source-addr`), so the relay knows both ends of each link
//! from the connection alone: it works the same over peer TLS, whose frames it cannot read (it
//! used to read the dialer's `Hello`, so with TLS a node's own dials went through while it was
//! "isolated"). Isolating node N closes every link with N at one end and refuses new ones until
//! healed: for both nodes it looks exactly like a network cut (the links reset, dials fail).
//! Client HTTP does not go through the relay, so clients can still reach an isolated node — as
//! with a real partition between servers.
//!
//! Processes are signalled with `kill(1)` (the crate forbids `unsafe`, so no libc). Every child
//! is spawned with `kill_on_drop`, so dropping the cluster (also on panic or Ctrl-C) kills them.

use crate::lock;
use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Removes terminal colour sequences (`ESC [ ... m`) from a log line.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Deletes everything in `dir`, keeping `dir` itself (a bind mount in docker mode).
pub(crate) fn empty_dir(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let path = entry.path();
        // The entry's own type: a symlink to a directory is removed, not followed.
        let is_dir = entry.file_type().with_context(|| format!("reading {}", path.display()))?.is_dir();
        let removed = if is_dir { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed.with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// What the chaos driver needs from a cluster.
#[allow(async_fn_in_trait)] // used generically by the driver only, never boxed or spawned
pub trait ClusterControl {
    /// Node ids, 1..=n.
    fn ids(&self) -> Vec<u64>;
    /// `host:port` of the node's client HTTP API.
    fn http_addr(&self, id: u64) -> String;
    /// Whether [`ClusterControl::isolate`] is a real network cut in this mode.
    fn supports_isolation(&self) -> bool;
    /// Whether the node's process is running (paused counts as running).
    fn is_running(&self, id: u64) -> bool;
    /// Starts (or restarts, same data dir and flags) a node that is not running.
    async fn start(&self, id: u64) -> anyhow::Result<()>;
    /// SIGKILL, and wait until the process is gone: a process crash (what the node wrote is
    /// kept, as the OS page cache keeps it).
    async fn kill(&self, id: u64) -> anyhow::Result<()>;
    /// A power cut of the node's machine: killed, and on its next start every log byte it had
    /// not fsynced is gone.
    async fn power_cut(&self, id: u64) -> anyhow::Result<()>;
    /// SIGKILL, then delete everything in the node's data dir (its disk was replaced): it starts
    /// again empty under its id.
    async fn lose_data(&self, id: u64) -> anyhow::Result<()>;
    /// What the node reported about dropped unsynced bytes since its last start, if it has.
    fn power_loss_note(&self, id: u64) -> Option<String>;
    /// SIGTERM and wait for the node to drain and exit; SIGKILL after `deadline`.
    /// Returns whether it exited by itself.
    async fn stop_gracefully(&self, id: u64, deadline: Duration) -> anyhow::Result<bool>;
    /// SIGSTOP.
    async fn pause(&self, id: u64) -> anyhow::Result<()>;
    /// SIGCONT.
    async fn resume(&self, id: u64) -> anyhow::Result<()>;
    /// Cut the node off from every other node.
    async fn isolate(&self, id: u64) -> anyhow::Result<()>;
    /// Undo [`ClusterControl::isolate`].
    async fn heal(&self, id: u64) -> anyhow::Result<()>;
    /// Kill everything and release resources.
    async fn shutdown(&self);
    /// Nodes that exited without being told to (crashes, or something outside the suite
    /// killing them), as `node N: status`; found while checking [`ClusterControl::is_running`].
    fn unexpected_exits(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Who may talk to whom: the set of isolated nodes plus a generation that relays watch.
pub struct Partition {
    isolated: Mutex<BTreeSet<u64>>,
    changed: watch::Sender<u64>,
}

impl Default for Partition {
    fn default() -> Self {
        Partition { isolated: Mutex::new(BTreeSet::new()), changed: watch::channel(0).0 }
    }
}

impl Partition {
    fn set(&self, id: u64, isolated: bool) {
        {
            let mut set = lock(&self.isolated);
            if isolated {
                set.insert(id);
            } else {
                set.remove(&id);
            }
        }
        self.changed.send_modify(|g| *g += 1);
    }

    /// A link from `from` (unknown when it came from no node's address) to `to` is cut.
    pub fn blocked(&self, from: Option<u64>, to: u64) -> bool {
        let set = lock(&self.isolated);
        set.contains(&to) || from.is_some_and(|f| set.contains(&f))
    }
}

/// The loopback address node `id` listens and dials from (module doc); ids 1..=254.
pub fn node_ip(id: u64) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 1, u8::try_from(id).unwrap_or(255)))
}

/// The node whose address a connection came from, if it is one's (`node_ip`).
fn node_of(ip: std::net::IpAddr) -> Option<u64> {
    match ip {
        std::net::IpAddr::V4(v4) => match v4.octets() {
            [127, 0, 1, id @ 1..=254] => Some(u64::from(id)),
            _ => None,
        },
        std::net::IpAddr::V6(_) => None,
    }
}

/// One relayed peer connection toward node `to`.
async fn relay(mut inbound: TcpStream, to: u64, dest: SocketAddr, part: Arc<Partition>) {
    let from = inbound.peer_addr().ok().and_then(|a| node_of(a.ip()));
    if part.blocked(from, to) {
        return; // dropped: the dialer sees a reset, as on a cut network
    }
    let Ok(mut outbound) = TcpStream::connect(dest).await else { return };
    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
    let mut changed = part.changed.subscribe();
    let cut = async {
        loop {
            if changed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if part.blocked(from, to) {
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = cut => {}
    }
}

/// Accepts peer connections for node `to` on `listener` and relays them to `dest`.
fn spawn_relay(listener: TcpListener, to: u64, dest: SocketAddr, part: Arc<Partition>, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    let (part, stop) = (part.clone(), stop.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = relay(stream, to, dest, part) => {}
                        }
                    });
                }
                // Out of file descriptors or similar: back off briefly (pacing, not a wait).
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
}

struct ProcNode {
    id: u64,
    /// The node's data dir.
    data: PathBuf,
    /// The node's log dir, holding the power-loss mode's `synced` record.
    log_dir: PathBuf,
    http: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
    child: Mutex<Option<Child>>,
    starts: Mutex<u32>,
}

/// A cluster of `raftbridge node` child processes on loopback (module doc).
pub struct ProcessCluster {
    exe: PathBuf,
    /// `false`: a power cut is only a SIGKILL (nothing unsynced is dropped); `--no-power-loss`.
    power_loss: bool,
    nodes: Vec<ProcNode>,
    partition: Arc<Partition>,
    stop: CancellationToken,
    unexpected: Mutex<Vec<String>>,
}

/// Free loopback ports for the nodes, chosen below the kernel's ephemeral range: a port from
/// `bind(:0)` is ephemeral, and before the node binds it an outgoing connection (the load's
/// clients, the nodes' dials) may take it. Random ports in 10000..32000, checked by binding the
/// wildcard address, which fails while any address holds the port: peer ports are used on the
/// node's own `node_ip`, not on 127.0.0.1. Returned on 127.0.0.1 (the HTTP listeners).
fn free_ports(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(n);
    for _ in 0..100_000 {
        if out.len() == n {
            return Ok(out);
        }
        let port = 10_000 + fastrand::u16(..22_000);
        if out.iter().any(|a| a.port() == port) {
            continue;
        }
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            out.push(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    anyhow::bail!("could not find {n} free loopback ports")
}

impl ProcessCluster {
    /// Prepares `n` nodes under `dir` and their relays; starts nothing.
    pub async fn new(exe: &Path, dir: &Path, n: usize, extra_flags: super::NodeFlags<'_>, power_loss: bool) -> anyhow::Result<ProcessCluster> {
        let partition = Arc::new(Partition::default());
        let stop = CancellationToken::new();
        let ports = free_ports(2 * n)?;
        let mut relays = Vec::new();
        for _ in 0..n {
            relays.push(TcpListener::bind("127.0.0.1:0").await.context("binding a relay port")?);
        }
        let relay_addrs: Vec<String> = relays.iter().map(|l| l.local_addr().map(|a| a.to_string())).collect::<Result<_, _>>()?;
        let seeds = relay_addrs.join(",");
        let mut nodes = Vec::new();
        for (i, relay) in relays.into_iter().enumerate() {
            let id = i as u64 + 1;
            let (peer, http) = (SocketAddr::new(node_ip(id), ports[i].port()), ports[n + i]);
            let data = dir.join(format!("n{id}"));
            std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
            let mut args: Vec<String> = [
                "node", "--id", &id.to_string(), "--data-dir", &data.display().to_string(),
                "--peer-addr", &peer.to_string(), "--peer-source-addr", &node_ip(id).to_string(), "--advertise", &relay_addrs[i], "--http-addr", &http.to_string(),
                "--seeds", &seeds, "--bootstrap-expect", &n.to_string(), "--cluster-name", "chaos", "--example-services",
                // Every node a founder and a voter: more than the default 5 is refused otherwise.
                "--max-voters", &n.max(5).to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            // Odd ids run one worker thread (the current-thread runtime), even ids the default
            // multi-thread one: the faults hit both runtimes and a cluster that mixes them.
            if id % 2 == 1 {
                args.extend(["--worker-threads".to_string(), "1".to_string()]);
            }
            args.extend(extra_flags(id));
            spawn_relay(relay, id, peer, partition.clone(), stop.clone());
            let log = dir.join(format!("n{id}.log"));
            nodes.push(ProcNode { id, log_dir: data.join("log"), data, http, args, log, child: Mutex::new(None), starts: Mutex::new(0) });
        }
        Ok(ProcessCluster { exe: exe.to_path_buf(), power_loss, nodes, partition, stop, unexpected: Mutex::new(Vec::new()) })
    }

    fn node(&self, id: u64) -> anyhow::Result<&ProcNode> {
        self.nodes.iter().find(|n| n.id == id).with_context(|| format!("no node {id}"))
    }

    fn pid(&self, id: u64) -> anyhow::Result<Option<u32>> {
        let node = self.node(id)?;
        let child = lock(&node.child);
        Ok(child.as_ref().and_then(|c| c.id()))
    }

    fn signal(&self, id: u64, sig: &str) -> anyhow::Result<()> {
        let Some(pid) = self.pid(id)? else { anyhow::bail!("node {id} is not running") };
        let status = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().context("running kill")?;
        anyhow::ensure!(status.success(), "kill -{sig} {pid} (node {id}) failed: {status}");
        Ok(())
    }

    /// Waits (bounded) for the node's process to exit; returns whether it did.
    async fn reap(&self, id: u64, deadline: Duration) -> anyhow::Result<bool> {
        let node = self.node(id)?;
        let Some(mut child) = lock(&node.child).take() else { return Ok(true) };
        match tokio::time::timeout(deadline, child.wait()).await {
            Ok(_) => Ok(true),
            Err(_) => {
                // Still running: put it back so that the caller can escalate.
                *lock(&node.child) = Some(child);
                Ok(false)
            }
        }
    }

    async fn sigkill(&self, id: u64) -> anyhow::Result<()> {
        self.signal(id, "KILL")?;
        anyhow::ensure!(self.reap(id, Duration::from_secs(10)).await?, "node {id} survived SIGKILL for 10 s");
        Ok(())
    }

    /// The nodes always run in the power-loss test mode (so that any kill *can* be a power cut);
    /// removing the sync record before a restart makes that restart a plain crash recovery.
    fn forget_sync_record(&self, id: u64) -> anyhow::Result<()> {
        let path = self.node(id)?.log_dir.join("synced");
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("removing {}", path.display())),
            _ => Ok(()),
        }
    }

    fn note(&self, id: u64, what: &str) {
        if let Ok(node) = self.node(id) {
            if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&node.log) {
                let _ = writeln!(f, "===== chaos: {what} =====");
            }
        }
    }
}

impl ClusterControl for ProcessCluster {
    fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    fn http_addr(&self, id: u64) -> String {
        self.nodes.iter().find(|n| n.id == id).map(|n| n.http.to_string()).unwrap_or_default()
    }

    fn supports_isolation(&self) -> bool {
        true
    }

    fn is_running(&self, id: u64) -> bool {
        let Ok(node) = self.node(id) else { return false };
        let mut slot = lock(&node.child);
        let exited = match slot.as_mut().map(|c| c.try_wait()) {
            None => return false,
            Some(Ok(None)) => return true,
            Some(Ok(Some(status))) => status.to_string(),
            Some(Err(e)) => format!("unknown ({e})"),
        };
        // Not reaped by us after a kill or stop: it died by itself (or was killed from outside).
        *slot = None;
        drop(slot);
        self.note(id, &format!("node exited unexpectedly: {exited}"));
        lock(&self.unexpected).push(format!("node {id}: {exited}"));
        false
    }

    fn unexpected_exits(&self) -> Vec<String> {
        lock(&self.unexpected).clone()
    }

    async fn start(&self, id: u64) -> anyhow::Result<()> {
        let node = self.node(id)?;
        let mut slot = lock(&node.child);
        anyhow::ensure!(slot.is_none(), "node {id} is already running");
        let starts = {
            let mut s = lock(&node.starts);
            *s += 1;
            *s
        };
        let mut log = OpenOptions::new().create(true).append(true).open(&node.log).with_context(|| format!("opening {}", node.log.display()))?;
        let _ = writeln!(log, "===== chaos: start #{starts} of node {id} =====");
        let stderr = log.try_clone()?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(&node.args).stdin(Stdio::null()).stdout(Stdio::from(log)).stderr(Stdio::from(stderr)).kill_on_drop(true);
        // Only our flags configure the node; the power-loss test mode is always on (module doc
        // of raft::log_store): every restart after a kill drops the unsynced log tail.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RAFTBRIDGE_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env(crate::raft::log_store::POWER_LOSS_ENV, "1").env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", crate::cli::DEFAULT_LOG);
        }
        *slot = Some(cmd.spawn().with_context(|| format!("spawning {}", self.exe.display()))?);
        Ok(())
    }

    async fn kill(&self, id: u64) -> anyhow::Result<()> {
        self.note(id, "SIGKILL (process crash)");
        self.sigkill(id).await?;
        self.forget_sync_record(id)
    }

    async fn power_cut(&self, id: u64) -> anyhow::Result<()> {
        if !self.power_loss {
            return self.kill(id).await;
        }
        self.note(id, "SIGKILL + power cut: unsynced log bytes are dropped at the next start");
        self.sigkill(id).await
    }

    async fn lose_data(&self, id: u64) -> anyhow::Result<()> {
        self.note(id, "SIGKILL + data dir deleted (a replaced disk)");
        self.sigkill(id).await?;
        empty_dir(&self.node(id)?.data)
    }

    fn power_loss_note(&self, id: u64) -> Option<String> {
        let log = std::fs::read_to_string(&self.node(id).ok()?.log).ok()?;
        let since_start = &log[log.rfind("===== chaos: start #")?..];
        let line = since_start.lines().find(|l| l.contains("power-loss test mode"))?;
        let line = strip_ansi(line);
        let field = |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name)).map(str::to_string);
        Some(match field("dropped_bytes=") {
            Some(n) => format!("{n} unsynced log bytes dropped at restart"),
            None => "no sync record yet: nothing dropped".to_string(),
        })
    }

    async fn stop_gracefully(&self, id: u64, deadline: Duration) -> anyhow::Result<bool> {
        self.note(id, "SIGTERM");
        self.signal(id, "TERM")?;
        let clean = self.reap(id, deadline).await?;
        if !clean {
            self.sigkill(id).await?;
        }
        self.forget_sync_record(id)?;
        Ok(clean)
    }

    async fn pause(&self, id: u64) -> anyhow::Result<()> {
        self.note(id, "SIGSTOP");
        self.signal(id, "STOP")
    }

    async fn resume(&self, id: u64) -> anyhow::Result<()> {
        self.signal(id, "CONT")?;
        self.note(id, "SIGCONT");
        Ok(())
    }

    async fn isolate(&self, id: u64) -> anyhow::Result<()> {
        self.note(id, "isolated from its peers");
        self.partition.set(id, true);
        Ok(())
    }

    async fn heal(&self, id: u64) -> anyhow::Result<()> {
        self.partition.set(id, false);
        self.note(id, "reconnected to its peers");
        Ok(())
    }

    async fn shutdown(&self) {
        self.stop.cancel();
        let started = Instant::now();
        for id in self.ids() {
            if self.is_running(id) {
                let _ = self.signal(id, "CONT");
                let _ = self.signal(id, "KILL");
                let left = Duration::from_secs(10).saturating_sub(started.elapsed());
                let _ = self.reap(id, left.max(Duration::from_millis(100))).await;
            }
        }
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        self.stop.cancel();
        // Children are `kill_on_drop`; a stopped child still dies of SIGKILL.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_nodes_apart_by_their_address() {
        for id in [1, 7, 254] {
            assert_eq!(node_of(node_ip(id)), Some(id));
        }
        assert_eq!(node_of("127.0.0.1".parse().unwrap()), None);
        assert_eq!(node_of("127.0.1.0".parse().unwrap()), None);
        assert_eq!(node_of("::1".parse().unwrap()), None);
    }

    #[test]
    fn strips_colours() {
        assert_eq!(strip_ansi("\u{1b}[3mdropped_bytes\u{1b}[0m\u{1b}[2m=\u{1b}[0m12 x"), "dropped_bytes=12 x");
    }

    #[test]
    fn isolation_blocks_both_directions_and_heals() {
        let p = Partition::default();
        p.set(2, true);
        assert!(p.blocked(Some(1), 2) && p.blocked(Some(2), 3) && p.blocked(None, 2));
        assert!(!p.blocked(Some(1), 3) && !p.blocked(None, 3));
        p.set(2, false);
        assert!(!p.blocked(Some(1), 2));
    }
}
