//! The runtime's scheduling delay ("event-loop lag"): a task sleeps for [`TICK`] and measures
//! how late it wakes. Late means the task waited for a worker, behind other tasks that were
//! ready (the runtime has more work than threads), or the whole process was not running (a
//! CPU quota used up, a starved host). It is what every request waits on top of its own
//! work, and what a client sees that the gateway's own timers do not.
//!
//! One probe for the whole runtime, not one per worker: tokio gives no way to pin a task to a
//! worker (any idle worker steals it), so a per-worker probe would measure the same thing with
//! more wake-ups. A saturated runtime has no idle worker to steal it, which is the case that
//! matters. Cost: 100 wake-ups a second, a clock read and a histogram update each.
//!
//! Exported as a histogram, `gateway_runtime_scheduling_delay_seconds`, rather than a gauge
//! of a recent maximum: a gauge is whatever the last sample was when Prometheus scrapes, and
//! the stalls between scrapes are lost; the histogram counts every tick, so any window's p99
//! or share of late ticks can be computed (`histogram_quantile`, `rate` of a bucket), and it
//! sums across replicas.

use std::time::Duration;

use tokio::time::Instant;

/// How often the probe wakes. Short enough to see a stall of a CFS period (10 ms in the chaos
/// experiments), long enough to cost nothing measurable.
pub const TICK: Duration = Duration::from_millis(10);

/// Sleeps [`TICK`] after [`TICK`], recording how late each wake-up is, and hands every sample
/// (when it was taken, how late) to `sample` until that returns `false`.
pub async fn watch(mut sample: impl FnMut(Instant, Duration) -> bool) {
    let histogram = metrics::histogram!("gateway_runtime_scheduling_delay_seconds");
    loop {
        let due = Instant::now() + TICK;
        tokio::time::sleep_until(due).await;
        let now = Instant::now();
        let lag = now.saturating_duration_since(due);
        histogram.record(lag.as_secs_f64());
        if !sample(now, lag) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_runtime_is_never_late_and_a_busy_one_is_by_how_long_it_was_held() {
        let mut seen = Vec::new();
        watch(|_, lag| {
            seen.push(lag);
            seen.len() < 5
        })
        .await;
        assert_eq!(seen, vec![Duration::ZERO; 5]);

        // The probe beside a task that holds the (current-thread) runtime: it cannot run
        // until that task yields, however much later than its tick that is.
        let probe = tokio::spawn(async {
            let mut seen = Vec::new();
            watch(|_, lag| {
                seen.push(lag);
                seen.len() < 2
            })
            .await;
            seen
        });
        tokio::task::yield_now().await;
        // Hold the runtime for 35 ms of (real) time with the clock running, then give it back.
        tokio::time::resume();
        std::thread::sleep(Duration::from_millis(35));
        tokio::time::pause();
        let seen = probe.await.expect("probe ran");
        assert!(seen[0] >= Duration::from_millis(20), "{seen:?}");
        assert!(seen[1] < Duration::from_millis(5), "{seen:?}");
    }
}
