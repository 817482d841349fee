//! The routing table: which command a `METHOD /api/v{version}/{path}` request names, and which
//! nodes offer it.
//!
//! Built from the replicated registry and cached by the registry's revision (the log index of its
//! last change), so a request costs one map lookup plus a pattern match over the commands of that
//! method and version. Liveness is not part of the table: the proxy filters the nodes by the peer
//! links at request time, so a dead node drops out as soon as its link does.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::raft::types::NodeId;
use crate::sdk::CommandDecl;
use crate::sdk::ServiceDecl;

/// One routable command.
#[derive(Debug, Clone)]
pub struct Route {
    pub service: String,
    pub version: u32,
    pub decl: CommandDecl,
    /// Nodes that registered it.
    pub nodes: Vec<NodeId>,
}

/// What a request path resolves to.
pub enum Lookup<'a> {
    Found { route: &'a Route, params: BTreeMap<String, String> },
    /// The path exists for other methods: these (sorted, for the `Allow` header).
    WrongMethod(Vec<String>),
    NotFound,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    pub revision: u64,
    /// (version, METHOD) → routes.
    routes: BTreeMap<(u32, String), Vec<Route>>,
    /// The registry it was built from, to tell which nodes left it at the next build.
    registry: BTreeMap<NodeId, Vec<ServiceDecl>>,
    /// Nodes that left the registry (a drained node clears its entry) within `DEPARTED_FOR`,
    /// with when this node saw it and what they offered (`RouteTable::next`).
    departed: BTreeMap<NodeId, (Instant, Vec<ServiceDecl>)>,
    /// Their commands, as routes with no nodes, looked up only when no registered command
    /// takes the request (so they never shadow one), and not listed by `all`.
    departed_routes: BTreeMap<(u32, String), Vec<Route>>,
}

/// How long the commands of a node that left the registry stay known, offered by no node: a
/// request for one is a 503 (no node offers it right now) rather than a 404 (no such command)
/// while its only offering node restarts, as Envoy answers for a route whose cluster has no
/// healthy endpoint. A command nobody offers for longer than this is gone: 404.
pub const DEPARTED_FOR: Duration = Duration::from_secs(60);

impl RouteTable {
    /// The table for `registry` at `revision`, seen at `now`: nodes in this table's registry that
    /// are not in the new one join the departed (a node back in the registry leaves them), and
    /// departed nodes older than `DEPARTED_FOR` are forgotten. Their commands are routes with
    /// no nodes, added only where no registered node's command already takes the path.
    pub fn next(&self, revision: u64, registry: BTreeMap<NodeId, Vec<ServiceDecl>>, now: Instant) -> RouteTable {
        let mut departed: BTreeMap<NodeId, (Instant, Vec<ServiceDecl>)> = self
            .departed
            .iter()
            .filter(|(node, (at, _))| !registry.contains_key(node) && now.saturating_duration_since(*at) < DEPARTED_FOR)
            .map(|(node, d)| (*node, d.clone()))
            .collect();
        for (node, services) in &self.registry {
            if !registry.contains_key(node) {
                departed.insert(*node, (now, services.clone()));
            }
        }
        let mut table = RouteTable::build(revision, &registry);
        table.add_departed(&departed);
        table.registry = registry;
        table.departed = departed;
        table
    }

    /// When the oldest departed node is to be forgotten (the table must be built again then).
    pub fn expires(&self) -> Option<Instant> {
        self.departed.values().map(|(at, _)| *at + DEPARTED_FOR).min()
    }

    /// Routes with no nodes for the departed nodes' commands (`departed_routes`).
    fn add_departed(&mut self, departed: &BTreeMap<NodeId, (Instant, Vec<ServiceDecl>)>) {
        for svc in departed.values().flat_map(|(_, services)| services) {
            for cmd in &svc.commands {
                let list = self.departed_routes.entry((svc.version, cmd.method.to_ascii_uppercase())).or_default();
                let path = cmd.path.trim_matches('/');
                if list.iter().any(|r| r.decl.path.trim_matches('/') == path) {
                    continue;
                }
                list.push(Route { service: svc.name.clone(), version: svc.version, decl: cmd.clone(), nodes: Vec::new() });
                list.sort_by_cached_key(|r| specificity(&r.decl.path));
            }
        }
    }

