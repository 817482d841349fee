//! Engine of the `raftbridge bench` subcommand: closed-loop HTTP load against a running cluster.
//!
//! Why it is built this way:
//! - Closed loop, one keep-alive [`Conn`] per worker, workers spread round-robin over the
//!   targets: `--concurrency` is then exactly the number of sockets and of requests in flight,
//!   which is what we want to reason about when measuring Raft commit throughput and latency.
//! - The engine ([`drive`]) knows nothing about workloads; a workload is only a function from
//!   (worker index, sequence number) to a [`BenchRequest`]. `bench state` and `bench commands`
//!   are such functions; `bench events` plugs in the same way (a [`BenchCmd`] variant plus one).
//! - `bench commands` takes the request from the command line; `{worker}`/`{seq}`/`{run}`
//!   placeholders make paths, bodies or `Idempotency-Key`s unique per request when wanted, and
//!   the common case (no placeholder) costs a clone per request.
//! - Each worker owns its histogram and counters (no contention on the hot path); they are merged
//!   once at the end. Only two shared atomics feed the once-a-second progress line.
//! - Requests started during `--warmup` are excluded; requests still in flight at the deadline
//!   are abandoned and not counted, so the measured window is exactly `--duration`.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Method;
use tokio::time::{sleep, sleep_until, timeout_at, Instant};

use crate::client::ClientTls;
use crate::client::Conn;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Comma-separated node HTTP addresses (`host:port`, `http://host:port`, or
    /// `https://host:port` with --cacert).
    #[arg(long, value_delimiter = ',', required = true)]
    pub targets: Vec<String>,
    /// CA certificate (PEM) that `https://` targets' certificates chain to.
    #[arg(long)]
    pub cacert: Option<std::path::PathBuf>,
    /// Number of workers, each with its own keep-alive connection.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Measured run time (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured time before the measured window.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Per-request timeout.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Total requests per second, spread evenly over the workers (0: as fast as they can). Each
    /// worker sends on a fixed schedule, and latency counts from the scheduled time, so a stall
    /// is not hidden by the requests it delayed (no coordinated omission). That includes the
    /// load generator's own lateness (tokio's timer has 1 ms ticks; a busy machine wakes it
    /// late): on a machine it shares with the nodes, that is queueing a client would see too.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Load generator threads. One (the default) runs every connection on one thread (tokio's
    /// current-thread scheduler), which takes the least CPU from nodes that share the machine:
    /// three nodes and the bench on two cores did 13% more events/s (median of 16 interleaved
    /// pairs), at about 10% less node CPU per event, than with two threads. Raise it when the
    /// load generator's CPU per request (printed at the end) times the request rate nears one
    /// core.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,
    /// The nodes' `--api-token`, sent as a bearer token with every request to their own API
    /// (not to `/api/`, the services' endpoints; their `/metrics`, which the bench reads too,
    /// takes none). Prefer the env var, as `ps` shows flags.
    #[arg(long, env = "RAFTBRIDGE_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<crate::config::SecretText>,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum BenchCmd {
    /// replicated state-store writes
    State(StateArgs),
    /// commands through the proxy (e.g. the example service's `POST /api/v1/echo`)
    Commands(CommandsArgs),
    /// publishing events (acknowledged = committed on a quorum)
    Events(EventsArgs),
}

