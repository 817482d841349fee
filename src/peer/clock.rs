//! The clock offset to each peer, measured with the pings every link already carries.
//!
//! Why: raftbridge reads wall clocks in a few places where nodes must roughly agree. A command's
//! idempotency claim lapses 5 s after its owner last renewed it, by the owner's clock, and
//! another node judges whether it has (`proxy::idempotency`, which reads this module's offsets
//! to judge it in the owner's clock); the dedup windows and event retention by age count from
//! the timestamps the nodes wrote. Clocks seconds apart break these quietly: records forgotten
//! early, or, judged in the wrong clock, a claim taken over while its owner still runs.
//! So, as etcd does ("prober found high clock drift"), a node warns when a peer's clock is more
//! than `MAX_OFFSET` off, and exports every peer's offset as a metric to alert on
//! (`raftbridge_peer_clock_offset_seconds{peer}`).
//!
//! How: a ping carries a probe id in its correlation field, and a `Pong` from this build carries
//! the answering node's wall clock (microseconds since the Unix epoch, 8 bytes, big-endian). The
//! offset is the peer's time minus the midpoint of our send and receive times, with half the
//! round trip as its uncertainty (NTP's estimate, without its filtering). A warning needs the
//! offset to exceed the bound by more than that uncertainty, so a slow round trip cannot raise
//! one. Older builds answer with an empty `Pong` (not measured) and ignore what ours carry.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::raft::types::NodeId;

/// How far a peer's clock may be from ours before we warn. The idempotency lease is 5 s; a
/// second leaves room and matches etcd's threshold.
pub const MAX_OFFSET: Duration = Duration::from_secs(1);
/// How far ahead of most members a node's clock may run before the node stops proposing in it
/// (`PeerNet::clock_ahead_of_most`): the state machine's clock is the latest any command
/// carried and never goes back, so one command in a clock that far ahead would shorten every
/// dedup window and age events out early, cluster-wide. Well above what NTP leaves and the 10 s
/// the skewed-clock test runs a node at; a quarter of the events' 2 min dedup window.
pub const FAR_AHEAD: Duration = Duration::from_secs(30);

/// Pings awaiting their `Pong` that a link remembers: 2 s of them at one per 500 ms.
pub const PROBES: usize = 4;

/// How often a peer whose clock stays off is warned about again.
const WARN_EVERY: Duration = Duration::from_secs(300);

/// This node's wall clock, in microseconds since the Unix epoch (negative before it).
pub fn wall_us() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// What a `Pong` from this build carries.
pub fn pong_payload() -> [u8; 8] {
    wall_us().to_be_bytes()
}

/// A ping sent and not yet answered.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub corr: u64,
    pub sent: Instant,
    pub sent_wall_us: i64,
}

/// A peer's clock minus ours, and how sure that is (half the probe's round trip).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockOffset {
    pub offset_us: i64,
    pub uncertainty_us: u64,
}

impl ClockOffset {
    /// Surely more than `bound` off, whatever the round trip hid.
    pub fn beyond(&self, bound: Duration) -> bool {
        self.offset_us.unsigned_abs() > (bound.as_micros() as u64).saturating_add(self.uncertainty_us)
    }

    pub fn seconds(&self) -> f64 {
        self.offset_us as f64 / 1e6
    }
}

/// The offset a `Pong` to `probe` shows, received at `now`; `None` for a `Pong` without a clock.
pub fn measure(probe: &Probe, payload: &[u8], now: Instant) -> Option<ClockOffset> {
    let peer_us = i64::from_be_bytes(payload.try_into().ok()?);
    let rtt_us = i64::try_from(now.saturating_duration_since(probe.sent).as_micros()).unwrap_or(i64::MAX);
    let midpoint = probe.sent_wall_us.saturating_add(rtt_us / 2);
    Some(ClockOffset { offset_us: peer_us.saturating_sub(midpoint), uncertainty_us: (rtt_us / 2) as u64 })
}

