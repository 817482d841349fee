//! Event types shared by the state machine, the broker runtime, the SDK and the HTTP API.
//!
//! An event is stored once, in log order, with a cluster-wide `position` assigned when its
//! Raft entry is applied (so every node agrees on it). Filters follow PURISTA's subscription
//! semantics: every field that is set must match, an unset field matches anything.

use std::sync::Arc;

use serde::Deserialize;
use serde::Serialize;

use crate::sdk::Sender;

/// What an event says: everything but its log position. Shared by the event to publish
/// ([`NewEvent`]) and the stored one ([`Event`]). Nested structs encode as their fields in
/// order (bincode), so `Event` and `NewEvent` keep the byte layout they had as flat structs:
/// Raft logs and snapshots written before stay readable. Held in an `Arc` by both: the event
/// in a Raft entry and the one the state machine stores share one body (half the memory per
/// event, and no copy when an entry is applied); `Arc` encodes as what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBody {
    pub id: String,
    pub event_name: String,
    /// Milliseconds since the epoch, set by the node that accepted the event.
    pub timestamp: u64,
    /// PURISTA message type: `customMessage`, or `commandSuccessResponse` for command results.
    pub message_type: String,
    pub sender: Option<Sender>,
    pub principal_id: Option<String>,
    pub tenant_id: Option<String>,
    pub trace_id: Option<String>,
    pub correlation_id: Option<String>,
    /// The payload as JSON text. As bytes, not a sequence of `u8`: the same bincode layout,
    /// but one copy instead of a call per byte (decoding events was a third of a follower's
    /// CPU under batched publishing, mostly here).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// An event as stored in the replicated log. Reads its body's fields through `Deref`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub position: u64,
    #[serde(deserialize_with = "body_in_arc")]
    pub body: Arc<EventBody>,
}

/// Decodes a body straight into its `Arc`. serde's `Arc<T>` decodes a `Box<T>` and moves it
/// into a new allocation (one allocation, copy and free per event more; 3% of a follower's CPU
/// under batched publishing). Same bytes either way.
fn body_in_arc<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Arc<EventBody>, D::Error> {
    EventBody::deserialize(d).map(Arc::new)
}

impl std::ops::Deref for Event {
    type Target = EventBody;
    fn deref(&self) -> &EventBody {
        &self.body
    }
}

impl EventBody {
    /// The payload decoded as `T` (a handler's `?` turns a mismatch into a 500, a nack).
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// Bytes this body holds: payload, every metadata string and a fixed overhead. The broker
    /// bounds its queue and each entry by it, so that metadata (headers a client sets) counts
    /// like payload. (Retention keeps its own measure, [`Event::size`].)
    pub fn full_size(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let sender = self.sender.as_ref().map_or(0, |s| {
            s.service_name.len() + s.service_version.len() + s.service_target.len() + s.instance_id.len()
        });
        self.payload.len()
            + self.id.len()
            + self.event_name.len()
            + self.message_type.len()
            + sender
            + opt(&self.principal_id)
            + opt(&self.tenant_id)
            + opt(&self.trace_id)
            + opt(&self.correlation_id)
            + 64
    }
}

impl Event {
    /// Stored size used for retention by size. Part of the replicated state's rules: every node
    /// (and every version) must trim at the same events, so this formula never changes; the
    /// metadata it leaves out is bounded where events are accepted.
    pub fn size(&self) -> usize {
        self.payload.len() + self.id.len() + self.event_name.len() + 64
    }

    /// The JSON form served by `GET /v1/events` and POSTed to sidecar subscribers. The payload
    /// is the producer's JSON text as it was accepted (`RawValue`), not re-parsed: numbers
    /// beyond f64, long integers and escapes come back exactly as they were sent. Serialize it
    /// with `serde_json::to_vec`/`to_writer`, not into a `serde_json::Value` (which would parse
    /// the payload again and lose that).
    pub fn to_json(&self) -> EventJson<'_> {
        // Payloads are checked to be UTF-8 JSON when accepted; `null` only for data that was
        // stored before that check and is not.
        let payload = std::str::from_utf8(&self.payload)
            .ok()
            .and_then(|s| serde_json::from_str::<&serde_json::value::RawValue>(s).ok())
            .unwrap_or(serde_json::value::RawValue::NULL);
        EventJson {
            position: self.position,
            id: &self.id,
            event_name: &self.event_name,
            timestamp: self.timestamp,
            message_type: &self.message_type,
            sender: self.sender.as_ref().map(|s| SenderJson {
                service_name: &s.service_name,
                service_version: &s.service_version,
                service_target: &s.service_target,
                instance_id: &s.instance_id,
            }),
            principal_id: self.principal_id.as_deref(),
            tenant_id: self.tenant_id.as_deref(),
            trace_id: self.trace_id.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            content_type: "application/json",
            payload,
        }
    }
}