impl BenchCmd {
    /// The arguments every workload shares.
    pub fn common(&self) -> &CommonArgs {
        match self {
            BenchCmd::State(a) => &a.common,
            BenchCmd::Commands(a) => &a.common,
            BenchCmd::Events(a) => &a.common,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct EventsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Each event's payload size in bytes (exactly, from about 40 up: the payload carries its
    /// worker, sequence and index numbers besides the filler).
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Events per request: 1 uses `POST /v1/events/{name}`, more use the batch endpoint.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Event name.
    #[arg(long, default_value = "benchEvent")]
    pub name: String,
    /// Subscription whose end-to-end delivery latency (event accepted → handler called) is read
    /// from the targets' `/metrics` histograms when the window opens and again once the run's
    /// events are delivered (the demo service's `benchSink` consumes `benchEvent`).
    #[arg(long, default_value = "benchSink")]
    pub subscription: String,
    /// Give every event an idempotency key of its own (`idempotency-key`, or `idempotencyKey`
    /// in a batch), as producers that deduplicate their retries do: the nodes then keep up to
    /// `--dedup-max-keys` of them for the dedup window.
    #[arg(long)]
    pub keyed: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct StateArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Number of distinct keys written (chosen uniformly at random).
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Approximate JSON body size in bytes.
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// State store name.
    #[arg(long, default_value = "bench")]
    pub store: String,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CommandsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Path (and query) of the command endpoint. `{worker}`, `{seq}` and `{run}` (random per
    /// run) are replaced per request here, in `--header` values and in `--body`.
    #[arg(long, default_value = "/api/v1/echo")]
    pub path: String,
    /// HTTP method.
    #[arg(long, default_value = "POST", value_parser = parse_method)]
    pub method: Method,
    /// Request body, sent as `application/json` [default: {"hello":"world"} for POST, PUT and
    /// PATCH, none for other methods; `--body ''` sends none].
    #[arg(long)]
    pub body: Option<String>,
    /// Extra request header `name:value` (repeatable), e.g.
    /// `--header 'idempotency-key:bench-{run}-{worker}-{seq}'`.
    #[arg(long = "header", value_name = "NAME:VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
}

/// One request as built by a workload.
#[derive(Debug, Clone)]
pub struct BenchRequest {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The status that acknowledges it (`None`: any 2xx). A publish is acknowledged by 201
    /// only: a stray 200 from a wrong target must not count as a committed event.
    pub expect: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct Report {
    /// Header line, e.g. `bench state: 3 targets, 64 connections, 10.0s`.
    pub title: String,
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// Requests still unanswered when the window closed (neither acknowledged nor errors),
    /// and under `--rate` the slots they kept from being sent.
    pub unanswered: u64,
    pub unsent: u64,
    /// CPU the targets used over the measured window, summed (their `process_cpu_seconds_total`);
    /// `Ok(None)` when a target does not export it (not a raftbridge node, or not reachable),
    /// `Err` when one restarted during the window (its counter started over).
    pub node_cpu: Result<Option<Duration>, ()>,
    /// CPU this load generator used over the measured window.
    pub bench_cpu: Option<Duration>,
    /// This machine's busy and steal shares over the measured window, in percent.
    pub host: Option<(f64, f64)>,
    /// Under `--rate`: latencies count from each request's scheduled send (open loop).
    pub paced: bool,
}

impl Report {
    /// An error (a non-zero exit) for a run that acknowledged nothing, or failed more often
    /// than it succeeded: its figures describe failures, and a script must not take them.
    pub fn judge(&self) -> anyhow::Result<()> {
        if self.ok == 0 || self.errors > self.ok {
            bail!("the run failed: {} acknowledged, {} errors (see the error kinds above)", self.ok, self.errors);
        }
        Ok(())
    }

    /// CPU per acknowledged request, in microseconds.
    fn per_ok_us(&self, cpu: Option<Duration>) -> Option<f64> {
        cpu.filter(|_| self.ok > 0).map(|c| c.as_secs_f64() * 1e6 / self.ok as f64)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.title)?;
        writeln!(
            f,
            "acknowledged: {} ({:.1}/s)  errors: {}",
            self.ok, self.per_sec, self.errors
        )?;
        if self.ok == 0 {
            write!(f, "latency: n/a (nothing acknowledged)")?;
        } else {
            write!(
                f,
                "latency: p50 {}  p99 {}  p999 {}  max {}",
                fmt_us(self.p50_us),
                fmt_us(self.p99_us),
                fmt_us(self.p999_us),
                fmt_us(self.max_us)
            )?;
            // How to read them: closed-loop percentiles hide a stall (each connection sends
            // nothing while it waits, so a stall is one slow sample per connection).
            if self.paced {
                write!(f, "  (open loop: from each request's scheduled send)")?;
            } else {
                write!(f, "  (closed loop: each connection waits for its answer; --rate gives an open-loop schedule)")?;
            }
        }
        for (kind, n) in &self.error_kinds {
            write!(f, "\n  error {kind}: {n}")?;
        }
        if self.unanswered > 0 || self.unsent > 0 {
            write!(
                f,
                "\n  unanswered when the window closed: {} (not counted as acknowledged; those answered within --timeout after it are in the percentiles, with their whole latency); slots not sent behind them: {} (in the percentiles at a lower bound: the window's end less the slot)",
                self.unanswered, self.unsent
            )?;
        }
        let per = |c| self.per_ok_us(c).map_or_else(|| "n/a".to_string(), |us| format!("{us:.0} µs"));
        let nodes = match self.node_cpu {
            Ok(cpu) => per(cpu),
            Err(()) => "n/a (a target restarted during the window)".into(),
        };
        write!(
            f,
            "\ncpu per acknowledged request: nodes {nodes} (sum over the targets), load generator {}",
            per(self.bench_cpu)
        )?;
        if let Some((busy, steal)) = self.host {
            write!(f, "\nthis machine over the window: {busy:.0}% busy, {steal:.0}% stolen by the hypervisor")?;
        }
        Ok(())
    }
}

/// Formats microseconds with about three significant digits.
fn fmt_us(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    match us {
        0..=999 => format!("{us} µs"),
        1_000..=9_999 => format!("{ms:.2} ms"),
        10_000..=99_999 => format!("{ms:.1} ms"),
        100_000..=999_999 => format!("{ms:.0} ms"),
        _ => format!("{:.2} s", ms / 1000.0),
    }
}

/// Parses "10s", "500ms", "2m", "1h", "1.5s"; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 10s, 500ms, 2m"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        u => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {u:?} (use ms, s, m, h)"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Runs one bench subcommand, prints progress to stderr and the summary to stdout.
pub async fn run(cmd: BenchCmd) -> anyhow::Result<Report> {
    let report = match cmd {
        BenchCmd::State(args) => run_state(&args).await?,
        BenchCmd::Commands(args) => run_commands(&args).await?,
        BenchCmd::Events(args) => run_events(&args).await?,
    };
    println!("{report}");
    Ok(report)
}

async fn run_events(args: &EventsArgs) -> anyhow::Result<Report> {
    if args.batch == 0 || args.batch > 1000 {
        bail!("--batch must be 1..=1000");
    }
    // Padded to exactly `--size` bytes per payload (it used to assume 20 bytes of framing,
    // about 23 plus the numbers' digits: 10% over at 128).
    let filler: Arc<str> = "x".repeat(args.size).into();
    let (batch, name, keyed) = (args.batch, args.name.clone(), args.keyed);
    // Per run, so that a second run inside the dedup window is not answered from the first's keys.
    let run = format!("{:08x}", fastrand::u32(..));
    // Delivery latency to the subscription over this run only: the targets' histogram buckets
    // counted when the window opens and again once the run's events are delivered.
    let targets: Vec<String> = args.common.targets.iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
    let tls = client_tls(args.common.cacert.as_deref(), targets.iter().map(String::as_str))?;
    let window_opens = Instant::now() + args.common.warmup;
    let before = tokio::spawn({
        let (targets, tls, sub) = (targets.clone(), tls.clone(), args.subscription.clone());
        async move {
            sleep_until(window_opens).await;
            deliveries(&targets, tls, &sub).await
        }
    });
    let report = drive("events", &args.common, move |worker, seq| {
        let one = |i: usize| event_payload(&filler, worker, seq, i);
        let key = |i: usize| format!("bench-{run}-{worker}-{seq}-{i}");
        if batch == 1 {
            BenchRequest {
                method: Method::POST,
                path: format!("/v1/events/{name}"),
                headers: if keyed { vec![("idempotency-key".into(), key(0))] } else { Vec::new() },
                body: Bytes::from(one(0)),
                expect: Some(201),
            }
        } else {
            let items: Vec<String> = (0..batch)
                .map(|i| match keyed {
                    true => format!(r#"{{"eventName":"{name}","payload":{},"idempotencyKey":"{}"}}"#, one(i), key(i)),
                    false => format!(r#"{{"eventName":"{name}","payload":{}}}"#, one(i)),
                })
                .collect();
            BenchRequest {
                method: Method::POST,
                path: "/v1/events".into(),
                headers: Vec::new(),
                body: Bytes::from(format!("[{}]", items.join(","))),
                expect: Some(201),
            }
        }
    })
    .await?;
    let events = report.ok * args.batch as u64;
    println!(
        "events: {events} acknowledged ({:.1}/s, {} per request); publish-ack latency is the request latency below",
        events as f64 / report.elapsed.as_secs_f64().max(1e-9),
        args.batch
    );
    match report.node_cpu {
        Ok(cpu) => {
            if let Some(us) = report.per_ok_us(cpu) {
                println!("node cpu per acknowledged event: {:.1} µs (sum over the targets)", us / args.batch as f64);
            }
        }
        Err(()) => println!("node cpu per acknowledged event: n/a (a target restarted during the window)"),
    }
    let sub = &args.subscription;
    match before.await.ok().flatten() {
        None => println!("delivery to subscription {sub}: n/a (a target's /metrics could not be read)"),
        Some(before) => match delivered_since(&targets, tls, sub, &before, events).await {
            Delivered::Unreadable => println!("delivery to subscription {sub}: n/a (a target's /metrics could not be read)"),
            Delivered::Restarted => println!("delivery to subscription {sub}: n/a (a target restarted during the run: its counters started over)"),
            Delivered::Run(run) if run.count <= 0.0 => println!(
                "delivery to subscription {sub}: no deliveries (is a node consuming it? the demo service's benchSink consumes benchEvent)"
            ),
            Delivered::Run(run) => {
                // Those not delivered when polling stopped are not in the figures: said, as
                // they are the slow ones (in backoff, retried, or dropped by retention). The
                // window's edges count a few either way (an event delivered just before the
                // first scrape, one committed but answered after the window), so only a gap
                // past that is worth a word: 100 events and 0.1% of the run.
                let gap = events as f64 - run.count;
                let short = if gap >= 100.0_f64.max(events as f64 / 1000.0) {
                    format!("; {gap:.0} fewer deliveries than acknowledged events when polling stopped, left out of the figures")
                } else {
                    String::new()
                };
                println!(
                    "delivery to subscription {sub} (accepted → handler called, all consumers, this run): {:.0} deliveries for {events} events acknowledged, p50 {}, p99 {}, max {} (whole ms: the consumer's clock less the accepting node's event timestamp){short}",
                    run.count,
                    run.quantile_text(0.5),
                    run.quantile_text(0.99),
                    run.quantile_text(1.0),
                )
            }
        },
    }
    Ok(report)
}

/// One event's payload, `{"v":"xx..","w":worker,"n":seq,"i":index}`, padded with `filler`
/// (at least `size` long) to exactly `filler.len()` bytes, or as short as it gets without filler.
fn event_payload(filler: &str, worker: usize, seq: u64, i: usize) -> String {
    let head = r#"{"v":""#;
    let tail = format!(r#"","w":{worker},"n":{seq},"i":{i}}}"#);
    let pad = filler.len().saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", &filler[..pad])
}

/// Deliveries by latency bucket: the cumulative count per upper bound (in µs; `u64::MAX` for
/// `+Inf`) and the total, summed over targets or differenced between two moments.
#[derive(Debug, Default, Clone, PartialEq)]
struct Deliveries {
    buckets: BTreeMap<u64, f64>,
    count: f64,
}

impl Deliveries {
    /// `raftbridge_delivery_latency_seconds` (a histogram: `DELIVERY_LATENCY_BUCKETS`) for
    /// `sub` in one target's Prometheus text; empty when the target has not delivered any.
    fn parse(text: &str, sub: &str) -> Deliveries {
        let label = format!("subscription=\"{sub}\"");
        let mut out = Deliveries::default();
        for line in text.lines().filter(|l| l.contains(&label)) {
            let value = || line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if line.starts_with("raftbridge_delivery_latency_seconds_bucket{") {
                let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next());
                let bound = match le {
                    Some("+Inf") => Some(u64::MAX),
                    Some(le) => le.parse::<f64>().ok().map(|s| (s * 1e6).round() as u64),
                    None => None,
                };
                if let (Some(bound), Some(v)) = (bound, value()) {
                    *out.buckets.entry(bound).or_insert(0.0) += v;
                }
            } else if line.starts_with("raftbridge_delivery_latency_seconds_count") {
                out.count += value().unwrap_or(0.0);
            }
        }
        out
    }

    fn add(&mut self, other: &Deliveries) {
        for (b, v) in &other.buckets {
            *self.buckets.entry(*b).or_insert(0.0) += v;
        }
        self.count += other.count;
    }

    fn since(&self, before: &Deliveries) -> Deliveries {
        let buckets = self.buckets.iter().map(|(b, v)| (*b, v - before.buckets.get(b).copied().unwrap_or(0.0))).collect();
        Deliveries { buckets, count: self.count - before.count }
    }

    /// The run's deliveries over all targets: each target's since its own `before`, summed.
    /// `None` when a target's count went down (it restarted and its counters started over:
    /// summed first and then differenced, the figures came out wrong, even negative).
    fn since_each(after: &[Deliveries], before: &[Deliveries]) -> Option<Deliveries> {
        if after.len() != before.len() {
            return None;
        }
        let mut sum = Deliveries::default();
        for (a, b) in after.iter().zip(before) {
            if a.count < b.count || b.buckets.iter().any(|(le, v)| a.buckets.get(le).copied().unwrap_or(0.0) < *v) {
                return None;
            }
            sum.add(&a.since(b));
        }
        Some(sum)
    }

    /// The upper bound (µs) of the bucket holding the `q` quantile; `None` without deliveries.
    fn quantile(&self, q: f64) -> Option<u64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = (q * self.count).ceil().max(1.0);
        self.buckets.iter().find(|(_, cum)| **cum >= rank).map(|(b, _)| *b)
    }

    /// The quantile in whole ms: a bucket `(k - 0.5, k + 0.5]` ms holds exactly `k` (timestamps
    /// are whole ms); past `DELIVERY_EXACT_MS` the buckets are wider and the figure a bound.
    fn quantile_text(&self, q: f64) -> String {
        match self.quantile(q) {
            None => "n/a".into(),
            Some(u64::MAX) => format!("> {} ms", crate::broker::dispatch::DELIVERY_LATENCY_BUCKETS.last().map_or(0.0, |s| s * 1e3).floor()),
            Some(us) => {
                let ms = us.saturating_sub(500) / 1000;
                if ms <= crate::broker::dispatch::DELIVERY_EXACT_MS { format!("{ms} ms") } else { format!("≤ {ms} ms") }
            }
        }
    }
}

/// [`Deliveries`] of `sub` on each of `targets`; `None` if a target's `/metrics` fails.
async fn deliveries(targets: &[String], tls: Option<ClientTls>, sub: &str) -> Option<Vec<Deliveries>> {
    let scrapes = targets.iter().map(|t| {
        let tls = tls.clone();
        async move {
            let mut conn = Conn::new(t.clone()).with_tls(tls);
            let resp = conn.get("/metrics", Duration::from_secs(5)).await.ok()?;
            Some(Deliveries::parse(std::str::from_utf8(&resp.body).ok()?, sub))
        }
    });
    futures_util::future::join_all(scrapes).await.into_iter().collect()
}

/// What `delivered_since` found.
enum Delivered {
    /// A target's `/metrics` could not be read.
    Unreadable,
    /// A target restarted during the run (`Deliveries::since_each`).
    Restarted,
    Run(Deliveries),
}

/// Deliveries since `before`, once the run's events are delivered: polls until the count has
/// stood still for 1 s with at least `events` of them (an every-instance subscription delivers
/// each event once per node, so reaching `events` is not the end), or for 2 s short of it, or
/// 30 s passed, so the slowest deliveries of the run are in.
async fn delivered_since(targets: &[String], tls: Option<ClientTls>, sub: &str, before: &[Deliveries], events: u64) -> Delivered {
    let give_up = Instant::now() + Duration::from_secs(30);
    let (mut last, mut last_change) = (-1.0, Instant::now());
    loop {
        let Some(scraped) = deliveries(targets, tls.clone(), sub).await else { return Delivered::Unreadable };
        let Some(run) = Deliveries::since_each(&scraped, before) else { return Delivered::Restarted };
        let now = Instant::now();
        if run.count != last {
            (last, last_change) = (run.count, now);
        }
        let settled = Duration::from_secs(if run.count >= events as f64 { 1 } else { 2 });
        if now >= give_up || now.duration_since(last_change) >= settled {
            return Delivered::Run(run);
        }
        sleep(Duration::from_millis(250)).await;
    }
}

/// The value of the first sample of `name` in Prometheus' text format whose labels contain every
/// one of `labels` (each written `key="value"`); `None` if there is none.
fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn run_state(args: &StateArgs) -> anyhow::Result<Report> {
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    let store_ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if args.store.is_empty() || !args.store.chars().all(store_ok) {
        bail!(
            "--store {:?}: use letters, digits, '-', '_' or '.'",
            args.store
        );
    }
    // `{"v":"<filler>","n":<counter>}`: ~20 bytes of framing and counter around the filler.
    let filler: Arc<str> = "x".repeat(args.size.saturating_sub(20)).into();
    let (keys, prefix) = (args.keys, format!("/v1/state/{}/k", args.store));
    drive("state", &args.common, move |_worker, seq| BenchRequest {
        method: Method::PUT,
        path: format!("{prefix}{}", fastrand::u64(0..keys)),
        headers: Vec::new(),
        body: Bytes::from(format!(r#"{{"v":"{filler}","n":{seq}}}"#)),
        expect: None,
    })
    .await
}

/// Parses an HTTP method; lower case is accepted and sent upper case.
fn parse_method(s: &str) -> Result<Method, String> {
    let upper = s.trim().to_ascii_uppercase();
    if upper.is_empty() || !upper.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(format!("invalid method {s:?}: expected e.g. GET, POST"));
    }
    Method::from_bytes(upper.as_bytes()).map_err(|e| format!("invalid method {s:?}: {e}"))
}

/// Parses `name:value` (split at the first `:`, both sides trimmed; the value may be empty).
fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("invalid header {s:?}: expected name:value"))?;
    let (name, value) = (name.trim(), value.trim());
    http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("invalid header name {name:?} in {s:?}"))?;
    http::HeaderValue::from_str(value)
        .map_err(|_| format!("invalid header value {value:?} in {s:?}"))?;
    Ok((name.to_ascii_lowercase(), value.to_string()))
}

/// A string with optional `{worker}`, `{seq}`, `{run}` placeholders; the common case (none)
/// costs one clone per request.
#[derive(Debug, Clone)]
struct Template {
    text: String,
    dynamic: bool,
}

impl Template {
    const PLACEHOLDERS: [&'static str; 3] = ["{worker}", "{seq}", "{run}"];

    fn new(text: &str, run: &str) -> Template {
        // `{run}` is fixed for the whole run: substitute it once.
        let text = text.replace("{run}", run);
        let dynamic = Self::PLACEHOLDERS.iter().any(|p| text.contains(p));
        Template { text, dynamic }
    }

    fn expand(&self, worker: usize, seq: u64) -> String {
        if !self.dynamic {
            return self.text.clone();
        }
        self.text
            .replace("{worker}", &worker.to_string())
            .replace("{seq}", &seq.to_string())
    }
}

async fn run_commands(args: &CommandsArgs) -> anyhow::Result<Report> {
    if !args.path.starts_with('/') {
        bail!(
            "--path {:?}: must start with '/', e.g. /api/v1/echo",
            args.path
        );
    }
    let body = match &args.body {
        Some(b) => b.clone(),
        None if [Method::POST, Method::PUT, Method::PATCH].contains(&args.method) => {
            r#"{"hello":"world"}"#.to_string()
        }
        None => String::new(),
    };
    let run = format!("{:016x}", fastrand::u64(..));
    let path = Template::new(&args.path, &run);
    let body = Template::new(&body, &run);
    let static_body = (!body.dynamic).then(|| Bytes::from(body.text.clone()));
    let headers: Vec<(String, Template)> = args
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Template::new(v, &run)))
        .collect();
    let method = args.method.clone();
    let workload = format!("commands {} {}", args.method, args.path);
    drive(&workload, &args.common, move |worker, seq| BenchRequest {
        method: method.clone(),
        path: path.expand(worker, seq),
        headers: headers
            .iter()
            .map(|(k, v)| (k.clone(), v.expand(worker, seq)))
            .collect(),
        body: static_body
            .clone()
            .unwrap_or_else(|| Bytes::from(body.expand(worker, seq))),
        expect: None,
    })
    .await
}

/// Counters shared with the progress printer.
#[derive(Default)]
struct Progress {
    ok: AtomicU64,
    errors: AtomicU64,
    /// Slowest acknowledged request since the last progress line, in µs: shows when a stall
    /// happened, which the end-of-run percentiles cannot.
    max_us: AtomicU64,
}

/// What one worker measured.
struct WorkerStats {
    /// Requests acknowledged within the window.
    ok: u64,
    /// Latencies of acknowledged requests: those of the window, its request that was answered
    /// only after the window closed (waited for within `--timeout`), and under `--rate` the
    /// lower bounds of the slots it kept from being sent.
    hist: Histogram<u64>,
    /// Errors by kind.
    kinds: BTreeMap<String, u64>,
    /// Its request still unanswered when the window closed (0 or 1), and under `--rate` the
    /// slots that request kept from being sent.
    unanswered: u64,
    unsent: u64,
}

/// A latency histogram (µs) that holds every latency a run can measure without clamping: a
/// request's latency is at most the warmup, the window and its timeout (from its slot, under
/// `--rate`), and never less than a minute is allowed for.
fn new_histogram(longest: Duration) -> anyhow::Result<Histogram<u64>> {
    let high = u64::try_from(longest.as_micros()).unwrap_or(u64::MAX / 4).clamp(60_000_000, u64::MAX / 4);
    Histogram::new_with_bounds(1, high, 3).context("creating latency histogram")
}

/// The generic engine: `concurrency` closed-loop workers, worker `i` on `targets[i % n]`, each
/// sending `make_request(i, seq)` until the deadline. 2xx counts as acknowledged; other statuses
/// and client errors are counted by kind. Connection errors back off 50 ms, doubling up to 1 s.
pub async fn drive<F>(
    workload: &str,
    common: &CommonArgs,
    make_request: F,
) -> anyhow::Result<Report>
where
    F: Fn(usize, u64) -> BenchRequest + Send + Sync + 'static,
{
    let targets: Vec<String> = common
        .targets
        .iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    if targets.is_empty() {
        bail!("--targets: at least one address is required");
    }
    if common.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if common.duration.is_zero() {
        bail!("--duration must be positive");
    }
    if !(common.rate >= 0.0 && common.rate.is_finite()) {
        bail!("--rate must be a non-negative number");
    }
    // Each worker's interval under `--rate` (at most a day: a smaller rate sends nothing).
    let per_worker = match common.rate > 0.0 {
        true => Duration::try_from_secs_f64(common.concurrency as f64 / common.rate)
            .ok()
            .filter(|iv| *iv <= Duration::from_secs(86_400))
            .context("--rate is too small: a connection would send less than once a day")?,
        false => Duration::ZERO,
    };
    let tls = client_tls(common.cacert.as_deref(), targets.iter().map(String::as_str)).context("--targets")?;
    let mut title = format!(
        "bench {workload}: {} targets, {} connections, {:.1}s",
        targets.len(),
        common.concurrency,
        common.duration.as_secs_f64()
    );
    if common.rate > 0.0 {
        title.push_str(&format!(", paced at {:.0} req/s", common.rate));
    }
    eprintln!("{title} (warmup {:.1}s)", common.warmup.as_secs_f64());

    let start = Instant::now();
    let measure_from = start + common.warmup;
    let deadline = measure_from + common.duration;
    // The longest latency a request can have (`new_histogram`), with room to spare.
    let longest = (common.warmup + common.duration + common.timeout).saturating_mul(2);
    // The node's token goes to the node's own API only: never to a service's endpoint under
    // `/api/` (the proxy passes `Authorization` on to the app), nor beside one the user gave.
    let auth = common.api_token.as_deref().filter(|t| !t.is_empty()).map(|t| ("authorization".to_string(), format!("Bearer {t}")));
    let make_request = Arc::new(move |worker: usize, seq: u64| {
        let mut req = make_request(worker, seq);
        if !req.path.starts_with("/api/") && !req.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("authorization")) {
            req.headers.extend(auth.clone());
        }
        req
    });
    let progress = Arc::new(Progress::default());

