//! `raftbridge chaos`: the chaos suite. It starts a cluster, runs a steady mixed load, injects
//! faults on a schedule drawn from `--seed`, heals everything, and then checks by content that
//! nothing acknowledged was lost, nothing happened twice and every node holds the same state.
//!
//! Why a subcommand of the node binary: the suite needs the exact binary under test, the
//! project's HTTP client and its peer layer's source addresses (for isolation), and CI needs one command.
//! `deploy/chaos/run` wraps it (builds the release binary, maps `--duration 120` to seconds).
//!
//! Parts: [`schedule`] (the seeded fault plan), [`cluster`] (process control behind the
//! [`cluster::ClusterControl`] trait, isolation relay), [`workload`] (clients and the record of
//! every operation), [`checker`] (verification and the report table). This module is the driver
//! and owns the timeline; anyhow is used here as in the CLI.
//!
//! Faults and healing are real: SIGKILL / SIGSTOP / SIGTERM on the node processes, peer links cut
//! by the relay, and the storage layer's test-only power-loss mode (see `raft::log_store`) for a
//! power cut. Waits for conditions poll with deadlines; sleeps only set fault durations and pace.

pub mod checker;
pub mod cluster;
pub mod docker;
pub mod schedule;
pub mod workload;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;

/// The flags a chaos cluster adds to node `id`'s command line (per-node certificates differ).
pub type NodeFlags<'a> = &'a (dyn Fn(u64) -> Vec<String> + Sync);
use bytes::Bytes;
use http::Method;
use tokio_util::sync::CancellationToken;

use self::checker::FaultRow;
use self::checker::NodeView;
use self::checker::Observed;
use self::checker::Read;
use self::cluster::ClusterControl;
use self::cluster::ProcessCluster;
use self::docker::DockerCluster;
use self::schedule::FaultKind;
use self::schedule::PlannedFault;
use self::workload::Client;
use self::workload::Load;
use self::workload::Records;
use self::workload::Reply;

/// Where the nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Child processes on loopback (works everywhere; the default, and what CI runs).
    Process,
    /// Containers of `--image` on a private Docker network (isolation with nsenter + iptables).
    Docker,
}

#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Length of the fault phase: `120` (seconds), `120s`, `10m`.
    #[arg(long, default_value = "120s", value_parser = crate::config::parse_duration)]
    pub duration: Duration,
    /// Seed of the fault schedule and the load.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = Mode::Process)]
    pub mode: Mode,
    /// The `raftbridge` binary to run as nodes (default: this binary; process mode).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// The node image (docker mode; `deploy/build-image.sh` builds it).
    #[arg(long, default_value = "raftbridge:dev")]
    pub image: String,
    /// Directory for node data, logs and `report.txt` (kept). Default: a temp dir, removed
    /// after a passing run. An existing one is cleared first only when it is empty or an
    /// earlier chaos run made it (its `.raftbridge-chaos` marker); any other is refused.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Snapshot threshold given to the nodes (low, so that snapshots and purges happen).
    #[arg(long, default_value_t = 5000)]
    pub snapshot_threshold: u64,
    /// Power cuts become plain SIGKILLs (nothing unsynced is dropped): tells storage-level
    /// findings from the rest.
    #[arg(long)]
    pub no_power_loss: bool,
    /// Peer links over mutual TLS (process mode): a throwaway CA in the workdir and a
    /// certificate per node, bound to its id (required), under one shared name
    /// (`--peer-tls-server-name`), so the faults also hit TLS handshakes, the id check,
    /// reconnects and half-closed TLS streams.
    #[arg(long)]
    pub tls: bool,
}


/// Time allowed for the whole cluster to become ready (start, after faults).
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// Time allowed for the cluster to heal after one fault before the next.
const HEAL_DEADLINE: Duration = Duration::from_secs(30);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for finishing the keyed increments the load left unanswered.
const FINISH_DEADLINE: Duration = Duration::from_secs(60);

/// What happened during one fault.
#[derive(Debug, Clone)]
struct FaultRecord {
    kind: FaultKind,
    /// ms since the load started.
    start_ms: u64,
    /// When the cluster was ready again (or the heal deadline passed).
    end_ms: u64,
    note: String,
    /// The fault was carried out (not skipped as unavailable in this mode, no injection error).
    injected: bool,
    /// Why carrying out or undoing the fault failed (a kill, pause, isolation or restart).
    error: Option<String>,
    /// Why healing every node afterwards (resume, start, reconnect) failed.
    heal_error: Option<String>,
    /// The whole cluster was ready within [`HEAL_DEADLINE`] after it.
    ready: bool,
}

/// The failures of fault control: a fault that was not carried out or not undone is not a fault
/// the run survived, and a run in which no fault happened tested nothing. A cluster slow to be
/// ready after a fault is not one of them: that is availability, reported as a note, and nodes
/// that stay unready or disagree fail the final check (`checker::check_nodes`).
fn fault_problems(faults: &[FaultRecord]) -> Vec<String> {
    let at = |f: &FaultRecord| format!("{} at t={:.1}s", f.kind, f.start_ms as f64 / 1000.0);
    let mut out = Vec::new();
    for f in faults {
        if let Some(e) = &f.error {
            out.push(format!("fault {} failed: {e}", at(f)));
        }
        if let Some(e) = &f.heal_error {
            out.push(format!("healing after fault {} failed: {e}", at(f)));
        }
    }
    if !faults.iter().any(|f| f.injected) {
        out.push(format!("no fault was injected ({} planned, none carried out): the run tested nothing", faults.len()));
    }
    out
}

