//! Command-line interface: `node`, `dev`, `leave`, `bench`, `probe`, `chaos`, `certs`, `snapshot`, `kv`, `events`.
//!
//! This is the binary's edge, so errors are `anyhow` here and exit codes are decided here.
//! `dev` runs a three-node loopback cluster as child processes of this same binary, which is
//! what a newcomer wants and exactly how the integration tests run nodes.

use std::process::ExitCode;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use clap::Subcommand;
use tokio_util::sync::CancellationToken;

mod data;

use crate::bench::BenchCmd;
use crate::config::NodeArgs;

#[derive(Debug, Parser)]
#[command(name = "raftbridge", version, about = "Raft-replicated broker, state store and proxy in every instance")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a node. (Boxed: the node's flags are most of the size of this enum.)
    Node(Box<NodeArgs>),
    /// Run a three-node cluster on loopback (child processes) and print commands to try.
    Dev(DevArgs),
    /// Remove a node from the cluster for good.
    Leave(LeaveArgs),
    /// Load benchmarks against a running cluster.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// GET a URL; exit 0 on a 2xx answer, 1 otherwise (container health checks: no curl needed).
    Probe(ProbeArgs),
    /// Chaos suite: a cluster under mixed load and a seeded schedule of faults, then a check
    /// that nothing acknowledged was lost or applied twice (see deploy/chaos/README.md).
    Chaos(crate::chaos::ChaosArgs),
    /// Make a certificate and key for one node's peer TLS (`--peer-tls-*`), signed by the
    /// cluster CA in --dir (made there first when the directory has none).
    Certs(CertsArgs),
    /// Backups: save the whole replicated state to a file, inspect a saved one, or make the
    /// first data dir of a new cluster from one.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// The state and config stores from a shell: get, put, delete and list keys (as `consul kv`).
    #[command(subcommand)]
    Kv(data::KvCmd),
    /// The event log from a shell: publish an event, print or follow the log (as `nats pub`).
    #[command(subcommand)]
    Events(data::EventsCmd),
}

#[derive(Debug, Subcommand)]
enum SnapshotCmd {
    /// Download a snapshot of the whole replicated state (state, config and sealed secrets,
    /// events, subscriptions, dedup records) from any node, covering every write acknowledged
    /// before the call, to FILE (written to FILE.part, checked, then renamed).
    Save(SnapshotSaveArgs),
    /// Check a saved snapshot and print what it holds (JSON).
    Inspect {
        file: std::path::PathBuf,
    },
    /// Make the data dir of the first node of a new cluster from a saved snapshot: the node is
    /// its one member; start the others with empty data dirs and it among their seeds.
    Restore(SnapshotRestoreArgs),
}

#[derive(Debug, clap::Args)]
struct SnapshotSaveArgs {
    /// The file to write.
    file: std::path::PathBuf,
    /// Address of any node of the cluster: `host:port` or `http://host:port`, `https://host:port`
    /// with --cacert.
    #[arg(long)]
    http_addr: String,
    /// PEM file of the CA that an `https://` node's certificate must chain to.
    #[arg(long)]
    cacert: Option<std::path::PathBuf>,
    /// The node's `--api-token`, if it has one (the read token is refused; prefer the env var).
    #[arg(long, env = "RAFTBRIDGE_API_TOKEN", hide_env_values = true)]
    api_token: Option<crate::config::SecretText>,
    /// The node's `--secrets-token`: what a node without an API token wants for a snapshot
    /// when its secret store is on (sent when no --api-token is given).
    #[arg(long, env = "RAFTBRIDGE_SECRETS_TOKEN", hide_env_values = true)]
    secrets_token: Option<crate::config::SecretText>,
    /// Give up when the node sends nothing for this many seconds.
    #[arg(long, default_value_t = 120)]
    idle_timeout_s: u64,
}

