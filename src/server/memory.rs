//! Giving freed heap back to the kernel.
//!
//! glibc's malloc keeps what the program frees inside its arenas and only returns the top of
//! the main heap on its own. A burst of large request heads and bodies (abuse, or a busy
//! minute) therefore leaves the process at the burst's high-water mark for good: measured in
//! `tests/edge/hostile_process.rs`, resident memory went from 28 MiB to 48 MiB after the first round
//! of hostile traffic and stayed there, although nothing was still allocated. `malloc_trim(0)`
//! walks every arena and hands free pages back (`madvise(MADV_DONTNEED)`); with it the same
//! test ends within 3 MiB of its baseline.
//!
//! One background thread per process calls it every `server.memory_trim_interval` (0 = off).
//! A trim holds each arena's lock while it walks it, so allocations on other threads can wait
//! for it: measured over that test (debug build, 45 trims), median 0.18 ms, p90 0.9 ms, and
//! 3.6 ms for the one trim that returned the ~20 MiB of a hostile round. Every 5 s by default,
//! that is a rare sub-millisecond stall against memory that does come back. On musl nothing
//! is done.
//!
//! With the `mimalloc` feature (the default build) the same thread asks mimalloc to purge what it holds free
//! (`mi_collect`), and each runtime thread collects its own heap when it goes idle (tokio's
//! `on_thread_park`, at most once per interval, [`on_idle`]): mimalloc purges a thread's
//! freed pages only when that thread calls into it again, and an idle worker never does, so
//! without it the memory of a burst stayed resident (issue 28: 69-85 MiB after hostile rounds
//! against a 38-40 MiB baseline; with it that test passes).

use std::sync::Once;
use std::time::Duration;

// Links mimalloc's library wherever this module is, test binaries included.
#[cfg(feature = "mimalloc")]
extern crate mimalloc as _;

#[cfg(feature = "mimalloc")]
extern "C" {
    /// mimalloc's collection of the calling thread's heap (`force`: free everything it can
    /// and purge the arenas at once); `mimalloc.h`, linked by the `mimalloc` crate.
    fn mi_collect(force: bool);
}

/// `server.memory_trim_interval` in milliseconds, for [`on_idle`] (0: off).
#[cfg(feature = "mimalloc")]
static IDLE_COLLECT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Called when a runtime thread is about to park: with the `mimalloc` feature, collects the
/// thread's heap if it has not within `server.memory_trim_interval`; nothing otherwise.
pub fn on_idle() {
    #[cfg(feature = "mimalloc")]
    {
        use std::cell::Cell;
        use std::sync::atomic::Ordering;
        use std::time::Instant;
        thread_local! {
            static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
        }
        let every = IDLE_COLLECT_MS.load(Ordering::Relaxed);
        if every == 0 {
            return;
        }
        let now = Instant::now();
        let due = LAST.with(|last| {
            let due = last
                .get()
                .is_none_or(|t| now.duration_since(t) >= Duration::from_millis(every));
            if due {
                last.set(Some(now));
            }
            due
        });
        if due {
            // SAFETY: takes no pointers; collects the calling thread's own heap.
            unsafe { mi_collect(true) }
        }
    }
}

static STARTED: Once = Once::new();

/// Starts the process-wide trimmer once; later calls (a second gateway in the same process,
/// as in tests) keep the first interval. A zero interval starts nothing.
pub fn start_trimmer(interval: Duration) {
    if interval.is_zero() || !SUPPORTED {
        return;
    }
    STARTED.call_once(|| {
        #[cfg(feature = "mimalloc")]
        IDLE_COLLECT_MS.store(
            u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        let spawned = std::thread::Builder::new()
            .name("memory-trim".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                trim();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "memory trimmer not started");
        }
    });
}

/// Whether mimalloc serves the program: the binary's global allocator with the feature (a unit
/// test keeps the system allocator).
const MIMALLOC: bool = cfg!(all(feature = "mimalloc", not(test)));

/// Whether the trim thread has anything to hand back: glibc's arenas or mimalloc's.
const SUPPORTED: bool = crate::observability::alive::GLIBC_HEAP || MIMALLOC;