/// Faults this cluster cannot inject (isolation without a way to cut links): skipped, and they
/// count as no fault.
fn unavailable<C: ClusterControl>(cluster: &C, kind: FaultKind) -> bool {
    matches!(kind, FaultKind::Isolate | FaultKind::IsolateLeader) && !cluster.supports_isolation()
}

/// The file a run writes into its workdir: a later run may clear a directory holding it.
const WORKDIR_MARKER: &str = ".raftbridge-chaos";

/// Whether the existing directory `dir` may be cleared for a run: it is empty, or an earlier
/// run made it (`WORKDIR_MARKER` is in it). Anything else may be someone's files.
fn may_clear(dir: &Path) -> anyhow::Result<bool> {
    if dir.join(WORKDIR_MARKER).is_file() {
        return Ok(true);
    }
    let mut entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    Ok(entries.next().is_none())
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 3, "--nodes must be at least 3 (a minority must be able to fail)");
    // Process mode gives node N the loopback address 127.0.1.N (`cluster::node_ip`).
    anyhow::ensure!(args.nodes <= 254, "--nodes must be at most 254");
    anyhow::ensure!(!(args.tls && args.mode == Mode::Docker), "--tls runs in process mode only");
    anyhow::ensure!(
        !schedule::plan(args.seed, args.duration, args.nodes).is_empty(),
        "--duration {} s leaves no time for a fault (more than {} s are needed)",
        args.duration.as_secs(),
        (schedule::WARMUP + schedule::TAIL).as_secs()
    );
    let exe = match &args.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("locating this binary")?,
    };
    let (workdir, temp) = match &args.workdir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(format!("raftbridge-chaos-{}-{}", args.seed, std::process::id())), true),
    };
    if workdir.exists() {
        // A previous run's data would make the nodes rejoin an old cluster. But `--workdir .` or
        // `~` names someone's files: only an empty directory or one a run made is cleared, and
        // emptied rather than removed (it may be the current directory or a mount point).
        anyhow::ensure!(
            may_clear(&workdir)?,
            "--workdir {}: not empty and not made by a chaos run (no {} in it); give a new or empty directory",
            workdir.display(),
            WORKDIR_MARKER
        );
        cluster::empty_dir(&workdir).with_context(|| format!("clearing {}", workdir.display()))?;
    }
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    // From here the directory holds this run's files: the marker lets a later run clear it.
    let marker = workdir.join(WORKDIR_MARKER);
    std::fs::write(&marker, "made by `raftbridge chaos`: a later run with this --workdir clears this directory\n")
        .with_context(|| format!("writing {}", marker.display()))?;
    let common = vec![
        "--snapshot-threshold".to_string(),
        args.snapshot_threshold.to_string(),
        "--shutdown-grace-ms".to_string(),
        "5000".to_string(),
        // The checker reads the whole event log: nothing may age out by count during the run.
        "--events-max-count".to_string(),
        "10000000".to_string(),
    ];
    let pki = workdir.join("pki");
    if args.tls {
        // One certificate per node, bound to its id and required to be: every restart and
        // rejoin of the run goes through that check too.
        for id in 1..=args.nodes as u64 {
            crate::peer::tls::issue(&pki, &format!("chaos-{id}"), &["chaos-peers".to_string()], 2, Some(id))
                .context("making the chaos run's certificates")?;
        }
    }
    let node_flags = |id: u64| {
        let mut flags = common.clone();
        if args.tls {
            let file = |name: &str| pki.join(name).display().to_string();
            flags.extend([
                "--peer-tls-require-node-id".to_string(),
                "--peer-tls-cert".to_string(),
                file(&format!("chaos-{id}.pem")),
                "--peer-tls-key".to_string(),
                file(&format!("chaos-{id}-key.pem")),
                "--peer-tls-ca".to_string(),
                file(crate::peer::tls::CA_CERT),
                "--peer-tls-server-name".to_string(),
                "chaos-peers".to_string(),
            ]);
        }
        flags
    };
    println!(
        "chaos: {} nodes, fault phase {} s, seed {}, mode {:?}{}, {}, workdir {}",
        args.nodes,
        args.duration.as_secs(),
        args.seed,
        args.mode,
        if args.tls { " with peer TLS" } else { "" },
        match args.mode {
            Mode::Process => format!("binary {}", exe.display()),
            Mode::Docker => format!("image {}", args.image),
        },
        workdir.display()
    );
    let outcome = match args.mode {
        Mode::Process => {
            let cluster = ProcessCluster::new(&exe, &workdir, args.nodes, &node_flags, !args.no_power_loss).await?;
            run_with(cluster, &args, &workdir).await
        }
        Mode::Docker => {
            let cluster = DockerCluster::new(&args.image, &workdir, args.nodes, &node_flags, !args.no_power_loss)?;
            run_with(cluster, &args, &workdir).await
        }
    };
    // Node data is kept after a failed check, for inspecting the logs and snapshots.
    if !matches!(outcome, Ok(false)) {
        for id in 1..=args.nodes {
            let _ = std::fs::remove_dir_all(workdir.join(format!("n{id}")));
        }
    }
    match outcome {
        Ok(true) => {
            if temp {
                let _ = std::fs::remove_dir_all(&workdir);
            }
            Ok(())
        }
        Ok(false) => anyhow::bail!("chaos check FAILED (node logs, data dirs and report.txt in {})", workdir.display()),
        Err(e) => Err(e.context(format!("chaos run aborted (node logs in {})", workdir.display()))),
    }
}