    pub fn build(revision: u64, registry: &BTreeMap<NodeId, Vec<ServiceDecl>>) -> RouteTable {
        let mut by_key: BTreeMap<(u32, String, String), Route> = BTreeMap::new();
        for (node, services) in registry {
            for svc in services {
                for cmd in &svc.commands {
                    let key = (svc.version, cmd.method.to_ascii_uppercase(), cmd.path.trim_matches('/').to_string());
                    let route = by_key.entry(key).or_insert_with(|| Route {
                        service: svc.name.clone(),
                        version: svc.version,
                        decl: cmd.clone(),
                        nodes: Vec::new(),
                    });
                    // Two services claiming one path: the first (by node, then name) wins,
                    // deterministically on every node.
                    if route.service == svc.name && route.decl.name == cmd.name {
                        // Nodes that disagree (a rolling upgrade that changed the declaration):
                        // the cautious reading of each, not the lowest node id's. Retried after a
                        // lost answer only if every node says it may be, and cut off at the
                        // shortest timeout any of them declares.
                        route.decl.idempotent &= cmd.idempotent;
                        route.decl.timeout_ms = route.decl.timeout_ms.min(cmd.timeout_ms);
                        if svc.available {
                            route.nodes.push(*node);
                        }
                    }
                }
            }
        }
        let mut routes: BTreeMap<(u32, String), Vec<Route>> = BTreeMap::new();
        for ((version, method, _), route) in by_key {
            routes.entry((version, method)).or_default().push(route);
        }
        // A literal segment is tried before a parameter in the same place (`orders/recent`
        // before `orders/:id`), leftmost segment first; `lookup` takes the first match. Path
        // order alone put `:` before letters, so a parameter hid the literal routes beside it.
        for list in routes.values_mut() {
            list.sort_by_cached_key(|r| specificity(&r.decl.path));
        }
        RouteTable { revision, routes, ..RouteTable::default() }
    }

    pub fn lookup(&self, version: u32, method: &str, path: &str) -> Lookup<'_> {
        // Leading slashes only: `echo/` is not `echo` (`match_path`), nor `echo//`.
        let path = path.trim_start_matches('/');
        let key = (version, method.to_string());
        // A registered command first; a departed node's only where none takes the request.
        for table in [&self.routes, &self.departed_routes] {
            for route in table.get(&key).into_iter().flatten() {
                if let Some(params) = match_path(&route.decl.path, path) {
                    return Lookup::Found { route, params };
                }
            }
        }
        // Keys are sorted by (version, method), so the methods come sorted and once each.
        let allowed: Vec<String> = self
            .routes
            .iter()
            .filter(|((v, _), rs)| *v == version && rs.iter().any(|r| match_path(&r.decl.path, path).is_some()))
            .map(|((_, m), _)| m.clone())
            .collect();
        if allowed.is_empty() { Lookup::NotFound } else { Lookup::WrongMethod(allowed) }
    }

    /// The command `name` of `service` `version`, as a handler calls it (`Ctx::invoke`): one
    /// route offered by every node that registers it under any method or path (a rolling
    /// change of either puts it in two routes), or a departed node's with no node (503, as
    /// `lookup` finds it for a client); `None` when no node declares it.
    pub fn by_name(&self, service: &str, version: u32, name: &str) -> Option<Route> {
        let named = |r: &&Route| r.service == service && r.version == version && r.decl.name == name;
        let mut found: Option<Route> = None;
        for route in self.routes.values().flatten().filter(named) {
            match &mut found {
                None => found = Some(route.clone()),
                Some(first) => {
                    // The cautious reading of the declarations, as `build` takes within one
                    // route: a node that moved the command may also have made it no longer
                    // idempotent, or given it a shorter timeout.
                    first.decl.idempotent &= route.decl.idempotent;
                    first.decl.timeout_ms = first.decl.timeout_ms.min(route.decl.timeout_ms);
                    for n in &route.nodes {
                        if !first.nodes.contains(n) {
                            first.nodes.push(*n);
                        }
                    }
                }
            }
        }
        found.or_else(|| self.departed_routes.values().flatten().find(named).cloned())
    }

    /// Every route, for `/openapi.json`.
    pub fn all(&self) -> impl Iterator<Item = &Route> {
        self.routes.values().flatten()
    }

    /// Every node that offers anything.
    pub fn nodes(&self) -> BTreeSet<NodeId> {
        self.all().flat_map(|r| r.nodes.iter().copied()).collect()
    }
}