fn trim() {
    #[cfg(feature = "mimalloc")]
    if MIMALLOC {
        // SAFETY: takes no pointers; purges the arenas all threads share.
        unsafe { mi_collect(true) };
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if crate::observability::alive::GLIBC_HEAP {
        // SAFETY: malloc_trim takes no pointers and is thread-safe (it locks each arena).
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// What one client connection may hold, for the cap derived from a memory limit: an idle
/// keep-alive connection measured 23 KiB in a container (issue 18), with room for a request
/// in flight.
pub const BYTES_PER_CONNECTION: u64 = 32 << 10;
/// The process without connections or cache: runtime, route table, pools, metrics (RSS idle
/// measures 10-11 MiB), with headroom for bursts.
pub const BASE_BYTES: u64 = 24 << 20;

/// The memory limit of the cgroup this process runs in (v2 `memory.max`, v1
/// `memory.limit_in_bytes`), when one is set.
pub fn cgroup_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut candidates = vec![
        "/sys/fs/cgroup/memory.max".to_string(),
        "/sys/fs/cgroup/memory/memory.limit_in_bytes".to_string(),
    ];
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        if controllers.is_empty() {
            candidates.push(format!("/sys/fs/cgroup{path}/memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
        }
    }
    candidates
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|text| parse_limit(&text))
        .min()
}

/// How often the memory limit is read again (a few small file reads): a limit lowered at run
/// time (`docker update --memory`, Kubernetes' in-place pod resize) reaches the connection
/// caps within this (issue 25: a replica lowered to 64 MiB was OOM-killed by idle connections
/// under the cap it had derived at start from its old limit).
pub const LIMIT_POLL: Duration = Duration::from_secs(2);

/// Calls `changed` with the new limit whenever the cgroup memory limit differs from the last
/// one seen (at first `initial`), looking every [`LIMIT_POLL`], until `stop` resolves.
pub async fn watch_limit(
    initial: Option<u64>,
    mut changed: impl FnMut(Option<u64>),
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut last = initial;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LIMIT_POLL) => {}
            _ = &mut stop => return,
        }
        // procfs and cgroupfs answer from memory: no blocking I/O worth a thread.
        let now = cgroup_memory_limit();
        if now != last {
            last = now;
            changed(now);
        }
    }
}

/// A cgroup limit file's value: `max` (v2) or a page-rounded 2^63 (v1) mean none.
fn parse_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v < 1 << 60).then_some(v)
}

/// How many client connections, all listeners together, `limit` (a cgroup memory limit) can
/// hold beside the base and the cache's budget; never below 64. `None` without a limit.
pub fn connection_budget(limit: Option<u64>, cache_bytes: u64) -> Option<usize> {
    let room = limit?.saturating_sub(BASE_BYTES + cache_bytes);
    Some(
        usize::try_from(room / BYTES_PER_CONNECTION)
            .unwrap_or(usize::MAX)
            .max(64),
    )
}

/// What one routed request in flight holds, for the cap on them derived from memory
/// (`[server.saturation]`): its handler and upstream-call futures (~17 KiB), the request head
/// and the pooled connection's buffers. A request's body is bounded separately
/// (`limits.max_body`), responses by `limits.response_buffer_total`.
pub const BYTES_PER_REQUEST: u64 = 64 << 10;
/// The cap where no memory limit can be read at all.
const FALLBACK_REQUEST_CAP: usize = 65_536;

/// `[server.saturation] max_in_flight`, or, when 0, what the memory limit (the cgroup's,
/// else the machine's) leaves beside the base and the cache at [`BYTES_PER_REQUEST`] each.
pub fn request_budget(max_in_flight: usize, cache_bytes: u64) -> usize {
    if max_in_flight > 0 {
        return max_in_flight;
    }
    derived_request_cap(cgroup_memory_limit().or_else(physical_memory), cache_bytes)
}

/// Routed requests in flight `memory_limit` leaves room for ([`request_budget`]); never
/// below 64.
pub fn derived_request_cap(memory_limit: Option<u64>, cache_bytes: u64) -> usize {
    match memory_limit {
        Some(limit) => {
            let room = limit.saturating_sub(BASE_BYTES + cache_bytes);
            usize::try_from(room / BYTES_PER_REQUEST)
                .unwrap_or(usize::MAX)
                .max(64)
        }
        None => FALLBACK_REQUEST_CAP,
    }
}

#[cfg(unix)]
fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf reads a system constant.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && size > 0).then(|| pages as u64 * size as u64)
}

#[cfg(not(unix))]
fn physical_memory() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_limit_bounds_the_connections_so_they_fit() {
        assert_eq!(connection_budget(None, 64 << 20), None);
        // A 64 MiB replica with an 8 MiB cache: (64 - 24 - 8) MiB / 32 KiB = 1,024.
        assert_eq!(connection_budget(Some(64 << 20), 8 << 20), Some(1_024));
        assert_eq!(connection_budget(Some(4 << 30), 64 << 20), Some(128_256));
        // A cache budget as large as the limit leaves the floor, not zero.
        assert_eq!(connection_budget(Some(64 << 20), 64 << 20), Some(64));
    }

    #[test]
    fn cgroup_files_say_max_or_a_huge_number_for_no_limit() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("67108864\n"), Some(64 << 20));
        // Whatever this machine says, reading it does not fail.
        let _ = cgroup_memory_limit();
    }

    #[test]
    fn a_memory_limit_bounds_the_requests_in_flight() {
        // A 64 MiB replica with an 8 MiB cache: (64 - 24 - 8) MiB / 64 KiB = 512.
        assert_eq!(derived_request_cap(Some(64 << 20), 8 << 20), 512);
        assert_eq!(derived_request_cap(Some(16 << 20), 0), 64);
        assert_eq!(derived_request_cap(None, 0), FALLBACK_REQUEST_CAP);
        assert_eq!(request_budget(7, 0), 7);
        // This machine has some memory.
        assert!(physical_memory().is_some_and(|m| m > 0));
        assert!(request_budget(0, 0) >= 64);
    }
}