/// What to say about a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Off by more than `MAX_OFFSET`: first time, or `WARN_EVERY` since the last warning.
    Warn,
    /// Back within the bound after a warning.
    Recovered,
    Quiet,
}

/// Which peers' clocks this node has warned about, and when last.
#[derive(Default)]
pub struct Watch {
    warned: HashMap<NodeId, Instant>,
}

impl Watch {
    pub fn note(&mut self, peer: NodeId, reading: &ClockOffset, now: Instant) -> Verdict {
        if reading.beyond(MAX_OFFSET) {
            match self.warned.get(&peer) {
                Some(at) if now.saturating_duration_since(*at) < WARN_EVERY => Verdict::Quiet,
                _ => {
                    self.warned.insert(peer, now);
                    Verdict::Warn
                }
            }
        } else if reading.offset_us.unsigned_abs() <= MAX_OFFSET.as_micros() as u64 && self.warned.remove(&peer).is_some() {
            Verdict::Recovered
        } else {
            Verdict::Quiet
        }
    }

    /// A peer that left the cluster: a node that comes back under its id is judged afresh.
    pub fn forget(&mut self, peer: NodeId) {
        self.warned.remove(&peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_the_peers_time_minus_our_midpoint() {
        let sent = Instant::now();
        let probe = Probe { corr: 1, sent, sent_wall_us: 1_000_000 };
        // Answered 2 ms later with a clock 10 s ahead of ours at the midpoint (1.001 s).
        let payload = 11_001_000i64.to_be_bytes();
        let r = measure(&probe, &payload, sent + Duration::from_millis(2)).unwrap();
        assert_eq!(r, ClockOffset { offset_us: 10_000_000, uncertainty_us: 1_000 });
        assert!(r.beyond(MAX_OFFSET));
        assert_eq!(measure(&probe, &[], sent), None, "an older build's empty Pong says nothing");
        assert_eq!(measure(&probe, &[0; 4], sent), None);
        // Behind is off too.
        let behind = measure(&probe, &(-500_000i64).to_be_bytes(), sent).unwrap();
        assert_eq!(behind.offset_us, -1_500_000);
        assert!(behind.beyond(MAX_OFFSET));
    }

    #[test]
    fn a_slow_round_trip_cannot_raise_a_warning() {
        // 1.2 s off, but the probe took 1 s: it may be 0.7 s off only.
        let unsure = ClockOffset { offset_us: 1_200_000, uncertainty_us: 500_000 };
        assert!(!unsure.beyond(MAX_OFFSET));
        assert!(ClockOffset { offset_us: 1_200_000, uncertainty_us: 100 }.beyond(MAX_OFFSET));
    }

    #[test]
    fn a_peer_is_warned_about_once_per_period_and_its_recovery_is_said() {
        let mut w = Watch::default();
        let t = Instant::now();
        let off = ClockOffset { offset_us: 3_000_000, uncertainty_us: 100 };
        let fine = ClockOffset { offset_us: 2_000, uncertainty_us: 100 };
        assert_eq!(w.note(2, &fine, t), Verdict::Quiet);
        assert_eq!(w.note(2, &off, t), Verdict::Warn);
        assert_eq!(w.note(2, &off, t + Duration::from_secs(1)), Verdict::Quiet, "every ping would repeat it");
        assert_eq!(w.note(3, &off, t + Duration::from_secs(1)), Verdict::Warn, "each peer on its own");
        assert_eq!(w.note(2, &off, t + WARN_EVERY), Verdict::Warn, "still off a period later: said again");
        assert_eq!(w.note(2, &fine, t + WARN_EVERY), Verdict::Recovered);
        assert_eq!(w.note(2, &fine, t + WARN_EVERY), Verdict::Quiet);
        assert_eq!(w.note(2, &off, t + WARN_EVERY), Verdict::Warn, "off again after recovering: at once");
    }
}