/// Sort key of a route pattern: per segment, literal (0) before parameter (1), then the path
/// itself so the order is total and the same on every node.
fn specificity(pattern: &str) -> (Vec<u8>, String) {
    let pattern = pattern.trim_matches('/');
    (pattern.split('/').map(|seg| u8::from(seg.starts_with(':'))).collect(), pattern.to_string())
}

/// Matches a request path (relative to `/api/v{version}/`) against a pattern such as
/// `counter/:name/increment`, returning the `:params` (percent-decoded). One leading `/` on either
/// side is ignored; otherwise segments must match one for one: `echo/` does not match `echo`, and
/// an empty segment never matches a parameter. `None` when the path does not match or a parameter
/// is not valid percent-encoded UTF-8.
pub fn match_path(pattern: &str, path: &str) -> Option<BTreeMap<String, String>> {
    let pattern = pattern.strip_prefix('/').unwrap_or(pattern);
    let path = path.strip_prefix('/').unwrap_or(path);
    let mut segments = path.split('/');
    let mut params = BTreeMap::new();
    for want in pattern.split('/') {
        let got = segments.next()?;
        match want.strip_prefix(':') {
            Some(name) if !got.is_empty() => {
                // `.` and `..` (also as `%2E%2E`) name no resource: sent on to an app, a server
                // that normalises paths would read them as a step up to a path never exposed.
                let value = percent_decode(got)?;
                if value == "." || value == ".." {
                    return None;
                }
                params.insert(name.to_string(), value);
            }
            _ if want == got && !got.is_empty() => {}
            _ => return None,
        }
    }
    segments.next().is_none().then_some(params)
}

/// Decode `%XX` escapes (and `+` as space when `plus` is set, for query strings).
pub fn percent_decode_with(s: &str, plus: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                // Exactly two hex digits (`from_str_radix` alone would take a sign: `%+5`).
                let digit = |b: u8| char::from(b).to_digit(16);
                let (hi, lo) = (digit(*bytes.get(i + 1)?)?, digit(*bytes.get(i + 2)?)?);
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn percent_decode(s: &str) -> Option<String> {
    percent_decode_with(s, false)
}

/// Percent-encodes everything but RFC 3986 unreserved characters (a path segment or a query
/// value that decodes to `s` exactly).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parse a query string into parameters (later duplicates win). `None` on a malformed escape.
pub fn parse_query(q: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode_with(k, true)?, percent_decode_with(v, true)?);
    }
    Some(out)
}