/// An event as JSON (see [`Event::to_json`]).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventJson<'a> {
    pub position: u64,
    pub id: &'a str,
    pub event_name: &'a str,
    pub timestamp: u64,
    pub message_type: &'a str,
    pub sender: Option<SenderJson<'a>>,
    pub principal_id: Option<&'a str>,
    pub tenant_id: Option<&'a str>,
    pub trace_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub content_type: &'static str,
    pub payload: &'a serde_json::value::RawValue,
}

/// An event's sender as JSON.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SenderJson<'a> {
    pub service_name: &'a str,
    pub service_version: &'a str,
    pub service_target: &'a str,
    pub instance_id: &'a str,
}

/// An event to publish (the position comes from the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    #[serde(deserialize_with = "body_in_arc")]
    pub body: Arc<EventBody>,
    /// Producer dedup: a repeat within the window returns the first id/position.
    pub idempotency_key: Option<String>,
}

impl NewEvent {
    /// The stored event at `position` (shares the body).
    pub fn to_event(&self, position: u64) -> Event {
        Event { position, body: self.body.clone() }
    }
}

/// An event name as a read may ask for it (`GET /v1/events?eventName=`): the rule events
/// were published under before `check_event_name` (1..=256 bytes, no control characters), so
/// that events stored then can still be selected by name.
pub fn check_event_name_to_read(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_EVENT_NAME || name.chars().any(char::is_control) {
        return Err(format!("event name must be 1..={MAX_EVENT_NAME} bytes without control characters"));
    }
    Ok(())
}

/// Longest event name, in bytes.
pub const MAX_EVENT_NAME: usize = 256;

/// The message types events in the log carry: a filter on any other would match nothing.
pub const MESSAGE_TYPES: [&str; 2] = [CUSTOM_MESSAGE, COMMAND_SUCCESS_RESPONSE];
/// The message type of an event a client or handler publishes.
pub const CUSTOM_MESSAGE: &str = "customMessage";
/// The message type of a command's result emitted as its success event.
pub const COMMAND_SUCCESS_RESPONSE: &str = "commandSuccessResponse";

/// Whether `c` is invisible or turns text around: control characters, Unicode format
/// characters (the zero-width space, bidirectional marks, overrides and isolates, the byte
/// order mark, tags) and line or paragraph separators. A name holding one reads in logs and
/// UIs as another name, or as two lines. The zero-width joiner and non-joiner are allowed:
/// Persian and Indic words and emoji sequences are written with them.
fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{ad}' | '\u{600}'..='\u{605}' | '\u{61c}' | '\u{6dd}' | '\u{70f}' | '\u{180e}'
            | '\u{200b}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}'
            | '\u{feff}' | '\u{fff9}'..='\u{fffb}' | '\u{e0001}' | '\u{e0020}'..='\u{e007f}')
}

/// An event name as every path in takes it (HTTP publish and reads, a handler's `emit`, a
/// returned event, a command's success event, a subscription's filter): 1..=256 bytes, none of
/// them invisible (`is_hidden`). One rule, so that an event stored by one path can be named by
/// the others (`GET /v1/events?eventName=` of a name a handler emitted).
pub fn check_event_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_EVENT_NAME {
        return Err(format!("event name must be 1..={MAX_EVENT_NAME} bytes"));
    }
    if name.chars().any(is_hidden) {
        return Err("event name must not hold control, invisible or direction-changing characters".into());
    }
    Ok(())
}

/// An event's whole payload as every path in takes it: UTF-8 JSON text (one value) that a
/// consumer can read back (`check_payload`): the HTTP publish, and payloads the runtime takes from a sidecar
/// app's answer (a command's success event, a subscription's returned event).
pub fn check_event_payload(body: &[u8]) -> Result<(), String> {
    std::str::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?;
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(|e| format!("invalid JSON: {e}"))?;
    check_payload(body)
}

