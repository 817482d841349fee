//! Docker mode of the chaos suite: every node is a container of the image (`raftbridge:dev` by
//! default, built by `deploy/build-image.sh`) on a private bridge network.
//!
//! - kill / power cut: `docker kill` (SIGKILL); restart: `docker start` of the same container,
//!   whose data dir is a host directory bind-mounted at `/data` (so the driver can remove the
//!   power-loss mode's `log/synced` record before a plain restart, exactly as in process mode);
//! - pause: `docker pause` (cgroup freezer: the process cannot even see SIGCONT coming);
//! - isolation: iptables rules entered in the container's network namespace with `nsenter` from
//!   the host, dropping every packet to or from peer port 7400 (a silent cut: links time out
//!   rather than reset). Client HTTP on 8400 keeps working, as in process mode. This needs root
//!   and `nsenter`/`iptables` on the host; without them isolation is reported as unavailable;
//! - graceful stop: `docker stop` (SIGTERM, then SIGKILL after the grace time).
//!
//! Client HTTP reaches each node through a fixed host port (`127.0.0.1:<free port>:8400`), so the
//! address stays the same across restarts. Containers, the network and the data dirs are removed
//! at the end (also from `Drop`); container logs are saved to `<workdir>/n<id>.log` first.

use crate::lock;
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;

use super::cluster::ClusterControl;

const PEER_PORT: u16 = 7400;
const HTTP_PORT: u16 = 8400;
/// The image's user (deploy/Dockerfile): owns the bind-mounted data dirs.
const IMAGE_UID: u32 = 10001;

struct DockerNode {
    id: u64,
    name: String,
    host_port: u16,
    data: PathBuf,
    /// Created (first `docker run` done).
    created: Mutex<bool>,
    /// Power-loss log lines seen before the latest start (to find the new one).
    notes_before: Mutex<usize>,
}

pub struct DockerCluster {
    image: String,
    network: String,
    workdir: PathBuf,
    nodes: Vec<DockerNode>,
    args: Vec<Vec<String>>,
    power_loss: bool,
    /// Isolation works here: the tools are on the host and (checked once a container runs,
    /// `probe_isolation`) may enter a container's network namespace. Cleared if they may not
    /// (rootless Docker, the suite inside a container on the host's socket): then isolation is
    /// unavailable in this mode rather than every isolation fault failing.
    isolation: std::sync::atomic::AtomicBool,
    /// `probe_isolation` ran.
    probed: std::sync::atomic::AtomicBool,
}

