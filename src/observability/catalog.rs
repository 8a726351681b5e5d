//! Every metric family the gateway exports, with its help text, described when the recorder
//! is installed and registered at its zero values when a configuration is loaded: a scrape
//! right after start shows every family (a counter that has not counted yet reads 0 instead
//! of being absent, which dashboards and alerts cannot tell from "not exported").
//!
//! One exception, [`ONLY_WITH_FEATURE`]: a family whose zero would be a false statement is
//! absent until its feature is in use.
//!
//! States follow one convention: one series per state, 1 for the current one and 0 for the
//! others (`gateway_circuit_breaker_state{state}`, `gateway_ratelimit_backend{state}`,
//! `gateway_upstream_endpoints{state}` counts instances per state).

use crate::config::{Config, RouteKind};

/// How a family is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// (name, kind, help) of every family; the Grafana dashboard's test checks its queries
/// against this list.
pub const FAMILIES: &[(&str, Kind, &str)] = &[
    ("gateway_requests_total", Kind::Counter, "Requests answered, by route template, method and status class"),
    ("gateway_request_duration_seconds", Kind::Histogram, "Time from the request's arrival (its first byte read; the accept for a new connection's first request already waiting) to its response headers, by route template, method and status class"),
    ("gateway_upstream_attempts_total", Kind::Counter, "Attempts sent to an upstream (refusals by the breaker and losing hedges included), by outcome"),
    ("gateway_upstream_attempt_duration_seconds", Kind::Histogram, "Duration of upstream attempts until response headers, by outcome"),
    ("gateway_upstream_retry_budget_exhausted_total", Kind::Counter, "Retries not made because the upstream's retry budget was spent"),
    ("gateway_upstream_hedges_total", Kind::Counter, "Hedged second attempts sent to another instance"),
    ("gateway_upstream_ejections_total", Kind::Counter, "Instances ejected for failing"),
    ("gateway_upstream_in_flight", Kind::Gauge, "Calls holding one of an upstream's slots (max_connections): from the start of the call until the upstream has sent the whole body"),
    ("gateway_upstream_concurrency_limit", Kind::Gauge, "The upstream's concurrency limit learnt from latency (under max_connections): the sum of the limits of its instances in rotation; calls beyond it wait briefly, then are shed"),
    ("gateway_upstream_instance_concurrency_limit", Kind::Gauge, "One instance's concurrency limit learnt from the latency of its own attempts (label address); the upstream's gateway_upstream_concurrency_limit is the sum over the instances in rotation"),
    ("gateway_upstream_instance_in_flight", Kind::Gauge, "Attempts of calls under the concurrency limit on one instance (label address), read at each scrape"),
    ("gateway_fleet_replicas", Kind::Gauge, "Gateway replicas sharing the upstreams, as announced in the rate limiter's Redis within the last 3 s (rate_limit.expected_replicas without Redis, and until the first answer): each upstream's initial_limit is divided among them"),
    ("gateway_upstream_queue_wait_seconds", Kind::Histogram, "Time calls waited for a slot under the concurrency limit (only calls that had to wait; served or shed)"),
    ("gateway_shed_total", Kind::Counter, "Requests refused 503 overloaded, by route, priority and cause (queue_timeout, queue_full)"),
    ("gateway_upstream_endpoints", Kind::Gauge, "Instances of an upstream, by state (healthy, ejected, draining)"),
    ("gateway_upstream_instance_probes_total", Kind::Counter, "Probes of ejected instances, by result"),
    ("gateway_circuit_breaker_state", Kind::Gauge, "Circuit breaker state: 1 for the current state (closed, open, half_open), 0 for the others"),
    ("gateway_circuit_breaker_transitions_total", Kind::Counter, "Circuit breaker transitions, by the state entered"),
    ("gateway_circuit_breaker_health_probes_total", Kind::Counter, "Active health probes while a breaker is open, by result"),
    ("gateway_cache_hits_total", Kind::Counter, "Responses served from the cache (fresh, or a concurrent fetch that was stored)"),
    ("gateway_cache_misses_total", Kind::Counter, "Cacheable requests fetched from the upstream"),
    ("gateway_cache_stale_total", Kind::Counter, "Expired entries served because the upstream failed (stale-if-error)"),
    ("gateway_cache_bypass_total", Kind::Counter, "Requests on cached routes that may not use the cache"),
    ("gateway_not_modified_total", Kind::Counter, "304 Not Modified answered from the cache for a client's If-None-Match / If-Modified-Since, by route"),
    ("gateway_cache_evictions_total", Kind::Counter, "Cache entries evicted, by cause (size, expired)"),
    ("gateway_cache_bytes", Kind::Gauge, "Weighted size of the response cache in bytes"),
    ("gateway_cache_entries", Kind::Gauge, "Entries in the response cache"),
    ("gateway_ratelimit_decisions_total", Kind::Counter, "Rate-limit decisions, by policy and decision"),
    ("gateway_ratelimit_backend", Kind::Gauge, "Rate-limit backend in use: 1 for the current state (redis; fallback: Redis configured but failing; local: no Redis configured), 0 for the others"),
    ("gateway_auth_failures_blocked_total", Kind::Counter, "Clients refused for too many failed token verifications"),
    ("gateway_connections_closed_total", Kind::Counter, "Client connections cut off by the gateway, by reason"),
    ("gateway_websocket_connections", Kind::Gauge, "Open WebSocket connections, by route"),
    ("gateway_websocket_messages_total", Kind::Counter, "WebSocket messages relayed, by route and direction (in: client to upstream)"),
    ("gateway_websocket_bytes_total", Kind::Counter, "WebSocket bytes relayed, by route and direction (in: client to upstream)"),
    ("gateway_websocket_closed_total", Kind::Counter, "WebSocket connections ended, by route and reason (client, upstream, upstream_silent, idle, lifetime, shutdown, stalled)"),
    ("gateway_config_reloads_total", Kind::Counter, "Configuration reloads, by result (success, invalid, failed)"),
    ("gateway_config_info", Kind::Gauge, "1 for the configuration in effect (by its SHA-256), 0 for those it replaced"),
    ("gateway_config_states_alive", Kind::Gauge, "Configuration states alive: 1, plus each one a reload replaced while requests and WebSocket relays that started on it last"),
    ("gateway_upstream_pipelines_alive", Kind::Gauge, "An upstream's pipelines alive: 1, plus each one a reload replaced while calls that started on it last"),
    ("gateway_runtime_alive_tasks", Kind::Gauge, "Tasks alive in the runtime (connections, relays, probe and discovery loops), read at each scrape"),
    ("gateway_heap_bytes", Kind::Gauge, "The heap as glibc's malloc counts it, read at each scrape: in_use (held by the program), free (freed but kept by malloc); absent with another allocator (mimalloc, the default build's)"),
    ("gateway_build_info", Kind::Gauge, "Always 1; the build's version and git commit as labels"),
    ("gateway_errors_total", Kind::Counter, "Error answers by route and reason (the error body's `reason`)"),
    ("gateway_otlp_spans_exported_total", Kind::Counter, "Spans accepted by the OTLP collector ([tracing] otlp_endpoint)"),
    ("gateway_otlp_spans_dropped_total", Kind::Counter, "Spans dropped because the export queue was full"),
    ("gateway_otlp_export_failures_total", Kind::Counter, "OTLP export requests that failed (their batch is dropped)"),
    ("gateway_runtime_scheduling_delay_seconds", Kind::Histogram, "How late the runtime's 10 ms probe tick wakes: the time a ready task waits for a worker (or for the process to get CPU), which every request waits on top of its own work"),
    ("gateway_requests_in_flight", Kind::Gauge, "Routed requests admitted whose handler has not returned (/health, docs and the admin listener not counted)"),
    ("gateway_admission_limit", Kind::Gauge, "Routed requests in flight admitted at once: [server.saturation]'s cap, lowered while the runtime is saturated"),
    ("gateway_shed_total", Kind::Counter, "Requests refused with 503 overloaded, by route, priority and cause (gateway_saturated: the gateway process itself)"),
    ("gateway_tls_certificate_expiry_timestamp_seconds", Kind::Gauge, "The served TLS certificate's notAfter, Unix seconds (only with [server.tls])"),
];