    let mut workers = Vec::with_capacity(common.concurrency);
    for i in 0..common.concurrency {
        let conn = Conn::new(targets[i % targets.len()].clone()).with_tls(tls.clone());
        let (make, progress, timeout) = (make_request.clone(), progress.clone(), common.timeout);
        // Each worker's share of the rate; workers start staggered over one interval.
        let interval = (common.rate > 0.0).then_some(per_worker);
        let first = interval.map(|iv| start + iv.mul_f64(i as f64 / common.concurrency as f64));
        let pace = interval.zip(first);
        workers.push(tokio::spawn(async move {
            worker(i, conn, &*make, &progress, timeout, Window { measure_from, deadline, pace, longest }).await
        }));
    }
    let printer = tokio::spawn(print_progress(progress.clone(), measure_from, deadline));
    let cpu_at_start = tokio::spawn(cpu_sample(targets.clone(), tls.clone(), Some(measure_from)));
    // At the window's end, not once the workers are done: they may wait up to `--timeout` past
    // it for their last answers, CPU that the window's requests are not to be charged with.
    let cpu_at_end = tokio::spawn(cpu_sample(targets.clone(), tls.clone(), Some(deadline)));

    let (mut ok, mut hist, mut error_kinds, mut unanswered, mut unsent) = (0, new_histogram(longest)?, BTreeMap::new(), 0, 0);
    for w in workers {
        let stats = w.await.context("bench worker panicked")??;
        ok += stats.ok;
        hist.add(&stats.hist).context("merging latency histograms")?;
        for (kind, n) in stats.kinds {
            *error_kinds.entry(kind).or_insert(0) += n;
        }
        unanswered += stats.unanswered;
        unsent += stats.unsent;
    }
    printer.abort();
    let errors = error_kinds.values().sum();
    let (node_cpu, bench_cpu, host) = match (cpu_at_start.await, cpu_at_end.await) {
        (Ok(before), Ok(after)) => {
            (
                node_cpu_between(before.nodes, after.nodes),
                before.bench.zip(after.bench).map(|(b, a)| a.saturating_sub(b)),
                before.host.zip(after.host).and_then(|(b, a)| a.shares_since(&b)),
            )
        }
        _ => (Ok(None), None, None),
    };

