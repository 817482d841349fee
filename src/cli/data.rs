//! `raftbridge kv` and `raftbridge events`: the state, config and event APIs from a shell, as
//! `consul kv` and `nats pub`/`nats sub` serve theirs, so that an operator needs neither curl
//! nor hand-made percent-encoding and paging. Each call is one of the HTTP API's routes through
//! `client::Conn` (any node: it forwards writes), and prints what the node answered: JSON on
//! stdout, one line per item for listings and the event log (for `jq` and `grep`); an error
//! answer is the command's error (exit 1), with the node's message.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Subcommand;

use crate::proxy::routing::percent_encode;

/// A request's deadline (a write's own, `--write-timeout-ms`, is at most 5 minutes, 5 s unless
/// set; a read's far less).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The long poll of `events tail --follow`: under the node's 5-minute bound, and answered
/// (empty) well within the request's own deadline.
const FOLLOW_WAIT: &str = "25s";
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(40);
/// Items `kv list` and `events tail` print at most unless told (`--max`): a listing of a
/// million keys is not what a shell wants by accident.
const DEFAULT_MAX: u64 = 10_000;
/// Bytes of a value or payload read from stdin at most: more than any node's `--max-body`
/// (at most half of the largest `--max-frame`).
const MAX_STDIN: u64 = 64 << 20;

/// Which node, and how to talk to it.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Address of any node: `host:port`, `http://host:port`, or `https://host:port` with
    /// --cacert. By default a node's own default (`raftbridge node` binds 127.0.0.1:8400);
    /// the env var is the node's too, so inside a node's container this finds that node.
    #[arg(long, env = "RAFTBRIDGE_HTTP_ADDR", default_value = "127.0.0.1:8400")]
    http_addr: String,
    /// PEM file of the CA that an `https://` node's certificate must chain to.
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// The node's `--api-token` (or its read token, for reads), if it has one; prefer the env
    /// var.
    #[arg(long, env = "RAFTBRIDGE_API_TOKEN", hide_env_values = true)]
    api_token: Option<crate::config::SecretText>,
}

/// A key of the state store, or of the config store with `--config`.
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    #[command(flatten)]
    target: Target,
    store: String,
    key: String,
    /// The config store's key, not the state store's.
    #[arg(long)]
    config: bool,
}