#[derive(Debug, clap::Args)]
struct SnapshotRestoreArgs {
    /// The saved snapshot.
    file: std::path::PathBuf,
    /// The new node's data dir: new or empty.
    #[arg(long)]
    data_dir: std::path::PathBuf,
    /// The new node's `--id`.
    #[arg(long)]
    id: u64,
    /// The peer address other nodes will reach it at: the `--advertise` it will run with, or
    /// its `--peer-addr`.
    #[arg(long)]
    advertise: String,
}

#[derive(Debug, clap::Args)]
struct CertsArgs {
    /// Directory of the cluster CA (`ca.pem`, `ca-key.pem`) and of the files made.
    #[arg(long)]
    dir: std::path::PathBuf,
    /// The node's name: the files are `<name>.pem` and `<name>-key.pem`.
    #[arg(long)]
    name: String,
    /// A host name or IP address that peers dial this node by (its --advertise or seed
    /// address host), or the shared --peer-tls-server-name. Repeat for several.
    #[arg(long = "san", required = true)]
    sans: Vec<String>,
    /// Days the node certificate is valid.
    #[arg(long, default_value_t = 825)]
    days: u32,
    /// Bind the certificate to this node id (a `urn:raftbridge:node:<id>` URI name): peers then
    /// refuse it from a node that claims another id, and a node with another --id will not
    /// load it. Leave it out for one certificate shared by every node.
    #[arg(long)]
    node_id: Option<u64>,
}

#[derive(Debug, clap::Args)]
struct DevArgs {
    /// Directory for the nodes' data (kept between runs).
    #[arg(long, default_value = "raftbridge-dev")]
    data_dir: std::path::PathBuf,
    /// First peer port; nodes use base, base+1, base+2 (HTTP: base+1000..).
    #[arg(long, default_value_t = 7401)]
    base_port: u16,
}

#[derive(Debug, clap::Args)]
struct LeaveArgs {
    /// Address of any node of the cluster: `host:port` or `http://host:port` for its plain
    /// HTTP, `https://host:port` (with --cacert) for its HTTPS listener.
    #[arg(long)]
    http_addr: String,
    /// Id of the node to remove.
    #[arg(long)]
    id: u64,
    /// PEM file of the CA that an `https://` node's certificate must chain to.
    #[arg(long)]
    cacert: Option<std::path::PathBuf>,
    /// The node's `--api-token`, if it has one (sent as `Authorization: Bearer <token>`; prefer
    /// the env var, as `ps` shows flags).
    #[arg(long, env = "RAFTBRIDGE_API_TOKEN", hide_env_values = true)]
    api_token: Option<crate::config::SecretText>,
}

#[derive(Debug, clap::Args)]
struct ProbeArgs {
    /// `http://host:port/path`, e.g. http://127.0.0.1:8400/readyz, or `https://…` with --cacert.
    url: String,
    /// PEM file of the CA that an `https://` URL's certificate must chain to.
    #[arg(long)]
    cacert: Option<std::path::PathBuf>,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Print the response body on stdout (a curl stand-in inside scratch images).
    #[arg(long)]
    body: bool,
    /// The node's `--api-token`, if it has one (sent as `Authorization: Bearer <token>`; prefer
    /// the env var, as `ps` shows flags).
    #[arg(long, env = "RAFTBRIDGE_API_TOKEN", hide_env_values = true)]
    api_token: Option<crate::config::SecretText>,
}

/// The node's async runtime. One worker thread (`--worker-threads 1`) gets tokio's current-thread
/// scheduler: it runs the same tasks on one thread without the work-stealing scheduler's
/// cross-thread bookkeeping (atomic task states, the injection queue, a parked worker to wake
/// for every task that another thread — the log flusher, a blocking task — makes ready).
/// Measured with three nodes on two cores (`bench events`, seven interleaved pairs): 23,200 →
/// 24,500 events/s on average and 56 → 52 µs of node CPU per event; `bench state` +10 to +20%.
/// The load generator (`raftbridge bench`) runs on one thread by default for the same reason
/// (`--threads`). More threads, or none given (one per core), get the multi-thread scheduler.
fn runtime_builder(worker_threads: Option<u16>) -> tokio::runtime::Builder {
    match worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(usize::from(n));
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    }
}