/// Runs the suite on a prepared cluster and tears it down (also on Ctrl-C, and on SIGTERM as a
/// CI timeout sends: without a handler it would end this process and leave the nodes running).
async fn run_with<C: ClusterControl>(cluster: C, args: &ChaosArgs, workdir: &Path) -> anyhow::Result<bool> {
    // Registered before the run starts, so that a SIGTERM from now on is caught.
    let term = sigterm();
    let outcome = tokio::select! {
        r = drive(&cluster, args, workdir) => r,
        why = interrupted(term) => Err(anyhow::anyhow!("interrupted by {why}")),
    };
    cluster.shutdown().await;
    drop(cluster);
    outcome
}

/// SIGTERM's handler; `None` (and a warning) when it cannot be installed.
fn sigterm() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "chaos: cannot handle SIGTERM: it would leave the nodes running");
            None
        }
    }
}

/// Resolves when Ctrl-C (SIGINT) or SIGTERM arrives, naming it; never if neither can be handled.
async fn interrupted(mut term: Option<tokio::signal::unix::Signal>) -> &'static str {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        let got = match term.as_mut() {
            Some(t) => t.recv().await.is_some(),
            None => false,
        };
        // No handler, or (`None` from `recv`) the signal driver is gone: no SIGTERM will come.
        if !got {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = ctrl_c => "Ctrl-C",
        _ = term => "SIGTERM",
    }
}

/// The whole run against a prepared cluster; returns whether the check passed.
async fn drive<C: ClusterControl>(cluster: &C, args: &ChaosArgs, workdir: &Path) -> anyhow::Result<bool> {
    let ids = cluster.ids();
    for &id in &ids {
        cluster.start(id).await?;
    }
    anyhow::ensure!(wait_ready(cluster, &ids, READY_DEADLINE).await, "the cluster did not become ready in {READY_DEADLINE:?}");
    println!("chaos: cluster ready, leader {:?}", find_leader(cluster).await);

    let addrs: Vec<String> = ids.iter().map(|&id| cluster.http_addr(id)).collect();
    let load = Load { addrs: addrs.clone(), seed: args.seed, started: Instant::now(), stop: CancellationToken::new() };
    // The events API is always built in: a run without its event load checks less, and fails.
    let probe = workload::probe_events(&load).await.context("the event workload could not start")?;
    println!("chaos: events API answers (probe event {:?})", probe.id);
    let mut load_task = tokio::spawn(workload::run(load.clone()));

    let plan = schedule::plan(args.seed, args.duration, ids.len());
    let mut faults = Vec::new();
    for planned in &plan {
        let due = load.started + planned.at;
        tokio::time::sleep_until(due.into()).await;
        let start_ms = load.started.elapsed().as_millis() as u64;
        println!("chaos: t={:>5.1}s {} ...", start_ms as f64 / 1000.0, planned.kind);
        let (note, error) = match inject(cluster, planned, &ids).await {
            Ok(note) => (note, None),
            Err(e) => (format!("INJECTION FAILED: {e:#}"), Some(format!("{e:#}"))),
        };
        let injected = error.is_none() && !unavailable(cluster, planned.kind);
        let heal_error = heal_all(cluster, &ids).await.err().map(|e| format!("{e:#}"));
        let ready = wait_ready(cluster, &ids, HEAL_DEADLINE).await;
        let end_ms = load.started.elapsed().as_millis() as u64;
        let healed = match (&heal_error, ready) {
            (Some(e), _) => format!("healing FAILED ({e}); cluster {}", if ready { "ready" } else { "NOT ready" }),
            (None, true) => "healed".to_string(),
            (None, false) => "NOT ready".to_string(),
        };
        println!("chaos:          {note}; {healed} after {:.1} s", (end_ms - start_ms) as f64 / 1000.0);
        faults.push(FaultRecord { kind: planned.kind, start_ms, end_ms, note, injected, error, heal_error, ready });
        load_ended_early(&mut load_task).await?;
    }
    tokio::time::sleep_until((load.started + args.duration).into()).await;
    load_ended_early(&mut load_task).await?;

    // Faults are over: heal, stop the load, let the cluster settle, then check.
    heal_all(cluster, &ids).await?;
    load.stop.cancel();
    let mut records = match tokio::time::timeout(Duration::from_secs(60), load_task).await {
        Ok(Ok(Ok(r))) => r,
        Ok(Ok(Err(e))) => return Err(e.context("the load failed")),
        Ok(Err(e)) => anyhow::bail!("the load task failed: {e}"),
        Err(_) => anyhow::bail!("the load did not stop within 60 s"),
    };
    records.events.push(probe);
    let ready = wait_ready(cluster, &ids, READY_DEADLINE).await;
    println!("chaos: faults over, load stopped; cluster {}", if ready { "ready" } else { "NOT ready" });
    finish_keyed(&addrs, &mut records, FINISH_DEADLINE).await;
    let converged = wait_converged(cluster, &ids, READY_DEADLINE).await;
    println!("chaos: nodes {}", if converged { "converged" } else { "did NOT converge" });
    let observed = observe(cluster, &ids, &records).await;
    let mut verdict = checker::check(&records, &observed);
    verdict.problems.extend(fault_problems(&faults));
    for exit in cluster.unexpected_exits() {
        verdict.problems.push(format!("a node exited without a fault telling it to ({exit}): a crash, or killed from outside the suite"));
    }

    let diverging = if verdict.divergent { diff_known_keys(cluster, &ids, &records).await } else { Vec::new() };

    let rows = fault_rows(&faults, &records.ack_ms, cluster.supports_isolation());
    let header = format!(
        "raftbridge chaos report: {} nodes, {} s fault phase, seed {}, mode {:?}, {} faults{}",
        ids.len(),
        args.duration.as_secs(),
        args.seed,
        args.mode,
        faults.len(),
        if args.no_power_loss { ", --no-power-loss (power cuts are plain kills)" } else { "" }
    );
    let mut report = checker::render(&header, &rows, &verdict);
    let unhealed: Vec<String> = faults.iter().filter(|f| !f.ready).map(|f| format!("{} at {} ms", f.kind, f.start_ms)).collect();
    if !unhealed.is_empty() {
        report.push_str(&format!("note: the cluster was not ready within {HEAL_DEADLINE:?} after: {}\n", unhealed.join(", ")));
    }
    if !diverging.is_empty() {
        report.push_str("keys that differ between nodes (stale local reads: status, x-revision, value):\n");
        for line in &diverging {
            report.push_str(&format!("  {line}\n"));
        }
    }
    report.push_str("\nfault log:\n");
    for f in &faults {
        report.push_str(&format!("  t={:>6.1}s  {:<18} {:>5.1} s  {}\n", f.start_ms as f64 / 1000.0, f.kind.name(), (f.end_ms - f.start_ms) as f64 / 1000.0, f.note));
    }
    println!("\n{report}");
    let path = workdir.join("report.txt");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    Ok(verdict.passed())
}

