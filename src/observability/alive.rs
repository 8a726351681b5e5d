//! What is alive in the process, for telling a leak from an allocator that holds on to freed
//! memory: resident memory alone (`process_resident_memory_bytes`) cannot.
//!
//! - configuration states and upstream pipelines alive ([`AliveGauge`]): 1 state and one
//!   pipeline per upstream in a steady gateway; a reload adds one of each it replaces for as
//!   long as requests and WebSocket relays that started on the old one last, then they go.
//!   A count that keeps growing with reloads is a state something still holds.
//! - the runtime's tasks alive (`gateway_runtime_alive_tasks`): connections, relays, probe and
//!   discovery loops; a replaced pipeline's loops end with it.
//! - the heap (glibc's `mallinfo2`, read at each scrape) in a build without the `mimalloc`
//!   feature: bytes the program holds (`in_use`) against bytes freed but kept by malloc
//!   (`free`). Resident memory that grows while `in_use` stays flat is the allocator's, not a
//!   leak. With mimalloc (the default build) glibc sees only C libraries' allocations, so the
//!   gauge is absent.

use metrics::Gauge;

/// Counts itself in a gauge for as long as it exists: a field of the object counted, so that
/// the object itself needs no `Drop` (which would forbid moving its fields out).
#[derive(Debug)]
pub struct AliveGauge(Gauge);

impl AliveGauge {
    pub fn new(gauge: Gauge) -> AliveGauge {
        gauge.increment(1.0);
        AliveGauge(gauge)
    }

    /// One configuration state (`routes::AppState`) alive.
    pub fn config_state() -> AliveGauge {
        AliveGauge::new(metrics::gauge!("gateway_config_states_alive"))
    }

    /// One pipeline of `upstream` alive.
    pub fn pipeline(upstream: &str) -> AliveGauge {
        AliveGauge::new(metrics::gauge!("gateway_upstream_pipelines_alive",
            "upstream" => upstream.to_string()))
    }
}

impl Drop for AliveGauge {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Sets the gauges read at scrape time: the runtime's tasks (when called on a runtime) and
/// the heap.
pub fn collect() {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let tasks = runtime.metrics().num_alive_tasks();
        metrics::gauge!("gateway_runtime_alive_tasks").set(tasks as f64);
    }
    if let Some(heap) = heap() {
        metrics::gauge!("gateway_heap_bytes", "state" => "in_use").set(heap.in_use as f64);
        metrics::gauge!("gateway_heap_bytes", "state" => "free").set(heap.free as f64);
    }
}

/// What malloc holds, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heap {
    /// Allocated and not freed: what the program holds (mmapped chunks included).
    pub in_use: u64,
    /// Freed but kept by malloc in its arenas (the part `malloc_trim` can return is the
    /// whole free pages of it).
    pub free: u64,
}

/// Whether glibc's malloc serves the program's allocations: a glibc build without the
/// `mimalloc` feature (the binary's global allocator), or a unit test (the test harness
/// keeps the system allocator).
pub const GLIBC_HEAP: bool = cfg!(all(
    target_os = "linux",
    target_env = "gnu",
    any(test, not(feature = "mimalloc"))
));

/// The heap as glibc's malloc counts it; `None` with another allocator or C library.
///
/// `mallinfo2` walks every arena's free lists under the arena's lock: fine once per scrape
/// (tens of microseconds on a gateway's heap), not per request.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn heap() -> Option<Heap> {
    if !GLIBC_HEAP {
        return None;
    }
    // SAFETY: mallinfo2 takes no pointers and is thread-safe (it locks each arena).
    let info = unsafe { libc::mallinfo2() };
    Some(Heap {
        in_use: (info.uordblks + info.hblkhd) as u64,
        free: info.fordblks as u64,
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn heap() -> Option<Heap> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_heap_in_use_follows_what_the_program_holds() {
        let before = heap().expect("glibc").in_use;
        // 8 MiB in 1 KiB blocks (below the mmap threshold: arena memory, like most of ours).
        let blocks: Vec<Vec<u8>> = (0..8192).map(|i| vec![i as u8; 1024]).collect();
        let held = heap().expect("glibc").in_use;
        drop(blocks);
        let after = heap().expect("glibc").in_use;
        // Other test threads allocate too: margins of 2 MiB either way.
        assert!(
            held >= before + (6 << 20),
            "before {before}, holding {held}"
        );
        assert!(after + (6 << 20) <= held, "holding {held}, after {after}");
    }
}