/// The command line, where an env var set to the empty string counts as not given (compose's
/// `${VAR:-}`): clap would take it as the value, which a number or boolean setting refuses.
fn parse_cli() -> Cli {
    use clap::CommandFactory;
    use clap::FromArgMatches;
    let matches = without_empty_env(Cli::command()).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// `cmd` and its subcommands with the env var of each setting whose var is empty taken away.
fn without_empty_env(cmd: clap::Command) -> clap::Command {
    let cmd = cmd.mut_args(|arg| {
        let empty = arg.get_env().is_some_and(|name| std::env::var_os(name).is_some_and(|v| v.is_empty()));
        if empty { arg.env(None::<&str>) } else { arg }
    });
    let subcommands: Vec<String> = cmd.get_subcommands().map(|c| c.get_name().to_owned()).collect();
    subcommands.iter().fold(cmd, |cmd, name| cmd.mut_subcommand(name, without_empty_env))
}

pub fn main() -> ExitCode {
    main_with(Vec::new())
}

/// The `raftbridge` command line, with `services` run by `node` (and so by `dev`'s nodes,
/// which are this same binary) beside `--example-services`: what an application that embeds
/// raftbridge calls from its own `main`, so that its binary is a node with everything the
/// `raftbridge` binary does around one (its flags and environment, logging, transparent huge
/// pages off, the open-files limit, the runtime `--worker-threads` picks, the metrics
/// exporter's buckets, the two-signal drain, exit codes), and `bench`, `probe`, `leave`,
/// `chaos` and `certs` too. (Its allocator is its own to choose: the `raftbridge` binary's is
/// mimalloc.)
pub fn main_with(services: Vec<crate::sdk::ServiceParts>) -> ExitCode {
    let cli = parse_cli();
    init_tracing();
    // Before the runtime's threads start and before the node's memory grows (see the function).
    if let Err(e) = crate::process::disable_transparent_huge_pages() {
        tracing::debug!(error = %e, "could not turn transparent huge pages off");
    }
    // Before any listener or file is opened (the node warns if it is still too low).
    crate::process::raise_open_files_limit();
    let worker_threads = match &cli.cmd {
        Cmd::Node(args) => args.worker_threads,
        Cmd::Bench(cmd) => Some(cmd.common().threads),
        _ => None,
    };
    let runtime = match runtime_builder(worker_threads).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.cmd {
            Cmd::Node(args) => run_node(*args, services).await,
            Cmd::Dev(args) => dev(args).await,
            Cmd::Leave(args) => leave(args).await,
            Cmd::Bench(cmd) => crate::bench::run(cmd).await.and_then(|r| r.judge()),
            Cmd::Probe(args) => probe(args).await,
            Cmd::Chaos(args) => crate::chaos::run(args).await,
            Cmd::Certs(args) => certs(args),
            Cmd::Snapshot(cmd) => snapshot(cmd).await,
            Cmd::Kv(cmd) => data::kv(cmd).await,
            Cmd::Events(cmd) => data::events(cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, `a: b: c`, leaving out a cause whose text the line
/// already holds (many of our errors say their cause in their own message too, and `{:#}`
/// printed it again for each level).
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// The log filter when `RUST_LOG` is not set. openraft's heartbeat worker warns at every missed
/// heartbeat, 16 lines a second per unreachable peer on the leader; the peer layer already logs
/// the link going down and the redials, and `/cluster` shows who is unreachable, so that module
/// logs only at `error` (its rarer warnings about odd heartbeat answers go too: set `RUST_LOG`
/// to see them).
pub const DEFAULT_LOG: &str = "info,openraft=warn,openraft::core::heartbeat=error";

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    // Colours only on a terminal: in files, the journal and `docker logs` they are noise that
    // every reader (and grep) must strip.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

/// Cancel the token on SIGINT or SIGTERM. A second one cancels `second` if given, else ends
/// the process at once, without the rest of the drain (as an operator who presses Ctrl-C twice
/// means; the signal handlers stay installed for the process's life, so it was swallowed).
/// Nothing acknowledged depends on the drain: that is on disk, as after a SIGKILL.
fn on_signal(token: CancellationToken, second: Option<CancellationToken>) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        for seen in 0..2 {
            let term_recv = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = term_recv => {}
            }
            if seen == 0 {
                token.cancel();
            }
        }
        match second {
            Some(second) => second.cancel(),
            None => {
                tracing::warn!("a second stop signal: ending now, without the rest of the drain");
                std::process::exit(130);
            }
        }
    });
}

