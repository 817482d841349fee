//! The checker: compares what the load was told (acknowledged operations, by content) with what
//! the healed cluster holds, and renders the report table.
//!
//! [`check`] is a pure function of the [`Records`] and the final [`Observed`] state, so that its
//! logic is unit-tested with synthetic inputs (a lost write and a duplicate must be caught).
//! What it requires:
//! - every acknowledged state write reads back with exactly its value;
//! - each CAS counter is a single chain of writes (rebuilt from the `prev` links of the values
//!   the load wrote): every acknowledged CAS write is in it, nothing rejected is in it, and the
//!   counter value equals the chain's length;
//! - the keyed counter equals the number of keys that took effect (exactly once), and every
//!   acknowledged key answered a distinct value;
//! - the unkeyed counter is between the acknowledged and the attempted increments, and no
//!   acknowledged increment answered a value above it (an effect it saw is not lost);
//! - every acknowledged event is in the log exactly once, under the id it was acknowledged with
//!   and with its payload (nonce), and no payload appears twice;
//! - every node answers, and all report the same applied index and state digest, and hold the
//!   same event log (each read from that node alone, compared by content).

use std::collections::HashMap;
use std::collections::HashSet;
use std::fmt::Write;

use super::workload::Outcome;
use super::workload::Records;

/// What a read of an acknowledged state key returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    Value(serde_json::Value),
    Absent,
    Unreadable(String),
}

/// One node's view after healing.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    pub id: u64,
    pub ready: bool,
    pub applied: Option<u64>,
    pub digest: Option<String>,
}

/// An event log read back as `(id, nonce)` in position order, or why it could not be read.
pub type EventLogRead = Result<Vec<(String, String)>, String>;

/// The healed cluster's state, as read by the driver.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Per acknowledged state-write key.
    pub writes: HashMap<String, Read>,
    /// Final `(n, op)` of each CAS counter (`None`: absent), or why it could not be read.
    pub cas: Vec<Result<Option<(u64, String)>, String>>,
    /// Final keyed counter value (`None`: never written) or why unreadable.
    pub keyed: Result<Option<i64>, String>,
    pub unkeyed: Result<Option<i64>, String>,
    /// The whole event log as `(id, nonce)`, or why it could not be read.
    pub events: EventLogRead,
    /// Every other node's copy of the log, read from that node alone: the same events in the
    /// same order, by content, or the nodes diverge (`state_digest` covers the state store only).
    pub node_events: Vec<(u64, EventLogRead)>,
    pub nodes: Vec<NodeView>,
}

impl Default for Observed {
    /// Nothing read yet: the counters count as unreadable until the driver reads them.
    fn default() -> Self {
        let unread = || Err("not read".to_string());
        Observed { writes: HashMap::new(), cas: Vec::new(), keyed: unread(), unkeyed: unread(), events: Err("not read".to_string()), node_events: Vec::new(), nodes: Vec::new() }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindStats {
    pub attempted: u64,
    pub acked: u64,
    pub failed: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// Extra information for the table (e.g. unknown outcomes that took effect).
    pub note: String,
}

#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub kinds: Vec<(&'static str, KindStats)>,
    pub problems: Vec<String>,
    pub divergent: bool,
}

impl Verdict {
    pub fn lost(&self) -> u64 {
        self.kinds.iter().map(|(_, k)| k.lost).sum()
    }

    pub fn duplicates(&self) -> u64 {
        self.kinds.iter().map(|(_, k)| k.duplicates).sum()
    }

