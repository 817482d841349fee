//! This process's CPU time, read from `/proc/self/stat`, for `/metrics`
//! (`process_cpu_seconds_total`, the name Prometheus' own process collectors use) and for
//! `raftbridge bench`, which prints node and load-generator CPU per acknowledged operation, and
//! the machine's busy and steal shares (`/proc/stat`) over its window.
//!
//! Why: on a shared 2-core VM the same build's throughput drifts by ±15% within minutes, so
//! comparing two builds by requests per second alone needs many runs. CPU time per acknowledged
//! operation, summed over the nodes, moves much less, and it says what a change saved. Read from
//! `/proc` (Linux) rather than through a crate: one line of text, and no unsafe `sysconf` call.
//!
//! Also the priority of this process's background threads (`background_thread`,
//! `run_in_background`): snapshot builds and log reaping yield the CPU to request serving, and
//! transparent huge pages, which this process turns off (`disable_transparent_huge_pages`).

use std::time::Duration;

/// Nice value of background threads (snapshot builds, the log store's reaper): they yield the CPU
/// to the threads that serve requests and commit entries. On a small machine a snapshot build
/// is 100–300 ms of CPU every few seconds under batched publishing, and at normal priority it took
/// its share from the commit path. Nice 10 weighs ~1/10 of a normal thread under contention
/// (CFS), so the work slows down but is never starved.
const BACKGROUND_NICE: i32 = 10;

/// Turns transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`; inherited by
/// child processes). Why: the allocator asks for huge pages (`madvise`), and the first touch of a
/// huge page zeroes 2 MiB in one page fault, on whatever thread allocated. While a node's memory
/// grows (the log and the retained events fill up to their bounds) that is several faults a
/// second, each stalling the async worker that took it: on the 2-core VM a node's 1 ms timer ran
/// 7–14 ms late every second, and perf put those stalls in `clear_page_erms` under a delivery
/// handout's allocation. With 4 KiB pages the same zeroing is spread over many small faults: the
/// worst lag per second fell to 3–5 ms. Redis and MongoDB advise the same for latency. Best
/// effort: where the kernel refuses, huge pages stay as the system configures them.
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}

/// Raises this process's soft limit on open files to its hard limit, as Go's runtime and most
/// servers do, and returns the soft limit it ends with. Why: containers start with a soft limit
/// of 1,024 since Docker 25 and containerd 2 (the hard one stays high), below the default
/// `--max-connections` of 10,000; at the soft limit `accept` fails and, worse, so can opening a
/// log segment or a snapshot, which stops the node. Best effort: where it is refused the limit
/// stays as it was (the node warns when it is below what it may open).
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::Resource;
    let limit = rustix::process::getrlimit(Resource::Nofile);
    if limit.current.is_some() && limit.current != limit.maximum {
        let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
        if let Err(e) = rustix::process::setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %e, "could not raise the open-file limit");
        }
    }
    open_files_limit()
}

/// This process's soft limit on open files (`None`: unlimited).
pub fn open_files_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Lowers the calling thread's CPU priority to `BACKGROUND_NICE` (Linux: the nice value is per
/// thread). Best effort: where it is refused, the thread runs at normal priority.
pub fn background_thread() {
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICE) {
        tracing::debug!(error = %e, "could not lower a background thread's priority");
    }
}

/// Runs `f` on a new thread named `name` at background priority and waits for its result (a
/// blocking-pool thread is not used: its priority would stay lowered for later tasks).
pub async fn run_in_background<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name(name.to_string()).spawn(move || {
        background_thread();
        let _ = tx.send(f());
    })?;
    rx.await.map_err(|_| std::io::Error::other(format!("background thread {name} ended without a result")))?
}

/// `/proc` reports CPU times in `USER_HZ` ticks (what `sysconf(_SC_CLK_TCK)` returns), which
/// the kernel fixes at 100 per second on x86-64 and arm64, the targets we build for, whatever
/// the kernel's own tick rate.
const USER_HZ: u64 = 100;

/// User + system CPU time of this process so far (all threads, live and exited); `None` where
/// `/proc` is not available.
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat_cpu(&stat)
}

