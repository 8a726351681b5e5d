//! Calls to upstreams: the pipeline alone (retries, budget, breaker, deadline, connection
//! slots, its metrics), upstreams as sets of instances, the resilience policies and token
//! verification seen through a running gateway, the fast upstream-URL parse, and the fake
//! upstream every other test relies on. Run one file's tests with
//! `cargo test --test upstream pipeline::`.

#[path = "../support/mod.rs"]
mod support;

mod auth_pipeline;
mod hedge_attempts;
mod instances;
mod pipeline;
mod pipeline_metrics;
mod reload_keeps_health;
mod resilience_gateway;
mod support_selftest;
mod upstream_slots;
mod upstream_url;