    let elapsed = Instant::now()
        .min(deadline)
        .saturating_duration_since(measure_from);
    let per_sec = if elapsed.is_zero() {
        0.0
    } else {
        ok as f64 / elapsed.as_secs_f64()
    };
    Ok(Report {
        title,
        ok,
        errors,
        elapsed,
        per_sec,
        p50_us: hist.value_at_quantile(0.50),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
        error_kinds,
        unanswered,
        unsent,
        node_cpu,
        bench_cpu,
        host,
        paced: common.rate > 0.0,
    })
}

/// CPU counters at one moment.
struct CpuSample {
    /// Each target's CPU time in seconds (`None` unless every target exports
    /// `process_cpu_seconds_total`).
    nodes: Option<Vec<f64>>,
    /// This process's.
    bench: Option<Duration>,
    /// This machine's.
    host: Option<crate::process::HostCpu>,
}

/// The TLS configuration for `https://` addresses among `addrs`, from `--cacert` (the bench's
/// and the CLI's): an error names the file, or the first `https://` address when there is none.
pub(crate) fn client_tls<'a>(cacert: Option<&std::path::Path>, mut addrs: impl Iterator<Item = &'a str>) -> anyhow::Result<Option<ClientTls>> {
    let tls = cacert.map(|ca| ClientTls::from_ca_file(ca).with_context(|| format!("--cacert {}", ca.display()))).transpose()?;
    if let (None, Some(https)) = (&tls, addrs.find(|a| a.trim().starts_with("https://"))) {
        bail!("{https}: an https:// address needs --cacert (the CA its certificate chains to)");
    }
    Ok(tls)
}