/// CPU time from a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses and may
/// hold spaces or parentheses itself, so the fields are counted after the *last* `)`.
fn parse_stat_cpu(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state (3), ppid (4), ... utime (14), stime (15).
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / USER_HZ))
}

/// This machine's CPU time so far, from the first line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostCpu {
    /// Everything but idle, I/O wait and steal.
    pub busy: u64,
    /// Time the hypervisor ran something else while a vCPU wanted to run.
    pub steal: u64,
    pub total: u64,
}

impl HostCpu {
    /// Busy and steal shares of the time between `earlier` and `self`, in percent.
    pub fn shares_since(&self, earlier: &HostCpu) -> Option<(f64, f64)> {
        let total = self.total.checked_sub(earlier.total).filter(|t| *t > 0)? as f64;
        let busy = self.busy.saturating_sub(earlier.busy) as f64;
        let steal = self.steal.saturating_sub(earlier.steal) as f64;
        Some((100.0 * busy / total, 100.0 * steal / total))
    }
}

/// This machine's CPU time so far; `None` where `/proc` is not available.
pub fn host_cpu() -> Option<HostCpu> {
    parse_host_cpu(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// `cpu  user nice system idle iowait irq softirq steal ...` (older kernels stop earlier).
fn parse_host_cpu(stat: &str) -> Option<HostCpu> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line.split_ascii_whitespace().take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let steal = v.get(7).copied().unwrap_or(0);
    Some(HostCpu { busy: total - v[3] - v[4] - steal, steal, total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn background_work_runs_at_lower_priority_and_returns_its_result() {
        let mine = rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("own nice");
        let theirs = run_in_background("test-bg", || {
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).map_err(std::io::Error::from)
        })
        .await
        .expect("a result");
        assert_eq!(theirs, BACKGROUND_NICE.max(mine), "the background thread is niced, not this one");
        assert_eq!(rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("own nice"), mine);
        let err = run_in_background::<()>("test-bg", || Err(std::io::Error::other("boom"))).await.unwrap_err();
        assert_eq!(err.to_string(), "boom", "its error comes back");
    }

    /// The soft limit ends at the hard one (this process may always raise it that far).
    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_one() {
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
        assert_eq!(raise_open_files_limit(), hard);
    }

    #[test]
    fn transparent_huge_pages_can_be_turned_off() {
        // The flag belongs to the process (its memory map): set here, it reads back as set.
        if disable_transparent_huge_pages().is_ok() {
            assert!(rustix::thread::transparent_huge_pages_are_disabled().expect("readable"));
        }
    }

    #[test]
    fn stat_line_with_odd_command_name() {
        let line = "4242 (a b) c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 12345 1000 200";
        assert_eq!(parse_stat_cpu(line), Some(Duration::from_millis(3250)));
        assert_eq!(parse_stat_cpu("garbage"), None);
        assert_eq!(parse_stat_cpu("1 (x) S 1 2"), None);
    }

    #[test]
    fn own_cpu_time_is_readable_and_grows() {
        let Some(before) = cpu_time() else { return };
        let start = std::time::Instant::now();
        // Spin until the kernel has counted at least one more tick for us; bounded by 5 s of
        // wall time (a tick is 10 ms of CPU).
        let (mut x, mut after) = (0u64, before);
        while after <= before && start.elapsed() < Duration::from_secs(5) {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            after = cpu_time().expect("readable once");
        }
        std::hint::black_box(x);
        assert!(after > before, "{after:?} > {before:?}");
    }

    #[test]
    fn host_cpu_from_proc_stat() {
        let before = parse_host_cpu("cpu  100 0 50 800 30 0 10 10 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(before, HostCpu { busy: 160, steal: 10, total: 1000 });
        let after = HostCpu { busy: 260, steal: 30, total: 1200 };
        assert_eq!(after.shares_since(&before), Some((50.0, 10.0)));
        assert_eq!(before.shares_since(&before), None);
        assert_eq!(parse_host_cpu("cpu  1 2 x 4 5"), None);
        assert_eq!(parse_host_cpu("intr 1 2"), None);
        if let Some(now) = host_cpu() {
            assert!(now.total >= now.busy + now.steal, "{now:?}");
        }
    }
}
