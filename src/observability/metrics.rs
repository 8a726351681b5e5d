//! The Prometheus recorder (one per process) and helpers for low-cardinality labels.

use std::sync::OnceLock;
use std::time::Duration;

use http::Method;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets in seconds: from a cache hit (sub-millisecond) to the 30 s analytics timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the global recorder on first use and returns the handle that renders `/metrics`.
/// Several gateways in one process (tests) share it.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("static bucket list is non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first; then that one records.
        let _ = metrics::set_global_recorder(recorder);
        super::catalog::describe();
        process_collector().describe();
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            })
            .ok();
        handle
    })
}

/// CPU seconds, resident memory, open fds, start time of this process (`process_*`), read at
/// each scrape.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// The Prometheus text of every family, process metrics refreshed first.
pub fn render() -> String {
    // The recorder first: the process metrics recorded before it exists would be lost.
    let handle = handle();
    process_collector().collect();
    super::alive::collect();
    handle.render()
}

/// Whether the recorder is installed (handles taken before it would record nothing).
pub fn installed() -> bool {
    HANDLE.get().is_some()
}

/// A static label for a method: arbitrary client methods must not mint new series.
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The request count and duration series of one (route, method, status class).
struct RequestSeries {
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

/// Per route label: one slot per (method label, status class) pair.
type RouteSeries = Box<[[Option<RequestSeries>; STATUS_CLASSES.len()]; METHOD_LABELS.len()]>;

const METHOD_LABELS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER",
];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// A per-thread cache of metric handles, keyed by route label (or upstream name). The labels
/// come from the config (a bounded set; clients cannot mint new ones), so a fixed fast
/// hasher is safe here: SipHash over the label cost ~300 instructions per lookup, and a cache
/// hit does two lookups.
pub type RouteSlots<T> =
    std::collections::HashMap<std::sync::Arc<str>, T, foldhash::fast::FixedState>;

thread_local! {
    /// Registered series handles, so a request costs two atomic updates instead of building
    /// label Strings, hashing a key and searching the registry twice (it showed in profiles).
    /// Per thread, so the lookup needs no lock; the handles all point at the same series.
    static REQUEST_SERIES: std::cell::RefCell<RouteSlots<RouteSeries>> =
        std::cell::RefCell::default();
}

/// Counts one request in `gateway_requests_total` and records its duration in
/// `gateway_request_duration_seconds`, labelled by route template, method and status class.
pub fn record_request(route: &str, method: &'static str, status: &'static str, seconds: f64) {
    let (Some(m), Some(s)) = (
        METHOD_LABELS.iter().position(|l| *l == method),
        STATUS_CLASSES.iter().position(|l| *l == status),
    ) else {
        return;
    };
    let register = || {
        let labels = [
            ("route", route.to_string()),
            ("method", method.to_string()),
            ("status", status.to_string()),
        ];
        RequestSeries {
            requests: metrics::counter!("gateway_requests_total", &labels),
            duration: metrics::histogram!("gateway_request_duration_seconds", &labels),
        }
    };
    REQUEST_SERIES.with(|cache| {
        with_route_slot(cache, route, |slots: &mut RouteSeries| {
            with_kept(&mut slots[m][s], register, |series| {
                series.requests.increment(1);
                series.duration.record(seconds);
            })
        })
    });
}

/// The `gateway_errors_total` counters of one route, by reason (a handful at most: a short
/// list beats a map).
type ErrorSeries = Vec<(&'static str, Option<metrics::Counter>)>;

thread_local! {
    static ERROR_SERIES: std::cell::RefCell<RouteSlots<ErrorSeries>> =
        std::cell::RefCell::default();
}

/// Counts one answer the gateway made itself in `gateway_errors_total{route,reason}`, with the
/// handle kept per thread like the request series (a 429 storm must not build label strings
/// and search the registry per request).
pub fn record_error(route: &str, reason: &'static str) {
    let register = || {
        metrics::counter!("gateway_errors_total",
            "route" => route.to_string(), "reason" => reason)
    };
    ERROR_SERIES.with(|cache| {
        with_route_slot(cache, route, |series: &mut ErrorSeries| {
            let i = series
                .iter()
                .position(|(r, _)| *r == reason)
                .unwrap_or_else(|| {
                    series.push((reason, None));
                    series.len() - 1
                });
            with_kept(&mut series[i].1, register, |c| c.increment(1));
        })
    });
}

/// Runs `f` on the metric handle kept in `slot`, registering it with `register` the first
/// time, so that recording costs atomic adds instead of building labels and searching the
/// registry. Before the recorder is installed a registered handle would stay a no-op for
/// ever, so none is kept then: `f` gets a fresh one each time.
///
/// The one way the gateway caches metric handles: request and error series (here), attempt
/// series (`upstream::pipeline`) and cache outcomes (`upstream::cache`).
pub fn with_kept<T, R>(
    slot: &mut Option<T>,
    register: impl FnOnce() -> T,
    f: impl FnOnce(&T) -> R,
) -> R {
    if !installed() {
        return f(&register());
    }
    f(slot.get_or_insert_with(register))
}

/// Runs `f` on `route`'s entry of a per-thread cache of metric handles, made with `Default`
/// the first time this thread sees the route: with the handles kept, recording is atomic adds
/// instead of building labels and searching the registry per request.
pub fn with_route_slot<T: Default, R>(
    cache: &std::cell::RefCell<RouteSlots<T>>,
    route: &str,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut cache = cache.borrow_mut();
    if let Some(slot) = cache.get_mut(route) {
        return f(slot);
    }
    f(cache.entry(std::sync::Arc::from(route)).or_default())
}