/// Runs `docker <args>`; returns stdout, or an error with stderr.
fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker").args(args).output().context("running docker")?;
    anyhow::ensure!(
        out.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Removes a Docker network when dropped, unless [`NetworkGuard::keep`] handed it on: a step of
/// [`DockerCluster::new`] that fails after `docker network create` must not leave the network
/// behind (once the cluster exists, its `shutdown` and `Drop` remove it).
struct NetworkGuard {
    name: Option<String>,
}

impl NetworkGuard {
    fn keep(mut self) -> String {
        self.name.take().unwrap_or_default()
    }
}

impl Drop for NetworkGuard {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            let _ = Command::new("docker").args(["network", "rm", &name]).output();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl DockerCluster {
    /// Creates the network and prepares `n` nodes (nothing runs yet).
    pub fn new(image: &str, workdir: &Path, n: usize, extra_flags: super::NodeFlags<'_>, power_loss: bool) -> anyhow::Result<DockerCluster> {
        docker(&["image", "inspect", image]).with_context(|| format!("image {image} not found: build it with deploy/build-image.sh"))?;
        let tag = format!("raftbridge-chaos-{}", std::process::id());
        docker(&["network", "create", &tag])?;
        let network = NetworkGuard { name: Some(tag.clone()) };
        let seeds: Vec<String> = (1..=n).map(|i| format!("{tag}-n{i}:{PEER_PORT}")).collect();
        let mut nodes = Vec::new();
        let mut args = Vec::new();
        for i in 1..=n as u64 {
            let name = format!("{tag}-n{i}");
            let data = workdir.join(format!("n{i}"));
            std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
            // Docker takes a relative path for a volume name: bind mounts need absolute paths.
            let data = std::fs::canonicalize(&data).with_context(|| format!("resolving {}", data.display()))?;
            // The container runs as the image's user; root on the host can hand it the dir.
            std::os::unix::fs::chown(&data, Some(IMAGE_UID), Some(IMAGE_UID)).with_context(|| format!("chown {}", data.display()))?;
            let mut a: Vec<String> = [
                "node", "--id", &i.to_string(), "--data-dir", "/data",
                "--peer-addr", &format!("0.0.0.0:{PEER_PORT}"), "--advertise", &format!("{name}:{PEER_PORT}"),
                "--http-addr", &format!("0.0.0.0:{HTTP_PORT}"), "--seeds", &seeds.join(","),
                "--bootstrap-expect", &n.to_string(), "--cluster-name", "chaos", "--example-services",
                // Every node a founder and a voter: more than the default 5 is refused otherwise.
                "--max-voters", &n.max(5).to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            a.extend(extra_flags(i));
            args.push(a);
            nodes.push(DockerNode {
                id: i,
                name,
                host_port: free_port()?,
                data,
                created: Mutex::new(false),
                notes_before: Mutex::new(0),
            });
        }
        let isolation = Command::new("nsenter").arg("--version").output().is_ok_and(|o| o.status.success())
            && Command::new("iptables").arg("--version").output().is_ok_and(|o| o.status.success());
        let (isolation, probed) = (std::sync::atomic::AtomicBool::new(isolation), std::sync::atomic::AtomicBool::new(false));
        Ok(DockerCluster { image: image.to_string(), network: network.keep(), workdir: workdir.to_path_buf(), nodes, args, power_loss, isolation, probed })
    }

    fn node(&self, id: u64) -> anyhow::Result<&DockerNode> {
        self.nodes.iter().find(|n| n.id == id).with_context(|| format!("no node {id}"))
    }

    fn running(&self, id: u64) -> bool {
        self.node(id)
            .ok()
            .and_then(|n| docker(&["inspect", "-f", "{{.State.Running}}", &n.name]).ok())
            .is_some_and(|s| s == "true")
    }

    /// Polls until the container stopped (bounded).
    async fn wait_stopped(&self, id: u64, deadline: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < deadline {
            if !self.running(id) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    fn forget_sync_record(&self, id: u64) -> anyhow::Result<()> {
        let path = self.node(id)?.data.join("log").join("synced");
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("removing {}", path.display())),
            _ => Ok(()),
        }
    }

    fn logs(&self, id: u64) -> String {
        self.node(id)
            .ok()
            .and_then(|n| Command::new("docker").args(["logs", &n.name]).output().ok())
            .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
            .unwrap_or_default()
    }

    /// Once, with the first container running: lists the iptables rules in its network
    /// namespace as isolation would enter it; if that fails, isolation is unavailable.
    fn probe_isolation(&self, id: u64) {
        use std::sync::atomic::Ordering;
        if !self.supports_isolation() || self.probed.swap(true, Ordering::SeqCst) {
            return;
        }
        let pid = self.node(id).and_then(|n| docker(&["inspect", "-f", "{{.State.Pid}}", &n.name]));
        if !pid.as_deref().is_ok_and(|p| p != "0") {
            // Not running (a node that crashed on start): no conclusion, the next start probes.
            self.probed.store(false, Ordering::SeqCst);
            return;
        }
        let entered = pid.and_then(|pid| {
            let out = Command::new("nsenter").args(["-t", &pid, "-n", "iptables", "-S"]).output().context("running nsenter iptables")?;
            anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr).trim());
            Ok(())
        });
        if let Err(e) = entered {
            println!("chaos: isolation unavailable: cannot enter a container's network namespace ({e:#})");
            self.isolation.store(false, Ordering::SeqCst);
        }
    }

    /// iptables rules dropping peer traffic in the container's network namespace.
    fn peer_rules(&self, id: u64, op: &str) -> anyhow::Result<()> {
        let name = &self.node(id)?.name;
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", name])?;
        anyhow::ensure!(pid != "0", "container {name} is not running");
        let port = PEER_PORT.to_string();
        for (chain, dir) in [("INPUT", "--dport"), ("INPUT", "--sport"), ("OUTPUT", "--dport"), ("OUTPUT", "--sport")] {
            let out = Command::new("nsenter")
                .args(["-t", &pid, "-n", "iptables", op, chain, "-p", "tcp", dir, &port, "-j", "DROP"])
                .output()
                .context("running nsenter iptables")?;
            anyhow::ensure!(
                out.status.success(),
                "nsenter -t {pid} -n iptables {op} {chain}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn remove_all(&self) {
        for n in &self.nodes {
            let logs = self.logs(n.id);
            let _ = std::fs::write(self.workdir.join(format!("n{}.log", n.id)), logs);
            let _ = Command::new("docker").args(["rm", "-f", &n.name]).output();
        }
        let _ = Command::new("docker").args(["network", "rm", &self.network]).output();
    }
}

impl ClusterControl for DockerCluster {
    fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    fn http_addr(&self, id: u64) -> String {
        self.node(id).map(|n| format!("127.0.0.1:{}", n.host_port)).unwrap_or_default()
    }

    fn supports_isolation(&self) -> bool {
        self.isolation.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn is_running(&self, id: u64) -> bool {
        self.running(id)
    }

    async fn start(&self, id: u64) -> anyhow::Result<()> {
        let node = self.node(id)?;
        *lock(&node.notes_before) = self.logs(id).matches("power-loss test mode").count();
        let mut created = lock(&node.created);
        if *created {
            docker(&["start", &node.name])?;
            return Ok(());
        }
        let mount = format!("{}:/data", node.data.display());
        let publish = format!("127.0.0.1:{}:{HTTP_PORT}", node.host_port);
        let env = format!("{}=1", crate::raft::log_store::POWER_LOSS_ENV);
        let mut run: Vec<&str> = vec![
            "run", "-d", "--name", &node.name, "--hostname", &node.name, "--network", &self.network,
            "-p", &publish, "-v", &mount, "-e", &env, "--no-healthcheck", &self.image,
        ];
        let idx = (id - 1) as usize;
        run.extend(self.args[idx].iter().map(String::as_str));
        docker(&run)?;
        *created = true;
        drop(created);
        self.probe_isolation(id);
        Ok(())
    }

    async fn kill(&self, id: u64) -> anyhow::Result<()> {
        docker(&["kill", &self.node(id)?.name])?;
        anyhow::ensure!(self.wait_stopped(id, Duration::from_secs(10)).await, "node {id} still running 10 s after docker kill");
        self.forget_sync_record(id)
    }

    async fn power_cut(&self, id: u64) -> anyhow::Result<()> {
        if !self.power_loss {
            return self.kill(id).await;
        }
        docker(&["kill", &self.node(id)?.name])?;
        anyhow::ensure!(self.wait_stopped(id, Duration::from_secs(10)).await, "node {id} still running 10 s after docker kill");
        Ok(())
    }

    async fn lose_data(&self, id: u64) -> anyhow::Result<()> {
        self.kill(id).await?;
        super::cluster::empty_dir(&self.node(id)?.data)
    }

    fn power_loss_note(&self, id: u64) -> Option<String> {
        let before = *lock(&self.node(id).ok()?.notes_before);
        let logs = self.logs(id);
        let line = logs.lines().filter(|l| l.contains("power-loss test mode")).nth(before)?;
        let dropped = line.split_whitespace().find_map(|w| w.strip_prefix("dropped_bytes="));
        Some(match dropped {
            Some(n) => format!("{n} unsynced log bytes dropped at restart"),
            None => "no sync record yet: nothing dropped".to_string(),
        })
    }

    async fn stop_gracefully(&self, id: u64, deadline: Duration) -> anyhow::Result<bool> {
        let name = &self.node(id)?.name;
        docker(&["stop", "-t", &deadline.as_secs().max(1).to_string(), name])?;
        let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", name])?;
        self.forget_sync_record(id)?;
        Ok(code == "0")
    }

    async fn pause(&self, id: u64) -> anyhow::Result<()> {
        docker(&["pause", &self.node(id)?.name]).map(|_| ())
    }

    async fn resume(&self, id: u64) -> anyhow::Result<()> {
        let name = &self.node(id)?.name;
        if docker(&["inspect", "-f", "{{.State.Paused}}", name])? == "true" {
            docker(&["unpause", name])?;
        }
        Ok(())
    }

    async fn isolate(&self, id: u64) -> anyhow::Result<()> {
        anyhow::ensure!(self.supports_isolation(), "isolation needs nsenter and iptables on the host");
        self.peer_rules(id, "-A")
    }

    async fn heal(&self, id: u64) -> anyhow::Result<()> {
        if !self.supports_isolation() || !self.running(id) {
            return Ok(());
        }
        // Remove every copy of the rules (a rule absent is fine).
        for _ in 0..4 {
            if self.peer_rules(id, "-D").is_err() {
                break;
            }
        }
        Ok(())
    }

    async fn shutdown(&self) {
        self.remove_all();
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        // Idempotent: after `shutdown` the containers and network are already gone.
        let _ = Command::new("docker").args(["rm", "-f"]).args(self.nodes.iter().map(|n| n.name.as_str())).output();
        let _ = Command::new("docker").args(["network", "rm", &self.network]).output();
    }
}