async fn run_node(args: NodeArgs, mut services: Vec<crate::sdk::ServiceParts>) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("raftbridge_delivery_latency_seconds".into()),
            crate::broker::dispatch::DELIVERY_LATENCY_BUCKETS,
        )
        .and_then(|b| b.install_recorder())
        .map_err(|e| tracing::warn!(cause = %e, "metrics recorder not installed"))
        .ok();
    let shutdown = CancellationToken::new();
    on_signal(shutdown.clone(), None);
    if cfg.example_services {
        services.push(crate::sdk::demo::demo_service());
    }
    crate::node::run(cfg, services, metrics, shutdown).await?;
    Ok(())
}

fn certs(args: CertsArgs) -> anyhow::Result<()> {
    let issued = crate::peer::tls::issue(&args.dir, &args.name, &args.sans, args.days, args.node_id)?;
    let ca = args.dir.join(crate::peer::tls::CA_CERT);
    if issued.ca_created {
        println!("made the cluster CA: {} (its key {} signs node certificates: keep it off the nodes)",
            ca.display(), args.dir.join(crate::peer::tls::CA_KEY).display());
    }
    println!("made {} and {}; run the node with", issued.cert.display(), issued.key.display());
    println!("  --peer-tls-cert {} --peer-tls-key {} --peer-tls-ca {}", issued.cert.display(), issued.key.display(), ca.display());
    Ok(())
}

/// A client for `addr` (`host:port`, `http://…` or `https://…`): an `https://` one checks the
/// server's certificate against the CA in `cacert`, which it then needs.
fn connect_to(addr: &str, cacert: Option<&std::path::Path>) -> anyhow::Result<crate::client::Conn> {
    let tls = crate::bench::client_tls(cacert, std::iter::once(addr))?;
    Ok(crate::client::Conn::new(addr).with_tls(tls))
}

/// The `Authorization` header that `--api-token` asks for (none for an empty one, as the node
/// takes an empty env var for none).
fn bearer_header(token: Option<&str>) -> Option<(&'static str, String)> {
    token.filter(|t| !t.is_empty()).map(|t| ("authorization", format!("Bearer {t}")))
}

async fn snapshot(cmd: SnapshotCmd) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Save(args) => snapshot_save(args).await,
        SnapshotCmd::Inspect { file } => {
            let (_, summary) = read_snapshot(&file)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        SnapshotCmd::Restore(args) => {
            let bytes = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
            let (meta, data) = crate::backup::read(&bytes, &args.file.display().to_string())?;
            let summary = crate::backup::summarize(&meta, &data, bytes.len() as u64);
            drop(bytes);
            let (cluster_id, index) = crate::backup::restore(meta, data, &args.data_dir, args.id, &args.advertise).await?;
            println!(
                "restored log index {} ({} state, {} config and {} secret keys, {} events, {} subscriptions) into {} as node {} at {}, \
                 in a new cluster with id {cluster_id:032x}; its log goes on from index {index} (new key revisions are past any the old cluster gave)\n\
                 start it with --id {} --data-dir {}, its usual flags and a new --cluster-name; start the other nodes with empty data dirs, that --cluster-name and it among their seeds",
                summary.index, summary.state_keys, summary.config_keys, summary.secret_keys, summary.events, summary.subscriptions,
                args.data_dir.display(), args.id, args.advertise, args.id, args.data_dir.display()
            );
            Ok(())
        }
    }
}