#[derive(Debug, Subcommand)]
pub enum KvCmd {
    /// Print a key's value (JSON); exit 1 when it is absent.
    Get {
        #[command(flatten)]
        key: KeyArgs,
        /// Read this node's copy (`?consistency=stale`) instead of a linearizable read.
        #[arg(long)]
        stale: bool,
        /// Print `{"value":..,"revision":N}` (the revision for a later --if-revision).
        #[arg(long)]
        revision: bool,
    },
    /// Set a key to VALUE (JSON; `-` reads it from stdin); prints `{"revision":N}`.
    Put {
        #[command(flatten)]
        key: KeyArgs,
        value: String,
        /// Remove the key this many seconds later.
        #[arg(long)]
        ttl: Option<u64>,
        /// Only while the key has this revision (0: only while it is absent).
        #[arg(long)]
        if_revision: Option<u64>,
    },
    /// Remove a key; exit 1 when it is absent.
    Delete {
        #[command(flatten)]
        key: KeyArgs,
        /// Only while the key has this revision.
        #[arg(long)]
        if_revision: Option<u64>,
    },
    /// Print a store's keys in order, one `{"key","value","revision"}` line each, paging
    /// through them.
    List {
        #[command(flatten)]
        target: Target,
        store: String,
        /// Only the keys that start with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// The config store's keys, not the state store's.
        #[arg(long)]
        config: bool,
        /// Print at most this many keys (a note on stderr says when more were left).
        #[arg(long, default_value_t = DEFAULT_MAX)]
        max: u64,
        /// Keys asked for per request (1 to 10,000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        page_size: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCmd {
    /// Publish one event (PAYLOAD is JSON; `-` reads it from stdin); prints `{"id","position"}`
    /// once it is committed.
    Publish {
        #[command(flatten)]
        target: Target,
        event_name: String,
        payload: String,
        /// Its message id: a repeat within the dedup window answers the first id and position.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Print the event log in order, one event (JSON) a line, from the oldest retained (or
    /// after --after) to its end; with --follow, go on printing new events until Ctrl-C.
    Tail {
        #[command(flatten)]
        target: Target,
        /// Start after this position.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Only events of this name.
        #[arg(long)]
        event_name: Option<String>,
        /// Wait for new events at the end (long polls) instead of stopping there.
        #[arg(long)]
        follow: bool,
        /// Print at most this many events (a note on stderr says when more were left).
        #[arg(long, default_value_t = DEFAULT_MAX)]
        max: u64,
        /// Events asked for per request (1 to 1000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1000))]
        page_size: u64,
    },
    /// Fetch events of a pull subscription (`[pull]` in the node's config) from the node, one
    /// `{"ackId","position","event"}` a line; answer them on any node with `events ack`,
    /// `events nack` or `events term` (or --ack here, once all are printed: an ack that comes after an ack
    /// deadline finds its lease gone, and the command then fails naming those ids, which are
    /// delivered again).
    Fetch {
        #[command(flatten)]
        target: Target,
        subscription: String,
        /// Events to take at most (1 to 1000).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
        max: u64,
        /// How long to wait for the first when the node holds none (such as 5s; at most 5m).
        #[arg(long, default_value = "5s", value_parser = parse_wait)]
        wait: Duration,
        /// Ack what was printed.
        #[arg(long)]
        ack: bool,
    },
    /// Ack fetched events by their ack ids: each is settled. Prints `{"acked","unknown"}`.
    Ack {
        #[command(flatten)]
        target: Target,
        subscription: String,
        #[arg(required = true)]
        ack_ids: Vec<String>,
    },
    /// Nack fetched events by their ack ids: each attempt fails (with --reason), and the event
    /// comes again after its backoff or goes to the dead letters. Prints `{"nacked","unknown"}`.
    Nack(Failure),
    /// Terminate fetched events by their ack ids: each can never be handled, and goes to the
    /// dead letters now (with --reason) instead of after its attempts. Prints
    /// `{"terminated","unknown"}`.
    Term(Failure),
    /// Move a shared subscription's cursor: its delivery starts again at POSITION, an event
    /// position (`start`: the oldest retained event; `end`: after the newest), to process
    /// retained events again or to skip them. Acks and attempts since are forgotten, dead
    /// letters kept. Prints `{"name","cursor"}`.
    Seek {
        #[command(flatten)]
        target: Target,
        subscription: String,
        position: String,
    },
}

/// What `events nack` and `events term` take.
#[derive(Debug, clap::Args)]
pub struct Failure {
    #[command(flatten)]
    target: Target,
    subscription: String,
    #[arg(required = true)]
    ack_ids: Vec<String>,
    /// Why (kept with the failed attempt and in the dead letters).
    #[arg(long)]
    reason: Option<String>,
}

/// A connection to the target and the headers every call sends.
struct Client {
    conn: crate::client::Conn,
    auth: Option<(&'static str, String)>,
    addr: String,
}

impl Client {
    fn new(target: &Target) -> anyhow::Result<Client> {
        Ok(Client {
            conn: super::connect_to(&target.http_addr, target.cacert.as_deref())?,
            auth: super::bearer_header(target.api_token.as_deref()),
            addr: target.http_addr.clone(),
        })
    }

    /// The answer, whatever its status (the callers judge it).
    async fn call(&mut self, method: http::Method, path: &str, body: Bytes, timeout: Duration, extra: &[(&str, &str)]) -> anyhow::Result<crate::client::Response> {
        let mut headers: Vec<(&str, &str)> = self.auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
        headers.extend_from_slice(extra);
        let what = format!("{method} {path}");
        self.conn.request(method, path, &headers, body, timeout).await.with_context(|| format!("{what} to {}", self.addr))
    }
}

/// The error of an answer that is not a 2xx: its status and the node's message.
fn failed(resp: &crate::client::Response) -> anyhow::Error {
    let body = String::from_utf8_lossy(&resp.body);
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string());
    let hint = if resp.status == 401 { " (give the node's token with --api-token or RAFTBRIDGE_API_TOKEN)" } else { "" };
    anyhow::anyhow!("HTTP {}: {message}{hint}", resp.status)
}

/// JSON given on the command line, or read from stdin for `-`; checked here, so that a typo
/// is not sent (the node would refuse it too, with less to go on).
fn json_arg(text: &str, what: &str) -> anyhow::Result<Bytes> {
    let text = if text == "-" {
        let mut buf = String::new();
        // Bounded: no node takes a body past `MAX_STDIN` (`--max-body` is at most half a frame).
        let read = std::io::Read::read_to_string(&mut std::io::Read::take(std::io::stdin(), MAX_STDIN + 1), &mut buf).context("reading stdin")?;
        if read as u64 > MAX_STDIN {
            anyhow::bail!("{what} on stdin is larger than {MAX_STDIN} bytes");
        }
        buf
    } else {
        text.to_string()
    };
    serde_json::from_str::<&serde_json::value::RawValue>(&text).with_context(|| format!("{what} is not JSON (quote a string: '\"text\"')"))?;
    Ok(Bytes::from(text.trim().to_string()))
}

/// `--if-revision` as the `If-Match` header the store routes take.
fn if_match(revision: Option<&str>) -> Vec<(&'static str, &str)> {
    revision.map(|r| ("if-match", r)).into_iter().collect()
}

fn key_path(args: &KeyArgs) -> String {
    format!("/v1/{}/{}/{}", space(args.config), percent_encode(&args.store), percent_encode(&args.key))
}

fn space(config: bool) -> &'static str {
    if config { "config" } else { "state" }
}

/// One line on stdout. A reader that went away (`| head`) ends the command quietly: Rust
/// ignores SIGPIPE, and `println!` would panic on the closed pipe.
fn print_line(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(anyhow::Error::new(Closed)),
        other => other.context("writing to stdout"),
    }
}