    pub fn passed(&self) -> bool {
        self.problems.is_empty() && !self.divergent && self.lost() == 0 && self.duplicates() == 0
    }
}

/// At most this many problem lines per kind are kept (the counts are always complete).
const MAX_LINES: usize = 20;

fn problem(v: &mut Verdict, budget: &mut usize, line: String) {
    if *budget > 0 {
        v.problems.push(line);
        *budget -= 1;
    }
}

pub fn check(r: &Records, o: &Observed) -> Verdict {
    let mut v = Verdict::default();
    check_writes(r, o, &mut v);
    check_cas(r, o, &mut v);
    check_keyed(r, o, &mut v);
    check_unkeyed(r, o, &mut v);
    check_events(r, o, &mut v);
    check_nodes(o, &mut v);
    for (kind, s) in &v.kinds.clone() {
        if s.acked == 0 {
            // Nothing of this kind to check: a run that acknowledged none tested none of it.
            v.problems.push(format!("no {kind} were acknowledged: the run checked nothing of that kind"));
        }
    }
    v
}

fn count(outcomes: impl Iterator<Item = Outcome>) -> KindStats {
    let mut s = KindStats::default();
    for o in outcomes {
        s.attempted += 1;
        if o == Outcome::Acked {
            s.acked += 1;
        } else {
            s.failed += 1;
        }
    }
    s
}

fn check_writes(r: &Records, o: &Observed, v: &mut Verdict) {
    let mut s = count(r.writes.iter().map(|w| w.outcome));
    let mut budget = MAX_LINES;
    for w in r.writes.iter().filter(|w| w.outcome == Outcome::Acked) {
        let bad = match o.writes.get(&w.key) {
            Some(Read::Value(got)) if *got == w.value => continue,
            Some(Read::Value(got)) => format!("state write chaos/{} acknowledged with {} but reads {}", w.key, w.value, got),
            Some(Read::Absent) => format!("state write chaos/{} acknowledged but the key is absent", w.key),
            Some(Read::Unreadable(why)) => format!("state write chaos/{} acknowledged but unreadable: {why}", w.key),
            None => format!("state write chaos/{} acknowledged but never read back", w.key),
        };
        s.lost += 1;
        problem(v, &mut budget, bad);
    }
    v.kinds.push(("state writes", s));
}

fn check_cas(r: &Records, o: &Observed, v: &mut Verdict) {
    let mut s = count(r.cas.iter().map(|c| c.outcome));
    let mut budget = MAX_LINES;
    let mut unknown_applied = 0u64;
    for (k, fin) in o.cas.iter().enumerate() {
        let attempts: HashMap<&str, &super::workload::CasAttempt> =
            r.cas.iter().filter(|c| c.counter == k).map(|c| (c.op.as_str(), c)).collect();
        let acked: Vec<&str> = attempts.values().filter(|c| c.outcome == Outcome::Acked).map(|c| c.op.as_str()).collect();
        let fin = match fin {
            Ok(f) => f,
            Err(why) => {
                s.lost += acked.len() as u64;
                problem(v, &mut budget, format!("CAS counter c-{k} unreadable: {why}"));
                continue;
            }
        };
        // Walk back from the final value along the prev links (bounded by the attempts).
        let mut chain: Vec<&str> = Vec::new();
        let mut cur = fin.as_ref().map(|(_, op)| op.as_str());
        let mut broken = None;
        while let Some(op) = cur {
            if chain.len() > attempts.len() {
                broken = Some(format!("CAS counter c-{k}: the chain of writes loops"));
                break;
            }
            let Some(a) = attempts.get(op) else {
                broken = Some(format!("CAS counter c-{k}: value written by unknown op {op:?}"));
                break;
            };
            chain.push(op);
            cur = (!a.prev.is_empty()).then_some(a.prev.as_str());
        }
        chain.reverse();
        if let Some(b) = broken {
            problem(v, &mut budget, b);
        }
        let in_chain: HashSet<&str> = chain.iter().copied().collect();
        for (pos, op) in chain.iter().enumerate() {
            let a = attempts[op]; // every op in the chain was found in `attempts` above
            if a.n != pos as u64 + 1 {
                problem(v, &mut budget, format!("CAS counter c-{k}: op {op} wrote n={} at chain position {}", a.n, pos + 1));
            }
            match a.outcome {
                Outcome::Rejected => {
                    s.duplicates += 1;
                    problem(v, &mut budget, format!("CAS counter c-{k}: op {op} was rejected but took effect"));
                }
                Outcome::Unknown => unknown_applied += 1,
                Outcome::Acked => {}
            }
        }
        if let Some((n, _)) = fin {
            if *n != chain.len() as u64 {
                problem(v, &mut budget, format!("CAS counter c-{k}: value {n} but {} writes in its chain", chain.len()));
            }
        }
        for op in acked.iter().filter(|op| !in_chain.contains(*op)) {
            s.lost += 1;
            problem(v, &mut budget, format!("CAS counter c-{k}: acknowledged op {op} is not in the final chain"));
        }
    }
    s.note = format!("{unknown_applied} unacknowledged took effect");
    v.kinds.push(("CAS increments", s));
}

fn check_keyed(r: &Records, o: &Observed, v: &mut Verdict) {
    let mut s = KindStats { attempted: r.keyed.len() as u64, ..KindStats::default() };
    let mut budget = MAX_LINES;
    s.acked = r.keyed.iter().filter(|k| k.value.is_some()).count() as u64;
    s.failed = s.attempted - s.acked;
    let unresolved =
        r.keyed.iter().filter(|k| k.value.is_none() && k.rejected.is_none() && k.malformed.is_none() && k.attempts > 0).count() as u64;
    for k in r.keyed.iter().filter(|k| k.value.is_none()) {
        if let Some(body) = &k.malformed {
            // Acknowledged: it may not count as unresolved (that widens what the counter may be).
            s.acked += 1;
            s.failed -= 1;
            problem(v, &mut budget, format!("keyed increment {} was acknowledged without a counter value ({body:?}): its effect cannot be checked", k.key));
        }
    }
    if unresolved > 0 {
        // Each was retried after the faults, on a healed cluster: one left unanswered leaves the
        // counter's check inconclusive by that much.
        problem(v, &mut budget, format!("{unresolved} keyed increments stayed unresolved after the faults: the keyed counter is checked only to within them"));
    }
    let refused: Vec<String> =
        r.keyed.iter().filter_map(|k| k.rejected.as_ref().map(|why| format!("{} answered {why}", k.key))).collect();
    let replays = r.keyed.iter().filter(|k| k.replayed).count();
    let mut seen: HashMap<i64, &str> = HashMap::new();
    for k in &r.keyed {
        if let Some(val) = k.value {
            if let Some(other) = seen.insert(val, &k.key) {
                // One effect answered twice, or an answer that is not its key's own effect.
                problem(v, &mut budget, format!("inconsistent answers: keyed increments {other} and {} both answered value {val}", k.key));
            }
        }
    }
    match &o.keyed {
        Err(why) => {
            s.lost += s.acked;
            problem(v, &mut budget, format!("keyed counter unreadable: {why}"));
        }
        Ok(val) => {
            let val = val.unwrap_or(0).max(0) as u64;
            if val < s.acked {
                s.lost += s.acked - val;
                problem(v, &mut budget, format!("keyed counter is {val} but {} keys were acknowledged", s.acked));
            }
            if val > s.acked + unresolved {
                s.duplicates += val - s.acked - unresolved;
                let hint = if refused.is_empty() { String::new() } else { format!("; refused keys: {}", refused.join(", ")) };
                problem(
                    v,
                    &mut budget,
                    format!(
                        "keyed counter is {val}: more than {} acknowledged + {unresolved} unresolved keys (an effect happened twice, or a refused key took effect{hint})",
                        s.acked
                    ),
                );
            }
            if let Some(max) = seen.keys().max().filter(|m| **m as u64 > val) {
                problem(v, &mut budget, format!("a keyed increment answered {max} but the counter is {val}"));
                s.lost += 1;
            }
        }
    }
    s.note = format!("{replays} replays, {unresolved} unresolved");
    v.kinds.push(("keyed commands", s));
}

fn check_unkeyed(r: &Records, o: &Observed, v: &mut Verdict) {
    let mut s = count(r.unkeyed.iter().map(|u| u.outcome));
    let mut budget = MAX_LINES;
    let mut seen = HashSet::new();
    for val in r.unkeyed.iter().filter_map(|u| u.value) {
        if !seen.insert(val) {
            problem(v, &mut budget, format!("inconsistent answers: two unkeyed increments answered the same value {val}"));
        }
    }
    let unanswered = r.unkeyed.iter().filter(|u| u.outcome == Outcome::Acked && u.value.is_none()).count();
    if unanswered > 0 {
        // The counter answers its new value with every 2xx: without it the content is unchecked.
        problem(v, &mut budget, format!("{unanswered} acknowledged unkeyed increments answered no counter value"));
    }
    let may = r.unkeyed.iter().filter(|u| u.outcome != Outcome::Rejected).count() as u64;
    match &o.unkeyed {
        Err(why) => {
            s.lost += s.acked;
            problem(v, &mut budget, format!("unkeyed counter unreadable: {why}"));
        }
        Ok(val) => {
            let val = val.unwrap_or(0).max(0) as u64;
            // By count: fewer than the acknowledged increments. By content: an acknowledged
            // increment answered a value the counter no longer reaches, so an effect it
            // included is gone (an unknown increment that took effect can hide it from the count).
            let short = s.acked.saturating_sub(val);
            let above: Vec<i64> = seen.iter().copied().filter(|a| *a > 0 && *a as u64 > val).collect();
            if short > 0 {
                problem(v, &mut budget, format!("unkeyed counter is {val} below {} acknowledged increments", s.acked));
            }
            if let Some(max) = above.iter().max() {
                problem(
                    v,
                    &mut budget,
                    format!("{} acknowledged unkeyed increments answered values above the final counter {val} (highest {max})", above.len()),
                );
            }
            s.lost += short.max(u64::from(!above.is_empty()));
            if val > may {
                s.duplicates += val - may;
                problem(v, &mut budget, format!("unkeyed counter is {val} above {may} possibly applied requests"));
            }
            s.note = format!("counter {val} in [{}, {may}]", s.acked);
        }
    }
    v.kinds.push(("unkeyed commands", s));
}

fn check_events(r: &Records, o: &Observed, v: &mut Verdict) {
    let mut s = count(r.events.iter().map(|e| e.outcome));
    let mut budget = MAX_LINES;
    match &o.events {
        Err(why) => {
            s.lost += s.acked;
            problem(v, &mut budget, format!("event log unreadable: {why}"));
        }
        Ok(log) => {
            // By content: the nonces each id holds, and how often each nonce appears.
            let mut by_id: HashMap<&str, Vec<&str>> = HashMap::new();
            let mut by_nonce: HashMap<&str, u64> = HashMap::new();
            for (id, nonce) in log {
                by_id.entry(id.as_str()).or_default().push(nonce.as_str());
                *by_nonce.entry(nonce.as_str()).or_default() += 1;
            }
            for e in &r.events {
                let times = by_nonce.get(e.nonce.as_str()).copied().unwrap_or(0);
                if e.outcome == Outcome::Acked {
                    // The event must be in the log under the id it was acknowledged with, with
                    // the acknowledged payload; another event's nonce under that id, or the
                    // nonce under another id only, is a loss.
                    let lost = match &e.id {
                        Some(id) => match by_id.get(id.as_str()).map(Vec::as_slice) {
                            None => Some(format!("acknowledged event {id} (nonce {}) is not in the log", e.nonce)),
                            Some([nonce]) if *nonce == e.nonce => None,
                            Some(held) => Some(format!("acknowledged event {id} (nonce {}) is in the log with nonces {held:?}", e.nonce)),
                        },
                        None => Some(format!("event with nonce {} acknowledged without an id: its content cannot be checked", e.nonce)),
                    };
                    if let Some(line) = lost {
                        s.lost += 1;
                        problem(v, &mut budget, line);
                    }
                }
                if times > 1 {
                    s.duplicates += times - 1;
                    problem(v, &mut budget, format!("event with nonce {} is in the log {times} times", e.nonce));
                }
            }
        }
    }
    v.kinds.push(("events", s));
}

fn check_nodes(o: &Observed, v: &mut Verdict) {
    if let Ok(first) = &o.events {
        for (id, log) in &o.node_events {
            let differs = match log {
                Err(e) => Some(format!("node {id}'s event log could not be read: {e}")),
                Ok(log) if log == first => None,
                Ok(log) => {
                    let at = first.iter().zip(log).position(|(a, b)| a != b).unwrap_or(first.len().min(log.len()));
                    Some(format!(
                        "node {id}'s event log differs from the one checked: {} against {} events, first difference at entry {} ({:?} against {:?})",
                        log.len(),
                        first.len(),
                        at + 1,
                        log.get(at),
                        first.get(at)
                    ))
                }
            };
            if let Some(line) = differs {
                v.divergent = true;
                v.problems.push(line);
            }
        }
    }
    for n in &o.nodes {
        if !n.ready || n.applied.is_none() || n.digest.is_none() {
            v.divergent = true;
            v.problems.push(format!("node {} does not answer (ready {}, applied {:?})", n.id, n.ready, n.applied));
        }
    }
    let applied: HashSet<Option<u64>> = o.nodes.iter().map(|n| n.applied).collect();
    let digests: HashSet<Option<&str>> = o.nodes.iter().map(|n| n.digest.as_deref()).collect();
    if applied.len() > 1 || digests.len() > 1 {
        v.divergent = true;
        let views: Vec<String> =
            o.nodes.iter().map(|n| format!("node {}: applied {:?} digest {:?}", n.id, n.applied, n.digest)).collect();
        v.problems.push(format!("nodes diverge: {}", views.join("; ")));
    }
}

/// One row of the fault table.
#[derive(Debug, Clone)]
pub struct FaultRow {
    pub kind: String,
    pub count: u64,
    /// Longest time without any acknowledged operation during a fault of this kind (ms).
    pub longest_unavailable_ms: Option<u64>,
    pub note: String,
}

/// The report: fault table, operation table, summary lines.
pub fn render(header: &str, faults: &[FaultRow], v: &Verdict) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{header}\n");
    let _ = writeln!(out, "{:<22} {:>6} {:>22}  note", "fault", "count", "longest unavailable");
    for f in faults {
        let unavail = f.longest_unavailable_ms.map_or("-".to_string(), |ms| format!("{:.1} s", ms as f64 / 1000.0));
        let _ = writeln!(out, "{:<22} {:>6} {:>22}  {}", f.kind, f.count, unavail, f.note);
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<18} {:>9} {:>9} {:>8} {:>14} {:>10}  note",
        "operations", "attempted", "acked", "failed", "acked but lost", "duplicates"
    );
    for (name, s) in &v.kinds {
        let _ = writeln!(
            out,
            "{:<18} {:>9} {:>9} {:>8} {:>14} {:>10}  {}",
            name, s.attempted, s.acked, s.failed, s.lost, s.duplicates, s.note
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "acknowledged but lost: {} (must be 0)", v.lost());
    let _ = writeln!(out, "duplicates:            {}", v.duplicates());
    let _ = writeln!(out, "nodes agree:           {}", if v.divergent { "NO" } else { "yes (same applied index, state digest and event log, all answer)" });
    for p in &v.problems {
        let _ = writeln!(out, "  problem: {p}");
    }
    let _ = writeln!(out, "\nresult: {}", if v.passed() { "PASS" } else { "FAIL" });
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::chaos::workload::CasAttempt;
    use crate::chaos::workload::EventOp;
    use crate::chaos::workload::KeyedOp;
    use crate::chaos::workload::StateWrite;
    use crate::chaos::workload::UnkeyedOp;

    fn write(key: &str, n: u64, outcome: Outcome) -> StateWrite {
        StateWrite { key: key.into(), value: json!({"n": n}), outcome }
    }

    fn cas(op: &str, prev: &str, n: u64, outcome: Outcome) -> CasAttempt {
        CasAttempt { counter: 0, op: op.into(), prev: prev.into(), n, outcome }
    }

    fn keyed(key: &str, value: Option<i64>) -> KeyedOp {
        KeyedOp { key: key.into(), attempts: 1, value, replayed: false, rejected: None, malformed: None }
    }

    fn node(id: u64, applied: u64, digest: &str) -> NodeView {
        NodeView { id, ready: true, applied: Some(applied), digest: Some(digest.into()) }
    }

    /// A consistent run: every check passes.
    fn healthy() -> (Records, Observed) {
        let records = Records {
            writes: vec![write("w-0-1", 1, Outcome::Acked), write("w-0-2", 2, Outcome::Unknown), write("w-0-3", 3, Outcome::Acked)],
            cas: vec![
                cas("0-1", "", 1, Outcome::Acked),
                cas("1-1", "", 1, Outcome::Rejected),
                cas("0-2", "0-1", 2, Outcome::Unknown),
                cas("1-2", "0-2", 3, Outcome::Acked),
            ],
            // "c" was never sent (the load stopped first).
            keyed: vec![keyed("a", Some(1)), keyed("b", Some(2)), KeyedOp { attempts: 0, ..keyed("c", None) }],
            unkeyed: vec![
                UnkeyedOp { outcome: Outcome::Acked, value: Some(1) },
                UnkeyedOp { outcome: Outcome::Unknown, value: None },
            ],
            events: vec![
                EventOp { nonce: "e1".into(), id: Some("id1".into()), outcome: Outcome::Acked },
                EventOp { nonce: "e2".into(), id: None, outcome: Outcome::Unknown },
            ],
            ack_ms: vec![],
        };
        let observed = Observed {
            writes: [("w-0-1".to_string(), Read::Value(json!({"n": 1}))), ("w-0-3".to_string(), Read::Value(json!({"n": 3})))].into(),
            cas: vec![Ok(Some((3, "1-2".into())))],
            keyed: Ok(Some(2)),
            unkeyed: Ok(Some(2)),
            events: Ok(vec![("id1".into(), "e1".into()), ("id2".into(), "e2".into())]),
            node_events: [2, 3].map(|id| (id, Ok(vec![("id1".into(), "e1".into()), ("id2".into(), "e2".into())]))).into(),
            nodes: vec![node(1, 100, "ab"), node(2, 100, "ab"), node(3, 100, "ab")],
        };
        (records, observed)
    }

    #[test]
    fn a_consistent_run_passes() {
        let (r, o) = healthy();
        let v = check(&r, &o);
        assert!(v.passed(), "{:?}", v.problems);
        let cas = &v.kinds.iter().find(|k| k.0 == "CAS increments").unwrap().1;
        assert_eq!((cas.attempted, cas.acked, cas.failed), (4, 2, 2));
        assert!(render("t", &[], &v).contains("result: PASS"));
    }

    #[test]
    fn a_lost_state_write_is_caught() {
        let (r, mut o) = healthy();
        o.writes.insert("w-0-3".into(), Read::Absent);
        let v = check(&r, &o);
        assert_eq!(v.lost(), 1);
        assert!(!v.passed());
        assert!(render("t", &[], &v).contains("acknowledged but lost: 1"));
        // A stale value is a loss too.
        let (r, mut o) = healthy();
        o.writes.insert("w-0-1".into(), Read::Value(json!({"n": 0})));
        assert_eq!(check(&r, &o).lost(), 1);
    }

    #[test]
    fn a_lost_cas_increment_is_caught() {
        // The final value skips the acknowledged 1-2: it was overwritten by a write based on 0-2.
        let (mut r, mut o) = healthy();
        r.cas.push(cas("0-3", "0-2", 3, Outcome::Unknown));
        o.cas = vec![Ok(Some((3, "0-3".into())))];
        let v = check(&r, &o);
        assert_eq!(v.lost(), 1, "{:?}", v.problems);
        // A counter that went backwards to an older value loses the later acknowledged op.
        let (r, mut o) = healthy();
        o.cas = vec![Ok(Some((1, "0-1".into())))];
        assert_eq!(check(&r, &o).lost(), 1);
    }

    #[test]
    fn a_duplicate_keyed_effect_is_caught() {
        let (r, mut o) = healthy();
        // 2 acknowledged keys allow 2.
        o.keyed = Ok(Some(3));
        let v = check(&r, &o);
        assert_eq!(v.duplicates(), 1);
        assert!(!v.passed());
        // A key left unanswered after the faults widens that by one, and fails the run itself.
        let (mut r, mut o) = healthy();
        r.keyed[2].attempts = 1;
        o.keyed = Ok(Some(3));
        let v = check(&r, &o);
        assert_eq!(v.duplicates(), 0);
        assert!(!v.passed() && v.problems.iter().any(|p| p.contains("stayed unresolved")), "{:?}", v.problems);
        // A 2xx without a value is acknowledged (the counter must reach it) and a problem.
        let (mut r, mut o) = healthy();
        r.keyed[2] = KeyedOp { malformed: Some("{}".into()), ..keyed("c", None) };
        o.keyed = Ok(Some(3));
        let v = check(&r, &o);
        assert!(!v.passed() && v.problems.iter().any(|p| p.contains("without a counter value")), "{:?}", v.problems);
        assert!(!v.problems.iter().any(|p| p.contains("unresolved") || p.contains("more than")), "{:?}", v.problems);
        o.keyed = Ok(Some(2));
        assert!(check(&r, &o).problems.iter().any(|p| p.contains("but 3 keys were acknowledged")));
        // Two keys answered with the same value: not a duplicate effect, but a failure.
        let (mut r, o) = healthy();
        r.keyed[1].value = Some(1);
        let v = check(&r, &o);
        assert!(!v.passed() && v.problems[0].contains("inconsistent answers"), "{:?}", v.problems);
    }

    /// A kind with nothing acknowledged checked nothing: the run fails.
    #[test]
    fn a_kind_with_no_acknowledgement_fails_the_run() {
        let (mut r, o) = healthy();
        for w in &mut r.writes {
            w.outcome = Outcome::Unknown;
        }
        let v = check(&r, &o);
        assert!(!v.passed() && v.problems.iter().any(|p| p.contains("no state writes were acknowledged")), "{:?}", v.problems);
    }

    /// Another node's copy of the event log must hold the same events in the same order: one
    /// that lost the last, holds another nonce, or could not be read fails the run.
    #[test]
    fn a_node_whose_event_log_differs_fails_the_run() {
        let (r, o) = healthy();
        assert!(check(&r, &o).passed(), "{:?}", check(&r, &o).problems);
        let mut cases = Vec::new();
        for log in [
            Ok(vec![("id1".to_string(), "e1".to_string())]),
            Ok(vec![("id1".into(), "e1".into()), ("id2".into(), "e9".into())]),
            Err("connection refused".to_string()),
        ] {
            let (r, mut o) = healthy();
            o.node_events[1].1 = log;
            let v = check(&r, &o);
            assert!(!v.passed() && v.divergent, "{:?}", v.problems);
            cases.push(v.problems.join(" "));
        }
        assert!(cases[0].contains("node 3's event log differs") && cases[0].contains("1 against 2 events"), "{}", cases[0]);
        assert!(cases[1].contains("at entry 2"), "{}", cases[1]);
        assert!(cases[2].contains("could not be read"), "{}", cases[2]);
    }

    #[test]
    fn duplicate_and_lost_events_are_caught() {
        let (r, mut o) = healthy();
        o.events = Ok(vec![("id1".into(), "e1".into()), ("id2".into(), "e2".into()), ("id3".into(), "e2".into())]);
        assert_eq!(check(&r, &o).duplicates(), 1);
        let (r, mut o) = healthy();
        o.events = Ok(vec![("id2".into(), "e2".into())]);
        assert_eq!(check(&r, &o).lost(), 1);
        // An event log that was not read checks nothing: every acknowledged event counts lost.
        let (r, mut o) = healthy();
        o.events = Observed::default().events;
        assert_eq!(check(&r, &o).lost(), 1);
    }

    #[test]
    fn an_acknowledged_event_is_checked_by_content() {
        // The acknowledged id holds another payload, and the acknowledged nonce sits under an
        // unknown id: the acknowledged event is not in the log as acknowledged.
        let (r, mut o) = healthy();
        o.events = Ok(vec![("id1".into(), "e2".into()), ("id9".into(), "e1".into())]);
        let v = check(&r, &o);
        assert_eq!(v.lost(), 1, "{:?}", v.problems);
        assert!(v.problems.iter().any(|p| p.contains("id1") && p.contains("[\"e2\"]")), "{:?}", v.problems);
        // The nonce alone under another id is not enough either.
        let (r, mut o) = healthy();
        o.events = Ok(vec![("id9".into(), "e1".into()), ("id2".into(), "e2".into())]);
        assert_eq!(check(&r, &o).lost(), 1);
        // The acknowledged id and nonce, but the id twice (once with another payload).
        let (r, mut o) = healthy();
        o.events = Ok(vec![("id1".into(), "e1".into()), ("id1".into(), "e2".into())]);
        assert_eq!(check(&r, &o).lost(), 1);
        // An acknowledgement without an id cannot be checked by content.
        let (mut r, o) = healthy();
        r.events[0].id = None;
        assert!(!check(&r, &o).passed());
    }

    #[test]
    fn a_lost_unkeyed_increment_hidden_by_an_unknown_one_is_caught() {
        // Acknowledged answers {1, 2, 50}, final 40: within [3 acked, 60 possible] by count,
        // but the increment that answered 50 saw an effect the final counter has lost.
        let (mut r, mut o) = healthy();
        r.unkeyed = [1, 2, 50].iter().map(|&n| UnkeyedOp { outcome: Outcome::Acked, value: Some(n) }).collect();
        r.unkeyed.extend((0..57).map(|_| UnkeyedOp { outcome: Outcome::Unknown, value: None }));
        o.unkeyed = Ok(Some(40));
        let v = check(&r, &o);
        assert_eq!(v.lost(), 1, "{:?}", v.problems);
        assert!(v.problems.iter().any(|p| p.contains("highest 50")), "{:?}", v.problems);
        // The same answers with the counter at 50 pass.
        o.unkeyed = Ok(Some(50));
        assert!(check(&r, &o).passed());
        // Below the count and below an answer: one loss line each, counted once.
        o.unkeyed = Ok(Some(1));
        assert_eq!(check(&r, &o).lost(), 2);
        // A 2xx without the counter value cannot be checked by content.
        let (mut r, o) = healthy();
        r.unkeyed[0].value = None;
        assert!(!check(&r, &o).passed());
    }

    #[test]
    fn unkeyed_bounds_and_divergence() {
        let (r, mut o) = healthy();
        o.unkeyed = Ok(Some(3));
        assert_eq!(check(&r, &o).duplicates(), 1);
        let (r, mut o) = healthy();
        o.unkeyed = Ok(Some(0));
        assert_eq!(check(&r, &o).lost(), 1);
        let (r, mut o) = healthy();
        o.nodes[2].digest = Some("cd".into());
        let v = check(&r, &o);
        assert!(v.divergent && !v.passed());
        let (r, mut o) = healthy();
        o.nodes[1].ready = false;
        assert!(!check(&r, &o).passed());
    }
}