/// A shared, cheaply cloned table.
pub type SharedTable = Arc<RouteTable>;

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(name: &str, method: &str, path: &str) -> CommandDecl {
        CommandDecl {
            name: name.into(),
            method: method.into(),
            path: path.into(),
            idempotent: false,
            timeout_ms: 30_000,
            input_schema: None,
            output_schema: None,
            success_event: None,
        }
    }

    #[test]
    fn paths_match_with_params() {
        let p = match_path("counter/:name/increment", "/counter/a%20b/increment").unwrap();
        assert_eq!(p.get("name").map(String::as_str), Some("a b"));
        assert!(match_path("counter/:name/increment", "counter//increment").is_none());
        assert!(match_path("echo", "echo/more").is_none());
        assert!(match_path("echo", "echo/").is_none(), "a trailing slash is a different path");
        // A parameter is never a step in the path, written plainly or escaped.
        for dots in ["..", ".", "%2E%2E", "%2e.", "%2E"] {
            assert!(match_path("orders/:id/cancel", &format!("/orders/{dots}/cancel")).is_none(), "{dots}");
        }
        assert!(match_path("orders/:id/cancel", "/orders/...x/cancel").is_some());
        assert_eq!(parse_query("ms=5&x=a+b&y=%2F").unwrap().get("x").map(String::as_str), Some("a b"));
        assert!(parse_query("bad=%zz").is_none());
        assert!(parse_query("bad=%+5").is_none() && parse_query("bad=%-1").is_none() && parse_query("bad=%4").is_none());
        assert_eq!(parse_query("ok=%4a%4A").unwrap().get("ok").map(String::as_str), Some("JJ"));
    }

    #[test]
    fn a_literal_segment_is_tried_before_a_parameter() {
        let svc = ServiceDecl {
            name: "shop".into(),
            version: 1,
            commands: vec![
                decl("byId", "GET", "orders/:id"),
                decl("recent", "GET", "orders/recent"),
                decl("lines", "GET", ":kind/lines"),
                decl("orderLines", "GET", "orders/:id/lines"),
            ],
            subscriptions: Vec::new(),
            available: true,
        };
        let t = RouteTable::build(1, &BTreeMap::from([(1, vec![svc])]));
        let found = |path: &str| match t.lookup(1, "GET", path) {
            Lookup::Found { route, params } => (route.decl.name.clone(), params),
            _ => panic!("{path} not found"),
        };
        assert_eq!(found("orders/recent").0, "recent");
        let (name, params) = found("orders/o-17");
        assert_eq!((name.as_str(), params.get("id").map(String::as_str)), ("byId", Some("o-17")));
        assert_eq!(found("orders/x/lines").0, "orderLines");
        // Both `orders/:id` and `:kind/lines` match: the leftmost literal wins.
        assert_eq!(found("orders/lines").0, "byId");
        assert_eq!(found("items/lines").0, "lines");
    }

    #[test]
    fn table_groups_nodes_and_reports_wrong_method() {
        let svc = ServiceDecl {
            name: "demo".into(),
            version: 1,
            commands: vec![decl("echo", "POST", "echo")],
            subscriptions: Vec::new(),
            available: true,
        };
        let registry = BTreeMap::from([(1, vec![svc.clone()]), (3, vec![svc])]);
        let t = RouteTable::build(7, &registry);
        match t.lookup(1, "POST", "echo") {
            Lookup::Found { route, .. } => assert_eq!(route.nodes, vec![1, 3]),
            _ => panic!("echo not found"),
        }
        assert!(matches!(t.lookup(1, "GET", "echo"), Lookup::WrongMethod(m) if m == ["POST"]));
        assert!(matches!(t.lookup(2, "POST", "echo"), Lookup::NotFound));
        assert_eq!(t.nodes(), BTreeSet::from([1, 3]));
    }

    /// Nodes whose declarations of one command disagree (a rolling upgrade changed it): the
    /// route takes the cautious reading of each, whichever node has the lowest id.
    #[test]
    fn nodes_that_disagree_on_a_command_get_the_cautious_reading() {
        let svc = |idempotent, timeout_ms| ServiceDecl {
            name: "shop".into(),
            version: 1,
            commands: vec![CommandDecl { idempotent, timeout_ms, ..decl("pay", "POST", "pay") }],
            subscriptions: Vec::new(),
            available: true,
        };
        for (first, second) in [(svc(true, 30_000), svc(false, 5_000)), (svc(false, 5_000), svc(true, 30_000))] {
            let t = RouteTable::build(1, &BTreeMap::from([(1, vec![first]), (2, vec![second])]));
            match t.lookup(1, "POST", "pay") {
                Lookup::Found { route, .. } => {
                    assert_eq!((route.decl.idempotent, route.decl.timeout_ms, route.nodes.as_slice()), (false, 5_000, &[1, 2][..]));
                }
                _ => panic!("pay not found"),
            }
        }
    }

    /// A handler's call names a command: every node that offers it under any method or path
    /// (a rolling change of its path) serves it, and a departed node's is found with no node
    /// (a 503 for the caller, as for a client), not missing (404).
    #[test]
    fn a_command_called_by_name_is_offered_by_every_node_that_declares_it() {
        let svc = |cmds: Vec<CommandDecl>| ServiceDecl { name: "shop".into(), version: 1, commands: cmds, subscriptions: Vec::new(), available: true };
        let t0 = Instant::now();
        let rolling = RouteTable::default().next(
            1,
            BTreeMap::from([(1, vec![svc(vec![decl("byId", "GET", "orders/:id")])]), (2, vec![svc(vec![decl("byId", "GET", "order/:id")])]), (3, vec![svc(vec![decl("byId", "POST", "orders/:id")])])]),
            t0,
        );
        let route = rolling.by_name("shop", 1, "byId").expect("declared");
        let mut nodes = route.nodes.clone();
        nodes.sort_unstable();
        assert_eq!(nodes, [1, 2, 3]);
        assert!(rolling.by_name("shop", 2, "byId").is_none() && rolling.by_name("shop", 1, "other").is_none() && rolling.by_name("shops", 1, "byId").is_none());
        let drained = rolling.next(2, BTreeMap::new(), t0 + Duration::from_secs(1));
        assert!(drained.by_name("shop", 1, "byId").is_some_and(|r| r.nodes.is_empty()), "a departed node's command has no node for a while");
        // Declared idempotent with a long timeout by all but the node that moved it, which made
        // it neither: called by name, it is retried by no one and cut at the shortest timeout.
        let kind = |idempotent: bool, timeout_ms: u64, path: &str| CommandDecl { idempotent, timeout_ms, ..decl("pay", "POST", path) };
        let moved = RouteTable::default().next(
            3,
            BTreeMap::from([(1, vec![svc(vec![kind(true, 30_000, "pay")])]), (2, vec![svc(vec![kind(true, 30_000, "pay")])]), (3, vec![svc(vec![kind(false, 5_000, "payments")])])]),
            t0,
        );
        let route = moved.by_name("shop", 1, "pay").expect("declared");
        assert_eq!((route.decl.idempotent, route.decl.timeout_ms, route.nodes.len()), (false, 5_000, 3));
    }

    /// A node that leaves the registry (drained) leaves its commands known, offered by no node,
    /// for `DEPARTED_FOR`: a request for one is then a 503, not a 404. A registered node's
    /// command on the same path wins, and a node back in the registry is no longer departed.
    #[test]
    fn a_departed_nodes_commands_stay_known_with_no_node_for_a_while() {
        let svc = |name: &str, cmds: Vec<CommandDecl>| ServiceDecl { name: name.into(), version: 1, commands: cmds, subscriptions: Vec::new(), available: true };
        let solo = svc("solo", vec![decl("only", "POST", "only"), decl("shared", "POST", "shared")]);
        let other = svc("other", vec![decl("shared", "POST", "shared")]);
        let t0 = Instant::now();
        let both = RouteTable::default().next(1, BTreeMap::from([(1, vec![solo.clone()]), (2, vec![other.clone()])]), t0);
        assert_eq!(both.expires(), None);
        // Node 1 drains: `only` has no node, `shared` is still node 2's.
        let drained = both.next(2, BTreeMap::from([(2, vec![other.clone()])]), t0 + Duration::from_secs(1));
        match drained.lookup(1, "POST", "only") {
            Lookup::Found { route, .. } => assert!(route.nodes.is_empty() && route.service == "solo"),
            _ => panic!("a departed node's command is still known"),
        }
        match drained.lookup(1, "POST", "shared") {
            Lookup::Found { route, .. } => assert_eq!((route.service.as_str(), route.nodes.as_slice()), ("other", &[2][..])),
            _ => panic!("shared"),
        }
        assert_eq!(drained.expires(), Some(t0 + Duration::from_secs(1) + DEPARTED_FOR));
        assert_eq!(drained.nodes(), BTreeSet::from([2]));
        assert!(drained.all().all(|r| r.service == "other"), "departed commands are not listed");
        // A departed command never shadows a registered one that takes the same requests: a
        // renamed parameter, or a literal beside a live parameter.
        let old = svc("shop", vec![decl("byId", "GET", "orders/:id"), decl("me", "GET", "users/me")]);
        let new = svc("shop", vec![decl("byId", "GET", "orders/:orderId"), decl("user", "GET", "users/:id")]);
        let upgraded = RouteTable::default()
            .next(1, BTreeMap::from([(1, vec![new.clone()]), (2, vec![old])]), t0)
            .next(2, BTreeMap::from([(1, vec![new])]), t0 + Duration::from_secs(1));
        for (path, name) in [("orders/7", "byId"), ("users/me", "user")] {
            match upgraded.lookup(1, "GET", path) {
                Lookup::Found { route, .. } => assert_eq!((route.decl.name.as_str(), route.nodes.as_slice()), (name, &[1][..]), "{path}"),
                _ => panic!("{path}"),
            }
        }
        // Another change later keeps it until its time is up, then it is gone.
        let later = drained.next(3, BTreeMap::from([(2, vec![other.clone()])]), t0 + Duration::from_secs(30));
        assert!(matches!(later.lookup(1, "POST", "only"), Lookup::Found { .. }));
        let gone = later.next(3, BTreeMap::from([(2, vec![other.clone()])]), t0 + Duration::from_secs(1) + DEPARTED_FOR);
        assert!(matches!(gone.lookup(1, "POST", "only"), Lookup::NotFound));
        assert_eq!(gone.expires(), None);
        // Back in the registry: routed to again, and not departed.
        let back = drained.next(4, BTreeMap::from([(1, vec![solo]), (2, vec![other])]), t0 + Duration::from_secs(2));
        match back.lookup(1, "POST", "only") {
            Lookup::Found { route, .. } => assert_eq!(route.nodes, vec![1]),
            _ => panic!("only"),
        }
        assert_eq!(back.expires(), None);
    }
}