/// A saved snapshot, read and checked whole.
fn read_snapshot(file: &std::path::Path) -> anyhow::Result<(Vec<u8>, crate::backup::Summary)> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let (meta, data) = crate::backup::read(&bytes, &file.display().to_string())?;
    let summary = crate::backup::summarize(&meta, &data, bytes.len() as u64);
    Ok((bytes, summary))
}

async fn snapshot_save(args: SnapshotSaveArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let mut conn = connect_to(&args.http_addr, args.cacert.as_deref())?;
    let auth = bearer_header(args.api_token.as_deref()).or_else(|| bearer_header(args.secrets_token.as_deref()));
    let headers: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut part_name = args.file.as_os_str().to_owned();
    part_name.push(".part");
    let part = std::path::PathBuf::from(part_name);
    // A snapshot holds every key in clear (secrets sealed): the file is the owner's only from
    // its creation, and a new one (not a file or link left at that name).
    match std::fs::remove_file(&part) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("removing a stale {}", part.display())),
        _ => {}
    }
    let mut out = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&part).with_context(|| format!("creating {}", part.display()))?
    };
    // A node sending another snapshot answers 503 with `Retry-After`: asked again, a second
    // apart, for up to a minute (nothing was written to `out` by such an answer).
    let mut result;
    let mut busy_tries = 0;
    loop {
        result = conn
            .download("/cluster/snapshot", &headers, u64::MAX, Duration::from_secs(args.idle_timeout_s.max(1)), |chunk| out.write_all(chunk))
            .await;
        let busy = matches!(&result, Ok((resp, _)) if resp.status == 503 && resp.headers.contains_key(http::header::RETRY_AFTER));
        if !busy || busy_tries >= 60 {
            break;
        }
        busy_tries += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (resp, written) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e).with_context(|| format!("GET /cluster/snapshot from {}", args.http_addr));
        }
    };
    if !resp.is_success() {
        let _ = std::fs::remove_file(&part);
        let hint = if resp.status == 401 || resp.status == 403 {
            " (give the node's --api-token with --api-token or RAFTBRIDGE_API_TOKEN, the read token may not save snapshots; a node without an API token whose secret store is on wants --secrets-token)"
        } else {
            ""
        };
        anyhow::bail!("{}: {}{hint}", resp.status, String::from_utf8_lossy(&resp.body));
    }
    if let Err(e) = out.sync_all() {
        let _ = std::fs::remove_file(&part);
        return Err(e).with_context(|| format!("syncing {}", part.display()));
    }
    drop(out);
    let checked = read_snapshot(&part);
    let summary = match checked {
        Ok((_, summary)) => summary,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e.context(format!("the snapshot downloaded from {} ({written} bytes) does not check", args.http_addr)));
        }
    };
    if let Err(e) = std::fs::rename(&part, &args.file) {
        let _ = std::fs::remove_file(&part);
        return Err(e).with_context(|| format!("renaming {} to {}", part.display(), args.file.display()));
    }
    // The rename itself is durable once the directory is synced.
    crate::fsutil::sync_parent(&args.file).with_context(|| format!("syncing the directory of {}", args.file.display()))?;
    eprintln!("saved log index {} ({written} bytes) to {}", summary.index, args.file.display());
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// How long `raftbridge leave` waits for the node's answer.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(45);