/// Stdout was closed by its reader: not a failure of the command.
#[derive(Debug, thiserror::Error)]
#[error("stdout closed")]
struct Closed;

/// A listing page or an event-log page, its items kept as the node wrote them: through
/// `serde_json::Value` a value's keys came out sorted and its large integers as floats, where
/// the stores keep what the client wrote.
#[derive(serde::Deserialize)]
struct Page<'a, N> {
    #[serde(borrow, alias = "events")]
    items: Vec<&'a serde_json::value::RawValue>,
    next: Option<N>,
    #[serde(default)]
    end: Option<u64>,
}

/// `result` less the quiet end of `print_line`.
fn quietly(result: anyhow::Result<()>) -> anyhow::Result<()> {
    match result {
        Err(e) if e.is::<Closed>() => Ok(()),
        other => other,
    }
}

fn note_cut(max: u64, what: &str) {
    eprintln!("note: stopped after --max {max} {what}; more follow (raise --max, or go on with --after)");
}

pub async fn kv(cmd: KvCmd) -> anyhow::Result<()> {
    quietly(kv_inner(cmd).await)
}

async fn kv_inner(cmd: KvCmd) -> anyhow::Result<()> {
    match cmd {
        KvCmd::Get { key, stale, revision } => {
            let mut client = Client::new(&key.target)?;
            let path = format!("{}{}", key_path(&key), if stale { "?consistency=stale" } else { "" });
            let resp = client.call(http::Method::GET, &path, Bytes::new(), CALL_TIMEOUT, &[]).await?;
            if !resp.is_success() {
                return Err(failed(&resp));
            }
            let value = String::from_utf8_lossy(&resp.body);
            if revision {
                let rev = resp.headers.get("x-revision").and_then(|v| v.to_str().ok()?.parse::<u64>().ok()).context("the answer has no x-revision")?;
                // The value as stored, not re-encoded.
                print_line(&format!("{{\"value\":{},\"revision\":{rev}}}", value.trim()))
            } else {
                print_line(&value)
            }
        }
        KvCmd::Put { key, value, ttl, if_revision } => {
            let body = json_arg(&value, "VALUE")?;
            let mut client = Client::new(&key.target)?;
            let path = match ttl {
                Some(ttl) => format!("{}?ttl={ttl}", key_path(&key)),
                None => key_path(&key),
            };
            let pre = if_revision.map(|r| r.to_string());
            let extra = if_match(pre.as_deref());
            let resp = client.call(http::Method::PUT, &path, body, CALL_TIMEOUT, &extra).await?;
            if !resp.is_success() {
                return Err(failed(&resp));
            }
            print_line(String::from_utf8_lossy(&resp.body).trim())
        }
        KvCmd::Delete { key, if_revision } => {
            let mut client = Client::new(&key.target)?;
            let pre = if_revision.map(|r| r.to_string());
            let extra = if_match(pre.as_deref());
            let resp = client.call(http::Method::DELETE, &key_path(&key), Bytes::new(), CALL_TIMEOUT, &extra).await?;
            if !resp.is_success() {
                return Err(failed(&resp));
            }
            print_line(String::from_utf8_lossy(&resp.body).trim())
        }
        KvCmd::List { target, store, prefix, config, max, page_size } => {
            let mut client = Client::new(&target)?;
            let (mut after, mut printed) = (None::<String>, 0u64);
            // Bounded by `max`: each page prints at least one key or ends the listing.
            loop {
                let limit = (max - printed).clamp(1, page_size);
                let mut path = format!("/v1/{}/{}?limit={limit}", space(config), percent_encode(&store));
                if !prefix.is_empty() {
                    path.push_str(&format!("&prefix={}", percent_encode(&prefix)));
                }
                if let Some(after) = &after {
                    path.push_str(&format!("&after={}", percent_encode(after)));
                }
                let resp = client.call(http::Method::GET, &path, Bytes::new(), CALL_TIMEOUT, &[]).await?;
                if !resp.is_success() {
                    return Err(failed(&resp));
                }
                let page: Page<'_, String> = serde_json::from_slice(&resp.body).context("the listing is not a page of items")?;
                for item in page.items.iter().take((max - printed) as usize) {
                    print_line(item.get())?;
                    printed += 1;
                }
                match page.next {
                    Some(next) if !page.items.is_empty() => {
                        if printed >= max {
                            note_cut(max, "keys");
                            return Ok(());
                        }
                        after = Some(next);
                    }
                    _ => return Ok(()),
                }
            }
        }
    }
}