/// [`CpuSample`] at `at` (or now).
async fn cpu_sample(targets: Vec<String>, tls: Option<ClientTls>, at: Option<Instant>) -> CpuSample {
    if let Some(at) = at {
        sleep_until(at).await;
    }
    let (bench, host) = (crate::process::cpu_time(), crate::process::host_cpu());
    let scrapes = targets.into_iter().map(|t| {
        let tls = tls.clone();
        async move {
            let mut conn = Conn::new(t).with_tls(tls);
            let resp = conn.get("/metrics", Duration::from_secs(5)).await.ok()?;
            metric_value(std::str::from_utf8(&resp.body).ok()?, "process_cpu_seconds_total", &[])
        }
    });
    let nodes = futures_util::future::join_all(scrapes).await.into_iter().collect::<Option<Vec<f64>>>();
    CpuSample { nodes, bench, host }
}

/// The targets' CPU over the window, summed: each target's since its own first sample, so a
/// target that restarted during the run (its counter went down) makes it `Err(())` rather than
/// a figure that is too small (summed first, the drop was taken off the others' CPU).
fn node_cpu_between(before: Option<Vec<f64>>, after: Option<Vec<f64>>) -> Result<Option<Duration>, ()> {
    let (Some(before), Some(after)) = (before, after) else { return Ok(None) };
    if before.len() != after.len() {
        return Ok(None);
    }
    let mut sum = 0.0;
    for (b, a) in before.iter().zip(&after) {
        if a < b {
            return Err(());
        }
        sum += a - b;
    }
    Ok(Duration::try_from_secs_f64(sum).ok())
}

/// When a worker measures and stops, and its pace when the load is paced.
struct Window {
    /// Requests started from here on are measured (after the warmup).
    measure_from: Instant,
    /// No request starts after it.
    deadline: Instant,
    /// (interval between this worker's requests, its first slot) under `--rate`.
    pace: Option<(Duration, Instant)>,
    /// The longest latency a request can have (`new_histogram`).
    longest: Duration,
}