async fn leave(args: LeaveArgs) -> anyhow::Result<()> {
    let mut conn = connect_to(&args.http_addr, args.cacert.as_deref())?;
    let auth = bearer_header(args.api_token.as_deref());
    let headers: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Longer than the node may take: up to 10 s for a leader to be known, then the leader's
    // 25 s for the change (`cluster::leader_op`); a client that gave up first made a change
    // still queued be dropped, and the node's "may still be applied" answer was never read.
    let resp = conn
        .request(http::Method::DELETE, &format!("/cluster/members/{}", args.id), &headers, bytes::Bytes::new(), LEAVE_TIMEOUT)
        .await
        .map_err(|e| {
            // Only a request that may have been sent may still be applied.
            let hint = if matches!(e, crate::client::ClientError::Timeout { .. } | crate::client::ClientError::Http { .. }) { " (the removal may still be applied: see GET /cluster)" } else { "" };
            anyhow::anyhow!("contacting {}: {e}{hint}", args.http_addr)
        })?;
    if resp.status == 401 {
        anyhow::bail!("401: {} (give the node's token with --api-token or RAFTBRIDGE_API_TOKEN)", String::from_utf8_lossy(&resp.body))
    }
    if resp.is_success() {
        println!("node {} removed", args.id);
        Ok(())
    } else if resp.status == 404 {
        // A repeat sent to another member after the removal committed lands here too.
        anyhow::bail!("node {} is not a member (never was, or already removed): {}", args.id, String::from_utf8_lossy(&resp.body))
    } else {
        anyhow::bail!("{}: {}", resp.status, String::from_utf8_lossy(&resp.body))
    }
}

async fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    let (scheme, rest) = args
        .url
        .split_once("://")
        .filter(|(scheme, _)| ["http", "https"].contains(scheme))
        .with_context(|| format!("{:?}: only http:// and https:// URLs are supported", args.url))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() {
        anyhow::bail!("{:?}: no host", args.url);
    }
    let mut conn = connect_to(&format!("{scheme}://{host}"), args.cacert.as_deref())?;
    // Never to a service's endpoint: the token is the node's, and the proxy passes the
    // header on to the app.
    let auth = bearer_header(args.api_token.as_deref()).filter(|_| !path.starts_with("/api/"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let resp = conn
        .request(http::Method::GET, path, &headers, bytes::Bytes::new(), Duration::from_millis(args.timeout_ms))
        .await
        .with_context(|| format!("GET {}", args.url))?;
    if resp.is_success() {
        if args.body {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(&resp.body).and_then(|_| out.write_all(b"\n")).context("writing the body")?;
        }
        Ok(())
    } else {
        let body = String::from_utf8_lossy(&resp.body);
        anyhow::bail!("GET {}: {} {}", args.url, resp.status, body.trim())
    }
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    if args.base_port == 0 || args.base_port > u16::MAX - 1_002 {
        anyhow::bail!("--base-port must be 1..={}: the nodes use it and the two ports above it, and HTTPS 1000 above those", u16::MAX - 1_002);
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let peers: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", args.base_port + i)).collect();
    let https: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", args.base_port + 1000 + i)).collect();
    // Three nodes share this machine: each gets a third of the cores (README, `--worker-threads`).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / 3).max(1).to_string();
    // Before the nodes start: a Ctrl-C while they come up stops them too (they are in a
    // process group of their own, which the terminal's signal does not reach). A second one
    // kills them.
    let (stop, force) = (CancellationToken::new(), CancellationToken::new());
    on_signal(stop.clone(), Some(force.clone()));
    let mut children = Vec::new();
    for i in 0..3 {
        let dir = args.data_dir.join(format!("node{}", i + 1));
        crate::fsutil::create_private_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = std::fs::File::create(args.data_dir.join(format!("node{}.log", i + 1)))?;
        let child = tokio::process::Command::new(&exe)
            .args(["node", "--id", &(i + 1).to_string(), "--data-dir"])
            .arg(&dir)
            .args(["--peer-addr", &peers[i], "--http-addr", &https[i], "--seeds", &peers.join(","), "--bootstrap-expect", "3", "--example-services"])
            .args(["--worker-threads", &threads])
            // Only these flags configure the dev nodes: a `RAFTBRIDGE_API_TOKEN` exported for
            // `leave` would otherwise make the curl lines below get 401s.
            .env_clear()
            .envs(std::env::vars_os().filter(|(k, _)| !k.to_string_lossy().starts_with("RAFTBRIDGE_")))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            // A group of its own: a Ctrl-C in the terminal reaches `dev` alone, which then asks
            // each node once (SIGTERM) to drain. Sent to the terminal's group, the nodes took
            // `dev`'s SIGTERM as a second signal and ended without their drain.
            .process_group(0)
            .spawn()
            .context("starting a node")?;
        children.push(child);
    }
    let started = Instant::now();
    let mut ready = false;
    while started.elapsed() < Duration::from_secs(30) && !ready && !stop.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut all = true;
        for h in &https {
            let ok = crate::client::Conn::new(h.clone()).get("/readyz", Duration::from_secs(1)).await.is_ok_and(|r| r.is_success());
            all &= ok;
        }
        ready = all;
    }
    if !ready && !stop.is_cancelled() {
        anyhow::bail!("the cluster did not become ready in 30 s; see {}/node*.log", args.data_dir.display());
    }
    if ready {
        print_dev_help(&args.data_dir, &https);
    }
    stop.cancelled().await;
    for child in &mut children {
        if let Some(pid) = child.id() {
            // Ask once so nodes drain; a second Ctrl-C (or kill_on_drop) ends them.
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
    }
    for child in &mut children {
        tokio::select! {
            _ = tokio::time::timeout(Duration::from_secs(15), child.wait()) => {}
            () = force.cancelled() => {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
    Ok(())
}

/// What `dev` prints once its cluster is ready.
fn print_dev_help(data_dir: &std::path::Path, https: &[String]) {
    println!("raftbridge dev cluster is up (logs: {}/node*.log). Try:\n", data_dir.display());
    println!("  curl -s {}/cluster", url(&https[1]));
    println!("  curl -s -X PUT {}/v1/state/default/greeting -d '{{\"hello\":\"world\"}}'", url(&https[2]));
    println!("  curl -si {}/v1/state/default/greeting", url(&https[0]));
    println!("  curl -s -X POST {}/api/v1/echo -d '{{\"hi\":1}}'      # served by any node", url(&https[0]));
    println!("  curl -s -X POST -H 'Idempotency-Key: k1' {}/api/v1/counter/a/increment", url(&https[1]));
    println!("  curl -s {}/openapi.json", url(&https[2]));
    println!("  curl -s {}/metrics | head", url(&https[0]));
    println!("  raftbridge bench state --targets {} --concurrency 64 --duration 10s", https.iter().map(|h| url(h)).collect::<Vec<_>>().join(","));
    println!("\nCtrl-C stops the cluster (a second one kills it).");
}

fn url(addr: &str) -> String {
    format!("http://{addr}")
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    use super::error_chain;
    use super::runtime_builder;

    /// Each cause is said once: an error whose message holds its source's text (`sidecar:
    /// {0}` over a declaration error) is not followed by that text again, while a context over
    /// an error it does not quote still is.
    #[test]
    fn an_error_line_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("inner {0}")]
        struct Inner(u8);
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Outer(#[from] Inner);
        let quoted = anyhow::Error::from(Outer(Inner(7)));
        assert_eq!(error_chain(&quoted), "outer: inner 7");
        let context = quoted.context("starting the node");
        assert_eq!(error_chain(&context), "starting the node: outer: inner 7");
        let plain = anyhow::Error::from(Inner(1)).context("reading");
        assert_eq!(error_chain(&plain), "reading: inner 1");
    }

    #[test]
    fn one_worker_thread_gets_the_current_thread_scheduler() {
        let rt = runtime_builder(Some(1)).enable_all().build().expect("runtime");
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        // Tasks spawned on it run while the node's main future is driven, and a task made ready
        // by another OS thread (as the log flusher does) is woken.
        let got = rt.block_on(async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(async move { rx.await.map(|v: u32| v + 1) });
            std::thread::spawn(move || tx.send(41));
            task.await
        });
        assert_eq!(got.expect("task").expect("value"), 42);

        let rt = runtime_builder(Some(3)).enable_all().build().expect("runtime");
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(rt.metrics().num_workers(), 3);
        let rt = runtime_builder(None).enable_all().build().expect("runtime");
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
    }
}