pub async fn events(cmd: EventsCmd) -> anyhow::Result<()> {
    quietly(events_inner(cmd).await)
}

/// Failed calls in a row `events tail --follow` rides out (a leader change, a node restarting,
/// its long polls full), a second apart, before it gives up.
const FOLLOW_RETRIES: u32 = 60;

async fn events_inner(cmd: EventsCmd) -> anyhow::Result<()> {
    match cmd {
        EventsCmd::Publish { target, event_name, payload, idempotency_key } => {
            let body = json_arg(&payload, "PAYLOAD")?;
            let mut client = Client::new(&target)?;
            let extra: Vec<(&str, &str)> = idempotency_key.iter().map(|k| ("idempotency-key", k.as_str())).collect();
            let resp = client.call(http::Method::POST, &format!("/v1/events/{}", percent_encode(&event_name)), body, CALL_TIMEOUT, &extra).await?;
            if !resp.is_success() {
                return Err(failed(&resp));
            }
            print_line(String::from_utf8_lossy(&resp.body).trim())
        }
        EventsCmd::Fetch { target, subscription, max, wait: wait_for, ack } => {
            let mut client = Client::new(&target)?;
            let path = format!("/v1/subscriptions/{}/fetch?max={max}&wait={}ms", percent_encode(&subscription), wait_for.as_millis());
            // The node waits up to `wait` (at least its cold start's 3 s) before it answers.
            let resp = client.call(http::Method::POST, &path, Bytes::new(), CALL_TIMEOUT + wait_for, &[]).await?;
            if !resp.is_success() {
                return Err(failed(&resp));
            }
            #[derive(serde::Deserialize)]
            struct Fetched<'a> {
                #[serde(borrow)]
                messages: Vec<&'a serde_json::value::RawValue>,
            }
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Id {
                ack_id: String,
            }
            let fetched: Fetched<'_> = serde_json::from_slice(&resp.body).context("the answer is not a fetch's")?;
            let mut ids = Vec::with_capacity(fetched.messages.len());
            for m in &fetched.messages {
                print_line(m.get())?;
                ids.push(serde_json::from_str::<Id>(m.get()).context("a message without its ackId")?.ack_id);
            }
            if ack && !ids.is_empty() {
                let body = Bytes::from(serde_json::to_vec(&serde_json::json!({ "ackIds": ids }))?);
                let path = format!("/v1/subscriptions/{}/ack", percent_encode(&subscription));
                let resp = client.call(http::Method::POST, &path, body, CALL_TIMEOUT, &[]).await?;
                if !resp.is_success() {
                    return Err(failed(&resp));
                }
                let answer: serde_json::Value = serde_json::from_slice(&resp.body).context("the ack's answer is not JSON")?;
                if let Some(unknown) = answer["unknown"].as_array().filter(|u| !u.is_empty()) {
                    anyhow::bail!("{} of the events printed were not acked (their ack deadline passed: they are delivered again): {}", unknown.len(), serde_json::Value::Array(unknown.clone()));
                }
            }
            Ok(())
        }
        EventsCmd::Ack { target, subscription, ack_ids } => subscription_post(&target, &subscription, "ack", serde_json::json!({ "ackIds": ack_ids })).await,
        EventsCmd::Nack(f) => subscription_post(&f.target, &f.subscription, "nack", failure_body(f.ack_ids, f.reason)).await,
        EventsCmd::Term(f) => subscription_post(&f.target, &f.subscription, "term", failure_body(f.ack_ids, f.reason)).await,
        EventsCmd::Seek { target, subscription, position } => {
            let position = match position.as_str() {
                "start" | "end" => serde_json::json!(position),
                n => serde_json::json!(n.parse::<u64>().map_err(|_| anyhow::anyhow!("POSITION is an event position, start or end, not {n:?}"))?),
            };
            subscription_post(&target, &subscription, "seek", serde_json::json!({ "position": position })).await
        }
        EventsCmd::Tail { target, after, event_name, follow, max, page_size } => {
            let mut client = Client::new(&target)?;
            let (mut after, mut printed, mut failures) = (after, 0u64, 0u32);
            let name = event_name.map(|n| format!("&eventName={}", percent_encode(&n))).unwrap_or_default();
            let stop = tokio::signal::ctrl_c();
            tokio::pin!(stop);
            // Bounded by `max` and, while following, by Ctrl-C and `FOLLOW_RETRIES`; without
            // --follow, by the log's end.
            loop {
                let limit = (max - printed).clamp(1, page_size);
                let wait = if follow { format!("&wait={FOLLOW_WAIT}") } else { String::new() };
                let path = format!("/v1/events?after={after}&limit={limit}{name}{wait}");
                let call = client.call(http::Method::GET, &path, Bytes::new(), FOLLOW_TIMEOUT, &[]);
                let resp = tokio::select! {
                    resp = call => resp,
                    _ = &mut stop => return Ok(()),
                };
                let resp = match resp {
                    Ok(resp) if resp.is_success() => resp,
                    // A 4xx is the request's: no retry helps.
                    Ok(resp) if !follow || (400..500).contains(&resp.status) || failures >= FOLLOW_RETRIES => return Err(failed(&resp)),
                    Err(e) if !follow || failures >= FOLLOW_RETRIES => return Err(e),
                    other => {
                        let why = other.map_or_else(|e| e.to_string(), |r| failed(&r).to_string());
                        eprintln!("note: {why}; retrying");
                        failures += 1;
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            _ = &mut stop => return Ok(()),
                        }
                    }
                };
                failures = 0;
                let page: Page<'_, u64> = serde_json::from_slice(&resp.body).context("the answer is not a page of events")?;
                for event in page.items.iter().take((max - printed) as usize) {
                    print_line(event.get())?;
                    printed += 1;
                }
                let next = page.next.context("the page has no next position")?;
                // `end` is the last position the node holds: done (without --follow) once
                // `next` reaches it (with --event-name a page may hold none and still move it
                // on), or should it not move.
                let at_end = next >= page.end.unwrap_or(0) || next <= after;
                if printed >= max {
                    if !at_end {
                        note_cut(max, "events");
                    }
                    return Ok(());
                }
                if !follow && at_end {
                    return Ok(());
                }
                after = next.max(after);
            }
        }
    }
}