/// Families that exist only while their feature is configured, with no zero registered: the
/// certificate expiry reads "expired in 1970" at zero, which the expiry alerts would take at
/// its word. Set when a certificate is loaded at start and on every reload that replaces it.
pub const ONLY_WITH_FEATURE: &[&str] = &["gateway_tls_certificate_expiry_timestamp_seconds"];

/// Gives every family its help text (call once the recorder is installed).
pub fn describe() {
    for (name, kind, help) in FAMILIES {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
    metrics::gauge!("gateway_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "git_sha" => env!("GATEWAY_GIT_SHA"))
    .set(1.0);
}

/// Registers the zero values of the families `cfg` will use, per route and policy (a
/// histogram with no sample yet shows with zero counts); `upstream::register_zeroes` does
/// the upstreams' families.
pub fn register_zeroes(cfg: &Config) {
    use metrics::{counter, gauge, histogram};
    for r in &cfg.routes {
        let route = r.path.clone();
        counter!("gateway_shed_total", "route" => route.clone(), "priority" => "default",
            "cause" => "gateway_saturated")
        .increment(0);
        for reason in [
            "upstream_unavailable",
            "upstream_timeout",
            "circuit_open",
            "rate_limited",
            "overloaded",
        ] {
            counter!("gateway_errors_total", "route" => route.clone(), "reason" => reason)
                .increment(0);
        }
        if r.upstream.is_some() && r.kind == RouteKind::Proxy {
            counter!("gateway_errors_total", "route" => route.clone(), "reason" => "overloaded")
                .increment(0);
            // `upstream::concurrency::ShedCause` (upstream imports this module, not back).
            for cause in ["queue_timeout", "queue_full"] {
                counter!("gateway_shed_total", "route" => route.clone(),
                    "priority" => r.priority.as_str(), "cause" => cause)
                .increment(0);
            }
        }
        for method in &r.methods {
            let labels = [
                ("route", route.clone()),
                ("method", method.clone()),
                ("status", "2xx".to_string()),
            ];
            counter!("gateway_requests_total", &labels).increment(0);
            let _ = histogram!("gateway_request_duration_seconds", &labels);
        }
        if let (Some(_), Some(upstream)) = (&r.cache, &r.upstream) {
            for family in [
                "gateway_cache_hits_total",
                "gateway_cache_misses_total",
                "gateway_cache_stale_total",
                "gateway_cache_bypass_total",
            ] {
                counter!(family, "upstream" => upstream.clone(), "route" => route.clone())
                    .increment(0);
            }
            counter!("gateway_not_modified_total", "route" => route.clone()).increment(0);
        }
        if r.kind == RouteKind::Websocket {
            gauge!("gateway_websocket_connections", "route" => route.clone()).increment(0.0);
            for direction in ["in", "out"] {
                counter!("gateway_websocket_messages_total", "route" => route.clone(), "direction" => direction).increment(0);
                counter!("gateway_websocket_bytes_total", "route" => route.clone(), "direction" => direction).increment(0);
            }
            for reason in crate::websocket::END_REASONS {
                counter!("gateway_websocket_closed_total", "route" => route.clone(), "reason" => *reason).increment(0);
            }
        }
    }
    let policies = cfg
        .rate_limit
        .policies
        .iter()
        .map(|p| p.name.clone())
        .chain(["ws".to_string(), cfg.auth.failure_policy.clone()])
        .filter(|p| !p.is_empty());
    for policy in policies {
        for decision in ["allowed", "denied", "error_allowed", "error_denied"] {
            counter!("gateway_ratelimit_decisions_total", "policy" => policy.clone(), "decision" => decision).increment(0);
        }
    }
    for cause in ["size", "expired"] {
        counter!("gateway_cache_evictions_total", "cause" => cause).increment(0);
    }
    gauge!("gateway_cache_bytes").increment(0.0);
    gauge!("gateway_cache_entries").increment(0.0);
    counter!("gateway_auth_failures_blocked_total").increment(0);
    let _ = histogram!("gateway_runtime_scheduling_delay_seconds");
    gauge!("gateway_requests_in_flight").increment(0.0);
    gauge!("gateway_admission_limit").increment(0.0);
    for family in [
        "gateway_otlp_spans_exported_total",
        "gateway_otlp_spans_dropped_total",
        "gateway_otlp_export_failures_total",
    ] {
        counter!(family).increment(0);
    }
    for reason in ["send_timeout", "h2_control_flood", "min_send_rate"] {
        counter!("gateway_connections_closed_total", "reason" => reason).increment(0);
    }
    for result in ["success", "invalid", "failed"] {
        counter!("gateway_config_reloads_total", "result" => result).increment(0);
    }
}
