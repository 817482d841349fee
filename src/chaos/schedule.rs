//! The fault schedule: which fault happens when, drawn from the run's seed.
//!
//! The schedule is a pure function of (seed, duration, nodes), so a failing run can be replayed
//! with the same `--seed`. Every fault kind appears at least once whenever the run is long enough
//! to hold one slot per kind (a 120 s run is); the remaining slots are drawn at random. Targets
//! that are "a random node" are drawn here too; "the leader" is resolved when the fault runs.

use std::fmt;
use std::time::Duration;

/// Time before the first fault: the load gets going against a healthy cluster.
pub const WARMUP: Duration = Duration::from_secs(5);
/// Time kept free of new faults at the end of the fault phase.
pub const TAIL: Duration = Duration::from_secs(5);
/// Preferred spacing of fault starts (the schedule squeezes it to fit every kind in).
pub const PREFERRED_GAP: Duration = Duration::from_millis(12_500);

/// Least time between two faults' starts when the run is long enough (healing time).
pub const MIN_SPACING: Duration = Duration::from_secs(10);

/// Every kind of fault the suite injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// SIGKILL a random node, restart it after a short down time.
    KillRandom,
    /// SIGKILL the current leader, restart it after a short down time.
    KillLeader,
    /// SIGSTOP (`docker pause`) a random node for longer than the election timeout, then resume.
    Pause,
    /// Cut a random node off from every other node (peer links), then heal.
    Isolate,
    /// Cut the current leader off from every other node, then heal.
    IsolateLeader,
    /// SIGKILL every node at once, then restart them all.
    KillAll,
    /// SIGTERM each node in turn (graceful drain and hand-over), restart it, wait until ready.
    RollingRestart,
    /// SIGKILL a random node and throw away every log byte it had not fsynced.
    PowerLoss,
    /// SIGKILL a random node and delete its whole data dir (a replaced disk); restart it empty.
    LoseData,
}

impl FaultKind {
    pub const ALL: [FaultKind; 9] = [
        FaultKind::KillRandom,
        FaultKind::KillLeader,
        FaultKind::Pause,
        FaultKind::Isolate,
        FaultKind::IsolateLeader,
        FaultKind::KillAll,
        FaultKind::RollingRestart,
        FaultKind::PowerLoss,
        FaultKind::LoseData,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillRandom => "kill random node",
            FaultKind::KillLeader => "kill leader",
            FaultKind::Pause => "pause",
            FaultKind::Isolate => "isolate node",
            FaultKind::IsolateLeader => "isolate leader",
            FaultKind::KillAll => "kill all nodes",
            FaultKind::RollingRestart => "rolling restart",
            FaultKind::PowerLoss => "power loss",
            FaultKind::LoseData => "lose data",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One planned fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFault {
    /// Offset from the start of the load.
    pub at: Duration,
    pub kind: FaultKind,
    /// Index (0-based) of the target node for the kinds that pick a random node.
    pub node_index: usize,
    /// How long the fault lasts (down time, pause, isolation); unused by rolling restart.
    pub hold: Duration,
}

/// The plan for a run of `duration` on `nodes` nodes.
pub fn plan(seed: u64, duration: Duration, nodes: usize) -> Vec<PlannedFault> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let window = duration.saturating_sub(WARMUP + TAIL);
    if window.is_zero() || nodes == 0 {
        return Vec::new();
    }
    let by_gap = (window.as_millis() / PREFERRED_GAP.as_millis()) as usize;
    // One slot per kind if the window allows at least 5 s per slot; otherwise what fits.
    let min_slots = if window >= Duration::from_secs(5) * FaultKind::ALL.len() as u32 {
        FaultKind::ALL.len()
    } else {
        (window.as_secs() / 5).max(1) as usize
    };
    let slots = by_gap.max(min_slots);
    let mut kinds: Vec<FaultKind> = FaultKind::ALL.to_vec();
    rng.shuffle(&mut kinds);
    kinds.truncate(slots);
    while kinds.len() < slots {
        kinds.push(FaultKind::ALL[rng.usize(..FaultKind::ALL.len())]);
    }
    let gap = window / slots as u32;
    let mut out = Vec::with_capacity(slots);
    for (i, kind) in kinds.into_iter().enumerate() {
        // Start somewhere in the first 20% of the slot (the rest is healing time), and at least
        // `MIN_SPACING` after the previous fault's earliest possible start.
        let most = (gap.as_millis() as u64 / 5).min(gap.saturating_sub(MIN_SPACING).as_millis() as u64);
        let jitter = Duration::from_millis(rng.u64(0..=most));
        let at = WARMUP + gap * i as u32 + jitter;
        let hold = match kind {
            FaultKind::KillRandom | FaultKind::KillLeader | FaultKind::PowerLoss | FaultKind::LoseData => ms(&mut rng, 1_500, 4_000),
            // Election timeout is 500–1000 ms: pause for two to three times that.
            FaultKind::Pause => ms(&mut rng, 2_000, 3_000),
            FaultKind::Isolate | FaultKind::IsolateLeader => ms(&mut rng, 3_000, 5_000),
            FaultKind::KillAll => ms(&mut rng, 500, 2_000),
            FaultKind::RollingRestart => Duration::ZERO,
        };
        out.push(PlannedFault { at, kind, node_index: rng.usize(..nodes), hold });
    }
    out
}

fn ms(rng: &mut fastrand::Rng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.u64(lo..=hi))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn same_seed_same_plan_other_seed_other_plan() {
        let d = Duration::from_secs(120);
        assert_eq!(plan(7, d, 3), plan(7, d, 3));
        assert_ne!(plan(7, d, 3), plan(8, d, 3));
    }

    #[test]
    fn every_kind_in_a_two_minute_run_in_order_and_in_time() {
        for seed in 0..200 {
            let p = plan(seed, Duration::from_secs(120), 3);
            let kinds: BTreeSet<FaultKind> = p.iter().map(|f| f.kind).collect();
            assert_eq!(kinds.len(), FaultKind::ALL.len(), "seed {seed}: {p:?}");
            assert!(p.windows(2).all(|w| w[0].at + MIN_SPACING <= w[1].at), "seed {seed}: {p:?}");
            assert!(p.iter().all(|f| f.at >= WARMUP && f.at + TAIL <= Duration::from_secs(120) && f.node_index < 3));
        }
    }

    #[test]
    fn long_runs_have_more_faults_short_runs_some() {
        let long = plan(1, Duration::from_secs(600), 5);
        assert!(long.len() >= 40, "{}", long.len());
        assert!(long.iter().all(|f| f.node_index < 5));
        assert!(!plan(1, Duration::from_secs(20), 3).is_empty());
        assert!(plan(1, Duration::from_secs(5), 3).is_empty());
    }
}