/// The load runs until the driver stops it: if it ended during the fault phase, a task of it
/// failed and what that task acknowledged cannot be checked, so the run is aborted.
async fn load_ended_early(load_task: &mut tokio::task::JoinHandle<anyhow::Result<Records>>) -> anyhow::Result<()> {
    if !load_task.is_finished() {
        return Ok(());
    }
    let why = match load_task.await {
        Ok(Ok(_)) => "it stopped by itself".to_string(),
        Ok(Err(e)) => format!("{e:#}"),
        Err(e) => e.to_string(),
    };
    anyhow::bail!("the load ended during the fault phase: {why}")
}

/// Carries out one fault, including its hold time and the undoing of it; returns a note.
async fn inject<C: ClusterControl>(cluster: &C, f: &PlannedFault, ids: &[u64]) -> anyhow::Result<String> {
    let random = ids[f.node_index % ids.len()]; // `run` ensures at least 3 nodes
    let leader_or_random = || async {
        match find_leader(cluster).await {
            Some(l) => (l, "leader".to_string()),
            None => (random, "no leader known: random".to_string()),
        }
    };
    let hold = f.hold;
    Ok(match f.kind {
        FaultKind::KillRandom => {
            cluster.kill(random).await?;
            tokio::time::sleep(hold).await;
            cluster.start(random).await?;
            format!("node {random} SIGKILLed, down {:.1} s", hold.as_secs_f64())
        }
        FaultKind::KillLeader => {
            let (id, what) = leader_or_random().await;
            cluster.kill(id).await?;
            let new_leader = wait_new_leader(cluster, ids, id, hold).await;
            tokio::time::sleep(hold.saturating_sub(new_leader.map_or(hold, |(_, t)| t))).await;
            cluster.start(id).await?;
            format!("node {id} ({what}) SIGKILLed, down {:.1} s; {}", hold.as_secs_f64(), describe_leader(new_leader))
        }
        FaultKind::PowerLoss => {
            cluster.power_cut(random).await?;
            tokio::time::sleep(hold).await;
            cluster.start(random).await?;
            let dropped = wait_power_loss_note(cluster, random).await;
            format!("node {random} power cut, down {:.1} s; {dropped}", hold.as_secs_f64())
        }
        FaultKind::LoseData => {
            cluster.lose_data(random).await?;
            tokio::time::sleep(hold).await;
            cluster.start(random).await?;
            format!("node {random} SIGKILLed and its data dir deleted, down {:.1} s", hold.as_secs_f64())
        }
        FaultKind::Pause => {
            cluster.pause(random).await?;
            tokio::time::sleep(hold).await;
            cluster.resume(random).await?;
            format!("node {random} paused for {:.1} s", hold.as_secs_f64())
        }
        kind if unavailable(cluster, kind) => {
            "skipped: isolation is not available in this mode".to_string()
        }
        FaultKind::Isolate | FaultKind::IsolateLeader => {
            let (id, what) = if f.kind == FaultKind::Isolate { (random, "random".to_string()) } else { leader_or_random().await };
            let leader_before = find_leader(cluster).await;
            cluster.isolate(id).await?;
            let leader = if leader_before == Some(id) {
                let new_leader = wait_new_leader(cluster, ids, id, hold).await;
                tokio::time::sleep(hold.saturating_sub(new_leader.map_or(hold, |(_, t)| t))).await;
                describe_leader(new_leader)
            } else {
                tokio::time::sleep(hold).await;
                format!("it was not the leader ({leader_before:?})")
            };
            cluster.heal(id).await?;
            format!("node {id} ({what}) cut off for {:.1} s; {leader}", hold.as_secs_f64())
        }
        FaultKind::KillAll => {
            for &id in ids {
                cluster.power_cut(id).await?;
            }
            tokio::time::sleep(hold).await;
            for &id in ids {
                cluster.start(id).await?;
            }
            let mut notes = Vec::new();
            for &id in ids {
                notes.push(format!("{id}: {}", wait_power_loss_note(cluster, id).await));
            }
            format!("all nodes power cut, down {:.1} s ({})", hold.as_secs_f64(), notes.join("; "))
        }
        FaultKind::RollingRestart => {
            let mut notes = Vec::new();
            for &id in ids {
                let t = Instant::now();
                let clean = cluster.stop_gracefully(id, Duration::from_secs(20)).await?;
                cluster.start(id).await?;
                let ready = wait_ready(cluster, &[id], HEAL_DEADLINE).await;
                notes.push(format!(
                    "{id}: {}{} {:.1} s",
                    if clean { "drained" } else { "KILLED after 20 s" },
                    if ready { ", ready in" } else { ", NOT ready after" },
                    t.elapsed().as_secs_f64()
                ));
            }
            format!("SIGTERM + restart one by one ({})", notes.join("; "))
        }
    })
}