async fn worker<F>(
    index: usize,
    mut conn: Conn,
    make_request: &F,
    progress: &Progress,
    timeout: Duration,
    window: Window,
) -> anyhow::Result<WorkerStats>
where
    F: Fn(usize, u64) -> BenchRequest,
{
    let Window { measure_from, deadline, pace, longest } = window;
    let (mut ok, mut hist, mut kinds, mut unanswered, mut unsent) = (0, new_histogram(longest)?, BTreeMap::new(), 0, 0);
    let mut backoff = BACKOFF_MIN;
    for seq in 0.. {
        // Paced: wait for this request's slot and count its latency from the slot, the time it
        // was meant to be sent, whether the previous request or the generator's own lateness
        // delayed it (no coordinated omission: a stall is charged to every request it held up).
        let started = match pace {
            Some((interval, first)) => {
                let slot = first + interval.mul_f64(seq as f64);
                if slot >= deadline {
                    break;
                }
                sleep_until(slot).await;
                slot
            }
            None => Instant::now(),
        };
        if started >= deadline {
            break;
        }
        let req = make_request(index, seq);
        let headers: Vec<(&str, &str)> = req
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let acknowledged = |resp: &crate::client::Response| match req.expect {
            Some(status) => resp.status == status,
            None => resp.is_success(),
        };
        let result = {
            let sent = conn.request(req.method.clone(), &req.path, &headers, req.body.clone(), timeout);
            tokio::pin!(sent);
            let Ok(result) = timeout_at(deadline, &mut sent).await else {
                // Still unanswered at the end: said as such, not left out silently, and its
                // latency is in the percentiles once it is answered (within its own timeout, which
                // bounds this wait): a stall at the end of the window would otherwise leave only
                // the requests it did not hold up there. Not counted as acknowledged in the window.
                if Instant::now() >= measure_from {
                    unanswered = 1;
                    if let Ok(resp) = sent.await {
                        if acknowledged(&resp) {
                            hist.saturating_record(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
                        }
                    }
                    // Under `--rate`, the slots this request held up until the end were never sent:
                    // counted, and in the percentiles at what they had waited by the end (a lower
                    // bound of their latency).
                    if let Some((interval, first)) = pace {
                        let next = first + interval.mul_f64((seq + 1) as f64);
                        let behind = deadline.saturating_duration_since(next).as_secs_f64() / interval.as_secs_f64().max(1e-9);
                        unsent = behind.ceil() as u64;
                        for k in 0..unsent {
                            let slot = next + interval.mul_f64(k as f64);
                            hist.saturating_record(u64::try_from(deadline.saturating_duration_since(slot).as_micros()).unwrap_or(u64::MAX).max(1));
                        }
                    }
                }
                break;
            };
            result
        };
        let done = Instant::now();
        let latency_us = u64::try_from(done.saturating_duration_since(started).as_micros()).unwrap_or(u64::MAX);
        // Counted by when it finished: the rate is what was acknowledged within the window,
        // including requests sent during the warmup that the window saw answered.
        let measured = done >= measure_from;
        let failure = match result {
            Ok(resp) => {
                backoff = BACKOFF_MIN; // the node answered: the connection is fine
                (!acknowledged(&resp)).then(|| format!("status {}", resp.status))
            }
            Err(e) => {
                tracing::debug!(target = conn.addr(), error = %e, "bench request failed");
                if e.is_connection() {
                    sleep_until((Instant::now() + backoff).min(deadline)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                } else {
                    // An error that comes back at once (a bad address) must not keep this
                    // worker from yielding to the others on a one-thread runtime.
                    tokio::task::yield_now().await;
                }
                Some(e.kind().to_string())
            }
        };
        match failure {
            None if measured => {
                ok += 1;
                hist.saturating_record(latency_us);
                progress.ok.fetch_add(1, Ordering::Relaxed);
                progress.max_us.fetch_max(latency_us, Ordering::Relaxed);
            }
            Some(kind) if measured => {
                *kinds.entry(kind).or_insert(0) += 1;
                progress.errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    Ok(WorkerStats { ok, hist, kinds, unanswered, unsent })
}

/// Prints `[  3s] acknowledged 63012  21034/s  errors 0  max 4.1 ms` to stderr every second of
/// the window (max: the slowest acknowledged request of that second).
async fn print_progress(progress: Arc<Progress>, measure_from: Instant, deadline: Instant) {
    let mut tick = tokio::time::interval_at(
        measure_from + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut last_ok = 0;
    loop {
        let now = tick.tick().await;
        if now > deadline {
            break;
        }
        let ok = progress.ok.load(Ordering::Relaxed);
        let errors = progress.errors.load(Ordering::Relaxed);
        let secs = now.duration_since(measure_from).as_secs_f64();
        let max_ms = progress.max_us.swap(0, Ordering::Relaxed) as f64 / 1000.0;
        eprintln!(
            "[{secs:>4.0}s] acknowledged {ok}  {}/s  errors {errors}  max {max_ms:.1} ms",
            ok - last_ok
        );
        last_ok = ok;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;

    /// Decides whether a request is what the workload under test should send.
    type Validator = Arc<dyn Fn(&http::request::Parts, &Bytes) -> bool + Send + Sync>;

    /// Hyper server on 127.0.0.1:0 answering every request with `status`; PUTs to the state API
    /// are validated (path shape, JSON body) and answered 400 if malformed.
    async fn server(status: u16) -> String {
        server_with(
            status,
            Arc::new(|parts, body| {
                parts.method == Method::PUT
                    && parts
                        .uri
                        .path()
                        .strip_prefix("/v1/state/bench/k")
                        .is_some_and(|k| k.parse::<u64>().is_ok_and(|k| k < 10))
                    && serde_json::from_slice::<serde_json::Value>(body)
                        .is_ok_and(|v| v["v"].is_string() && v["n"].is_u64())
                    && (100..140).contains(&body.len())
            }),
        )
        .await
    }

    /// Hyper server on 127.0.0.1:0 answering `status` to requests `valid` accepts, else 400.
    /// `GET /metrics` reports a CPU time that grows by 2 s per scrape, like a node's.
    async fn server_with(status: u16, valid: Validator) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scrapes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (valid, scrapes) = (valid.clone(), scrapes.clone());
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (valid, scrapes) = (valid.clone(), scrapes.clone());
                        async move {
                            if req.method() == Method::GET && req.uri().path() == "/metrics" {
                                let n = scrapes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                let text = format!("# TYPE process_cpu_seconds_total gauge\nprocess_cpu_seconds_total {}\n", 1 + 2 * n);
                                return Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(text))));
                            }
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let valid = valid(&parts, &body);
                            let mut resp =
                                http::Response::new(Full::new(Bytes::from_static(b"{}")));
                            *resp.status_mut() =
                                http::StatusCode::from_u16(if valid { status } else { 400 })
                                    .unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        format!("http://{addr}")
    }

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: BenchCmd,
    }

    /// Hyper server on 127.0.0.1:0 answering every request 200 after `delay`.
    async fn slow_server(delay: Duration) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"{}"))))
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
            }
        });
        format!("http://{addr}")
    }

    /// A stall at the end of the window: the requests it holds are answered after the window
    /// closed. They are not acknowledged in it, but their whole latency is in the percentiles
    /// (left out, the figures described only the requests the stall did not hold up).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_answered_after_the_window_is_in_the_percentiles() {
        let r = run(state_cmd(vec![slow_server(Duration::from_millis(1500)).await])).await.unwrap();
        assert_eq!((r.ok, r.errors, r.unanswered), (0, 0, 4), "{r}");
        assert!(r.p50_us >= 1_400_000 && r.max_us < 5_000_000, "{r:?}");
    }

    #[test]
    fn event_payloads_are_the_size_asked_for() {
        let filler = "x".repeat(128);
        for (w, seq, i) in [(0, 0, 0), (63, 123_456_789, 999), (7, 42, 3)] {
            let p = event_payload(&filler, w, seq, i);
            assert_eq!(p.len(), 128, "{p}");
            let v: serde_json::Value = serde_json::from_str(&p).unwrap();
            assert_eq!((v["w"].as_u64(), v["n"].as_u64(), v["i"].as_u64()), (Some(w as u64), Some(seq), Some(i as u64)));
        }
        // Smaller than its numbers: as short as it gets.
        assert_eq!(event_payload("x", 1, 2, 3), r#"{"v":"","w":1,"n":2,"i":3}"#);
    }

    #[test]
    fn a_target_that_restarted_gives_no_figures_rather_than_wrong_ones() {
        assert_eq!(node_cpu_between(Some(vec![10.0, 20.0]), Some(vec![12.0, 23.0])), Ok(Some(Duration::from_secs(5))));
        assert_eq!(node_cpu_between(Some(vec![10.0, 20.0]), Some(vec![12.0, 0.5])), Err(()), "the second restarted");
        assert_eq!(node_cpu_between(None, Some(vec![1.0])), Ok(None));
        let d = |count: f64, first: f64| Deliveries { buckets: BTreeMap::from([(1_000, first), (u64::MAX, count)]), count };
        let run = Deliveries::since_each(&[d(10.0, 5.0), d(7.0, 7.0)], &[d(4.0, 2.0), d(1.0, 1.0)]).expect("no restart");
        assert_eq!((run.count, run.buckets[&1_000]), (12.0, 9.0));
        assert_eq!(Deliveries::since_each(&[d(10.0, 5.0), d(3.0, 3.0)], &[d(4.0, 2.0), d(5.0, 5.0)]), None, "the second restarted");
    }

    fn state_cmd(targets: Vec<String>) -> BenchCmd {
        let argv = [
            "x",
            "state",
            "--targets",
            &targets.join(","),
            "--concurrency",
            "4",
            "--duration",
            "1s",
        ];
        let mut cmd =
            Cli::try_parse_from(argv.iter().chain(&["--warmup", "200ms", "--keys", "10"]))
                .unwrap()
                .cmd;
        let BenchCmd::State(args) = &mut cmd else {
            unreachable!("parsed `state`")
        };
        assert_eq!(
            (args.size, args.store.as_str(), args.common.timeout),
            (128, "bench", Duration::from_secs(5))
        );
        cmd
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn state_against_ok_server() {
        let a = server(200).await;
        let b = server(200).await.trim_start_matches("http://").to_string(); // both forms accepted
        let r = run(state_cmd(vec![a, b])).await.unwrap();
        assert!(r.ok > 0, "{r}");
        assert_eq!(r.errors, 0, "{r}");
        assert!(r.error_kinds.is_empty());
        assert!(
            r.elapsed >= Duration::from_millis(900) && r.elapsed <= Duration::from_millis(1100),
            "{:?}",
            r.elapsed
        );
        assert!(
            r.p50_us > 0 && r.p50_us <= r.p99_us && r.p99_us <= r.p999_us && r.p999_us <= r.max_us
        );
        assert!(r
            .to_string()
            .starts_with("bench state: 2 targets, 4 connections, 1.0s\nacknowledged: "));
        // Each target's CPU grew by 2 s between the scrape at the window's start and its end.
        assert_eq!(r.node_cpu, Ok(Some(Duration::from_secs(4))), "{r}");
        assert!(r.bench_cpu.is_some(), "{r}");
        assert!(r.host.is_some_and(|(busy, steal)| (0.0..=100.0).contains(&busy) && (0.0..=100.0).contains(&steal)), "{r}");
        assert!(r.to_string().contains("\ncpu per acknowledged request: nodes "), "{r}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_counted_by_kind() {
        let r = run(state_cmd(vec![server(503).await])).await.unwrap();
        assert_eq!(r.ok, 0);
        assert!(r.errors > 0);
        assert!(r.to_string().contains("\ncpu per acknowledged request: nodes n/a (sum over the targets), load generator n/a"), "{r}");
        assert_eq!(r.error_kinds.get("status 503"), Some(&r.errors), "{r}");

        // A closed port: connection errors, backed off rather than spun.
        let port = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = run(state_cmd(vec![format!("127.0.0.1:{port}")]))
            .await
            .unwrap();
        assert_eq!(r.ok, 0);
        assert_eq!(r.error_kinds.get("connect"), Some(&r.errors), "{r}");
        assert_eq!(r.node_cpu, Ok(None), "no target to ask: {r}");
        assert!(r.errors <= 4 * 25, "backoff bounds the error rate: {r}");
    }

    fn parse_bench(argv: &[&str]) -> Result<BenchCmd, clap::Error> {
        Cli::try_parse_from(std::iter::once("x").chain(argv.iter().copied())).map(|c| c.cmd)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commands_against_ok_server() {
        // Every request must be the configured command, and every idempotency key unique.
        let seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let seen2 = seen.clone();
        let a = server_with(
            200,
            Arc::new(move |parts, body| {
                let header = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok());
                let key = header("idempotency-key").unwrap_or_default().to_string();
                parts.method == Method::POST
                    && parts.uri.path() == "/api/v1/echo"
                    && header("x-bench") == Some("yes")
                    && header("content-type") == Some("application/json")
                    && body.as_ref() == br#"{"hello":"world"}"#
                    && key.starts_with("k-")
                    && key.split('-').count() == 4
                    && seen2.lock().unwrap().insert(key)
            }),
        )
        .await;
        let cmd = parse_bench(&[
            "commands",
            "--targets",
            &a,
            "--concurrency",
            "3",
            "--duration",
            "1s",
            "--warmup",
            "100ms",
            "--header",
            "X-Bench: yes",
            "--header",
            "idempotency-key:k-{run}-{worker}-{seq}",
        ])
        .unwrap();
        let BenchCmd::Commands(args) = &cmd else {
            unreachable!("parsed `commands`")
        };
        assert_eq!(
            (args.path.as_str(), &args.method, args.body.as_deref()),
            ("/api/v1/echo", &Method::POST, None)
        );
        let r = run(cmd).await.unwrap();
        assert!(r.ok > 0, "{r}");
        assert_eq!(r.errors, 0, "{r}");
        assert!(seen.lock().unwrap().len() as u64 >= r.ok);
        assert!(r
            .to_string()
            .starts_with("bench commands POST /api/v1/echo: 1 targets, 3 connections, 1.0s\n"));

        // GET with a per-request path and no body by default; a 504 counts as an error.
        let b = server_with(
            504,
            Arc::new(|parts, body| {
                parts.method == Method::GET
                    && body.is_empty()
                    && parts
                        .uri
                        .path_and_query()
                        .is_some_and(|p| p.as_str().starts_with("/api/v1/slow?ms=1&w="))
            }),
        )
        .await;
        let argv = [
            "commands",
            "--targets",
            &b,
            "--method",
            "get",
            "--concurrency",
            "2",
            "--duration",
            "500ms",
            "--warmup",
            "0s",
            "--path",
            "/api/v1/slow?ms=1&w={worker}",
        ];
        let r = run(parse_bench(&argv).unwrap()).await.unwrap();
        assert_eq!(r.ok, 0, "{r}");
        assert!(r.errors > 0, "{r}");
        assert_eq!(r.error_kinds.get("status 504"), Some(&r.errors), "{r}");
    }

    #[tokio::test]
    async fn commands_rejects_bad_args() {
        let base = ["commands", "--targets", "127.0.0.1:1"];
        for bad in [
            &["--header", "no-colon"][..],
            &["--header", "bad name:v"],
            &["--method", "P O"],
            &["--method", ""],
        ] {
            assert!(
                parse_bench(&[&base[..], bad].concat()).is_err(),
                "{bad:?} should be rejected"
            );
        }
        let cmd = parse_bench(&[&base[..], &["--path", "api/v1/echo"]].concat()).unwrap();
        let err = run(cmd).await.unwrap_err().to_string();
        assert!(err.contains("must start with '/'"), "{err}");
    }

    #[test]
    fn templates_expand_placeholders() {
        let t = Template::new("/c/{worker}/{seq}/{run}", "r1");
        assert_eq!(t.expand(3, 42), "/c/3/42/r1");
        let t = Template::new("plain-{run}", "r2");
        assert!(!t.dynamic);
        assert_eq!(t.expand(1, 1), "plain-r2");
        assert_eq!(
            parse_header(" Idempotency-Key : a:b "),
            Ok(("idempotency-key".into(), "a:b".into()))
        );
        assert_eq!(parse_method("patch"), Ok(Method::PATCH));
    }

    #[tokio::test]
    async fn drive_rejects_bad_args() {
        let common = CommonArgs {
            api_token: None,
            cacert: None,
            targets: vec![],
            concurrency: 1,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            timeout: Duration::from_secs(1),
            rate: 0.0,
            threads: 1,
        };
        let make = |_, _| BenchRequest {
            method: Method::GET,
            path: "/".into(),
            headers: vec![],
            body: Bytes::new(),
            expect: None,
        };
        assert!(drive("t", &common, make).await.is_err());
        assert!(drive(
            "t",
            &CommonArgs {
                api_token: None,
                targets: vec!["a:1".into()],
                concurrency: 0,
                ..common
            },
            make
        )
        .await
        .is_err());
    }

    #[test]
    fn delivery_latency_is_the_difference_of_two_scrapes() {
        let scrape = |n: [u64; 4]| {
            format!(
                "# TYPE raftbridge_delivery_latency_seconds histogram\n\
                 raftbridge_delivery_latency_seconds_bucket{{subscription=\"benchSink\",le=\"0.0015\"}} {}\n\
                 raftbridge_delivery_latency_seconds_bucket{{subscription=\"benchSink\",le=\"0.0025\"}} {}\n\
                 raftbridge_delivery_latency_seconds_bucket{{subscription=\"benchSink\",le=\"0.0255\"}} {}\n\
                 raftbridge_delivery_latency_seconds_bucket{{subscription=\"benchSink\",le=\"+Inf\"}} {}\n\
                 raftbridge_delivery_latency_seconds_sum{{subscription=\"benchSink\"}} 1.5\n\
                 raftbridge_delivery_latency_seconds_count{{subscription=\"benchSink\"}} {}\n\
                 raftbridge_delivery_latency_seconds_count{{subscription=\"other\"}} 999\n",
                n[0], n[1], n[2], n[3], n[3]
            )
        };
        // Before the run: 100 deliveries at 1 ms, from an earlier run.
        let before = Deliveries::parse(&scrape([100, 100, 100, 100]), "benchSink");
        // The run adds 90 at 2 ms, 9 at ≤ 25 ms and 1 past the last bound; two targets.
        let mut after = Deliveries::parse(&scrape([100, 190, 199, 200]), "benchSink");
        after.add(&Deliveries::parse("", "benchSink"));
        let run = after.since(&before);
        assert_eq!(run.count, 100.0, "only the run's deliveries");
        assert_eq!(run.quantile_text(0.5), "2 ms", "the earlier run's 1 ms deliveries are not in it");
        assert_eq!(run.quantile_text(0.9), "2 ms");
        assert_eq!(run.quantile_text(0.99), "≤ 25 ms");
        assert_eq!(run.quantile_text(1.0), "> 60000 ms");
        assert_eq!(Deliveries::default().quantile_text(0.5), "n/a");
        assert_eq!(Deliveries::parse(&scrape([1, 2, 3, 4]), "nobody"), Deliveries::default());
    }

    #[test]
    fn a_run_that_mostly_failed_is_an_error() {
        let report = |ok, errors| Report {
            title: String::new(), ok, errors, elapsed: Duration::from_secs(1), per_sec: 0.0, p50_us: 0, p99_us: 0,
            p999_us: 0, max_us: 0, error_kinds: BTreeMap::new(), unanswered: 0, unsent: 0, node_cpu: Ok(None), bench_cpu: None, host: None, paced: false,
        };
        assert!(report(10, 1).judge().is_ok());
        assert!(report(0, 0).judge().is_err(), "nothing acknowledged");
        assert!(report(5, 6).judge().is_err(), "more errors than acknowledgements");
        assert!(report(0, 0).to_string().contains("latency: n/a"));
    }

    #[test]
    fn metric_values_by_name_and_labels() {
        let text = "# TYPE process_cpu_seconds_total gauge\nprocess_cpu_seconds_total 12.5\n\
            process_cpu_seconds_total_other 3\n\
            d_seconds{subscription=\"a\",quantile=\"0.5\"} 0.25\n\
            d_seconds{subscription=\"b\",quantile=\"0.5\"} 0.5\n\
            d_seconds_count{subscription=\"b\"} 7\n";
        assert_eq!(metric_value(text, "process_cpu_seconds_total", &[]), Some(12.5));
        assert_eq!(metric_value(text, "d_seconds", &["subscription=\"b\"", "quantile=\"0.5\""]), Some(0.5));
        assert_eq!(metric_value(text, "d_seconds_count", &["subscription=\"b\""]), Some(7.0));
        assert_eq!(metric_value(text, "d_seconds", &["subscription=\"c\""]), None);
        assert_eq!(metric_value(text, "process_cpu", &[]), None, "a prefix of a name is not the name");
        assert_eq!(metric_value("other 1\n", "process_cpu_seconds_total", &[]), None);
    }

    #[test]
    fn parse_durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "10x", "-1s", "1.2.3s", "ms10"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn formats_latency() {
        assert_eq!(fmt_us(950), "950 µs");
        assert_eq!(fmt_us(2_314), "2.31 ms");
        assert_eq!(fmt_us(11_200), "11.2 ms");
        assert_eq!(fmt_us(250_000), "250 ms");
        assert_eq!(fmt_us(2_500_000), "2.50 s");
    }
}