/// A handler's payload (`Ctx::emit`, a subscription's returned event) as JSON text, held to
/// what every other way in is held to (`check_payload`): serde writes whatever nesting a
/// `serde_json::Value` holds, and a handler that put its request's body into its event stored
/// one nested past what `GET /v1/events` and consumers read back.
pub fn encode_payload(value: &(impl serde::Serialize + ?Sized)) -> Result<Vec<u8>, String> {
    let bytes = serde_json::to_vec(value).map_err(|e| format!("JSON: {e}"))?;
    check_payload(&bytes)?;
    Ok(bytes)
}

/// Nesting levels a payload may reach. serde_json's readers stop at 128 (as do many others), and
/// a payload is read inside an envelope (a sidecar's POST adds a level, `GET /v1/events` three):
/// 64 leaves room for both, and for a consumer's own wrapping.
pub const MAX_PAYLOAD_DEPTH: usize = 64;

/// What serde's syntax check (`IgnoredAny`, `RawValue`: numbers of any size are kept as sent)
/// lets through but a consumer could not read: nesting past `MAX_PAYLOAD_DEPTH`, and a UTF-16
/// surrogate escape without its pair (`"\ud800"`), which decodes to no string. `json` has
/// passed that check already. One pass over the bytes, no tree built.
pub fn check_payload(json: &[u8]) -> Result<(), String> {
    let lone = || "invalid JSON: a lone UTF-16 surrogate escape".to_string();
    let (mut depth, mut in_string, mut high, mut i) = (0usize, false, false, 0);
    while let Some(&b) = json.get(i) {
        i += 1;
        if !in_string {
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_PAYLOAD_DEPTH {
                        return Err(format!("payload nested deeper than {MAX_PAYLOAD_DEPTH} levels"));
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            continue;
        }
        // In a string: a high surrogate escape must be followed at once by a low one.
        let unit = match (b, json.get(i)) {
            (b'\\', Some(b'u')) => {
                let hex = json.get(i + 1..i + 5).and_then(|h| std::str::from_utf8(h).ok());
                i += 5;
                hex.and_then(|h| u16::from_str_radix(h, 16).ok())
            }
            (b'\\', _) => {
                i += 1;
                None
            }
            (b'"', _) => {
                in_string = false;
                None
            }
            _ => None,
        };
        match unit {
            Some(0xD800..=0xDBFF) if !high => high = true,
            Some(0xDC00..=0xDFFF) if high => high = false,
            Some(0xD800..=0xDFFF) => return Err(lone()),
            _ if high => return Err(lone()),
            _ => {}
        }
    }
    Ok(())
}

/// PURISTA's subscription filter: set fields must match, unset fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventFilter {
    pub event_name: Option<String>,
    pub sender_service: Option<String>,
    pub sender_version: Option<String>,
    pub sender_target: Option<String>,
    pub message_type: Option<String>,
    pub principal_id: Option<String>,
    pub tenant_id: Option<String>,
}

impl EventFilter {
    /// Refuses a filter field that no event could match, as a declaration error rather than a
    /// subscription that silently receives nothing: an empty value (unset is `None`), an
    /// identity with spaces around it (header values are trimmed before they are stored), an
    /// event name no path takes, a sender service or target that is not a name a service,
    /// command or subscription can have, a message type not in `MESSAGE_TYPES`, a sender
    /// version that is not a service version (a whole number from 1).
    pub fn check(&self) -> Result<(), String> {
        let fields = [
            ("eventName", &self.event_name),
            ("senderService", &self.sender_service),
            ("senderVersion", &self.sender_version),
            ("senderTarget", &self.sender_target),
            ("messageType", &self.message_type),
            ("principalId", &self.principal_id),
            ("tenantId", &self.tenant_id),
        ];
        for (field, value) in fields {
            if value.as_deref() == Some("") {
                return Err(format!("filter {field} is empty: leave it out to match any"));
            }
        }
        for (field, value) in [("principalId", &self.principal_id), ("tenantId", &self.tenant_id)] {
            if let Some(v) = value.as_deref().filter(|v| v.trim() != *v) {
                return Err(format!("filter {field} {v:?} has spaces around it: no event carries such a value"));
            }
        }
        for (field, value) in [("senderService", &self.sender_service), ("senderTarget", &self.sender_target)] {
            if let Some(v) = value {
                crate::sdk::builder::check_name(v).map_err(|e| format!("filter {field}: {e}"))?;
            }
        }
        // The publish rule: a name with a character it refuses is in no event published since.
        // (Not the looser rule reads take: a subscription is for events to come.)
        if let Some(name) = &self.event_name {
            check_event_name(name).map_err(|e| format!("filter eventName: {e}"))?;
        }
        if let Some(t) = &self.message_type {
            if !MESSAGE_TYPES.contains(&t.as_str()) {
                return Err(format!("filter messageType {t:?} is none of {MESSAGE_TYPES:?}"));
            }
        }
        if let Some(v) = &self.sender_version {
            if !v.parse::<u32>().is_ok_and(|n| n >= 1 && n.to_string() == *v) {
                return Err(format!("filter senderVersion {v:?} is not a service version (1, 2, ...)"));
            }
        }
        Ok(())
    }