fn describe_leader(l: Option<(u64, Duration)>) -> String {
    match l {
        Some((id, t)) => format!("node {id} leads after {} ms", t.as_millis()),
        None => "no other leader seen during the fault".to_string(),
    }
}

/// Polls the nodes other than `gone` until one reports a leader other than `gone` (bounded).
async fn wait_new_leader<C: ClusterControl>(cluster: &C, ids: &[u64], gone: u64, within: Duration) -> Option<(u64, Duration)> {
    let t = Instant::now();
    let others: Vec<u64> = ids.iter().copied().filter(|&i| i != gone).collect();
    while t.elapsed() < within {
        for &id in &others {
            if let Some(view) = cluster_view(cluster, id, Duration::from_millis(300)).await {
                if let Some(l) = view["leader"].as_u64().filter(|&l| l != gone) {
                    return Some((l, t.elapsed()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// What the power-loss mode logged when the node reopened its log (bounded wait for the line).
async fn wait_power_loss_note<C: ClusterControl>(cluster: &C, id: u64) -> String {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Some(note) = cluster.power_loss_note(id) {
            return note;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    "power-loss note not found in the node log".to_string()
}

async fn heal_all<C: ClusterControl>(cluster: &C, ids: &[u64]) -> anyhow::Result<()> {
    for &id in ids {
        if cluster.is_running(id) {
            cluster.resume(id).await?;
        } else {
            cluster.start(id).await?;
        }
        cluster.heal(id).await?;
    }
    Ok(())
}

async fn cluster_view<C: ClusterControl>(cluster: &C, id: u64, timeout: Duration) -> Option<serde_json::Value> {
    let mut conn = crate::client::Conn::new(cluster.http_addr(id));
    let r = conn.get("/cluster", timeout).await.ok().filter(|r| r.is_success())?;
    r.json().ok()
}

async fn is_ready<C: ClusterControl>(cluster: &C, id: u64) -> bool {
    let mut conn = crate::client::Conn::new(cluster.http_addr(id));
    conn.get("/readyz", PROBE_TIMEOUT).await.is_ok_and(|r| r.is_success())
}

/// Polls `/readyz` of `ids` until all answer 200 or `deadline` passes.
async fn wait_ready<C: ClusterControl>(cluster: &C, ids: &[u64], deadline: Duration) -> bool {
    let t = Instant::now();
    loop {
        let mut all = true;
        for &id in ids {
            all &= is_ready(cluster, id).await;
        }
        if all {
            return true;
        }
        if t.elapsed() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader most nodes report, if any.
async fn find_leader<C: ClusterControl>(cluster: &C) -> Option<u64> {
    let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
    for id in cluster.ids() {
        if let Some(l) = cluster_view(cluster, id, Duration::from_millis(500)).await.and_then(|v| v["leader"].as_u64()) {
            *votes.entry(l).or_default() += 1;
        }
    }
    votes.into_iter().max_by_key(|(_, n)| *n).map(|(l, _)| l)
}

/// Polls `/cluster` until every node reports the same applied index and state digest, with
/// committed == applied, twice in a row; bounded by `deadline`.
async fn wait_converged<C: ClusterControl>(cluster: &C, ids: &[u64], deadline: Duration) -> bool {
    let t = Instant::now();
    let mut last = None;
    while t.elapsed() < deadline {
        let mut views = Vec::new();
        for &id in ids {
            let v = cluster_view(cluster, id, PROBE_TIMEOUT).await;
            views.push(v.map(|v| (v["applied"].as_u64(), v["committed"].as_u64(), v["state_digest"].as_str().map(str::to_string))));
        }
        let first = views.first().cloned().flatten();
        let same = first.as_ref().is_some_and(|f| f.0.is_some() && f.0 == f.1 && views.iter().all(|v| v.as_ref().is_some_and(|v| v.0 == f.0 && v.2 == f.2)));
        if same {
            if last == first {
                return true;
            }
            last = first;
        } else {
            last = None;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    false
}

/// Finishes keyed increments the load left without an answer (same key, bounded attempts, and
/// all of them within `deadline`), so that the keyed counter must equal the acknowledged keys
/// exactly. Those still unanswered at the deadline stay unresolved: the checker allows them to
/// have taken effect or not. Returns how many stay unresolved.
async fn finish_keyed(addrs: &[String], records: &mut Records, deadline: Duration) -> usize {
    let unresolved = |k: &workload::KeyedOp| k.value.is_none() && k.rejected.is_none() && k.malformed.is_none();
    let stop = CancellationToken::new();
    let mut client = Client::new(addrs, 0);
    let finish = async {
        for op in records.keyed.iter_mut().filter(|k| unresolved(k)) {
            let before = op.attempts;
            workload::keyed_increment(&mut client, op, &stop, before + 50).await;
        }
    };
    // A request cut off by the deadline counted as an attempt and left no answer: unresolved.
    let timed_out = tokio::time::timeout(deadline, finish).await.is_err();
    let left = records.keyed.iter().filter(|k| unresolved(k)).count();
    if timed_out {
        println!("chaos: finishing keyed increments stopped after {deadline:?}; {left} stay unresolved");
    }
    left
}

/// Reads with a few retries over the nodes: `Ok(None)` is a definite 404.
async fn read(client: &mut Client, path: &str) -> Result<Option<crate::client::Response>, String> {
    let mut last = String::new();
    for _ in 0..10 {
        match client.call(Method::GET, path, &[], Bytes::new()).await {
            Reply::Ok(r) => return Ok(Some(r)),
            Reply::Refused(r) if r.status == 404 => return Ok(None),
            Reply::Refused(r) => last = format!("status {}: {}", r.status, String::from_utf8_lossy(&r.body)),
            Reply::Unknown(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}

fn counter_value(r: Result<Option<crate::client::Response>, String>) -> Result<Option<i64>, String> {
    match r? {
        None => Ok(None),
        Some(r) => serde_json::from_slice::<i64>(&r.body).map(Some).map_err(|e| format!("not an integer: {e}")),
    }
}

/// Reads everything the checker needs from the healed cluster (linearizable reads, spread over
/// all nodes).
async fn observe<C: ClusterControl>(cluster: &C, ids: &[u64], records: &Records) -> Observed {
    let addrs: Vec<String> = ids.iter().map(|&id| cluster.http_addr(id)).collect();
    let mut obs = Observed::default();

    // Acknowledged state writes, 8 readers in parallel.
    let keys: Vec<String> =
        records.writes.iter().filter(|w| w.outcome == workload::Outcome::Acked).map(|w| w.key.clone()).collect();
    let mut readers = tokio::task::JoinSet::new();
    for (i, chunk) in keys.chunks(keys.len().div_ceil(8).max(1)).enumerate() {
        let (chunk, addrs) = (chunk.to_vec(), addrs.clone());
        readers.spawn(async move {
            let mut client = Client::new(&addrs, i);
            let mut out = HashMap::new();
            for key in chunk {
                let got = match read(&mut client, &format!("/v1/state/chaos/{key}")).await {
                    Ok(Some(r)) => match serde_json::from_slice(&r.body) {
                        Ok(v) => Read::Value(v),
                        Err(e) => Read::Unreadable(format!("bad JSON: {e}")),
                    },
                    Ok(None) => Read::Absent,
                    Err(e) => Read::Unreadable(e),
                };
                client.rotate();
                out.insert(key, got);
            }
            out
        });
    }
    while let Some(done) = readers.join_next().await {
        if let Ok(part) = done {
            obs.writes.extend(part);
        }
    }

    let mut client = Client::new(&addrs, 0);
    for k in 0..workload::CAS_COUNTERS {
        let got = read(&mut client, &format!("/v1/state/chaos/c-{k}")).await.and_then(|r| match r {
            None => Ok(None),
            Some(r) => workload::parse_cas_value(&r.body).map(Some).ok_or_else(|| format!("bad value {}", String::from_utf8_lossy(&r.body))),
        });
        obs.cas.push(got);
    }
    obs.keyed = counter_value(read(&mut client, &format!("/v1/state/demo/counter/{}", workload::KEYED_COUNTER)).await);
    obs.unkeyed = counter_value(read(&mut client, &format!("/v1/state/demo/counter/{}", workload::UNKEYED_COUNTER)).await);
    // The first node's copy is checked; each other node's own copy is compared with it
    // (`check_nodes`). Every node must answer at the end anyway. The copies are read one after
    // another, so an entry committed in between (a background expiry) could tell them apart
    // for a moment: a difference is read again, up to three times, before it counts.
    for round in 0..3 {
        obs.node_events.clear();
        for (i, addr) in addrs.iter().enumerate() {
            let log = read_event_log(&mut Client::new(std::slice::from_ref(addr), 0), records.events.len()).await;
            match i {
                0 => obs.events = log,
                _ => obs.node_events.push((ids[i], log)),
            }
        }
        let agree = obs.events.is_ok() && obs.node_events.iter().all(|(_, log)| *log == obs.events);
        if agree || round == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for &id in ids {
        let ready = is_ready(cluster, id).await;
        let view = cluster_view(cluster, id, PROBE_TIMEOUT).await;
        obs.nodes.push(NodeView {
            id,
            ready,
            applied: view.as_ref().and_then(|v| v["applied"].as_u64()),
            digest: view.as_ref().and_then(|v| v["state_digest"].as_str().map(str::to_string)),
        });
    }
    obs
}

/// For a diagnosis of divergence: every key the load touched, read locally (`stale`) on each
/// node; returns the first keys whose status, revision or value differ (and how many in all).
async fn diff_known_keys<C: ClusterControl>(cluster: &C, ids: &[u64], records: &Records) -> Vec<String> {
    let mut paths: Vec<String> = records.writes.iter().map(|w| format!("/v1/state/chaos/{}", w.key)).collect();
    paths.extend((0..workload::CAS_COUNTERS).map(|k| format!("/v1/state/chaos/c-{k}")));
    for c in [workload::KEYED_COUNTER, workload::UNKEYED_COUNTER] {
        paths.push(format!("/v1/state/demo/counter/{c}"));
    }
    let mut conns: Vec<crate::client::Conn> = ids.iter().map(|&id| crate::client::Conn::new(cluster.http_addr(id))).collect();
    let mut out = Vec::new();
    let mut differing = 0;
    for path in &paths {
        let mut seen = Vec::new();
        for (conn, id) in conns.iter_mut().zip(ids) {
            let got = match conn.get(&format!("{path}?consistency=stale"), PROBE_TIMEOUT).await {
                Ok(r) => {
                    let rev = r.headers.get("x-revision").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                    format!("{} rev {rev} {}", r.status, String::from_utf8_lossy(&r.body))
                }
                Err(e) => format!("error {e}"),
            };
            seen.push((id, got));
        }
        if seen.windows(2).any(|w| w[0].1 != w[1].1) {
            differing += 1;
            if out.len() < 10 {
                let all: Vec<String> = seen.iter().map(|(id, g)| format!("node {id}: {g}")).collect();
                out.push(format!("{path}: {}", all.join(" | ")));
            }
        }
    }
    out.push(format!("{differing} of {} known keys differ", paths.len()));
    out
}

/// Pages through `GET /v1/events?after=N&limit=M`; returns `(id, nonce)` of every event.
async fn read_event_log(client: &mut Client, expected: usize) -> Result<Vec<(String, String)>, String> {
    const LIMIT: usize = 500;
    let mut out = Vec::new();
    let mut after = 0u64;
    // Bounded: a log much longer than what the load published is itself a finding.
    for _ in 0..(expected * 2 / LIMIT + 20) {
        let r = read(client, &format!("/v1/events?after={after}&limit={LIMIT}")).await?.ok_or("GET /v1/events: 404")?;
        let page: serde_json::Value = r.json().map_err(|e| e.to_string())?;
        let events = page["events"].as_array().ok_or("no events array")?;
        if events.is_empty() {
            return Ok(out);
        }
        for e in events {
            let id = e["id"].as_str().unwrap_or_default().to_string();
            let nonce = e["payload"]["nonce"].as_str().unwrap_or_default().to_string();
            out.push((id, nonce));
        }
        let next = page["next"].as_u64().ok_or("no next position")?;
        if next <= after {
            return Err(format!("event paging does not advance (after={after}, next={next})"));
        }
        after = next;
    }
    Err(format!("event log longer than expected ({} events read)", out.len()))
}

/// Longest time without any acknowledged operation inside `[start, end]` (ms).
fn longest_gap(acks: &[u64], start: u64, end: u64) -> u64 {
    let from = acks.partition_point(|&a| a < start);
    let mut prev = start;
    let mut longest = 0;
    for &a in acks[from..].iter().take_while(|&&a| a <= end) {
        longest = longest.max(a - prev);
        prev = a;
    }
    longest.max(end.saturating_sub(prev))
}

fn fault_rows(faults: &[FaultRecord], acks: &[u64], isolation: bool) -> Vec<FaultRow> {
    let mut acks = acks.to_vec();
    acks.sort_unstable();
    FaultKind::ALL
        .iter()
        .map(|&kind| {
            let of_kind: Vec<&FaultRecord> = faults.iter().filter(|f| f.kind == kind).collect();
            let longest = of_kind.iter().map(|f| longest_gap(&acks, f.start_ms, f.end_ms)).max();
            let mut note = String::new();
            if !isolation && matches!(kind, FaultKind::Isolate | FaultKind::IsolateLeader) {
                note = "not available in this mode".into();
            } else if of_kind.iter().any(|f| f.error.is_some() || f.heal_error.is_some()) {
                note = "FAILED to inject or undo (see the problems)".into();
            } else if of_kind.iter().any(|f| !f.ready) {
                note = "cluster not ready within 30 s after it".into();
            } else if of_kind.is_empty() {
                note = "not scheduled in this run".into();
            }
            FaultRow { kind: kind.name().to_string(), count: of_kind.len() as u64, longest_unavailable_ms: longest, note }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(kind: FaultKind, injected: bool, error: Option<&str>, heal_error: Option<&str>, ready: bool) -> FaultRecord {
        let (error, heal_error) = (error.map(str::to_string), heal_error.map(str::to_string));
        FaultRecord { kind, start_ms: 5_000, end_ms: 9_000, note: String::new(), injected, error, heal_error, ready }
    }

    #[test]
    fn failed_or_missing_faults_are_problems() {
        // Carried out and healed, even if slow to be ready: no problem (a note in the report).
        let ok = fault(FaultKind::KillRandom, true, None, None, false);
        assert!(fault_problems(std::slice::from_ref(&ok)).is_empty());
        // A kill that failed, and a restart that failed while healing.
        let failed = fault(FaultKind::KillLeader, false, Some("kill -KILL 42 failed"), None, true);
        let unhealed = fault(FaultKind::Pause, true, None, Some("spawning raftbridge"), true);
        let p = fault_problems(&[ok.clone(), failed, unhealed]);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("kill leader at t=5.0s failed: kill -KILL 42") && p[1].contains("healing after fault pause"), "{p:?}");
        // Only skipped (unavailable) or failed faults: the run injected nothing.
        let skipped = fault(FaultKind::Isolate, false, None, None, true);
        let p = fault_problems(std::slice::from_ref(&skipped));
        assert!(p.len() == 1 && p[0].contains("no fault was injected (1 planned"), "{p:?}");
        assert!(fault_problems(&[]).iter().any(|l| l.contains("no fault was injected")));
        assert!(fault_problems(&[skipped, ok]).is_empty());
    }

    #[tokio::test]
    async fn finishing_keyed_increments_is_bounded_in_time() {
        // No node answers: each op would take 50 attempts with pauses (5 s); the deadline cuts it.
        let op = |n: u32| workload::KeyedOp { key: format!("k{n}"), attempts: 1, value: None, replayed: false, rejected: None, malformed: None };
        let mut records = Records { keyed: (0..3).map(op).collect(), ..Records::default() };
        let t = Instant::now();
        let left = finish_keyed(&[], &mut records, Duration::from_millis(300)).await;
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(left, 3);
        assert!(records.keyed.iter().all(|k| k.value.is_none() && k.attempts >= 1));
    }

    #[tokio::test]
    async fn sigterm_interrupts_the_run() {
        // The handler is installed first: from then on SIGTERM no longer ends this process.
        let term = sigterm();
        assert!(term.is_some());
        let status = std::process::Command::new("kill").arg("-TERM").arg(std::process::id().to_string()).status().expect("running kill");
        assert!(status.success());
        let why = tokio::time::timeout(Duration::from_secs(10), interrupted(term)).await.expect("SIGTERM seen within 10 s");
        assert_eq!(why, "SIGTERM");
    }

    #[tokio::test]
    async fn a_load_that_ends_early_aborts_the_run() {
        let mut running = tokio::spawn(async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(Records::default())
        });
        assert!(load_ended_early(&mut running).await.is_ok());
        running.abort();
        let mut panicked: tokio::task::JoinHandle<anyhow::Result<Records>> = tokio::spawn(async { panic!("a load task panicked") });
        let mut failed = tokio::spawn(async { Err(anyhow::anyhow!("2 load tasks failed")) });
        for _ in 0..100 {
            if panicked.is_finished() && failed.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let e = load_ended_early(&mut panicked).await.expect_err("a panicked load fails the run");
        assert!(e.to_string().contains("during the fault phase"), "{e:#}");
        let e = load_ended_early(&mut failed).await.expect_err("a failed load fails the run");
        assert!(e.to_string().contains("2 load tasks failed"), "{e:#}");
    }

    #[test]
    fn only_an_empty_or_marked_workdir_may_be_cleared() {
        let dir = std::env::temp_dir().join(format!("rb-chaos-workdir-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(may_clear(&dir).unwrap(), "an empty directory");
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        assert!(!may_clear(&dir).unwrap(), "someone's files, no marker");
        std::fs::write(dir.join(WORKDIR_MARKER), "").unwrap();
        assert!(may_clear(&dir).unwrap(), "an earlier run's directory");
        assert!(may_clear(&dir.join("missing")).is_err(), "not a directory");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gaps_between_acks() {
        let acks = [100, 200, 1200, 1300, 5000];
        assert_eq!(longest_gap(&acks, 150, 1250), 1000);
        assert_eq!(longest_gap(&acks, 1300, 4000), 2700, "no ack until the end of the window");
        assert_eq!(longest_gap(&[], 0, 800), 800);
    }
}
