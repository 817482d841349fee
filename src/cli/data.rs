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

/// Which node, and how to talk to it.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Address of any node: `host:port`, `http://host:port`, or `https://host:port` with
    /// --cacert.
    #[arg(long, env = "RAFTBRIDGE_HTTP_ADDR", default_value = "127.0.0.1:8401")]
    http_addr: String,
    /// PEM file of the CA that an `https://` node's certificate must chain to.
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// The node's `--api-token` (or its read token, for reads), if it has one; prefer the env
    /// var.
    #[arg(long, env = "RAFTBRIDGE_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
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
        /// Print at most this many keys.
        #[arg(long, default_value_t = DEFAULT_MAX)]
        max: u64,
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
        /// Print at most this many events.
        #[arg(long, default_value_t = DEFAULT_MAX)]
        max: u64,
    },
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
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
        buf
    } else {
        text.to_string()
    };
    serde_json::from_str::<&serde_json::value::RawValue>(&text).with_context(|| format!("{what} is not JSON (quote a string: '\"text\"')"))?;
    Ok(Bytes::from(text.trim().to_string()))
}

fn key_path(args: &KeyArgs) -> String {
    format!("/v1/{}/{}/{}", space(args.config), percent_encode(&args.store), percent_encode(&args.key))
}

fn space(config: bool) -> &'static str {
    if config { "config" } else { "state" }
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

pub async fn kv(cmd: KvCmd) -> anyhow::Result<()> {
    match cmd {
        KvCmd::Get { key, stale, revision } => {
            let mut client = Client::new(&key.target)?;
            let path = format!("{}{}", key_path(&key), if stale { "?consistency=stale" } else { "" });
            let resp = client.call(http::Method::GET, &path, Bytes::new(), CALL_TIMEOUT, &[]).await?;
            if !resp.is_success() {
                return Err(failed(&resp));
            }
            if revision {
                let value: serde_json::Value = resp.json()?;
                let rev = resp.headers.get("x-revision").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                print_json(&serde_json::json!({ "value": value, "revision": rev }));
            } else {
                println!("{}", String::from_utf8_lossy(&resp.body));
            }
            Ok(())
        }
        KvCmd::Put { key, value, ttl, if_revision } => {
            let body = json_arg(&value, "VALUE")?;
            let mut client = Client::new(&key.target)?;
            let path = match ttl {
                Some(ttl) => format!("{}?ttl={ttl}", key_path(&key)),
                None => key_path(&key),
            };
            let pre = if_revision.map(|r| r.to_string());
            let extra: Vec<(&str, &str)> = pre.iter().map(|r| ("if-match", r.as_str())).collect();
            let resp = client.call(http::Method::PUT, &path, body, CALL_TIMEOUT, &extra).await?;
            if !resp.is_success() {
                return Err(failed(&resp));
            }
            print_json(&resp.json()?);
            Ok(())
        }
        KvCmd::Delete { key, if_revision } => {
            let mut client = Client::new(&key.target)?;
            let pre = if_revision.map(|r| r.to_string());
            let extra: Vec<(&str, &str)> = pre.iter().map(|r| ("if-match", r.as_str())).collect();
            let resp = client.call(http::Method::DELETE, &key_path(&key), Bytes::new(), CALL_TIMEOUT, &extra).await?;
            if !resp.is_success() {
                return Err(failed(&resp));
            }
            print_json(&resp.json()?);
            Ok(())
        }
        KvCmd::List { target, store, prefix, config, max } => {
            let mut client = Client::new(&target)?;
            let (mut after, mut printed) = (None::<String>, 0u64);
            // Bounded by `max`: each page prints at least one key or ends the listing.
            while printed < max {
                let limit = (max - printed).min(crate::store::MAX_LIST as u64);
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
                let page: serde_json::Value = resp.json()?;
                let items = page["items"].as_array().context("the listing has no items")?;
                for item in items.iter().take((max - printed) as usize) {
                    print_json(item);
                    printed += 1;
                }
                match page["next"].as_str() {
                    Some(next) if !items.is_empty() => after = Some(next.to_string()),
                    _ => break,
                }
            }
            Ok(())
        }
    }
}

pub async fn events(cmd: EventsCmd) -> anyhow::Result<()> {
    match cmd {
        EventsCmd::Publish { target, event_name, payload, idempotency_key } => {
            let body = json_arg(&payload, "PAYLOAD")?;
            let mut client = Client::new(&target)?;
            let extra: Vec<(&str, &str)> = idempotency_key.iter().map(|k| ("idempotency-key", k.as_str())).collect();
            let resp = client.call(http::Method::POST, &format!("/v1/events/{}", percent_encode(&event_name)), body, CALL_TIMEOUT, &extra).await?;
            if !resp.is_success() {
                return Err(failed(&resp));
            }
            print_json(&resp.json()?);
            Ok(())
        }
        EventsCmd::Tail { target, after, event_name, follow, max } => {
            let mut client = Client::new(&target)?;
            let (mut after, mut printed) = (after, 0u64);
            let name = event_name.map(|n| format!("&eventName={}", percent_encode(&n))).unwrap_or_default();
            let stop = tokio::signal::ctrl_c();
            tokio::pin!(stop);
            // Bounded by `max`, or by Ctrl-C while following; without --follow, by the log's end.
            while printed < max {
                let limit = (max - printed).min(1000);
                let wait = if follow { format!("&wait={FOLLOW_WAIT}") } else { String::new() };
                let path = format!("/v1/events?after={after}&limit={limit}{name}{wait}");
                let call = client.call(http::Method::GET, &path, Bytes::new(), FOLLOW_TIMEOUT, &[]);
                let resp = tokio::select! {
                    resp = call => resp?,
                    _ = &mut stop => return Ok(()),
                };
                if !resp.is_success() {
                    return Err(failed(&resp));
                }
                let page: serde_json::Value = resp.json()?;
                let events = page["events"].as_array().context("the page has no events")?;
                for event in events.iter().take((max - printed) as usize) {
                    print_json(event);
                    printed += 1;
                }
                let next = page["next"].as_u64().context("the page has no next position")?;
                let end = page["end"].as_u64().unwrap_or(0);
                // Read on after `next` (with --event-name a page may hold none and still move
                // it on); without --follow, done once it reaches the log's end (the node's
                // own test), or should it not move.
                if !follow && (next.saturating_add(1) >= end || next <= after) {
                    break;
                }
                after = next.max(after);
            }
            Ok(())
        }
    }
}