    pub fn matches(&self, e: &Event) -> bool {
        fn ok(want: &Option<String>, got: Option<&str>) -> bool {
            want.as_deref().is_none_or(|w| got == Some(w))
        }
        let sender = e.sender.as_ref();
        ok(&self.event_name, Some(&e.event_name))
            && ok(&self.sender_service, sender.map(|s| s.service_name.as_str()))
            && ok(&self.sender_version, sender.map(|s| s.service_version.as_str()))
            && ok(&self.sender_target, sender.map(|s| s.service_target.as_str()))
            && ok(&self.message_type, Some(&e.message_type))
            && ok(&self.principal_id, e.principal_id.as_deref())
            && ok(&self.tenant_id, e.tenant_id.as_deref())
    }
}

/// A subscription as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionDecl {
    /// Cluster-wide name (its state — positions, attempts, dead letters — is kept under it).
    pub name: String,
    pub filter: EventFilter,
    /// Each event to one live instance (competing consumers); otherwise to every instance.
    pub shared: bool,
    /// Keep the position while no consumer runs; otherwise start at the log's end.
    pub durable: bool,
    pub max_attempts: u32,
    pub ack_deadline_ms: u64,
    /// Deliveries in flight per consumer instance at most.
    pub max_in_flight: u32,
}

/// A subscription's ack deadline unless it sets one.
pub const DEFAULT_ACK_DEADLINE_MS: u64 = 30_000;

impl SubscriptionDecl {
    pub fn new(name: impl Into<String>, filter: EventFilter) -> SubscriptionDecl {
        SubscriptionDecl {
            name: name.into(),
            filter,
            shared: true,
            durable: true,
            max_attempts: 5,
            ack_deadline_ms: DEFAULT_ACK_DEADLINE_MS,
            max_in_flight: 64,
        }
    }
}