/// The body of a nack or a term: the ids, and the reason when one is given.
fn failure_body(ack_ids: Vec<String>, reason: Option<String>) -> serde_json::Value {
    let mut body = serde_json::json!({ "ackIds": ack_ids });
    if let Some(reason) = reason {
        body["reason"] = serde_json::json!(reason);
    }
    body
}

/// `events ack`, `nack`, `term` and `seek`: `POST /v1/subscriptions/{subscription}/{what}`
/// with `body`, and the node's answer printed.
async fn subscription_post(target: &Target, subscription: &str, what: &str, body: serde_json::Value) -> anyhow::Result<()> {
    let mut client = Client::new(target)?;
    let path = format!("/v1/subscriptions/{}/{what}", percent_encode(subscription));
    let resp = client.call(http::Method::POST, &path, Bytes::from(serde_json::to_vec(&body)?), CALL_TIMEOUT, &[]).await?;
    if !resp.is_success() {
        return Err(failed(&resp));
    }
    print_line(String::from_utf8_lossy(&resp.body).trim())?;
    // An ack, nack or term of an id no node holds a lease for did nothing: a script must see it.
    let answer: serde_json::Value = serde_json::from_slice(&resp.body).context("the answer is not JSON")?;
    if let Some(unknown) = answer["unknown"].as_array().filter(|u| !u.is_empty()) {
        anyhow::bail!("{} of the ids were not answered: no node holds their lease (answered already, or past their ack deadline: their events are delivered again), or the node that does could not be asked (those are `unreached` too)", unknown.len());
    }
    Ok(())
}

/// `events fetch --wait`: a duration the node takes (at most 5 minutes, as it caps a wait).
fn parse_wait(text: &str) -> Result<Duration, String> {
    crate::config::parse_duration(text).map(|d| d.min(Duration::from_secs(300))).map_err(|_| "a duration such as 5s or 500ms".to_string())
}