/// A delivery that failed `max_attempts` times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub position: u64,
    pub event_id: String,
    pub attempts: u32,
    pub reason: String,
    /// The instance, for every-instance subscriptions.
    pub node: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(name: &str, sender: Option<&str>, tenant: Option<&str>) -> Event {
        let body = EventBody {
            id: "e".into(),
            event_name: name.into(),
            timestamp: 0,
            message_type: "customMessage".into(),
            sender: sender.map(|s| Sender { service_name: s.into(), service_version: "1".into(), ..Default::default() }),
            principal_id: None,
            tenant_id: tenant.map(str::to_string),
            trace_id: None,
            correlation_id: None,
            payload: b"{}".to_vec(),
        };
        Event { position: 1, body: Arc::new(body) }
    }

    #[test]
    fn payloads_a_consumer_cannot_read_are_refused() {
        let ok = |s: &str| check_payload(s.as_bytes()).is_ok();
        assert!(ok(r#"{"esc":"\ud83d\ude00\u0041","q":"\"\\u","big":1e400}"#));
        assert!(ok(r#"["\\ud800"]"#), "an escaped backslash, not an escape");
        for lone in [r#""\ud800""#, r#""\ude00""#, r#""\ud800x""#, r#""\ud800\u0041""#, r#""\ud800\ud800""#, r#"{"\udfff":1}"#] {
            assert!(!ok(lone), "{lone}");
        }
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(ok(&nested(MAX_PAYLOAD_DEPTH)));
        assert!(!ok(&nested(MAX_PAYLOAD_DEPTH + 1)));
        assert!(ok(&format!(r#""{}""#, "[".repeat(500))), "brackets inside a string do not nest");
        // What passes stays readable by serde_json inside `GET /v1/events`' envelope.
        let page = format!(r#"{{"events":[{{"payload":{}}}]}}"#, nested(MAX_PAYLOAD_DEPTH));
        assert!(serde_json::from_str::<serde_json::Value>(&page).is_ok());
    }

    #[test]
    fn event_names_with_hidden_characters_are_refused() {
        for ok in ["orderPlaced", "a b", "bestellung.eingegangen", "注文", "می\u{200c}خواهم", "👩\u{200d}💻", &"x".repeat(MAX_EVENT_NAME)] {
            assert!(check_event_name(ok).is_ok(), "{ok:?}");
        }
        let long = "x".repeat(MAX_EVENT_NAME + 1);
        for bad in ["", &long, "a\nb", "a\tb", "a\u{200b}b", "user\u{202e}gpj", "a\u{2028}b", "\u{feff}a", "a\u{ad}b"] {
            assert!(check_event_name(bad).is_err(), "{bad:?}");
        }
        // Reads take what publishing took before the rule: events stored then stay selectable.
        assert!(check_event_name_to_read("a\u{200b}b").is_ok());
        assert!(check_event_name_to_read("a\nb").is_err() && check_event_name_to_read("").is_err());
    }

    #[test]
    fn filters_that_could_match_nothing_are_refused() {
        let with = |f: fn(&mut EventFilter)| {
            let mut filter = EventFilter::default();
            f(&mut filter);
            filter
        };
        assert!(EventFilter::default().check().is_ok());
        let good = with(|f| {
            f.event_name = Some("orderPlaced".into());
            f.sender_version = Some("2".into());
            f.message_type = Some("commandSuccessResponse".into());
            f.tenant_id = Some("t1".into());
        });
        assert!(good.check().is_ok());
        // An event name may have spaces, even around it: publishing takes " x".
        assert!(with(|f| f.event_name = Some(" x".into())).check().is_ok());
        let bad: [fn(&mut EventFilter); 8] = [
            |f| f.tenant_id = Some(String::new()),
            |f| f.event_name = Some(String::new()),
            |f| f.principal_id = Some(" bob".into()),
            |f| f.sender_service = Some("users/v1".into()),
            |f| f.message_type = Some("custommessage".into()),
            |f| f.sender_version = Some("v1".into()),
            |f| f.sender_version = Some("01".into()),
            |f| f.event_name = Some("a\u{200b}".into()),
        ];
        for (i, f) in bad.into_iter().enumerate() {
            assert!(with(f).check().is_err(), "case {i}");
        }
        // What is refused is what matching could never accept.
        let e = ev("orderPlaced", Some("users"), Some("t1"));
        assert!(!with(|f| f.sender_version = Some("01".into())).matches(&e));
        assert!(with(|f| f.sender_version = Some("1".into())).matches(&e));
    }

    #[test]
    fn json_gives_the_payload_back_as_it_was_sent() {
        let mut e = ev("raw", Some("shop"), Some("t1"));
        let sent = r#"{"big":123456789012345678901234567890,"tiny":1e400,"esc":"\ud83d\ude00","x":[1.50]}"#;
        Arc::make_mut(&mut e.body).payload = sent.as_bytes().to_vec();
        let text = String::from_utf8(serde_json::to_vec(&e.to_json()).unwrap()).unwrap();
        assert!(text.contains(&format!(r#""payload":{sent}"#)), "{text}");
        // (`1e400` is beyond what serde_json's own `Value` holds, so read the rest without it.)
        let v: serde_json::Value = serde_json::from_str(&text.replace("1e400", "1")).unwrap();
        assert_eq!(v["payload"]["esc"], "\u{1f600}");
        assert_eq!((v["eventName"].as_str(), v["tenantId"].as_str()), (Some("raw"), Some("t1")));
        assert_eq!(v["sender"]["serviceName"], "shop");
        assert!(v["principalId"].is_null() && v["traceId"].is_null());
        // Bytes that are not JSON (only data from before the check could be) read as null.
        Arc::make_mut(&mut e.body).payload = b"\xff{".to_vec();
        let v: serde_json::Value = serde_json::from_slice(&serde_json::to_vec(&e.to_json()).unwrap()).unwrap();
        assert!(v["payload"].is_null());
    }

    #[test]
    fn full_size_counts_metadata_and_retention_size_stays_as_it_was() {
        let plain = ev("n", None, None);
        let mut tagged = plain.clone();
        let body = Arc::make_mut(&mut tagged.body);
        body.principal_id = Some("p".repeat(200));
        body.tenant_id = Some("t".repeat(100));
        assert_eq!(tagged.full_size(), plain.full_size() + 300);
        assert_eq!(tagged.size(), plain.size(), "retention's measure is part of the replicated rules");
        assert_eq!(plain.size(), 2 + 1 + 1 + 64);
    }

    /// Logs and snapshots hold events in bincode: nesting the body must not change the bytes
    /// (compared with the flat layout `Event` and `NewEvent` had before `EventBody`).
    #[test]
    fn nested_body_keeps_the_flat_encoding() {
        // Also covers the payload: `serde_bytes` there, a plain `Vec<u8>` (a sequence) here.
        #[derive(Serialize)]
        struct FlatEvent<'a> {
            position: u64,
            id: &'a str,
            event_name: &'a str,
            timestamp: u64,
            message_type: &'a str,
            sender: &'a Option<Sender>,
            principal_id: Option<&'a str>,
            tenant_id: Option<&'a str>,
            trace_id: Option<&'a str>,
            correlation_id: Option<&'a str>,
            payload: &'a Vec<u8>,
        }
        let e = ev("orderPlaced", Some("shop"), Some("t1"));
        let flat = FlatEvent {
            position: e.position,
            id: &e.id,
            event_name: &e.event_name,
            timestamp: e.timestamp,
            message_type: &e.message_type,
            sender: &e.sender,
            principal_id: e.principal_id.as_deref(),
            tenant_id: e.tenant_id.as_deref(),
            trace_id: e.trace_id.as_deref(),
            correlation_id: e.correlation_id.as_deref(),
            payload: &e.payload,
        };
        assert_eq!(bincode::serialize(&e).unwrap(), bincode::serialize(&flat).unwrap());
        let new = NewEvent { body: e.body.clone(), idempotency_key: Some("k".into()) };
        let mut flat_new = bincode::serialize(&flat).unwrap()[8..].to_vec(); // without position
        flat_new.extend(bincode::serialize(&Some("k")).unwrap());
        assert_eq!(bincode::serialize(&new).unwrap(), flat_new);
        let back: Event = bincode::deserialize(&bincode::serialize(&flat).unwrap()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn filters_follow_purista() {
        let any = EventFilter::default();
        assert!(any.matches(&ev("a", None, None)));
        let by_name = EventFilter { event_name: Some("a".into()), ..Default::default() };
        assert!(by_name.matches(&ev("a", None, None)));
        assert!(!by_name.matches(&ev("b", None, None)));
        let by_sender = EventFilter { sender_service: Some("users".into()), sender_version: Some("1".into()), ..Default::default() };
        assert!(by_sender.matches(&ev("x", Some("users"), None)));
        assert!(!by_sender.matches(&ev("x", Some("orders"), None)));
        assert!(!by_sender.matches(&ev("x", None, None)), "a set field does not match an absent one");
        let by_tenant = EventFilter { tenant_id: Some("t1".into()), ..Default::default() };
        assert!(by_tenant.matches(&ev("x", None, Some("t1"))));
        assert!(!by_tenant.matches(&ev("x", None, Some("t2"))));
        assert!(!by_tenant.matches(&ev("x", None, None)), "a tenant filter does not match an event without one");
        // Every other field, each on its own and all together (each set field must match).
        let mut full = ev("x", Some("users"), Some("t1"));
        {
            let body = Arc::make_mut(&mut full.body);
            body.principal_id = Some("p1".into());
            body.message_type = "infoMessage".into();
            if let Some(sender) = body.sender.as_mut() {
                sender.service_target = "signUp".into();
            }
        }
        let one = |f: EventFilter| f.matches(&full);
        assert!(one(EventFilter { principal_id: Some("p1".into()), ..Default::default() }));
        assert!(!one(EventFilter { principal_id: Some("p2".into()), ..Default::default() }));
        assert!(!EventFilter { principal_id: Some("p1".into()), ..Default::default() }.matches(&ev("x", None, None)));
        assert!(one(EventFilter { message_type: Some("infoMessage".into()), ..Default::default() }));
        assert!(!one(EventFilter { message_type: Some("customMessage".into()), ..Default::default() }));
        assert!(one(EventFilter { sender_target: Some("signUp".into()), ..Default::default() }));
        assert!(!one(EventFilter { sender_target: Some("signIn".into()), ..Default::default() }));
        assert!(!one(EventFilter { sender_service: Some("users".into()), sender_version: Some("2".into()), ..Default::default() }));
        let all = EventFilter {
            event_name: Some("x".into()),
            sender_service: Some("users".into()),
            sender_version: Some("1".into()),
            sender_target: Some("signUp".into()),
            message_type: Some("infoMessage".into()),
            principal_id: Some("p1".into()),
            tenant_id: Some("t1".into()),
        };
        assert!(one(all.clone()));
        assert!(!one(EventFilter { tenant_id: Some("t2".into()), ..all }), "one field off is no match");
    }
}
